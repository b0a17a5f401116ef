//! Limits held across instances on one PostgreSQL state (issue 18; docs/design/instances.md,
//! decision 4): the instance that newly holds a recipient reads its caps through from the
//! database at the recipient's first job, after a takeover and after the live shards changed,
//! so what another instance sent still counts. Every instance here shares one database (the
//! env's, on PostgreSQL whatever `SENDWELL_TEST_BACKEND` says: redb is one process's).
//!
//! The tests call `Pipeline::takeover` and `Pipeline::shards_changed` themselves, as the
//! instance hooks (src/instances.rs: the broker's first delivery, the registry's live shards)
//! do in the daemon, so that each step happens at a known point.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

const T: Duration = Duration::from_secs(60);

/// Marketing: at most 1 a day per recipient (suppressed beyond).
const CAP_1_A_DAY: &str = r#"
[[caps]]
category = "marketing"
scope = "brand"
rules = [{ max = 1, per = "1d" }]
"#;

/// The phone number ID of the second instance's account, so that the sandbox's log tells which
/// instance sent a message (the env's sends with 106540352242922).
const SECOND: &str = "106540352242923";

/// Recipients: enough that both shards of a two-shard ring own some.
const N: usize = 24;

async fn env() -> TestEnv {
    TestEnv::new(&AppOptions {
        postgres: true,
        extra_toml: CAP_1_A_DAY.into(),
        consented: 0..N,
        ..AppOptions::default()
    })
    .await
}

/// A second instance on `shard`, on the env's database, sending as [`SECOND`].
async fn second(env: &TestEnv, shard: u16) -> (TestApp, tempfile::TempDir) {
    env.start_instance_on_shared_db(shard, CAP_1_A_DAY, |c| {
        c.accounts[0].phone_number_id = SECOND.into();
    })
    .await
}

fn pipeline(app: &TestApp) -> &sendwell::pipeline::Pipeline {
    app.app.as_ref().unwrap().pipeline()
}

/// Publishes a marketing job to each `(id, recipient)` and waits for their final outcomes.
async fn marketing(
    env: &TestEnv,
    jobs: &[(String, String)],
) -> HashMap<String, Vec<serde_json::Value>> {
    let bodies: Vec<_> = jobs.iter().map(|(id, to)| template_job(id, to)).collect();
    env.publish(&bodies).await;
    let ids: Vec<String> = jobs.iter().map(|j| j.0.clone()).collect();
    env.final_outcomes(&ids, T).await
}

/// The phone number ID each job id was sent with.
fn senders(env: &TestEnv) -> HashMap<String, String> {
    env.sandbox
        .accepted()
        .into_iter()
        .filter_map(|r| Some((r.callback_data?, r.phone_number_id)))
        .collect()
}

/// The recipients (of `0..N`) whose jobs shard 1 takes now: an authentication job to each (no
/// consent, no cap), sent by whichever instance owns the recipient.
async fn owned_by_second(env: &TestEnv, round: &str) -> Vec<usize> {
    let bodies: Vec<_> = (0..N)
        .map(|i| {
            serde_json::json!({
                "id": format!("{round}-{i}"), "account": "acme-de", "to": number(i),
                "category": "authentication",
                "template": { "name": "otp", "language": "de", "components": [] }
            })
        })
        .collect();
    env.publish(&bodies).await;
    let ids: Vec<String> = (0..N).map(|i| format!("{round}-{i}")).collect();
    let finals = env.final_outcomes(&ids, T).await;
    assert!(ids.iter().all(|id| finals[id][0]["status"] == "sent"));
    let by = senders(env);
    (0..N)
        .filter(|i| by[&format!("{round}-{i}")] == SECOND)
        .collect()
}

/// Adds (`true`) or removes the binding of shard 1's jobs queue to the jobs exchange, as the
/// operator's procedure for a shard does (the daemon binds it at start).
async fn bind_shard_1(env: &TestEnv, bound: bool) {
    let conn = Connection::connect(&env.broker.url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let (queue, exchange, weight) = ("sendwell.jobs.1", "sendwell.jobs", "1");
    if bound {
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            weight.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    } else {
        ch.queue_unbind(
            queue.into(),
            exchange.into(),
            weight.into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let _ = conn.close(200, "".into()).await;
}

fn assert_capped(finals: &HashMap<String, Vec<serde_json::Value>>, env: &TestEnv, id: &str) {
    let o = &finals[id][0];
    assert_eq!(
        (o["status"].as_str(), o["reason"].as_str()),
        (Some("suppressed"), Some("frequency_cap")),
        "{id}: {o}"
    );
    assert_eq!(env.sandbox.accepted_count_for(id), 0, "{id} was sent");
}

/// A number gets its one marketing message of the day from the active instance; the active
/// stops and the standby takes the shard over: the next marketing job to the number is
/// suppressed, though the standby's memory never saw the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_holds_across_a_failover() {
    let env = env().await;
    let to = number(0);
    let active = env.start().await;
    let (standby, _dir) = second(&env, 0).await;

    let first = marketing(&env, &[("failover-1".into(), to.clone())]).await;
    assert_eq!(first["failover-1"][0]["status"], "sent");
    assert_ne!(
        senders(&env)["failover-1"],
        SECOND,
        "sent by the active instance"
    );

    // A graceful stop: the broker hands the shard's queue to the standby once the active's
    // consumer is gone. The instance hook that notices the first delivery will call this.
    active.stop().await;
    pipeline(&standby).takeover().await.unwrap();

    let second_job = marketing(&env, &[("failover-2".into(), to)]).await;
    assert_capped(&second_job, &env, "failover-2");
    standby.stop().await;
}

/// Shard 1's instance runs (its state loaded) while its queue is out of the ring; shard 0
/// sends to every number; shard 1 joins the ring (a shard added) and its recipients move to
/// it: their next marketing job is suppressed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_moved_to_an_added_shard_keeps_its_cap() {
    let env = env().await;
    let zero = env.start().await;
    let (one, _dir) = second(&env, 1).await;
    bind_shard_1(&env, false).await;

    let jobs: Vec<(String, String)> = (0..N).map(|i| (format!("add-1-{i}"), number(i))).collect();
    let first = marketing(&env, &jobs).await;
    let by = senders(&env);
    for (id, _) in &jobs {
        assert_eq!(first[id][0]["status"], "sent", "{id}");
        assert_ne!(by[id], SECOND, "{id}: only shard 0 is in the ring");
    }

    bind_shard_1(&env, true).await;
    // The registry's hook will call these when it sees the live shards change.
    pipeline(&zero).shards_changed();
    pipeline(&one).shards_changed();
    let moved = owned_by_second(&env, "add-probe").await;
    assert!(!moved.is_empty(), "shard 1 owns none of {N} numbers");

    let again: Vec<(String, String)> = moved
        .iter()
        .map(|&i| (format!("add-2-{i}"), number(i)))
        .collect();
    let finals = marketing(&env, &again).await;
    for (id, _) in &again {
        assert_capped(&finals, &env, id);
    }
    one.stop().await;
    zero.stop().await;
}

/// Two shards send to their own recipients; shard 1 is removed (its instance stops, its queue
/// leaves the ring) and its recipients move to shard 0: their next marketing job is suppressed
/// there, though shard 0's memory never saw their first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_moved_off_a_removed_shard_keeps_its_cap() {
    let env = env().await;
    let zero = env.start().await;
    let (one, _dir) = second(&env, 1).await;

    let jobs: Vec<(String, String)> = (0..N).map(|i| (format!("rm-1-{i}"), number(i))).collect();
    let first = marketing(&env, &jobs).await;
    assert!(jobs.iter().all(|(id, _)| first[id][0]["status"] == "sent"));
    let by = senders(&env);
    let moved: Vec<usize> = (0..N)
        .filter(|i| by[&format!("rm-1-{i}")] == SECOND)
        .collect();
    assert!(!moved.is_empty(), "shard 1 owns none of {N} numbers");

    one.stop().await;
    bind_shard_1(&env, false).await;
    // The registry's hook will call this when shard 1's last instance is gone.
    pipeline(&zero).shards_changed();

    let again: Vec<(String, String)> = moved
        .iter()
        .map(|&i| (format!("rm-2-{i}"), number(i)))
        .collect();
    let finals = marketing(&env, &again).await;
    for (id, _) in &again {
        assert_capped(&finals, &env, id);
    }
    zero.stop().await;
}

/// An account-level webhook (a template paused) goes to every shard through the fanout, and
/// each shard's active instance keeps the template's state in its own memory: the first shard
/// to apply the event must not make the others skip their copy as already applied (the record
/// of applied events is shared on PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_level_webhook_is_applied_by_every_shard() {
    let env = env().await;
    let first = env.start().await;
    let (second, _dir) = second(&env, 1).await;
    let body = std::fs::read(format!(
        "{}/tests/fixtures/webhooks/template_paused.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let events = sendwell::webhook::parse::split(&body).unwrap();
    assert_eq!(events.len(), 1);
    assert!(events[0].recipient.is_none(), "an account-level event");
    // As the webhook listener publishes it (the daemons act on it only with our user_id).
    let mut headers = FieldTable::default();
    headers.insert(
        "x-sendwell-kind".into(),
        lapin::types::AMQPValue::LongString("webhook".into()),
    );
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers)
        .with_user_id("guest".into());
    let event = serde_json::to_vec(&events[0]).unwrap();
    // The fanout's two copies, one shard after the other: shard 1 takes its copy only once
    // shard 0 has applied its own (on a busy system, any order happens).
    for (name, app) in [("shard 0", &first), ("shard 1", &second)] {
        let queue = if name == "shard 0" {
            "sendwell.webhooks.0"
        } else {
            "sendwell.webhooks.1"
        };
        publish_with(&env.broker.url, "", queue, &event, props.clone()).await;
        wait_for(
            &format!("{name} to hold the template paused"),
            T,
            async || {
                pipeline(app)
                    .meta
                    .template_block(None, "spring_sale", "de")
                    .map(|_| ())
            },
        )
        .await;
    }
    first.stop().await;
    second.stop().await;
}
