//! systemd's notify protocol, with a `NOTIFY_SOCKET` the test owns: `READY=1` after start,
//! periodic `WATCHDOG=1`, pings withheld while the pipeline is wedged, `STOPPING=1` on SIGTERM.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The daemon as a child process, killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Every datagram the daemon sent, with when it arrived.
#[derive(Clone, Default)]
struct Heard(Arc<Mutex<Vec<(Instant, String)>>>);

impl Heard {
    fn listen(sock: UnixDatagram) -> Self {
        let heard = Heard::default();
        let h = heard.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                h.0.lock().unwrap().push((Instant::now(), text));
            }
        });
        heard
    }

    fn times_of(&self, line: &str) -> Vec<Instant> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == line))
            .map(|(t, _)| *t)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_pings_while_healthy_none_while_wedged_and_stopping_on_sigterm() {
    // A long request timeout: with the sandbox made to hang, a sent job stays in flight and
    // nothing settles — a wedged pipeline.
    let opts = AppOptions {
        consented: 0..2,
        ..AppOptions::default()
    };
    let env = TestEnv::new(&opts).await;
    let toml = std::fs::read_to_string(&env.config_path).unwrap();
    assert!(toml.contains("request_timeout = \"5s\""));
    std::fs::write(
        &env.config_path,
        toml.replace("request_timeout = \"5s\"", "request_timeout = \"120s\""),
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let heard = Heard::listen(UnixDatagram::bind(&path).unwrap());
    let mut daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_sendwell"))
            .env("NOTIFY_SOCKET", &path)
            // WatchdogSec=1s: pings every 0.5 s while healthy.
            .env("WATCHDOG_USEC", "1000000")
            .args(["run", "--config"])
            .arg(&env.config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );

    let h = heard.clone();
    wait_for("READY=1", Duration::from_secs(30), async || {
        (!h.times_of("READY=1").is_empty()).then_some(())
    })
    .await;
    let ready_at = heard.times_of("READY=1")[0];
    wait_for(
        "three watchdog pings while idle",
        Duration::from_secs(20),
        async || (h.times_of("WATCHDOG=1").len() >= 3).then_some(()),
    )
    .await;
    assert!(
        heard.times_of("WATCHDOG=1")[0] >= ready_at,
        "no ping before READY"
    );
    assert!(
        heard
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|(_, m)| m.contains("STATUS=") && m.contains("jobs/s")),
        "a status line"
    );

    // Wedge it: the Cloud API stand-in stops answering, and a job goes in flight.
    env.sandbox.set_latency(Duration::from_secs(3600));
    env.publish(&[template_job("wedge-1", &number(0))]).await;
    let sandbox = env.sandbox.clone();
    wait_for(
        "the job to reach the hanging API",
        Duration::from_secs(20),
        async || (!sandbox.requests().is_empty()).then_some(()),
    )
    .await;
    let reached = Instant::now();
    // The pings stop: 3 s (three watchdog periods) pass without one.
    wait_for(
        "the watchdog pings to stop",
        Duration::from_secs(30),
        async || {
            let last = h.times_of("WATCHDOG=1").last().copied()?;
            (last < reached + Duration::from_secs(2) && last.elapsed() > Duration::from_secs(3))
                .then_some(())
        },
    )
    .await;
    assert!(
        heard
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|(_, m)| m.contains("STATUS=wedged")),
        "the status says why"
    );

    let ok = Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    wait_for("STOPPING=1", Duration::from_secs(10), async || {
        (!h.times_of("STOPPING=1").is_empty()).then_some(())
    })
    .await;
    let _ = daemon.0.kill();
}
