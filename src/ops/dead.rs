//! `sendwell dead list | replay`: the dead-letter queue `sendwell.dead`, looked at and replayed
//! without losing a message.
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
//!   ([`HEADER_DEAD_EXCHANGE`](super::HEADER_DEAD_EXCHANGE),
//!   [`HEADER_DEAD_ROUTING_KEY`](super::HEADER_DEAD_ROUTING_KEY)), which listings show.
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

use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use super::dead_letter::{
    DeadMessage, header, inspect, refresh_properties, replay_properties, value_i64,
};
use super::error::OpsError;
use crate::amqp::topology::{DEAD, JOBS_EXCHANGE};
use crate::config::Config;
use crate::consent::tools::EX_TEMPFAIL;

/// A message given back with this `x-delivery-count` or more is refreshed instead (see the
/// module docs): far below RabbitMQ 4's default limit of 20.
pub const REFRESH_AT: i64 = 5;
/// `dead list` shows this many messages unless told otherwise.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// How long connecting to the broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Republished jobs whose confirms may be outstanding at once.
const WINDOW: usize = 256;

fn broker_err(e: lapin::Error) -> OpsError {
    OpsError::Broker(format!("broker: {e}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ListFormat {
    /// A few lines per message, for people.
    Text,
    /// One JSON object per message.
    Jsonl,
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
    /// Only messages with this reason code (see [`reason_code`](super::reason_code)).
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
