//! One dead letter as the tools show it: what it is (phone numbers masked), why it died, whether
//! a replay may take it, and the properties its copies are published with. No broker here: that
//! is `dead`.

use std::collections::BTreeMap;
use std::fmt;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde::Serialize;

use crate::amqp::consumer::{HEADER_REASON, HEADER_REASON_CODE};
use crate::job::RawJob;
use crate::privacy::Masked;
use crate::webhook::HEADER_KIND;

/// On a refreshed copy: the exchange the message had reached `sendwell.dead` through.
pub const HEADER_DEAD_EXCHANGE: &str = "x-sendwell-dead-exchange";
/// On a refreshed copy: the routing key it had reached `sendwell.dead` with.
pub const HEADER_DEAD_ROUTING_KEY: &str = "x-sendwell-dead-routing-key";

/// One `x-death` entry: where the broker dead-lettered the message from, why, how often.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Death {
    pub reason: String,
    pub queue: String,
    pub count: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    pub exchange: String,
    /// Masked: routing keys are recipients' digits.
    pub routing_keys: Vec<String>,
}

/// A dead-lettered message as the tools show it. Nothing in it is a phone number in clear.
#[derive(Clone, Debug, Serialize)]
pub struct DeadMessage {
    /// 1-based position in this run's walk of the queue.
    pub position: usize,
    /// `x-sendwell-reason-code`, else the broker's (`x-first-death-reason`), else `unknown`.
    pub reason_code: String,
    /// `x-sendwell-reason` (code and detail), numbers masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The exchange and routing key (masked) it reached `sendwell.dead` with.
    pub exchange: String,
    pub routing_key: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deaths: Vec<Death>,
    /// The queue's `x-delivery-count`, when it shows one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_count: Option<i64>,
    /// `job`, or the `x-sendwell-kind` of a webhook or consent message.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The recipient, masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub body_bytes: usize,
    /// When it was first published (the `timestamp` property), RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_at: Option<String>,
    pub replayable: bool,
    /// Why `replay` leaves it in the queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_replayable: Option<String>,
    /// For a replayable job: the routing key a replay publishes it with (not serialized: it is
    /// the recipient's digits).
    #[serde(skip)]
    pub(super) replay_key: Option<String>,
}

impl fmt::Display for DeadMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>4}. ", self.position)?;
        match (&self.job_id, self.kind.as_str()) {
            (Some(id), "job") => write!(f, "job {id}")?,
            (Some(id), kind) => write!(f, "{kind} {id}")?,
            (None, kind) => write!(f, "{kind} (no id)")?,
        }
        let mut about = Vec::new();
        if let Some(a) = &self.account {
            about.push(format!("account {a}"));
        }
        if let Some(c) = &self.category {
            about.push(c.clone());
        }
        if let Some(t) = &self.to {
            about.push(format!("to {t}"));
        }
        about.push(format!("{} bytes", self.body_bytes));
        writeln!(f, ", {}", about.join(", "))?;
        match &self.reason {
            // sendwell's reasons read `code: detail`.
            Some(r) if r.starts_with(&format!("{}:", self.reason_code)) => {
                writeln!(f, "      reason: {r}")?
            }
            Some(r) if r != &self.reason_code => {
                writeln!(f, "      reason: {} ({r})", self.reason_code)?
            }
            _ => writeln!(f, "      reason: {}", self.reason_code)?,
        }
        let exchange = if self.exchange.is_empty() {
            "(default)"
        } else {
            self.exchange.as_str()
        };
        write!(
            f,
            "      via: exchange {exchange}, routing key {}",
            if self.routing_key.is_empty() {
                "(none)"
            } else {
                self.routing_key.as_str()
            }
        )?;
        if let Some(n) = self.delivery_count {
            write!(f, ", delivery count {n}")?;
        }
        if let Some(t) = &self.published_at {
            write!(f, ", published {t}")?;
        }
        writeln!(f)?;
        for d in &self.deaths {
            write!(f, "      x-death: {} in {} ×{}", d.reason, d.queue, d.count)?;
            if let Some(t) = &d.time {
                write!(f, " (last {t})")?;
            }
            if !d.exchange.is_empty() || !d.routing_keys.is_empty() {
                write!(
                    f,
                    ", from exchange {} key {}",
                    if d.exchange.is_empty() {
                        "(default)"
                    } else {
                        d.exchange.as_str()
                    },
                    d.routing_keys.join(",")
                )?;
            }
            writeln!(f)?;
        }
        match &self.not_replayable {
            None => writeln!(f, "      replay: yes"),
            Some(why) => writeln!(f, "      replay: no, {why}"),
        }
    }
}

/// Masks every run that looks like a phone number (an optional `+`, then at least 7 digits,
/// single spaces allowed between groups), e.g. in a parser's message that quotes a value.
pub fn mask_numbers_in(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let mut j = i;
        if chars[j] == '+' {
            j += 1;
        }
        let (mut digits, mut end) = (0, j);
        while j < chars.len() {
            if chars[j].is_ascii_digit() {
                digits += 1;
                j += 1;
                end = j;
            } else if chars[j] == ' '
                && digits > 0
                && chars.get(j + 1).is_some_and(|c| c.is_ascii_digit())
            {
                j += 1;
            } else {
                break;
            }
        }
        if digits >= 7 {
            let run: String = chars[i..end].iter().collect();
            out.push_str(&Masked(&run).to_string());
            i = end;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

fn value_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

pub(super) fn value_i64(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => *n as i64,
        AMQPValue::ShortShortUInt(n) => *n as i64,
        AMQPValue::ShortInt(n) => *n as i64,
        AMQPValue::ShortUInt(n) => *n as i64,
        AMQPValue::LongInt(n) => *n as i64,
        AMQPValue::LongUInt(n) => *n as i64,
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::Timestamp(n) => *n as i64,
        _ => return None,
    })
}

pub(super) fn header<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref()?.inner().get(name)
}

fn header_string(p: &BasicProperties, name: &str) -> Option<String> {
    header(p, name).and_then(value_str)
}

fn rfc3339(seconds: i64) -> Option<String> {
    jiff::Timestamp::from_second(seconds)
        .ok()
        .map(|t| t.to_string())
}

fn deaths(p: &BasicProperties) -> Vec<Death> {
    let Some(AMQPValue::FieldArray(entries)) = header(p, "x-death") else {
        return Vec::new();
    };
    entries
        .as_slice()
        .iter()
        .filter_map(|e| match e {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        })
        .map(|t| {
            let get = |k: &str| t.inner().get(k);
            Death {
                reason: get("reason").and_then(value_str).unwrap_or_default(),
                queue: get("queue").and_then(value_str).unwrap_or_default(),
                count: get("count").and_then(value_i64).unwrap_or(1),
                time: get("time").and_then(value_i64).and_then(rfc3339),
                exchange: get("exchange").and_then(value_str).unwrap_or_default(),
                routing_keys: match get("routing-keys") {
                    Some(AMQPValue::FieldArray(keys)) => keys
                        .as_slice()
                        .iter()
                        .filter_map(value_str)
                        .map(|k| mask_numbers_in(&k))
                        .collect(),
                    _ => Vec::new(),
                },
            }
        })
        .collect()
}

/// Why the message is in `sendwell.dead`, as a code: sendwell's own
/// (`x-sendwell-reason-code`, or the code part of `x-sendwell-reason`), else the broker's.
pub fn reason_code(p: &BasicProperties) -> String {
    if let Some(code) = header_string(p, HEADER_REASON_CODE) {
        return code;
    }
    if let Some(reason) = header_string(p, HEADER_REASON) {
        let code = reason.split(':').next().unwrap_or("").trim();
        if !code.is_empty() {
            return code.to_string();
        }
    }
    if let Some(r) = header_string(p, "x-first-death-reason") {
        return r;
    }
    deaths(p)
        .into_iter()
        .next()
        .map(|d| d.reason)
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Describes a delivery from `sendwell.dead`; decides whether a replay may take it.
pub fn inspect(position: usize, d: &Delivery) -> DeadMessage {
    let p = &d.properties;
    let kind = header_string(p, HEADER_KIND).unwrap_or_else(|| "job".into());
    let json: Option<serde_json::Value> = serde_json::from_slice(&d.data)
        .ok()
        .filter(|v: &serde_json::Value| v.is_object());
    let field = |k: &str| {
        json.as_ref()
            .and_then(|v| v.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let (exchange, routing_key) = match (
        header_string(p, HEADER_DEAD_EXCHANGE),
        header_string(p, HEADER_DEAD_ROUTING_KEY),
    ) {
        (Some(e), Some(k)) => (e, k),
        _ => (d.exchange.to_string(), d.routing_key.to_string()),
    };
    let sendwell_reason =
        header(p, HEADER_REASON_CODE).is_some() || header(p, HEADER_REASON).is_some();
    let code = reason_code(p);
    let replay = if kind != "job" {
        Err(format!(
            "a {kind} message, not a job (the daemon retries those itself)"
        ))
    } else if let Err(e) = serde_json::from_slice::<RawJob>(&d.data) {
        Err(format!(
            "the body is not a job ({})",
            mask_numbers_in(&e.to_string())
        ))
    } else if sendwell_reason {
        Err(format!(
            "dead-lettered as invalid ({code}): its id already has a final outcome, so a replay \
             would only answer `duplicate`; publish the fixed job under a new id"
        ))
    } else {
        Ok(crate::publish::routing_key(
            json.as_ref().unwrap_or(&serde_json::Value::Null),
        ))
    };
    DeadMessage {
        position,
        reason_code: code,
        reason: header_string(p, HEADER_REASON).map(|r| mask_numbers_in(&r)),
        exchange,
        routing_key: mask_numbers_in(&routing_key),
        deaths: deaths(p),
        delivery_count: header(p, "x-delivery-count").and_then(value_i64),
        kind,
        job_id: field("id"),
        account: field("account"),
        to: field("to").map(|t| Masked(&t).to_string()),
        category: field("category"),
        body_bytes: d.data.len(),
        published_at: p.timestamp().and_then(|t| rfc3339(t as i64)),
        replayable: replay.is_ok(),
        not_replayable: replay.as_ref().err().cloned(),
        replay_key: replay.ok(),
    }
}

/// Headers the broker or a previous trip through the queues set; a replayed job starts clean.
fn carried_header(name: &str) -> bool {
    !(name == "x-death"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
        || name == "x-delivery-count"
        || name == "x-acquired-count"
        || name.starts_with("x-sendwell-"))
}

fn filtered_headers(p: &BasicProperties, keep: impl Fn(&str) -> bool) -> FieldTable {
    let map: BTreeMap<ShortString, AMQPValue> = p
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(k, _)| keep(k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    FieldTable::from(map)
}

/// The properties of a copy: the original's, with `headers`.
fn copy_properties(
    p: &BasicProperties,
    headers: FieldTable,
    timestamp: Option<u64>,
) -> BasicProperties {
    let mut out = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(t) = timestamp.or(*p.timestamp()) {
        out = out.with_timestamp(t);
    }
    out
}

/// The properties of a replayed job: as upstream would publish it, stamped now.
pub fn replay_properties(p: &BasicProperties) -> BasicProperties {
    let now = jiff::Timestamp::now().as_second().max(0) as u64;
    let mut props = copy_properties(p, filtered_headers(p, carried_header), Some(now));
    if p.content_type().is_none() {
        props = props.with_content_type("application/json".into());
    }
    props
}

/// The properties of a refreshed dead letter: everything kept but the broker's counters, and
/// where it had come from.
pub(super) fn refresh_properties(d: &Delivery) -> BasicProperties {
    let p = &d.properties;
    let mut headers = filtered_headers(p, |k| k != "x-delivery-count" && k != "x-acquired-count");
    if !headers.contains_key(HEADER_DEAD_EXCHANGE) {
        headers.insert(
            HEADER_DEAD_EXCHANGE.into(),
            AMQPValue::LongString(LongString::from(d.exchange.as_str())),
        );
        headers.insert(
            HEADER_DEAD_ROUTING_KEY.into(),
            AMQPValue::LongString(LongString::from(d.routing_key.as_str())),
        );
    }
    copy_properties(p, headers, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert((*k).into(), v.clone());
        }
        BasicProperties::default().with_headers(t)
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(v.into())
    }

    fn delivery(body: &str, p: BasicProperties) -> Delivery {
        let mut d = Delivery::mock(
            1,
            "sendwell.dead".into(),
            "491701234567".into(),
            false,
            body.as_bytes().to_vec(),
        );
        d.properties = p;
        d
    }

    const JOB: &str = r#"{"id":"j-1","account":"acme-de","to":"+491701234567","category":"utility","purpose":"newsletter","template":{"name":"t","language":"de"}}"#;

    #[test]
    fn numbers_in_free_text_are_masked() {
        assert_eq!(
            mask_numbers_in("invalid type: integer `491701234567`, expected a string"),
            "invalid type: integer `491701****567`, expected a string"
        );
        assert_eq!(mask_numbers_in("+49 170 1234567 x"), "+49 17****567 x");
        assert_eq!(mask_numbers_in("line 1 column 42"), "line 1 column 42");
        assert_eq!(mask_numbers_in("no digits"), "no digits");
    }

    #[test]
    fn the_reason_code_is_sendwells_else_the_brokers() {
        assert_eq!(
            reason_code(&props(&[
                (HEADER_REASON, s("unknown_account: no account x")),
                (HEADER_REASON_CODE, s("unknown_account"))
            ])),
            "unknown_account"
        );
        assert_eq!(
            reason_code(&props(&[(HEADER_REASON, s("malformed: eof"))])),
            "malformed"
        );
        assert_eq!(
            reason_code(&props(&[("x-first-death-reason", s("delivery_limit"))])),
            "delivery_limit"
        );
        assert_eq!(reason_code(&props(&[])), "unknown");
    }

    #[test]
    fn only_jobs_without_a_final_outcome_are_replayable() {
        let limit = props(&[("x-first-death-reason", s("delivery_limit"))]);
        let m = inspect(1, &delivery(JOB, limit.clone()));
        assert!(m.replayable, "{m:?}");
        assert_eq!(m.replay_key.as_deref(), Some("491701234567"));
        assert_eq!(m.to.as_deref(), Some("+49170****567"));
        assert!(!m.to_string().contains("1701234567"), "{m}");
        assert!(!serde_json::to_string(&m).unwrap().contains("1701234567"));

        let invalid = props(&[
            (HEADER_REASON, s("unknown_account: no such account")),
            (HEADER_REASON_CODE, s("unknown_account")),
        ]);
        let m = inspect(1, &delivery(JOB, invalid));
        assert!(!m.replayable);
        assert!(m.not_replayable.unwrap().contains("duplicate"));

        let m = inspect(1, &delivery(r#"{"id":"x","to":491701234567}"#, limit));
        assert!(!m.replayable);
        assert!(!m.not_replayable.unwrap().contains("1701234567"));

        let webhook = props(&[
            ("x-first-death-reason", s("delivery_limit")),
            (HEADER_KIND, s("webhook")),
        ]);
        assert!(!inspect(1, &delivery(JOB, webhook)).replayable);
    }

    #[test]
    fn a_replayed_job_drops_the_dead_letter_headers() {
        let p = props(&[
            ("x-death", AMQPValue::FieldArray(vec![].into())),
            ("x-first-death-reason", s("delivery_limit")),
            ("x-delivery-count", AMQPValue::LongLongInt(20)),
            ("x-sendwell-attempts", AMQPValue::LongLongInt(2)),
            ("traceparent", s("00-abc")),
        ]);
        let out = replay_properties(&p);
        let h = out.headers().clone().unwrap();
        assert_eq!(
            h.inner().keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["traceparent"]
        );
        assert_eq!(out.delivery_mode(), &Some(2));
        assert_eq!(
            out.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
    }

    #[test]
    fn x_death_is_summarised_with_keys_masked() {
        let mut entry = FieldTable::default();
        entry.insert("reason".into(), s("delivery_limit"));
        entry.insert("queue".into(), s("sendwell.jobs.0"));
        entry.insert("count".into(), AMQPValue::LongLongInt(1));
        entry.insert("exchange".into(), s("sendwell.jobs"));
        entry.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(vec![s("491701234567")].into()),
        );
        let d = deaths(&props(&[(
            "x-death",
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(entry)].into()),
        )]));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].reason, "delivery_limit");
        assert_eq!(d[0].routing_keys, ["491701****567"]);
    }
}
