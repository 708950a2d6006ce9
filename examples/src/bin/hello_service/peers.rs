//! The same service traced by a peer instead of the agent, for the whole-service comparison
//! (`service-overhead --peers-too`, benches/README.md): fastrace and the OpenTelemetry SDK, each
//! put on axum as a user without an integration crate would (an `axum::middleware::from_fn` on
//! the router: a server span named by method and route template, its W3C parent from the
//! headers, the handler's db span its child) and each handing its spans to a sink that discards
//! them, as in the span benchmarks (benches/benches/span_overhead.rs): the peers do no export
//! work, where the agent encodes and sends every span and keeps RED histograms.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        OnceLock,
    },
};

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::Response,
};
use opentelemetry::{
    context::FutureExt as _,
    propagation::{Extractor, TextMapCompositePropagator, TextMapPropagator},
    trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _},
    KeyValue,
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    propagation::{BaggagePropagator, TraceContextPropagator},
    trace::{BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter},
};

/// A tracer to compare the agent with.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// fastrace, reporting to a reporter that discards.
    Fastrace,
    /// The OpenTelemetry SDK: batch span processor, an exporter that discards.
    Opentelemetry,
    /// No tracer: the peers' `from_fn` middleware doing nothing but call the route, what that
    /// way onto axum costs by itself.
    Middleware,
}

/// Share of new traces the peer records (`--sampling-ratio`), set once by [`start`].
static SAMPLING_RATIO: OnceLock<f64> = OnceLock::new();

/// The OpenTelemetry side's tracer and propagator, set once by [`start`].
struct OpenTelemetry {
    tracer: SdkTracer,
    propagator: TextMapCompositePropagator,
}

static OPENTELEMETRY: OnceLock<OpenTelemetry> = OnceLock::new();

/// Spans the peer's sink was handed, printed at the end: that the peer did trace.
static DISCARDED: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
struct DiscardExporter;

impl SpanExporter for DiscardExporter {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        DISCARDED.fetch_add(batch.len(), Ordering::Relaxed);
        drop(batch);
        std::future::ready(Ok(()))
    }
}

struct DiscardReporter;

impl fastrace::collector::Reporter for DiscardReporter {
    fn report(&mut self, spans: Vec<fastrace::prelude::SpanRecord>) {
        DISCARDED.fetch_add(spans.len(), Ordering::Relaxed);
        drop(spans);
    }
}

/// Starts `peer`'s pipeline, recording `sampling_ratio` of the traces that start here (a
/// caller's decision is followed); dropping what it returns flushes it.
pub fn start(peer: Peer, sampling_ratio: f64) -> Stopper {
    let _ = SAMPLING_RATIO.set(sampling_ratio);
    match peer {
        Peer::Fastrace => {
            fastrace::set_reporter(DiscardReporter, fastrace::collector::Config::default());
            Stopper(None)
        }
        Peer::Opentelemetry => {
            let provider = SdkTracerProvider::builder()
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    sampling_ratio,
                ))))
                .with_span_processor(BatchSpanProcessor::builder(DiscardExporter).build())
                .build();
            let propagator = TextMapCompositePropagator::new(vec![
                Box::new(TraceContextPropagator::new()),
                Box::new(BaggagePropagator::new()),
            ]);
            let tracer = provider.tracer("hello");
            let _ = OPENTELEMETRY.set(OpenTelemetry { tracer, propagator });
            Stopper(Some(provider))
        }
        Peer::Middleware => Stopper(None),
    }
}

/// Flushes the peer's pipeline when dropped.
pub struct Stopper(Option<SdkTracerProvider>);

impl Drop for Stopper {
    fn drop(&mut self) {
        match self.0.take() {
            Some(provider) => drop(provider.shutdown()),
            None => fastrace::flush(),
        }
        eprintln!(
            "peer: {} spans recorded and discarded",
            DISCARDED.load(Ordering::Relaxed)
        );
    }
}

/// Puts `peer`'s server span on every route of `router`.
pub fn layer<S: Clone + Send + Sync + 'static>(router: axum::Router<S>, peer: Peer) -> axum::Router<S> {
    match peer {
        Peer::Fastrace => router.layer(axum::middleware::from_fn(fastrace_entry)),
        Peer::Opentelemetry => router.layer(axum::middleware::from_fn(opentelemetry_entry)),
        Peer::Middleware => router.layer(axum::middleware::from_fn(|request: Request, next: Next| {
            next.run(request)
        })),
    }
}

/// "GET /users/{id}", or the method alone off the routes.
fn server_span_name(request: &Request) -> String {
    match request.extensions().get::<MatchedPath>() {
        Some(route) => format!("{} {}", request.method(), route.as_str()),
        None => request.method().to_string(),
    }
}

async fn fastrace_entry(request: Request, next: Next) -> Response {
    use fastrace::prelude::{Span, SpanContext};
    let parent = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(SpanContext::decode_w3c_traceparent)
        .unwrap_or_else(|| {
            // fastrace leaves sampling to its user: the trace id's low bits decide, as
            // OpenTelemetry's ratio sampler does.
            let context = SpanContext::random();
            let ratio = SAMPLING_RATIO.get().copied().unwrap_or(1.0);
            let sampled = (context.trace_id.0 as u64) < (ratio * u64::MAX as f64) as u64;
            context.sampled(sampled || ratio >= 1.0)
        });
    let root = Span::root(server_span_name(&request), parent);
    // fastrace's `in_span` would take the span, whose status is only known after.
    let mut handling = std::pin::pin!(next.run(request));
    let response = std::future::poll_fn(|cx| {
        let _parent = root.set_local_parent();
        handling.as_mut().poll(cx)
    })
    .await;
    root.add_property(|| ("http.response.status_code", response.status().as_str().to_owned()));
    response
}

/// The request's headers as OpenTelemetry's propagators read them.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}

async fn opentelemetry_entry(request: Request, next: Next) -> Response {
    let Some(otel) = OPENTELEMETRY.get() else {
        return next.run(request).await;
    };
    let parent = otel.propagator.extract(&Headers(request.headers()));
    let mut attributes = vec![KeyValue::new(
        "http.request.method",
        request.method().as_str().to_owned(),
    )];
    if let Some(route) = request.extensions().get::<MatchedPath>() {
        attributes.push(KeyValue::new("http.route", route.as_str().to_owned()));
    }
    let span = otel
        .tracer
        .span_builder(server_span_name(&request))
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(&otel.tracer, &parent);
    let context = parent.with_span(span);
    let response = next.run(request).with_context(context.clone()).await;
    let span = context.span();
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(response.status().as_u16()),
    ));
    if response.status().is_server_error() {
        span.set_status(Status::error(""));
    }
    span.end();
    response
}

/// A db client span inside the current server span, by whoever traces the service; ends when
/// dropped.
pub enum ChildSpan {
    Sightline(#[allow(dead_code)] sightline::EnteredSpan),
    Fastrace(#[allow(dead_code)] fastrace::local::LocalSpan),
    OpenTelemetry(#[allow(dead_code)] opentelemetry::ContextGuard),
}

/// Enters a db client span named `statement` on `peer` (e.g. "postgres:users").
pub fn db_span(tracer: Option<Peer>, statement: &'static str, peer: &'static str) -> ChildSpan {
    match tracer {
        None | Some(Peer::Middleware) => ChildSpan::Sightline(sightline::span(statement).client("db", peer).entered()),
        Some(Peer::Fastrace) => ChildSpan::Fastrace(
            fastrace::local::LocalSpan::enter_with_local_parent(statement)
                .with_properties(|| [("db.system.name", "postgres"), ("peer.service", peer)]),
        ),
        Some(Peer::Opentelemetry) => {
            let Some(otel) = OPENTELEMETRY.get() else {
                return ChildSpan::Sightline(sightline::span(statement).client("db", peer).entered());
            };
            let span = otel
                .tracer
                .span_builder(statement)
                .with_kind(SpanKind::Client)
                .with_attributes([
                    KeyValue::new("db.system.name", "postgres"),
                    KeyValue::new("peer.service", peer),
                ])
                .start(&otel.tracer);
            ChildSpan::OpenTelemetry(opentelemetry::Context::current_with_span(span).attach())
        }
    }
}
