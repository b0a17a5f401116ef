//! The contract's messages as JSON Schemas (2020-12), generated from the types the daemon reads
//! and writes them with, so that upstream teams in other languages can validate a job before
//! they publish it and parse what comes back. docs/schema/ holds the generated files;
//! tests/schema.rs checks that they are current and that they refuse what the decoders refuse.
//!
//! Jobs and consent events are described as the daemon reads them (serde's deserialize
//! contract: optional fields may be absent); outcome events as it writes them (every key is
//! there, `null` when empty, except the additions that are left out when empty).

pub mod formats;

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
    read::<RawJob>()
}

/// A consent event (CONTRACT §4), as `consent::EventDecoder` accepts it.
pub fn consent_event() -> Value {
    read::<RawConsentEvent>()
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
