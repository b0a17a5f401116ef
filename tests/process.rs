//! The daemon as an operator runs it: a separate process, signals, restarts, exit codes.
//!
//! Timing (two busy cores): a signal that must come mid-load first makes the sandbox slow
//! rather than racing the daemon; "at once" is bounded well below the grace period it is told
//! apart from; other deadlines only bound waits.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// The daemon as a child process, killed when dropped so a failing test leaves none behind.
struct Daemon {
    child: Child,
    /// Its admin listener (`SENDWELL_ADMIN__LISTEN`): `/readyz` says when it consumes.
    admin: String,
}

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_daemon(env: &TestEnv) -> Daemon {
    spawn_daemon_with(env, &[])
}

/// The admin listener goes on a free port unless `vars` name one.
fn spawn_daemon_with(env: &TestEnv, vars: &[(&str, &str)]) -> Daemon {
    let admin = match vars.iter().find(|(k, _)| *k == "SENDWELL_ADMIN__LISTEN") {
        Some((_, a)) => a.to_string(),
        None => free_port(),
    };
    let child = Command::new(env!("CARGO_BIN_EXE_sendwell"))
        .envs(vars.iter().copied())
        .env("SENDWELL_ADMIN__LISTEN", &admin)
        .args(["run", "--config"])
        .arg(&env.config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the daemon starts");
    Daemon { child, admin }
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

/// Waits until the daemon answers `/readyz`, which it does once the broker has confirmed its
/// consumer on the jobs queue (the session's set-up). The management API's consumer count
/// says the same up to its statistics interval (5 s) later.
async fn wait_consuming(daemon: &mut Daemon) {
    let url = format!("http://{}/readyz", daemon.admin);
    // A deadline per poll: `wait_for` checks its own only between polls.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    wait_for(
        "the daemon to consume",
        Duration::from_secs(30),
        async || {
            assert!(
                daemon.child.try_wait().unwrap().is_none(),
                "the daemon exited while starting"
            );
            http.get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_then_restart_gives_every_job_exactly_one_outcome() {
    let env = TestEnv::new(&AppOptions {
        sandbox: sendwell::sandbox::SandboxConfig {
            latency: Duration::from_millis(100),
            ..AppOptions::default().sandbox
        },
        ..Default::default()
    })
    .await;
    let mut daemon = spawn_daemon(&env);
    wait_consuming(&mut daemon).await;
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
    // From now on every call takes a second: the SIGTERM surely comes mid-load, however long
    // this machine takes to send it (at full speed the rest would be done in about a second).
    env.sandbox.set_latency(Duration::from_secs(1));

    signal(&daemon, "TERM");
    let status = wait_exit(&mut daemon, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
    env.sandbox.set_latency(Duration::from_millis(100));
    // Finished before the stop, in the order their events arrived.
    let mut done_before: Vec<String> = Vec::new();
    for e in env.outcomes.json() {
        if e["status"] == "sent"
            && let Some(id) = e["id"].as_str()
            && !done_before.iter().any(|d| d == id)
        {
            done_before.push(id.to_string());
        }
    }
    assert!(done_before.len() < ids.len(), "SIGTERM came mid-load");

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

    // The last ids finished before the stop, published again as new messages: the first run's
    // confirmations of their events (kept in memory, stored by the ledger at the stop) tell the
    // second run they were published, so each gets `duplicate`, not its stored event again.
    let again: Vec<&String> = done_before.iter().rev().take(50).collect();
    env.publish(
        &again
            .iter()
            .map(|id| {
                let i: usize = id.trim_start_matches("term-").parse().unwrap();
                template_job(id, &number(i % 700))
            })
            .collect::<Vec<_>>(),
    )
    .await;
    let outcomes = env.outcomes.clone();
    wait_for(
        "a duplicate for each id published again",
        Duration::from_secs(30),
        async || {
            again
                .iter()
                .all(|id| {
                    outcomes
                        .for_id(id)
                        .iter()
                        .any(|e| e["status"] == "duplicate")
                })
                .then_some(())
        },
    )
    .await;
    for id in &again {
        let sent = env.outcomes.for_id(id);
        let sent = sent.iter().filter(|e| e["status"] == "sent").count();
        assert_eq!(sent, 1, "{id}: its event was published again");
    }
    assert_eq!(env.sandbox.accepted().len(), ids.len());
    signal(&daemon, "TERM");
    assert_eq!(
        wait_exit(&mut daemon, Duration::from_secs(30)).await.code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let env = TestEnv::new(&AppOptions {
        sandbox: sendwell::sandbox::SandboxConfig {
            latency: Duration::from_secs(30),
            ..AppOptions::default().sandbox
        },
        ..Default::default()
    })
    .await;
    let mut daemon = spawn_daemon_with(&env, &[("SENDWELL_CLOUD_API__REQUEST_TIMEOUT", "60s")]);
    wait_consuming(&mut daemon).await;
    env.publish(&[template_job("slow-1", &number(1))]).await;
    // The sandbox logs a call as it arrives and answers it 30 s later: once the call is in
    // its log, the daemon is mid-call. (The management API's unacked count says the same up
    // to 5 s later.)
    let sandbox = &env.sandbox;
    wait_for(
        "the job to be in flight",
        Duration::from_secs(20),
        async || {
            sandbox
                .requests()
                .iter()
                .any(|r| r.callback_data.as_deref() == Some("slow-1"))
                .then_some(())
        },
    )
    .await;
    // A graceful stop waits for the call (30 s) up to the grace period (10 s). Signals sent
    // back to back can reach a busy daemon's handler as one, so: TERM again every 200 ms
    // until it exits; the first is the graceful stop, any later one must end it at once.
    signal(&daemon, "TERM");
    let status = wait_for("the daemon to exit", Duration::from_secs(5), async || {
        signal(&daemon, "TERM");
        tokio::time::sleep(Duration::from_millis(200)).await; // the resend interval
        daemon.try_wait().unwrap()
    })
    .await;
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
    // Every kind of mistake inside an account or a later section, named by its key.
    let account_cases = [
        (
            "messages_per_second = 5000\n",
            "accounts[0].messages_per_second",
        ),
        ("token_file = \"missing\"\n", "accounts[0].token_file"),
        ("colour = \"blue\"\n", "accounts[0].colour"),
        (
            "pacing = { interval = \"2h\" }\n",
            "accounts[0].pacing.interval",
        ),
        (
            "quiet_hours = { start = \"25:00\", end = \"09:00\" }\n",
            "accounts[0].quiet_hours.start",
        ),
        ("daily_budget = \"lots\"\n", "accounts[0].daily_budget"),
        ("portfolio = \"nowhere\"\n", "accounts[0].portfolio"),
        (
            "[[caps]]\ncategory = \"marketing\"\nrules = [{ max = 99, per = \"1d\" }]\n",
            "caps[0].rules[0].max",
        ),
        ("[webhook]\nenabled = true\n", "webhook.app_secret_file"),
        ("[[purposes]]\nname = \"a b\"\n", "purposes[0].name"),
        (
            "[limits]\ncountry_zones = { US = \"Mars/Base\" }\n",
            "limits.country_zones.US",
        ),
    ];
    for (extra, key) in account_cases {
        let p = dir.path().join("c.toml");
        // A second token_file line would be a TOML error, not the case under test.
        let account = if extra.starts_with("token_file") {
            "[[accounts]]\nname = \"a\"\nphone_number_id = \"1\"\n".to_string()
        } else {
            "[[accounts]]\nname = \"a\"\nphone_number_id = \"1\"\ntoken_file = \"token\"\n"
                .to_string()
        };
        std::fs::write(&p, format!("{account}{extra}")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_sendwell"))
            .args(["check-config"])
            .arg(&p)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{extra}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
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
        sandbox: sendwell::sandbox::SandboxConfig {
            latency: Duration::from_secs(3),
            ..AppOptions::default().sandbox
        },
        ..Default::default()
    })
    .await;
    let mut daemon = spawn_daemon(&env);
    wait_consuming(&mut daemon).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_right_after_answering_200_loses_no_callback() {
    use sendwell::webhook::signature::sign;
    let opts = AppOptions {
        extra_toml: webhook_toml(1 << 20),
        ..Default::default()
    };
    let env = TestEnv::with_dir_files(
        &opts,
        &[("app-secret", APP_SECRET), ("verify-token", VERIFY_TOKEN)],
    )
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let vars = [("SENDWELL_WEBHOOK__LISTEN", listen.as_str())];
    let mut daemon = spawn_daemon_with(&env, &vars);
    wait_consuming(&mut daemon).await;
    let ids: Vec<String> = (0..40).map(|i| format!("cb-{i}")).collect();
    env.publish(
        &ids.iter()
            .enumerate()
            .map(|(i, id)| template_job(id, &number(300 + i)))
            .collect::<Vec<_>>(),
    )
    .await;
    env.final_outcomes(&ids, Duration::from_secs(30)).await;

    // Each customer now has a slow send in flight (the sandbox takes 20 s), so the callbacks
    // about their first jobs queue behind it in their lanes: taken (200) but not yet applied
    // when the daemon dies.
    env.sandbox.set_latency(Duration::from_secs(20));
    let slow: Vec<String> = ids.iter().map(|id| format!("{id}-slow")).collect();
    env.publish(
        &slow
            .iter()
            .enumerate()
            .map(|(i, id)| template_job(id, &number(300 + i)))
            .collect::<Vec<_>>(),
    )
    .await;
    let sandbox = env.sandbox.clone();
    wait_for(
        "every slow send in flight",
        Duration::from_secs(30),
        async || {
            slow.iter()
                .all(|id| sandbox.accepted_count_for(id) == 1)
                .then_some(())
        },
    )
    .await;

    // Meta delivers one callback per message; every one is answered 200, then the daemon dies.
    let client = reqwest::Client::new();
    let mut answered = 0;
    for (i, id) in ids.iter().enumerate() {
        let body = serde_json::json!({"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"field":"messages","value":{
            "messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},
            "statuses":[{"id":format!("wamid.test{i}"),"status":"delivered","timestamp":"1764390000",
                "recipient_id":number(300 + i).trim_start_matches('+'),"biz_opaque_callback_data":id}]}}]}]});
        let body = serde_json::to_vec(&body).unwrap();
        let r = client
            .post(format!("http://{listen}/webhook"))
            .header("x-hub-signature-256", sign(APP_SECRET.as_bytes(), &body))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        answered += 1;
    }
    assert!(
        !env.outcomes
            .json()
            .iter()
            .any(|e| e["status"] == "delivered"),
        "the callbacks were taken but not applied before the kill"
    );
    signal(&daemon, "KILL");
    wait_exit(&mut daemon, Duration::from_secs(10)).await;
    assert_eq!(answered, ids.len());

    // Whatever was not applied before the kill is still in the broker: after a restart every
    // callback that got a 200 has its delivery outcome.
    env.sandbox.set_latency(Duration::from_millis(5));
    let mut daemon = spawn_daemon_with(&env, &vars);
    wait_consuming(&mut daemon).await;
    let outcomes = env.outcomes.clone();
    wait_for(
        "a delivered outcome for every callback",
        Duration::from_secs(30),
        async || {
            let events = outcomes.json();
            ids.iter()
                .all(|id| {
                    events
                        .iter()
                        .any(|e| e["id"] == *id && e["status"] == "delivered")
                })
                .then_some(())
        },
    )
    .await;
    signal(&daemon, "TERM");
    assert_eq!(
        wait_exit(&mut daemon, Duration::from_secs(30)).await.code(),
        Some(0)
    );
}

fn free_port() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_sent_to_the_sandbox_come_back_delivered_and_read_and_billed_as_the_price_table_says()
{
    let opts = AppOptions {
        extra_toml: webhook_toml(1 << 20),
        ..Default::default()
    };
    let env = TestEnv::with_dir_files(
        &opts,
        &[("app-secret", APP_SECRET), ("verify-token", VERIFY_TOKEN)],
    )
    .await;
    let finnish: Vec<String> = (0..10).map(|i| format!("+35840{i:07}")).collect();
    env.seed_consent(&finnish).await;
    let (webhook, admin) = (free_port(), free_port());
    let vars = [
        ("SENDWELL_WEBHOOK__LISTEN", webhook.as_str()),
        ("SENDWELL_ADMIN__LISTEN", admin.as_str()),
    ];
    let mut daemon = spawn_daemon_with(&env, &vars);
    wait_consuming(&mut daemon).await;
    // The sandbox calls the daemon back, signed, like Meta: sent (with pricing) → delivered → read.
    env.sandbox.set_webhook(
        Some(format!("http://{webhook}/webhook")),
        Some(APP_SECRET.into()),
    );
    let germans: Vec<String> = (0..20).map(|i| format!("e2e-de-{i}")).collect();
    let finns: Vec<String> = (0..10).map(|i| format!("e2e-fi-{i}")).collect();
    let mut jobs: Vec<_> = germans
        .iter()
        .enumerate()
        .map(|(i, id)| template_job(id, &number(200 + i)))
        .collect();
    jobs.extend(
        finns
            .iter()
            .zip(&finnish)
            .map(|(id, to)| template_job(id, to)),
    );
    env.publish(&jobs).await;

    let outcomes = env.outcomes.clone();
    let all: Vec<String> = germans.iter().chain(&finns).cloned().collect();
    wait_for(
        "delivered and read for every job",
        Duration::from_secs(60),
        async || {
            let events = outcomes.json();
            all.iter()
                .all(|id| {
                    let statuses: Vec<&str> = events
                        .iter()
                        .filter(|e| e["id"] == *id)
                        .filter_map(|e| e["status"].as_str())
                        .filter(|s| *s == "delivered" || *s == "read")
                        .collect();
                    statuses == ["delivered", "read"]
                })
                .then_some(())
        },
    )
    .await;
    // Germany is 0.1131 EUR per marketing message; Finland falls to the default, 0.0592.
    let expected = 20.0 * 113_100.0 + 10.0 * 59_200.0;
    let url = format!("http://{admin}/metrics");
    let billed = wait_for(
        "the billed cost to add up",
        Duration::from_secs(30),
        async || {
            let m = reqwest::get(&url).await.ok()?.text().await.ok()?;
            let b = metric(&m, "sendwell_billed_cost_microunits_total");
            (b >= expected).then_some(b)
        },
    )
    .await;
    assert_eq!(billed, expected);
    signal(&daemon, "TERM");
    assert_eq!(
        wait_exit(&mut daemon, Duration::from_secs(30)).await.code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_rate_limit_to_a_running_daemon() {
    let env = TestEnv::new(&AppOptions::default()).await;
    let admin = free_port();
    let mut daemon = spawn_daemon_with(&env, &[("SENDWELL_ADMIN__LISTEN", admin.as_str())]);
    wait_consuming(&mut daemon).await;
    let rate = async |admin: &str| {
        let m = scrape(admin).await?;
        Some(metric(
            &m,
            "sendwell_account_rate_messages_per_second{account=\"acme-de\"}",
        ))
    };
    assert_eq!(rate(&admin).await, Some(1000.0));
    let original = std::fs::read_to_string(&env.config_path).unwrap();
    assert!(original.contains("messages_per_second = 1000"));

    // An invalid file is refused; the daemon keeps running on the old config.
    std::fs::write(&env.config_path, "[broker]\nprefetch = 0\n").unwrap();
    signal(&daemon, "HUP");
    // Then a valid one with a new rate: applied without a restart.
    // ... and a price table, which applies too.
    std::fs::write(
        &env.config_path,
        original.replace("messages_per_second = 1000", "messages_per_second = 5")
            + "\n[prices]\ncurrency = \"EUR\"\n[prices.default]\nauthentication = \"0.0456\"\n",
    )
    .unwrap();
    signal(&daemon, "HUP");
    wait_for("the new rate", Duration::from_secs(10), async || {
        (rate(&admin).await == Some(5.0)).then_some(())
    })
    .await;
    assert_eq!(daemon.try_wait().unwrap(), None, "still the same process");

    // And it is enforced: 20 calls at 5/s (default burst 2) at the sandbox.
    let jobs: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            serde_json::json!({
                "id": format!("hup-{i}"),
                "account": "acme-de",
                "to": number(3000 + i),
                "category": "authentication",
                "template": { "name": "otp", "language": "en", "components": [] }
            })
        })
        .collect();
    env.publish(&jobs).await;
    let ids: Vec<String> = (0..20).map(|i| format!("hup-{i}")).collect();
    let finals = env.final_outcomes(&ids, Duration::from_secs(30)).await;
    for id in &ids {
        assert_eq!(
            finals[id][0]["estimated_cost"],
            serde_json::json!({ "amount": "0.0456", "currency": "EUR" }),
            "the reloaded price table prices {id}"
        );
    }
    let mut at: Vec<u64> = env
        .sandbox
        .accepted()
        .iter()
        .filter(|r| {
            r.callback_data
                .as_deref()
                .is_some_and(|id| id.starts_with("hup-"))
        })
        .map(|r| r.at_ms)
        .collect();
    at.sort_unstable();
    assert_eq!(at.len(), 20);
    let span = at[19] - at[0];
    assert!(span >= 3_000, "20 calls at 5/s took only {span} ms");
    let peak = (0..at.len())
        .map(|i| at[i..].iter().take_while(|&&t| t < at[i] + 1000).count())
        .max()
        .unwrap();
    assert!(peak <= 5 + 2, "{peak} calls in one second");
    signal(&daemon, "TERM");
    let status = wait_exit(&mut daemon, Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_journal_each_line_carries_its_syslog_priority() {
    use std::io::BufRead;
    let env = TestEnv::new(&AppOptions::default()).await;
    // An unreachable broker: the daemon starts, logs at info, and warns while reconnecting.
    let mut daemon = Daemon {
        child: Command::new(env!("CARGO_BIN_EXE_sendwell"))
            .env("JOURNAL_STREAM", "8:12345")
            .env("SENDWELL_BROKER__URL", "amqp://guest:guest@127.0.0.1:1/%2f")
            .args(["run", "--config"])
            .arg(&env.config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        admin: String::new(),
    };
    let stderr = daemon.child.stderr.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap().push(line);
        }
    });
    let seen = lines.clone();
    wait_for(
        "an info line and a warning",
        Duration::from_secs(20),
        async || {
            let l = seen.lock().unwrap();
            (l.iter().any(|x| x.starts_with("<6>")) && l.iter().any(|x| x.starts_with("<4>")))
                .then_some(())
        },
    )
    .await;
    let all = lines.lock().unwrap().clone();
    for l in &all {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| l.starts_with(p)),
            "every line has a priority: {l}"
        );
        // No timestamp of our own: the journal adds one.
        assert!(!l[3..].trim_start().starts_with("20"), "{l}");
    }
    let warn = all.iter().find(|l| l.starts_with("<4>")).unwrap();
    assert!(warn.contains("WARN"), "{warn}");
    assert!(
        !warn.contains("guest:guest"),
        "no broker password in the log: {warn}"
    );
    signal(&daemon, "TERM");
    wait_exit(&mut daemon, Duration::from_secs(20)).await;
}
