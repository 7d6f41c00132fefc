//! `klingq serve`: the HTTP API on `api.bind` (or `--bind`), until SIGTERM or SIGINT.

use anyhow::Context;
use clap::Args;
use klingq_core::CostModel;
use klingq_producer::{ApiState, Producer, StatsLimits};

use crate::cli::shutdown_signal;
use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on, `host:port` (default: the `api.bind` setting, 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    bind: Option<String>,
}

pub(crate) async fn run(args: ServeArgs, settings: Settings) -> anyhow::Result<()> {
    let mut config = settings.api;
    if let Some(bind) = args.bind {
        config.bind = bind;
    }
    let cost = CostModel {
        usd_per_second: settings.worker.usd_per_second,
    };
    let producer = Producer::connect(settings.queue, cost)
        .await?
        .with_tenants(settings.tenants.clone())
        .with_provider_slots(settings.worker.provider_concurrency);
    let listener = tokio::net::TcpListener::bind(&config.bind)
        .await
        .with_context(|| format!("listening on {}", config.bind))?;
    let state = api_state_for(producer, config, &settings.worker);
    let state = crate::video_links::with_video_links(state, settings.storage).await;
    klingq_producer::serve(listener, state, shutdown_signal()).await?;
    Ok(())
}

/// The API's state with everything `klingq serve` adds to the producer's routes: `/metrics`
/// (with the API's own Runflow callback counters), and the worker's default limits for
/// `GET /v1/stats`. `config.callback_secrets` comes from `provider.callback_secret`.
pub(crate) fn api_state(producer: Producer, config: klingq_producer::ApiConfig) -> ApiState {
    api_state_for(producer, config, &klingq_worker::WorkerConfig::default())
}

/// [`api_state`], reporting `worker`'s provider limit and daily budget in `GET /v1/stats`.
pub(crate) fn api_state_for(
    producer: Producer,
    config: klingq_producer::ApiConfig,
    worker: &klingq_worker::WorkerConfig,
) -> ApiState {
    let queue = producer.queue().clone();
    let scraped = producer.clone();
    let limits = StatsLimits {
        provider_limit: klingq_worker::pipeline::PROVIDER_LIMIT.to_owned(),
        provider_max: worker.provider_concurrency,
        daily_budget_usd: worker.daily_budget_usd,
    };
    let state = ApiState::new(producer, config).with_stats_limits(limits);
    let mut process = prometheus_client::registry::Registry::default();
    klingq_queue::metrics::register_build_info(&mut process, "api");
    process.register_collector(Box::new(klingq_queue::metrics::redis_errors(&queue)));
    state.callback_metrics().register(&mut process);
    let metrics = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .with_state((scraped, std::sync::Arc::new(process)));
    state.with_public_routes(metrics)
}

/// Queue depth, jobs finished, spend, webhook deliveries and per-tenant usage (the 20 most
/// active tenants, the rest as `tenant="_other"`), read from Redis for this scrape, then the
/// process's own metrics (Redis errors, the Runflow callbacks it answered,
/// `klingq_build_info`); OpenMetrics or Prometheus text as the scraper's `Accept` asks. 503 when
/// Redis does not answer.
async fn metrics(
    axum::extract::State((producer, process)): axum::extract::State<(
        Producer,
        std::sync::Arc<prometheus_client::registry::Registry>,
    )>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use klingq_queue::metrics::{Format, QueueMetrics};
    let format = Format::negotiate(
        headers
            .get(axum::http::header::ACCEPT)
            .and_then(|value| value.to_str().ok()),
    );
    let queue = producer.queue();
    let webhooks = queue.for_queue(klingq_events::DELIVERY_QUEUE);
    let read = async {
        let queue_metrics = QueueMetrics::read(queue, Some(&webhooks))
            .await
            .map_err(|e| e.to_string())?;
        let tenant_metrics = producer.tenant_metrics().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((queue_metrics, tenant_metrics))
    };
    match read.await {
        Ok((queue_metrics, tenant_metrics)) => {
            let mut scrape = prometheus_client::registry::Registry::default();
            queue_metrics.register(&mut scrape);
            tenant_metrics.register(&mut scrape);
            (
                [(axum::http::header::CONTENT_TYPE, format.content_type())],
                format.encode(&[&scrape, &process]),
            )
                .into_response()
        }
        Err(error) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("metrics unavailable: {error}"),
        )
            .into_response(),
    }
}
