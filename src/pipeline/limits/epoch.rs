//! Which recipients' limit state this instance holds as the database has it. Per-recipient
//! state (caps, tier usage, per-user blocks, service windows) is owned by the instance active
//! for the recipient's shard and read through from the database the first time the recipient
//! is seen in an **epoch** (docs/design/instances.md, decision 4).
//!
//! An epoch begins at each takeover (the broker handed this instance its shard: what the
//! previous active counted since this one started is only in the database) and whenever the
//! set of live shards changes (recipients move between shards). Epoch 0 is the start: the
//! start-up load read every row, so every recipient counts as loaded in it. On redb there is
//! one instance and one epoch: epochs never move and nothing is read through.
//!
//! Reads gather: recipients arriving while a read runs wait together for the next one (a
//! round), which reads all of them at once: one store read per table, not one per job. What is
//! read is merged into memory by the caller's `read`, so it may run at any time, twice, or
//! while a recipient's own send is in flight.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use dashmap::DashMap;

use crate::store::LedgerError;

type Hasher = foldhash::fast::FixedState;

/// Recipients loaded in the current epoch, and the reads that load them.
pub struct Epochs {
    /// False on redb (one instance, one epoch): [`Self::begin`] does nothing, so nothing is
    /// ever read through.
    moves: bool,
    current: AtomicU64,
    /// Number (E.164 digits as an integer) → the epoch its rows were read in. Only worth
    /// keeping while memory holds some state of the number: housekeeping drops the others
    /// ([`Self::retain`]), and a dropped marker costs one more read, never a wrong answer.
    loaded: DashMap<u64, u64, Hasher>,
    /// The round that recipients arriving now join; taken whole by the reader that runs it.
    open: Mutex<Option<Arc<Round>>>,
    /// One read at a time: recipients arriving meanwhile gather in the next round.
    reading: tokio::sync::Mutex<()>,
}

/// Recipients read together.
#[derive(Default)]
struct Round {
    /// (number, digits); fixed once the round is taken out of `open`.
    recipients: Mutex<Vec<(u64, String)>>,
    /// What the read answered, for every member; unset while it runs (or if its reader was
    /// dropped mid-read: then the next member runs it again).
    done: OnceLock<Result<(), LedgerError>>,
}

impl Epochs {
    /// `moves`: whether epochs begin at all (PostgreSQL: several instances share the state).
    pub fn new(moves: bool) -> Self {
        Epochs {
            moves,
            current: AtomicU64::new(0),
            loaded: DashMap::with_hasher(Hasher::default()),
            open: Mutex::new(None),
            reading: tokio::sync::Mutex::new(()),
        }
    }

    /// Begins a new epoch (takeover, live shards changed): every recipient is read again at
    /// first sight. Returns the new epoch (0 where epochs do not move).
    pub fn begin(&self) -> u64 {
        if !self.moves {
            return 0;
        }
        self.current.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    /// Whether the number's rows were read in the current epoch (everything is, in epoch 0).
    pub fn is_loaded(&self, number: u64) -> bool {
        let e = self.current();
        e == 0 || self.loaded.get(&number).is_some_and(|l| *l >= e)
    }

    /// Makes sure the number's rows were read in the current epoch: at once if they were, else
    /// by `read` (given the digits of every recipient in the round; it merges what it reads),
    /// run by one member of the round for all of them. An error leaves the whole round
    /// unloaded: its jobs must not go on without their state.
    pub async fn ensure<F, Fut>(
        &self,
        number: u64,
        digits: &str,
        read: F,
    ) -> Result<(), LedgerError>
    where
        F: FnOnce(Vec<String>) -> Fut,
        Fut: Future<Output = Result<(), LedgerError>>,
    {
        if self.is_loaded(number) {
            return Ok(());
        }
        let round = {
            let mut open = lock(&self.open);
            let round = open.get_or_insert_with(Arc::default).clone();
            let mut r = lock(&round.recipients);
            if !r.iter().any(|(n, _)| *n == number) {
                r.push((number, digits.to_string()));
            }
            drop(r);
            round
        };
        let _reading = self.reading.lock().await;
        if let Some(done) = round.done.get() {
            return done.as_ref().map(|_| ()).map_err(copy);
        }
        // This round's turn: close it, so later arrivals start the next one.
        {
            let mut open = lock(&self.open);
            if open.as_ref().is_some_and(|o| Arc::ptr_eq(o, &round)) {
                *open = None;
            }
        }
        // Taken before the read: an epoch begun while it runs leaves these recipients unloaded
        // in the new one, so they are read again (what the read saw may predate the change).
        let epoch = self.current();
        let recipients = lock(&round.recipients).clone();
        let result = read(recipients.iter().map(|(_, d)| d.clone()).collect()).await;
        if result.is_ok() {
            for (n, _) in &recipients {
                let mut e = self.loaded.entry(*n).or_insert(epoch);
                *e = (*e).max(epoch);
            }
        }
        let answer = result.as_ref().map(|_| ()).map_err(copy);
        let _ = round.done.set(result);
        answer
    }

    /// Keeps only the markers of the current epoch whose number `keep` says memory still holds
    /// state of; returns how many remain. (Housekeeping: markers go with their state.)
    pub fn retain(&self, keep: impl Fn(u64) -> bool) -> usize {
        let e = self.current();
        self.loaded.retain(|n, l| *l >= e && keep(*n));
        self.loaded.len()
    }

    /// The number was erased: its marker goes with its state.
    pub fn forget(&self, number: u64) {
        self.loaded.remove(&number);
    }
}

/// The same error again, for each member of a round (LedgerError holds no source to share).
fn copy(e: &LedgerError) -> LedgerError {
    match e {
        LedgerError::Io(m) => LedgerError::Io(m.clone()),
        LedgerError::Store(m) => LedgerError::Store(m.clone()),
        e => LedgerError::Store(e.to_string()),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read that records what it was asked for.
    #[derive(Default)]
    struct Reads {
        rounds: Mutex<Vec<Vec<String>>>,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Reads {
        async fn read(&self, digits: Vec<String>) -> Result<(), LedgerError> {
            lock(&self.rounds).push(digits);
            if self.fail.load(Ordering::SeqCst) {
                return Err(LedgerError::Io("database down".into()));
            }
            Ok(())
        }

        fn rounds(&self) -> Vec<Vec<String>> {
            lock(&self.rounds).clone()
        }
    }

    #[tokio::test]
    async fn a_recipient_is_read_once_per_epoch_and_never_in_epoch_zero() {
        let e = Epochs::new(true);
        let reads = Reads::default();
        // Epoch 0: the start-up load covers everyone.
        e.ensure(1, "1", |d| reads.read(d)).await.unwrap();
        assert!(reads.rounds().is_empty());
        assert_eq!(e.begin(), 1);
        assert!(!e.is_loaded(1));
        e.ensure(1, "1", |d| reads.read(d)).await.unwrap();
        e.ensure(1, "1", |d| reads.read(d)).await.unwrap();
        assert_eq!(reads.rounds(), vec![vec!["1".to_string()]]);
        assert!(e.is_loaded(1));
        // A new epoch (a takeover, or shards changed) reads it again.
        e.begin();
        e.ensure(1, "1", |d| reads.read(d)).await.unwrap();
        assert_eq!(reads.rounds().len(), 2);
    }

    #[tokio::test]
    async fn on_redb_epochs_never_move_and_nothing_is_read() {
        let e = Epochs::new(false);
        let reads = Reads::default();
        assert_eq!(e.begin(), 0);
        e.ensure(1, "1", |d| reads.read(d)).await.unwrap();
        assert!(reads.rounds().is_empty());
    }

    #[tokio::test]
    async fn a_failed_read_leaves_the_recipient_unloaded_and_is_tried_again() {
        let e = Epochs::new(true);
        let reads = Reads::default();
        e.begin();
        reads.fail.store(true, Ordering::SeqCst);
        assert!(matches!(
            e.ensure(7, "7", |d| reads.read(d)).await,
            Err(LedgerError::Io(_))
        ));
        assert!(!e.is_loaded(7));
        reads.fail.store(false, Ordering::SeqCst);
        e.ensure(7, "7", |d| reads.read(d)).await.unwrap();
        assert!(e.is_loaded(7));
        assert_eq!(reads.rounds().len(), 2);
    }

    #[tokio::test]
    async fn an_epoch_begun_during_a_read_has_the_recipient_read_again() {
        let e = Epochs::new(true);
        e.begin();
        e.ensure(3, "3", async |_| {
            // A takeover while the read runs: what it saw may predate it.
            e.begin();
            Ok(())
        })
        .await
        .unwrap();
        assert!(!e.is_loaded(3));
    }

    #[tokio::test]
    async fn recipients_arriving_during_a_read_are_read_together_in_the_next() {
        let e = Arc::new(Epochs::new(true));
        e.begin();
        let reads = Arc::new(Reads::default());
        let (entered_tx, entered) = tokio::sync::oneshot::channel();
        let (release, release_rx) = tokio::sync::oneshot::channel::<()>();
        // The first read holds until the test lets it go.
        let first = {
            let (e, reads) = (e.clone(), reads.clone());
            tokio::spawn(async move {
                e.ensure(1, "1", async |d| {
                    entered_tx.send(()).unwrap();
                    release_rx.await.unwrap();
                    reads.read(d).await
                })
                .await
            })
        };
        entered.await.unwrap();
        let others: Vec<_> = (2..=5u64)
            .map(|n| {
                let (e, reads) = (e.clone(), reads.clone());
                tokio::spawn(async move { e.ensure(n, &n.to_string(), |d| reads.read(d)).await })
            })
            .collect();
        // Every other recipient has joined the next round before the first read ends.
        while lock(&e.open)
            .as_ref()
            .map_or(0, |r| lock(&r.recipients).len())
            < 4
        {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        for o in others {
            o.await.unwrap().unwrap();
        }
        let rounds = reads.rounds();
        assert_eq!(rounds.len(), 2, "{rounds:?}");
        let mut second = rounds[1].clone();
        second.sort();
        assert_eq!(second, ["2", "3", "4", "5"]);
        assert!((1..=5).all(|n| e.is_loaded(n)));
    }

    #[tokio::test]
    async fn markers_go_with_their_state_and_their_epoch() {
        let e = Epochs::new(true);
        e.begin();
        for n in 1..=3 {
            e.ensure(n, &n.to_string(), async |_| Ok(())).await.unwrap();
        }
        assert_eq!(e.retain(|n| n != 2), 2);
        assert!(!e.is_loaded(2));
        e.forget(3);
        assert!(!e.is_loaded(3));
        e.begin();
        assert_eq!(e.retain(|_| true), 0, "markers of an old epoch are dropped");
    }
}
