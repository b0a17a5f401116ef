//! Consent seeded once per test binary and copied into each test's state.
//!
//! Most tests start with `number(0..4000)` consented (`AppOptions::consented`). Applying those
//! 8,000 events through the consent store costs a debug build about 4 s on redb and 10 s on
//! PostgreSQL, for every test; a copy of a store seeded once costs milliseconds (a file copy on
//! redb, `CREATE DATABASE … TEMPLATE` on PostgreSQL). The copy holds what seeding the test's
//! own store would have written: the events and the summaries derived from them alone (no
//! config in them), with times an hour before the template was made, which is at most the
//! binary's run time before the test's start. The copies of one binary share the seeded
//! store's random erase key (`consent::store::erase_key`); no test relies on it being unique.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;

use super::pg::TestDb;

/// A store with a range of numbers consented, to copy.
pub enum Template {
    /// A closed `state.redb`, in a directory named after this process (see [`sweep_files`]).
    Redb(PathBuf),
    /// A database no one stays connected to (the process-wide [`TestDb`] is never dropped;
    /// the next run's sweep drops it).
    Postgres(Box<TestDb>),
}

type Key = (bool, usize, usize);

/// One template per (PostgreSQL?, range), made by the first test that asks.
fn slot(postgres: bool, range: &Range<usize>) -> Arc<OnceCell<Template>> {
    static SLOTS: Mutex<Option<HashMap<Key, Arc<OnceCell<Template>>>>> = Mutex::new(None);
    let mut slots = SLOTS.lock().unwrap();
    slots
        .get_or_insert_with(HashMap::new)
        .entry((postgres, range.start, range.end))
        .or_default()
        .clone()
}

/// The template for `range`, seeded at the first call.
pub async fn template(postgres: bool, range: Range<usize>) -> Arc<OnceCell<Template>> {
    let cell = slot(postgres, &range);
    cell.get_or_init(|| make(postgres, range.clone())).await;
    cell
}

async fn make(postgres: bool, range: Range<usize>) -> Template {
    let dir = seed_dir(postgres, &range);
    let db = match postgres {
        true => Some(TestDb::new().await),
        false => None,
    };
    // The tests' base config: account acme-de and purpose newsletter, which the seed needs.
    // Nothing is sent or consumed; the broker and the sandbox are never contacted.
    let config_path = super::write_config_on(
        &dir,
        "amqp://127.0.0.1:5672/%2f",
        &"127.0.0.1:9".parse().unwrap(),
        super::GOOD_TOKEN,
        1,
        "",
        "",
        &super::state_backend_toml(db.as_ref()),
    );
    let config = sendwell::config::Config::load(&config_path).expect("seed config is valid");
    let numbers: Vec<String> = range.map(super::number).collect();
    super::seed_consent_at(&config, &numbers).await;
    match db {
        Some(db) => {
            closed_on_postgres(&db).await;
            Template::Postgres(Box::new(db))
        }
        None => {
            let file = sendwell::store::RedbLedger::file_in(&config.state.dir);
            wait_closed(&file);
            Template::Redb(file)
        }
    }
}

/// Waits (20 s at most) until no session is on the seeded database, so each copy can be made
/// (`CREATE DATABASE … TEMPLATE` refuses a template in use, after waiting 5 s itself). The
/// seeding store's pool closes its connections on tasks of its own, and its writer may
/// reconnect once more: this role's own client sessions there are ended, each round. Only
/// those: other sessions (an autovacuum worker) are not this role's to end, and leave soon.
async fn closed_on_postgres(db: &TestDb) {
    // From the role's own database: a session on the template would keep it in use.
    let client = db.admin_client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // The writer, its session ended, may reconnect at its next keep-alive tick (500 ms at
    // most): "none" counts once it has held for longer than that.
    let mut none_since: Option<std::time::Instant> = None;
    loop {
        let others: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                &[&db.name],
            )
            .await
            .expect("listing the sessions on the seeded database")
            .get(0);
        if others == 0 {
            let since = *none_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > Duration::from_millis(600) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        none_since = None;
        assert!(
            std::time::Instant::now() < deadline,
            "{others} sessions still on the seeded database {} after 20 s",
            db.name
        );
        let _ = client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 \
                 AND usename = current_user AND backend_type = 'client backend'",
                &[&db.name],
            )
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The dropped store closes its file on its writer thread a moment later; a copy taken before
/// would be of a file redb marks as needing repair.
fn wait_closed(file: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match redb::Database::open(file) {
            Ok(db) => return drop(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("{}: the seeded store did not close: {e}", file.display()),
        }
    }
}

/// A directory for one template: under the system's temp dir, named after this process, so a
/// later run can remove a killed run's leftovers.
fn seed_dir(postgres: bool, range: &Range<usize>) -> PathBuf {
    sweep_files();
    let dir = std::env::temp_dir().join(format!(
        "sendwell-seed-{}-{}-{}-{}",
        std::process::id(),
        if postgres { "pg" } else { "redb" },
        range.start,
        range.end
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Once per process: removes template directories whose process is gone.
fn sweep_files() {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("sendwell-seed-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
}

/// Puts a copy of the redb template where `state_dir` keeps its store.
pub fn copy_redb(template: &Path, state_dir: &Path) {
    std::fs::create_dir_all(state_dir).unwrap();
    let to = sendwell::store::RedbLedger::file_in(state_dir);
    std::fs::copy(template, &to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", template.display(), to.display()));
}
