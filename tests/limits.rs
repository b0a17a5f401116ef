//! Limits through the real broker and the sandbox: account throughput measured at the receiving
//! end, frequency caps across a restart, quiet hours deferring and then sending.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::json;

const SECOND_ACCOUNT: &str = r#"
[[accounts]]
name = "acme-fr"
phone_number_id = "106540352242923"
token_file = "token"
messages_per_second = 200
pacing = { interval = "0s" }
"#;

/// An authentication template (needs no consent) from `account` to a distinct recipient.
fn auth_job(id: &str, account: &str, to: &str) -> serde_json::Value {
    json!({
        "id": id,
        "account": account,
        "to": to,
        "category": "authentication",
        "template": { "name": "otp", "language": "en", "components": [] }
    })
}

/// Most arrivals in any half-open 1-second window `[x, x + 1000 ms)`.
fn max_in_one_second(sorted_ms: &[u64]) -> usize {
    let mut best = 0;
    let mut j = 0;
    for i in 0..sorted_ms.len() {
        while sorted_ms[i] - sorted_ms[j] >= 1000 {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_accounts_keep_their_rates_at_the_receiving_end() {
    // 50/s and 200/s with the default bursts (a tenth of the rate: 5 and 20). 2,000 + 8,000
    // jobs, interleaved as upstream would publish them, so both accounts stay busy ~40 s.
    let opts = AppOptions {
        account_limits: "messages_per_second = 50\npacing = { interval = \"0s\" }\n".into(),
        extra_toml: SECOND_ACCOUNT.into(),
        prefetch: 500,
        consented: 0..0,
        ..AppOptions::default()
    };
    let env = TestEnv::new(&opts).await;
    let app = env.start().await;
    let mut jobs = Vec::new();
    let mut ids = Vec::new();
    for i in 0..10_000 {
        let account = if i % 5 == 0 { "acme-de" } else { "acme-fr" };
        let id = format!("rate-{i}");
        jobs.push(auth_job(&id, account, &number(i)));
        ids.push(id);
    }
    env.publish(&jobs).await;
    let finals = env.final_outcomes(&ids, Duration::from_secs(180)).await;
    let sent = finals.values().filter(|v| v[0]["status"] == "sent").count();
    assert_eq!(
        sent, 10_000,
        "every job is sent, none failed or dropped for the limit"
    );

    let mut by_account: HashMap<String, Vec<u64>> = HashMap::new();
    for r in env.sandbox.requests() {
        by_account
            .entry(r.phone_number_id.clone())
            .or_default()
            .push(r.at_ms);
    }
    for (phone, limit, burst, n) in [
        ("106540352242922", 50.0, 5, 2_000),
        ("106540352242923", 200.0, 20, 8_000),
    ] {
        let mut at = by_account.remove(phone).unwrap_or_default();
        at.sort_unstable();
        assert_eq!(at.len(), n, "{phone}: calls that reached the sandbox");
        let peak = max_in_one_second(&at);
        assert!(
            peak <= limit as usize + burst,
            "{phone}: {peak} calls arrived within one second; limit {limit} + burst {burst}"
        );
        let span_s = (at[n - 1] - at[0]) as f64 / 1000.0;
        let rate = (n - 1) as f64 / span_s;
        assert!(
            (rate - limit).abs() / limit <= 0.05,
            "{phone}: long-run rate {rate:.1}/s, limit {limit}/s"
        );
        eprintln!("{phone}: peak {peak} in 1 s, long-run {rate:.2}/s (limit {limit})");
    }
    let metrics = app.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "sendwell_limit_wait_seconds_count{account=\"acme-fr\",limit=\"throughput\"}"
        ) >= 8_000.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "sendwell_account_rate_messages_per_second{account=\"acme-fr\"}"
        ),
        200.0
    );
    app.stop().await;
}

const CAP_TOML: &str = r#"
[[caps]]
category = "marketing"
scope = "brand"
rules = [{ max = 1, per = "1d" }, { max = 2, per = "7d" }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequency_caps_survive_a_daemon_restart() {
    // Three marketing jobs to each of 150 recipients; cap: 1 per day. The daemon is stopped
    // mid-run and started again on the same state: still exactly one per recipient.
    let opts = AppOptions {
        // Slow enough (20 sends/s) that the restart lands mid-run.
        account_limits: "messages_per_second = 20\npacing = { interval = \"0s\" }\n".into(),
        extra_toml: CAP_TOML.into(),
        consented: 0..150,
        prefetch: 50,
        sandbox: sendwell::cloud_api::sandbox::SandboxConfig {
            latency: Duration::from_millis(20),
            valid_tokens: Some(vec![GOOD_TOKEN.to_string()]),
            ..Default::default()
        },
        ..AppOptions::default()
    };
    let env = TestEnv::new(&opts).await;
    let mut jobs = Vec::new();
    let mut ids = Vec::new();
    for round in 0..3 {
        for i in 0..150 {
            let id = format!("cap-{round}-{i}");
            jobs.push(template_job(&id, &number(i)));
            ids.push(id);
        }
    }
    env.publish(&jobs).await;
    let app = env.start().await;
    let sandbox = env.sandbox.clone();
    wait_for(
        "some sends before the restart",
        Duration::from_secs(30),
        async || (sandbox.accepted().len() >= 40).then_some(()),
    )
    .await;
    app.stop().await;
    let before = env.sandbox.accepted().len();
    assert!(before < 150, "stopped mid-run ({before} sent)");
    let app = env.start().await;
    let finals = env.final_outcomes(&ids, Duration::from_secs(90)).await;

    let mut per_recipient: HashMap<String, usize> = HashMap::new();
    for r in env.sandbox.accepted() {
        *per_recipient.entry(r.to.clone()).or_default() += 1;
    }
    assert_eq!(
        per_recipient.len(),
        150,
        "every recipient got its one message"
    );
    assert!(
        per_recipient.values().all(|&n| n == 1),
        "nobody over the cap: {:?}",
        per_recipient.values().filter(|&&n| n > 1).count()
    );
    let capped: Vec<_> = finals
        .values()
        .filter(|v| v[0]["status"] == "suppressed" && v[0]["reason"] == "frequency_cap")
        .collect();
    assert_eq!(capped.len(), 300);
    let detail = capped[0][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("1 per") || detail.contains("in the last"),
        "{detail}"
    );
    assert!(
        !detail.contains("49170"),
        "no number in the detail: {detail}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_in_quiet_hours_is_deferred_and_sent_when_they_end() {
    // Quiet hours that began a minute ago and end 3 seconds from the next whole second, in the
    // job's own time zone (UTC), released over a 1 s spread.
    let now = jiff::Timestamp::now();
    let start = (now - Duration::from_secs(60)).to_zoned_datetime(jiff::tz::TimeZone::UTC);
    let end_at = jiff::Timestamp::from_second(now.as_second() + 4).unwrap();
    let end = end_at.to_zoned_datetime(jiff::tz::TimeZone::UTC);
    let quiet = format!(
        "quiet_hours = {{ start = \"{}\", end = \"{}\", spread = \"1s\" }}\n",
        start.strftime("%H:%M:%S"),
        end.strftime("%H:%M:%S")
    );
    let opts = AppOptions {
        account_limits: format!("{}{quiet}", RELAXED_LIMITS),
        consented: 0..2,
        ..AppOptions::default()
    };
    let env = TestEnv::new(&opts).await;
    let app = env.start().await;
    let mut quiet_job = template_job("quiet-1", &number(0));
    quiet_job["timezone"] = json!("UTC");
    // Authentication is not held by quiet hours (they apply to marketing by default).
    let otp = auth_job("otp-1", "acme-de", &number(1));
    env.publish(&[quiet_job, otp]).await;
    let finals = env
        .final_outcomes(&["quiet-1".into(), "otp-1".into()], Duration::from_secs(30))
        .await;
    assert_eq!(finals["quiet-1"][0]["status"], "sent");
    assert_eq!(finals["otp-1"][0]["status"], "sent");
    let arrivals: HashMap<String, u64> = env
        .sandbox
        .accepted()
        .into_iter()
        .filter_map(|r| r.callback_data.map(|id| (id, r.at_ms)))
        .collect();
    let end_ms = end_at.as_millisecond() as u64;
    assert!(
        arrivals["quiet-1"] >= end_ms,
        "the marketing job went {} ms before quiet hours ended",
        end_ms - arrivals["quiet-1"]
    );
    assert!(arrivals["otp-1"] < end_ms, "the OTP did not wait");
    let metrics = app.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "sendwell_jobs_deferred_total{account=\"acme-de\",reason=\"quiet_hours\"}"
        ) >= 1.0
    );
    app.stop().await;
}
