//! The spend guard: once an account's estimated spend over the rolling day reaches its daily
//! budget, marketing is deferred while utility still goes; the gauges and the alert's
//! expression say so. (A binary of its own: the metrics recorder is process-wide.)

mod common;

use std::time::Duration;

use common::*;

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
async fn a_spent_budget_holds_marketing_back_while_utility_still_goes() {
    // Budget 0.20 EUR a day; each marketing template to Germany is 0.1131.
    let env = env(format!("{RELAXED_LIMITS}daily_budget = \"0.20\"\n")).await;
    let app = env.start().await;
    env.publish(&[
        template_job("b-1", &number(1)),
        template_job("b-2", &number(2)),
    ])
    .await;
    env.final_outcomes(&["b-1".into(), "b-2".into()], T).await;

    let mut utility = template_job("b-utility", &number(4));
    utility["category"] = "utility".into();
    env.publish(&[template_job("b-3", &number(3)), utility])
        .await;
    let finals = env.final_outcomes(&["b-utility".into()], T).await;
    assert_eq!(finals["b-utility"][0]["status"], "sent");
    let admin = app.admin();
    let m = wait_for("the marketing job deferred by the budget", T, async || {
        let m = scrape(admin).await?;
        (metric_value(
            &m,
            "sendwell_jobs_deferred_total{account=\"acme-de\",reason=\"spend_budget\"}",
        ) >= 1.0)
            .then_some(m)
    })
    .await;
    assert!(
        !env.sandbox
            .requests()
            .iter()
            .any(|r| r.callback_data.as_deref() == Some("b-3")),
        "no marketing after the budget was spent"
    );
    assert_eq!(
        metric_value(&m, "sendwell_spend_guard_active{account=\"acme-de\"}"),
        1.0
    );
    let spent = metric_value(
        &m,
        "sendwell_spend_rolling_day_microunits{account=\"acme-de\",currency=\"EUR\"}",
    );
    let budget = metric_value(
        &m,
        "sendwell_spend_budget_microunits{account=\"acme-de\",currency=\"EUR\"}",
    );
    // Two marketing templates plus one utility (0.0456 to Germany).
    assert_eq!(spent, (2 * micros("0.1131") + micros("0.0456")) as f64);
    assert_eq!(budget, micros("0.20") as f64);
    // The alert rule's expression: spend at 80 % of the budget.
    assert!(spent / budget >= 0.8);
    app.stop().await;
}
