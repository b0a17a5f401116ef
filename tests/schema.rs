//! The JSON Schemas and the AsyncAPI document in docs/schema/, for upstream teams: current with
//! the code, true to every example in the docs, and refusing what the decoders refuse, except
//! where a schema cannot say it (those cases are listed in docs/schema/README.md and checked
//! here as known differences, so that neither list can drift from the code).
//!
//! After changing a message type, regenerate the files and review the diff like code:
//! `SENDWELL_WRITE_SCHEMAS=1 cargo test --test schema`.

mod common;

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde_json::{Value, json};

use sendwell::config::Config;
use sendwell::consent::EventDecoder;
use sendwell::job::{Invalid, Outcome, OutcomeEvent};
use sendwell::pipeline::decode::Decoder;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn schema_dir() -> PathBuf {
    Path::new(ROOT).join("docs/schema")
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap() + "\n"
}

/// Whether this run rewrites the schema files (see the top of this file).
fn writing() -> bool {
    std::env::var_os("SENDWELL_WRITE_SCHEMAS").is_some()
}

/// A validator for a committed schema file (for the one being written, when writing: the tests
/// run at the same time). Formats are asserted (`date-time`), as upstream teams are told to
/// do: 2020-12 treats `format` as an annotation unless asked.
fn validator(file: &str) -> jsonschema::Validator {
    let generated = sendwell::schema::all()
        .into_iter()
        .find(|(f, _)| *f == file);
    let schema: Value = match generated {
        Some((_, schema)) if writing() => schema,
        _ => {
            let text = std::fs::read_to_string(schema_dir().join(file))
                .unwrap_or_else(|e| panic!("docs/schema/{file}: {e}"));
            serde_json::from_str(&text).unwrap()
        }
    };
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("docs/schema/{file} is not a usable schema: {e}"))
}

fn errors(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| match e.instance_path().to_string() {
            at if at.is_empty() => e.to_string(),
            at => format!("{at}: {e}"),
        })
        .collect()
}

#[test]
fn the_committed_schemas_are_what_the_code_generates() {
    let mut stale = Vec::new();
    for (file, schema) in sendwell::schema::all() {
        jsonschema::meta::validate(&schema)
            .unwrap_or_else(|e| panic!("{file}: not a valid JSON Schema 2020-12: {e}"));
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{file}"
        );
        let path = schema_dir().join(file);
        let generated = pretty(&schema);
        if writing() {
            // Whole or not at all, for the tests reading it meanwhile (the AsyncAPI checks).
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, &generated).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(generated.as_str()) {
            stale.push(file);
        }
    }
    assert!(
        stale.is_empty(),
        "docs/schema/{stale:?} differ from what the code generates: run \
         `SENDWELL_WRITE_SCHEMAS=1 cargo test --test schema` and review the diff"
    );
}

// ---------------------------------------------------------------------------------------------
// Every example in the docs
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Message {
    Job,
    Outcome,
    Consent,
}

impl Message {
    fn file(self) -> &'static str {
        match self {
            Message::Job => "job.schema.json",
            Message::Outcome => "outcome.schema.json",
            Message::Consent => "consent-event.schema.json",
        }
    }

    /// Which message a JSON object is, by its fields; `None` for any other JSON (a sandbox
    /// request, a consent proof).
    fn of(v: &Value) -> Option<Message> {
        let o = v.as_object()?;
        let has = |k: &str| o.contains_key(k);
        if has("status") && has("id") {
            Some(Message::Outcome)
        } else if has("type") && has("to") && has("at") {
            Some(Message::Consent)
        } else if has("id") && has("to") && (has("category") || has("template") || has("text")) {
            Some(Message::Job)
        } else {
            None
        }
    }
}

/// README.md and every Markdown file under docs/.
fn doc_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "md") {
                out.push(p);
            }
        }
    }
    let mut files = vec![Path::new(ROOT).join("README.md")];
    walk(&Path::new(ROOT).join("docs"), &mut files);
    files.sort();
    files
}

/// The JSON examples of a Markdown text, with their line numbers: fenced `json`/`jsonl`
/// blocks (a whole document, or one per line), and in other fenced blocks `'{…}'` arguments (a
/// `curl -d`) and lines that are JSON (a here-document).
fn json_examples(text: &str) -> Vec<(usize, Result<Value, String>)> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let Some(lang) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        let lang = lang.trim().to_string();
        let mut body = Vec::new();
        for (j, l) in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                break;
            }
            body.push((j + 1, l));
        }
        if lang == "json" || lang == "jsonl" {
            let whole: String = body.iter().map(|(_, l)| format!("{l}\n")).collect();
            match serde_json::from_str::<Value>(&whole) {
                Ok(v) => out.push((i + 2, Ok(v))),
                Err(whole_err) => {
                    // JSON lines: one document per non-empty line.
                    for (n, l) in body.iter().filter(|(_, l)| !l.trim().is_empty()) {
                        out.push((
                            *n,
                            serde_json::from_str(l)
                                .map_err(|e| format!("{whole_err}; as JSON lines: {e}")),
                        ));
                    }
                }
            }
        } else {
            for (n, l) in &body {
                // A line of its own (a here-document).
                if l.trim_start().starts_with('{')
                    && let Ok(v) = serde_json::from_str::<Value>(l)
                {
                    out.push((*n, Ok(v)));
                    continue;
                }
                let mut rest = *l;
                while let Some(start) = rest.find("'{") {
                    let tail = &rest[start + 1..];
                    let Some(end) = tail.find("}'") else { break };
                    if let Ok(v) = serde_json::from_str::<Value>(&tail[..=end]) {
                        out.push((*n, Ok(v)));
                    }
                    rest = &tail[end + 1..];
                }
            }
        }
    }
    out
}

#[test]
fn every_json_example_in_the_docs_validates_against_its_schema() {
    let validators =
        [Message::Job, Message::Outcome, Message::Consent].map(|m| (m, validator(m.file())));
    let mut failures = Vec::new();
    let mut seen = Vec::new();
    for file in doc_files() {
        let shown = file.strip_prefix(ROOT).unwrap().display().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        for (line, example) in json_examples(&text) {
            let v = match example {
                Ok(v) => v,
                Err(e) => {
                    failures.push(format!(
                        "{shown}:{line}: a ```json block that is not JSON: {e}"
                    ));
                    continue;
                }
            };
            let Some(kind) = Message::of(&v) else {
                continue;
            };
            seen.push(kind);
            let (_, validator) = validators.iter().find(|(m, _)| *m == kind).unwrap();
            for e in errors(validator, &v) {
                failures.push(format!("{shown}:{line}: {kind:?} example: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The scan itself works: the contract's job and outcome examples are somewhere in the docs.
    assert!(seen.contains(&Message::Job), "no job example found");
    assert!(seen.contains(&Message::Outcome), "no outcome example found");
}

#[test]
fn the_examples_scanner_finds_what_the_docs_hold() {
    let md = "text\n```json\n{\"id\": \"a\", \"to\": \"+491701234567\", \"category\": \"service\"}\n```\n\
              ```jsonl\n{\"id\":\"a\",\"status\":\"sent\"}\n{\"id\":\"b\",\"status\":\"read\"}\n```\n\
              ```sh\ncurl -d '{\"from\":\"+4917\"}' x && y --json '{\"type\":\"opt_in\",\"to\":\"+1\",\"at\":\"t\"}'\n\
              z <<'J'\n{\"id\":\"c\",\"to\":\"+1\",\"text\":{}}\nJ\n```\n\
              ```json\n{ not json }\n```\n";
    let found = json_examples(md);
    let kinds: Vec<Option<Message>> = found
        .iter()
        .map(|(_, v)| v.as_ref().ok().and_then(Message::of))
        .collect();
    assert_eq!(
        kinds,
        [
            Some(Message::Job),
            Some(Message::Outcome),
            Some(Message::Outcome),
            None,
            Some(Message::Consent),
            Some(Message::Job),
            None
        ]
    );
    assert!(
        found.last().unwrap().1.is_err(),
        "a broken ```json block is reported"
    );
    assert_eq!(found[0].0, 3, "line numbers point at the example");
}

// ---------------------------------------------------------------------------------------------
// What the decoders refuse, the schemas refuse (or the difference is listed)
// ---------------------------------------------------------------------------------------------

/// What a schema does with a message the decoder refuses.
#[derive(Debug, PartialEq, Eq)]
enum Schema {
    /// The schema refuses it too.
    Refuses,
    /// A rule no schema can state; docs/schema/README.md lists it under its reason code.
    CannotSay,
}

struct Case {
    what: &'static str,
    bytes: Vec<u8>,
    reason: &'static str,
    schema: Schema,
}

fn case(what: &'static str, v: Value, reason: &'static str, schema: Schema) -> Case {
    Case {
        what,
        bytes: serde_json::to_vec(&v).unwrap(),
        reason,
        schema,
    }
}

fn config() -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_config(
        dir.path(),
        "amqp://127.0.0.1:5672/%2f",
        &"127.0.0.1:9".parse().unwrap(),
        "token",
        10,
        "",
        "",
    );
    let config = Config::load(&path).unwrap();
    (dir, config)
}

fn good_job() -> Value {
    common::template_job("job-1", &common::number(1))
}

fn text_job(body: &str) -> Value {
    json!({
        "id": "text-1",
        "account": "acme-de",
        "to": common::number(1),
        "category": "service",
        "text": { "body": body, "preview_url": true },
    })
}

/// `base` with the fields of `changes` set; a field that is an object in both is changed
/// field by field (`{"template": {"name": ""}}` keeps the template's language).
fn with(mut base: Value, changes: Value) -> Value {
    let Value::Object(changes) = changes else {
        panic!("changes are an object")
    };
    for (k, v) in changes {
        match (base.get_mut(&k), v) {
            (Some(Value::Object(old)), Value::Object(new)) => old.extend(new),
            (_, v) => {
                base[&k] = v;
            }
        }
    }
    base
}

fn without(mut base: Value, field: &str) -> Value {
    base.as_object_mut().unwrap().remove(field);
    base
}

/// The schema's verdict on bytes: anything that is not JSON is refused by every validator.
fn schema_accepts(v: &jsonschema::Validator, bytes: &[u8]) -> bool {
    serde_json::from_slice::<Value>(bytes).is_ok_and(|j| v.is_valid(&j))
}

/// Checks each case against the decoder and the schema; returns the reasons of the cases the
/// schema cannot refuse.
fn check(
    cases: &[Case],
    decode: impl Fn(&[u8]) -> Result<(), Invalid>,
    schema: &str,
) -> Vec<&'static str> {
    let v = validator(schema);
    let mut wrong = Vec::new();
    let mut cannot = Vec::new();
    for c in cases {
        match decode(&c.bytes) {
            Err(i) if i.reason == c.reason => {}
            other => wrong.push(format!(
                "{}: the decoder should refuse it with {}, got {other:?}",
                c.what, c.reason
            )),
        }
        let accepted = schema_accepts(&v, &c.bytes);
        match (&c.schema, accepted) {
            (Schema::Refuses, false) | (Schema::CannotSay, true) => {}
            (Schema::Refuses, true) => {
                wrong.push(format!("{}: the schema accepts it ({})", c.what, c.reason))
            }
            (Schema::CannotSay, false) => wrong.push(format!(
                "{}: the schema now refuses it: remove it from the known differences here and in docs/schema/README.md",
                c.what
            )),
        }
        if c.schema == Schema::CannotSay {
            cannot.push(c.reason);
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    cannot
}

/// Each known difference is listed in docs/schema/README.md under its reason code.
fn assert_listed(reasons: &[&str], section: &str) {
    let readme = std::fs::read_to_string(schema_dir().join("README.md")).unwrap();
    let listed = readme
        .split("\n## ")
        .find(|s| s.starts_with(section))
        .unwrap_or_else(|| panic!("docs/schema/README.md has no section \"{section}\""));
    for r in reasons {
        assert!(
            listed.contains(&format!("`{r}`")),
            "docs/schema/README.md, \"{section}\", does not list `{r}`"
        );
    }
}

#[test]
fn every_kind_of_job_the_decoder_refuses_the_schema_refuses_or_lists() {
    use Schema::{CannotSay, Refuses};
    let (_dir, config) = config();
    let decoder = Decoder::new(&config);
    let job = good_job;
    let mut cases = vec![
        Case {
            what: "not JSON",
            bytes: b"{ this is not json".to_vec(),
            reason: "malformed",
            schema: Refuses,
        },
        Case {
            what: "a field given twice",
            bytes: br#"{"id": "a", "id": "b", "account": "acme-de", "to": "+491700000001",
                        "category": "service", "text": {"body": "hi"}}"#
                .to_vec(),
            reason: "malformed",
            schema: CannotSay,
        },
    ];
    let pad = "x".repeat(70 * 1024);
    #[rustfmt::skip]
    let table: Vec<(&'static str, Value, &'static str, Schema)> = vec![
        ("a typo in a field name", with(job(), json!({ "not_befor": "2026-01-01T00:00:00Z" })), "malformed", Refuses),
        ("an unknown category", with(job(), json!({ "category": "spam" })), "malformed", Refuses),
        ("no `to`", without(job(), "to"), "malformed", Refuses),
        ("no `id`", without(job(), "id"), "malformed", Refuses),
        ("no `category`", without(job(), "category"), "malformed", Refuses),
        ("`to` a number", with(job(), json!({ "to": 491701234567u64 })), "malformed", Refuses),
        ("`not_before` not a time", with(job(), json!({ "not_before": "tomorrow" })), "malformed", Refuses),
        ("a time without offset", with(job(), json!({ "not_before": "2026-11-28T09:00:00" })), "malformed", Refuses),
        ("an unknown template field", with(job(), json!({ "template": { "namespace": "x" } })), "malformed", Refuses),
        ("`preview_url` null", with(text_job("hi"), json!({ "text": { "preview_url": null } })), "malformed", Refuses),
        ("`opt_in_sources` a string", with(job(), json!({ "opt_in_sources": "website" })), "malformed", Refuses),
        ("over 64 KiB", with(job(), json!({ "metadata": { "pad": pad } })), "too_large", CannotSay),
        ("an empty id", with(job(), json!({ "id": "" })), "invalid_id", Refuses),
        ("an id with a control character", with(job(), json!({ "id": "bad\u{7}id" })), "invalid_id", Refuses),
        ("an id that is not ASCII", with(job(), json!({ "id": "jöb" })), "invalid_id", Refuses),
        ("an id of 129 characters", with(job(), json!({ "id": "i".repeat(129) })), "invalid_id", Refuses),
        ("an account not configured", with(job(), json!({ "account": "nobody" })), "unknown_account", CannotSay),
        ("a purpose not configured", with(job(), json!({ "purpose": "lottery" })), "unknown_purpose", CannotSay),
        ("marketing without purpose", without(job(), "purpose"), "missing_purpose", Refuses),
        ("utility with purpose null", with(job(), json!({ "category": "utility", "purpose": null })), "missing_purpose", Refuses),
        ("both template and text", with(job(), json!({ "text": { "body": "hi" } })), "invalid_content", Refuses),
        ("neither template nor text", without(job(), "template"), "invalid_content", Refuses),
        ("template null, no text", with(job(), json!({ "template": null })), "invalid_content", Refuses),
        ("a template without name", with(job(), json!({ "template": { "name": "" } })), "invalid_content", Refuses),
        ("a template without language", with(job(), json!({ "template": { "language": "" } })), "invalid_content", Refuses),
        ("components not an array", with(job(), json!({ "template": { "components": {} } })), "invalid_content", Refuses),
        ("an empty text body", text_job(""), "invalid_content", Refuses),
        ("a text body of 4097 characters", text_job(&"x".repeat(4097)), "invalid_content", Refuses),
        ("expires_at before not_before", with(job(), json!({ "not_before": "2026-02-01T00:00:00Z", "expires_at": "2026-01-01T00:00:00Z" })), "invalid_time", CannotSay),
        ("metadata a list", with(job(), json!({ "metadata": [1, 2] })), "invalid_metadata", Refuses),
        ("metadata a string", with(job(), json!({ "metadata": "campaign" })), "invalid_metadata", Refuses),
        ("metadata over 4 KiB", with(job(), json!({ "metadata": { "x": "y".repeat(5000) } })), "invalid_metadata", CannotSay),
        ("an unknown time zone", with(job(), json!({ "timezone": "Mars/Olympus_Mons" })), "invalid_timezone", CannotSay),
        ("a number without +", with(job(), json!({ "to": "491701234567" })), "invalid_number", Refuses),
        ("a number with spaces", with(job(), json!({ "to": "+49 170 1234567" })), "invalid_number", Refuses),
        ("a number of 7 digits", with(job(), json!({ "to": "+4917012" })), "invalid_number", Refuses),
        ("a number of 16 digits", with(job(), json!({ "to": "+4917012345678901" })), "invalid_number", Refuses),
        ("a number with no country code", with(job(), json!({ "to": "+99912345678" })), "invalid_number", Refuses),
        ("a number with letters", with(job(), json!({ "to": "+49170CALLME" })), "invalid_number", Refuses),
    ];
    cases.extend(
        table
            .into_iter()
            .map(|(what, v, reason, schema)| case(what, v, reason, schema)),
    );
    let cannot = check(
        &cases,
        |b| decoder.decode(b).map(|_| ()).map_err(|r| r.invalid),
        "job.schema.json",
    );
    assert_listed(&cannot, "Jobs");
}

#[test]
fn jobs_the_decoder_accepts_the_schema_accepts() {
    let (_dir, config) = config();
    let decoder = Decoder::new(&config);
    let v = validator("job.schema.json");
    let mut jobs = vec![
        good_job(),
        text_job("hi"),
        // Characters, not bytes: 4096 two-byte characters are a valid body.
        text_job(&"ä".repeat(4096)),
        with(good_job(), json!({ "id": "~".repeat(128) })),
        with(
            good_job(),
            json!({
                "not_before": "2026-11-28T09:00:00+02:00",
                "expires_at": "2026-11-29T09:00:00.123Z",
                "opt_in_sources": ["website_form"],
                "timezone": "Europe/Helsinki",
            }),
        ),
        // Null is absent, for every optional field.
        json!({
            "id": "nulls",
            "account": "acme-de",
            "to": common::number(2),
            "category": "authentication",
            "purpose": null,
            "template": { "name": "otp", "language": "en", "components": null },
            "text": null,
            "opt_in_sources": null,
            "not_before": null,
            "expires_at": null,
            "metadata": null,
            "timezone": null,
        }),
        with(good_job(), json!({ "to": "+14155550123" })),
        with(good_job(), json!({ "to": "+35840123" })),
        with(good_job(), json!({ "to": "+491701234567890" })),
    ];
    for category in ["marketing", "utility", "authentication", "service"] {
        jobs.push(with(good_job(), json!({ "category": category })));
    }
    for job in &jobs {
        let bytes = serde_json::to_vec(job).unwrap();
        assert!(decoder.decode(&bytes).is_ok(), "the decoder refuses {job}");
        assert!(
            v.is_valid(job),
            "the schema refuses {job}: {:?}",
            errors(&v, job)
        );
    }
}

#[test]
fn the_schema_knows_the_same_country_codes_as_the_decoder() {
    let (_dir, config) = config();
    let decoder = Decoder::new(&config);
    let v = validator("job.schema.json");
    let mut differ = Vec::new();
    // The decoder reads the calling code from the first one to three digits: every start.
    for start in 0..1000 {
        for to in [
            format!("+{start:03}12345"),
            format!("+{start:03}123456789012"),
        ] {
            let job = with(good_job(), json!({ "to": to.clone() }));
            let decoder_ok = decoder.decode(&serde_json::to_vec(&job).unwrap()).is_ok();
            let schema_ok = v.is_valid(&job);
            if decoder_ok != schema_ok {
                differ.push(format!("{to}: decoder {decoder_ok}, schema {schema_ok}"));
            }
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}

#[test]
fn times_the_decoder_reads_beyond_rfc_3339_are_listed() {
    // The decoder (jiff) reads some ISO 8601 forms that RFC 3339 does not allow; the schema
    // says RFC 3339, which is what the contract asks for. docs/schema/README.md says so.
    let (_dir, config) = config();
    let decoder = Decoder::new(&config);
    let v = validator("job.schema.json");
    for t in ["2026-11-28 09:00:00Z", "2026-11-28T09:00Z"] {
        let job = with(good_job(), json!({ "not_before": t }));
        assert!(
            decoder.decode(&serde_json::to_vec(&job).unwrap()).is_ok(),
            "{t}"
        );
        assert!(
            !v.is_valid(&job),
            "{t}: the schema accepts it now; update docs/schema/README.md"
        );
    }
    let readme = std::fs::read_to_string(schema_dir().join("README.md")).unwrap();
    assert!(readme.contains("2026-11-28 09:00:00Z"));
}

fn consent(kind: &str, purposes: &[&str], at: Timestamp) -> Value {
    json!({
        "type": kind,
        "account": "acme-de",
        "to": common::number(5),
        "purposes": purposes,
        "source": "website_form",
        "at": at.to_string(),
        "evidence": "checkbox ticked",
    })
}

fn opt_in() -> Value {
    consent("opt_in", &["newsletter"], Timestamp::now())
}

#[test]
fn every_kind_of_consent_event_the_decoder_refuses_the_schema_refuses_or_lists() {
    use Schema::{CannotSay, Refuses};
    let (_dir, config) = config();
    let decoder = EventDecoder::new(&config);
    let now = Timestamp::now();
    let many: Vec<String> = (0..8000).map(|i| format!("purpose-{i}")).collect();
    let day = std::time::Duration::from_secs(86400);
    let mut cases = vec![Case {
        what: "not JSON",
        bytes: b"opt_in please".to_vec(),
        reason: "malformed",
        schema: Refuses,
    }];
    #[rustfmt::skip]
    let table: Vec<(&'static str, Value, &'static str, Schema)> = vec![
        ("an unknown type", with(opt_in(), json!({ "type": "maybe" })), "malformed", Refuses),
        ("`purpose` for `purposes`", with(without(opt_in(), "purposes"), json!({ "purpose": ["newsletter"] })), "malformed", Refuses),
        ("no `at`", without(opt_in(), "at"), "malformed", Refuses),
        ("`at` not a time", with(opt_in(), json!({ "at": "yesterday" })), "malformed", Refuses),
        ("over 64 KiB", with(opt_in(), json!({ "purposes": many })), "too_large", CannotSay),
        ("an account not configured", with(opt_in(), json!({ "account": "acme-xx" })), "unknown_account", CannotSay),
        ("a short number", with(opt_in(), json!({ "to": "+49123" })), "invalid_number", Refuses),
        ("a purpose not configured", consent("opt_in", &["lottery"], now), "unknown_purpose", CannotSay),
        ("an opt_in without purposes", consent("opt_in", &[], now), "missing_purpose", Refuses),
        ("an opt_in with purposes null", with(opt_in(), json!({ "purposes": null })), "missing_purpose", Refuses),
        ("an opt_in without source", without(opt_in(), "source"), "missing_source", Refuses),
        ("an opt_in with an empty source", with(opt_in(), json!({ "source": "" })), "missing_source", Refuses),
        ("a source of 129 characters", with(opt_in(), json!({ "source": "s".repeat(129) })), "invalid_source", Refuses),
        ("a source of 100 characters, 200 bytes", with(opt_in(), json!({ "source": "ä".repeat(100) })), "invalid_source", CannotSay),
        ("evidence of 4097 characters", with(opt_in(), json!({ "evidence": "e".repeat(4097) })), "invalid_evidence", Refuses),
        ("evidence of 3000 characters, 6000 bytes", with(opt_in(), json!({ "evidence": "ä".repeat(3000) })), "invalid_evidence", CannotSay),
        ("`at` a day ahead", consent("opt_in", &["newsletter"], now + day), "invalid_time", CannotSay),
        ("`at` before 2000", with(opt_in(), json!({ "at": "1999-12-31T23:59:59Z" })), "invalid_time", CannotSay),
    ];
    cases.extend(
        table
            .into_iter()
            .map(|(what, v, reason, schema)| case(what, v, reason, schema)),
    );
    let cannot = check(
        &cases,
        |b| decoder.decode(b, now).map(|_| ()),
        "consent-event.schema.json",
    );
    assert_listed(&cannot, "Consent events");
}

#[test]
fn consent_events_the_decoder_accepts_and_those_sendwell_publishes_validate() {
    let (_dir, config) = config();
    let decoder = EventDecoder::new(&config);
    let v = validator("consent-event.schema.json");
    let now = Timestamp::now();
    let events = [
        consent("opt_in", &["newsletter"], now),
        consent("confirm", &[], now),
        without(consent("opt_out", &[], now), "source"),
        // Null is absent, for every optional field.
        json!({
            "type": "erase",
            "account": "acme-de",
            "to": common::number(5),
            "at": now.to_string(),
            "purposes": null,
            "source": null,
            "evidence": null,
        }),
        // Bytes, not characters: 2048 two-byte characters are the most evidence there is.
        with(opt_in(), json!({ "evidence": "ä".repeat(2048) })),
    ];
    for e in &events {
        let decoded = decoder
            .decode(&serde_json::to_vec(e).unwrap(), now)
            .unwrap_or_else(|i| panic!("the decoder refuses {e}: {i:?}"));
        assert!(v.is_valid(e), "the schema refuses {e}: {:?}", errors(&v, e));
        // What sendwell publishes to sendwell.consent and stores as proof: the canonical form.
        let published: Value = serde_json::from_slice(&decoded.to_json()).unwrap();
        assert!(
            v.is_valid(&published),
            "the schema refuses the canonical {published}: {:?}",
            errors(&v, &published)
        );
    }
}

#[test]
fn every_outcome_event_the_code_builds_validates() {
    let (_dir, config) = config();
    let decoder = Decoder::new(&config);
    let v = validator("outcome.schema.json");
    let job = decoder
        .decode(&serde_json::to_vec(&good_job()).unwrap())
        .unwrap();
    let outcomes = [
        Outcome::Sent {
            wamid: "wamid.X".into(),
            attempts: 1,
            estimated_cost: Some(sendwell::pricing::Micros(113_100)),
        },
        Outcome::Sent {
            wamid: "wamid.X".into(),
            attempts: 2,
            estimated_cost: None,
        },
        Outcome::Suppressed {
            reason: "no_consent",
            detail: "no opt-in".into(),
        },
        Outcome::Failed {
            reason: "undeliverable",
            detail: "(#131026) …".into(),
            code: Some(131026),
            attempts: 1,
        },
        Outcome::Failed {
            reason: "ambiguous",
            detail: "timed out".into(),
            code: None,
            attempts: 3,
        },
        Outcome::Expired {
            detail: "expires_at passed".into(),
            attempts: 0,
        },
        Outcome::Invalid(Invalid::new("invalid_content", "bad")),
        Outcome::Duplicate,
    ];
    for o in &outcomes {
        let bytes = OutcomeEvent::for_job(&job, o, Timestamp::now(), "EUR").to_json();
        let e: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v.is_valid(&e), "{e}: {:?}", errors(&v, &e));
    }
    // An unusable job's outcome, as the consumer builds it from what could be read.
    let invalid = OutcomeEvent {
        id: "bad\u{7}id",
        account: "",
        to: "",
        status: "invalid",
        reason: Some("malformed"),
        detail: Some("expected value at line 1 column 3".into()),
        wamid: None,
        attempts: 0,
        estimated_cost: None,
        at: Timestamp::now(),
        metadata: None,
        error_code: None,
        category: None,
    };
    let e: Value = serde_json::from_slice(&invalid.to_json()).unwrap();
    assert!(v.is_valid(&e), "{e}: {:?}", errors(&v, &e));
    // Not an outcome: a status nobody publishes.
    let mut wrong = e.clone();
    wrong["status"] = "deferred".into();
    assert!(!v.is_valid(&wrong));
}

// ---------------------------------------------------------------------------------------------
// The AsyncAPI document
// ---------------------------------------------------------------------------------------------

fn asyncapi() -> Value {
    let text = std::fs::read_to_string(schema_dir().join("asyncapi.yaml")).unwrap();
    yaml_to_json(&text)
}

/// Every `$ref` in a document, with its JSON pointer.
fn refs(v: &Value, at: String, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if k == "$ref" {
                    out.push((at.clone(), x.as_str().unwrap_or_default().to_string()));
                } else {
                    refs(x, format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                refs(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Follows a reference from the AsyncAPI document: `#/pointer` inside it, or `file#/pointer`
/// to a file beside it, which must be one of the generated schemas.
fn resolve(doc: &Value, reference: &str) -> Result<Value, String> {
    let (file, pointer) = reference.split_once('#').unwrap_or((reference, ""));
    let target = if file.is_empty() {
        doc.clone()
    } else {
        let name = file.trim_start_matches("./");
        if !sendwell::schema::all().iter().any(|(f, _)| *f == name) {
            return Err(format!("{file} is not a generated schema in docs/schema/"));
        }
        let text =
            std::fs::read_to_string(schema_dir().join(name)).map_err(|e| format!("{file}: {e}"))?;
        serde_json::from_str(&text).map_err(|e| format!("{file}: {e}"))?
    };
    target
        .pointer(pointer)
        .cloned()
        .ok_or_else(|| format!("{reference}: nothing at {pointer:?}"))
}

#[test]
fn the_asyncapi_document_is_3_0_and_every_reference_resolves() {
    let doc = asyncapi();
    let version = doc["asyncapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3.0."), "asyncapi: {version:?}");
    let mut all = Vec::new();
    refs(&doc, String::new(), &mut all);
    assert!(all.len() > 10, "{all:?}");
    let broken: Vec<String> = all
        .iter()
        .filter_map(|(at, r)| resolve(&doc, r).err().map(|e| format!("{at}: {e}")))
        .collect();
    assert!(broken.is_empty(), "{}", broken.join("\n"));
    // Each of the three schemas is a message's payload.
    for (file, _) in sendwell::schema::all() {
        assert!(
            all.iter().any(|(_, r)| r == &format!("./{file}")),
            "no message refers to {file}"
        );
    }
}

#[test]
fn the_asyncapi_message_examples_validate_against_their_payload_schemas() {
    let doc = asyncapi();
    let messages = doc["components"]["messages"].as_object().unwrap();
    let mut checked = 0;
    for (name, m) in messages {
        let Some(r) = m["payload"]["schema"]["$ref"].as_str() else {
            continue;
        };
        let v = validator(r.trim_start_matches("./"));
        for ex in m["examples"].as_array().into_iter().flatten() {
            let payload = &ex["payload"];
            assert!(
                v.is_valid(payload),
                "{name} example: {:?}",
                errors(&v, payload)
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "{checked} examples");
}

#[test]
fn the_asyncapi_document_names_the_topology_the_daemon_declares() {
    use sendwell::amqp::topology::{
        CONSENT_EXCHANGE, DEAD, DELAY_TIERS, DELIVERY_LIMIT, JOBS_EXCHANGE, OUTCOMES_EXCHANGE,
        WEBHOOKS_EXCHANGE,
    };
    let doc = asyncapi();
    let ch = &doc["channels"];
    let exchange = |c: &str| ch[c]["bindings"]["amqp"]["exchange"]["name"].clone();
    assert_eq!(exchange("jobs"), JOBS_EXCHANGE);
    assert_eq!(exchange("outcomes"), OUTCOMES_EXCHANGE);
    assert_eq!(exchange("consent"), CONSENT_EXCHANGE);
    assert_eq!(
        exchange("statuses"),
        sendwell::amqp::topology::STATUSES_EXCHANGE
    );
    assert_eq!(ch["dead"]["bindings"]["amqp"]["queue"]["name"], DEAD);
    assert_eq!(
        ch["jobsShard"]["address"],
        format!("{JOBS_EXCHANGE}.{{shard}}")
    );
    assert_eq!(
        ch["consentShard"]["address"],
        format!("{CONSENT_EXCHANGE}.{{shard}}")
    );
    assert_eq!(
        ch["webhooks"]["address"],
        format!("{WEBHOOKS_EXCHANGE}.{{shard}}")
    );
    assert_eq!(
        ch["jobsShard"]["bindings"]["amqp"]["x-arguments"]["x-delivery-limit"],
        DELIVERY_LIMIT
    );
    let tiers: Vec<&str> = DELAY_TIERS.iter().map(|(t, _)| *t).collect();
    assert_eq!(ch["delay"]["parameters"]["tier"]["enum"], json!(tiers));
    let names = sendwell::amqp::topology::Names::new(7);
    assert_eq!(
        names.delay_queue("1s"),
        ch["delay"]["address"]
            .as_str()
            .unwrap()
            .replace("{tier}", "1s")
    );
}

fn yaml_to_json(text: &str) -> Value {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("asyncapi.yaml is not YAML: {e}"))
}
