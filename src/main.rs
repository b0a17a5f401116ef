//! The `sendwell` command: parses the command line, loads and validates config (exit 64 on a bad
//! one, before anything binds), sets up logging, runs the chosen subcommand.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use sendwell::cloud_api::sandbox::{Sandbox, SandboxArgs};
use sendwell::config::{Config, DEFAULT_CONFIG_PATH, LogFormat};

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
    /// The TOML config file; every key can be overridden by SENDWELL_<SECTION>__<KEY>.
    #[arg(long, short, env = "SENDWELL_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: consume send jobs, send them, publish outcomes.
    Run(ConfigArg),
    /// Validate the config and print it with secrets redacted (exit 64 when invalid).
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
}

#[derive(Args)]
struct TailArgs {
    /// Broker URL.
    #[arg(
        long,
        env = "SENDWELL_BROKER__URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    url: String,
    /// Routing-key pattern: `#` for everything, `failed.*`, `sent`, `invalid.#`…
    #[arg(long, default_value = "#")]
    pattern: String,
    /// Stop after this many events.
    #[arg(long, short = 'n')]
    limit: Option<usize>,
}

#[derive(Args)]
struct PublishArgs {
    /// Broker URL.
    #[arg(
        long,
        env = "SENDWELL_BROKER__URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    url: String,
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
            Command::Run(c) => run(c.config).await,
            Command::CheckConfig { path, config } => check_config(path.unwrap_or(config.config)),
            Command::Sandbox(args) => sandbox(args).await,
            Command::Publish(args) => publish(args).await,
            Command::Tail(a) => {
                match sendwell::publish::tail_outcomes(
                    &a.url,
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
    ExitCode::from(code as u8)
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
            println!("{}", c.redacted_summary());
            println!("configuration OK: {}", path.display());
            0
        }
        Err(code) => code,
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
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
                shutdown.cancel();
            } else {
                tracing::warn!("Second signal: exiting now; unfinished jobs stay unacked.");
                std::process::exit(130);
            }
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
    let app = match sendwell::app::start(config, shutdown).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "sendwell cannot start.");
            eprintln!("sendwell: {e}");
            return e.exit_code();
        }
    };
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
    match sendwell::publish::publish_jobs(&a.url, &jobs).await {
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
