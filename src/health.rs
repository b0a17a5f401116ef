//! Whether the pipeline is making progress: the systemd watchdog's question ("a wedged
//! consumer must get restarted"). Fed by the same calls that emit the job metrics
//! ([`crate::metrics`]), so the watchdog and the dashboards see the same events.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

static IN_FLIGHT: AtomicI64 = AtomicI64::new(0);
/// Unix ms of the last job taken from the queue or settled (finished or deferred).
static LAST_PROGRESS_MS: AtomicI64 = AtomicI64::new(0);
static FINISHED: AtomicU64 = AtomicU64::new(0);
static CONNECTED: AtomicBool = AtomicBool::new(false);
/// Ready messages in this shard's queue at the last poll.
static QUEUE_READY: AtomicI64 = AtomicI64::new(0);
/// Unix ms since when the state store refuses writes; 0 while it takes them.
static STORE_UNWRITABLE_SINCE_MS: AtomicI64 = AtomicI64::new(0);
/// `state.unwritable_grace`, in ms.
static STORE_GRACE_MS: AtomicI64 = AtomicI64::new(300_000);

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

pub(crate) fn in_flight(delta: i64) {
    IN_FLIGHT.fetch_add(delta, Ordering::Relaxed);
}

pub(crate) fn progressed() {
    LAST_PROGRESS_MS.store(now_ms(), Ordering::Relaxed);
}

pub(crate) fn finished() {
    FINISHED.fetch_add(1, Ordering::Relaxed);
    progressed();
}

pub(crate) fn connected(up: bool) {
    CONNECTED.store(up, Ordering::Relaxed);
    if up {
        progressed();
    }
}

pub(crate) fn queue_ready(n: u32) {
    QUEUE_READY.store(n as i64, Ordering::Relaxed);
}

pub(crate) fn store_unwritable_since(since_ms: Option<i64>) {
    STORE_UNWRITABLE_SINCE_MS.store(since_ms.unwrap_or(0), Ordering::Relaxed);
    if since_ms.is_none() {
        progressed();
    }
}

/// How long a store that cannot be written is waited for (`state.unwritable_grace`).
pub fn set_store_grace(grace: Duration) {
    STORE_GRACE_MS.store(grace.as_millis() as i64, Ordering::Relaxed);
}

/// Whether the state store refuses writes now.
pub fn store_unwritable() -> bool {
    STORE_UNWRITABLE_SINCE_MS.load(Ordering::Relaxed) != 0
}

/// Jobs finished since start.
pub fn finished_total() -> u64 {
    FINISHED.load(Ordering::Relaxed)
}

/// Jobs in flight now.
pub fn in_flight_now() -> i64 {
    IN_FLIGHT.load(Ordering::Relaxed)
}

/// Healthy: nothing to do (nothing in flight, nothing waiting), or something happened within
/// `window`. Wedged: jobs in flight, or waiting in the queue, and nothing taken or settled for
/// a whole window. While the broker is down the reconnect loop is in charge: a restart would
/// not help, so that counts as healthy. While the state store cannot be written the ledger
/// reopens it and jobs wait on purpose: healthy within `state.unwritable_grace` (a restart
/// would not free the disk, and would forget the results of sends not yet recorded), not after.
pub fn making_progress(window: Duration) -> bool {
    let store_down = STORE_UNWRITABLE_SINCE_MS.load(Ordering::Relaxed);
    if store_down != 0 {
        return now_ms() - store_down < STORE_GRACE_MS.load(Ordering::Relaxed);
    }
    if !CONNECTED.load(Ordering::Relaxed) {
        return true;
    }
    let busy = IN_FLIGHT.load(Ordering::Relaxed) > 0 || QUEUE_READY.load(Ordering::Relaxed) > 0;
    let quiet_for = now_ms() - LAST_PROGRESS_MS.load(Ordering::Relaxed);
    !busy || quiet_for < window.as_millis() as i64
}
