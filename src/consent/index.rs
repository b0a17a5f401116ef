//! The in-memory consent cache that answers every job without I/O, sized for tens of millions
//! of numbers.
//!
//! One entry per (account, number, purpose), both key and value packed into a `u64`:
//!
//! ```text
//! key   = account index (8 bits) | purpose slot (6 bits) | E.164 digits as an integer (50 bits)
//! value = consented_at, unix seconds (32 bits) | flags (4 bits) | opt-in source bits (28 bits)
//! ```
//!
//! 16 bytes of payload per entry in a concurrent hash map (dashmap: sharded locks, so job checks
//! on all cores rarely meet a writer). Sources are interned: the first 27 distinct `source`
//! strings get a bit each; an entry with a rarer source sets the overflow bit and keeps its
//! source list in a small side map, so segmentation stays exact.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use dashmap::DashMap;

use super::model::{ALL, Found, PurposeState};
use super::store::EncodedEntry;

type Hasher = foldhash::fast::FixedState;

const NUMBER_BITS: u32 = 50;
const SLOT_BITS: u32 = 6;
const SOURCE_BITS: u32 = 27;
const OVERFLOW: u64 = 1 << SOURCE_BITS;
const FLAGS_SHIFT: u32 = 28;

/// E.164 digits as an integer: at most 15 digits and never a leading zero, so it is exact.
pub fn number_key(digits: &str) -> Option<u64> {
    if digits.is_empty() || digits.len() > 15 || digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

fn pack(consented_at: u32, flags: u8, source_bits: u64) -> u64 {
    ((consented_at as u64) << 32) | ((flags as u64 & 0xf) << FLAGS_SHIFT) | source_bits
}

fn key(account: u8, slot: u8, number: u64) -> u64 {
    ((account as u64) << (NUMBER_BITS + SLOT_BITS)) | ((slot as u64) << NUMBER_BITS) | number
}

pub struct ConsentIndex {
    map: DashMap<u64, u64, Hasher>,
    /// Source lists of entries with the overflow bit.
    overflow: DashMap<u64, Box<[u32]>, Hasher>,
    accounts: HashMap<String, u8, Hasher>,
    /// Purpose name → slot (1..=63); slot 0 is [`ALL`].
    purposes: HashMap<String, u8, Hasher>,
    sources: RwLock<Interner>,
}

#[derive(Default)]
struct Interner {
    ids: HashMap<String, u32>,
}

impl Interner {
    fn id(&mut self, s: &str) -> u32 {
        if let Some(id) = self.ids.get(s) {
            return *id;
        }
        let id = self.ids.len() as u32;
        self.ids.insert(s.to_string(), id);
        id
    }
}

impl ConsentIndex {
    pub fn new<'a>(
        accounts: impl IntoIterator<Item = &'a str>,
        purposes: impl IntoIterator<Item = &'a str>,
        capacity: usize,
    ) -> Self {
        Self {
            map: DashMap::with_capacity_and_hasher(capacity, Hasher::default()),
            overflow: DashMap::with_hasher(Hasher::default()),
            accounts: accounts
                .into_iter()
                .enumerate()
                .map(|(i, a)| (a.to_string(), i as u8))
                .collect(),
            purposes: purposes
                .into_iter()
                .enumerate()
                .map(|(i, p)| (p.to_string(), i as u8 + 1))
                .collect(),
            sources: RwLock::new(Interner::default()),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// (consents: (account, number, purpose) with a current opt-in; opt-outs: (account, number)
    /// opted out of every purpose), for the gauges. One pass over the map.
    pub fn census(&self) -> (usize, usize) {
        let (mut consents, mut opt_outs) = (0, 0);
        for e in self.map.iter() {
            let flags = ((*e.value() >> FLAGS_SHIFT) & 0xf) as u8;
            let slot = (*e.key() >> NUMBER_BITS) & ((1 << SLOT_BITS) - 1);
            if slot == 0 {
                opt_outs += usize::from(flags & super::model::OPTED_OUT != 0);
            } else if flags & super::model::OPTED_IN != 0 && flags & super::model::OPTED_OUT == 0 {
                consents += 1;
            }
        }
        (consents, opt_outs)
    }

    fn slot(&self, purpose: &str) -> Option<u8> {
        if purpose == ALL {
            Some(0)
        } else {
            self.purposes.get(purpose).copied()
        }
    }

    /// Replaces everything known for (account, number) with `summary`. Purposes no longer
    /// configured are skipped (they stay in the store).
    pub fn set(&self, account: &str, number: u64, summary: &BTreeMap<String, PurposeState>) {
        let Some(&a) = self.accounts.get(account) else {
            return;
        };
        let mut present = 0u64;
        for (p, st) in summary {
            let Some(slot) = self.slot(p) else { continue };
            present |= 1 << slot;
            let k = key(a, slot, number);
            let (bits, extra) = self.source_bits(st.sources.iter().map(String::as_str));
            self.map.insert(k, pack(st.consented_at, st.flags, bits));
            if extra.is_empty() {
                self.overflow.remove(&k);
            } else {
                self.overflow.insert(k, extra.into_boxed_slice());
            }
        }
        for slot in 0..=self.purposes.len() as u8 {
            if present & (1 << slot) == 0 {
                let k = key(a, slot, number);
                if self.map.remove(&k).is_some() {
                    self.overflow.remove(&k);
                }
            }
        }
    }

    /// The bits of interned sources, and the ids past the bits (the overflow list).
    fn source_bits<'s>(&self, sources: impl Iterator<Item = &'s str>) -> (u64, Vec<u32>) {
        let mut bits = 0u64;
        let mut extra = Vec::new();
        for s in sources {
            // Nearly always known already: a read lock, and the write lock only for a new one.
            let known = self
                .sources
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .ids
                .get(s)
                .copied();
            let id = match known {
                Some(id) => id,
                None => self
                    .sources
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .id(s),
            };
            if id < SOURCE_BITS {
                bits |= 1 << id;
            } else {
                bits |= OVERFLOW;
                extra.push(id);
            }
        }
        (bits, extra)
    }

    /// Adds one stored entry at start-up (the number has no other entry for this purpose yet).
    pub fn load(&self, account: &str, number: u64, e: &EncodedEntry) {
        let (Some(&a), Some(slot)) = (self.accounts.get(account), self.slot(e.purpose)) else {
            return;
        };
        let k = key(a, slot, number);
        let (bits, extra) = self.source_bits(e.sources());
        self.map.insert(k, pack(e.consented_at, e.flags, bits));
        if !extra.is_empty() {
            self.overflow.insert(k, extra.into_boxed_slice());
        }
    }

    /// Whether any account holds anything for the number (a consent, an opt-out): it is a
    /// number sendwell knows. A few lookups per account; for webhooks, not for jobs.
    pub fn knows(&self, number: u64) -> bool {
        self.accounts.values().any(|&a| {
            (0..=self.purposes.len() as u8).any(|slot| self.map.contains_key(&key(a, slot, number)))
        })
    }

    /// What the cache knows for one job: no I/O, no allocation.
    pub fn find(
        &self,
        account: &str,
        number: u64,
        purpose: &str,
        sources: Option<&[String]>,
    ) -> Found {
        let (Some(&a), Some(slot)) = (self.accounts.get(account), self.slot(purpose)) else {
            return Found::default();
        };
        let k = key(a, slot, number);
        let v = self.map.get(&k).map(|v| *v);
        let mut found = Found {
            flags: v.map(|v| ((v >> FLAGS_SHIFT) & 0xf) as u8),
            consented_at: v.map(|v| (v >> 32) as u32).unwrap_or(0),
            globally_opted_out: false,
            source_matches: true,
        };
        if v.is_none() || found.flags.is_some_and(|f| f & super::model::OPTED_IN == 0) {
            found.globally_opted_out = self.map.contains_key(&key(a, 0, number));
        }
        if let (Some(wanted), Some(v)) = (sources, v) {
            found.source_matches = self.sources_match(k, v, wanted);
        }
        found
    }

    fn sources_match(&self, k: u64, v: u64, wanted: &[String]) -> bool {
        let interner = self.sources.read().unwrap_or_else(|e| e.into_inner());
        wanted.iter().any(|s| match interner.ids.get(s) {
            Some(&id) if id < SOURCE_BITS => v & (1 << id) != 0,
            Some(&id) => {
                v & OVERFLOW != 0 && self.overflow.get(&k).is_some_and(|ids| ids.contains(&id))
            }
            None => false,
        })
    }
}
