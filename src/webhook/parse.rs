//! Splits a verified Cloud API callback into events, one per thing that happened: a status, an
//! inbound message, a user preference, or an account-level change. Each event keeps the exact
//! bytes Meta sent for its item, so a repeated callback yields byte-identical events (the key
//! that makes applying them idempotent).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// What an event is about; decides where it is routed and how it is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// `messages` → `statuses[]`: sent, delivered, read, failed.
    Status,
    /// `messages` → `messages[]`: something the customer sent.
    Message,
    /// `user_preferences` → one entry: marketing stop/resume.
    UserPreference,
    /// `messages` → `errors[]`: system or account-level errors.
    Error,
    /// Any other field (template status/quality, capability, phone quality, account update…).
    Change,
}

/// One event, as published to the broker between the listener and the processing shard.
#[derive(Debug, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// The subscription field (`messages`, `message_template_status_update`, …).
    pub field: String,
    /// `entry[].id`: the WhatsApp Business Account.
    pub waba_id: String,
    /// `value.metadata.phone_number_id`, when the field has one: which sender account.
    #[serde(default)]
    pub phone_number_id: Option<String>,
    /// The customer (digits) for recipient events; routes to the recipient's shard. `split`
    /// sets the WhatsApp ID Meta sent; the listener replaces it with the number it resolves to.
    #[serde(default)]
    pub recipient: Option<String>,
    /// `entry[].time`: part of the event's identity, so that a template paused, approved and
    /// paused again with the same `value` is two pauses, while Meta's retry of one callback
    /// (same time, same bytes) is one.
    #[serde(default)]
    pub entry_time: Option<i64>,
    /// Exactly what Meta sent for this item (the whole `value` for a `Change`).
    pub item: Box<RawValue>,
    /// The shard that sent the message a `sent`, `delivered` or `read` status reports on, from
    /// its `biz_opaque_callback_data`: the listener batches such statuses to that shard (see
    /// [`super::batch`]). Not published: an event's bytes are its identity.
    #[serde(skip)]
    pub shard: Option<u16>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    object: String,
    #[serde(borrow, default)]
    entry: Vec<Entry<'a>>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    id: serde_json::Value,
    #[serde(default)]
    time: Option<i64>,
    #[serde(borrow, default)]
    changes: Vec<Change<'a>>,
}

#[derive(Deserialize)]
struct Change<'a> {
    field: String,
    #[serde(borrow)]
    value: &'a RawValue,
}

#[derive(Deserialize)]
struct MessagesValue<'a> {
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(borrow, default)]
    statuses: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    errors: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct PreferencesValue<'a> {
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(borrow, default)]
    user_preferences: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    phone_number_id: Option<String>,
}

#[derive(Deserialize)]
struct StatusKey {
    recipient_id: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    biz_opaque_callback_data: Option<String>,
}

#[derive(Deserialize)]
struct MessageKey {
    from: String,
}

#[derive(Deserialize)]
struct PreferenceKey {
    wa_id: String,
}

/// Splits a callback body; an error names what is wrong (the listener answers 400).
pub fn split(body: &[u8]) -> Result<Vec<Event>, String> {
    let env: Envelope = serde_json::from_slice(body).map_err(|e| format!("not a callback: {e}"))?;
    if env.object != "whatsapp_business_account" {
        return Err(format!(
            "object is {:?}, not whatsapp_business_account",
            env.object
        ));
    }
    let mut events = Vec::new();
    for entry in env.entry {
        let waba_id = match &entry.id {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return Err("entry.id is not an id".into()),
        };
        for change in entry.changes {
            let raw = |v: &RawValue| v.to_owned();
            match change.field.as_str() {
                "messages" => {
                    let v: MessagesValue = serde_json::from_str(change.value.get())
                        .map_err(|e| format!("messages value: {e}"))?;
                    let pnid = v.metadata.and_then(|m| m.phone_number_id);
                    for s in v.statuses {
                        let k: StatusKey =
                            serde_json::from_str(s.get()).map_err(|e| format!("status: {e}"))?;
                        events.push(Event {
                            kind: EventKind::Status,
                            field: change.field.clone(),
                            waba_id: waba_id.clone(),
                            phone_number_id: pnid.clone(),
                            recipient: Some(digits(&k.recipient_id)?),
                            entry_time: entry.time,
                            item: raw(s),
                            shard: k
                                .biz_opaque_callback_data
                                .as_deref()
                                .filter(|_| batchable(&k.status))
                                .and_then(|d| super::opaque::read_callback_data(d).1),
                        });
                    }
                    for m in v.messages {
                        let k: MessageKey =
                            serde_json::from_str(m.get()).map_err(|e| format!("message: {e}"))?;
                        events.push(Event {
                            kind: EventKind::Message,
                            field: change.field.clone(),
                            waba_id: waba_id.clone(),
                            phone_number_id: pnid.clone(),
                            recipient: Some(digits(&k.from)?),
                            entry_time: entry.time,
                            item: raw(m),
                            shard: None,
                        });
                    }
                    for e in v.errors {
                        events.push(Event {
                            kind: EventKind::Error,
                            field: change.field.clone(),
                            waba_id: waba_id.clone(),
                            phone_number_id: pnid.clone(),
                            recipient: None,
                            entry_time: entry.time,
                            item: raw(e),
                            shard: None,
                        });
                    }
                }
                "user_preferences" => {
                    let v: PreferencesValue = serde_json::from_str(change.value.get())
                        .map_err(|e| format!("user_preferences value: {e}"))?;
                    let pnid = v.metadata.and_then(|m| m.phone_number_id);
                    for p in v.user_preferences {
                        let k: PreferenceKey = serde_json::from_str(p.get())
                            .map_err(|e| format!("user preference: {e}"))?;
                        events.push(Event {
                            kind: EventKind::UserPreference,
                            field: change.field.clone(),
                            waba_id: waba_id.clone(),
                            phone_number_id: pnid.clone(),
                            recipient: Some(digits(&k.wa_id)?),
                            entry_time: entry.time,
                            item: raw(p),
                            shard: None,
                        });
                    }
                }
                _ => events.push(Event {
                    kind: EventKind::Change,
                    field: change.field.clone(),
                    waba_id: waba_id.clone(),
                    phone_number_id: None,
                    recipient: None,
                    entry_time: entry.time,
                    item: raw(change.value),
                    shard: None,
                }),
            }
        }
    }
    Ok(events)
}

/// Whether a status goes in a batch (see [`super::batch`]): only the delivery statuses that
/// change nothing but their message's delivery row. `failed` may carry 131050 (an opt-out) or
/// 131049, which must be applied in the number's lane on the shard that owns the number now.
pub fn batchable(status: &str) -> bool {
    matches!(status, "sent" | "delivered" | "read")
}

/// A customer's number as digits (Meta sends `16505551234`; some payloads add a `+`).
fn digits(s: &str) -> Result<String, String> {
    let d = s.trim_start_matches('+');
    if d.is_empty() || d.len() > 20 || !d.bytes().all(|b| b.is_ascii_digit()) {
        return Err("a recipient is not a phone number".into());
    }
    Ok(d.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_splits_into_one_event_per_item() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[
          {"field":"messages","value":{"messaging_product":"whatsapp","metadata":{"phone_number_id":"9"},
           "statuses":[{"id":"w1","status":"sent","timestamp":"1","recipient_id":"491701234567"},
                       {"id":"w2","status":"read","timestamp":"2","recipient_id":"491701234568"}],
           "messages":[{"from":"491701234569","id":"w3","timestamp":"3","type":"text","text":{"body":"STOP"}}]}},
          {"field":"message_template_status_update","value":{"event":"PAUSED","message_template_name":"x"}}]}]}"#;
        let ev = split(body).unwrap();
        assert_eq!(ev.len(), 4);
        assert_eq!(ev[0].kind, EventKind::Status);
        assert_eq!(ev[0].recipient.as_deref(), Some("491701234567"));
        assert_eq!(ev[0].phone_number_id.as_deref(), Some("9"));
        assert_eq!(ev[2].kind, EventKind::Message);
        assert_eq!(ev[3].kind, EventKind::Change);
        assert_eq!(ev[3].field, "message_template_status_update");
        // Items keep Meta's exact bytes.
        assert_eq!(
            ev[1].item.get(),
            r#"{"id":"w2","status":"read","timestamp":"2","recipient_id":"491701234568"}"#
        );
    }

    #[test]
    fn only_delivery_statuses_that_name_their_shard_are_batched() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[
          {"field":"messages","value":{"metadata":{"phone_number_id":"9"},
           "statuses":[{"id":"w1","status":"sent","recipient_id":"491701234567","biz_opaque_callback_data":"j1\u001f3"},
                       {"id":"w1","status":"delivered","recipient_id":"491701234567","biz_opaque_callback_data":"j1\u001f3"},
                       {"id":"w1","status":"read","recipient_id":"491701234567","biz_opaque_callback_data":"j1\u001f3"},
                       {"id":"w1","status":"failed","recipient_id":"491701234567","biz_opaque_callback_data":"j1\u001f3"},
                       {"id":"w2","status":"read","recipient_id":"491701234568","biz_opaque_callback_data":"j2"},
                       {"id":"w3","status":"read","recipient_id":"491701234569"}]}}]}]}"#;
        let shards: Vec<Option<u16>> = split(body).unwrap().iter().map(|e| e.shard).collect();
        // `failed` may be an opt-out (131050): it goes to the number's shard, in its lane.
        assert_eq!(shards, [Some(3), Some(3), Some(3), None, None, None]);
        // The shard is not part of the event's bytes (its identity).
        let ev = &split(body).unwrap()[0];
        assert!(
            !String::from_utf8(serde_json::to_vec(ev).unwrap())
                .unwrap()
                .contains("\"shard\"")
        );
    }

    #[test]
    fn malformed_callbacks_are_refused_with_a_reason() {
        assert!(split(b"{").is_err());
        assert!(split(br#"{"object":"page","entry":[]}"#).is_err());
        assert!(split(br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{"statuses":[{"id":"w"}]}}]}]}"#).is_err());
    }
}
