//! What the operator tools fail with, one variant per exit code the commands end with.

use crate::consent::tools::{
    EX_CANTCREAT, EX_DATAERR, EX_IOERR, EX_NOINPUT, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE,
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
