//! The embedded durable store (redb, one file in the state directory): the idempotency ledger,
//! consent history and summaries, and what webhooks taught us, each in its own table.

mod compaction;
pub mod health;
pub mod ledger;
pub mod postgres;

pub use health::StoreHealth;
pub use ledger::{
    KvOp, KvRow, Ledger, LedgerEntry, LedgerError, LedgerState, Table, index_job, number_job_key,
    wait_closed,
};
