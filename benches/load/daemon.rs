//! The daemon as a child process, as the load and soak benches run it: `sendwell run --config …`
//! with the bench's own environment left out, ready once `/readyz` says so, stopped with SIGTERM.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A port free right now on loopback, for a listener the daemon binds itself.
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The last 30 lines of a log, for a run that stalled or a daemon that did not stop cleanly.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A running daemon.
pub struct Process {
    child: tokio::process::Child,
    pub pid: u32,
    /// How long it took to become ready (load the consent store, connect).
    pub start_seconds: f64,
}

impl Process {
    /// Starts `binary` with `config` and waits until its admin listener at `admin` says it is
    /// ready; panics with the log's tail if it exits or is not ready within 180 s.
    pub async fn start(binary: &Path, config: &Path, admin: SocketAddr, log_path: &Path) -> Self {
        let log = std::fs::File::create(log_path).unwrap();
        let mut cmd = tokio::process::Command::new(binary);
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        // The bench's own knobs would be config overrides to the daemon (SENDWELL_<KEY>).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SENDWELL_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        // The daemon's tokio worker threads (tokio reads TOKIO_WORKER_THREADS), to compare
        // runtime sizes without changing the load generator's.
        cmd.env_remove("TOKIO_WORKER_THREADS");
        if let Ok(n) = std::env::var("SENDWELL_BENCH_DAEMON_WORKERS") {
            cmd.env("TOKIO_WORKER_THREADS", n);
        }
        let started = Instant::now();
        let mut child = cmd.spawn().expect("the sendwell binary starts");
        let pid = child.id().unwrap();
        let http = reqwest::Client::new();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("sendwell exited at start ({st}):\n{}", tail(log_path));
            }
            let ready = http.get(format!("http://{admin}/readyz")).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "sendwell not ready within 180 s:\n{}",
                tail(log_path)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Process {
            child,
            pid,
            start_seconds: started.elapsed().as_secs_f64(),
        }
    }

    /// SIGTERM, a graceful stop (the state store closes cleanly), waited for up to 40 s, then a
    /// kill. None: it exited 0; else how it ended.
    pub async fn stop(mut self) -> Option<String> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        match tokio::time::timeout(Duration::from_secs(40), self.child.wait()).await {
            Ok(Ok(st)) if st.success() => None,
            Ok(Ok(st)) => Some(format!("{st}")),
            other => {
                let _ = self.child.start_kill();
                Some(format!("did not stop within 40 s: {other:?}"))
            }
        }
    }
}
