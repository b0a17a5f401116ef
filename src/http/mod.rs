//! The admin listener (loopback by default): `/metrics` for Prometheus, `/healthz` for liveness,
//! `/readyz` for readiness (broker connected, state loaded), and the consent endpoints
//! `sendwell consent show | export` use while the daemon holds the store: `/consent/{number}`
//! and `/consent/export`. Those reveal personal data and answer loopback clients only, even
//! when an operator opens the admin port to a scrape network for `/metrics`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::consent::ConsentStore;
use crate::consent::tools::{self, ChunkSender, Format};

/// What readiness is made of; each part flips as the daemon's state changes.
#[derive(Default)]
pub struct Readiness {
    pub broker: Arc<AtomicBool>,
    pub state: AtomicBool,
    /// Set while the state store cannot be written (the ledger's [`crate::store::StoreHealth`]).
    pub store_unwritable: Arc<AtomicBool>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.broker.load(Ordering::SeqCst)
            && self.state.load(Ordering::SeqCst)
            && !self.store_unwritable.load(Ordering::SeqCst)
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

/// The admin router with the consent endpoints. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()`: without the peer's address the
/// consent endpoints refuse every request. `spool_dir` (the state directory) holds an
/// export's spool file while it streams.
pub fn router_with_consent(
    metrics: PrometheusHandle,
    readiness: Arc<Readiness>,
    consent: Arc<ConsentStore>,
    spool_dir: PathBuf,
) -> Router {
    let consent = Router::new()
        .route("/consent/export", get(consent_export))
        .route("/consent/{number}", get(consent_show))
        .route_layer(middleware::from_fn(loopback_only))
        .with_state(ConsentState {
            store: consent,
            spool_dir: Arc::new(spool_dir),
        });
    router(metrics, readiness).merge(consent)
}

/// Whether a peer may read personal data: a loopback address (IPv4-mapped included).
pub fn is_loopback_peer(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

async fn loopback_only(req: Request, next: Next) -> Response {
    use axum::extract::FromRequestParts;
    let (mut parts, body) = req.into_parts();
    // Served without connect info, the peer is unknown: refused like a remote one.
    let peer = ConnectInfo::<SocketAddr>::from_request_parts(&mut parts, &())
        .await
        .ok()
        .map(|c| c.0);
    let req = Request::from_parts(parts, body);
    match peer {
        Some(p) if is_loopback_peer(p) => next.run(req).await,
        _ => {
            tracing::warn!(peer = ?peer, path = %req.uri().path(), "Consent request from a non-loopback peer refused.");
            (
                StatusCode::FORBIDDEN,
                "consent endpoints answer loopback clients only: they reveal personal data\n",
            )
                .into_response()
        }
    }
}

#[derive(Clone)]
struct ConsentState {
    store: Arc<ConsentStore>,
    spool_dir: Arc<PathBuf>,
}

async fn consent_show(
    State(ConsentState { store, .. }): State<ConsentState>,
    Path(number): Path<String>,
) -> Response {
    // The path carries the digits; a `+` is accepted too.
    let number = if number.starts_with('+') {
        number
    } else {
        format!("+{number}")
    };
    let to = match tools::parse_number(&number) {
        Ok(to) => to,
        Err(why) => return (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response(),
    };
    tracing::info!(to = %to.masked(), "Consent history read over the admin listener.");
    match tokio::task::spawn_blocking(move || tools::number_report(&store, &to)).await {
        Ok(Ok(report)) => axum::Json(report).into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "Reading a consent history failed.");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

#[derive(serde::Deserialize)]
struct ExportQuery {
    format: Option<Format>,
}

/// Streams every stored event: spooled on a blocking thread (see `tools::export_spooled`),
/// then handed over in chunks, so a store of millions of events never becomes one string in
/// memory and a slow client never holds the store's read snapshot.
async fn consent_export(
    State(ConsentState { store, spool_dir }): State<ConsentState>,
    Query(q): Query<ExportQuery>,
) -> Response {
    let format = q.format.unwrap_or(Format::Jsonl);
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    tracing::info!(?format, "Consent export streamed over the admin listener.");
    tokio::task::spawn_blocking(move || {
        let mut out = ChunkSender::new(tx.clone());
        if let Err(e) = tools::export_spooled(&store, format, &spool_dir, &mut out) {
            tracing::warn!(error = %e, "Consent export ended early.");
            // Ends the body with an error, so the client sees a broken export, not a short one.
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    (
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn render_metrics(
    State(s): State<AdminState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    crate::metrics::collect_process();
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
    if s.readiness.store_unwritable.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: state store cannot be written (full disk?)\n",
        );
    }
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use axum::extract::connect_info::MockConnectInfo;
    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;
    use crate::store::Ledger;

    /// Serves the admin router as if every request came from `peer`.
    async fn serve_as(peer: SocketAddr) -> SocketAddr {
        let store = ConsentStore::load_with(
            Ledger::open_in_memory().unwrap(),
            vec!["acme-de".into()],
            HashMap::new(),
        )
        .await
        .unwrap();
        let router = router_with_consent(
            PrometheusBuilder::new().build_recorder().handle(),
            Arc::new(Readiness::default()),
            store,
            std::env::temp_dir(),
        )
        .layer(MockConnectInfo(peer));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, router).await });
        addr
    }

    async fn status(addr: SocketAddr, path: &str) -> u16 {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// An export whose client stops reading must not hold the store: an erasure compacts the
    /// file, which waits for every reader, and every other store access waits behind it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_export_client_does_not_hold_up_an_erasure() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        use crate::store::{KvOp, Table};
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        // Far more than the channel and the socket buffers hold: ~24 MB of history.
        let ops = (0..60_000)
            .map(|i| KvOp::Put {
                table: Table::ConsentHistory,
                key: format!("4917720{i:05}\0acme-de\0").into_bytes(),
                value: format!(
                    "{{\"to\":\"+4917720{i:05}\",\"evidence\":\"{}\"}}",
                    "x".repeat(350)
                )
                .into_bytes(),
            })
            .collect();
        ledger.kv_many(ops).await.unwrap();
        let store = ConsentStore::load_with(ledger, vec!["acme-de".into()], HashMap::new())
            .await
            .unwrap();
        let router = router_with_consent(
            PrometheusBuilder::new().build_recorder().handle(),
            Arc::new(Readiness::default()),
            store.clone(),
            dir.path().to_path_buf(),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(
                l,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        });
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /consent/export HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // The export has begun once its first bytes arrive; then the client stops reading.
        let mut seen = Vec::new();
        while !seen.windows(13).any(|w| w == b"\"evidence\":\"x") {
            let mut buf = [0u8; 4096];
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "the export ended early");
            seen.extend_from_slice(&buf[..n]);
        }
        let erased = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            store.erase("491772000001", jiff::Timestamp::now()),
        )
        .await;
        assert!(
            matches!(erased, Ok(Ok(ref r)) if r.consent_events == 1),
            "the erasure waited on the stalled export: {erased:?}"
        );
        drop(client);
    }

    #[tokio::test]
    async fn served_without_the_peer_address_consent_endpoints_refuse_everyone() {
        let store = ConsentStore::load_with(
            Ledger::open_in_memory().unwrap(),
            vec!["acme-de".into()],
            HashMap::new(),
        )
        .await
        .unwrap();
        let router = router_with_consent(
            PrometheusBuilder::new().build_recorder().handle(),
            Arc::new(Readiness::default()),
            store,
            std::env::temp_dir(),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, router).await });
        assert_eq!(status(addr, "/consent/491701234567").await, 403);
        assert_eq!(status(addr, "/healthz").await, 200);
    }

    #[tokio::test]
    async fn consent_endpoints_refuse_peers_off_loopback_but_metrics_do_not() {
        let remote = serve_as("10.1.2.3:40000".parse().unwrap()).await;
        assert_eq!(status(remote, "/consent/491701234567").await, 403);
        assert_eq!(status(remote, "/consent/export?format=csv").await, 403);
        assert_eq!(status(remote, "/metrics").await, 200);

        for peer in ["127.0.0.1:40000", "[::1]:40000", "[::ffff:127.0.0.1]:40000"] {
            let local = serve_as(peer.parse().unwrap()).await;
            assert_eq!(status(local, "/consent/491701234567").await, 200, "{peer}");
            assert_eq!(status(local, "/consent/export").await, 200, "{peer}");
        }
        let local = serve_as("127.0.0.1:40000".parse().unwrap()).await;
        assert_eq!(status(local, "/consent/12").await, 400);
        assert_eq!(status(local, "/consent/export?format=xml").await, 400);
    }
}
