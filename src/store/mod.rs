//! The embedded durable store (redb, one file in the state directory). Today it holds the
//! idempotency ledger; consent and cap history join it in their own tables.

pub mod ledger;

pub use ledger::{Ledger, LedgerEntry, LedgerError, LedgerState, Table};
