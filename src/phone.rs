//! Phone numbers: E.164 parsing and the country calling code. A leaf (it knows no config, no
//! store, no pipeline), so that the job decoder, consent events, the consent flow, webhooks and
//! the tools all check a number the same way without importing one another.

use crate::job::Recipient;

/// E.164: `+`, 8 to 15 digits, and a country calling code that exists. The country code is
/// looked up in libphonenumber's metadata (the `phonenumber` crate). Number-plan validity inside
/// a country is left to Meta, because metadata lags new number ranges and a false refusal loses
/// a message that a customer asked for.
pub fn parse_e164(s: &str) -> Result<Recipient, String> {
    let Some(digits) = s.strip_prefix('+') else {
        return Err("number must start with + and the country code (E.164)".into());
    };
    if !(8..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("number must be + followed by 8 to 15 digits (E.164)".into());
    }
    // No calling code starts with 0; read as a number, `+049…` would pass for `+49…`.
    if digits.starts_with('0') {
        return Err("number must not start with 0 after the + (E.164: the country code)".into());
    }
    let db = &*phonenumber::metadata::DATABASE;
    for len in 1..=3 {
        // Invariant: digits are ASCII digits and len <= 3, so this parses.
        let code: u16 = digits[..len].parse().unwrap_or(0);
        if let Some(regions) = db.region(&code)
            && let Some(first) = regions.first()
        {
            return Ok(Recipient::new(s.into(), first));
        }
    }
    Err(format!(
        "{} has no valid country calling code",
        crate::privacy::Masked(s)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164_numbers_are_checked_by_country_code() {
        assert_eq!(parse_e164("+491701234567").unwrap().region(), "DE");
        assert_eq!(parse_e164("+358401234567").unwrap().region(), "FI");
        assert_eq!(parse_e164("+14155550123").unwrap().region(), "US");
        assert!(parse_e164("491701234567").is_err());
        assert!(parse_e164("+49 170 1234567").is_err());
        assert!(parse_e164("+4917").is_err());
        assert!(parse_e164("+1234567890123456").is_err());
        // 999 is not assigned to any country.
        assert!(parse_e164("+99912345678").is_err());
        // A trunk 0 is not a calling code.
        assert!(parse_e164("+0491701234567").is_err());
        assert!(parse_e164("+01415555012").is_err());
    }
}
