//! CONTRACT §4: the consent event as upstream (and sendwell itself) publishes it, validated into
//! a [`ConsentEvent`], and its canonical form, which is both the stored proof and the key that
//! makes a replay change nothing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::job::{Invalid, Recipient};
use crate::phone::parse_e164;

pub const MAX_EVENT_BYTES: usize = 64 * 1024;
pub const MAX_EVIDENCE_BYTES: usize = 4096;
pub const MAX_SOURCE_BYTES: usize = 128;

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    OptIn,
    Confirm,
    OptOut,
    Erase,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::OptIn => "opt_in",
            Kind::Confirm => "confirm",
            Kind::OptOut => "opt_out",
            Kind::Erase => "erase",
        }
    }
}

/// The event as it arrives. Unknown fields are refused: a typo like `purpose` for `purposes`
/// would otherwise turn an opt-out for one purpose into an opt-out for nothing.
///
/// Its JSON Schema (docs/schema/consent-event.schema.json) says what [`EventDecoder`] checks,
/// as far as a schema can: the field attributes below, here the rules between fields, and
/// `to`'s E.164 pattern in [`crate::schema`].
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "Consent event",
    description = "An opt-in, its confirmation, an opt-out or an erasure (CONTRACT §4): UTF-8 JSON of at most 64 KiB, published to the fanout exchange `sendwell.consent`.",
    extend(
        // `missing_purpose`, `missing_source`: an opt_in names its purposes and its source.
        "if" = { "properties": { "type": { "const": "opt_in" } }, "required": ["type"] },
        "then" = {
            "properties": {
                "purposes": { "type": "array", "minItems": 1 },
                "source": { "type": "string", "minLength": 1 },
            },
            "required": ["purposes", "source"],
        },
    )
)]
pub struct RawConsentEvent {
    /// `opt_in` (first step), `confirm` (second step of the double opt-in), `opt_out`, or
    /// `erase` (forget the number entirely).
    #[serde(rename = "type")]
    pub kind: Kind,
    /// A sender account named in sendwell's configuration.
    pub account: String,
    /// E.164 (its pattern is added in `schema`, from the phone-number metadata).
    pub to: String,
    /// Consent purposes named in sendwell's configuration. Empty or absent: every purpose
    /// (`opt_out`), or every purpose awaiting confirmation (`confirm`).
    #[serde(default)]
    pub purposes: Option<Vec<String>>,
    /// Where the consent was given (`website_form`); kept as proof. At most 128 bytes.
    #[serde(default)]
    #[schemars(length(max = 128))]
    pub source: Option<String>,
    /// When it happened; not in the future, not before 2000.
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub at: Timestamp,
    /// What the customer said or did; kept as proof. At most 4096 bytes.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub evidence: Option<String>,
}

/// A validated consent event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsentEvent {
    pub kind: Kind,
    pub account: Arc<str>,
    pub to: Recipient,
    /// Sorted, without repeats. Empty: every purpose (opt_out), or every purpose awaiting
    /// confirmation (confirm).
    pub purposes: Vec<String>,
    pub source: Option<String>,
    pub at: Timestamp,
    pub evidence: Option<String>,
}

/// The stored and published form: fixed field order, so equal events are equal bytes.
#[derive(Serialize)]
struct Canonical<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    account: &'a str,
    to: &'a str,
    purposes: &'a [String],
    source: Option<&'a str>,
    at: Timestamp,
    evidence: Option<&'a str>,
}

impl ConsentEvent {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&Canonical {
            kind: self.kind.as_str(),
            account: &self.account,
            to: self.to.as_str(),
            purposes: &self.purposes,
            source: self.source.as_deref(),
            at: self.at,
            evidence: self.evidence.as_deref(),
        })
        .unwrap_or_default()
    }

    /// The event's identity: the first 8 bytes of the SHA-256 of its canonical form.
    pub fn fingerprint(&self) -> [u8; 8] {
        use sha2::Digest;
        let d = sha2::Sha256::digest(self.to_json());
        let mut out = [0u8; 8];
        out.copy_from_slice(&d[..8]);
        out
    }

    /// Whether it names `purpose` (or every purpose, by naming none).
    pub fn covers(&self, purpose: &str) -> bool {
        self.purposes.is_empty() || self.purposes.iter().any(|p| p == purpose)
    }
}

/// Validates events against the configured accounts and purposes.
#[derive(Clone)]
pub struct EventDecoder {
    accounts: Vec<Arc<str>>,
    purposes: HashSet<String>,
    future_tolerance: Duration,
}

impl EventDecoder {
    pub fn new(config: &Config) -> Self {
        Self {
            accounts: config.accounts.iter().map(|a| a.name.clone()).collect(),
            purposes: config.purposes.iter().map(|p| p.name.clone()).collect(),
            future_tolerance: config.consent.future_tolerance,
        }
    }

    pub fn decode(&self, bytes: &[u8], now: Timestamp) -> Result<ConsentEvent, Invalid> {
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(Invalid::new(
                "too_large",
                format!(
                    "the event is {} bytes; the limit is {MAX_EVENT_BYTES}",
                    bytes.len()
                ),
            ));
        }
        let raw: RawConsentEvent =
            serde_json::from_slice(bytes).map_err(|e| Invalid::new("malformed", e.to_string()))?;
        self.validate(raw, now)
    }

    pub fn validate(&self, raw: RawConsentEvent, now: Timestamp) -> Result<ConsentEvent, Invalid> {
        let Some(account) = self.accounts.iter().find(|a| ***a == *raw.account).cloned() else {
            return Err(Invalid::new(
                "unknown_account",
                format!("account {:?} is not configured", raw.account),
            ));
        };
        let to = parse_e164(&raw.to).map_err(|why| Invalid::new("invalid_number", why))?;
        let mut purposes = raw.purposes.unwrap_or_default();
        purposes.sort();
        purposes.dedup();
        if let Some(p) = purposes.iter().find(|p| !self.purposes.contains(*p)) {
            return Err(Invalid::new(
                "unknown_purpose",
                format!("purpose {p:?} is not configured"),
            ));
        }
        if raw.kind == Kind::OptIn && purposes.is_empty() {
            return Err(Invalid::new(
                "missing_purpose",
                "an opt_in must name the purposes it consents to",
            ));
        }
        let source = raw.source.filter(|s| !s.is_empty());
        if raw.kind == Kind::OptIn && source.is_none() {
            return Err(Invalid::new(
                "missing_source",
                "an opt_in must name its source: it is the proof of consent",
            ));
        }
        if source.as_ref().is_some_and(|s| s.len() > MAX_SOURCE_BYTES) {
            return Err(Invalid::new(
                "invalid_source",
                format!("source is longer than {MAX_SOURCE_BYTES} bytes"),
            ));
        }
        if raw
            .evidence
            .as_ref()
            .is_some_and(|e| e.len() > MAX_EVIDENCE_BYTES)
        {
            return Err(Invalid::new(
                "invalid_evidence",
                format!("evidence is longer than {MAX_EVIDENCE_BYTES} bytes"),
            ));
        }
        if raw.at > now + self.future_tolerance {
            return Err(Invalid::new(
                "invalid_time",
                format!(
                    "`at` is {} in the future; an event dated ahead would outrank later changes",
                    humantime::format_duration(Duration::from_secs(
                        (raw.at.as_second() - now.as_second()).max(0) as u64
                    ))
                ),
            ));
        }
        if raw.at.as_second() < 946_684_800 {
            return Err(Invalid::new("invalid_time", "`at` is before the year 2000"));
        }
        Ok(ConsentEvent {
            kind: raw.kind,
            account,
            to,
            purposes,
            source,
            at: raw.at,
            evidence: raw.evidence,
        })
    }
}
