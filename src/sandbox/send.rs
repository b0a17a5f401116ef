//! The send endpoint, `POST /{version}/{phone_number_id}/messages`: decide, log, start the
//! callbacks, wait out the latency, answer.
//!
//! # How a send is answered
//!
//! Checks run in this order, and the first that fails decides the answer:
//!
//! 1. bearer token: missing or unparseable → 401, code 190 "Invalid OAuth access token - Cannot
//!    parse access token"; not among the valid tokens → 401, code 190 "Error validating access
//!    token: Session has expired ...". (Meta uses 190 for both; a single code keeps the client's
//!    "stop and alert" classification simple.)
//! 2. body: over 1 MiB → 413; not JSON or not a valid send request → 400, code 100
//!    "(#100) Invalid parameter" with `error_data.details` naming the problem. Validation runs
//!    before faults because faults simulate Meta-side conditions of *valid* requests.
//! 3. scripted [`Fault`](super::Fault)s, first match in the order added; recipients are
//!    compared by digits.
//! 4. random faults: 5xx (code 2), then throttle (130429), then undeliverable (131026), each drawn
//!    independently; the first that hits wins.
//! 5. success: 200 with a fresh `wamid`, and `contacts[].wa_id` the digits of `to`; with
//!    `legacy_wa_ids`, the WhatsApp ID such accounts have (below).
//!
//! The outcome is decided and logged when the request arrives; the latency is slept afterwards.
//! So a client that times out during the latency still leaves an accepted send in the log, exactly
//! like a real request whose response was lost: that is the case idempotency tests need.
//!
//! # Legacy WhatsApp IDs (`legacy_wa_ids`, `--legacy-wa-ids`)
//!
//! Meta answers some sends with a WhatsApp ID that is not the number sent, and names the customer
//! by that ID in every callback. With `legacy_wa_ids` on, the sandbox does so for the two patterns
//! seen in practice: a Brazilian mobile `+55 AA 9XXXXXXXX` (eight digits starting 6–9) has the ID
//! `55AAXXXXXXXX` (no ninth digit), and a Mexican `+52` + 10 digits has `521` + 10 digits. The
//! ID is in the answer's `contacts[].wa_id` and in the status callbacks' `recipient_id`; inbound
//! messages come `from` whatever the caller gives (give the ID, as Meta would). Faults still match
//! the number sent. Off by default: every other send, and every send with it off, has the
//! number's digits as its ID.

use std::sync::Arc;

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use rand::Rng;
use serde_json::{Value, json};

use super::callbacks::StatusRun;
use super::error::{MetaError, json_answer};
use super::state::{AsyncFailure, PHONE_MAX_DIGITS, SandboxRecord, Shared, digits, unix_ms};

/// Largest request body accepted, like a modest reverse proxy in front of Meta; beyond it: 413.
pub(super) const BODY_LIMIT: usize = 1 << 20;
/// Meta's limit for `text.body`, in characters.
const TEXT_BODY_MAX_CHARS: usize = 4096;
/// Meta's limit for `biz_opaque_callback_data`, in characters.
const CALLBACK_DATA_MAX_CHARS: usize = 512;

pub(super) async fn send_versioned(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let phone_number_id = path.map(|Path((_, id))| id);
    send(&shared, phone_number_id, &headers, body).await
}

pub(super) async fn send_unversioned(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let phone_number_id = path.map(|Path(id)| id);
    send(&shared, phone_number_id, &headers, body).await
}

/// Answers one send: decide, log, start its callbacks, sleep the latency, answer.
async fn send(
    shared: &Arc<Shared>,
    phone_number_id: Result<String, PathRejection>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let at_ms = unix_ms();
    let parsed = match &body {
        Ok(bytes) if !bytes.is_empty() => Some(serde_json::from_slice::<Value>(bytes)),
        _ => None,
    };
    let (phone_number_id, outcome) = match phone_number_id {
        Ok(id) => (id, shared.decide(headers, &body, &parsed)),
        // Only undecodable percent-escapes get here; the token still comes first.
        Err(rejection) => (
            String::new(),
            shared.check_token(headers).and_then(|()| {
                Err(MetaError::invalid(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "Invalid phone number id in the path: {}",
                        rejection.body_text()
                    ),
                ))
            }),
        ),
    };
    // Best-effort fields for the log, also from requests that failed validation.
    let fields = parsed.as_ref().and_then(|p| p.as_ref().ok());
    let str_field = |name: &str| fields.and_then(|v| v.get(name)).and_then(Value::as_str);
    let kind = match fields.and_then(|v| v.get("type")) {
        None if fields.is_some_and(Value::is_object) => "text",
        Some(Value::String(k)) => k.as_str(),
        _ => "",
    };
    let callback_data = str_field("biz_opaque_callback_data").map(str::to_owned);
    let text = fields
        .and_then(|v| {
            v.pointer("/text/body")
                .or_else(|| v.pointer("/interactive/body/text"))
        })
        .and_then(Value::as_str)
        .map(str::to_owned);
    let delay = shared.delay();
    let (status, error_code, wamid, answer) = match outcome {
        Ok(accepted) => {
            // Spawned now, not after the latency: a send whose answer is lost still gets its
            // callbacks, as with Meta. The task waits out the latency itself.
            if shared.webhook_target().is_some() {
                let run = StatusRun {
                    phone_number_id: phone_number_id.clone(),
                    wamid: accepted.wamid.clone(),
                    wa_id: accepted.wa_id,
                    callback_data: callback_data.clone(),
                    pricing: accepted.pricing,
                    failure: accepted.failure,
                    read: shared.read_rate > 0.0 && rand::rng().random_bool(shared.read_rate),
                };
                let first_wait = delay.saturating_add(shared.status_delay);
                tokio::spawn(Arc::clone(shared).run_status_callbacks(run, first_wait));
            }
            (StatusCode::OK, None, Some(accepted.wamid), accepted.answer)
        }
        Err(e) => (e.status, Some(e.code), None, e.body()),
    };
    shared.record(SandboxRecord {
        at_ms,
        phone_number_id,
        to: str_field("to").unwrap_or_default().to_owned(),
        kind: kind.to_owned(),
        // The job id: sendwell's sends add their shard after it (see `webhook::batch`).
        callback_data: callback_data
            .as_deref()
            .map(|d| crate::webhook::opaque::read_callback_data(d).0.to_owned()),
        status: status.as_u16(),
        error_code,
        wamid,
        text,
    });
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    json_answer(status, &answer)
}

impl Shared {
    /// Checks the bearer token; `Err` is the answer to give.
    fn check_token(&self, headers: &HeaderMap) -> Result<(), MetaError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty());
        let Some(token) = token else {
            return Err(MetaError::new(
                StatusCode::UNAUTHORIZED,
                190,
                "Invalid OAuth access token - Cannot parse access token".into(),
                "Send the header 'Authorization: Bearer <ACCESS_TOKEN>'.".into(),
            ));
        };
        let valid = self.valid_tokens.read().unwrap_or_else(|e| e.into_inner());
        match &*valid {
            Some(tokens) if !tokens.contains(token) => Err(MetaError::new(
                StatusCode::UNAUTHORIZED,
                190,
                "Error validating access token: Session has expired or the token is not one \
                 the sandbox accepts."
                    .into(),
                "The access token has expired or is not valid. Get a new access token.".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Decides the answer to one send. Pure apart from consuming faults and drawing randomness.
    fn decide(
        &self,
        headers: &HeaderMap,
        body: &Result<Bytes, BytesRejection>,
        parsed: &Option<Result<Value, serde_json::Error>>,
    ) -> Result<Accepted, MetaError> {
        self.check_token(headers)?;
        let body = match body {
            Ok(body) => body,
            Err(rejection) => {
                let details = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    format!("The request body is larger than {BODY_LIMIT} bytes.")
                } else {
                    format!(
                        "The request body could not be read: {}",
                        rejection.body_text()
                    )
                };
                return Err(MetaError::invalid(rejection.status(), details));
            }
        };
        let value = match parsed {
            Some(Ok(value)) => value,
            Some(Err(e)) => {
                return Err(MetaError::invalid(
                    StatusCode::BAD_REQUEST,
                    format!("The request body is not valid JSON: {e}"),
                ));
            }
            None if body.is_empty() => {
                return Err(MetaError::invalid(
                    StatusCode::BAD_REQUEST,
                    "The request body is empty; expected a JSON object.".into(),
                ));
            }
            None => {
                return Err(MetaError::invalid(
                    StatusCode::BAD_REQUEST,
                    "The request body could not be parsed.".into(),
                ));
            }
        };
        let valid = validate(value).map_err(|d| MetaError::invalid(StatusCode::BAD_REQUEST, d))?;
        if let Some(error) = self.take_fault(&valid.wa_id) {
            return Err(error);
        }
        if let Some(error) = self.random_fault() {
            return Err(error);
        }
        let wa_id = self.wa_id_of(&valid.wa_id);
        let wamid = self.new_wamid(&wa_id);
        let mut message = json!({ "id": wamid });
        if valid.is_template {
            // Meta documents message_status (pacing) for template sends only.
            message["message_status"] = json!("accepted");
        }
        let answer = json!({
            "messaging_product": "whatsapp",
            "contacts": [{ "input": valid.to, "wa_id": wa_id }],
            "messages": [message],
        });
        let pricing = match valid.template_name {
            Some(name) => json!({
                "billable": true,
                "pricing_model": "PMP",
                "type": "regular",
                "category": self
                    .template_categories
                    .get(name)
                    .map_or("marketing", String::as_str),
            }),
            // Free-form messages only go out inside a customer service window: free service.
            None => json!({
                "billable": false,
                "pricing_model": "PMP",
                "type": "free_customer_service",
                "category": "service",
            }),
        };
        let failure = self.take_async_failure(&valid.wa_id);
        Ok(Accepted {
            answer,
            wamid,
            wa_id,
            pricing,
            failure,
        })
    }
}

/// An accepted send: the answer, and what its callbacks need.
struct Accepted {
    answer: Value,
    wamid: String,
    wa_id: String,
    pricing: Value,
    failure: Option<AsyncFailure>,
}

/// The parts of a valid send the answer needs.
struct ValidSend<'a> {
    /// Echoed as `contacts[].input`.
    to: &'a str,
    /// `contacts[].wa_id`, and the key scripted faults match on.
    wa_id: String,
    /// Only template answers carry `message_status`.
    is_template: bool,
    /// `template.name`, which decides the pricing category of the callbacks.
    template_name: Option<&'a str>,
}

/// Validates a send body like Meta does; `Err` is the `details` text.
fn validate(body: &Value) -> Result<ValidSend<'_>, String> {
    let Some(obj) = body.as_object() else {
        return Err("The request body must be a JSON object.".into());
    };
    match obj.get("messaging_product") {
        Some(Value::String(p)) if p == "whatsapp" => {}
        None => return Err("The parameter messaging_product is required.".into()),
        Some(other) => {
            return Err(format!(
                "messaging_product must be \"whatsapp\", got {other}."
            ));
        }
    }
    match obj.get("recipient_type") {
        None => {}
        Some(Value::String(r)) if r == "individual" => {}
        Some(other) => {
            return Err(format!(
                "recipient_type must be \"individual\" (the sandbox has no groups), got {other}."
            ));
        }
    }
    let Some(to) = obj.get("to").and_then(Value::as_str) else {
        return Err("The parameter to is required and must be a string.".into());
    };
    let wa_id = digits(to);
    let allowed = |c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '(' | ')' | ' ');
    if !to.chars().all(allowed) || wa_id.is_empty() || wa_id.len() > PHONE_MAX_DIGITS {
        return Err(format!(
            "to must be a phone number of 1 to {PHONE_MAX_DIGITS} digits, optionally with '+', \
             '-', '(', ')' and spaces; got {to:?}."
        ));
    }
    match obj.get("biz_opaque_callback_data") {
        None => {}
        Some(Value::String(cb)) if cb.chars().count() <= CALLBACK_DATA_MAX_CHARS => {}
        Some(Value::String(_)) => {
            return Err(format!(
                "biz_opaque_callback_data is longer than {CALLBACK_DATA_MAX_CHARS} characters."
            ));
        }
        Some(_) => return Err("biz_opaque_callback_data must be a string.".into()),
    }
    // Meta defaults an absent type to "text".
    let kind = match obj.get("type") {
        None => "text",
        Some(Value::String(k)) => k.as_str(),
        Some(_) => return Err("The parameter type must be a string.".into()),
    };
    match kind {
        "text" => validate_text(obj.get("text"))?,
        "template" => validate_template(obj.get("template"))?,
        "interactive" => validate_interactive(obj.get("interactive"))?,
        other => {
            return Err(format!(
                "Message type {other:?} is not supported by the sandbox (only \"template\", \
                 \"text\" and \"interactive\" reply buttons)."
            ));
        }
    }
    Ok(ValidSend {
        to,
        wa_id,
        is_template: kind == "template",
        template_name: obj
            .get("template")
            .and_then(|t| t.get("name"))
            .and_then(Value::as_str)
            .filter(|_| kind == "template"),
    })
}

fn validate_text(text: Option<&Value>) -> Result<(), String> {
    let Some(text) = text.and_then(Value::as_object) else {
        return Err(
            "The parameter text is required for type \"text\" and must be an object.".into(),
        );
    };
    let Some(body) = text.get("body").and_then(Value::as_str) else {
        return Err("The parameter text.body is required and must be a string.".into());
    };
    if body.is_empty() {
        return Err("The parameter text.body must not be empty.".into());
    }
    if body.chars().count() > TEXT_BODY_MAX_CHARS {
        return Err(format!(
            "The parameter text.body is longer than {TEXT_BODY_MAX_CHARS} characters."
        ));
    }
    match text.get("preview_url") {
        None | Some(Value::Bool(_)) => Ok(()),
        Some(_) => Err("The parameter text.preview_url must be a boolean.".into()),
    }
}

/// Reply-button messages as Meta documents them: a body of at most 1024 characters and 1 to 3
/// buttons with unique ids (at most 256 characters) and titles of at most 20 characters.
fn validate_interactive(i: Option<&Value>) -> Result<(), String> {
    let Some(i) = i.and_then(Value::as_object) else {
        return Err("The parameter interactive is required and must be an object.".into());
    };
    if i.get("type").and_then(Value::as_str) != Some("button") {
        return Err("The sandbox supports interactive.type \"button\" only.".into());
    }
    let body = i
        .get("body")
        .and_then(|b| b.get("text"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if body.is_empty() || body.chars().count() > 1024 {
        return Err("interactive.body.text must be 1 to 1024 characters.".into());
    }
    let buttons = i
        .get("action")
        .and_then(|a| a.get("buttons"))
        .and_then(Value::as_array)
        .ok_or("interactive.action.buttons is required.")?;
    if buttons.is_empty() || buttons.len() > 3 {
        return Err("interactive.action.buttons must have 1 to 3 buttons.".into());
    }
    let mut ids = std::collections::HashSet::new();
    for b in buttons {
        let id = b.pointer("/reply/id").and_then(Value::as_str).unwrap_or("");
        let title = b
            .pointer("/reply/title")
            .and_then(Value::as_str)
            .unwrap_or("");
        if id.is_empty() || id.chars().count() > 256 || !ids.insert(id) {
            return Err("Each button needs a unique reply.id of at most 256 characters.".into());
        }
        if title.is_empty() || title.chars().count() > 20 {
            return Err("Each button needs a reply.title of 1 to 20 characters.".into());
        }
    }
    Ok(())
}

fn validate_template(template: Option<&Value>) -> Result<(), String> {
    let Some(template) = template.and_then(Value::as_object) else {
        return Err(
            "The parameter template is required for type \"template\" and must be an object."
                .into(),
        );
    };
    if template
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err(
            "The parameter template.name is required and must be a non-empty string.".into(),
        );
    }
    let Some(language) = template.get("language").and_then(Value::as_object) else {
        return Err("The parameter template.language is required and must be an object.".into());
    };
    if language
        .get("code")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err(
            "The parameter template.language.code is required and must be a non-empty string."
                .into(),
        );
    }
    // Components are the client's business (passed through verbatim); only the container is checked.
    match template.get("components") {
        None | Some(Value::Array(_)) => Ok(()),
        Some(_) => Err("The parameter template.components must be an array.".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::SandboxConfig;
    use crate::sandbox::testing::*;
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    #[test]
    fn the_double_opt_in_questions_are_valid_sends() {
        use crate::config::DoubleOptInMessage;
        use crate::consent::flow::question_body;
        for q in [
            DoubleOptInMessage::Interactive {
                text: "Newsletter?".into(),
                yes_title: "Ja".into(),
                no_title: "Nein".into(),
            },
            DoubleOptInMessage::Template {
                name: "optin_confirmation".into(),
                language: "de".into(),
            },
        ] {
            let body: Value = serde_json::from_slice(&question_body("+491701234567", &q)).unwrap();
            assert!(
                validate(&body).is_ok(),
                "{q:?}: {:?}",
                validate(&body).err()
            );
        }
        let mut too_long: Value = serde_json::from_slice(&question_body(
            "+491701234567",
            &DoubleOptInMessage::Interactive {
                text: "x".into(),
                yes_title: "Ja".into(),
                no_title: "Nein".into(),
            },
        ))
        .unwrap();
        too_long["interactive"]["action"]["buttons"][0]["reply"]["title"] =
            "a title longer than twenty".into();
        assert!(validate(&too_long).is_err());
    }

    #[tokio::test]
    async fn legacy_wa_ids_answer_brazilian_mobiles_and_mexican_numbers_as_meta_does() {
        let sb = start(SandboxConfig {
            legacy_wa_ids: true,
            ..quick()
        })
        .await;
        for (to, id) in [
            ("+5511987654321", "551187654321"),
            ("+525512345678", "5215512345678"),
            // A Brazilian landline, and any other country, keep their digits.
            ("+551133334444", "551133334444"),
            ("+491701234567", "491701234567"),
        ] {
            let (status, body) = sb.send(&template(to, "j")).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["contacts"][0]["wa_id"], id, "{to}");
            assert_eq!(body["contacts"][0]["input"], to);
        }
        sb.stop().await;
        // Off (the default): the number's digits.
        let sb = start(quick()).await;
        let (_, body) = sb.send(&template("+5511987654321", "j")).await;
        assert_eq!(body["contacts"][0]["wa_id"], "5511987654321");
        sb.stop().await;
    }

    #[tokio::test]
    async fn template_is_accepted_with_metas_shape() {
        let sb = start(quick()).await;
        let (status, body) = sb.send(&template("+49 170 1234567", "job-1")).await;
        assert_eq!(status, 200, "{body}");
        let wamid = body["messages"][0]["id"].as_str().unwrap().to_owned();
        assert!(wamid.starts_with("wamid.") && wamid.len() > 20, "{wamid}");
        assert_eq!(
            body,
            json!({
                "messaging_product": "whatsapp",
                "contacts": [{ "input": "+49 170 1234567", "wa_id": "491701234567" }],
                "messages": [{ "id": wamid, "message_status": "accepted" }]
            })
        );
        let records = sb.handle.requests();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert!(r.at_ms > 1_700_000_000_000);
        assert_eq!(
            r,
            &SandboxRecord {
                at_ms: r.at_ms,
                phone_number_id: "106540352242922".into(),
                to: "+49 170 1234567".into(),
                kind: "template".into(),
                callback_data: Some("job-1".into()),
                status: 200,
                error_code: None,
                wamid: Some(wamid),
                text: None,
            }
        );
        sb.stop().await;
    }

    #[tokio::test]
    async fn text_is_accepted_without_message_status() {
        let sb = start(quick()).await;
        let (status, body) = sb.send(&text("16505551234", "hello")).await;
        assert_eq!(status, 200, "{body}");
        let wamid = body["messages"][0]["id"].as_str().unwrap();
        assert_eq!(
            body,
            json!({
                "messaging_product": "whatsapp",
                "contacts": [{ "input": "16505551234", "wa_id": "16505551234" }],
                "messages": [{ "id": wamid }]
            })
        );
        assert_eq!(sb.handle.accepted()[0].kind, "text");
        // The unversioned path works as well, and every wamid is fresh.
        let body = serde_json::to_vec(&text("16505551234", "again")).unwrap();
        let (status, bytes) = sb
            .request(
                reqwest::Method::POST,
                "/106540352242922/messages",
                Some("t"),
                body,
            )
            .await;
        assert_eq!(status, 200);
        let again: Value = serde_json::from_slice(&bytes).unwrap();
        assert_ne!(again["messages"][0]["id"].as_str().unwrap(), wamid);
        sb.stop().await;
    }

    #[tokio::test]
    async fn invalid_bodies_get_400_code_100_with_details() {
        let sb = start(quick()).await;
        let mut no_product = text("491701234567", "hi");
        no_product
            .as_object_mut()
            .unwrap()
            .remove("messaging_product");
        let mut no_language = template("491701234567", "x");
        no_language["template"]
            .as_object_mut()
            .unwrap()
            .remove("language");
        let mut image = text("491701234567", "hi");
        image["type"] = json!("image");
        let cases = [
            (no_product, "messaging_product"),
            (text("491701234567", ""), "text.body"),
            (text("491701234567", &"x".repeat(4097)), "4096"),
            (text("not a number", "hi"), "phone number"),
            (
                json!({ "messaging_product": "whatsapp", "type": "text" }),
                "to",
            ),
            (no_language, "template.language"),
            (image, "\"image\""),
            (json!([1, 2]), "JSON object"),
        ];
        for (body, needle) in cases {
            let (status, answer) = sb.send(&body).await;
            assert_eq!(status, 400, "{body}");
            let (code, details) = error_of(&answer);
            assert_eq!(code, 100);
            assert_eq!(answer["error"]["message"], "(#100) Invalid parameter");
            assert!(details.contains(needle), "{details:?} lacks {needle:?}");
        }
        // Not JSON at all.
        let (status, bytes) = sb
            .request(reqwest::Method::POST, PATH, Some("t"), b"{oops".to_vec())
            .await;
        assert_eq!(status, 400);
        let (code, details) = error_of(&serde_json::from_slice(&bytes).unwrap());
        assert_eq!(code, 100);
        assert!(details.contains("not valid JSON"), "{details}");
        // 4096 characters, multi-byte, is still fine.
        let (status, _) = sb.send(&text("491701234567", &"ä".repeat(4096))).await;
        assert_eq!(status, 200);
        let log = sb.handle.requests();
        assert_eq!(log.len(), 10);
        assert!(
            log[..9]
                .iter()
                .all(|r| r.error_code == Some(100) && r.wamid.is_none())
        );
        assert_eq!(log[6].kind, "image");
        sb.stop().await;
    }

    #[tokio::test]
    async fn tokens_are_checked_first() {
        let sb = start(SandboxConfig {
            valid_tokens: Some(vec!["good".into()]),
            ..quick()
        })
        .await;
        // An invalid body with a bad token is still a token error: the token comes first.
        for (token, body) in [
            (Some("bad"), template("491701234567", "a")),
            (None, template("491701234567", "a")),
            (Some("  "), json!({})),
        ] {
            let (status, answer) = sb.post_as(token, &body).await;
            assert_eq!(status, 401, "{token:?}");
            assert_eq!(error_of(&answer).0, 190);
        }
        let (_, answer) = sb.post_as(Some("bad"), &template("1", "a")).await;
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("Error validating access token: Session has expired"));
        assert_eq!(sb.post_as(Some("good"), &template("1", "a")).await.0, 200);

        sb.handle.set_valid_tokens(None);
        assert_eq!(
            sb.post_as(Some("anything"), &template("1", "a")).await.0,
            200
        );
        assert_eq!(sb.post_as(None, &template("1", "a")).await.0, 401);
        sb.handle.set_valid_tokens(Some(vec![]));
        assert_eq!(sb.post_as(Some("good"), &template("1", "a")).await.0, 401);
        assert_eq!(sb.handle.accepted_count_for("a"), 2);
        sb.stop().await;
    }

    #[tokio::test]
    async fn latency_is_honoured() {
        let latency = Duration::from_millis(150);
        let sb = start(SandboxConfig {
            latency,
            latency_jitter: Duration::from_millis(20),
            ..quick()
        })
        .await;
        let t0 = Instant::now();
        assert_eq!(sb.send(&text("1", "x")).await.0, 200);
        assert!(t0.elapsed() >= latency, "{:?}", t0.elapsed());
        // Errors wait too: a 401 is not a shortcut.
        let t0 = Instant::now();
        assert_eq!(sb.post_as(None, &text("1", "x")).await.0, 401);
        assert!(t0.elapsed() >= latency);

        sb.handle.set_latency(Duration::from_millis(300));
        let t0 = Instant::now();
        assert_eq!(sb.send(&text("1", "x")).await.0, 200);
        assert!(t0.elapsed() >= Duration::from_millis(300));
        sb.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_requests_sleep_concurrently() {
        // 300 keeps client + server sockets (2 per request) under a 1024 open-file limit.
        const N: usize = 300;
        let latency = Duration::from_millis(300);
        let sb = Arc::new(start(SandboxConfig { latency, ..quick() }).await);
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let sb = Arc::clone(&sb);
                tokio::spawn(async move {
                    let (status, body) = sb.send(&template("491701234567", &format!("j{i}"))).await;
                    assert_eq!(status, 200);
                    body["messages"][0]["id"].as_str().unwrap().to_owned()
                })
            })
            .collect();
        let mut wamids = HashSet::new();
        for task in tasks {
            wamids.insert(task.await.unwrap());
        }
        // Serially this would take N × 300 ms = 90 s; concurrently about one latency.
        assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
        assert_eq!(wamids.len(), N);
        assert_eq!(sb.handle.accepted().len(), N);
        assert_eq!(sb.handle.accepted_count_for("j7"), 1);
    }
}
