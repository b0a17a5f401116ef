//! Operator tools for the runbook, one file each: `dead` is `sendwell dead list | replay` over
//! the dead-letter queue (with `dead_letter`, what one dead letter says), and `backup` is
//! `sendwell state backup | restore` over a stopped daemon's state store. They share
//! [`OpsError`], whose variants are the exit codes the commands end with.

mod backup;
mod dead;
mod dead_letter;

use crate::consent::tools::{
    EX_CANTCREAT, EX_DATAERR, EX_IOERR, EX_NOINPUT, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE,
};

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

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{0}")]
    Usage(String),
    /// The input is not what it must be (a backup that is not a sendwell store).
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    NoInput(String),
    #[error("{0}")]
    Broker(String),
    #[error("{0}")]
    Store(String),
    #[error("{0}")]
    Output(String),
    /// The daemon holds the store, or the broker did not confirm a republish: try again later.
    #[error("{0}")]
    Busy(String),
}

impl OpsError {
    pub fn exit_code(&self) -> i32 {
        match self {
            OpsError::Usage(_) => EX_USAGE,
            OpsError::Data(_) => EX_DATAERR,
            OpsError::NoInput(_) => EX_NOINPUT,
            OpsError::Broker(_) => EX_UNAVAILABLE,
            OpsError::Store(_) => EX_CANTCREAT,
            OpsError::Output(_) => EX_IOERR,
            OpsError::Busy(_) => EX_TEMPFAIL,
        }
    }
}
