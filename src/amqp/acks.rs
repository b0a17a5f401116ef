//! Acks in batches. A settled job's ack waits a few milliseconds so that every job settled in a
//! row goes back in one `basic.ack` with `multiple`: one frame instead of one per job for the
//! client and the broker, and on a quorum queue one settle command in the Raft log instead of
//! one per job. The broker's CPU is taken from the same cores as the daemon's, so this is
//! throughput.
//!
//! `multiple` acks every unacked delivery of the channel up to a tag, so it is only used up to
//! the first delivery that is not settled yet (a job still waiting at its account's gate, say).
//! A job settled behind such a delivery is acked alone once it has waited [`STRAGGLER`]: no ack
//! waits on another job's progress, and no ack ever covers a job that is not done. A delivery
//! given back (`basic.nack`) is forgotten here, so it never holds the others up.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::Acker;
use lapin::options::BasicAckOptions;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum AckError {
    #[error("ack: {0}")]
    Lapin(#[from] lapin::Error),
    #[error("ack: the channel is closed; the broker will redeliver the job")]
    Closed,
}

/// How often waiting acks go out.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(5);
/// Waiting acks go out at once when this many are ready.
pub const FLUSH_AT: usize = 256;
/// A settled job behind an unsettled one is acked alone after this long.
pub const STRAGGLER: Duration = Duration::from_millis(50);

/// Which acks to send now: one `multiple` ack for the settled run at the front, and single acks
/// for stragglers.
#[derive(Debug, PartialEq)]
pub struct Flush<A> {
    pub multiple: Option<A>,
    pub singles: Vec<A>,
}

/// The deliveries of one channel, in tag order, with the ack of each once its job is settled.
/// Generic over the ack handle so the rules are tested without a broker.
pub struct Pending<A> {
    outstanding: BTreeMap<u64, Option<(A, Instant)>>,
    ready: usize,
}

impl<A> Default for Pending<A> {
    fn default() -> Self {
        Self {
            outstanding: BTreeMap::new(),
            ready: 0,
        }
    }
}

impl<A> Pending<A> {
    pub fn delivered(&mut self, tag: u64) {
        self.outstanding.insert(tag, None);
    }

    /// The job of `tag` is settled; its ack may go. False if the tag was never delivered here
    /// (the caller acks it alone).
    pub fn settled(&mut self, tag: u64, ack: A, now: Instant) -> bool {
        match self.outstanding.get_mut(&tag) {
            Some(slot @ None) => {
                *slot = Some((ack, now));
                self.ready += 1;
                true
            }
            _ => false,
        }
    }

    /// Settled elsewhere (given back): neither acked here nor waited for.
    pub fn forget(&mut self, tag: u64) {
        if let Some(Some(_)) = self.outstanding.remove(&tag) {
            self.ready -= 1;
        }
    }

    pub fn ready(&self) -> usize {
        self.ready
    }

    /// Takes the acks to send: the settled run at the front as one `multiple` ack (the
    /// highest tag of the run), and settled ones behind an unsettled delivery that have waited
    /// `straggler` (all of them when `straggler` is zero).
    pub fn take(&mut self, now: Instant, straggler: Duration) -> Flush<A> {
        let mut multiple = None;
        while let Some(entry) = self.outstanding.first_entry() {
            if entry.get().is_none() {
                break;
            }
            if let Some((ack, _)) = entry.remove() {
                multiple = Some(ack);
                self.ready -= 1;
            }
        }
        let mut singles = Vec::new();
        if self.ready > 0 {
            let due: Vec<u64> = self
                .outstanding
                .iter()
                .filter(|(_, v)| {
                    v.as_ref()
                        .is_some_and(|(_, at)| now.duration_since(*at) >= straggler)
                })
                .map(|(t, _)| *t)
                .collect();
            for t in due {
                if let Some(Some((ack, _))) = self.outstanding.remove(&t) {
                    singles.push(ack);
                    self.ready -= 1;
                }
            }
        }
        Flush { multiple, singles }
    }
}

/// What the batcher needs of an ack handle: lapin's [`Acker`], or a stand-in in tests.
pub trait AckHandle: Clone + Send + Sync + 'static {
    /// Acks this delivery (and, with `multiple`, every earlier one of the channel); false if
    /// the channel is closed.
    fn ack(&self, multiple: bool) -> impl Future<Output = Result<bool, lapin::Error>> + Send;
}

impl AckHandle for Acker {
    async fn ack(&self, multiple: bool) -> Result<bool, lapin::Error> {
        Acker::ack(self, BasicAckOptions { multiple }).await
    }
}

/// The batcher of one consuming channel (one broker session).
pub struct AckBatcher<A = Acker> {
    pending: Mutex<Pending<A>>,
    wake: Notify,
    /// Held for a whole flush, from taking the acks to the broker having them: the session's
    /// last flush waits for the periodic one under way, so the connection is never closed
    /// under acks already taken (they would be lost, and their jobs sent again on redelivery).
    flushing: tokio::sync::Mutex<()>,
}

impl<A> Default for AckBatcher<A> {
    fn default() -> Self {
        Self {
            pending: Mutex::default(),
            wake: Notify::new(),
            flushing: tokio::sync::Mutex::new(()),
        }
    }
}

impl<A: AckHandle> AckBatcher<A> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending<A>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A delivery was taken from the channel (call before its job can settle).
    pub fn delivered(&self, tag: u64) {
        self.lock().delivered(tag);
    }

    /// The delivery's job is settled: ack it with the next batch. An unknown tag (never
    /// registered) is acked at once, alone.
    pub async fn ack(&self, tag: u64, acker: &A) -> Result<(), AckError> {
        let (known, ready) = {
            let mut p = self.lock();
            let known = p.settled(tag, acker.clone(), Instant::now());
            (known, p.ready())
        };
        if !known {
            return single(acker).await;
        }
        if ready >= FLUSH_AT {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// The delivery was given back (nack) by its own handle.
    pub fn forget(&self, tag: u64) {
        self.lock().forget(tag);
    }

    /// Sends what is due: the settled run at the front, and stragglers older than `straggler`.
    /// Returns once the acks of any flush under way have gone too.
    pub async fn flush(&self, straggler: Duration) -> Result<(), AckError> {
        let _flushing = self.flushing.lock().await;
        let Flush { multiple, singles } = self.lock().take(Instant::now(), straggler);
        if let Some(a) = multiple {
            if !a.ack(true).await? {
                return Err(AckError::Closed);
            }
            crate::metrics::acks_sent(true);
        }
        for a in singles {
            single(&a).await?;
            crate::metrics::acks_sent(false);
        }
        Ok(())
    }

    /// Flushes every [`FLUSH_INTERVAL`], or sooner when [`FLUSH_AT`] are ready, until `stop`;
    /// a failed ack ends the session (`stop` is cancelled) so the broker redelivers.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            if let Err(e) = self.flush(STRAGGLER).await {
                tracing::warn!(error = %e, "Could not ack settled jobs; reconnecting so the broker redelivers them.");
                stop.cancel();
                return;
            }
        }
    }
}

async fn single<A: AckHandle>(acker: &A) -> Result<(), AckError> {
    match acker.ack(false).await? {
        true => Ok(()),
        false => Err(AckError::Closed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn a_settled_run_at_the_front_goes_as_one_multiple_ack() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        for tag in 1..=5 {
            p.delivered(tag);
        }
        // 1, 2, 3 settled in any order; 4 still running; 5 settled.
        assert!(p.settled(2, "a2", t0));
        assert!(p.settled(1, "a1", t0));
        assert!(p.settled(3, "a3", t0));
        assert!(p.settled(5, "a5", t0));
        let f = p.take(at(t0, 1), STRAGGLER);
        assert_eq!(f.multiple, Some("a3"), "up to the first unsettled delivery");
        assert!(f.singles.is_empty(), "5 is not a straggler yet");
        // Never past 4: 5 goes alone once it has waited.
        let f = p.take(t0 + STRAGGLER, STRAGGLER);
        assert_eq!(
            f,
            Flush {
                multiple: None,
                singles: vec!["a5"]
            }
        );
        assert_eq!(p.ready(), 0);
        let later = t0 + STRAGGLER + Duration::from_millis(10);
        assert!(p.settled(4, "a4", later));
        assert_eq!(p.take(later, STRAGGLER).multiple, Some("a4"));
        assert!(p.outstanding.is_empty());
    }

    #[test]
    fn a_given_back_delivery_does_not_hold_the_others() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        for tag in 1..=3 {
            p.delivered(tag);
        }
        p.forget(1);
        assert!(p.settled(2, "a2", t0));
        assert!(p.settled(3, "a3", t0));
        assert_eq!(p.take(t0, STRAGGLER).multiple, Some("a3"));
    }

    #[test]
    fn unknown_or_repeated_tags_are_not_batched() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        p.delivered(7);
        assert!(!p.settled(6, "a6", t0), "never delivered on this channel");
        assert!(p.settled(7, "a7", t0));
        assert!(!p.settled(7, "again", t0), "settled twice");
        assert_eq!(p.ready(), 1);
    }

    #[test]
    fn a_final_flush_takes_every_settled_one() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        for tag in 1..=4 {
            p.delivered(tag);
        }
        assert!(p.settled(2, "a2", t0));
        assert!(p.settled(4, "a4", t0));
        let f = p.take(t0, Duration::ZERO);
        assert_eq!(f.multiple, None);
        assert_eq!(f.singles, vec!["a2", "a4"]);
    }

    /// An ack that completes only when the test opens `gate`, and counts what went out.
    #[derive(Clone)]
    struct Gated {
        gate: Arc<tokio::sync::Semaphore>,
        sent: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl AckHandle for Gated {
        async fn ack(&self, _multiple: bool) -> Result<bool, lapin::Error> {
            self.gate.acquire().await.unwrap().forget();
            self.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(true)
        }
    }

    #[tokio::test]
    async fn the_last_flush_returns_only_once_a_flush_under_way_has_sent_its_acks() {
        let gated = Gated {
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            sent: Arc::default(),
        };
        let batcher = Arc::new(AckBatcher::<Gated>::default());
        batcher.delivered(1);
        batcher.ack(1, &gated).await.unwrap();
        // The periodic flush takes the ack and is still sending it...
        let periodic = tokio::spawn({
            let b = batcher.clone();
            async move { b.flush(STRAGGLER).await }
        });
        tokio::time::timeout(Duration::from_secs(10), async {
            while batcher.lock().ready() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the periodic flush takes the ack");
        // ...when the session ends: its last flush must not return (and the connection close)
        // before that ack went out.
        let last = tokio::spawn({
            let b = batcher.clone();
            async move { b.flush(Duration::ZERO).await }
        });
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            !last.is_finished(),
            "the last flush returned while an ack it did not send was still on its way"
        );
        gated.gate.add_permits(1);
        last.await.unwrap().unwrap();
        assert_eq!(gated.sent.load(std::sync::atomic::Ordering::SeqCst), 1);
        periodic.await.unwrap().unwrap();
    }
}
