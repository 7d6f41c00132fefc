//! Test-only admin endpoints under `/__sim/`: runs, charges, stats, config and reset.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::api::SharedSim;
use crate::error::ApiError;

/// `GET /__sim/runs`: every run with status, video hash and applied faults.
pub(crate) async fn runs(State(sim): State<SharedSim>) -> Response {
    // Hashing videos is CPU work, so it runs off the async workers.
    match tokio::task::spawn_blocking(move || sim.run_records()).await {
        Ok(records) => Json(records).into_response(),
        Err(error) => {
            tracing::error!(%error, "sim run listing failed");
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "run listing failed",
            )
            .into_response()
        }
    }
}

/// `GET /__sim/charges`: the billing ledger, settled up to now.
pub(crate) async fn charges(State(sim): State<SharedSim>) -> Response {
    Json(sim.charges()).into_response()
}

/// `GET /__sim/stats`: request counters per endpoint, fault counters and callback counters.
pub(crate) async fn stats(State(sim): State<SharedSim>) -> Response {
    Json(sim.stats()).into_response()
}

/// `GET /__sim/config`: the live config, API key redacted, plus the live balance.
pub(crate) async fn get_config(State(sim): State<SharedSim>) -> Response {
    let state = sim.lock();
    let mut config = state.config.redacted_json();
    config["live_balance_usd"] = json!(state.balance_micros() as f64 / 1_000_000.0);
    Json(config).into_response()
}

/// `POST /__sim/config`: a partial update; `balance_usd` also sets the live balance.
pub(crate) async fn set_config(State(sim): State<SharedSim>, body: Bytes) -> Response {
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(patch) => patch,
        Err(error) => {
            return ApiError::bad_request(format!("Malformed JSON body: {error}")).into_response();
        }
    };
    let mut state = sim.lock();
    match state.config.merged(&patch) {
        Ok(config) => {
            if let Some(balance) = patch.get("balance_usd").and_then(Value::as_f64) {
                state.set_balance_usd(balance);
            }
            state.config = config;
            tracing::info!("sim config updated");
            Json(state.config.redacted_json()).into_response()
        }
        Err(error) => ApiError::bad_request(error.to_string()).into_response(),
    }
}

/// `POST /__sim/reset`: forgets runs, charges and counters; keeps the config.
pub(crate) async fn reset(State(sim): State<SharedSim>) -> Response {
    sim.lock().reset();
    Json(json!({"reset": true})).into_response()
}
