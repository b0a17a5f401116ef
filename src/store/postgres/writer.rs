//! The writer task: group commit on one dedicated connection.
//!
//! Everything waiting (up to [`MAX_BATCH`] writes) becomes one transaction: `BEGIN` and the
//! claims (gathered into one or two statements), pipelined (one round trip); then every op of
//! the writes whose claim won (or that have none), in order, their puts gathered into one
//! multi-row statement per table (see [`Plan`]), pipelined; then, every result checked,
//! `COMMIT`. tokio-postgres sends a request when its future is first polled and the server runs
//! them in that order, so a write's ops (and two writes to one key) apply in the order they were
//! asked for.
//!
//! A lost claim is no error to the server (its statement simply matches no row), so the
//! transaction goes on and commits the other writes. A statement that fails aborts the
//! transaction: the batch is then tried again one write per transaction, so that one bad write
//! cannot fail its neighbours. When the database cannot be reached, the batch is held and
//! retried on a new connection, for as long as [`StoreHealth::holding`] allows, as the redb
//! writer holds its batch through a full disk.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use super::{
    Published, RETRY_FIRST, RETRY_MAX, STORE_LOCK, connect, describe, is_unavailable, lock,
    prefix_end, state_code,
};
use crate::store::health::StoreHealth;
use crate::store::ledger::{KvOp, LedgerEntry, LedgerError, Table};

/// How often the idle writer checks its connection (and, while the store is unwritable,
/// whether the database is back).
const KEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// Writes per transaction at most.
const MAX_BATCH: usize = 4096;
/// Publish marks stored per commit at most (the rest go with the next one).
const MAX_MARKS: usize = 10_000;

pub(super) enum Op {
    /// All or nothing; a [`KvOp::ClaimJob`] may only come first.
    Many(Vec<KvOp>),
    /// Inserts only when the key is absent; counts 1 when it inserted.
    InsertIfAbsent {
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Nothing but a wake-up: publish marks are waiting to be stored.
    Flush,
}

pub(super) struct Request {
    pub(super) op: Op,
    /// None for writes nobody waits for.
    pub(super) done: Option<oneshot::Sender<Result<u64, LedgerError>>>,
}

impl Request {
    /// The claim this write starts with, if any.
    fn claim(&self) -> Option<&str> {
        match &self.op {
            Op::Many(ops) => match ops.first() {
                Some(KvOp::ClaimJob { id, .. }) => Some(id),
                _ => None,
            },
            _ => None,
        }
    }

    /// Ledger ids this write may change.
    fn jobs(&self, ids: &mut HashSet<String>) {
        let Op::Many(ops) = &self.op else { return };
        for op in ops {
            match op {
                KvOp::PutJob { id, .. } | KvOp::ClaimJob { id, .. } => {
                    ids.insert(id.clone());
                }
                KvOp::DeleteJobs { ids: gone } => ids.extend(gone.iter().cloned()),
                _ => {}
            }
        }
    }
}

/// Takes the store's lock: shared for a daemon (any number of them), exclusive for a tool.
/// False when someone else holds it in the other mode.
pub(super) async fn take_lock(client: &Client, exclusive: bool) -> Result<bool, LedgerError> {
    let sql = if exclusive {
        "SELECT pg_try_advisory_lock($1)"
    } else {
        "SELECT pg_try_advisory_lock_shared($1)"
    };
    client
        .query_one(sql, &[&STORE_LOCK])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(super::pg_error)
}

struct TableStmts {
    put: Statement,
    delete: Statement,
    delete_range: Statement,
    delete_from: Statement,
    delete_if: Statement,
    insert_if_absent: Statement,
    /// [`TableStmts::put`] for many rows at once (see [`Plan`]).
    put_many: Statement,
    /// [`KvOp::LogSend`]: the change applied to the row under its lock.
    log_send: Statement,
}

/// The parameters of the multi-row ledger statements: one array per column.
const JOB_ARRAYS: &str = "$1::text[], $2::int2[], $3::int4[], $4::int8[], $5::bool[], $6::bytea[]";

// The statements that find ledger rows by a list of ids are sent unprepared (an unnamed
// statement, still one round trip), so the server plans each with the ids it is given and the
// table as it is then. A prepared one keeps its generic plan, made once per connection: made
// while the table was small (a fresh database, or statistics from then) it is a sequential
// scan that tests every row against every id, and it stays while the table grows until the
// next ANALYZE; for a batch of lookups that cost 130 ms at 50,000 rows. Planned with the ids
// at hand, a scan hashes them, and an index probe per id is chosen once that is cheaper.

/// Claims of entries expected in a state: returns the ids that won.
const CLAIM_UPDATE_MANY: &str = "UPDATE sw_ledger l SET state = u.state, \
     attempts = u.attempts, updated_ms = u.updated_ms, published = u.published, event = u.event \
     FROM unnest($1::text[], $2::int2[], $3::int4[], $4::int8[], $5::bool[], $6::bytea[], \
     $7::int2[], $8::int4[]) AS u(id, state, attempts, updated_ms, published, event, was, tries) \
     WHERE l.id = u.id AND l.state = u.was AND l.attempts = u.tries RETURNING l.id";
const MARK_PUBLISHED: &str = "UPDATE sw_ledger SET published = true WHERE id = ANY($1)";

/// Every statement the writer runs, prepared once per connection.
struct Stmts {
    tables: Vec<TableStmts>,
    put_job: Statement,
    claim_new: Statement,
    claim_update: Statement,
    delete_jobs: Statement,
    /// The transaction's id, taken right after BEGIN: what tells, when COMMIT's answer is
    /// lost with the connection, whether it committed.
    txid: Statement,
    /// The multi-row forms of `put_job` and `claim_new` (which returns the ids it took).
    put_jobs: Statement,
    claim_new_many: Statement,
}

impl Stmts {
    async fn prepare(c: &Client) -> Result<Stmts, tokio_postgres::Error> {
        use futures_util::future::try_join_all;
        let ledger = [
            "INSERT INTO sw_ledger (id, state, attempts, updated_ms, published, event) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET \
             state = EXCLUDED.state, attempts = EXCLUDED.attempts, \
             updated_ms = EXCLUDED.updated_ms, published = EXCLUDED.published, \
             event = EXCLUDED.event"
                .to_string(),
            "INSERT INTO sw_ledger (id, state, attempts, updated_ms, published, event) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING"
                .to_string(),
            "UPDATE sw_ledger SET state = $2, attempts = $3, updated_ms = $4, published = $5, \
             event = $6 WHERE id = $1 AND state = $7 AND attempts = $8"
                .to_string(),
            "DELETE FROM sw_ledger WHERE id = ANY($1)".to_string(),
            "SELECT txid_current()".to_string(),
            format!(
                "INSERT INTO sw_ledger (id, state, attempts, updated_ms, published, event) \
                 SELECT * FROM unnest({JOB_ARRAYS}) ON CONFLICT (id) DO UPDATE SET \
                 state = EXCLUDED.state, attempts = EXCLUDED.attempts, \
                 updated_ms = EXCLUDED.updated_ms, published = EXCLUDED.published, \
                 event = EXCLUDED.event"
            ),
            format!(
                "INSERT INTO sw_ledger (id, state, attempts, updated_ms, published, event) \
                 SELECT * FROM unnest({JOB_ARRAYS}) ON CONFLICT (id) DO NOTHING RETURNING id"
            ),
        ];
        let mut sql: Vec<String> = ledger.to_vec();
        for t in Table::ALL {
            let n = t.pg_name();
            sql.extend([
                format!(
                    "INSERT INTO {n} (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                ),
                format!("DELETE FROM {n} WHERE key = $1"),
                format!("DELETE FROM {n} WHERE key >= $1 AND key < $2"),
                format!("DELETE FROM {n} WHERE key >= $1"),
                format!("DELETE FROM {n} WHERE key = $1 AND value = $2"),
                format!(
                    "INSERT INTO {n} (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING"
                ),
                format!(
                    "INSERT INTO {n} (key, value) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                ),
                // ON CONFLICT DO UPDATE locks the row and sees its latest committed version,
                // so concurrent changes of one log apply one after the other, none lost.
                format!(
                    "INSERT INTO {n} (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE \
                     SET value = sw_log_send({n}.value, $3::int8, $4::bool, $5::int4)"
                ),
            ]);
        }
        // Prepared together: one round trip, not a hundred.
        let mut st = try_join_all(sql.iter().map(|s| c.prepare(s)))
            .await?
            .into_iter();
        let mut next = || st.next().expect("one statement per text");
        let (put_job, claim_new, claim_update, delete_jobs, txid) =
            (next(), next(), next(), next(), next());
        let (put_jobs, claim_new_many) = (next(), next());
        let tables = Table::ALL
            .iter()
            .map(|_| TableStmts {
                put: next(),
                delete: next(),
                delete_range: next(),
                delete_from: next(),
                delete_if: next(),
                insert_if_absent: next(),
                put_many: next(),
                log_send: next(),
            })
            .collect();
        Ok(Stmts {
            tables,
            put_job,
            claim_new,
            claim_update,
            delete_jobs,
            txid,
            put_jobs,
            claim_new_many,
        })
    }

    fn t(&self, t: Table) -> &TableStmts {
        &self.tables[t as usize]
    }
}

/// Why a transaction did not commit.
enum Fail {
    /// The database cannot be reached (or the connection broke): hold and retry.
    Unavailable(String),
    /// A statement failed: the write is wrong, or a neighbour is.
    Statement(String),
    /// The connection broke (or the server stopped answering) inside a transaction. After
    /// COMMIT was sent it may or may not have committed: trying the writes again blindly would
    /// report a claim that won as lost (its own row now stands in its way) and an insert that
    /// inserted as not inserting. Before, it did not commit, but the server may keep the
    /// session open (and its row locks held, which the retry would wait behind) until its own
    /// keepalive notices, hours later. Either way the session is ended and the outcome asked.
    InDoubt {
        /// The transaction's id (`txid_current()`), asked about on a new connection.
        xid: i64,
        /// The server process that ran it, ended if it is still in the transaction.
        pid: i32,
        /// What the writes get if it committed; None when COMMIT was never sent.
        results: Option<Vec<Result<u64, LedgerError>>>,
        why: String,
    },
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        if is_unavailable(&e) {
            Fail::Unavailable(describe(&e))
        } else {
            Fail::Statement(describe(&e))
        }
    }
}

type Fut<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Runs the statements pipelined: each future is polled once in order (which sends its
/// request), then all are awaited; the server answers in order.
async fn pipelined(futs: Vec<Fut<'_>>) -> Vec<Result<u64, tokio_postgres::Error>> {
    let mut futs: Vec<(Fut<'_>, Option<Result<u64, tokio_postgres::Error>>)> =
        futs.into_iter().map(|f| (f, None)).collect();
    std::future::poll_fn(|cx| {
        for (f, out) in futs.iter_mut() {
            if let Poll::Ready(r) = f.as_mut().poll(cx) {
                *out = Some(r);
            }
        }
        Poll::Ready(())
    })
    .await;
    let mut results = Vec::with_capacity(futs.len());
    for (f, out) in futs {
        results.push(match out {
            Some(r) => r,
            None => f.await,
        });
    }
    results
}

/// The statement of one op (not a write's leading claim, which runs before).
fn op_future<'a>(c: &'a Client, st: &'a Stmts, op: &'a KvOp) -> Fut<'a> {
    match op {
        KvOp::Put { table, key, value } => {
            Box::pin(async move { c.execute(&st.t(*table).put, &[key, value]).await })
        }
        KvOp::Delete { table, key } => {
            Box::pin(async move { c.execute(&st.t(*table).delete, &[key]).await })
        }
        KvOp::DeletePrefix { table, prefix } => match prefix_end(prefix) {
            Some(end) => {
                Box::pin(
                    async move { c.execute(&st.t(*table).delete_range, &[prefix, &end]).await },
                )
            }
            None => Box::pin(async move { c.execute(&st.t(*table).delete_from, &[prefix]).await }),
        },
        KvOp::DeleteIf { table, key, value } => {
            Box::pin(async move { c.execute(&st.t(*table).delete_if, &[key, value]).await })
        }
        KvOp::LogSend {
            table,
            key,
            log,
            at,
            add,
            keep,
        } => Box::pin(async move {
            let (at, keep) = (i64::from(*at), i32::from(*keep));
            c.execute(&st.t(*table).log_send, &[key, log, &at, add, &keep])
                .await
        }),
        KvOp::PutJob { id, entry } | KvOp::ClaimJob { id, entry, .. } => Box::pin(async move {
            let (state, attempts) = (state_code(entry.state), entry.attempts as i32);
            c.execute(
                &st.put_job,
                &[
                    id,
                    &state,
                    &attempts,
                    &entry.updated_ms,
                    &entry.published,
                    &entry.event,
                ],
            )
            .await
        }),
        KvOp::DeleteJobs { ids } => {
            Box::pin(async move { c.execute(&st.delete_jobs, &[ids]).await })
        }
    }
}

/// A write's leading claim: 1 when it won, 0 when the entry was not what it expected.
fn claim_future<'a>(c: &'a Client, st: &'a Stmts, op: &'a KvOp) -> Fut<'a> {
    let KvOp::ClaimJob { id, entry, expect } = op else {
        unreachable!("only called with a claim")
    };
    Box::pin(async move {
        let (state, attempts) = (state_code(entry.state), entry.attempts as i32);
        let new: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
            id,
            &state,
            &attempts,
            &entry.updated_ms,
            &entry.published,
            &entry.event,
        ];
        match expect {
            None => c.execute(&st.claim_new, &new).await,
            Some((s, a)) => {
                let (s, a) = (state_code(*s), *a as i32);
                let mut p = new.to_vec();
                p.extend::<[&(dyn tokio_postgres::types::ToSql + Sync); 2]>([&s, &a]);
                c.execute(&st.claim_update, &p).await
            }
        }
    })
}

/// A ledger entry per row, one array per column: the parameters of the multi-row statements.
#[derive(Default)]
struct JobRows<'a> {
    ids: Vec<&'a str>,
    states: Vec<i16>,
    attempts: Vec<i32>,
    updated_ms: Vec<i64>,
    published: Vec<bool>,
    events: Vec<&'a [u8]>,
}

impl<'a> JobRows<'a> {
    fn push(&mut self, id: &'a str, e: &'a LedgerEntry) {
        self.ids.push(id);
        self.states.push(state_code(e.state));
        self.attempts.push(e.attempts as i32);
        self.updated_ms.push(e.updated_ms);
        self.published.push(e.published);
        self.events.push(&e.event);
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        self.typed().map(|(p, _)| p)
    }

    /// With their types, for an unprepared statement.
    fn typed(&self) -> [(&(dyn ToSql + Sync), Type); 6] {
        [
            (&self.ids, Type::TEXT_ARRAY),
            (&self.states, Type::INT2_ARRAY),
            (&self.attempts, Type::INT4_ARRAY),
            (&self.updated_ms, Type::INT8_ARRAY),
            (&self.published, Type::BOOL_ARRAY),
            (&self.events, Type::BYTEA_ARRAY),
        ]
    }
}

/// A group's claims, whose ids are all different, in (at most) two statements: the fresh
/// entries and the expected ones. The ids that won are added to `won`; each statement counts
/// its winners.
fn claims_futures<'a>(
    c: &'a Client,
    st: &'a Stmts,
    claims: &[&'a KvOp],
    won: &'a Mutex<HashSet<String>>,
) -> Vec<Fut<'a>> {
    let (mut new, mut held) = (JobRows::default(), JobRows::default());
    let (mut was, mut tries) = (Vec::<i16>::new(), Vec::<i32>::new());
    for op in claims {
        let KvOp::ClaimJob { id, entry, expect } = op else {
            unreachable!("only called with claims")
        };
        match expect {
            None => new.push(id, entry),
            Some((s, a)) => {
                held.push(id, entry);
                was.push(state_code(*s));
                tries.push(*a as i32);
            }
        }
    }
    // A row that came back unreadable is an error, not a lost claim: the claim's row would be
    // committed without the rest of its write.
    let took = |rows: Vec<tokio_postgres::Row>| -> Result<u64, tokio_postgres::Error> {
        let mut w = lock(won);
        for r in &rows {
            w.insert(r.try_get(0)?);
        }
        Ok(rows.len() as u64)
    };
    let mut futs: Vec<Fut<'a>> = Vec::new();
    if !new.ids.is_empty() {
        futs.push(Box::pin(async move {
            took(c.query(&st.claim_new_many, &new.params()).await?)
        }));
    }
    if !held.ids.is_empty() {
        futs.push(Box::pin(async move {
            let mut p = held.typed().to_vec();
            p.extend::<[(&(dyn ToSql + Sync), Type); 2]>([
                (&was, Type::INT2_ARRAY),
                (&tries, Type::INT4_ARRAY),
            ]);
            took(c.query_typed(CLAIM_UPDATE_MANY, &p).await?)
        }));
    }
    futs
}

/// The statements of a group's ops (its claims aside), in order, with its puts gathered into
/// multi-row statements, one per table (and one for ledger entries): the server's cost is
/// mostly per statement, and a group's hundreds of writes put to a few tables. A table's
/// gathered puts wait until an op that touches the same table comes (then they go first) or
/// the end: other tables' statements may pass them, as no row depends on another table's
/// within a transaction. A key put twice keeps its last value (one statement cannot change a
/// row twice). Each put counts 1 for its write when planned: a failure fails the transaction.
struct Plan<'a> {
    steps: Vec<Step<'a>>,
    /// Per table, in [`Table::ALL`]'s order: key → value. Sorted, so that instances sharing
    /// a database lock a table's rows in one order.
    puts: Vec<BTreeMap<&'a [u8], &'a [u8]>>,
    jobs: BTreeMap<&'a str, &'a LedgerEntry>,
}

enum Step<'a> {
    /// One op of the write at this index, counted as the server counts it.
    Op(usize, &'a KvOp),
    /// An [`Op::InsertIfAbsent`] of the write at this index.
    InsertIfAbsent(usize, Table, &'a [u8], &'a [u8]),
    Puts(Table, Vec<(&'a [u8], &'a [u8])>),
    Jobs(Vec<(&'a str, &'a LedgerEntry)>),
}

impl<'a> Plan<'a> {
    fn new() -> Self {
        Plan {
            steps: Vec::new(),
            puts: Table::ALL.iter().map(|_| BTreeMap::new()).collect(),
            jobs: BTreeMap::new(),
        }
    }

    /// Op `op` of the write at index `i`, whose count is `count`.
    fn op(&mut self, i: usize, op: &'a KvOp, count: &mut u64) {
        match op {
            KvOp::Put { table, key, value } => {
                self.puts[*table as usize].insert(key, value);
                *count += 1;
            }
            KvOp::PutJob { id, entry } => {
                self.jobs.insert(id, entry);
                *count += 1;
            }
            // A log change is never folded into a multi-row put: each one counts.
            KvOp::Delete { table, .. }
            | KvOp::DeletePrefix { table, .. }
            | KvOp::DeleteIf { table, .. }
            | KvOp::LogSend { table, .. } => {
                self.flush(*table);
                self.steps.push(Step::Op(i, op));
            }
            KvOp::DeleteJobs { .. } | KvOp::ClaimJob { .. } => {
                self.flush_jobs();
                self.steps.push(Step::Op(i, op));
            }
        }
    }

    fn insert_if_absent(&mut self, i: usize, table: Table, key: &'a [u8], value: &'a [u8]) {
        self.flush(table);
        self.steps.push(Step::InsertIfAbsent(i, table, key, value));
    }

    fn flush(&mut self, t: Table) {
        let rows = std::mem::take(&mut self.puts[t as usize]);
        if !rows.is_empty() {
            self.steps.push(Step::Puts(t, rows.into_iter().collect()));
        }
    }

    fn flush_jobs(&mut self) {
        let rows = std::mem::take(&mut self.jobs);
        if !rows.is_empty() {
            self.steps.push(Step::Jobs(rows.into_iter().collect()));
        }
    }

    /// Every step, the waiting puts last.
    fn finish(mut self) -> Vec<Step<'a>> {
        for t in Table::ALL {
            self.flush(t);
        }
        self.flush_jobs();
        self.steps
    }
}

impl<'a> Step<'a> {
    /// The statement, and the write whose count its result adds to (None: counted when
    /// planned).
    fn future(self, c: &'a Client, st: &'a Stmts) -> (Fut<'a>, Option<usize>) {
        match self {
            Step::Op(i, op) => (op_future(c, st, op), Some(i)),
            Step::InsertIfAbsent(i, t, key, value) => (
                Box::pin(
                    async move { c.execute(&st.t(t).insert_if_absent, &[&key, &value]).await },
                ),
                Some(i),
            ),
            Step::Puts(t, rows) if rows.len() == 1 => {
                let (key, value) = rows[0];
                (
                    Box::pin(async move { c.execute(&st.t(t).put, &[&key, &value]).await }),
                    None,
                )
            }
            Step::Puts(t, rows) => {
                let (keys, values): (Vec<&[u8]>, Vec<&[u8]>) = rows.into_iter().unzip();
                (
                    Box::pin(async move { c.execute(&st.t(t).put_many, &[&keys, &values]).await }),
                    None,
                )
            }
            Step::Jobs(rows) => {
                let mut cols = JobRows::default();
                for (id, e) in rows {
                    cols.push(id, e);
                }
                (
                    Box::pin(async move { c.execute(&st.put_jobs, &cols.params()).await }),
                    None,
                )
            }
        }
    }
}

/// How long the writer waits for the database.
pub(super) struct Deadlines {
    /// A round trip of a transaction: a little more than the server's statement_timeout.
    pub(super) round_trip: std::time::Duration,
    /// `keep`'s probes.
    pub(super) probe: std::time::Duration,
}

pub(super) struct Writer {
    client: Option<Client>,
    stmts: Option<Stmts>,
    /// The server process of `client`: the one to end when a transaction it ran is in doubt.
    pid: i32,
    /// How long a round trip may take before the database counts as not answering: a little
    /// more than the server's own statement_timeout.
    deadline: std::time::Duration,
    /// How long `keep` waits for its probes.
    probe_timeout: std::time::Duration,
    config: super::ConnConfig,
    exclusive: bool,
    health: Arc<StoreHealth>,
    published: Published,
    pool: Pool,
}

impl Writer {
    /// `client`: connected, holding the store's lock, schema migrated.
    pub(super) async fn new(
        client: Client,
        config: super::ConnConfig,
        exclusive: bool,
        health: Arc<StoreHealth>,
        published: Published,
        pool: Pool,
        deadlines: Deadlines,
    ) -> Result<Writer, LedgerError> {
        let stmts = Stmts::prepare(&client).await.map_err(super::pg_error)?;
        let pid = backend_pid(&client).await.map_err(super::pg_error)?;
        Ok(Writer {
            client: Some(client),
            stmts: Some(stmts),
            pid,
            deadline: deadlines.round_trip,
            probe_timeout: deadlines.probe,
            config,
            exclusive,
            health,
            published,
            pool,
        })
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        let mut batch: Vec<Request> = Vec::with_capacity(256);
        let mut keep = tokio::time::interval(KEEP_EVERY);
        keep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => break,
                },
                _ = keep.tick() => {
                    self.keep().await;
                    continue;
                }
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let marks: Vec<Box<str>> = lock(&self.published)
                .iter()
                .take(MAX_MARKS)
                .cloned()
                .collect();
            let groups = split(&batch);
            let last = groups.len() - 1;
            let mut reqs = batch.drain(..);
            for (i, n) in groups.into_iter().enumerate() {
                let group: Vec<Request> = reqs.by_ref().take(n).collect();
                let m: &[Box<str>] = if i == last { &marks } else { &[] };
                let results = self.apply_holding(&group, m, &rx).await;
                for (req, res) in group.into_iter().zip(results) {
                    if let Some(done) = req.done {
                        let _ = done.send(res);
                    }
                }
            }
        }
        // Every handle is gone: marks not yet stored get one more try, without a hold.
        let marks: Vec<Box<str>> = lock(&self.published).iter().cloned().collect();
        if !marks.is_empty() && self.ensure_connected().await.is_ok() {
            let _ = self.apply(&[], &marks).await;
        }
        self.pool.close();
        // Dropping the client closes the connection, and the store's lock goes with it.
    }

    /// Between writes: a connection that broke is replaced at once, not at the next write, so
    /// that the daemon holds the store's lock all the time it runs (a tool cannot slip in
    /// and write behind the daemon's caches while it is idle). While the store is marked
    /// unwritable (a write or a read failed), it is marked writable again only once this
    /// connection holds the lock again and a pooled connection answers too: what the
    /// pipeline needs, so `/readyz` does not flap between the two.
    async fn keep(&mut self) {
        let broken = self.client.as_ref().is_none_or(|c| c.is_closed());
        if !broken && self.health.writable() {
            return;
        }
        let r = match self.ensure_connected().await {
            Ok(()) => self.ping().await,
            Err(m) => Err(m),
        };
        match r {
            Ok(()) => {
                if !self.health.writable() {
                    self.health.succeeded();
                }
            }
            Err(m) => {
                self.client = None;
                self.stmts = None;
                self.health.failed(&m);
            }
        }
    }

    async fn ping(&self) -> Result<(), String> {
        // Bounded: the writer task waits meanwhile, and a database that does not answer is
        // exactly what this is to find out.
        tokio::time::timeout(self.probe_timeout, self.ping_once())
            .await
            .unwrap_or_else(|_| Err(self.no_answer()))
    }

    async fn ping_once(&self) -> Result<(), String> {
        let c = self.client.as_ref().ok_or("not connected")?;
        c.simple_query("SELECT 1").await.map_err(|e| describe(&e))?;
        let pooled = self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => describe(&e),
            e => format!("no pooled database connection: {e}"),
        })?;
        pooled
            .simple_query("SELECT 1")
            .await
            .map_err(|e| describe(&e))?;
        Ok(())
    }

    /// The batch, or its writes one per transaction when a statement failed.
    async fn apply_holding(
        &mut self,
        reqs: &[Request],
        marks: &[Box<str>],
        rx: &mpsc::UnboundedReceiver<Request>,
    ) -> Vec<Result<u64, LedgerError>> {
        match self.hold(reqs, marks, rx).await {
            Ok(r) => r,
            Err(Fail::Unavailable(m) | Fail::InDoubt { why: m, .. }) => reqs
                .iter()
                .map(|_| Err(LedgerError::Io(m.clone())))
                .collect(),
            Err(Fail::Statement(m)) if reqs.len() + marks.len() <= 1 => {
                vec![Err(LedgerError::Store(m))]
            }
            Err(Fail::Statement(_)) => {
                let mut out = Vec::with_capacity(reqs.len());
                for r in reqs {
                    out.push(match self.hold(std::slice::from_ref(r), &[], rx).await {
                        Ok(mut v) => v.pop().unwrap_or(Ok(0)),
                        Err(Fail::Unavailable(m) | Fail::InDoubt { why: m, .. }) => {
                            Err(LedgerError::Io(m))
                        }
                        Err(Fail::Statement(m)) => Err(LedgerError::Store(m)),
                    });
                }
                if !marks.is_empty() {
                    // Left in memory when this fails: the next commit tries again.
                    let _ = self.hold(&[], marks, rx).await;
                }
                out
            }
        }
    }

    /// Applies the writes in one transaction, holding them through an outage: reconnects and
    /// tries again until they commit, a statement fails, the hold runs out or every handle is
    /// gone.
    async fn hold(
        &mut self,
        reqs: &[Request],
        marks: &[Box<str>],
        rx: &mpsc::UnboundedReceiver<Request>,
    ) -> Result<Vec<Result<u64, LedgerError>>, Fail> {
        let mut wait = RETRY_FIRST;
        loop {
            let r = match self.ensure_connected().await {
                Ok(()) => self.apply(reqs, marks).await,
                Err(m) => Err(Fail::Unavailable(m)),
            };
            let r = match r {
                Err(Fail::InDoubt {
                    xid,
                    pid,
                    results,
                    why,
                }) => {
                    self.client = None;
                    self.stmts = None;
                    self.health.failed(&why);
                    match (self.resolve(xid, pid, rx).await, results) {
                        // Committed: the writes have exactly the results they had.
                        (Ok(true), Some(results)) => Ok(results),
                        (Ok(true), None) => Err(Fail::Unavailable(format!(
                            "transaction {xid} committed without its COMMIT"
                        ))),
                        // Rolled back: as if never sent; tried again at once.
                        (Ok(false), _) => continue,
                        (Err(m), _) => Err(Fail::Unavailable(m)),
                    }
                }
                r => r,
            };
            match r {
                Ok(v) => {
                    self.health.succeeded();
                    let mut p = lock(&self.published);
                    for id in marks {
                        p.remove(id);
                    }
                    return Ok(v);
                }
                Err(Fail::Unavailable(m)) => {
                    self.client = None;
                    self.stmts = None;
                    self.health.failed(&m);
                    if !self.health.holding() || rx.is_closed() {
                        // Writes fail now; the store is healthy again once the database
                        // answers, whether or not anything is written meanwhile (`keep`).
                        return Err(Fail::Unavailable(m));
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RETRY_MAX);
                }
                Err(f) => return Err(f),
            }
        }
    }

    /// A working connection that holds the store's lock, with the statements prepared.
    async fn ensure_connected(&mut self) -> Result<(), String> {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) && self.stmts.is_some() {
            return Ok(());
        }
        self.client = None;
        self.stmts = None;
        let client = connect(&self.config).await.map_err(|e| e.to_string())?;
        if !take_lock(&client, self.exclusive)
            .await
            .map_err(|e| e.to_string())?
        {
            return Err("the store's lock is held by another process".into());
        }
        let stmts = Stmts::prepare(&client).await.map_err(|e| describe(&e))?;
        self.pid = backend_pid(&client).await.map_err(|e| describe(&e))?;
        self.client = Some(client);
        self.stmts = Some(stmts);
        Ok(())
    }

    /// Whether the transaction `xid`, whose COMMIT's answer was lost, committed: asked on a
    /// new connection until the server knows. A transaction still in progress (the server has
    /// not noticed yet that its client is gone, or never got the COMMIT) is ended first, so
    /// the answer is final and cannot change after it is given. Err when the hold runs out.
    async fn resolve(
        &mut self,
        xid: i64,
        pid: i32,
        rx: &mpsc::UnboundedReceiver<Request>,
    ) -> Result<bool, String> {
        let mut wait = RETRY_FIRST;
        loop {
            let asked = match self.ensure_connected().await {
                Ok(()) => self.status(xid, pid).await,
                Err(m) => Err(m),
            };
            match asked {
                Ok(Some(committed)) => return Ok(committed),
                Ok(None) => {
                    // Asked to end; it may take a moment (or never come, for a backend stuck
                    // in I/O, which the hold then bounds).
                    wait = RETRY_FIRST;
                    if !self.health.holding() || rx.is_closed() {
                        return Err(format!(
                            "transaction {xid} is still in progress on the server, and \
                             whether it commits is unknown"
                        ));
                    }
                }
                Err(m) => {
                    self.client = None;
                    self.stmts = None;
                    self.health.failed(&m);
                    if !self.health.holding() || rx.is_closed() {
                        return Err(format!(
                            "{m} (and whether the last transaction committed is unknown)"
                        ));
                    }
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    /// Some(committed) once the outcome of `xid` is final; None while it is still running
    /// (after asking the server to end the process `pid` that runs it).
    async fn status(&self, xid: i64, pid: i32) -> Result<Option<bool>, String> {
        let c = self.client.as_ref().ok_or("not connected")?;
        txid_outcome(c, xid, pid).await
    }

    /// One transaction: the claims, then the ops of every write whose claim won, then the
    /// marks; one result per write.
    async fn apply(
        &self,
        reqs: &[Request],
        marks: &[Box<str>],
    ) -> Result<Vec<Result<u64, LedgerError>>, Fail> {
        let (Some(c), Some(st)) = (&self.client, &self.stmts) else {
            return Err(Fail::Unavailable("not connected".into()));
        };
        let mut results: Vec<Option<Result<u64, LedgerError>>> = reqs
            .iter()
            .map(|r| match &r.op {
                Op::Many(ops)
                    if ops
                        .iter()
                        .skip(1)
                        .any(|o| matches!(o, KvOp::ClaimJob { .. })) =>
                {
                    Some(Err(LedgerError::Store(
                        "a ClaimJob must be the first op of its write".into(),
                    )))
                }
                _ => None,
            })
            .collect();
        let work = reqs
            .iter()
            .zip(&results)
            .any(|(r, res)| res.is_none() && !matches!(&r.op, Op::Flush) && !is_empty(&r.op));
        if !work && marks.is_empty() {
            return Ok(results.into_iter().map(|r| r.unwrap_or(Ok(0))).collect());
        }

        // The ids whose claims won, when the claims go as multi-row statements.
        let won = Mutex::new(HashSet::new());
        // BEGIN, the transaction's id and the claims, in one round trip.
        let mut futs: Vec<Fut<'_>> = vec![
            Box::pin(async move { c.batch_execute("BEGIN").await.map(|()| 0) }),
            Box::pin(async move {
                let row = c.query_one(&st.txid, &[]).await?;
                row.try_get::<_, i64>(0).map(|x| x as u64)
            }),
        ];
        let mut claims = Vec::new();
        let mut claim_ops = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            if results[i].is_none()
                && let Op::Many(ops) = &r.op
                && let Some(op @ KvOp::ClaimJob { .. }) = ops.first()
            {
                claim_ops.push(op);
                claims.push(i);
            }
        }
        // Several claims go as one statement or two; only when their ids differ, as a
        // statement that met an id twice could not say which claim won ([`split`] keeps a
        // group's claims apart anyway).
        let gathered = claim_ops.len() > 1 && {
            let mut ids = HashSet::new();
            claim_ops.iter().all(|op| ids.insert(claimed_id(op)))
        };
        if gathered {
            futs.extend(claims_futures(c, st, &claim_ops, &won));
        } else {
            futs.extend(claim_ops.iter().map(|op| claim_future(c, st, op)));
        }
        // The server's statement_timeout cannot end a wait for a server that no longer
        // answers at all (a stopped backend, a proxy in front of a vanished primary, with
        // every byte acknowledged): the client's own deadline does.
        let out = tokio::time::timeout(self.deadline, pipelined(futs))
            .await
            .map_err(|_| Fail::Unavailable(self.no_answer()))?;
        let mut out = out.into_iter();
        let mut error = None;
        if let Err(e) = out.next().expect("BEGIN's result") {
            note(&mut error, e);
        }
        let xid = match out.next().expect("txid_current's result") {
            Ok(x) => x as i64,
            Err(e) => {
                note(&mut error, e);
                0
            }
        };
        let mut counts = vec![0u64; reqs.len()];
        if gathered {
            for r in out {
                if let Err(e) = r {
                    note(&mut error, e);
                }
            }
            let won = won.into_inner().unwrap_or_else(|e| e.into_inner());
            for (i, op) in claims.iter().zip(&claim_ops) {
                if won.contains(claimed_id(op)) {
                    counts[*i] = 1;
                } else {
                    results[*i] = Some(Err(LedgerError::ClaimLost));
                }
            }
        } else {
            for (i, r) in claims.iter().zip(out) {
                match r {
                    Ok(1) => counts[*i] = 1,
                    Ok(_) => results[*i] = Some(Err(LedgerError::ClaimLost)),
                    Err(e) => note(&mut error, e),
                }
            }
        }
        if let Some(e) = error {
            return Err(self.abort(e, xid).await);
        }

        // The ops of the writes still on, in order (their puts gathered, see [`Plan`]), in
        // one round trip.
        let mut plan = Plan::new();
        for (i, r) in reqs.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            match &r.op {
                Op::Many(ops) => {
                    let skip = claims.binary_search(&i).is_ok() as usize;
                    for op in &ops[skip..] {
                        plan.op(i, op, &mut counts[i]);
                    }
                }
                Op::InsertIfAbsent { table, key, value } => {
                    plan.insert_if_absent(i, *table, key, value)
                }
                Op::Flush => {}
            }
        }
        let (mut futs, mut owner): (Vec<Fut<'_>>, Vec<Option<usize>>) =
            plan.finish().into_iter().map(|s| s.future(c, st)).unzip();
        if !marks.is_empty() {
            futs.push(Box::pin(async move {
                let ids: Vec<&str> = marks.iter().map(|m| &**m).collect();
                let p: [(&(dyn ToSql + Sync), Type); 1] = [(&ids, Type::TEXT_ARRAY)];
                c.query_typed(MARK_PUBLISHED, &p).await.map(|_| 0)
            }));
            owner.push(None);
        }
        let Ok(out) = tokio::time::timeout(self.deadline, pipelined(futs)).await else {
            return Err(self.abort(Fail::Unavailable(self.no_answer()), xid).await);
        };
        for (who, r) in owner.into_iter().zip(out) {
            match r {
                Ok(n) => {
                    if let Some(i) = who {
                        counts[i] += n;
                    }
                }
                Err(e) => note(&mut error, e),
            }
        }
        if let Some(e) = error {
            return Err(self.abort(e, xid).await);
        }
        let results = results
            .into_iter()
            .zip(counts)
            .map(|(r, n)| r.unwrap_or(Ok(n)))
            .collect();
        let committed = tokio::time::timeout(self.deadline, c.batch_execute("COMMIT"))
            .await
            .map_err(|_| Fail::Unavailable(self.no_answer()))
            .and_then(|r| r.map_err(Fail::from));
        match committed {
            Ok(()) => Ok(results),
            Err(Fail::Unavailable(why)) => Err(Fail::InDoubt {
                xid,
                pid: self.pid,
                results: Some(results),
                why,
            }),
            Err(f) => Err(f),
        }
    }

    fn no_answer(&self) -> String {
        format!(
            "the database did not answer within {}",
            humantime::format_duration(self.deadline)
        )
    }

    /// Ends a transaction that failed (COMMIT not sent); the cause is returned. A lost
    /// connection leaves it to be ended on the server ([`Fail::InDoubt`], without results).
    async fn abort(&self, f: Fail, xid: i64) -> Fail {
        match (f, &self.client) {
            (f @ Fail::Statement(_), Some(c)) => {
                // Fails only with the connection, which is then replaced anyway.
                let _ = c.batch_execute("ROLLBACK").await;
                f
            }
            (Fail::Unavailable(why), _) if xid != 0 => Fail::InDoubt {
                xid,
                pid: self.pid,
                results: None,
                why,
            },
            (f, _) => f,
        }
    }
}

fn claimed_id(op: &KvOp) -> &str {
    match op {
        KvOp::ClaimJob { id, .. } => id,
        _ => unreachable!("only called with claims"),
    }
}

fn is_empty(op: &Op) -> bool {
    matches!(op, Op::Many(ops) if ops.is_empty())
}

/// Some(committed) once the outcome of `xid` is final on the server `c` talks to; None while
/// it is still running (after asking the server to end the process `pid` that runs it).
pub(super) async fn txid_outcome(c: &Client, xid: i64, pid: i32) -> Result<Option<bool>, String> {
    let status: Option<String> = match c
        .query_one("SELECT txid_status($1)", &[&xid])
        .await
        .and_then(|r| r.try_get(0))
    {
        Ok(s) => s,
        // "transaction ID is in the future": this server never handed out `xid`. Either it
        // crashed and restarted before anything of the transaction reached its WAL (its
        // COMMIT, which must be flushed first, never did), or it is a primary promoted after
        // the old one lost it. Either way the transaction did not commit here, and never
        // will; so it counts as rolled back. Not on a standby, whose WAL may still bring it.
        Err(e) if e.code() == Some(&SqlState::INVALID_PARAMETER_VALUE) => {
            let standby: bool = c
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(|e| describe(&e))?;
            if standby {
                return Err(format!(
                    "the database is a standby that has not yet seen transaction {xid}"
                ));
            }
            return Ok(Some(false));
        }
        Err(e) => return Err(describe(&e)),
    };
    match status.as_deref() {
        Some("committed") => Ok(Some(true)),
        Some("aborted") => Ok(Some(false)),
        Some(_) => {
            // Still in progress: the session that runs it is ours, lost to us; ending it
            // rolls the transaction back unless it committed first. Matched by the
            // transaction's own id (the server shows its low 32 bits), so a reused pid or a
            // rewritten application name can never end someone else's session.
            let xid32 = xid & 0xFFFF_FFFF;
            c.query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE pid = $1 AND backend_xid::text::bigint = $2",
                &[&pid, &xid32],
            )
            .await
            .map_err(|e| describe(&e))?;
            Ok(None)
        }
        // Too old for the server to remember: cannot happen seconds later; say so.
        None => Err(format!("the server no longer knows transaction {xid}")),
    }
}

async fn backend_pid(c: &Client) -> Result<i32, tokio_postgres::Error> {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await?
        .try_get(0)
}

/// Keeps the first failure, except that an unreachable database outranks a statement error
/// (statements after a failed one fail too, as "transaction aborted").
fn note(error: &mut Option<Fail>, e: tokio_postgres::Error) {
    let f = Fail::from(e);
    match (&*error, &f) {
        (None, _) | (Some(Fail::Statement(_)), Fail::Unavailable(_)) => *error = Some(f),
        _ => {}
    }
}

/// Cuts the batch into groups that may share a transaction, returning their sizes: claims run
/// ahead of the ops of the writes before them, so a claim on an id that an earlier write of
/// the group changes starts a new group (it must see that change, as it would in order).
fn split(batch: &[Request]) -> Vec<usize> {
    let mut sizes = vec![0];
    let mut touched = HashSet::new();
    for r in batch {
        if let Some(id) = r.claim()
            && touched.contains(id)
        {
            sizes.push(0);
            touched.clear();
        }
        r.jobs(&mut touched);
        *sizes.last_mut().expect("never empty") += 1;
    }
    sizes
}
