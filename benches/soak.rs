//! Soak bench (issue 19, "an hour at 70 %"): the daemon under a steady load below its capacity,
//! with every callback, for a long time; is anything growing that should not?
//!
//! Run: `SENDWELL_BENCH_SOAK=1h cargo bench --bench soak` (or `10m`, `90s`: humantime
//! durations; needs the local RabbitMQ, `scripts/ensure-rabbitmq.sh`). Without
//! `SENDWELL_BENCH_SOAK` it says it is skipped, so `cargo bench` does not start an hour by
//! accident; without `--bench` (as `cargo test --all-targets` runs it) too.
//!
//! What one run does:
//!
//! 1. **Seed** consent once for a bounded pool of recipients (`SENDWELL_BENCH_SOAK_RECIPIENTS`,
//!    100,000) with the load bench's `drive::seed_consent`, into a redb state copied for each
//!    daemon run.
//! 2. **Capacity**, unless `SENDWELL_BENCH_SOAK_RATE` gives the rate: a daemon of its own (fresh
//!    vhost, fresh state) gets `SENDWELL_BENCH_SOAK_CAPACITY_JOBS` (20,000) jobs as fast as the
//!    broker confirms, with callbacks; capacity = jobs ÷ (first publish → the last delivery
//!    event), as the load bench's callbacks mode counts it.
//! 3. **Soak**: another fresh daemon, jobs published at `SENDWELL_BENCH_SOAK_SHARE` (0.7) of
//!    that capacity, paced (job `j` is due at `j ÷ rate` s), for the soak's duration; then the
//!    outcomes and delivery events still due are waited for (the drain), and the daemon gets
//!    SIGTERM.
//!
//! The jobs are made on the fly, never held: job `j` has the unique id `bench-{j}` and goes to
//! recipient `j mod pool` with that recipient's kind from the load bench (`drive::build_job`):
//! marketing 60 % / utility 30 % / authentication 10 %, 5 % of the marketing and utility
//! recipients without consent (`suppressed`), 0.5 % malformed (`invalid`, dead-lettered; a third
//! of those not JSON, counted by their dead letter). Repeats must still send, so the soak's
//! config replaces the example's marketing caps (1 a day, 2 a week, which would suppress every
//! repeat) with one cap of 1 per W seconds, W = half the time between two visits of a recipient
//! (pool ÷ rate ÷ 2, 1–30 s): the caps' bookkeeping (a durable row per recipient, evicted once
//! idle) runs on every marketing send, and the cap never binds while the pacing holds. Recipient
//! pacing (6 s) binds neither. The ledger keeps job ids for 1 h (`ledger_retention = "1h"`, the
//! least the config allows; it is purged hourly from the daemon's start, so the second purge
//! comes right at the end of a 1 h soak and finds almost nothing past retention): in a run of up
//! to an hour every job's rows stay, so the state file is expected to grow by one job's rows for
//! each job: a ledger entry (with its outcome event) and a jobs-by-number row, and for a sent job
//! its wamid, its delivery state and whatever marks the applied callbacks leave (the bench
//! prints the rows per job of each table): about 660 B of rows, 1.2 kB with the B-trees'
//! metadata and page slack, at 71d0a79, when each callback still left an applied-webhook mark.
//! From the second hour on it would level off at about two hours of jobs.
//!
//! The bench consumes the outcomes and the dead letters all along and only counts them (a byte
//! of flags per job id: which of final, delivered and read came, to count repeats; a latency
//! histogram of 1 ms buckets that every sample empties). The sandbox in this process keeps its
//! logs of sends and callbacks up to 1 M records each (`RECORD_LOG_CAP`, `CALLBACK_LOG_CAP`;
//! about 0.5 GB) and its count of accepted sends per `biz_opaque_callback_data` for every job id
//! (no handle API trims them): the bench process grows by that, the daemon does not; the
//! bench's own RSS is sampled too, to tell them apart.
//!
//! Every `SENDWELL_BENCH_SOAK_SAMPLE` (10 s) it samples the daemon's RSS (`VmRSS`) and open file
//! descriptors (`/proc/<pid>/fd`), the state file's size (`state.redb`, and the state directory
//! as a whole), every queue's ready messages (a passive `queue.declare` over AMQP: the shard
//! queue, the delay queues, the webhook and consent queues, `sendwell.dead`, and the bench's
//! outcome and dead-letter queues), the daemon's `sendwell_jobs_in_flight` gauge, its CPU and
//! the machine's busy share over the interval, the jobs published and finished, and the
//! due-to-outcome latency p50 / p99 of the interval.
//!
//! Growth, over the publishing phase cut in thirds (the first third is the warm-up): the daemon's
//! RSS is *flat* when the last third's mean is within 10 % of the middle third's; the same for
//! RSS less min(store data, 1 GiB), because sendwell leaves redb's page cache at its default of
//! 1 GiB, which fills with the store's pages as it grows (so RSS follows the store until 1 GiB
//! of it is cached; the store's data at each sample is estimated after the run from its tables,
//! the job tables pro rata of the jobs finished by then, as the file itself grows in steps);
//! fds (all, and by kind: connections to the Cloud API, callbacks coming in to the webhook
//! listener, AMQP, admin, other), queue depths and jobs in flight are
//! *bounded* when the last third's maximum is at most 1.1 × the middle third's plus a slack
//! (5 fds; one second of jobs for a queue or in flight); `sendwell.dead` grows by design (dead
//! letters wait for the operator) and is compared with the malformed jobs published instead.
//! The state file: after the run the bench opens it (read-only, then in a write transaction it
//! aborts, the only way redb tells the pages in use) and sums what its tables hold (rows, stored
//! bytes, B-tree metadata and page slack), per job for the tables keyed by job (ledger, jobs by
//! number, wamids, delivery state, applied-webhook marks) and in all. It grows only with what it
//! keeps when the pages in use are what the tables account for (≤ 1.1× + 16 MiB) and the file
//! is at most twice the pages in use (redb doubles its file when it runs out of room, up to its
//! 4 GiB regions). Reported, never asserted.
//!
//! Output: a summary on stdout, JSON at `$CARGO_TARGET_DIR/bench-soak.json` (else
//! `target/bench-soak.json`; `SENDWELL_BENCH_OUT` names another) and the plot beside it with the
//! extension `.svg`: one panel per series (RSS, fds, state file, queue depths, in flight, jobs/s)
//! against minutes since the first publish, the end of publishing marked.
//!
//! Environment (besides the above): `SENDWELL_BENCH_LATENCY_MS` (100, the sandbox's latency),
//! `SENDWELL_BENCH_ACCOUNTS` (16), `SENDWELL_BENCH_PREFETCH` (1,000 × accounts),
//! `SENDWELL_BENCH_STALL_S` (60: the drain gives up when nothing arrives for this long),
//! `SENDWELL_BENCH_DAEMON_WORKERS` (the daemon's tokio workers).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

#[path = "load/daemon.rs"]
mod daemon;
// The load bench's modules: the soak uses some of what they offer.
#[path = "load/drive.rs"]
#[allow(dead_code)]
mod drive;
#[path = "load/procfs.rs"]
#[allow(dead_code)]
mod procfs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use common::{FINAL, TestBroker, metric_value};
use daemon::free_port;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(d)
}

fn env_duration(k: &str) -> Option<Duration> {
    let v = std::env::var(k).ok()?;
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    match humantime::parse_duration(v) {
        Ok(d) => Some(d),
        Err(e) => panic!("{k}: {v:?} is not a duration such as 10m, 1h or 90s ({e})"),
    }
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without --bench: stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "soak bench: skipped (run it with `SENDWELL_BENCH_SOAK=10m cargo bench --bench soak`)"
        );
        return;
    }
    let Some(s) = Settings::from_env() else {
        println!(
            "soak bench: skipped (SENDWELL_BENCH_SOAK is not set: give the soak's length, e.g. 10m or 1h)"
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(s));
}

/// The queues sampled (shard 0's, the shared delay queues, the bench's own).
const QUEUES: &[&str] = &[
    "sendwell.jobs.0",
    "sendwell.delay.1s",
    "sendwell.delay.5s",
    "sendwell.delay.30s",
    "sendwell.delay.2m",
    "sendwell.delay.10m",
    "sendwell.delay.1h",
    "sendwell.webhooks.0",
    "sendwell.consent.0",
    "sendwell.dead",
    "bench.outcomes",
    "bench.dead",
];

/// Dead letters stay for the operator: this queue grows with the malformed jobs by design.
const DEAD_QUEUE: &str = "sendwell.dead";

#[derive(Debug, Serialize)]
struct Settings {
    #[serde(with = "humantime_serde")]
    duration: Duration,
    /// Given (`SENDWELL_BENCH_SOAK_RATE`); None: measured.
    rate: Option<f64>,
    share: f64,
    #[serde(with = "humantime_serde")]
    sample: Duration,
    capacity_jobs: u64,
    /// Recipients cycled over (a multiple of 200, the job mix's period).
    recipients: usize,
    latency_ms: u64,
    accounts: usize,
    prefetch: u16,
    #[serde(with = "humantime_serde")]
    stall: Duration,
}

impl Settings {
    fn from_env() -> Option<Settings> {
        let duration = env_duration("SENDWELL_BENCH_SOAK")?;
        let accounts = env_or("SENDWELL_BENCH_ACCOUNTS", 16usize).clamp(1, 200);
        let recipients = env_or("SENDWELL_BENCH_SOAK_RECIPIENTS", 100_000usize).max(200);
        Some(Settings {
            duration,
            rate: Some(env_or("SENDWELL_BENCH_SOAK_RATE", 0.0f64)).filter(|r| *r > 0.0),
            share: env_or("SENDWELL_BENCH_SOAK_SHARE", 0.7f64).clamp(0.01, 1.0),
            sample: env_duration("SENDWELL_BENCH_SOAK_SAMPLE")
                .unwrap_or(Duration::from_secs(10))
                .max(Duration::from_secs(1)),
            capacity_jobs: env_or("SENDWELL_BENCH_SOAK_CAPACITY_JOBS", 20_000u64).max(1000),
            recipients: recipients.div_ceil(200) * 200,
            latency_ms: std::env::var("SENDWELL_BENCH_LATENCY_MS")
                .ok()
                .and_then(|v| v.split(',').next()?.trim().parse().ok())
                .unwrap_or(100),
            accounts,
            prefetch: env_or(
                "SENDWELL_BENCH_PREFETCH",
                (1000 * accounts).min(u16::MAX as usize) as u16,
            )
            .max(1),
            stall: Duration::from_secs(env_or("SENDWELL_BENCH_STALL_S", 60u64).max(5)),
        })
    }
}

/// What the collector and the publisher count, read by the sampler and the drain.
#[derive(Default)]
struct Tally {
    published: AtomicU64,
    /// Published jobs that are not JSON: their dead letter is their finish.
    anonymous_published: AtomicU64,
    /// Published malformed jobs (dead-lettered by the daemon, kept in `sendwell.dead`).
    malformed_published: AtomicU64,
    /// Jobs with a final outcome, each counted once.
    finished: AtomicU64,
    /// Dead letters that name no job, counted as the finish of a job that is not JSON.
    anonymous_finished: AtomicU64,
    /// Final outcomes again for a job already finished.
    repeats: AtomicU64,
    sent: AtomicU64,
    /// Delivery events (`delivered`, `read`), each (job, status) once.
    deliveries: AtomicU64,
    delivery_repeats: AtomicU64,
    dead_letters: AtomicU64,
    /// Due → final outcome, 1 ms buckets, emptied by every sample (soak phase only).
    latency: Mutex<Histogram>,
}

impl Tally {
    fn all_finished(&self) -> bool {
        self.finished.load(Ordering::Relaxed) + self.anonymous_finished.load(Ordering::Relaxed)
            >= self.published.load(Ordering::Relaxed)
    }

    fn all_delivered(&self) -> bool {
        self.deliveries.load(Ordering::Relaxed) >= 2 * self.sent.load(Ordering::Relaxed)
    }

    /// Everything that arrives, to tell a stall from progress.
    fn arrivals(&self) -> u64 {
        self.finished.load(Ordering::Relaxed)
            + self.repeats.load(Ordering::Relaxed)
            + self.deliveries.load(Ordering::Relaxed)
            + self.delivery_repeats.load(Ordering::Relaxed)
            + self.dead_letters.load(Ordering::Relaxed)
    }
}

const HISTOGRAM_MS: usize = 120_000;

/// Latencies in 1 ms buckets up to 2 min (beyond: the last bucket).
struct Histogram(Vec<u32>);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(vec![0; HISTOGRAM_MS + 1])
    }
}

impl Histogram {
    fn add(&mut self, ms: u64) {
        self.0[(ms as usize).min(HISTOGRAM_MS)] += 1;
    }

    fn percentile(&self, p: f64) -> Option<f64> {
        let n: u64 = self.0.iter().map(|&c| u64::from(c)).sum();
        if n == 0 {
            return None;
        }
        let want = ((n as f64 * p).ceil() as u64).clamp(1, n);
        let mut seen = 0u64;
        for (ms, &c) in self.0.iter().enumerate() {
            seen += u64::from(c);
            if seen >= want {
                return Some(ms as f64);
            }
        }
        None
    }
}

#[derive(serde::Deserialize)]
struct OutcomeHead<'a> {
    #[serde(borrow, default)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    status: Option<std::borrow::Cow<'a, str>>,
}

/// Reads outcomes and dead letters until `stop`, counting into `tally`; returns the outcome
/// events by routing key. `due`: when job `j` was due (paced), for the latency histogram.
async fn collect(
    mut outcomes: lapin::Consumer,
    mut dead: lapin::Consumer,
    tally: Arc<Tally>,
    due: Option<(Instant, f64)>,
    stop: CancellationToken,
) -> BTreeMap<String, u64> {
    // Per job id: bit 0 final, bit 1 delivered, bit 2 read. One byte a job: 3.6 MB for an hour
    // at 1,000 jobs/s, the only thing here that grows with the run.
    let mut flags: Vec<u8> = Vec::new();
    let mut by_key: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let (is_dead, d) = tokio::select! {
            _ = stop.cancelled() => break,
            d = outcomes.next() => (false, d),
            d = dead.next() => (true, d),
        };
        let Some(Ok(d)) = d else {
            eprintln!("soak: the outcome consumer ended");
            break;
        };
        let head = serde_json::from_slice::<OutcomeHead>(&d.data).ok();
        let index = head
            .as_ref()
            .and_then(|h| h.id.as_deref())
            .and_then(drive::index_of)
            .filter(|&j| (j as u64) < tally.published.load(Ordering::Relaxed) + 1_000_000);
        if is_dead {
            tally.dead_letters.fetch_add(1, Ordering::Relaxed);
            *by_key.entry("(dead-lettered)".into()).or_default() += 1;
            if index.is_none() {
                tally.anonymous_finished.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        if let Some(k) = by_key.get_mut(d.routing_key.as_str()) {
            *k += 1;
        } else {
            by_key.insert(d.routing_key.to_string(), 1);
        }
        let (Some(head), Some(j)) = (head, index) else {
            continue;
        };
        if flags.len() <= j {
            flags.resize((j + 1).max(flags.len() * 3 / 2), 0);
        }
        let status = head.status.as_deref().unwrap_or("");
        let bit = match status {
            "delivered" => 2u8,
            "read" => 4,
            s if FINAL.contains(&s) => 1,
            _ => continue,
        };
        if flags[j] & bit != 0 {
            match bit {
                1 => &tally.repeats,
                _ => &tally.delivery_repeats,
            }
            .fetch_add(1, Ordering::Relaxed);
            continue;
        }
        flags[j] |= bit;
        if bit != 1 {
            tally.deliveries.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if status == "sent" {
            tally.sent.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((epoch, rate)) = due {
            let due_at = epoch + Duration::from_secs_f64(j as f64 / rate);
            let ms = Instant::now().saturating_duration_since(due_at).as_millis() as u64;
            tally.latency.lock().unwrap().add(ms);
        }
        tally.finished.fetch_add(1, Ordering::Relaxed);
    }
    by_key
}

/// How many jobs to publish and how fast.
struct Pace {
    /// Jobs/s; 0: as fast as the broker confirms.
    rate: f64,
    /// At most this many jobs.
    jobs: Option<u64>,
    /// Only jobs due before this (paced runs).
    until: Option<Duration>,
}

/// One connection, persistent messages, confirms pipelined in a window of 1,000, as
/// `drive::publish` does; the jobs made one by one as they are due. Returns when the last is
/// confirmed.
async fn publish(
    url: String,
    pace: Pace,
    epoch: Instant,
    recipients: usize,
    accounts: usize,
    tally: Arc<Tally>,
) -> Duration {
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for j in 0u64.. {
        if pace.jobs.is_some_and(|n| j >= n) {
            break;
        }
        if pace.rate > 0.0 {
            let at = Duration::from_secs_f64(j as f64 / pace.rate);
            if pace.until.is_some_and(|u| at >= u) {
                break;
            }
            let due = epoch + at;
            if Instant::now() < due {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let r = (j % recipients as u64) as usize;
        let job = drive::build_job(r, &drive::job_id(j as usize), accounts);
        if let drive::Kind::Malformed(m) = drive::kind(r) {
            tally.malformed_published.fetch_add(1, Ordering::Relaxed);
            if m == 2 {
                tally.anonymous_published.fetch_add(1, Ordering::Relaxed);
            }
        }
        let confirm = ch
            .basic_publish(
                "sendwell.jobs".into(),
                job.routing_key.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                &job.body,
                lapin::BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap();
        tally.published.fetch_add(1, Ordering::Relaxed);
        pending.push(confirm);
        while pending.len() >= 1000 {
            pending.next().await.unwrap().unwrap();
        }
    }
    while let Some(c) = pending.next().await {
        c.unwrap();
    }
    let took = epoch.elapsed();
    let _ = conn.close(200, "published".into()).await;
    took
}

/// Waits until every published job is finished and every sent one's delivery events came, or
/// nothing arrived for `stall`. True: all came.
async fn drained(tally: &Tally, stall: Duration) -> bool {
    let mut last = (tally.arrivals(), Instant::now());
    loop {
        if tally.all_finished() && tally.all_delivered() {
            return true;
        }
        let now = tally.arrivals();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= stall {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One sample of the soak.
#[derive(Clone, Debug, Serialize)]
struct Sample {
    /// Since the first publish.
    seconds: f64,
    /// Still publishing (false: the drain).
    publishing: bool,
    rss_mib: Option<f64>,
    fds: Option<u64>,
    /// The fds by what they are: sockets by their ports (see [`fds_by_kind`]), other.
    fds_by_kind: BTreeMap<String, u64>,
    state_file_mib: Option<f64>,
    /// The state directory as a whole (a compaction's copy shows here).
    state_dir_mib: Option<f64>,
    /// The store's data then, estimated after the run: its tables' bytes at the end, those of
    /// the job tables pro rata of the jobs finished by then (the file grows in steps, this
    /// smoothly; it is what redb's page cache can hold of it).
    state_data_mib: Option<f64>,
    /// Ready messages per queue (None: could not be read).
    queues: BTreeMap<String, Option<u64>>,
    in_flight: Option<f64>,
    published: u64,
    finished: u64,
    deliveries: u64,
    /// Over the interval since the previous sample.
    published_per_second: f64,
    finished_per_second: f64,
    daemon_cpu_percent: Option<f64>,
    machine_busy_percent: Option<f64>,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    /// The bench process itself (the sandbox's logs live here).
    bench_rss_mib: Option<f64>,
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The ports that tell the daemon's sockets apart.
#[derive(Clone, Copy)]
struct Ports {
    /// The sandbox's: the daemon's Cloud API calls go there.
    sandbox: u16,
    /// The daemon's webhook listener: the sandbox's callbacks come in there.
    webhook: u16,
    admin: u16,
}

/// The TCP sockets of the process's network namespace: inode → (local port, remote port).
fn tcp_sockets(pid: u32) -> std::collections::HashMap<u64, (u16, u16)> {
    let mut out = std::collections::HashMap::new();
    for f in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{f}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let v: Vec<&str> = line.split_whitespace().collect();
            let port = |a: &str| u16::from_str_radix(a.rsplit(':').next()?, 16).ok();
            if let (Some(l), Some(r), Some(inode)) = (
                v.get(1).and_then(|a| port(a)),
                v.get(2).and_then(|a| port(a)),
                v.get(9).and_then(|i| i.parse::<u64>().ok()),
            ) {
                out.insert(inode, (l, r));
            }
        }
    }
    out
}

/// The process's fds by kind: `api` (connections to the sandbox), `webhook` (callbacks coming
/// in, and the listener), `amqp`, `admin`, other sockets, and the rest (files, pipes, epoll).
fn fds_by_kind(pid: u32, ports: &Ports) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    let tcp = tcp_sockets(pid);
    for fd in fds.flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        let target = target.to_string_lossy();
        let kind = match target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|i| i.parse::<u64>().ok())
        {
            None => "other",
            Some(inode) => match tcp.get(&inode) {
                Some(&(_, r)) if r == ports.sandbox => "api",
                Some(&(l, _)) if l == ports.webhook => "webhook",
                Some(&(_, 5672)) => "amqp",
                Some(&(l, _)) if l == ports.admin => "admin",
                _ => "other sockets",
            },
        };
        *out.entry(kind.to_string()).or_insert(0) += 1;
    }
    out
}

fn dir_bytes(dir: &Path) -> Option<u64> {
    Some(
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum(),
    )
}

const MIB: f64 = 1024.0 * 1024.0;
/// redb's page cache unless the store sets another (sendwell does not).
const REDB_CACHE_MIB: f64 = 1024.0;
/// The tables with rows for every job (kept for the ledger's retention); the others hold a row
/// per recipient at most (consent, caps, tiers) or per account.
const JOB_TABLES: &[&str] = &[
    "ledger_v1",
    "jobs_by_number_v1",
    "wamids_v1",
    "delivery_v1",
    "webhook_seen_v1",
];

/// Reads queue depths with passive declares on one channel; a queue that is not there closes
/// the channel, so a new one is opened for the next.
struct QueueProbe {
    conn: Connection,
    ch: Option<lapin::Channel>,
}

impl QueueProbe {
    async fn new(url: &str) -> Self {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap();
        QueueProbe { conn, ch: None }
    }

    async fn depth(&mut self, queue: &str) -> Option<u64> {
        if self.ch.as_ref().is_none_or(|c| !c.status().connected()) {
            self.ch = self.conn.create_channel().await.ok();
        }
        let ch = self.ch.as_ref()?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match q {
            Ok(q) => Some(u64::from(q.message_count())),
            Err(_) => {
                self.ch = None;
                None
            }
        }
    }
}

/// What the sampler needs to know about the run.
struct Watch {
    pid: u32,
    admin: std::net::SocketAddr,
    ports: Ports,
    state: PathBuf,
    tally: Arc<Tally>,
    publishing: Arc<AtomicBool>,
    epoch: Instant,
    ticks: u64,
}

/// Samples every `every` until `stop`, and once more then.
async fn sample_loop(
    w: Watch,
    url: String,
    every: Duration,
    stop: CancellationToken,
) -> Vec<Sample> {
    let mut probe = QueueProbe::new(&url).await;
    let http = reqwest::Client::new();
    let mut samples: Vec<Sample> = Vec::new();
    let mut prev = (
        w.epoch,
        0u64,
        0u64,
        procfs::cpu_ticks(w.pid),
        procfs::machine_ticks(),
    );
    let mut next = w.epoch;
    loop {
        next += every;
        let last = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep_until(next.into()) => false,
        };
        let now = Instant::now();
        let mut queues = BTreeMap::new();
        for q in QUEUES {
            queues.insert(q.to_string(), probe.depth(q).await);
        }
        let in_flight = match http
            .get(format!("http://{}/metrics", w.admin))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) => r
                .text()
                .await
                .ok()
                .map(|t| metric_value(&t, "sendwell_jobs_in_flight")),
            Err(_) => None,
        };
        let published = w.tally.published.load(Ordering::Relaxed);
        let finished = w.tally.finished.load(Ordering::Relaxed)
            + w.tally.anonymous_finished.load(Ordering::Relaxed);
        let cpu = procfs::cpu_ticks(w.pid);
        let machine = procfs::machine_ticks();
        let dt = (now - prev.0).as_secs_f64().max(1e-3);
        let hist = std::mem::take(&mut *w.tally.latency.lock().unwrap());
        samples.push(Sample {
            seconds: (now - w.epoch).as_secs_f64(),
            publishing: w.publishing.load(Ordering::Relaxed),
            rss_mib: status_kib(w.pid, "VmRSS:").map(|k| k as f64 / 1024.0),
            fds: open_fds(w.pid),
            fds_by_kind: fds_by_kind(w.pid, &w.ports),
            state_file_mib: std::fs::metadata(w.state.join("state.redb"))
                .ok()
                .map(|m| m.len() as f64 / MIB),
            state_dir_mib: dir_bytes(&w.state).map(|b| b as f64 / MIB),
            state_data_mib: None,
            queues,
            in_flight,
            published,
            finished,
            deliveries: w.tally.deliveries.load(Ordering::Relaxed),
            published_per_second: (published - prev.1) as f64 / dt,
            finished_per_second: finished.saturating_sub(prev.2) as f64 / dt,
            daemon_cpu_percent: match (prev.3, cpu) {
                (Some(a), Some(b)) => Some((b - a) as f64 * 100.0 / w.ticks as f64 / dt),
                _ => None,
            },
            machine_busy_percent: match (prev.4, machine) {
                (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                    Some((b1 - b0) as f64 * 100.0 / (t1 - t0) as f64)
                }
                _ => None,
            },
            latency_p50_ms: hist.percentile(0.50),
            latency_p99_ms: hist.percentile(0.99),
            bench_rss_mib: status_kib(std::process::id(), "VmRSS:").map(|k| k as f64 / 1024.0),
        });
        let s = samples.last().unwrap();
        // A line a minute for whoever watches an hour go by.
        if samples.len() % (60 / every.as_secs().clamp(1, 60)).max(1) as usize == 0 || last {
            eprintln!(
                "  {:5.1} min{}: RSS {} MiB, fds {}, state {} MiB, shard queue {}, in flight {}, {} published, {} finished ({:.0}/s), p99 {} ms, bench RSS {} MiB",
                s.seconds / 60.0,
                if s.publishing { "" } else { " (drain)" },
                opt(s.rss_mib, 0),
                s.fds.map_or("–".into(), |v| v.to_string()),
                opt(s.state_file_mib, 1),
                s.queues["sendwell.jobs.0"].map_or("–".into(), |v| v.to_string()),
                opt(s.in_flight, 0),
                s.published,
                s.finished,
                s.finished_per_second,
                opt(s.latency_p99_ms, 0),
                opt(s.bench_rss_mib, 0),
            );
        }
        prev = (now, published, finished, cpu, machine);
        if last {
            break;
        }
    }
    let _ = probe.conn.close(200, "sampled".into()).await;
    samples
}

/// The redb tables after the run: rows and bytes (keys and values stored, plus the trees'
/// metadata and fragmentation), read from the closed file.
#[derive(Debug, Serialize)]
struct TableSize {
    rows: u64,
    stored_bytes: u64,
    metadata_bytes: u64,
    fragmented_bytes: u64,
}

/// What the closed store holds: its tables, and the bytes of the pages in use (all trees, redb's
/// own included), the rest of the file being free or never used yet.
#[derive(Debug, Serialize)]
struct StoreStats {
    tables: BTreeMap<String, TableSize>,
    pages_in_use_bytes: Option<u64>,
}

fn store_stats(file: &Path) -> Result<StoreStats, String> {
    let tables = table_sizes(file)?;
    // Only a write transaction tells the pages in use; it is aborted, the file stays as it was.
    let pages = (|| -> Result<u64, String> {
        let db = redb::Database::open(file).map_err(|e| e.to_string())?;
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        let st = tx.stats().map_err(|e| e.to_string())?;
        let bytes = st.allocated_pages() * st.page_size() as u64;
        tx.abort().map_err(|e| e.to_string())?;
        Ok(bytes)
    })();
    if let Err(e) = &pages {
        eprintln!("the state file's pages in use could not be read: {e}");
    }
    Ok(StoreStats {
        tables,
        pages_in_use_bytes: pages.ok(),
    })
}

fn table_sizes(file: &Path) -> Result<BTreeMap<String, TableSize>, String> {
    use redb::{ReadableDatabase, ReadableTableMetadata};
    let db = redb::Builder::new()
        .open_read_only(file)
        .map_err(|e| e.to_string())?;
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for handle in tx.list_tables().map_err(|e| e.to_string())? {
        let name = redb::TableHandle::name(&handle).to_string();
        let t = tx.open_untyped_table(handle).map_err(|e| e.to_string())?;
        let st = t.stats().map_err(|e| e.to_string())?;
        out.insert(
            name,
            TableSize {
                rows: t.len().map_err(|e| e.to_string())?,
                stored_bytes: st.stored_bytes(),
                metadata_bytes: st.metadata_bytes(),
                fragmented_bytes: st.fragmented_bytes(),
            },
        );
    }
    Ok(out)
}

/// A daemon run of the bench: its vhost, sandbox, state and process.
struct Run {
    broker: TestBroker,
    sandbox: drive::RunSandbox,
    webhook: std::net::SocketAddr,
    dir: tempfile::TempDir,
    state: PathBuf,
    admin: std::net::SocketAddr,
    process: daemon::Process,
    log_path: PathBuf,
}

/// The soak's config: the load bench's, with the ledger kept 1 h and the marketing caps
/// replaced by one that counts every send and binds no repeat (see the module docs).
fn soak_toml(
    s: &Settings,
    broker: &str,
    sandbox: &std::net::SocketAddr,
    state: &Path,
    admin: &std::net::SocketAddr,
    webhook: &std::net::SocketAddr,
    cap_window_s: u64,
) -> String {
    let toml = drive::config_toml(
        broker,
        sandbox,
        state,
        "ledger_retention = \"1h\"",
        admin,
        s.prefetch,
        s.accounts,
        Some(webhook),
    );
    let example_caps = r#"rules = [{ max = 1, per = "1d" }, { max = 2, per = "7d" }]"#;
    assert!(
        toml.contains(example_caps),
        "drive::config_toml's marketing caps changed: the soak replaces them"
    );
    toml.replace(
        example_caps,
        &format!(r#"rules = [{{ max = 1, per = "{cap_window_s}s" }}]"#),
    )
}

async fn start_run(s: &Settings, seeded: &Path, cap_window_s: u64) -> Run {
    let broker = TestBroker::new().await;
    let webhook = free_port();
    let sandbox =
        drive::RunSandbox::start(Duration::from_millis(s.latency_ms), Some(&webhook)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    for f in std::fs::read_dir(seeded).unwrap().flatten() {
        if f.file_type().map(|t| t.is_file()).unwrap_or(false) {
            std::fs::copy(f.path(), state.join(f.file_name())).unwrap();
        }
    }
    let admin = free_port();
    let toml = soak_toml(
        s,
        &broker.url,
        &sandbox.addr,
        &state,
        &admin,
        &webhook,
        cap_window_s,
    );
    let config = drive::write_config(dir.path(), &toml);
    let log_path = dir.path().join("sendwell.log");
    let process = daemon::Process::start(
        env!("CARGO_BIN_EXE_sendwell").as_ref(),
        &config,
        admin,
        &log_path,
    )
    .await;
    Run {
        broker,
        sandbox,
        webhook,
        dir,
        state,
        admin,
        process,
        log_path,
    }
}

/// What a phase (capacity or soak) ended with.
#[derive(Debug, Serialize)]
struct PhaseResult {
    published: u64,
    finished: u64,
    /// Published = finished (final outcomes, plus dead letters for jobs that are not JSON).
    all_finished: bool,
    repeated_outcomes: u64,
    sent: u64,
    delivery_events: u64,
    /// Two per sent job (`delivered`, `read`).
    all_delivered: bool,
    repeated_delivery_events: u64,
    dead_letters: u64,
    malformed_published: u64,
    outcomes: BTreeMap<String, u64>,
    /// First publish → the last publisher confirm.
    publish_seconds: f64,
    /// First publish → everything in (or the stall).
    seconds: f64,
    stalled: bool,
    start_seconds: f64,
    /// `sent` statuses the daemon applied (`sendwell_delivery_statuses_total{status="sent"}`).
    sent_statuses_applied: f64,
    daemon_cpu_us_per_job: Option<f64>,
    machine_busy_percent: Option<f64>,
    exit: Option<String>,
}

async fn run_phase(
    s: &Settings,
    seeded: &Path,
    cap_window_s: u64,
    pace: Pace,
    sample: Option<Duration>,
) -> (PhaseResult, Vec<Sample>, Option<Result<StoreStats, String>>) {
    let run = start_run(s, seeded, cap_window_s).await;
    let url = run.broker.url.clone();
    let (out_conn, outcomes) = drive::observe(&url, "sendwell.outcomes", "bench.outcomes").await;
    let (dead_conn, dead) = drive::observe(&url, "sendwell.dead", "bench.dead").await;
    let tally = Arc::new(Tally::default());
    let stop = CancellationToken::new();
    let ticks = procfs::clock_ticks();
    let cpu0 = procfs::cpu_ticks(run.process.pid);
    let machine0 = procfs::machine_ticks();
    let epoch = Instant::now();
    let paced = pace.rate > 0.0;
    let collector = tokio::spawn(collect(
        outcomes,
        dead,
        tally.clone(),
        paced.then_some((epoch, pace.rate)),
        stop.clone(),
    ));
    let publishing = Arc::new(AtomicBool::new(true));
    let sampler = sample.map(|every| {
        tokio::spawn(sample_loop(
            Watch {
                pid: run.process.pid,
                admin: run.admin,
                ports: Ports {
                    sandbox: run.sandbox.addr.port(),
                    webhook: run.webhook.port(),
                    admin: run.admin.port(),
                },
                state: run.state.clone(),
                tally: tally.clone(),
                publishing: publishing.clone(),
                epoch,
                ticks,
            },
            url.clone(),
            every,
            stop.clone(),
        ))
    });
    let publish_seconds = publish(
        url.clone(),
        pace,
        epoch,
        s.recipients,
        s.accounts,
        tally.clone(),
    )
    .await
    .as_secs_f64();
    publishing.store(false, Ordering::Relaxed);
    let complete = drained(&tally, s.stall).await;
    let seconds = epoch.elapsed().as_secs_f64();
    let cpu1 = procfs::cpu_ticks(run.process.pid);
    let machine1 = procfs::machine_ticks();
    stop.cancel();
    let samples = match sampler {
        Some(t) => t.await.unwrap(),
        None => Vec::new(),
    };
    let outcomes = collector.await.unwrap();
    let metrics = match reqwest::get(format!("http://{}/metrics", run.admin)).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let sent_applied: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("sendwell_delivery_statuses_total{") && l.contains("status=\"sent\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let Run {
        broker,
        sandbox,
        dir,
        state,
        process,
        log_path,
        ..
    } = run;
    let start_seconds = process.start_seconds;
    let exit = process.stop().await;
    if !complete || exit.is_some() {
        eprintln!("sendwell's log (tail):\n{}", daemon::tail(&log_path));
    }
    let tables = sample.map(|_| store_stats(&state.join("state.redb")));
    let finished =
        tally.finished.load(Ordering::Relaxed) + tally.anonymous_finished.load(Ordering::Relaxed);
    let published = tally.published.load(Ordering::Relaxed);
    let result = PhaseResult {
        published,
        finished,
        all_finished: tally.all_finished(),
        repeated_outcomes: tally.repeats.load(Ordering::Relaxed),
        sent: tally.sent.load(Ordering::Relaxed),
        delivery_events: tally.deliveries.load(Ordering::Relaxed),
        all_delivered: tally.all_delivered(),
        repeated_delivery_events: tally.delivery_repeats.load(Ordering::Relaxed),
        dead_letters: tally.dead_letters.load(Ordering::Relaxed),
        malformed_published: tally.malformed_published.load(Ordering::Relaxed),
        outcomes,
        publish_seconds,
        seconds,
        stalled: !complete,
        start_seconds,
        sent_statuses_applied: sent_applied,
        daemon_cpu_us_per_job: match (cpu0, cpu1) {
            (Some(a), Some(b)) => {
                Some((b - a) as f64 / ticks as f64 * 1e6 / finished.max(1) as f64)
            }
            _ => None,
        },
        machine_busy_percent: match (machine0, machine1) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some((b1 - b0) as f64 * 100.0 / (t1 - t0) as f64)
            }
            _ => None,
        },
        exit,
    };
    let _ = out_conn.close(200, "done".into()).await;
    let _ = dead_conn.close(200, "done".into()).await;
    drop(dir);
    drop(sandbox);
    drop(broker);
    (result, samples, tables)
}

/// Whether a series grew, over the publishing phase: the middle third against the last.
#[derive(Debug, Serialize)]
struct Growth {
    series: String,
    /// `mean` (RSS: flat within 10 %) or `max` (bounded: ≤ 1.1 × middle + slack) or
    /// `bytes_per_job` (the state file).
    compared: &'static str,
    middle: Option<f64>,
    last: Option<f64>,
    ratio: Option<f64>,
    slack: f64,
    grew: Option<bool>,
    note: String,
}

fn thirds(samples: &[Sample]) -> (Vec<&Sample>, Vec<&Sample>) {
    let publishing: Vec<&Sample> = samples.iter().filter(|s| s.publishing).collect();
    let end = publishing.last().map_or(0.0, |s| s.seconds);
    let middle = publishing
        .iter()
        .copied()
        .filter(|s| s.seconds > end / 3.0 && s.seconds <= 2.0 * end / 3.0)
        .collect();
    let last = publishing
        .iter()
        .copied()
        .filter(|s| s.seconds > 2.0 * end / 3.0)
        .collect();
    (middle, last)
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

fn growth(
    samples: &[Sample],
    rate: f64,
    malformed: u64,
    allocated_bytes: Option<u64>,
    in_use_bytes: Option<u64>,
) -> Vec<Growth> {
    let (middle, last) = thirds(samples);
    let series = |f: &dyn Fn(&Sample) -> Option<f64>, of: &[&Sample]| -> Vec<f64> {
        of.iter().filter_map(|s| f(s)).collect()
    };
    let mut out = Vec::new();
    let mut bounded = |name: String, f: &dyn Fn(&Sample) -> Option<f64>, slack: f64, note: &str| {
        let (m, l) = (max(&series(f, &middle)), max(&series(f, &last)));
        out.push(Growth {
            series: name,
            compared: "max",
            middle: m,
            last: l,
            ratio: m.zip(l).and_then(|(m, l)| (m > 0.0).then(|| l / m)),
            slack,
            grew: m.zip(l).map(|(m, l)| l > 1.1 * m + slack),
            note: note.into(),
        });
    };
    bounded("fds".into(), &|s| s.fds.map(|v| v as f64), 5.0, "");
    let kinds: std::collections::BTreeSet<String> = samples
        .iter()
        .flat_map(|s| s.fds_by_kind.keys().cloned())
        .collect();
    for k in kinds {
        bounded(
            format!("fds: {k}"),
            &|s| Some(s.fds_by_kind.get(&k).copied().unwrap_or(0) as f64),
            5.0,
            "",
        );
    }
    bounded(
        "in flight".into(),
        &|s| s.in_flight,
        rate,
        "slack: one second of jobs",
    );
    for q in QUEUES.iter().filter(|q| **q != DEAD_QUEUE) {
        bounded(
            format!("queue {q}"),
            &|s| s.queues.get(*q).copied().flatten().map(|v| v as f64),
            rate,
            "ready messages; slack: one second of jobs",
        );
    }
    let (m, l) = (
        mean(&series(&|s| s.rss_mib, &middle)),
        mean(&series(&|s| s.rss_mib, &last)),
    );
    let ratio = m.zip(l).map(|(m, l)| l / m);
    out.push(Growth {
        series: "RSS MiB".into(),
        compared: "mean",
        middle: m,
        last: l,
        ratio,
        slack: 0.0,
        grew: ratio.map(|r| r > 1.1),
        note: "flat: within 10 %".into(),
    });
    // The dead letters stay for the operator: the queue's end against the malformed jobs.
    let dead_end = samples
        .iter()
        .rev()
        .find_map(|s| s.queues.get(DEAD_QUEUE).copied().flatten());
    out.push(Growth {
        series: format!("queue {DEAD_QUEUE}"),
        compared: "end vs malformed jobs",
        middle: Some(malformed as f64),
        last: dead_end.map(|v| v as f64),
        ratio: dead_end.and_then(|d| (malformed > 0).then(|| d as f64 / malformed as f64)),
        slack: 0.0,
        grew: dead_end.map(|d| d > malformed),
        note: "grows by design (dead letters wait for the operator): at most one per malformed job"
            .into(),
    });
    // RSS beyond what redb's page cache may hold: sendwell leaves redb's cache at its default
    // (1 GiB), which fills with the file's pages as the file grows.
    let beyond = |x: &Sample| Some(x.rss_mib? - x.state_data_mib?.min(REDB_CACHE_MIB));
    let (m, l) = (
        mean(&series(&beyond, &middle)),
        mean(&series(&beyond, &last)),
    );
    let ratio = m.zip(l).and_then(|(m, l)| (m > 0.0).then(|| l / m));
    out.push(Growth {
        series: "RSS − min(state data, 1 GiB) MiB".into(),
        compared: "mean",
        middle: m,
        last: l,
        ratio,
        slack: 0.0,
        grew: ratio.map(|r| r > 1.1),
        note: "the daemon's memory besides redb's page cache (1 GiB by default), if the cache holds all the store's data (estimated per sample from the tables after the run)".into(),
    });
    // The state file after the run: the pages in use against what the tables account for
    // (nothing kept outside them), and the file against the pages in use (redb's growth).
    let file_end = samples.iter().rev().find_map(|x| x.state_file_mib);
    let tables_mib = allocated_bytes.map(|b| b as f64 / MIB);
    let in_use_mib = in_use_bytes.map(|b| b as f64 / MIB);
    let ratio = in_use_mib
        .zip(tables_mib)
        .and_then(|(f, t)| (t > 0.0).then(|| f / t));
    out.push(Growth {
        series: "state: pages in use MiB".into(),
        compared: "end vs its tables",
        middle: tables_mib,
        last: in_use_mib,
        ratio,
        slack: 16.0,
        grew: in_use_mib.zip(tables_mib).map(|(u, t)| u > 1.1 * t + 16.0),
        note: "the tables' bytes (rows, B-tree metadata, page slack) after the run against the pages in use: more would be pages no table accounts for".into(),
    });
    let ratio = file_end
        .zip(in_use_mib)
        .and_then(|(f, u)| (u > 0.0).then(|| f / u));
    out.push(Growth {
        series: "state file MiB".into(),
        compared: "end vs pages in use",
        middle: in_use_mib,
        last: file_end,
        ratio,
        slack: 16.0,
        grew: file_end.zip(in_use_mib).map(|(f, u)| f > 2.0 * u + 16.0),
        note: "redb doubles its file when it runs out of room (up to its 4 GiB regions, then a region at a time): up to 2× the pages in use is that step".into(),
    });
    out
}

fn opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "–".into(),
    }
}

fn output_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SENDWELL_BENCH_OUT") {
        return p.into();
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| "target".into(), PathBuf::from);
    target.join("bench-soak.json")
}

/// The machine's cores, CPU model and how busy it was over one second before the start.
fn machine() -> String {
    let before = procfs::machine_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let busy = match (before, procfs::machine_ticks()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            format!("{:.0} %", (b1 - b0) as f64 * 100.0 / (t1 - t0) as f64)
        }
        _ => "?".into(),
    };
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!(
        "{} cores, {model}, busy before the start {busy}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}

async fn run(s: Settings) {
    let machine = machine();
    println!("sendwell soak bench — {machine}");
    println!(
        "soak {} · rate {} · recipients {} · accounts {} × 1000/s · sandbox latency {} ms · prefetch {} · sample every {}",
        humantime::format_duration(s.duration),
        s.rate.map_or(
            format!(
                "{:.0} % of the capacity measured with {} jobs",
                s.share * 100.0,
                s.capacity_jobs
            ),
            |r| format!("{r:.0}/s (given)")
        ),
        s.recipients,
        s.accounts,
        s.latency_ms,
        s.prefetch,
        humantime::format_duration(s.sample),
    );

    // Consent for the pool, seeded once and copied for each run.
    let seeded = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let grants = {
        let toml = drive::config_toml(
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            &"127.0.0.1:9".parse().unwrap(),
            &seeded.path().join("state"),
            "",
            &"127.0.0.1:0".parse().unwrap(),
            s.prefetch,
            s.accounts,
            None,
        );
        let path = drive::write_config(seeded.path(), &toml);
        let config = sendwell::config::Config::load(&path).expect("the bench config is valid");
        drive::seed_consent(&config, s.recipients, s.accounts).await
    };
    eprintln!(
        "seeded consent for {grants} of {} recipients in {:.1} s",
        s.recipients,
        t.elapsed().as_secs_f64()
    );
    let seeded_state = seeded.path().join("state");

    // The capacity, with callbacks, unless given.
    let (rate, capacity) = match s.rate {
        Some(r) => (r, None),
        None => {
            eprintln!(
                "capacity: {} jobs as fast as they go, with callbacks …",
                s.capacity_jobs
            );
            // Distinct recipients: no cap can bind, the window hardly matters.
            let (c, _, _) = run_phase(
                &s,
                &seeded_state,
                1,
                Pace {
                    rate: 0.0,
                    jobs: Some(s.capacity_jobs.min(s.recipients as u64)),
                    until: None,
                },
                None,
            )
            .await;
            let per_second = c.finished as f64 / c.seconds;
            eprintln!(
                "  capacity {per_second:.0} jobs/s ({} jobs and {} delivery events in {:.1} s{}; exit {})",
                c.finished,
                c.delivery_events,
                c.seconds,
                if c.stalled { ", STALLED" } else { "" },
                c.exit.as_deref().unwrap_or("clean")
            );
            (per_second * s.share, Some((per_second, c)))
        }
    };
    let revisit_s = s.recipients as f64 / rate;
    let cap_window_s = ((revisit_s / 2.0).floor() as u64).clamp(1, 30);
    if revisit_s < 12.0 {
        eprintln!(
            "note: at {rate:.0}/s a recipient comes back every {revisit_s:.1} s: recipient pacing (6 s) binds; raise SENDWELL_BENCH_SOAK_RECIPIENTS"
        );
    }
    eprintln!(
        "soak: {rate:.0} jobs/s for {}, a recipient every {revisit_s:.0} s, marketing cap 1 per {cap_window_s} s …",
        humantime::format_duration(s.duration)
    );
    let (soak, samples, tables) = run_phase(
        &s,
        &seeded_state,
        cap_window_s,
        Pace {
            rate,
            jobs: None,
            until: Some(s.duration),
        },
        Some(s.sample),
    )
    .await;
    let store = match tables {
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            eprintln!("the state file's tables could not be read after the run: {e}");
            None
        }
        None => None,
    };
    let in_use = store.as_ref().and_then(|t| t.pages_in_use_bytes);
    let tables = store.map(|t| t.tables);
    let allocated = |only_jobs: bool| -> Option<u64> {
        tables.as_ref().map(|t| {
            t.iter()
                .filter(|(name, _)| !only_jobs || JOB_TABLES.contains(&name.as_str()))
                .map(|(_, x)| x.stored_bytes + x.metadata_bytes + x.fragmented_bytes)
                .sum()
        })
    };
    // The store's data at each sample, from its tables after the run (see `state_data_mib`).
    let mut samples = samples;
    if let (Some(all), Some(of_jobs)) = (allocated(false), allocated(true)) {
        let per_job = of_jobs as f64 / soak.finished.max(1) as f64;
        for x in &mut samples {
            x.state_data_mib = Some(((all - of_jobs) as f64 + per_job * x.finished as f64) / MIB);
        }
    }
    let growth = growth(
        &samples,
        rate,
        soak.malformed_published,
        allocated(false),
        in_use,
    );
    let first_state = samples.iter().find_map(|x| x.state_file_mib);
    let last_state = samples.iter().rev().find_map(|x| x.state_file_mib);
    let jobs = soak.finished.max(1) as f64;
    let per_job: BTreeMap<&str, serde_json::Value> = tables
        .iter()
        .flatten()
        .filter(|(name, _)| JOB_TABLES.contains(&name.as_str()))
        .map(|(name, t)| {
            (
                name.as_str(),
                serde_json::json!({
                    "rows": t.rows as f64 / jobs,
                    "stored_bytes": t.stored_bytes as f64 / jobs,
                    "allocated_bytes": (t.stored_bytes + t.metadata_bytes + t.fragmented_bytes) as f64 / jobs,
                }),
            )
        })
        .collect();
    let state = serde_json::json!({
        "ledger_retention": "1h",
        "file_mib_first_sample": first_state,
        "file_mib_end": last_state,
        "file_growth_bytes_per_job": first_state.zip(last_state).map(|(a, b)| (b - a) * MIB / jobs),
        "job_tables_stored_bytes_per_job": tables.as_ref().map(|t| t.iter()
            .filter(|(n, _)| JOB_TABLES.contains(&n.as_str()))
            .map(|(_, x)| x.stored_bytes).sum::<u64>() as f64 / jobs),
        "job_tables_allocated_bytes_per_job": allocated(true).map(|b| b as f64 / jobs),
        "all_tables_allocated_mib": allocated(false).map(|b| b as f64 / MIB),
        "pages_in_use_mib": in_use.map(|b| b as f64 / MIB),
        "per_job": per_job,
        "tables": tables,
    });

    report(
        &s, &machine, rate, &capacity, &soak, &samples, &growth, &state,
    );

    let json = serde_json::json!({
        "machine": machine,
        "settings": s,
        "mix": "marketing 60% / utility 30% / authentication 10% over a pool of recipients; 5% of marketing and utility recipients not consented; 0.5% malformed; marketing cap 1 per W s (W = half a recipient's revisit time)",
        "capacity": capacity.as_ref().map(|(per_second, c)| serde_json::json!({
            "jobs_per_second": per_second, "run": c,
        })),
        "rate": rate,
        "marketing_cap_window_seconds": cap_window_s,
        "soak": soak,
        "state": state,
        "growth": growth,
        "samples": samples,
    });
    let path = output_path();
    drive::write_json(&path, &json);
    let svg = path.with_extension("svg");
    match plot(&svg, &samples, rate) {
        Ok(()) => println!("plot: {}", svg.display()),
        Err(e) => println!("plot not written to {}: {e}", svg.display()),
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    s: &Settings,
    machine: &str,
    rate: f64,
    capacity: &Option<(f64, PhaseResult)>,
    soak: &PhaseResult,
    samples: &[Sample],
    growth: &[Growth],
    state: &serde_json::Value,
) {
    println!();
    println!("sendwell soak bench — {machine}");
    if let Some((c, r)) = capacity {
        println!(
            "capacity: {c:.0} jobs/s with callbacks ({} jobs, {} delivery events, {:.1} s, machine busy {} %)",
            r.finished,
            r.delivery_events,
            r.seconds,
            opt(r.machine_busy_percent, 0)
        );
    }
    println!(
        "soak: {rate:.0} jobs/s ({:.0} % of the capacity) for {}; published {} in {:.1} s, everything in after {:.1} s{}",
        s.share * 100.0,
        humantime::format_duration(s.duration),
        soak.published,
        soak.publish_seconds,
        soak.seconds,
        if soak.stalled { " (STALLED)" } else { "" }
    );
    println!(
        "accounted for: {} of {} jobs finished ({}), {} sent, {} of {} delivery events ({}); repeated outcomes {}, repeated delivery events {}; dead letters {}; `sent` statuses applied by the daemon {}",
        soak.finished,
        soak.published,
        if soak.all_finished { "all" } else { "NOT all" },
        soak.sent,
        soak.delivery_events,
        2 * soak.sent,
        if soak.all_delivered { "all" } else { "NOT all" },
        soak.repeated_outcomes,
        soak.repeated_delivery_events,
        soak.dead_letters,
        soak.sent_statuses_applied,
    );
    println!("outcomes: {:?}", soak.outcomes);
    println!(
        "daemon: ready after {:.1} s, CPU {} µs/job, exit {}; machine busy {} % over the soak",
        soak.start_seconds,
        opt(soak.daemon_cpu_us_per_job, 0),
        soak.exit.as_deref().unwrap_or("clean (SIGTERM)"),
        opt(soak.machine_busy_percent, 0)
    );
    let publishing: Vec<&Sample> = samples.iter().filter(|x| x.publishing).collect();
    let at = |f: f64| publishing.get(((publishing.len() as f64 - 1.0) * f).round() as usize);
    println!(
        "RSS start / middle / end: {} / {} / {} MiB; fds {}–{}; state file {} → {} MiB; p99 latency (due → outcome) max {} ms",
        opt(at(0.0).and_then(|x| x.rss_mib), 0),
        opt(at(0.5).and_then(|x| x.rss_mib), 0),
        opt(at(1.0).and_then(|x| x.rss_mib), 0),
        publishing.iter().filter_map(|x| x.fds).min().unwrap_or(0),
        publishing.iter().filter_map(|x| x.fds).max().unwrap_or(0),
        opt(state["file_mib_first_sample"].as_f64(), 1),
        opt(state["file_mib_end"].as_f64(), 1),
        opt(
            max(&publishing
                .iter()
                .filter_map(|x| x.latency_p99_ms)
                .collect::<Vec<_>>()),
            0
        ),
    );
    println!(
        "state (ledger retention 1 h: every job's rows stay): file growth {} B/job; the job tables hold {} B/job of rows, {} B/job with B-tree metadata and page slack; all tables {} MiB, pages in use {} MiB, the file {} MiB",
        opt(state["file_growth_bytes_per_job"].as_f64(), 0),
        opt(state["job_tables_stored_bytes_per_job"].as_f64(), 0),
        opt(state["job_tables_allocated_bytes_per_job"].as_f64(), 0),
        opt(state["all_tables_allocated_mib"].as_f64(), 1),
        opt(state["pages_in_use_mib"].as_f64(), 1),
        opt(state["file_mib_end"].as_f64(), 1),
    );
    if let Some(per_job) = state["per_job"].as_object() {
        println!(
            "  rows per job: {}",
            per_job
                .iter()
                .map(|(k, v)| format!("{k} {:.2}", v["rows"].as_f64().unwrap_or(f64::NAN)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(t) = state["tables"].as_object() {
        println!(
            "  rows in the other tables (per recipient or account, bounded by the pool): {}",
            t.iter()
                .filter(|(k, v)| !JOB_TABLES.contains(&k.as_str()) && v["rows"].as_u64() > Some(0))
                .map(|(k, v)| format!("{k} {}", v["rows"]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!();
    println!("growth (publishing phase, middle third → last third; reported, not asserted):");
    println!("| series | compared | middle | last | ratio | grew |");
    println!("|---|---|---:|---:|---:|---|");
    for g in growth {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            g.series,
            g.compared,
            opt(g.middle, 1),
            opt(g.last, 1),
            opt(g.ratio, 2),
            match g.grew {
                Some(true) => "GREW",
                Some(false) => "no",
                None => "–",
            }
        );
    }
    let queue_max: BTreeMap<&str, u64> = QUEUES
        .iter()
        .map(|q| {
            (
                *q,
                samples
                    .iter()
                    .filter_map(|x| x.queues.get(*q).copied().flatten())
                    .max()
                    .unwrap_or(0),
            )
        })
        .collect();
    println!("queue depths, max over the run: {queue_max:?}");
}

/// One panel per series against minutes since the first publish.
fn plot(path: &Path, samples: &[Sample], rate: f64) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 1500)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!("sendwell soak at {rate:.0} jobs/s (publishing ends at the grey line)"),
        ("sans-serif", 20),
    )?;
    let panels = root.split_evenly((6, 1));
    let minutes = |x: &Sample| x.seconds / 60.0;
    let x_end = samples.last().map_or(1.0, minutes).max(0.1);
    let publish_end = samples.iter().rfind(|x| x.publishing).map(minutes);
    type Series<'a> = (String, Vec<(f64, f64)>);
    let line = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter_map(|x| Some((minutes(x), f(x)?)))
            .collect()
    };
    let mut queues: Vec<Series> = QUEUES
        .iter()
        .map(|q| {
            (
                q.to_string(),
                line(&|x| x.queues.get(*q).copied().flatten().map(|v| v as f64)),
            )
        })
        .collect();
    // Queues that stayed empty would only hide the others' legend.
    queues.retain(|(_, pts)| pts.iter().any(|(_, y)| *y > 0.0));
    let fd_kinds: std::collections::BTreeSet<String> = samples
        .iter()
        .flat_map(|x| x.fds_by_kind.keys().cloned())
        .collect();
    let charts: Vec<(&str, Vec<Series>)> = vec![
        (
            "daemon RSS (MiB)",
            vec![
                ("RSS".into(), line(&|x| x.rss_mib)),
                (
                    "min(state data, redb's 1 GiB cache)".into(),
                    line(&|x| Some(x.state_data_mib?.min(REDB_CACHE_MIB))),
                ),
            ],
        ),
        (
            "open file descriptors",
            std::iter::once(("all".to_string(), line(&|x| x.fds.map(|v| v as f64))))
                .chain(fd_kinds.iter().map(|k| {
                    (
                        k.clone(),
                        line(&|x| Some(x.fds_by_kind.get(k).copied().unwrap_or(0) as f64)),
                    )
                }))
                .collect(),
        ),
        (
            "state (MiB)",
            vec![
                ("state.redb".into(), line(&|x| x.state_file_mib)),
                ("state dir".into(), line(&|x| x.state_dir_mib)),
            ],
        ),
        (
            "queue depths (ready messages; queues always empty left out)",
            queues,
        ),
        (
            "jobs in flight (sendwell_jobs_in_flight)",
            vec![("in flight".into(), line(&|x| x.in_flight))],
        ),
        (
            "jobs/s",
            vec![
                ("published".into(), line(&|x| Some(x.published_per_second))),
                ("finished".into(), line(&|x| Some(x.finished_per_second))),
            ],
        ),
    ];
    for (area, (title, series)) in panels.iter().zip(charts) {
        let y_max = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
            .fold(0.0f64, f64::max)
            .max(1.0)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_end, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .light_line_style(WHITE)
            .draw()?;
        if let Some(end) = publish_end {
            chart.draw_series(LineSeries::new(
                [(end, 0.0), (end, y_max)],
                RGBColor(160, 160, 160),
            ))?;
        }
        let named = series.len() > 1 || title.starts_with("queue");
        for (i, (name, points)) in series.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let drawn = chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
            if named {
                drawn.label(name).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            }
        }
        if named {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}
