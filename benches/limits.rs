//! Limits (issue 5) at scale: "ns per limiter/cap check; jobs/s with 1 million distinct
//! recipients; memory for 1 million active recipients".
//!
//! 1. **ns per call** of each limiter and of the whole `Limits::check`, in interleaved rounds
//!    (every call once per round, the order rotated each round; median over the rounds), each
//!    also as a ratio to decoding one job in the same round, since the host is noisy. Run twice:
//!    without a metrics recorder, and with the daemon's Prometheus recorder installed (the limits
//!    update gauges on the hot path, so that is the production figure).
//! 2. **jobs/s** through the limits stage for N distinct recipients (default 1,000,000), one
//!    task, in a fresh process, with the daemon's recorder: one account with pacing (6 s),
//!    frequency caps (2 rules) and quiet hours (21:00–09:00, marketing; the run's clock stays
//!    inside the open window, so every job is checked against them and none is held), a
//!    portfolio tier of at least N. Per job, in the pipeline's order: `Limits::check` →
//!    `reserve_tier` → `pass` (pacing back-off, throughput gate, pacing check) → `quiet_now` →
//!    `reserve_caps` → `at_the_door` → `sent` (the store rows are built but not written; no
//!    send record, no HTTP call). `Limits::pass` would hold the run at the account's 1,000
//!    msgs/s, so this run calls the same pacing and gate code on limiters of its own, whose
//!    gate's rate is so high that it never waits. A second run calls `Limits::pass`,
//!    `at_the_door` and `sent` themselves, with the jobs spread over N/9,000 such accounts
//!    whose gates have a burst of 10,000 (none waits either). Housekeeping once at the end, over
//!    everything still live, is timed on its own.
//! 3. **memory**: RSS growth (`/proc/self/status`, the method of `benches/consent.rs`) over run
//!    2, per recipient; then each structure alone (pacing pairs, cap logs, tier counts) filled
//!    in a fresh process. Then housekeeping after the clock moved on (13 s of real time for
//!    pacing, which runs on the monotonic clock; 7 days + 1 s for caps and tier, whose `now` is
//!    a parameter) shows the state emptied, and how much RSS that gives back.
//!
//! Run: `cargo bench --bench limits`. Env: SENDWELL_BENCH_RECIPIENTS (default 1,000,000).
//! Writes target/bench-limits.json. Without `--bench` (`cargo test --all-targets`) it runs once
//! over 20,000 recipients with short rounds and no 13 s wait, and writes no file.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use sendwell::config::Config;
use sendwell::job::{Job, Recipient};
use sendwell::phone::parse_e164;
use sendwell::pipeline::decode::Decoder;
use sendwell::pipeline::limits::caps::{CapSubject, Caps};
use sendwell::pipeline::limits::pacing::Pacing;
use sendwell::pipeline::limits::quiet::{Zones, spread_key};
use sendwell::pipeline::limits::throughput::Throughput;
use sendwell::pipeline::limits::tier::Tier;
use sendwell::pipeline::limits::{Check, Limits, MonoClock, Reservation};
use sendwell::store::Ledger;
use tokio_util::sync::CancellationToken;

/// The reference call of part 1: `benches/hot.rs`'s job, decoded and validated.
const JOB: &[u8] = br#"{
  "id": "7f0c1d2e-5a8b-4c11-9f3e-2b7d9c0a1e55",
  "account": "acme-de",
  "to": "+491701234567",
  "category": "marketing",
  "purpose": "newsletter",
  "template": { "name": "spring_sale", "language": "de", "components": [
    { "type": "body", "parameters": [ { "type": "text", "text": "Jessica" } ] } ] },
  "not_before": "2026-11-28T09:00:00Z",
  "expires_at": "2026-11-29T09:00:00Z",
  "metadata": { "campaign": "spring-2027" }
}"#;

const ACCOUNT: &str = "acme-de";
/// Jobs built (untimed) between timed stretches of the stage.
const CHUNK: usize = 65_536;
/// Burst of each account's gate in the `Limits::pass` run; each account gets fewer jobs.
const PASS_BURST: usize = 10_000;
const PER_PASS_ACCOUNT: usize = 9_000;

/// 2026-03-10T12:00:00Z, a Tuesday: 13:00 in Germany (open); 22:00Z is 23:00 (quiet).
const NOON: i64 = 1_773_144_000;
const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn ts(unix_s: i64) -> Timestamp {
    Timestamp::from_second(unix_s).unwrap()
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

/// The i-th recipient's digits: German mobiles +49 151 xxxxxxxx, i scattered over the 10^8
/// subscriber numbers (7919 is prime to 10^8, so i ↦ digits is one-to-one below 10^8).
fn digits_of(i: usize) -> u64 {
    4_915_100_000_000 + (i as u64 * 7919) % 100_000_000
}

/// The account block every bench account shares: 1,000 msgs/s (the Cloud API's maximum),
/// pacing 6 s (the default, spelled out), quiet hours 21:00–09:00 for marketing.
fn account_toml(name: &str, phone: usize, burst: Option<usize>) -> String {
    let burst = burst.map(|b| format!("burst = {b}\n")).unwrap_or_default();
    format!(
        r#"
[[accounts]]
name = "{name}"
phone_number_id = "{phone}"
token_file = "token"
messages_per_second = 1000
{burst}portfolio = "acme"
pacing = {{ interval = "6s", burst = 1 }}
quiet_hours = {{ start = "21:00", end = "09:00", categories = ["marketing"], spread = "30m" }}
"#
    )
}

/// One account (`acme-de`), or `accounts` of them (`acme-0`, …) with gates of burst
/// [`PASS_BURST`] and no jitter reserve; one portfolio of tier `tier`; one cap of 2 rules.
fn config(accounts: usize, tier: usize) -> Config {
    let mut toml = format!(
        r#"
[limits]
arrival_jitter = "0s"

[[purposes]]
name = "newsletter"

[[portfolios]]
name = "acme"
messaging_limit = {tier}

[[caps]]
category = "marketing"
scope = "account"
rules = [{{ max = 1, per = "1d" }}, {{ max = 2, per = "7d" }}]
on_exceed = "suppress"
"#
    );
    if accounts == 1 {
        toml.push_str(&account_toml(ACCOUNT, 1001, None));
    } else {
        for a in 0..accounts {
            toml.push_str(&account_toml(
                &format!("acme-{a}"),
                2000 + a,
                Some(PASS_BURST),
            ));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t").unwrap();
    let p = dir.path().join("sendwell.toml");
    std::fs::write(&p, toml).unwrap();
    Config::load(&p).unwrap()
}

fn job(decoder: &Decoder, account: &str, to: &str) -> Job {
    let json = format!(
        r#"{{"id":"7f0c1d2e-5a8b-4c11-9f3e-2b7d9c0a1e55","account":"{account}","to":"{to}","category":"marketing","purpose":"newsletter","template":{{"name":"spring_sale","language":"de","components":[]}}}}"#
    );
    decoder.decode(json.as_bytes()).unwrap()
}

/// A gauge of the Prometheus text, e.g. `sendwell_limit_state_entries{kind="cap_logs"}`.
fn gauge(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn machine() -> String {
    format!(
        "{} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_default()
    )
}

// ---------------------------------------------------------------------------------------------
// Part 1: ns per call.

/// Runs the call `iters` times; returns the time taken.
type Run<'a> = Box<dyn FnMut(u64) -> Duration + 'a>;

fn timed<'a, R>(mut f: impl FnMut() -> R + 'a) -> Run<'a> {
    Box::new(move |iters| {
        let t = Instant::now();
        for _ in 0..iters {
            black_box(f());
        }
        t.elapsed()
    })
}

struct Micro<'a> {
    name: &'static str,
    run: Run<'a>,
}

struct MicroResult {
    name: &'static str,
    ns: f64,
    ratio: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Every call once per round (rotating the order), `target` of calls each; median ns and
/// median ratio to the first (reference) call of the same round.
fn measure(mut micros: Vec<Micro<'_>>, rounds: usize, target: Duration) -> Vec<MicroResult> {
    // Iterations per call: enough for `target`.
    let iters: Vec<u64> = micros
        .iter_mut()
        .map(|m| {
            let mut n = 1u64;
            loop {
                let t = (m.run)(n);
                if t >= target / 8 || n >= 1 << 30 {
                    let per = t.as_secs_f64() / n as f64;
                    return ((target.as_secs_f64() / per.max(1e-10)) as u64).max(1);
                }
                n *= 2;
            }
        })
        .collect();
    let k = micros.len();
    let mut ns = vec![Vec::with_capacity(rounds); k];
    for round in 0..rounds {
        for j in 0..k {
            let i = (round + j) % k;
            let t = (micros[i].run)(iters[i]);
            ns[i].push(t.as_nanos() as f64 / iters[i] as f64);
        }
    }
    (0..k)
        .map(|i| MicroResult {
            name: micros[i].name,
            ns: median(ns[i].clone()),
            ratio: median((0..rounds).map(|r| ns[i][r] / ns[0][r]).collect()),
        })
        .collect()
}

fn micro_benches(rounds: usize, target: Duration) -> Vec<MicroResult> {
    let config = config(1, 1_000_000);
    let decoder = Decoder::new(&config);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let never = CancellationToken::new();

    // Throughput: a gate whose rate (10^9/s) never refuses.
    let gate = Throughput::new(
        "bench".into(),
        1_000_000_000,
        1_000_000,
        Duration::ZERO,
        Duration::from_secs(10),
        MonoClock::new(),
    );
    // Pacing: 6 s, burst 1; the held number was just sent to.
    let held = Pacing::new(
        Duration::from_secs(6),
        1,
        config.retry.max_delay,
        MonoClock::new(),
    );
    let held_number = digits_of(1);
    held.check(held_number).unwrap();
    assert!(held.check(held_number).is_err());

    // Caps: marketing, at most 1 per day and 2 per 7 days, per account.
    let now = ts(NOON);
    let caps = Caps::new(config.limits.caps.clone(), &[(ACCOUNT, ACCOUNT)]);
    let subject = |digits: &'static str| CapSubject {
        account: ACCOUNT,
        brand: ACCOUNT,
        digits,
        category: sendwell::job::Category::Marketing,
    };
    let (allowed, refused, new, reserved) = (
        subject("4915100000001"),
        subject("4915100000002"),
        subject("4915100000003"),
        subject("4915100000004"),
    );
    // One send two days ago: allowed. One an hour ago: refused by the 1-per-day rule. The
    // reserve bench counts sends of its own number (a log of 2, the largest max, from then on).
    let _ = caps.reserve(&allowed, ts(NOON - 2 * DAY));
    let _ = caps.reserve(&refused, ts(NOON - HOUR));
    let _ = caps.reserve(&reserved, ts(NOON - 2 * DAY));
    assert!(caps.check(&allowed, now).is_none());
    assert!(caps.check(&refused, now).is_some());
    assert!(caps.check(&new, now).is_none());

    // Tier: a portfolio limited to 1,000,000; the number was counted already.
    let tier = Tier::new(&[("acme".into(), 1_000_000)]);
    let tier_number = digits_of(2);
    let tier_digits = tier_number.to_string();
    tier.reserve(0, tier_number, &tier_digits, now).unwrap();

    // Quiet hours 21:00–09:00, Germany: 13:00 (open) and 23:00 (quiet).
    let zones = Zones::load(&[]).unwrap();
    let quiet = config.accounts[0].quiet_hours.clone().unwrap();
    let de = zones.for_number("+491701234567", "DE");
    let key = spread_key("7f0c1d2e-5a8b-4c11-9f3e-2b7d9c0a1e55");
    let night = ts(NOON + 10 * HOUR);
    assert!(quiet.release_at(de, now, key).is_none());
    assert!(quiet.release_at(de, night, key).is_some());
    assert_eq!(
        zones.for_number("+12125550123", "US"),
        zones.for_country("US")
    );
    assert_eq!(
        zones.for_number("+14165550123", "US"),
        zones.for_country("CA")
    );

    // The whole check: caps + quiet hours configured.
    let limits = Limits::new(&config).unwrap();
    let go = job(&decoder, ACCOUNT, "+4915100000001");
    let capped = job(&decoder, ACCOUNT, "+4915100000002");
    let us = job(&decoder, ACCOUNT, "+12125550123");
    let _ = limits.reserve_caps(&go, ts(NOON - 2 * DAY), &mut Reservation::default());
    let _ = limits.reserve_caps(&capped, ts(NOON - HOUR), &mut Reservation::default());
    // 20:00Z: 16:00 in New York, 10:00 in Honolulu: open in every US zone.
    let us_open = ts(NOON + 8 * HOUR);
    assert_eq!(limits.check(&go, now), Check::Go);
    assert!(matches!(
        limits.check(&go, night),
        Check::Defer {
            reason: "quiet_hours",
            ..
        }
    ));
    assert!(matches!(
        limits.check(&capped, now),
        Check::Suppress {
            reason: "frequency_cap",
            ..
        }
    ));
    assert_eq!(limits.check(&us, us_open), Check::Go);

    let mut fresh_base = 4_915_200_000_000u64;
    let micros = vec![
        Micro {
            name: "reference: decode + validate a job (hot.rs)",
            run: timed(|| decoder.decode(black_box(JOB)).unwrap()),
        },
        Micro {
            name: "throughput: Throughput::try_acquire (never refuses)",
            run: timed(|| gate.try_acquire()),
        },
        Micro {
            name: "throughput: Throughput::acquire (async, FIFO mutex; never waits)",
            run: Box::new(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        black_box(gate.acquire(&never).await.unwrap());
                    }
                    t.elapsed()
                })
            }),
        },
        Micro {
            name: "throughput: Throughput::at_the_door (never waits)",
            run: Box::new(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        black_box(gate.at_the_door(&never).await);
                    }
                    t.elapsed()
                })
            }),
        },
        Micro {
            name: "pacing: Pacing::check, fresh number (map from empty)",
            run: Box::new(move |iters| {
                let p = Pacing::new(
                    Duration::from_secs(6),
                    1,
                    Duration::from_secs(2),
                    MonoClock::new(),
                );
                let t = Instant::now();
                for k in 0..iters {
                    let _ = black_box(p.check(black_box(fresh_base + k)));
                }
                let took = t.elapsed();
                fresh_base += iters;
                drop(p);
                took
            }),
        },
        Micro {
            name: "pacing: Pacing::check, held number (refused, wait computed)",
            run: timed(|| held.check(black_box(held_number))),
        },
        Micro {
            name: "caps: Caps::check, allowed (log of 1 present)",
            run: timed(|| caps.check(black_box(&allowed), now)),
        },
        Micro {
            name: "caps: Caps::check, allowed (no log: new recipient)",
            run: timed(|| caps.check(black_box(&new), now)),
        },
        Micro {
            name: "caps: Caps::check, refused (detail formatted)",
            run: timed(|| caps.check(black_box(&refused), now)),
        },
        Micro {
            name: "caps: Caps::reserve (log present; builds the store row)",
            run: timed(|| caps.reserve(black_box(&reserved), now)),
        },
        Micro {
            name: "tier: Tier::reserve, counted number (builds the store row)",
            run: timed(|| tier.reserve(0, black_box(tier_number), &tier_digits, now)),
        },
        Micro {
            name: "metrics: limit_wait histogram (Limits::pass, every job)",
            run: timed(|| sendwell::metrics::limit_wait(ACCOUNT, "throughput", Duration::ZERO)),
        },
        Micro {
            name: "metrics: tier gauges (Tier::reserve, every counted job)",
            run: timed(|| sendwell::metrics::tier("acme", 1, 1_000_000)),
        },
        Micro {
            name: "quiet: QuietHours::release_at, DE, not quiet",
            run: timed(|| quiet.release_at(black_box(de), now, key)),
        },
        Micro {
            name: "quiet: QuietHours::release_at, DE, quiet",
            run: timed(|| quiet.release_at(black_box(de), night, key)),
        },
        Micro {
            name: "quiet: Zones::for_number +49 (DE)",
            run: timed(|| zones.for_number(black_box("+491701234567"), "DE").len()),
        },
        Micro {
            name: "quiet: Zones::for_number +1 (US, phonenumber parse)",
            run: timed(|| zones.for_number(black_box("+12125550123"), "US").len()),
        },
        Micro {
            name: "quiet: Zones::for_number +1 (CA, phonenumber parse)",
            run: timed(|| zones.for_number(black_box("+14165550123"), "US").len()),
        },
        Micro {
            name: "Limits::check marketing DE → Go (quiet + caps, log present)",
            run: timed(|| limits.check(black_box(&go), now)),
        },
        Micro {
            name: "Limits::check marketing DE → Defer (quiet hours)",
            run: timed(|| limits.check(black_box(&go), night)),
        },
        Micro {
            name: "Limits::check marketing DE → Suppress (cap)",
            run: timed(|| limits.check(black_box(&capped), now)),
        },
        Micro {
            name: "Limits::check marketing US → Go (quiet via phonenumber parse)",
            run: timed(|| limits.check(black_box(&us), us_open)),
        },
        Micro {
            name: "Limits::quiet_now marketing DE, not quiet (after the waits)",
            run: timed(|| limits.quiet_now(black_box(&go), now)),
        },
    ];
    measure(micros, rounds, target)
}

// ---------------------------------------------------------------------------------------------
// Parts 2 and 3: children, each a fresh process (RSS figures of their own).

/// Prints one `key=value` line for the parent.
fn out(k: &str, v: impl std::fmt::Display) {
    println!("{k}={v}");
}

/// Fills `chunk` with the recipients `from..from + len`.
fn recipients(chunk: &mut Vec<Recipient>, from: usize, len: usize) {
    chunk.clear();
    let mut e164 = String::with_capacity(16);
    for i in from..from + len {
        e164.clear();
        write!(e164, "+{}", digits_of(i)).unwrap();
        chunk.push(parse_e164(&e164).unwrap());
    }
}

/// Microseconds of clock per job: 1 ms (one account at 1,000/s), less when N is so large that
/// the run would leave the open window (09:00–21:00 in Germany; the run starts at 10:00 local).
fn step_us(n: usize) -> i64 {
    (36_000_000_000 / n.max(1) as i64).min(1000)
}

/// ns per decode of `job` (the reference call), median of 9 stretches of ~10 ms: measured in
/// the stage's own process right before and after it, so its ns/job reads as a ratio too.
fn decode_ns(decoder: &Decoder, job: &[u8]) -> Vec<f64> {
    let iters = 10_000;
    (0..9)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(decoder.decode(black_box(job)).unwrap());
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect()
}

/// Part 2 with one account, and part 3 over what it left behind.
fn phase_stage(n: usize, bench_mode: bool) {
    let metrics = sendwell::app::metrics_handle();
    let config = config(1, n.max(1_000_000));
    let decoder = Decoder::new(&config);
    let limits = Arc::new(Limits::new(&config).unwrap());
    let account = &config.accounts[0];
    // `Limits::pass` is these two, on the account's own limiters (whose gate runs at 1,000/s).
    let pacing = Pacing::new(
        account.pacing_interval,
        account.pacing_burst,
        config.retry.max_delay,
        MonoClock::new(),
    );
    let gate = Throughput::new(
        "bench".into(),
        1_000_000_000,
        1_000_000,
        Duration::ZERO,
        Duration::from_secs(10),
        MonoClock::new(),
    );
    let ledger = Ledger::open_in_memory().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let never = CancellationToken::new();
    let start = ts(NOON - 3 * HOUR);
    let step = step_us(n);
    let mut job = job(&decoder, ACCOUNT, "+4915100000000");
    let mut chunk = Vec::with_capacity(CHUNK);
    recipients(&mut chunk, 0, CHUNK.min(n));
    let mut reference = decode_ns(&decoder, JOB);
    let rss0 = rss_kib();
    let mut took = Duration::ZERO;
    let mut not_go = 0usize;
    let mut k = 0usize;
    while k < n {
        let len = CHUNK.min(n - k);
        if k > 0 {
            recipients(&mut chunk, k, len);
        }
        took += rt.block_on(async {
            let t = Instant::now();
            for (j, to) in chunk.iter_mut().enumerate() {
                std::mem::swap(&mut job.to, to);
                let now = start + Duration::from_micros(((k + j) as i64 * step) as u64);
                if limits.check(&job, now) != Check::Go {
                    not_go += 1;
                    continue;
                }
                let mut r = Reservation::default();
                let Ok(tier) = limits.reserve_tier(&job, false, now, &mut r) else {
                    not_go += 1;
                    continue;
                };
                // `Limits::pass`, on the bench's own limiters.
                let number: u64 = job.to.digits().parse().unwrap();
                if pacing.backing_off(number).is_some() {
                    not_go += 1;
                    continue;
                }
                black_box(gate.acquire(&never).await.unwrap());
                if pacing.check(number).is_err() || limits.quiet_now(&job, now).is_some() {
                    not_go += 1;
                    continue;
                }
                let caps = limits.reserve_caps(&job, now, &mut r);
                black_box(gate.at_the_door(&never).await);
                pacing.sent(number);
                black_box((tier, caps));
            }
            t.elapsed()
        });
        k += len;
    }
    assert_eq!(not_go, 0, "every job passes");
    let rss1 = rss_kib();
    reference.extend(decode_ns(&decoder, JOB));
    out("ref_ns", median(reference));
    let end = start + Duration::from_micros((n as i64 * step) as u64);
    out("stage_s", took.as_secs_f64());
    out("rss0_kib", rss0);
    out("rss1_kib", rss1);
    out("hwm_delta_kib", status_kib("VmHWM:").saturating_sub(rss0));

    // Housekeeping once, with everything still live.
    let t = Instant::now();
    rt.block_on(limits.clone().housekeep(&ledger, end)).unwrap();
    let pairs = pacing.housekeep();
    out("housekeep_s", t.elapsed().as_secs_f64());
    let text = metrics.render();
    out("live_pacing", pairs);
    out(
        "live_caps",
        gauge(&text, r#"sendwell_limit_state_entries{kind="cap_logs"}"#),
    );
    out("live_tier", limits.tier_usage(ACCOUNT, end).unwrap().0);
    out("rss2_kib", rss_kib());

    // The clock moves on: pairs are gone 12 s after their last send (6 s, burst 1), cap logs
    // after the longest rule (7 d), tier counts after 24 h.
    if bench_mode {
        std::thread::sleep(Duration::from_secs(13));
    }
    let later = end + Duration::from_secs(7 * 86_400 + 1);
    let t = Instant::now();
    rt.block_on(limits.clone().housekeep(&ledger, later))
        .unwrap();
    let pairs = pacing.housekeep();
    out("expire_s", t.elapsed().as_secs_f64());
    let text = metrics.render();
    out(
        "after_pacing",
        if bench_mode { pairs as f64 } else { f64::NAN },
    );
    out(
        "after_caps",
        gauge(&text, r#"sendwell_limit_state_entries{kind="cap_logs"}"#),
    );
    out("after_tier", limits.tier_usage(ACCOUNT, later).unwrap().0);
    out("rss3_kib", rss_kib());
    drop(limits);
    drop(pacing);
    out("rss4_kib", rss_kib());
}

/// Part 2 through `Limits::pass` itself: N/9,000 accounts, none of whose gates waits.
fn phase_pass(n: usize) {
    let metrics = sendwell::app::metrics_handle();
    let accounts = n.div_ceil(PER_PASS_ACCOUNT).max(1);
    let config = config(accounts, n.max(1_000_000));
    let decoder = Decoder::new(&config);
    let limits = Limits::new(&config).unwrap();
    let names: Vec<Arc<str>> = config.accounts.iter().map(|a| a.name.clone()).collect();
    let inline_max = config.retry.inline_max_delay;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let never = CancellationToken::new();
    let start = ts(NOON - 3 * HOUR);
    let step = step_us(n);
    let mut job = job(&decoder, &names[0], "+4915100000000");
    let mut chunk = Vec::with_capacity(CHUNK);
    let reference_job = std::str::from_utf8(JOB)
        .unwrap()
        .replace(ACCOUNT, &names[0]);
    let mut reference = decode_ns(&decoder, reference_job.as_bytes());
    let mut took = Duration::ZERO;
    let mut not_go = 0usize;
    let mut k = 0usize;
    while k < n {
        let len = CHUNK.min(n - k);
        recipients(&mut chunk, k, len);
        took += rt.block_on(async {
            let t = Instant::now();
            for (j, to) in chunk.iter_mut().enumerate() {
                std::mem::swap(&mut job.to, to);
                job.account = names[(k + j) % accounts].clone();
                let now = start + Duration::from_micros(((k + j) as i64 * step) as u64);
                if limits.check(&job, now) != Check::Go {
                    not_go += 1;
                    continue;
                }
                let mut r = Reservation::default();
                let Ok(tier) = limits.reserve_tier(&job, false, now, &mut r) else {
                    not_go += 1;
                    continue;
                };
                if limits.pass(&job, inline_max, &never).await.is_err()
                    || limits.quiet_now(&job, now).is_some()
                {
                    not_go += 1;
                    continue;
                }
                let caps = limits.reserve_caps(&job, now, &mut r);
                limits.at_the_door(&job, &never).await;
                limits.sent(&job);
                black_box((tier, caps));
            }
            t.elapsed()
        });
        // The daemon drains the histograms every few seconds, off the jobs' path.
        metrics.run_upkeep();
        k += len;
    }
    assert_eq!(not_go, 0, "every job passes");
    reference.extend(decode_ns(&decoder, reference_job.as_bytes()));
    out("ref_ns", median(reference));
    out("pass_s", took.as_secs_f64());
    out("pass_accounts", accounts);
    // How many wait samples the histograms took, though no job waited.
    let text = metrics.render();
    for limit in ["pacing", "throughput", "door"] {
        let label = format!("limit=\"{limit}\"");
        let samples: f64 = text
            .lines()
            .filter(|l| l.starts_with("sendwell_limit_wait_seconds_count{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        out(&format!("wait_samples_{limit}"), samples + 0.0);
    }
}

/// Part 3, one structure alone in a fresh process: `what` = pacing, caps or tier.
fn phase_alone(what: &str, n: usize) {
    let config = config(1, n.max(1_000_000));
    let start = ts(NOON - 3 * HOUR);
    let step = step_us(n);
    let pacing = Pacing::new(
        Duration::from_secs(6),
        1,
        config.retry.max_delay,
        MonoClock::new(),
    );
    let caps = Caps::new(config.limits.caps.clone(), &[(ACCOUNT, ACCOUNT)]);
    let tier = Tier::new(&config.limits.portfolios);
    let mut digits = String::with_capacity(16);
    let rss0 = rss_kib();
    let t = Instant::now();
    for i in 0..n {
        let number = digits_of(i);
        let now = start + Duration::from_micros((i as i64 * step) as u64);
        match what {
            "pacing" => pacing.check(number).unwrap(),
            "caps" => {
                digits.clear();
                write!(digits, "{number}").unwrap();
                let s = CapSubject {
                    account: ACCOUNT,
                    brand: ACCOUNT,
                    digits: &digits,
                    category: sendwell::job::Category::Marketing,
                };
                black_box(caps.reserve(&s, now));
            }
            "tier" => {
                digits.clear();
                write!(digits, "{number}").unwrap();
                black_box(tier.reserve(0, number, &digits, now).unwrap());
            }
            other => panic!("unknown structure {other}"),
        }
    }
    let took = t.elapsed();
    let rss1 = rss_kib();
    let entries = match what {
        "pacing" => pacing.housekeep(),
        "caps" => caps.len(),
        _ => {
            tier.usage(0, start + Duration::from_micros((n as i64 * step) as u64))
                .0
        }
    };
    out("fill_s", took.as_secs_f64());
    out("entries", entries);
    out("rss_delta_kib", rss1.saturating_sub(rss0));
    out("hwm_delta_kib", status_kib("VmHWM:").saturating_sub(rss0));
    // Pacing's housekeeping ran above (it shrinks the map to fit): RSS after it.
    out(
        "rss_after_housekeep_delta_kib",
        rss_kib().saturating_sub(rss0),
    );
}

fn child(phase: &str, n: usize) -> BTreeMap<String, f64> {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("SENDWELL_BENCH_PHASE", phase)
        .env("SENDWELL_BENCH_RECIPIENTS", n.to_string());
    if std::env::args().any(|a| a == "--bench") {
        cmd.arg("--bench");
    }
    let out = cmd.output().unwrap();
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

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let n: usize = if bench_mode {
        env_or("SENDWELL_BENCH_RECIPIENTS", 1_000_000)
    } else {
        env_or("SENDWELL_BENCH_RECIPIENTS", 20_000).min(20_000)
    };
    if let Ok(phase) = std::env::var("SENDWELL_BENCH_PHASE") {
        match phase.as_str() {
            "stage" => phase_stage(n, bench_mode),
            "pass" => phase_pass(n),
            what => phase_alone(what, n),
        }
        return;
    }

    // Parts 2 and 3 first, each in a fresh process; part 1 here afterwards.
    let stage = child("stage", n);
    let pass = child("pass", n);
    let alone: Vec<(&str, BTreeMap<String, f64>)> = ["pacing", "caps", "tier"]
        .into_iter()
        .map(|w| (w, child(w, n)))
        .collect();
    let (rounds, target) = if bench_mode {
        (11, Duration::from_millis(20))
    } else {
        (3, Duration::from_millis(1))
    };
    let plain = micro_benches(rounds, target);
    // The daemon's recorder, as `app::start` installs it: gauges and histograms are real now.
    let _metrics = sendwell::app::metrics_handle();
    let recorded = micro_benches(rounds, target);

    // Report.
    let nf = n as f64;
    let mib = |kib: f64| kib / 1024.0;
    let per = |kib: f64, k: f64| kib * 1024.0 / k.max(1.0);
    let machine = machine();
    let mut md = String::new();
    writeln!(md, "sendwell limits bench — {machine}, {n} recipients").unwrap();
    writeln!(md).unwrap();
    writeln!(
        md,
        "ns per call: median of {rounds} interleaved rounds; ratio = call ÷ reference in the same round (median)"
    )
    .unwrap();
    writeln!(md).unwrap();
    writeln!(
        md,
        "| call | ns (no recorder) | × ref | ns (Prometheus recorder) | × ref |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|").unwrap();
    for (a, b) in plain.iter().zip(&recorded) {
        writeln!(
            md,
            "| {} | {:.1} | {:.3} | {:.1} | {:.3} |",
            a.name, a.ns, a.ratio, b.ns, b.ratio
        )
        .unwrap();
    }
    let stage_s = stage["stage_s"];
    let hk_s = stage["housekeep_s"];
    let pass_s = pass["pass_s"];
    writeln!(md).unwrap();
    writeln!(
        md,
        "Limits stage, {n} distinct recipients, one task, marketing jobs (quiet hours 21:00–09:00 checked, never quiet at the run's clock; cap 1/1d + 2/7d; tier ≥ N; pacing 6 s); store rows built, not written"
    )
    .unwrap();
    writeln!(md).unwrap();
    writeln!(
        md,
        "| run | per job | jobs/s | ns/job | × decode (same process) | housekeeping once (live state) | jobs/s incl. it |"
    )
    .unwrap();
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|").unwrap();
    writeln!(
        md,
        "| 1 account | check → reserve_tier → [Pacing::backing_off → Throughput::acquire → Pacing::check] (pass, on own limiters: the gate never waits) → quiet_now → reserve_caps → Throughput::at_the_door → Pacing::sent | {:.0} | {:.0} | {:.2} | {:.0} ms | {:.0} |",
        nf / stage_s,
        stage_s * 1e9 / nf,
        stage_s * 1e9 / nf / stage["ref_ns"],
        hk_s * 1e3,
        nf / (stage_s + hk_s)
    )
    .unwrap();
    writeln!(
        md,
        "| {} accounts | check → reserve_tier → Limits::pass → quiet_now → reserve_caps → Limits::at_the_door → Limits::sent (burst {PASS_BURST}: gates never wait) | {:.0} | {:.0} | {:.2} | – | – |",
        pass["pass_accounts"],
        nf / pass_s,
        pass_s * 1e9 / nf,
        pass_s * 1e9 / nf / pass["ref_ns"]
    )
    .unwrap();
    writeln!(md).unwrap();
    writeln!(
        md,
        "Wait samples recorded in `sendwell_limit_wait_seconds` during the `Limits::pass` run (no job waited): pacing {:.0}, throughput {:.0}, door {:.0} for {n} jobs",
        pass["wait_samples_pacing"], pass["wait_samples_throughput"], pass["wait_samples_door"]
    )
    .unwrap();
    let growth = stage["rss1_kib"] - stage["rss0_kib"];
    writeln!(md).unwrap();
    writeln!(md, "Memory (RSS, /proc/self/status)").unwrap();
    writeln!(md).unwrap();
    writeln!(
        md,
        "| state | entries | RSS growth | bytes/recipient | peak RSS growth | fill ns/entry |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|---:|").unwrap();
    writeln!(
        md,
        "| all, after the 1-account stage | {:.0} pairs, {:.0} logs, {:.0} counts | {:.1} MiB | {:.1} | {:.1} MiB | – |",
        stage["live_pacing"],
        stage["live_caps"],
        stage["live_tier"],
        mib(growth),
        per(growth, nf),
        mib(stage["hwm_delta_kib"]),
    )
    .unwrap();
    for (what, m) in &alone {
        let label = match *what {
            "pacing" => "pacing pairs alone (Pacing, keyed governor)",
            "caps" => "cap logs alone (Caps, 1 log per recipient)",
            _ => "tier counts alone (Tier: HashMap + BTreeSet)",
        };
        writeln!(
            md,
            "| {label} | {:.0} | {:.1} MiB | {:.1} | {:.1} MiB | {:.0} |",
            m["entries"],
            mib(m["rss_delta_kib"]),
            per(m["rss_delta_kib"], nf),
            mib(m["hwm_delta_kib"].max(m["rss_delta_kib"])),
            m["fill_s"] * 1e9 / nf
        )
        .unwrap();
    }
    let p = &alone[0].1;
    writeln!(
        md,
        "| pacing pairs alone, after housekeeping (shrink_to_fit; pairs still live) | {:.0} | {:.1} MiB | {:.1} | – | – |",
        p["entries"],
        mib(p["rss_after_housekeep_delta_kib"]),
        per(p["rss_after_housekeep_delta_kib"], nf)
    )
    .unwrap();
    writeln!(md).unwrap();
    writeln!(
        md,
        "Housekeeping after the clock moved on (pacing: 13 s real time later; caps, tier: now + 7 d + 1 s)"
    )
    .unwrap();
    writeln!(md).unwrap();
    writeln!(
        md,
        "| | pacing pairs | cap logs | tier counts | RSS above the start | housekeeping took |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|---:|").unwrap();
    writeln!(
        md,
        "| end of the run | {:.0} | {:.0} | {:.0} | {:.1} MiB | {:.0} ms |",
        stage["live_pacing"],
        stage["live_caps"],
        stage["live_tier"],
        mib(stage["rss2_kib"] - stage["rss0_kib"]),
        hk_s * 1e3
    )
    .unwrap();
    writeln!(
        md,
        "| clock moved on | {:.0} | {:.0} | {:.0} | {:.1} MiB | {:.0} ms |",
        stage["after_pacing"],
        stage["after_caps"],
        stage["after_tier"],
        mib(stage["rss3_kib"] - stage["rss0_kib"]),
        stage["expire_s"] * 1e3
    )
    .unwrap();
    writeln!(
        md,
        "| Limits and pacing dropped | – | – | – | {:.1} MiB | – |",
        mib(stage["rss4_kib"] - stage["rss0_kib"])
    )
    .unwrap();
    println!("{md}");

    let micro_json = |rs: &[MicroResult]| {
        rs.iter()
            .map(|r| serde_json::json!({ "call": r.name, "ns": r.ns, "ratio_to_reference": r.ratio }))
            .collect::<Vec<_>>()
    };
    let json = serde_json::json!({
        "machine": machine,
        "recipients": n,
        "micro_rounds": rounds,
        "reference": plain[0].name,
        "ns_per_call_no_recorder": micro_json(&plain),
        "ns_per_call_prometheus_recorder": micro_json(&recorded),
        "stage_one_account": {
            "included": "Limits::check, Limits::reserve_tier, [Pacing::backing_off, Throughput::acquire, Pacing::check] (Limits::pass on limiters of the bench's own; gate rate 10^9/s: never waits), Limits::quiet_now, Limits::reserve_caps, Throughput::at_the_door, Pacing::sent; store rows built, not written",
            "seconds": stage_s, "jobs_per_second": nf / stage_s, "ns_per_job": stage_s * 1e9 / nf,
            "housekeeping_seconds": hk_s, "jobs_per_second_with_housekeeping": nf / (stage_s + hk_s),
            "decode_ns_same_process": stage["ref_ns"], "ratio_to_decode": stage_s * 1e9 / nf / stage["ref_ns"],
        },
        "stage_limits_pass": {
            "included": "Limits::check, Limits::reserve_tier, Limits::pass, Limits::quiet_now, Limits::reserve_caps, Limits::at_the_door, Limits::sent; gates of burst 10000 never wait",
            "accounts": pass["pass_accounts"], "seconds": pass_s, "jobs_per_second": nf / pass_s,
            "ns_per_job": pass_s * 1e9 / nf,
            "decode_ns_same_process": pass["ref_ns"], "ratio_to_decode": pass_s * 1e9 / nf / pass["ref_ns"],
            "wait_samples": { "pacing": pass["wait_samples_pacing"], "throughput": pass["wait_samples_throughput"], "door": pass["wait_samples_door"] },
        },
        "memory": {
            "stage": stage,
            "alone": alone.iter().map(|(w, m)| (w.to_string(), serde_json::json!(m))).collect::<BTreeMap<_, _>>(),
            "bytes_per_recipient_all": per(growth, nf),
        },
    });
    // A quick run under `cargo test` leaves the last bench's figures alone.
    if bench_mode {
        let _ = std::fs::create_dir_all("target");
        let _ = std::fs::write(
            "target/bench-limits.json",
            serde_json::to_vec_pretty(&json).unwrap(),
        );
    }
}
