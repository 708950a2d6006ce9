//! Bearer tokens: one asked of senders (agents, OTLP gRPC and HTTP), another of API clients
//! and the dashboard (DESIGN.md, reliability). Either is off when not configured.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::metrics::Metrics;

/// The cookie the dashboard keeps the API token in (set by `POST /api/v1/login`).
pub const COOKIE: &str = "sightline_token";

/// A configured token, or none (everyone allowed).
#[derive(Clone, Default)]
pub struct Token(Option<Arc<str>>);

impl Token {
    pub fn new(configured: &str) -> Self {
        Self((!configured.is_empty()).then(|| Arc::from(configured)))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Whether `offered` is the token (in constant time), or no token is asked.
    pub fn allows(&self, offered: Option<&str>) -> bool {
        match (&self.0, offered) {
            (None, _) => true,
            (Some(expected), Some(offered)) => bool::from(expected.as_bytes().ct_eq(offered.as_bytes())),
            (Some(_), None) => false,
        }
    }

    /// Whether the request's `authorization: Bearer` header (gRPC metadata or HTTP) carries it.
    pub fn allows_headers(&self, headers: &HeaderMap) -> bool {
        self.allows(bearer(headers))
    }
}

/// The token of an `authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    bearer_value(headers.get(header::AUTHORIZATION)?.to_str().ok()?)
}

/// The token of an `authorization` value `Bearer <token>`.
pub fn bearer_value(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The token of the dashboard's cookie.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The answer to a request without the right token.
pub fn unauthorized(what: &str) -> Response {
    let mut response = (
        StatusCode::UNAUTHORIZED,
        Json(json!({ "error": format!("{what} needs a bearer token: send `authorization: Bearer <token>`") })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Middleware for routes behind a token: the header, or the dashboard's cookie.
pub async fn require(
    State((token, metrics, receiver)): State<(Token, Arc<Metrics>, &'static str)>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    if token.allows(bearer(headers)) || (token.is_set() && token.allows(cookie(headers))) {
        return next.run(request).await;
    }
    metrics.reject_request(receiver, "unauthenticated");
    unauthorized(if receiver == "api" { "the API" } else { "ingest" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_the_header_or_the_cookie() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer s3cret"));
        headers.insert(header::COOKIE, HeaderValue::from_static("a=b; sightline_token=k3y"));
        assert_eq!(bearer(&headers), Some("s3cret"));
        assert_eq!(cookie(&headers), Some("k3y"));
        let token = Token::new("s3cret");
        assert!(token.allows_headers(&headers));
        assert!(!token.allows(Some("s3cre")));
        assert!(!token.allows(None));
        assert!(Token::new("").allows(None), "no token configured: open");
    }
}
