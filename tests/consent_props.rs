//! Property tests for consent (CONTRACT §4): random interleavings of consent events and job
//! checks, with out-of-order timestamps, ties, replays, opt-outs and erasures, checked through the
//! real path (`EventDecoder` → `ConsentStore::apply` → `ConsentStore::check` on a decoded `Job`)
//! against an independent reference model written from the rules, not from `consent::model`.
//!
//! The reference model ([`Oracle`]) keeps the *set* of events that count and decides each job:
//!
//! - `authentication` and `service` jobs are always allowed;
//! - the job's category must be one of its purpose's `categories` (else `no_consent`);
//! - an opt-in for the job's purpose counts when it is dated strictly after every opt-out
//!   covering the purpose (an opt-out naming no purpose covers all); none counting: `opted_out`
//!   if such an opt-out exists, else `no_consent`;
//! - when the purpose needs confirmation for the category (`double_opt_in`, by default marketing
//!   only), a confirm covering the purpose (naming none: all) dated at or after the earliest
//!   counting opt-in is needed (else `no_consent`);
//! - with `expire_after`, consent runs from the latest counting opt-in or counting confirm, both
//!   in whole unix seconds (`now_s - consented_s > expire_after` → `consent_expired`);
//! - with `opt_in_sources`, one counting opt-in must come from one of them (else `no_consent`);
//! - an erasure dated E forgets the number's events dated at or before E (under every account)
//!   and voids such events arriving later.
//!
//! A second, stricter check needs no model at all: once an opt-out covering a purpose has
//! arrived (and no erasure dated at or after it), no job for that purpose is allowed unless an
//! opt-in for it dated strictly after that opt-out has arrived.
//!
//! Erasure counts by its own time, like every event: an erasure dated E forgets what happened
//! up to E and voids events dated up to E that arrive later, whenever the erasure arrives (so a
//! late or redelivered erasure cannot undo a STOP dated after it). The regression cases found
//! while writing this (a late erasure that forgot a later opt-out; a global opt-out reported as
//! `no_consent` for a purpose never named) are kept as plain tests below.
//!
//! Cases: `PROPTEST_CASES` (default 256 per property).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use jiff::Timestamp;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use sendwell::config::{Config, Purpose};
use sendwell::consent::{Applied, ConsentEvent, ConsentStore, Decision, EventDecoder, Kind};
use sendwell::job::{Category, Job};
use sendwell::pipeline::decode::Decoder;
use sendwell::store::Ledger;

const ACCOUNTS: [&str; 2] = ["acme-de", "acme-fr"];
const NUMBERS: [&str; 3] = ["+491701234567", "+33612345678", "+358401234567"];
/// Index order matches [`RULES`].
const PURPOSES: [&str; 3] = ["news", "orders", "alerts"];
const SOURCES: [&str; 3] = ["web", "shop", "chat"];
/// 2026-01-01T00:00:00Z.
const BASE_MS: i64 = 1_767_225_600_000;
/// Event and check times move in half days, so a 1-day expiry is crossed within a case.
const STEP_MS: i64 = 12 * 3600 * 1000;
const EVENT_STEPS: i64 = 6;
const DAY_S: i64 = 86_400;

/// The rules as written in the config below, restated for the oracle.
struct Rule {
    categories: &'static [Category],
    /// None: marketing needs confirmation, utility does not (CONTRACT §4 default).
    double_opt_in: Option<bool>,
    expire_after_s: Option<i64>,
}

const RULES: [Rule; 3] = [
    // news: marketing only, default rule (confirmed double opt-in).
    Rule {
        categories: &[Category::Marketing],
        double_opt_in: None,
        expire_after_s: None,
    },
    // orders: marketing (confirmed) and utility (opt-in).
    Rule {
        categories: &[Category::Marketing, Category::Utility],
        double_opt_in: None,
        expire_after_s: None,
    },
    // alerts: single opt-in for both, consent expires after a day.
    Rule {
        categories: &[Category::Marketing, Category::Utility],
        double_opt_in: Some(false),
        expire_after_s: Some(DAY_S),
    },
];

const CONFIG: &str = r#"
[[purposes]]
name = "news"
categories = ["marketing"]

[[purposes]]
name = "orders"
categories = ["marketing", "utility"]

[[purposes]]
name = "alerts"
double_opt_in = false
expire_after = "1d"

[[accounts]]
name = "acme-de"
phone_number_id = "1001"
token_file = "token"

[[accounts]]
name = "acme-fr"
phone_number_id = "1002"
token_file = "token"
"#;

struct Env {
    config: Config,
    decoder: Decoder,
    events: EventDecoder,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "t").unwrap();
        let path = dir.path().join("sendwell.toml");
        std::fs::write(&path, CONFIG).unwrap();
        let config = Config::load(&path).unwrap();
        Env {
            decoder: Decoder::new(&config),
            events: EventDecoder::new(&config),
            config,
        }
    })
}

fn rules() -> HashMap<String, Purpose> {
    env()
        .config
        .purposes
        .iter()
        .map(|p| (p.name.clone(), p.clone()))
        .collect()
}

async fn new_store() -> Arc<ConsentStore> {
    let ledger = Ledger::open_in_memory().unwrap();
    let accounts = ACCOUNTS.iter().map(|a| a.to_string()).collect();
    ConsentStore::load_with(ledger, accounts, rules())
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Generated operations.

#[derive(Clone, Debug, PartialEq, Eq)]
struct Ev {
    kind: Kind,
    account: usize,
    number: usize,
    /// Bit i: PURPOSES[i]. Zero: none named (all, for opt_out and confirm).
    purposes: u8,
    source: Option<usize>,
    at_ms: i64,
}

impl Ev {
    fn names(&self, p: usize) -> bool {
        self.purposes & (1 << p) != 0
    }
    fn covers(&self, p: usize) -> bool {
        self.purposes == 0 || self.names(p)
    }

    fn to_event(&self) -> ConsentEvent {
        let mut json = serde_json::json!({
            "type": self.kind.as_str(),
            "account": ACCOUNTS[self.account],
            "to": NUMBERS[self.number],
            "at": Timestamp::from_millisecond(self.at_ms).unwrap().to_string(),
        });
        if self.purposes != 0 {
            json["purposes"] = (0..PURPOSES.len())
                .filter(|p| self.names(*p))
                .map(|p| PURPOSES[p])
                .collect();
        }
        if let Some(s) = self.source {
            json["source"] = SOURCES[s].into();
        }
        let far_future = Timestamp::from_millisecond(BASE_MS + 100 * DAY_S * 1000).unwrap();
        env()
            .events
            .decode(json.to_string().as_bytes(), far_future)
            .unwrap_or_else(|e| panic!("generated event {self:?} is invalid: {e:?}"))
    }
}

#[derive(Clone, Debug)]
struct JobSpec {
    account: usize,
    number: usize,
    category: Category,
    /// None only for authentication and service.
    purpose: Option<usize>,
    /// `opt_in_sources`: bit i is SOURCES[i] (zero: an empty list).
    sources: Option<u8>,
    now_ms: i64,
}

type JobKey = (usize, usize, Category, Option<usize>, Option<u8>);

impl JobSpec {
    fn key(&self) -> JobKey {
        (
            self.account,
            self.number,
            self.category,
            self.purpose,
            self.sources,
        )
    }

    /// The job as `Decoder` makes it from CONTRACT §2 JSON (decoded once per shape).
    fn job(&self) -> &'static Job {
        static JOBS: OnceLock<HashMap<JobKey, Job>> = OnceLock::new();
        let jobs = JOBS.get_or_init(|| {
            let mut jobs = HashMap::new();
            for account in 0..ACCOUNTS.len() {
                for number in 0..NUMBERS.len() {
                    for category in Category::ALL {
                        for purpose in [None, Some(0), Some(1), Some(2)] {
                            if purpose.is_none() && category.needs_purpose() {
                                continue;
                            }
                            for sources in std::iter::once(None).chain((0..8).map(Some)) {
                                let k = (account, number, category, purpose, sources);
                                jobs.insert(k, decode_job(k));
                            }
                        }
                    }
                }
            }
            jobs
        });
        &jobs[&self.key()]
    }

    fn now(&self) -> Timestamp {
        Timestamp::from_millisecond(self.now_ms).unwrap()
    }

    fn wants_source(&self, s: Option<usize>) -> bool {
        self.sources
            .is_none_or(|m| s.is_some_and(|s| m & (1 << s) != 0))
    }
}

fn decode_job((account, number, category, purpose, sources): JobKey) -> Job {
    let mut json = serde_json::json!({
        "id": "job-1",
        "account": ACCOUNTS[account],
        "to": NUMBERS[number],
        "category": category.as_str(),
        "template": {"name": "t", "language": "de"},
    });
    if let Some(p) = purpose {
        json["purpose"] = PURPOSES[p].into();
    }
    if let Some(m) = sources {
        json["opt_in_sources"] = (0..SOURCES.len())
            .filter(|s| m & (1 << s) != 0)
            .map(|s| SOURCES[s])
            .collect();
    }
    env()
        .decoder
        .decode(json.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("job {json} is invalid: {e:?}"))
}

/// Checks every category and purpose for one number at one time, with and without
/// `opt_in_sources`.
#[derive(Clone, Debug)]
struct Probe {
    account: usize,
    number: usize,
    sources: Option<u8>,
    now_ms: i64,
}

impl Probe {
    fn jobs(&self) -> impl Iterator<Item = JobSpec> + '_ {
        let sources: Vec<Option<u8>> = match self.sources {
            None => vec![None],
            s => vec![None, s],
        };
        Category::ALL
            .into_iter()
            .flat_map(|c| {
                let purposes: &[Option<usize>] = if c.needs_purpose() {
                    &[Some(0), Some(1), Some(2)]
                } else {
                    &[None, Some(0), Some(1), Some(2)]
                };
                purposes.iter().map(move |p| (c, *p))
            })
            .flat_map(move |(category, purpose)| {
                sources.clone().into_iter().map(move |sources| JobSpec {
                    account: self.account,
                    number: self.number,
                    category,
                    purpose,
                    sources,
                    now_ms: self.now_ms,
                })
            })
    }
}

#[derive(Clone, Debug)]
enum Op {
    Event(Ev),
    /// The event at this index of those generated so far, again.
    Replay(Index),
    Check(Probe),
}

fn kind_strategy(with_erase: bool) -> BoxedStrategy<Kind> {
    if with_erase {
        prop_oneof![
            5 => Just(Kind::OptIn),
            4 => Just(Kind::Confirm),
            2 => Just(Kind::OptOut),
            1 => Just(Kind::Erase),
        ]
        .boxed()
    } else {
        prop_oneof![
            5 => Just(Kind::OptIn),
            4 => Just(Kind::Confirm),
            2 => Just(Kind::OptOut),
        ]
        .boxed()
    }
}

/// Skewed to the first account and number, so that events meet often enough on one history.
fn account_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(0), 1 => Just(1)]
}

fn number_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(0), 1 => Just(1), 1 => Just(2)]
}

fn ev_strategy(with_erase: bool) -> impl Strategy<Value = Ev> {
    (
        kind_strategy(with_erase),
        account_strategy(),
        number_strategy(),
        0u8..8,
        proptest::option::of(0..SOURCES.len()),
        0..EVENT_STEPS,
        prop_oneof![Just(0i64), Just(1), Just(500), Just(999)],
    )
        .prop_map(
            |(kind, account, number, mut purposes, mut source, step, jitter)| {
                match kind {
                    // An opt-in names its purposes and its source (EventDecoder refuses it otherwise).
                    Kind::OptIn => {
                        if purposes == 0 {
                            purposes = 1 << (step as usize % PURPOSES.len());
                        }
                        source = Some(source.unwrap_or(0));
                    }
                    Kind::Erase => purposes = 0,
                    _ => {}
                }
                Ev {
                    kind,
                    account,
                    number,
                    purposes,
                    source,
                    at_ms: BASE_MS + step * STEP_MS + jitter,
                }
            },
        )
}

fn probe_strategy() -> impl Strategy<Value = Probe> {
    (
        account_strategy(),
        number_strategy(),
        proptest::option::of(0u8..8),
        0..EVENT_STEPS + 4,
        prop_oneof![Just(-1000i64), Just(0), Just(500), Just(1000), Just(1500)],
    )
        .prop_map(|(account, number, sources, step, offset)| Probe {
            account,
            number,
            sources,
            now_ms: BASE_MS + step * STEP_MS + offset,
        })
}

fn ops_strategy(with_erase: bool) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            6 => ev_strategy(with_erase).prop_map(Op::Event),
            2 => any::<Index>().prop_map(Op::Replay),
            2 => probe_strategy().prop_map(Op::Check),
        ],
        1..64,
    )
}

// ---------------------------------------------------------------------------------------------
// The reference model.

#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Allow,
    Suppress(&'static str),
}

impl Verdict {
    fn of(d: &Decision) -> Verdict {
        match d {
            Decision::Allow => Verdict::Allow,
            Decision::Suppress { reason, .. } => Verdict::Suppress(reason),
        }
    }
}

struct Oracle {
    /// The events that count, without repeats.
    events: Vec<Ev>,
    /// Per number, the latest erasure time.
    erased: [Option<i64>; NUMBERS.len()],
}

impl Oracle {
    fn new() -> Self {
        Self {
            events: Vec::new(),
            erased: [None; NUMBERS.len()],
        }
    }

    fn apply(&mut self, e: &Ev) {
        let n = e.number;
        if e.kind == Kind::Erase {
            let t = self.erased[n].map_or(e.at_ms, |t| t.max(e.at_ms));
            self.erased[n] = Some(t);
            // An erasure dated E forgets what happened up to E, whenever it arrives.
            self.events.retain(|x| x.number != n || x.at_ms > t);
            return;
        }
        if self.erased[n].is_some_and(|t| e.at_ms <= t) {
            return;
        }
        if !self.events.contains(e) {
            self.events.push(e.clone());
        }
    }

    fn decide(&self, job: &JobSpec) -> Verdict {
        if matches!(job.category, Category::Authentication | Category::Service) {
            return Verdict::Allow;
        }
        let p = job
            .purpose
            .expect("marketing and utility jobs name a purpose");
        let rule = &RULES[p];
        if !rule.categories.contains(&job.category) {
            return Verdict::Suppress("no_consent");
        }
        let mine = || {
            self.events
                .iter()
                .filter(|e| e.account == job.account && e.number == job.number)
        };
        let last_out = mine()
            .filter(|e| e.kind == Kind::OptOut && e.covers(p))
            .map(|e| e.at_ms)
            .max();
        let ins: Vec<&Ev> = mine()
            .filter(|e| e.kind == Kind::OptIn && e.names(p))
            .filter(|e| last_out.is_none_or(|o| e.at_ms > o))
            .collect();
        let Some(first_in) = ins.iter().map(|e| e.at_ms).min() else {
            return Verdict::Suppress(if last_out.is_some() {
                "opted_out"
            } else {
                "no_consent"
            });
        };
        let last_in = ins.iter().map(|e| e.at_ms).max().unwrap();
        let last_confirm = mine()
            .filter(|e| e.kind == Kind::Confirm && e.covers(p) && e.at_ms >= first_in)
            .map(|e| e.at_ms)
            .max();
        let needs_confirm = rule
            .double_opt_in
            .unwrap_or(job.category == Category::Marketing);
        if needs_confirm && last_confirm.is_none() {
            return Verdict::Suppress("no_consent");
        }
        if let Some(max) = rule.expire_after_s {
            let consented_s = last_in
                .max(last_confirm.unwrap_or(i64::MIN))
                .div_euclid(1000);
            if job.now_ms.div_euclid(1000) - consented_s > max {
                return Verdict::Suppress("consent_expired");
            }
        }
        if !ins.iter().any(|e| job.wants_source(e.source)) {
            return Verdict::Suppress("no_consent");
        }
        Verdict::Allow
    }
}

/// "An opt-out is never undone by an older event", from the arrival log alone: every opt-out
/// covering the job's purpose that arrived (and that no erasure dated at or after it forgot)
/// must be followed, in event time, by an opt-in for the purpose that arrived and was not
/// erased. Returns the opt-out it finds undone.
fn undone_opt_out<'a>(arrived: &'a [Ev], job: &JobSpec) -> Option<&'a Ev> {
    if !job.category.needs_purpose() {
        return None;
    }
    let p = job.purpose?;
    let erased = |e: &Ev| {
        arrived
            .iter()
            .any(|x| x.kind == Kind::Erase && x.number == e.number && x.at_ms >= e.at_ms)
    };
    let mine = || {
        arrived
            .iter()
            .filter(|e| e.account == job.account && e.number == job.number && !erased(e))
    };
    mine()
        .filter(|o| o.kind == Kind::OptOut && o.covers(p))
        .find(|o| !mine().any(|i| i.kind == Kind::OptIn && i.names(p) && i.at_ms > o.at_ms))
}

// ---------------------------------------------------------------------------------------------
// Runners.

fn block_on<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

struct Checks {
    /// Implementation and oracle must agree exactly (decision and reason).
    exact: bool,
    /// Check [`undone_opt_out`] on every allowed job.
    opt_out_property: bool,
}

/// Plays `ops` against a fresh store and the oracle, checking every job.
async fn play(ops: &[Op], checks: Checks) -> Result<(), TestCaseError> {
    let store = new_store().await;
    let mut oracle = Oracle::new();
    let mut arrived: Vec<Ev> = Vec::new();
    let mut generated: Vec<Ev> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        let ev = match op {
            Op::Event(e) => Some(e.clone()),
            Op::Replay(i) if !generated.is_empty() => Some(i.get(&generated).clone()),
            Op::Replay(_) => None,
            Op::Check(probe) => {
                for job in probe.jobs() {
                    let got = Verdict::of(&store.check(job.job(), job.now()));
                    let want = oracle.decide(&job);
                    let what = || format!("at op {step}: {job:?}\nevents so far: {arrived:#?}");
                    if got == Verdict::Allow {
                        prop_assert_eq!(
                            &want,
                            &Verdict::Allow,
                            "allowed without the consent the rules demand {}",
                            what()
                        );
                        if checks.opt_out_property
                            && let Some(o) = undone_opt_out(&arrived, &job)
                        {
                            prop_assert!(
                                false,
                                "opt-out {o:?} undone by an older event {}",
                                what()
                            );
                        }
                    }
                    if checks.exact && got != want {
                        prop_assert_eq!(&got, &want, "{}", what());
                    }
                }
                None
            }
        };
        if let Some(e) = ev {
            if matches!(op, Op::Event(_)) {
                generated.push(e.clone());
            }
            store.apply(&e.to_event()).await.unwrap();
            oracle.apply(&e);
            arrived.push(e);
        }
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        // Every case starts a store (and its writer thread); shrinking stays bounded.
        max_shrink_iters: 4096,
        // Minimal cases are reported in the failure message; no files next to the tests.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every (account, number, category, purpose, sources, now) worth asking after a history.
fn job_grid() -> Vec<JobSpec> {
    let mut out = Vec::new();
    for account in 0..ACCOUNTS.len() {
        for number in 0..NUMBERS.len() {
            for sources in [None, Some(0b001), Some(0b110)] {
                for now_step in [0, 3, EVENT_STEPS, EVENT_STEPS + 2] {
                    let probe = Probe {
                        account,
                        number,
                        sources,
                        now_ms: BASE_MS + now_step * STEP_MS + 500,
                    };
                    out.extend(probe.jobs());
                }
            }
        }
    }
    out
}

async fn decisions_after(events: &[Ev]) -> (Vec<(JobSpec, Verdict)>, Vec<String>) {
    let store = new_store().await;
    for e in events {
        store.apply(&e.to_event()).await.unwrap();
    }
    let verdicts = job_grid()
        .iter()
        .map(|spec| {
            (
                spec.clone(),
                Verdict::of(&store.check(spec.job(), spec.now())),
            )
        })
        .collect();
    let mut summaries = Vec::new();
    for n in NUMBERS {
        for a in ACCOUNTS {
            summaries.push(format!(
                "{n} {a}: {:?}",
                store.summary(&n[1..], a).await.unwrap()
            ));
        }
    }
    (verdicts, summaries)
}

fn shuffled(with_erase: bool) -> impl Strategy<Value = (Vec<Ev>, Vec<Ev>)> {
    proptest::collection::vec(ev_strategy(with_erase), 1..32).prop_flat_map(|evs| {
        // Some events twice: replays, possibly far apart in the other order.
        let mut with_replays = evs.clone();
        with_replays.extend(evs.iter().step_by(3).cloned());
        (
            Just(with_replays.clone()),
            Just(with_replays).prop_shuffle(),
        )
    })
}

async fn same_decisions(a: &[Ev], b: &[Ev]) -> Result<(), TestCaseError> {
    let (va, sa) = decisions_after(a).await;
    let (vb, sb) = decisions_after(b).await;
    prop_assert_eq!(sa, sb, "summaries differ");
    for ((job, x), (_, y)) in va.iter().zip(&vb) {
        prop_assert_eq!(x, y, "decision differs for {:?}", job);
    }
    Ok(())
}

/// Applies `evs`, then again (the whole sequence, then each event alone when `each`): no byte of
/// the store may change, and a repeated consent event is a `Replay` (or `Void`).
async fn replay_changes_nothing(evs: &[Ev], each: bool) -> Result<(), TestCaseError> {
    let store = new_store().await;
    for e in evs {
        store.apply(&e.to_event()).await.unwrap();
    }
    let once = store.ledger.dump_all().await.unwrap();
    for e in evs {
        store.apply(&e.to_event()).await.unwrap();
    }
    prop_assert_eq!(
        &once,
        &store.ledger.dump_all().await.unwrap(),
        "the whole sequence again"
    );
    if each {
        for e in evs {
            let applied = store.apply(&e.to_event()).await.unwrap();
            if e.kind != Kind::Erase {
                prop_assert!(
                    matches!(applied, Applied::Replay | Applied::Void),
                    "{e:?} again: {applied:?}"
                );
            }
            prop_assert_eq!(
                &once,
                &store.ledger.dump_all().await.unwrap(),
                "{:?} again",
                e
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Without erasures: every decision is the oracle's, reason included; nothing is allowed
    /// that the rules forbid; no opt-out is undone by an older event.
    #[test]
    fn decisions_follow_the_rules(ops in ops_strategy(false)) {
        block_on(play(&ops, Checks { exact: true, opt_out_property: true }))?;
    }

    /// With erasures (each counting by its own time, however late or often it arrives): every
    /// decision is the oracle's, nothing is allowed that the rules forbid, and no opt-out is
    /// undone by an older event, whatever order events arrive in.
    #[test]
    fn erasures_never_bring_back_consent(ops in ops_strategy(true)) {
        block_on(play(&ops, Checks { exact: true, opt_out_property: true }))?;
    }

    /// The same events (replays included) in another order: the same summaries and decisions.
    #[test]
    fn arrival_order_does_not_matter((a, b) in shuffled(false)) {
        block_on(same_decisions(&a, &b))?;
    }

    /// Also with erasures in the mix.
    #[test]
    fn arrival_order_does_not_matter_with_erasures((a, b) in shuffled(true)) {
        block_on(same_decisions(&a, &b))?;
    }

    /// Replaying the whole sequence, or any one event of it, changes no byte of the store.
    #[test]
    fn replaying_changes_nothing(evs in proptest::collection::vec(ev_strategy(false), 1..24)) {
        block_on(replay_changes_nothing(&evs, true))?;
    }

    /// With erasures: replaying the whole sequence changes no byte of the store.
    #[test]
    fn replaying_a_sequence_with_erasures_changes_nothing(
        evs in proptest::collection::vec(ev_strategy(true), 1..24),
    ) {
        block_on(replay_changes_nothing(&evs, false))?;
    }

    /// With erasures: replaying any one event (an erasure too) changes no byte of the store.
    #[test]
    fn replaying_any_event_after_erasures_changes_nothing(
        evs in proptest::collection::vec(ev_strategy(true), 1..24),
    ) {
        block_on(replay_changes_nothing(&evs, true))?;
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed cases.

fn ev(kind: Kind, purposes: u8, step: i64) -> Ev {
    Ev {
        kind,
        account: 0,
        number: 0,
        purposes,
        source: (kind == Kind::OptIn).then_some(0),
        at_ms: BASE_MS + step * STEP_MS,
    }
}

fn job(category: Category, purpose: usize, now_step: i64) -> JobSpec {
    JobSpec {
        account: 0,
        number: 0,
        category,
        purpose: Some(purpose),
        sources: None,
        now_ms: BASE_MS + now_step * STEP_MS,
    }
}

#[test]
fn replaying_the_same_events_leaves_the_store_byte_for_byte_identical() {
    block_on(async {
        let events = [
            ev(Kind::OptIn, 0b011, 1),
            ev(Kind::Confirm, 0, 2),
            ev(Kind::OptOut, 0b010, 3),
            ev(Kind::OptIn, 0b100, 0),
            Ev {
                number: 1,
                account: 1,
                ..ev(Kind::OptIn, 0b001, 2)
            },
            Ev {
                number: 2,
                ..ev(Kind::Erase, 0, 4)
            },
        ];
        let store = new_store().await;
        for e in &events {
            assert_eq!(
                store.apply(&e.to_event()).await.unwrap(),
                match e.kind {
                    Kind::Erase => Applied::Erased,
                    _ => Applied::New,
                }
            );
        }
        let once = store.ledger.dump_all().await.unwrap();
        for e in &events {
            store.apply(&e.to_event()).await.unwrap();
        }
        assert_eq!(once, store.ledger.dump_all().await.unwrap());
    });
}

async fn verdict_after(events: &[Ev], spec: &JobSpec) -> Verdict {
    let store = new_store().await;
    for e in events {
        store.apply(&e.to_event()).await.unwrap();
    }
    Verdict::of(&store.check(spec.job(), spec.now()))
}

/// Minimal case of `erasures_never_bring_back_consent`: a STOP (opt-out at t3) is forgotten by
/// an erasure dated before it (t1) that arrives after it, and an opt-in dated between them
/// (t2, older than the STOP) then brings consent back. `ConsentStore::erase` deletes the whole
/// history whatever its dates, while its tombstone only voids events dated up to t1.
#[test]
fn an_erasure_arriving_late_does_not_undo_a_later_opt_out() {
    block_on(async {
        let stop = ev(Kind::OptOut, 0, 3);
        let erase = ev(Kind::Erase, 0, 1);
        let opt_in = ev(Kind::OptIn, 0b010, 2);
        let utility = job(Category::Utility, 1, 3);
        // The same events in event-time order: opted out.
        let in_order = [erase.clone(), opt_in.clone(), stop.clone()];
        assert_eq!(
            verdict_after(&in_order, &utility).await,
            Verdict::Suppress("opted_out")
        );
        // Opt-out, then the older erasure, then the older opt-in: allowed.
        let late_erase = [stop, erase, opt_in];
        assert_eq!(
            verdict_after(&late_erase, &utility).await,
            Verdict::Suppress("opted_out"),
            "opt_out(all)@t3, erase@t1, opt_in(orders)@t2 → utility/orders"
        );
    });
}

/// The same bug through at-least-once delivery: a redelivered erasure wipes a STOP received
/// after it, and a redelivered opt-in (older than the STOP) brings consent back.
#[test]
fn a_redelivered_erasure_does_not_undo_a_later_opt_out() {
    block_on(async {
        let erase = ev(Kind::Erase, 0, 0);
        let opt_in = ev(Kind::OptIn, 0b010, 1);
        let stop = ev(Kind::OptOut, 0, 2);
        let events = [erase.clone(), opt_in.clone(), stop, erase, opt_in];
        assert_eq!(
            verdict_after(&events, &job(Category::Utility, 1, 2)).await,
            Verdict::Suppress("opted_out"),
            "erase@t0, opt_in(orders)@t1, opt_out(all)@t2, erase@t0 again, opt_in@t1 again"
        );
    });
}

/// Reason only (both suppress): a global opt-out older than an opt-in for *another* purpose is
/// still the latest word on a purpose no event names, but `summarize` drops its `*` entry once
/// any purpose has a newer opt-in, so the job is reported `no_consent`, not `opted_out`.
#[test]
fn a_global_opt_out_is_reported_as_opted_out_for_a_purpose_never_named() {
    block_on(async {
        let events = [ev(Kind::OptOut, 0, 0), ev(Kind::OptIn, 0b010, 1)];
        assert_eq!(
            verdict_after(&events, &job(Category::Marketing, 0, 1)).await,
            Verdict::Suppress("opted_out"),
            "opt_out(all)@t0, opt_in(orders)@t1 → marketing/news"
        );
    });
}

#[test]
fn the_oracle_knows_the_basics() {
    // Sanity of the reference model itself, against the rules text.
    let mut o = Oracle::new();
    o.apply(&ev(Kind::OptIn, 0b111, 1));
    assert_eq!(
        o.decide(&job(Category::Marketing, 0, 1)),
        Verdict::Suppress("no_consent")
    );
    assert_eq!(o.decide(&job(Category::Utility, 1, 1)), Verdict::Allow);
    assert_eq!(
        o.decide(&job(Category::Utility, 0, 1)),
        Verdict::Suppress("no_consent")
    );
    assert_eq!(o.decide(&job(Category::Marketing, 2, 1)), Verdict::Allow);
    assert_eq!(
        o.decide(&job(Category::Marketing, 2, 4)),
        Verdict::Suppress("consent_expired")
    );
    o.apply(&ev(Kind::Confirm, 0, 1));
    assert_eq!(o.decide(&job(Category::Marketing, 0, 1)), Verdict::Allow);
    o.apply(&ev(Kind::OptOut, 0b001, 1));
    assert_eq!(
        o.decide(&job(Category::Marketing, 0, 1)),
        Verdict::Suppress("opted_out")
    );
    assert_eq!(o.decide(&job(Category::Marketing, 1, 1)), Verdict::Allow);
    o.apply(&ev(Kind::OptIn, 0b001, 0));
    assert_eq!(
        o.decide(&job(Category::Marketing, 0, 1)),
        Verdict::Suppress("opted_out")
    );
    o.apply(&ev(Kind::Erase, 0, 1));
    assert_eq!(
        o.decide(&job(Category::Utility, 1, 1)),
        Verdict::Suppress("no_consent")
    );
    o.apply(&ev(Kind::OptIn, 0b010, 1));
    assert_eq!(
        o.decide(&job(Category::Utility, 1, 1)),
        Verdict::Suppress("no_consent")
    );
    o.apply(&ev(Kind::OptIn, 0b010, 2));
    assert_eq!(o.decide(&job(Category::Utility, 1, 1)), Verdict::Allow);
    o.apply(&ev(Kind::OptOut, 0, 2));
    assert_eq!(
        o.decide(&job(Category::Utility, 1, 1)),
        Verdict::Suppress("opted_out")
    );
}
