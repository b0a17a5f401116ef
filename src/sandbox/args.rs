//! The `sendwell sandbox` command line: its flags, and the [`SandboxConfig`] they describe.

use std::net::SocketAddr;
use std::time::Duration;

use super::state::SandboxConfig;

/// clap arguments for the `sendwell sandbox` subcommand.
#[derive(clap::Args, Clone)]
pub struct SandboxArgs {
    /// Address to listen on; loopback by default because the control endpoints are unauthenticated.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// Latency added to every /messages answer, e.g. "100ms", "2s".
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Uniform random extra latency in 0..JITTER, e.g. "50ms".
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub latency_jitter: Duration,
    /// Probability (0.0..=1.0) of answering HTTP 503, code 2.
    #[arg(long = "rate-5xx", default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_5xx: f64,
    /// Probability (0.0..=1.0) of answering code 130429 (throughput reached).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_throttle: f64,
    /// Probability (0.0..=1.0) of answering code 131026 (message undeliverable).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_undeliverable: f64,
    /// Accepted bearer token (repeatable); without any, every non-empty token is accepted.
    #[arg(long = "token", value_name = "TOKEN")]
    pub tokens: Vec<String>,
    /// POST signed status and inbound callbacks here, e.g. "http://127.0.0.1:8088/webhook".
    #[arg(long, value_name = "URL")]
    pub webhook_url: Option<String>,
    /// Sign callbacks with the app secret in this file (one trailing newline is ignored); the
    /// secret is read when the arguments are parsed, so a bad path fails at the command line.
    #[arg(long = "app-secret-file", value_name = "PATH", value_parser = read_secret_file)]
    pub app_secret: Option<String>,
    /// Probability (0.0..=1.0) that an accepted send is also reported read.
    #[arg(long, default_value_t = 1.0, value_parser = parse_rate)]
    pub read_rate: f64,
    /// Answer Brazilian mobiles (+55 AA 9XXXXXXXX) and Mexican numbers (+52) with the legacy
    /// WhatsApp IDs Meta gives such accounts (55AAXXXXXXXX, 521…).
    #[arg(long)]
    pub legacy_wa_ids: bool,
    /// Statuses in one callback POST at most: those due within --status-batch-window of each
    /// other go out together, as Meta batches notifications under load. 1: each alone.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub status_batch: u16,
    /// How long a status waits for others to share its POST (with --status-batch above 1).
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    pub status_batch_window: Duration,
}

/// By hand, so the app secret never reaches a log.
impl std::fmt::Debug for SandboxArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxArgs")
            .field("listen", &self.listen)
            .field("latency", &self.latency)
            .field("latency_jitter", &self.latency_jitter)
            .field("rate_5xx", &self.rate_5xx)
            .field("rate_throttle", &self.rate_throttle)
            .field("rate_undeliverable", &self.rate_undeliverable)
            .field("tokens", &self.tokens.len())
            .field("webhook_url", &self.webhook_url)
            .field(
                "app_secret",
                &self.app_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("read_rate", &self.read_rate)
            .field("legacy_wa_ids", &self.legacy_wa_ids)
            .field("status_batch", &self.status_batch)
            .field("status_batch_window", &self.status_batch_window)
            .finish()
    }
}

impl SandboxArgs {
    /// The sandbox behaviour these arguments describe.
    pub fn config(&self) -> SandboxConfig {
        SandboxConfig {
            latency: self.latency,
            latency_jitter: self.latency_jitter,
            rate_server_error: self.rate_5xx,
            rate_throttle: self.rate_throttle,
            rate_undeliverable: self.rate_undeliverable,
            valid_tokens: (!self.tokens.is_empty()).then(|| self.tokens.clone()),
            webhook_url: self.webhook_url.clone(),
            app_secret: self.app_secret.clone(),
            read_rate: self.read_rate,
            legacy_wa_ids: self.legacy_wa_ids,
            status_batch: self.status_batch.into(),
            status_batch_window: self.status_batch_window,
            ..SandboxConfig::default()
        }
    }
}

/// clap value parser: the app secret from a file, without the trailing newline editors add.
fn read_secret_file(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let secret = text
        .strip_suffix('\n')
        .map_or(text.as_str(), |s| s.strip_suffix('\r').unwrap_or(s));
    if secret.is_empty() {
        return Err(format!("{path} holds no secret"));
    }
    Ok(secret.to_owned())
}

/// clap value parser: a probability, rejected at the command line rather than clamped silently.
fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not a probability between 0.0 and 1.0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::DEFAULT_WABA_ID;

    #[test]
    fn args_parse_with_defaults_and_overrides() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: SandboxArgs,
        }
        use clap::Parser;
        let defaults = Cli::try_parse_from(["sandbox"]).unwrap().args;
        assert_eq!(defaults.listen, "127.0.0.1:8089".parse().unwrap());
        let config = defaults.config();
        assert_eq!(config.latency, Duration::from_millis(100));
        assert_eq!(config.latency_jitter, Duration::ZERO);
        assert_eq!(config.valid_tokens, None);

        let args = Cli::try_parse_from([
            "sandbox",
            "--listen",
            "[::1]:0",
            "--latency",
            "2s",
            "--latency-jitter",
            "50ms",
            "--rate-5xx",
            "0.1",
            "--rate-throttle",
            "0.2",
            "--rate-undeliverable",
            "1",
            "--token",
            "a",
            "--token",
            "b",
        ])
        .unwrap()
        .args;
        let config = args.config();
        assert_eq!(args.listen, "[::1]:0".parse().unwrap());
        assert_eq!(config.latency, Duration::from_secs(2));
        assert_eq!(config.latency_jitter, Duration::from_millis(50));
        assert_eq!(
            (
                config.rate_server_error,
                config.rate_throttle,
                config.rate_undeliverable
            ),
            (0.1, 0.2, 1.0)
        );
        assert_eq!(config.valid_tokens, Some(vec!["a".into(), "b".into()]));

        assert!(Cli::try_parse_from(["sandbox", "--rate-throttle", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["sandbox", "--latency", "fast"]).is_err());
    }

    #[test]
    fn webhook_args_read_the_secret_file_and_debug_hides_it() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: SandboxArgs,
        }
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app-secret");
        std::fs::write(&path, "s3cr3t-value\n").unwrap();
        let args = Cli::try_parse_from([
            "sandbox",
            "--webhook-url",
            "http://127.0.0.1:8088/webhook",
            "--app-secret-file",
            path.to_str().unwrap(),
            "--read-rate",
            "0.25",
        ])
        .unwrap()
        .args;
        let config = args.config();
        assert_eq!(
            config.webhook_url.as_deref(),
            Some("http://127.0.0.1:8088/webhook")
        );
        assert_eq!(config.app_secret.as_deref(), Some("s3cr3t-value"));
        assert_eq!(config.read_rate, 0.25);
        assert_eq!(config.waba_id, DEFAULT_WABA_ID);
        assert_eq!(config.status_delay, Duration::from_millis(50));
        assert!(!format!("{args:?}").contains("s3cr3t"));
        assert!(!format!("{config:?}").contains("s3cr3t"));

        let defaults = Cli::try_parse_from(["sandbox"]).unwrap().args.config();
        assert_eq!((defaults.webhook_url, defaults.app_secret), (None, None));
        assert_eq!(defaults.read_rate, 1.0);
        let missing = dir.path().join("nope");
        assert!(
            Cli::try_parse_from(["sandbox", "--app-secret-file", missing.to_str().unwrap()])
                .is_err()
        );
        std::fs::write(&path, "\n").unwrap();
        assert!(
            Cli::try_parse_from(["sandbox", "--app-secret-file", path.to_str().unwrap()]).is_err()
        );
        assert!(Cli::try_parse_from(["sandbox", "--read-rate", "2"]).is_err());
    }
}
