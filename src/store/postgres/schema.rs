//! The schema's versions, embedded in the binary and applied by sendwell itself at start: no
//! migration tool to install, and several instances starting at once apply each version once
//! (an advisory lock orders them).

use tokio_postgres::Client;

use super::{MIGRATE_LOCK, pg_error};
use crate::store::LedgerError;

/// (version, name, SQL), in order; a released one is never edited.
pub(super) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "initial", include_str!("migrations/0001_initial.sql")),
    (
        2,
        "instances",
        include_str!("migrations/0002_instances.sql"),
    ),
    (3, "follow", include_str!("migrations/0003_follow.sql")),
    (4, "quota", include_str!("migrations/0004_quota.sql")),
    (5, "log_send", include_str!("migrations/0005_log_send.sql")),
    (
        6,
        "follow_purged",
        include_str!("migrations/0006_follow_purged.sql"),
    ),
];

/// The newest version this binary knows.
pub(super) fn known() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Brings the schema to [`known`] under the migration lock, each version in its own
/// transaction; refuses a database migrated by a newer sendwell. Returns the versions applied.
pub(super) async fn migrate(client: &mut Client) -> Result<Vec<i32>, LedgerError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(pg_error)?;
    let result = apply(client).await;
    // A session lock: released with the connection anyway if this fails.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])
        .await;
    result
}

async fn apply(client: &mut Client) -> Result<Vec<i32>, LedgerError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS sw_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(pg_error)?;
    let done: Vec<i32> = client
        .query("SELECT version FROM sw_migrations", &[])
        .await
        .map_err(pg_error)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let found = done.iter().copied().max().unwrap_or(0);
    if found > known() {
        return Err(LedgerError::SchemaTooNew {
            found: found.into(),
            known: known().into(),
        });
    }
    let mut applied = Vec::new();
    for &(version, name, sql) in pending(MIGRATIONS, &done) {
        let tx = client.transaction().await.map_err(pg_error)?;
        // A version may rewrite a large table (4 adds generated columns to sw_tier_usage: about
        // 1.3 s per million rows here); the session's statement timeout would fail it at
        // every start past some size. Only this transaction's statements.
        tx.batch_execute("SET LOCAL statement_timeout = 0")
            .await
            .map_err(pg_error)?;
        tx.batch_execute(sql).await.map_err(pg_error)?;
        tx.execute(
            "INSERT INTO sw_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        tracing::info!(version, name, "State database schema migrated.");
        applied.push(version);
    }
    Ok(applied)
}

/// The versions of `all` not in `done`, in order: every one not applied yet, not only those
/// above the newest applied, as two versions made on separate branches may land in either
/// order.
fn pending<'a>(
    all: &'a [(i32, &'a str, &'a str)],
    done: &'a [i32],
) -> impl Iterator<Item = &'a (i32, &'a str, &'a str)> {
    all.iter().filter(|m| !done.contains(&m.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_below_the_newest_applied_is_still_applied() {
        let all = [(1, "a", ""), (2, "b", ""), (3, "c", "")];
        let left: Vec<i32> = pending(&all, &[1, 3]).map(|m| m.0).collect();
        assert_eq!(left, [2]);
        let left: Vec<i32> = pending(&all, &[]).map(|m| m.0).collect();
        assert_eq!(left, [1, 2, 3]);
    }
}
