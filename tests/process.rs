//! The daemon as an operator runs it: a separate process, signals, restarts, exit codes.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn spawn_daemon(env: &TestEnv) -> Child {
    spawn_daemon_with(env, &[])
}

fn spawn_daemon_with(env: &TestEnv, vars: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sendwell"))
        .envs(vars.iter().copied())
        .args(["run", "--config"])
        .arg(&env.config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the daemon starts")
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

async fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    wait_for("the daemon to exit", within, async || {
        child.try_wait().unwrap()
    })
    .await
}

async fn wait_consuming(env: &TestEnv) {
    let broker = &env.broker;
    wait_for(
        "the daemon to consume",
        Duration::from_secs(30),
        async || (broker.consumers("sendwell.jobs.0").await == Some(1)).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_then_restart_gives_every_job_exactly_one_outcome() {
    let env = TestEnv::new(&AppOptions {
        sandbox: sendwell::cloud_api::sandbox::SandboxConfig {
            latency: Duration::from_millis(100),
            ..AppOptions::default().sandbox
        },
        ..Default::default()
    })
    .await;
    let mut daemon = spawn_daemon(&env);
    wait_consuming(&env).await;
    let ids: Vec<String> = (0..3000).map(|i| format!("term-{i}")).collect();
    // Many jobs share recipients, so per-recipient ordering is exercised too.
    env.publish(
        &ids.iter()
            .enumerate()
            .map(|(i, id)| template_job(id, &number(i % 700)))
            .collect::<Vec<_>>(),
    )
    .await;
    let outcomes = env.outcomes.clone();
    wait_for(
        "some outcomes before SIGTERM",
        Duration::from_secs(30),
        async || (finals_by_id(&outcomes.json()).len() >= 300).then_some(()),
    )
    .await;

    signal(&daemon, "TERM");
    let status = wait_exit(&mut daemon, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
    let done_before_restart = finals_by_id(&env.outcomes.json()).len();
    assert!(done_before_restart < ids.len(), "SIGTERM came mid-load");

    let mut daemon = spawn_daemon(&env);
    let f = env.final_outcomes(&ids, Duration::from_secs(90)).await;
    for id in &ids {
        assert_eq!(f[id].len(), 1, "{id}: {:?}", f[id]);
        assert_eq!(f[id][0]["status"], "sent", "{id}: {:?}", f[id]);
        assert!(
            env.sandbox.accepted_count_for(id) <= 1,
            "{id} reached the API twice"
        );
    }
    assert_eq!(
        env.sandbox.accepted().len(),
        ids.len(),
        "each job reached the API exactly once"
    );

    // Jobs for one recipient reached the API in the order they were published.
    let mut last: std::collections::HashMap<String, usize> = Default::default();
    for r in env.sandbox.accepted() {
        let n: usize = r
            .callback_data
            .unwrap()
            .trim_start_matches("term-")
            .parse()
            .unwrap();
        if let Some(prev) = last.insert(r.to.clone(), n) {
            assert!(prev < n, "{}: term-{prev} after term-{n}", r.to);
        }
    }
    signal(&daemon, "TERM");
    assert_eq!(
        wait_exit(&mut daemon, Duration::from_secs(30)).await.code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let env = TestEnv::new(&AppOptions {
        sandbox: sendwell::cloud_api::sandbox::SandboxConfig {
            latency: Duration::from_secs(30),
            ..AppOptions::default().sandbox
        },
        ..Default::default()
    })
    .await;
    let mut daemon = spawn_daemon_with(&env, &[("SENDWELL_CLOUD_API__REQUEST_TIMEOUT", "60s")]);
    wait_consuming(&env).await;
    env.publish(&[template_job("slow-1", &number(1))]).await;
    // The sandbox answers after 30 s, so once the daemon holds the job unacked it is mid-call.
    let broker = &env.broker;
    wait_for(
        "the job to be in flight",
        Duration::from_secs(20),
        async || {
            let q = broker.queue_info("sendwell.jobs.0").await?;
            (q["messages_unacknowledged"].as_u64() == Some(1)).then_some(())
        },
    )
    .await;
    signal(&daemon, "TERM");
    signal(&daemon, "TERM");
    let status = wait_exit(&mut daemon, Duration::from_secs(2)).await;
    assert_eq!(status.code(), Some(130));
}

#[test]
fn a_bad_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t").unwrap();
    let cases = [
        ("[broker]\nprefetch = 0\n", "broker.prefetch"),
        (
            "[shutdown]\ngrace_period = \"ten\"\n",
            "shutdown.grace_period",
        ),
        ("[broker]\nurl = \"http://x\"\n", "broker.url"),
        ("[nonsense]\nx = 1\n", "nonsense"),
    ];
    for (toml, key) in cases {
        let p = dir.path().join("c.toml");
        let account =
            "[[accounts]]\nname = \"a\"\nphone_number_id = \"1\"\ntoken_file = \"token\"\n";
        std::fs::write(&p, format!("{toml}{account}")).unwrap();
        for cmd in ["check-config", "run"] {
            let out = Command::new(env!("CARGO_BIN_EXE_sendwell"))
                .args([cmd, "--config"])
                .arg(&p)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(64), "{cmd} {toml}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(&format!("`{key}`")), "{cmd}: {err}");
        }
    }
    // A secret never appears in check-config's output.
    let p = dir.path().join("ok.toml");
    std::fs::write(&p, "[broker]\nurl = \"amqp://u:hunter2@127.0.0.1:5672/%2f\"\n[[accounts]]\nname = \"a\"\nphone_number_id = \"1\"\ntoken_file = \"token\"\n").unwrap();
    std::fs::write(dir.path().join("token"), "tok-s3cret").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sendwell"))
        .args(["check-config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(!s.contains("hunter2") && !s.contains("tok-s3cret"), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_call_does_not_resend_marketing_after_restart() {
    let env = TestEnv::new(&AppOptions {
        sandbox: sendwell::cloud_api::sandbox::SandboxConfig {
            latency: Duration::from_secs(3),
            ..AppOptions::default().sandbox
        },
        ..Default::default()
    })
    .await;
    let mut daemon = spawn_daemon(&env);
    wait_consuming(&env).await;
    env.publish(&[template_job("killed-1", &number(14))]).await;
    let sandbox = env.sandbox.clone();
    wait_for(
        "the send to reach the sandbox",
        Duration::from_secs(20),
        async || (sandbox.accepted_count_for("killed-1") == 1).then_some(()),
    )
    .await;
    signal(&daemon, "KILL");
    wait_exit(&mut daemon, Duration::from_secs(10)).await;
    env.sandbox.set_latency(Duration::from_millis(5));

    let mut daemon = spawn_daemon(&env);
    let f = env
        .final_outcomes(&["killed-1".into()], Duration::from_secs(30))
        .await;
    let e = &f["killed-1"][0];
    assert_eq!(e["status"], "failed", "{e}");
    assert_eq!(e["reason"], "ambiguous");
    assert_eq!(
        env.sandbox.accepted_count_for("killed-1"),
        1,
        "not sent a second time"
    );
    signal(&daemon, "TERM");
    assert_eq!(
        wait_exit(&mut daemon, Duration::from_secs(30)).await.code(),
        Some(0)
    );
}
