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
//! `inbound` is the customers writing; `control` is the `/_sandbox/*` endpoints; `error` shapes
//! every refusal like Meta's; `state` is what they all share; `args` is the `sendwell sandbox`
//! command line.
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
#[cfg(test)]
mod testing;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::serve::ListenerExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use args::SandboxArgs;
pub use callbacks::{CallbackKind, CallbackRecord};
pub use faults::{AsyncFailure, Fault};
pub use inbound::InboundBody;
pub use state::base64;

use control::{
    control_async_failures, control_callbacks, control_faults, control_latency, control_requests,
    control_tokens, control_webhook, healthz, method_not_allowed, not_found,
};
use inbound::control_inbound;
use send::{send_unversioned, send_versioned};
use state::Shared;

/// Largest request body accepted, like a modest reverse proxy in front of Meta; beyond it: 413.
const BODY_LIMIT: usize = 1 << 20;
/// Accept backlog: thousands of clients may connect at once when a test opens many connections
/// (HTTP/1.1 needs one per in-flight request); the kernel default of 128 or tokio's 1024 would
/// make some of them wait for SYN retransmits.
const LISTEN_BACKLOG: u32 = 4096;
/// Bound on the records [`SandboxHandle::requests`] retains, so a sandbox left running under load
/// does not grow without limit (a record costs about 450 bytes with its index entry, so the cap
/// is about 0.5 GB). When reached, the oldest tenth is dropped; [`SandboxHandle::accepted_count_for`]
/// keeps counting exactly regardless (its index holds one small entry per distinct callback data).
pub const RECORD_LOG_CAP: usize = 1_000_000;
/// Bound on the records [`SandboxHandle::callbacks`] retains; the oldest tenth goes when reached.
pub const CALLBACK_LOG_CAP: usize = 1_000_000;
/// The WABA id in callbacks unless configured: Meta's documentation example.
pub const DEFAULT_WABA_ID: &str = "102290129340398";
/// The business display number in callbacks unless configured: Meta's documentation example.
pub const DEFAULT_DISPLAY_PHONE_NUMBER: &str = "15550783881";
/// `metadata.phone_number_id` of simulated inbound messages unless the request names one.
pub const DEFAULT_INBOUND_PHONE_NUMBER_ID: &str = "106540352242922";

/// Behaviour knobs; all rates are probabilities 0.0..=1.0 per request (values outside are
/// clamped, NaN counts as 0).
#[derive(Clone)]
pub struct SandboxConfig {
    /// Slept before every `/messages` answer, so clients meet realistic round trips and tests can
    /// hold many requests in flight.
    pub latency: Duration,
    /// Uniform extra latency in `0..jitter`, so answers come back out of order as they do from Meta.
    pub latency_jitter: Duration,
    /// Share of sends answered HTTP 503 + code 2, to exercise transient-error retries.
    pub rate_server_error: f64,
    /// Share of sends answered HTTP 400 + code 130429, to exercise throughput back-off.
    pub rate_throttle: f64,
    /// Share of sends answered HTTP 400 + code 131026, to exercise per-recipient suppression.
    pub rate_undeliverable: f64,
    /// `None`: any non-empty bearer token is accepted (zero-setup use); `Some`: only these, so
    /// token rotation and expiry handling can be tested.
    pub valid_tokens: Option<Vec<String>>,
    /// Where to POST status and inbound callbacks, e.g. `http://127.0.0.1:8088/webhook`; `None`:
    /// no callbacks. Changeable later with [`SandboxHandle::set_webhook`].
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 key for `X-Hub-Signature-256`, Meta's app secret; `None`: callbacks unsigned.
    pub app_secret: Option<String>,
    /// `entry[].id` of every callback: the WhatsApp Business Account.
    pub waba_id: String,
    /// `metadata.display_phone_number` of every callback, and `context.from` of button replies.
    pub display_phone_number: String,
    /// Gap between the answer and `sent`, and between the callbacks of one message.
    pub status_delay: Duration,
    /// Template name → pricing category in its callbacks; templates not listed are "marketing".
    pub template_categories: HashMap<String, String>,
    /// Share of accepted sends that are also `read` (after `delivered`).
    pub read_rate: f64,
    /// Answer Brazilian mobiles and Mexican numbers with the legacy WhatsApp IDs Meta gives
    /// such accounts (see the module documentation).
    pub legacy_wa_ids: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            latency: Duration::from_millis(100),
            latency_jitter: Duration::ZERO,
            rate_server_error: 0.0,
            rate_throttle: 0.0,
            rate_undeliverable: 0.0,
            valid_tokens: None,
            webhook_url: None,
            app_secret: None,
            waba_id: DEFAULT_WABA_ID.into(),
            display_phone_number: DEFAULT_DISPLAY_PHONE_NUMBER.into(),
            status_delay: Duration::from_millis(50),
            template_categories: HashMap::new(),
            read_rate: 1.0,
            legacy_wa_ids: false,
        }
    }
}

/// By hand, so the app secret never reaches a log.
impl std::fmt::Debug for SandboxConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxConfig")
            .field("latency", &self.latency)
            .field("latency_jitter", &self.latency_jitter)
            .field("rate_server_error", &self.rate_server_error)
            .field("rate_throttle", &self.rate_throttle)
            .field("rate_undeliverable", &self.rate_undeliverable)
            .field("valid_tokens", &self.valid_tokens.as_ref().map(Vec::len))
            .field("webhook_url", &self.webhook_url)
            .field(
                "app_secret",
                &self.app_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("waba_id", &self.waba_id)
            .field("display_phone_number", &self.display_phone_number)
            .field("status_delay", &self.status_delay)
            .field("template_categories", &self.template_categories)
            .field("read_rate", &self.read_rate)
            .field("legacy_wa_ids", &self.legacy_wa_ids)
            .finish()
    }
}

/// One `POST .../messages` as the sandbox saw and answered it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Arrival time, unix milliseconds, so tests can check pacing and deferrals.
    pub at_ms: u64,
    /// From the URL, so tests can check which sender account was used.
    pub phone_number_id: String,
    /// Recipient exactly as sent (empty if absent or not a string), to check per-recipient sends.
    pub to: String,
    /// `type` as sent: "template", "text", anything else, or empty if absent/not a string.
    pub kind: String,
    /// `biz_opaque_callback_data`, the daemon's correlation key (its job id): the handle for
    /// "sent exactly once" assertions.
    pub callback_data: Option<String>,
    /// HTTP status answered, so tests can tell accepted sends from refused ones.
    pub status: u16,
    /// Meta error code answered, if any, to check which fault a request met.
    pub error_code: Option<i64>,
    /// Message id answered on success, to match against the daemon's outcome events.
    pub wamid: Option<String>,
    /// The words the customer would read: `text.body`, or an interactive message's
    /// `body.text`; None for templates. Lets tests check footers and questions.
    pub text: Option<String>,
}

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

    /// How many 200 answers carried this `biz_opaque_callback_data` (exact, never truncated).
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

/// A JSON answer with a trailing newline: axum's `Json` writes none, and `curl` at a prompt
/// would print the prompt after the closing brace.
fn json_answer<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            (
                status,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                body,
            )
                .into_response()
        }
        // What axum's `Json` answers when serializing fails; values with string keys never do.
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

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
