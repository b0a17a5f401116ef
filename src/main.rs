//! The `sendwell` command: parses the command line, loads and validates config (exit 64 on a bad
//! one, before anything binds), sets up logging, runs the chosen subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc: a job's path allocates many small, short-lived
/// buffers across threads (AMQP frames, JSON, HTTP headers), and glibc's arenas spent a tenth
/// of the daemon's CPU on them in the load bench's profile (`_int_malloc`, `_int_free`,
/// `malloc_consolidate`); mimalloc's per-thread free lists make that a few percent.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sendwell::config::{Config, DEFAULT_CONFIG_PATH, LogFormat};
use sendwell::consent::tools::{self, Format};
use sendwell::sandbox::{Sandbox, SandboxArgs};

#[derive(Parser)]
#[command(
    name = "sendwell",
    version,
    about = "Sends WhatsApp messages: consent first, never too often, at full speed."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArg {
    /// The TOML config file [default: $SENDWELL_CONFIG, else /etc/sendwell/sendwell.toml]; in
    /// the source tree, pass `--config config/sendwell.toml`. Every key can be overridden by
    /// SENDWELL_<SECTION>__<KEY>.
    #[arg(long, short, value_name = "PATH")]
    config: Option<PathBuf>,
}

/// The example config in the source tree, named when no config file is found: a newcomer runs
/// the commands from a clone, where `/etc/sendwell/sendwell.toml` does not exist.
const EXAMPLE_CONFIG: &str = "config/sendwell.toml";

/// Which of the three places named the config file, so a missing file is reported by the name
/// the user gave it.
enum ConfigSource {
    Flag,
    Env,
    Default,
}

impl ConfigArg {
    /// `--config`, else `SENDWELL_CONFIG`, else the default path: the same for every command.
    /// Resolved here rather than by clap's `env`/`default_value`, which would hide where the
    /// path came from.
    fn locate(&self) -> (PathBuf, ConfigSource) {
        if let Some(p) = &self.config {
            return (p.clone(), ConfigSource::Flag);
        }
        match std::env::var_os("SENDWELL_CONFIG").filter(|v| !v.is_empty()) {
            Some(p) => (PathBuf::from(p), ConfigSource::Env),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), ConfigSource::Default),
        }
    }

    /// The config file's path, or exit code 64 after saying where it looked and naming the
    /// example config.
    fn existing(&self) -> Result<PathBuf, i32> {
        let (path, source) = self.locate();
        if path.exists() {
            return Ok(path);
        }
        eprintln!("sendwell: {}", missing_config(&path, &source));
        Err(64)
    }
}

fn missing_config(path: &std::path::Path, source: &ConfigSource) -> String {
    let looked = match source {
        ConfigSource::Flag => format!("--config {} does not exist", path.display()),
        ConfigSource::Env => format!("SENDWELL_CONFIG={} does not exist", path.display()),
        ConfigSource::Default => format!(
            "no config file: no --config given, SENDWELL_CONFIG is not set, and {} does not exist",
            path.display()
        ),
    };
    format!("{looked}; try --config {EXAMPLE_CONFIG} (the example config, in the source tree)")
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: consume send jobs, send them, publish outcomes.
    Run(ConfigArg),
    /// Validate the config and print the effective config as TOML, secrets redacted (exit 64
    /// when invalid).
    CheckConfig {
        /// The config file (same as --config).
        path: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run the built-in Cloud API stand-in on loopback.
    Sandbox(SandboxArgs),
    /// Publish send jobs to sendwell.jobs with publisher confirms.
    Publish(PublishArgs),
    /// Print outcome events (JSON lines) as they are published to sendwell.outcomes.
    Tail(TailArgs),
    /// GDPR tools: show, export, import or erase consent, whether the daemon runs or not.
    #[command(
        subcommand,
        long_about = "GDPR tools over the consent store, whether the daemon runs or not.\n\n\
When no daemon holds the state store (config state.dir), the tools open it directly. When one \
does, show and export read through its admin listener (admin.listen; the consent endpoints \
answer loopback clients with the admin token: admin.token_file, or when unset the token the \
daemon writes to state.dir/admin-token at each start, readable by its user and root), and \
import and erase publish consent events to sendwell.consent, \
which every daemon instance consumes and applies.\n\n\
Exit codes: 0 done, 64 bad usage or config (the admin token too), 65 rejected rows (the valid ones are applied), \
66 input not readable, 69 broker or daemon unreachable, 73 state store problem, 74 output not \
writable, 75 erasure published but not applied by the daemon within 30 s."
    )]
    Consent(ConsentCommand),
    /// Dead letters: list what is in sendwell.dead, replay jobs to sendwell.jobs.
    #[command(
        subcommand,
        long_about = "Dead letters: list what is in sendwell.dead, replay jobs to sendwell.jobs.\n\n\
Both take messages with manual acks and give back what they do not move: nothing leaves the \
queue except a job replayed and confirmed by the broker. Given-back messages may change their \
order. Numbers are always shown masked.\n\n\
Exit codes: 0 done, 64 bad usage or config, 69 broker unreachable (or sendwell.dead not \
declared yet), 74 output not writable, 75 some replayed jobs were not confirmed (they stay \
dead: run again)."
    )]
    Dead(DeadCommand),
    /// Back up or restore the state store (state.redb) of a stopped daemon, or move it to
    /// PostgreSQL.
    #[command(
        subcommand,
        long_about = "Back up or restore the state store (state.redb in state.dir) of a \
stopped daemon: the idempotency ledger, consent proofs, webhook and limit state; or copy it \
into the empty PostgreSQL database of [state.postgres] (migrate --to-postgres).\n\n\
A backup holds personal data (consent proofs: numbers, sources, evidence): it is written \
with mode 0600; store and transfer it protected, and delete it when no longer needed (an \
erasure does not reach backups).\n\n\
The daemon holds the store while it runs: stop it first (systemctl stop sendwell, or \
sendwell@N for a shard).\n\n\
Exit codes: 0 done, 64 bad usage or config, 65 the file is not a sendwell store (migrate: \
the copy's row counts differ from the store's), 66 input not readable, 73 state store problem \
(migrate: the database is not empty, or cannot be written), 74 output not writable, 75 the \
daemon is running."
    )]
    State(StateCommand),
}

#[derive(Subcommand)]
enum ConsentCommand {
    /// Print a number's consent proof: every event with source, evidence and time.
    ///
    /// Then, per account and purpose, what the events add up to (opted in, confirmed, opted
    /// out, consented at). Prints the full number: it is the data subject's own proof (logs
    /// mask numbers).
    Show {
        /// The number in E.164 form; spaces and punctuation are fine: "+49 170 1234567".
        number: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Write every stored consent event, as JSON lines (lossless) or CSV.
    Export {
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Write to this file (created whole or not at all) instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Import consent events in bulk (e.g. a CRM export), validated; idempotent.
    #[command(long_about = "Import consent events in bulk (e.g. a CRM export).\n\n\
Each row is validated like an event on sendwell.consent (CONTRACT §4); numbers may carry spaces \
and punctuation but need + or 00 and the country code. CSV needs a header naming its columns: \
type,account,to,purposes,source,at,evidence (purposes joined with |; type, account, to and at \
required; an unknown column refuses the whole file). Importing the same rows again changes \
nothing.\n\n\
The report lists rows read, applied (new), already present, void (dated at or before an \
erasure of the number) and rejected, with each rejected row as `line N: reason: detail`. \
Exit 65 when some rows were rejected; the valid ones are applied all the same.\n\n\
With the daemon running, the valid events are published to sendwell.consent (with publisher \
confirms) and every instance applies them. With it stopped, they are applied to the store \
here; --publish also publishes them, so that other instances (other shards, other state \
directories) learn them too.")]
    Import {
        /// The file; `-` reads standard input.
        file: PathBuf,
        /// Default: from the extension (.csv; .jsonl, .ndjson, .json); JSON lines for `-`.
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Validate only: apply and publish nothing.
        #[arg(long, conflicts_with = "publish")]
        dry_run: bool,
        /// When the daemon is stopped: also publish the events to sendwell.consent for the
        /// other instances (a running daemon is always reached through the broker).
        #[arg(long)]
        publish: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Erase every trace of a number (irreversible: needs --yes).
    #[command(
        long_about = "Erase every trace of a number (GDPR art. 17): its consent history \
and summaries, pending double opt-in questions, customer-service windows, and the ledger \
entries, delivery records and wamid index of jobs sent to it. Only a keyed hash of the number \
and the erasure time remain, so that an older event arriving late cannot bring consent back. \
Irreversible: needs --yes.\n\n\
With the daemon running, an erase event is published to sendwell.consent; every instance \
applies it, and this command waits (up to 30 s) until the daemon shows the number erased. \
With it stopped, the store is erased and compacted here; --publish also publishes the erase \
event, so that other instances (other shards, other state directories) forget the number too."
    )]
    Erase {
        /// The number in E.164 form; spaces and punctuation are fine.
        number: String,
        /// Confirm: the erasure cannot be undone.
        #[arg(long)]
        yes: bool,
        /// When the daemon is stopped: also publish the erase event to sendwell.consent.
        #[arg(long)]
        publish: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum DeadCommand {
    /// Show dead-lettered messages (reason, origin, x-death, job id, account, masked number,
    /// size) and leave them in the queue.
    #[command(
        long_about = "Show dead-lettered messages and leave them in the queue.\n\n\
Per message: the reason (x-sendwell-reason or the broker's x-death reason), the exchange and \
routing key it came with, the x-death history, the job id, account, category and masked \
number when the body is a job, its size, and whether `dead replay` would take it.\n\n\
Messages are taken with manual acks and given back with basic.nack(requeue); one whose \
x-delivery-count has reached 5 is given back as a fresh copy at the tail instead (confirmed, \
then the old one acked), because a quorum queue's delivery limit (20 by default on RabbitMQ \
4) would otherwise drop it after repeated listings."
    )]
    List {
        /// Show at most this many (from the head of the queue).
        #[arg(long, short = 'n', default_value_t = sendwell::ops::DEFAULT_LIST_LIMIT)]
        limit: usize,
        #[arg(long, value_enum, default_value_t = sendwell::ops::ListFormat::Text)]
        format: sendwell::ops::ListFormat,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Move dead-lettered jobs back to sendwell.jobs, to be processed again.
    #[command(
        long_about = "Move dead-lettered jobs back to sendwell.jobs, to be processed \
again.\n\n\
Each matching job is republished with its recipient's digits as routing key (the shard is \
picked as for upstream's jobs), with a publisher confirm; its dead copy is acked only after \
the confirm, so a failure leaves it dead, at worst duplicated, and the ledger sends a job id \
at most once.\n\n\
Replay is for jobs that never got an outcome: those the broker dead-lettered after the \
delivery limit (a job that kept failing to settle, e.g. while the state store failed). A job \
dead-lettered as invalid already has its final `invalid` outcome: a replay would only answer \
`duplicate`, so it is left in the queue; publish the fixed job under a new id. Bodies that \
are not jobs, and webhook or consent messages, are left too. Everything else goes back \
unchanged (order may change).\n\n\
Prints each message left with why, then: replayed, skipped (not matching), left."
    )]
    Replay {
        /// Only messages with this reason code (as `dead list` shows it, e.g. delivery_limit).
        #[arg(long)]
        reason: Option<String>,
        /// Only the job with this id.
        #[arg(long)]
        id: Option<String>,
        /// Replay at most this many jobs.
        #[arg(long, short = 'n')]
        limit: Option<usize>,
        /// Say what would be replayed; move nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Write a verified copy of a stopped daemon's state.redb (mode 0600: it holds personal
    /// data).
    Backup {
        /// The backup file (replaced whole, or left as it was).
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Put a backup in place of a stopped daemon's state.redb (the old one is kept as
    /// state.redb.before-restore).
    Restore {
        /// A file written by `sendwell state backup`.
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Copy a stopped daemon's state.redb into the empty PostgreSQL database of
    /// [state.postgres] (with state.backend = "postgres"), then compare the rows per table.
    /// The redb store is left as it was.
    Migrate {
        /// Copy into PostgreSQL (the only target there is; named so the command says where).
        #[arg(long, required = true)]
        to_postgres: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Args)]
struct TailArgs {
    /// Broker URL [default: broker.url of the config file when one is found (see --config),
    /// else $SENDWELL_BROKER__URL, else amqp://guest:guest@127.0.0.1:5672/%2f].
    #[arg(long)]
    url: Option<String>,
    #[command(flatten)]
    config: ConfigArg,
    /// Routing-key pattern: `#` for everything, `failed.*`, `sent`, `invalid.#`…
    #[arg(long, default_value = "#")]
    pattern: String,
    /// Stop after this many events.
    #[arg(long, short = 'n')]
    limit: Option<usize>,
}

#[derive(Args)]
struct PublishArgs {
    /// Broker URL [default: broker.url of the config file when one is found (see --config),
    /// else $SENDWELL_BROKER__URL, else amqp://guest:guest@127.0.0.1:5672/%2f].
    #[arg(long)]
    url: Option<String>,
    #[command(flatten)]
    config: ConfigArg,
    /// A file with one job, a JSON array of jobs, or JSON lines; `-` reads standard input.
    #[arg(long, short)]
    file: Option<PathBuf>,
    /// Build one job from flags instead: the recipient (E.164, e.g. +491701234567).
    #[arg(long)]
    to: Option<String>,
    #[arg(long, default_value = "acme-de")]
    account: String,
    #[arg(long, default_value = "marketing")]
    category: String,
    #[arg(long)]
    purpose: Option<String>,
    /// Template name (with --language).
    #[arg(long, conflicts_with = "text")]
    template: Option<String>,
    #[arg(long, default_value = "en")]
    language: String,
    /// A text body instead of a template.
    #[arg(long)]
    text: Option<String>,
    /// The job id (default: a new UUID).
    #[arg(long)]
    id: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sendwell: cannot start the async runtime: {e}");
            return ExitCode::from(71);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run(c) => match c.existing() {
                Ok(path) => run(path).await,
                Err(code) => code,
            },
            Command::CheckConfig { path, config } => {
                let config = ConfigArg {
                    config: path.or(config.config),
                };
                match config.existing() {
                    Ok(path) => check_config(path),
                    Err(code) => code,
                }
            }
            Command::Sandbox(args) => sandbox(args).await,
            Command::Publish(args) => publish(args).await,
            Command::Consent(c) => consent(c).await,
            Command::Dead(c) => dead(c).await,
            Command::State(c) => state(c).await,
            Command::Tail(a) => {
                let url = match broker_url(a.url, &a.config) {
                    Ok(u) => u,
                    Err(code) => return code,
                };
                match sendwell::publish::tail_outcomes(
                    &url,
                    &a.pattern,
                    a.limit,
                    std::io::stdout().lock(),
                )
                .await
                {
                    Ok(_) => 0,
                    Err(e) => {
                        eprintln!("sendwell tail: {e}");
                        69
                    }
                }
            }
        }
    });
    // Stop what is left of the tasks, so their store handles drop, and let the store's writer
    // close the file: a file not closed cleanly must be repaired at the next start.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    if !sendwell::store::wait_closed(std::time::Duration::from_secs(10)) {
        eprintln!("sendwell: the state store did not close within 10 s");
    }
    ExitCode::from(code as u8)
}

/// The broker for `publish` and `tail`, which need nothing else: `--url`, else the config file
/// found as every command finds it, else (no config file anywhere) the local broker. A config
/// named by `--config` or `SENDWELL_CONFIG` must exist, as for every other command.
fn broker_url(url: Option<String>, config: &ConfigArg) -> Result<String, i32> {
    // A config named by --config or SENDWELL_CONFIG must exist even when --url makes it moot:
    // a typo there is a mistake to point out, not to ignore.
    if !matches!(config.locate(), (_, ConfigSource::Default)) {
        config.existing()?;
    }
    if let Some(u) = url {
        return Ok(u);
    }
    match config.locate() {
        (path, ConfigSource::Default) if !path.exists() => {
            Ok(std::env::var("SENDWELL_BROKER__URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string()))
        }
        _ => {
            let path = config.existing()?;
            sendwell::config::Config::load_broker_url(&path)
                .map(|u| u.expose().to_string())
                .map_err(|e| {
                    eprintln!("sendwell: invalid configuration ({}):\n{e}", path.display());
                    64
                })
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, i32> {
    Config::load(path).map_err(|e| {
        eprintln!("sendwell: invalid configuration ({}):\n{e}", path.display());
        64
    })
}

fn check_config(path: PathBuf) -> i32 {
    match load(&path) {
        Ok(c) => {
            // stdout is a config file (`> sendwell.toml` saves it); the verdict goes to stderr.
            print!("{}", c.effective_toml());
            if c.state
                .postgres
                .as_ref()
                .is_some_and(|pg| pg.in_clear_over_network())
            {
                eprintln!(
                    "note: state.postgres.tls = \"off\" for a database across a network: the state, phone numbers among it, travels unencrypted"
                );
            }
            eprintln!("configuration OK: {}", path.display());
            0
        }
        Err(code) => code,
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    sendwell::logging::init(filter, format);
}

/// First SIGTERM/SIGINT: graceful shutdown. Second: exit at once.
fn handle_signals(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("Cannot install signal handlers.");
            return;
        };
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if n == 0 {
                tracing::info!(
                    "Shutting down: no new jobs; finishing those in flight (signal again to exit at once)."
                );
                sendwell::notify::stopping();
                shutdown.cancel();
            } else {
                tracing::warn!("Second signal: exiting now; unfinished jobs stay unacked.");
                std::process::exit(130);
            }
        }
    });
}

/// SIGHUP: read the config file again; a valid one is applied as far as it safely can be
/// (see `RunningApp::reload`), an invalid one is refused with its problems and the daemon
/// keeps running on the old one.
fn reload_on_sighup(app: sendwell::app::Reloader, path: PathBuf) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("Cannot install the SIGHUP handler.");
            return;
        };
        while hup.recv().await.is_some() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
            match Config::load(&path) {
                Ok(config) => app.reload(config),
                Err(e) => {
                    tracing::error!(problems = %e, "Reload refused: the config file is invalid; still running on the previous one.")
                }
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
    });
}

async fn run(path: PathBuf) -> i32 {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&config.log.filter, config.log.format);
    let shutdown = CancellationToken::new();
    handle_signals(shutdown.clone());
    let app = match sendwell::app::start(config, shutdown.clone()).await {
        Ok(a) => a,
        Err(sendwell::app::AppError::StoppedWhileWaiting) => {
            tracing::info!("sendwell stopped before the state store could be opened.");
            return 0;
        }
        Err(e) => {
            tracing::error!(error = %e, "sendwell cannot start.");
            eprintln!("sendwell: {e}");
            return e.exit_code();
        }
    };
    reload_on_sighup(app.reloader(), path.clone());
    // systemd: READY=1 once the broker topology is declared and the state loaded, then the
    // status line and the watchdog.
    tokio::spawn(sendwell::notify::run(
        app.readiness.clone(),
        app.paused_accounts(),
        shutdown,
    ));
    match app.wait().await {
        Ok(()) => {
            tracing::info!("sendwell stopped.");
            0
        }
        Err(e) => {
            eprintln!("sendwell: {e}");
            e.exit_code()
        }
    }
}

async fn sandbox(args: SandboxArgs) -> i32 {
    init_logging("info", LogFormat::Text);
    let shutdown = CancellationToken::new();
    handle_signals(shutdown.clone());
    let sb = match Sandbox::bind(args.listen, args.config()).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sendwell sandbox: cannot listen on {}: {e}", args.listen);
            return 69;
        }
    };
    println!("sendwell sandbox listening on http://{}", sb.local_addr());
    match sb.serve(shutdown).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sendwell sandbox: {e}");
            1
        }
    }
}

async fn publish(a: PublishArgs) -> i32 {
    let jobs = match (&a.file, &a.to) {
        (Some(f), _) => {
            let text = if f.as_os_str() == "-" {
                sendwell::publish::read_all(std::io::stdin().lock())
            } else {
                std::fs::read_to_string(f)
            };
            match text
                .map_err(Into::into)
                .and_then(|t| sendwell::publish::parse_jobs(&t))
            {
                Ok(j) => j,
                Err(e) => {
                    eprintln!("sendwell publish: {e}");
                    return 65;
                }
            }
        }
        (None, Some(to)) => {
            let mut job = serde_json::json!({
                "id": a.id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                "account": a.account,
                "to": to,
                "category": a.category,
            });
            if let Some(p) = &a.purpose {
                job["purpose"] = p.clone().into();
            }
            match (&a.template, &a.text) {
                (_, Some(t)) => job["text"] = serde_json::json!({ "body": t }),
                (Some(t), None) => {
                    job["template"] = serde_json::json!({ "name": t, "language": a.language })
                }
                (None, None) => {
                    eprintln!("sendwell publish: give --template NAME or --text BODY");
                    return 64;
                }
            }
            vec![job]
        }
        (None, None) => {
            eprintln!("sendwell publish: give --file PATH (or - for stdin) or --to NUMBER");
            return 64;
        }
    };
    let url = match broker_url(a.url, &a.config) {
        Ok(u) => u,
        Err(code) => return code,
    };
    match sendwell::publish::publish_jobs(&url, &jobs).await {
        Ok(n) => {
            println!("published {n} job(s), confirmed by the broker");
            0
        }
        Err(e) => {
            eprintln!("sendwell publish: {e}");
            69
        }
    }
}

async fn consent(cmd: ConsentCommand) -> i32 {
    if let ConsentCommand::Erase { yes: false, .. } = cmd {
        eprintln!(
            "sendwell consent erase: this removes every trace of the number and cannot be undone; run again with --yes"
        );
        return tools::EX_USAGE;
    }
    let path = match &cmd {
        ConsentCommand::Show { config, .. }
        | ConsentCommand::Export { config, .. }
        | ConsentCommand::Import { config, .. }
        | ConsentCommand::Erase { config, .. } => match config.existing() {
            Ok(p) => p,
            Err(code) => return code,
        },
    };
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    sendwell::privacy::set_masking(config.log.mask_numbers);
    init_logging(&config.log.filter, config.log.format);
    let result = match cmd {
        ConsentCommand::Show { number, json, .. } => tools::show(&config, &number).await.map(|r| {
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                print!("{r}");
            }
            0
        }),
        ConsentCommand::Export { format, output, .. } => {
            tools::export(&config, format, output.as_deref())
                .await
                .map(|n| {
                    match n {
                        tools::Exported::Events(n) => eprintln!("exported {n} consent event(s)"),
                        tools::Exported::Bytes(n) => {
                            eprintln!("exported {n} bytes through the running daemon")
                        }
                    }
                    0
                })
        }
        ConsentCommand::Import {
            file,
            format,
            dry_run,
            publish,
            ..
        } => tools::import(&config, &file, format, dry_run, publish)
            .await
            .map(|r| {
                print!("{r}");
                r.exit_code()
            }),
        ConsentCommand::Erase {
            number, publish, ..
        } => tools::erase(&config, &number, publish).await.map(|e| {
            let shown = tools::parse_number(&number).map_or(number, |n| n.as_str().to_string());
            println!("{}", e.describe(&shown));
            0
        }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("sendwell consent: {e}");
        e.exit_code()
    })
}

async fn dead(cmd: DeadCommand) -> i32 {
    let (DeadCommand::List { config, .. } | DeadCommand::Replay { config, .. }) = &cmd;
    let config = match config.existing().and_then(|p| load(&p)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match cmd {
        DeadCommand::List { limit, format, .. } => {
            sendwell::ops::dead_list(&config, limit, format, &mut std::io::stdout().lock())
                .await
                .map(|r| {
                    // Keep standard output JSON lines only.
                    match format {
                        sendwell::ops::ListFormat::Text => println!("{r}"),
                        sendwell::ops::ListFormat::Jsonl => eprintln!("{r}"),
                    }
                    0
                })
        }
        DeadCommand::Replay {
            reason,
            id,
            limit,
            dry_run,
            ..
        } => {
            let filter = sendwell::ops::ReplayFilter {
                reason,
                id,
                limit,
                dry_run,
            };
            sendwell::ops::dead_replay(&config, &filter).await.map(|r| {
                print!("{r}");
                r.exit_code()
            })
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("sendwell dead: {e}");
        e.exit_code()
    })
}

async fn state(cmd: StateCommand) -> i32 {
    let (StateCommand::Backup { config, .. }
    | StateCommand::Restore { config, .. }
    | StateCommand::Migrate { config, .. }) = &cmd;
    let config = match config.existing().and_then(|p| load(&p)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match cmd {
        StateCommand::Backup { to, .. } => {
            sendwell::ops::state_backup(&config, &to).map(|r| print!("{r}"))
        }
        StateCommand::Restore { from, .. } => {
            sendwell::ops::state_restore(&config, &from).map(|r| print!("{r}"))
        }
        StateCommand::Migrate { .. } => sendwell::ops::state_migrate(&config)
            .await
            .map(|r| print!("{r}")),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sendwell state: {e}");
            e.exit_code()
        }
    }
}
