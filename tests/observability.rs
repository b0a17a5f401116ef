//! Observability as shipped under `config/`: the Grafana dashboard and the Prometheus alert rules
//! query only metrics the daemon exports (`sendwell::metrics::ALL`), the rules and the scrape
//! example pass promtool and the alerts fire when they should (promtool's rule unit tests), and
//! the daemon's real `/metrics` passes `promtool check metrics`.
//!
//! promtool comes from Debian's `prometheus` package: `scripts/ensure-promtool.sh` (run by
//! `scripts/test.sh` and `.ci/run`) installs it. One daemon in this binary: the metrics recorder
//! is process-wide.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use sendwell::metrics::ALL;
use sendwell::sandbox::Fault;

const T: Duration = Duration::from_secs(30);
const DASHBOARD: &str = "config/grafana/sendwell-dashboard.json";
const ALERTS: &str = "config/prometheus/alerts.yml";
const SCRAPE: &str = "config/prometheus/scrape.yml";

/// The alerts issue 6 asks for, by rule name.
const ALERT_NAMES: &[&str] = &[
    "SendwellQueueStalled",
    "SendwellApiErrorRatioHigh",
    "SendwellAccountPaused",
    "SendwellDeadLetterQueueGrowing",
    "SendwellSpendAt80PercentOfBudget",
    "SendwellWebhookSignatureFailures",
    "SendwellTemplatePaused",
    "SendwellMessagingTierLowered",
    "SendwellTemplateQualityLowered",
];

fn repo_path(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn read(p: &str) -> String {
    std::fs::read_to_string(repo_path(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// Runs promtool (from the repository root) with `stdin`, if any.
fn promtool(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool cannot be run ({e}): run scripts/ensure-promtool.sh"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `sendwell_…` metric name in `text` (a name starts where no identifier character
/// precedes it).
fn metric_names(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(off) = text[i..].find("sendwell_") {
        let start = i + off;
        let mut end = start + "sendwell_".len();
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        let boundary = start == 0
            || !(b[start - 1].is_ascii_alphanumeric() || matches!(b[start - 1], b'_' | b':'));
        if boundary {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

/// Whether the daemon exports `name`: a name in `ALL`, or a histogram's `_bucket`, `_sum` or
/// `_count` series (never of a counter).
fn exported(name: &str) -> bool {
    ALL.contains(&name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| ALL.contains(&base) && !base.ends_with("_total"))
        })
}

fn not_exported(names: &BTreeSet<String>) -> Vec<&str> {
    names
        .iter()
        .map(String::as_str)
        .filter(|n| !exported(n))
        .collect()
}

/// Every query in the dashboard: panel targets' `expr` and the template variables' queries.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

fn dashboard() -> (serde_json::Value, Vec<String>) {
    let d: serde_json::Value = serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"));
    let mut queries = Vec::new();
    dashboard_queries(&d, &mut queries);
    (d, queries)
}

#[test]
fn the_name_check_reports_what_the_daemon_does_not_export() {
    let names = metric_names(
        "sum(rate(sendwell_jobs_finished_total{status=\"sent\"}[5m])) / sendwell_not_a_metric \
         + histogram_quantile(0.9, rate(sendwell_api_request_duration_seconds_bucket[5m])) \
         + sendwell_jobs_finished_total_count + x_sendwell_other",
    );
    assert_eq!(
        names.iter().map(String::as_str).collect::<Vec<_>>(),
        [
            "sendwell_api_request_duration_seconds_bucket",
            "sendwell_jobs_finished_total",
            "sendwell_jobs_finished_total_count",
            "sendwell_not_a_metric",
        ]
    );
    assert_eq!(
        not_exported(&names),
        [
            "sendwell_jobs_finished_total_count",
            "sendwell_not_a_metric"
        ]
    );
}

#[test]
fn the_dashboard_and_the_alerts_query_only_metrics_the_daemon_exports() {
    let (d, queries) = dashboard();
    assert!(
        queries.len() >= 30,
        "the dashboard has only {} queries",
        queries.len()
    );
    let dash_names = metric_names(&queries.join("\n"));
    assert!(
        !dash_names.is_empty(),
        "no sendwell_ metric in the dashboard"
    );
    let missing = not_exported(&dash_names);
    assert!(
        missing.is_empty(),
        "{DASHBOARD} queries metrics the daemon does not export (not in sendwell::metrics::ALL): {missing:?}"
    );

    // The whole rule file: expressions and the queries in annotations alike.
    let alerts = read(ALERTS);
    let alert_names = metric_names(&alerts);
    assert!(!alert_names.is_empty(), "no sendwell_ metric in {ALERTS}");
    let missing = not_exported(&alert_names);
    assert!(
        missing.is_empty(),
        "{ALERTS} queries metrics the daemon does not export (not in sendwell::metrics::ALL): {missing:?}"
    );
    for name in ALERT_NAMES {
        assert!(
            alerts.contains(&format!("- alert: {name}\n")),
            "{ALERTS} has no alert {name}"
        );
    }

    // Runbook links point at headings that exist, in the README or a page under docs/.
    for link in alerts.split("runbook: \"").skip(1) {
        let link = &link[..link.find('"').unwrap()];
        let (file, anchor) = link
            .split_once('#')
            .unwrap_or_else(|| panic!("{ALERTS}: runbook {link} names no section"));
        assert!(
            markdown_anchors(&read(file)).contains(anchor),
            "{ALERTS} links {link}, which is no heading of {file}"
        );
    }

    // What the issue asks the dashboard to show.
    for (what, name) in [
        ("throughput", "sendwell_jobs_received_total"),
        ("outcomes by reason", "sendwell_jobs_finished_total"),
        ("the delivery funnel", "sendwell_delivery_statuses_total"),
        (
            "estimated cost per day",
            "sendwell_estimated_cost_microunits_total",
        ),
        (
            "billed cost per day",
            "sendwell_billed_cost_microunits_total",
        ),
        (
            "API latency percentiles",
            "sendwell_api_request_duration_seconds_bucket",
        ),
        ("job age percentiles", "sendwell_job_age_seconds_bucket"),
        ("limiter waits", "sendwell_limit_wait_seconds_bucket"),
        ("consent growth", "sendwell_consent_numbers"),
    ] {
        assert!(
            dash_names.contains(name),
            "the dashboard does not show {what} ({name})"
        );
    }

    // Importable as is: every panel and the account variable use the datasource variable.
    let vars = d["templating"]["list"]
        .as_array()
        .expect("template variables");
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a datasource variable of type prometheus"
    );
    let account = vars
        .iter()
        .find(|v| v["name"] == "account")
        .expect("an account variable");
    assert_eq!(
        account["definition"],
        "label_values(sendwell_jobs_finished_total, account)"
    );
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_i64().expect("panel id")),
            "duplicate panel id {}",
            p["id"]
        );
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel {} does not use the datasource variable",
                p["title"]
            );
            assert!(
                !p["targets"].as_array().is_none_or(|t| t.is_empty()),
                "panel {} has no query",
                p["title"]
            );
        }
    }
    assert!(
        !read(DASHBOARD).contains("${DS_"),
        "no __inputs placeholders: the dashboard must import as is"
    );
}

/// The rule file without its `annotations:` blocks, for promtool's rule unit tests, which
/// compare annotations exactly (their templates are checked by `promtool check rules`).
fn without_annotations(rules: &str) -> String {
    let mut out = String::new();
    let mut skip_deeper_than: Option<usize> = None;
    for line in rules.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(level) = skip_deeper_than {
            if line.trim().is_empty() || indent > level {
                continue;
            }
            skip_deeper_than = None;
        }
        if line.trim() == "annotations:" {
            skip_deeper_than = Some(indent);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// promtool rule unit tests: every alert fires on the series that should make it fire, only for
/// the right label set, and not on the near misses.
const RULE_TESTS: &str = r#"
rule_files:
  - rules.yml
evaluation_interval: 1m
tests:
  # Queue non-empty, nothing finished for 5 minutes: a (finished flat since the queue filled)
  # and c (never finished anything) alert; b keeps sending; d's queue is empty.
  - interval: 1m
    input_series:
      - series: 'sendwell_queue_messages{instance="a",job="sendwell",queue="jobs"}'
        values: '0x9 5x11'
      - series: 'sendwell_jobs_finished_total{instance="a",job="sendwell",account="acme-de",status="sent",reason=""}'
        values: '0+10x9 100x11'
      - series: 'sendwell_queue_messages{instance="b",job="sendwell",queue="jobs"}'
        values: '5x20'
      - series: 'sendwell_jobs_finished_total{instance="b",job="sendwell",account="acme-de",status="sent",reason=""}'
        values: '0+10x20'
      - series: 'sendwell_queue_messages{instance="c",job="sendwell",queue="jobs"}'
        values: '0x9 5x11'
      - series: 'sendwell_queue_messages{instance="d",job="sendwell",queue="jobs"}'
        values: '0x20'
      - series: 'sendwell_jobs_finished_total{instance="d",job="sendwell",account="acme-de",status="sent",reason=""}'
        values: '10x20'
      - series: 'sendwell_queue_messages{instance="a",job="sendwell",queue="dead"}'
        values: '3x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: SendwellQueueStalled
      - eval_time: 17m
        alertname: SendwellQueueStalled
        exp_alerts:
          - exp_labels: {severity: critical, instance: a, job: sendwell, queue: jobs}
          - exp_labels: {severity: critical, instance: c, job: sendwell, queue: jobs}
      # A dead-letter queue that holds messages but does not grow is no alert.
      - eval_time: 20m
        alertname: SendwellDeadLetterQueueGrowing

  # API error ratio: acme-de fails 25% of 1.3 calls/s (over two shards); quiet fails 50% of
  # too few calls to tell.
  - interval: 1m
    input_series:
      - series: 'sendwell_api_requests_total{instance="a",job="sendwell",account="acme-de",result="ok",code=""}'
        values: '0+60x30'
      - series: 'sendwell_api_requests_total{instance="b",job="sendwell",account="acme-de",result="permanent",code="131026"}'
        values: '0+20x30'
      - series: 'sendwell_api_requests_total{instance="a",job="sendwell",account="quiet",result="ok",code=""}'
        values: '0+1x30'
      - series: 'sendwell_api_requests_total{instance="a",job="sendwell",account="quiet",result="retryable",code="131000"}'
        values: '0+1x30'
    alert_rule_test:
      - eval_time: 8m
        alertname: SendwellApiErrorRatioHigh
      - eval_time: 15m
        alertname: SendwellApiErrorRatioHigh
        exp_alerts:
          - exp_labels: {severity: warning, job: sendwell, account: acme-de}

  # Account paused on one of two shards: one alert for the account.
  - interval: 1m
    input_series:
      - series: 'sendwell_account_paused{instance="a",job="sendwell",account="acme-de"}'
        values: '0 0 1x20'
      - series: 'sendwell_account_paused{instance="b",job="sendwell",account="acme-de"}'
        values: '0x22'
      - series: 'sendwell_account_paused{instance="a",job="sendwell",account="acme-at"}'
        values: '0x22'
    alert_rule_test:
      - eval_time: 2m
        alertname: SendwellAccountPaused
      - eval_time: 5m
        alertname: SendwellAccountPaused
        exp_alerts:
          - exp_labels: {severity: critical, job: sendwell, account: acme-de}

  # The dead-letter queue, seen by two shards, grows: one alert; it clears once it is flat.
  - interval: 1m
    input_series:
      - series: 'sendwell_queue_messages{instance="a",job="sendwell",queue="dead"}'
        values: '0x5 1 2 3x40'
      - series: 'sendwell_queue_messages{instance="b",job="sendwell",queue="dead"}'
        values: '0x5 1 2 3x40'
    alert_rule_test:
      - eval_time: 5m
        alertname: SendwellDeadLetterQueueGrowing
      - eval_time: 14m
        alertname: SendwellDeadLetterQueueGrowing
        exp_alerts:
          - exp_labels: {severity: warning, job: sendwell}
      - eval_time: 40m
        alertname: SendwellDeadLetterQueueGrowing

  # Spend: acme-de reaches 80% of its budget, then the guard holds; other stays at 50%;
  # nobudget has no budget.
  - interval: 1m
    input_series:
      - series: 'sendwell_spend_rolling_day_microunits{instance="a",job="sendwell",account="acme-de",currency="EUR"}'
        values: '70000000 70000000 80000000x10'
      - series: 'sendwell_spend_budget_microunits{instance="a",job="sendwell",account="acme-de",currency="EUR"}'
        values: '100000000x12'
      - series: 'sendwell_spend_guard_active{instance="a",job="sendwell",account="acme-de"}'
        values: '0x5 1x6'
      - series: 'sendwell_spend_rolling_day_microunits{instance="a",job="sendwell",account="other",currency="EUR"}'
        values: '50000000x12'
      - series: 'sendwell_spend_budget_microunits{instance="a",job="sendwell",account="other",currency="EUR"}'
        values: '100000000x12'
      - series: 'sendwell_spend_guard_active{instance="a",job="sendwell",account="other"}'
        values: '0x12'
      - series: 'sendwell_spend_rolling_day_microunits{instance="a",job="sendwell",account="nobudget",currency="EUR"}'
        values: '900000000x12'
    alert_rule_test:
      - eval_time: 2m
        alertname: SendwellSpendAt80PercentOfBudget
      - eval_time: 4m
        alertname: SendwellSpendAt80PercentOfBudget
        exp_alerts:
          - exp_labels: {severity: warning, instance: a, job: sendwell, account: acme-de, currency: EUR}
      - eval_time: 4m
        alertname: SendwellSpendGuardActive
      - eval_time: 7m
        alertname: SendwellSpendGuardActive
        exp_alerts:
          - exp_labels: {severity: critical, job: sendwell, account: acme-de}

  # Webhook signature failures: a forged POST a minute among signed ones.
  - interval: 1m
    input_series:
      - series: 'sendwell_webhook_requests_total{instance="a",job="sendwell",result="forged"}'
        values: '0+1x30'
      - series: 'sendwell_webhook_requests_total{instance="a",job="sendwell",result="ok"}'
        values: '0+100x30'
    alert_rule_test:
      - eval_time: 5m
        alertname: SendwellWebhookSignatureFailures
      - eval_time: 15m
        alertname: SendwellWebhookSignatureFailures
        exp_alerts:
          - exp_labels: {severity: warning, job: sendwell}

  # A template paused (a new series, on both shards: increase() alone would miss it), cleared
  # an hour later; an approval never alerts. The same for a template's quality turning RED.
  - interval: 1m
    input_series:
      - series: 'sendwell_template_status_updates_total{instance="a",job="sendwell",template="spring_sale",language="de",event="PAUSED"}'
        values: '_x10 1x80'
      - series: 'sendwell_template_status_updates_total{instance="b",job="sendwell",template="spring_sale",language="de",event="PAUSED"}'
        values: '_x10 1x80'
      - series: 'sendwell_template_status_updates_total{instance="a",job="sendwell",template="welcome",language="en",event="APPROVED"}'
        values: '_x10 1x80'
      - series: 'sendwell_template_quality_updates_total{instance="a",job="sendwell",score="RED"}'
        values: '_x10 1x80'
      - series: 'sendwell_template_quality_updates_total{instance="a",job="sendwell",score="GREEN"}'
        values: '_x10 1x80'
    alert_rule_test:
      - eval_time: 5m
        alertname: SendwellTemplatePaused
      - eval_time: 15m
        alertname: SendwellTemplatePaused
        exp_alerts:
          - exp_labels: {severity: warning, job: sendwell, template: spring_sale, language: de, event: PAUSED}
      - eval_time: 80m
        alertname: SendwellTemplatePaused
      - eval_time: 15m
        alertname: SendwellTemplateQualityLowered
        exp_alerts:
          - exp_labels: {severity: warning, job: sendwell, score: RED}
      - eval_time: 80m
        alertname: SendwellTemplateQualityLowered

  # Forged control messages: the first one (a new series) alerts at once; other dead-letter
  # reasons do not; it clears an hour after the last.
  - interval: 1m
    input_series:
      - series: 'sendwell_jobs_dead_lettered_total{instance="a",job="sendwell",reason="forged_control"}'
        values: '_x10 1x80'
      - series: 'sendwell_jobs_dead_lettered_total{instance="a",job="sendwell",reason="malformed"}'
        values: '0+1x90'
    alert_rule_test:
      - eval_time: 5m
        alertname: SendwellForgedControlMessages
      - eval_time: 12m
        alertname: SendwellForgedControlMessages
        exp_alerts:
          - exp_labels: {severity: critical, job: sendwell}
      - eval_time: 80m
        alertname: SendwellForgedControlMessages

  # Messaging tier: WABA 1 drops from unlimited to 1K, 2 is stable, 3 is upgraded.
  - interval: 1m
    input_series:
      - series: 'sendwell_messaging_limit_recipients{instance="a",job="sendwell",waba="1"}'
        values: 'Inf Inf Inf Inf Inf Inf Inf Inf Inf Inf 1000x10'
      - series: 'sendwell_messaging_limit_recipients{instance="a",job="sendwell",waba="2"}'
        values: '10000x20'
      - series: 'sendwell_messaging_limit_recipients{instance="a",job="sendwell",waba="3"}'
        values: '1000x10 10000x10'
    alert_rule_test:
      - eval_time: 5m
        alertname: SendwellMessagingTierLowered
      - eval_time: 15m
        alertname: SendwellMessagingTierLowered
        exp_alerts:
          - exp_labels: {severity: warning, job: sendwell, waba: "1"}

  - interval: 1m
    input_series:
      - series: 'up{instance="a",job="sendwell"}'
        values: '1x5 0x10'
      - series: 'sendwell_broker_connected{instance="a",job="sendwell"}'
        values: '1x5 0x10'
    alert_rule_test:
      - eval_time: 6m
        alertname: SendwellDown
      - eval_time: 9m
        alertname: SendwellDown
        exp_alerts:
          - exp_labels: {severity: critical, instance: a, job: sendwell}
      - eval_time: 9m
        alertname: SendwellBrokerDisconnected
        exp_alerts:
          - exp_labels: {severity: critical, instance: a, job: sendwell}
"#;

#[test]
fn the_alert_rules_and_the_scrape_example_pass_promtool_and_the_alerts_fire_when_they_should() {
    assert_success(
        "promtool check rules",
        &promtool(&["check", "rules", ALERTS], None),
    );
    assert_success(
        "promtool check config",
        &promtool(&["check", "config", SCRAPE], None),
    );

    let dir = tempfile::tempdir().unwrap();

    // Every dashboard query is valid PromQL (Grafana's variables given example values).
    let (_, queries) = dashboard();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let q = q
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("$account", ".*");
        if q.starts_with("label_values(") || q == "prometheus" {
            continue;
        }
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: |\n          {q}\n"
        ));
    }
    let dash_rules = dir.path().join("dashboard.yml");
    std::fs::write(&dash_rules, rules).unwrap();
    assert_success(
        "promtool check rules (the dashboard's queries as recording rules)",
        &promtool(&["check", "rules", dash_rules.to_str().unwrap()], None),
    );

    std::fs::write(
        dir.path().join("rules.yml"),
        without_annotations(&read(ALERTS)),
    )
    .unwrap();
    let tests = dir.path().join("tests.yml");
    std::fs::write(&tests, RULE_TESTS).unwrap();
    let out = promtool(&["test", "rules", tests.to_str().unwrap()], None);
    assert_success("promtool test rules", &out);
}

/// Captures what `sendwell::metrics::describe()` declares: (kind, name, help) per metric.
#[derive(Default)]
struct Descriptions(Mutex<Vec<(&'static str, String, String)>>);

impl Descriptions {
    fn add(&self, kind: &'static str, key: metrics::KeyName, help: metrics::SharedString) {
        let entry = (kind, key.as_str().to_string(), help.to_string());
        self.0.lock().unwrap().push(entry);
    }
}

impl metrics::Recorder for Descriptions {
    fn describe_counter(
        &self,
        key: metrics::KeyName,
        _: Option<metrics::Unit>,
        help: metrics::SharedString,
    ) {
        self.add("counter", key, help)
    }
    fn describe_gauge(
        &self,
        key: metrics::KeyName,
        _: Option<metrics::Unit>,
        help: metrics::SharedString,
    ) {
        self.add("gauge", key, help)
    }
    fn describe_histogram(
        &self,
        key: metrics::KeyName,
        _: Option<metrics::Unit>,
        help: metrics::SharedString,
    ) {
        self.add("histogram", key, help)
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// A scrape shows only the families something happened to; this lints every one in `ALL`, as
/// `describe()` declares it (type and help), through `promtool check metrics`.
#[test]
fn every_exported_metric_is_described_and_named_by_prometheus_conventions() {
    let captured = Descriptions::default();
    metrics::with_local_recorder(&captured, sendwell::metrics::describe);
    let described = captured.0.into_inner().unwrap();
    let undescribed: Vec<&str> = ALL
        .iter()
        .copied()
        .filter(|name| !described.iter().any(|(_, n, _)| n == name))
        .collect();
    assert!(
        undescribed.is_empty(),
        "metrics in ALL without a description in sendwell::metrics::describe() (no # HELP on /metrics): {undescribed:?}"
    );
    let mut text = String::new();
    for (kind, name, help) in &described {
        assert!(
            ALL.contains(&name.as_str()),
            "{name} is described but not in ALL"
        );
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        if *kind == "histogram" {
            text.push_str(&format!(
                "{name}_bucket{{le=\"1\"}} 1\n{name}_bucket{{le=\"+Inf\"}} 1\n{name}_sum 0.5\n{name}_count 1\n"
            ));
        } else {
            text.push_str(&format!("{name} 1\n"));
        }
    }
    let out = promtool(&["check", "metrics"], Some(text.as_bytes()));
    assert!(
        out.status.success(),
        "promtool check metrics on every described metric ({}):\n{}{}\n--- input ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scraped_metrics_pass_promtool_check_metrics() {
    let opts = AppOptions {
        extra_toml: webhook_toml(1 << 20),
        consented: 0..10,
        ..AppOptions::default()
    };
    let env = TestEnv::with_dir_files(
        &opts,
        &[("app-secret", APP_SECRET), ("verify-token", VERIFY_TOKEN)],
    )
    .await;
    let app = env.start().await;
    env.sandbox.set_webhook(
        Some(format!("http://{}/webhook", app.webhook())),
        Some(APP_SECRET.into()),
    );
    env.sandbox.add_fault(Fault {
        to: Some(number(2)),
        http_status: 400,
        code: 131026,
        message: "(#131026) Message undeliverable".into(),
        times: 1,
    });
    env.publish(&[
        template_job("obs-sent", &number(1)),
        template_job("obs-failed", &number(2)),
        // Nobody asked: suppressed (no_consent).
        template_job("obs-no-consent", &number(500)),
    ])
    .await;
    let ids = ["obs-sent", "obs-failed", "obs-no-consent"].map(String::from);
    let finals = env.final_outcomes(&ids, T).await;
    assert_eq!(finals["obs-sent"][0]["status"], "sent");
    assert_eq!(finals["obs-failed"][0]["status"], "failed");
    assert_eq!(finals["obs-no-consent"][0]["status"], "suppressed");
    assert_eq!(finals["obs-no-consent"][0]["reason"], "no_consent");

    // A forged webhook, and the sandbox's signed status callbacks (sent with pricing, delivered,
    // read), so the webhook families are on /metrics too.
    let forged = reqwest::Client::new()
        .post(format!("http://{}/webhook", app.webhook()))
        .header("x-hub-signature-256", "sha256=00")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401);
    let text = wait_for("the read status on /metrics", T, async || {
        let text = app.metrics().await;
        text.contains("sendwell_delivery_statuses_total{account=\"acme-de\",status=\"read\"}")
            .then_some(text)
    })
    .await;

    for family in [
        "sendwell_jobs_finished_total",
        "sendwell_api_requests_total",
        "sendwell_api_request_duration_seconds_bucket",
        "sendwell_delivery_statuses_total",
        "sendwell_webhook_requests_total",
    ] {
        assert!(
            text.contains(family),
            "{family} is not on /metrics:\n{text}"
        );
    }
    // The process's own figures, read at the scrape: for the CPU per job in production.
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} is not on /metrics:\n{text}"))
    };
    let rss = value("process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 1e11, "RSS {rss}");
    assert!(value("process_threads") >= 2.0);
    assert!(value("process_open_fds") > 0.0);
    assert!(value("process_start_time_seconds") > 1.7e9);
    value("process_cpu_seconds_total");

    // Everything on /metrics is in ALL (what the dashboard and the alerts may query).
    let typed: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let unlisted: Vec<&str> = typed
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| name.starts_with("sendwell_") && !ALL.contains(name))
        .collect();
    assert!(
        unlisted.is_empty(),
        "/metrics exports metrics missing from sendwell::metrics::ALL: {unlisted:?}"
    );
    // What the dashboard and the alerts read as a histogram is one on /metrics.
    let (_, queries) = dashboard();
    let queried = metric_names(&format!("{}\n{}", queries.join("\n"), read(ALERTS)));
    for name in queried.iter().filter_map(|n| n.strip_suffix("_bucket")) {
        if let Some((_, kind)) = typed.iter().find(|(n, _)| *n == name) {
            assert_eq!(
                *kind, "histogram",
                "{name} is queried as a histogram but exported as a {kind}"
            );
        }
    }

    let out = promtool(&["check", "metrics"], Some(text.as_bytes()));
    assert!(
        out.status.success(),
        "promtool check metrics found problems in /metrics ({}):\n{}{}\n--- /metrics ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    app.stop().await;
}
