//! Criterion micro-benches for the per-job hot functions: decode + validate, E.164 parsing,
//! the consent check (small cache; `benches/consent.rs` measures it at 10 million records),
//! request body building, outcome event encoding, error classification.
//! Run: `cargo bench --bench hot`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sendwell::cloud_api::classify::classify_response;
use sendwell::cloud_api::request::build_body;
use sendwell::config::Config;
use sendwell::consent::{ConsentStore, Decision, EventDecoder};
use sendwell::job::{Outcome, OutcomeEvent};
use sendwell::pipeline::decode::{Decoder, parse_e164};
use sendwell::store::Ledger;

const JOB: &[u8] = br#"{
  "id": "7f0c1d2e-5a8b-4c11-9f3e-2b7d9c0a1e55",
  "account": "acme-de",
  "to": "+491701234567",
  "category": "marketing",
  "purpose": "newsletter",
  "template": { "name": "spring_sale", "language": "de", "components": [
    { "type": "body", "parameters": [ { "type": "text", "text": "Jessica" } ] } ] },
  "not_before": "2026-11-28T09:00:00Z",
  "expires_at": "2026-11-29T09:00:00Z",
  "metadata": { "campaign": "spring-2027" }
}"#;

fn config() -> Config {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t").unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "[[purposes]]\nname = \"newsletter\"\n[[accounts]]\nname = \"acme-de\"\nphone_number_id = \"1\"\ntoken_file = \"token\"\n",
    )
    .unwrap();
    Config::load(&p).unwrap()
}

fn benches(c: &mut Criterion) {
    let config = config();
    let d = Decoder::new(&config);
    c.bench_function("decode_and_validate_job", |b| {
        b.iter(|| d.decode(black_box(JOB)).unwrap())
    });
    c.bench_function("parse_e164", |b| {
        b.iter(|| parse_e164(black_box("+491701234567")).unwrap())
    });
    let job = d.decode(JOB).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(async {
        let store = ConsentStore::load(Ledger::open_in_memory().unwrap(), &config)
            .await
            .unwrap();
        let decoder = EventDecoder::new(&config);
        for kind in ["opt_in", "confirm"] {
            let ev = format!(
                r#"{{"type":"{kind}","account":"acme-de","to":"+491701234567","purposes":["newsletter"],"source":"web","at":"2026-11-01T00:00:00Z"}}"#
            );
            let ev = decoder.decode(ev.as_bytes(), jiff::Timestamp::now()).unwrap();
            store.apply(&ev).await.unwrap();
        }
        store
    });
    let now = jiff::Timestamp::now();
    assert_eq!(store.check(&job, now), Decision::Allow);
    c.bench_function("consent_check", |b| {
        b.iter(|| store.check(black_box(&job), now))
    });
    c.bench_function("build_request_body", |b| {
        b.iter(|| build_body(black_box(&job), None))
    });
    let outcome = Outcome::Sent {
        wamid: "wamid.HBgLNDkxNzAxMjM0NTY3FQIAERgSQ0Y".into(),
        attempts: 1,
        estimated_cost: Some(sendwell::pricing::Micros(113_100)),
    };
    c.bench_function("encode_outcome_event", |b| {
        b.iter(|| {
            OutcomeEvent::for_job(black_box(&job), &outcome, jiff::Timestamp::now(), "EUR")
                .to_json()
        })
    });
    c.bench_function("classify_error", |b| {
        b.iter(|| classify_response(400, black_box(Some(130429)), String::new(), None))
    });
}

criterion_group!(hot, benches);
criterion_main!(hot);
