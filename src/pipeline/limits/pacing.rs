//! Recipient pacing: Meta's pair rate limit, per sender account and recipient number.
//!
//! Meta: at most about one message per 6 seconds to one user; short bursts "borrow from future
//! quota" (a burst of n needs about n·6 s to pay back); over it, error 131056, and the pair
//! should retry after 4^X seconds, X counting the failures (facts §3.2). That is a GCRA bucket
//! per pair, so this is governor's keyed limiter with period `interval` and the configured burst
//! (default 1). After a 131056 the pair is additionally held back 4^X seconds, X growing with
//! each 131056 and reset by the next success.
//!
//! Memory stays bounded: [`Pacing::housekeep`] drops pairs whose bucket is full again
//! (governor's `retain_recent`) and back-offs that have run out.

use std::num::NonZeroU32;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use super::MonoClock;

type Keyed =
    RateLimiter<u64, DashMapStateStore<u64>, MonoClock, NoOpMiddleware<governor::nanos::Nanos>>;

/// After a 131056: how many in a row, and not before when.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    failures: u32,
    until: Instant,
}

/// One account's pacing of its recipients (Meta's limit is per business number).
pub struct Pacing {
    /// None when pacing is off (interval 0).
    limiter: Option<Keyed>,
    backoff: DashMap<u64, Backoff>,
    /// Pair → the latest release time handed to a job deferred for pacing, so the next one
    /// deferred is released an interval after it: deferred jobs come back in their order.
    queued: DashMap<u64, Instant>,
    /// Pacing's interval (zero when off).
    interval: Duration,
    /// The longest 4^X wait (the retry policy's max delay).
    max_backoff: Duration,
    clock: MonoClock,
}

impl Pacing {
    pub fn new(interval: Duration, burst: u32, max_backoff: Duration, clock: MonoClock) -> Self {
        let limiter = Quota::with_period(interval).map(|q| {
            let b = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
            RateLimiter::dashmap_with_clock(q.allow_burst(b), clock)
        });
        Self {
            limiter,
            backoff: DashMap::new(),
            queued: DashMap::new(),
            interval,
            max_backoff,
            clock,
        }
    }

    /// Ok: a message to `number` may go now (and is counted). Err(wait): not for this long.
    pub fn check(&self, number: u64) -> Result<(), Duration> {
        if let Some(b) = self.backoff.get(&number) {
            let now = Instant::now();
            if b.until > now {
                return Err(b.until - now);
            }
        }
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(&number).map_err(|n| {
            n.wait_time_from(self.clock.now())
                .max(Duration::from_millis(1))
        })
    }

    /// A job to the pair must wait `wait` and will be deferred: returns the wait that gives it
    /// a release time at least an interval after every job of the pair deferred before it.
    /// Delay queues are not a per-pair FIFO; spacing the release times keeps the order.
    pub fn deferral(&self, number: u64, wait: Duration) -> Duration {
        let now = Instant::now();
        let mut last = self.queued.entry(number).or_insert(now);
        let at = if *last > now {
            (now + wait).max(*last + self.interval)
        } else {
            now + wait
        };
        *last = at;
        at - now
    }

    /// How long the pair still backs off after a 131056, if it does (takes no pacing cell).
    pub fn backing_off(&self, number: u64) -> Option<Duration> {
        let b = self.backoff.get(&number)?;
        let now = Instant::now();
        (b.until > now).then(|| b.until - now)
    }

    /// Meta said 131056 for this pair: hold it back 4^X seconds (X = 0, 1, 2, … per failure in
    /// a row) and return that wait.
    pub fn pair_limited(&self, number: u64) -> Duration {
        let now = Instant::now();
        let mut e = self.backoff.entry(number).or_insert(Backoff {
            failures: 0,
            until: now,
        });
        let wait =
            Duration::from_secs(4u64.saturating_pow(e.failures.min(20))).min(self.max_backoff);
        e.failures += 1;
        e.until = now + wait;
        wait
    }

    /// A send to the pair went through: the 131056 streak is over.
    pub fn sent(&self, number: u64) {
        if !self.backoff.is_empty() {
            self.backoff.remove(&number);
        }
    }

    /// Drops state that no longer changes any decision; returns how many pairs are still held.
    pub fn housekeep(&self) -> usize {
        let now = Instant::now();
        // A streak is remembered for one more max wait after it ran out, so a quick 131056
        // after it still escalates.
        self.backoff.retain(|_, b| b.until + self.max_backoff > now);
        self.queued.retain(|_, at| *at > now);
        match &self.limiter {
            Some(l) => {
                l.retain_recent();
                l.shrink_to_fit();
                l.len() + self.backoff.len() + self.queued.len()
            }
            None => self.backoff.len() + self.queued.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacing(interval_s: u64, burst: u32) -> Pacing {
        Pacing::new(
            Duration::from_secs(interval_s),
            burst,
            Duration::from_secs(300),
            MonoClock::new(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn one_message_per_interval_per_pair_and_pairs_are_independent() {
        let p = pacing(6, 1);
        assert_eq!(p.check(491), Ok(()));
        assert_eq!(p.check(492), Ok(()), "another number is not held back");
        let wait = p.check(491).unwrap_err();
        assert!(wait <= Duration::from_secs(6) && wait > Duration::from_millis(5990));
        tokio::time::advance(Duration::from_millis(5999)).await;
        assert!(p.check(491).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(p.check(491), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_borrows_from_later_quota() {
        let p = pacing(6, 3);
        for _ in 0..3 {
            assert_eq!(p.check(7), Ok(()));
        }
        assert!(p.check(7).is_err());
        // Paying back: one more cell every 6 s, not three.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(p.check(7), Ok(()));
        assert!(p.check(7).is_err());
        tokio::time::advance(Duration::from_secs(18)).await;
        for _ in 0..3 {
            assert_eq!(p.check(7), Ok(()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_131056_the_pair_waits_four_to_the_x_seconds() {
        let p = pacing(0, 1);
        assert_eq!(p.pair_limited(9), Duration::from_secs(1));
        assert!(p.check(9).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(p.check(9), Ok(()));
        assert_eq!(p.pair_limited(9), Duration::from_secs(4));
        assert_eq!(p.pair_limited(9), Duration::from_secs(16));
        assert_eq!(p.pair_limited(9), Duration::from_secs(64));
        assert_eq!(p.pair_limited(9), Duration::from_secs(256));
        assert_eq!(p.pair_limited(9), Duration::from_secs(300), "clamped");
        p.sent(9);
        assert_eq!(
            p.pair_limited(9),
            Duration::from_secs(1),
            "a success resets X"
        );
        assert_eq!(p.check(10), Ok(()), "other pairs are not held back");
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_deferred_for_a_pair_are_released_an_interval_apart_in_order() {
        let p = pacing(6, 1);
        p.check(3).unwrap();
        let w1 = p.check(3).unwrap_err();
        let w2 = p.check(3).unwrap_err();
        let d1 = p.deferral(3, w1);
        let d2 = p.deferral(3, w2);
        assert_eq!(d1, w1);
        assert_eq!(d2, d1 + Duration::from_secs(6));
        // Another pair is not queued behind this one.
        assert_eq!(
            p.deferral(4, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        // Once the queue has drained, a new deferral starts from now again.
        tokio::time::advance(d2 + Duration::from_secs(1)).await;
        assert_eq!(
            p.deferral(3, Duration::from_secs(2)),
            Duration::from_secs(2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_pairs_are_forgotten() {
        let p = pacing(6, 1);
        for n in 0..1000 {
            p.check(n).unwrap();
        }
        p.pair_limited(5);
        assert_eq!(p.housekeep(), 1001);
        tokio::time::advance(Duration::from_secs(13)).await;
        assert_eq!(
            p.housekeep(),
            1,
            "the back-off streak is remembered a while longer"
        );
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(p.housekeep(), 0);
    }
}
