//! GDPR tools over the consent store: `sendwell consent show | export | import | erase`.
//!
//! The store is one process's at a time (redb locks the file). When no daemon holds it, the
//! tools open it directly. When a daemon does, they go through the daemon instead: reads over
//! its admin listener (loopback, with the admin token), changes as consent events on `sendwell.consent`, which
//! every instance consumes, so a change made while the daemon runs reaches every shard.
//!
//! The functions taking a [`ConsentStore`] are shared with the admin endpoints; the ones taking
//! a [`Config`] are the subcommands, which pick the store or the daemon themselves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use jiff::Timestamp;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, PublisherConfirm};
use serde::{Deserialize, Serialize};

use super::event::{ConsentEvent, EventDecoder, Kind, MAX_EVENT_BYTES, RawConsentEvent};
use super::model::{ALL, CONFIRMED, OPTED_IN, OPTED_OUT, PurposeState};
use super::store::{Applied, ConsentStore, EraseReport};
use crate::amqp::topology::CONSENT_EXCHANGE;
use crate::config::{AdminToken, Config, Secret};
use crate::job::{Invalid, Recipient};
use crate::phone::parse_e164;
use crate::privacy::Masked;
use crate::store::{Ledger, LedgerError};

/// sysexits(3), as the rest of the command uses them.
pub const EX_USAGE: i32 = 64;
pub const EX_DATAERR: i32 = 65;
pub const EX_NOINPUT: i32 = 66;
pub const EX_UNAVAILABLE: i32 = 69;
pub const EX_CANTCREAT: i32 = 73;
pub const EX_IOERR: i32 = 74;
pub const EX_TEMPFAIL: i32 = 75;

/// How long `erase` waits for a running daemon to apply the erasure.
pub const ERASE_DEADLINE: Duration = Duration::from_secs(30);

/// The CSV columns, in export order. Import takes them in any order; `purposes` joins with `|`.
pub const CSV_COLUMNS: [&str; 7] = [
    "type", "account", "to", "purposes", "source", "at", "evidence",
];
const CSV_REQUIRED: [&str; 4] = ["type", "account", "to", "at"];

/// Rejected rows listed one by one in the import report; beyond this only counted, so a file
/// whose every row is wrong (a bad column mapping) does not become a report as big as itself.
pub const MAX_LISTED_REJECTIONS: usize = 1000;

/// Header of the events the tools publish (`consent_import`, `consent_erase`), so that
/// consumers can tell an operator's bulk change from live consent capture.
pub const HEADER_ORIGIN: &str = "x-sendwell-origin";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One canonical consent event (CONTRACT §4) per line: lossless.
    Jsonl,
    /// `type,account,to,purposes,source,at,evidence`, purposes joined with `|`.
    Csv,
}

impl Format {
    /// The format a file name suggests; `-` (standard input) reads JSON lines.
    pub fn from_path(path: &Path) -> Option<Format> {
        if path.as_os_str() == "-" {
            return Some(Format::Jsonl);
        }
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "csv" => Some(Format::Csv),
            "jsonl" | "ndjson" | "json" => Some(Format::Jsonl),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Jsonl => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{0}")]
    Usage(String),
    /// The input as a whole is unusable (a CSV header naming unknown columns): nothing applied.
    #[error("{0}")]
    Input(String),
    #[error("cannot read {path}: {source}")]
    NoInput { path: String, source: io::Error },
    #[error(transparent)]
    Store(#[from] LedgerError),
    #[error("cannot write {what}: {source}")]
    Output { what: String, source: io::Error },
    #[error("the running daemon: {0}")]
    Daemon(String),
    /// The admin token cannot be read, or the daemon refuses it: a config matter.
    #[error("config key `admin.token_file`: {0}")]
    AdminToken(String),
    #[error("broker: {0}")]
    Broker(String),
    /// Published, but the daemon did not show the change in time.
    #[error("{0}")]
    NotApplied(String),
}

impl ToolError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ToolError::Usage(_) | ToolError::AdminToken(_) => EX_USAGE,
            ToolError::Input(_) => EX_DATAERR,
            ToolError::NoInput { .. } => EX_NOINPUT,
            ToolError::Store(_) => EX_CANTCREAT,
            ToolError::Output { .. } => EX_IOERR,
            ToolError::Daemon(_) | ToolError::Broker(_) => EX_UNAVAILABLE,
            ToolError::NotApplied(_) => EX_TEMPFAIL,
        }
    }
}

impl From<io::Error> for ToolError {
    fn from(source: io::Error) -> Self {
        ToolError::Output {
            what: "the output".into(),
            source,
        }
    }
}

/// Parses a number as people write it: `+49 170 1234567`, `+49 (170) 123-4567`, `0049…`.
/// A number without `+` or `00` is refused, not guessed: `1701234567` from a spreadsheet that
/// dropped the leading 0 would otherwise read as +1 701…, somebody else's number.
pub fn parse_number(s: &str) -> Result<Recipient, String> {
    let mut t: String = s
        .chars()
        .filter(|c| !(c.is_whitespace() || "-.()/".contains(*c)))
        .collect();
    if let Some(rest) = t.strip_prefix("00") {
        t = format!("+{rest}");
    }
    if !t.starts_with('+') {
        return Err(
            "give the number with + and the country code (E.164), e.g. +491701234567".into(),
        );
    }
    parse_e164(&t)
}

// ---------------------------------------------------------------------------------------------
// show

/// Everything the store holds about one number: the data subject's proof of consent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberReport {
    pub number: String,
    /// The latest erasure of the number still remembered (by a keyed hash, not the number):
    /// events dated at or before it are void.
    #[serde(default)]
    pub erased_at: Option<Timestamp>,
    /// Oldest first; each as stored (canonical CONTRACT §4 JSON).
    pub events: Vec<EventProof>,
    /// Per account, per purpose (`*`: every purpose), what the events add up to.
    pub summaries: BTreeMap<String, BTreeMap<String, PurposeView>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventProof {
    pub account: String,
    pub event: serde_json::Value,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurposeView {
    pub opted_in: bool,
    pub confirmed: bool,
    pub opted_out: bool,
    /// The last opt-in or confirmation that counts (consent expiry runs from it).
    pub consented_at: Option<Timestamp>,
    /// Where the opt-ins that count came from.
    pub sources: Vec<String>,
}

impl From<&PurposeState> for PurposeView {
    fn from(s: &PurposeState) -> Self {
        PurposeView {
            opted_in: s.has(OPTED_IN),
            confirmed: s.has(CONFIRMED),
            opted_out: s.has(OPTED_OUT),
            consented_at: (s.consented_at > 0)
                .then(|| Timestamp::from_second(s.consented_at as i64).ok())
                .flatten(),
            sources: s.sources.iter().cloned().collect(),
        }
    }
}

/// The proof for one number, read from the store.
pub async fn number_report(
    store: &ConsentStore,
    to: &Recipient,
) -> Result<NumberReport, LedgerError> {
    let digits = to.digits();
    let history = store.history(digits).await?;
    // A summary is written with the history it sums up and removed with it, so the accounts
    // with history are the accounts with a summary.
    let accounts: BTreeSet<&str> = history.iter().map(|p| p.account.as_str()).collect();
    let mut summaries = BTreeMap::new();
    for account in accounts {
        let s = store.summary(digits, account).await?;
        if !s.is_empty() {
            summaries.insert(
                account.to_string(),
                s.iter()
                    .map(|(p, st)| (p.clone(), PurposeView::from(st)))
                    .collect(),
            );
        }
    }
    Ok(NumberReport {
        number: to.as_str().to_string(),
        erased_at: store
            .erased_at(digits)
            .await?
            .and_then(|ms| Timestamp::from_millisecond(ms).ok()),
        events: history
            .into_iter()
            .map(|p| EventProof {
                account: p.account,
                event: p.event,
            })
            .collect(),
        summaries,
    })
}

impl fmt::Display for NumberReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} consent event{}",
            self.number,
            self.events.len(),
            if self.events.len() == 1 { "" } else { "s" }
        )?;
        if let Some(at) = self.erased_at {
            writeln!(f, "erased at {at}: events dated at or before then are void")?;
        }
        let mut accounts: BTreeSet<&str> = self.events.iter().map(|e| e.account.as_str()).collect();
        accounts.extend(self.summaries.keys().map(String::as_str));
        for account in accounts {
            writeln!(f, "\naccount {account}")?;
            for e in self.events.iter().filter(|e| e.account == account) {
                let ev = &e.event;
                let kind = ev["type"].as_str().unwrap_or("?");
                let purposes: Vec<&str> = ev["purposes"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|p| p.as_str()).collect())
                    .unwrap_or_default();
                let purposes = match (purposes.is_empty(), kind) {
                    (false, _) => purposes.join(", "),
                    (true, "opt_out") => "(every purpose)".into(),
                    (true, "confirm") => "(every purpose awaiting confirmation)".into(),
                    (true, _) => String::new(),
                };
                writeln!(
                    f,
                    "  {}  {kind:<8} {purposes}",
                    ev["at"].as_str().unwrap_or("?")
                )?;
                writeln!(
                    f,
                    "      source:   {}",
                    ev["source"].as_str().unwrap_or("-")
                )?;
                match ev["evidence"].as_str() {
                    // Quoted and escaped: evidence is the customer's own text, newlines and all.
                    Some(text) => writeln!(f, "      evidence: {text:?}")?,
                    None => writeln!(f, "      evidence: -")?,
                }
            }
            let Some(summary) = self.summaries.get(account) else {
                writeln!(f, "  adds up to: no consent")?;
                continue;
            };
            writeln!(f, "  adds up to:")?;
            for (purpose, v) in summary {
                let name = if purpose == ALL {
                    "every purpose"
                } else {
                    purpose
                };
                let state = if v.opted_out {
                    "opted out".to_string()
                } else if v.confirmed {
                    "opted in, confirmed".to_string()
                } else if v.opted_in {
                    "opted in, not confirmed".to_string()
                } else {
                    "no consent".to_string()
                };
                write!(f, "    {name}: {state}")?;
                if let Some(at) = v.consented_at {
                    write!(f, "; consented at {at}")?;
                }
                if !v.sources.is_empty() {
                    write!(f, "; opt-in sources: {}", v.sources.join(", "))?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// export

/// Writes every stored event to `out`; returns how many. Reads the store page by page (the
/// daemon keeps writing meanwhile): an event recorded during the export may or may not be in
/// it, every event recorded before it started is.
pub async fn export_events(
    store: &ConsentStore,
    format: Format,
    out: &mut (dyn Write + Send),
) -> Result<u64, ToolError> {
    let out_err = |source| ToolError::Output {
        what: "the export".into(),
        source,
    };
    let mut n = 0u64;
    let mut failed: Option<ToolError> = None;
    match format {
        Format::Jsonl => {
            store
                .for_each_event(|v| {
                    if failed.is_some() {
                        return;
                    }
                    match out.write_all(v).and_then(|_| out.write_all(b"\n")) {
                        Ok(()) => n += 1,
                        Err(e) => failed = Some(out_err(e)),
                    }
                })
                .await?;
        }
        Format::Csv => {
            let mut w = csv::Writer::from_writer(&mut *out);
            w.write_record(CSV_COLUMNS).map_err(|e| out_err(e.into()))?;
            store
                .for_each_event(|v| {
                    if failed.is_some() {
                        return;
                    }
                    match csv_record(v) {
                        Ok(r) => match w.write_record(&r) {
                            Ok(()) => n += 1,
                            Err(e) => failed = Some(out_err(e.into())),
                        },
                        Err(e) => failed = Some(e),
                    }
                })
                .await?;
            w.flush().map_err(out_err)?;
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    out.flush().map_err(out_err)?;
    Ok(n)
}

/// [`export_events`] for the running daemon, written to an unlinked file in `spool_dir` (the
/// state directory, which holds the same data); returns the file, read from its start, for
/// the caller to copy to the client. The store is then read only as fast as the local disk
/// takes, never at the pace of a slow client, so an erasure's compaction (which waits for
/// readers) is not held up by one.
pub async fn export_spooled(
    store: &ConsentStore,
    format: Format,
    spool_dir: &Path,
) -> Result<(std::fs::File, u64), ToolError> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let spool_err = |source| ToolError::Output {
        what: format!("the export spool in {}", spool_dir.display()),
        source,
    };
    let path = spool_dir.join(format!(
        ".consent-export-{}.tmp",
        uuid::Uuid::new_v4().simple()
    ));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(spool_err)?;
    // Unlinked at once: the data lives only as long as this handle, whatever happens next.
    std::fs::remove_file(&path).map_err(spool_err)?;
    let n = {
        let mut w = io::BufWriter::with_capacity(CHUNK, &mut file);
        export_events(store, format, &mut w).await?
    };
    file.seek(SeekFrom::Start(0)).map_err(spool_err)?;
    Ok((file, n))
}

#[derive(Deserialize)]
struct Stored {
    #[serde(rename = "type")]
    kind: String,
    account: String,
    to: String,
    #[serde(default)]
    purposes: Vec<String>,
    source: Option<String>,
    at: String,
    evidence: Option<String>,
}

fn csv_record(json: &[u8]) -> Result<[String; 7], ToolError> {
    let e: Stored = serde_json::from_slice(json)
        .map_err(|e| LedgerError::Store(format!("a stored consent event does not parse: {e}")))?;
    if let Some(p) = e.purposes.iter().find(|p| p.contains('|')) {
        return Err(ToolError::Input(format!(
            "purpose {p:?} contains `|`, which CSV uses to join purposes: export with --format jsonl"
        )));
    }
    Ok([
        e.kind,
        e.account,
        e.to,
        e.purposes.join("|"),
        e.source.unwrap_or_default(),
        e.at,
        e.evidence.unwrap_or_default(),
    ])
}

/// A `Write` that hands the bytes on in chunks over a channel, for streaming an export from a
/// blocking thread into an HTTP body without holding it all in memory.
pub struct ChunkSender {
    buf: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, io::Error>>,
}

const CHUNK: usize = 64 * 1024;

impl ChunkSender {
    pub fn new(tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, io::Error>>) -> Self {
        Self {
            buf: Vec::with_capacity(CHUNK),
            tx,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(chunk.into()))
            // The client went away: stop producing.
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client disconnected"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

// ---------------------------------------------------------------------------------------------
// import

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// 1-based line of the input where the row starts.
    pub line: u64,
    pub reason: String,
    pub detail: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.reason, self.detail)
    }
}

/// What an import did. Which counts mean something depends on where the events went.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    pub rows: u64,
    pub valid: u64,
    /// Applied to the store by this process (the daemon was not running).
    pub applied_here: bool,
    pub new: u64,
    pub replays: u64,
    pub void: u64,
    pub erased: u64,
    /// Published to `sendwell.consent` (None: not published).
    pub published: Option<u64>,
    pub rejected: u64,
    /// The first [`MAX_LISTED_REJECTIONS`] rejected rows.
    pub rejections: Vec<Rejection>,
}

impl ImportReport {
    fn reject(&mut self, line: u64, reason: &str, detail: String) {
        self.rejected += 1;
        if self.rejections.len() < MAX_LISTED_REJECTIONS {
            self.rejections.push(Rejection {
                line,
                reason: reason.to_string(),
                detail,
            });
        }
    }

    pub fn exit_code(&self) -> i32 {
        if self.rejected > 0 { EX_DATAERR } else { 0 }
    }
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "rows read:       {}", self.rows)?;
        if self.applied_here {
            writeln!(f, "applied (new):   {}", self.new)?;
            writeln!(f, "already present: {}", self.replays)?;
            writeln!(
                f,
                "void:            {} (dated at or before an erasure of the number)",
                self.void
            )?;
            if self.erased > 0 {
                writeln!(f, "erased numbers:  {}", self.erased)?;
            }
        } else if self.published.is_none() {
            writeln!(
                f,
                "valid:           {} (dry run: nothing applied)",
                self.valid
            )?;
        }
        if let Some(n) = self.published {
            if self.applied_here {
                writeln!(
                    f,
                    "published:       {n} (to sendwell.consent, for the other instances)"
                )?;
            } else {
                writeln!(
                    f,
                    "published:       {n} (to sendwell.consent; the running daemon applies them, a replay changes nothing)"
                )?;
            }
        }
        writeln!(f, "rejected:        {}", self.rejected)?;
        for r in &self.rejections {
            writeln!(f, "{r}")?;
        }
        let unlisted = self.rejected - self.rejections.len() as u64;
        if unlisted > 0 {
            writeln!(f, "… and {unlisted} more rejected rows")?;
        }
        Ok(())
    }
}

struct Row {
    line: u64,
    raw: Result<RawConsentEvent, Invalid>,
}

/// Rows per batch: a batch's events for different numbers are applied concurrently, so they
/// share the store's group commits instead of paying one fsync each.
const BATCH: usize = 512;

/// Reads, validates and applies (`store`) and/or publishes (`publisher`) every row; with
/// neither it only validates (dry run). Valid rows are applied even when others are rejected.
pub async fn import_rows(
    input: Box<dyn Read + Send>,
    format: Format,
    decoder: &EventDecoder,
    store: Option<&ConsentStore>,
    mut publisher: Option<&mut ConsentPublisher>,
) -> Result<ImportReport, ToolError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Row>>(4);
    // Parsing is blocking I/O over a file that may be large: off the async threads.
    let reader = tokio::task::spawn_blocking(move || read_rows(input, format, tx));
    let mut report = ImportReport {
        applied_here: store.is_some(),
        ..Default::default()
    };
    while let Some(rows) = rx.recv().await {
        let now = Timestamp::now();
        let mut valid = Vec::with_capacity(rows.len());
        for row in rows {
            report.rows += 1;
            match row.raw.and_then(|raw| validate(decoder, raw, now)) {
                Ok(ev) => valid.push(ev),
                Err(i) => report.reject(row.line, i.reason, i.detail),
            }
        }
        report.valid += valid.len() as u64;
        if let Some(store) = store {
            for applied in apply_batch(store, &valid).await? {
                match applied {
                    Applied::New => report.new += 1,
                    Applied::Replay => report.replays += 1,
                    Applied::Void => report.void += 1,
                    Applied::Erased => report.erased += 1,
                }
            }
        }
        if let Some(p) = publisher.as_deref_mut() {
            for ev in &valid {
                p.publish(&ev.to_json()).await?;
            }
        }
    }
    reader
        .await
        .map_err(|e| ToolError::Input(format!("reading the input failed: {e}")))??;
    if let Some(store) = store {
        // Erase rows: one compaction for all of them, so no freed page keeps a number.
        store.compact_if_due().await?;
    }
    if let Some(p) = publisher {
        report.published = Some(p.wait_confirms().await?);
    }
    Ok(report)
}

/// A CRM's number formatting is not an error: the number is normalized before validation,
/// and the stored and published event carries the normalized form.
fn validate(
    decoder: &EventDecoder,
    mut raw: RawConsentEvent,
    now: Timestamp,
) -> Result<ConsentEvent, Invalid> {
    if let Ok(r) = parse_number(&raw.to) {
        raw.to = r.as_str().to_string();
    }
    decoder.validate(raw, now)
}

async fn apply_batch(
    store: &ConsentStore,
    events: &[ConsentEvent],
) -> Result<Vec<Applied>, LedgerError> {
    // The store applies one number's changes one at a time; different numbers may overlap.
    let mut lanes: HashMap<&str, Vec<&ConsentEvent>> = HashMap::new();
    for ev in events {
        lanes.entry(ev.to.digits()).or_default().push(ev);
    }
    let results = futures_util::future::join_all(lanes.into_values().map(|lane| async move {
        let mut out = Vec::with_capacity(lane.len());
        for ev in lane {
            out.push(store.apply(ev).await?);
        }
        Ok::<_, LedgerError>(out)
    }))
    .await;
    let mut all = Vec::with_capacity(events.len());
    for r in results {
        all.extend(r?);
    }
    Ok(all)
}

fn read_rows(
    input: Box<dyn Read + Send>,
    format: Format,
    tx: tokio::sync::mpsc::Sender<Vec<Row>>,
) -> Result<(), ToolError> {
    let read_err = |source| ToolError::NoInput {
        path: "the input".into(),
        source,
    };
    let mut batch = Vec::with_capacity(BATCH);
    let push = |row: Row, batch: &mut Vec<Row>| -> bool {
        batch.push(row);
        if batch.len() >= BATCH {
            // The importer stopped (a store error it reports itself): stop reading.
            return tx.blocking_send(std::mem::take(batch)).is_ok();
        }
        true
    };
    match format {
        Format::Jsonl => {
            let mut r = io::BufReader::new(input);
            let mut buf = Vec::new();
            let mut line = 0u64;
            loop {
                buf.clear();
                if r.read_until(b'\n', &mut buf).map_err(read_err)? == 0 {
                    break;
                }
                line += 1;
                if buf.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                let raw = if buf.len() > MAX_EVENT_BYTES {
                    Err(Invalid::new(
                        "too_large",
                        format!(
                            "the row is {} bytes; the limit is {MAX_EVENT_BYTES}",
                            buf.len()
                        ),
                    ))
                } else {
                    serde_json::from_slice(&buf)
                        .map_err(|e| Invalid::new("malformed", e.to_string()))
                };
                if !push(Row { line, raw }, &mut batch) {
                    return Ok(());
                }
            }
        }
        Format::Csv => {
            let mut rdr = csv::ReaderBuilder::new()
                .has_headers(true)
                .flexible(false)
                .from_reader(input);
            let columns = csv_columns(
                rdr.headers()
                    .map_err(|e| ToolError::Input(format!("CSV header: {e}")))?,
            )?;
            for rec in rdr.records() {
                let row = match rec {
                    Ok(r) => Row {
                        line: r.position().map(|p| p.line()).unwrap_or(0),
                        raw: csv_row(&r, &columns),
                    },
                    Err(e) => {
                        if let csv::ErrorKind::Io(_) = e.kind() {
                            return Err(read_err(io::Error::other(e.to_string())));
                        }
                        Row {
                            line: e.position().map(|p| p.line()).unwrap_or(0),
                            raw: Err(Invalid::new("malformed", e.to_string())),
                        }
                    }
                };
                if !push(row, &mut batch) {
                    return Ok(());
                }
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(batch);
    }
    Ok(())
}

/// Column positions by name. An unknown column fails the whole file: a CRM's `purpose` for
/// `purposes` would otherwise turn an opt-out for one purpose into an opt-out for every one.
fn csv_columns(header: &csv::StringRecord) -> Result<HashMap<&'static str, usize>, ToolError> {
    let mut cols = HashMap::new();
    for (i, h) in header.iter().enumerate() {
        let h = h.trim();
        let Some(name) = CSV_COLUMNS.iter().find(|c| **c == h) else {
            return Err(ToolError::Input(format!(
                "CSV header: unknown column {h:?}; the columns are {}",
                CSV_COLUMNS.join(",")
            )));
        };
        if cols.insert(*name, i).is_some() {
            return Err(ToolError::Input(format!(
                "CSV header: column {h:?} appears twice"
            )));
        }
    }
    if let Some(missing) = CSV_REQUIRED.iter().find(|c| !cols.contains_key(*c)) {
        return Err(ToolError::Input(format!(
            "CSV header: column {missing:?} is missing; the columns are {}",
            CSV_COLUMNS.join(",")
        )));
    }
    Ok(cols)
}

fn csv_row(
    r: &csv::StringRecord,
    cols: &HashMap<&'static str, usize>,
) -> Result<RawConsentEvent, Invalid> {
    let field = |name: &str| cols.get(name).and_then(|i| r.get(*i)).unwrap_or("");
    // Source and evidence are kept verbatim (they are the proof, and an export must come back
    // byte for byte); an empty field is absent.
    let verbatim = |name: &str| Some(field(name).to_string()).filter(|s| !s.is_empty());
    let kind = field("type").trim();
    let kind: Kind =
        serde_json::from_value(serde_json::Value::String(kind.to_string())).map_err(|_| {
            Invalid::new(
                "invalid_type",
                format!("type {kind:?} is not opt_in, confirm, opt_out or erase"),
            )
        })?;
    let at = field("at").trim();
    let at: Timestamp = at
        .parse()
        .map_err(|e| Invalid::new("invalid_time", format!("at {at:?}: {e}")))?;
    let purposes: Vec<String> = field("purposes")
        .split('|')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect();
    Ok(RawConsentEvent {
        kind,
        account: field("account").trim().to_string(),
        to: field("to").trim().to_string(),
        purposes: Some(purposes),
        source: verbatim("source"),
        at,
        evidence: verbatim("evidence"),
    })
}

// ---------------------------------------------------------------------------------------------
// publishing

/// Publishes consent events to `sendwell.consent` with publisher confirms.
pub struct ConsentPublisher {
    conn: Connection,
    ch: lapin::Channel,
    pending: FuturesUnordered<PublisherConfirm>,
    confirmed: u64,
    failed: u64,
    origin: &'static str,
    /// Our broker user, as `user_id`: the daemon honours the origin header only when the
    /// broker vouches for it (see `amqp::provenance`).
    user: String,
}

/// Confirms outstanding at once: enough to keep the broker busy.
const WINDOW: usize = 1024;

impl ConsentPublisher {
    /// `redacted` names the broker in errors without its password.
    pub async fn connect(
        url: &str,
        redacted: &str,
        origin: &'static str,
    ) -> Result<Self, ToolError> {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(|e| ToolError::Broker(format!("cannot reach {redacted}: {e}")))?;
        let ch = conn.create_channel().await.map_err(broker_err)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker_err)?;
        Ok(Self {
            conn,
            ch,
            pending: FuturesUnordered::new(),
            confirmed: 0,
            failed: 0,
            origin,
            user: crate::amqp::provenance::broker_user(url),
        })
    }

    pub async fn publish(&mut self, body: &[u8]) -> Result<(), ToolError> {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(HEADER_ORIGIN),
            AMQPValue::LongString(LongString::from(self.origin)),
        );
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(Timestamp::now().as_second().max(0) as u64)
            .with_headers(headers)
            .with_user_id(self.user.as_str().into());
        let confirm = self
            .ch
            .basic_publish(
                CONSENT_EXCHANGE.into(),
                "".into(),
                // Mandatory: with no instance's queue bound, nobody would ever apply it.
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .map_err(broker_err)?;
        self.pending.push(confirm);
        while self.pending.len() >= WINDOW {
            self.tally().await?;
        }
        Ok(())
    }

    async fn tally(&mut self) -> Result<(), ToolError> {
        match self.pending.next().await {
            Some(Ok(Confirmation::Ack(None))) => self.confirmed += 1,
            Some(Ok(_)) => self.failed += 1,
            Some(Err(e)) => return Err(broker_err(e)),
            None => {}
        }
        Ok(())
    }

    /// Waits for every confirm; returns how many events the broker confirmed.
    pub async fn wait_confirms(&mut self) -> Result<u64, ToolError> {
        while !self.pending.is_empty() {
            self.tally().await?;
        }
        if self.failed > 0 {
            return Err(ToolError::Broker(format!(
                "{} event(s) were not confirmed (nacked, or unroutable: is a daemon's sendwell.consent.<shard> queue bound?)",
                self.failed
            )));
        }
        Ok(self.confirmed)
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "published".into()).await;
    }
}

fn broker_err(e: lapin::Error) -> ToolError {
    ToolError::Broker(format!(
        "{e} (has a daemon run once to declare {CONSENT_EXCHANGE}?)"
    ))
}

// ---------------------------------------------------------------------------------------------
// the running daemon

/// The running daemon's admin listener.
pub struct Daemon {
    base: String,
    http: reqwest::Client,
    /// The admin token, or why it cannot be read: only the reads need it, so an import or
    /// erasure that goes through the broker is not held up by it.
    token: Result<Secret, String>,
}

/// The admin token the running daemon asks for: `admin.token_file`, or the one it wrote to
/// `state.dir` at start.
pub fn admin_token(config: &Config) -> Result<Secret, String> {
    match &config.admin.token {
        AdminToken::File(t) => Ok(t.clone()),
        AdminToken::Generated(path) => crate::config::read_secret(path).map_err(|e| {
            format!(
                "unset, so the token is the one the daemon writes to {} at each start, but {e}; run this as the daemon's user (or root), or set admin.token_file for both",
                path.display()
            )
        }),
    }
}

impl Daemon {
    pub fn new(listen: SocketAddr, token: Result<Secret, String>) -> Result<Daemon, ToolError> {
        if listen.port() == 0 {
            return Err(ToolError::Daemon(
                "the state store is locked, so a daemon is running, but admin.listen has port 0 and its port is unknown: set SENDWELL_ADMIN__LISTEN to the daemon's admin address".into(),
            ));
        }
        // A wildcard listener answers on loopback too, and only loopback may read consent.
        let ip = match listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // A proxy from the environment must not see personal data, nor get in between.
            .no_proxy()
            .build()
            .map_err(|e| ToolError::Daemon(format!("HTTP client: {e}")))?;
        Ok(Daemon {
            base: format!("http://{}", SocketAddr::new(ip, listen.port())),
            http,
            token,
        })
    }

    async fn get(&self, path: &str) -> Result<reqwest::Response, ToolError> {
        let token = self
            .token
            .as_ref()
            .map_err(|e| ToolError::AdminToken(e.clone()))?;
        let url = format!("{}{path}", self.base);
        let r = self
            .http
            .get(&url)
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(|e| {
            ToolError::Daemon(format!(
                "the state store is locked, so a daemon is running, but its admin listener at {} does not answer: {e}",
                self.base
            ))
        })?;
        match r.status() {
            s if s.is_success() => Ok(r),
            reqwest::StatusCode::UNAUTHORIZED => Err(ToolError::AdminToken(format!(
                "{} refused the admin token: the daemon and this command must read the same token (when admin.token_file is unset, the daemon writes a new one at each start; a daemon restarted meanwhile has a new one)",
                self.base
            ))),
            reqwest::StatusCode::FORBIDDEN => Err(ToolError::Daemon(format!(
                "{} refused: consent endpoints answer loopback clients only (admin.listen must be a loopback or wildcard address)",
                self.base
            ))),
            reqwest::StatusCode::NOT_FOUND => Err(ToolError::Daemon(format!(
                "{} has no consent endpoints: is the daemon older than this command?",
                self.base
            ))),
            s => {
                let body = r.text().await.unwrap_or_default();
                Err(ToolError::Daemon(format!("{url}: {s}: {}", body.trim())))
            }
        }
    }

    pub async fn show(&self, to: &Recipient) -> Result<NumberReport, ToolError> {
        let body = self
            .get(&format!("/consent/{}", to.digits()))
            .await?
            .bytes()
            .await
            .map_err(|e| ToolError::Daemon(format!("reading the answer: {e}")))?;
        serde_json::from_slice(&body)
            .map_err(|e| ToolError::Daemon(format!("unexpected answer to /consent: {e}")))
    }

    /// Streams the daemon's export to `out`; returns the bytes written.
    pub async fn export(&self, format: Format, out: &mut dyn Write) -> Result<u64, ToolError> {
        let format = match format {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        };
        let mut r = self
            .get(&format!("/consent/export?format={format}"))
            .await?;
        let mut n = 0u64;
        // An export cut short ends in an error here, never in a silently truncated file.
        while let Some(chunk) = r
            .chunk()
            .await
            .map_err(|e| ToolError::Daemon(format!("the export broke off: {e}")))?
        {
            out.write_all(&chunk).map_err(|source| ToolError::Output {
                what: "the export".into(),
                source,
            })?;
            n += chunk.len() as u64;
        }
        out.flush().map_err(|source| ToolError::Output {
            what: "the export".into(),
            source,
        })?;
        Ok(n)
    }
}

// ---------------------------------------------------------------------------------------------
// the subcommands

/// Where the consent is: the store itself, or a running daemon holding it.
pub enum Target {
    Store(Arc<ConsentStore>),
    Daemon(Daemon),
}

/// Opens the store when no daemon holds it; otherwise finds the daemon.
pub async fn target(config: &Config) -> Result<Target, ToolError> {
    match Ledger::open_state(&config.state, true).await {
        Ok(ledger) => Ok(Target::Store(ConsentStore::load(ledger, config).await?)),
        Err(LedgerError::InUse) => Ok(Target::Daemon(Daemon::new(
            config.admin.listen,
            admin_token(config),
        )?)),
        Err(e) => Err(e.into()),
    }
}

fn number_arg(number: &str) -> Result<Recipient, ToolError> {
    parse_number(number).map_err(|why| ToolError::Usage(format!("{}: {why}", Masked(number))))
}

/// `consent show NUMBER`.
pub async fn show(config: &Config, number: &str) -> Result<NumberReport, ToolError> {
    let to = number_arg(number)?;
    match target(config).await? {
        Target::Store(store) => Ok(number_report(&store, &to).await?),
        Target::Daemon(d) => d.show(&to).await,
    }
}

/// What `consent export` wrote.
#[derive(Debug)]
pub enum Exported {
    Events(u64),
    /// Through the running daemon: its stream carries no count.
    Bytes(u64),
}

/// `consent export`: to `output` (written whole or not at all) or standard output.
pub async fn export(
    config: &Config,
    format: Format,
    output: Option<&Path>,
) -> Result<Exported, ToolError> {
    let target = target(config).await?;
    let Some(path) = output else {
        let mut out = io::BufWriter::new(io::stdout());
        return export_to(&target, format, &mut out).await;
    };
    // Written aside and renamed when complete: a broken export never looks like a whole one.
    let partial = partial_path(path);
    let file = std::fs::File::create(&partial).map_err(|source| ToolError::Output {
        what: partial.display().to_string(),
        source,
    })?;
    let mut out = io::BufWriter::new(file);
    let result = export_to(&target, format, &mut out).await.and_then(|n| {
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&partial, path)?;
        Ok(n)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result.map_err(|e| match e {
        ToolError::Output { source, .. } => ToolError::Output {
            what: path.display().to_string(),
            source,
        },
        e => e,
    })
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

async fn export_to(
    target: &Target,
    format: Format,
    out: &mut (dyn Write + Send),
) -> Result<Exported, ToolError> {
    match target {
        Target::Store(store) => Ok(Exported::Events(export_events(store, format, out).await?)),
        Target::Daemon(d) => Ok(Exported::Bytes(d.export(format, out).await?)),
    }
}

/// `consent import FILE`.
pub async fn import(
    config: &Config,
    file: &Path,
    format: Option<Format>,
    dry_run: bool,
    publish: bool,
) -> Result<ImportReport, ToolError> {
    let Some(format) = format.or_else(|| Format::from_path(file)) else {
        return Err(ToolError::Usage(format!(
            "cannot tell the format of {} from its extension: give --format jsonl or --format csv",
            file.display()
        )));
    };
    let input: Box<dyn Read + Send> = if file.as_os_str() == "-" {
        Box::new(io::stdin())
    } else {
        Box::new(
            std::fs::File::open(file).map_err(|source| ToolError::NoInput {
                path: file.display().to_string(),
                source,
            })?,
        )
    };
    let decoder = EventDecoder::new(config);
    if dry_run {
        return import_rows(input, format, &decoder, None, None).await;
    }
    let connect = || {
        ConsentPublisher::connect(
            config.broker.url.expose(),
            &config.broker.redacted_url,
            "consent_import",
        )
    };
    match target(config).await? {
        Target::Store(store) => {
            // Connected before anything is applied: an unreachable broker changes nothing.
            let mut publisher = if publish {
                Some(connect().await?)
            } else {
                None
            };
            let r = import_rows(input, format, &decoder, Some(&store), publisher.as_mut()).await;
            if let Some(p) = publisher {
                p.close().await;
            }
            r
        }
        Target::Daemon(_) => {
            let mut p = connect().await?;
            let r = import_rows(input, format, &decoder, None, Some(&mut p)).await;
            p.close().await;
            r
        }
    }
}

/// What `consent erase` did.
#[derive(Debug)]
pub enum Erased {
    /// Erased in the store by this process.
    Here {
        report: EraseReport,
        published: bool,
    },
    /// Erased by the running daemon, which applied the published erase event.
    ByDaemon { consent_events: u64, accounts: u64 },
}

impl Erased {
    /// The operator's confirmation. The number is masked (per `log.mask_numbers`): output of
    /// an erasure often ends up in a log, which should not keep what was just erased.
    pub fn describe(&self, number: &str) -> String {
        let number = Masked(number);
        match self {
            Erased::Here { report, published } => {
                let mut s = format!(
                    "erased {number}: {} consent event(s), {} summary row(s), {} pending confirmation(s), {} job(s), {} other row(s)",
                    report.consent_events,
                    report.summaries,
                    report.pending_confirmations,
                    report.jobs,
                    report.other_rows
                );
                if *published {
                    s.push_str("; erase event published to sendwell.consent");
                }
                s
            }
            Erased::ByDaemon {
                consent_events,
                accounts,
            } => format!(
                "erased {number} through the running daemon: {consent_events} consent event(s) in {accounts} account(s), and every other trace; the daemon confirmed it"
            ),
        }
    }
}

/// `consent erase NUMBER` (the caller has the operator's `--yes`).
pub async fn erase(config: &Config, number: &str, publish: bool) -> Result<Erased, ToolError> {
    let to = number_arg(number)?;
    let now = Timestamp::now();
    let event = erase_event(config, &to, now)?;
    let connect = || {
        ConsentPublisher::connect(
            config.broker.url.expose(),
            &config.broker.redacted_url,
            "consent_erase",
        )
    };
    match target(config).await? {
        Target::Store(store) => {
            let mut publisher = if publish {
                Some(connect().await?)
            } else {
                None
            };
            let report = store.erase(to.digits(), now).await?;
            // No freed page of the file may keep a copy of the number.
            store.compact_if_due().await?;
            tracing::info!(to = %to.masked(), "Number erased.");
            if let Some(p) = publisher.as_mut() {
                p.publish(&event.to_json()).await?;
                p.wait_confirms().await?;
            }
            if let Some(p) = publisher {
                p.close().await;
            }
            Ok(Erased::Here {
                report,
                published: publish,
            })
        }
        Target::Daemon(d) => {
            let before = d.show(&to).await?;
            let mut p = connect().await?;
            p.publish(&event.to_json()).await?;
            p.wait_confirms().await?;
            p.close().await;
            await_erasure(&d, &to, now, ERASE_DEADLINE).await?;
            Ok(Erased::ByDaemon {
                consent_events: before.events.len() as u64,
                accounts: before
                    .events
                    .iter()
                    .map(|e| e.account.as_str())
                    .collect::<BTreeSet<_>>()
                    .len() as u64,
            })
        }
    }
}

fn erase_event(config: &Config, to: &Recipient, at: Timestamp) -> Result<ConsentEvent, ToolError> {
    // An erasure forgets the number in every account; the event names one because the
    // contract requires an account.
    let account = config
        .accounts
        .first()
        .ok_or_else(|| ToolError::Usage("the config names no account".into()))?;
    EventDecoder::new(config)
        .validate(
            RawConsentEvent {
                kind: Kind::Erase,
                account: account.name.to_string(),
                to: to.as_str().to_string(),
                purposes: None,
                source: Some("sendwell_consent_erase".into()),
                at,
                evidence: None,
            },
            at,
        )
        .map_err(|i| ToolError::Usage(format!("{}: {}", i.reason, i.detail)))
}

/// Polls the daemon until its store shows the erasure: the tombstone at least as new as ours
/// and no event left.
async fn await_erasure(
    d: &Daemon,
    to: &Recipient,
    at: Timestamp,
    within: Duration,
) -> Result<(), ToolError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let r = d.show(to).await?;
        if r.events.is_empty()
            && r.erased_at
                .is_some_and(|e| e.as_millisecond() >= at.as_millisecond())
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ToolError::NotApplied(format!(
                "the erase event for {} is published and confirmed by the broker, but the daemon did not apply it within {}s: check its consent queue and logs, then `consent show` again",
                Masked(to.as_str()),
                within.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_as_people_write_them_but_never_guessed() {
        for s in [
            "+491701234567",
            "+49 170 1234567",
            "+49 (170) 123-4567",
            "0049 170 1234567",
            "\u{a0}+49.170.1234567 ",
        ] {
            assert_eq!(parse_number(s).unwrap().as_str(), "+491701234567", "{s}");
        }
        assert!(parse_number("1701234567").is_err());
        assert!(parse_number("491701234567").is_err());
        assert!(parse_number("+999 1234 5678").is_err());
    }

    #[test]
    fn the_format_follows_the_extension() {
        assert_eq!(Format::from_path(Path::new("a.CSV")), Some(Format::Csv));
        assert_eq!(Format::from_path(Path::new("a.jsonl")), Some(Format::Jsonl));
        assert_eq!(Format::from_path(Path::new("-")), Some(Format::Jsonl));
        assert_eq!(Format::from_path(Path::new("a.txt")), None);
    }

    #[test]
    fn a_csv_header_with_an_unknown_or_missing_column_is_refused() {
        let h = csv::StringRecord::from(vec!["type", "account", "to", "purpose", "at"]);
        assert!(matches!(csv_columns(&h), Err(ToolError::Input(m)) if m.contains("\"purpose\"")));
        let h = csv::StringRecord::from(vec!["type", "account", "to"]);
        assert!(matches!(csv_columns(&h), Err(ToolError::Input(m)) if m.contains("\"at\"")));
        let h = csv::StringRecord::from(vec!["at", "to", " account", "type"]);
        assert_eq!(csv_columns(&h).unwrap()["account"], 2);
    }

    #[test]
    fn a_csv_row_keeps_source_and_evidence_verbatim() {
        let h = csv::StringRecord::from(CSV_COLUMNS.to_vec());
        let cols = csv_columns(&h).unwrap();
        let r = csv::StringRecord::from(vec![
            " opt_in",
            "acme-de",
            "+491701234567",
            "a| b |",
            " web ",
            "2026-11-28T08:59:00Z",
            "",
        ]);
        let raw = csv_row(&r, &cols).unwrap();
        assert_eq!(raw.kind, Kind::OptIn);
        assert_eq!(raw.purposes, Some(vec!["a".into(), "b".into()]));
        assert_eq!(raw.source.as_deref(), Some(" web "));
        assert_eq!(raw.evidence, None);
        let r =
            csv::StringRecord::from(vec!["optin", "a", "b", "", "", "2026-11-28T08:59:00Z", ""]);
        assert_eq!(csv_row(&r, &cols).unwrap_err().reason, "invalid_type");
    }

    #[test]
    fn exit_codes_follow_sysexits() {
        assert_eq!(ToolError::Usage("x".into()).exit_code(), 64);
        assert_eq!(ToolError::Input("x".into()).exit_code(), 65);
        assert_eq!(ToolError::Store(LedgerError::InUse).exit_code(), 73);
        assert_eq!(ToolError::Daemon("x".into()).exit_code(), 69);
        assert_eq!(ToolError::Broker("x".into()).exit_code(), 69);
        let r = ImportReport {
            rejected: 1,
            ..Default::default()
        };
        assert_eq!(r.exit_code(), 65);
    }
}
