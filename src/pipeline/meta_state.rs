//! What Meta told us through webhooks that decides whether a job may go now: when each customer
//! last wrote (the 24-hour customer-service window), which templates are paused, which accounts
//! are restricted from business-initiated messaging. Kept in memory for the hot path, written
//! through to the store so a restart forgets none of it.
//!
//! Several instances on one PostgreSQL state: templates and restrictions (small, account-wide)
//! are read again at takeover ([`MetaState::reload`]); a recipient's service windows are read
//! through at its first job in an epoch ([`MetaState::read_windows`], see
//! `pipeline::limits::epoch`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use crate::store::{Ledger, LedgerError, Table};

/// A template's state as its last status webhook said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateState {
    /// Meta's event: PAUSED, DISABLED, REJECTED, APPROVED…
    pub status: String,
    /// Unix ms of the webhook's processing, when the current status began.
    pub since_ms: i64,
}

impl TemplateState {
    /// Whether jobs using the template must wait.
    pub fn blocks(&self) -> bool {
        matches!(
            self.status.as_str(),
            "PAUSED"
                | "DISABLED"
                | "REJECTED"
                | "DELETED"
                | "PENDING_DELETION"
                | "LOCKED"
                | "ARCHIVED"
        )
    }
}

pub struct MetaState {
    ledger: Ledger,
    /// `account|digits` → unix ms of the customer's last message.
    inbound: Mutex<HashMap<String, i64>>,
    /// `name|language` → (WABA id, state); one template name can exist in several WABAs.
    /// Replaced whole by [`MetaState::reload`].
    templates: RwLock<HashMap<String, Vec<(String, TemplateState)>>>,
    /// account → unix ms until which business-initiated messages are restricted.
    restrictions: RwLock<HashMap<String, i64>>,
}

/// Meta writes languages as `en-US` in webhooks and `en_US` in sends.
fn template_key(name: &str, language: &str) -> String {
    format!("{name}|{}", language.to_ascii_lowercase().replace('-', "_"))
}

impl MetaState {
    /// Loads the persisted state.
    pub async fn load(ledger: Ledger) -> Result<Arc<MetaState>, LedgerError> {
        let mut inbound = HashMap::new();
        for (k, v) in ledger.kv_scan(Table::Inbound).await? {
            if let (Ok(k), Ok(v)) = (String::from_utf8(k), v.as_slice().try_into()) {
                inbound.insert(k, i64::from_le_bytes(v));
            }
        }
        let templates = read_templates(&ledger).await?;
        let restrictions = read_restrictions(&ledger).await?;
        Ok(Arc::new(MetaState {
            ledger,
            inbound: Mutex::new(inbound),
            templates: RwLock::new(templates),
            restrictions: RwLock::new(restrictions),
        }))
    }

    /// Reads templates and restrictions again (at takeover: another instance applied Meta's
    /// webhooks since this one started; the tables are small and account-wide). A template's
    /// state takes the newer of memory's and the store's (a webhook this instance is applying
    /// right now may not be stored yet); restrictions are the store's. Service windows are per
    /// recipient: [`Self::read_windows`].
    pub async fn reload(&self) -> Result<(), LedgerError> {
        let stored = read_templates(&self.ledger).await?;
        let restrictions = read_restrictions(&self.ledger).await?;
        {
            let mut t = self.templates.write().unwrap_or_else(|e| e.into_inner());
            for (tkey, states) in stored {
                let known = t.entry(tkey).or_default();
                for (waba, state) in states {
                    match known.iter_mut().find(|(w, _)| *w == waba) {
                        Some((_, s)) if s.since_ms > state.since_ms => {}
                        Some((_, s)) => *s = state,
                        None => known.push((waba, state)),
                    }
                }
            }
        }
        *self.restrictions.write().unwrap_or_else(|e| e.into_inner()) = restrictions;
        Ok(())
    }

    /// Reads the recipients' service windows with `accounts` from the store (one read for all)
    /// and merges them into memory: the later message wins, so one this instance applied
    /// meanwhile stays. Returns the windows merged.
    pub async fn read_windows<'a>(
        &self,
        accounts: impl Iterator<Item = &'a str>,
        digits: &[String],
    ) -> Result<usize, LedgerError> {
        let keys: HashSet<Vec<u8>> = accounts
            .flat_map(|a| digits.iter().map(move |d| format!("{a}|{d}").into_bytes()))
            .collect();
        let prefixes: Vec<Vec<u8>> = keys.iter().cloned().collect();
        let rows = self
            .ledger
            .kv_scan_prefixes(Table::Inbound, &prefixes)
            .await?;
        let mut m = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        let mut merged = 0;
        for (k, v) in rows {
            // A prefix read: a longer number that starts with these digits comes too.
            if !keys.contains(&k) {
                continue;
            }
            let (Ok(k), Ok(v)) = (String::from_utf8(k), <[u8; 8]>::try_from(v.as_slice())) else {
                continue;
            };
            let at = i64::from_le_bytes(v);
            let e = m.entry(k).or_insert(at);
            *e = (*e).max(at);
            merged += 1;
        }
        Ok(merged)
    }

    pub fn last_inbound_ms(&self, account: &str, digits: &str) -> Option<i64> {
        self.inbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&format!("{account}|{digits}"))
            .copied()
    }

    pub async fn record_inbound(
        &self,
        account: &str,
        digits: &str,
        at_ms: i64,
    ) -> Result<(), LedgerError> {
        let key = format!("{account}|{digits}");
        {
            let mut m = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
            let e = m.entry(key.clone()).or_insert(at_ms);
            *e = (*e).max(at_ms);
        }
        self.ledger
            .kv_put(
                Table::Inbound,
                key.into_bytes(),
                at_ms.to_le_bytes().to_vec(),
            )
            .await
    }

    /// Forgets a number's customer-service windows opened at or before `until_ms`, in memory
    /// (erasure removes the rows).
    pub fn forget_inbound(&self, digits: &str, until_ms: i64) {
        let suffix = format!("|{digits}");
        self.inbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, at| !(k.ends_with(&suffix) && *at <= until_ms));
    }

    /// The blocking state of a template for an account of `waba_id` (None: any WABA).
    pub fn template_block(
        &self,
        waba_id: Option<&str>,
        name: &str,
        language: &str,
    ) -> Option<TemplateState> {
        let t = self.templates.read().unwrap_or_else(|e| e.into_inner());
        t.get(&template_key(name, language))?
            .iter()
            .find(|(w, s)| s.blocks() && waba_id.is_none_or(|id| id == w))
            .map(|(_, s)| s.clone())
    }

    pub async fn set_template(
        &self,
        waba_id: &str,
        name: &str,
        language: &str,
        status: &str,
        at_ms: i64,
    ) -> Result<(), LedgerError> {
        let tkey = template_key(name, language);
        let state = TemplateState {
            status: status.to_string(),
            since_ms: at_ms,
        };
        {
            let mut t = self.templates.write().unwrap_or_else(|e| e.into_inner());
            let v = t.entry(tkey.clone()).or_default();
            v.retain(|(w, _)| w != waba_id);
            v.push((waba_id.to_string(), state));
        }
        self.ledger
            .kv_put(
                Table::Templates,
                format!("{waba_id}|{tkey}").into_bytes(),
                format!("{status}|{at_ms}").into_bytes(),
            )
            .await
    }

    pub fn restricted_until_ms(&self, account: &str) -> Option<i64> {
        self.restrictions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(account)
            .copied()
    }

    pub async fn restrict(&self, account: &str, until_ms: i64) -> Result<(), LedgerError> {
        self.restrictions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(account.to_string(), until_ms);
        self.ledger
            .kv_put(
                Table::Restrictions,
                account.as_bytes().to_vec(),
                until_ms.to_le_bytes().to_vec(),
            )
            .await
    }
}

/// Every template's state, `name|language` → (WABA id, state).
async fn read_templates(
    ledger: &Ledger,
) -> Result<HashMap<String, Vec<(String, TemplateState)>>, LedgerError> {
    let mut templates: HashMap<String, Vec<(String, TemplateState)>> = HashMap::new();
    for (k, v) in ledger.kv_scan(Table::Templates).await? {
        let (Ok(k), Ok(v)) = (String::from_utf8(k), String::from_utf8(v)) else {
            continue;
        };
        // key: waba|name|lang ; value: status|since_ms
        let mut kp = k.splitn(2, '|');
        let (Some(waba), Some(tkey)) = (kp.next(), kp.next()) else {
            continue;
        };
        let mut vp = v.splitn(2, '|');
        let (Some(status), Some(since)) = (vp.next(), vp.next().and_then(|s| s.parse().ok()))
        else {
            continue;
        };
        templates.entry(tkey.to_string()).or_default().push((
            waba.to_string(),
            TemplateState {
                status: status.to_string(),
                since_ms: since,
            },
        ));
    }
    Ok(templates)
}

/// Every account's restriction, account → until (Unix ms).
async fn read_restrictions(ledger: &Ledger) -> Result<HashMap<String, i64>, LedgerError> {
    let mut restrictions = HashMap::new();
    for (k, v) in ledger.kv_scan(Table::Restrictions).await? {
        if let (Ok(k), Ok(v)) = (String::from_utf8(k), v.as_slice().try_into()) {
            restrictions.insert(k, i64::from_le_bytes(v));
        }
    }
    Ok(restrictions)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two instances on one store: what one applied reaches the other when it reads the
    /// recipient through (service windows: the later wins) or takes over (templates and
    /// restrictions: read again whole).
    #[tokio::test]
    async fn another_instances_windows_templates_and_restrictions_are_read_again() {
        let l = Ledger::open_in_memory().unwrap();
        let active = MetaState::load(l.clone()).await.unwrap();
        let standby = MetaState::load(l.clone()).await.unwrap();
        active.record_inbound("acme", "4917", 10).await.unwrap();
        active.record_inbound("acme", "4918", 30).await.unwrap();
        active.record_inbound("other", "4917", 11).await.unwrap();
        // A longer number that starts with the same digits is another customer.
        active.record_inbound("acme", "49170", 12).await.unwrap();
        active
            .set_template("w1", "spring_sale", "de", "PAUSED", 5)
            .await
            .unwrap();
        active.restrict("acme", 99).await.unwrap();
        standby.record_inbound("acme", "4918", 40).await.unwrap();
        assert_eq!(standby.last_inbound_ms("acme", "4917"), None);

        let digits = ["4917".to_string(), "4918".to_string()];
        let merged = standby
            .read_windows(["acme", "other"].into_iter(), &digits)
            .await
            .unwrap();
        assert_eq!(merged, 3);
        assert_eq!(standby.last_inbound_ms("acme", "4917"), Some(10));
        assert_eq!(standby.last_inbound_ms("other", "4917"), Some(11));
        assert_eq!(
            standby.last_inbound_ms("acme", "4918"),
            Some(40),
            "its own is later"
        );
        assert_eq!(standby.last_inbound_ms("acme", "49170"), None);

        assert!(
            standby
                .template_block(Some("w1"), "spring_sale", "de")
                .is_none()
        );
        assert_eq!(standby.restricted_until_ms("acme"), None);
        standby.reload().await.unwrap();
        assert!(
            standby
                .template_block(Some("w1"), "spring_sale", "de")
                .is_some()
        );
        assert_eq!(standby.restricted_until_ms("acme"), Some(99));
        // A template approved meanwhile no longer blocks; a status this instance applied
        // after the stored one stays.
        active
            .set_template("w1", "spring_sale", "de", "APPROVED", 6)
            .await
            .unwrap();
        active
            .set_template("w2", "spring_sale", "de", "PAUSED", 6)
            .await
            .unwrap();
        standby
            .set_template("w2", "spring_sale", "de", "APPROVED", 7)
            .await
            .unwrap();
        standby.reload().await.unwrap();
        assert!(
            standby
                .template_block(Some("w1"), "spring_sale", "de")
                .is_none()
        );
        assert!(
            standby
                .template_block(Some("w2"), "spring_sale", "de")
                .is_none()
        );
    }

    #[tokio::test]
    async fn state_survives_a_restart_and_languages_match_across_spellings() {
        let d = tempfile::tempdir().unwrap();
        {
            let l = Ledger::open(d.path()).unwrap();
            let m = MetaState::load(l).await.unwrap();
            m.set_template("w1", "spring_sale", "en-US", "PAUSED", 5)
                .await
                .unwrap();
            m.record_inbound("acme", "4917", 7).await.unwrap();
            m.restrict("acme", 99).await.unwrap();
        }
        let l = loop {
            match Ledger::open(d.path()) {
                Ok(l) => break l,
                Err(_) => tokio::task::yield_now().await,
            }
        };
        let m = MetaState::load(l).await.unwrap();
        assert_eq!(
            m.template_block(Some("w1"), "spring_sale", "en_US")
                .unwrap()
                .since_ms,
            5
        );
        assert!(
            m.template_block(Some("w2"), "spring_sale", "en_US")
                .is_none()
        );
        assert!(m.template_block(None, "spring_sale", "en_us").is_some());
        assert_eq!(m.last_inbound_ms("acme", "4917"), Some(7));
        assert_eq!(m.restricted_until_ms("acme"), Some(99));
        m.set_template("w1", "spring_sale", "en_US", "APPROVED", 9)
            .await
            .unwrap();
        assert!(
            m.template_block(Some("w1"), "spring_sale", "en-US")
                .is_none()
        );
    }
}
