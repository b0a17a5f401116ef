//! Every metric name, its description, and the small functions that emit them together with
//! their log line, so a log and a counter never disagree. Labels are bounded: account names from
//! config, statuses, reasons and Meta error codes; never a number, wamid or job id.

use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

pub const JOBS_RECEIVED: &str = "sendwell_jobs_received_total";
pub const JOBS_FINISHED: &str = "sendwell_jobs_finished_total";
pub const JOBS_DEFERRED: &str = "sendwell_jobs_deferred_total";
pub const JOBS_DEAD_LETTERED: &str = "sendwell_jobs_dead_lettered_total";
pub const JOBS_IN_FLIGHT: &str = "sendwell_jobs_in_flight";
pub const API_REQUESTS: &str = "sendwell_api_requests_total";
pub const API_LATENCY: &str = "sendwell_api_request_duration_seconds";
pub const API_RETRIES: &str = "sendwell_api_retries_total";
pub const BROKER_RECONNECTS: &str = "sendwell_broker_reconnects_total";
pub const BROKER_CONNECTED: &str = "sendwell_broker_connected";
pub const ACCOUNT_PAUSED: &str = "sendwell_account_paused";
pub const ACCOUNT_PAUSES: &str = "sendwell_account_pauses_total";

/// Buckets from 10 ms to 30 s, for the API latency histogram.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
];

pub fn describe() {
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
    describe_gauge!(
        ACCOUNT_PAUSED,
        "1 while an account is paused because the Cloud API refuses it."
    );
    describe_counter!(ACCOUNT_PAUSES, "Times an account was paused, by reason.");
}

pub fn job_received() {
    counter!(JOBS_RECEIVED).increment(1);
}

pub fn job_finished(account: &str, status: &'static str, reason: Option<&'static str>) {
    counter!(JOBS_FINISHED, "account" => account.to_string(), "status" => status, "reason" => reason.unwrap_or("")).increment(1);
}

pub fn job_deferred(account: &str, reason: &'static str) {
    counter!(JOBS_DEFERRED, "account" => account.to_string(), "reason" => reason).increment(1);
}

pub fn dead_lettered(reason: &'static str) {
    counter!(JOBS_DEAD_LETTERED, "reason" => reason).increment(1);
}

pub fn in_flight(delta: f64) {
    gauge!(JOBS_IN_FLIGHT).increment(delta);
}

/// `result` is `ok`, or the failure class; `code` is Meta's error code or empty.
pub fn api_request(account: &str, result: &'static str, code: Option<i64>, took: Duration) {
    let code = code.map(|c| c.to_string()).unwrap_or_default();
    counter!(API_REQUESTS, "account" => account.to_string(), "result" => result, "code" => code)
        .increment(1);
    histogram!(API_LATENCY, "account" => account.to_string()).record(took.as_secs_f64());
}

pub fn api_retry(account: &str, class: &'static str) {
    counter!(API_RETRIES, "account" => account.to_string(), "class" => class).increment(1);
}

pub fn broker_connected(up: bool) {
    gauge!(BROKER_CONNECTED).set(if up { 1.0 } else { 0.0 });
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
