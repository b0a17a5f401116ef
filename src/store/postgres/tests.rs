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
struct TestDb {
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
    async fn new() -> Option<TestDb> {
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

    fn settings(&self) -> PgSettings {
        let mut s = self.admin.clone();
        s.url = with_db(&s.url, &self.name);
        s
    }

    async fn open(&self) -> PgStore {
        PgStore::open(&self.settings(), false).await.unwrap()
    }

    /// A plain connection to the test's database, to look behind the store's back.
    async fn raw(&self) -> Client {
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
            assert_eq!((found, known), (99, MIGRATIONS_KNOWN as i64));
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened a newer schema"),
    }
}

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
    let ids: Vec<String> = (0..1000).map(|i| format!("new-{i}")).collect();
    let started = std::time::Instant::now();
    let found = futures_util::future::join_all(ids.iter().map(|id| s.get(id))).await;
    let took = started.elapsed();
    assert!(found.iter().all(|f| matches!(f, Ok(None))));
    // About 10 ms planned for the table as it is; a second with the plan of the empty table.
    assert!(took < Duration::from_millis(300), "{took:?}");
    assert_eq!(s.get("job-77").await.unwrap().unwrap().attempts, 1);
}
