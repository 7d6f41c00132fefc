//! Errors of the library API and the Runflow-style HTTP error responses the simulator sends.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Errors returned by the embedding API ([`crate::start`], [`crate::SimHandle`]).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A configuration value is out of range or malformed.
    #[error("invalid simulator config: {0}")]
    InvalidConfig(String),
    /// Binding or inspecting the listening socket failed.
    #[error("simulator socket error")]
    Io(#[from] std::io::Error),
}

/// One entry of `errors[]` in a 422 response.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FieldError {
    /// Path of the offending field, e.g. `["input", "multi_prompt", 0, "duration"]`.
    pub(crate) loc: Vec<Value>,
    /// Human-readable reason.
    pub(crate) msg: String,
}

impl FieldError {
    pub(crate) fn new(loc: Vec<Value>, msg: impl Into<String>) -> Self {
        Self {
            loc,
            msg: msg.into(),
        }
    }
}

/// A Runflow error envelope `{code, message, errors}` with its status and extra headers.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) errors: Option<Vec<FieldError>>,
    pub(crate) headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            message: message.into(),
            errors: None,
            headers: Vec::new(),
        }
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "Missing or invalid API key.",
        )
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    pub(crate) fn run_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "RUN_NOT_FOUND", "Run not found.")
    }

    pub(crate) fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", "Resource not found.")
    }

    pub(crate) fn validation(code: &str, errors: Vec<FieldError>) -> Self {
        let mut error = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            code,
            "Input validation failed.",
        );
        error.errors = Some(errors);
        error
    }

    pub(crate) fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub(crate) fn body(&self) -> Value {
        let errors = self.errors.as_ref().map(|errors| {
            errors
                .iter()
                .map(|error| json!({"loc": error.loc, "msg": error.msg, "type": "value_error"}))
                .collect::<Vec<_>>()
        });
        json!({"code": self.code, "message": self.message, "errors": errors})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut response = (self.status, axum::Json(body)).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// An HTML error page as a proxy or load balancer in front of the API would send it.
pub(crate) fn html_error(status: StatusCode) -> Response {
    let reason = status.canonical_reason().unwrap_or("Error");
    let code = status.as_u16();
    let body = format!(
        "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    );
    (status, [(header::CONTENT_TYPE, "text/html")], body).into_response()
}

/// An S3-style XML error as presigned-URL storage (S3, R2) sends it.
pub(crate) fn s3_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{}</RequestId></Error>",
        uuid::Uuid::now_v7().simple()
    );
    (status, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
}
