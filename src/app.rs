//! Wiring: opens the state, binds the listeners, starts the broker session, and tears it all
//! down in order on shutdown (stop consuming → finish in-flight jobs → close the broker → stop
//! the listeners). Config is validated before this runs; nothing here reads the environment.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::amqp::consumer::Worker;
use crate::amqp::topology::{Names, TopologyError};
use crate::clock::SystemClock;
use crate::cloud_api::CloudApi;
use crate::config::{Config, StateBackend};
use crate::consent::flow::ConsentFlow;
use crate::consent::{ConsentStore, EventDecoder};
use crate::http::Readiness;
use crate::instances::{Heartbeats, Instance};
use crate::pipeline::accounts::Accounts;
use crate::pipeline::decode::Decoder;
use crate::pipeline::meta_state::MetaState;
use crate::pipeline::{Pipeline, WebhookPolicy};
use crate::sandbox::{Sandbox, SandboxConfig, SandboxHandle};
use crate::store::postgres::follow::FollowHandle;
use crate::store::{Ledger, LedgerError};
use crate::webhook::apply::Applier;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    State(#[from] LedgerError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Broker(#[from] TopologyError),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot write the admin token {path}: {source}")]
    AdminToken {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the state store could not be written for {0} (state.unwritable_grace); exiting so the supervisor restarts the daemon"
    )]
    StoreUnwritable(String),
    /// The consent cache could not follow the database for so long that it may have missed
    /// changes (see `store::postgres::follow`): a restart loads it whole.
    #[error("{0}; exiting so the supervisor restarts the daemon")]
    ConsentFellBehind(String),
    /// Shutdown was asked for while the daemon still waited for its state store at start: a
    /// clean stop (exit 0), not a failure.
    #[error("stopped before the state store could be opened")]
    StoppedWhileWaiting,
}

impl AppError {
    /// sysexits: 73 can't create (state), 69 unavailable (ports, broker set-up), 70 software,
    /// 78 configuration (a state database migrated by a newer sendwell); 0 for a stop asked for
    /// while waiting for the state store.
    pub fn exit_code(&self) -> i32 {
        match self {
            AppError::State(LedgerError::SchemaTooNew { .. }) => 78,
            AppError::State(_) | AppError::AdminToken { .. } => 73,
            AppError::Bind { .. } | AppError::Broker(_) => 69,
            AppError::Http(_) | AppError::Internal(_) => 70,
            AppError::Config(_) => 64,
            // EX_IOERR.
            AppError::StoreUnwritable(_) => 74,
            // EX_TEMPFAIL: the restart fixes it.
            AppError::ConsentFellBehind(_) => 75,
            AppError::StoppedWhileWaiting => 0,
        }
    }
}

/// A started daemon: where it listens, and how to wait for it.
pub struct RunningApp {
    pub admin_addr: SocketAddr,
    /// The webhook listener, when `webhook.enabled`.
    pub webhook_addr: Option<SocketAddr>,
    /// The in-process sandbox, when `sandbox.enabled`.
    pub sandbox: Option<(SocketAddr, SandboxHandle)>,
    pub readiness: Arc<Readiness>,
    pub ledger: Ledger,
    /// Catches the consent cache up with the database (a takeover asks it to; at once on redb).
    pub consent_follow: FollowHandle,
    /// This process as an instance of its shard: its role, and where takeover hooks register.
    pub instance: Arc<Instance>,
    /// For the status line (paused accounts) and for reloads.
    pipeline: Arc<Pipeline>,
    /// For reloads of the consent keywords and replies.
    flow: Arc<ConsentFlow>,
    /// The config running now, to tell what a reload changes.
    config: Arc<std::sync::Mutex<Config>>,
    join: JoinHandle<Result<(), AppError>>,
}

/// Applies a reloaded config to a running daemon (SIGHUP); cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    pipeline: Arc<Pipeline>,
    /// Keywords and replies of the consent conversation.
    flow: Arc<ConsentFlow>,
    config: Arc<std::sync::Mutex<Config>>,
}

impl RunningApp {
    /// The pipeline, for what runs beside the consumer: the instance hooks' takeover and
    /// shard changes ([`Pipeline::takeover`], [`Pipeline::shards_changed`]), and tests.
    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    pub fn reloader(&self) -> Reloader {
        Reloader {
            pipeline: self.pipeline.clone(),
            flow: self.flow.clone(),
            config: self.config.clone(),
        }
    }
}

impl Reloader {
    /// Applies what can change safely in a running daemon (SIGHUP), without dropping anything
    /// in flight or any count:
    /// - per account: `messages_per_second`, `burst`, `quiet_hours`, and the consent keywords,
    ///   replies, START purposes, double opt-in message and marketing footer;
    /// - `[[caps]]` (the new caps take over the counts of the caps they keep), the portfolios'
    ///   `messaging_limit`, `limits.country_zones`;
    /// - the price table.
    ///
    /// Everything else that differs is named in the log as needing a restart, and keeps
    /// running as before.
    pub fn reload(&self, new: Config) {
        let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let (mut applied, mut restart) = self.pipeline.limits.reload(&current, &new);
        if format!("{:?}", current.prices) != format!("{:?}", new.prices) {
            self.pipeline.spend.shared_prices().set(new.prices.clone());
            applied.push("prices".into());
        }
        for a in &new.accounts {
            if let Some(rt) = self.pipeline.accounts.get(&a.name)
                && rt.marketing_footer().as_deref() != a.consent.marketing_footer.as_deref()
            {
                rt.set_marketing_footer(a.consent.marketing_footer.as_deref());
                applied.push(format!("{}: marketing_footer", a.name));
            }
        }
        for name in self.flow.reload(&new) {
            applied.push(format!("{name}: consent keywords and replies"));
        }
        let same =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
        for (name, differs) in [
            ("broker", !same(&current.broker, &new.broker)),
            ("state", !same(&current.state, &new.state)),
            ("cloud_api", !same(&current.cloud_api, &new.cloud_api)),
            ("sandbox", !same(&current.sandbox, &new.sandbox)),
            ("retry", !same(&current.retry, &new.retry)),
            ("admin", !same(&current.admin, &new.admin)),
            ("log", !same(&current.log, &new.log)),
            ("webhook", !same(&current.webhook, &new.webhook)),
            ("consent", !same(&current.consent, &new.consent)),
            ("purposes", !same(&current.purposes, &new.purposes)),
        ] {
            if differs {
                restart.push(name.to_string());
            }
        }
        let names = |c: &Config| {
            c.accounts
                .iter()
                .map(|a| a.name.to_string())
                .collect::<Vec<_>>()
        };
        if names(&current) != names(&new) {
            restart.push("accounts (added or removed)".into());
        }
        for (old, a) in current.accounts.iter().zip(&new.accounts) {
            let mut o = old.clone();
            take_reloadable(&mut o, a);
            if o.name == a.name && !same(&o, a) {
                restart.push(format!(
                    "accounts.{} (other than rates, quiet hours, keywords, replies, footer)",
                    a.name
                ));
            }
        }
        tracing::info!(applied = %applied.join(", "), "Config reloaded.");
        if !restart.is_empty() {
            tracing::warn!(keys = %restart.join("; "), "These changed settings take effect only after a restart.");
        }
        // What was applied is now the running config; the rest still runs as before.
        current.prices = new.prices.clone();
        if !restart.iter().any(|r| r.starts_with("caps")) {
            current.limits.caps = new.limits.caps.clone();
        }
        if !restart.iter().any(|r| r.starts_with("portfolios")) {
            current.limits.portfolios = new.limits.portfolios.clone();
        }
        if !restart.iter().any(|r| r.starts_with("quiet hours")) {
            current.limits.country_zones = new.limits.country_zones.clone();
        }
        for (c, n) in current.accounts.iter_mut().zip(&new.accounts) {
            if c.name == n.name {
                take_reloadable(c, n);
            }
        }
    }
}

/// Copies what [`Reloader::reload`] applies of an account from `new` into `into`.
fn take_reloadable(into: &mut crate::config::Account, new: &crate::config::Account) {
    into.messages_per_second = new.messages_per_second;
    into.burst = new.burst;
    into.quiet_hours = new.quiet_hours.clone();
    let (c, n) = (&mut into.consent, &new.consent);
    c.opt_out_keywords = n.opt_out_keywords.clone();
    c.opt_in_keywords = n.opt_in_keywords.clone();
    c.yes_keywords = n.yes_keywords.clone();
    c.no_keywords = n.no_keywords.clone();
    c.opt_out_reply = n.opt_out_reply.clone();
    c.start_purposes = n.start_purposes.clone();
    c.double_opt_in = n.double_opt_in.clone();
    c.marketing_footer = n.marketing_footer.clone();
}

impl RunningApp {
    /// How many accounts are paused now, as a function the status line can call later.
    pub fn paused_accounts(&self) -> impl Fn() -> usize + Send + Sync + 'static {
        let p = self.pipeline.clone();
        move || p.accounts.paused_count()
    }

    /// Resolves when the daemon has stopped (after `shutdown` or a fatal broker problem).
    pub async fn wait(self) -> Result<(), AppError> {
        match self.join.await {
            Ok(r) => r,
            // A panic must not look like a clean stop: systemd restarts on failure only.
            Err(e) => Err(AppError::Internal(format!(
                "the daemon's main task failed: {e}"
            ))),
        }
    }
}

/// The process-wide Prometheus recorder (the `metrics` facade has one global recorder).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(crate::metrics::API_LATENCY.to_string()),
                    crate::metrics::LATENCY_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::metrics::LIMIT_WAIT.to_string()),
                        crate::metrics::WAIT_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::metrics::JOB_AGE.to_string()),
                        crate::metrics::AGE_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::metrics::STORE_COMPACTION_HELD.to_string()),
                        crate::metrics::HELD_BUCKETS,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let handle = match builder.install_recorder() {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "A metrics recorder was already installed; /metrics will be empty.");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            };
            crate::metrics::describe();
            handle
        })
        .clone()
}

/// Waits between attempts to open a PostgreSQL store that cannot be reached at start: doubling
/// from the first to the last, then the last for as long as it takes.
const START_RETRY_FIRST: Duration = Duration::from_millis(500);
const START_RETRY_MAX: Duration = Duration::from_secs(30);

/// Doubling waits, capped.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Self {
        Backoff { next: first, max }
    }

    /// The wait before the next attempt.
    fn next_wait(&mut self) -> Duration {
        let wait = self.next.min(self.max);
        self.next = (wait * 2).min(self.max);
        wait
    }
}

/// Opens the state store for the daemon. A PostgreSQL database that cannot be reached
/// ([`LedgerError::Io`]: connection refused or timed out, a host name that does not resolve,
/// 08xxx, 53xxx such as too many connections, 57P01–57P03 shutting down or starting up, 25006
/// a standby not yet promoted) is waited for, with doubling waits up to
/// [`START_RETRY_MAX`], until it answers or shutdown is asked for: a database that comes back
/// after a minute must not leave the daemon dead (under systemd, quick exits would use up the
/// unit's start limit). Meanwhile the admin listener is bound into `admin`, answering
/// `/healthz` and `/readyz` (503, saying why), and systemd's status line says what the start
/// waits for; READY comes only after the store is open. Every other error is permanent and
/// returned at once: authentication (28P01, 28000), a database or role that does not exist
/// (3D000), a schema newer than this binary (exit 78), a bad URL, an unusable state
/// directory. redb errors are always returned at once.
async fn open_store(
    config: &Config,
    shutdown: &CancellationToken,
    admin: &mut Option<AdminServer>,
    metrics: &PrometheusHandle,
) -> Result<Ledger, AppError> {
    let mut backoff = Backoff::new(START_RETRY_FIRST, START_RETRY_MAX);
    // One line per reason per longest wait: the first failure at once, then about one line per
    // attempt once the waits are long, not one per quick early attempt.
    let log = crate::log_every::LogEvery::new(START_RETRY_MAX, Arc::new(SystemClock));
    let why: Arc<std::sync::Mutex<String>> = Arc::default();
    let started = std::time::Instant::now();
    let mut attempts = 0u64;
    loop {
        let opened = tokio::select! {
            r = Ledger::open_state(&config.state, false) => r,
            _ = shutdown.cancelled() => return Err(AppError::StoppedWhileWaiting),
        };
        let error = match opened {
            Ok(ledger) => {
                if attempts > 0 {
                    tracing::info!(
                        attempts = attempts + 1,
                        waited_s = started.elapsed().as_secs(),
                        "PostgreSQL answers: the state store is open; starting."
                    );
                    *why.lock().unwrap_or_else(|e| e.into_inner()) = "loading the state".into();
                    crate::notify::status("loading the state");
                }
                return Ok(ledger);
            }
            Err(LedgerError::Io(e)) if config.state.backend == StateBackend::Postgres => e,
            // A command-line tool has the database alone (`state migrate`, an offline
            // erasure): it ends soon; waiting beats exits that use up systemd's start limit.
            Err(LedgerError::InUse) if config.state.backend == StateBackend::Postgres => {
                "a sendwell command-line tool has the state database alone".to_string()
            }
            Err(e) => return Err(e.into()),
        };
        attempts += 1;
        let wait = backoff.next_wait();
        let line = format!(
            "waiting for PostgreSQL (attempt {attempts}, next in {}): {error}",
            humantime::format_duration(wait)
        );
        *why.lock().unwrap_or_else(|e| e.into_inner()) = line.clone();
        crate::notify::status(&line);
        crate::metrics::store_writable(false);
        if let Some(unlogged) = log.check(&error) {
            tracing::warn!(
                error = %error,
                attempts,
                unlogged,
                retry_in = %humantime::format_duration(wait),
                "PostgreSQL cannot be reached: the daemon waits for it and starts once it answers."
            );
        }
        if admin.is_none() {
            *admin = Some(
                AdminServer::bind(
                    config,
                    crate::http::waiting_router(metrics.clone(), why.clone()),
                )
                .await?,
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Err(AppError::StoppedWhileWaiting),
        }
    }
}

/// The admin listener, bound and answering from the moment it is needed (see [`open_store`]):
/// first with start-up routes, then, from [`AdminServer::serve`], with all of them.
struct AdminServer {
    addr: SocketAddr,
    routes: Arc<OnceLock<axum::Router>>,
    task: Option<JoinHandle<()>>,
    stop: CancellationToken,
}

impl AdminServer {
    /// Binds `admin.listen` and answers with `early` until [`AdminServer::serve`].
    async fn bind(config: &Config, early: axum::Router) -> Result<AdminServer, AppError> {
        let bind_error = |source| AppError::Bind {
            what: "admin",
            addr: config.admin.listen,
            source,
        };
        let listener = tokio::net::TcpListener::bind(config.admin.listen)
            .await
            .map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let routes: Arc<OnceLock<axum::Router>> = Arc::default();
        let router = crate::http::handover_router(early, routes.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            // The consent endpoints decide by the peer's address.
            let r = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { stopped.cancelled().await })
            .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "Admin listener failed.");
            }
        });
        Ok(AdminServer {
            addr,
            routes,
            task: Some(task),
            stop,
        })
    }

    /// Answers with `router` from now on; returns the serving task and what stops it.
    fn serve(mut self, router: axum::Router) -> (JoinHandle<()>, CancellationToken) {
        let _ = self.routes.set(router);
        let task = self.task.take().expect("served once");
        (task, self.stop.clone())
    }
}

impl Drop for AdminServer {
    /// A start that fails after binding stops the listener too.
    fn drop(&mut self) {
        if self.task.is_some() {
            self.stop.cancel();
        }
    }
}

/// Starts everything; returns once listeners are bound and the state is open (after waiting
/// for PostgreSQL, if it cannot be reached yet: see [`open_store`]).
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<RunningApp, AppError> {
    let running_config = config.clone();
    crate::privacy::set_masking(config.log.mask_numbers);
    let metrics = metrics_handle();
    if config
        .state
        .postgres
        .as_ref()
        .is_some_and(|pg| pg.in_clear_over_network())
    {
        tracing::warn!(
            "state.postgres.tls = \"off\" for a database across a network: the state, phone numbers among it, travels unencrypted."
        );
    }
    // Bound here only when the daemon has to wait for PostgreSQL, so that /healthz and /readyz
    // answer meanwhile; else further down, where it always was.
    let mut admin = None;
    let ledger = open_store(&config, &shutdown, &mut admin, &metrics).await?;
    // A store that cannot be written (full disk) holds its writes and the pipeline waits, for
    // this long; then the daemon gives up (see the watch below).
    let unwritable_grace = config.state.unwritable_grace;
    ledger.health().set_hold(unwritable_grace);
    crate::health::set_store_grace(unwritable_grace);
    crate::metrics::store_writable(true);
    let instance = Instance::new(config.broker.shard);
    let readiness = Arc::new(Readiness {
        store_unwritable: ledger.health().unwritable_flag(),
        instance: Some(instance.clone()),
        ..Readiness::default()
    });
    let meta = MetaState::load(ledger.clone()).await?;
    let started = std::time::Instant::now();
    let consent = ConsentStore::load(ledger.clone(), &config).await?;
    crate::metrics::consent_cache_entries(consent.cached_entries());
    tracing::info!(
        entries = consent.cached_entries(),
        wa_ids = consent.wa_id_entries(),
        took_ms = started.elapsed().as_millis() as u64,
        "Consent loaded."
    );
    // From here on, what other instances change in consent comes into the cache (PostgreSQL
    // only). It follows until the broker session has ended (or this start fails: the guard).
    let follow_stop = CancellationToken::new();
    let follow_guard = follow_stop.clone().drop_guard();
    let follow_every = config
        .state
        .postgres
        .as_ref()
        .map_or(Duration::from_millis(250), |p| p.follow_every);
    let (consent_follow, follow_task) = consent.follow(follow_every, follow_stop);
    let fell_behind: Arc<OnceLock<String>> = Arc::default();
    let follow_watch = follow_task.map(|task| {
        let (stop, behind) = (shutdown.clone(), fell_behind.clone());
        tokio::spawn(async move {
            let why = match task.await {
                Ok(Err(e)) => e.to_string(),
                Err(e) if e.is_panic() => "the consent follower panicked".to_string(),
                _ => return,
            };
            tracing::error!(error = %why, "The consent cache cannot follow the database: stopping.");
            let _ = behind.set(why);
            stop.cancel();
        })
    });
    let limits = Arc::new(crate::pipeline::limits::Limits::new(&config)?);
    limits.load(&ledger, jiff::Timestamp::now()).await?;
    let account_names: Arc<[Arc<str>]> = config.accounts.iter().map(|a| a.name.clone()).collect();
    let (share_limits, share_names) = (limits.clone(), account_names.clone());
    instance.report_shares(Box::new(move || {
        share_names
            .iter()
            .filter_map(|a| Some((a.clone(), share_limits.throughput(a)?.share())))
            .collect()
    }));
    let spend = Arc::new(crate::pipeline::spend::Spend::new(&config, ledger.clone()));
    spend.load(&ledger, jiff::Timestamp::now()).await?;
    readiness.state.store(true, Ordering::SeqCst);

    // Before the listener answers: the consent endpoints need it, and the tools read it.
    let admin_token = match &config.admin.token {
        crate::config::AdminToken::File(t) => t.clone(),
        // In the state directory the store just opened (and created): where the tools look.
        crate::config::AdminToken::Generated(_) => {
            let path = config.state.dir.join(crate::config::GENERATED_ADMIN_TOKEN);
            crate::http::auth::write_generated(&path)
                .map_err(|source| AppError::AdminToken { path, source })?
        }
    };
    let admin = match admin {
        Some(a) => a,
        None => {
            AdminServer::bind(
                &config,
                crate::http::router(metrics.clone(), readiness.clone()),
            )
            .await?
        }
    };
    let admin_addr = admin.addr;

    // The webhook listener binds before the sandbox, which may be told to call it.
    let webhook = match (&config.webhook.app_secret, &config.webhook.verify_token) {
        (Some(secret), Some(token)) if config.webhook.enabled => {
            let l = tokio::net::TcpListener::bind(config.webhook.listen)
                .await
                .map_err(|source| AppError::Bind {
                    what: "webhook",
                    addr: config.webhook.listen,
                    source,
                })?;
            let addr = l.local_addr().map_err(|source| AppError::Bind {
                what: "webhook",
                addr: config.webhook.listen,
                source,
            })?;
            let listener = Arc::new(crate::webhook::Listener {
                app_secret: secret.clone(),
                verify_token: token.clone(),
                sink: crate::webhook::BrokerSink::new(
                    config.broker.url.clone(),
                    crate::webhook::SinkLimits::from_config(&config),
                ),
                // The same store the pipeline learns WhatsApp IDs into: a send's answer is known
                // to the listener at once.
                numbers: Some(consent.clone()),
            });
            Some((l, addr, listener))
        }
        _ => None,
    };
    let webhook_addr = webhook.as_ref().map(|w| w.1);

    let mut sandbox = None;
    let api = if config.sandbox.enabled {
        let sb = Sandbox::bind(
            config.sandbox.listen,
            SandboxConfig {
                latency: config.sandbox.latency,
                // The whole loop runs locally: the sandbox calls our own webhook listener.
                webhook_url: webhook_addr.map(|a| format!("http://{a}/webhook")),
                app_secret: config
                    .webhook
                    .app_secret
                    .as_ref()
                    .map(|s| s.expose().to_string()),
                ..SandboxConfig::default()
            },
        )
        .await
        .map_err(|source| AppError::Bind {
            what: "sandbox",
            addr: config.sandbox.listen,
            source,
        })?;
        let addr = sb.local_addr();
        sandbox = Some((addr, sb.handle()));
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = sb.serve(token).await {
                tracing::error!(error = %e, "The built-in sandbox stopped.");
            }
        });
        tracing::warn!(%addr, "The built-in sandbox stands in for the Cloud API: nothing reaches WhatsApp.");
        CloudApi::with_base_url(&config.cloud_api, &format!("http://{addr}"))?
    } else {
        CloudApi::new(&config.cloud_api)?
    };

    let pipeline = Arc::new(Pipeline {
        ledger: ledger.clone(),
        api,
        accounts: Accounts::new(&config.accounts, config.retry.account_pause_probe),
        retry: config.retry.clone(),
        clock: Arc::new(SystemClock),
        meta: meta.clone(),
        webhook_policy: webhook.as_ref().map(|_| WebhookPolicy {
            service_window: config.webhook.service_window,
            template_pause_max_wait: config.webhook.template_pause_max_wait,
        }),
        consent: consent.clone(),
        limits: limits.clone(),
        spend: spend.clone(),
        shard: config.broker.shard,
    });
    // Gauges that are cheaper to compute now and then than on every change: the consent
    // census, the rolling spend (it ages out without sends); and the spend rows that left the day.
    let census_stop = shutdown.clone();
    let (census_consent, census_spend, census_ledger) =
        (consent.clone(), spend.clone(), ledger.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = census_stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (c, s, l) = (
                census_consent.clone(),
                census_spend.clone(),
                census_ledger.clone(),
            );
            let census = tokio::task::spawn_blocking(move || c.census()).await;
            if let Ok((consents, opt_outs)) = census {
                crate::metrics::consent_numbers(consents, opt_outs);
            }
            match s.housekeep(&l, jiff::Timestamp::now()).await {
                Ok(ops) if !ops.is_empty() => {
                    if let Err(e) = census_ledger.kv_many(ops).await {
                        tracing::warn!(error = %e, "Purging old spend rows failed; will try again.");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Spend housekeeping failed; will try again.")
                }
                _ => {}
            }
        }
    });
    tokio::spawn(limits.clone().housekeeping(
        ledger.clone(),
        Arc::new(SystemClock),
        shutdown.clone(),
    ));
    let flow = Arc::new(ConsentFlow::new(&config, consent.clone()));
    let mut applier = Applier::new(&config, ledger.clone(), meta);
    applier.consent = Some(flow.clone());
    applier.limits = Some(limits.clone());
    applier.prices = spend.shared_prices();
    let names = Names::new(config.broker.shard);
    let worker = Arc::new(Worker::new(
        pipeline.clone(),
        Decoder::new(&config),
        applier,
        (flow.clone(), EventDecoder::new(&config)),
        names,
        crate::amqp::provenance::Identity::from_url(config.broker.url.expose()),
        shutdown.clone(),
    ));

    let (admin_task, admin_shutdown) = admin.serve(crate::http::router_with_consent(
        metrics.clone(),
        readiness.clone(),
        consent.clone(),
        config.state.dir.clone(),
        admin_token,
    ));

    let webhook_task = webhook.map(|(l, addr, listener)| {
        let router = crate::webhook::router(listener, config.webhook.max_body_bytes);
        let stop = admin_shutdown.clone();
        tracing::info!(%addr, "Webhook listener ready.");
        tokio::spawn(async move {
            let r = axum::serve(l, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "Webhook listener failed.");
            }
        })
    });

    let upkeep_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = upkeep_stop.cancelled() => return,
                _ = tick.tick() => metrics.run_upkeep(),
            }
        }
    });
    tokio::spawn(
        ledger
            .clone()
            .purge_loop(config.state.ledger_retention, shutdown.clone()),
    );
    tokio::spawn(consent.clone().compactor(shutdown.clone()));
    let final_compaction = consent.clone();
    let tombstones = config.consent.erase_tombstone_retention;
    let purge_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = purge_stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let cutoff = jiff::Timestamp::now().as_millisecond() - tombstones.as_millis() as i64;
            if let Err(e) = consent.purge_tombstones(cutoff).await {
                tracing::warn!(error = %e, "Purging erasure tombstones failed; will try again.");
            }
        }
    });

    // Past the grace a store that still cannot be written needs an operator (or a restart): stop,
    // and exit non-zero so the supervisor restarts the daemon.
    let gave_up: Arc<OnceLock<Duration>> = Arc::default();
    let (store_health, store_stop, store_gave_up) =
        (ledger.health().clone(), shutdown.clone(), gave_up.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = store_stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Some(down) = store_health.unwritable_for()
                && down >= unwritable_grace
            {
                tracing::error!(
                    grace = %humantime::format_duration(unwritable_grace),
                    "The state store could not be written for the whole of state.unwritable_grace: stopping; jobs not yet recorded stay unacked and come back after the restart."
                );
                let _ = store_gave_up.set(down);
                store_stop.cancel();
                return;
            }
        }
    });

    // A takeover (the first delivery of a broker session) catches this instance up with what
    // the old active wrote, before its first job: the consent cache with the database (waits
    // for as long as the database does not answer: a stale cache could message a STOP), and
    // per-recipient limit state, templates and tiers (a new epoch). Hooks run concurrently.
    let (hook_follow, hook_pipeline) = (consent_follow.clone(), pipeline.clone());
    instance.on_takeover(Box::new(move || {
        let follow = hook_follow.clone();
        Box::pin(async move {
            if follow.sync().await.is_err() {
                tracing::warn!(
                    "The consent follower stopped before the takeover could wait for it."
                );
            }
        })
    }));
    instance.on_takeover(Box::new(move || {
        let pipeline = hook_pipeline.clone();
        Box::pin(async move {
            if let Err(e) = pipeline.takeover().await {
                tracing::warn!(error = %e, "Reading templates and tiers again at the takeover failed; the old ones stay until the next takeover.");
            }
        })
    }));
    let shards_pipeline = pipeline.clone();
    instance.on_shards_changed(Box::new(move || {
        shards_pipeline.shards_changed();
        Box::pin(async {})
    }));
    // PostgreSQL: the registry row, and each account's share of its rate from the live shards.
    // The first heartbeat comes before the broker session, so the first job already goes at
    // the share (a start that cannot reach the registry goes at the whole rate until it can).
    let registry = match ledger.registry() {
        Some(registry) => {
            let (limits, names) = (limits.clone(), account_names.clone());
            let heartbeats = Heartbeats::new(
                instance.clone(),
                registry,
                Box::new(move |live_shards| {
                    for a in names.iter() {
                        if let Some(t) = limits.throughput(a) {
                            t.set_live_shards(live_shards);
                        }
                    }
                }),
            );
            instance.on_takeover(heartbeats.takeover_hook());
            heartbeats.beat().await;
            let stop = CancellationToken::new();
            Some((tokio::spawn(heartbeats.run(stop.clone())), stop))
        }
        None => None,
    };
    // PostgreSQL: daily tiers and budgets counted across the instances, through leases renewed
    // in the background (after the first heartbeat: a lease counts while its instance is live).
    let quotas = ledger
        .quotas()
        .map(|store| start_quotas(store, &instance, &limits, &spend));
    let broker_flag = readiness.broker.clone();
    let broker_cfg = config.broker.clone();
    let grace = config.shutdown.grace_period;
    let stop = shutdown.clone();
    // The spend estimate goes to the store once a second, and once more after the last job.
    let spend_stop = CancellationToken::new();
    let spend_saver = tokio::spawn(spend.clone().save_every_second(spend_stop.clone()));
    let run_instance = instance.clone();
    let join = tokio::spawn(async move {
        let result = crate::amqp::run(
            worker,
            run_instance,
            broker_cfg,
            broker_flag,
            stop.clone(),
            grace,
        )
        .await;
        stop.cancel();
        // After the drain, the last spend saved, then the leases given back, then the registry
        // row: a use is durable before its lease goes, and a lease counts while the row does.
        spend_stop.cancel();
        let _ = spend_saver.await;
        if let Some(q) = quotas {
            q.stop().await;
        }
        // After the drain: this instance's share is its own until it can no longer send.
        if let Some((task, registry_stop)) = registry {
            registry_stop.cancel();
            let _ = task.await;
        }
        drop(follow_guard);
        if let Some(w) = follow_watch {
            let _ = w.await;
        }
        // An erasure whose compaction was still waiting must not leave the number in the file.
        if let Err(e) = final_compaction.compact_if_due().await {
            tracing::warn!(error = %e, "Compacting the state store after an erasure failed.");
        }
        admin_shutdown.cancel();
        let _ = admin_task.await;
        if let Some(t) = webhook_task {
            let _ = t.await;
        }
        if let Some(why) = fell_behind.get() {
            return Err(AppError::ConsentFellBehind(why.clone()));
        }
        if let Some(down) = gave_up.get() {
            return Err(AppError::StoreUnwritable(
                humantime::format_duration(Duration::from_secs(down.as_secs())).to_string(),
            ));
        }
        result.map_err(AppError::from)
    });
    tracing::info!(admin = %admin_addr, shard = config.broker.shard, "sendwell started.");
    Ok(RunningApp {
        admin_addr,
        webhook_addr,
        sandbox,
        readiness,
        ledger,
        consent_follow,
        instance,
        pipeline,
        flow,
        config: Arc::new(std::sync::Mutex::new(running_config)),
        join,
    })
}

/// The renewal tasks of the global quotas (PostgreSQL), and what their stop needs.
struct Quotas {
    store: crate::store::postgres::quota::QuotaStore,
    me: String,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Counts every portfolio's tier and every account's budget across the instances on the
/// database (docs/design/instances.md, decision 7): one renewal task per quota.
fn start_quotas(
    store: crate::store::postgres::quota::QuotaStore,
    instance: &Instance,
    limits: &crate::pipeline::limits::Limits,
    spend: &crate::pipeline::spend::Spend,
) -> Quotas {
    use crate::store::postgres::quota::Durable;
    let me = instance.id.to_string();
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for q in limits.share_tiers_globally() {
        let portfolio = q.name().to_string();
        tasks.push(tokio::spawn(q.run(
            store.clone(),
            me.clone(),
            move || Durable::TierRecipients {
                portfolio: portfolio.clone(),
                since_ms: jiff::Timestamp::now().as_millisecond()
                    - crate::pipeline::limits::tier::WINDOW_MS,
            },
            stop.clone(),
        )));
    }
    for q in spend.share_globally(&me) {
        let account = q.name().to_string();
        tasks.push(tokio::spawn(q.run(
            store.clone(),
            me.clone(),
            move || Durable::Spend {
                account: account.clone(),
                since_minute: jiff::Timestamp::now().as_second().div_euclid(60) - 24 * 60,
            },
            stop.clone(),
        )));
    }
    Quotas {
        store,
        me,
        stop,
        tasks,
    }
}

impl Quotas {
    /// Stops the renewals and deletes this instance's leases (a clean stop): the others may
    /// use them at once. If that fails they stop counting 10 s after the last heartbeat.
    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        match tokio::time::timeout(Duration::from_secs(5), self.store.drop_leases(&self.me)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Could not give this instance's tier and budget leases back; they stop counting 10 s after its last heartbeat.")
            }
            Err(_) => tracing::warn!(
                "The database did not answer when this instance gave its tier and budget leases back; they stop counting 10 s after its last heartbeat."
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_waits_double_up_to_the_cap_and_stay_there() {
        let mut b = Backoff::new(START_RETRY_FIRST, START_RETRY_MAX);
        let waits: Vec<u64> = (0..10).map(|_| b.next_wait().as_millis() as u64).collect();
        assert_eq!(
            waits,
            [
                500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000
            ]
        );
    }
}
