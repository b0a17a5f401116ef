//! The daemon starts while PostgreSQL cannot be reached: it waits (with `/healthz` 200 and
//! `/readyz` 503 saying why), starts once the database answers, and stops at once when asked
//! to meanwhile. Errors that waiting cannot fix (a wrong password, a database that does not
//! exist) still end the start at once. The tools never wait.
//!
//! "Unreachable" is a gate in front of the tests' PostgreSQL: while closed it answers every
//! connection as a server still starting up does (SQLSTATE 57P03), then it forwards; or a port
//! where nothing listens (connection refused).

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use sendwell::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A TCP gate in front of PostgreSQL: closed, it refuses each connection as a starting server
/// does; open, it forwards.
struct Gate {
    addr: std::net::SocketAddr,
    open: Arc<AtomicBool>,
    /// Connections refused so far.
    refused: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Gate {
    async fn new(target: String) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, refused, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            CancellationToken::new(),
        );
        let (o, r, s) = (open.clone(), refused.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let mut client = tokio::select! {
                    _ = s.cancelled() => return,
                    c = listener.accept() => match c {
                        Ok((c, _)) => c,
                        Err(_) => continue,
                    },
                };
                let (open, refused, target) = (o.load(Ordering::SeqCst), r.clone(), target.clone());
                tokio::spawn(async move {
                    if open {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    } else if refuse_starting_up(&mut client).await.is_ok() {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        Gate {
            addr,
            open,
            refused,
            stop,
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Reads the client's startup message (declining TLS or GSS encryption first, as a server
/// without them does) and answers FATAL 57P03, as PostgreSQL does while it starts or recovers.
async fn refuse_starting_up(c: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    loop {
        let len = c.read_u32().await? as usize;
        let mut body = vec![0; len.saturating_sub(4)];
        c.read_exact(&mut body).await?;
        // SSLRequest and GSSENCRequest: 8 bytes, a code of 1234 in the high half.
        if len == 8 && body[..2] == [0x04, 0xd2] {
            c.write_all(b"N").await?;
            continue;
        }
        break;
    }
    let fields = b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0";
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&(4 + fields.len() as u32).to_be_bytes());
    msg.extend_from_slice(fields);
    c.write_all(&msg).await?;
    c.shutdown().await
}

/// A port on loopback where nothing listens.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The status and body of a GET on the admin listener (status 0: no answer).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    match reqwest::get(format!("http://{addr}{path}")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// `url` with its host and port replaced by `addr`.
fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let mut u = reqwest::Url::parse(url).unwrap();
    u.set_host(Some(&addr.ip().to_string())).unwrap();
    u.set_port(Some(addr.port())).unwrap();
    u.to_string()
}

/// host:port of a postgres:// URL.
fn host_port(url: &str) -> String {
    let u = reqwest::Url::parse(url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(5432))
}

/// A config in `dir` whose state is `db`'s database, with the admin listener on a port known
/// before the daemon starts (start() returns only once the store is open).
fn config_on(env: &TestEnv, dir: &std::path::Path, db: &pg::TestDb) -> (Config, u16) {
    let admin_port = closed_port();
    let path = write_config_on(
        dir,
        &env.broker.url,
        &env.sandbox_addr,
        GOOD_TOKEN,
        50,
        RELAXED_LIMITS,
        "",
        &state_backend_toml(Some(db)),
    );
    let mut config = Config::load(&path).unwrap();
    config.admin.listen = ([127, 0, 0, 1], admin_port).into();
    (config, admin_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_waits_for_postgres_at_start_and_sends_once_it_answers() {
    let env = TestEnv::new(&AppOptions {
        consented: 0..0,
        ..AppOptions::default()
    })
    .await;
    let db = pg::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut config, admin_port) = config_on(&env, dir.path(), &db);
    seed_consent_at(&config, &[number(1)]).await;
    let gate = Gate::new(host_port(&db.url)).await;
    let pg = config.state.postgres.as_mut().unwrap();
    pg.url = via(&pg.url, gate.addr);

    let shutdown = CancellationToken::new();
    let _stop_on_drop = shutdown.clone().drop_guard();
    let starting = tokio::spawn(sendwell::app::start(config, shutdown.clone()));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let why = wait_for(
        "/readyz to say the daemon waits for PostgreSQL",
        Duration::from_secs(20),
        async || {
            let (status, body) = get(admin, "/readyz").await;
            (status == 503).then_some(body)
        },
    )
    .await;
    assert!(
        why.contains("waiting for PostgreSQL") && why.contains("57P03"),
        "{why}"
    );
    assert_eq!(get(admin, "/healthz").await.0, 200);
    // It keeps trying (0.5 s, 1 s, 2 s apart), without giving up.
    let refused = gate.refused.clone();
    wait_for(
        "three refused attempts",
        Duration::from_secs(20),
        async || (refused.load(Ordering::SeqCst) >= 3).then_some(()),
    )
    .await;
    assert!(!starting.is_finished(), "the start ended: {:?}", {
        starting.await.unwrap().err()
    });

    gate.open.store(true, Ordering::SeqCst);
    let app = tokio::time::timeout(Duration::from_secs(30), starting)
        .await
        .expect("the daemon starts within 30 s of the database answering")
        .unwrap()
        .expect("the daemon starts");
    assert_eq!(app.admin_addr, admin);
    let readiness = app.readiness.clone();
    wait_for(
        "the daemon to be ready",
        Duration::from_secs(20),
        async || readiness.is_ready().then_some(()),
    )
    .await;
    // The same listener now answers with every route.
    // The first line says it; the lines after it tell the instance's role and rate shares.
    let (status, body) = get(admin, "/readyz").await;
    assert_eq!(status, 200);
    assert!(body.starts_with("ready\n"), "{body}");
    env.publish(&[template_job("pg-start-1", &number(1))]).await;
    let finals = env
        .final_outcomes(&["pg-start-1".into()], Duration::from_secs(30))
        .await;
    assert_eq!(finals["pg-start-1"][0]["status"], "sent", "{finals:?}");
    shutdown.cancel();
    app.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_that_waiting_cannot_fix_end_the_start_at_once() {
    let env = TestEnv::new(&AppOptions {
        consented: 0..0,
        ..AppOptions::default()
    })
    .await;
    let db = pg::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = config_on(&env, dir.path(), &db);
    let wrong_password = {
        let mut c = config.clone();
        c.state.postgres.as_mut().unwrap().password =
            Some(sendwell::config::Secret::new("not-the-password".into()));
        c
    };
    let no_such_database = {
        let mut c = config.clone();
        let pg = c.state.postgres.as_mut().unwrap();
        pg.url = pg.url.replace(&db.name, "sw_no_such_database");
        c
    };
    for (what, config, sqlstate) in [
        ("a wrong password", wrong_password, "28P01"),
        ("a database that does not exist", no_such_database, "3D000"),
    ] {
        let began = std::time::Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            sendwell::app::start(config, CancellationToken::new()),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: the start did not end within 10 s"));
        let e = r
            .err()
            .unwrap_or_else(|| panic!("{what}: the daemon started"));
        assert_eq!(e.exit_code(), 73, "{what}: {e}");
        assert!(e.to_string().contains(sqlstate), "{what}: {e}");
        assert!(began.elapsed() < Duration::from_secs(20), "{what}: {e}");
    }
}

/// As an operator runs it: `sendwell run` waits for a database where nothing listens, says why
/// on /readyz, and exits 0 at once on SIGTERM; a tool on the same config fails at once (73).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_daemon_stops_at_once_on_sigterm_and_the_tools_do_not_wait() {
    let dir = tempfile::tempdir().unwrap();
    let admin_port = closed_port();
    let state = format!(
        "backend = \"postgres\"\n[state.postgres]\nurl = \"postgres://sendwell@127.0.0.1:{}/sendwell\"\n",
        closed_port()
    );
    let path = write_config_on(
        dir.path(),
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        &"127.0.0.1:9".parse().unwrap(),
        GOOD_TOKEN,
        50,
        RELAXED_LIMITS,
        "",
        &state,
    );
    // The [admin] table of write_config_on listens on port 0; this one's port is known.
    let toml = std::fs::read_to_string(&path).unwrap().replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\""),
    );
    std::fs::write(&path, toml).unwrap();

    let tool = Command::new(env!("CARGO_BIN_EXE_sendwell"))
        .args(["consent", "show", "+491701234567", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&tool.stderr);
    assert_eq!(tool.status.code(), Some(73), "{said}");
    assert!(said.contains("refused"), "{said}");

    let mut daemon = Command::new(env!("CARGO_BIN_EXE_sendwell"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
    let daemon = Kill(&mut daemon);
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let why = wait_for(
        "/readyz to answer 503",
        Duration::from_secs(20),
        async || {
            let (status, body) = get(admin, "/readyz").await;
            (status == 503).then_some(body)
        },
    )
    .await;
    assert!(why.contains("refused"), "{why}");
    assert!(daemon.0.try_wait().unwrap().is_none(), "the daemon exited");
    let sent = Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let stopped = std::time::Instant::now();
    let status = wait_for("the daemon to exit", Duration::from_secs(10), async || {
        daemon.0.try_wait().unwrap()
    })
    .await;
    assert_eq!(status.code(), Some(0));
    assert!(stopped.elapsed() < Duration::from_secs(15), "{stopped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_while_a_tool_has_the_database_waits_for_it() {
    let env = TestEnv::new(&AppOptions {
        consented: 0..0,
        ..AppOptions::default()
    })
    .await;
    let db = pg::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, admin_port) = config_on(&env, dir.path(), &db);
    // A command-line tool (say `state migrate`) has the database alone.
    let tool = sendwell::store::Ledger::open_state(&config.state, true)
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    let _stop_on_drop = shutdown.clone().drop_guard();
    let starting = tokio::spawn(sendwell::app::start(config, shutdown.clone()));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let why = wait_for(
        "/readyz to say the daemon waits for the tool",
        Duration::from_secs(20),
        async || {
            let (status, body) = get(admin, "/readyz").await;
            (status == 503).then_some(body)
        },
    )
    .await;
    assert!(why.contains("command-line tool"), "{why}");
    assert!(!starting.is_finished(), "the start ended: {:?}", {
        starting.await.unwrap().err()
    });

    drop(tool);
    let app = tokio::time::timeout(Duration::from_secs(30), starting)
        .await
        .expect("the daemon starts once the tool is done")
        .unwrap()
        .expect("the daemon starts");
    shutdown.cancel();
    app.wait().await.unwrap();
}
