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
pub mod parse;
pub mod signature;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use futures_util::future::try_join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::amqp::topology::{JOBS_EXCHANGE, WEBHOOKS_EXCHANGE};
use crate::config::Secret;

/// Header that marks a webhook event among the jobs on a shard queue.
pub const HEADER_KIND: &str = "x-sendwell-kind";
pub const KIND_WEBHOOK: &str = "webhook";
/// An opt-in whose double opt-in question the number's own shard must ask (routed like a job,
/// so exactly one instance asks).
pub const KIND_CONSENT_QUESTION: &str = "consent_question";

/// Publishes events with confirms over a connection of its own, reconnecting on demand.
pub struct BrokerSink {
    url: Secret,
    /// The connection and its confirm-mode channel; None until first use or after a failure.
    conn: Mutex<Option<(Connection, Channel)>>,
}

impl BrokerSink {
    pub fn new(url: Secret) -> Self {
        Self {
            url,
            conn: Mutex::new(None),
        }
    }

    async fn channel(&self) -> Result<Channel, lapin::Error> {
        let mut guard = self.conn.lock().await;
        if let Some((c, ch)) = guard.as_ref()
            && c.status().connected()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let conn = Connection::connect(
            self.url.expose(),
            ConnectionProperties::default().with_connection_name("sendwell webhooks".into()),
        )
        .await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        *guard = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Publishes every event and waits for all confirms.
    pub async fn publish(&self, events: &[parse::Event]) -> Result<(), String> {
        let ch = self.channel().await.map_err(|e| e.to_string())?;
        let result = try_join_all(events.iter().map(|ev| publish_one(&ch, &self.url, ev))).await;
        if result.is_err() {
            *self.conn.lock().await = None;
        }
        result.map(|_| ())
    }
}

async fn publish_one(ch: &Channel, url: &Secret, ev: &parse::Event) -> Result<(), String> {
    let body = serde_json::to_vec(ev).map_err(|e| e.to_string())?;
    let (exchange, key) = match &ev.recipient {
        Some(digits) => (JOBS_EXCHANGE, digits.as_str()),
        None => (WEBHOOKS_EXCHANGE, ""),
    };
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(HEADER_KIND),
        AMQPValue::LongString(LongString::from(KIND_WEBHOOK)),
    );
    // The consumer acts on x-sendwell-kind only when the broker vouches for our user_id.
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers)
        .with_user_id(crate::amqp::provenance::broker_user(url.expose()).into());
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            props,
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
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
            tracing::warn!("Webhook verification handshake refused: wrong mode or verify token.");
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
        tracing::warn!(error = %e, "Webhook refused: signature not valid; nothing applied.");
        return (StatusCode::UNAUTHORIZED, "invalid signature\n");
    }
    let mut events = match parse::split(&body) {
        Ok(ev) => ev,
        Err(reason) => {
            crate::metrics::webhook_request("malformed");
            tracing::warn!(%reason, "Webhook refused: signed but malformed.");
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
            tracing::error!(error = %e, "Webhook events could not be stored in the broker; answering 503 so Meta retries.");
            (StatusCode::SERVICE_UNAVAILABLE, "try again later\n")
        }
    }
}
