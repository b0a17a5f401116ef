//! `/metrics` tells the truth: counters scraped from the real admin listener equal what the
//! outcomes queue saw, and the estimated and billed costs equal the price table's sums.
//!
//! One test in this binary: the metrics recorder is process-wide, so another daemon in the same
//! process would add to the counters compared here (the spend guard's test is in `spend.rs`).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use sendwell::sandbox::Fault;

const T: Duration = Duration::from_secs(30);

/// The webhook listener on (the sandbox calls it back with `pricing`), and the tests' price
/// table: marketing to Germany costs 0.1131 EUR.
async fn env(account_limits: String) -> TestEnv {
    env_with_webhook_and_prices(account_limits, 0..20).await
}

fn micros(amount: &str) -> i64 {
    sendwell::pricing::parse_decimal(amount).unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_costs_on_metrics_equal_what_the_outcomes_say() {
    let env = env(RELAXED_LIMITS.into()).await;
    let app = env.start().await;
    env.sandbox.set_webhook(
        Some(format!("http://{}/webhook", app.webhook())),
        Some(APP_SECRET.into()),
    );
    env.sandbox.add_fault(Fault {
        to: Some(number(7)),
        http_status: 400,
        code: 131026,
        message: "(#131026) Message undeliverable".into(),
        times: 1,
    });
    let mut jobs = Vec::new();
    for i in 0..6 {
        jobs.push(template_job(&format!("m-{i}"), &number(i)));
    }
    jobs.push(template_job("m-undeliverable", &number(7)));
    // Not consented: suppressed.
    jobs.push(template_job("m-nobody-1", &number(900)));
    jobs.push(template_job("m-nobody-2", &number(901)));
    env.publish(&jobs).await;
    let ids: Vec<String> = jobs
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    let finals = env.final_outcomes(&ids, T).await;

    // What the outcomes queue saw.
    let mut by_status: HashMap<(String, String), f64> = HashMap::new();
    let mut estimated: i64 = 0;
    for v in finals.values() {
        let e = &v[0];
        let key = (
            e["status"].as_str().unwrap().to_string(),
            e["reason"].as_str().unwrap_or("").to_string(),
        );
        *by_status.entry(key).or_default() += 1.0;
        if let Some(c) = e["estimated_cost"]["amount"].as_str() {
            assert_eq!(e["estimated_cost"]["currency"], "EUR");
            estimated += micros(c);
        }
    }
    assert_eq!(by_status[&("sent".into(), "".into())], 6.0);
    assert_eq!(by_status[&("suppressed".into(), "no_consent".into())], 2.0);
    assert_eq!(by_status[&("failed".into(), "undeliverable".into())], 1.0);
    // The price table's sum: six marketing templates to Germany at 0.1131.
    assert_eq!(estimated, 6 * micros("0.1131"));

    // Billed cost arrives with the delivery callbacks.
    let admin = app.admin();
    let m = wait_for("billed cost for every delivered message", T, async || {
        let m = scrape(admin).await?;
        (metric_value(
            &m,
            "sendwell_billed_cost_microunits_total{account=\"acme-de\"",
        ) >= (6 * micros("0.1131")) as f64)
            .then_some(m)
    })
    .await;
    for ((status, reason), n) in &by_status {
        let line = format!(
            "sendwell_jobs_finished_total{{account=\"acme-de\",status=\"{status}\",reason=\"{reason}\"}}"
        );
        assert_eq!(metric_value(&m, &line), *n, "{line}");
    }
    assert_eq!(
        metric_value(
            &m,
            "sendwell_api_requests_total{account=\"acme-de\",result=\"permanent\",code=\"131026\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "sendwell_estimated_cost_microunits_total{account=\"acme-de\",category=\"marketing\",country=\"DE\",currency=\"EUR\"}"
        ),
        estimated as f64
    );
    assert_eq!(
        metric_value(
            &m,
            "sendwell_billed_cost_microunits_total{account=\"acme-de\",category=\"marketing\",market=\"germany\",country=\"DE\",currency=\"EUR\"}"
        ),
        estimated as f64,
        "billed = estimated: every sent message was delivered and charged"
    );
    assert_eq!(
        metric_value(&m, "sendwell_job_age_seconds_count{account=\"acme-de\""),
        9.0,
        "one age sample per final outcome"
    );
    assert!(m.contains("# HELP sendwell_estimated_cost_microunits_total"));
    app.stop().await;
}
