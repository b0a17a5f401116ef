//! TLS to PostgreSQL (`state.postgres.tls`) against the tests' server, which on Debian has
//! `ssl = on` with the "snakeoil" certificate: self-signed, for `localhost`. `require` encrypts
//! every connection of the store; `verify-full` refuses that certificate against the system's
//! roots (a setting to fix: the daemon does not wait for it), and accepts it as `ca_file` for
//! the name it carries, and for no other.

mod common;

use std::time::Duration;

use common::*;
use sendwell::config::Config;
use sendwell::store::{Ledger, LedgerError, Table};

/// A config whose state is `db`'s database at `url` (default: the database's own URL), with
/// `extra` in `[state.postgres]`.
fn config(dir: &std::path::Path, db: &pg::TestDb, url: Option<&str>, extra: &str) -> Config {
    let state = format!(
        "backend = \"postgres\"\n[state.postgres]\nurl = \"{}\"\npassword_file = \"{}\"\n{extra}\n",
        url.unwrap_or(&db.url),
        db.password_file.display()
    );
    let path = write_config_on(
        dir,
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        &"127.0.0.1:9".parse().unwrap(),
        GOOD_TOKEN,
        50,
        RELAXED_LIMITS,
        "",
        &state,
    );
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// `db` by the name of the snakeoil certificate, `localhost`, at the address of the tests'
/// server (`hostaddr`).
fn by_name(db: &pg::TestDb) -> String {
    let u = reqwest::Url::parse(&db.url).unwrap();
    format!(
        "postgres://{}@localhost:{}/{}?hostaddr={}",
        u.username(),
        u.port().unwrap_or(5432),
        db.name,
        u.host_str().unwrap()
    )
}

/// The server's `ssl` setting and certificate file.
async fn server_ssl(db: &pg::TestDb) -> (bool, String) {
    let c = db.client().await;
    let on: String = c.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    let cert: String = c.query_one("SHOW ssl_cert_file", &[]).await.unwrap().get(0);
    (on == "on", cert)
}

/// Whether each connection of the store (writer and pool) to `db` is encrypted, by role.
async fn store_connections(db: &pg::TestDb) -> Vec<(String, bool)> {
    let c = db.client().await;
    c.query(
        "SELECT a.application_name, s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = current_database() AND a.application_name LIKE 'sendwell:%' \
         ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Opens the store as the daemon does, and reads through the pool so it has a connection.
async fn open(config: &Config) -> Result<Ledger, LedgerError> {
    let ledger = tokio::time::timeout(
        Duration::from_secs(20),
        Ledger::open_state(&config.state, false),
    )
    .await
    .expect("the open ends within 20 s")?;
    ledger.kv_get(Table::ConsentHistory, b"none").await?;
    Ok(ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_require_encrypts_every_connection_of_the_store() {
    let db = pg::TestDb::new().await;
    if !server_ssl(&db).await.0 {
        eprintln!("SKIPPED: the tests' PostgreSQL has ssl = off");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _ledger = open(&config(dir.path(), &db, None, "tls = \"require\""))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let conns = store_connections(&db).await;
    let roles: Vec<&str> = conns.iter().map(|(r, _)| r.as_str()).collect();
    assert!(
        roles.contains(&"sendwell:writer") && roles.contains(&"sendwell:pool"),
        "{conns:?}"
    );
    assert!(conns.iter().all(|(_, ssl)| *ssl), "{conns:?}");

    // The measure tells the difference: the same open without TLS, to a database of its own.
    let plain_db = pg::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let _plain = open(&config(dir.path(), &plain_db, None, "tls = \"off\""))
        .await
        .unwrap();
    let conns = store_connections(&plain_db).await;
    assert!(
        !conns.is_empty() && conns.iter().all(|(_, ssl)| !*ssl),
        "{conns:?}"
    );
}

/// With the system's roots. On Debian those include the snakeoil certificate itself (it lies in
/// /etc/ssl/certs, which OpenSSL and rustls-native-certs read whole), so it is refused here for
/// the address it is asked at; and, with only the curated bundle as roots (`SSL_CERT_FILE`, for
/// a process of its own), for its issuer too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_self_signed_certificate_at_once() {
    let db = pg::TestDb::new().await;
    if !server_ssl(&db).await.0 {
        eprintln!("SKIPPED: the tests' PostgreSQL has ssl = off");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let began = std::time::Instant::now();
    let by_address = config(dir.path(), &db, None, "tls = \"verify-full\"");
    let e = open(&by_address)
        .await
        .err()
        .expect("verify-full refuses a certificate for localhost at 127.0.0.1");
    // Store, not Io: a daemon's start ends on it instead of waiting for the database.
    let LedgerError::Store(why) = &e else {
        panic!("not a permanent error: {e:?}")
    };
    assert!(
        why.contains("TLS") && why.contains("not valid for name") && why.contains("ca_file"),
        "{why}"
    );
    // "At once": not after the retries a transient error gets (the open's 20 s would end it);
    // loose enough for two cores shared with other work.
    assert!(began.elapsed() < Duration::from_secs(15), "{e}");

    let bundle = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
    if !bundle.exists() {
        eprintln!("SKIPPED (the issuer part): no {}", bundle.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Written to dir/sendwell.toml, for the command.
    config(
        dir.path(),
        &db,
        Some(&by_name(&db)),
        "tls = \"verify-full\"",
    );
    let path = dir.path().join("sendwell.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sendwell"))
        .args(["consent", "show", "+491701234567", "--config"])
        .arg(&path)
        .env("SSL_CERT_FILE", bundle)
        .env_remove("SSL_CERT_DIR")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(73), "{said}");
    assert!(said.contains("UnknownIssuer"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_accepts_the_servers_certificate_as_ca_file_for_its_name_only() {
    let db = pg::TestDb::new().await;
    let (on, cert) = server_ssl(&db).await;
    if !on {
        eprintln!("SKIPPED: the tests' PostgreSQL has ssl = off");
        return;
    }
    // The certificate names the host to ask for; the snakeoil one says localhost.
    let names = std::process::Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName",
            "-in",
        ])
        .arg(&cert)
        .output();
    let names = match names {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            eprintln!("SKIPPED: cannot read the server's certificate {cert} with openssl");
            return;
        }
    };
    if !names.contains("DNS:localhost") {
        eprintln!("SKIPPED: the server's certificate is not for localhost: {names}");
        return;
    }
    let extra = format!("tls = \"verify-full\"\nca_file = \"{cert}\"");
    let dir = tempfile::tempdir().unwrap();
    // Asked for by the name the certificate carries (at the same address).
    let ledger = open(&config(dir.path(), &db, Some(&by_name(&db)), &extra))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let conns = store_connections(&db).await;
    assert!(
        !conns.is_empty() && conns.iter().all(|(_, ssl)| *ssl),
        "{conns:?}"
    );
    drop(ledger);
    // Asked for by another name: the certificate is not for 127.0.0.1.
    let port = reqwest::Url::parse(&db.url).unwrap().port().unwrap_or(5432);
    let by_address = format!("postgres://sendwell@127.0.0.1:{port}/{}", db.name);
    let e = open(&config(dir.path(), &db, Some(&by_address), &extra))
        .await
        .err()
        .expect("a certificate for localhost is refused for 127.0.0.1");
    let LedgerError::Store(why) = &e else {
        panic!("not a permanent error: {e:?}")
    };
    assert!(why.contains("certificate"), "{why}");
}
