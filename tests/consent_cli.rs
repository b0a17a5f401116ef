//! `sendwell consent show | export | import | erase` as an operator runs them: the real binary,
//! against a stopped daemon's state directory and against a running daemon.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use sendwell::store::{Ledger, LedgerEntry, LedgerState, Table};

/// A config and a state directory of their own; no broker or API is contacted offline.
struct Offline {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Offline {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            dir.path(),
            // Unreachable on purpose: offline tools must not need the broker.
            "amqp://guest:guest@127.0.0.1:1/%2f",
            &"127.0.0.1:9".parse().unwrap(),
            GOOD_TOKEN,
            10,
            RELAXED_LIMITS,
            "[[purposes]]\nname = \"offers\"\n",
        );
        Self { dir, config }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    fn consent(&self, args: &[&str]) -> Output {
        consent(&self.config, args, &[])
    }
}

fn consent(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sendwell"))
        .arg("consent")
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn explain(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Opens the store after the CLI process ended (the file lock is released with the process).
fn open_store(state: &Path) -> Ledger {
    Ledger::open(state).expect("no process holds the store")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

const A: &str = "491701000001";
const B: &str = "491701000002";
const C: &str = "491701000003";

/// 3 good rows (two for A, one for C, with spaces in a number, quotes and commas in evidence)
/// and 2 bad ones (line 4: unknown purpose; line 6: invalid number).
fn crm_csv() -> String {
    [
        "type,account,to,purposes,source,at,evidence",
        "opt_in,acme-de,+49 170 1000001,newsletter|offers,website_chat_bubble,2026-01-10T08:59:00Z,\"Ja, ich will den Newsletter.\"",
        "confirm,acme-de,+491701000001,newsletter,whatsapp_double_opt_in_reply,2026-01-10T09:00:00Z,YES",
        "opt_in,acme-de,+491701000002,coupons,website,2026-01-10T08:59:00Z,x",
        "opt_out,acme-de,+491701000003,,crm_call,2026-01-11T10:00:00Z,\"Called us, said \"\"stop\"\"\"",
        "opt_in,acme-de,12345,newsletter,website,2026-01-10T08:59:00Z,x",
    ]
    .join("\n")
        + "\n"
}

#[tokio::test]
async fn an_offline_csv_import_applies_the_good_rows_names_the_bad_ones_and_is_idempotent() {
    let t = Offline::new();
    let csv = t.write("crm.csv", &crm_csv());

    let o = t.consent(&["import", csv.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(65), "{}", explain(&o));
    let out = stdout(&o);
    for line in [
        "rows read:       5",
        "applied (new):   3",
        "already present: 0",
        "rejected:        2",
    ] {
        assert!(out.contains(line), "missing {line:?}\n{}", explain(&o));
    }
    assert!(out.contains("line 4: unknown_purpose: "), "{out}");
    assert!(out.contains("\"coupons\""), "{out}");
    assert!(out.contains("line 6: invalid_number: "), "{out}");
    assert_eq!(out.matches("line ").count(), 2, "{out}");

    // Again: every good row is a replay; the bad rows are still named.
    let o = t.consent(&["import", csv.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(65), "{}", explain(&o));
    let out = stdout(&o);
    assert!(out.contains("applied (new):   0"), "{out}");
    assert!(out.contains("already present: 3"), "{out}");
    assert!(out.contains("line 4: unknown_purpose"), "{out}");

    // Nothing but the good rows went in.
    let dump = open_store(&t.state()).dump_all().await.unwrap();
    let rows_with = |d: &str| {
        dump.iter()
            .filter(|(k, v)| contains(k, d.as_bytes()) || contains(v, d.as_bytes()))
            .count()
    };
    assert!(rows_with(A) > 0 && rows_with(C) > 0);
    assert_eq!(rows_with(B), 0, "a rejected row was stored");
}

#[test]
fn a_dry_run_and_a_bad_header_change_nothing() {
    let t = Offline::new();
    let csv = t.write("crm.csv", &crm_csv());
    let o = t.consent(&["import", "--dry-run", csv.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(65), "{}", explain(&o));
    assert!(
        stdout(&o).contains("valid:           3 (dry run"),
        "{}",
        explain(&o)
    );

    // `purpose` for `purposes`: the whole file is refused, not read as "every purpose".
    let bad = t.write(
        "bad.csv",
        "type,account,to,purpose,at\nopt_out,acme-de,+491701000001,offers,2026-01-10T08:59:00Z\n",
    );
    let o = t.consent(&["import", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(65), "{}", explain(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unknown column \"purpose\""),
        "{}",
        explain(&o)
    );
    let o = t.consent(&["show", "+491701000001"]);
    assert!(stdout(&o).contains("0 consent events"), "{}", explain(&o));

    // A format the extension does not tell is a usage error.
    let txt = t.write("crm.txt", &crm_csv());
    assert_eq!(
        t.consent(&["import", txt.to_str().unwrap()]).status.code(),
        Some(64)
    );
}

#[test]
fn show_prints_every_event_with_source_evidence_and_what_they_add_up_to() {
    let t = Offline::new();
    let csv = t.write("crm.csv", &crm_csv());
    t.consent(&["import", csv.to_str().unwrap()]);

    let o = t.consent(&["show", "+49 170 1000001"]);
    assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
    let out = stdout(&o);
    for want in [
        "+491701000001: 2 consent events",
        "account acme-de",
        "2026-01-10T08:59:00Z  opt_in   newsletter, offers",
        "source:   website_chat_bubble",
        "evidence: \"Ja, ich will den Newsletter.\"",
        "2026-01-10T09:00:00Z  confirm  newsletter",
        "source:   whatsapp_double_opt_in_reply",
        "evidence: \"YES\"",
        "newsletter: opted in, confirmed; consented at 2026-01-10T09:00:00Z; opt-in sources: website_chat_bubble",
        "offers: opted in, not confirmed",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }

    let o = t.consent(&["show", "--json", "+491701000003"]);
    assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["number"], "+491701000003");
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    assert_eq!(v["events"][0]["event"]["source"], "crm_call");
    assert_eq!(
        v["events"][0]["event"]["evidence"],
        "Called us, said \"stop\""
    );
    assert_eq!(v["summaries"]["acme-de"]["*"]["opted_out"], true);

    assert_eq!(t.consent(&["show", "1701000001"]).status.code(), Some(64));
}

#[test]
fn a_csv_export_imports_into_a_fresh_store_as_the_same_events() {
    let t = Offline::new();
    let csv = t.write("crm.csv", &crm_csv());
    t.consent(&["import", csv.to_str().unwrap()]);
    let exported = t.dir.path().join("export.csv");
    let o = t.consent(&[
        "export",
        "--format",
        "csv",
        "-o",
        exported.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
    let text = std::fs::read_to_string(&exported).unwrap();
    assert!(
        text.starts_with("type,account,to,purposes,source,at,evidence\n"),
        "{text}"
    );
    assert!(text.contains("newsletter|offers"), "{text}");

    let fresh = Offline::new();
    let o = fresh.consent(&["import", exported.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
    assert!(stdout(&o).contains("applied (new):   3"), "{}", explain(&o));

    let jsonl = |t: &Offline| {
        let o = t.consent(&["export"]);
        assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
        stdout(&o)
    };
    let (before, after) = (jsonl(&t), jsonl(&fresh));
    assert_eq!(before.lines().count(), 3, "{before}");
    assert_eq!(before, after, "the same events, byte for byte");
}

#[tokio::test]
async fn an_offline_erasure_leaves_no_trace_of_the_number_in_the_file() {
    let t = Offline::new();
    let csv = t.write("crm.csv", &crm_csv());
    t.consent(&["import", csv.to_str().unwrap()]);
    // Traces beyond consent: a sent job's ledger entry and delivery record, its wamid, the
    // customer-service window.
    {
        let l = open_store(&t.state());
        async {
            // With its number's index row, as the daemon records a finished job.
            l.put_with(
                "job-1",
                LedgerEntry {
                    state: LedgerState::Final,
                    attempts: 1,
                    updated_ms: jiff::Timestamp::now().as_millisecond(),
                    published: true,
                    event: format!(r#"{{"id":"job-1","to":"+{A}","status":"sent"}}"#).into_bytes(),
                },
                sendwell::store::index_job(&format!("+{A}"), "job-1", Some("wamid.X1"))
                    .into_iter()
                    .collect(),
            )
            .await
            .unwrap();
            l.kv_put(Table::Delivery, b"job-1".to_vec(), b"read".to_vec())
                .await
                .unwrap();
            l.kv_put(Table::Wamids, b"wamid.X1".to_vec(), b"job-1".to_vec())
                .await
                .unwrap();
            l.kv_put(
                Table::Inbound,
                format!("acme-de|{A}").into_bytes(),
                1u64.to_le_bytes().to_vec(),
            )
            .await
            .unwrap();
        }
        .await;
    }
    let file = Ledger::file_in(&t.state());
    assert!(contains(&std::fs::read(&file).unwrap(), A.as_bytes()));

    let o = t.consent(&["erase", "+491701000001"]);
    assert_eq!(o.status.code(), Some(64), "{}", explain(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot be undone"),
        "{}",
        explain(&o)
    );
    assert!(stdout(&t.consent(&["show", "+491701000001"])).contains("2 consent events"));

    let o = t.consent(&["erase", "--yes", "+49 170 1000001"]);
    assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
    let out = stdout(&o);
    assert!(
        out.contains("erased +49170****001: 2 consent event(s), 1 summary row(s), 0 pending confirmation(s), 1 job(s), 2 other row(s)"),
        "{out}"
    );
    // The number appears nowhere in the file: not in live rows, not in freed pages.
    let bytes = std::fs::read(&file).unwrap();
    assert!(
        !contains(&bytes, A.as_bytes()),
        "the erased number's digits are still in {}",
        file.display()
    );
    assert!(contains(&bytes, C.as_bytes()), "the other number is kept");
    {
        let dump = open_store(&t.state()).dump_all().await.unwrap();
        for (k, v) in &dump {
            assert!(
                !contains(k, A.as_bytes()) && !contains(v, A.as_bytes()),
                "a row still holds the number: {:?}",
                String::from_utf8_lossy(k)
            );
        }
        assert!(dump.iter().any(|(_, v)| contains(v, C.as_bytes())));
    }

    let o = t.consent(&["show", "+491701000001"]);
    assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
    assert!(stdout(&o).contains("0 consent events"), "{}", explain(&o));
    assert!(stdout(&o).contains("erased at "), "{}", explain(&o));

    // The same old rows again: void, dated before the erasure; they bring nothing back.
    let o = t.consent(&["import", csv.to_str().unwrap()]);
    assert!(stdout(&o).contains("void:            2"), "{}", explain(&o));
    assert!(stdout(&t.consent(&["show", "+491701000001"])).contains("0 consent events"));
}

fn jsonl_event(kind: &str, to: &str, source: &str, evidence: &str) -> String {
    serde_json::json!({
        "type": kind, "account": "acme-de", "to": to, "purposes": ["newsletter"],
        "source": source, "evidence": evidence,
        "at": (jiff::Timestamp::now() - Duration::from_secs(600)).to_string(),
    })
    .to_string()
}

/// The admin token a running daemon wrote to its state directory (no `admin.token_file`).
fn generated_token(env: &TestEnv) -> String {
    let path = env.config().state.dir.join("admin-token");
    sendwell::config::read_secret(&path)
        .expect("the daemon wrote its admin token")
        .expose()
        .to_string()
}

async fn admin_report(admin: std::net::SocketAddr, token: &str, digits: &str) -> serde_json::Value {
    let r = reqwest::Client::new()
        .get(format!("http://{admin}/consent/{digits}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

/// Runs the CLI off the async threads (it takes a second to find the store locked).
async fn consent_async(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let (config, args, env): (PathBuf, Vec<String>, Vec<(String, String)>) = (
        config.to_path_buf(),
        args.iter().map(|s| s.to_string()).collect(),
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        consent(&config, &args, &env)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_daemon_running_the_tools_go_through_it() {
    // number(0) gets a confirmed opt-in (source test_seed) before the daemon starts.
    let env = TestEnv::new(&AppOptions {
        consented: 0..1,
        ..Default::default()
    })
    .await;
    let seeded = number(0);
    let app = env.start().await;
    let admin = app.admin();
    let token = generated_token(&env);
    let admin_env = [("SENDWELL_ADMIN__LISTEN", admin.to_string())];
    let admin_env: Vec<(&str, &str)> = admin_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cfg = env.config_path.clone();

    // Without the admin address (the config says port 0) the tool says what to do.
    let o = consent_async(&cfg, &["show", &seeded], &[]).await;
    assert_eq!(o.status.code(), Some(69), "{}", explain(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("SENDWELL_ADMIN__LISTEN"),
        "{}",
        explain(&o)
    );

    let o = consent_async(&cfg, &["show", &seeded], &admin_env).await;
    assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
    assert!(
        stdout(&o).contains("source:   test_seed"),
        "{}",
        explain(&o)
    );
    assert!(
        stdout(&o).contains("newsletter: opted in, confirmed"),
        "{}",
        explain(&o)
    );

    // An import goes to sendwell.consent, and the daemon applies it.
    let fresh = "+491709000001";
    let file = env.dir.path().join("live.jsonl");
    std::fs::write(
        &file,
        format!(
            "{}\n{{\"type\":\"opt_in\"}}\n",
            jsonl_event("opt_in", fresh, "crm_import", "signed form #42")
        ),
    )
    .unwrap();
    let o = consent_async(&cfg, &["import", file.to_str().unwrap()], &admin_env).await;
    assert_eq!(o.status.code(), Some(65), "{}", explain(&o));
    assert!(stdout(&o).contains("published:       1"), "{}", explain(&o));
    assert!(stdout(&o).contains("line 2: malformed"), "{}", explain(&o));
    let digits = &fresh[1..];
    wait_for(
        "the daemon to apply the imported event",
        Duration::from_secs(20),
        async || {
            let r = admin_report(admin, &token, digits).await;
            (r["events"].as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    let o = consent_async(&cfg, &["show", fresh], &admin_env).await;
    assert!(
        stdout(&o).contains("evidence: \"signed form #42\""),
        "{}",
        explain(&o)
    );

    // The export streams from the daemon.
    let o = consent_async(&cfg, &["export", "--format", "csv"], &admin_env).await;
    assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
    let csv = stdout(&o);
    assert!(csv.starts_with("type,account,to,purposes,source,at,evidence\n"));
    assert!(
        csv.contains(&format!("opt_in,acme-de,{fresh},newsletter,crm_import,")),
        "{csv}"
    );
    assert!(
        csv.contains(&format!("confirm,acme-de,{seeded},newsletter,test_seed,")),
        "{csv}"
    );

    // The erasure goes through the broker; the command returns once the daemon applied it.
    let o = consent_async(&cfg, &["erase", "--yes", fresh], &admin_env).await;
    assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
    assert!(
        stdout(&o).contains("through the running daemon: 1 consent event(s)"),
        "{}",
        explain(&o)
    );
    let r = admin_report(admin, &token, digits).await;
    assert_eq!(r["events"].as_array().unwrap().len(), 0, "{r}");
    assert!(r["erased_at"].is_string(), "{r}");
    // The seeded number is untouched.
    assert_eq!(
        admin_report(admin, &token, &seeded[1..]).await["events"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    app.stop().await;
    let dump = open_store(&env.config().state.dir)
        .dump_all()
        .await
        .unwrap();
    for (k, v) in &dump {
        assert!(
            !contains(k, digits.as_bytes()) && !contains(v, digits.as_bytes()),
            "a row still holds the erased number: {:?}",
            String::from_utf8_lossy(k)
        );
    }
}

/// A forwarding proxy on port 0 in front of `upstream`, as a sidecar or reverse proxy that
/// exposes the admin port would be: it passes the path, query and `Authorization` on and adds
/// `X-Forwarded-For` with its client's address.
async fn forwarding_proxy(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    use axum::extract::{ConnectInfo, Request};
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let app = axum::Router::new().fallback(
        async move |ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>, req: Request| {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let mut fwd = client
                .get(format!("http://{upstream}{path}"))
                .header("x-forwarded-for", peer.ip().to_string());
            if let Some(a) = req.headers().get("authorization") {
                fwd = fwd.header("authorization", a.clone());
            }
            let r = fwd.send().await.unwrap();
            let status = axum::http::StatusCode::from_u16(r.status().as_u16()).unwrap();
            (status, r.bytes().await.unwrap())
        },
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            l,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_reads_need_the_admin_token_and_no_proxy_while_the_cli_still_works() {
    let env = TestEnv::new(&AppOptions {
        consented: 0..1,
        ..Default::default()
    })
    .await;
    let seeded = number(0);
    let path = format!("/consent/{}", &seeded[1..]);
    let app = env.start().await;
    let admin = app.admin();
    let token = generated_token(&env);
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        let p = env.config().state.dir.join("admin-token");
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode, 0o600, "the generated token is the daemon user's only");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = async |base: std::net::SocketAddr, path: &str, token: Option<&str>| {
        let mut r = http.get(format!("http://{base}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.unwrap().status().as_u16()
    };

    // Any local process without the token: 401, for the one number and for everyone's.
    assert_eq!(get(admin, &path, None).await, 401);
    assert_eq!(get(admin, "/consent/export", None).await, 401);
    assert_eq!(
        get(admin, &path, Some("not-the-token-0123456789")).await,
        401
    );
    // With it: 200.
    assert_eq!(get(admin, &path, Some(&token)).await, 200);
    assert_eq!(get(admin, "/consent/export", Some(&token)).await, 200);
    // Through a real forwarding hop, even with the right token: 401; /metrics still passes.
    let proxy = forwarding_proxy(admin).await;
    assert_eq!(get(proxy, &path, Some(&token)).await, 401);
    assert_eq!(get(proxy, "/consent/export", Some(&token)).await, 401);
    assert_eq!(get(proxy, &path, None).await, 401);
    assert_eq!(get(proxy, "/metrics", None).await, 200);
    // A page whose name rebinds to 127.0.0.1 sends its own name as Host: refused.
    let r = http
        .get(format!("http://{admin}{path}"))
        .header("host", format!("rebind.example:{}", admin.port()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let refused = metric_value(
        &app.metrics().await,
        "sendwell_admin_requests_refused_total",
    );
    assert!(refused >= 7.0, "{refused}");

    // The CLI finds the generated token by itself.
    let cfg = env.config_path.clone();
    let admin_env = [("SENDWELL_ADMIN__LISTEN", admin.to_string())];
    let with = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        admin_env
            .iter()
            .cloned()
            .chain(extra.iter().cloned())
            .collect()
    };
    let run = async |args: &[&str], env: Vec<(&'static str, String)>| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        consent_async(&cfg, args, &env).await
    };
    let o = run(&["show", &seeded], with(&[])).await;
    assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
    assert!(
        stdout(&o).contains("source:   test_seed"),
        "{}",
        explain(&o)
    );
    let o = run(&["export"], with(&[])).await;
    assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
    assert!(stdout(&o).contains(&seeded), "{}", explain(&o));

    // A CLI holding another token: a config error naming the key, without either secret.
    let wrong = env.dir.path().join("wrong-admin-token");
    std::fs::write(&wrong, "some-other-admin-token-42\n").unwrap();
    let wrong_env = with(&[("SENDWELL_ADMIN__TOKEN_FILE", wrong.display().to_string())]);
    let o = run(&["show", &seeded], wrong_env).await;
    assert_eq!(o.status.code(), Some(64), "{}", explain(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("admin.token_file"), "{}", explain(&o));
    assert!(
        !err.contains("some-other-admin-token-42") && !err.contains(&token),
        "{}",
        explain(&o)
    );
    app.stop().await;

    // With admin.token_file set, daemon and CLI share that file and nothing is generated.
    let shared = env.dir.path().join("admin-token-shared");
    std::fs::write(&shared, "shared-admin-token-0123456789\n").unwrap();
    std::fs::remove_file(env.config().state.dir.join("admin-token")).unwrap();
    let app = env
        .start_with(|c| {
            c.admin.token =
                sendwell::config::AdminToken::File(sendwell::config::read_secret(&shared).unwrap())
        })
        .await;
    let admin = app.admin();
    assert!(!env.config().state.dir.join("admin-token").exists());
    assert_eq!(get(admin, &path, Some(&token)).await, 401);
    assert_eq!(
        get(admin, &path, Some("shared-admin-token-0123456789")).await,
        200
    );
    let env_vars = vec![
        ("SENDWELL_ADMIN__LISTEN", admin.to_string()),
        ("SENDWELL_ADMIN__TOKEN_FILE", shared.display().to_string()),
    ];
    let o = run(&["show", &seeded], env_vars).await;
    assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
    // Without the file, the CLI cannot know the token: a config error naming the key.
    let o = run(
        &["show", &seeded],
        vec![("SENDWELL_ADMIN__LISTEN", admin.to_string())],
    )
    .await;
    assert_eq!(o.status.code(), Some(64), "{}", explain(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("admin.token_file"),
        "{}",
        explain(&o)
    );
    app.stop().await;
}
