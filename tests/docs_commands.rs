//! The commands README.md and docs/*.md show work as written, and their links lead somewhere.
//!
//! Every ```sh block of the README and of each page under docs/ is read and cut into commands
//! (a line, with its `\` continuations and its here-document). Each command is either run or
//! listed below as skipped, by pattern, with the reason; a command that matches neither fails
//! the test, so a new example cannot go untried by accident. The commands run from the
//! repository root, as a reader of the README does, against a daemon this test starts the same
//! way `scripts/run-daemon.sh` does (`sendwell run --config config/sendwell.toml`). What is
//! substituted, and nothing else:
//!
//! - the binary: `target/release/sendwell` (a release build) becomes the binary cargo built for
//!   this test, and `sendwell` / `sw` at the start of a command (the installed binary; `sw` is
//!   the operations guide's wrapper that runs it with `/etc/sendwell/sendwell.toml` and its
//!   credentials) are shell functions running that binary, `sw` with
//!   `SENDWELL_CONFIG=config/sendwell.toml`;
//! - the ports: `127.0.0.1:8089` (sandbox), `9187` (admin) and `8088` (webhook) become free
//!   ports, so the test does not collide with a daemon the machine may be running;
//! - the environment: the broker's vhost, the state directory and those ports are set with
//!   `SENDWELL_<SECTION>__<KEY>` variables, the overrides every command reads (as the README
//!   tells a reader whose state directory is `./state`).
//!
//! A block whose commands all run is run as one script (`bash -euo pipefail`), so background
//! jobs, `wait` and here-documents keep their meaning; the runnable commands of a block that
//! also holds skipped ones run one by one. A few blocks have their output checked as well.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// Commands not run, by how they start, and why. The first match decides.
const SKIP: &[(&str, &str)] = &[
    (
        "scripts/run-daemon.sh",
        "long-running: it is the daemon, and this test starts the same binary with the same config",
    ),
    (
        "scripts/test.sh",
        "the whole test suite, of which this test is a part",
    ),
    (
        "cargo ",
        "builds (cargo-deb, a release package): minutes, and not a command of sendwell",
    ),
    (
        "sudo ",
        "changes the host: packages, systemd units, /etc/sendwell, credentials",
    ),
    ("systemctl ", "the production host's systemd units"),
    ("journalctl ", "the production host's journal"),
    ("df ", "the production host's state directory"),
    ("cd /etc", "the production host's credentials"),
    (
        "sw() ",
        "defines the production wrapper; this test defines its own (see the module docs)",
    ),
    (
        "swn() ",
        "defines the production wrapper for shard instances",
    ),
    (
        "swn ",
        "a shard instance (sendwell@N) on the production host",
    ),
    (
        "sw state ",
        "needs the daemon stopped (backup, migrate) or replaces its store (restore)",
    ),
    ("sw consent erase", "irreversible: erases a number"),
    (
        "sw dead replay",
        "moves dead letters back to the jobs queue",
    ),
];

/// Commands run, by how they start. Anything else is neither run nor skipped: the test fails.
const RUN: &[&str] = &[
    "target/release/sendwell publish ",
    "target/release/sendwell tail ",
    "target/release/sendwell consent show ",
    "target/release/sendwell consent import ",
    "target/release/sendwell consent export",
    "target/release/sendwell dead list",
    "target/release/sendwell check-config",
    "sendwell check-config",
    "sw check-config",
    "sw dead list",
    "curl ",
    "sleep ",
    "wait",
    "until ",
];

/// A ```sh block: where it is, and its text.
struct Block {
    file: String,
    line: usize,
    text: String,
}

/// README.md and docs/*.md (not docs/design/: design notes, not instructions).
fn documents() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut names = vec!["README.md".to_string()];
    let mut pages: Vec<String> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    pages.sort();
    names.extend(pages);
    names
        .into_iter()
        .map(|n| {
            let text = std::fs::read_to_string(root.join(&n)).unwrap();
            (n, text)
        })
        .collect()
}

fn sh_blocks(docs: &[(String, String)]) -> Vec<Block> {
    let mut blocks = Vec::new();
    for (file, text) in docs {
        let mut open: Option<(usize, String)> = None;
        for (i, line) in text.lines().enumerate() {
            match &mut open {
                None if line.trim_end() == "```sh" => open = Some((i + 2, String::new())),
                Some(_) if line.starts_with("```") => {
                    let (start, text) = open.take().unwrap();
                    blocks.push(Block {
                        file: file.clone(),
                        line: start,
                        text,
                    });
                }
                Some((_, text)) => {
                    text.push_str(line);
                    text.push('\n');
                }
                None => {}
            }
        }
    }
    blocks
}

/// A block cut into commands: comment and blank lines dropped; a command keeps its `\`
/// continuation lines, its here-document, and a shell function's body.
fn commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = block.lines();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let mut cmd = line.to_string();
        let mut last = line.to_string();
        loop {
            if last.trim_end().ends_with('\\') || last.trim_end().ends_with('{') {
                let Some(next) = lines.next() else { break };
                cmd.push('\n');
                cmd.push_str(next);
                if last.trim_end().ends_with('{') {
                    // A function body, through its closing brace.
                    for body in lines.by_ref() {
                        cmd.push('\n');
                        cmd.push_str(body);
                        if body.trim() == "}" {
                            break;
                        }
                    }
                    break;
                }
                last = next.to_string();
                continue;
            }
            break;
        }
        if let Some(tag) = heredoc_tag(&cmd) {
            for body in lines.by_ref() {
                cmd.push('\n');
                cmd.push_str(body);
                if body.trim() == tag {
                    break;
                }
            }
        }
        out.push(cmd);
    }
    out
}

/// `X` of a `<<'X'`, `<<"X"` or `<<X` here-document.
fn heredoc_tag(cmd: &str) -> Option<String> {
    let rest = &cmd[cmd.find("<<")? + 2..];
    let tag: String = rest
        .trim_start_matches(['-', '\'', '"'])
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!tag.is_empty()).then_some(tag)
}

enum Verdict {
    Run,
    Skip(&'static str),
}

fn classify(cmd: &str) -> Option<Verdict> {
    let t = cmd.trim_start();
    if let Some((_, why)) = SKIP.iter().find(|(p, _)| t.starts_with(p)) {
        return Some(Verdict::Skip(why));
    }
    RUN.iter().any(|p| t.starts_with(p)).then_some(Verdict::Run)
}

/// The daemon and everything the commands need to reach it.
struct Setup {
    bin: PathBuf,
    sandbox: String,
    admin: String,
    webhook: String,
    env: Vec<(String, String)>,
}

impl Setup {
    /// The command as this test runs it (see the module docs): the port substitutions.
    fn adapt(&self, script: &str) -> String {
        script
            .replace("target/release/sendwell", &self.bin.display().to_string())
            .replace("127.0.0.1:8089", &self.sandbox)
            .replace("127.0.0.1:9187", &self.admin)
            .replace("127.0.0.1:8088", &self.webhook)
    }

    fn script(&self, script: &str) -> String {
        let bin = self.bin.display();
        format!(
            "sendwell() {{ '{bin}' \"$@\"; }}\n\
             sw() {{ SENDWELL_CONFIG=config/sendwell.toml '{bin}' \"$@\"; }}\n\
             {}",
            self.adapt(script)
        )
    }

    /// Runs a script from the repository root; kills it after `within`.
    async fn run(&self, script: &str, within: Duration) -> Output {
        let child = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &self.script(script)])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("SENDWELL_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout also stops the script's background jobs.
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let waited = tokio::time::timeout(
            within,
            tokio::task::spawn_blocking(move || child.wait_with_output()),
        )
        .await;
        match waited {
            Ok(out) => out.unwrap().unwrap(),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
                panic!("timed out after {within:?}: {script}");
            }
        }
    }
}

/// The daemon, stopped (SIGKILL: its state is a temporary directory) when the test ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// What some blocks must print, besides exiting 0: the block is found by a line it contains.
fn check_output(block: &Block, stdout: &str) {
    // Outcome events, one per line from `tail`; a line may also hold a JSON answer printed
    // without a newline just before (curl's), so each line is read as a stream of values.
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .flat_map(|l| {
            serde_json::Deserializer::from_str(l)
                .into_iter::<serde_json::Value>()
                .map_while(Result::ok)
        })
        .filter(|e| e["status"].is_string() && e["account"].is_string())
        .collect();
    let statuses = |events: &[serde_json::Value]| -> Vec<String> {
        let mut s: Vec<String> = events
            .iter()
            .filter_map(|e| e["status"].as_str().map(str::to_string))
            .collect();
        s.sort();
        s
    };
    let at = format!("{}:{}", block.file, block.line);
    if block.text.contains("tail -n 7 &") {
        // The walk-through: what its last comment says.
        assert_eq!(
            statuses(&events),
            [
                "delivered",
                "delivered",
                "read",
                "read",
                "sent",
                "sent",
                "suppressed"
            ],
            "{at}: {stdout}"
        );
        let suppressed = events.iter().find(|e| e["status"] == "suppressed").unwrap();
        assert_eq!(suppressed["reason"], "no_consent", "{at}");
        assert!(
            events
                .iter()
                .any(|e| e["status"] == "delivered" && e["billed_cost"]["currency"] == "EUR"),
            "{at}: a delivered event shows billed_cost: {stdout}"
        );
    }
    if block.text.contains("--purpose lottery") {
        let invalid = events
            .iter()
            .find(|e| e["status"] == "invalid")
            .unwrap_or_else(|| panic!("{at}: an invalid outcome: {stdout}"));
        assert_eq!(invalid["reason"], "unknown_purpose", "{at}");
        assert_eq!(invalid["category"], "marketing", "{at}");
        assert!(
            stdout.contains("unknown_purpose"),
            "{at}: dead list: {stdout}"
        );
        assert!(
            stdout.contains("website_form"),
            "{at}: consent show: {stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_the_docs_show_works_as_written() {
    let docs = documents();
    let blocks = sh_blocks(&docs);
    assert!(blocks.len() >= 10, "found only {} sh blocks", blocks.len());

    // Classify everything first: an unknown command fails before anything runs.
    let mut unknown = Vec::new();
    let mut skipped = Vec::new();
    for b in &blocks {
        for c in commands(&b.text) {
            match classify(&c) {
                None => unknown.push(format!("{}:{}: {c}", b.file, b.line)),
                Some(Verdict::Skip(why)) => {
                    skipped.push(format!("{}:{}: {c} ({why})", b.file, b.line))
                }
                Some(Verdict::Run) => {}
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "commands in the docs that this test neither runs nor skips (add them to RUN or SKIP):\n{}",
        unknown.join("\n")
    );

    let broker = TestBroker::new().await;
    let state = tempfile::tempdir().unwrap();
    let (sandbox, admin, webhook) = (free_port(), free_port(), free_port());
    let setup = Setup {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_sendwell")),
        sandbox: sandbox.clone(),
        admin: admin.clone(),
        webhook: webhook.clone(),
        env: vec![
            ("SENDWELL_BROKER__URL".into(), broker.url.clone()),
            (
                "SENDWELL_STATE__DIR".into(),
                state.path().join("state").display().to_string(),
            ),
            ("SENDWELL_SANDBOX__LISTEN".into(), sandbox),
            ("SENDWELL_ADMIN__LISTEN".into(), admin.clone()),
            ("SENDWELL_WEBHOOK__LISTEN".into(), webhook),
        ],
    };
    let log = state.path().join("daemon.log");
    let _daemon = Daemon(
        Command::new(&setup.bin)
            .args(["run", "--config", "config/sendwell.toml"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("SENDWELL_CONFIG")
            .envs(setup.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let readyz = format!("http://{admin}/readyz");
    wait_for(
        "the daemon to be ready",
        Duration::from_secs(60),
        async || {
            let r = reqwest::get(&readyz).await.ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;

    let mut ran = 0;
    for b in &blocks {
        let cmds = commands(&b.text);
        let runnable: Vec<&String> = cmds
            .iter()
            .filter(|c| matches!(classify(c), Some(Verdict::Run)))
            .collect();
        let scripts: Vec<String> = if runnable.len() == cmds.len() {
            vec![b.text.clone()]
        } else {
            runnable.into_iter().cloned().collect()
        };
        for script in scripts {
            let out = setup.run(&script, Duration::from_secs(90)).await;
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{}:{}: {}\nfailed ({}):\n{}\n{}\ndaemon log:\n{}",
                b.file,
                b.line,
                script,
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            check_output(b, &stdout);
            ran += 1;
        }
    }
    eprintln!("ran {ran} scripts; skipped:\n{}", skipped.join("\n"));
    assert!(ran >= 5, "ran only {ran} scripts");
}

/// Links that may point at a folder another branch writes (the JSON Schemas); remove an entry
/// once its target is merged.
const NOT_YET_MERGED: &[&str] = &["docs/schema"];

#[test]
fn every_relative_link_and_anchor_in_the_docs_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = documents();
    let mut broken = Vec::new();
    let mut checked = 0;
    for (file, text) in &docs {
        let dir = Path::new(file).parent().unwrap_or(Path::new(""));
        for target in links(text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let rel = if path.is_empty() {
                PathBuf::from(file)
            } else {
                normalize(&dir.join(path))
            };
            let full = root.join(&rel);
            if !full.exists() {
                let pending = NOT_YET_MERGED.iter().any(|p| rel.starts_with(p));
                if !pending {
                    broken.push(format!("{file}: {target}: no {}", rel.display()));
                }
                continue;
            }
            if let Some(anchor) = anchor {
                let anchors: BTreeSet<String> = if full.is_file() {
                    markdown_anchors(&std::fs::read_to_string(&full).unwrap())
                } else {
                    BTreeSet::new()
                };
                if !anchors.contains(anchor) {
                    broken.push(format!(
                        "{file}: {target}: no heading #{anchor} in {}",
                        rel.display()
                    ));
                }
            }
        }
    }
    assert!(checked >= 30, "checked only {checked} links");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Targets of `[text](target)` links outside fenced code and inline code.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop inline code spans, whose brackets are not links.
        let mut plain = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                plain.push_str(part);
            }
        }
        let mut rest = plain.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].trim().to_string());
            rest = &after[end..];
        }
    }
    out
}

/// `docs/../README.md` → `README.md`.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}
