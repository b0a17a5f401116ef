//! Webhooks: Meta's signed callbacks (fixtures under tests/fixtures/webhooks, shaped as Meta
//! documents them) through the real listener, the real broker and the daemon.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use lapin::ExchangeKind;
use sendwell::config::Secret;
use sendwell::webhook::signature::sign;
use sendwell::webhook::{BrokerSink, Listener, SinkLimits};

const T: Duration = Duration::from_secs(30);
const JOB1_TO: &str = "+491701234567";

/// A fixture with every `timestamp` and `entry[].time` set to now: a customer who just wrote,
/// or a second, later webhook with the same content.
fn fresh(name: &str) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&fixture(name)).unwrap();
    let now = jiff::Timestamp::now().as_second();
    fn walk(v: &mut serde_json::Value, now: i64) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    match k.as_str() {
                        "timestamp" => *x = now.to_string().into(),
                        "time" => *x = now.into(),
                        _ => walk(x, now),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| walk(x, now)),
            _ => {}
        }
    }
    walk(&mut v, now);
    serde_json::to_vec(&v).unwrap()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/webhooks/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

async fn post(app: &TestApp, body: &[u8], signature: Option<String>) -> u16 {
    let mut req = reqwest::Client::new()
        .post(format!("http://{}/webhook", app.webhook()))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(s) = signature {
        req = req.header("x-hub-signature-256", s);
    }
    req.send().await.unwrap().status().as_u16()
}

async fn post_signed(app: &TestApp, body: &[u8]) -> u16 {
    post(app, body, Some(sign(APP_SECRET.as_bytes(), body))).await
}

/// A daemon with its webhook listener, and job-1 (the fixtures' job) already sent.
async fn env_with_job1(max_body: usize) -> (TestEnv, TestApp) {
    let opts = AppOptions {
        extra_toml: webhook_toml(max_body),
        ..Default::default()
    };
    let env = TestEnv::with_dir_files(
        &opts,
        &[("app-secret", APP_SECRET), ("verify-token", VERIFY_TOKEN)],
    )
    .await;
    env.seed_consent(&[JOB1_TO.into(), "+491701234568".into()])
        .await;
    let app = env.start().await;
    env.publish(&[
        template_job("job-1", JOB1_TO),
        template_job("job-2", "+491701234568"),
    ])
    .await;
    env.final_outcomes(&["job-1".into(), "job-2".into()], T)
        .await;
    (env, app)
}

fn delivery_events(env: &TestEnv, id: &str) -> Vec<serde_json::Value> {
    env.outcomes
        .for_id(id)
        .into_iter()
        .filter(|e| {
            ["delivered", "read", "undelivered"].contains(&e["status"].as_str().unwrap_or(""))
        })
        .collect()
}

async fn wait_delivery(env: &TestEnv, id: &str, status: &str) -> serde_json::Value {
    let outcomes = env.outcomes.clone();
    wait_for(&format!("{status} for {id}"), T, async || {
        outcomes
            .for_id(id)
            .into_iter()
            .find(|e| e["status"] == status)
    })
    .await
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verification_handshake_echoes_the_challenge_only_for_the_right_token() {
    let (_env, app) = env_with_job1(1 << 20).await;
    let get = |q: String| {
        let url = format!("http://{}/webhook?{q}", app.webhook());
        async move {
            let r = reqwest::get(url).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let ok = get(format!(
        "hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=1158201444"
    ))
    .await;
    assert_eq!(ok, (200, "1158201444".to_string()));
    let wrong = get("hub.mode=subscribe&hub.verify_token=nope&hub.challenge=1".into()).await;
    assert_eq!(wrong.0, 403);
    let no_mode = get(format!("hub.verify_token={VERIFY_TOKEN}&hub.challenge=1")).await;
    assert_eq!(no_mode.0, 403);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_forged_oversized_and_malformed_callbacks_are_refused_and_change_nothing() {
    let (env, app) = env_with_job1(1 << 20).await;
    let delivered = fixture("status_delivered.json");
    // Forged: signed with another secret; missing: no header at all.
    assert_eq!(
        post(&app, &delivered, Some(sign(b"not-the-secret", &delivered))).await,
        401
    );
    assert_eq!(post(&app, &delivered, Some("sha256=00".into())).await, 401);
    assert_eq!(post(&app, &delivered, None).await, 401);
    // 2 MB against a 1 MiB limit.
    let big = vec![b' '; 2 * 1024 * 1024];
    assert_eq!(
        post(&app, &big, Some(sign(APP_SECRET.as_bytes(), &big))).await,
        413
    );
    // Signed but not a callback.
    assert_eq!(
        post_signed(
            &app,
            b"{\"object\": \"whatsapp_business_account\", \"entry\": ["
        )
        .await,
        400
    );
    assert_eq!(
        post_signed(&app, b"{\"object\": \"page\", \"entry\": []}").await,
        400
    );

    // A valid read afterwards is applied; nothing before it was.
    assert_eq!(post_signed(&app, &fixture("status_read.json")).await, 200);
    wait_delivery(&env, "job-1", "read").await;
    let events = delivery_events(&env, "job-1");
    let statuses: Vec<_> = events
        .iter()
        .map(|e| e["status"].as_str().unwrap().to_string())
        .collect();
    // read implies delivered: both are published, once each, from the one valid callback.
    assert_eq!(statuses, vec!["delivered", "read"], "{events:?}");
    let m = app.metrics().await;
    assert!(metric(&m, "sendwell_webhook_requests_total{result=\"forged\"}") >= 2.0);
    assert!(metric(&m, "sendwell_webhook_requests_total{result=\"unsigned\"}") >= 1.0);
    assert!(metric(&m, "sendwell_webhook_requests_total{result=\"malformed\"}") >= 2.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_become_delivery_outcomes_once_each_and_in_order() {
    let (env, app) = env_with_job1(1 << 20).await;
    for f in [
        "status_sent.json",
        "status_delivered.json",
        "status_delivered.json",
        "status_read.json",
        "status_delivered.json",
        // The sentinel: applied after every status before it, in job-1's lane.
        "status_failed_131049.json",
    ] {
        assert_eq!(post_signed(&app, &fixture(f)).await, 200, "{f}");
    }
    wait_delivery(&env, "job-1", "undelivered").await;
    let read = wait_delivery(&env, "job-1", "read").await;
    let events = delivery_events(&env, "job-1");
    let statuses: Vec<_> = events
        .iter()
        .map(|e| e["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        statuses,
        vec!["delivered", "read", "undelivered"],
        "the same callback twice is applied once; no going back"
    );
    assert_eq!(read["account"], "acme-de");
    assert_eq!(read["to"], JOB1_TO);
    assert_eq!(
        read["metadata"]["campaign"], "test",
        "the job's metadata is echoed"
    );
    assert_eq!(read["category"], "marketing");
    assert!(
        env.outcomes
            .all()
            .iter()
            .any(|s| s.routing_key == "delivery.read")
    );
    // The delivered event carries the billed cost (pricing on `delivered` in the fixture).
    let delivered = &events[0];
    assert_eq!(delivered["billed_cost"]["amount"], "0.1131", "{delivered}");
    assert_eq!(delivered["billed_cost"]["currency"], "EUR");
    // (The duplicates counter is process-wide here, shared with the other tests of this
    // binary; the events above show each repeat applied once. The billed-cost counter is checked end to end in tests/process.rs, where the daemon's
    // metrics are its own.)
    app.stop().await;
}

/// `delivery_events` without `read`: a read receipt is applied (the level reached, so a late
/// `delivered` changes nothing) but not published; a status repeated in other bytes (Meta's
/// timestamps differ) is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_receipts_left_out_of_delivery_events_are_applied_but_not_published() {
    let opts = AppOptions {
        extra_toml: webhook_toml(1 << 20).replacen(
            "[webhook]\n",
            "[webhook]\ndelivery_events = [\"delivered\", \"undelivered\"]\n",
            1,
        ),
        ..Default::default()
    };
    let env = TestEnv::with_dir_files(
        &opts,
        &[("app-secret", APP_SECRET), ("verify-token", VERIFY_TOKEN)],
    )
    .await;
    env.seed_consent(&[JOB1_TO.into()]).await;
    let app = env.start().await;
    env.publish(&[template_job("job-1", JOB1_TO)]).await;
    env.final_outcomes(&["job-1".into()], T).await;
    for body in [
        fixture("status_sent.json"),
        fresh("status_sent.json"),
        fixture("status_read.json"),
        fixture("status_delivered.json"),
        fresh("status_delivered.json"),
        // The sentinel: applied after every status before it, in job-1's lane.
        fixture("status_failed_131049.json"),
    ] {
        assert_eq!(post_signed(&app, &body).await, 200);
    }
    wait_delivery(&env, "job-1", "undelivered").await;
    let statuses: Vec<String> = delivery_events(&env, "job-1")
        .iter()
        .map(|e| e["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        statuses,
        vec!["delivered", "undelivered"],
        "read counts as delivered (published) and read (not published); the later delivered \
         changes nothing"
    );
    assert!(
        !env.outcomes
            .all()
            .iter()
            .any(|s| s.routing_key == "delivery.read")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_statuses_are_undelivered_with_the_code_and_131050_is_an_opt_out() {
    let (env, app) = env_with_job1(1 << 20).await;
    let (consent, _stop) = collect(
        &env.broker.url,
        "sendwell.consent",
        ExchangeKind::Fanout,
        "",
        "test.consent",
    )
    .await;
    assert_eq!(
        post_signed(&app, &fixture("status_failed_131049.json")).await,
        200
    );
    let u = wait_delivery(&env, "job-1", "undelivered").await;
    assert_eq!(u["error_code"], 131049);
    assert_eq!(u["reason"], "per_user_limit");
    assert!(
        env.outcomes
            .all()
            .iter()
            .any(|s| s.routing_key == "delivery.undelivered")
    );

    assert_eq!(
        post_signed(&app, &fixture("status_failed_131050.json")).await,
        200
    );
    let c = consent.clone();
    let ev = wait_for("an opt-out on sendwell.consent", T, async || {
        c.json().into_iter().next()
    })
    .await;
    assert_eq!(ev["type"], "opt_out");
    assert_eq!(ev["to"], JOB1_TO);
    assert_eq!(ev["account"], "acme-de");
    assert_eq!(ev["purposes"], serde_json::json!([]));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_for_an_unknown_message_is_taken_and_counted_but_changes_nothing() {
    let (env, app) = env_with_job1(1 << 20).await;
    let before = metric(&app.metrics().await, "sendwell_webhook_unmatched_total");
    assert_eq!(
        post_signed(&app, &fixture("status_unknown_wamid.json")).await,
        200
    );
    wait_for("the unmatched counter", T, async || {
        (metric(&app.metrics().await, "sendwell_webhook_unmatched_total") > before).then_some(())
    })
    .await;
    assert!(
        env.outcomes
            .json()
            .iter()
            .all(|e| e["status"] != "delivered" && e["status"] != "read")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_callback_updates_every_job_in_it() {
    let (env, app) = env_with_job1(1 << 20).await;
    assert_eq!(post_signed(&app, &fixture("status_batch.json")).await, 200);
    wait_delivery(&env, "job-1", "delivered").await;
    wait_delivery(&env, "job-2", "delivered").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_message_opens_the_service_window_for_text_jobs() {
    let (env, app) = env_with_job1(1 << 20).await;
    let text = |id: &str| {
        serde_json::json!({
            "id": id, "account": "acme-de", "to": JOB1_TO, "category": "service",
            "text": { "body": "Yes, it comes in blue." }
        })
    };
    // Nobody wrote yet: a free-form message would be refused by Meta (131047).
    env.publish(&[text("reply-early")]).await;
    let f = env.final_outcomes(&["reply-early".into()], T).await;
    assert_eq!(f["reply-early"][0]["status"], "failed");
    assert_eq!(f["reply-early"][0]["reason"], "outside_service_window");

    assert_eq!(
        post_signed(&app, &fresh("inbound_text_question.json")).await,
        200
    );
    let before = env.sandbox.accepted().len();
    // The inbound is applied in the customer's lane before this job, published after it.
    env.publish(&[text("reply-1")]).await;
    let f = env.final_outcomes(&["reply-1".into()], T).await;
    assert_eq!(f["reply-1"][0]["status"], "sent", "{:?}", f["reply-1"]);
    assert_eq!(env.sandbox.accepted().len(), before + 1);

    for fx in [
        "inbound_text.json",
        "inbound_button.json",
        "inbound_interactive_button_reply.json",
    ] {
        assert_eq!(post_signed(&app, &fixture(fx)).await, 200, "{fx}");
    }
    wait_for("inbound messages counted by type", T, async || {
        let m = app.metrics().await;
        (metric(
            &m,
            "sendwell_inbound_messages_total{account=\"acme-de\",type=\"button\"}",
        ) >= 1.0
            && metric(
                &m,
                "sendwell_inbound_messages_total{account=\"acme-de\",type=\"interactive\"}",
            ) >= 1.0
            && metric(
                &m,
                "sendwell_inbound_messages_total{account=\"acme-de\",type=\"text\"}",
            ) >= 2.0)
            .then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_template_holds_its_jobs_until_approved_or_fails_them_after_the_wait() {
    let (env, app) = env_with_job1(1 << 20).await;
    assert_eq!(
        post_signed(&app, &fixture("template_paused.json")).await,
        200
    );
    // Account-level events reach the shard through the fanout; wait until it is applied.
    wait_for("the template pause to be applied", T, async || {
        let m = app.metrics().await;
        (metric(
            &m,
            "sendwell_template_status_updates_total{template=\"spring_sale\"",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    env.publish(&[template_job("held-1", &number(30))]).await;
    let outcomes = env.outcomes.clone();
    // Deferred, not sent: the sandbox never sees it while paused.
    let metrics_show_deferral = wait_for("a template_paused deferral", T, async || {
        let m = app.metrics().await;
        (metric(
            &m,
            "sendwell_jobs_deferred_total{account=\"acme-de\",reason=\"template_paused\"}",
        ) >= 1.0)
            .then_some(m)
    })
    .await;
    assert!(!metrics_show_deferral.is_empty());
    assert_eq!(env.sandbox.accepted_count_for("held-1"), 0);
    assert!(!finals_by_id(&outcomes.json()).contains_key("held-1"));

    assert_eq!(
        post_signed(&app, &fixture("template_approved.json")).await,
        200
    );
    let f = env.final_outcomes(&["held-1".into()], T).await;
    assert_eq!(f["held-1"][0]["status"], "sent");

    // Paused again (a new webhook: a later entry time) and never approved: after
    // template_pause_max_wait (3 s here) jobs fail.
    assert_eq!(post_signed(&app, &fresh("template_paused.json")).await, 200);
    wait_for("the second pause", T, async || {
        let m = app.metrics().await;
        (metric(&m, "sendwell_template_status_updates_total{template=\"spring_sale\",language=\"de\",event=\"PAUSED\"}") >= 2.0).then_some(())
    })
    .await;
    env.publish(&[template_job("held-2", &number(31))]).await;
    let f = env.final_outcomes(&["held-2".into()], T).await;
    assert_eq!(f["held-2"][0]["status"], "failed");
    assert_eq!(f["held-2"][0]["reason"], "template_paused");
    assert_eq!(env.sandbox.accepted_count_for("held-2"), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_and_capability_updates_show_in_metrics_and_restrict_sends() {
    let (env, app) = env_with_job1(1 << 20).await;
    for f in [
        "template_rejected.json",
        "template_quality_yellow.json",
        "business_capability_update.json",
        "phone_number_quality_throughput_upgrade.json",
        "phone_number_quality_legacy_upgrade.json",
        "system_error_130429.json",
        "user_preferences_resume.json",
    ] {
        assert_eq!(post_signed(&app, &fixture(f)).await, 200, "{f}");
    }
    wait_for("capability, quality and error metrics", T, async || {
        let m = app.metrics().await;
        (metric(
            &m,
            "sendwell_account_throughput_messages_per_second{account=\"acme-de\"}",
        ) == 1000.0
            && metric(
                &m,
                "sendwell_template_quality_updates_total{score=\"YELLOW\"}",
            ) >= 1.0
            && metric(&m, "sendwell_webhook_errors_total{code=\"130429\"}") >= 1.0
            // The limits learn from them: the portfolio's tier, and the account steps down
            // from its 1000/s after Meta's 130429.
            && metric(&m, "sendwell_tier_limit_recipients{portfolio=\"waba-102290129340398\"}") == 10000.0
            && metric(
                &m,
                "sendwell_account_rate_messages_per_second{account=\"acme-de\"}",
            ) == 500.0
            && m.contains("sendwell_messaging_limit_recipients{waba=\"102290129340398\"}"))
        .then_some(())
    })
    .await;

    // Business-initiated messaging restricted: template jobs wait (deferred), nothing is sent.
    assert_eq!(
        post_signed(&app, &fixture("account_update_restriction.json")).await,
        200
    );
    wait_for("the restriction to be applied", T, async || {
        (metric(
            &app.metrics().await,
            "sendwell_account_updates_total{event=\"ACCOUNT_RESTRICTION\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    env.publish(&[template_job("restricted-1", &number(32))])
        .await;
    wait_for("an account_restricted deferral", T, async || {
        (metric(
            &app.metrics().await,
            "sendwell_jobs_deferred_total{account=\"acme-de\",reason=\"account_restricted\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(env.sandbox.accepted_count_for("restricted-1"), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marketing_stop_in_user_preferences_goes_to_consent_as_an_opt_out() {
    let (env, app) = env_with_job1(1 << 20).await;
    let (consent, _stop) = collect(
        &env.broker.url,
        "sendwell.consent",
        ExchangeKind::Fanout,
        "",
        "test.consent",
    )
    .await;
    assert_eq!(
        post_signed(&app, &fixture("user_preferences_stop.json")).await,
        200
    );
    let c = consent.clone();
    let ev = wait_for("an opt-out", T, async || c.json().into_iter().next()).await;
    assert_eq!(ev["type"], "opt_out");
    assert_eq!(ev["source"], "whatsapp_user_preferences");
    assert_eq!(ev["to"], JOB1_TO);
    app.stop().await;
}

/// A "broker" that accepts TCP and never answers, as a hung RabbitMQ (or a proxy in front of a
/// dead one) does: counts the connections it took and how many are still open.
struct HungBroker {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl HungBroker {
    async fn start() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, o) = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let o = o.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    // Reads what the client sends (the AMQP header) and never writes; the
                    // connection counts as open until the client closes it.
                    let mut buf = [0u8; 1024];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            accepted,
            open,
        }
    }
}

/// The webhook listener alone, storing into the broker at `broker_url`.
async fn webhook_listener(broker_url: String, limits: SinkLimits) -> std::net::SocketAddr {
    let listener = Arc::new(Listener {
        app_secret: Secret::new(APP_SECRET.into()),
        verify_token: Secret::new(VERIFY_TOKEN.into()),
        sink: BrokerSink::new(Secret::new(broker_url), limits),
        numbers: None,
    });
    let router = sendwell::webhook::router(listener, 3 * 1024 * 1024);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, router).await });
    addr
}

/// `n` signed callbacks at once, each on its own connection; their statuses.
async fn burst(webhook: std::net::SocketAddr, n: usize) -> Vec<u16> {
    let body = fresh("status_delivered.json");
    let signature = sign(APP_SECRET.as_bytes(), &body);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let calls = (0..n).map(|_| {
        client
            .post(format!("http://{webhook}/webhook"))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", &signature)
            .body(body.clone())
            .send()
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.map_or(0, |r| r.status().as_u16()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_hung_or_down_callbacks_get_a_fast_503_and_nothing_is_left_waiting() {
    let limits = SinkLimits {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        retry_max_delay: Duration::from_secs(30),
    };
    // Generous: the bound is what matters (before, they waited on the connect for ever); each
    // callback waits at most request_timeout (2 s) when the machine keeps up.
    let within = Duration::from_secs(30);

    let hung = HungBroker::start().await;
    let webhook = webhook_listener(format!("amqp://guest:guest@{}/%2f", hung.addr), limits).await;
    for wave in 0..2 {
        let statuses = tokio::time::timeout(within, burst(webhook, 200))
            .await
            .unwrap_or_else(|_| panic!("wave {wave}: callbacks still unanswered after {within:?}"));
        assert!(
            statuses.iter().all(|s| *s == 503),
            "wave {wave}: {statuses:?}"
        );
    }
    // One connect attempt at a time serves every callback that comes meanwhile, then a
    // backoff, not one attempt per callback (that would be 400). Usually 1 or 2: how many
    // depends on how spread out this machine delivers a burst, but the attempts (1 s each) and
    // the growing backoffs (from 0.2 s) leave room for at most 9 in the 60 s both waves may take.
    let accepted = hung.accepted.load(Ordering::SeqCst);
    eprintln!("{accepted} connect attempts for two bursts of 200 callbacks");
    assert!((1..=10).contains(&accepted), "{accepted} connect attempts");
    // ... and an abandoned attempt leaves no connection (nor lapin thread) behind.
    wait_for(
        "every abandoned connect attempt to be closed",
        Duration::from_secs(10),
        async || (hung.open.load(Ordering::SeqCst) == 0).then_some(()),
    )
    .await;

    // Nothing listening at all: the same.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let webhook =
        webhook_listener(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"), limits).await;
    let statuses = tokio::time::timeout(within, burst(webhook, 200))
        .await
        .expect("callbacks answered");
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
}

/// A TCP hop in front of the local RabbitMQ that first behaves like a hung broker (takes
/// connections, never answers) and forwards once `up` is set: a broker that comes back.
async fn broker_that_comes_back() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let is_up = up.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let up = is_up.load(Ordering::SeqCst);
            tokio::spawn(async move {
                if up {
                    let mut b = tokio::net::TcpStream::connect("127.0.0.1:5672")
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut b).await;
                } else {
                    use tokio::io::AsyncReadExt;
                    let mut buf = [0u8; 1024];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                }
            });
        }
    });
    (addr, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_refused_while_the_broker_hung_are_taken_again_once_it_is_back() {
    let broker = TestBroker::new().await;
    {
        let conn = lapin::Connection::connect(&broker.url, Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        sendwell::amqp::topology::declare(&ch, &sendwell::amqp::topology::Names::new(0))
            .await
            .unwrap();
        let _ = conn.close(200, "declared".into()).await;
    }
    let (hop, up) = broker_that_comes_back().await;
    let url = broker.url.replace("127.0.0.1:5672", &hop.to_string());
    let limits = SinkLimits {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(1),
        retry_max_delay: Duration::from_secs(2),
    };
    let webhook = webhook_listener(url, limits).await;
    let statuses = burst(webhook, 20).await;
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");

    up.store(true, Ordering::SeqCst);
    // Within a few backoffs (at most 2 s each), the same listener stores callbacks again.
    wait_for(
        "a callback to be taken after the broker came back",
        Duration::from_secs(30),
        async || (burst(webhook, 1).await == [200]).then_some(()),
    )
    .await;
    let statuses = burst(webhook, 20).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    wait_for(
        "the events to be in the shard queue",
        Duration::from_secs(20),
        async || {
            let q = broker.queue_info("sendwell.jobs.0").await?;
            (q["messages"].as_u64()? >= 21).then_some(())
        },
    )
    .await;
}
