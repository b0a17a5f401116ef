//! The `/_sandbox/*` control endpoints that steer a running sandbox over HTTP (faults, tokens,
//! latency, the webhook; the logs of sends and callbacks), `/healthz`, and the answer to paths
//! the sandbox does not have. `POST /_sandbox/inbound` lives with the rest of inbound.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::error::{MetaError, json_answer};
use super::state::{AsyncFailure, Fault, Shared};

pub(super) async fn control_requests(State(shared): State<Arc<Shared>>) -> Response {
    // Clone under the lock, serialize outside it, so sends are not blocked by a big log.
    let records = shared.log().records.clone();
    json_answer(StatusCode::OK, &records)
}

pub(super) async fn control_faults(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let fault: Fault = match parse_control_body(body) {
        Ok(fault) => fault,
        Err(e) => return e.into_response(),
    };
    if !(400..=599).contains(&fault.http_status) {
        return MetaError::invalid(
            StatusCode::BAD_REQUEST,
            format!("http_status must be 400..=599, got {}.", fault.http_status),
        )
        .into_response();
    }
    shared.add_fault(fault);
    StatusCode::NO_CONTENT.into_response()
}

pub(super) async fn control_tokens(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match parse_control_body::<Option<Vec<String>>>(body) {
        Ok(tokens) => {
            shared.set_valid_tokens(tokens);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => e.into_response(),
    }
}

pub(super) async fn control_latency(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let text: String = match parse_control_body(body) {
        Ok(text) => text,
        Err(e) => return e.into_response(),
    };
    match humantime::parse_duration(&text) {
        Ok(latency) => {
            shared.set_latency(latency);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => MetaError::invalid(
            StatusCode::BAD_REQUEST,
            format!("Expected a duration such as \"250ms\": {e}."),
        )
        .into_response(),
    }
}

pub(super) async fn control_async_failures(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match parse_control_body::<AsyncFailure>(body) {
        Ok(failure) => {
            shared.add_async_failure(failure);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `PUT /_sandbox/webhook` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookRequest {
    url: String,
    #[serde(default)]
    app_secret: Option<String>,
}

pub(super) async fn control_webhook(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match parse_control_body::<Option<WebhookRequest>>(body) {
        Ok(Some(w)) => {
            shared.set_webhook(Some(w.url), w.app_secret);
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(None) => {
            shared.set_webhook(None, None);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => e.into_response(),
    }
}

pub(super) async fn control_callbacks(State(shared): State<Arc<Shared>>) -> Response {
    let records = shared.callback_log().clone();
    json_answer(StatusCode::OK, &records)
}

/// Reads a control endpoint's JSON body; errors come back Meta-shaped like everything else.
pub(super) fn parse_control_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, MetaError> {
    let body = body.map_err(|r| MetaError::invalid(r.status(), r.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| {
        MetaError::invalid(StatusCode::BAD_REQUEST, format!("Invalid JSON body: {e}."))
    })
}

pub(super) async fn healthz() -> Response {
    json_answer(StatusCode::OK, &json!({ "status": "ok" }))
}

pub(super) async fn not_found(method: Method, uri: Uri) -> Response {
    unknown_path(StatusCode::NOT_FOUND, &method, &uri)
}

pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    unknown_path(StatusCode::METHOD_NOT_ALLOWED, &method, &uri)
}

/// Graph answers unknown paths with code 2500 "Unknown path components".
fn unknown_path(status: StatusCode, method: &Method, uri: &Uri) -> Response {
    MetaError::new(
        status,
        2500,
        format!("Unknown path components: {}", uri.path()),
        format!("The sandbox has no endpoint {method} {}.", uri.path()),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::testing::*;
    use crate::sandbox::{BODY_LIMIT, SandboxRecord};
    use serde_json::Value;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn control_endpoints_work() {
        let sb = start(quick()).await;
        let (status, bytes) = sb
            .request(reqwest::Method::GET, "/healthz", None, vec![])
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            serde_json::from_slice::<Value>(&bytes).unwrap(),
            json!({ "status": "ok" })
        );

        let fault = json!({ "to": "491701234567", "http_status": 400, "code": 131_026,
                            "message": "Message undeliverable", "times": 1 });
        assert_eq!(
            sb.control(reqwest::Method::POST, "/_sandbox/faults", &fault)
                .await,
            204
        );
        assert_eq!(sb.send(&template("491701234567", "f")).await.0, 400);
        assert_eq!(sb.send(&template("491701234567", "f")).await.0, 200);
        let bad_fault =
            json!({ "to": null, "http_status": 200, "code": 1, "message": "x", "times": 1 });
        assert_eq!(
            sb.control(reqwest::Method::POST, "/_sandbox/faults", &bad_fault)
                .await,
            400
        );
        assert_eq!(
            sb.control(reqwest::Method::POST, "/_sandbox/faults", &json!({}))
                .await,
            400
        );

        assert_eq!(
            sb.control(reqwest::Method::PUT, "/_sandbox/tokens", &json!(["k"]))
                .await,
            204
        );
        assert_eq!(sb.post_as(Some("tok"), &text("1", "x")).await.0, 401);
        assert_eq!(sb.post_as(Some("k"), &text("1", "x")).await.0, 200);
        assert_eq!(
            sb.control(reqwest::Method::PUT, "/_sandbox/tokens", &Value::Null)
                .await,
            204
        );
        assert_eq!(sb.post_as(Some("tok"), &text("1", "x")).await.0, 200);

        assert_eq!(
            sb.control(reqwest::Method::PUT, "/_sandbox/latency", &json!("120ms"))
                .await,
            204
        );
        let t0 = Instant::now();
        assert_eq!(sb.send(&text("1", "x")).await.0, 200);
        assert!(t0.elapsed() >= Duration::from_millis(120));
        assert_eq!(
            sb.control(reqwest::Method::PUT, "/_sandbox/latency", &json!("soon"))
                .await,
            400
        );

        let (status, bytes) = sb
            .request(reqwest::Method::GET, "/_sandbox/requests", None, vec![])
            .await;
        assert_eq!(status, 200);
        let records: Vec<SandboxRecord> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(records, sb.handle.requests());
        let codes: Vec<_> = records.iter().map(|r| (r.status, r.error_code)).collect();
        assert_eq!(
            codes,
            [
                (400, Some(131_026)),
                (200, None),
                (401, Some(190)),
                (200, None),
                (200, None),
                (200, None)
            ]
        );
        sb.stop().await;
    }

    #[tokio::test]
    async fn unknown_paths_and_oversized_bodies_get_json_errors() {
        let sb = start(quick()).await;
        let (status, bytes) = sb
            .request(reqwest::Method::GET, "/nope", None, vec![])
            .await;
        assert_eq!(status, 404);
        assert_eq!(error_of(&serde_json::from_slice(&bytes).unwrap()).0, 2500);
        let (status, bytes) = sb.request(reqwest::Method::GET, PATH, None, vec![]).await;
        assert_eq!(status, 405);
        assert_eq!(error_of(&serde_json::from_slice(&bytes).unwrap()).0, 2500);

        let huge = vec![b' '; BODY_LIMIT + 1];
        let (status, bytes) = sb
            .request(reqwest::Method::POST, PATH, Some("t"), huge)
            .await;
        assert_eq!(status, 413);
        assert_eq!(error_of(&serde_json::from_slice(&bytes).unwrap()).0, 100);
        let (status, _) = sb
            .request(
                reqwest::Method::POST,
                "/_sandbox/faults",
                None,
                vec![b' '; BODY_LIMIT + 1],
            )
            .await;
        assert_eq!(status, 413);
        // Percent-escapes that are not UTF-8 in the path are a 400, not a panic.
        let (status, bytes) = sb
            .request(
                reqwest::Method::POST,
                "/v1/%FF%FE/messages",
                Some("t"),
                vec![],
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(error_of(&serde_json::from_slice(&bytes).unwrap()).0, 100);
        let log = sb.handle.requests();
        assert_eq!(log.len(), 2);
        assert_eq!(log[0].status, 413);
        sb.stop().await;
    }
}
