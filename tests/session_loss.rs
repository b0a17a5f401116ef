//! A job waiting inside an instance whose broker session is lost is not sent by that instance
//! (issue 18, review finding): the broker has given it back, maybe to another instance already
//! (the shard queue's next active consumer), so it is left to its redelivery. Alone in its test
//! binary: it reads the process-wide `sendwell_jobs_in_flight` gauge.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

const T: Duration = Duration::from_secs(60);

/// Recipient pacing of 5 s: a second job to a number waits in the instance (inline, up to
/// `inline_max_delay`) for 5 s after the first.
const PACED: &str = "messages_per_second = 1000\npacing = { interval = \"5s\" }\n";

fn auth_job(id: &str, to: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id, "account": "acme-de", "to": to, "category": "authentication",
        "template": { "name": "otp", "language": "de", "components": [] }
    })
}

async fn in_flight(app: &TestApp) -> f64 {
    metric_value(&app.metrics().await, "sendwell_jobs_in_flight")
}

/// Closes the daemon's broker connection (named `sendwell shard 0`) through the management
/// API, as a network failure between it and the broker would end it.
async fn close_daemon_connection(env: &TestEnv) {
    let http = reqwest::Client::new();
    let name = wait_for("the daemon's connection to be listed", T, async || {
        let text = http
            .get(format!(
                "{MGMT}/api/vhosts/{}/connections",
                env.broker.vhost
            ))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let list: serde_json::Value = serde_json::from_str(&text).ok()?;
        list.as_array()?
            .iter()
            .find(|c| c["client_properties"]["connection_name"] == "sendwell shard 0")
            .and_then(|c| c["name"].as_str())
            .map(String::from)
    })
    .await;
    let mut url = reqwest::Url::parse(MGMT).unwrap();
    url.path_segments_mut()
        .unwrap()
        .extend(["api", "connections", &name]);
    let r = http
        .delete(url)
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "close connection: {}", r.status());
}

/// A job waits at its recipient's pacing in the daemon; the daemon's broker connection is
/// closed, and the broker hands the shard queue, with the job, to the consumer waiting behind
/// the daemon's (a stand-in for the next active instance): the daemon stops working on the job
/// and never sends it. When that consumer goes, the job comes back to the daemon and is sent
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_when_the_broker_session_is_lost_is_not_sent_by_that_instance() {
    let env = TestEnv::new(&AppOptions {
        account_limits: PACED.into(),
        ..AppOptions::default()
    })
    .await;
    let app = env
        .start_with(|c| c.retry.inline_max_delay = Duration::from_secs(30))
        .await;
    let conn = Connection::connect(&env.broker.url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(20, BasicQosOptions::default()).await.unwrap();
    // Single active consumer: this one waits behind the daemon's.
    let mut next_active = ch
        .basic_consume(
            "sendwell.jobs.0".into(),
            "next-active".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let to = number(0);
    env.publish(&[auth_job("first", &to)]).await;
    env.final_outcomes(&["first".into()], T).await;
    env.publish(&[auth_job("parked", &to)]).await;
    wait_for("the second job to be in flight", T, async || {
        (in_flight(&app).await == 1.0).then_some(())
    })
    .await;

    close_daemon_connection(&env).await;
    // The job reaches the next active consumer (the daemon's probes, empty, may come too).
    let job = tokio::time::timeout(T, async {
        loop {
            let d = next_active.next().await.unwrap().unwrap();
            if d.data.is_empty() {
                d.acker.ack(BasicAckOptions::default()).await.unwrap();
            } else {
                break d;
            }
        }
    })
    .await
    .expect("the job handed to the next active consumer");
    assert!(job.redelivered);
    // The daemon is done with its copy (abandoned, or sent without the fix).
    wait_for("the daemon to let go of the job", T, async || {
        (in_flight(&app).await == 0.0).then_some(())
    })
    .await;
    assert_eq!(
        env.sandbox.accepted_count_for("parked"),
        0,
        "the instance whose session was lost sent the job"
    );

    // The stand-in goes without acking: the job returns to the daemon, which sends it.
    let _ = conn.close(200, "".into()).await;
    let finals = env.final_outcomes(&["parked".into()], T).await;
    assert_eq!(finals["parked"][0]["status"], "sent");
    assert_eq!(env.sandbox.accepted_count_for("parked"), 1);
    app.stop().await;
}
