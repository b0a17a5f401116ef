//! Criterion micro-benches for the per-job hot functions: decode + validate, E.164 parsing,
//! the consent check (small cache; `benches/consent.rs` measures it at 10 million records),
//! request body building, outcome event encoding, error classification.
//! Run: `cargo bench --bench hot`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sendwell::cloud_api::classify::classify_response;
use sendwell::cloud_api::request::build_body;
use sendwell::config::Config;
use sendwell::consent::{ConsentStore, Decision, EventDecoder};
use sendwell::job::{Outcome, OutcomeEvent};
use sendwell::phone::parse_e164;
use sendwell::pipeline::decode::Decoder;
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
        b.iter(|| build_body(black_box(&job), None, "job-1\u{1f}0"))
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

    // The metrics of one sent job, with the Prometheus recorder installed as in the daemon:
    // through sendwell's cached handles, and the same series through the `metrics` macros
    // (which allocate the labels and look the series up on every call), side by side.
    let _recorder = sendwell::app::metrics_handle();
    let took = Duration::from_millis(120);
    c.bench_function("metrics_of_a_sent_job_cached", |b| {
        b.iter(|| {
            let account = black_box("acme-de");
            sendwell::metrics::limit_wait(account, "throughput", Duration::ZERO);
            sendwell::metrics::api_request(account, "ok", None, took);
            sendwell::metrics::estimated_cost(account, "marketing", "DE", "EUR", 113_100);
            sendwell::metrics::spend(account, "EUR", 113_100);
            sendwell::metrics::job_finished(account, "sent", None);
            sendwell::metrics::job_age(account, "sent", took);
        })
    });
    c.bench_function("metrics_of_a_sent_job_macros", |b| {
        use metrics::{counter, gauge, histogram};
        use sendwell::metrics as m;
        b.iter(|| {
            let account = black_box("acme-de");
            histogram!(m::LIMIT_WAIT, "account" => account.to_string(), "limit" => "throughput")
                .record(0.0);
            counter!(m::API_REQUESTS, "account" => account.to_string(), "result" => "ok", "code" => String::new())
                .increment(1);
            histogram!(m::API_LATENCY, "account" => account.to_string()).record(0.12);
            counter!(m::ESTIMATED_COST, "account" => account.to_string(), "category" => "marketing".to_string(), "country" => "DE".to_string(), "currency" => "EUR".to_string())
                .increment(113_100);
            gauge!(m::SPEND, "account" => account.to_string(), "currency" => "EUR".to_string())
                .set(113_100.0);
            counter!(m::JOBS_FINISHED, "account" => account.to_string(), "status" => "sent", "reason" => "")
                .increment(1);
            histogram!(m::JOB_AGE, "account" => account.to_string(), "status" => "sent").record(0.12);
        })
    });
}

criterion_group!(hot, benches);
criterion_main!(hot);
