//! Consuming the shard queue. Each delivery is decoded, scheduled so that jobs for one
//! recipient run one after another (in arrival order) while jobs for different recipients run
//! concurrently, processed by the pipeline, and settled: its outcome recorded, published with a
//! confirm, and only then acked.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::BasicNackOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::provenance::Identity;
use super::publisher::{PublishError, Publisher, json_properties};
use super::topology::{
    CONSENT_EXCHANGE, DEAD, DELAY_EXCHANGE, HEADER_DELAY_QUEUE, JOBS_EXCHANGE, Names,
    OUTCOMES_EXCHANGE,
};
use crate::consent::flow::{ConsentFlow, Outgoing};
use crate::consent::{Applied, ConsentEvent, EventDecoder};
use crate::job::{Category, Invalid, Job, Outcome, OutcomeEvent};
use crate::pipeline::decode::{Decoder, Refused};
use crate::pipeline::{Disposition, Pipeline};
use crate::store::{KvOp, Table};
use crate::webhook::apply::Applier;
use crate::webhook::batch::KIND_STATUS_BATCH;
use crate::webhook::parse::Event;
use crate::webhook::{HEADER_KIND, KIND_CONSENT_QUESTION, KIND_WEBHOOK};

pub const HEADER_DUE: &str = "x-sendwell-due";
pub const HEADER_ATTEMPTS: &str = "x-sendwell-attempts";
pub const HEADER_REASON: &str = "x-sendwell-reason";
pub const HEADER_REASON_CODE: &str = "x-sendwell-reason-code";
/// The dead-letter reason of a message that claims to come from sendwell and does not.
pub const FORGED: &str = "forged_control";
/// The header of a probe an instance publishes to its own shard queue while it has had no
/// delivery in its broker session (see `crate::instances`); its value is that instance's id.
pub const HEADER_PROBE: &str = "x-sendwell-probe";
/// Ids longer than this are not valid job ids (CONTRACT §2) and get no ledger row.
const MAX_LEDGERED_ID: usize = 128;

/// One broker connection's publishing side; jobs received on it are settled through it.
pub struct Session {
    pub publisher: Publisher,
    /// Acks of settled jobs, sent in batches (`multiple`).
    pub acks: Arc<super::acks::AckBatcher>,
    /// Cancelled when the connection is lost or closed: items of this session still waiting in
    /// a lane are skipped (the broker redelivers them on the next connection).
    pub token: CancellationToken,
    /// Cancelled by the daemon's shutdown or by `token`: what a job of this session waits on
    /// (pacing, the throughput gate, a store coming back, an inline retry). Once the session is
    /// gone its jobs belong to the broker again, which may already have given them to another
    /// instance (the queue's new active consumer): a job of a lost session must not go on to be
    /// claimed and sent here, beside the copies and the new jobs of its recipient there.
    pub work: CancellationToken,
}

impl Session {
    /// A session whose `work` ends with `shutdown` or with the session (`token`).
    pub fn new(
        publisher: Publisher,
        acks: Arc<super::acks::AckBatcher>,
        token: CancellationToken,
        shutdown: &CancellationToken,
    ) -> Session {
        let work = shutdown.child_token();
        let (lost, w) = (token.clone(), work.clone());
        // Ends with the session: its token is cancelled whichever way the session ends.
        tokio::spawn(async move {
            lost.cancelled().await;
            w.cancel();
        });
        Session {
            publisher,
            acks,
            token,
            work,
        }
    }
}

impl Drop for Session {
    /// A session dropped without its end being signalled (its setup failed half-way) still
    /// ends what waits on it: the `work` watcher, the ack batcher.
    fn drop(&mut self) {
        self.token.cancel();
    }
}

struct Item {
    delivery: Delivery,
    job: Job,
    session: Arc<Session>,
    /// Redelivered by the broker or returned from a delay queue (see `Pipeline::process`).
    same_message: bool,
}

/// A webhook event about a customer, processed in that customer's lane: after their jobs in
/// flight, so a status never overtakes the send it reports on.
struct WebhookItem {
    from: EventMessage,
    event: Event,
    session: Arc<Session>,
}

/// The broker message a webhook event came in, acked once the event is applied.
enum EventMessage {
    /// A message of its own.
    Own(Box<Delivery>),
    /// One of the statuses of a batch (see [`crate::webhook::batch`]); `bytes` are the event's
    /// as a message of its own would have had them (its identity).
    Batch {
        batch: Arc<StatusBatch>,
        bytes: Vec<u8>,
    },
}

impl EventMessage {
    fn bytes(&self) -> &[u8] {
        match self {
            EventMessage::Own(d) => &d.data,
            EventMessage::Batch { bytes, .. } => bytes,
        }
    }

    /// Acks the message, or the batch once its last status is applied.
    async fn applied(&self, session: &Session) -> Result<(), SettleError> {
        match self {
            EventMessage::Own(d) => ack(session, d).await,
            EventMessage::Batch { batch, .. } => {
                if batch.left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
                    ack(session, &batch.delivery).await
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// A batch of statuses, its events spread over their numbers' lanes. A status that cannot be
/// applied ends the session (`settle_failed`) without counting down, so the batch is never
/// acked here and the broker redelivers it whole; the statuses already applied are then
/// recognised as applied (their delivery rows) and only counted.
struct StatusBatch {
    delivery: Delivery,
    /// Statuses not applied yet.
    left: std::sync::atomic::AtomicUsize,
}

/// A consent event, applied in its number's lane: after the number's jobs already taken, before
/// the ones taken after it.
struct ConsentItem {
    delivery: Delivery,
    event: ConsentEvent,
    session: Arc<Session>,
    /// Came through `sendwell.jobs` as a question request: this shard owns the number and
    /// asks the double opt-in question.
    ask: bool,
    /// Published by `sendwell consent import`: history from a CRM, not a customer opting in
    /// right now, so nobody is asked "are you sure?".
    imported: bool,
}

/// A message refused as a job (malformed, invalid, forged) whose id is readable: settled in the
/// lane of that id, after every copy of the id taken before it, so it can tell whether the id
/// has another life (a job finished, running, or waiting in a delay queue) before it answers
/// `invalid` for it.
struct InvalidItem {
    delivery: Delivery,
    refused: Box<Refused>,
    session: Arc<Session>,
}

/// What a lane runs. The larger items are boxed: a lane's task holds its `Work` (twice, with the
/// next one), and a webhook event, the most frequent work of all, spawns one.
enum Work {
    Job(Box<Item>),
    Invalid(Box<InvalidItem>),
    Webhook(WebhookItem),
    Consent(Box<ConsentItem>),
}

impl Work {
    fn session(&self) -> &Arc<Session> {
        match self {
            Work::Job(i) => &i.session,
            Work::Invalid(i) => &i.session,
            Work::Webhook(w) => &w.session,
            Work::Consent(c) => &c.session,
        }
    }

    /// The job id this work holds a place for in `Lanes::ids`.
    fn id(&self) -> Option<&str> {
        match self {
            Work::Job(i) => Some(&i.job.id),
            Work::Invalid(i) => i.refused.id.as_deref(),
            _ => None,
        }
    }
}

/// A lane holds at most this many waiting jobs; more for one recipient are deferred, so one
/// busy recipient cannot take the whole prefetch and stall every other recipient of the shard.
pub const MAX_LANE_WAITING: usize = 64;

/// A job that could not be settled is still unacked on a channel that may be healthy: without
/// help it would hold its prefetch slot until some unrelated reconnect. Ending the session makes
/// the broker redeliver it (and everything else unacked) on a fresh connection.
///
/// While the state store cannot be written (a full disk), a store error waits for it to come
/// back before ending the session: ending it at once would make the broker redeliver every
/// unacked job again and again, each time counting toward its delivery limit.
fn settle_failed(session: &Session, result: Result<(), SettleError>, what: &str) {
    if let Err(e) = result {
        if matches!(&e, SettleError::Store(s) if s.is_io()) && crate::health::store_unwritable() {
            let token = session.token.clone();
            tokio::spawn(async move {
                while crate::health::store_unwritable() && !token.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                token.cancel();
            });
            return;
        }
        tracing::warn!(error = %e, "Could not {what}; reconnecting so the broker redelivers it.");
        session.token.cancel();
    }
}

#[derive(Default)]
struct Lanes {
    /// Work waiting behind running work of the same lane (recipient), in arrival order.
    waiting: HashMap<Arc<str>, VecDeque<Work>>,
    /// Job ids currently queued or running, with their lane and how many copies, so a second
    /// copy of an id (a re-publish, even with another recipient) waits behind the first.
    ids: HashMap<Arc<str>, (Arc<str>, u32)>,
}

impl Lanes {
    /// Counts one more copy of `id` in flight; returns the lane it runs in: the lane of the
    /// copies already queued or running, else `lane()`.
    fn hold_place(&mut self, id: &str, lane: impl FnOnce() -> Arc<str>) -> Arc<str> {
        match self.ids.get_mut(id) {
            Some((key, n)) => {
                *n += 1;
                key.clone()
            }
            None => {
                let key = lane();
                self.ids.insert(id.into(), (key.clone(), 1));
                key
            }
        }
    }
}

/// Shared by every session: the lanes outlive connections, so a job redelivered after a
/// reconnect queues behind its still-running first copy instead of racing it.
pub struct Worker {
    pub pipeline: Arc<Pipeline>,
    decoder: Decoder,
    pub names: Names,
    lanes: Mutex<Lanes>,
    /// Applies webhook events (statuses, inbound messages, account changes).
    webhooks: Applier,
    /// Consent: the store every job is checked against, and the conversation around it.
    consent: Arc<ConsentFlow>,
    consent_decoder: EventDecoder,
    /// sendwell's broker user: stamped on what it publishes to itself, and required of every
    /// message that carries an `x-sendwell-*` header (see `amqp::provenance`).
    identity: Identity,
    pub tracker: TaskTracker,
    shutdown: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
enum SettleError {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("ack: {0}")]
    Ack(#[from] lapin::Error),
    #[error(transparent)]
    Batch(#[from] super::acks::AckError),
    #[error(transparent)]
    Store(#[from] crate::store::LedgerError),
}

impl Worker {
    pub fn new(
        pipeline: Arc<Pipeline>,
        decoder: Decoder,
        webhooks: Applier,
        consent: (Arc<ConsentFlow>, EventDecoder),
        names: Names,
        identity: Identity,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            pipeline,
            decoder,
            webhooks,
            consent: consent.0,
            consent_decoder: consent.1,
            names,
            identity,
            lanes: Mutex::new(Lanes::default()),
            tracker: TaskTracker::new(),
            shutdown,
        }
    }

    /// The daemon's shutdown (a session's `work` ends with it).
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// sendwell's identity on the broker (probes are stamped with it).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Whether a delivery is a probe: the header, on a message the broker vouches sendwell
    /// published. A message with the header and without the voucher is no probe: it goes to
    /// [`Worker::handle`] like any other, which refuses it as forged.
    pub fn is_probe(&self, delivery: &Delivery) -> bool {
        self.identity.vouched(&delivery.properties)
            && delivery
                .properties
                .headers()
                .as_ref()
                .is_some_and(|h| h.inner().contains_key(HEADER_PROBE))
    }

    /// Acks a probe: it only told the broker's choice, so it is never processed as a job, and
    /// never logged (one would come every 2 s per standby); the counter counts it.
    pub fn ack_probe(self: &Arc<Self>, delivery: Delivery, session: &Arc<Session>) {
        crate::metrics::probe_received();
        let session = session.clone();
        self.tracker.spawn(async move {
            let r = ack(&session, &delivery).await;
            settle_failed(&session, r, "ack a probe");
        });
    }

    /// Takes one delivery from the consumer loop; never blocks on I/O.
    pub fn handle(self: &Arc<Self>, delivery: Delivery, session: &Arc<Session>) {
        if let Some(claim) = self
            .identity
            .forged_claim(&delivery.properties, delivery.exchange.as_str())
        {
            let detail = format!(
                "header {claim} claims the message comes from sendwell, but the broker does not vouch for it (its user_id is not sendwell's broker user)"
            );
            return self.refuse_forged(delivery, session, detail);
        }
        match header_str(&delivery.properties, HEADER_KIND) {
            Some(KIND_WEBHOOK) => return self.handle_webhook(delivery, session),
            Some(KIND_STATUS_BATCH) => return self.handle_status_batch(delivery, session),
            Some(KIND_CONSENT_QUESTION) => return self.handle_consent(delivery, session, true),
            _ => {}
        }
        crate::metrics::job_received();
        let decoded = self.decoder.decode(&delivery.data);
        if let Ok(job) = &decoded
            && let Some(due) = header_i64(&delivery.properties, HEADER_DUE)
            && due > Timestamp::now().as_millisecond() + 50
        {
            // Back from a delay tier shorter than the whole wait: wait some more (through
            // `sendwell.jobs` again, so it comes back to whichever shard owns the recipient
            // then: see `delay`).
            let this = self.clone();
            let session = session.clone();
            let digits = job.to.digits().to_string();
            self.tracker.spawn(async move {
                let until = Timestamp::from_millisecond(due).unwrap_or(Timestamp::now());
                let attempts = header_i64(&delivery.properties, HEADER_ATTEMPTS).unwrap_or(0);
                let r = this
                    .delay(&session, &delivery, &digits, until, attempts as u32)
                    .await;
                settle_failed(&session, r, "re-delay a job");
            });
            return;
        }
        match decoded {
            Err(refused) => self.refuse(delivery, session, refused),
            Ok(job) if delivery.routing_key.as_str() != job.to.digits() => {
                // Published with a key that is not the recipient's digits (a publisher's bug),
                // or back from a delay queue of an older sendwell (those return to their shard
                // queue by name, whichever shard owns the recipient now). On another shard than
                // the recipient's, it would be sent beside the recipient's other jobs there
                // (caps and pacing kept by two instances) and its id could escape that shard's
                // ledger; sent on with the right key, it reaches the recipient's shard, whose
                // ledger dedupes it.
                self.reroute(delivery, session, &job);
            }
            Ok(job) => self.schedule(Item {
                // A copy back from our own delay queue is, like a broker redelivery, a copy of
                // a message already taken: if its job is done, it is acked without a
                // `duplicate` event (dead-lettering is at-least-once and may repeat it).
                same_message: delivery.redelivered
                    || header_i64(&delivery.properties, HEADER_ATTEMPTS).is_some(),
                delivery,
                job,
                session: session.clone(),
            }),
        }
    }

    /// Runs `work` in lane `key`: now if the lane is idle, else after what waits there.
    fn enqueue(self: &Arc<Self>, key: Arc<str>, work: Work) {
        {
            let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
            match lanes.waiting.get_mut(&key) {
                Some(q) => {
                    q.push_back(work);
                    return;
                }
                None => {
                    lanes.waiting.insert(key.clone(), VecDeque::new());
                }
            }
        }
        let this = self.clone();
        self.tracker
            .spawn(async move { this.run_lane(key, work).await });
    }

    /// Takes one consent event (from `sendwell.consent.<shard>`, or a question request routed
    /// here through `sendwell.jobs`). An invalid event is dead-lettered with its reason.
    pub fn handle_consent(self: &Arc<Self>, delivery: Delivery, session: &Arc<Session>, ask: bool) {
        if !ask
            && let Some(claim) = self
                .identity
                .forged_claim(&delivery.properties, delivery.exchange.as_str())
        {
            // Upstream may publish consent events, but not claim to be `sendwell consent
            // import` (imported opt-ins are not asked the double opt-in question).
            let detail = format!(
                "header {claim} claims the consent event comes from sendwell, but the broker does not vouch for it (its user_id is not sendwell's broker user)"
            );
            crate::metrics::consent_event("invalid", "dead_lettered");
            let this = self.clone();
            let session = session.clone();
            self.tracker.spawn(async move {
                let r = this.dead_letter(&session, &delivery, FORGED, &detail).await;
                settle_failed(&session, r, "dead-letter a forged consent event");
                if let Some(unlogged) = crate::metrics::log_due("consent", FORGED) {
                    tracing::warn!(
                        detail,
                        unlogged,
                        "Forged consent event dead-lettered; nothing applied (one line per reason a minute at most; sendwell_jobs_dead_lettered_total counts each)."
                    );
                }
            });
            return;
        }
        match self
            .consent_decoder
            .decode(&delivery.data, Timestamp::now())
        {
            Err(invalid) => {
                crate::metrics::consent_event("invalid", "dead_lettered");
                let this = self.clone();
                let session = session.clone();
                self.tracker.spawn(async move {
                    let r = this
                        .dead_letter(&session, &delivery, invalid.reason, &invalid.detail)
                        .await;
                    settle_failed(&session, r, "dead-letter an invalid consent event");
                    // A parser's message can quote the offending value (a number given as
                    // an integer): only our own details are logged, as for jobs.
                    let detail = if invalid.reason == "malformed" {
                        "(see the dead-letter header)"
                    } else {
                        invalid.detail.as_str()
                    };
                    if let Some(unlogged) =
                        crate::metrics::log_due("consent", invalid.reason)
                    {
                        tracing::warn!(
                            reason = invalid.reason,
                            detail,
                            unlogged,
                            "Invalid consent event dead-lettered (one line per reason a minute at most)."
                        );
                    }
                });
            }
            Ok(event) => {
                let key: Arc<str> = event.to.as_str().into();
                let imported =
                    header_str(&delivery.properties, crate::consent::tools::HEADER_ORIGIN)
                        == Some("consent_import");
                self.enqueue(
                    key,
                    Work::Consent(Box::new(ConsentItem {
                        delivery,
                        event,
                        session: session.clone(),
                        ask,
                        imported,
                    })),
                );
            }
        }
    }

    /// Applies a consent event; on the number's own shard, asks the double opt-in question.
    async fn settle_consent(&self, item: &ConsentItem) -> Result<(), SettleError> {
        let ev = &item.event;
        let applied = self.consent.store.apply(ev).await?;
        crate::metrics::consent_event(ev.kind.as_str(), applied.as_str());
        crate::metrics::consent_cache_entries(self.consent.store.cached_entries());
        if applied == Applied::Erased {
            self.pipeline
                .meta
                .forget_inbound(ev.to.digits(), ev.at.as_millisecond());
            self.pipeline.limits.forget(ev.to.digits());
            tracing::info!(to = %ev.to.masked(), "Number erased.");
        }
        if item.ask {
            if let Some(out) = self.consent.question(ev).await?
                && !self.send_consent_message(&out, ev).await
            {
                self.consent.question_failed(ev).await?;
            }
        } else if applied != Applied::Void && !item.imported && self.consent.wants_question(ev) {
            // Every instance hears every opt-in; only the shard that owns the number asks.
            let mut headers = FieldTable::default();
            headers.insert(
                ShortString::from(HEADER_KIND),
                AMQPValue::LongString(LongString::from(KIND_CONSENT_QUESTION)),
            );
            item.session
                .publisher
                .publish(
                    JOBS_EXCHANGE,
                    ev.to.digits(),
                    &ev.to_json(),
                    self.identity.stamp(json_properties().with_headers(headers)),
                    true,
                )
                .await?;
        }
        ack(&item.session, &item.delivery).await
    }

    /// Sends a consent message (question, STOP confirmation) on the account; true when the
    /// Cloud API accepted it. A few quick tries: these are conversational, late is useless.
    async fn send_consent_message(&self, out: &Outgoing, ev: &ConsentEvent) -> bool {
        let Some(account) = self.pipeline.accounts.get(&out.account) else {
            return false;
        };
        for attempt in 1..=3u32 {
            // Consent messages are Cloud API calls like any other: they take the account's
            // throughput cell and the pair's pacing cell, waiting inline (there is no job to
            // defer; the customer just wrote, so the wait is short).
            if self
                .pipeline
                .limits
                .pass_inline(&out.account, ev.to.digits(), &self.shutdown)
                .await
                .is_err()
            {
                return false;
            }
            let token = account.token();
            match self
                .pipeline
                .api
                .send(
                    &account.config.phone_number_id,
                    token.expose(),
                    out.body.clone(),
                )
                .await
            {
                Ok(ok) => {
                    // The answer names the number's WhatsApp ID, as for any send: the reply
                    // (YES, STOP) may come from that ID.
                    if let Some(id) = ok.wa_id.as_deref().map(|i| i.trim_start_matches('+'))
                        && let Ok(true) = self.consent.store.learn_wa_id(ev.to.digits(), id).await
                    {
                        crate::metrics::wa_id_learned();
                    }
                    crate::metrics::consent_message(&out.account, out.kind, "sent");
                    // One per opt-in asked and per STOP answered: a line each would scale
                    // with traffic.
                    if let Some(unlogged) =
                        crate::metrics::log_hourly(("consent_message_sent", &out.account, out.kind))
                    {
                        tracing::info!(to = %ev.to.masked(), kind = out.kind, unlogged, "Consent message sent (logged once an hour per account and kind; sendwell_consent_messages_total counts each).");
                    }
                    return true;
                }
                Err(f) if f.class == crate::cloud_api::FailureClass::Retryable && attempt < 3 => {
                    if f.code == Some(130429) {
                        self.pipeline.limits.throttled(&out.account);
                    }
                    tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
                }
                Err(f) => {
                    crate::metrics::consent_message(&out.account, out.kind, "failed");
                    if let Some(unlogged) = crate::metrics::log_hourly((
                        "consent_message_failed",
                        &out.account,
                        out.kind,
                    )) {
                        tracing::warn!(to = %ev.to.masked(), kind = out.kind, error = %f.message, unlogged, "A consent message could not be sent (logged once an hour per account and kind; sendwell_consent_messages_total with result failed counts each).");
                    }
                    return false;
                }
            }
        }
        false
    }

    fn handle_webhook(self: &Arc<Self>, delivery: Delivery, session: &Arc<Session>) {
        let event: Event = match serde_json::from_slice(&delivery.data) {
            Ok(e) => e,
            Err(e) => return self.keep_broken_event(delivery, session, e.to_string()),
        };
        self.take_event(EventMessage::Own(Box::new(delivery)), event, session);
    }

    /// A webhook event or status batch that cannot be read: only our own listener publishes
    /// these, so a broken one is dead-lettered (`malformed_webhook_event`) for inspection.
    fn keep_broken_event(
        self: &Arc<Self>,
        delivery: Delivery,
        session: &Arc<Session>,
        detail: String,
    ) {
        let this = self.clone();
        let session = session.clone();
        self.tracker.spawn(async move {
            let r = this
                .dead_letter(&session, &delivery, "malformed_webhook_event", &detail)
                .await;
            settle_failed(&session, r, "dead-letter a broken webhook event");
        });
    }

    /// Takes a batch of statuses (see [`crate::webhook::batch`]): each into its number's lane.
    fn handle_status_batch(self: &Arc<Self>, delivery: Delivery, session: &Arc<Session>) {
        let events = match crate::webhook::batch::decode(&delivery.data) {
            Ok(events) => events,
            Err(detail) => return self.keep_broken_event(delivery, session, detail),
        };
        let batch = Arc::new(StatusBatch {
            left: events.len().into(),
            delivery,
        });
        for (event, bytes) in events {
            let from = EventMessage::Batch {
                batch: batch.clone(),
                bytes,
            };
            self.take_event(from, event, session);
        }
    }

    /// A customer's event goes in their lane; any other is applied at once.
    fn take_event(self: &Arc<Self>, from: EventMessage, event: Event, session: &Arc<Session>) {
        let session = session.clone();
        match event.recipient.clone() {
            Some(digits) => {
                let key: Arc<str> = format!("+{digits}").into();
                self.enqueue(
                    key,
                    Work::Webhook(WebhookItem {
                        from,
                        event,
                        session,
                    }),
                );
            }
            None => {
                let this = self.clone();
                self.tracker.spawn(async move {
                    let r = this.settle_webhook(&session, &from, &event).await;
                    settle_failed(&session, r, "apply a webhook event");
                });
            }
        }
    }

    fn schedule(self: &Arc<Self>, item: Item) {
        let key = {
            let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
            let key = lanes.hold_place(&item.job.id, || item.job.to.as_str().into());
            match lanes.waiting.get_mut(&key) {
                Some(q) if q.len() >= MAX_LANE_WAITING => {
                    if let Some((_, n)) = lanes.ids.get_mut(&item.job.id) {
                        *n -= 1;
                        if *n == 0 {
                            lanes.ids.remove(&item.job.id);
                        }
                    }
                    drop(lanes);
                    self.defer_busy(item);
                    return;
                }
                _ => {}
            }
            key
        };
        self.enqueue(key, Work::Job(Box::new(item)));
    }

    /// A message that is not a valid job: answered `invalid` and dead-lettered. When its id is
    /// readable that happens in the id's lane (see [`InvalidItem`]); otherwise at once.
    fn refuse(self: &Arc<Self>, delivery: Delivery, session: &Arc<Session>, refused: Box<Refused>) {
        let id = refused
            .id
            .as_deref()
            .filter(|id| !id.is_empty() && id.len() <= MAX_LEDGERED_ID);
        let Some(id) = id else {
            let this = self.clone();
            let session = session.clone();
            self.tracker.spawn(async move {
                let r = this.settle_invalid(&session, &delivery, &refused).await;
                settle_failed(&session, r, "dead-letter an invalid job");
            });
            return;
        };
        // Its recipient, when readable: the lane of the id's other copies, and the shard that
        // owns the id (a copy published with another number's key goes on to that shard, as a
        // valid job would, so that only there is it answered `invalid`, or not at all).
        let to = refused
            .to
            .as_deref()
            .and_then(|t| crate::phone::parse_e164(t).ok());
        if let Some(to) = &to
            && delivery.routing_key.as_str() != to.digits()
            && header_i64(&delivery.properties, HEADER_ATTEMPTS).is_none()
        {
            return self.reroute_to(delivery, session, id, to);
        }
        let key = self
            .lanes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .hold_place(id, || match &to {
                Some(to) => to.as_str().into(),
                None => format!("id:{id}").into(),
            });
        self.enqueue(
            key,
            Work::Invalid(Box::new(InvalidItem {
                delivery,
                refused,
                session: session.clone(),
            })),
        );
    }

    /// A message that claims to come from sendwell without the broker vouching for it: refused
    /// like an invalid job (reason `forged_control`), whatever it would have changed.
    fn refuse_forged(self: &Arc<Self>, delivery: Delivery, session: &Arc<Session>, detail: String) {
        let invalid = Invalid::new(FORGED, detail);
        let refused = match self.decoder.decode(&delivery.data) {
            Ok(job) => Box::new(Refused {
                id: Some(job.id.to_string()),
                account: Some(job.account.to_string()),
                to: Some(job.to.as_str().to_string()),
                category: Some(job.category),
                invalid,
            }),
            Err(mut r) => {
                r.invalid = invalid;
                r
            }
        };
        self.refuse(delivery, session, refused);
    }

    /// Sends a job published with the wrong routing key on to `sendwell.jobs` with its
    /// recipient's digits, then acks it here. The copy keeps the original's properties and
    /// headers. A copy back from an old delay queue keeps its `x-sendwell-*` delay headers (its
    /// attempt count; `same_message` there): they were vouched for, or accepted as an old
    /// build's (forged claims are refused before this), so the copy is stamped as sendwell's.
    fn reroute(self: &Arc<Self>, delivery: Delivery, session: &Arc<Session>, job: &Job) {
        self.reroute_to(delivery, session, &job.id, &job.to);
    }

    fn reroute_to(
        self: &Arc<Self>,
        delivery: Delivery,
        session: &Arc<Session>,
        id: &str,
        to: &crate::job::Recipient,
    ) {
        if let Some(unlogged) = crate::metrics::job_rerouted() {
            tracing::warn!(
                id,
                to = %to.masked(),
                unlogged,
                "A job came with a routing key other than its recipient's digits (a publisher's wrong key, or a copy back from an older sendwell's per-shard delay queue); sent on with the right key (logged at most once a minute, counted in sendwell_jobs_rerouted_total)."
            );
        }
        let key = to.digits().to_string();
        let session = session.clone();
        let identity = self.identity.clone();
        self.tracker.spawn(async move {
            let headers = delivery.properties.headers().clone().unwrap_or_default();
            let ours = headers
                .inner()
                .keys()
                .any(|k| k.as_str().starts_with("x-sendwell-"));
            let mut props = carry_properties(&delivery, headers);
            if ours {
                props = identity.stamp(props);
            }
            let r = async {
                session
                    .publisher
                    .publish(JOBS_EXCHANGE, &key, &delivery.data, props, true)
                    .await?;
                ack(&session, &delivery).await
            }
            .await;
            settle_failed(&session, r, "re-route a job");
        });
    }

    fn defer_busy(self: &Arc<Self>, item: Item) {
        crate::metrics::job_deferred(&item.job.account, "recipient_busy");
        let this = self.clone();
        self.tracker.spawn(async move {
            let attempts = header_i64(&item.delivery.properties, HEADER_ATTEMPTS).unwrap_or(0);
            let until = Timestamp::now() + std::time::Duration::from_secs(5);
            let r = async {
                this.pipeline
                    .note_waiting(&item.job, attempts as u32)
                    .await?;
                this.delay(
                    &item.session,
                    &item.delivery,
                    item.job.to.digits(),
                    until,
                    attempts as u32,
                )
                .await
            }
            .await;
            settle_failed(&item.session, r, "defer a job of a busy recipient");
        });
    }

    /// Each kind of work's future is boxed here: inline, the largest (a job's `process`) made
    /// every lane's task as large, 12.6 KB allocated and copied for each status callback,
    /// the most frequent work of all (under 2.3 KB boxed; perf showed the copies and
    /// mimalloc's slow path for such blocks at about 10 % of the daemon's CPU with callbacks).
    async fn run_lane(self: Arc<Self>, key: Arc<str>, mut work: Work) {
        loop {
            if !self.shutdown.is_cancelled() && !work.session().token.is_cancelled() {
                match &work {
                    Work::Job(item) => {
                        crate::metrics::in_flight(1.0);
                        // Debug level: at info this span cost every job a registry entry and
                        // its fields formatted (1–2 % of the daemon's CPU in the load bench);
                        // the few lines logged inside `process` name the job themselves.
                        let span = tracing::debug_span!("job", id = ?item.job.id, account = %item.job.account);
                        // The session's `work`, not only the shutdown: a job waiting in here
                        // when the session is lost stops waiting and is not sent (see
                        // `Session::work`).
                        let disposition = Box::pin(
                            self.pipeline
                                .process(&item.job, item.same_message, &item.session.work)
                                .instrument(span),
                        )
                        .await;
                        let r = Box::pin(self.settle(item, disposition)).await;
                        settle_failed(&item.session, r, "settle a job");
                        crate::metrics::in_flight(-1.0);
                    }
                    Work::Invalid(i) => {
                        let r = Box::pin(self.settle_invalid(&i.session, &i.delivery, &i.refused))
                            .await;
                        settle_failed(&i.session, r, "dead-letter an invalid job");
                    }
                    Work::Webhook(w) => {
                        let r = Box::pin(self.settle_webhook(&w.session, &w.from, &w.event)).await;
                        settle_failed(&w.session, r, "apply a webhook event");
                    }
                    Work::Consent(c) => {
                        let r = Box::pin(self.settle_consent(c)).await;
                        settle_failed(&c.session, r, "apply a consent event");
                    }
                }
            }
            let next = {
                let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(id) = work.id()
                    && let Some((_, n)) = lanes.ids.get_mut(id)
                {
                    *n -= 1;
                    if *n == 0 {
                        lanes.ids.remove(id);
                    }
                }
                match lanes.waiting.get_mut(&key).and_then(|q| q.pop_front()) {
                    Some(next) => Some(next),
                    None => {
                        lanes.waiting.remove(&key);
                        None
                    }
                }
            };
            match next {
                Some(n) => work = n,
                None => return,
            }
        }
    }

    /// Applies a webhook event once: a repeat (same bytes) is only acked; otherwise what it
    /// implies is published with confirms, the event is recorded as applied, then acked.
    async fn settle_webhook(
        &self,
        session: &Session,
        from: &EventMessage,
        event: &Event,
    ) -> Result<(), SettleError> {
        use sha2::Digest;
        // A status keeps its record in its message's delivery row (see `records_itself`):
        // no `WebhookSeen` read or row for the bulk of callbacks.
        let records_itself = Applier::records_itself(event);
        let mut key = sha2::Sha256::digest(from.bytes()).to_vec();
        if event.recipient.is_none() {
            // An account-level event comes to every shard (the fanout), and each shard's
            // active instance applies it to its own memory (templates, tiers, quality): with
            // state shared on PostgreSQL, one shard's record must not make the others skip
            // theirs. A recipient's event goes to one shard only: after a failover or a
            // reshard, the one record still makes its repeat a repeat.
            key.extend_from_slice(&self.names.shard.to_be_bytes());
        }
        let ledger = &self.pipeline.ledger;
        // Status callbacks keep coming during a compaction: each waits for it here, parked,
        // not on a thread of its own in the reads below (see `Ledger::compacted`).
        ledger.compacted().await;
        if !records_itself && ledger.kv_get(Table::WebhookSeen, &key).await?.is_some() {
            crate::metrics::webhook_duplicate();
            return from.applied(session).await;
        }
        let crate::webhook::apply::Effects {
            publications,
            record,
            record_if_absent,
            billed,
        } = self.webhooks.apply(event, &key).await?;
        let mut learned = Vec::new();
        for p in &publications {
            if p.exchange == CONSENT_EXCHANGE
                && let Ok(ev) = self.consent_decoder.decode(&p.body, Timestamp::now())
            {
                // Applied here at once, so the number's next job (queued behind this event in
                // its lane) already sees it; every other instance learns it from the broker.
                let applied = self.consent.store.apply(&ev).await?;
                crate::metrics::consent_event(ev.kind.as_str(), applied.as_str());
                self.consent.answered(&ev).await?;
                // One reply per opt-out: not again for its copies under other forms.
                if applied == Applied::New && !p.derived {
                    learned.push(ev);
                }
            }
        }
        for p in &publications {
            session
                .publisher
                .publish(
                    p.exchange,
                    &p.routing_key,
                    &p.body,
                    json_properties(),
                    false,
                )
                .await?;
        }
        for ev in &learned {
            if let Some(out) = self.consent.opt_out_reply(ev) {
                self.send_consent_message(&out, ev).await;
            }
        }
        // What the confirmed publications made true (a delivery level reached), and that this
        // event is applied: one transaction, after the confirms (none when nothing changed).
        let now = Timestamp::now().as_millisecond();
        let mut ops: Vec<KvOp> = publications
            .into_iter()
            .flat_map(|p| p.after_confirm)
            .chain(record)
            .collect();
        if !records_itself {
            ops.push(KvOp::Put {
                table: Table::WebhookSeen,
                key,
                value: now.to_le_bytes().to_vec(),
            });
        }
        if !ops.is_empty() {
            ledger.kv_many(ops).await?;
        }
        if let Some((table, key, value)) = record_if_absent {
            ledger.kv_insert_if_absent(table, key, value).await?;
        }
        if let Some(b) = billed {
            b.count();
        }
        from.applied(session).await
    }

    async fn settle(&self, item: &Item, disposition: Disposition) -> Result<(), SettleError> {
        let job = &item.job;
        match disposition {
            Disposition::Finish(Outcome::Deferred {
                until,
                reason,
                attempts,
            }) => {
                crate::metrics::job_deferred(&job.account, reason);
                tracing::debug!(id = ?job.id, reason, %until, "Job deferred.");
                self.pipeline.note_waiting(job, attempts).await?;
                self.delay(
                    &item.session,
                    &item.delivery,
                    job.to.digits(),
                    until,
                    attempts,
                )
                .await
            }
            Disposition::Finish(outcome) => {
                let event = OutcomeEvent::for_job(
                    job,
                    &outcome,
                    Timestamp::now(),
                    self.pipeline.spend.prices().currency(),
                );
                let bytes = event.to_json();
                let routing_key = event.routing_key();
                let is_duplicate = outcome == Outcome::Duplicate;
                // For status callbacks that come without our job id: in the same transaction
                // as the final state.
                let mut wamid = match &outcome {
                    Outcome::Sent { wamid, .. } => vec![KvOp::Put {
                        table: Table::Wamids,
                        key: wamid.as_bytes().to_vec(),
                        value: job.id.as_bytes().to_vec(),
                    }],
                    _ => Vec::new(),
                };
                // And the number's index row, by which an erasure finds the job.
                wamid.extend(crate::store::index_job(
                    job.to.as_str(),
                    &job.id,
                    event.wamid.as_deref(),
                ));
                let mut recorded = !is_duplicate;
                if !is_duplicate
                    && let Err(e) = self
                        .pipeline
                        .finalize(&job.id, event.attempts, bytes.clone(), wamid)
                        .await
                {
                    // The writer holds a failed write for state.unwritable_grace; this error
                    // means it gave up (the daemon is stopping to be restarted). Any other
                    // outcome can be decided again after the restart. A message that went out
                    // cannot: left unacked, its redelivery would find the ledger's `Sending`
                    // and, for the categories that resend when in doubt, send it again. So its
                    // outcome is published and the job acked without the record (a later new
                    // publication of the id is answered `failed`/`ambiguous`, never sent).
                    if !matches!(outcome, Outcome::Sent { .. }) {
                        return Err(e.into());
                    }
                    crate::metrics::sent_unrecorded();
                    if let Some(unlogged) = crate::metrics::sent_unrecorded_log() {
                        tracing::error!(id = ?job.id, account = %job.account, error = %e, unlogged, "A sent job's outcome could not be recorded in the state store; published and acked without the record, so it is not sent again.");
                    }
                    recorded = false;
                }
                self.publish_outcome(item, &routing_key, &bytes, recorded)
                    .await?;
                crate::metrics::job_finished(&job.account, outcome.status(), outcome.reason());
                // Publish to final outcome, from the AMQP timestamp (whole seconds; kept on
                // copies through the delay queues), when the publisher set one.
                if let Some(ts) = *item.delivery.properties.timestamp() {
                    let age_ms = Timestamp::now().as_millisecond() - (ts as i64) * 1000;
                    crate::metrics::job_age(
                        &job.account,
                        outcome.status(),
                        Duration::from_millis(age_ms.max(0) as u64),
                    );
                }
                // Every job's line is debug (`sendwell_jobs_finished_total` counts each): a
                // sent job is thousands a second, and a campaign's suppressed or capped jobs can
                // be as many, which would flood the journal (journald's default rate limit drops
                // most of them anyway) and make every job pay a write to stderr. An outcome
                // other than `sent` is worth reading, so at info once an hour per account,
                // status and reason, with how many went unlogged since and the job that
                // opened the hour as example. The id is printed quoted (`?`): an upstream's id
                // may hold spaces and `=`, which unquoted would read as fields of their own.
                macro_rules! finished {
                    ($level:ident, $message:literal $(, $unlogged:ident)?) => {
                        tracing::$level!(
                            id = ?job.id,
                            account = %job.account,
                            to = %job.to.masked(),
                            status = outcome.status(),
                            reason = outcome.reason().unwrap_or(""),
                            attempts = event.attempts,
                            $($unlogged,)?
                            $message
                        )
                    };
                }
                let hourly = (!matches!(outcome, Outcome::Sent { .. }))
                    .then(|| {
                        crate::metrics::log_hourly((
                            "job_finished",
                            &*job.account,
                            outcome.status(),
                            outcome.reason(),
                        ))
                    })
                    .flatten();
                match hourly {
                    Some(unlogged) => finished!(
                        info,
                        "Job finished (a job other than sent is logged once an hour per account, status and reason; sendwell_jobs_finished_total counts each).",
                        unlogged
                    ),
                    None => finished!(debug, "Job finished."),
                }
                Ok(())
            }
            Disposition::Republish(bytes) => {
                self.publish_outcome(item, &stored_routing_key(&bytes), &bytes, true)
                    .await?;
                tracing::info!(id = ?job.id, "Republished the stored outcome of a job whose event was not confirmed before.");
                Ok(())
            }
            Disposition::AckOnly => {
                ack(&item.session, &item.delivery).await?;
                Ok(())
            }
            Disposition::Abandon => {
                // A lost session: the broker has the job back already; nothing to nack.
                if !self.shutdown.is_cancelled() && !item.session.token.is_cancelled() {
                    // The store failed: give it a moment, and if it cannot be written (a full
                    // disk), wait until it can; then let the broker redeliver. Nacking sooner
                    // would only cycle the job toward the broker's delivery limit.
                    let ledger = &self.pipeline.ledger;
                    let store_back = async {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        ledger.wait_writable().await;
                    };
                    tokio::select! {
                        _ = self.shutdown.cancelled() => {}
                        _ = store_back => {
                            item.session.acks.forget(item.delivery.delivery_tag);
                            item.delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await?;
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Publishes a job's outcome event with a confirm, records that it was published (when it
    /// is the job's final outcome), then acks the job: in that order, so a crash at any point
    /// leaves a state the next delivery can finish from.
    async fn publish_outcome(
        &self,
        item: &Item,
        routing_key: &str,
        event: &[u8],
        is_final: bool,
    ) -> Result<(), SettleError> {
        item.session
            .publisher
            .publish(
                OUTCOMES_EXCHANGE,
                routing_key,
                event,
                json_properties().with_message_id(item.job.id.to_string().into()),
                false,
            )
            .await?;
        if is_final {
            self.pipeline.ledger.mark_published(&item.job.id).await?;
        }
        ack(&item.session, &item.delivery).await?;
        Ok(())
    }

    /// Sends the message to a delay queue, then acks. It goes through the headers exchange
    /// `sendwell.delay` (which picks the tier's queue by header) with the recipient's `digits` as
    /// routing key; the queue dead-letters it to `sendwell.jobs` with that key, so it comes back
    /// to the shard that owns the recipient when it is due, not to this one: after a shard is
    /// added or removed, that is where the recipient's new jobs go (`amqp::topology`).
    async fn delay(
        &self,
        session: &Session,
        delivery: &Delivery,
        digits: &str,
        until: Timestamp,
        attempts: u32,
    ) -> Result<(), SettleError> {
        let wait = (until - Timestamp::now())
            .unsigned_abs()
            .min(Duration::from_secs(86400 * 365));
        let wait = if until <= Timestamp::now() {
            Duration::ZERO
        } else {
            wait
        };
        let queue = self.names.delay_queue_for(wait);
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            ShortString::from(HEADER_DUE),
            AMQPValue::LongLongInt(until.as_millisecond()),
        );
        headers.insert(
            ShortString::from(HEADER_ATTEMPTS),
            AMQPValue::LongLongInt(attempts as i64),
        );
        headers.insert(
            ShortString::from(HEADER_DELAY_QUEUE),
            AMQPValue::LongString(LongString::from(queue.as_str())),
        );
        session
            .publisher
            .publish(
                DELAY_EXCHANGE,
                digits,
                &delivery.data,
                // Back on the shard queue, its x-sendwell-* headers must be vouched for.
                self.identity.stamp(carry_properties(delivery, headers)),
                true,
            )
            .await?;
        ack(session, delivery).await?;
        Ok(())
    }

    /// An unusable job: `invalid` outcome (when its id is readable), the original message to
    /// `sendwell.dead` with its reason, then ack. Nothing vanishes.
    async fn settle_invalid(
        &self,
        session: &Session,
        delivery: &Delivery,
        refused: &Refused,
    ) -> Result<(), SettleError> {
        let reason = refused.invalid.reason;
        let detail = &refused.invalid.detail;
        let id = refused
            .id
            .as_deref()
            .filter(|id| !id.is_empty() && id.len() <= 1024);
        // A readable id that has another life (finished, or waiting in a delay queue: both
        // leave a ledger row) keeps its own outcome: this broken copy is only dead-lettered.
        // Copies of the id that are queued or running are not a question: this one runs in
        // their lane, after those taken before it (see `refuse`). An id with a NUL can have no
        // other life (a valid id is printable) and PostgreSQL's text cannot hold it: not kept.
        let ledgered = id.filter(|i| i.len() <= MAX_LEDGERED_ID && !i.contains('\0'));
        let already_final = match ledgered {
            Some(i) => self.pipeline.ledger.get(i).await?.is_some(),
            None => false,
        };
        let event = id.filter(|_| !already_final).map(|id| OutcomeEvent {
            id,
            account: refused.account.as_deref().unwrap_or(""),
            to: refused.to.as_deref().unwrap_or(""),
            status: "invalid",
            reason: Some(reason),
            detail: Some(detail.clone()),
            wamid: None,
            attempts: 0,
            estimated_cost: None,
            at: Timestamp::now(),
            metadata: None,
            error_code: None,
            category: refused.category.map(Category::as_str),
        });
        let bytes = event.as_ref().map(|e| e.to_json());
        if let (Some(id), Some(bytes)) = (ledgered, &bytes)
            && !already_final
        {
            // Indexed by its number when it names one, so an erasure removes it too.
            let index = refused
                .to
                .as_deref()
                .and_then(|to| crate::store::index_job(to, id, None));
            self.pipeline
                .finalize(id, 0, bytes.clone(), index.into_iter().collect())
                .await?;
        }
        let dead = session.publisher.publish(
            DEAD,
            delivery.routing_key.as_str(),
            &delivery.data,
            carry_properties(delivery, dead_headers(delivery, reason, detail)),
            true,
        );
        let outcome = async {
            match &bytes {
                Some(b) => {
                    session
                        .publisher
                        .publish(
                            OUTCOMES_EXCHANGE,
                            &format!("invalid.{reason}"),
                            b,
                            json_properties(),
                            false,
                        )
                        .await
                }
                None => Ok(()),
            }
        };
        let (d, o) = tokio::join!(dead, outcome);
        d?;
        o?;
        if let (Some(id), Some(_)) = (ledgered, &bytes)
            && !already_final
        {
            self.pipeline.ledger.mark_published(id).await?;
        }
        ack(session, delivery).await?;
        crate::metrics::dead_lettered(reason);
        // Only configured account names become label values; anything else is "unknown".
        let account = refused
            .account
            .as_deref()
            .filter(|a| self.decoder.knows_account(a))
            .unwrap_or("unknown");
        crate::metrics::job_finished(account, "invalid", Some(reason));
        // A parser's message can quote the offending value (a number given as an integer, say),
        // so only our own details are logged; the full detail is in the outcome and the header.
        let logged = if reason == "malformed" {
            "(see the dead-letter header)"
        } else {
            detail.as_str()
        };
        // A publisher with a bug (or an attacker) can send thousands: one line per reason a
        // minute, the counters count each.
        if let Some(unlogged) = crate::metrics::log_due("job", reason) {
            tracing::warn!(
                id = id.unwrap_or("(unreadable)"),
                reason,
                detail = logged,
                unlogged,
                "Invalid job dead-lettered (one line per reason a minute at most; sendwell_jobs_dead_lettered_total counts each)."
            );
        }
        Ok(())
    }
}

/// Publishes a delivery to `sendwell.dead` with its reason, then acks it.
impl Worker {
    async fn dead_letter(
        &self,
        session: &Session,
        delivery: &Delivery,
        reason: &'static str,
        detail: &str,
    ) -> Result<(), SettleError> {
        session
            .publisher
            .publish(
                DEAD,
                delivery.routing_key.as_str(),
                &delivery.data,
                carry_properties(delivery, dead_headers(delivery, reason, detail)),
                true,
            )
            .await?;
        crate::metrics::dead_lettered(reason);
        ack(session, delivery).await
    }
}

fn dead_headers(delivery: &Delivery, reason: &str, detail: &str) -> FieldTable {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from(HEADER_REASON),
        AMQPValue::LongString(LongString::from(format!("{reason}: {detail}"))),
    );
    headers.insert(
        ShortString::from(HEADER_REASON_CODE),
        AMQPValue::LongString(LongString::from(reason)),
    );
    headers
}

fn header_str<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a str> {
    match p.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// Acks with the session's next batch (see `amqp::acks`).
async fn ack(session: &Session, delivery: &Delivery) -> Result<(), SettleError> {
    Ok(session
        .acks
        .ack(delivery.delivery_tag, &delivery.acker)
        .await?)
}

/// Properties for a copy of a delivered message: the original's (its publish timestamp stays, so
/// publish-to-outcome age stays honest) with new headers and no per-message TTL.
fn carry_properties(delivery: &Delivery, headers: FieldTable) -> BasicProperties {
    let p = &delivery.properties;
    let mut out = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    out
}

fn header_i64(p: &BasicProperties, name: &str) -> Option<i64> {
    let h = p.headers().as_ref()?;
    match h.inner().get(name)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(*v as i64),
        AMQPValue::LongUInt(v) => Some(*v as i64),
        AMQPValue::ShortInt(v) => Some(*v as i64),
        AMQPValue::Timestamp(v) => Some(*v as i64),
        _ => None,
    }
}

/// The routing key of a stored outcome event (`status` or `status.reason`).
fn stored_routing_key(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Keys {
        status: String,
        reason: Option<String>,
    }
    match serde_json::from_slice::<Keys>(bytes) {
        Ok(Keys {
            status,
            reason: Some(r),
        }) => format!("{status}.{r}"),
        Ok(Keys { status, .. }) => status,
        Err(_) => "unknown".into(),
    }
}
