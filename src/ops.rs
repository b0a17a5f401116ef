//! Operator tools for the runbook: `sendwell dead list | replay` over the dead-letter queue and
//! `sendwell state backup | restore` over a stopped daemon's state store.
//!
//! # Dead letters
//!
//! `sendwell.dead` is a quorum queue declared without `x-delivery-limit` (see
//! [`crate::amqp::topology`]), which means: no limit on RabbitMQ 3.x, but the default limit
//! of 20 on RabbitMQ 4.x, and no dead-letter exchange behind it, so a message that passes the
//! limit there is dropped. Looking at a message means taking it (`basic.get`, manual ack) and
//! giving it back, and how a give-back counts depends on the broker: every return counts on
//! 3.x and 4.0–4.2, only `basic.reject` (not `basic.nack`) counts from 4.3 on. So the tools:
//!
//! - take at most the number of messages that were ready when they started (so nothing is
//!   seen twice) and hold them unacked until the end: a message given back at once would be
//!   the next one taken, since a quorum queue serves returned messages first;
//! - give each one back with `basic.nack(requeue)`, the return that costs nothing on 4.3+;
//! - but when a message shows an `x-delivery-count` of [`REFRESH_AT`] or more, put a fresh copy
//!   of it at the tail of `sendwell.dead` (publisher confirm awaited, headers kept, the
//!   broker's counters dropped) and only then ack the old one: at worst a duplicate in the dead
//!   queue, never a loss. The copy records where the message had come from
//!   ([`HEADER_DEAD_EXCHANGE`], [`HEADER_DEAD_ROUTING_KEY`]), which listings show.
//!
//! Order: messages given back may come back in another order, and refreshed ones move to the
//! tail.
//!
//! `replay` republishes each matching job to `sendwell.jobs` with the recipient's digits as the
//! routing key (as upstream publishes, so the consistent-hash exchange picks the shard), with
//! publisher confirms, and acks the dead copy only once the broker confirmed the new one. A
//! crash in between leaves both: the daemon's ledger sends a job id at most once. A replayed
//! job is a new publication of its id: if its send was in doubt when its message died (ledger
//! `Sending`), the pipeline answers it `failed`/`ambiguous` and never sends it again (see
//! `Pipeline::process`); this tool cannot read the ledger, which the running daemon holds.
//!
//! Only jobs that never got a final outcome are worth replaying: those the broker dead-lettered
//! (delivery limit: a job that kept failing to settle, e.g. while the state store was full).
//! A job sendwell itself dead-lettered as invalid (`x-sendwell-reason-code`) already has its
//! final `invalid` outcome under its id; a replay would only answer `duplicate`. Such messages,
//! bodies that are not jobs and webhook or consent messages are left in the queue and listed
//! with the reason; a fixed invalid job must be published again under a new id.
//!
//! Nothing printed here shows a phone number in clear: numbers in bodies, routing keys and
//! reason texts are masked with [`crate::privacy::Masked`].
//!
//! # State backup and restore
//!
//! redb lets one process open `state.redb` for writing, and the running daemon does. Backup
//! and restore therefore work on a stopped daemon's store only (exit 75 otherwise). The backup
//! opens the store read-only, which keeps any writer (a daemon starting meanwhile) out while
//! the file's bytes are copied, so the copy is one consistent state; the copy (mode 0600: it
//! holds personal data) is then opened on its own and must show the same rows per table before
//! it replaces the target. Restore checks that the file opens as a sendwell store, copies it
//! next to the store, verifies it the same way, keeps the previous store as
//! `state.redb.before-restore` and swaps the new one in with a rename, so there is always a
//! `state.redb` in place.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use redb::{
    MultimapTableHandle, ReadOnlyDatabase, ReadableDatabase, ReadableTableMetadata, TableHandle,
};
use serde::Serialize;

use crate::amqp::consumer::{HEADER_REASON, HEADER_REASON_CODE};
use crate::amqp::topology::{DEAD, JOBS_EXCHANGE};
use crate::config::Config;
use crate::consent::tools::{
    EX_CANTCREAT, EX_DATAERR, EX_IOERR, EX_NOINPUT, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE,
};
use crate::job::RawJob;
use crate::privacy::Masked;
use crate::store::Ledger;
use crate::webhook::HEADER_KIND;

/// A message given back with this `x-delivery-count` or more is refreshed instead (see the
/// module docs): far below RabbitMQ 4's default limit of 20.
pub const REFRESH_AT: i64 = 5;
/// On a refreshed copy: the exchange the message had reached `sendwell.dead` through.
pub const HEADER_DEAD_EXCHANGE: &str = "x-sendwell-dead-exchange";
/// On a refreshed copy: the routing key it had reached `sendwell.dead` with.
pub const HEADER_DEAD_ROUTING_KEY: &str = "x-sendwell-dead-routing-key";
/// `dead list` shows this many messages unless told otherwise.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// The table every sendwell store has: a file without it is not one.
pub const SIGNATURE_TABLE: &str = "ledger_v1";
/// How long connecting to the broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Republished jobs whose confirms may be outstanding at once.
const WINDOW: usize = 256;
/// A store handle just closed (a daemon stopping, a tool finishing) lets go of the file a
/// moment later: wait this long before calling the store busy.
const BUSY_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{0}")]
    Usage(String),
    /// The input is not what it must be (a backup that is not a sendwell store).
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    NoInput(String),
    #[error("{0}")]
    Broker(String),
    #[error("{0}")]
    Store(String),
    #[error("{0}")]
    Output(String),
    /// The daemon holds the store, or the broker did not confirm a republish: try again later.
    #[error("{0}")]
    Busy(String),
}

impl OpsError {
    pub fn exit_code(&self) -> i32 {
        match self {
            OpsError::Usage(_) => EX_USAGE,
            OpsError::Data(_) => EX_DATAERR,
            OpsError::NoInput(_) => EX_NOINPUT,
            OpsError::Broker(_) => EX_UNAVAILABLE,
            OpsError::Store(_) => EX_CANTCREAT,
            OpsError::Output(_) => EX_IOERR,
            OpsError::Busy(_) => EX_TEMPFAIL,
        }
    }
}

fn broker_err(e: lapin::Error) -> OpsError {
    OpsError::Broker(format!("broker: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ListFormat {
    /// A few lines per message, for people.
    Text,
    /// One JSON object per message.
    Jsonl,
}

/// One `x-death` entry: where the broker dead-lettered the message from, why, how often.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Death {
    pub reason: String,
    pub queue: String,
    pub count: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    pub exchange: String,
    /// Masked: routing keys are recipients' digits.
    pub routing_keys: Vec<String>,
}

/// A dead-lettered message as the tools show it. Nothing in it is a phone number in clear.
#[derive(Clone, Debug, Serialize)]
pub struct DeadMessage {
    /// 1-based position in this run's walk of the queue.
    pub position: usize,
    /// `x-sendwell-reason-code`, else the broker's (`x-first-death-reason`), else `unknown`.
    pub reason_code: String,
    /// `x-sendwell-reason` (code and detail), numbers masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The exchange and routing key (masked) it reached `sendwell.dead` with.
    pub exchange: String,
    pub routing_key: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deaths: Vec<Death>,
    /// The queue's `x-delivery-count`, when it shows one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_count: Option<i64>,
    /// `job`, or the `x-sendwell-kind` of a webhook or consent message.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The recipient, masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub body_bytes: usize,
    /// When it was first published (the `timestamp` property), RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_at: Option<String>,
    pub replayable: bool,
    /// Why `replay` leaves it in the queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_replayable: Option<String>,
    /// For a replayable job: the routing key a replay publishes it with (not serialized: it is
    /// the recipient's digits).
    #[serde(skip)]
    replay_key: Option<String>,
}

impl fmt::Display for DeadMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>4}. ", self.position)?;
        match (&self.job_id, self.kind.as_str()) {
            (Some(id), "job") => write!(f, "job {id}")?,
            (Some(id), kind) => write!(f, "{kind} {id}")?,
            (None, kind) => write!(f, "{kind} (no id)")?,
        }
        let mut about = Vec::new();
        if let Some(a) = &self.account {
            about.push(format!("account {a}"));
        }
        if let Some(c) = &self.category {
            about.push(c.clone());
        }
        if let Some(t) = &self.to {
            about.push(format!("to {t}"));
        }
        about.push(format!("{} bytes", self.body_bytes));
        writeln!(f, ", {}", about.join(", "))?;
        match &self.reason {
            // sendwell's reasons read `code: detail`.
            Some(r) if r.starts_with(&format!("{}:", self.reason_code)) => {
                writeln!(f, "      reason: {r}")?
            }
            Some(r) if r != &self.reason_code => {
                writeln!(f, "      reason: {} ({r})", self.reason_code)?
            }
            _ => writeln!(f, "      reason: {}", self.reason_code)?,
        }
        let exchange = if self.exchange.is_empty() {
            "(default)"
        } else {
            self.exchange.as_str()
        };
        write!(
            f,
            "      via: exchange {exchange}, routing key {}",
            if self.routing_key.is_empty() {
                "(none)"
            } else {
                self.routing_key.as_str()
            }
        )?;
        if let Some(n) = self.delivery_count {
            write!(f, ", delivery count {n}")?;
        }
        if let Some(t) = &self.published_at {
            write!(f, ", published {t}")?;
        }
        writeln!(f)?;
        for d in &self.deaths {
            write!(f, "      x-death: {} in {} ×{}", d.reason, d.queue, d.count)?;
            if let Some(t) = &d.time {
                write!(f, " (last {t})")?;
            }
            if !d.exchange.is_empty() || !d.routing_keys.is_empty() {
                write!(
                    f,
                    ", from exchange {} key {}",
                    if d.exchange.is_empty() {
                        "(default)"
                    } else {
                        d.exchange.as_str()
                    },
                    d.routing_keys.join(",")
                )?;
            }
            writeln!(f)?;
        }
        match &self.not_replayable {
            None => writeln!(f, "      replay: yes"),
            Some(why) => writeln!(f, "      replay: no, {why}"),
        }
    }
}

/// Masks every run that looks like a phone number (an optional `+`, then at least 7 digits,
/// single spaces allowed between groups), e.g. in a parser's message that quotes a value.
pub fn mask_numbers_in(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let mut j = i;
        if chars[j] == '+' {
            j += 1;
        }
        let (mut digits, mut end) = (0, j);
        while j < chars.len() {
            if chars[j].is_ascii_digit() {
                digits += 1;
                j += 1;
                end = j;
            } else if chars[j] == ' '
                && digits > 0
                && chars.get(j + 1).is_some_and(|c| c.is_ascii_digit())
            {
                j += 1;
            } else {
                break;
            }
        }
        if digits >= 7 {
            let run: String = chars[i..end].iter().collect();
            out.push_str(&Masked(&run).to_string());
            i = end;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

fn value_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn value_i64(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => *n as i64,
        AMQPValue::ShortShortUInt(n) => *n as i64,
        AMQPValue::ShortInt(n) => *n as i64,
        AMQPValue::ShortUInt(n) => *n as i64,
        AMQPValue::LongInt(n) => *n as i64,
        AMQPValue::LongUInt(n) => *n as i64,
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::Timestamp(n) => *n as i64,
        _ => return None,
    })
}

fn header<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref()?.inner().get(name)
}

fn header_string(p: &BasicProperties, name: &str) -> Option<String> {
    header(p, name).and_then(value_str)
}

fn rfc3339(seconds: i64) -> Option<String> {
    jiff::Timestamp::from_second(seconds)
        .ok()
        .map(|t| t.to_string())
}

fn deaths(p: &BasicProperties) -> Vec<Death> {
    let Some(AMQPValue::FieldArray(entries)) = header(p, "x-death") else {
        return Vec::new();
    };
    entries
        .as_slice()
        .iter()
        .filter_map(|e| match e {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        })
        .map(|t| {
            let get = |k: &str| t.inner().get(k);
            Death {
                reason: get("reason").and_then(value_str).unwrap_or_default(),
                queue: get("queue").and_then(value_str).unwrap_or_default(),
                count: get("count").and_then(value_i64).unwrap_or(1),
                time: get("time").and_then(value_i64).and_then(rfc3339),
                exchange: get("exchange").and_then(value_str).unwrap_or_default(),
                routing_keys: match get("routing-keys") {
                    Some(AMQPValue::FieldArray(keys)) => keys
                        .as_slice()
                        .iter()
                        .filter_map(value_str)
                        .map(|k| mask_numbers_in(&k))
                        .collect(),
                    _ => Vec::new(),
                },
            }
        })
        .collect()
}

/// Why the message is in `sendwell.dead`, as a code: sendwell's own
/// (`x-sendwell-reason-code`, or the code part of `x-sendwell-reason`), else the broker's.
pub fn reason_code(p: &BasicProperties) -> String {
    if let Some(code) = header_string(p, HEADER_REASON_CODE) {
        return code;
    }
    if let Some(reason) = header_string(p, HEADER_REASON) {
        let code = reason.split(':').next().unwrap_or("").trim();
        if !code.is_empty() {
            return code.to_string();
        }
    }
    if let Some(r) = header_string(p, "x-first-death-reason") {
        return r;
    }
    deaths(p)
        .into_iter()
        .next()
        .map(|d| d.reason)
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Describes a delivery from `sendwell.dead`; decides whether a replay may take it.
pub fn inspect(position: usize, d: &Delivery) -> DeadMessage {
    let p = &d.properties;
    let kind = header_string(p, HEADER_KIND).unwrap_or_else(|| "job".into());
    let json: Option<serde_json::Value> = serde_json::from_slice(&d.data)
        .ok()
        .filter(|v: &serde_json::Value| v.is_object());
    let field = |k: &str| {
        json.as_ref()
            .and_then(|v| v.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let (exchange, routing_key) = match (
        header_string(p, HEADER_DEAD_EXCHANGE),
        header_string(p, HEADER_DEAD_ROUTING_KEY),
    ) {
        (Some(e), Some(k)) => (e, k),
        _ => (d.exchange.to_string(), d.routing_key.to_string()),
    };
    let sendwell_reason =
        header(p, HEADER_REASON_CODE).is_some() || header(p, HEADER_REASON).is_some();
    let code = reason_code(p);
    let replay = if kind != "job" {
        Err(format!(
            "a {kind} message, not a job (the daemon retries those itself)"
        ))
    } else if let Err(e) = serde_json::from_slice::<RawJob>(&d.data) {
        Err(format!(
            "the body is not a job ({})",
            mask_numbers_in(&e.to_string())
        ))
    } else if sendwell_reason {
        Err(format!(
            "dead-lettered as invalid ({code}): its id already has a final outcome, so a replay \
             would only answer `duplicate`; publish the fixed job under a new id"
        ))
    } else {
        Ok(crate::publish::routing_key(
            json.as_ref().unwrap_or(&serde_json::Value::Null),
        ))
    };
    DeadMessage {
        position,
        reason_code: code,
        reason: header_string(p, HEADER_REASON).map(|r| mask_numbers_in(&r)),
        exchange,
        routing_key: mask_numbers_in(&routing_key),
        deaths: deaths(p),
        delivery_count: header(p, "x-delivery-count").and_then(value_i64),
        kind,
        job_id: field("id"),
        account: field("account"),
        to: field("to").map(|t| Masked(&t).to_string()),
        category: field("category"),
        body_bytes: d.data.len(),
        published_at: p.timestamp().and_then(|t| rfc3339(t as i64)),
        replayable: replay.is_ok(),
        not_replayable: replay.as_ref().err().cloned(),
        replay_key: replay.ok(),
    }
}

/// Headers the broker or a previous trip through the queues set; a replayed job starts clean.
fn carried_header(name: &str) -> bool {
    !(name == "x-death"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
        || name == "x-delivery-count"
        || name == "x-acquired-count"
        || name.starts_with("x-sendwell-"))
}

fn filtered_headers(p: &BasicProperties, keep: impl Fn(&str) -> bool) -> FieldTable {
    let map: BTreeMap<ShortString, AMQPValue> = p
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(k, _)| keep(k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    FieldTable::from(map)
}

/// The properties of a copy: the original's, with `headers`.
fn copy_properties(
    p: &BasicProperties,
    headers: FieldTable,
    timestamp: Option<u64>,
) -> BasicProperties {
    let mut out = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(t) = timestamp.or(*p.timestamp()) {
        out = out.with_timestamp(t);
    }
    out
}

/// The properties of a replayed job: as upstream would publish it, stamped now.
pub fn replay_properties(p: &BasicProperties) -> BasicProperties {
    let now = jiff::Timestamp::now().as_second().max(0) as u64;
    let mut props = copy_properties(p, filtered_headers(p, carried_header), Some(now));
    if p.content_type().is_none() {
        props = props.with_content_type("application/json".into());
    }
    props
}

/// The properties of a refreshed dead letter: everything kept but the broker's counters, and
/// where it had come from.
fn refresh_properties(d: &Delivery) -> BasicProperties {
    let p = &d.properties;
    let mut headers = filtered_headers(p, |k| k != "x-delivery-count" && k != "x-acquired-count");
    if !headers.contains_key(HEADER_DEAD_EXCHANGE) {
        headers.insert(
            HEADER_DEAD_EXCHANGE.into(),
            AMQPValue::LongString(LongString::from(d.exchange.as_str())),
        );
        headers.insert(
            HEADER_DEAD_ROUTING_KEY.into(),
            AMQPValue::LongString(LongString::from(d.routing_key.as_str())),
        );
    }
    copy_properties(p, headers, None)
}

/// A confirm-mode channel on the broker of `config`, and `sendwell.dead`'s ready messages.
struct DeadQueue {
    conn: Connection,
    ch: Channel,
    depth: u32,
    redacted: String,
}

impl DeadQueue {
    async fn open(config: &Config) -> Result<Self, OpsError> {
        let redacted = config.broker.redacted_url.clone();
        let conn = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(config.broker.url.expose(), ConnectionProperties::default()),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(OpsError::Broker(format!("cannot reach {redacted}: {e}")));
            }
            Err(_) => {
                return Err(OpsError::Broker(format!(
                    "cannot reach {redacted}: no answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        let ch = conn.create_channel().await.map_err(broker_err)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker_err)?;
        let q = ch
            .queue_declare(
                DEAD.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                OpsError::Broker(format!(
                    "queue {DEAD} on {redacted}: {e} (has the daemon run once to declare it?)"
                ))
            })?;
        Ok(Self {
            conn,
            ch,
            depth: q.message_count(),
            redacted,
        })
    }

    async fn take(&self) -> Result<Option<Delivery>, OpsError> {
        Ok(self
            .ch
            .basic_get(DEAD.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(broker_err)?
            .map(|m| m.delivery))
    }

    /// Publishes with mandatory and confirm; true when the broker took it.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<bool, OpsError> {
        let confirm = self
            .ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .map_err(broker_err)?;
        Ok(matches!(
            confirm.await.map_err(broker_err)?,
            Confirmation::Ack(None)
        ))
    }

    /// Gives held messages back (see the module docs); returns how many were refreshed.
    async fn give_back(&self, held: Vec<Delivery>) -> Result<usize, OpsError> {
        let mut refreshed = 0;
        for d in held {
            let count = header(&d.properties, "x-delivery-count").and_then(value_i64);
            if count.is_some_and(|n| n >= REFRESH_AT)
                && self
                    .publish_confirmed("", DEAD, &d.data, refresh_properties(&d))
                    .await?
            {
                ack(&d).await?;
                refreshed += 1;
                continue;
            }
            d.acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
                .map_err(broker_err)?;
        }
        Ok(refreshed)
    }

    async fn close(self) {
        let _ = self.ch.close(200, "done".into()).await;
        let _ = self.conn.close(200, "done".into()).await;
    }
}

async fn ack(d: &Delivery) -> Result<(), OpsError> {
    match d.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(OpsError::Broker(
            "broker: the channel closed before an ack".into(),
        )),
        Err(e) => Err(broker_err(e)),
    }
}

/// What `dead list` did.
#[derive(Debug, Default)]
pub struct ListReport {
    /// Messages ready in `sendwell.dead` when the listing started.
    pub depth: u32,
    pub shown: usize,
    pub replayable: usize,
    /// Given back as fresh copies because their delivery count had grown.
    pub refreshed: usize,
}

impl fmt::Display for ListReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} message(s) in {DEAD} shown, {} replayable; all left in the queue",
            self.shown, self.depth, self.replayable
        )?;
        if self.refreshed > 0 {
            write!(
                f,
                " ({} re-queued as fresh copies at the tail: their delivery count had reached {REFRESH_AT})",
                self.refreshed
            )?;
        }
        Ok(())
    }
}

/// `sendwell dead list`: describes up to `limit` messages of `sendwell.dead` on `out` and
/// leaves them all in the queue.
pub async fn dead_list(
    config: &Config,
    limit: usize,
    format: ListFormat,
    out: &mut dyn Write,
) -> Result<ListReport, OpsError> {
    let q = DeadQueue::open(config).await?;
    let mut report = ListReport {
        depth: q.depth,
        ..Default::default()
    };
    let mut held = Vec::new();
    let mut failure: Option<OpsError> = None;
    let want = limit.min(q.depth as usize);
    while held.len() < want {
        let d = match q.take().await {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        let m = inspect(held.len() + 1, &d);
        held.push(d);
        report.shown += 1;
        report.replayable += m.replayable as usize;
        let written = match format {
            ListFormat::Text => write!(out, "{m}"),
            ListFormat::Jsonl => serde_json::to_writer(&mut *out, &m)
                .map_err(io::Error::from)
                .and_then(|()| out.write_all(b"\n")),
        };
        if let Err(e) = written {
            failure = Some(OpsError::Output(format!("cannot write the listing: {e}")));
            break;
        }
    }
    // Whatever happened, the messages go back before anything is reported.
    let given_back = q.give_back(held).await;
    q.close().await;
    if let Some(e) = failure {
        return Err(e);
    }
    report.refreshed = given_back?;
    out.flush()
        .map_err(|e| OpsError::Output(format!("cannot write the listing: {e}")))?;
    Ok(report)
}

/// Which messages `dead replay` takes.
#[derive(Clone, Debug, Default)]
pub struct ReplayFilter {
    /// Only messages with this reason code (see [`reason_code`]).
    pub reason: Option<String>,
    /// Only the job with this id.
    pub id: Option<String>,
    /// Replay at most this many.
    pub limit: Option<usize>,
    /// Say what would be replayed; move nothing.
    pub dry_run: bool,
}

impl ReplayFilter {
    fn matches(&self, m: &DeadMessage) -> bool {
        self.reason.as_ref().is_none_or(|r| *r == m.reason_code)
            && self
                .id
                .as_ref()
                .is_none_or(|id| m.job_id.as_deref() == Some(id.as_str()))
    }
}

/// What `dead replay` did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub depth: u32,
    pub examined: usize,
    /// Republished to `sendwell.jobs`, confirmed, dead copy acked (dry run: would be).
    pub replayed: usize,
    /// Not matching `--reason` / `--id`: given back unchanged.
    pub skipped: usize,
    /// Matching but not replayable (see `reasons`), or not confirmed by the broker: given back.
    pub left: usize,
    /// Of `left`: the broker refused or could not route the republished copy.
    pub not_confirmed: usize,
    /// One line per message left, with why (numbers masked).
    pub reasons: Vec<String>,
    pub refreshed: usize,
    pub dry_run: bool,
}

impl ReplayReport {
    /// 0, or 75 when some republish was not confirmed (the jobs stay dead: run again).
    pub fn exit_code(&self) -> i32 {
        if self.not_confirmed > 0 {
            EX_TEMPFAIL
        } else {
            0
        }
    }
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.reasons {
            writeln!(f, "left: {r}")?;
        }
        if self.not_confirmed > 0 {
            writeln!(
                f,
                "{} republish(es) were not confirmed by the broker (is a shard queue bound to {JOBS_EXCHANGE}?); those jobs stay in {DEAD}: run again",
                self.not_confirmed
            )?;
        }
        if self.refreshed > 0 {
            writeln!(
                f,
                "{} message(s) given back as fresh copies at the tail (delivery count {REFRESH_AT} or more)",
                self.refreshed
            )?;
        }
        writeln!(
            f,
            "{} {}, {} skipped (not matching), {} left in {DEAD} ({} examined of {} ready)",
            if self.dry_run {
                "would replay"
            } else {
                "replayed"
            },
            self.replayed,
            self.skipped,
            self.left,
            self.examined,
            self.depth
        )
    }
}

/// `sendwell dead replay`: moves matching dead-lettered jobs back to `sendwell.jobs` (see the
/// module docs); everything else goes back to `sendwell.dead` unchanged.
pub async fn dead_replay(config: &Config, filter: &ReplayFilter) -> Result<ReplayReport, OpsError> {
    let q = DeadQueue::open(config).await?;
    let mut report = ReplayReport {
        depth: q.depth,
        dry_run: filter.dry_run,
        ..Default::default()
    };
    let mut held: Vec<Delivery> = Vec::new();
    let mut confirms = FuturesUnordered::new();
    let mut failure: Option<OpsError> = None;
    let mut taken = 0usize;
    while report.examined < q.depth as usize && filter.limit.is_none_or(|l| taken < l) {
        let d = match q.take().await {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        report.examined += 1;
        let m = inspect(report.examined, &d);
        if !filter.matches(&m) {
            report.skipped += 1;
            held.push(d);
            continue;
        }
        let Some(key) = m.replay_key.clone() else {
            report.left += 1;
            report.reasons.push(format!(
                "#{} {}: {}",
                m.position,
                m.job_id.as_deref().unwrap_or("(no id)"),
                m.not_replayable.as_deref().unwrap_or("not replayable")
            ));
            held.push(d);
            continue;
        };
        taken += 1;
        if filter.dry_run {
            report.replayed += 1;
            held.push(d);
            continue;
        }
        let published =
            q.ch.basic_publish(
                JOBS_EXCHANGE.into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &d.data,
                replay_properties(&d.properties),
            )
            .await;
        match published {
            Ok(confirm) => confirms.push(async move { (confirm.await, d, m) }),
            Err(e) => {
                held.push(d);
                failure = Some(broker_err(e));
                break;
            }
        }
        while confirms.len() >= WINDOW {
            if let Some(c) = confirms.next().await
                && let Err(e) = settle_replay(c, &mut held, &mut report).await
            {
                failure.get_or_insert(e);
            }
        }
    }
    while let Some(c) = confirms.next().await {
        if let Err(e) = settle_replay(c, &mut held, &mut report).await {
            failure.get_or_insert(e);
        }
    }
    let given_back = q.give_back(held).await;
    let redacted = q.redacted.clone();
    q.close().await;
    if let Some(e) = failure {
        return Err(OpsError::Broker(format!(
            "{e} ({redacted}; {} replayed before the failure; the rest stay in {DEAD})",
            report.replayed
        )));
    }
    report.refreshed = given_back?;
    Ok(report)
}

/// Acks the dead copy of a job whose republish the broker confirmed; keeps it otherwise.
async fn settle_replay(
    (confirm, d, m): (lapin::Result<Confirmation>, Delivery, DeadMessage),
    held: &mut Vec<Delivery>,
    report: &mut ReplayReport,
) -> Result<(), OpsError> {
    match confirm {
        Ok(Confirmation::Ack(None)) => {
            ack(&d).await?;
            report.replayed += 1;
            Ok(())
        }
        Ok(_) => {
            report.left += 1;
            report.not_confirmed += 1;
            report.reasons.push(format!(
                "#{} {}: the broker did not take the republished job",
                m.position,
                m.job_id.as_deref().unwrap_or("(no id)")
            ));
            held.push(d);
            Ok(())
        }
        Err(e) => {
            held.push(d);
            Err(broker_err(e))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State backup and restore
// ---------------------------------------------------------------------------------------------

/// Rows per table of a store, by table name.
pub type TableRows = BTreeMap<String, u64>;

const BUSY: &str = "the state store is in use: the daemon is running (or another tool has it \
open). Stop the daemon first (systemctl stop sendwell, or sendwell@N for a shard) and run this \
again";

enum Opened {
    Db(ReadOnlyDatabase),
    Busy,
    Unclean,
    Failed(String),
}

/// Opens a store read-only, waiting [`BUSY_GRACE`] for a handle just closed to let go. A
/// read-only handle keeps writers out until it is dropped.
fn open_read_only(path: &Path) -> Opened {
    let deadline = std::time::Instant::now() + BUSY_GRACE;
    loop {
        // A file altered outside redb may make it panic rather than fail: that is "does not
        // open" all the same.
        let r = std::panic::catch_unwind(|| ReadOnlyDatabase::open(path));
        match r {
            Ok(Ok(db)) => return Opened::Db(db),
            Ok(Err(
                redb::DatabaseError::DatabaseAlreadyOpen
                | redb::DatabaseError::LockProtocolMismatch,
            )) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(Err(
                redb::DatabaseError::DatabaseAlreadyOpen
                | redb::DatabaseError::LockProtocolMismatch,
            )) => return Opened::Busy,
            Ok(Err(redb::DatabaseError::RepairAborted)) => return Opened::Unclean,
            Ok(Err(e)) => return Opened::Failed(e.to_string()),
            Err(_) => return Opened::Failed("redb could not read it".into()),
        }
    }
}

fn count_rows(db: &ReadOnlyDatabase) -> Result<TableRows, String> {
    let r = db.begin_read().map_err(|e| e.to_string())?;
    let mut rows = TableRows::new();
    for handle in r.list_tables().map_err(|e| e.to_string())? {
        let name = handle.name().to_string();
        let t = r.open_untyped_table(handle).map_err(|e| e.to_string())?;
        rows.insert(name, t.len().map_err(|e| e.to_string())?);
    }
    for handle in r.list_multimap_tables().map_err(|e| e.to_string())? {
        let name = handle.name().to_string();
        let t = r
            .open_untyped_multimap_table(handle)
            .map_err(|e| e.to_string())?;
        rows.insert(name, t.len().map_err(|e| e.to_string())?);
    }
    Ok(rows)
}

fn write_rows(f: &mut fmt::Formatter<'_>, rows: &TableRows) -> fmt::Result {
    let width = rows.keys().map(String::len).max().unwrap_or(0);
    for (name, n) in rows {
        writeln!(f, "  {name:<width$}  {n}")?;
    }
    Ok(())
}

/// What `state backup` wrote.
#[derive(Debug)]
pub struct BackupReport {
    pub from: PathBuf,
    pub to: PathBuf,
    pub bytes: u64,
    pub rows: TableRows,
    /// The store had not been closed cleanly and was repaired (as the daemon would at start).
    pub repaired: bool,
}

impl fmt::Display for BackupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.repaired {
            writeln!(
                f,
                "note: the store had not been closed cleanly and was repaired first, as the daemon does at start"
            )?;
        }
        writeln!(
            f,
            "backed up {} to {} ({} bytes, mode 0600: it holds personal data, keep it protected); rows per table, verified in the copy:",
            self.from.display(),
            self.to.display(),
            self.bytes
        )?;
        write_rows(f, &self.rows)
    }
}

/// What `state restore` did.
#[derive(Debug)]
pub struct RestoreReport {
    pub from: PathBuf,
    pub to: PathBuf,
    /// Where the store it replaced was kept (None: there was none).
    pub previous: Option<PathBuf>,
    pub rows: TableRows,
    /// The store it replaced did not open (why); it was kept all the same.
    pub previous_unreadable: Option<String>,
    /// The owner could not be set to the previous store's (why).
    pub owner_warning: Option<String>,
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(why) = &self.previous_unreadable {
            writeln!(f, "note: the store replaced did not open ({why})")?;
        }
        match &self.previous {
            Some(p) => writeln!(f, "the previous store is kept as {}", p.display())?,
            None => writeln!(f, "there was no store before")?,
        }
        if let Some(w) = &self.owner_warning {
            writeln!(f, "warning: {w}")?;
        }
        writeln!(
            f,
            "restored {} to {}; rows per table:",
            self.from.display(),
            self.to.display()
        )?;
        write_rows(f, &self.rows)
    }
}

/// A file created whole or not at all: written under a temporary name next to `target`, mode
/// 0600, removed unless [`Staged::commit`] renames it into place.
struct Staged {
    tmp: PathBuf,
    committed: bool,
}

impl Staged {
    fn next_to(target: &Path) -> Self {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "state.redb".into());
        let tmp = target.with_file_name(format!(".{name}.partial-{}", std::process::id()));
        Self {
            tmp,
            committed: false,
        }
    }

    /// Copies `from` into the temporary file and syncs it; returns the bytes copied.
    fn fill_from(&self, from: &Path) -> io::Result<u64> {
        let _ = std::fs::remove_file(&self.tmp);
        let mut src = File::open(from)?;
        let mut dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.tmp)?;
        let n = io::copy(&mut src, &mut dst)?;
        dst.sync_all()?;
        Ok(n)
    }

    fn commit(mut self, target: &Path) -> io::Result<()> {
        std::fs::rename(&self.tmp, target)?;
        self.committed = true;
        sync_dir(target)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn sync_dir(file: &Path) -> io::Result<()> {
    match file.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => File::open(".")?.sync_all(),
    }
}

/// Opens the copy on its own and checks it holds what the original held.
fn verify_copy(copy: &Path, expected: &TableRows) -> Result<(), String> {
    let db = match open_read_only(copy) {
        Opened::Db(db) => db,
        Opened::Busy => return Err("the copy is locked by another process".into()),
        Opened::Unclean => return Err("the copy needs a repair".into()),
        Opened::Failed(e) => return Err(format!("the copy does not open: {e}")),
    };
    let rows = count_rows(&db)?;
    if &rows != expected {
        return Err(format!(
            "the copy's rows differ from the original's ({rows:?} against {expected:?})"
        ));
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// `sendwell state backup --to FILE`: a verified, consistent copy of a stopped daemon's store.
pub fn state_backup(config: &Config, to: &Path) -> Result<BackupReport, OpsError> {
    let from = Ledger::file_in(&config.state.dir);
    if !from.is_file() {
        return Err(OpsError::NoInput(format!(
            "no state store at {} (config state.dir): nothing to back up",
            from.display()
        )));
    }
    if same_file(&from, to) {
        return Err(OpsError::Usage(format!(
            "{} is the store itself: back it up to another file",
            to.display()
        )));
    }
    let mut repaired = false;
    let db = match open_read_only(&from) {
        Opened::Db(db) => db,
        Opened::Busy => return Err(OpsError::Busy(format!("temporarily unavailable: {BUSY}"))),
        Opened::Unclean => {
            // A crash left it unclosed: repair it the way the daemon's start would, then read.
            match Ledger::open(&config.state.dir) {
                Ok(l) => drop(l),
                Err(crate::store::LedgerError::InUse) => {
                    return Err(OpsError::Busy(format!("temporarily unavailable: {BUSY}")));
                }
                Err(e) => {
                    return Err(OpsError::Store(format!(
                        "{} needs a repair that failed: {e}",
                        from.display()
                    )));
                }
            }
            repaired = true;
            match open_read_only(&from) {
                Opened::Db(db) => db,
                Opened::Busy => {
                    return Err(OpsError::Busy(format!("temporarily unavailable: {BUSY}")));
                }
                Opened::Unclean => {
                    return Err(OpsError::Store(format!(
                        "{} still needs a repair after one",
                        from.display()
                    )));
                }
                Opened::Failed(e) => {
                    return Err(OpsError::Store(format!(
                        "{} does not open: {e}",
                        from.display()
                    )));
                }
            }
        }
        Opened::Failed(e) => {
            return Err(OpsError::Store(format!(
                "{} does not open: {e}",
                from.display()
            )));
        }
    };
    let rows =
        count_rows(&db).map_err(|e| OpsError::Store(format!("reading {}: {e}", from.display())))?;
    // `db` stays open until the copy is made: no writer can change the file meanwhile.
    let staged = Staged::next_to(to);
    let bytes = staged
        .fill_from(&from)
        .map_err(|e| OpsError::Output(format!("cannot write {}: {e}", to.display())))?;
    drop(db);
    verify_copy(&staged.tmp, &rows)
        .map_err(|e| OpsError::Output(format!("the backup failed verification: {e}")))?;
    staged
        .commit(to)
        .map_err(|e| OpsError::Output(format!("cannot write {}: {e}", to.display())))?;
    Ok(BackupReport {
        from,
        to: to.to_path_buf(),
        bytes,
        rows,
        repaired,
    })
}

/// `sendwell state restore --from FILE`: puts a backup in place of a stopped daemon's store.
pub fn state_restore(config: &Config, from: &Path) -> Result<RestoreReport, OpsError> {
    let meta = std::fs::metadata(from)
        .map_err(|e| OpsError::NoInput(format!("cannot read {}: {e}", from.display())))?;
    if !meta.is_file() {
        return Err(OpsError::NoInput(format!(
            "{} is not a file",
            from.display()
        )));
    }
    File::open(from)
        .map_err(|e| OpsError::NoInput(format!("cannot read {}: {e}", from.display())))?;
    let target = Ledger::file_in(&config.state.dir);
    if same_file(from, &target) {
        return Err(OpsError::Usage(format!(
            "{} is the store itself: restore from a backup",
            from.display()
        )));
    }
    let not_a_store = |why: String| {
        OpsError::Data(format!(
            "{} is not a sendwell state store: {why}; nothing was changed",
            from.display()
        ))
    };
    let backup = match open_read_only(from) {
        Opened::Db(db) => db,
        Opened::Busy => {
            return Err(OpsError::Busy(format!(
                "temporarily unavailable: {} is open in another process (a daemon using it as its store?)",
                from.display()
            )));
        }
        Opened::Unclean => {
            return Err(not_a_store(
                "it was not closed cleanly (a copy of a running store?); back up a stopped store with `sendwell state backup`".into(),
            ));
        }
        Opened::Failed(e) => return Err(not_a_store(e)),
    };
    let rows = count_rows(&backup).map_err(not_a_store)?;
    if !rows.contains_key(SIGNATURE_TABLE) {
        return Err(not_a_store(format!("it has no {SIGNATURE_TABLE} table")));
    }

    std::fs::create_dir_all(&config.state.dir).map_err(|e| {
        OpsError::Store(format!("cannot create {}: {e}", config.state.dir.display()))
    })?;
    // Held until the new store is in place: no daemon starts on the old one meanwhile.
    let mut previous_unreadable = None;
    let _current = if target.exists() {
        match open_read_only(&target) {
            Opened::Db(db) => Some(db),
            Opened::Busy => {
                return Err(OpsError::Busy(format!("temporarily unavailable: {BUSY}")));
            }
            Opened::Unclean => {
                previous_unreadable = Some("it had not been closed cleanly".to_string());
                None
            }
            Opened::Failed(e) => {
                previous_unreadable = Some(e);
                None
            }
        }
    } else {
        None
    };

    let store_err = |what: &str, e: io::Error| OpsError::Store(format!("{what}: {e}"));
    let staged = Staged::next_to(&target);
    staged.fill_from(from).map_err(|e| {
        store_err(
            &format!("cannot copy into {}", config.state.dir.display()),
            e,
        )
    })?;
    drop(backup);
    verify_copy(&staged.tmp, &rows)
        .map_err(|e| OpsError::Store(format!("the restored copy failed verification: {e}")))?;
    // The daemon's user must be able to open it: give it the previous store's owner (or the
    // state directory's), as far as we may.
    let owner_of = if target.exists() {
        std::fs::metadata(&target)
    } else {
        std::fs::metadata(&config.state.dir)
    };
    let owner_warning = match owner_of {
        Ok(m) => {
            let mine = std::fs::metadata(&staged.tmp).map(|s| (s.uid(), s.gid()));
            if mine
                .as_ref()
                .is_ok_and(|&(u, g)| (u, g) != (m.uid(), m.gid()))
            {
                std::os::unix::fs::chown(&staged.tmp, Some(m.uid()), Some(m.gid()))
                    .err()
                    .map(|e| {
                        format!(
                            "cannot give the restored store the owner {}:{} ({e}); make sure the daemon's user can read and write it",
                            m.uid(),
                            m.gid()
                        )
                    })
            } else {
                None
            }
        }
        Err(_) => None,
    };

    let previous = if target.exists() {
        let kept = target.with_file_name("state.redb.before-restore");
        let _ = std::fs::remove_file(&kept);
        // A hard link keeps the old store without a moment where state.redb is missing (a
        // daemon starting then would create an empty one); a copy where links do not work.
        if std::fs::hard_link(&target, &kept).is_err() {
            std::fs::copy(&target, &kept).map_err(|e| {
                store_err(
                    &format!("cannot keep the previous store as {}", kept.display()),
                    e,
                )
            })?;
        }
        Some(kept)
    } else {
        None
    };
    staged.commit(&target).map_err(|e| {
        store_err(
            &format!("cannot put the backup in place at {}", target.display()),
            e,
        )
    })?;
    Ok(RestoreReport {
        from: from.to_path_buf(),
        to: target,
        previous,
        rows,
        previous_unreadable,
        owner_warning,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert((*k).into(), v.clone());
        }
        BasicProperties::default().with_headers(t)
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(v.into())
    }

    fn delivery(body: &str, p: BasicProperties) -> Delivery {
        let mut d = Delivery::mock(
            1,
            "sendwell.dead".into(),
            "491701234567".into(),
            false,
            body.as_bytes().to_vec(),
        );
        d.properties = p;
        d
    }

    const JOB: &str = r#"{"id":"j-1","account":"acme-de","to":"+491701234567","category":"utility","purpose":"newsletter","template":{"name":"t","language":"de"}}"#;

    #[test]
    fn numbers_in_free_text_are_masked() {
        assert_eq!(
            mask_numbers_in("invalid type: integer `491701234567`, expected a string"),
            "invalid type: integer `491701****567`, expected a string"
        );
        assert_eq!(mask_numbers_in("+49 170 1234567 x"), "+49 17****567 x");
        assert_eq!(mask_numbers_in("line 1 column 42"), "line 1 column 42");
        assert_eq!(mask_numbers_in("no digits"), "no digits");
    }

    #[test]
    fn the_reason_code_is_sendwells_else_the_brokers() {
        assert_eq!(
            reason_code(&props(&[
                (HEADER_REASON, s("unknown_account: no account x")),
                (HEADER_REASON_CODE, s("unknown_account"))
            ])),
            "unknown_account"
        );
        assert_eq!(
            reason_code(&props(&[(HEADER_REASON, s("malformed: eof"))])),
            "malformed"
        );
        assert_eq!(
            reason_code(&props(&[("x-first-death-reason", s("delivery_limit"))])),
            "delivery_limit"
        );
        assert_eq!(reason_code(&props(&[])), "unknown");
    }

    #[test]
    fn only_jobs_without_a_final_outcome_are_replayable() {
        let limit = props(&[("x-first-death-reason", s("delivery_limit"))]);
        let m = inspect(1, &delivery(JOB, limit.clone()));
        assert!(m.replayable, "{m:?}");
        assert_eq!(m.replay_key.as_deref(), Some("491701234567"));
        assert_eq!(m.to.as_deref(), Some("+49170****567"));
        assert!(!m.to_string().contains("1701234567"), "{m}");
        assert!(!serde_json::to_string(&m).unwrap().contains("1701234567"));

        let invalid = props(&[
            (HEADER_REASON, s("unknown_account: no such account")),
            (HEADER_REASON_CODE, s("unknown_account")),
        ]);
        let m = inspect(1, &delivery(JOB, invalid));
        assert!(!m.replayable);
        assert!(m.not_replayable.unwrap().contains("duplicate"));

        let m = inspect(1, &delivery(r#"{"id":"x","to":491701234567}"#, limit));
        assert!(!m.replayable);
        assert!(!m.not_replayable.unwrap().contains("1701234567"));

        let webhook = props(&[
            ("x-first-death-reason", s("delivery_limit")),
            (HEADER_KIND, s("webhook")),
        ]);
        assert!(!inspect(1, &delivery(JOB, webhook)).replayable);
    }

    #[test]
    fn a_replayed_job_drops_the_dead_letter_headers() {
        let p = props(&[
            ("x-death", AMQPValue::FieldArray(vec![].into())),
            ("x-first-death-reason", s("delivery_limit")),
            ("x-delivery-count", AMQPValue::LongLongInt(20)),
            ("x-sendwell-attempts", AMQPValue::LongLongInt(2)),
            ("traceparent", s("00-abc")),
        ]);
        let out = replay_properties(&p);
        let h = out.headers().clone().unwrap();
        assert_eq!(
            h.inner().keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["traceparent"]
        );
        assert_eq!(out.delivery_mode(), &Some(2));
        assert_eq!(
            out.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
    }

    #[test]
    fn x_death_is_summarised_with_keys_masked() {
        let mut entry = FieldTable::default();
        entry.insert("reason".into(), s("delivery_limit"));
        entry.insert("queue".into(), s("sendwell.jobs.0"));
        entry.insert("count".into(), AMQPValue::LongLongInt(1));
        entry.insert("exchange".into(), s("sendwell.jobs"));
        entry.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(vec![s("491701234567")].into()),
        );
        let d = deaths(&props(&[(
            "x-death",
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(entry)].into()),
        )]));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].reason, "delivery_limit");
        assert_eq!(d[0].routing_keys, ["491701****567"]);
    }
}
