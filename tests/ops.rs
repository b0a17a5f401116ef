//! The runbook's tools as an operator runs them (the real binary): `sendwell dead list |
//! replay` against a running daemon's vhost, `sendwell state backup | restore` against a stopped
//! daemon's state directory.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use sendwell::store::Ledger;

async fn sendwell(args: &[&str], config: &Path) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sendwell"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .await
        .expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

/// Headers as RabbitMQ sets them when a quorum queue's delivery limit dead-letters a job
/// (checked against RabbitMQ 3.10: reason `delivery_limit`).
fn delivery_limit_headers(to: &str) -> FieldTable {
    let mut death = FieldTable::default();
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    death.insert("exchange".into(), s("sendwell.jobs"));
    death.insert("queue".into(), s("sendwell.jobs.0"));
    death.insert("reason".into(), s("delivery_limit"));
    death.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(vec![s(to.trim_start_matches('+'))].into()),
    );
    death.insert(
        "time".into(),
        AMQPValue::Timestamp(jiff::Timestamp::now().as_second() as u64),
    );
    let mut h = FieldTable::default();
    h.insert(
        "x-death".into(),
        AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
    );
    h.insert("x-first-death-exchange".into(), s("sendwell.jobs"));
    h.insert("x-first-death-queue".into(), s("sendwell.jobs.0"));
    h.insert("x-first-death-reason".into(), s("delivery_limit"));
    h
}

/// Puts a message straight into `sendwell.dead` (default exchange), confirmed.
async fn put_dead(url: &str, body: &[u8], headers: FieldTable) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            "sendwell.dead".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_timestamp(jiff::Timestamp::now().as_second() as u64)
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, Confirmation::Ack(None));
    let _ = conn.close(200, "".into()).await;
}

/// Ready messages in `sendwell.dead`, asked of the queue itself.
async fn dead_depth(url: &str) -> u32 {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "sendwell.dead".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "".into()).await;
    q.message_count()
}

fn jsonl(o: &Output) -> Vec<serde_json::Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_replay_moves_dead_lettered_jobs_back_and_they_are_processed() {
    let env = TestEnv::new(&AppOptions::default()).await;
    let app = env.start().await;
    let url = env.broker.url.clone();
    let (to1, to2) = (number(1), number(2));
    let digits1 = to1.trim_start_matches('+').to_string();
    put_dead(
        &url,
        template_job("replay-1", &to1).to_string().as_bytes(),
        delivery_limit_headers(&to1),
    )
    .await;
    put_dead(
        &url,
        template_job("replay-2", &to2).to_string().as_bytes(),
        delivery_limit_headers(&to2),
    )
    .await;

    // The listing shows why and what, masks the numbers, and leaves everything in place.
    let out = sendwell(&["dead", "list"], &env.config_path).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("job replay-1"), "{text}");
    assert!(text.contains("account acme-de"), "{text}");
    assert!(text.contains("reason: delivery_limit"), "{text}");
    assert!(
        text.contains("x-death: delivery_limit in sendwell.jobs.0 ×1"),
        "{text}"
    );
    assert!(text.contains("+49170****001"), "{text}");
    assert!(text.contains("replay: yes"), "{text}");
    assert!(text.contains("2 of 2 message(s)"), "{text}");
    assert!(!text.contains(&digits1), "a number in clear: {text}");
    let rows = jsonl(&sendwell(&["dead", "list", "--format", "jsonl"], &env.config_path).await);
    assert_eq!(rows.len(), 2);
    let first = rows.iter().find(|r| r["job_id"] == "replay-1").unwrap();
    assert_eq!(first["reason_code"], "delivery_limit");
    assert_eq!(first["replayable"], true);
    assert_eq!(first["to"], "+49170****001");
    assert!(!serde_json::to_string(&rows).unwrap().contains(&digits1));
    assert_eq!(dead_depth(&url).await, 2);

    // A dry run and a filter matching nothing move nothing.
    let out = sendwell(&["dead", "replay", "--dry-run"], &env.config_path).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("would replay 2, 0 skipped"),
        "{}",
        stdout(&out)
    );
    let out = sendwell(&["dead", "replay", "--id", "nope"], &env.config_path).await;
    assert!(
        stdout(&out).contains("replayed 0, 2 skipped"),
        "{}",
        stdout(&out)
    );
    assert_eq!(dead_depth(&url).await, 2);
    assert_eq!(env.sandbox.accepted_count_for("replay-1"), 0);

    // The replay: both go back to sendwell.jobs, are sent once each, and the queue is empty.
    let out = sendwell(&["dead", "replay"], &env.config_path).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("replayed 2, 0 skipped (not matching), 0 left"),
        "{}",
        stdout(&out)
    );
    let ids = ["replay-1".to_string(), "replay-2".to_string()];
    let finals = env.final_outcomes(&ids, Duration::from_secs(30)).await;
    for id in &ids {
        assert_eq!(finals[id].len(), 1, "{id}: {:?}", finals[id]);
        assert_eq!(finals[id][0]["status"], "sent", "{id}: {:?}", finals[id]);
        assert_eq!(env.sandbox.accepted_count_for(id), 1, "{id} sent once");
    }
    let broker = &env.broker;
    // Each look is a `rabbitmqctl` run: seconds on a busy machine.
    wait_for(
        "sendwell.dead to be empty",
        Duration::from_secs(30),
        async || broker.drained("sendwell.dead").then_some(()),
    )
    .await;

    // A body that is not a job stays where it is, and the summary says so.
    let mut h = FieldTable::default();
    h.insert(
        "x-sendwell-reason".into(),
        s("malformed: expected value at line 1 column 1"),
    );
    h.insert("x-sendwell-reason-code".into(), s("malformed"));
    put_dead(&url, b"not json {", h).await;
    let out = sendwell(&["dead", "replay"], &env.config_path).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("replayed 0, 0 skipped (not matching), 1 left"),
        "{text}"
    );
    assert!(text.contains("the body is not a job"), "{text}");
    assert_eq!(dead_depth(&url).await, 1);
    let rows = jsonl(&sendwell(&["dead", "list", "--format", "jsonl"], &env.config_path).await);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["reason_code"], "malformed");
    assert_eq!(rows[0]["replayable"], false);
    app.stop().await;
}

/// A config and state directory of their own, for a broker vhost (or none).
fn offline_config(dir: &Path, broker_url: &str) -> PathBuf {
    write_config(
        dir,
        broker_url,
        &"127.0.0.1:9".parse().unwrap(),
        GOOD_TOKEN,
        10,
        RELAXED_LIMITS,
        "",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_list_leaves_messages_in_place_however_often_it_runs() {
    let broker = TestBroker::new().await;
    {
        let conn = Connection::connect(&broker.url, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        sendwell::amqp::topology::declare(&ch, &sendwell::amqp::topology::Names::new(0))
            .await
            .unwrap();
        let _ = conn.close(200, "".into()).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = offline_config(dir.path(), &broker.url);
    let to = number(7);
    put_dead(
        &broker.url,
        template_job("kept", &to).to_string().as_bytes(),
        delivery_limit_headers(&to),
    )
    .await;
    // Every listing gives the message back; a broker that counts those returns against the
    // queue's delivery limit sees it refreshed before the count gets anywhere near a limit.
    let mut refreshed = false;
    for run in 0..8 {
        let out = sendwell(&["dead", "list", "--format", "jsonl"], &config).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let rows = jsonl(&out);
        assert_eq!(rows.len(), 1, "run {run}");
        let m = &rows[0];
        assert_eq!(m["job_id"], "kept");
        assert_eq!(m["reason_code"], "delivery_limit");
        assert_eq!(
            (m["exchange"].as_str(), m["routing_key"].as_str()),
            (Some(""), Some("sendwell.dead"))
        );
        let count = m["delivery_count"].as_i64().unwrap_or(0);
        assert!(count <= sendwell::ops::REFRESH_AT, "run {run}: {m}");
        if count >= sendwell::ops::REFRESH_AT {
            assert!(stderr(&out).contains("fresh copies"), "{}", stderr(&out));
            refreshed = true;
        }
        assert_eq!(dead_depth(&broker.url).await, 1, "run {run}");
    }
    eprintln!("refreshed during the runs: {refreshed}");
}

#[tokio::test]
async fn dead_tools_without_a_broker_exit_69() {
    let dir = tempfile::tempdir().unwrap();
    let config = offline_config(dir.path(), "amqp://guest:guest@127.0.0.1:1/%2f");
    for args in [&["dead", "list"][..], &["dead", "replay"][..]] {
        let out = sendwell(args, &config).await;
        assert_eq!(out.status.code(), Some(69), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("cannot reach"), "{}", stderr(&out));
        assert!(!stderr(&out).contains("guest:guest"), "{}", stderr(&out));
    }
}

async fn flags(state: &Path, to: &str) -> Option<u8> {
    let ledger = Ledger::open(state).unwrap();
    consent_flags(&ledger, to, "newsletter").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_backup_and_restore_bring_the_consent_back() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = offline_config(dir.path(), "amqp://guest:guest@127.0.0.1:1/%2f");
    let config = sendwell::config::Config::load(&config_path).unwrap();
    let state = config.state.dir.clone();
    let (kept, later) = (number(1), number(3));
    seed_consent_at(&config, &[kept.clone(), number(2)]).await;

    let backup = dir.path().join("backup.redb");
    let out = sendwell(
        &["state", "backup", "--to", backup.to_str().unwrap()],
        &config_path,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("mode 0600"), "{text}");
    assert!(text.contains("ledger_v1"), "{text}");
    assert!(text.contains("consent_history_v1  4"), "{text}");
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the backup holds personal data");

    // The state moves on after the backup; the restore brings back the backed-up state and
    // keeps the later one aside.
    seed_consent_at(&config, std::slice::from_ref(&later)).await;
    assert!(flags(&state, &later).await.is_some());
    let out = sendwell(
        &["state", "restore", "--from", backup.to_str().unwrap()],
        &config_path,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("state.redb.before-restore"), "{text}");
    assert!(text.contains("consent_history_v1  4"), "{text}");
    assert!(flags(&state, &kept).await.is_some(), "the consent is back");
    assert_eq!(
        flags(&state, &later).await,
        None,
        "the state is the backup's"
    );
    let aside = tempfile::tempdir().unwrap();
    std::fs::copy(
        state.join("state.redb.before-restore"),
        aside.path().join("state.redb"),
    )
    .unwrap();
    assert!(
        flags(aside.path(), &later).await.is_some(),
        "the previous store is kept"
    );

    // A store lost altogether comes back from the backup too.
    std::fs::remove_file(state.join("state.redb")).unwrap();
    let out = sendwell(
        &["state", "restore", "--from", backup.to_str().unwrap()],
        &config_path,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("there was no store before"),
        "{}",
        stdout(&out)
    );
    assert!(flags(&state, &kept).await.is_some(), "the consent is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_tools_refuse_a_store_in_use_and_a_file_that_is_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = offline_config(dir.path(), "amqp://guest:guest@127.0.0.1:1/%2f");
    let config = sendwell::config::Config::load(&config_path).unwrap();
    let state = config.state.dir.clone();
    let kept = number(1);
    seed_consent_at(&config, std::slice::from_ref(&kept)).await;
    let backup = dir.path().join("backup.redb");
    let out = sendwell(
        &["state", "backup", "--to", backup.to_str().unwrap()],
        &config_path,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Held open (as by the running daemon): both refuse with 75 and say what to do.
    {
        let _held = Ledger::open(&state).unwrap();
        let other = dir.path().join("other.redb");
        let out = sendwell(
            &["state", "backup", "--to", other.to_str().unwrap()],
            &config_path,
        )
        .await;
        assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("systemctl stop sendwell"),
            "{}",
            stderr(&out)
        );
        assert!(!other.exists());
        let out = sendwell(
            &["state", "restore", "--from", backup.to_str().unwrap()],
            &config_path,
        )
        .await;
        assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    }

    // Not a store: 65, and nothing changed.
    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, b"this is not a database").unwrap();
    let foreign = dir.path().join("foreign.redb");
    {
        let db = redb::Database::create(&foreign).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(redb::TableDefinition::<&str, &str>::new("other"))
            .unwrap()
            .insert("k", "v")
            .unwrap();
        w.commit().unwrap();
    }
    for file in [&garbage, &foreign] {
        let out = sendwell(
            &["state", "restore", "--from", file.to_str().unwrap()],
            &config_path,
        )
        .await;
        assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("not a sendwell state store"),
            "{}",
            stderr(&out)
        );
    }
    assert!(!state.join("state.redb.before-restore").exists());
    assert!(flags(&state, &kept).await.is_some());

    // Nothing to read: 66.
    let missing = dir.path().join("missing.redb");
    let out = sendwell(
        &["state", "restore", "--from", missing.to_str().unwrap()],
        &config_path,
    )
    .await;
    assert_eq!(out.status.code(), Some(66), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_tool_leaves_the_store_closed_cleanly() {
    // The tools' store writer must close the file before the process exits; otherwise the
    // next open (the daemon's start, a backup) has to repair it.
    let dir = tempfile::tempdir().unwrap();
    let config_path = offline_config(dir.path(), "amqp://guest:guest@127.0.0.1:1/%2f");
    let csv = dir.path().join("in.csv");
    std::fs::write(
        &csv,
        format!(
            "type,account,to,purposes,source,at,evidence\nopt_in,acme-de,{},newsletter,web,2026-11-29T08:00:00Z,box\n",
            number(5)
        ),
    )
    .unwrap();
    let out = sendwell(&["consent", "import", csv.to_str().unwrap()], &config_path).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let backup = dir.path().join("b.redb");
    let out = sendwell(
        &["state", "backup", "--to", backup.to_str().unwrap()],
        &config_path,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!all.contains("not been closed cleanly"), "{all}");
}
