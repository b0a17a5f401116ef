//! `process(job) -> Disposition`: everything sendwell decides about one job, readable top to
//! bottom. Stages, in data-path order, each in its own file:
//! [`decode`] (in the consumer, before scheduling) → [`dedupe`] → time window → consent →
//! the recipient's state read through (its first job in an epoch: [`limits::epoch`]) →
//! what Meta told us by webhook → [`spend`] guard → [`limits`] → [`dispatch`] with [`accounts`]
//! pausing (the limits' waits and counts sit inside the dispatch loop, right before each Cloud
//! API call).
//!
//! `dispatch` makes attempts until one ends the job, each in these steps (methods of the same
//! names): `admit` (a paused account sends only its probe) → `clear_limits` (tier, throughput
//! and pacing, quiet hours, caps) → `record_sending` → `call_api` → `sent`, or `after_failure`:
//! a final failure, `pause_account`, or `retry_or_give_up` (here after a short wait, or
//! deferred).
//!
//! The pipeline knows nothing of AMQP: the consumer turns a [`Disposition`] into ledger writes,
//! publishes and acks.

pub mod accounts;
pub mod decode;
pub mod dedupe;
pub mod dispatch;
pub mod limits;
pub mod meta_state;
pub mod spend;

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::cloud_api::{ApiFailure, CloudApi, FailureClass, SendOk, request};
use crate::config::{RetryConfig, TemplatesWithoutOptOut};
use crate::consent::{ConsentStore, Decision};
use crate::job::{Category, Content, Job, Outcome};
use crate::store::{KvOp, Ledger, LedgerEntry, LedgerError, LedgerState};
use accounts::{AccountRuntime, Accounts, Admit};
use dedupe::Seen;
use limits::{Check, Held, Limits, Reservation};

/// What the consumer must do with the message after processing.
#[derive(Debug, PartialEq)]
pub enum Disposition {
    /// Record (if final), publish the outcome event (or defer), then ack.
    Finish(Outcome),
    /// The job already finished but its event was never confirmed: publish this stored event
    /// again, then ack.
    Republish(Vec<u8>),
    /// Already finished and published; this is the same message again: just ack.
    AckOnly,
    /// Shutting down mid-job, or the store failed: leave it unacked; the broker redelivers it.
    Abandon,
}

/// Everything `process` needs; shared by all job tasks.
pub struct Pipeline {
    pub ledger: Ledger,
    pub api: CloudApi,
    pub accounts: Accounts,
    pub retry: RetryConfig,
    pub clock: SharedClock,
    /// What webhooks told us: service windows, paused templates, restricted accounts.
    pub meta: Arc<meta_state::MetaState>,
    /// Set when the webhook listener runs; without it nothing tells us about windows and
    /// templates, so those checks are off.
    pub webhook_policy: Option<WebhookPolicy>,
    /// Consent: every marketing and utility job must have what its purpose's rule demands.
    pub consent: Arc<ConsentStore>,
    /// Throughput, pacing, daily tier, frequency caps, quiet hours.
    pub limits: Arc<Limits>,
    /// Estimated cost of each send, and the daily budget that holds marketing back.
    pub spend: Arc<spend::Spend>,
    /// This instance's shard, named in every send's `biz_opaque_callback_data` so that the
    /// message's statuses come back here in batches (see [`crate::webhook::batch`]).
    pub shard: u16,
}

#[derive(Clone, Debug)]
pub struct WebhookPolicy {
    pub service_window: Duration,
    pub template_pause_max_wait: Duration,
}

/// One attempt at a send, as the dispatch steps pass it along.
struct Attempt<'a> {
    job: &'a Job,
    account: &'a AccountRuntime,
    /// The attempt is the paused account's one probe: if it ends before the Cloud API answers,
    /// the probe goes to the next job (`inconclusive`).
    probe: bool,
}

impl Attempt<'_> {
    /// This attempt ends without telling whether a paused account works again.
    fn inconclusive(&self) {
        if self.probe {
            self.account.probe_inconclusive();
        }
    }
}

impl Pipeline {
    /// Decides one job. `same_message`: this delivery is a copy of a message already taken
    /// (redelivered by the broker, or back from our own delay queue): when its job is done it is
    /// acked silently, while a new publication of a finished id gets a `duplicate` event.
    /// `shutdown`: the daemon stopping, or the job's broker session lost: every wait ends with
    /// `Abandon`, and no send is claimed once it is cancelled.
    pub async fn process(
        &self,
        job: &Job,
        same_message: bool,
        shutdown: &CancellationToken,
    ) -> Disposition {
        // A store that cannot be written (full disk) could record neither the send nor its
        // result: take no new job until it can. Waiting, not failing: the job holds its
        // prefetch slot instead of cycling through the broker toward its delivery limit.
        if !self.ledger.writable() {
            tokio::select! {
                _ = shutdown.cancelled() => return Disposition::Abandon,
                _ = self.ledger.wait_writable() => {}
            }
        }
        // A compaction (after an erasure) has the store alone for a moment: wait for it here,
        // parked, not on a thread of our own in the read below (see `Ledger::compacted`).
        if self.ledger.compacting() {
            tokio::select! {
                _ = shutdown.cancelled() => return Disposition::Abandon,
                _ = self.ledger.compacted() => {}
            }
        }
        // Dedupe: a job id is sent at most once.
        let seen = dedupe::check(&self.ledger, &job.id).await;
        // The entry as read: the send attempt is recorded only if it is still this one.
        let mut held = seen.as_ref().ok().and_then(Seen::held);
        let mut attempts = match seen {
            Ok(Seen::New) => 0,
            Ok(Seen::Resume { attempts }) => attempts,
            Ok(Seen::InDoubt { attempts }) if !same_message => {
                // `resend_ambiguous` covers the broker redelivering the very message that was
                // being sent (a crash mid-call). A new publication of the id is something else:
                // its first message is gone (dead-lettered at the broker's delivery limit and
                // replayed from `sendwell.dead`, or published again upstream), and may well
                // have been sent: it is never sent a second time.
                return Disposition::Finish(Outcome::Failed {
                    reason: "ambiguous",
                    detail: "an earlier message with this id was being sent when it was lost (daemon stopped, or dead-lettered by the broker): it may have reached the customer, and a new publication of an id in doubt is not sent again".into(),
                    code: None,
                    attempts,
                });
            }
            Ok(Seen::InDoubt { attempts }) => {
                if !self.retry.resend_ambiguous(job.category) {
                    return Disposition::Finish(Outcome::Failed {
                        reason: "ambiguous",
                        detail: format!(
                            "an earlier attempt may have reached the Cloud API (the daemon stopped mid-call); {} jobs are not resent when in doubt",
                            job.category
                        ),
                        code: None,
                        attempts,
                    });
                }
                attempts
            }
            Ok(Seen::Final { event, published }) => {
                return match (published, same_message) {
                    (false, _) => Disposition::Republish(event),
                    (true, true) => Disposition::AckOnly,
                    (true, false) => Disposition::Finish(Outcome::Duplicate),
                };
            }
            Err(e) => {
                Self::store_unreadable(job, &e);
                return Disposition::Abandon;
            }
        };

        // Time window: never before not_before, never after expires_at.
        let now = self.clock.now();
        if let Some(exp) = job.expires_at
            && now >= exp
        {
            return Disposition::Finish(Outcome::Expired {
                detail: format!("expired at {exp} before it could be sent"),
                attempts,
            });
        }
        if let Some(nb) = job.not_before
            && now < nb
        {
            return Disposition::Finish(Outcome::Deferred {
                until: nb,
                reason: "not_before",
                attempts,
            });
        }

        // Consent: nobody gets a message they did not ask for.
        if let Decision::Suppress { reason, detail } = self.consent.check(job, now) {
            return Disposition::Finish(Outcome::Suppressed { reason, detail });
        }
        if let Some(d) = self.opt_out_in_template(job) {
            return d;
        }

        // The recipient's caps, tier count, block and service windows as the database has
        // them, the first time this instance sees the recipient since it took the shard over
        // (another instance may have sent to it): before the first check that reads them.
        if let Err(e) = self.read_through(job).await {
            Self::store_unreadable(job, &e);
            return Disposition::Abandon;
        }

        // What Meta told us by webhook: paused templates, restrictions, service windows. Before
        // the limits: a job that cannot go at all should not wait for a cap.
        if let Some(policy) = &self.webhook_policy
            && let Some(d) = self.meta_checks(job, policy, attempts)
        {
            return d;
        }

        // Spend guard: a daily budget holds the guarded categories back once spent (on
        // PostgreSQL counted across instances: a moment's wait for the lease's renewal first).
        self.spend.wait_room(job, shutdown).await;
        if let Err(wait) = self.spend.check(job, now) {
            return self.defer(job, attempts, wait, "spend_budget");
        }

        // Limits: quiet hours, Meta's per-user marketing block, frequency caps.
        match self.limits.check(job, now) {
            Check::Go => {}
            Check::Defer { wait, reason } => return self.defer(job, attempts, wait, reason),
            Check::Suppress { reason, detail } => {
                return Disposition::Finish(Outcome::Suppressed { reason, detail });
            }
        }

        self.dispatch(job, &mut attempts, &mut held, shutdown).await
    }

    /// This instance took its shard over (the broker began delivering to it): what the previous
    /// active wrote since this one started is only in the database. Per-recipient limit state
    /// begins a new epoch (each recipient is read through at its first job), and templates,
    /// restrictions and learned tiers are read again. Call before the first job of the
    /// takeover is processed; an error (database unreachable) leaves the old templates and
    /// tiers in place: call again. Nothing to do on redb (one instance, one epoch).
    pub async fn takeover(&self) -> Result<(), LedgerError> {
        if self.limits.begin_epoch() == 0 {
            return Ok(());
        }
        self.meta.reload().await?;
        self.limits.reload_tiers(&self.ledger).await?;
        Ok(())
    }

    /// The set of live shards changed (a shard added or removed): recipients moved between
    /// shards, so per-recipient limit state begins a new epoch.
    pub fn shards_changed(&self) {
        self.limits.begin_epoch();
    }

    /// The recipient's limit state and service windows, read through from the store at its
    /// first job in the epoch (at once otherwise), together with every recipient arriving
    /// meanwhile.
    async fn read_through(&self, job: &Job) -> Result<(), LedgerError> {
        self.limits
            .first_sight(job.to.digits(), async |digits| {
                let now = self.clock.now();
                tokio::try_join!(
                    self.limits.read_recipients(&self.ledger, &digits, now),
                    self.meta.read_windows(self.limits.account_names(), &digits),
                )?;
                Ok(())
            })
            .await
    }

    /// A read the job needs failed: it stays queued. Every job in flight meets this in an
    /// outage: counted each, logged once a minute (the store's own line says when it fails and
    /// when it is back).
    fn store_unreadable(job: &Job, e: &LedgerError) {
        crate::metrics::store_read_failed();
        if let Some(unlogged) = crate::metrics::log_due("job", "store_unreadable") {
            tracing::error!(id = %job.id, account = %job.account, error = %e, unlogged, "State store unreadable; the job stays queued (logged at most once a minute; see sendwell_store_read_failures_total).");
        }
    }

    /// Stage 5: attempts until one ends the job, each in the steps the module docs list.
    async fn dispatch(
        &self,
        job: &Job,
        attempts: &mut u32,
        held: &mut Option<(LedgerState, u32)>,
        shutdown: &CancellationToken,
    ) -> Disposition {
        let Some(account) = self.accounts.get(&job.account) else {
            // Invariant: decode only admits configured accounts.
            return Disposition::Abandon;
        };
        let footer = match (&job.content, job.category) {
            (Content::Text(_), Category::Marketing) => account.marketing_footer(),
            _ => None,
        };
        let body = request::build_body(
            job,
            footer.as_deref(),
            &crate::webhook::opaque::callback_data(&job.id, self.shard),
        );
        // A template outside the customer's service window opens a business-initiated
        // conversation: it counts toward the portfolio's daily tier.
        let counts_for_tier = matches!(job.content, Content::Template(_))
            && !self.in_service_window(job, self.clock.now());
        let mut counted = Reservation::default();
        loop {
            let attempt = match self.admit(job, account, *attempts) {
                Ok(attempt) => attempt,
                Err(paused) => return paused,
            };
            let also = match self
                .clear_limits(&attempt, counts_for_tier, *attempts, &mut counted, shutdown)
                .await
            {
                Ok(also) => also,
                Err(held) => return held,
            };
            // `shutdown` also ends with the job's broker session (the consumer passes its
            // session's token): a session lost while this job waited above has given the job
            // back to the broker, and maybe to another instance already. Nothing is claimed
            // after that; the job is left to its redelivery. (Its counts were not written.)
            if shutdown.is_cancelled() {
                attempt.inconclusive();
                self.limits.release(job, &mut counted);
                return Disposition::Abandon;
            }
            if self
                .record_sending(&attempt, *attempts + 1, *held, also, &mut counted)
                .await
                .is_err()
            {
                return Disposition::Abandon;
            }
            *attempts += 1;
            *held = Some((LedgerState::Sending, *attempts));
            let failure = match self.call_api(&attempt, &body, shutdown).await {
                Ok(ok) => return self.sent(&attempt, ok, *attempts).await,
                Err(failure) => failure,
            };
            if let Some(done) = self
                .after_failure(&attempt, failure, attempts, &mut counted, shutdown)
                .await
            {
                return done;
            }
            // Attempting again inline: `retry_or_give_up` recorded the job as pending.
            *held = Some((LedgerState::Pending, *attempts));
        }
    }

    /// Dispatch, [`accounts`]: a paused account sends nothing but, now and then, one probe.
    fn admit<'a>(
        &self,
        job: &'a Job,
        account: &'a AccountRuntime,
        attempts: u32,
    ) -> Result<Attempt<'a>, Disposition> {
        match account.admit(self.accounts.probe_interval()) {
            Admit::Wait(wait) => Err(self.defer(job, attempts, wait, "account_paused")),
            admit => Ok(Attempt {
                job,
                account,
                probe: admit == Admit::Probe,
            }),
        }
    }

    /// Dispatch, [`limits`], right before the call: the daily tier (when the send counts for
    /// it), throughput and recipient pacing (waited here up to `inline_max_delay`), quiet hours,
    /// then the frequency caps. `Ok`: the counts to write with the attempt; `Err`: the job's
    /// answer, after giving back what this pass had counted.
    async fn clear_limits(
        &self,
        attempt: &Attempt<'_>,
        counts_for_tier: bool,
        attempts: u32,
        counted: &mut Reservation,
        shutdown: &CancellationToken,
    ) -> Result<Vec<KvOp>, Disposition> {
        let job = attempt.job;
        let mut also = Vec::new();
        if counts_for_tier {
            self.limits.tier_room(job, shutdown).await;
            match self
                .limits
                .reserve_tier(job, false, self.clock.now(), counted)
            {
                Ok(op) => also.extend(op),
                Err(wait) => {
                    attempt.inconclusive();
                    return Err(self.defer(job, attempts, wait, "messaging_limit"));
                }
            }
        }
        if let Err(held) = self
            .limits
            .pass(job, self.retry.inline_max_delay, shutdown)
            .await
        {
            attempt.inconclusive();
            self.give_back(job, counted).await;
            return Err(match held {
                Held::Pacing(wait) => self.defer(job, attempts, wait, "recipient_pacing"),
                Held::ShuttingDown => Disposition::Abandon,
            });
        }
        if let Some(wait) = self.limits.quiet_now(job, self.clock.now()) {
            attempt.inconclusive();
            self.give_back(job, counted).await;
            return Err(self.defer(job, attempts, wait, "quiet_hours"));
        }
        // The waits above may have lasted (pacing) or the process stalled: a tier count taken
        // from a global lease whose renewal is now too old may have been handed to another
        // instance meanwhile. Checked as late as can be; the claim's commit follows at once.
        if !self.limits.tier_lease_still_trusted(counted) {
            attempt.inconclusive();
            self.give_back(job, counted).await;
            return Err(self.defer(
                job,
                attempts,
                crate::pipeline::limits::tier::LEASE_RETRY,
                "messaging_limit",
            ));
        }
        also.extend(self.limits.reserve_caps(job, self.clock.now(), counted));
        Ok(also)
    }

    /// Dispatch: the attempt is recorded as `Sending` before the call, in one transaction with
    /// the limits' counts, so a redelivery after a crash mid-call knows the job is in doubt.
    /// It is a claim: written only if the job's entry is still `held` (what dedupe read, or
    /// this task wrote since), so of two deliveries of one id that race (two instances on one
    /// shared store), exactly one calls the Cloud API; the other's job goes back to the
    /// queue and is decided again from the entry the winner wrote. A failed write gives the
    /// counts back in memory only (nothing was written).
    async fn record_sending(
        &self,
        attempt: &Attempt<'_>,
        attempts: u32,
        held: Option<(LedgerState, u32)>,
        also: Vec<KvOp>,
        counted: &mut Reservation,
    ) -> Result<(), LedgerError> {
        let job = attempt.job;
        let entry = LedgerEntry {
            state: LedgerState::Sending,
            attempts,
            updated_ms: now_ms(),
            published: false,
            event: Vec::new(),
        };
        let recorded = self.ledger.claim(&job.id, entry, held, also).await;
        match &recorded {
            Err(LedgerError::ClaimLost) => {
                crate::metrics::claim_lost();
            }
            Err(e) => {
                tracing::error!(id = %job.id, account = %job.account, error = %e, "State store write failed; the job stays queued.");
            }
            Ok(()) => self.limits.recorded(counted),
        }
        if recorded.is_err() {
            attempt.inconclusive();
            self.limits.release(attempt.job, counted);
        }
        recorded
    }

    /// Dispatch: the Cloud API call, once the recipient's pacing lets it through the door,
    /// timed and counted by its answer.
    async fn call_api(
        &self,
        attempt: &Attempt<'_>,
        body: &[u8],
        shutdown: &CancellationToken,
    ) -> Result<SendOk, ApiFailure> {
        let (job, account) = (attempt.job, attempt.account);
        self.limits.at_the_door(job, shutdown).await;
        let token = account.token();
        let started = std::time::Instant::now();
        let result = self
            .api
            .send(
                &account.config.phone_number_id,
                token.expose(),
                body.to_vec(),
            )
            .await;
        let took = started.elapsed();
        match &result {
            Ok(_) => crate::metrics::api_request(&job.account, "ok", None, took),
            Err(f) => crate::metrics::api_request(&job.account, f.class.as_str(), f.code, took),
        }
        result
    }

    /// Dispatch: sent. The account works (again), the WhatsApp ID the answer named is kept, and
    /// the send's estimated cost counts against the spend budget.
    async fn sent(&self, attempt: &Attempt<'_>, ok: SendOk, attempts: u32) -> Disposition {
        let job = attempt.job;
        self.limits.sent(job);
        attempt.account.resume();
        if let Some(id) = &ok.wa_id {
            self.learn_wa_id(job, id).await;
        }
        let now = self.clock.now();
        let prices = self.spend.prices();
        let estimated_cost = spend::estimate(&prices, job, self.in_service_window(job, now), now);
        if let Some(cost) = estimated_cost {
            crate::metrics::estimated_cost(
                &job.account,
                job.category.as_str(),
                job.to.region(),
                prices.currency(),
                cost.0,
            );
            self.spend.add(&job.account, cost, now);
        }
        Disposition::Finish(Outcome::Sent {
            wamid: ok.wamid,
            attempts,
            estimated_cost,
        })
    }

    /// Dispatch: a failed attempt. What Meta's error says about the limits is learnt, the send
    /// stays counted only if it may have happened, and its class decides: a final failure, the
    /// account's problem, or a retry. `None`: attempt again now.
    async fn after_failure(
        &self,
        attempt: &Attempt<'_>,
        failure: ApiFailure,
        attempts: &mut u32,
        counted: &mut Reservation,
        shutdown: &CancellationToken,
    ) -> Option<Disposition> {
        let job = attempt.job;
        self.learn_from_failure(job, failure.code).await;
        if failure.class == FailureClass::Ambiguous {
            // It may have been sent: it stays counted, also if the job goes no further.
            counted.maybe_sent();
        } else {
            // An error answer means Meta did not send it: it does not count.
            self.give_back(job, counted).await;
        }
        let class = match failure.class {
            FailureClass::Ambiguous if !self.retry.resend_ambiguous(job.category) => {
                attempt.inconclusive();
                return Some(Disposition::Finish(Outcome::Failed {
                    reason: "ambiguous",
                    detail: format!(
                        "the Cloud API may have accepted it ({}); {} jobs are not resent when in doubt",
                        failure.message, job.category
                    ),
                    code: None,
                    attempts: *attempts,
                }));
            }
            FailureClass::Ambiguous => FailureClass::Retryable,
            c => c,
        };
        match class {
            FailureClass::Permanent => {
                attempt.inconclusive();
                Some(Disposition::Finish(Outcome::Failed {
                    reason: failure.reason,
                    detail: failure.message,
                    code: failure.code,
                    attempts: *attempts,
                }))
            }
            FailureClass::Account => Some(self.pause_account(attempt, &failure, attempts).await),
            FailureClass::Retryable | FailureClass::PairLimited | FailureClass::Ambiguous => {
                attempt.inconclusive();
                self.retry_or_give_up(job, class, failure, *attempts, shutdown)
                    .await
            }
        }
    }

    /// Dispatch, [`accounts`]: the account's problem (token, payment, restriction), not the
    /// job's. The account pauses until a probe finds it working, and this attempt, which sent
    /// nothing, does not count against the job.
    async fn pause_account(
        &self,
        attempt: &Attempt<'_>,
        failure: &ApiFailure,
        attempts: &mut u32,
    ) -> Disposition {
        let job = attempt.job;
        attempt
            .account
            .pause(&failure.message, self.accounts.probe_interval());
        *attempts -= 1;
        if self
            .record(job, LedgerState::Pending, *attempts)
            .await
            .is_err()
        {
            return Disposition::Abandon;
        }
        self.defer(
            job,
            *attempts,
            self.accounts.probe_interval(),
            "account_paused",
        )
    }

    /// Dispatch: a failure worth retrying. Give up after `max_attempts`; else wait (the pair's
    /// own limit, or [`dispatch::retry_delay`]): here when the wait is short (`None`: attempt
    /// again), through a delay queue when it is long, and never past `expires_at`.
    async fn retry_or_give_up(
        &self,
        job: &Job,
        class: FailureClass,
        failure: ApiFailure,
        attempts: u32,
        shutdown: &CancellationToken,
    ) -> Option<Disposition> {
        if attempts >= self.retry.max_attempts {
            return Some(Disposition::Finish(Outcome::Failed {
                reason: failure.reason,
                detail: format!("gave up after {} attempts: {}", attempts, failure.message),
                code: failure.code,
                attempts,
            }));
        }
        let delay = match class {
            // The pair's own 4^X, shared by every job to the number.
            FailureClass::PairLimited => self.limits.pair_limited(job),
            _ => None,
        };
        let delay = delay.unwrap_or_else(|| {
            dispatch::retry_delay(
                &self.retry,
                class,
                attempts,
                failure.retry_after,
                &mut rand::rng(),
            )
        });
        crate::metrics::api_retry(&job.account, class.as_str());
        if self
            .record(job, LedgerState::Pending, attempts)
            .await
            .is_err()
        {
            return Some(Disposition::Abandon);
        }
        if let Some(exp) = job.expires_at
            && self.clock.now() + delay >= exp
        {
            return Some(Disposition::Finish(Outcome::Expired {
                detail: format!(
                    "the next retry would come after expires_at; last error: {}",
                    failure.message
                ),
                attempts,
            }));
        }
        if delay > self.retry.inline_max_delay {
            return Some(self.defer(job, attempts, delay, "retry"));
        }
        tokio::select! {
            _ = shutdown.cancelled() => Some(Disposition::Abandon),
            _ = tokio::time::sleep(delay) => None,
        }
    }

    /// A marketing template must carry the way out, when the account lists the templates that
    /// do.
    fn opt_out_in_template(&self, job: &Job) -> Option<Disposition> {
        let (Content::Template(t), Category::Marketing) = (&job.content, job.category) else {
            return None;
        };
        let consent = &self.accounts.get(&job.account)?.config.consent;
        let listed = consent.opt_out_templates.as_ref()?;
        if listed.contains(&t.name) {
            return None;
        }
        let refuse = consent.templates_without_opt_out == TemplatesWithoutOptOut::Refuse;
        crate::metrics::template_without_opt_out(&job.account, &t.name, refuse);
        refuse.then(|| {
            Disposition::Finish(Outcome::Suppressed {
                reason: "no_opt_out_in_template",
                detail: format!(
                    "template {} is not listed in opt_out_templates: marketing must offer a way out",
                    t.name
                ),
            })
        })
    }

    fn meta_checks(&self, job: &Job, policy: &WebhookPolicy, attempts: u32) -> Option<Disposition> {
        let now_ms = self.clock.now().as_millisecond();
        let account = self.accounts.get(&job.account)?;
        if let Content::Template(t) = &job.content {
            // Templates are business-initiated; an account_update restriction stops them all.
            if let Some(until) = self.meta.restricted_until_ms(&job.account)
                && until > now_ms
            {
                let wait = Duration::from_millis((until - now_ms) as u64);
                return Some(self.defer(job, attempts, wait, "account_restricted"));
            }
            if let Some(b) =
                self.meta
                    .template_block(account.config.waba_id.as_deref(), &t.name, &t.language)
            {
                let give_up_ms = b.since_ms + policy.template_pause_max_wait.as_millis() as i64;
                if now_ms >= give_up_ms {
                    return Some(Disposition::Finish(Outcome::Failed {
                        reason: "template_paused",
                        detail: format!(
                            "template {} ({}) is {} and did not come back within {}",
                            t.name,
                            t.language,
                            b.status,
                            humantime::format_duration(policy.template_pause_max_wait)
                        ),
                        code: None,
                        attempts,
                    }));
                }
                let wait = Duration::from_millis((give_up_ms - now_ms) as u64)
                    .min(self.accounts.probe_interval());
                return Some(self.defer(job, attempts, wait, "template_paused"));
            }
        }
        let free_form =
            matches!(job.content, Content::Text(_)) || job.category == Category::Service;
        if free_form {
            let last = self.meta.last_inbound_ms(&job.account, job.to.digits());
            let window_ms = policy.service_window.as_millis() as i64;
            if last.is_none_or(|l| now_ms - l > window_ms) {
                return Some(Disposition::Finish(Outcome::Failed {
                    reason: "outside_service_window",
                    detail: format!(
                        "the customer has not written in the last {}: only templates may be sent (Meta would refuse it with 131047)",
                        humantime::format_duration(policy.service_window)
                    ),
                    code: None,
                    attempts,
                }));
            }
        }
        None
    }

    /// Whether the customer wrote to this account within the service window (so a message
    /// now opens no business-initiated conversation). Without the webhook listener nothing
    /// tells us, so nothing is in a window.
    fn in_service_window(&self, job: &Job, now: Timestamp) -> bool {
        let Some(policy) = &self.webhook_policy else {
            return false;
        };
        self.meta
            .last_inbound_ms(&job.account, job.to.digits())
            .is_some_and(|l| now.as_millisecond() - l <= policy.service_window.as_millis() as i64)
    }

    /// Keeps which WhatsApp ID a send's answer named for the number (Brazil, Mexico: not always
    /// its digits), so the webhooks that name the ID reach the number. A failed write only
    /// costs the map entry: the send stands, and equivalence still finds consented numbers.
    async fn learn_wa_id(&self, job: &Job, id: &str) {
        let id = id.trim_start_matches('+');
        match self.consent.learn_wa_id(job.to.digits(), id).await {
            Ok(true) => crate::metrics::wa_id_learned(),
            Ok(false) => {}
            Err(e) => {
                if let Some(unlogged) = crate::metrics::log_due("wa_id", "not_stored") {
                    tracing::warn!(id = %job.id, to = %job.to.masked(), error = %e, unlogged, "The WhatsApp ID a send was answered with could not be stored (logged once a minute at most).")
                }
            }
        }
    }

    /// Un-counts a send that definitely did not happen. A failed write leaves the count in the
    /// store: conservative (a cap or tier slot held until it expires), never over a limit.
    async fn give_back(&self, job: &Job, counted: &mut Reservation) {
        let ops = self.limits.release(job, counted);
        if !ops.is_empty()
            && let Err(e) = self.ledger.kv_many(ops).await
        {
            tracing::warn!(id = %job.id, account = %job.account, error = %e, "Could not un-count a send that did not happen; it stays counted.");
        }
    }

    /// What Meta's error says about the limits: 130429 (account throughput), 131049 (the
    /// number's marketing limit). 131056 is handled where the retry delay is chosen.
    async fn learn_from_failure(&self, job: &Job, code: Option<i64>) {
        match code {
            Some(130429) => self.limits.throttled(&job.account),
            Some(131049) if job.category == Category::Marketing => {
                if let Some(op) = self
                    .limits
                    .per_user_limited(job.to.digits(), self.clock.now())
                    && let Err(e) = self.ledger.kv_many(vec![op]).await
                {
                    tracing::warn!(id = %job.id, account = %job.account, error = %e, "Could not store Meta's per-user marketing block.");
                }
            }
            _ => {}
        }
    }

    fn defer(&self, job: &Job, attempts: u32, wait: Duration, reason: &'static str) -> Disposition {
        let until = self.clock.now() + wait;
        let until = match job.expires_at {
            // Coming back after expiry only to expire then is pointless: expire now.
            Some(exp) if until >= exp => {
                return Disposition::Finish(Outcome::Expired {
                    detail: format!("would wait ({reason}) past expires_at"),
                    attempts,
                });
            }
            _ => until,
        };
        Disposition::Finish(Outcome::Deferred {
            until,
            reason,
            attempts,
        })
    }

    /// A job about to wait in a delay queue leaves a ledger row (kept as it is if there is
    /// one): its id then has a life outside the consumer's lanes, so a broken copy published
    /// meanwhile is only dead-lettered instead of taking the id with an `invalid` outcome.
    pub async fn note_waiting(&self, job: &Job, attempts: u32) -> Result<(), LedgerError> {
        if self.ledger.get(&job.id).await?.is_none() {
            self.record(job, LedgerState::Pending, attempts).await?;
        }
        Ok(())
    }

    async fn record(
        &self,
        job: &Job,
        state: LedgerState,
        attempts: u32,
    ) -> Result<(), LedgerError> {
        self.record_with(job, state, attempts, Vec::new()).await
    }

    /// Records the job's state together with `also` (the limits' counts of this send), in one
    /// transaction.
    async fn record_with(
        &self,
        job: &Job,
        state: LedgerState,
        attempts: u32,
        also: Vec<KvOp>,
    ) -> Result<(), LedgerError> {
        let r = self
            .ledger
            .put_with(
                &job.id,
                LedgerEntry {
                    state,
                    attempts,
                    updated_ms: now_ms(),
                    published: false,
                    event: Vec::new(),
                },
                also,
            )
            .await;
        if let Err(e) = &r {
            tracing::error!(id = %job.id, account = %job.account, error = %e, "State store write failed; the job stays queued.");
        }
        r
    }

    /// Records a final outcome before its event is published (see the ledger's docs for why).
    /// Tried a few times: the outcome is known only in memory now, and losing it to a passing
    /// store hiccup would leave the job "in doubt" on its redelivery. A full disk or an I/O
    /// error does not reach here: the ledger's writer holds the write and retries it on the
    /// reopened store for `state.unwritable_grace`, so a send that succeeded waits, unacked and
    /// unpublished, until its outcome is recorded.
    pub async fn finalize(
        &self,
        id: &str,
        attempts: u32,
        event: Vec<u8>,
        also: Vec<KvOp>,
    ) -> Result<(), LedgerError> {
        let mut tries = 0;
        loop {
            let entry = LedgerEntry {
                state: LedgerState::Final,
                attempts,
                updated_ms: now_ms(),
                published: false,
                event: event.clone(),
            };
            match self.ledger.put_with(id, entry, also.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if tries >= 3 => return Err(e),
                Err(e) => {
                    tries += 1;
                    tracing::warn!(id, error = %e, "Recording an outcome failed; trying again.");
                    tokio::time::sleep(Duration::from_millis(100 * 4u64.pow(tries))).await;
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

pub type SharedPipeline = Arc<Pipeline>;
