//! End-to-end load bench: the real local RabbitMQ, the daemon in-process, the sandbox at 100 ms
//! latency over HTTP. Publishes N jobs (default 50,000) as fast as the broker confirms them and
//! reports sustained jobs/s (first publish → last outcome) and publish-to-outcome latency.
//!
//! The limits (issue 5) are in place: every account sends at most 1,000 msgs/s (the Cloud API's
//! maximum, the most the config allows) with recipient pacing on (6 s, the default). To measure
//! the pipeline's ceiling rather than one account's rate, the jobs (marketing templates to
//! distinct recipients, each with a confirmed opt-in for its account, so the consent check is on
//! the path) are spread round-robin over several accounts (default 8, i.e. 8,000 msgs/s of
//! allowed throughput, well above the pipeline's ~4,400–5,100 jobs/s). Per account it reports
//! the rate at the sandbox, the busiest second there, and the time jobs waited at the
//! account's throughput gate and door: a few ms per job means the gates only smoothed bunched
//! deliveries; if they bind, raise SENDWELL_BENCH_ACCOUNTS and see whether jobs/s moves.
//!
//! Run: `cargo bench --bench load` (env: SENDWELL_BENCH_JOBS, SENDWELL_BENCH_LATENCY_MS,
//! SENDWELL_BENCH_PREFETCH, SENDWELL_BENCH_ACCOUNTS). Writes target/bench-load.json too.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use sendwell::config::Config;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without --bench: stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("load bench: skipped (run it with `cargo bench --bench load`)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

/// The limits of every bench account: the Cloud API's maximum rate, and recipient pacing as
/// configured by default (6 s; the recipients are distinct, so it checks and never waits).
const ACCOUNT_LIMITS: &str = "messages_per_second = 1000\npacing = { interval = \"6s\" }\n";

/// Account `k` of the bench: `acme-de` (the test config's own) and `acme-1`, `acme-2`, ….
fn account(k: usize) -> String {
    if k == 0 {
        "acme-de".into()
    } else {
        format!("acme-{k}")
    }
}

/// `[[accounts]]` entries for accounts 1.. (same token file, a phone number id of their own).
fn more_accounts(accounts: usize) -> String {
    (1..accounts)
        .map(|k| {
            format!(
                "\n[[accounts]]\nname = \"{}\"\nphone_number_id = \"{}\"\ntoken_file = \"token\"\n{ACCOUNT_LIMITS}",
                account(k),
                phone_number_id(k)
            )
        })
        .collect()
}

/// `acme-de`'s is the test config's; the others follow it.
fn phone_number_id(k: usize) -> String {
    format!("{}", 106_540_352_242_922u64 + k as u64)
}

/// A confirmed double opt-in for `newsletter` for each (number, account), through the consent
/// store itself before the daemon runs, as `common::seed_consent_at` does for `acme-de` alone.
async fn seed_consent(config: &Config, grants: &[(String, String)]) {
    let ledger = sendwell::store::Ledger::open(&config.state.dir).unwrap();
    let store = sendwell::consent::ConsentStore::load(ledger, config)
        .await
        .unwrap();
    let decoder = sendwell::consent::EventDecoder::new(config);
    let now = jiff::Timestamp::now();
    let at = now - Duration::from_secs(3600);
    let grants = grants.iter().map(|(to, account)| {
        let (store, decoder) = (&store, &decoder);
        async move {
            for (kind, dt) in [("opt_in", 0), ("confirm", 60)] {
                let raw = serde_json::json!({
                    "type": kind, "account": account, "to": to,
                    "purposes": ["newsletter"], "source": "bench_seed",
                    "at": (at + Duration::from_secs(dt)).to_string(),
                });
                let ev = decoder
                    .decode(raw.to_string().as_bytes(), now)
                    .expect("seed event is valid");
                store.apply(&ev).await.unwrap();
            }
        }
    });
    futures_util::future::join_all(grants).await;
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

async fn run() {
    let n: usize = env_or("SENDWELL_BENCH_JOBS", 50_000);
    let latency_ms: u64 = env_or("SENDWELL_BENCH_LATENCY_MS", 100);
    let prefetch: u16 = env_or("SENDWELL_BENCH_PREFETCH", 2000);
    let accounts: usize = env_or("SENDWELL_BENCH_ACCOUNTS", 8usize).max(1);
    let mut opts = AppOptions::default();
    opts.sandbox.latency = Duration::from_millis(latency_ms);
    opts.prefetch = prefetch;
    opts.account_limits = ACCOUNT_LIMITS.into();
    opts.extra_toml = more_accounts(accounts);
    // Every recipient has a confirmed opt-in for its job's account (seeded below): the bench
    // measures sending, with the consent check on the path as in production.
    opts.consented = 0..0;
    let env = TestEnv::new(&opts).await;
    let grants: Vec<(String, String)> =
        (0..n).map(|i| (number(i), account(i % accounts))).collect();
    seed_consent(&env.config(), &grants).await;
    let app = env.start().await;

    // A consumer of our own, recording when each outcome arrives.
    let conn = Connection::connect(&env.broker.url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(5000, Default::default()).await.unwrap();
    // A queue of the bench's own (TestEnv's collector reads test.outcomes).
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        "bench.outcomes".into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        "bench.outcomes".into(),
        "sendwell.outcomes".into(),
        "#".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            "bench.outcomes".into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let epoch = Instant::now();
    let jobs: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let mut j = template_job(&format!("bench-{i}"), &number(i));
            j["account"] = account(i % accounts).into();
            j["metadata"] = serde_json::json!({ "i": i });
            j
        })
        .collect();
    let publish_times = std::sync::Arc::new(std::sync::Mutex::new(vec![Duration::ZERO; n]));
    let url = env.broker.url.clone();
    let pt = publish_times.clone();
    // One connection, publisher confirms pipelined in a window, as an upstream service should.
    let publisher = tokio::spawn(async move {
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        let mut pending = futures_util::stream::FuturesUnordered::new();
        for (i, job) in jobs.iter().enumerate() {
            let body = serde_json::to_vec(job).unwrap();
            pt.lock().unwrap()[i] = epoch.elapsed();
            let confirm = ch
                .basic_publish(
                    "sendwell.jobs".into(),
                    sendwell::publish::routing_key(job).into(),
                    lapin::options::BasicPublishOptions::default(),
                    &body,
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap();
            pending.push(confirm);
            while pending.len() >= 1000 {
                pending.next().await.unwrap().unwrap();
            }
        }
        while let Some(c) = pending.next().await {
            c.unwrap();
        }
        epoch.elapsed()
    });

    let mut latencies = Vec::with_capacity(n);
    let mut finals = 0usize;
    let mut statuses: std::collections::BTreeMap<String, usize> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(900);
    while finals < n && Instant::now() < deadline {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await
        else {
            break;
        };
        let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap_or_default();
        let _ = d.ack(BasicAckOptions::default()).await;
        let status = v["status"].as_str().unwrap_or("?").to_string();
        if common::FINAL.contains(&status.as_str()) {
            finals += 1;
            if let Some(i) = v["metadata"]["i"].as_u64() {
                let published = publish_times.lock().unwrap()[i as usize];
                latencies.push(epoch.elapsed().saturating_sub(published));
            }
        }
        *statuses.entry(status).or_default() += 1;
    }
    let total = epoch.elapsed();
    let publish_took = publisher.await.unwrap();
    // Per account: the sends at the sandbox, and the waits at the account's throughput gate.
    let metrics = app.metrics().await;
    let mut arrivals: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for r in env.sandbox.requests() {
        arrivals.entry(r.phone_number_id).or_default().push(r.at_ms);
    }
    let per_account: Vec<serde_json::Value> = (0..accounts)
        .map(|k| {
            let name = account(k);
            let mut at = arrivals.remove(&phone_number_id(k)).unwrap_or_default();
            at.sort_unstable();
            let span_s = match (at.first(), at.last()) {
                (Some(a), Some(b)) if b > a => (b - a) as f64 / 1000.0,
                _ => f64::NAN,
            };
            // Every pass through the gate is recorded (a zero wait too); the door records only
            // actual waits.
            let wait = |s: &str, limit: &str| {
                metric_value(
                    &metrics,
                    &format!(
                        "sendwell_limit_wait_seconds_{s}{{account=\"{name}\",limit=\"{limit}\"}}"
                    ),
                )
            };
            serde_json::json!({
                "account": name,
                "sent": at.len(),
                "rate_at_sandbox": at.len().saturating_sub(1) as f64 / span_s,
                "busiest_second": max_in_one_second(&at),
                "gate_passes": wait("count", "throughput"),
                "gate_wait_seconds": wait("sum", "throughput"),
                "door_waits": wait("count", "door"),
                "door_wait_seconds": wait("sum", "door"),
            })
        })
        .collect();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let jobs_per_s = finals as f64 / total.as_secs_f64();
    let machine = format!(
        "{} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    );
    println!("sendwell load bench — {machine}");
    println!(
        "| jobs | accounts × limit | sandbox latency | prefetch | publish took | total | jobs/s | p50 | p99 | outcomes |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    println!(
        "| {finals}/{n} | {accounts} × 1000/s | {latency_ms} ms | {prefetch} | {:.1} s | {:.1} s | {:.0} | {} ms | {} ms | {:?} |",
        publish_took.as_secs_f64(),
        total.as_secs_f64(),
        jobs_per_s,
        pct(0.50).as_millis(),
        pct(0.99).as_millis(),
        statuses
    );
    println!();
    println!(
        "| account | sent | rate at the sandbox (first → last call) | busiest second there | gate passes | gate wait: total, mean | door waits | door wait total |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    for a in &per_account {
        println!(
            "| {} | {} | {:.0}/s | {} | {:.0} | {:.1} s, {:.1} ms | {:.0} | {:.2} s |",
            a["account"].as_str().unwrap_or(""),
            a["sent"],
            f(&a["rate_at_sandbox"]),
            a["busiest_second"],
            f(&a["gate_passes"]),
            f(&a["gate_wait_seconds"]),
            f(&a["gate_wait_seconds"]) * 1000.0 / f(&a["gate_passes"]),
            f(&a["door_waits"]),
            f(&a["door_wait_seconds"]),
        );
    }
    let json = serde_json::json!({
        "machine": machine, "jobs": n, "finished": finals, "sandbox_latency_ms": latency_ms, "prefetch": prefetch,
        "accounts": accounts, "account_limit_per_second": 1000,
        "seconds": total.as_secs_f64(), "jobs_per_second": jobs_per_s,
        "p50_ms": pct(0.50).as_millis() as u64, "p99_ms": pct(0.99).as_millis() as u64, "statuses": statuses,
        "per_account": per_account,
    });
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write(
        "target/bench-load.json",
        serde_json::to_vec_pretty(&json).unwrap(),
    );
    app.stop().await;
    assert_eq!(finals, n, "every job finished");
}
