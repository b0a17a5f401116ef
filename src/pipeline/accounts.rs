//! Sender accounts at run time: their current token and whether they are paused because the
//! Cloud API said the account itself cannot send (bad token, payment, policy block).
//!
//! A paused account's jobs are deferred, never failed. Every `probe_interval` one job is let
//! through as a probe (after re-reading the token file, so a rotated token is picked up); its
//! success resumes the account.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Account, Secret, read_secret};

#[derive(Debug)]
struct Pause {
    reason: String,
    /// When the next job may go as a probe.
    next_probe: Instant,
    /// A probe is out; others keep waiting until it answers.
    probing: bool,
}

pub struct AccountRuntime {
    pub config: Account,
    /// Replaced when the token file changes (rotation) while paused.
    token: RwLock<Secret>,
    pause: Mutex<Option<Pause>>,
    /// Appended to marketing text; replaceable on reload (SIGHUP).
    footer: RwLock<Option<Arc<str>>>,
}

/// Whether a job of this account may call the API now.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Go,
    /// Go, as the one probe of a paused account.
    Probe,
    /// Paused: come back after this long.
    Wait(Duration),
}

pub struct Accounts {
    by_name: HashMap<Arc<str>, Arc<AccountRuntime>>,
    probe_interval: Duration,
}

impl Accounts {
    pub fn new(accounts: &[Account], probe_interval: Duration) -> Self {
        Self {
            by_name: accounts
                .iter()
                .map(|a| {
                    (
                        a.name.clone(),
                        Arc::new(AccountRuntime {
                            config: a.clone(),
                            token: RwLock::new(a.token.clone()),
                            pause: Mutex::new(None),
                            footer: RwLock::new(
                                a.consent.marketing_footer.as_deref().map(Arc::from),
                            ),
                        }),
                    )
                })
                .collect(),
            probe_interval,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<AccountRuntime>> {
        self.by_name.get(name)
    }

    pub fn paused_count(&self) -> usize {
        self.by_name.values().filter(|a| a.is_paused()).count()
    }

    pub fn probe_interval(&self) -> Duration {
        self.probe_interval
    }
}

impl AccountRuntime {
    pub fn marketing_footer(&self) -> Option<Arc<str>> {
        self.footer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_marketing_footer(&self, footer: Option<&str>) {
        *self.footer.write().unwrap_or_else(|e| e.into_inner()) = footer.map(Arc::from);
    }

    pub fn token(&self) -> Secret {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_paused(&self) -> bool {
        self.pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub fn admit(&self, probe_interval: Duration) -> Admit {
        let mut p = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pause) = p.as_mut() else {
            return Admit::Go;
        };
        let now = Instant::now();
        if pause.probing || now < pause.next_probe {
            let wait = pause.next_probe.saturating_duration_since(now);
            return Admit::Wait(wait.max(probe_interval / 2));
        }
        // Time to probe: pick up a rotated token first.
        if let Ok(t) = read_secret(&self.config.token_path) {
            let changed = t.expose() != self.token().expose();
            if changed {
                *self.token.write().unwrap_or_else(|e| e.into_inner()) = t;
                tracing::info!(account = %self.config.name, "Token file changed; probing the paused account with the new token.");
            }
        }
        pause.probing = true;
        Admit::Probe
    }

    /// The Cloud API said this account cannot send. Returns true if this paused it (first time).
    pub fn pause(&self, reason: &str, probe_interval: Duration) -> bool {
        let mut p = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        let first = p.is_none();
        *p = Some(Pause {
            reason: reason.to_string(),
            next_probe: Instant::now() + probe_interval,
            probing: false,
        });
        if first {
            crate::metrics::account_paused(&self.config.name, reason);
        }
        first
    }

    /// A send succeeded: whatever paused the account is fixed.
    pub fn resume(&self) {
        let mut p = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = p.take() {
            crate::metrics::account_resumed(&self.config.name, &old.reason);
        }
    }

    /// A probe ended without telling anything about the account (e.g. a permanent error about
    /// the message itself): let the next job probe.
    pub fn probe_inconclusive(&self) {
        let mut p = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pause) = p.as_mut() {
            pause.probing = false;
        }
    }
}
