//! One error type for every endpoint: an OpenAI error object (`{"error": {message, type,
//! param, code}}`) with its HTTP status; the Anthropic endpoints answer the same errors as
//! Anthropic error objects (`{"type": "error", "error": {type, message}}`, [`AnthropicError`]).
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::engine::prompt::PromptError;
use crate::engine::EngineError;

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`.
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub message: String,
    /// Seconds sent in a `Retry-After` header.
    pub retry_after: Option<u64>,
}

/// The JSON body of an error (also sent as the last event of a failed stream).
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// The one constructor; the helpers below name the common cases.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, code: None, param: None, message: message.into(), retry_after: None }
    }

    /// 400: the request is at fault.
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 500: the server is at fault.
    pub fn server(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// 503: the server cannot take the request now.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid or missing API key (send Authorization: Bearer KEY or x-api-key: KEY)",
        )
        .code("invalid_api_key")
    }

    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint")
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", format!("the request body is larger than the limit of {limit} bytes"))
            .code("request_too_large")
    }

    pub fn cancelled() -> ApiError {
        ApiError::unavailable("the request was cancelled (the server is shutting down)")
    }

    pub fn param(mut self, p: &'static str) -> ApiError {
        self.param = Some(p);
        self
    }

    pub fn code(mut self, c: &'static str) -> ApiError {
        self.code = Some(c);
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody { error: ErrorObject { message: &self.message, kind: self.kind, param: self.param, code: self.code } }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let resp = (self.status, Json(self.body())).into_response();
        self.with_retry_after(resp)
    }
}

impl ApiError {
    fn with_retry_after(&self, mut resp: Response) -> Response {
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }

    /// The error as Anthropic's API shapes it (also the `error` event of a failed stream).
    pub fn anthropic_body(&self) -> AnthropicErrorBody<'_> {
        let kind = match self.status.as_u16() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        };
        AnthropicErrorBody { kind: "error", error: AnthropicErrorObject { kind, message: &self.message } }
    }
}

#[derive(Serialize)]
pub struct AnthropicErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: AnthropicErrorObject<'a>,
}

#[derive(Serialize)]
struct AnthropicErrorObject<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

/// An [`ApiError`] answered in Anthropic's shape, with the same status.
#[derive(Debug)]
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> AnthropicError {
        AnthropicError(e)
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let resp = (self.0.status, Json(self.0.anthropic_body())).into_response();
        self.0.with_retry_after(resp)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match &e {
            EngineError::PromptTooLong { .. } => ApiError::bad(e.to_string()).code("context_length_exceeded").param("messages"),
            EngineError::Stopped => ApiError::unavailable(e.to_string()),
            EngineError::QueueFull { .. } => ApiError::unavailable(e.to_string()).code("queue_full").retry_after(1),
            _ if e.is_client_error() => ApiError::bad(e.to_string()),
            _ => ApiError::server(e.to_string()),
        }
    }
}

impl From<PromptError> for ApiError {
    fn from(e: PromptError) -> ApiError {
        if e.is_client_error() {
            ApiError::bad(e.to_string()).param("messages")
        } else {
            ApiError::server(e.to_string())
        }
    }
}
