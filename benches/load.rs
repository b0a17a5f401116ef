//! End-to-end load bench (issue 8): sendwell's throughput, latency and cost per job, measured the
//! same way every time and side by side with the machine's limit, in one run.
//!
//! Run: `cargo bench --bench load` (needs the local RabbitMQ: `scripts/ensure-rabbitmq.sh`).
//!
//! What one run does:
//!
//! 1. **Baselines** (the machine's limit), the minimal pipeline of `benches/load/baseline.rs`
//!    as a child process (this binary re-executed): consume → parse → publish an outcome with a
//!    confirm → ack, each delivery in a task of its own, prefetch 1,000, no policy, on a quorum
//!    queue behind an `x-consistent-hash` exchange like sendwell's. (a) *broker-only*, and
//!    (b) *HTTP* with a reqwest POST of a Cloud API body to the sandbox at the first latency.
//! 2. **sendwell**, once per latency: `sendwell run --config …` as a child process (the release
//!    binary Cargo built for this bench), with the consent store seeded beforehand, 16 accounts
//!    at 1,000 msgs/s (the Cloud API's maximum; the issue asks for limits that do not bind, and
//!    with 8 accounts the ~7,000 jobs/s this machine reaches already met the gates of the
//!    busiest accounts at times; every check runs either way),
//!    recipient pacing on, the example config's marketing caps, a price table.
//!
//! Every run gets a vhost of its own, a fresh sandbox (in this process: it stands in for Meta,
//! and its CPU is not the daemon's; it is reported with the load generator's as "bench") and
//! the same N jobs from the same publisher: marketing 60 % / utility 30 % / authentication 10 %,
//! all to distinct recipients, 95 % of the marketing and utility ones consented (the rest end
//! `suppressed`), 0.5 % malformed (`invalid` and dead-lettered; a third of them are not even
//! JSON: with no id to name, sendwell publishes no outcome for them, only the dead letter, which
//! the bench counts as their finish).
//!
//! Measured from the first publish to the last final outcome: jobs/s; publish-to-outcome
//! p50/p99/p99.9; the measured process's CPU (utime + stime from `/proc/<pid>/stat`) per job;
//! its peak RSS (`VmHWM`); peak jobs in flight (sendwell: its `sendwell_jobs_in_flight` gauge,
//! scraped every second, as a busy Prometheus would; baseline: its own count) and peak concurrent calls at the sandbox
//! (arrivals within one latency); RabbitMQ's CPU per job (`beam.smp`), the bench process's, and
//! how busy the whole machine was; the measured process's CPU per job by thread name (sendwell:
//! tokio workers, the store's writer, lapin's I/O loop), from `/proc/<pid>/task/*/stat`. Then sendwell's jobs/s and CPU per job as ratios to the
//! baselines, and the targets (reported, never asserted). A table on stdout, JSON in
//! `$CARGO_TARGET_DIR/bench-load.json` (else `target/bench-load.json`; SENDWELL_BENCH_OUT).
//!
//! Environment:
//! - `SENDWELL_BENCH_JOBS` (100000)
//! - `SENDWELL_BENCH_LATENCY_MS` (100): the sandbox's latency; a list such as `100,500` runs
//!   sendwell at each, so latency independence is a same-run ratio
//! - `SENDWELL_BENCH_PREFETCH` (1,000 × accounts = 16,000): sendwell's `broker.prefetch`
//! - `SENDWELL_BENCH_ACCOUNTS` (16)
//! - `SENDWELL_BENCH_BASELINE`: `1` (default) baselines at the first latency, `all` the HTTP
//!   baseline at every latency, `0` none
//! - `SENDWELL_BENCH_BASELINE_PREFETCH` (1000)
//! - `SENDWELL_BENCH_DAEMON_WORKERS`: the daemon's tokio worker threads (default: one per core)
//! - `SENDWELL_BENCH_STALL_S` (60): give up when no outcome arrives for this long
//! - `SENDWELL_BENCH_DAEMONS`: `label=path,…`, daemon binaries to measure one after the other at
//!   each latency (a change's before and after in one run); default: the one Cargo built
//! - `SENDWELL_BENCH_BACKENDS` (`redb`): the state backends, e.g. `redb,postgres`: every daemon
//!   run is repeated on each, side by side in the same report. `postgres` runs on a fresh
//!   database per run (made and dropped with `WITH (FORCE)` through `SENDWELL_TEST_PG_URL` /
//!   `SENDWELL_TEST_PG_PASSWORD`, defaults `postgres://sendwell@127.0.0.1:5432/sendwell` /
//!   `sendwell`, as the tests' databases), seeded with the same consent before the daemon starts.
//!   Every run also reports PostgreSQL's CPU per job (utime + stime of all processes named
//!   `postgres`, cluster-wide: on a redb run it is the idle cluster's), and a postgres run its
//!   database's transactions, rows written and the cluster's WAL per job (`pg_stat_database`,
//!   `pg_stat_wal`: from just before the first publish to after the daemon stopped)
//! - `SENDWELL_BENCH_PG_CLUSTER`: count only this PostgreSQL cluster's processes (Debian's
//!   cluster name, e.g. `15/bench`, as their command lines show it) in PostgreSQL's CPU, when
//!   other clusters on the machine serve other sessions
//! - `SENDWELL_BENCH_RATE` (0): publish at most this many jobs/s; 0 publishes as fast as the
//!   broker confirms, so the jobs queue up and the latencies are mostly time in the queue; a
//!   rate below the throughput measures the pipeline's own latency at that load
//! - `SENDWELL_BENCH_CALLBACKS` (`off`): `both` runs every sendwell run twice, webhooks off (the
//!   base of the ratio) and with Meta's callbacks: the daemon's listener on, the sandbox posting
//!   `sent` (with pricing), `delivered` and `read` for every accepted send, signed, each due as
//!   soon as the one before it was answered, with no cap on how many are in flight; such a run
//!   ends when every sent job's `delivered` and `read` events have come too. `only`: the
//!   callbacks runs alone. Reports callbacks/s, the ratio to the webhooks-off run,
//!   callback → delivery event p50/p99, and two ceilings from the CPU readings: the machine's
//!   CPU per job off ÷ on, and the same had the daemon spent nothing on callbacks
//!   (docs/performance.md, issue 19)
//! - `SENDWELL_BENCH_STATUS_BATCH` (100): statuses in one callback POST at most, those due within
//!   10 ms of each other together, as Meta batches notifications under load; 1: each status in
//!   a POST of its own
//! - `SENDWELL_BENCH_READ_EVENTS` (`on`): `off` leaves `read` out of the daemon's
//!   `[webhook] delivery_events` (an upstream that does not want read receipts): `read`
//!   callbacks are still posted and applied but publish no event, so a callbacks run ends
//!   when every `delivered` event has come and the daemon's
//!   `sendwell_delivery_statuses_total{status="read"}` counts every sent job (polled every
//!   10 ms once the events are in)
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it only says it is skipped.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

#[path = "load/baseline.rs"]
mod baseline;
#[path = "load/daemon.rs"]
mod daemon;
#[path = "load/drive.rs"]
mod drive;
#[path = "load/procfs.rs"]
mod procfs;

/// The daemon's allocator here too: this process is the load generator, the sandbox (Meta's
/// stand-in) and, re-executed, the baseline, all on the same two cores as the daemon. With
/// glibc's malloc, a third of its CPU went to `_int_malloc`, `malloc_consolidate` and `free`
/// (perf, callbacks on), CPU the daemon then did not get, which no deployment pays: Meta's
/// servers are not on the daemon's machine.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};

use common::{GOOD_TOKEN, TestBroker, metric_value};
use daemon::{free_port, tail};
use drive::Jobs;
use procfs::{Probe, Usage};

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(d)
}

fn main() {
    if std::env::var(baseline::ROLE_ENV).as_deref() == Ok("baseline") {
        baseline::child_main();
        return;
    }
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BaselineMode {
    Off,
    First,
    All,
}

#[derive(Debug)]
struct Settings {
    jobs: usize,
    latencies_ms: Vec<u64>,
    accounts: usize,
    prefetch: u16,
    baseline: BaselineMode,
    baseline_prefetch: u16,
    stall: Duration,
    /// Publish at most this many jobs/s (0: as fast as the broker confirms).
    rate: f64,
    /// The daemon binaries to measure, each at every latency, alternating: (label, path). One
    /// unlabelled entry, the binary Cargo built for this bench, unless `SENDWELL_BENCH_DAEMONS`
    /// names others (`before=/path/a,after=/path/b`): a refactor's before and after in one run.
    daemons: Vec<(String, std::path::PathBuf)>,
    /// The state backends every daemon run is repeated on.
    backends: Vec<StateKind>,
    /// Which sendwell runs get Meta's callbacks: webhooks off only, or each run twice, webhooks
    /// off (the ratio's base) then with every callback, or with callbacks only.
    callbacks: CallbacksMode,
    /// With callbacks: whether the daemon publishes `read` as an outcome event
    /// (`[webhook] delivery_events`); off, the run's end waits for its read counter instead.
    read_events: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallbacksMode {
    Off,
    Both,
    Only,
}

impl CallbacksMode {
    /// The webhook settings of each run, in order.
    fn runs(self) -> &'static [bool] {
        match self {
            CallbacksMode::Off => &[false],
            CallbacksMode::Both => &[false, true],
            CallbacksMode::Only => &[true],
        }
    }
}

/// A state backend the daemon runs on (`[state] backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StateKind {
    Redb,
    Postgres,
}

impl StateKind {
    fn name(self) -> &'static str {
        match self {
            StateKind::Redb => "redb",
            StateKind::Postgres => "postgres",
        }
    }
}

impl Settings {
    fn from_env() -> Settings {
        let accounts = env_or("SENDWELL_BENCH_ACCOUNTS", 16usize).clamp(1, 200);
        let mut latencies_ms: Vec<u64> = std::env::var("SENDWELL_BENCH_LATENCY_MS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        if latencies_ms.is_empty() {
            latencies_ms.push(100);
        }
        let baseline = match std::env::var("SENDWELL_BENCH_BASELINE")
            .unwrap_or_default()
            .trim()
        {
            "0" | "off" | "no" | "false" => BaselineMode::Off,
            "all" => BaselineMode::All,
            _ => BaselineMode::First,
        };
        Settings {
            jobs: env_or("SENDWELL_BENCH_JOBS", 100_000usize).max(1),
            latencies_ms,
            accounts,
            // ≥ 1,000 in flight per account (the wish) so that neither 100 nor 500 ms
            // of API latency makes prefetch the bottleneck: 8,000 ≥ 5,000 jobs/s × 0.5 s.
            prefetch: env_or(
                "SENDWELL_BENCH_PREFETCH",
                (1000 * accounts).min(u16::MAX as usize) as u16,
            )
            .max(1),
            baseline,
            baseline_prefetch: env_or("SENDWELL_BENCH_BASELINE_PREFETCH", 1000u16).max(1),
            stall: Duration::from_secs(env_or("SENDWELL_BENCH_STALL_S", 60u64).max(5)),
            rate: env_or("SENDWELL_BENCH_RATE", 0.0f64).max(0.0),
            callbacks: match std::env::var("SENDWELL_BENCH_CALLBACKS")
                .unwrap_or_default()
                .trim()
            {
                "" | "0" | "off" | "no" | "false" => CallbacksMode::Off,
                "1" | "on" | "yes" | "true" | "both" => CallbacksMode::Both,
                "only" => CallbacksMode::Only,
                other => panic!("SENDWELL_BENCH_CALLBACKS: {other:?} is not off, both or only"),
            },
            read_events: match std::env::var("SENDWELL_BENCH_READ_EVENTS")
                .unwrap_or_default()
                .trim()
            {
                "" | "1" | "on" | "yes" | "true" => true,
                "0" | "off" | "no" | "false" => false,
                other => panic!("SENDWELL_BENCH_READ_EVENTS: {other:?} is not on or off"),
            },
            backends: {
                let mut b: Vec<StateKind> = Vec::new();
                for name in std::env::var("SENDWELL_BENCH_BACKENDS")
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                {
                    let k = match name {
                        "redb" => StateKind::Redb,
                        "postgres" | "postgresql" | "pg" => StateKind::Postgres,
                        other => panic!(
                            "SENDWELL_BENCH_BACKENDS: unknown backend {other:?} (redb, postgres)"
                        ),
                    };
                    if !b.contains(&k) {
                        b.push(k);
                    }
                }
                if b.is_empty() {
                    b.push(StateKind::Redb);
                }
                b
            },
            daemons: {
                let named: Vec<(String, std::path::PathBuf)> =
                    std::env::var("SENDWELL_BENCH_DAEMONS")
                        .unwrap_or_default()
                        .split(',')
                        .filter_map(|d| {
                            let (label, path) = d.trim().split_once('=')?;
                            Some((label.to_string(), path.into()))
                        })
                        .collect();
                if named.is_empty() {
                    vec![(String::new(), env!("CARGO_BIN_EXE_sendwell").into())]
                } else {
                    named
                }
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum RunKind {
    BrokerOnly,
    HttpBaseline,
    Sendwell,
}

impl RunKind {
    fn label(self) -> &'static str {
        match self {
            RunKind::BrokerOnly => "baseline: broker only",
            RunKind::HttpBaseline => "baseline: + HTTP",
            RunKind::Sendwell => "sendwell",
        }
    }
}

/// One measured run, as printed and as written to the JSON file.
#[derive(Debug, Serialize)]
struct RunResult {
    kind: RunKind,
    /// Which daemon binary (`SENDWELL_BENCH_DAEMONS`'s label; empty: this build's).
    daemon: String,
    /// sendwell: the state backend it ran on (`redb`, `postgres`); None: a baseline.
    backend: Option<&'static str>,
    /// The sandbox's latency; None: no HTTP step.
    latency_ms: Option<u64>,
    prefetch: u16,
    jobs: usize,
    finished: usize,
    /// Final outcomes repeated for a finished job (at-least-once delivery).
    repeated_outcomes: usize,
    stalled: bool,
    /// First publish → last final outcome.
    seconds: f64,
    /// First publish → last publisher confirm.
    publish_seconds: f64,
    jobs_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    cpu_seconds: Option<f64>,
    cpu_us_per_job: Option<f64>,
    peak_rss_mib: Option<f64>,
    peak_in_flight: Option<u64>,
    /// Most calls at the sandbox within one latency of each other: calls in flight there.
    peak_at_sandbox: Option<usize>,
    /// Published and not yet finished (queued at the broker + in flight), at most.
    peak_outstanding: usize,
    /// sendwell: `basic.ack` frames sent, (multiple, single) (`sendwell_acks_total`).
    acks: Option<(f64, f64)>,
    broker_cpu_us_per_job: Option<f64>,
    /// PostgreSQL's CPU (all its processes, the whole cluster) per job; on a redb run, the idle
    /// cluster's (autovacuum, checkpoints).
    postgres_cpu_us_per_job: Option<f64>,
    /// sendwell on PostgreSQL: its database's work per job.
    postgres_per_job: Option<PgPerJob>,
    /// sendwell on PostgreSQL: how long seeding the consent into the fresh database took.
    seed_seconds: Option<f64>,
    bench_cpu_us_per_job: Option<f64>,
    machine_busy_percent: Option<f64>,
    /// The measured process's CPU µs per job by thread name (sendwell: `tokio-rt-worker` runs
    /// the jobs, HTTP and AMQP handling; `sendwell-ledger` is the store's writer; `lapin-io-loop`
    /// the AMQP socket).
    cpu_us_per_job_by_thread: BTreeMap<String, f64>,
    /// Outcome events by routing key.
    outcomes: BTreeMap<String, usize>,
    /// sendwell: how long the daemon took to become ready (load the consent store, connect).
    start_seconds: Option<f64>,
    exit: Option<String>,
    /// sendwell: per account, the sends at the sandbox and the waits at its limits.
    per_account: Vec<serde_json::Value>,
    /// sendwell with Meta's callbacks (`sent`, `delivered`, `read` per sent message).
    callbacks: bool,
    /// With callbacks: whether `read` was published as an event (`SENDWELL_BENCH_READ_EVENTS`).
    read_events: bool,
    /// With callbacks: what came of them.
    callback_figures: Option<CallbackFigures>,
}

/// A callbacks run: the callbacks, and the delivery events they became.
#[derive(Debug, Serialize)]
struct CallbackFigures {
    /// Status callbacks the sandbox posted and got a 200 for (the listener took them).
    posted: usize,
    /// Callbacks given up after Meta-like retries (no 200 in 10 tries).
    given_up: usize,
    /// Tries beyond the first, over all callbacks (503s while the broker was slow).
    retries: u64,
    /// Delivery events (`delivered` + `read`), each (job, status) once: every sent job's two.
    delivery_events: usize,
    /// Delivery events published again for a (job, status) already seen.
    repeated_delivery_events: usize,
    /// `sent` statuses the daemon applied (`sendwell_delivery_statuses_total{status="sent"}`).
    sent_applied: f64,
    /// Callbacks applied per second: posted ÷ the run's time (first publish → the last
    /// delivery event).
    per_second: f64,
    /// Callback POST (its first try) → its delivery event at the outcome consumer.
    p50_ms: f64,
    p99_ms: f64,
    /// Callbacks whose delivery event could be matched to the sandbox's record of them.
    latency_samples: usize,
}

impl RunResult {
    /// The run's name in the tables: its kind, then the daemon's label when several are
    /// measured and sendwell's state backend.
    fn label(&self) -> String {
        let tags: Vec<&str> = [
            Some(self.daemon.as_str()),
            self.backend,
            self.callbacks.then_some("callbacks"),
            (self.callbacks && !self.read_events).then_some("no read events"),
        ]
        .into_iter()
        .flatten()
        .filter(|t| !t.is_empty())
        .collect();
        match tags.as_slice() {
            [] => self.kind.label().to_string(),
            t => format!("{} ({})", self.kind.label(), t.join(", ")),
        }
    }
}

/// A PostgreSQL run's database work per finished job: its database's transactions and rows
/// (`pg_stat_database`, every session in it: the daemon's writer and pool) and the cluster's WAL
/// (`pg_stat_wal`).
#[derive(Debug, Serialize)]
struct PgPerJob {
    /// Committed transactions: each writer batch is one, and so is each autocommit read.
    transactions: f64,
    rollbacks: f64,
    rows_inserted: f64,
    rows_updated: f64,
    rows_deleted: f64,
    /// Inserted + updated + deleted.
    rows_written: f64,
    /// Rows read by sequential and index scans (`tup_returned`).
    rows_scanned: f64,
    /// Rows fetched by index scans (`tup_fetched`).
    rows_fetched: f64,
    wal_records: f64,
    wal_bytes: f64,
}

/// The counters behind [`PgPerJob`] at one moment.
#[derive(Clone, Copy, Debug)]
struct PgCounters([i64; 9]);

impl PgCounters {
    async fn read(admin: &tokio_postgres::Client, db: &str) -> Option<PgCounters> {
        let row = admin
            .query_one(
                "SELECT d.xact_commit, d.xact_rollback, d.tup_inserted, d.tup_updated, \
                 d.tup_deleted, d.tup_returned, d.tup_fetched, w.wal_records, w.wal_bytes::bigint \
                 FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = $1",
                &[&db],
            )
            .await
            .map_err(|e| eprintln!("reading pg_stat_database: {e}"))
            .ok()?;
        let mut v = [0i64; 9];
        for (i, x) in v.iter_mut().enumerate() {
            *x = row.get(i);
        }
        Some(PgCounters(v))
    }

    fn per_job(a: &PgCounters, b: &PgCounters, jobs: usize) -> PgPerJob {
        let d = |i: usize| (b.0[i] - a.0[i]) as f64 / jobs.max(1) as f64;
        PgPerJob {
            transactions: d(0),
            rollbacks: d(1),
            rows_inserted: d(2),
            rows_updated: d(3),
            rows_deleted: d(4),
            rows_written: d(2) + d(3) + d(4),
            rows_scanned: d(5),
            rows_fetched: d(6),
            wal_records: d(7),
            wal_bytes: d(8),
        }
    }
}

/// A connection to the PostgreSQL server the tests use (`SENDWELL_TEST_PG_URL`), to its own
/// database: the bench's statistics queries are not counted in the run's database.
async fn pg_admin() -> tokio_postgres::Client {
    let url = std::env::var("SENDWELL_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://sendwell@127.0.0.1:5432/sendwell".into());
    let password = std::env::var("SENDWELL_TEST_PG_PASSWORD").unwrap_or_else(|_| "sendwell".into());
    let mut c: tokio_postgres::Config = url.parse().expect("SENDWELL_TEST_PG_URL is a URL");
    c.password(password);
    c.application_name("sendwell-bench");
    c.connect_timeout(Duration::from_secs(5));
    let (client, conn) = c
        .connect(tokio_postgres::NoTls)
        .await
        .expect("the bench connects to PostgreSQL (SENDWELL_TEST_PG_URL)");
    tokio::spawn(conn);
    client
}

/// Waits until no session is connected to `db`: a session's statistics reach
/// `pg_stat_database` when it ends (an idle one's within seconds), so counters read after this
/// hold all of its work. False when some remain after `within`.
async fn sessions_ended(admin: &tokio_postgres::Client, db: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let n: i64 = match admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                &[&db],
            )
            .await
        {
            Ok(row) => row.get(0),
            Err(_) => return false,
        };
        if n == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What `measure` found, before the caller adds what it knows about its process.
struct Measured {
    c: drive::Collected,
    usage: Usage,
    seconds: f64,
    publish_seconds: f64,
    peak_rss_kib: Option<u64>,
}

/// Publishes every job to `exchange` and collects the outcomes from `consumer`, reading the
/// CPU counters of `probe` at the first publish and at the last outcome.
#[allow(clippy::too_many_arguments)]
async fn measure(
    s: &Settings,
    url: &str,
    exchange: &str,
    jobs: &Arc<Jobs>,
    consumer: lapin::Consumer,
    dead: Option<lapin::Consumer>,
    probe: Probe,
    callbacks: bool,
    // With callbacks and `read` published as no event: the daemon's admin address, whose
    // read counter tells when every `read` was applied.
    reads_counted_at: Option<std::net::SocketAddr>,
) -> Measured {
    let times = drive::publish_times(jobs.jobs.len());
    let start = probe.snap();
    let epoch = start.at;
    let publisher = tokio::spawn(drive::publish(
        url.to_string(),
        exchange.to_string(),
        jobs.clone(),
        epoch,
        times.clone(),
        s.rate,
    ));
    let events_per_sent = match (callbacks, reads_counted_at) {
        (false, _) => 0,
        (true, None) => 2,
        (true, Some(_)) => 1,
    };
    let mut c = drive::collect(
        consumer,
        dead,
        jobs,
        epoch,
        &times,
        &probe,
        s.stall,
        events_per_sent,
    )
    .await;
    if let Some(admin) = reads_counted_at
        && !c.stalled
    {
        match drive::reads_applied(&admin, c.sent, s.stall).await {
            true => c.end = probe.snap(),
            false => c.stalled = true,
        }
    }
    let publish_seconds = if c.stalled && !publisher.is_finished() {
        publisher.abort();
        f64::NAN
    } else {
        publisher.await.unwrap().as_secs_f64()
    };
    Measured {
        usage: procfs::usage(&start, &c.end, probe.ticks),
        seconds: (c.end.at - epoch).as_secs_f64(),
        publish_seconds,
        peak_rss_kib: procfs::peak_rss_kib(probe.target),
        c,
    }
}

fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    sorted_us[i] as f64 / 1000.0
}

fn result_from(kind: RunKind, s: &Settings, m: &Measured, latency_ms: Option<u64>) -> RunResult {
    let n = m.c.finished.max(1) as f64;
    let per_job = |x: Option<f64>| x.map(|v| v * 1e6 / n);
    RunResult {
        kind,
        daemon: String::new(),
        backend: None,
        latency_ms,
        prefetch: match kind {
            RunKind::Sendwell => s.prefetch,
            _ => s.baseline_prefetch,
        },
        jobs: s.jobs,
        finished: m.c.finished,
        repeated_outcomes: m.c.repeats,
        stalled: m.c.stalled,
        seconds: m.seconds,
        publish_seconds: m.publish_seconds,
        jobs_per_second: m.c.finished as f64 / m.seconds,
        p50_ms: percentile_ms(&m.c.latencies_us, 0.50),
        p99_ms: percentile_ms(&m.c.latencies_us, 0.99),
        p999_ms: percentile_ms(&m.c.latencies_us, 0.999),
        max_ms: percentile_ms(&m.c.latencies_us, 1.0),
        cpu_seconds: m.usage.target_s,
        cpu_us_per_job: per_job(m.usage.target_s),
        peak_rss_mib: m.peak_rss_kib.map(|k| k as f64 / 1024.0),
        peak_in_flight: None,
        peak_at_sandbox: None,
        peak_outstanding: m.c.peak_outstanding,
        acks: None,
        broker_cpu_us_per_job: per_job(m.usage.broker_s),
        postgres_cpu_us_per_job: per_job(m.usage.postgres_s),
        postgres_per_job: None,
        seed_seconds: None,
        bench_cpu_us_per_job: per_job(m.usage.bench_s),
        machine_busy_percent: m.usage.machine_busy.map(|b| b * 100.0),
        cpu_us_per_job_by_thread: m
            .usage
            .threads_s
            .iter()
            .filter(|(_, v)| **v > 0.0)
            .map(|(k, v)| (k.clone(), v * 1e6 / n))
            .collect(),
        outcomes: m.c.by_key.clone(),
        start_seconds: None,
        exit: None,
        per_account: Vec::new(),
        callbacks: false,
        read_events: true,
        callback_figures: None,
    }
}

/// Calls in flight at the sandbox at most: arrivals within one latency (no jitter is set, so
/// every call stays exactly that long).
fn peak_at_sandbox(sandbox: &drive::RunSandbox, latency_ms: u64) -> Option<usize> {
    if latency_ms == 0 {
        return None;
    }
    let mut at: Vec<u64> = sandbox.handle.requests().iter().map(|r| r.at_ms).collect();
    at.sort_unstable();
    Some(drive::max_in_window(&at, latency_ms))
}

async fn run() {
    let s = Settings::from_env();
    let ticks = procfs::clock_ticks();
    let broker_pid = procfs::find_rabbitmq();
    let machine = machine();
    println!("sendwell load bench — {machine}");
    println!(
        "jobs {} · publish rate {} · accounts {} × 1000/s · sandbox latency {:?} ms · \
         sendwell prefetch {} · baseline prefetch {} · RabbitMQ pid {}",
        s.jobs,
        if s.rate > 0.0 {
            format!("{:.0}/s", s.rate)
        } else {
            "unpaced".into()
        },
        s.accounts,
        s.latencies_ms,
        s.prefetch,
        s.baseline_prefetch,
        broker_pid.map_or("not found".into(), |p| p.to_string())
    );
    let jobs = Arc::new(drive::build_jobs(s.jobs, s.accounts));
    let mut results = Vec::new();

    if s.baseline != BaselineMode::Off {
        let r = run_baseline(&s, &jobs, None, broker_pid, ticks).await;
        progress(&r);
        results.push(r);
        let latencies = match s.baseline {
            BaselineMode::All => s.latencies_ms.clone(),
            _ => vec![s.latencies_ms[0]],
        };
        for l in latencies {
            let r = run_baseline(&s, &jobs, Some(l), broker_pid, ticks).await;
            progress(&r);
            results.push(r);
        }
    }

    // The redb consent store is seeded once, then copied for every sendwell run on redb (a
    // PostgreSQL run seeds its fresh database itself).
    let seeded = tempfile::tempdir().unwrap();
    if s.backends.contains(&StateKind::Redb) {
        let t = Instant::now();
        let grants = seed_template(&s, seeded.path()).await;
        println!(
            "seeded consent for {grants} recipients in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let mut runs = Vec::new();
    for &l in &s.latencies_ms {
        for daemon in &s.daemons {
            for &backend in &s.backends {
                for &callbacks in s.callbacks.runs() {
                    runs.push((l, daemon, backend, callbacks));
                }
            }
        }
    }
    for (l, daemon, backend, callbacks) in runs {
        let r = run_sendwell(
            &s,
            &jobs,
            &seeded.path().join("state"),
            Daemon {
                latency_ms: l,
                binary: daemon,
                backend,
                callbacks,
            },
            broker_pid,
            ticks,
        )
        .await;
        progress(&r);
        results.push(r);
    }

    report(&s, &machine, &results);
}

fn progress(r: &RunResult) {
    eprintln!(
        "  done: {} {} — {}/{} in {:.1} s{}",
        r.label(),
        r.latency_ms.map_or(String::new(), |l| format!("@{l} ms")),
        r.finished,
        r.jobs,
        r.seconds,
        if r.stalled { " (STALLED)" } else { "" }
    );
}

/// The cores, the CPU model and how busy the machine was over one second before the bench
/// started (it may be shared: a busy one makes every run slower, the baselines too).
fn machine() -> String {
    let before = procfs::machine_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let busy = match (before, procfs::machine_ticks()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            format!("{:.0} %", (b1 - b0) as f64 * 100.0 / (t1 - t0) as f64)
        }
        _ => "?".into(),
    };
    format!(
        "{} cores, {}, busy before the start {busy}",
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
            .unwrap_or_default(),
    )
}

/// Seeds consent into `dir/state` with a config like the runs' own (same accounts, purposes).
async fn seed_template(s: &Settings, dir: &Path) -> usize {
    let toml = drive::config_toml(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        &"127.0.0.1:9".parse().unwrap(),
        &dir.join("state"),
        "",
        &"127.0.0.1:0".parse().unwrap(),
        s.prefetch,
        s.accounts,
        None,
    );
    let path = drive::write_config(dir, &toml);
    let config = sendwell::config::Config::load(&path).expect("the bench config is valid");
    drive::seed_consent(&config, s.jobs, s.accounts).await
}

/// The baseline pipeline as a child process; `latency_ms` None: broker only.
async fn run_baseline(
    s: &Settings,
    jobs: &Arc<Jobs>,
    latency_ms: Option<u64>,
    broker_pid: Option<u32>,
    ticks: u64,
) -> RunResult {
    let kind = match latency_ms {
        None => RunKind::BrokerOnly,
        Some(_) => RunKind::HttpBaseline,
    };
    eprintln!(
        "{}{} …",
        kind.label(),
        latency_ms.map_or(String::new(), |l| format!(" @{l} ms"))
    );
    let broker = TestBroker::new().await;
    let sandbox = match latency_ms {
        Some(l) => Some(drive::RunSandbox::start(Duration::from_millis(l), None).await),
        None => None,
    };
    let pid = std::process::id();
    let jobs_name = format!("bench.baseline.{pid}.jobs");
    let dead_name = format!("bench.baseline.{pid}.dead");
    let outcomes_name = format!("bench.baseline.{pid}.outcomes");
    let collected_name = format!("bench.baseline.{pid}.collected");

    // The same shape as sendwell's shard queue: a quorum queue behind an x-consistent-hash
    // exchange, dead-lettering, delivery limit, single active consumer.
    let conn = Connection::connect(&broker.url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (name, kind) in [
        (&jobs_name, ExchangeKind::Custom("x-consistent-hash".into())),
        (&dead_name, ExchangeKind::Fanout),
        (&outcomes_name, ExchangeKind::Topic),
    ] {
        ch.exchange_declare(name.as_str().into(), kind, durable, FieldTable::default())
            .await
            .unwrap();
    }
    ch.queue_declare(
        jobs_name.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        drive::quorum_args(&[
            (
                "x-dead-letter-exchange",
                AMQPValue::LongString(dead_name.as_str().into()),
            ),
            ("x-delivery-limit", AMQPValue::LongLongInt(20)),
            ("x-single-active-consumer", AMQPValue::Boolean(true)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
            (
                "x-dead-letter-strategy",
                AMQPValue::LongString("at-least-once".into()),
            ),
        ]),
    )
    .await
    .unwrap();
    ch.queue_bind(
        jobs_name.as_str().into(),
        jobs_name.as_str().into(),
        "1".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (collector_conn, consumer) =
        drive::observe(&broker.url, &outcomes_name, &collected_name).await;

    let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
    cmd.env(baseline::ROLE_ENV, "baseline")
        .env(baseline::URL_ENV, &broker.url)
        .env(baseline::QUEUE_ENV, &jobs_name)
        .env(baseline::OUTCOMES_ENV, &outcomes_name)
        .env(baseline::PREFETCH_ENV, s.baseline_prefetch.to_string())
        .env(baseline::TOKEN_ENV, GOOD_TOKEN)
        .env(baseline::ACCOUNTS_ENV, s.accounts.to_string())
        .env_remove(baseline::API_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(sb) = &sandbox {
        cmd.env(baseline::API_ENV, format!("http://{}/v21.0", sb.addr));
    }
    let mut child = cmd.spawn().expect("the bench binary re-executes");
    let child_pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
    assert!(
        matches!(&ready, Ok(Ok(Some(l))) if l == "ready"),
        "baseline child did not start: {ready:?}"
    );

    let probe = Probe {
        target: child_pid,
        broker: broker_pid,
        ticks,
    };
    let m = measure(
        s,
        &broker.url,
        &jobs_name,
        jobs,
        consumer,
        None,
        probe,
        false,
        None,
    )
    .await;
    let mut r = result_from(kind, s, &m, latency_ms);

    drop(child.stdin.take());
    let stats = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
    if let Ok(Ok(Some(line))) = stats
        && let Ok(st) = serde_json::from_str::<baseline::ChildStats>(&line)
    {
        r.peak_in_flight = Some(st.peak_in_flight);
        if st.errors > 0 {
            r.exit = Some(format!("{} errors", st.errors));
        }
    }
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(Ok(st)) if st.success() => {}
        other => r.exit = Some(format!("{other:?}")),
    }
    if let (Some(sb), Some(l)) = (&sandbox, latency_ms) {
        r.peak_at_sandbox = peak_at_sandbox(sb, l);
    }

    let _ = collector_conn.close(200, "done".into()).await;
    for q in [&jobs_name, &dead_name, &collected_name] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in [&jobs_name, &dead_name, &outcomes_name] {
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
    drop(broker);
    settle().await;
    r
}

/// A moment for the broker to finish deleting the last run's queues before the next one.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(3)).await;
}

/// The daemon as a child process (`sendwell run --config …`) at one sandbox latency, on one
/// state backend.
#[allow(clippy::too_many_arguments)]
/// What one sendwell run runs.
struct Daemon<'a> {
    latency_ms: u64,
    /// (label, path).
    binary: &'a (String, std::path::PathBuf),
    backend: StateKind,
    /// Meta's callbacks on: the webhook listener enabled, the sandbox posting to it.
    callbacks: bool,
}

async fn run_sendwell(
    s: &Settings,
    jobs: &Arc<Jobs>,
    seeded_state: &Path,
    d: Daemon<'_>,
    broker_pid: Option<u32>,
    ticks: u64,
) -> RunResult {
    let Daemon {
        latency_ms,
        binary: daemon,
        backend,
        callbacks,
    } = d;
    eprintln!(
        "sendwell {} on {} @{latency_ms} ms{} …",
        daemon.0,
        backend.name(),
        if callbacks { " with callbacks" } else { "" }
    );
    let broker = TestBroker::new().await;
    let webhook = callbacks.then(free_port);
    let sandbox =
        drive::RunSandbox::start(Duration::from_millis(latency_ms), webhook.as_ref()).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    // PostgreSQL: a fresh database (dropped WITH (FORCE) when `db` drops), its password in a
    // file only the bench's user reads.
    let db = match backend {
        StateKind::Postgres => {
            let db = common::pg::TestDb::new().await;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&db.password_file, std::fs::Permissions::from_mode(0o600))
                .unwrap();
            Some(db)
        }
        StateKind::Redb => {
            for f in std::fs::read_dir(seeded_state).unwrap().flatten() {
                if f.file_type().map(|t| t.is_file()).unwrap_or(false) {
                    std::fs::copy(f.path(), state.join(f.file_name())).unwrap();
                }
            }
            None
        }
    };
    let admin = free_port();
    let toml = drive::config_toml(
        &broker.url,
        &sandbox.addr,
        &state,
        &common::state_backend_toml(db.as_ref()),
        &admin,
        s.prefetch,
        s.accounts,
        webhook.as_ref(),
    );
    // The daemon's default publishes all three delivery updates; `read` left out, it is
    // applied and counted but publishes no event.
    let toml = if callbacks && !s.read_events {
        toml.replace(
            "verify_token_file = \"verify_token\"\n",
            "verify_token_file = \"verify_token\"\ndelivery_events = [\"delivered\", \"undelivered\"]\n",
        )
    } else {
        toml
    };
    let config = drive::write_config(dir.path(), &toml);
    let (pg, seed_seconds) = match &db {
        Some(db) => {
            let t = Instant::now();
            let c = sendwell::config::Config::load(&config).expect("the bench config is valid");
            let grants = drive::seed_consent(&c, s.jobs, s.accounts).await;
            let pg = pg_admin().await;
            if !sessions_ended(&pg, &db.name, Duration::from_secs(30)).await {
                eprintln!("  the seeding's sessions still run after 30 s: counters include them");
            }
            let secs = t.elapsed().as_secs_f64();
            eprintln!("  seeded consent for {grants} recipients in PostgreSQL in {secs:.1} s");
            (Some(pg), Some(secs))
        }
        None => (None, None),
    };
    let log_path = dir.path().join("sendwell.log");
    let process = daemon::Process::start(&daemon.1, &config, admin, &log_path).await;
    let (pid, start_seconds) = (process.pid, process.start_seconds);
    let http = reqwest::Client::new();
    let (collector_conn, consumer) =
        drive::observe(&broker.url, "sendwell.outcomes", "bench.outcomes").await;
    let (dead_conn, dead) = drive::observe(&broker.url, "sendwell.dead", "bench.dead").await;

    // The daemon's in-flight gauge, sampled while the run lasts.
    let peak = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (peak, stop, http) = (peak.clone(), stop.clone(), http.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(r) = http.get(format!("http://{admin}/metrics")).send().await
                    && let Ok(text) = r.text().await
                {
                    let v = metric_value(&text, "sendwell_jobs_in_flight");
                    peak.fetch_max(v.max(0.0) as u64, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
                }
            }
        })
    };

    let probe = Probe {
        target: pid,
        broker: broker_pid,
        ticks,
    };
    let pg_before = match (&pg, &db) {
        (Some(pg), Some(db)) => PgCounters::read(pg, &db.name).await,
        _ => None,
    };
    let m = measure(
        s,
        &broker.url,
        "sendwell.jobs",
        jobs,
        consumer,
        Some(dead),
        probe,
        callbacks,
        (callbacks && !s.read_events).then_some(admin),
    )
    .await;
    stop.cancel();
    let _ = sampler.await;
    let mut r = result_from(RunKind::Sendwell, s, &m, Some(latency_ms));
    r.callbacks = callbacks;
    r.read_events = s.read_events;
    r.daemon = daemon.0.clone();
    r.backend = Some(backend.name());
    r.seed_seconds = seed_seconds;
    r.start_seconds = Some(start_seconds);
    r.peak_in_flight = Some(peak.load(Ordering::Relaxed));
    r.peak_at_sandbox = peak_at_sandbox(&sandbox, latency_ms);
    let metrics = match http.get(format!("http://{admin}/metrics")).send().await {
        Ok(resp) => resp.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    r.per_account = per_account(s, &sandbox, &metrics);
    if callbacks {
        r.callback_figures = Some(callback_figures(&m, &sandbox, &metrics));
    }
    r.acks = Some((
        metric_value(&metrics, "sendwell_acks_total{kind=\"multiple\"}"),
        metric_value(&metrics, "sendwell_acks_total{kind=\"single\"}"),
    ));

    // SIGTERM: a graceful stop (the state store closes cleanly).
    r.exit = process.stop().await;
    if r.stalled || r.exit.is_some() {
        eprintln!("sendwell's log (tail):\n{}", tail(&log_path));
    }
    // After the daemon stopped and its sessions ended, so their statistics are all in (its
    // shutdown's few writes with them).
    if let (Some(pg), Some(db), Some(before)) = (&pg, &db, pg_before) {
        if !sessions_ended(pg, &db.name, Duration::from_secs(30)).await {
            eprintln!("  the daemon's sessions still run after 30 s: counters may miss some");
        }
        if let Some(after) = PgCounters::read(pg, &db.name).await {
            r.postgres_per_job = Some(PgCounters::per_job(&before, &after, r.finished));
        }
    }
    drop(pg);
    drop(db);
    let _ = collector_conn.close(200, "done".into()).await;
    let _ = dead_conn.close(200, "done".into()).await;
    drop(sandbox);
    drop(broker);
    settle().await;
    r
}

/// What came of the callbacks of a run: matched to their delivery events by (wamid, status).
fn callback_figures(m: &Measured, sandbox: &drive::RunSandbox, metrics: &str) -> CallbackFigures {
    let records = sandbox.handle.callbacks();
    let mut posted_at: std::collections::HashMap<(&str, &str), u64> =
        std::collections::HashMap::with_capacity(records.len());
    let (mut posted, mut given_up, mut retries) = (0, 0, 0u64);
    for r in &records {
        if r.http_status == Some(200) {
            posted += 1;
        } else {
            given_up += 1;
        }
        retries += u64::from(r.attempts.saturating_sub(1));
        if let (Some(w), Some(st)) = (r.wamid.as_deref(), r.status.as_deref()) {
            posted_at.insert((w, st), r.at_ms);
        }
    }
    let mut latencies_us: Vec<u64> =
        m.c.delivery_arrivals
            .iter()
            .filter_map(|(w, st, at)| {
                posted_at
                    .get(&(w.as_str(), *st))
                    .map(|p| at.saturating_sub(*p) * 1000)
            })
            .collect();
    latencies_us.sort_unstable();
    let sent_applied: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("sendwell_delivery_statuses_total{") && l.contains("status=\"sent\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    CallbackFigures {
        posted,
        given_up,
        retries,
        delivery_events: m.c.deliveries,
        repeated_delivery_events: m.c.delivery_repeats,
        sent_applied,
        per_second: posted as f64 / m.seconds,
        p50_ms: percentile_ms(&latencies_us, 0.50),
        p99_ms: percentile_ms(&latencies_us, 0.99),
        latency_samples: latencies_us.len(),
    }
}

/// Per account: sends at the sandbox (rate first → last call, busiest second) and the time jobs
/// waited at its throughput gate and door (from the daemon's metrics).
fn per_account(s: &Settings, sandbox: &drive::RunSandbox, metrics: &str) -> Vec<serde_json::Value> {
    let mut arrivals: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for r in sandbox.handle.requests() {
        arrivals.entry(r.phone_number_id).or_default().push(r.at_ms);
    }
    (0..s.accounts)
        .map(|k| {
            let name = drive::account(k);
            let mut at = arrivals
                .remove(&drive::phone_number_id(k))
                .unwrap_or_default();
            at.sort_unstable();
            let span_s = match (at.first(), at.last()) {
                (Some(a), Some(b)) if b > a => (b - a) as f64 / 1000.0,
                _ => f64::NAN,
            };
            let wait = |stat: &str, limit: &str| {
                metric_value(
                    metrics,
                    &format!(
                        "sendwell_limit_wait_seconds_{stat}{{account=\"{name}\",limit=\"{limit}\"}}"
                    ),
                )
            };
            serde_json::json!({
                "account": name,
                "sent": at.len(),
                "rate_at_sandbox": at.len().saturating_sub(1) as f64 / span_s,
                "busiest_second": drive::max_in_window(&at, 1000),
                "gate_passes": wait("count", "throughput"),
                "gate_wait_seconds": wait("sum", "throughput"),
                "door_waits": wait("count", "door"),
                "door_wait_seconds": wait("sum", "door"),
            })
        })
        .collect()
}

/// A callbacks run's ceilings on 2 busy cores (issue 19): the total CPU per job (daemon,
/// RabbitMQ, bench process, PostgreSQL) webhooks off ÷ with callbacks, and the same with the daemon's callbacks
/// priced at nothing (its webhooks-off CPU on both sides), which is what the broker's and the
/// load generator's own work for the callbacks leave. None when a reading is missing.
fn cpu_bounds(off: &RunResult, on: &RunResult) -> (Option<f64>, Option<f64>) {
    // PostgreSQL's reading is the cluster's: on a redb run, the idle cluster's few µs.
    let total = |r: &RunResult| {
        Some(
            r.cpu_us_per_job?
                + r.broker_cpu_us_per_job?
                + r.bench_cpu_us_per_job?
                + r.postgres_cpu_us_per_job.unwrap_or(0.0),
        )
    };
    let (Some(t_off), Some(t_on), Some(d_off), Some(d_on)) =
        (total(off), total(on), off.cpu_us_per_job, on.cpu_us_per_job)
    else {
        return (None, None);
    };
    (ratio(t_off, t_on), ratio(t_off, t_on - d_on + d_off))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "–".into(),
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (a.is_finite() && b.is_finite() && b > 0.0).then(|| a / b)
}

fn report(s: &Settings, machine: &str, results: &[RunResult]) {
    println!();
    println!("sendwell load bench — {machine}; {} jobs per run", s.jobs);
    println!();
    println!(
        "| run | API latency | prefetch | finished | published in | time | jobs/s | p50 | p99 | p99.9 | CPU µs/job | peak RSS | peak in flight | peak calls at API | RabbitMQ µs/job | PostgreSQL µs/job | bench µs/job | machine busy |"
    );
    println!(
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in results {
        println!(
            "| {} | {} | {} | {}/{}{} | {:.1} s | {:.1} s | {:.0} | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} MiB | {} | {} | {} | {} | {} | {} % |",
            r.label(),
            r.latency_ms.map_or("–".into(), |l| format!("{l} ms")),
            r.prefetch,
            r.finished,
            r.jobs,
            if r.stalled { " STALLED" } else { "" },
            r.publish_seconds,
            r.seconds,
            r.jobs_per_second,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            opt(r.cpu_us_per_job, 0),
            opt(r.peak_rss_mib, 0),
            r.peak_in_flight.map_or("–".into(), |v| v.to_string()),
            r.peak_at_sandbox.map_or("–".into(), |v| v.to_string()),
            opt(r.broker_cpu_us_per_job, 0),
            opt(r.postgres_cpu_us_per_job, 0),
            opt(r.bench_cpu_us_per_job, 0),
            opt(r.machine_busy_percent, 0),
        );
    }

    let find = |k: RunKind| results.iter().find(|r| r.kind == k);
    let broker_only = find(RunKind::BrokerOnly);
    let http = find(RunKind::HttpBaseline);
    let sendwell: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.kind == RunKind::Sendwell)
        .collect();
    let first = sendwell.first().copied();
    let mut ratios = Vec::new();
    println!();
    println!(
        "| sendwell at | jobs/s ÷ broker-only | jobs/s ÷ HTTP baseline | CPU/job ÷ broker-only | CPU/job ÷ HTTP baseline | jobs/s ÷ at {} ms |",
        first.and_then(|f| f.latency_ms).unwrap_or(0)
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in &sendwell {
        // The HTTP baseline at the same latency when there is one, else the first.
        let h = results
            .iter()
            .find(|b| b.kind == RunKind::HttpBaseline && b.latency_ms == r.latency_ms)
            .or(http);
        let cpu = |b: Option<&RunResult>| {
            ratio(
                r.cpu_us_per_job.unwrap_or(f64::NAN),
                b.and_then(|b| b.cpu_us_per_job).unwrap_or(f64::NAN),
            )
        };
        let row = serde_json::json!({
            "latency_ms": r.latency_ms,
            "jobs_per_second_vs_broker_only": broker_only.and_then(|b| ratio(r.jobs_per_second, b.jobs_per_second)),
            "jobs_per_second_vs_http_baseline": h.and_then(|b| ratio(r.jobs_per_second, b.jobs_per_second)),
            "http_baseline_latency_ms": h.and_then(|b| b.latency_ms),
            "cpu_per_job_vs_broker_only": cpu(broker_only),
            "cpu_per_job_vs_http_baseline": cpu(h),
            // Against the first latency's run of the same daemon on the same backend.
            "jobs_per_second_vs_first_latency": sendwell
                .iter()
                .find(|f| f.daemon == r.daemon && f.backend == r.backend && f.callbacks == r.callbacks)
                .and_then(|f| ratio(r.jobs_per_second, f.jobs_per_second)),
        });
        let f = |k: &str| opt(row[k].as_f64(), 2);
        println!(
            "| {} ms | {}× | {}×{} | {}× | {}× | {}× |",
            r.latency_ms.unwrap_or(0),
            f("jobs_per_second_vs_broker_only"),
            f("jobs_per_second_vs_http_baseline"),
            match h.and_then(|b| b.latency_ms) {
                Some(l) if Some(l) != r.latency_ms => format!(" (baseline @{l} ms)"),
                _ => String::new(),
            },
            f("cpu_per_job_vs_broker_only"),
            f("cpu_per_job_vs_http_baseline"),
            f("jobs_per_second_vs_first_latency"),
        );
        ratios.push(row);
    }

    // The backends side by side: each run against the redb run of the same daemon and latency.
    let mut backend_rows = Vec::new();
    if s.backends.len() > 1 || s.backends != [StateKind::Redb] {
        println!();
        println!(
            "| sendwell at | run | jobs/s | ÷ redb jobs/s | p50 | p99 | daemon µs/job | PostgreSQL µs/job | daemon + PostgreSQL µs/job | transactions/job | rows written/job | WAL bytes/job |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &sendwell {
            let redb = sendwell.iter().find(|b| {
                b.backend == Some("redb")
                    && b.daemon == r.daemon
                    && b.latency_ms == r.latency_ms
                    && b.callbacks == r.callbacks
            });
            let vs_redb = redb.and_then(|b| ratio(r.jobs_per_second, b.jobs_per_second));
            let pg = r.postgres_per_job.as_ref();
            let both = r
                .cpu_us_per_job
                .zip(r.postgres_cpu_us_per_job)
                .map(|(a, b)| a + b);
            println!(
                "| {} ms | {} | {:.0} | {}× | {:.0} ms | {:.0} ms | {} | {} | {} | {} | {} | {} |",
                r.latency_ms.unwrap_or(0),
                r.label(),
                r.jobs_per_second,
                opt(vs_redb, 2),
                r.p50_ms,
                r.p99_ms,
                opt(r.cpu_us_per_job, 0),
                opt(r.postgres_cpu_us_per_job, 0),
                opt(both, 0),
                opt(pg.map(|p| p.transactions), 2),
                opt(pg.map(|p| p.rows_written), 2),
                opt(pg.map(|p| p.wal_bytes), 0),
            );
            backend_rows.push(serde_json::json!({
                "latency_ms": r.latency_ms,
                "daemon": r.daemon,
                "backend": r.backend,
                "jobs_per_second_vs_redb": vs_redb,
                "daemon_plus_postgres_cpu_us_per_job": both,
            }));
        }
    }

    // Callbacks: each run with them against the webhooks-off run of the same daemon, backend
    // and latency (issue 19).
    let mut callback_rows = Vec::new();
    if sendwell.iter().any(|r| r.callbacks) {
        println!();
        println!(
            "| with callbacks at | run | jobs/s | ÷ webhooks off | callbacks/s | posted / given up / retries | delivery events (repeated) | daemon µs/job: off → on | RabbitMQ µs/job: off → on | bench µs/job: off → on | CPU bound | bound, free daemon | job p50 / p99 | callback → delivery event p50 / p99 |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in sendwell.iter().filter(|r| r.callbacks) {
            let Some(cb) = &r.callback_figures else {
                continue;
            };
            let off = sendwell.iter().find(|b| {
                !b.callbacks
                    && b.daemon == r.daemon
                    && b.backend == r.backend
                    && b.latency_ms == r.latency_ms
            });
            let vs_off = off.and_then(|b| ratio(r.jobs_per_second, b.jobs_per_second));
            let (bound, free_daemon) = off.map_or((None, None), |b| cpu_bounds(b, r));
            println!(
                "| {} ms | {} | {:.0} | {}× | {:.0} | {} / {} / {} | {} ({}) | {} → {} | {} → {} | {} → {} | {}× | {}× | {:.0} / {:.0} ms | {:.0} / {:.0} ms |",
                r.latency_ms.unwrap_or(0),
                r.label(),
                r.jobs_per_second,
                opt(vs_off, 2),
                cb.per_second,
                cb.posted,
                cb.given_up,
                cb.retries,
                cb.delivery_events,
                cb.repeated_delivery_events,
                opt(off.and_then(|b| b.cpu_us_per_job), 0),
                opt(r.cpu_us_per_job, 0),
                opt(off.and_then(|b| b.broker_cpu_us_per_job), 0),
                opt(r.broker_cpu_us_per_job, 0),
                opt(off.and_then(|b| b.bench_cpu_us_per_job), 0),
                opt(r.bench_cpu_us_per_job, 0),
                opt(bound, 2),
                opt(free_daemon, 2),
                r.p50_ms,
                r.p99_ms,
                cb.p50_ms,
                cb.p99_ms,
            );
            callback_rows.push(serde_json::json!({
                "latency_ms": r.latency_ms,
                "daemon": r.daemon,
                "backend": r.backend,
                "jobs_per_second": r.jobs_per_second,
                "webhooks_off_jobs_per_second": off.map(|b| b.jobs_per_second),
                "jobs_per_second_vs_webhooks_off": vs_off,
                "callbacks_per_second": cb.per_second,
                "cpu_bound": bound,
                "cpu_bound_free_daemon": free_daemon,
            }));
        }
    }

    if !callback_rows.is_empty() {
        println!();
        println!(
            "CPU bound: the machine's CPU per job (daemon, RabbitMQ, bench process, PostgreSQL) off ÷ on: on a machine whose cores are the limit, the ratio cannot beat it. Bound, free daemon: the same if the daemon spent nothing on callbacks (its off figure on both sides): what RabbitMQ's and the load generator's own work for the callbacks leave."
        );
    }

    // The targets: reported, never asserted.
    println!();
    println!("targets (issue 8; reported, not asserted):");
    let mark = |ok: bool| if ok { "met" } else { "NOT met" };
    let paced = s.rate > 0.0;
    if paced {
        println!(
            "- throughput targets not judged: the publisher was paced at {:.0} jobs/s (SENDWELL_BENCH_RATE), so jobs/s is that rate, not a ceiling",
            s.rate
        );
    }
    for (r, row) in sendwell.iter().zip(&ratios) {
        let l = r.latency_ms.unwrap_or(0);
        if !paced && let Some(x) = row["jobs_per_second_vs_broker_only"].as_f64() {
            println!(
                "- @{l} ms: ≥ 0.85× broker-only: {x:.2}× — {}",
                mark(x >= 0.85)
            );
        }
        if let Some(x) = row["jobs_per_second_vs_http_baseline"].as_f64()
            && !paced
        {
            println!(
                "- @{l} ms: ≥ 1.0× HTTP baseline: {x:.2}× — {}",
                mark(x >= 1.0)
            );
        }
        if let Some(c) = r.cpu_us_per_job {
            println!(
                "- @{l} ms{}: daemon CPU ≤ 75 µs/job: {c:.0} µs — {}",
                r.backend.map_or(String::new(), |b| format!(" on {b}")),
                mark(c <= 75.0)
            );
        }
    }
    for row in &callback_rows {
        if !paced && let Some(x) = row["jobs_per_second_vs_webhooks_off"].as_f64() {
            println!(
                "- @{} ms{}: with every callback applied ≥ 0.6× the webhooks-off jobs/s (issue 19): {x:.2}× — {}",
                row["latency_ms"],
                row["backend"]
                    .as_str()
                    .map_or(String::new(), |b| format!(" on {b}")),
                mark(x >= 0.6)
            );
        }
    }
    for row in &backend_rows {
        if !paced
            && row["backend"] == "postgres"
            && let Some(x) = row["jobs_per_second_vs_redb"].as_f64()
        {
            println!(
                "- @{} ms: PostgreSQL ≥ 0.8× redb's jobs/s (issue 17): {x:.2}× — {}",
                row["latency_ms"],
                mark(x >= 0.8)
            );
        }
    }
    // Per daemon and backend: only the latency differs between the runs compared.
    let mut groups: Vec<(&str, Option<&str>)> = Vec::new();
    for r in &sendwell {
        if !groups.contains(&(r.daemon.as_str(), r.backend)) {
            groups.push((r.daemon.as_str(), r.backend));
        }
    }
    for (daemon, backend) in groups {
        let rates: Vec<f64> = sendwell
            .iter()
            .filter(|r| r.daemon == daemon && r.backend == backend)
            .map(|r| r.jobs_per_second)
            .collect();
        if rates.len() < 2 || paced {
            continue;
        }
        let (lo, hi) = rates
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let tags: Vec<&str> = [Some(daemon), backend]
            .into_iter()
            .flatten()
            .filter(|t| !t.is_empty())
            .collect();
        println!(
            "- same throughput at every latency (within 10 %){}: slowest ÷ fastest {:.2} — {}",
            if tags.is_empty() {
                String::new()
            } else {
                format!(" ({})", tags.join(", "))
            },
            lo / hi,
            mark(lo / hi >= 0.9)
        );
    }
    if let Some(h) = http
        && let Some(l) = h.latency_ms.filter(|&l| l > 0)
    {
        let ceiling = h.prefetch as f64 * 1000.0 / l as f64;
        if ceiling < h.jobs_per_second * 1.2 {
            println!(
                "note: the HTTP baseline's prefetch {} at {l} ms allows at most {ceiling:.0} jobs/s: it was bound by its prefetch (SENDWELL_BENCH_BASELINE_PREFETCH)",
                h.prefetch
            );
        }
    }

    for r in &sendwell {
        println!();
        println!(
            "{} @{} ms: ready after {} s{}; outcomes {:?}; repeated final outcomes {}; peak outstanding {}; acks sent: {} multiple, {} single; exit {}",
            r.label(),
            r.latency_ms.unwrap_or(0),
            opt(r.start_seconds, 1),
            r.seed_seconds.map_or(String::new(), |t| format!(
                " (consent seeded in {t:.1} s before)"
            )),
            r.outcomes,
            r.repeated_outcomes,
            r.peak_outstanding,
            opt(r.acks.map(|a| a.0), 0),
            opt(r.acks.map(|a| a.1), 0),
            r.exit.as_deref().unwrap_or("clean")
        );
        let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let rates: Vec<f64> = r
            .per_account
            .iter()
            .map(|a| f(a, "rate_at_sandbox"))
            .collect();
        let busiest = r
            .per_account
            .iter()
            .map(|a| a["busiest_second"].as_u64().unwrap_or(0))
            .max()
            .unwrap_or(0);
        let gate_mean_ms = r
            .per_account
            .iter()
            .map(|a| f(a, "gate_wait_seconds") * 1000.0 / f(a, "gate_passes"))
            .fold(0.0f64, |m, x| if x.is_finite() { m.max(x) } else { m });
        let door: f64 = r
            .per_account
            .iter()
            .map(|a| f(a, "door_waits"))
            .sum::<f64>()
            + 0.0;
        let mut threads: Vec<(&String, &f64)> = r.cpu_us_per_job_by_thread.iter().collect();
        threads.sort_by(|a, b| b.1.total_cmp(a.1));
        println!(
            "  CPU µs/job by thread: {}",
            threads
                .iter()
                .map(|(k, v)| format!("{k} {v:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(p) = &r.postgres_per_job {
            println!(
                "  PostgreSQL per job: {:.2} transactions ({:.3} rolled back), rows {:.2} inserted + {:.2} updated + {:.2} deleted, {:.1} scanned, {:.1} fetched; WAL {:.1} records, {:.0} bytes",
                p.transactions,
                p.rollbacks,
                p.rows_inserted,
                p.rows_updated,
                p.rows_deleted,
                p.rows_scanned,
                p.rows_fetched,
                p.wal_records,
                p.wal_bytes
            );
        }
        println!(
            "  per account (limit 1000/s): rate at the API {:.0}–{:.0}/s, busiest second {busiest}, mean gate wait ≤ {gate_mean_ms:.1} ms, door waits {door:.0}",
            rates.iter().copied().fold(f64::MAX, f64::min),
            rates.iter().copied().fold(0.0, f64::max),
        );
    }
    for r in results.iter().filter(|r| r.kind != RunKind::Sendwell) {
        if let Some(e) = &r.exit {
            println!("{}: {e}", r.kind.label());
        }
    }

    let json = serde_json::json!({
        "machine": machine,
        "settings": {
            "jobs": s.jobs, "latencies_ms": s.latencies_ms, "accounts": s.accounts,
            "account_limit_per_second": 1000, "prefetch": s.prefetch,
            "baseline_prefetch": s.baseline_prefetch,
            "publish_rate_per_second": (s.rate > 0.0).then_some(s.rate),
            "backends": s.backends.iter().map(|b| b.name()).collect::<Vec<_>>(),
            "callbacks": format!("{:?}", s.callbacks).to_lowercase(),
            "mix": "marketing 60% / utility 30% / authentication 10%; 5% of marketing and utility recipients not consented; 0.5% malformed",
        },
        "runs": results,
        "ratios": ratios,
        "backend_ratios": backend_rows,
        "callback_ratios": callback_rows,
    });
    let path = output_path();
    drive::write_json(&path, &json);
}

fn output_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SENDWELL_BENCH_OUT") {
        return p.into();
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| "target".into(), PathBuf::from);
    target.join("bench-load.json")
}
