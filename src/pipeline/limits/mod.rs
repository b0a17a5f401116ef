//! Stage 4: limits that keep the channel clean — "low frequency, high relevance", and never
//! past what Meta allows. One file per limit:
//!
//! | limit | file | meaning | on exceed |
//! |---|---|---|---|
//! | quiet hours | [`quiet`] | no (marketing) at night in the recipient's time zone | defer to the opening, spread |
//! | per-user block | here | Meta's 131049: no marketing to the number for a while | defer |
//! | frequency caps | [`caps`] | never more than N in any window T, exact, durable | suppress (marketing) or defer |
//! | daily tier | [`tier`] | the portfolio's unique recipients in 24 h | defer until room |
//! | recipient pacing | [`pacing`] | Meta's pair rate (1 per 6 s), 4^X after 131056 | wait inline, or defer |
//! | throughput | [`throughput`] | the account's msgs/s with burst, down on 130429 | wait (backpressure) |
//!
//! The pipeline calls them in that order: the cheap memory reads that refuse for a long time
//! first ([`Limits::check`]), then the tier count, then the waits right before each Cloud API
//! call ([`Limits::pass`]), then the cap count at the instant of the send
//! ([`Limits::reserve_caps`]), written in the same store transaction as the send record. A
//! send that definitely did not happen gives its counts back ([`Limits::release`]).
//!
//! Per-recipient state needs no locks: the consumer runs one lane per recipient and the
//! consistent-hash exchange sends a recipient to one shard. With several shards on one
//! PostgreSQL state, each account's rate is split over the live shards, and each portfolio's
//! daily tier is counted globally through leases ([`quota`]); on redb, one instance holds all.
//!
//! Several instances on one PostgreSQL state: a recipient's caps, tier count and block are
//! owned by the instance active for its shard, which reads them through from the database the
//! first time it sees the recipient in an epoch ([`epoch`], [`Limits::read_recipients`]).

pub mod caps;
pub mod epoch;
pub mod pacing;
pub mod quiet;
pub mod quota;
pub mod throughput;
pub mod tier;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use dashmap::DashMap;
use governor::nanos::Nanos;
use jiff::Timestamp;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::limits::{OnExceed, UNLIMITED};
use crate::config::{Config, ConfigError, StateBackend};
use crate::job::{Category, Job};
use crate::store::{KvOp, KvRow, Ledger, LedgerError, Table};
use caps::{CapSubject, Caps};
use epoch::Epochs;
use pacing::Pacing;
use quiet::{QuietHours, Zones};
use throughput::Throughput;
use tier::Tier;

/// The monotonic clock of the rate limiters (account throughput, recipient pacing): tokio's, so
/// a test on tokio's paused clock drives them without sleeping, and a wall-clock step (NTP)
/// never opens or closes a gate.
#[derive(Clone, Copy, Debug)]
pub struct MonoClock {
    origin: Instant,
}

impl MonoClock {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for MonoClock {
    fn default() -> Self {
        Self::new()
    }
}

impl governor::clock::Clock for MonoClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.origin.elapsed())
    }
}

/// Store rows purged per table and housekeeping round.
const PURGE_BATCH: usize = 5_000;

/// A job held back by the daily tier looks again this often, so a tier raised by Meta's webhook
/// frees it within minutes rather than when the oldest recipient leaves the 24 h window.
pub const TIER_RECHECK: Duration = Duration::from_secs(300);

/// What the limits say about a job before it may be sent.
#[derive(Debug, PartialEq)]
pub enum Check {
    Go,
    /// Not now: come back after this long (through a delay queue; no slot is held).
    Defer {
        wait: Duration,
        reason: &'static str,
    },
    /// Never: finish the job with this reason.
    Suppress {
        reason: &'static str,
        detail: String,
    },
}

/// Counts a send took before it happened, to give back if it definitely did not happen.
#[derive(Debug, Default)]
pub struct Reservation {
    tier: Option<tier::TierTicket>,
    /// When the caps counted it.
    caps_at: Option<Timestamp>,
    /// A call with these counts may have reached Meta (it timed out): they are never given
    /// back, and a resend of the same job reuses them.
    maybe_sent: bool,
}

impl Reservation {
    /// The call may have been sent: keep the counts whatever happens next.
    pub fn maybe_sent(&mut self) {
        self.maybe_sent = true;
    }
}

/// Why `pass` did not let the send go.
#[derive(Debug, PartialEq)]
pub enum Held {
    /// The recipient pair must wait longer than an inline wait: defer by this long.
    Pacing(Duration),
    ShuttingDown,
}

/// One account's limits.
struct AccountLimits {
    /// Index in config order: the high bits of pacing and block keys.
    throughput: Throughput,
    pacing: Pacing,
    portfolio: usize,
    brand: Arc<str>,
    /// Swapped on SIGHUP.
    quiet: ArcSwapOption<QuietHours>,
}

/// Every limit, for the pipeline: what a job must pass before and while it is sent.
pub struct Limits {
    accounts: HashMap<Arc<str>, AccountLimits>,
    /// Swapped whole on SIGHUP; the new caps take over the counts ([`Limits::reload`]).
    caps: ArcSwap<Caps>,
    tier: Tier,
    /// Loaded only when some account has quiet hours (at start, or by the reload that adds
    /// them).
    zones: ArcSwapOption<Zones>,
    /// Meta's per-user marketing limit (131049) is per number across all businesses: number →
    /// no marketing before (Unix ms).
    blocked: DashMap<u64, i64>,
    per_user_block: Duration,
    /// WABA → the portfolios of its accounts, for tier updates by webhook.
    portfolios_by_waba: HashMap<String, Vec<usize>>,
    /// WABA → its accounts, for 130429 reported by webhook.
    accounts_by_waba: HashMap<String, Vec<Arc<str>>>,
    housekeeping_interval: Duration,
    /// Which recipients' state was read from the store in the current epoch (moves only on
    /// PostgreSQL, where other instances write it too).
    epochs: Epochs,
}

impl Limits {
    /// Builds every limiter from the config; fails (with the config key) only when quiet hours
    /// need the time-zone database and it is missing.
    pub fn new(config: &Config) -> Result<Limits, ConfigError> {
        let clock = MonoClock::new();
        let accounts = config
            .accounts
            .iter()
            .map(|a| {
                (
                    a.name.clone(),
                    AccountLimits {
                        throughput: Throughput::new(
                            a.name.clone(),
                            a.messages_per_second,
                            a.burst,
                            config.limits.arrival_jitter,
                            config.limits.recover_after,
                            clock,
                        ),
                        pacing: Pacing::new(
                            a.pacing_interval,
                            a.pacing_burst,
                            config.retry.max_delay,
                            clock,
                        ),
                        portfolio: a.portfolio,
                        brand: a.brand.clone(),
                        quiet: ArcSwapOption::from(a.quiet_hours.clone().map(Arc::new)),
                    },
                )
            })
            .collect();
        let zones = load_zones(config)?;
        let mut portfolios_by_waba: HashMap<String, Vec<usize>> = HashMap::new();
        let mut accounts_by_waba: HashMap<String, Vec<Arc<str>>> = HashMap::new();
        for a in &config.accounts {
            if let Some(w) = &a.waba_id {
                let p = portfolios_by_waba.entry(w.clone()).or_default();
                if !p.contains(&a.portfolio) {
                    p.push(a.portfolio);
                }
                accounts_by_waba
                    .entry(w.clone())
                    .or_default()
                    .push(a.name.clone());
            }
        }
        Ok(Limits {
            accounts,
            caps: ArcSwap::from_pointee(new_caps(config)),
            tier: Tier::new(&config.limits.portfolios),
            zones: ArcSwapOption::from(zones.map(Arc::new)),
            blocked: DashMap::new(),
            per_user_block: config.limits.per_user_limit_block,
            portfolios_by_waba,
            accounts_by_waba,
            housekeeping_interval: config.limits.housekeeping_interval,
            epochs: Epochs::new(config.state.backend == StateBackend::Postgres),
        })
    }

    /// Applies what a reloaded config (SIGHUP) changes in the limits, without dropping any
    /// count: each account's rate and burst and quiet hours, the frequency caps (the new caps
    /// take over the counts of the caps they keep), the portfolios' configured tiers. Returns
    /// (what was applied, what differs and needs a restart).
    pub fn reload(&self, old: &Config, config: &Config) -> (Vec<String>, Vec<String>) {
        let (mut applied, mut restart) = (Vec::new(), Vec::new());
        let same =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
        let quiet_wanted = config.accounts.iter().any(|a| a.quiet_hours.is_some());
        let zones_changed = !same(&old.limits.country_zones, &config.limits.country_zones);
        if quiet_wanted && (self.zones.load().is_none() || zones_changed) {
            match load_zones(config) {
                Ok(z) => {
                    self.zones.store(z.map(Arc::new));
                    if zones_changed {
                        applied.push("limits.country_zones".into());
                    }
                }
                Err(e) => {
                    tracing::error!(problem = %e, "Quiet hours not reloaded: the time-zone database cannot be read.");
                    restart.push("quiet hours (time-zone database missing)".into());
                }
            }
        }
        for a in &config.accounts {
            let Some(l) = self.accounts.get(&a.name) else {
                continue;
            };
            if l.throughput.rate() != a.messages_per_second {
                applied.push(format!("{}: {} msgs/s", a.name, a.messages_per_second));
            }
            l.throughput
                .reconfigure(a.messages_per_second, a.burst, config.limits.arrival_jitter);
            let quiet = a.quiet_hours.clone().map(Arc::new);
            if !same(&l.quiet.load_full(), &quiet)
                && (quiet.is_none() || self.zones.load().is_some())
            {
                l.quiet.store(quiet);
                applied.push(format!("{}: quiet_hours", a.name));
            }
        }
        if !same(&old.limits.caps, &config.limits.caps) {
            let brands_same = old
                .accounts
                .iter()
                .map(|a| (&a.name, &a.brand))
                .eq(config.accounts.iter().map(|a| (&a.name, &a.brand)));
            if brands_same {
                self.swap_caps(new_caps(config));
                applied.push("caps".into());
            } else {
                restart.push("caps (the accounts or their brands changed too)".into());
            }
        }
        if !same(&old.limits.portfolios, &config.limits.portfolios) {
            let names = |c: &Config| {
                c.limits
                    .portfolios
                    .iter()
                    .map(|p| p.0.clone())
                    .collect::<Vec<_>>()
            };
            if names(old) == names(config) {
                for (i, (name, limit)) in config.limits.portfolios.iter().enumerate() {
                    if self.tier.reconfigure(i, *limit) {
                        applied.push(format!("portfolio {name}: messaging_limit"));
                    }
                }
            } else {
                restart.push("portfolios (added, removed or renamed)".into());
            }
        }
        for (key, differs) in [
            (
                "limits.per_user_limit_block",
                old.limits.per_user_limit_block != config.limits.per_user_limit_block,
            ),
            (
                "limits.recover_after",
                old.limits.recover_after != config.limits.recover_after,
            ),
            (
                "limits.housekeeping_interval",
                old.limits.housekeeping_interval != config.limits.housekeeping_interval,
            ),
        ] {
            if differs {
                restart.push(key.into());
            }
        }
        (applied, restart)
    }

    /// Puts new caps in place with every count of the old ones they keep: copied before the
    /// swap, then again right after it and once more a second later, for sends that were
    /// counted in the old caps by a call already under way (merging never counts one twice).
    fn swap_caps(&self, new: Caps) {
        let new = Arc::new(new);
        let old = self.caps.load_full();
        new.adopt(&old);
        self.caps.store(new.clone());
        let moved = new.adopt(&old);
        tracing::info!(
            cap_logs = moved,
            "Frequency caps replaced; their counts carried over."
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                new.adopt(&old);
            });
        }
    }

    /// Loads what must survive a restart: cap logs, tier counts, per-user blocks.
    pub async fn load(&self, ledger: &Ledger, now: Timestamp) -> Result<(), LedgerError> {
        let caps = self.caps.load().load(ledger, now).await?;
        let tier = self.tier.load(ledger, now).await?;
        let now_ms = now.as_millisecond();
        ledger
            .kv_for_each(Table::UserLimit, |k, v| {
                if let Some((n, until)) = block_row(k, v)
                    && until > now_ms
                {
                    self.blocked.insert(n, until);
                }
            })
            .await?;
        tracing::info!(
            cap_logs = caps,
            tier_counts = tier,
            blocked = self.blocked.len(),
            "Limits loaded."
        );
        Ok(())
    }

    /// Begins a new epoch (takeover, or the live shards changed): every recipient's rows are
    /// read again at first sight, since another instance may have written them. Does nothing
    /// on redb (one instance, one epoch).
    pub fn begin_epoch(&self) -> u64 {
        let e = self.epochs.begin();
        if e > 0 {
            tracing::info!(
                epoch = e,
                "Per-recipient limit state is read through again from the database at each recipient's first job."
            );
        }
        e
    }

    /// Makes sure the recipient's state was read from the store in the current epoch (at once
    /// when it was): `read` reads it, for every recipient arriving meanwhile at once (see
    /// [`epoch`]). Err: the store could not be read, and the recipient's limits are unknown.
    pub async fn first_sight<F, Fut>(&self, digits: &str, read: F) -> Result<(), LedgerError>
    where
        F: FnOnce(Vec<String>) -> Fut,
        Fut: Future<Output = Result<(), LedgerError>>,
    {
        let Ok(n) = digits.parse::<u64>() else {
            // Not E.164 digits: no limit keeps state of it.
            return Ok(());
        };
        self.epochs.ensure(n, digits, read).await
    }

    /// Reads the recipients' caps, tier counts and per-user blocks from the store (one read
    /// per table for all of them) and merges them into memory: caps as multisets
    /// ([`Caps::merge_rows`]), tier counts and blocks by the later time, so this instance's
    /// own counts (in flight, or newer) stay. Returns the rows merged.
    pub async fn read_recipients(
        &self,
        ledger: &Ledger,
        digits: &[String],
        now: Timestamp,
    ) -> Result<usize, LedgerError> {
        // Every row of a number starts with `digits\0`, in all three tables.
        let prefixes: Vec<Vec<u8>> = digits
            .iter()
            .map(|d| {
                let mut p = Vec::with_capacity(d.len() + 1);
                p.extend_from_slice(d.as_bytes());
                p.push(0);
                p
            })
            .collect();
        let caps = self.caps.load_full();
        let cap_rows = async {
            if caps.is_empty() {
                return Ok(Vec::new());
            }
            ledger.kv_scan_prefixes(Table::CapHistory, &prefixes).await
        };
        let (cap_rows, tier_rows, block_rows) = tokio::try_join!(
            cap_rows,
            ledger.kv_scan_prefixes(Table::TierUsage, &prefixes),
            ledger.kv_scan_prefixes(Table::UserLimit, &prefixes),
        )?;
        Ok(caps.merge_rows(&cap_rows, now)
            + self.tier.merge_rows(&tier_rows, now)
            + self.merge_blocks(&block_rows, now))
    }

    /// Per-user blocks read from the store: the later end wins.
    fn merge_blocks(&self, rows: &[KvRow], now: Timestamp) -> usize {
        let now_ms = now.as_millisecond();
        let mut merged = 0;
        for (k, v) in rows {
            if let Some((n, until)) = block_row(k, v)
                && until > now_ms
            {
                let mut e = self.blocked.entry(n).or_insert(until);
                *e = (*e).max(until);
                merged += 1;
            }
        }
        merged
    }

    /// Reads the tiers learned from Meta again (at takeover: another instance may have learned
    /// one since this one started).
    pub async fn reload_tiers(&self, ledger: &Ledger) -> Result<usize, LedgerError> {
        self.tier.reload_learned(ledger).await
    }

    /// The configured accounts' names (whose service windows a recipient may have).
    pub fn account_names(&self) -> impl Iterator<Item = &str> {
        self.accounts.keys().map(|a| &**a)
    }

    /// The checks that need no send slot: quiet hours, Meta's per-user marketing block,
    /// frequency caps. Pure reads of memory.
    pub fn check(&self, job: &Job, now: Timestamp) -> Check {
        let Some(a) = self.accounts.get(&job.account) else {
            return Check::Go;
        };
        if let Some(q) = &*a.quiet.load()
            && q.applies_to(job.category)
            && let Some(until) = self.quiet_until(q, job, now)
        {
            return Check::Defer {
                wait: wait_until(now, until),
                reason: "quiet_hours",
            };
        }
        if job.category == Category::Marketing
            && !self.blocked.is_empty()
            && let Some(n) = number(job)
            && let Some(until) = self.blocked.get(&n).map(|u| *u)
            && until > now.as_millisecond()
        {
            return Check::Defer {
                wait: Duration::from_millis((until - now.as_millisecond()) as u64),
                reason: "per_user_limit",
            };
        }
        let caps = self.caps.load();
        if !caps.is_empty()
            && let Some(refusal) = caps.check(&self.subject(a, job), now)
        {
            return match refusal.on_exceed {
                OnExceed::Suppress => Check::Suppress {
                    reason: "frequency_cap",
                    detail: refusal.detail,
                },
                OnExceed::Defer => Check::Defer {
                    wait: wait_until(now, refusal.until),
                    reason: "frequency_cap",
                },
            };
        }
        Check::Go
    }

    fn quiet_until(&self, q: &QuietHours, job: &Job, now: Timestamp) -> Option<Timestamp> {
        let key = quiet::spread_key(&job.id);
        if let Some(tz) = &job.timezone {
            return q.release_at(std::slice::from_ref(tz), now, key);
        }
        let loaded = self.zones.load();
        let zones = loaded
            .as_ref()
            .map(|z| z.for_number(job.to.as_str(), job.to.region()))
            .unwrap_or_default();
        if zones.is_empty() {
            return q.release_at(std::slice::from_ref(&jiff::tz::TimeZone::UTC), now, key);
        }
        q.release_at(zones, now, key)
    }

    /// Counts every portfolio's tier across the instances on the database (PostgreSQL): the
    /// quotas to keep renewing, with their portfolios' names.
    pub fn share_tiers_globally(&self) -> Vec<Arc<quota::Quota>> {
        self.tier.share_globally()
    }

    /// The portfolio's name by index (the global tier lease counts its rows).
    pub fn portfolio_name(&self, portfolio: usize) -> Option<&str> {
        self.tier.name(portfolio)
    }

    /// Before [`Self::reserve_tier`]: on PostgreSQL, waits a moment for the portfolio's global
    /// lease when it ran out and a renewal is on its way (at once otherwise).
    pub async fn tier_room(&self, job: &Job, stop: &CancellationToken) {
        if !self.tier.is_global() {
            // redb: one instance counts alone, nothing to wait for (and nothing to look up).
            return;
        }
        if let (Some(a), Some(n)) = (self.accounts.get(&job.account), number(job)) {
            self.tier.wait_room(a.portfolio, n, stop).await;
        }
    }

    /// Right before the claim: whether the tier count this pass took from the portfolio's
    /// global lease may still be sent (the lease was renewed less than 8 s ago). False: give
    /// the counts back and defer briefly; the others may have handed the room out.
    pub fn tier_lease_still_trusted(&self, r: &Reservation) -> bool {
        r.tier
            .as_ref()
            .is_none_or(|t| self.tier.lease_still_trusted(t))
    }

    /// The send record with the reservation's rows is written: what it took from a global
    /// lease is durable now.
    pub fn recorded(&self, r: &mut Reservation) {
        if let Some(t) = r.tier.as_mut() {
            self.tier.recorded(t);
        }
    }

    /// Counts the send toward the portfolio's daily tier when it opens a business-initiated
    /// conversation (`in_service_window` false); Err(wait) when the tier is used up.
    pub fn reserve_tier(
        &self,
        job: &Job,
        in_service_window: bool,
        now: Timestamp,
        r: &mut Reservation,
    ) -> Result<Option<KvOp>, Duration> {
        if in_service_window || r.tier.is_some() {
            return Ok(None);
        }
        let (Some(a), Some(n)) = (self.accounts.get(&job.account), number(job)) else {
            return Ok(None);
        };
        match self.tier.reserve(a.portfolio, n, job.to.digits(), now) {
            Ok(Some((ticket, op))) => {
                r.tier = Some(ticket);
                Ok(Some(op))
            }
            Ok(None) => Ok(None),
            // Come back at least every few minutes: Meta may raise the tier meanwhile.
            Err(until) => Err(wait_until(now, until).min(TIER_RECHECK)),
        }
    }

    /// Waits for the account's throughput gate, then for the recipient pair. Pacing comes
    /// after the gate because Meta measures the pair where the message arrives: a job that
    /// waited long at the gate must still be `interval` after the pair's previous message. A
    /// pair that must wait longer than `inline_max` defers (its gate cell is lost: a slight
    /// under-use of the rate); a shorter wait is slept and the gate passed again, so a late
    /// send never adds to a second that was already full.
    pub async fn pass(
        &self,
        job: &Job,
        inline_max: Duration,
        shutdown: &CancellationToken,
    ) -> Result<(), Held> {
        let Some(a) = self.accounts.get(&job.account) else {
            return Ok(());
        };
        let n = number(job);
        // A pair backing off after a 131056 defers before it queues at the gate.
        if let Some(n) = n
            && let Some(wait) = a.pacing.backing_off(n)
            && wait > inline_max
        {
            return Err(Held::Pacing(wait));
        }
        loop {
            let waited = a
                .throughput
                .acquire(shutdown)
                .await
                .map_err(|_| Held::ShuttingDown)?;
            if !waited.is_zero() {
                crate::metrics::limit_wait(&job.account, "throughput", waited);
            }
            let Some(n) = n else {
                return Ok(());
            };
            match a.pacing.check(n) {
                Ok(()) => return Ok(()),
                Err(wait) if wait > inline_max => {
                    return Err(Held::Pacing(a.pacing.deferral(n, wait)));
                }
                Err(wait) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(Held::ShuttingDown),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    crate::metrics::limit_wait(&job.account, "pacing", wait);
                }
            }
        }
    }

    /// Quiet hours again, after the waits: a job checked at 20:59:55 that waited at the gate
    /// must not go at 21:00:07.
    pub fn quiet_now(&self, job: &Job, now: Timestamp) -> Option<Duration> {
        let a = self.accounts.get(&job.account)?;
        let q = a.quiet.load_full().filter(|q| q.applies_to(job.category))?;
        self.quiet_until(&q, job, now).map(|t| wait_until(now, t))
    }

    /// A message sendwell sends on its own (a consent question or reply, to a customer who
    /// just wrote): it waits for the pair and the gate inline, as there is no job to defer.
    pub async fn pass_inline(
        &self,
        account: &str,
        digits: &str,
        shutdown: &CancellationToken,
    ) -> Result<(), Held> {
        let Some(a) = self.accounts.get(account) else {
            return Ok(());
        };
        let n = digits.parse::<u64>().ok();
        loop {
            a.throughput
                .acquire(shutdown)
                .await
                .map_err(|_| Held::ShuttingDown)?;
            let Some(Err(wait)) = n.map(|n| a.pacing.check(n)) else {
                a.throughput.at_the_door(shutdown).await;
                return Ok(());
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Err(Held::ShuttingDown),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Counts the send in the frequency caps, at the instant it goes (after every wait, so the
    /// sliding windows are exact); returns the rows to write with the send record.
    pub fn reserve_caps(&self, job: &Job, now: Timestamp, r: &mut Reservation) -> Vec<KvOp> {
        let caps = self.caps.load();
        if caps.is_empty() || r.caps_at.is_some() {
            return Vec::new();
        }
        let Some(a) = self.accounts.get(&job.account) else {
            return Vec::new();
        };
        r.caps_at = Some(now);
        caps.reserve(&self.subject(a, job), now)
    }

    /// Gives back what a send that definitely did not happen had counted; returns the rows to
    /// write.
    pub fn release(&self, job: &Job, r: &mut Reservation) -> Vec<KvOp> {
        let mut ops = Vec::new();
        if r.maybe_sent {
            return ops;
        }
        if let Some(t) = r.tier.take() {
            ops.push(self.tier.release(t, job.to.digits()));
        }
        if let Some(at) = r.caps_at.take()
            && let Some(a) = self.accounts.get(&job.account)
        {
            ops.extend(self.caps.load().release(&self.subject(a, job), at));
        }
        ops
    }

    /// Right before the HTTP call (after the send is recorded): see
    /// [`Throughput::at_the_door`].
    pub async fn at_the_door(&self, job: &Job, shutdown: &CancellationToken) {
        if let Some(a) = self.accounts.get(&job.account) {
            let waited = a.throughput.at_the_door(shutdown).await;
            if !waited.is_zero() {
                crate::metrics::limit_wait(&job.account, "door", waited);
            }
        }
    }

    /// A send went through.
    pub fn sent(&self, job: &Job) {
        if let (Some(a), Some(n)) = (self.accounts.get(&job.account), number(job)) {
            a.pacing.sent(n);
        }
    }

    /// Meta said 131056 for this pair: how long the pair now waits (4^X s).
    pub fn pair_limited(&self, job: &Job) -> Option<Duration> {
        let (a, n) = (self.accounts.get(&job.account)?, number(job)?);
        Some(a.pacing.pair_limited(n))
    }

    /// Meta said 130429 (throughput exceeded) for an account.
    pub fn throttled(&self, account: &str) {
        if let Some(a) = self.accounts.get(account) {
            a.throughput.throttled();
        }
    }

    /// Meta reported 130429 by webhook for a WABA: every account of it steps down.
    pub fn throttled_waba(&self, waba: &str) {
        for a in self.accounts_by_waba.get(waba).into_iter().flatten() {
            self.throttled(a);
        }
    }

    /// Meta said 131049 (per-user marketing limit) for a number at `at`: no marketing to it
    /// for `per_user_limit_block`; returns the row that remembers it.
    pub fn per_user_limited(&self, digits: &str, at: Timestamp) -> Option<KvOp> {
        let n = digits.parse::<u64>().ok()?;
        let until = at.as_millisecond() + self.per_user_block.as_millis() as i64;
        let mut entry = self.blocked.entry(n).or_insert(until);
        *entry = (*entry).max(until);
        let mut key = digits.as_bytes().to_vec();
        key.push(0);
        Some(KvOp::Put {
            table: Table::UserLimit,
            key,
            value: (*entry).to_le_bytes().to_vec(),
        })
    }

    /// Meta set a WABA's messaging tier (`business_capability_update`): every portfolio of
    /// its accounts takes it; returns the rows that remember it.
    pub fn tier_learned(&self, waba: &str, limit: f64) -> Vec<KvOp> {
        let limit = if limit.is_infinite() && limit > 0.0 {
            UNLIMITED
        } else if limit >= 1.0 {
            (limit as u64).min(UNLIMITED as u64 - 1) as u32
        } else {
            // Zero, negative or not a number: not a tier we can act on.
            return Vec::new();
        };
        self.portfolios_by_waba
            .get(waba)
            .into_iter()
            .flatten()
            .map(|&p| self.tier.set_limit(p, limit))
            .collect()
    }

    /// (counted recipients, limit) of an account's portfolio.
    pub fn tier_usage(&self, account: &str, now: Timestamp) -> Option<(usize, u32)> {
        let a = self.accounts.get(account)?;
        Some(self.tier.usage(a.portfolio, now))
    }

    /// The account's throughput gate (also taken by consent messages, which go around the
    /// pipeline).
    pub fn throughput(&self, account: &str) -> Option<&Throughput> {
        self.accounts.get(account).map(|a| &a.throughput)
    }

    /// Drops idle limiter state now and then and purges rows that can no longer matter, so
    /// memory and the store stay bounded by recent traffic. The scans run on the blocking pool.
    pub async fn housekeeping(
        self: Arc<Self>,
        ledger: Ledger,
        clock: SharedClock,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.housekeeping_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.clone().housekeep(&ledger, clock.now()).await {
                tracing::warn!(error = %e, "Limits housekeeping failed; will try again.");
            }
        }
    }

    /// One round of housekeeping: memory at once, then at most [`PURGE_BATCH`] store rows per
    /// table (a big backlog goes over several rounds, so one commit never grows large).
    pub async fn housekeep(
        self: Arc<Self>,
        ledger: &Ledger,
        now: Timestamp,
    ) -> Result<(), LedgerError> {
        // The scans run in place (redb's in `block_in_place`: see `store::Ledger::kv_for_each`).
        let ops = self.purge_scan(ledger, now).await?;
        if !ops.is_empty() {
            ledger.kv_many(ops).await?;
        }
        Ok(())
    }

    async fn purge_scan(&self, ledger: &Ledger, now: Timestamp) -> Result<Vec<KvOp>, LedgerError> {
        let pairs: usize = self.accounts.values().map(|a| a.pacing.housekeep()).sum();
        let caps = self.caps.load_full();
        caps.evict_idle(now);
        let now_ms = now.as_millisecond();
        self.blocked.retain(|_, until| *until > now_ms);
        crate::metrics::limit_state("pacing_pairs", pairs);
        crate::metrics::limit_state("cap_logs", caps.len());
        crate::metrics::limit_state("per_user_blocks", self.blocked.len());
        // A recipient's epoch marker goes with its state: without any, a next job reads the
        // (few, if any) rows again.
        let marked = self
            .epochs
            .retain(|n| caps.holds(n) || self.tier.holds(n) || self.blocked.contains_key(&n));
        crate::metrics::limit_state("epoch_recipients", marked);
        let mut ops = caps.purge_ops(ledger, now, PURGE_BATCH).await?;
        ops.extend(self.tier.housekeep(ledger, now, PURGE_BATCH).await?);
        let mut blocks = Vec::new();
        ledger
            .kv_for_each(Table::UserLimit, |k, v| {
                let stale = <[u8; 8]>::try_from(v)
                    .map(|b| i64::from_le_bytes(b) <= now_ms)
                    .unwrap_or(true);
                if stale && blocks.len() < PURGE_BATCH {
                    blocks.push(KvOp::DeleteIf {
                        table: Table::UserLimit,
                        key: k.to_vec(),
                        value: v.to_vec(),
                    });
                }
            })
            .await?;
        ops.extend(blocks);
        Ok(ops)
    }

    /// The number was erased (GDPR): forget it in memory too. Its store rows went with the
    /// erasure; without this a later send or release would write its history back.
    pub fn forget(&self, digits: &str) {
        self.caps.load().forget(digits);
        if let Ok(n) = digits.parse::<u64>() {
            self.tier.forget(n);
            self.blocked.remove(&n);
            self.epochs.forget(n);
        }
    }

    fn subject<'a>(&'a self, a: &'a AccountLimits, job: &'a Job) -> CapSubject<'a> {
        CapSubject {
            account: &job.account,
            brand: &a.brand,
            digits: job.to.digits(),
            category: job.category,
        }
    }
}

/// The time-zone tables, when some account has quiet hours; fails (with the config key) only
/// when the time-zone database is missing.
fn load_zones(config: &Config) -> Result<Option<Zones>, ConfigError> {
    if !config.accounts.iter().any(|a| a.quiet_hours.is_some()) {
        return Ok(None);
    }
    let z = Zones::load(&config.limits.country_zones)
        .map_err(|e| ConfigError::one("limits.country_zones", e))?;
    for a in &config.accounts {
        if let Some(q) = &a.quiet_hours {
            let c = z.conflicts(q);
            if !c.is_empty() {
                tracing::warn!(account = %a.name, countries = %c.join(","), "These countries' time zones leave no common open hour for the account's quiet hours: their jobs follow the first zone. Set limits.country_zones to choose one.");
            }
        }
    }
    Ok(Some(z))
}

fn new_caps(config: &Config) -> Caps {
    let names: Vec<(&str, &str)> = config
        .accounts
        .iter()
        .map(|a| (&*a.name, &*a.brand))
        .collect();
    Caps::new(config.limits.caps.clone(), &names)
}

/// A `Table::UserLimit` row: (number, blocked until, Unix ms).
fn block_row(k: &[u8], v: &[u8]) -> Option<(u64, i64)> {
    let number = k
        .split(|b| *b == 0)
        .next()
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse::<u64>().ok())?;
    let until = <[u8; 8]>::try_from(v).ok().map(i64::from_le_bytes)?;
    Some((number, until))
}

/// The number as an integer (E.164 digits fit 50 bits).
fn number(job: &Job) -> Option<u64> {
    job.to.digits().parse().ok()
}

fn wait_until(now: Timestamp, until: Timestamp) -> Duration {
    Duration::try_from(until.duration_since(now)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::decode::Decoder;
    use jiff::ToSpan;

    /// A config with a tier of 2, a 1-per-day marketing cap and quiet hours 21:00–09:00.
    fn config() -> (tempfile::TempDir, Config) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("token"), "tok").unwrap();
        let toml = r#"
            [[purposes]]
            name = "newsletter"
            [[accounts]]
            name = "acme-de"
            phone_number_id = "1"
            token_file = "token"
            portfolio = "acme"
            quiet_hours = { start = "21:00", end = "09:00", spread = "10m" }
            [[portfolios]]
            name = "acme"
            messaging_limit = 2
            [[caps]]
            category = "marketing"
            rules = [{ max = 1, per = "1d" }]
        "#;
        let p = d.path().join("sendwell.toml");
        std::fs::write(&p, toml).unwrap();
        let c = Config::load(&p).unwrap();
        (d, c)
    }

    fn job(c: &Config, id: &str, to: &str, extra: &str) -> Job {
        let body = format!(
            r#"{{"id":"{id}","account":"acme-de","to":"{to}","category":"marketing","purpose":"newsletter","template":{{"name":"t","language":"de"}}{extra}}}"#
        );
        Decoder::new(c).decode(body.as_bytes()).unwrap()
    }

    /// 12:00 in Berlin (winter): outside quiet hours.
    fn noon() -> Timestamp {
        "2026-01-15T11:00:00Z".parse().unwrap()
    }

    #[test]
    fn check_defers_at_night_and_caps_after_a_counted_send() {
        let (_d, c) = config();
        let limits = Limits::new(&c).unwrap();
        let j = job(&c, "a", "+491701234567", "");
        assert_eq!(limits.check(&j, noon()), Check::Go);
        // 22:30 Berlin: quiet until 09:00 Berlin (08:00Z) plus at most the 10 min spread.
        let night: Timestamp = "2026-01-15T21:30:00Z".parse().unwrap();
        let Check::Defer { wait, reason } = limits.check(&j, night) else {
            panic!("not deferred at night");
        };
        assert_eq!(reason, "quiet_hours");
        let opens: Timestamp = "2026-01-16T08:00:00Z".parse().unwrap();
        let until = night + wait;
        assert!(until >= opens && until < opens + 10.minutes(), "{until}");
        // The job's own zone wins: 22:30Z is 14:30 in Los Angeles.
        let la = job(
            &c,
            "b",
            "+491701234567",
            r#","timezone":"America/Los_Angeles""#,
        );
        assert_eq!(limits.check(&la, night), Check::Go);

        let mut r = Reservation::default();
        assert_eq!(limits.reserve_caps(&j, noon(), &mut r).len(), 1);
        let Check::Suppress { reason, detail } = limits.check(&j, noon() + 1.hours()) else {
            panic!("not capped");
        };
        assert_eq!(reason, "frequency_cap");
        assert!(!detail.contains("1701234567"), "{detail}");
        assert_eq!(limits.check(&j, noon() + 24.hours()), Check::Go);
    }

    #[test]
    fn a_reload_swaps_quiet_hours_caps_and_tiers_and_keeps_the_counts() {
        let (d, c) = config();
        let limits = Limits::new(&c).unwrap();
        let j = job(&c, "a", "+491701234567", "");
        let k = job(&c, "b", "+491701234568", "");
        let r = || Reservation::default();
        limits.reserve_caps(&j, noon(), &mut r());
        assert!(limits.reserve_tier(&j, false, noon(), &mut r()).is_ok());
        assert!(limits.reserve_tier(&k, false, noon(), &mut r()).is_ok());
        let night: Timestamp = "2026-01-15T21:30:00Z".parse().unwrap();
        assert!(matches!(limits.check(&k, night), Check::Defer { .. }));

        // No quiet hours, 2 marketing a day, a tier of 3, a new retry policy.
        let toml = std::fs::read_to_string(d.path().join("sendwell.toml"))
            .unwrap()
            .replace(
                "quiet_hours = { start = \"21:00\", end = \"09:00\", spread = \"10m\" }",
                "",
            )
            .replace("max = 1, per", "max = 2, per")
            .replace("messaging_limit = 2", "messaging_limit = 3")
            + "[limits]\nper_user_limit_block = \"1h\"\n";
        let p = d.path().join("reloaded.toml");
        std::fs::write(&p, toml).unwrap();
        let new = Config::load(&p).unwrap();
        let (applied, restart) = limits.reload(&c, &new);
        assert_eq!(
            applied,
            vec![
                "acme-de: quiet_hours",
                "caps",
                "portfolio acme: messaging_limit"
            ]
        );
        assert_eq!(restart, vec!["limits.per_user_limit_block"]);

        assert_eq!(limits.check(&k, night), Check::Go, "quiet hours gone");
        // The cap's one counted send carried over: one more today, then capped at 2.
        assert_eq!(limits.check(&j, noon() + 1.hours()), Check::Go);
        limits.reserve_caps(&j, noon() + 1.hours(), &mut r());
        assert!(matches!(
            limits.check(&j, noon() + 2.hours()),
            Check::Suppress { .. }
        ));
        // Two recipients counted, the tier is 3 now: one more new one, then full.
        let l = job(&c, "c", "+491701234569", "");
        let m = job(&c, "d", "+491701234560", "");
        assert!(limits.reserve_tier(&l, false, noon(), &mut r()).is_ok());
        assert!(limits.reserve_tier(&m, false, noon(), &mut r()).is_err());
    }

    #[test]
    fn a_send_that_did_not_happen_gives_its_counts_back_but_a_maybe_sent_one_keeps_them() {
        let (_d, c) = config();
        let limits = Limits::new(&c).unwrap();
        let j1 = job(&c, "a", "+491701234567", "");
        let j2 = job(&c, "b", "+491701234568", "");
        let j3 = job(&c, "c", "+491701234569", "");
        let mut r1 = Reservation::default();
        let mut r2 = Reservation::default();
        let mut r3 = Reservation::default();
        assert!(limits.reserve_tier(&j1, false, noon(), &mut r1).is_ok());
        limits.reserve_caps(&j1, noon(), &mut r1);
        assert!(limits.reserve_tier(&j2, false, noon(), &mut r2).is_ok());
        // The tier (2) is full: a third new recipient waits (and looks again within minutes).
        let wait = limits
            .reserve_tier(&j3, false, noon(), &mut r3)
            .unwrap_err();
        assert_eq!(wait, TIER_RECHECK);
        // An error answer for j1: its tier count and cap entry come back.
        assert_eq!(limits.release(&j1, &mut r1).len(), 2);
        assert_eq!(limits.check(&j1, noon() + 1.hours()), Check::Go);
        assert!(limits.reserve_tier(&j3, false, noon(), &mut r3).is_ok());
        // j2's call timed out: it may have been sent, so nothing is given back.
        r2.maybe_sent();
        assert!(limits.release(&j2, &mut r2).is_empty());
        let mut again = Reservation::default();
        assert!(limits.reserve_tier(&j1, false, noon(), &mut again).is_err());
        // A reply inside the customer's service window is not a new conversation.
        assert_eq!(limits.reserve_tier(&j1, true, noon(), &mut again), Ok(None));
    }

    /// What another instance wrote for a recipient reaches this one's memory when it reads the
    /// recipient through (a takeover, a moved shard), merged with what this one holds: its own
    /// in-flight reservation stays, the later tier count and block win, nothing counts twice.
    #[tokio::test]
    async fn a_read_through_merges_another_instances_rows_with_what_memory_holds() {
        let (d, c) = config();
        // Caps of 2 a day, so a merge that replaced instead of adding would show.
        let toml = std::fs::read_to_string(d.path().join("sendwell.toml"))
            .unwrap()
            .replace("max = 1, per", "max = 2, per");
        std::fs::write(d.path().join("two.toml"), toml).unwrap();
        let c2 = Config::load(&d.path().join("two.toml")).unwrap();
        let ledger = Ledger::open_in_memory().unwrap();
        let (j, k) = (
            job(&c, "a", "+491701234567", ""),
            job(&c, "b", "+491701234568", ""),
        );
        let r = || Reservation::default();

        // The instance that held the shard before: a send to j at noon (cap and tier rows), a
        // 131049 block of k at noon.
        let before = Limits::new(&c2).unwrap();
        let mut ops: Vec<KvOp> = before.reserve_caps(&j, noon(), &mut r());
        ops.extend(before.reserve_tier(&j, false, noon(), &mut r()).unwrap());
        ops.extend(before.per_user_limited("491701234568", noon()));
        ledger.kv_many(ops).await.unwrap();

        // This instance, started before those rows were written: a reservation for j at 13:00
        // is in flight (its row not written yet), k's block it learned itself ends earlier,
        // and k was counted for the tier later than anything in the store.
        let now = noon() + 1.hours();
        let after = Limits::new(&c2).unwrap();
        let mut in_flight = r();
        after.reserve_caps(&j, now, &mut in_flight);
        after.per_user_limited("491701234568", noon() - 23.hours());
        after
            .reserve_tier(&k, false, now, &mut r())
            .unwrap()
            .unwrap();
        assert_eq!(after.check(&j, now), Check::Go, "one of two counted");
        assert_eq!(after.check(&k, now), Check::Go, "its own block is over");

        let digits = vec!["491701234567".to_string(), "491701234568".to_string()];
        // j's cap log, j's tier count, k's block.
        assert_eq!(
            after.read_recipients(&ledger, &digits, now).await.unwrap(),
            3
        );
        assert!(
            matches!(
                after.check(&j, now),
                Check::Suppress {
                    reason: "frequency_cap",
                    ..
                }
            ),
            "the send of the other instance and this one's in flight make two"
        );
        assert_eq!(
            after.check(&k, now),
            Check::Defer {
                wait: Duration::from_secs(23 * 3600),
                reason: "per_user_limit"
            },
            "the later block wins"
        );
        assert_eq!(after.tier_usage("acme-de", now), Some((2, 2)));
        // Read again (a next epoch): nothing counts twice. The reservation in flight is given
        // back: one send (the other instance's) is left.
        after.read_recipients(&ledger, &digits, now).await.unwrap();
        assert_eq!(after.release(&j, &mut in_flight).len(), 1);
        assert_eq!(after.check(&j, now), Check::Go);
        let mut third = r();
        after.reserve_caps(&j, now, &mut third);
        assert!(matches!(after.check(&j, now), Check::Suppress { .. }));
        // k's tier count from 13:00 (this instance's, later than the store's none) stayed, and
        // j's from noon came: the window is full for a third number.
        let l = job(&c, "c", "+491701234569", "");
        assert!(after.reserve_tier(&l, false, now, &mut r()).is_err());
        // A day and a half later the rows are stale: nothing is merged.
        let later = noon() + 36.hours();
        assert_eq!(
            after
                .read_recipients(&ledger, &digits, later)
                .await
                .unwrap(),
            0
        );
    }

    #[test]
    fn on_redb_no_epoch_begins() {
        let (_d, c) = config();
        let limits = Limits::new(&c).unwrap();
        assert_eq!(limits.begin_epoch(), 0);
        assert_eq!(limits.begin_epoch(), 0);
    }

    #[tokio::test]
    async fn blocks_and_counts_survive_a_restart() {
        let (_d, c) = config();
        let ledger = Ledger::open_in_memory().unwrap();
        let limits = Limits::new(&c).unwrap();
        let j = job(&c, "a", "+491701234567", "");
        let mut r = Reservation::default();
        let mut ops: Vec<KvOp> = limits
            .reserve_tier(&j, false, noon(), &mut r)
            .unwrap()
            .into_iter()
            .collect();
        ops.extend(limits.reserve_caps(&j, noon(), &mut r));
        ops.extend(limits.per_user_limited("491701234568", noon()));
        ledger.kv_many(ops).await.unwrap();

        let again = Arc::new(Limits::new(&c).unwrap());
        again.load(&ledger, noon()).await.unwrap();
        assert!(matches!(
            again.check(&j, noon() + 1.hours()),
            Check::Suppress { .. }
        ));
        assert_eq!(again.tier_usage("acme-de", noon()), Some((1, 2)));
        let blocked = job(&c, "b", "+491701234568", "");
        assert_eq!(
            again.check(&blocked, noon() + 1.hours()),
            Check::Defer {
                wait: Duration::from_secs(23 * 3600),
                reason: "per_user_limit"
            }
        );
        // A day later housekeeping forgets all of it, in memory and in the store.
        let later = noon() + 25.hours();
        again.clone().housekeep(&ledger, later).await.unwrap();
        for t in [Table::CapHistory, Table::TierUsage, Table::UserLimit] {
            assert_eq!(ledger.kv_len(t).await.unwrap(), 0, "{t:?}");
        }
        assert_eq!(again.check(&blocked, later), Check::Go);
    }
}
