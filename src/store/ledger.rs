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

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, TryLockError};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::compaction::{self, Key, Tracking, Which};
use super::health::StoreHealth;

pub(super) const LEDGER: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_v1");
/// Rows per read transaction in long scans.
const SCAN_PAGE: usize = 4096;

/// One row of a byte table: key and value.
pub type KvRow = (Vec<u8>, Vec<u8>);

/// The store's other tables: plain byte maps, each owned by one module that knows its encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// number\0WhatsApp ID → (empty), for IDs that differ from their number (Brazil, Mexico);
    /// loaded into memory at start (`consent::wa_id`).
    WaIds,
    /// digits\0job id → the job's wamid (empty when none): the jobs to a number, written with
    /// the job's final record, so an erasure finds them without scanning the ledger.
    JobsByNumber,
}

impl Table {
    /// The table's name in PostgreSQL (`sw_` + its redb name without the version).
    pub fn pg_name(self) -> &'static str {
        match self {
            Table::WebhookSeen => "sw_webhook_seen",
            Table::Wamids => "sw_wamids",
            Table::Delivery => "sw_delivery",
            Table::Templates => "sw_templates",
            Table::Inbound => "sw_inbound",
            Table::Restrictions => "sw_restrictions",
            Table::ConsentHistory => "sw_consent_history",
            Table::ConsentSummary => "sw_consent_summary",
            Table::ConsentPending => "sw_consent_pending",
            Table::ConsentErased => "sw_consent_erased",
            Table::StoreMeta => "sw_store_meta",
            Table::CapHistory => "sw_cap_history",
            Table::TierUsage => "sw_tier_usage",
            Table::UserLimit => "sw_user_limit",
            Table::WaIds => "sw_wa_ids",
            Table::JobsByNumber => "sw_jobs_by_number",
        }
    }

    pub const ALL: [Table; 16] = [
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
        Table::WaIds,
        Table::JobsByNumber,
    ];

    pub(super) fn def(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
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
            Table::WaIds => "wa_ids_v1",
            Table::JobsByNumber => "jobs_by_number_v1",
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
    /// `seq`: the final entry's place in [`Marks`] (0: none; its `published` flag says it all).
    pub(crate) fn encode(&self, seq: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(22 + self.event.len());
        let state = match self.state {
            LedgerState::Pending => 1,
            LedgerState::Sending => 2,
            LedgerState::Final => 3,
        };
        v.push(if seq == 0 { state } else { state | SEQ_FOLLOWS });
        v.push(self.published as u8);
        v.extend_from_slice(&self.attempts.to_le_bytes());
        v.extend_from_slice(&self.updated_ms.to_le_bytes());
        if seq != 0 {
            v.extend_from_slice(&seq.to_le_bytes());
        }
        v.extend_from_slice(&self.event);
        v
    }

    /// The entry as stored, and its seq (0: none).
    fn decode(b: &[u8]) -> Option<(Self, u64)> {
        if b.len() < 14 {
            return None;
        }
        let state = match b[0] & !SEQ_FOLLOWS {
            1 => LedgerState::Pending,
            2 => LedgerState::Sending,
            3 => LedgerState::Final,
            _ => return None,
        };
        let (seq, event) = if b[0] & SEQ_FOLLOWS != 0 {
            (
                u64::from_le_bytes(b.get(14..22)?.try_into().ok()?),
                &b[22..],
            )
        } else {
            (0, &b[14..])
        };
        Some((
            Self {
                state,
                published: b[1] != 0,
                attempts: u32::from_le_bytes(b[2..6].try_into().ok()?),
                updated_ms: i64::from_le_bytes(b[6..14].try_into().ok()?),
                event: event.to_vec(),
            },
            seq,
        ))
    }
}

/// In [`Table::StoreMeta`] once [`Table::JobsByNumber`] covers every final record.
const JOBS_INDEXED_KEY: &[u8] = b"jobs_by_number_indexed_v1";

/// A job's key in [`Table::JobsByNumber`]: `digits \0 job id`.
pub fn number_job_key(digits: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(digits.len() + 1 + id.len());
    k.extend_from_slice(digits.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The [`Table::JobsByNumber`] row of a job to `to` (E.164, the `+` optional), to commit with
/// its final record; None when `to` is no number (an invalid job's may be anything), which
/// leaves nothing of it to find.
pub fn index_job(to: &str, id: &str, wamid: Option<&str>) -> Option<KvOp> {
    let digits = to.strip_prefix('+').unwrap_or(to);
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(KvOp::Put {
        table: Table::JobsByNumber,
        key: number_job_key(digits, id),
        value: wamid.unwrap_or_default().as_bytes().to_vec(),
    })
}

/// Set in an entry's state byte when a seq (8 bytes) follows the fixed header.
const SEQ_FOLLOWS: u8 = 0x80;

/// Where [`Marks`] keeps itself in [`Table::StoreMeta`].
const MARKS_KEY: &[u8] = b"publish_marks_v1";
/// Ranges of unknown publication remembered (one per unclean stop); older ones are forgotten.
const MAX_GAPS: usize = 64;

/// Which final entries have had their outcome event confirmed by the broker, kept in memory
/// instead of one store write per job.
///
/// Each final entry written unpublished gets the next sequence number (`seq`), stored in its
/// row. Until its event is confirmed the seq is *unconfirmed*; confirming is a map removal.
/// With every commit the writer stores, in one small row, the highest seq handed out and the
/// watermark below which every seq is confirmed. After a stop that left seqs unconfirmed (a
/// crash, or events that could not be published), the range between the two becomes a *gap*:
/// its entries count as unpublished, so their redelivery publishes the stored event again, as
/// before. Marking such an entry published (after its republish) is a durable row write, the
/// old way; so is any entry written before this scheme (no seq).
#[derive(Debug)]
struct Marks {
    /// The seq the next unpublished final entry gets; seqs start at 1 (0 means none).
    next: u64,
    /// Final entries written (committed or being committed) whose event is not yet confirmed.
    unconfirmed: HashMap<Box<str>, u64>,
    /// The same seqs in order: the lowest one bounds the watermark.
    unconfirmed_seqs: BTreeSet<u64>,
    /// Inclusive seq ranges left unconfirmed by earlier runs that did not stop cleanly.
    gaps: Vec<(u64, u64)>,
    /// The stored row is behind memory.
    dirty: bool,
}

impl Marks {
    fn new() -> Self {
        Marks {
            next: 1,
            unconfirmed: HashMap::new(),
            unconfirmed_seqs: BTreeSet::new(),
            gaps: Vec::new(),
            dirty: false,
        }
    }

    /// Restores the state a previous run stored: whatever it handed out above its watermark
    /// becomes a gap.
    fn load(row: Option<&[u8]>) -> Self {
        let mut m = Marks::new();
        let Some(row) = row else { return m };
        let word = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                row.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        let (Some(high), Some(watermark)) = (word(0), word(1)) else {
            return m;
        };
        let mut i = 2;
        while let (Some(a), Some(b)) = (word(i), word(i + 1)) {
            m.gaps.push((a, b));
            i += 2;
        }
        if watermark < high {
            m.gaps.push((watermark + 1, high));
            m.dirty = true;
        }
        if m.gaps.len() > MAX_GAPS {
            m.gaps.drain(..m.gaps.len() - MAX_GAPS);
        }
        m.next = high + 1;
        m
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + 16 * self.gaps.len());
        v.extend_from_slice(&(self.next - 1).to_le_bytes());
        v.extend_from_slice(&self.watermark().to_le_bytes());
        for (a, b) in &self.gaps {
            v.extend_from_slice(&a.to_le_bytes());
            v.extend_from_slice(&b.to_le_bytes());
        }
        v
    }

    /// Every seq at or below it is confirmed (or in a gap).
    fn watermark(&self) -> u64 {
        match self.unconfirmed_seqs.first() {
            Some(s) => s - 1,
            None => self.next - 1,
        }
    }

    /// Hands out a seq for `id`'s final entry, unconfirmed until [`Marks::confirm`].
    fn assign(&mut self, id: &str) -> u64 {
        let seq = self.next;
        self.next += 1;
        if let Some(old) = self.unconfirmed.insert(id.into(), seq) {
            self.unconfirmed_seqs.remove(&old);
        }
        self.unconfirmed_seqs.insert(seq);
        self.dirty = true;
        seq
    }

    /// A batch that assigned seqs failed to commit: those rows do not exist.
    fn forget(&mut self, assigned: &[(Box<str>, u64)]) {
        for (id, seq) in assigned {
            if self.unconfirmed.get(id) == Some(seq) {
                self.unconfirmed.remove(id);
            }
            self.unconfirmed_seqs.remove(seq);
        }
    }

    /// The event of `id`'s final entry is confirmed; false when `id` has no unconfirmed seq
    /// in this run (its row must be marked the durable way).
    fn confirm(&mut self, id: &str) -> bool {
        match self.unconfirmed.remove(id) {
            Some(seq) => {
                self.unconfirmed_seqs.remove(&seq);
                self.dirty = true;
                true
            }
            None => false,
        }
    }

    fn published(&self, seq: u64) -> bool {
        seq != 0
            && seq < self.next
            && !self.unconfirmed_seqs.contains(&seq)
            && !self.gaps.iter().any(|&(a, b)| a <= seq && seq <= b)
    }
}

/// Errors of the store; all of them are worth retrying later (disk full, I/O), none is the job's
/// fault, so the job stays unacked and comes back.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("state store: {0}")]
    Store(String),
    /// The file could not be read or written (full disk, I/O error), or is being reopened after
    /// such an error: the writer reopens the store and retries (see [`super::health`]).
    #[error("state store I/O: {0}")]
    Io(String),
    #[error("state store writer has stopped")]
    WriterGone,
    /// Another process (the running daemon) has the store open.
    #[error("the state store is in use by another process (is the daemon running?)")]
    InUse,
    /// A [`KvOp::ClaimJob`] found another entry than it expected: someone else decided first.
    /// Nothing of the write was applied.
    #[error("the job's ledger entry changed since it was read (another claim won)")]
    ClaimLost,
    /// The database's schema is newer than this binary knows: it was migrated by a newer
    /// sendwell. Refuse to start (exit 78) rather than write what the newer one cannot read.
    #[error(
        "the state database's schema is version {found}, newer than this sendwell knows (up to {known}); run the newer sendwell, or restore a backup made for this one"
    )]
    SchemaTooNew { found: i64, known: i64 },
}

impl<E: Into<redb::Error>> From<E> for LedgerError {
    fn from(e: E) -> Self {
        match e.into() {
            // After an I/O error redb answers everything with PreviousIo until it is reopened.
            e @ (redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed) => {
                LedgerError::Io(e.to_string())
            }
            e => LedgerError::Store(e.to_string()),
        }
    }
}

impl LedgerError {
    /// The store's file failed (or is being reopened): nothing about the data is wrong, and the
    /// same write succeeds once the disk has room again.
    pub fn is_io(&self) -> bool {
        matches!(self, LedgerError::Io(_))
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
    /// The copier thread of copy number .0 has finished (or given up): the writer swaps the
    /// copy in. The number tells an abandoned copy's late word from the current one's.
    CopyDone(u64),
}

/// One change of an atomic [`super::Ledger::kv_many`] write.
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
    /// One send counted (`add`) or un-counted at `at` in a send log (the frequency caps'
    /// rows: u32 LE seconds, newest first, at most `keep` of them). `log` is the writer's whole
    /// log after the change: redb (one process, one writer) stores it as it is, or deletes the
    /// row when it is empty, exactly as a `Put`/`Delete` did. PostgreSQL applies the change to
    /// the row as it stands, under the row's lock (`sw_log_send`, migration 0005), so two
    /// instances counting sends to one recipient at once each add theirs instead of one
    /// overwriting the other's; `log` is written only where there is no row yet.
    LogSend {
        table: Table,
        key: Vec<u8>,
        log: Vec<u8>,
        at: u32,
        add: bool,
        keep: u8,
    },
    /// Records a job's ledger entry (with [`super::Ledger::put_with`]: together with what it implies).
    PutJob {
        id: String,
        entry: LedgerEntry,
    },
    /// Records a job's ledger entry only if the current one is still what the caller decided
    /// from: `expect` None = no entry; `Some((state, attempts))` = an entry in that state with
    /// that many attempts. The first op of its write, and only there: when the current entry
    /// differs, none of the write's ops is applied and the write fails with
    /// [`LedgerError::ClaimLost`]; other writes committed with it are not affected. Exactly
    /// one of any number of racing claims on one id wins. Anywhere else in a write it fails
    /// that write ([`LedgerError::Store`]), whatever it expects, on every backend.
    ClaimJob {
        id: String,
        entry: LedgerEntry,
        expect: Option<(LedgerState, u32)>,
    },
}

struct Request {
    op: Op,
    /// None for fire-and-forget writes whose loss is harmless (the "published" marker).
    done: Option<oneshot::Sender<Result<u64, LedgerError>>>,
}

/// Opens the store's file (again): after an I/O error redb must be closed and reopened.
type Opener = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

/// The open database; None between closing a failed one and opening it again (only the
/// writer's reopen and compaction take the lock alone).
pub(super) type Db = RwLock<Option<Database>>;

/// Handle to the ledger; cheap to clone.
#[derive(Clone)]
pub struct RedbLedger {
    /// Readers and the writer share it; only compaction (after an erasure) and reopening after
    /// an I/O error take it alone.
    db: Arc<Db>,
    tx: mpsc::UnboundedSender<Request>,
    /// Which final entries' events are confirmed: in memory, stored once per commit.
    marks: Arc<Mutex<Marks>>,
    /// Whether writes succeed now.
    health: Arc<StoreHealth>,
    /// Rows visited by whole-table scans, so tests and benchmarks can tell a lookup from a scan.
    scanned: Arc<AtomicU64>,
    compacting: Arc<Compacting>,
}

impl RedbLedger {
    /// Opens (or creates) `state.redb` in `dir` and starts the writer thread, which ends when the
    /// last handle is dropped.
    pub fn open(dir: &Path) -> Result<RedbLedger, LedgerError> {
        Self::open_with(dir, None)
    }

    /// [`RedbLedger::open`], with a hook run after each chunk of a compaction's copy.
    fn open_with(
        dir: &Path,
        chunk_hook: Option<compaction::ChunkHook>,
    ) -> Result<RedbLedger, LedgerError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| LedgerError::Store(format!("cannot create {}: {e}", dir.display())))?;
        // A handle just dropped in this process closes on its writer thread a moment later;
        // anything holding the file longer than that is another process.
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let path = dir.join("state.redb");
        let file = path.clone();
        let opener: Opener = Box::new(move || Database::create(&path));
        let lock_path = dir.join("state.redb.lock");
        loop {
            // The lock file first (see `Writer::_lock`), then redb's own lock on the store.
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .or_else(|e| match e.kind() {
                    // Made by another user (a tool run as root before the daemon's first
                    // start): a read-only descriptor takes the lock as well.
                    std::io::ErrorKind::PermissionDenied => std::fs::File::open(&lock_path),
                    _ => Err(e),
                })
                .map_err(|e| {
                    LedgerError::Store(format!("cannot open {}: {e}", lock_path.display()))
                })?;
            // flock: released with the file, or by the kernel when the process dies.
            let opened = match rustix::fs::flock(
                &lock,
                rustix::fs::FlockOperation::NonBlockingLockExclusive,
            ) {
                Ok(()) => opener(),
                Err(rustix::io::Errno::WOULDBLOCK) => Err(redb::DatabaseError::DatabaseAlreadyOpen),
                Err(e) => {
                    return Err(LedgerError::Store(format!(
                        "cannot lock {}: {e}",
                        lock_path.display()
                    )));
                }
            };
            match opened {
                Ok(db) => {
                    // A compaction by copy that a crash or a stop interrupted: the store is ours
                    // now (redb's lock), so its copy is stale. It may hold a number erased
                    // since; removed, it holds nothing.
                    let _ = std::fs::remove_file(compaction::copy_path(&file));
                    return Self::start(db, Some(opener), Some(file), chunk_hook, Some(lock));
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if std::time::Instant::now() < deadline =>
                {
                    drop(lock);
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(LedgerError::InUse),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A store that lives in memory only: for tests and benchmarks.
    pub fn open_in_memory() -> Result<RedbLedger, LedgerError> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Self::start(db, None, None, None, None)
    }

    /// The path of the store file in a state directory.
    pub fn file_in(dir: &Path) -> std::path::PathBuf {
        dir.join("state.redb")
    }

    /// Whether writes succeed now, and waiting for them to.
    pub fn health(&self) -> &Arc<StoreHealth> {
        &self.health
    }

    /// Whether the store takes writes now.
    pub fn writable(&self) -> bool {
        self.health.writable()
    }

    /// Resolves once the store takes writes (at once when it does now).
    pub async fn wait_writable(&self) {
        self.health.wait_writable().await
    }

    /// Whether a compaction holds the store (or waits for it) now.
    pub fn compacting(&self) -> bool {
        self.compacting.on.load(Ordering::Relaxed)
    }

    /// Resolves once no compaction holds the store: at once (one atomic load) when none does.
    /// For paths that read the store for every job: they wait here parked, while a read that
    /// meets a compaction unannounced waits on a thread of its own (see [`read`]).
    pub async fn compacted(&self) {
        if !self.compacting() {
            return;
        }
        let mut rx = self.compacting.changed.subscribe();
        let _ = rx.wait_for(|on| !on).await;
    }

    /// `opener` opens the same file again after an I/O error (None: an in-memory store).
    /// `file`: the store's file (None: in memory); a reopen waits until its file system has
    /// room, and a compaction copies it. `chunk_hook`: run after each chunk of such a copy.
    fn start(
        db: Database,
        opener: Option<Opener>,
        file: Option<PathBuf>,
        chunk_hook: Option<compaction::ChunkHook>,
        lock: Option<std::fs::File>,
    ) -> Result<RedbLedger, LedgerError> {
        let db = Arc::new(RwLock::new(Some(db)));
        {
            let w = read(&db)?.begin_write()?;
            w.open_table(LEDGER)?;
            for t in Table::ALL {
                w.open_table(t.def())?;
            }
            w.commit()?;
        }
        let marks = {
            let g = read(&db)?;
            let r = g.begin_read()?;
            let t = r.open_table(Table::StoreMeta.def())?;
            let row = t.get(MARKS_KEY)?;
            Marks::load(row.as_ref().map(|v| v.value()))
        };
        let marks = Arc::new(Mutex::new(marks));
        let (tx, rx) = mpsc::unbounded_channel();
        let health = Arc::new(StoreHealth::default());
        let compacting = Arc::new(Compacting::default());
        let writer = Writer {
            db: db.clone(),
            marks: marks.clone(),
            health: health.clone(),
            opener,
            room: file
                .as_deref()
                .and_then(Path::parent)
                .map(Path::to_path_buf),
            compacting: compacting.clone(),
            file,
            tracking: Arc::default(),
            copying: Mutex::new(None),
            next_round: Mutex::new(Vec::new()),
            wake: tx.downgrade(),
            chunk_hook,
            copies: AtomicU64::new(0),
            _lock: lock,
        };
        *OPEN_WRITERS.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        std::thread::Builder::new()
            .name("sendwell-ledger".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| {
                *OPEN_WRITERS.0.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
                LedgerError::Store(format!("cannot start writer thread: {e}"))
            })?;
        Ok(RedbLedger {
            db,
            tx,
            marks,
            health,
            scanned: Arc::default(),
            compacting,
        })
    }

    pub fn get(&self, id: &str) -> Result<Option<LedgerEntry>, LedgerError> {
        let g = read(&self.db)?;
        self.entry_in(&g.begin_read()?, id)
    }

    /// The job's entry as `r` sees it, its publish mark from memory when not stored yet.
    fn entry_in(
        &self,
        r: &redb::ReadTransaction,
        id: &str,
    ) -> Result<Option<LedgerEntry>, LedgerError> {
        let t = r.open_table(LEDGER)?;
        let Some((mut entry, seq)) = t.get(id)?.and_then(|v| LedgerEntry::decode(v.value())) else {
            return Ok(None);
        };
        if !entry.published && seq != 0 {
            entry.published = lock(&self.marks).published(seq);
        }
        Ok(Some(entry))
    }

    /// [`Self::get`] and, for a final entry only, `table`'s row under the same id, from one read
    /// transaction: a status callback reads its finished job's entry and delivery row together.
    pub fn get_with(
        &self,
        id: &str,
        table: Table,
    ) -> Result<(Option<LedgerEntry>, Option<Vec<u8>>), LedgerError> {
        let g = read(&self.db)?;
        let r = g.begin_read()?;
        let Some(entry) = self.entry_in(&r, id)? else {
            return Ok((None, None));
        };
        if entry.state != LedgerState::Final {
            return Ok((Some(entry), None));
        }
        let row = r
            .open_table(table.def())?
            .get(id.as_bytes())?
            .map(|v| v.value().to_vec());
        Ok((Some(entry), row))
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

    /// Records that the outcome event was confirmed by the broker, before the job is acked, so
    /// that the next copy of the same id (queued behind this one) sees it and answers
    /// `duplicate` rather than republishing. For an entry finalized in this run that is a
    /// change in memory ([`Marks`]), stored with the next commit; a crash before that leaves
    /// the entry unpublished, and its redelivery republishes the same stored event, byte for
    /// byte: consumers see a repeat of an identical event (at-least-once delivery). Other
    /// entries (finalized before a restart) are marked by a row write, awaited.
    pub async fn mark_published(&self, id: &str) -> Result<(), LedgerError> {
        if lock(&self.marks).confirm(id) {
            return Ok(());
        }
        self.write(Op::MarkPublished { id: id.into() })
            .await
            .map(|_| ())
    }

    /// Stores the confirmations made since the last commit now, without waiting: for an idle
    /// moment, so that a crash long after the last job forgets none of them.
    pub fn save_marks_nowait(&self) {
        if lock(&self.marks).dirty {
            let _ = self.tx.send(Request {
                op: Op::Many(Vec::new()),
                done: None,
            });
        }
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
                    .map(|(e, _)| e.updated_ms < older_than_ms)
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
            this.kv_for_each(Table::JobsByNumber, |k, _| {
                let id = k.splitn(2, |b| *b == 0).nth(1).unwrap_or_default();
                if std::str::from_utf8(id).is_ok_and(|id| gone.contains(id)) {
                    ops.push(KvOp::Delete {
                        table: Table::JobsByNumber,
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
            let g = read(&self.db)?;
            let r = g.begin_read()?;
            let t = r.open_table(LEDGER)?;
            let rows = match &after {
                None => t.iter()?,
                Some(k) => t.range::<&str>((Bound::Excluded(k.as_str()), Bound::Unbounded))?,
            };
            let mut last = None;
            for (n, row) in rows.enumerate() {
                let (k, v) = row?;
                self.scanned.fetch_add(1, Ordering::Relaxed);
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

    /// Calls `f` with every ledger entry that decodes, page by page, `published` resolved as
    /// [`RedbLedger::get`] resolves it: a final entry whose publication is unknown (in a gap
    /// of [`Marks`]) reads as unpublished, so wherever it goes its redelivery republishes the
    /// stored event. For copying the ledger elsewhere (`state migrate`).
    pub fn for_each_entry(&self, mut f: impl FnMut(&str, LedgerEntry)) -> Result<(), LedgerError> {
        self.for_each_job(|id, v| {
            let Some((mut entry, seq)) = LedgerEntry::decode(v) else {
                return;
            };
            if !entry.published && seq != 0 {
                entry.published = lock(&self.marks).published(seq);
            }
            f(id, entry)
        })
    }

    /// How many ledger entries (job ids) the store has.
    pub fn job_count(&self) -> Result<u64, LedgerError> {
        use redb::ReadableTableMetadata;
        let g = read(&self.db)?;
        let r = g.begin_read()?;
        Ok(r.open_table(LEDGER)?.len()?)
    }

    pub fn kv_get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, LedgerError> {
        let g = read(&self.db)?;
        let r = g.begin_read()?;
        let t = r.open_table(table.def())?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Every row of a table, for loading an in-memory cache at start.
    pub fn kv_scan(&self, table: Table) -> Result<Vec<KvRow>, LedgerError> {
        let g = read(&self.db)?;
        let r = g.begin_read()?;
        let t = r.open_table(table.def())?;
        let mut rows = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            self.scanned.fetch_add(1, Ordering::Relaxed);
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
        let g = read(&self.db)?;
        let r = g.begin_read()?;
        Ok(r.open_table(table.def())?.len()?)
    }

    /// Rows whose key starts with `prefix`, in key order.
    pub fn kv_scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Vec<KvRow>, LedgerError> {
        let g = read(&self.db)?;
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

    /// Rows whose key starts with any of `prefixes`, from one read snapshot (unordered; the
    /// caller sorts and drops repeats).
    pub fn kv_scan_prefixes(
        &self,
        table: Table,
        prefixes: &[Vec<u8>],
    ) -> Result<Vec<KvRow>, LedgerError> {
        let g = read(&self.db)?;
        let r = g.begin_read()?;
        let t = r.open_table(table.def())?;
        let mut rows = Vec::new();
        for prefix in prefixes {
            for row in t.range(prefix.as_slice()..)? {
                let (k, v) = row?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                rows.push((k.value().to_vec(), v.value().to_vec()));
            }
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
            let g = read(&self.db)?;
            let r = g.begin_read()?;
            let t = r.open_table(table.def())?;
            let rows = match &after {
                None => t.iter()?,
                Some(k) => t.range::<&[u8]>((Bound::Excluded(k.as_slice()), Bound::Unbounded))?,
            };
            let mut last = None;
            for (n, row) in rows.enumerate() {
                let (k, v) = row?;
                self.scanned.fetch_add(1, Ordering::Relaxed);
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

    /// Compacts the file, so that no freed page keeps erased bytes: by copy beside the running
    /// store (see [`compaction`]), which holds it alone only to swap the copy in; in place
    /// (redb's `compact`, the store held throughout) for an in-memory store or when there is no
    /// room for the copy. Returns once done, with how long the store was held alone (ms).
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
            let old = LedgerEntry::decode(v).is_none_or(|(e, _)| e.updated_ms <= until_ms);
            if old && v.windows(needle.len()).any(|w| w == needle) {
                ids.push(k.to_string());
            }
        })?;
        Ok(ids)
    }

    /// The jobs to a number (digits) that [`Table::JobsByNumber`] knows: (job id, wamid; empty
    /// when none). A prefix range of one table: no scan of the ledger.
    pub fn jobs_to(&self, digits: &str) -> Result<Vec<(String, Vec<u8>)>, LedgerError> {
        let prefix = number_job_key(digits, "");
        Ok(self
            .kv_scan_prefix(Table::JobsByNumber, &prefix)?
            .into_iter()
            .filter_map(|(k, wamid)| {
                let id = String::from_utf8(k[prefix.len()..].to_vec()).ok()?;
                Some((id, wamid))
            })
            .collect())
    }

    /// Rows visited by whole-table scans since the store was opened.
    pub fn scanned_rows(&self) -> u64 {
        self.scanned.load(Ordering::Relaxed)
    }

    /// Fills [`Table::JobsByNumber`] from the ledger once, for stores written before it existed
    /// (their final records carry the number in the stored event, as the old erasure's scan
    /// read it). Recorded in the store's meta, so later opens skip it; a crash before that
    /// only means doing it again (each row is a plain put). Run before jobs are taken: every
    /// job finalized after it writes its own row. Returns the rows written, None when done
    /// before.
    pub async fn index_jobs_by_number(&self) -> Result<Option<u64>, LedgerError> {
        if self.kv_get(Table::StoreMeta, JOBS_INDEXED_KEY)?.is_some() {
            return Ok(None);
        }
        #[derive(serde::Deserialize)]
        struct Stored {
            to: Option<String>,
            wamid: Option<String>,
        }
        let this = self.clone();
        let ops = tokio::task::spawn_blocking(move || {
            let mut ops = Vec::new();
            this.for_each_job(|id, v| {
                let Some((e, _)) = LedgerEntry::decode(v) else {
                    return;
                };
                if e.state != LedgerState::Final {
                    return;
                }
                let Ok(ev) = serde_json::from_slice::<Stored>(&e.event) else {
                    return;
                };
                if let Some(op) = ev.to.and_then(|to| index_job(&to, id, ev.wamid.as_deref())) {
                    ops.push(op);
                }
            })?;
            Ok::<_, LedgerError>(ops)
        })
        .await
        .map_err(|e| LedgerError::Store(format!("index scan: {e}")))??;
        let n = ops.len() as u64;
        // Small batches, as purge writes: other writes are never held behind one huge commit.
        for chunk in ops.chunks(2000) {
            self.kv_many(chunk.to_vec()).await?;
        }
        self.kv_put(Table::StoreMeta, JOBS_INDEXED_KEY.to_vec(), vec![1])
            .await?;
        Ok(Some(n))
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

    /// Runs `purge` every hour until cancelled, keeping entries for `retention`; and stores
    /// the publish confirmations of a quiet second (see [`RedbLedger::save_marks_nowait`]).
    pub async fn purge_loop(
        self,
        retention: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        let mut marks_tick = tokio::time::interval(Duration::from_secs(1));
        marks_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = marks_tick.tick() => {
                    self.save_marks_nowait();
                    continue;
                }
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

/// The open database, for as long as the guard lives.
pub(super) struct DbRead<'a>(RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for DbRead<'_> {
    type Target = Database;
    fn deref(&self) -> &Database {
        self.0.as_ref().expect("checked by read()")
    }
}

/// The open database; an I/O error while the writer is reopening it.
///
/// Reads run on tokio's worker threads (dedupe's lookup on every job, webhooks, acks), so they
/// must not block one: a compaction or a reopen holds the lock alone for as long as it takes,
/// and std's RwLock lets no new reader in while a writer waits (it prefers writers, so a stream
/// of readers cannot starve the compaction). The uncontended case, nearly every read, is one
/// atomic operation as before; only when the lock is taken or wanted does the reader wait, and
/// on a multi-thread runtime it waits in `block_in_place`, which hands the worker's other tasks
/// (timers, `/healthz`, the watchdog, jobs that need no store) to another thread first.
pub(super) fn read(db: &Db) -> Result<DbRead<'_>, LedgerError> {
    let g = match db.try_read() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        Err(TryLockError::WouldBlock) => wait_read(db),
    };
    if g.is_none() {
        return Err(LedgerError::Io(
            "the store is being reopened after an I/O error".into(),
        ));
    }
    Ok(DbRead(g))
}

/// For `benches/erase.rs` only, to measure before and after in one run: a read waits for the
/// lock in place, blocking its worker, as reads did before. Looked at only when a read has to
/// wait, never on the uncontended path.
#[doc(hidden)]
pub static READS_BLOCK_WORKERS: AtomicBool = AtomicBool::new(false);

/// Waits for the read lock (see [`read`]).
fn wait_read(db: &Db) -> RwLockReadGuard<'_, Option<Database>> {
    let wait = || db.read().unwrap_or_else(|e| e.into_inner());
    if READS_BLOCK_WORKERS.load(Ordering::Relaxed) {
        return wait();
    }
    match tokio::runtime::Handle::try_current() {
        // On a worker (or in the runtime's block_on): the runtime goes on elsewhere meanwhile.
        // From spawn_blocking it simply runs the closure.
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        // A current_thread runtime (block_in_place would panic) has no other thread to hand its
        // tasks to: it waits, as does a plain thread (the writer, a blocking scan).
        _ => wait(),
    }
}

fn lock(marks: &Mutex<Marks>) -> MutexGuard<'_, Marks> {
    marks.lock().unwrap_or_else(|e| e.into_inner())
}

/// Rewrites the file so that freed pages (which still hold erased bytes: redb is
/// copy-on-write) are overwritten by live pages or cut off the end.
fn compact(db: &Db) -> Result<u64, LedgerError> {
    let mut g = db.write().unwrap_or_else(|e| e.into_inner());
    let Some(g) = g.as_mut() else {
        return Err(LedgerError::Io(
            "the store is being reopened after an I/O error".into(),
        ));
    };
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

/// The writer thread's state.
struct Writer {
    db: Arc<Db>,
    marks: Arc<Mutex<Marks>>,
    health: Arc<StoreHealth>,
    opener: Option<Opener>,
    /// The state directory: a reopen waits until its file system has room (see `reopen`).
    room: Option<PathBuf>,
    compacting: Arc<Compacting>,
    /// The store's file (None: in memory), which a compaction by copy replaces.
    file: Option<PathBuf>,
    /// The keys written while a copy runs (see [`compaction`]).
    tracking: Arc<Tracking>,
    /// The copy under way, if any.
    copying: Mutex<Option<Copying>>,
    /// Compactions asked for while a copy was under way: their erasures may be newer than its
    /// snapshot, so they get the next one.
    next_round: Mutex<Vec<Reply>>,
    /// For the copier to wake the writer when it is done; weak, so that the writer still ends
    /// when the last handle is dropped.
    wake: mpsc::WeakUnboundedSender<Request>,
    /// Run after each chunk of a copy (tests).
    chunk_hook: Option<compaction::ChunkHook>,
    /// Copies started so far: each copy's number.
    copies: AtomicU64,
    /// The store's lock file (`state.redb.lock`), taken before the file is opened and held for
    /// as long as the writer runs. redb's own lock on the file is let go for a moment when a
    /// compaction swaps its copy in (see `swap_in`): a tool opening the store then (`state
    /// migrate`, `backup`) would have taken it from the running daemon. None in memory.
    _lock: Option<std::fs::File>,
}

/// Where a write's result goes (None: nobody waits for it).
type Reply = Option<oneshot::Sender<Result<u64, LedgerError>>>;

/// A compaction by copy under way.
struct Copying {
    number: u64,
    thread: std::thread::JoinHandle<Result<compaction::Copied, LedgerError>>,
    abort: Arc<compaction::Abort>,
    /// The compactions it answers.
    replies: Vec<Reply>,
}

/// For `benches/erase.rs` only, to measure before and after in one run: compactions run in
/// place (redb's `compact`, the store held alone throughout), as they did before compaction by
/// copy.
#[doc(hidden)]
pub static COMPACT_IN_PLACE: AtomicBool = AtomicBool::new(false);

/// Whether a compaction holds the store alone, so that the job path can wait for it parked
/// ([`RedbLedger::compacted`]) rather than in `block_in_place`, which takes a thread per waiting
/// task: with thousands of jobs in flight that would exhaust tokio's blocking pool (512
/// threads), and past it the runtime stalls again.
#[derive(Debug)]
struct Compacting {
    on: AtomicBool,
    changed: tokio::sync::watch::Sender<bool>,
}

impl Default for Compacting {
    fn default() -> Self {
        Compacting {
            on: AtomicBool::new(false),
            changed: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Compacting {
    /// Runs `f` with the flag up: set before the lock is asked for, so that new jobs already
    /// wait parked while the compaction waits for the readers in progress.
    fn during<R>(&self, f: impl FnOnce() -> R) -> R {
        self.on.store(true, Ordering::SeqCst);
        self.changed.send_replace(true);
        let r = f();
        self.on.store(false, Ordering::SeqCst);
        self.changed.send_replace(false);
        r
    }
}

/// Waits between attempts while the store cannot be written: doubling from the first to the
/// last, so a full disk freed is noticed within about two seconds.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

impl Writer {
    /// Runs on the writer thread; `start` counted it in [`OPEN_WRITERS`] before spawning it.
    fn run(self, rx: mpsc::UnboundedReceiver<Request>) {
        self.write_loop(rx);
        // Every handle is gone: a copy under way is abandoned (the next open removes its file).
        let copying = self
            .copying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(c) = copying {
            self.abandon(c, "the store is closing");
        }
        // Confirmations since the last commit: stored now, so a clean stop leaves no gap.
        if lock(&self.marks).dirty {
            let _ = apply(&self.db, &self.marks, &[], None);
        }
        // The last handle is gone: dropping the database here closes the file cleanly.
        drop(self);
        let (lock, cvar) = &OPEN_WRITERS;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        cvar.notify_all();
    }

    fn write_loop(&self, mut rx: mpsc::UnboundedReceiver<Request>) {
        let mut batch: Vec<Request> = Vec::with_capacity(1024);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            // Compactions run after the writes they came with have committed.
            let mut compactions = Vec::new();
            let mut copy_done = None;
            batch.retain_mut(|r| match r.op {
                Op::Compact => {
                    compactions.push(r.done.take());
                    false
                }
                Op::CopyDone(n) => {
                    copy_done = Some(n);
                    false
                }
                _ => true,
            });
            if !batch.is_empty() {
                self.watch_room();
                let result = self.apply_holding(&batch, &rx);
                for (req, res) in batch.drain(..).zip(result) {
                    if let Some(done) = req.done {
                        let _ = done.send(res);
                    }
                }
            }
            if let Some(n) = copy_done {
                // Their erasures committed before this batch: the next copy, started as this
                // one finishes, covers them.
                lock_vec(&self.next_round).append(&mut compactions);
                self.finish_copy(n);
                self.start_next_round();
            } else if !compactions.is_empty() {
                self.compact(compactions);
            }
        }
    }

    /// Starts a compaction by copy for `replies` (see [`compaction`]), or joins the next one if
    /// a copy is under way; compacts in place where a copy cannot be made.
    fn compact(&self, mut replies: Vec<Reply>) {
        let mut copying = self.copying.lock().unwrap_or_else(|e| e.into_inner());
        if copying.is_some() {
            lock_vec(&self.next_round).append(&mut replies);
            return;
        }
        let file = match &self.file {
            Some(f) if !COMPACT_IN_PLACE.load(Ordering::Relaxed) => f,
            _ => return self.compact_in_place(replies, "in_place"),
        };
        if !compaction::room_for_copy(file) {
            return self.compact_in_place_no_room(replies);
        }
        // Nothing is being written now (this is the writer, between batches): the snapshot and
        // the start of tracking see exactly the same commits.
        let snapshot = match read(&self.db).and_then(|g| Ok(g.begin_read()?)) {
            Ok(s) => s,
            Err(e) => return answer(replies, Err(e)),
        };
        self.tracking.start();
        let abort = Arc::new(compaction::Abort::default());
        let (db, tracking, path, wake) = (
            self.db.clone(),
            self.tracking.clone(),
            compaction::copy_path(file),
            self.wake.clone(),
        );
        let (stop, hook) = (abort.clone(), self.chunk_hook.clone());
        let number = self.copies.fetch_add(1, Ordering::Relaxed) + 1;
        let spawned = std::thread::Builder::new()
            .name("sendwell-compact".into())
            .spawn(move || {
                // A panic (redb may panic on a damaged page) must still wake the writer, or
                // this compaction and every later one would wait for good.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    compaction::copy(&db, snapshot, &path, &tracking, &stop, hook.as_ref())
                }))
                .unwrap_or_else(|_| {
                    Err(LedgerError::Store("the compaction's copy panicked".into()))
                });
                if r.is_err() {
                    let _ = std::fs::remove_file(&path);
                }
                if let Some(tx) = wake.upgrade() {
                    let _ = tx.send(Request {
                        op: Op::CopyDone(number),
                        done: None,
                    });
                }
                r
            });
        match spawned {
            Ok(thread) => {
                *copying = Some(Copying {
                    number,
                    thread,
                    abort,
                    replies,
                })
            }
            Err(e) => {
                self.tracking.stop();
                answer(
                    replies,
                    Err(LedgerError::Store(format!("cannot start compaction: {e}"))),
                );
            }
        }
    }

    /// redb's own compaction: the store held alone throughout.
    fn compact_in_place(&self, replies: Vec<Reply>, kind: &'static str) {
        let started = std::time::Instant::now();
        let result = self.compacting.during(|| compact(&self.db));
        let held = started.elapsed();
        crate::metrics::store_compacted(kind, result.is_ok(), held);
        answer(replies, result.map(|_| held.as_millis() as u64));
    }

    /// No room for a copy (before it, or it ran out): the erasure must still leave the file,
    /// so in place, and the operator is told why jobs waited.
    fn compact_in_place_no_room(&self, replies: Vec<Reply>) {
        if crate::metrics::log_due("compaction", "no_room").is_some() {
            tracing::warn!(
                dir = %self.room.as_deref().unwrap_or(Path::new("")).display(),
                "No room beside the state store for a compacting copy of it: compacting in place, which holds every job until it is done."
            );
        }
        self.compact_in_place(replies, "in_place_no_room");
    }

    /// Before a batch while a copy is under way: when the file system runs low, the copy gives
    /// up (its snapshot pins every page jobs free in the old file, and the copy itself grows),
    /// so that the store keeps room for jobs.
    fn watch_room(&self) {
        let copying = self.copying.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(c), Some(dir)) = (copying.as_ref(), &self.room)
            && compaction::free_bytes(dir).is_some_and(|f| f < compaction::COPY_RESERVE)
        {
            c.abort.no_room();
        }
    }

    /// Step 4 of a compaction by copy: the last keys, then the copy swapped in for the file.
    fn finish_copy(&self, number: u64) {
        let c = {
            let mut copying = self.copying.lock().unwrap_or_else(|e| e.into_inner());
            match copying.take() {
                Some(c) if c.number == number => c,
                // Abandoned since (its replies are answered), or none: nothing to finish.
                other => {
                    *copying = other;
                    return;
                }
            }
        };
        let result = c
            .thread
            .join()
            .unwrap_or_else(|_| Err(LedgerError::Store("compaction thread panicked".into())));
        let file = self.file.as_deref().expect("a copy is only made of a file");
        let path = compaction::copy_path(file);
        let held_since = std::time::Instant::now();
        let swapped = result.and_then(|copied| {
            // The store is ours alone from here: nothing is written until this returns, and
            // readers wait (parked) only for the swap itself.
            let last = read(&self.db)
                .and_then(|g| Ok(g.begin_read()?))
                .and_then(|now| compaction::finish(&now, &copied.dest, &self.tracking))?;
            let (rows, took) = (copied.rows, copied.took);
            self.compacting
                .during(|| self.swap_in(copied.dest, &path, file))?;
            tracing::info!(
                rows,
                caught_up = copied.caught_up + last,
                took_ms = took.as_millis() as u64,
                held_ms = held_since.elapsed().as_millis() as u64,
                "State store compacted by copy."
            );
            Ok(())
        });
        self.tracking.stop();
        let held = held_since.elapsed();
        match swapped {
            Ok(()) => {
                crate::metrics::store_compacted("copy", true, held);
                answer(c.replies, Ok(held.as_millis() as u64));
            }
            Err(_) if c.abort.no_room.load(Ordering::SeqCst) => {
                let _ = std::fs::remove_file(&path);
                crate::metrics::store_compacted("copy", false, held);
                self.compact_in_place_no_room(c.replies);
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                crate::metrics::store_compacted("copy", false, held);
                answer(c.replies, Err(e));
            }
        }
        self.start_next_round();
    }

    /// Renames the copy over the store's file and opens it as the store, with the store held
    /// alone (the caller's `during`).
    fn swap_in(&self, dest: Database, copy: &Path, file: &Path) -> Result<(), LedgerError> {
        let mut g = self.db.write().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            return Err(LedgerError::Io(
                "the store is being reopened after an I/O error".into(),
            ));
        }
        compaction::rename_over(copy, file)?;
        // From the rename on, the copy is the store: the old database (now a file without a
        // name) must never take another write.
        drop(g.take());
        // The copy was made with a small cache; opened again, it gets the store's usual one.
        // Closing it leaves the file without redb's lock for the moment until the open below
        // takes it: the store's lock file (`Writer::_lock`) keeps tools out meanwhile.
        drop(dest);
        match self.opener.as_ref().map(|open| open()) {
            Some(Ok(db)) => *g = Some(db),
            // Left closed: the next write's reopen tries again, as after an I/O error.
            Some(Err(e)) => {
                drop(g);
                crate::metrics::store_reopened(false);
                self.health
                    .failed(&format!("opening the compacted store: {e}"));
            }
            None => {}
        }
        Ok(())
    }

    /// Compactions asked for while the last copy was under way get a copy of their own.
    fn start_next_round(&self) {
        let idle = self
            .copying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none();
        let next = if idle {
            std::mem::take(&mut *lock_vec(&self.next_round))
        } else {
            Vec::new()
        };
        if !next.is_empty() {
            self.compact(next);
        }
    }

    /// Stops a copy under way and removes its file; its compactions fail (the compactor tries
    /// again later).
    fn abandon(&self, c: Copying, why: &str) {
        c.abort.stop.store(true, Ordering::SeqCst);
        let _ = c.thread.join();
        self.tracking.stop();
        if let Some(file) = &self.file {
            let _ = std::fs::remove_file(compaction::copy_path(file));
        }
        crate::metrics::store_compacted("copy", false, Duration::ZERO);
        let mut replies = c.replies;
        replies.append(&mut lock_vec(&self.next_round));
        answer(
            replies,
            Err(LedgerError::Store(format!("compaction abandoned: {why}"))),
        );
    }

    /// Applies the batch. When the file fails (full disk, I/O error), the batch is held: the
    /// store is reopened (redb refuses everything after an I/O error until then) and the batch
    /// tried again, until it commits, the hold runs out, or every handle is gone (shutdown).
    /// Its callers simply wait: a job whose send succeeded keeps its result in memory and is
    /// recorded as soon as the disk has room, never left "in doubt".
    fn apply_holding(
        &self,
        batch: &[Request],
        rx: &mpsc::UnboundedReceiver<Request>,
    ) -> Vec<Result<u64, LedgerError>> {
        let mut wait = RETRY_FIRST;
        loop {
            // The last reopen failed (the disk was still full): try again first.
            if self.db.read().unwrap_or_else(|e| e.into_inner()).is_none() {
                self.reopen();
            }
            let mut keys = self.tracking.active().then(Vec::new);
            let result = apply(&self.db, &self.marks, batch, keys.as_mut());
            let error = match &result {
                Err(e) if e.is_io() => e.to_string(),
                Ok(_) => {
                    self.health.succeeded();
                    if let Some(keys) = keys {
                        self.tracking.add(keys);
                    }
                    return per_request(batch, result);
                }
                Err(_) => return per_request(batch, result),
            };
            self.health.failed(&error);
            let hold = self.health.holding() && !rx.is_closed();
            if hold {
                std::thread::sleep(wait);
                wait = (wait * 2).min(RETRY_MAX);
            }
            // Also when the hold is over: the next batch then meets a fresh store (or, if this
            // fails, tries again first).
            self.reopen();
            if !hold {
                return per_request(batch, result);
            }
        }
    }

    /// Closes the failed database and opens the file again. The old one must be gone first:
    /// redb locks the file while a handle is open.
    fn reopen(&self) {
        let Some(opener) = &self.opener else {
            return;
        };
        // A copy under way reads the failed file, and on a full disk its file and the pages its
        // snapshot pins may be what fills it: it goes first (and is made again later).
        let copying = self
            .copying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(c) = copying {
            self.abandon(c, "the store failed and is being reopened");
        }
        // Opening a file that a failed commit left behind repairs it (0.8 s for a 1.1 GB file,
        // measured), with the store held alone: on a disk that is still full each retry would
        // repeat that for nothing. The failed handle keeps refusing meanwhile, as it would.
        if let Some(dir) = &self.room
            && !has_room(dir)
        {
            crate::metrics::store_reopen_waiting_for_room();
            return;
        }
        let mut g = self.db.write().unwrap_or_else(|e| e.into_inner());
        drop(g.take());
        match opener() {
            Ok(db) => {
                *g = Some(db);
                crate::metrics::store_reopened(true);
            }
            // Not logged: the outage was, once; the next attempt follows shortly.
            Err(_) => crate::metrics::store_reopened(false),
        }
    }
}

/// Free space below which a reopen is not tried: what a repair and the held batch need at least.
const REOPEN_MIN_FREE: u64 = 4 << 20;

/// Whether the file system of `dir` has room for a reopen (unknown: yes, try).
fn has_room(dir: &Path) -> bool {
    match rustix::fs::statvfs(dir) {
        Ok(s) => s.f_bavail.saturating_mul(s.f_frsize) >= REOPEN_MIN_FREE,
        Err(_) => true,
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
    seqs: &mut Seqs<'_>,
    op: &KvOp,
    mut record: Option<&mut Vec<Key>>,
) -> Result<u64, LedgerError> {
    if let Some(r) = record.as_deref_mut() {
        kv_touched(op, r);
    }
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
            if let Some(r) = record {
                r.extend(
                    keys.iter()
                        .map(|k| (Which::Kv(*table), k.as_slice().into())),
                );
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
        KvOp::LogSend {
            table, key, log, ..
        } => {
            let t = tables.get(*table)?;
            if log.is_empty() {
                t.remove(key.as_slice())?;
            } else {
                t.insert(key.as_slice(), log.as_slice())?;
            }
            1
        }
        KvOp::PutJob { id, entry } => {
            let seq = seqs.for_entry(id, entry);
            jobs.insert(id.as_str(), entry.encode(seq).as_slice())?;
            1
        }
        KvOp::ClaimJob { id, entry, expect } => {
            // Only ever first in its write (`apply` refuses it elsewhere), and checked by
            // `claim_holds` just before: this cannot fail unless that check is gone.
            if current_claim(jobs, id)? != *expect {
                return Err(LedgerError::Store(format!(
                    "a claim of job {id} lost after its check"
                )));
            }
            let seq = seqs.for_entry(id, entry);
            jobs.insert(id.as_str(), entry.encode(seq).as_slice())?;
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

/// The keys `op` may write or delete, for a running copy (see [`compaction`]). A key listed
/// that the op then leaves alone costs the catch-up one lookup; one missing would be lost.
fn touched(op: &Op, keys: &mut Vec<Key>) {
    match op {
        Op::Put { id, .. } | Op::MarkPublished { id } | Op::Remove { id } => {
            keys.push((Which::Jobs, id.as_bytes().into()))
        }
        Op::KvPut { table, key, .. } | Op::KvInsertIfAbsent { table, key, .. } => {
            keys.push((Which::Kv(*table), key.as_slice().into()))
        }
        // Each KvOp of a Many is recorded as it is applied (a prefix's keys are known then).
        Op::Many(_) | Op::Compact | Op::CopyDone(_) => {}
    }
}

fn kv_touched(op: &KvOp, keys: &mut Vec<Key>) {
    match op {
        KvOp::Put { table, key, .. }
        | KvOp::Delete { table, key }
        | KvOp::DeleteIf { table, key, .. }
        | KvOp::LogSend { table, key, .. } => keys.push((Which::Kv(*table), key.as_slice().into())),
        KvOp::PutJob { id, .. } | KvOp::ClaimJob { id, .. } => {
            keys.push((Which::Jobs, id.as_bytes().into()))
        }
        KvOp::DeleteJobs { ids } => {
            keys.extend(ids.iter().map(|id| (Which::Jobs, id.as_bytes().into())))
        }
        // The keys deleted are pushed by apply_kv, which finds them.
        KvOp::DeletePrefix { .. } => {}
    }
}

/// The seqs a batch hands out to unpublished final entries, to take back if it fails.
struct Seqs<'m> {
    marks: &'m Mutex<Marks>,
    assigned: Vec<(Box<str>, u64)>,
}

impl Seqs<'_> {
    /// The seq to store with `entry` (0: none).
    fn for_entry(&mut self, id: &str, entry: &LedgerEntry) -> u64 {
        if entry.state != LedgerState::Final || entry.published {
            return 0;
        }
        let seq = lock(self.marks).assign(id);
        self.assigned.push((id.into(), seq));
        seq
    }
}

/// Applies a batch in one transaction, with the [`Marks`] row when it changed; returns one
/// count per request.
///
/// `keys`: when a copy is running, every key the batch writes or deletes is added to it.
fn apply(
    db: &Db,
    marks: &Mutex<Marks>,
    batch: &[Request],
    mut keys: Option<&mut Vec<Key>>,
) -> Result<Vec<u64>, LedgerError> {
    let mut seqs = Seqs {
        marks,
        assigned: Vec::new(),
    };
    // Whether this batch took the marks' dirty flag (and must give it back if it fails).
    let mut saved = false;
    let mut run = || -> Result<Vec<u64>, LedgerError> {
        let g = read(db)?;
        let w = g.begin_write()?;
        let mut counts = Vec::with_capacity(batch.len());
        {
            let mut t = w.open_table(LEDGER)?;
            let mut tables = OpenTables::new(&w);
            for req in batch {
                if let Some(keys) = keys.as_deref_mut() {
                    touched(&req.op, keys);
                }
                let n = match &req.op {
                    Op::Put { id, entry } => {
                        let seq = seqs.for_entry(id, entry);
                        t.insert(&**id, entry.encode(seq).as_slice())?;
                        1
                    }
                    Op::MarkPublished { id } => {
                        let cur = t.get(&**id)?.and_then(|v| LedgerEntry::decode(v.value()));
                        match cur {
                            Some((mut e, seq)) => {
                                e.published = true;
                                t.insert(&**id, e.encode(seq).as_slice())?;
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
                    Op::Compact | Op::CopyDone(_) => 0,
                    // A misplaced claim fails its write before anything of it is applied, as
                    // on PostgreSQL; applied, its loss could only fail the whole batch.
                    Op::Many(ops) if misplaced_claim(ops) => MISPLACED_CLAIM,
                    // A lost claim skips its whole write, and only it.
                    Op::Many(ops) if !claim_holds(&t, ops.first())? => CLAIM_LOST,
                    Op::Many(ops) => {
                        let mut n = 0;
                        for op in ops {
                            n += apply_kv(&mut tables, &mut t, &mut seqs, op, keys.as_deref_mut())?;
                        }
                        n
                    }
                };
                counts.push(n);
            }
            // Taken last, so that it covers the seqs this batch handed out; a confirmation
            // that lands after this point leaves it dirty for the next commit.
            let row = {
                let mut m = lock(marks);
                let row = m.dirty.then(|| m.encode());
                m.dirty = false;
                row
            };
            if let Some(row) = row {
                saved = true;
                if let Some(keys) = keys.as_deref_mut() {
                    keys.push((Which::Kv(Table::StoreMeta), MARKS_KEY.into()));
                }
                tables
                    .get(Table::StoreMeta)?
                    .insert(MARKS_KEY, row.as_slice())?;
            }
        }
        w.commit()?;
        Ok(counts)
    };
    let result = run();
    if result.is_err() {
        let mut m = lock(marks);
        m.forget(&seqs.assigned);
        m.dirty |= saved;
    }
    result
}

fn lock_vec<T>(m: &Mutex<Vec<T>>) -> MutexGuard<'_, Vec<T>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends one result to every compaction waiting for it.
fn answer(replies: Vec<Reply>, result: Result<u64, LedgerError>) {
    for done in replies.into_iter().flatten() {
        let r = match &result {
            Ok(n) => Ok(*n),
            Err(LedgerError::Io(m)) => Err(LedgerError::Io(m.clone())),
            Err(e) => Err(LedgerError::Store(e.to_string())),
        };
        let _ = done.send(r);
    }
}

/// One result per request of a batch: its count, or the batch's error.
/// The count `apply` gives a write whose claim lost (no write counts that many rows).
const CLAIM_LOST: u64 = u64::MAX;
/// The count `apply` gives a write with a [`KvOp::ClaimJob`] that is not its first op.
const MISPLACED_CLAIM: u64 = u64::MAX - 1;

/// Whether a claim comes anywhere but first in `ops`: refused whatever it expects.
fn misplaced_claim(ops: &[KvOp]) -> bool {
    ops.iter()
        .skip(1)
        .any(|o| matches!(o, KvOp::ClaimJob { .. }))
}

/// Whether a write that starts with `first` may go ahead: true unless it is a
/// [`KvOp::ClaimJob`] whose expected entry is not the current one.
fn claim_holds(jobs: &redb::Table<&str, &[u8]>, first: Option<&KvOp>) -> Result<bool, LedgerError> {
    let Some(KvOp::ClaimJob { id, expect, .. }) = first else {
        return Ok(true);
    };
    Ok(current_claim(jobs, id)? == *expect)
}

/// A job's (state, attempts), as a claim compares them.
fn current_claim(
    jobs: &redb::Table<&str, &[u8]>,
    id: &str,
) -> Result<Option<(LedgerState, u32)>, LedgerError> {
    Ok(jobs
        .get(id)?
        .and_then(|v| LedgerEntry::decode(v.value()))
        .map(|(e, _)| (e.state, e.attempts)))
}

fn per_request(
    batch: &[Request],
    result: Result<Vec<u64>, LedgerError>,
) -> Vec<Result<u64, LedgerError>> {
    match result {
        Ok(counts) => counts
            .into_iter()
            .map(|n| match n {
                CLAIM_LOST => Err(LedgerError::ClaimLost),
                MISPLACED_CLAIM => Err(LedgerError::Store(
                    "a ClaimJob must be the first op of its write".into(),
                )),
                n => Ok(n),
            })
            .collect(),
        Err(e) => {
            let io = e.is_io();
            let msg = match e {
                LedgerError::Io(m) | LedgerError::Store(m) => m,
                e => e.to_string(),
            };
            batch
                .iter()
                .map(|_| {
                    Err(if io {
                        LedgerError::Io(msg.clone())
                    } else {
                        LedgerError::Store(msg.clone())
                    })
                })
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
            let l = RedbLedger::open(d.path()).unwrap();
            l.put("a", entry(LedgerState::Final, 5)).await.unwrap();
            l.put("b", entry(LedgerState::Sending, 6)).await.unwrap();
        }
        // The writer thread exits when the last handle drops; the file lock follows.
        let l = loop {
            match RedbLedger::open(d.path()) {
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
        let l = RedbLedger::open(d.path()).unwrap();
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
            let index = index_job("+4915100000001", id, Some(wamid)).unwrap();
            l.kv_many(vec![index]).await.unwrap();
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
        // The number's index keeps only the job that is still there.
        assert_eq!(
            l.jobs_to("4915100000001").unwrap(),
            vec![("new".to_string(), b"wamid.NEW".to_vec())]
        );
        assert!(l.kv_get(Table::Delivery, b"new").unwrap().is_some());
        assert!(
            l.kv_get(Table::WebhookSeen, b"billed|wamid.NEW")
                .unwrap()
                .is_some()
        );
    }

    /// Opens the store again once the last handle's writer has closed it (a clean stop).
    async fn reopen(d: &Path, l: RedbLedger) -> RedbLedger {
        drop(l);
        loop {
            match RedbLedger::open(d) {
                Ok(l) => return l,
                Err(_) => tokio::task::yield_now().await,
            }
        }
    }

    fn published(l: &RedbLedger, id: &str) -> bool {
        let e = l.get(id).unwrap().unwrap();
        assert_eq!(e.state, LedgerState::Final);
        e.published
    }

    #[tokio::test]
    async fn confirmations_are_kept_in_memory_and_stored_by_the_next_commit() {
        let d = tempfile::tempdir().unwrap();
        let l = RedbLedger::open(d.path()).unwrap();
        l.put("a", entry(LedgerState::Final, 5)).await.unwrap();
        assert!(!published(&l, "a"));
        l.mark_published("a").await.unwrap();
        assert!(published(&l, "a"));
        // The row itself was not rewritten: the confirmation is the marks' business.
        let raw = {
            let g = read(&l.db).unwrap();
            let r = g.begin_read().unwrap();
            let t = r.open_table(LEDGER).unwrap();
            t.get("a").unwrap().unwrap().value().to_vec()
        };
        assert_eq!(raw[1], 0, "the published byte of the row");
        // A later commit stores it: it survives a stop even if the stop itself wrote nothing.
        l.kv_put(Table::Inbound, b"k".to_vec(), b"v".to_vec())
            .await
            .unwrap();
        let l = reopen(d.path(), l).await;
        assert!(published(&l, "a"));
        assert_eq!(l.get("a").unwrap().unwrap().event, b"{}".to_vec());
    }

    #[tokio::test]
    async fn entries_left_unconfirmed_by_a_stop_stay_unpublished_until_marked_for_good() {
        let d = tempfile::tempdir().unwrap();
        let l = RedbLedger::open(d.path()).unwrap();
        for id in ["a", "b", "c"] {
            l.put(id, entry(LedgerState::Final, 5)).await.unwrap();
        }
        // "b"'s event never got its confirm (the connection died); "c"'s did, after it.
        l.mark_published("a").await.unwrap();
        l.mark_published("c").await.unwrap();
        let l = reopen(d.path(), l).await;
        assert!(published(&l, "a"));
        assert!(!published(&l, "b"), "its redelivery must publish it again");
        // Everything after the first unconfirmed entry is in doubt after a stop: "c" is
        // published again if redelivered (an identical event, at least once).
        assert!(!published(&l, "c"));
        // Republished after the restart: marked by a row write, which lasts.
        l.mark_published("b").await.unwrap();
        assert!(published(&l, "b"));
        // New entries after the restart are tracked in memory again.
        l.put("d", entry(LedgerState::Final, 6)).await.unwrap();
        assert!(!published(&l, "d"));
        l.mark_published("d").await.unwrap();
        assert!(published(&l, "d"));
        let l = reopen(d.path(), l).await;
        assert!(published(&l, "a"));
        assert!(published(&l, "b"));
        assert!(!published(&l, "c"));
        assert!(published(&l, "d"));
    }

    #[test]
    fn marks_round_trip_and_turn_what_was_unconfirmed_into_a_gap() {
        let mut m = Marks::new();
        let (a, b, c) = (m.assign("a"), m.assign("b"), m.assign("c"));
        assert!(m.confirm("a") && m.confirm("c") && !m.confirm("zzz"));
        assert_eq!(m.watermark(), a);
        assert!(m.published(a) && !m.published(b) && m.published(c));
        assert!(!m.published(0) && !m.published(c + 1));
        let m = Marks::load(Some(&m.encode()));
        assert_eq!(m.gaps, vec![(b, c)]);
        assert!(m.published(a) && !m.published(b) && !m.published(c));
        assert_eq!(m.next, c + 1);
        // A failed commit takes its seqs back: nothing unconfirmed is left behind.
        let mut m = m;
        let d = m.assign("d");
        m.forget(&[("d".into(), d)]);
        assert!(m.unconfirmed.is_empty() && m.unconfirmed_seqs.is_empty());
        // Gaps are bounded.
        for _ in 0..(MAX_GAPS + 10) {
            m.assign("x");
            m = Marks::load(Some(&m.encode()));
        }
        assert_eq!(m.gaps.len(), MAX_GAPS);
    }

    #[tokio::test]
    async fn many_concurrent_writes_all_commit() {
        let d = tempfile::tempdir().unwrap();
        let l = RedbLedger::open(d.path()).unwrap();
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

    /// An in-memory file that refuses writes while `full` is set, as a full disk does (redb
    /// then refuses everything with PreviousIo until the database is closed and reopened).
    #[derive(Debug)]
    struct FullDisk {
        data: Arc<redb::backends::InMemoryBackend>,
        full: Arc<std::sync::atomic::AtomicBool>,
    }

    impl FullDisk {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.full.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for FullDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.data.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.data.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.data.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.check()?;
            self.data.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.data.write(offset, data)
        }
    }

    /// A ledger on a [`FullDisk`], and its switch.
    fn on_full_disk() -> (RedbLedger, Arc<std::sync::atomic::AtomicBool>) {
        let data = Arc::new(redb::backends::InMemoryBackend::new());
        let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = full.clone();
        let opener: Opener = Box::new(move || {
            Database::builder().create_with_backend(FullDisk {
                data: data.clone(),
                full: f.clone(),
            })
        });
        let db = opener().unwrap();
        (
            RedbLedger::start(db, Some(opener), None, None, None).unwrap(),
            full,
        )
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_write_refused_by_a_full_disk_waits_and_commits_on_the_reopened_store() {
        let (l, full) = on_full_disk();
        l.put("before", entry(LedgerState::Final, 1)).await.unwrap();
        full.store(true, std::sync::atomic::Ordering::SeqCst);
        let held = {
            let l = l.clone();
            tokio::spawn(async move { l.put("sent", entry(LedgerState::Final, 2)).await })
        };
        until("the store to report itself unwritable", || !l.writable()).await;
        assert!(l.health().unwritable_for().is_some());
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.wait_writable().await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!held.is_finished(), "the write is held, not failed");
        assert!(!waiter.is_finished());
        // The disk has room again: the held write commits on a reopened store (redb refuses
        // everything with PreviousIo until it is reopened).
        full.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .expect("the held write commits once the disk has room")
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(l.writable());
        assert_eq!(l.get("sent").unwrap().unwrap().state, LedgerState::Final);
        assert_eq!(l.get("before").unwrap().unwrap().state, LedgerState::Final);
        l.put("after", entry(LedgerState::Pending, 3))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn past_the_hold_a_write_fails_with_an_io_error_and_the_next_one_reopens() {
        let (l, full) = on_full_disk();
        l.health().set_hold(Duration::ZERO);
        full.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = l.put("a", entry(LedgerState::Final, 1)).await.unwrap_err();
        assert!(e.is_io(), "{e}");
        assert!(!l.writable());
        full.store(false, std::sync::atomic::Ordering::SeqCst);
        l.put("b", entry(LedgerState::Final, 2)).await.unwrap();
        assert!(l.writable());
        assert_eq!(l.get("b").unwrap().unwrap().state, LedgerState::Final);
    }

    /// Holds the store's lock alone, as a compaction does, until the returned sender is used
    /// or dropped.
    fn hold_exclusively(l: &RedbLedger) -> std::sync::mpsc::Sender<()> {
        let (held, is_held) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let db = l.db.clone();
        std::thread::spawn(move || {
            let _g = db.write().unwrap_or_else(|e| e.into_inner());
            held.send(()).unwrap();
            let _ = released.recv_timeout(Duration::from_secs(30));
        });
        is_held.recv().unwrap();
        release
    }

    /// One worker thread: a read that blocked it would stop every other task.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_read_waiting_for_a_compaction_leaves_the_runtime_running() {
        let l = RedbLedger::open_in_memory().unwrap();
        l.put("a", entry(LedgerState::Final, 1)).await.unwrap();
        let release = hold_exclusively(&l);
        let reading = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (l, reading) = (l.clone(), reading.clone());
            tokio::spawn(async move {
                reading.store(true, Ordering::SeqCst);
                l.get("a")
            })
        };
        // Waited for on this thread (the test's, not a worker): the runtime's timers may be
        // stopped along with its worker, which is what this test looks for.
        let until = |what: &str, cond: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !cond() {
                assert!(std::time::Instant::now() < deadline, "timed out: {what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        until("the read to start", &|| reading.load(Ordering::SeqCst));
        let ticks = Arc::new(AtomicU64::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    ticks.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        // A timer task keeps ticking (it needs the worker) while the read waits for the lock.
        until("a timer task to tick while a read waits", &|| {
            ticks.load(Ordering::SeqCst) >= 5
        });
        assert!(!reader.is_finished(), "the lock is still held");
        release.send(()).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the read goes on once the lock is free")
            .unwrap()
            .unwrap();
        assert_eq!(got.unwrap().state, LedgerState::Final);
        ticker.abort();
    }

    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task").unwrap().count()
    }

    /// Each read that meets the lock takes a thread while it waits (`block_in_place`); past
    /// tokio's 512 the runtime would stall again. Jobs wait for a compaction parked instead.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_thousand_jobs_wait_for_a_compaction_parked_not_a_thread_each() {
        let l = RedbLedger::open_in_memory().unwrap();
        l.put("a", entry(LedgerState::Final, 1)).await.unwrap();
        let before = threads();
        let (held, is_held) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (db, compacting) = (l.db.clone(), l.compacting.clone());
        let holder = std::thread::spawn(move || {
            compacting.during(|| {
                let _g = db.write().unwrap_or_else(|e| e.into_inner());
                held.send(()).unwrap();
                let _ = released.recv_timeout(Duration::from_secs(30));
            })
        });
        is_held.recv().unwrap();
        let done = Arc::new(AtomicU64::new(0));
        for _ in 0..1000 {
            let (l, done) = (l.clone(), done.clone());
            tokio::spawn(async move {
                l.compacted().await;
                l.get("a").unwrap().unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        let tick = tokio::spawn(tokio::time::sleep(Duration::from_millis(20)));
        tokio::time::timeout(Duration::from_secs(5), tick)
            .await
            .expect("the runtime runs a timer while a thousand jobs wait")
            .unwrap();
        assert!(
            threads() < before + 50,
            "{} threads for waiting jobs",
            threads() - before
        );
        assert_eq!(done.load(Ordering::SeqCst), 0);
        release.send(()).unwrap();
        holder.join().unwrap();
        until("every job to read once the compaction is over", || {
            done.load(Ordering::SeqCst) == 1000
        })
        .await;
    }

    /// A current_thread runtime (a tool's) cannot hand its tasks elsewhere: its read waits,
    /// and does not panic as `block_in_place` would there.
    #[tokio::test]
    async fn on_a_current_thread_runtime_a_read_simply_waits() {
        let l = RedbLedger::open_in_memory().unwrap();
        l.put("a", entry(LedgerState::Final, 1)).await.unwrap();
        let release = hold_exclusively(&l);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(release);
        });
        assert!(l.get("a").unwrap().is_some());
    }

    #[tokio::test]
    async fn a_paged_scan_visits_every_row_once_in_order() {
        let l = RedbLedger::open_in_memory().unwrap();
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

    /// A hook that holds a compaction's copy after its first chunk until the returned sender
    /// is used or dropped, or the copy is told to stop (as a slow copier would notice it within
    /// its chunk); the flag turns true once it holds.
    fn copy_holder() -> (
        compaction::ChunkHook,
        Arc<AtomicBool>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Mutex::new(Some(rx));
        let held = Arc::new(AtomicBool::new(false));
        let h = held.clone();
        let hook: compaction::ChunkHook = Arc::new(move |stop: &AtomicBool| {
            let first = rx.lock().unwrap().take();
            if let Some(rx) = first {
                h.store(true, Ordering::SeqCst);
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(Duration::from_millis(10))
                {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                }
            }
        });
        (hook, held, tx)
    }

    fn jobs(prefix: &str, range: std::ops::Range<i64>, state: LedgerState) -> Vec<KvOp> {
        range
            .map(|i| KvOp::PutJob {
                id: format!("{prefix}{i:06}"),
                entry: entry(state, i),
            })
            .collect()
    }

    /// `n` finished jobs to `number` (digits) as the consumer records them, with index rows.
    fn jobs_to_number(number: &str, n: usize) -> Vec<KvOp> {
        let mut ops = Vec::new();
        for i in 0..n {
            let id = format!("to-number-{i:04}");
            ops.push(KvOp::PutJob {
                id: id.clone(),
                entry: LedgerEntry {
                    state: LedgerState::Final,
                    attempts: 1,
                    updated_ms: 1_000,
                    published: true,
                    event: format!(r#"{{"id":"{id}","to":"+{number}","status":"sent"}}"#)
                        .into_bytes(),
                },
            });
            ops.extend(index_job(&format!("+{number}"), &id, None));
        }
        ops
    }

    fn count_jobs(l: &RedbLedger) -> usize {
        let mut n = 0;
        l.for_each_job(|_, _| n += 1).unwrap();
        n
    }

    /// Issue 15, item 6: a compaction (after an erasure) must not stop the data path. The copy
    /// is held after its first chunk; meanwhile every kind of write commits and reads answer
    /// (in place, each would wait for the whole compaction and time out here); and once the
    /// copy is swapped in, it holds exactly what the store held, also after a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compaction_by_copy_lets_jobs_write_and_read_meanwhile_and_keeps_what_they_wrote() {
        let d = tempfile::tempdir().unwrap();
        let (hook, held, release) = copy_holder();
        let l = RedbLedger::open_with(d.path(), Some(hook)).unwrap();
        for part in 0..5 {
            l.kv_many(jobs(
                "job-",
                part * 10_000..(part + 1) * 10_000,
                LedgerState::Final,
            ))
            .await
            .unwrap();
        }
        let inbound = (0..100)
            .map(|i| KvOp::Put {
                table: Table::Inbound,
                key: format!("n{i:03}\0acme").into_bytes(),
                value: vec![1],
            })
            .collect();
        l.kv_many(inbound).await.unwrap();

        let compaction = tokio::spawn({
            let l = l.clone();
            async move { l.compact().await }
        });
        until("the copy to be under way", || held.load(Ordering::SeqCst)).await;
        assert!(!l.compacting(), "a copy does not hold the store");
        let meanwhile = async {
            l.put("job-new", entry(LedgerState::Sending, 7))
                .await
                .unwrap();
            l.put("job-000001", entry(LedgerState::Pending, 8))
                .await
                .unwrap();
            l.remove("job-000002").await.unwrap();
            l.kv_many(vec![
                KvOp::DeletePrefix {
                    table: Table::Inbound,
                    prefix: b"n00".to_vec(),
                },
                KvOp::Put {
                    table: Table::Templates,
                    key: b"t".to_vec(),
                    value: b"approved".to_vec(),
                },
            ])
            .await
            .unwrap();
            // More keys than a final catch-up takes with the store held: a round runs first.
            l.kv_many(jobs("late-", 0..5_000, LedgerState::Final))
                .await
                .unwrap();
            assert_eq!(
                l.get("job-new").unwrap().unwrap().state,
                LedgerState::Sending
            );
        };
        tokio::time::timeout(Duration::from_secs(30), meanwhile)
            .await
            .expect("writes and reads went on while the copy was under way");
        assert!(!compaction.is_finished(), "the copy is still held");
        drop(release);
        compaction.await.unwrap().unwrap();

        let check = |l: &RedbLedger| {
            assert_eq!(
                l.get("job-new").unwrap().unwrap().state,
                LedgerState::Sending
            );
            assert_eq!(
                l.get("job-000001").unwrap().unwrap().state,
                LedgerState::Pending
            );
            assert_eq!(l.get("job-000002").unwrap(), None);
            assert_eq!(l.get("job-049999").unwrap().unwrap().updated_ms, 49_999);
            assert_eq!(l.get("late-004999").unwrap().unwrap().updated_ms, 4_999);
            assert_eq!(count_jobs(l), 50_000 + 1 - 1 + 5_000);
            assert_eq!(l.kv_len(Table::Inbound).unwrap(), 90);
            assert_eq!(
                l.kv_get(Table::Templates, b"t").unwrap().as_deref(),
                Some(&b"approved"[..])
            );
        };
        check(&l);
        let file = RedbLedger::file_in(d.path());
        assert!(
            !compaction::copy_path(&file).exists(),
            "the copy was renamed"
        );
        let l = reopen(d.path(), l).await;
        check(&l);
    }

    #[tokio::test]
    async fn after_a_compaction_by_copy_the_file_holds_no_byte_of_what_was_deleted() {
        let d = tempfile::tempdir().unwrap();
        let l = RedbLedger::open(d.path()).unwrap();
        const NUMBER: &[u8] = b"4915712345678";
        let mut ops = Vec::new();
        for i in 0..2_000 {
            let mut key = NUMBER.to_vec();
            key.extend_from_slice(format!("\0acme\0{i:05}").as_bytes());
            ops.push(KvOp::Put {
                table: Table::ConsentHistory,
                key,
                value: vec![b'x'; 100],
            });
        }
        l.kv_many(ops).await.unwrap();
        l.kv_many(jobs("job-", 0..20_000, LedgerState::Final))
            .await
            .unwrap();
        let mut prefix = NUMBER.to_vec();
        prefix.push(0);
        l.kv_many(vec![KvOp::DeletePrefix {
            table: Table::ConsentHistory,
            prefix,
        }])
        .await
        .unwrap();
        let file = RedbLedger::file_in(d.path());
        let holds = |file: &Path| {
            let bytes = std::fs::read(file).unwrap();
            bytes.windows(NUMBER.len()).any(|w| w == NUMBER)
        };
        assert!(holds(&file), "freed pages keep the number until compacted");
        l.compact().await.unwrap();
        assert!(!holds(&file), "the number is still in the file");
        assert_eq!(count_jobs(&l), 20_000);
        assert_eq!(l.kv_len(Table::ConsentHistory).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_copy_left_by_a_crash_is_removed_when_the_store_opens() {
        let d = tempfile::tempdir().unwrap();
        let copy = compaction::copy_path(&RedbLedger::file_in(d.path()));
        std::fs::write(&copy, b"a stale copy holding 4915712345678").unwrap();
        let l = RedbLedger::open(d.path()).unwrap();
        assert!(!copy.exists());
        l.put("a", entry(LedgerState::Final, 1)).await.unwrap();
    }

    // ---------------------------------------------------------------------------------------
    // Review of 8cfc1be (compaction by copy): tests that show defects. Each asserts what must
    // hold; they fail on 8cfc1be.
    // ---------------------------------------------------------------------------------------

    /// A copier thread that panics (redb may panic on a damaged page; `ops/backup.rs` guards its
    /// own opens with `catch_unwind` for that reason) never sends `CopyDone`: its compaction must
    /// still be answered, not left waiting (with every later one queued behind it in
    /// `next_round`, and the tracked key set growing with every write) until the process ends.
    #[tokio::test]
    async fn a_copier_that_panics_fails_its_compaction_rather_than_leaving_it_waiting() {
        let d = tempfile::tempdir().unwrap();
        fn fail(_: &AtomicBool) {
            panic!("the copier fails (a damaged page)");
        }
        let hook: compaction::ChunkHook = Arc::new(fail);
        let l = RedbLedger::open_with(d.path(), Some(hook)).unwrap();
        l.kv_many(jobs("job-", 0..100, LedgerState::Final))
            .await
            .unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(10), l.compact()).await;
        assert!(
            matches!(answered, Ok(Err(_))),
            "the compaction must fail once its copier panicked; after 10 s: {answered:?}"
        );
    }

    /// Whether this process is refused a directory it may not read (false: root with
    /// CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, which reads it anyway).
    fn permissions_enforced() -> bool {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let mode = |m| std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(m));
        mode(0o300).unwrap();
        let enforced = std::fs::read_dir(d.path()).is_err();
        mode(0o700).unwrap();
        enforced
    }

    /// Runs the test `name` of this binary again without the capabilities that let root ignore
    /// file permissions (capsh); None when capsh cannot be run.
    fn without_dac_override(name: &str) -> Option<std::process::Output> {
        assert!(
            std::env::var_os("SENDWELL_REVIEW_NO_DAC").is_none(),
            "capsh did not drop CAP_DAC_OVERRIDE"
        );
        std::process::Command::new("capsh")
            .arg("--drop=cap_dac_override,cap_dac_read_search")
            .args(["--", "-c", "exec \"$0\" \"$@\""])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env("SENDWELL_REVIEW_NO_DAC", "1")
            .output()
            .ok()
    }

    /// `rename_over` renames the copy over `state.redb` and then syncs the directory. When that
    /// sync fails (an I/O error; here: a directory that can be written but not opened), the
    /// rename has already happened, yet `finish_copy` keeps the old database (now an unlinked
    /// inode) and closes the copy: every later commit goes to a file that no longer has a
    /// name, and `state.redb` is left unlocked for any other process (backup, `consent erase`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_swap_that_fails_after_its_rename_loses_no_write_and_keeps_the_file_locked() {
        const NAME: &str = "store::ledger::tests::a_swap_that_fails_after_its_rename_loses_no_write_and_keeps_the_file_locked";
        use std::os::unix::fs::PermissionsExt;
        if !permissions_enforced() {
            let Some(out) = without_dac_override(NAME) else {
                eprintln!("SKIPPED: root, and capsh cannot drop CAP_DAC_OVERRIDE");
                return;
            };
            assert!(
                out.status.success(),
                "run without CAP_DAC_OVERRIDE:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (hook, held, release) = copy_holder();
        let l = RedbLedger::open_with(d.path(), Some(hook)).unwrap();
        l.kv_many(jobs("job-", 0..1_000, LedgerState::Final))
            .await
            .unwrap();
        let compaction = tokio::spawn({
            let l = l.clone();
            async move { l.compact().await }
        });
        until("the copy to be under way", || held.load(Ordering::SeqCst)).await;
        // From here the directory can be written (the rename goes through) but not opened, so
        // the sync of the directory after the rename fails, as an I/O error there would.
        let mode = |m| std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(m));
        mode(0o300).unwrap();
        drop(release);
        let swapped = compaction.await.unwrap();
        mode(0o700).unwrap();
        eprintln!("the compaction answered: {swapped:?}");

        l.put("after", entry(LedgerState::Final, 9)).await.unwrap();
        assert_eq!(l.get("after").unwrap().unwrap().updated_ms, 9);
        let file = RedbLedger::file_in(d.path());
        let mut wrong = Vec::new();
        if let Ok(other) = redb::ReadOnlyDatabase::open(&file) {
            wrong.push(
                "another process (state backup, consent erase) can open state.redb while the \
                 store is open"
                    .to_string(),
            );
            drop(other);
        }
        let l = reopen(d.path(), l).await;
        if l.get("after").unwrap().is_none() {
            wrong.push(
                "a write committed (and answered Ok) after the failed swap is gone once the store \
                 is opened again"
                    .to_string(),
            );
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// The daemon's compactor runs an erasure's compaction (a copy, minutes on a large store)
    /// when the daemon is stopped. `app.rs` then runs the final compaction ("an erasure whose
    /// compaction was still waiting must not leave the number in the file"), the runtime drops
    /// the compactor's task, and the last handle closes the store, which abandons the copy.
    /// Nothing is left that knows a compaction is due: the erased number stays in the file's
    /// freed pages after the restart, until some later erasure compacts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_during_an_erasures_copy_leaves_no_byte_of_the_number_in_the_file() {
        use crate::consent::ConsentStore;
        const NUMBER: &str = "4917600000001";
        let d = tempfile::tempdir().unwrap();
        let (hook, held, release) = copy_holder();
        let mut release = Some(release);
        let l = RedbLedger::open_with(d.path(), Some(hook)).unwrap();
        let store = ConsentStore::load_with(l.clone().into(), vec!["acme".into()], HashMap::new())
            .await
            .unwrap();
        let mut ops = jobs("other-", 0..2_000, LedgerState::Final);
        ops.extend(jobs_to_number(NUMBER, 500));
        l.kv_many(ops).await.unwrap();
        let report = store
            .erase(NUMBER, jiff::Timestamp::from_millisecond(5_000).unwrap())
            .await
            .unwrap();
        assert_eq!(report.jobs, 500);
        let file = RedbLedger::file_in(d.path());
        let holds = |file: &Path| {
            let bytes = std::fs::read(file).unwrap();
            bytes.windows(NUMBER.len()).any(|w| w == NUMBER.as_bytes())
        };
        assert!(holds(&file), "freed pages keep the number until compacted");

        // The compactor's compaction of the erasure: its copy is under way...
        let compactor = tokio::spawn({
            let store = store.clone();
            async move { store.compact_if_due().await }
        });
        until("the copy to be under way", || held.load(Ordering::SeqCst)).await;
        // ...when the daemon stops: the final compaction of app.rs...
        let mut pending = Box::pin(store.compact_if_due());
        let first = tokio::time::timeout(Duration::from_secs(2), &mut pending).await;
        let last = match first {
            Ok(r) => {
                drop(pending);
                r
            }
            // It waits for the copy under way: let that go on.
            Err(_) => {
                drop(release.take());
                pending.await
            }
        };
        eprintln!("the final compaction answered: {last:?}");
        // ...then the runtime's shutdown drops the compactor's task, and the last handle goes.
        compactor.abort();
        let _ = compactor.await;
        drop(store);
        drop(release.take());
        let l = reopen(d.path(), l).await;
        drop(l);
        assert!(
            !holds(&file),
            "the erased number is still in state.redb after the stop, and nothing will compact \
             it again (compaction_due was cleared by the abandoned compaction; it lives in memory)"
        );
    }

    /// A tmpfs of its own (root only), unmounted when dropped.
    struct Tmpfs(PathBuf);

    impl Tmpfs {
        fn mount(size: &str) -> Option<Tmpfs> {
            let dir = std::env::temp_dir()
                .join(format!("sendwell-review-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir(&dir).unwrap();
            let ok = std::process::Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = std::fs::remove_dir(&dir);
                return None;
            }
            Some(Tmpfs(dir))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    /// A compaction's swap lets go of redb's own lock on the file for a moment (`swap_in`): a
    /// tool opening the store then must still find it in use. Without the lock file it opened
    /// it (seen in `tests/migrate.rs`: `state migrate` copied the store of a running daemon).
    #[test]
    fn the_store_stays_in_use_while_a_swap_has_let_go_of_redbs_lock() {
        let dir = tempfile::tempdir().unwrap();
        let l = RedbLedger::open(dir.path()).unwrap();
        drop(l.db.write().unwrap().take());
        assert!(
            matches!(RedbLedger::open(dir.path()), Err(LedgerError::InUse)),
            "a second open got the store while the first still runs"
        );
        // Once the store closes, it opens again (in this process too).
        drop(l);
        RedbLedger::open(dir.path()).expect("the store opens once the first is closed");
    }

    fn free_bytes(dir: &Path) -> u64 {
        let s = rustix::fs::statvfs(dir).unwrap();
        s.f_bavail * s.f_frsize
    }

    /// `room_for_copy` allows 64 MB for what jobs write to the old file during the copy, but
    /// the copy's snapshot (a redb read transaction, held for the whole copy) keeps redb from
    /// reusing any page freed after it: every page a job rewrites is new file space. Rows
    /// merely rewritten (Sending -> Final, the marks row) fill the disk during a long copy.
    /// Then the store cannot recover by itself: `reopen` waits for 4 MB free on the file
    /// system, which never comes (the space is inside state.redb), and the copy is not given
    /// up first (its `CopyDone` waits behind the held batch): no job for the whole
    /// `state.unwritable_grace`, then the daemon exits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_never_fills_the_disk_under_rewrites_and_the_store_never_stays_down() {
        let Some(disk) = Tmpfs::mount("96m") else {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
            return;
        };
        let dir = disk.0.join("state");
        let (hook, held, release) = copy_holder();
        let l = RedbLedger::open_with(&dir, Some(hook)).unwrap();
        // As the daemon does (state.unwritable_grace, 300 s by default).
        l.health().set_hold(Duration::from_secs(120));
        let rows = |range: std::ops::Range<i64>, ms: i64| -> Vec<KvOp> {
            range
                .map(|i| KvOp::PutJob {
                    id: format!("job-{i:06}"),
                    entry: LedgerEntry {
                        state: LedgerState::Final,
                        attempts: 1,
                        updated_ms: ms,
                        published: true,
                        event: vec![b'e'; 600],
                    },
                })
                .collect()
        };
        l.kv_many(rows(0..5_000, 0)).await.unwrap();
        let file = RedbLedger::file_in(&dir);
        assert!(
            compaction::room_for_copy(&file),
            "the copy's room check passes ({} bytes free, the store {} bytes)",
            free_bytes(&dir),
            std::fs::metadata(&file).unwrap().len()
        );
        let compaction = tokio::spawn({
            let l = l.clone();
            async move { l.compact().await }
        });
        until("the copy to be under way", || held.load(Ordering::SeqCst)).await;

        let mut wrong = Vec::new();
        // Jobs go on, rewriting 2,000 rows the store already has (about 1.3 MB of pages a
        // commit), 150 times: without the snapshot the file would not grow.
        for round in 1..=150 {
            let r = tokio::time::timeout(Duration::from_secs(10), l.kv_many(rows(0..2_000, round)))
                .await;
            if !matches!(r, Ok(Ok(_))) {
                wrong.push(format!(
                    "rewrite {round} of rows the store already had did not commit within 10 s \
                     (writable: {}): {} bytes free on the file system, state.redb is {} bytes",
                    l.writable(),
                    free_bytes(&dir),
                    std::fs::metadata(&file).unwrap().len()
                ));
                break;
            }
        }
        // The copy goes on to its end.
        drop(release);
        if !l.writable() {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !l.writable() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !l.writable() {
                wrong.push(format!(
                    "20 s after the copy was let go the store still takes no write (the hold is \
                     120 s; the daemon's default grace 300 s, then it exits): {} bytes free, the \
                     compaction answered: {}",
                    free_bytes(&dir),
                    compaction.is_finished()
                ));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
        compaction.await.unwrap().unwrap();
    }

    /// A compaction that fails leaves the erased number in the file (here its copy's file is
    /// removed under it, so the swap's rename fails; in the daemon: an I/O error on the store,
    /// which abandons the copy, ENOSPC on the copy, a failed rename). The compactor logs "will
    /// try again" and sets `compaction_due`, but then waits for the next erasure's notify: with
    /// none, the number stays in state.redb until the stop. (`abandon`'s doc says "its
    /// compactions fail (they are retried)".)
    #[tokio::test(start_paused = true)]
    async fn a_failed_compaction_after_an_erasure_is_tried_again() {
        use crate::consent::ConsentStore;
        const NUMBER: &str = "4917600000002";
        let d = tempfile::tempdir().unwrap();
        let file = RedbLedger::file_in(d.path());
        let copy = compaction::copy_path(&file);
        let chunks = Arc::new(AtomicU64::new(0));
        let hook: compaction::ChunkHook = Arc::new({
            let (chunks, copy) = (chunks.clone(), copy.clone());
            move |_: &AtomicBool| {
                // Once: the first copy loses its file, so its swap fails.
                if chunks.fetch_add(1, Ordering::SeqCst) == 0 {
                    std::fs::remove_file(&copy).unwrap();
                }
            }
        });
        let l = RedbLedger::open_with(d.path(), Some(hook)).unwrap();
        let store = ConsentStore::load_with(l.clone().into(), vec!["acme".into()], HashMap::new())
            .await
            .unwrap();
        let mut ops = jobs("other-", 0..500, LedgerState::Final);
        ops.extend(jobs_to_number(NUMBER, 200));
        l.kv_many(ops).await.unwrap();
        store
            .erase(NUMBER, jiff::Timestamp::from_millisecond(5_000).unwrap())
            .await
            .unwrap();
        let holds = |file: &Path| {
            let bytes = std::fs::read(file).unwrap();
            bytes.windows(NUMBER.len()).any(|w| w == NUMBER.as_bytes())
        };
        assert!(holds(&file), "freed pages keep the number until compacted");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let compactor = tokio::spawn(store.clone().compactor(shutdown.clone()));
        // Two hours of the daemon's time: tokio's clock is paused and runs on whenever nothing
        // else can (the compactor rests at most 30 s after a short compaction).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut waited = Duration::ZERO;
        while holds(&file) {
            assert!(
                waited < Duration::from_secs(7200) && std::time::Instant::now() < deadline,
                "the erased number is still in state.redb {} s (tokio time) after the erasure; \
                 chunks copied in all: {} (one copy); the failed compaction was not tried again",
                waited.as_secs(),
                chunks.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_secs(10)).await;
            waited += Duration::from_secs(10);
        }
        shutdown.cancel();
        compactor.await.unwrap();
    }
}
