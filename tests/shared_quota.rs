//! A portfolio's daily tier and an account's daily budget counted across instances on one
//! PostgreSQL state (issue 18; docs/design/instances.md, decision 7): two shards, one instance
//! each, on one database; together they send to at most the tier's recipients and spend about
//! the budget, not each its own. Real RabbitMQ and PostgreSQL (the env's database, whatever
//! `SENDWELL_TEST_BACKEND` says: redb is one process's).
//!
//! A job the quota refuses is deferred: once the limit is reached by what is durably counted,
//! for minutes (it waits in the `2m` delay queue, and comes back long after the test).
//! So the run is over when every job is either sent or waiting there.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use sendwell::config::Config;

const T: Duration = Duration::from_secs(60);

/// The phone number ID of the second instance's account, so that the sandbox's log tells which
/// instance sent a message (the env's sends with 106540352242922).
const SECOND: &str = "106540352242923";

/// A price table without the webhook listener: marketing to Germany (every `number(i)`) costs
/// 0.1131 EUR.
const PRICES: &str = r#"
[prices]
currency = "EUR"
[prices.default]
marketing = "0.0592"
[prices.markets.germany]
calling_codes = ["49"]
marketing = "0.1131"
"#;

/// Starts shard 0's instance (the env's own) and shard 1's on the env's database, both with
/// `adjust`.
async fn two_shards(
    env: &TestEnv,
    extra: &str,
    adjust: impl Fn(&mut Config) + Clone,
) -> (TestApp, TestApp, tempfile::TempDir) {
    let zero = env.start_with(adjust.clone()).await;
    let (one, dir) = env
        .start_instance_on_shared_db(1, extra, |c| {
            adjust(c);
            c.accounts[0].phone_number_id = SECOND.into();
        })
        .await;
    (zero, one, dir)
}

/// Messages waiting in the `2m` delay queue (where a deferral of minutes waits; the shards
/// share it), as the management API counts them (its figures lag by seconds: waits only get
/// longer).
async fn deferred_for_minutes(env: &TestEnv) -> u64 {
    env.broker
        .queue_info(&sendwell::amqp::topology::delay_queue("2m"))
        .await
        .and_then(|i| i.get("messages")?.as_u64())
        .unwrap_or(0)
}

/// Publishes marketing jobs `{prefix}-{i}` to `number(i)` for `i` in `0..n`, then waits until
/// every one is sent or deferred for minutes; returns the ids sent and who sent them.
async fn run(env: &TestEnv, prefix: &str, n: usize) -> HashMap<String, String> {
    let jobs: Vec<_> = (0..n)
        .map(|i| template_job(&format!("{prefix}-{i}"), &number(i)))
        .collect();
    env.publish(&jobs).await;
    let sent = || -> HashMap<String, String> {
        env.sandbox
            .accepted()
            .into_iter()
            .filter_map(|r| Some((r.callback_data?, r.phone_number_id)))
            .filter(|(id, _)| id.starts_with(prefix))
            .collect()
    };
    wait_for("every job sent or deferred for minutes", T, async || {
        let deferred = deferred_for_minutes(env).await as usize;
        let sent = sent();
        (sent.len() + deferred == n).then_some(())
    })
    .await;
    sent()
}

/// A tier of 20 for two shards: 60 new recipients, spread over both; 20 get their message, the
/// others wait, not 20 on each shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_reach_at_most_the_portfolios_tier_together() {
    const TIER: u32 = 20;
    const N: usize = 60;
    let env = TestEnv::new(&AppOptions {
        postgres: true,
        consented: 0..N,
        ..AppOptions::default()
    })
    .await;
    let tier = |c: &mut Config| {
        let p = c.accounts[0].portfolio;
        c.limits.portfolios[p].1 = TIER;
    };
    let (zero, one, _dir) = two_shards(&env, "", tier).await;

    let sent = run(&env, "tier", N).await;
    let by_second = sent.values().filter(|p| *p == SECOND).count();
    eprintln!(
        "sent {} ({} by shard 0, {by_second} by shard 1) of {N}",
        sent.len(),
        sent.len() - by_second
    );
    assert!(
        sent.len() <= TIER as usize,
        "{} distinct recipients reached: the tier is {TIER} for both shards together",
        sent.len()
    );
    // Near the limit the shards share what is left in small chunks: all of it is used.
    assert!(sent.len() >= TIER as usize - 2, "only {} sent", sent.len());
    assert!(
        by_second > 0 && by_second < sent.len(),
        "both shards sent: the recipients are spread over them"
    );
    let m = zero.metrics().await;
    assert!(
        metric_value(
            &m,
            "sendwell_jobs_deferred_total{account=\"acme-de\",reason=\"messaging_limit\"}"
        ) >= (N - sent.len()) as f64
    );
    assert!(metric_value(&m, "sendwell_quota_renewals_total{quota=\"tier\"") > 0.0);
    one.stop().await;
    zero.stop().await;
}

/// A daily budget of 1.00 EUR for two shards, marketing at 0.1131 a message: together they send
/// about 9 (what fits, and what is in flight when it is spent: one per instance here), not 9
/// each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_spend_about_the_accounts_daily_budget_together() {
    const N: usize = 30;
    let env = TestEnv::new(&AppOptions {
        postgres: true,
        consented: 0..N,
        extra_toml: PRICES.into(),
        ..AppOptions::default()
    })
    .await;
    let budget = |c: &mut Config| {
        c.accounts[0].daily_budget = Some(sendwell::pricing::Micros(1_000_000));
        // One job in flight per instance: the guard checks before a send and counts after it,
        // so what is in flight when the budget is spent still goes.
        c.broker.prefetch = 1;
    };
    let (zero, one, _dir) = two_shards(&env, PRICES, budget).await;

    let sent = run(&env, "budget", N).await;
    let by_second = sent.values().filter(|p| *p == SECOND).count();
    eprintln!(
        "sent {} ({} by shard 0, {by_second} by shard 1) of {N}",
        sent.len(),
        sent.len() - by_second
    );
    // 8 × 0.1131 = 0.9048 < 1.00: the 9th goes; one more per instance may be in flight.
    assert!(
        sent.len() <= 9 + 2,
        "{} sent: 1.00 EUR buys 9 for both shards together",
        sent.len()
    );
    assert!(sent.len() >= 8, "only {} sent", sent.len());
    assert!(
        by_second > 0 && by_second < sent.len(),
        "both shards sent: the recipients are spread over them"
    );
    let m = zero.metrics().await;
    assert!(
        metric_value(
            &m,
            "sendwell_jobs_deferred_total{account=\"acme-de\",reason=\"spend_budget\"}"
        ) >= (N - sent.len()) as f64
    );
    assert!(metric_value(&m, "sendwell_quota_lease{quota=\"budget\"") >= 0.0);
    one.stop().await;
    zero.stop().await;
}
