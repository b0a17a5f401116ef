//! The sandbox's own test harness: a sandbox on a free port with a client for it, request
//! builders, and a webhook receiver that checks signatures.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::sync::atomic::Ordering;
use tokio_util::sync::CancellationToken;

use super::{Sandbox, SandboxConfig, SandboxHandle};

pub(super) const PATH: &str = "/v21.0/106540352242922/messages";

/// A sandbox serving on a free loopback port, with a client pointed at it.
pub(super) struct Running {
    pub(super) base: String,
    pub(super) handle: SandboxHandle,
    pub(super) shutdown: CancellationToken,
    pub(super) task: tokio::task::JoinHandle<std::io::Result<()>>,
    pub(super) client: reqwest::Client,
}

pub(super) fn quick() -> SandboxConfig {
    SandboxConfig {
        latency: Duration::ZERO,
        ..SandboxConfig::default()
    }
}

pub(super) async fn start(config: SandboxConfig) -> Running {
    let sandbox = Sandbox::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    let base = format!("http://{}", sandbox.local_addr());
    let handle = sandbox.handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sandbox.serve(shutdown.clone()));
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    Running {
        base,
        handle,
        shutdown,
        task,
        client,
    }
}

impl Running {
    pub(super) async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Bytes) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.bytes().await.unwrap())
    }

    pub(super) async fn post_as(&self, token: Option<&str>, body: &Value) -> (u16, Value) {
        let body = serde_json::to_vec(body).unwrap();
        let (status, bytes) = self.request(reqwest::Method::POST, PATH, token, body).await;
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    pub(super) async fn send(&self, body: &Value) -> (u16, Value) {
        self.post_as(Some("tok"), body).await
    }

    pub(super) async fn control(&self, method: reqwest::Method, path: &str, body: &Value) -> u16 {
        let body = serde_json::to_vec(body).unwrap();
        self.request(method, path, None, body).await.0
    }

    pub(super) async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

pub(super) fn template(to: &str, callback: &str) -> Value {
    json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "template",
        "biz_opaque_callback_data": callback,
        "template": {
            "name": "spring_sale",
            "language": { "code": "de" },
            "components": [{ "type": "body", "parameters": [{ "type": "text", "text": "x" }] }]
        }
    })
}

pub(super) fn text(to: &str, body: &str) -> Value {
    json!({
        "messaging_product": "whatsapp",
        "to": to,
        "type": "text",
        "text": { "preview_url": false, "body": body }
    })
}

/// Checks the Meta error shape and returns (code, details).
pub(super) fn error_of(body: &Value) -> (i64, String) {
    let error = &body["error"];
    let keys: Vec<_> = error.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        ["code", "error_data", "fbtrace_id", "message", "type"],
        "{body}"
    );
    assert_eq!(error["type"], "OAuthException");
    assert_eq!(error["error_data"]["messaging_product"], "whatsapp");
    assert_eq!(error["fbtrace_id"].as_str().unwrap().len(), 23);
    let code = error["code"].as_i64().unwrap();
    let details = error["error_data"]["details"].as_str().unwrap().to_owned();
    (code, details)
}

pub(super) const SECRET: &str = "sandbox-test-secret";

/// What a receiver got: each callback's signature header and raw body, in arrival order.
pub(super) type Received = Arc<Mutex<Vec<(Option<String>, Bytes)>>>;

/// A webhook receiver on a free loopback port: keeps every callback and answers the
/// scripted statuses first, then 200.
pub(super) struct Receiver {
    pub(super) url: String,
    pub(super) got: Received,
}

pub(super) async fn receiver(script: Vec<u16>) -> Receiver {
    let got: Received = Arc::default();
    let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
    let sink = Arc::clone(&got);
    let app = Router::new().route(
        "/webhook",
        post(move |headers: HeaderMap, body: Bytes| {
            let sink = Arc::clone(&sink);
            let script = Arc::clone(&script);
            async move {
                let signature = headers
                    .get("x-hub-signature-256")
                    .map(|v| v.to_str().unwrap().to_owned());
                sink.lock().unwrap().push((signature, body));
                let code = script.lock().unwrap().pop_front().unwrap_or(200);
                StatusCode::from_u16(code).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Receiver { url, got }
}

impl Receiver {
    pub(super) fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Every body so far, after checking its signature against SECRET.
    pub(super) fn signed(&self) -> Vec<Value> {
        let got = self.got.lock().unwrap();
        got.iter()
            .map(|(signature, body)| {
                assert_signed(signature.as_deref(), body);
                serde_json::from_slice(body).unwrap()
            })
            .collect()
    }
}

/// Checks `sha256=<lowercase hex HMAC-SHA256(SECRET, body)>`, computed here independently.
pub(super) fn assert_signed(signature: Option<&str>, body: &[u8]) {
    let hex_sig = signature
        .expect("signed")
        .strip_prefix("sha256=")
        .expect("sha256= prefix");
    assert_eq!(hex_sig.len(), 64);
    assert_eq!(hex_sig, hex_sig.to_ascii_lowercase());
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    mac.verify_slice(&hex::decode(hex_sig).unwrap())
        .expect("signature matches the body");
}

/// Polls `check` until it yields, failing at a deadline instead of sleeping a guess.
pub(super) async fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(super) fn webhooked(url: &str) -> SandboxConfig {
    SandboxConfig {
        webhook_url: Some(url.into()),
        app_secret: Some(SECRET.into()),
        status_delay: Duration::from_millis(5),
        ..quick()
    }
}

/// The one status of a status callback.
pub(super) fn status_of(body: &Value) -> &Value {
    &body["entry"][0]["changes"][0]["value"]["statuses"][0]
}

pub(super) fn runs_done(sb: &Running) -> u64 {
    sb.handle.shared.status_runs_done.load(Ordering::Relaxed)
}

pub(super) async fn wamid_of_send(sb: &Running, body: &Value) -> String {
    let (status, answer) = sb.send(body).await;
    assert_eq!(status, 200, "{answer}");
    answer["messages"][0]["id"].as_str().unwrap().to_owned()
}
