//! Stage 2: has this job id been seen before? The ledger's answer decides between sending,
//! resuming a retry, refusing an in-doubt resend, and replaying a final outcome.

use crate::store::{Ledger, LedgerError, LedgerState};

#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Never seen: go ahead.
    New,
    /// Seen, nothing in doubt (a retry or deferral coming back): go ahead, counting `attempts`.
    Resume { attempts: u32 },
    /// A send was started and never recorded as finished: it may have reached the customer.
    InDoubt { attempts: u32 },
    /// Finished. `published`: whether its outcome event was confirmed.
    Final { event: Vec<u8>, published: bool },
}

impl Seen {
    /// The entry this answer was read from, as a claim expects to find it still: the attempt
    /// recorded next is written only if nobody changed the entry since (see
    /// [`crate::store::Ledger::claim`]).
    pub fn held(&self) -> Option<(LedgerState, u32)> {
        match self {
            Seen::New => None,
            Seen::Resume { attempts } => Some((LedgerState::Pending, *attempts)),
            Seen::InDoubt { attempts } => Some((LedgerState::Sending, *attempts)),
            Seen::Final { .. } => None,
        }
    }
}

pub async fn check(ledger: &Ledger, id: &str) -> Result<Seen, LedgerError> {
    Ok(match ledger.get(id).await? {
        None => Seen::New,
        Some(e) => match e.state {
            LedgerState::Pending => Seen::Resume {
                attempts: e.attempts,
            },
            LedgerState::Sending => Seen::InDoubt {
                attempts: e.attempts,
            },
            LedgerState::Final => Seen::Final {
                event: e.event,
                published: e.published,
            },
        },
    })
}
