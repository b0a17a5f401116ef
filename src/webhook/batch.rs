//! Status batches: many delivery statuses in one broker message, straight to the shard that
//! sent their messages.
//!
//! Meta calls back three times for every message (`sent`, `delivered`, `read`). One broker
//! message per status made the callbacks cost the broker three times what the job itself did
//! (see docs/performance.md). A send therefore tells Meta which shard sent it: the job id in
//! `biz_opaque_callback_data` is followed by [`super::opaque::SHARD_MARK`] and the shard number, and Meta echoes
//! it in every status of the message. The listener gathers such statuses (`sent`, `delivered`,
//! `read`; a `failed` one may carry an opt-out and goes through the number's lane, like inbound
//! messages) and publishes those of one shard, [`MAX_EVENTS`] to a message, to `sendwell.statuses` with the
//! shard as routing key, where that shard's queue is bound.
//! The shard's consumer puts each status in its number's lane, behind the job it reports on
//! (still in flight there, or finished), and acks the message once every status in it is
//! applied. A status without the mark (an older build's send, a test's fixture) goes the old
//! way: its own message through `sendwell.jobs`, routed by the customer's number. A batch for a
//! shard whose queue is gone (a shard removed on PostgreSQL, whose jobs are all finished) goes
//! on to a live shard through the exchange's alternate, `sendwell.jobs`.
//!
//! The batch body is a JSON array of the events exactly as they would be published one by
//! one, so an event's identity (the hash of its bytes) is the same either way.

use serde_json::value::RawValue;

use super::parse::Event;

/// Header value of `x-sendwell-kind` for a batch of status events.
pub const KIND_STATUS_BATCH: &str = "status_batch";

/// Statuses in one broker message at most. Prefetch counts messages, so the consumer holds up
/// to prefetch × this many statuses in memory (a backlog after a restart): 16 keeps that within
/// a few times what one event per message held, and still cuts the broker's messages 16-fold
/// when Meta posts many statuses at once.
pub const MAX_EVENTS: usize = 16;

/// One batch's body: a JSON array of the events as published one by one.
pub fn encode(events: &[&Event]) -> Vec<u8> {
    let mut body = Vec::with_capacity(events.len() * 400 + 2);
    body.push(b'[');
    for (i, ev) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        // Invariant: an Event (strings, numbers, raw JSON) always serializes.
        let _ = serde_json::to_writer(&mut body, ev);
    }
    body.push(b']');
    body
}

/// A batch's events, each with the exact bytes it would have had as a message of its own; an
/// error says what is wrong. Only what the listener batches is taken: a customer's `sent`,
/// `delivered` or `read` status, at most [`MAX_EVENTS`] (anything else, say an opt-out, must
/// go through the number's own shard).
pub fn decode(body: &[u8]) -> Result<Vec<(Event, Vec<u8>)>, String> {
    #[derive(serde::Deserialize)]
    struct StatusOnly {
        status: String,
    }
    let raws: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if raws.is_empty() || raws.len() > MAX_EVENTS {
        return Err(format!(
            "a batch holds 1 to {MAX_EVENTS} events, not {}",
            raws.len()
        ));
    }
    raws.into_iter()
        .map(|raw| {
            let event: Event = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
            let status = serde_json::from_str::<StatusOnly>(event.item.get())
                .map(|s| s.status)
                .unwrap_or_default();
            if event.kind != super::parse::EventKind::Status
                || event.recipient.is_none()
                || !super::parse::batchable(&status)
            {
                return Err(format!(
                    "a batch holds only a customer's sent, delivered and read statuses, not {:?} {status:?}",
                    event.kind
                ));
            }
            Ok((event, raw.get().as_bytes().to_vec()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_only_a_customers_delivery_statuses() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[
          {"field":"messages","value":{"metadata":{"phone_number_id":"9"},
           "statuses":[{"id":"w1","status":"failed","recipient_id":"491701234567"}],
           "messages":[{"from":"491701234569","id":"w3","type":"text","text":{"body":"STOP"}}]}},
          {"field":"message_template_status_update","value":{"event":"PAUSED"}}]}]}"#;
        let events = super::super::parse::split(body).unwrap();
        for ev in &events {
            let err = decode(&encode(&[ev])).unwrap_err();
            assert!(err.contains("only a customer's"), "{err}");
        }
        assert!(decode(b"[]").is_err());
        let status = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[
          {"field":"messages","value":{"statuses":[{"id":"w1","status":"read","recipient_id":"491701234567"}]}}]}]}"#;
        let one = super::super::parse::split(status).unwrap();
        let too_many: Vec<&Event> = std::iter::repeat_n(&one[0], MAX_EVENTS + 1).collect();
        assert!(decode(&encode(&too_many)).is_err());
        assert_eq!(
            decode(&encode(&too_many[..MAX_EVENTS])).unwrap().len(),
            MAX_EVENTS
        );
    }

    #[test]
    fn a_batch_keeps_each_events_bytes() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[
          {"field":"messages","value":{"metadata":{"phone_number_id":"9"},
           "statuses":[{"id":"w1","status":"sent","timestamp":"1","recipient_id":"491701234567"},
                       {"id":"w2","status":"read","timestamp":"2","recipient_id":"491701234568"}]}}]}]}"#;
        let events = super::super::parse::split(body).unwrap();
        let refs: Vec<&Event> = events.iter().collect();
        let decoded = decode(&encode(&refs)).unwrap();
        assert_eq!(decoded.len(), 2);
        for (ev, (back, bytes)) in events.iter().zip(&decoded) {
            assert_eq!(bytes, &serde_json::to_vec(ev).unwrap());
            assert_eq!(back.item.get(), ev.item.get());
            assert_eq!(back.recipient, ev.recipient);
        }
    }
}
