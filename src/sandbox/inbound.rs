//! Customers writing: a simulated message (text, a template's quick-reply button, an interactive
//! reply button) delivered to the webhook in Meta's `messages` shape, from
//! [`SandboxHandle::send_inbound`](super::SandboxHandle::send_inbound) or
//! `POST /_sandbox/inbound`.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::control::parse_control_body;
use super::error::{MetaError, json_answer};
use super::state::{CallbackKind, PHONE_MAX_DIGITS, Shared, digits, unix_secs_string};

/// `metadata.phone_number_id` of simulated inbound messages unless the request names one.
pub const DEFAULT_INBOUND_PHONE_NUMBER_ID: &str = "106540352242922";
/// The profile name of every simulated customer.
const INBOUND_PROFILE_NAME: &str = "Sandbox User";

/// What a simulated customer sends, shaped per Meta's `messages` webhook references.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundBody {
    /// `type: "text"`, `text.body`.
    Text(String),
    /// `type: "button"`: a tapped template quick-reply button.
    Button {
        /// The button's payload as set on the template send.
        payload: String,
        /// The button label.
        text: String,
    },
    /// `type: "interactive"`, `interactive.type: "button_reply"`: a tapped reply button.
    ButtonReply {
        /// The button id as set on the interactive send.
        id: String,
        /// The button label.
        title: String,
    },
}

/// How an inbound callback went.
pub(super) struct InboundDelivery {
    /// `messages[].id` of the simulated message.
    pub(super) wamid: String,
    /// Final HTTP status, None when no try was answered.
    pub(super) http_status: Option<u16>,
    pub(super) attempts: u32,
}

impl Shared {
    /// Builds and delivers one inbound message callback; `Err` is the answer to a bad request.
    pub(super) async fn inbound(
        &self,
        phone_number_id: &str,
        from: &str,
        body: InboundBody,
        context_id: Option<String>,
    ) -> Result<InboundDelivery, MetaError> {
        let wa_id = digits(from);
        let allowed = |c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '(' | ')' | ' ');
        if !from.chars().all(allowed) || wa_id.is_empty() || wa_id.len() > PHONE_MAX_DIGITS {
            return Err(MetaError::invalid(
                StatusCode::BAD_REQUEST,
                format!(
                    "from must be a phone number of 1 to {PHONE_MAX_DIGITS} digits; got {from:?}."
                ),
            ));
        }
        if let InboundBody::Text(text) = &body
            && text.is_empty()
        {
            return Err(MetaError::invalid(
                StatusCode::BAD_REQUEST,
                "text must not be empty.".into(),
            ));
        }
        let Some(target) = self.webhook_target() else {
            return Err(MetaError::invalid(
                StatusCode::CONFLICT,
                "No webhook is set: start the sandbox with a webhook URL or PUT /_sandbox/webhook."
                    .into(),
            ));
        };
        let wamid = self.new_wamid(&wa_id);
        let mut message = json!({
            "from": wa_id,
            "id": wamid,
            "timestamp": unix_secs_string(),
        });
        let quotes = !matches!(body, InboundBody::Text(_));
        match body {
            InboundBody::Text(text) => {
                message["type"] = json!("text");
                message["text"] = json!({ "body": text });
            }
            InboundBody::Button { payload, text } => {
                message["type"] = json!("button");
                message["button"] = json!({ "payload": payload, "text": text });
            }
            InboundBody::ButtonReply { id, title } => {
                message["type"] = json!("interactive");
                message["interactive"] = json!({
                    "type": "button_reply",
                    "button_reply": { "id": id, "title": title },
                });
            }
        }
        // Buttons live on a message the business sent; Meta quotes it in `context`.
        if quotes && let Some(id) = context_id.or_else(|| self.last_wamid_to(&wa_id)) {
            message["context"] = json!({ "from": self.display_phone_number, "id": id });
        }
        let value = json!({
            "messaging_product": "whatsapp",
            "metadata": {
                "display_phone_number": self.display_phone_number,
                "phone_number_id": phone_number_id,
            },
            "contacts": [{ "profile": { "name": INBOUND_PROFILE_NAME }, "wa_id": wa_id }],
            "messages": [message],
        });
        let body = self.envelope(value);
        let (http_status, attempts) = self
            .deliver(&target, CallbackKind::Inbound, None, &wamid, body)
            .await;
        Ok(InboundDelivery {
            wamid,
            http_status,
            attempts,
        })
    }
}

/// `POST /_sandbox/inbound`: exactly one of `text`, `button`, `button_reply`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundRequest {
    from: String,
    /// `metadata.phone_number_id`; [`DEFAULT_INBOUND_PHONE_NUMBER_ID`] when absent.
    #[serde(default)]
    phone_number_id: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    button: Option<InboundButton>,
    #[serde(default)]
    button_reply: Option<InboundButtonReply>,
    /// The quoted message of a button reply; the newest send to `from` when absent.
    #[serde(default)]
    context_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundButton {
    payload: String,
    text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundButtonReply {
    id: String,
    title: String,
}

pub(super) async fn control_inbound(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request: InboundRequest = match parse_control_body(body) {
        Ok(request) => request,
        Err(e) => return e.into_response(),
    };
    let body = match (request.text, request.button, request.button_reply) {
        (Some(text), None, None) => InboundBody::Text(text),
        (None, Some(b), None) => InboundBody::Button {
            payload: b.payload,
            text: b.text,
        },
        (None, None, Some(r)) => InboundBody::ButtonReply {
            id: r.id,
            title: r.title,
        },
        _ => {
            return MetaError::invalid(
                StatusCode::BAD_REQUEST,
                "Give exactly one of text, button, button_reply.".into(),
            )
            .into_response();
        }
    };
    let phone_number_id = request
        .phone_number_id
        .unwrap_or_else(|| DEFAULT_INBOUND_PHONE_NUMBER_ID.into());
    match shared
        .inbound(&phone_number_id, &request.from, body, request.context_id)
        .await
    {
        Ok(d) => json_answer(
            StatusCode::OK,
            &json!({
                "id": d.wamid,
                "http_status": d.http_status,
                "attempts": d.attempts,
            }),
        ),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::SandboxConfig;
    use crate::sandbox::testing::*;
    use serde_json::Value;

    #[tokio::test]
    async fn inbound_messages_arrive_signed_in_metas_shapes() {
        let rx = receiver(vec![]).await;
        let sb = start(SandboxConfig {
            read_rate: 0.0,
            ..webhooked(&rx.url)
        })
        .await;
        let status = sb
            .handle
            .send_inbound("+49 170 1234567", InboundBody::Text("STOP".into()))
            .await;
        assert_eq!(status, Some(200));
        let body = rx.signed().pop().unwrap();
        let message = body["entry"][0]["changes"][0]["value"]["messages"][0].clone();
        let id = message["id"].as_str().unwrap();
        assert!(id.starts_with("wamid."), "{id}");
        let ts = message["timestamp"].as_str().unwrap();
        assert!(ts.parse::<u64>().unwrap() > 1_700_000_000);
        assert_eq!(
            body,
            json!({
                "object": "whatsapp_business_account",
                "entry": [{
                    "id": "102290129340398",
                    "changes": [{
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": "106540352242922"
                            },
                            "contacts": [{
                                "profile": { "name": "Sandbox User" },
                                "wa_id": "491701234567"
                            }],
                            "messages": [{
                                "from": "491701234567",
                                "id": id,
                                "timestamp": ts,
                                "type": "text",
                                "text": { "body": "STOP" }
                            }]
                        },
                        "field": "messages"
                    }]
                }]
            })
        );
        let records = sb.handle.callbacks();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].kind, CallbackKind::Inbound);
        assert_eq!(records[0].status, None);
        assert_eq!(records[0].wamid.as_deref(), Some(id));

        // A template quick-reply button quotes the newest send to that customer.
        let wamid = wamid_of_send(&sb, &template("491701234567", "job-1")).await;
        wait_until("the send's callbacks", || {
            (runs_done(&sb) == 1).then_some(())
        })
        .await;
        let status = sb
            .handle
            .send_inbound(
                "491701234567",
                InboundBody::Button {
                    payload: "YES".into(),
                    text: "Yes".into(),
                },
            )
            .await;
        assert_eq!(status, Some(200));
        let body = rx.signed().pop().unwrap();
        let message = &body["entry"][0]["changes"][0]["value"]["messages"][0];
        assert_eq!(message["type"], "button");
        assert_eq!(
            message["button"],
            json!({ "payload": "YES", "text": "Yes" })
        );
        assert_eq!(
            message["context"],
            json!({ "from": "15550783881", "id": wamid })
        );

        // Over HTTP: an interactive reply-button answer, for another phone number id.
        let request = json!({
            "from": "+491701234567",
            "button_reply": { "id": "yes", "title": "Yes" },
            "phone_number_id": "999",
            "context_id": "wamid.quoted"
        });
        let (code, bytes) = sb
            .request(
                reqwest::Method::POST,
                "/_sandbox/inbound",
                None,
                serde_json::to_vec(&request).unwrap(),
            )
            .await;
        assert_eq!(code, 200);
        let answer: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(answer["http_status"], 200);
        assert_eq!(answer["attempts"], 1);
        let body = rx.signed().pop().unwrap();
        let value = &body["entry"][0]["changes"][0]["value"];
        assert_eq!(value["metadata"]["phone_number_id"], "999");
        let message = &value["messages"][0];
        assert_eq!(message["id"], answer["id"]);
        assert_eq!(message["type"], "interactive");
        assert_eq!(
            message["interactive"],
            json!({ "type": "button_reply", "button_reply": { "id": "yes", "title": "Yes" } })
        );
        assert_eq!(message["context"]["id"], "wamid.quoted");

        // Bad requests are refused without a callback.
        let n = rx.count();
        for bad in [
            json!({ "from": "+491701234567", "text": "a", "button": { "payload": "p", "text": "t" } }),
            json!({ "from": "+491701234567" }),
            json!({ "from": "nobody", "text": "hi" }),
            json!({ "from": "491701234567", "text": "" }),
            json!({ "from": "491701234567", "txt": "typo" }),
        ] {
            let body = serde_json::to_vec(&bad).unwrap();
            let (code, bytes) = sb
                .request(reqwest::Method::POST, "/_sandbox/inbound", None, body)
                .await;
            assert_eq!(code, 400, "{bad}");
            assert_eq!(error_of(&serde_json::from_slice(&bytes).unwrap()).0, 100);
        }
        assert_eq!(rx.count(), n);
        sb.stop().await;
    }
}
