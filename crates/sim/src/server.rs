//! Router and a hand-written accept loop that can close a connection without answering.
//!
//! axum's own `serve` gives a handler no way to drop its socket, which the "lost response" and
//! "reset" faults need. Here every connection gets a [`ConnHandle`] in its request extensions; a
//! handler calls [`ConnHandle::kill`] and the connection task drops the socket at once.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::state::Sim;
use crate::{admin, api, files};

/// How long open connections may finish their current request after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Lets a handler close its own TCP connection without sending a response.
#[derive(Clone, Debug)]
pub(crate) struct ConnHandle(CancellationToken);

impl ConnHandle {
    /// Drops the connection this request arrived on; the handler should then never return.
    pub(crate) fn kill(&self) {
        self.0.cancel();
    }
}

pub(crate) fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/v1/health", get(api::health))
        .route("/v1/auth/me", get(api::auth_me))
        .route("/v1/billing/balance", get(api::balance))
        .route("/v1/runs", get(api::list_runs))
        .route("/v1/runs/statuses", get(api::statuses))
        .route("/v1/runs/{id}", get(api::get_run))
        .route("/v1/models/{*path}", post(api::create_run))
        .route("/v1/run/{*model}", post(api::run_sync))
        .route("/v1/admin/runs/{id}/cancellation", post(api::cancel_run))
        .route("/files/{file}", get(files::download))
        .route("/__sim/runs", get(admin::runs))
        .route("/__sim/charges", get(admin::charges))
        .route("/__sim/stats", get(admin::stats))
        .route(
            "/__sim/config",
            get(admin::get_config).post(admin::set_config),
        )
        .route("/__sim/reset", post(admin::reset))
        .fallback(api::fallback)
        .with_state(sim)
}

/// Serves one connection until it ends, is killed by a handler, or shutdown passes its grace.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    router: Router,
    shutdown: CancellationToken,
) {
    let kill = CancellationToken::new();
    let handle = ConnHandle(kill.clone());
    let service = tower::ServiceExt::map_request(router, move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(handle.clone());
        request
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new());
    let connection =
        builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "sim connection ended with an error");
            }
        }
        () = kill.cancelled() => {
            tracing::debug!("sim dropped a connection on purpose");
        }
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection.as_mut()).await;
        }
    }
    // Dropping the connection here closes the socket, whatever state it was in.
}

/// Accepts connections until `shutdown` fires, then waits (bounded) for open connections.
pub(crate) async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                tracker.spawn(serve_connection(stream, router.clone(), shutdown.clone()));
            }
            Err(error) => {
                // Running out of file descriptors is transient; back off instead of spinning.
                tracing::warn!(%error, "sim accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}
