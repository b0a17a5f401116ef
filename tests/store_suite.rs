//! The state store's behaviour, written once and run against both backends (issue 17): each
//! test is an `async fn` taking a [`Ledger`], and [`on_both!`] runs it as `redb::<name>` (a
//! store in a temporary directory) and `postgres::<name>` (a database of its own, from
//! `tests/common/pg.rs`; needs the tests' PostgreSQL: `scripts/ensure-postgres.sh`). Only the
//! public `Ledger` API is used, as the daemon uses it: what passes here holds whichever backend
//! the configuration picks.
//!
//! What only one backend has stays with it: redb's compaction, full disk and publish marks in
//! `src/store/ledger.rs`; PostgreSQL's migrations, lost connections and outages in
//! `src/store/postgres/tests.rs`.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::pg::TestDb;
use sendwell::config::{PgTls, PostgresConfig, Secret, StateBackend, StateConfig};
use sendwell::store::{
    KvOp, Ledger, LedgerEntry, LedgerError, LedgerState, Table, index_job, number_job_key,
};

/// A store's configuration and what must outlive it (its directory; its database, dropped
/// after the test, also when it panics).
struct Fixture {
    state: StateConfig,
    _dir: tempfile::TempDir,
    _db: Option<TestDb>,
}

impl Fixture {
    fn state(dir: &tempfile::TempDir, backend: StateBackend) -> StateConfig {
        StateConfig {
            dir: dir.path().join("state"),
            ledger_retention: Duration::from_secs(7 * 86400),
            unwritable_grace: Duration::from_secs(60),
            backend,
            postgres: None,
        }
    }

    async fn redb() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        Fixture {
            state: Self::state(&dir, StateBackend::Redb),
            _dir: dir,
            _db: None,
        }
    }

    async fn postgres() -> Fixture {
        let db = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let mut state = Self::state(&dir, StateBackend::Postgres);
        state.postgres = Some(PostgresConfig {
            url: db.url.clone(),
            password: Some(Secret::new(db.password().to_string())),
            password_file: Some(db.password_file.clone()),
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            follow_every: Duration::from_millis(250),
            tls: PgTls::Off,
            ca_file: None,
        });
        Fixture {
            state,
            _dir: dir,
            _db: Some(db),
        }
    }

    /// A daemon's handle.
    async fn open(&self) -> Ledger {
        Ledger::open_state(&self.state, false).await.unwrap()
    }
}

/// Runs each test on both backends: `ledger` tests get a daemon's handle; `state` tests get
/// the store's configuration, to open (and reopen) handles themselves.
macro_rules! on_both {
    (ledger: [$($name:ident),* $(,)?], state: [$($sname:ident),* $(,)?] $(,)?) => {
        on_both!(@backend redb, ledger: [$($name),*], state: [$($sname),*]);
        on_both!(@backend postgres, ledger: [$($name),*], state: [$($sname),*]);
    };
    (@backend $backend:ident, ledger: [$($name:ident),*], state: [$($sname:ident),*]) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let f = super::Fixture::$backend().await;
                    super::$name(f.open().await).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $sname() {
                    let f = super::Fixture::$backend().await;
                    super::$sname(&f.state).await;
                }
            )*
        }
    };
}

on_both! {
    ledger: [
        exactly_one_of_50_concurrent_claims_wins,
        a_lost_claim_applies_nothing_and_fails_no_concurrent_write,
        a_write_whose_op_fails_applies_nothing_and_fails_no_neighbour,
        a_claim_is_refused_anywhere_but_first_in_its_write,
        delete_prefix_is_a_key_range,
        many_prefixes_are_read_at_once,
        ops_apply_in_order_within_a_write_and_across_a_batch,
        delete_if_loses_to_a_later_write,
        of_concurrent_inserts_if_absent_the_first_wins,
        purge_removes_old_jobs_and_what_is_keyed_by_them,
        purge_removes_more_jobs_than_fit_one_chunk,
        scans_visit_every_row_once_in_key_order,
        jobs_to_lists_the_jobs_to_one_number_only,
        an_erasure_leaves_no_row_holding_the_number,
        a_job_id_with_a_nul_is_simply_unknown,
        get_with_reads_a_final_entry_and_its_row,
        processes_opening_an_empty_store_at_once_get_one_erase_key,
    ],
    state: [
        a_published_mark_is_seen_at_once_and_kept_across_a_reopen,
        a_tool_is_refused_while_a_daemon_has_the_store,
    ],
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

fn claim_op(id: &str, e: LedgerEntry, expect: Option<(LedgerState, u32)>) -> KvOp {
    KvOp::ClaimJob {
        id: id.into(),
        entry: e,
        expect,
    }
}

async fn keys(l: &Ledger, t: Table) -> Vec<Vec<u8>> {
    l.kv_scan(t)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// 50 tasks claim one job at once, each with a row of its own in `also`: one wins, and only
/// its row is written.
async fn race(l: &Ledger, expect: Option<(LedgerState, u32)>, attempts: u32) -> usize {
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let l = l.clone();
            tokio::spawn(async move {
                l.claim(
                    "job",
                    entry(LedgerState::Sending, attempts, 1),
                    expect,
                    vec![put(
                        Table::CapHistory,
                        format!("{attempts}/{i}").as_bytes(),
                        b"x",
                    )],
                )
                .await
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => won += 1,
            Err(LedgerError::ClaimLost) => {}
            Err(e) => panic!("{e}"),
        }
    }
    won
}

async fn exactly_one_of_50_concurrent_claims_wins(l: Ledger) {
    assert_eq!(race(&l, None, 1).await, 1, "one claim of a new id wins");
    assert_eq!(
        l.kv_len(Table::CapHistory).await.unwrap(),
        1,
        "losers wrote nothing"
    );
    assert_eq!(
        race(&l, Some((LedgerState::Sending, 1)), 2).await,
        1,
        "one claim of a known id wins"
    );
    assert_eq!(l.kv_len(Table::CapHistory).await.unwrap(), 2);
    let e = l.get("job").await.unwrap().unwrap();
    assert_eq!((e.state, e.attempts), (LedgerState::Sending, 2));
    // Expecting what is no longer there loses, as does expecting nothing of a known id.
    for expect in [Some((LedgerState::Sending, 1)), None] {
        let r = l
            .claim("job", entry(LedgerState::Sending, 9, 1), expect, vec![])
            .await;
        assert!(matches!(r, Err(LedgerError::ClaimLost)), "{r:?}");
    }
    // Expecting an entry of an id that has none loses too.
    let r = l
        .claim(
            "nobody",
            entry(LedgerState::Sending, 1, 1),
            Some((LedgerState::Pending, 0)),
            vec![],
        )
        .await;
    assert!(matches!(r, Err(LedgerError::ClaimLost)), "{r:?}");
    assert_eq!(l.get("nobody").await.unwrap(), None);
    assert_eq!(l.get("job").await.unwrap().unwrap().attempts, 2);
}

async fn a_lost_claim_applies_nothing_and_fails_no_concurrent_write(l: Ledger) {
    l.put("done", entry(LedgerState::Final, 1, 1))
        .await
        .unwrap();
    // Sent in one poll: most likely one group commit, where a lost claim must fail only its
    // own write.
    let (lost, neighbour, job, won) = tokio::join!(
        l.claim(
            "done",
            entry(LedgerState::Sending, 1, 2),
            None,
            vec![
                put(Table::WebhookSeen, b"lost", b"1"),
                KvOp::DeleteJobs {
                    ids: vec!["other".into()]
                },
            ],
        ),
        l.kv_many(vec![put(Table::WebhookSeen, b"neighbour", b"1")]),
        l.put("other", entry(LedgerState::Pending, 0, 3)),
        l.claim(
            "new",
            entry(LedgerState::Sending, 1, 4),
            None,
            vec![put(Table::WebhookSeen, b"won", b"1")],
        ),
    );
    assert!(matches!(lost, Err(LedgerError::ClaimLost)), "{lost:?}");
    assert_eq!(neighbour.unwrap(), 1);
    job.unwrap();
    won.unwrap();
    assert_eq!(l.kv_get(Table::WebhookSeen, b"lost").await.unwrap(), None);
    assert!(
        l.kv_get(Table::WebhookSeen, b"neighbour")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        l.kv_get(Table::WebhookSeen, b"won")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        l.get("other").await.unwrap().is_some(),
        "the lost write's delete did not run"
    );
    assert_eq!(
        l.get("done").await.unwrap().unwrap().state,
        LedgerState::Final
    );
    assert_eq!(
        l.get("new").await.unwrap().unwrap().state,
        LedgerState::Sending
    );
}

/// A claim anywhere but first in its write: a claim is checked before anything of its write
/// is applied, which only works there.
fn misplaced_claim(expect: Option<(LedgerState, u32)>) -> KvOp {
    claim_op("misplaced", entry(LedgerState::Sending, 1, 1), expect)
}

/// An op that fails on either backend: a misplaced claim that would lose anyway.
fn failing_op() -> KvOp {
    misplaced_claim(Some((LedgerState::Final, 7)))
}

async fn a_claim_is_refused_anywhere_but_first_in_its_write(l: Ledger) {
    // Its expectation holds: only its place makes it fail.
    let r = l
        .kv_many(vec![
            put(Table::StoreMeta, b"ok", b"1"),
            misplaced_claim(None),
        ])
        .await;
    assert!(matches!(r, Err(LedgerError::Store(_))), "{r:?}");
    assert_eq!(l.get("misplaced").await.unwrap(), None);
    assert_eq!(l.kv_get(Table::StoreMeta, b"ok").await.unwrap(), None);
}

async fn a_write_whose_op_fails_applies_nothing_and_fails_no_neighbour(l: Ledger) {
    l.kv_put(Table::CapHistory, b"kept".to_vec(), b"old".to_vec())
        .await
        .unwrap();
    // Alone.
    let r = l
        .kv_many(vec![
            put(Table::StoreMeta, b"ok", b"1"),
            KvOp::Delete {
                table: Table::CapHistory,
                key: b"kept".to_vec(),
            },
            failing_op(),
        ])
        .await;
    assert!(matches!(r, Err(LedgerError::Store(_))), "{r:?}");
    assert_eq!(l.kv_get(Table::StoreMeta, b"ok").await.unwrap(), None);
    assert_eq!(
        l.kv_get(Table::CapHistory, b"kept").await.unwrap(),
        Some(b"old".to_vec()),
        "rolled back"
    );
    assert_eq!(l.get("misplaced").await.unwrap(), None);
    // Among others in one group commit: they commit.
    let (first, bad, after) = tokio::join!(
        l.kv_put(Table::StoreMeta, b"first".to_vec(), b"1".to_vec()),
        l.kv_many(vec![
            put(Table::StoreMeta, b"ok", b"1"),
            KvOp::Delete {
                table: Table::CapHistory,
                key: b"kept".to_vec()
            },
            failing_op(),
        ]),
        l.put_with(
            "job",
            entry(LedgerState::Final, 1, 1),
            vec![put(Table::StoreMeta, b"after", b"1")]
        ),
    );
    first.unwrap();
    assert!(matches!(bad, Err(LedgerError::Store(_))), "{bad:?}");
    after.unwrap();
    assert_eq!(l.kv_get(Table::StoreMeta, b"ok").await.unwrap(), None);
    assert_eq!(
        l.kv_get(Table::CapHistory, b"kept").await.unwrap(),
        Some(b"old".to_vec())
    );
    assert!(
        l.kv_get(Table::StoreMeta, b"first")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        l.kv_get(Table::StoreMeta, b"after")
            .await
            .unwrap()
            .is_some()
    );
    assert!(l.get("job").await.unwrap().is_some());
    assert!(l.writable(), "a bad write is no outage");
}

async fn delete_prefix_is_a_key_range(l: Ledger) {
    let t = Table::ConsentHistory;
    let ks: [&[u8]; 10] = [
        b"12",
        b"12\0a",
        b"12\0b",
        b"123\0a",
        b"12\x01",
        b"13",
        &[0x01, 0xFE],
        &[0x01, 0xFF],
        &[0x01, 0xFF, 0x00, 0xFF],
        &[0x02],
    ];
    let mut ops: Vec<KvOp> = ks.iter().map(|k| put(t, k, b"v")).collect();
    ops.push(put(t, &[0xFF, 0xFF, 0x01], b"v"));
    ops.push(put(t, &[0xFF, 0xFE], b"v"));
    assert_eq!(l.kv_many(ops).await.unwrap(), 12);
    let scan = |p: &'static [u8]| {
        let l = l.clone();
        async move {
            l.kv_scan_prefix(t, p)
                .await
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        scan(b"12\0").await,
        vec![b"12\0a".to_vec(), b"12\0b".to_vec()]
    );
    assert_eq!(
        scan(&[0x01, 0xFF]).await,
        vec![vec![0x01, 0xFF], vec![0x01, 0xFF, 0x00, 0xFF]]
    );
    assert_eq!(scan(&[0xFF, 0xFF]).await, vec![vec![0xFF, 0xFF, 0x01]]);
    let del = |p: &[u8]| KvOp::DeletePrefix {
        table: t,
        prefix: p.to_vec(),
    };
    assert_eq!(l.kv_many(vec![del(b"12\0")]).await.unwrap(), 2);
    assert_eq!(l.kv_many(vec![del(&[0x01, 0xFF])]).await.unwrap(), 2);
    assert_eq!(l.kv_many(vec![del(&[0xFF, 0xFF])]).await.unwrap(), 1);
    assert_eq!(l.kv_many(vec![del(b"nothing")]).await.unwrap(), 0);
    assert_eq!(
        keys(&l, t).await,
        vec![
            vec![0x01, 0xFE],
            vec![0x02],
            b"12".to_vec(),
            b"12\x01".to_vec(),
            b"123\0a".to_vec(),
            b"13".to_vec(),
            vec![0xFF, 0xFE],
        ]
    );
    // The empty prefix is every key.
    assert_eq!(l.kv_many(vec![del(b"")]).await.unwrap(), 7);
    assert_eq!(l.kv_len(t).await.unwrap(), 0);
}

/// Many recipients' rows in one read (issue 18: a standby reads through the recipients of the
/// jobs arriving at once): exactly the rows under the prefixes, in key order, each once even
/// under prefixes that overlap, open-ended ranges included.
async fn many_prefixes_are_read_at_once(l: Ledger) {
    let t = Table::CapHistory;
    let ks: [&[u8]; 9] = [
        b"4917\0a",
        b"4917\0b",
        b"49170\0a",
        b"4918\0a",
        b"4919\0a",
        b"4917",
        &[0x01, 0xFF],
        &[0xFF, 0xFF, 0x01],
        &[0xFF, 0xFE],
    ];
    let ops: Vec<KvOp> = ks.iter().map(|k| put(t, k, k)).collect();
    l.kv_many(ops).await.unwrap();
    let read = async |prefixes: &[&[u8]]| {
        let prefixes: Vec<Vec<u8>> = prefixes.iter().map(|p| p.to_vec()).collect();
        let rows = l.kv_scan_prefixes(t, &prefixes).await.unwrap();
        assert!(rows.iter().all(|(k, v)| k == v), "each key with its value");
        rows.into_iter().map(|(k, _)| k).collect::<Vec<_>>()
    };
    assert_eq!(
        read(&[b"4919\0", b"4917\0", b"4916\0"]).await,
        vec![
            b"4917\0a".to_vec(),
            b"4917\0b".to_vec(),
            b"4919\0a".to_vec()
        ]
    );
    // Overlapping prefixes, and ranges with no end (0xFF…), with a bounded one between.
    assert_eq!(
        read(&[b"4917", b"4917\0", &[0xFF, 0xFF], &[0x01, 0xFF], &[0xFF]]).await,
        vec![
            vec![0x01, 0xFF],
            b"4917".to_vec(),
            b"4917\0a".to_vec(),
            b"4917\0b".to_vec(),
            b"49170\0a".to_vec(),
            vec![0xFF, 0xFE],
            vec![0xFF, 0xFF, 0x01],
        ]
    );
    assert!(read(&[]).await.is_empty());
    assert!(read(&[b"5"]).await.is_empty());
    assert!(
        l.kv_scan_prefixes(Table::UserLimit, &[b"4917\0".to_vec()])
            .await
            .unwrap()
            .is_empty(),
        "another table's rows"
    );
}

async fn ops_apply_in_order_within_a_write_and_across_a_batch(l: Ledger) {
    let t = Table::TierUsage;
    let del = KvOp::Delete {
        table: t,
        key: b"k".to_vec(),
    };
    assert_eq!(
        l.kv_many(vec![put(t, b"k", b"1"), del.clone(), put(t, b"k", b"2")])
            .await
            .unwrap(),
        3
    );
    assert_eq!(l.kv_get(t, b"k").await.unwrap(), Some(b"2".to_vec()));
    assert_eq!(
        l.kv_many(vec![put(t, b"k", b"3"), del.clone()])
            .await
            .unwrap(),
        2
    );
    assert_eq!(l.kv_get(t, b"k").await.unwrap(), None);
    assert_eq!(l.kv_many(vec![del.clone()]).await.unwrap(), 0, "absent");
    // The same across the writes of one group commit.
    let (a, b, c) = tokio::join!(
        l.kv_put(t, b"k".to_vec(), b"4".to_vec()),
        l.kv_many(vec![del.clone()]),
        l.kv_put(t, b"k".to_vec(), b"5".to_vec()),
    );
    a.unwrap();
    assert_eq!(b.unwrap(), 1);
    c.unwrap();
    assert_eq!(l.kv_get(t, b"k").await.unwrap(), Some(b"5".to_vec()));
    // A ledger entry written then claimed within one group commit: the claim sees the write.
    let (w, c) = tokio::join!(
        l.put("j", entry(LedgerState::Pending, 0, 1)),
        l.claim(
            "j",
            entry(LedgerState::Sending, 1, 2),
            Some((LedgerState::Pending, 0)),
            vec![],
        ),
    );
    w.unwrap();
    c.unwrap();
    assert_eq!(l.get("j").await.unwrap().unwrap().attempts, 1);
}

async fn delete_if_loses_to_a_later_write(l: Ledger) {
    let t = Table::UserLimit;
    l.kv_put(t, b"k".to_vec(), b"old".to_vec()).await.unwrap();
    let delete_if = |v: &[u8]| KvOp::DeleteIf {
        table: t,
        key: b"k".to_vec(),
        value: v.to_vec(),
    };
    let (w, d) = tokio::join!(
        l.kv_put(t, b"k".to_vec(), b"new".to_vec()),
        l.kv_many(vec![delete_if(b"old")]),
    );
    w.unwrap();
    assert_eq!(d.unwrap(), 0);
    assert_eq!(l.kv_get(t, b"k").await.unwrap(), Some(b"new".to_vec()));
    assert_eq!(l.kv_many(vec![delete_if(b"new")]).await.unwrap(), 1);
    assert_eq!(l.kv_get(t, b"k").await.unwrap(), None);
    assert_eq!(l.kv_many(vec![delete_if(b"new")]).await.unwrap(), 0);
}

async fn of_concurrent_inserts_if_absent_the_first_wins(l: Ledger) {
    let t = Table::WebhookSeen;
    let tasks: Vec<_> = (0..20u8)
        .map(|i| {
            let l = l.clone();
            tokio::spawn(async move {
                let won = l
                    .kv_insert_if_absent(t, b"event".to_vec(), vec![i])
                    .await
                    .unwrap();
                (i, won)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (i, won) = task.await.unwrap();
        if won {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(
        l.kv_get(t, b"event").await.unwrap(),
        Some(vec![winners[0]]),
        "the winner's value, never overwritten"
    );
    assert!(
        l.kv_insert_if_absent(t, b"other".to_vec(), b"1".to_vec())
            .await
            .unwrap()
    );
    assert_eq!(l.kv_len(t).await.unwrap(), 2);
}

async fn a_published_mark_is_seen_at_once_and_kept_across_a_reopen(state: &StateConfig) {
    let l = Ledger::open_state(state, false).await.unwrap();
    l.put("j", entry(LedgerState::Final, 1, 1)).await.unwrap();
    l.put("other", entry(LedgerState::Final, 1, 1))
        .await
        .unwrap();
    assert!(!l.get("j").await.unwrap().unwrap().published);
    l.mark_published("j").await.unwrap();
    assert!(l.get("j").await.unwrap().unwrap().published, "at once");
    assert!(!l.get("other").await.unwrap().unwrap().published);
    drop(l);
    // The mark is stored without anything else being written (redb: when its last handle
    // closes; PostgreSQL: by the writer's next commit, which it wakes for).
    let l = Ledger::open_state(state, false).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !l.get("j").await.unwrap().unwrap().published {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the mark was never stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!l.get("other").await.unwrap().unwrap().published);
}

async fn a_tool_is_refused_while_a_daemon_has_the_store(state: &StateConfig) {
    let daemon = Ledger::open_state(state, false).await.unwrap();
    daemon
        .kv_put(Table::StoreMeta, b"k".to_vec(), b"v".to_vec())
        .await
        .unwrap();
    match Ledger::open_state(state, true).await {
        Err(LedgerError::InUse) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a tool opened the store under a daemon"),
    }
    drop(daemon);
    // The daemon's writer lets go as it ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let tool = loop {
        match Ledger::open_state(state, true).await {
            Ok(t) => break t,
            Err(LedgerError::InUse) if tokio::time::Instant::now() < deadline => {}
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(
        tool.kv_get(Table::StoreMeta, b"k").await.unwrap(),
        Some(b"v".to_vec())
    );
    // And a daemon cannot start under a tool.
    let d = Ledger::open_state(state, false).await;
    assert!(matches!(d, Err(LedgerError::InUse)), "{:?}", d.err());
}

async fn purge_removes_old_jobs_and_what_is_keyed_by_them(l: Ledger) {
    let ts = |ms: i64| ms.to_le_bytes().to_vec();
    let mut ops = Vec::new();
    for (id, ms, wamid) in [("old", 1000, "w1"), ("new", 5000, "w2")] {
        ops.push(KvOp::PutJob {
            id: id.into(),
            entry: entry(LedgerState::Final, 1, ms),
        });
        ops.push(put(Table::Delivery, id.as_bytes(), b"delivered"));
        ops.push(put(Table::Wamids, wamid.as_bytes(), id.as_bytes()));
        ops.push(put(
            Table::WebhookSeen,
            format!("billed|{wamid}").as_bytes(),
            b"1",
        ));
        ops.push(index_job("+4912345", id, Some(wamid)).unwrap());
    }
    ops.push(put(Table::WebhookSeen, b"seen-old", &ts(500)));
    ops.push(put(Table::WebhookSeen, b"seen-new", &ts(5000)));
    // Rows of other tables, whatever they hold, are not the purge's.
    ops.push(put(Table::CapHistory, b"cap", &ts(500)));
    l.kv_many(ops).await.unwrap();
    l.mark_published("new").await.unwrap();
    assert_eq!(l.purge(2000).await.unwrap(), 1);
    assert_eq!(l.get("old").await.unwrap(), None);
    let kept = l.get("new").await.unwrap().unwrap();
    assert!(kept.published, "a kept entry keeps its mark");
    let text = |t: Table| {
        let l = l.clone();
        async move {
            keys(&l, t)
                .await
                .into_iter()
                .map(|k| String::from_utf8(k).unwrap())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(text(Table::Delivery).await, ["new"]);
    assert_eq!(text(Table::Wamids).await, ["w2"]);
    assert_eq!(text(Table::WebhookSeen).await, ["billed|w2", "seen-new"]);
    assert_eq!(
        l.jobs_to("4912345").await.unwrap(),
        vec![("new".to_string(), b"w2".to_vec())]
    );
    assert_eq!(text(Table::CapHistory).await, ["cap"]);
    assert_eq!(l.purge(2000).await.unwrap(), 0);
}

async fn purge_removes_more_jobs_than_fit_one_chunk(l: Ledger) {
    let ops: Vec<KvOp> = (0..4500)
        .map(|i| KvOp::PutJob {
            id: format!("j{i}"),
            entry: entry(LedgerState::Final, 1, 10),
        })
        .collect();
    l.kv_many(ops).await.unwrap();
    l.put("recent", entry(LedgerState::Final, 1, 20))
        .await
        .unwrap();
    assert_eq!(l.purge(11).await.unwrap(), 4500);
    let left = l.job_ids_mentioning(b"{}", i64::MAX).await.unwrap();
    assert_eq!(left, ["recent"]);
}

async fn scans_visit_every_row_once_in_key_order(l: Ledger) {
    let t = Table::ConsentSummary;
    // More than a page (4096 rows on both backends), in one write, under a prefix with
    // neighbours on both sides of it.
    let n = 5000u32;
    let mut ops: Vec<KvOp> = (0..n)
        .map(|i| {
            let mut k = b"p".to_vec();
            k.extend_from_slice(&i.to_be_bytes());
            put(t, &k, &i.to_le_bytes())
        })
        .collect();
    ops.push(put(t, b"o", b"before"));
    ops.push(put(t, b"q", b"after"));
    assert_eq!(l.kv_many(ops).await.unwrap(), u64::from(n) + 2);
    assert_eq!(l.kv_len(t).await.unwrap(), u64::from(n) + 2);

    let want = |i: u32| {
        let mut k = b"p".to_vec();
        k.extend_from_slice(&i.to_be_bytes());
        (k, i.to_le_bytes().to_vec())
    };
    let mut seen = Vec::new();
    let before = l.scanned_rows();
    l.kv_for_each(t, |k, v| seen.push((k.to_vec(), v.to_vec())))
        .await
        .unwrap();
    assert_eq!(l.scanned_rows() - before, u64::from(n) + 2);
    assert_eq!(seen.len(), n as usize + 2);
    assert_eq!(seen[0], (b"o".to_vec(), b"before".to_vec()));
    assert_eq!(seen[n as usize + 1], (b"q".to_vec(), b"after".to_vec()));
    for i in 0..n {
        assert_eq!(
            seen[i as usize + 1],
            want(i),
            "row {i}: in key order, each once"
        );
    }

    let prefixed = l.kv_scan_prefix(t, b"p").await.unwrap();
    assert_eq!(prefixed.len(), n as usize);
    assert!(prefixed.iter().zip(0..n).all(|(row, i)| *row == want(i)));
    assert_eq!(l.kv_scan(t).await.unwrap(), seen);
    // An empty table: nothing, and no error.
    let mut none = 0;
    l.kv_for_each(Table::Templates, |_, _| none += 1)
        .await
        .unwrap();
    assert_eq!(none, 0);
    assert!(l.kv_scan_prefix(t, b"r").await.unwrap().is_empty());
}

async fn jobs_to_lists_the_jobs_to_one_number_only(l: Ledger) {
    let ops = [
        index_job("+4912345", "a", Some("wamid.A")),
        index_job("4912345", "b", None),
        // Numbers that start with the other's digits, or that it starts with.
        index_job("+49123456", "c", Some("wamid.C")),
        index_job("+491234", "d", Some("wamid.D")),
    ]
    .into_iter()
    .map(Option::unwrap)
    .collect();
    l.kv_many(ops).await.unwrap();
    assert!(index_job("not a number", "e", None).is_none());
    assert_eq!(
        l.jobs_to("4912345").await.unwrap(),
        vec![
            ("a".to_string(), b"wamid.A".to_vec()),
            ("b".to_string(), Vec::new()),
        ]
    );
    assert_eq!(
        l.jobs_to("49123456").await.unwrap(),
        vec![("c".to_string(), b"wamid.C".to_vec())]
    );
    assert!(l.jobs_to("4999").await.unwrap().is_empty());
}

/// Whether `haystack` holds `needle` anywhere.
fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn an_erasure_leaves_no_row_holding_the_number(l: Ledger) {
    const NUMBER: &str = "4915100000007";
    const OTHER: &str = "4917700000003";
    // What the daemon keeps of a number: a final job (its event, wamid, delivery, billing mark
    // and index row) and rows keyed `digits\0…` in the tables keyed by number.
    for (digits, id, wamid) in [(NUMBER, "job-n", "wamid.N"), (OTHER, "job-o", "wamid.O")] {
        let mut e = entry(LedgerState::Final, 1, 100);
        e.event = format!("{{\"to\":\"+{digits}\",\"wamid\":\"{wamid}\"}}").into_bytes();
        let mut ops = vec![
            put(Table::Wamids, wamid.as_bytes(), id.as_bytes()),
            put(Table::Delivery, id.as_bytes(), b"read"),
            put(
                Table::WebhookSeen,
                format!("billed|{wamid}").as_bytes(),
                b"1",
            ),
            index_job(digits, id, Some(wamid)).unwrap(),
        ];
        for t in Table::ALL {
            if t != Table::JobsByNumber {
                ops.push(put(t, &number_job_key(digits, "x"), digits.as_bytes()));
            }
        }
        l.put_with(id, e, ops).await.unwrap();
    }
    assert!(
        l.dump_all()
            .await
            .unwrap()
            .iter()
            .any(|(k, v)| holds(k, NUMBER.as_bytes()) || holds(v, NUMBER.as_bytes()))
    );
    assert_eq!(
        l.job_ids_mentioning(NUMBER.as_bytes(), 100).await.unwrap(),
        ["job-n"]
    );
    assert!(
        l.job_ids_mentioning(NUMBER.as_bytes(), 99)
            .await
            .unwrap()
            .is_empty(),
        "changed after the erasure's time"
    );

    // As the erasure does it: the number's jobs through its index, every table's rows under
    // its prefix, in one write.
    let mut ops = Vec::new();
    let mut ids = Vec::new();
    for (id, wamid) in l.jobs_to(NUMBER).await.unwrap() {
        ops.push(KvOp::Delete {
            table: Table::Delivery,
            key: id.as_bytes().to_vec(),
        });
        ops.push(KvOp::Delete {
            table: Table::WebhookSeen,
            key: [b"billed|".as_slice(), &wamid].concat(),
        });
        ops.push(KvOp::Delete {
            table: Table::Wamids,
            key: wamid,
        });
        ids.push(id);
    }
    assert_eq!(ids, ["job-n"]);
    ops.push(KvOp::DeleteJobs { ids });
    for t in Table::ALL {
        ops.push(KvOp::DeletePrefix {
            table: t,
            prefix: number_job_key(NUMBER, ""),
        });
    }
    let n = l.kv_many(ops).await.unwrap();
    assert_eq!(n, 3 + 1 + Table::ALL.len() as u64, "every row found");
    l.compact().await.unwrap();

    let dump = l.dump_all().await.unwrap();
    let left: Vec<_> = dump
        .iter()
        .filter(|(k, v)| holds(k, NUMBER.as_bytes()) || holds(v, NUMBER.as_bytes()))
        .collect();
    assert!(left.is_empty(), "rows still holding the number: {left:?}");
    assert!(
        dump.iter().any(|(k, _)| k == b"job-o"),
        "the other number's job stays"
    );
    let others = dump
        .iter()
        .filter(|(k, v)| holds(k, OTHER.as_bytes()) || holds(v, OTHER.as_bytes()))
        .count();
    // Its ledger entry, and one row in each table (the index row in JobsByNumber).
    assert_eq!(others, 1 + Table::ALL.len(), "the other number's rows stay");
    assert!(l.get("job-n").await.unwrap().is_none());
    assert!(l.get("job-o").await.unwrap().is_some());
}

/// The behaviours listed for both backends are all written once, above: a guard against a test
/// added here but not to [`on_both!`] (it would run on neither).
#[test]
fn no_behaviour_is_left_out_of_the_list() {
    let src = include_str!("store_suite.rs");
    let defined: HashSet<&str> = src
        .lines()
        .filter_map(|line| line.strip_prefix("async fn "))
        .filter_map(|rest| rest.split_once('('))
        .filter(|(_, args)| args.starts_with("l: Ledger)") || args.starts_with("state: &"))
        .map(|(name, _)| name)
        .collect();
    let (_, after) = src.split_once("on_both! {\n").expect("the list");
    let (list, _) = after.split_once("\n}\n").expect("its end");
    let listed: HashSet<&str> = list
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty() && *w != "ledger" && *w != "state")
        .collect();
    assert_eq!(defined, listed);
}

/// An invalid job's id is looked up as it came (to answer a repeat), NUL and all: unknown, not
/// a store error (which would end the broker session and bring the message back for ever).
async fn a_job_id_with_a_nul_is_simply_unknown(l: Ledger) {
    assert_eq!(l.get("job\0x").await.unwrap(), None);
    assert_eq!(l.get("job").await.unwrap(), None);
}

/// Several instances starting at once on an empty store (issue 18) must hash erased numbers
/// with one key: two keys would each miss the other's tombstones.
async fn processes_opening_an_empty_store_at_once_get_one_erase_key(l: Ledger) {
    let keys =
        futures_util::future::join_all((0..8).map(|_| sendwell::consent::store::erase_key(&l)))
            .await;
    let keys: HashSet<[u8; 32]> = keys.into_iter().map(Result::unwrap).collect();
    assert_eq!(keys.len(), 1, "one erase key for the store");
    let stored = l.kv_get(Table::StoreMeta, b"erase_key").await.unwrap();
    assert_eq!(stored.as_deref(), keys.iter().next().map(|k| &k[..]));
}

/// `get_with`, a status callback's one read: the entry and, for a final entry only, the row
/// under the same id; nothing for an id without an entry, whatever rows it has.
async fn get_with_reads_a_final_entry_and_its_row(l: Ledger) {
    let t = Table::Delivery;
    let done = entry(LedgerState::Final, 1, 1);
    let running = entry(LedgerState::Sending, 1, 1);
    l.put("done", done.clone()).await.unwrap();
    l.put("bare", done.clone()).await.unwrap();
    l.put("running", running.clone()).await.unwrap();
    l.kv_many(vec![
        put(t, b"done", &[1, 2]),
        put(t, b"running", &[1, 2]),
        put(t, b"orphan", &[1, 2]),
        put(Table::WebhookSeen, b"bare", &[9]),
    ])
    .await
    .unwrap();
    assert_eq!(
        l.get_with("done", t).await.unwrap(),
        (Some(done.clone()), Some(vec![1, 2]))
    );
    // Another table's row under the id is not this table's.
    assert_eq!(l.get_with("bare", t).await.unwrap(), (Some(done), None));
    assert_eq!(
        l.get_with("running", t).await.unwrap(),
        (Some(running), None)
    );
    assert_eq!(l.get_with("orphan", t).await.unwrap(), (None, None));
    assert_eq!(l.get_with("job\0x", t).await.unwrap(), (None, None));
}
