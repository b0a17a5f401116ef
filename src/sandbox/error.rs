//! Meta-shaped answers: every refusal the sandbox gives, whatever its cause, reads like Graph's,
//! `error.code` and `error_data.details` included, so the client classifies it as it would
//! Meta's; and [`json_answer`], which writes every JSON answer of the sandbox.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::Serialize;
use serde_json::{Value, json};

/// A Meta-shaped error answer.
#[derive(Debug)]
pub(super) struct MetaError {
    /// HTTP status of the answer.
    pub(super) status: StatusCode,
    /// `error.code`, what clients classify on.
    pub(super) code: i64,
    /// `error.message`, usually "(#code) title".
    pub(super) message: String,
    /// `error.error_data.details`, the human explanation.
    pub(super) details: String,
}

impl MetaError {
    pub(super) fn new(
        status: StatusCode,
        code: i64,
        message: String,
        details: String,
    ) -> MetaError {
        MetaError {
            status,
            code,
            message,
            details,
        }
    }

    /// Code 100 "(#100) Invalid parameter", with the status the problem calls for.
    pub(super) fn invalid(status: StatusCode, details: String) -> MetaError {
        MetaError::new(status, 100, "(#100) Invalid parameter".into(), details)
    }

    /// One of the random faults, with Meta's wording.
    pub(super) fn canonical(status: StatusCode, code: i64) -> MetaError {
        let title = match code {
            2 => "Service temporarily unavailable",
            130_429 => "Rate limit hit",
            131_026 => "Message undeliverable",
            _ => "Unknown error",
        };
        let details = known_details(code).unwrap_or(title);
        MetaError::new(status, code, format!("(#{code}) {title}"), details.into())
    }

    pub(super) fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": "OAuthException",
                "code": self.code,
                "error_data": { "messaging_product": "whatsapp", "details": self.details },
                "fbtrace_id": fbtrace_id(),
            }
        })
    }
}

impl IntoResponse for MetaError {
    fn into_response(self) -> Response {
        json_answer(self.status, &self.body())
    }
}

/// A JSON answer with a trailing newline: axum's `Json` writes none, and `curl` at a prompt
/// would print the prompt after the closing brace.
pub(super) fn json_answer<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            (
                status,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                body,
            )
                .into_response()
        }
        // What axum's `Json` answers when serializing fails; values with string keys never do.
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Meta's `error_data.details` for codes a test is likely to script, so scripted faults read
/// like the real ones.
pub(super) fn known_details(code: i64) -> Option<&'static str> {
    Some(match code {
        2 => "Temporary due to downtime or due to being overloaded.",
        130_429 => "Cloud API message throughput has been reached.",
        131_000 => "Message failed to send due to an unknown error.",
        131_026 => {
            "Unable to deliver message. Reasons can include: the recipient phone number is not a \
             WhatsApp phone number; the recipient has not accepted the new Terms of Service; the \
             recipient is using an old WhatsApp version."
        }
        131_047 => {
            "More than 24 hours have passed since the recipient last replied to the sender number."
        }
        131_049 => {
            "In order to maintain a healthy ecosystem engagement, the message failed to be delivered."
        }
        131_050 => {
            "This recipient has chosen to stop receiving marketing messages on WhatsApp from your business."
        }
        131_056 => {
            "Too many messages sent from the sender phone number to the same recipient phone number \
             in a short period of time."
        }
        132_001 => "Template name does not exist in the translation.",
        _ => return None,
    })
}

/// A random id like Meta's `fbtrace_id` (e.g. "Az8or2yhqkZfEZ-_4Qn_Bam"), which clients log.
fn fbtrace_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    (0..23)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}
