//! The log of the daemon and the tools: lines on standard error (under systemd each prefixed
//! with its syslog priority for the journal), text or JSON, filtered by `RUST_LOG`, else
//! `log.filter`, and always by [`parameter_cap`], which neither can lift.

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::LogFormat;

/// Crates that log what they send to PostgreSQL below INFO: tokio-postgres each statement's
/// parameters at debug (`tokio_postgres::query`), which are the state's keys and hold phone
/// numbers; the protocol and pool crates beside it, in case they ever do the same.
pub const PARAMETER_TARGETS: [&str; 4] = [
    "tokio_postgres",
    "postgres_protocol",
    "postgres_types",
    "deadpool",
];

/// Keeps only INFO and above of [`PARAMETER_TARGETS`] (every target they start with), and
/// everything else. A filter of its own, required besides the configured one: inside one
/// `EnvFilter` a more specific directive wins, so `tokio_postgres=info` added to `RUST_LOG`
/// would lose to a user's `tokio_postgres::query=debug`.
pub fn parameter_cap() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(PARAMETER_TARGETS.map(|t| (t, LevelFilter::INFO)))
        // lapin warns with the whole message the broker returned (a mandatory publish nothing
        // took), body included: webhook events name customers. sendwell reports those itself.
        .with_target("lapin::returned_messages", LevelFilter::ERROR)
}

/// `RUST_LOG` when it is set and valid, else `default` (`log.filter`).
pub fn env_filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

/// The subscriber [`init`] installs, writing to `writer` (tests give a buffer): `filter` and
/// [`parameter_cap`] must both let an event through. `journal`: prefix each text line with its
/// syslog priority and leave the time out (the journal adds it).
pub fn subscriber<W>(
    filter: EnvFilter,
    format: LogFormat,
    journal: bool,
    ansi: bool,
    writer: W,
) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    let layer = match (format, journal) {
        (LogFormat::Json, _) => layer.json().boxed(),
        (LogFormat::Text, true) => layer
            .event_format(JournalPriority(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .boxed(),
        (LogFormat::Text, false) => layer.boxed(),
    };
    Registry::default().with(layer.with_filter(filter.and(parameter_cap())))
}

/// Installs the log for this process (once; later calls change nothing). `log` records (what
/// tokio-postgres writes) go through the same filters.
pub fn init(filter: &str, format: LogFormat) {
    // Under systemd, stderr goes to the journal (`$JOURNAL_STREAM` is set).
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let _ = subscriber(
        env_filter(filter),
        format,
        journal,
        std::io::stderr().is_terminal(),
        std::io::stderr,
    )
    .try_init();
}

/// Prefixes each formatted line with its syslog priority for the journal (sd-daemon(3): `<3>`
/// error … `<7>` debug), so `journalctl -p` filters it.
struct JournalPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPriority<F>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What the subscriber wrote.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    /// What each format writes under `directives` for a statement's parameters logged as
    /// tokio-postgres logs them (through the `log` crate, target `tokio_postgres::query`) and
    /// through tracing, beside lines that must stay.
    fn logged(directives: &str, format: LogFormat, journal: bool) -> String {
        // tokio-postgres logs through `log`; LogTracer hands its records to the subscriber
        // current on the thread (process-wide, once: a second init in this process fails, and
        // the first does the same).
        let _ = tracing_log::LogTracer::init();
        let buffer = Buffer::default();
        let b = buffer.clone();
        let sub = subscriber(
            EnvFilter::new(directives),
            format,
            journal,
            false,
            move || b.clone(),
        );
        tracing::subscriber::with_default(sub, || {
            log::debug!(target: "tokio_postgres::query", "executing statement s1 with parameters: [\"+491701234567\"]");
            tracing::debug!(target: "tokio_postgres::query", params = "+491701234568", "executing statement");
            tracing::trace!(target: "postgres_protocol::message", "+491701234569");
            tracing::debug!(target: "deadpool.postgres", "+491701234570");
            log::info!(target: "tokio_postgres::connection", "a notice from the server");
            tracing::info!(target: "sendwell::store", "the store is open");
            tracing::debug!(target: "sendwell::store", "a debug line of sendwell");
        });
        buffer.text()
    }

    #[test]
    fn no_filter_lets_postgres_parameters_into_the_log() {
        for directives in [
            "tokio_postgres::query=debug",
            "debug,tokio_postgres::query=trace",
            "trace",
            "tokio_postgres=trace,postgres_protocol=trace,deadpool=trace,sendwell=debug",
        ] {
            for (format, journal) in [
                (LogFormat::Text, false),
                (LogFormat::Text, true),
                (LogFormat::Json, false),
            ] {
                let text = logged(&format!("info,{directives}"), format, journal);
                assert!(
                    !text.contains("+4917012345"),
                    "{directives} ({format:?}, journal {journal}):\n{text}"
                );
                assert!(text.contains("the store is open"), "{directives}:\n{text}");
                assert!(
                    text.contains("a notice from the server"),
                    "{directives}:\n{text}"
                );
            }
        }
        // The rest of the filter still works as written.
        let text = logged("info,sendwell=debug", LogFormat::Text, false);
        assert!(text.contains("a debug line of sendwell"), "{text}");
        let text = logged("warn", LogFormat::Text, false);
        assert!(!text.contains("the store is open"), "{text}");
        let text = logged("info", LogFormat::Text, true);
        assert!(text.contains("<6>"), "{text}");
    }
}
