//! The job as upstream services send it (CONTRACT §2), the outcome event sendwell answers with
//! (CONTRACT §3), and [`Outcome`]: the one enum that decides the ack, the event and the metric.

use std::fmt;
use std::sync::Arc;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::privacy::Masked;

/// WhatsApp's pricing categories; they also select the consent rule and the retry policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Marketing,
    Utility,
    Authentication,
    Service,
}

impl Category {
    pub const ALL: [Category; 4] = [
        Category::Marketing,
        Category::Utility,
        Category::Authentication,
        Category::Service,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Marketing => "marketing",
            Category::Utility => "utility",
            Category::Authentication => "authentication",
            Category::Service => "service",
        }
    }

    /// CONTRACT §2: marketing and utility jobs must name the consent purpose they rely on.
    pub fn needs_purpose(self) -> bool {
        matches!(self, Category::Marketing | Category::Utility)
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A template send; `components` goes to the Cloud API verbatim.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub name: String,
    pub language: String,
    #[serde(default)]
    pub components: Option<Box<RawValue>>,
}

/// A free-form text send (only allowed inside the customer-service window).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Text {
    pub body: String,
    #[serde(default)]
    pub preview_url: bool,
}

/// The job exactly as it arrives; [`crate::pipeline::decode`] turns it into a [`Job`].
/// Unknown fields are refused so that a typo such as `not_befor` cannot silently send early.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    pub id: String,
    pub account: String,
    pub to: String,
    pub category: Category,
    #[serde(default)]
    pub purpose: Option<String>,
    #[serde(default)]
    pub template: Option<Template>,
    #[serde(default)]
    pub text: Option<Text>,
    #[serde(default)]
    pub opt_in_sources: Option<Vec<String>>,
    #[serde(default)]
    pub not_before: Option<Timestamp>,
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
    #[serde(default)]
    pub metadata: Option<Box<RawValue>>,
    /// Optional IANA time zone of the recipient (an addition to the contract): quiet hours
    /// follow it instead of the zones of the number's country.
    #[serde(default)]
    pub timezone: Option<String>,
}

/// What the job sends.
#[derive(Debug)]
pub enum Content {
    Template(Template),
    Text(Text),
}

/// A validated E.164 number: `+` followed by its digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Recipient {
    /// `+491701234567`: the form sent to the Cloud API and echoed in outcomes.
    e164: Arc<str>,
    /// ISO 3166 region of the country code (`DE`), for metrics and time zones; never the number.
    region: &'static str,
}

impl Recipient {
    pub(crate) fn new(e164: Arc<str>, region: &'static str) -> Self {
        Self { e164, region }
    }
    pub fn as_str(&self) -> &str {
        &self.e164
    }
    pub fn digits(&self) -> &str {
        &self.e164[1..]
    }
    pub fn region(&self) -> &'static str {
        self.region
    }
    pub fn masked(&self) -> Masked<'_> {
        Masked(&self.e164)
    }
}

/// A job that passed validation: every field here is known to be usable.
#[derive(Debug)]
pub struct Job {
    pub id: Arc<str>,
    pub account: Arc<str>,
    pub to: Recipient,
    pub category: Category,
    pub purpose: Option<String>,
    pub content: Content,
    pub opt_in_sources: Option<Vec<String>>,
    pub not_before: Option<Timestamp>,
    pub expires_at: Option<Timestamp>,
    pub metadata: Option<Box<RawValue>>,
    /// The recipient's own time zone, when the job names one.
    pub timezone: Option<jiff::tz::TimeZone>,
}

/// Why a job was refused before anything was tried; `reason` strings are part of the contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub detail: String,
}

impl Invalid {
    pub fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// The final or provisional result of processing one job.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The Cloud API accepted the message.
    Sent {
        wamid: String,
        attempts: u32,
        /// What the price table says this message costs, when it has a price for it.
        estimated_cost: Option<crate::pricing::Micros>,
    },
    /// Policy held the job back (consent, caps, quiet hours…).
    Suppressed {
        reason: &'static str,
        detail: String,
    },
    /// The Cloud API refused it for good, or retries ran out, or the send was ambiguous.
    Failed {
        reason: &'static str,
        detail: String,
        code: Option<i64>,
        attempts: u32,
    },
    /// `expires_at` passed before it could be sent.
    Expired { detail: String, attempts: u32 },
    /// The job itself is unusable; the message is dead-lettered too.
    Invalid(Invalid),
    /// This id already has a final outcome; nothing was sent again.
    Duplicate,
    /// Not final: come back at `until` through a delay queue.
    Deferred {
        until: Timestamp,
        reason: &'static str,
        attempts: u32,
    },
}

impl Outcome {
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Sent { .. } => "sent",
            Outcome::Suppressed { .. } => "suppressed",
            Outcome::Failed { .. } => "failed",
            Outcome::Expired { .. } => "expired",
            Outcome::Invalid(_) => "invalid",
            Outcome::Duplicate => "duplicate",
            Outcome::Deferred { .. } => "deferred",
        }
    }

    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Outcome::Suppressed { reason, .. }
            | Outcome::Failed { reason, .. }
            | Outcome::Deferred { reason, .. } => Some(reason),
            Outcome::Invalid(i) => Some(i.reason),
            Outcome::Expired { .. } => Some("expired"),
            Outcome::Sent { .. } | Outcome::Duplicate => None,
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Outcome::Suppressed { detail, .. }
            | Outcome::Failed { detail, .. }
            | Outcome::Expired { detail, .. } => Some(detail.clone()),
            Outcome::Invalid(i) => Some(i.detail.clone()),
            Outcome::Duplicate => Some("this job id already has a final outcome".into()),
            Outcome::Sent { .. } | Outcome::Deferred { .. } => None,
        }
    }

    fn attempts(&self) -> u32 {
        match self {
            Outcome::Sent { attempts, .. }
            | Outcome::Failed { attempts, .. }
            | Outcome::Expired { attempts, .. }
            | Outcome::Deferred { attempts, .. } => *attempts,
            _ => 0,
        }
    }
}

/// Money, as a decimal string so no float rounding reaches an invoice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    pub amount: String,
    pub currency: String,
}

/// CONTRACT §3, as published to `sendwell.outcomes`. `error_code` and `category` are additions.
#[derive(Debug, Serialize, Deserialize)]
pub struct OutcomeEvent<'a> {
    pub id: &'a str,
    pub account: &'a str,
    pub to: &'a str,
    pub status: &'a str,
    pub reason: Option<&'a str>,
    pub detail: Option<String>,
    pub wamid: Option<String>,
    pub attempts: u32,
    pub estimated_cost: Option<Cost>,
    pub at: Timestamp,
    #[serde(borrow)]
    pub metadata: Option<&'a RawValue>,
    /// The Cloud API's error code, when one decided a `failed` outcome.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub category: Option<&'a str>,
}

impl<'a> OutcomeEvent<'a> {
    /// The event for a validated job; `currency` is the price table's, for the estimate.
    pub fn for_job(job: &'a Job, outcome: &Outcome, at: Timestamp, currency: &str) -> Self {
        Self {
            id: &job.id,
            account: &job.account,
            to: job.to.as_str(),
            status: outcome.status(),
            reason: outcome.reason(),
            detail: outcome.detail(),
            wamid: match outcome {
                Outcome::Sent { wamid, .. } => Some(wamid.clone()),
                _ => None,
            },
            attempts: outcome.attempts(),
            estimated_cost: match outcome {
                Outcome::Sent {
                    estimated_cost: Some(c),
                    ..
                } => Some(Cost {
                    amount: c.to_decimal_string(),
                    currency: currency.to_string(),
                }),
                _ => None,
            },
            at,
            metadata: job.metadata.as_deref(),
            error_code: match outcome {
                Outcome::Failed { code, .. } => *code,
                _ => None,
            },
            category: Some(job.category.as_str()),
        }
    }

    /// Routing key on `sendwell.outcomes`: `status` or `status.reason`.
    pub fn routing_key(&self) -> String {
        match self.reason {
            Some(r) => format!("{}.{}", self.status, r),
            None => self.status.to_string(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Invariant: every field serialises (strings, numbers, pre-validated raw JSON).
        serde_json::to_vec(self).unwrap_or_default()
    }
}
