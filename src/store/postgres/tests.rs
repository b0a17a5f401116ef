//! Against a real PostgreSQL: `SENDWELL_TEST_PG_URL` (e.g.
//! `postgres://sendwell@127.0.0.1:5432/sendwell`, a role that may create databases) and
//! `SENDWELL_TEST_PG_PASSWORD`. Each test works in a database of its own, dropped at its end,
//! so they run in parallel.
//!
//! Only what is PostgreSQL's own is here (migrations, locks, lost connections, outages, its
//! statement failures and stored marks); the behaviour both backends share is tested once, on
//! both, in `tests/store_suite.rs`.

use std::time::Duration;

use super::*;

const HOWTO: &str = "the PostgreSQL store's tests need a database: set SENDWELL_TEST_PG_URL \
     (e.g. postgres://sendwell@127.0.0.1:5432/sendwell, a role with CREATEDB) and \
     SENDWELL_TEST_PG_PASSWORD (scripts/ensure-postgres.sh sets one up: role, password and \
     database `sendwell`), or SENDWELL_TEST_PG_SKIP=1 to skip them";

/// A database of the test's own, dropped (WITH (FORCE)) when this is dropped, even when the
/// test panics.
pub(super) struct TestDb {
    name: String,
    admin: PgSettings,
}

fn settings(url: String, password: Option<String>) -> PgSettings {
    PgSettings {
        url,
        password,
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(30),
        application_name: "sendwell-test".into(),
        tls: crate::config::PgTls::Off,
        ca_file: None,
    }
}

/// `url` with its database replaced by `db`.
fn with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let host = base.find("://").map_or(0, |i| i + 3);
    let base = match base[host..].find('/') {
        Some(i) => &base[..host + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

impl TestDb {
    /// None only when skipping was asked for; panics when no database is configured.
    pub(super) async fn new() -> Option<TestDb> {
        let url = match std::env::var("SENDWELL_TEST_PG_URL") {
            Ok(u) if !u.is_empty() => u,
            _ if std::env::var("SENDWELL_TEST_PG_SKIP").as_deref() == Ok("1") => {
                eprintln!("skipped (SENDWELL_TEST_PG_SKIP=1)");
                return None;
            }
            _ => panic!("{HOWTO}"),
        };
        let admin = settings(url, std::env::var("SENDWELL_TEST_PG_PASSWORD").ok());
        let name = format!("sw_t_{}_{:08x}", std::process::id(), rand::random::<u32>());
        let c = connect(&admin.config("test-admin").unwrap())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to SENDWELL_TEST_PG_URL: {e}; {HOWTO}"));
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Some(TestDb { name, admin })
    }

    pub(super) fn settings(&self) -> PgSettings {
        let mut s = self.admin.clone();
        s.url = with_db(&s.url, &self.name);
        s
    }

    pub(super) async fn open(&self) -> PgStore {
        PgStore::open(&self.settings(), false).await.unwrap()
    }

    /// A plain connection to the test's database, to look behind the store's back.
    pub(super) async fn raw(&self) -> Client {
        connect(&self.settings().config("test-raw").unwrap())
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (name, admin) = (self.name.clone(), self.admin.clone());
        // Its own thread and runtime: Drop cannot await, and the test's runtime may be
        // single-threaded.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(c) = connect(&admin.config("test-admin").unwrap()).await {
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            })
        })
        .join();
    }
}

fn entry(state: LedgerState, attempts: u32, ms: i64) -> LedgerEntry {
    LedgerEntry {
        state,
        attempts,
        updated_ms: ms,
        published: false,
        event: b"{}".to_vec(),
    }
}

fn put(table: Table, key: &[u8], value: &[u8]) -> KvOp {
    KvOp::Put {
        table,
        key: key.to_vec(),
        value: value.to_vec(),
    }
}

#[test]
fn prefix_ends_carry_past_0xff() {
    assert_eq!(prefix_end(b"12\0"), Some(b"12\x01".to_vec()));
    assert_eq!(prefix_end(&[0x01, 0xFF]), Some(vec![0x02]));
    assert_eq!(
        prefix_end(&[0x01, 0xFE, 0xFF, 0xFF]),
        Some(vec![0x01, 0xFF])
    );
    assert_eq!(prefix_end(&[0xFF, 0xFF]), None);
    assert_eq!(prefix_end(&[]), None);
}

#[test]
fn database_url_is_rewritten_for_the_test_database() {
    assert_eq!(
        with_db("postgres://sendwell@127.0.0.1:5432/sendwell", "sw_t_1"),
        "postgres://sendwell@127.0.0.1:5432/sw_t_1"
    );
    assert_eq!(
        with_db("postgres://u@h/db?sslmode=disable", "x"),
        "postgres://u@h/x?sslmode=disable"
    );
    assert_eq!(with_db("postgres://u@h", "x"), "postgres://u@h/x");
}

#[test]
fn a_url_with_a_password_is_refused() {
    let s = settings("postgres://u:secret@h/db".into(), None);
    let e = s.config("x").unwrap_err().to_string();
    assert!(e.contains("password file"), "{e}");
    assert!(!e.contains("secret"), "{e}");
}

#[tokio::test]
async fn a_write_whose_op_fails_applies_nothing_and_fails_no_neighbour() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    // A database-side failure of one particular row ("bad").
    db.raw()
        .await
        .batch_execute(
            "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.key = 'bad'::bytea THEN RAISE EXCEPTION 'refused'; END IF; \
             RETURN NEW; END $$; \
             CREATE TRIGGER refuse_bad BEFORE INSERT ON sw_store_meta \
             FOR EACH ROW EXECUTE FUNCTION refuse_bad()",
        )
        .await
        .unwrap();
    s.kv_put(Table::CapHistory, b"kept".to_vec(), b"old".to_vec())
        .await
        .unwrap();
    let (bad, before, after) = tokio::join!(
        s.kv_put(Table::StoreMeta, b"first".to_vec(), b"1".to_vec()),
        s.kv_many(vec![
            put(Table::StoreMeta, b"ok", b"1"),
            KvOp::Delete {
                table: Table::CapHistory,
                key: b"kept".to_vec()
            },
            put(Table::StoreMeta, b"bad", b"1"),
        ]),
        s.put_with(
            "job",
            entry(LedgerState::Final, 1, 1),
            vec![put(Table::StoreMeta, b"after", b"1")]
        ),
    );
    bad.unwrap();
    assert!(matches!(before, Err(LedgerError::Store(_))), "{before:?}");
    after.unwrap();
    assert_eq!(s.kv_get(Table::StoreMeta, b"ok").await.unwrap(), None);
    assert_eq!(
        s.kv_get(Table::CapHistory, b"kept").await.unwrap(),
        Some(b"old".to_vec()),
        "rolled back"
    );
    assert!(
        s.kv_get(Table::StoreMeta, b"first")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        s.kv_get(Table::StoreMeta, b"after")
            .await
            .unwrap()
            .is_some()
    );
    assert!(s.get("job").await.unwrap().is_some());
    assert!(s.health().writable(), "a bad write is no outage");
}

#[tokio::test]
async fn a_published_mark_is_seen_at_once_and_stored_soon() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    s.put("j", entry(LedgerState::Final, 1, 1)).await.unwrap();
    assert!(!s.get("j").await.unwrap().unwrap().published);
    s.mark_published("j").await.unwrap();
    assert!(s.get("j").await.unwrap().unwrap().published, "at once");
    let raw = db.raw().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stored: bool = raw
            .query_one("SELECT published FROM sw_ledger WHERE id = 'j'", &[])
            .await
            .unwrap()
            .get(0);
        if stored && lock(&s.inner.published).is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "mark never stored");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(s.get("j").await.unwrap().unwrap().published);
}

#[tokio::test]
async fn migrations_apply_once_and_a_newer_schema_is_refused() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    s.kv_put(Table::StoreMeta, b"k".to_vec(), b"v".to_vec())
        .await
        .unwrap();
    drop(s);
    // A daemon's second open (the first let go of nothing it needs: the lock is shared).
    let s = db.open().await;
    assert_eq!(
        s.kv_get(Table::StoreMeta, b"k").await.unwrap(),
        Some(b"v".to_vec())
    );
    let raw = db.raw().await;
    let n: i64 = raw
        .query_one("SELECT count(*) FROM sw_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, MIGRATIONS_KNOWN as i64);
    raw.batch_execute("INSERT INTO sw_migrations (version, name) VALUES (99, 'future')")
        .await
        .unwrap();
    match PgStore::open(&db.settings(), false).await {
        Err(LedgerError::SchemaTooNew { found, known }) => {
            assert_eq!((found, known), (99, schema::known() as i64));
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened a newer schema"),
    }
}

/// Versions applied (one row each; the numbers need not be contiguous).
const MIGRATIONS_KNOWN: usize = schema::MIGRATIONS.len();

#[tokio::test]
async fn a_tool_gets_in_use_while_a_daemon_has_the_store() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let daemon = db.open().await;
    let second = db.open().await;
    match PgStore::open(&db.settings(), true).await {
        Err(LedgerError::InUse) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a tool opened the store under a daemon"),
    }
    drop((daemon, second));
    // The daemons' writers let go as their tasks end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let tool = loop {
        match PgStore::open(&db.settings(), true).await {
            Ok(t) => break t,
            Err(LedgerError::InUse) if tokio::time::Instant::now() < deadline => {}
            Err(e) => panic!("{e}"),
        }
    };
    // And a daemon cannot start under a tool.
    assert!(matches!(
        PgStore::open(&db.settings(), false).await,
        Err(LedgerError::InUse)
    ));
    drop(tool);
}

#[tokio::test]
async fn the_writer_survives_a_killed_connection() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    s.kv_put(Table::Inbound, b"before".to_vec(), b"1".to_vec())
        .await
        .unwrap();
    let raw = db.raw().await;
    let writer_pid = || async {
        raw.query(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'sendwell-test:writer'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i32>(0))
        .collect::<Vec<_>>()
    };
    let pids = writer_pid().await;
    assert_eq!(pids.len(), 1, "{pids:?}");
    let killed: bool = raw
        .query_one("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    // Written on a dead connection first: held, retried on a new one, committed.
    s.kv_put(Table::Inbound, b"after".to_vec(), b"2".to_vec())
        .await
        .unwrap();
    assert_eq!(
        s.kv_get(Table::Inbound, b"after").await.unwrap(),
        Some(b"2".to_vec())
    );
    let now = writer_pid().await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, pids, "a new connection");
    assert!(s.health().writable());
    // The lock came back with it: a tool still gets InUse.
    assert!(matches!(
        PgStore::open(&db.settings(), true).await,
        Err(LedgerError::InUse)
    ));
}

#[tokio::test]
async fn an_outage_fails_writes_after_the_hold_and_a_probe_notices_the_return() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    s.health().set_hold(Duration::from_millis(300));
    s.kv_put(Table::Inbound, b"a".to_vec(), b"1".to_vec())
        .await
        .unwrap();
    let raw = connect(&db.admin.config("test-admin").unwrap())
        .await
        .unwrap();
    // The database goes away for the store: no new connection, its sessions ended.
    raw.batch_execute(&format!(
        "ALTER DATABASE {0} ALLOW_CONNECTIONS false; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}'",
        db.name
    ))
    .await
    .unwrap();
    let w = s.kv_put(Table::Inbound, b"b".to_vec(), b"2".to_vec()).await;
    assert!(matches!(w, Err(LedgerError::Io(_))), "{w:?}");
    assert!(!s.health().writable());
    let r = s.kv_get(Table::Inbound, b"a").await;
    assert!(matches!(r, Err(LedgerError::Io(_))), "{r:?}");
    let g = s.get("j").await;
    assert!(matches!(g, Err(LedgerError::Io(_))), "{g:?}");
    raw.batch_execute(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS true",
        db.name
    ))
    .await
    .unwrap();
    // Nothing is written: the probe alone brings the store back.
    tokio::time::timeout(Duration::from_secs(10), s.health().wait_writable())
        .await
        .expect("the store noticed the database's return");
    s.kv_put(Table::Inbound, b"c".to_vec(), b"3".to_vec())
        .await
        .unwrap();
    assert_eq!(
        s.kv_get(Table::Inbound, b"c").await.unwrap(),
        Some(b"3".to_vec())
    );
}

/// A scan whose session ends under it (a failover, a restart) after its first statement fails
/// as unreachable, having handed on every row at most once and in key order; the store is
/// marked unreachable until a probe sees the database again, and the next scan gets them all.
#[tokio::test]
async fn a_scan_whose_connection_is_lost_fails_as_unreachable() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    let t = Table::ConsentSummary;
    let rows = 5 * SCAN_CHUNK as u32;
    let ops: Vec<KvOp> = (0..rows).map(|i| put(t, &i.to_be_bytes(), &[1])).collect();
    s.kv_many(ops).await.unwrap();
    let settings = db.settings();
    let mut n = 0u32;
    let r = s
        .kv_for_each(t, |k, _| {
            assert_eq!(k, n.to_be_bytes(), "in key order, each once");
            n += 1;
            if n == SCAN_CHUNK as u32 + 1 {
                // `f` cannot await: the scan's sessions are ended from a thread of its own.
                let settings = settings.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        let c = connect(&settings.config("test-kill").unwrap())
                            .await
                            .unwrap();
                        c.batch_execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                             WHERE datname = current_database() \
                             AND application_name = 'sendwell-test:pool'",
                        )
                        .await
                        .unwrap();
                    })
                })
                .join()
                .unwrap();
            }
        })
        .await;
    assert!(matches!(r, Err(LedgerError::Io(_))), "{r:?}");
    assert!(
        n > SCAN_CHUNK as u32 && n < rows,
        "{n} rows before the failure"
    );
    assert!(!s.health().writable());
    tokio::time::timeout(Duration::from_secs(10), s.health().wait_writable())
        .await
        .expect("the store noticed the database's return");
    let mut all = 0u32;
    s.kv_for_each(t, |_, _| all += 1).await.unwrap();
    assert_eq!(all, rows);
}

/// A scan may take longer than a statement may (the consent load of 10 M rows at start takes
/// seconds, the shortest statement timeout allowed is 100 ms): each of its statements is
/// short, however slowly the caller takes the rows, and none is cancelled.
#[tokio::test]
async fn a_scan_longer_than_the_statement_timeout_completes() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let timeout = Duration::from_millis(250);
    let s = PgStore::open(
        &PgSettings {
            statement_timeout: timeout,
            ..db.settings()
        },
        false,
    )
    .await
    .unwrap();
    // A table without the follow log's trigger: 10,000 rows written by one statement within
    // the 250 ms timeout is this test's set-up, not what it tests (the trigger's cost per row
    // would push that statement past the timeout on a busy machine).
    let t = Table::ConsentHistory;
    // 20 MB: more than the socket buffers hold, so a statement's end waits for the caller.
    let rows = 10 * SCAN_CHUNK as u32;
    let ops: Vec<KvOp> = (0..rows)
        .map(|i| put(t, &i.to_be_bytes(), &[7; 2048]))
        .collect();
    s.kv_many(ops).await.unwrap();
    let started = std::time::Instant::now();
    let mut n = 0u32;
    s.kv_for_each(t, |_, v| {
        assert_eq!(v.len(), 2048);
        n += 1;
        // A slow caller: about 55 ms per statement's rows, 550 ms for all of them.
        if n % 20 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    })
    .await
    .unwrap();
    assert_eq!(n, rows);
    assert!(started.elapsed() > 2 * timeout, "{:?}", started.elapsed());
}

#[tokio::test]
async fn reads_scans_and_counts() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    assert!(s.is_empty().await.unwrap());
    let t = Table::ConsentSummary;
    // More than a page, in one write.
    let ops: Vec<KvOp> = (0..5000u32)
        .map(|i| put(t, &i.to_be_bytes(), &[i as u8]))
        .collect();
    assert_eq!(s.kv_many(ops).await.unwrap(), 5000);
    assert_eq!(s.kv_len(t).await.unwrap(), 5000);
    let mut n = 0u32;
    let before = s.scanned_rows();
    s.kv_for_each(t, |k, v| {
        assert_eq!(k, n.to_be_bytes(), "in key order, each once");
        assert_eq!(v, [n as u8]);
        n += 1;
    })
    .await
    .unwrap();
    assert_eq!(n, 5000);
    assert_eq!(s.scanned_rows() - before, 5000);
    assert!(
        s.kv_insert_if_absent(t, b"x".to_vec(), b"1".to_vec())
            .await
            .unwrap()
    );
    assert!(
        !s.kv_insert_if_absent(t, b"x".to_vec(), b"2".to_vec())
            .await
            .unwrap()
    );
    assert_eq!(s.kv_get(t, b"x").await.unwrap(), Some(b"1".to_vec()));
    s.kv_put_nowait(Table::WaIds, b"w".to_vec(), vec![]);
    let mut e = entry(LedgerState::Final, 3, 7);
    e.event = b"{\"to\":\"+4912345\"}".to_vec();
    s.put_with("j", e.clone(), vec![put(Table::Delivery, b"j", b"d")])
        .await
        .unwrap();
    assert_eq!(s.get("j").await.unwrap(), Some(e.clone()));
    assert_eq!(s.kv_get(Table::WaIds, b"w").await.unwrap(), Some(vec![]));
    assert_eq!(
        s.job_ids_mentioning(b"4912345", 7).await.unwrap(),
        vec!["j".to_string()]
    );
    assert!(
        s.job_ids_mentioning(b"4912345", 6)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.job_ids_mentioning(b"999", 7).await.unwrap().is_empty());
    let dump = s.dump_all().await.unwrap();
    assert_eq!(dump[0], (b"j".to_vec(), e.encode(0)));
    assert_eq!(dump.len(), 1 + 5001 + 1 + 1);
    assert_eq!(s.compact().await.unwrap(), 0);
    s.remove("j").await.unwrap();
    assert_eq!(s.get("j").await.unwrap(), None);
    assert!(!s.is_empty().await.unwrap());
    s.drop_all().await.unwrap();
    let tables: i64 = db
        .raw()
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'sw\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);
}

/// What the [`Proxy`] does with the next COMMIT it sees.
const PASS: u8 = 0;
/// Passes it on, then drops the server's answer and closes the client's side: the
/// transaction committed, and the client cannot know.
const LOSE_ANSWER: u8 = 1;
/// Never passes it on and keeps the server's side open: the transaction stays open on the
/// server ("idle in transaction", its row locks held) while the client's side is closed.
const SWALLOW: u8 = 2;
/// like SWALLOW, but fires on the first client chunk that carries [`MARKER`] (an op's
/// bound key) instead of a COMMIT: the connection is lost between the claims and the ops.
const SWALLOW_MARKED: u8 = 3;
/// on the first client chunk that carries [`MARKER`], forwards nothing more either
/// way and keeps both sides open: a server (or a proxy/HAProxy in front of it) that accepts
/// TCP and acknowledges every byte but never answers (a backend stuck on I/O, SIGSTOP).
const STALL_MARKED: u8 = 4;
/// the bytes of a key that makes the proxy fire in the *_MARKED modes.
const MARKER: &[u8] = b"review17-cut-here";

/// A TCP proxy in front of the test's PostgreSQL that loses one COMMIT on request.
struct Proxy {
    port: u16,
    mode: Arc<std::sync::atomic::AtomicU8>,
    /// COMMITs it lost.
    fired: Arc<AtomicU64>,
    /// Its tasks, and the server sides it keeps open: see [`Proxy::close`].
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    kept: Arc<Mutex<Vec<tokio::net::TcpStream>>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        lock(&self.kept).clear();
    }
}

impl Proxy {
    /// Closes every connection it holds, before the test's database is dropped. A backend it
    /// stalled (or one it had let in mid-handshake) cannot absorb the barrier `DROP DATABASE`
    /// waits for, and dropping the proxy only aborts its tasks: they close their sockets when
    /// the runtime next polls them, which a runtime blocked in `TestDb`'s drop never does (the
    /// drop waited about 30 s).
    async fn close(self) {
        let tasks: Vec<_> = lock(&self.tasks).drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        lock(&self.kept).clear();
    }
}

impl Proxy {
    async fn start(db: &TestDb) -> Proxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let config = db.settings().config("proxy").unwrap();
        let host = match &config.pg.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[allow(unreachable_patterns)]
            _ => panic!("the lost-COMMIT tests need a TCP SENDWELL_TEST_PG_URL"),
        };
        let upstream = (host, config.pg.get_ports().first().copied().unwrap_or(5432));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(std::sync::atomic::AtomicU8::new(PASS));
        let fired = Arc::new(AtomicU64::new(0));
        // Server sides kept open on purpose (SWALLOW) live here until the test ends.
        let kept: Arc<Mutex<Vec<tokio::net::TcpStream>>> = Arc::default();
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (m, f, k, t) = (mode.clone(), fired.clone(), kept.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            let (kept, tasks) = (k, t);
            // A simple-protocol COMMIT: 'Q', length 11, "COMMIT\0".
            const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";
            while let Ok((mut client, _)) = listener.accept().await {
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (m, f, kept) = (m.clone(), f.clone(), kept.clone());
                let conn = tokio::spawn(async move {
                    let (mut cb, mut sb) = (vec![0u8; 65536], vec![0u8; 65536]);
                    // Set once this connection's COMMIT was passed on with LOSE_ANSWER.
                    let mut lose_next_answer = false;
                    loop {
                        tokio::select! {
                            r = client.read(&mut cb) => {
                                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                                let chunk = &cb[..n];
                                let commit = chunk.windows(COMMIT.len()).any(|w| w == COMMIT);
                                let marked = chunk.windows(MARKER.len()).any(|w| w == MARKER);
                                let mode = match m.load(Ordering::SeqCst) {
                                    SWALLOW_MARKED | STALL_MARKED if marked => m.swap(PASS, Ordering::SeqCst),
                                    SWALLOW_MARKED | STALL_MARKED => PASS,
                                    _ if commit => m.swap(PASS, Ordering::SeqCst),
                                    _ => PASS,
                                };
                                if mode == STALL_MARKED {
                                    f.fetch_add(1, Ordering::SeqCst);
                                    // Both sides stay open, nothing moves: the client's kernel
                                    // sees every byte acknowledged.
                                    lock(&kept).push(server);
                                    let _held = client;
                                    std::future::pending::<()>().await;
                                    return;
                                }
                                if mode == SWALLOW || mode == SWALLOW_MARKED {
                                    f.fetch_add(1, Ordering::SeqCst);
                                    lock(&kept).push(server);
                                    return; // the client's side closes here
                                }
                                if server.write_all(chunk).await.is_err() {
                                    return;
                                }
                                lose_next_answer |= mode == LOSE_ANSWER;
                            }
                            r = server.read(&mut sb) => {
                                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                                if lose_next_answer {
                                    f.fetch_add(1, Ordering::SeqCst);
                                    return; // both sides close; the server has committed
                                }
                                if client.write_all(&sb[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                lock(&tasks).push(conn);
            }
        });
        lock(&tasks).push(accept);
        Proxy {
            port,
            mode,
            fired,
            tasks,
            kept,
        }
    }

    fn settings(&self, db: &TestDb) -> PgSettings {
        let mut s = db.settings();
        let config = s.config("proxy").unwrap();
        let user = config.pg.get_user().unwrap_or("postgres");
        s.url = format!("postgres://{user}@127.0.0.1:{}/{}", self.port, db.name);
        s
    }

    /// A store that reaches the database through a new proxy, its writer connected.
    async fn open(db: &TestDb) -> (Proxy, PgStore) {
        let proxy = Proxy::start(db).await;
        let s = PgStore::open(&proxy.settings(db), false).await.unwrap();
        s.kv_put(Table::Inbound, b"warm".to_vec(), b"1".to_vec())
            .await
            .unwrap();
        (proxy, s)
    }

    fn lose_next_commit(&self, how: u8) {
        self.mode.store(how, Ordering::SeqCst);
    }

    fn fired(&self) -> u64 {
        self.fired.load(Ordering::SeqCst)
    }
}

fn claim(id: &str) -> KvOp {
    KvOp::ClaimJob {
        id: id.into(),
        entry: entry(LedgerState::Sending, 1, 1),
        expect: None,
    }
}

async fn ledger_rows(db: &TestDb, id: &str) -> Vec<(i16, i32)> {
    db.raw()
        .await
        .query(
            "SELECT state, attempts FROM sw_ledger WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn a_commit_whose_answer_was_lost_keeps_its_results() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let (proxy, s) = Proxy::open(&db).await;

    // The claim committed but its answer never came: tried again blindly, it would find its
    // own row and report the claim lost (the job then goes back to its queue unsent).
    proxy.lose_next_commit(LOSE_ANSWER);
    let won = tokio::time::timeout(Duration::from_secs(20), s.kv_many(vec![claim("j1")]))
        .await
        .expect("the claim's write returned");
    assert_eq!(proxy.fired(), 1, "the proxy lost the COMMIT's answer");
    assert!(matches!(won, Ok(1)), "{won:?}");
    assert_eq!(ledger_rows(&db, "j1").await, vec![(2, 1)]);

    // An insert-if-absent that inserted says so.
    proxy.lose_next_commit(LOSE_ANSWER);
    let inserted = tokio::time::timeout(
        Duration::from_secs(20),
        s.kv_insert_if_absent(Table::WebhookSeen, b"k".to_vec(), b"v".to_vec()),
    )
    .await
    .expect("the insert returned");
    assert_eq!(proxy.fired(), 2);
    assert!(matches!(inserted, Ok(true)), "{inserted:?}");
    assert!(s.health().writable());
}

#[tokio::test]
async fn a_commit_that_never_arrived_is_rolled_back_and_tried_again() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let (proxy, s) = Proxy::open(&db).await;
    // The server still holds the transaction open (and the claimed row's lock): the writer
    // must end that session, learn that it rolled back, and claim again.
    proxy.lose_next_commit(SWALLOW);
    let won = tokio::time::timeout(Duration::from_secs(20), s.kv_many(vec![claim("j2")]))
        .await
        .expect("the claim's write returned (not blocked behind its own first try)");
    assert_eq!(proxy.fired(), 1, "the proxy swallowed the COMMIT");
    assert!(matches!(won, Ok(1)), "{won:?}");
    assert_eq!(ledger_rows(&db, "j2").await, vec![(2, 1)]);
}

#[tokio::test]
async fn an_idle_daemon_takes_its_lock_back_and_stays_unready_while_a_tool_has_it() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    s.kv_put(Table::Inbound, b"a".to_vec(), b"1".to_vec())
        .await
        .unwrap();
    let raw = db.raw().await;
    let writer_pid: i32 = raw
        .query_one(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'sendwell-test:writer'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // A "tool" asks for the store exclusively and waits behind the daemon's shared lock; it
    // gets it the moment the daemon's writer connection ends.
    let tool = Arc::new(db.raw().await);
    let t = tool.clone();
    let waiting = tokio::spawn(async move {
        t.query_one("SELECT pg_advisory_lock($1)", &[&STORE_LOCK])
            .await
            .map(|_| ())
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let queued: i64 = raw
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if queued == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tool never queued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    raw.query_one("SELECT pg_terminate_backend($1)", &[&writer_pid])
        .await
        .unwrap();
    waiting.await.unwrap().unwrap();

    // Nothing is written, yet the daemon notices: it cannot take its lock back, so it says
    // it cannot write, and keeps saying so (no flapping) while the tool holds the store.
    tokio::time::timeout(Duration::from_secs(10), async {
        while s.health().writable() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the idle daemon noticed that its lock is gone");
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        assert!(!s.health().writable(), "ready while a tool has the store");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The tool ends: the daemon takes its lock back by itself, and a new tool gets InUse.
    tool.query_one("SELECT pg_advisory_unlock($1)", &[&STORE_LOCK])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), s.health().wait_writable())
        .await
        .expect("writable again once the tool let go");
    assert!(matches!(
        PgStore::open(&db.settings(), true).await,
        Err(LedgerError::InUse)
    ));
}

/// The transaction that last wrote each of `keys` of `t` (None: no such row).
async fn writers(raw: &Client, t: Table, keys: &[&[u8]]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for k in keys {
        let sql = format!("SELECT xmin::text FROM {} WHERE key = $1", t.pg_name());
        out.push(raw.query_opt(&sql, &[k]).await.unwrap().map(|r| r.get(0)));
    }
    out
}

async fn job_writer(raw: &Client, id: &str) -> Option<String> {
    raw.query_opt("SELECT xmin::text FROM sw_ledger WHERE id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

// The writes of one `join!` reach the writer in one group: the test's runtime is
// single-threaded, so all are sent before the writer's task runs. That every row has one xmin
// proves they committed in one transaction: a gathered statement that failed would have sent
// the writes one per transaction, each right anyway.

#[tokio::test]
async fn puts_gathered_from_several_writes_keep_each_keys_last_value() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    let t = Table::StoreMeta;
    s.kv_put(t, b"k".to_vec(), b"0".to_vec()).await.unwrap();
    let (a, b, c, d, e) = tokio::join!(
        s.kv_put(t, b"k".to_vec(), b"1".to_vec()),
        s.kv_many(vec![put(t, b"k", b"2"), put(t, b"other", b"x")]),
        s.put_with(
            "j",
            entry(LedgerState::Pending, 0, 1),
            vec![put(Table::CapHistory, b"c", b"1")]
        ),
        s.put_with(
            "j",
            entry(LedgerState::Final, 1, 2),
            vec![put(Table::CapHistory, b"c", b"2")]
        ),
        // Within one write too; each put counts.
        s.kv_many(vec![put(t, b"k", b"3"), put(t, b"k", b"4")]),
    );
    a.unwrap();
    assert_eq!(b.unwrap(), 2);
    c.unwrap();
    d.unwrap();
    assert_eq!(e.unwrap(), 2);
    assert_eq!(s.kv_get(t, b"k").await.unwrap(), Some(b"4".to_vec()));
    assert_eq!(s.kv_get(t, b"other").await.unwrap(), Some(b"x".to_vec()));
    assert_eq!(
        s.kv_get(Table::CapHistory, b"c").await.unwrap(),
        Some(b"2".to_vec())
    );
    assert_eq!(
        s.get("j").await.unwrap(),
        Some(entry(LedgerState::Final, 1, 2))
    );
    let raw = db.raw().await;
    let mut xmins = writers(&raw, t, &[b"k", b"other"]).await;
    xmins.extend(writers(&raw, Table::CapHistory, &[b"c"]).await);
    xmins.push(job_writer(&raw, "j").await);
    assert!(
        xmins.iter().all(|x| x.is_some() && *x == xmins[0]),
        "{xmins:?}"
    );
}

#[tokio::test]
async fn of_one_group_a_keys_puts_and_deletes_apply_in_order() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    let t = Table::TierUsage;
    let key = |k: &[u8]| k.to_vec();
    let (a, b, c, d, e, f, g, h, i) = tokio::join!(
        // Put, then delete: gone, and the delete found it.
        s.kv_put(t, key(b"gone"), b"1".to_vec()),
        s.kv_many(vec![KvOp::Delete {
            table: t,
            key: key(b"gone")
        }]),
        // Put, delete-if-still, put: the second put stays.
        s.kv_put(t, key(b"back"), b"1".to_vec()),
        s.kv_many(vec![KvOp::DeleteIf {
            table: t,
            key: key(b"back"),
            value: b"1".to_vec(),
        }]),
        s.kv_put(t, key(b"back"), b"2".to_vec()),
        // A put, then an insert-if-absent of the key: it is there.
        s.kv_put(t, key(b"taken"), b"1".to_vec()),
        s.kv_insert_if_absent(t, key(b"taken"), b"2".to_vec()),
        // A ledger entry written, then deleted.
        s.put("job", entry(LedgerState::Final, 1, 1)),
        s.kv_many(vec![KvOp::DeleteJobs {
            ids: vec!["job".into()]
        }]),
    );
    a.unwrap();
    assert_eq!(b.unwrap(), 1, "the delete ran after the put");
    c.unwrap();
    assert_eq!(d.unwrap(), 1, "the delete-if ran after the first put");
    e.unwrap();
    f.unwrap();
    assert!(!g.unwrap(), "the insert-if-absent ran after the put");
    h.unwrap();
    assert_eq!(i.unwrap(), 1, "the entry's delete ran after its put");
    assert_eq!(s.kv_get(t, b"gone").await.unwrap(), None);
    assert_eq!(s.kv_get(t, b"back").await.unwrap(), Some(b"2".to_vec()));
    assert_eq!(s.kv_get(t, b"taken").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(s.get("job").await.unwrap(), None);
    let xmins = writers(&db.raw().await, t, &[b"back", b"taken"]).await;
    assert!(xmins[0].is_some() && xmins[0] == xmins[1], "{xmins:?}");
}

#[tokio::test]
async fn claims_gathered_in_one_group_each_win_or_lose_alone() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    s.put("held", entry(LedgerState::Sending, 1, 1))
        .await
        .unwrap();
    s.put("done", entry(LedgerState::Final, 1, 1))
        .await
        .unwrap();
    let t = Table::CapHistory;
    let claim = |id: &'static str, expect: Option<(LedgerState, u32)>, row: &'static [u8]| {
        s.kv_many(vec![
            KvOp::ClaimJob {
                id: id.into(),
                entry: entry(LedgerState::Sending, 2, 5),
                expect,
            },
            put(t, row, b"1"),
        ])
    };
    let (fresh, taken, held, stale, missing, first, second) = tokio::join!(
        claim("fresh", None, b"fresh"),
        claim("done", None, b"taken"),
        claim("held", Some((LedgerState::Sending, 1)), b"held"),
        claim("done", Some((LedgerState::Sending, 1)), b"stale"),
        claim("missing", Some((LedgerState::Pending, 0)), b"missing"),
        // Two claims of one id: the first wins, the second finds its entry.
        claim("twice", None, b"first"),
        claim("twice", None, b"second"),
    );
    assert_eq!(fresh.unwrap(), 2);
    assert!(matches!(taken, Err(LedgerError::ClaimLost)), "{taken:?}");
    assert_eq!(held.unwrap(), 2);
    assert!(matches!(stale, Err(LedgerError::ClaimLost)), "{stale:?}");
    assert!(
        matches!(missing, Err(LedgerError::ClaimLost)),
        "{missing:?}"
    );
    assert_eq!(first.unwrap(), 2);
    assert!(matches!(second, Err(LedgerError::ClaimLost)), "{second:?}");
    let rows = [
        &b"fresh"[..],
        b"taken",
        b"held",
        b"stale",
        b"missing",
        b"first",
        b"second",
    ];
    let xmins = writers(&db.raw().await, t, &rows).await;
    let won: Vec<bool> = xmins.iter().map(Option::is_some).collect();
    assert_eq!(won, [true, false, true, false, false, true, false]);
    assert!(xmins[0] == xmins[2], "one transaction: {xmins:?}");
    for id in ["fresh", "held", "twice"] {
        assert_eq!(
            s.get(id).await.unwrap(),
            Some(entry(LedgerState::Sending, 2, 5))
        );
    }
    assert_eq!(
        s.get("done").await.unwrap().unwrap().state,
        LedgerState::Final
    );
    assert_eq!(s.get("missing").await.unwrap(), None);
}

#[tokio::test]
async fn a_failing_claim_among_gathered_claims_fails_only_its_write() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    db.raw()
        .await
        .batch_execute(
            "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.id = 'bad' THEN RAISE EXCEPTION 'refused'; END IF; \
             RETURN NEW; END $$; \
             CREATE TRIGGER refuse_bad BEFORE INSERT ON sw_ledger \
             FOR EACH ROW EXECUTE FUNCTION refuse_bad()",
        )
        .await
        .unwrap();
    let claim = |id: &str| {
        s.kv_many(vec![
            KvOp::ClaimJob {
                id: id.into(),
                entry: entry(LedgerState::Sending, 1, 1),
                expect: None,
            },
            put(Table::CapHistory, id.as_bytes(), b"1"),
        ])
    };
    let (before, bad, after) = tokio::join!(claim("before"), claim("bad"), claim("after"));
    assert_eq!(before.unwrap(), 2);
    assert!(matches!(bad, Err(LedgerError::Store(_))), "{bad:?}");
    assert_eq!(after.unwrap(), 2);
    assert!(s.get("before").await.unwrap().is_some());
    assert!(s.get("after").await.unwrap().is_some());
    assert_eq!(s.get("bad").await.unwrap(), None);
    assert_eq!(s.kv_get(Table::CapHistory, b"bad").await.unwrap(), None);
    assert!(s.health().writable(), "a bad write is no outage");
}

#[tokio::test]
async fn lookups_made_at_once_each_get_their_own_answer() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    let ops: Vec<KvOp> = (0..300)
        .filter(|i| i % 3 != 0)
        .map(|i| KvOp::PutJob {
            id: format!("job-{i}"),
            entry: entry(LedgerState::Final, i, i as i64),
        })
        .collect();
    s.kv_many(ops).await.unwrap();
    s.mark_published("job-1").await.unwrap();
    let mut ids: Vec<String> = (0..300).map(|i| format!("job-{i}")).collect();
    ids.extend(["job-1\0".to_string(), "job-2".to_string()]);
    let answers = futures_util::future::join_all(ids.iter().map(|id| s.get(id))).await;
    for (id, got) in ids.iter().zip(answers) {
        let got = got.unwrap();
        let want = match id.strip_prefix("job-").and_then(|n| n.parse::<u32>().ok()) {
            Some(i) if i % 3 != 0 => {
                let mut e = entry(LedgerState::Final, i, i as i64);
                e.published = i == 1;
                Some(e)
            }
            _ => None,
        };
        assert_eq!(got, want, "{id:?}");
    }
}

// From the review of the lost-COMMIT handling: a connection lost (or a server that stops
// answering) at other steps of a transaction, and a transaction whose session cannot be ended.

/// The writer's connection is lost after the claims ran but before COMMIT
/// was sent (a partition: the client's tcp_user_timeout fires; the server side never learns,
/// its tcp keepalive is the OS default of about 2 h). The server's session stays "idle in
/// transaction" holding the claimed row's lock. `hold` retries the batch on a new connection
/// without ending that session (only the COMMIT-in-doubt path does), so the retried claim waits
/// on the row lock until statement_timeout (57014, counted as "unavailable"), again and again:
/// the write fails after the hold and the store reports itself unwritable for as long as the
/// orphan lives.
#[tokio::test]
async fn a_connection_lost_before_commit_does_not_leave_its_claim_locked() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let proxy = Proxy::start(&db).await;
    let mut settings = proxy.settings(&db);
    settings.statement_timeout = Duration::from_secs(2);
    let s = PgStore::open(&settings, false).await.unwrap();
    s.kv_put(Table::Inbound, b"warm".to_vec(), b"1".to_vec())
        .await
        .unwrap();
    proxy.lose_next_commit(SWALLOW_MARKED);
    let won = tokio::time::timeout(
        Duration::from_secs(20),
        s.kv_many(vec![claim("j9"), put(Table::Inbound, MARKER, b"1")]),
    )
    .await
    .expect("the write returned");
    assert_eq!(
        proxy.fired(),
        1,
        "the proxy cut the connection before the ops"
    );
    let orphans: i64 = db
        .raw()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND state = 'idle in transaction'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // The claim and the put: 2.
    assert!(
        matches!(won, Ok(2)),
        "the claim was retried behind its own first try's row lock: {won:?} \
         ({orphans} session(s) idle in transaction)"
    );
    assert_eq!(ledger_rows(&db, "j9").await, vec![(2, 1)]);
}

/// A server that accepts TCP and acknowledges every byte but never answers
/// (a backend stuck on I/O, a stopped process, HAProxy/PgBouncer in front of a primary that
/// vanished): no statement of the writer has a client-side deadline, statement_timeout is the
/// server's own, tcp_user_timeout only counts unacknowledged bytes and keepalives are answered
/// by the kernel. The write waits for ever and the store is never marked unwritable: /readyz
/// stays 200, the watchdog is fed, `unwritable_grace` never starts.
// Two workers: should an assertion fail before `Proxy::close`, the proxy's aborted tasks are
// still dropped (their sockets closed) while `TestDb`'s drop blocks the other worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_marks_the_store_unwritable() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let proxy = Proxy::start(&db).await;
    let mut settings = proxy.settings(&db);
    settings.statement_timeout = Duration::from_secs(2);
    let s = PgStore::open(&settings, false).await.unwrap();
    s.health().set_hold(Duration::from_secs(2));
    s.kv_put(Table::Inbound, b"warm".to_vec(), b"1".to_vec())
        .await
        .unwrap();
    proxy.lose_next_commit(STALL_MARKED);
    let s2 = s.clone();
    let write = tokio::spawn(async move {
        s2.kv_put(Table::Inbound, MARKER.to_vec(), b"1".to_vec())
            .await
    });
    // Far beyond statement_timeout + hold.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline && s.health().writable() && !write.is_finished() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(proxy.fired(), 1, "the proxy stalled the connection");
    assert!(
        write.is_finished() || !s.health().writable(),
        "15 s after the database stopped answering, the write still waits and the store \
         still says it is writable"
    );
    write.abort();
    drop(s);
    proxy.close().await;
}

/// `resolve` loops while the transaction in doubt is "in progress" and
/// never asks `holding()` or `rx.is_closed()` on that branch: when ending the old session does
/// not work, the writer never returns. Here the session is not ended because its
/// application_name as the server keeps it (truncated to 63 bytes) is not the one the writer
/// compares with; the same happens behind a pooler that rewrites it (PgBouncer
/// `application_name_add_host`) or with a backend stuck in uninterruptible I/O.
#[tokio::test]
async fn a_commit_in_doubt_that_cannot_be_resolved_fails_after_the_hold() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let proxy = Proxy::start(&db).await;
    let mut settings = proxy.settings(&db);
    settings.application_name = "a".repeat(60);
    let s = PgStore::open(&settings, false).await.unwrap();
    s.health().set_hold(Duration::from_secs(1));
    s.kv_put(Table::Inbound, b"warm".to_vec(), b"1".to_vec())
        .await
        .unwrap();
    proxy.lose_next_commit(SWALLOW);
    let r = tokio::time::timeout(Duration::from_secs(15), s.kv_many(vec![claim("j7")])).await;
    assert_eq!(proxy.fired(), 1, "the proxy swallowed the COMMIT");
    assert!(
        r.is_ok(),
        "the write never returned: the writer loops in resolve() past its 1 s hold"
    );
}

#[tokio::test]
async fn lookups_stay_quick_when_the_table_grew_since_they_were_first_made() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let s = db.open().await;
    let raw = db.raw().await;
    // Statistics of an empty table, and lookups made then: a plan made now and kept would
    // test every row against every id later.
    raw.batch_execute("ANALYZE sw_ledger").await.unwrap();
    for i in 0..30 {
        assert_eq!(s.get(&format!("early-{i}")).await.unwrap(), None);
    }
    raw.batch_execute(
        "INSERT INTO sw_ledger (id, state, attempts, updated_ms, published, event) \
         SELECT 'job-' || g, 3, 1, g, false, '\\x7b7d'::bytea FROM generate_series(1, 100000) g",
    )
    .await
    .unwrap();
    let seq_rows_read = async || -> i64 {
        raw.query_one(
            "SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables WHERE relname = 'sw_ledger'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    let before = seq_rows_read().await;
    // One at a time: each its own query (a query for many ids may rightly read the table).
    for i in 0..50 {
        assert_eq!(s.get(&format!("new-{i}")).await.unwrap(), None);
    }
    assert_eq!(s.get("job-77").await.unwrap().unwrap().attempts, 1);
    // The store's sessions report what they read when they end: close them, then ask.
    drop(s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = raw
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name LIKE 'sendwell-test:%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store's sessions never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Planned for the table as it is, each lookup uses the primary key; with the plan made
    // for the empty table, each reads all 100,000 rows (5 M for the 50).
    let scanned = seq_rows_read().await - before;
    assert!(
        scanned < 1_000_000,
        "lookups scanned {scanned} rows of sw_ledger"
    );
}

#[tokio::test]
async fn a_transaction_the_server_never_handed_out_counts_as_rolled_back() {
    // What a server restarted after a crash says of a transaction whose id never reached its
    // WAL: "in the future". Its COMMIT never reached the WAL either, so it did not commit;
    // asking again cannot change the answer (the writer used to ask until its hold ran out).
    let Some(db) = TestDb::new().await else {
        return;
    };
    let raw = db.raw().await;
    let now: i64 = raw
        .query_one("SELECT txid_current()", &[])
        .await
        .unwrap()
        .get(0);
    let ahead = now + 1_000_000;
    assert_eq!(
        writer::txid_outcome(&raw, ahead, 0).await,
        Ok(Some(false)),
        "a transaction id the server never handed out"
    );
    assert_eq!(
        writer::txid_outcome(&raw, now, 0).await,
        Ok(Some(true)),
        "txid_current() of an autocommit statement committed"
    );
}
