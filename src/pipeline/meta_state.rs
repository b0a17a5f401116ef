//! What Meta told us through webhooks that decides whether a job may go now: when each customer
//! last wrote (the 24-hour customer-service window), which templates are paused, which accounts
//! are restricted from business-initiated messaging. Kept in memory for the hot path, written
//! through to the store so a restart forgets none of it.

use std::collections::HashMap;
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
    templates: RwLock<HashMap<String, Vec<(String, TemplateState)>>>,
    /// account → unix ms until which business-initiated messages are restricted.
    restrictions: RwLock<HashMap<String, i64>>,
}

/// Meta writes languages as `en-US` in webhooks and `en_US` in sends.
fn template_key(name: &str, language: &str) -> String {
    format!("{name}|{}", language.to_ascii_lowercase().replace('-', "_"))
}

impl MetaState {
    /// Loads the persisted state; customer-service windows older than `window` are dropped.
    pub async fn load(ledger: Ledger) -> Result<Arc<MetaState>, LedgerError> {
        let mut inbound = HashMap::new();
        for (k, v) in ledger.kv_scan(Table::Inbound).await? {
            if let (Ok(k), Ok(v)) = (String::from_utf8(k), v.as_slice().try_into()) {
                inbound.insert(k, i64::from_le_bytes(v));
            }
        }
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
        let mut restrictions = HashMap::new();
        for (k, v) in ledger.kv_scan(Table::Restrictions).await? {
            if let (Ok(k), Ok(v)) = (String::from_utf8(k), v.as_slice().try_into()) {
                restrictions.insert(k, i64::from_le_bytes(v));
            }
        }
        Ok(Arc::new(MetaState {
            ledger,
            inbound: Mutex::new(inbound),
            templates: RwLock::new(templates),
            restrictions: RwLock::new(restrictions),
        }))
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

#[cfg(test)]
mod tests {
    use super::*;

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
