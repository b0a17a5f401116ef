//! The job as upstream services send it (CONTRACT §2), the outcome event sendwell answers with
//! (CONTRACT §3), and [`Outcome`]: the one enum that decides the ack, the event and the metric.

use std::fmt;
use std::sync::Arc;

use jiff::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::privacy::Masked;

/// WhatsApp's pricing categories; they also select the consent rule and the retry policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// The approved template's name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The template's language code (`de`, `en_US`).
    #[schemars(length(min = 1))]
    pub language: String,
    /// The Cloud API's `template.components`, passed on verbatim.
    #[serde(default)]
    #[schemars(with = "Option<Vec<serde_json::Value>>")]
    pub components: Option<Box<RawValue>>,
}

/// A free-form text send (only allowed inside the customer-service window).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Text {
    /// 1 to 4096 characters (Meta's limit).
    #[schemars(length(min = 1, max = 4096))]
    pub body: String,
    #[serde(default)]
    pub preview_url: bool,
}

/// The job exactly as it arrives; [`crate::pipeline::decode`] turns it into a [`Job`].
/// Unknown fields are refused so that a typo such as `not_befor` cannot silently send early.
///
/// Its JSON Schema (docs/schema/job.schema.json) says what the decoder checks, as far as a
/// schema can: the field attributes below, here the rules between fields, and `to`'s E.164
/// pattern in [`crate::schema`] (it needs the phone-number metadata, not imported here).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "Send job",
    description = "A WhatsApp message to send (CONTRACT §2): UTF-8 JSON of at most 64 KiB, published to the exchange `sendwell.jobs` with the recipient's E.164 digits as routing key.",
    extend(
        // `missing_purpose`: marketing and utility jobs name their consent purpose.
        "if" = {
            "properties": { "category": {
                "enum": (Category::ALL.iter().filter(|c| c.needs_purpose()).collect::<Vec<_>>())
            } },
            "required": ["category"],
        },
        "then" = {
            "properties": { "purpose": { "type": "string" } },
            "required": ["purpose"],
        },
        // `invalid_content`: exactly one of `template` and `text` (null counts as absent).
        "oneOf" = [
            { "properties": { "template": { "type": "object" } }, "required": ["template"] },
            { "properties": { "text": { "type": "object" } }, "required": ["text"] },
        ],
    )
)]
pub struct RawJob {
    /// The idempotency key: a job id is sent at most once, however often it is delivered.
    /// 1 to 128 printable ASCII characters.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[\x20-\x7E]+$"))]
    pub id: String,
    /// A sender account named in sendwell's configuration.
    pub account: String,
    /// E.164 (its pattern is added in `schema`, from the phone-number metadata).
    pub to: String,
    pub category: Category,
    /// The consent purpose the job relies on, named in sendwell's configuration; required for
    /// `marketing` and `utility`.
    #[serde(default)]
    pub purpose: Option<String>,
    #[serde(default)]
    pub template: Option<Template>,
    #[serde(default)]
    pub text: Option<Text>,
    /// Send only to a recipient whose opt-in for the purpose came from one of these consent
    /// sources; otherwise the job is `suppressed` / `no_consent`.
    #[serde(default)]
    pub opt_in_sources: Option<Vec<String>>,
    /// Never sent before this time.
    #[serde(default)]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub not_before: Option<Timestamp>,
    /// Never sent after this time (then `expired`); must be after `not_before`.
    #[serde(default)]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub expires_at: Option<Timestamp>,
    /// Any JSON object of at most 4 KiB, echoed in every outcome event of the job.
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Map<String, serde_json::Value>>")]
    pub metadata: Option<Box<RawValue>>,
    /// Optional IANA time zone of the recipient (an addition to the contract): quiet hours
    /// follow it instead of the zones of the number's country.
    #[serde(default)]
    #[schemars(example = "Europe/Helsinki")]
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Cost {
    /// A decimal number with 2 to 6 places, as a string (`0.1131`).
    #[schemars(regex(pattern = r"^-?[0-9]+\.[0-9]{2,6}$"), example = &"0.1131")]
    pub amount: String,
    /// The price table's ISO 4217 code.
    #[schemars(regex(pattern = r"^[A-Z]{3}$"), example = &"EUR")]
    pub currency: String,
}

/// CONTRACT §3, as published to `sendwell.outcomes`. `error_code` and `category` are additions.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[schemars(
    title = "Final outcome",
    description = "A job's final outcome: exactly one per job id (published at least once: a repeat is byte-identical). Routing key `status` or `status.reason`."
)]
pub struct OutcomeEvent<'a> {
    /// The job's id (as far as it could be read, for `invalid`).
    pub id: &'a str,
    /// The job's account (empty when an `invalid` job's could not be read).
    pub account: &'a str,
    /// The job's `to`, as given (empty when an `invalid` job's could not be read).
    pub to: &'a str,
    #[schemars(extend("enum" = ["sent", "suppressed", "failed", "expired", "invalid", "duplicate"]))]
    pub status: &'a str,
    /// Machine-readable (`no_consent`, `opted_out`, `frequency_cap`, `invalid_number`,
    /// `api_error`, …); null for `sent` and `duplicate`. New reasons may be added.
    pub reason: Option<&'a str>,
    /// The reason in words.
    pub detail: Option<String>,
    /// The Cloud API's message id, on `sent`.
    pub wamid: Option<String>,
    pub attempts: u32,
    /// What the price table says the message costs, on `sent` when it has a price.
    pub estimated_cost: Option<Cost>,
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub at: Timestamp,
    /// The job's `metadata`, as it was given.
    #[serde(borrow)]
    #[schemars(with = "Option<serde_json::Map<String, serde_json::Value>>")]
    pub metadata: Option<&'a RawValue>,
    /// The Cloud API's error code, when one decided a `failed` outcome.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<i64>,
    /// The job's category, when it could be read.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    #[schemars(with = "Option<Category>")]
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
