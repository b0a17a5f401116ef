//! The load: the job mix, the daemon's config and consent seed, one publisher and one outcome
//! collector, shared by every run (sendwell and the baselines), and the sandbox.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, Consumer};
use sendwell::config::Config;
use sendwell::sandbox::{Sandbox, SandboxConfig, SandboxHandle};
use tokio_util::sync::CancellationToken;

use crate::common::{FINAL, GOOD_TOKEN, number};
use crate::procfs::{Probe, Snapshot};

/// Account `k`: `acme-0`, `acme-1`, …
pub fn account(k: usize) -> String {
    format!("acme-{k}")
}

pub fn phone_number_id(k: usize) -> String {
    format!("{}", 106_540_352_242_922u64 + k as u64)
}

/// What job `i` is. Marketing 60 %, utility 30 %, authentication 10 %, minus 0.5 % malformed
/// (taken from the authentication share: `i % 200 == 199` has `i % 10 == 9`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Marketing,
    Utility,
    Authentication,
    /// 0: invalid number, 1: unknown field, 2: not JSON (no id can be read from it).
    Malformed(u8),
}

pub fn kind(i: usize) -> Kind {
    if i % 200 == 199 {
        return Kind::Malformed(((i / 200) % 3) as u8);
    }
    match i % 10 {
        0..=5 => Kind::Marketing,
        6..=8 => Kind::Utility,
        _ => Kind::Authentication,
    }
}

/// 95 % of marketing and of utility recipients gave consent (seeded before the daemon starts);
/// the other 5 % end `suppressed` (no_consent).
pub fn consented(i: usize) -> bool {
    (i / 10) % 20 != 7
}

/// The job id of job `i`; the collector reads `i` back from it.
pub fn job_id(i: usize) -> String {
    format!("bench-{i}")
}

pub fn index_of(id: &str) -> Option<usize> {
    id.strip_prefix("bench-")?.parse().ok()
}

/// A job ready to publish.
pub struct Job {
    pub routing_key: String,
    pub body: Vec<u8>,
}

pub struct Jobs {
    pub jobs: Vec<Job>,
    /// Jobs whose outcome cannot name them (not JSON): counted, not matched by id.
    pub anonymous: usize,
}

pub fn build_jobs(n: usize, accounts: usize) -> Jobs {
    let jobs: Vec<Job> = (0..n).map(|i| build_job(i, &job_id(i), accounts)).collect();
    let anonymous = (0..n).filter(|&i| kind(i) == Kind::Malformed(2)).count();
    Jobs { jobs, anonymous }
}

/// The job for recipient `i` (its number, account and [`kind`]) under the id `id`: the load
/// bench gives every recipient one job (`job_id(i)`), the soak sends to the same recipients
/// again and again under new ids. A [`Kind::Malformed`]`(2)` job is not JSON: its outcome
/// cannot name it.
pub fn build_job(i: usize, id: &str, accounts: usize) -> Job {
    let to = number(i);
    let acc = account(i % accounts);
    let template = |name: &str, lang: &str, components: serde_json::Value| serde_json::json!({ "name": name, "language": lang, "components": components });
    let mut job = serde_json::json!({
        "id": id,
        "account": acc,
        "to": to,
        "metadata": { "campaign": "bench", "batch": i / 1000 },
    });
    let k = kind(i);
    match k {
        Kind::Marketing | Kind::Malformed(_) => {
            job["category"] = "marketing".into();
            job["purpose"] = "newsletter".into();
            job["template"] = template("spring_sale", "de", serde_json::json!([]));
        }
        Kind::Utility => {
            job["category"] = "utility".into();
            job["purpose"] = "order_updates".into();
            job["template"] = template(
                "order_shipped",
                "de",
                serde_json::json!([{ "type": "body", "parameters": [
                    { "type": "text", "text": format!("A-{i}") }
                ]}]),
            );
        }
        Kind::Authentication => {
            job["category"] = "authentication".into();
            job["template"] = template(
                "login_code",
                "en",
                serde_json::json!([{ "type": "body", "parameters": [
                    { "type": "text", "text": format!("{:06}", i % 1_000_000) }
                ]}]),
            );
        }
    }
    let mut body = match k {
        Kind::Malformed(0) => {
            job["to"] = "+4912".into();
            serde_json::to_vec(&job).unwrap()
        }
        Kind::Malformed(1) => {
            job["colour"] = "blue".into();
            serde_json::to_vec(&job).unwrap()
        }
        _ => serde_json::to_vec(&job).unwrap(),
    };
    if k == Kind::Malformed(2) {
        body.truncate(40);
    }
    Job {
        routing_key: to.trim_start_matches('+').to_string(),
        body,
    }
}

/// The daemon's config: `accounts` accounts at the Cloud API's maximum rate with recipient
/// pacing on, two consent purposes, the example config's marketing caps, a price table.
/// `state_backend`: lines for the `[state]` section (the backend and `[state.postgres]`; empty:
/// redb in `state`).
#[allow(clippy::too_many_arguments)] // each is one setting of the config's text
pub fn config_toml(
    broker_url: &str,
    sandbox: &SocketAddr,
    state: &Path,
    state_backend: &str,
    admin: &SocketAddr,
    prefetch: u16,
    accounts: usize,
    webhook: Option<&SocketAddr>,
) -> String {
    let mut toml = format!(
        r#"
[broker]
url = "{broker_url}"
prefetch = {prefetch}

[state]
dir = "{state}"
{state_backend}

[cloud_api]
base_url = "http://{sandbox}"
request_timeout = "15s"

[shutdown]
grace_period = "20s"

[admin]
listen = "{admin}"

[log]
filter = "info"

[[purposes]]
name = "newsletter"
categories = ["marketing"]

[[purposes]]
name = "order_updates"
categories = ["utility"]

[[caps]]
category = "marketing"
scope = "brand"
rules = [{{ max = 1, per = "1d" }}, {{ max = 2, per = "7d" }}]

[prices]
currency = "EUR"
[prices.default]
marketing = "0.0592"
utility = "0.0171"
authentication = "0.0171"
service = "0.0171"
[prices.markets.germany]
calling_codes = ["49"]
marketing = "0.1131"
utility = "0.0456"
authentication = "0.0456"
service = "0.0456"
"#,
        state = state.display()
    );
    // The listener the sandbox posts every status callback to; its secrets are the files
    // `write_config` writes next to the config.
    if let Some(listen) = webhook {
        toml.push_str(&format!(
            "\n[webhook]\nenabled = true\nlisten = \"{listen}\"\n\
             app_secret_file = \"app_secret\"\nverify_token_file = \"verify_token\"\n"
        ));
    }
    for k in 0..accounts {
        toml.push_str(&format!(
            "\n[[accounts]]\nname = \"{}\"\nphone_number_id = \"{}\"\ntoken_file = \"token\"\n\
             brand = \"acme\"\nmessages_per_second = 1000\npacing = {{ interval = \"6s\" }}\n",
            account(k),
            phone_number_id(k)
        ));
    }
    toml
}

/// The app secret the sandbox signs callbacks with and the daemon checks them against.
pub const APP_SECRET: &str = "bench-app-secret";

/// Writes the config (and the token and webhook secret files) into `dir`; returns the config's
/// path.
pub fn write_config(dir: &Path, toml: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("token"), GOOD_TOKEN).unwrap();
    std::fs::write(dir.join("app_secret"), APP_SECRET).unwrap();
    std::fs::write(dir.join("verify_token"), "bench-verify-token").unwrap();
    let p = dir.join("sendwell.toml");
    std::fs::write(&p, toml).unwrap();
    p
}

/// Consent for every consented marketing (double opt-in, confirmed) and utility (opt-in)
/// recipient, through the consent store itself (on the config's backend), before any daemon
/// runs. Returns how many recipients were seeded.
pub async fn seed_consent(config: &Config, n: usize, accounts: usize) -> usize {
    let ledger = sendwell::store::Ledger::open_state(&config.state, false)
        .await
        .unwrap();
    let store = sendwell::consent::ConsentStore::load(ledger, config)
        .await
        .unwrap();
    let decoder = sendwell::consent::EventDecoder::new(config);
    let now = jiff::Timestamp::now();
    let at = now - Duration::from_secs(3600);
    let grants: Vec<(usize, &str, &[&str])> = (0..n)
        .filter(|&i| consented(i))
        .filter_map(|i| match kind(i) {
            Kind::Marketing => Some((i, "newsletter", &["opt_in", "confirm"][..])),
            Kind::Utility => Some((i, "order_updates", &["opt_in"][..])),
            _ => None,
        })
        .collect();
    let seeded = grants.len();
    for chunk in grants.chunks(5000) {
        let applies = chunk.iter().map(|&(i, purpose, steps)| {
            let (store, decoder) = (&store, &decoder);
            async move {
                for (dt, kind) in steps.iter().enumerate() {
                    let raw = serde_json::json!({
                        "type": kind, "account": account(i % accounts), "to": number(i),
                        "purposes": [purpose], "source": "bench_seed",
                        "at": (at + Duration::from_secs(60 * dt as u64)).to_string(),
                    });
                    let ev = decoder
                        .decode(raw.to_string().as_bytes(), now)
                        .expect("seed event is valid");
                    store.apply(&ev).await.unwrap();
                }
            }
        });
        futures_util::future::join_all(applies).await;
    }
    drop(store);
    assert!(
        sendwell::store::wait_closed(Duration::from_secs(30)),
        "the seeded state store closes"
    );
    seeded
}

/// A sandbox of its own for one run, on loopback port 0.
pub struct RunSandbox {
    pub addr: SocketAddr,
    pub handle: SandboxHandle,
    stop: CancellationToken,
}

impl RunSandbox {
    /// `webhook`: the daemon's listener; every accepted send then gets its `sent` (with
    /// pricing), `delivered` and `read` callbacks, signed, each due as soon as the one before
    /// it was answered 200 (no delay, no cap on how many are in flight), as Meta does at full
    /// speed, and posted with the others due within 10 ms (see [`status_batch`]).
    pub async fn start(latency: Duration, webhook: Option<&SocketAddr>) -> RunSandbox {
        let sb = Sandbox::bind(
            "127.0.0.1:0".parse().unwrap(),
            SandboxConfig {
                latency,
                valid_tokens: Some(vec![GOOD_TOKEN.to_string()]),
                webhook_url: webhook.map(|a| format!("http://{a}/webhook")),
                app_secret: webhook.map(|_| APP_SECRET.to_string()),
                status_delay: Duration::ZERO,
                read_rate: 1.0,
                status_batch: status_batch(),
                status_batch_window: Duration::from_millis(10),
                ..SandboxConfig::default()
            },
        )
        .await
        .unwrap();
        let addr = sb.local_addr();
        let handle = sb.handle();
        let stop = CancellationToken::new();
        tokio::spawn(sb.serve(stop.clone()));
        RunSandbox { addr, handle, stop }
    }
}

/// `SENDWELL_BENCH_STATUS_BATCH` (100): statuses in one callback POST at most, those due
/// within 10 ms of each other together, as Meta batches notifications under load (up to
/// 1,000); 1 posts each status alone.
pub fn status_batch() -> usize {
    std::env::var("SENDWELL_BENCH_STATUS_BATCH")
        .ok()
        .map(|v| {
            v.parse()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .unwrap_or_else(|| panic!("SENDWELL_BENCH_STATUS_BATCH: {v:?} is not 1 to 1000"))
        })
        .unwrap_or(100)
}

impl Drop for RunSandbox {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn quorum_args(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    for (k, v) in extra {
        args.insert((*k).into(), v.clone());
    }
    args
}

/// A quorum queue of the bench's own bound to `exchange` with `#`, consumed without acks.
pub async fn observe(url: &str, exchange: &str, queue: &str) -> (Connection, Consumer) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        quorum_args(&[]),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_qos(10_000, Default::default()).await.unwrap();
    let consumer = ch
        .basic_consume(
            queue.into(),
            "bench-collector".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (conn, consumer)
}

/// When each job was published: µs since the run's epoch, plus one (0: not yet).
pub type PublishTimes = Arc<Vec<AtomicU64>>;

pub fn publish_times(n: usize) -> PublishTimes {
    Arc::new((0..n).map(|_| AtomicU64::new(0)).collect())
}

/// One connection, persistent messages, publisher confirms pipelined in a window of 1,000, as
/// an upstream service should publish; at most `rate` jobs/s when it is above 0, else as fast as
/// the broker confirms. Returns when every job is confirmed: how long it took.
pub async fn publish(
    url: String,
    exchange: String,
    jobs: Arc<Jobs>,
    epoch: Instant,
    times: PublishTimes,
    rate: f64,
) -> Duration {
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for (i, job) in jobs.jobs.iter().enumerate() {
        if rate > 0.0 {
            let due = epoch + Duration::from_secs_f64(i as f64 / rate);
            if Instant::now() < due {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        times[i].store(epoch.elapsed().as_micros() as u64 + 1, Ordering::Relaxed);
        let confirm = ch
            .basic_publish(
                exchange.as_str().into(),
                job.routing_key.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                &job.body,
                lapin::BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap();
        pending.push(confirm);
        while pending.len() >= 1000 {
            pending.next().await.unwrap().unwrap();
        }
    }
    while let Some(c) = pending.next().await {
        c.unwrap();
    }
    let took = epoch.elapsed();
    let _ = conn.close(200, "published".into()).await;
    took
}

/// What the collector saw.
pub struct Collected {
    /// Jobs with a final outcome (each counted once).
    pub finished: usize,
    /// Final outcomes repeated for a job already finished (at-least-once delivery).
    pub repeats: usize,
    /// Outcome events by routing key (`sent`, `suppressed.no_consent`, `invalid.malformed`…).
    pub by_key: BTreeMap<String, usize>,
    /// Publish-to-final-outcome latency of every job whose outcome names it, µs, sorted.
    pub latencies_us: Vec<u64>,
    /// When the last final outcome arrived, with the CPU counters read right then.
    pub end: Snapshot,
    /// Most jobs published and not yet finished at once (queued + in flight).
    pub peak_outstanding: usize,
    pub stalled: bool,
    /// Jobs whose final outcome is `sent`: with callbacks, each gets a `delivered` and a `read`.
    pub sent: usize,
    /// Delivery events (`delivered`, `read`), each (job, status) counted once.
    pub deliveries: usize,
    /// Delivery events repeated for a (job, status) already seen.
    pub delivery_repeats: usize,
    /// Every delivery event first seen: (wamid, status, arrival in unix ms), to match with the
    /// sandbox's callback times.
    pub delivery_arrivals: Vec<(String, &'static str, u64)>,
}

#[derive(serde::Deserialize)]
struct OutcomeHead<'a> {
    #[serde(borrow, default)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    status: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    wamid: Option<std::borrow::Cow<'a, str>>,
}

/// Polls the daemon's `/metrics` every 10 ms until its `read` statuses applied
/// (`sendwell_delivery_statuses_total{status="read"}`, all accounts; counted as each is
/// applied, before its delivery row is written) reach `sent`; false if that takes over
/// `stall`.
pub async fn reads_applied(admin: &SocketAddr, sent: usize, stall: Duration) -> bool {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + stall;
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("http://{admin}/metrics")).send().await
            && let Ok(text) = r.text().await
        {
            let reads: f64 = text
                .lines()
                .filter(|l| {
                    l.starts_with("sendwell_delivery_statuses_total{")
                        && l.contains("status=\"read\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if reads >= sent as f64 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Now, unix milliseconds: the sandbox stamps its callbacks on the same clock.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads outcomes until every job has a final one, or none came for `stall`. A job whose id
/// cannot be read gets no outcome from sendwell (CONTRACT §3 needs an id), only a dead letter:
/// with `dead` (a queue on the dead-letter exchange), such dead letters count as its finish.
/// With callbacks, also until every sent job's delivery events have come
/// (`events_per_sent`: 2, `delivered` and `read`; 1, `delivered` only, when `read` publishes
/// no event; 0, no callbacks): a message's callbacks go through its lane in order, so its
/// `sent` callback was applied by then too.
#[allow(clippy::too_many_arguments)]
pub async fn collect(
    mut consumer: Consumer,
    mut dead: Option<Consumer>,
    jobs: &Jobs,
    epoch: Instant,
    times: &PublishTimes,
    probe: &Probe,
    stall: Duration,
    events_per_sent: usize,
) -> Collected {
    let n = jobs.jobs.len();
    let mut seen = vec![false; n];
    // Per job: bit 0 `delivered` seen, bit 1 `read` seen.
    let mut delivered = vec![0u8; n];
    let mut anonymous = 0usize;
    let mut c = Collected {
        finished: 0,
        repeats: 0,
        by_key: BTreeMap::new(),
        latencies_us: Vec::with_capacity(n),
        end: probe.snap(),
        peak_outstanding: 0,
        stalled: false,
        sent: 0,
        deliveries: 0,
        delivery_repeats: 0,
        delivery_arrivals: Vec::new(),
    };
    let mut published_upto = 0usize;
    let done = |c: &Collected| c.finished >= n && c.deliveries >= events_per_sent * c.sent;
    while !done(&c) {
        let next = async {
            tokio::select! {
                d = consumer.next() => (false, d),
                d = async {
                    match dead.as_mut() {
                        Some(c) => c.next().await,
                        None => std::future::pending().await,
                    }
                } => (true, d),
            }
        };
        let (is_dead, d) = match tokio::time::timeout(stall, next).await {
            Ok((is_dead, Some(Ok(d)))) => (is_dead, d),
            _ => {
                c.stalled = true;
                break;
            }
        };
        let now_us = epoch.elapsed().as_micros() as u64;
        if is_dead {
            *c.by_key.entry("(dead-lettered)".into()).or_default() += 1;
            let named = serde_json::from_slice::<OutcomeHead>(&d.data)
                .ok()
                .and_then(|h| h.id)
                .is_some();
            if !named && anonymous < jobs.anonymous {
                anonymous += 1;
                c.finished += 1;
                if done(&c) {
                    c.end = probe.snap();
                }
            }
            continue;
        }
        *c.by_key.entry(d.routing_key.to_string()).or_default() += 1;
        let Ok(head) = serde_json::from_slice::<OutcomeHead>(&d.data) else {
            continue;
        };
        let bit = match head.status.as_deref() {
            Some("delivered") => Some((1u8, "delivered")),
            Some("read") => Some((2u8, "read")),
            _ => None,
        };
        if let Some((bit, status)) = bit {
            if let Some(i) = head.id.as_deref().and_then(index_of).filter(|&i| i < n) {
                if delivered[i] & bit != 0 {
                    c.delivery_repeats += 1;
                } else {
                    delivered[i] |= bit;
                    c.deliveries += 1;
                    if let Some(w) = head.wamid.as_deref() {
                        c.delivery_arrivals.push((w.to_string(), status, unix_ms()));
                    }
                    if done(&c) {
                        c.end = probe.snap();
                    }
                }
            }
            continue;
        }
        if !head.status.as_deref().is_some_and(|s| FINAL.contains(&s)) {
            continue;
        }
        match head.id.as_deref().and_then(index_of).filter(|&i| i < n) {
            Some(i) if seen[i] => c.repeats += 1,
            Some(i) => {
                seen[i] = true;
                c.finished += 1;
                if head.status.as_deref() == Some("sent") {
                    c.sent += 1;
                }
                let published = times[i].load(Ordering::Relaxed);
                if published > 0 {
                    c.latencies_us
                        .push(now_us.saturating_sub(published.saturating_sub(1)));
                }
            }
            None if anonymous < jobs.anonymous => {
                anonymous += 1;
                c.finished += 1;
            }
            None => c.repeats += 1,
        }
        // Outstanding: published so far (times are written in order) minus finished.
        while published_upto < n && times[published_upto].load(Ordering::Relaxed) > 0 {
            published_upto += 1;
        }
        c.peak_outstanding = c
            .peak_outstanding
            .max(published_upto.saturating_sub(c.finished));
        if done(&c) {
            c.end = probe.snap();
        }
    }
    if c.stalled {
        c.end = probe.snap();
    }
    c.latencies_us.sort_unstable();
    c
}

/// Most of `sorted_ms` in any half-open window `[x, x + window_ms)`.
pub fn max_in_window(sorted_ms: &[u64], window_ms: u64) -> usize {
    let mut best = 0;
    let mut j = 0;
    for i in 0..sorted_ms.len() {
        while sorted_ms[i] - sorted_ms[j] >= window_ms {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

/// Writes a bench's JSON report to `path` (its directory made if missing) and says where, or
/// why not: a report that cannot be written must not lose the run's printed figures.
pub fn write_json(path: &Path, json: &serde_json::Value) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(path, serde_json::to_vec_pretty(json).unwrap()) {
        Ok(()) => println!("\nJSON: {}", path.display()),
        Err(e) => println!("\nJSON not written to {}: {e}", path.display()),
    }
}
