//! Webhooks back to the daemon: the status callbacks of every accepted send, and the one POST
//! (with Meta's retries) every callback goes through, inbound messages included.
//!
//! With a `webhook_url`, the sandbox calls back like Meta does, so the whole loop runs locally.
//! Every accepted send gets its own task that POSTs, one envelope each and `status_delay` apart
//! (the first `status_delay` after the answer): `sent` (with `pricing`, without `conversation`,
//! as from v24.0), `delivered` (with `pricing`), and, with probability `read_rate`, `read`. A
//! matching [`AsyncFailure`] turns that into `sent` then `failed` (with `errors`). Each body is
//! signed `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(app_secret, body)>` when an app secret is
//! set. An answer other than 200, or no answer, is retried after 100 ms, doubling, up to 10 tries
//! in all (Meta keeps retrying for days; a test wants an end).
//! [`SandboxHandle::send_inbound`](super::SandboxHandle::send_inbound) and
//! `POST /_sandbox/inbound` deliver a customer's message the same way. Every callback and its
//! final answer is kept in [`SandboxHandle::callbacks`](super::SandboxHandle::callbacks).
//! Callbacks never delay a `/messages` answer: the task is spawned when the send is decided, so
//! even a send whose answer the client never reads gets its callbacks, as with Meta.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::header;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use super::error::known_details;
use super::state::{
    AsyncFailure, CallbackKind, CallbackRecord, DueStatus, Shared, WebhookTarget, unix_ms,
    unix_secs_string,
};

/// Tries per callback, the first included, before it is given up.
const CALLBACK_TRIES: u32 = 10;
/// Wait before the first retry of a callback; doubled before each further one.
const CALLBACK_FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// `errors[].href` in failed statuses, as in Meta's examples.
const ERROR_CODES_HREF: &str = "/documentation/business-messaging/whatsapp/support/error-codes";

/// What the status callbacks of one accepted send need.
pub(super) struct StatusRun {
    /// From the send's URL: `metadata.phone_number_id`.
    pub(super) phone_number_id: String,
    pub(super) wamid: String,
    /// `recipient_id`: the WhatsApp ID (the digits of `to`, or its legacy ID).
    pub(super) wa_id: String,
    pub(super) callback_data: Option<String>,
    /// The `pricing` object for `sent` and `delivered`.
    pub(super) pricing: Value,
    /// Set: `sent` then `failed` with this error.
    pub(super) failure: Option<AsyncFailure>,
    /// Whether a `read` follows `delivered`.
    pub(super) read: bool,
}

impl Shared {
    /// The status callbacks of one accepted send, in order, `status_delay` apart; the first
    /// after `first_wait` (the answer's latency plus `status_delay`).
    pub(super) async fn run_status_callbacks(
        self: Arc<Self>,
        run: StatusRun,
        first_wait: Duration,
    ) {
        let statuses: &[&str] = match (&run.failure, run.read) {
            (Some(_), _) => &["sent", "failed"],
            (None, true) => &["sent", "delivered", "read"],
            (None, false) => &["sent", "delivered"],
        };
        for (i, &status) in statuses.iter().enumerate() {
            tokio::time::sleep(if i == 0 {
                first_wait
            } else {
                self.status_delay
            })
            .await;
            // Read each time: set_webhook(None) stops pending callbacks, a new URL takes them.
            let Some(target) = self.webhook_target() else {
                break;
            };
            if self.status_batch > 1 {
                // Gathered with the other statuses due now into one POST; the next status of
                // this message waits for that POST's answer, as it waits for its own below.
                let (done, answered) = tokio::sync::oneshot::channel();
                self.clone().queue_status(DueStatus {
                    phone_number_id: run.phone_number_id.clone(),
                    item: self.status_item(&run, status),
                    status,
                    wamid: run.wamid.clone(),
                    done,
                });
                let _ = answered.await;
                continue;
            }
            let body = self.status_envelope(&run, status);
            self.deliver(
                &target,
                CallbackKind::Status,
                Some(status),
                &run.wamid,
                body,
            )
            .await;
        }
        self.status_runs_done.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds a due status to the outbox; the first of a window starts the poster that sends
    /// the window's statuses together.
    fn queue_status(self: Arc<Self>, due: DueStatus) {
        let start = {
            let mut outbox = self.status_outbox.lock().unwrap_or_else(|e| e.into_inner());
            outbox.due.push(due);
            !std::mem::replace(&mut outbox.gathering, true)
        };
        if start {
            tokio::spawn(async move {
                tokio::time::sleep(self.status_batch_window).await;
                let due = {
                    let mut outbox = self.status_outbox.lock().unwrap_or_else(|e| e.into_inner());
                    outbox.gathering = false;
                    std::mem::take(&mut outbox.due)
                };
                let mut due = due.into_iter().peekable();
                while due.peek().is_some() {
                    let batch: Vec<DueStatus> = due.by_ref().take(self.status_batch).collect();
                    tokio::spawn(self.clone().post_statuses(batch));
                }
            });
        }
    }

    /// One POST of several statuses: one `messages` change per sender number.
    async fn post_statuses(self: Arc<Self>, batch: Vec<DueStatus>) {
        let Some(target) = self.webhook_target() else {
            return;
        };
        let mut changes: Vec<(String, Vec<Value>)> = Vec::new();
        for d in &batch {
            match changes.iter_mut().find(|(p, _)| *p == d.phone_number_id) {
                Some((_, items)) => items.push(d.item.clone()),
                None => changes.push((d.phone_number_id.clone(), vec![d.item.clone()])),
            }
        }
        let changes: Vec<Value> = changes
            .into_iter()
            .map(|(phone_number_id, statuses)| {
                json!({
                    "field": "messages",
                    "value": {
                        "messaging_product": "whatsapp",
                        "metadata": {
                            "display_phone_number": self.display_phone_number,
                            "phone_number_id": phone_number_id,
                        },
                        "statuses": statuses,
                    },
                })
            })
            .collect();
        let body = serde_json::to_vec(&json!({
            "object": "whatsapp_business_account",
            "entry": [{ "id": self.waba_id, "changes": changes }],
        }))
        .unwrap_or_default();
        let at_ms = unix_ms();
        let (http_status, attempts) = self.post(&target, body).await;
        for d in batch {
            self.record_callback(CallbackRecord {
                at_ms,
                kind: CallbackKind::Status,
                status: Some(d.status.to_owned()),
                wamid: Some(d.wamid),
                http_status,
                attempts,
            });
            let _ = d.done.send(());
        }
    }

    /// One status callback body, as Meta sends it (v24.0+: no `conversation`).
    fn status_envelope(&self, run: &StatusRun, status: &str) -> Vec<u8> {
        let item = self.status_item(run, status);
        let value = json!({
            "messaging_product": "whatsapp",
            "metadata": {
                "display_phone_number": self.display_phone_number,
                "phone_number_id": run.phone_number_id,
            },
            "statuses": [item],
        });
        self.envelope(value)
    }

    /// One `statuses[]` item.
    fn status_item(&self, run: &StatusRun, status: &str) -> Value {
        let mut item = json!({
            "id": run.wamid,
            "status": status,
            "timestamp": unix_secs_string(),
            "recipient_id": run.wa_id,
        });
        if let Some(cb) = &run.callback_data {
            item["biz_opaque_callback_data"] = json!(cb);
        }
        // Meta (webhooks reference, messages/status): `pricing` comes with `sent` and with one of
        // `delivered`/`read`, never both. The sandbox always reports `delivered` and `read` only
        // sometimes, so the second copy rides on `delivered`; `read` and `failed` carry none.
        if matches!(status, "sent" | "delivered") {
            item["pricing"] = run.pricing.clone();
        }
        if let (Some(f), "failed") = (&run.failure, status) {
            item["errors"] = json!([{
                "code": f.code,
                "title": f.title,
                "message": f.title,
                "error_data": { "details": known_details(f.code).unwrap_or(&f.title) },
                "href": ERROR_CODES_HREF,
            }]);
        }
        item
    }

    /// Meta's envelope around one `messages` change value, serialized.
    pub(super) fn envelope(&self, value: Value) -> Vec<u8> {
        let envelope = json!({
            "object": "whatsapp_business_account",
            "entry": [{
                "id": self.waba_id,
                "changes": [{ "value": value, "field": "messages" }],
            }],
        });
        // Invariant: a Value with string keys always serializes.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }

    /// POSTs one callback, retrying like Meta until a 200 or [`CALLBACK_TRIES`] tries, and
    /// records it. Returns the final status and the tries made.
    pub(super) async fn deliver(
        &self,
        target: &WebhookTarget,
        kind: CallbackKind,
        status: Option<&str>,
        wamid: &str,
        body: Vec<u8>,
    ) -> (Option<u16>, u32) {
        let at_ms = unix_ms();
        let (http_status, attempts) = self.post(target, body).await;
        self.record_callback(CallbackRecord {
            at_ms,
            kind,
            status: status.map(str::to_owned),
            wamid: Some(wamid.to_owned()),
            http_status,
            attempts,
        });
        (http_status, attempts)
    }

    /// POSTs one body, signed, retrying like Meta until a 200 or [`CALLBACK_TRIES`] tries.
    async fn post(&self, target: &WebhookTarget, body: Vec<u8>) -> (Option<u16>, u32) {
        let signature = target
            .app_secret
            .as_deref()
            .map(|secret| signature_header(secret.as_bytes(), &body));
        let body = Bytes::from(body);
        let mut backoff = CALLBACK_FIRST_BACKOFF;
        let mut attempts = 0;
        let http_status = loop {
            attempts += 1;
            let mut request = self
                .http
                .post(&target.url)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            if let Some(signature) = &signature {
                request = request.header("x-hub-signature-256", signature);
            }
            let answer = match request.send().await {
                Ok(response) => {
                    let code = response.status().as_u16();
                    // Read the body so the connection goes back to the pool.
                    let _ = response.bytes().await;
                    Some(code)
                }
                Err(e) => {
                    tracing::debug!(url = %target.url, error = %e, "sandbox callback got no answer");
                    None
                }
            };
            if answer == Some(200) || attempts >= CALLBACK_TRIES {
                break answer;
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        };
        if http_status != Some(200) {
            tracing::warn!(url = %target.url, ?http_status, attempts, "sandbox callback given up");
        }
        (http_status, attempts)
    }
}

/// `X-Hub-Signature-256` for `body`: `sha256=` and the lowercase hex HMAC-SHA256.
fn signature_header(secret: &[u8], body: &[u8]) -> String {
    // Invariant: HMAC accepts keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::testing::*;
    use crate::sandbox::{InboundBody, SandboxConfig};
    use std::collections::HashMap;
    use std::time::Instant;

    #[tokio::test]
    async fn accepted_sends_come_back_sent_delivered_read_signed_with_pricing() {
        let rx = receiver(vec![]).await;
        let sb = start(SandboxConfig {
            template_categories: HashMap::from([("order_update".into(), "utility".into())]),
            ..webhooked(&rx.url)
        })
        .await;
        let before = unix_ms() / 1000;
        let wamid = wamid_of_send(&sb, &template("+49 170 1234567", "job-1")).await;
        wait_until("three callbacks", || (rx.count() >= 3).then_some(())).await;
        let bodies = rx.signed();
        assert_eq!(bodies.len(), 3);
        let ts = status_of(&bodies[0])["timestamp"].as_str().unwrap();
        let secs: u64 = ts.parse().unwrap();
        assert!(secs >= before && secs <= unix_ms() / 1000, "{ts}");
        let marketing = json!({
            "billable": true, "pricing_model": "PMP", "type": "regular", "category": "marketing"
        });
        // Exactly Meta's envelope; v24.0+ shape, so no `conversation`.
        assert_eq!(
            bodies[0],
            json!({
                "object": "whatsapp_business_account",
                "entry": [{
                    "id": "102290129340398",
                    "changes": [{
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": "106540352242922"
                            },
                            "statuses": [{
                                "id": wamid,
                                "status": "sent",
                                "timestamp": ts,
                                "recipient_id": "491701234567",
                                "biz_opaque_callback_data": "job-1",
                                "pricing": marketing
                            }]
                        },
                        "field": "messages"
                    }]
                }]
            })
        );
        let statuses: Vec<_> = bodies
            .iter()
            .map(|b| status_of(b)["status"].clone())
            .collect();
        assert_eq!(statuses, ["sent", "delivered", "read"]);
        assert_eq!(status_of(&bodies[1])["pricing"], marketing);
        assert!(status_of(&bodies[2]).get("pricing").is_none());
        for b in &bodies {
            let s = status_of(b);
            assert_eq!(s["id"], wamid);
            assert_eq!(s["biz_opaque_callback_data"], "job-1");
            assert!(s.get("conversation").is_none());
            assert!(s["timestamp"].is_string());
        }
        let records = wait_until("three callback records", || {
            let r = sb.handle.callbacks();
            (r.len() == 3).then_some(r)
        })
        .await;
        for (r, status) in records.iter().zip(["sent", "delivered", "read"]) {
            assert_eq!(r.kind, CallbackKind::Status);
            assert_eq!(r.status.as_deref(), Some(status));
            assert_eq!(r.wamid.as_deref(), Some(wamid.as_str()));
            assert_eq!((r.http_status, r.attempts), (Some(200), 1));
        }

        // A configured template category, and free-form text (free service, no callback data).
        let mut utility = template("491701234567", "job-2");
        utility["template"]["name"] = json!("order_update");
        let utility_wamid = wamid_of_send(&sb, &utility).await;
        let text_wamid = wamid_of_send(&sb, &text("491701234567", "hi")).await;
        wait_until("nine callbacks", || (rx.count() >= 9).then_some(())).await;
        let bodies = rx.signed();
        let sent_of = |w: &str| {
            bodies
                .iter()
                .map(status_of)
                .find(|s| s["id"] == w && s["status"] == "sent")
                .unwrap()
                .clone()
        };
        assert_eq!(sent_of(&utility_wamid)["pricing"]["category"], "utility");
        let text_sent = sent_of(&text_wamid);
        assert_eq!(
            text_sent["pricing"],
            json!({
                "billable": false, "pricing_model": "PMP",
                "type": "free_customer_service", "category": "service"
            })
        );
        assert!(text_sent.get("biz_opaque_callback_data").is_none());
        // Per message the order holds even with sends interleaved.
        for w in [&utility_wamid, &text_wamid] {
            let order: Vec<_> = bodies
                .iter()
                .map(status_of)
                .filter(|s| s["id"] == **w)
                .map(|s| s["status"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(order, ["sent", "delivered", "read"]);
        }
        sb.stop().await;
    }

    #[tokio::test]
    async fn read_rate_zero_stops_at_delivered_and_refused_sends_get_no_callbacks() {
        let rx = receiver(vec![]).await;
        let sb = start(SandboxConfig {
            read_rate: 0.0,
            valid_tokens: Some(vec!["tok".into()]),
            ..webhooked(&rx.url)
        })
        .await;
        assert_eq!(sb.post_as(Some("bad"), &text("1", "x")).await.0, 401);
        assert_eq!(sb.send(&text("", "x")).await.0, 400);
        let wamid = wamid_of_send(&sb, &template("491701234567", "j")).await;
        wait_until("the callback task to end", || {
            (runs_done(&sb) == 1).then_some(())
        })
        .await;
        let statuses: Vec<_> = rx
            .signed()
            .iter()
            .map(|b| (status_of(b)["id"].clone(), status_of(b)["status"].clone()))
            .collect();
        assert_eq!(
            statuses,
            [
                (json!(wamid), json!("sent")),
                (json!(wamid), json!("delivered"))
            ]
        );
        sb.stop().await;
    }

    #[tokio::test]
    async fn callbacks_are_retried_with_backoff_until_a_200() {
        let rx = receiver(vec![500, 500]).await;
        let sb = start(SandboxConfig {
            read_rate: 0.0,
            ..webhooked(&rx.url)
        })
        .await;
        let t0 = Instant::now();
        let wamid = wamid_of_send(&sb, &text("491701234567", "x")).await;
        wait_until("the callback task to end", || {
            (runs_done(&sb) == 1).then_some(())
        })
        .await;
        // Backoff 100 ms then 200 ms before the third try.
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
        let records = sb.handle.callbacks();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].status.as_deref(), Some("sent"));
        assert_eq!(
            (records[0].http_status, records[0].attempts),
            (Some(200), 3)
        );
        assert_eq!(
            (records[1].http_status, records[1].attempts),
            (Some(200), 1)
        );
        // Three tries of the same bytes, then delivered.
        let got = rx.got.lock().unwrap().clone();
        assert_eq!(got.len(), 4);
        assert!(got[..3].iter().all(|g| *g == got[0]));
        let bodies = rx.signed();
        assert_eq!(status_of(&bodies[0])["id"], wamid.as_str());
        assert_eq!(status_of(&bodies[3])["status"], "delivered");

        // Over HTTP the callback log is the same.
        let (code, bytes) = sb
            .request(reqwest::Method::GET, "/_sandbox/callbacks", None, vec![])
            .await;
        assert_eq!(code, 200);
        let listed: Vec<CallbackRecord> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(listed, records);
        sb.stop().await;
    }

    #[tokio::test]
    async fn webhook_can_be_set_later_unsigned_and_never_delays_the_answer() {
        let sb = start(SandboxConfig {
            read_rate: 0.0,
            status_delay: Duration::from_millis(5),
            ..quick()
        })
        .await;
        // No webhook: accepted sends get no callback task; inbound has nowhere to go.
        wamid_of_send(&sb, &text("1", "x")).await;
        assert_eq!(
            sb.handle
                .send_inbound("1", InboundBody::Text("hi".into()))
                .await,
            None
        );
        let body = serde_json::to_vec(&json!({ "from": "1", "text": "hi" })).unwrap();
        let (code, _) = sb
            .request(reqwest::Method::POST, "/_sandbox/inbound", None, body)
            .await;
        assert_eq!(code, 409);

        // Unsigned when no secret is given.
        let rx = receiver(vec![]).await;
        sb.handle.set_webhook(Some(rx.url.clone()), None);
        let wamid = wamid_of_send(&sb, &text("1", "y")).await;
        wait_until("the callback task to end", || {
            (runs_done(&sb) == 1).then_some(())
        })
        .await;
        let got = rx.got.lock().unwrap().clone();
        assert_eq!(got.len(), 2, "only the send made after set_webhook");
        assert!(got.iter().all(|(signature, _)| signature.is_none()));
        let first: Value = serde_json::from_slice(&got[0].1).unwrap();
        assert_eq!(status_of(&first)["id"], wamid.as_str());

        // Over HTTP, with a secret; then off again.
        let set = json!({ "url": rx.url, "app_secret": SECRET });
        assert_eq!(
            sb.control(reqwest::Method::PUT, "/_sandbox/webhook", &set)
                .await,
            204
        );
        assert_eq!(
            sb.handle
                .send_inbound("1", InboundBody::Text("hi".into()))
                .await,
            Some(200)
        );
        let got = rx.got.lock().unwrap().clone();
        assert_eq!(got.len(), 3);
        assert_signed(got[2].0.as_deref(), &got[2].1);
        assert_eq!(
            sb.control(reqwest::Method::PUT, "/_sandbox/webhook", &Value::Null)
                .await,
            204
        );
        assert_eq!(
            sb.handle
                .send_inbound("1", InboundBody::Text("hi".into()))
                .await,
            None
        );

        // A dead receiver (retrying for ~50 s) does not hold up the send's answer.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_url = format!("http://{}/webhook", dead.local_addr().unwrap());
        drop(dead);
        sb.handle.set_webhook(Some(dead_url), Some(SECRET.into()));
        let t0 = Instant::now();
        wamid_of_send(&sb, &text("1", "z")).await;
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        sb.stop().await;
    }
}
