//! Consent: nobody gets a message they did not ask for.
//!
//! - [`event`]: the consent event (CONTRACT §4), validated; its canonical bytes are the proof.
//! - [`model`]: the two pure functions: `summarize(history)` and `decide(consent, job, now)`.
//! - [`index`]: the packed in-memory cache every job is checked against (no I/O).
//! - [`store`]: history and summaries in redb, erasure, the proof for `consent show`.
//! - [`keywords`]: STOP / START / YES / NO, matched ignoring case, accents and white space.
//! - [`wa_id`]: which number a WhatsApp ID in a webhook means (Brazil, Mexico).

pub mod event;
pub mod flow;
pub mod index;
pub mod keywords;
pub mod model;
pub mod store;
pub mod tools;
pub mod wa_id;

pub use event::{ConsentEvent, EventDecoder, Kind};
pub use model::Decision;
pub use store::{Applied, ConsentStore};
