//! OpenAI-style error objects: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error as the client sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// Seconds to wait before retrying (429, 503).
    pub retry_after: Option<u64>,
    /// OpenAI's `code`, where the status alone does not tell it (clients branch on it:
    /// `context_length_exceeded`, `model_not_found`).
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
            code: None,
        }
    }

    /// A 400 about one field.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A request whose events the decode thread stopped sending without ending it (a bug).
    pub fn dropped() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the decode thread dropped the request",
        )
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// OpenAI's `type` for this status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => "timeout_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        if self.code.is_some() {
            return self.code;
        }
        match self.status {
            StatusCode::TOO_MANY_REQUESTS => Some("rate_limit_exceeded"),
            StatusCode::PAYLOAD_TOO_LARGE => Some("request_too_large"),
            StatusCode::UNAUTHORIZED => Some("invalid_api_key"),
            _ => None,
        }
    }

    /// The JSON body (also sent as an SSE event when a stream fails midway).
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code(),
            }
        })
    }
}

/// What the request log says of an error response, carried to it in the response's extensions
/// ([`crate::routes`] logs each one once, with the request's method and path).
#[derive(Clone, Debug, PartialEq)]
pub struct Unlogged(pub String);

impl ApiError {
    /// The response of an error logged where it arose (the decode thread logs a generation's
    /// failure with the request's id): the request log leaves it out.
    pub fn into_logged_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = Unlogged(self.message.clone());
        let mut resp = self.into_logged_response();
        resp.extensions_mut().insert(message);
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carries_type_param_and_retry_after() {
        let e = ApiError::bad_param("top_p", "top_p must be in (0, 1]");
        assert_eq!(e.body()["error"]["param"], "top_p");
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        let r = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "busy")
            .retry_after(2)
            .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }
}
