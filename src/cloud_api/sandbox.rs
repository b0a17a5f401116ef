//! The sandbox: a built-in stand-in for Meta's WhatsApp Cloud API send endpoint, served on
//! loopback.
//!
//! It exists so that the daemon's tests, and people without Meta credentials, can drive the real
//! HTTP client against something that answers like Meta does: the same URL shape, the same
//! success and error JSON, the same error codes, plus configurable latency and random faults to
//! exercise retries and back-off. It also keeps a log of every send it saw, so a test can assert
//! "this job was sent exactly once", either in-process through [`SandboxHandle`] or, when the
//! daemon runs as a separate process, over `GET /_sandbox/requests`.
//!
//! # HTTP surface
//!
//! | method + path | answer |
//! |---|---|
//! | `POST /{version}/{phone_number_id}/messages` | Meta-shaped success or error (below) |
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
//! The control endpoints carry no authentication: the sandbox is meant for loopback only.
//!
//! # How a send is answered
//!
//! Checks run in this order, and the first that fails decides the answer:
//!
//! 1. bearer token: missing or unparseable → 401, code 190 "Invalid OAuth access token - Cannot
//!    parse access token"; not among the valid tokens → 401, code 190 "Error validating access
//!    token: Session has expired ...". (Meta uses 190 for both; a single code keeps the client's
//!    "stop and alert" classification simple.)
//! 2. body: over 1 MiB → 413; not JSON or not a valid send request → 400, code 100
//!    "(#100) Invalid parameter" with `error_data.details` naming the problem. Validation runs
//!    before faults because faults simulate Meta-side conditions of *valid* requests.
//! 3. scripted [`Fault`]s, first match in the order added; recipients are compared by digits.
//! 4. random faults: 5xx (code 2), then throttle (130429), then undeliverable (131026), each drawn
//!    independently; the first that hits wins.
//! 5. success: 200 with a fresh `wamid`, and `contacts[].wa_id` the digits of `to`; with
//!    `legacy_wa_ids`, the WhatsApp ID such accounts have (below).
//!
//! # Legacy WhatsApp IDs (`legacy_wa_ids`, `--legacy-wa-ids`)
//!
//! Meta answers some sends with a WhatsApp ID that is not the number sent, and names the customer
//! by that ID in every callback. With `legacy_wa_ids` on, the sandbox does so for the two patterns
//! seen in practice: a Brazilian mobile `+55 AA 9XXXXXXXX` (eight digits starting 6–9) has the ID
//! `55AAXXXXXXXX` (no ninth digit), and a Mexican `+52` + 10 digits has `521` + 10 digits. The
//! ID is in the answer's `contacts[].wa_id` and in the status callbacks' `recipient_id`; inbound
//! messages come `from` whatever the caller gives (give the ID, as Meta would). Faults still match
//! the number sent. Off by default: every other send, and every send with it off, has the
//! number's digits as its ID.
//!
//! The outcome is decided and logged when the request arrives; the latency is slept afterwards.
//! So a client that times out during the latency still leaves an accepted send in the log, exactly
//! like a real request whose response was lost: that is the case idempotency tests need.
//!
//! # Webhooks back to the daemon
//!
//! With a `webhook_url`, the sandbox calls back like Meta does, so the whole loop runs locally.
//! Every accepted send gets its own task that POSTs, one envelope each and `status_delay` apart
//! (the first `status_delay` after the answer): `sent` (with `pricing`, without `conversation`,
//! as from v24.0), `delivered` (with `pricing`), and, with probability `read_rate`, `read`. A
//! matching [`AsyncFailure`] turns that into `sent` then `failed` (with `errors`). Each body is
//! signed `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(app_secret, body)>` when an app secret is
//! set. An answer other than 200, or no answer, is retried after 100 ms, doubling, up to 10 tries
//! in all (Meta keeps retrying for days; a test wants an end). [`SandboxHandle::send_inbound`]
//! and `POST /_sandbox/inbound` deliver a customer's message the same way. Every callback and its
//! final answer is kept in [`SandboxHandle::callbacks`]. Callbacks never delay a `/messages`
//! answer: the task is spawned when the send is decided, so even a send whose answer the client
//! never reads gets its callbacks, as with Meta.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::serve::ListenerExt;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

/// Largest request body accepted, like a modest reverse proxy in front of Meta; beyond it: 413.
const BODY_LIMIT: usize = 1 << 20;
/// Meta's limit for `text.body`, in characters.
const TEXT_BODY_MAX_CHARS: usize = 4096;
/// Meta's limit for `biz_opaque_callback_data`, in characters.
const CALLBACK_DATA_MAX_CHARS: usize = 512;
/// E.164 numbers have at most 15 digits.
const PHONE_MAX_DIGITS: usize = 15;
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
/// The profile name of every simulated customer.
const INBOUND_PROFILE_NAME: &str = "Sandbox User";
/// Tries per callback, the first included, before it is given up.
const CALLBACK_TRIES: u32 = 10;
/// Wait before the first retry of a callback; doubled before each further one.
const CALLBACK_FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Per-try bound, so a receiver that never answers cannot hold a callback task forever.
const CALLBACK_TRY_TIMEOUT: Duration = Duration::from_secs(10);
/// `errors[].href` in failed statuses, as in Meta's examples.
const ERROR_CODES_HREF: &str = "/documentation/business-messaging/whatsapp/support/error-codes";

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

/// A scripted fault: answer the next `times` requests that match `to` (None = any recipient) with
/// this error. `http_status` outside 400..=599 is answered as 500 (an error must look like one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Recipient to hit, compared by digits ("+49 170 1" matches "491701"); None hits any.
    pub to: Option<String>,
    /// HTTP status to answer with.
    pub http_status: u16,
    /// Meta error code (`error.code`) to answer with.
    pub code: i64,
    /// Error title; the answer's `message` is "(#code) title" unless it already starts with "(#".
    pub message: String,
    /// How many matching requests this fault answers before it is used up.
    pub times: u32,
}

/// A scripted asynchronous failure: the next `times` sends that match `to` (None = any recipient)
/// are accepted (200 and a wamid) but their callbacks are `sent` then `failed` with this error,
/// as when Meta accepts a message it cannot deliver (131049, 131050, 131026, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncFailure {
    /// Recipient to hit, compared by digits; None hits any.
    pub to: Option<String>,
    /// `errors[].code` of the `failed` status.
    pub code: i64,
    /// `errors[].title` (and `message`, which Meta sets to the same text).
    pub title: String,
    /// How many matching accepted sends this failure takes before it is used up.
    pub times: u32,
}

/// What a simulated customer sends, shaped per Meta's `messages` webhook references.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundBody {
    /// `type: "text"`, `text.body`.
    Text(String),
    /// `type: "button"`: a tapped template quick-reply button.
    Button {
        /// The button's payload as set on the template send.
        payload: String,
        /// The button label.
        text: String,
    },
    /// `type: "interactive"`, `interactive.type: "button_reply"`: a tapped reply button.
    ButtonReply {
        /// The button id as set on the interactive send.
        id: String,
        /// The button label.
        title: String,
    },
}

/// Which kind of callback a [`CallbackRecord`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackKind {
    /// A `statuses[]` callback for a send.
    Status,
    /// A `messages[]` callback: a simulated customer message.
    Inbound,
}

/// One callback POST (with its retries) as the sandbox made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackRecord {
    /// When the first try started, unix milliseconds.
    pub at_ms: u64,
    /// Status or inbound.
    pub kind: CallbackKind,
    /// `sent`, `delivered`, `read` or `failed`; None for inbound.
    pub status: Option<String>,
    /// The message the callback is about: the send's wamid, or the inbound message's id.
    pub wamid: Option<String>,
    /// The last try's HTTP status; None if that try got no answer (connection error, timeout).
    pub http_status: Option<u16>,
    /// Tries made, 1..=10.
    pub attempts: u32,
}

/// clap arguments for the `sendwell sandbox` subcommand.
#[derive(clap::Args, Clone)]
pub struct SandboxArgs {
    /// Address to listen on; loopback by default because the control endpoints are unauthenticated.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// Latency added to every /messages answer, e.g. "100ms", "2s".
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Uniform random extra latency in 0..JITTER, e.g. "50ms".
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub latency_jitter: Duration,
    /// Probability (0.0..=1.0) of answering HTTP 503, code 2.
    #[arg(long = "rate-5xx", default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_5xx: f64,
    /// Probability (0.0..=1.0) of answering code 130429 (throughput reached).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_throttle: f64,
    /// Probability (0.0..=1.0) of answering code 131026 (message undeliverable).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_undeliverable: f64,
    /// Accepted bearer token (repeatable); without any, every non-empty token is accepted.
    #[arg(long = "token", value_name = "TOKEN")]
    pub tokens: Vec<String>,
    /// POST signed status and inbound callbacks here, e.g. "http://127.0.0.1:8088/webhook".
    #[arg(long, value_name = "URL")]
    pub webhook_url: Option<String>,
    /// Sign callbacks with the app secret in this file (one trailing newline is ignored); the
    /// secret is read when the arguments are parsed, so a bad path fails at the command line.
    #[arg(long = "app-secret-file", value_name = "PATH", value_parser = read_secret_file)]
    pub app_secret: Option<String>,
    /// Probability (0.0..=1.0) that an accepted send is also reported read.
    #[arg(long, default_value_t = 1.0, value_parser = parse_rate)]
    pub read_rate: f64,
    /// Answer Brazilian mobiles (+55 AA 9XXXXXXXX) and Mexican numbers (+52) with the legacy
    /// WhatsApp IDs Meta gives such accounts (55AAXXXXXXXX, 521…).
    #[arg(long)]
    pub legacy_wa_ids: bool,
}

/// By hand, so the app secret never reaches a log.
impl std::fmt::Debug for SandboxArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxArgs")
            .field("listen", &self.listen)
            .field("latency", &self.latency)
            .field("latency_jitter", &self.latency_jitter)
            .field("rate_5xx", &self.rate_5xx)
            .field("rate_throttle", &self.rate_throttle)
            .field("rate_undeliverable", &self.rate_undeliverable)
            .field("tokens", &self.tokens.len())
            .field("webhook_url", &self.webhook_url)
            .field(
                "app_secret",
                &self.app_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("read_rate", &self.read_rate)
            .field("legacy_wa_ids", &self.legacy_wa_ids)
            .finish()
    }
}

impl SandboxArgs {
    /// The sandbox behaviour these arguments describe.
    pub fn config(&self) -> SandboxConfig {
        SandboxConfig {
            latency: self.latency,
            latency_jitter: self.latency_jitter,
            rate_server_error: self.rate_5xx,
            rate_throttle: self.rate_throttle,
            rate_undeliverable: self.rate_undeliverable,
            valid_tokens: (!self.tokens.is_empty()).then(|| self.tokens.clone()),
            webhook_url: self.webhook_url.clone(),
            app_secret: self.app_secret.clone(),
            read_rate: self.read_rate,
            legacy_wa_ids: self.legacy_wa_ids,
            ..SandboxConfig::default()
        }
    }
}

/// clap value parser: the app secret from a file, without the trailing newline editors add.
fn read_secret_file(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let secret = text
        .strip_suffix('\n')
        .map_or(text.as_str(), |s| s.strip_suffix('\r').unwrap_or(s));
    if secret.is_empty() {
        return Err(format!("{path} holds no secret"));
    }
    Ok(secret.to_owned())
}

/// clap value parser: a probability, rejected at the command line rather than clamped silently.
fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not a probability between 0.0 and 1.0"))
    }
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

/// State shared by the server and every handle.
struct Shared {
    /// Fixed at bind; only the base latency is steerable at run time.
    latency_jitter_nanos: u64,
    /// Clamped copies of the config rates, so `random_bool` can never panic.
    rate_server_error: f64,
    /// See `rate_server_error`.
    rate_throttle: f64,
    /// See `rate_server_error`.
    rate_undeliverable: f64,
    /// Base latency in nanoseconds; atomic so it can change without locking the hot path.
    latency_nanos: AtomicU64,
    /// Read on every request, written rarely: an RwLock keeps readers from contending.
    valid_tokens: RwLock<Option<HashSet<String>>>,
    /// Scripted faults in the order added; usually empty, so the lock is uncontended.
    faults: Mutex<Vec<Fault>>,
    /// The record log and its index, under one lock so they never disagree.
    log: Mutex<Log>,
    /// Random per sandbox so wamids from two sandboxes in one process never collide.
    wamid_salt: u64,
    /// Makes wamids unique within this sandbox.
    wamid_counter: AtomicU64,
    /// Where callbacks go now; read at every callback, so changes apply to pending ones.
    webhook: RwLock<Option<Arc<WebhookTarget>>>,
    /// `entry[].id` of callbacks.
    waba_id: String,
    /// `metadata.display_phone_number` of callbacks.
    display_phone_number: String,
    /// Gap between the callbacks of one message.
    status_delay: Duration,
    /// Template name → pricing category.
    template_categories: HashMap<String, String>,
    /// Clamped like the other rates.
    read_rate: f64,
    /// See [`SandboxConfig::legacy_wa_ids`].
    legacy_wa_ids: bool,
    /// Scripted asynchronous failures in the order added.
    async_failures: Mutex<Vec<AsyncFailure>>,
    /// Every finished callback, bounded by [`CALLBACK_LOG_CAP`].
    callbacks: Mutex<Vec<CallbackRecord>>,
    /// One pooled client for all callbacks.
    http: reqwest::Client,
    /// Status callback tasks that have run to their end, so tests can tell "no more callbacks
    /// will come for these sends" without sleeping.
    status_runs_done: AtomicU64,
}

/// A callback destination.
struct WebhookTarget {
    url: String,
    /// HMAC key; None sends unsigned callbacks.
    app_secret: Option<String>,
}

/// What the status callbacks of one accepted send need.
struct StatusRun {
    /// From the send's URL: `metadata.phone_number_id`.
    phone_number_id: String,
    wamid: String,
    /// `recipient_id`: the WhatsApp ID (the digits of `to`, or its legacy ID).
    wa_id: String,
    callback_data: Option<String>,
    /// The `pricing` object for `sent` and `delivered`.
    pricing: Value,
    /// Set: `sent` then `failed` with this error.
    failure: Option<AsyncFailure>,
    /// Whether a `read` follows `delivered`.
    read: bool,
}

/// How an inbound callback went.
struct InboundDelivery {
    /// `messages[].id` of the simulated message.
    wamid: String,
    /// Final HTTP status, None when no try was answered.
    http_status: Option<u16>,
    attempts: u32,
}

/// What the sandbox remembers about sends.
#[derive(Default)]
struct Log {
    /// Every send, in arrival order, bounded by [`RECORD_LOG_CAP`].
    records: Vec<SandboxRecord>,
    /// 200 answers per callback data, kept apart from `records` so counting is O(1) and survives
    /// truncation of the log.
    accepted_by_callback: HashMap<String, usize>,
}

impl Shared {
    fn new(config: SandboxConfig) -> std::io::Result<Shared> {
        let http = reqwest::Client::builder()
            // Callbacks go to a local receiver; a proxy from the environment must not catch them.
            .no_proxy()
            .timeout(CALLBACK_TRY_TIMEOUT)
            .build()
            .map_err(std::io::Error::other)?;
        let webhook = config.webhook_url.map(|url| {
            Arc::new(WebhookTarget {
                url,
                app_secret: config.app_secret,
            })
        });
        Ok(Shared {
            latency_jitter_nanos: duration_nanos(config.latency_jitter),
            rate_server_error: clamp_rate(config.rate_server_error),
            rate_throttle: clamp_rate(config.rate_throttle),
            rate_undeliverable: clamp_rate(config.rate_undeliverable),
            latency_nanos: AtomicU64::new(duration_nanos(config.latency)),
            valid_tokens: RwLock::new(config.valid_tokens.map(|t| t.into_iter().collect())),
            faults: Mutex::new(Vec::new()),
            log: Mutex::new(Log::default()),
            wamid_salt: rand::rng().random(),
            wamid_counter: AtomicU64::new(0),
            webhook: RwLock::new(webhook),
            waba_id: config.waba_id,
            display_phone_number: config.display_phone_number,
            status_delay: config.status_delay,
            template_categories: config.template_categories,
            read_rate: clamp_rate(config.read_rate),
            legacy_wa_ids: config.legacy_wa_ids,
            async_failures: Mutex::new(Vec::new()),
            callbacks: Mutex::new(Vec::new()),
            http,
            status_runs_done: AtomicU64::new(0),
        })
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        // A panic while holding the lock cannot leave the log half-updated in a harmful way.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_fault(&self, fault: Fault) {
        if fault.times > 0 {
            self.faults
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(fault);
        }
    }

    fn set_valid_tokens(&self, tokens: Option<Vec<String>>) {
        *self.valid_tokens.write().unwrap_or_else(|e| e.into_inner()) =
            tokens.map(|t| t.into_iter().collect());
    }

    fn set_latency(&self, latency: Duration) {
        self.latency_nanos
            .store(duration_nanos(latency), Ordering::Relaxed);
    }

    /// Base latency plus jitter for one answer.
    fn delay(&self) -> Duration {
        let base = self.latency_nanos.load(Ordering::Relaxed);
        let jitter = if self.latency_jitter_nanos == 0 {
            0
        } else {
            rand::rng().random_range(0..self.latency_jitter_nanos)
        };
        Duration::from_nanos(base.saturating_add(jitter))
    }

    fn record(&self, record: SandboxRecord) {
        let mut log = self.log();
        if record.status == 200 {
            if let Some(cb) = &record.callback_data {
                *log.accepted_by_callback.entry(cb.clone()).or_insert(0) += 1;
            }
        }
        if log.records.len() >= RECORD_LOG_CAP {
            log.records.drain(..RECORD_LOG_CAP / 10);
        }
        log.records.push(record);
    }

    /// Checks the bearer token; `Err` is the answer to give.
    fn check_token(&self, headers: &HeaderMap) -> Result<(), MetaError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty());
        let Some(token) = token else {
            return Err(MetaError::new(
                StatusCode::UNAUTHORIZED,
                190,
                "Invalid OAuth access token - Cannot parse access token".into(),
                "Send the header 'Authorization: Bearer <ACCESS_TOKEN>'.".into(),
            ));
        };
        let valid = self.valid_tokens.read().unwrap_or_else(|e| e.into_inner());
        match &*valid {
            Some(tokens) if !tokens.contains(token) => Err(MetaError::new(
                StatusCode::UNAUTHORIZED,
                190,
                "Error validating access token: Session has expired or the token is not one \
                 the sandbox accepts."
                    .into(),
                "The access token has expired or is not valid. Get a new access token.".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Uses up one matching scripted fault, if any.
    fn take_fault(&self, wa_id: &str) -> Option<MetaError> {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let i = faults
            .iter()
            .position(|f| f.to.as_deref().is_none_or(|to| digits(to) == wa_id))?;
        let fault = &mut faults[i];
        // Never 0 here: add_fault drops empty faults and used-up ones are removed below.
        fault.times -= 1;
        let error = MetaError::scripted(fault);
        if fault.times == 0 {
            faults.remove(i);
        }
        Some(error)
    }

    fn random_fault(&self) -> Option<MetaError> {
        // Skip the RNG entirely in the common all-zero configuration.
        if self.rate_server_error == 0.0
            && self.rate_throttle == 0.0
            && self.rate_undeliverable == 0.0
        {
            return None;
        }
        let mut rng = rand::rng();
        if rng.random_bool(self.rate_server_error) {
            return Some(MetaError::canonical(StatusCode::SERVICE_UNAVAILABLE, 2));
        }
        if rng.random_bool(self.rate_throttle) {
            return Some(MetaError::canonical(StatusCode::BAD_REQUEST, 130_429));
        }
        if rng.random_bool(self.rate_undeliverable) {
            return Some(MetaError::canonical(StatusCode::BAD_REQUEST, 131_026));
        }
        None
    }

    fn new_wamid(&self, wa_id: &str) -> String {
        let n = self.wamid_counter.fetch_add(1, Ordering::Relaxed);
        // Shaped like Meta's: base64 of bytes that start with the recipient.
        let mut raw = Vec::with_capacity(wa_id.len() + 17);
        raw.extend_from_slice(wa_id.as_bytes());
        raw.push(0x15);
        raw.extend_from_slice(&self.wamid_salt.to_be_bytes());
        raw.extend_from_slice(&n.to_be_bytes());
        format!("wamid.{}", base64(&raw))
    }

    /// Decides the answer to one send. Pure apart from consuming faults and drawing randomness.
    fn decide(
        &self,
        headers: &HeaderMap,
        body: &Result<Bytes, BytesRejection>,
        parsed: &Option<Result<Value, serde_json::Error>>,
    ) -> Result<Accepted, MetaError> {
        self.check_token(headers)?;
        let body = match body {
            Ok(body) => body,
            Err(rejection) => {
                let details = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    format!("The request body is larger than {BODY_LIMIT} bytes.")
                } else {
                    format!(
                        "The request body could not be read: {}",
                        rejection.body_text()
                    )
                };
                return Err(MetaError::invalid(rejection.status(), details));
            }
        };
        let value = match parsed {
            Some(Ok(value)) => value,
            Some(Err(e)) => {
                return Err(MetaError::invalid(
                    StatusCode::BAD_REQUEST,
                    format!("The request body is not valid JSON: {e}"),
                ));
            }
            None if body.is_empty() => {
                return Err(MetaError::invalid(
                    StatusCode::BAD_REQUEST,
                    "The request body is empty; expected a JSON object.".into(),
                ));
            }
            None => {
                return Err(MetaError::invalid(
                    StatusCode::BAD_REQUEST,
                    "The request body could not be parsed.".into(),
                ));
            }
        };
        let valid = validate(value).map_err(|d| MetaError::invalid(StatusCode::BAD_REQUEST, d))?;
        if let Some(error) = self.take_fault(&valid.wa_id) {
            return Err(error);
        }
        if let Some(error) = self.random_fault() {
            return Err(error);
        }
        let wa_id = self.wa_id_of(&valid.wa_id);
        let wamid = self.new_wamid(&wa_id);
        let mut message = json!({ "id": wamid });
        if valid.is_template {
            // Meta documents message_status (pacing) for template sends only.
            message["message_status"] = json!("accepted");
        }
        let answer = json!({
            "messaging_product": "whatsapp",
            "contacts": [{ "input": valid.to, "wa_id": wa_id }],
            "messages": [message],
        });
        let pricing = match valid.template_name {
            Some(name) => json!({
                "billable": true,
                "pricing_model": "PMP",
                "type": "regular",
                "category": self
                    .template_categories
                    .get(name)
                    .map_or("marketing", String::as_str),
            }),
            // Free-form messages only go out inside a customer service window: free service.
            None => json!({
                "billable": false,
                "pricing_model": "PMP",
                "type": "free_customer_service",
                "category": "service",
            }),
        };
        let failure = self.take_async_failure(&valid.wa_id);
        Ok(Accepted {
            answer,
            wamid,
            wa_id,
            pricing,
            failure,
        })
    }

    fn add_async_failure(&self, failure: AsyncFailure) {
        if failure.times > 0 {
            self.async_failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(failure);
        }
    }

    /// Uses up one matching asynchronous failure, if any; a copy with `times: 1` is returned.
    fn take_async_failure(&self, wa_id: &str) -> Option<AsyncFailure> {
        let mut failures = self
            .async_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let i = failures
            .iter()
            .position(|f| f.to.as_deref().is_none_or(|to| digits(to) == wa_id))?;
        // Never 0 here: add_async_failure drops empty ones and used-up ones are removed below.
        failures[i].times -= 1;
        let taken = AsyncFailure {
            times: 1,
            ..failures[i].clone()
        };
        if failures[i].times == 0 {
            failures.remove(i);
        }
        Some(taken)
    }

    fn set_webhook(&self, url: Option<String>, app_secret: Option<String>) {
        *self.webhook.write().unwrap_or_else(|e| e.into_inner()) =
            url.map(|url| Arc::new(WebhookTarget { url, app_secret }));
    }

    fn webhook_target(&self) -> Option<Arc<WebhookTarget>> {
        self.webhook
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn callback_log(&self) -> std::sync::MutexGuard<'_, Vec<CallbackRecord>> {
        self.callbacks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_callback(&self, record: CallbackRecord) {
        let mut log = self.callback_log();
        if log.len() >= CALLBACK_LOG_CAP {
            log.drain(..CALLBACK_LOG_CAP / 10);
        }
        log.push(record);
    }

    /// The WhatsApp ID a send to these digits is answered with.
    fn wa_id_of(&self, to_digits: &str) -> String {
        match self.legacy_wa_ids {
            true => legacy_wa_id(to_digits).unwrap_or_else(|| to_digits.to_string()),
            false => to_digits.to_string(),
        }
    }

    /// The newest wamid accepted for this recipient, which a button reply quotes.
    fn last_wamid_to(&self, wa_id: &str) -> Option<String> {
        self.log()
            .records
            .iter()
            .rev()
            .find(|r| r.status == 200 && self.wa_id_of(&digits(&r.to)) == wa_id)
            .and_then(|r| r.wamid.clone())
    }

    /// The status callbacks of one accepted send, in order, `status_delay` apart; the first
    /// after `first_wait` (the answer's latency plus `status_delay`).
    async fn run_status_callbacks(self: Arc<Self>, run: StatusRun, first_wait: Duration) {
        let statuses: &[&str] = match (&run.failure, run.read) {
            (Some(_), _) => &["sent", "failed"],
            (None, true) => &["sent", "delivered", "read"],
            (None, false) => &["sent", "delivered"],
        };
        for (i, &status) in statuses.iter().enumerate() {
            tokio::time::sleep(if i == 0 {
                first_wait
            } else {
                self.status_delay
            })
            .await;
            // Read each time: set_webhook(None) stops pending callbacks, a new URL takes them.
            let Some(target) = self.webhook_target() else {
                break;
            };
            let body = self.status_envelope(&run, status);
            self.deliver(
                &target,
                CallbackKind::Status,
                Some(status),
                &run.wamid,
                body,
            )
            .await;
        }
        self.status_runs_done.fetch_add(1, Ordering::Relaxed);
    }

    /// One status callback body, as Meta sends it (v24.0+: no `conversation`).
    fn status_envelope(&self, run: &StatusRun, status: &str) -> Vec<u8> {
        let mut item = json!({
            "id": run.wamid,
            "status": status,
            "timestamp": unix_secs_string(),
            "recipient_id": run.wa_id,
        });
        if let Some(cb) = &run.callback_data {
            item["biz_opaque_callback_data"] = json!(cb);
        }
        // Meta (webhooks reference, messages/status): `pricing` comes with `sent` and with one of
        // `delivered`/`read`, never both. The sandbox always reports `delivered` and `read` only
        // sometimes, so the second copy rides on `delivered`; `read` and `failed` carry none.
        if matches!(status, "sent" | "delivered") {
            item["pricing"] = run.pricing.clone();
        }
        if let (Some(f), "failed") = (&run.failure, status) {
            item["errors"] = json!([{
                "code": f.code,
                "title": f.title,
                "message": f.title,
                "error_data": { "details": known_details(f.code).unwrap_or(&f.title) },
                "href": ERROR_CODES_HREF,
            }]);
        }
        let value = json!({
            "messaging_product": "whatsapp",
            "metadata": {
                "display_phone_number": self.display_phone_number,
                "phone_number_id": run.phone_number_id,
            },
            "statuses": [item],
        });
        self.envelope(value)
    }

    /// Meta's envelope around one `messages` change value, serialized.
    fn envelope(&self, value: Value) -> Vec<u8> {
        let envelope = json!({
            "object": "whatsapp_business_account",
            "entry": [{
                "id": self.waba_id,
                "changes": [{ "value": value, "field": "messages" }],
            }],
        });
        // Invariant: a Value with string keys always serializes.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }

    /// POSTs one callback, retrying like Meta until a 200 or [`CALLBACK_TRIES`] tries, and
    /// records it. Returns the final status and the tries made.
    async fn deliver(
        &self,
        target: &WebhookTarget,
        kind: CallbackKind,
        status: Option<&str>,
        wamid: &str,
        body: Vec<u8>,
    ) -> (Option<u16>, u32) {
        let at_ms = unix_ms();
        let signature = target
            .app_secret
            .as_deref()
            .map(|secret| signature_header(secret.as_bytes(), &body));
        let body = Bytes::from(body);
        let mut backoff = CALLBACK_FIRST_BACKOFF;
        let mut attempts = 0;
        let http_status = loop {
            attempts += 1;
            let mut request = self
                .http
                .post(&target.url)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            if let Some(signature) = &signature {
                request = request.header("x-hub-signature-256", signature);
            }
            let answer = match request.send().await {
                Ok(response) => {
                    let code = response.status().as_u16();
                    // Read the body so the connection goes back to the pool.
                    let _ = response.bytes().await;
                    Some(code)
                }
                Err(e) => {
                    tracing::debug!(url = %target.url, error = %e, "sandbox callback got no answer");
                    None
                }
            };
            if answer == Some(200) || attempts >= CALLBACK_TRIES {
                break answer;
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        };
        if http_status != Some(200) {
            tracing::warn!(url = %target.url, ?http_status, attempts, "sandbox callback given up");
        }
        self.record_callback(CallbackRecord {
            at_ms,
            kind,
            status: status.map(str::to_owned),
            wamid: Some(wamid.to_owned()),
            http_status,
            attempts,
        });
        (http_status, attempts)
    }

    /// Builds and delivers one inbound message callback; `Err` is the answer to a bad request.
    async fn inbound(
        &self,
        phone_number_id: &str,
        from: &str,
        body: InboundBody,
        context_id: Option<String>,
    ) -> Result<InboundDelivery, MetaError> {
        let wa_id = digits(from);
        let allowed = |c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '(' | ')' | ' ');
        if !from.chars().all(allowed) || wa_id.is_empty() || wa_id.len() > PHONE_MAX_DIGITS {
            return Err(MetaError::invalid(
                StatusCode::BAD_REQUEST,
                format!(
                    "from must be a phone number of 1 to {PHONE_MAX_DIGITS} digits; got {from:?}."
                ),
            ));
        }
        if let InboundBody::Text(text) = &body
            && text.is_empty()
        {
            return Err(MetaError::invalid(
                StatusCode::BAD_REQUEST,
                "text must not be empty.".into(),
            ));
        }
        let Some(target) = self.webhook_target() else {
            return Err(MetaError::invalid(
                StatusCode::CONFLICT,
                "No webhook is set: start the sandbox with a webhook URL or PUT /_sandbox/webhook."
                    .into(),
            ));
        };
        let wamid = self.new_wamid(&wa_id);
        let mut message = json!({
            "from": wa_id,
            "id": wamid,
            "timestamp": unix_secs_string(),
        });
        let quotes = !matches!(body, InboundBody::Text(_));
        match body {
            InboundBody::Text(text) => {
                message["type"] = json!("text");
                message["text"] = json!({ "body": text });
            }
            InboundBody::Button { payload, text } => {
                message["type"] = json!("button");
                message["button"] = json!({ "payload": payload, "text": text });
            }
            InboundBody::ButtonReply { id, title } => {
                message["type"] = json!("interactive");
                message["interactive"] = json!({
                    "type": "button_reply",
                    "button_reply": { "id": id, "title": title },
                });
            }
        }
        // Buttons live on a message the business sent; Meta quotes it in `context`.
        if quotes && let Some(id) = context_id.or_else(|| self.last_wamid_to(&wa_id)) {
            message["context"] = json!({ "from": self.display_phone_number, "id": id });
        }
        let value = json!({
            "messaging_product": "whatsapp",
            "metadata": {
                "display_phone_number": self.display_phone_number,
                "phone_number_id": phone_number_id,
            },
            "contacts": [{ "profile": { "name": INBOUND_PROFILE_NAME }, "wa_id": wa_id }],
            "messages": [message],
        });
        let body = self.envelope(value);
        let (http_status, attempts) = self
            .deliver(&target, CallbackKind::Inbound, None, &wamid, body)
            .await;
        Ok(InboundDelivery {
            wamid,
            http_status,
            attempts,
        })
    }
}

/// An accepted send: the answer, and what its callbacks need.
struct Accepted {
    answer: Value,
    wamid: String,
    wa_id: String,
    pricing: Value,
    failure: Option<AsyncFailure>,
}

/// `X-Hub-Signature-256` for `body`: `sha256=` and the lowercase hex HMAC-SHA256.
fn signature_header(secret: &[u8], body: &[u8]) -> String {
    // Invariant: HMAC accepts keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A Meta-shaped error answer.
#[derive(Debug)]
struct MetaError {
    /// HTTP status of the answer.
    status: StatusCode,
    /// `error.code`, what clients classify on.
    code: i64,
    /// `error.message`, usually "(#code) title".
    message: String,
    /// `error.error_data.details`, the human explanation.
    details: String,
}

impl MetaError {
    fn new(status: StatusCode, code: i64, message: String, details: String) -> MetaError {
        MetaError {
            status,
            code,
            message,
            details,
        }
    }

    /// Code 100 "(#100) Invalid parameter", with the status the problem calls for.
    fn invalid(status: StatusCode, details: String) -> MetaError {
        MetaError::new(status, 100, "(#100) Invalid parameter".into(), details)
    }

    /// One of the random faults, with Meta's wording.
    fn canonical(status: StatusCode, code: i64) -> MetaError {
        let title = match code {
            2 => "Service temporarily unavailable",
            130_429 => "Rate limit hit",
            131_026 => "Message undeliverable",
            _ => "Unknown error",
        };
        let details = known_details(code).unwrap_or(title);
        MetaError::new(status, code, format!("(#{code}) {title}"), details.into())
    }

    fn scripted(fault: &Fault) -> MetaError {
        let status = StatusCode::from_u16(fault.http_status)
            .ok()
            .filter(|s| s.is_client_error() || s.is_server_error())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = if fault.message.starts_with("(#") {
            fault.message.clone()
        } else {
            format!("(#{}) {}", fault.code, fault.message)
        };
        let details = known_details(fault.code).map_or_else(|| fault.message.clone(), Into::into);
        MetaError::new(status, fault.code, message, details)
    }

    fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": "OAuthException",
                "code": self.code,
                "error_data": { "messaging_product": "whatsapp", "details": self.details },
                "fbtrace_id": fbtrace_id(),
            }
        })
    }
}

impl IntoResponse for MetaError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Meta's `error_data.details` for codes a test is likely to script, so scripted faults read
/// like the real ones.
fn known_details(code: i64) -> Option<&'static str> {
    Some(match code {
        2 => "Temporary due to downtime or due to being overloaded.",
        130_429 => "Cloud API message throughput has been reached.",
        131_000 => "Message failed to send due to an unknown error.",
        131_026 => {
            "Unable to deliver message. Reasons can include: the recipient phone number is not a \
             WhatsApp phone number; the recipient has not accepted the new Terms of Service; the \
             recipient is using an old WhatsApp version."
        }
        131_047 => {
            "More than 24 hours have passed since the recipient last replied to the sender number."
        }
        131_049 => {
            "In order to maintain a healthy ecosystem engagement, the message failed to be delivered."
        }
        131_050 => {
            "This recipient has chosen to stop receiving marketing messages on WhatsApp from your business."
        }
        131_056 => {
            "Too many messages sent from the sender phone number to the same recipient phone number \
             in a short period of time."
        }
        132_001 => "Template name does not exist in the translation.",
        _ => return None,
    })
}

/// The parts of a valid send the answer needs.
struct ValidSend<'a> {
    /// Echoed as `contacts[].input`.
    to: &'a str,
    /// `contacts[].wa_id`, and the key scripted faults match on.
    wa_id: String,
    /// Only template answers carry `message_status`.
    is_template: bool,
    /// `template.name`, which decides the pricing category of the callbacks.
    template_name: Option<&'a str>,
}

/// Validates a send body like Meta does; `Err` is the `details` text.
fn validate(body: &Value) -> Result<ValidSend<'_>, String> {
    let Some(obj) = body.as_object() else {
        return Err("The request body must be a JSON object.".into());
    };
    match obj.get("messaging_product") {
        Some(Value::String(p)) if p == "whatsapp" => {}
        None => return Err("The parameter messaging_product is required.".into()),
        Some(other) => {
            return Err(format!(
                "messaging_product must be \"whatsapp\", got {other}."
            ));
        }
    }
    match obj.get("recipient_type") {
        None => {}
        Some(Value::String(r)) if r == "individual" => {}
        Some(other) => {
            return Err(format!(
                "recipient_type must be \"individual\" (the sandbox has no groups), got {other}."
            ));
        }
    }
    let Some(to) = obj.get("to").and_then(Value::as_str) else {
        return Err("The parameter to is required and must be a string.".into());
    };
    let wa_id = digits(to);
    let allowed = |c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '(' | ')' | ' ');
    if !to.chars().all(allowed) || wa_id.is_empty() || wa_id.len() > PHONE_MAX_DIGITS {
        return Err(format!(
            "to must be a phone number of 1 to {PHONE_MAX_DIGITS} digits, optionally with '+', \
             '-', '(', ')' and spaces; got {to:?}."
        ));
    }
    match obj.get("biz_opaque_callback_data") {
        None => {}
        Some(Value::String(cb)) if cb.chars().count() <= CALLBACK_DATA_MAX_CHARS => {}
        Some(Value::String(_)) => {
            return Err(format!(
                "biz_opaque_callback_data is longer than {CALLBACK_DATA_MAX_CHARS} characters."
            ));
        }
        Some(_) => return Err("biz_opaque_callback_data must be a string.".into()),
    }
    // Meta defaults an absent type to "text".
    let kind = match obj.get("type") {
        None => "text",
        Some(Value::String(k)) => k.as_str(),
        Some(_) => return Err("The parameter type must be a string.".into()),
    };
    match kind {
        "text" => validate_text(obj.get("text"))?,
        "template" => validate_template(obj.get("template"))?,
        "interactive" => validate_interactive(obj.get("interactive"))?,
        other => {
            return Err(format!(
                "Message type {other:?} is not supported by the sandbox (only \"template\", \
                 \"text\" and \"interactive\" reply buttons)."
            ));
        }
    }
    Ok(ValidSend {
        to,
        wa_id,
        is_template: kind == "template",
        template_name: obj
            .get("template")
            .and_then(|t| t.get("name"))
            .and_then(Value::as_str)
            .filter(|_| kind == "template"),
    })
}

fn validate_text(text: Option<&Value>) -> Result<(), String> {
    let Some(text) = text.and_then(Value::as_object) else {
        return Err(
            "The parameter text is required for type \"text\" and must be an object.".into(),
        );
    };
    let Some(body) = text.get("body").and_then(Value::as_str) else {
        return Err("The parameter text.body is required and must be a string.".into());
    };
    if body.is_empty() {
        return Err("The parameter text.body must not be empty.".into());
    }
    if body.chars().count() > TEXT_BODY_MAX_CHARS {
        return Err(format!(
            "The parameter text.body is longer than {TEXT_BODY_MAX_CHARS} characters."
        ));
    }
    match text.get("preview_url") {
        None | Some(Value::Bool(_)) => Ok(()),
        Some(_) => Err("The parameter text.preview_url must be a boolean.".into()),
    }
}

/// Reply-button messages as Meta documents them: a body of at most 1024 characters and 1 to 3
/// buttons with unique ids (at most 256 characters) and titles of at most 20 characters.
fn validate_interactive(i: Option<&Value>) -> Result<(), String> {
    let Some(i) = i.and_then(Value::as_object) else {
        return Err("The parameter interactive is required and must be an object.".into());
    };
    if i.get("type").and_then(Value::as_str) != Some("button") {
        return Err("The sandbox supports interactive.type \"button\" only.".into());
    }
    let body = i
        .get("body")
        .and_then(|b| b.get("text"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if body.is_empty() || body.chars().count() > 1024 {
        return Err("interactive.body.text must be 1 to 1024 characters.".into());
    }
    let buttons = i
        .get("action")
        .and_then(|a| a.get("buttons"))
        .and_then(Value::as_array)
        .ok_or("interactive.action.buttons is required.")?;
    if buttons.is_empty() || buttons.len() > 3 {
        return Err("interactive.action.buttons must have 1 to 3 buttons.".into());
    }
    let mut ids = std::collections::HashSet::new();
    for b in buttons {
        let id = b.pointer("/reply/id").and_then(Value::as_str).unwrap_or("");
        let title = b
            .pointer("/reply/title")
            .and_then(Value::as_str)
            .unwrap_or("");
        if id.is_empty() || id.chars().count() > 256 || !ids.insert(id) {
            return Err("Each button needs a unique reply.id of at most 256 characters.".into());
        }
        if title.is_empty() || title.chars().count() > 20 {
            return Err("Each button needs a reply.title of 1 to 20 characters.".into());
        }
    }
    Ok(())
}

fn validate_template(template: Option<&Value>) -> Result<(), String> {
    let Some(template) = template.and_then(Value::as_object) else {
        return Err(
            "The parameter template is required for type \"template\" and must be an object."
                .into(),
        );
    };
    if template
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err(
            "The parameter template.name is required and must be a non-empty string.".into(),
        );
    }
    let Some(language) = template.get("language").and_then(Value::as_object) else {
        return Err("The parameter template.language is required and must be an object.".into());
    };
    if language
        .get("code")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err(
            "The parameter template.language.code is required and must be a non-empty string."
                .into(),
        );
    }
    // Components are the client's business (passed through verbatim); only the container is checked.
    match template.get("components") {
        None | Some(Value::Array(_)) => Ok(()),
        Some(_) => Err("The parameter template.components must be an array.".into()),
    }
}

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

async fn send_versioned(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let phone_number_id = path.map(|Path((_, id))| id);
    send(&shared, phone_number_id, &headers, body).await
}

async fn send_unversioned(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let phone_number_id = path.map(|Path(id)| id);
    send(&shared, phone_number_id, &headers, body).await
}

/// Answers one send: decide, log, start its callbacks, sleep the latency, answer.
async fn send(
    shared: &Arc<Shared>,
    phone_number_id: Result<String, PathRejection>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let at_ms = unix_ms();
    let parsed = match &body {
        Ok(bytes) if !bytes.is_empty() => Some(serde_json::from_slice::<Value>(bytes)),
        _ => None,
    };
    let (phone_number_id, outcome) = match phone_number_id {
        Ok(id) => (id, shared.decide(headers, &body, &parsed)),
        // Only undecodable percent-escapes get here; the token still comes first.
        Err(rejection) => (
            String::new(),
            shared.check_token(headers).and_then(|()| {
                Err(MetaError::invalid(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "Invalid phone number id in the path: {}",
                        rejection.body_text()
                    ),
                ))
            }),
        ),
    };
    // Best-effort fields for the log, also from requests that failed validation.
    let fields = parsed.as_ref().and_then(|p| p.as_ref().ok());
    let str_field = |name: &str| fields.and_then(|v| v.get(name)).and_then(Value::as_str);
    let kind = match fields.and_then(|v| v.get("type")) {
        None if fields.is_some_and(Value::is_object) => "text",
        Some(Value::String(k)) => k.as_str(),
        _ => "",
    };
    let callback_data = str_field("biz_opaque_callback_data").map(str::to_owned);
    let text = fields
        .and_then(|v| {
            v.pointer("/text/body")
                .or_else(|| v.pointer("/interactive/body/text"))
        })
        .and_then(Value::as_str)
        .map(str::to_owned);
    let delay = shared.delay();
    let (status, error_code, wamid, answer) = match outcome {
        Ok(accepted) => {
            // Spawned now, not after the latency: a send whose answer is lost still gets its
            // callbacks, as with Meta. The task waits out the latency itself.
            if shared.webhook_target().is_some() {
                let run = StatusRun {
                    phone_number_id: phone_number_id.clone(),
                    wamid: accepted.wamid.clone(),
                    wa_id: accepted.wa_id,
                    callback_data: callback_data.clone(),
                    pricing: accepted.pricing,
                    failure: accepted.failure,
                    read: shared.read_rate > 0.0 && rand::rng().random_bool(shared.read_rate),
                };
                let first_wait = delay.saturating_add(shared.status_delay);
                tokio::spawn(Arc::clone(shared).run_status_callbacks(run, first_wait));
            }
            (StatusCode::OK, None, Some(accepted.wamid), accepted.answer)
        }
        Err(e) => (e.status, Some(e.code), None, e.body()),
    };
    shared.record(SandboxRecord {
        at_ms,
        phone_number_id,
        to: str_field("to").unwrap_or_default().to_owned(),
        kind: kind.to_owned(),
        callback_data,
        status: status.as_u16(),
        error_code,
        wamid,
        text,
    });
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    (status, Json(answer)).into_response()
}

async fn control_requests(State(shared): State<Arc<Shared>>) -> Response {
    // Clone under the lock, serialize outside it, so sends are not blocked by a big log.
    let records = shared.log().records.clone();
    Json(records).into_response()
}

async fn control_faults(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let fault: Fault = match parse_control_body(body) {
        Ok(fault) => fault,
        Err(e) => return e.into_response(),
    };
    if !(400..=599).contains(&fault.http_status) {
        return MetaError::invalid(
            StatusCode::BAD_REQUEST,
            format!("http_status must be 400..=599, got {}.", fault.http_status),
        )
        .into_response();
    }
    shared.add_fault(fault);
    StatusCode::NO_CONTENT.into_response()
}

async fn control_tokens(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match parse_control_body::<Option<Vec<String>>>(body) {
        Ok(tokens) => {
            shared.set_valid_tokens(tokens);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn control_latency(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let text: String = match parse_control_body(body) {
        Ok(text) => text,
        Err(e) => return e.into_response(),
    };
    match humantime::parse_duration(&text) {
        Ok(latency) => {
            shared.set_latency(latency);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => MetaError::invalid(
            StatusCode::BAD_REQUEST,
            format!("Expected a duration such as \"250ms\": {e}."),
        )
        .into_response(),
    }
}

async fn control_async_failures(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match parse_control_body::<AsyncFailure>(body) {
        Ok(failure) => {
            shared.add_async_failure(failure);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `POST /_sandbox/inbound`: exactly one of `text`, `button`, `button_reply`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundRequest {
    from: String,
    /// `metadata.phone_number_id`; [`DEFAULT_INBOUND_PHONE_NUMBER_ID`] when absent.
    #[serde(default)]
    phone_number_id: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    button: Option<InboundButton>,
    #[serde(default)]
    button_reply: Option<InboundButtonReply>,
    /// The quoted message of a button reply; the newest send to `from` when absent.
    #[serde(default)]
    context_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundButton {
    payload: String,
    text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundButtonReply {
    id: String,
    title: String,
}

async fn control_inbound(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request: InboundRequest = match parse_control_body(body) {
        Ok(request) => request,
        Err(e) => return e.into_response(),
    };
    let body = match (request.text, request.button, request.button_reply) {
        (Some(text), None, None) => InboundBody::Text(text),
        (None, Some(b), None) => InboundBody::Button {
            payload: b.payload,
            text: b.text,
        },
        (None, None, Some(r)) => InboundBody::ButtonReply {
            id: r.id,
            title: r.title,
        },
        _ => {
            return MetaError::invalid(
                StatusCode::BAD_REQUEST,
                "Give exactly one of text, button, button_reply.".into(),
            )
            .into_response();
        }
    };
    let phone_number_id = request
        .phone_number_id
        .unwrap_or_else(|| DEFAULT_INBOUND_PHONE_NUMBER_ID.into());
    match shared
        .inbound(&phone_number_id, &request.from, body, request.context_id)
        .await
    {
        Ok(d) => Json(json!({
            "id": d.wamid,
            "http_status": d.http_status,
            "attempts": d.attempts,
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// `PUT /_sandbox/webhook` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookRequest {
    url: String,
    #[serde(default)]
    app_secret: Option<String>,
}

async fn control_webhook(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match parse_control_body::<Option<WebhookRequest>>(body) {
        Ok(Some(w)) => {
            shared.set_webhook(Some(w.url), w.app_secret);
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(None) => {
            shared.set_webhook(None, None);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn control_callbacks(State(shared): State<Arc<Shared>>) -> Response {
    let records = shared.callback_log().clone();
    Json(records).into_response()
}

/// Reads a control endpoint's JSON body; errors come back Meta-shaped like everything else.
fn parse_control_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, MetaError> {
    let body = body.map_err(|r| MetaError::invalid(r.status(), r.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| {
        MetaError::invalid(StatusCode::BAD_REQUEST, format!("Invalid JSON body: {e}."))
    })
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    unknown_path(StatusCode::NOT_FOUND, &method, &uri)
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    unknown_path(StatusCode::METHOD_NOT_ALLOWED, &method, &uri)
}

/// Graph answers unknown paths with code 2500 "Unknown path components".
fn unknown_path(status: StatusCode, method: &Method, uri: &Uri) -> Response {
    MetaError::new(
        status,
        2500,
        format!("Unknown path components: {}", uri.path()),
        format!("The sandbox has no endpoint {method} {}.", uri.path()),
    )
    .into_response()
}

/// The digits of a phone number, which is how Meta derives `wa_id` and how faults match.
fn digits(phone: &str) -> String {
    phone.chars().filter(char::is_ascii_digit).collect()
}

/// The legacy WhatsApp ID of a Brazilian mobile (no ninth digit) or a Mexican number (`521`),
/// None for any other number.
fn legacy_wa_id(d: &str) -> Option<String> {
    let b = d.as_bytes();
    match (b.len(), b.get(..2)) {
        (13, Some(b"55")) if b[4] == b'9' && (b'6'..=b'9').contains(&b[5]) => {
            Some(format!("{}{}", &d[..4], &d[5..]))
        }
        (12, Some(b"52")) if b[2] != b'1' => Some(format!("521{}", &d[2..])),
        _ => None,
    }
}

fn clamp_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Unix seconds as a string, as Meta writes `timestamp` in `messages` webhooks.
fn unix_secs_string() -> String {
    (unix_ms() / 1000).to_string()
}

/// A random id like Meta's `fbtrace_id` (e.g. "Az8or2yhqkZfEZ-_4Qn_Bam"), which clients log.
fn fbtrace_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    (0..23)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// Standard base64 with padding, as in Meta's wamids; too small a need for a dependency.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                // The index is six bits, always within the alphabet.
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const PATH: &str = "/v21.0/106540352242922/messages";

    /// A sandbox serving on a free loopback port, with a client pointed at it.
    struct Running {
        base: String,
        handle: SandboxHandle,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
        client: reqwest::Client,
    }

    fn quick() -> SandboxConfig {
        SandboxConfig {
            latency: Duration::ZERO,
            ..SandboxConfig::default()
        }
    }

    async fn start(config: SandboxConfig) -> Running {
        let sandbox = Sandbox::bind("127.0.0.1:0".parse().unwrap(), config)
            .await
            .unwrap();
        let base = format!("http://{}", sandbox.local_addr());
        let handle = sandbox.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sandbox.serve(shutdown.clone()));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        Running {
            base,
            handle,
            shutdown,
            task,
            client,
        }
    }

    impl Running {
        async fn request(
            &self,
            method: reqwest::Method,
            path: &str,
            token: Option<&str>,
            body: Vec<u8>,
        ) -> (u16, Bytes) {
            let mut req = self
                .client
                .request(method, format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .body(body);
            if let Some(token) = token {
                req = req.header("authorization", format!("Bearer {token}"));
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.bytes().await.unwrap())
        }

        async fn post_as(&self, token: Option<&str>, body: &Value) -> (u16, Value) {
            let body = serde_json::to_vec(body).unwrap();
            let (status, bytes) = self.request(reqwest::Method::POST, PATH, token, body).await;
            (status, serde_json::from_slice(&bytes).unwrap())
        }

        async fn send(&self, body: &Value) -> (u16, Value) {
            self.post_as(Some("tok"), body).await
        }

        async fn control(&self, method: reqwest::Method, path: &str, body: &Value) -> u16 {
            let body = serde_json::to_vec(body).unwrap();
            self.request(method, path, None, body).await.0
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.task.await.unwrap().unwrap();
        }
    }

    fn template(to: &str, callback: &str) -> Value {
        json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "type": "template",
            "biz_opaque_callback_data": callback,
            "template": {
                "name": "spring_sale",
                "language": { "code": "de" },
                "components": [{ "type": "body", "parameters": [{ "type": "text", "text": "x" }] }]
            }
        })
    }

    fn text(to: &str, body: &str) -> Value {
        json!({
            "messaging_product": "whatsapp",
            "to": to,
            "type": "text",
            "text": { "preview_url": false, "body": body }
        })
    }

    /// Checks the Meta error shape and returns (code, details).
    fn error_of(body: &Value) -> (i64, String) {
        let error = &body["error"];
        let keys: Vec<_> = error.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            ["code", "error_data", "fbtrace_id", "message", "type"],
            "{body}"
        );
        assert_eq!(error["type"], "OAuthException");
        assert_eq!(error["error_data"]["messaging_product"], "whatsapp");
        assert_eq!(error["fbtrace_id"].as_str().unwrap().len(), 23);
        let code = error["code"].as_i64().unwrap();
        let details = error["error_data"]["details"].as_str().unwrap().to_owned();
        (code, details)
    }

    #[test]
    fn the_double_opt_in_questions_are_valid_sends() {
        use crate::config::DoubleOptInMessage;
        use crate::consent::flow::question_body;
        for q in [
            DoubleOptInMessage::Interactive {
                text: "Newsletter?".into(),
                yes_title: "Ja".into(),
                no_title: "Nein".into(),
            },
            DoubleOptInMessage::Template {
                name: "optin_confirmation".into(),
                language: "de".into(),
            },
        ] {
            let body: Value = serde_json::from_slice(&question_body("+491701234567", &q)).unwrap();
            assert!(
                validate(&body).is_ok(),
                "{q:?}: {:?}",
                validate(&body).err()
            );
        }
        let mut too_long: Value = serde_json::from_slice(&question_body(
            "+491701234567",
            &DoubleOptInMessage::Interactive {
                text: "x".into(),
                yes_title: "Ja".into(),
                no_title: "Nein".into(),
            },
        ))
        .unwrap();
        too_long["interactive"]["action"]["buttons"][0]["reply"]["title"] =
            "a title longer than twenty".into();
        assert!(validate(&too_long).is_err());
    }
    #[tokio::test]
    async fn legacy_wa_ids_answer_brazilian_mobiles_and_mexican_numbers_as_meta_does() {
        let sb = start(SandboxConfig {
            legacy_wa_ids: true,
            ..quick()
        })
        .await;
        for (to, id) in [
            ("+5511987654321", "551187654321"),
            ("+525512345678", "5215512345678"),
            // A Brazilian landline, and any other country, keep their digits.
            ("+551133334444", "551133334444"),
            ("+491701234567", "491701234567"),
        ] {
            let (status, body) = sb.send(&template(to, "j")).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["contacts"][0]["wa_id"], id, "{to}");
            assert_eq!(body["contacts"][0]["input"], to);
        }
        sb.stop().await;
        // Off (the default): the number's digits.
        let sb = start(quick()).await;
        let (_, body) = sb.send(&template("+5511987654321", "j")).await;
        assert_eq!(body["contacts"][0]["wa_id"], "5511987654321");
        sb.stop().await;
    }

    #[tokio::test]
    async fn template_is_accepted_with_metas_shape() {
        let sb = start(quick()).await;
        let (status, body) = sb.send(&template("+49 170 1234567", "job-1")).await;
        assert_eq!(status, 200, "{body}");
        let wamid = body["messages"][0]["id"].as_str().unwrap().to_owned();
        assert!(wamid.starts_with("wamid.") && wamid.len() > 20, "{wamid}");
        assert_eq!(
            body,
            json!({
                "messaging_product": "whatsapp",
                "contacts": [{ "input": "+49 170 1234567", "wa_id": "491701234567" }],
                "messages": [{ "id": wamid, "message_status": "accepted" }]
            })
        );
        let records = sb.handle.requests();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert!(r.at_ms > 1_700_000_000_000);
        assert_eq!(
            r,
            &SandboxRecord {
                at_ms: r.at_ms,
                phone_number_id: "106540352242922".into(),
                to: "+49 170 1234567".into(),
                kind: "template".into(),
                callback_data: Some("job-1".into()),
                status: 200,
                error_code: None,
                wamid: Some(wamid),
                text: None,
            }
        );
        sb.stop().await;
    }

    #[tokio::test]
    async fn text_is_accepted_without_message_status() {
        let sb = start(quick()).await;
        let (status, body) = sb.send(&text("16505551234", "hello")).await;
        assert_eq!(status, 200, "{body}");
        let wamid = body["messages"][0]["id"].as_str().unwrap();
        assert_eq!(
            body,
            json!({
                "messaging_product": "whatsapp",
                "contacts": [{ "input": "16505551234", "wa_id": "16505551234" }],
                "messages": [{ "id": wamid }]
            })
        );
        assert_eq!(sb.handle.accepted()[0].kind, "text");
        // The unversioned path works as well, and every wamid is fresh.
        let body = serde_json::to_vec(&text("16505551234", "again")).unwrap();
        let (status, bytes) = sb
            .request(
                reqwest::Method::POST,
                "/106540352242922/messages",
                Some("t"),
                body,
            )
            .await;
        assert_eq!(status, 200);
        let again: Value = serde_json::from_slice(&bytes).unwrap();
        assert_ne!(again["messages"][0]["id"].as_str().unwrap(), wamid);
        sb.stop().await;
    }

    #[tokio::test]
    async fn invalid_bodies_get_400_code_100_with_details() {
        let sb = start(quick()).await;
        let mut no_product = text("491701234567", "hi");
        no_product
            .as_object_mut()
            .unwrap()
            .remove("messaging_product");
        let mut no_language = template("491701234567", "x");
        no_language["template"]
            .as_object_mut()
            .unwrap()
            .remove("language");
        let mut image = text("491701234567", "hi");
        image["type"] = json!("image");
        let cases = [
            (no_product, "messaging_product"),
            (text("491701234567", ""), "text.body"),
            (text("491701234567", &"x".repeat(4097)), "4096"),
            (text("not a number", "hi"), "phone number"),
            (
                json!({ "messaging_product": "whatsapp", "type": "text" }),
                "to",
            ),
            (no_language, "template.language"),
            (image, "\"image\""),
            (json!([1, 2]), "JSON object"),
        ];
        for (body, needle) in cases {
            let (status, answer) = sb.send(&body).await;
            assert_eq!(status, 400, "{body}");
            let (code, details) = error_of(&answer);
            assert_eq!(code, 100);
            assert_eq!(answer["error"]["message"], "(#100) Invalid parameter");
            assert!(details.contains(needle), "{details:?} lacks {needle:?}");
        }
        // Not JSON at all.
        let (status, bytes) = sb
            .request(reqwest::Method::POST, PATH, Some("t"), b"{oops".to_vec())
            .await;
        assert_eq!(status, 400);
        let (code, details) = error_of(&serde_json::from_slice(&bytes).unwrap());
        assert_eq!(code, 100);
        assert!(details.contains("not valid JSON"), "{details}");
        // 4096 characters, multi-byte, is still fine.
        let (status, _) = sb.send(&text("491701234567", &"ä".repeat(4096))).await;
        assert_eq!(status, 200);
        let log = sb.handle.requests();
        assert_eq!(log.len(), 10);
        assert!(
            log[..9]
                .iter()
                .all(|r| r.error_code == Some(100) && r.wamid.is_none())
        );
        assert_eq!(log[6].kind, "image");
        sb.stop().await;
    }

    #[tokio::test]
    async fn tokens_are_checked_first() {
        let sb = start(SandboxConfig {
            valid_tokens: Some(vec!["good".into()]),
            ..quick()
        })
        .await;
        // An invalid body with a bad token is still a token error: the token comes first.
        for (token, body) in [
            (Some("bad"), template("491701234567", "a")),
            (None, template("491701234567", "a")),
            (Some("  "), json!({})),
        ] {
            let (status, answer) = sb.post_as(token, &body).await;
            assert_eq!(status, 401, "{token:?}");
            assert_eq!(error_of(&answer).0, 190);
        }
        let (_, answer) = sb.post_as(Some("bad"), &template("1", "a")).await;
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("Error validating access token: Session has expired"));
        assert_eq!(sb.post_as(Some("good"), &template("1", "a")).await.0, 200);

        sb.handle.set_valid_tokens(None);
        assert_eq!(
            sb.post_as(Some("anything"), &template("1", "a")).await.0,
            200
        );
        assert_eq!(sb.post_as(None, &template("1", "a")).await.0, 401);
        sb.handle.set_valid_tokens(Some(vec![]));
        assert_eq!(sb.post_as(Some("good"), &template("1", "a")).await.0, 401);
        assert_eq!(sb.handle.accepted_count_for("a"), 2);
        sb.stop().await;
    }

    #[tokio::test]
    async fn scripted_fault_fires_exactly_times_then_succeeds() {
        let sb = start(quick()).await;
        sb.handle.add_fault(Fault {
            to: Some("+49 170 1234567".into()),
            http_status: 400,
            code: 131_056,
            message: "Pair rate limit hit".into(),
            times: 2,
        });
        // Another recipient is unaffected and does not use the fault up.
        assert_eq!(sb.send(&template("4915112345678", "other")).await.0, 200);
        for _ in 0..2 {
            let (status, answer) = sb.send(&template("491701234567", "job")).await;
            assert_eq!(status, 400);
            let (code, details) = error_of(&answer);
            assert_eq!(code, 131_056);
            assert_eq!(answer["error"]["message"], "(#131056) Pair rate limit hit");
            assert!(details.starts_with("Too many messages"), "{details}");
        }
        assert_eq!(sb.send(&template("491701234567", "job")).await.0, 200);
        assert_eq!(sb.handle.accepted_count_for("job"), 1);

        // A fault for any recipient, with a status outside the error range: answered as 500.
        sb.handle.add_fault(Fault {
            to: None,
            http_status: 200,
            code: 1,
            message: "(#1) An unknown error occurred".into(),
            times: 1,
        });
        let (status, answer) = sb.send(&text("1", "x")).await;
        assert_eq!(status, 500);
        assert_eq!(answer["error"]["message"], "(#1) An unknown error occurred");
        assert_eq!(sb.send(&text("1", "x")).await.0, 200);
        sb.stop().await;
    }

    #[tokio::test]
    async fn random_faults_have_metas_codes() {
        let cases = [
            (
                SandboxConfig {
                    rate_throttle: 1.0,
                    ..quick()
                },
                400,
                130_429,
                "(#130429) Rate limit hit",
                "Cloud API message throughput has been reached.",
            ),
            (
                SandboxConfig {
                    rate_server_error: 1.0,
                    ..quick()
                },
                503,
                2,
                "(#2) Service temporarily unavailable",
                "Temporary due to downtime or due to being overloaded.",
            ),
            (
                SandboxConfig {
                    // Out of range and NaN are clamped rather than panicking in the RNG.
                    rate_server_error: f64::NAN,
                    rate_throttle: -3.0,
                    rate_undeliverable: 7.0,
                    ..quick()
                },
                400,
                131_026,
                "(#131026) Message undeliverable",
                known_details(131_026).unwrap(),
            ),
        ];
        for (config, http, code, message, details) in cases {
            let sb = start(config).await;
            for _ in 0..3 {
                let (status, answer) = sb.send(&template("491701234567", "cb")).await;
                assert_eq!(status, http);
                assert_eq!(error_of(&answer), (code, details.to_owned()));
                assert_eq!(answer["error"]["message"], message);
            }
            assert!(sb.handle.accepted().is_empty());
            assert_eq!(sb.handle.accepted_count_for("cb"), 0);
            assert!(
                sb.handle
                    .requests()
                    .iter()
                    .all(|r| r.error_code == Some(code))
            );
            sb.stop().await;
        }
    }

    #[tokio::test]
    async fn accepted_count_for_counts_only_200s_per_callback() {
        let sb = start(quick()).await;
        for cb in ["a", "a", "b"] {
            assert_eq!(sb.send(&template("491701234567", cb)).await.0, 200);
        }
        sb.handle.add_fault(Fault {
            to: None,
            http_status: 400,
            code: 130_429,
            message: "Rate limit hit".into(),
            times: 1,
        });
        assert_eq!(sb.send(&template("491701234567", "a")).await.0, 400);
        assert_eq!(sb.handle.accepted_count_for("a"), 2);
        assert_eq!(sb.handle.accepted_count_for("b"), 1);
        assert_eq!(sb.handle.accepted_count_for("c"), 0);
        assert_eq!(sb.handle.requests().len(), 4);
        assert_eq!(sb.handle.accepted().len(), 3);
        sb.stop().await;
    }

    #[tokio::test]
    async fn latency_is_honoured() {
        let latency = Duration::from_millis(150);
        let sb = start(SandboxConfig {
            latency,
            latency_jitter: Duration::from_millis(20),
            ..quick()
        })
        .await;
        let t0 = Instant::now();
        assert_eq!(sb.send(&text("1", "x")).await.0, 200);
        assert!(t0.elapsed() >= latency, "{:?}", t0.elapsed());
        // Errors wait too: a 401 is not a shortcut.
        let t0 = Instant::now();
        assert_eq!(sb.post_as(None, &text("1", "x")).await.0, 401);
        assert!(t0.elapsed() >= latency);

        sb.handle.set_latency(Duration::from_millis(300));
        let t0 = Instant::now();
        assert_eq!(sb.send(&text("1", "x")).await.0, 200);
        assert!(t0.elapsed() >= Duration::from_millis(300));
        sb.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_requests_sleep_concurrently() {
        // 300 keeps client + server sockets (2 per request) under a 1024 open-file limit.
        const N: usize = 300;
        let latency = Duration::from_millis(300);
        let sb = Arc::new(start(SandboxConfig { latency, ..quick() }).await);
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let sb = Arc::clone(&sb);
                tokio::spawn(async move {
                    let (status, body) = sb.send(&template("491701234567", &format!("j{i}"))).await;
                    assert_eq!(status, 200);
                    body["messages"][0]["id"].as_str().unwrap().to_owned()
                })
            })
            .collect();
        let mut wamids = HashSet::new();
        for task in tasks {
            wamids.insert(task.await.unwrap());
        }
        // Serially this would take N × 300 ms = 90 s; concurrently about one latency.
        assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
        assert_eq!(wamids.len(), N);
        assert_eq!(sb.handle.accepted().len(), N);
        assert_eq!(sb.handle.accepted_count_for("j7"), 1);
    }

    #[tokio::test]
    async fn control_endpoints_work() {
        let sb = start(quick()).await;
        let (status, bytes) = sb
            .request(reqwest::Method::GET, "/healthz", None, vec![])
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            serde_json::from_slice::<Value>(&bytes).unwrap(),
            json!({ "status": "ok" })
        );

        let fault = json!({ "to": "491701234567", "http_status": 400, "code": 131_026,
                            "message": "Message undeliverable", "times": 1 });
        assert_eq!(
            sb.control(reqwest::Method::POST, "/_sandbox/faults", &fault)
                .await,
            204
        );
        assert_eq!(sb.send(&template("491701234567", "f")).await.0, 400);
        assert_eq!(sb.send(&template("491701234567", "f")).await.0, 200);
        let bad_fault =
            json!({ "to": null, "http_status": 200, "code": 1, "message": "x", "times": 1 });
        assert_eq!(
            sb.control(reqwest::Method::POST, "/_sandbox/faults", &bad_fault)
                .await,
            400
        );
        assert_eq!(
            sb.control(reqwest::Method::POST, "/_sandbox/faults", &json!({}))
                .await,
            400
        );

        assert_eq!(
            sb.control(reqwest::Method::PUT, "/_sandbox/tokens", &json!(["k"]))
                .await,
            204
        );
        assert_eq!(sb.post_as(Some("tok"), &text("1", "x")).await.0, 401);
        assert_eq!(sb.post_as(Some("k"), &text("1", "x")).await.0, 200);
        assert_eq!(
            sb.control(reqwest::Method::PUT, "/_sandbox/tokens", &Value::Null)
                .await,
            204
        );
        assert_eq!(sb.post_as(Some("tok"), &text("1", "x")).await.0, 200);

        assert_eq!(
            sb.control(reqwest::Method::PUT, "/_sandbox/latency", &json!("120ms"))
                .await,
            204
        );
        let t0 = Instant::now();
        assert_eq!(sb.send(&text("1", "x")).await.0, 200);
        assert!(t0.elapsed() >= Duration::from_millis(120));
        assert_eq!(
            sb.control(reqwest::Method::PUT, "/_sandbox/latency", &json!("soon"))
                .await,
            400
        );

        let (status, bytes) = sb
            .request(reqwest::Method::GET, "/_sandbox/requests", None, vec![])
            .await;
        assert_eq!(status, 200);
        let records: Vec<SandboxRecord> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(records, sb.handle.requests());
        let codes: Vec<_> = records.iter().map(|r| (r.status, r.error_code)).collect();
        assert_eq!(
            codes,
            [
                (400, Some(131_026)),
                (200, None),
                (401, Some(190)),
                (200, None),
                (200, None),
                (200, None)
            ]
        );
        sb.stop().await;
    }

    #[tokio::test]
    async fn unknown_paths_and_oversized_bodies_get_json_errors() {
        let sb = start(quick()).await;
        let (status, bytes) = sb
            .request(reqwest::Method::GET, "/nope", None, vec![])
            .await;
        assert_eq!(status, 404);
        assert_eq!(error_of(&serde_json::from_slice(&bytes).unwrap()).0, 2500);
        let (status, bytes) = sb.request(reqwest::Method::GET, PATH, None, vec![]).await;
        assert_eq!(status, 405);
        assert_eq!(error_of(&serde_json::from_slice(&bytes).unwrap()).0, 2500);

        let huge = vec![b' '; BODY_LIMIT + 1];
        let (status, bytes) = sb
            .request(reqwest::Method::POST, PATH, Some("t"), huge)
            .await;
        assert_eq!(status, 413);
        assert_eq!(error_of(&serde_json::from_slice(&bytes).unwrap()).0, 100);
        let (status, _) = sb
            .request(
                reqwest::Method::POST,
                "/_sandbox/faults",
                None,
                vec![b' '; BODY_LIMIT + 1],
            )
            .await;
        assert_eq!(status, 413);
        // Percent-escapes that are not UTF-8 in the path are a 400, not a panic.
        let (status, bytes) = sb
            .request(
                reqwest::Method::POST,
                "/v1/%FF%FE/messages",
                Some("t"),
                vec![],
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(error_of(&serde_json::from_slice(&bytes).unwrap()).0, 100);
        let log = sb.handle.requests();
        assert_eq!(log.len(), 2);
        assert_eq!(log[0].status, 413);
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

    #[test]
    fn args_parse_with_defaults_and_overrides() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: SandboxArgs,
        }
        use clap::Parser;
        let defaults = Cli::try_parse_from(["sandbox"]).unwrap().args;
        assert_eq!(defaults.listen, "127.0.0.1:8089".parse().unwrap());
        let config = defaults.config();
        assert_eq!(config.latency, Duration::from_millis(100));
        assert_eq!(config.latency_jitter, Duration::ZERO);
        assert_eq!(config.valid_tokens, None);

        let args = Cli::try_parse_from([
            "sandbox",
            "--listen",
            "[::1]:0",
            "--latency",
            "2s",
            "--latency-jitter",
            "50ms",
            "--rate-5xx",
            "0.1",
            "--rate-throttle",
            "0.2",
            "--rate-undeliverable",
            "1",
            "--token",
            "a",
            "--token",
            "b",
        ])
        .unwrap()
        .args;
        let config = args.config();
        assert_eq!(args.listen, "[::1]:0".parse().unwrap());
        assert_eq!(config.latency, Duration::from_secs(2));
        assert_eq!(config.latency_jitter, Duration::from_millis(50));
        assert_eq!(
            (
                config.rate_server_error,
                config.rate_throttle,
                config.rate_undeliverable
            ),
            (0.1, 0.2, 1.0)
        );
        assert_eq!(config.valid_tokens, Some(vec!["a".into(), "b".into()]));

        assert!(Cli::try_parse_from(["sandbox", "--rate-throttle", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["sandbox", "--latency", "fast"]).is_err());
    }

    const SECRET: &str = "sandbox-test-secret";

    /// What a receiver got: each callback's signature header and raw body, in arrival order.
    type Received = Arc<Mutex<Vec<(Option<String>, Bytes)>>>;

    /// A webhook receiver on a free loopback port: keeps every callback and answers the
    /// scripted statuses first, then 200.
    struct Receiver {
        url: String,
        got: Received,
    }

    async fn receiver(script: Vec<u16>) -> Receiver {
        let got: Received = Arc::default();
        let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
        let sink = Arc::clone(&got);
        let app = Router::new().route(
            "/webhook",
            post(move |headers: HeaderMap, body: Bytes| {
                let sink = Arc::clone(&sink);
                let script = Arc::clone(&script);
                async move {
                    let signature = headers
                        .get("x-hub-signature-256")
                        .map(|v| v.to_str().unwrap().to_owned());
                    sink.lock().unwrap().push((signature, body));
                    let code = script.lock().unwrap().pop_front().unwrap_or(200);
                    StatusCode::from_u16(code).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/webhook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, got }
    }

    impl Receiver {
        fn count(&self) -> usize {
            self.got.lock().unwrap().len()
        }

        /// Every body so far, after checking its signature against SECRET.
        fn signed(&self) -> Vec<Value> {
            let got = self.got.lock().unwrap();
            got.iter()
                .map(|(signature, body)| {
                    assert_signed(signature.as_deref(), body);
                    serde_json::from_slice(body).unwrap()
                })
                .collect()
        }
    }

    /// Checks `sha256=<lowercase hex HMAC-SHA256(SECRET, body)>`, computed here independently.
    fn assert_signed(signature: Option<&str>, body: &[u8]) {
        let hex_sig = signature
            .expect("signed")
            .strip_prefix("sha256=")
            .expect("sha256= prefix");
        assert_eq!(hex_sig.len(), 64);
        assert_eq!(hex_sig, hex_sig.to_ascii_lowercase());
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(body);
        mac.verify_slice(&hex::decode(hex_sig).unwrap())
            .expect("signature matches the body");
    }

    /// Polls `check` until it yields, failing at a deadline instead of sleeping a guess.
    async fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = check() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn webhooked(url: &str) -> SandboxConfig {
        SandboxConfig {
            webhook_url: Some(url.into()),
            app_secret: Some(SECRET.into()),
            status_delay: Duration::from_millis(5),
            ..quick()
        }
    }

    /// The one status of a status callback.
    fn status_of(body: &Value) -> &Value {
        &body["entry"][0]["changes"][0]["value"]["statuses"][0]
    }

    fn runs_done(sb: &Running) -> u64 {
        sb.handle.shared.status_runs_done.load(Ordering::Relaxed)
    }

    async fn wamid_of_send(sb: &Running, body: &Value) -> String {
        let (status, answer) = sb.send(body).await;
        assert_eq!(status, 200, "{answer}");
        answer["messages"][0]["id"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn accepted_sends_come_back_sent_delivered_read_signed_with_pricing() {
        let rx = receiver(vec![]).await;
        let sb = start(SandboxConfig {
            template_categories: HashMap::from([("order_update".into(), "utility".into())]),
            ..webhooked(&rx.url)
        })
        .await;
        let before = unix_ms() / 1000;
        let wamid = wamid_of_send(&sb, &template("+49 170 1234567", "job-1")).await;
        wait_until("three callbacks", || (rx.count() >= 3).then_some(())).await;
        let bodies = rx.signed();
        assert_eq!(bodies.len(), 3);
        let ts = status_of(&bodies[0])["timestamp"].as_str().unwrap();
        let secs: u64 = ts.parse().unwrap();
        assert!(secs >= before && secs <= unix_ms() / 1000, "{ts}");
        let marketing = json!({
            "billable": true, "pricing_model": "PMP", "type": "regular", "category": "marketing"
        });
        // Exactly Meta's envelope; v24.0+ shape, so no `conversation`.
        assert_eq!(
            bodies[0],
            json!({
                "object": "whatsapp_business_account",
                "entry": [{
                    "id": "102290129340398",
                    "changes": [{
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": "106540352242922"
                            },
                            "statuses": [{
                                "id": wamid,
                                "status": "sent",
                                "timestamp": ts,
                                "recipient_id": "491701234567",
                                "biz_opaque_callback_data": "job-1",
                                "pricing": marketing
                            }]
                        },
                        "field": "messages"
                    }]
                }]
            })
        );
        let statuses: Vec<_> = bodies
            .iter()
            .map(|b| status_of(b)["status"].clone())
            .collect();
        assert_eq!(statuses, ["sent", "delivered", "read"]);
        assert_eq!(status_of(&bodies[1])["pricing"], marketing);
        assert!(status_of(&bodies[2]).get("pricing").is_none());
        for b in &bodies {
            let s = status_of(b);
            assert_eq!(s["id"], wamid);
            assert_eq!(s["biz_opaque_callback_data"], "job-1");
            assert!(s.get("conversation").is_none());
            assert!(s["timestamp"].is_string());
        }
        let records = wait_until("three callback records", || {
            let r = sb.handle.callbacks();
            (r.len() == 3).then_some(r)
        })
        .await;
        for (r, status) in records.iter().zip(["sent", "delivered", "read"]) {
            assert_eq!(r.kind, CallbackKind::Status);
            assert_eq!(r.status.as_deref(), Some(status));
            assert_eq!(r.wamid.as_deref(), Some(wamid.as_str()));
            assert_eq!((r.http_status, r.attempts), (Some(200), 1));
        }

        // A configured template category, and free-form text (free service, no callback data).
        let mut utility = template("491701234567", "job-2");
        utility["template"]["name"] = json!("order_update");
        let utility_wamid = wamid_of_send(&sb, &utility).await;
        let text_wamid = wamid_of_send(&sb, &text("491701234567", "hi")).await;
        wait_until("nine callbacks", || (rx.count() >= 9).then_some(())).await;
        let bodies = rx.signed();
        let sent_of = |w: &str| {
            bodies
                .iter()
                .map(status_of)
                .find(|s| s["id"] == w && s["status"] == "sent")
                .unwrap()
                .clone()
        };
        assert_eq!(sent_of(&utility_wamid)["pricing"]["category"], "utility");
        let text_sent = sent_of(&text_wamid);
        assert_eq!(
            text_sent["pricing"],
            json!({
                "billable": false, "pricing_model": "PMP",
                "type": "free_customer_service", "category": "service"
            })
        );
        assert!(text_sent.get("biz_opaque_callback_data").is_none());
        // Per message the order holds even with sends interleaved.
        for w in [&utility_wamid, &text_wamid] {
            let order: Vec<_> = bodies
                .iter()
                .map(status_of)
                .filter(|s| s["id"] == **w)
                .map(|s| s["status"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(order, ["sent", "delivered", "read"]);
        }
        sb.stop().await;
    }

    #[tokio::test]
    async fn read_rate_zero_stops_at_delivered_and_refused_sends_get_no_callbacks() {
        let rx = receiver(vec![]).await;
        let sb = start(SandboxConfig {
            read_rate: 0.0,
            valid_tokens: Some(vec!["tok".into()]),
            ..webhooked(&rx.url)
        })
        .await;
        assert_eq!(sb.post_as(Some("bad"), &text("1", "x")).await.0, 401);
        assert_eq!(sb.send(&text("", "x")).await.0, 400);
        let wamid = wamid_of_send(&sb, &template("491701234567", "j")).await;
        wait_until("the callback task to end", || {
            (runs_done(&sb) == 1).then_some(())
        })
        .await;
        let statuses: Vec<_> = rx
            .signed()
            .iter()
            .map(|b| (status_of(b)["id"].clone(), status_of(b)["status"].clone()))
            .collect();
        assert_eq!(
            statuses,
            [
                (json!(wamid), json!("sent")),
                (json!(wamid), json!("delivered"))
            ]
        );
        sb.stop().await;
    }

    #[tokio::test]
    async fn async_failure_is_accepted_then_sent_and_failed_with_the_code() {
        let rx = receiver(vec![]).await;
        let sb = start(SandboxConfig {
            read_rate: 0.0,
            ..webhooked(&rx.url)
        })
        .await;
        sb.handle.add_async_failure(AsyncFailure {
            to: Some("+49 170 1234567".into()),
            code: 131_049,
            title: "This message was not delivered to maintain healthy ecosystem engagement."
                .into(),
            times: 1,
        });
        let other = wamid_of_send(&sb, &template("4915112345678", "other")).await;
        let failed = wamid_of_send(&sb, &template("491701234567", "job-1")).await;
        let fine = wamid_of_send(&sb, &template("491701234567", "job-1b")).await;
        wait_until("three callback tasks", || {
            (runs_done(&sb) == 3).then_some(())
        })
        .await;
        let bodies = rx.signed();
        let of = |w: &str| -> Vec<Value> {
            bodies
                .iter()
                .map(status_of)
                .filter(|s| s["id"] == w)
                .cloned()
                .collect()
        };
        let names = |v: &[Value]| -> Vec<String> {
            v.iter()
                .map(|s| s["status"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(names(&of(&other)), ["sent", "delivered"]);
        assert_eq!(
            names(&of(&fine)),
            ["sent", "delivered"],
            "used up after one"
        );
        let f = of(&failed);
        assert_eq!(names(&f), ["sent", "failed"]);
        assert!(f[0].get("pricing").is_some());
        assert!(f[1].get("pricing").is_none());
        assert_eq!(f[1]["biz_opaque_callback_data"], "job-1");
        assert_eq!(
            f[1]["errors"],
            json!([{
                "code": 131_049,
                "title": "This message was not delivered to maintain healthy ecosystem engagement.",
                "message": "This message was not delivered to maintain healthy ecosystem engagement.",
                "error_data": { "details": known_details(131_049).unwrap() },
                "href": "/documentation/business-messaging/whatsapp/support/error-codes"
            }])
        );

        // The same over HTTP, for any recipient; a malformed rule is refused.
        let rule = json!({ "to": null, "code": 131_050, "title": "Unable to deliver", "times": 1 });
        assert_eq!(
            sb.control(reqwest::Method::POST, "/_sandbox/async_failures", &rule)
                .await,
            204
        );
        assert_eq!(
            sb.control(
                reqwest::Method::POST,
                "/_sandbox/async_failures",
                &json!({})
            )
            .await,
            400
        );
        let w = wamid_of_send(&sb, &text("16505551234", "x")).await;
        wait_until("the failed status", || {
            rx.signed()
                .iter()
                .map(status_of)
                .find(|s| s["id"] == w.as_str() && s["status"] == "failed")
                .map(|s| assert_eq!(s["errors"][0]["code"], 131_050))
        })
        .await;
        sb.stop().await;
    }

    #[tokio::test]
    async fn inbound_messages_arrive_signed_in_metas_shapes() {
        let rx = receiver(vec![]).await;
        let sb = start(SandboxConfig {
            read_rate: 0.0,
            ..webhooked(&rx.url)
        })
        .await;
        let status = sb
            .handle
            .send_inbound("+49 170 1234567", InboundBody::Text("STOP".into()))
            .await;
        assert_eq!(status, Some(200));
        let body = rx.signed().pop().unwrap();
        let message = body["entry"][0]["changes"][0]["value"]["messages"][0].clone();
        let id = message["id"].as_str().unwrap();
        assert!(id.starts_with("wamid."), "{id}");
        let ts = message["timestamp"].as_str().unwrap();
        assert!(ts.parse::<u64>().unwrap() > 1_700_000_000);
        assert_eq!(
            body,
            json!({
                "object": "whatsapp_business_account",
                "entry": [{
                    "id": "102290129340398",
                    "changes": [{
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": "106540352242922"
                            },
                            "contacts": [{
                                "profile": { "name": "Sandbox User" },
                                "wa_id": "491701234567"
                            }],
                            "messages": [{
                                "from": "491701234567",
                                "id": id,
                                "timestamp": ts,
                                "type": "text",
                                "text": { "body": "STOP" }
                            }]
                        },
                        "field": "messages"
                    }]
                }]
            })
        );
        let records = sb.handle.callbacks();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].kind, CallbackKind::Inbound);
        assert_eq!(records[0].status, None);
        assert_eq!(records[0].wamid.as_deref(), Some(id));

        // A template quick-reply button quotes the newest send to that customer.
        let wamid = wamid_of_send(&sb, &template("491701234567", "job-1")).await;
        wait_until("the send's callbacks", || {
            (runs_done(&sb) == 1).then_some(())
        })
        .await;
        let status = sb
            .handle
            .send_inbound(
                "491701234567",
                InboundBody::Button {
                    payload: "YES".into(),
                    text: "Yes".into(),
                },
            )
            .await;
        assert_eq!(status, Some(200));
        let body = rx.signed().pop().unwrap();
        let message = &body["entry"][0]["changes"][0]["value"]["messages"][0];
        assert_eq!(message["type"], "button");
        assert_eq!(
            message["button"],
            json!({ "payload": "YES", "text": "Yes" })
        );
        assert_eq!(
            message["context"],
            json!({ "from": "15550783881", "id": wamid })
        );

        // Over HTTP: an interactive reply-button answer, for another phone number id.
        let request = json!({
            "from": "+491701234567",
            "button_reply": { "id": "yes", "title": "Yes" },
            "phone_number_id": "999",
            "context_id": "wamid.quoted"
        });
        let (code, bytes) = sb
            .request(
                reqwest::Method::POST,
                "/_sandbox/inbound",
                None,
                serde_json::to_vec(&request).unwrap(),
            )
            .await;
        assert_eq!(code, 200);
        let answer: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(answer["http_status"], 200);
        assert_eq!(answer["attempts"], 1);
        let body = rx.signed().pop().unwrap();
        let value = &body["entry"][0]["changes"][0]["value"];
        assert_eq!(value["metadata"]["phone_number_id"], "999");
        let message = &value["messages"][0];
        assert_eq!(message["id"], answer["id"]);
        assert_eq!(message["type"], "interactive");
        assert_eq!(
            message["interactive"],
            json!({ "type": "button_reply", "button_reply": { "id": "yes", "title": "Yes" } })
        );
        assert_eq!(message["context"]["id"], "wamid.quoted");

        // Bad requests are refused without a callback.
        let n = rx.count();
        for bad in [
            json!({ "from": "+491701234567", "text": "a", "button": { "payload": "p", "text": "t" } }),
            json!({ "from": "+491701234567" }),
            json!({ "from": "nobody", "text": "hi" }),
            json!({ "from": "491701234567", "text": "" }),
            json!({ "from": "491701234567", "txt": "typo" }),
        ] {
            let body = serde_json::to_vec(&bad).unwrap();
            let (code, bytes) = sb
                .request(reqwest::Method::POST, "/_sandbox/inbound", None, body)
                .await;
            assert_eq!(code, 400, "{bad}");
            assert_eq!(error_of(&serde_json::from_slice(&bytes).unwrap()).0, 100);
        }
        assert_eq!(rx.count(), n);
        sb.stop().await;
    }

    #[tokio::test]
    async fn callbacks_are_retried_with_backoff_until_a_200() {
        let rx = receiver(vec![500, 500]).await;
        let sb = start(SandboxConfig {
            read_rate: 0.0,
            ..webhooked(&rx.url)
        })
        .await;
        let t0 = Instant::now();
        let wamid = wamid_of_send(&sb, &text("491701234567", "x")).await;
        wait_until("the callback task to end", || {
            (runs_done(&sb) == 1).then_some(())
        })
        .await;
        // Backoff 100 ms then 200 ms before the third try.
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
        let records = sb.handle.callbacks();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].status.as_deref(), Some("sent"));
        assert_eq!(
            (records[0].http_status, records[0].attempts),
            (Some(200), 3)
        );
        assert_eq!(
            (records[1].http_status, records[1].attempts),
            (Some(200), 1)
        );
        // Three tries of the same bytes, then delivered.
        let got = rx.got.lock().unwrap().clone();
        assert_eq!(got.len(), 4);
        assert!(got[..3].iter().all(|g| *g == got[0]));
        let bodies = rx.signed();
        assert_eq!(status_of(&bodies[0])["id"], wamid.as_str());
        assert_eq!(status_of(&bodies[3])["status"], "delivered");

        // Over HTTP the callback log is the same.
        let (code, bytes) = sb
            .request(reqwest::Method::GET, "/_sandbox/callbacks", None, vec![])
            .await;
        assert_eq!(code, 200);
        let listed: Vec<CallbackRecord> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(listed, records);
        sb.stop().await;
    }

    #[tokio::test]
    async fn webhook_can_be_set_later_unsigned_and_never_delays_the_answer() {
        let sb = start(SandboxConfig {
            read_rate: 0.0,
            status_delay: Duration::from_millis(5),
            ..quick()
        })
        .await;
        // No webhook: accepted sends get no callback task; inbound has nowhere to go.
        wamid_of_send(&sb, &text("1", "x")).await;
        assert_eq!(
            sb.handle
                .send_inbound("1", InboundBody::Text("hi".into()))
                .await,
            None
        );
        let body = serde_json::to_vec(&json!({ "from": "1", "text": "hi" })).unwrap();
        let (code, _) = sb
            .request(reqwest::Method::POST, "/_sandbox/inbound", None, body)
            .await;
        assert_eq!(code, 409);

        // Unsigned when no secret is given.
        let rx = receiver(vec![]).await;
        sb.handle.set_webhook(Some(rx.url.clone()), None);
        let wamid = wamid_of_send(&sb, &text("1", "y")).await;
        wait_until("the callback task to end", || {
            (runs_done(&sb) == 1).then_some(())
        })
        .await;
        let got = rx.got.lock().unwrap().clone();
        assert_eq!(got.len(), 2, "only the send made after set_webhook");
        assert!(got.iter().all(|(signature, _)| signature.is_none()));
        let first: Value = serde_json::from_slice(&got[0].1).unwrap();
        assert_eq!(status_of(&first)["id"], wamid.as_str());

        // Over HTTP, with a secret; then off again.
        let set = json!({ "url": rx.url, "app_secret": SECRET });
        assert_eq!(
            sb.control(reqwest::Method::PUT, "/_sandbox/webhook", &set)
                .await,
            204
        );
        assert_eq!(
            sb.handle
                .send_inbound("1", InboundBody::Text("hi".into()))
                .await,
            Some(200)
        );
        let got = rx.got.lock().unwrap().clone();
        assert_eq!(got.len(), 3);
        assert_signed(got[2].0.as_deref(), &got[2].1);
        assert_eq!(
            sb.control(reqwest::Method::PUT, "/_sandbox/webhook", &Value::Null)
                .await,
            204
        );
        assert_eq!(
            sb.handle
                .send_inbound("1", InboundBody::Text("hi".into()))
                .await,
            None
        );

        // A dead receiver (retrying for ~50 s) does not hold up the send's answer.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_url = format!("http://{}/webhook", dead.local_addr().unwrap());
        drop(dead);
        sb.handle.set_webhook(Some(dead_url), Some(SECRET.into()));
        let t0 = Instant::now();
        wamid_of_send(&sb, &text("1", "z")).await;
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        sb.stop().await;
    }

    #[test]
    fn webhook_args_read_the_secret_file_and_debug_hides_it() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: SandboxArgs,
        }
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app-secret");
        std::fs::write(&path, "s3cr3t-value\n").unwrap();
        let args = Cli::try_parse_from([
            "sandbox",
            "--webhook-url",
            "http://127.0.0.1:8088/webhook",
            "--app-secret-file",
            path.to_str().unwrap(),
            "--read-rate",
            "0.25",
        ])
        .unwrap()
        .args;
        let config = args.config();
        assert_eq!(
            config.webhook_url.as_deref(),
            Some("http://127.0.0.1:8088/webhook")
        );
        assert_eq!(config.app_secret.as_deref(), Some("s3cr3t-value"));
        assert_eq!(config.read_rate, 0.25);
        assert_eq!(config.waba_id, DEFAULT_WABA_ID);
        assert_eq!(config.status_delay, Duration::from_millis(50));
        assert!(!format!("{args:?}").contains("s3cr3t"));
        assert!(!format!("{config:?}").contains("s3cr3t"));

        let defaults = Cli::try_parse_from(["sandbox"]).unwrap().args.config();
        assert_eq!((defaults.webhook_url, defaults.app_secret), (None, None));
        assert_eq!(defaults.read_rate, 1.0);
        let missing = dir.path().join("nope");
        assert!(
            Cli::try_parse_from(["sandbox", "--app-secret-file", missing.to_str().unwrap()])
                .is_err()
        );
        std::fs::write(&path, "\n").unwrap();
        assert!(
            Cli::try_parse_from(["sandbox", "--app-secret-file", path.to_str().unwrap()]).is_err()
        );
        assert!(Cli::try_parse_from(["sandbox", "--read-rate", "2"]).is_err());
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (raw, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), encoded);
        }
    }
}
