//! A quota counted across every instance on one PostgreSQL state: a portfolio's daily tier
//! (recipients) or an account's daily budget (millionths of the currency), issue 18
//! (docs/design/instances.md, decision 7). On redb there is one instance and none of this runs.
//!
//! Each instance holds a **lease**: a part of the limit it may count in memory, with no round
//! trip per job. Global use = what is durably counted (rows in the database) + the leases of
//! the live instances, and a lease is only granted out of what is left
//! ([`crate::store::postgres::quota`]). Locally:
//!
//! - `row`: the lease as the database has it (or lower, never higher: lowering is safe at once,
//!   raising only once committed);
//! - `used`: counted here and not durable yet (a tier count whose send record is not written, a
//!   spend not saved yet): always inside `row`;
//! - `durable`: counted here and made durable since `row` was written: still inside `row` (a
//!   harmless double count) until the next renewal lowers the row by it, after it is durable,
//!   so a use is never in neither place.
//!
//! room = `row - used - durable`. A job takes from the room; a background task renews the
//! lease before the room runs out ([`wanted_room`] decides how much to hold: a few percent of
//! the limit, less near the end), every [`REFRESH`] while the quota is in use, and gives the
//! room back when it is idle. A job that finds no room waits up to [`WAIT_ROOM`] for a renewal
//! ([`Quota::wait_room`]); only a quota with nothing left refuses at once.
//!
//! A lease is used only while the others surely count it: up to [`TRUST`] after the start of
//! the renewal that wrote it (which also beat this instance's heartbeat; others count a lease
//! for 10 s after the last heartbeat). An instance cut off from the database stops using its
//! lease before the others stop counting it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::postgres::quota::{Durable, QuotaStore, Seen};

/// How long a renewed lease may be used without another renewal: less than the 10 s during
/// which the others count it after the renewal's heartbeat, with 2 s to spare for a slow commit.
pub const TRUST: Duration = Duration::from_secs(8);
/// A quota in use is renewed at least this often: the trust stays fresh, durable use leaves the
/// lease, and a refused quota learns when room comes back (rows aging out of the window).
pub const REFRESH: Duration = Duration::from_secs(2);
/// The longest a job waits for a renewal when the room ran out; the renewal itself takes a
/// round trip or two.
pub const WAIT_ROOM: Duration = Duration::from_secs(2);
/// With no demand for this long, a quota gives its room back (the lease shrinks to its use).
pub const IDLE: Duration = Duration::from_secs(30);
/// While the others' leases hold what is left, jobs waiting for room renew at most this often
/// (the others drop their durable use from their leases within a renewal or two).
const CROWDED_RETRY: Duration = Duration::from_millis(250);
/// Waits between renewals that failed (the database unreachable) or found this instance not
/// live: doubling up to [`REFRESH`].
const RETRY_FIRST: Duration = Duration::from_millis(100);

/// A renewal that takes longer gives up (and is tried again): its statements are bounded to
/// 2 s each by the database; this bounds a connection that stops answering.
const RENEW_WITHIN: Duration = Duration::from_secs(5);

/// The room an instance asks to hold beyond its use, given what is `free` for it (the limit
/// less the durable use, the other live instances' leases and its own use not yet durable) and
/// the live shards sharing it: 5 % of the limit (at least `unit`), and near the end at most
/// half of an even share of what is free, so two instances never take the last of it in one
/// go; never more than is free. 0 when nothing is free.
pub fn wanted_room(limit: i64, free: i64, live_shards: u32, unit: i64) -> i64 {
    if free <= 0 {
        return 0;
    }
    let base = (limit / 20).max(unit);
    let fair = (free / (2 * live_shards.max(1) as i64)).max(unit);
    base.min(fair).min(free)
}

/// The kind of a quota: the first part of its key and its metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A portfolio's daily unique-recipient tier, in recipients.
    Tier,
    /// An account's daily spend budget, in millionths of the currency.
    Budget,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tier => "tier",
            Kind::Budget => "budget",
        }
    }
}

#[derive(Debug, Default)]
struct State {
    row: i64,
    used: i64,
    durable: i64,
    /// Until when the lease may be used (None: never renewed, or the last renewal found this
    /// instance not live).
    trusted_until: Option<Instant>,
    /// The last renewal found nothing free for this instance: the others' leases hold the rest
    /// (some of it may come back: their unused room, their use made durable since).
    exhausted: bool,
    /// The last renewal found the durable use (with this instance's own use) at the limit:
    /// nothing comes back before rows leave the window. A job without room is refused at once.
    used_up: bool,
    /// When the last renewal started.
    renewed_at: Option<Instant>,
    /// The last time a job wanted some of the quota.
    demand_at: Option<Instant>,
    /// Durable use and the others' leases at the last renewal (for the gauges and the spend
    /// report).
    seen: Option<Seen>,
}

impl State {
    fn room(&self, now: Instant) -> i64 {
        if self.trusted_until.is_some_and(|t| now < t) {
            self.row - self.used - self.durable
        } else {
            0
        }
    }
}

/// One quota's lease on this instance.
pub struct Quota {
    kind: Kind,
    /// The portfolio or account.
    name: Arc<str>,
    /// `tier|<portfolio>` or `budget|<account>`: the lease's row.
    key: String,
    /// The limit now (a tier learned from Meta or reloaded changes it).
    limit: AtomicI64,
    /// The smallest lease worth asking for (one recipient; one micro).
    unit: i64,
    state: Mutex<State>,
    /// Wakes the renewal task (the room ran low, or a job waits).
    wake: Notify,
    /// Told after every renewal, to the jobs waiting for room.
    renewed: Notify,
}

impl Quota {
    pub fn new(kind: Kind, name: Arc<str>, limit: i64) -> Arc<Quota> {
        Arc::new(Quota {
            kind,
            key: format!("{}|{name}", kind.as_str()),
            name,
            limit: AtomicI64::new(limit),
            unit: 1,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            renewed: Notify::new(),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The portfolio or account.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn set_limit(&self, limit: i64) {
        if self.limit.swap(limit, Ordering::Relaxed) != limit {
            // A lower limit: renew at once (the room may be too big now); a higher one: grow.
            self.wake.notify_one();
        }
    }

    fn low_water(&self) -> i64 {
        (self.limit.load(Ordering::Relaxed) / 40).max(self.unit)
    }

    /// Takes `n` from the room (a new tier recipient): false when there is not that much (the
    /// renewal task is woken).
    pub fn try_take(&self, n: i64) -> bool {
        let now = Instant::now();
        let mut s = lock(&self.state);
        s.demand_at = Some(now);
        let room = s.room(now);
        if room < n {
            drop(s);
            self.wake.notify_one();
            return false;
        }
        s.used += n;
        if room - n < self.low_water() {
            drop(s);
            self.wake.notify_one();
        }
        true
    }

    /// Whether the lease is still trusted (renewed less than 8 s ago). Checked again right
    /// before a send's claim that took from it: an instance stalled since the take (a frozen
    /// VM, a starved process) may have been counted dead by the others, who then handed its
    /// room out.
    pub fn trusted(&self) -> bool {
        lock(&self.state)
            .trusted_until
            .is_some_and(|t| Instant::now() < t)
    }

    /// Whether any room is left (the budget: a send goes while some is; its cost is counted
    /// when it was sent, [`Self::add_use`]).
    pub fn has_room(&self) -> bool {
        let now = Instant::now();
        let mut s = lock(&self.state);
        s.demand_at = Some(now);
        let room = s.room(now);
        if room < self.low_water() {
            drop(s);
            self.wake.notify_one();
        }
        room > 0
    }

    /// Counts `n` used whether or not the room had it (a sent message's cost): the next
    /// renewal's lease covers it in any case.
    pub fn add_use(&self, n: i64) {
        let mut s = lock(&self.state);
        s.used += n;
        let low = s.room(Instant::now()) < self.low_water();
        drop(s);
        if low {
            self.wake.notify_one();
        }
    }

    /// `n` of the use was made durable (its rows committed): the next renewal lowers the lease
    /// by it.
    pub fn durable(&self, n: i64) {
        let mut s = lock(&self.state);
        s.used -= n;
        s.durable += n;
        // Counted twice (in the rows and in this lease) until the renewal: not for long.
        let renew = s.durable >= self.low_water();
        drop(s);
        if renew {
            self.wake.notify_one();
        }
    }

    /// `n` taken and never made durable (the send did not happen): back into the room.
    pub fn give_back(&self, n: i64) {
        lock(&self.state).used -= n;
    }

    /// The last renewal found the limit reached by durable use alone: nothing comes back
    /// before counts leave the window (a long deferral). Otherwise a job without room looks
    /// again soon.
    pub fn used_up(&self) -> bool {
        lock(&self.state).used_up
    }

    /// Global durable use + every live lease at the last renewal (None before the first).
    pub fn global_use(&self) -> Option<i64> {
        let s = lock(&self.state);
        s.seen.map(|seen| seen.durable + seen.others + s.row)
    }

    /// Durable use at the last renewal (None before the first).
    pub fn durable_use(&self) -> Option<i64> {
        lock(&self.state).seen.map(|s| s.durable)
    }

    /// Waits (up to `within`) until the room holds `need`, the quota is found exhausted, or
    /// `stop`; true when there is room. A job calls it before taking, so that a lease that ran
    /// out is renewed under it rather than the job deferred.
    pub async fn wait_room(&self, need: i64, within: Duration, stop: &CancellationToken) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let renewed = self.renewed.notified();
            tokio::pin!(renewed);
            renewed.as_mut().enable();
            {
                let now = Instant::now();
                let mut s = lock(&self.state);
                s.demand_at = Some(now);
                if s.room(now) >= need {
                    return true;
                }
                if s.used_up && s.trusted_until.is_some_and(|t| now < t) {
                    return false;
                }
            }
            self.wake.notify_one();
            tokio::select! {
                _ = renewed => {}
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Renews the lease until `stop`: when woken (the room ran low, a job waits, the limit
    /// changed) and every [`REFRESH`] while the quota is in use or holds a lease. `me`: this
    /// instance's id; `durable`: what is durably counted, asked at each renewal.
    pub async fn run(
        self: Arc<Self>,
        store: QuotaStore,
        me: String,
        durable: impl Fn() -> Durable + Send,
        stop: CancellationToken,
    ) {
        // Some(wait) while renewals fail or find this instance not live: they are retried
        // after it, whatever wakes meanwhile (jobs waiting for room must not make it spin).
        let mut backoff: Option<Duration> = None;
        let mut failing = false;
        loop {
            let woken = match backoff {
                Some(wait) => tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => false,
                },
                None => tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.wake.notified() => true,
                    _ = tokio::time::sleep(REFRESH) => false,
                },
            };
            let go = if woken {
                self.wants_renewal()
            } else {
                self.in_use()
            };
            if !go {
                backoff = None;
                continue;
            }
            let next = backoff.map_or(RETRY_FIRST, |b| (b * 2).min(REFRESH));
            // Bounded here too: a connection that stops answering mid-renewal must not hold
            // this quota's renewals until TCP gives up.
            let renewed = tokio::time::timeout(RENEW_WITHIN, self.renew(&store, &me, &durable()))
                .await
                .unwrap_or_else(|_| {
                    Err(crate::store::LedgerError::Io(format!(
                        "no answer within {}s",
                        RENEW_WITHIN.as_secs()
                    )))
                });
            match renewed {
                Ok(true) => {
                    if failing {
                        tracing::info!(quota = %self.key, "The quota's lease is renewed again.");
                    }
                    failing = false;
                    backoff = None;
                }
                // Our registry row is not there (yet): the first heartbeat comes soon.
                Ok(false) => backoff = Some(next),
                Err(e) => {
                    crate::metrics::quota_renewal(self.kind.as_str(), &self.name, "failed");
                    if !failing {
                        tracing::warn!(quota = %self.key, error = %e, "Renewing the quota's lease failed; retrying (logged once per outage; sendwell_quota_renewals_total with result failed counts each). Jobs that need the quota wait meanwhile.");
                    }
                    failing = true;
                    backoff = Some(next);
                }
            }
            // Waiting jobs look again whatever came of it.
            self.renewed.notify_waiters();
        }
    }

    /// Worth a renewal now that a job woke the task: the room is below its low-water mark and
    /// the quota is not known to be used up, or the lease was renewed more than [`REFRESH`] ago.
    fn wants_renewal(&self) -> bool {
        let now = Instant::now();
        let s = lock(&self.state);
        let demanded = s.demand_at.is_some_and(|t| now.duration_since(t) < IDLE);
        let trust_low = s
            .trusted_until
            .is_none_or(|t| t.saturating_duration_since(now) < TRUST - REFRESH);
        let trusted = s.trusted_until.is_some_and(|t| now < t);
        let crowded_retry = s
            .renewed_at
            .is_none_or(|t| now.duration_since(t) >= CROWDED_RETRY);
        let room_low = s.room(now) < self.low_water()
            && !(trusted && s.used_up)
            && (!s.exhausted || crowded_retry);
        (demanded && (room_low || trust_low)) || s.durable >= self.low_water()
    }

    /// Worth a periodic renewal: in demand lately, holding a lease, or with durable use to drop.
    fn in_use(&self) -> bool {
        let now = Instant::now();
        let s = lock(&self.state);
        s.demand_at.is_some_and(|t| now.duration_since(t) < IDLE)
            || s.row > 0
            || s.durable > 0
            || s.used != 0
    }

    /// One renewal (see the module's doc for the order of lowering and raising).
    async fn renew(
        &self,
        store: &QuotaStore,
        me: &str,
        durable: &Durable,
    ) -> Result<bool, crate::store::LedgerError> {
        let started = Instant::now();
        let limit = self.limit.load(Ordering::Relaxed);
        // Use made durable so far: its commits finished before this transaction reads the
        // durable count, so that count has it. Use made durable later (while the transaction
        // runs) may not be in it: it stays in the lease until the next renewal.
        let durable_before = lock(&self.state).durable;
        let mut decided = None;
        let (seen, granted) = store
            .renew(&self.key, me, durable, |seen| {
                let mut s = lock(&self.state);
                // That use leaves the lease now: it is in `seen.durable`.
                s.row -= durable_before;
                s.durable -= durable_before;
                // What this instance counted that `seen.durable` may not have: its use not
                // durable yet, and use made durable while this transaction ran.
                let held = s.used.max(0) + s.durable;
                let idle = s
                    .demand_at
                    .is_none_or(|t| started.duration_since(t) >= IDLE);
                let free = limit - seen.durable - seen.others - held;
                let room = if !seen.me_live || idle {
                    0
                } else {
                    wanted_room(limit, free, seen.live_shards, self.unit)
                };
                // The lease always covers that: it is real use whatever the limit says.
                let new_row = held + room;
                if new_row < s.row {
                    // Lowered at once: no job takes from what is about to go.
                    s.row = new_row;
                }
                // Used up: the durable count with this instance's own use not durable yet
                // (not `held`, which may count a use twice: a refusal for long must be sure).
                let used_up = seen.durable + s.used.max(0) >= limit;
                decided = Some((new_row, free <= 0, used_up));
                new_row
            })
            .await?;
        let (new_row, exhausted, used_up) = decided.unwrap_or((granted, false, false));
        let mut s = lock(&self.state);
        // Raised only now that the others count it.
        s.row = new_row;
        s.exhausted = exhausted;
        s.used_up = used_up;
        s.renewed_at = Some(started);
        s.trusted_until = seen.me_live.then_some(started + TRUST);
        s.seen = Some(seen);
        let room = s.row - s.used - s.durable;
        drop(s);
        crate::metrics::quota_lease(
            self.kind.as_str(),
            &self.name,
            new_row,
            seen.durable + seen.others + new_row,
        );
        crate::metrics::quota_renewal(
            self.kind.as_str(),
            &self.name,
            if room > 0 { "granted" } else { "refused" },
        );
        Ok(seen.me_live)
    }
}

#[cfg(test)]
impl Quota {
    /// As if a renewal had written a lease of `row` (with nothing left beyond it when
    /// `used_up`), for tests of the callers without a database.
    pub(crate) fn granted_for_test(&self, row: i64, used_up: bool) {
        let mut s = lock(&self.state);
        s.row = row + s.durable;
        s.trusted_until = Some(Instant::now() + TRUST);
        s.exhausted = used_up;
        s.used_up = used_up;
    }

    /// As if the last renewal were older than the trust.
    pub(crate) fn distrusted_for_test(&self) {
        lock(&self.state).trusted_until = Some(Instant::now());
    }

    /// (use not yet durable, use made durable since the lease).
    pub(crate) fn counts_for_test(&self) -> (i64, i64) {
        let s = lock(&self.state);
        (s.used, s.durable)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_a_few_percent_of_the_limit_and_shrinks_near_the_end() {
        // 5 % of a 2,000 tier while plenty is free.
        assert_eq!(wanted_room(2000, 2000, 1, 1), 100);
        assert_eq!(wanted_room(2000, 1000, 4, 1), 100);
        // Near the end: half of an even share of what is free (2 shards: a quarter).
        assert_eq!(wanted_room(2000, 200, 2, 1), 50);
        assert_eq!(wanted_room(2000, 7, 2, 1), 1);
        // Never more than is free, never nothing while something is.
        assert_eq!(wanted_room(2000, 1, 2, 1), 1);
        assert_eq!(wanted_room(20, 20, 2, 1), 1);
        assert_eq!(wanted_room(20, 0, 2, 1), 0);
        assert_eq!(wanted_room(20, -3, 2, 1), 0);
        // A budget in micros: 5 % of 1.00.
        assert_eq!(wanted_room(1_000_000, 1_000_000, 2, 1), 50_000);
    }

    /// Two instances asking in turn, each renewal granting what `wanted_room` says out of
    /// what the other holds: the sum of the leases and the durable use never passes the limit,
    /// and the last unit is granted too.
    #[test]
    fn leases_taken_in_turn_never_sum_past_the_limit_and_reach_it() {
        for (limit, shards) in [(20i64, 2u32), (250, 2), (7, 3), (100_000, 5)] {
            let mut rows = vec![0i64; shards as usize];
            let mut durable = 0i64;
            let mut turn = 0;
            while durable < limit {
                let i = turn % rows.len();
                // Instance i used its whole lease, and it is durable now: its renewal drops it
                // from the lease and asks for room out of what is free.
                durable += rows[i];
                rows[i] = 0;
                let others: i64 = rows.iter().sum();
                rows[i] = wanted_room(limit, limit - durable - others, shards, 1);
                assert!(durable + rows.iter().sum::<i64>() <= limit, "{limit}: over");
                turn += 1;
                assert!(turn < 10 * limit as usize + 100, "{limit}: never reached");
            }
            assert_eq!(durable, limit);
        }
    }

    #[tokio::test]
    async fn the_room_is_what_the_lease_holds_beyond_use_and_only_while_trusted() {
        let q = Quota::new(Kind::Tier, "acme".into(), 20);
        assert!(!q.try_take(1), "no lease yet");
        {
            let mut s = lock(&q.state);
            s.row = 3;
            s.trusted_until = Some(Instant::now() + TRUST);
        }
        assert!(q.try_take(1) && q.try_take(2));
        assert!(!q.try_take(1), "3 of 3 used");
        // One send did not happen: back; one became durable: still in the lease until renewed.
        q.give_back(1);
        q.durable(1);
        assert!(q.try_take(1));
        assert!(!q.try_take(1));
        // A budget's cost may pass the room; it is counted all the same.
        q.add_use(5);
        assert!(!q.has_room());
        lock(&q.state).trusted_until = Some(Instant::now() - Duration::from_millis(1));
        lock(&q.state).used = 0;
        assert!(!q.try_take(1), "a lease past its trust is not used");
        let stop = CancellationToken::new();
        lock(&q.state).used_up = true;
        assert!(
            !q.wait_room(1, Duration::from_millis(50), &stop).await,
            "nobody renews here: the wait ends at its deadline"
        );
    }
}
