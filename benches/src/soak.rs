//! Soak: the release collector under a steady OTLP/gRPC load for a long time. Samples the
//! collector's resident memory and spool, and at the end checks that every acknowledged span is
//! in ClickHouse exactly once.
//!
//! cargo build --release -p sightline-collector -p sightline-benches
//! target/release/soak --minutes 30 --rate 50000

use std::{
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use clap::Parser;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{trace_service_client::TraceServiceClient, ExportTraceServiceRequest},
    common::v1::{any_value::Value, AnyValue, KeyValue},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use sightline_benches::{collector_binary, rss_mib, CollectorProcess};
use sightline_collector::store::launcher::ClickHouseServer;

#[derive(Parser)]
struct Args {
    /// How long the load runs.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Spans per second, sent open-loop (on a fixed schedule, whatever the answers).
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    #[arg(long, default_value_t = 500)]
    spans_per_request: u64,
    /// Concurrent gRPC connections.
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Seconds between printed lines (RSS is read every second; a line shows the mean since
    /// the last one).
    #[arg(long, default_value_t = 30)]
    sample_secs: u64,
    /// Samples before this many minutes are the warm-up: not counted in the RSS band.
    #[arg(long, default_value_t = 3.0)]
    warmup_minutes: f64,
}

const SERVICES: [&str; 5] = ["web", "auth", "chat", "billing", "search"];
const OPERATIONS: [&str; 4] = ["POST /login", "GET /chats/{id}", "POST /messages", "GET /search"];

fn attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    }
}

/// One request of `n` spans with ids from `first`: traces of a server span and a db call.
fn request(first: u64, n: u64, now_ns: u64) -> ExportTraceServiceRequest {
    let service = SERVICES[(first / n) as usize % SERVICES.len()];
    let mut spans = Vec::with_capacity(n as usize);
    for id in (first..first + n).step_by(2) {
        let mut trace_id = [3u8; 16];
        trace_id[8..].copy_from_slice(&id.to_be_bytes());
        let micros = 200 + (id * 7919) % 20_000;
        let operation = OPERATIONS[(id / 2) as usize % OPERATIONS.len()];
        let start = now_ns - 50_000_000;
        spans.push(Span {
            trace_id: trace_id.to_vec(),
            span_id: id.to_be_bytes().to_vec(),
            name: operation.into(),
            kind: 2,
            start_time_unix_nano: start,
            end_time_unix_nano: start + micros * 1000,
            attributes: vec![attribute("http.route", operation.split(' ').nth(1).unwrap_or("/"))],
            ..Span::default()
        });
        spans.push(Span {
            trace_id: trace_id.to_vec(),
            span_id: (id + 1).to_be_bytes().to_vec(),
            parent_span_id: id.to_be_bytes().to_vec(),
            name: "SELECT".into(),
            kind: 3,
            start_time_unix_nano: start + 10_000,
            end_time_unix_nano: start + 10_000 + micros * 600,
            attributes: vec![attribute("db.system", "postgresql")],
            ..Span::default()
        });
    }
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![attribute("service.name", service), attribute("service.version", "1.0")],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    }
}

/// One RSS reading a second, from its own task: a reading every 30 s would be one point of
/// the sawtooth each 50k-span flush draws, and a few unlucky points move a mean by MiBs.
fn sample_rss(pid: u32, started: Instant) -> Arc<std::sync::Mutex<Vec<(f64, f64, f64)>>> {
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = samples.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let (rss, anon) = rss_mib(pid);
            if rss == 0.0 {
                return;
            }
            let minutes = started.elapsed().as_secs_f64() / 60.0;
            out.lock().expect("sampler").push((minutes, rss, anon));
        }
    });
    samples
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

async fn metric(api: u16, sample: &str) -> f64 {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let Ok(uri) = format!("http://127.0.0.1:{api}/metrics").parse() else {
        return 0.0;
    };
    let Ok(response) = client.get(uri).await else {
        return 0.0;
    };
    let Ok(body) = http_body_util::BodyExt::collect(response.into_body()).await else {
        return 0.0;
    };
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    text.lines()
        .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.spans_per_request % 2 != 0 {
        bail!("--spans-per-request must be even (traces of two spans)");
    }
    let data = tempfile::tempdir()?;
    let server = ClickHouseServer::start(&data.path().join("clickhouse"), "")?;
    let collector = CollectorProcess::start(
        Command::new(collector_binary()?),
        &[
            ("SIGHTLINE_CLICKHOUSE__URL", server.url()),
            ("SIGHTLINE_CLICKHOUSE__DATABASE", "soak".into()),
            (
                "SIGHTLINE_DATA_DIR",
                data.path().join("collector").display().to_string(),
            ),
        ],
    )
    .await?;
    let pid = collector.pid();
    let requests_per_sec = args.rate as f64 / args.spans_per_request as f64;
    println!(
        "soak: {} spans/s ({requests_per_sec:.0} requests of {}) for {} min over {} connections",
        args.rate, args.spans_per_request, args.minutes, args.senders
    );

    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let late = Arc::new(AtomicU64::new(0));
    // Request ids, handed to whichever connection is free.
    let (tx, rx) = tokio::sync::mpsc::channel::<u64>(args.senders * 4);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut senders = Vec::new();
    for _ in 0..args.senders {
        let mut client = TraceServiceClient::connect(format!("http://127.0.0.1:{}", collector.grpc)).await?;
        let (rx, acked, refused) = (rx.clone(), acked.clone(), refused.clone());
        let n = args.spans_per_request;
        senders.push(tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(first) = next else { break };
                let now_ns = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("after 1970")
                    .as_nanos() as u64;
                match client.export(request(first, n, now_ns)).await {
                    Ok(_) => acked.fetch_add(n, Ordering::Relaxed),
                    Err(_) => refused.fetch_add(n, Ordering::Relaxed),
                };
            }
        }));
    }
    drop(rx);

    let started = Instant::now();
    let rss_samples = sample_rss(pid, started);
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / requests_per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut next_id = 1u64;
    let mut next_sample = Duration::from_secs(args.sample_secs);
    let mut last_acked = 0;
    let mut printed_samples = 0;
    while started.elapsed() < total {
        tick.tick().await;
        if tx.try_send(next_id).is_err() {
            // The senders are behind the schedule: the request is sent when one is free.
            late.fetch_add(1, Ordering::Relaxed);
            if tx.send(next_id).await.is_err() {
                break;
            }
        }
        next_id += args.spans_per_request;
        if started.elapsed() >= next_sample {
            let minutes = started.elapsed().as_secs_f64() / 60.0;
            let (rss, anon) = {
                let samples = rss_samples.lock().expect("sampler");
                let since = &samples[printed_samples.min(samples.len())..];
                printed_samples = samples.len();
                (mean(since.iter().map(|s| s.1)), mean(since.iter().map(|s| s.2)))
            };
            let now_acked = acked.load(Ordering::Relaxed);
            let spool = metric(collector.api, "sightline_spool_bytes").await / 1048576.0;
            println!(
                "t={minutes:5.1} min  rss {rss:6.1} MiB (anon {anon:6.1})  spool {spool:6.1} MiB  \
                 acked {now_acked:>11}  ({:.0} spans/s)  refused {}  late {}",
                (now_acked - last_acked) as f64 / args.sample_secs as f64,
                refused.load(Ordering::Relaxed),
                late.load(Ordering::Relaxed)
            );
            last_acked = now_acked;
            next_sample += Duration::from_secs(args.sample_secs);
        }
    }
    drop(tx);
    for sender in senders {
        sender.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (acked, refused) = (acked.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));

    let client = sightline_collector::store::client(&server.url(), "soak", &Default::default());
    let deadline = Instant::now() + Duration::from_secs(600);
    let stored = loop {
        let stored: u64 = client.query("SELECT count() FROM spans").fetch_one().await?;
        if stored >= acked || Instant::now() > deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let unique: u64 = client.query("SELECT uniqExact(span_id) FROM spans").fetch_one().await?;
    let latency_calls: u64 = client.query("SELECT sum(calls) FROM latency_1m").fetch_one().await?;
    let steady: Vec<(f64, f64, f64)> = rss_samples
        .lock()
        .expect("sampler")
        .iter()
        .filter(|(m, _, _)| *m >= args.warmup_minutes && *m * 60.0 <= elapsed)
        .copied()
        .collect();
    let (low, high) = steady
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), s| (lo.min(s.1), hi.max(s.1)));
    // Flat: no drift from the first quarter after the warm-up to the last one. Single readings
    // move with the allocator's caching around each 50k-span flush; means of minutes do not.
    let window = (steady.len() / 4).max(1);
    let early = mean(steady[..window].iter().map(|s| s.1));
    let late_rss = mean(steady[steady.len() - window..].iter().map(|s| s.1));
    let early_anon = mean(steady[..window].iter().map(|s| s.2));
    let late_anon = mean(steady[steady.len() - window..].iter().map(|s| s.2));
    let drift = (late_rss - early) / early;
    println!(
        "result: {:.0} min, {acked} spans acknowledged ({:.0}/s), {refused} refused, {} requests late; \
         stored {stored} (unique {unique}), latency_1m calls {latency_calls}",
        elapsed / 60.0,
        acked as f64 / elapsed,
        late.load(Ordering::Relaxed)
    );
    println!(
        "rss after warm-up: {low:.1}..{high:.1} MiB over {} one-second readings; mean of the first quarter \
         {early:.1} MiB (anon {early_anon:.1}), of the last quarter {late_rss:.1} MiB (anon {late_anon:.1}): \
         drift {:+.1}%",
        steady.len(),
        drift * 100.0
    );
    if stored != acked || unique != stored || latency_calls != stored {
        bail!("lost or doubled: acknowledged {acked}, stored {stored}, unique {unique}, counted {latency_calls}");
    }
    if drift.abs() > 0.10 {
        bail!("RSS drifted more than 10% from the first samples after the warm-up to the last");
    }
    drop(collector);
    Ok(())
}
