//! Nothing acknowledged is lost: `sightline serve` killed with SIGKILL in the middle of a
//! sustained load, and ClickHouse stopped for a minute under load. Senders are real OTLP/HTTP
//! clients; a span counts as acknowledged when its request was answered 200.

mod common;

use std::{
    collections::HashSet,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::free_port;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value::Value, AnyValue, KeyValue},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use prost::Message;
use sightline_collector::{store::launcher::ClickHouseServer, testing};

/// `sightline serve` as a separate process, so that it can be killed for real.
struct Serve {
    child: Child,
    http: u16,
    api: u16,
}

impl Serve {
    fn start(data_dir: &Path, clickhouse: &str, database: &str, extra: &[(&str, &str)]) -> Self {
        let (grpc, http, api) = (free_port(), free_port(), free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_sightline"));
        command
            .arg("serve")
            .env("SIGHTLINE_DATA_DIR", data_dir)
            .env("SIGHTLINE_CLICKHOUSE__URL", clickhouse)
            .env("SIGHTLINE_CLICKHOUSE__DATABASE", database)
            .env("SIGHTLINE_RECEIVERS__GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
            .env("SIGHTLINE_RECEIVERS__HTTP_LISTEN", format!("127.0.0.1:{http}"))
            .env("SIGHTLINE_API__LISTEN", format!("127.0.0.1:{api}"))
            .env("SIGHTLINE_WRITER__FLUSH_INTERVAL_MS", "300")
            .stdout(Stdio::null());
        for (key, value) in extra {
            command.env(key, value);
        }
        let child = command.spawn().expect("sightline runs");
        Self { child, http, api }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn stop(mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "sightline serve exited with {status}");
    }

    /// Resident memory of the collector process, in MiB.
    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = http("GET", &format!("http://127.0.0.1:{}/metrics", self.api), Vec::new())
            .await
            .unwrap_or_default();
        text.lines()
            .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    async fn wait_ready(&self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.api);
        let deadline = Instant::now() + Duration::from_secs(60);
        while http("GET", &url, Vec::new()).await.map(|(s, _)| s) != Some(200) {
            assert!(Instant::now() < deadline, "collector not ready within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

async fn http(method: &str, url: &str, body: Vec<u8>) -> Option<(u16, String)> {
    common::http(method, url, "application/x-protobuf", body).await
}

/// One request of `n` root server spans (one trace each) with span ids from `next_id`.
fn export(next_id: &AtomicU64, n: u64) -> (Vec<u64>, Vec<u8>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let first = next_id.fetch_add(n, Ordering::Relaxed);
    let ids: Vec<u64> = (first..first + n).collect();
    let spans = ids
        .iter()
        .map(|&id| {
            let mut trace_id = [7u8; 16];
            trace_id[8..].copy_from_slice(&id.to_be_bytes());
            Span {
                trace_id: trace_id.to_vec(),
                span_id: id.to_be_bytes().to_vec(),
                name: "POST /login".into(),
                kind: 2,
                start_time_unix_nano: now - 5_000_000,
                end_time_unix_nano: now - 5_000_000 + 1000 * (id % 5000 + 1),
                ..Span::default()
            }
        })
        .collect();
    let attribute = |key: &str, value: &str| KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    };
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![attribute("service.name", "auth"), attribute("service.version", "1.0")],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    };
    (ids, request.encode_to_vec())
}

/// Senders posting `spans_per_request` spans every `pause` until `stop`; what was answered 200.
struct Load {
    acked: Arc<Mutex<HashSet<u64>>>,
    refused: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    senders: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, senders: usize, spans_per_request: u64, pause: Duration) -> Self {
        let acked = Arc::new(Mutex::new(HashSet::new()));
        let refused = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let next_id = Arc::new(AtomicU64::new(1));
        let senders = (0..senders)
            .map(|_| {
                let (acked, refused, stop, next_id) = (acked.clone(), refused.clone(), stop.clone(), next_id.clone());
                tokio::spawn(async move {
                    let url = format!("http://127.0.0.1:{port}/v1/traces");
                    while !stop.load(Ordering::Relaxed) {
                        let (ids, body) = export(&next_id, spans_per_request);
                        match http("POST", &url, body).await {
                            Some((200, _)) => acked.lock().unwrap().extend(ids),
                            _ => {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Self {
            acked,
            refused,
            stop,
            senders,
        }
    }

    async fn finish(self) -> (HashSet<u64>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for sender in self.senders {
            sender.await.unwrap();
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        (acked, self.refused.load(Ordering::Relaxed))
    }
}

/// A ClickHouse server of one test's own, which the test stops and starts again.
struct OwnClickHouse(Option<ClickHouseServer>);

impl OwnClickHouse {
    fn url(&self) -> String {
        self.0.as_ref().expect("a server").url()
    }

    /// Stops it (blocking work, off the test's runtime threads).
    async fn stop(&mut self) {
        let mut server = self.0.take().expect("a server");
        self.0 = Some(
            tokio::task::spawn_blocking(move || {
                server.stop();
                server
            })
            .await
            .unwrap(),
        );
    }

    /// Starts it again on the same ports and data.
    async fn start(&mut self) {
        let mut server = self.0.take().expect("a server");
        self.0 = Some(
            tokio::task::spawn_blocking(move || {
                server.restart().unwrap();
                server
            })
            .await
            .unwrap(),
        );
    }
}

async fn sum(client: &clickhouse::Client, sql: &str) -> u64 {
    client.query(sql).fetch_one::<u64>().await.unwrap()
}

/// Every acknowledged span is stored once, and every aggregate counts each stored span once.
async fn assert_nothing_lost_nothing_doubled(client: &clickhouse::Client, acked: &HashSet<u64>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let stored: HashSet<u64> = loop {
        let ids: Vec<u64> = client.query("SELECT span_id FROM spans").fetch_all().await.unwrap();
        let stored: HashSet<u64> = ids.into_iter().collect();
        let missing = acked.difference(&stored).count();
        if missing == 0 {
            break stored;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} acknowledged spans never reached ClickHouse",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Whatever was durable is written (spans whose answer the kill cut off included): wait until
    // the aggregates have caught up with the spans, then compare exactly.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spans = sum(client, "SELECT count() FROM spans").await;
    assert_eq!(
        spans,
        sum(client, "SELECT uniqExact(span_id) FROM spans").await,
        "a span stored twice"
    );
    assert!(spans >= stored.len() as u64);
    for (what, sql) in [
        ("latency_1m calls", "SELECT sum(calls) FROM latency_1m"),
        ("latency_10s calls", "SELECT sum(calls) FROM latency_10s"),
        (
            "user edge calls",
            "SELECT sum(calls) FROM edges_1m WHERE caller = 'user'",
        ),
        ("stage spans", "SELECT sum(spans) FROM stages_1m"),
    ] {
        assert_eq!(sum(client, sql).await, spans, "{what} differ from the spans stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_then_restart_loses_nothing_acknowledged_and_counts_nothing_twice() {
    let data = tempfile::tempdir().unwrap();
    let url = testing::clickhouse().url();
    let database = testing::fresh_database("kill_9");
    let serve = Serve::start(data.path(), &url, &database, &[]);
    serve.wait_ready().await;
    let load = Load::start(serve.http, 4, 200, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before_kill = load.acked.lock().unwrap().len();
    assert!(
        before_kill > 1000,
        "the load is running ({before_kill} spans acknowledged)"
    );
    serve.kill();
    let (acked, _) = load.finish().await;
    let spool = data.path().join("spool");
    assert!(
        std::fs::read_dir(&spool)
            .unwrap()
            .any(|e| e.unwrap().path().extension() == Some("seg".as_ref())),
        "the spool holds what was not written"
    );
    // As if the kill had come before the writer's progress mark was saved: the restart replays
    // the whole spool, batches already written included, and the write ledger must skip those.
    std::fs::remove_file(spool.join("written")).unwrap();

    let serve = Serve::start(data.path(), &url, &database, &[]);
    serve.wait_ready().await;
    let client = sightline_collector::store::client(&url, &database, &Default::default());
    assert_nothing_lost_nothing_doubled(&client, &acked).await;
    let replayed = serve.metric("sightline_written_rows_total{table=\"spans\"}").await;
    let skipped = serve.metric("sightline_replay_skipped_total{table=\"spans\"}").await;
    println!(
        "acknowledged {} spans before kill -9; after restart {replayed} spans written from the spool, \
         {skipped} replayed batches skipped by the ledger",
        acked.len()
    );
    assert!(replayed > 0.0, "the restart wrote what the killed collector had not");
    assert!(skipped > 0.0, "batches written before the kill were skipped on replay");
    serve.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_away_for_a_minute_under_load_loses_nothing_and_memory_stays_bounded() {
    let ch_data = tempfile::tempdir().unwrap();
    let mut server = OwnClickHouse(Some(ClickHouseServer::start(ch_data.path(), "").unwrap()));
    let url = server.url();
    let database = testing::fresh_database("outage");
    let data = tempfile::tempdir().unwrap();
    // Small segments, so that written ones are deleted while the test runs.
    let serve = Serve::start(
        data.path(),
        &url,
        &database,
        &[("SIGHTLINE_SPOOL__SEGMENT_BYTES", "1048576")],
    );
    serve.wait_ready().await;
    // About 8k spans/s from two senders.
    let load = Load::start(serve.http, 2, 200, Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_before = serve.rss_mib();

    server.stop().await;
    let outage = Instant::now();
    let (mut rss_max, mut spool_max) = (rss_before, 0.0f64);
    let acked_before = load.acked.lock().unwrap().len();
    while outage.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_max = rss_max.max(serve.rss_mib());
        spool_max = spool_max.max(serve.metric("sightline_spool_bytes").await);
    }
    let acked_during = load.acked.lock().unwrap().len() - acked_before;
    server.start().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (acked, refused) = load.finish().await;

    let client = sightline_collector::store::client(&url, &database, &Default::default());
    assert_nothing_lost_nothing_doubled(&client, &acked).await;
    // Drained in order: every batch went into `spans` once, in ranges that never overlap.
    let ranges: Vec<(u64, u64)> = client
        .query("SELECT batch_lo, batch_hi FROM write_ledger WHERE target = 'spans' ORDER BY batch_lo")
        .fetch_all()
        .await
        .unwrap();
    assert!(
        ranges.windows(2).all(|w| w[0].1 < w[1].0),
        "overlapping batch ranges: {ranges:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let spool_after = loop {
        let bytes = serve.metric("sightline_spool_bytes").await;
        if bytes < 2.0 * 1048576.0 || Instant::now() > deadline {
            break bytes;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "ClickHouse away 60 s: {acked_during} spans acknowledged meanwhile, {} in all, {refused} requests \
         refused; spool peak {:.1} MiB, {:.1} MiB once drained; collector RSS {rss_before:.0} MiB before, \
         {rss_max:.0} MiB at most",
        acked.len(),
        spool_max / 1048576.0,
        spool_after / 1048576.0
    );
    assert!(
        acked_during > 100_000,
        "acknowledged while ClickHouse was away: {acked_during}"
    );
    assert!(
        spool_max > 4.0 * 1048576.0,
        "the outage waited in the spool ({spool_max} bytes)"
    );
    assert!(
        spool_after < 2.0 * 1048576.0,
        "written segments are deleted ({spool_after} bytes left)"
    );
    // The spool, not memory, holds the outage: RSS grows by far less than what was spooled.
    assert!(
        rss_max < rss_before + 100.0,
        "collector memory grew from {rss_before:.0} to {rss_max:.0} MiB"
    );
    serve.stop();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_refuses_with_429_acknowledges_nothing_refused_and_recovers() {
    let ch_data = tempfile::tempdir().unwrap();
    let mut server = OwnClickHouse(Some(ClickHouseServer::start(ch_data.path(), "").unwrap()));
    let url = server.url();
    let database = testing::fresh_database("spool_full");
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(
        data.path(),
        &url,
        &database,
        &[
            ("SIGHTLINE_SPOOL__MAX_BYTES", "2097152"),
            ("SIGHTLINE_SPOOL__SEGMENT_BYTES", "262144"),
        ],
    );
    serve.wait_ready().await;
    server.stop().await;

    // With ClickHouse away, requests fill the spool until it refuses them.
    let traces = format!("http://127.0.0.1:{}/v1/traces", serve.http);
    let next_id = AtomicU64::new(1);
    let mut acked = HashSet::new();
    let mut refusals = 0;
    let mut answers = 0;
    while refusals < 3 {
        let (ids, body) = export(&next_id, 200);
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let request = http::Request::builder()
            .method("POST")
            .uri(&traces)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                serde_json::to_vec(&ExportTraceServiceRequest::decode(body.as_slice()).unwrap()).unwrap(),
            )))
            .unwrap();
        let response = client.request(request).await.unwrap();
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").cloned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        match status {
            200 => {
                assert_eq!(refusals, 0, "once full, the spool stays full while ClickHouse is away");
                acked.extend(ids);
            }
            429 => {
                refusals += 1;
                assert!(retry_after.is_some(), "a refusal says when to retry");
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let message = body["error"].as_str().unwrap();
                assert!(message.contains("spool is full"), "{message}");
            }
            other => panic!("unexpected status {other}: {}", String::from_utf8_lossy(&body)),
        }
        answers += 1;
        assert!(answers < 2000, "the spool never filled");
    }
    assert!(acked.len() >= 10_000, "the spool took batches before it was full");
    let refused_metric = serve
        .metric("sightline_rejected_requests_total{receiver=\"otlp_http\",reason=\"spool_full\"}")
        .await;
    assert!(refused_metric >= 3.0, "refusals are counted ({refused_metric})");
    let spooled = serve.metric("sightline_spool_bytes").await;
    assert!(spooled <= 2097152.0, "the spool kept to its bound ({spooled} bytes)");

    server.start().await;
    // Once ClickHouse has the spooled batches, the spool takes new ones again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ids, body) = export(&next_id, 200);
        if let Some((200, _)) = http("POST", &traces, body).await {
            acked.extend(ids);
            break;
        }
        assert!(Instant::now() < deadline, "the spool never took batches again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let client = sightline_collector::store::client(&url, &database, &Default::default());
    assert_nothing_lost_nothing_doubled(&client, &acked).await;
    println!(
        "spool bound 2 MiB: {} spans acknowledged, {refusals} requests refused with 429 once full, all \
         acknowledged spans written after ClickHouse returned",
        acked.len()
    );
    serve.stop();
    server.stop().await;
}
