//! Limits through the real broker and the sandbox: account throughput measured at the receiving
//! end, frequency caps across a restart, quiet hours deferring and then sending.
//!
//! Timing: these run on two busy cores. What is asserted is what must never happen: more calls
//! in a second than rate and burst allow, a long-run rate above the limit, a pacing gap shorter
//! than the interval, a send before quiet hours end or a retry before its backoff. Counted where
//! the calls arrive, the peak and the pacing gap allow for the transit-time variation the daemon
//! itself allows for (`limits.arrival_jitter`), the peak also for stalls of this process seen
//! during the run. Whether the daemon keeps up with a limit is the load bench's figure; here it
//! is bounded only loosely (at least 0.3 of the limit). Deadlines only bound waits, at 10 times
//! what they wait for or more.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_accounts_keep_their_rates_at_the_receiving_end() {
    // 50/s and 200/s with the default bursts (a tenth of the rate: 5 and 20). 1,000 + 4,000
    // jobs, interleaved as upstream would publish them, so both accounts stay busy ~20 s (the
    // burst is then 0.5 % of each account's calls, well inside the 2 % long-run bound).
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
    for i in 0..5_000 {
        let account = if i % 5 == 0 { "acme-de" } else { "acme-fr" };
        let id = format!("rate-{i}");
        jobs.push(auth_job(&id, account, &number(i)));
        ids.push(id);
    }
    let (stalled_ms, watching) = watch_stalls();
    env.publish(&jobs).await;
    // 20 s at the limits; the deadline only bounds a wait (10x).
    let finals = env.final_outcomes(&ids, Duration::from_secs(200)).await;
    watching.abort();
    let stalled_ms = stalled_ms.load(Ordering::Relaxed);
    let sent = finals.values().filter(|v| v[0]["status"] == "sent").count();
    assert_eq!(
        sent, 5_000,
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
        ("106540352242922", 50.0, 5, 1_000),
        ("106540352242923", 200.0, 20, 4_000),
    ] {
        let mut at = by_account.remove(phone).unwrap_or_default();
        at.sort_unstable();
        assert_eq!(at.len(), n, "{phone}: calls that reached the sandbox");
        let peak = max_in_one_second(&at);
        let span_s = (at[n - 1] - at[0]) as f64 / 1000.0;
        let rate = (n - 1) as f64 / span_s;
        // A stall can hold the first calls back and shorten the span they are measured over
        // by as much as it lasted beyond the arrival jitter: the long-run bound allows that.
        let stall_beyond = stalled_ms.saturating_sub(50) as f64 / 1000.0;
        let rate_allowing_stalls = (n - 1) as f64 / (span_s + stall_beyond);
        eprintln!(
            "{phone}: peak {peak} in 1 s, long-run {rate:.2}/s (limit {limit}), stalls up to {stalled_ms} ms"
        );
        // The daemon promises at most rate + burst in any second where the calls arrive, as
        // long as their transit times vary by less than `limits.arrival_jitter` (50 ms). Here
        // the sandbox that counts them shares the process with the daemon: on a loaded machine
        // a stall beyond that brings up to `limit` more calls per second of stall together,
        // which is the machine, not the gate. Seen under two busy loops: 211 to 219 for
        // 200 + 20, 52 to 54 for 50 + 5, with stalls of 171 to 293 ms.
        let allowed = limit as usize + burst + (limit * stall_beyond).ceil() as usize;
        assert!(
            peak <= allowed,
            "{phone}: {peak} calls arrived within one second; limit {limit} + burst {burst} \
             (+ {} for stalls of {stalled_ms} ms)",
            allowed - limit as usize - burst
        );
        // Never above the limit in the long run (2 %: the burst and the arrival jitter over
        // 20 s). How close it comes from below is how fast this machine feeds the gate: the
        // load bench's figure (an idle 2-core machine once gave 46.6/s for 50/s; 30.7 to
        // 46.9/s under two busy loops here). That the gate's long run is exactly the rate is
        // checked on tokio's paused clock (`pipeline::limits::throughput`); here the floor
        // only catches an account that crawls.
        assert!(
            rate_allowing_stalls <= limit * 1.02,
            "{phone}: long-run rate {rate:.1}/s ({rate_allowing_stalls:.1}/s allowing for \
             stalls of {stalled_ms} ms), above the limit {limit}/s"
        );
        assert!(
            rate >= limit * 0.3,
            "{phone}: long-run rate {rate:.1}/s, far below the limit {limit}/s"
        );
    }
    // Jobs waited their turn at the gate, and only real waits are recorded: the first burst
    // of cells passes without one. How many waited depends on how fast this machine feeds
    // the gate, so neither bound is tight.
    let metrics = app.metrics().await;
    let waits = metric_value(
        &metrics,
        "sendwell_limit_wait_seconds_count{account=\"acme-fr\",limit=\"throughput\"}",
    );
    eprintln!("acme-fr: {waits} waits at the gate");
    assert!((1.0..4_000.0).contains(&waits), "{waits} waits");
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
        sandbox: sendwell::sandbox::SandboxConfig {
            latency: Duration::from_millis(20),
            valid_tokens: Some(vec![GOOD_TOKEN.to_string()]),
            ..Default::default()
        },
        ..AppOptions::default()
    };
    let env = TestEnv::new(&opts).await;
    // Started first: it declares the exchanges the jobs are published to.
    let app = env.start().await;
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
    let opts = AppOptions {
        consented: 0..2,
        ..AppOptions::default()
    };
    let env = TestEnv::new(&opts).await;
    // Quiet hours that began a minute ago and end 10 seconds from the next whole second, in the
    // job's own time zone (UTC), released over a 1 s spread. Set only now, after the setup (a
    // vhost, the consent seeding: seconds on a busy machine), so that the daemon's start, the
    // publish and the OTP's send fit well inside them.
    let now = jiff::Timestamp::now();
    let start = (now - Duration::from_secs(60)).to_zoned_datetime(jiff::tz::TimeZone::UTC);
    let end_at = jiff::Timestamp::from_second(now.as_second() + 11).unwrap();
    let end = end_at.to_zoned_datetime(jiff::tz::TimeZone::UTC);
    let quiet = format!(
        "quiet_hours = {{ start = \"{}\", end = \"{}\", spread = \"1s\" }}\n",
        start.strftime("%H:%M:%S"),
        end.strftime("%H:%M:%S")
    );
    let toml = std::fs::read_to_string(&env.config_path).unwrap();
    assert!(toml.contains(RELAXED_LIMITS));
    std::fs::write(
        &env.config_path,
        toml.replacen(RELAXED_LIMITS, &format!("{RELAXED_LIMITS}{quiet}"), 1),
    )
    .unwrap();
    let app = env.start().await;
    let mut quiet_job = template_job("quiet-1", &number(0));
    quiet_job["timezone"] = json!("UTC");
    // Authentication is not held by quiet hours (they apply to marketing by default).
    let otp = auth_job("otp-1", "acme-de", &number(1));
    env.publish(&[quiet_job, otp]).await;
    let finals = env
        .final_outcomes(&["quiet-1".into(), "otp-1".into()], Duration::from_secs(60))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_message_to_a_number_waits_for_its_pacing_interval() {
    // Pacing 2 s (Meta's is 6 s; shorter keeps the test short), longer than the inline wait
    // (500 ms): the second job is deferred through a delay queue, then sent, in order.
    let opts = AppOptions {
        account_limits: "messages_per_second = 1000\npacing = { interval = \"2s\" }\n".into(),
        consented: 0..2,
        ..AppOptions::default()
    };
    let env = TestEnv::new(&opts).await;
    let app = env.start().await;
    let ids: Vec<String> = (0..3).map(|i| format!("pace-{i}")).collect();
    let jobs: Vec<_> = ids.iter().map(|id| template_job(id, &number(0))).collect();
    // Another number is not held back by the first one's pacing.
    let other = template_job("pace-other", &number(1));
    env.publish(&[jobs[0].clone(), jobs[1].clone(), jobs[2].clone(), other])
        .await;
    let mut all = ids.clone();
    all.push("pace-other".into());
    let finals = env.final_outcomes(&all, Duration::from_secs(60)).await;
    assert!(all.iter().all(|id| finals[id][0]["status"] == "sent"));
    let at: HashMap<String, u64> = env
        .sandbox
        .accepted()
        .into_iter()
        .filter_map(|r| r.callback_data.map(|id| (id, r.at_ms)))
        .collect();
    for w in ids.windows(2) {
        // Measured where Meta counts, at the receiving end, where a gap can come out shorter
        // than the interval by how much longer the first message took from the gate to the
        // wire (pacing is kept at the gate, before the store commit): allowed as much as the
        // daemon allows for transit-time variation at Meta's door (`limits.arrival_jitter`,
        // 50 ms). Seen: 2016 to 2221 ms; without pacing the three go together.
        let gap = at[&w[1]] as i64 - at[&w[0]] as i64;
        eprintln!("{} came {gap} ms after {}", w[1], w[0]);
        assert!(gap >= 2000 - 50, "{} came {gap} ms after {}", w[1], w[0]);
    }
    assert!(
        at["pace-other"] < at["pace-1"],
        "the other number did not wait"
    );
    let metrics = app.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "sendwell_jobs_deferred_total{account=\"acme-de\",reason=\"recipient_pacing\"}"
        ) >= 2.0
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_recipients_beyond_the_daily_tier_wait() {
    // A portfolio with a tier of 3: three new recipients get their message, two more wait;
    // a recipient already reached today is not new.
    let opts = AppOptions {
        account_limits: format!("{RELAXED_LIMITS}portfolio = \"acme\"\n"),
        extra_toml: "[[portfolios]]\nname = \"acme\"\nmessaging_limit = 3\n".into(),
        consented: 0..0,
        ..AppOptions::default()
    };
    let env = TestEnv::new(&opts).await;
    let app = env.start().await;
    let first: Vec<_> = (0..3)
        .map(|i| auth_job(&format!("tier-{i}"), "acme-de", &number(i)))
        .collect();
    env.publish(&first).await;
    let ids: Vec<String> = (0..3).map(|i| format!("tier-{i}")).collect();
    env.final_outcomes(&ids, Duration::from_secs(20)).await;
    env.publish(&[
        auth_job("tier-3", "acme-de", &number(3)),
        auth_job("tier-4", "acme-de", &number(4)),
        auth_job("tier-again", "acme-de", &number(0)),
    ])
    .await;
    env.final_outcomes(&["tier-again".into()], Duration::from_secs(20))
        .await;
    let admin = app.admin();
    let m = wait_for("two tier deferrals", Duration::from_secs(20), async || {
        let m = scrape(admin).await?;
        (metric_value(
            &m,
            "sendwell_jobs_deferred_total{account=\"acme-de\",reason=\"messaging_limit\"}",
        ) >= 2.0)
            .then_some(m)
    })
    .await;
    assert_eq!(
        metric_value(&m, "sendwell_tier_usage_recipients{portfolio=\"acme\"}"),
        3.0
    );
    assert_eq!(
        metric_value(&m, "sendwell_tier_limit_recipients{portfolio=\"acme\"}"),
        3.0
    );
    let sent: Vec<String> = env
        .sandbox
        .accepted()
        .into_iter()
        .filter_map(|r| r.callback_data)
        .collect();
    assert_eq!(sent.len(), 4, "{sent:?}");
    assert!(!sent.iter().any(|id| id == "tier-3" || id == "tier-4"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_limit_errors_back_off_the_pair_and_block_marketing_to_the_number() {
    use sendwell::sandbox::Fault;
    let opts = AppOptions {
        consented: 0..2,
        ..AppOptions::default()
    };
    let env = TestEnv::new(&opts).await;
    let app = env.start().await;
    // 131056 twice for number 0: the pair waits 4^0 = 1 s, then 4^1 = 4 s (capped at
    // retry.max_delay, 2 s in tests), then goes.
    env.sandbox.add_fault(Fault {
        to: Some(number(0)),
        http_status: 400,
        code: 131056,
        message: "(#131056) (Business Account, Consumer Account) pair rate limit hit".into(),
        times: 2,
    });
    // 131049 for number 1: that job fails, and the next marketing job to it is held back.
    env.sandbox.add_fault(Fault {
        to: Some(number(1)),
        http_status: 400,
        code: 131049,
        message:
            "(#131049) This message was not delivered to maintain healthy ecosystem engagement."
                .into(),
        times: 1,
    });
    env.publish(&[
        template_job("pair-1", &number(0)),
        template_job("user-1", &number(1)),
    ])
    .await;
    let finals = env
        .final_outcomes(&["pair-1".into(), "user-1".into()], Duration::from_secs(60))
        .await;
    assert_eq!(finals["pair-1"][0]["status"], "sent");
    assert_eq!(finals["user-1"][0]["status"], "failed");
    assert_eq!(finals["user-1"][0]["reason"], "per_user_limit");
    let tries: Vec<u64> = env
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.callback_data.as_deref() == Some("pair-1"))
        .map(|r| r.at_ms)
        .collect();
    assert_eq!(tries.len(), 3);
    assert!(tries[1] - tries[0] >= 1000, "{tries:?}");
    assert!(tries[2] - tries[1] >= 2000, "{tries:?}");

    env.publish(&[template_job("user-2", &number(1))]).await;
    let admin = app.admin();
    wait_for(
        "the next marketing job deferred for the per-user limit",
        Duration::from_secs(20),
        async || {
            let m = scrape(admin).await?;
            (metric_value(
                &m,
                "sendwell_jobs_deferred_total{account=\"acme-de\",reason=\"per_user_limit\"}",
            ) >= 1.0)
                .then_some(())
        },
    )
    .await;
    assert!(
        !env.sandbox
            .requests()
            .iter()
            .any(|r| r.callback_data.as_deref() == Some("user-2")),
        "no marketing went to the blocked number"
    );
    app.stop().await;
}
