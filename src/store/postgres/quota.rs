//! The leases of the quotas counted across instances (`sw_quota_leases`, migration 0004): the
//! statements behind [`crate::pipeline::limits::quota`]. A portfolio's daily tier and an
//! account's daily budget are one number for every instance on the database
//! (docs/design/instances.md, decision 7): global use = what is durably counted (tier rows, spend
//! rows of every instance) + the leases of the live instances. Each instance counts its own
//! jobs against its lease in memory and renews the lease here now and then, in one short
//! transaction under an advisory lock per quota, which makes the sum of the leases fit in what
//! is left.
//!
//! Liveness is the registry's (`sw_instances`, decision 5): a lease counts only while its
//! instance's heartbeat is younger than 10 s, on the database's clock. A renewal also writes
//! the renewing instance's heartbeat, so a lease the instance was just given counts for the
//! others for at least 10 s from then. A dead instance holds nothing anybody waits for: its
//! lease stops counting by itself, and an advisory transaction lock goes with its session
//! (`lock_timeout` bounds the wait for a session still in a transaction).

use deadpool_postgres::Pool;
use tokio_postgres::types::Type;

use super::{pg_error, pool_error, prefix_end};
use crate::store::ledger::LedgerError;

/// The advisory-lock class of the quotas (two-key locks: their space is apart from the
/// one-key locks of the store and the migrations); the key is the quota's text hashed.
const LOCK_CLASS: i32 = 0x7377_7100;

/// What is durably counted toward a quota, read in the renewal's transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Durable {
    /// Recipients of the portfolio in `sw_tier_usage` counted after `since_ms` (unix ms, the
    /// clock the rows were written with). A row is per (recipient, portfolio): each counts once.
    TierRecipients { portfolio: String, since_ms: i64 },
    /// The spend rows of the account (`spend|<account>|<minute>[|<instance>]` in
    /// `sw_store_meta`, 8-byte little-endian micros) of minutes after `since_minute`, of every
    /// instance.
    Spend { account: String, since_minute: i64 },
}

/// What a renewal saw, under the quota's lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Durably counted use.
    pub durable: i64,
    /// The leases of the other live instances.
    pub others: i64,
    /// Live shards (at least 1): how many would share what is left.
    pub live_shards: u32,
    /// Whether this instance's registry row is there (and was just beaten): a lease of an
    /// instance the others cannot see as live does not count for them, so it must not be used.
    pub me_live: bool,
}

const LE_VALUE: &str = "(get_byte(value, 0)::bigint | (get_byte(value, 1)::bigint << 8) | \
     (get_byte(value, 2)::bigint << 16) | (get_byte(value, 3)::bigint << 24) | \
     (get_byte(value, 4)::bigint << 32) | (get_byte(value, 5)::bigint << 40) | \
     (get_byte(value, 6)::bigint << 48) | (get_byte(value, 7)::bigint << 56))";

/// The others' live leases and the live shards; `$1` the quota, `$2` this instance.
const OTHERS: &str = "(SELECT coalesce(sum(q.granted), 0)::bigint FROM sw_quota_leases q \
         JOIN sw_instances i ON i.id = q.instance \
         WHERE q.quota = $1 AND q.instance <> $2::uuid \
         AND i.heartbeat_at > now() - interval '10 seconds'), \
     (SELECT count(DISTINCT shard) FROM sw_instances \
         WHERE heartbeat_at > now() - interval '10 seconds')";

const LOCK: &str = "SELECT pg_advisory_xact_lock($1, hashtext($2))";

/// This instance's heartbeat, in the same transaction: the lease about to be written counts for
/// the others for 10 s from now.
const BEAT: &str = "UPDATE sw_instances SET heartbeat_at = now() WHERE id = $1::uuid";

const UPSERT: &str = "INSERT INTO sw_quota_leases (quota, instance, granted) \
     VALUES ($1, $2::uuid, $3) ON CONFLICT (quota, instance) \
     DO UPDATE SET granted = EXCLUDED.granted, updated_at = now()";

/// Leases of instances no longer live count for nobody; they go, so the table stays small (an
/// instance that comes back writes its row again at its next renewal).
const DROP_DEAD: &str = "DELETE FROM sw_quota_leases q WHERE q.quota = $1 AND NOT EXISTS \
     (SELECT 1 FROM sw_instances i WHERE i.id = q.instance \
      AND i.heartbeat_at > now() - interval '10 seconds')";

const DROP_MINE: &str = "DELETE FROM sw_quota_leases WHERE instance = $1::uuid";

/// The quotas' statements on the store's pool; cheap to clone.
#[derive(Clone)]
pub struct QuotaStore {
    pool: Pool,
}

impl QuotaStore {
    pub(super) fn new(pool: Pool) -> Self {
        QuotaStore { pool }
    }

    /// One renewal of this instance's (`me`, a UUID) lease of `quota`, in one transaction
    /// under the quota's advisory lock: beats this instance's heartbeat, reads the durable use
    /// and the others' live leases, lets `decide` choose the new lease from them (it must not
    /// fail; it runs while the lock is held), writes it, drops dead instances' leases of the
    /// quota, commits. Returns what it saw and the lease written. An error leaves the lease as
    /// it was.
    pub async fn renew(
        &self,
        quota: &str,
        me: &str,
        durable: &Durable,
        decide: impl FnOnce(&Seen) -> i64,
    ) -> Result<(Seen, i64), LedgerError> {
        let mut c = self.pool.get().await.map_err(pool_error)?;
        let tx = c.transaction().await.map_err(pg_error)?;
        // A session that vanished mid-renewal holds the lock until the server ends it
        // (`idle_in_transaction_session_timeout`): this renewal fails and is retried instead
        // of waiting that long. And this session, should it stall mid-renewal itself (a
        // partition), is ended by the server within 3 s rather than the pool's 60 s: it holds
        // the quota's lock and its own registry row, so every instance's renewals of the
        // quota, and its own heartbeat, would wait for it.
        tx.batch_execute(
            "SET LOCAL lock_timeout = '2s'; SET LOCAL statement_timeout = '2s'; \
             SET LOCAL idle_in_transaction_session_timeout = '3s'",
        )
        .await
        .map_err(pg_error)?;
        tx.query_typed(LOCK, &[(&LOCK_CLASS, Type::INT4), (&quota, Type::TEXT)])
            .await
            .map_err(pg_error)?;
        tx.query_typed(BEAT, &[(&me, Type::TEXT)])
            .await
            .map_err(pg_error)?;
        let row = match durable {
            Durable::TierRecipients {
                portfolio,
                since_ms,
            } => {
                let sql = format!(
                    "SELECT (SELECT count(*) FROM sw_tier_usage \
                     WHERE portfolio = $3 AND at_ms > $4)::bigint, {OTHERS}, \
                     EXISTS (SELECT 1 FROM sw_instances WHERE id = $2::uuid \
                     AND heartbeat_at > now() - interval '10 seconds')"
                );
                tx.query_typed(
                    &sql,
                    &[
                        (&quota, Type::TEXT),
                        (&me, Type::TEXT),
                        (&portfolio.as_bytes(), Type::BYTEA),
                        (since_ms, Type::INT8),
                    ],
                )
                .await
            }
            Durable::Spend {
                account,
                since_minute,
            } => {
                let prefix = format!("spend|{account}|").into_bytes();
                let end = prefix_end(&prefix).unwrap_or_default();
                let tail_from = prefix.len() as i32 + 1;
                let sql = format!(
                    "SELECT (SELECT coalesce(sum({LE_VALUE}), 0) FROM sw_store_meta \
                     WHERE key >= $3 AND key < $4 AND length(value) = 8 \
                     AND split_part(convert_from(substring(key FROM $5), 'UTF8'), '|', 1) \
                         ~ '^-?[0-9]{{1,18}}$' \
                     AND split_part(convert_from(substring(key FROM $5), 'UTF8'), '|', 1)::bigint \
                         > $6)::bigint, {OTHERS}, \
                     EXISTS (SELECT 1 FROM sw_instances WHERE id = $2::uuid \
                     AND heartbeat_at > now() - interval '10 seconds')"
                );
                tx.query_typed(
                    &sql,
                    &[
                        (&quota, Type::TEXT),
                        (&me, Type::TEXT),
                        (&prefix, Type::BYTEA),
                        (&end, Type::BYTEA),
                        (&tail_from, Type::INT4),
                        (since_minute, Type::INT8),
                    ],
                )
                .await
            }
        }
        .map_err(pg_error)?;
        let row = row
            .first()
            .ok_or_else(|| LedgerError::Store("the quota's read returned no row".into()))?;
        let seen = Seen {
            durable: row.try_get::<_, i64>(0).map_err(pg_error)?,
            others: row.try_get::<_, i64>(1).map_err(pg_error)?,
            live_shards: row
                .try_get::<_, i64>(2)
                .map_err(pg_error)?
                .clamp(1, 1 << 16) as u32,
            me_live: row.try_get::<_, bool>(3).map_err(pg_error)?,
        };
        let granted = decide(&seen).max(0);
        tx.query_typed(
            UPSERT,
            &[
                (&quota, Type::TEXT),
                (&me, Type::TEXT),
                (&granted, Type::INT8),
            ],
        )
        .await
        .map_err(pg_error)?;
        tx.query_typed(DROP_DEAD, &[(&quota, Type::TEXT)])
            .await
            .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok((seen, granted))
    }

    /// Deletes every lease of this instance (a clean stop, after its last use is durable): the
    /// others may use it at once rather than 10 s after the last heartbeat.
    pub async fn drop_leases(&self, me: &str) -> Result<u64, LedgerError> {
        let c = self.pool.get().await.map_err(pool_error)?;
        let n = c
            .execute_typed(DROP_MINE, &[(&me, Type::TEXT)])
            .await
            .map_err(pg_error)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    //! Against a real PostgreSQL (as [`super::super::tests`]: a database per test), with the
    //! instances' local side ([`Quota`]) and their registry rows, but no daemon.

    use std::time::{Duration, Instant};

    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    use tokio_util::sync::CancellationToken;

    use super::super::tests::TestDb;
    use super::super::{Me, PgStore};
    use super::*;
    use crate::pipeline::limits::quota::{Kind, Quota, WAIT_ROOM};
    use crate::store::{KvOp, Table};

    fn me(shard: i32) -> Me {
        Me {
            id: uuid::Uuid::new_v4().to_string(),
            shard,
            host: "test".into(),
            pid: 1,
        }
    }

    fn tier_rows(since_ms: i64) -> impl Fn() -> Durable + Send {
        move || Durable::TierRecipients {
            portfolio: "acme".into(),
            since_ms,
        }
    }

    /// Takes units one by one, waiting for renewals, until the quota refuses; returns how many.
    async fn take_all(q: &Quota, stop: &CancellationToken) -> i64 {
        let mut n = 0;
        while q.wait_room(1, WAIT_ROOM, stop).await {
            if q.try_take(1) {
                n += 1;
            }
        }
        n
    }

    /// Counts `n` recipients of `acme` durably, as send records do.
    async fn counted(store: &PgStore, from: usize, n: usize) {
        let now_ms = jiff::Timestamp::now().as_millisecond();
        let ops = (from..from + n)
            .map(|i| KvOp::Put {
                table: Table::TierUsage,
                key: format!("4917{i:08}\0acme").into_bytes(),
                value: now_ms.to_le_bytes().to_vec(),
            })
            .collect();
        store.kv_many(ops).await.unwrap();
    }

    /// Two instances share a tier of 100. A counts 30 recipients durably and holds some room
    /// besides; B gets the rest but A's room while A lives. A dies (no renewal, no heartbeat):
    /// within about 10 s its room comes back, and B reaches exactly the limit, never more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_instances_unused_lease_returns_to_the_others() {
        let Some(db) = TestDb::new().await else {
            return;
        };
        let store = db.open().await;
        let (a, b) = (me(0), me(1));
        let registry = store.registry();
        registry.heartbeat(&a, true).await.unwrap();
        registry.heartbeat(&b, true).await.unwrap();
        let qa = Quota::new(Kind::Tier, "acme".into(), 100);
        let qb = Quota::new(Kind::Tier, "acme".into(), 100);
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        let since = jiff::Timestamp::now().as_millisecond() - 3_600_000;
        let task_a = tokio::spawn(qa.clone().run(
            store.quotas(),
            a.id.clone(),
            tier_rows(since),
            stop_a.clone(),
        ));
        tokio::spawn(qb.clone().run(
            store.quotas(),
            b.id.clone(),
            tier_rows(since),
            stop_b.clone(),
        ));

        // A counts 30, their rows written, and keeps some room.
        let mut took = 0;
        while took < 30 {
            assert!(qa.wait_room(1, WAIT_ROOM, &stop_a).await, "A gets room");
            if qa.try_take(1) {
                took += 1;
            }
        }
        counted(&store, 0, 30).await;
        qa.durable(30);
        assert!(qa.wait_room(1, WAIT_ROOM, &stop_a).await);

        // B takes what it can while A lives: at least 60 (A holds 5 % of the tier at most),
        // waited for with a deadline since one `take_all` ends at the first renewal slower
        // than `WAIT_ROOM` (a busy machine); then no more than the 70 left less A's room.
        let mut before = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while before < 60 {
            assert!(
                Instant::now() < deadline,
                "B took only {before}: A holds 5 % of the tier at most"
            );
            before += take_all(&qb, &stop_b).await;
        }
        before += take_all(&qb, &stop_b).await;
        assert!(before < 70, "B took {before} while A held room");

        // A dies: its task stops, its heartbeat ages.
        stop_a.cancel();
        task_a.await.unwrap();
        let died = Instant::now();
        let mut total = before;
        let deadline = died + Duration::from_secs(20);
        while total < 70 {
            assert!(
                Instant::now() < deadline,
                "B has {total} of 70 {:?} after A died",
                died.elapsed()
            );
            total += take_all(&qb, &stop_b).await;
        }
        let back = died.elapsed();
        eprintln!("A's room came back to B {back:?} after A died");
        assert_eq!(total, 70, "never past the limit");
        assert!(!qb.try_take(1));
        assert!(
            back >= Duration::from_secs(5),
            "A counted as live for a while: {back:?}"
        );
        stop_b.cancel();
    }

    /// Several instances taking at once never hold more than the limit together, and between
    /// them take all of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_taking_at_once_take_the_whole_limit_and_no_more() {
        let Some(db) = TestDb::new().await else {
            return;
        };
        let store = db.open().await;
        let stop = CancellationToken::new();
        let total = Arc::new(AtomicI64::new(0));
        let mut takers = Vec::new();
        for shard in 0..3 {
            let m = me(shard);
            store.registry().heartbeat(&m, true).await.unwrap();
            let q = Quota::new(Kind::Tier, "acme".into(), 250);
            tokio::spawn(
                q.clone()
                    .run(store.quotas(), m.id.clone(), tier_rows(0), stop.clone()),
            );
            let (stop, total) = (stop.clone(), total.clone());
            // One `take_all` ends at the first renewal slower than `WAIT_ROOM`, so each taker
            // goes on (to a deadline) until the limit is taken, then looks once more for room
            // past it.
            takers.push(tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                while total.load(Ordering::SeqCst) < 250 && Instant::now() < deadline {
                    total.fetch_add(take_all(&q, &stop).await, Ordering::SeqCst);
                }
                total.fetch_add(take_all(&q, &stop).await, Ordering::SeqCst);
            }));
        }
        for t in takers {
            t.await.unwrap();
        }
        assert_eq!(total.load(Ordering::SeqCst), 250);
        stop.cancel();
    }

    /// The budget's durable use: every instance's rows of the account in the trailing day, the
    /// one-instance form too; not another account's, not older ones.
    #[tokio::test]
    async fn the_spend_of_every_instance_in_the_day_is_summed() {
        let Some(db) = TestDb::new().await else {
            return;
        };
        let store = db.open().await;
        let m = me(0);
        store.registry().heartbeat(&m, true).await.unwrap();
        let row = |k: &str, v: i64| KvOp::Put {
            table: Table::StoreMeta,
            key: k.as_bytes().to_vec(),
            value: v.to_le_bytes().to_vec(),
        };
        store
            .kv_many(vec![
                row("spend|a|1000|0b7c0d9e-0000-4000-8000-000000000001", 5),
                row("spend|a|1001|0b7c0d9e-0000-4000-8000-000000000002", 7),
                row("spend|a|1002", 11),
                row("spend|a|100|0b7c0d9e-0000-4000-8000-000000000001", 1000),
                row("spend|a|b|1001|0b7c0d9e-0000-4000-8000-000000000001", 2000),
                row("spend|ab|1001", 4000),
                row("tier|a", 8000),
            ])
            .await
            .unwrap();
        let durable = Durable::Spend {
            account: "a".into(),
            since_minute: 999,
        };
        let (seen, granted) = store
            .quotas()
            .renew("budget|a", &m.id, &durable, |_| 3)
            .await
            .unwrap();
        assert_eq!(seen.durable, 5 + 7 + 11);
        assert!(seen.me_live);
        assert_eq!((seen.others, granted), (0, 3));
        // What one renewal costs here (reported, not asserted: the machine's speed).
        let started = Instant::now();
        for _ in 0..50 {
            store
                .quotas()
                .renew("budget|a", &m.id, &durable, |_| 3)
                .await
                .unwrap();
        }
        eprintln!("one renewal: {:?}", started.elapsed() / 50);
        // An instance without a registry row is not live: its lease would count for nobody.
        let ghost = me(1);
        let (seen, _) = store
            .quotas()
            .renew("budget|a", &ghost.id, &durable, |_| 0)
            .await
            .unwrap();
        assert!(!seen.me_live);
        assert_eq!(seen.others, 3, "the live instance's lease");
        assert_eq!(store.quotas().drop_leases(&m.id).await.unwrap(), 1);
    }
}
