//! Span enter/exit cost for traces of 1, 10, 100 and 1000 spans: a root span with N-1 child
//! spans entered and exited inside it, per library, in one run (compare the ratios).
//!
//! - `sightline`, sampled: the agent; its exporter drains, folds RED and discards the spans.
//! - `sightline_unsampled`: the same trace when its root was not sampled (children are no-ops).
//! - `opentelemetry_sdk`: batch span processor, an exporter that does nothing.
//! - `fastrace`: a reporter that discards.
//! - `tracing_opentelemetry`: `tracing` spans through `tracing-opentelemetry` into the same SDK.
//! - `two_clock_reads`: no span, only the two reads of the CPU's time-stamp counter that timing
//!   a span takes (its start and its end; the agent's and fastrace's clock): the floor under
//!   any span timed this way on the machine at hand.
//!
//! Run: cargo bench -p sightline-benches --bench span_overhead

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use opentelemetry::trace::{TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter},
};
use tracing_subscriber::layer::SubscriberExt;

const SIZES: [u64; 4] = [1, 10, 100, 1000];

#[derive(Debug)]
struct NoopExporter;

impl SpanExporter for NoopExporter {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        drop(batch);
        std::future::ready(Ok(()))
    }
}

struct DiscardReporter;

impl fastrace::collector::Reporter for DiscardReporter {
    fn report(&mut self, spans: Vec<fastrace::prelude::SpanRecord>) {
        drop(spans);
    }
}

fn otel_provider() -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(NoopExporter).build())
        .build()
}

fn bench(c: &mut Criterion) {
    // The equivalent of the others' discarding sinks: nothing listens, and with no room for
    // pending spans the exporter drains, folds RED, and discards every span it is handed.
    let _agent = sightline::init(sightline::Config {
        service: "bench".into(),
        collector: "http://127.0.0.1:9".into(),
        max_pending_spans: 0,
        ..Default::default()
    })
    .unwrap();
    fastrace::set_reporter(DiscardReporter, fastrace::collector::Config::default());
    let provider = otel_provider();
    let tracer = provider.tracer("bench");
    let layer_provider = otel_provider();
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(layer_provider.tracer("bench"))),
    );

    let mut group = c.benchmark_group("trace");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30);
    for n in SIZES {
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::new("sightline", n), &n, |b, &n| {
            b.iter(|| {
                let _root = sightline::transaction("Login").entered();
                for _ in 1..n {
                    let _child = sightline::span("child").entered();
                }
            })
        });
        let unsampled = sightline_benches::unsampled_caller();
        group.bench_with_input(BenchmarkId::new("sightline_unsampled", n), &n, |b, &n| {
            b.iter(|| {
                let _root = sightline::transaction("Login")
                    .child_of(Some(unsampled.clone()))
                    .entered();
                for _ in 1..n {
                    let _child = sightline::span("child").entered();
                }
            })
        });
        group.bench_with_input(BenchmarkId::new("opentelemetry_sdk", n), &n, |b, &n| {
            b.iter(|| {
                let root = tracer.start("Login");
                let cx = opentelemetry::Context::current_with_span(root);
                for _ in 1..n {
                    let _child = tracer.start_with_context("child", &cx);
                }
            })
        });
        group.bench_with_input(BenchmarkId::new("fastrace", n), &n, |b, &n| {
            b.iter(|| {
                let root = fastrace::Span::root("Login", fastrace::prelude::SpanContext::random());
                let _guard = root.set_local_parent();
                for _ in 1..n {
                    let _child = fastrace::local::LocalSpan::enter_with_local_parent("child");
                }
            })
        });
        #[cfg(target_arch = "x86_64")]
        group.bench_with_input(BenchmarkId::new("two_clock_reads", n), &n, |b, &n| {
            b.iter(|| {
                for _ in 0..n {
                    // SAFETY: `rdtsc` has no preconditions on x86_64.
                    let (start, end) = unsafe {
                        (
                            core::arch::x86_64::_rdtsc(),
                            std::hint::black_box(core::arch::x86_64::_rdtsc()),
                        )
                    };
                    std::hint::black_box(end.wrapping_sub(start));
                }
            })
        });
        tracing::dispatcher::with_default(&dispatch, || {
            group.bench_with_input(BenchmarkId::new("tracing_opentelemetry", n), &n, |b, &n| {
                b.iter(|| {
                    let _root = tracing::info_span!("Login").entered();
                    for _ in 1..n {
                        let _child = tracing::info_span!("child").entered();
                    }
                })
            });
        });
    }
    group.finish();
    println!(
        "sightline spans dropped by the capped exporter: {}",
        sightline::dropped_spans()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
