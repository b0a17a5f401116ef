//! `sendwell state backup | restore`: a stopped daemon's state store, copied out consistently
//! and swapped back in with the previous one kept.
//!
//! redb lets one process open `state.redb` for writing, and the running daemon does. Backup
//! and restore therefore work on a stopped daemon's store only (exit 75 otherwise). The backup
//! opens the store read-only, which keeps any writer (a daemon starting meanwhile) out while
//! the file's bytes are copied, so the copy is one consistent state; the copy (mode 0600: it
//! holds personal data) is then opened on its own and must show the same rows per table before
//! it replaces the target. Restore checks that the file opens as a sendwell store, copies it
//! next to the store, verifies it the same way, keeps the previous store as
//! `state.redb.before-restore` and swaps the new one in with a rename, so there is always a
//! `state.redb` in place.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{
    MultimapTableHandle, ReadOnlyDatabase, ReadableDatabase, ReadableTableMetadata, TableHandle,
};

use super::error::OpsError;
use crate::config::Config;
use crate::store::Ledger;

/// The table every sendwell store has: a file without it is not one.
pub const SIGNATURE_TABLE: &str = "ledger_v1";
/// A store handle just closed (a daemon stopping, a tool finishing) lets go of the file a
/// moment later: wait this long before calling the store busy.
const BUSY_GRACE: Duration = Duration::from_secs(1);

/// Rows per table of a store, by table name.
pub type TableRows = BTreeMap<String, u64>;

const BUSY: &str = "the state store is in use: the daemon is running (or another tool has it \
open). Stop the daemon first (systemctl stop sendwell, or sendwell@N for a shard) and run this \
again";

enum Opened {
    Db(ReadOnlyDatabase),
    Busy,
    Unclean,
    Failed(String),
}

/// Opens a store read-only, waiting [`BUSY_GRACE`] for a handle just closed to let go. A
/// read-only handle keeps writers out until it is dropped.
fn open_read_only(path: &Path) -> Opened {
    let deadline = std::time::Instant::now() + BUSY_GRACE;
    loop {
        // A file altered outside redb may make it panic rather than fail: that is "does not
        // open" all the same.
        let r = std::panic::catch_unwind(|| ReadOnlyDatabase::open(path));
        match r {
            Ok(Ok(db)) => return Opened::Db(db),
            Ok(Err(
                redb::DatabaseError::DatabaseAlreadyOpen
                | redb::DatabaseError::LockProtocolMismatch,
            )) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(Err(
                redb::DatabaseError::DatabaseAlreadyOpen
                | redb::DatabaseError::LockProtocolMismatch,
            )) => return Opened::Busy,
            Ok(Err(redb::DatabaseError::RepairAborted)) => return Opened::Unclean,
            Ok(Err(e)) => return Opened::Failed(e.to_string()),
            Err(_) => return Opened::Failed("redb could not read it".into()),
        }
    }
}

fn count_rows(db: &ReadOnlyDatabase) -> Result<TableRows, String> {
    let r = db.begin_read().map_err(|e| e.to_string())?;
    let mut rows = TableRows::new();
    for handle in r.list_tables().map_err(|e| e.to_string())? {
        let name = handle.name().to_string();
        let t = r.open_untyped_table(handle).map_err(|e| e.to_string())?;
        rows.insert(name, t.len().map_err(|e| e.to_string())?);
    }
    for handle in r.list_multimap_tables().map_err(|e| e.to_string())? {
        let name = handle.name().to_string();
        let t = r
            .open_untyped_multimap_table(handle)
            .map_err(|e| e.to_string())?;
        rows.insert(name, t.len().map_err(|e| e.to_string())?);
    }
    Ok(rows)
}

fn write_rows(f: &mut fmt::Formatter<'_>, rows: &TableRows) -> fmt::Result {
    let width = rows.keys().map(String::len).max().unwrap_or(0);
    for (name, n) in rows {
        writeln!(f, "  {name:<width$}  {n}")?;
    }
    Ok(())
}

/// What `state backup` wrote.
#[derive(Debug)]
pub struct BackupReport {
    pub from: PathBuf,
    pub to: PathBuf,
    pub bytes: u64,
    pub rows: TableRows,
    /// The store had not been closed cleanly and was repaired (as the daemon would at start).
    pub repaired: bool,
}

impl fmt::Display for BackupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.repaired {
            writeln!(
                f,
                "note: the store had not been closed cleanly and was repaired first, as the daemon does at start"
            )?;
        }
        writeln!(
            f,
            "backed up {} to {} ({} bytes, mode 0600: it holds personal data, keep it protected); rows per table, verified in the copy:",
            self.from.display(),
            self.to.display(),
            self.bytes
        )?;
        write_rows(f, &self.rows)
    }
}

/// What `state restore` did.
#[derive(Debug)]
pub struct RestoreReport {
    pub from: PathBuf,
    pub to: PathBuf,
    /// Where the store it replaced was kept (None: there was none).
    pub previous: Option<PathBuf>,
    pub rows: TableRows,
    /// The store it replaced did not open (why); it was kept all the same.
    pub previous_unreadable: Option<String>,
    /// The owner could not be set to the previous store's (why).
    pub owner_warning: Option<String>,
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(why) = &self.previous_unreadable {
            writeln!(f, "note: the store replaced did not open ({why})")?;
        }
        match &self.previous {
            Some(p) => writeln!(f, "the previous store is kept as {}", p.display())?,
            None => writeln!(f, "there was no store before")?,
        }
        if let Some(w) = &self.owner_warning {
            writeln!(f, "warning: {w}")?;
        }
        writeln!(
            f,
            "restored {} to {}; rows per table:",
            self.from.display(),
            self.to.display()
        )?;
        write_rows(f, &self.rows)
    }
}

/// A file created whole or not at all: written under a temporary name next to `target`, mode
/// 0600, removed unless [`Staged::commit`] renames it into place.
struct Staged {
    tmp: PathBuf,
    committed: bool,
}

impl Staged {
    fn next_to(target: &Path) -> Self {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "state.redb".into());
        let tmp = target.with_file_name(format!(".{name}.partial-{}", std::process::id()));
        Self {
            tmp,
            committed: false,
        }
    }

    /// Copies `from` into the temporary file and syncs it; returns the bytes copied.
    fn fill_from(&self, from: &Path) -> io::Result<u64> {
        let _ = std::fs::remove_file(&self.tmp);
        let mut src = File::open(from)?;
        let mut dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.tmp)?;
        let n = io::copy(&mut src, &mut dst)?;
        dst.sync_all()?;
        Ok(n)
    }

    fn commit(mut self, target: &Path) -> io::Result<()> {
        std::fs::rename(&self.tmp, target)?;
        self.committed = true;
        sync_dir(target)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn sync_dir(file: &Path) -> io::Result<()> {
    match file.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => File::open(".")?.sync_all(),
    }
}

/// Opens the copy on its own and checks it holds what the original held.
fn verify_copy(copy: &Path, expected: &TableRows) -> Result<(), String> {
    let db = match open_read_only(copy) {
        Opened::Db(db) => db,
        Opened::Busy => return Err("the copy is locked by another process".into()),
        Opened::Unclean => return Err("the copy needs a repair".into()),
        Opened::Failed(e) => return Err(format!("the copy does not open: {e}")),
    };
    let rows = count_rows(&db)?;
    if &rows != expected {
        return Err(format!(
            "the copy's rows differ from the original's ({rows:?} against {expected:?})"
        ));
    }
    Ok(())
}

/// `state backup` and `restore` copy the redb file; a PostgreSQL store is backed up by the
/// database's own tools, which know its transactions and replicas.
fn refuse_on_postgres(config: &Config, what: &str) -> Result<(), OpsError> {
    if config.state.backend == crate::config::StateBackend::Postgres {
        return Err(OpsError::Usage(format!(
            "the state is in PostgreSQL (state.backend): {what} it with pg_dump / pg_restore or your database service's backups (see docs/operations.md)"
        )));
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// `sendwell state backup --to FILE`: a verified, consistent copy of a stopped daemon's store.
pub fn state_backup(config: &Config, to: &Path) -> Result<BackupReport, OpsError> {
    refuse_on_postgres(config, "back up")?;
    let from = Ledger::file_in(&config.state.dir);
    if !from.is_file() {
        return Err(OpsError::NoInput(format!(
            "no state store at {} (config state.dir): nothing to back up",
            from.display()
        )));
    }
    if same_file(&from, to) {
        return Err(OpsError::Usage(format!(
            "{} is the store itself: back it up to another file",
            to.display()
        )));
    }
    let mut repaired = false;
    let db = match open_read_only(&from) {
        Opened::Db(db) => db,
        Opened::Busy => return Err(OpsError::Busy(format!("temporarily unavailable: {BUSY}"))),
        Opened::Unclean => {
            // A crash left it unclosed: repair it the way the daemon's start would, then read.
            match Ledger::open(&config.state.dir) {
                Ok(l) => drop(l),
                Err(crate::store::LedgerError::InUse) => {
                    return Err(OpsError::Busy(format!("temporarily unavailable: {BUSY}")));
                }
                Err(e) => {
                    return Err(OpsError::Store(format!(
                        "{} needs a repair that failed: {e}",
                        from.display()
                    )));
                }
            }
            repaired = true;
            match open_read_only(&from) {
                Opened::Db(db) => db,
                Opened::Busy => {
                    return Err(OpsError::Busy(format!("temporarily unavailable: {BUSY}")));
                }
                Opened::Unclean => {
                    return Err(OpsError::Store(format!(
                        "{} still needs a repair after one",
                        from.display()
                    )));
                }
                Opened::Failed(e) => {
                    return Err(OpsError::Store(format!(
                        "{} does not open: {e}",
                        from.display()
                    )));
                }
            }
        }
        Opened::Failed(e) => {
            return Err(OpsError::Store(format!(
                "{} does not open: {e}",
                from.display()
            )));
        }
    };
    let rows =
        count_rows(&db).map_err(|e| OpsError::Store(format!("reading {}: {e}", from.display())))?;
    // `db` stays open until the copy is made: no writer can change the file meanwhile.
    let staged = Staged::next_to(to);
    let bytes = staged
        .fill_from(&from)
        .map_err(|e| OpsError::Output(format!("cannot write {}: {e}", to.display())))?;
    drop(db);
    verify_copy(&staged.tmp, &rows)
        .map_err(|e| OpsError::Output(format!("the backup failed verification: {e}")))?;
    staged
        .commit(to)
        .map_err(|e| OpsError::Output(format!("cannot write {}: {e}", to.display())))?;
    Ok(BackupReport {
        from,
        to: to.to_path_buf(),
        bytes,
        rows,
        repaired,
    })
}

/// `sendwell state restore --from FILE`: puts a backup in place of a stopped daemon's store.
pub fn state_restore(config: &Config, from: &Path) -> Result<RestoreReport, OpsError> {
    refuse_on_postgres(config, "restore")?;
    let meta = std::fs::metadata(from)
        .map_err(|e| OpsError::NoInput(format!("cannot read {}: {e}", from.display())))?;
    if !meta.is_file() {
        return Err(OpsError::NoInput(format!(
            "{} is not a file",
            from.display()
        )));
    }
    File::open(from)
        .map_err(|e| OpsError::NoInput(format!("cannot read {}: {e}", from.display())))?;
    let target = Ledger::file_in(&config.state.dir);
    if same_file(from, &target) {
        return Err(OpsError::Usage(format!(
            "{} is the store itself: restore from a backup",
            from.display()
        )));
    }
    let not_a_store = |why: String| {
        OpsError::Data(format!(
            "{} is not a sendwell state store: {why}; nothing was changed",
            from.display()
        ))
    };
    let backup = match open_read_only(from) {
        Opened::Db(db) => db,
        Opened::Busy => {
            return Err(OpsError::Busy(format!(
                "temporarily unavailable: {} is open in another process (a daemon using it as its store?)",
                from.display()
            )));
        }
        Opened::Unclean => {
            return Err(not_a_store(
                "it was not closed cleanly (a copy of a running store?); back up a stopped store with `sendwell state backup`".into(),
            ));
        }
        Opened::Failed(e) => return Err(not_a_store(e)),
    };
    let rows = count_rows(&backup).map_err(not_a_store)?;
    if !rows.contains_key(SIGNATURE_TABLE) {
        return Err(not_a_store(format!("it has no {SIGNATURE_TABLE} table")));
    }

    std::fs::create_dir_all(&config.state.dir).map_err(|e| {
        OpsError::Store(format!("cannot create {}: {e}", config.state.dir.display()))
    })?;
    // Held until the new store is in place: no daemon starts on the old one meanwhile.
    let mut previous_unreadable = None;
    let _current = if target.exists() {
        match open_read_only(&target) {
            Opened::Db(db) => Some(db),
            Opened::Busy => {
                return Err(OpsError::Busy(format!("temporarily unavailable: {BUSY}")));
            }
            Opened::Unclean => {
                previous_unreadable = Some("it had not been closed cleanly".to_string());
                None
            }
            Opened::Failed(e) => {
                previous_unreadable = Some(e);
                None
            }
        }
    } else {
        None
    };

    let store_err = |what: &str, e: io::Error| OpsError::Store(format!("{what}: {e}"));
    let staged = Staged::next_to(&target);
    staged.fill_from(from).map_err(|e| {
        store_err(
            &format!("cannot copy into {}", config.state.dir.display()),
            e,
        )
    })?;
    drop(backup);
    verify_copy(&staged.tmp, &rows)
        .map_err(|e| OpsError::Store(format!("the restored copy failed verification: {e}")))?;
    // The daemon's user must be able to open it: give it the previous store's owner (or the
    // state directory's), as far as we may.
    let owner_of = if target.exists() {
        std::fs::metadata(&target)
    } else {
        std::fs::metadata(&config.state.dir)
    };
    let owner_warning = match owner_of {
        Ok(m) => {
            let mine = std::fs::metadata(&staged.tmp).map(|s| (s.uid(), s.gid()));
            if mine
                .as_ref()
                .is_ok_and(|&(u, g)| (u, g) != (m.uid(), m.gid()))
            {
                std::os::unix::fs::chown(&staged.tmp, Some(m.uid()), Some(m.gid()))
                    .err()
                    .map(|e| {
                        format!(
                            "cannot give the restored store the owner {}:{} ({e}); make sure the daemon's user can read and write it",
                            m.uid(),
                            m.gid()
                        )
                    })
            } else {
                None
            }
        }
        Err(_) => None,
    };

    let previous = if target.exists() {
        let kept = target.with_file_name("state.redb.before-restore");
        let _ = std::fs::remove_file(&kept);
        // A hard link keeps the old store without a moment where state.redb is missing (a
        // daemon starting then would create an empty one); a copy where links do not work.
        if std::fs::hard_link(&target, &kept).is_err() {
            std::fs::copy(&target, &kept).map_err(|e| {
                store_err(
                    &format!("cannot keep the previous store as {}", kept.display()),
                    e,
                )
            })?;
        }
        Some(kept)
    } else {
        None
    };
    staged.commit(&target).map_err(|e| {
        store_err(
            &format!("cannot put the backup in place at {}", target.display()),
            e,
        )
    })?;
    Ok(RestoreReport {
        from: from.to_path_buf(),
        to: target,
        previous,
        rows,
        previous_unreadable,
        owner_warning,
    })
}
