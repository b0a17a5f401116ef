//! Log lines for things that can happen on every job or request: at most one line per key per
//! interval, saying how many occurrences went unlogged since the previous one. The counter
//! next to it (in [`crate::metrics`]) still counts every occurrence; the log only says that it
//! is happening, without thousands of identical lines a second under load.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use jiff::Timestamp;

use crate::clock::SharedClock;

/// Keys remembered at most; beyond this (keys from job contents, e.g. template names, are
/// upstream's to choose) keys older than the interval are forgotten, and while every slot is
/// fresh a new key is only counted. Bounds memory and log volume alike.
pub const MAX_KEYS: usize = 4096;

pub struct LogEvery {
    interval: Duration,
    clock: SharedClock,
    /// Key hash → when its last line was written and occurrences since. A hash collision only
    /// merges two keys' log lines, never a count.
    seen: Mutex<HashMap<u64, Entry>>,
    hasher: foldhash::fast::FixedState,
}

struct Entry {
    logged_at: Timestamp,
    unlogged: u64,
}

impl LogEvery {
    pub fn new(interval: Duration, clock: SharedClock) -> Self {
        Self {
            interval,
            clock,
            seen: Mutex::new(HashMap::new()),
            hasher: foldhash::fast::FixedState::with_seed(0x1096),
        }
    }

    /// One more occurrence of `key`. `Some(n)`: write the line now; `n` occurrences since the
    /// previous line went unlogged. `None`: stay quiet.
    pub fn check(&self, key: impl Hash) -> Option<u64> {
        let key = self.hasher.hash_one(key);
        let now = self.clock.now();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = seen.get_mut(&key) {
            if now.duration_since(e.logged_at).unsigned_abs() < self.interval {
                e.unlogged += 1;
                return None;
            }
            let unlogged = e.unlogged;
            *e = Entry {
                logged_at: now,
                unlogged: 0,
            };
            return Some(unlogged);
        }
        if seen.len() >= MAX_KEYS {
            let interval = self.interval;
            seen.retain(|_, e| now.duration_since(e.logged_at).unsigned_abs() < interval);
            if seen.len() >= MAX_KEYS {
                return None;
            }
        }
        seen.insert(
            key,
            Entry {
                logged_at: now,
                unlogged: 0,
            },
        );
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn a_key_is_logged_once_per_interval_with_the_count_it_kept_quiet() {
        let clock = ManualClock::new(Timestamp::from_second(1_800_000_000).unwrap());
        let log = LogEvery::new(Duration::from_secs(3600), Arc::new(clock.clone()));
        let key = ("acme-de", "spring_sale");
        assert_eq!(log.check(key), Some(0));
        for _ in 0..999 {
            assert_eq!(log.check(key), None);
        }
        // Another key has its own line; the first stays quiet.
        assert_eq!(log.check(("acme-de", "summer_sale")), Some(0));
        clock.advance(Duration::from_secs(3599));
        assert_eq!(log.check(key), None);
        clock.advance(Duration::from_secs(1));
        assert_eq!(log.check(key), Some(1000));
        assert_eq!(log.check(key), None);
    }

    #[test]
    fn endless_new_keys_neither_grow_memory_nor_the_log_past_the_bound() {
        let clock = ManualClock::new(Timestamp::from_second(1_800_000_000).unwrap());
        let log = LogEvery::new(Duration::from_secs(3600), Arc::new(clock.clone()));
        let logged = (0..3 * MAX_KEYS).filter(|i| log.check(i).is_some()).count();
        assert_eq!(logged, MAX_KEYS);
        assert_eq!(log.seen.lock().unwrap().len(), MAX_KEYS);
        // Once the interval has passed, the old keys make room.
        clock.advance(Duration::from_secs(3600));
        assert_eq!(log.check("a new template"), Some(0));
        assert_eq!(log.seen.lock().unwrap().len(), 1);
    }
}
