//! The daily unique-recipient tier (Meta's "messaging limit"): how many distinct customers a
//! business portfolio may reach outside a customer-service window in a moving 24 hours — 250,
//! 2,000, 10,000, 100,000 or unlimited, shared since October 2025 by every number of the
//! portfolio (facts §3.3).
//!
//! Meta documents no error for running out: messages past the limit are simply not delivered.
//! So the budget is kept here. A number counts from its latest business-initiated send; a number
//! already counted in the trailing 24 hours is free; a new number beyond the limit waits until
//! the oldest counted one leaves the window. We count accepted sends, not deliveries: never
//! more than Meta, sometimes a few more than needed.
//!
//! Each portfolio's window is behind one mutex: its jobs come from many recipient lanes at once,
//! and check-and-count must be one step. Counts are durable ([`Table::TierUsage`]), and so is a
//! tier learned from Meta's webhook (in [`Table::StoreMeta`]), so a restart neither resets the
//! window nor forgets an upgrade.
//!
//! Several instances on one PostgreSQL state (issue 18) count one tier together: each
//! instance's window holds the recipients of its own shard (recipients are sharded, so the
//! per-shard distinct counts add up), and a new recipient also takes one from the portfolio's
//! global [`Quota`] lease ([`Tier::share_globally`]). The lease unit becomes durable with the
//! send record that carries the tier row ([`Tier::recorded`]). A recipient moved between
//! shards during a reshard may be counted on both for a while: an overcount, never an under-.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use jiff::Timestamp;

use super::quota::{self, Kind, Quota};
use crate::config::limits::UNLIMITED;
use crate::store::{KvOp, KvRow, Ledger, LedgerError, Table};

/// The moving window Meta counts over.
pub const WINDOW_MS: i64 = 24 * 3600 * 1000;
/// A new recipient the global lease had no room for while the quota is not known to be used up
/// (the lease not renewed yet: the database slow or unreachable) looks again this soon.
pub(crate) const LEASE_RETRY: Duration = Duration::from_secs(5);

/// A counted send, so that a send that definitely did not happen can be un-counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierTicket {
    portfolio: usize,
    number: u64,
    /// The number's previous count time, if it had one in the window.
    previous: Option<i64>,
    at: i64,
    /// The count took one from the portfolio's global lease, not durable yet: given back if
    /// the send does not happen, moved to durable once its row is written.
    leased: bool,
}

struct Window {
    /// number → when it last counted (Unix ms).
    last: HashMap<u64, i64>,
    /// The same, ordered by time, so the oldest is found and expired in O(log n).
    by_time: BTreeSet<(i64, u64)>,
}

impl Window {
    fn expire(&mut self, now_ms: i64) {
        while let Some(&(t, n)) = self.by_time.first() {
            if t > now_ms - WINDOW_MS {
                break;
            }
            self.by_time.pop_first();
            self.last.remove(&n);
        }
    }
}

struct Portfolio {
    name: Arc<str>,
    /// The tier as configured (kept to tell whether a learned tier is still current).
    configured: AtomicU32,
    limit: AtomicU32,
    window: Mutex<Window>,
}

pub struct Tier {
    portfolios: Vec<Portfolio>,
    /// The portfolios' global leases, in portfolio order: set once on PostgreSQL
    /// ([`Tier::share_globally`]); unset on redb (one instance counts alone).
    global: OnceLock<Vec<Arc<Quota>>>,
}

impl Tier {
    /// `portfolios`: name and configured limit ([`UNLIMITED`] for none), in the order the
    /// accounts refer to them by index.
    pub fn new(portfolios: &[(Arc<str>, u32)]) -> Self {
        Self {
            portfolios: portfolios
                .iter()
                .map(|(name, limit)| Portfolio {
                    name: name.clone(),
                    configured: AtomicU32::new(*limit),
                    limit: AtomicU32::new(*limit),
                    window: Mutex::new(Window {
                        last: HashMap::new(),
                        by_time: BTreeSet::new(),
                    }),
                })
                .collect(),
            global: OnceLock::new(),
        }
    }

    /// Counts each portfolio's tier across every instance on the database: returns the quotas
    /// whose leases the caller keeps renewing (`Quota::run`). Call once, before the first job.
    pub fn share_globally(&self) -> Vec<Arc<Quota>> {
        self.global
            .get_or_init(|| {
                self.portfolios
                    .iter()
                    .map(|p| {
                        Quota::new(
                            Kind::Tier,
                            p.name.clone(),
                            p.limit.load(Ordering::Relaxed) as i64,
                        )
                    })
                    .collect()
            })
            .clone()
    }

    /// Whether the tiers are counted across instances ([`Self::share_globally`] was called).
    pub fn is_global(&self) -> bool {
        self.global.get().is_some()
    }

    fn quota(&self, portfolio: usize) -> Option<&Arc<Quota>> {
        self.global.get().and_then(|g| g.get(portfolio))
    }

    /// The portfolio's name (the global lease's durable count is of its rows).
    pub fn name(&self, portfolio: usize) -> Option<&str> {
        self.portfolios.get(portfolio).map(|p| &*p.name)
    }

    /// Before [`Self::reserve`] of a recipient that would be new: waits (a moment at most) for
    /// the portfolio's global lease to have room, when it ran out and a renewal can bring some.
    /// At once on redb, for a limited-less portfolio and for a recipient already counted.
    pub async fn wait_room(
        &self,
        portfolio: usize,
        number: u64,
        stop: &tokio_util::sync::CancellationToken,
    ) {
        let Some(q) = self.quota(portfolio) else {
            return;
        };
        let p = &self.portfolios[portfolio];
        if p.limit.load(Ordering::Relaxed) == UNLIMITED
            || lock(&p.window).last.contains_key(&number)
        {
            return;
        }
        q.wait_room(1, quota::WAIT_ROOM, stop).await;
    }

    /// The send record carrying the ticket's row is written: its lease unit is durable now.
    pub fn recorded(&self, t: &mut TierTicket) {
        if t.leased
            && let Some(q) = self.quota(t.portfolio)
        {
            q.durable(1);
            t.leased = false;
        }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.portfolios.iter().position(|p| &*p.name == name)
    }

    /// Loads learned tiers and the counts of the last 24 hours.
    pub async fn load(&self, ledger: &Ledger, now: Timestamp) -> Result<usize, LedgerError> {
        for p in &self.portfolios {
            if let Some(v) = ledger.kv_get(Table::StoreMeta, &meta_key(&p.name)).await?
                && let Some((learned, configured_then)) = decode_learned(&v)
                && configured_then == p.configured.load(Ordering::Relaxed)
            {
                p.limit.store(learned, Ordering::Relaxed);
            }
        }
        let now_ms = now.as_millisecond();
        let mut n = 0;
        ledger
            .kv_for_each(Table::TierUsage, |key, value| {
                let Some((number, portfolio)) = decode_key(key) else {
                    return;
                };
                let (Some(i), Ok(b)) = (self.index_of(portfolio), <[u8; 8]>::try_from(value))
                else {
                    return;
                };
                let at = i64::from_le_bytes(b);
                if at <= now_ms - WINDOW_MS {
                    return;
                }
                let mut w = lock(&self.portfolios[i].window);
                if let Some(old) = w.last.insert(number, at) {
                    w.by_time.remove(&(old, number));
                }
                w.by_time.insert((at, number));
                n += 1;
            })
            .await?;
        for p in &self.portfolios {
            crate::metrics::tier(
                &p.name,
                lock(&p.window).last.len(),
                p.limit.load(Ordering::Relaxed),
            );
        }
        Ok(n)
    }

    /// Merges a recipient's rows read from the store (`digits\0portfolio`, written by another
    /// instance that held the recipient before) into the windows: the later count time wins,
    /// so this instance's own count (in flight, or newer) stays. Returns the counts merged.
    pub fn merge_rows(&self, rows: &[KvRow], now: Timestamp) -> usize {
        let now_ms = now.as_millisecond();
        let mut merged = 0;
        for (key, value) in rows {
            let Some((number, portfolio)) = decode_key(key) else {
                continue;
            };
            let (Some(i), Ok(b)) = (self.index_of(portfolio), <[u8; 8]>::try_from(&value[..]))
            else {
                continue;
            };
            let at = i64::from_le_bytes(b);
            if at <= now_ms - WINDOW_MS {
                continue;
            }
            let p = &self.portfolios[i];
            let mut w = lock(&p.window);
            let known = w.last.get(&number).copied();
            if known.is_some_and(|k| k >= at) {
                continue;
            }
            if let Some(old) = known {
                w.by_time.remove(&(old, number));
            }
            w.last.insert(number, at);
            w.by_time.insert((at, number));
            merged += 1;
            if known.is_none() {
                crate::metrics::tier(&p.name, w.last.len(), p.limit.load(Ordering::Relaxed));
            }
        }
        merged
    }

    /// Whether a window counts the number.
    pub fn holds(&self, number: u64) -> bool {
        self.portfolios
            .iter()
            .any(|p| lock(&p.window).last.contains_key(&number))
    }

    /// Reads the tiers learned from Meta again, as [`Self::load`] does (another instance may
    /// have learned one since this one started): at takeover. Returns how many changed.
    pub async fn reload_learned(&self, ledger: &Ledger) -> Result<usize, LedgerError> {
        let mut changed = 0;
        for p in &self.portfolios {
            let Some(v) = ledger.kv_get(Table::StoreMeta, &meta_key(&p.name)).await? else {
                continue;
            };
            let Some((learned, configured_then)) = decode_learned(&v) else {
                continue;
            };
            if configured_then != p.configured.load(Ordering::Relaxed) {
                continue;
            }
            let before = p.limit.swap(learned, Ordering::Relaxed);
            if let Some(i) = self.index_of(&p.name) {
                self.limit_changed(i, learned);
            }
            if before != learned {
                changed += 1;
                tracing::info!(portfolio = %p.name, from = before, to = learned, "Messaging tier learned by another instance.");
                crate::metrics::tier(&p.name, lock(&p.window).last.len(), learned);
            }
        }
        Ok(changed)
    }

    /// Counts a business-initiated send to `number` now, if the tier allows it: Ok(ticket and
    /// the row to write with the send record), or Err(when the window has room again).
    pub fn reserve(
        &self,
        portfolio: usize,
        number: u64,
        digits: &str,
        now: Timestamp,
    ) -> Result<Option<(TierTicket, KvOp)>, Timestamp> {
        let p = &self.portfolios[portfolio];
        let limit = p.limit.load(Ordering::Relaxed);
        if limit == UNLIMITED {
            return Ok(None);
        }
        let now_ms = now.as_millisecond();
        let mut w = lock(&p.window);
        w.expire(now_ms);
        let previous = w.last.get(&number).copied();
        if previous.is_none() && w.last.len() >= limit as usize {
            let oldest = w.by_time.first().map_or(now_ms, |&(t, _)| t);
            return Err(Timestamp::from_millisecond(oldest + WINDOW_MS).unwrap_or(now));
        }
        // A new recipient counts globally too: one from the lease, or not now.
        let leased = previous.is_none() && self.quota(portfolio).is_some();
        if leased
            && let Some(q) = self.quota(portfolio)
            && !q.try_take(1)
        {
            // Used up everywhere: as long as the window could take (the caller caps it);
            // else the lease is on its way.
            let wait = if q.used_up() {
                Duration::from_millis(WINDOW_MS as u64)
            } else {
                LEASE_RETRY
            };
            return Err(now.checked_add(wait).unwrap_or(now));
        }
        if let Some(old) = previous {
            w.by_time.remove(&(old, number));
        }
        w.last.insert(number, now_ms);
        w.by_time.insert((now_ms, number));
        if previous.is_none() {
            // Only a new recipient changes the usage (the gauges cost more than the count).
            crate::metrics::tier(&p.name, w.last.len(), limit);
        }
        let op = KvOp::Put {
            table: Table::TierUsage,
            key: row_key(digits, &p.name),
            value: now_ms.to_le_bytes().to_vec(),
        };
        Ok(Some((
            TierTicket {
                portfolio,
                number,
                previous,
                at: now_ms,
                leased,
            },
            op,
        )))
    }

    /// Whether what the ticket took from the global lease may still be sent: the lease is
    /// still trusted (see [`Quota::trusted`]). A count not from a lease always may.
    pub fn lease_still_trusted(&self, t: &TierTicket) -> bool {
        !t.leased || self.quota(t.portfolio).is_none_or(|q| q.trusted())
    }

    /// Un-counts a send that definitely did not happen; returns the row change to write.
    pub fn release(&self, t: TierTicket, digits: &str) -> KvOp {
        if t.leased
            && let Some(q) = self.quota(t.portfolio)
        {
            q.give_back(1);
        }
        let p = &self.portfolios[t.portfolio];
        let mut w = lock(&p.window);
        if w.last.get(&t.number) == Some(&t.at) {
            w.by_time.remove(&(t.at, t.number));
            match t.previous {
                Some(prev) => {
                    w.last.insert(t.number, prev);
                    w.by_time.insert((prev, t.number));
                }
                None => {
                    w.last.remove(&t.number);
                }
            }
        }
        let key = row_key(digits, &p.name);
        match t.previous {
            Some(prev) => KvOp::Put {
                table: Table::TierUsage,
                key,
                value: prev.to_le_bytes().to_vec(),
            },
            None => KvOp::Delete {
                table: Table::TierUsage,
                key,
            },
        }
    }

    /// Meta raised (or set) the portfolio's tier; returns the row that remembers it.
    pub fn set_limit(&self, portfolio: usize, limit: u32) -> KvOp {
        let p = &self.portfolios[portfolio];
        let before = p.limit.swap(limit, Ordering::Relaxed);
        if before != limit {
            tracing::info!(portfolio = %p.name, from = before, to = limit, "Messaging tier changed.");
        }
        self.limit_changed(portfolio, limit);
        crate::metrics::tier(&p.name, lock(&p.window).last.len(), limit);
        let mut value = limit.to_le_bytes().to_vec();
        value.extend_from_slice(&p.configured.load(Ordering::Relaxed).to_le_bytes());
        KvOp::Put {
            table: Table::StoreMeta,
            key: meta_key(&p.name),
            value,
        }
    }

    /// SIGHUP: a new configured tier for the portfolio; it replaces a tier learned from Meta
    /// as a changed configured value does at start ([`Self::load`]). The counts stay. Returns
    /// whether the configured value changed.
    pub fn reconfigure(&self, portfolio: usize, configured: u32) -> bool {
        let Some(p) = self.portfolios.get(portfolio) else {
            return false;
        };
        if p.configured.swap(configured, Ordering::Relaxed) == configured {
            return false;
        }
        p.limit.store(configured, Ordering::Relaxed);
        self.limit_changed(portfolio, configured);
        crate::metrics::tier(&p.name, lock(&p.window).last.len(), configured);
        true
    }

    fn limit_changed(&self, portfolio: usize, limit: u32) {
        if let Some(q) = self.quota(portfolio) {
            q.set_limit(limit as i64);
        }
    }

    /// (counted recipients in the window, limit) of a portfolio.
    pub fn usage(&self, portfolio: usize, now: Timestamp) -> (usize, u32) {
        let p = &self.portfolios[portfolio];
        let mut w = lock(&p.window);
        w.expire(now.as_millisecond());
        (w.last.len(), p.limit.load(Ordering::Relaxed))
    }

    /// Forgets what left the window; returns the store rows to delete (at most `limit`).
    pub async fn housekeep(
        &self,
        ledger: &Ledger,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<KvOp>, LedgerError> {
        let now_ms = now.as_millisecond();
        for p in &self.portfolios {
            let mut w = lock(&p.window);
            w.expire(now_ms);
            crate::metrics::tier(&p.name, w.last.len(), p.limit.load(Ordering::Relaxed));
        }
        let mut ops = Vec::new();
        ledger
            .kv_for_each(Table::TierUsage, |key, value| {
                if ops.len() >= limit {
                    return;
                }
                let stale = <[u8; 8]>::try_from(value)
                    .map(|b| i64::from_le_bytes(b) <= now_ms - WINDOW_MS)
                    .unwrap_or(true);
                if stale || decode_key(key).is_none_or(|(_, p)| self.index_of(p).is_none()) {
                    ops.push(KvOp::DeleteIf {
                        table: Table::TierUsage,
                        key: key.to_vec(),
                        value: value.to_vec(),
                    });
                }
            })
            .await?;
        Ok(ops)
    }
}

impl Tier {
    /// Forgets a number in memory (after its erasure), so no later release writes it back.
    pub fn forget(&self, number: u64) {
        for p in &self.portfolios {
            let mut w = lock(&p.window);
            if let Some(at) = w.last.remove(&number) {
                w.by_time.remove(&(at, number));
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `digits\0portfolio`: starts with the number, so erasure by prefix finds it.
fn row_key(digits: &str, portfolio: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(digits.len() + 1 + portfolio.len());
    k.extend_from_slice(digits.as_bytes());
    k.push(0);
    k.extend_from_slice(portfolio.as_bytes());
    k
}

fn decode_key(key: &[u8]) -> Option<(u64, &str)> {
    let nul = key.iter().position(|&b| b == 0)?;
    let digits = std::str::from_utf8(&key[..nul]).ok()?;
    let portfolio = std::str::from_utf8(&key[nul + 1..]).ok()?;
    Some((digits.parse().ok()?, portfolio))
}

fn meta_key(portfolio: &str) -> Vec<u8> {
    format!("tier|{portfolio}").into_bytes()
}

fn decode_learned(v: &[u8]) -> Option<(u32, u32)> {
    let learned = u32::from_le_bytes(v.get(..4)?.try_into().ok()?);
    let configured = u32::from_le_bytes(v.get(4..8)?.try_into().ok()?);
    Some((learned, configured))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::ToSpan;

    fn t0() -> Timestamp {
        "2026-11-29T00:00:00Z".parse().unwrap()
    }

    fn tier(limit: u32) -> Tier {
        Tier::new(&[("acme".into(), limit), ("other".into(), UNLIMITED)])
    }

    fn ok(t: &Tier, p: usize, n: u64, at: Timestamp) -> Option<(TierTicket, KvOp)> {
        t.reserve(p, n, &n.to_string(), at).unwrap()
    }

    #[test]
    fn new_numbers_beyond_the_tier_wait_for_the_oldest_to_leave_the_24h_window() {
        let t = tier(3);
        for (i, n) in [1, 2, 3].into_iter().enumerate() {
            ok(&t, 0, n, t0() + (i as i64).hours());
        }
        // A number already counted is free, and its count moves to now.
        ok(&t, 0, 2, t0() + 5.hours());
        assert_eq!(t.usage(0, t0() + 5.hours()), (3, 3));
        // A fourth number waits until number 1 (counted at t0) leaves the window.
        assert_eq!(
            t.reserve(0, 4, "4", t0() + 6.hours()),
            Err(t0() + 24.hours())
        );
        assert!(
            t.reserve(0, 4, "4", t0() + 24.hours() - 1.millisecond())
                .is_err()
        );
        ok(&t, 0, 4, t0() + 24.hours());
        // Next to leave is number 3 (t0 + 2h); number 2 was refreshed at t0 + 5h.
        assert_eq!(
            t.reserve(0, 5, "5", t0() + 25.hours()),
            Err(t0() + 26.hours())
        );
        // An unlimited portfolio never counts.
        for n in 0..10_000 {
            assert_eq!(t.reserve(1, n, "x", t0()), Ok(None));
        }
    }

    #[test]
    fn a_released_ticket_gives_the_room_back_and_restores_the_previous_count() {
        let t = tier(1);
        let (first, _) = ok(&t, 0, 1, t0()).unwrap();
        assert!(t.reserve(0, 2, "2", t0()).is_err());
        assert_eq!(
            t.release(first, "1"),
            KvOp::Delete {
                table: Table::TierUsage,
                key: b"1\0acme".to_vec()
            }
        );
        ok(&t, 0, 2, t0());
        // Refreshing a counted number and releasing that puts its old time back.
        let (again, _) = ok(&t, 0, 2, t0() + 1.hours()).unwrap();
        t.release(again, "2");
        assert_eq!(
            t.reserve(0, 3, "3", t0() + 2.hours()),
            Err(t0() + 24.hours())
        );
    }

    /// Rows another instance wrote: the later count time wins, stale ones are left out, and a
    /// tier it learned is read again unless the configured tier changed since.
    #[tokio::test]
    async fn another_instances_counts_merge_by_the_later_time_and_its_learned_tier_is_read() {
        let ledger = Ledger::open_in_memory().unwrap();
        let other = tier(3);
        let mut ops = vec![other.set_limit(0, 5)];
        for (n, at) in [(1, t0()), (2, t0() + 2.hours()), (3, t0() - 25.hours())] {
            ops.push(ok(&other, 0, n, at).unwrap().1);
        }
        ledger.kv_many(ops).await.unwrap();

        let this = tier(3);
        ok(&this, 0, 1, t0() + 1.hours());
        ok(&this, 0, 2, t0() + 1.hours());
        let rows = ledger.kv_scan(Table::TierUsage).await.unwrap();
        // 2's later time; 1's is older than this one's; 3's left the window.
        assert_eq!(this.merge_rows(&rows, t0() + 3.hours()), 1);
        assert_eq!(this.merge_rows(&rows, t0() + 3.hours()), 0, "idempotent");
        assert_eq!(this.usage(0, t0() + 3.hours()), (2, 3));
        assert!(this.holds(1) && this.holds(2) && !this.holds(3));
        // Number 1 leaves the window 24 h after this instance's count, number 2 after the
        // other's.
        assert_eq!(this.usage(0, t0() + 25.hours()), (1, 3));
        assert_eq!(this.usage(0, t0() + 26.hours()), (0, 3));

        assert_eq!(this.reload_learned(&ledger).await.unwrap(), 1);
        assert_eq!(this.usage(0, t0()).1, 5);
        assert_eq!(
            tier(4).reload_learned(&ledger).await.unwrap(),
            0,
            "config changed"
        );
    }

    /// Counted across instances (PostgreSQL): a new recipient takes one from the portfolio's
    /// lease, a known one none; a send that did not happen gives it back, a recorded one makes
    /// it durable; an empty lease defers briefly, a used-up quota for long.
    #[test]
    fn a_new_recipient_takes_one_from_the_global_lease() {
        let t = tier(100);
        let q = t.share_globally()[0].clone();
        assert!(t.is_global());
        q.granted_for_test(2, false);
        let (mut first, _) = ok(&t, 0, 1, t0()).unwrap();
        assert_eq!(q.counts_for_test(), (1, 0));
        ok(&t, 0, 1, t0() + 1.hours());
        assert_eq!(q.counts_for_test(), (1, 0), "a counted recipient is free");
        let (second, _) = ok(&t, 0, 2, t0()).unwrap();
        assert_eq!(
            t.reserve(0, 3, "3", t0()),
            Err(t0() + LEASE_RETRY),
            "the lease is empty: looks again soon"
        );
        t.release(second, "2");
        assert_eq!(q.counts_for_test(), (1, 0), "given back");
        assert!(t.lease_still_trusted(&first));
        q.distrusted_for_test();
        assert!(
            !t.lease_still_trusted(&first),
            "a lease not renewed for 8 s: the others may have handed it out"
        );
        q.granted_for_test(2, false);
        t.recorded(&mut first);
        t.recorded(&mut first);
        assert_eq!(q.counts_for_test(), (0, 1), "durable, once");
        t.release(first, "1");
        assert_eq!(
            q.counts_for_test(),
            (0, 1),
            "its row goes, not the lease's count"
        );
        q.granted_for_test(0, true);
        assert!(
            t.reserve(0, 4, "4", t0()).unwrap_err() >= t0() + 24.hours(),
            "used up: for long (the caller caps the wait)"
        );
    }

    #[tokio::test]
    async fn counts_and_a_learned_tier_survive_a_restart_unless_the_config_changed() {
        let ledger = Ledger::open_in_memory().unwrap();
        let t = tier(2);
        let mut ops = vec![t.set_limit(0, 3)];
        for n in [10, 11, 12] {
            ops.push(ok(&t, 0, n, t0()).unwrap().1);
        }
        ledger.kv_many(ops).await.unwrap();
        let again = tier(2);
        assert_eq!(again.load(&ledger, t0() + 1.hours()).await.unwrap(), 3);
        assert_eq!(again.usage(0, t0() + 1.hours()), (3, 3));
        assert!(again.reserve(0, 13, "13", t0() + 1.hours()).is_err());
        // The operator changed the tier in the config since: the config wins.
        let changed = tier(5);
        changed.load(&ledger, t0() + 1.hours()).await.unwrap();
        assert_eq!(changed.usage(0, t0() + 1.hours()), (3, 5));
        // A day later the rows are stale, and housekeeping deletes them.
        let later = t0() + 24.hours();
        assert_eq!(tier(2).load(&ledger, later).await.unwrap(), 0);
        assert_eq!(t.housekeep(&ledger, later, 100).await.unwrap().len(), 3);
    }
}
