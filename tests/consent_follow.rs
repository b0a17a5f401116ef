//! Consent follows the database (issue 18, design decision 3): two daemon instances of one
//! shard share one PostgreSQL state; a STOP the active one applied holds on the one that takes
//! over. Real RabbitMQ and PostgreSQL (a database shared by both instances, made for the test
//! whatever `SENDWELL_TEST_BACKEND` says).

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// The one final outcome of `id`.
async fn outcome(env: &TestEnv, id: &str) -> serde_json::Value {
    let mut finals = env.final_outcomes(&[id.to_string()], T).await;
    let events = finals.remove(id).unwrap();
    assert_eq!(events.len(), 1, "one final outcome: {events:?}");
    events.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_applied_by_the_active_instance_holds_on_the_instance_that_takes_over() {
    let env = TestEnv::new(&AppOptions {
        consented: 0..0,
        ..AppOptions::default()
    })
    .await;
    let n = number(7);
    // Started first: the broker's single active consumer of the shard's queues.
    let (active, _active_dir) = env
        .start_instance_sharing_db(0, "", std::slice::from_ref(&n))
        .await;
    // Started (its consent cache loaded) while the number still has consent.
    let (standby, _standby_dir) = env.start_instance_sharing_db(0, "", &[]).await;
    let ledger = active.app.as_ref().unwrap().ledger.clone();

    env.publish(&[template_job("before-stop", &n)]).await;
    assert_eq!(outcome(&env, "before-stop").await["status"], "sent");

    env.publish_consent(&[serde_json::json!({
        "type": "opt_out", "account": "acme-de", "to": n,
        "at": jiff::Timestamp::now().to_string(),
    })])
    .await;
    wait_for("the active instance to store the STOP", T, async || {
        let flags = consent_flags(&ledger, &n, "*").await?;
        (flags & 4 != 0).then_some(())
    })
    .await;

    // The active instance goes; the broker hands the shard's queues to the standby.
    active.stop().await;
    // What a takeover does before its first job (docs/design/instances.md, decision 2).
    let follow = standby.app.as_ref().unwrap().consent_follow.clone();
    assert!(follow.following(), "instances on PostgreSQL follow");
    tokio::time::timeout(T, follow.sync())
        .await
        .expect("the follower catches up")
        .expect("the follower runs");

    env.publish(&[template_job("after-failover", &n)]).await;
    let e = outcome(&env, "after-failover").await;
    assert_eq!(
        (e["status"].as_str(), e["reason"].as_str()),
        (Some("suppressed"), Some("opted_out")),
        "{e}"
    );
    standby.stop().await;
}
