//! Steady state writes no log line per webhook event or request (issue 19): a thousand of each
//! kind that the daemon only takes note of (a status for a wamid it does not know, a billed
//! status whose category has no price, a customer's message, a preference other than a
//! marketing stop, a callback with a forged signature) are counted one by one in the metrics,
//! and logged once per key an hour; so are a thousand jobs that end suppressed (no consent). The daemon runs in this process; its log is the
//! subscriber `sendwell run` installs, with the default filter (`info`), writing into a buffer
//! (one test in this binary: the subscriber is the process's).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use sendwell::webhook::signature::sign;

/// Events of each kind in the steady state.
const EVENTS: usize = 1000;
/// Jobs sent first; Meta bills each twice (`pricing` on `sent` and on `delivered`).
const JOBS: usize = EVENTS / 2;
/// Statuses or messages per callback: Meta batches them.
const PER_CALLBACK: usize = 50;
/// What "a handful" of lines is: one per key is six here.
const HANDFUL: usize = 7;
const T: Duration = Duration::from_secs(180);

/// The daemon's log: every line it writes, in order.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// One callback of the test account's WABA: `value` (statuses, messages, …) under `field`.
fn envelope(field: &str, value: serde_json::Value) -> Vec<u8> {
    let mut value = value;
    value["messaging_product"] = "whatsapp".into();
    value["metadata"] = serde_json::json!({
        "display_phone_number": "15550783881",
        "phone_number_id": "106540352242922"
    });
    serde_json::to_vec(&serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": "102290129340398",
            "changes": [{ "value": value, "field": field }]
        }]
    }))
    .unwrap()
}

/// Posts `body` signed with `secret`; the answer's status.
async fn post(client: &reqwest::Client, app: &TestApp, body: Vec<u8>, secret: &str) -> u16 {
    let signature = sign(secret.as_bytes(), &body);
    client
        .post(format!("http://{}/webhook", app.webhook()))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", signature)
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Posts `items` under `key` (`statuses`, `messages`, `user_preferences`) of `field`,
/// PER_CALLBACK to a signed callback.
async fn post_batches(app: &TestApp, field: &str, key: &str, items: Vec<serde_json::Value>) {
    let client = reqwest::Client::new();
    for chunk in items.chunks(PER_CALLBACK) {
        let body = envelope(field, serde_json::json!({ key: chunk }));
        assert_eq!(post(&client, app, body, APP_SECRET).await, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_unmatched_unpriced_and_inbound_events_log_a_handful_of_lines_and_count_each() {
    let log = Captured::default();
    let writer = log.clone();
    // Before the env, which would install SENDWELL_TEST_LOG's subscriber.
    tracing::subscriber::set_global_default(sendwell::logging::subscriber(
        // `log.filter`'s default, as in config/sendwell.toml.
        tracing_subscriber::EnvFilter::new("info"),
        sendwell::config::LogFormat::Text,
        false,
        false,
        move || writer.clone(),
    ))
    .expect("the only subscriber of this test binary");
    let env = env_with_webhook_and_prices(RELAXED_LIMITS.into(), 0..JOBS + 1).await;
    let app = env.start().await;

    // One more than the unpriced statuses need: the last takes the warm-up status below (a
    // second `sent` for one message would be a repeat, applied once).
    let ids: Vec<String> = (0..=JOBS).map(|i| format!("quiet-{i}")).collect();
    let jobs: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| template_job(id, &number(i)))
        .collect();
    env.publish(&jobs).await;
    let finals = env.final_outcomes(&ids, T).await;
    let mut sent: Vec<(String, String, String)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let e = &finals[id][0];
            assert_eq!(e["status"], "sent", "{e}");
            let wamid = e["wamid"].as_str().unwrap().to_string();
            (
                id.clone(),
                wamid,
                number(i).trim_start_matches('+').to_string(),
            )
        })
        .collect();

    let now = jiff::Timestamp::now().as_second().to_string();
    // The listener connects to the broker at its first callback (a line, once): a status
    // that changes nothing and logs nothing takes that first.
    let (id, wamid, digits) = &sent.pop().unwrap();
    post_batches(
        &app,
        "messages",
        "statuses",
        vec![serde_json::json!({
            "id": wamid, "status": "sent", "timestamp": now, "recipient_id": digits,
            "biz_opaque_callback_data": id,
        })],
    )
    .await;
    let admin = app.admin();
    wait_for("the first status applied", T, async || {
        let m = scrape(admin).await?;
        (metric_value(&m, "sendwell_delivery_statuses_total") >= 1.0).then_some(())
    })
    .await;

    // The steady state: from here on, every line counts.
    let before = log.lines().len();
    // Statuses for messages sendwell never sent (another sender on the number, or a job
    // whose ledger entry is past retention), from customers it knows.
    let unknown = (0..EVENTS)
        .map(|i| {
            serde_json::json!({
                "id": format!("wamid.quiet-unknown-{i}"),
                "status": "delivered",
                "timestamp": now,
                "recipient_id": number(i % JOBS).trim_start_matches('+'),
            })
        })
        .collect();
    // Billed in a category the price table does not list (marketing_lite): `pricing` on
    // `sent` and on `delivered`, as Meta sends it.
    let unpriced = ["sent", "delivered"]
        .into_iter()
        .flat_map(|status| {
            let now = &now;
            sent.iter().map(move |(id, wamid, digits)| {
                serde_json::json!({
                    "id": wamid,
                    "status": status,
                    "timestamp": now,
                    "recipient_id": digits,
                    "biz_opaque_callback_data": id,
                    "pricing": {
                        "billable": true,
                        "pricing_model": "PMP",
                        "type": "regular",
                        "category": "marketing_lite"
                    }
                })
            })
        })
        .collect();
    // Customers writing (no keyword: nothing for consent to do).
    let inbound = (0..EVENTS)
        .map(|i| {
            serde_json::json!({
                "from": number(i % JOBS).trim_start_matches('+'),
                "id": format!("wamid.quiet-inbound-{i}"),
                "timestamp": now,
                "type": "text",
                "text": { "body": format!("Hello, question number {i}") }
            })
        })
        .collect();
    // A customer allowing marketing again: sendwell waits for an opt-in of its own.
    let resumed = (0..EVENTS)
        .map(|i| {
            serde_json::json!({
                "wa_id": number(i % JOBS).trim_start_matches('+'),
                "detail": "User requested to resume marketing messages",
                "category": "marketing_messages",
                "value": "resume",
                "timestamp": now.parse::<i64>().unwrap() + i as i64,
            })
        })
        .collect();
    post_batches(&app, "messages", "statuses", unknown).await;
    post_batches(&app, "messages", "statuses", unpriced).await;
    post_batches(&app, "messages", "messages", inbound).await;
    post_batches(&app, "user_preferences", "user_preferences", resumed).await;
    // Someone who found the URL, without the app secret.
    let client = reqwest::Client::new();
    for i in 0..EVENTS {
        let body = envelope("messages", serde_json::json!({ "statuses": [{ "id": i }] }));
        assert_eq!(post(&client, &app, body, "not-the-app-secret").await, 401);
    }

    // Jobs for customers who never consented: each ends `suppressed.no_consent`, an outcome
    // a campaign can have thousands of a second.
    let unasked: Vec<String> = (0..EVENTS).map(|i| format!("quiet-unasked-{i}")).collect();
    let jobs: Vec<_> = unasked
        .iter()
        .enumerate()
        .map(|(i, id)| template_job(id, &number(JOBS + 1 + i)))
        .collect();
    env.publish(&jobs).await;
    let finals = env.final_outcomes(&unasked, T).await;
    for id in &unasked {
        let e = &finals[id][0];
        assert_eq!(
            (&e["status"], &e["reason"]),
            (&"suppressed".into(), &"no_consent".into()),
            "{e}"
        );
    }

    let counted = [
        r#"sendwell_webhook_unmatched_total{why="unknown_message"}"#,
        r#"sendwell_prices_missing_total{category="marketing_lite",market="germany"}"#,
        r#"sendwell_inbound_messages_total{account="acme-de",type="text"}"#,
        r#"sendwell_webhook_unmatched_total{why="preference_not_stop"}"#,
        r#"sendwell_webhook_requests_total{result="forged"}"#,
    ];
    wait_for("every event counted", T, async || {
        let m = scrape(admin).await?;
        counted
            .iter()
            .all(|c| metric_value(&m, c) >= EVENTS as f64)
            .then_some(())
    })
    .await;
    let m = app.metrics().await;
    for c in counted {
        assert_eq!(metric_value(&m, c), EVENTS as f64, "{c}: each event once");
    }

    let lines = log.lines()[before..].to_vec();
    assert!(
        lines.len() <= HANDFUL,
        "{} lines logged for {} events in steady state (at most {HANDFUL} expected: one per key an hour); by message:\n{}",
        lines.len(),
        (counted.len() + 1) * EVENTS,
        by_message(&lines)
    );
    // One line per key says that it happens.
    for said in [
        "A status callback for a message sendwell does not know was ignored",
        "has no price in the table for its market",
        "Inbound message received",
        "A user preference change other than a marketing stop was noted",
        "Webhook refused: signature not valid",
        "Job finished (a job other than sent is logged once an hour",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(said)),
            "no line says {said:?}: {lines:#?}"
        );
    }
    app.stop().await;
}

/// How many lines said each message (the text after the time, up to the message's first
/// full stop), most first: what a failure shows.
fn by_message(lines: &[String]) -> String {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for l in lines {
        let text = l
            .split_once(' ')
            .map_or(l.as_str(), |(_, rest)| rest.trim_start());
        let message = text.split_once(". ").map_or(text, |(m, _)| m);
        *counts.entry(message).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    counts
        .iter()
        .map(|(m, n)| format!("{n:>6} × {m}"))
        .collect::<Vec<_>>()
        .join("\n")
}
