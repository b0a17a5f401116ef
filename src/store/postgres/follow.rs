//! The consent follower (issue 18): keeps an instance's in-memory consent cache (summaries and
//! WhatsApp IDs) following the database, so that a warm standby, or another shard's instance,
//! knows every opt-in, STOP, erasure and WhatsApp ID another instance wrote within about a
//! second, without reloading.
//!
//! Migration 3 logs every changed key of `sw_consent_summary` and `sw_wa_ids` in `sw_follow`,
//! with the id of the transaction that changed it. Every `state.postgres.follow_every`, one
//! poll, in one REPEATABLE READ read-only transaction, reads the keys logged at or after the
//! watermark, the snapshot's xmin, and the current rows of those keys (a key without a row was
//! deleted); hands them to the cache ([`FollowSink`]); and moves the watermark to that xmin.
//! Every transaction whose id is below xmin had ended when the snapshot was taken, so what it
//! wrote was read by this poll or an earlier one; a transaction still running had an id at or
//! above xmin (or none yet, and gets a larger one), so a later poll reads it: whatever order
//! transactions commit in, nothing is missed. A key read twice is applied twice, harmlessly.
//!
//! The log is purged after [`PURGE_AFTER`] (see [`Follower::purge_if_due`]); a follower that
//! has not polled successfully for nearly that long may have lost rows to the purge, and stops
//! ([`FollowError::FellBehind`]): the daemon exits, and its restart loads the cache whole.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio_postgres::IsolationLevel;
use tokio_util::sync::CancellationToken;

use super::{PgStore, RETRY_MAX, pg_error};
use crate::store::ledger::{LedgerError, Table};

/// The log's rows are deleted this long after they were written (by the xmin of a poll this
/// long ago: see [`Follower::purge_if_due`]). Long enough for any outage the daemon rides out
/// without [`BEHIND_AFTER`]; short enough that the log stays small.
pub const PURGE_AFTER: Duration = Duration::from_secs(3600);
/// A follower whose last successful poll is this old may miss rows another instance purged:
/// it gives up ([`FollowError::FellBehind`]). Ten minutes short of [`PURGE_AFTER`]: the
/// instances' clocks measure the hour each on its own.
pub const BEHIND_AFTER: Duration = Duration::from_secs(3000);
/// How often a purge runs, and how often a poll's xmin is kept for it.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Log rows deleted per statement: a purge never holds many row locks at once.
const PURGE_CHUNK: i64 = 10_000;
/// Keys looked up per statement of a poll (a poll after a long outage may have many).
const KEY_CHUNK: usize = 10_000;

/// The snapshot's xmin, as a number (tokio-postgres has no type for xid8).
const XMIN: &str = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8";
/// The keys changed by transactions at or after the watermark, each once.
const CHANGED: &str = "SELECT DISTINCT tbl, key FROM sw_follow WHERE xid >= $1::int8::text::xid8";
const SUMMARY_ROWS: &str = "SELECT key, value FROM sw_consent_summary WHERE key = ANY($1)";
const WA_ID_ROWS: &str = "SELECT key, value FROM sw_wa_ids WHERE key = ANY($1)";
/// How far the log has been purged (migration 6), read in each poll's snapshot.
const PURGED: &str = "SELECT below FROM sw_follow_purged";
/// Raised before a purge deletes anything, so that no follower can miss rows unawares.
const MARK_PURGED: &str = "UPDATE sw_follow_purged SET below = greatest(below, $1)";
/// One chunk of a purge: rows by a range of the xid index, deleted by their tuple ids.
const PURGE: &str = "DELETE FROM sw_follow WHERE ctid = ANY(ARRAY(\
     SELECT ctid FROM sw_follow WHERE xid < $1::int8::text::xid8 LIMIT $2))";

/// `sw_follow.tbl`: the tables the log covers (as the triggers of migration 3 write them).
fn table_of(code: i16) -> Option<Table> {
    match code {
        1 => Some(Table::ConsentSummary),
        2 => Some(Table::WaIds),
        _ => None,
    }
}

/// One key a poll read: its current value, or None when it has no row any more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Followed {
    pub table: Table,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// What the follower feeds: the consent cache (`consent::ConsentStore`). A trait, so that the
/// store does not import the consent code that imports it.
pub trait FollowSink: Send + Sync + 'static {
    /// Called before each poll's snapshot is taken: a mark of this instance's own writes so
    /// far, handed back to [`Self::apply_followed`].
    fn poll_starting(&self) -> u64;
    /// Applies what a poll read. A key this instance is writing, or wrote after the poll
    /// started (`started`), is left alone (its own value is at least as new as what the poll
    /// read) and returned: the next poll reads it again.
    fn apply_followed(&self, started: u64, rows: Vec<Followed>) -> Vec<Followed>;
}

/// Why a follower stopped following.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(
        "the consent cache has not followed the database for {}: changes other instances made meanwhile may have been purged from the follow log, so the cache may be stale (a restart loads it whole)",
        humantime::format_duration(Duration::from_secs(.0.as_secs()))
    )]
    FellBehind(Duration),
    #[error(
        "the follow log was purged past this instance's consent cache (watermark {watermark}, purged below {below}): changes other instances made may be gone, so the cache may be stale (a restart loads it whole)"
    )]
    Purged { watermark: i64, below: i64 },
}

/// [`FollowHandle::sync`] could not wait: the follower has stopped (shutdown).
#[derive(Debug, thiserror::Error)]
#[error("the consent follower has stopped")]
pub struct FollowStopped;

/// Between the follower and its handles.
struct Shared {
    /// Polls started (the number of the last one).
    started: AtomicU64,
    /// The number of the last poll applied. Its sender is the follower's: when the follower
    /// stops, waiting on it ends.
    applied: watch::Receiver<u64>,
    /// Asks for a poll now (a [`FollowHandle::sync`]).
    wake: Notify,
}

/// Asks the consent follower to catch up; cheap to clone. On redb (one instance, nothing to
/// follow) every call returns at once.
#[derive(Clone, Default)]
pub struct FollowHandle {
    shared: Option<Arc<Shared>>,
}

impl FollowHandle {
    /// A handle with no follower behind it (redb).
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether a follower runs behind this handle.
    pub fn following(&self) -> bool {
        self.shared.is_some()
    }

    /// Returns once a poll that started after this call has been applied: every change
    /// committed before the call is then in the cache. Polls at once rather than at the next
    /// tick. Waits for as long as the database does not answer.
    pub async fn sync(&self) -> Result<(), FollowStopped> {
        let Some(s) = &self.shared else {
            return Ok(());
        };
        // Taken before reading the count: no poll applied in between is lost.
        let mut applied = s.applied.clone();
        // A poll running now started before this call: the next one is the first after it.
        let target = s.started.load(Ordering::SeqCst) + 1;
        s.wake.notify_one();
        applied
            .wait_for(|&n| n >= target)
            .await
            .map(|_| ())
            .map_err(|_| FollowStopped)
    }
}

/// What one poll read, before it is applied.
pub(crate) struct Batch {
    /// The poll's number (for [`FollowHandle::sync`]).
    seq: u64,
    /// The sink's mark from before the snapshot.
    started: u64,
    /// The snapshot's xmin: the next watermark.
    xmin: i64,
    /// When the poll started (its snapshot is at least this recent).
    at: Instant,
    rows: Vec<Followed>,
}

/// The follower of one instance. Runs as one task ([`Follower::run`]); a test drives it a poll
/// at a time ([`Follower::read`], [`Follower::apply`]).
pub struct Follower {
    store: PgStore,
    sink: Arc<dyn FollowSink>,
    /// Log rows with a transaction id at or above this are read by the next poll.
    watermark: i64,
    /// Keys the sink skipped last time (see [`FollowSink::apply_followed`]): read again,
    /// whether or not the log names them again.
    carry: HashSet<(Table, Vec<u8>)>,
    every: Duration,
    /// When the snapshot of the last poll applied was taken (or the start-up load's).
    last_ok: Instant,
    /// (when, xmin) of successful polls, one a [`PURGE_EVERY`] at most, the oldest first,
    /// for the purge.
    samples: VecDeque<(Instant, i64)>,
    /// Past this age, log rows are purged.
    purge_after: Duration,
    /// Set when a poll found the log purged past the watermark: [`Self::run`] stops then.
    purged_past: Option<i64>,
    shared: Arc<Shared>,
    /// Tells [`FollowHandle::sync`] which poll was applied last.
    applied: watch::Sender<u64>,
}

impl Follower {
    /// A follower whose first poll reads from `watermark`: the xmin of a snapshot taken
    /// before the cache's start-up load began (see [`PgStore::snapshot_xmin`]), so that
    /// nothing committed after what the load read is missed.
    pub fn new(
        store: PgStore,
        sink: Arc<dyn FollowSink>,
        watermark: i64,
        every: Duration,
    ) -> (Follower, FollowHandle) {
        let (applied, applied_rx) = watch::channel(0);
        let shared = Arc::new(Shared {
            started: AtomicU64::new(0),
            applied: applied_rx,
            wake: Notify::new(),
        });
        let now = Instant::now();
        let f = Follower {
            store,
            sink,
            watermark,
            carry: HashSet::new(),
            every,
            last_ok: now,
            samples: VecDeque::from([(now, watermark)]),
            purge_after: PURGE_AFTER,
            purged_past: None,
            shared: shared.clone(),
            applied,
        };
        (
            f,
            FollowHandle {
                shared: Some(shared),
            },
        )
    }

    /// Polls every `every` (at once when a handle asks) until `stop`. A poll that fails is
    /// tried again, with doubling waits up to two seconds; the first failure of an outage is
    /// logged, and the return, each counted. Never returns an error, except when it fell too
    /// far behind to trust the log ([`FollowError::FellBehind`]).
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), FollowError> {
        // (since when, failed polls) while polls fail.
        let mut failing: Option<(Instant, u64)> = None;
        let mut wait = self.every;
        let mut last_purge = Instant::now();
        loop {
            let lag = self.last_ok.elapsed();
            crate::metrics::consent_follow_lag(lag);
            if lag >= BEHIND_AFTER {
                return Err(FollowError::FellBehind(lag));
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.wake.notified() => {}
            }
            let polled = self.poll_once().await;
            if let Some(below) = self.purged_past {
                return Err(FollowError::Purged {
                    watermark: self.watermark,
                    below,
                });
            }
            match polled {
                Ok(()) => {
                    if let Some((since, failed)) = failing.take() {
                        tracing::info!(
                            failed_polls = failed,
                            after_s = since.elapsed().as_secs(),
                            "Following the consent changes in the database again."
                        );
                    }
                    wait = self.every;
                    if last_purge.elapsed() >= PURGE_EVERY {
                        last_purge = Instant::now();
                        if let Err(e) = self.purge_if_due().await {
                            tracing::warn!(error = %e, "Purging the consent follow log failed; will try again.");
                        }
                    }
                }
                Err(e) => {
                    crate::metrics::consent_follow_failed();
                    match &mut failing {
                        Some((_, n)) => *n += 1,
                        None => {
                            tracing::warn!(error = %e, "Following the consent changes in the database failed; retrying (logged once until it works again).");
                            failing = Some((Instant::now(), 1));
                        }
                    }
                    wait = (wait * 2).clamp(self.every, RETRY_MAX.max(self.every));
                }
            }
        }
    }

    /// One poll: read, then apply.
    pub(crate) async fn poll_once(&mut self) -> Result<(), LedgerError> {
        let batch = self.read().await?;
        self.apply(batch);
        Ok(())
    }

    /// Reads what changed since the watermark, in one snapshot. Changes nothing in memory.
    pub(crate) async fn read(&mut self) -> Result<Batch, LedgerError> {
        // Both before the snapshot: a write of our own that ends after this point is newer
        // than what the poll may read, and a sync() that began before it waits for the next.
        let started = self.sink.poll_starting();
        let seq = self.shared.started.fetch_add(1, Ordering::SeqCst) + 1;
        let at = Instant::now();
        let mut c = self.store.conn().await?;
        let r = async {
            let tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg_error)?;
            let xmin_st = tx.prepare_cached(XMIN).await.map_err(pg_error)?;
            let changed_st = tx.prepare_cached(CHANGED).await.map_err(pg_error)?;
            let purged_st = tx.prepare_cached(PURGED).await.map_err(pg_error)?;
            // Sent together (one round trip); the same snapshot either way.
            let from: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&self.watermark];
            let (xmin, logged, purged) = futures_util::try_join!(
                tx.query_one(&xmin_st, &[]),
                tx.query(&changed_st, &from),
                tx.query_one(&purged_st, &[])
            )
            .map_err(pg_error)?;
            let xmin: i64 = xmin.try_get(0).map_err(pg_error)?;
            let below: i64 = purged.try_get(0).map_err(pg_error)?;
            if below > self.watermark {
                return Ok(Err(below));
            }
            // Cloned: a poll that fails keeps them for the next one.
            let mut keys: HashSet<(Table, Vec<u8>)> = self.carry.clone();
            for row in logged {
                let code: i16 = row.try_get(0).map_err(pg_error)?;
                if let Some(t) = table_of(code) {
                    keys.insert((t, row.try_get(1).map_err(pg_error)?));
                }
            }
            let mut rows = Vec::with_capacity(keys.len());
            for (table, sql) in [
                (Table::ConsentSummary, SUMMARY_ROWS),
                (Table::WaIds, WA_ID_ROWS),
            ] {
                let wanted: Vec<&Vec<u8>> = keys
                    .iter()
                    .filter(|(t, _)| *t == table)
                    .map(|(_, k)| k)
                    .collect();
                if wanted.is_empty() {
                    continue;
                }
                let st = tx.prepare_cached(sql).await.map_err(pg_error)?;
                let mut found: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
                for chunk in wanted.chunks(KEY_CHUNK) {
                    for row in tx.query(&st, &[&chunk]).await.map_err(pg_error)? {
                        found.insert(
                            row.try_get(0).map_err(pg_error)?,
                            row.try_get(1).map_err(pg_error)?,
                        );
                    }
                }
                rows.extend(wanted.into_iter().map(|k| Followed {
                    table,
                    value: found.remove(k),
                    key: k.clone(),
                }));
            }
            tx.commit().await.map_err(pg_error)?;
            Ok(Ok((xmin, rows)))
        }
        .await;
        // Nothing moved on failure: the watermark and the carried keys stay for the next poll.
        let (xmin, rows) = match self.store.noted(r)? {
            Ok(read) => read,
            Err(below) => {
                self.purged_past = Some(below);
                return Err(LedgerError::Store(format!(
                    "the follow log was purged below {below}, past this follower's watermark {}",
                    self.watermark
                )));
            }
        };
        Ok(Batch {
            seq,
            started,
            xmin,
            at,
            rows,
        })
    }

    /// Applies a batch [`Self::read`] returned, and moves the watermark past it.
    pub(crate) fn apply(&mut self, b: Batch) {
        let mut read = [0u64; 2];
        for r in &b.rows {
            read[usize::from(r.table == Table::WaIds)] += 1;
        }
        let skipped = self.sink.apply_followed(b.started, b.rows);
        for s in &skipped {
            read[usize::from(s.table == Table::WaIds)] -= 1;
        }
        crate::metrics::consent_follow_applied("consent_summary", read[0]);
        crate::metrics::consent_follow_applied("wa_ids", read[1]);
        self.carry = skipped.into_iter().map(|f| (f.table, f.key)).collect();
        self.watermark = b.xmin;
        self.last_ok = b.at;
        if self
            .samples
            .back()
            .is_none_or(|(t, _)| b.at.duration_since(*t) >= PURGE_EVERY)
        {
            self.samples.push_back((b.at, b.xmin));
        }
        self.applied.send_replace(b.seq);
    }

    /// Deletes the log rows of transactions that had ended [`PURGE_AFTER`] ago: those below
    /// the xmin of a poll of that age. By xmin rather than a time column: no second index to
    /// write with every row, and no clock but this process's monotonic one. Any follower that
    /// polled successfully since then has a watermark at least as high (a later snapshot's
    /// xmin is never lower), so it needs none of them; one that did not gives up
    /// ([`BEHIND_AFTER`]). An instance up for less than the hour purges nothing (another one
    /// may; every row is purged once some instance has run for an hour). Returns the rows
    /// deleted.
    pub(crate) async fn purge_if_due(&mut self) -> Result<u64, LedgerError> {
        let now = Instant::now();
        let old = |t: &Instant| now.duration_since(*t) >= self.purge_after;
        // The newest sample old enough; the older ones are of no more use.
        while self.samples.get(1).is_some_and(|(t, _)| old(t)) {
            self.samples.pop_front();
        }
        let below = match self.samples.front() {
            Some((t, xmin)) if old(t) => *xmin,
            _ => return Ok(0),
        };
        let c = self.store.conn().await?;
        // First, and committed on its own: a follower behind `below` learns it before any row
        // it needs is gone.
        c.execute(MARK_PURGED, &[&below]).await.map_err(pg_error)?;
        let st = c.prepare_cached(PURGE).await.map_err(pg_error)?;
        let mut deleted = 0;
        loop {
            let n = c
                .execute(&st, &[&below, &PURGE_CHUNK])
                .await
                .map_err(pg_error)?;
            deleted += n;
            if (n as i64) < PURGE_CHUNK {
                return Ok(deleted);
            }
        }
    }

    /// For tests: purge rows older than this instead of [`PURGE_AFTER`].
    #[cfg(test)]
    pub(crate) fn set_purge_after(&mut self, d: Duration) {
        self.purge_after = d;
    }

    /// For tests: a poll sample as if taken [`PURGE_AFTER`] ago with this xmin.
    #[cfg(test)]
    pub(crate) fn add_sample_an_hour_old(&mut self, xmin: i64) {
        let at = Instant::now()
            .checked_sub(PURGE_AFTER)
            .unwrap_or_else(Instant::now);
        self.samples.push_front((at, xmin));
    }

    /// For tests: the watermark the next poll reads from.
    #[cfg(test)]
    pub(crate) fn watermark(&self) -> i64 {
        self.watermark
    }
}

impl PgStore {
    /// The xmin of a snapshot taken now: a consent follower that starts from it misses nothing
    /// committed after a load that begins after this call.
    pub async fn snapshot_xmin(&self) -> Result<i64, LedgerError> {
        let r = async {
            let c = self.conn().await?;
            let st = c.prepare_cached(XMIN).await.map_err(pg_error)?;
            c.query_one(&st, &[])
                .await
                .map_err(pg_error)?
                .try_get(0)
                .map_err(pg_error)
        }
        .await;
        self.noted(r)
    }

    /// Starts a consent follower from `watermark` (see [`Follower::new`]) on a task of its own,
    /// until `stop`.
    pub fn follow(
        &self,
        sink: Arc<dyn FollowSink>,
        watermark: i64,
        every: Duration,
        stop: CancellationToken,
    ) -> (
        FollowHandle,
        tokio::task::JoinHandle<Result<(), FollowError>>,
    ) {
        let (f, handle) = Follower::new(self.clone(), sink, watermark, every);
        (handle, tokio::spawn(f.run(stop)))
    }
}
