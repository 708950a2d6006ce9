//! reqwest middleware (feature `reqwest`): every request through a
//! [`reqwest_middleware::ClientWithMiddleware`] becomes a client span under the current span,
//! with `traceparent` and `baggage` injected so the callee continues the trace, and the
//! response's status recorded (5xx and transport errors mark it failed).
//!
//! The operation is the method, since raw URLs carry ids and would make names unbounded; name a
//! request's operation with the [`Operation`] extension.
//!
//! ```no_run
//! # async fn call() -> Result<(), reqwest_middleware::Error> {
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(sightline::reqwest::TracingMiddleware::new().peer("profiles"))
//!     .build();
//! client
//!     .get("http://profiles/users/42")
//!     .with_extension(sightline::reqwest::Operation("GET /users/{id}".into()))
//!     .send()
//!     .await?;
//! # Ok(())
//! # }
//! ```

use ::reqwest::{header::HeaderValue, Request, Response};
use http::Extensions;
use reqwest_middleware::{Middleware, Next, Result};

use crate::{propagation, span::Name};

/// A request's operation name, given as a request extension: a path template, never a raw URL.
#[derive(Clone, Debug)]
pub struct Operation(pub Name);

/// The middleware; add it with `reqwest_middleware::ClientBuilder::with`.
#[derive(Clone, Debug, Default)]
pub struct TracingMiddleware {
    peer: Option<Name>,
}

impl TracingMiddleware {
    /// Peers default to the request's host.
    pub fn new() -> Self {
        Self::default()
    }

    /// The service or system called (`profiles`, `payments-api`), instead of the host.
    pub fn peer(mut self, peer: impl Into<Name>) -> Self {
        self.peer = Some(peer.into());
        self
    }
}

#[async_trait::async_trait]
impl Middleware for TracingMiddleware {
    async fn handle(&self, mut request: Request, extensions: &mut Extensions, next: Next<'_>) -> Result<Response> {
        let operation = extensions
            .get::<Operation>()
            .map(|o| o.0.clone())
            .unwrap_or_else(|| Name::Owned(request.method().as_str().to_string()));
        let peer = self
            .peer
            .clone()
            .unwrap_or_else(|| Name::Owned(request.url().host_str().unwrap_or_default().to_string()));
        let mut span = crate::span(operation).client("http", peer).start();
        span.set_attribute("http.request.method", request.method().as_str());
        let headers = request.headers_mut();
        propagation::inject_from(&span, |name, value| {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        });
        let outcome = next.run(request, extensions).await;
        match &outcome {
            Ok(response) => {
                let status = response.status();
                span.set_http_status(status.as_u16());
                if status.is_server_error() {
                    span.set_error(
                        format!("HTTP {}", status.as_u16()),
                        status.canonical_reason().unwrap_or(""),
                    );
                }
            }
            Err(e) => span.set_error("transport", e),
        }
        outcome
    }
}
