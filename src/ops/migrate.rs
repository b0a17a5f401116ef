//! `sendwell state migrate --to-postgres`: moves a stopped daemon's redb store into the empty
//! PostgreSQL database that `[state.postgres]` names.
//!
//! The byte tables keep redb's keys and values byte for byte in PostgreSQL, and the ledger's
//! entries go into its typed columns, so the move is a copy: every table streamed from the
//! redb file (which holds the file lock throughout, so no daemon starts on it meanwhile) in
//! chunks of [`CHUNK`] rows, each chunk one transaction, so nothing waits behind one huge
//! commit and memory stays bounded whatever the store's size. The target must be empty (a
//! database that already holds state is never mixed with another's) and is held exclusively,
//! as every tool holds it. Then the rows per table are counted on both sides. Nothing is written
//! to the redb store (opening it commits no change): after a failure it is still the whole
//! state, and the daemon can go back to it.

use std::fmt;

use super::error::OpsError;
use crate::config::{Config, StateBackend};
use crate::store::{KvOp, Ledger, LedgerError, Table};

/// Rows per transaction on the target.
const CHUNK: usize = 2000;

/// The ledger's name in the report (as in PostgreSQL).
const LEDGER_NAME: &str = "sw_ledger";

/// One table's rows: in the redb store, copied, and in the database afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigratedTable {
    /// Its name in PostgreSQL.
    pub name: &'static str,
    pub source: u64,
    pub copied: u64,
    pub target: u64,
}

/// What `state migrate` copied.
#[derive(Debug)]
pub struct MigrateReport {
    /// The redb file copied from.
    pub from: std::path::PathBuf,
    /// `state.postgres.url` (it never carries a password).
    pub to: String,
    pub tables: Vec<MigratedTable>,
}

impl fmt::Display for MigrateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "copied {} into {}; rows per table (copied / in the database):",
            self.from.display(),
            self.to
        )?;
        write_tables(f, &self.tables)?;
        writeln!(
            f,
            "{} is unchanged; start the daemon (state.backend = \"postgres\")",
            self.from.display()
        )
    }
}

fn write_tables(f: &mut impl fmt::Write, tables: &[MigratedTable]) -> fmt::Result {
    let width = tables.iter().map(|t| t.name.len()).max().unwrap_or(0);
    for t in tables {
        writeln!(f, "  {:<width$}  {} / {}", t.name, t.copied, t.target)?;
    }
    Ok(())
}

const BUSY: &str = "the state store is in use: the daemon is running (or another tool has it \
open). Stop the daemon first (systemctl stop sendwell, or sendwell@N for a shard) and run this \
again";

fn store_error(what: &str, e: LedgerError) -> OpsError {
    OpsError::Store(format!("{what}: {e}"))
}

/// `sendwell state migrate --to-postgres`: copies `state.dir`'s redb store into the empty
/// database of `[state.postgres]` and checks the rows per table.
pub async fn state_migrate(config: &Config) -> Result<MigrateReport, OpsError> {
    let pg = match (config.state.backend, &config.state.postgres) {
        (StateBackend::Postgres, Some(pg)) => pg,
        _ => {
            return Err(OpsError::Usage(
                "state migrate --to-postgres copies into the database the daemon will use: set \
                 state.backend = \"postgres\" and [state.postgres] in the config first (state.dir \
                 still names the redb store to copy)"
                    .into(),
            ));
        }
    };
    let from = Ledger::file_in(&config.state.dir);
    // Opening would create an empty store: a wrong state.dir must not pass for an empty one.
    if !from.is_file() {
        return Err(OpsError::NoInput(format!(
            "no state store at {} (config state.dir): nothing to migrate",
            from.display()
        )));
    }
    let dir = config.state.dir.clone();
    // The source first: while the daemon runs on it, nothing else is looked at.
    let source = tokio::task::spawn_blocking(move || Ledger::open(&dir))
        .await
        .map_err(|e| OpsError::Store(format!("opening {}: {e}", from.display())))?
        .map_err(|e| match e {
            LedgerError::InUse => OpsError::Busy(format!("temporarily unavailable: {BUSY}")),
            e => store_error(&format!("cannot open {}", from.display()), e),
        })?;
    let redb = source
        .redb()
        .expect("Ledger::open opens a redb store")
        .clone();
    let target = Ledger::open_state(&config.state, true)
        .await
        .map_err(|e| match e {
            LedgerError::InUse => OpsError::Busy(
                "temporarily unavailable: a sendwell daemon (or another tool) is using the \
                 PostgreSQL database; stop it first and run this again"
                    .into(),
            ),
            e => store_error("cannot open the PostgreSQL database", e),
        })?;
    let empty = target
        .is_empty()
        .await
        .map_err(|e| store_error("cannot read the PostgreSQL database", e))?;
    if !empty {
        return Err(OpsError::Store(format!(
            "the PostgreSQL database ({}) already holds sendwell state; nothing was copied. \
             state migrate only fills an empty database: point [state.postgres] at a new one",
            pg.url
        )));
    }

    let mut tables = Vec::with_capacity(Table::ALL.len() + 1);
    let source_jobs = redb
        .job_count()
        .map_err(|e| store_error("cannot read the redb store", e))?;
    let scan = redb.clone();
    let copied = pour(&target, move |emit| {
        scan.for_each_entry(|id, entry| {
            emit(KvOp::PutJob {
                id: id.to_string(),
                entry,
            })
        })
    })
    .await?;
    let in_target = target
        .job_count()
        .await
        .map_err(|e| store_error("cannot count the copied ledger", e))?;
    tables.push(MigratedTable {
        name: LEDGER_NAME,
        source: source_jobs,
        copied,
        target: in_target,
    });
    for table in Table::ALL {
        let source_rows = redb
            .kv_len(table)
            .map_err(|e| store_error("cannot read the redb store", e))?;
        let scan = redb.clone();
        let copied = pour(&target, move |emit| {
            scan.kv_for_each(table, |k, v| {
                emit(KvOp::Put {
                    table,
                    key: k.to_vec(),
                    value: v.to_vec(),
                })
            })
        })
        .await?;
        let in_target = target
            .kv_len(table)
            .await
            .map_err(|e| store_error(&format!("cannot count {}", table.pg_name()), e))?;
        tables.push(MigratedTable {
            name: table.pg_name(),
            source: source_rows,
            copied,
            target: in_target,
        });
    }
    let differ: Vec<&MigratedTable> = tables
        .iter()
        .filter(|t| t.source != t.copied || t.copied != t.target)
        .collect();
    if !differ.is_empty() {
        let mut detail = String::new();
        for t in &differ {
            detail.push_str(&format!(
                "\n  {}: {} in {}, {} copied, {} in the database",
                t.name,
                t.source,
                from.display(),
                t.copied,
                t.target
            ));
        }
        return Err(OpsError::Data(format!(
            "the copy does not match its source:{detail}\n{} is unchanged: keep the daemon on \
             redb, and drop the database's sw_ tables (or use a new database) before trying again",
            from.display()
        )));
    }
    Ok(MigrateReport {
        from,
        to: pg.url.clone(),
        tables,
    })
}

/// Writes what `scan` emits to `target` in chunks of [`CHUNK`], each its own transaction, while
/// `scan` goes on reading (on a blocking thread: redb's scans are synchronous); returns how
/// many rows were written. Two chunks in flight at most: memory stays bounded.
async fn pour(
    target: &Ledger,
    scan: impl FnOnce(&mut dyn FnMut(KvOp)) -> Result<(), LedgerError> + Send + 'static,
) -> Result<u64, OpsError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<KvOp>>(2);
    let reader = tokio::task::spawn_blocking(move || {
        let mut chunk = Vec::with_capacity(CHUNK);
        // Once the writing side gave up (a failed write), the rest of the scan is skipped.
        let mut open = true;
        scan(&mut |op| {
            if !open {
                return;
            }
            chunk.push(op);
            if chunk.len() == CHUNK {
                open = tx.blocking_send(std::mem::take(&mut chunk)).is_ok();
            }
        })?;
        if open && !chunk.is_empty() {
            let _ = tx.blocking_send(chunk);
        }
        Ok::<_, LedgerError>(())
    });
    let mut written = 0u64;
    let mut failed = None;
    while let Some(chunk) = rx.recv().await {
        let n = chunk.len() as u64;
        if let Err(e) = target.kv_many(chunk).await {
            failed = Some(store_error(
                "writing to the PostgreSQL database failed (it now holds part of the copy: drop \
                 its sw_ tables, or use a new database, before trying again; the redb store is \
                 unchanged)",
                e,
            ));
            break;
        }
        written += n;
    }
    drop(rx);
    let read = reader
        .await
        .map_err(|e| OpsError::Store(format!("reading the redb store: {e}")))?;
    if let Some(e) = failed {
        return Err(e);
    }
    read.map_err(|e| store_error("cannot read the redb store", e))?;
    Ok(written)
}
