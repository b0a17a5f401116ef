//! Test helpers: a vhost of its own on the real local RabbitMQ for each test, the sandbox on
//! port 0, and `spawn_app()` starting the whole daemon in-process against both.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use sendwell::app::RunningApp;
use sendwell::config::Config;
use sendwell::sandbox::{Sandbox, SandboxConfig, SandboxHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
pub mod pg;
pub mod procs;
pub mod seed;

pub const MGMT: &str = "http://127.0.0.1:15672";
/// base64("guest:guest"): the local broker's default management login.
const MGMT_AUTH: &str = "Basic Z3Vlc3Q6Z3Vlc3Q=";
pub const GOOD_TOKEN: &str = "good-token";
pub const APP_SECRET: &str = "test-app-secret";
pub const VERIFY_TOKEN: &str = "test-verify-token";

/// Config for a daemon with its webhook listener on (port 0) and a small price table.
pub fn webhook_toml(max_body: usize) -> String {
    format!(
        r#"
[webhook]
enabled = true
listen = "127.0.0.1:0"
app_secret_file = "app-secret"
verify_token_file = "verify-token"
max_body_bytes = {max_body}
template_pause_max_wait = "3s"

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
"#
    )
}

/// Polls `check` until it returns Some, or panics with `what` at the deadline.
pub async fn wait_for<T>(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn mgmt(method: reqwest::Method, path: &str, body: Option<&str>) -> reqwest::Response {
    let client = reqwest::Client::new();
    let mut req = client
        .request(method, format!("{MGMT}{path}"))
        .header("authorization", MGMT_AUTH)
        .header("content-type", "application/json");
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    req.send()
        .await
        .expect("the RabbitMQ management API answers (scripts/ensure-rabbitmq.sh enables it)")
}

/// A vhost of its own, deleted when dropped.
pub struct TestBroker {
    pub vhost: String,
    pub url: String,
    /// Users made by `user_who_may_write`, deleted on drop.
    users: Mutex<Vec<String>>,
}

impl TestBroker {
    pub async fn new() -> Self {
        let vhost = format!("sendwell-test-{}", uuid::Uuid::new_v4().simple());
        let r = mgmt(reqwest::Method::PUT, &format!("/api/vhosts/{vhost}"), None).await;
        assert!(r.status().is_success(), "create vhost: {}", r.status());
        let r = mgmt(
            reqwest::Method::PUT,
            &format!("/api/permissions/{vhost}/guest"),
            Some(r#"{"configure":".*","write":".*","read":".*"}"#),
        )
        .await;
        assert!(r.status().is_success(), "set permissions: {}", r.status());
        let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
        Self {
            vhost,
            url,
            users: Mutex::new(Vec::new()),
        }
    }

    /// A broker user of its own with permissions in this vhost only for what `write` matches
    /// (configure and read nothing), as the operations guide sets up an upstream publisher;
    /// returns its AMQP URL. Deleted with the vhost's test (see `Drop`).
    pub async fn user_who_may_write(&self, write: &str) -> String {
        let name = format!("sendwell-test-user-{}", uuid::Uuid::new_v4().simple());
        let r = mgmt(
            reqwest::Method::PUT,
            &format!("/api/users/{name}"),
            Some(r#"{"password":"pw","tags":""}"#),
        )
        .await;
        assert!(r.status().is_success(), "create user: {}", r.status());
        let body = serde_json::json!({ "configure": "^$", "write": write, "read": "^$" });
        let r = mgmt(
            reqwest::Method::PUT,
            &format!("/api/permissions/{}/{name}", self.vhost),
            Some(&body.to_string()),
        )
        .await;
        assert!(r.status().is_success(), "set permissions: {}", r.status());
        self.users.lock().unwrap().push(name.clone());
        format!("amqp://{name}:pw@127.0.0.1:5672/{}", self.vhost)
    }

    /// Sets a policy in this vhost (`definition`: the management API's policy JSON).
    pub async fn set_policy(&self, name: &str, definition: serde_json::Value) {
        let r = mgmt(
            reqwest::Method::PUT,
            &format!("/api/policies/{}/{name}", self.vhost),
            Some(&definition.to_string()),
        )
        .await;
        assert!(r.status().is_success(), "set policy: {}", r.status());
    }

    pub async fn delete_policy(&self, name: &str) {
        let r = mgmt(
            reqwest::Method::DELETE,
            &format!("/api/policies/{}/{name}", self.vhost),
            None,
        )
        .await;
        assert!(r.status().is_success(), "delete policy: {}", r.status());
    }

    /// A queue as the management API describes it (None: not there yet).
    pub async fn queue_info(&self, queue: &str) -> Option<serde_json::Value> {
        let r = mgmt(
            reqwest::Method::GET,
            &format!("/api/queues/{}/{queue}", self.vhost),
            None,
        )
        .await;
        if !r.status().is_success() {
            return None;
        }
        serde_json::from_slice(&r.bytes().await.ok()?).ok()
    }

    /// Consumers on a queue (None: queue not there yet).
    pub async fn consumers(&self, queue: &str) -> Option<u64> {
        self.queue_info(queue).await?.get("consumers")?.as_u64()
    }

    /// Whether `queue` has nothing ready and nothing unacked, asked of the queue itself
    /// (`rabbitmqctl`, not the management API's statistics, which lag by seconds).
    ///
    /// A `rabbitmqctl` that fails (it times out on a saturated machine) is asked again, for up
    /// to a minute: only the queue's own answer counts, and a "no" prints the counts.
    pub fn drained(&self, queue: &str) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let out = std::process::Command::new("rabbitmqctl")
                .args([
                    "list_queues",
                    "-q",
                    "--no-table-headers",
                    "-p",
                    &self.vhost,
                    "name",
                    "messages_ready",
                    "messages_unacknowledged",
                ])
                .output()
                .expect("rabbitmqctl runs");
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3 && f[0] == queue).then(|| (f[1].to_string(), f[2].to_string()))
            });
            match line {
                Some((ready, unacked)) => {
                    let drained = ready == "0" && unacked == "0";
                    if !drained {
                        eprintln!("{queue}: {ready} ready, {unacked} unacked");
                    }
                    return drained;
                }
                None if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                None => panic!(
                    "rabbitmqctl list_queues did not list {queue}: {}{}",
                    text,
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        }
    }

    /// `rabbitmqctl close_all_connections` for this vhost only (other tests run in parallel).
    pub fn close_all_connections(&self) {
        let out = std::process::Command::new("rabbitmqctl")
            .args([
                "close_all_connections",
                "-p",
                &self.vhost,
                "test: simulated broker failure",
            ])
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "close_all_connections: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        for user in self.users.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = std::process::Command::new("curl")
                .args([
                    "-fsS",
                    "-o",
                    "/dev/null",
                    "-u",
                    "guest:guest",
                    "-X",
                    "DELETE",
                ])
                .arg(format!("{MGMT}/api/users/{user}"))
                .status();
        }
        let _ = std::process::Command::new("curl")
            .args([
                "-fsS",
                "-o",
                "/dev/null",
                "-u",
                "guest:guest",
                "-X",
                "DELETE",
            ])
            .arg(format!("{MGMT}/api/vhosts/{}", self.vhost))
            .status();
    }
}

/// Everything a test saw on one queue, collected by a background task that survives
/// connection losses. Identical redelivered bodies are counted once (at-least-once delivery).
#[derive(Clone, Default)]
pub struct Collected {
    pub messages: Arc<Mutex<Vec<Seen>>>,
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub body: Vec<u8>,
    pub routing_key: String,
    pub headers: HashMap<String, String>,
}

impl Seen {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

impl Collected {
    pub fn all(&self) -> Vec<Seen> {
        self.messages.lock().unwrap().clone()
    }
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.all().iter().map(|s| s.json()).collect()
    }
    /// Events whose `id` is `id`.
    pub fn for_id(&self, id: &str) -> Vec<serde_json::Value> {
        self.json().into_iter().filter(|v| v["id"] == id).collect()
    }
}

/// Declares `queue` bound to `exchange` with `key` (declaring the exchange as sendwell does)
/// and collects every message on it until the returned token is cancelled.
pub async fn collect(
    url: &str,
    exchange: &str,
    kind: ExchangeKind,
    key: &str,
    queue: &str,
) -> (Collected, CancellationToken) {
    let collected = Collected::default();
    let stop = CancellationToken::new();
    // Declare once before returning, so nothing published after this call is missed.
    {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        declare(&ch, exchange, kind.clone(), key, queue).await;
        let _ = conn.close(200, "declared".into()).await;
    }
    let (c, s, url, exchange, key, queue) = (
        collected.clone(),
        stop.clone(),
        url.to_string(),
        exchange.to_string(),
        key.to_string(),
        queue.to_string(),
    );
    tokio::spawn(async move {
        while !s.is_cancelled() {
            let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(ch) = conn.create_channel().await else {
                continue;
            };
            declare(&ch, &exchange, kind.clone(), &key, &queue).await;
            let Ok(mut consumer) = ch
                .basic_consume(
                    queue.as_str().into(),
                    "collector".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
            else {
                continue;
            };
            loop {
                tokio::select! {
                    _ = s.cancelled() => return,
                    d = consumer.next() => match d {
                        Some(Ok(d)) => {
                            let headers = d.properties.headers().as_ref().map(|h| {
                                h.inner().iter().map(|(k, v)| (k.to_string(), match v {
                                    AMQPValue::LongString(s) => s.to_string(),
                                    other => format!("{other:?}"),
                                })).collect()
                            }).unwrap_or_default();
                            let seen = Seen { body: d.data.clone(), routing_key: d.routing_key.to_string(), headers };
                            {
                                let mut m = c.messages.lock().unwrap();
                                if !(d.redelivered && m.iter().any(|x| x.body == seen.body)) {
                                    m.push(seen);
                                }
                            }
                            let _ = d.ack(BasicAckOptions::default()).await;
                        }
                        _ => break,
                    }
                }
            }
        }
    });
    (collected, stop)
}

async fn declare(ch: &lapin::Channel, exchange: &str, kind: ExchangeKind, key: &str, queue: &str) {
    if !exchange.is_empty() {
        let _ = ch
            .exchange_declare(
                exchange.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
    }
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    if !exchange.is_empty() {
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
}

/// Knobs for `spawn_app`.
pub struct AppOptions {
    pub sandbox: SandboxConfig,
    pub token: String,
    pub extra_toml: String,
    pub prefetch: u16,
    /// Recipients `number(i)` given a confirmed double opt-in for `newsletter` before the
    /// daemon starts, so send-path tests exercise sending, not suppression.
    pub consented: std::ops::Range<usize>,
    /// Limit keys of the `acme-de` account (inside its `[[accounts]]` table, before
    /// `extra_toml`).
    pub account_limits: String,
    /// The env's state on PostgreSQL whatever `SENDWELL_TEST_BACKEND` says: for tests of
    /// several instances on one database ([`TestEnv::start_instance_on_shared_db`]).
    pub postgres: bool,
}

/// Tests of the send path are not tests of the limits: the account may send at the Cloud
/// API's maximum and recipient pacing is off. Limit tests set their own.
pub const RELAXED_LIMITS: &str = "messages_per_second = 1000\npacing = { interval = \"0s\" }\n";

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            sandbox: SandboxConfig {
                latency: Duration::from_millis(5),
                valid_tokens: Some(vec![GOOD_TOKEN.to_string()]),
                ..SandboxConfig::default()
            },
            token: GOOD_TOKEN.into(),
            extra_toml: String::new(),
            prefetch: 200,
            consented: 0..4000,
            account_limits: RELAXED_LIMITS.into(),
            postgres: false,
        }
    }
}

/// A sandbox, a vhost, a config file and a state directory: everything a daemon needs.
pub struct TestEnv {
    /// The state databases of this env's instances, when the tests run on PostgreSQL
    /// (`SENDWELL_TEST_BACKEND=postgres`); dropped with the env.
    dbs: std::sync::Mutex<Vec<pg::TestDb>>,
    pub broker: TestBroker,
    pub sandbox: SandboxHandle,
    pub sandbox_addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub outcomes: Collected,
    pub dead: Collected,
    stops: Vec<CancellationToken>,
    /// The `[state]` lines of the database [`TestEnv::start_instance_sharing_db`] puts every
    /// instance in, once chosen.
    shared_state: Mutex<Option<String>>,
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for s in &self.stops {
            s.cancel();
        }
    }
}

pub fn write_config(
    dir: &Path,
    broker_url: &str,
    sandbox: &std::net::SocketAddr,
    token: &str,
    prefetch: u16,
    account_limits: &str,
    extra: &str,
) -> PathBuf {
    write_config_on(
        dir,
        broker_url,
        sandbox,
        token,
        prefetch,
        account_limits,
        extra,
        "",
    )
}

/// The `[state]` lines that put an instance's state in `db` (None: redb, in its directory).
pub fn state_backend_toml(db: Option<&pg::TestDb>) -> String {
    match db {
        Some(db) => format!("backend = \"postgres\"\n{}", db.state_postgres_toml()),
        None => String::new(),
    }
}

/// A database for an instance's state when the tests run on PostgreSQL, else None.
pub async fn test_db() -> Option<pg::TestDb> {
    match pg::backend() {
        "postgres" => Some(pg::TestDb::new().await),
        _ => None,
    }
}

/// As [`write_config`], with `state` (see [`state_backend_toml`]) in the `[state]` section.
#[allow(clippy::too_many_arguments)]
pub fn write_config_on(
    dir: &Path,
    broker_url: &str,
    sandbox: &std::net::SocketAddr,
    token: &str,
    prefetch: u16,
    account_limits: &str,
    extra: &str,
    state_toml: &str,
) -> PathBuf {
    std::fs::write(dir.join("token"), token).unwrap();
    let state = dir.join("state");
    let toml = format!(
        r#"
[broker]
url = "{broker_url}"
prefetch = {prefetch}
reconnect_max_delay = "1s"

[state]
dir = "{state}"
{state_toml}

[cloud_api]
base_url = "http://{sandbox}"
request_timeout = "5s"

[retry]
max_attempts = 5
base_delay = "20ms"
max_delay = "2s"
inline_max_delay = "500ms"
account_pause_probe = "300ms"

[shutdown]
grace_period = "10s"

[admin]
listen = "127.0.0.1:0"

[log]
filter = "warn,sendwell=info"

[[purposes]]
name = "newsletter"

[[accounts]]
name = "acme-de"
phone_number_id = "106540352242922"
token_file = "token"
waba_id = "102290129340398"
{account_limits}
{extra}
"#,
        state = state.display()
    );
    let p = dir.join("sendwell.toml");
    std::fs::write(&p, toml).unwrap();
    p
}

impl TestEnv {
    pub async fn new(opts: &AppOptions) -> TestEnv {
        Self::with_dir_files(opts, &[]).await
    }

    /// As `new`, writing extra files (secrets) into the config directory first.
    pub async fn with_dir_files(opts: &AppOptions, files: &[(&str, &str)]) -> TestEnv {
        let postgres = opts.postgres || pg::backend() == "postgres";
        Self::with_dir_files_on(opts, files, postgres).await
    }

    /// As `new`, with the state in a PostgreSQL database of its own whatever
    /// `SENDWELL_TEST_BACKEND` says: for instances that share one state (issue 18; see
    /// [`TestEnv::start_shared_instance`]).
    pub async fn on_postgres(opts: &AppOptions) -> TestEnv {
        Self::with_dir_files_on(opts, &[], true).await
    }

    /// `opts.consented` comes from a store seeded once per test binary ([`seed`]): copied into
    /// this env's database or state directory.
    async fn with_dir_files_on(
        opts: &AppOptions,
        files: &[(&str, &str)],
        postgres: bool,
    ) -> TestEnv {
        let seeded = match opts.consented.is_empty() {
            true => None,
            false => Some(seed::template(postgres, opts.consented.clone()).await),
        };
        let db = match (postgres, seeded.as_ref().and_then(|s| s.get())) {
            (true, Some(seed::Template::Postgres(t))) => Some(pg::TestDb::copy_of(t).await),
            (true, _) => Some(pg::TestDb::new().await),
            (false, _) => None,
        };
        // The daemon's log, for a failing test: SENDWELL_TEST_LOG=sendwell=debug.
        if let Ok(filter) = std::env::var("SENDWELL_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let broker = TestBroker::new().await;
        let sb = Sandbox::bind("127.0.0.1:0".parse().unwrap(), opts.sandbox.clone())
            .await
            .unwrap();
        let sandbox_addr = sb.local_addr();
        let sandbox = sb.handle();
        let sb_stop = CancellationToken::new();
        tokio::spawn(sb.serve(sb_stop.clone()));
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let config_path = write_config_on(
            dir.path(),
            &broker.url,
            &sandbox_addr,
            &opts.token,
            opts.prefetch,
            &opts.account_limits,
            &opts.extra_toml,
            &state_backend_toml(db.as_ref()),
        );
        let (outcomes, s1) = collect(
            &broker.url,
            "sendwell.outcomes",
            ExchangeKind::Topic,
            "#",
            "test.outcomes",
        )
        .await;
        let (dead, s2) = collect(
            &broker.url,
            "sendwell.dead",
            ExchangeKind::Fanout,
            "",
            "test.dead",
        )
        .await;
        let env = TestEnv {
            dbs: std::sync::Mutex::new(db.into_iter().collect()),
            broker,
            sandbox,
            sandbox_addr,
            dir,
            config_path,
            outcomes,
            dead,
            stops: vec![sb_stop, s1, s2],
            shared_state: Mutex::new(None),
        };
        if let Some(seed::Template::Redb(file)) = seeded.as_ref().and_then(|s| s.get()) {
            seed::copy_redb(file, &env.config().state.dir);
        }
        env
    }

    /// Gives each number a confirmed double opt-in for `newsletter` (account acme-de), through
    /// the consent store itself, before the daemon runs (the store is one process's at a time).
    pub async fn seed_consent(&self, numbers: &[String]) {
        seed_consent_at(&self.config(), numbers).await
    }

    /// Publishes consent events to `sendwell.consent`, with confirms.
    pub async fn publish_consent(&self, events: &[serde_json::Value]) {
        publish_to(&self.broker.url, "sendwell.consent", "", events).await
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).expect("test config is valid")
    }

    /// Starts the daemon in this process; waits until it consumes.
    pub async fn start(&self) -> TestApp {
        self.start_with(|_| {}).await
    }

    /// As `start`, with the loaded config adjusted first.
    pub async fn start_with(&self, adjust: impl FnOnce(&mut Config)) -> TestApp {
        let shutdown = CancellationToken::new();
        let mut config = self.config();
        adjust(&mut config);
        let app = sendwell::app::start(config, shutdown.clone())
            .await
            .expect("daemon starts");
        let readiness = app.readiness.clone();
        wait_for(
            "the daemon to be ready",
            Duration::from_secs(20),
            async || readiness.is_ready().then_some(()),
        )
        .await;
        TestApp {
            app: Some(app),
            shutdown,
        }
    }

    /// A second instance on `shard`, sharing this env's broker and sandbox, with a state
    /// directory of its own (its consent seeded for `consented`) and `extra` config; started
    /// and ready. Keep the directory as long as the instance runs.
    pub async fn start_instance(
        &self,
        shard: u16,
        extra: &str,
        consented: &[String],
    ) -> (TestApp, tempfile::TempDir) {
        let db = test_db().await;
        let state = state_backend_toml(db.as_ref());
        self.dbs.lock().unwrap().extend(db);
        self.start_instance_on(shard, extra, consented, &state)
            .await
    }

    /// As [`Self::start_instance`], with the state in the one PostgreSQL database every
    /// instance this starts shares: the env's own when the tests run on PostgreSQL, else one
    /// made at the first call (whatever `SENDWELL_TEST_BACKEND` says: instances that share
    /// state need PostgreSQL). Two of them on one shard are an active and a warm standby.
    pub async fn start_instance_sharing_db(
        &self,
        shard: u16,
        extra: &str,
        consented: &[String],
    ) -> (TestApp, tempfile::TempDir) {
        let known = self.shared_state.lock().unwrap().clone();
        let state = match known {
            Some(s) => s,
            None => {
                let s = if self.config().state.backend == sendwell::config::StateBackend::Postgres {
                    state_backend_toml(self.dbs.lock().unwrap().first())
                } else {
                    let db = pg::TestDb::new().await;
                    let s = state_backend_toml(Some(&db));
                    self.dbs.lock().unwrap().push(db);
                    s
                };
                *self.shared_state.lock().unwrap() = Some(s.clone());
                s
            }
        };
        self.start_instance_on(shard, extra, consented, &state)
            .await
    }

    async fn start_instance_on(
        &self,
        shard: u16,
        extra: &str,
        consented: &[String],
        state: &str,
    ) -> (TestApp, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config_on(
            dir.path(),
            &self.broker.url,
            &self.sandbox_addr,
            GOOD_TOKEN,
            50,
            RELAXED_LIMITS,
            extra,
            state,
        );
        std::fs::write(dir.path().join("app-secret"), APP_SECRET).unwrap();
        std::fs::write(dir.path().join("verify-token"), VERIFY_TOKEN).unwrap();
        let mut config = Config::load(&path).unwrap();
        config.broker.shard = shard;
        seed_consent_at(&config, consented).await;
        (Self::run_instance(config).await, dir)
    }

    /// Another instance on `shard` on this env's own database (the env made with
    /// `AppOptions::postgres`), sharing its consent and every other row, as instances of one
    /// PostgreSQL state do; its own directory and `extra` config (as [`Self::start_instance`]),
    /// then `adjust`. Started and ready (a standby when `shard` has an active already).
    pub async fn start_instance_on_shared_db(
        &self,
        shard: u16,
        extra: &str,
        adjust: impl FnOnce(&mut Config),
    ) -> (TestApp, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let state = state_backend_toml(Some(
            self.dbs
                .lock()
                .unwrap()
                .first()
                .expect("an env on PostgreSQL (AppOptions::postgres)"),
        ));
        let path = write_config_on(
            dir.path(),
            &self.broker.url,
            &self.sandbox_addr,
            GOOD_TOKEN,
            50,
            RELAXED_LIMITS,
            extra,
            &state,
        );
        let mut config = Config::load(&path).unwrap();
        config.broker.shard = shard;
        adjust(&mut config);
        (Self::run_instance(config).await, dir)
    }

    async fn run_instance(config: Config) -> TestApp {
        let shutdown = CancellationToken::new();
        let app = sendwell::app::start(config, shutdown.clone())
            .await
            .expect("the second instance starts");
        let readiness = app.readiness.clone();
        wait_for(
            "the second instance to be ready",
            Duration::from_secs(30),
            async || readiness.is_ready().then_some(()),
        )
        .await;
        TestApp {
            app: Some(app),
            shutdown,
        }
    }

    /// Another instance on `shard` whose state is this env's own database (instances sharing
    /// one PostgreSQL state, issue 18; the env must be on PostgreSQL: [`TestEnv::on_postgres`],
    /// or `SENDWELL_TEST_BACKEND=postgres`), with the env's config adjusted by `adjust`;
    /// started and ready. The directory returned holds its state directory (its admin token):
    /// keep it as long as the instance runs.
    pub async fn start_shared_instance(
        &self,
        shard: u16,
        adjust: impl FnOnce(&mut Config),
    ) -> (TestApp, tempfile::TempDir) {
        let mut config = self.config();
        assert!(
            config.state.backend == sendwell::config::StateBackend::Postgres,
            "start_shared_instance needs an env on PostgreSQL"
        );
        let dir = tempfile::tempdir().unwrap();
        config.state.dir = dir.path().join("state");
        config.broker.shard = shard;
        adjust(&mut config);
        (Self::run_instance(config).await, dir)
    }

    /// The env's own database (None on redb): for reading what the instances wrote.
    pub async fn db_client(&self) -> Option<tokio_postgres::Client> {
        let db = self
            .dbs
            .lock()
            .unwrap()
            .first()
            .map(|d| (d.url.clone(), d.password().to_string()));
        let (url, password) = db?;
        let mut c: tokio_postgres::Config = url.parse().unwrap();
        c.password(password);
        let (client, conn) = c.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        Some(client)
    }

    pub async fn publish(&self, jobs: &[serde_json::Value]) {
        sendwell::publish::publish_jobs(&self.broker.url, jobs)
            .await
            .expect("jobs published");
    }

    /// Publishes raw bytes to sendwell.jobs (for malformed input).
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        let conn = Connection::connect(&self.broker.url, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        ch.basic_publish(
            "sendwell.jobs".into(),
            routing_key.into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let _ = conn.close(200, "".into()).await;
    }

    /// Waits until every id has a final outcome; returns the events by id. Parsing every event
    /// seen is the costly part (thousands in the load tests, in the daemon's process and on its
    /// cores, every 50 ms): it waits until there can be enough of them, and for new ones.
    pub async fn final_outcomes(
        &self,
        ids: &[String],
        within: Duration,
    ) -> HashMap<String, Vec<serde_json::Value>> {
        let outcomes = self.outcomes.clone();
        let need = ids.iter().collect::<std::collections::HashSet<_>>().len();
        let mut looked_at = None;
        wait_for(
            &format!("final outcomes for {} jobs", ids.len()),
            within,
            async || {
                let seen = outcomes.messages.lock().unwrap().len();
                if seen < need || looked_at == Some(seen) {
                    return None;
                }
                looked_at = Some(seen);
                let by_id = finals_by_id(&outcomes.json());
                ids.iter().all(|id| by_id.contains_key(id)).then_some(by_id)
            },
        )
        .await
    }
}

pub const FINAL: &[&str] = &["sent", "suppressed", "failed", "expired", "invalid"];

/// Final outcomes (not `duplicate`, not delivery updates), grouped by job id. Outcome events
/// are delivered at least once: a repeat is byte-identical (same `at`, same everything) and is
/// the same outcome, so identical events count once, as the README tells consumers to do.
pub fn finals_by_id(events: &[serde_json::Value]) -> HashMap<String, Vec<serde_json::Value>> {
    let mut m: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for e in events {
        if let Some(s) = e["status"].as_str()
            && FINAL.contains(&s)
        {
            let v = m
                .entry(e["id"].as_str().unwrap_or("").to_string())
                .or_default();
            if !v.contains(e) {
                v.push(e.clone());
            }
        }
    }
    m
}

pub struct TestApp {
    pub app: Option<RunningApp>,
    pub shutdown: CancellationToken,
}

impl TestApp {
    pub fn admin(&self) -> std::net::SocketAddr {
        self.app.as_ref().unwrap().admin_addr
    }
    pub fn webhook(&self) -> std::net::SocketAddr {
        self.app
            .as_ref()
            .unwrap()
            .webhook_addr
            .expect("webhook listener on")
    }
    /// The admin listener's /metrics text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(app) = self.app.take() {
            let _ = app.wait().await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A marketing template job to a distinct recipient.
pub fn template_job(id: &str, to: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "account": "acme-de",
        "to": to,
        "category": "marketing",
        "purpose": "newsletter",
        "template": { "name": "spring_sale", "language": "de", "components": [] },
        "metadata": { "campaign": "test" }
    })
}

/// The n-th test recipient: valid German mobile numbers.
pub fn number(n: usize) -> String {
    format!("+49170{:07}", n)
}

/// As [`TestEnv::seed_consent`], for any config (a second instance's state directory).
pub async fn seed_consent_at(config: &Config, numbers: &[String]) {
    if numbers.is_empty() {
        return;
    }
    let ledger = sendwell::store::Ledger::open_state(&config.state, false)
        .await
        .unwrap();
    let store = sendwell::consent::ConsentStore::load(ledger, config)
        .await
        .unwrap();
    let decoder = sendwell::consent::EventDecoder::new(config);
    let now = jiff::Timestamp::now();
    let at = now - Duration::from_secs(3600);
    let grants = numbers.iter().map(|n| {
        let store = &store;
        let decoder = &decoder;
        async move {
            for (kind, dt) in [("opt_in", 0), ("confirm", 60)] {
                let raw = serde_json::json!({
                    "type": kind, "account": "acme-de", "to": n,
                    "purposes": ["newsletter"], "source": "test_seed",
                    "at": (at + Duration::from_secs(dt)).to_string(),
                });
                let ev = decoder
                    .decode(raw.to_string().as_bytes(), now)
                    .expect("seed event is valid");
                store.apply(&ev).await.unwrap();
            }
        }
    });
    // A bounded number at a time: on PostgreSQL each apply takes a connection of the store's
    // pool, and ten thousand waiting at once outwait its `wait_timeout` when other work loads
    // the same server.
    futures_util::stream::iter(grants)
        .buffer_unordered(256)
        .collect::<Vec<()>>()
        .await;
}

/// Publishes JSON messages to an exchange with confirms.
pub async fn publish_to(url: &str, exchange: &str, key: &str, bodies: &[serde_json::Value]) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    for b in bodies {
        ch.basic_publish(
            exchange.into(),
            key.into(),
            lapin::options::BasicPublishOptions::default(),
            &serde_json::to_vec(b).unwrap(),
            lapin::BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let _ = conn.close(200, "".into()).await;
}

/// Publishes one message with the given properties, with a confirm; panics when the broker
/// refuses it (a publish with a `user_id` that is not the connection's user closes the channel).
pub async fn publish_with(
    url: &str,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: lapin::BasicProperties,
) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        matches!(confirm, lapin::Confirmation::Ack(None)),
        "the broker took and routed the message: {confirm:?}"
    );
    let _ = conn.close(200, "".into()).await;
}

/// The consent flags the daemon's store holds for (number, purpose) under acme-de: read from
/// its state, so a test can wait until an event is applied.
pub async fn consent_flags(
    ledger: &sendwell::store::Ledger,
    to: &str,
    purpose: &str,
) -> Option<u8> {
    let key = sendwell::consent::store::number_account_key(to.trim_start_matches('+'), "acme-de");
    let v = ledger
        .kv_get(sendwell::store::Table::ConsentSummary, &key)
        .await
        .unwrap()?;
    sendwell::consent::store::decode_summary(&v)?
        .get(purpose)
        .map(|s| s.flags)
}

/// A sum of the samples of one metric (all label sets that start with `prefix`).
/// The admin listener's `/metrics` text at `admin` (`host:port`), or None while it does not
/// answer; for `wait_for` conditions.
pub async fn scrape(admin: impl std::fmt::Display) -> Option<String> {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// A test env with the webhook listener on (its secret files written) and the tests' price
/// table (marketing to Germany: 0.1131 EUR).
pub async fn env_with_webhook_and_prices(
    account_limits: String,
    consented: std::ops::Range<usize>,
) -> TestEnv {
    let opts = AppOptions {
        account_limits,
        extra_toml: webhook_toml(1 << 20),
        consented,
        ..AppOptions::default()
    };
    TestEnv::with_dir_files(
        &opts,
        &[("app-secret", APP_SECRET), ("verify-token", VERIFY_TOKEN)],
    )
    .await
}

pub fn metric_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The anchor GitHub gives a Markdown heading: lower case, spaces to hyphens, punctuation other
/// than `-` and `_` dropped.
pub fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c.to_lowercase().next().unwrap_or(c)),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown text's headings (`#` lines outside fenced code).
pub fn markdown_anchors(text: &str) -> std::collections::BTreeSet<String> {
    let mut fenced = false;
    let mut anchors = std::collections::BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            anchors.insert(github_anchor(line.trim_start_matches('#')));
        }
    }
    anchors
}

/// Most arrivals in any half-open 1-second window `[x, x + 1000 ms)`.
pub fn max_in_one_second(sorted_ms: &[u64]) -> usize {
    let mut best = 0;
    let mut j = 0;
    for i in 0..sorted_ms.len() {
        while sorted_ms[i] - sorted_ms[j] >= 1000 {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

/// Watches this runtime (the daemon's and the sandbox's) for stalls: the most a task woke up
/// late from a 5 ms sleep, in ms, until aborted. A call held up that long between the daemon's
/// door and the sandbox's clock arrives bunched with the ones after it.
pub fn watch_stalls() -> (
    Arc<std::sync::atomic::AtomicU64>,
    tokio::task::JoinHandle<()>,
) {
    let worst = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let w = worst.clone();
    let task = tokio::spawn(async move {
        const TICK: Duration = Duration::from_millis(5);
        loop {
            let t = std::time::Instant::now();
            tokio::time::sleep(TICK).await;
            let late = t.elapsed().saturating_sub(TICK).as_millis() as u64;
            w.fetch_max(late, std::sync::atomic::Ordering::Relaxed);
        }
    });
    (worst, task)
}
