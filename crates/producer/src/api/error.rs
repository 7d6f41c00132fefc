//! Errors as the API sends them: a status and `{"error": {"code", "message", "details"}}`.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use klingq_core::{FieldError, ValidationErrors};

use crate::error::{CappedErrors, ProducerError};
use crate::producer::batch_error_details;
use crate::view::{ErrorBody, ErrorDetail, ErrorInfo};

/// An error response.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    /// The errors listed (at most [`crate::MAX_ERROR_DETAILS`]).
    pub(crate) details: Vec<ErrorDetail>,
    /// Every error found; more than `details.len()` when the list is truncated.
    pub(crate) total_details: usize,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            total_details: 0,
        }
    }

    pub(crate) fn validation(message: impl Into<String>, details: Vec<ErrorDetail>) -> Self {
        Self {
            total_details: details.len(),
            details,
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                message,
            )
        }
    }

    /// A 422 for one field.
    pub(crate) fn field(path: &str, rule: &str, message: impl Into<String>) -> Self {
        let field = FieldError::new(path, rule, message);
        Self::validation(field.to_string(), vec![ErrorDetail::new(field)])
    }

    /// A 422 listing the first [`crate::MAX_ERROR_DETAILS`] of the errors, counting all.
    pub(crate) fn from_capped(message: impl Into<String>, errors: CappedErrors) -> Self {
        let total_details = errors.total();
        Self {
            total_details,
            ..Self::validation(message, errors.into_details())
        }
    }

    pub(crate) fn from_validation(errors: ValidationErrors) -> Self {
        Self::from_capped(errors.summary(), errors.into())
    }

    pub(crate) fn bad_json(error: &serde_json::Error) -> Self {
        let field = FieldError::new("", "json", format!("the body is not valid JSON: {error}"));
        Self {
            details: vec![ErrorDetail::new(field.clone())],
            total_details: 1,
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_json", field.message)
        }
    }

    pub(crate) fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub(crate) fn unsupported_media_type(expected: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send the body with Content-Type: {expected}"),
        )
    }
}

impl From<ProducerError> for ApiError {
    fn from(error: ProducerError) -> Self {
        match error {
            ProducerError::Invalid(errors) => ApiError::from_validation(errors),
            ProducerError::InvalidBatch(errors) => {
                ApiError::from_capped(errors.summary(), batch_error_details(&errors))
            }
            ProducerError::JobNotFound(_) | ProducerError::BatchNotFound(_) => {
                ApiError::not_found(error.to_string())
            }
            ProducerError::Unreachable { .. } => {
                tracing::warn!(error = %error, "redis unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the queue's Redis is unavailable; retry later",
                )
            }
            ProducerError::Queue(ref queue_error) if queue_error.is_transient() => {
                tracing::warn!(error = %error, "redis unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the queue's Redis is unavailable; retry later",
                )
            }
            ProducerError::Queue(_) | ProducerError::Encode(_) => {
                tracing::error!(error = %error, "request failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the server log",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: ErrorInfo::new(self.code, self.message, self.details, self.total_details),
            }),
        )
            .into_response();
        if unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"klingq\""),
            );
        }
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            // Redis away or every event stream taken: worth another try shortly.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        }
        response
    }
}
