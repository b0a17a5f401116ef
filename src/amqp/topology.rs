//! CONTRACT §1, declared idempotently at every (re)connect, plus the delay queues that carry
//! deferrals and long retries back through `sendwell.jobs`.
//!
//! The delay queues belong to no shard: a copy is published to the headers exchange
//! [`DELAY_EXCHANGE`] with its recipient's digits as routing key and the tier's queue named in
//! header [`HEADER_DELAY_QUEUE`]; its queue dead-letters it to `sendwell.jobs` without a
//! dead-letter routing key, so RabbitMQ keeps the routing key it was published with (its
//! "Dead Letter Exchanges" guide: "If the routing key is not set, the message's own routing keys
//! are used"; the same on 3.10 and 4.x). The consistent-hash exchange then takes it to the
//! shard that owns the recipient *when it returns*: after a shard was added or removed that is
//! the shard new jobs of the recipient go to, so one instance sends to a recipient at a time.
//! (Delay queues of older builds, `sendwell.delay.<shard>.<tier>`, dead-letter to the shard
//! queue by name; they are no longer declared, drain by their TTL, and the consumer sends what
//! comes back from them on to the recipient's shard: docs/operations.md, "Upgrades".)
//!
//! Every queue is a quorum queue (replicated, durable). Dead-lettering from the shard and delay
//! queues is `at-least-once` (needs `x-overflow = reject-publish`), so a message in transit
//! between queues survives a broker crash. `x-delivery-limit` is set explicitly so RabbitMQ 3.10
//! (no default) and 4.x (default 20) behave the same: a message that keeps coming back
//! unacknowledged goes to `sendwell.dead` instead of looping forever.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

pub const JOBS_EXCHANGE: &str = "sendwell.jobs";
pub const DEAD: &str = "sendwell.dead";
pub const OUTCOMES_EXCHANGE: &str = "sendwell.outcomes";
pub const CONSENT_EXCHANGE: &str = "sendwell.consent";
/// Account-level webhook events (template status, capability, account updates) reach every
/// shard through this fanout; customer-level events go through `sendwell.jobs` instead.
pub const WEBHOOKS_EXCHANGE: &str = "sendwell.webhooks";
/// Status batches (see [`crate::webhook::batch`]) go to the shard that sent their messages:
/// each shard queue is bound here with its shard number as routing key. A batch for a shard
/// with no queue bound (a shard removed) goes on to the alternate exchange, `sendwell.jobs`,
/// whose ring gives it to a live shard: nothing is dropped, and the listener need not rely on
/// the broker returning it.
pub const STATUSES_EXCHANGE: &str = "sendwell.statuses";
pub const DELIVERY_LIMIT: i64 = 20;
/// Headers exchange in front of the delay queues: routes by [`HEADER_DELAY_QUEUE`] alone, so the
/// routing key is free to be the recipient's digits, which dead-lettering keeps.
pub const DELAY_EXCHANGE: &str = "sendwell.delay";
/// The delay queue a copy is for (its name). Not `x-` prefixed: a headers exchange ignores
/// binding arguments that begin with `x-` when matching (RabbitMQ's headers exchange; `x-match
/// = all-with-x` would include them, but exists only from 3.10 on, and needs nothing here).
pub const HEADER_DELAY_QUEUE: &str = "sendwell-delay-queue";

/// Delay tiers: a wait is spent in the longest tier that fits and re-delayed for the rest, so
/// each queue has one TTL and messages expire in order (per-message TTLs would block behind the
/// head of the queue).
pub const DELAY_TIERS: &[(&str, Duration)] = &[
    ("1s", Duration::from_secs(1)),
    ("5s", Duration::from_secs(5)),
    ("30s", Duration::from_secs(30)),
    ("2m", Duration::from_secs(120)),
    ("10m", Duration::from_secs(600)),
    ("1h", Duration::from_secs(3600)),
];

/// The names one shard uses.
#[derive(Clone, Debug)]
pub struct Names {
    pub shard: u16,
    pub jobs_queue: String,
    pub consent_queue: String,
    pub webhooks_queue: String,
}

impl Names {
    pub fn new(shard: u16) -> Self {
        Self {
            shard,
            jobs_queue: format!("{JOBS_EXCHANGE}.{shard}"),
            consent_queue: format!("{CONSENT_EXCHANGE}.{shard}"),
            webhooks_queue: format!("{WEBHOOKS_EXCHANGE}.{shard}"),
        }
    }

    /// A tier's delay queue: shared by every shard (what it holds goes back through
    /// `sendwell.jobs`, to whichever shard owns each recipient then).
    pub fn delay_queue(&self, tier: &str) -> String {
        delay_queue(tier)
    }

    /// The delay queue of this shard in builds before shared delay queues: it dead-letters to
    /// the shard queue by name. Not declared any more; named for the docs and the tests.
    pub fn legacy_delay_queue(&self, tier: &str) -> String {
        format!("sendwell.delay.{}.{tier}", self.shard)
    }

    /// The delay queue for a wait: the longest tier not longer than it (the shortest otherwise).
    pub fn delay_queue_for(&self, wait: Duration) -> String {
        let tier = DELAY_TIERS
            .iter()
            .rev()
            .find(|(_, d)| *d <= wait)
            .unwrap_or(&DELAY_TIERS[0]);
        self.delay_queue(tier.0)
    }
}

/// A tier's delay queue (see [`Names::delay_queue`]).
pub fn delay_queue(tier: &str) -> String {
    format!("{DELAY_EXCHANGE}.{tier}")
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(
        "the RabbitMQ plugin rabbitmq_consistent_hash_exchange is not enabled; run `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange` on the broker"
    )]
    PluginMissing,
    #[error(
        "{what} exists with different arguments ({detail}); delete it or align it with sendwell's topology"
    )]
    Mismatch { what: String, detail: String },
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
}

impl TopologyError {
    /// Errors a reconnect cannot fix: the operator must act.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, TopologyError::Broker(_))
    }
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn quorum_args(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(ShortString::from("x-queue-type"), s("quorum"));
    for (k, v) in extra {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn exchange_opts() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn classify(what: &str, e: lapin::Error) -> TopologyError {
    let text = e.to_string();
    if text.contains("invalid exchange type") || text.contains("x-consistent-hash") {
        TopologyError::PluginMissing
    } else if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent arg") {
        TopologyError::Mismatch {
            what: what.to_string(),
            detail: text,
        }
    } else {
        TopologyError::Broker(e)
    }
}

/// Declares everything this shard needs. A failed declaration closes the channel, so callers
/// pass a channel used for nothing else.
pub async fn declare(ch: &Channel, names: &Names) -> Result<(), TopologyError> {
    ch.exchange_declare(
        JOBS_EXCHANGE.into(),
        ExchangeKind::Custom("x-consistent-hash".into()),
        exchange_opts(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| classify("exchange sendwell.jobs", e))?;

    ch.exchange_declare(
        DEAD.into(),
        ExchangeKind::Fanout,
        exchange_opts(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| classify("exchange sendwell.dead", e))?;
    ch.queue_declare(DEAD.into(), durable(), quorum_args(&[]))
        .await
        .map_err(|e| classify("queue sendwell.dead", e))?;
    ch.queue_bind(
        DEAD.into(),
        DEAD.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;

    let dead_lettering = [
        ("x-overflow", s("reject-publish")),
        ("x-dead-letter-strategy", s("at-least-once")),
    ];
    // Single active consumer: a second instance started on the same shard by mistake (or a
    // rolling deploy's overlap) waits as a standby instead of consuming beside the first with
    // a ledger of its own, which could send a redelivered job twice.
    let mut shard_args = vec![
        ("x-dead-letter-exchange", s(DEAD)),
        ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
        ("x-single-active-consumer", AMQPValue::Boolean(true)),
    ];
    shard_args.extend(dead_lettering.iter().cloned());
    ch.queue_declare(
        names.jobs_queue.as_str().into(),
        durable(),
        quorum_args(&shard_args),
    )
    .await
    .map_err(|e| classify(&format!("queue {}", names.jobs_queue), e))?;
    // Weight "1": every shard gets an equal share of recipients.
    ch.queue_bind(
        names.jobs_queue.as_str().into(),
        JOBS_EXCHANGE.into(),
        "1".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;

    let mut statuses_args = FieldTable::default();
    statuses_args.insert(ShortString::from("alternate-exchange"), s(JOBS_EXCHANGE));
    ch.exchange_declare(
        STATUSES_EXCHANGE.into(),
        ExchangeKind::Direct,
        exchange_opts(),
        statuses_args,
    )
    .await
    .map_err(|e| classify("exchange sendwell.statuses", e))?;
    ch.queue_bind(
        names.jobs_queue.as_str().into(),
        STATUSES_EXCHANGE.into(),
        names.shard.to_string().as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;

    ch.exchange_declare(
        OUTCOMES_EXCHANGE.into(),
        ExchangeKind::Topic,
        exchange_opts(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| classify("exchange sendwell.outcomes", e))?;

    ch.exchange_declare(
        CONSENT_EXCHANGE.into(),
        ExchangeKind::Fanout,
        exchange_opts(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| classify("exchange sendwell.consent", e))?;
    // Single active consumer here too: an overlapping second instance of the shard (a rolling
    // deploy) must not take half of the STOPs into a store of its own.
    ch.queue_declare(
        names.consent_queue.as_str().into(),
        durable(),
        quorum_args(&[
            ("x-dead-letter-exchange", s(DEAD)),
            ("x-single-active-consumer", AMQPValue::Boolean(true)),
        ]),
    )
    .await
    .map_err(|e| classify(&format!("queue {}", names.consent_queue), e))?;
    ch.queue_bind(
        names.consent_queue.as_str().into(),
        CONSENT_EXCHANGE.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;

    ch.exchange_declare(
        WEBHOOKS_EXCHANGE.into(),
        ExchangeKind::Fanout,
        exchange_opts(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| classify("exchange sendwell.webhooks", e))?;
    ch.queue_declare(
        names.webhooks_queue.as_str().into(),
        durable(),
        quorum_args(&[
            ("x-dead-letter-exchange", s(DEAD)),
            ("x-single-active-consumer", AMQPValue::Boolean(true)),
        ]),
    )
    .await
    .map_err(|e| classify(&format!("queue {}", names.webhooks_queue), e))?;
    ch.queue_bind(
        names.webhooks_queue.as_str().into(),
        WEBHOOKS_EXCHANGE.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;

    ch.exchange_declare(
        DELAY_EXCHANGE.into(),
        ExchangeKind::Headers,
        exchange_opts(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| classify("exchange sendwell.delay", e))?;
    for (tier, ttl) in DELAY_TIERS {
        let q = delay_queue(tier);
        // No `x-dead-letter-routing-key`: the copy goes back with the key it was published
        // with, its recipient's digits (see the module's note).
        let mut args = vec![
            (
                "x-message-ttl",
                AMQPValue::LongLongInt(ttl.as_millis() as i64),
            ),
            ("x-dead-letter-exchange", s(JOBS_EXCHANGE)),
        ];
        args.extend(dead_lettering.iter().cloned());
        ch.queue_declare(q.as_str().into(), durable(), quorum_args(&args))
            .await
            .map_err(|e| classify(&format!("queue {q}"), e))?;
        let mut binding = FieldTable::default();
        binding.insert(ShortString::from("x-match"), s("all"));
        binding.insert(ShortString::from(HEADER_DELAY_QUEUE), s(&q));
        ch.queue_bind(
            q.as_str().into(),
            DELAY_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            binding,
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_uses_the_longest_tier_that_fits() {
        let n = Names::new(3);
        assert_eq!(
            n.delay_queue_for(Duration::from_millis(10)),
            "sendwell.delay.1s"
        );
        assert_eq!(
            n.delay_queue_for(Duration::from_secs(7)),
            "sendwell.delay.5s"
        );
        assert_eq!(
            n.delay_queue_for(Duration::from_secs(90)),
            "sendwell.delay.30s"
        );
        assert_eq!(
            n.delay_queue_for(Duration::from_secs(86400)),
            "sendwell.delay.1h"
        );
    }
}
