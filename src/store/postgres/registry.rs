//! The registry of running instances (`sw_instances`, migration 0002): the statements behind
//! [`crate::instances`]' heartbeats. Kept beside the store because it uses the store's pool;
//! it is not state in the ledger's sense (a migration or a backup ignores it).
//!
//! Every statement uses the database's clock (`now()`), never the host's: two hosts whose
//! clocks disagree still agree on which rows are live. Errors never mark the store unhealthy:
//! the registry is a note on who runs, and a failed heartbeat is retried by its loop, while jobs
//! go on (the ledger's own writes say whether the database can be used).

use deadpool_postgres::Pool;
use tokio_postgres::types::Type;

use super::{pg_error, pool_error};
use crate::store::LedgerError;

/// Upsert of this instance's row, then what is live: rows whose heartbeat is younger than 10 s
/// (docs/design/instances.md, decision 5). Other rows are read as the statement's snapshot saw
/// them, our own is counted from its parameters (what a data-modifying CTE writes is not
/// visible to the rest of its statement). One round trip.
const HEARTBEAT: &str = "WITH me AS (
        INSERT INTO sw_instances (id, shard, host, pid, active_since)
        VALUES ($1::uuid, $2, $3, $4, CASE WHEN $5 THEN now() END)
        ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(),
            active_since = CASE WHEN $5 THEN coalesce(sw_instances.active_since, now()) END)
    SELECT (SELECT array_agg(DISTINCT s ORDER BY s) FROM (
                SELECT shard AS s FROM sw_instances
                WHERE id <> $1::uuid AND heartbeat_at > now() - interval '10 seconds'
                UNION ALL SELECT $2) live),
           (SELECT count(*) FROM sw_instances
                WHERE id <> $1::uuid AND heartbeat_at > now() - interval '10 seconds') + 1";

const SET_ACTIVE: &str = "UPDATE sw_instances SET heartbeat_at = now(),
        active_since = CASE WHEN $2 THEN now() END WHERE id = $1::uuid";

const DELETE: &str = "DELETE FROM sw_instances WHERE id = $1::uuid";

const PURGE: &str = "DELETE FROM sw_instances WHERE heartbeat_at < now() - interval '1 day'";

/// Who this process is, as its row says.
#[derive(Clone, Debug)]
pub struct Me {
    /// A UUID, as text (tokio-postgres is built without its uuid feature; the cast is in SQL).
    pub id: String,
    pub shard: i32,
    pub host: String,
    pub pid: i32,
}

/// What the registry says is live after a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveSet {
    /// Distinct shards with a live row, ascending; ours is always among them.
    pub shards: Vec<i32>,
    /// Live rows, ours included.
    pub instances: u32,
}

/// The registry's statements on the store's pool; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    pool: Pool,
}

impl Registry {
    /// A registry whose database never answers (a port nothing listens on), for tests of what
    /// an instance does while its heartbeats fail.
    #[cfg(test)]
    pub fn unreachable() -> Self {
        Self::at_port(1)
    }

    /// A registry whose database is whatever listens on this local port (a test's server that
    /// never answers makes every heartbeat hang).
    #[cfg(test)]
    pub fn at_port(port: u16) -> Self {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(port)
            .user("nobody")
            .dbname("nothing");
        let manager = deadpool_postgres::Manager::new(c, tokio_postgres::NoTls);
        let pool = Pool::builder(manager)
            .max_size(1)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .expect("a pool needs no connection to be built");
        Registry { pool }
    }

    pub(super) fn new(pool: Pool) -> Self {
        Registry { pool }
    }

    async fn conn(&self) -> Result<deadpool_postgres::Object, LedgerError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Writes this instance's heartbeat (inserting the row if it is missing: the first one, or
    /// after a purge during a long outage) and reads what is live. `active`: whether the row
    /// should say `active_since` (kept as it is while active, set if missing, cleared if not).
    pub async fn heartbeat(&self, me: &Me, active: bool) -> Result<LiveSet, LedgerError> {
        let c = self.conn().await?;
        let row = c
            .query_typed(
                HEARTBEAT,
                &[
                    (&me.id, Type::TEXT),
                    (&me.shard, Type::INT4),
                    (&me.host, Type::TEXT),
                    (&me.pid, Type::INT4),
                    (&active, Type::BOOL),
                ],
            )
            .await
            .map_err(pg_error)?;
        let row = row
            .first()
            .ok_or_else(|| LedgerError::Store("the heartbeat returned no row".into()))?;
        let shards: Option<Vec<i32>> = row.try_get(0).map_err(pg_error)?;
        let instances: i64 = row.try_get(1).map_err(pg_error)?;
        Ok(LiveSet {
            shards: shards.unwrap_or_else(|| vec![me.shard]),
            instances: instances.clamp(1, u32::MAX as i64) as u32,
        })
    }

    /// Sets `active_since = now()` (a takeover) or clears it (the broker session ended).
    pub async fn set_active(&self, me: &Me, active: bool) -> Result<(), LedgerError> {
        let c = self.conn().await?;
        c.query_typed(SET_ACTIVE, &[(&me.id, Type::TEXT), (&active, Type::BOOL)])
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    /// Deletes this instance's row (a clean stop): its share goes back to the others at their
    /// next heartbeat, not 10 s later.
    pub async fn remove(&self, me: &Me) -> Result<(), LedgerError> {
        let c = self.conn().await?;
        c.query_typed(DELETE, &[(&me.id, Type::TEXT)])
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    /// Deletes the rows of instances dead for a day (killed, never stopped cleanly); returns
    /// how many.
    pub async fn purge(&self) -> Result<u64, LedgerError> {
        let c = self.conn().await?;
        let n = c.execute(PURGE, &[]).await.map_err(pg_error)?;
        Ok(n)
    }
}
