//! A PostgreSQL database of its own for each test, like the vhost of its own on RabbitMQ: made
//! through `SENDWELL_TEST_PG_URL` (role `sendwell`, CREATEDB; `scripts/ensure-postgres.sh` sets it
//! up and `scripts/test.sh` exports the variables) and dropped when the test ends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::NoTls;

/// What `scripts/ensure-postgres.sh` sets up, for a plain `cargo test` after it ran.
const DEFAULT_URL: &str = "postgres://sendwell@127.0.0.1:5432/sendwell";
const DEFAULT_PASSWORD: &str = "sendwell";
/// Test databases are named `sw_t_<uuid>`; the sweep looks for this prefix.
const PREFIX: &str = "sw_t_";
/// How long creating or dropping a test database may take before the test fails.
const WITHIN: Duration = Duration::from_secs(20);

/// The state backend the integration tests run against: `SENDWELL_TEST_BACKEND`, `redb` (the
/// default) or `postgres`.
pub fn backend() -> &'static str {
    match std::env::var("SENDWELL_TEST_BACKEND").as_deref() {
        Err(_) | Ok("") | Ok("redb") => "redb",
        Ok("postgres") => "postgres",
        Ok(other) => panic!("SENDWELL_TEST_BACKEND={other}: expected redb or postgres"),
    }
}

/// A fresh database, dropped (`WITH (FORCE)`: a daemon still connected does not stop it) when
/// this is dropped.
pub struct TestDb {
    /// `postgres://sendwell@127.0.0.1:5432/sw_t_…`: no password in it, as `state.postgres.url`
    /// must be.
    pub url: String,
    /// Holds the password, for `state.postgres.password_file`.
    pub password_file: PathBuf,
    /// The database's name (`sw_t_<uuid>`).
    pub name: String,
    password: String,
    /// The server, as the test role, connected to its own database (not this one).
    admin: tokio_postgres::Config,
    _dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn new() -> TestDb {
        Self::create(None).await
    }

    /// A fresh database holding a copy of `template` (no one may be connected to it).
    pub async fn copy_of(template: &TestDb) -> TestDb {
        Self::create(Some(&template.name)).await
    }

    async fn create(template: Option<&str>) -> TestDb {
        let (base_url, password) = settings();
        let admin = client_config(&base_url, &password);
        let client = connect(&admin).await;
        sweep_leftovers(&client).await;

        let name = format!("{PREFIX}{}", uuid::Uuid::new_v4().simple());
        // Identifiers cannot be bound; this one is ours, plain [a-z0-9_]. Two statements: CREATE
        // DATABASE cannot run in the implicit transaction of a multi-statement query.
        let from = template
            .map(|t| format!(" TEMPLATE \"{t}\""))
            .unwrap_or_default();
        for sql in [
            format!("CREATE DATABASE \"{name}\"{from}"),
            format!("COMMENT ON DATABASE \"{name}\" IS '{}'", owner_mark()),
        ] {
            tokio::time::timeout(WITHIN, client.batch_execute(&sql))
                .await
                .unwrap_or_else(|_| panic!("{sql}: no answer within {WITHIN:?}"))
                .unwrap_or_else(|e| panic!("{sql}: {}", error_text(&e)));
        }

        let mut url = reqwest::Url::parse(&base_url).expect("SENDWELL_TEST_PG_URL is a URL");
        url.set_path(&format!("/{name}"));
        let dir = tempfile::tempdir().unwrap();
        let password_file = dir.path().join("pg-password");
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        TestDb {
            url: url.to_string(),
            password_file,
            name,
            password,
            admin,
            _dir: dir,
        }
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// A connection to this database (its driver task runs on the caller's runtime).
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&client_config(&self.url, &self.password)).await
    }

    /// A connection to the server as the test role, on its own database (not this one).
    pub async fn admin_client(&self) -> tokio_postgres::Client {
        connect(&self.admin).await
    }

    /// The `[state.postgres]` table for a test's config (`state.backend = "postgres"` goes in
    /// the `[state]` section, which this does not write).
    pub fn state_postgres_toml(&self) -> String {
        format!(
            "[state.postgres]\nurl = \"{}\"\npassword_file = \"{}\"\n",
            self.url,
            self.password_file.display()
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be the one calling (or gone): a thread of
        // its own with a runtime of its own, joined, and bounded in time.
        let admin = self.admin.clone();
        let name = self.name.clone();
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for dropping the test database");
            rt.block_on(async {
                tokio::time::timeout(WITHIN, async {
                    let (client, conn) = admin.connect(NoTls).await?;
                    tokio::spawn(conn);
                    client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .await
                })
                .await
            })
        })
        .join();
        // No panic in Drop (it may run while a failed test unwinds): the next run sweeps it.
        match done {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("DROP DATABASE {}: {}", self.name, error_text(&e)),
            Ok(Err(_)) => eprintln!("DROP DATABASE {}: no answer within {WITHIN:?}", self.name),
            Err(_) => eprintln!("DROP DATABASE {}: the dropping thread panicked", self.name),
        }
    }
}

/// The server's URL (without password) and the password, from the environment.
fn settings() -> (String, String) {
    let url = std::env::var("SENDWELL_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_URL.into());
    let password =
        std::env::var("SENDWELL_TEST_PG_PASSWORD").unwrap_or_else(|_| DEFAULT_PASSWORD.into());
    (url, password)
}

fn client_config(url: &str, password: &str) -> tokio_postgres::Config {
    let mut c: tokio_postgres::Config = url
        .parse()
        .unwrap_or_else(|e| panic!("SENDWELL_TEST_PG_URL: {}", error_text(&e)));
    c.password(password);
    c.connect_timeout(Duration::from_secs(5));
    c.application_name("sendwell-tests");
    c
}

async fn connect(c: &tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, conn) = c.connect(NoTls).await.unwrap_or_else(|e| {
        panic!(
            "cannot connect to the tests' PostgreSQL ({}; run scripts/ensure-postgres.sh, or set \
             SENDWELL_TEST_PG_URL and SENDWELL_TEST_PG_PASSWORD)",
            error_text(&e)
        )
    });
    tokio::spawn(conn);
    client
}

/// The error with its cause (tokio-postgres's `Display` leaves the cause out: "db error").
fn error_text(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

/// Written as each test database's comment: which process made it, so a later run can tell a
/// leftover (its process is gone: killed before `Drop` ran) from a database in use.
fn owner_mark() -> String {
    format!(
        "sendwell-test host={} pid={}",
        hostname(),
        std::process::id()
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Once per test binary: drops the test databases of this host whose process is gone. A server
/// shared with other hosts keeps theirs (their processes cannot be seen from here).
async fn sweep_leftovers(client: &tokio_postgres::Client) {
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if SWEPT.swap(true, Ordering::SeqCst) {
        return;
    }
    let rows = client
        .query(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database \
             WHERE starts_with(datname, $1)",
            &[&PREFIX],
        )
        .await
        .unwrap_or_else(|e| panic!("listing test databases: {}", error_text(&e)));
    let host = format!("sendwell-test host={} pid=", hostname());
    for row in rows {
        let (name, mark): (String, Option<String>) = (row.get(0), row.get(1));
        let Some(pid) = mark.as_deref().and_then(|m| m.strip_prefix(&host)) else {
            continue;
        };
        let alive = pid.parse::<u32>().is_ok_and(|p| {
            p == std::process::id() || std::path::Path::new(&format!("/proc/{p}")).exists()
        });
        let plain = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !alive && plain {
            // Another binary's sweep may be dropping it at the same moment: IF EXISTS, and an
            // error is not this test's failure.
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await;
        }
    }
}
