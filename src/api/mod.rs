//! The daemon's HTTP server: axum routes on hyper connections. It serves
//! the task API of SPEC §11 on `api.listen` (tasks.rs; with `/metrics`)
//! and Prometheus metrics alone on `metrics.listen`. What a hand-written
//! server gets wrong is left to the libraries and to three limits set here:
//!
//! - **Connections are bounded.** A connection holds a permit of a
//!   semaphore sized from `RLIMIT_NOFILE` (a quarter of it, 16–1024), and
//!   the next `accept` waits for a permit, so idle or slow clients queue in
//!   the kernel's backlog instead of taking the descriptors that claims,
//!   records and heartbeats need.
//! - **Headers must arrive in time.** hyper's `header_read_timeout` closes a
//!   connection that sends no complete request head within
//!   [`HEADER_TIMEOUT`] (slowloris), idle keep-alive connections included.
//! - **Requests must finish in time and bodies are capped** (tower-http's
//!   timeout and body-limit layers).
//!
//! `accept` errors (`EMFILE` and the like) are handled by axum's listener:
//! logged, then a pause of a second — never a hot loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::metrics::Metrics;

pub mod auth;
pub mod index;
pub mod publish;
pub mod tasks;

/// A connection must send a whole request head within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request must be answered within this: a long poll's longest `?wait=`
/// (SPEC §11: 60 s) and a margin.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(75);
/// Bodies of requests to the metrics routes (they take none).
const METRICS_MAX_BODY: usize = 16 * 1024;

/// How many connections may be open at once: a quarter of the descriptors
/// this process may open, so the spool always keeps the rest.
pub fn connection_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    (soft / 4).clamp(16, 1024)
}

async fn render(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
}

/// `GET /metrics` alone, to merge into another router.
pub fn metrics_route(m: Arc<Metrics>) -> Router {
    Router::new().route("/metrics", get(render)).with_state(m)
}

/// The Prometheus routes for `metrics.listen`: `GET /metrics` (and `/`).
pub fn metrics_routes(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/", get(render))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: try /metrics\n") })
        .layer(RequestBodyLimitLayer::new(METRICS_MAX_BODY))
        .with_state(m)
}

/// Binds `addr` and serves `router` on it until the runtime ends; returns
/// the bound address.
pub async fn serve(addr: SocketAddr, router: Router) -> std::io::Result<SocketAddr> {
    // A deep accept queue: while every connection permit is taken, clients
    // wait there (connected, not refused) until a slot frees.
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let mut listener = socket.listen(1024)?;
    let bound = listener.local_addr()?;
    let router = router
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        // A 5xx is answered and explained by the handler (a full disk, no
        // descriptors): a warning, not an error of the daemon's.
        .layer(
            TraceLayer::new_for_http()
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::WARN)),
        );
    let permits = Arc::new(Semaphore::new(connection_limit()));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (io, _peer) = axum::serve::Listener::accept(&mut listener).await;
            let service = TowerToHyperService::new(router.clone());
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(io), service);
                let _ = conn.await;
                drop(permit);
            });
        }
    });
    Ok(bound)
}
