//! Account throughput: at most `messages_per_second` Cloud API calls per sender account, with a
//! configurable burst, and an adaptive step-down when Meta says 130429 (throughput exceeded).
//!
//! Governor's GCRA is exactly the wanted meaning here (a token bucket of `burst` cells refilled at
//! the rate): in any 1-second window at most `rate + burst - 1` calls pass the gate, and the long
//! run is the rate. Governor's own `until_ready` sleeps on `futures-timer` and needs a real-time
//! clock, so the wait loop is ours: on tokio's timer (cancellable by shutdown, and driven by
//! tokio's paused clock in tests) and behind a FIFO mutex, so jobs pass in arrival order and a
//! thousand waiters do not all poll the limiter on every tick.
//!
//! Meta counts at its door, not at our gate: the store commit and the network between the two
//! can bunch calls up. So part of the configured burst is held in reserve for that: the gate's
//! own burst is `burst - rate × arrival_jitter` (at least 2, at most `burst`), and a receiver
//! sees at most `rate + burst` in any second as long as the calls' transit times vary by less
//! than `arrival_jitter` (default 50 ms).
//!
//! The wait at the gate comes before the store records the send as started (a crash while
//! waiting must not leave the job "in doubt"), so the commit's own latency sits between the
//! gate and the wire and bunches calls up. A second limiter with the same rate and burst,
//! right before the HTTP call ([`Throughput::at_the_door`]), takes that out again: its waits
//! are short (only the bunching), so it needs no queue and is never cancelled.
//!
//! Several instances on one PostgreSQL state send for the same account: each takes an even share
//! of the account's rate and burst, split over the live shards of the registry
//! ([`Throughput::set_live_shards`], after every heartbeat; see `crate::instances`), so that
//! together they stay within `messages_per_second`. The 130429 step-down and its recovery work on
//! the account-wide rate as before, and the share is taken of that: a factor on top. On redb
//! there is one shard: the whole rate.
//!
//! Waiting here is the backpressure: a job holds its prefetch slot while it waits its turn, so
//! the broker stops handing us more than we can send. It is never failed or dropped for it.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::MonoClock;

type Direct =
    RateLimiter<NotKeyed, InMemoryState, MonoClock, NoOpMiddleware<governor::nanos::Nanos>>;

/// The gate (where jobs queue) and the door (right before the wire), built together.
struct Gates {
    gate: Direct,
    door: Direct,
}

#[derive(Debug, Default)]
struct Changes {
    any: Option<Instant>,
    cut: Option<Instant>,
}

/// The gate was left because the daemon is shutting down.
#[derive(Debug, PartialEq, Eq)]
pub struct ShuttingDown;

/// One account's gate.
pub struct Throughput {
    /// For metrics and logs.
    account: Arc<str>,
    /// What the config allows; the adaptive rate never goes above it.
    configured: AtomicU32,
    /// Cells that may pass the gate at once after a quiet spell (the configured burst less the
    /// reserve for arrival jitter).
    burst: AtomicU32,
    /// After a 130429, how long without another one before the rate steps back up.
    recover_after: Duration,
    /// The account-wide rate now (msgs/s): the configured one, less after a 130429; the
    /// limiter below enforces this instance's share of it.
    rate: AtomicU32,
    /// Live shards in the registry (at least 1): the rate and burst are split over them.
    shards: AtomicU32,
    /// Swapped when the rate changes; a new limiter starts full (one burst), which is fine:
    /// the step that rebuilt it was either a cut (fewer cells from now on) or a recovery after
    /// `recover_after` of quiet.
    limiter: RwLock<Arc<Gates>>,
    /// Holders pass the limiter one at a time, in arrival order (tokio's mutex is FIFO).
    gate: tokio::sync::Mutex<()>,
    /// When the rate last changed (a cut, or a recovery step), and when it was last cut.
    last_change: Mutex<Changes>,
    clock: MonoClock,
}

impl Throughput {
    pub fn new(
        account: Arc<str>,
        configured: u32,
        burst: u32,
        arrival_jitter: Duration,
        recover_after: Duration,
        clock: MonoClock,
    ) -> Self {
        let configured = configured.max(1);
        let burst = gate_burst(configured, burst, arrival_jitter);
        crate::metrics::account_rate(&account, configured as f64);
        crate::metrics::rate_share(&account, configured as f64);
        Self {
            limiter: RwLock::new(Arc::new(build(configured, burst, 1, clock))),
            account,
            configured: AtomicU32::new(configured),
            burst: AtomicU32::new(burst),
            recover_after,
            rate: AtomicU32::new(configured),
            shards: AtomicU32::new(1),
            gate: tokio::sync::Mutex::new(()),
            last_change: Mutex::new(Changes::default()),
            clock,
        }
    }

    fn configured(&self) -> u32 {
        self.configured.load(Ordering::Relaxed)
    }

    /// A new configured rate and burst (SIGHUP): takes effect at once, for the next cells.
    pub fn reconfigure(&self, rate: u32, burst: u32, arrival_jitter: Duration) {
        let rate = rate.max(1);
        self.configured.store(rate, Ordering::Relaxed);
        self.burst
            .store(gate_burst(rate, burst, arrival_jitter), Ordering::Relaxed);
        self.set_rate(rate, false);
    }

    /// The account-wide rate now (this instance enforces its share: [`Throughput::share`]).
    pub fn rate(&self) -> u32 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Msgs/s this instance may send for the account: the rate split over the live shards.
    pub fn share(&self) -> f64 {
        self.rate() as f64 / self.shards.load(Ordering::Relaxed).max(1) as f64
    }

    /// The registry counts `n` live shards (at least 1): this instance takes `1/n` of the rate
    /// and the burst. Only a change rebuilds the limiter, keeping a step-down (it is part of the
    /// rate) and never refilling the burst for nothing.
    pub fn set_live_shards(&self, n: u32) {
        let n = n.max(1);
        // Under the lock a cut or a recovery takes, so the rebuild uses the rate they leave.
        let _changes = self.last_change.lock().unwrap_or_else(|e| e.into_inner());
        let was = self.shards.swap(n, Ordering::Relaxed);
        if was == n {
            return;
        }
        // Logged once for all accounts by the registry (`crate::instances`), not here. The new
        // share starts with an empty bucket, as after a cut: a full one at every change would
        // let live shards that come and go (heartbeats failing and recovering) add a burst
        // each time, above the account's rate.
        self.set_rate(self.rate(), true);
    }

    /// Waits for this account's next cell; returns how long it waited.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> Result<Duration, ShuttingDown> {
        let started = Instant::now();
        let _turn = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Err(ShuttingDown),
            g = self.gate.lock() => g,
        };
        self.maybe_recover();
        let mut waited = false;
        loop {
            let limiter = self.current();
            match limiter.gate.check() {
                // Zero when it did not have to sleep: metrics count real waits only.
                Ok(()) if !waited => return Ok(Duration::ZERO),
                Ok(()) => return Ok(started.elapsed()),
                Err(not_until) => {
                    waited = true;
                    let wait = not_until.wait_time_from(self.clock.now()).min(RECHECK);
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Err(ShuttingDown),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Takes a cell if one is free now, without waiting (benchmarks and tests).
    pub fn try_acquire(&self) -> bool {
        self.current().gate.check().is_ok()
    }

    /// Right before the HTTP call: evens out what happened since the gate (a store commit),
    /// so the calls leave at the rate they passed the gate. Short; at shutdown it stops
    /// waiting and lets the call go, as the send is already recorded as started (abandoning it
    /// would leave the job "in doubt").
    pub async fn at_the_door(&self, shutdown: &CancellationToken) -> Duration {
        let started = Instant::now();
        let mut waited = false;
        loop {
            let limiter = self.current();
            match limiter.door.check() {
                Ok(()) if !waited => return Duration::ZERO,
                Ok(()) => return started.elapsed(),
                Err(not_until) => {
                    waited = true;
                    let wait = not_until.wait_time_from(self.clock.now()).min(RECHECK);
                    tokio::select! {
                        _ = shutdown.cancelled() => return started.elapsed(),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Meta said 130429: halve the rate (not below 1 msg/s). Answers to calls already in flight
    /// arrive together, so cuts closer than one second apart count once.
    pub fn throttled(&self) {
        let now = Instant::now();
        let mut last = self.last_change.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.rate();
        if last
            .cut
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        let next = (current / 2).max(1);
        last.cut = Some(now);
        last.any = Some(now);
        if next != current {
            self.set_rate(next, true);
            tracing::warn!(account = %self.account, from = current, to = next, "Meta says throughput exceeded (130429): stepping the account's rate down.");
        }
    }

    /// A tenth of the configured rate back for every `recover_after` without a 130429.
    fn maybe_recover(&self) {
        let current = self.rate();
        if current >= self.configured() {
            return;
        }
        let now = Instant::now();
        let mut last = self.last_change.lock().unwrap_or_else(|e| e.into_inner());
        if last
            .any
            .is_some_and(|t| now.duration_since(t) < self.recover_after)
        {
            return;
        }
        let next = (current + (self.configured() / 10).max(1)).min(self.configured());
        last.any = Some(now);
        self.set_rate(next, false);
        tracing::info!(account = %self.account, from = current, to = next, "Account rate recovering.");
    }

    fn set_rate(&self, rate: u32, cut: bool) {
        self.rate.store(rate, Ordering::Relaxed);
        // A lower rate keeps the burst at most the rate, so a cut really lowers the 1 s peak.
        let burst = self.burst.load(Ordering::Relaxed).min(rate.max(2));
        let shards = self.shards.load(Ordering::Relaxed).max(1);
        let limiter = Arc::new(build(rate, burst, shards, self.clock));
        if cut {
            // A new limiter starts with a full bucket; after a 130429 that burst must not go
            // out at once, so it starts empty.
            for _ in 0..share_burst(burst, shards) {
                let _ = limiter.gate.check();
                let _ = limiter.door.check();
            }
        }
        *self.limiter.write().unwrap_or_else(|e| e.into_inner()) = limiter;
        crate::metrics::account_rate(&self.account, rate as f64);
        crate::metrics::rate_share(&self.account, rate as f64 / shards as f64);
    }

    fn current(&self) -> Arc<Gates> {
        self.limiter
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The longest a waiter sleeps before it looks at the limiter again: the share may have
/// changed meanwhile (an instance that gave its share up waits a thousand periods for a cell,
/// and must not go on sleeping once the share is back).
const RECHECK: Duration = Duration::from_secs(1);

/// The gates of this instance's share: `rate / shards` msgs/s (one cell every `shards / rate`
/// seconds) and [`share_burst`] cells.
fn build(rate: u32, burst: u32, shards: u32, clock: MonoClock) -> Gates {
    // Invariant: all are at least 1 (clamped by the callers).
    let r = NonZeroU32::new(rate.max(1)).unwrap_or(NonZeroU32::MIN);
    let b = NonZeroU32::new(share_burst(burst, shards)).unwrap_or(NonZeroU32::MIN);
    let quota = match shards {
        // Exactly as before shares existed.
        0 | 1 => Quota::per_second(r),
        n => {
            let nanos = 1_000_000_000u128 * n as u128 / r.get() as u128;
            Quota::with_period(Duration::from_nanos(nanos.min(u64::MAX as u128) as u64))
                .unwrap_or_else(|| Quota::per_second(r))
        }
    }
    .allow_burst(b);
    Gates {
        gate: RateLimiter::direct_with_clock(quota, clock),
        door: RateLimiter::direct_with_clock(quota, clock),
    }
}

/// This instance's part of the gate's burst: an even share, rounded down so that the shards
/// together never hold more than the whole; at least 1.
fn share_burst(burst: u32, shards: u32) -> u32 {
    (burst / shards.max(1)).max(1)
}

/// The gate's burst: the configured one less `rate × jitter` cells kept for transit-time
/// variation, but at least 2 (see [`crate::config::limits::default_burst`]) and never more than
/// configured.
pub fn gate_burst(rate: u32, burst: u32, jitter: Duration) -> u32 {
    let reserve = (rate as f64 * jitter.as_secs_f64()).ceil() as u32;
    burst.saturating_sub(reserve).max(2).min(burst.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pass time of `n` cells through the gate, on tokio's paused clock.
    async fn passes(t: &Throughput, n: usize) -> Vec<Duration> {
        let start = Instant::now();
        let never = CancellationToken::new();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            t.acquire(&never).await.unwrap();
            out.push(start.elapsed());
        }
        out
    }

    /// Most passes in any half-open 1-second window.
    fn max_per_second(times: &[Duration]) -> usize {
        let mut best = 0;
        let mut j = 0;
        for i in 0..times.len() {
            while times[i] - times[j] >= Duration::from_secs(1) {
                j += 1;
            }
            best = best.max(i - j + 1);
        }
        best
    }

    fn gate(rate: u32, burst: u32) -> Throughput {
        Throughput::new(
            "t".into(),
            rate,
            burst,
            Duration::ZERO,
            Duration::from_secs(10),
            MonoClock::new(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn no_second_holds_more_than_rate_plus_burst_minus_one_and_the_long_run_is_the_rate() {
        for (rate, burst) in [(50, 1), (50, 5), (200, 20), (80, 8)] {
            let t = gate(rate, burst);
            let times = passes(&t, rate as usize * 10).await;
            let peak = max_per_second(&times);
            assert!(
                peak < (rate + burst) as usize,
                "rate {rate} burst {burst}: {peak} in one second"
            );
            // From the first cell after the burst to the last: exactly the rate.
            let steady = &times[burst as usize..];
            let span = (*steady.last().unwrap() - steady[0]).as_secs_f64();
            let measured = (steady.len() - 1) as f64 / span;
            assert!(
                (measured - rate as f64).abs() / (rate as f64) < 0.01,
                "rate {rate}: measured {measured}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_pass_in_arrival_order() {
        let t = Arc::new(gate(10, 1));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (t, order) = (t.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                t.acquire(&CancellationToken::new()).await.unwrap();
                order.lock().unwrap().push(i);
            }));
            // Let each task reach the gate before the next is spawned.
            tokio::task::yield_now().await;
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..20).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn the_door_evens_out_calls_bunched_up_after_the_gate() {
        let t = gate(50, 5);
        let never = CancellationToken::new();
        // 100 cells pass the gate; then a "store commit" holds them back 200 ms in groups of
        // 20, which would put 20 calls on the wire at once.
        let mut gate_times = Vec::new();
        for _ in 0..100 {
            t.acquire(&never).await.unwrap();
            gate_times.push(Instant::now());
        }
        let start = gate_times[0];
        let mut wire = Vec::new();
        for chunk in gate_times.chunks(20) {
            let release = *chunk.last().unwrap() + Duration::from_millis(200);
            tokio::time::sleep_until(release).await;
            for _ in chunk {
                t.at_the_door(&never).await;
                wire.push(Instant::now() - start);
            }
        }
        assert!(max_per_second(&wire) < 50 + 5, "{}", max_per_second(&wire));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_leaves_the_gate_at_once() {
        let t = gate(1, 1);
        let stop = CancellationToken::new();
        t.acquire(&stop).await.unwrap();
        stop.cancel();
        assert_eq!(t.acquire(&stop).await, Err(ShuttingDown));
    }

    #[tokio::test(start_paused = true)]
    async fn a_130429_halves_the_rate_once_per_second_and_quiet_brings_it_back() {
        let t = gate(80, 8);
        t.throttled();
        t.throttled(); // same burst of answers: counted once
        assert_eq!(t.rate(), 40);
        tokio::time::advance(Duration::from_millis(1500)).await;
        t.throttled();
        assert_eq!(t.rate(), 20);
        // Under the cut rate, no second holds more than the new rate + burst - 1.
        let times = passes(&t, 60).await;
        assert!(max_per_second(&times) < 20 + 8);
        // Ten quiet seconds per step of a tenth (8/s) back up to 80, never above.
        let mut seen = vec![t.rate()];
        for _ in 0..12 {
            tokio::time::advance(Duration::from_secs(10)).await;
            t.acquire(&CancellationToken::new()).await.unwrap();
            seen.push(t.rate());
        }
        assert_eq!(&seen[..8], &[20, 28, 36, 44, 52, 60, 68, 76]);
        assert!(seen[8..].iter().all(|&r| r == 80), "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn with_two_live_shards_each_instance_takes_half_the_rate_and_burst() {
        let t = gate(100, 10);
        t.set_live_shards(2);
        assert_eq!(t.share(), 50.0);
        assert_eq!(t.rate(), 100, "the account-wide rate stays");
        let times = passes(&t, 500).await;
        // Half the burst (5): at most 50 + 5 - 1 in any second, and the long run is 50/s.
        let peak = max_per_second(&times);
        assert!(peak < 50 + 5, "{peak} in one second");
        let steady = &times[5..];
        let span = (*steady.last().unwrap() - steady[0]).as_secs_f64();
        let measured = (steady.len() - 1) as f64 / span;
        assert!((measured - 50.0).abs() < 0.5, "measured {measured}");
        // The other shard's instance died: the whole rate again.
        t.set_live_shards(1);
        assert_eq!(t.share(), 100.0);
        let times = passes(&t, 1000).await;
        let steady = &times[10..];
        let span = (*steady.last().unwrap() - steady[0]).as_secs_f64();
        let measured = (steady.len() - 1) as f64 / span;
        assert!((measured - 100.0).abs() < 1.0, "measured {measured}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_down_is_a_factor_on_the_share_and_an_unchanged_share_refills_nothing() {
        let t = gate(80, 8);
        t.set_live_shards(2);
        // The bucket (4 cells) emptied.
        while t.try_acquire() {}
        // The same share again (every heartbeat says so): no new, full bucket.
        t.set_live_shards(2);
        assert!(!t.try_acquire(), "an unchanged share refilled the burst");
        t.throttled();
        assert_eq!((t.rate(), t.share()), (40, 20.0));
        // The share changes; the step-down stays.
        t.set_live_shards(1);
        assert_eq!((t.rate(), t.share()), (40, 40.0));
        t.set_live_shards(4);
        assert_eq!((t.rate(), t.share()), (40, 10.0));
        // Recovery steps up the account-wide rate; the share follows.
        tokio::time::advance(Duration::from_secs(10)).await;
        t.acquire(&CancellationToken::new()).await.unwrap();
        assert_eq!((t.rate(), t.share()), (48, 12.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_share_starts_empty_so_flapping_shards_add_no_burst() {
        let t = gate(80, 8);
        t.set_live_shards(2);
        while t.try_acquire() {}
        // Another shard's heartbeats stop and come back, over and over.
        for _ in 0..5 {
            t.set_live_shards(1);
            assert!(!t.try_acquire(), "a new share came with a full bucket");
            t.set_live_shards(2);
            assert!(!t.try_acquire(), "a new share came with a full bucket");
        }
        // Still the share's rate: a cell after its period.
        tokio::time::advance(Duration::from_millis(26)).await;
        assert!(t.try_acquire());
    }

    #[tokio::test(start_paused = true)]
    async fn a_share_given_back_is_used_within_a_second() {
        let t = Arc::new(gate(80, 8));
        while t.try_acquire() {}
        // Heartbeats failed: a thousandth of the rate (a cell every 12.5 s).
        t.set_live_shards(1000);
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.acquire(&CancellationToken::new()).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        // A heartbeat works again: the whole share, and the waiter takes a cell soon.
        t.set_live_shards(1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(waiter.is_finished(), "still asleep on the share it had");
        waiter.await.unwrap().unwrap();
    }

    #[test]
    fn part_of_the_burst_is_kept_for_transit_jitter() {
        let j = Duration::from_millis(50);
        assert_eq!(gate_burst(200, 20, j), 10);
        assert_eq!(gate_burst(50, 5, j), 2);
        assert_eq!(gate_burst(80, 8, j), 4);
        assert_eq!(gate_burst(1000, 100, j), 50);
        assert_eq!(gate_burst(50, 1, j), 1, "never above the configured burst");
        assert_eq!(gate_burst(50, 5, Duration::ZERO), 5);
    }
}
