//! This process as one of several sendwell instances sharing one PostgreSQL state (issue 18;
//! docs/design/instances.md, decisions 1, 2, 5 and 6): who it is, whether it is its shard's
//! active instance, what runs when it takes over, and its row in the registry, from which each
//! account's rate share follows.
//!
//! - **Identity** ([`Instance`]): a UUID per start, the shard, the host name and the pid.
//! - **Role**: [`Role::Standby`] until the first delivery from the shard's jobs queue in a broker
//!   session, then [`Role::Active`] until that session ends. The jobs queue is
//!   single-active-consumer: the broker delivers only to the queue's active consumer and moves
//!   the queue only when that consumer goes, so a delivery is the proof, and there is no lease a
//!   dead instance could hold. While it has had no delivery, the broker edge publishes a probe to
//!   its own shard queue every 2 s (`amqp`), so that the active instance learns it is active with
//!   no job flowing.
//! - **Takeover hooks** ([`Instance::on_takeover`]) run, awaited, at the first delivery of a
//!   session, before any job of that session is processed (`amqp` holds the deliveries that
//!   arrive meanwhile). **Shard hooks** ([`Instance::on_shards_changed`]) run when the set of
//!   live shards in the registry changes (recipients moved between shards).
//! - **Registry** ([`Heartbeats`], PostgreSQL only): the row in `sw_instances`, its heartbeat
//!   every 2 s on the database's clock, `active_since` written by a takeover hook and cleared
//!   when the session ends, the row deleted on a clean stop. After each heartbeat the live
//!   shards (distinct shard among rows with a heartbeat in the last 10 s) set each account's
//!   rate share. A database that cannot be reached fails heartbeats, which are counted, logged
//!   once per outage and retried; the shares stay as they were meanwhile. On redb there is no
//!   registry: one instance, the full rate; the role is still reported.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use jiff::Timestamp;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::postgres::{Me, Registry};

/// A callback run at a takeover or when the live shards change. Each call returns the future
/// to await; it handles its own errors (a hook cannot fail the takeover: jobs must go on).
pub type Hook = Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// Each account's rate share now (msgs/s this instance may send), for `/readyz`.
pub type ShareReport = Box<dyn Fn() -> Vec<(Arc<str>, f64)> + Send + Sync>;

/// How often the registry row's heartbeat is written (decision 5).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// Takeovers slower than this are logged as a warning (the design's target).
const TAKEOVER_TARGET: Duration = Duration::from_secs(2);
/// How long the takeover waits for the registry row to say `active_since`; the next heartbeat
/// writes it otherwise (a database outage must not hold the jobs).
const ACTIVE_NOTE_WITHIN: Duration = Duration::from_secs(2);
/// Heartbeats failing this long: the instance gives up its rate share (the others count it
/// dead at 10 s, the registry's liveness, and take it), keeping [`YIELD_SHARDS`]' worth.
const YIELD_AFTER: Duration = Duration::from_secs(8);
/// The share kept meanwhile: the rate split as if over this many shards (next to nothing).
const YIELD_SHARDS: u32 = 1000;
/// Bound on one heartbeat round trip (the pool's own timeouts come first normally).
const BEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows dead for a day are purged about this often (by every instance; the statement is cheap).
const PURGE_EVERY: u32 = 300;

/// Whether the broker has made this instance its shard's active consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// No delivery from the shard's jobs queue yet in this broker session (or not connected).
    Standby,
    /// Delivered to since `since`, in the current broker session.
    Active { since: Timestamp },
}

impl Role {
    pub fn is_active(&self) -> bool {
        matches!(self, Role::Active { .. })
    }
}

/// What the registry said at the last heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Live {
    /// Distinct shards with a live row, ascending (ours among them).
    pub shards: Vec<i32>,
    /// Live rows, ours included.
    pub instances: u32,
}

/// This process's identity and role; shared by the broker edge, the registry and `/readyz`.
pub struct Instance {
    /// New at every start: a restarted process is a new instance (its old row dies alone).
    pub id: uuid::Uuid,
    pub shard: u16,
    pub host: String,
    pub pid: u32,
    /// Written by the broker edge only; read by anyone through [`Instance::watch`].
    role: watch::Sender<Role>,
    takeover_hooks: Mutex<Vec<Arc<Hook>>>,
    shard_hooks: Mutex<Vec<Arc<Hook>>>,
    /// Since when the takeover hooks have been running (None when no takeover is): for
    /// `/readyz`, which would otherwise call an instance active while its jobs are held.
    taking_over: Mutex<Option<Timestamp>>,
    /// Set by the registry's heartbeats; None on redb, or before the first heartbeat.
    live: Mutex<Option<Live>>,
    /// The accounts' shares, read at each `/readyz` (set once by the wiring).
    shares: OnceLock<ShareReport>,
}

impl Instance {
    pub fn new(shard: u16) -> Arc<Instance> {
        let (role, _) = watch::channel(Role::Standby);
        crate::metrics::instance_started(shard);
        Arc::new(Instance {
            id: uuid::Uuid::new_v4(),
            shard,
            host: host_name(),
            pid: std::process::id(),
            role,
            takeover_hooks: Mutex::default(),
            shard_hooks: Mutex::default(),
            taking_over: Mutex::default(),
            live: Mutex::default(),
            shares: OnceLock::new(),
        })
    }

    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// Every change of role, from now on.
    pub fn watch(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Runs `hook` at every takeover (the first delivery of a broker session), before the first
    /// job of that session is processed. Hooks run concurrently; the jobs wait for all of them.
    pub fn on_takeover(&self, hook: Hook) {
        lock(&self.takeover_hooks).push(Arc::new(hook));
    }

    /// Runs `hook` whenever the set of live shards in the registry changes (never on redb).
    pub fn on_shards_changed(&self, hook: Hook) {
        lock(&self.shard_hooks).push(Arc::new(hook));
    }

    /// What the registry said at the last heartbeat (None on redb).
    pub fn live(&self) -> Option<Live> {
        lock(&self.live).clone()
    }

    /// Where `/readyz` reads each account's share from (set once, by the wiring).
    pub fn report_shares(&self, f: ShareReport) {
        let _ = self.shares.set(f);
    }

    /// The broker delivered from the shard's jobs queue for the first time in this session.
    pub(crate) fn became_active(&self) {
        let since = Timestamp::now();
        self.role.send_replace(Role::Active { since });
        crate::metrics::instance_active(self.shard, true);
        crate::metrics::instance_took_over(self.shard, since);
        tracing::info!(
            shard = self.shard,
            instance = %self.id,
            "This instance is now the shard's active one (the broker delivers its jobs queue here); taking over."
        );
    }

    /// Runs every takeover hook and waits for all of them. A hook that panics is logged and
    /// counted, and the takeover goes on without it: the jobs it holds must not wait forever.
    /// While the hooks run, `/readyz` and `sendwell_instance_taking_over_seconds` say since
    /// when, and a wait past the 2 s target is logged then (and each minute after), not only
    /// when it ends: a takeover stuck on a database that does not answer is visible at once.
    pub(crate) async fn run_takeover_hooks(&self) {
        use futures_util::FutureExt as _;
        let hooks = lock(&self.takeover_hooks).clone();
        let started = std::time::Instant::now();
        *lock(&self.taking_over) = Some(Timestamp::now());
        let all = futures_util::future::join_all(
            hooks
                .iter()
                .map(|h| std::panic::AssertUnwindSafe(h()).catch_unwind()),
        );
        tokio::pin!(all);
        let mut next_note = TAKEOVER_TARGET;
        let mut gauge = tokio::time::interval(Duration::from_secs(1));
        let results = loop {
            tokio::select! {
                r = &mut all => break r,
                _ = gauge.tick() => {
                    let held = started.elapsed();
                    crate::metrics::instance_taking_over(self.shard, held);
                    if held >= next_note {
                        next_note = held + Duration::from_secs(60);
                        tracing::warn!(
                            shard = self.shard,
                            hooks = hooks.len(),
                            waited_s = held.as_secs(),
                            "The takeover is still running its hooks; the shard's jobs are held until they finish (logged again each minute)."
                        );
                    }
                }
            }
        };
        for r in results {
            if r.is_err() {
                crate::metrics::instance_takeover_hook_panicked(self.shard);
                tracing::error!(
                    shard = self.shard,
                    "A takeover hook panicked; the takeover goes on without it (what it had to prepare may be missing until the next takeover)."
                );
            }
        }
        *lock(&self.taking_over) = None;
        crate::metrics::instance_taking_over(self.shard, Duration::ZERO);
        let took = started.elapsed();
        crate::metrics::instance_takeover_done(self.shard, took);
        if took > TAKEOVER_TARGET {
            tracing::warn!(
                shard = self.shard,
                hooks = hooks.len(),
                took_ms = took.as_millis() as u64,
                "The takeover took longer than its 2 s target; the shard's jobs waited meanwhile."
            );
        } else {
            tracing::info!(
                shard = self.shard,
                hooks = hooks.len(),
                took_ms = took.as_millis() as u64,
                "Takeover done; processing the shard's jobs."
            );
        }
    }

    /// The broker session ended (lost or closed): the broker may give the queue to another
    /// instance now.
    pub(crate) fn session_ended(&self) {
        let was = self.role.send_replace(Role::Standby);
        if was.is_active() {
            crate::metrics::instance_active(self.shard, false);
            tracing::info!(
                shard = self.shard,
                "The broker session ended: this instance is no longer the shard's active one."
            );
        }
    }

    async fn run_shard_hooks(&self) {
        let hooks = lock(&self.shard_hooks).clone();
        futures_util::future::join_all(hooks.iter().map(|h| h())).await;
    }

    fn set_live(&self, live: Live) {
        crate::metrics::live_instances(live.instances, live.shards.len());
        *lock(&self.live) = Some(live);
    }

    /// The lines `/readyz` adds after its first line: role, shard, time since the takeover,
    /// what is live, and each account's rate share.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        match self.role() {
            Role::Active { since } => {
                let for_s = (Timestamp::now().as_second() - since.as_second()).max(0);
                let _ = writeln!(
                    out,
                    "role: active (shard {}), for {for_s} s since the takeover at {since:.0}",
                    self.shard
                );
                if let Some(at) = *lock(&self.taking_over) {
                    let held_s = (Timestamp::now().as_second() - at.as_second()).max(0);
                    let _ = writeln!(
                        out,
                        "taking over: the takeover hooks have run for {held_s} s; the shard's jobs are held until they finish"
                    );
                }
            }
            Role::Standby => {
                let _ = writeln!(out, "role: standby (shard {})", self.shard);
            }
        }
        let _ = writeln!(
            out,
            "instance: {} on {}, pid {}",
            self.id, self.host, self.pid
        );
        match self.live() {
            Some(live) => {
                let shards: Vec<String> = live.shards.iter().map(i32::to_string).collect();
                let _ = writeln!(
                    out,
                    "live: {} shard(s) ({}), {} instance(s)",
                    live.shards.len(),
                    shards.join(", "),
                    live.instances
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "live: no registry (redb state, or no heartbeat yet): the full rate"
                );
            }
        }
        if let Some(shares) = self.shares.get() {
            for (account, mps) in shares() {
                let _ = writeln!(out, "rate share: {account} {} msgs/s", round2(mps));
            }
        }
        out
    }

    fn me(&self) -> Me {
        Me {
            id: self.id.to_string(),
            shard: self.shard as i32,
            host: self.host.clone(),
            pid: self.pid.min(i32::MAX as u32) as i32,
        }
    }
}

/// `x` with at most two decimals, without trailing zeros (50, 33.33).
fn round2(x: f64) -> String {
    let s = format!("{:.2}", x);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The host name as the kernel has it (Linux); `unknown` where it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The registry row of this instance and its heartbeats (PostgreSQL only).
pub struct Heartbeats {
    instance: Arc<Instance>,
    registry: Registry,
    me: Me,
    /// Applies the number of live shards to every account's rate (after each heartbeat).
    apply: Box<dyn Fn(u32) + Send + Sync>,
    /// What the row should say about `active_since`: set by the takeover hook, cleared when the
    /// session ends. Heartbeats carry it, so a note that failed is written by the next one.
    active: AtomicBool,
    /// Serialises the row's writes: a heartbeat that read `active` before a takeover must not
    /// commit after the takeover's note and clear it.
    writes: tokio::sync::Mutex<()>,
    /// Heartbeats failed in a row (0: the last one worked); the first failure of an outage is
    /// logged, and the first success after it.
    failing: AtomicU64,
    /// Latest live shards, for the task that runs the shard hooks (coalescing changes).
    shards: watch::Sender<Option<Vec<i32>>>,
    /// When a heartbeat last worked (the start counts): past [`YIELD_AFTER`] the others are
    /// about to count this instance dead and take its share.
    last_ok: Mutex<tokio::time::Instant>,
    /// Whether this instance gave up its share for heartbeats that fail ([`YIELD_AFTER`]).
    yielded: AtomicBool,
}

impl Heartbeats {
    pub fn new(
        instance: Arc<Instance>,
        registry: Registry,
        apply: Box<dyn Fn(u32) + Send + Sync>,
    ) -> Arc<Heartbeats> {
        let me = instance.me();
        Arc::new(Heartbeats {
            instance,
            registry,
            me,
            apply,
            active: AtomicBool::new(false),
            writes: tokio::sync::Mutex::new(()),
            failing: AtomicU64::new(0),
            shards: watch::channel(None).0,
            last_ok: Mutex::new(tokio::time::Instant::now()),
            yielded: AtomicBool::new(false),
        })
    }

    /// One heartbeat: writes the row (inserting it the first time), reads what is live, applies
    /// the shares. False when the database could not be reached (counted; logged once per
    /// outage); the shares stay as they were.
    pub async fn beat(&self) -> bool {
        // The others date this heartbeat by when the database took it: at the latest, when
        // its answer comes; at the earliest, now. The earlier is the safe one for yielding.
        let started = tokio::time::Instant::now();
        let result = {
            let _w = self.writes.lock().await;
            let active = self.active.load(Ordering::SeqCst);
            tokio::time::timeout(BEAT_TIMEOUT, self.registry.heartbeat(&self.me, active)).await
        };
        let live = match result {
            Ok(Ok(live)) => live,
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                return false;
            }
            Err(_) => {
                self.failed("no answer within 5 s");
                return false;
            }
        };
        *lock(&self.last_ok) = started;
        self.yielded.store(false, Ordering::SeqCst);
        let failed = self.failing.swap(0, Ordering::SeqCst);
        if failed > 0 {
            tracing::info!(
                failed,
                "The instance registry takes heartbeats again; rate shares follow the live shards again."
            );
        }
        (self.apply)(live.shards.len().max(1) as u32);
        let changed = self.shards.send_if_modified(|s| {
            let changed = s.as_ref() != Some(&live.shards);
            if changed {
                *s = Some(live.shards.clone());
            }
            changed
        });
        if changed {
            // Once per change (the first heartbeat's set is one).
            tracing::info!(
                shards = ?live.shards,
                instances = live.instances,
                "Live shards in the instance registry: each account's rate is split evenly over them."
            );
        }
        self.instance.set_live(Live {
            shards: live.shards,
            instances: live.instances,
        });
        true
    }

    fn failed(&self, why: &str) {
        crate::metrics::heartbeat_failed();
        if self.failing.fetch_add(1, Ordering::SeqCst) == 0 {
            tracing::warn!(
                error = why,
                "The instance registry cannot be written (heartbeat failed); retrying every 2 s, rate shares stay as they are for 8 s (logged once per outage; sendwell_instance_heartbeat_failures_total counts each)."
            );
        }
        self.yield_if_overdue();
    }

    /// The others count this instance dead 10 s after its last heartbeat and split the rate
    /// without it; sending on at the old share would then exceed the account's rate. Jobs
    /// mostly wait anyway while the database does not answer; if only the heartbeats fail (a
    /// pool too busy), going slow also eases that. Called after a failed heartbeat, and by a
    /// task of [`Self::run`] on time (a heartbeat may hang for [`BEAT_TIMEOUT`] first).
    fn yield_if_overdue(&self) {
        if lock(&self.last_ok).elapsed() >= YIELD_AFTER
            && !self.yielded.swap(true, Ordering::SeqCst)
        {
            (self.apply)(YIELD_SHARDS);
            tracing::warn!(
                "No heartbeat for 8 s: the other instances will soon count this one dead and take its rate share, so it sends at a thousandth of each account's rate until a heartbeat works again."
            );
        }
    }

    /// The takeover hook that makes the row say `active_since = now()` before the first job
    /// (decision 2), waiting at most [`ACTIVE_NOTE_WITHIN`] for the database.
    pub fn takeover_hook(self: &Arc<Self>) -> Hook {
        let this = self.clone();
        Box::new(move || {
            let this = this.clone();
            Box::pin(async move { this.note_active(true).await })
        })
    }

    async fn note_active(&self, active: bool) {
        self.active.store(active, Ordering::SeqCst);
        let write = async {
            let _w = self.writes.lock().await;
            self.registry.set_active(&self.me, active).await
        };
        match tokio::time::timeout(ACTIVE_NOTE_WITHIN, write).await {
            Ok(Ok(())) => {}
            // The next heartbeat writes it (it carries `active`); counted with the heartbeats.
            Ok(Err(e)) => self.failed(&e.to_string()),
            Err(_) => self.failed("no answer within 2 s"),
        }
    }

    /// Heartbeats every 2 s until `stop`, then deletes the row (a clean stop). Also clears
    /// `active_since` when the broker session ends, purges rows dead for a day, and runs the
    /// shard hooks when the live shards change. `stop` comes after the broker session has
    /// drained, so the share is held as long as this instance may still send.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let hooks = tokio::spawn(self.clone().shard_hooks(stop.clone()));
        // On a task of its own: the loop below waits in a heartbeat that hangs.
        let yields = tokio::spawn({
            let this = self.clone();
            async move {
                loop {
                    let due = *lock(&this.last_ok) + YIELD_AFTER;
                    let due = due.max(tokio::time::Instant::now()) + Duration::from_millis(10);
                    tokio::time::sleep_until(due).await;
                    this.yield_if_overdue();
                    if this.yielded.load(Ordering::SeqCst) {
                        // Nothing more to do until a heartbeat works again.
                        tokio::time::sleep(HEARTBEAT_EVERY).await;
                    }
                }
            }
        });
        let mut role = self.instance.watch();
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beats: u32 = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    if beats % PURGE_EVERY == 0
                        && let Ok(Ok(n)) = tokio::time::timeout(BEAT_TIMEOUT, self.registry.purge()).await
                        && n > 0
                    {
                        tracing::info!(rows = n, "Purged registry rows of instances dead for a day.");
                    }
                    beats = beats.wrapping_add(1);
                    self.beat().await;
                }
                changed = role.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now_active = role.borrow_and_update().is_active();
                    // Set by the takeover hook; cleared here, at once.
                    if !now_active && self.active.load(Ordering::SeqCst) {
                        self.note_active(false).await;
                    }
                }
            }
        }
        hooks.abort();
        yields.abort();
        let removed = async {
            let _w = self.writes.lock().await;
            self.registry.remove(&self.me).await
        };
        match tokio::time::timeout(BEAT_TIMEOUT, removed).await {
            Ok(Ok(())) => tracing::info!("Left the instance registry."),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Could not delete this instance's registry row; it stops counting as live 10 s after its last heartbeat.")
            }
            Err(_) => tracing::warn!(
                "The instance registry did not answer at stop; this instance stops counting as live 10 s after its last heartbeat."
            ),
        }
    }

    /// Runs the shard hooks after each change of the live shards (not for the first value: a
    /// fresh start has loaded everything anyway). Changes that come while the hooks run are
    /// coalesced into one more run.
    async fn shard_hooks(self: Arc<Self>, stop: CancellationToken) {
        let mut rx = self.shards.subscribe();
        let mut seen_first = rx.borrow_and_update().is_some();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            let now = rx.borrow_and_update().clone();
            if !seen_first {
                seen_first = now.is_some();
                continue;
            }
            if now.is_some() {
                self.instance.run_shard_hooks().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn the_role_is_standby_until_a_delivery_and_again_when_the_session_ends() {
        let i = Instance::new(7);
        let mut w = i.watch();
        assert_eq!(i.role(), Role::Standby);
        assert!(i.describe().starts_with("role: standby (shard 7)\n"));
        i.became_active();
        assert!(w.has_changed().unwrap());
        assert!(w.borrow_and_update().is_active());
        assert!(i.describe().starts_with("role: active (shard 7), for 0 s"));
        i.session_ended();
        assert_eq!(*w.borrow_and_update(), Role::Standby);
    }

    #[tokio::test]
    async fn every_takeover_hook_runs_and_is_awaited() {
        let i = Instance::new(0);
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let ran = ran.clone();
            i.on_takeover(Box::new(move || {
                let ran = ran.clone();
                Box::pin(async move {
                    tokio::task::yield_now().await;
                    ran.fetch_add(1, Ordering::SeqCst);
                })
            }));
        }
        i.run_takeover_hooks().await;
        assert_eq!(ran.load(Ordering::SeqCst), 3);
        i.run_takeover_hooks().await;
        assert_eq!(ran.load(Ordering::SeqCst), 6, "again at the next takeover");
    }

    /// A hook that panics must not hold the shard's jobs forever (the takeover would never
    /// end); one that waits shows on `/readyz` while it does.
    #[tokio::test]
    async fn a_panicking_hook_ends_the_takeover_and_a_waiting_one_shows_on_readyz() {
        let i = Instance::new(0);
        i.on_takeover(Box::new(|| Box::pin(async { panic!("a broken hook") })));
        let release = Arc::new(tokio::sync::Notify::new());
        {
            let release = release.clone();
            i.on_takeover(Box::new(move || {
                let release = release.clone();
                Box::pin(async move { release.notified().await })
            }));
        }
        i.became_active();
        let run = tokio::spawn({
            let i = i.clone();
            async move { i.run_takeover_hooks().await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !i.describe().contains("taking over:") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "readyz never said the takeover is running: {}",
                i.describe()
            );
            tokio::task::yield_now().await;
        }
        release.notify_one();
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the takeover ends though a hook panicked")
            .expect("the panic stays inside the takeover");
        assert!(!i.describe().contains("taking over:"), "{}", i.describe());
    }

    /// The others take this instance's share 10 s after its last heartbeat: it must have given
    /// it up by then, once (not at every failed heartbeat), and take it back at the next one
    /// that works (not tested here: that needs a database).
    #[tokio::test]
    async fn an_instance_whose_heartbeats_fail_for_8_s_gives_up_its_share_once() {
        let applied = Arc::new(Mutex::new(Vec::new()));
        let hb = {
            let applied = applied.clone();
            Heartbeats::new(
                Instance::new(0),
                Registry::unreachable(),
                Box::new(move |n| lock(&applied).push(n)),
            )
        };
        assert!(!hb.beat().await);
        assert!(lock(&applied).is_empty(), "gave up its share at once");
        // As if the last heartbeat that worked were 9 s ago.
        *lock(&hb.last_ok) = tokio::time::Instant::now() - Duration::from_secs(9);
        assert!(!hb.beat().await);
        assert!(!hb.beat().await);
        assert_eq!(*lock(&applied), vec![YIELD_SHARDS]);
    }

    /// A heartbeat that hangs (a database that takes the connection and never answers) fails
    /// only after [`BEAT_TIMEOUT`]; the share must be given up on time all the same.
    #[tokio::test]
    async fn a_hanging_heartbeat_does_not_delay_giving_up_the_share() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = silent.accept().await {
                conns.push(c);
            }
        });
        let applied = Arc::new(Mutex::new(Vec::new()));
        let hb = {
            let applied = applied.clone();
            Heartbeats::new(
                Instance::new(0),
                Registry::at_port(port),
                Box::new(move |n| lock(&applied).push(n)),
            )
        };
        *lock(&hb.last_ok) = tokio::time::Instant::now() - Duration::from_millis(7500);
        let stop = CancellationToken::new();
        let run = tokio::spawn(hb.clone().run(stop.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while lock(&applied).is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never gave up its share"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(*lock(&applied), vec![YIELD_SHARDS]);
        assert_eq!(
            hb.failing.load(Ordering::SeqCst),
            0,
            "gave it up only when the hanging heartbeat failed"
        );
        stop.cancel();
        run.abort();
        held.abort();
    }

    #[test]
    fn shares_read_as_people_write_them() {
        assert_eq!(round2(50.0), "50");
        assert_eq!(round2(100.0 / 3.0), "33.33");
        assert_eq!(round2(0.5), "0.5");
    }
}
