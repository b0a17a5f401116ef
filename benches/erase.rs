//! Erasures under load (issue 15, item 6): what a burst of erasures costs the data path on a
//! large store, before and after the fix, in one run.
//!
//! The store: a ledger of finished jobs (outcome event, wamid row, number index row, as the
//! consumer writes them) grown until the file reaches `SENDWELL_BENCH_LEDGER_MB`, about three
//! jobs per number. Then, once per mode on the same file:
//!
//! - *load*: `SENDWELL_BENCH_TASKS` tasks each do a job's store work in a loop, as the consumer
//!   does for every job: dedupe's `Ledger::get`, the final record with its wamid and index rows
//!   (one commit, shared with whatever else is waiting: the writer's group commit), and the
//!   published mark. Jobs/s counts these; no broker and no Cloud API, so the store is all there
//!   is to measure;
//! - *healthz*: an axum `/healthz` on the same runtime (the daemon's answers from a constant, as
//!   here), asked by a plain thread every 10 ms over a fresh connection: its latency is how
//!   long the runtime takes to get to a new task;
//! - after `SENDWELL_BENCH_WARMUP_S` of load alone, `SENDWELL_BENCH_ERASURES` erasures of
//!   distinct numbers are started at once (the daemon runs each in its number's lane, so in
//!   parallel), with the daemon's compactor running; the *window* lasts until every erasure has
//!   returned and the compaction it asked for is done, and at least `SENDWELL_BENCH_WINDOW_S`
//!   (60), so that jobs/s covers the same length of time in both modes.
//!
//! Modes: **old** erases as before the fix (the whole ledger and wamid table scanned per
//! erasure, for jobs whose event names the number), reads wait for the store's lock in place,
//! blocking their tokio worker (`READS_BLOCK_WORKERS`), and the compaction runs in place
//! (`COMPACT_IN_PLACE`: redb's `compact`, the store held throughout); **inplace** is the fix's
//! first half (the number's index rows; reads that must wait hand their worker's tasks on) with
//! the compaction still in place; **new** is the shipped code, which compacts by copy beside
//! the running store and holds it only to swap the copy in.
//!
//! First, the writer thread's CPU per job for a final record with and without its index row
//! (`SENDWELL_BENCH_COST_JOBS`, 100,000 each way, alternated twice). Reported per mode: jobs/s and `/healthz` p50/p99/max before and during the window, the
//! longest gap between two finished jobs, the window's length, and whether a compaction was
//! still due when the last erasure returned (done then, inside the window).
//!
//! Run: `cargo bench --bench erase`. Env: SENDWELL_BENCH_LEDGER_MB (2048), SENDWELL_BENCH_DIR
//! (keep the store there and reuse it when big enough; default a temporary directory),
//! SENDWELL_BENCH_ERASURES (100), SENDWELL_BENCH_TASKS (64), SENDWELL_BENCH_WARMUP_S (5),
//! SENDWELL_BENCH_MODES (`old,inplace,new`). Without `--bench` (`cargo test --all-targets`) it runs
//! once on a 4 MB store with 5 erasures.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use sendwell::consent::ConsentStore;
use sendwell::store::ledger::{COMPACT_IN_PLACE, READS_BLOCK_WORKERS};
use sendwell::store::{KvOp, Ledger, LedgerEntry, LedgerState, Table, index_job};

const ACCOUNT: &str = "acme-de";
const JOBS_PER_NUMBER: u64 = 3;
/// Rows per build commit.
const BATCH: u64 = 20_000;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A job id as upstream makes them (random, UUID-like), so rows land all over the B-tree.
fn job_id(prefix: &str, n: u64) -> String {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    format!("{prefix}{:016x}{:016x}", mix(n), mix(!n))
}

fn number(n: u64) -> String {
    format!("+4915{n:09}")
}

/// A finished job as the consumer records it: final entry, wamid row, index row.
fn finished(id: &str, to: &str, at_ms: i64) -> Vec<KvOp> {
    let wamid = format!("wamid.HBgNNDkxNTE{id:0>40}FQIAERgSMkE3RDY0QjU5QUI3NzQ2NQA=");
    let event = format!(
        r#"{{"id":"{id}","account":"{ACCOUNT}","to":"{to}","status":"sent","wamid":"{wamid}","attempts":1,"estimated_cost":{{"amount":"0.1131","currency":"EUR"}},"at":"2026-12-06T16:00:00Z","metadata":{{"order":"A-{id}","campaign":"winter-sale-2026"}},"category":"marketing"}}"#
    );
    let mut ops = vec![
        KvOp::PutJob {
            id: id.into(),
            entry: LedgerEntry {
                state: LedgerState::Final,
                attempts: 1,
                updated_ms: at_ms,
                published: true,
                event: event.into_bytes(),
            },
        },
        KvOp::Put {
            table: Table::Wamids,
            key: wamid.clone().into_bytes(),
            value: id.as_bytes().to_vec(),
        },
    ];
    ops.extend(index_job(to, id, Some(&wamid)));
    ops
}

fn file_mb(dir: &Path) -> u64 {
    std::fs::metadata(Ledger::file_in(dir))
        .map(|m| m.len() >> 20)
        .unwrap_or(0)
}

/// Grows the store to `mb`; returns how many jobs it holds.
fn build(dir: &Path, mb: u64, rt: &tokio::runtime::Runtime) -> u64 {
    let count_file = dir.join("bench-erase-jobs");
    let have: u64 = std::fs::read_to_string(&count_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if have > 0 && file_mb(dir) >= mb {
        println!("store: reusing {} MB, {have} jobs", file_mb(dir));
        return have;
    }
    let _ = std::fs::remove_file(Ledger::file_in(dir));
    let started = Instant::now();
    let at = Timestamp::now().as_millisecond() - 86_400_000;
    let mut jobs = 0;
    // The open file is larger than what it keeps: measured closed, grown again if short.
    while file_mb(dir) < mb {
        let ledger = Ledger::open(dir).unwrap();
        let until = (jobs + (mb - file_mb(dir)) * (1 << 20) / 600).max(jobs + BATCH);
        while jobs < until {
            let mut ops = Vec::new();
            for _ in 0..BATCH {
                let id = job_id("", jobs);
                ops.extend(finished(&id, &number(jobs / JOBS_PER_NUMBER), at));
                jobs += 1;
            }
            rt.block_on(ledger.kv_many(ops)).unwrap();
        }
        drop(ledger);
        sendwell::store::wait_closed(Duration::from_secs(60));
    }
    let ledger = Ledger::open(dir).unwrap();
    // The index's one-time backfill, found done: this store was written with it.
    rt.block_on(ledger.kv_put(
        Table::StoreMeta,
        b"jobs_by_number_indexed_v1".to_vec(),
        vec![1],
    ))
    .unwrap();
    drop(ledger);
    sendwell::store::wait_closed(Duration::from_secs(60));
    std::fs::write(&count_file, jobs.to_string()).unwrap();
    println!(
        "store: built {} MB, {jobs} jobs, in {:.0} s",
        file_mb(dir),
        started.elapsed().as_secs_f64()
    );
    jobs
}

/// The erasure as it was before the fix: every ledger row and every wamid row read.
async fn old_erase(store: &ConsentStore, digits: &str, at: Timestamp) {
    // The redb handle's own scans, on a blocking thread, as the old erasure ran them.
    let ledger = store.ledger.redb().expect("the bench runs on redb").clone();
    let needle = format!("\"to\":\"+{digits}\"");
    let until_ms = at.as_millisecond();
    let (ids, wamids) = tokio::task::spawn_blocking(move || {
        let ids = ledger
            .job_ids_mentioning(needle.as_bytes(), until_ms)
            .unwrap();
        let wanted: std::collections::HashSet<&[u8]> = ids.iter().map(|i| i.as_bytes()).collect();
        let mut wamids = Vec::new();
        ledger
            .kv_for_each(Table::Wamids, |k, v| {
                if wanted.contains(v) {
                    wamids.push(k.to_vec());
                }
            })
            .unwrap();
        (ids, wamids)
    })
    .await
    .unwrap();
    let mut ops: Vec<KvOp> = wamids
        .into_iter()
        .map(|key| KvOp::Delete {
            table: Table::Wamids,
            key,
        })
        .collect();
    ops.push(KvOp::DeleteJobs { ids });
    store.ledger.kv_many(ops).await.unwrap();
    // The rest (consent rows, tombstone, the compaction request) as shipped: its index lookup
    // now finds rows whose jobs are gone, a handful of point reads.
    store.erase(digits, at).await.unwrap();
}

/// `/healthz` latencies measured from a plain thread, each with when it was asked.
struct Prober {
    stop: Arc<AtomicBool>,
    samples: std::thread::JoinHandle<Vec<(Instant, Duration)>>,
}

fn probe(addr: std::net::SocketAddr) -> Prober {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let samples = std::thread::spawn(move || {
        let mut out = Vec::new();
        while !s.load(Ordering::Relaxed) {
            let t = Instant::now();
            // A runtime stopped for longer than the timeout counts as that long: the sample is
            // a lower bound then, not a crash of the bench.
            let ask = || -> std::io::Result<Vec<u8>> {
                let mut c = std::net::TcpStream::connect(addr)?;
                c.set_read_timeout(Some(Duration::from_secs(600)))?;
                c.write_all(
                    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                )?;
                let mut body = Vec::new();
                c.read_to_end(&mut body)?;
                Ok(body)
            };
            if let Ok(body) = ask() {
                assert!(body.starts_with(b"HTTP/1.1 200"));
            }
            out.push((t, t.elapsed()));
            std::thread::sleep(Duration::from_millis(10));
        }
        out
    });
    Prober { stop, samples }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

#[derive(Default)]
struct Phase {
    jobs_per_s: f64,
    healthz: (f64, f64, f64),
    longest_gap_ms: f64,
    secs: f64,
}

fn summarize(
    from: Instant,
    to: Instant,
    finishes: &[Instant],
    healthz: &[(Instant, Duration)],
) -> Phase {
    let done: Vec<Instant> = finishes
        .iter()
        .copied()
        .filter(|t| *t >= from && *t <= to)
        .collect();
    let mut lat: Vec<Duration> = healthz
        .iter()
        .filter(|(t, _)| *t >= from && *t <= to)
        .map(|(_, d)| *d)
        .collect();
    lat.sort();
    let mut gap = Duration::ZERO;
    let mut last = from;
    for t in done.iter().copied().chain([to]) {
        gap = gap.max(t.saturating_duration_since(last));
        last = t;
    }
    let secs = (to - from).as_secs_f64();
    Phase {
        jobs_per_s: done.len() as f64 / secs,
        healthz: (pct(&lat, 0.5), pct(&lat, 0.99), pct(&lat, 1.0)),
        longest_gap_ms: gap.as_secs_f64() * 1000.0,
        secs,
    }
}

struct Run {
    erasures: u64,
    /// The window after the burst over which jobs/s is counted (longer if the erasures and
    /// their compaction take longer).
    window: Duration,
    tasks: u64,
    warmup: Duration,
    jobs: u64,
}

fn run_mode(dir: &Path, mode: &str, first_number: u64, run: &Run) -> (Phase, Phase, u64, Duration) {
    READS_BLOCK_WORKERS.store(mode == "old", Ordering::SeqCst);
    COMPACT_IN_PLACE.store(mode != "new", Ordering::SeqCst);
    // Two workers, as on the 2-core machines the daemon is benchmarked on.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ledger = Ledger::open(dir).unwrap();
    let store = rt
        .block_on(ConsentStore::load_with(
            ledger.clone(),
            vec![ACCOUNT.into()],
            HashMap::new(),
        ))
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
    rt.spawn(async move { axum::serve(listener, app).await });
    let shutdown = tokio_util::sync::CancellationToken::new();
    rt.spawn(store.clone().compactor(shutdown.clone()));

    let finishes = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let next = Arc::new(AtomicU64::new(0));
    for _ in 0..run.tasks {
        let (ledger, finishes, next, stop) = (
            ledger.clone(),
            finishes.clone(),
            next.clone(),
            shutdown.clone(),
        );
        let mode = mode.to_string();
        // Unique per run: a reused store keeps the load jobs of earlier runs.
        let run_id = Timestamp::now().as_millisecond();
        rt.spawn(async move {
            while !stop.is_cancelled() {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let id = job_id(&format!("load-{mode}-{run_id}-"), n);
                // As the pipeline does before dedupe (since the fix).
                if mode != "old" && ledger.compacting() {
                    ledger.compacted().await;
                }
                assert!(ledger.get(&id).await.unwrap().is_none());
                let to = number(1_000_000_000 - 1 - n % 100_000);
                let mut ops = finished(&id, &to, Timestamp::now().as_millisecond());
                if let KvOp::PutJob { entry, .. } = &mut ops[0] {
                    entry.published = false;
                }
                ledger.kv_many(ops).await.unwrap();
                ledger.mark_published(&id).await.unwrap();
                finishes.lock().unwrap().push(Instant::now());
            }
        });
    }
    let prober = probe(addr);
    let start = Instant::now();
    std::thread::sleep(run.warmup);
    let burst = Instant::now();
    let at = Timestamp::now();
    // Spread over the store: numbers from the first built jobs to the last.
    let numbers = run.jobs / JOBS_PER_NUMBER;
    let step = (numbers / (2 * run.erasures + 1)).max(1);
    let erasures: Vec<_> = (0..run.erasures)
        .map(|i| {
            let digits = number((first_number + 2 * i) * step % numbers)[1..].to_string();
            let store = store.clone();
            let mode = mode.to_string();
            rt.spawn(async move {
                if mode == "old" {
                    old_erase(&store, &digits, at).await;
                } else {
                    store.erase(&digits, at).await.unwrap();
                }
            })
        })
        .collect();
    let compactions = rt.block_on(async {
        for e in erasures {
            e.await.unwrap();
        }
        // What the compactor has not done yet: the window ends with the file compacted.
        store.compact_if_due().await.unwrap() as u64
    });
    let done = burst.elapsed();
    // Jobs/s over the same length of time in every mode, however long its erasures took.
    if let Some(rest) = run.window.checked_sub(done) {
        std::thread::sleep(rest);
    }
    let end = Instant::now();
    shutdown.cancel();
    prober.stop.store(true, Ordering::Relaxed);
    let healthz = prober.samples.join().unwrap();
    let finishes = finishes.lock().unwrap().clone();
    rt.shutdown_timeout(Duration::from_secs(10));
    drop(store);
    drop(ledger);
    sendwell::store::wait_closed(Duration::from_secs(60));
    // The first moments (tasks starting, caches filling) are not the steady state.
    let before = summarize(start + run.warmup / 5, burst, &finishes, &healthz);
    let during = summarize(burst, end, &finishes, &healthz);
    (before, during, compactions, done)
}

/// CPU seconds so far of this process's threads named `name`, by thread id (a writer of a
/// store closed just before may still be exiting: only threads in both snapshots count).
fn thread_cpu(name: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is the 3rd field, utime the 14th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        out.insert(
            t.file_name().to_string_lossy().into_owned(),
            ticks as f64 / 100.0,
        );
    }
    out
}

fn cpu_since(name: &str, before: &HashMap<String, f64>) -> f64 {
    thread_cpu(name)
        .iter()
        .filter_map(|(tid, now)| Some(now - before.get(tid)?))
        .sum()
}

/// The writer thread's CPU per job for a job's final record, with and without its number's
/// index row (the writer's cost is per row): µs per job, each way.
fn writer_cost(dir: &Path, jobs: u64) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ledger = Ledger::open(dir).unwrap();
    let mut out = [0.0; 2];
    // Alternated twice, so that neither way gets the smaller file.
    for (round, indexed) in [false, true, false, true].into_iter().enumerate() {
        let before = thread_cpu("sendwell-ledger");
        rt.block_on(async {
            let next = Arc::new(AtomicU64::new(0));
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let (ledger, next) = (ledger.clone(), next.clone());
                    tokio::spawn(async move {
                        loop {
                            let n = next.fetch_add(1, Ordering::Relaxed);
                            if n >= jobs {
                                return;
                            }
                            let id = job_id(&format!("cost-{round}-"), n);
                            let mut ops = finished(&id, &number(999_000_000 - n), 0);
                            if !indexed {
                                ops.pop();
                            }
                            ledger.kv_many(ops).await.unwrap();
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        out[indexed as usize] += cpu_since("sendwell-ledger", &before) / jobs as f64 * 1e6 / 2.0;
    }
    drop(ledger);
    sendwell::store::wait_closed(Duration::from_secs(60));
    (out[0], out[1])
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let (mb, erasures) = if bench_mode {
        (
            env_or("SENDWELL_BENCH_LEDGER_MB", 2048),
            env_or("SENDWELL_BENCH_ERASURES", 100),
        )
    } else {
        (4, 5)
    };
    let run = Run {
        erasures,
        window: Duration::from_secs(env_or(
            "SENDWELL_BENCH_WINDOW_S",
            if bench_mode { 60 } else { 2 },
        )),
        tasks: env_or("SENDWELL_BENCH_TASKS", 64),
        warmup: Duration::from_secs(env_or(
            "SENDWELL_BENCH_WARMUP_S",
            if bench_mode { 5 } else { 1 },
        )),
        jobs: 0,
    };
    let _tmp;
    let dir: PathBuf = match std::env::var("SENDWELL_BENCH_DIR") {
        Ok(d) if bench_mode => PathBuf::from(d),
        _ => {
            _tmp = tempfile::tempdir().unwrap();
            _tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).unwrap();
    let jobs = {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        build(&dir, mb, &rt)
    };
    let run = Run { jobs, ..run };
    let cost_jobs = env_or(
        "SENDWELL_BENCH_COST_JOBS",
        if bench_mode { 100_000 } else { 1000 },
    );
    let (without, with) = writer_cost(&dir, cost_jobs);
    println!(
        "writer CPU per finished job ({cost_jobs} each way): {without:.1} µs without the index row, {with:.1} µs with it"
    );
    let modes = std::env::var("SENDWELL_BENCH_MODES").unwrap_or_else(|_| "old,inplace,new".into());
    println!(
        "{erasures} erasures on a {} MB store ({jobs} jobs), {} load tasks, 2 tokio workers",
        file_mb(&dir),
        run.tasks
    );
    println!(
        "{:<7} {:<7} {:>8} {:>10} {:>10} {:>10} {:>11} {:>8} {:>11}",
        "mode",
        "phase",
        "jobs/s",
        "hz p50 ms",
        "hz p99 ms",
        "hz max ms",
        "max gap ms",
        "secs",
        "compacted"
    );
    if std::env::var("SENDWELL_BENCH_COMPACT_ONLY").is_ok() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let ledger = Ledger::open(&dir).unwrap();
        for i in 0..3 {
            let t = Instant::now();
            let rounds = rt.block_on(ledger.compact()).unwrap();
            println!(
                "compaction {i}: {:.0} ms, {rounds} rounds, file {} MB",
                t.elapsed().as_secs_f64() * 1000.0,
                file_mb(&dir)
            );
        }
        return;
    }
    for (i, mode) in modes.split(',').filter(|m| !m.is_empty()).enumerate() {
        // The peak resident size per mode (a copy keeps the keys written meanwhile in memory).
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let (before, during, compactions, done) = run_mode(&dir, mode, i as u64, &run);
        let peak = std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().to_string()))
            .unwrap_or_default();
        println!("{mode:<7} peak resident size: {peak}");
        for (name, p, c) in [
            ("before", before, String::new()),
            ("during", during, compactions.to_string()),
        ] {
            println!(
                "{mode:<7} {name:<7} {:>8.0} {:>10.1} {:>10.1} {:>10.1} {:>11.0} {:>8.1} {:>11}",
                p.jobs_per_s, p.healthz.0, p.healthz.1, p.healthz.2, p.longest_gap_ms, p.secs, c
            );
        }
        println!(
            "{mode:<7} the {erasures} erasures and their compaction took {:.1} s",
            done.as_secs_f64()
        );
    }
}
