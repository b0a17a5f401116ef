//! The admin listener (loopback by default): `/metrics` for Prometheus, `/healthz` for liveness,
//! `/readyz` for readiness (broker connected, state loaded), and the consent endpoints
//! `sendwell consent show | export` use while the daemon holds the store: `/consent/{number}`
//! and `/consent/export`. Those reveal personal data: they answer loopback clients that name a
//! loopback host, come through no proxy and bring the admin token ([`auth`]), even when an
//! operator opens the admin port to a scrape network or a proxy for `/metrics`.

pub mod auth;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::Secret;
use crate::consent::ConsentStore;
use crate::consent::tools::{self, ChunkSender, Format};

pub use auth::is_loopback_peer;

/// What readiness is made of; each part flips as the daemon's state changes.
#[derive(Default)]
pub struct Readiness {
    pub broker: Arc<AtomicBool>,
    pub state: AtomicBool,
    /// Set while the state store cannot be written (the ledger's [`crate::store::StoreHealth`]).
    pub store_unwritable: Arc<AtomicBool>,
    /// This instance's role, shard and rate shares: reported by `/readyz` after its first line
    /// (which stays what it was: `ready`, or `not ready: …`). Readiness does not depend on them:
    /// a standby is ready (it takes over the moment the broker hands it the queue).
    pub instance: Option<Arc<crate::instances::Instance>>,
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

/// The admin router with the consent endpoints, which ask for `token` ([`auth`]). Serve it
/// with `into_make_service_with_connect_info::<SocketAddr>()`: without the peer's address the
/// consent endpoints refuse every request. `spool_dir` (the state directory) holds an
/// export's spool file while it streams.
pub fn router_with_consent(
    metrics: PrometheusHandle,
    readiness: Arc<Readiness>,
    consent: Arc<ConsentStore>,
    spool_dir: PathBuf,
    token: Secret,
) -> Router {
    let consent = Router::new()
        .route("/consent/export", get(consent_export))
        .route("/consent/{number}", get(consent_show))
        .route_layer(middleware::from_fn_with_state(token, auth::consent_guard))
        .with_state(ConsentState {
            store: consent,
            spool_dir: Arc::new(spool_dir),
        });
    router(metrics, readiness).merge(consent)
}

/// What the admin listener answers while the daemon waits for its state store at start
/// (PostgreSQL unreachable): `/healthz` (the process is alive), `/metrics`, and `/readyz` 503
/// saying `why` (what it waits for, and the latest error). Nothing else exists yet: the
/// consent endpoints need the store.
pub fn waiting_router(metrics: PrometheusHandle, why: Arc<Mutex<String>>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                let why = why.lock().unwrap_or_else(PoisonError::into_inner).clone();
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                )
            }),
        )
        .with_state(AdminState {
            metrics,
            readiness: Arc::new(Readiness::default()),
        })
}

/// Answers with `early` until `later` is set, then with `later`: one listener, bound before
/// the routes it will finally serve exist. Requests keep their extensions (the peer address
/// the consent endpoints check).
pub fn handover_router(early: Router, later: Arc<OnceLock<Router>>) -> Router {
    Router::new().fallback_service(tower::service_fn(move |req: axum::extract::Request| {
        let router = later.get().unwrap_or(&early).clone();
        tower::ServiceExt::oneshot(router, req)
    }))
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
    match tools::number_report(&store, &to).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "Reading a consent history failed.");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
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
    tokio::spawn(async move {
        let spooled = tools::export_spooled(&store, format, &spool_dir).await;
        let copied = tokio::task::spawn_blocking(move || {
            let (mut file, _) = spooled.map_err(|e| e.to_string())?;
            let mut out = ChunkSender::new(tx.clone());
            std::io::copy(&mut file, &mut out)
                .and_then(|_| std::io::Write::flush(&mut out))
                .map_err(|e| e.to_string())
                .map(|_| ())
                // Ends the body with an error, so the client sees a broken export, not a short one.
                .inspect_err(|e| {
                    let _ = tx.blocking_send(Err(std::io::Error::other(e.clone())));
                })
        })
        .await;
        if let Ok(Err(e)) = copied {
            tracing::warn!(error = %e, "Consent export ended early.");
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

async fn ready(State(s): State<AdminState>) -> (StatusCode, String) {
    let (status, first) = readiness_line(&s.readiness);
    let mut body = first.to_string();
    if let Some(instance) = &s.readiness.instance {
        body.push_str(&instance.describe());
    }
    (status, body)
}

/// `/readyz`'s status and first line, as they always were.
fn readiness_line(r: &Readiness) -> (StatusCode, &'static str) {
    let broker = r.broker.load(Ordering::SeqCst);
    let state = r.state.load(Ordering::SeqCst);
    if r.store_unwritable.load(Ordering::SeqCst) {
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
    use std::net::SocketAddr;

    use axum::extract::connect_info::MockConnectInfo;
    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;
    use crate::store::Ledger;

    const TOKEN: &str = "test-admin-token-0123456789";

    fn token() -> Secret {
        Secret::new(TOKEN.into())
    }

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
            token(),
        )
        .layer(MockConnectInfo(peer));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, router).await });
        addr
    }

    /// The status of a GET with these extra headers (a `host` among them replaces the one the
    /// client would send).
    async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    async fn status_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> u16 {
        get(addr, path, headers).await.status().as_u16()
    }

    /// With the admin token, as `sendwell consent` asks.
    async fn status(addr: SocketAddr, path: &str) -> u16 {
        let auth = format!("Bearer {TOKEN}");
        status_with(addr, path, &[("authorization", &auth)]).await
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
            token(),
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
            .write_all(
                format!(
                    "GET /consent/export HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {TOKEN}\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        // The export has begun once its first bytes arrive; then the client stops reading.
        let mut seen = Vec::new();
        while !seen.windows(13).any(|w| w == b"\"evidence\":\"x") {
            let mut buf = [0u8; 4096];
            let n = client.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "the export ended early: {}",
                String::from_utf8_lossy(&seen)
            );
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
            token(),
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

    #[tokio::test]
    async fn consent_endpoints_need_the_token_a_loopback_host_and_no_proxy() {
        let local = serve_as("127.0.0.1:40000".parse().unwrap()).await;
        let auth = format!("Bearer {TOKEN}");
        let auth = auth.as_str();
        for path in ["/consent/491701234567", "/consent/export"] {
            // No token, a wrong one, another scheme: 401, saying what is needed.
            let r = get(local, path, &[]).await;
            assert_eq!(r.status(), 401, "{path}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
            assert!(r.text().await.unwrap().contains("admin.token_file"));
            for wrong in [
                "Bearer test-admin-token-012345678",
                "Bearer test-admin-token-01234567890",
                "Bearer ",
                "Basic dGVzdA==",
                TOKEN,
            ] {
                assert_eq!(
                    status_with(local, path, &[("authorization", wrong)]).await,
                    401,
                    "{wrong}"
                );
            }
            // A page that rebinds its own name to 127.0.0.1 sends its own name as Host.
            for host in ["rebind.example", "rebind.example:9187", "10.0.0.1:9187"] {
                assert_eq!(
                    status_with(local, path, &[("authorization", auth), ("host", host)]).await,
                    403,
                    "{host}"
                );
            }
            for host in [
                "localhost",
                "localhost:9187",
                "127.0.0.1:9187",
                "[::1]:9187",
            ] {
                assert_eq!(
                    status_with(local, path, &[("authorization", auth), ("host", host)]).await,
                    200,
                    "{host}"
                );
            }
            // Through a proxy, even with the token.
            for h in auth::FORWARDING_HEADERS {
                assert_eq!(
                    status_with(local, path, &[("authorization", auth), (h, "127.0.0.1")]).await,
                    401,
                    "{h}"
                );
            }
            assert_eq!(
                status_with(local, path, &[("authorization", auth)]).await,
                200
            );
        }
        // The rest of the admin listener is as before: no token, any host, any proxy.
        for path in ["/metrics", "/healthz", "/readyz"] {
            let s = status_with(
                local,
                path,
                &[("host", "scrape.example"), ("x-forwarded-for", "10.0.0.9")],
            )
            .await;
            assert!(s == 200 || s == 503, "{path}: {s}");
        }
    }
}
