//! What a send costs, estimated when it is sent, and the spend guard: an optional daily budget
//! per account. When an account's estimated spend over the trailing 24 hours reaches its budget,
//! jobs of the guarded categories (marketing by default) are deferred until enough of the day's
//! spend has aged out; the other categories keep flowing. Nobody wakes up to a runaway campaign
//! bill.
//!
//! The estimate uses the same price table as the billed amounts from webhooks
//! ([`crate::pricing`]): per delivered template by category × the recipient's market. Meta made
//! utility templates inside an open customer-service window free until 2026-10-01 and charges
//! them since; service messages are free.
//!
//! Spend is kept per minute (1,440 buckets per account, a fixed-size ring), so the rolling sum
//! is exact to the minute and costs O(1) per send. Each send's bucket is also written to the
//! store (fire-and-forget, one small row per account and minute), so a restart does not forget
//! the day's spend. The guard checks before a send; sends already in flight when the budget is
//! reached still go, so spend can overshoot by what is in flight (at most `broker.prefetch`
//! messages).
//!
//! Several instances on one PostgreSQL state (issue 18) count one budget per account: each
//! saves its own spend under rows of its own (`spend|account|minute|instance`, summed by
//! whoever reads them), and a guarded job goes only while this instance's lease of the
//! account's global [`Quota`] has room ([`Spend::share_globally`]). The lease covers the spend
//! this instance has not saved yet; a save that committed moves it to the rows. A restarted
//! instance is a new one: it loads every instance's rows of the day, and keeps adding its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::limits::quota::{self, Kind, Quota};
use crate::config::Config;
use crate::job::{Category, Content, Job};
use crate::pricing::{Micros, PriceTable};
use crate::store::{KvOp, Ledger, LedgerError, Table};

const MINUTES: usize = 24 * 60;
/// Utility templates inside the service window were free until then (Meta, July 2025 pricing).
const UTILITY_IN_WINDOW_FREE_UNTIL: Timestamp = Timestamp::constant(1_790_812_800, 0);
/// A job held back by the budget looks again at least this often.
pub const BUDGET_RECHECK: Duration = Duration::from_secs(300);
/// A guarded job the global lease had no room for while the budget is not known to be spent
/// (the lease not renewed yet: the database slow or unreachable) looks again this soon.
const LEASE_RETRY: Duration = Duration::from_secs(5);

/// The estimated price of sending `job` now, or None when the table has no price for it.
pub fn estimate(
    prices: &PriceTable,
    job: &Job,
    in_service_window: bool,
    now: Timestamp,
) -> Option<Micros> {
    let category = match (&job.content, job.category) {
        // Free-form messages are only possible inside the window and are not charged.
        (Content::Text(_), _) | (_, Category::Service) => return Some(Micros(0)),
        (_, Category::Utility) if in_service_window && now < UTILITY_IN_WINDOW_FREE_UNTIL => {
            return Some(Micros(0));
        }
        (_, c) => c.as_str(),
    };
    prices.price(category, job.to.digits())
}

/// One account's spend per minute over the last 24 hours.
struct Ring {
    /// Micros per minute slot (minute since the epoch mod 1440).
    slots: Box<[i64; MINUTES]>,
    /// Which absolute minute each slot holds, so stale slots read as zero.
    minute_of: Box<[i64; MINUTES]>,
    /// (minute, total) of the last [`Ring::total`]: every sent job asks for it, and summing
    /// 1,440 slots each time showed in the load bench's profile.
    cached: Option<(i64, i64)>,
    /// Minutes changed since they were last written to the store ([`Spend::unsaved`]).
    dirty: Vec<i64>,
}

impl Ring {
    fn new() -> Self {
        Self {
            slots: Box::new([0; MINUTES]),
            minute_of: Box::new([i64::MIN; MINUTES]),
            cached: None,
            dirty: Vec::new(),
        }
    }

    fn add(&mut self, minute: i64, micros: i64) -> i64 {
        let i = minute.rem_euclid(MINUTES as i64) as usize;
        if self.minute_of[i] != minute {
            self.minute_of[i] = minute;
            self.slots[i] = 0;
        }
        self.slots[i] += micros;
        // A slot reset above held a minute out of any window that includes `minute`.
        self.cached = match self.cached {
            Some((m, total)) if m == minute => Some((m, total + micros)),
            _ => None,
        };
        self.slots[i]
    }

    /// Spend in the 1,440 minutes ending with `minute` (inclusive).
    fn total(&mut self, minute: i64) -> i64 {
        if let Some((m, total)) = self.cached
            && m == minute
        {
            return total;
        }
        let total = (0..MINUTES)
            .filter(|&i| self.minute_of[i] > minute - MINUTES as i64 && self.minute_of[i] <= minute)
            .map(|i| self.slots[i])
            .sum();
        self.cached = Some((minute, total));
        total
    }

    /// The first minute from which the rolling sum drops below `budget`, assuming no new spend.
    fn frees_at(&self, minute: i64, budget: i64) -> i64 {
        let mut live: Vec<(i64, i64)> = (0..MINUTES)
            .filter(|&i| self.minute_of[i] > minute - MINUTES as i64 && self.minute_of[i] <= minute)
            .map(|i| (self.minute_of[i], self.slots[i]))
            .collect();
        live.sort_unstable();
        let mut total: i64 = live.iter().map(|(_, v)| v).sum();
        for (m, v) in live {
            total -= v;
            if total < budget {
                return m + MINUTES as i64;
            }
        }
        minute + 1
    }
}

/// How often the spend of the last minutes is written to the store.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(1);

struct Account {
    budget: Option<i64>,
    guarded: Vec<Category>,
    /// The spend this instance knows of: on redb all of it; on PostgreSQL every instance's
    /// rows of the day as loaded at start, plus its own since.
    ring: Mutex<Ring>,
    /// PostgreSQL: this process's own spend, saved under its own rows ([`Own`]).
    own: Mutex<Own>,
    /// 0: below 80 %, 1: at 80 %, 2: at the budget (for one log line per crossing).
    level: Mutex<u8>,
}

/// This process's own spend per minute and what of it is not saved yet (PostgreSQL only).
struct Own {
    ring: Ring,
    /// Micros added since the last save was taken: made durable in the global lease once the
    /// save commits.
    unsaved: i64,
}

/// What the global budgets need (set once, on PostgreSQL).
struct Shared {
    /// This instance's id: the last part of its spend rows' keys.
    instance: String,
    /// Account → its budget's lease (accounts with a budget).
    quotas: HashMap<Arc<str>, Arc<Quota>>,
}

/// Spend per account and the guard.
pub struct Spend {
    /// Shared with the webhook applier (billed cost) and replaced on reload.
    prices: Arc<crate::pricing::SharedPrices>,
    /// Where each minute's spend is remembered.
    ledger: Ledger,
    accounts: HashMap<Arc<str>, Account>,
    /// Unset on redb (one instance: its rows are `spend|account|minute`, its ring is the day).
    shared: OnceLock<Shared>,
}

/// `spend|<account>|<minute>` (one instance) or `spend|<account>|<minute>|<instance>` (several
/// on PostgreSQL): the account and the minute. From the right: an account's name may hold `|`,
/// an instance id (a UUID) never parses as a minute.
fn parse_key(k: &[u8]) -> Option<(&str, i64)> {
    let rest = std::str::from_utf8(k.strip_prefix(b"spend|")?).ok()?;
    let (head, last) = rest.rsplit_once('|')?;
    if let Ok(m) = last.parse::<i64>() {
        return Some((head, m));
    }
    let (name, minute) = head.rsplit_once('|')?;
    Some((name, minute.parse().ok()?))
}

impl Spend {
    pub fn new(config: &Config, ledger: Ledger) -> Self {
        let accounts = config
            .accounts
            .iter()
            .map(|a| {
                if let Some(b) = a.daily_budget {
                    crate::metrics::spend_budget(&a.name, config.prices.currency(), b.0);
                }
                (
                    a.name.clone(),
                    Account {
                        budget: a.daily_budget.map(|m| m.0),
                        guarded: a.budget_categories.clone(),
                        ring: Mutex::new(Ring::new()),
                        own: Mutex::new(Own {
                            ring: Ring::new(),
                            unsaved: 0,
                        }),
                        level: Mutex::new(0),
                    },
                )
            })
            .collect();
        Self {
            prices: Arc::new(crate::pricing::SharedPrices::new(config.prices.clone())),
            ledger,
            accounts,
            shared: OnceLock::new(),
        }
    }

    /// Counts every account's budget across the instances on the database (PostgreSQL), this
    /// one being `instance`: its spend goes to rows of its own from now on. Returns the quotas
    /// whose leases the caller keeps renewing (`Quota::run`). Call once, before the first job.
    pub fn share_globally(&self, instance: &str) -> Vec<Arc<Quota>> {
        let shared = self.shared.get_or_init(|| Shared {
            instance: instance.to_string(),
            quotas: self
                .accounts
                .iter()
                .filter_map(|(name, a)| {
                    Some((
                        name.clone(),
                        Quota::new(Kind::Budget, name.clone(), a.budget?),
                    ))
                })
                .collect(),
        });
        shared.quotas.values().cloned().collect()
    }

    fn quota(&self, account: &str) -> Option<&Arc<Quota>> {
        self.shared.get()?.quotas.get(account)
    }

    /// Before [`Self::check`]: on PostgreSQL, a guarded job of an account whose global lease
    /// ran out waits a moment for its renewal (at once otherwise).
    pub async fn wait_room(&self, job: &Job, stop: &CancellationToken) {
        let (Some(q), Some(a)) = (self.quota(&job.account), self.accounts.get(&job.account)) else {
            return;
        };
        if a.guarded.contains(&job.category) {
            q.wait_room(1, quota::WAIT_ROOM, stop).await;
        }
    }

    /// The price table in use now.
    pub fn prices(&self) -> Arc<PriceTable> {
        self.prices.get()
    }

    /// The replaceable handle, for the webhook applier and reloads.
    pub fn shared_prices(&self) -> Arc<crate::pricing::SharedPrices> {
        self.prices.clone()
    }

    /// Loads the last 24 hours of spend.
    pub async fn load(&self, ledger: &Ledger, now: Timestamp) -> Result<(), LedgerError> {
        let minute = minute_of(now);
        ledger
            .kv_for_each(Table::StoreMeta, |k, v| {
                // Every instance's rows (on PostgreSQL), this process's earlier lives' included.
                let (Some((name, m)), Ok(b)) = (parse_key(k), <[u8; 8]>::try_from(v)) else {
                    return;
                };
                if m <= minute - MINUTES as i64 {
                    return;
                }
                if let Some(a) = self.accounts.get(name) {
                    lock(&a.ring).add(m, i64::from_le_bytes(b));
                }
            })
            .await?;
        for name in self.accounts.keys() {
            self.report(name, now);
        }
        Ok(())
    }

    /// Ok, or the wait when the account's budget is spent and the job's category is guarded.
    pub fn check(&self, job: &Job, now: Timestamp) -> Result<(), Duration> {
        let Some(a) = self.accounts.get(&job.account) else {
            return Ok(());
        };
        let (Some(budget), true) = (a.budget, a.guarded.contains(&job.category)) else {
            return Ok(());
        };
        let minute = minute_of(now);
        let mut ring = lock(&a.ring);
        if ring.total(minute) < budget {
            // On PostgreSQL the ring is only what this instance knows: the global lease decides.
            let Some(q) = self.quota(&job.account) else {
                return Ok(());
            };
            drop(ring);
            if q.has_room() {
                return Ok(());
            }
            return Err(if q.used_up() {
                BUDGET_RECHECK
            } else {
                LEASE_RETRY
            });
        }
        let frees = ring.frees_at(minute, budget);
        let wait = Duration::from_secs(((frees - minute).max(1) * 60) as u64);
        Err(wait.min(BUDGET_RECHECK))
    }

    /// Adds a sent message's estimated cost, and remembers the minute's new total in the
    /// store (queued while the ring is locked, so the writes of one minute stay in order).
    pub fn add(&self, account: &str, micros: Micros, now: Timestamp) {
        let Some(a) = self.accounts.get(account) else {
            return;
        };
        if micros.0 == 0 {
            return;
        }
        let minute = minute_of(now);
        {
            let mut ring = lock(&a.ring);
            ring.add(minute, micros.0);
            if self.shared.get().is_none() && ring.dirty.last() != Some(&minute) {
                ring.dirty.push(minute);
            }
        }
        if self.shared.get().is_some() {
            let mut own = lock(&a.own);
            own.ring.add(minute, micros.0);
            own.unsaved += micros.0;
            if own.ring.dirty.last() != Some(&minute) {
                own.ring.dirty.push(minute);
            }
            // Under `own`'s lock: a save taken meanwhile sees both or neither.
            if let Some(q) = self.quota(account) {
                q.add_use(micros.0);
            }
        }
        self.report(account, now);
    }

    /// The rows of the minutes changed since the last call, for the store. Written every
    /// [`SAVE_INTERVAL`] and at shutdown rather than with every sent job: one row a second per
    /// account instead of one store write per job (a crash loses at most that second of the
    /// estimate).
    pub fn unsaved(&self) -> Vec<KvOp> {
        self.take_unsaved().0
    }

    /// [`Self::unsaved`], and per account the micros those rows make durable and their
    /// minutes (to put back if the save fails).
    fn take_unsaved(&self) -> (Vec<KvOp>, Vec<Taken<'_>>) {
        let mut ops = Vec::new();
        let mut taken = Vec::new();
        let shared = self.shared.get();
        for (name, a) in &self.accounts {
            let mut own_guard;
            let mut ring_guard;
            let (ring, suffix, micros) = match shared {
                Some(s) => {
                    own_guard = lock(&a.own);
                    let micros = std::mem::take(&mut own_guard.unsaved);
                    (&mut own_guard.ring, format!("|{}", s.instance), micros)
                }
                None => {
                    ring_guard = lock(&a.ring);
                    (&mut *ring_guard, String::new(), 0)
                }
            };
            let minutes = std::mem::take(&mut ring.dirty);
            for &minute in &minutes {
                let i = minute.rem_euclid(MINUTES as i64) as usize;
                if ring.minute_of[i] != minute {
                    continue;
                }
                ops.push(KvOp::Put {
                    table: Table::StoreMeta,
                    key: format!("spend|{name}|{minute}{suffix}").into_bytes(),
                    value: ring.slots[i].to_le_bytes().to_vec(),
                });
            }
            if micros != 0 || !minutes.is_empty() {
                taken.push(Taken {
                    account: name,
                    micros,
                    minutes,
                });
            }
        }
        (ops, taken)
    }

    /// A save committed: what it carried is durable, out of the global leases.
    fn saved(&self, taken: Vec<Taken<'_>>) {
        for t in taken {
            if let Some(q) = self.quota(t.account) {
                q.durable(t.micros);
            }
        }
    }

    /// A save failed: its minutes and micros wait for the next one.
    fn not_saved(&self, taken: Vec<Taken<'_>>) {
        let shared = self.shared.get().is_some();
        for t in taken {
            let Some(a) = self.accounts.get(t.account) else {
                continue;
            };
            let mut own;
            let mut all;
            let ring = if shared {
                own = lock(&a.own);
                own.unsaved += t.micros;
                &mut own.ring
            } else {
                all = lock(&a.ring);
                &mut *all
            };
            for m in t.minutes {
                if !ring.dirty.contains(&m) {
                    ring.dirty.push(m);
                }
            }
            ring.dirty.sort_unstable();
        }
    }

    /// Writes [`Self::unsaved`] every [`SAVE_INTERVAL`] until `stop`, then once more.
    pub async fn save_every_second(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SAVE_INTERVAL);
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tick.tick() => false,
            };
            let (ops, taken) = self.take_unsaved();
            if !ops.is_empty() {
                match self.ledger.kv_many(ops).await {
                    Ok(_) => self.saved(taken),
                    Err(e) => {
                        self.not_saved(taken);
                        tracing::warn!(error = %e, "Saving the spend estimate failed; will try again.");
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// The account's estimated spend over the trailing 24 hours.
    pub fn rolling(&self, account: &str, now: Timestamp) -> Option<Micros> {
        let a = self.accounts.get(account)?;
        Some(Micros(lock(&a.ring).total(minute_of(now))))
    }

    /// Gauges, and one log line when the spend crosses 80 % and 100 % of the budget.
    fn report(&self, account: &str, now: Timestamp) {
        let Some(a) = self.accounts.get(account) else {
            return;
        };
        let mut total = lock(&a.ring).total(minute_of(now));
        // On PostgreSQL every instance's durable spend at the last renewal, with this one's
        // unsaved: more than the ring knows once others spend.
        if let (Some(q), Some(_)) = (self.quota(account), self.shared.get())
            && let Some(durable) = q.durable_use()
        {
            total = total.max(durable + lock(&a.own).unsaved);
        }
        crate::metrics::spend(account, self.prices.get().currency(), total);
        let Some(budget) = a.budget else {
            return;
        };
        let level = if total >= budget {
            2
        } else if total * 10 >= budget * 8 {
            1
        } else {
            0
        };
        crate::metrics::spend_guard(account, level == 2);
        let mut last = lock(&a.level);
        if level > *last {
            let spent = Micros(total).to_decimal_string();
            let of = Micros(budget).to_decimal_string();
            let prices = self.prices.get();
            let currency = prices.currency();
            if level == 2 {
                tracing::error!(account, spent = %spent, budget = %of, currency, "Daily budget reached: guarded categories (marketing by default) are held back until the rolling day's spend drops below it.");
            } else {
                tracing::warn!(account, spent = %spent, budget = %of, currency, "Spend is at 80 % of the daily budget.");
            }
        }
        *last = level;
    }

    /// Refreshes the gauges (spend ages out without new sends) and returns the store rows of
    /// minutes that left the day.
    pub async fn housekeep(
        &self,
        ledger: &Ledger,
        now: Timestamp,
    ) -> Result<Vec<KvOp>, LedgerError> {
        for name in self.accounts.keys() {
            self.report(name, now);
        }
        let oldest = minute_of(now) - MINUTES as i64;
        let mut ops = Vec::new();
        ledger
            .kv_for_each(Table::StoreMeta, |k, _| {
                let stale = parse_key(k).is_some_and(|(_, m)| m <= oldest);
                if stale {
                    ops.push(KvOp::Delete {
                        table: Table::StoreMeta,
                        key: k.to_vec(),
                    });
                }
            })
            .await?;
        Ok(ops)
    }
}

/// What one save took of an account (see [`Spend::take_unsaved`]).
struct Taken<'a> {
    account: &'a Arc<str>,
    micros: i64,
    minutes: Vec<i64>,
}

fn minute_of(t: Timestamp) -> i64 {
    t.as_second().div_euclid(60)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::decode::Decoder;

    fn config() -> (tempfile::TempDir, Config) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("token"), "tok").unwrap();
        let toml = r#"
            [[purposes]]
            name = "news"
            [[accounts]]
            name = "a"
            phone_number_id = "1"
            token_file = "token"
            daily_budget = "0.30"
            [prices]
            currency = "EUR"
            [prices.default]
            marketing = "0.0592"
            [prices.markets.germany]
            calling_codes = ["49"]
            marketing = "0.1131"
            utility = "0.0456"
        "#;
        let p = d.path().join("sendwell.toml");
        std::fs::write(&p, toml).unwrap();
        let c = Config::load(&p).unwrap();
        (d, c)
    }

    fn job(c: &Config, category: &str, to: &str, text: bool) -> Job {
        let content = if text {
            r#""text":{"body":"hi"}"#
        } else {
            r#""template":{"name":"t","language":"de"}"#
        };
        let purpose = match category {
            "marketing" | "utility" => r#""purpose":"news","#,
            _ => "",
        };
        let body = format!(
            r#"{{"id":"x","account":"a","to":"{to}","category":"{category}",{purpose}{content}}}"#
        );
        Decoder::new(c).decode(body.as_bytes()).unwrap()
    }

    #[test]
    fn the_estimate_follows_the_table_and_meta_s_free_cases() {
        let (_d, c) = config();
        let t = &c.prices;
        let now: Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
        let before: Timestamp = "2026-09-30T12:00:00Z".parse().unwrap();
        let de = "+491701234567";
        let m = job(&c, "marketing", de, false);
        assert_eq!(estimate(t, &m, false, now), Some(Micros(113_100)));
        assert_eq!(
            estimate(t, &job(&c, "marketing", "+33612345678", false), false, now),
            Some(Micros(59_200)),
            "a market without its own row pays the default"
        );
        let u = job(&c, "utility", de, false);
        assert_eq!(estimate(t, &u, false, now), Some(Micros(45_600)));
        assert_eq!(
            estimate(t, &u, true, before),
            Some(Micros(0)),
            "free in the window before October 2026"
        );
        assert_eq!(
            estimate(t, &u, true, now),
            Some(Micros(45_600)),
            "charged since"
        );
        assert_eq!(
            estimate(t, &job(&c, "service", de, true), true, now),
            Some(Micros(0))
        );
        assert_eq!(
            estimate(t, &job(&c, "authentication", de, false), false, now),
            None,
            "no price: unknown, not zero"
        );
    }

    #[test]
    fn the_guard_holds_back_marketing_once_the_budget_is_spent() {
        let (_d, c) = config();
        let spend = Spend::new(&c, Ledger::open_in_memory().unwrap());
        let now: Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
        let m = job(&c, "marketing", "+491701234567", false);
        let u = job(&c, "utility", "+491701234567", false);
        assert!(spend.check(&m, now).is_ok());
        spend.add("a", Micros(113_100), now);
        spend.add("a", Micros(113_100), now);
        assert!(spend.check(&m, now).is_ok(), "0.2262 < 0.30");
        spend.add("a", Micros(113_100), now);
        assert_eq!(spend.check(&m, now), Err(BUDGET_RECHECK));
        assert!(spend.check(&u, now).is_ok(), "utility is not guarded");
        // A day later the spend has aged out.
        let later = now + std::time::Duration::from_secs(86_400);
        assert!(spend.check(&m, later).is_ok());
        assert_eq!(spend.rolling("a", later), Some(Micros(0)));
    }

    #[tokio::test]
    async fn the_spend_is_saved_in_one_row_per_minute_and_loaded_after_a_restart() {
        let (_d, c) = config();
        let ledger = Ledger::open_in_memory().unwrap();
        let spend = Spend::new(&c, ledger.clone());
        let now: Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
        for _ in 0..3 {
            spend.add("a", Micros(100_000), now);
        }
        spend.add("a", Micros(50_000), now + Duration::from_secs(60));
        let ops = spend.unsaved();
        assert_eq!(ops.len(), 2, "one row per changed minute, not per send");
        assert!(spend.unsaved().is_empty(), "nothing new since");
        ledger.kv_many(ops).await.unwrap();
        let again = Spend::new(&c, ledger.clone());
        again
            .load(&ledger, now + Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            again.rolling("a", now + Duration::from_secs(60)),
            Some(Micros(350_000))
        );
    }

    /// Counted across instances (PostgreSQL): rows of this instance's own, summed with every
    /// other's by a restarted instance; guarded jobs go while the budget's lease has room, and
    /// what a save wrote leaves the lease's use once the save committed.
    #[tokio::test]
    async fn each_instance_saves_its_own_rows_and_the_lease_guards_the_budget() {
        let (_d, c) = config();
        let ledger = Ledger::open_in_memory().unwrap();
        let now: Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
        let minute = minute_of(now);
        // What another instance and a one-instance store saved earlier in the day.
        ledger
            .kv_many(vec![
                KvOp::Put {
                    table: Table::StoreMeta,
                    key: format!("spend|a|{}|other-instance-id", minute - 10).into_bytes(),
                    value: 20_000i64.to_le_bytes().to_vec(),
                },
                KvOp::Put {
                    table: Table::StoreMeta,
                    key: format!("spend|a|{}", minute - 20).into_bytes(),
                    value: 30_000i64.to_le_bytes().to_vec(),
                },
            ])
            .await
            .unwrap();
        let spend = Spend::new(&c, ledger.clone());
        spend.load(&ledger, now).await.unwrap();
        assert_eq!(spend.rolling("a", now), Some(Micros(50_000)));
        let q = spend.share_globally("me")[0].clone();
        let m = job(&c, "marketing", "+491701234567", false);
        assert_eq!(spend.check(&m, now), Err(LEASE_RETRY), "no lease yet");
        q.granted_for_test(100_000, false);
        assert!(spend.check(&m, now).is_ok());
        spend.add("a", Micros(113_100), now);
        assert_eq!(spend.check(&m, now), Err(LEASE_RETRY), "the lease is spent");
        let (ops, taken) = spend.take_unsaved();
        assert_eq!(
            ops,
            vec![KvOp::Put {
                table: Table::StoreMeta,
                key: format!("spend|a|{minute}|me").into_bytes(),
                value: 113_100i64.to_le_bytes().to_vec(),
            }],
            "this instance's own total, under its own key"
        );
        ledger.kv_many(ops).await.unwrap();
        spend.saved(taken);
        assert_eq!(q.counts_for_test(), (0, 113_100));
        q.granted_for_test(0, true);
        assert_eq!(
            spend.check(&m, now),
            Err(BUDGET_RECHECK),
            "used up everywhere"
        );

        // A restart: a new instance, which knows the whole day's spend.
        let again = Spend::new(&c, ledger.clone());
        again.load(&ledger, now).await.unwrap();
        assert_eq!(again.rolling("a", now), Some(Micros(163_100)));
        assert_eq!(again.housekeep(&ledger, now).await.unwrap(), vec![]);
        let later = now + Duration::from_secs(86_400);
        assert_eq!(again.housekeep(&ledger, later).await.unwrap().len(), 3);
    }

    #[test]
    fn a_spend_key_names_its_account_and_minute_in_both_forms() {
        assert_eq!(parse_key(b"spend|a|123"), Some(("a", 123)));
        assert_eq!(
            parse_key(b"spend|a|b|123|0b7c0d9e-0000-4000-8000-000000000001"),
            Some(("a|b", 123))
        );
        assert_eq!(parse_key(b"spend|a|x"), None);
        assert_eq!(parse_key(b"tier|a"), None);
    }

    #[test]
    fn the_rolling_day_sums_exactly_the_last_1440_minutes() {
        let mut r = Ring::new();
        r.add(100, 5);
        r.add(100, 5);
        r.add(700, 20);
        assert_eq!(r.total(700), 30);
        assert_eq!(r.total(100 + 1439), 30);
        assert_eq!(r.total(100 + 1440), 20, "minute 100 left the day");
        // Wrapping around the ring overwrites the old slot.
        r.add(100 + 1440, 1);
        assert_eq!(r.total(100 + 1440), 21);
    }

    #[test]
    fn the_budget_frees_when_enough_spend_ages_out() {
        let mut r = Ring::new();
        r.add(0, 60);
        r.add(10, 30);
        r.add(20, 10);
        // Budget 90 at minute 30 (spent 100): dropping minute 0 leaves 40 < 90.
        assert_eq!(r.frees_at(30, 90), 1440);
        // Budget 20: needs minutes 0 and 10 gone (10 left).
        assert_eq!(r.frees_at(30, 20), 10 + 1440);
    }
}
