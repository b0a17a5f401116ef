//! `tests/common/pg.rs`: each test gets a PostgreSQL database of its own, reachable with the URL
//! and password file it hands out, and gone once it is dropped, even with a client still
//! connected. Needs the tests' PostgreSQL (`scripts/ensure-postgres.sh`).

mod common;

use common::pg::TestDb;

/// Whether `name` exists, asked over a connection of the test role's own database.
async fn exists(name: &str) -> bool {
    let url = std::env::var("SENDWELL_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://sendwell@127.0.0.1:5432/sendwell".into());
    let password = std::env::var("SENDWELL_TEST_PG_PASSWORD").unwrap_or_else(|_| "sendwell".into());
    let mut c: tokio_postgres::Config = url.parse().unwrap();
    c.password(password);
    let (client, conn) = c.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

#[tokio::test]
async fn a_test_database_is_usable_and_gone_after_drop() {
    let db = TestDb::new().await;
    let name = db.name.clone();
    assert!(name.starts_with("sw_t_"), "{name}");
    assert!(db.url.ends_with(&format!("/{name}")), "{}", db.url);
    let parsed: tokio_postgres::Config = db.url.parse().unwrap();
    assert_eq!(parsed.get_password(), None, "no password in the URL");
    assert_eq!(
        std::fs::read_to_string(&db.password_file)
            .unwrap()
            .trim_end(),
        db.password()
    );
    assert!(exists(&name).await);

    // What a daemon would do with it: the URL plus the password from the file.
    let mut c: tokio_postgres::Config = db.url.parse().unwrap();
    c.password(
        std::fs::read_to_string(&db.password_file)
            .unwrap()
            .trim_end(),
    );
    let (client, conn) = c.connect(tokio_postgres::NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    client
        .batch_execute("CREATE TABLE t (k bigint PRIMARY KEY, v text NOT NULL)")
        .await
        .unwrap();
    client
        .execute("INSERT INTO t VALUES ($1, $2)", &[&7i64, &"seven"])
        .await
        .unwrap();
    let v: String = client
        .query_one("SELECT v FROM t WHERE k = $1", &[&7i64])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "seven");
    let current: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(current, name);

    // Dropped with this client still connected: WITH (FORCE) ends its session.
    drop(db);
    assert!(!exists(&name).await, "{name} still exists after drop");
    // Ended either way: cleanly or with the server's "terminating connection" error.
    let _ended = tokio::time::timeout(std::time::Duration::from_secs(10), conn)
        .await
        .expect("the forced drop ends the connection")
        .expect("the connection task did not panic");
    assert!(client.is_closed());
}

#[tokio::test]
async fn two_test_databases_are_two_databases() {
    let (a, b) = (TestDb::new().await, TestDb::new().await);
    assert_ne!(a.name, b.name);
    a.client()
        .await
        .batch_execute("CREATE TABLE only_in_a ()")
        .await
        .unwrap();
    let in_b = b
        .client()
        .await
        .query_opt("SELECT 1 FROM pg_tables WHERE tablename = 'only_in_a'", &[])
        .await
        .unwrap();
    assert!(in_b.is_none());
}
