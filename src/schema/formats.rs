//! Schemas for the contract's strings whose Rust types say less than the decoder checks: named
//! in `#[schemars(with = …)]` attributes on the message types. A leaf: it reads the phone-number
//! metadata, nothing of the data path.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

/// An E.164 number as [`crate::pipeline::decode::parse_e164`] accepts it: `+`, 8 to 15 digits,
/// and a country calling code that exists in libphonenumber's metadata.
pub struct E164;

impl JsonSchema for E164 {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "E164".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "E.164: `+`, then 8 to 15 digits starting with a country calling code that exists.",
            // `+` and 8 to 15 digits; the pattern (ASCII only) makes characters bytes.
            "minLength": 9,
            "maxLength": 16,
            "pattern": e164_pattern(),
            "examples": ["+491701234567"],
        })
    }
}

/// `^\+(?:1|7|20|…)[0-9]*$`: the number starts with a calling code. The decoder looks up the
/// first one, two and three digits, so any code that is a prefix passes, as with an
/// alternation.
fn e164_pattern() -> String {
    let db = &*phonenumber::metadata::DATABASE;
    let codes: Vec<String> = (1u16..=999)
        .filter(|code| db.region(code).is_some_and(|r| !r.is_empty()))
        .map(|code| code.to_string())
        .collect();
    format!(r"^\+(?:{})[0-9]*$", codes.join("|"))
}

/// An RFC 3339 time with its offset (`2026-11-28T09:00:00Z`), as `jiff::Timestamp` reads and
/// writes it.
pub struct Rfc3339;

impl JsonSchema for Rfc3339 {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Rfc3339".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "format": "date-time",
        })
    }
}
