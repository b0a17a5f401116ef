//! Operator tools for the runbook, one file each: `dead` is `sendwell dead list | replay` over
//! the dead-letter queue (with `dead_letter`, what one dead letter says), `backup` is
//! `sendwell state backup | restore` over a stopped daemon's state store, and `migrate` is
//! `sendwell state migrate --to-postgres`, which moves such a store into PostgreSQL. They share
//! [`OpsError`], whose variants are the exit codes the commands end with.

mod backup;
mod dead;
mod dead_letter;
mod error;
mod migrate;

pub use backup::{
    BackupReport, RestoreReport, SIGNATURE_TABLE, TableRows, state_backup, state_restore,
};
pub use dead::{
    DEFAULT_LIST_LIMIT, ListFormat, ListReport, REFRESH_AT, ReplayFilter, ReplayReport, dead_list,
    dead_replay,
};
pub use dead_letter::{
    DeadMessage, Death, HEADER_DEAD_EXCHANGE, HEADER_DEAD_ROUTING_KEY, inspect, mask_numbers_in,
    reason_code, replay_properties,
};
pub use error::OpsError;
pub use migrate::{MigrateReport, MigratedTable, state_migrate};
