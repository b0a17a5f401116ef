//! Stage 1: bytes from the queue → a validated [`Job`], or the reason it is unusable
//! (CONTRACT §2). Never panics, whatever the bytes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Deserialize;

use crate::config::Config;
use crate::job::{Category, Content, Invalid, Job, RawJob};
use crate::phone::parse_e164;

pub const MAX_JOB_BYTES: usize = 64 * 1024;
pub const MAX_METADATA_BYTES: usize = 4 * 1024;
/// Meta's limit on a text message body.
pub const MAX_TEXT_CHARS: usize = 4096;

/// A refused job: its id when one could be read (so an `invalid` outcome can name it).
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub id: Option<String>,
    pub account: Option<String>,
    pub to: Option<String>,
    /// The job's category when it is one of the four, so the `invalid` outcome can carry it as
    /// every other outcome does; `None` when it was missing or is the field that broke.
    pub category: Option<Category>,
    pub invalid: Invalid,
}

/// Knows the configured accounts and purposes; built once.
pub struct Decoder {
    /// Account names as shared strings, so each job reuses one allocation.
    accounts: HashMap<String, Arc<str>>,
    purposes: HashSet<String>,
}

#[derive(Deserialize)]
struct Salvage {
    id: Option<serde_json::Value>,
    account: Option<serde_json::Value>,
    to: Option<serde_json::Value>,
    category: Option<serde_json::Value>,
}

impl Decoder {
    pub fn new(config: &Config) -> Self {
        Self {
            accounts: config
                .accounts
                .iter()
                .map(|a| (a.name.to_string(), a.name.clone()))
                .collect(),
            purposes: config.purposes.iter().map(|p| p.name.clone()).collect(),
        }
    }

    pub fn knows_account(&self, name: &str) -> bool {
        self.accounts.contains_key(name)
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<Job, Box<Refused>> {
        if bytes.len() > MAX_JOB_BYTES {
            return Err(salvage(
                bytes,
                Invalid::new(
                    "too_large",
                    format!("job is {} bytes; the limit is {MAX_JOB_BYTES}", bytes.len()),
                ),
            ));
        }
        let raw: RawJob = match serde_json::from_slice(bytes) {
            Ok(r) => r,
            Err(e) => return Err(salvage(bytes, Invalid::new("malformed", e.to_string()))),
        };
        let refuse = |invalid: Invalid| {
            Box::new(Refused {
                id: Some(raw.id.clone()),
                account: Some(raw.account.clone()),
                to: Some(raw.to.clone()),
                category: Some(raw.category),
                invalid,
            })
        };
        if raw.id.is_empty()
            || raw.id.len() > 128
            || !raw.id.bytes().all(|b| (0x20..=0x7e).contains(&b))
        {
            return Err(refuse(Invalid::new(
                "invalid_id",
                "id must be 1 to 128 printable ASCII characters",
            )));
        }
        let Some(account) = self.accounts.get(&raw.account).cloned() else {
            return Err(refuse(Invalid::new(
                "unknown_account",
                format!("account {:?} is not configured", raw.account),
            )));
        };
        let to = match parse_e164(&raw.to) {
            Ok(r) => r,
            Err(why) => return Err(refuse(Invalid::new("invalid_number", why))),
        };
        match (&raw.purpose, raw.category.needs_purpose()) {
            (None, true) => {
                return Err(refuse(Invalid::new(
                    "missing_purpose",
                    format!("a {} job must name its consent purpose", raw.category),
                )));
            }
            (Some(p), _) if !self.purposes.contains(p) => {
                return Err(refuse(Invalid::new(
                    "unknown_purpose",
                    format!("purpose {p:?} is not configured"),
                )));
            }
            _ => {}
        }
        if let (Some(nb), Some(ex)) = (raw.not_before, raw.expires_at)
            && ex <= nb
        {
            return Err(refuse(Invalid::new(
                "invalid_time",
                "expires_at must be after not_before",
            )));
        }
        if let Some(m) = &raw.metadata {
            let s = m.get();
            if s.len() > MAX_METADATA_BYTES || !s.trim_start().starts_with('{') {
                return Err(refuse(Invalid::new(
                    "invalid_metadata",
                    format!("metadata must be a JSON object of at most {MAX_METADATA_BYTES} bytes"),
                )));
            }
        }
        let timezone = match raw.timezone.as_deref() {
            None => None,
            Some(name) => match crate::pipeline::limits::quiet::job_zone(name) {
                Ok(tz) => Some(tz),
                Err(e) => return Err(refuse(Invalid::new("invalid_timezone", e))),
            },
        };
        let content = match (raw.template, raw.text) {
            (Some(t), None) => {
                if t.name.is_empty() || t.language.is_empty() {
                    return Err(refuse(Invalid::new(
                        "invalid_content",
                        "template needs a name and a language",
                    )));
                }
                if let Some(c) = &t.components
                    && !c.get().trim_start().starts_with('[')
                {
                    return Err(refuse(Invalid::new(
                        "invalid_content",
                        "template.components must be a JSON array",
                    )));
                }
                Content::Template(t)
            }
            (None, Some(t)) => {
                let n = t.body.chars().count();
                if n == 0 || n > MAX_TEXT_CHARS {
                    return Err(refuse(Invalid::new(
                        "invalid_content",
                        format!("text.body must have 1 to {MAX_TEXT_CHARS} characters"),
                    )));
                }
                Content::Text(t)
            }
            _ => {
                return Err(refuse(Invalid::new(
                    "invalid_content",
                    "a job has exactly one of template and text",
                )));
            }
        };
        Ok(Job {
            id: raw.id.into(),
            account,
            to,
            category: raw.category,
            purpose: raw.purpose,
            content,
            opt_in_sources: raw.opt_in_sources,
            not_before: raw.not_before,
            expires_at: raw.expires_at,
            metadata: raw.metadata,
            timezone,
        })
    }
}

/// Reads what it can of a job that failed to parse, so the `invalid` outcome can name it.
fn salvage(bytes: &[u8], invalid: Invalid) -> Box<Refused> {
    let s: Option<Salvage> = if bytes.len() <= 1024 * 1024 {
        serde_json::from_slice(bytes).ok()
    } else {
        None
    };
    let text = |v: Option<serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    let (id, account, to, category) = match s {
        Some(s) => (
            text(s.id),
            text(s.account),
            text(s.to),
            s.category.and_then(|c| serde_json::from_value(c).ok()),
        ),
        None => (None, None, None, None),
    };
    Box::new(Refused {
        id,
        account,
        to,
        category,
        invalid,
    })
}
