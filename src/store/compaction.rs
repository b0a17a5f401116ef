//! Compaction by copy: how an erasure's bytes leave the store file without stopping jobs.
//!
//! redb is copy-on-write, so after an erasure the freed pages of the file still hold the
//! number until something overwrites them. redb's own `Database::compact` does that, but it
//! needs the database to itself and relocates pages until none can move, in one call: on a
//! file of 4 GB it held every job for 137 s (README, *Performance*).
//!
//! So the writer compacts by copying instead, beside the running store:
//!
//! 1. Between two batches (nothing is being written) it takes a read snapshot and starts
//!    recording which keys each later commit touches ([`Tracking`]).
//! 2. A copier thread writes every live row of the snapshot into a new file next to the store
//!    (`state.redb.compacting`), in chunks, resting after each chunk for as long as the chunk
//!    took while jobs are writing (it takes at most half of one core and of the disk from them).
//!    Jobs, webhooks and reads go on against the old file meanwhile.
//! 3. It then brings the copy up to date in rounds: the keys touched since, each read from a
//!    fresh snapshot and written (or deleted) in the copy, until few are left.
//! 4. The writer, between two batches again, copies the last touched keys, commits the copy
//!    durably, renames it over `state.redb` and swaps it in. Only this step holds the store
//!    alone (readers wait for it parked): a few milliseconds, whatever the file's size.
//!
//! The copy holds only rows that were live at its snapshot or written since, so no freed page
//! of the old file comes along. A crash before the rename leaves the old file as it was and a
//! stale copy, removed at the next open; the rename itself is atomic. The copy needs as much
//! free space as the live data: without it (or for an in-memory store) the writer falls back to
//! redb's compaction in place, which stops jobs for its length, and says so in the journal.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable};

use super::ledger::{LEDGER, LedgerError, Table};

/// A table of the store as the copy names it: the ledger (`&str` keys) or a byte table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Which {
    Jobs,
    Kv(Table),
}

/// One key a commit wrote or deleted.
pub(super) type Key = (Which, Box<[u8]>);

/// The keys written since a copy's snapshot, so that the copy can be brought up to date.
///
/// Only the writer thread turns it on and off, between batches, so a batch either records all
/// of its keys or none. Keys are added only after their batch commits: a round that takes the
/// set and then opens a snapshot is sure to see every write it took.
#[derive(Default)]
pub(super) struct Tracking {
    keys: Mutex<Option<HashSet<Key>>>,
    /// Commits recorded so far: the copier rests between chunks only while jobs are writing.
    commits: AtomicU64,
}

impl Tracking {
    pub(super) fn active(&self) -> bool {
        self.lock().is_some()
    }

    pub(super) fn start(&self) {
        *self.lock() = Some(HashSet::new());
    }

    pub(super) fn stop(&self) {
        *self.lock() = None;
    }

    /// Records a committed batch's keys (nothing when no copy is running).
    pub(super) fn add(&self, keys: Vec<Key>) {
        if let Some(set) = self.lock().as_mut() {
            set.extend(keys);
            self.commits.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn take(&self) -> HashSet<Key> {
        self.lock().as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn len(&self) -> usize {
        self.lock().as_ref().map_or(0, HashSet::len)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HashSet<Key>>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where the copy is written: beside the store, on the same file system, so the rename is
/// atomic.
pub(super) fn copy_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".compacting");
    PathBuf::from(name)
}

/// Rows per write transaction of the copy, and bytes: small enough that the copier's rests
/// come often, large enough that commits are a small part of its work.
const CHUNK_ROWS: usize = 16_384;
const CHUNK_BYTES: usize = 8 << 20;
/// Every so many chunks a durable commit, which lets redb reuse the pages the chunks freed.
const DURABLE_EVERY: usize = 64;
/// Catch-up rounds end when fewer keys than this are left (the writer copies the rest while
/// it holds the store) or after [`MAX_ROUNDS`], whichever comes first.
const FEW_KEYS: usize = 4096;
const MAX_ROUNDS: usize = 16;

/// What the copier reports back to the writer.
pub(super) struct Copied {
    pub dest: Database,
    /// How long the copy took, rests included.
    pub took: Duration,
    /// Rows copied from the snapshot, and keys brought up to date in catch-up rounds.
    pub rows: u64,
    pub caught_up: u64,
}

/// Tells the copier to give up at its next chunk (shutdown, an I/O error on the store).
pub(super) type Abort = Arc<AtomicBool>;

/// A hook run after each chunk: tests hold the copy there to write meanwhile.
pub(super) type ChunkHook = Arc<dyn Fn() + Send + Sync>;

/// Steps 2 and 3: copies `snapshot` into a new file at `path` and catches up with the keys
/// `tracking` collects, reading them from `src` (the live store). Runs on its own thread.
pub(super) fn copy(
    src: &super::ledger::Db,
    snapshot: ReadTransaction,
    path: &Path,
    tracking: &Tracking,
    abort: &AtomicBool,
    hook: Option<&ChunkHook>,
) -> Result<Copied, LedgerError> {
    let started = Instant::now();
    let _ = std::fs::remove_file(path);
    let dest = Database::create(path)?;
    {
        let w = dest.begin_write()?;
        w.open_table(LEDGER)?;
        for t in Table::ALL {
            w.open_table(t.def())?;
        }
        w.commit()?;
    }
    let mut pace = Pace::new(tracking, abort, hook);
    let mut rows = 0u64;
    // Step 2: the snapshot, table by table, in key order (redb fills pages best that way).
    {
        let t = snapshot.open_table(LEDGER)?;
        let mut chunk: Vec<(String, Vec<u8>)> = Vec::new();
        let mut bytes = 0;
        for row in t.iter()? {
            let (k, v) = row?;
            bytes += k.value().len() + v.value().len();
            chunk.push((k.value().to_string(), v.value().to_vec()));
            if chunk.len() == CHUNK_ROWS || bytes >= CHUNK_BYTES {
                rows += write_chunk(&dest, &mut pace, chunk.len(), |w| fill_jobs(w, &chunk))?;
                chunk.clear();
                bytes = 0;
            }
        }
        rows += write_chunk(&dest, &mut pace, chunk.len(), |w| fill_jobs(w, &chunk))?;
    }
    for table in Table::ALL {
        let t = snapshot.open_table(table.def())?;
        let mut chunk: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut bytes = 0;
        for row in t.iter()? {
            let (k, v) = row?;
            bytes += k.value().len() + v.value().len();
            chunk.push((k.value().to_vec(), v.value().to_vec()));
            if chunk.len() == CHUNK_ROWS || bytes >= CHUNK_BYTES {
                rows += write_chunk(&dest, &mut pace, chunk.len(), |w| fill(w, table, &chunk))?;
                chunk.clear();
                bytes = 0;
            }
        }
        rows += write_chunk(&dest, &mut pace, chunk.len(), |w| fill(w, table, &chunk))?;
    }
    drop(snapshot);
    // Step 3: rounds of keys touched since, until few are left.
    let mut caught_up = 0u64;
    for _ in 0..MAX_ROUNDS {
        if tracking.len() < FEW_KEYS {
            break;
        }
        pace.check()?;
        let keys = tracking.take();
        let now = super::ledger::read(src)?.begin_read()?;
        caught_up += catch_up(&now, &dest, keys, Durability::None)?;
    }
    Ok(Copied {
        dest,
        took: started.elapsed(),
        rows,
        caught_up,
    })
}

/// Step 4's copy, by the writer with the store to itself: the last keys touched, then a
/// durable commit. Returns how many keys it copied.
pub(super) fn finish(
    src: &ReadTransaction,
    dest: &Database,
    tracking: &Tracking,
) -> Result<u64, LedgerError> {
    catch_up(src, dest, tracking.take(), Durability::Immediate)
}

/// Swaps the copy in for the store file: renamed over it (atomic), then the directory synced
/// so that the rename survives a crash.
pub(super) fn rename_over(copy: &Path, file: &Path) -> Result<(), LedgerError> {
    let io = |what: &str, e: std::io::Error| LedgerError::Io(format!("compaction {what}: {e}"));
    std::fs::rename(copy, file).map_err(|e| io("rename", e))?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("directory sync", e))?;
    }
    Ok(())
}

/// Whether the file system holding `file` has room for a copy of it (unknown: no).
pub(super) fn room_for_copy(file: &Path) -> bool {
    let (Ok(meta), Some(dir)) = (std::fs::metadata(file), file.parent()) else {
        return false;
    };
    match rustix::fs::statvfs(dir) {
        // The copy holds the live rows only, never more than the file; plus headroom for the
        // jobs that keep writing to the old file meanwhile.
        Ok(s) => s.f_bavail.saturating_mul(s.f_frsize) >= meta.len().saturating_add(64 << 20),
        Err(_) => false,
    }
}

fn fill_jobs(w: &redb::WriteTransaction, rows: &[(String, Vec<u8>)]) -> Result<(), LedgerError> {
    let mut t = w.open_table(LEDGER)?;
    for (k, v) in rows {
        t.insert(k.as_str(), v.as_slice())?;
    }
    Ok(())
}

fn fill(
    w: &redb::WriteTransaction,
    table: Table,
    rows: &[super::ledger::KvRow],
) -> Result<(), LedgerError> {
    let mut t = w.open_table(table.def())?;
    for (k, v) in rows {
        t.insert(k.as_slice(), v.as_slice())?;
    }
    Ok(())
}

/// Writes the keys' current values (from `src`) into `dest`, deleting those gone.
fn catch_up(
    src: &ReadTransaction,
    dest: &Database,
    keys: HashSet<Key>,
    durability: Durability,
) -> Result<u64, LedgerError> {
    if keys.is_empty() && matches!(durability, Durability::None) {
        return Ok(0);
    }
    let n = keys.len() as u64;
    let mut w = dest.begin_write()?;
    w.set_durability(durability)
        .map_err(|e| LedgerError::Store(format!("compaction: {e}")))?;
    {
        let src_jobs = src.open_table(LEDGER)?;
        let mut dest_jobs = w.open_table(LEDGER)?;
        let mut by_table: Vec<Vec<Box<[u8]>>> = vec![Vec::new(); Table::ALL.len()];
        for (which, key) in keys {
            match which {
                Which::Jobs => {
                    let Ok(id) = std::str::from_utf8(&key) else {
                        continue;
                    };
                    match src_jobs.get(id)? {
                        Some(v) => {
                            dest_jobs.insert(id, v.value())?;
                        }
                        None => {
                            dest_jobs.remove(id)?;
                        }
                    }
                }
                Which::Kv(t) => by_table[t as usize].push(key),
            }
        }
        for (table, keys) in Table::ALL.into_iter().zip(by_table) {
            if keys.is_empty() {
                continue;
            }
            let s = src.open_table(table.def())?;
            let mut d = w.open_table(table.def())?;
            for key in keys {
                match s.get(&*key)? {
                    Some(v) => {
                        d.insert(&*key, v.value())?;
                    }
                    None => {
                        d.remove(&*key)?;
                    }
                }
            }
        }
    }
    w.commit()?;
    Ok(n)
}

/// Commits one chunk of `rows` rows into the copy (`fill` inserts them), then rests (see
/// [`Pace`]).
fn write_chunk(
    dest: &Database,
    pace: &mut Pace<'_>,
    rows: usize,
    fill: impl FnOnce(&redb::WriteTransaction) -> Result<(), LedgerError>,
) -> Result<u64, LedgerError> {
    if rows == 0 {
        return Ok(0);
    }
    let started = Instant::now();
    let mut w = dest.begin_write()?;
    pace.chunks += 1;
    if pace.chunks % DURABLE_EVERY != 0 {
        w.set_durability(Durability::None)
            .map_err(|e| LedgerError::Store(format!("compaction: {e}")))?;
    }
    fill(&w)?;
    w.commit()?;
    pace.rest(started.elapsed())?;
    Ok(rows as u64)
}

/// The copier's manners: after each chunk it rests as long as the chunk took, but only while
/// jobs are writing (at shutdown, or with the daemon stopped, it runs flat out); and it stops
/// when told to.
struct Pace<'a> {
    tracking: &'a Tracking,
    abort: &'a AtomicBool,
    hook: Option<&'a ChunkHook>,
    chunks: usize,
    commits_seen: u64,
}

impl<'a> Pace<'a> {
    fn new(tracking: &'a Tracking, abort: &'a AtomicBool, hook: Option<&'a ChunkHook>) -> Self {
        Pace {
            tracking,
            abort,
            hook,
            chunks: 0,
            commits_seen: tracking.commits.load(Ordering::Relaxed),
        }
    }

    fn check(&self) -> Result<(), LedgerError> {
        if self.abort.load(Ordering::Relaxed) {
            return Err(LedgerError::Store("compaction abandoned".into()));
        }
        Ok(())
    }

    fn rest(&mut self, worked: Duration) -> Result<(), LedgerError> {
        if let Some(hook) = self.hook {
            hook();
        }
        let commits = self.tracking.commits.load(Ordering::Relaxed);
        if commits != self.commits_seen {
            self.commits_seen = commits;
            // In short sleeps, so that an abort is noticed within 50 ms.
            let until = Instant::now() + worked;
            while Instant::now() < until {
                self.check()?;
                std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
            }
        }
        self.check()
    }
}
