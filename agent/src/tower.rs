//! Tower layers: [`ServerLayer`] for servers built on tower (axum, hyper, tonic) and
//! [`ClientLayer`] for clients that are tower services (hyper-util's client, tonic channels).
//!
//! ```no_run
//! # #[cfg(feature = "axum")] {
//! let app: axum::Router = axum::Router::new()
//!     .route("/login", axum::routing::post(|| async { "ok" }))
//!     .layer(sightline::tower::ServerLayer::new().naming(|op| (op == "POST /login").then(|| "Login".into())));
//!
//! // The same on each handler instead: cheaper per request (see `ServerLayer::handler`).
//! let traced = sightline::tower::ServerLayer::new();
//! let app: axum::Router = axum::Router::new()
//!     .route("/login", axum::routing::post(traced.handler(|| async { "ok" })));
//! # }
//! ```

use std::{
    cell::RefCell,
    future::Future,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use http::{header::HeaderName, HeaderMap, HeaderValue, Request, Response};
use rustc_hash::FxHashMap;
use tower::{Layer, Service};

use crate::{
    names, propagation,
    span::{self, Name, Span},
};

type NamingRule = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What every service a [`ServerLayer`] made shares: the naming rule and each operation's BT
/// by it, worked out on the operation's first request (a rule is a function of the operation).
/// Operations and BTs are interned ([`names`]). One `Arc`: routers clone the service per
/// request.
#[derive(Default)]
struct Naming {
    rule: Option<NamingRule>,
    bts: RwLock<FxHashMap<&'static str, Option<&'static str>>>,
}

/// Starts a business transaction per request: context from `traceparent`/`baggage`, the
/// operation from the route template (axum, with the `axum` feature) or the gRPC method, never
/// the raw URL. Responses with status 5xx, or a gRPC error status, mark it failed.
#[derive(Clone, Default)]
pub struct ServerLayer {
    naming: Arc<Naming>,
}

impl ServerLayer {
    /// Operations name their own BT until [`ServerLayer::naming`] says otherwise.
    pub fn new() -> Self {
        Self::default()
    }

    /// What starts entry spans by this layer's naming.
    fn entry(&self) -> Entry {
        Entry {
            naming: self.naming.clone(),
        }
    }

    /// A naming rule: from the operation (`POST /login`, `/chat.Agent/Accept`) to the business
    /// transaction (`Login`). Operations it does not name are their own BT. The rule runs once
    /// per operation and its answer is kept: it must depend on the operation alone.
    pub fn naming(mut self, rule: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        self.naming = Arc::new(Naming {
            rule: Some(Arc::new(rule)),
            bts: RwLock::default(),
        });
        self
    }
}

impl<S> Layer<S> for ServerLayer {
    type Service = ServerService<S>;

    fn layer(&self, inner: S) -> ServerService<S> {
        ServerService {
            inner,
            entry: self.entry(),
        }
    }
}

/// The service [`ServerLayer`] wraps around a server's.
#[derive(Clone)]
pub struct ServerService<S> {
    inner: S,
    entry: Entry,
}

/// Starts a request's entry span: what [`ServerService`] and [`TracedHandler`] share.
#[derive(Clone)]
struct Entry {
    naming: Arc<Naming>,
}

impl Entry {
    /// The request's entry span, started, and whether it is a gRPC call.
    fn start<B>(&self, request: &Request<B>) -> (Span, bool) {
        let remote = propagation::extract(|name| header(request.headers(), name));
        #[cfg(feature = "axum")]
        let recent = self.recent_names(request);
        #[cfg(not(feature = "axum"))]
        let recent: Option<(&'static str, Option<&'static str>)> = None;
        let (operation, bt, grpc) = match recent {
            // A route template is never a gRPC call's.
            Some((operation, bt)) => (Name::Borrowed(operation), bt.map(Name::Borrowed), false),
            None => {
                let (operation, bt, grpc) = OPERATION.with_borrow_mut(|operation| {
                    operation.clear();
                    let grpc = server_operation(request, operation);
                    let (operation, bt) = self.names(operation);
                    (operation, bt, grpc)
                });
                #[cfg(feature = "axum")]
                if !grpc {
                    self.remember(request, &operation, &bt);
                }
                (operation, bt, grpc)
            }
        };
        (span::start_server_entry(operation, bt, remote), grpc)
    }

    /// The operation and its BT (`None`: the operation is its own). Interned names after an
    /// operation's first request, so a request allocates no name.
    fn names(&self, operation: &str) -> (Name, Option<Name>) {
        let known = self
            .naming
            .bts
            .read()
            .ok()
            .and_then(|bts| bts.get_key_value(operation).map(|(&kept, &bt)| (kept, bt)));
        if let Some((kept, bt)) = known {
            return (Name::Borrowed(kept), bt.map(Name::Borrowed));
        }
        let bt = self.naming.rule.as_ref().and_then(|rule| rule(operation));
        let interned = names::intern(operation).zip(match &bt {
            Some(bt) => names::intern(bt).map(Some),
            None => Some(None),
        });
        match interned {
            Some((kept, kept_bt)) => {
                if let Ok(mut bts) = self.naming.bts.write() {
                    bts.insert(kept, kept_bt);
                }
                (Name::Borrowed(kept), kept_bt.map(Name::Borrowed))
            }
            // Past the interning bounds: owned names, as many as the rule makes.
            None => (Name::Owned(operation.to_owned()), bt.map(Name::Owned)),
        }
    }

    /// The names of a request to a route this thread named recently: found by the route
    /// template's address (axum keeps one `Arc<str>` a route, which the entry holds, so the
    /// address is no other text's while kept) and the method, without building the operation
    /// or taking the lock (~230 instructions a request otherwise).
    #[cfg(feature = "axum")]
    fn recent_names<B>(&self, request: &Request<B>) -> Option<(&'static str, Option<&'static str>)> {
        let route = request.extensions().get::<axum::extract::MatchedPath>()?.as_str();
        let slot = recent_slot(&self.naming, route);
        RECENT_NAMES.with_borrow(|recent| {
            let known = recent[slot].as_ref()?;
            let found = Arc::ptr_eq(&known.naming, &self.naming)
                && std::ptr::eq(known.route.as_str(), route)
                && known.method == request.method();
            found.then_some((known.operation, known.bt))
        })
    }

    /// Keeps the interned names of a request to an axum route for [`Self::recent_names`].
    #[cfg(feature = "axum")]
    fn remember<B>(&self, request: &Request<B>, operation: &Name, bt: &Option<Name>) {
        let Some(route) = request.extensions().get::<axum::extract::MatchedPath>() else {
            return;
        };
        let (Name::Borrowed(operation), None | Some(Name::Borrowed(_))) = (operation, bt) else {
            return; // owned names: past the interning bounds, not kept
        };
        let slot = recent_slot(&self.naming, route.as_str());
        let known = RecentName {
            naming: self.naming.clone(),
            route: route.clone(),
            method: request.method().clone(),
            operation,
            bt: match bt {
                Some(Name::Borrowed(bt)) => Some(bt),
                _ => None,
            },
        };
        RECENT_NAMES.with_borrow_mut(|recent| recent[slot] = Some(known));
    }
}

/// A route's interned names, as [`RECENT_NAMES`] keeps them.
#[cfg(feature = "axum")]
struct RecentName {
    /// The layer's rule (another layer may name the same route otherwise), held so that its
    /// address is not another's while kept here.
    naming: Arc<Naming>,
    /// The route template: its address finds the entry, and held here it is no other text's.
    route: axum::extract::MatchedPath,
    method: http::Method,
    operation: &'static str,
    bt: Option<&'static str>,
}

/// Slots of [`RECENT_NAMES`].
#[cfg(feature = "axum")]
const RECENT_NAME_SLOTS: usize = 32;

#[cfg(feature = "axum")]
fn recent_slot(naming: &Arc<Naming>, route: &str) -> usize {
    let mixed = (route.as_ptr() as usize ^ (Arc::as_ptr(naming) as usize).rotate_left(29)) as u64;
    (mixed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59) as usize
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ServerService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: std::fmt::Display,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Traced<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (span, grpc) = self.entry.start(&request);
        // The handler's synchronous part runs inside `call`: make the span current for it too.
        let future = span.in_scope(|| self.inner.call(request));
        Traced {
            future,
            span: Some(span),
            grpc,
        }
    }
}

/// An axum handler inside its request's entry span, as [`ServerLayer::handler`] makes it.
#[cfg(feature = "axum")]
#[derive(Clone)]
pub struct TracedHandler<H> {
    handler: H,
    entry: Entry,
}

#[cfg(feature = "axum")]
impl ServerLayer {
    /// The same tracing as the layer's, applied to one axum handler instead of a whole
    /// [`axum::Router`]: `.route("/login", post(layer.handler(login)))`. For hot routes:
    /// `Router::layer` wraps each route in one more boxed service, cloned and called with a
    /// boxed future per request (~1,000 instructions, half as much again as this layer's own
    /// work on the request's thread; benches/README.md); a wrapped handler adds neither. The
    /// operation is still the route template, the naming rule the layer's.
    pub fn handler<H>(&self, handler: H) -> TracedHandler<H> {
        TracedHandler {
            handler,
            entry: self.entry(),
        }
    }
}

#[cfg(feature = "axum")]
impl<H, T, S> axum::handler::Handler<T, S> for TracedHandler<H>
where
    H: axum::handler::Handler<T, S>,
    S: Send + Sync + 'static,
{
    type Future = TracedResponse<H::Future>;

    fn call(self, request: axum::extract::Request, state: S) -> Self::Future {
        let (span, _) = self.entry.start(&request);
        // A handler may do work in `call` itself, before its future: inside the span too.
        let scope = span.scope();
        let future = self.handler.call(request, state);
        drop(scope);
        TracedResponse {
            future,
            span: Some(span),
        }
    }
}

#[cfg(feature = "axum")]
pin_project_lite::pin_project! {
    /// A [`TracedHandler`]'s response future: the span ends with the response and records its
    /// status.
    pub struct TracedResponse<F> {
        #[pin]
        future: F,
        span: Option<Span>,
    }
}

#[cfg(feature = "axum")]
impl<F: Future<Output = axum::response::Response>> Future for TracedResponse<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        Span::poll_in_scope(
            this.span,
            || this.future.poll(cx),
            |span, response| record_response(span, response, false),
        )
    }
}

/// Records a call out: a client span with its peer, and the context injected from that span
/// so the callee's entry span is its child.
#[derive(Clone)]
pub struct ClientLayer {
    component: Name,
    peer: Option<Name>,
}

impl Default for ClientLayer {
    fn default() -> Self {
        Self {
            component: Name::Borrowed("http"),
            peer: None,
        }
    }
}

impl ClientLayer {
    /// Calls over HTTP; the peer defaults to the request's host.
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls over gRPC (tonic channels); name the peer, since channel requests carry no host.
    pub fn grpc(peer: impl Into<Name>) -> Self {
        Self {
            component: Name::Borrowed("grpc"),
            peer: Some(peer.into()),
        }
    }

    /// The service or system called (`auth`, `payments-api`), instead of the host.
    pub fn peer(mut self, peer: impl Into<Name>) -> Self {
        self.peer = Some(peer.into());
        self
    }
}

impl<S> Layer<S> for ClientLayer {
    type Service = ClientService<S>;

    fn layer(&self, inner: S) -> ClientService<S> {
        ClientService {
            inner,
            component: self.component.clone(),
            peer: self.peer.clone(),
        }
    }
}

/// The service [`ClientLayer`] wraps around a client's.
#[derive(Clone)]
pub struct ClientService<S> {
    inner: S,
    component: Name,
    peer: Option<Name>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ClientService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: std::fmt::Display,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Traced<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let grpc = is_grpc(&request);
        let operation = if grpc {
            request.uri().path().to_string()
        } else {
            request.method().to_string()
        };
        let peer = self
            .peer
            .clone()
            .unwrap_or_else(|| Name::Owned(request.uri().host().unwrap_or_default().to_string()));
        let span = crate::span(operation).client(self.component.clone(), peer).start();
        let headers = request.headers_mut();
        propagation::inject_from(&span, |name, value| {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        });
        Traced {
            future: self.inner.call(request),
            span: Some(span),
            grpc,
        }
    }
}

pin_project_lite::pin_project! {
    /// A response future inside its span; the span ends with the response and records its status.
    pub struct Traced<F> {
        #[pin]
        future: F,
        span: Option<Span>,
        // A gRPC call: its status is read from the response too.
        grpc: bool,
    }
}

impl<F, B, E> Future for Traced<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: std::fmt::Display,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let grpc = *this.grpc;
        Span::poll_in_scope(
            this.span,
            || this.future.poll(cx),
            |span, outcome| record_outcome(span, outcome, grpc),
        )
    }
}

/// The response's HTTP status, and a failure for a 5xx, a gRPC error status (looked up only for
/// gRPC calls: a header lookup by a name not in HTTP's table hashes it, for every request) or a
/// transport error.
fn record_outcome<B, E: std::fmt::Display>(span: &mut Span, outcome: &Result<Response<B>, E>, grpc: bool) {
    match outcome {
        Ok(response) => record_response(span, response, grpc),
        Err(e) => span.set_error("transport", e),
    }
}

fn record_response<B>(span: &mut Span, response: &Response<B>, grpc: bool) {
    let status = response.status();
    span.set_http_status(status.as_u16());
    let grpc_status = if grpc {
        response
            .headers()
            .get(&GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("0")
    } else {
        "0"
    };
    if status.is_server_error() {
        span.set_error(
            format!("HTTP {}", status.as_u16()),
            status.canonical_reason().unwrap_or(""),
        );
    } else if grpc_status != "0" {
        let message = response
            .headers()
            .get(&GRPC_MESSAGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        span.set_error(format!("gRPC {grpc_status}"), message);
    }
}

fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

thread_local! {
    /// Where a request's operation name is put together: no allocation per request.
    static OPERATION: RefCell<String> = const { RefCell::new(String::new()) };
    /// Routes this thread named lately, direct-mapped by [`recent_slot`].
    #[cfg(feature = "axum")]
    static RECENT_NAMES: RefCell<[Option<RecentName>; RECENT_NAME_SLOTS]> =
        const { RefCell::new([const { None }; RECENT_NAME_SLOTS]) };
}

// Header names made once: a name given as a string is parsed at every lookup.
static TRACEPARENT: HeaderName = HeaderName::from_static(propagation::TRACEPARENT);
static BAGGAGE: HeaderName = HeaderName::from_static(propagation::BAGGAGE);
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// A propagation header by its name.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let known = match name {
        propagation::TRACEPARENT => Some(&TRACEPARENT),
        propagation::BAGGAGE => Some(&BAGGAGE),
        _ => None,
    };
    let value = match known {
        // A request's few headers are compared faster than a name outside HTTP's table is
        // hashed for the map (~200 instructions a lookup, most requests having neither).
        Some(known) if headers.len() <= SCANNED_HEADERS => {
            headers.iter().find(|(name, _)| *name == known).map(|(_, value)| value)
        }
        Some(known) => headers.get(known),
        None => headers.get(name),
    };
    value.and_then(|v| v.to_str().ok())
}

/// Up to this many header values, propagation headers are found by comparing names.
const SCANNED_HEADERS: usize = 8;

/// A bounded operation name, into `out`: the gRPC method, the route template, or the method
/// alone. True for a gRPC call.
fn server_operation<B>(request: &Request<B>, out: &mut String) -> bool {
    if is_grpc(request) {
        out.push_str(request.uri().path());
        return true;
    }
    #[cfg(feature = "axum")]
    if let Some(route) = request.extensions().get::<axum::extract::MatchedPath>() {
        out.push_str(request.method().as_str());
        out.push(' ');
        out.push_str(route.as_str());
        return false;
    }
    // Raw paths carry ids and would make names unbounded: without a template, the method only.
    out.push_str(request.method().as_str());
    false
}
