//! systemd's notify protocol (`Type=notify`), through the `sd-notify` crate (pure Rust, no
//! libsystemd; a no-op without `$NOTIFY_SOCKET`, so the daemon runs the same outside systemd):
//! `READY=1` once the config is valid, the state loaded and the topology declared; `STATUS=`
//! with a one-line summary (before READY: what the start waits for, e.g. PostgreSQL);
//! `STOPPING=1` at shutdown; `WATCHDOG=1` every half `WatchdogSec`, but only while
//! [`crate::health::making_progress`] says the pipeline moves or is idle — a wedged daemon
//! stops pinging and systemd restarts it. A state store that cannot be written (full disk)
//! counts as wedged only after `state.unwritable_grace`.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::http::Readiness;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "Cannot notify the service manager.");
    }
}

/// A status line before the daemon is ready (waiting for its state store at start); READY
/// comes later, from [`run`].
pub fn status(line: &str) {
    send(&[NotifyState::Status(&one_line(line))]);
}

/// `line` with every control character (a newline above all) replaced by a space: the
/// notification is newline-separated assignments, and a status may quote a database's error
/// text, which a hostile server (or anyone on an unencrypted path) chooses. A newline there
/// would let it say `READY=1` or `STOPPING=1` for the daemon.
fn one_line(line: &str) -> String {
    line.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Shutting down (the first signal).
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Waits until the daemon is ready, says so, then keeps the status line and the watchdog
/// going until shutdown.
pub async fn run(readiness: Arc<Readiness>, paused: impl Fn() -> usize, stop: CancellationToken) {
    loop {
        if readiness.is_ready() {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    send(&[NotifyState::Ready, NotifyState::Status("ready")]);
    let watchdog = sd_notify::watchdog_enabled();
    // Ping at half the timeout, as sd_watchdog_enabled(3) advises; the status line at most
    // every 5 s.
    let every = watchdog
        .map(|w| (w / 2).min(Duration::from_secs(5)))
        .unwrap_or(Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    let mut last = (std::time::Instant::now(), crate::health::finished_total());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (t, n) = (std::time::Instant::now(), crate::health::finished_total());
        let rate = (n - last.1) as f64 / t.duration_since(last.0).as_secs_f64().max(0.001);
        last = (t, n);
        let status = format!(
            "{rate:.1} jobs/s, {} in flight, {} paused accounts, broker {}{}",
            crate::health::in_flight_now(),
            paused(),
            if readiness.broker.load(std::sync::atomic::Ordering::SeqCst) {
                "connected"
            } else {
                "reconnecting"
            },
            if crate::health::store_unwritable() {
                ", state store cannot be written"
            } else {
                ""
            }
        );
        match watchdog {
            Some(w) if crate::health::making_progress(w) => {
                send(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
            }
            Some(_) => {
                tracing::error!(
                    "No progress with jobs waiting: withholding the watchdog ping so systemd restarts the daemon."
                );
                send(&[NotifyState::Status(&format!("wedged: {status}"))]);
            }
            None => send(&[NotifyState::Status(&status)]),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_status_line_cannot_carry_other_assignments() {
        let line = super::one_line("too many clients\nREADY=1\r\nSTATUS=x\u{0}y (SQLSTATE 53300)");
        assert_eq!(
            line,
            "too many clients READY=1  STATUS=x y (SQLSTATE 53300)"
        );
        assert!(!line.lines().any(|l| l == "READY=1"));
    }
}
