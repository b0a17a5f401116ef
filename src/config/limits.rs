//! The config types of the limits (`[[caps]]`, `[[portfolios]]`, an account's `burst`), with
//! their validation. They live here, below the data path, so that the limiters in
//! `pipeline::limits` import the config and never the other way round.

use std::collections::HashSet;

use crate::job::Category;

/// "No limit" (Meta's `UNLIMITED`, or a portfolio without a configured tier).
pub const UNLIMITED: u32 = u32::MAX;

/// The default burst: a tenth of the rate, at least 2. At least 2 because a waiter that wakes a
/// timer tick late would otherwise lose that tick for good (GCRA with burst 1 has no slack), and
/// at 200 msg/s a 1 ms tick is a fifth of the interval.
pub fn default_burst(mps: u32) -> u32 {
    (mps / 10).max(2)
}

/// Largest `max` a rule may have (config validation uses it).
pub const MAX_PER_RULE: u8 = 8;

/// Most distinct (scope, name, category) logs a configuration may define: their id has to fit
/// the 14 bits above the number in the caps' in-memory key (`pipeline::limits::caps` asserts
/// that the two agree).
pub const MAX_SCOPES: usize = 1 << 14;

/// At most `max` sends in any window of `per_secs` seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CapRule {
    /// 1..=[`MAX_PER_RULE`].
    pub max: u8,
    /// At least 1.
    pub per_secs: u32,
}

/// Whose sends a cap counts together: one account's, or every account of one brand's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CapScope {
    Account,
    Brand,
}

/// What happens to a job a cap holds back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OnExceed {
    /// Dropped (outcome `suppressed`): a late marketing message is usually worse than none.
    Suppress,
    /// Sent when the cap allows it again (delay queue).
    Defer,
}

/// One `[[caps]]` entry of the config (config validation guarantees: rules non-empty, at most
/// one entry per (category, scope); see [`validate_caps`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapConfig {
    pub category: Category,
    pub scope: CapScope,
    pub rules: Vec<CapRule>,
    pub on_exceed: OnExceed,
}

/// Checks what `Caps::new` relies on; `accounts`: (account name, brand name) of every
/// configured account. Config validation calls it and refuses to start on `Err` (the message
/// names the offending entry).
pub fn validate_caps(caps: &[CapConfig], accounts: &[(&str, &str)]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for c in caps {
        let what = format!("{} cap ({:?} scope)", c.category.as_str(), c.scope);
        if !seen.insert((c.category, c.scope)) {
            return Err(format!("{what} is configured twice"));
        }
        if c.rules.is_empty() {
            return Err(format!("{what} has no rules"));
        }
        for r in &c.rules {
            if r.max == 0 || r.max > MAX_PER_RULE {
                return Err(format!(
                    "{what}: max must be 1..={MAX_PER_RULE}, not {}",
                    r.max
                ));
            }
            if r.per_secs == 0 {
                return Err(format!("{what}: the window must be at least 1 second"));
            }
        }
    }
    let scopes: usize = caps
        .iter()
        .map(|c| {
            let names: HashSet<&str> = accounts
                .iter()
                .map(|&(a, b)| match c.scope {
                    CapScope::Account => a,
                    CapScope::Brand => b,
                })
                .collect();
            names.len()
        })
        .sum();
    if scopes > MAX_SCOPES {
        return Err(format!(
            "caps × accounts/brands make {scopes} separate logs, at most {MAX_SCOPES} are supported"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_burst_is_a_tenth_and_at_least_two() {
        assert_eq!(default_burst(1), 2);
        assert_eq!(default_burst(80), 8);
        assert_eq!(default_burst(1000), 100);
    }
}
