//! Whether the state store takes writes now.
//!
//! A full disk or an I/O error makes redb refuse every later operation ("Previous I/O error
//! occurred") until the database is closed and opened again. The ledger's writer does that and
//! holds the writes that failed, retrying them on the reopened store, for as long as
//! [`StoreHealth::set_hold`] allows (the daemon: `state.unwritable_grace`). Meanwhile this says
//! so to whoever must not go on as if nothing happened: the pipeline takes no new job,
//! `/readyz` answers 503, and the watchdog is fed only within the grace.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// How long writes are held by default: short, for the command-line tools that open the store
/// (they should fail, not hang); the daemon sets its configured grace.
const DEFAULT_HOLD: Duration = Duration::from_secs(10);

pub struct StoreHealth {
    /// Set while writes fail; shared with the readiness check.
    unwritable: Arc<AtomicBool>,
    /// Unix ms of the first failure of the current outage (meaningful while `unwritable`).
    since_ms: AtomicI64,
    /// True while writable: what waiters wait on.
    changed: watch::Sender<bool>,
    /// How long a failing write is held and retried before it fails to its caller, in ms.
    hold_ms: AtomicU64,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self {
            unwritable: Arc::new(AtomicBool::new(false)),
            since_ms: AtomicI64::new(0),
            changed: watch::Sender::new(true),
            hold_ms: AtomicU64::new(DEFAULT_HOLD.as_millis() as u64),
        }
    }
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

impl StoreHealth {
    pub fn writable(&self) -> bool {
        !self.unwritable.load(Ordering::Acquire)
    }

    /// How long the store has refused writes; None while it takes them.
    pub fn unwritable_for(&self) -> Option<Duration> {
        if self.writable() {
            return None;
        }
        let ms = (now_ms() - self.since_ms.load(Ordering::Acquire)).max(0);
        Some(Duration::from_millis(ms as u64))
    }

    /// The flag `/readyz` reads: set while the store cannot be written.
    pub fn unwritable_flag(&self) -> Arc<AtomicBool> {
        self.unwritable.clone()
    }

    /// Resolves once the store takes writes (at once when it does now).
    pub async fn wait_writable(&self) {
        if self.writable() {
            return;
        }
        let mut rx = self.changed.subscribe();
        // The value is current at subscription: a recovery in between is not missed.
        let _ = rx.wait_for(|writable| *writable).await;
    }

    /// How long a write that fails with an I/O error is held (and retried on a reopened store)
    /// before it fails to its caller.
    pub fn set_hold(&self, hold: Duration) {
        self.hold_ms.store(
            hold.as_millis().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// Whether failing writes are still held: the outage is younger than the hold.
    pub(crate) fn holding(&self) -> bool {
        self.unwritable_for()
            .is_none_or(|d| d.as_millis() < self.hold_ms.load(Ordering::Relaxed) as u128)
    }

    /// A write failed with an I/O error. Logged once per outage, not per write.
    pub(crate) fn failed(&self, error: &str) {
        crate::metrics::store_write_failed();
        if self.writable() {
            let since = now_ms();
            self.since_ms.store(since, Ordering::Release);
            self.unwritable.store(true, Ordering::Release);
            self.changed.send_replace(false);
            crate::health::store_unwritable_since(Some(since));
            crate::metrics::store_writable(false);
            tracing::error!(
                error,
                "The state store cannot be written (full disk or I/O error): taking no new jobs; jobs already sent wait, unacked, until their outcome is recorded. Reopening the store until writes succeed."
            );
        }
    }

    /// A write succeeded.
    pub(crate) fn succeeded(&self) {
        if let Some(down) = self.unwritable_for() {
            self.unwritable.store(false, Ordering::Release);
            self.changed.send_replace(true);
            crate::health::store_unwritable_since(None);
            crate::metrics::store_writable(true);
            tracing::warn!(
                after = %humantime::format_duration(Duration::from_secs(down.as_secs())),
                "The state store takes writes again: resuming."
            );
        }
    }
}
