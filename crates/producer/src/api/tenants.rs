//! `GET /v1/tenants`, `GET /v1/tenants/{name}`, `PUT /v1/tenants/{name}`: each tenant's policy
//! and usage; operators set a policy for every process.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use http::HeaderMap;

use super::AppState;
use super::error::ApiError;
use super::handlers::{body_bytes, json_body, json_kind, serde_field_error};
use crate::view::{ErrorBody, TenantList, TenantPolicyView, TenantView};

/// Every tenant: its policy in force and what it uses (jobs per state, provider runs in
/// flight, jobs waiting for a slot, spend today).
#[utoipa::path(
    get,
    path = "/v1/tenants",
    tag = "tenants",
    operation_id = "list_tenants",
    responses(
        (status = 200, description = "Every tenant that has had a job or has a policy.", body = TenantList),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn list_tenants(
    State(app): State<AppState>,
) -> Result<Json<TenantList>, ApiError> {
    Ok(Json(TenantList {
        tenants: app.producer.tenants().await?,
    }))
}

fn name(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(name)| name)
        .map_err(|_| ApiError::field("name", "type", "must be a tenant name"))
}

/// One tenant (zero usage when it never had a job).
#[utoipa::path(
    get,
    path = "/v1/tenants/{name}",
    tag = "tenants",
    operation_id = "get_tenant",
    params(("name" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "The tenant's name.")),
    responses(
        (status = 200, description = "The tenant.", body = TenantView),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 422, description = "Not a valid tenant name.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn get_tenant(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<TenantView>, ApiError> {
    Ok(Json(app.producer.tenant(&name(path)?).await?))
}

/// Set a tenant's policy for every process (workers apply it within 10 s). It overrides the
/// settings file's `[tenants.NAME]` (and `[tenants.default]`); fields left out take their
/// defaults.
#[utoipa::path(
    put,
    path = "/v1/tenants/{name}",
    tag = "tenants",
    operation_id = "put_tenant",
    params(("name" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "The tenant's name.")),
    request_body(content = TenantPolicyView, content_type = "application/json"),
    responses(
        (status = 200, description = "The tenant with its new policy.", body = TenantView),
        (status = 400, description = "The body is not JSON.", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`.", body = ErrorBody),
        (status = 422, description = "An invalid name or policy, naming the field and the rule.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn put_tenant(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TenantView>, ApiError> {
    let name = name(path)?;
    let body = body_bytes(body, 16 * 1024)?;
    let value = json_body(&headers, &body)?;
    if !value.is_object() {
        return Err(ApiError::field(
            "",
            "type",
            format!("must be a JSON object, got {}", json_kind(&value)),
        ));
    }
    let policy: TenantPolicyView =
        serde_json::from_value(value).map_err(|e| serde_field_error(&e))?;
    Ok(Json(
        app.producer.set_tenant_policy(&name, policy.into()).await?,
    ))
}
