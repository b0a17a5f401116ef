//! The one place that talks HTTP to the Cloud API: pooled keep-alive connections, timeouts, and
//! every answer turned into [`SendOk`] or a classified [`ApiFailure`].

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::Deserialize;

use super::classify::{ApiFailure, classify_response, classify_transport};
use crate::config::CloudApiConfig;

/// What a successful send gives back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendOk {
    /// Meta's message id; later webhooks refer to it.
    pub wamid: String,
    /// The WhatsApp user id, which may differ from the number sent.
    pub wa_id: Option<String>,
    /// `accepted` or `held_for_quality_assessment` (template pacing).
    pub message_status: Option<String>,
}

#[derive(Deserialize)]
struct SuccessBody {
    #[serde(default)]
    contacts: Vec<Contact>,
    #[serde(default)]
    messages: Vec<Message>,
}

#[derive(Deserialize)]
struct Contact {
    wa_id: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    id: String,
    message_status: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorObject,
}

#[derive(Deserialize)]
struct ErrorObject {
    #[serde(default)]
    message: String,
    code: Option<i64>,
    #[serde(default)]
    error_data: Option<ErrorData>,
    #[serde(default)]
    fbtrace_id: Option<String>,
}

#[derive(Deserialize)]
struct ErrorData {
    #[serde(default)]
    details: Option<String>,
}

/// The Cloud API client; cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct CloudApi {
    http: reqwest::Client,
    /// `{base_url}/{version}`, so a send only appends `/{phone_number_id}/messages`.
    prefix: String,
}

impl CloudApi {
    pub fn new(cfg: &CloudApiConfig) -> Result<CloudApi, reqwest::Error> {
        Self::with_base_url(cfg, &cfg.base_url)
    }

    /// As [`CloudApi::new`] but sending to another base URL (the in-process sandbox).
    pub fn with_base_url(cfg: &CloudApiConfig, base_url: &str) -> Result<CloudApi, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.request_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(4096)
            // HTTP/1.1 with keep-alive, even where Meta offers HTTP/2 by ALPN: hyper's client
            // keeps one HTTP/2 connection per host and queues requests once the server's
            // SETTINGS_MAX_CONCURRENT_STREAMS are in use, never opening a second connection
            // (hyperium/hyper#2197, #3623). At a typical 100 streams and 300 ms per answer that
            // caps sending at ~333 msgs/s for all accounts together, a third of one number's
            // limit. Keep-alive HTTP/1.1 connections grow with the jobs in flight.
            .http1_only()
            .tcp_nodelay(true)
            .user_agent(concat!("sendwell/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(CloudApi {
            http,
            prefix: format!("{}/{}", base_url.trim_end_matches('/'), cfg.version),
        })
    }

    /// Sends one message. The token is passed per call because accounts rotate tokens.
    pub async fn send(
        &self,
        phone_number_id: &str,
        token: &str,
        body: Vec<u8>,
    ) -> Result<SendOk, ApiFailure> {
        let url = format!("{}/{}/messages", self.prefix, phone_number_id);
        let mut auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            classify_response(
                401,
                None,
                "token has characters HTTP cannot carry".into(),
                None,
            )
        })?;
        auth.set_sensitive(true);
        let resp = self
            .http
            .post(url)
            .header(AUTHORIZATION, auth)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body)
            .send()
            .await
            .map_err(|e| {
                // Only a failed connect proves the request never left; anything later may have
                // reached Meta. The URL carries no secret, but strip it anyway for tidy logs.
                let connect = e.is_connect();
                classify_transport(e.without_url().to_string(), !connect)
            })?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| classify_transport(e.without_url().to_string(), true))?;
        if (200..300).contains(&status) {
            return match serde_json::from_slice::<SuccessBody>(&bytes) {
                Ok(b) => match b.messages.into_iter().next() {
                    Some(m) => Ok(SendOk {
                        wamid: m.id,
                        wa_id: b.contacts.into_iter().next().and_then(|c| c.wa_id),
                        message_status: m.message_status,
                    }),
                    None => Err(classify_transport(
                        "success answer without a message id".into(),
                        true,
                    )),
                },
                Err(e) => Err(classify_transport(
                    format!("success answer that is not JSON: {e}"),
                    true,
                )),
            };
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => {
                let details = b
                    .error
                    .error_data
                    .and_then(|d| d.details)
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default();
                let trace = b
                    .error
                    .fbtrace_id
                    .map(|t| format!(" (fbtrace_id {t})"))
                    .unwrap_or_default();
                (b.error.code, format!("{}{details}{trace}", b.error.message))
            }
            Err(_) => (None, format!("HTTP {status} without a Meta error body")),
        };
        Err(classify_response(status, code, message, retry_after))
    }
}
