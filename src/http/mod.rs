//! The admin listener (loopback by default): `/metrics` for Prometheus, `/healthz` for liveness,
//! `/readyz` for readiness (broker connected, state loaded).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

/// What readiness is made of; each part flips as the daemon's state changes.
#[derive(Default)]
pub struct Readiness {
    pub broker: Arc<AtomicBool>,
    pub state: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.broker.load(Ordering::SeqCst) && self.state.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    readiness: Arc<Readiness>,
}

/// The admin router; tests call it directly or through a listener on port 0.
pub fn router(metrics: PrometheusHandle, readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AdminState { metrics, readiness })
}

async fn render_metrics(
    State(s): State<AdminState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn ready(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    let broker = s.readiness.broker.load(Ordering::SeqCst);
    let state = s.readiness.state.load(Ordering::SeqCst);
    match (broker, state) {
        (true, true) => (StatusCode::OK, "ready\n"),
        (false, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: broker not connected\n",
        ),
        (true, false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: state not loaded\n",
        ),
    }
}
