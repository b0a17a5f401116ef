//! A state store that cannot be written (a full disk): the daemon holds what it knows, takes no
//! new job, says so on `/readyz`, and goes on by itself once the disk has room again; and a job
//! whose send was in doubt when its message was lost is never replayed into a second send.
//!
//! The full-disk test mounts a tmpfs of its own (it needs root, as CI and the dev container
//! run); without one it says so and stops.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sendwell::store::{Ledger, LedgerEntry, LedgerState};

/// The tests that break a store run one at a time: the store's health and its metric are the
/// process's (one daemon per process in production), and these tests assert on both.
static ONE_BROKEN_STORE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A small tmpfs mounted on a directory of its own under /tmp, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = std::env::temp_dir().join(format!(
            "sendwell-store-failure-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a daemon task still holding the file cannot keep the mount alive.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The consent seeded into the env's usual state directory, moved to `disk`; returns the new
/// state directory.
async fn seeded_state_on(env: &TestEnv, disk: &Tmpfs) -> PathBuf {
    let state = disk.dir.join("state");
    std::fs::create_dir(&state).unwrap();
    let seeded = Ledger::file_in(&env.config().state.dir);
    // Copied once the seeding's writer has closed it: a read-only handle keeps writers out.
    let closed = wait_for(
        "the seeded store to be closed",
        Duration::from_secs(20),
        async || redb::ReadOnlyDatabase::open(&seeded).ok(),
    )
    .await;
    std::fs::copy(&seeded, Ledger::file_in(&state)).unwrap();
    drop(closed);
    state
}

/// Writes zeros into `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 512] {
        let buf = vec![0u8; chunk];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
    }
    let _ = f.sync_all();
    written
}

async fn readyz(admin: std::net::SocketAddr) -> u16 {
    match reqwest::get(format!("http://{admin}/readyz")).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_mid_run_sends_nothing_twice_loses_nothing_and_the_daemon_recovers_by_itself() {
    const N: usize = 300;
    let _serial = ONE_BROKEN_STORE_AT_A_TIME.lock().await;
    let Some(disk) = Tmpfs::mount("48m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let mut opts = AppOptions::default();
    opts.sandbox.latency = Duration::from_secs(2);
    opts.consented = 0..N;
    let env = TestEnv::new(&opts).await;
    // The consent seeded into the usual state directory moves to the small disk.
    let state = seeded_state_on(&env, &disk).await;
    let state_dir = state.clone();
    let app = env.start_with(|c| c.state.dir = state_dir).await;
    let admin = app.admin();
    assert_eq!(readyz(admin).await, 200);

    // Marketing (never resent when in doubt) and utility (resent when in doubt) alike.
    let ids: Vec<String> = (0..N).map(|i| format!("disk-{i}")).collect();
    let jobs: Vec<serde_json::Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut j = template_job(id, &number(i));
            if i % 2 == 1 {
                j["category"] = "utility".into();
            }
            j
        })
        .collect();
    env.publish(&jobs).await;

    // Sends in flight (2 s each): the disk fills before their results come back.
    let sandbox = env.sandbox.clone();
    wait_for("sends in flight", Duration::from_secs(60), async || {
        (!sandbox.requests().is_empty()).then_some(())
    })
    .await;
    let reopens = |m: &str| {
        m.lines()
            .filter(|l| l.starts_with("sendwell_store_reopens_total{result=\"ok\"}"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let reopened_before = reopens(&app.metrics().await);
    let filler = disk.dir.join("filler");
    let f = filler.clone();
    let filled = tokio::task::spawn_blocking(move || fill(&f)).await.unwrap();
    assert!(filled > 0);

    wait_for(
        "/readyz to answer 503 while the disk is full",
        Duration::from_secs(30),
        async || (readyz(admin).await == 503).then_some(()),
    )
    .await;
    let metrics = app.metrics().await;
    assert_eq!(
        metric_value(&metrics, "sendwell_store_writable"),
        0.0,
        "{metrics}"
    );
    // Full for a while: the writer retries the held writes (the sends that came back meanwhile
    // wait with them) several times before the disk gets room again.
    let failures = |m: &str| metric_value(m, "sendwell_store_write_failures_total");
    let failed_at_503 = failures(&metrics);
    wait_for(
        "held writes retried on the full disk",
        Duration::from_secs(30),
        async || {
            let m = scrape(admin).await?;
            (failures(&m) >= failed_at_503 + 3.0).then_some(())
        },
    )
    .await;
    let sent_while_full = env.sandbox.accepted().len();

    std::fs::remove_file(&filler).unwrap();
    wait_for(
        "/readyz to answer 200 once the disk has room",
        Duration::from_secs(30),
        async || (readyz(admin).await == 200).then_some(()),
    )
    .await;

    let finals = env.final_outcomes(&ids, Duration::from_secs(180)).await;
    let wamids: HashMap<String, String> = env
        .sandbox
        .accepted()
        .into_iter()
        .filter_map(|r| Some((r.callback_data?, r.wamid?)))
        .collect();
    for id in &ids {
        assert_eq!(
            env.sandbox.accepted_count_for(id),
            1,
            "{id} reached the Cloud API once"
        );
        let f = &finals[id];
        assert_eq!(f.len(), 1, "{id}: one final outcome: {f:?}");
        assert_eq!(f[0]["status"], "sent", "{id}: {f:?}");
        assert_eq!(f[0]["wamid"].as_str(), Some(wamids[id].as_str()), "{id}");
    }
    // How far the run had got is the machine's business (redb fills free pages of its file
    // before it needs the disk's); that the store failed is checked above (/readyz, gauge).
    eprintln!("{sent_while_full} of {N} sent when the disk had been full for 4 s");
    assert!(
        env.dead.all().is_empty(),
        "nothing is dead-lettered: {:?}",
        env.dead.json()
    );
    // The same daemon, still running and ready.
    assert_eq!(readyz(admin).await, 200);
    let metrics = app.metrics().await;
    assert_eq!(metric_value(&metrics, "sendwell_store_writable"), 1.0);
    // The file was reopened (and so repaired) once the disk had room, not at every retry
    // while it was full.
    let reopened = reopens(&metrics) - reopened_before;
    assert!(
        (1.0..=2.0).contains(&reopened),
        "reopened {reopened} times for one outage"
    );
    app.stop().await;
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_stays_full_past_the_grace_makes_the_daemon_exit_74() {
    let _serial = ONE_BROKEN_STORE_AT_A_TIME.lock().await;
    let Some(disk) = Tmpfs::mount("16m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let env = TestEnv::new(&AppOptions {
        consented: 0..0,
        ..AppOptions::default()
    })
    .await;
    let state = disk.dir.join("state");
    let state_dir = state.clone();
    let mut app = env
        .start_with(|c| {
            c.state.dir = state_dir;
            c.state.unwritable_grace = Duration::from_secs(10);
        })
        .await;
    fill(&disk.dir.join("filler"));
    // Anything the daemon must record now meets the full disk (here the jobs' outcomes:
    // `suppressed`, as this new store holds no consent).
    let jobs: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            let mut j = template_job(&format!("full-{i}"), &number(i));
            j["category"] = "utility".into();
            j
        })
        .collect();
    env.publish(&jobs).await;
    let admin = app.admin();
    wait_for(
        "/readyz to answer 503",
        Duration::from_secs(30),
        async || (readyz(admin).await == 503).then_some(()),
    )
    .await;
    let running = app.app.take().unwrap();
    let r = tokio::time::timeout(Duration::from_secs(90), running.wait())
        .await
        .expect("the daemon stops by itself after the grace");
    let e = r.expect_err("a daemon that gives up on its store does not exit 0");
    assert_eq!(e.exit_code(), 74, "{e}");
    drop(disk);
}

/// A dead letter in `sendwell.dead` as the broker's delivery limit leaves it.
async fn put_delivery_limit_dead_letter(url: &str, job: &serde_json::Value) {
    let to = job["to"]
        .as_str()
        .unwrap()
        .trim_start_matches('+')
        .to_string();
    let s = |v: &str| AMQPValue::LongString(v.into());
    let mut death = FieldTable::default();
    death.insert("count".into(), AMQPValue::LongLongInt(20));
    death.insert("exchange".into(), s("sendwell.jobs"));
    death.insert("queue".into(), s("sendwell.jobs.0"));
    death.insert("reason".into(), s("delivery_limit"));
    death.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(vec![s(&to)].into()),
    );
    let mut h = FieldTable::default();
    h.insert(
        "x-death".into(),
        AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
    );
    h.insert("x-first-death-exchange".into(), s("sendwell.jobs"));
    h.insert("x-first-death-queue".into(), s("sendwell.jobs.0"));
    h.insert("x-first-death-reason".into(), s("delivery_limit"));
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.basic_publish(
        "".into(),
        "sendwell.dead".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        job.to_string().as_bytes(),
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(h),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let _ = conn.close(200, "".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_whose_send_was_in_doubt_is_not_replayed_into_a_second_send() {
    let env = TestEnv::new(&AppOptions {
        consented: 0..4,
        ..AppOptions::default()
    })
    .await;
    // The job's first life: its send was started (ledger `sending`) and never recorded, and the
    // broker's delivery limit dead-lettered its message. A utility job: one the daemon would
    // resend after a crash mid-call (its own message redelivered).
    let mut doubt = template_job("doubt-1", &number(1));
    doubt["category"] = "utility".into();
    let fresh = template_job("fresh-1", &number(2));
    {
        let ledger = Ledger::open(&env.config().state.dir).unwrap();
        let entry = |state| LedgerEntry {
            state,
            attempts: 1,
            updated_ms: jiff::Timestamp::now().as_millisecond(),
            published: false,
            event: Vec::new(),
        };
        ledger
            .put("doubt-1", entry(LedgerState::Sending))
            .await
            .unwrap();
        // A job dead-lettered before any send was started is replayed as usual.
        ledger
            .put("fresh-1", entry(LedgerState::Pending))
            .await
            .unwrap();
    }
    let app = env.start().await;
    put_delivery_limit_dead_letter(&env.broker.url, &doubt).await;
    put_delivery_limit_dead_letter(&env.broker.url, &fresh).await;

    let report = sendwell::ops::dead_replay(&env.config(), &Default::default())
        .await
        .unwrap();
    assert_eq!(report.replayed, 2, "{report}");
    let ids = ["doubt-1".to_string(), "fresh-1".to_string()];
    let finals = env.final_outcomes(&ids, Duration::from_secs(30)).await;
    let d = &finals["doubt-1"];
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0]["status"], "failed", "{d:?}");
    assert_eq!(d[0]["reason"], "ambiguous", "{d:?}");
    assert_eq!(
        env.sandbox.accepted_count_for("doubt-1"),
        0,
        "a send in doubt is not made a second time"
    );
    assert_eq!(finals["fresh-1"][0]["status"], "sent");
    assert_eq!(env.sandbox.accepted_count_for("fresh-1"), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sends_still_unrecorded_when_the_grace_runs_out_are_not_sent_again_after_the_restart() {
    const N: usize = 60;
    let _serial = ONE_BROKEN_STORE_AT_A_TIME.lock().await;
    let Some(disk) = Tmpfs::mount("48m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let mut opts = AppOptions::default();
    opts.sandbox.latency = Duration::from_secs(2);
    opts.consented = 0..N;
    // Utility: resent when in doubt, so a redelivered copy of a sent job would go out again.
    opts.extra_toml = "[retry.resend_ambiguous]\nutility = true\n".into();
    let env = TestEnv::new(&opts).await;
    let state = seeded_state_on(&env, &disk).await;
    let adjust = |c: &mut sendwell::config::Config| {
        c.state.dir = state.clone();
        c.state.unwritable_grace = Duration::from_secs(10);
    };
    let mut app = env.start_with(adjust).await;

    let ids: Vec<String> = (0..N).map(|i| format!("grace-{i}")).collect();
    let jobs: Vec<serde_json::Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut j = template_job(id, &number(i));
            j["category"] = "utility".into();
            j
        })
        .collect();
    env.publish(&jobs).await;
    let sandbox = env.sandbox.clone();
    wait_for("sends in flight", Duration::from_secs(60), async || {
        (!sandbox.requests().is_empty()).then_some(())
    })
    .await;
    let filler = disk.dir.join("filler");
    let f = filler.clone();
    tokio::task::spawn_blocking(move || fill(&f)).await.unwrap();

    // The disk stays full past the grace: the daemon gives up and stops (exit 74).
    let running = app.app.take().unwrap();
    let r = tokio::time::timeout(Duration::from_secs(90), running.wait())
        .await
        .expect("the daemon stops by itself after the grace");
    assert_eq!(r.expect_err("not exit 0").exit_code(), 74);
    let sent_before = env.sandbox.accepted().len();

    // Room again; the supervisor starts it again on the same state.
    std::fs::remove_file(&filler).unwrap();
    let app = env.start_with(adjust).await;
    let finals = env.final_outcomes(&ids, Duration::from_secs(180)).await;
    for id in &ids {
        assert_eq!(
            env.sandbox.accepted_count_for(id),
            1,
            "{id} reached the Cloud API once ({sent_before} sent before the stop)"
        );
        let f = &finals[id];
        assert_eq!(f.len(), 1, "{id}: one final outcome: {f:?}");
        assert_eq!(f[0]["status"], "sent", "{id}: {f:?}");
    }
    app.stop().await;
    drop(disk);
}
