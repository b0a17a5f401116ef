//! Consent, durable and cached: every event is kept as proof (`consent_history_v1`), what the
//! history adds up to is kept per number and account (`consent_summary_v1`) and loaded into the
//! in-memory [`ConsentIndex`] at start, so each job's check does no I/O.
//!
//! Changes for one number are applied one at a time (the consumer runs them in the number's
//! lane; the CLI is one process), so "read the history, write the summary" needs no lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{KeyInit, Mac};
use jiff::Timestamp;

use super::event::{ConsentEvent, Kind, RawConsentEvent};
use super::index::{ConsentIndex, number_key};
use super::model::{self, Decision, Fact, JobFacts, PurposeState};
use super::wa_id::{self, Resolved, WaIds};
use crate::config::{Config, Purpose};
use crate::job::Job;
use crate::store::postgres::follow::{FollowError, FollowHandle, FollowSink, Followed};
use crate::store::{KvOp, Ledger, LedgerError, Table, number_job_key};

/// What applying an event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Recorded; the summary may have changed.
    New,
    /// Already recorded: nothing changed.
    Replay,
    /// Dated at or before the number's erasure: ignored.
    Void,
    /// The number was erased.
    Erased,
}

impl Applied {
    pub fn as_str(self) -> &'static str {
        match self {
            Applied::New => "new",
            Applied::Replay => "replay",
            Applied::Void => "void",
            Applied::Erased => "erased",
        }
    }
}

/// A stored event: the proof `consent show` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proof {
    pub account: String,
    pub event: serde_json::Value,
}

/// What an erasure removed, for the operator's report (counts only: no personal data).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EraseReport {
    pub consent_events: u64,
    pub summaries: u64,
    pub pending_confirmations: u64,
    pub jobs: u64,
    pub other_rows: u64,
}

pub struct ConsentStore {
    pub ledger: Ledger,
    index: ConsentIndex,
    /// Looked up on every job: a fast hasher (no untrusted keys reach it; purposes are
    /// validated against config first).
    rules: HashMap<String, Purpose, foldhash::fast::FixedState>,
    accounts: Vec<String>,
    /// Keys the erasure hashes, so a tombstone does not hold the number.
    erase_key: [u8; 32],
    /// An erasure left freed pages holding the number: compact soon (see [`Self::compactor`]).
    /// Also stored ([`COMPACTION_DUE_KEY`]), so that a stop or a crash before the compaction
    /// is done leaves it due at the next start.
    compaction_due: AtomicBool,
    /// Held for a whole compaction: the final one at shutdown waits for one under way.
    compaction_running: tokio::sync::Mutex<()>,
    compaction_wanted: tokio::sync::Notify,
    /// How long the last compaction held the store (ms), for the compactor's pace.
    last_compaction_ms: std::sync::atomic::AtomicU64,
    /// How long of it the store was held alone (ms).
    last_held_ms: std::sync::atomic::AtomicU64,
    /// WhatsApp ID → number, where they differ (see [`wa_id`]).
    wa_ids: WaIds,
    /// PostgreSQL: where a follower of the database's changes starts, taken before the load
    /// read anything (see [`Self::follow`]). None on redb.
    follow_from: Option<i64>,
    /// This instance's own writes, for the follower's skip rule.
    local: LocalWrites,
}

/// This instance's own consent writes, in flight and lately ended, so that the follower does
/// not put back an older value over one this instance is writing (see
/// [`FollowSink::apply_followed`]). By number: the part of a summary or WhatsApp ID key before
/// its first NUL, the unit an erasure deletes. One mutex: consent writes are not per job.
#[derive(Default)]
struct LocalWrites {
    marks: Mutex<Marks>,
}

#[derive(Default)]
struct Marks {
    /// One more for every write that ends.
    tick: u64,
    /// A follower has started polling: from then on, ended writes are remembered until a poll
    /// that started after them has been applied. Before (and always in tools, which do not
    /// follow), a number is forgotten as soon as no write of it is in flight.
    following: bool,
    numbers: HashMap<Box<[u8]>, Mark>,
}

#[derive(Default)]
struct Mark {
    /// Writes of the number in flight.
    writing: u32,
    /// The tick at which the last one ended.
    done_at: u64,
}

/// A write in flight, from before its statements are sent until memory has its result.
struct Writing<'a> {
    local: &'a LocalWrites,
    numbers: Vec<Box<[u8]>>,
}

impl LocalWrites {
    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(&self, numbers: &[&str]) -> Writing<'_> {
        let numbers: Vec<Box<[u8]>> = numbers.iter().map(|n| n.as_bytes().into()).collect();
        let mut m = self.marks();
        for n in &numbers {
            m.numbers.entry(n.clone()).or_default().writing += 1;
        }
        Writing {
            local: self,
            numbers,
        }
    }

    /// Runs `apply` unless the number is being written, or a write of it ended after the
    /// mark `started`; holds the lock meanwhile, so that no write of it starts and ends in
    /// between (a write that starts after `apply` sets memory after it). Whether it ran.
    fn unless_written(&self, number: &[u8], started: u64, apply: impl FnOnce()) -> bool {
        let m = self.marks();
        if m.numbers
            .get(number)
            .is_some_and(|w| w.writing > 0 || w.done_at > started)
        {
            return false;
        }
        apply();
        true
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut m = self.local.marks();
        m.tick += 1;
        let (tick, following) = (m.tick, m.following);
        for n in &self.numbers {
            if let Some(w) = m.numbers.get_mut(n) {
                w.writing = w.writing.saturating_sub(1);
                w.done_at = tick;
                if w.writing == 0 && !following {
                    m.numbers.remove(n);
                }
            }
        }
    }
}

impl FollowSink for ConsentStore {
    fn poll_starting(&self) -> u64 {
        let mut m = self.local.marks();
        m.following = true;
        m.tick
    }

    fn apply_followed(&self, started: u64, rows: Vec<Followed>) -> Vec<Followed> {
        let mut skipped = Vec::new();
        for row in rows {
            let number = row.key.split(|b| *b == 0).next().unwrap_or_default();
            if !self
                .local
                .unless_written(number, started, || self.apply_followed_row(&row))
            {
                skipped.push(row);
            }
        }
        // The next poll starts after this: marks of writes that ended before this one started
        // can never make it skip anything.
        self.local
            .marks()
            .numbers
            .retain(|_, w| w.writing > 0 || w.done_at > started);
        skipped
    }
}

/// The namespace of [`Ledger::lock_key`] for a number's consent (its history and summaries).
const LOCK_NUMBER: i32 = 1;

fn sep(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            v.push(0);
        }
        v.extend_from_slice(p);
    }
    v
}

/// `digits \0 account`: the summary and pending-confirmation key.
pub fn number_account_key(digits: &str, account: &str) -> Vec<u8> {
    sep(&[digits.as_bytes(), account.as_bytes()])
}

fn history_prefix(digits: &str, account: &str) -> Vec<u8> {
    let mut k = number_account_key(digits, account);
    k.push(0);
    k
}

fn number_prefix(digits: &str) -> Vec<u8> {
    let mut k = digits.as_bytes().to_vec();
    k.push(0);
    k
}

fn history_key(ev: &ConsentEvent) -> Vec<u8> {
    let mut k = history_prefix(ev.to.digits(), &ev.account);
    k.extend_from_slice(&(ev.at.as_millisecond().max(0) as u64).to_be_bytes());
    k.extend_from_slice(&ev.fingerprint());
    k
}

/// Summary on disk: per purpose `[len][name][consented_at u32 LE][flags][n][len][source]…`.
pub fn encode_summary(summary: &BTreeMap<String, PurposeState>) -> Vec<u8> {
    let mut v = Vec::new();
    for (p, st) in summary {
        let p = &p.as_bytes()[..p.len().min(255)];
        v.push(p.len() as u8);
        v.extend_from_slice(p);
        v.extend_from_slice(&st.consented_at.to_le_bytes());
        v.push(st.flags);
        v.push(st.sources.len().min(255) as u8);
        for s in st.sources.iter().take(255) {
            let s = &s.as_bytes()[..s.len().min(255)];
            v.push(s.len() as u8);
            v.extend_from_slice(s);
        }
    }
    v
}

/// One purpose of an encoded summary, borrowed from the stored bytes (loading ten million of
/// them allocates nothing per row).
pub struct EncodedEntry<'a> {
    pub purpose: &'a str,
    pub consented_at: u32,
    pub flags: u8,
    /// Length-prefixed source strings, already checked to be well formed.
    sources: &'a [u8],
}

impl<'a> EncodedEntry<'a> {
    pub fn sources(&self) -> impl Iterator<Item = &'a str> + 'a {
        let mut b = self.sources;
        std::iter::from_fn(move || {
            let (&n, rest) = b.split_first()?;
            let (s, rest) = rest.split_at_checked(n as usize)?;
            b = rest;
            std::str::from_utf8(s).ok()
        })
    }
}

/// Calls `f` for each purpose of an encoded summary; false if the bytes are malformed.
pub fn for_each_encoded<'a>(mut b: &'a [u8], mut f: impl FnMut(EncodedEntry<'a>)) -> bool {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
    let one = |b: &mut &'a [u8]| -> Option<EncodedEntry<'a>> {
        let n = take(b, 1)?[0] as usize;
        let purpose = std::str::from_utf8(take(b, n)?).ok()?;
        let consented_at = u32::from_le_bytes(take(b, 4)?.try_into().ok()?);
        let flags = take(b, 1)?[0];
        let ns = take(b, 1)?[0];
        let start = *b;
        for _ in 0..ns {
            let n = take(b, 1)?[0] as usize;
            std::str::from_utf8(take(b, n)?).ok()?;
        }
        Some(EncodedEntry {
            purpose,
            consented_at,
            flags,
            sources: &start[..start.len() - b.len()],
        })
    };
    while !b.is_empty() {
        match one(&mut b) {
            Some(e) => f(e),
            None => return false,
        }
    }
    true
}

pub fn decode_summary(b: &[u8]) -> Option<BTreeMap<String, PurposeState>> {
    let mut out = BTreeMap::new();
    let ok = for_each_encoded(b, |e| {
        out.insert(
            e.purpose.to_string(),
            PurposeState {
                flags: e.flags,
                consented_at: e.consented_at,
                sources: e.sources().map(str::to_string).collect(),
            },
        );
    });
    ok.then_some(out)
}

fn fact_of(bytes: &[u8]) -> Option<Fact> {
    let raw: RawConsentEvent = serde_json::from_slice(bytes).ok()?;
    Some(Fact {
        at_ms: raw.at.as_millisecond(),
        kind: raw.kind,
        purposes: raw.purposes.unwrap_or_default(),
        source: raw.source,
    })
}

/// Prefix of the rows in [`Table::StoreMeta`] that mark an erasure until a compaction started
/// after it is done (one per number: the prefix, then the tombstone's keyed hash).
const COMPACTION_DUE_KEY: &[u8] = b"compaction_due_v1\0";

/// The most of the daemon's time compactions may hold the store: on a store so large that one
/// held it for seconds (in place, see [`Ledger::compact`]), the compactor rests long enough
/// after it that jobs run at least 95 % of the time.
pub const COMPACTION_SHARE: f64 = 0.05;

/// How long the compactor waits after a compaction that took `took`, of which it held the store
/// alone for `held`, before the next one: at least 30 s; long enough that holds take at most
/// [`COMPACTION_SHARE`] of the time; and at least as long as the compaction took, so that a
/// steady trickle of erasures keeps a copy running at most half the time.
pub fn rest_after_compaction(
    took: std::time::Duration,
    held: std::time::Duration,
) -> std::time::Duration {
    let share = held.div_f64(COMPACTION_SHARE).saturating_sub(held);
    share.max(took).max(std::time::Duration::from_secs(30))
}

/// The key of the erasure tombstones' hashes: one per store, made by whichever process opens
/// the store first. Several instances may open an empty PostgreSQL store at once: the key is
/// inserted only if absent and read back, so all of them hash with the same key (two keys would
/// each miss the other's tombstones, and an erased number's late events would count again).
pub async fn erase_key(ledger: &Ledger) -> Result<[u8; 32], LedgerError> {
    if let Some(k) = ledger.kv_get(Table::StoreMeta, b"erase_key").await?
        && let Ok(k) = <[u8; 32]>::try_from(k.as_slice())
    {
        return Ok(k);
    }
    let fresh: [u8; 32] = rand::random();
    // Written before any tombstone can exist; a crash here only means a new key.
    if !ledger
        .kv_insert_if_absent(Table::StoreMeta, b"erase_key".to_vec(), fresh.to_vec())
        .await?
    {
        // Another process made one first: that one is the store's.
        if let Some(k) = ledger.kv_get(Table::StoreMeta, b"erase_key").await?
            && let Ok(k) = <[u8; 32]>::try_from(k.as_slice())
        {
            return Ok(k);
        }
        // A row that is not a key (damaged): replaced, as before.
        ledger
            .kv_put(Table::StoreMeta, b"erase_key".to_vec(), fresh.to_vec())
            .await?;
    }
    Ok(fresh)
}

impl ConsentStore {
    /// Loads every summary into memory. Returns the store and how many entries were loaded.
    pub async fn load(ledger: Ledger, config: &Config) -> Result<Arc<ConsentStore>, LedgerError> {
        let accounts: Vec<String> = config.accounts.iter().map(|a| a.name.to_string()).collect();
        let rules: HashMap<String, Purpose> = config
            .purposes
            .iter()
            .map(|p| (p.name.clone(), p.clone()))
            .collect();
        Self::load_with(ledger, accounts, rules).await
    }

    pub async fn load_with(
        ledger: Ledger,
        accounts: Vec<String>,
        rules: HashMap<String, Purpose>,
    ) -> Result<Arc<ConsentStore>, LedgerError> {
        let mut purposes: Vec<&str> = rules.keys().map(String::as_str).collect();
        purposes.sort();
        // Before the first read: a follower that starts from here sees every change committed
        // after the load read a row, and some again (harmless). Taken in a snapshot of its own,
        // as the load's statements each have theirs.
        let follow_from = ledger.follow_watermark().await?;
        let erase_key = erase_key(&ledger).await?;
        // A row holds one entry per purpose: sized for 1.5 per row, so a typical store loads
        // without the table growing (each growth rehashes every entry loaded so far).
        let rows = ledger.kv_len(Table::ConsentSummary).await? as usize;
        let index = ConsentIndex::new(
            accounts.iter().map(String::as_str),
            purposes.iter().copied(),
            rows + rows / 2,
        );
        ledger
            .kv_for_each(Table::ConsentSummary, |k, v| {
                let mut parts = k.splitn(2, |b| *b == 0);
                let (Some(digits), Some(account)) = (parts.next(), parts.next()) else {
                    return;
                };
                let (Ok(digits), Ok(account)) =
                    (std::str::from_utf8(digits), std::str::from_utf8(account))
                else {
                    return;
                };
                if let Some(n) = number_key(digits) {
                    for_each_encoded(v, |e| index.load(account, n, &e));
                }
            })
            .await?;
        let wa_ids = WaIds::default();
        ledger
            .kv_for_each(Table::WaIds, |k, _| wa_ids.load_row(k))
            .await?;
        // Once, for a store from before the index: erasure finds a number's jobs through it.
        let started = std::time::Instant::now();
        if let Some(rows) = ledger.index_jobs_by_number().await? {
            tracing::info!(
                rows,
                took_ms = started.elapsed().as_millis() as u64,
                "Indexed the ledger's finished jobs by number (once, for erasure)."
            );
        }
        // An erasure whose compaction a stop or a crash cut short.
        let due = !ledger
            .kv_scan_prefix(Table::StoreMeta, COMPACTION_DUE_KEY)
            .await?
            .is_empty();
        Ok(Arc::new(ConsentStore {
            ledger,
            index,
            rules: rules.into_iter().collect(),
            accounts,
            erase_key,
            compaction_due: AtomicBool::new(due),
            compaction_running: tokio::sync::Mutex::new(()),
            compaction_wanted: tokio::sync::Notify::new(),
            last_compaction_ms: Default::default(),
            last_held_ms: Default::default(),
            wa_ids,
            follow_from,
            local: LocalWrites::default(),
        }))
    }

    /// Starts following the database's consent changes (PostgreSQL): every `every`, what
    /// other instances wrote since the load comes into the cache (see
    /// [`crate::store::postgres::follow`]). Call it once, right after the load and before any
    /// write. On redb: a handle that follows nothing, and no task.
    pub fn follow(
        self: &Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> (
        FollowHandle,
        Option<tokio::task::JoinHandle<Result<(), FollowError>>>,
    ) {
        let started = self
            .follow_from
            .and_then(|from| self.ledger.follow(self.clone(), from, every, stop));
        match started {
            Some((handle, task)) => (handle, Some(task)),
            None => (FollowHandle::none(), None),
        }
    }

    /// Puts a row another instance wrote (or deleted: `value` None) into memory: a summary as
    /// the load decodes it, a WhatsApp ID learned or forgotten.
    fn apply_followed_row(&self, row: &Followed) {
        let mut parts = row.key.splitn(2, |b| *b == 0);
        let (Some(first), Some(second)) = (parts.next(), parts.next()) else {
            return;
        };
        let (Ok(first), Ok(second)) = (std::str::from_utf8(first), std::str::from_utf8(second))
        else {
            return;
        };
        match row.table {
            // digits \0 account
            Table::ConsentSummary => {
                let Some(n) = number_key(first) else { return };
                let mut summary = BTreeMap::new();
                if let Some(v) = &row.value {
                    // As the load: the well-formed entries of a malformed row count.
                    for_each_encoded(v, |e| {
                        summary.insert(
                            e.purpose.to_string(),
                            PurposeState {
                                flags: e.flags,
                                consented_at: e.consented_at,
                                sources: e.sources().map(str::to_string).collect(),
                            },
                        );
                    });
                }
                // Empty (deleted: an erasure, an emptied summary): the number leaves the cache.
                self.index.set(second, n, &summary);
            }
            // number \0 WhatsApp ID
            Table::WaIds => match row.value {
                Some(_) => self.wa_ids.insert(first, second),
                None => self.wa_ids.remove(first, second),
            },
            _ => {}
        }
    }

    /// The consent flags the cache holds for (account, number, purpose), without I/O; None
    /// when it holds nothing. For tests and tools that check what a job would be decided on.
    pub fn cached_flags(&self, account: &str, digits: &str, purpose: &str) -> Option<u8> {
        self.index
            .find(account, number_key(digits)?, purpose, None)
            .flags
    }

    /// Learns from a send's answer that `number` is the WhatsApp user `id` (both digits):
    /// stored, then remembered. Nothing is written when they are the same digits (nearly
    /// always) or the pair is already known, so a send pays nothing for it.
    pub async fn learn_wa_id(&self, number: &str, id: &str) -> Result<bool, LedgerError> {
        let digits = !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit());
        if !digits || number == id || self.wa_ids.has(number, id) {
            return Ok(false);
        }
        let _writing = self.local.begin(&[number]);
        self.ledger
            .kv_put(Table::WaIds, wa_id::row_key(number, id), Vec::new())
            .await?;
        self.wa_ids.insert(number, id);
        Ok(true)
    }

    /// Whether sendwell knows the number (digits): it has a consent record, or a send to it
    /// was answered with another WhatsApp ID. No I/O.
    pub fn knows_number(&self, digits: &str) -> bool {
        number_key(digits).is_some_and(|n| self.index.knows(n)) || self.wa_ids.is_number(digits)
    }

    /// The number a WhatsApp ID (digits, `+` allowed) in a webhook stands for. No I/O.
    pub fn resolve_wa_id(&self, id: &str) -> Resolved {
        wa_id::resolve(&self.wa_ids, id.trim_start_matches('+'), |d| {
            self.knows_number(d)
        })
    }

    /// IDs learned (the map's size), for the log at start.
    /// The forms of a number that rows about its owner may be kept under (see
    /// [`WaIds::forms_of`]).
    pub fn forms_of(&self, digits: &str) -> Vec<String> {
        self.wa_ids.forms_of(digits)
    }

    pub fn wa_id_entries(&self) -> usize {
        self.wa_ids.len()
    }

    /// Entries in the in-memory cache.
    pub fn cached_entries(&self) -> usize {
        self.index.len()
    }

    /// See [`ConsentIndex::census`].
    pub fn census(&self) -> (usize, usize) {
        self.index.census()
    }

    pub fn rule(&self, purpose: &str) -> Option<&Purpose> {
        self.rules.get(purpose)
    }

    /// The consent stage's question for one job: no I/O.
    pub fn check(&self, job: &Job, now: Timestamp) -> Decision {
        let facts = JobFacts {
            category: job.category,
            purpose: job.purpose.as_deref(),
            has_source_filter: job.opt_in_sources.is_some(),
        };
        if !job.category.needs_purpose() {
            return model::decide(&Default::default(), &facts, None, now.as_second());
        }
        let purpose = job.purpose.as_deref().unwrap_or("");
        let found = match number_key(job.to.digits()) {
            Some(n) => self
                .index
                .find(&job.account, n, purpose, job.opt_in_sources.as_deref()),
            None => Default::default(),
        };
        model::decide(&found, &facts, self.rules.get(purpose), now.as_second())
    }

    /// The summary the store holds for (number, account).
    pub async fn summary(
        &self,
        digits: &str,
        account: &str,
    ) -> Result<BTreeMap<String, PurposeState>, LedgerError> {
        Ok(self
            .ledger
            .kv_get(Table::ConsentSummary, &number_account_key(digits, account))
            .await?
            .and_then(|v| decode_summary(&v))
            .unwrap_or_default())
    }

    fn tombstone_key(&self, digits: &str) -> Vec<u8> {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.erase_key)
            .expect("HMAC takes keys of any length");
        mac.update(digits.as_bytes());
        mac.finalize().into_bytes()[..16].to_vec()
    }

    /// When the number was last erased (unix ms), if within tombstone retention.
    pub async fn erased_at(&self, digits: &str) -> Result<Option<i64>, LedgerError> {
        Ok(self
            .ledger
            .kv_get(Table::ConsentErased, &self.tombstone_key(digits))
            .await?
            .and_then(|v| v.as_slice().try_into().ok().map(i64::from_le_bytes)))
    }

    /// Applies one event, idempotently and by its own time.
    pub async fn apply(&self, ev: &ConsentEvent) -> Result<Applied, LedgerError> {
        let digits = ev.to.digits();
        if ev.kind == Kind::Erase {
            // Rows about the same person may be kept under another form of the number (an
            // opt-out learned from a WhatsApp ID: Brazil's ninth digit, Mexico's 1, a mapped
            // ID): erasing the number erases them all.
            for form in self.wa_ids.forms_of(digits) {
                self.erase(&form, ev.at).await?;
            }
            return Ok(Applied::Erased);
        }
        // From before the history is read until memory has the summary.
        let writing = self.local.begin(&[digits]);
        // The summary is recomputed from the history read here and written whole: another
        // instance doing the same for this number in between would have one of the two
        // summaries miss the other's event (a STOP overwritten by an opt-in's summary, then
        // spread to every cache by the follower). Until the write has committed.
        // The reads below go through the lock (on PostgreSQL, its transaction's connection).
        let lock = self.ledger.lock_key(LOCK_NUMBER, digits.as_bytes()).await?;
        let erased = lock
            .kv_get(Table::ConsentErased, &self.tombstone_key(digits))
            .await?
            .and_then(|v| v.as_slice().try_into().ok().map(i64::from_le_bytes));
        if erased.is_some_and(|t| ev.at.as_millisecond() <= t) {
            lock.release().await?;
            return Ok(Applied::Void);
        }
        let key = history_key(ev);
        let known = lock.kv_get(Table::ConsentHistory, &key).await?.is_some();
        let rows = lock
            .kv_scan_prefix(Table::ConsentHistory, &history_prefix(digits, &ev.account))
            .await?;
        let mut facts: Vec<Fact> = rows.iter().filter_map(|(_, v)| fact_of(v)).collect();
        let json = ev.to_json();
        if !known && let Some(f) = fact_of(&json) {
            facts.push(f);
        }
        let summary = model::summarize(&facts);
        let skey = number_account_key(digits, &ev.account);
        let stored = lock.kv_get(Table::ConsentSummary, &skey).await?;
        let encoded = encode_summary(&summary);
        let mut ops = Vec::new();
        if !known {
            ops.push(KvOp::Put {
                table: Table::ConsentHistory,
                key,
                value: json,
            });
        }
        // Recomputed even for a replay: it repairs a summary a crash left behind its history.
        if stored.as_deref() != Some(encoded.as_slice()) {
            ops.push(if summary.is_empty() {
                KvOp::Delete {
                    table: Table::ConsentSummary,
                    key: skey,
                }
            } else {
                KvOp::Put {
                    table: Table::ConsentSummary,
                    key: skey,
                    value: encoded,
                }
            });
        }
        if !ops.is_empty() {
            self.ledger.kv_many(ops).await?;
        }
        if let Some(n) = number_key(digits) {
            self.index.set(&ev.account, n, &summary);
        }
        // Memory and the end of this write's mark before the lock goes: another instance's
        // summary of the number, written after it, must find the mark ended, or this
        // instance's follower would skip that newer row as older than its own write.
        drop(writing);
        // Lost early (the session ended): the summary may have been computed beside another
        // instance's; the event comes again, and its replay recomputes it.
        lock.release().await?;
        Ok(if known { Applied::Replay } else { Applied::New })
    }

    /// Removes every trace of the number dated at or before `at`: consent history (events
    /// dated later, such as a STOP sent after the erasure was requested, stay, and the summary
    /// is recomputed from them), an open question, customer-service windows, the ledger
    /// entries, delivery records, wamid index and billing marks of jobs to it, and its
    /// WhatsApp IDs; then asks for a compaction ([`Self::compact_if_due`]) so no freed page
    /// keeps a copy. Keeps only a keyed hash of the number with the erasure time (for
    /// `erase_tombstone_retention`), so that an older event arriving late does not bring
    /// consent back. Dating it makes a late or repeated erasure harmless.
    pub async fn erase(&self, digits: &str, at: Timestamp) -> Result<EraseReport, LedgerError> {
        let until_ms = at.as_millisecond();
        // The digits may be a WhatsApp ID kept under its number's prefix: that number's rows
        // change too.
        let as_id = self.wa_ids.number_of(digits);
        let mut numbers = vec![digits];
        numbers.extend(as_id.as_deref());
        let writing = self.local.begin(&numbers);
        // As in `apply`: the summaries are recomputed from the history kept. Both numbers in
        // one lock (one connection, a fixed order).
        let keys: Vec<&[u8]> = numbers.iter().map(|n| n.as_bytes()).collect();
        let lock = self.ledger.lock_keys(LOCK_NUMBER, &keys).await?;
        let mut report = EraseReport::default();
        let mut ops = Vec::new();
        let prefix = number_prefix(digits);
        let mut kept: BTreeMap<String, Vec<Fact>> = BTreeMap::new();
        for (k, v) in self
            .ledger
            .kv_scan_prefix(Table::ConsentHistory, &prefix)
            .await?
        {
            let rest = &k[prefix.len()..];
            let Some(sep) = rest.iter().position(|b| *b == 0) else {
                continue;
            };
            let account = String::from_utf8_lossy(&rest[..sep]).into_owned();
            let at_ms = rest
                .get(sep + 1..sep + 9)
                .and_then(|b| b.try_into().ok())
                .map(|b| u64::from_be_bytes(b) as i64)
                .unwrap_or(i64::MIN);
            if at_ms <= until_ms {
                report.consent_events += 1;
                ops.push(KvOp::Delete {
                    table: Table::ConsentHistory,
                    key: k,
                });
            } else if let Some(f) = fact_of(&v) {
                kept.entry(account).or_default().push(f);
            }
        }
        let mut summaries = Vec::new();
        for (k, _) in self
            .ledger
            .kv_scan_prefix(Table::ConsentSummary, &prefix)
            .await?
        {
            let account = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let summary = kept
                .get(&account)
                .map(|f| model::summarize(f))
                .unwrap_or_default();
            if summary.is_empty() {
                report.summaries += 1;
                ops.push(KvOp::Delete {
                    table: Table::ConsentSummary,
                    key: k,
                });
            } else {
                ops.push(KvOp::Put {
                    table: Table::ConsentSummary,
                    key: k,
                    value: encode_summary(&summary),
                });
            }
            summaries.push((account, summary));
        }
        for (k, v) in self
            .ledger
            .kv_scan_prefix(Table::ConsentPending, &prefix)
            .await?
        {
            let asked = serde_json::from_slice::<serde_json::Value>(&v)
                .ok()
                .and_then(|p| p["asked_ms"].as_i64())
                .unwrap_or(i64::MIN);
            if asked <= until_ms {
                report.pending_confirmations += 1;
                ops.push(KvOp::Delete {
                    table: Table::ConsentPending,
                    key: k,
                });
            }
        }
        for a in &self.accounts {
            let k = format!("{a}|{digits}").into_bytes();
            let opened = self
                .ledger
                .kv_get(Table::Inbound, &k)
                .await?
                .and_then(|v| v.as_slice().try_into().ok().map(i64::from_le_bytes));
            if opened.is_some_and(|t| t <= until_ms) {
                report.other_rows += 1;
                ops.push(KvOp::Delete {
                    table: Table::Inbound,
                    key: k,
                });
            }
        }
        // Jobs to the number: their ledger entries, delivery state, wamid index and billing
        // marks, found through the number's index rows (a range of one table, however large
        // the ledger). A job finished after `at` stays, with its row.
        let mut ids = Vec::new();
        for (id, wamid) in self.ledger.jobs_to(digits).await? {
            let entry = self.ledger.get(&id).await?;
            if entry.is_some_and(|e| e.updated_ms > until_ms) {
                continue;
            }
            ops.push(KvOp::Delete {
                table: Table::JobsByNumber,
                key: number_job_key(digits, &id),
            });
            ops.push(KvOp::Delete {
                table: Table::Delivery,
                key: id.as_bytes().to_vec(),
            });
            if !wamid.is_empty() {
                let mut billed = b"billed|".to_vec();
                billed.extend_from_slice(&wamid);
                ops.push(KvOp::Delete {
                    table: Table::WebhookSeen,
                    key: billed,
                });
                ops.push(KvOp::Delete {
                    table: Table::Wamids,
                    key: wamid,
                });
                report.other_rows += 1;
            }
            ids.push(id);
        }
        report.jobs = ids.len() as u64;
        ops.push(KvOp::DeleteJobs { ids });
        // What the limits remember of the number (frequency caps, tier counts, Meta's
        // per-user block): all keyed `digits\0…`. The in-memory copies live until they expire.
        for table in [
            Table::CapHistory,
            Table::TierUsage,
            Table::UserLimit,
            Table::WaIds,
        ] {
            ops.push(KvOp::DeletePrefix {
                table,
                prefix: prefix.clone(),
            });
        }
        // The digits erased may be a WhatsApp ID (the form a webhook named) rather than the
        // number: its row sits under the number's prefix.
        if let Some(n) = &as_id {
            ops.push(KvOp::Delete {
                table: Table::WaIds,
                key: wa_id::row_key(n, digits),
            });
        }
        let tombstone = until_ms.max(self.erased_at(digits).await?.unwrap_or(i64::MIN));
        ops.push(KvOp::Put {
            table: Table::ConsentErased,
            key: self.tombstone_key(digits),
            value: tombstone.to_le_bytes().to_vec(),
        });
        // With the erasure, atomically: a compaction is due until one started after it is done.
        // One mark per number, keyed by the tombstone's keyed hash (not the number) and holding
        // the tombstone's date: a compaction clears only the marks it covers, and a replayed
        // erasure writes the same bytes again.
        let mut mark = COMPACTION_DUE_KEY.to_vec();
        mark.extend_from_slice(&self.tombstone_key(digits));
        ops.push(KvOp::Put {
            table: Table::StoreMeta,
            key: mark,
            value: tombstone.to_le_bytes().to_vec(),
        });
        self.ledger.kv_many(ops).await?;
        self.wa_ids.forget(digits);
        if as_id.is_some() {
            self.wa_ids.forget_id(digits);
        }
        if let Some(n) = number_key(digits) {
            for (account, summary) in &summaries {
                self.index.set(account, n, summary);
            }
        }
        // As in `apply`: memory, then the mark's end, then the lock.
        drop(writing);
        lock.release().await?;
        // Deleted rows live on in freed pages until overwritten (redb is copy-on-write):
        // compaction rewrites them away, so the file itself no longer holds the number.
        self.compaction_due.store(true, Ordering::SeqCst);
        self.compaction_wanted.notify_one();
        Ok(report)
    }

    /// Compacts the store if an erasure happened since the last compaction. Tools call it
    /// before they exit; the daemon's [`Self::compactor`] calls it after a burst of erasures
    /// and at shutdown.
    pub async fn compact_if_due(&self) -> Result<bool, LedgerError> {
        // One at a time; the final one at shutdown waits for one under way, then does what
        // became due meanwhile.
        let _running = self.compaction_running.lock().await;
        if !self.compaction_due.swap(false, Ordering::SeqCst) {
            return Ok(false);
        }
        // The stored marks as they are before the compaction starts: every erasure they stand
        // for committed before the compaction's snapshot. A later erasure stores another mark
        // (or another date), which stays for the next compaction.
        let marks = self
            .ledger
            .kv_scan_prefix(Table::StoreMeta, COMPACTION_DUE_KEY);
        let started = std::time::Instant::now();
        let held_ms = match self.ledger.compact().await {
            Ok(held_ms) => held_ms,
            Err(e) => {
                self.compaction_due.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
        if let Ok(marks) = marks.await {
            let done = marks
                .into_iter()
                .map(|(key, value)| KvOp::DeleteIf {
                    table: Table::StoreMeta,
                    key,
                    value,
                })
                .collect::<Vec<_>>();
            // Failing here only means one compaction too many after the next start.
            if !done.is_empty() {
                let _ = self.ledger.kv_many(done).await;
            }
        }
        let took_ms = started.elapsed().as_millis() as u64;
        self.last_compaction_ms.store(took_ms, Ordering::Relaxed);
        self.last_held_ms.store(held_ms, Ordering::Relaxed);
        tracing::info!(took_ms, held_ms, "State store compacted after an erasure.");
        Ok(true)
    }

    /// Compacts after erasures: a second after a burst, then at most every 30 s, and never more
    /// than [`COMPACTION_SHARE`] of the time. Compaction has the store to itself while it runs
    /// (jobs wait for it), its length grows with the file, and erasures come in bursts.
    pub async fn compactor(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            // Due already (left by the last run, or a compaction that failed): no need to
            // wait for another erasure.
            if !self.compaction_due.load(Ordering::SeqCst) {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.compaction_wanted.notified() => {}
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
            if let Err(e) = self.compact_if_due().await {
                tracing::warn!(error = %e, "Compacting the state store after an erasure failed; will try again.");
            }
            // A steady trickle of erasures compacts at most twice a minute; what is due by
            // then is done at the next round (or at shutdown).
            let ms = |v: &std::sync::atomic::AtomicU64| {
                std::time::Duration::from_millis(v.load(Ordering::Relaxed))
            };
            let rest = rest_after_compaction(ms(&self.last_compaction_ms), ms(&self.last_held_ms));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(rest) => {}
            }
        }
    }

    /// Every stored event of a number, oldest first, per account.
    pub async fn history(&self, digits: &str) -> Result<Vec<Proof>, LedgerError> {
        let rows = self
            .ledger
            .kv_scan_prefix(Table::ConsentHistory, &number_prefix(digits))
            .await?;
        let mut out: Vec<Proof> = rows
            .into_iter()
            .filter_map(|(k, v)| {
                let account = k.split(|b| *b == 0).nth(1)?;
                Some(Proof {
                    account: String::from_utf8_lossy(account).into_owned(),
                    event: serde_json::from_slice(&v).ok()?,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            (a.event["at"].as_str(), &a.account).cmp(&(b.event["at"].as_str(), &b.account))
        });
        Ok(out)
    }

    /// Calls `f` with every stored event (canonical JSON), number by number.
    pub async fn for_each_event(&self, mut f: impl FnMut(&[u8])) -> Result<(), LedgerError> {
        self.ledger
            .kv_for_each(Table::ConsentHistory, |_, v| f(v))
            .await
    }

    /// Removes tombstones older than `retention`.
    pub async fn purge_tombstones(&self, older_than_ms: i64) -> Result<u64, LedgerError> {
        let mut ops = Vec::new();
        self.ledger
            .kv_for_each(Table::ConsentErased, |k, v| {
                if let Ok(b) = v.try_into()
                    && i64::from_le_bytes(b) < older_than_ms
                {
                    ops.push(KvOp::Delete {
                        table: Table::ConsentErased,
                        key: k.to_vec(),
                    });
                }
            })
            .await?;
        if ops.is_empty() {
            return Ok(0);
        }
        self.ledger.kv_many(ops).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{LedgerEntry, LedgerState, index_job};

    const NUMBER: &str = "4917600000001";

    /// A job's final record as the consumer writes it: with its wamid row and, since the
    /// index exists, the number's index row.
    fn finished(id: &str, to: &str, at_ms: i64, indexed: bool) -> Vec<KvOp> {
        let wamid = format!("wamid.{id}");
        let mut ops = vec![
            KvOp::PutJob {
                id: id.into(),
                entry: LedgerEntry {
                    state: LedgerState::Final,
                    attempts: 1,
                    updated_ms: at_ms,
                    published: true,
                    event: format!(
                        r#"{{"id":"{id}","to":"{to}","status":"sent","wamid":"{wamid}"}}"#
                    )
                    .into_bytes(),
                },
            },
            KvOp::Put {
                table: Table::Wamids,
                key: wamid.clone().into_bytes(),
                value: id.as_bytes().to_vec(),
            },
        ];
        if indexed {
            ops.extend(index_job(to, id, Some(&wamid)));
        }
        ops
    }

    /// The follower's skip rule, at the sink: a row polled for a number this instance is
    /// writing, or wrote after the poll started, is handed back (read again next poll) and
    /// the cache keeps this instance's value.
    #[tokio::test]
    async fn a_followed_row_is_skipped_while_this_instance_writes_the_number() {
        use crate::consent::model::{CONFIRMED, OPTED_IN};
        let rules: HashMap<String, Purpose> = [(
            "newsletter".to_string(),
            Purpose {
                name: "newsletter".into(),
                description: None,
                categories: vec![crate::job::Category::Marketing],
                double_opt_in: None,
                expire_after: None,
            },
        )]
        .into();
        let store = ConsentStore::load_with(
            Ledger::open_in_memory().unwrap(),
            vec!["acme".into()],
            rules,
        )
        .await
        .unwrap();
        let row = |digits: &str, value: Option<Vec<u8>>| Followed {
            table: Table::ConsentSummary,
            key: number_account_key(digits, "acme"),
            value,
        };
        let consent = || {
            let mut m = BTreeMap::new();
            m.insert(
                "newsletter".to_string(),
                PurposeState {
                    flags: OPTED_IN | CONFIRMED,
                    consented_at: 1,
                    sources: Default::default(),
                },
            );
            Some(encode_summary(&m))
        };
        let other = "4915100000001";
        let started = store.poll_starting();
        let writing = store.local.begin(&[NUMBER]);
        let skipped =
            store.apply_followed(started, vec![row(NUMBER, consent()), row(other, consent())]);
        assert_eq!(skipped, vec![row(NUMBER, consent())], "in flight: skipped");
        assert_eq!(store.cached_flags("acme", NUMBER, "newsletter"), None);
        assert_eq!(
            store.cached_flags("acme", other, "newsletter"),
            Some(OPTED_IN | CONFIRMED),
            "another number is not held back"
        );
        drop(writing);
        assert_eq!(
            store
                .apply_followed(started, vec![row(NUMBER, consent())])
                .len(),
            1,
            "ended after the poll started: still skipped"
        );
        let later = store.poll_starting();
        assert!(
            store
                .apply_followed(later, vec![row(NUMBER, consent())])
                .is_empty()
        );
        assert_eq!(
            store.cached_flags("acme", NUMBER, "newsletter"),
            Some(OPTED_IN | CONFIRMED)
        );
        assert!(
            store.local.marks().numbers.is_empty(),
            "marks no poll can need are forgotten"
        );
        // A deleted row (another instance's erasure): the number leaves the cache.
        assert!(
            store
                .apply_followed(store.poll_starting(), vec![row(NUMBER, None)])
                .is_empty()
        );
        assert_eq!(store.cached_flags("acme", NUMBER, "newsletter"), None);
        assert!(!store.knows_number(NUMBER));
    }

    /// Tools never follow: their writes leave no marks behind (an import of millions of events
    /// must not grow memory).
    #[tokio::test]
    async fn without_a_follower_writes_leave_no_marks() {
        let store = ConsentStore::load_with(
            Ledger::open_in_memory().unwrap(),
            vec!["acme".into()],
            HashMap::new(),
        )
        .await
        .unwrap();
        assert!(
            store
                .learn_wa_id("5511987654321", "551187654321")
                .await
                .unwrap()
        );
        store
            .erase("5511987654321", Timestamp::from_millisecond(5_000).unwrap())
            .await
            .unwrap();
        assert!(store.local.marks().numbers.is_empty());
    }

    #[test]
    fn compactions_hold_the_store_at_most_a_twentieth_of_the_time_and_come_at_most_twice_a_minute()
    {
        use std::time::Duration;
        let zero = Duration::ZERO;
        assert_eq!(rest_after_compaction(zero, zero), Duration::from_secs(30));
        assert_eq!(
            rest_after_compaction(Duration::from_millis(700), Duration::from_millis(700)),
            Duration::from_secs(30)
        );
        // In place: the store is held for all of it.
        for took in [
            Duration::from_secs(2),
            Duration::from_secs(9),
            Duration::from_secs(60),
        ] {
            let rest = rest_after_compaction(took, took);
            let share = took.as_secs_f64() / (took + rest).as_secs_f64();
            assert!(share <= COMPACTION_SHARE + 1e-9, "{took:?}: {share}");
        }
        // By copy: held for milliseconds, copying at most half the time.
        let rest = rest_after_compaction(Duration::from_secs(140), Duration::from_millis(20));
        assert_eq!(rest, Duration::from_secs(140));
    }

    /// A crash (or a stop cut short by systemd) after an erasure and before its compaction is
    /// done: the next start knows the compaction is due, does it, and then forgets it.
    #[tokio::test]
    async fn a_compaction_cut_short_by_a_crash_is_done_after_the_restart() {
        let d = tempfile::tempdir().unwrap();
        let open = || async {
            loop {
                match Ledger::open(d.path()) {
                    Ok(l) => break l,
                    Err(_) => tokio::task::yield_now().await,
                }
            }
        };
        let l = open().await;
        let mut ops = Vec::new();
        for i in 0..500 {
            ops.extend(finished(
                &format!("job-{i}"),
                &format!("+{NUMBER}"),
                1_000,
                true,
            ));
            ops.extend(finished(
                &format!("other-{i}"),
                "+4915100000001",
                1_000,
                true,
            ));
        }
        l.kv_many(ops).await.unwrap();
        let store = ConsentStore::load_with(l.clone(), vec!["acme".into()], HashMap::new())
            .await
            .unwrap();
        store
            .erase(NUMBER, Timestamp::from_millisecond(5_000).unwrap())
            .await
            .unwrap();
        let file = Ledger::file_in(d.path());
        let holds = || {
            let bytes = std::fs::read(&file).unwrap();
            bytes.windows(NUMBER.len()).any(|w| w == NUMBER.as_bytes())
        };
        assert!(holds(), "freed pages keep the number until compacted");
        // The process ends here, without compacting.
        drop(store);
        drop(l);

        let l = open().await;
        let store = ConsentStore::load_with(l.clone(), vec!["acme".into()], HashMap::new())
            .await
            .unwrap();
        assert!(store.compact_if_due().await.unwrap(), "a compaction is due");
        assert!(!holds(), "the number is still in the file");
        drop(store);
        drop(l);
        let l = open().await;
        let store = ConsentStore::load_with(l.clone(), vec!["acme".into()], HashMap::new())
            .await
            .unwrap();
        assert!(
            !store.compact_if_due().await.unwrap(),
            "done once, not again"
        );
    }

    #[tokio::test]
    async fn an_erasure_finds_the_numbers_jobs_through_the_index_and_scans_nothing() {
        let l = Ledger::open_in_memory().unwrap();
        // Written before the index existed: the first load indexes them.
        let mut ops = finished("before-index", &format!("+{NUMBER}"), 1_000, false);
        for i in 0..3000 {
            ops.extend(finished(
                &format!("other-{i}"),
                &format!("+49151{i:08}"),
                1_000,
                false,
            ));
        }
        l.kv_many(ops).await.unwrap();
        let store = ConsentStore::load_with(l.clone(), vec!["acme".into()], HashMap::new())
            .await
            .unwrap();
        assert_eq!(l.jobs_to("4915100000007").await.unwrap().len(), 1);
        l.kv_many(finished("after-index", &format!("+{NUMBER}"), 2_000, true))
            .await
            .unwrap();
        // Finished after the erasure was requested: it stays.
        l.kv_many(finished("later", &format!("+{NUMBER}"), 9_000, true))
            .await
            .unwrap();

        let scanned = l.scanned_rows();
        let report = store
            .erase(NUMBER, Timestamp::from_millisecond(5_000).unwrap())
            .await
            .unwrap();
        assert_eq!(l.scanned_rows(), scanned, "no table was scanned");
        assert_eq!(report.jobs, 2);
        for id in ["before-index", "after-index"] {
            assert_eq!(l.get(id).await.unwrap(), None, "{id}");
            let wamid = format!("wamid.{id}");
            assert_eq!(
                l.kv_get(Table::Wamids, wamid.as_bytes()).await.unwrap(),
                None
            );
        }
        assert!(l.get("later").await.unwrap().is_some());
        assert_eq!(
            l.jobs_to(NUMBER).await.unwrap(),
            vec![("later".to_string(), b"wamid.later".to_vec())]
        );
        // Other numbers' jobs are untouched.
        assert!(l.get("other-7").await.unwrap().is_some());
        assert!(
            l.kv_get(Table::Wamids, b"wamid.other-7")
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(l.jobs_to("4915100000007").await.unwrap().len(), 1);
        // The index is built once: a second load finds it done.
        assert_eq!(l.index_jobs_by_number().await.unwrap(), None);
    }
}
