//! The webhook listener: Meta's verification handshake and signed callbacks. A callback is
//! answered 200 only once every event in it is stored in RabbitMQ (publisher confirms), so a
//! crash after the 200 loses nothing and Meta never needs to retry what was taken. Events about
//! a customer go through `sendwell.jobs` with the customer's number as routing key — to the
//! shard, and the lane, that holds that customer's jobs; account-level events go to every shard
//! through the `sendwell.webhooks` fanout. [`apply`] says what each event changes.
//!
//! Meta names the customer by WhatsApp ID, which is not always their number (Brazil, Mexico):
//! the listener routes by the number the ID resolves to ([`crate::consent::wa_id`]), from this
//! process's map of send answers and the numbers consent knows (every instance knows every
//! consent), without I/O.

pub mod apply;
pub mod batch;
pub mod opaque;
pub mod parse;
pub mod signature;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use futures_util::future::try_join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use rand::Rng;
use tokio::sync::watch;

use crate::amqp::topology::{JOBS_EXCHANGE, STATUSES_EXCHANGE, WEBHOOKS_EXCHANGE};
use crate::config::Secret;

/// Header that marks a webhook event among the jobs on a shard queue.
pub const HEADER_KIND: &str = "x-sendwell-kind";
pub const KIND_WEBHOOK: &str = "webhook";
/// An opt-in whose double opt-in question the number's own shard must ask (routed like a job,
/// so exactly one instance asks).
pub const KIND_CONSENT_QUESTION: &str = "consent_question";

/// Bounds on making a callback durable; from `[webhook]`.
#[derive(Clone, Copy, Debug)]
pub struct SinkLimits {
    /// One connect attempt (TCP, AMQP handshake, channel, confirm mode) at most this long.
    pub connect_timeout: Duration,
    /// A callback waits at most this long for its events to be confirmed, connect included.
    pub request_timeout: Duration,
    /// Ceiling of the pause after failed attempts (doubling from 200 ms, like the consumer's).
    pub retry_max_delay: Duration,
}

impl SinkLimits {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            connect_timeout: c.webhook.broker_connect_timeout,
            request_timeout: c.webhook.request_timeout,
            retry_max_delay: c.broker.reconnect_max_delay,
        }
    }
}

/// Why a callback could not be made durable; each is answered 503, and Meta retries.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("no broker connection: {0}")]
    Unavailable(String),
    #[error("the broker did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Publish(String),
}

/// Publishes events with confirms over a connection of its own, reconnecting on demand.
///
/// With the broker down or hung, callbacks must not pile up: one connect attempt runs at a
/// time, in a task of its own (a callback that gives up does not cancel it), bounded by
/// `connect_timeout`; callbacks that arrive meanwhile wait for it, bounded by
/// `request_timeout`. After a failed attempt there is none until a backoff has passed, and
/// callbacks are refused at once. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct BrokerSink {
    inner: Arc<SinkInner>,
}

struct SinkInner {
    url: Secret,
    /// Our broker user, stamped as `user_id` on every event: the consumer honours
    /// `x-sendwell-kind` only when the broker vouches for it (see `amqp::provenance`).
    user: String,
    limits: SinkLimits,
    /// Held only to look or swap, never across an await.
    link: std::sync::Mutex<Link>,
    /// Counts finished connect attempts; callbacks waiting for one watch it.
    attempts: watch::Sender<u64>,
    /// The 503 log line, at most once per interval.
    refusals: crate::log_every::LogEvery,
}

#[derive(Default)]
struct Link {
    up: Option<Up>,
    connecting: bool,
    failures: u32,
    /// After a failed attempt: no new one before this, and callbacks are refused at once.
    retry_at: Option<Instant>,
    last_error: Option<String>,
    /// Tells connections apart, so a failure on an old one does not drop its successor.
    generation: u64,
}

/// A connection in confirm mode.
struct Up {
    conn: Connection,
    ch: Channel,
    generation: u64,
    /// A second handle on its socket: shutting it ends lapin's I/O thread at once, where
    /// dropping the connection would leave it to the heartbeat.
    socket: Option<std::net::TcpStream>,
}

impl Up {
    fn healthy(&self) -> bool {
        self.conn.status().connected() && self.ch.status().connected()
    }

    fn shut(self) {
        if let Some(s) = self.socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// How often the 503 line is written while the broker stays unreachable.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl BrokerSink {
    pub fn new(url: Secret, limits: SinkLimits) -> Self {
        Self {
            inner: Arc::new(SinkInner {
                user: crate::amqp::provenance::broker_user(url.expose()),
                url,
                limits,
                link: std::sync::Mutex::new(Link::default()),
                attempts: watch::Sender::new(0),
                refusals: crate::log_every::LogEvery::new(
                    REFUSAL_LOG_EVERY,
                    Arc::new(crate::clock::SystemClock),
                ),
            }),
        }
    }

    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.inner
            .link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The confirm-mode channel: the live one, or the outcome of the connect attempt under way
    /// (starting one when none runs and no backoff holds).
    async fn channel(&self) -> Result<(Channel, u64), SinkError> {
        loop {
            // Subscribed before looking, so the end of an attempt is never missed.
            let mut attempts = self.inner.attempts.subscribe();
            {
                let mut link = self.link();
                if let Some(up) = &link.up {
                    if up.healthy() {
                        return Ok((up.ch.clone(), up.generation));
                    }
                    if let Some(up) = link.up.take() {
                        up.shut();
                    }
                }
                if !link.connecting {
                    if let Some(at) = link.retry_at
                        && Instant::now() < at
                    {
                        let why = link.last_error.clone().unwrap_or_default();
                        return Err(SinkError::Unavailable(why));
                    }
                    link.connecting = true;
                    tokio::spawn(self.clone().connect());
                }
            }
            if attempts.changed().await.is_err() {
                return Err(SinkError::Unavailable("the sink is gone".into()));
            }
        }
    }

    /// One connect attempt; records its outcome and wakes the callbacks waiting for it.
    async fn connect(self) {
        let result = open(self.inner.url.expose(), self.inner.limits.connect_timeout).await;
        {
            let mut link = self.link();
            link.connecting = false;
            match result {
                Ok((conn, ch, socket)) => {
                    link.generation += 1;
                    link.up = Some(Up {
                        conn,
                        ch,
                        generation: link.generation,
                        socket,
                    });
                    link.failures = 0;
                    link.retry_at = None;
                    link.last_error = None;
                    tracing::info!("Webhook listener connected to the broker.");
                }
                Err(e) => {
                    link.failures = link.failures.saturating_add(1);
                    let cap = Duration::from_millis(200)
                        .saturating_mul(1 << link.failures.min(10))
                        .min(self.inner.limits.retry_max_delay);
                    let wait = Duration::from_millis(
                        rand::rng()
                            .random_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64),
                    );
                    link.retry_at = Some(Instant::now() + wait);
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "The webhook listener cannot reach the broker; callbacks are answered 503 (Meta retries them) until it can.");
                    link.last_error = Some(e);
                }
            }
        }
        self.inner.attempts.send_modify(|n| *n += 1);
    }

    /// Drops connection `generation` after a failure on it (unless it was replaced already).
    fn discard(&self, generation: u64) {
        let mut link = self.link();
        if link.up.as_ref().is_some_and(|u| u.generation == generation)
            && let Some(up) = link.up.take()
        {
            up.shut();
        }
    }

    /// Publishes every event and waits for all confirms, within `request_timeout`.
    pub async fn publish(&self, events: &[parse::Event]) -> Result<(), SinkError> {
        let limit = self.inner.limits.request_timeout;
        let mut used = None;
        let result = tokio::time::timeout(limit, async {
            let (ch, generation) = self.channel().await?;
            used = Some(generation);
            // Statuses that name their sending shard: one message per shard (see `batch`).
            let mut by_shard: std::collections::BTreeMap<u16, Vec<&parse::Event>> =
                Default::default();
            let mut single = Vec::new();
            for ev in events {
                match (ev.shard, &ev.recipient) {
                    (Some(shard), Some(_)) => by_shard.entry(shard).or_default().push(ev),
                    _ => single.push(ev),
                }
            }
            let batches = try_join_all(
                by_shard
                    .iter()
                    .map(|(shard, evs)| publish_batch(&ch, &self.inner.user, *shard, evs)),
            );
            let singles = try_join_all(
                single
                    .into_iter()
                    .map(|ev| publish_one(&ch, &self.inner.user, ev)),
            );
            futures_util::future::try_join(batches, singles)
                .await
                .map(|_| ())
                .map_err(SinkError::Publish)
        })
        .await
        .unwrap_or(Err(SinkError::Timeout(limit)));
        if result.is_err()
            && let Some(generation) = used
        {
            self.discard(generation);
        }
        result
    }
}

/// Opens a connection in confirm mode within `limit`. An attempt that runs out of time has its
/// socket shut, so a broker that accepts TCP and never answers leaves nothing behind: lapin
/// has no connect timeout, and dropping its connect future would leave its I/O thread waiting
/// on the socket for good.
async fn open(
    url: &str,
    limit: Duration,
) -> Result<(Connection, Channel, Option<std::net::TcpStream>), String> {
    use std::os::fd::AsFd;

    use lapin::tcp::{AMQPUriTcpExt, AsyncTcpStream, TLSConfig};
    let uri: lapin::uri::AMQPUri = url.parse().map_err(|e| format!("broker URL: {e}"))?;
    let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
    let socket: Arc<std::sync::Mutex<Option<std::net::TcpStream>>> = Arc::default();
    let held = socket.clone();
    let attempt = async move {
        let conn = Connection::connector(
            uri,
            runtime,
            async move |uri, runtime| {
                let stream =
                    AMQPUriTcpExt::connect_with_config_async(&uri, TLSConfig::default(), &runtime)
                        .await?;
                // A duplicate of the descriptor (plain TCP; a TLS stream keeps its own).
                if let AsyncTcpStream::Plain(s) = &stream
                    && let Ok(fd) = s.get_ref().as_fd().try_clone_to_owned()
                {
                    *held
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(std::net::TcpStream::from(fd));
                }
                Ok(stream)
            },
            ConnectionProperties::default().with_connection_name("sendwell webhooks".into()),
        )
        .await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok::<_, lapin::Error>((conn, ch))
    };
    let result = tokio::time::timeout(limit, attempt).await;
    let socket = socket
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    match result {
        Ok(Ok((conn, ch))) => Ok((conn, ch, socket)),
        Ok(Err(e)) => {
            if let Some(s) = socket {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            Err(e.to_string())
        }
        Err(_) => {
            if let Some(s) = socket {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            Err(format!("no answer within {limit:?} (connect timeout)"))
        }
    }
}

/// Publishes statuses of messages `shard` sent, [`batch::MAX_EVENTS`] to a message, to
/// `sendwell.statuses` with the shard as routing key: to that shard's queue, or, when no queue
/// is bound for it (a shard removed), on through the alternate exchange `sendwell.jobs` to a
/// live shard (see [`crate::amqp::topology::STATUSES_EXCHANGE`]).
async fn publish_batch(
    ch: &Channel,
    user: &str,
    shard: u16,
    events: &[&parse::Event],
) -> Result<(), String> {
    let key = shard.to_string();
    try_join_all(events.chunks(batch::MAX_EVENTS).map(|chunk| {
        let key = key.as_str();
        async move {
            let body = batch::encode(chunk);
            publish_confirmed(
                ch,
                user,
                STATUSES_EXCHANGE,
                key,
                batch::KIND_STATUS_BATCH,
                &body,
            )
            .await?;
            crate::metrics::webhook_status_batch(chunk.len());
            Ok::<_, String>(())
        }
    }))
    .await
    .map(|_| ())
}

async fn publish_one(ch: &Channel, user: &str, ev: &parse::Event) -> Result<(), String> {
    let body = serde_json::to_vec(ev).map_err(|e| e.to_string())?;
    let (exchange, key) = match &ev.recipient {
        Some(digits) => (JOBS_EXCHANGE, digits.as_str()),
        None => (WEBHOOKS_EXCHANGE, ""),
    };
    publish_confirmed(ch, user, exchange, key, KIND_WEBHOOK, &body).await
}

/// One persistent, mandatory publish of sendwell's own (`kind` in `x-sendwell-kind`, our
/// `user_id`), awaited until the broker confirms it; an error says why it is not stored.
async fn publish_confirmed(
    ch: &Channel,
    user: &str,
    exchange: &str,
    key: &str,
    kind: &str,
    body: &[u8],
) -> Result<(), String> {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(HEADER_KIND),
        AMQPValue::LongString(LongString::from(kind)),
    );
    // The consumer acts on x-sendwell-kind only when the broker vouches for our user_id.
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers)
        .with_user_id(user.into());
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            props,
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        // For a status batch: not even the alternate exchange could route it (no shard at all).
        Confirmation::Ack(Some(_)) => Err(format!("no queue bound to {exchange}")),
        Confirmation::Nack(_) => Err("the broker refused the event".into()),
    }
}

/// What the handlers share.
pub struct Listener {
    pub app_secret: Secret,
    pub verify_token: Secret,
    pub sink: BrokerSink,
    /// Resolves the customers' WhatsApp IDs to numbers for routing; None: route by the ID.
    pub numbers: Option<Arc<crate::consent::ConsentStore>>,
}

#[derive(serde::Deserialize)]
struct Handshake {
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    verify_token: Option<String>,
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

/// The webhook router; `max_body` bytes at most (413 beyond).
pub fn router(listener: Arc<Listener>, max_body: usize) -> Router {
    Router::new()
        .route("/webhook", get(handshake).post(receive))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(listener)
}

async fn handshake(
    State(l): State<Arc<Listener>>,
    Query(q): Query<Handshake>,
) -> (StatusCode, String) {
    let token_ok = q.verify_token.as_deref().is_some_and(|t| {
        // Constant time, like the signature: the token is a secret.
        let a = t.as_bytes();
        let b = l.verify_token.expose().as_bytes();
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    });
    match (q.mode.as_deref(), token_ok, q.challenge) {
        (Some("subscribe"), true, Some(challenge)) => {
            tracing::info!("Webhook verification handshake answered.");
            (StatusCode::OK, challenge)
        }
        _ => {
            // Anyone can send these (a scanner, a wrong token left in Meta's settings).
            crate::metrics::webhook_request("handshake_refused");
            if let Some(unlogged) =
                crate::metrics::log_hourly(("webhook_refused", "handshake_refused"))
            {
                tracing::warn!(
                    unlogged,
                    "Webhook verification handshake refused: wrong mode or verify token (logged once an hour; sendwell_webhook_requests_total{{result=\"handshake_refused\"}} counts each)."
                );
            }
            (StatusCode::FORBIDDEN, "verification refused\n".into())
        }
    }
}

async fn receive(
    State(l): State<Arc<Listener>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let sig = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    if let Err(e) = signature::verify(l.app_secret.expose().as_bytes(), &body, sig) {
        let result = if e == signature::SignatureError::Missing {
            "unsigned"
        } else {
            "forged"
        };
        crate::metrics::webhook_request(result);
        // Anyone who finds the URL can send these: one line an hour per result, each counted.
        if let Some(unlogged) = crate::metrics::log_hourly(("webhook_refused", result)) {
            tracing::warn!(error = %e, unlogged, "Webhook refused: signature not valid; nothing applied (logged once an hour per result; sendwell_webhook_requests_total counts each).");
        }
        return (StatusCode::UNAUTHORIZED, "invalid signature\n");
    }
    let mut events = match parse::split(&body) {
        Ok(ev) => ev,
        Err(reason) => {
            crate::metrics::webhook_request("malformed");
            if let Some(unlogged) = crate::metrics::log_hourly(("webhook_refused", "malformed")) {
                tracing::warn!(%reason, unlogged, "Webhook refused: signed but malformed (logged once an hour; sendwell_webhook_requests_total{{result=\"malformed\"}} counts each).");
            }
            return (StatusCode::BAD_REQUEST, "malformed callback\n");
        }
    };
    if let Some(numbers) = &l.numbers {
        for ev in &mut events {
            if let Some(id) = ev.recipient.as_mut() {
                let number = numbers.resolve_wa_id(id);
                *id = number.digits;
            }
        }
    }
    match l.sink.publish(&events).await {
        Ok(()) => {
            crate::metrics::webhook_request("ok");
            (StatusCode::OK, "ok\n")
        }
        Err(e) => {
            // Meta retries non-200 answers for days: nothing is lost by refusing now.
            crate::metrics::webhook_request("unavailable");
            if let Some(unlogged) = l.sink.inner.refusals.check(()) {
                tracing::error!(error = %e, refused_since_last_line = unlogged, "Webhook events could not be stored in the broker; answering 503 so Meta retries.");
            }
            (StatusCode::SERVICE_UNAVAILABLE, "try again later\n")
        }
    }
}
