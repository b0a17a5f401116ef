//! The state store on PostgreSQL (issue 17): the same tables, keys and write semantics as the
//! redb store ([`crate::store::ledger`]), for deployments that keep state in a database.
//!
//! Writes go through one writer task with a dedicated connection that commits everything
//! waiting in one transaction, its statements pipelined (see [`writer`]): group commit, as the
//! redb writer does. Reads go through a small pool; the dedupe lookups of jobs, many per query
//! (see [`look_up_jobs`]). Only bind parameters reach the server:
//! keys carry phone numbers, and SQL text shows up in server logs.
//!
//! Several processes may share one database (issue 18): a job's claim
//! ([`KvOp::ClaimJob`]) is a conditional statement, so exactly one of racing claims wins
//! whoever makes them. A daemon holds a shared advisory lock for as long as it runs; a
//! command-line tool's open takes it exclusively, so it learns that a daemon runs (and talks to
//! the daemon instead), as redb's file lock told it.

pub mod follow;
#[cfg(test)]
mod follow_tests;
pub mod quota;
mod registry;
mod schema;
#[cfg(test)]
mod tests;
mod tls;
mod writer;

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use futures_util::TryStreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::health::StoreHealth;
use super::ledger::{KvOp, KvRow, LedgerEntry, LedgerError, LedgerState, Table};
pub use registry::{LiveSet, Me, Registry};
use writer::{Op, Request};

/// Held shared by every running daemon (on its writer connection), exclusively by a tool:
/// "sendwell" in ASCII.
const STORE_LOCK: i64 = 0x7365_6e64_7765_6c6c;
/// Held while the schema is migrated.
const MIGRATE_LOCK: i64 = STORE_LOCK + 1;
/// Rows per page of a long scan as it was read before streaming (see [`SCAN_PAGES_COLLECTED`]).
const SCAN_PAGE: i64 = 4096;
/// Rows per statement of a long scan. Each statement's rows are handed on as they arrive, so
/// the server reads the next ones while the caller handles these. A streamed statement lasts
/// until the caller has taken its rows (less what the socket buffers hold): 8,192 rows of the
/// consent load (about 0.5 MB, 1–3 µs each) keep each statement far below the shortest
/// statement timeout allowed (100 ms), though the whole 10 M-row load takes seconds. Small in
/// unit tests, so that a few thousand rows cross several statements.
const SCAN_CHUNK: i64 = if cfg!(test) { 1000 } else { 8192 };
/// Ledger rows deleted per purge transaction: jobs in flight never wait behind a long one.
const PURGE_CHUNK: i64 = 2000;
/// Waits between probes (and the writer's retries) while the database is unreachable:
/// doubling, so a database that is back is noticed within about two seconds.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// How to reach the database.
#[derive(Clone)]
pub struct PgSettings {
    /// postgres://user@host:port/db, no password in it.
    pub url: String,
    /// From a secret file; never logged.
    pub password: Option<String>,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    pub application_name: String,
    pub tls: crate::config::PgTls,
    /// The roots `verify-full` trusts instead of the system's.
    pub ca_file: Option<std::path::PathBuf>,
}

/// One connection's settings and its TLS connector (unused with `tls = "off"`).
#[derive(Clone)]
pub(super) struct ConnConfig {
    pg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for ConnConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio-postgres's own Debug leaves the password out.
        f.debug_struct("ConnConfig")
            .field("pg", &self.pg)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("application_name", &self.application_name)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl PgSettings {
    /// The connection config of one of the store's roles (`pool`, `writer`): the role shows in
    /// `pg_stat_activity`'s application_name.
    fn config(&self, role: &str) -> Result<ConnConfig, LedgerError> {
        // The URL's own error text may quote it; it holds no password, but say little anyway.
        let mut c = tokio_postgres::Config::from_str(&self.url)
            .map_err(|e| LedgerError::Store(format!("state.postgres.url is invalid: {e}")))?;
        if c.get_password().is_some() {
            return Err(LedgerError::Store(
                "state.postgres.url carries a password: give it in a password file instead".into(),
            ));
        }
        if let Some(p) = &self.password {
            c.password(p.trim_end_matches(['\r', '\n']));
        }
        c.connect_timeout(self.connect_timeout);
        // A database that vanishes without a reset (a partition, a moved address, a dead VM)
        // would otherwise hold every statement for the kernel's retransmission timeout
        // (about 15 minutes) with the store still reported healthy: unacknowledged data
        // fails the connection within the statement timeout, an idle one within a minute.
        c.tcp_user_timeout(self.statement_timeout.max(Duration::from_secs(5)));
        c.keepalives_idle(Duration::from_secs(30));
        c.keepalives_interval(Duration::from_secs(10));
        c.keepalives_retries(3);
        c.application_name(format!("{}:{role}", self.application_name));
        // A session whose client vanished mid-transaction (a partition) keeps its row locks
        // until the server notices, by its keepalive, hours later; the writer ends such a
        // session itself, and this bounds any other (a tool's, a pooled one's) too.
        let ms = self.statement_timeout.as_millis().min(i32::MAX as u128 / 2);
        let timeout = format!(
            "-c statement_timeout={ms} -c idle_in_transaction_session_timeout={}",
            (ms * 2).max(10_000)
        );
        let options = match c.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {timeout}"),
            _ => timeout,
        };
        c.options(options);
        c.ssl_mode(match self.tls {
            crate::config::PgTls::Off => tokio_postgres::config::SslMode::Disable,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(ConnConfig {
            pg: c,
            tls: tls::connector(self.tls, self.ca_file.as_deref())?,
        })
    }
}

/// Whether a database error means "the database cannot be reached now" (the pipeline waits)
/// rather than "this statement is wrong".
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    use std::error::Error as _;
    if let Some(code) = e.code() {
        let c = code.code();
        // 08: connection exceptions; 57P01-03: admin/crash shutdown, cannot connect now;
        // 53: insufficient resources (53100 the server's disk is full, 53200 out of memory,
        // 53300 too many connections); 25006: read-only (a standby after a failover);
        // 58030: the server's I/O error; 57014: a statement cancelled by its timeout. Like
        // a full disk for redb: jobs wait for the database, they are not failed.
        return c.starts_with("08")
            || c.starts_with("53")
            || matches!(c, "57P01" | "57P02" | "57P03" | "25006" | "58030" | "57014");
    }
    e.is_closed()
        || e.source().is_some_and(|s| s.is::<std::io::Error>())
        || e.to_string().starts_with("timeout")
}

/// The error's text without what the server may quote of the data (a key's bytes in a
/// constraint's detail): its message and SQLSTATE only.
fn describe(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    match (e.as_db_error(), e.source()) {
        (Some(db), _) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        (None, Some(src)) => format!("{e}: {src}"),
        (None, None) => e.to_string(),
    }
}

fn pg_error(e: tokio_postgres::Error) -> LedgerError {
    if is_unavailable(&e) {
        LedgerError::Io(describe(&e))
    } else {
        LedgerError::Store(describe(&e))
    }
}

/// A lock taken by [`PgStore::lock_keys`]: held until [`Self::release`]. Dropped without it (an
/// error on the way, a cancelled future), its connection is closed instead of going back to
/// the pool, so the server ends the transaction and frees the lock at once.
pub struct KeyLock {
    store: PgStore,
    /// The transaction holding the lock. The reads under the lock go through it too: with
    /// other pooled connections, locks taken at once would hold every connection of the pool
    /// and wait for one more.
    conn: Option<deadpool_postgres::Object>,
}

impl KeyLock {
    pub async fn kv_get(&self, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>, LedgerError> {
        let c = self.conn.as_ref().expect("held until released");
        let r = self.store.kv_get_on(c, t, key).await;
        self.store.noted(r)
    }

    pub async fn kv_scan_prefix(&self, t: Table, prefix: &[u8]) -> Result<Vec<KvRow>, LedgerError> {
        let c = self.conn.as_ref().expect("held until released");
        let r = self.store.kv_scan_prefix_on(c, t, prefix).await;
        self.store.noted(r)
    }

    /// Ends the transaction that holds the lock. An error means the session was lost meanwhile
    /// (the lock may have been freed early): the caller's work is to be done again.
    pub async fn release(mut self) -> Result<(), LedgerError> {
        let c = self.conn.take().expect("held until released");
        match c.batch_execute("COMMIT").await {
            Ok(()) => Ok(()),
            Err(e) => {
                drop(deadpool_postgres::Object::take(c));
                Err(pg_error(e))
            }
        }
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            drop(deadpool_postgres::Object::take(c));
        }
    }
}

/// How long [`PgStore::lock_keys`] tries a lock held elsewhere: past the idle-in-transaction
/// timeout that frees a stalled holder's (twice the statement timeout, 60 s by default).
const LOCK_PATIENCE: Duration = Duration::from_secs(90);

/// A key's 32 bits for a two-key advisory lock (`(space, hash)`: a lock space of its own, apart
/// from the one-bigint locks the store uses). Two keys with one hash only wait for each other.
pub(crate) fn lock_hash(key: &[u8]) -> i32 {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(key);
    i32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// A pool of `pool_size` connections in `role` (as `application_name` shows it).
fn build_pool(s: &PgSettings, role: &str) -> Result<Pool, LedgerError> {
    let config = s.config(role)?;
    let manager = Manager::from_config(
        config.pg,
        config.tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(s.pool_size.max(1))
        .runtime(Runtime::Tokio1)
        // Waiting for a free connection is a queue, not an outage: hundreds of jobs read at
        // once through `pool_size` connections. Only as long as a statement may take.
        .wait_timeout(Some(s.statement_timeout.max(s.connect_timeout)))
        .create_timeout(Some(s.connect_timeout))
        .recycle_timeout(Some(s.connect_timeout))
        .build()
        .map_err(|e| LedgerError::Store(format!("cannot build the connection pool: {e}")))
}

fn pool_error(e: PoolError) -> LedgerError {
    match e {
        // Only a new connection's failure comes as Backend (the pool's fast recycling runs no
        // query): the database refuses or cannot be reached, whatever the SQLSTATE says (not
        // accepting connections, a revoked CONNECT): jobs wait rather than fail.
        PoolError::Backend(e) => LedgerError::Io(describe(&e)),
        PoolError::Timeout(_) | PoolError::Closed => {
            LedgerError::Io(format!("no database connection: {e}"))
        }
        e => LedgerError::Store(e.to_string()),
    }
}

/// Connects one dedicated connection; its driver runs on a task of its own and ends with it.
/// A certificate or protocol the TLS handshake refused is a setting to fix ([`LedgerError::Store`]:
/// the daemon's start does not wait for it), not an outage.
async fn connect(config: &ConnConfig) -> Result<Client, LedgerError> {
    let (client, conn) = config
        .pg
        .connect(config.tls.clone())
        .await
        .map_err(|e| tls::refused(&e).map_or_else(|| pg_error(e), LedgerError::Store))?;
    tokio::spawn(async move {
        // Its end shows as the client's errors (closed): handled there, not logged here.
        let _ = conn.await;
    });
    Ok(client)
}

/// Per table, the read statements' text (built once: prepared and cached per connection).
struct TableSql {
    get: String,
    scan: String,
    range: String,
    from: String,
    /// Many prefixes' ranges in one statement: `$1` their starts, `$2` their ends.
    ranges: String,
    page_first: String,
    page_after: String,
    count: String,
}

impl TableSql {
    fn new(name: &str) -> Self {
        TableSql {
            get: format!("SELECT value FROM {name} WHERE key = $1"),
            scan: format!("SELECT key, value FROM {name} ORDER BY key"),
            range: format!(
                "SELECT key, value FROM {name} WHERE key >= $1 AND key < $2 ORDER BY key"
            ),
            from: format!("SELECT key, value FROM {name} WHERE key >= $1 ORDER BY key"),
            ranges: format!(
                "SELECT t.key, t.value FROM {name} t \
                 JOIN unnest($1::bytea[], $2::bytea[]) AS p(lo, hi) \
                 ON t.key >= p.lo AND t.key < p.hi"
            ),
            page_first: format!("SELECT key, value FROM {name} ORDER BY key LIMIT $1"),
            page_after: format!(
                "SELECT key, value FROM {name} WHERE key > $2 ORDER BY key LIMIT $1"
            ),
            count: format!("SELECT count(*) FROM {name}"),
        }
    }
}

/// Job lookups answered by one query at most.
const MAX_LOOKUPS: usize = 1024;

const GET_JOBS: &str = "SELECT state, attempts, updated_ms, published, event, id FROM sw_ledger \
     WHERE id = ANY($1)";

/// The end (exclusive) of the key range of `prefix`: the prefix with its last byte that is not
/// 0xFF incremented and the 0xFF bytes after it dropped (0x12 0xFF → 0x13). None when every
/// byte is 0xFF (or there are none): the range has no upper end.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let keep = prefix.iter().rposition(|&b| b != 0xFF)?;
    let mut end = prefix[..=keep].to_vec();
    end[keep] += 1;
    Some(end)
}

/// For `benches/consent_load.rs` only, to measure before and after in one run: long scans
/// read collected pages one round trip after another, as they did before streaming.
#[doc(hidden)]
pub static SCAN_PAGES_COLLECTED: AtomicBool = AtomicBool::new(false);

fn state_code(s: LedgerState) -> i16 {
    match s {
        LedgerState::Pending => 1,
        LedgerState::Sending => 2,
        LedgerState::Final => 3,
    }
}

fn state_from(code: i16) -> Result<LedgerState, LedgerError> {
    match code {
        1 => Ok(LedgerState::Pending),
        2 => Ok(LedgerState::Sending),
        3 => Ok(LedgerState::Final),
        c => Err(LedgerError::Store(format!("unknown ledger state {c}"))),
    }
}

fn entry_from(row: &tokio_postgres::Row) -> Result<LedgerEntry, LedgerError> {
    Ok(LedgerEntry {
        state: state_from(row.try_get(0).map_err(pg_error)?)?,
        attempts: row.try_get::<_, i32>(1).map_err(pg_error)? as u32,
        updated_ms: row.try_get(2).map_err(pg_error)?,
        published: row.try_get(3).map_err(pg_error)?,
        event: row.try_get(4).map_err(pg_error)?,
    })
}

/// Ids whose outcome event the broker confirmed and whose row does not say so yet: `get`
/// answers from here at once; the writer stores them with its next commit and then forgets
/// them.
pub(super) type Published = Arc<Mutex<HashSet<Box<str>>>>;

struct Inner {
    pool: Pool,
    /// For [`PgStore::lock_keys`] only (see where it is built).
    locks: Pool,
    /// Tries of [`PgStore::lock_keys`] that found a key held elsewhere (for tests and the
    /// metric `sendwell_store_lock_retries_total`).
    lock_retries: AtomicU64,
    tx: mpsc::UnboundedSender<Request>,
    health: Arc<StoreHealth>,
    published: Published,
    scanned: AtomicU64,
    tables: Vec<TableSql>,
    /// To the task that answers [`PgStore::get`].
    lookups: mpsc::UnboundedSender<Lookup>,
}

/// Handle to the PostgreSQL store; cheap to clone. The writer task ends (and the daemon's lock
/// goes with its connection) when the last handle is dropped.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

impl PgStore {
    /// Connects, applies migrations under an advisory lock, starts the writer task.
    /// `exclusive`: a command-line tool's open: fails with [`LedgerError::InUse`] when a daemon
    /// holds the store (daemons hold `pg_advisory_lock_shared` on their writer connection; a
    /// tool tries `pg_try_advisory_lock`). Schema newer than known: [`LedgerError::SchemaTooNew`].
    pub async fn open(s: &PgSettings, exclusive: bool) -> Result<PgStore, LedgerError> {
        let writer_config = s.config("writer")?;
        let mut client = connect(&writer_config).await?;
        // A store just dropped in this process lets go of its lock a moment later (its writer
        // task ends); anything holding it longer than that is another process.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while !writer::take_lock(&client, exclusive).await? {
            if tokio::time::Instant::now() >= deadline {
                return Err(LedgerError::InUse);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        schema::migrate(&mut client).await?;
        let pool = build_pool(s, "pool")?;
        // Connections that hold a lock (`lock_keys`) come from a pool of their own: one that
        // waits for a lock, or holds one while it reads, must never take the connection a
        // read (or a heartbeat) needs, nor wait for one itself (erasures at once would hold
        // every connection and wait for one more). Made on first use, up to `pool_size`.
        let locks = build_pool(s, "locks")?;
        let health = Arc::new(StoreHealth::default());
        let published: Published = Arc::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let w = writer::Writer::new(
            client,
            writer_config,
            exclusive,
            health.clone(),
            published.clone(),
            pool.clone(),
            writer::Deadlines {
                round_trip: s.statement_timeout + Duration::from_secs(2),
                probe: s.connect_timeout.max(Duration::from_secs(1)),
            },
        )
        .await?;
        let writer = tokio::spawn(w.run(rx));
        let watched = health.clone();
        tokio::spawn(async move {
            // Every write fails without it (WriterGone): the store must not look writable.
            if let Err(e) = writer.await
                && e.is_panic()
            {
                watched.failed("the state store's writer task panicked");
            }
        });
        let (lookups, rx) = mpsc::unbounded_channel();
        tokio::spawn(look_up_jobs(pool.clone(), rx));
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                locks,
                lock_retries: AtomicU64::new(0),
                tx,
                health,
                published,
                scanned: AtomicU64::new(0),
                tables: Table::ALL
                    .iter()
                    .map(|t| TableSql::new(t.pg_name()))
                    .collect(),
                lookups,
            }),
        })
    }

    /// Whether writes succeed now, and waiting for them to.
    pub fn health(&self) -> &Arc<StoreHealth> {
        &self.inner.health
    }

    /// The registry of running instances (issue 18), on this store's pool.
    pub fn registry(&self) -> Registry {
        Registry::new(self.inner.pool.clone())
    }

    /// The leases of the global quotas (daily tiers and budgets, issue 18), on this store's
    /// pool.
    pub fn quotas(&self) -> quota::QuotaStore {
        quota::QuotaStore::new(self.inner.pool.clone())
    }

    fn sql(&self, t: Table) -> &TableSql {
        &self.inner.tables[t as usize]
    }

    /// A pooled connection; a failure to get one marks the store unreachable.
    async fn conn(&self) -> Result<deadpool_postgres::Object, LedgerError> {
        let r = self.inner.pool.get().await.map_err(pool_error);
        self.noted(r)
    }

    /// Passes `r` on; an error that says the database is unreachable marks the store so (the
    /// writer notices its return within half a second, even if nothing is written meanwhile).
    fn noted<T>(&self, r: Result<T, LedgerError>) -> Result<T, LedgerError> {
        if let Err(LedgerError::Io(m)) = &r {
            self.inner.health.failed(m);
        }
        r
    }

    async fn write(&self, op: Op) -> Result<u64, LedgerError> {
        let (done, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Request {
                op,
                done: Some(done),
            })
            .map_err(|_| LedgerError::WriterGone)?;
        rx.await.map_err(|_| LedgerError::WriterGone)?
    }

    pub async fn get(&self, id: &str) -> Result<Option<LedgerEntry>, LedgerError> {
        // PostgreSQL's text cannot hold NUL, so no job id with one was ever stored; asking
        // would be a statement error (an invalid job's id is looked up as it came).
        if id.contains('\0') {
            return Ok(None);
        }
        // Asked before the query too: a mark made before this call may be committed, and
        // dropped from the set, between the query's read and the check after it.
        let marked = lock(&self.inner.published).contains(id);
        let (done, answer) = oneshot::channel();
        let asked = self.inner.lookups.send(Lookup {
            id: id.to_string(),
            done,
        });
        let r = match asked {
            Ok(()) => answer.await.unwrap_or_else(|_| Err(lookups_gone())),
            Err(_) => Err(lookups_gone()),
        };
        let mut entry = self.noted(r)?;
        if let Some(e) = entry.as_mut()
            && !e.published
        {
            e.published = marked || lock(&self.inner.published).contains(id);
        }
        Ok(entry)
    }

    /// Durably records the entry (returns once committed).
    pub async fn put(&self, id: &str, entry: LedgerEntry) -> Result<(), LedgerError> {
        self.write(Op::Many(vec![KvOp::PutJob {
            id: id.to_string(),
            entry,
        }]))
        .await
        .map(|_| ())
    }

    /// Durably records the entry together with `also` in one transaction.
    pub async fn put_with(
        &self,
        id: &str,
        entry: LedgerEntry,
        also: Vec<KvOp>,
    ) -> Result<(), LedgerError> {
        let mut ops = Vec::with_capacity(also.len() + 1);
        ops.push(KvOp::PutJob {
            id: id.to_string(),
            entry,
        });
        ops.extend(also);
        self.write(Op::Many(ops)).await.map(|_| ())
    }

    /// Records that the outcome event was confirmed: visible to [`PgStore::get`] at once,
    /// stored with the writer's next commit. A crash before that loses the mark; the job's
    /// redelivery then republishes the same stored event, byte for byte (at-least-once).
    pub async fn mark_published(&self, id: &str) -> Result<(), LedgerError> {
        lock(&self.inner.published).insert(id.into());
        // Wakes an idle writer, so the mark is stored within a commit's time.
        let _ = self.inner.tx.send(Request {
            op: Op::Flush,
            done: None,
        });
        Ok(())
    }

    pub async fn kv_get(&self, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>, LedgerError> {
        let r = async { self.kv_get_on(&self.conn().await?, t, key).await }.await;
        self.noted(r)
    }

    async fn kv_get_on(
        &self,
        c: &deadpool_postgres::Object,
        t: Table,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, LedgerError> {
        let st = c.prepare_cached(&self.sql(t).get).await.map_err(pg_error)?;
        match c.query_opt(&st, &[&key]).await.map_err(pg_error)? {
            Some(row) => Ok(Some(row.try_get(0).map_err(pg_error)?)),
            None => Ok(None),
        }
    }

    /// Durably sets `key` to `value`.
    pub async fn kv_put(&self, t: Table, key: Vec<u8>, value: Vec<u8>) -> Result<(), LedgerError> {
        self.write(Op::Many(vec![KvOp::Put {
            table: t,
            key,
            value,
        }]))
        .await
        .map(|_| ())
    }

    /// Sets `key` without waiting for the commit (its loss only costs a fallback).
    pub fn kv_put_nowait(&self, t: Table, key: Vec<u8>, value: Vec<u8>) {
        let _ = self.inner.tx.send(Request {
            op: Op::Many(vec![KvOp::Put {
                table: t,
                key,
                value,
            }]),
            done: None,
        });
    }

    /// Atomic insert-if-absent: true when this call inserted the key.
    pub async fn kv_insert_if_absent(
        &self,
        t: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<bool, LedgerError> {
        self.write(Op::InsertIfAbsent {
            table: t,
            key,
            value,
        })
        .await
        .map(|n| n == 1)
    }

    /// How many rows a table has.
    pub async fn kv_len(&self, t: Table) -> Result<u64, LedgerError> {
        self.count(&self.sql(t).count).await
    }

    /// How many ledger entries (job ids) the store has.
    pub async fn job_count(&self) -> Result<u64, LedgerError> {
        self.count("SELECT count(*) FROM sw_ledger").await
    }

    async fn count(&self, sql: &str) -> Result<u64, LedgerError> {
        let r = async {
            let c = self.conn().await?;
            let st = c.prepare_cached(sql).await.map_err(pg_error)?;
            let n: i64 = c
                .query_one(&st, &[])
                .await
                .map_err(pg_error)?
                .try_get(0)
                .map_err(pg_error)?;
            Ok(n as u64)
        }
        .await;
        self.noted(r)
    }

    fn rows(rows: Vec<tokio_postgres::Row>) -> Result<Vec<KvRow>, LedgerError> {
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0).map_err(pg_error)?,
                    r.try_get(1).map_err(pg_error)?,
                ))
            })
            .collect()
    }

    /// Every row of a table, in key order.
    pub async fn kv_scan(&self, t: Table) -> Result<Vec<KvRow>, LedgerError> {
        let r = async {
            let c = self.conn().await?;
            let st = c
                .prepare_cached(&self.sql(t).scan)
                .await
                .map_err(pg_error)?;
            Self::rows(c.query(&st, &[]).await.map_err(pg_error)?)
        }
        .await;
        let rows = self.noted(r)?;
        self.inner
            .scanned
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        Ok(rows)
    }

    /// Rows whose key starts with `prefix`, in key order: a range of the primary key.
    pub async fn kv_scan_prefix(&self, t: Table, prefix: &[u8]) -> Result<Vec<KvRow>, LedgerError> {
        let r = async { self.kv_scan_prefix_on(&self.conn().await?, t, prefix).await }.await;
        self.noted(r)
    }

    async fn kv_scan_prefix_on(
        &self,
        c: &deadpool_postgres::Object,
        t: Table,
        prefix: &[u8],
    ) -> Result<Vec<KvRow>, LedgerError> {
        {
            let rows = match prefix_end(prefix) {
                Some(end) => {
                    let st = c
                        .prepare_cached(&self.sql(t).range)
                        .await
                        .map_err(pg_error)?;
                    c.query(&st, &[&prefix, &end]).await
                }
                None => {
                    let st = c
                        .prepare_cached(&self.sql(t).from)
                        .await
                        .map_err(pg_error)?;
                    c.query(&st, &[&prefix]).await
                }
            };
            Self::rows(rows.map_err(pg_error)?)
        }
    }

    /// Rows whose key starts with any of `prefixes`, in one statement (an index range per
    /// prefix); unordered, and a row under two overlapping prefixes comes twice (the caller
    /// sorts and drops repeats). A prefix whose range has no end (all 0xFF bytes, or empty)
    /// is read on its own: in the joined statement it would scan to the end of the table.
    pub async fn kv_scan_prefixes(
        &self,
        t: Table,
        prefixes: &[Vec<u8>],
    ) -> Result<Vec<KvRow>, LedgerError> {
        let (mut lo, mut hi, mut open) = (Vec::new(), Vec::new(), Vec::new());
        for p in prefixes {
            match prefix_end(p) {
                Some(end) => {
                    lo.push(p.as_slice());
                    hi.push(end);
                }
                None => open.push(p),
            }
        }
        let mut rows = Vec::new();
        if !lo.is_empty() {
            let r = async {
                let c = self.conn().await?;
                // Unprepared, planned with these prefixes (see the writer's CLAIM_UPDATE_MANY).
                let found = c
                    .query_typed(
                        &self.sql(t).ranges,
                        &[(&lo, Type::BYTEA_ARRAY), (&hi, Type::BYTEA_ARRAY)],
                    )
                    .await
                    .map_err(pg_error)?;
                Self::rows(found)
            }
            .await;
            rows = self.noted(r)?;
        }
        for p in open {
            rows.extend(self.kv_scan_prefix(t, p).await?);
        }
        Ok(rows)
    }

    /// Calls `f` on every row of a table, in key order, never holding all rows in memory: one
    /// statement per [`SCAN_CHUNK`] rows (keyset: the next starts after the last key), each
    /// streamed. A start-up load of 10 M rows is bound by what `f` does, not by round trips.
    pub async fn kv_for_each(
        &self,
        t: Table,
        mut f: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), LedgerError> {
        if SCAN_PAGES_COLLECTED.load(Ordering::Relaxed) {
            return self.kv_for_each_paged(t, f).await;
        }
        let r = async {
            let c = self.conn().await?;
            let first = c
                .prepare_cached(&self.sql(t).page_first)
                .await
                .map_err(pg_error)?;
            let after = c
                .prepare_cached(&self.sql(t).page_after)
                .await
                .map_err(pg_error)?;
            let mut last: Option<Vec<u8>> = None;
            loop {
                let rows = match &last {
                    None => {
                        c.query_raw(&first, [&SCAN_CHUNK as &(dyn ToSql + Sync)])
                            .await
                    }
                    Some(k) => {
                        c.query_raw(&after, [&SCAN_CHUNK as &(dyn ToSql + Sync), k])
                            .await
                    }
                }
                .map_err(pg_error)?;
                let mut rows = std::pin::pin!(rows);
                let mut n = 0i64;
                let mut end = None;
                while let Some(row) = rows.try_next().await.map_err(pg_error)? {
                    let k: &[u8] = row.try_get(0).map_err(pg_error)?;
                    let v: &[u8] = row.try_get(1).map_err(pg_error)?;
                    f(k, v);
                    n += 1;
                    end = Some(row);
                }
                self.inner.scanned.fetch_add(n as u64, Ordering::Relaxed);
                match end {
                    Some(row) if n == SCAN_CHUNK => last = Some(row.try_get(0).map_err(pg_error)?),
                    _ => return Ok(()),
                }
            }
        }
        .await;
        self.noted(r)
    }

    /// [`Self::kv_for_each`] as it was before streaming: pages of [`SCAN_PAGE`] rows, each
    /// collected whole before `f` sees any, one round trip after another (for
    /// `benches/consent_load.rs`'s before-and-after only).
    async fn kv_for_each_paged(
        &self,
        t: Table,
        mut f: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), LedgerError> {
        let r = async {
            let c = self.conn().await?;
            let first = c
                .prepare_cached(&self.sql(t).page_first)
                .await
                .map_err(pg_error)?;
            let after = c
                .prepare_cached(&self.sql(t).page_after)
                .await
                .map_err(pg_error)?;
            let mut last: Option<Vec<u8>> = None;
            loop {
                let rows = match &last {
                    None => c.query(&first, &[&SCAN_PAGE]).await,
                    Some(k) => c.query(&after, &[&SCAN_PAGE, k]).await,
                }
                .map_err(pg_error)?;
                let full = rows.len() as i64 == SCAN_PAGE;
                for row in &rows {
                    let k: &[u8] = row.try_get(0).map_err(pg_error)?;
                    let v: &[u8] = row.try_get(1).map_err(pg_error)?;
                    f(k, v);
                }
                self.inner
                    .scanned
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                match rows.last() {
                    Some(row) if full => last = Some(row.try_get(0).map_err(pg_error)?),
                    _ => return Ok(()),
                }
            }
        }
        .await;
        self.noted(r)
    }

    /// Applies all `ops` in one transaction: all or nothing. The count: Put 1, Delete 1 if the
    /// key existed, DeletePrefix the rows deleted, DeleteIf 0 or 1, PutJob 1, DeleteJobs the
    /// entries removed, ClaimJob 1 (or the whole write fails with [`LedgerError::ClaimLost`]).
    pub async fn kv_many(&self, ops: Vec<KvOp>) -> Result<u64, LedgerError> {
        self.write(Op::Many(ops)).await
    }

    pub async fn remove(&self, id: &str) -> Result<(), LedgerError> {
        self.write(Op::Many(vec![KvOp::DeleteJobs {
            ids: vec![id.to_string()],
        }]))
        .await
        .map(|_| ())
    }

    /// Forgets jobs not touched since `older_than_ms`, with what is keyed by them (delivery
    /// state, wamids and their billing marks, the jobs-by-number rows) and applied-webhook
    /// marks past retention; returns the jobs removed. By index, in small transactions: no
    /// scan, and jobs in flight never wait behind a long purge.
    pub async fn purge(&self, older_than_ms: i64) -> Result<u64, LedgerError> {
        let r = async {
            let mut removed = 0u64;
            let mut c = self.conn().await?;
            loop {
                let tx = c.transaction().await.map_err(pg_error)?;
                let ids: Vec<String> = tx
                    .query(
                        "DELETE FROM sw_ledger WHERE id IN \
                         (SELECT id FROM sw_ledger WHERE updated_ms < $1 LIMIT $2) RETURNING id",
                        &[&older_than_ms, &PURGE_CHUNK],
                    )
                    .await
                    .map_err(pg_error)?
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<_, _>>()
                    .map_err(pg_error)?;
                if !ids.is_empty() {
                    let keys: Vec<&[u8]> = ids.iter().map(|s| s.as_bytes()).collect();
                    tx.execute("DELETE FROM sw_delivery WHERE key = ANY($1)", &[&keys])
                        .await
                        .map_err(pg_error)?;
                    let wamids: Vec<Vec<u8>> = tx
                        .query(
                            "DELETE FROM sw_wamids WHERE value = ANY($1) RETURNING key",
                            &[&keys],
                        )
                        .await
                        .map_err(pg_error)?
                        .iter()
                        .map(|r| r.try_get(0))
                        .collect::<Result<_, _>>()
                        .map_err(pg_error)?;
                    let billed: Vec<Vec<u8>> = wamids
                        .iter()
                        .map(|w| [b"billed|".as_slice(), w].concat())
                        .collect();
                    tx.execute(
                        "DELETE FROM sw_webhook_seen WHERE key = ANY($1)",
                        &[&billed],
                    )
                    .await
                    .map_err(pg_error)?;
                    tx.execute(
                        "DELETE FROM sw_jobs_by_number WHERE job_id = ANY($1)",
                        &[&keys],
                    )
                    .await
                    .map_err(pg_error)?;
                }
                tx.commit().await.map_err(pg_error)?;
                removed += ids.len() as u64;
                if (ids.len() as i64) < PURGE_CHUNK {
                    break;
                }
            }
            loop {
                let n = c
                    .execute(
                        "DELETE FROM sw_webhook_seen WHERE key IN \
                         (SELECT key FROM sw_webhook_seen WHERE ts_ms < $1 LIMIT $2)",
                        &[&older_than_ms, &PURGE_CHUNK],
                    )
                    .await
                    .map_err(pg_error)?;
                if (n as i64) < PURGE_CHUNK {
                    break;
                }
            }
            Ok(removed)
        }
        .await;
        self.noted(r)
    }

    /// Job ids whose stored outcome event contains `needle` and that last changed at or before
    /// `until_ms` (a scan, on the server: for erasure, not the hot path).
    pub async fn job_ids_mentioning(
        &self,
        needle: &[u8],
        until_ms: i64,
    ) -> Result<Vec<String>, LedgerError> {
        let r = async {
            let c = self.conn().await?;
            let st = c
                .prepare_cached(
                    "SELECT id FROM sw_ledger WHERE updated_ms <= $2 \
                     AND position($1::bytea IN event) > 0 ORDER BY id",
                )
                .await
                .map_err(pg_error)?;
            c.query(&st, &[&needle, &until_ms])
                .await
                .map_err(pg_error)?
                .iter()
                .map(|r| r.try_get(0).map_err(pg_error))
                .collect::<Result<Vec<String>, _>>()
        }
        .await;
        let ids = self.noted(r)?;
        self.inner
            .scanned
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        Ok(ids)
    }

    /// Every key and value of every table, for tests that prove a number is gone: the ledger's
    /// rows as (id, the entry in redb's encoding), then each table's rows in key order.
    pub async fn dump_all(&self) -> Result<Vec<KvRow>, LedgerError> {
        let r = async {
            let c = self.conn().await?;
            let st = c
                .prepare_cached(
                    "SELECT state, attempts, updated_ms, published, event, id FROM sw_ledger \
                     ORDER BY id",
                )
                .await
                .map_err(pg_error)?;
            let mut rows = Vec::new();
            for row in c.query(&st, &[]).await.map_err(pg_error)? {
                let id: String = row.try_get(5).map_err(pg_error)?;
                rows.push((id.into_bytes(), entry_from(&row)?.encode(0)));
            }
            Ok(rows)
        }
        .await;
        let mut rows = self.noted(r)?;
        self.inner
            .scanned
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        for t in Table::ALL {
            rows.extend(self.kv_scan(t).await?);
        }
        Ok(rows)
    }

    /// Takes a lock that every instance on the database respects, on each of `keys` in the
    /// namespace `space` (one per kind of key), until [`KeyLock::release`]. For a
    /// read-compute-write that must not interleave with another instance's (a consent summary
    /// recomputed from its history). A transaction-scoped advisory lock on a pooled
    /// connection: a dead holder's session ends and frees it (never a lock held forever), the
    /// wait is bounded by the statement timeout, and a holder stuck longer than the
    /// idle-in-transaction timeout loses its session rather than blocking the others.
    ///
    /// Several keys are locked in one transaction (one connection), in the order of their
    /// hashes, so two callers locking overlapping sets never wait for each other in a cycle.
    ///
    /// A key held elsewhere is tried again (after 10 ms, doubling to 500 ms) with no connection
    /// held meanwhile: waiters holding connections would take every one of the pool while an
    /// instance that holds the lock stalls (a partition: the server frees it only at its
    /// idle-in-transaction timeout), and keys nobody holds would then wait too. Gives up after
    /// [`LOCK_PATIENCE`].
    pub async fn lock_keys(&self, space: i32, keys: &[&[u8]]) -> Result<KeyLock, LedgerError> {
        let mut hashes: Vec<i32> = keys.iter().map(|k| lock_hash(k)).collect();
        hashes.sort_unstable();
        hashes.dedup();
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            let r = async {
                let c = self.inner.locks.get().await.map_err(pool_error)?;
                c.batch_execute("BEGIN").await.map_err(pg_error)?;
                let held = KeyLock {
                    store: self.clone(),
                    conn: Some(c),
                };
                let c = held.conn.as_ref().expect("just set");
                for h in &hashes {
                    let got: bool = c
                        .query_one("SELECT pg_try_advisory_xact_lock($1, $2)", &[&space, h])
                        .await
                        .map_err(pg_error)?
                        .try_get(0)
                        .map_err(pg_error)?;
                    if !got {
                        // Frees what this transaction took, and the connection for others.
                        c.batch_execute("ROLLBACK").await.map_err(pg_error)?;
                        let mut held = held;
                        if let Some(c) = held.conn.take() {
                            drop(c);
                        }
                        return Ok(None);
                    }
                }
                Ok(Some(held))
            }
            .await;
            if let Some(held) = self.noted(r)? {
                return Ok(held);
            }
            self.inner.lock_retries.fetch_add(1, Ordering::Relaxed);
            crate::metrics::store_lock_retry();
            if started.elapsed() >= LOCK_PATIENCE {
                return Err(LedgerError::Store(format!(
                    "a lock another instance holds was not freed within {}s",
                    LOCK_PATIENCE.as_secs()
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// VACUUM (never FULL: it would lock the tables) of every table, so that erased rows'
    /// space is pruned and reused. Erased bytes leave WAL and backups only with their
    /// retention. Ok(0): nothing is held alone.
    pub async fn compact(&self) -> Result<u64, LedgerError> {
        let r = async {
            let c = self.conn().await?;
            // sw_follow too: the follow log names the numbers whose consent changed in the
            // last hour (an erased one among them until the purge).
            let mut names = vec!["sw_ledger", "sw_follow"];
            names.extend(Table::ALL.iter().map(|t| t.pg_name()));
            // VACUUM may take longer than a statement may. The connection leaves the pool
            // for it and is closed after, so that one left without a timeout (this future
            // dropped midway) can never serve anything else.
            let c = deadpool_postgres::Object::take(c);
            c.batch_execute("SET statement_timeout = 0")
                .await
                .map_err(pg_error)?;
            c.batch_execute(&format!("VACUUM {}", names.join(", ")))
                .await
                .map_err(pg_error)
                .map(|_| 0)
        }
        .await;
        self.noted(r)
    }

    /// Tries of [`Self::lock_keys`] that found a key held elsewhere, since the store opened.
    pub fn lock_retries(&self) -> u64 {
        self.inner.lock_retries.load(Ordering::Relaxed)
    }

    /// Rows delivered by whole-table scans since the store was opened, so tests can tell a
    /// lookup from a scan.
    pub fn scanned_rows(&self) -> u64 {
        self.inner.scanned.load(Ordering::Relaxed)
    }

    /// Drops every sendwell table and the migrations record (tests and `state migrate` only).
    pub async fn drop_all(&self) -> Result<(), LedgerError> {
        let r = async {
            let c = self.conn().await?;
            let mut names = vec![
                "sw_ledger",
                "sw_migrations",
                "sw_follow",
                "sw_follow_purged",
                "sw_instances",
                "sw_quota_leases",
            ];
            names.extend(Table::ALL.iter().map(|t| t.pg_name()));
            c.batch_execute(&format!(
                "DROP TABLE IF EXISTS {}; DROP FUNCTION IF EXISTS sw_follow_log()",
                names.join(", ")
            ))
            .await
            .map_err(pg_error)
        }
        .await;
        self.noted(r)
    }

    /// Whether no sw_ table has a row.
    pub async fn is_empty(&self) -> Result<bool, LedgerError> {
        let r = async {
            let c = self.conn().await?;
            let mut names = vec!["sw_ledger"];
            names.extend(Table::ALL.iter().map(|t| t.pg_name()));
            let sql = format!(
                "SELECT {}",
                names
                    .iter()
                    .map(|n| format!("NOT EXISTS (SELECT 1 FROM {n})"))
                    .collect::<Vec<_>>()
                    .join(" AND ")
            );
            let st = c.prepare_cached(&sql).await.map_err(pg_error)?;
            c.query_one(&st, &[])
                .await
                .map_err(pg_error)?
                .try_get(0)
                .map_err(pg_error)
        }
        .await;
        self.noted(r)
    }
}

/// A job's lookup, answered with the next query of [`look_up_jobs`].
struct Lookup {
    id: String,
    done: oneshot::Sender<Result<Option<LedgerEntry>, LedgerError>>,
}

fn lookups_gone() -> LedgerError {
    LedgerError::Store("the state store's job lookups have stopped".into())
}

/// Answers [`PgStore::get`]: every lookup waiting when a query starts goes into it, one query
/// at a time. Every job is looked up once (dedupe), and a statement (with its transaction) per
/// lookup cost the server as much as most of a job's writes. Ends with the store's handles.
async fn look_up_jobs(pool: Pool, mut rx: mpsc::UnboundedReceiver<Lookup>) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_LOOKUPS {
            match rx.try_recv() {
                Ok(l) => batch.push(l),
                Err(_) => break,
            }
        }
        let found = look_up(&pool, &batch).await;
        for l in batch.drain(..) {
            let r = match &found {
                Ok(rows) => Ok(rows.get(&l.id).cloned()),
                // The callers mark the store's health (PgStore::noted), as for any read.
                Err(LedgerError::Io(m)) => Err(LedgerError::Io(m.clone())),
                Err(LedgerError::Store(m)) => Err(LedgerError::Store(m.clone())),
                Err(e) => Err(LedgerError::Store(e.to_string())),
            };
            let _ = l.done.send(r);
        }
    }
}

async fn look_up(
    pool: &Pool,
    batch: &[Lookup],
) -> Result<HashMap<String, LedgerEntry>, LedgerError> {
    let c = pool.get().await.map_err(pool_error)?;
    let ids: Vec<&str> = batch.iter().map(|l| l.id.as_str()).collect();
    // Unprepared, so that it is planned for these ids and the table as it is now (see the
    // writer's CLAIM_UPDATE_MANY for why).
    c.query_typed(GET_JOBS, &[(&ids, Type::TEXT_ARRAY)])
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| Ok((row.try_get(5).map_err(pg_error)?, entry_from(row)?)))
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
