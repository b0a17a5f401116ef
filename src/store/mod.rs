//! sendwell's durable state: the idempotency ledger, consent history and summaries, and what
//! webhooks taught us, each in its own table, behind one handle ([`Ledger`]) whatever the
//! backend: redb, one file in the state directory (the default), or PostgreSQL.

mod backend;
mod compaction;
pub mod health;
pub mod ledger;
pub mod postgres;

pub use backend::{KeyLock, Ledger};
pub use health::StoreHealth;
pub use ledger::{
    KvOp, KvRow, LedgerEntry, LedgerError, LedgerState, RedbLedger, Table, index_job,
    number_job_key, wait_closed,
};
