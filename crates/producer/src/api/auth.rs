//! Bearer-token authentication. Tokens are compared as SHA-256 digests in constant time, so
//! neither a token's bytes nor its length leak through timing. Tokens are never logged.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::api::AppState;
use crate::api::error::ApiError;

pub(crate) fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Lets the request through when it carries an accepted token (or when none is configured).
pub(crate) async fn require_token(
    State(app): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if app.token_digests.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let Some(presented) = presented else {
        return ApiError::unauthorized("missing bearer token: send Authorization: Bearer <token>")
            .into_response();
    };
    let presented = digest(presented);
    let accepted = app
        .token_digests
        .iter()
        .fold(Choice::from(0), |found, token| {
            found | token.ct_eq(&presented)
        });
    if bool::from(accepted) {
        next.run(request).await
    } else {
        ApiError::unauthorized("invalid bearer token").into_response()
    }
}
