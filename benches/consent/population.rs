//! The synthetic consent population of `benches/consent.rs` and `benches/consent_load.rs`: N
//! (account, number, purpose) records as a pure function of the number's index, so both benches
//! (and both backends) load the very same rows.

use std::collections::{BTreeMap, BTreeSet};

use sendwell::consent::model::{ALL, CONFIRMED, OPTED_IN, OPTED_OUT, PurposeState};

pub const ACCOUNTS: [&str; 2] = ["acme-de", "acme-fr"];
pub const PURPOSES: [&str; 3] = ["newsletter", "offers", "orders"];
pub const SOURCES: [&str; 5] = [
    "website_chat_bubble",
    "checkout",
    "store_qr",
    "sms_keyword",
    "crm_import_2025",
];
/// Mobile ranges (E.164 digits without `+`) and how many subscriber digits follow, in key order.
pub const RANGES: [(&str, u32); 7] = [
    ("336", 8),   // France 06
    ("337", 8),   // France 07
    ("35840", 7), // Finland 040
    ("35850", 7), // Finland 050
    ("49151", 8), // Germany 0151
    ("49170", 7), // Germany 0170
    ("49176", 8), // Germany 0176
];

pub const CONFIG: &str = r#"
[[purposes]]
name = "newsletter"
categories = ["marketing"]

[[purposes]]
name = "offers"

[[purposes]]
name = "orders"
categories = ["utility"]

[[accounts]]
name = "acme-de"
phone_number_id = "1001"
token_file = "token"

[[accounts]]
name = "acme-fr"
phone_number_id = "1002"
token_file = "token"
"#;

/// A fixed scramble (splitmix64), so subscriber numbers and consent times look random.
pub fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Every 20th number opted out of everything (one `*` entry); the others have one or two
/// purposes, mostly confirmed.
pub fn entries_of(i: u64) -> u64 {
    if i % 20 == 0 { 1 } else { 1 + i % 2 }
}

pub struct Population {
    pub numbers: u64,
    per_range: u64,
}

impl Population {
    /// Enough numbers for `records` entries.
    pub fn new(records: u64) -> Self {
        let (mut numbers, mut entries) = (0, 0);
        while entries < records {
            entries += entries_of(numbers);
            numbers += 1;
        }
        Self {
            numbers,
            per_range: numbers.div_ceil(RANGES.len() as u64),
        }
    }

    /// Increasing in i (so batches append to the B-tree), spread over each range.
    pub fn digits(&self, i: u64) -> String {
        let (prefix, width) = RANGES[(i / self.per_range) as usize];
        let j = i % self.per_range;
        let stride = (10u64.pow(width) / self.per_range).max(1);
        let sub = j * stride + mix(i) % stride;
        format!("{prefix}{sub:0w$}", w = width as usize)
    }

    pub fn account(&self, i: u64) -> &'static str {
        if RANGES[(i / self.per_range) as usize].0.starts_with("33") {
            ACCOUNTS[1]
        } else {
            ACCOUNTS[0]
        }
    }

    pub fn summary(&self, i: u64) -> BTreeMap<String, PurposeState> {
        let mut s = BTreeMap::new();
        if i % 20 == 0 {
            s.insert(
                ALL.to_string(),
                PurposeState {
                    flags: OPTED_OUT,
                    ..Default::default()
                },
            );
            return s;
        }
        let r = mix(i);
        for k in 0..entries_of(i) {
            let mut sources = BTreeSet::from([SOURCES[((r >> 8) % 5) as usize].to_string()]);
            if i % 11 == 0 {
                sources.insert(SOURCES[((r >> 16) % 5) as usize].to_string());
            }
            s.insert(
                PURPOSES[((i + k) % 3) as usize].to_string(),
                PurposeState {
                    flags: if i % 7 == 0 {
                        OPTED_IN
                    } else {
                        OPTED_IN | CONFIRMED
                    },
                    // Between 2023-11 and 2025-05.
                    consented_at: 1_700_000_000 + (r % 50_000_000) as u32,
                    sources,
                },
            );
        }
        s
    }

    /// Allowed for a marketing job of purpose `newsletter`.
    pub fn is_confirmed_newsletter(&self, i: u64) -> bool {
        i % 20 != 0 && i % 3 == 0 && i % 7 != 0
    }
}
