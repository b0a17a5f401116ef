//! What the server, its callback tasks and every handle share: the configuration, the settings
//! steerable at run time, the scripted failures, the log of sends and the log of callbacks (the
//! public types among them are re-exported by the module root); and the small helpers every
//! role uses. It imports no other part of the sandbox, so every role can build on it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;

use serde::{Deserialize, Serialize};

/// Bound on the records [`SandboxHandle::requests`] retains, so a sandbox left running under load
/// does not grow without limit (a record costs about 450 bytes with its index entry, so the cap
/// is about 0.5 GB). When reached, the oldest tenth is dropped;
/// [`SandboxHandle::accepted_count_for`] keeps counting exactly regardless (its index holds one
/// small entry per distinct callback data).
///
/// [`SandboxHandle::requests`]: super::SandboxHandle::requests
/// [`SandboxHandle::accepted_count_for`]: super::SandboxHandle::accepted_count_for
pub const RECORD_LOG_CAP: usize = 1_000_000;
/// Bound on the records [`SandboxHandle::callbacks`](super::SandboxHandle::callbacks) retains;
/// the oldest tenth goes when reached.
pub const CALLBACK_LOG_CAP: usize = 1_000_000;
/// The WABA id in callbacks unless configured: Meta's documentation example.
pub const DEFAULT_WABA_ID: &str = "102290129340398";
/// The business display number in callbacks unless configured: Meta's documentation example.
pub const DEFAULT_DISPLAY_PHONE_NUMBER: &str = "15550783881";
/// Per-try bound, so a receiver that never answers cannot hold a callback task forever.
pub(super) const CALLBACK_TRY_TIMEOUT: Duration = Duration::from_secs(10);
/// E.164 numbers have at most 15 digits.
pub(super) const PHONE_MAX_DIGITS: usize = 15;

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
    /// no callbacks. Changeable later with
    /// [`SandboxHandle::set_webhook`](super::SandboxHandle::set_webhook).
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
    /// Statuses in one callback POST at most. 1 (the default): every status alone. More:
    /// the statuses that fall due within `status_batch_window` of each other go out together
    /// (as `statuses[]` of one change per sender number), as Meta batches notifications under
    /// load (up to 1,000 per POST, facts §4).
    pub status_batch: usize,
    /// How long a status waits for others to share its POST (with `status_batch` above 1).
    pub status_batch_window: Duration,
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
            status_batch: 1,
            status_batch_window: Duration::from_millis(10),
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
            .field("status_batch", &self.status_batch)
            .field("status_batch_window", &self.status_batch_window)
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
    /// `biz_opaque_callback_data`, the daemon's correlation key: its job id (the part before
    /// the shard sendwell adds, see `webhook::batch`), the handle for "sent exactly once"
    /// assertions.
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

/// State shared by the server and every handle.
pub(super) struct Shared {
    /// Fixed at bind; only the base latency is steerable at run time.
    pub(super) latency_jitter_nanos: u64,
    /// Clamped copies of the config rates, so `random_bool` can never panic.
    pub(super) rate_server_error: f64,
    /// See `rate_server_error`.
    pub(super) rate_throttle: f64,
    /// See `rate_server_error`.
    pub(super) rate_undeliverable: f64,
    /// Base latency in nanoseconds; atomic so it can change without locking the hot path.
    pub(super) latency_nanos: AtomicU64,
    /// Read on every request, written rarely: an RwLock keeps readers from contending.
    pub(super) valid_tokens: RwLock<Option<HashSet<String>>>,
    /// Scripted faults in the order added; usually empty, so the lock is uncontended.
    pub(super) faults: Mutex<Vec<Fault>>,
    /// The record log and its index, under one lock so they never disagree.
    pub(super) log: Mutex<Log>,
    /// Random per sandbox so wamids from two sandboxes in one process never collide.
    pub(super) wamid_salt: u64,
    /// Makes wamids unique within this sandbox.
    pub(super) wamid_counter: AtomicU64,
    /// Where callbacks go now; read at every callback, so changes apply to pending ones.
    pub(super) webhook: RwLock<Option<Arc<WebhookTarget>>>,
    /// `entry[].id` of callbacks.
    pub(super) waba_id: String,
    /// `metadata.display_phone_number` of callbacks.
    pub(super) display_phone_number: String,
    /// Gap between the callbacks of one message.
    pub(super) status_delay: Duration,
    /// Template name → pricing category.
    pub(super) template_categories: HashMap<String, String>,
    /// Clamped like the other rates.
    pub(super) read_rate: f64,
    /// See [`SandboxConfig::legacy_wa_ids`].
    pub(super) legacy_wa_ids: bool,
    /// Scripted asynchronous failures in the order added.
    pub(super) async_failures: Mutex<Vec<AsyncFailure>>,
    /// Every finished callback, bounded by [`CALLBACK_LOG_CAP`].
    pub(super) callbacks: Mutex<Vec<CallbackRecord>>,
    /// One pooled client for all callbacks.
    pub(super) http: reqwest::Client,
    /// Status callback tasks that have run to their end, so tests can tell "no more callbacks
    /// will come for these sends" without sleeping.
    pub(super) status_runs_done: AtomicU64,
    /// See [`SandboxConfig::status_batch`]; at least 1.
    pub(super) status_batch: usize,
    pub(super) status_batch_window: Duration,
    /// Statuses due, waiting for the poster to gather them into a POST (`status_batch` > 1).
    pub(super) status_outbox: Mutex<StatusOutbox>,
}

/// A status due, waiting in the outbox to share a POST (see [`SandboxConfig::status_batch`](SandboxConfig::status_batch)).
pub(super) struct DueStatus {
    pub(super) phone_number_id: String,
    pub(super) item: serde_json::Value,
    pub(super) status: &'static str,
    pub(super) wamid: String,
    /// Told when the POST is answered (or given up).
    pub(super) done: tokio::sync::oneshot::Sender<()>,
}

/// Statuses waiting to share a POST.
#[derive(Default)]
pub(super) struct StatusOutbox {
    pub(super) due: Vec<DueStatus>,
    /// A poster task is gathering (it takes `due` when its window ends).
    pub(super) gathering: bool,
}

/// A callback destination.
pub(super) struct WebhookTarget {
    pub(super) url: String,
    /// HMAC key; None sends unsigned callbacks.
    pub(super) app_secret: Option<String>,
}

/// What the sandbox remembers about sends.
#[derive(Default)]
pub(super) struct Log {
    /// Every send, in arrival order, bounded by [`RECORD_LOG_CAP`].
    pub(super) records: Vec<SandboxRecord>,
    /// 200 answers per callback data, kept apart from `records` so counting is O(1) and survives
    /// truncation of the log.
    pub(super) accepted_by_callback: HashMap<String, usize>,
}

impl Shared {
    pub(super) fn new(config: SandboxConfig) -> std::io::Result<Shared> {
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
            status_batch: config.status_batch.max(1),
            status_batch_window: config.status_batch_window,
            status_outbox: Mutex::new(StatusOutbox::default()),
        })
    }

    pub(super) fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        // A panic while holding the lock cannot leave the log half-updated in a harmful way.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set_valid_tokens(&self, tokens: Option<Vec<String>>) {
        *self.valid_tokens.write().unwrap_or_else(|e| e.into_inner()) =
            tokens.map(|t| t.into_iter().collect());
    }

    pub(super) fn set_latency(&self, latency: Duration) {
        self.latency_nanos
            .store(duration_nanos(latency), Ordering::Relaxed);
    }

    /// Base latency plus jitter for one answer.
    pub(super) fn delay(&self) -> Duration {
        let base = self.latency_nanos.load(Ordering::Relaxed);
        let jitter = if self.latency_jitter_nanos == 0 {
            0
        } else {
            rand::rng().random_range(0..self.latency_jitter_nanos)
        };
        Duration::from_nanos(base.saturating_add(jitter))
    }

    pub(super) fn record(&self, record: SandboxRecord) {
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

    pub(super) fn new_wamid(&self, wa_id: &str) -> String {
        let n = self.wamid_counter.fetch_add(1, Ordering::Relaxed);
        // Shaped like Meta's: base64 of bytes that start with the recipient.
        let mut raw = Vec::with_capacity(wa_id.len() + 17);
        raw.extend_from_slice(wa_id.as_bytes());
        raw.push(0x15);
        raw.extend_from_slice(&self.wamid_salt.to_be_bytes());
        raw.extend_from_slice(&n.to_be_bytes());
        format!("wamid.{}", base64(&raw))
    }

    /// The WhatsApp ID a send to these digits is answered with.
    pub(super) fn wa_id_of(&self, to_digits: &str) -> String {
        match self.legacy_wa_ids {
            true => legacy_wa_id(to_digits).unwrap_or_else(|| to_digits.to_string()),
            false => to_digits.to_string(),
        }
    }

    /// The newest wamid accepted for this recipient, which a button reply quotes.
    pub(super) fn last_wamid_to(&self, wa_id: &str) -> Option<String> {
        self.log()
            .records
            .iter()
            .rev()
            .find(|r| r.status == 200 && self.wa_id_of(&digits(&r.to)) == wa_id)
            .and_then(|r| r.wamid.clone())
    }

    pub(super) fn set_webhook(&self, url: Option<String>, app_secret: Option<String>) {
        *self.webhook.write().unwrap_or_else(|e| e.into_inner()) =
            url.map(|url| Arc::new(WebhookTarget { url, app_secret }));
    }

    pub(super) fn webhook_target(&self) -> Option<Arc<WebhookTarget>> {
        self.webhook
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn callback_log(&self) -> std::sync::MutexGuard<'_, Vec<CallbackRecord>> {
        self.callbacks.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn record_callback(&self, record: CallbackRecord) {
        let mut log = self.callback_log();
        if log.len() >= CALLBACK_LOG_CAP {
            log.drain(..CALLBACK_LOG_CAP / 10);
        }
        log.push(record);
    }
}

/// The digits of a phone number, which is how Meta derives `wa_id` and how faults match.
pub(super) fn digits(phone: &str) -> String {
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

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Unix seconds as a string, as Meta writes `timestamp` in `messages` webhooks.
pub(super) fn unix_secs_string() -> String {
    (unix_ms() / 1000).to_string()
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
