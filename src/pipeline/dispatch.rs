//! Stage 5: send to the Cloud API with retries. Short waits happen here; long ones become a
//! deferral through a delay queue so no prefetch slot is held for minutes.

use std::time::Duration;

use rand::Rng;

use crate::cloud_api::FailureClass;
use crate::config::RetryConfig;

/// How long to wait before attempt `attempts + 1`, given the failure of attempt `attempts`
/// (1-based). Exponential backoff with full jitter (AWS architecture blog's "full jitter"):
/// spreads a thundering herd of retries evenly instead of synchronising them. A server's
/// `Retry-After` is honoured but clamped to the configured bounds, as linkerd clamps its
/// backoffs. A recipient-pair limit (131056) waits 4^X seconds as Meta asks.
pub fn retry_delay(
    policy: &RetryConfig,
    class: FailureClass,
    attempts: u32,
    retry_after: Option<Duration>,
    rng: &mut impl Rng,
) -> Duration {
    let exp = attempts.saturating_sub(1).min(20);
    if class == FailureClass::PairLimited {
        let secs = 4u64.saturating_pow(exp);
        return Duration::from_secs(secs).min(policy.max_delay);
    }
    if let Some(ra) = retry_after {
        return ra.clamp(policy.base_delay, policy.max_delay);
    }
    let cap = policy
        .base_delay
        .saturating_mul(1u32 << exp.min(16))
        .min(policy.max_delay);
    let ms = cap.as_millis() as u64;
    // At least a tenth of the base, so a zero draw does not hammer the API.
    let floor = (policy.base_delay.as_millis() as u64 / 10).max(1);
    Duration::from_millis(rng.random_range(floor..=ms.max(floor)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn policy() -> RetryConfig {
        RetryConfig {
            max_attempts: 8,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
            inline_max_delay: Duration::from_secs(2),
            account_pause_probe: Duration::from_secs(30),
            resend_ambiguous: [false, true, true, true],
        }
    }

    #[test]
    fn full_jitter_stays_within_the_exponential_cap() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 1..12 {
            let cap = (p.base_delay * 2u32.pow(attempt - 1)).min(p.max_delay);
            for _ in 0..200 {
                let d = retry_delay(&p, FailureClass::Retryable, attempt, None, &mut rng);
                assert!(
                    d <= cap && d >= Duration::from_millis(50),
                    "{d:?} > {cap:?}"
                );
            }
        }
    }

    #[test]
    fn retry_after_is_honoured_within_bounds() {
        let p = policy();
        let rng = rand::rngs::StdRng::seed_from_u64(7);
        let d = |ra| retry_delay(&p, FailureClass::Retryable, 1, Some(ra), &mut rng.clone());
        assert_eq!(d(Duration::from_secs(5)), Duration::from_secs(5));
        assert_eq!(d(Duration::from_secs(3600)), p.max_delay);
        assert_eq!(d(Duration::ZERO), p.base_delay);
    }

    #[test]
    fn pair_limit_waits_four_to_the_x_seconds() {
        let p = policy();
        let rng = rand::rngs::StdRng::seed_from_u64(7);
        let d = |n| retry_delay(&p, FailureClass::PairLimited, n, None, &mut rng.clone());
        assert_eq!(d(1), Duration::from_secs(1));
        assert_eq!(d(2), Duration::from_secs(4));
        assert_eq!(d(3), Duration::from_secs(16));
        assert_eq!(d(9), p.max_delay);
    }
}
