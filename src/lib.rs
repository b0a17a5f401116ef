//! sendwell sends WhatsApp messages for businesses: only to people who asked, never too often,
//! at the Cloud API's full speed, with every outcome visible.
//!
//! # A map of the crate, following one job through the house
//!
//! ```text
//!  RabbitMQ ─► amqp::consumer ─► pipeline::decode ─► pipeline::dedupe ─► consent ─► pipeline::dispatch ─► cloud_api::client
//!  sendwell.jobs.<shard>            (validate)        (store::ledger)    (cache)   (retries, pause)      (POST /messages)
//!                                                                                 │
//!  sendwell.outcomes ◄── amqp::publisher (confirmed) ◄── worker: ledger.finalize ◄┘ ──► ack
//!  sendwell.delay.*  ◄── deferrals and long retries come back by TTL + dead-letter through sendwell.jobs
//!  sendwell.dead     ◄── invalid jobs and consent events, with header x-sendwell-reason
//!  sendwell.consent  ──► amqp::consumer ─► consent::store (history, summary, cache) ◄── webhook STOP / YES
//! ```
//!
//! - [`config`]: one TOML file + `SENDWELL_<SECTION>__<KEY>` overrides + secret files, validated
//!   as a whole before anything binds (bad config: exit 64).
//! - [`job`]: the job as upstream sends it, the validated job, and the [`job::Outcome`] that
//!   decides the ack, the outcome event and the metric; [`phone`]: E.164 parsing, a leaf every
//!   stage that reads a number uses.
//! - [`pipeline`]: `process(job) -> Outcome`, one file per stage in data-path order, with the
//!   limits (`pipeline::limits`: throughput, pacing, tiers, caps, quiet hours) and the cost
//!   estimate and spend guard (`pipeline::spend`).
//! - [`consent`]: the consent rule (`decide`), the in-memory cache every job is checked
//!   against, the history kept as proof, STOP/START/YES in conversation, the GDPR tools.
//! - [`amqp`]: the broker edge: topology, consuming with reconnect, confirmed publishing.
//! - [`cloud_api`]: the Cloud API edge: request building, the HTTP client, the error
//!   classifier.
//! - [`sandbox`]: the built-in stand-in for Meta (the send endpoint, failure injection, signed
//!   webhooks back, customers' messages), for tests and for trying sendwell without Meta.
//! - [`store`]: the embedded redb store (the idempotency ledger, consent, webhook state).
//! - [`http`]: the admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`metrics`]: every metric name and its description, in one place; [`health`]: whether the
//!   pipeline makes progress, fed by the same calls; [`log_every`]: log lines for what can
//!   happen on every job, once per key per interval; [`logging`]: the log's format and filters
//!   (PostgreSQL's statement parameters never reach it).
//! - [`instances`]: this process as one of several instances on one PostgreSQL state: its
//!   identity, its role (active while the broker delivers its shard's jobs queue to it, else
//!   standby), the hooks that run when it takes over, and the registry whose live shards set each
//!   account's rate share.
//! - [`notify`]: systemd's notify protocol: READY, STATUS, STOPPING and the watchdog.
//! - [`app`]: wiring: tasks, readiness, shutdown order.
//! - [`publish`]: the `sendwell publish` tool for upstream developers.
//! - [`schema`]: the contract's messages as JSON Schemas, generated from the types above
//!   (docs/schema/ holds them, with an AsyncAPI document of the topology).
//! - [`ops`]: the operator tools: `dead list | replay` over the dead letters, and
//!   `state backup | restore` over a stopped daemon's store.

pub mod amqp;
pub mod app;
pub mod clock;
pub mod cloud_api;
pub mod config;
pub mod consent;
pub mod health;
pub mod http;
pub mod instances;
pub mod job;
pub mod log_every;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod ops;
pub mod phone;
pub mod pipeline;
pub mod pricing;
pub mod privacy;
pub mod publish;
pub mod sandbox;
pub mod schema;
pub mod store;
pub mod webhook;
