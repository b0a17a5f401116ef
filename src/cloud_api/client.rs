//! The one place that talks HTTP to the Cloud API: pooled keep-alive connections, timeouts, and
//! every answer turned into [`SendOk`] or a classified [`ApiFailure`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
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
    /// Per sending number, what every send to it repeats: parsing the URL and building the
    /// auth header were a visible share of a send's CPU in the load bench's profile.
    endpoints: Arc<RwLock<HashMap<String, Arc<Endpoint>>>>,
}

/// One sending number's messages URL, parsed, and the header of the token last used with it
/// (rebuilt when the account's token rotates).
struct Endpoint {
    url: reqwest::Url,
    token: String,
    auth: HeaderValue,
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
            // Every connection that served a call stays for the next one (reqwest's default):
            // with HTTP/1.1 the calls in flight are the connections, and at 500 ms answers that
            // is several thousand; a lower cap closed the ones above it after each answer and
            // opened new ones (a TLS handshake each, with Meta) for the next calls. Idle ones
            // go after 90 s, so the pool is bounded by the jobs in flight, i.e. the prefetch.
            .pool_max_idle_per_host(usize::MAX)
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
            endpoints: Arc::default(),
        })
    }

    /// The URL and auth header for sending from `phone_number_id` with `token`.
    fn endpoint(&self, phone_number_id: &str, token: &str) -> Result<Arc<Endpoint>, ApiFailure> {
        if let Some(e) = self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(phone_number_id)
            && e.token == token
        {
            return Ok(e.clone());
        }
        let url = format!("{}/{}/messages", self.prefix, phone_number_id);
        let url = reqwest::Url::parse(&url).map_err(|e| {
            classify_response(
                400,
                None,
                format!("the messages URL is not valid: {e}"),
                None,
            )
        })?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            classify_response(
                401,
                None,
                "token has characters HTTP cannot carry".into(),
                None,
            )
        })?;
        auth.set_sensitive(true);
        let e = Arc::new(Endpoint {
            url,
            token: token.to_string(),
            auth,
        });
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(phone_number_id.to_string(), e.clone());
        Ok(e)
    }

    /// Sends one message. The token is passed per call because accounts rotate tokens.
    pub async fn send(
        &self,
        phone_number_id: &str,
        token: &str,
        body: Vec<u8>,
    ) -> Result<SendOk, ApiFailure> {
        let endpoint = self.endpoint(phone_number_id, token)?;
        let resp = self
            .http
            .post(endpoint.url.clone())
            .header(AUTHORIZATION, endpoint.auth.clone())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{Sandbox, SandboxConfig};
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn the_prepared_endpoint_follows_a_rotated_token() {
        let sandbox = Sandbox::bind(
            "127.0.0.1:0".parse().unwrap(),
            SandboxConfig {
                latency: Duration::ZERO,
                valid_tokens: Some(vec!["new-token".into()]),
                ..SandboxConfig::default()
            },
        )
        .await
        .unwrap();
        let base = format!("http://{}", sandbox.local_addr());
        let stop = CancellationToken::new();
        let task = tokio::spawn(sandbox.serve(stop.clone()));
        let cfg = CloudApiConfig {
            base_url: base.clone(),
            version: "v21.0".into(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        };
        let api = CloudApi::new(&cfg).unwrap();
        let body = || {
            br#"{"messaging_product":"whatsapp","recipient_type":"individual","to":"4917012345678","type":"text","text":{"body":"hi"}}"#.to_vec()
        };
        let old = api.send("1234567890", "old-token", body()).await;
        assert_eq!(
            old.unwrap_err().code,
            Some(190),
            "the sandbox refuses the old token"
        );
        let new = api.send("1234567890", "new-token", body()).await;
        assert!(new.unwrap().wamid.starts_with("wamid."));
        // And back: each call sends the token it was given, not the one prepared before.
        assert!(api.send("1234567890", "old-token", body()).await.is_err());
        assert!(api.send("1234567890", "new-token", body()).await.is_ok());
        // Another number gets its own URL.
        assert!(api.send("999", "new-token", body()).await.is_ok());
        let numbers: Vec<String> = api.endpoints.read().unwrap().keys().cloned().collect();
        assert_eq!(numbers.len(), 2);
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}
