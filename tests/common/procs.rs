//! Daemon processes that a test may kill: `sendwell run` as an operator runs it, N of them on
//! chosen shards, sharing one PostgreSQL test database and the env's broker vhost and sandbox
//! (the sandbox stays in the test process, so the test reads its arrival log). Each has its own
//! config file, state directory, admin port and log file; it can be SIGKILLed and started
//! again on the same config. Which one is a shard's active instance is asked of the broker,
//! not of the daemons: a single-active-consumer queue names its active consumer in the
//! management API, and the consumer's connection is traced to the process that owns it.
//!
//! The logs (stderr, every start appended to one file per instance) are kept when the test
//! fails (or with `SENDWELL_TEST_KEEP_LOGS=1`), and their place is printed.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::pg::TestDb;
use super::{GOOD_TOKEN, RELAXED_LIMITS, TestEnv, state_backend_toml, wait_for, write_config_on};

/// One daemon process slot: its config on disk, and the process while it runs.
pub struct Instance {
    /// `i0`, `i1`, …: in log lines and panic messages.
    pub name: String,
    pub shard: u16,
    /// The admin listener (`127.0.0.1:port`), fixed in the config so that a restart keeps it.
    pub admin: String,
    pub config_path: PathBuf,
    /// stderr of every start, one after the other.
    pub log_path: PathBuf,
    /// How many times it was started.
    pub starts: u32,
    child: Option<Child>,
    /// Config, state directory and log; kept (not deleted) when the test fails.
    dir: Option<tempfile::TempDir>,
}

impl Instance {
    /// Starts the process on its config; its stderr is appended to its log file.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        use std::io::Write;
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        writeln!(log, "=== {} start {} ===", self.name, self.starts).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sendwell"));
        cmd.args(["run", "--config"])
            .arg(&self.config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        // The daemon's log at the test's level: SENDWELL_TEST_LOG=sendwell=debug.
        if let Ok(filter) = std::env::var("SENDWELL_TEST_LOG") {
            cmd.env("SENDWELL_LOG__FILTER", filter);
        }
        self.child = Some(cmd.spawn().expect("the daemon starts"));
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process runs (a start that failed ends it: its log says why).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `kill -9`, then waits until the process is gone.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("the instance runs");
        child.kill().expect("SIGKILL");
        let name = self.name.clone();
        wait_for(
            &format!("{name} to die of SIGKILL"),
            Duration::from_secs(10),
            async || child.try_wait().unwrap(),
        )
        .await;
    }

    /// SIGTERM, then its exit status (a graceful stop, within `within`).
    pub async fn terminate(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("the instance runs");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let name = self.name.clone();
        wait_for(
            &format!("{name} to exit after SIGTERM"),
            within,
            async || child.try_wait().unwrap(),
        )
        .await
    }

    /// Its `/metrics` text, or None while it does not answer.
    pub async fn metrics(&self) -> Option<String> {
        super::scrape(&self.admin).await
    }

    /// Whether `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        reqwest::get(format!("http://{}/readyz", self.admin))
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// The last `lines` lines of its log, for panic messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // SENDWELL_TEST_KEEP_LOGS=1 keeps them after a passing test too.
        let keep =
            std::thread::panicking() || std::env::var_os("SENDWELL_TEST_KEEP_LOGS").is_some();
        if keep && let Some(dir) = self.dir.take() {
            let kept = dir.keep();
            eprintln!(
                "{}: config, state and log kept in {}",
                self.name,
                kept.display()
            );
        }
    }
}

/// Daemon processes on one PostgreSQL state. Dropped: every process still running is killed,
/// then the database is dropped.
pub struct Procs {
    /// In the order they were asked for; index = the `i` in their names.
    pub instances: Vec<Instance>,
    /// Declared after the instances, so it is dropped after their processes are gone.
    pub db: TestDb,
    vhost: String,
}

impl Procs {
    /// One instance per entry of `shards` (its shard), none started yet, on a fresh database.
    /// `extra` is appended to each config (as `TestEnv`'s configs take it); `prefetch` is the
    /// broker prefetch of each.
    pub async fn new(env: &TestEnv, shards: &[u16], prefetch: u16, extra: &str) -> Procs {
        let db = TestDb::new().await;
        let instances = shards
            .iter()
            .enumerate()
            .map(|(i, &shard)| {
                let dir = tempfile::tempdir().unwrap();
                let admin = free_addr();
                let path = write_config_on(
                    dir.path(),
                    &env.broker.url,
                    &env.sandbox_addr,
                    GOOD_TOKEN,
                    prefetch,
                    RELAXED_LIMITS,
                    extra,
                    &state_backend_toml(Some(&db)),
                );
                // Shard and admin port in the file itself: a restart on "the same config" is
                // the same file, as systemd would start it again.
                let toml = std::fs::read_to_string(&path).unwrap();
                let toml = toml
                    .replacen("[broker]\n", &format!("[broker]\nshard = {shard}\n"), 1)
                    .replacen(
                        "[admin]\nlisten = \"127.0.0.1:0\"",
                        &format!("[admin]\nlisten = \"{admin}\""),
                        1,
                    );
                assert!(toml.contains(&admin) && toml.contains(&format!("shard = {shard}")));
                std::fs::write(&path, toml).unwrap();
                Instance {
                    name: format!("i{i}"),
                    shard,
                    admin,
                    config_path: path,
                    log_path: dir.path().join("daemon.log"),
                    starts: 0,
                    child: None,
                    dir: Some(dir),
                }
            })
            .collect();
        Procs {
            instances,
            db,
            vhost: env.broker.vhost.clone(),
        }
    }

    /// Instance `i`'s config as the daemon loads it (for seeding its state before any start).
    pub fn config(&self, i: usize) -> sendwell::config::Config {
        sendwell::config::Config::load(&self.instances[i].config_path).expect("a valid config")
    }

    /// Starts instance `i` and waits until it answers `/readyz`, which it does once the broker
    /// has confirmed its consumer on its shard's jobs queue (`basic.consume-ok`, active or
    /// waiting: the session's set-up, before `broker` readiness). The management API's view
    /// of consumers ([`Self::consumer_of`]) lags by its statistics interval (5 s): waiting for
    /// it too cost each start about 4.5 s.
    pub async fn start(&mut self, i: usize) {
        self.instances[i].spawn();
        let within = Duration::from_secs(60);
        let inst = &mut self.instances[i];
        let name = inst.name.clone();
        wait_for(&format!("{name} to be ready"), within, async || {
            assert!(
                inst.running(),
                "{name} exited while starting:\n{}",
                inst.log_tail(30)
            );
            inst.ready().await.then_some(())
        })
        .await;
    }

    /// Which instance the broker delivers shard `shard`'s jobs to: the one whose connection
    /// holds the queue's active consumer. None while no consumer is active (between a death
    /// and the broker's handover) or the active one is no instance of ours.
    pub async fn active(&self, shard: u16) -> Option<usize> {
        let queue = format!("sendwell.jobs.{shard}");
        let active: Vec<u16> = self
            .consumers()
            .await?
            .into_iter()
            .filter(|c| c.queue == queue && c.active)
            .map(|c| c.peer_port)
            .collect();
        let [port] = active[..] else { return None };
        self.owner_of(port)
    }

    /// Instance `i`'s consumer on its jobs queue, as the broker sees it.
    pub async fn consumer_of(&self, i: usize) -> Option<Consumer> {
        let queue = format!("sendwell.jobs.{}", self.instances[i].shard);
        let pid = self.instances[i].pid()?;
        self.consumers()
            .await?
            .into_iter()
            .find(|c| c.queue == queue && owns_local_port(pid, c.peer_port))
    }

    /// Every consumer in the vhost, from the management API (None: it did not answer).
    pub async fn consumers(&self) -> Option<Vec<Consumer>> {
        let r = super::mgmt(
            reqwest::Method::GET,
            &format!("/api/consumers/{}", self.vhost),
            None,
        )
        .await;
        if !r.status().is_success() {
            return None;
        }
        let all: Vec<serde_json::Value> = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
        Some(
            all.iter()
                .filter_map(|c| {
                    Some(Consumer {
                        queue: c["queue"]["name"].as_str()?.to_string(),
                        tag: c["consumer_tag"].as_str()?.to_string(),
                        // Single active consumer: the broker delivers to `active` only; the
                        // others wait (`activity_status` "waiting").
                        active: c["active"].as_bool()?,
                        peer_port: c["channel_details"]["peer_port"].as_u64()? as u16,
                    })
                })
                .collect(),
        )
    }

    /// The instance whose running process owns the local TCP port `port`.
    fn owner_of(&self, port: u16) -> Option<usize> {
        self.instances
            .iter()
            .position(|inst| inst.pid().is_some_and(|pid| owns_local_port(pid, port)))
    }
}

/// A consumer as the management API lists it.
#[derive(Clone, Debug)]
pub struct Consumer {
    pub queue: String,
    pub tag: String,
    pub active: bool,
    /// The client's end of the consumer's connection: traced to a process by
    /// [`owns_local_port`].
    pub peer_port: u16,
}

/// Whether process `pid` has an open TCP socket whose local port is `port`: the socket's inode
/// (from the process's view of `/proc/net/tcp*`) is among its open descriptors. Linux only, as
/// the daemon is.
pub fn owns_local_port(pid: u32, port: u16) -> bool {
    let mut inodes = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port)
                && let Some(inode) = f.get(9)
            {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok).any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.contains(&*target.to_string_lossy()))
    })
}

/// A free loopback address for a listener (bound, read, released: the daemon binds it next).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}
