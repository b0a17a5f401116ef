//! The consent cache's start-up load from PostgreSQL and from redb, same records, same run
//! (issue 17: "The consent check still reads the in-memory cache, loaded from PostgreSQL at
//! start. Report the time to load 10 M records.").
//!
//! A record is one (account, number, purpose) entry of the consent cache, as in
//! `benches/consent.rs` and with its population (`benches/consent/population.rs`): a number's
//! summary row (`consent_summary_v1`, key `digits NUL account`, value
//! `consent::store::encode_summary`) holds one or two of them, so 10 M records are 6,666,667
//! rows. The same rows go into a fresh PostgreSQL database (one binary `COPY`, then `VACUUM
//! (FREEZE, ANALYZE)` so that no load pays for hint bits or races an autovacuum) and into a redb
//! store, built in this run.
//!
//! Each load runs in a fresh process (this binary re-executed), on a multi-thread runtime like
//! the daemon's, and times the daemon's own start-up calls in `app::start`'s order:
//! `Ledger::open_state`, `MetaState::load` (templates, restrictions, service windows: empty
//! here), `ConsentStore::load` (the erasure key, the summary table's count, every summary row
//! into the cache, the WhatsApp-ID table, the jobs-by-number index check, a due compaction),
//! `Limits::load` (cap history, tier usage, user limits: empty here) and `Spend::load`. Reported
//! per load: the consent load's and the whole start-up load's wall time, records/s, the
//! process's RSS growth and peak (`VmRSS` / `VmHWM` from `/proc/self/status`), the process's
//! CPU, PostgreSQL's CPU (utime + stime of the database's backends, from `/proc/<pid>/stat`),
//! and how busy the whole machine was meanwhile. Then, in the same process, the store's part
//! alone: a bare scan of the summary table (`Ledger::kv_for_each` with a closure that does
//! nothing; its wall time and CPU, daemon and PostgreSQL together) and the row count the load
//! sizes the cache by (`kv_len`).
//!
//! Modes (`SENDWELL_BENCH_MODES`, default `redb,pg-pages,pg`): `redb`; `pg` is the shipped
//! PostgreSQL scan (statements of 65,536 rows, each streamed as it arrives); `pg-pages` is the
//! scan as it was before (`SCAN_PAGES_COLLECTED`: pages of 4,096 rows, each collected whole, one
//! round trip after another), for a before-and-after ratio in one run. Each round runs every
//! mode once, the order reversed every other round.
//!
//! Run: `cargo bench --bench consent_load`. Env: `SENDWELL_BENCH_CONSENT_RECORDS` (10,000,000),
//! `SENDWELL_BENCH_ROUNDS` (2), `SENDWELL_BENCH_MODES`; the database through
//! `SENDWELL_TEST_PG_URL` / `SENDWELL_TEST_PG_PASSWORD` (defaults
//! `postgres://sendwell@127.0.0.1:5432/sendwell` / `sendwell`, a role that may create databases),
//! a fresh one dropped `WITH (FORCE)` at the end. A table on stdout, JSON in
//! `$CARGO_TARGET_DIR/bench-consent-load.json` (else `target/…`; `SENDWELL_BENCH_OUT`).
//! Without `--bench` (`cargo test --all-targets`) it runs one round over 20,000 records
//! (PostgreSQL needed, as for the tests; `SENDWELL_TEST_PG_SKIP=1` skips it).

#[path = "../tests/common/pg.rs"]
#[allow(dead_code)]
mod pg;
#[path = "consent/population.rs"]
#[allow(dead_code)]
mod population;
#[path = "load/procfs.rs"]
#[allow(dead_code)]
mod procfs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sendwell::config::Config;
use sendwell::consent::ConsentStore;
use sendwell::consent::store::{encode_summary, number_account_key};
use sendwell::store::postgres::SCAN_PAGES_COLLECTED;
use sendwell::store::{KvOp, Ledger, Table};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use population::{CONFIG, Population};

/// Summary rows per redb build commit.
const BATCH: u64 = 50_000;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The config of a daemon whose state is `state` (the `[state]` section's body).
fn write_config(dir: &Path, name: &str, state: &str) -> PathBuf {
    std::fs::write(dir.join("token"), "t").unwrap();
    let p = dir.join(name);
    std::fs::write(&p, format!("{CONFIG}\n[state]\n{state}")).unwrap();
    p
}

// ---------------------------------------------------------------------------------------------
// Seeding.

/// The daemon's first start on an empty store: the schema, and the erasure key that every later
/// load only reads.
async fn first_start(config: &Config) {
    let ledger = Ledger::open_state(&config.state, false).await.unwrap();
    let store = ConsentStore::load(ledger.clone(), config).await.unwrap();
    drop(store);
    drop(ledger);
}

/// The summary rows into PostgreSQL in one binary COPY, then vacuumed: returns the seconds.
async fn seed_pg(config: &Config, db: &pg::TestDb, pop: &Population) -> f64 {
    first_start(config).await;
    let t = Instant::now();
    let client = db.client().await;
    let sink = client
        .copy_in("COPY sw_consent_summary (key, value) FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    let writer = BinaryCopyInWriter::new(sink, &[Type::BYTEA, Type::BYTEA]);
    let mut writer = std::pin::pin!(writer);
    for i in 0..pop.numbers {
        let key = number_account_key(&pop.digits(i), pop.account(i));
        let value = encode_summary(&pop.summary(i));
        writer.as_mut().write(&[&key, &value]).await.unwrap();
    }
    let rows = writer.finish().await.unwrap();
    assert_eq!(rows, pop.numbers);
    // A table written over months has been vacuumed: its hint bits are set and its pages all
    // visible. Without this the first load would set them (writing the table back) and race
    // the autovacuum that 6.8 M inserts start.
    client
        .batch_execute("VACUUM (FREEZE, ANALYZE) sw_consent_summary")
        .await
        .unwrap();
    t.elapsed().as_secs_f64()
}

/// The same rows into redb, through the store's writer as `ConsentStore::apply` writes them.
async fn seed_redb(config: &Config, pop: &Population) -> f64 {
    first_start(config).await;
    sendwell::store::wait_closed(Duration::from_secs(60));
    let t = Instant::now();
    let ledger = Ledger::open_state(&config.state, false).await.unwrap();
    let mut ops = Vec::with_capacity(BATCH as usize);
    for i in 0..pop.numbers {
        ops.push(KvOp::Put {
            table: Table::ConsentSummary,
            key: number_account_key(&pop.digits(i), pop.account(i)),
            value: encode_summary(&pop.summary(i)),
        });
        if ops.len() as u64 == BATCH || i + 1 == pop.numbers {
            let batch = std::mem::replace(&mut ops, Vec::with_capacity(BATCH as usize));
            ledger.kv_many(batch).await.unwrap();
        }
    }
    drop(ledger);
    // Closed, so that no load process finds a file to repair.
    assert!(sendwell::store::wait_closed(Duration::from_secs(60)));
    t.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// The load, in a child process.

/// The database's backends' CPU (clock ticks) by pid, but the asking session's own.
async fn backend_ticks(watch: &tokio_postgres::Client) -> BTreeMap<i32, u64> {
    watch
        .query(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .filter_map(|r| {
            let pid: i32 = r.get(0);
            Some((pid, procfs::cpu_ticks(pid as u32)?))
        })
        .collect()
}

/// A session on the store's database, to find its backends (PostgreSQL only).
async fn watch(config: &Config) -> Option<tokio_postgres::Client> {
    let pgc = config.state.postgres.as_ref()?;
    let mut c: tokio_postgres::Config = pgc.url.parse().unwrap();
    if let Some(p) = &pgc.password {
        c.password(p.expose().trim_end());
    }
    c.application_name("sendwell-bench-watch");
    let (client, conn) = c.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    Some(client)
}

/// CPU counters at one moment: this process's, the database's backends', the machine's.
struct Cpu {
    process: u64,
    backends: BTreeMap<i32, u64>,
    machine: Option<(u64, u64)>,
}

impl Cpu {
    async fn now(watch: Option<&tokio_postgres::Client>) -> Cpu {
        Cpu {
            backends: match watch {
                Some(w) => backend_ticks(w).await,
                None => BTreeMap::new(),
            },
            process: procfs::cpu_ticks(std::process::id()).unwrap_or(0),
            machine: procfs::machine_ticks(),
        }
    }

    /// Seconds of CPU since `self` (this process, PostgreSQL: None on redb), and the share of
    /// the machine that was busy meanwhile.
    async fn since(&self, watch: Option<&tokio_postgres::Client>) -> (f64, Option<f64>, f64) {
        let now = Cpu::now(watch).await;
        let ticks = procfs::clock_ticks() as f64;
        // A backend that connected meanwhile (the pool's) counts from zero.
        let pg = watch.map(|_| {
            now.backends
                .iter()
                .map(|(pid, t)| t.saturating_sub(self.backends.get(pid).copied().unwrap_or(0)))
                .sum::<u64>() as f64
                / ticks
        });
        let busy = match (self.machine, now.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
            _ => f64::NAN,
        };
        ((now.process - self.process) as f64 / ticks, pg, busy)
    }
}

/// Child process: the daemon's start-up loads, timed; `key=value` lines on stdout.
fn phase_load(config_path: &Path, mode: &str) {
    SCAN_PAGES_COLLECTED.store(mode == "pg-pages", Ordering::SeqCst);
    // As the daemon's (`main.rs`): multi-thread, a worker per core.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let out = rt.block_on(async {
        let config = Config::load(config_path).unwrap();
        let mut out = BTreeMap::<&str, f64>::new();
        let rss0 = status_kib("VmRSS:");
        let t = Instant::now();
        let ledger = Ledger::open_state(&config.state, false).await.unwrap();
        out.insert("open_s", t.elapsed().as_secs_f64());
        let watch = watch(&config).await;
        let cpu = Cpu::now(watch.as_ref()).await;
        let now = jiff::Timestamp::now();

        // `app::start`'s loads, in its order.
        let t = Instant::now();
        let meta = sendwell::pipeline::meta_state::MetaState::load(ledger.clone())
            .await
            .unwrap();
        out.insert("meta_s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let consent = ConsentStore::load(ledger.clone(), &config).await.unwrap();
        out.insert("consent_s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let limits = sendwell::pipeline::limits::Limits::new(&config).unwrap();
        limits.load(&ledger, now).await.unwrap();
        out.insert("limits_s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let spend = sendwell::pipeline::spend::Spend::new(&config, ledger.clone());
        spend.load(&ledger, now).await.unwrap();
        out.insert("spend_s", t.elapsed().as_secs_f64());

        let (process, pg, busy) = cpu.since(watch.as_ref()).await;
        out.insert("process_cpu_s", process);
        if let Some(pg) = pg {
            out.insert("pg_cpu_s", pg);
        }
        out.insert("machine_busy", busy);
        out.insert("rss_before_kib", rss0 as f64);
        out.insert("rss_after_kib", status_kib("VmRSS:") as f64);
        out.insert("hwm_kib", status_kib("VmHWM:") as f64);
        out.insert("entries", consent.cached_entries() as f64);

        // The store's part alone: a bare scan of the summary table (the load's scan, with a
        // closure that does nothing), and the count the load sizes the cache by.
        let cpu = Cpu::now(watch.as_ref()).await;
        let t = Instant::now();
        let mut rows = 0u64;
        ledger
            .kv_for_each(Table::ConsentSummary, |k, v| {
                std::hint::black_box((k, v));
                rows += 1;
            })
            .await
            .unwrap();
        out.insert("scan_s", t.elapsed().as_secs_f64());
        let (process, pg, _) = cpu.since(watch.as_ref()).await;
        out.insert("scan_process_cpu_s", process);
        if let Some(pg) = pg {
            out.insert("scan_pg_cpu_s", pg);
        }
        out.insert("rows", rows as f64);
        let t = Instant::now();
        ledger.kv_len(Table::ConsentSummary).await.unwrap();
        out.insert("count_s", t.elapsed().as_secs_f64());
        drop((meta, consent, limits, spend, ledger));
        out
    });
    drop(rt);
    sendwell::store::wait_closed(Duration::from_secs(60));
    for (k, v) in out {
        println!("{k}={v}");
    }
}

fn child(config: &Path, mode: &str) -> BTreeMap<String, f64> {
    let out = Command::new(std::env::current_exe().unwrap())
        .env("SENDWELL_BENCH_PHASE", "load")
        .env("SENDWELL_BENCH_CONFIG", config)
        .env("SENDWELL_BENCH_MODE", mode)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{mode} load failed: {}",
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

fn out_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SENDWELL_BENCH_OUT") {
        return p.into();
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| "target".into(), PathBuf::from);
    target.join("bench-consent-load.json")
}

fn main() {
    if std::env::var("SENDWELL_BENCH_PHASE").as_deref() == Ok("load") {
        let config = PathBuf::from(std::env::var("SENDWELL_BENCH_CONFIG").unwrap());
        let mode = std::env::var("SENDWELL_BENCH_MODE").unwrap();
        return phase_load(&config, &mode);
    }
    let bench_mode = std::env::args().any(|a| a == "--bench");
    if !bench_mode && std::env::var("SENDWELL_TEST_PG_SKIP").as_deref() == Ok("1") {
        println!("consent_load: skipped (SENDWELL_TEST_PG_SKIP=1)");
        return;
    }
    let records: u64 = if bench_mode {
        env_or("SENDWELL_BENCH_CONSENT_RECORDS", 10_000_000)
    } else {
        20_000
    };
    let rounds: usize = if bench_mode {
        env_or("SENDWELL_BENCH_ROUNDS", 2)
    } else {
        1
    };
    let modes: Vec<String> = std::env::var("SENDWELL_BENCH_MODES")
        .unwrap_or_else(|_| "redb,pg-pages,pg".into())
        .split(',')
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect();
    for m in &modes {
        assert!(
            ["redb", "pg-pages", "pg"].contains(&m.as_str()),
            "SENDWELL_BENCH_MODES: unknown mode {m} (redb, pg-pages, pg)"
        );
    }
    let load_before = loadavg();
    let pop = Population::new(records);
    // Whole numbers: the last one's entries may pass the count asked for by one.
    let records: u64 = (0..pop.numbers).map(population::entries_of).sum();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let db = rt.block_on(pg::TestDb::new());
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&db.password_file, std::fs::Permissions::from_mode(0o600))
            .unwrap();
    }
    let redb_config = write_config(
        tmp.path(),
        "redb.toml",
        &format!("dir = \"{}\"\n", tmp.path().join("redb").display()),
    );
    let pg_config = write_config(
        tmp.path(),
        "pg.toml",
        &format!(
            "dir = \"{}\"\nbackend = \"postgres\"\n{}",
            tmp.path().join("pg").display(),
            db.state_postgres_toml()
        ),
    );
    let seed_pg_s = rt.block_on(seed_pg(&Config::load(&pg_config).unwrap(), &db, &pop));
    println!(
        "consent_load: {records} records in {} summary rows into PostgreSQL ({}) in {seed_pg_s:.1} s (COPY + VACUUM)",
        pop.numbers, db.name
    );
    let seed_redb_s = rt.block_on(seed_redb(&Config::load(&redb_config).unwrap(), &pop));
    println!("consent_load: the same rows into redb in {seed_redb_s:.1} s");
    let redb_mib = std::fs::metadata(Ledger::file_in(&tmp.path().join("redb")))
        .map(|m| m.len() as f64 / (1 << 20) as f64)
        .unwrap_or(0.0);
    let pg_mib = rt.block_on(async {
        let c = db.client().await;
        let bytes: i64 = c
            .query_one("SELECT pg_total_relation_size('sw_consent_summary')", &[])
            .await
            .unwrap()
            .get(0);
        bytes as f64 / (1 << 20) as f64
    });
    println!(
        "consent_load: store size: redb file {redb_mib:.0} MiB, PostgreSQL table + index {pg_mib:.0} MiB"
    );
    println!(
        "{:<5} {:<8} {:>9} {:>10} {:>9} {:>8} {:>9} {:>8} {:>7} {:>7} {:>11} {:>7} {:>6}",
        "round",
        "mode",
        "consent s",
        "records/s",
        "startup s",
        "RSS +MiB",
        "peak +MiB",
        "CPU s",
        "PG CPU",
        "scan s",
        "scan CPU s",
        "count s",
        "busy"
    );
    let mut runs = Vec::new();
    for round in 1..=rounds {
        // Every other round in reverse, so that no mode always runs first.
        let mut order: Vec<&String> = modes.iter().collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for mode in order {
            let config = if mode == "redb" {
                &redb_config
            } else {
                &pg_config
            };
            let r = child(config, mode);
            assert_eq!(r["entries"] as u64, records, "{mode}: every record cached");
            assert_eq!(r["rows"] as u64, pop.numbers, "{mode}: every row scanned");
            let startup_s =
                r["open_s"] + r["meta_s"] + r["consent_s"] + r["limits_s"] + r["spend_s"];
            let rss_mib = (r["rss_after_kib"] - r["rss_before_kib"]) / 1024.0;
            let peak_mib = (r["hwm_kib"] - r["rss_before_kib"]) / 1024.0;
            let pg_cpu = r.get("pg_cpu_s").copied();
            let scan_cpu = r["scan_process_cpu_s"] + r.get("scan_pg_cpu_s").copied().unwrap_or(0.0);
            println!(
                "{round:<5} {mode:<8} {:>9.2} {:>10.0} {:>9.2} {:>8.0} {:>9.0} {:>8.2} {:>7} {:>7.2} {:>11.2} {:>7.2} {:>5.0}%",
                r["consent_s"],
                records as f64 / r["consent_s"],
                startup_s,
                rss_mib,
                peak_mib,
                r["process_cpu_s"],
                pg_cpu.map_or("–".to_string(), |s| format!("{s:.2}")),
                r["scan_s"],
                scan_cpu,
                r["count_s"],
                r["machine_busy"] * 100.0
            );
            runs.push(serde_json::json!({
                "round": round,
                "mode": mode,
                "consent_load_s": r["consent_s"],
                "records_per_s": records as f64 / r["consent_s"],
                "startup_load_s": startup_s,
                "rss_growth_mib": rss_mib,
                "peak_rss_growth_mib": peak_mib,
                "process_cpu_s": r["process_cpu_s"],
                "postgres_cpu_s": pg_cpu,
                "load_cpu_s": r["process_cpu_s"] + pg_cpu.unwrap_or(0.0),
                "bare_scan_s": r["scan_s"],
                "bare_scan_cpu_s": scan_cpu,
                "count_s": r["count_s"],
                "machine_busy": r["machine_busy"],
                "raw": r,
            }));
        }
    }
    // Per round: PostgreSQL's consent load over redb's (wall time, and CPU of the daemon and
    // PostgreSQL together, which is what wall time tends to on a saturated machine), and the
    // scan before over after.
    let of = |round: usize, mode: &str, what: &str| {
        runs.iter()
            .find(|r| r["round"] == round && r["mode"] == mode)
            .and_then(|r| r[what].as_f64())
    };
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let wall = |m: &str| of(round, m, "consent_load_s");
        let cpu = |m: &str| of(round, m, "load_cpu_s");
        let line = serde_json::json!({
            "round": round,
            "pg_over_redb": ratio(wall("pg"), wall("redb")),
            "pg_pages_over_redb": ratio(wall("pg-pages"), wall("redb")),
            "pg_pages_over_pg": ratio(wall("pg-pages"), wall("pg")),
            "cpu_pg_over_redb": ratio(cpu("pg"), cpu("redb")),
            "cpu_pg_pages_over_pg": ratio(cpu("pg-pages"), cpu("pg")),
        });
        println!(
            "round {round}: consent load, PostgreSQL ÷ redb: {} wall, {} CPU (daemon + PostgreSQL); \
             before (pages) ÷ after: {} wall, {} CPU",
            fmt_ratio(ratio(wall("pg"), wall("redb"))),
            fmt_ratio(ratio(cpu("pg"), cpu("redb"))),
            fmt_ratio(ratio(wall("pg-pages"), wall("pg"))),
            fmt_ratio(ratio(cpu("pg-pages"), cpu("pg"))),
        );
        ratios.push(line);
    }
    let load_after = loadavg();
    println!("consent_load: load average before {load_before}, after {load_after}");
    let json = serde_json::json!({
        "records": records,
        "summary_rows": pop.numbers,
        "seed_postgres_s": seed_pg_s,
        "seed_redb_s": seed_redb_s,
        "redb_file_mib": redb_mib,
        "postgres_table_mib": pg_mib,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "runs": runs,
        "ratios": ratios,
    });
    let path = out_path();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("consent_load: JSON in {}", path.display());
    // Dropped WITH (FORCE) here, while the runtime its connections ran on still exists.
    drop(db);
    drop(rt);
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}×"))
}
