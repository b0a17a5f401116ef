//! Every metric name, its description, and the small functions that emit them together with
//! their log line, so a log and a counter never disagree. Labels are bounded: account names from
//! config, statuses, reasons and Meta error codes; never a number, wamid or job id.

use std::hash::{BuildHasher, Hasher};
use std::sync::LazyLock;
use std::time::Duration;

use dashmap::DashMap;
use metrics::{
    Counter, Gauge, Histogram, Label, Unit, counter, describe_counter, describe_gauge,
    describe_histogram, gauge, histogram,
};

/// Handles of the series emitted for every job, registered once. `counter!` with labels
/// allocates each label and looks the series up in the recorder's registry on every call: a few
/// hundred ns, ten times per job, in the load bench's profile. Here a hit hashes the label
/// values and compares them, without allocating. (Registered with the recorder installed at
/// start, `app::metrics_handle`, which comes before any job.)
struct Cached<H> {
    series: DashMap<u64, Vec<Series<H>>, foldhash::fast::FixedState>,
}

/// (name and label values, handle).
type Series<H> = (Box<[Box<str>]>, H);

impl<H: Clone> Cached<H> {
    fn new() -> Self {
        Self {
            series: DashMap::with_hasher(foldhash::fast::FixedState::default()),
        }
    }

    fn get(
        &self,
        name: &'static str,
        labels: &[(&'static str, &str)],
        register: impl FnOnce(&'static str, Vec<Label>) -> H,
    ) -> H {
        let mut h = foldhash::fast::FixedState::with_seed(0x5e9d).build_hasher();
        h.write(name.as_bytes());
        for (_, v) in labels {
            h.write_u8(0xff);
            h.write(v.as_bytes());
        }
        let key = h.finish();
        let same = |vals: &[Box<str>]| {
            vals.len() == labels.len() + 1
                && *vals[0] == *name
                && vals[1..].iter().zip(labels).all(|(a, (_, b))| **a == **b)
        };
        if let Some(found) = self.series.get(&key)
            && let Some((_, handle)) = found.iter().find(|(vals, _)| same(vals))
        {
            return handle.clone();
        }
        let mut entry = self.series.entry(key).or_default();
        if let Some((_, handle)) = entry.iter().find(|(vals, _)| same(vals)) {
            return handle.clone();
        }
        let handle = register(
            name,
            labels
                .iter()
                .map(|(k, v)| Label::new(*k, v.to_string()))
                .collect(),
        );
        let vals = std::iter::once(name.into())
            .chain(labels.iter().map(|(_, v)| (*v).into()))
            .collect();
        entry.push((vals, handle.clone()));
        handle
    }
}

static COUNTERS: LazyLock<Cached<Counter>> = LazyLock::new(Cached::new);
static GAUGES: LazyLock<Cached<Gauge>> = LazyLock::new(Cached::new);
static HISTOGRAMS: LazyLock<Cached<Histogram>> = LazyLock::new(Cached::new);

fn cached_counter(name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
    COUNTERS.get(name, labels, |n, l| counter!(n, l))
}

fn cached_gauge(name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
    GAUGES.get(name, labels, |n, l| gauge!(n, l))
}

fn cached_histogram(name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
    HISTOGRAMS.get(name, labels, |n, l| histogram!(n, l))
}

pub const JOBS_RECEIVED: &str = "sendwell_jobs_received_total";
pub const JOBS_FINISHED: &str = "sendwell_jobs_finished_total";
pub const JOBS_DEFERRED: &str = "sendwell_jobs_deferred_total";
pub const JOBS_DEAD_LETTERED: &str = "sendwell_jobs_dead_lettered_total";
pub const JOBS_REROUTED: &str = "sendwell_jobs_rerouted_total";
pub const JOBS_SENT_UNRECORDED: &str = "sendwell_jobs_sent_unrecorded_total";
pub const JOBS_IN_FLIGHT: &str = "sendwell_jobs_in_flight";
pub const API_REQUESTS: &str = "sendwell_api_requests_total";
pub const API_LATENCY: &str = "sendwell_api_request_duration_seconds";
pub const API_RETRIES: &str = "sendwell_api_retries_total";
pub const BROKER_RECONNECTS: &str = "sendwell_broker_reconnects_total";
pub const BROKER_CONNECTED: &str = "sendwell_broker_connected";
pub const ACKS: &str = "sendwell_acks_total";
pub const ACCOUNT_PAUSED: &str = "sendwell_account_paused";
pub const ACCOUNT_PAUSES: &str = "sendwell_account_pauses_total";
pub const WEBHOOK_REQUESTS: &str = "sendwell_webhook_requests_total";
pub const WEBHOOK_EVENTS: &str = "sendwell_webhook_events_total";
pub const WEBHOOK_DUPLICATES: &str = "sendwell_webhook_duplicates_total";
pub const WEBHOOK_STATUS_BATCHES: &str = "sendwell_webhook_status_batches_total";
pub const WEBHOOK_BATCHED_STATUSES: &str = "sendwell_webhook_batched_statuses_total";
pub const WEBHOOK_UNMATCHED: &str = "sendwell_webhook_unmatched_total";
pub const WEBHOOK_ERRORS: &str = "sendwell_webhook_errors_total";
pub const DELIVERY_STATUSES: &str = "sendwell_delivery_statuses_total";
pub const BILLED_COST: &str = "sendwell_billed_cost_microunits_total";
pub const PRICES_MISSING: &str = "sendwell_prices_missing_total";
pub const OPT_OUTS_LEARNED: &str = "sendwell_opt_outs_learned_total";
pub const INBOUND_MESSAGES: &str = "sendwell_inbound_messages_total";
pub const WA_IDS_LEARNED: &str = "sendwell_wa_ids_learned_total";
pub const WA_ID_RESOLUTIONS: &str = "sendwell_wa_id_resolutions_total";
pub const WA_ID_UNRESOLVED_OPT_OUTS: &str = "sendwell_wa_id_unresolved_opt_outs_total";
pub const TEMPLATE_STATUS: &str = "sendwell_template_status_updates_total";
pub const TEMPLATE_QUALITY: &str = "sendwell_template_quality_updates_total";
pub const MESSAGING_LIMIT: &str = "sendwell_messaging_limit_recipients";
pub const ACCOUNT_THROUGHPUT: &str = "sendwell_account_throughput_messages_per_second";
pub const ACCOUNT_UPDATES: &str = "sendwell_account_updates_total";
pub const CONSENT_EVENTS: &str = "sendwell_consent_events_total";
pub const CONSENT_CACHE_ENTRIES: &str = "sendwell_consent_cache_entries";
pub const CONSENT_ANSWERS: &str = "sendwell_consent_answers_total";
pub const CONSENT_MESSAGES: &str = "sendwell_consent_messages_total";
pub const TEMPLATES_WITHOUT_OPT_OUT: &str = "sendwell_templates_without_opt_out_total";
pub const ADMIN_REFUSED: &str = "sendwell_admin_requests_refused_total";
pub const LIMIT_WAIT: &str = "sendwell_limit_wait_seconds";
pub const ACCOUNT_RATE: &str = "sendwell_account_rate_messages_per_second";
pub const TIER_USAGE: &str = "sendwell_tier_usage_recipients";
pub const TIER_LIMIT: &str = "sendwell_tier_limit_recipients";
pub const LIMIT_STATE: &str = "sendwell_limit_state_entries";
pub const ESTIMATED_COST: &str = "sendwell_estimated_cost_microunits_total";
pub const JOB_AGE: &str = "sendwell_job_age_seconds";
pub const CONSENT_NUMBERS: &str = "sendwell_consent_numbers";
pub const SPEND: &str = "sendwell_spend_rolling_day_microunits";
pub const SPEND_BUDGET: &str = "sendwell_spend_budget_microunits";
pub const SPEND_GUARD: &str = "sendwell_spend_guard_active";
pub const QUEUE_MESSAGES: &str = "sendwell_queue_messages";
pub const STORE_WRITABLE: &str = "sendwell_store_writable";
pub const STORE_WRITE_FAILURES: &str = "sendwell_store_write_failures_total";
pub const STORE_READ_FAILURES: &str = "sendwell_store_read_failures_total";
pub const STORE_CLAIMS_LOST: &str = "sendwell_store_claims_lost_total";
pub const STORE_REOPENS: &str = "sendwell_store_reopens_total";
pub const STORE_COMPACTIONS: &str = "sendwell_store_compactions_total";
pub const STORE_COMPACTION_HELD: &str = "sendwell_store_compaction_held_seconds";
pub const CONSENT_FOLLOW_ROWS: &str = "sendwell_consent_follow_rows_total";
pub const CONSENT_FOLLOW_FAILURES: &str = "sendwell_consent_follow_failures_total";
pub const CONSENT_FOLLOW_LAG: &str = "sendwell_consent_follow_lag_seconds";
pub const INSTANCE_ACTIVE: &str = "sendwell_instance_active";
pub const INSTANCE_TAKEOVER_TIME: &str = "sendwell_instance_takeover_timestamp_seconds";
pub const INSTANCE_TAKEOVERS: &str = "sendwell_instance_takeovers_total";
pub const INSTANCE_TAKEOVER_DURATION: &str = "sendwell_instance_takeover_duration_seconds";
pub const STORE_LOCK_RETRIES: &str = "sendwell_store_lock_retries_total";
pub const INSTANCE_TAKING_OVER: &str = "sendwell_instance_taking_over_seconds";
pub const INSTANCE_TAKEOVER_HOOK_PANICS: &str = "sendwell_instance_takeover_hook_panics_total";
pub const INSTANCE_RATE_SHARE: &str = "sendwell_instance_rate_share";
pub const INSTANCES_LIVE: &str = "sendwell_instances_live";
pub const SHARDS_LIVE: &str = "sendwell_shards_live";
pub const INSTANCE_PROBES: &str = "sendwell_instance_probes_total";
pub const INSTANCE_HEARTBEAT_FAILURES: &str = "sendwell_instance_heartbeat_failures_total";
pub const QUOTA_LEASE: &str = "sendwell_quota_lease";
pub const QUOTA_GLOBAL_USE: &str = "sendwell_quota_global_use";
pub const QUOTA_RENEWALS: &str = "sendwell_quota_renewals_total";
/// Buckets of [`STORE_COMPACTION_HELD`]: a swap by copy takes milliseconds, a compaction in
/// place of a large file minutes.
pub const HELD_BUCKETS: &[f64] = &[0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0];

/// Every metric the daemon exports (histograms add `_bucket`, `_sum`, `_count`): what the
/// dashboard and the alert rules may query.
pub const ALL: &[&str] = &[
    JOBS_RECEIVED,
    JOBS_FINISHED,
    JOBS_DEFERRED,
    JOBS_DEAD_LETTERED,
    JOBS_REROUTED,
    JOBS_SENT_UNRECORDED,
    JOBS_IN_FLIGHT,
    API_REQUESTS,
    API_LATENCY,
    API_RETRIES,
    BROKER_RECONNECTS,
    BROKER_CONNECTED,
    ACKS,
    ACCOUNT_PAUSED,
    ACCOUNT_PAUSES,
    WEBHOOK_REQUESTS,
    WEBHOOK_EVENTS,
    WEBHOOK_DUPLICATES,
    WEBHOOK_STATUS_BATCHES,
    WEBHOOK_BATCHED_STATUSES,
    WEBHOOK_UNMATCHED,
    WEBHOOK_ERRORS,
    DELIVERY_STATUSES,
    BILLED_COST,
    PRICES_MISSING,
    OPT_OUTS_LEARNED,
    INBOUND_MESSAGES,
    WA_IDS_LEARNED,
    WA_ID_RESOLUTIONS,
    WA_ID_UNRESOLVED_OPT_OUTS,
    TEMPLATE_STATUS,
    TEMPLATE_QUALITY,
    MESSAGING_LIMIT,
    ACCOUNT_THROUGHPUT,
    ACCOUNT_UPDATES,
    CONSENT_EVENTS,
    CONSENT_CACHE_ENTRIES,
    CONSENT_ANSWERS,
    CONSENT_MESSAGES,
    TEMPLATES_WITHOUT_OPT_OUT,
    ADMIN_REFUSED,
    LIMIT_WAIT,
    ACCOUNT_RATE,
    TIER_USAGE,
    TIER_LIMIT,
    LIMIT_STATE,
    ESTIMATED_COST,
    JOB_AGE,
    CONSENT_NUMBERS,
    SPEND,
    SPEND_BUDGET,
    SPEND_GUARD,
    QUEUE_MESSAGES,
    STORE_WRITABLE,
    STORE_WRITE_FAILURES,
    STORE_READ_FAILURES,
    STORE_CLAIMS_LOST,
    STORE_REOPENS,
    STORE_COMPACTIONS,
    STORE_COMPACTION_HELD,
    CONSENT_FOLLOW_ROWS,
    CONSENT_FOLLOW_FAILURES,
    CONSENT_FOLLOW_LAG,
    INSTANCE_ACTIVE,
    INSTANCE_TAKEOVER_TIME,
    INSTANCE_TAKEOVERS,
    INSTANCE_TAKEOVER_DURATION,
    INSTANCE_TAKING_OVER,
    INSTANCE_TAKEOVER_HOOK_PANICS,
    STORE_LOCK_RETRIES,
    INSTANCE_RATE_SHARE,
    INSTANCES_LIVE,
    SHARDS_LIVE,
    INSTANCE_PROBES,
    INSTANCE_HEARTBEAT_FAILURES,
    QUOTA_LEASE,
    QUOTA_GLOBAL_USE,
    QUOTA_RENEWALS,
    // From metrics-process (see PROCESS), under the names Prometheus's clients use.
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_virtual_memory_max_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
];

/// Buckets from 1 ms to 10 s, for inline limit waits (longer waits become deferrals).
pub const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets from 50 ms to 6 h, for the publish-to-outcome age of jobs (deferrals included).
pub const AGE_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0,
];

/// Buckets from 10 ms to 30 s, for the API latency histogram.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// The process's own figures (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// open fds, threads, start time), as Prometheus's Go client exports them: with
/// `sendwell_jobs_finished_total` they give the CPU per job in production, the figure the load
/// bench measures. Read from `/proc/self` at each scrape ([`collect_process`]).
static PROCESS: LazyLock<metrics_process::Collector> =
    LazyLock::new(metrics_process::Collector::default);

/// Refreshes the process figures; called by `/metrics` before it renders.
pub fn collect_process() {
    PROCESS.collect();
}

pub fn describe() {
    PROCESS.describe();
    describe_counter!(
        ESTIMATED_COST,
        "Estimated cost of sent messages at send time, from the price table, in millionths of its currency, by account, category and recipient country (ISO 3166)."
    );
    describe_histogram!(
        JOB_AGE,
        Unit::Seconds,
        "From a job's publication (AMQP timestamp) to its final outcome, by account and status."
    );
    describe_gauge!(
        CONSENT_NUMBERS,
        "Consent held now: opted_in = (account, number, purpose) with a current opt-in; opted_out = (account, number) opted out of every purpose. Refreshed every minute."
    );
    describe_gauge!(
        SPEND,
        "Estimated spend over the trailing 24 hours, in millionths of the price table's currency, by account."
    );
    describe_gauge!(
        SPEND_BUDGET,
        "The account's daily budget (estimated spend over a rolling day), in millionths of the currency."
    );
    describe_gauge!(
        SPEND_GUARD,
        "1 while the account's daily budget is spent and its guarded categories (marketing by default) are held back."
    );
    describe_gauge!(
        STORE_WRITABLE,
        "1 while the state store takes writes; 0 while it cannot (full disk, I/O error): no new jobs are taken and sent jobs wait to be recorded."
    );
    describe_counter!(
        STORE_WRITE_FAILURES,
        "Store write batches that failed with an I/O error (each is retried on a reopened store)."
    );
    describe_counter!(
        STORE_READ_FAILURES,
        "Jobs whose ledger entry could not be read (the store unreachable): each left queued and redelivered once the store answers."
    );
    describe_counter!(
        STORE_CLAIMS_LOST,
        "Send attempts not made because the job's ledger entry changed between reading and recording it (another delivery of the id, on another instance, decided first); the job goes back to its queue and is decided again."
    );
    describe_counter!(
        STORE_REOPENS,
        "Reopenings of the state store after an I/O error, by result (ok, failed)."
    );
    describe_counter!(
        STORE_COMPACTIONS,
        "Compactions of the state store after erasures, by kind (copy: beside the running store; in_place, in_place_no_room: the store held alone) and result (ok, failed)."
    );
    describe_histogram!(
        STORE_COMPACTION_HELD,
        Unit::Seconds,
        "How long each compaction held the state store alone (jobs and webhook events waited meanwhile), by kind."
    );
    describe_counter!(
        CONSENT_FOLLOW_ROWS,
        "Rows of the consent cache's tables (table: consent_summary, wa_ids) that the consent follower read from PostgreSQL and applied to memory: changes other instances made (and this one's, read back). Not counted: keys skipped because this instance was writing them."
    );
    describe_counter!(
        CONSENT_FOLLOW_FAILURES,
        "Polls of the consent follower that failed (the database unreachable); each is retried."
    );
    describe_gauge!(
        CONSENT_FOLLOW_LAG,
        Unit::Seconds,
        "Seconds since the consent follower's last successful poll (PostgreSQL only): how old, at most, the consent cache's view of other instances' changes is."
    );
    describe_gauge!(
        QUEUE_MESSAGES,
        "Messages ready in a queue (jobs: this shard's queue; dead: sendwell.dead), polled every 15 s."
    );
    describe_histogram!(
        LIMIT_WAIT,
        Unit::Seconds,
        "Time a send waited inline for a limit (throughput: the account's rate; pacing: the recipient pair), by account and limit."
    );
    describe_gauge!(
        ACCOUNT_RATE,
        "The account-wide rate this instance works from (msgs/s): the configured one, lower after Meta's 130429 while it recovers. This instance sends its share of it (sendwell_instance_rate_share)."
    );
    describe_gauge!(
        INSTANCE_RATE_SHARE,
        "Messages per second this instance may send for the account: its rate (sendwell_account_rate_messages_per_second) split evenly over the live shards of the registry (PostgreSQL; the whole rate on redb)."
    );
    describe_gauge!(
        INSTANCE_ACTIVE,
        "1 while this instance is its shard's active one (the broker delivers the shard's jobs queue to it), 0 while it is a standby."
    );
    describe_gauge!(
        INSTANCE_TAKEOVER_TIME,
        "When this instance last became its shard's active one (Unix seconds; 0: never since it started)."
    );
    describe_counter!(
        INSTANCE_TAKEOVERS,
        "Takeovers this instance completed (every takeover hook ran, then the shard's jobs were processed)."
    );
    describe_gauge!(
        INSTANCE_TAKEOVER_DURATION,
        "How long the last takeover took, from the first delivery to the end of its hooks (the shard's jobs waited meanwhile)."
    );
    describe_counter!(
        STORE_LOCK_RETRIES,
        "Tries of a per-number lock (consent apply, erasure) that found the number locked by another instance or task, and were tried again shortly (PostgreSQL). Steady growth: instances contending for one number, or one that holds its locks and stalls."
    );
    describe_gauge!(
        INSTANCE_TAKING_OVER,
        "How long the takeover in progress has held the shard's jobs so far (0 when none is): a value that keeps growing is a takeover stuck on a hook (the database not answering the consent follower's sync, for one)."
    );
    describe_counter!(
        INSTANCE_TAKEOVER_HOOK_PANICS,
        "Takeover hooks that panicked; the takeover went on without them (what they had to do, e.g. reading the consent changes, may be missing until the next takeover)."
    );
    describe_gauge!(
        INSTANCES_LIVE,
        "Instances with a live row in the registry (a heartbeat in the last 10 s), this one included; PostgreSQL only."
    );
    describe_gauge!(
        SHARDS_LIVE,
        "Distinct shards with a live instance in the registry; each account's rate is split over them. PostgreSQL only."
    );
    describe_counter!(
        INSTANCE_PROBES,
        "Probes on the shard's jobs queue, by direction: sent (while this instance had no delivery in its broker session) and received (acked, never processed as jobs)."
    );
    describe_counter!(
        INSTANCE_HEARTBEAT_FAILURES,
        "Registry writes (heartbeats, active_since notes) that failed; retried every 2 s while the shares stay as they were."
    );
    describe_gauge!(
        QUOTA_LEASE,
        "The lease this instance holds of a quota counted across instances (quota: tier, in recipients; budget, in millionths of the currency), by quota and name (portfolio or account): what it may count without a round trip, its use not yet durable included. PostgreSQL only."
    );
    describe_gauge!(
        QUOTA_GLOBAL_USE,
        "A quota's global use at this instance's last renewal: durably counted (every instance's tier or spend rows) + the live instances' leases. PostgreSQL only."
    );
    describe_counter!(
        QUOTA_RENEWALS,
        "Renewals of this instance's quota leases, by quota, name and result: granted (room to count), refused (nothing left: jobs needing it are deferred), failed (the database did not answer; retried)."
    );
    describe_gauge!(
        TIER_USAGE,
        "Distinct recipients counted toward the portfolio's daily messaging tier in the trailing 24 hours."
    );
    describe_gauge!(
        TIER_LIMIT,
        "The portfolio's daily unique-recipient tier (4294967295 = unlimited)."
    );
    describe_gauge!(
        LIMIT_STATE,
        "Entries held in memory by the limits (pacing pairs, frequency-cap logs), by kind: bounded by housekeeping."
    );
    describe_counter!(
        CONSENT_EVENTS,
        "Consent events applied, by type and result (new, replay, void: dated before an erasure, erased)."
    );
    describe_gauge!(
        CONSENT_CACHE_ENTRIES,
        "(account, number, purpose) entries in the in-memory consent cache."
    );
    describe_counter!(
        CONSENT_MESSAGES,
        "Messages sendwell sent for consent (double opt-in questions, STOP confirmations), by account, kind and result."
    );
    describe_counter!(
        CONSENT_ANSWERS,
        "Answers to double opt-in questions, by account and answer (yes, no)."
    );
    describe_counter!(
        TEMPLATES_WITHOUT_OPT_OUT,
        "Marketing template jobs whose template is not listed as carrying the opt-out, by account and action (warned, refused)."
    );
    describe_counter!(
        ADMIN_REFUSED,
        "Requests to the consent endpoints refused, by reason (peer, host, proxied, token)."
    );
    describe_counter!(JOBS_RECEIVED, "Send jobs taken from the shard queue.");
    describe_counter!(
        JOBS_FINISHED,
        "Jobs with a final outcome, by account, status and reason."
    );
    describe_counter!(
        JOBS_DEFERRED,
        "Jobs sent to a delay queue to come back later, by reason."
    );
    describe_counter!(
        JOBS_DEAD_LETTERED,
        "Messages moved to sendwell.dead, by reason."
    );
    describe_counter!(
        JOBS_SENT_UNRECORDED,
        "Sent jobs whose outcome was published and acked without its ledger record, because the state store stayed unwritable past state.unwritable_grace (so they are not sent again after the restart)."
    );
    describe_counter!(
        JOBS_REROUTED,
        "Jobs published with a routing key other than their recipient's digits, sent on to sendwell.jobs with the right key (so they reach the shard that owns the recipient)."
    );
    describe_gauge!(JOBS_IN_FLIGHT, "Jobs being processed right now.");
    describe_counter!(
        API_REQUESTS,
        "Cloud API send requests, by account, result and Meta error code."
    );
    describe_histogram!(
        API_LATENCY,
        Unit::Seconds,
        "Cloud API send request duration."
    );
    describe_counter!(
        API_RETRIES,
        "Cloud API sends retried, by account and class."
    );
    describe_counter!(
        BROKER_RECONNECTS,
        "Broker connections re-established after a loss."
    );
    describe_gauge!(BROKER_CONNECTED, "1 while connected to the broker.");
    describe_counter!(
        ACKS,
        "basic.ack frames sent for settled jobs: kind=multiple settles a run of them at once, kind=single one (a job settled behind one still running)."
    );
    describe_gauge!(
        ACCOUNT_PAUSED,
        "1 while an account is paused because the Cloud API refuses it."
    );
    describe_counter!(
        ACCOUNT_PAUSES,
        "Times an account was paused, by account (the reason, Meta's text, is in the log line)."
    );
    describe_counter!(
        WEBHOOK_REQUESTS,
        "Webhook requests, by result: POSTs ok, unsigned, forged, malformed, unavailable; handshake_refused: a verification GET with the wrong mode or verify token."
    );
    describe_counter!(WEBHOOK_EVENTS, "Webhook events applied, by kind and field.");
    describe_counter!(
        WEBHOOK_DUPLICATES,
        "Webhook events received again and not applied twice."
    );
    describe_counter!(
        WEBHOOK_STATUS_BATCHES,
        "Broker messages of status batches the listener published to sendwell.statuses (to the queue of the shard that sent their messages, or, that shard gone, through sendwell.jobs to a live one)."
    );
    describe_counter!(
        WEBHOOK_BATCHED_STATUSES,
        "Status events the listener published in batches (divided by sendwell_webhook_status_batches_total: the mean batch)."
    );
    describe_counter!(
        WEBHOOK_UNMATCHED,
        "Webhook events taken but not acted on, by why: status callbacks that match no job sendwell sent (unknown_message, job_not_sent), unreadable events, user preference changes other than a marketing stop (preference_not_stop)."
    );
    describe_counter!(WEBHOOK_ERRORS, "Errors Meta reported by webhook, by code.");
    describe_counter!(
        DELIVERY_STATUSES,
        "Delivery statuses from webhooks, by account and status."
    );
    describe_counter!(
        BILLED_COST,
        "Billed cost from webhook pricing and the price table, in millionths of the currency."
    );
    describe_counter!(
        PRICES_MISSING,
        "Billed status callbacks whose category has no price in the table for the recipient's market (their billed cost is unknown), by category and market."
    );
    describe_counter!(
        OPT_OUTS_LEARNED,
        "Opt-outs learned from Meta (user preferences, error 131050), by source."
    );
    describe_counter!(INBOUND_MESSAGES, "Customer messages received, by type.");
    describe_counter!(
        WA_IDS_LEARNED,
        "Send answers whose WhatsApp ID differs from the number sent (Brazil, Mexico), newly stored."
    );
    describe_counter!(
        WA_ID_RESOLUTIONS,
        "WhatsApp IDs of webhook events turned into numbers, by how (mapped, same, equivalent, unknown)."
    );
    describe_counter!(
        WA_ID_UNRESOLVED_OPT_OUTS,
        "Opt-outs from a WhatsApp ID no known number matches, applied to the ID's digits, by source."
    );
    describe_counter!(
        TEMPLATE_STATUS,
        "Template status updates, by template, language and event."
    );
    describe_counter!(TEMPLATE_QUALITY, "Template quality updates, by new score.");
    describe_gauge!(
        MESSAGING_LIMIT,
        "The portfolio's daily unique-recipient messaging limit Meta last announced."
    );
    describe_gauge!(
        ACCOUNT_THROUGHPUT,
        "Messages per second Meta allows the account's number (after upgrades)."
    );
    describe_counter!(ACCOUNT_UPDATES, "account_update webhooks, by event.");
}

/// How often a refusal on the admin listener is logged per reason (a misconfigured proxy or a
/// scanner can send many).
const ADMIN_REFUSED_LOG_EVERY: Duration = Duration::from_secs(60);

static ADMIN_REFUSED_LOG: LazyLock<crate::log_every::LogEvery> = LazyLock::new(|| {
    crate::log_every::LogEvery::new(
        ADMIN_REFUSED_LOG_EVERY,
        std::sync::Arc::new(crate::clock::SystemClock),
    )
});

/// A consent request refused by the admin listener's guard; `why` never holds a secret.
pub fn admin_refused(reason: &'static str, path: &str, why: &str) {
    counter!(ADMIN_REFUSED, "reason" => reason).increment(1);
    if let Some(unlogged) = ADMIN_REFUSED_LOG.check(reason) {
        // The path names a number (`/consent/{number}`): masked like every number we log.
        let path = crate::ops::mask_numbers_in(path);
        tracing::warn!(
            reason,
            path,
            refused_since_last_line = unlogged,
            "Consent request on the admin listener refused: {why}"
        );
    }
}

pub fn webhook_request(result: &'static str) {
    counter!(WEBHOOK_REQUESTS, "result" => result).increment(1);
}

pub fn webhook_event(kind: crate::webhook::parse::EventKind, field: &str) {
    let kind = match kind {
        crate::webhook::parse::EventKind::Status => "status",
        crate::webhook::parse::EventKind::Message => "message",
        crate::webhook::parse::EventKind::UserPreference => "user_preference",
        crate::webhook::parse::EventKind::Error => "error",
        crate::webhook::parse::EventKind::Change => "change",
    };
    // Fields are Meta's subscription names: a short, fixed list; anything else is "other".
    let field = if field.len() <= 48 && field.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        field.to_string()
    } else {
        "other".to_string()
    };
    counter!(WEBHOOK_EVENTS, "kind" => kind, "field" => field).increment(1);
}

pub fn webhook_duplicate() {
    counter!(WEBHOOK_DUPLICATES).increment(1);
}

/// One batch of `statuses` status events published by the listener (see `webhook::batch`).
pub fn webhook_status_batch(statuses: usize) {
    counter!(WEBHOOK_STATUS_BATCHES).increment(1);
    counter!(WEBHOOK_BATCHED_STATUSES).increment(statuses as u64);
}

pub fn webhook_unmatched(why: &'static str) {
    counter!(WEBHOOK_UNMATCHED, "why" => why).increment(1);
}

pub fn webhook_error(code: i64) {
    counter!(WEBHOOK_ERRORS, "code" => code.to_string()).increment(1);
}

pub fn delivery_status(account: &str, status: &str) {
    let status = match status {
        "sent" | "delivered" | "read" | "failed" | "played" => status.to_string(),
        _ => "other".to_string(),
    };
    counter!(DELIVERY_STATUSES, "account" => account.to_string(), "status" => status).increment(1);
}

pub fn billed_cost(
    account: &str,
    category: &str,
    market: &str,
    country: &str,
    currency: &str,
    micros: i64,
) {
    counter!(BILLED_COST, "account" => account.to_string(), "category" => category.to_string(), "market" => market.to_string(), "country" => country.to_string(), "currency" => currency.to_string())
        .increment(micros.max(0) as u64);
}

/// A billed status callback whose category has no price for the recipient's market: counted
/// each time (Meta repeats `pricing` on `sent` and `delivered`), logged once an hour per
/// category and market. Both labels are bounded: Meta's categories or `other`, the table's
/// market names or `other`.
pub fn price_missing(category: &str, market: &str) {
    let category = crate::pricing::category_label(category);
    counter!(PRICES_MISSING, "category" => category, "market" => market.to_string()).increment(1);
    if let Some(unlogged) = log_hourly(("price_missing", category, market)) {
        tracing::warn!(
            category,
            market,
            unlogged,
            "A billed message's category has no price in the table for its market; its billed cost is unknown (logged once an hour per category and market; sendwell_prices_missing_total counts each)."
        );
    }
}

pub fn opt_out_learned(account: &str, source: &'static str) {
    // One per customer who opts out, and a 131050 comes with every marketing message still
    // sent to one: a line each would scale with traffic.
    if let Some(unlogged) = log_hourly(("opt_out_learned", account, source)) {
        tracing::info!(
            account,
            source,
            unlogged,
            "An opt-out was learned from WhatsApp; it is applied and published to sendwell.consent (logged once an hour per account and source; sendwell_opt_outs_learned_total counts each)."
        );
    }
    counter!(OPT_OUTS_LEARNED, "account" => account.to_string(), "source" => source).increment(1);
}

pub fn wa_id_learned() {
    counter!(WA_IDS_LEARNED).increment(1);
}

pub fn wa_id_resolved(how: &'static str) {
    counter!(WA_ID_RESOLUTIONS, "how" => how).increment(1);
}

/// An opt-out whose WhatsApp ID matches no known number. Logged once a minute at most (the
/// masked ID of the first of them), counted always.
static WA_ID_UNRESOLVED_LOG: LazyLock<crate::log_every::LogEvery> = LazyLock::new(|| {
    crate::log_every::LogEvery::new(
        Duration::from_secs(60),
        std::sync::Arc::new(crate::clock::SystemClock),
    )
});

pub fn wa_id_unresolved_opt_out(source: &'static str, id: &str) {
    counter!(WA_ID_UNRESOLVED_OPT_OUTS, "source" => source).increment(1);
    if let Some(unlogged) = WA_ID_UNRESOLVED_LOG.check(source) {
        tracing::warn!(
            wa_id = %crate::privacy::Masked(&format!("+{}", id.trim_start_matches('+'))),
            source,
            unlogged,
            "An opt-out came from a WhatsApp ID that matches no number sendwell knows; the ID's own digits are opted out (logged at most once a minute per source; see sendwell_wa_id_unresolved_opt_outs_total)."
        );
    }
}

pub fn sent_unrecorded() {
    counter!(JOBS_SENT_UNRECORDED).increment(1);
}

static SENT_UNRECORDED_LOG: LazyLock<crate::log_every::LogEvery> = LazyLock::new(|| {
    crate::log_every::LogEvery::new(
        Duration::from_secs(10),
        std::sync::Arc::new(crate::clock::SystemClock),
    )
});

/// Whether the "sent but unrecorded" line is due (at most one every 10 s).
pub fn sent_unrecorded_log() -> Option<u64> {
    SENT_UNRECORDED_LOG.check(())
}

static REFUSALS_LOG: LazyLock<crate::log_every::LogEvery> = LazyLock::new(|| {
    crate::log_every::LogEvery::new(
        Duration::from_secs(60),
        std::sync::Arc::new(crate::clock::SystemClock),
    )
});

/// Whether a log line that could otherwise repeat per message (a refused job or consent event,
/// a store write that failed for one job) is due: one a minute per `what` and `reason`;
/// `Some(n)`: n went unlogged since the last.
pub fn log_due(what: &'static str, reason: &'static str) -> Option<u64> {
    REFUSALS_LOG.check((what, reason))
}

/// How often a line about something that can happen on every webhook event or job in steady
/// state (an unknown wamid, a missing price, a customer's message) is written per key: the
/// counter beside it counts each occurrence, the line only says that it happens.
pub const HOURLY_LOG_EVERY: Duration = Duration::from_secs(3600);

static HOURLY_LOG: LazyLock<crate::log_every::LogEvery> = LazyLock::new(|| {
    crate::log_every::LogEvery::new(
        HOURLY_LOG_EVERY,
        std::sync::Arc::new(crate::clock::SystemClock),
    )
});

/// Whether the line for `key` is due: once an hour per key; `Some(n)`: n went unlogged since
/// the last. The key starts with a name of its own (`("price_missing", category, market)`) and
/// never holds a phone number, wamid or job id: one key per customer would be one line each.
pub fn log_hourly(key: impl std::hash::Hash) -> Option<u64> {
    HOURLY_LOG.check(key)
}

static JOBS_REROUTED_LOG: LazyLock<crate::log_every::LogEvery> = LazyLock::new(|| {
    crate::log_every::LogEvery::new(
        Duration::from_secs(60),
        std::sync::Arc::new(crate::clock::SystemClock),
    )
});

pub fn inbound_message(account: &str, kind: &str) {
    let kind = match kind {
        "text" | "button" | "interactive" | "image" | "audio" | "video" | "document"
        | "sticker" | "location" | "contacts" | "reaction" => kind.to_string(),
        _ => "other".to_string(),
    };
    counter!(INBOUND_MESSAGES, "account" => account.to_string(), "type" => kind).increment(1);
}

pub fn template_status(name: &str, language: &str, event: &str) {
    counter!(TEMPLATE_STATUS, "template" => name.to_string(), "language" => language.to_string(), "event" => event.to_string()).increment(1);
}

pub fn template_quality(score: &str) {
    counter!(TEMPLATE_QUALITY, "score" => score.to_string()).increment(1);
}

pub fn messaging_limit(waba: &str, limit: f64) {
    gauge!(MESSAGING_LIMIT, "waba" => waba.to_string()).set(limit);
}

pub fn account_throughput(account: &str, mps: f64) {
    gauge!(ACCOUNT_THROUGHPUT, "account" => account.to_string()).set(mps);
}

pub fn limit_wait(account: &str, limit: &'static str, waited: Duration) {
    cached_histogram(LIMIT_WAIT, &[("account", account), ("limit", limit)])
        .record(waited.as_secs_f64());
}

pub fn account_rate(account: &str, mps: f64) {
    gauge!(ACCOUNT_RATE, "account" => account.to_string()).set(mps);
}

pub fn rate_share(account: &str, mps: f64) {
    gauge!(INSTANCE_RATE_SHARE, "account" => account.to_string()).set(mps);
}

/// An instance started: standby, no takeover yet.
pub fn instance_started(shard: u16) {
    instance_active(shard, false);
    gauge!(INSTANCE_TAKEOVER_TIME, "shard" => shard.to_string()).set(0.0);
}

pub fn instance_active(shard: u16, active: bool) {
    gauge!(INSTANCE_ACTIVE, "shard" => shard.to_string()).set(if active { 1.0 } else { 0.0 });
}

pub fn instance_took_over(shard: u16, at: jiff::Timestamp) {
    gauge!(INSTANCE_TAKEOVER_TIME, "shard" => shard.to_string())
        .set(at.as_millisecond() as f64 / 1000.0);
}

pub fn instance_takeover_done(shard: u16, took: Duration) {
    counter!(INSTANCE_TAKEOVERS, "shard" => shard.to_string()).increment(1);
    gauge!(INSTANCE_TAKEOVER_DURATION, "shard" => shard.to_string()).set(took.as_secs_f64());
}

pub fn store_lock_retry() {
    counter!(STORE_LOCK_RETRIES).increment(1);
}

pub fn instance_taking_over(shard: u16, held: Duration) {
    gauge!(INSTANCE_TAKING_OVER, "shard" => shard.to_string()).set(held.as_secs_f64());
}

pub fn instance_takeover_hook_panicked(shard: u16) {
    counter!(INSTANCE_TAKEOVER_HOOK_PANICS, "shard" => shard.to_string()).increment(1);
}

pub fn live_instances(instances: u32, shards: usize) {
    gauge!(INSTANCES_LIVE).set(instances as f64);
    gauge!(SHARDS_LIVE).set(shards as f64);
}

pub fn probe_sent() {
    counter!(INSTANCE_PROBES, "direction" => "sent").increment(1);
}

pub fn probe_received() {
    counter!(INSTANCE_PROBES, "direction" => "received").increment(1);
}

pub fn heartbeat_failed() {
    counter!(INSTANCE_HEARTBEAT_FAILURES).increment(1);
}

/// After a renewal: the lease held and the global use seen.
pub fn quota_lease(quota: &'static str, name: &str, lease: i64, global: i64) {
    cached_gauge(QUOTA_LEASE, &[("quota", quota), ("name", name)]).set(lease as f64);
    cached_gauge(QUOTA_GLOBAL_USE, &[("quota", quota), ("name", name)]).set(global as f64);
}

/// One renewal's result: `granted`, `refused` or `failed`.
pub fn quota_renewal(quota: &'static str, name: &str, result: &'static str) {
    counter!(QUOTA_RENEWALS, "quota" => quota, "name" => name.to_string(), "result" => result)
        .increment(1);
}

pub fn tier(portfolio: &str, used: usize, limit: u32) {
    cached_gauge(TIER_USAGE, &[("portfolio", portfolio)]).set(used as f64);
    cached_gauge(TIER_LIMIT, &[("portfolio", portfolio)]).set(limit as f64);
}

pub fn limit_state(kind: &'static str, entries: usize) {
    gauge!(LIMIT_STATE, "kind" => kind).set(entries as f64);
}

pub fn estimated_cost(account: &str, category: &str, country: &str, currency: &str, micros: i64) {
    cached_counter(
        ESTIMATED_COST,
        &[
            ("account", account),
            ("category", category),
            ("country", country),
            ("currency", currency),
        ],
    )
    .increment(micros.max(0) as u64);
}

pub fn job_age(account: &str, status: &'static str, age: Duration) {
    cached_histogram(JOB_AGE, &[("account", account), ("status", status)])
        .record(age.as_secs_f64());
}

pub fn consent_numbers(opted_in: usize, opted_out: usize) {
    gauge!(CONSENT_NUMBERS, "state" => "opted_in").set(opted_in as f64);
    gauge!(CONSENT_NUMBERS, "state" => "opted_out").set(opted_out as f64);
}

pub fn spend(account: &str, currency: &str, micros: i64) {
    cached_gauge(SPEND, &[("account", account), ("currency", currency)]).set(micros as f64);
}

pub fn spend_budget(account: &str, currency: &str, micros: i64) {
    gauge!(SPEND_BUDGET, "account" => account.to_string(), "currency" => currency.to_string())
        .set(micros as f64);
}

pub fn spend_guard(account: &str, active: bool) {
    gauge!(SPEND_GUARD, "account" => account.to_string()).set(if active { 1.0 } else { 0.0 });
}

pub fn queue_messages(queue: &'static str, ready: u32) {
    if queue == "jobs" {
        crate::health::queue_ready(ready);
    }
    gauge!(QUEUE_MESSAGES, "queue" => queue).set(ready as f64);
}

/// Rows the consent follower applied from one poll, of one table (`consent_summary`,
/// `wa_ids`).
pub fn consent_follow_applied(table: &'static str, n: u64) {
    if n > 0 {
        cached_counter(CONSENT_FOLLOW_ROWS, &[("table", table)]).increment(n);
    }
}

/// A poll of the consent follower failed.
pub fn consent_follow_failed() {
    counter!(CONSENT_FOLLOW_FAILURES).increment(1);
}

/// Time since the consent follower's last successful poll.
pub fn consent_follow_lag(lag: Duration) {
    gauge!(CONSENT_FOLLOW_LAG).set(lag.as_secs_f64());
}

/// The store takes writes again (true) or cannot be written (false).
pub fn store_writable(ok: bool) {
    gauge!(STORE_WRITABLE).set(if ok { 1.0 } else { 0.0 });
}

pub fn claim_lost() {
    counter!(STORE_CLAIMS_LOST).increment(1);
}

pub fn store_write_failed() {
    counter!(STORE_WRITE_FAILURES).increment(1);
}

pub fn store_read_failed() {
    counter!(STORE_READ_FAILURES).increment(1);
}

pub fn store_reopened(ok: bool) {
    counter!(STORE_REOPENS, "result" => if ok { "ok" } else { "failed" }).increment(1);
}

/// A compaction of the state store: `kind` (copy, in_place, in_place_no_room) and how long it
/// held the store alone.
pub fn store_compacted(kind: &'static str, ok: bool, held: Duration) {
    let result = if ok { "ok" } else { "failed" };
    counter!(STORE_COMPACTIONS, "kind" => kind, "result" => result).increment(1);
    histogram!(STORE_COMPACTION_HELD, "kind" => kind).record(held.as_secs_f64());
}

/// A reopen not tried: the state directory's file system has no room yet.
pub fn store_reopen_waiting_for_room() {
    counter!(STORE_REOPENS, "result" => "no_room").increment(1);
}

pub fn account_update(event: &str) {
    counter!(ACCOUNT_UPDATES, "event" => event.to_string()).increment(1);
}

pub fn job_received() {
    crate::health::progressed();
    counter!(JOBS_RECEIVED).increment(1);
}

pub fn job_finished(account: &str, status: &'static str, reason: Option<&'static str>) {
    crate::health::finished();
    cached_counter(
        JOBS_FINISHED,
        &[
            ("account", account),
            ("status", status),
            ("reason", reason.unwrap_or("")),
        ],
    )
    .increment(1);
}

pub fn job_deferred(account: &str, reason: &'static str) {
    crate::health::progressed();
    counter!(JOBS_DEFERRED, "account" => account.to_string(), "reason" => reason).increment(1);
}

pub fn dead_lettered(reason: &'static str) {
    counter!(JOBS_DEAD_LETTERED, "reason" => reason).increment(1);
}

/// A job published with a routing key other than its recipient's digits; true when its log
/// line is due (at most one a minute: a publisher with a wrong key sends all its jobs so).
pub fn job_rerouted() -> Option<u64> {
    counter!(JOBS_REROUTED).increment(1);
    JOBS_REROUTED_LOG.check(())
}

pub fn in_flight(delta: f64) {
    crate::health::in_flight(delta as i64);
    cached_gauge(JOBS_IN_FLIGHT, &[]).increment(delta);
}

/// `result` is `ok`, or the failure class; `code` is Meta's error code or empty.
pub fn api_request(account: &str, result: &'static str, code: Option<i64>, took: Duration) {
    let mut buf = itoa::Buffer::new();
    let code = code.map_or("", |c| buf.format(c));
    cached_counter(
        API_REQUESTS,
        &[("account", account), ("result", result), ("code", code)],
    )
    .increment(1);
    cached_histogram(API_LATENCY, &[("account", account)]).record(took.as_secs_f64());
}

pub fn api_retry(account: &str, class: &'static str) {
    counter!(API_RETRIES, "account" => account.to_string(), "class" => class).increment(1);
}

pub fn broker_connected(up: bool) {
    crate::health::connected(up);
    gauge!(BROKER_CONNECTED).set(if up { 1.0 } else { 0.0 });
}

pub fn acks_sent(multiple: bool) {
    counter!(ACKS, "kind" => if multiple { "multiple" } else { "single" }).increment(1);
}

pub fn broker_reconnected() {
    counter!(BROKER_RECONNECTS).increment(1);
}

pub fn account_paused(account: &str, reason: &str) {
    tracing::error!(
        account,
        reason,
        "Account paused: the Cloud API refuses it; its jobs wait until a probe succeeds."
    );
    gauge!(ACCOUNT_PAUSED, "account" => account.to_string()).set(1.0);
    counter!(ACCOUNT_PAUSES, "account" => account.to_string()).increment(1);
}

pub fn account_resumed(account: &str, reason: &str) {
    tracing::info!(account, was = reason, "Account resumed: a send succeeded.");
    gauge!(ACCOUNT_PAUSED, "account" => account.to_string()).set(0.0);
}

pub fn consent_event(kind: &'static str, result: &'static str) {
    counter!(CONSENT_EVENTS, "type" => kind, "result" => result).increment(1);
}

pub fn consent_cache_entries(n: usize) {
    gauge!(CONSENT_CACHE_ENTRIES).set(n as f64);
}

pub fn consent_message(account: &str, kind: &'static str, result: &'static str) {
    counter!(CONSENT_MESSAGES, "account" => account.to_string(), "kind" => kind, "result" => result)
        .increment(1);
}

pub fn consent_question_answered(account: &str, answer: &'static str) {
    counter!(CONSENT_ANSWERS, "account" => account.to_string(), "answer" => answer).increment(1);
}

/// How often the opt-out template warning is repeated per account and template: every job of a
/// campaign would otherwise write the same line, thousands a second.
pub const TEMPLATE_WITHOUT_OPT_OUT_LOG_EVERY: Duration = Duration::from_secs(3600);

static TEMPLATE_WITHOUT_OPT_OUT_LOG: LazyLock<crate::log_every::LogEvery> = LazyLock::new(|| {
    crate::log_every::LogEvery::new(
        TEMPLATE_WITHOUT_OPT_OUT_LOG_EVERY,
        std::sync::Arc::new(crate::clock::SystemClock),
    )
});

pub fn template_without_opt_out(account: &str, template: &str, refused: bool) {
    let action = if refused { "refused" } else { "warned" };
    counter!(TEMPLATES_WITHOUT_OPT_OUT, "account" => account.to_string(), "action" => action)
        .increment(1);
    if let Some(unlogged) = TEMPLATE_WITHOUT_OPT_OUT_LOG.check((account, template, refused)) {
        tracing::warn!(
            account,
            template,
            action,
            jobs_since_last_line = unlogged,
            "A marketing job uses a template not listed in opt_out_templates: its recipients may have no way to opt out (logged once an hour per account and template; sendwell_templates_without_opt_out_total counts every job)."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

    /// Counts the warnings written while it is the thread's subscriber.
    struct Warnings(std::sync::Arc<AtomicUsize>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if *event.metadata().level() == tracing::Level::WARN {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    #[test]
    fn a_campaign_on_a_template_without_opt_out_writes_one_warning_not_one_per_job() {
        use tracing_subscriber::layer::SubscriberExt;
        let warnings = std::sync::Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry().with(Warnings(warnings.clone()));
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..1000 {
                template_without_opt_out("acme-de", "test_only_no_opt_out_a", false);
            }
            template_without_opt_out("acme-de", "test_only_no_opt_out_b", false);
        });
        // One line per template; the counter (not installed here) takes every job.
        assert_eq!(warnings.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_handle_cache_registers_each_series_once() {
        let cache: Cached<u32> = Cached::new();
        let registered = AtomicU32::new(0);
        let get = |name: &'static str, labels: &[(&'static str, &str)]| {
            cache.get(name, labels, |_, l| {
                assert_eq!(l.len(), labels.len());
                registered.fetch_add(1, Ordering::Relaxed) + 1
            })
        };
        let a = get(JOBS_FINISHED, &[("account", "acme-de"), ("status", "sent")]);
        assert_eq!(
            get(JOBS_FINISHED, &[("account", "acme-de"), ("status", "sent")]),
            a
        );
        // Another value, another metric, or values that concatenate the same: new series.
        let b = get(JOBS_FINISHED, &[("account", "acme-fr"), ("status", "sent")]);
        let c = get(JOBS_DEFERRED, &[("account", "acme-de"), ("status", "sent")]);
        let d = get(JOBS_FINISHED, &[("account", "acme-des"), ("status", "ent")]);
        assert_eq!(registered.load(Ordering::Relaxed), 4);
        assert!(a != b && a != c && a != d && b != c && b != d && c != d);
    }
}
