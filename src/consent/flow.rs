//! Consent learned in conversation: STOP and START keywords, Meta's opt-out button, and the
//! double opt-in sendwell runs itself ("are you sure?" → YES). Decides what a customer's
//! message means and what to send; the consumer applies the events and does the sending.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::event::{ConsentEvent, Kind};
use super::keywords::{Keywords, META_OPT_OUT_BUTTON_PAYLOADS, normalize};
use super::model::{CONFIRMED, OPTED_IN};
use super::store::{ConsentStore, number_account_key};
use crate::config::{AccountConsent, Config, DoubleOptInMessage};
use crate::phone::parse_e164;
use crate::store::{KvOp, LedgerError, Table};

/// A customer's message, parsed: what consent handling (STOP, YES/NO) works from. The flow
/// owns it and the webhook applier builds it: the dependency runs webhook → consent only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    pub account: Option<String>,
    /// `+` and digits.
    pub from: String,
    pub wamid: String,
    pub at: Timestamp,
    /// `text`, `button`, `interactive`, or another Meta type.
    pub kind: String,
    pub text: Option<String>,
    /// Quick-reply payload or interactive reply id.
    pub payload: Option<String>,
}

/// Reply ids of the interactive question's buttons (and payloads of a template's buttons).
pub const YES_ID: &str = "sendwell_optin_yes";
pub const NO_ID: &str = "sendwell_optin_no";

/// `source` of the events sendwell creates from conversation.
pub const SOURCE_KEYWORD: &str = "whatsapp_keyword";
pub const SOURCE_BUTTON: &str = "whatsapp_opt_out_button";
pub const SOURCE_REPLY: &str = "whatsapp_double_opt_in_reply";

struct AccountWords {
    out: Keywords,
    start: Keywords,
    yes: Keywords,
    no: Keywords,
    config: AccountConsent,
}

impl AccountWords {
    /// Whether a reload changes what this flow does (the footer and template lists are the
    /// pipeline's).
    fn differs(&self, other: &AccountWords) -> bool {
        let (a, b) = (&self.config, &other.config);
        a.opt_out_keywords != b.opt_out_keywords
            || a.opt_in_keywords != b.opt_in_keywords
            || a.yes_keywords != b.yes_keywords
            || a.no_keywords != b.no_keywords
            || a.opt_out_reply != b.opt_out_reply
            || a.start_purposes != b.start_purposes
            || format!("{:?}", a.double_opt_in) != format!("{:?}", b.double_opt_in)
    }
}

/// A double opt-in question asked and not yet answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub purposes: Vec<String>,
    pub asked_ms: i64,
    pub expires_ms: i64,
}

/// The newest opt-in a question was asked about (kept after the answer, so that a replay of
/// that opt-in never asks again; erased with the number). `asked_ms` lets erasure date it.
#[derive(Serialize, Deserialize)]
struct Asked {
    opt_in_ms: i64,
    asked_ms: i64,
}

/// `digits \0 account \0 asked`: beside the pending question, under the number's prefix.
fn asked_key(digits: &str, account: &str) -> Vec<u8> {
    let mut k = number_account_key(digits, account);
    k.extend_from_slice(b"\0asked");
    k
}

/// A message sendwell sends on its own account (the question, the STOP confirmation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub account: Arc<str>,
    /// `question` or `opt_out_reply`, for metrics.
    pub kind: &'static str,
    pub body: Vec<u8>,
}

pub struct ConsentFlow {
    pub store: Arc<ConsentStore>,
    /// Per account: keywords, replies, the double opt-in message. Swapped whole on SIGHUP
    /// ([`Self::reload`]); a message being handled keeps the words it started with.
    accounts: ArcSwap<HashMap<String, Arc<AccountWords>>>,
    confirm_within: Duration,
}

fn account_words(config: &Config) -> HashMap<String, Arc<AccountWords>> {
    config
        .accounts
        .iter()
        .map(|a| {
            let c = &a.consent;
            (
                a.name.to_string(),
                Arc::new(AccountWords {
                    out: Keywords::new(&c.opt_out_keywords),
                    start: Keywords::new(&c.opt_in_keywords),
                    yes: Keywords::new(&c.yes_keywords),
                    no: Keywords::new(&c.no_keywords),
                    config: c.clone(),
                }),
            )
        })
        .collect()
}

impl ConsentFlow {
    pub fn new(config: &Config, store: Arc<ConsentStore>) -> Self {
        Self {
            store,
            accounts: ArcSwap::from_pointee(account_words(config)),
            confirm_within: config.consent.confirm_within,
        }
    }

    /// SIGHUP: the accounts' keywords, opt-out replies, START purposes and double opt-in
    /// messages from a reloaded config; returns the accounts whose settings changed.
    pub fn reload(&self, config: &Config) -> Vec<String> {
        let old = self.accounts.load_full();
        let new = account_words(config);
        let changed = new
            .iter()
            .filter(|(name, w)| old.get(*name).is_none_or(|o| o.differs(w)))
            .map(|(name, _)| name.clone())
            .collect();
        self.accounts.store(Arc::new(new));
        changed
    }

    fn words(&self, account: &str) -> Option<Arc<AccountWords>> {
        self.accounts.load().get(account).cloned()
    }

    pub async fn pending(
        &self,
        digits: &str,
        account: &str,
    ) -> Result<Option<Pending>, LedgerError> {
        Ok(self
            .store
            .ledger
            .kv_get(Table::ConsentPending, &number_account_key(digits, account))
            .await?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// What a customer's message means for consent: the events it implies (applied and
    /// published by the caller). Keywords count only as the whole message.
    pub async fn on_inbound(&self, m: &InboundMessage) -> Result<Vec<ConsentEvent>, LedgerError> {
        let Some(account) = m.account.as_deref() else {
            return Ok(Vec::new());
        };
        let (Some(words), Ok(to)) = (self.words(account), parse_e164(&m.from)) else {
            return Ok(Vec::new());
        };
        let account: Arc<str> = account.into();
        let text = m.text.as_deref().unwrap_or("");
        let payload = m.payload.as_deref().unwrap_or("");
        let evidence = Some(if payload.is_empty() {
            text.to_string()
        } else {
            format!("{text} [{payload}]")
        });
        let digits = to.digits().to_string();
        let event = |kind, purposes: Vec<String>, source: &str, at: Timestamp| ConsentEvent {
            kind,
            account: account.clone(),
            to: to.clone(),
            purposes,
            source: Some(source.to_string()),
            at,
            evidence: evidence.clone(),
        };
        // Meta's "Stop promotions" quick reply arrives as a `button` message; payload and text
        // both repeat the label, so both are compared as keywords are.
        let button = m.kind == "button"
            && META_OPT_OUT_BUTTON_PAYLOADS.iter().any(|p| {
                let p = normalize(p);
                normalize(payload) == p || normalize(text) == p
            });
        // Dating. Meta's timestamps are whole seconds, too coarse to order a STOP against an
        // opt-in in the same second; when we first read the message is precise but can be late
        // (Meta retries webhooks for days). So each event is dated in its safe direction: an
        // opt-out at the later of the two (it outranks anything the customer did before), an
        // opt-in or confirmation no later than the end of the second it was sent in (a late
        // delivery cannot outrank an opt-out made since). The first reading is recorded, so a
        // redelivered webhook yields the same event, which changes nothing.
        let read = self.first_read(&m.wamid).await?;
        let sent_by = (m.at + Duration::from_millis(999)).min(read);
        if button || words.out.matches(text) {
            self.drop_pending(&digits, &account).await?;
            let source = if button {
                SOURCE_BUTTON
            } else {
                SOURCE_KEYWORD
            };
            return Ok(vec![event(
                Kind::OptOut,
                Vec::new(),
                source,
                m.at.max(read),
            )]);
        }
        let now = Timestamp::now().as_millisecond();
        if let Some(p) = self.pending(&digits, &account).await?
            && p.expires_ms > now
        {
            if payload == YES_ID || words.yes.matches(text) {
                crate::metrics::consent_question_answered(&account, "yes");
                // The answer cannot precede the question. The question stays open until the
                // confirmation is applied ([`Self::answered`]), so a failure in between loses
                // nothing: the redelivered YES finds it again.
                let at = Timestamp::from_millisecond(sent_by.as_millisecond().max(p.asked_ms + 1))
                    .unwrap_or(sent_by);
                return Ok(vec![event(Kind::Confirm, p.purposes, SOURCE_REPLY, at)]);
            }
            if payload == NO_ID || words.no.matches(text) {
                // NO leaves the opt-in unconfirmed, which is no consent for what needs it.
                self.drop_pending(&digits, &account).await?;
                crate::metrics::consent_question_answered(&account, "no");
                return Ok(Vec::new());
            }
        }
        if words.start.matches(text) {
            let purposes = match &words.config.start_purposes {
                Some(p) => p.clone(),
                None => self
                    .store
                    .summary(&digits, &account)
                    .await?
                    .into_keys()
                    .filter(|p| self.store.rule(p).is_some())
                    .collect(),
            };
            if !purposes.is_empty() {
                return Ok(vec![event(Kind::OptIn, purposes, SOURCE_KEYWORD, sent_by)]);
            }
        }
        Ok(Vec::new())
    }

    /// When this inbound message was first read (recorded under a hash of its wamid, which
    /// carries the number; purged with the webhook marks after retention).
    async fn first_read(&self, wamid: &str) -> Result<Timestamp, LedgerError> {
        use sha2::Digest;
        let mut key = b"read|".to_vec();
        key.extend_from_slice(&sha2::Sha256::digest(wamid.as_bytes())[..16]);
        let ledger = &self.store.ledger;
        let now = Timestamp::now();
        ledger
            .kv_insert_if_absent(
                Table::WebhookSeen,
                key.clone(),
                now.as_millisecond().to_le_bytes().to_vec(),
            )
            .await?;
        Ok(ledger
            .kv_get(Table::WebhookSeen, &key)
            .await?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .and_then(|b| Timestamp::from_millisecond(i64::from_le_bytes(b)).ok())
            .unwrap_or(now))
    }

    /// A confirmation from the customer's answer was applied: the question is closed.
    pub async fn answered(&self, ev: &ConsentEvent) -> Result<(), LedgerError> {
        if ev.kind == Kind::Confirm && ev.source.as_deref() == Some(SOURCE_REPLY) {
            self.drop_pending(ev.to.digits(), &ev.account).await?;
        }
        Ok(())
    }

    async fn drop_pending(&self, digits: &str, account: &str) -> Result<(), LedgerError> {
        self.store
            .ledger
            .kv_many(vec![KvOp::Delete {
                table: Table::ConsentPending,
                key: number_account_key(digits, account),
            }])
            .await
            .map(|_| ())
    }

    /// The confirmation reply to a STOP sent by keyword or button, if the account has one.
    pub fn opt_out_reply(&self, ev: &ConsentEvent) -> Option<Outgoing> {
        if ev.kind != Kind::OptOut
            || !matches!(ev.source.as_deref(), Some(SOURCE_KEYWORD | SOURCE_BUTTON))
        {
            return None;
        }
        let words = self.words(&ev.account)?;
        let text = words.config.opt_out_reply.as_ref()?;
        Some(Outgoing {
            account: ev.account.clone(),
            kind: "opt_out_reply",
            body: text_body(ev.to.as_str(), text),
        })
    }

    /// Whether an opt-in may need the question: the account asks, and a purpose of the
    /// event needs confirmation. No I/O: every instance calls it for every opt-in.
    pub fn wants_question(&self, ev: &ConsentEvent) -> bool {
        ev.kind == Kind::OptIn
            && self
                .words(&ev.account)
                .is_some_and(|w| w.config.double_opt_in.is_some())
            && ev.purposes.iter().any(|p| self.needs_confirmation(p))
    }

    fn needs_confirmation(&self, purpose: &str) -> bool {
        self.store
            .rule(purpose)
            .is_some_and(|r| r.categories.iter().any(|c| r.needs_confirmation(*c)))
    }

    /// The double opt-in question for an applied opt-in, recorded as pending; None when no
    /// purpose of it awaits confirmation or a question is already open.
    pub async fn question(&self, ev: &ConsentEvent) -> Result<Option<Outgoing>, LedgerError> {
        let Some(words) = self.words(&ev.account) else {
            return Ok(None);
        };
        let Some(question) = words.config.double_opt_in.as_ref() else {
            return Ok(None);
        };
        if ev.kind != Kind::OptIn {
            return Ok(None);
        }
        let digits = ev.to.digits();
        let summary = self.store.summary(digits, &ev.account).await?;
        let unconfirmed: Vec<String> = ev
            .purposes
            .iter()
            .filter(|p| {
                let st = summary.get(*p).map(|s| s.flags).unwrap_or(0);
                self.needs_confirmation(p) && st & OPTED_IN != 0 && st & CONFIRMED == 0
            })
            .cloned()
            .collect();
        if unconfirmed.is_empty() {
            return Ok(None);
        }
        let now = Timestamp::now().as_millisecond();
        let opt_in_ms = ev.at.as_millisecond();
        if opt_in_ms + (self.confirm_within.as_millis() as i64) < now {
            // An opt-in older than the answer window (a lagging instance's backlog, a replay
            // of old history): asking now would surprise the customer.
            return Ok(None);
        }
        if self
            .pending(digits, &ev.account)
            .await?
            .is_some_and(|p| p.expires_ms > now)
        {
            // Asked already; one question at a time.
            return Ok(None);
        }
        // One question per opt-in: after a NO, an expiry or a replay, only a newer opt-in (the
        // customer opting in again) is asked about.
        let marker = asked_key(digits, &ev.account);
        let asked_for = self
            .store
            .ledger
            .kv_get(Table::ConsentPending, &marker)
            .await?
            .and_then(|v| serde_json::from_slice::<Asked>(&v).ok());
        if asked_for.is_some_and(|a| a.opt_in_ms >= opt_in_ms) {
            return Ok(None);
        }
        let pending = Pending {
            purposes: unconfirmed,
            asked_ms: now,
            expires_ms: now + self.confirm_within.as_millis() as i64,
        };
        // Recorded before sending: a crash mid-send never asks twice.
        self.store
            .ledger
            .kv_many(vec![
                KvOp::Put {
                    table: Table::ConsentPending,
                    key: number_account_key(digits, &ev.account),
                    value: serde_json::to_vec(&pending).unwrap_or_default(),
                },
                KvOp::Put {
                    table: Table::ConsentPending,
                    key: marker,
                    value: serde_json::to_vec(&Asked {
                        opt_in_ms,
                        asked_ms: now,
                    })
                    .unwrap_or_default(),
                },
            ])
            .await?;
        Ok(Some(Outgoing {
            account: ev.account.clone(),
            kind: "question",
            body: question_body(ev.to.as_str(), question),
        }))
    }

    /// A question that could not be sent is forgotten, so the next opt-in asks again.
    pub async fn question_failed(&self, ev: &ConsentEvent) -> Result<(), LedgerError> {
        self.drop_pending(ev.to.digits(), &ev.account).await
    }
}

fn text_body(to: &str, text: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": { "body": text, "preview_url": false },
    }))
    .unwrap_or_default()
}

/// The "are you sure?" message: interactive reply buttons, or a template whose first two
/// quick-reply buttons carry our YES and NO payloads.
pub fn question_body(to: &str, q: &DoubleOptInMessage) -> Vec<u8> {
    let v = match q {
        DoubleOptInMessage::Interactive {
            text,
            yes_title,
            no_title,
        } => serde_json::json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "type": "interactive",
            "interactive": {
                "type": "button",
                "body": { "text": text },
                "action": { "buttons": [
                    { "type": "reply", "reply": { "id": YES_ID, "title": yes_title } },
                    { "type": "reply", "reply": { "id": NO_ID, "title": no_title } },
                ] },
            },
        }),
        DoubleOptInMessage::Template { name, language } => serde_json::json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "type": "template",
            "template": {
                "name": name,
                "language": { "code": language },
                "components": [
                    { "type": "button", "sub_type": "quick_reply", "index": "0",
                      "parameters": [{ "type": "payload", "payload": YES_ID }] },
                    { "type": "button", "sub_type": "quick_reply", "index": "1",
                      "parameters": [{ "type": "payload", "payload": NO_ID }] },
                ],
            },
        }),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_question_carries_our_yes_and_no_in_either_form() {
        let interactive = DoubleOptInMessage::Interactive {
            text: "Newsletter per WhatsApp?".into(),
            yes_title: "Ja, gerne".into(),
            no_title: "Nein".into(),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&question_body("+491701234567", &interactive)).unwrap();
        assert_eq!(v["type"], "interactive");
        assert_eq!(v["interactive"]["type"], "button");
        let buttons = v["interactive"]["action"]["buttons"].as_array().unwrap();
        let ids: Vec<&str> = buttons
            .iter()
            .map(|b| b["reply"]["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [YES_ID, NO_ID]);
        assert_eq!(buttons[0]["reply"]["title"], "Ja, gerne");

        let template = DoubleOptInMessage::Template {
            name: "optin_confirmation".into(),
            language: "de".into(),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&question_body("+491701234567", &template)).unwrap();
        assert_eq!(v["template"]["name"], "optin_confirmation");
        let payloads: Vec<(&str, &str)> = v["template"]["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                assert_eq!(c["sub_type"], "quick_reply");
                (
                    c["index"].as_str().unwrap(),
                    c["parameters"][0]["payload"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(payloads, [("0", YES_ID), ("1", NO_ID)]);
    }
}
