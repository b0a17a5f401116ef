//! Builds the `POST /{version}/{phone_number_id}/messages` body for a job. Pure, so it can be
//! benchmarked and tested without a network.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::job::{Content, Job};

#[derive(Serialize)]
struct Body<'a> {
    messaging_product: &'static str,
    recipient_type: &'static str,
    to: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<TemplateBody<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<TextBody<'a>>,
    /// Echoed back in status webhooks: how a later delivery update finds its job.
    biz_opaque_callback_data: &'a str,
}

#[derive(Serialize)]
struct TemplateBody<'a> {
    name: &'a str,
    language: Language<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    components: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct Language<'a> {
    code: &'a str,
}

#[derive(Serialize)]
struct TextBody<'a> {
    body: &'a str,
    preview_url: bool,
}

/// The JSON body for one send; `footer` (the way to opt out) is appended to a text body.
/// `callback_data` is echoed in the message's status webhooks (see
/// [`crate::webhook::opaque::callback_data`]).
pub fn build_body(job: &Job, footer: Option<&str>, callback_data: &str) -> Vec<u8> {
    let with_footer;
    let (kind, template, text) = match &job.content {
        Content::Template(t) => (
            "template",
            Some(TemplateBody {
                name: &t.name,
                language: Language { code: &t.language },
                components: t.components.as_deref(),
            }),
            None,
        ),
        Content::Text(t) => (
            "text",
            None,
            Some(TextBody {
                body: match footer {
                    Some(f) => {
                        with_footer = format!("{}\n\n{f}", t.body);
                        &with_footer
                    }
                    None => &t.body,
                },
                preview_url: t.preview_url,
            }),
        ),
    };
    let body = Body {
        messaging_product: "whatsapp",
        recipient_type: "individual",
        to: job.to.as_str(),
        kind,
        template,
        text,
        biz_opaque_callback_data: callback_data,
    };
    // Invariant: all fields are strings, bools or already-valid raw JSON.
    serde_json::to_vec(&body).unwrap_or_default()
}
