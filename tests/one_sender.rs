//! One instance sends to a recipient at a time, across shards and instances (issue 18, review
//! finding): a delayed job comes back to the shard that owns its recipient *then*, not to the
//! shard that deferred it; and two instances counting sends to one recipient on PostgreSQL both
//! keep theirs in the recipient's cap row. On PostgreSQL whatever `SENDWELL_TEST_BACKEND` says
//! (several instances need one shared state).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::pg::TestDb;
use common::*;
use jiff::Timestamp;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sendwell::config::limits::{CapConfig, CapRule, CapScope, OnExceed};
use sendwell::config::{PgTls, PostgresConfig, Secret, StateBackend, StateConfig};
use sendwell::job::Category;
use sendwell::pipeline::limits::caps::{CapSubject, Caps, SendLog};
use sendwell::store::{Ledger, Table};

const T: Duration = Duration::from_secs(60);

/// The phone number ID of shard 1's instance, so the sandbox's log tells who sent what.
const SECOND: &str = "106540352242923";

/// Recipients: enough that both shards of a two-shard ring own some.
const N: usize = 16;

fn auth_job(id: &str, to: &str, not_before: Option<Timestamp>) -> serde_json::Value {
    let mut j = serde_json::json!({
        "id": id, "account": "acme-de", "to": to, "category": "authentication",
        "template": { "name": "otp", "language": "de", "components": [] }
    });
    if let Some(t) = not_before {
        j["not_before"] = t.to_string().into();
    }
    j
}

/// The phone number ID each job id was sent with.
fn senders(env: &TestEnv) -> HashMap<String, String> {
    env.sandbox
        .accepted()
        .into_iter()
        .filter_map(|r| Some((r.callback_data?, r.phone_number_id)))
        .collect()
}

async fn bind_shard_1(env: &TestEnv, bound: bool) {
    let conn = Connection::connect(&env.broker.url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let (q, x, w) = ("sendwell.jobs.1", "sendwell.jobs", "1");
    if bound {
        ch.queue_bind(
            q.into(),
            x.into(),
            w.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    } else {
        ch.queue_unbind(q.into(), x.into(), w.into(), FieldTable::default())
            .await
            .unwrap();
    }
    let _ = conn.close(200, "".into()).await;
}

/// Jobs deferred by shard 0 (`not_before`) while shard 1 is out of the ring; shard 1 joins
/// before they are due: each comes back to the shard that owns its recipient now, the one a
/// new job of the recipient goes to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_job_returns_to_its_recipient_s_shard_after_a_shard_was_added() {
    let env = TestEnv::new(&AppOptions {
        postgres: true,
        ..AppOptions::default()
    })
    .await;
    let zero = env.start().await;
    let (one, _dir) = env
        .start_instance_on_shared_db(1, "", |c| c.accounts[0].phone_number_id = SECOND.into())
        .await;
    bind_shard_1(&env, false).await;

    let due = Timestamp::now() + Duration::from_secs(8);
    let ids: Vec<String> = (0..N).map(|i| format!("later-{i}")).collect();
    let jobs: Vec<_> = (0..N)
        .map(|i| auth_job(&ids[i], &number(i), Some(due)))
        .collect();
    env.publish(&jobs).await;
    // Every job deferred (its ledger row written, right before its copy goes to a delay queue).
    let db = env.db_client().await.unwrap();
    wait_for("every job deferred", T, async || {
        let row = db
            .query_one(
                "SELECT count(*) FROM sw_ledger WHERE id = ANY($1) AND state = 1",
                &[&ids],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0) == N as i64).then_some(())
    })
    .await;
    assert!(
        Timestamp::now() < due,
        "the machine took 8 s to defer {N} jobs"
    );
    bind_shard_1(&env, true).await;

    let finals = env.final_outcomes(&ids, T).await;
    assert!(ids.iter().all(|id| finals[id][0]["status"] == "sent"));
    // Where a new job of each recipient goes now.
    let probes: Vec<String> = (0..N).map(|i| format!("now-{i}")).collect();
    let jobs: Vec<_> = (0..N)
        .map(|i| auth_job(&probes[i], &number(i), None))
        .collect();
    env.publish(&jobs).await;
    env.final_outcomes(&probes, T).await;

    let by = senders(&env);
    let moved = (0..N).filter(|&i| by[&probes[i]] == SECOND).count();
    assert!(moved > 0, "shard 1 owns none of {N} numbers");
    for i in 0..N {
        assert_eq!(
            by[&ids[i]], by[&probes[i]],
            "{}: the delayed job and a new job of the recipient went to different shards",
            ids[i]
        );
        assert_eq!(env.sandbox.accepted_count_for(&ids[i]), 1, "{}", ids[i]);
    }
    one.stop().await;
    zero.stop().await;
}

/// Upgrading: a job an older sendwell deferred comes back from its per-shard delay queue to
/// that shard's queue by name, though its recipient belongs to shard 1: shard 0 sends it on,
/// and shard 1 sends it, once. A second copy of it (dead-lettering is at-least-once) is the
/// same message there: acked, no `duplicate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_back_from_an_old_build_s_delay_queue_goes_on_to_its_recipient_s_shard() {
    let env = TestEnv::new(&AppOptions {
        postgres: true,
        ..AppOptions::default()
    })
    .await;
    let zero = env.start().await;
    let (one, _dir) = env
        .start_instance_on_shared_db(1, "", |c| c.accounts[0].phone_number_id = SECOND.into())
        .await;
    let probes: Vec<String> = (0..N).map(|i| format!("owner-{i}")).collect();
    let jobs: Vec<_> = (0..N)
        .map(|i| auth_job(&probes[i], &number(i), None))
        .collect();
    env.publish(&jobs).await;
    env.final_outcomes(&probes, T).await;
    let by = senders(&env);
    let i = (0..N)
        .find(|&i| by[&probes[i]] == SECOND)
        .expect("shard 1 owns one of the numbers");

    // The old build's queue, as it declared it: back to sendwell.jobs.0 by name.
    let conn = Connection::connect(&env.broker.url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let old = "sendwell.delay.0.1s";
    let mut args = FieldTable::default();
    let text = |v: &str| AMQPValue::LongString(LongString::from(v));
    for (k, v) in [
        ("x-queue-type", text("quorum")),
        ("x-message-ttl", AMQPValue::LongLongInt(1000)),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text("sendwell.jobs.0")),
        ("x-overflow", text("reject-publish")),
        ("x-dead-letter-strategy", text("at-least-once")),
    ] {
        args.insert(ShortString::from(k), v);
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(old.into(), durable, args).await.unwrap();
    let id = "deferred-by-an-old-build";
    let body = serde_json::to_vec(&auth_job(id, &number(i), None)).unwrap();
    let publish_copy = async || {
        let mut headers = FieldTable::default();
        let now = Timestamp::now().as_millisecond();
        headers.insert("x-sendwell-due".into(), AMQPValue::LongLongInt(now));
        headers.insert("x-sendwell-attempts".into(), AMQPValue::LongLongInt(0));
        ch.basic_publish(
            "".into(),
            old.into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_headers(headers)
                .with_user_id("guest".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    };
    publish_copy().await;
    let finals = env.final_outcomes(&[id.to_string()], T).await;
    assert_eq!(finals[id][0]["status"], "sent");
    assert_eq!(senders(&env)[id], SECOND, "sent by the recipient's shard");

    publish_copy().await;
    wait_for("the second copy to be taken", T, async || {
        ([old, "sendwell.jobs.0", "sendwell.jobs.1"]
            .iter()
            .all(|q| env.broker.drained(q)))
        .then_some(())
    })
    .await;
    assert_eq!(env.sandbox.accepted_count_for(id), 1);
    let events: Vec<_> = env.outcomes.for_id(id);
    assert_eq!(events.len(), 1, "one outcome, no duplicate: {events:?}");
    let _ = conn.close(200, "".into()).await;
    one.stop().await;
    zero.stop().await;
}

/// Two instances (two stores on one database, each with the recipient's log in memory) count
/// sends to one recipient at once, some in the same second: the row keeps every send, and one
/// instance un-counting its own send leaves the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_counting_sends_to_one_recipient_lose_none() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let state = StateConfig {
        dir: dir.path().join("state"),
        ledger_retention: Duration::from_secs(7 * 86400),
        unwritable_grace: Duration::from_secs(60),
        backend: StateBackend::Postgres,
        postgres: Some(PostgresConfig {
            url: db.url.clone(),
            password: Some(Secret::new(db.password().to_string())),
            password_file: Some(db.password_file.clone()),
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            follow_every: Duration::from_millis(250),
            tls: PgTls::Off,
            ca_file: None,
        }),
    };
    let (la, lb) = (
        Ledger::open_state(&state, false).await.unwrap(),
        Ledger::open_state(&state, false).await.unwrap(),
    );
    let config = vec![CapConfig {
        category: Category::Marketing,
        scope: CapScope::Account,
        rules: vec![CapRule {
            max: 8,
            per_secs: 7 * 86400,
        }],
        on_exceed: OnExceed::Suppress,
    }];
    let accounts = [("acme-de", "acme")];
    let (ca, cb) = (
        Caps::new(config.clone(), &accounts),
        Caps::new(config, &accounts),
    );
    let s = CapSubject {
        account: "acme-de",
        brand: "acme",
        digits: "491701234567",
        category: Category::Marketing,
    };
    let t0 = Timestamp::now();
    let at = |i: u64| t0 + Duration::from_secs(i);
    let mut writes = Vec::new();
    for i in 0..3 {
        writes.push(la.kv_many(ca.reserve(&s, at(i))));
        writes.push(lb.kv_many(cb.reserve(&s, at(i))));
    }
    for r in futures_util::future::join_all(writes).await {
        r.unwrap();
    }
    let key = b"491701234567\0a:acme-de\0marketing";
    let row = async || {
        let v = la.kv_get(Table::CapHistory, key).await.unwrap().unwrap();
        SendLog::decode(&v).unwrap()
    };
    assert_eq!(
        row().await.len(),
        6,
        "a send counted by one instance was lost"
    );

    // B's send at t0 did not happen after all: one send at t0 is un-counted, A's stays.
    lb.kv_many(cb.release(&s, at(0))).await.unwrap();
    let log = row().await;
    assert_eq!(log.len(), 5);
    assert_eq!(
        log.encode()[16..],
        sendwell::pipeline::limits::caps::to_secs(at(0)).to_le_bytes()
    );
}
