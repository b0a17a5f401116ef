//! What the kernel knows about a process: CPU time (utime + stime, all threads) and peak RSS,
//! from `/proc`, so the bench measures the daemon's own cost, not the load generator's.

use std::collections::BTreeMap;
use std::time::Instant;

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), asked of `getconf` (no libc dependency);
/// 100 on every Linux this runs on, which is also the fallback.
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// utime + stime of a process, in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// utime + stime per thread name (`/proc/<pid>/task/*/stat`), summed over threads of the same
/// name: where a process spends its CPU (the daemon's tokio workers, ledger writer, AMQP I/O
/// loop). A thread that ended between two readings drops out; the process total does not.
pub fn thread_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let (Some(u), Some(s)) = (
            fields.get(11).and_then(|f| f.parse::<u64>().ok()),
            fields.get(12).and_then(|f| f.parse::<u64>().ok()),
        ) else {
            continue;
        };
        *by_name.entry(name).or_insert(0) += u + s;
    }
    by_name
}

/// Peak resident set size (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The whole machine's (busy, total) ticks over all cores, from the `cpu` line of `/proc/stat`.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    let total: u64 = v.iter().take(8).sum();
    Some((total - idle, total))
}

/// RabbitMQ's Erlang VM (`beam.smp` running the rabbit application), if visible.
pub fn find_rabbitmq() -> Option<u32> {
    let mut candidates = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "beam.smp" {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let rabbit = String::from_utf8_lossy(&cmdline).contains("rabbit");
            candidates.push((rabbit, pid));
        }
    }
    candidates.sort();
    candidates.last().map(|&(_, pid)| pid)
}

/// utime + stime of every process named `postgres` (the postmaster, its background workers and
/// every backend), in clock ticks: the database's CPU, whoever's sessions spend it. A process
/// that starts and exits between two readings is missed; the daemon's connections live for the
/// whole run, so what escapes is the odd short session (autovacuum workers among them).
/// `SENDWELL_BENCH_PG_CLUSTER` (e.g. `15/bench`, Debian's cluster name) counts only that
/// cluster's processes (their command line names it), so other clusters on the machine, with
/// other sessions, are left out.
pub fn postgres_ticks() -> Option<u64> {
    let cluster = std::env::var("SENDWELL_BENCH_PG_CLUSTER")
        .ok()
        .filter(|c| !c.is_empty());
    let mut sum = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "postgres"
            && cluster.as_ref().is_none_or(|c| {
                // The postmaster's `-D /…/15/bench`, the others' title `postgres: 15/bench: …`.
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|l| String::from_utf8_lossy(&l).contains(c.as_str()))
            })
            && let Some(t) = cpu_ticks(pid)
        {
            sum = Some(sum.unwrap_or(0) + t);
        }
    }
    sum
}

/// Which processes a run watches.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    /// The measured process: the daemon or the baseline.
    pub target: u32,
    pub broker: Option<u32>,
    /// Clock ticks per second ([`clock_ticks`]).
    pub ticks: u64,
}

/// CPU counters at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub at: Instant,
    pub target: Option<u64>,
    pub broker: Option<u64>,
    /// PostgreSQL's processes together ([`postgres_ticks`]); None when none runs.
    pub postgres: Option<u64>,
    /// This process: the load generator, the outcome collector and the sandbox.
    pub bench: Option<u64>,
    pub machine: Option<(u64, u64)>,
    /// The measured process's CPU by thread name ([`thread_ticks`]).
    pub threads: BTreeMap<String, u64>,
}

impl Probe {
    pub fn snap(&self) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            target: cpu_ticks(self.target),
            broker: self.broker.and_then(cpu_ticks),
            postgres: postgres_ticks(),
            bench: cpu_ticks(std::process::id()),
            machine: machine_ticks(),
            threads: thread_ticks(self.target),
        }
    }
}

/// CPU seconds spent between two snapshots.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub target_s: Option<f64>,
    pub broker_s: Option<f64>,
    pub postgres_s: Option<f64>,
    pub bench_s: Option<f64>,
    /// Share of all cores busy (any process), 0..=1.
    pub machine_busy: Option<f64>,
    /// The measured process's CPU seconds by thread name, for threads alive at both readings.
    pub threads_s: BTreeMap<String, f64>,
}

pub fn usage(a: &Snapshot, b: &Snapshot, ticks_per_s: u64) -> Usage {
    let secs =
        |x: Option<u64>, y: Option<u64>| Some(y?.saturating_sub(x?) as f64 / ticks_per_s as f64);
    Usage {
        target_s: secs(a.target, b.target),
        broker_s: secs(a.broker, b.broker),
        postgres_s: secs(a.postgres, b.postgres),
        bench_s: secs(a.bench, b.bench),
        machine_busy: match (a.machine, b.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some((b1 - b0) as f64 / (t1 - t0) as f64)
            }
            _ => None,
        },
        threads_s: b
            .threads
            .iter()
            .filter_map(|(name, &t1)| {
                let t0 = *a.threads.get(name)?;
                Some((
                    name.clone(),
                    t1.saturating_sub(t0) as f64 / ticks_per_s as f64,
                ))
            })
            .collect(),
    }
}
