//! WhatsApp IDs are not always phone numbers. Meta's webhooks name the customer by their
//! WhatsApp ID (`recipient_id`, `from`, `wa_id`), while jobs, consent and limits use the E.164
//! number upstream gave. Mostly the two are the same digits; where they differ in practice:
//!
//! - **Brazil**: mobiles gained a ninth digit (+55 AA 9XXXX-XXXX), but many accounts registered
//!   before keep an ID without it (`55AAXXXXXXXX`);
//! - **Mexico**: IDs carry `521` + 10 digits where E.164 has `52` + 10 digits.
//!
//! So sendwell keeps a map ID → number, learned from each send's answer (`contacts[].wa_id` next
//! to the number sent), in the store (`wa_ids_v1`, keyed `number\0id` like every per-number row,
//! so an erasure removes it with the number) and in memory (loaded at start, written through),
//! so resolving an event does no I/O. An ID the map does not know is tried against the numbers
//! sendwell knows (consent and sends) in its documented equivalent forms ([`equivalents`]).

use std::collections::HashMap;
use std::sync::RwLock;

/// How an ID was turned into a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// A send to the number was answered with this ID.
    Mapped,
    /// The ID's digits are a number sendwell knows.
    Same,
    /// An equivalent form of the ID (Brazil's ninth digit, Mexico's `1`) is a known number.
    Equivalent,
    /// Known by nobody: the ID's own digits, as given.
    Unknown,
}

impl How {
    pub fn as_str(self) -> &'static str {
        match self {
            How::Mapped => "mapped",
            How::Same => "same",
            How::Equivalent => "equivalent",
            How::Unknown => "unknown",
        }
    }
}

/// A number found for an ID: digits, no `+`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub digits: String,
    pub how: How,
}

/// The other forms the same WhatsApp user's number may take (digits, no `+`), by Meta's
/// documented differences; empty for every other country.
///
/// - `55 AA 9 XXXXXXXX` ↔ `55 AA XXXXXXXX`, where the eight digits are a mobile's (first digit
///   6–9, the ranges mobiles had before the ninth digit); landlines (2–5) are never rewritten.
/// - `52 1 XXXXXXXXXX` ↔ `52 XXXXXXXXXX` (no Mexican national number starts with 1).
pub fn equivalents(digits: &str) -> Vec<String> {
    let b = digits.as_bytes();
    if !b.iter().all(u8::is_ascii_digit) {
        return Vec::new();
    }
    let area_ok = |i: usize| b[i] != b'0' && b[i + 1] != b'0';
    let mobile = |c: u8| (b'6'..=b'9').contains(&c);
    match (b.len(), b.get(..2)) {
        (12, Some(b"55")) if area_ok(2) && mobile(b[4]) => {
            vec![format!("{}9{}", &digits[..4], &digits[4..])]
        }
        (13, Some(b"55")) if area_ok(2) && b[4] == b'9' && mobile(b[5]) => {
            vec![format!("{}{}", &digits[..4], &digits[5..])]
        }
        (13, Some(b"52")) if b[2] == b'1' && b[3] != b'1' => {
            vec![format!("52{}", &digits[3..])]
        }
        (12, Some(b"52")) if b[2] != b'1' => vec![format!("521{}", &digits[2..])],
        _ => Vec::new(),
    }
}

/// The in-memory copy of the store's `wa_ids_v1`.
#[derive(Default)]
pub struct WaIds {
    inner: RwLock<Maps>,
}

#[derive(Default)]
struct Maps {
    /// ID → number.
    by_id: HashMap<String, String>,
    /// Number → its IDs (nearly always one).
    by_number: HashMap<String, Vec<String>>,
}

/// `number \0 id`: the store key, under the number's prefix like every per-number row.
pub fn row_key(number: &str, id: &str) -> Vec<u8> {
    let mut k = number.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

impl WaIds {
    /// Adds a stored row (`number \0 id`) at start; a malformed one is skipped.
    pub fn load_row(&self, key: &[u8]) {
        let mut parts = key.splitn(2, |b| *b == 0);
        if let (Some(n), Some(id)) = (parts.next(), parts.next())
            && let (Ok(n), Ok(id)) = (std::str::from_utf8(n), std::str::from_utf8(id))
        {
            self.insert(n, id);
        }
    }

    /// Whether `id → number` is already known exactly so.
    pub fn has(&self, number: &str, id: &str) -> bool {
        self.read().by_id.get(id).is_some_and(|n| n == number)
    }

    pub fn insert(&self, number: &str, id: &str) {
        let mut m = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = m.by_id.insert(id.to_string(), number.to_string())
            && old != number
            && let Some(ids) = m.by_number.get_mut(&old)
        {
            ids.retain(|i| i != id);
            if ids.is_empty() {
                m.by_number.remove(&old);
            }
        }
        let ids = m.by_number.entry(number.to_string()).or_default();
        if !ids.iter().any(|i| i == id) {
            ids.push(id.to_string());
        }
    }

    /// Forgets the number and its IDs (an erasure).
    pub fn forget(&self, number: &str) {
        let mut m = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(ids) = m.by_number.remove(number) {
            for id in ids {
                if m.by_id.get(&id).is_some_and(|n| n == number) {
                    m.by_id.remove(&id);
                }
            }
        }
    }

    /// Forgets that `id` is `number` (its stored row was deleted, by another instance's
    /// erasure): nothing else the map knows of either.
    pub fn remove(&self, number: &str, id: &str) {
        let mut m = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if m.by_id.get(id).is_some_and(|n| n == number) {
            m.by_id.remove(id);
        }
        if let Some(ids) = m.by_number.get_mut(number) {
            ids.retain(|i| i != id);
            if ids.is_empty() {
                m.by_number.remove(number);
            }
        }
    }

    /// Forgets one ID (an erasure of the ID's own digits).
    pub fn forget_id(&self, id: &str) {
        let mut m = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.by_id.remove(id)
            && let Some(ids) = m.by_number.get_mut(&n)
        {
            ids.retain(|i| i != id);
            if ids.is_empty() {
                m.by_number.remove(&n);
            }
        }
    }

    /// Every form under which rows about this number's owner may be kept: the number, its
    /// equivalent forms, the WhatsApp IDs learned for any of them and their equivalents (digits,
    /// no `+`, the number first, no repeats).
    pub fn forms_of(&self, number: &str) -> Vec<String> {
        let mut forms = vec![number.to_string()];
        let mut i = 0;
        while i < forms.len() && forms.len() < 16 {
            let f = forms[i].clone();
            let mut next = equivalents(&f);
            if let Some(ids) = self.read().by_number.get(&f) {
                next.extend(ids.iter().cloned());
            }
            if let Some(n) = self.number_of(&f) {
                next.push(n);
            }
            for n in next {
                if !forms.contains(&n) {
                    forms.push(n);
                }
            }
            i += 1;
        }
        forms
    }

    pub fn number_of(&self, id: &str) -> Option<String> {
        self.read().by_id.get(id).cloned()
    }

    /// A number sendwell sent to and learned an ID for.
    pub fn is_number(&self, digits: &str) -> bool {
        self.read().by_number.contains_key(digits)
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Resolves an ID (digits): the map, then the ID itself if it is a known number, then an
/// equivalent form that is, else the ID as given. `known` says whether sendwell knows a number.
pub fn resolve(ids: &WaIds, id: &str, known: impl Fn(&str) -> bool) -> Resolved {
    if let Some(n) = ids.number_of(id) {
        return Resolved {
            digits: n,
            how: How::Mapped,
        };
    }
    if known(id) {
        return Resolved {
            digits: id.to_string(),
            how: How::Same,
        };
    }
    match equivalents(id).into_iter().find(|c| known(c)) {
        Some(c) => Resolved {
            digits: c,
            how: How::Equivalent,
        },
        None => Resolved {
            digits: id.to_string(),
            how: How::Unknown,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brazilian_mobiles_are_equivalent_with_and_without_the_ninth_digit() {
        assert_eq!(equivalents("551187654321"), vec!["5511987654321"]);
        assert_eq!(equivalents("5511987654321"), vec!["551187654321"]);
        // Landlines never gained a ninth digit.
        assert!(equivalents("551133334444").is_empty());
        assert!(equivalents("5511933334444").is_empty());
        // Not Brazil, or not a Brazilian length.
        assert!(equivalents("491701234567").is_empty());
        assert!(equivalents("55119876543210").is_empty());
    }

    #[test]
    fn a_numbers_forms_are_itself_its_equivalents_and_its_learned_ids() {
        let ids = WaIds::default();
        assert_eq!(
            ids.forms_of("5511987654321"),
            vec!["5511987654321", "551187654321"]
        );
        assert_eq!(ids.forms_of("491701234567"), vec!["491701234567"]);
        // An ID the map learned that no rule predicts is one of the forms too, both ways.
        ids.insert("491701234567", "4917099999");
        assert_eq!(
            ids.forms_of("491701234567"),
            vec!["491701234567", "4917099999"]
        );
        assert_eq!(
            ids.forms_of("4917099999"),
            vec!["4917099999", "491701234567"]
        );
    }

    #[test]
    fn mexican_numbers_are_equivalent_with_and_without_the_one() {
        assert_eq!(equivalents("5215512345678"), vec!["525512345678"]);
        assert_eq!(equivalents("525512345678"), vec!["5215512345678"]);
        assert!(equivalents("52551234567").is_empty());
    }

    #[test]
    fn the_map_wins_then_the_id_itself_then_an_equivalent_known_number() {
        let ids = WaIds::default();
        ids.insert("5511987654321", "551187654321");
        let none = |_: &str| false;
        let r = resolve(&ids, "551187654321", none);
        assert_eq!((r.digits.as_str(), r.how), ("5511987654321", How::Mapped));
        // Not mapped, but the 13-digit form has consent.
        let known = |d: &str| d == "5511987650000";
        let r = resolve(&ids, "551187650000", known);
        assert_eq!(
            (r.digits.as_str(), r.how),
            ("5511987650000", How::Equivalent)
        );
        // A number whose ID is its own digits.
        let known = |d: &str| d == "491701234567";
        let r = resolve(&ids, "491701234567", known);
        assert_eq!(r.how, How::Same);
        // Nobody knows it: as given.
        let r = resolve(&ids, "551187659999", none);
        assert_eq!((r.digits.as_str(), r.how), ("551187659999", How::Unknown));
        // Erasure forgets the number and its ID.
        ids.forget("5511987654321");
        assert_eq!(resolve(&ids, "551187654321", none).how, How::Unknown);
        assert!(ids.is_empty());
    }

    #[test]
    fn stored_rows_load_back() {
        let ids = WaIds::default();
        ids.load_row(&row_key("525512345678", "5215512345678"));
        ids.load_row(b"garbage-without-separator");
        assert_eq!(
            ids.number_of("5215512345678").as_deref(),
            Some("525512345678")
        );
        assert!(ids.is_number("525512345678"));
        assert_eq!(ids.len(), 1);
    }
}
