//! The idempotency ledger: what sendwell knows about every job id it has seen, durable across
//! crashes, so that a job id is sent at most once however often it is delivered.
//!
//! Writes go through one writer thread that batches everything waiting into one redb transaction
//! (group commit): hundreds of jobs in flight share one fsync instead of paying one each. Reads
//! use redb's MVCC read transactions and never wait for the writer.
//!
//! Within one process, a job id is only ever processed by one task at a time (the pipeline's
//! scheduler guarantees it), so "look up, then write" needs no lock. Each shard owns its own
//! state directory, so no two processes share a ledger.

use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

const LEDGER: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_v1");
/// Rows per read transaction in long scans.
const SCAN_PAGE: usize = 4096;

/// One row of a byte table: key and value.
pub type KvRow = (Vec<u8>, Vec<u8>);

/// The store's other tables: plain byte maps, each owned by one module that knows its encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Webhook events already applied (key: SHA-256 of the event), so a repeat is applied once.
    WebhookSeen,
    /// wamid → job id, for status callbacks that carry no `biz_opaque_callback_data`.
    Wamids,
    /// job id → the last delivery status published for it (monotonic).
    Delivery,
    /// template → its status from `message_template_status_update`.
    Templates,
    /// account|number → last inbound message time (the customer-service window).
    Inbound,
    /// account → business-initiated messaging restricted until (from `account_update`).
    Restrictions,
    /// digits|account|time|hash → one consent event as received: the proof (`consent show`).
    ConsentHistory,
    /// digits|account → what the history adds up to per purpose; loaded into memory at start.
    ConsentSummary,
    /// digits|account → a double opt-in question sent and not yet answered.
    ConsentPending,
    /// keyed hash of digits → when the number was erased, so a late older event stays void.
    ConsentErased,
    /// Store-wide settings (the key of the erasure hashes, learned messaging tiers).
    StoreMeta,
    /// digits|scope|category → the most recent counted sends (frequency caps), so a restart
    /// never resets a cap.
    CapHistory,
    /// digits|portfolio → when the number last counted toward the portfolio's daily
    /// unique-recipient tier.
    TierUsage,
    /// digits\0 → no marketing to the number until (Meta's per-user marketing limit, 131049,
    /// which counts across all businesses).
    UserLimit,
}

impl Table {
    pub const ALL: [Table; 14] = [
        Table::WebhookSeen,
        Table::Wamids,
        Table::Delivery,
        Table::Templates,
        Table::Inbound,
        Table::Restrictions,
        Table::ConsentHistory,
        Table::ConsentSummary,
        Table::ConsentPending,
        Table::ConsentErased,
        Table::StoreMeta,
        Table::CapHistory,
        Table::TierUsage,
        Table::UserLimit,
    ];

    fn def(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        TableDefinition::new(match self {
            Table::WebhookSeen => "webhook_seen_v1",
            Table::Wamids => "wamids_v1",
            Table::Delivery => "delivery_v1",
            Table::Templates => "templates_v1",
            Table::Inbound => "inbound_v1",
            Table::Restrictions => "restrictions_v1",
            Table::ConsentHistory => "consent_history_v1",
            Table::ConsentSummary => "consent_summary_v1",
            Table::ConsentPending => "consent_pending_v1",
            Table::ConsentErased => "consent_erased_v1",
            Table::StoreMeta => "store_meta_v1",
            Table::CapHistory => "cap_history_v1",
            Table::TierUsage => "tier_usage_v1",
            Table::UserLimit => "user_limit_v1",
        })
    }
}

/// What a job id's history says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerState {
    /// Seen, and no Cloud API call is in doubt: safe to (re)send.
    Pending,
    /// A Cloud API call was started and its result is not recorded: it may have been sent.
    Sending,
    /// A final outcome exists; its event is stored.
    Final,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerEntry {
    pub state: LedgerState,
    /// Cloud API calls made so far, carried across redeliveries and delay-queue round trips.
    pub attempts: u32,
    /// Unix milliseconds of the last change; retention counts from here.
    pub updated_ms: i64,
    /// For `Final`: whether the broker confirmed the outcome event, so a redelivery knows
    /// whether to publish it again.
    pub published: bool,
    /// For `Final`: the outcome event as published (JSON), to republish it byte for byte.
    pub event: Vec<u8>,
}

impl LedgerEntry {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(14 + self.event.len());
        v.push(match self.state {
            LedgerState::Pending => 1,
            LedgerState::Sending => 2,
            LedgerState::Final => 3,
        });
        v.push(self.published as u8);
        v.extend_from_slice(&self.attempts.to_le_bytes());
        v.extend_from_slice(&self.updated_ms.to_le_bytes());
        v.extend_from_slice(&self.event);
        v
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < 14 {
            return None;
        }
        let state = match b[0] {
            1 => LedgerState::Pending,
            2 => LedgerState::Sending,
            3 => LedgerState::Final,
            _ => return None,
        };
        Some(Self {
            state,
            published: b[1] != 0,
            attempts: u32::from_le_bytes(b[2..6].try_into().ok()?),
            updated_ms: i64::from_le_bytes(b[6..14].try_into().ok()?),
            event: b[14..].to_vec(),
        })
    }
}

/// Errors of the store; all of them are worth retrying later (disk full, I/O), none is the job's
/// fault, so the job stays unacked and comes back.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("state store: {0}")]
    Store(String),
    #[error("state store writer has stopped")]
    WriterGone,
    /// Another process (the running daemon) has the store open.
    #[error("the state store is in use by another process (is the daemon running?)")]
    InUse,
}

impl<E: Into<redb::Error>> From<E> for LedgerError {
    fn from(e: E) -> Self {
        LedgerError::Store(e.into().to_string())
    }
}

enum Op {
    Put {
        id: Box<str>,
        entry: LedgerEntry,
    },
    MarkPublished {
        id: Box<str>,
    },
    KvPut {
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Inserts only when the key is absent; counts 1 when it inserted.
    KvInsertIfAbsent {
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Remove {
        id: Box<str>,
    },
    /// Several changes that must commit together (a consent event and its summary).
    Many(Vec<KvOp>),
    /// Compact the file after the batch commits.
    Compact,
}

/// One change of an atomic [`Ledger::kv_many`] write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvOp {
    Put {
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        table: Table,
        key: Vec<u8>,
    },
    /// Deletes every key that starts with `prefix`.
    DeletePrefix {
        table: Table,
        prefix: Vec<u8>,
    },
    /// Deletes ledger entries (job ids).
    DeleteJobs {
        ids: Vec<String>,
    },
    /// Deletes the row only if it still holds `value`: housekeeping decides from a scan, and
    /// a write that landed since must win.
    DeleteIf {
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Records a job's ledger entry (with [`Ledger::put_with`]: together with what it implies).
    PutJob {
        id: String,
        entry: LedgerEntry,
    },
}

struct Request {
    op: Op,
    /// None for fire-and-forget writes whose loss is harmless (the "published" marker).
    done: Option<oneshot::Sender<Result<u64, LedgerError>>>,
}

/// Handle to the ledger; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    /// Readers and the writer share it; only compaction (after an erasure) takes it alone.
    db: Arc<RwLock<Database>>,
    tx: mpsc::UnboundedSender<Request>,
}

impl Ledger {
    /// Opens (or creates) `state.redb` in `dir` and starts the writer thread, which ends when the
    /// last handle is dropped.
    pub fn open(dir: &Path) -> Result<Ledger, LedgerError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| LedgerError::Store(format!("cannot create {}: {e}", dir.display())))?;
        // A handle just dropped in this process closes on its writer thread a moment later;
        // anything holding the file longer than that is another process.
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            match Database::create(dir.join("state.redb")) {
                Ok(db) => return Self::start(db),
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(LedgerError::InUse),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A store that lives in memory only: for tests and benchmarks.
    pub fn open_in_memory() -> Result<Ledger, LedgerError> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Self::start(db)
    }

    /// The path of the store file in a state directory.
    pub fn file_in(dir: &Path) -> std::path::PathBuf {
        dir.join("state.redb")
    }

    fn start(db: Database) -> Result<Ledger, LedgerError> {
        let db = Arc::new(RwLock::new(db));
        {
            let w = read(&db).begin_write()?;
            w.open_table(LEDGER)?;
            for t in Table::ALL {
                w.open_table(t.def())?;
            }
            w.commit()?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let writer_db = db.clone();
        *OPEN_WRITERS.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        std::thread::Builder::new()
            .name("sendwell-ledger".into())
            .spawn(move || writer(writer_db, rx))
            .map_err(|e| {
                *OPEN_WRITERS.0.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
                LedgerError::Store(format!("cannot start writer thread: {e}"))
            })?;
        Ok(Ledger { db, tx })
    }

    pub fn get(&self, id: &str) -> Result<Option<LedgerEntry>, LedgerError> {
        let g = read(&self.db);
        let r = g.begin_read()?;
        let t = r.open_table(LEDGER)?;
        Ok(t.get(id)?.and_then(|v| LedgerEntry::decode(v.value())))
    }

    async fn write(&self, op: Op) -> Result<u64, LedgerError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request {
                op,
                done: Some(done),
            })
            .map_err(|_| LedgerError::WriterGone)?;
        rx.await.map_err(|_| LedgerError::WriterGone)?
    }

    /// Durably records the entry (returns once committed).
    pub async fn put(&self, id: &str, entry: LedgerEntry) -> Result<(), LedgerError> {
        self.write(Op::Put {
            id: id.into(),
            entry,
        })
        .await
        .map(|_| ())
    }

    /// Durably records the entry together with `also` in one transaction: a send attempt and
    /// the cap and tier counts it reserves commit or vanish together.
    pub async fn put_with(
        &self,
        id: &str,
        entry: LedgerEntry,
        also: Vec<KvOp>,
    ) -> Result<(), LedgerError> {
        if also.is_empty() {
            return self.put(id, entry).await;
        }
        let mut ops = Vec::with_capacity(also.len() + 1);
        ops.push(KvOp::PutJob {
            id: id.to_string(),
            entry,
        });
        ops.extend(also);
        self.write(Op::Many(ops)).await.map(|_| ())
    }

    /// Records that the outcome event was confirmed by the broker. Awaited, so that the next
    /// copy of the same id (queued behind this one) sees it and answers `duplicate` rather than
    /// republishing. If a crash loses it, a redelivery republishes the same stored event, byte
    /// for byte: consumers see a repeat of an identical event (at-least-once delivery).
    pub async fn mark_published(&self, id: &str) -> Result<(), LedgerError> {
        self.write(Op::MarkPublished { id: id.into() })
            .await
            .map(|_| ())
    }

    /// Forgets entries not touched since `older_than_ms`; returns how many. The scan runs on a
    /// read snapshot (writers go on meanwhile) and removals go in small batches, so jobs in
    /// flight never wait behind a purge of millions of entries.
    pub async fn purge(&self, older_than_ms: i64) -> Result<u64, LedgerError> {
        let this = self.clone();
        // Everything keyed by a job or a webhook goes with its job: the wamid index, delivery
        // state and billing marks (wamids carry the number, so they must not outlive the
        // retention the operator chose), and applied-webhook marks past retention.
        let scan = move || -> Result<(Vec<String>, Vec<KvOp>), LedgerError> {
            let mut ids = Vec::new();
            this.for_each_job(|k, v| {
                let old = LedgerEntry::decode(v)
                    .map(|e| e.updated_ms < older_than_ms)
                    .unwrap_or(true);
                if old {
                    ids.push(k.to_string());
                }
            })?;
            let gone: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
            let mut ops = Vec::new();
            for id in &ids {
                ops.push(KvOp::Delete {
                    table: Table::Delivery,
                    key: id.as_bytes().to_vec(),
                });
            }
            this.kv_for_each(Table::Wamids, |k, v| {
                if std::str::from_utf8(v).is_ok_and(|id| gone.contains(id)) {
                    let mut billed = b"billed|".to_vec();
                    billed.extend_from_slice(k);
                    ops.push(KvOp::Delete {
                        table: Table::WebhookSeen,
                        key: billed,
                    });
                    ops.push(KvOp::Delete {
                        table: Table::Wamids,
                        key: k.to_vec(),
                    });
                }
            })?;
            this.kv_for_each(Table::WebhookSeen, |k, v| {
                if let Ok(b) = <[u8; 8]>::try_from(v)
                    && i64::from_le_bytes(b) < older_than_ms
                {
                    ops.push(KvOp::Delete {
                        table: Table::WebhookSeen,
                        key: k.to_vec(),
                    });
                }
            })?;
            Ok((ids, ops))
        };
        let (expired, ops) = tokio::task::spawn_blocking(scan)
            .await
            .map_err(|e| LedgerError::Store(format!("purge scan: {e}")))??;
        let mut removed = 0;
        // Small batches: jobs in flight never wait behind a purge of millions of rows.
        for chunk in expired.chunks(2000) {
            removed += self
                .kv_many(vec![KvOp::DeleteJobs {
                    ids: chunk.to_vec(),
                }])
                .await?;
        }
        for chunk in ops.chunks(2000) {
            self.kv_many(chunk.to_vec()).await?;
        }
        Ok(removed)
    }

    /// Calls `f` with every ledger entry (job id, encoded entry), page by page.
    fn for_each_job(&self, mut f: impl FnMut(&str, &[u8])) -> Result<(), LedgerError> {
        let mut after: Option<String> = None;
        loop {
            let g = read(&self.db);
            let r = g.begin_read()?;
            let t = r.open_table(LEDGER)?;
            let rows = match &after {
                None => t.iter()?,
                Some(k) => t.range::<&str>((Bound::Excluded(k.as_str()), Bound::Unbounded))?,
            };
            let mut last = None;
            for (n, row) in rows.enumerate() {
                let (k, v) = row?;
                f(k.value(), v.value());
                if n + 1 == SCAN_PAGE {
                    last = Some(k.value().to_string());
                    break;
                }
            }
            match last {
                Some(k) => after = Some(k),
                None => return Ok(()),
            }
        }
    }

    pub fn kv_get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, LedgerError> {
        let g = read(&self.db);
        let r = g.begin_read()?;
        let t = r.open_table(table.def())?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Every row of a table, for loading an in-memory cache at start.
    pub fn kv_scan(&self, table: Table) -> Result<Vec<KvRow>, LedgerError> {
        let g = read(&self.db);
        let r = g.begin_read()?;
        let t = r.open_table(table.def())?;
        let mut rows = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            rows.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(rows)
    }

    /// Durably sets `key` to `value`.
    pub async fn kv_put(
        &self,
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<(), LedgerError> {
        self.write(Op::KvPut { table, key, value })
            .await
            .map(|_| ())
    }

    /// Sets `key` without waiting for the commit: for indexes whose loss in a crash only costs
    /// a fallback (the wamid index, when a callback also carries our job id).
    pub fn kv_put_nowait(&self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        let _ = self.tx.send(Request {
            op: Op::KvPut { table, key, value },
            done: None,
        });
    }

    /// Atomic insert-if-absent: true when this call inserted the key (the first to claim it).
    pub async fn kv_insert_if_absent(
        &self,
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<bool, LedgerError> {
        self.write(Op::KvInsertIfAbsent { table, key, value })
            .await
            .map(|n| n == 1)
    }

    /// How many rows a table has.
    pub fn kv_len(&self, table: Table) -> Result<u64, LedgerError> {
        use redb::ReadableTableMetadata;
        let g = read(&self.db);
        let r = g.begin_read()?;
        Ok(r.open_table(table.def())?.len()?)
    }

    /// Rows whose key starts with `prefix`, in key order.
    pub fn kv_scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Vec<KvRow>, LedgerError> {
        let g = read(&self.db);
        let r = g.begin_read()?;
        let t = r.open_table(table.def())?;
        let mut rows = Vec::new();
        for row in t.range(prefix..)? {
            let (k, v) = row?;
            if !k.value().starts_with(prefix) {
                break;
            }
            rows.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(rows)
    }

    /// Calls `f` on every row of a table from one read snapshot, without collecting them: for
    /// loading millions of rows at start.
    pub fn kv_for_each(
        &self,
        table: Table,
        mut f: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), LedgerError> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            // One page per read transaction: a long scan (an export to a slow client, a load)
            // never holds the store so long that compaction, and every job behind it, waits.
            let g = read(&self.db);
            let r = g.begin_read()?;
            let t = r.open_table(table.def())?;
            let rows = match &after {
                None => t.iter()?,
                Some(k) => t.range::<&[u8]>((Bound::Excluded(k.as_slice()), Bound::Unbounded))?,
            };
            let mut last = None;
            for (n, row) in rows.enumerate() {
                let (k, v) = row?;
                f(k.value(), v.value());
                if n + 1 == SCAN_PAGE {
                    last = Some(k.value().to_vec());
                    break;
                }
            }
            match last {
                Some(k) => after = Some(k),
                None => return Ok(()),
            }
        }
    }

    /// Applies all `ops` in one transaction: all or nothing.
    pub async fn kv_many(&self, ops: Vec<KvOp>) -> Result<u64, LedgerError> {
        self.write(Op::Many(ops)).await
    }

    /// Compacts the file (see [`compact`]): every store write waits meanwhile, so it is for
    /// rare events (erasures), not routine use.
    pub async fn compact(&self) -> Result<u64, LedgerError> {
        self.write(Op::Compact).await
    }

    /// Job ids whose stored outcome event contains `needle` and that last changed at or before
    /// `until_ms` (a scan, page by page: for erasure, not the hot path).
    pub fn job_ids_mentioning(
        &self,
        needle: &[u8],
        until_ms: i64,
    ) -> Result<Vec<String>, LedgerError> {
        let mut ids = Vec::new();
        self.for_each_job(|k, v| {
            let old = LedgerEntry::decode(v).is_none_or(|e| e.updated_ms <= until_ms);
            if old && v.windows(needle.len()).any(|w| w == needle) {
                ids.push(k.to_string());
            }
        })?;
        Ok(ids)
    }

    /// Every key and value of every table, for tests that prove a number is gone.
    pub fn dump_all(&self) -> Result<Vec<KvRow>, LedgerError> {
        let mut rows = Vec::new();
        // One read guard at a time: a second one taken while holding the first would wait
        // forever behind a compaction queued in between.
        self.for_each_job(|k, v| rows.push((k.as_bytes().to_vec(), v.to_vec())))?;
        for table in Table::ALL {
            rows.extend(self.kv_scan(table)?);
        }
        Ok(rows)
    }

    pub async fn remove(&self, id: &str) -> Result<(), LedgerError> {
        self.write(Op::Remove { id: id.into() }).await.map(|_| ())
    }

    /// Runs `purge` every hour until cancelled, keeping entries for `retention`.
    pub async fn purge_loop(
        self,
        retention: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let cutoff = jiff::Timestamp::now().as_millisecond() - retention.as_millis() as i64;
            match self.purge(cutoff).await {
                Ok(n) => tracing::info!(removed = n, "Ledger entries past retention were purged."),
                Err(e) => tracing::warn!(error = %e, "Ledger purge failed; will try again."),
            }
        }
    }
}

fn read(db: &RwLock<Database>) -> RwLockReadGuard<'_, Database> {
    db.read().unwrap_or_else(|e| e.into_inner())
}

/// Rewrites the file so that freed pages (which still hold erased bytes: redb is
/// copy-on-write) are overwritten by live pages or cut off the end.
fn compact(db: &RwLock<Database>) -> Result<u64, LedgerError> {
    let mut g = db.write().unwrap_or_else(|e| e.into_inner());
    let mut rounds = 0;
    while rounds < 1000
        && g.compact()
            .map_err(|e| LedgerError::Store(format!("compaction: {e}")))?
    {
        rounds += 1;
    }
    Ok(rounds)
}

/// Writer threads still running (each closes its database when it ends).
static OPEN_WRITERS: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

/// Waits (at most `within`) until every store opened in this process is closed, i.e. all its
/// handles are dropped and its writer has committed and closed the file. A process that exits
/// without waiting leaves a file redb must repair at the next open (slow on a big store).
pub fn wait_closed(within: Duration) -> bool {
    let (lock, cvar) = &OPEN_WRITERS;
    let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    let (guard, _) = cvar
        .wait_timeout_while(guard, within, |n| *n > 0)
        .unwrap_or_else(|e| e.into_inner());
    *guard == 0
}

/// Runs on the writer thread; `start` counted it in [`OPEN_WRITERS`] before spawning it.
fn writer(db: Arc<RwLock<Database>>, rx: mpsc::UnboundedReceiver<Request>) {
    write_loop(&db, rx);
    // The last handle is gone: dropping the database here closes the file cleanly.
    drop(db);
    let (lock, cvar) = &OPEN_WRITERS;
    *lock.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
    cvar.notify_all();
}

fn write_loop(db: &Arc<RwLock<Database>>, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut batch: Vec<Request> = Vec::with_capacity(1024);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut result = apply(db, &batch);
        if batch.iter().any(|r| matches!(r.op, Op::Compact)) {
            let c = compact(db);
            for (req, res) in batch.iter().zip(result.iter_mut()) {
                if matches!(req.op, Op::Compact) && res.is_ok() {
                    *res = c
                        .as_ref()
                        .map(|n| *n)
                        .map_err(|e| LedgerError::Store(e.to_string()));
                }
            }
        }
        for (req, res) in batch.drain(..).zip(result) {
            if let Some(done) = req.done {
                let _ = done.send(res);
            }
        }
    }
}

type KvTable<'t> = redb::Table<'t, &'static [u8], &'static [u8]>;

/// The byte tables a batch touches, each opened once per transaction: opening and closing one
/// per operation (which rewrites the table's root entry each time) was a good part of the
/// writer's time in the load bench's profile, with several small rows per job.
struct OpenTables<'t> {
    w: &'t redb::WriteTransaction,
    open: [Option<KvTable<'t>>; Table::ALL.len()],
}

impl<'t> OpenTables<'t> {
    fn new(w: &'t redb::WriteTransaction) -> Self {
        Self {
            w,
            open: Default::default(),
        }
    }

    fn get(&mut self, table: Table) -> Result<&mut KvTable<'t>, LedgerError> {
        let slot = &mut self.open[table as usize];
        if slot.is_none() {
            *slot = Some(self.w.open_table(table.def())?);
        }
        Ok(slot.as_mut().expect("opened above"))
    }
}

fn apply_kv(
    tables: &mut OpenTables<'_>,
    jobs: &mut redb::Table<&str, &[u8]>,
    op: &KvOp,
) -> Result<u64, LedgerError> {
    Ok(match op {
        KvOp::Put { table, key, value } => {
            tables
                .get(*table)?
                .insert(key.as_slice(), value.as_slice())?;
            1
        }
        KvOp::Delete { table, key } => tables.get(*table)?.remove(key.as_slice())?.is_some() as u64,
        KvOp::DeletePrefix { table, prefix } => {
            let t = tables.get(*table)?;
            let keys: Vec<Vec<u8>> = t
                .range(prefix.as_slice()..)?
                .map_while(|r| r.ok())
                .map(|(k, _)| k.value().to_vec())
                .take_while(|k| k.starts_with(prefix))
                .collect();
            for k in &keys {
                t.remove(k.as_slice())?;
            }
            keys.len() as u64
        }
        KvOp::DeleteIf { table, key, value } => {
            let t = tables.get(*table)?;
            let same = t
                .get(key.as_slice())?
                .is_some_and(|v| v.value() == value.as_slice());
            if same {
                t.remove(key.as_slice())?;
            }
            same as u64
        }
        KvOp::PutJob { id, entry } => {
            jobs.insert(id.as_str(), entry.encode().as_slice())?;
            1
        }
        KvOp::DeleteJobs { ids } => {
            let mut n = 0;
            for id in ids {
                n += jobs.remove(id.as_str())?.is_some() as u64;
            }
            n
        }
    })
}

/// Applies a batch in one transaction; returns one result per request.
fn apply(db: &RwLock<Database>, batch: &[Request]) -> Vec<Result<u64, LedgerError>> {
    let run = || -> Result<Vec<u64>, LedgerError> {
        let g = read(db);
        let w = g.begin_write()?;
        let mut counts = Vec::with_capacity(batch.len());
        {
            let mut t = w.open_table(LEDGER)?;
            let mut tables = OpenTables::new(&w);
            for req in batch {
                let n = match &req.op {
                    Op::Put { id, entry } => {
                        t.insert(&**id, entry.encode().as_slice())?;
                        1
                    }
                    Op::MarkPublished { id } => {
                        let cur = t.get(&**id)?.and_then(|v| LedgerEntry::decode(v.value()));
                        match cur {
                            Some(mut e) => {
                                e.published = true;
                                t.insert(&**id, e.encode().as_slice())?;
                                1
                            }
                            None => 0,
                        }
                    }
                    Op::KvPut { table, key, value } => {
                        tables
                            .get(*table)?
                            .insert(key.as_slice(), value.as_slice())?;
                        1
                    }
                    Op::KvInsertIfAbsent { table, key, value } => {
                        let kt = tables.get(*table)?;
                        if kt.get(key.as_slice())?.is_some() {
                            0
                        } else {
                            kt.insert(key.as_slice(), value.as_slice())?;
                            1
                        }
                    }
                    Op::Remove { id } => t.remove(&**id)?.is_some() as u64,
                    Op::Compact => 0,
                    Op::Many(ops) => {
                        let mut n = 0;
                        for op in ops {
                            n += apply_kv(&mut tables, &mut t, op)?;
                        }
                        n
                    }
                };
                counts.push(n);
            }
        }
        w.commit()?;
        Ok(counts)
    };
    match run() {
        Ok(counts) => counts.into_iter().map(Ok).collect(),
        Err(e) => {
            let msg = e.to_string();
            batch
                .iter()
                .map(|_| Err(LedgerError::Store(msg.clone())))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: LedgerState, ms: i64) -> LedgerEntry {
        LedgerEntry {
            state,
            attempts: 2,
            updated_ms: ms,
            published: false,
            event: b"{}".to_vec(),
        }
    }

    #[tokio::test]
    async fn entries_survive_reopening_the_store() {
        let d = tempfile::tempdir().unwrap();
        {
            let l = Ledger::open(d.path()).unwrap();
            l.put("a", entry(LedgerState::Final, 5)).await.unwrap();
            l.put("b", entry(LedgerState::Sending, 6)).await.unwrap();
        }
        // The writer thread exits when the last handle drops; the file lock follows.
        let l = loop {
            match Ledger::open(d.path()) {
                Ok(l) => break l,
                Err(_) => tokio::task::yield_now().await,
            }
        };
        assert_eq!(l.get("a").unwrap(), Some(entry(LedgerState::Final, 5)));
        assert_eq!(l.get("b").unwrap().unwrap().state, LedgerState::Sending);
        assert_eq!(l.get("c").unwrap(), None);
    }

    #[tokio::test]
    async fn purge_removes_only_old_entries_and_published_marker_sticks() {
        let d = tempfile::tempdir().unwrap();
        let l = Ledger::open(d.path()).unwrap();
        l.put("old", entry(LedgerState::Final, 10)).await.unwrap();
        l.put("new", entry(LedgerState::Final, 1000)).await.unwrap();
        l.mark_published("new").await.unwrap();
        // What hangs off a job (its wamid, which carries the number; its delivery state and
        // billing mark) goes with it.
        for (id, wamid) in [("old", "wamid.OLD"), ("new", "wamid.NEW")] {
            l.kv_put(Table::Wamids, wamid.into(), id.into())
                .await
                .unwrap();
            l.kv_put(Table::Delivery, id.into(), vec![1]).await.unwrap();
            l.kv_put(Table::WebhookSeen, format!("billed|{wamid}").into(), vec![])
                .await
                .unwrap();
        }
        assert_eq!(l.purge(500).await.unwrap(), 1);
        assert_eq!(l.get("old").unwrap(), None);
        assert!(l.get("new").unwrap().unwrap().published);
        assert_eq!(l.kv_get(Table::Wamids, b"wamid.OLD").unwrap(), None);
        assert_eq!(l.kv_get(Table::Delivery, b"old").unwrap(), None);
        assert_eq!(
            l.kv_get(Table::WebhookSeen, b"billed|wamid.OLD").unwrap(),
            None
        );
        assert!(l.kv_get(Table::Wamids, b"wamid.NEW").unwrap().is_some());
        assert!(l.kv_get(Table::Delivery, b"new").unwrap().is_some());
        assert!(
            l.kv_get(Table::WebhookSeen, b"billed|wamid.NEW")
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn many_concurrent_writes_all_commit() {
        let d = tempfile::tempdir().unwrap();
        let l = Ledger::open(d.path()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..500 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                l.put(&format!("id-{i}"), entry(LedgerState::Pending, i))
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        for i in 0..500 {
            assert!(l.get(&format!("id-{i}")).unwrap().is_some());
        }
    }

    #[tokio::test]
    async fn a_paged_scan_visits_every_row_once_in_order() {
        let l = Ledger::open_in_memory().unwrap();
        let n = SCAN_PAGE * 2 + 17;
        let ops = (0..n)
            .map(|i| KvOp::Put {
                table: Table::ConsentSummary,
                key: format!("{i:08}").into_bytes(),
                value: vec![1],
            })
            .collect();
        l.kv_many(ops).await.unwrap();
        let mut seen = Vec::new();
        l.kv_for_each(Table::ConsentSummary, |k, _| seen.push(k.to_vec()))
            .unwrap();
        let want: Vec<Vec<u8>> = (0..n).map(|i| format!("{i:08}").into_bytes()).collect();
        assert_eq!(seen, want);
    }
}
