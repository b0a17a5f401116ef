//! End-to-end load bench: the real local RabbitMQ, the daemon in-process, the sandbox at 100 ms
//! latency over HTTP. Publishes N jobs (default 50,000) as fast as the broker confirms them and
//! reports sustained jobs/s (first publish → last outcome) and publish-to-outcome latency.
//!
//! Run: `cargo bench --bench load` (env: SENDWELL_BENCH_JOBS, SENDWELL_BENCH_LATENCY_MS,
//! SENDWELL_BENCH_PREFETCH). Writes target/bench-load.json too.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

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

async fn run() {
    let n: usize = env_or("SENDWELL_BENCH_JOBS", 50_000);
    let latency_ms: u64 = env_or("SENDWELL_BENCH_LATENCY_MS", 100);
    let prefetch: u16 = env_or("SENDWELL_BENCH_PREFETCH", 2000);
    let mut opts = AppOptions::default();
    opts.sandbox.latency = Duration::from_millis(latency_ms);
    opts.prefetch = prefetch;
    opts.extra_toml = String::new();
    // Every recipient has a confirmed opt-in: the bench measures sending, with the consent
    // check on the path as in production.
    opts.consented = 0..n;
    let env = TestEnv::new(&opts).await;
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
        "| jobs | sandbox latency | prefetch | publish took | total | jobs/s | p50 | p99 | outcomes |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    println!(
        "| {finals}/{n} | {latency_ms} ms | {prefetch} | {:.1} s | {:.1} s | {:.0} | {} ms | {} ms | {:?} |",
        publish_took.as_secs_f64(),
        total.as_secs_f64(),
        jobs_per_s,
        pct(0.50).as_millis(),
        pct(0.99).as_millis(),
        statuses
    );
    let json = serde_json::json!({
        "machine": machine, "jobs": n, "finished": finals, "sandbox_latency_ms": latency_ms, "prefetch": prefetch,
        "seconds": total.as_secs_f64(), "jobs_per_second": jobs_per_s,
        "p50_ms": pct(0.50).as_millis() as u64, "p99_ms": pct(0.99).as_millis() as u64, "statuses": statuses,
    });
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write(
        "target/bench-load.json",
        serde_json::to_vec_pretty(&json).unwrap(),
    );
    app.stop().await;
    assert_eq!(finals, n, "every job finished");
}
