//! Frequency caps: per recipient, "at most N messages of a category in any window T", e.g.
//! "marketing: at most 2 per 7 days and at most 1 per day", counted per account or across the
//! accounts of one brand.
//!
//! # Semantics
//!
//! Exact sliding windows on a whole-second grid: never more than N counted sends in any window
//! `(x − T, x]`, and never held back when fewer than N were counted in the trailing `(x − T, x]`.
//! Only sends count: [`Caps::reserve`] counts one right before the API call (in the same store
//! transaction as the send record) and [`Caps::release`] un-counts it when the send definitely
//! did not happen. A crash mid-call leaves it counted: a cap may be stricter than the truth by
//! one send, never looser. History is durable (`Table::CapHistory`), so a restart never resets
//! a cap.
//!
//! # Why not governor (GCRA)
//!
//! Throughput and pair pacing use governor, but GCRA is not this semantics (design note
//! `docs/design/limits.md` §1): it keeps one "theoretical arrival time" and forgets *when* each
//! cell was spent. "2 per 7 days" as period 3.5 d with burst 2 lets d0, d0, d3.5 through — 3 in
//! one week; with burst 1 it refuses d1 although only one was sent in the trailing week. For
//! N ≥ 2 no (period, burst) is exact. Governor's state is also in memory only (nanoseconds
//! since the limiter started) and never refunds a cell, so it can neither survive a restart nor
//! un-count a send that did not happen. So every cap, N = 1 included (one code path), is an
//! **exact sliding log**: the K most recent counted send times, K = the largest N of the cap's
//! rules. A send at `x` is allowed iff for every rule the N-th newest entry has left
//! `(x − T, x]`; refused, it frees exactly when the binding entry leaves its window.
//!
//! # Layout
//!
//! Durable row per (recipient, scope, category):
//!
//! ```text
//! key   = digits \0 ("a:" account | "b:" brand) \0 category     (every row of a number
//!                                                                starts with `digits\0`,
//!                                                                which the GDPR erase deletes)
//! value = up to K × u32 LE seconds since CAP_EPOCH_UNIX, newest first
//! ```
//!
//! In memory the same logs sit in a concurrent hash map keyed by a packed `u64` — the E.164
//! digits as an integer (< 2^50) in the low 50 bits and an interned (scope, name, category) id in
//! the top 14 — with a fixed-size [`SendLog`] as value, so a check does no I/O and no
//! allocation. Logs whose newest entry has left the cap's longest window can never refuse again:
//! [`Caps::evict_idle`] drops them from memory, [`Caps::purge_ops`] from the store.

use std::collections::HashMap;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use jiff::Timestamp;

use crate::config::limits::{
    CapConfig, CapRule, CapScope, MAX_PER_RULE, MAX_SCOPES, OnExceed, validate_caps,
};
use crate::consent::index::number_key;
use crate::job::Category;
use crate::store::{KvOp, KvRow, Ledger, LedgerError, Table};

type Hasher = foldhash::fast::FixedState;

/// 2025-01-01T00:00:00Z in Unix seconds: cap times are u32 seconds since then (good until 2161).
pub const CAP_EPOCH_UNIX: i64 = 1_735_689_600;

const K: usize = MAX_PER_RULE as usize;
const NUMBER_BITS: u32 = 50;
const ID_BITS: u32 = 64 - NUMBER_BITS;
// Config validation bounds the logs a configuration may define by what this key can hold.
const _: () = assert!(MAX_SCOPES == 1 << ID_BITS);

/// The row of a log that changed by one send at `at` (`add`: counted, else un-counted): the
/// change for PostgreSQL, the whole log for redb (an empty one deletes the row).
fn log_send(key: Vec<u8>, log: &SendLog, at: u32, add: bool, keep: usize) -> KvOp {
    KvOp::LogSend {
        table: Table::CapHistory,
        key,
        log: log.encode(),
        at,
        add,
        keep: keep.min(K) as u8,
    }
}

/// `t` as whole seconds since [`CAP_EPOCH_UNIX`], floored (so a rule is exact on the second
/// grid whatever the sub-second part) and clamped to `0..=u32::MAX`.
pub fn to_secs(t: Timestamp) -> u32 {
    let mut s = t.as_second();
    // `as_second` truncates toward zero; floor matters only before 1970, but be exact anyway.
    if t.subsec_nanosecond() < 0 {
        s -= 1;
    }
    (s - CAP_EPOCH_UNIX).clamp(0, i64::from(u32::MAX)) as u32
}

/// The instant `s` seconds after [`CAP_EPOCH_UNIX`].
pub fn from_secs(s: u32) -> Timestamp {
    // 2025 + 136 years is far inside jiff's range (year 9999).
    Timestamp::from_second(CAP_EPOCH_UNIX + i64::from(s)).expect("cap time within jiff's range")
}

/// The K most recent counted send times of one (recipient, scope, category), newest first.
/// Fixed-size, Copy, no heap: millions of them live in memory.
///
/// Invariant: `times[..len]` is sorted newest first and `times[len..]` is zero, so the derived
/// `PartialEq` compares logs, not leftovers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendLog {
    len: u8,
    times: [u32; K],
}

impl SendLog {
    /// Ok if a send at `now` breaks no rule; Err(earliest second at which it would be allowed)
    /// otherwise. Allowed iff for every rule: fewer than `max` entries, or the max-th newest
    /// entry `<= now - per_secs` (it has left the window (now-per, now]).
    pub fn check(&self, rules: &[CapRule], now: u32) -> Result<(), u32> {
        self.verdict(rules, now).map_err(|(until, _)| until)
    }

    /// [`Self::check`], also naming the rule that sets `until` (for the refusal's detail).
    fn verdict(&self, rules: &[CapRule], now: u32) -> Result<(), (u32, usize)> {
        let mut worst: Option<(u32, usize)> = None;
        for (i, r) in rules.iter().enumerate() {
            let n = usize::from(r.max);
            let free = if n == 0 {
                // Unvalidated "at most 0": never.
                u64::from(u32::MAX)
            } else if self.len() < n {
                // Also covers n > K: a log never holds more than K, so such a rule never binds
                // (and validation refuses it anyway).
                continue;
            } else {
                // The window is (now − per, now]: the entry is out once entry + per <= now. u64:
                // no overflow near u32::MAX, no underflow for now < per.
                u64::from(self.times[n - 1]) + u64::from(r.per_secs)
            };
            if free > u64::from(now) {
                // Refusal frees at the *latest* binding rule: the others are monotone in time
                // (the log does not change while we wait), so they are free by then too.
                let free = free.min(u64::from(u32::MAX)) as u32;
                if worst.is_none_or(|(w, _)| free > w) {
                    worst = Some((free, i));
                }
            }
        }
        worst.map_or(Ok(()), Err)
    }

    /// Counts a send at `at`, keeping at most `keep` newest entries (keep = max of the rules'
    /// max: a rule of N needs the N-th newest, so keeping fewer than the largest N would make
    /// that rule see "fewer than N" and let sends through; more is only waste). Keeps order even
    /// if `at` is older than the newest entry (a clock stepped back, an out-of-order reserve).
    pub fn record(&mut self, at: u32, keep: usize) {
        let keep = keep.min(K);
        let len = self.len();
        // First slot whose entry is not newer than `at`: equal times are interchangeable.
        let pos = self.times[..len].partition_point(|&t| t > at);
        if pos >= keep {
            // Older than every entry we keep: it can never be the N-th newest of any rule.
            self.truncate(keep);
            return;
        }
        let new_len = (len + 1).min(keep);
        self.times.copy_within(pos..new_len - 1, pos + 1);
        self.times[pos] = at;
        self.times[new_len..len.max(new_len)].fill(0);
        self.len = new_len as u8;
    }

    /// Merges `other` into this log as multisets of seconds (for each second, the larger of
    /// the two counts), keeping the newest `keep`: a log copied twice, or one that gained
    /// entries on both sides, counts every send once.
    pub fn merge(&mut self, other: &SendLog, keep: usize) {
        let keep = keep.min(K);
        let (a, b) = (&self.times[..self.len()], &other.times[..other.len()]);
        let mut out = [0u32; K];
        let (mut i, mut j, mut n) = (0, 0, 0);
        // Both are newest first; equal seconds pair up (max of the counts), others interleave.
        while n < keep && (i < a.len() || j < b.len()) {
            let t = match (a.get(i), b.get(j)) {
                (Some(&x), Some(&y)) if x == y => {
                    i += 1;
                    j += 1;
                    x
                }
                (Some(&x), Some(&y)) if x > y => {
                    i += 1;
                    x
                }
                (Some(_), Some(&y)) | (None, Some(&y)) => {
                    j += 1;
                    y
                }
                (Some(&x), None) => {
                    i += 1;
                    x
                }
                (None, None) => unreachable!("loop condition"),
            };
            out[n] = t;
            n += 1;
        }
        self.times = out;
        self.len = n as u8;
    }

    /// Un-counts one send at exactly `at` (a reservation whose send definitely did not
    /// happen); false if absent.
    ///
    /// When the reservation pushed the oldest entry out, that entry is not restored. That loses
    /// nothing if the reservation was made where [`Self::check`] allowed it: the dropped entry
    /// was then already out of the longest-`max` rule's window, and shorter rules never look
    /// that deep.
    pub fn remove(&mut self, at: u32) -> bool {
        let len = self.len();
        let Some(i) = self.times[..len].iter().position(|&t| t == at) else {
            return false;
        };
        self.times.copy_within(i + 1..len, i);
        self.times[len - 1] = 0;
        self.len -= 1;
        true
    }

    pub fn newest(&self) -> Option<u32> {
        (self.len > 0).then_some(self.times[0])
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The stored form: u32 LE each, newest first (4·len bytes).
    pub fn encode(&self) -> Vec<u8> {
        self.times[..self.len()]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect()
    }

    /// None on a bad length (more than [`MAX_PER_RULE`] entries or not a multiple of 4).
    /// Entries out of order (a hand-edited or foreign row) are sorted rather than refused: every
    /// one of them is a counted send.
    pub fn decode(b: &[u8]) -> Option<SendLog> {
        if b.len() % 4 != 0 || b.len() / 4 > K {
            return None;
        }
        let mut log = SendLog::default();
        for (slot, c) in log.times.iter_mut().zip(b.chunks_exact(4)) {
            *slot = u32::from_le_bytes(c.try_into().expect("chunk of 4"));
        }
        let len = b.len() / 4;
        log.len = len as u8;
        log.times[..len].sort_unstable_by(|a, b| b.cmp(a));
        Some(log)
    }

    fn truncate(&mut self, n: usize) {
        let len = self.len();
        if n < len {
            self.times[n..len].fill(0);
            self.len = n as u8;
        }
    }

    /// Sends counted in `(now − per, now]`, among the kept ones.
    fn within(&self, per: u32, now: u32) -> usize {
        self.times[..self.len()]
            .iter()
            .filter(|&&t| u64::from(t) + u64::from(per) > u64::from(now))
            .count()
    }

    /// False once the newest entry has left the cap's longest window: then every entry is out
    /// of every rule's window at `now` and later, so the log can never refuse again.
    fn is_live(&self, longest: u32, now: u32) -> bool {
        self.newest()
            .is_some_and(|t| u64::from(t) + u64::from(longest) > u64::from(now))
    }
}

/// Who a job's send counts for. (No `Debug`: it carries the phone number.)
#[derive(Clone, Copy)]
pub struct CapSubject<'a> {
    pub account: &'a str,
    /// The account's brand, as given to [`Caps::new`] (checked in debug builds; the brand
    /// scope itself is resolved from the account).
    pub brand: &'a str,
    /// E.164 digits without `+`.
    pub digits: &'a str,
    pub category: Category,
}

/// Why a send is held back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapRefusal {
    /// Earliest instant the send would be allowed (whole second), if nothing else is sent.
    pub until: Timestamp,
    pub on_exceed: OnExceed,
    /// Human-readable, for the outcome event and logs; never contains the phone number.
    pub detail: String,
}

/// One configured cap, as checks need it.
struct Cap {
    category: Category,
    scope: CapScope,
    rules: Box<[CapRule]>,
    on_exceed: OnExceed,
    /// Largest `max`: how many entries a log of this cap keeps.
    keep: usize,
    /// Largest `per_secs`: a log whose newest entry is older than this is dead.
    longest: u32,
}

/// One interned (scope kind, scope name, category): one log per recipient.
struct ScopeLog {
    cap: usize,
    /// Account or brand name, for the refusal's detail.
    name: Box<str>,
    /// The durable key after `digits\0`: `a:name\0category` or `b:name\0category`.
    suffix: Box<[u8]>,
}

/// Per configured account: which logs a send of each category counts in.
struct AccountCaps {
    brand: Box<str>,
    /// Indexed by [`cat_index`]; at most one id per scope kind (validation).
    ids: [Box<[u16]>; 4],
}

/// Every cap's per-recipient logs: in memory (no I/O on check), mirrored to
/// `Table::CapHistory` through the [`KvOp`]s the caller writes.
///
/// Race-freedom of check → reserve relies on the consumer's one-lane-per-recipient design (a
/// recipient's jobs never run concurrently, and a recipient maps to one shard); the map itself
/// is safe to share across threads regardless.
pub struct Caps {
    caps: Vec<Cap>,
    ids: Vec<ScopeLog>,
    by_account: HashMap<Box<str>, AccountCaps, Hasher>,
    /// [`ScopeLog::suffix`] → id, to map store rows back.
    by_suffix: HashMap<Box<[u8]>, u16, Hasher>,
    logs: DashMap<u64, SendLog, Hasher>,
}

impl Caps {
    /// `accounts`: (account name, brand name) for every configured account (brand defaults to
    /// the account name — the caller handles that).
    ///
    /// Panics if `caps` fails [`validate_caps`]: config validation must have refused it already.
    pub fn new(caps: Vec<CapConfig>, accounts: &[(&str, &str)]) -> Caps {
        if let Err(e) = validate_caps(&caps, accounts) {
            panic!("frequency caps not validated before use: {e}");
        }
        let caps: Vec<Cap> = caps
            .into_iter()
            .map(|c| Cap {
                category: c.category,
                scope: c.scope,
                keep: c
                    .rules
                    .iter()
                    .map(|r| usize::from(r.max))
                    .max()
                    .unwrap_or(0),
                longest: c.rules.iter().map(|r| r.per_secs).max().unwrap_or(0),
                rules: c.rules.into_boxed_slice(),
                on_exceed: c.on_exceed,
            })
            .collect();
        let mut ids: Vec<ScopeLog> = Vec::new();
        let mut by_suffix: HashMap<Box<[u8]>, u16, Hasher> = HashMap::default();
        let mut by_account: HashMap<Box<str>, AccountCaps, Hasher> = HashMap::default();
        for &(account, brand) in accounts {
            let mut per_cat: [Vec<u16>; 4] = Default::default();
            for (ci, cap) in caps.iter().enumerate() {
                let (tag, name) = match cap.scope {
                    CapScope::Account => ("a:", account),
                    CapScope::Brand => ("b:", brand),
                };
                let mut suffix = Vec::with_capacity(tag.len() + name.len() + 16);
                suffix.extend_from_slice(tag.as_bytes());
                suffix.extend_from_slice(name.as_bytes());
                suffix.push(0);
                suffix.extend_from_slice(cap.category.as_str().as_bytes());
                // The accounts of one brand meet the same brand log here: that is the sharing.
                let id = *by_suffix
                    .entry(suffix.clone().into_boxed_slice())
                    .or_insert_with(|| {
                        ids.push(ScopeLog {
                            cap: ci,
                            name: name.into(),
                            suffix: suffix.into_boxed_slice(),
                        });
                        (ids.len() - 1) as u16
                    });
                per_cat[cat_index(cap.category)].push(id);
            }
            by_account.insert(
                account.into(),
                AccountCaps {
                    brand: brand.into(),
                    ids: per_cat.map(Vec::into_boxed_slice),
                },
            );
        }
        debug_assert!(
            ids.len() <= MAX_SCOPES,
            "validate_caps bounds the scope count"
        );
        Caps {
            caps,
            ids,
            by_account,
            by_suffix,
            logs: DashMap::with_hasher(Hasher::default()),
        }
    }

    /// No caps configured: every call is a cheap no-op.
    pub fn is_empty(&self) -> bool {
        self.caps.is_empty()
    }

    /// In-memory logs (not caps: see [`Self::is_empty`]).
    pub fn len(&self) -> usize {
        self.logs.len()
    }

    /// Loads every durable log at start (page by page), dropping rows whose newest time is
    /// older than the longest window of their cap, rows of caps or accounts no longer
    /// configured (left in the store: a config restored later finds them again), and rows that
    /// do not decode. A log whose cap's largest `max` shrank is cut to the new size; one whose
    /// `max` grew only knows the entries the old size kept. Replaces what memory held for a
    /// loaded key (idempotent). Returns rows loaded.
    pub async fn load(&self, ledger: &Ledger, now: Timestamp) -> Result<usize, LedgerError> {
        if self.is_empty() {
            return Ok(0);
        }
        let now = to_secs(now);
        let mut loaded = 0;
        ledger
            .kv_for_each(Table::CapHistory, |k, v| {
                let Some((id, number)) = self.parse_key(k) else {
                    return;
                };
                let Some(mut log) = SendLog::decode(v) else {
                    return;
                };
                let cap = self.cap_of(id);
                log.truncate(cap.keep);
                if log.is_live(cap.longest, now) {
                    self.logs.insert(pack(id, number), log);
                    loaded += 1;
                }
            })
            .await?;
        Ok(loaded)
    }

    /// Merges a recipient's rows read from the store (its `digits\0` prefix, written by
    /// another instance that held the recipient before) into memory: for each log, the
    /// multiset union ([`SendLog::merge`]), so a reservation of this instance that is still in
    /// flight stays counted and nothing is counted twice. Errs strict: a send this instance
    /// released whose row still holds it is counted again. Rows are filtered as
    /// [`Self::load`] filters them. Returns the logs merged.
    pub fn merge_rows(&self, rows: &[KvRow], now: Timestamp) -> usize {
        if self.is_empty() {
            return 0;
        }
        let now = to_secs(now);
        let mut merged = 0;
        for (k, v) in rows {
            let Some((id, number)) = self.parse_key(k) else {
                continue;
            };
            let Some(mut log) = SendLog::decode(v) else {
                continue;
            };
            let cap = self.cap_of(id);
            log.truncate(cap.keep);
            if log.is_live(cap.longest, now) {
                self.logs
                    .entry(pack(id, number))
                    .or_default()
                    .merge(&log, cap.keep);
                merged += 1;
            }
        }
        merged
    }

    /// Whether memory holds a log of the number (digits as an integer).
    pub fn holds(&self, number: u64) -> bool {
        (0..self.ids.len()).any(|id| self.logs.contains_key(&pack(id as u16, number)))
    }

    /// None if every cap that applies lets the send happen at `now`; otherwise the refusal
    /// with the latest `until` among the refusing caps; `on_exceed` = Suppress if any refusing
    /// cap says Suppress. Allocates only to describe a refusal.
    pub fn check(&self, s: &CapSubject<'_>, now: Timestamp) -> Option<CapRefusal> {
        let (ids, number) = self.applicable(s)?;
        let now = to_secs(now);
        let mut suppress = false;
        // (until, id, binding rule, sends in its window)
        let mut worst: Option<(u32, u16, usize, usize)> = None;
        for &id in ids {
            let cap = self.cap_of(id);
            let Some(log) = self.logs.get(&pack(id, number)) else {
                continue;
            };
            if let Err((until, rule)) = log.verdict(&cap.rules, now) {
                suppress |= cap.on_exceed == OnExceed::Suppress;
                if worst.is_none_or(|w| until > w.0) {
                    let count = log.within(cap.rules[rule].per_secs, now);
                    worst = Some((until, id, rule, count));
                }
            }
        }
        let (until, id, rule, count) = worst?;
        let scope = &self.ids[usize::from(id)];
        let cap = &self.caps[scope.cap];
        let r = cap.rules[rule];
        let until = from_secs(until);
        Some(CapRefusal {
            until,
            on_exceed: if suppress {
                OnExceed::Suppress
            } else {
                OnExceed::Defer
            },
            detail: format!(
                "{count} {} message{} in the last {} ({} {}, limit {}); next allowed at {until}",
                cap.category.as_str(),
                if count == 1 { "" } else { "s" },
                window(r.per_secs),
                match cap.scope {
                    CapScope::Account => "account",
                    CapScope::Brand => "brand",
                },
                scope.name,
                r.max,
            ),
        })
    }

    /// Counts a send at `now` in every applicable cap's log (call right before the API call);
    /// returns the `KvOp::LogSend` rows to write in the same transaction as the send record.
    /// Counts unconditionally: [`Self::check`] (or [`Self::check_and_reserve`]) first.
    ///
    /// The rows carry the change, not only the log: on PostgreSQL another instance may have
    /// counted a send to the same recipient since this one read the row (a shard added or
    /// removed, a failover), and a whole-log put would erase it; the change is applied to the
    /// row as it stands. On redb the whole log is written, as before.
    pub fn reserve(&self, s: &CapSubject<'_>, now: Timestamp) -> Vec<KvOp> {
        let Some((ids, number)) = self.applicable(s) else {
            return Vec::new();
        };
        let at = to_secs(now);
        ids.iter()
            .map(|&id| {
                let keep = self.cap_of(id).keep;
                let mut log = self.logs.entry(pack(id, number)).or_default();
                log.record(at, keep);
                log_send(self.store_key(s.digits, id), &log, at, true, keep)
            })
            .collect()
    }

    /// [`Self::check`] then, if allowed, [`Self::reserve`]: for the re-check at the send
    /// instant. Not atomic across the logs of one recipient; the one-lane-per-recipient
    /// consumer makes that unnecessary.
    pub fn check_and_reserve(
        &self,
        s: &CapSubject<'_>,
        now: Timestamp,
    ) -> Result<Vec<KvOp>, CapRefusal> {
        match self.check(s, now) {
            Some(refusal) => Err(refusal),
            None => Ok(self.reserve(s, now)),
        }
    }

    /// Un-counts a reservation made at `at` (pass the same `Timestamp` given to
    /// [`Self::reserve`]; the send definitely did not happen); returns the rows to write (Put of
    /// the new log, or Delete when empty). Nothing for a log that no longer holds `at`.
    pub fn release(&self, s: &CapSubject<'_>, at: Timestamp) -> Vec<KvOp> {
        let Some((ids, number)) = self.applicable(s) else {
            return Vec::new();
        };
        let at = to_secs(at);
        let mut ops = Vec::new();
        for &id in ids {
            // Entry, not get_mut + remove: removing while holding a guard of the same shard
            // would deadlock.
            let Entry::Occupied(mut e) = self.logs.entry(pack(id, number)) else {
                continue;
            };
            if !e.get_mut().remove(at) {
                continue;
            }
            let key = self.store_key(s.digits, id);
            let keep = self.cap_of(id).keep;
            // As a change too (see `reserve`): un-counting by a whole-log put would also erase
            // what another instance counted meanwhile.
            ops.push(log_send(key, e.get(), at, false, keep));
            if e.get().is_empty() {
                e.remove();
            }
        }
        ops
    }

    /// Takes over the in-memory logs of `old`, the caps before a reload (SIGHUP): each log
    /// goes to the log of the same scope, name and category here, cut to this config's size;
    /// logs of caps no longer configured stay behind (their store rows are kept, as
    /// [`Self::load`] says). Merges ([`SendLog::merge`]), so running it again after the swap
    /// picks up sends that were counted in `old` meanwhile without counting any twice.
    /// Returns the logs taken over.
    pub fn adopt(&self, old: &Caps) -> usize {
        if self.is_empty() {
            return 0;
        }
        let mut moved = 0;
        for e in old.logs.iter() {
            let old_id = (*e.key() >> NUMBER_BITS) as u16;
            let number = *e.key() & ((1u64 << NUMBER_BITS) - 1);
            let Some(&id) = old
                .ids
                .get(usize::from(old_id))
                .and_then(|s| self.by_suffix.get(&s.suffix))
            else {
                continue;
            };
            let keep = self.cap_of(id).keep;
            self.logs
                .entry(pack(id, number))
                .or_default()
                .merge(e.value(), keep);
            moved += 1;
        }
        moved
    }

    /// Drops in-memory logs whose newest entry has left the cap's longest window (they can
    /// never refuse again; a later send starts a fresh log, whose Put overwrites the old row);
    /// returns how many. Store rows are deleted by [`Self::purge_ops`].
    pub fn evict_idle(&self, now: Timestamp) -> usize {
        let now = to_secs(now);
        let mut evicted = 0;
        self.logs.retain(|&k, log| {
            let live = log.is_live(self.cap_of((k >> NUMBER_BITS) as u16).longest, now);
            evicted += usize::from(!live);
            live
        });
        evicted
    }

    /// Store rows that can never matter again (newest entry out of the cap's longest window,
    /// or undecodable), as `KvOp::Delete`, at most `limit` of them; a page-by-page scan.
    /// Rows of caps or accounts no longer configured are kept (see [`Self::load`]); the
    /// number's erasure removes them with the rest.
    ///
    /// A row whose in-memory log is live (a send reserved after the scan's snapshot) is
    /// skipped, and the deletes are conditional on the row being unchanged, so a send reserved
    /// between this scan and the caller's write keeps its row.
    pub async fn purge_ops(
        &self,
        ledger: &Ledger,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<KvOp>, LedgerError> {
        let mut ops = Vec::new();
        if self.is_empty() || limit == 0 {
            return Ok(ops);
        }
        let now = to_secs(now);
        // kv_for_each cannot stop early: past `limit` the rest of the scan is skipped cheaply.
        ledger
            .kv_for_each(Table::CapHistory, |k, v| {
                if ops.len() >= limit {
                    return;
                }
                let Some((id, number)) = self.parse_key(k) else {
                    return;
                };
                let longest = self.cap_of(id).longest;
                if SendLog::decode(v).is_some_and(|log| log.is_live(longest, now)) {
                    return;
                }
                if self
                    .logs
                    .get(&pack(id, number))
                    .is_some_and(|log| log.is_live(longest, now))
                {
                    return;
                }
                // Only if unchanged: a send reserved after this scan rewrote the row, and wins.
                ops.push(KvOp::DeleteIf {
                    table: Table::CapHistory,
                    key: k.to_vec(),
                    value: v.to_vec(),
                });
            })
            .await?;
        Ok(ops)
    }

    /// Forgets a number's logs in memory (its rows are deleted by the erasure itself), so a
    /// later send cannot write the erased history back.
    pub fn forget(&self, digits: &str) {
        let Some(number) = crate::consent::index::number_key(digits) else {
            return;
        };
        for id in 0..self.ids.len() {
            self.logs.remove(&pack(id as u16, number));
        }
    }

    /// The log ids a send of `s` counts in, and the packed number; None when nothing applies
    /// (no caps, account not configured, category uncapped, digits not E.164).
    fn applicable(&self, s: &CapSubject<'_>) -> Option<(&[u16], u64)> {
        if self.caps.is_empty() {
            return None;
        }
        let acc = self.by_account.get(s.account)?;
        debug_assert_eq!(
            s.brand, &*acc.brand,
            "CapSubject.brand differs from the brand given to Caps::new"
        );
        let ids = &acc.ids[cat_index(s.category)];
        if ids.is_empty() {
            return None;
        }
        Some((ids, number(s.digits)?))
    }

    fn cap_of(&self, id: u16) -> &Cap {
        &self.caps[self.ids[usize::from(id)].cap]
    }

    fn store_key(&self, digits: &str, id: u16) -> Vec<u8> {
        let suffix = &self.ids[usize::from(id)].suffix;
        let mut k = Vec::with_capacity(digits.len() + 1 + suffix.len());
        k.extend_from_slice(digits.as_bytes());
        k.push(0);
        k.extend_from_slice(suffix);
        k
    }

    /// A store key back to (log id, number); None for keys of unconfigured caps or accounts.
    fn parse_key(&self, k: &[u8]) -> Option<(u16, u64)> {
        // Digits never contain NUL, so the first one ends them whatever the names contain.
        let i = k.iter().position(|&b| b == 0)?;
        let digits = std::str::from_utf8(&k[..i]).ok()?;
        let id = *self.by_suffix.get(&k[i + 1..])?;
        Some((id, number(digits)?))
    }
}

/// Digits as the integer part of the in-memory key. `number_key` alone would take a leading
/// `+` (u64 parsing does), which would give one number two store keys.
fn number(digits: &str) -> Option<u64> {
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number_key(digits)
}

fn pack(id: u16, number: u64) -> u64 {
    (u64::from(id) << NUMBER_BITS) | number
}

fn cat_index(c: Category) -> usize {
    match c {
        Category::Marketing => 0,
        Category::Utility => 1,
        Category::Authentication => 2,
        Category::Service => 3,
    }
}

/// A window length in the largest whole unit: "7 days", "1 hour", "90 minutes".
fn window(secs: u32) -> String {
    let (n, unit) = match secs {
        s if s % 86_400 == 0 => (s / 86_400, "day"),
        s if s % 3_600 == 0 => (s / 3_600, "hour"),
        s if s % 60 == 0 => (s / 60, "minute"),
        s => (s, "second"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: u32 = 3_600;
    const DAY: u32 = 86_400;
    /// An arbitrary day well after the epoch, so no window reaches below 0.
    const D0: u32 = 100 * DAY;

    fn rule(max: u8, per_secs: u32) -> CapRule {
        CapRule { max, per_secs }
    }

    fn log_of(times: &[u32], keep: usize) -> SendLog {
        let mut log = SendLog::default();
        for &t in times {
            log.record(t, keep);
        }
        log
    }

    // ---- SendLog ----

    #[test]
    fn two_per_week_and_one_per_day() {
        let rules = [rule(2, 7 * DAY), rule(1, DAY)];
        let mut log = SendLog::default();
        assert_eq!(log.check(&rules, D0), Ok(()));
        log.record(D0, 2);
        // Day rule: the d0 send is still in (now − 1 d, now].
        assert_eq!(log.check(&rules, D0 + HOUR), Err(D0 + DAY));
        assert_eq!(log.check(&rules, D0 + DAY), Ok(()));
        log.record(D0 + DAY, 2);
        // Day rule is free again at d2, but the week already has 2: free when d0 leaves it.
        assert_eq!(log.check(&rules, D0 + 2 * DAY), Err(D0 + 7 * DAY));
        assert_eq!(log.check(&rules, D0 + 7 * DAY - 1), Err(D0 + 7 * DAY));
        assert_eq!(log.check(&rules, D0 + 7 * DAY), Ok(()));
    }

    #[test]
    fn window_is_half_open() {
        let rules = [rule(1, 100)];
        let log = log_of(&[1_000], 1);
        // An entry exactly at now − per has left (now − per, now]; one second later it has not.
        assert_eq!(log.check(&rules, 1_100), Ok(()));
        assert_eq!(log.check(&rules, 1_099), Err(1_100));
        // now < per: the window reaches below the epoch without wrapping.
        let early = log_of(&[5], 1);
        assert_eq!(early.check(&rules, 50), Err(105));
    }

    #[test]
    fn unvalidated_rules_do_not_panic() {
        let log = log_of(&[1, 2, 3], 8);
        assert_eq!(log.check(&[rule(MAX_PER_RULE + 1, 10)], 4), Ok(()));
        assert_eq!(log.check(&[rule(0, 10)], 4), Err(u32::MAX));
        assert_eq!(log.check(&[], 4), Ok(()));
    }

    #[test]
    fn record_keeps_order_and_the_newest() {
        let mut log = log_of(&[10, 30, 20], 8);
        assert_eq!(log.encode(), log_of(&[30, 20, 10], 8).encode());
        assert_eq!(log.newest(), Some(30));
        // Older than everything kept: no change once full.
        let mut full = log_of(&[10, 20], 2);
        full.record(5, 2);
        assert_eq!(full, log_of(&[20, 10], 2));
        // Between: the oldest falls out.
        full.record(15, 2);
        assert_eq!(full, log_of(&[20, 15], 2));
        // Equal times both count.
        full.record(20, 2);
        assert_eq!(full, log_of(&[20, 20], 2));
        // A smaller keep (config changed) cuts the log.
        log.record(40, 2);
        assert_eq!(log, log_of(&[40, 30], 2));
        assert_eq!(log.len(), 2);
        // keep beyond K is capped.
        let big = log_of(&(0..20).collect::<Vec<_>>(), 100);
        assert_eq!(big.len(), K);
        assert_eq!(big.newest(), Some(19));
    }

    #[test]
    fn remove_takes_out_one_entry() {
        let mut log = log_of(&[10, 20, 20, 30], 8);
        assert!(log.remove(20));
        assert_eq!(log, log_of(&[10, 20, 30], 8));
        assert!(!log.remove(25));
        assert!(log.remove(30));
        assert!(log.remove(10));
        assert!(log.remove(20));
        assert!(log.is_empty());
        assert_eq!(log, SendLog::default());
        assert!(!log.remove(20));
    }

    #[test]
    fn encode_decode_round_trip_and_bad_lengths() {
        let log = log_of(&[1, u32::MAX, 7], 8);
        let b = log.encode();
        assert_eq!(b.len(), 12);
        assert_eq!(&b[..4], &u32::MAX.to_le_bytes());
        assert_eq!(SendLog::decode(&b), Some(log));
        assert_eq!(SendLog::decode(&[]), Some(SendLog::default()));
        assert_eq!(SendLog::decode(&[0; 5]), None);
        assert_eq!(SendLog::decode(&[0; 4 * (K + 1)]), None);
        assert_eq!(SendLog::decode(&[0; 4 * K]).map(|l| l.len()), Some(K));
        // Out of order: sorted, nothing lost.
        let mut rev = Vec::new();
        for t in [1u32, 7, 3] {
            rev.extend_from_slice(&t.to_le_bytes());
        }
        assert_eq!(SendLog::decode(&rev), Some(log_of(&[1, 3, 7], 8)));
    }

    #[test]
    fn to_secs_floors_and_clamps() {
        let epoch = from_secs(0);
        assert_eq!(epoch.as_second(), CAP_EPOCH_UNIX);
        assert_eq!(to_secs(epoch), 0);
        let t: Timestamp = "2025-01-08T00:00:00.999Z".parse().unwrap();
        assert_eq!(to_secs(t), 7 * DAY);
        assert_eq!(from_secs(7 * DAY), "2025-01-08T00:00:00Z".parse().unwrap());
        assert_eq!(to_secs("2024-12-31T23:59:59.5Z".parse().unwrap()), 0);
        assert_eq!(to_secs(Timestamp::MIN), 0);
        assert_eq!(to_secs(Timestamp::MAX), u32::MAX);
        assert_eq!(to_secs(from_secs(u32::MAX)), u32::MAX);
    }

    // ---- SendLog against an oracle over the whole accepted history ----

    /// Sends of `accepted` in (x − per, x].
    fn in_window(accepted: &[u32], per: u32, x: u32) -> usize {
        let lo = i64::from(x) - i64::from(per);
        accepted
            .iter()
            .filter(|&&a| i64::from(a) > lo && a <= x)
            .count()
    }

    /// The issue's definition: allowed iff no rule already has `max` sends in its trailing
    /// window.
    fn oracle_allows(accepted: &[u32], rules: &[CapRule], x: u32) -> bool {
        rules
            .iter()
            .all(|r| in_window(accepted, r.per_secs, x) < usize::from(r.max))
    }

    fn arb_rules() -> impl Strategy<Value = Vec<CapRule>> {
        prop::collection::vec(
            (1u8..=5, 1u32..=1000).prop_map(|(max, per_secs)| CapRule { max, per_secs }),
            1..=3,
        )
    }

    fn arb_attempts() -> impl Strategy<Value = Vec<u32>> {
        prop::collection::vec(0u32..5000, 0..50).prop_map(|mut v| {
            v.sort_unstable();
            v
        })
    }

    proptest! {
        #[test]
        fn sliding_log_is_exact(rules in arb_rules(), attempts in arb_attempts()) {
            let keep = rules.iter().map(|r| usize::from(r.max)).max().unwrap();
            let mut log = SendLog::default();
            let mut accepted: Vec<u32> = Vec::new();
            for &x in &attempts {
                let verdict = log.check(&rules, x);
                // (c) the stored form decides the same.
                let stored = SendLog::decode(&log.encode()).unwrap();
                prop_assert_eq!(stored, log);
                prop_assert_eq!(stored.check(&rules, x), verdict);
                // (b) and its converse: refused exactly when some rule has N in its window.
                prop_assert_eq!(verdict.is_ok(), oracle_allows(&accepted, &rules, x));
                match verdict {
                    Ok(()) => {
                        accepted.push(x);
                        log.record(x, keep);
                    }
                    Err(until) => {
                        // (d) exact: allowed at `until`, refused a second earlier (if nothing
                        // is sent meanwhile), by the log and by the oracle alike.
                        prop_assert!(until > x);
                        prop_assert_eq!(log.check(&rules, until), Ok(()));
                        prop_assert!(oracle_allows(&accepted, &rules, until));
                        prop_assert_eq!(log.check(&rules, until - 1), Err(until));
                        prop_assert!(!oracle_allows(&accepted, &rules, until - 1));
                    }
                }
            }
            // (a) never more than N in any (x − T, x]: the fullest window can be slid to end
            // on an accepted send.
            for &x in &accepted {
                for r in &rules {
                    prop_assert!(in_window(&accepted, r.per_secs, x) <= usize::from(r.max));
                }
            }
        }

        #[test]
        fn record_keeps_the_newest_in_any_order(
            times in prop::collection::vec(0u32..100, 0..30),
            keep in 1usize..=K,
        ) {
            let log = log_of(&times, keep);
            let mut want = times.clone();
            want.sort_unstable_by(|a, b| b.cmp(a));
            want.truncate(keep);
            let got: Vec<u32> = log
                .encode()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            prop_assert_eq!(got, want);
        }
    }

    // ---- Caps ----

    const ACCOUNTS: [(&str, &str); 3] =
        [("acme-de", "acme"), ("acme-fr", "acme"), ("solo", "solo")];
    const NUM: &str = "491701234567";
    const OTHER: &str = "33612345678";

    fn cap(category: Category, scope: CapScope, rules: &[CapRule], on: OnExceed) -> CapConfig {
        CapConfig {
            category,
            scope,
            rules: rules.to_vec(),
            on_exceed: on,
        }
    }

    fn caps(configs: Vec<CapConfig>) -> Caps {
        Caps::new(configs, &ACCOUNTS)
    }

    fn subject<'a>(account: &'a str, digits: &'a str, category: Category) -> CapSubject<'a> {
        let brand = ACCOUNTS
            .iter()
            .find(|a| a.0 == account)
            .map_or(account, |a| a.1);
        CapSubject {
            account,
            brand,
            digits,
            category,
        }
    }

    fn mkt<'a>(account: &'a str, digits: &'a str) -> CapSubject<'a> {
        subject(account, digits, Category::Marketing)
    }

    fn at(secs: u32) -> Timestamp {
        from_secs(secs)
    }

    fn until(c: &Caps, s: &CapSubject<'_>, secs: u32) -> Option<u32> {
        c.check(s, at(secs)).map(|r| to_secs(r.until))
    }

    #[test]
    fn brand_scope_is_shared_by_the_brands_accounts() {
        let c = caps(vec![cap(
            Category::Marketing,
            CapScope::Brand,
            &[rule(1, DAY)],
            OnExceed::Defer,
        )]);
        assert!(c.check(&mkt("acme-de", NUM), at(D0)).is_none());
        let ops = c.reserve(&mkt("acme-de", NUM), at(D0));
        assert_eq!(ops.len(), 1);
        let r = c.check(&mkt("acme-fr", NUM), at(D0 + HOUR)).unwrap();
        assert_eq!(r.until, at(D0 + DAY));
        assert_eq!(r.on_exceed, OnExceed::Defer);
        assert_eq!(until(&c, &mkt("acme-de", NUM), D0 + HOUR), Some(D0 + DAY));
        // Another brand, another number: their own logs.
        assert!(c.check(&mkt("solo", NUM), at(D0 + HOUR)).is_none());
        assert!(c.check(&mkt("acme-fr", OTHER), at(D0 + HOUR)).is_none());
        assert!(c.check(&mkt("acme-fr", NUM), at(D0 + DAY)).is_none());
    }

    #[test]
    fn merge_counts_each_send_once() {
        let log = |ts: &[u32]| {
            let mut l = SendLog::default();
            for &t in ts {
                l.record(t, K);
            }
            l
        };
        let times = |l: &SendLog| l.times[..l.len()].to_vec();
        // Two sends in one second on one side, one of them also on the other: still two.
        let mut a = log(&[10, 20, 20]);
        a.merge(&log(&[20, 30]), K);
        assert_eq!(times(&a), vec![30, 20, 20, 10]);
        // Merging a copy of itself changes nothing.
        let mut b = a;
        b.merge(&a, K);
        assert_eq!(times(&b), times(&a));
        // Cut to the newest `keep`.
        a.merge(&log(&[5, 40]), 3);
        assert_eq!(times(&a), vec![40, 30, 20]);
    }

    #[test]
    fn a_reload_keeps_the_counts_of_caps_that_stay_and_drops_the_others() {
        let old = caps(vec![
            cap(
                Category::Marketing,
                CapScope::Brand,
                &[rule(1, DAY)],
                OnExceed::Suppress,
            ),
            cap(
                Category::Utility,
                CapScope::Account,
                &[rule(1, DAY)],
                OnExceed::Defer,
            ),
        ]);
        old.reserve(&mkt("acme-de", NUM), at(D0));
        old.reserve(&subject("acme-de", NUM, Category::Utility), at(D0));
        // The new config: the marketing cap loosened to 2 a day, the utility cap gone.
        let new = caps(vec![cap(
            Category::Marketing,
            CapScope::Brand,
            &[rule(2, DAY)],
            OnExceed::Suppress,
        )]);
        assert_eq!(
            new.adopt(&old),
            1,
            "only the marketing log has a cap to go to"
        );
        // One send counted: a second is allowed under the new rule, a third is not.
        assert!(new.check(&mkt("acme-fr", NUM), at(D0 + 1)).is_none());
        new.reserve(&mkt("acme-fr", NUM), at(D0 + 1));
        assert_eq!(until(&new, &mkt("acme-de", NUM), D0 + 2), Some(D0 + DAY));
        // A send counted in the old caps while the swap happened is picked up by a second
        // pass, and the first one is not counted twice.
        old.reserve(&mkt("acme-de", OTHER), at(D0 + 3));
        assert_eq!(new.adopt(&old), 2);
        assert_eq!(
            new.logs.get(&pack(0, number(NUM).unwrap())).unwrap().len(),
            2
        );
        assert!(new.check(&mkt("acme-de", OTHER), at(D0 + 4)).is_none());
        new.reserve(&mkt("acme-de", OTHER), at(D0 + 4));
        assert!(new.check(&mkt("acme-de", OTHER), at(D0 + 5)).is_some());
    }

    #[test]
    fn account_scope_is_per_account() {
        let c = caps(vec![cap(
            Category::Marketing,
            CapScope::Account,
            &[rule(1, DAY)],
            OnExceed::Suppress,
        )]);
        c.reserve(&mkt("acme-de", NUM), at(D0));
        let r = c.check(&mkt("acme-de", NUM), at(D0 + 1)).unwrap();
        assert_eq!(r.on_exceed, OnExceed::Suppress);
        assert!(c.check(&mkt("acme-fr", NUM), at(D0 + 1)).is_none());
    }

    #[test]
    fn account_and_brand_caps_both_count() {
        let c = caps(vec![
            cap(
                Category::Marketing,
                CapScope::Account,
                &[rule(2, DAY)],
                OnExceed::Suppress,
            ),
            cap(
                Category::Marketing,
                CapScope::Brand,
                &[rule(3, 7 * DAY)],
                OnExceed::Defer,
            ),
        ]);
        assert_eq!(c.reserve(&mkt("acme-de", NUM), at(D0)).len(), 2);
        c.reserve(&mkt("acme-de", NUM), at(D0 + HOUR));
        // acme-de's account cap is full until d1; the brand has 2 of 3.
        let r = c.check(&mkt("acme-de", NUM), at(D0 + 2 * HOUR)).unwrap();
        assert_eq!(
            (to_secs(r.until), r.on_exceed),
            (D0 + DAY, OnExceed::Suppress)
        );
        assert!(c.check(&mkt("acme-fr", NUM), at(D0 + 2 * HOUR)).is_none());
        c.reserve(&mkt("acme-fr", NUM), at(D0 + 2 * HOUR));
        // Now the brand is full until d7 too: the latest until wins, Suppress if any says so.
        let r = c.check(&mkt("acme-de", NUM), at(D0 + 3 * HOUR)).unwrap();
        assert_eq!(
            (to_secs(r.until), r.on_exceed),
            (D0 + 7 * DAY, OnExceed::Suppress)
        );
        // acme-fr's own account has 1 of 2: only the brand refuses, and it defers.
        let r = c.check(&mkt("acme-fr", NUM), at(D0 + 3 * HOUR)).unwrap();
        assert_eq!(
            (to_secs(r.until), r.on_exceed),
            (D0 + 7 * DAY, OnExceed::Defer)
        );
        assert!(r.detail.contains("brand acme"), "{}", r.detail);
    }

    #[test]
    fn uncapped_categories_and_unknown_accounts_pass() {
        let c = caps(vec![cap(
            Category::Marketing,
            CapScope::Brand,
            &[rule(1, DAY)],
            OnExceed::Defer,
        )]);
        let util = subject("acme-de", NUM, Category::Utility);
        assert!(c.reserve(&util, at(D0)).is_empty());
        assert!(c.reserve(&util, at(D0)).is_empty());
        assert!(c.check(&util, at(D0)).is_none());
        let ghost = subject("ghost", NUM, Category::Marketing);
        assert!(c.reserve(&ghost, at(D0)).is_empty());
        assert!(c.check(&ghost, at(D0)).is_none());
        // Not E.164 digits: not capped (the decoder refuses such jobs long before).
        assert!(c.reserve(&mkt("acme-de", "+4917"), at(D0)).is_empty());
        assert_eq!(c.len(), 0);

        let none = caps(Vec::new());
        assert!(none.is_empty());
        assert!(none.check(&mkt("acme-de", NUM), at(D0)).is_none());
        assert!(none.reserve(&mkt("acme-de", NUM), at(D0)).is_empty());
    }

    #[test]
    fn release_undoes_a_reservation() {
        let c = caps(vec![cap(
            Category::Marketing,
            CapScope::Brand,
            &[rule(2, DAY)],
            OnExceed::Defer,
        )]);
        let s = mkt("acme-de", NUM);
        let t1 = at(D0);
        let t2 = at(D0 + 10);
        c.reserve(&s, t1);
        c.reserve(&s, t2);
        assert!(c.check(&s, at(D0 + 20)).is_some());
        let ops = c.release(&s, t2);
        let key = b"491701234567\0b:acme\0marketing".to_vec();
        // The change (for PostgreSQL) and the log it leaves (for redb).
        assert_eq!(
            ops,
            vec![KvOp::LogSend {
                table: Table::CapHistory,
                key: key.clone(),
                log: D0.to_le_bytes().to_vec(),
                at: D0 + 10,
                add: false,
                keep: 2,
            }]
        );
        assert!(c.check(&s, at(D0 + 20)).is_none());
        // Releasing twice is harmless.
        assert!(c.release(&s, t2).is_empty());
        // The last entry: an empty log, which redb deletes.
        assert_eq!(
            c.release(&s, t1),
            vec![KvOp::LogSend {
                table: Table::CapHistory,
                key,
                log: Vec::new(),
                at: D0,
                add: false,
                keep: 2,
            }]
        );
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn check_and_reserve_counts_only_allowed_sends() {
        let c = caps(vec![cap(
            Category::Marketing,
            CapScope::Account,
            &[rule(1, DAY)],
            OnExceed::Defer,
        )]);
        let s = mkt("solo", NUM);
        assert_eq!(c.check_and_reserve(&s, at(D0)).unwrap().len(), 1);
        let refusal = c.check_and_reserve(&s, at(D0 + 1)).unwrap_err();
        assert_eq!(refusal.until, at(D0 + DAY));
        // The refused attempt was not counted.
        assert!(c.check(&s, at(D0 + DAY)).is_none());
    }

    #[test]
    fn store_keys_start_with_the_number() {
        let c = caps(vec![
            cap(
                Category::Marketing,
                CapScope::Account,
                &[rule(1, DAY)],
                OnExceed::Defer,
            ),
            cap(
                Category::Marketing,
                CapScope::Brand,
                &[rule(1, DAY)],
                OnExceed::Defer,
            ),
        ]);
        let keys: Vec<Vec<u8>> = c
            .reserve(&mkt("acme-fr", NUM), at(D0))
            .into_iter()
            .map(|op| match op {
                KvOp::LogSend { table, key, .. } => {
                    assert_eq!(table, Table::CapHistory);
                    key
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            keys,
            vec![
                b"491701234567\0a:acme-fr\0marketing".to_vec(),
                b"491701234567\0b:acme\0marketing".to_vec(),
            ]
        );
    }

    #[test]
    fn refusal_detail_names_the_rule_not_the_number() {
        let c = caps(vec![cap(
            Category::Marketing,
            CapScope::Brand,
            &[rule(2, 7 * DAY), rule(1, DAY)],
            OnExceed::Suppress,
        )]);
        let s = mkt("acme-de", NUM);
        c.reserve(&s, at(D0));
        let r = c.check(&s, at(D0 + HOUR)).unwrap();
        assert!(
            r.detail
                .starts_with("1 marketing message in the last 1 day (brand acme, limit 1)"),
            "{}",
            r.detail
        );
        c.reserve(&s, at(D0 + DAY));
        let r = c.check(&s, at(D0 + 2 * DAY)).unwrap();
        assert_eq!(
            r.detail,
            format!(
                "2 marketing messages in the last 7 days (brand acme, limit 2); next allowed at {}",
                at(D0 + 7 * DAY)
            )
        );
        assert!(!r.detail.contains(NUM));
        assert_eq!(window(90 * 60), "90 minutes");
        assert_eq!(window(HOUR), "1 hour");
        assert_eq!(window(61), "61 seconds");
    }

    #[test]
    fn validate_refuses_what_new_cannot_hold() {
        let ok = cap(
            Category::Marketing,
            CapScope::Brand,
            &[rule(2, DAY)],
            OnExceed::Defer,
        );
        assert_eq!(validate_caps(std::slice::from_ref(&ok), &ACCOUNTS), Ok(()));
        assert!(validate_caps(&[ok.clone(), ok.clone()], &ACCOUNTS).is_err());
        for bad in [
            vec![],
            vec![rule(0, DAY)],
            vec![rule(MAX_PER_RULE + 1, DAY)],
            vec![rule(1, 0)],
        ] {
            let c = cap(Category::Marketing, CapScope::Brand, &bad, OnExceed::Defer);
            assert!(validate_caps(&[c], &ACCOUNTS).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..MAX_SCOPES + 1).map(|i| format!("a{i}")).collect();
        let accounts: Vec<(&str, &str)> = many.iter().map(|a| (a.as_str(), "one")).collect();
        let acct = cap(
            Category::Marketing,
            CapScope::Account,
            &[rule(1, DAY)],
            OnExceed::Defer,
        );
        assert!(validate_caps(std::slice::from_ref(&acct), &accounts).is_err());
        // Brand-scoped, they all share one log.
        assert_eq!(validate_caps(&[ok], &accounts), Ok(()));
    }

    /// Two marketing caps, one per scope; the longest window is 7 days.
    fn two_caps() -> Vec<CapConfig> {
        vec![
            cap(
                Category::Marketing,
                CapScope::Account,
                &[rule(1, DAY)],
                OnExceed::Suppress,
            ),
            cap(
                Category::Marketing,
                CapScope::Brand,
                &[rule(2, 7 * DAY), rule(1, HOUR)],
                OnExceed::Defer,
            ),
        ]
    }

    #[tokio::test]
    async fn a_restart_never_resets_a_cap() {
        let ledger = Ledger::open_in_memory().unwrap();
        let before = caps(two_caps());
        let sends = [
            (mkt("acme-de", NUM), D0),
            (mkt("acme-fr", NUM), D0 + 2 * HOUR),
            (mkt("solo", NUM), D0 + DAY),
            (mkt("acme-de", OTHER), D0 + 3 * DAY),
        ];
        for (s, t) in &sends {
            ledger.kv_many(before.reserve(s, at(*t))).await.unwrap();
        }
        // A reservation released again, written as the caller would.
        let s = mkt("solo", OTHER);
        ledger.kv_many(before.reserve(&s, at(D0))).await.unwrap();
        ledger.kv_many(before.release(&s, at(D0))).await.unwrap();
        // A row of an account no longer configured: ignored, and kept.
        ledger
            .kv_many(vec![KvOp::Put {
                table: Table::CapHistory,
                key: b"491701234567\0a:gone\0marketing".to_vec(),
                value: D0.to_le_bytes().to_vec(),
            }])
            .await
            .unwrap();

        let now = D0 + 3 * DAY + 1;
        let after = caps(two_caps());
        // Live at `now`: the brand logs b:acme/NUM, b:solo/NUM, b:acme/OTHER (7 days) and the
        // account log a:acme-de/OTHER; the other 1-day account logs have expired.
        assert_eq!(after.load(&ledger, at(now)).await.unwrap(), 4);
        assert_eq!(before.len(), 7);
        assert_eq!(before.evict_idle(at(now)), 3);
        assert_eq!(after.len(), before.len());
        let subjects = [
            mkt("acme-de", NUM),
            mkt("acme-fr", NUM),
            mkt("solo", NUM),
            mkt("acme-de", OTHER),
            mkt("acme-fr", OTHER),
            mkt("solo", OTHER),
        ];
        let mut refused = 0;
        for s in &subjects {
            for t in [
                now,
                D0 + 4 * DAY,
                D0 + 7 * DAY - 1,
                D0 + 7 * DAY,
                D0 + 9 * DAY,
            ] {
                let (a, b) = (before.check(s, at(t)), after.check(s, at(t)));
                refused += usize::from(a.is_some());
                assert_eq!(a, b, "{} at {t}", s.account);
            }
        }
        assert!(refused > 0, "the test should exercise refusals");
        // acme's brand log of NUM holds d0 and d0+2h: full for the week; solo is its own brand.
        assert_eq!(until(&after, &mkt("solo", NUM), now), None);
        assert_eq!(until(&after, &mkt("acme-de", NUM), now), Some(D0 + 7 * DAY));
        // Loading again at a time every log has expired loads nothing and keeps memory as is.
        assert_eq!(
            after
                .load(&ledger, at(D0 + 10 * DAY + 3 * DAY))
                .await
                .unwrap(),
            0
        );
    }

    #[test]
    fn evict_idle_drops_only_expired_logs() {
        let c = caps(two_caps());
        c.reserve(&mkt("acme-de", NUM), at(D0));
        c.reserve(&mkt("acme-fr", NUM), at(D0 + 2 * HOUR));
        c.reserve(&mkt("solo", OTHER), at(D0 + 5 * DAY));
        // a:acme-de, a:acme-fr, b:acme (NUM); a:solo, b:solo (OTHER).
        assert_eq!(c.len(), 5);
        assert_eq!(c.evict_idle(at(D0 + DAY - 1)), 0);
        // Each log expires by its own cap's longest window: 1 day for the account cap.
        assert_eq!(c.evict_idle(at(D0 + DAY)), 1);
        assert_eq!(c.evict_idle(at(D0 + DAY + 2 * HOUR)), 1);
        assert_eq!(c.len(), 3);
        // The brand log still holds 2 in the week: eviction changed no decision.
        let s = mkt("acme-de", NUM);
        assert_eq!(until(&c, &s, D0 + DAY + 2 * HOUR), Some(D0 + 7 * DAY));
        assert_eq!(c.evict_idle(at(D0 + 7 * DAY + 2 * HOUR - 1)), 1);
        assert_eq!(c.len(), 2);
        assert_eq!(c.evict_idle(at(D0 + 7 * DAY + 2 * HOUR)), 1);
        assert_eq!(until(&c, &s, D0 + 7 * DAY + 2 * HOUR), None);
        assert_eq!(c.evict_idle(at(D0 + 12 * DAY)), 1);
        assert_eq!(c.len(), 0);
    }

    #[tokio::test]
    async fn purge_ops_delete_only_expired_rows() {
        let ledger = Ledger::open_in_memory().unwrap();
        let c = caps(two_caps());
        for (s, t) in [(mkt("solo", NUM), D0), (mkt("solo", OTHER), D0 + 5 * DAY)] {
            ledger.kv_many(c.reserve(&s, at(t))).await.unwrap();
        }
        let orphan = b"491701234567\0b:gone\0marketing".to_vec();
        let corrupt = b"15550001111\0b:solo\0marketing".to_vec();
        ledger
            .kv_many(vec![
                KvOp::Put {
                    table: Table::CapHistory,
                    key: orphan.clone(),
                    value: D0.to_le_bytes().to_vec(),
                },
                KvOp::Put {
                    table: Table::CapHistory,
                    key: corrupt.clone(),
                    value: vec![1, 2, 3],
                },
            ])
            .await
            .unwrap();
        let delete = async |key: &[u8]| KvOp::DeleteIf {
            table: Table::CapHistory,
            key: key.to_vec(),
            value: ledger
                .kv_get(Table::CapHistory, key)
                .await
                .unwrap()
                .unwrap(),
        };
        // Before anything expired only the corrupt row goes.
        assert_eq!(
            c.purge_ops(&ledger, at(D0 + HOUR), 100).await.unwrap(),
            vec![delete(&corrupt).await]
        );
        // At d1 the 1-day account log of NUM is dead; its brand log (7 days) is not.
        let ops = c.purge_ops(&ledger, at(D0 + DAY), 100).await.unwrap();
        assert_eq!(
            ops,
            vec![
                delete(&corrupt).await,
                delete(b"491701234567\0a:solo\0marketing").await
            ]
        );
        assert_eq!(
            c.purge_ops(&ledger, at(D0 + DAY), 1).await.unwrap().len(),
            1
        );
        // A row rewritten between the scan and the write (a new send) is not deleted.
        let stale = ops[1].clone();
        let fresh = (D0 + DAY).to_le_bytes().to_vec();
        let key = b"491701234567\0a:solo\0marketing".to_vec();
        ledger
            .kv_many(vec![KvOp::Put {
                table: Table::CapHistory,
                key: key.clone(),
                value: fresh.clone(),
            }])
            .await
            .unwrap();
        ledger.kv_many(vec![stale]).await.unwrap();
        assert_eq!(
            ledger.kv_get(Table::CapHistory, &key).await.unwrap(),
            Some(fresh)
        );
        ledger
            .kv_many(vec![KvOp::Put {
                table: Table::CapHistory,
                key,
                value: D0.to_le_bytes().to_vec(),
            }])
            .await
            .unwrap();
        assert!(
            c.purge_ops(&ledger, at(D0 + DAY), 0)
                .await
                .unwrap()
                .is_empty()
        );
        ledger.kv_many(ops).await.unwrap();

        // At d7 the OTHER account log (d5 + 1 day) and NUM's brand log (d0 + 7 days) are dead.
        let acct_other = b"33612345678\0a:solo\0marketing".to_vec();
        let brand_num = b"491701234567\0b:solo\0marketing".to_vec();
        assert_eq!(
            c.purge_ops(&ledger, at(D0 + 7 * DAY), 100).await.unwrap(),
            vec![delete(&acct_other).await, delete(&brand_num).await]
        );
        // A send reserved after the scan's snapshot (its Put not written yet): memory is live,
        // so the stale-looking row is left alone.
        c.reserve(&mkt("solo", NUM), at(D0 + 7 * DAY));
        assert_eq!(
            c.purge_ops(&ledger, at(D0 + 7 * DAY), 100).await.unwrap(),
            vec![delete(&acct_other).await]
        );

        // Long after everything: every configured row goes, the orphan stays.
        let ops = c.purge_ops(&ledger, at(D0 + 30 * DAY), 100).await.unwrap();
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(!ops.contains(&delete(&orphan).await));
        ledger.kv_many(ops).await.unwrap();
        assert_eq!(ledger.kv_len(Table::CapHistory).await.unwrap(), 1);
    }
}
