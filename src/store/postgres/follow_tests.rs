//! The consent follower against a real PostgreSQL (as [`super::tests`]: a database per test):
//! two consent caches on one database, the commit order, the skip rule, `sync`, the purge, and
//! which tables log their changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::follow::Follower;
use super::tests::TestDb;
use crate::config::Purpose;
use crate::consent::ConsentStore;
use crate::consent::event::{ConsentEvent, Kind};
use crate::consent::model::{ALL, CONFIRMED, OPTED_IN, OPTED_OUT, PurposeState};
use crate::consent::store::{encode_summary, number_account_key};
use crate::consent::wa_id::How;
use crate::job::Recipient;
use crate::store::Ledger;

const ACCOUNT: &str = "acme";
const PURPOSE: &str = "newsletter";
/// Long enough for a busy machine; a follower polling every 50 ms needs a fraction of it.
const WITHIN: Duration = Duration::from_secs(20);

async fn store(db: &TestDb) -> Arc<ConsentStore> {
    store_on(db.open().await).await
}

async fn store_on(pg: super::PgStore) -> Arc<ConsentStore> {
    let rules: HashMap<String, Purpose> = [(
        PURPOSE.to_string(),
        Purpose {
            name: PURPOSE.into(),
            description: None,
            categories: vec![crate::job::Category::Marketing],
            double_opt_in: None,
            expire_after: None,
        },
    )]
    .into();
    ConsentStore::load_with(Ledger::from(pg), vec![ACCOUNT.into()], rules)
        .await
        .unwrap()
}

fn event(kind: Kind, digits: &str, at_s: i64) -> ConsentEvent {
    ConsentEvent {
        kind,
        account: ACCOUNT.into(),
        to: Recipient::new(format!("+{digits}").into(), "DE"),
        purposes: match kind {
            Kind::OptIn | Kind::Confirm => vec![PURPOSE.into()],
            _ => vec![],
        },
        source: (kind == Kind::OptIn).then(|| "website".into()),
        at: Timestamp::from_second(at_s).unwrap(),
        evidence: None,
    }
}

/// An hour ago, plus `s` seconds: events in the past, in order.
fn ago(s: i64) -> i64 {
    Timestamp::now().as_second() - 3600 + s
}

async fn opt_in(s: &ConsentStore, digits: &str) {
    s.apply(&event(Kind::OptIn, digits, ago(0))).await.unwrap();
    s.apply(&event(Kind::Confirm, digits, ago(1)))
        .await
        .unwrap();
}

/// What a marketing job to the number would be decided on: a confirmed opt-in, and no opt-out.
fn consented(s: &ConsentStore, digits: &str) -> bool {
    s.cached_flags(ACCOUNT, digits, PURPOSE)
        .is_some_and(|f| f & OPTED_IN != 0 && f & CONFIRMED != 0 && f & OPTED_OUT == 0)
}

fn opted_out(s: &ConsentStore, digits: &str) -> bool {
    s.cached_flags(ACCOUNT, digits, ALL)
        .is_some_and(|f| f & OPTED_OUT != 0)
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WITHIN:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A summary row as another instance writes it: opted in and confirmed for the purpose.
fn consented_row(digits: &str) -> (Vec<u8>, Vec<u8>) {
    let mut summary = BTreeMap::new();
    summary.insert(
        PURPOSE.to_string(),
        PurposeState {
            flags: OPTED_IN | CONFIRMED,
            consented_at: ago(0) as u32,
            sources: ["website".to_string()].into(),
        },
    );
    (
        number_account_key(digits, ACCOUNT),
        encode_summary(&summary),
    )
}

/// A follower for `s` that a test steps by hand, starting from where `s`'s load started.
async fn manual_follower(db: &TestDb, s: &Arc<ConsentStore>, from: i64) -> Follower {
    Follower::new(db.open().await, s.clone(), from, Duration::from_secs(3600)).0
}

#[tokio::test]
async fn another_instances_opt_in_stop_erasure_and_wa_id_reach_this_cache_within_a_deadline() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let (a, b) = (store(&db).await, store(&db).await);
    let stop = CancellationToken::new();
    let (follow, task) = b.follow(Duration::from_millis(50), stop.clone());
    assert!(follow.following() && task.is_some());
    let n = "4917000000001";

    opt_in(&a, n).await;
    assert!(consented(&a, n));
    wait_until("b to see a's opt-in", || consented(&b, n)).await;

    a.apply(&event(Kind::OptOut, n, ago(10))).await.unwrap();
    wait_until("b to see a's STOP", || {
        opted_out(&b, n) && !consented(&b, n)
    })
    .await;

    // A WhatsApp ID a send to another number taught a.
    let (br, br_id) = ("5511987654321", "551187654321");
    opt_in(&a, br).await;
    assert!(a.learn_wa_id(br, br_id).await.unwrap());
    wait_until("b to resolve a's WhatsApp ID", || {
        b.resolve_wa_id(br_id).how == How::Mapped
    })
    .await;
    assert_eq!(b.resolve_wa_id(br_id).digits, br);

    // Erasures: the numbers leave b's cache, the ID with its number.
    a.apply(&event(Kind::Erase, n, ago(20))).await.unwrap();
    a.apply(&event(Kind::Erase, br, ago(20))).await.unwrap();
    wait_until("b to forget the erased numbers", || {
        !b.knows_number(n) && !b.knows_number(br) && b.resolve_wa_id(br_id).how != How::Mapped
    })
    .await;
    assert_eq!(b.cached_flags(ACCOUNT, n, PURPOSE), None);
    assert_eq!(b.cached_flags(ACCOUNT, n, ALL), None);
    assert_eq!(b.wa_id_entries(), 0);

    stop.cancel();
    assert!(task.unwrap().await.unwrap().is_ok(), "stops cleanly");
}

#[tokio::test]
async fn sync_returns_once_a_poll_started_after_it_was_applied() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let (a, b) = (store(&db).await, store(&db).await);
    let stop = CancellationToken::new();
    // An hour between polls: only sync's own poll can bring the change in.
    let (follow, _task) = b.follow(Duration::from_secs(3600), stop.clone());
    let n = "4917000000002";
    opt_in(&a, n).await;
    for _ in 0..3 {
        tokio::time::timeout(WITHIN, follow.sync())
            .await
            .expect("sync returns")
            .unwrap();
    }
    assert!(consented(&b, n), "committed before sync was called");
    stop.cancel();
    // Stopped: sync says so rather than waiting for ever.
    wait_until("the follower to stop", || {
        futures_util::FutureExt::now_or_never(follow.sync()).is_some()
    })
    .await;
}

/// A transaction that began writing before another one, and commits after the other was
/// polled, is still read: the watermark moves to the snapshot's xmin, not past what it saw.
#[tokio::test]
async fn a_transaction_that_commits_after_a_later_one_was_polled_is_not_missed() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let pg = db.open().await;
    let from = pg.snapshot_xmin().await.unwrap();
    let b = store(&db).await;
    let mut f = manual_follower(&db, &b, from).await;
    let (early, late) = ("4917000000003", "4917000000004");

    let mut slow = db.raw().await;
    let tx = slow.transaction().await.unwrap();
    let (k, v) = consented_row(early);
    tx.execute(
        "INSERT INTO sw_consent_summary (key, value) VALUES ($1, $2)",
        &[&k, &v],
    )
    .await
    .unwrap();
    // Begun (and given its id) first, still open: another commits after it.
    let (k2, v2) = consented_row(late);
    db.raw()
        .await
        .execute(
            "INSERT INTO sw_consent_summary (key, value) VALUES ($1, $2)",
            &[&k2, &v2],
        )
        .await
        .unwrap();
    f.poll_once().await.unwrap();
    assert!(consented(&b, late));
    assert!(!consented(&b, early), "not committed yet");
    tx.commit().await.unwrap();
    f.poll_once().await.unwrap();
    assert!(
        consented(&b, early),
        "the earlier transaction's row was missed"
    );
}

/// The skip rule: a poll whose snapshot was taken before this instance's own write ended
/// does not put the older row it read back over that write.
#[tokio::test]
async fn an_older_polled_row_does_not_overwrite_this_instances_newer_write() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let pg = db.open().await;
    let from = pg.snapshot_xmin().await.unwrap();
    let (a, b) = (store(&db).await, store(&db).await);
    let mut f = manual_follower(&db, &b, from).await;
    let n = "4917000000005";
    opt_in(&a, n).await;

    // The poll reads the opt-in...
    let batch = f.read().await.unwrap();
    // ...b applies a STOP meanwhile (stored, and in its cache)...
    b.apply(&event(Kind::OptOut, n, ago(10))).await.unwrap();
    assert!(opted_out(&b, n));
    // ...and the poll's older row must not bring the consent back.
    f.apply(batch);
    assert!(
        opted_out(&b, n) && !consented(&b, n),
        "the polled opt-in overwrote b's newer STOP"
    );
    // The next poll reads the key again (carried, and logged by b's own write): the STOP.
    f.poll_once().await.unwrap();
    assert!(opted_out(&b, n) && !consented(&b, n));
    // Nothing is held back for ever: a change by another instance after that comes in.
    a.apply(&event(Kind::OptIn, n, ago(20))).await.unwrap();
    a.apply(&event(Kind::Confirm, n, ago(21))).await.unwrap();
    f.poll_once().await.unwrap();
    assert!(consented(&b, n));
}

#[tokio::test]
async fn the_follow_log_is_purged_by_the_xmin_of_an_old_enough_poll() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let raw = db.raw().await;
    let count = async || -> i64 {
        raw.query_one("SELECT count(*) FROM sw_follow", &[])
            .await
            .unwrap()
            .get(0)
    };
    let a = store(&db).await;
    opt_in(&a, "4917000000006").await;
    assert_eq!(
        count().await,
        2,
        "a log row per summary written (opt-in, confirm)"
    );
    let pg = db.open().await;
    let from = pg.snapshot_xmin().await.unwrap();
    let b = store(&db).await;
    let mut f = manual_follower(&db, &b, from).await;
    opt_in(&a, "4917000000007").await;
    f.poll_once().await.unwrap();
    // Not an hour old yet: nothing goes.
    assert_eq!(f.purge_if_due().await.unwrap(), 0);
    assert_eq!(count().await, 4);
    // As if the start's sample were an hour old: the rows of transactions below its xmin go
    // (usually the first two: another database's transaction running then may hold the
    // cluster's xmin lower); those written after it stay.
    let below: i64 = raw
        .query_one(
            "SELECT count(*) FROM sw_follow WHERE xid < $1::int8::text::xid8",
            &[&from],
        )
        .await
        .unwrap()
        .get(0);
    f.set_purge_after(Duration::ZERO);
    assert_eq!(f.purge_if_due().await.unwrap() as i64, below);
    assert_eq!(count().await, 4 - below);
    assert!(
        count().await >= 2,
        "rows written after the sample were purged"
    );
    assert!(f.watermark() >= from);
    // The purging follower itself is past what it purged: it goes on.
    f.poll_once().await.unwrap();
}

/// Only the two consent cache tables log their changes: the job path (ledger, wamids,
/// delivery, caps, ...) pays nothing for following.
#[tokio::test]
async fn only_the_consent_summary_and_wa_id_tables_have_triggers() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let _s = db.open().await;
    let rows = db
        .raw()
        .await
        .query(
            "SELECT c.relname::text, t.tgname::text FROM pg_trigger t \
             JOIN pg_class c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let found: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        found,
        [
            (
                "sw_consent_summary".into(),
                "sw_consent_summary_follow".into()
            ),
            ("sw_wa_ids".into(), "sw_wa_ids_follow".into()),
        ]
    );
}

/// Two instances applying events of one number at once: each recomputes the summary from the
/// history it read and writes it whole. Without a lock across instances, an opt-in's summary
/// computed before a STOP's history row was written overwrites the STOP's summary, and the
/// database (then every cache, through the follower) says the number may be messaged.
#[tokio::test]
async fn a_stop_applied_beside_another_instances_opt_in_is_never_overwritten() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let (a, b) = (store(&db).await, store(&db).await);
    let numbers: Vec<String> = (0..40).map(|i| format!("49170000{i:05}")).collect();
    for n in &numbers {
        opt_in(&a, n).await;
    }
    // Each pair at once: a STOP on `a`, and on `b` an earlier opt-in from another source,
    // which changes the summary (its sources) without lifting a later STOP.
    let pairs = numbers.iter().map(|n| {
        let (a, b) = (a.clone(), b.clone());
        async move {
            let mut again = event(Kind::OptIn, n, ago(5));
            again.source = Some("app".into());
            let stop = event(Kind::OptOut, n, ago(10));
            let (x, y) = tokio::join!(a.apply(&stop), b.apply(&again));
            x.unwrap();
            y.unwrap();
        }
    });
    futures_util::future::join_all(pairs).await;

    // What a new instance (or any follower) reads from the database.
    let fresh = store(&db).await;
    let messageable: Vec<&String> = numbers
        .iter()
        .filter(|n| !opted_out(&fresh, n) || consented(&fresh, n))
        .collect();
    assert!(
        messageable.is_empty(),
        "{} of {} numbers lost their STOP in the stored summary: {messageable:?}",
        messageable.len(),
        numbers.len()
    );
}

/// A follower that did not poll while another instance purged the log past its watermark (a
/// process stopped for an hour, a host suspended: its own clock need not have counted that
/// time) stops, rather than going on with a cache that may miss what the purged rows named.
#[tokio::test]
async fn a_follower_whose_watermark_was_purged_past_stops() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let a = store(&db).await;
    let pg = db.open().await;
    let from = pg.snapshot_xmin().await.unwrap();
    let b = store(&db).await;
    // Polling every 50 ms once it runs (below); not before the purge.
    let behind = Follower::new(db.open().await, b.clone(), from, Duration::from_millis(50)).0;
    opt_in(&a, "4917000020100").await;
    // Another instance purges below `from + 1`, as if a poll of its own an hour ago had seen
    // that xmin (a purge never goes past the purging follower's own watermark).
    let c = store(&db).await;
    let mut purger = manual_follower(&db, &c, from + 1).await;
    purger.add_sample_an_hour_old(from + 1);
    purger.set_purge_after(Duration::ZERO);
    purger.purge_if_due().await.unwrap();

    let stop = CancellationToken::new();
    let r = tokio::time::timeout(WITHIN, behind.run(stop.clone())).await;
    stop.cancel();
    match r {
        Ok(Err(e @ super::follow::FollowError::Purged { .. })) => {
            assert!(e.to_string().contains("purged"), "{e}");
        }
        other => panic!("the follower went on behind a purge: {other:?}"),
    }
}

/// As many erasures at once as the pool has connections (4 in tests): each holds its lock
/// while it reads; had it taken a read connection for the lock, each would wait for one of the
/// others' until the pool's timeout, and fail as "database unreachable" (found by the review).
#[tokio::test]
async fn erasures_at_once_do_not_wait_on_each_others_connections() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let a = store(&db).await;
    let numbers: Vec<String> = (0..4).map(|i| format!("49170000{i:05}")).collect();
    for n in &numbers {
        opt_in(&a, n).await;
    }
    let erases = numbers.iter().map(|n| {
        let a = a.clone();
        async move { a.erase(n, Timestamp::now()).await.map(|_| ()) }
    });
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(erases),
    )
    .await
    .expect("erasures still waiting after 60 s");
    let failed: Vec<_> = r.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 4 erasures failed: {failed:?}",
        failed.len()
    );
}

/// Another instance holds numbers' locks and stalls (a partition, a stalled writer): this
/// instance's applies of those numbers wait, but hold no connection meanwhile, so a number
/// nobody holds is applied at once (with waiters holding connections, four of them would have
/// held the whole pool); and the waiters go on once the locks are freed (found by the review).
#[tokio::test]
async fn numbers_locked_elsewhere_do_not_hold_up_other_numbers() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let a_store = db.open().await;
    let a = store_on(a_store.clone()).await;
    let numbers: Vec<String> = (0..4).map(|i| format!("49170000{i:05}")).collect();
    let other = db.raw().await;
    other.batch_execute("BEGIN").await.unwrap();
    for n in &numbers {
        other
            .execute(
                "SELECT pg_advisory_xact_lock($1, $2)",
                &[&1i32, &super::lock_hash(n.as_bytes())],
            )
            .await
            .unwrap();
    }
    let blocked: Vec<_> = numbers
        .iter()
        .map(|n| {
            let (a, ev) = (a.clone(), event(Kind::OptOut, n, ago(10)));
            tokio::spawn(async move { a.apply(&ev).await.map(|_| ()) })
        })
        .collect();
    // Once each of the four has found its number locked (a retry each, at least)...
    let deadline = tokio::time::Instant::now() + WITHIN;
    while a_store.lock_retries() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the applies never found their numbers locked ({} tries)",
            a_store.lock_retries()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...an unrelated number, while they wait.
    let unrelated = tokio::time::timeout(
        Duration::from_secs(60),
        a.apply(&event(Kind::OptOut, "4917099999999", ago(10))),
    )
    .await
    .expect("an unrelated number waited for the locked ones");
    unrelated.unwrap();
    assert!(
        blocked.iter().all(|b| !b.is_finished()),
        "an apply went on though another instance held its number's lock"
    );
    other.batch_execute("ROLLBACK").await.unwrap();
    for b in blocked {
        b.await.unwrap().unwrap();
    }
    for n in &numbers {
        assert!(opted_out(&a, n), "{n}");
    }
}
