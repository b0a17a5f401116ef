//! Trust and truth at the edges (issue 15): who may speak for sendwell on the broker, a broken
//! copy of a job's id, a job routed by the wrong key. Real RabbitMQ, the sandbox, a vhost per
//! test.

mod common;

use std::time::Duration;

use common::*;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

const T: Duration = Duration::from_secs(30);

fn with_kind(kind: &str) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert(
        ShortString::from("x-sendwell-kind"),
        AMQPValue::LongString(LongString::from(kind)),
    );
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(h)
}

fn consent_event(kind: &str, to: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "type": kind, "account": "acme-de", "to": to, "purposes": ["newsletter"],
        "source": "forged", "at": jiff::Timestamp::now().to_string(),
    }))
    .unwrap()
}

/// One `messages` change of a callback, as the listener publishes it to the number's shard.
fn webhook_event(value: serde_json::Value) -> Vec<u8> {
    let body = serde_json::to_vec(&serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "102290129340398", "time": jiff::Timestamp::now().as_second(),
                    "changes": [{ "field": "messages", "value": value }] }]
    }))
    .unwrap();
    let events = sendwell::webhook::parse::split(&body).unwrap();
    assert_eq!(events.len(), 1);
    serde_json::to_vec(&events[0]).unwrap()
}

fn metadata() -> serde_json::Value {
    serde_json::json!({ "display_phone_number": "15550001111", "phone_number_id": "106540352242922" })
}

fn inbound_yes(from_digits: &str) -> Vec<u8> {
    webhook_event(serde_json::json!({
        "messaging_product": "whatsapp", "metadata": metadata(),
        "contacts": [{ "profile": { "name": "Kunde" }, "wa_id": from_digits }],
        "messages": [{ "from": from_digits, "id": format!("wamid.in-{}", uuid::Uuid::new_v4().simple()),
                       "timestamp": jiff::Timestamp::now().as_second().to_string(),
                       "type": "text", "text": { "body": "YES" } }]
    }))
}

fn read_status(recipient_digits: &str, wamid: &str, job_id: &str) -> Vec<u8> {
    webhook_event(serde_json::json!({
        "messaging_product": "whatsapp", "metadata": metadata(),
        "statuses": [{ "id": wamid, "status": "read",
                       "timestamp": jiff::Timestamp::now().as_second().to_string(),
                       "recipient_id": recipient_digits, "biz_opaque_callback_data": job_id }]
    }))
}

fn dead_with_reason(env: &TestEnv, code: &str) -> usize {
    env.dead
        .all()
        .iter()
        .filter(|d| d.headers.get("x-sendwell-reason-code").map(String::as_str) == Some(code))
        .count()
}

async fn final_of(env: &TestEnv, id: &str) -> serde_json::Value {
    let by_id = env.final_outcomes(&[id.to_string()], T).await;
    assert_eq!(
        by_id[id].len(),
        1,
        "one final outcome for {id}: {:?}",
        by_id[id]
    );
    by_id[id][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_count_only_when_the_broker_vouches_for_sendwell() {
    let env = env_with_webhook_and_prices(RELAXED_LIMITS.into(), 0..2).await;
    let app = env.start().await;
    let ledger = app.app.as_ref().unwrap().ledger.clone();

    // A job really sent, for a status about it.
    let sent_to = number(1);
    env.publish(&[template_job("e1-sent", &sent_to)]).await;
    let sent = final_of(&env, "e1-sent").await;
    assert_eq!(sent["status"], "sent");
    let wamid = sent["wamid"].as_str().unwrap().to_string();

    // An upstream publisher that may write to sendwell.jobs only, as docs/operations.md sets
    // one up, dressing its messages as sendwell's own.
    let fresh = number(3001);
    let digits = fresh.trim_start_matches('+').to_string();
    let sent_digits = sent_to.trim_start_matches('+').to_string();
    let forgeries: Vec<(String, Vec<u8>, &str)> = vec![
        (
            digits.clone(),
            consent_event("opt_in", &fresh),
            "consent_question",
        ),
        (
            digits.clone(),
            consent_event("confirm", &fresh),
            "consent_question",
        ),
        (digits.clone(), inbound_yes(&digits), "webhook"),
        (
            sent_digits.clone(),
            read_status(&sent_digits, &wamid, "e1-sent"),
            "webhook",
        ),
        // A batch of statuses, as the listener sends one to the shard that sent them.
        (
            sent_digits.clone(),
            [
                b"[".as_slice(),
                &read_status(&sent_digits, &wamid, "e1-sent"),
                b"]",
            ]
            .concat(),
            "status_batch",
        ),
    ];
    let upstream = env.broker.user_who_may_write("^sendwell\\.jobs$").await;
    for (key, body, kind) in &forgeries {
        publish_with(&upstream, "sendwell.jobs", key, body, with_kind(kind)).await;
    }
    // A plain job header (x-sendwell-attempts) on a job: refused too, nothing sent.
    let mut h = FieldTable::default();
    h.insert(
        ShortString::from("x-sendwell-attempts"),
        AMQPValue::LongLongInt(1),
    );
    let job = template_job("e1-attempts", &number(0));
    publish_with(
        &upstream,
        "sendwell.jobs",
        number(0).trim_start_matches('+'),
        &serde_json::to_vec(&job).unwrap(),
        BasicProperties::default().with_headers(h),
    )
    .await;

    let dead = env.dead.clone();
    wait_for("six forged messages dead-lettered", T, async || {
        (dead
            .all()
            .iter()
            .filter(|d| {
                d.headers.get("x-sendwell-reason-code").map(String::as_str)
                    == Some("forged_control")
            })
            .count()
            >= 6)
            .then_some(())
    })
    .await;
    let refused = final_of(&env, "e1-attempts").await;
    assert_eq!(
        (refused["status"].as_str(), refused["reason"].as_str()),
        (Some("invalid"), Some("forged_control"))
    );
    assert_eq!(env.sandbox.accepted_count_for("e1-attempts"), 0);

    // Nothing changed: no consent, the next marketing job is suppressed, no read event.
    assert_eq!(consent_flags(&ledger, &fresh, "newsletter").await, None);
    env.publish(&[template_job("e1-after-forgery", &fresh)])
        .await;
    let after = final_of(&env, "e1-after-forgery").await;
    assert_eq!(
        (after["status"].as_str(), after["reason"].as_str()),
        (Some("suppressed"), Some("no_consent")),
        "{after}"
    );
    assert!(
        !env.outcomes
            .for_id("e1-sent")
            .iter()
            .any(|e| e["status"] == "read"),
        "a forged read status published a read event"
    );

    // The same messages from sendwell's own broker user (the validated user_id) do work.
    for (key, body, kind) in &forgeries {
        let own = with_kind(kind).with_user_id("guest".into());
        publish_with(&env.broker.url, "sendwell.jobs", key, body, own).await;
    }
    wait_for("the consent applied", T, async || {
        consent_flags(&ledger, &fresh, "newsletter").await
    })
    .await;
    let outcomes = env.outcomes.clone();
    wait_for("the read event", T, async || {
        outcomes
            .for_id("e1-sent")
            .iter()
            .any(|e| e["status"] == "read")
            .then_some(())
    })
    .await;
    env.publish(&[template_job("e1-after-own", &fresh)]).await;
    assert_eq!(final_of(&env, "e1-after-own").await["status"], "sent");
    assert_eq!(dead_with_reason(&env, "forged_control"), 6);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_consent_import_is_refused() {
    let env = env_with_webhook_and_prices(RELAXED_LIMITS.into(), 0..0).await;
    let app = env.start().await;
    let ledger = app.app.as_ref().unwrap().ledger.clone();
    let fresh = number(3002);
    // Upstream consent capture may publish consent events, but not as `sendwell consent import`.
    let upstream = env.broker.user_who_may_write("^sendwell\\.consent$").await;
    let mut h = FieldTable::default();
    h.insert(
        ShortString::from("x-sendwell-origin"),
        AMQPValue::LongString(LongString::from("consent_import")),
    );
    let props = BasicProperties::default().with_headers(h);
    for kind in ["opt_in", "confirm"] {
        publish_with(
            &upstream,
            "sendwell.consent",
            "",
            &consent_event(kind, &fresh),
            props.clone(),
        )
        .await;
    }
    let dead = env.dead.clone();
    wait_for("two forged imports dead-lettered", T, async || {
        (dead
            .all()
            .iter()
            .filter(|d| {
                d.headers.get("x-sendwell-reason-code").map(String::as_str)
                    == Some("forged_control")
            })
            .count()
            == 2)
            .then_some(())
    })
    .await;
    assert_eq!(consent_flags(&ledger, &fresh, "newsletter").await, None);
    // Without the claim, the same user's events are ordinary consent events.
    for kind in ["opt_in", "confirm"] {
        publish_with(
            &upstream,
            "sendwell.consent",
            "",
            &consent_event(kind, &fresh),
            BasicProperties::default(),
        )
        .await;
    }
    wait_for("the consent applied", T, async || {
        consent_flags(&ledger, &fresh, "newsletter").await
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_copy_does_not_take_the_id_of_a_job_waiting_for_its_time() {
    let env = TestEnv::new(&AppOptions {
        consented: 0..30,
        ..AppOptions::default()
    })
    .await;
    let app = env.start().await;
    let to = number(2);
    let key = to.trim_start_matches('+');
    let mut job = template_job("e7-x", &to);
    job["not_before"] = (jiff::Timestamp::now() + Duration::from_secs(4))
        .to_string()
        .into();
    env.publish(&[job]).await;
    // The job has been taken and sent to wait in a delay queue.
    let broker = &env.broker;
    wait_for("the job taken off the shard queue", T, async || {
        broker.drained("sendwell.jobs.0").then_some(())
    })
    .await;
    env.publish_raw(key, br#"{"id":"e7-x","oops":1}"#).await;
    let x = final_of(&env, "e7-x").await;
    assert_eq!(x["status"], "sent", "{x}");
    assert_eq!(env.sandbox.accepted_count_for("e7-x"), 1);
    let dead = env.dead.clone();
    wait_for("the broken copy dead-lettered", T, async || {
        dead.all()
            .iter()
            .any(|d| d.body == br#"{"id":"e7-x","oops":1}"#)
            .then_some(())
    })
    .await;

    // Back to back: each job, then a broken copy of its id right behind it.
    let ids: Vec<String> = (0..20).map(|i| format!("e7-pair-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let to = number(10 + i);
        env.publish(&[template_job(id, &to)]).await;
        let broken = format!(r#"{{"id":"{id}","oops":1}}"#);
        env.publish_raw(to.trim_start_matches('+'), broken.as_bytes())
            .await;
    }
    let by_id = env.final_outcomes(&ids, T).await;
    for id in &ids {
        let finals: Vec<&str> = by_id[id]
            .iter()
            .map(|e| e["status"].as_str().unwrap())
            .collect();
        assert_eq!(finals, ["sent"], "{id}");
        assert_eq!(env.sandbox.accepted_count_for(id), 1, "{id}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_published_with_another_key_is_sent_once_on_its_recipients_shard() {
    let env = TestEnv::new(&AppOptions {
        consented: 0..60,
        ..AppOptions::default()
    })
    .await;
    // A second instance on shard 1, sharing the broker, with its own state.
    let numbers: Vec<String> = (0..60).map(number).collect();
    let app = env.start().await;
    let (app2, _dir2) = env.start_instance(1, "", &numbers).await;

    // Each job twice: with its recipient's digits, and with another number's, which the
    // hash ring puts on the other shard about half the time.
    let ids: Vec<String> = (0..20).map(|i| format!("e8-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let job = template_job(id, &number(i));
        env.publish(std::slice::from_ref(&job)).await;
        let wrong = number(40 + i);
        env.publish_raw(
            wrong.trim_start_matches('+'),
            &serde_json::to_vec(&job).unwrap(),
        )
        .await;
        // A broken copy of the id, its recipient readable, on the wrong key too: it must not
        // answer `invalid` for the id on a shard whose ledger does not know it.
        let broken = serde_json::json!({ "id": id, "to": number(i), "oops": 1 });
        env.publish_raw(
            wrong.trim_start_matches('+'),
            &serde_json::to_vec(&broken).unwrap(),
        )
        .await;
    }
    let by_id = env.final_outcomes(&ids, T).await;
    let outcomes = env.outcomes.clone();
    let ids_ref = &ids;
    wait_for("a duplicate answer for every second copy", T, async || {
        let dups = outcomes
            .json()
            .iter()
            .filter(|e| e["status"] == "duplicate")
            .filter(|e| ids_ref.iter().any(|i| e["id"] == i.as_str()))
            .count();
        (dups >= ids_ref.len()).then_some(())
    })
    .await;
    for id in &ids {
        assert_eq!(by_id[id].len(), 1, "{id}: {:?}", by_id[id]);
        assert_eq!(by_id[id][0]["status"], "sent", "{id}");
        assert_eq!(env.sandbox.accepted_count_for(id), 1, "{id} sent twice");
    }
    let dead = env.dead.clone();
    wait_for("the broken copies dead-lettered", T, async || {
        (dead
            .json()
            .iter()
            .filter(|b| b.get("oops").is_some())
            .count()
            >= ids_ref.len())
        .then_some(())
    })
    .await;
    let finals = finals_by_id(&env.outcomes.json());
    for id in &ids {
        assert_eq!(finals[id].len(), 1, "{id}: {:?}", finals[id]);
    }
    let rerouted = metric_value(&app.metrics().await, "sendwell_jobs_rerouted_total");
    assert!(rerouted >= 40.0, "{rerouted}");
    app2.stop().await;
    app.stop().await;
}

fn delivered_status(recipient_digits: &str, wamid: &str, job_id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "102290129340398", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp", "metadata": metadata(),
            "statuses": [{ "id": wamid, "status": "delivered",
                           "timestamp": jiff::Timestamp::now().as_second().to_string(),
                           "recipient_id": recipient_digits, "biz_opaque_callback_data": job_id }]
        }}]}]
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_update_refused_by_the_broker_is_published_when_its_callback_comes_back() {
    let env = env_with_webhook_and_prices(RELAXED_LIMITS.into(), 0..2).await;
    // A queue of the test's own for delivery updates, which refuses every message (the
    // publisher gets a basic.nack) while this policy is in force.
    let refuse = serde_json::json!({
        "pattern": "^test\\.delivery$", "apply-to": "queues",
        "definition": { "max-length": 0, "overflow": "reject-publish" }
    });
    env.broker.set_policy("refuse-delivery", refuse).await;
    let (deliveries, stop) =
        classic_collector(&env.broker.url, "delivery.#", "test.delivery").await;
    let app = env.start().await;
    let to = number(1);
    env.publish(&[template_job("e4-job", &to)]).await;
    let sent = final_of(&env, "e4-job").await;
    let wamid = sent["wamid"].as_str().unwrap().to_string();

    let reconnects_before = metric_value(&app.metrics().await, "sendwell_broker_reconnects_total");
    let body = delivered_status(to.trim_start_matches('+'), &wamid, "e4-job");
    let status = reqwest::Client::new()
        .post(format!("http://{}/webhook", app.webhook()))
        .header("content-type", "application/json")
        .header(
            "x-hub-signature-256",
            sendwell::webhook::signature::sign(APP_SECRET.as_bytes(), &body),
        )
        .body(body)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    // The delivered event's publish was refused: the consumer reconnects, so the broker gives
    // the callback back.
    let admin = app.admin();
    wait_for("the refused publish to end a session", T, async || {
        let m = scrape(admin).await?;
        (metric_value(&m, "sendwell_broker_reconnects_total") > reconnects_before).then_some(())
    })
    .await;
    assert!(
        deliveries.lock().unwrap().is_empty(),
        "nothing got through the policy"
    );
    env.broker.delete_policy("refuse-delivery").await;
    let seen = deliveries.clone();
    wait_for("the delivered event", T, async || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|e| e["id"] == "e4-job" && e["status"] == "delivered")
            .then_some(())
    })
    .await;
    let delivered = deliveries.lock().unwrap().clone();
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    stop.cancel();
    app.stop().await;
}

/// Every message routed to a classic queue of the test's own (a classic queue refuses at once
/// when a max-length policy says so; a quorum queue lets the first message over the limit in).
async fn classic_collector(
    url: &str,
    key: &str,
    queue: &str,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    tokio_util::sync::CancellationToken,
) {
    use futures_util::StreamExt;
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "sendwell.outcomes".into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.into(),
        "sendwell.outcomes".into(),
        key.into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "collector".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let (s, st) = (seen.clone(), stop.clone());
    tokio::spawn(async move {
        let _conn = conn;
        loop {
            tokio::select! {
                _ = st.cancelled() => return,
                d = consumer.next() => match d {
                    Some(Ok(d)) => s.lock().unwrap().push(
                        serde_json::from_slice(&d.data).unwrap_or(serde_json::Value::Null),
                    ),
                    _ => return,
                },
            }
        }
    });
    (seen, stop)
}
