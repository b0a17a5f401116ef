//! WhatsApp IDs that are not the number: Meta answers a send to a Brazilian mobile registered
//! before the ninth digit with an ID without it (+5511987654321 → 551187654321), and a Mexican
//! number with `521` (+525512345678 → 5215512345678), and every webhook about the customer names
//! them by that ID. The sandbox answers so with `legacy_wa_ids`. A STOP, a 131050, a
//! `user_preferences` stop and a customer's message must reach the number, on the shard that
//! owns the number.

mod common;

use std::time::Duration;

use common::*;
use sendwell::sandbox::{AsyncFailure, InboundBody, SandboxConfig};
use sendwell::store::{Ledger, Table};

const T: Duration = Duration::from_secs(30);

/// A Brazilian mobile with the ninth digit, and its legacy ID without it.
fn brazil(n: usize) -> (String, String) {
    (format!("+55119876543{n:02}"), format!("5511876543{n:02}"))
}

/// A Mexican number, and its ID with the `1`.
fn mexico(n: usize) -> (String, String) {
    (format!("+5255123456{n:02}"), format!("52155123456{n:02}"))
}

fn options() -> AppOptions {
    let base = AppOptions::default();
    AppOptions {
        sandbox: SandboxConfig {
            legacy_wa_ids: true,
            ..base.sandbox.clone()
        },
        extra_toml: webhook_toml(1 << 20),
        consented: 0..0,
        ..base
    }
}

async fn env() -> TestEnv {
    TestEnv::with_dir_files(
        &options(),
        &[("app-secret", APP_SECRET), ("verify-token", VERIFY_TOKEN)],
    )
    .await
}

fn digits(n: &str) -> &str {
    n.trim_start_matches('+')
}

/// Whether the store holds an opt-out event for these digits.
async fn has_opt_out(ledger: &Ledger, d: &str) -> bool {
    let mut prefix = d.as_bytes().to_vec();
    prefix.push(0);
    ledger
        .kv_scan_prefix(Table::ConsentHistory, &prefix)
        .await
        .unwrap()
        .iter()
        .any(|(_, v)| v.windows(7).any(|w| w == b"opt_out"))
}

/// Waits until an opt-out is stored for the number or for its ID (where it lands without the
/// map): the event has been applied, rightly or not.
async fn wait_opt_out_applied(ledgers: &[Ledger], number: &str, id: &str) {
    wait_for("the opt-out applied", T, async || {
        for l in ledgers {
            if has_opt_out(l, digits(number)).await || has_opt_out(l, id).await {
                return Some(());
            }
        }
        None
    })
    .await;
}

async fn outcome(env: &TestEnv, id: &str) -> serde_json::Value {
    env.final_outcomes(&[id.to_string()], T).await[id][0].clone()
}

/// A first marketing job to the number, sent: the sandbox answers with the legacy ID.
async fn first_send(env: &TestEnv, id: &str, number: &str) {
    env.publish(&[template_job(id, number)]).await;
    let o = outcome(env, id).await;
    assert_eq!(o["status"], "sent", "{o}");
}

/// The next marketing job to the number must be suppressed as opted out.
async fn assert_next_marketing_suppressed(env: &TestEnv, id: &str, number: &str) {
    env.publish(&[template_job(id, number)]).await;
    let o = outcome(env, id).await;
    assert_eq!(
        (o["status"].as_str(), o["reason"].as_str()),
        (Some("suppressed"), Some("opted_out")),
        "{id} to {number}: {o}"
    );
}

fn service_text(id: &str, to: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id, "account": "acme-de", "to": to, "category": "service",
        "text": { "body": "Yes, it comes in blue." }
    })
}

/// Meta's `user_preferences` callback: the customer stopped marketing messages.
fn preference_stop(wa_id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": "102290129340398",
            "time": jiff::Timestamp::now().as_second(),
            "changes": [{
                "field": "user_preferences",
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {
                        "display_phone_number": "15550783881",
                        "phone_number_id": "106540352242922"
                    },
                    "contacts": [{ "profile": { "name": "Sandbox User" }, "wa_id": wa_id }],
                    "user_preferences": [{
                        "wa_id": wa_id,
                        "detail": "User requested to stop marketing messages",
                        "category": "marketing_messages",
                        "value": "stop",
                        "timestamp": jiff::Timestamp::now().as_second()
                    }]
                }
            }]
        }]
    }))
    .unwrap()
}

async fn post_signed(app: &TestApp, body: Vec<u8>) -> u16 {
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

/// The customer-service window the store holds for (acme-de, digits), if any.
async fn window_row(ledger: &Ledger, d: &str) -> bool {
    ledger
        .kv_get(Table::Inbound, format!("acme-de|{d}").as_bytes())
        .await
        .unwrap()
        .is_some()
}

#[derive(Clone, Copy)]
enum Case {
    /// The customer writes STOP from the ID.
    Stop,
    /// Meta reports 131050 (the customer stopped marketing) in a status naming the ID.
    Status131050,
    /// A `user_preferences` stop naming the ID.
    PreferenceStop,
    /// The customer writes from the ID: the number's service window opens.
    ServiceWindow,
    /// A number with consent that was never sent to writes STOP from its ID: no map entry, the
    /// ID resolves by equivalence to the consented number.
    StopNeverSent,
}

/// One case with a daemon of its own; `(number, id)` as Meta's answer pairs them.
async fn case(case: Case, (number, id): (String, String)) {
    let env = env().await;
    env.seed_consent(std::slice::from_ref(&number)).await;
    let app = env.start().await;
    let ledger = app.app.as_ref().unwrap().ledger.clone();
    let ledgers = [ledger.clone()];
    env.sandbox.set_webhook(
        Some(format!("http://{}/webhook", app.webhook())),
        Some(APP_SECRET.into()),
    );
    let (number, id) = (&number, &id);
    match case {
        Case::Stop => {
            first_send(&env, "first", number).await;
            assert_eq!(
                env.sandbox
                    .send_inbound(id, InboundBody::Text("STOP".into()))
                    .await,
                Some(200)
            );
            wait_opt_out_applied(&ledgers, number, id).await;
            assert_next_marketing_suppressed(&env, "after", number).await;
        }
        Case::Status131050 => {
            env.sandbox.add_async_failure(AsyncFailure {
                to: Some(number.clone()),
                code: 131050,
                title: "Unable to deliver the message. This recipient has chosen to stop receiving marketing messages on WhatsApp from your business".into(),
                times: 1,
            });
            first_send(&env, "first", number).await;
            wait_opt_out_applied(&ledgers, number, id).await;
            assert_next_marketing_suppressed(&env, "after", number).await;
        }
        Case::PreferenceStop => {
            first_send(&env, "first", number).await;
            assert_eq!(post_signed(&app, preference_stop(id)).await, 200);
            wait_opt_out_applied(&ledgers, number, id).await;
            assert_next_marketing_suppressed(&env, "after", number).await;
        }
        Case::ServiceWindow => {
            first_send(&env, "first", number).await;
            assert_eq!(
                env.sandbox
                    .send_inbound(id, InboundBody::Text("Gibt es das in Blau?".into()))
                    .await,
                Some(200)
            );
            wait_for("the customer's message applied", T, async || {
                (window_row(&ledger, digits(number)).await || window_row(&ledger, id).await)
                    .then_some(())
            })
            .await;
            env.publish(&[service_text("reply", number)]).await;
            let o = outcome(&env, "reply").await;
            assert_eq!(o["status"], "sent", "{o}");
        }
        Case::StopNeverSent => {
            assert_eq!(
                env.sandbox
                    .send_inbound(id, InboundBody::Text("STOP".into()))
                    .await,
                Some(200)
            );
            wait_opt_out_applied(&ledgers, number, id).await;
            assert_next_marketing_suppressed(&env, "after", number).await;
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brazil_stop_from_the_id_opts_out_the_number() {
    case(Case::Stop, brazil(21)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brazil_131050_for_the_id_opts_out_the_number() {
    case(Case::Status131050, brazil(22)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brazil_user_preferences_stop_for_the_id_opts_out_the_number() {
    case(Case::PreferenceStop, brazil(23)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brazil_message_from_the_id_opens_the_numbers_service_window() {
    case(Case::ServiceWindow, brazil(24)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brazil_stop_from_the_id_of_a_number_never_sent_to_opts_it_out() {
    case(Case::StopNeverSent, brazil(25)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mexico_stop_from_the_id_opts_out_the_number() {
    case(Case::Stop, mexico(78)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mexico_131050_for_the_id_opts_out_the_number() {
    case(Case::Status131050, mexico(72)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mexico_user_preferences_stop_for_the_id_opts_out_the_number() {
    case(Case::PreferenceStop, mexico(73)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mexico_message_from_the_id_opens_the_numbers_service_window() {
    case(Case::ServiceWindow, mexico(74)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mexico_stop_from_the_id_of_a_number_never_sent_to_opts_it_out() {
    case(Case::StopNeverSent, mexico(75)).await;
}

/// What a send taught is erased with the number; other numbers' IDs stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_id_is_erased_with_its_number() {
    let env = env().await;
    let (a, b) = (brazil(26), mexico(76));
    env.seed_consent(&[a.0.clone(), b.0.clone()]).await;
    let app = env.start().await;
    let ledger = app.app.as_ref().unwrap().ledger.clone();
    first_send(&env, "a", &a.0).await;
    first_send(&env, "b", &b.0).await;
    let has_id = async |id: &str| {
        ledger
            .kv_scan(Table::WaIds)
            .await
            .unwrap()
            .iter()
            .any(|(k, _)| k.ends_with(id.as_bytes()))
    };
    assert!(has_id(&a.1).await && has_id(&b.1).await, "both IDs learned");
    env.publish_consent(&[serde_json::json!({
        "type": "erase", "account": "acme-de", "to": a.0, "purposes": [],
        "source": "gdpr_request", "at": jiff::Timestamp::now().to_string(),
    })])
    .await;
    wait_for("the erasure", T, async || {
        (!has_id(&a.1).await).then_some(())
    })
    .await;
    assert!(has_id(&b.1).await, "the other number's ID is kept");
    let dump = ledger.dump_all().await.unwrap();
    assert!(
        !dump.iter().any(|(k, v)| [k, v]
            .iter()
            .any(|x| x.windows(a.1.len()).any(|w| w == a.1.as_bytes()))),
        "the erased number's ID is nowhere in the store"
    );
    app.stop().await;
}

/// Two shards, the webhook listener on shard 0 only receiving Meta's callbacks. The number is
/// owned by shard 1 and its ID's digits would land on shard 0: the events must be applied on
/// shard 1, which sent to the number and holds its jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_applied_on_the_shard_that_owns_the_number() {
    let env = env().await;
    let cases: Vec<(String, String)> = (30..70).map(brazil).collect();
    let numbers: Vec<String> = cases.iter().map(|c| c.0.clone()).collect();
    env.seed_consent(&numbers).await;
    let app = env.start().await;
    let (app2, _dir2) = env
        .start_instance(1, &webhook_toml(1 << 20), &numbers)
        .await;
    let (l0, l1) = (
        app.app.as_ref().unwrap().ledger.clone(),
        app2.app.as_ref().unwrap().ledger.clone(),
    );
    // Meta calls shard 0's listener only.
    env.sandbox.set_webhook(
        Some(format!("http://{}/webhook", app.webhook())),
        Some(APP_SECRET.into()),
    );

    // Which shard owns each number, and each ID's digits: where a job to it is recorded. The
    // number's job is sent (shard 1 learns the ID); a job to the ID's digits has no consent.
    let mut probes = Vec::new();
    let mut ids = Vec::new();
    for (i, (number, id)) in cases.iter().enumerate() {
        probes.push(template_job(&format!("probe-{i}"), number));
        probes.push(template_job(&format!("probe-id-{i}"), &format!("+{id}")));
        ids.push(format!("probe-{i}"));
        ids.push(format!("probe-id-{i}"));
    }
    env.publish(&probes).await;
    env.final_outcomes(&ids, T).await;
    let on = async |l: &Ledger, job: &str| l.get(job).await.unwrap().is_some();
    let mut split: Vec<usize> = Vec::new();
    for i in 0..cases.len() {
        if on(&l1, &format!("probe-{i}")).await && on(&l0, &format!("probe-id-{i}")).await {
            split.push(i);
        }
    }
    assert!(
        split.len() >= 2,
        "no two numbers on shard 1 whose IDs hash to shard 0 among {}",
        cases.len()
    );

    // A customer's message from the ID opens the window on the number's shard.
    let (number, id) = &cases[split[0]];
    assert_eq!(
        env.sandbox
            .send_inbound(id, InboundBody::Text("Hallo".into()))
            .await,
        Some(200)
    );
    wait_for("the customer's message applied", T, async || {
        for l in [&l0, &l1] {
            if window_row(l, digits(number)).await || window_row(l, id).await {
                return Some(());
            }
        }
        None
    })
    .await;
    assert!(window_row(&l1, digits(number)).await, "window on shard 1");
    assert!(
        !window_row(&l0, id).await && !window_row(&l0, digits(number)).await,
        "nothing applied on shard 0"
    );
    env.publish(&[service_text("two-shard-reply", number)])
        .await;
    let o = outcome(&env, "two-shard-reply").await;
    assert_eq!(o["status"], "sent", "{o}");

    // A 131050 for a job shard 1 sent reaches shard 1, which knows the job.
    let (number, _) = &cases[split[1]];
    env.sandbox.add_async_failure(AsyncFailure {
        to: Some(number.clone()),
        code: 131050,
        title: "This recipient has chosen to stop receiving marketing messages".into(),
        times: 1,
    });
    first_send(&env, "two-shard-131050", number).await;
    let wamid = outcome(&env, "two-shard-131050").await["wamid"]
        .as_str()
        .unwrap()
        .to_string();
    let sandbox = env.sandbox.clone();
    wait_for("the failed status delivered", T, async || {
        sandbox
            .callbacks()
            .iter()
            .any(|c| {
                c.wamid.as_deref() == Some(&wamid)
                    && c.status.as_deref() == Some("failed")
                    && c.http_status == Some(200)
            })
            .then_some(())
    })
    .await;
    // Published to the broker once answered 200: applied (or dropped as unknown) once both
    // shard queues are empty.
    let broker = &env.broker;
    wait_for("both shards drained", T, async || {
        (broker.drained("sendwell.jobs.0") && broker.drained("sendwell.jobs.1")).then_some(())
    })
    .await;
    assert!(
        has_opt_out(&l1, digits(number)).await,
        "opt-out applied on shard 1"
    );
    assert_next_marketing_suppressed(&env, "two-shard-131050-after", number).await;

    app2.stop().await;
    app.stop().await;
}

async fn stop_from(env: &TestEnv, id: &str) {
    assert_eq!(
        env.sandbox
            .send_inbound(id, InboundBody::Text("STOP".into()))
            .await,
        Some(200)
    );
}

fn consent_event(kind: &str, to: &str, at: jiff::Timestamp) -> serde_json::Value {
    serde_json::json!({
        "type": kind, "account": "acme-de", "to": to, "purposes": ["newsletter"],
        "source": "website", "at": at.to_string(),
    })
}

/// A STOP from an ID that matches no number yet, then an opt-in for the number that arrives
/// later but is dated earlier: consent is decided by the events' times, whatever their order,
/// so the STOP wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_from_an_unknown_id_wins_over_an_earlier_opt_in_that_arrives_later() {
    let env = env().await;
    let app = env.start().await;
    let ledger = app.app.as_ref().unwrap().ledger.clone();
    env.sandbox.set_webhook(
        Some(format!("http://{}/webhook", app.webhook())),
        Some(APP_SECRET.into()),
    );
    let (number, id) = brazil(40);
    stop_from(&env, &id).await;
    wait_opt_out_applied(std::slice::from_ref(&ledger), &number, &id).await;
    let two_hours_ago = jiff::Timestamp::now() - Duration::from_secs(7200);
    env.publish_consent(&[
        consent_event("opt_in", &number, two_hours_ago),
        consent_event("confirm", &number, two_hours_ago + Duration::from_secs(60)),
    ])
    .await;
    wait_for("the opt-in applied", T, async || {
        consent_flags(&ledger, &number, "newsletter").await
    })
    .await;
    assert_next_marketing_suppressed(&env, "after", &number).await;
    app.stop().await;
}

/// One customer known under both forms of a Brazilian mobile (with and without the ninth
/// digit): a STOP from their ID opts out both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_from_the_id_opts_out_every_form_of_the_number() {
    let mut opts = options();
    opts.extra_toml = format!(
        "[accounts.consent]\nopt_out_reply = \"Erledigt.\"\n{}",
        opts.extra_toml
    );
    let env = TestEnv::with_dir_files(
        &opts,
        &[("app-secret", APP_SECRET), ("verify-token", VERIFY_TOKEN)],
    )
    .await;
    let (number, id) = brazil(41);
    let short = format!("+{id}");
    env.seed_consent(&[number.clone(), short.clone()]).await;
    let app = env.start().await;
    let ledger = app.app.as_ref().unwrap().ledger.clone();
    env.sandbox.set_webhook(
        Some(format!("http://{}/webhook", app.webhook())),
        Some(APP_SECRET.into()),
    );
    first_send(&env, "first", &number).await;
    stop_from(&env, &id).await;
    wait_for("the opt-out under both forms", T, async || {
        (has_opt_out(&ledger, digits(&number)).await && has_opt_out(&ledger, &id).await)
            .then_some(())
    })
    .await;
    assert_next_marketing_suppressed(&env, "after-long", &number).await;
    assert_next_marketing_suppressed(&env, "after-short", &short).await;
    // One confirmation reply to the customer, not one per form.
    let sandbox = env.sandbox.clone();
    let replies = || {
        sandbox
            .accepted()
            .into_iter()
            .filter(|r| r.kind == "text")
            .count()
    };
    wait_for("the opt-out reply", T, async || {
        (replies() >= 1).then_some(())
    })
    .await;
    assert_eq!(replies(), 1, "one reply, not one per form of the number");
    app.stop().await;
}

/// Erasing the number erases what was kept under its ID too (a STOP from an ID that matched
/// nothing when it came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasing_the_number_erases_what_its_id_left() {
    let env = env().await;
    let app = env.start().await;
    let ledger = app.app.as_ref().unwrap().ledger.clone();
    env.sandbox.set_webhook(
        Some(format!("http://{}/webhook", app.webhook())),
        Some(APP_SECRET.into()),
    );
    let (number, id) = brazil(42);
    stop_from(&env, &id).await;
    wait_opt_out_applied(std::slice::from_ref(&ledger), &number, &id).await;
    env.publish_consent(&[serde_json::json!({
        "type": "erase", "account": "acme-de", "to": number, "purposes": [],
        "source": "gdpr_request", "at": jiff::Timestamp::now().to_string(),
    })])
    .await;
    wait_for("the erasure", T, async || {
        (!has_opt_out(&ledger, &id).await && !has_opt_out(&ledger, digits(&number)).await)
            .then_some(())
    })
    .await;
    let dump = ledger.dump_all().await.unwrap();
    for form in [digits(&number), id.as_str()] {
        assert!(
            !dump.iter().any(|(k, v)| [k, v]
                .iter()
                .any(|x| x.windows(form.len()).any(|w| w == form.as_bytes()))),
            "{form} is nowhere in the store"
        );
    }
    app.stop().await;
}
