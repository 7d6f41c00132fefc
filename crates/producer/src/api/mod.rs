//! The HTTP API (`klingq serve`): [`router`] builds the axum router, [`serve`] runs it until a
//! shutdown signal. Routes and their behaviour are documented by the OpenAPI document
//! ([`ApiDoc`], served at `/openapi.json`).
//!
//! Every route but `/healthz`, `/readyz`, `/openapi.json` and Runflow's callback route needs
//! `Authorization: Bearer <token>` when tokens are configured; without tokens, [`serve`] only
//! listens on loopback. `POST /v1/provider/callbacks/runflow` ([`callbacks`]) is exempt on
//! purpose: Runflow cannot send a token, and the route authenticates each callback by its
//! `Runflow-Signature` instead.
//! The dashboard (`/` and `/dashboard/*`) is public: it is static, and its data calls carry the
//! token. More routes (e.g. metrics) join through [`ApiState::with_public_routes`] and
//! [`ApiState::with_protected_routes`].

mod auth;
mod batch_body;
mod callbacks;
mod error;
mod handlers;
mod history;
mod openapi;
mod ops;
mod tenants;
mod video;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use callbacks::{
    CALLBACK_OUTCOMES, CALLBACK_PATH, MAX_CALLBACK_BODY_BYTES, ProviderCallbackMetrics,
};
pub use history::{HistoryPointView, HistoryView};
pub use openapi::ApiDoc;
pub use video::{VideoLink, VideoLinkView, VideoLinks};

use crate::config::ApiConfig;
use crate::ops::StatsLimits;
use crate::producer::Producer;

/// What the handlers share.
pub(crate) struct Shared {
    pub(crate) producer: Producer,
    pub(crate) config: ApiConfig,
    /// SHA-256 digests of the accepted tokens, compared in constant time.
    pub(crate) token_digests: Vec<[u8; 32]>,
    /// Cancelled when the server shuts down, so event streams end.
    pub(crate) shutdown: CancellationToken,
    /// The worker's limits, reported by `GET /v1/stats`.
    pub(crate) limits: StatsLimits,
    /// One permit per open `GET /v1/events` stream (`api.max_event_streams`); each holds a
    /// Redis connection for its blocking reads.
    pub(crate) event_streams: Arc<tokio::sync::Semaphore>,
    /// `provider.callback_secret`, keyed: verifies Runflow's callbacks.
    pub(crate) callback_keys: callbacks::CallbackKeys,
    /// `klingq_provider_callbacks_total`, by outcome.
    pub(crate) callback_metrics: ProviderCallbackMetrics,
    /// Links to stored videos (`GET /v1/jobs/{id}/video`); `None` answers 503.
    pub(crate) video_links: video::SharedVideoLinks,
}

pub(crate) type AppState = Arc<Shared>;

/// The API's state, and routes added by other parts of klingq.
#[derive(Clone)]
pub struct ApiState {
    shared: AppState,
    public_routes: Router,
    protected_routes: Router,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("producer", &self.shared.producer)
            .field("tokens", &self.shared.token_digests.len())
            .field("callback_keys", &self.shared.callback_keys)
            .finish()
    }
}

impl ApiState {
    pub fn new(producer: Producer, config: ApiConfig) -> Self {
        let token_digests = config
            .tokens
            .iter()
            .filter(|token| !token.is_empty())
            .map(|token| auth::digest(token.expose()))
            .collect();
        let producer = producer.with_max_batch_jobs(config.max_batch_jobs);
        let event_streams = Arc::new(tokio::sync::Semaphore::new(config.max_event_streams));
        let callback_keys = callbacks::CallbackKeys::new(&config.callback_secrets);
        Self {
            shared: Arc::new(Shared {
                producer,
                config,
                token_digests,
                shutdown: CancellationToken::new(),
                limits: StatsLimits::default(),
                event_streams,
                callback_keys,
                callback_metrics: ProviderCallbackMetrics::default(),
                video_links: None,
            }),
            public_routes: Router::new(),
            protected_routes: Router::new(),
        }
    }

    /// Sets the worker limits `GET /v1/stats` reports (the provider limit's maximum, the daily
    /// budget); without it, the worker's defaults.
    pub fn with_stats_limits(self, limits: StatsLimits) -> Self {
        self.with_shared(|shared| shared.limits = limits)
    }

    /// Hands out links to stored videos at `GET /v1/jobs/{id}/video` (without it, 503).
    pub fn with_video_links(self, links: Arc<dyn VideoLinks>) -> Self {
        self.with_shared(|shared| shared.video_links = Some(links))
    }

    /// Changes the shared state before the router is built.
    fn with_shared(mut self, change: impl FnOnce(&mut Shared)) -> Self {
        let shared = &self.shared;
        let mut next = Shared {
            producer: shared.producer.clone(),
            config: shared.config.clone(),
            token_digests: shared.token_digests.clone(),
            shutdown: shared.shutdown.clone(),
            limits: shared.limits.clone(),
            event_streams: shared.event_streams.clone(),
            callback_keys: shared.callback_keys.clone(),
            callback_metrics: shared.callback_metrics.clone(),
            video_links: shared.video_links.clone(),
        };
        change(&mut next);
        self.shared = Arc::new(next);
        self
    }

    /// Adds routes that need no token (e.g. a metrics endpoint).
    pub fn with_public_routes(mut self, routes: Router) -> Self {
        self.public_routes = self.public_routes.merge(routes);
        self
    }

    /// Adds routes behind the bearer token (e.g. a dashboard).
    pub fn with_protected_routes(mut self, routes: Router) -> Self {
        self.protected_routes = self.protected_routes.merge(routes);
        self
    }

    pub fn producer(&self) -> &Producer {
        &self.shared.producer
    }

    /// The counters of Runflow's callbacks (`klingq_provider_callbacks_total`), for the
    /// process's `/metrics`.
    pub fn callback_metrics(&self) -> ProviderCallbackMetrics {
        self.shared.callback_metrics.clone()
    }

    /// Whether requests need a bearer token.
    pub fn requires_token(&self) -> bool {
        !self.shared.token_digests.is_empty()
    }
}

/// The API's router.
pub fn router(state: ApiState) -> Router {
    let app = state.shared.clone();
    let config = &app.config;
    let protected = Router::new()
        .route(
            "/v1/jobs",
            post(handlers::create_job)
                .layer(DefaultBodyLimit::max(config.max_job_body_bytes))
                .get(ops::list_jobs),
        )
        .route(
            "/v1/batches",
            post(handlers::create_batch)
                .layer(DefaultBodyLimit::max(config.max_batch_body_bytes))
                .get(ops::list_batches),
        )
        .route("/v1/stats", get(ops::stats))
        .route("/v1/tenants", get(tenants::list_tenants))
        .route(
            "/v1/tenants/{name}",
            get(tenants::get_tenant).put(tenants::put_tenant),
        )
        .route("/v1/stats/history", get(history::stats_history))
        .route("/v1/webhooks/deliveries", get(ops::list_deliveries))
        .route("/v1/webhooks/deliveries/{id}", get(ops::get_delivery))
        .route(
            "/v1/webhooks/deliveries/{id}/replay",
            post(ops::replay_delivery),
        )
        .route("/v1/webhooks/endpoints", get(ops::list_endpoints))
        .route(
            "/v1/webhooks/endpoints/{id}/enable",
            post(ops::enable_endpoint),
        )
        .route("/v1/jobs/{id}", get(handlers::get_job))
        .route("/v1/jobs/{id}/cancel", post(handlers::cancel_job))
        .route("/v1/jobs/{id}/video", get(video::job_video))
        .route("/v1/batches/{id}", get(handlers::get_batch))
        .route("/v1/batches/{id}/jobs", get(handlers::batch_jobs))
        .route("/v1/batches/{id}/cancel", post(handlers::cancel_batch))
        .route("/v1/batches/{id}/resume", post(handlers::resume_batch))
        .route("/v1/dead-letters", get(handlers::dead_letters))
        .route(
            "/v1/dead-letters/redrive",
            post(handlers::redrive).layer(DefaultBodyLimit::max(config.max_job_body_bytes)),
        )
        .route("/v1/events", get(handlers::events))
        .with_state(app.clone())
        .merge(state.protected_routes)
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            auth::require_token,
        ));
    let public = Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/openapi.json", get(handlers::openapi_json))
        // No bearer token: Runflow cannot send one. Each callback is authenticated by its
        // signature (see `callbacks`); the body limit is applied while reading, and a body
        // over it is answered (and counted) by the handler.
        .route(
            callbacks::CALLBACK_PATH,
            post(callbacks::runflow_callback)
                .layer(DefaultBodyLimit::max(callbacks::MAX_CALLBACK_BODY_BYTES)),
        )
        .with_state(app)
        .merge(crate::dashboard::routes())
        .merge(state.public_routes);
    public
        .merge(protected)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
}

/// The server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to serve on {0} without API tokens: set KLINGQ_API_TOKENS (api.tokens) or \
         bind a loopback address such as 127.0.0.1:8080"
    )]
    NoTokens(SocketAddr),
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the API on `listener` until `shutdown` completes, then stops accepting, ends event
/// streams and waits for requests in flight.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    if !state.requires_token() && !addr.ip().is_loopback() {
        return Err(ServeError::NoTokens(addr));
    }
    if !state.requires_token() {
        tracing::warn!(%addr, "no API tokens configured: the API is open to anyone on this host");
    }
    let token = state.shared.shutdown.clone();
    let app = router(state);
    tracing::info!(%addr, "api listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("api shutting down");
            token.cancel();
        })
        .await?;
    Ok(())
}
