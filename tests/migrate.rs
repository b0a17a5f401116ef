//! `sendwell state migrate --to-postgres` as an operator runs it: a daemon builds up state on
//! redb (a sent job, an opt-out, an erasure's tombstone, a frequency cap's count, spend), is
//! stopped, the real binary copies its store into an empty PostgreSQL database, and the daemon
//! started on PostgreSQL decides as before. Needs PostgreSQL (scripts/ensure-postgres.sh) and
//! RabbitMQ, whatever SENDWELL_TEST_BACKEND says: the first phase is always on redb.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use sendwell::consent::model::OPTED_OUT;
use sendwell::store::{Ledger, Table};

const T: Duration = Duration::from_secs(30);

/// Marketing: one send per recipient a week; a second is suppressed (`frequency_cap`).
const CAP_TOML: &str = r#"
[[caps]]
category = "marketing"
scope = "account"
rules = [{ max = 1, per = "7d" }]
"#;

fn consent(kind: &str, to: &str, purposes: &[&str], at: jiff::Timestamp) -> serde_json::Value {
    serde_json::json!({
        "type": kind, "account": "acme-de", "to": to, "purposes": purposes,
        "source": "website_form", "at": at.to_string(),
        "evidence": "Checkbox 'WhatsApp-Newsletter' ticked",
    })
}

/// Runs `sendwell state migrate --to-postgres --config <config>` (off the runtime's workers).
async fn migrate(config: &Path) -> Output {
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sendwell"))
            .args(["state", "migrate", "--to-postgres", "--config"])
            .arg(&config)
            .output()
            .expect("the sendwell binary runs")
    })
    .await
    .unwrap()
}

fn explain(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every row of every table, and the ledger's entry count.
async fn snapshot(ledger: &Ledger) -> (BTreeMap<&'static str, Vec<(Vec<u8>, Vec<u8>)>>, u64) {
    let mut tables = BTreeMap::new();
    for t in Table::ALL {
        tables.insert(t.pg_name(), ledger.kv_scan(t).await.unwrap());
    }
    (tables, ledger.job_count().await.unwrap())
}

/// The report's "name  copied / in the database" lines.
fn reported(stdout: &str) -> BTreeMap<String, (u64, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (name, copied, slash, target) = (w.next()?, w.next()?, w.next()?, w.next()?);
            (slash == "/" && name.starts_with("sw_")).then(|| {
                Some((
                    name.to_string(),
                    (copied.parse().ok()?, target.parse().ok()?),
                ))
            })?
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redb_store_moves_to_postgres_and_the_daemon_decides_as_before() {
    let extra = format!("{}{CAP_TOML}", webhook_toml(1 << 20));
    let opts = AppOptions {
        consented: 0..0,
        extra_toml: extra.clone(),
        ..AppOptions::default()
    };
    let env = TestEnv::with_dir_files(
        &opts,
        &[("app-secret", APP_SECRET), ("verify-token", VERIFY_TOKEN)],
    )
    .await;
    // The first phase on redb, whatever backend the suite runs on.
    let redb_config = |state: &str| {
        write_config_on(
            env.dir.path(),
            &env.broker.url,
            &env.sandbox_addr,
            GOOD_TOKEN,
            200,
            RELAXED_LIMITS,
            &extra,
            state,
        )
    };
    assert_eq!(redb_config(""), env.config_path);
    let (sent, opted_out, erased, capped) = (number(1), number(2), number(3), number(4));
    env.seed_consent(&[
        sent.clone(),
        opted_out.clone(),
        erased.clone(),
        capped.clone(),
    ])
    .await;

    let app = env.start().await;
    let ledger = app.app.as_ref().unwrap().ledger.clone();
    assert_eq!(ledger.backend_name(), "redb");
    env.publish(&[
        template_job("mig-sent", &sent),
        template_job("mig-capped", &capped),
    ])
    .await;
    let f = env
        .final_outcomes(&["mig-sent".into(), "mig-capped".into()], T)
        .await;
    assert_eq!(f["mig-sent"][0]["status"], "sent");
    assert_eq!(f["mig-capped"][0]["status"], "sent");
    env.publish_consent(&[consent("opt_out", &opted_out, &[], jiff::Timestamp::now())])
        .await;
    let erased_at = jiff::Timestamp::now();
    env.publish_consent(&[consent("erase", &erased, &[], erased_at)])
        .await;
    wait_for(
        "the opt-out, the erasure and the spend to be stored",
        T,
        async || {
            let out = consent_flags(&ledger, &opted_out, "newsletter").await == Some(OPTED_OUT);
            let tombstone = ledger.kv_len(Table::ConsentErased).await.unwrap() == 1;
            let spend = !ledger
                .kv_scan_prefix(Table::StoreMeta, b"spend|")
                .await
                .unwrap()
                .is_empty();
            (out && tombstone && spend).then_some(())
        },
    )
    .await;

    // The target: the same state directory (its redb is the source), state in PostgreSQL.
    let db = common::pg::TestDb::new().await;
    let pg_config = redb_config(&state_backend_toml(Some(&db)));
    // While the daemon holds the redb store, migrate refuses and touches nothing.
    let o = migrate(&pg_config).await;
    assert_eq!(o.status.code(), Some(75), "{}", explain(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Stop the daemon first"),
        "{}",
        explain(&o)
    );
    drop(ledger);
    app.stop().await;

    let state_dir = env.config().state.dir;
    let redb = Ledger::open(&state_dir).unwrap();
    let (before, jobs_before) = snapshot(&redb).await;
    let sent_entry = redb.get("mig-sent").await.unwrap().expect("a ledger entry");
    assert!(sent_entry.published, "the sent job's outcome was confirmed");
    assert!(jobs_before >= 2, "{jobs_before} ledger entries");
    for table in ["sw_consent_erased", "sw_cap_history", "sw_consent_summary"] {
        assert!(!before[table].is_empty(), "{table} has rows to copy");
    }
    drop(redb);
    assert!(sendwell::store::wait_closed(Duration::from_secs(10)));

    let o = migrate(&pg_config).await;
    assert_eq!(o.status.code(), Some(0), "{}", explain(&o));
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let report = reported(&stdout);
    assert_eq!(report.len(), Table::ALL.len() + 1, "{stdout}");
    assert_eq!(report["sw_ledger"], (jobs_before, jobs_before), "{stdout}");
    for (table, rows) in &before {
        let n = rows.len() as u64;
        assert_eq!(report[*table], (n, n), "{table}: {stdout}");
    }
    for digits in [&sent[1..], &opted_out[1..], &erased[1..], &capped[1..]] {
        assert!(
            !stdout.contains(digits) && !String::from_utf8_lossy(&o.stderr).contains(digits),
            "no number in the output: {}",
            explain(&o)
        );
    }
    // The redb store still holds what it held (a way back).
    let redb = Ledger::open(&state_dir).unwrap();
    let (unchanged, jobs_unchanged) = snapshot(&redb).await;
    assert!(
        unchanged == before && jobs_unchanged == jobs_before,
        "the redb store is left as it was"
    );
    drop(redb);
    assert!(sendwell::store::wait_closed(Duration::from_secs(10)));

    // A second run finds the database full and refuses.
    let o = migrate(&pg_config).await;
    assert_eq!(o.status.code(), Some(73), "{}", explain(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already holds sendwell state"),
        "{}",
        explain(&o)
    );

    // Row for row what the redb store held.
    let pg = Ledger::open_state(&env.config().state, false)
        .await
        .unwrap();
    assert_eq!(pg.backend_name(), "postgres");
    let (after, jobs_after) = snapshot(&pg).await;
    assert_eq!(jobs_after, jobs_before);
    for (table, rows) in &before {
        assert!(&after[table] == rows, "{table} differs after the copy");
    }
    assert_eq!(pg.get("mig-sent").await.unwrap(), Some(sent_entry));
    drop(pg);

    // The daemon on PostgreSQL gives the same decisions.
    let app = env.start().await;
    assert_eq!(app.app.as_ref().unwrap().ledger.backend_name(), "postgres");
    // An opt-in (and its confirmation) dated before the erasure, arriving late: the tombstone
    // voids both, so the erased number stays without consent.
    let before_erasure = erased_at - Duration::from_secs(60);
    env.publish_consent(&[
        consent("opt_in", &erased, &["newsletter"], before_erasure),
        consent("confirm", &erased, &[], before_erasure),
    ])
    .await;
    wait_for("the late opt-in to be voided", T, async || {
        let m = app.metrics().await;
        (metric_value(
            &m,
            "sendwell_consent_events_total{type=\"opt_in\",result=\"void\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    env.publish(&[
        template_job("mig-sent", &sent),
        template_job("after-opt-out", &opted_out),
        template_job("after-erasure", &erased),
        template_job("after-cap", &capped),
    ])
    .await;
    let outcomes = env.outcomes.clone();
    wait_for("the republished id to be a duplicate", T, async || {
        outcomes
            .for_id("mig-sent")
            .iter()
            .any(|e| e["status"] == "duplicate")
            .then_some(())
    })
    .await;
    let ids = ["after-opt-out", "after-erasure", "after-cap"].map(String::from);
    let f = env.final_outcomes(&ids, T).await;
    let decided = |id: &str| {
        let e = &f[id][0];
        (
            e["status"].as_str().unwrap_or_default().to_string(),
            e["reason"].as_str().unwrap_or_default().to_string(),
        )
    };
    assert_eq!(
        decided("after-opt-out"),
        ("suppressed".into(), "opted_out".into())
    );
    assert_eq!(
        decided("after-erasure"),
        ("suppressed".into(), "no_consent".into())
    );
    assert_eq!(
        decided("after-cap"),
        ("suppressed".into(), "frequency_cap".into())
    );
    assert_eq!(
        env.outcomes
            .for_id("mig-sent")
            .iter()
            .filter(|e| e["status"] == "sent")
            .count(),
        1
    );
    assert_eq!(
        env.sandbox.accepted().len(),
        2,
        "nothing was sent after the move"
    );
    app.stop().await;
}
