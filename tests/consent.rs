//! Consent through the real broker and the sandbox: every marketing and utility job passes the
//! consent rule; opt-ins, confirmations, opt-outs and erasures arrive on `sendwell.consent`;
//! STOP and YES arrive as signed webhooks.

mod common;

use std::time::Duration;

use common::*;
use sendwell::consent::model::{CONFIRMED, OPTED_IN, OPTED_OUT};
use sendwell::sandbox::InboundBody;
use sendwell::store::Table;

const T: Duration = Duration::from_secs(30);

/// Numbers no test env seeds (the default seed is number(0..4000)).
fn fresh_number(n: usize) -> String {
    number(50_000 + n)
}

fn consent(kind: &str, to: &str, purposes: &[&str], at: jiff::Timestamp) -> serde_json::Value {
    serde_json::json!({
        "type": kind, "account": "acme-de", "to": to, "purposes": purposes,
        "source": "website_form", "at": at.to_string(),
        "evidence": "Checkbox 'WhatsApp-Newsletter' ticked, IP 203.0.113.7",
    })
}

fn job(id: &str, to: &str, category: &str) -> serde_json::Value {
    let mut j = template_job(id, to);
    j["category"] = category.into();
    if category == "authentication" || category == "service" {
        j.as_object_mut().unwrap().remove("purpose");
    }
    j
}

async fn outcome(env: &TestEnv, id: &str) -> serde_json::Value {
    env.final_outcomes(&[id.to_string()], T).await[id][0].clone()
}

/// Waits until the daemon's store says `flags` for the number's `newsletter` consent.
async fn wait_flags(ledger: &sendwell::store::Ledger, to: &str, want: Option<u8>) {
    wait_for(&format!("consent flags {want:?}"), T, async || {
        (consent_flags(ledger, to, "newsletter").await == want).then_some(())
    })
    .await;
}

async fn history_len(ledger: &sendwell::store::Ledger, to: &str) -> usize {
    let mut prefix = to.trim_start_matches('+').as_bytes().to_vec();
    prefix.push(0);
    ledger
        .kv_scan_prefix(Table::ConsentHistory, &prefix)
        .await
        .unwrap()
        .len()
}

fn no_seed() -> AppOptions {
    AppOptions {
        consented: 0..0,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_needs_the_consent_its_purpose_and_category_demand() {
    let env = TestEnv::new(&no_seed()).await;
    let app = env.start().await;
    let ledger = app.app.as_ref().unwrap().ledger.clone();
    let (stranger, b) = (fresh_number(1), fresh_number(2));

    // An unknown number has no consent; authentication needs none.
    env.publish(&[
        job("stranger-mkt", &stranger, "marketing"),
        job("stranger-otp", &stranger, "authentication"),
    ])
    .await;
    let o = outcome(&env, "stranger-mkt").await;
    assert_eq!(
        (o["status"].as_str(), o["reason"].as_str()),
        (Some("suppressed"), Some("no_consent"))
    );
    assert_eq!(outcome(&env, "stranger-otp").await["status"], "sent");
    assert_eq!(env.sandbox.accepted_count_for("stranger-mkt"), 0);

    // Opt-in only: enough for utility, not for marketing (double opt-in).
    let t0 = jiff::Timestamp::now() - Duration::from_secs(600);
    env.publish_consent(&[consent("opt_in", &b, &["newsletter"], t0)])
        .await;
    wait_flags(&ledger, &b, Some(OPTED_IN)).await;
    env.publish(&[
        job("b-mkt-1", &b, "marketing"),
        job("b-util", &b, "utility"),
    ])
    .await;
    let o = outcome(&env, "b-mkt-1").await;
    assert_eq!(o["reason"], "no_consent");
    assert!(
        o["detail"].as_str().unwrap().contains("not confirmed"),
        "{o}"
    );
    assert_eq!(outcome(&env, "b-util").await["status"], "sent");

    // Confirmed: marketing goes, but only to the segment it names.
    env.publish_consent(&[consent("confirm", &b, &[], t0 + Duration::from_secs(60))])
        .await;
    wait_flags(&ledger, &b, Some(OPTED_IN | CONFIRMED)).await;
    let mut from_store = job("b-mkt-store", &b, "marketing");
    from_store["opt_in_sources"] = serde_json::json!(["in_store_tablet"]);
    let mut from_web = job("b-mkt-web", &b, "marketing");
    from_web["opt_in_sources"] = serde_json::json!(["in_store_tablet", "website_form"]);
    env.publish(&[job("b-mkt-2", &b, "marketing"), from_store, from_web])
        .await;
    assert_eq!(outcome(&env, "b-mkt-2").await["status"], "sent");
    assert_eq!(outcome(&env, "b-mkt-store").await["reason"], "no_consent");
    assert_eq!(outcome(&env, "b-mkt-web").await["status"], "sent");

    // An opt-out of everything; an older opt-in arriving late does not undo it, and a replay
    // of the opt-out changes nothing.
    let out = consent("opt_out", &b, &[], t0 + Duration::from_secs(120));
    env.publish_consent(std::slice::from_ref(&out)).await;
    wait_flags(&ledger, &b, Some(OPTED_OUT)).await;
    let before = history_len(&ledger, &b).await;
    env.publish_consent(&[
        consent("opt_in", &b, &["newsletter"], t0 + Duration::from_secs(90)),
        out,
    ])
    .await;
    wait_for("the late opt-in to be recorded", T, async || {
        (history_len(&ledger, &b).await == before + 1).then_some(())
    })
    .await;
    assert_eq!(
        consent_flags(&ledger, &b, "newsletter").await,
        Some(OPTED_OUT)
    );
    env.publish(&[
        job("b-mkt-3", &b, "marketing"),
        job("b-svc", &b, "authentication"),
    ])
    .await;
    assert_eq!(outcome(&env, "b-mkt-3").await["reason"], "opted_out");
    assert_eq!(outcome(&env, "b-svc").await["status"], "sent");

    // A newer opt-in starts over: opted in again, but not confirmed.
    env.publish_consent(&[consent(
        "opt_in",
        &b,
        &["newsletter"],
        t0 + Duration::from_secs(180),
    )])
    .await;
    wait_flags(&ledger, &b, Some(OPTED_IN)).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_consent_events_are_dead_lettered_with_their_reason() {
    let env = TestEnv::new(&no_seed()).await;
    let app = env.start().await;
    let now = jiff::Timestamp::now();
    let n = fresh_number(10);
    let mut no_source = consent("opt_in", &n, &["newsletter"], now);
    no_source.as_object_mut().unwrap().remove("source");
    let cases = [
        ("unknown_purpose", consent("opt_in", &n, &["lottery"], now)),
        (
            "invalid_number",
            consent("opt_in", "+49123", &["newsletter"], now),
        ),
        ("unknown_account", {
            let mut e = consent("opt_out", &n, &[], now);
            e["account"] = "acme-xx".into();
            e
        }),
        ("missing_source", no_source),
        ("missing_purpose", consent("opt_in", &n, &[], now)),
        (
            "invalid_time",
            consent(
                "opt_in",
                &n,
                &["newsletter"],
                now + Duration::from_secs(86400),
            ),
        ),
        ("malformed", serde_json::json!({"type": "maybe", "to": n})),
    ];
    let bodies: Vec<serde_json::Value> = cases.iter().map(|(_, b)| b.clone()).collect();
    env.publish_consent(&bodies).await;
    let dead = env.dead.clone();
    let seen = wait_for("every invalid event dead-lettered", T, async || {
        let all = dead.all();
        (all.len() >= cases.len()).then_some(all)
    })
    .await;
    for (reason, body) in &cases {
        let d = seen
            .iter()
            .find(|s| s.json() == *body)
            .unwrap_or_else(|| panic!("{reason} not dead-lettered"));
        assert_eq!(
            d.headers.get("x-sendwell-reason-code").map(String::as_str),
            Some(*reason)
        );
        assert!(d.headers["x-sendwell-reason"].starts_with(reason));
    }
    // None of them changed anything.
    let ledger = app.app.as_ref().unwrap().ledger.clone();
    assert_eq!(history_len(&ledger, &n).await, 0);
    app.stop().await;
}

const OPT_IN_TOML: &str = r#"
[accounts.consent]
marketing_footer = "Keine Nachrichten mehr? Antworte STOP."
opt_out_reply = "Erledigt: Du bekommst von uns keine Nachrichten mehr."
opt_out_templates = ["spring_sale"]
templates_without_opt_out = "refuse"

[accounts.consent.double_opt_in]
text = "Möchtest du unsere Angebote per WhatsApp bekommen?"
yes_title = "Ja, gerne"
no_title = "Nein"
"#;

/// A frequency cap and a daily tier, so that sends leave limit rows that erasure must remove.
const LIMITS_TOML: &str = r#"
[[portfolios]]
name = "acme"
messaging_limit = 100000

[[caps]]
category = "marketing"
scope = "brand"
rules = [{ max = 8, per = "1h" }]
"#;

async fn env_with_webhook(consented: std::ops::Range<usize>) -> TestEnv {
    let opts = AppOptions {
        account_limits: format!("{RELAXED_LIMITS}portfolio = \"acme\"\n"),
        extra_toml: format!("{OPT_IN_TOML}\n{}\n{LIMITS_TOML}", webhook_toml(1 << 20)),
        consented,
        ..Default::default()
    };
    TestEnv::with_dir_files(
        &opts,
        &[("app-secret", APP_SECRET), ("verify-token", VERIFY_TOKEN)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_double_opt_in_round_trip_runs_through_whatsapp() {
    let env = env_with_webhook(0..0).await;
    let app = env.start().await;
    let ledger = app.app.as_ref().unwrap().ledger.clone();
    env.sandbox.set_webhook(
        Some(format!("http://{}/webhook", app.webhook())),
        Some(APP_SECRET.into()),
    );
    let n = fresh_number(20);

    env.publish_consent(&[consent(
        "opt_in",
        &n,
        &["newsletter"],
        jiff::Timestamp::now(),
    )])
    .await;
    // sendwell asks "are you sure?" itself, with YES/NO reply buttons, once.
    let sandbox = env.sandbox.clone();
    let question = wait_for("the double opt-in question", T, async || {
        sandbox
            .accepted()
            .into_iter()
            .find(|r| r.to == n && r.kind == "interactive")
    })
    .await;
    assert_eq!(
        question.text.as_deref(),
        Some("Möchtest du unsere Angebote per WhatsApp bekommen?")
    );
    wait_flags(&ledger, &n, Some(OPTED_IN)).await;
    env.publish(&[template_job("before-yes", &n)]).await;
    assert_eq!(outcome(&env, "before-yes").await["reason"], "no_consent");

    // The customer taps "Ja, gerne": a signed webhook, a confirm, and marketing may go.
    let status = env
        .sandbox
        .send_inbound(
            &n,
            InboundBody::ButtonReply {
                id: "sendwell_optin_yes".into(),
                title: "Ja, gerne".into(),
            },
        )
        .await;
    assert_eq!(status, Some(200));
    wait_flags(&ledger, &n, Some(OPTED_IN | CONFIRMED)).await;
    env.publish(&[template_job("after-yes", &n)]).await;
    assert_eq!(outcome(&env, "after-yes").await["status"], "sent");
    let asked = env
        .sandbox
        .accepted()
        .iter()
        .filter(|r| r.to == n && r.kind == "interactive")
        .count();
    assert_eq!(asked, 1, "the question is asked once");

    // The proof: the opt-in, and the confirmation with the customer's own answer.
    let mut prefix = n.trim_start_matches('+').as_bytes().to_vec();
    prefix.push(0);
    let history: Vec<serde_json::Value> = ledger
        .kv_scan_prefix(Table::ConsentHistory, &prefix)
        .await
        .unwrap()
        .iter()
        .map(|(_, v)| serde_json::from_slice(v).unwrap())
        .collect();
    let confirm = history.iter().find(|e| e["type"] == "confirm").unwrap();
    assert_eq!(confirm["source"], "whatsapp_double_opt_in_reply");
    assert!(confirm["evidence"].as_str().unwrap().contains("Ja, gerne"));

    // NO to a second question leaves no consent for it.
    let m = fresh_number(21);
    let first_opt_in_at = jiff::Timestamp::now();
    env.publish_consent(&[consent("opt_in", &m, &["newsletter"], first_opt_in_at)])
        .await;
    let sandbox = env.sandbox.clone();
    wait_for("the second question", T, async || {
        sandbox
            .accepted()
            .into_iter()
            .find(|r| r.to == m && r.kind == "interactive")
    })
    .await;
    env.sandbox
        .send_inbound(&m, InboundBody::Text("nein".into()))
        .await;
    env.publish(&[template_job("after-no", &m)]).await;
    assert_eq!(outcome(&env, "after-no").await["reason"], "no_consent");
    assert_eq!(
        consent_flags(&ledger, &m, "newsletter").await,
        Some(OPTED_IN)
    );
    // Upstream repeats the same opt-in (at-least-once): the customer who said NO is not asked
    // again.
    let before = history_len(&ledger, &m).await;
    env.publish_consent(&[consent("opt_in", &m, &["newsletter"], first_opt_in_at)])
        .await;
    // A question request would go through the shard queue before the replay is acked: once
    // both queues are drained, whatever the replay caused has happened.
    let broker = &env.broker;
    wait_for("the replayed opt-in and its effects", T, async || {
        (broker.drained("sendwell.consent.0") && broker.drained("sendwell.jobs.0")).then_some(())
    })
    .await;
    assert_eq!(history_len(&ledger, &m).await, before);
    env.publish(&[template_job("after-replay", &m)]).await;
    assert_eq!(outcome(&env, "after-replay").await["reason"], "no_consent");
    let asked = env
        .sandbox
        .accepted()
        .iter()
        .filter(|r| r.to == m && r.kind == "interactive")
        .count();
    assert_eq!(asked, 1, "asked once, not again after NO");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_in_three_languages_opts_out_on_every_instance() {
    let env = env_with_webhook(0..0).await;
    let numbers: Vec<String> = (30..34).map(fresh_number).collect();
    env.seed_consent(&numbers).await;
    // A second instance on shard 1, sharing the broker, with its own state.
    let app = env.start().await;
    let (app2, _dir2) = env
        .start_instance(
            1,
            &format!("{OPT_IN_TOML}\n{}", webhook_toml(1 << 20)),
            &numbers,
        )
        .await;
    let ledgers = [
        app.app.as_ref().unwrap().ledger.clone(),
        app2.app.as_ref().unwrap().ledger.clone(),
    ];

    for (n, word) in numbers.iter().zip(["STOP", "  lopeta ", "Arrêt!"]) {
        assert_eq!(customer_writes(&app, n, word).await, 200, "{word}");
    }
    // The fourth taps Meta's "Stop promotions" button under a marketing template.
    env.sandbox.set_webhook(
        Some(format!("http://{}/webhook", app.webhook())),
        Some(APP_SECRET.into()),
    );
    let tapped = env
        .sandbox
        .send_inbound(
            &numbers[3],
            InboundBody::Button {
                payload: "Stop promotions".into(),
                text: "Stop promotions".into(),
            },
        )
        .await;
    assert_eq!(tapped, Some(200));
    for n in &numbers {
        for l in &ledgers {
            wait_flags(l, n, Some(OPTED_OUT)).await;
        }
    }
    let ids: Vec<String> = (0..4).map(|i| format!("after-stop-{i}")).collect();
    let jobs: Vec<_> = ids
        .iter()
        .zip(&numbers)
        .map(|(id, n)| template_job(id, n))
        .collect();
    env.publish(&jobs).await;
    let f = env.final_outcomes(&ids, T).await;
    for id in &ids {
        assert_eq!(f[id][0]["reason"], "opted_out", "{id}: {:?}", f[id]);
    }
    // Each STOP was answered once, by the instance that owns the number.
    let sandbox = env.sandbox.clone();
    wait_for("four STOP confirmations", T, async || {
        let replies: Vec<_> = sandbox
            .accepted()
            .into_iter()
            .filter(|r| r.text.as_deref().is_some_and(|t| t.starts_with("Erledigt")))
            .collect();
        (replies.len() == 4).then_some(())
    })
    .await;
    // START opts back in (to what the number had before) and starts a new double opt-in:
    // one question, from one instance, and no marketing until it is answered.
    assert_eq!(customer_writes(&app, &numbers[0], "Start").await, 200);
    for l in &ledgers {
        wait_flags(l, &numbers[0], Some(OPTED_IN)).await;
    }
    let sandbox = env.sandbox.clone();
    let first = numbers[0].clone();
    wait_for("the new double opt-in question", T, async || {
        sandbox
            .accepted()
            .into_iter()
            .find(|r| r.to == first && r.kind == "interactive")
    })
    .await;
    env.publish(&[template_job("after-start", &numbers[0])])
        .await;
    assert_eq!(outcome(&env, "after-start").await["reason"], "no_consent");
    let questions = env
        .sandbox
        .accepted()
        .iter()
        .filter(|r| r.to == numbers[0] && r.kind == "interactive")
        .count();
    assert_eq!(questions, 1);
    app2.stop().await;
    app.stop().await;
}

/// Posts a customer's text message to the daemon's webhook, signed as Meta signs it.
async fn customer_writes(app: &TestApp, from: &str, text: &str) -> u16 {
    let body = inbound_text_webhook(from, text);
    reqwest::Client::new()
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
        .status()
        .as_u16()
}

/// A customer's text message as Meta's webhook carries it.
fn inbound_text_webhook(from: &str, text: &str) -> Vec<u8> {
    let now = jiff::Timestamp::now().as_second();
    serde_json::to_vec(&serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": "102290129340398",
            "changes": [{
                "field": "messages",
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": { "display_phone_number": "15550001111", "phone_number_id": "106540352242922" },
                    "contacts": [{ "profile": { "name": "Kunde" }, "wa_id": from.trim_start_matches('+') }],
                    "messages": [{
                        "from": from.trim_start_matches('+'),
                        "id": format!("wamid.in-{}", uuid::Uuid::new_v4().simple()),
                        "timestamp": now.to_string(),
                        "type": "text",
                        "text": { "body": text }
                    }]
                }
            }]
        }]
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_leaves_no_byte_of_the_number_in_the_state_store() {
    let env = env_with_webhook(0..0).await;
    let n = fresh_number(40);
    let keep = fresh_number(41);
    env.seed_consent(&[n.clone(), keep.clone()]).await;
    let app = env.start().await;
    let ledger = app.app.as_ref().unwrap().ledger.clone();
    env.sandbox.set_webhook(
        Some(format!("http://{}/webhook", app.webhook())),
        Some(APP_SECRET.into()),
    );
    // Leave traces everywhere: a sent job with delivery callbacks, an inbound message, its
    // frequency-cap log and its count toward the daily tier.
    env.publish(&[template_job("to-erase", &n), template_job("to-keep", &keep)])
        .await;
    env.final_outcomes(&["to-erase".into(), "to-keep".into()], T)
        .await;
    env.sandbox
        .send_inbound(&n, InboundBody::Text("Hallo".into()))
        .await;
    let outcomes = env.outcomes.clone();
    wait_for("a delivery update", T, async || {
        outcomes
            .for_id("to-erase")
            .iter()
            .any(|e| e["status"] == "delivered")
            .then_some(())
    })
    .await;
    let digits = n.trim_start_matches('+').to_string();
    let dump_has = async |ledger: &sendwell::store::Ledger, needle: &[u8]| {
        ledger.dump_all().await.unwrap().iter().any(|(k, v)| {
            k.windows(needle.len()).any(|w| w == needle)
                || v.windows(needle.len()).any(|w| w == needle)
        })
    };
    assert!(
        dump_has(&ledger, digits.as_bytes()).await,
        "the number is in the store before"
    );
    let mut prefix = digits.as_bytes().to_vec();
    prefix.push(0);
    for table in [
        sendwell::store::Table::CapHistory,
        sendwell::store::Table::TierUsage,
    ] {
        assert_eq!(
            ledger.kv_scan_prefix(table, &prefix).await.unwrap().len(),
            1,
            "{table:?} counts the send before the erasure"
        );
    }
    // wamids (Meta's and the sandbox's) carry the number in base64.
    let b64 = sendwell::sandbox::base64(digits.as_bytes());
    let b64 = &b64.as_bytes()[..digits.len() / 3 * 4];
    assert!(dump_has(&ledger, b64).await, "and in base64, in its wamids");

    env.publish_consent(&[consent("erase", &n, &[], jiff::Timestamp::now())])
        .await;
    wait_for("the erasure", T, async || {
        (!dump_has(&ledger, digits.as_bytes()).await).then_some(())
    })
    .await;
    assert!(!dump_has(&ledger, b64).await);
    assert_eq!(
        consent_flags(&ledger, &keep, "newsletter").await,
        Some(OPTED_IN | CONFIRMED)
    );
    // An opt-in dated before the erasure, arriving late, does not bring consent back (nor
    // the number into the store).
    env.publish_consent(&[consent(
        "opt_in",
        &n,
        &["newsletter"],
        jiff::Timestamp::now() - Duration::from_secs(60),
    )])
    .await;
    wait_for("the late opt-in to be voided", T, async || {
        let m = app.metrics().await;
        (metric_value(
            &m,
            "sendwell_consent_events_total{type=\"opt_in\",result=\"void\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    assert!(!dump_has(&ledger, digits.as_bytes()).await);
    drop(ledger);
    app.stop().await;

    // The file itself: not a byte of the number, in any encoding a scan would find. (On
    // PostgreSQL no row holds it, as checked above; its dead tuples go with VACUUM, and its WAL
    // and backups with their retention: docs/operations.md.)
    if common::pg::backend() == "redb" {
        let file = std::fs::read(env.config().state.dir.join("state.redb")).unwrap();
        let be = digits.parse::<u64>().unwrap().to_be_bytes();
        let le = digits.parse::<u64>().unwrap().to_le_bytes();
        for needle in [digits.as_bytes(), &be[2..], &le[..6], b64] {
            assert!(
                !file.windows(needle.len()).any(|w| w == needle),
                "{needle:?} found in state.redb"
            );
        }
    }

    // After a restart the erased number still has no consent.
    let app = env.start().await;
    env.publish(&[template_job("after-erase", &n)]).await;
    assert_eq!(outcome(&env, "after-erase").await["reason"], "no_consent");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketing_carries_the_way_out() {
    // No webhook listener here: text jobs need no open service window in this test.
    let opts = AppOptions {
        extra_toml: OPT_IN_TOML.to_string(),
        consented: 60..62,
        ..Default::default()
    };
    let env = TestEnv::new(&opts).await;
    let app = env.start().await;
    let mut text = template_job("mkt-text", &number(60));
    text.as_object_mut().unwrap().remove("template");
    text["text"] = serde_json::json!({ "body": "Frühlingsangebote: -20 % auf alles." });
    let mut other = template_job("mkt-other-template", &number(61));
    other["template"]["name"] = "summer_sale".into();
    env.publish(&[text, other]).await;
    assert_eq!(outcome(&env, "mkt-text").await["status"], "sent");
    let sent = env
        .sandbox
        .accepted()
        .into_iter()
        .find(|r| r.callback_data.as_deref() == Some("mkt-text"))
        .unwrap();
    assert_eq!(
        sent.text.as_deref(),
        Some("Frühlingsangebote: -20 % auf alles.\n\nKeine Nachrichten mehr? Antworte STOP.")
    );
    let o = outcome(&env, "mkt-other-template").await;
    assert_eq!(o["reason"], "no_opt_out_in_template", "{o}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_new_keywords_and_caps_and_keeps_the_counts() {
    let env = env_with_webhook(0..0).await;
    let (n, m) = (fresh_number(50), fresh_number(51));
    env.seed_consent(&[n.clone(), m.clone()]).await;
    let app = env.start().await;
    let running = app.app.as_ref().unwrap();
    let ledger = running.ledger.clone();
    // Two marketing messages to `n` under the cap of 8 an hour.
    let first: Vec<String> = (0..2).map(|i| format!("reload-a{i}")).collect();
    let jobs: Vec<_> = first.iter().map(|id| template_job(id, &n)).collect();
    env.publish(&jobs).await;
    let f = env.final_outcomes(&first, T).await;
    for id in &first {
        assert_eq!(f[id][0]["status"], "sent", "{id}: {:?}", f[id]);
    }

    // The reload: 3 an hour, and HALT (not a default keyword anywhere) opts out.
    let original = std::fs::read_to_string(&env.config_path).unwrap();
    let edited = original
        .replace(
            "rules = [{ max = 8, per = \"1h\" }]",
            "rules = [{ max = 3, per = \"1h\" }]",
        )
        .replace(
            "[accounts.consent]\n",
            "[accounts.consent]\nopt_out_keywords = [\"STOP\", \"HALT\"]\n",
        );
    assert_ne!(edited, original);
    std::fs::write(&env.config_path, edited).unwrap();
    running.reloader().reload(env.config());

    // The two sends still count: one more goes, the next is over the new cap.
    let second: Vec<String> = (0..2).map(|i| format!("reload-b{i}")).collect();
    env.publish(&[template_job(&second[0], &n)]).await;
    assert_eq!(outcome(&env, &second[0]).await["status"], "sent");
    env.publish(&[template_job(&second[1], &n)]).await;
    let capped = outcome(&env, &second[1]).await;
    assert_eq!(capped["status"], "suppressed", "{capped}");
    assert_eq!(capped["reason"], "frequency_cap");
    assert!(
        capped["detail"].as_str().unwrap().contains("limit 3"),
        "{capped}"
    );

    // The new keyword works without a restart.
    assert_eq!(customer_writes(&app, &m, "halt").await, 200);
    wait_flags(&ledger, &m, Some(OPTED_OUT)).await;
    app.stop().await;
}
