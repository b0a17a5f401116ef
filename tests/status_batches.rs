//! Status batches (issue 19): the `sent`, `delivered` and `read` statuses of the messages a
//! shard sent travel to that shard in batches, one broker message for many, and each is still
//! applied once, in its number's lane, in order. One test, so the process-wide counters it
//! reads are its own.

mod common;

use std::time::Duration;

use common::*;
use sendwell::webhook::signature::sign;

const T: Duration = Duration::from_secs(60);

async fn post_signed(app: &TestApp, body: &[u8]) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{}/webhook", app.webhook()))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sign(APP_SECRET.as_bytes(), body))
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// One callback with a status per (job id, wamid, number), naming `shard` as the sender.
fn statuses(jobs: &[(String, String, String)], status: &str, shard: u16) -> Vec<u8> {
    let each: Vec<_> = jobs.iter().map(|j| (j, status)).collect();
    statuses_each(&each, shard)
}

/// One callback with the given status of each (job id, wamid, number), in this order.
fn statuses_each(items: &[(&(String, String, String), &str)], shard: u16) -> Vec<u8> {
    let items: Vec<serde_json::Value> = items
        .iter()
        .map(|((id, wamid, to), status)| {
            serde_json::json!({
                "id": wamid, "status": status,
                "timestamp": jiff::Timestamp::now().as_second().to_string(),
                "recipient_id": to.trim_start_matches('+'),
                "biz_opaque_callback_data": sendwell::webhook::opaque::callback_data(id, shard),
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "102290129340398", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "display_phone_number": "15550001111", "phone_number_id": "106540352242922" },
            "statuses": items,
        }}]}]
    }))
    .unwrap()
}

/// Sends `n` jobs, `{prefix}-{i}` to `number(first + i)`, and waits for their outcomes: their
/// ids, and (job id, wamid, number) of each.
async fn send_and_wait(
    env: &TestEnv,
    prefix: &str,
    first: usize,
    n: usize,
) -> (Vec<String>, Vec<(String, String, String)>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let jobs: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| template_job(id, &number(first + i)))
        .collect();
    env.publish(&jobs).await;
    let finals = env.final_outcomes(&ids, T).await;
    let sent = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let wamid = finals[id][0]["wamid"].as_str().unwrap().to_string();
            (id.clone(), wamid, number(first + i))
        })
        .collect();
    (ids, sent)
}

/// The delivery events of `id`, in the order published.
fn delivery_statuses(env: &TestEnv, id: &str) -> Vec<String> {
    env.outcomes
        .for_id(id)
        .into_iter()
        .filter_map(|e| e["status"].as_str().map(str::to_string))
        .filter(|s| ["delivered", "read", "undelivered"].contains(&s.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_travel_in_batches_to_the_shard_that_sent_them_and_apply_once_each() {
    let mut opts = AppOptions {
        extra_toml: webhook_toml(1 << 20),
        consented: 0..100,
        ..AppOptions::default()
    };
    // Meta under load: the statuses due within 50 ms of each other share a POST.
    opts.sandbox.status_batch = 50;
    opts.sandbox.status_batch_window = Duration::from_millis(50);
    opts.sandbox.status_delay = Duration::ZERO;
    let env = TestEnv::with_dir_files(
        &opts,
        &[("app-secret", APP_SECRET), ("verify-token", VERIFY_TOKEN)],
    )
    .await;
    let app = env.start().await;
    env.sandbox.set_webhook(
        Some(format!("http://{}/webhook", app.webhook())),
        Some(APP_SECRET.into()),
    );

    // 1. End to end: every `sent` comes back as soon as the send is answered, racing the
    // job's own record; in the number's lane it waits for it, so none is lost.
    let ids: Vec<String> = (0..40).map(|i| format!("b-{i}")).collect();
    let jobs: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| template_job(id, &number(i)))
        .collect();
    env.publish(&jobs).await;
    env.final_outcomes(&ids, T).await;
    let outcomes = env.outcomes.clone();
    wait_for("delivered and read for every job", T, async || {
        ids.iter()
            .all(|id| delivery_statuses(&env, id).len() >= 2)
            .then_some(())
    })
    .await;
    for id in &ids {
        assert_eq!(
            delivery_statuses(&env, id),
            ["delivered", "read"],
            "{id}: each status once, in order"
        );
    }
    let m = app.metrics().await;
    let batched = metric_value(&m, "sendwell_webhook_batched_statuses_total");
    let batches = metric_value(&m, "sendwell_webhook_status_batches_total");
    assert!(
        batched >= 120.0,
        "the 120 statuses went in batches: {batched}"
    );
    assert!(
        batches < batched,
        "fewer broker messages ({batches}) than statuses ({batched})"
    );
    // No `sent` overtook its job's record (it would be taken for another sender's message).
    assert_eq!(
        metric_value(&m, "sendwell_webhook_unmatched_total"),
        0.0,
        "every status found its job"
    );

    // 2. A status that comes while its job is still at the API (Meta's `delivered` can beat
    // the answer) waits behind the job in its number's lane, and then finds it.
    env.sandbox.set_webhook(None, None);
    env.sandbox.set_latency(Duration::from_secs(2));
    env.publish(&[template_job("slow-1", &number(60))]).await;
    let sandbox = env.sandbox.clone();
    wait_for("slow-1 at the API", T, async || {
        sandbox
            .requests()
            .iter()
            .any(|r| r.callback_data.as_deref() == Some("slow-1"))
            .then_some(())
    })
    .await;
    let early = [("slow-1".to_string(), "wamid.early".to_string(), number(60))];
    assert_eq!(
        post_signed(&app, &statuses(&early, "delivered", 0)).await,
        200
    );
    env.final_outcomes(&["slow-1".to_string()], T).await;
    wait_for("slow-1 delivered", T, async || {
        (delivery_statuses(&env, "slow-1") == ["delivered"]).then_some(())
    })
    .await;
    env.sandbox.set_latency(Duration::from_millis(5));

    // 3. Statuses naming a shard whose queue is gone (a shard removed) are applied too.
    env.sandbox.set_webhook(None, None);
    let (late, sent) = send_and_wait(&env, "late", 50, 5).await;
    let batches_before = metric_value(
        &app.metrics().await,
        "sendwell_webhook_status_batches_total",
    );
    // Shard 7 has no queue: the batch goes on through the alternate exchange, `sendwell.jobs`,
    // to a live shard (here the only one), and is applied there.
    assert_eq!(
        post_signed(&app, &statuses(&sent, "delivered", 7)).await,
        200
    );
    wait_for("delivered for every late job", T, async || {
        late.iter()
            .all(|id| delivery_statuses(&env, id) == ["delivered"])
            .then_some(())
    })
    .await;
    assert_eq!(
        metric_value(
            &app.metrics().await,
            "sendwell_webhook_status_batches_total"
        ),
        batches_before + 1.0,
        "the five statuses went as one message"
    );

    // 4. The same statuses again, batched to shard 0 this time (Meta's retry), then a read
    // and its repeat: applied once each, whichever way they came; and a late `delivered`
    // after the read changes nothing.
    assert_eq!(
        post_signed(&app, &statuses(&sent, "delivered", 0)).await,
        200
    );
    assert_eq!(post_signed(&app, &statuses(&sent, "read", 0)).await, 200);
    assert_eq!(post_signed(&app, &statuses(&sent, "read", 0)).await, 200);
    assert_eq!(
        post_signed(&app, &statuses(&sent, "delivered", 0)).await,
        200
    );
    wait_for("read for every late job", T, async || {
        late.iter()
            .all(|id| delivery_statuses(&env, id).len() >= 2)
            .then_some(())
    })
    .await;
    // Sentinels: a job to each number, published after the repeats were answered 200, so it
    // comes after them in the shard's queue and runs after them in its number's lane. Once
    // its outcome is out, every repeat has been applied (or found applied).
    let after: Vec<String> = late.iter().map(|id| format!("{id}-after")).collect();
    let after_jobs: Vec<_> = after
        .iter()
        .enumerate()
        .map(|(i, id)| template_job(id, &number(50 + i)))
        .collect();
    env.publish(&after_jobs).await;
    env.final_outcomes(&after, T).await;
    for id in &late {
        assert_eq!(
            delivery_statuses(&env, id),
            ["delivered", "read"],
            "{id}: one delivered, one read, nothing after the read"
        );
    }

    // 5. One callback carrying a message's `delivered` and then its `read` (Meta batches a
    // message's statuses too under load), beside a status of another number: the two of one
    // number share its lane, so the second is applied after the first, never beside it.
    let (pair, sent) = send_and_wait(&env, "pair", 70, 3).await;
    let items: Vec<_> = sent
        .iter()
        .flat_map(|j| [(j, "delivered"), (j, "read")])
        .collect();
    assert_eq!(post_signed(&app, &statuses_each(&items, 0)).await, 200);
    wait_for("delivered and read for every pair job", T, async || {
        pair.iter()
            .all(|id| delivery_statuses(&env, id).len() >= 2)
            .then_some(())
    })
    .await;
    for id in &pair {
        assert_eq!(
            delivery_statuses(&env, id),
            ["delivered", "read"],
            "{id}: a batch's statuses of one number apply in their order"
        );
    }
    drop(outcomes);
    app.stop().await;
}
