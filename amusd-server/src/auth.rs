//! API keys, as llama.cpp's and vLLM's `--api-key` ask for them: with keys set, a request to any
//! route but `/health` and `/metrics` (what load balancers and scrapers poll) must carry one, as
//! `Authorization: Bearer KEY` (OpenAI's clients) or `X-Api-Key: KEY`; without, it gets a 401.

use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The routes that answer without a key.
const OPEN_ROUTES: [&str; 2] = ["/health", "/metrics"];

/// The keys a client may present; none means the server is open.
#[derive(Clone, Default)]
pub struct ApiKeys(Vec<String>);

/// A key that cannot be one.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KeyError {
    #[error("an API key is empty")]
    Empty,
    #[error("an API key holds whitespace or a control character; HTTP headers could not carry it")]
    NotAToken,
}

impl ApiKeys {
    pub fn new(keys: Vec<String>) -> Result<Self, KeyError> {
        for k in &keys {
            if k.is_empty() {
                return Err(KeyError::Empty);
            }
            if k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(KeyError::NotAToken);
            }
        }
        Ok(Self(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `headers` carry one of the keys. Every key is compared in time independent of
    /// where the first difference lies, so response times do not reveal a key's prefix.
    fn admit(&self, headers: &HeaderMap) -> bool {
        let Some(given) = presented(headers) else {
            return false;
        };
        self.0.iter().fold(false, |hit, k| {
            hit | constant_time_eq::constant_time_eq(k.as_bytes(), given.as_bytes())
        })
    }
}

/// Never prints the keys (they land in `Limits`, which is debug-printed).
impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

/// The key a request presents: the bearer token (the scheme's case ignored, RFC 7235), else
/// `X-Api-Key`.
fn presented(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
}

/// The middleware: passes open routes and requests with a key, answers the rest with a 401.
pub async fn require_key(State(keys): State<Arc<ApiKeys>>, req: Request, next: Next) -> Response {
    if keys.is_empty() || OPEN_ROUTES.contains(&req.uri().path()) || keys.admit(req.headers()) {
        return next.run(req).await;
    }
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "a missing or wrong API key: send one of the server's keys as `Authorization: Bearer KEY` or `X-Api-Key: KEY`",
    )
    .into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, value.parse().unwrap());
        }
        h
    }

    #[test]
    fn admits_either_header_and_any_of_the_keys() {
        let keys = ApiKeys::new(vec!["k1".into(), "sk-two".into()]).unwrap();
        assert!(keys.admit(&headers(&[("authorization", "Bearer sk-two")])));
        assert!(keys.admit(&headers(&[("authorization", "bearer k1")])));
        assert!(keys.admit(&headers(&[("x-api-key", "k1")])));
        for refused in [
            vec![],
            vec![("authorization", "Bearer sk-tw")],
            vec![("authorization", "Bearer sk-two2")],
            vec![("authorization", "Basic sk-two")],
            vec![("authorization", "sk-two")],
            vec![("x-api-key", "K1")],
        ] {
            assert!(!keys.admit(&headers(&refused)), "{refused:?}");
        }
    }

    #[test]
    fn refuses_keys_that_no_header_could_carry_and_hides_them() {
        assert_eq!(ApiKeys::new(vec!["".into()]).unwrap_err(), KeyError::Empty);
        assert_eq!(
            ApiKeys::new(vec!["a b".into()]).unwrap_err(),
            KeyError::NotAToken
        );
        let keys = ApiKeys::new(vec!["secret".into()]).unwrap();
        assert_eq!(format!("{keys:?}"), "ApiKeys(1 keys)");
    }
}
