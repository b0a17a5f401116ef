//! The sandbox: a built-in stand-in for Meta's WhatsApp Cloud API, served on loopback.
//!
//! It exists so that the daemon's tests, and people without Meta credentials, can drive the real
//! HTTP client against something that answers like Meta does: the same URL shape, the same
//! success and error JSON, the same error codes, plus configurable latency and random faults to
//! exercise retries and back-off. It calls the daemon's webhook back as Meta does, with statuses
//! and customers' messages, so the whole loop runs locally. It also keeps a log of every send it
//! saw, so a test can assert "this job was sent exactly once", either in-process through
//! [`SandboxHandle`] or, when the daemon runs as a separate process, over
//! `GET /_sandbox/requests`.
//!
//! One file per role: `send` answers `POST .../messages` (the checks, in order, and the legacy
//! WhatsApp IDs); `faults` scripts and draws the failures; `callbacks` calls the webhook back;
//! `inbound` is the customers writing; `control` is the `/_sandbox/*` endpoints; `args` is the
//! `sendwell sandbox` command line. Beneath them, `state` (what they all share, the public data
//! types included) and `error` (Meta-shaped answers) import no other part; this file only
//! assembles: the server, the handle, the router and the public names.
//!
//! # HTTP surface
//!
//! | method + path | answer |
//! |---|---|
//! | `POST /{version}/{phone_number_id}/messages` | Meta-shaped success or error |
//! | `POST /{phone_number_id}/messages` | the same; Meta also accepts a path without version |
//! | `GET /_sandbox/requests` | JSON array of [`SandboxRecord`], arrival order |
//! | `POST /_sandbox/faults` | body: a [`Fault`]; 204 |
//! | `PUT /_sandbox/tokens` | body: `null` (any token) or `["tok", ...]`; 204 |
//! | `PUT /_sandbox/latency` | body: a humantime string such as `"250ms"`; 204 |
//! | `POST /_sandbox/async_failures` | body: an [`AsyncFailure`]; 204 |
//! | `POST /_sandbox/inbound` | body: `{"from":"+491701234567","text":"STOP"}` (or `button`, `button_reply`); 200 `{"id","http_status","attempts"}` |
//! | `PUT /_sandbox/webhook` | body: `null` (no callbacks) or `{"url":"http://...","app_secret":"..."}`; 204 |
//! | `GET /_sandbox/callbacks` | JSON array of [`CallbackRecord`], in the order they finished |
//! | `GET /healthz` | 200 `{"status":"ok"}` |
//! | anything else | 404 (or 405) with a Meta-shaped JSON error, code 2500 |
//!
//! Every JSON answer ends with a newline, so that `curl` at a prompt prints a whole line.
//! The control endpoints carry no authentication: the sandbox is meant for loopback only.

mod args;
mod callbacks;
mod control;
mod error;
mod faults;
mod inbound;
mod send;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::serve::ListenerExt;
use tokio_util::sync::CancellationToken;

pub use args::SandboxArgs;
pub use inbound::{DEFAULT_INBOUND_PHONE_NUMBER_ID, InboundBody};
pub use state::{
    AsyncFailure, CALLBACK_LOG_CAP, CallbackKind, CallbackRecord, DEFAULT_DISPLAY_PHONE_NUMBER,
    DEFAULT_WABA_ID, Fault, RECORD_LOG_CAP, SandboxConfig, SandboxRecord, base64,
};

use control::{
    control_async_failures, control_callbacks, control_faults, control_latency, control_requests,
    control_tokens, control_webhook, healthz, method_not_allowed, not_found,
};
use inbound::control_inbound;
use send::{BODY_LIMIT, send_unversioned, send_versioned};
use state::Shared;

/// Accept backlog: thousands of clients may connect at once when a test opens many connections
/// (HTTP/1.1 needs one per in-flight request); the kernel default of 128 or tokio's 1024 would
/// make some of them wait for SYN retransmits.
const LISTEN_BACKLOG: u32 = 4096;
/// A bound sandbox, not yet serving: binding first lets callers learn the port (port 0) and take
/// a handle before the server task starts.
pub struct Sandbox {
    /// Bound before serving so that `local_addr` is known and connections queue in the backlog.
    listener: tokio::net::TcpListener,
    /// Read once at bind, because port 0 resolves only then.
    local_addr: SocketAddr,
    /// Shared with every request task and every handle.
    shared: Arc<Shared>,
}

impl Sandbox {
    /// Binds the listener (port 0 picks a free port). Rates are clamped to 0.0..=1.0.
    pub async fn bind(addr: SocketAddr, config: SandboxConfig) -> std::io::Result<Sandbox> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // Same as tokio's TcpListener::bind on unix: a restart must not fail on TIME_WAIT sockets.
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        let local_addr = listener.local_addr()?;
        Ok(Sandbox {
            listener,
            local_addr,
            shared: Arc::new(Shared::new(config)?),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle to inspect and steer the sandbox while it serves.
    pub fn handle(&self) -> SandboxHandle {
        SandboxHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and lets in-flight requests
    /// finish (including their latency) before returning.
    pub async fn serve(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let local_addr = self.local_addr;
        let listener = self.listener.tap_io(|tcp| {
            // Small JSON answers on keep-alive connections must not wait for Nagle; failure only
            // costs latency, so it is not worth failing the connection over.
            let _ = tcp.set_nodelay(true);
        });
        tracing::info!(%local_addr, "sandbox Cloud API listening");
        axum::serve(listener, router(self.shared))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await?;
        tracing::info!(%local_addr, "sandbox Cloud API stopped");
        Ok(())
    }
}

/// Cheap-to-clone access to a running sandbox, for tests.
#[derive(Clone)]
pub struct SandboxHandle {
    /// The same state the request handlers use.
    shared: Arc<Shared>,
}

impl SandboxHandle {
    /// Every `POST .../messages` seen, in arrival order (the newest [`RECORD_LOG_CAP`] at most).
    pub fn requests(&self) -> Vec<SandboxRecord> {
        self.shared.log().records.clone()
    }

    /// Only the requests answered 200.
    pub fn accepted(&self) -> Vec<SandboxRecord> {
        self.shared
            .log()
            .records
            .iter()
            .filter(|r| r.status == 200)
            .cloned()
            .collect()
    }

    /// How many 200 answers carried this job id in `biz_opaque_callback_data` (the part before
    /// the shard sendwell adds after U+001F; exact, never truncated).
    pub fn accepted_count_for(&self, callback_data: &str) -> usize {
        self.shared
            .log()
            .accepted_by_callback
            .get(callback_data)
            .copied()
            .unwrap_or(0)
    }

    /// Queues a scripted fault behind those already queued; `times == 0` does nothing.
    pub fn add_fault(&self, fault: Fault) {
        self.shared.add_fault(fault);
    }

    /// `None`: accept any non-empty token; `Some(list)`: only those (an empty list refuses all).
    pub fn set_valid_tokens(&self, tokens: Option<Vec<String>>) {
        self.shared.set_valid_tokens(tokens);
    }

    /// Changes the base latency for requests arriving from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.set_latency(latency);
    }

    /// Queues a scripted asynchronous failure behind those already queued; `times == 0` does
    /// nothing.
    pub fn add_async_failure(&self, failure: AsyncFailure) {
        self.shared.add_async_failure(failure);
    }

    /// Points callbacks somewhere else (`None`: stop calling back), signed with `app_secret`
    /// (`None`: unsigned). Sends accepted while no URL is set never get callbacks; callbacks
    /// still pending when the URL changes go to the new one.
    pub fn set_webhook(&self, url: Option<String>, app_secret: Option<String>) {
        self.shared.set_webhook(url, app_secret);
    }

    /// Every callback made so far (the newest [`CALLBACK_LOG_CAP`] at most), in the order they
    /// finished, each with its final answer.
    pub fn callbacks(&self) -> Vec<CallbackRecord> {
        self.shared.callback_log().clone()
    }

    /// Delivers a message from the customer `from` (any phone format) to the webhook, as Meta
    /// would, with `metadata.phone_number_id` [`DEFAULT_INBOUND_PHONE_NUMBER_ID`]. Button replies
    /// quote (`context.id`) the newest accepted send to that customer, if any. Resolves to the
    /// webhook's final HTTP status (after retries); `None` if no webhook is set, `from` is not a
    /// phone number, or no try got an answer.
    pub fn send_inbound(
        &self,
        from: &str,
        body: InboundBody,
    ) -> impl Future<Output = Option<u16>> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        let from = from.to_owned();
        async move {
            match shared
                .inbound(DEFAULT_INBOUND_PHONE_NUMBER_ID, &from, body, None)
                .await
            {
                Ok(delivery) => delivery.http_status,
                Err(e) => {
                    tracing::warn!(details = %e.details, "sandbox inbound message not sent");
                    None
                }
            }
        }
    }
}

/// The HTTP surface of the module docs' table.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/{version}/{phone_number_id}/messages",
            post(send_versioned),
        )
        .route("/{phone_number_id}/messages", post(send_unversioned))
        .route("/_sandbox/requests", get(control_requests))
        .route("/_sandbox/faults", post(control_faults))
        .route("/_sandbox/tokens", put(control_tokens))
        .route("/_sandbox/latency", put(control_latency))
        .route("/_sandbox/async_failures", post(control_async_failures))
        .route("/_sandbox/inbound", post(control_inbound))
        .route("/_sandbox/webhook", put(control_webhook))
        .route("/_sandbox/callbacks", get(control_callbacks))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(shared)
}

#[cfg(test)]
mod testing;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::testing::*;
    use serde_json::{Value, json};

    #[tokio::test]
    async fn every_json_answer_ends_with_a_newline() {
        let rx = receiver(vec![]).await;
        let sb = start(webhooked(&rx.url)).await;
        let send = serde_json::to_vec(&text("491701234567", "hi")).unwrap();
        let inbound =
            serde_json::to_vec(&json!({ "from": "+491701234567", "text": "hi" })).unwrap();
        let get = reqwest::Method::GET;
        let post = reqwest::Method::POST;
        for (method, path, token, body, status) in [
            (post.clone(), PATH, Some("t"), send.clone(), 200),
            (post.clone(), PATH, None, send, 401),
            (post.clone(), "/_sandbox/inbound", None, inbound, 200),
            (post, "/_sandbox/faults", None, b"{}".to_vec(), 400),
            (get.clone(), "/_sandbox/requests", None, vec![], 200),
            (get.clone(), "/_sandbox/callbacks", None, vec![], 200),
            (get.clone(), "/healthz", None, vec![], 200),
            (get, "/nope", None, vec![], 404),
        ] {
            let (got, bytes) = sb.request(method, path, token, body).await;
            assert_eq!(got, status, "{path}");
            let answer = String::from_utf8_lossy(&bytes);
            assert!(
                answer.ends_with("}\n") || answer.ends_with("]\n"),
                "{path}: {answer:?}"
            );
            // Still exactly one JSON value.
            serde_json::from_slice::<Value>(&bytes).unwrap();
        }
        let healthz = sb
            .client
            .get(format!("{}/healthz", sb.base))
            .send()
            .await
            .unwrap();
        assert_eq!(healthz.headers()["content-type"], "application/json");
        sb.stop().await;
    }

    #[tokio::test]
    async fn shutdown_lets_in_flight_requests_finish() {
        let sb = Arc::new(
            start(SandboxConfig {
                latency: Duration::from_millis(200),
                ..quick()
            })
            .await,
        );
        let in_flight = {
            let sb = Arc::clone(&sb);
            tokio::spawn(async move { sb.send(&text("1", "x")).await.0 })
        };
        // Wait for the arrival (a condition, not a guess), then shut down mid-latency.
        while sb.handle.requests().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sb.shutdown.cancel();
        assert_eq!(in_flight.await.unwrap(), 200);
        let sb = Arc::into_inner(sb).unwrap();
        sb.task.await.unwrap().unwrap();
    }
}
