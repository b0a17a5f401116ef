//! Configuration: one TOML file, `SENDWELL_<SECTION>__<KEY>` environment overrides, secrets
//! from files (or systemd credentials). Everything is parsed and validated before anything binds
//! or connects; a bad config is reported as `key: reason` and the daemon exits 64.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

pub mod limits;

use crate::job::Category;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/sendwell/sendwell.toml";

/// One problem with the configuration, named by its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub reason: String,
}

/// Every problem found, so an operator fixes them in one go instead of one per restart.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "config key `{}`: {}", p.key, p.reason)?;
        }
        Ok(())
    }
}

impl ConfigError {
    pub(crate) fn one(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            problems: vec![ConfigProblem {
                key: key.into(),
                reason: reason.into(),
            }],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file, as written by the operator.

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    broker: BrokerFile,
    #[serde(default)]
    state: StateFile,
    #[serde(default)]
    cloud_api: CloudApiFile,
    #[serde(default)]
    sandbox: SandboxFile,
    #[serde(default)]
    retry: RetryFile,
    #[serde(default)]
    shutdown: ShutdownFile,
    #[serde(default)]
    admin: AdminFile,
    #[serde(default)]
    log: LogFile,
    #[serde(default)]
    webhook: WebhookFile,
    #[serde(default)]
    prices: Option<crate::pricing::PricesFile>,
    #[serde(default)]
    consent: ConsentFile,
    #[serde(default)]
    purposes: Vec<PurposeFile>,
    #[serde(default)]
    accounts: Vec<AccountFile>,
    #[serde(default)]
    portfolios: Vec<PortfolioFile>,
    #[serde(default)]
    caps: Vec<CapFile>,
    #[serde(default)]
    limits: LimitsFile,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsFile {
    #[serde(with = "duration")]
    per_user_limit_block: Duration,
    #[serde(with = "duration")]
    recover_after: Duration,
    #[serde(with = "duration")]
    housekeeping_interval: Duration,
    #[serde(with = "duration")]
    arrival_jitter: Duration,
    country_zones: std::collections::BTreeMap<String, String>,
}

impl Default for LimitsFile {
    fn default() -> Self {
        Self {
            per_user_limit_block: Duration::from_secs(24 * 3600),
            recover_after: Duration::from_secs(10),
            housekeeping_interval: Duration::from_secs(60),
            arrival_jitter: Duration::from_millis(50),
            country_zones: Default::default(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PortfolioFile {
    name: String,
    #[serde(default)]
    messaging_limit: Option<TierFile>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
enum TierFile {
    Count(u64),
    Word(String),
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CapFile {
    category: String,
    #[serde(default = "default_cap_scope")]
    scope: String,
    rules: Vec<CapRuleFile>,
    #[serde(default)]
    on_exceed: Option<String>,
}

fn default_cap_scope() -> String {
    "account".into()
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CapRuleFile {
    max: u64,
    #[serde(with = "duration")]
    per: Duration,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PacingFile {
    #[serde(default = "default_pacing_interval", with = "duration")]
    interval: Duration,
    #[serde(default = "default_pacing_burst")]
    burst: u32,
}

impl Default for PacingFile {
    fn default() -> Self {
        Self {
            interval: default_pacing_interval(),
            burst: default_pacing_burst(),
        }
    }
}

fn default_pacing_interval() -> Duration {
    Duration::from_secs(6)
}

fn default_pacing_burst() -> u32 {
    1
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct QuietHoursFile {
    start: String,
    end: String,
    #[serde(default)]
    categories: Option<Vec<String>>,
    #[serde(default = "default_spread", with = "duration")]
    spread: Duration,
}

fn default_spread() -> Duration {
    Duration::from_secs(30 * 60)
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct ConsentFile {
    #[serde(with = "duration")]
    confirm_within: Duration,
    #[serde(with = "duration")]
    erase_tombstone_retention: Duration,
    #[serde(with = "duration")]
    future_tolerance: Duration,
}

impl Default for ConsentFile {
    fn default() -> Self {
        Self {
            confirm_within: Duration::from_secs(48 * 3600),
            erase_tombstone_retention: Duration::from_secs(30 * 86400),
            future_tolerance: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct AccountConsentFile {
    opt_out_keywords: Option<Vec<String>>,
    opt_in_keywords: Option<Vec<String>>,
    yes_keywords: Option<Vec<String>>,
    no_keywords: Option<Vec<String>>,
    opt_out_reply: Option<String>,
    start_purposes: Option<Vec<String>>,
    marketing_footer: Option<String>,
    opt_out_templates: Option<Vec<String>>,
    templates_without_opt_out: TemplatesWithoutOptOut,
    double_opt_in: Option<DoubleOptInFile>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct DoubleOptInFile {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    yes_title: Option<String>,
    #[serde(default)]
    no_title: Option<String>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    language: Option<String>,
}

/// What happens to a marketing template job whose template is not listed as carrying the
/// opt-out (`opt_out_templates`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplatesWithoutOptOut {
    /// Send it, with a warning in the log and `sendwell_templates_without_opt_out_total`.
    #[default]
    Warn,
    /// Suppress it (`suppressed`, reason `no_opt_out_in_template`).
    Refuse,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct BrokerFile {
    url: String,
    password_file: Option<PathBuf>,
    shard: u16,
    /// None: [`PREFETCH_PER_ACCOUNT`] per account.
    prefetch: Option<u16>,
    #[serde(with = "duration")]
    reconnect_max_delay: Duration,
}

impl Default for BrokerFile {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            password_file: None,
            shard: 0,
            prefetch: None,
            reconnect_max_delay: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct StateFile {
    dir: PathBuf,
    #[serde(with = "duration")]
    ledger_retention: Duration,
    #[serde(with = "duration")]
    unwritable_grace: Duration,
    backend: StateBackend,
    #[serde(skip_serializing_if = "Option::is_none")]
    postgres: Option<PostgresFile>,
}

impl Default for StateFile {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/sendwell"),
            ledger_retention: Duration::from_secs(7 * 24 * 3600),
            unwritable_grace: Duration::from_secs(300),
            backend: StateBackend::Redb,
            postgres: None,
        }
    }
}

/// Where the state lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    /// The embedded store in `state.dir` (one per shard).
    #[default]
    Redb,
    /// A PostgreSQL database (`[state.postgres]`).
    Postgres,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct PostgresFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password_file: Option<PathBuf>,
    pool_size: usize,
    #[serde(with = "duration")]
    connect_timeout: Duration,
    #[serde(with = "duration")]
    statement_timeout: Duration,
    #[serde(with = "duration")]
    follow_every: Duration,
    /// Unset: `off` when every host is loopback or a unix socket, else `verify-full`.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<PgTls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
}

impl Default for PostgresFile {
    fn default() -> Self {
        Self {
            url: None,
            password_file: None,
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            follow_every: Duration::from_millis(250),
            tls: None,
            ca_file: None,
        }
    }
}

/// How the store's connections to PostgreSQL are protected (`state.postgres.tls`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PgTls {
    /// Plain TCP (or a unix socket): the default for loopback and unix-socket hosts only.
    Off,
    /// Encrypted, or no connection; the server's certificate is not checked (as libpq's
    /// `sslmode=require`): safe from eavesdroppers, not from an impostor on the path.
    Require,
    /// Encrypted, the certificate chain checked against the system's roots (or `ca_file`'s)
    /// and its name against the URL's host (as libpq's `sslmode=verify-full`): the default for
    /// every other host.
    VerifyFull,
}

impl PgTls {
    /// What an unset `tls` means for `url`'s hosts: `off` only when every one of them is a unix
    /// socket, `localhost` or a loopback address (and every `hostaddr` is loopback): only there
    /// does nothing cross a network.
    pub fn default_for(url: &tokio_postgres::Config) -> PgTls {
        use tokio_postgres::config::Host;
        let local = |h: &Host| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name.eq_ignore_ascii_case("localhost")
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        };
        if url.get_hosts().iter().all(local) && url.get_hostaddrs().iter().all(|a| a.is_loopback())
        {
            PgTls::Off
        } else {
            PgTls::VerifyFull
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct CloudApiFile {
    base_url: String,
    version: String,
    #[serde(with = "duration")]
    request_timeout: Duration,
    #[serde(with = "duration")]
    connect_timeout: Duration,
}

impl Default for CloudApiFile {
    fn default() -> Self {
        Self {
            base_url: "https://graph.facebook.com".into(),
            version: "v21.0".into(),
            request_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct SandboxFile {
    enabled: bool,
    listen: SocketAddr,
    #[serde(with = "duration")]
    latency: Duration,
}

impl Default for SandboxFile {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8089)),
            latency: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RetryFile {
    max_attempts: u32,
    #[serde(with = "duration")]
    base_delay: Duration,
    #[serde(with = "duration")]
    max_delay: Duration,
    #[serde(with = "duration")]
    inline_max_delay: Duration,
    #[serde(with = "duration")]
    account_pause_probe: Duration,
    resend_ambiguous: BTreeMap<String, bool>,
}

impl Default for RetryFile {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(15 * 60),
            inline_max_delay: Duration::from_secs(2),
            account_pause_probe: Duration::from_secs(30),
            resend_ambiguous: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct ShutdownFile {
    #[serde(with = "duration")]
    grace_period: Duration,
}

impl Default for ShutdownFile {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct AdminFile {
    listen: SocketAddr,
    token_file: Option<PathBuf>,
}

impl Default for AdminFile {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9187)),
            token_file: None,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct LogFile {
    format: LogFormat,
    mask_numbers: bool,
    filter: String,
}

impl Default for LogFile {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            mask_numbers: true,
            filter: "info".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct WebhookFile {
    enabled: bool,
    listen: SocketAddr,
    app_secret_file: Option<PathBuf>,
    verify_token_file: Option<PathBuf>,
    max_body_bytes: usize,
    #[serde(with = "duration")]
    template_pause_max_wait: Duration,
    #[serde(with = "duration")]
    service_window: Duration,
    #[serde(with = "duration")]
    broker_connect_timeout: Duration,
    #[serde(with = "duration")]
    request_timeout: Duration,
    /// Which delivery updates become outcome events (the metrics count every one).
    delivery_events: Vec<DeliveryEventKind>,
}

/// A delivery update that can become an outcome event (`delivery.<kind>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryEventKind {
    Delivered,
    Read,
    Undelivered,
}

impl Default for WebhookFile {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8088)),
            app_secret_file: None,
            verify_token_file: None,
            // Meta documents webhook payloads of up to 3 MB.
            max_body_bytes: 3 * 1024 * 1024,
            template_pause_max_wait: Duration::from_secs(6 * 3600),
            service_window: Duration::from_secs(24 * 3600),
            broker_connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            delivery_events: vec![
                DeliveryEventKind::Delivered,
                DeliveryEventKind::Read,
                DeliveryEventKind::Undelivered,
            ],
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PurposeFile {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    categories: Option<Vec<String>>,
    #[serde(default)]
    double_opt_in: Option<bool>,
    #[serde(default, with = "duration")]
    expire_after: Option<Duration>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AccountFile {
    name: String,
    phone_number_id: String,
    token_file: PathBuf,
    #[serde(default = "default_mps")]
    messages_per_second: u32,
    #[serde(default)]
    waba_id: Option<String>,
    #[serde(default)]
    consent: AccountConsentFile,
    #[serde(default)]
    burst: Option<u32>,
    #[serde(default)]
    portfolio: Option<String>,
    #[serde(default)]
    brand: Option<String>,
    #[serde(default)]
    pacing: PacingFile,
    #[serde(default)]
    quiet_hours: Option<QuietHoursFile>,
    #[serde(default)]
    daily_budget: Option<String>,
    #[serde(default)]
    budget_categories: Option<Vec<String>>,
}

fn default_mps() -> u32 {
    80
}

// ---------------------------------------------------------------------------------------------
// The validated config the daemon runs on.

/// A secret that never prints.
#[derive(Clone)]
pub struct Secret(Arc<SecretString>);

impl Secret {
    pub fn new(s: String) -> Self {
        Self(Arc::new(SecretString::from(s)))
    }
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub broker: BrokerConfig,
    pub state: StateConfig,
    pub cloud_api: CloudApiConfig,
    pub sandbox: SandboxConfigSection,
    pub retry: RetryConfig,
    pub shutdown: ShutdownConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub purposes: Vec<Purpose>,
    pub accounts: Vec<Account>,
    pub consent: ConsentConfig,
    pub webhook: WebhookConfig,
    pub prices: Arc<crate::pricing::PriceTable>,
    pub limits: LimitsConfig,
}

/// What [`crate::pipeline::limits`] enforces beyond each account's own settings.
#[derive(Clone, Debug)]
pub struct LimitsConfig {
    /// Portfolios (name, daily unique-recipient tier; [`limits::UNLIMITED`] for none). Accounts
    /// refer to them by index.
    pub portfolios: Vec<(Arc<str>, u32)>,
    pub caps: Vec<limits::CapConfig>,
    /// After Meta's 131049 (per-user marketing limit): no marketing to that number for this long.
    pub per_user_limit_block: Duration,
    /// After a 130429, quiet time before the account's rate steps back up by a tenth.
    pub recover_after: Duration,
    /// How often idle limiter state is dropped and stale rows purged.
    pub housekeeping_interval: Duration,
    /// Transit-time variation between our gate and Meta's door that the burst must absorb.
    pub arrival_jitter: Duration,
    /// Country (ISO 3166) → the one zone its quiet hours follow (instead of all its zones).
    pub country_zones: Vec<(String, String)>,
}

#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Run the webhook listener (needs `app_secret_file` and `verify_token_file`).
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Key of `X-Hub-Signature-256`; None only when the listener is off.
    pub app_secret: Option<Secret>,
    /// Answer to Meta's `hub.verify_token` handshake.
    pub verify_token: Option<Secret>,
    /// Where the two secrets came from (resolved), so `check-config` can name the files.
    pub app_secret_file: Option<PathBuf>,
    pub verify_token_file: Option<PathBuf>,
    pub max_body_bytes: usize,
    /// How long jobs wait for a paused template before they fail `template_paused`.
    pub template_pause_max_wait: Duration,
    /// WhatsApp's customer-service window: free-form messages only this long after the
    /// customer last wrote.
    pub service_window: Duration,
    /// The most one attempt to connect to the broker may take (an abandoned one is closed).
    pub broker_connect_timeout: Duration,
    /// The most a callback waits to be stored in the broker before it is answered 503.
    pub request_timeout: Duration,
    /// Which delivery updates are published as outcome events (`read` receipts are noise to
    /// many upstreams, and each is a broker message); the delivery level is kept and the
    /// metrics count every update either way.
    pub delivery_events: Vec<DeliveryEventKind>,
}

/// Jobs in flight per configured account when `broker.prefetch` is not set. Throughput comes
/// from concurrency (Little's law: in flight = rate × API latency): an account at the Cloud
/// API's 1,000 msgs/s with answers in up to a second needs 1,000 in flight, so the API's
/// latency never sets the throughput.
pub const PREFETCH_PER_ACCOUNT: u16 = 1000;

fn default_prefetch(accounts: usize) -> u16 {
    (accounts.max(1) * usize::from(PREFETCH_PER_ACCOUNT)).min(usize::from(u16::MAX)) as u16
}

#[derive(Clone)]
pub struct BrokerConfig {
    /// Full AMQP URI including the password; never printed (see `redacted_url`).
    pub url: Secret,
    pub redacted_url: String,
    /// Where the password in `url` came from (resolved), so `check-config` can name the file.
    pub password_file: Option<PathBuf>,
    pub shard: u16,
    pub prefetch: u16,
    pub reconnect_max_delay: Duration,
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("url", &self.redacted_url)
            .field("password_file", &self.password_file)
            .field("shard", &self.shard)
            .field("prefetch", &self.prefetch)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct StateConfig {
    pub dir: PathBuf,
    pub ledger_retention: Duration,
    /// How long the daemon waits for a state store that cannot be written (full disk), holding
    /// its jobs, before it gives up: the watchdog is no longer fed and it exits (74).
    pub unwritable_grace: Duration,
    pub backend: StateBackend,
    /// Always `Some` when `backend` is [`StateBackend::Postgres`]; `None` with redb (a
    /// `[state.postgres]` table is then ignored).
    pub postgres: Option<PostgresConfig>,
}

/// `[state.postgres]`, checked: the URL carries no password (that comes from `password_file`).
#[derive(Clone, Debug)]
pub struct PostgresConfig {
    /// `postgres://user@host[:port]/database[?options]`, without a password, so it may be logged.
    pub url: String,
    /// From `password_file`; `None`: the server needs none (e.g. `trust`, or a `.pgpass`).
    pub password: Option<Secret>,
    /// Where `password` came from (resolved), so `check-config` can name the file.
    pub password_file: Option<PathBuf>,
    /// Most connections the pool of readers and tools opens.
    pub pool_size: usize,
    pub connect_timeout: Duration,
    /// Set per connection (`SET statement_timeout`): a statement that hangs ends as an error.
    pub statement_timeout: Duration,
    /// How often the consent follower polls the database for what other instances changed
    /// (`store::postgres::follow`): how soon a STOP applied by one is in every cache.
    pub follow_every: Duration,
    /// Resolved: an unset `tls` is [`PgTls::default_for`] the URL.
    pub tls: PgTls,
    /// The roots `verify-full` trusts instead of the system's (resolved path; checked at load to
    /// hold PEM certificates).
    pub ca_file: Option<PathBuf>,
}

impl PostgresConfig {
    /// Whether the state (phone numbers among it) crosses a network unencrypted: `tls = "off"`
    /// chosen for a host that is not loopback or a unix socket.
    pub fn in_clear_over_network(&self) -> bool {
        self.tls == PgTls::Off
            && self
                .url
                .parse::<tokio_postgres::Config>()
                .is_ok_and(|c| PgTls::default_for(&c) != PgTls::Off)
    }
}

#[derive(Clone, Debug)]
pub struct CloudApiConfig {
    pub base_url: String,
    pub version: String,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct SandboxConfigSection {
    /// Start the built-in Cloud API stand-in inside the daemon and send to it instead of Meta.
    pub enabled: bool,
    pub listen: SocketAddr,
    pub latency: Duration,
}

#[derive(Clone, Debug)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Waits up to this long happen in-process; longer ones go through a delay queue so that no
    /// prefetch slot is held for minutes.
    pub inline_max_delay: Duration,
    /// How often a paused account lets one job through to see whether the problem is fixed.
    pub account_pause_probe: Duration,
    /// Per category: may a send whose result is unknown (timeout, crash mid-call) be sent again?
    pub resend_ambiguous: [bool; 4],
}

impl RetryConfig {
    pub fn resend_ambiguous(&self, c: Category) -> bool {
        self.resend_ambiguous[c as usize]
    }
}

#[derive(Clone, Debug)]
pub struct ShutdownConfig {
    pub grace_period: Duration,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The bearer token the consent endpoints ask for.
    pub token: AdminToken,
    /// `admin.token_file` as resolved (None: generated, see [`AdminToken::Generated`]).
    pub token_file: Option<PathBuf>,
}

/// The generated admin token's file in `state.dir`.
pub const GENERATED_ADMIN_TOKEN: &str = "admin-token";

/// A configured admin token shorter than this is refused: it guards every number's consent
/// evidence.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// Where the consent endpoints' bearer token comes from.
#[derive(Clone, Debug)]
pub enum AdminToken {
    /// `admin.token_file`, read at start by the daemon and by the tools alike.
    File(Secret),
    /// `admin.token_file` unset: the daemon writes a new random token to this file in
    /// `state.dir` (mode 0600) at each start, and the tools, run as the same user (or root),
    /// read it there.
    Generated(PathBuf),
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub format: LogFormat,
    pub mask_numbers: bool,
    pub filter: String,
}

#[derive(Clone, Debug)]
pub struct Purpose {
    pub name: String,
    pub description: Option<String>,
    /// Which job categories may rely on consent for this purpose (marketing and utility).
    pub categories: Vec<Category>,
    /// None: the CONTRACT §4 default (marketing needs a confirmed double opt-in, utility an
    /// opt-in); Some: this purpose's own rule for both.
    pub double_opt_in: Option<bool>,
    /// Consent older than this (since the last opt-in or confirmation) no longer counts.
    pub expire_after: Option<Duration>,
}

impl Purpose {
    pub fn needs_confirmation(&self, c: Category) -> bool {
        self.double_opt_in.unwrap_or(c == Category::Marketing)
    }
}

#[derive(Clone, Debug)]
pub struct ConsentConfig {
    /// How long a double opt-in question waits for its YES.
    pub confirm_within: Duration,
    /// How long an erased number's keyed hash is kept so late older events stay void.
    pub erase_tombstone_retention: Duration,
    /// Events dated further in the future than this are refused (a skewed clock upstream must
    /// not create consent that outranks tomorrow's STOP).
    pub future_tolerance: Duration,
}

/// An account's consent handling: keywords, replies, the double opt-in question, the footer.
#[derive(Clone, Debug)]
pub struct AccountConsent {
    pub opt_out_keywords: Vec<String>,
    pub opt_in_keywords: Vec<String>,
    pub yes_keywords: Vec<String>,
    pub no_keywords: Vec<String>,
    /// Sent (free-form, the customer just wrote) after a STOP keyword.
    pub opt_out_reply: Option<String>,
    /// Purposes a START keyword opts in to; None: those the number had opted in to before.
    pub start_purposes: Option<Vec<String>>,
    /// Appended to marketing text messages: the way out, in every message.
    pub marketing_footer: Option<String>,
    /// Approved templates that carry the opt-out (a STOP line or Meta's opt-out button).
    pub opt_out_templates: Option<Vec<String>>,
    pub templates_without_opt_out: TemplatesWithoutOptOut,
    pub double_opt_in: Option<DoubleOptInMessage>,
}

/// The "are you sure?" message sendwell sends after an opt-in that needs confirmation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DoubleOptInMessage {
    /// An interactive message with two reply buttons (needs an open customer-service window:
    /// fits opt-ins captured in a WhatsApp chat).
    Interactive {
        text: String,
        yes_title: String,
        no_title: String,
    },
    /// An approved template whose first two quick-reply buttons are YES and NO.
    Template { name: String, language: String },
}

#[derive(Clone, Debug)]
pub struct Account {
    pub name: Arc<str>,
    pub phone_number_id: String,
    /// Where the token came from, so a paused account can re-read it after rotation.
    pub token_path: PathBuf,
    pub token: Secret,
    pub messages_per_second: u32,
    /// The WhatsApp Business Account, so template and account webhooks find their accounts.
    pub waba_id: Option<String>,
    pub consent: AccountConsent,
    /// Calls that may pass the throughput gate at once (GCRA burst).
    pub burst: u32,
    /// Index into `LimitsConfig::portfolios`: whose daily tier this number's sends count toward
    /// (default: `waba-<waba_id>`, shared by the WABA's numbers, else the account's name).
    pub portfolio: usize,
    /// Frequency caps with `scope = "brand"` count across the accounts of one brand.
    pub brand: Arc<str>,
    /// Meta's pair rate: one message per `interval` to one number (0 = off), with a burst.
    pub pacing_interval: Duration,
    pub pacing_burst: u32,
    pub quiet_hours: Option<crate::pipeline::limits::quiet::QuietHours>,
    /// Estimated spend allowed over a rolling 24 hours, in the price table's currency.
    pub daily_budget: Option<crate::pricing::Micros>,
    /// What the budget holds back once spent (default: marketing).
    pub budget_categories: Vec<Category>,
}

impl Config {
    /// Loads `path` (or the default path) with environment overrides from the process
    /// environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, Env::prefixed("SENDWELL_"))
    }

    fn load_with_env(path: &Path, env: Env) -> Result<Config, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::one(
                "--config",
                format!("file {} does not exist", path.display()),
            ));
        }
        // Only variables with a section separator are config keys; SENDWELL_CONFIG and the like
        // belong to the command line.
        let env = env.filter(|k| k.as_str().contains("__")).split("__");
        let file: FileConfig = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(env)
            .extract()
            .map_err(figment_problems)?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        validate(file, &base)
    }

    /// Only the broker's URL (password file and `SENDWELL_BROKER__*` applied), for the tools
    /// that need nothing else (`publish`, `tail`): the rest of the file, its secret files
    /// included, need not be readable by whoever runs them.
    pub fn load_broker_url(path: &Path) -> Result<Secret, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::one(
                "--config",
                format!("file {} does not exist", path.display()),
            ));
        }
        let env = Env::prefixed("SENDWELL_")
            .filter(|k| k.as_str().contains("__"))
            .split("__");
        let broker: BrokerFile = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(env)
            .focus("broker")
            .extract()
            .map_err(figment_problems)?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut problems = Vec::new();
        let (url, _, _) = broker_url(&broker, &base, &mut |key: &str, reason: String| {
            problems.push(ConfigProblem {
                key: key.into(),
                reason,
            })
        });
        if problems.is_empty() {
            Ok(Secret::new(url))
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The config as `check-config` prints it: a config file with every value in effect
    /// (defaults filled in, environment overrides applied, durations as the file writes them),
    /// which loads back to the same config. Secrets stay in their files, named by resolved path;
    /// a password written in `broker.url` is printed as [`REDACTED_PASSWORD`], which loading
    /// refuses until the password is put back.
    pub fn effective_toml(&self) -> String {
        let body = toml::to_string_pretty(&self.to_file())
            // Unreachable: every field is a string, number, bool, list or table TOML can hold.
            .unwrap_or_else(|e| format!("# cannot print the configuration as TOML: {e}\n"));
        format!("{EFFECTIVE_HEADER}{body}")
    }

    pub fn account(&self, name: &str) -> Option<&Account> {
        self.accounts.iter().find(|a| &*a.name == name)
    }
}

/// Printed by `check-config` instead of a password written in `broker.url`; loading refuses it,
/// so a saved printout cannot connect with a wrong password unnoticed.
pub const REDACTED_PASSWORD: &str = "***";

const EFFECTIVE_HEADER: &str = "\
# The effective sendwell configuration (sendwell check-config): every key with the value in
# effect, defaults filled in and SENDWELL_* overrides applied. Secrets are not in it: they stay
# in the files named here; a password written in broker.url shows as *** (put it back, or better
# into broker.password_file, before using this file).

";

/// Durations as the config file writes them: one whole number and the largest unit that divides
/// it exactly (`7d`, `48h` → `2d`, `500ms`, `90m`), which humantime, the parser, reads back to
/// the same value. Deserializing is humantime's.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn format(d: Duration) -> String {
        const UNITS: [(&str, u128); 6] = [
            ("d", 86_400_000_000_000),
            ("h", 3_600_000_000_000),
            ("m", 60_000_000_000),
            ("s", 1_000_000_000),
            ("ms", 1_000_000),
            ("us", 1_000),
        ];
        let ns = d.as_nanos();
        if ns == 0 {
            return "0s".into();
        }
        match UNITS.iter().find(|(_, n)| ns % n == 0) {
            Some((unit, n)) => format!("{}{unit}", ns / n),
            None => format!("{ns}ns"),
        }
    }

    /// `Duration` and `Option<Duration>` fields alike.
    pub trait AsText {
        fn text(&self) -> Option<String>;
    }

    impl AsText for Duration {
        fn text(&self) -> Option<String> {
            Some(format(*self))
        }
    }

    impl AsText for Option<Duration> {
        fn text(&self) -> Option<String> {
            self.map(format)
        }
    }

    pub fn serialize<T: AsText, S: Serializer>(d: &T, s: S) -> Result<S::Ok, S::Error> {
        match d.text() {
            Some(t) => s.serialize_str(&t),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        humantime_serde::Serde<T>: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        humantime_serde::deserialize(d)
    }
}

fn category_names(cs: &[Category]) -> Vec<String> {
    cs.iter().map(|c| c.as_str().to_string()).collect()
}

/// `21:00` (or `21:00:30` when the seconds matter), as quiet hours are written.
fn time_of_day(t: jiff::civil::Time) -> String {
    if t.second() == 0 && t.subsec_nanosecond() == 0 {
        format!("{:02}:{:02}", t.hour(), t.minute())
    } else {
        t.to_string()
    }
}

impl Config {
    /// The inverse of [`validate`]: the file that loads to this config.
    fn to_file(&self) -> FileConfig {
        let url = match reqwest::Url::parse(self.broker.url.expose()) {
            Ok(mut u) => {
                // The file replaces the URL's password; without one, a password is a secret
                // written in the URL.
                let shown = match &self.broker.password_file {
                    Some(_) => None,
                    None => u.password().map(|_| REDACTED_PASSWORD),
                };
                let _ = u.set_password(shown);
                u.to_string()
            }
            // Validated as a URL at load; never print the secret whatever happens.
            Err(_) => self.broker.redacted_url.clone(),
        };
        let resend_ambiguous = Category::ALL
            .iter()
            .map(|c| (c.as_str().to_string(), self.retry.resend_ambiguous(*c)))
            .collect();
        let accounts = self
            .accounts
            .iter()
            .map(|a| AccountFile {
                name: a.name.to_string(),
                phone_number_id: a.phone_number_id.clone(),
                token_file: a.token_path.clone(),
                messages_per_second: a.messages_per_second,
                waba_id: a.waba_id.clone(),
                consent: account_consent_file(&a.consent),
                burst: Some(a.burst),
                portfolio: self
                    .limits
                    .portfolios
                    .get(a.portfolio)
                    .map(|(name, _)| name.to_string()),
                brand: Some(a.brand.to_string()),
                pacing: PacingFile {
                    interval: a.pacing_interval,
                    burst: a.pacing_burst,
                },
                quiet_hours: a.quiet_hours.as_ref().map(|q| QuietHoursFile {
                    start: time_of_day(q.start),
                    end: time_of_day(q.end),
                    categories: Some(category_names(&q.categories)),
                    spread: q.spread,
                }),
                daily_budget: a.daily_budget.map(|m| m.to_decimal_string()),
                budget_categories: Some(category_names(&a.budget_categories)),
            })
            .collect();
        FileConfig {
            broker: BrokerFile {
                url,
                password_file: self.broker.password_file.clone(),
                shard: self.broker.shard,
                prefetch: Some(self.broker.prefetch),
                reconnect_max_delay: self.broker.reconnect_max_delay,
            },
            state: StateFile {
                dir: self.state.dir.clone(),
                ledger_retention: self.state.ledger_retention,
                unwritable_grace: self.state.unwritable_grace,
                backend: self.state.backend,
                postgres: self.state.postgres.as_ref().map(|p| PostgresFile {
                    url: Some(p.url.clone()),
                    password_file: p.password_file.clone(),
                    pool_size: p.pool_size,
                    connect_timeout: p.connect_timeout,
                    statement_timeout: p.statement_timeout,
                    follow_every: p.follow_every,
                    tls: Some(p.tls),
                    ca_file: p.ca_file.clone(),
                }),
            },
            cloud_api: CloudApiFile {
                base_url: self.cloud_api.base_url.clone(),
                version: self.cloud_api.version.clone(),
                request_timeout: self.cloud_api.request_timeout,
                connect_timeout: self.cloud_api.connect_timeout,
            },
            sandbox: SandboxFile {
                enabled: self.sandbox.enabled,
                listen: self.sandbox.listen,
                latency: self.sandbox.latency,
            },
            retry: RetryFile {
                max_attempts: self.retry.max_attempts,
                base_delay: self.retry.base_delay,
                max_delay: self.retry.max_delay,
                inline_max_delay: self.retry.inline_max_delay,
                account_pause_probe: self.retry.account_pause_probe,
                resend_ambiguous,
            },
            shutdown: ShutdownFile {
                grace_period: self.shutdown.grace_period,
            },
            admin: AdminFile {
                listen: self.admin.listen,
                token_file: self.admin.token_file.clone(),
            },
            log: LogFile {
                format: self.log.format,
                mask_numbers: self.log.mask_numbers,
                filter: self.log.filter.clone(),
            },
            webhook: WebhookFile {
                enabled: self.webhook.enabled,
                listen: self.webhook.listen,
                app_secret_file: self.webhook.app_secret_file.clone(),
                verify_token_file: self.webhook.verify_token_file.clone(),
                max_body_bytes: self.webhook.max_body_bytes,
                template_pause_max_wait: self.webhook.template_pause_max_wait,
                service_window: self.webhook.service_window,
                broker_connect_timeout: self.webhook.broker_connect_timeout,
                request_timeout: self.webhook.request_timeout,
                delivery_events: self.webhook.delivery_events.clone(),
            },
            prices: Some(self.prices.to_file()),
            consent: ConsentFile {
                confirm_within: self.consent.confirm_within,
                erase_tombstone_retention: self.consent.erase_tombstone_retention,
                future_tolerance: self.consent.future_tolerance,
            },
            purposes: self
                .purposes
                .iter()
                .map(|p| PurposeFile {
                    name: p.name.clone(),
                    description: p.description.clone(),
                    categories: Some(category_names(&p.categories)),
                    double_opt_in: p.double_opt_in,
                    expire_after: p.expire_after,
                })
                .collect(),
            accounts,
            // Every portfolio, the implicit ones (an account's own, a WABA's) included, so the
            // accounts' `portfolio` names resolve to the same tiers in the same order.
            portfolios: self
                .limits
                .portfolios
                .iter()
                .map(|(name, limit)| PortfolioFile {
                    name: name.to_string(),
                    messaging_limit: Some(if *limit == limits::UNLIMITED {
                        TierFile::Word("unlimited".into())
                    } else {
                        TierFile::Count(u64::from(*limit))
                    }),
                })
                .collect(),
            caps: self
                .limits
                .caps
                .iter()
                .map(|c| CapFile {
                    category: c.category.as_str().to_string(),
                    scope: match c.scope {
                        limits::CapScope::Account => "account",
                        limits::CapScope::Brand => "brand",
                    }
                    .into(),
                    rules: c
                        .rules
                        .iter()
                        .map(|r| CapRuleFile {
                            max: u64::from(r.max),
                            per: Duration::from_secs(u64::from(r.per_secs)),
                        })
                        .collect(),
                    on_exceed: Some(
                        match c.on_exceed {
                            limits::OnExceed::Suppress => "suppress",
                            limits::OnExceed::Defer => "defer",
                        }
                        .into(),
                    ),
                })
                .collect(),
            limits: LimitsFile {
                per_user_limit_block: self.limits.per_user_limit_block,
                recover_after: self.limits.recover_after,
                housekeeping_interval: self.limits.housekeeping_interval,
                arrival_jitter: self.limits.arrival_jitter,
                country_zones: self.limits.country_zones.iter().cloned().collect(),
            },
        }
    }
}

fn account_consent_file(c: &AccountConsent) -> AccountConsentFile {
    AccountConsentFile {
        opt_out_keywords: Some(c.opt_out_keywords.clone()),
        opt_in_keywords: Some(c.opt_in_keywords.clone()),
        yes_keywords: Some(c.yes_keywords.clone()),
        no_keywords: Some(c.no_keywords.clone()),
        opt_out_reply: c.opt_out_reply.clone(),
        start_purposes: c.start_purposes.clone(),
        marketing_footer: c.marketing_footer.clone(),
        opt_out_templates: c.opt_out_templates.clone(),
        templates_without_opt_out: c.templates_without_opt_out,
        double_opt_in: c.double_opt_in.as_ref().map(|d| match d {
            DoubleOptInMessage::Interactive {
                text,
                yes_title,
                no_title,
            } => DoubleOptInFile {
                text: Some(text.clone()),
                yes_title: Some(yes_title.clone()),
                no_title: Some(no_title.clone()),
                template: None,
                language: None,
            },
            DoubleOptInMessage::Template { name, language } => DoubleOptInFile {
                text: None,
                yes_title: None,
                no_title: None,
                template: Some(name.clone()),
                language: Some(language.clone()),
            },
        }),
    }
}

fn figment_problems(err: figment::Error) -> ConfigError {
    let problems = err
        .into_iter()
        .map(|e| {
            // `accounts[0].name`, as validation names keys (figment says `accounts.0.name`).
            let mut key = String::new();
            for seg in &e.path {
                if seg.parse::<usize>().is_ok() {
                    key.push_str(&format!("[{seg}]"));
                } else {
                    if !key.is_empty() {
                        key.push('.');
                    }
                    key.push_str(seg);
                }
            }
            if let figment::error::Kind::UnknownField(field, _) = &e.kind
                && e.path.last().is_none_or(|l| l != field)
            {
                key = if key.is_empty() {
                    field.clone()
                } else {
                    format!("{key}.{field}")
                };
            }
            if key.is_empty() {
                key = "(file)".into();
            }
            ConfigProblem {
                key,
                reason: e.kind.to_string(),
            }
        })
        .collect();
    ConfigError { problems }
}

/// Finds a secret file: an absolute path as given; a bare name in `$CREDENTIALS_DIRECTORY` when
/// systemd provides one and the file is there; otherwise relative to the config file.
pub fn resolve_secret_path(p: &Path, base: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let candidate = Path::new(&dir).join(p);
        if candidate.exists() {
            return candidate;
        }
    }
    base.join(p)
}

/// Reads a secret file; trailing newlines are not part of the secret.
pub fn read_secret(path: &Path) -> Result<Secret, String> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let s = s.trim_end_matches(['\n', '\r']).to_string();
            if s.is_empty() {
                Err(format!("secret file {} is empty", path.display()))
            } else {
                Ok(Secret::new(s))
            }
        }
        Err(e) => Err(format!("cannot read secret file {}: {e}", path.display())),
    }
}

/// The broker section's URL, with the password from `password_file` put in: (the URL, the URL
/// as logs may show it, the resolved password file). Shared by [`validate`] and
/// [`Config::load_broker_url`]. Problems never quote the URL: it may hold the password.
fn broker_url(
    b: &BrokerFile,
    base: &Path,
    problem: &mut impl FnMut(&str, String),
) -> (String, String, Option<PathBuf>) {
    let mut url = b.url.clone();
    let parsed = reqwest::Url::parse(&url);
    let mut redacted_url = String::new();
    let password_file = b
        .password_file
        .as_ref()
        .map(|pf| resolve_secret_path(pf, base));
    match parsed {
        // Without `//` (`amqp:/user:pw@host`) there is no authority: the password would be
        // part of the path, invisible to the redaction and sent as a vhost name.
        Ok(u) if (u.scheme() == "amqp" || u.scheme() == "amqps") && !u.has_host() => problem(
            "broker.url",
            "must be amqp://[user[:password]@]host[:port][/vhost] (or amqps://)".into(),
        ),
        Ok(mut u) if u.scheme() == "amqp" || u.scheme() == "amqps" => {
            // The password as the broker gets it: percent-decoded (`%2A%2A%2A` is `***`).
            let password = u.password().map(|p| {
                percent_encoding::percent_decode_str(p)
                    .decode_utf8_lossy()
                    .into_owned()
            });
            if password_file.is_none() && password.as_deref() == Some(REDACTED_PASSWORD) {
                problem(
                    "broker.url",
                    format!(
                        "the password is `{REDACTED_PASSWORD}`, which check-config prints instead \
                         of a password: put the password in broker.password_file (or back in the \
                         URL)"
                    ),
                );
            }
            if let Some(pf) = &password_file {
                match read_secret(pf) {
                    Ok(pw) => {
                        if u.set_password(Some(pw.expose())).is_err() {
                            problem("broker.url", "cannot carry a password".into());
                        }
                        url = u.to_string();
                    }
                    Err(e) => problem("broker.password_file", e),
                }
            }
            let mut r = u.clone();
            if r.password().is_some() {
                let _ = r.set_password(Some("***"));
            }
            redacted_url = r.to_string();
        }
        Ok(u) => problem(
            "broker.url",
            format!("scheme must be amqp or amqps, not {}", u.scheme()),
        ),
        Err(e) => problem("broker.url", format!("not a URL: {e}")),
    }
    (url, redacted_url, password_file)
}

/// `[state.postgres]` checked, and resolved when `state.backend = "postgres"` (`None` otherwise).
/// With redb the table is ignored, but what the file alone says is still checked (the URL, the
/// bounds), so a switch of backend meets no surprise; its password file is not read. Problems
/// never quote the URL.
fn state_postgres(
    s: &StateFile,
    base: &Path,
    problem: &mut impl FnMut(&str, String),
) -> Option<PostgresConfig> {
    let used = s.backend == StateBackend::Postgres;
    let Some(p) = &s.postgres else {
        if used {
            problem(
                "state.postgres.url",
                "is needed when state.backend = \"postgres\"".into(),
            );
        }
        return None;
    };
    let mut ok = true;
    let mut bad = |key: &str, reason: String| {
        ok = false;
        problem(key, reason);
    };
    match &p.url {
        None if used => bad(
            "state.postgres.url",
            "is needed when state.backend = \"postgres\"".into(),
        ),
        None => {}
        Some(url) => {
            if let Some(reason) = postgres_url_problem(url) {
                bad("state.postgres.url", reason);
            }
        }
    }
    if !(1..=64).contains(&p.pool_size) {
        bad(
            "state.postgres.pool_size",
            "must be between 1 and 64".into(),
        );
    }
    if p.connect_timeout < Duration::from_millis(100)
        || p.connect_timeout > Duration::from_secs(300)
    {
        bad(
            "state.postgres.connect_timeout",
            "must be between 100ms and 5m".into(),
        );
    }
    // 0 would be PostgreSQL's "no limit": a hung statement would hold jobs forever.
    if p.statement_timeout < Duration::from_millis(100)
        || p.statement_timeout > Duration::from_secs(3600)
    {
        bad(
            "state.postgres.statement_timeout",
            "must be between 100ms and 1h".into(),
        );
    }
    // Each poll is a few statements: below 10 ms they would be most of the database's work;
    // above a minute a standby's consent would be a minute old at a takeover.
    if p.follow_every < Duration::from_millis(10) || p.follow_every > Duration::from_secs(60) {
        bad(
            "state.postgres.follow_every",
            "must be between 10ms and 1m".into(),
        );
    }
    let ca_file_usable = p.ca_file.is_none() || p.tls == Some(PgTls::VerifyFull);
    if !ca_file_usable {
        bad(
            "state.postgres.ca_file",
            "is used only with tls = \"verify-full\": set that too, or remove ca_file".into(),
        );
    }
    if !used {
        return None;
    }
    let ca_file = p.ca_file.as_ref().map(|f| resolve_secret_path(f, base));
    if let Some(f) = &ca_file
        && ca_file_usable
        && let Err(e) = read_ca_file(f)
    {
        bad("state.postgres.ca_file", e);
    }
    let password_file = p
        .password_file
        .as_ref()
        .map(|pf| resolve_secret_path(pf, base));
    let password = match &password_file {
        None => None,
        Some(pf) => match read_secret(pf) {
            Ok(pw) => Some(pw),
            Err(e) => {
                bad("state.postgres.password_file", e);
                None
            }
        },
    };
    let url = p.url.clone()?;
    let tls = p.tls.unwrap_or_else(|| {
        url.parse::<tokio_postgres::Config>()
            .map_or(PgTls::VerifyFull, |c| PgTls::default_for(&c))
    });
    ok.then_some(PostgresConfig {
        url,
        password,
        password_file,
        pool_size: p.pool_size,
        connect_timeout: p.connect_timeout,
        statement_timeout: p.statement_timeout,
        follow_every: p.follow_every,
        tls,
        ca_file,
    })
}

/// The certificates of a `ca_file` (PEM; at least one).
pub fn read_ca_file(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read PEM certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Why `url` cannot be `state.postgres.url`, if it cannot. The reason never quotes the URL.
fn postgres_url_problem(url: &str) -> Option<String> {
    const FORM: &str = "must be postgres://user@host[:port]/database";
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Some(FORM.into());
    }
    let c: tokio_postgres::Config = match url.parse() {
        Ok(c) => c,
        Err(e) => {
            // tokio-postgres names the option (`port`), never its value.
            let why = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
            return Some(format!("{FORM} ({e}{why})"));
        }
    };
    // In the URL (user:password@ or ?password=) it would sit in the config file, in
    // `check-config`'s output and in every log line that shows the URL.
    if c.get_password().is_some() {
        return Some(
            "must not carry a password: put it in state.postgres.password_file (a secret file, \
             like broker.password_file)"
                .into(),
        );
    }
    if c.get_user().is_none_or(str::is_empty) {
        return Some(format!("{FORM} (the user is missing)"));
    }
    if c.get_hosts().is_empty() && c.get_hostaddrs().is_empty() {
        return Some(format!("{FORM} (the host is missing)"));
    }
    // tokio-postgres knows no sslmode=verify-full; one setting says it all.
    let query = url.split_once('?').map_or("", |(_, q)| q);
    if query
        .split('&')
        .any(|kv| kv.split('=').next() == Some("sslmode"))
    {
        return Some(
            "must not carry sslmode: set state.postgres.tls instead (off, require or verify-full)"
                .into(),
        );
    }
    None
}

fn validate(f: FileConfig, base: &Path) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let mut problem = |key: &str, reason: String| {
        problems.push(ConfigProblem {
            key: key.into(),
            reason,
        })
    };

    // Broker.
    let (url, redacted_url, password_file) = broker_url(&f.broker, base, &mut problem);
    if f.broker.prefetch == Some(0) {
        problem("broker.prefetch", "must be at least 1".into());
    }

    // State.
    if f.state.dir.as_os_str().is_empty() {
        problem("state.dir", "must not be empty".into());
    }
    if f.state.ledger_retention < Duration::from_secs(3600) {
        problem(
            "state.ledger_retention",
            "must be at least 1h, or redelivered jobs could be sent twice".into(),
        );
    }
    let postgres = state_postgres(&f.state, base, &mut problem);
    let state_dir = if f.state.dir.is_absolute() {
        f.state.dir.clone()
    } else {
        base.join(&f.state.dir)
    };

    // Cloud API.
    match reqwest::Url::parse(&f.cloud_api.base_url) {
        Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {}
        Ok(_) => problem(
            "cloud_api.base_url",
            "scheme must be https (or http for a local stand-in)".into(),
        ),
        Err(e) => problem("cloud_api.base_url", format!("not a URL: {e}")),
    }
    if !f.cloud_api.version.starts_with('v') || f.cloud_api.version.contains('/') {
        problem(
            "cloud_api.version",
            "must look like v21.0 (pin a Graph API version)".into(),
        );
    }
    if f.cloud_api.request_timeout.is_zero() {
        problem("cloud_api.request_timeout", "must be more than 0s".into());
    }

    // Retry.
    if f.retry.max_attempts == 0 {
        problem("retry.max_attempts", "must be at least 1".into());
    }
    if f.retry.base_delay.is_zero() || f.retry.base_delay > f.retry.max_delay {
        problem(
            "retry.base_delay",
            "must be more than 0s and at most retry.max_delay".into(),
        );
    }
    // Upper bounds keep every wait far inside the time types' ranges (no overflow panics).
    if f.retry.max_delay > Duration::from_secs(86400) {
        problem("retry.max_delay", "must be at most 1d".into());
    }
    if f.retry.inline_max_delay > Duration::from_secs(60) {
        problem(
            "retry.inline_max_delay",
            "must be at most 60s (longer waits belong in a delay queue)".into(),
        );
    }
    if f.retry.account_pause_probe < Duration::from_millis(100)
        || f.retry.account_pause_probe > Duration::from_secs(3600)
    {
        problem(
            "retry.account_pause_probe",
            "must be between 100ms and 1h".into(),
        );
    }
    if f.retry.max_attempts > 100 {
        problem("retry.max_attempts", "must be at most 100".into());
    }
    // Marketing is not resent after an ambiguous send by default: a second marketing message
    // costs money and goodwill; an OTP or an order update that never arrives costs more.
    let mut resend = [false, true, true, true];
    for (k, v) in &f.retry.resend_ambiguous {
        match Category::ALL.iter().find(|c| c.as_str() == k) {
            Some(c) => resend[*c as usize] = *v,
            None => problem(
                &format!("retry.resend_ambiguous.{k}"),
                "not a category (marketing, utility, authentication, service)".into(),
            ),
        }
    }

    if f.shutdown.grace_period.is_zero() || f.shutdown.grace_period > Duration::from_secs(3600) {
        problem("shutdown.grace_period", "must be between 1ms and 1h".into());
    }
    if f.cloud_api.request_timeout > Duration::from_secs(300) {
        problem("cloud_api.request_timeout", "must be at most 5m".into());
    }
    if f.state.ledger_retention > Duration::from_secs(400 * 86400) {
        problem("state.ledger_retention", "must be at most 400d".into());
    }
    // Shorter than a reopen or two would give up on a disk being freed; much longer than a
    // day only hides a host that needs an operator.
    if f.state.unwritable_grace < Duration::from_secs(10) {
        problem("state.unwritable_grace", "must be at least 10s".into());
    }
    if f.state.unwritable_grace > Duration::from_secs(86400) {
        problem("state.unwritable_grace", "must be at most 24h".into());
    }

    // Purposes and accounts.
    let mut seen = HashSet::new();
    let mut purposes = Vec::new();
    for (i, p) in f.purposes.iter().enumerate() {
        // Names travel in CSV exports (`|`-joined), store keys and metric labels: keep them
        // plain.
        let plain = p
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if p.name.is_empty() || p.name.len() > 64 || !plain || !seen.insert(p.name.clone()) {
            problem(
                &format!("purposes[{i}].name"),
                "must be 1 to 64 letters, digits, `_`, `-` or `.`, and unique".into(),
            );
        }
        let mut categories = Vec::new();
        for c in p
            .categories
            .clone()
            .unwrap_or_else(|| vec!["marketing".into(), "utility".into()])
        {
            match Category::ALL.iter().find(|x| x.as_str() == c) {
                Some(c) if c.needs_purpose() => categories.push(*c),
                _ => problem(
                    &format!("purposes[{i}].categories"),
                    format!(
                        "`{c}` is not marketing or utility (authentication and service need no consent purpose)"
                    ),
                ),
            }
        }
        if let Some(e) = p.expire_after
            && (e < Duration::from_secs(86400) || e > Duration::from_secs(20 * 365 * 86400))
        {
            problem(
                &format!("purposes[{i}].expire_after"),
                "must be between 1d and 20 years (e.g. \"730d\")".into(),
            );
        }
        purposes.push(Purpose {
            name: p.name.clone(),
            description: p.description.clone(),
            categories,
            double_opt_in: p.double_opt_in,
            expire_after: p.expire_after,
        });
    }
    // The consent cache packs the purpose into 6 bits and the account into 8 (slot 0 is "every
    // purpose"): see consent::index.
    if purposes.len() > 63 {
        problem("purposes", "at most 63 purposes".into());
    }
    if f.accounts.len() > 255 {
        problem("accounts", "at most 255 accounts per instance".into());
    }
    if f.consent.confirm_within < Duration::from_secs(60)
        || f.consent.confirm_within > Duration::from_secs(30 * 86400)
    {
        problem(
            "consent.confirm_within",
            "must be between 1m and 30d".into(),
        );
    }
    if f.consent.erase_tombstone_retention > Duration::from_secs(400 * 86400) {
        problem(
            "consent.erase_tombstone_retention",
            "must be at most 400d".into(),
        );
    }
    if f.consent.future_tolerance > Duration::from_secs(86400) {
        problem("consent.future_tolerance", "must be at most 1d".into());
    }
    if f.accounts.is_empty() {
        problem(
            "accounts",
            "at least one [[accounts]] entry is needed".into(),
        );
    }
    let mut names = HashSet::new();
    let mut accounts = Vec::new();
    // Portfolios: the configured ones first, then one of its own for each account without.
    let mut portfolios: Vec<(Arc<str>, u32)> = Vec::new();
    let mut portfolio_index: std::collections::HashMap<String, usize> = Default::default();
    for (i, p) in f.portfolios.iter().enumerate() {
        let key = |k: &str| format!("portfolios[{i}].{k}");
        if p.name.is_empty() || portfolio_index.contains_key(&p.name) {
            problem(&key("name"), "must be non-empty and unique".into());
        }
        let limit = match &p.messaging_limit {
            None => limits::UNLIMITED,
            Some(TierFile::Word(w)) if w.eq_ignore_ascii_case("unlimited") => limits::UNLIMITED,
            Some(TierFile::Count(n)) if (1..u32::MAX as u64).contains(n) => *n as u32,
            Some(_) => {
                problem(
                    &key("messaging_limit"),
                    "must be a number of recipients (Meta's tiers: 250, 2000, 10000, 100000; a share of one when sharded) or \"unlimited\"".into(),
                );
                limits::UNLIMITED
            }
        };
        portfolio_index.insert(p.name.clone(), portfolios.len());
        portfolios.push((p.name.as_str().into(), limit));
    }
    for (i, a) in f.accounts.iter().enumerate() {
        let key = |k: &str| format!("accounts[{i}].{k}");
        if a.name.is_empty() || !names.insert(a.name.clone()) {
            problem(&key("name"), "must be non-empty and unique".into());
        }
        if a.phone_number_id.is_empty() || !a.phone_number_id.bytes().all(|b| b.is_ascii_digit()) {
            problem(
                &key("phone_number_id"),
                "must be the numeric id Meta shows".into(),
            );
        }
        if !(1..=1000).contains(&a.messages_per_second) {
            problem(
                &key("messages_per_second"),
                "must be between 1 and 1000 (the Cloud API's range)".into(),
            );
        }
        let consent = account_consent(&a.consent, &seen, &mut |k, r| {
            problem(&key(&format!("consent.{k}")), r)
        });
        let burst = a
            .burst
            .unwrap_or_else(|| limits::default_burst(a.messages_per_second));
        if burst == 0 || burst > 10_000 {
            problem(&key("burst"), "must be between 1 and 10000".into());
        }
        // Without a named portfolio, the numbers of one WABA share one (Meta's tier is shared at
        // least that widely); a number without a WABA has one of its own.
        let portfolio_name = a.portfolio.clone().unwrap_or_else(|| match &a.waba_id {
            Some(w) => format!("waba-{w}"),
            None => a.name.clone(),
        });
        let portfolio = match portfolio_index.get(portfolio_name.as_str()) {
            Some(&i) => i,
            None if a.portfolio.is_some() => {
                problem(
                    &key("portfolio"),
                    format!("no [[portfolios]] entry is named `{portfolio_name}`"),
                );
                0
            }
            None => {
                portfolio_index.insert(portfolio_name.clone(), portfolios.len());
                portfolios.push((portfolio_name.as_str().into(), limits::UNLIMITED));
                portfolios.len() - 1
            }
        };
        if a.pacing.interval > Duration::from_secs(3600) {
            problem(
                &key("pacing.interval"),
                "must be at most 1h (0 turns pacing off)".into(),
            );
        }
        if a.pacing.burst == 0 || a.pacing.burst > 1000 {
            problem(&key("pacing.burst"), "must be between 1 and 1000".into());
        }
        let daily_budget = match a.daily_budget.as_deref().map(crate::pricing::parse_decimal) {
            None => None,
            Some(Ok(m)) if m.0 > 0 => Some(m),
            Some(Ok(_)) => {
                problem(&key("daily_budget"), "must be more than 0".into());
                None
            }
            Some(Err(e)) => {
                problem(
                    &key("daily_budget"),
                    format!(
                        "{e} (a decimal string such as \"250.00\", in the price table's currency)"
                    ),
                );
                None
            }
        };
        let mut budget_categories = Vec::new();
        for c in a
            .budget_categories
            .clone()
            .unwrap_or_else(|| vec!["marketing".into()])
        {
            match Category::ALL.iter().find(|x| x.as_str() == c) {
                Some(c) => budget_categories.push(*c),
                None => problem(
                    &key("budget_categories"),
                    format!(
                        "`{c}` is not a category (marketing, utility, authentication, service)"
                    ),
                ),
            }
        }
        let quiet_hours = a.quiet_hours.as_ref().and_then(|q| {
            quiet_hours(q, &mut |k, r| problem(&key(&format!("quiet_hours.{k}")), r))
        });
        let path = resolve_secret_path(&a.token_file, base);
        match read_secret(&path) {
            Ok(token) => accounts.push(Account {
                name: a.name.as_str().into(),
                phone_number_id: a.phone_number_id.clone(),
                token_path: path,
                token,
                messages_per_second: a.messages_per_second,
                waba_id: a.waba_id.clone(),
                consent,
                burst,
                portfolio,
                brand: a.brand.as_deref().unwrap_or(&a.name).into(),
                pacing_interval: a.pacing.interval,
                pacing_burst: a.pacing.burst,
                quiet_hours,
                daily_budget,
                budget_categories,
            }),
            Err(e) => problem(&key("token_file"), e),
        }
    }

    // Admin listener.
    let admin_token_file = f
        .admin
        .token_file
        .as_ref()
        .map(|p| resolve_secret_path(p, base));
    let admin_token = match &admin_token_file {
        None => Some(AdminToken::Generated(state_dir.join(GENERATED_ADMIN_TOKEN))),
        Some(p) => match read_secret(p) {
            Ok(t) if t.expose().chars().count() < MIN_ADMIN_TOKEN_LEN => {
                problem(
                    "admin.token_file",
                    format!("the token must be at least {MIN_ADMIN_TOKEN_LEN} characters"),
                );
                None
            }
            Ok(t) => Some(AdminToken::File(t)),
            Err(e) => {
                problem("admin.token_file", e);
                None
            }
        },
    };

    // Webhook listener.
    let app_secret_file = f
        .webhook
        .app_secret_file
        .as_ref()
        .map(|p| resolve_secret_path(p, base));
    let verify_token_file = f
        .webhook
        .verify_token_file
        .as_ref()
        .map(|p| resolve_secret_path(p, base));
    let mut webhook_secret = |key: &str, p: &Option<PathBuf>| -> Option<Secret> {
        match p {
            None if f.webhook.enabled => {
                problem(key, "is needed when webhook.enabled = true".into());
                None
            }
            None => None,
            Some(p) => match read_secret(p) {
                Ok(s) => Some(s),
                Err(e) => {
                    problem(key, e);
                    None
                }
            },
        }
    };
    let app_secret = webhook_secret("webhook.app_secret_file", &app_secret_file);
    let verify_token = webhook_secret("webhook.verify_token_file", &verify_token_file);
    if f.webhook.max_body_bytes < 1024 || f.webhook.max_body_bytes > 64 * 1024 * 1024 {
        problem(
            "webhook.max_body_bytes",
            "must be between 1024 and 67108864".into(),
        );
    }
    for (key, d) in [
        (
            "webhook.broker_connect_timeout",
            f.webhook.broker_connect_timeout,
        ),
        ("webhook.request_timeout", f.webhook.request_timeout),
    ] {
        if d < Duration::from_millis(100) || d > Duration::from_secs(60) {
            problem(key, "must be between 100ms and 60s".into());
        }
    }
    if f.webhook.enabled && f.webhook.listen == f.admin.listen && f.admin.listen.port() != 0 {
        problem("webhook.listen", "must differ from admin.listen".into());
    }

    let prices = match f.prices.unwrap_or_default().validate() {
        Ok(t) => Some(t),
        Err(errs) => {
            for (k, r) in errs {
                problem(&k, r);
            }
            None
        }
    };

    let caps = caps(&f.caps, &mut problem);
    {
        let names: Vec<(&str, &str)> = accounts.iter().map(|a| (&*a.name, &*a.brand)).collect();
        if let Err(e) = limits::validate_caps(&caps, &names) {
            problem("caps", e);
        }
    }
    if f.limits.per_user_limit_block > Duration::from_secs(30 * 86400) {
        problem("limits.per_user_limit_block", "must be at most 30d".into());
    }
    if f.limits.recover_after < Duration::from_millis(100)
        || f.limits.recover_after > Duration::from_secs(3600)
    {
        problem(
            "limits.recover_after",
            "must be between 100ms and 1h".into(),
        );
    }
    if f.limits.housekeeping_interval < Duration::from_secs(1)
        || f.limits.housekeeping_interval > Duration::from_secs(3600)
    {
        problem(
            "limits.housekeeping_interval",
            "must be between 1s and 1h".into(),
        );
    }
    if f.limits.arrival_jitter > Duration::from_secs(1) {
        problem("limits.arrival_jitter", "must be at most 1s".into());
    }
    let country_zones: Vec<(String, String)> = f
        .limits
        .country_zones
        .iter()
        .map(|(c, z)| (c.to_ascii_uppercase(), z.clone()))
        .collect();
    for (c, z) in &country_zones {
        if let Err(e) = crate::pipeline::limits::quiet::job_zone(z) {
            problem(&format!("limits.country_zones.{c}"), e);
        }
    }
    // Quiet hours need the time-zone database (Debian's tzdata): refuse to start without it
    // rather than send at night.
    if accounts.iter().any(|a| a.quiet_hours.is_some())
        && let Err(e) = crate::pipeline::limits::quiet::Zones::load(&country_zones)
    {
        problem("limits.country_zones", e);
    }
    let (Some(prices), Some(admin_token)) = (prices.filter(|_| problems.is_empty()), admin_token)
    else {
        return Err(ConfigError { problems });
    };
    Ok(Config {
        broker: BrokerConfig {
            url: Secret::new(url),
            redacted_url,
            password_file,
            shard: f.broker.shard,
            prefetch: f
                .broker
                .prefetch
                .unwrap_or_else(|| default_prefetch(f.accounts.len())),
            reconnect_max_delay: f.broker.reconnect_max_delay,
        },
        state: StateConfig {
            dir: state_dir,
            ledger_retention: f.state.ledger_retention,
            unwritable_grace: f.state.unwritable_grace,
            backend: f.state.backend,
            postgres,
        },
        cloud_api: CloudApiConfig {
            base_url: f.cloud_api.base_url.trim_end_matches('/').to_string(),
            version: f.cloud_api.version,
            request_timeout: f.cloud_api.request_timeout,
            connect_timeout: f.cloud_api.connect_timeout,
        },
        sandbox: SandboxConfigSection {
            enabled: f.sandbox.enabled,
            listen: f.sandbox.listen,
            latency: f.sandbox.latency,
        },
        retry: RetryConfig {
            max_attempts: f.retry.max_attempts,
            base_delay: f.retry.base_delay,
            max_delay: f.retry.max_delay,
            inline_max_delay: f.retry.inline_max_delay,
            account_pause_probe: f.retry.account_pause_probe,
            resend_ambiguous: resend,
        },
        shutdown: ShutdownConfig {
            grace_period: f.shutdown.grace_period,
        },
        admin: AdminConfig {
            listen: f.admin.listen,
            token: admin_token,
            token_file: admin_token_file,
        },
        log: LogConfig {
            format: f.log.format,
            mask_numbers: f.log.mask_numbers,
            filter: f.log.filter,
        },
        purposes,
        accounts,
        consent: ConsentConfig {
            confirm_within: f.consent.confirm_within,
            erase_tombstone_retention: f.consent.erase_tombstone_retention,
            future_tolerance: f.consent.future_tolerance,
        },
        webhook: WebhookConfig {
            enabled: f.webhook.enabled,
            listen: f.webhook.listen,
            app_secret,
            verify_token,
            app_secret_file,
            verify_token_file,
            max_body_bytes: f.webhook.max_body_bytes,
            template_pause_max_wait: f.webhook.template_pause_max_wait,
            service_window: f.webhook.service_window,
            broker_connect_timeout: f.webhook.broker_connect_timeout,
            request_timeout: f.webhook.request_timeout,
            delivery_events: f.webhook.delivery_events,
        },
        prices: Arc::new(prices),
        limits: LimitsConfig {
            portfolios,
            caps,
            per_user_limit_block: f.limits.per_user_limit_block,
            recover_after: f.limits.recover_after,
            housekeeping_interval: f.limits.housekeeping_interval,
            arrival_jitter: f.limits.arrival_jitter,
            country_zones,
        },
    })
}

fn quiet_hours(
    q: &QuietHoursFile,
    problem: &mut dyn FnMut(&str, String),
) -> Option<crate::pipeline::limits::quiet::QuietHours> {
    let mut time = |k: &str, v: &str| match v.parse::<jiff::civil::Time>() {
        Ok(t) => Some(t),
        Err(_) => {
            problem(k, format!("`{v}` is not a time of day such as \"21:00\""));
            None
        }
    };
    let (start, end) = (time("start", &q.start), time("end", &q.end));
    let mut categories = Vec::new();
    for c in q
        .categories
        .clone()
        .unwrap_or_else(|| vec!["marketing".into()])
    {
        match Category::ALL.iter().find(|x| x.as_str() == c) {
            Some(c) => categories.push(*c),
            None => problem(
                "categories",
                format!("`{c}` is not a category (marketing, utility, authentication, service)"),
            ),
        }
    }
    if q.spread > Duration::from_secs(12 * 3600) {
        problem("spread", "must be at most 12h".into());
    }
    let (start, end) = (start?, end?);
    if start == end {
        problem(
            "end",
            "must differ from start (an empty or a 24-hour window)".into(),
        );
        return None;
    }
    Some(crate::pipeline::limits::quiet::QuietHours {
        start,
        end,
        categories,
        spread: q.spread,
    })
}

fn caps(files: &[CapFile], problem: &mut dyn FnMut(&str, String)) -> Vec<limits::CapConfig> {
    use limits::{CapConfig, CapRule, CapScope, MAX_PER_RULE, OnExceed};
    let mut out: Vec<CapConfig> = Vec::new();
    for (i, c) in files.iter().enumerate() {
        let key = |k: &str| format!("caps[{i}].{k}");
        let Some(category) = Category::ALL
            .iter()
            .find(|x| x.as_str() == c.category)
            .copied()
        else {
            problem(
                &key("category"),
                format!(
                    "`{}` is not a category (marketing, utility, authentication, service)",
                    c.category
                ),
            );
            continue;
        };
        let scope = match c.scope.as_str() {
            "account" => CapScope::Account,
            "brand" => CapScope::Brand,
            other => {
                problem(
                    &key("scope"),
                    format!("`{other}` is not `account` or `brand`"),
                );
                continue;
            }
        };
        let on_exceed = match c.on_exceed.as_deref() {
            None if category == Category::Marketing => OnExceed::Suppress,
            None => OnExceed::Defer,
            Some("suppress") => OnExceed::Suppress,
            Some("defer") => OnExceed::Defer,
            Some(other) => {
                problem(
                    &key("on_exceed"),
                    format!("`{other}` is not `suppress` or `defer`"),
                );
                continue;
            }
        };
        if c.rules.is_empty() {
            problem(&key("rules"), "needs at least one { max, per } rule".into());
        }
        let mut rules = Vec::new();
        for (j, r) in c.rules.iter().enumerate() {
            if r.max == 0 || r.max > MAX_PER_RULE as u64 {
                problem(
                    &key(&format!("rules[{j}].max")),
                    format!("must be between 1 and {MAX_PER_RULE}"),
                );
            }
            if r.per < Duration::from_secs(1) || r.per > Duration::from_secs(400 * 86400) {
                problem(
                    &key(&format!("rules[{j}].per")),
                    "must be between 1s and 400d".into(),
                );
            }
            rules.push(CapRule {
                max: r.max.clamp(1, MAX_PER_RULE as u64) as u8,
                per_secs: r.per.as_secs().clamp(1, u32::MAX as u64) as u32,
            });
        }
        if out
            .iter()
            .any(|o| o.category == category && o.scope == scope)
        {
            problem(
                &key("category"),
                format!(
                    "a second cap for {} with scope {}: put both rules in one entry",
                    c.category, c.scope
                ),
            );
            continue;
        }
        out.push(CapConfig {
            category,
            scope,
            rules,
            on_exceed,
        });
    }
    out
}

fn account_consent(
    c: &AccountConsentFile,
    purposes: &HashSet<String>,
    problem: &mut dyn FnMut(&str, String),
) -> AccountConsent {
    use crate::consent::keywords;
    let words =
        |k: &str, v: &Option<Vec<String>>, d: &[&str], problem: &mut dyn FnMut(&str, String)| {
            let list: Vec<String> = match v {
                Some(v) => v.clone(),
                None => d.iter().map(|s| s.to_string()).collect(),
            };
            if list.iter().any(|w| keywords::normalize(w).is_empty()) {
                problem(k, "keywords must not be empty or punctuation only".into());
            }
            list
        };
    let opt_out_keywords = words(
        "opt_out_keywords",
        &c.opt_out_keywords,
        keywords::DEFAULT_OPT_OUT,
        problem,
    );
    let opt_in_keywords = words(
        "opt_in_keywords",
        &c.opt_in_keywords,
        keywords::DEFAULT_OPT_IN,
        problem,
    );
    let yes_keywords = words(
        "yes_keywords",
        &c.yes_keywords,
        keywords::DEFAULT_YES,
        problem,
    );
    let no_keywords = words("no_keywords", &c.no_keywords, keywords::DEFAULT_NO, problem);
    let outs = keywords::Keywords::new(&opt_out_keywords);
    if let Some(w) = opt_in_keywords
        .iter()
        .chain(&yes_keywords)
        .find(|w| outs.matches(w))
    {
        problem(
            "opt_in_keywords",
            format!("`{w}` is also an opt-out keyword"),
        );
    }
    if let Some(ps) = &c.start_purposes {
        for p in ps {
            if !purposes.contains(p) {
                problem(
                    "start_purposes",
                    format!("`{p}` is not a configured purpose"),
                );
            }
        }
    }
    let double_opt_in = c.double_opt_in.as_ref().and_then(|d| {
        match (&d.text, &d.template) {
            (Some(text), None) => {
                let yes_title = d.yes_title.clone().unwrap_or_else(|| "YES".into());
                let no_title = d.no_title.clone().unwrap_or_else(|| "NO".into());
                // Meta: reply button titles are at most 20 characters, the body 1024.
                if yes_title.chars().count() > 20 || no_title.chars().count() > 20 {
                    problem(
                        "double_opt_in.yes_title",
                        "button titles are at most 20 characters".into(),
                    );
                }
                if text.is_empty() || text.chars().count() > 1024 {
                    problem("double_opt_in.text", "must be 1 to 1024 characters".into());
                }
                Some(DoubleOptInMessage::Interactive {
                    text: text.clone(),
                    yes_title,
                    no_title,
                })
            }
            (None, Some(name)) => match &d.language {
                Some(l) => Some(DoubleOptInMessage::Template {
                    name: name.clone(),
                    language: l.clone(),
                }),
                None => {
                    problem("double_opt_in.language", "is needed with template".into());
                    None
                }
            },
            _ => {
                problem(
                    "double_opt_in",
                    "give either text (an interactive YES/NO question) or template + language"
                        .into(),
                );
                None
            }
        }
    });
    if let Some(f) = &c.marketing_footer
        && (f.trim().is_empty() || f.chars().count() > 200)
    {
        problem("marketing_footer", "must be 1 to 200 characters".into());
    }
    AccountConsent {
        opt_out_keywords,
        opt_in_keywords,
        yes_keywords,
        no_keywords,
        opt_out_reply: c.opt_out_reply.clone(),
        start_purposes: c.start_purposes.clone(),
        marketing_footer: c.marketing_footer.clone(),
        opt_out_templates: c.opt_out_templates.clone(),
        templates_without_opt_out: c.templates_without_opt_out,
        double_opt_in,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, toml: &str) -> PathBuf {
        std::fs::write(dir.join("token"), "tok\n").unwrap();
        let p = dir.join("sendwell.toml");
        std::fs::write(&p, toml).unwrap();
        p
    }

    const GOOD: &str = r#"
        [[accounts]]
        name = "acme-de"
        phone_number_id = "106540352242922"
        token_file = "token"
    "#;

    fn no_env() -> Env {
        Env::prefixed("SENDWELL_TEST_NEVER_SET_")
    }

    #[test]
    fn prefetch_defaults_to_a_thousand_per_account() {
        assert_eq!(default_prefetch(0), 1000);
        assert_eq!(default_prefetch(8), 8000);
        assert_eq!(default_prefetch(100), u16::MAX);
    }

    #[test]
    fn a_minimal_file_gets_documented_defaults() {
        let d = tempfile::tempdir().unwrap();
        let c = Config::load_with_env(&write(d.path(), GOOD), no_env()).unwrap();
        assert_eq!(c.broker.prefetch, 1000);
        assert_eq!(c.accounts[0].token.expose(), "tok");
        assert_eq!(c.accounts[0].messages_per_second, 80);
        assert!(!c.retry.resend_ambiguous(Category::Marketing));
        assert!(c.retry.resend_ambiguous(Category::Authentication));
        assert!(!c.effective_toml().contains("guest:guest"));
    }

    #[test]
    fn an_unknown_key_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &format!("[broker]\nprefetsh = 3\n{GOOD}"));
        let e = Config::load_with_env(&p, no_env()).unwrap_err();
        assert_eq!(e.problems[0].key, "broker.prefetsh", "{e}");
    }

    #[test]
    fn a_duration_without_unit_is_refused_with_its_key() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            &format!("[shutdown]\ngrace_period = \"30\"\n{GOOD}"),
        );
        let e = Config::load_with_env(&p, no_env()).unwrap_err();
        assert_eq!(e.problems[0].key, "shutdown.grace_period", "{e}");
    }

    #[test]
    fn limits_get_their_defaults_and_portfolios_their_tiers() {
        let d = tempfile::tempdir().unwrap();
        let toml = format!(
            "{GOOD}portfolio = \"acme\"\nbrand = \"acme\"\n\
             quiet_hours = {{ start = \"21:00\", end = \"09:00\" }}\n\
             [[portfolios]]\nname = \"acme\"\nmessaging_limit = 2000\n\
             [[caps]]\ncategory = \"marketing\"\nscope = \"brand\"\n\
             rules = [{{ max = 2, per = \"7d\" }}, {{ max = 1, per = \"1d\" }}]\n\
             [[caps]]\ncategory = \"utility\"\nrules = [{{ max = 3, per = \"1d\" }}]\n"
        );
        let c = Config::load_with_env(&write(d.path(), &toml), no_env()).unwrap();
        let a = &c.accounts[0];
        assert_eq!((a.burst, a.portfolio, &*a.brand), (8, 0, "acme"));
        assert_eq!(
            (a.pacing_interval, a.pacing_burst),
            (Duration::from_secs(6), 1)
        );
        let q = a.quiet_hours.as_ref().unwrap();
        assert_eq!(q.categories, vec![Category::Marketing]);
        assert_eq!(q.spread, Duration::from_secs(1800));
        assert_eq!(c.limits.portfolios, vec![("acme".into(), 2000)]);
        use limits::OnExceed;
        assert_eq!(c.limits.caps[0].on_exceed, OnExceed::Suppress);
        assert_eq!(c.limits.caps[0].rules[0].per_secs, 7 * 86400);
        assert_eq!(
            c.limits.caps[1].on_exceed,
            OnExceed::Defer,
            "utility defers"
        );
        assert_eq!(c.limits.per_user_limit_block, Duration::from_secs(86400));
        // Without a portfolio, an account has one of its own, unlimited.
        let c = Config::load_with_env(&write(d.path(), GOOD), no_env()).unwrap();
        assert_eq!(
            c.limits.portfolios,
            vec![("acme-de".into(), limits::UNLIMITED)]
        );
    }

    #[test]
    fn bad_limits_are_named_by_their_keys() {
        let d = tempfile::tempdir().unwrap();
        let toml = format!(
            "{GOOD}portfolio = \"nope\"\nburst = 0\npacing = {{ interval = \"2h\" }}\n\
             quiet_hours = {{ start = \"25:00\", end = \"09:00\" }}\n\
             [[portfolios]]\nname = \"acme\"\nmessaging_limit = \"lots\"\n\
             [[caps]]\ncategory = \"marketing\"\nrules = [{{ max = 9, per = \"0s\" }}]\n\
             [[caps]]\ncategory = \"marketing\"\nscope = \"galaxy\"\nrules = []\n\
             [limits]\ncountry_zones = {{ US = \"Mars/Base\" }}\n"
        );
        let e = Config::load_with_env(&write(d.path(), &toml), no_env()).unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "accounts[0].portfolio",
            "accounts[0].burst",
            "accounts[0].pacing.interval",
            "accounts[0].quiet_hours.start",
            "portfolios[0].messaging_limit",
            "caps[0].rules[0].max",
            "caps[0].rules[0].per",
            "caps[1].scope",
            "limits.country_zones.US",
        ] {
            assert!(keys.contains(&k), "{k} missing from {e}");
        }
    }

    #[test]
    fn the_unwritable_grace_has_a_default_a_unit_and_bounds() {
        let d = tempfile::tempdir().unwrap();
        let c = Config::load_with_env(&write(d.path(), GOOD), no_env()).unwrap();
        assert_eq!(c.state.unwritable_grace, Duration::from_secs(300));
        let p = write(
            d.path(),
            &format!("[state]\nunwritable_grace = \"90s\"\n{GOOD}"),
        );
        let c = Config::load_with_env(&p, no_env()).unwrap();
        assert_eq!(c.state.unwritable_grace, Duration::from_secs(90));
        for bad in ["\"5s\"", "\"2d\"", "\"300\""] {
            let p = write(
                d.path(),
                &format!("[state]\nunwritable_grace = {bad}\n{GOOD}"),
            );
            let e = Config::load_with_env(&p, no_env()).unwrap_err();
            assert_eq!(e.problems[0].key, "state.unwritable_grace", "{bad}: {e}");
        }
    }

    #[test]
    fn a_missing_token_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &GOOD.replace("\"token\"", "\"nope\""));
        let e = Config::load_with_env(&p, no_env()).unwrap_err();
        assert_eq!(e.problems[0].key, "accounts[0].token_file", "{e}");
    }

    #[test]
    fn webhook_timeouts_have_defaults_and_bounds() {
        let d = tempfile::tempdir().unwrap();
        let c = Config::load_with_env(&write(d.path(), GOOD), no_env()).unwrap();
        assert_eq!(c.webhook.broker_connect_timeout, Duration::from_secs(3));
        assert_eq!(c.webhook.request_timeout, Duration::from_secs(5));
        let toml =
            format!("[webhook]\nbroker_connect_timeout = \"0s\"\nrequest_timeout = \"2m\"\n{GOOD}");
        let e = Config::load_with_env(&write(d.path(), &toml), no_env()).unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["webhook.broker_connect_timeout", "webhook.request_timeout"],
            "{e}"
        );
    }

    #[test]
    fn the_admin_token_is_generated_in_the_state_dir_unless_a_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let toml = format!("[state]\ndir = \"/srv/sw\"\n{GOOD}");
        let c = Config::load_with_env(&write(d.path(), &toml), no_env()).unwrap();
        assert!(
            matches!(&c.admin.token, AdminToken::Generated(p) if p == Path::new("/srv/sw/admin-token")),
            "{:?}",
            c.admin.token
        );

        let secret = "0123456789abcdef-admin";
        std::fs::write(d.path().join("admin-token"), format!("{secret}\n")).unwrap();
        let toml = format!("[admin]\ntoken_file = \"admin-token\"\n{GOOD}");
        let c = Config::load_with_env(&write(d.path(), &toml), no_env()).unwrap();
        assert!(matches!(&c.admin.token, AdminToken::File(t) if t.expose() == secret));
        assert!(!c.effective_toml().contains(secret));

        // Missing, or too short to guard personal data: named by its key, without the secret.
        let toml = format!("[admin]\ntoken_file = \"nope\"\n{GOOD}");
        let e = Config::load_with_env(&write(d.path(), &toml), no_env()).unwrap_err();
        assert_eq!(e.problems[0].key, "admin.token_file", "{e}");
        std::fs::write(d.path().join("admin-token"), "short-secret\n").unwrap();
        let toml = format!("[admin]\ntoken_file = \"admin-token\"\n{GOOD}");
        let e = Config::load_with_env(&write(d.path(), &toml), no_env()).unwrap_err();
        assert_eq!(e.problems[0].key, "admin.token_file", "{e}");
        assert!(!e.to_string().contains("short-secret"), "{e}");
    }

    /// Loads `path`, prints it, loads the print and checks both are the same config: the same
    /// print, the same `Debug` (every field, secrets redacted), the same secrets. The prices are
    /// compared as the section they print to (their lookup index is a HashMap, whose `Debug`
    /// order varies). `put_back`: the secrets the print redacts, as an operator restores them.
    fn round_trip(path: &Path, put_back: &[(&str, &str)]) -> Config {
        let c1 = Config::load_with_env(path, no_env()).unwrap();
        let original = c1.effective_toml();
        let mut printed = original.clone();
        let _: toml::Table = toml::from_str(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
        let d = tempfile::tempdir().unwrap();
        let saved = d.path().join("printed.toml");
        if !put_back.is_empty() {
            std::fs::write(&saved, &printed).unwrap();
            let e = Config::load_with_env(&saved, no_env()).unwrap_err();
            assert_eq!(e.problems.len(), 1, "{e}");
            assert_eq!(e.problems[0].key, "broker.url", "{e}");
            assert!(e.problems[0].reason.contains("password_file"), "{e}");
            for (redacted, secret) in put_back {
                printed = printed.replace(redacted, secret);
            }
        }
        std::fs::write(&saved, &printed).unwrap();
        let mut c2 =
            Config::load_with_env(&saved, no_env()).unwrap_or_else(|e| panic!("{e}\n{printed}"));
        assert_eq!(c2.effective_toml(), original);
        assert_eq!(c1.prices.to_file(), c2.prices.to_file());
        c2.prices = c1.prices.clone();
        assert_eq!(format!("{c1:?}"), format!("{c2:?}"));
        assert_eq!(c1.broker.url.expose(), c2.broker.url.expose());
        for (a, b) in c1.accounts.iter().zip(&c2.accounts) {
            assert_eq!(a.token.expose(), b.token.expose());
        }
        let secret = |s: &Option<Secret>| s.as_ref().map(|s| s.expose().to_string());
        assert_eq!(
            secret(&c1.webhook.app_secret),
            secret(&c2.webhook.app_secret)
        );
        assert_eq!(
            secret(&c1.webhook.verify_token),
            secret(&c2.webhook.verify_token)
        );
        let pg_password = |c: &Config| {
            c.state
                .postgres
                .as_ref()
                .and_then(|p| p.password.as_ref().map(|s| s.expose().to_string()))
        };
        assert_eq!(pg_password(&c1), pg_password(&c2));
        match (&c1.admin.token, &c2.admin.token) {
            (AdminToken::File(a), AdminToken::File(b)) => assert_eq!(a.expose(), b.expose()),
            (AdminToken::Generated(a), AdminToken::Generated(b)) => assert_eq!(a, b),
            (a, b) => panic!("{a:?} became {b:?}"),
        }
        c1
    }

    #[test]
    fn check_config_prints_the_example_configs_as_toml_that_loads_back_the_same() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        // The development config writes RabbitMQ's guest password into the URL: printed as ***,
        // refused until it is put back.
        let c = round_trip(
            &root.join("config/sendwell.toml"),
            &[("guest:***@", "guest:guest@")],
        );
        let printed = c.effective_toml();
        for line in [
            "ledger_retention = \"7d\"",
            "base_delay = \"500ms\"",
            "confirm_within = \"2d\"",
            "[retry.resend_ambiguous]",
            "marketing = false",
            "prefetch = 1000",
            "burst = 8",
            "[[caps.rules]]",
            "on_exceed = \"suppress\"",
            "calling_codes = [\"49\"]",
        ] {
            assert!(printed.contains(line), "{line} missing from\n{printed}");
        }
        assert!(!printed.contains("guest:guest"), "{printed}");

        // The packaged config, with its secret files (and the price example as its [prices]).
        let d = tempfile::tempdir().unwrap();
        for (file, secret) in [
            ("broker-password", "broker-s3cret"),
            ("example-token", "token-s3cret"),
            ("admin-token", "admin-token-s3cret-0123456789"),
            ("app-secret", "app-s3cret"),
            ("verify-token", "verify-s3cret"),
            ("pg-password", "pg-s3cret"),
        ] {
            std::fs::write(d.path().join(file), format!("{secret}\n")).unwrap();
        }
        let packaged = std::fs::read_to_string(root.join("packaging/sendwell.toml")).unwrap();
        let prices = std::fs::read_to_string(root.join("config/prices.example.toml")).unwrap();
        let p = d.path().join("sendwell.toml");
        std::fs::write(&p, &packaged).unwrap();
        let c = round_trip(&p, &[]);
        assert_eq!(
            c.broker.password_file,
            Some(d.path().join("broker-password"))
        );
        let with_prices = if packaged.contains("\n[prices]") {
            packaged.clone()
        } else {
            format!("{packaged}\n{prices}")
        };
        std::fs::write(&p, with_prices).unwrap();
        round_trip(&p, &[]);

        // Every optional part set: the template question, quiet hours, a budget, a brand cap
        // that defers, an expiring purpose, country zones, every secret in a file.
        let toml = r#"
            [broker]
            url = "amqp://sendwell:dummy@127.0.0.1:5672/sw"
            password_file = "broker-password"
            [state]
            backend = "postgres"
            [state.postgres]
            url = "postgres://sendwell@db.example:5433/sendwell"
            password_file = "pg-password"
            tls = "off"
            pool_size = 3
            connect_timeout = "1500ms"
            [admin]
            token_file = "admin-token"
            [webhook]
            enabled = true
            app_secret_file = "app-secret"
            verify_token_file = "verify-token"
            [limits]
            country_zones = { us = "America/New_York" }
            arrival_jitter = "1500us"
            [[purposes]]
            name = "news"
            double_opt_in = false
            expire_after = "730d"
            [[caps]]
            category = "utility"
            scope = "brand"
            rules = [{ max = 3, per = "36h" }]
            [[accounts]]
            name = "a"
            phone_number_id = "1"
            token_file = "example-token"
            waba_id = "77"
            daily_budget = "12.5"
            budget_categories = ["marketing", "utility"]
            quiet_hours = { start = "21:30", end = "08:00:30", spread = "90m" }
            consent = { start_purposes = ["news"], double_opt_in = { template = "optin", language = "de" } }
            [[accounts]]
            name = "b"
            phone_number_id = "2"
            token_file = "example-token"
            waba_id = "77"
        "#;
        std::fs::write(&p, toml).unwrap();
        let c = round_trip(&p, &[]);
        assert_eq!(
            c.limits.portfolios.len(),
            1,
            "the two numbers of WABA 77 share one"
        );
        let printed = c.effective_toml();
        for secret in [
            "broker-s3cret",
            "token-s3cret",
            "admin-token-s3cret",
            "app-s3cret",
            "verify-s3cret",
            "pg-s3cret",
            "dummy",
        ] {
            assert!(!printed.contains(secret), "{secret} in\n{printed}");
        }
        assert_eq!(
            c.state
                .postgres
                .as_ref()
                .and_then(|p| p.password.as_ref())
                .map(Secret::expose),
            Some("pg-s3cret")
        );
        for line in [
            "backend = \"postgres\"",
            "[state.postgres]",
            "url = \"postgres://sendwell@db.example:5433/sendwell\"",
            "tls = \"off\"",
            "pool_size = 3",
            "connect_timeout = \"1500ms\"",
            "statement_timeout = \"30s\"",
            "arrival_jitter = \"1500us\"",
            "per = \"36h\"",
            "spread = \"90m\"",
            "end = \"08:00:30\"",
            "daily_budget = \"12.50\"",
            "expire_after = \"730d\"",
        ] {
            assert!(printed.contains(line), "{line} missing from\n{printed}");
        }
    }

    /// The problems of `GOOD` with `state` (a `[state]` section and what follows) in front.
    fn state_problems(state: &str) -> Vec<ConfigProblem> {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &format!("{state}\n{GOOD}"));
        match Config::load_with_env(&p, no_env()) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems,
        }
    }

    #[test]
    fn the_state_backend_is_redb_unless_postgres_is_chosen_with_a_url() {
        let d = tempfile::tempdir().unwrap();
        let c = Config::load_with_env(&write(d.path(), GOOD), no_env()).unwrap();
        assert_eq!(c.state.backend, StateBackend::Redb);
        assert!(c.state.postgres.is_none());
        assert!(!c.effective_toml().contains("[state.postgres]"));

        for state in [
            "[state]\nbackend = \"postgres\"",
            "[state]\nbackend = \"postgres\"\n[state.postgres]\npool_size = 4",
        ] {
            let p = state_problems(state);
            assert_eq!(p.len(), 1, "{p:?}");
            assert_eq!(p[0].key, "state.postgres.url", "{p:?}");
            assert!(p[0].reason.contains("state.backend"), "{p:?}");
        }
        let p = state_problems("[state]\nbackend = \"sqlite\"");
        assert_eq!(p[0].key, "state.backend", "{p:?}");

        // Ignored with redb: not resolved, its password file not read.
        let toml = "[state.postgres]\nurl = \"postgres://u@h/db\"\npassword_file = \"nowhere\"\n";
        let c =
            Config::load_with_env(&write(d.path(), &format!("{toml}{GOOD}")), no_env()).unwrap();
        assert_eq!(c.state.backend, StateBackend::Redb);
        assert!(c.state.postgres.is_none());

        let toml =
            "[state]\nbackend = \"postgres\"\n[state.postgres]\nurl = \"postgres://u@h/db\"\n";
        let c =
            Config::load_with_env(&write(d.path(), &format!("{toml}{GOOD}")), no_env()).unwrap();
        let pg = c.state.postgres.unwrap();
        assert_eq!(pg.url, "postgres://u@h/db");
        assert!(pg.password.is_none() && pg.password_file.is_none());
        assert_eq!(pg.pool_size, 8);
        assert_eq!(pg.connect_timeout, Duration::from_secs(5));
        assert_eq!(pg.statement_timeout, Duration::from_secs(30));
        assert_eq!(pg.follow_every, Duration::from_millis(250));
        let c = Config::load_with_env(
            &write(d.path(), &format!("{toml}follow_every = \"1s\"\n{GOOD}")),
            no_env(),
        )
        .unwrap();
        assert_eq!(
            c.state.postgres.unwrap().follow_every,
            Duration::from_secs(1)
        );
    }

    #[test]
    fn a_postgres_url_with_a_password_is_refused_without_repeating_it() {
        for backend in ["postgres", "redb"] {
            for url in [
                "postgres://u:s3cret@127.0.0.1/db",
                "postgresql://u:s3cret@127.0.0.1:5432/db",
                "postgres://u@127.0.0.1/db?password=s3cret",
                "postgres://u:@127.0.0.1/db",
            ] {
                let p = state_problems(&format!(
                    "[state]\nbackend = \"{backend}\"\n[state.postgres]\nurl = \"{url}\""
                ));
                assert_eq!(p.len(), 1, "{url}: {p:?}");
                assert_eq!(p[0].key, "state.postgres.url", "{url}: {p:?}");
                assert!(p[0].reason.contains("password_file"), "{url}: {p:?}");
                assert!(!p[0].reason.contains("s3cret"), "{url}: {p:?}");
            }
        }
    }

    #[test]
    fn bad_postgres_settings_are_named_by_their_keys() {
        let pg = "[state]\nbackend = \"postgres\"\n[state.postgres]\n";
        let url = "url = \"postgres://u@127.0.0.1/db\"\n";
        for (extra, key) in [
            ("url = \"mysql://u@127.0.0.1/db\"", "state.postgres.url"),
            ("url = \"host=127.0.0.1 user=u\"", "state.postgres.url"),
            ("url = \"postgres://127.0.0.1/db\"", "state.postgres.url"),
            ("url = \"postgres://u@/db\"", "state.postgres.url"),
            (
                "url = \"postgres://u@127.0.0.1:x/db\"",
                "state.postgres.url",
            ),
            (
                "url = \"postgres://u@127.0.0.1/db?bogus=1\"",
                "state.postgres.url",
            ),
            (&format!("{url}pool_size = 0"), "state.postgres.pool_size"),
            (&format!("{url}pool_size = 65"), "state.postgres.pool_size"),
            (
                &format!("{url}connect_timeout = \"0s\""),
                "state.postgres.connect_timeout",
            ),
            (
                &format!("{url}connect_timeout = \"5\""),
                "state.postgres.connect_timeout",
            ),
            (
                &format!("{url}statement_timeout = \"0s\""),
                "state.postgres.statement_timeout",
            ),
            (
                &format!("{url}statement_timeout = \"2h\""),
                "state.postgres.statement_timeout",
            ),
            (
                &format!("{url}follow_every = \"5ms\""),
                "state.postgres.follow_every",
            ),
            (
                &format!("{url}follow_every = \"2m\""),
                "state.postgres.follow_every",
            ),
            (
                &format!("{url}follow_every = \"250\""),
                "state.postgres.follow_every",
            ),
            (
                &format!("{url}password_file = \"nowhere\""),
                "state.postgres.password_file",
            ),
            (
                &format!("{url}passwd_file = \"pw\""),
                "state.postgres.passwd_file",
            ),
        ] {
            let p = state_problems(&format!("{pg}{extra}"));
            assert_eq!(p.len(), 1, "{extra}: {p:?}");
            assert_eq!(p[0].key, key, "{extra}: {p:?}");
        }
        // The bounds hold with redb too: the table is ready when the backend is switched.
        let p = state_problems(&format!("[state.postgres]\n{url}pool_size = 0"));
        assert_eq!(p[0].key, "state.postgres.pool_size", "{p:?}");
    }

    /// ISRG Root X2 (Let's Encrypt's ECDSA root): a real CA certificate for `ca_file`.
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\n\
MIICGzCCAaGgAwIBAgIQQdKd0XLq7qeAwSxs6S+HUjAKBggqhkjOPQQDAzBPMQsw\n\
CQYDVQQGEwJVUzEpMCcGA1UEChMgSW50ZXJuZXQgU2VjdXJpdHkgUmVzZWFyY2gg\n\
R3JvdXAxFTATBgNVBAMTDElTUkcgUm9vdCBYMjAeFw0yMDA5MDQwMDAwMDBaFw00\n\
MDA5MTcxNjAwMDBaME8xCzAJBgNVBAYTAlVTMSkwJwYDVQQKEyBJbnRlcm5ldCBT\n\
ZWN1cml0eSBSZXNlYXJjaCBHcm91cDEVMBMGA1UEAxMMSVNSRyBSb290IFgyMHYw\n\
EAYHKoZIzj0CAQYFK4EEACIDYgAEzZvVn4CDCuwJSvMWSj5cz3es3mcFDR0HttwW\n\
+1qLFNvicWDEukWVEYmO6gbf9yoWHKS5xcUy4APgHoIYOIvXRdgKam7mAHf7AlF9\n\
ItgKbppbd9/w+kHsOdx1ymgHDB/qo0IwQDAOBgNVHQ8BAf8EBAMCAQYwDwYDVR0T\n\
AQH/BAUwAwEB/zAdBgNVHQ4EFgQUfEKWrt5LSDv6kviejM9ti6lyN5UwCgYIKoZI\n\
zj0EAwMDaAAwZQIwe3lORlCEwkSHRhtFcP9Ymd70/aTSVaYgLXTWNLxBo1BfASdW\n\
tL4ndQavEi51mI38AjEAi/V3bNTIZargCyzuFJ0nN6T5U6VR5CmD1/iQMVtCnwr1\n\
/q4AaOeMSQ+2b1tbFfLn\n\
-----END CERTIFICATE-----\n";

    #[test]
    fn tls_defaults_to_off_only_where_nothing_crosses_a_network() {
        for (url, tls) in [
            ("postgres://u@127.0.0.1/db", PgTls::Off),
            ("postgres://u@127.0.0.2:5433/db", PgTls::Off),
            ("postgres://u@localhost/db", PgTls::Off),
            ("postgres://u@[::1]/db", PgTls::Off),
            ("postgres://u@%2Fvar%2Frun%2Fpostgresql/db", PgTls::Off),
            ("postgres://u@db.example/db", PgTls::VerifyFull),
            ("postgres://u@10.0.0.5/db", PgTls::VerifyFull),
            ("postgres://u@localhost,db.example/db", PgTls::VerifyFull),
            (
                "postgres://u@localhost/db?hostaddr=10.0.0.5",
                PgTls::VerifyFull,
            ),
        ] {
            let toml =
                format!("[state]\nbackend = \"postgres\"\n[state.postgres]\nurl = \"{url}\"\n");
            let d = tempfile::tempdir().unwrap();
            let c = Config::load_with_env(&write(d.path(), &format!("{toml}{GOOD}")), no_env())
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            let pg = c.state.postgres.as_ref().unwrap();
            assert_eq!(pg.tls, tls, "{url}");
            assert!(!pg.in_clear_over_network(), "{url}");
            // The effective config says what was resolved.
            let printed = c.effective_toml();
            let line = format!(
                "tls = \"{}\"",
                if tls == PgTls::Off {
                    "off"
                } else {
                    "verify-full"
                }
            );
            assert!(printed.contains(&line), "{url}: {line} not in\n{printed}");
        }
        // Chosen, it is kept; off across a network is allowed, and said.
        for (url, tls, clear) in [
            ("postgres://u@127.0.0.1/db", "require", false),
            ("postgres://u@db.example/db", "off", true),
            ("postgres://u@db.example/db", "require", false),
        ] {
            let toml = format!(
                "[state]\nbackend = \"postgres\"\n[state.postgres]\nurl = \"{url}\"\ntls = \"{tls}\"\n"
            );
            let d = tempfile::tempdir().unwrap();
            let c = Config::load_with_env(&write(d.path(), &format!("{toml}{GOOD}")), no_env())
                .unwrap();
            let pg = c.state.postgres.unwrap();
            assert_eq!(
                toml::Value::try_from(pg.tls).unwrap().as_str(),
                Some(tls),
                "{url}"
            );
            assert_eq!(pg.in_clear_over_network(), clear, "{url} {tls}");
        }
    }

    #[test]
    fn a_ca_file_is_read_at_load_and_only_with_verify_full() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("pg-ca.pem"), CA_PEM).unwrap();
        let toml = "[state]\nbackend = \"postgres\"\n[state.postgres]\n\
                    url = \"postgres://u@db.example/db\"\ntls = \"verify-full\"\n\
                    ca_file = \"pg-ca.pem\"\n";
        let c =
            Config::load_with_env(&write(d.path(), &format!("{toml}{GOOD}")), no_env()).unwrap();
        let pg = c.state.postgres.as_ref().unwrap();
        assert_eq!(pg.ca_file, Some(d.path().join("pg-ca.pem")));
        assert_eq!(read_ca_file(pg.ca_file.as_ref().unwrap()).unwrap().len(), 1);
        // Printed resolved, as password_file is: it loads back the same from anywhere.
        let line = format!("ca_file = \"{}\"", d.path().join("pg-ca.pem").display());
        assert!(c.effective_toml().contains(&line), "{}", c.effective_toml());
    }

    #[test]
    fn bad_tls_settings_are_named_by_their_keys() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("not-a-cert"), "hello\n").unwrap();
        let pg = "[state]\nbackend = \"postgres\"\n[state.postgres]\n";
        let url = "url = \"postgres://u@db.example/db\"\n";
        let not_a_cert = d.path().join("not-a-cert");
        for (extra, key) in [
            (format!("{url}tls = \"on\""), "state.postgres.tls"),
            (format!("{url}tls = \"verify-ca\""), "state.postgres.tls"),
            (
                "url = \"postgres://u@db.example/db?sslmode=require\"".to_string(),
                "state.postgres.url",
            ),
            (
                "url = \"postgres://u@db.example/db?application_name=x&sslmode=disable\""
                    .to_string(),
                "state.postgres.url",
            ),
            (
                format!("{url}tls = \"verify-full\"\nca_file = \"nowhere.pem\""),
                "state.postgres.ca_file",
            ),
            (
                format!(
                    "{url}tls = \"verify-full\"\nca_file = \"{}\"",
                    not_a_cert.display()
                ),
                "state.postgres.ca_file",
            ),
            // Only verify-full reads it: elsewhere it would be ignored, silently.
            (
                format!("{url}tls = \"require\"\nca_file = \"pg-ca.pem\""),
                "state.postgres.ca_file",
            ),
            (
                format!("{url}ca_file = \"pg-ca.pem\""),
                "state.postgres.ca_file",
            ),
        ] {
            let p = state_problems(&format!("{pg}{extra}"));
            assert_eq!(p.len(), 1, "{extra}: {p:?}");
            assert_eq!(p[0].key, key, "{extra}: {p:?}");
        }
    }

    #[test]
    fn the_postgres_password_comes_from_its_file() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("pg-pw"), "pg pass'word\n").unwrap();
        let toml = "[state]\nbackend = \"postgres\"\n[state.postgres]\n\
                    url = \"postgres://sendwell@db.example:5433/sw\"\npassword_file = \"pg-pw\"\n\
                    connect_timeout = \"2s\"\n";
        let c =
            Config::load_with_env(&write(d.path(), &format!("{toml}{GOOD}")), no_env()).unwrap();
        let pg = c.state.postgres.unwrap();
        assert_eq!(pg.password_file, Some(d.path().join("pg-pw")));
        assert!(!format!("{pg:?}").contains("pass'word"));
        // The line's end is trimmed; the rest is the password.
        assert_eq!(
            pg.password.as_ref().map(|p| p.expose()),
            Some("pg pass'word")
        );
        assert_eq!(pg.url, "postgres://sendwell@db.example:5433/sw");
        assert_eq!(pg.connect_timeout, Duration::from_secs(2));
    }

    #[test]
    fn a_redacted_password_is_refused_unless_a_password_file_replaces_it() {
        let d = tempfile::tempdir().unwrap();
        let url = "[broker]\nurl = \"amqp://u:***@127.0.0.1:5672/%2f\"\n";
        let e =
            Config::load_with_env(&write(d.path(), &format!("{url}{GOOD}")), no_env()).unwrap_err();
        assert_eq!(e.problems[0].key, "broker.url", "{e}");
        std::fs::write(d.path().join("pw"), "real\n").unwrap();
        let toml = format!("{url}password_file = \"pw\"\n{GOOD}");
        let c = Config::load_with_env(&write(d.path(), &toml), no_env()).unwrap();
        assert_eq!(c.broker.url.expose(), "amqp://u:real@127.0.0.1:5672/%2f");
    }

    #[test]
    fn durations_print_in_the_largest_exact_unit_and_parse_back() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(7 * 86400), "7d"),
            (Duration::from_secs(48 * 3600), "2d"),
            (Duration::from_secs(36 * 3600), "36h"),
            (Duration::from_secs(90 * 60), "90m"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_micros(1500), "1500us"),
            (Duration::from_nanos(86_400_000_000_001), "86400000000001ns"),
        ] {
            assert_eq!(duration::format(d), text);
            assert_eq!(humantime::parse_duration(text), Ok(d), "{text}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error type.
    fn environment_overrides_a_key() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), GOOD);
        // figment's Jail isolates the process environment for this test.
        figment::Jail::expect_with(|jail| {
            jail.set_env("SENDWELL_BROKER__PREFETCH", "7");
            jail.set_env("SENDWELL_CONFIG", "/ignored");
            let c = Config::load(&p);
            assert_eq!(c.map(|c| c.broker.prefetch).ok(), Some(7));
            Ok(())
        });
    }
}
