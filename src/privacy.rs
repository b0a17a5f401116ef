//! Phone numbers are personal data: logs show them masked unless the operator turns masking off.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

static MASK_NUMBERS: AtomicBool = AtomicBool::new(true);

/// Set once at start-up from `log.mask_numbers`.
pub fn set_masking(on: bool) {
    MASK_NUMBERS.store(on, Ordering::Relaxed);
}

/// Displays a number as `+49170****567` (keeps the country code and a little of each end, so an
/// operator can still tell two numbers apart in a log without learning either).
pub struct Masked<'a>(pub &'a str);

impl fmt::Display for Masked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !MASK_NUMBERS.load(Ordering::Relaxed) {
            return f.write_str(self.0);
        }
        let s = self.0;
        let n = s.chars().count();
        if n <= 7 {
            return f.write_str("****");
        }
        let head: String = s.chars().take(6).collect();
        let tail: String = s.chars().skip(n - 3).collect();
        write!(f, "{head}****{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_number_is_masked_in_the_middle() {
        assert_eq!(Masked("+491701234567").to_string(), "+49170****567");
        assert_eq!(Masked("+4912").to_string(), "****");
    }
}
