//! Consent at scale: a store of N (number, account, purpose) consent records on disk (default
//! 10 million), written the way `ConsentStore::apply` writes summaries, then:
//!
//! - load time: `ConsentStore::load_with` over the on-disk store, in a fresh process;
//! - memory: RSS before and after that load, per cached entry and per number. The load also
//!   fills redb's read cache (up to its 1 GiB default) with the table's pages, so another fresh
//!   process scans the table bare first (that RSS growth is redb's cache) and then loads: the
//!   growth of that second load is the index's alone;
//! - ns per `ConsentStore::check` (criterion): allowed (one number again and again: everything
//!   in CPU cache; and 65,536 random numbers in turn: map entries come from RAM, as in
//!   production), unknown number, opted out, and allowed from 2 threads at once.
//!
//! Run: `cargo bench --bench consent`. Env: SENDWELL_BENCH_RECORDS (default 10,000,000),
//! SENDWELL_BENCH_DIR (keep the store there and reuse it when it has the same records; default a
//! temporary directory), SENDWELL_BENCH_ERASE=1 (also time one erasure, which compacts the file;
//! the store then has one number less and is rebuilt next time).
//! Without `--bench` (`cargo test --all-targets`) it runs once over 20,000 records.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::Criterion;
use jiff::Timestamp;
use sendwell::config::{Config, Purpose};
use sendwell::consent::store::{encode_summary, number_account_key};
use sendwell::consent::{ConsentStore, Decision};
use sendwell::job::Job;
use sendwell::pipeline::decode::Decoder;
use sendwell::store::{KvOp, Ledger, Table};

#[path = "consent/population.rs"]
mod population;
use population::{ACCOUNTS, CONFIG, Population, mix};

const BATCH: usize = 50_000;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn config() -> Config {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t").unwrap();
    let p = dir.path().join("sendwell.toml");
    std::fs::write(&p, CONFIG).unwrap();
    Config::load(&p).unwrap()
}

fn rules(config: &Config) -> HashMap<String, Purpose> {
    config
        .purposes
        .iter()
        .map(|p| (p.name.clone(), p.clone()))
        .collect()
}

fn accounts() -> Vec<String> {
    ACCOUNTS.iter().map(|a| a.to_string()).collect()
}

fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until this process's last ledger handle has closed the file (its writer thread drops
/// the database a moment after the handle), then opens and closes it once more synchronously.
/// A process that exits before that leaves the file to be repaired at the next open, which
/// reads all of it (hundreds of MiB of RSS and seconds at 10M records) and skews the figures.
fn wait_closed(dir: &Path) {
    let path = Ledger::file_in(dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match redb::Database::create(&path) {
            Ok(db) => return drop(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Phases.

fn build(dir: &Path, pop: &Population, rt: &tokio::runtime::Runtime) -> (usize, Duration) {
    let ledger = Ledger::open(dir).unwrap();
    // The store's erasure key, as the daemon's first start writes it: every load after that
    // only reads.
    let config = config();
    let store = rt
        .block_on(ConsentStore::load_with(ledger, accounts(), rules(&config)))
        .unwrap();
    let ledger = store.ledger.clone();
    drop(store);
    let t = Instant::now();
    let mut rows = 0;
    let mut ops = Vec::with_capacity(BATCH);
    for i in 0..pop.numbers {
        ops.push(KvOp::Put {
            table: Table::ConsentSummary,
            key: number_account_key(&pop.digits(i), pop.account(i)),
            value: encode_summary(&pop.summary(i)),
        });
        rows += 1;
        if ops.len() == BATCH || i + 1 == pop.numbers {
            let batch = std::mem::replace(&mut ops, Vec::with_capacity(BATCH));
            rt.block_on(ledger.kv_many(batch)).unwrap();
        }
    }
    let took = t.elapsed();
    drop(ledger);
    wait_closed(dir);
    (rows, took)
}

/// Child process: load the store, report time and memory.
fn phase_load(dir: &Path, rt: &tokio::runtime::Runtime) {
    let config = config();
    let rss_start = rss_kib();
    let t = Instant::now();
    let ledger = Ledger::open(dir).unwrap();
    println!("open_ms={}", t.elapsed().as_millis());
    let rss0 = rss_kib();
    println!("rss_start_kib={rss_start}");
    let hwm0 = status_kib("VmHWM:");
    let t = Instant::now();
    let store = rt
        .block_on(ConsentStore::load_with(ledger, accounts(), rules(&config)))
        .unwrap();
    let load = t.elapsed();
    let rss1 = rss_kib();
    println!("load_ms={}", load.as_millis());
    println!("entries={}", store.cached_entries());
    println!("rss_before_kib={rss0}");
    println!("rss_after_kib={rss1}");
    println!("hwm_before_kib={hwm0}");
    println!("hwm_after_kib={}", status_kib("VmHWM:"));
    drop(store);
    wait_closed(dir);
}

/// The limits the combined phase fills: the example config's kind (quiet hours, pacing 6 s, a
/// marketing cap of 1 a day and 2 a week, a daily tier), with a tier large enough never to bind.
const LIMITS_CONFIG: &str = r#"
[[purposes]]
name = "newsletter"
categories = ["marketing"]

[[portfolios]]
name = "acme"
messaging_limit = 100000000

[[caps]]
category = "marketing"
scope = "account"
rules = [{ max = 1, per = "1d" }, { max = 2, per = "7d" }]

[[accounts]]
name = "acme-de"
phone_number_id = "1"
token_file = "token"
messages_per_second = 1000
portfolio = "acme"
pacing = { interval = "6s", burst = 1 }
quiet_hours = { start = "21:00", end = "09:00", spread = "30m" }
"#;

/// Child process: what a daemon holds at its largest, in one process: the consent cache loaded
/// from the store, then `SENDWELL_BENCH_LIMIT_RECIPIENTS` (default 1,000,000) distinct
/// recipients through the limits (quiet hours and caps checked, the tier and cap counted, a
/// pacing pair each), all live at once. Reports the peak RSS (`VmHWM`) of the whole process.
fn phase_with_limits(dir: &Path, rt: &tokio::runtime::Runtime) {
    let config = config();
    let ledger = Ledger::open(dir).unwrap();
    let store = rt
        .block_on(ConsentStore::load_with(ledger, accounts(), rules(&config)))
        .unwrap();
    println!("entries={}", store.cached_entries());
    println!("consent_hwm_kib={}", status_kib("VmHWM:"));
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("token"), "t").unwrap();
    let p = tmp.path().join("limits.toml");
    std::fs::write(&p, LIMITS_CONFIG).unwrap();
    let lc = Config::load(&p).unwrap();
    let limits = sendwell::pipeline::limits::Limits::new(&lc).unwrap();
    let a = &lc.accounts[0];
    let pacing = sendwell::pipeline::limits::pacing::Pacing::new(
        a.pacing_interval,
        a.pacing_burst,
        lc.retry.max_delay,
        sendwell::pipeline::limits::MonoClock::new(),
    );
    let decoder = Decoder::new(&lc);
    let n: usize = env_or("SENDWELL_BENCH_LIMIT_RECIPIENTS", 1_000_000);
    // 11:00 in Berlin (winter), a microsecond apart: every job is inside the open window.
    let start: Timestamp = "2026-11-30T10:00:00Z".parse().unwrap();
    let mut job = job(
        &decoder,
        "4915100000000",
        "acme-de",
        "marketing",
        "newsletter",
    );
    let mut go = 0usize;
    for i in 0..n {
        let digits = 4_915_100_000_000u64 + (i as u64 * 7919) % 100_000_000;
        job.to = sendwell::phone::parse_e164(&format!("+{digits}")).unwrap();
        let now = start + Duration::from_micros(i as u64);
        if limits.check(&job, now) != sendwell::pipeline::limits::Check::Go {
            continue;
        }
        let mut r = sendwell::pipeline::limits::Reservation::default();
        if limits.reserve_tier(&job, false, now, &mut r).is_err() || pacing.check(digits).is_err() {
            continue;
        }
        black_box(limits.reserve_caps(&job, now, &mut r));
        pacing.sent(digits);
        go += 1;
    }
    println!("recipients={go}");
    println!("hwm_kib={}", status_kib("VmHWM:"));
    println!("rss_kib={}", rss_kib());
    drop(store);
    wait_closed(dir);
}

/// Child process: a bare scan of the summary table (redb's read cache, no index), then a load
/// on that warm cache, whose RSS growth is then the index's alone.
fn phase_scan(dir: &Path, rt: &tokio::runtime::Runtime) {
    let config = config();
    let ledger = Ledger::open(dir).unwrap();
    let rss0 = rss_kib();
    let t = Instant::now();
    let mut rows = 0u64;
    ledger
        .redb()
        .expect("a redb store")
        .kv_for_each(Table::ConsentSummary, |k, v| {
            black_box((k, v));
            rows += 1;
        })
        .unwrap();
    println!("scan_ms={}", t.elapsed().as_millis());
    println!("scan_rows={rows}");
    let rss1 = rss_kib();
    println!("scan_rss_delta_kib={}", rss1.saturating_sub(rss0));
    let store = rt
        .block_on(ConsentStore::load_with(ledger, accounts(), rules(&config)))
        .unwrap();
    let rss2 = rss_kib();
    println!("warm_load_rss_delta_kib={}", rss2.saturating_sub(rss1));
    drop(store);
    wait_closed(dir);
}

fn child(phase: &str, dir: &Path) -> HashMap<String, u64> {
    let out = Command::new(std::env::current_exe().unwrap())
        .env("SENDWELL_BENCH_PHASE", phase)
        .env("SENDWELL_BENCH_DIR", dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{phase} phase failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn job(decoder: &Decoder, digits: &str, account: &str, category: &str, purpose: &str) -> Job {
    let json = format!(
        r#"{{"id":"bench-1","account":"{account}","to":"+{digits}","category":"{category}","purpose":"{purpose}","template":{{"name":"spring_sale","language":"de"}}}}"#
    );
    decoder.decode(json.as_bytes()).unwrap()
}

fn reason(d: &Decision) -> &'static str {
    match d {
        Decision::Allow => "allow",
        Decision::Suppress { reason, .. } => reason,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Ok(phase) = std::env::var("SENDWELL_BENCH_PHASE") {
        let dir = PathBuf::from(std::env::var("SENDWELL_BENCH_DIR").unwrap());
        match phase.as_str() {
            "load" => phase_load(&dir, &rt),
            "scan" => phase_scan(&dir, &rt),
            "with_limits" => phase_with_limits(&dir, &rt),
            other => panic!("unknown phase {other}"),
        }
        return;
    }
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let records: u64 = if bench_mode {
        env_or("SENDWELL_BENCH_RECORDS", 10_000_000)
    } else {
        20_000
    };
    let pop = Population::new(records);
    let _tmp;
    let dir = match std::env::var("SENDWELL_BENCH_DIR") {
        Ok(d) if bench_mode => PathBuf::from(d),
        _ => {
            _tmp = tempfile::tempdir().unwrap();
            _tmp.path().to_path_buf()
        }
    };

    // 1. The store on disk (reused when SENDWELL_BENCH_DIR already holds this population).
    let existing = if Ledger::file_in(&dir).exists() {
        let rows = Ledger::open(&dir)
            .unwrap()
            .redb()
            .expect("a redb store")
            .kv_len(Table::ConsentSummary)
            .unwrap();
        wait_closed(&dir);
        rows
    } else {
        0
    };
    if existing == pop.numbers {
        println!("consent bench: reusing {} ({existing} rows)", dir.display());
    } else {
        assert_eq!(existing, 0, "{} holds another store", dir.display());
        let (rows, took) = build(&dir, &pop, &rt);
        println!(
            "consent bench: built {rows} summary rows ({records} records) in {:.1} s ({:.0} rows/s)",
            took.as_secs_f64(),
            rows as f64 / took.as_secs_f64()
        );
    }
    let file = std::fs::metadata(Ledger::file_in(&dir)).unwrap().len();

    // 2. Load time and memory, each in a fresh process.
    let scan = child("scan", &dir);
    let load = child("load", &dir);
    let entries = load["entries"];
    let rss_delta = (load["rss_after_kib"] - load["rss_before_kib"]) * 1024;
    let hwm_delta =
        (load["hwm_after_kib"].max(load["rss_before_kib"]) - load["rss_before_kib"]) * 1024;
    let cache = scan["scan_rss_delta_kib"] * 1024;
    let index = scan["warm_load_rss_delta_kib"] * 1024;
    let per = |b: u64, n: u64| b as f64 / n.max(1) as f64;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("consent bench: records (cached entries)   {entries}");
    println!("consent bench: numbers (summary rows)     {}", pop.numbers);
    println!(
        "consent bench: store file                 {:.1} MiB ({:.1} bytes/record)",
        mib(file),
        per(file, entries)
    );
    println!(
        "consent bench: load time                  {:.2} s ({:.0} ns/record)",
        load["load_ms"] as f64 / 1000.0,
        load["load_ms"] as f64 * 1e6 / entries.max(1) as f64
    );
    println!(
        "consent bench: bare scan of the table     {:.2} s",
        scan["scan_ms"] as f64 / 1000.0
    );
    println!(
        "consent bench: store open                 {} ms, RSS {:.1} MiB → {:.1} MiB",
        load["open_ms"],
        mib(load["rss_start_kib"] * 1024),
        mib(load["rss_before_kib"] * 1024)
    );
    println!(
        "consent bench: RSS after load − before    {:.1} MiB = {:.1} bytes/entry, {:.1} bytes/number",
        mib(rss_delta),
        per(rss_delta, entries),
        per(rss_delta, pop.numbers)
    );
    println!(
        "consent bench: peak RSS during load − before {:.1} MiB = {:.1} bytes/entry",
        mib(hwm_delta),
        per(hwm_delta, entries)
    );
    println!(
        "consent bench: of which redb read cache   {:.1} MiB (RSS growth of a bare scan)",
        mib(cache)
    );
    println!(
        "consent bench: index alone (load after a scan) {:.1} MiB = {:.1} bytes/entry, {:.1} bytes/number",
        mib(index),
        per(index, entries),
        per(index, pop.numbers)
    );

    // 2b. The peak of a daemon's memory: the whole consent cache and 1 M recipients in the
    //     limits, in one process.
    if bench_mode {
        let both = child("with_limits", &dir);
        println!(
            "consent bench: peak RSS, {} consent entries + {} recipients in the limits, one process: {:.1} MiB (after the consent load alone: {:.1} MiB)",
            both["entries"],
            both["recipients"],
            mib(both["hwm_kib"] * 1024),
            mib(both["consent_hwm_kib"] * 1024)
        );
    }

    // 3. ns per check, with the whole population cached.
    let config = config();
    let decoder = Decoder::new(&config);
    let store = rt
        .block_on(ConsentStore::load_with(
            Ledger::open(&dir).unwrap(),
            accounts(),
            rules(&config),
        ))
        .unwrap();
    assert_eq!(store.cached_entries() as u64, entries);
    let now = Timestamp::from_second(1_764_000_000).unwrap();
    let sample = |pick: &dyn Fn(u64) -> bool, n: usize| -> Vec<u64> {
        (0..)
            .map(|k| mix(k + 7) % pop.numbers)
            .filter(|i| pick(*i))
            .take(n)
            .collect()
    };
    let job_of = |i: u64, category: &str, purpose: &str| {
        job(&decoder, &pop.digits(i), pop.account(i), category, purpose)
    };
    let allowed: Vec<Job> = sample(&|i| pop.is_confirmed_newsletter(i), 1 << 16)
        .into_iter()
        .map(|i| job_of(i, "marketing", "newsletter"))
        .collect();
    let hit = &allowed[0];
    let opted_out = job_of(sample(&|i| i % 20 == 0, 1)[0], "marketing", "newsletter");
    // A UK mobile: no record has one.
    let unknown = job(
        &decoder,
        "447700900123",
        "acme-de",
        "marketing",
        "newsletter",
    );
    for j in &allowed {
        assert_eq!(reason(&store.check(j, now)), "allow", "{:?}", j.to);
    }
    assert_eq!(reason(&store.check(&opted_out, now)), "opted_out");
    assert_eq!(reason(&store.check(&unknown, now)), "no_consent");

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut g = c.benchmark_group(format!("consent_check_{entries}_records"));
    g.bench_function("allowed_same_number", |b| {
        b.iter(|| store.check(black_box(hit), now))
    });
    g.bench_function("allowed_65536_numbers_in_turn", |b| {
        let mut k = 0;
        b.iter(|| {
            k = (k + 1) & 0xffff;
            store.check(black_box(&allowed[k]), now)
        })
    });
    g.bench_function("unknown_number", |b| {
        b.iter(|| store.check(black_box(&unknown), now))
    });
    g.bench_function("opted_out", |b| {
        b.iter(|| store.check(black_box(&opted_out), now))
    });
    // One iteration: each of 2 threads checks one job (65,536 numbers in turn); time per iteration
    // is the wall time of 2 checks in parallel.
    g.bench_function("allowed_2_threads", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for th in 0..2 {
                    let (store, allowed) = (&store, &allowed);
                    s.spawn(move || {
                        for k in 0..iters as usize {
                            black_box(store.check(&allowed[(k * 2 + th) & 0xffff], now));
                        }
                    });
                }
            });
            t.elapsed()
        })
    });
    g.finish();

    // A plain figure to quote: many checks in turn over the 65,536 numbers, one thread.
    let n = if bench_mode {
        (records as usize * 2).clamp(1_000_000, 20_000_000)
    } else {
        10_000
    };
    let t = Instant::now();
    for k in 0..n {
        black_box(store.check(black_box(&allowed[k & 0xffff]), now));
    }
    println!(
        "consent bench: {n} checks in turn (65,536 allowed numbers, 1 thread): {:.1} ns/check",
        t.elapsed().as_nanos() as f64 / n as f64
    );

    if bench_mode && std::env::var("SENDWELL_BENCH_ERASE").is_ok_and(|v| v == "1") {
        let t = Instant::now();
        let report = rt.block_on(store.erase(&pop.digits(1), now)).unwrap();
        println!(
            "consent bench: one erasure (with compaction) at {entries} records: {:.2} s ({report:?})",
            t.elapsed().as_secs_f64()
        );
    }
    c.final_summary();
}
