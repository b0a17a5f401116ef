//! The contract's messages as JSON Schemas (2020-12), generated from the types the daemon reads
//! and writes them with, so that upstream teams in other languages can validate a job before
//! they publish it and parse what comes back. docs/schema/ holds the generated files;
//! tests/schema.rs checks that they are current and that they refuse what the decoders refuse.
//!
//! Jobs and consent events are described as the daemon reads them (serde's deserialize
//! contract: optional fields may be absent); outcome events as it writes them (every key is
//! there, `null` when empty, except the additions that are left out when empty).

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, json_schema};
use serde_json::Value;

use crate::consent::event::RawConsentEvent;
use crate::job::{OutcomeEvent, RawJob};
use crate::webhook::apply::DeliveryEvent;

/// Every schema, by its file name in docs/schema/.
pub fn all() -> Vec<(&'static str, Value)> {
    vec![
        ("job.schema.json", job()),
        ("outcome.schema.json", outcome()),
        ("consent-event.schema.json", consent_event()),
    ]
}

/// A send job (CONTRACT §2), as `pipeline::decode` accepts it.
pub fn job() -> Value {
    with_e164_to(read::<RawJob>())
}

/// A consent event (CONTRACT §4), as `consent::EventDecoder` accepts it.
pub fn consent_event() -> Value {
    with_e164_to(read::<RawConsentEvent>())
}

/// An event on `sendwell.outcomes` (CONTRACT §3): a job's final outcome or a later delivery
/// update; their `status` values tell them apart.
pub fn outcome() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator();
    let last = generator.subschema_for::<OutcomeEvent<'static>>();
    let update = generator.subschema_for::<DeliveryEvent<'static>>();
    let mut schema = json_schema!({
        "$schema": schemars::consts::meta_schemas::DRAFT2020_12,
        "title": "Outcome event",
        "description": "Published to the topic exchange `sendwell.outcomes`: one final outcome per job, then delivery updates learned from webhooks. New optional fields and new reasons may be added: ignore what you do not know.",
        "oneOf": [last, update],
    });
    schema.insert(
        "$defs".into(),
        Value::Object(generator.take_definitions(true)),
    );
    schema.to_value()
}

fn read<T: JsonSchema>() -> Value {
    SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

/// `to` as the decoders check it: `+`, 8 to 15 digits and a country calling code that exists.
/// Set here rather than by an attribute on the message types, which do not import the
/// phone-number metadata (module_graph keeps them below it).
fn with_e164_to(mut schema: Value) -> Value {
    let to = schema
        .pointer_mut("/properties/to")
        .filter(|to| to["type"] == "string");
    // Invariant: both message types have a string `to` (tests/schema.rs checks the result).
    if let Some(to) = to {
        *to = json_schema!({
            "type": "string",
            "description": "E.164: `+`, then 8 to 15 digits starting with a country calling code that exists.",
            // `+` and 8 to 15 digits; the pattern (ASCII only) makes characters bytes.
            "minLength": 9,
            "maxLength": 16,
            "pattern": e164_pattern(),
            "examples": ["+491701234567"],
        })
        .to_value();
    }
    schema
}

/// `^\+(?:1|7|20|…)[0-9]*$`: the number starts with a calling code of libphonenumber's metadata,
/// as `parse_e164` looks it up. It tries the first one, two and three digits, so any code that
/// is a prefix passes, as with an alternation.
fn e164_pattern() -> String {
    let db = &*phonenumber::metadata::DATABASE;
    let codes: Vec<String> = (1u16..=999)
        .filter(|code| db.region(code).is_some_and(|r| !r.is_empty()))
        .map(|code| code.to_string())
        .collect();
    format!(r"^\+(?:{})[0-9]*$", codes.join("|"))
}
