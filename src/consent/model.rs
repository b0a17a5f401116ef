//! What consent history adds up to, and the rule every job passes: two pure functions.
//!
//! [`summarize`] folds a number's events (for one account) into one [`PurposeState`] per
//! purpose. It depends only on the *set* of events, never on their arrival order: each event
//! counts by its own `at`, so an old event arriving late cannot override a newer one, and a
//! replay changes nothing. [`decide`] answers for one job from that state, the job and the time.

use std::collections::{BTreeMap, BTreeSet};

use super::event::Kind;
use crate::config::Purpose;
use crate::job::Category;

/// The purpose slot of "every purpose": a global opt-out.
pub const ALL: &str = "*";

pub const OPTED_IN: u8 = 1;
pub const CONFIRMED: u8 = 2;
/// The purpose's latest opt-out is newer than every opt-in for it.
pub const OPTED_OUT: u8 = 4;

/// One event as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fact {
    pub at_ms: i64,
    pub kind: Kind,
    /// Empty: every purpose.
    pub purposes: Vec<String>,
    pub source: Option<String>,
}

impl Fact {
    fn covers(&self, p: &str) -> bool {
        self.purposes.is_empty() || self.purposes.iter().any(|x| x == p)
    }
}

/// What the history says about one purpose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PurposeState {
    pub flags: u8,
    /// Unix seconds of the last opt-in or confirmation that counts (consent expiry runs from
    /// it); 0 when there is none.
    pub consented_at: u32,
    /// Where the opt-ins that count came from (`opt_in_sources` segmentation).
    pub sources: BTreeSet<String>,
}

impl PurposeState {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Per purpose (and [`ALL`] for a global opt-out), what the events add up to.
///
/// For purpose `p`: let `O` be the newest opt-out covering `p` (a global one covers every
/// purpose). Opt-ins for `p` dated after `O` count; an opt-out wins a tie, so consent is never
/// assumed when two events are equally recent. The purpose is confirmed when a confirm covering
/// it is dated no earlier than the first opt-in that counts. Purposes no event names explicitly
/// get no entry: an unknown purpose has no consent.
pub fn summarize(facts: &[Fact]) -> BTreeMap<String, PurposeState> {
    let mut named: BTreeSet<&str> = BTreeSet::new();
    for f in facts {
        if f.kind != Kind::Erase {
            named.extend(f.purposes.iter().map(String::as_str));
        }
    }
    let mut out = BTreeMap::new();
    let newest_out = |p: Option<&str>| {
        facts
            .iter()
            .filter(|f| f.kind == Kind::OptOut && p.is_none_or(|p| f.covers(p)))
            .filter(|f| p.is_some() || f.purposes.is_empty())
            .map(|f| f.at_ms)
            .max()
    };
    for p in named {
        let out_at = newest_out(Some(p));
        let ins: Vec<&Fact> = facts
            .iter()
            .filter(|f| f.kind == Kind::OptIn && f.covers(p))
            .filter(|f| out_at.is_none_or(|o| f.at_ms > o))
            .collect();
        let mut st = PurposeState::default();
        if let (Some(first), Some(last)) = (
            ins.iter().map(|f| f.at_ms).min(),
            ins.iter().map(|f| f.at_ms).max(),
        ) {
            st.flags |= OPTED_IN;
            st.sources = ins.iter().filter_map(|f| f.source.clone()).collect();
            let confirmed = facts
                .iter()
                .filter(|f| f.kind == Kind::Confirm && f.covers(p) && f.at_ms >= first)
                .map(|f| f.at_ms)
                .max();
            if confirmed.is_some() {
                st.flags |= CONFIRMED;
            }
            st.consented_at = secs(last.max(confirmed.unwrap_or(i64::MIN)));
        } else if out_at.is_some() {
            st.flags |= OPTED_OUT;
        } else {
            // Named only by a stray confirm: nothing to keep.
            continue;
        }
        out.insert(p.to_string(), st);
    }
    // Kept whenever the number opted out of everything, so a job for a purpose it never named
    // is told `opted_out`, not `no_consent`; purposes opted into since have their own entries.
    if newest_out(None).is_some() {
        out.insert(
            ALL.to_string(),
            PurposeState {
                flags: OPTED_OUT,
                ..Default::default()
            },
        );
    }
    out
}

fn secs(ms: i64) -> u32 {
    (ms.div_euclid(1000)).clamp(0, u32::MAX as i64) as u32
}

/// The consent the cache found for one job: the state of the job's purpose and whether the
/// number opted out of everything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Found {
    pub flags: Option<u8>,
    pub consented_at: u32,
    pub globally_opted_out: bool,
    /// The job names `opt_in_sources` and one of them matches an opt-in that counts (true
    /// when the job names none).
    pub source_matches: bool,
}

/// What the job needs to know about itself.
#[derive(Clone, Copy, Debug)]
pub struct JobFacts<'a> {
    pub category: Category,
    pub purpose: Option<&'a str>,
    pub has_source_filter: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Suppress {
        reason: &'static str,
        detail: String,
    },
}

fn suppress(reason: &'static str, detail: String) -> Decision {
    Decision::Suppress { reason, detail }
}

/// The rule (CONTRACT §4, per purpose as configured). `rule` is the job's purpose; `now` in
/// unix seconds.
pub fn decide(found: &Found, job: &JobFacts, rule: Option<&Purpose>, now: i64) -> Decision {
    if !job.category.needs_purpose() {
        // Authentication and service messages need no marketing consent, opted out or not.
        return Decision::Allow;
    }
    let (Some(purpose), Some(rule)) = (job.purpose, rule) else {
        return suppress("no_consent", "the job names no configured purpose".into());
    };
    if !rule.categories.contains(&job.category) {
        return suppress(
            "no_consent",
            format!(
                "consent for {purpose} does not cover {} messages",
                job.category
            ),
        );
    }
    let flags = match found.flags {
        Some(f) if f & OPTED_IN != 0 => f,
        Some(f) if f & OPTED_OUT != 0 => {
            return suppress("opted_out", format!("the recipient opted out of {purpose}"));
        }
        _ if found.globally_opted_out => {
            return suppress(
                "opted_out",
                "the recipient opted out of every purpose".into(),
            );
        }
        _ => {
            return suppress("no_consent", format!("no opt-in for {purpose}"));
        }
    };
    if rule.needs_confirmation(job.category) && flags & CONFIRMED == 0 {
        return suppress(
            "no_consent",
            format!("the opt-in for {purpose} is not confirmed (double opt-in pending)"),
        );
    }
    if let Some(max) = rule.expire_after
        && now - found.consented_at as i64 > max.as_secs() as i64
    {
        return suppress(
            "consent_expired",
            format!(
                "consent for {purpose} is older than {}: ask again",
                humantime::format_duration(max)
            ),
        );
    }
    if job.has_source_filter && !found.source_matches {
        return suppress(
            "no_consent",
            format!("no opt-in for {purpose} from one of the job's opt_in_sources"),
        );
    }
    Decision::Allow
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(at_ms: i64, kind: Kind, purposes: &[&str]) -> Fact {
        Fact {
            at_ms,
            kind,
            purposes: purposes.iter().map(|s| s.to_string()).collect(),
            source: Some("web".into()),
        }
    }

    #[test]
    fn confirmed_opt_in_then_later_opt_out_then_older_opt_in() {
        let mut facts = vec![f(1000, Kind::OptIn, &["news"]), f(2000, Kind::Confirm, &[])];
        assert_eq!(summarize(&facts)["news"].flags, OPTED_IN | CONFIRMED);
        facts.push(f(3000, Kind::OptOut, &[]));
        // A late opt-in dated before the opt-out does not undo it.
        facts.push(f(2500, Kind::OptIn, &["news"]));
        let s = summarize(&facts);
        assert_eq!(s["news"].flags, OPTED_OUT);
        assert!(s.contains_key(ALL));
        // A newer opt-in starts over, unconfirmed.
        facts.push(f(4000, Kind::OptIn, &["news"]));
        let s = summarize(&facts);
        assert_eq!(s["news"].flags, OPTED_IN);
        assert_eq!(s[ALL].flags, OPTED_OUT);
    }

    #[test]
    fn an_opt_out_wins_a_tie() {
        let s = summarize(&[f(1000, Kind::OptIn, &["a"]), f(1000, Kind::OptOut, &["a"])]);
        assert_eq!(s["a"].flags, OPTED_OUT);
    }

    fn purpose(categories: &[Category], double: Option<bool>, expire_days: Option<u64>) -> Purpose {
        Purpose {
            name: "p".into(),
            description: None,
            categories: categories.to_vec(),
            double_opt_in: double,
            expire_after: expire_days.map(|d| std::time::Duration::from_secs(d * 86400)),
        }
    }

    fn job(category: Category) -> JobFacts<'static> {
        JobFacts {
            category,
            purpose: Some("p"),
            has_source_filter: false,
        }
    }

    fn found(flags: u8, at: u32) -> Found {
        Found {
            flags: Some(flags),
            consented_at: at,
            globally_opted_out: false,
            source_matches: true,
        }
    }

    fn reason(d: Decision) -> &'static str {
        match d {
            Decision::Allow => "allow",
            Decision::Suppress { reason, .. } => reason,
        }
    }

    #[test]
    fn the_contract_rules_per_category() {
        let both = purpose(&[Category::Marketing, Category::Utility], None, None);
        let opted_in = found(OPTED_IN, 0);
        let confirmed = found(OPTED_IN | CONFIRMED, 0);
        assert_eq!(
            reason(decide(&opted_in, &job(Category::Marketing), Some(&both), 0)),
            "no_consent"
        );
        assert_eq!(
            reason(decide(
                &confirmed,
                &job(Category::Marketing),
                Some(&both),
                0
            )),
            "allow"
        );
        assert_eq!(
            reason(decide(&opted_in, &job(Category::Utility), Some(&both), 0)),
            "allow"
        );
        let nothing = Found::default();
        assert_eq!(
            reason(decide(&nothing, &job(Category::Utility), Some(&both), 0)),
            "no_consent"
        );
        let out = found(OPTED_OUT, 0);
        assert_eq!(
            reason(decide(&out, &job(Category::Utility), Some(&both), 0)),
            "opted_out"
        );
        let global = Found {
            globally_opted_out: true,
            ..Found::default()
        };
        assert_eq!(
            reason(decide(&global, &job(Category::Marketing), Some(&both), 0)),
            "opted_out"
        );
        // Authentication and service need no marketing consent, even after an opt-out.
        assert_eq!(
            reason(decide(&out, &job(Category::Authentication), None, 0)),
            "allow"
        );
        assert_eq!(
            reason(decide(&global, &job(Category::Service), None, 0)),
            "allow"
        );
    }

    #[test]
    fn per_purpose_rules_categories_and_expiry() {
        let single = purpose(&[Category::Marketing], Some(false), Some(30));
        let opted_in = found(OPTED_IN, 1_000_000);
        let day = 86400;
        assert_eq!(
            reason(decide(
                &opted_in,
                &job(Category::Marketing),
                Some(&single),
                1_000_000 + 29 * day
            )),
            "allow"
        );
        assert_eq!(
            reason(decide(
                &opted_in,
                &job(Category::Marketing),
                Some(&single),
                1_000_000 + 31 * day
            )),
            "consent_expired"
        );
        // This purpose does not cover utility messages.
        assert_eq!(
            reason(decide(
                &opted_in,
                &job(Category::Utility),
                Some(&single),
                1_000_000
            )),
            "no_consent"
        );
        let strict = purpose(&[Category::Utility], Some(true), None);
        assert_eq!(
            reason(decide(&opted_in, &job(Category::Utility), Some(&strict), 0)),
            "no_consent"
        );
        let filtered = JobFacts {
            has_source_filter: true,
            ..job(Category::Marketing)
        };
        let wrong_source = Found {
            source_matches: false,
            ..opted_in
        };
        assert_eq!(
            reason(decide(&wrong_source, &filtered, Some(&single), 1_000_000)),
            "no_consent"
        );
    }
}
