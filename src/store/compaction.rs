//! Compaction by copy: how an erasure's bytes leave the store file without stopping jobs.
//!
//! redb is copy-on-write, so after an erasure the freed pages of the file still hold the
//! number until something overwrites them. redb's own `Database::compact` does that, but it
//! needs the database to itself and relocates pages until none can move, in one call: on a
//! file of 4 GB it held every job for 137 s (docs/performance.md).
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

/// Tells the copier to give up at its next chunk (shutdown, an I/O error on the store, a file
/// system running out of room), and why.
#[derive(Default)]
pub(super) struct Abort {
    pub stop: AtomicBool,
    /// The file system ran low on room: the copy was given up so that the store keeps some.
    pub no_room: AtomicBool,
}

impl Abort {
    /// Stops the copy because the file system runs out of room.
    pub fn no_room(&self) {
        self.no_room.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A hook run after each chunk, given the copy's stop flag: tests hold the copy there to write
/// meanwhile, and let it go when it is told to stop, as the copier itself would.
pub(super) type ChunkHook = Arc<dyn Fn(&AtomicBool) + Send + Sync>;

/// Free space below which a copy gives up (and the writer tells it to): the store's own writes
/// come first. A copy given up for room is followed by a compaction in place.
pub(super) const COPY_RESERVE: u64 = 32 << 20;

/// The copy's page cache: it only writes, so a small one does (redb keeps up to half of it as
/// unwritten pages). The store is opened again with its usual cache once the copy is in place.
const COPY_CACHE: usize = 32 << 20;

/// Steps 2 and 3: copies `snapshot` into a new file at `path` and catches up with the keys
/// `tracking` collects, reading them from `src` (the live store). Runs on its own thread.
pub(super) fn copy(
    src: &super::ledger::Db,
    snapshot: ReadTransaction,
    path: &Path,
    tracking: &Tracking,
    abort: &Abort,
    hook: Option<&ChunkHook>,
) -> Result<Copied, LedgerError> {
    let started = Instant::now();
    let _ = std::fs::remove_file(path);
    let dest = Database::builder()
        .set_cache_size(COPY_CACHE)
        .create(path)?;
    {
        let w = dest.begin_write()?;
        w.open_table(LEDGER)?;
        for t in Table::ALL {
            w.open_table(t.def())?;
        }
        w.commit()?;
    }
    let mut pace = Pace::new(tracking, abort, hook, path.parent());
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
    // Step 3: rounds of keys touched since, until few are left; each in chunks, so that a
    // stop is noticed within one.
    let mut caught_up = 0u64;
    for _ in 0..MAX_ROUNDS {
        if tracking.len() < FEW_KEYS {
            break;
        }
        pace.check()?;
        let keys: Vec<Key> = tracking.take().into_iter().collect();
        let now = super::ledger::read(src)?.begin_read()?;
        for chunk in keys.chunks(CHUNK_ROWS) {
            caught_up += catch_up(&now, &dest, chunk.iter().cloned(), Durability::None)?;
            pace.check()?;
        }
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
/// so that the rename survives a crash. Only a failed rename is an error: once the rename is
/// done the copy *is* the store, whatever the sync says (the kernel writes the directory out
/// later; a crash before that leaves the old file, which is whole), so the caller must swap.
pub(super) fn rename_over(copy: &Path, file: &Path) -> Result<(), LedgerError> {
    std::fs::rename(copy, file).map_err(|e| LedgerError::Io(format!("compaction rename: {e}")))?;
    if let Some(dir) = file.parent()
        && let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all())
        && crate::metrics::log_due("compaction", "directory_sync").is_some()
    {
        tracing::warn!(error = %e, dir = %dir.display(), "The state directory could not be synced after a compaction's rename; the compacted store is in use, and a crash before the kernel writes the directory out would bring back the store before it.");
    }
    Ok(())
}

/// Free space on the file system holding `dir` (None: unknown).
pub(super) fn free_bytes(dir: &Path) -> Option<u64> {
    rustix::fs::statvfs(dir)
        .ok()
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
}

/// Whether the file system holding `file` has room for a copy of it (unknown: no): the copy
/// holds the live rows only, never more than the file; plus room for what jobs write to the
/// old file meanwhile (its snapshot keeps redb from reusing the pages they free), and
/// [`COPY_RESERVE`], below which the copy gives up.
pub(super) fn room_for_copy(file: &Path) -> bool {
    let (Ok(meta), Some(dir)) = (std::fs::metadata(file), file.parent()) else {
        return false;
    };
    let need = meta.len() + (meta.len() / 4).max(32 << 20) + COPY_RESERVE;
    free_bytes(dir).is_some_and(|free| free >= need)
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
    keys: impl IntoIterator<Item = Key>,
    durability: Durability,
) -> Result<u64, LedgerError> {
    let mut n = 0;
    let mut w = dest.begin_write()?;
    w.set_durability(durability)
        .map_err(|e| LedgerError::Store(format!("compaction: {e}")))?;
    {
        let src_jobs = src.open_table(LEDGER)?;
        let mut dest_jobs = w.open_table(LEDGER)?;
        let mut by_table: Vec<Vec<Box<[u8]>>> = vec![Vec::new(); Table::ALL.len()];
        for (which, key) in keys {
            n += 1;
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
    abort: &'a Abort,
    hook: Option<&'a ChunkHook>,
    /// The directory the copy is written to, whose free space it watches.
    dir: Option<&'a Path>,
    chunks: usize,
    commits_seen: u64,
}

impl<'a> Pace<'a> {
    fn new(
        tracking: &'a Tracking,
        abort: &'a Abort,
        hook: Option<&'a ChunkHook>,
        dir: Option<&'a Path>,
    ) -> Self {
        Pace {
            tracking,
            abort,
            hook,
            dir,
            chunks: 0,
            commits_seen: tracking.commits.load(Ordering::Relaxed),
        }
    }

    /// Err when told to stop, or when the file system has less than [`COPY_RESERVE`] left.
    fn check(&self) -> Result<(), LedgerError> {
        if let Some(dir) = self.dir
            && free_bytes(dir).is_some_and(|free| free < COPY_RESERVE)
        {
            self.abort.no_room();
        }
        if self.abort.stop.load(Ordering::Relaxed) {
            return Err(LedgerError::Store("compaction abandoned".into()));
        }
        Ok(())
    }

    fn rest(&mut self, worked: Duration) -> Result<(), LedgerError> {
        if let Some(hook) = self.hook {
            hook(&self.abort.stop);
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
