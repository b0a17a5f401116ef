//! [`Ledger`], the one door to sendwell's state, in front of the backend the configuration
//! chose: redb (one file in the state directory, the default) or PostgreSQL (shared by several
//! instances). The pipeline, consent, limits and webhook code call these methods and never
//! learn which backend answers.
//!
//! An enum rather than a trait object: a match per call costs nothing on the hot path and
//! needs no boxed futures. Reads are async because PostgreSQL's are network calls; redb's
//! answer from a snapshot at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::health::StoreHealth;
use super::ledger::{
    KvOp, KvRow, LedgerEntry, LedgerError, LedgerState, RedbLedger, Table, number_job_key,
};
use super::postgres::follow::{FollowError, FollowHandle, FollowSink};
use super::postgres::{PgSettings, PgStore};
use crate::config::{StateBackend, StateConfig};

/// A lock from [`Ledger::lock_key`], held until released (or dropped: then freed too).
#[must_use = "the lock is freed when dropped"]
pub struct KeyLock(Option<super::postgres::KeyLock>, Ledger);

impl KeyLock {
    /// [`Ledger::kv_get`], read under the lock (PostgreSQL: in its transaction).
    pub async fn kv_get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, LedgerError> {
        match &self.0 {
            Some(l) => l.kv_get(table, key).await,
            None => self.1.kv_get(table, key).await,
        }
    }

    /// [`Ledger::kv_scan_prefix`], read under the lock.
    pub async fn kv_scan_prefix(
        &self,
        table: Table,
        prefix: &[u8],
    ) -> Result<Vec<KvRow>, LedgerError> {
        match &self.0 {
            Some(l) => l.kv_scan_prefix(table, prefix).await,
            None => self.1.kv_scan_prefix(table, prefix).await,
        }
    }

    /// Frees the lock. An error: it may have been lost early (the database session ended);
    /// what was done under it is to be done again.
    pub async fn release(self) -> Result<(), LedgerError> {
        match self.0 {
            Some(l) => l.release().await,
            None => Ok(()),
        }
    }
}

/// Handle to the state store; cheap to clone.
#[derive(Clone)]
pub struct Ledger(Backend);

#[derive(Clone)]
enum Backend {
    Redb(RedbLedger),
    Pg(PgStore),
}

/// Calls the same method on whichever backend holds the state.
macro_rules! each {
    ($self:ident, $b:ident => $e:expr) => {
        match &$self.0 {
            Backend::Redb($b) => $e,
            Backend::Pg($b) => $e,
        }
    };
}

impl From<RedbLedger> for Ledger {
    fn from(l: RedbLedger) -> Self {
        Ledger(Backend::Redb(l))
    }
}

impl From<PgStore> for Ledger {
    fn from(s: PgStore) -> Self {
        Ledger(Backend::Pg(s))
    }
}

impl Ledger {
    /// Opens the store `[state]` configures. `tool`: a command-line tool's open, which fails
    /// with [`LedgerError::InUse`] while a daemon has the store (redb: its file lock;
    /// PostgreSQL: the daemons' shared advisory lock), so the tool talks to the daemon instead.
    pub async fn open_state(state: &StateConfig, tool: bool) -> Result<Ledger, LedgerError> {
        match (state.backend, &state.postgres) {
            (StateBackend::Postgres, Some(pg)) => {
                // The state directory still holds the admin token and export spools.
                std::fs::create_dir_all(&state.dir).map_err(|e| {
                    LedgerError::Store(format!("cannot create {}: {e}", state.dir.display()))
                })?;
                let settings = PgSettings {
                    url: pg.url.clone(),
                    password: pg.password.as_ref().map(|p| p.expose().to_string()),
                    pool_size: pg.pool_size,
                    connect_timeout: pg.connect_timeout,
                    statement_timeout: pg.statement_timeout,
                    application_name: if tool { "sendwell-tool" } else { "sendwell" }.into(),
                    tls: pg.tls,
                    ca_file: pg.ca_file.clone(),
                };
                PgStore::open(&settings, tool)
                    .await
                    .map(|s| Ledger(Backend::Pg(s)))
            }
            (StateBackend::Postgres, None) => Err(LedgerError::Store(
                "state.backend is postgres but [state.postgres] is missing".into(),
            )),
            (StateBackend::Redb, _) => Self::open(&state.dir),
        }
    }

    /// Which backend holds the state: `redb` or `postgres` (for logs and metrics).
    pub fn backend_name(&self) -> &'static str {
        match &self.0 {
            Backend::Redb(_) => "redb",
            Backend::Pg(_) => "postgres",
        }
    }

    /// Where a consent follower started after a load that begins now must start reading
    /// (PostgreSQL: the xmin of a snapshot taken now, see [`crate::store::postgres::follow`]);
    /// None on redb, which one instance has alone.
    pub async fn follow_watermark(&self) -> Result<Option<i64>, LedgerError> {
        match &self.0 {
            Backend::Redb(_) => Ok(None),
            Backend::Pg(s) => s.snapshot_xmin().await.map(Some),
        }
    }

    /// Starts a consent follower (PostgreSQL only; see [`PgStore::follow`]): None on redb.
    pub fn follow(
        &self,
        sink: Arc<dyn FollowSink>,
        watermark: i64,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> Option<(
        FollowHandle,
        tokio::task::JoinHandle<Result<(), FollowError>>,
    )> {
        match &self.0 {
            Backend::Redb(_) => None,
            Backend::Pg(s) => Some(s.follow(sink, watermark, every, stop)),
        }
    }

    /// Opens (or creates) the redb store in `dir` (see [`RedbLedger::open`]).
    pub fn open(dir: &Path) -> Result<Ledger, LedgerError> {
        RedbLedger::open(dir).map(|l| Ledger(Backend::Redb(l)))
    }

    /// A redb store in memory only: for tests and benchmarks.
    pub fn open_in_memory() -> Result<Ledger, LedgerError> {
        RedbLedger::open_in_memory().map(|l| Ledger(Backend::Redb(l)))
    }

    /// The path of the redb store file in a state directory.
    pub fn file_in(dir: &Path) -> PathBuf {
        RedbLedger::file_in(dir)
    }

    /// The redb store behind this handle, if that is the backend (redb-only tools and tests).
    pub fn redb(&self) -> Option<&RedbLedger> {
        match &self.0 {
            Backend::Redb(l) => Some(l),
            Backend::Pg(_) => None,
        }
    }

    /// The registry of running instances: PostgreSQL only (a redb store belongs to one
    /// process, so there is nobody to share limits with).
    pub fn registry(&self) -> Option<super::postgres::Registry> {
        match &self.0 {
            Backend::Redb(_) => None,
            Backend::Pg(s) => Some(s.registry()),
        }
    }

    /// The leases of the daily tiers and budgets counted across instances: PostgreSQL only,
    /// as the registry (a redb store's one process counts them alone).
    pub fn quotas(&self) -> Option<super::postgres::quota::QuotaStore> {
        match &self.0 {
            Backend::Redb(_) => None,
            Backend::Pg(s) => Some(s.quotas()),
        }
    }

    /// Whether writes succeed now, and waiting for them to.
    pub fn health(&self) -> &Arc<StoreHealth> {
        each!(self, l => l.health())
    }

    pub fn writable(&self) -> bool {
        self.health().writable()
    }

    /// Resolves once the store takes writes (at once when it does now).
    pub async fn wait_writable(&self) {
        self.health().wait_writable().await
    }

    /// Whether a compaction holds the store now (redb only; PostgreSQL never stops for one).
    pub fn compacting(&self) -> bool {
        match &self.0 {
            Backend::Redb(l) => l.compacting(),
            Backend::Pg(_) => false,
        }
    }

    /// Resolves once no compaction holds the store.
    pub async fn compacted(&self) {
        match &self.0 {
            Backend::Redb(l) => l.compacted().await,
            Backend::Pg(_) => {}
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<LedgerEntry>, LedgerError> {
        match &self.0 {
            Backend::Redb(l) => l.get(id),
            Backend::Pg(s) => s.get(id).await,
        }
    }

    /// [`Self::get`] and, for a final entry only (a status callback applies to nothing else),
    /// `table`'s row keyed by the same id: on redb from one read transaction.
    pub async fn get_with(
        &self,
        id: &str,
        table: Table,
    ) -> Result<(Option<LedgerEntry>, Option<Vec<u8>>), LedgerError> {
        match &self.0 {
            Backend::Redb(l) => l.get_with(id, table),
            Backend::Pg(s) => match Box::pin(s.get(id)).await? {
                Some(entry) if entry.state == LedgerState::Final => {
                    let row = Box::pin(s.kv_get(table, id.as_bytes())).await?;
                    Ok((Some(entry), row))
                }
                other => Ok((other, None)),
            },
        }
    }

    /// Durably records the entry (returns once committed).
    pub async fn put(&self, id: &str, entry: LedgerEntry) -> Result<(), LedgerError> {
        each!(self, l => l.put(id, entry).await)
    }

    /// Durably records the entry together with `also` in one transaction: a send attempt and
    /// the cap and tier counts it reserves commit or vanish together.
    pub async fn put_with(
        &self,
        id: &str,
        entry: LedgerEntry,
        also: Vec<KvOp>,
    ) -> Result<(), LedgerError> {
        each!(self, l => l.put_with(id, entry, also).await)
    }

    /// Records the entry and `also` only if the job's entry is still the one the caller
    /// decided from (`expect`: its state and attempts; None: no entry), atomically: of any
    /// number of racing claims exactly one wins, and a lost one fails with
    /// [`LedgerError::ClaimLost`] having written nothing.
    pub async fn claim(
        &self,
        id: &str,
        entry: LedgerEntry,
        expect: Option<(LedgerState, u32)>,
        also: Vec<KvOp>,
    ) -> Result<(), LedgerError> {
        let mut ops = Vec::with_capacity(also.len() + 1);
        ops.push(KvOp::ClaimJob {
            id: id.to_string(),
            entry,
            expect,
        });
        ops.extend(also);
        self.kv_many(ops).await.map(|_| ())
    }

    /// Records that the outcome event was confirmed by the broker (see
    /// [`RedbLedger::mark_published`]).
    pub async fn mark_published(&self, id: &str) -> Result<(), LedgerError> {
        each!(self, l => l.mark_published(id).await)
    }

    /// Stores the confirmations made since the last commit now, without waiting.
    pub fn save_marks_nowait(&self) {
        match &self.0 {
            Backend::Redb(l) => l.save_marks_nowait(),
            // Its publish marks go with the writer's next commit anyway.
            Backend::Pg(_) => {}
        }
    }

    /// Forgets entries not touched since `older_than_ms`, with everything keyed by them;
    /// returns how many.
    pub async fn purge(&self, older_than_ms: i64) -> Result<u64, LedgerError> {
        each!(self, l => l.purge(older_than_ms).await)
    }

    pub async fn kv_get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, LedgerError> {
        match &self.0 {
            Backend::Redb(l) => l.kv_get(table, key),
            Backend::Pg(s) => s.kv_get(table, key).await,
        }
    }

    /// Every row of a table, for loading an in-memory cache at start.
    pub async fn kv_scan(&self, table: Table) -> Result<Vec<KvRow>, LedgerError> {
        match &self.0 {
            Backend::Redb(l) => in_place(|| l.kv_scan(table)),
            Backend::Pg(s) => s.kv_scan(table).await,
        }
    }

    /// Durably sets `key` to `value`.
    pub async fn kv_put(
        &self,
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<(), LedgerError> {
        each!(self, l => l.kv_put(table, key, value).await)
    }

    /// Sets `key` without waiting for the commit: for indexes whose loss in a crash only costs
    /// a fallback.
    pub fn kv_put_nowait(&self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        each!(self, l => l.kv_put_nowait(table, key, value))
    }

    /// Atomic insert-if-absent: true when this call inserted the key (the first to claim it).
    pub async fn kv_insert_if_absent(
        &self,
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<bool, LedgerError> {
        each!(self, l => l.kv_insert_if_absent(table, key, value).await)
    }

    /// How many rows a table has.
    pub async fn kv_len(&self, table: Table) -> Result<u64, LedgerError> {
        match &self.0 {
            Backend::Redb(l) => l.kv_len(table),
            Backend::Pg(s) => s.kv_len(table).await,
        }
    }

    /// How many ledger entries (job ids) the store has.
    pub async fn job_count(&self) -> Result<u64, LedgerError> {
        match &self.0 {
            Backend::Redb(l) => l.job_count(),
            Backend::Pg(s) => s.job_count().await,
        }
    }

    /// Whether the store holds nothing at all: no ledger entry, no row in any table.
    pub async fn is_empty(&self) -> Result<bool, LedgerError> {
        match &self.0 {
            Backend::Redb(l) => {
                if l.job_count()? != 0 {
                    return Ok(false);
                }
                for t in Table::ALL {
                    if l.kv_len(t)? != 0 {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Backend::Pg(s) => s.is_empty().await,
        }
    }

    /// Rows whose key starts with `prefix`, in key order.
    pub async fn kv_scan_prefix(
        &self,
        table: Table,
        prefix: &[u8],
    ) -> Result<Vec<KvRow>, LedgerError> {
        match &self.0 {
            Backend::Redb(l) => l.kv_scan_prefix(table, prefix),
            Backend::Pg(s) => s.kv_scan_prefix(table, prefix).await,
        }
    }

    /// Rows whose key starts with any of `prefixes`, in key order, each once (also under
    /// prefixes that overlap): one read for many prefixes (PostgreSQL: one statement), for
    /// reading many recipients' rows at once.
    pub async fn kv_scan_prefixes(
        &self,
        table: Table,
        prefixes: &[Vec<u8>],
    ) -> Result<Vec<KvRow>, LedgerError> {
        if prefixes.is_empty() {
            return Ok(Vec::new());
        }
        let mut rows = match &self.0 {
            Backend::Redb(l) => l.kv_scan_prefixes(table, prefixes)?,
            Backend::Pg(s) => s.kv_scan_prefixes(table, prefixes).await?,
        };
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        rows.dedup_by(|a, b| a.0 == b.0);
        Ok(rows)
    }

    /// Calls `f` on every row of a table, page by page, without collecting them: for loading
    /// millions of rows at start.
    pub async fn kv_for_each(
        &self,
        table: Table,
        f: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), LedgerError> {
        match &self.0 {
            Backend::Redb(l) => in_place(|| l.kv_for_each(table, f)),
            Backend::Pg(s) => s.kv_for_each(table, f).await,
        }
    }

    /// Takes a lock on `key` (in the namespace `space`) that every instance sharing the store
    /// respects, until [`KeyLock::release`]: for a read-compute-write that must not interleave
    /// with another instance's. redb has one process, whose callers order such work
    /// themselves: nothing to take.
    pub async fn lock_key(&self, space: i32, key: &[u8]) -> Result<KeyLock, LedgerError> {
        self.lock_keys(space, &[key]).await
    }

    /// [`Self::lock_key`] on several keys at once: one lock to release, held on one database
    /// connection (never one per key: callers holding some while waiting for more could hold
    /// every connection).
    pub async fn lock_keys(&self, space: i32, keys: &[&[u8]]) -> Result<KeyLock, LedgerError> {
        match &self.0 {
            Backend::Redb(_) => Ok(KeyLock(None, self.clone())),
            Backend::Pg(s) => Ok(KeyLock(Some(s.lock_keys(space, keys).await?), self.clone())),
        }
    }

    /// Applies all `ops` in one transaction: all or nothing.
    pub async fn kv_many(&self, ops: Vec<KvOp>) -> Result<u64, LedgerError> {
        each!(self, l => l.kv_many(ops).await)
    }

    /// Makes sure no freed space keeps erased bytes (redb: compaction; PostgreSQL: VACUUM).
    /// Returns how long the store was held alone (ms).
    pub async fn compact(&self) -> Result<u64, LedgerError> {
        each!(self, l => l.compact().await)
    }

    /// Job ids whose stored outcome event contains `needle` and that last changed at or before
    /// `until_ms` (a scan: for erasure, not the hot path).
    pub async fn job_ids_mentioning(
        &self,
        needle: &[u8],
        until_ms: i64,
    ) -> Result<Vec<String>, LedgerError> {
        match &self.0 {
            Backend::Redb(l) => in_place(|| l.job_ids_mentioning(needle, until_ms)),
            Backend::Pg(s) => s.job_ids_mentioning(needle, until_ms).await,
        }
    }

    /// The jobs to a number (digits) that [`Table::JobsByNumber`] knows: (job id, wamid; empty
    /// when none). A prefix range of one table: no scan of the ledger.
    pub async fn jobs_to(&self, digits: &str) -> Result<Vec<(String, Vec<u8>)>, LedgerError> {
        let prefix = number_job_key(digits, "");
        Ok(self
            .kv_scan_prefix(Table::JobsByNumber, &prefix)
            .await?
            .into_iter()
            .filter_map(|(k, wamid)| {
                let id = String::from_utf8(k[prefix.len()..].to_vec()).ok()?;
                Some((id, wamid))
            })
            .collect())
    }

    /// Rows visited by whole-table scans since the store was opened.
    pub fn scanned_rows(&self) -> u64 {
        each!(self, l => l.scanned_rows())
    }

    /// Fills [`Table::JobsByNumber`] from the ledger once, for stores written before it
    /// existed; None when done before.
    pub async fn index_jobs_by_number(&self) -> Result<Option<u64>, LedgerError> {
        match &self.0 {
            Backend::Redb(l) => l.index_jobs_by_number().await,
            // Its tables were made with the index: every final record writes its row.
            Backend::Pg(_) => Ok(None),
        }
    }

    /// Every key and value of every table, for tests that prove a number is gone.
    pub async fn dump_all(&self) -> Result<Vec<KvRow>, LedgerError> {
        match &self.0 {
            Backend::Redb(l) => in_place(|| l.dump_all()),
            Backend::Pg(s) => s.dump_all().await,
        }
    }

    pub async fn remove(&self, id: &str) -> Result<(), LedgerError> {
        each!(self, l => l.remove(id).await)
    }

    /// Runs `purge` every hour until cancelled, keeping entries for `retention`.
    pub async fn purge_loop(
        self,
        retention: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        match self.0 {
            Backend::Redb(l) => l.purge_loop(retention, shutdown).await,
            Backend::Pg(s) => {
                let mut tick = tokio::time::interval(Duration::from_secs(3600));
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let cutoff =
                        jiff::Timestamp::now().as_millisecond() - retention.as_millis() as i64;
                    match s.purge(cutoff).await {
                        Ok(n) => tracing::info!(
                            removed = n,
                            "Ledger entries past retention were purged."
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "Ledger purge failed; will try again.")
                        }
                    }
                }
            }
        }
    }
}

/// Runs a long redb scan (a start-up load, housekeeping, an erasure's search) where it is
/// called, without holding up the tasks that share its tokio worker: on a multi-thread runtime
/// in `block_in_place`, which hands them to another thread first. Elsewhere (a current-thread
/// runtime, a plain thread) there is nobody to hand them to, and it simply runs.
fn in_place<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
