//! ClickHouse goes away and comes back: the writer keeps the rows it was given, retries with
//! backoff, and writes them once the server answers again; /readyz tells the truth meanwhile.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use sightline_collector::{store::launcher::ClickHouseServer, Collector};
use sightline_tests::{
    eventually, get, metric,
    otlp::{kv, request, span, trace_id},
    testing,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_retries_until_clickhouse_returns_and_loses_nothing() {
    let data = tempfile::tempdir().unwrap();
    let mut server = ClickHouseServer::start(data.path(), "").unwrap();
    let mut config = testing::config("writer_retry");
    config.clickhouse.url = server.url();
    config.writer.max_attempts = 40;
    let collector = Collector::start(config).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let mut client = TraceServiceClient::connect(format!("http://{}", collector.grpc_addr))
        .await
        .unwrap();

    let before = trace_id();
    client
        .export(request("chat", vec![span(&before, 1, "AcceptChat", 5, vec![])]))
        .await
        .unwrap();
    let id = hex::encode(&before);
    eventually("the first span", Duration::from_secs(20), || async {
        (get(&format!("{api}/api/v1/traces/{id}")).await.status == 200).then_some(())
    })
    .await;

    server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .unwrap();
    assert_eq!(
        get(&format!("{api}/readyz")).await.status,
        503,
        "not ready without ClickHouse"
    );
    let during = trace_id();
    client
        .export(request("chat", vec![span(&during, 2, "AcceptChat", 7, vec![])]))
        .await
        .unwrap();
    eventually("a failed insert attempt", Duration::from_secs(20), || async {
        let text = String::from_utf8(get(&format!("{api}/metrics")).await.body.to_vec()).unwrap();
        (metric(&text, "sightline_insert_failures_total{table=\"spans\"}") >= 1.0).then_some(())
    })
    .await;

    let mut server = tokio::task::spawn_blocking(move || {
        server.restart().unwrap();
        server
    })
    .await
    .unwrap();
    let id = hex::encode(&during);
    let trace = eventually(
        "the span sent while ClickHouse was down",
        Duration::from_secs(30),
        || async {
            let r = get(&format!("{api}/api/v1/traces/{id}")).await;
            (r.status == 200).then(|| r.json())
        },
    )
    .await;
    assert_eq!(trace["spans"][0]["duration_us"], 7000);
    assert_eq!(get(&format!("{api}/readyz")).await.status, 200);
    let text = String::from_utf8(get(&format!("{api}/metrics")).await.body.to_vec()).unwrap();
    assert_eq!(
        metric(&text, "sightline_dropped_spans_total{reason=\"insert_failed\"}"),
        0.0
    );
    assert_eq!(metric(&text, "sightline_written_rows_total{table=\"spans\"}"), 2.0);
    collector.shutdown().await.unwrap();
    tokio::task::spawn_blocking(move || server.stop()).await.unwrap();
}

/// A TCP relay to ClickHouse that can lose every answer (the request reaches the server, an
/// INSERT commits, the connection is cut at the first byte of the response) or cut off the
/// next INSERT into `spans_input` after the first chunk of its body, as a collector killed
/// while sending leaves it.
struct Relay {
    addr: SocketAddr,
    lose_answers: Arc<AtomicBool>,
    cut_next_span_insert: Arc<AtomicBool>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let lose_answers = Arc::new(AtomicBool::new(false));
        let cut_next_span_insert = Arc::new(AtomicBool::new(false));
        let (lose, cut) = (lose_answers.clone(), cut_next_span_insert.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (lose, cut) = (lose.clone(), cut.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let requests = async {
                        let mut buffer = vec![0u8; 64 * 1024];
                        // Received, not yet forwarded: a request held until it is known
                        // whether (and where) to cut it.
                        let mut held = Vec::new();
                        loop {
                            let n = client_read.read(&mut buffer).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            held.extend_from_slice(&buffer[..n]);
                            let armed = cut.load(Ordering::SeqCst);
                            if armed {
                                if let Some(end) = first_chunk_end_of_span_insert(&held) {
                                    cut.store(false, Ordering::SeqCst);
                                    let _ = server_write.write_all(&held[..end]).await;
                                    // The connection ends without the body's last chunk.
                                    return;
                                }
                            }
                            let forward = if armed { undecided_from(&held) } else { held.len() };
                            if server_write.write_all(&held[..forward]).await.is_err() {
                                return;
                            }
                            held.drain(..forward);
                        }
                    };
                    let answers = async {
                        let mut buffer = vec![0u8; 64 * 1024];
                        loop {
                            let n = server_read.read(&mut buffer).await.unwrap_or(0);
                            if n == 0 || lose.load(Ordering::SeqCst) {
                                return;
                            }
                            if client_write.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    // Either side ending drops both connections.
                    tokio::select! {
                        _ = requests => {}
                        _ = answers => {}
                    }
                });
            }
        });
        Self {
            addr,
            lose_answers,
            cut_next_span_insert,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

/// The last request in `bytes` (its line and headers received) that is an INSERT into
/// `spans_input`: where its body starts.
fn span_insert_body(bytes: &[u8]) -> Option<usize> {
    let start = (0..bytes.len()).rev().find(|&i| bytes[i..].starts_with(b"POST "))?;
    let headers_end = find(bytes, b"\r\n\r\n", start)?;
    find(&bytes[..headers_end], b"spans_input", start)?;
    Some(headers_end + 4)
}

/// Where the first chunk of a span INSERT's body ends, once it has all arrived.
fn first_chunk_end_of_span_insert(bytes: &[u8]) -> Option<usize> {
    let body = span_insert_body(bytes)?;
    let line_end = find(bytes, b"\r\n", body)?;
    let size = usize::from_str_radix(std::str::from_utf8(&bytes[body..line_end]).ok()?.trim(), 16).ok()?;
    let end = line_end + 2 + size + 2;
    (size > 0 && bytes.len() >= end).then_some(end)
}

/// How much of `held` can go on while a span INSERT may still be cut: all but a request whose
/// headers are incomplete or that is a span INSERT.
fn undecided_from(held: &[u8]) -> usize {
    let Some(start) = (0..held.len()).rev().find(|&i| held[i..].starts_with(b"POST ")) else {
        return held.len();
    };
    match find(held, b"\r\n\r\n", start) {
        None => start,
        Some(_) if span_insert_body(held).is_some() => start,
        Some(_) => held.len(),
    }
}

async fn count(client: &clickhouse::Client, sql: &str) -> u64 {
    client.query(sql).fetch_one::<u64>().await.unwrap()
}

/// A collector whose ClickHouse traffic goes through a [`Relay`]; `direct` reaches ClickHouse
/// itself.
struct Relayed {
    collector: Collector,
    relay: Relay,
    direct: clickhouse::Client,
    api: String,
    client: TraceServiceClient<tonic::transport::Channel>,
}

impl Relayed {
    async fn start(name: &str, cut_first_span_insert: bool) -> Self {
        let mut config = testing::config(name);
        let direct =
            sightline_collector::store::client(&config.clickhouse.url, &config.clickhouse.database, &config.clickhouse);
        let upstream: SocketAddr = config.clickhouse.url.trim_start_matches("http://").parse().unwrap();
        let relay = Relay::start(upstream).await;
        relay
            .cut_next_span_insert
            .store(cut_first_span_insert, Ordering::SeqCst);
        config.clickhouse.url = format!("http://{}", relay.addr);
        let collector = Collector::start(config).await.unwrap();
        let api = format!("http://{}", collector.api_addr);
        let client = TraceServiceClient::connect(format!("http://{}", collector.grpc_addr))
            .await
            .unwrap();
        Self {
            collector,
            relay,
            direct,
            api,
            client,
        }
    }

    /// The collector's Prometheus text.
    async fn metrics(&self) -> String {
        String::from_utf8(get(&format!("{}/metrics", self.api)).await.body.to_vec()).unwrap()
    }
}

/// The answer to an INSERT that ClickHouse committed never arrives: the writer must not write
/// those rows again (a lost answer looks like any other network error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_whose_answer_is_lost_is_not_written_twice() {
    let mut relayed = Relayed::start("lost_answer", false).await;
    let direct = relayed.direct.clone();

    let first = trace_id();
    relayed
        .client
        .export(request("chat", vec![span(&first, 1, "AcceptChat", 5, vec![])]))
        .await
        .unwrap();
    // Every INSERT of the first flush answered (the writer reports its batch written): an
    // answer lost later would hold the inserters back before they reach the second span.
    eventually("the first flush written whole", Duration::from_secs(20), || async {
        let text = relayed.metrics().await;
        let durable = metric(&text, "sightline_spool_durable_seq");
        (durable >= 1.0 && metric(&text, "sightline_spool_written_seq") >= durable).then_some(())
    })
    .await;
    assert_eq!(count(&direct, "SELECT count() FROM spans").await, 1);

    relayed.relay.lose_answers.store(true, Ordering::SeqCst);
    let second = trace_id();
    relayed
        .client
        .export(request("chat", vec![span(&second, 2, "AcceptChat", 7, vec![])]))
        .await
        .unwrap();
    eventually(
        "the second span committed, its answer lost",
        Duration::from_secs(20),
        || async {
            let failed = metric(
                &relayed.metrics().await,
                "sightline_insert_failures_total{table=\"spans\"}",
            );
            (failed >= 1.0 && count(&direct, "SELECT count() FROM spans").await >= 2).then_some(())
        },
    )
    .await;
    // Long enough for several retries while answers are still lost.
    tokio::time::sleep(Duration::from_secs(3)).await;
    relayed.relay.lose_answers.store(false, Ordering::SeqCst);
    eventually("the writer sees the rows written", Duration::from_secs(30), || async {
        (metric(
            &relayed.metrics().await,
            "sightline_written_rows_total{table=\"spans\"}",
        ) == 2.0)
            .then_some(())
    })
    .await;
    // Aggregates go through their own inserters: give them the same chance to finish.
    eventually("latency_1m written", Duration::from_secs(30), || async {
        (count(&direct, "SELECT toUInt64(sum(calls)) FROM latency_1m").await >= 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    assert_eq!(
        count(&direct, "SELECT count() FROM spans").await,
        2,
        "a span written twice"
    );
    assert_eq!(
        count(&direct, "SELECT toUInt64(sum(calls)) FROM latency_1m").await,
        2,
        "calls counted twice"
    );
    assert_eq!(
        count(
            &direct,
            "SELECT count() - uniqExact(target, batch_lo, batch_hi) FROM write_ledger"
        )
        .await,
        0,
        "a batch recorded twice in the ledger"
    );
    let text = relayed.metrics().await;
    assert_eq!(
        metric(&text, "sightline_dropped_spans_total{reason=\"insert_failed\"}"),
        0.0
    );
    relayed.collector.shutdown().await.unwrap();
}

/// The connection of an INSERT is lost after its first chunk (a collector killed mid-send, a
/// network cut): ClickHouse 18.16 takes a chunked body cut at a chunk boundary as complete, so
/// without the whole-INSERT guard its first rows were committed, the ledger claimed the batch,
/// and the retry skipped the rest. Every span must be stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_cut_off_mid_send_is_written_whole_once() {
    let mut relayed = Relayed::start("cut_insert", true).await;
    let direct = relayed.direct.clone();

    // Enough rows for several chunks (the client sends one per ~256 KiB).
    const SPANS: u64 = 4000;
    let trace = trace_id();
    let long = "x".repeat(100);
    let spans = (1..=SPANS)
        .map(|i| span(&trace, i, "AcceptChat", 5, vec![kv("chat.note", &long)]))
        .collect();
    relayed.client.export(request("chat", spans)).await.unwrap();
    eventually(
        "the cut INSERT retried and written",
        Duration::from_secs(30),
        || async {
            let text = relayed.metrics().await;
            (!relayed.relay.cut_next_span_insert.load(Ordering::SeqCst)
                && metric(&text, "sightline_insert_failures_total{table=\"spans\"}") >= 1.0
                && metric(&text, "sightline_written_rows_total{table=\"spans\"}") >= SPANS as f64)
                .then_some(())
        },
    )
    .await;
    assert_eq!(count(&direct, "SELECT count() FROM spans").await, SPANS, "spans stored");
    assert_eq!(count(&direct, "SELECT uniqExact(span_id) FROM spans").await, SPANS);
    assert_eq!(
        count(&direct, "SELECT toUInt64(sum(spans)) FROM service_instances").await,
        SPANS,
        "instance counts from the views of the same INSERT"
    );
    assert_eq!(
        count(
            &direct,
            "SELECT toUInt64(sum(rows)) FROM write_ledger WHERE target = 'spans'"
        )
        .await,
        SPANS,
        "the ledger records the whole INSERT, once"
    );
    relayed.collector.shutdown().await.unwrap();
}
