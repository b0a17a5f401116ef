//! PostgreSQL stops in the middle of a run and comes back (issue 17, item 4): jobs wait, none
//! is failed, lost or sent twice. The database is a throw-away cluster of this test's own
//! (`pg_createcluster` on a free port), so stopping it leaves every other test's alone; it
//! needs root and Debian's postgresql-common, as CI has (`scripts/ensure-postgres.sh`).

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use sendwell::config::{PgTls, PostgresConfig, Secret, StateBackend};

/// A PostgreSQL cluster of its own, dropped with this.
struct Cluster {
    version: String,
    name: String,
    port: u16,
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Cluster {
    /// None (the test is skipped, saying why) without root or postgresql-common.
    fn create() -> Option<Cluster> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"));
        let version = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|v| v.parse::<u32>().ok())
            .max()?
            .to_string();
        if !root
            || Command::new("pg_createcluster")
                .arg("--help")
                .output()
                .is_err()
        {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Cluster {
            version,
            name: format!("sw_outage_{}", std::process::id()),
            port,
        };
        let port = port.to_string();
        run(
            "pg_createcluster",
            &[&c.version, &c.name, "-p", &port, "--start"],
        )
        .expect("a throw-away cluster");
        for sql in [
            "CREATE ROLE sendwell LOGIN PASSWORD 'sendwell'",
            "CREATE DATABASE sendwell OWNER sendwell",
        ] {
            run(
                "runuser",
                &[
                    "-u",
                    "postgres",
                    "--",
                    "psql",
                    "-p",
                    &port,
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    sql,
                ],
            )
            .expect("the role and database");
        }
        Some(c)
    }

    fn ctl(&self, action: &str) {
        let mut args = vec![self.version.as_str(), self.name.as_str(), action];
        if action == "stop" {
            // As a crash or a failover would: sessions cut, nothing flushed for us.
            args.extend(["-m", "immediate"]);
        }
        run("pg_ctlcluster", &args).expect("pg_ctlcluster");
    }

    fn state(&self, dir: &std::path::Path) -> PostgresConfig {
        std::fs::write(dir.join("pg-password"), "sendwell").unwrap();
        PostgresConfig {
            url: format!("postgres://sendwell@127.0.0.1:{}/sendwell", self.port),
            password: Some(Secret::new("sendwell".into())),
            password_file: Some(dir.join("pg-password")),
            pool_size: 8,
            connect_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(10),
            follow_every: Duration::from_millis(250),
            tls: PgTls::Off,
            ca_file: None,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = run("pg_dropcluster", &[&self.version, &self.name, "--stop"]);
    }
}

async fn readyz(admin: std::net::SocketAddr) -> u16 {
    match reqwest::get(format!("http://{admin}/readyz")).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_for_10s_mid_run_loses_no_job_and_sends_none_twice() {
    const N: usize = 5_000;
    let Some(cluster) = Cluster::create() else {
        eprintln!("SKIPPED: needs root and postgresql-common (pg_createcluster)");
        return;
    };
    let mut opts = AppOptions {
        consented: 0..0,
        ..AppOptions::default()
    };
    opts.sandbox.latency = Duration::from_millis(100);
    let env = TestEnv::new(&opts).await;
    let pg = cluster.state(env.dir.path());
    let on_cluster = |c: &mut sendwell::config::Config| {
        c.state.backend = StateBackend::Postgres;
        c.state.postgres = Some(pg.clone());
    };
    let mut config = env.config();
    on_cluster(&mut config);
    let numbers: Vec<String> = (0..N).map(number).collect();
    seed_consent_at(&config, &numbers).await;
    let app = env.start_with(on_cluster).await;
    let admin = app.admin();

    // Marketing (never resent when in doubt) and utility (resent when in doubt) alike.
    let ids: Vec<String> = (0..N).map(|i| format!("pg-out-{i}")).collect();
    let jobs: Vec<serde_json::Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut j = template_job(id, &numbers[i]);
            if i % 2 == 1 {
                j["category"] = "utility".into();
            }
            j
        })
        .collect();
    env.publish(&jobs).await;

    // In the middle of the run: some sent, most not yet.
    let sandbox = env.sandbox.clone();
    wait_for(
        "a fifth of the jobs sent",
        Duration::from_secs(120),
        async || (sandbox.accepted().len() >= N / 5).then_some(()),
    )
    .await;
    cluster.ctl("stop");
    let stopped = std::time::Instant::now();
    wait_for(
        "/readyz to answer 503 while the database is down",
        Duration::from_secs(30),
        async || (readyz(admin).await == 503).then_some(()),
    )
    .await;
    // Down for 10 s: jobs wait, unacked; none is failed meanwhile.
    let waited = Duration::from_secs(10).saturating_sub(stopped.elapsed());
    tokio::time::sleep(waited).await; // the outage itself, not a wait for a condition
    let not_sent: Vec<serde_json::Value> = env
        .outcomes
        .json()
        .into_iter()
        .filter(|e| e["status"] != "sent")
        .collect();
    assert!(
        not_sent.is_empty(),
        "no job failed while the database was down: {not_sent:?}"
    );
    cluster.ctl("start");
    // Generous: a saturated 2-core machine (CI beside a load bench) took over 60 s once.
    wait_for(
        "/readyz to answer 200 once the database is back",
        Duration::from_secs(180),
        async || (readyz(admin).await == 200).then_some(()),
    )
    .await;

    let finals = env.final_outcomes(&ids, Duration::from_secs(300)).await;
    let mut twice = Vec::new();
    let mut not_sent: HashMap<String, String> = HashMap::new();
    for id in &ids {
        if env.sandbox.accepted_count_for(id) != 1 {
            twice.push((id.clone(), env.sandbox.accepted_count_for(id)));
        }
        let f = &finals[id];
        if f.len() != 1 || f[0]["status"] != "sent" {
            not_sent.insert(id.clone(), format!("{f:?}"));
        }
    }
    assert!(twice.is_empty(), "not sent exactly once: {twice:?}");
    assert!(not_sent.is_empty(), "not one `sent` outcome: {not_sent:?}");
    app.stop().await;
}
