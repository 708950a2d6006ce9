//! `ingest-bench`: OTLP/gRPC ingest end to end, beside the raw ClickHouse floor, in one run.
//!
//! 1. Starts a private ClickHouse and the release `sightline serve` against it (separate
//!    process, so its CPU time can be read from /proc).
//! 2. Collector: concurrent gRPC clients send pre-encoded OTLP requests of realistic spans
//!    (~10 spans a trace, 8-11 attributes, random ids); timed until every span is in ClickHouse.
//! 3. Floor: ClickHouse exports those same rows as RowBinary, and they are POSTed straight
//!    into a fresh copy of the schema from two concurrent INSERTs (no client-side encoding).
//! 4. Grows the collector's table to --total-spans by server-side copies with new trace ids,
//!    OPTIMIZE FINAL, and reports bytes per span (system.parts) and trace-by-id latency through
//!    the HTTP API.
//!
//! Run: cargo build --release -p sightline-collector -p sightline-benches && target/release/ingest-bench

use std::{
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use clickhouse::Client;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value::Value, AnyValue, KeyValue},
    resource::v1::Resource,
    trace::v1::{span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, Status},
};
use prost::Message;
use rand::{rngs::StdRng, Rng, SeedableRng};
use sightline_benches::{collector_binary, cpu_seconds, CollectorProcess};
use sightline_collector::{
    receivers::otlp_grpc::{PassThrough, EXPORT_PATH},
    store::launcher::ClickHouseServer,
};

#[derive(Parser)]
#[command(about = "OTLP/gRPC ingest end to end beside the raw ClickHouse floor")]
struct Args {
    /// Spans sent through the collector (and then through the floor).
    #[arg(long, default_value_t = 2_000_000)]
    spans: usize,
    /// Rows in the table when trace-by-id latency is measured.
    #[arg(long, default_value_t = 10_000_000)]
    total_spans: usize,
    /// Concurrent gRPC clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Spans per OTLP request.
    #[arg(long, default_value_t = 1000)]
    spans_per_request: usize,
    /// Trace-by-id lookups to time.
    #[arg(long, default_value_t = 200)]
    lookups: usize,
}

const SERVICES: [&str; 6] = ["gateway", "auth", "messages", "chat", "push", "billing"];
const ROUTES: [&str; 8] = [
    "/login",
    "/messages/{id}",
    "/chats/{id}/accept",
    "/inbox",
    "/users/{id}",
    "/push",
    "/invoices",
    "/search",
];

fn kv(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    }
}

fn int_kv(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(value)),
        }),
        ..KeyValue::default()
    }
}

/// One trace of ~10 spans: an entry span, then DB, cache and downstream calls with 8-11
/// attributes each.
fn trace(rng: &mut StdRng, now_ns: u64) -> Vec<(usize, Span)> {
    let trace_id: [u8; 16] = rng.random();
    // Spans reach a collector seconds after they end.
    let start = now_ns - rng.random_range(100_000_000..5_000_000_000u64);
    let route = ROUTES[rng.random_range(0..ROUTES.len())];
    let entry_service = rng.random_range(0..SERVICES.len());
    let user = format!("user-{}", rng.random_range(0..100_000u32));
    let n = rng.random_range(8..=12);
    let mut spans = Vec::with_capacity(n);
    let root_id: u64 = rng.random::<u64>() | 1;
    let total = rng.random_range(5_000_000..80_000_000u64);
    for i in 0..n {
        let span_id = if i == 0 { root_id } else { rng.random::<u64>() | 1 };
        let offset = if i == 0 { 0 } else { rng.random_range(0..total / 2) };
        let duration = if i == 0 {
            total
        } else {
            rng.random_range(100_000..total / 3)
        };
        let (service, kind, name, mut attributes) = match i % 4 {
            0 => (
                entry_service,
                SpanKind::Server,
                format!("GET {route}"),
                vec![
                    kv("http.request.method", "GET"),
                    kv("http.route", route),
                    int_kv("http.response.status_code", 200),
                    kv("url.scheme", "https"),
                ],
            ),
            1 => (
                entry_service,
                SpanKind::Client,
                "SELECT messages".to_string(),
                vec![
                    kv("db.system", "postgresql"),
                    kv("db.namespace", "chat"),
                    kv("db.operation.name", "SELECT"),
                    kv(
                        "db.query.text",
                        format!(
                            "SELECT * FROM messages WHERE chat_id = {} LIMIT 50",
                            rng.random_range(0..1_000_000u32)
                        ),
                    ),
                ],
            ),
            2 => (
                entry_service,
                SpanKind::Client,
                "GET".to_string(),
                vec![
                    kv("db.system", "redis"),
                    kv("db.operation.name", "GET"),
                    kv("server.address", "cache.internal"),
                    int_kv("server.port", 6379),
                ],
            ),
            _ => (
                (entry_service + 1 + i % 3) % SERVICES.len(),
                SpanKind::Server,
                format!("POST {route}"),
                vec![
                    kv("http.request.method", "POST"),
                    kv("http.route", route),
                    int_kv("http.response.status_code", 200),
                    kv("url.scheme", "http"),
                ],
            ),
        };
        attributes.push(kv("enduser.id", user.clone()));
        attributes.push(kv("thread.name", format!("worker-{}", rng.random_range(0..16u8))));
        attributes.push(kv(
            "sightline.bt",
            ["Login", "SendMessage", "AcceptChat", "Inbox"][route.len() % 4],
        ));
        attributes.push(kv(
            "net.host.name",
            format!("{}-{}", SERVICES[service], rng.random_range(0..3u8)),
        ));
        if rng.random_range(0..3) == 0 {
            attributes.push(kv("code.function", "handle_request"));
        }
        let error = rng.random_range(0..100) == 0;
        spans.push((
            service,
            Span {
                trace_id: trace_id.to_vec(),
                span_id: span_id.to_be_bytes().to_vec(),
                parent_span_id: if i == 0 { vec![] } else { root_id.to_be_bytes().to_vec() },
                name,
                kind: kind as i32,
                start_time_unix_nano: start + offset,
                end_time_unix_nano: start + offset + duration,
                attributes,
                status: error.then(|| Status {
                    code: StatusCode::Error as i32,
                    message: "timeout".into(),
                }),
                ..Span::default()
            },
        ));
    }
    spans
}

/// Pre-encoded OTLP requests carrying `total` spans.
fn requests(total: usize, per_request: usize) -> Vec<Bytes> {
    let mut rng = StdRng::seed_from_u64(42);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut out = Vec::new();
    let mut sent = 0;
    while sent < total {
        let mut by_service: Vec<Vec<Span>> = vec![Vec::new(); SERVICES.len()];
        let mut in_request = 0;
        while in_request < per_request && sent + in_request < total {
            for (service, span) in trace(&mut rng, now) {
                by_service[service].push(span);
                in_request += 1;
            }
        }
        sent += in_request;
        let request = ExportTraceServiceRequest {
            resource_spans: by_service
                .into_iter()
                .enumerate()
                .filter(|(_, spans)| !spans.is_empty())
                .map(|(i, spans)| ResourceSpans {
                    resource: Some(Resource {
                        attributes: vec![
                            kv("service.name", SERVICES[i]),
                            kv("service.version", "1.4.2"),
                            kv("service.instance.id", format!("{}-1", SERVICES[i])),
                        ],
                        ..Resource::default()
                    }),
                    scope_spans: vec![ScopeSpans {
                        spans,
                        ..ScopeSpans::default()
                    }],
                    ..ResourceSpans::default()
                })
                .collect(),
        };
        out.push(Bytes::from(request.encode_to_vec()));
    }
    out
}

const CHUNK: usize = 50_000;

/// Inserts the collector's rows, exported as RowBinary in `order`, into a fresh copy of the
/// schema in `database` from two concurrent INSERTs. Returns (rows/s, ClickHouse CPU seconds,
/// seconds).
async fn floor(
    admin: &Client,
    ingest: &Client,
    database: &str,
    columns: &str,
    order: &str,
    rows: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    sightline_collector::store::schema::migrate(admin, database, 30).await?;
    let mut chunks = Vec::new();
    for offset in (0..rows).step_by(CHUNK) {
        // Each INSERT says how many rows it has: the views write only whole INSERTs.
        let batch_rows = CHUNK.min(rows - offset);
        let columns = columns.replace("{batch_rows}", &batch_rows.to_string());
        let mut cursor = ingest
            .query(&format!(
                "SELECT {columns} FROM spans ORDER BY {order} LIMIT {CHUNK} OFFSET {offset}"
            ))
            .fetch_bytes("RowBinary")?;
        chunks.push(cursor.collect().await?);
    }
    let chunks = Arc::new(chunks);
    // Each timed phase starts on a quiet server: no merges left over from the one before.
    settle(admin).await?;
    let ch_pid = CH_PID.load(Ordering::Relaxed) as u32;
    let ch_cpu = cpu_seconds(ch_pid);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..2 {
        let (chunks, next, client) = (chunks.clone(), next.clone(), admin.clone());
        let sql = format!("INSERT INTO {database}.spans_input FORMAT RowBinary");
        senders.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(chunk) = chunks.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                let mut insert = client.insert_formatted_with(sql.clone());
                insert.send(chunk.clone()).await?;
                insert.end().await?;
            }
        }));
    }
    for sender in senders {
        sender.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(ch_pid) - ch_cpu;
    let inserted = count(admin, &format!("{database}.spans")).await?;
    if inserted != rows as u64 {
        bail!("{database} got {inserted} rows, expected {rows}");
    }
    Ok((rows as f64 / secs, cpu, secs))
}

static CH_PID: AtomicU64 = AtomicU64::new(0);

/// Waits until ClickHouse runs no merge (at most a minute).
async fn settle(client: &Client) -> anyhow::Result<()> {
    for _ in 0..600 {
        if client
            .query("SELECT count() FROM system.merges")
            .fetch_one::<u64>()
            .await?
            == 0
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn count(client: &Client, table: &str) -> anyhow::Result<u64> {
    Ok(client
        .query(&format!("SELECT count() FROM {table}"))
        .fetch_one::<u64>()
        .await?)
}

async fn http_get(url: &str) -> anyhow::Result<u16> {
    Ok(http_get_body(url).await?.0)
}

async fn http_get_body(url: &str) -> anyhow::Result<(u16, String)> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>();
    let response = client.get(url.parse()?).await?;
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body()).await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data = tempfile::tempdir()?;
    let server = ClickHouseServer::start(&data.path().join("clickhouse"), "")?;
    let ch_pid = server.pid().context("ClickHouse pid")?;
    CH_PID.store(u64::from(ch_pid), Ordering::Relaxed);
    let admin = sightline_collector::store::client(&server.url(), "default", &Default::default());

    let collector = CollectorProcess::start(
        Command::new(collector_binary()?),
        &[
            ("SIGHTLINE_CLICKHOUSE__URL", server.url()),
            ("SIGHTLINE_CLICKHOUSE__DATABASE", "ingest".into()),
        ],
    )
    .await?;
    let (grpc, api) = (collector.grpc, collector.api);

    eprintln!("encoding {} spans...", args.spans);
    let requests = Arc::new(requests(args.spans, args.spans_per_request));
    let request_bytes: usize = requests.iter().map(Bytes::len).sum();

    // --- Collector: OTLP/gRPC end to end.
    let (cpu0, ch_cpu0) = (cpu_seconds(collector.pid()), cpu_seconds(ch_pid));
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let busy = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        let (requests, next, busy) = (requests.clone(), next.clone(), busy.clone());
        let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))?
            .connect()
            .await?;
        clients.push(tokio::spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(body) = requests.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                loop {
                    grpc.ready().await?;
                    match grpc
                        .unary::<Bytes, Bytes, _>(tonic::Request::new(body.clone()), EXPORT_PATH.parse()?, PassThrough)
                        .await
                    {
                        Ok(_) => break,
                        Err(s) if s.code() == tonic::Code::Unavailable => {
                            busy.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(s) => bail!("export failed: {s}"),
                    }
                }
            }
        }));
    }
    for client in clients {
        client.await??;
    }
    let sent_secs = started.elapsed().as_secs_f64();
    let ingest = sightline_collector::store::client(&server.url(), "ingest", &Default::default());
    while count(&ingest, "spans").await? < args.spans as u64 {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("spans did not all arrive");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let collector_secs = started.elapsed().as_secs_f64();
    let collector_cpu = cpu_seconds(collector.pid()) - cpu0;
    let ch_cpu_collector = cpu_seconds(ch_pid) - ch_cpu0;
    let collector_rate = args.spans as f64 / collector_secs;
    let (_, metrics) = http_get_body(&format!("http://127.0.0.1:{api}/metrics")).await?;
    let latency_rows = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sightline_written_rows_total{table=\"latency_1m\"} "))
        .unwrap_or("0")
        .to_string();

    // --- Floor: the same rows as RowBinary, straight into a fresh copy of the schema (batch ids
    // zero: the floor has no spool; `{batch_rows}`: the INSERT's row count).
    let columns = "trace_id, span_id, parent_span_id, service, service_version, instance, operation, toInt8(kind), \
                   component, peer, bt, start_us, duration_us, toInt8(status), error_type, error_message, \
                   attributes.key, attributes.value, toUInt64(0), toUInt64(0), toUInt64({batch_rows})";
    // Two floors over the same rows: in arrival (random) order, as spans reach a collector, and
    // already in the table's key order, which ClickHouse sorts far faster on INSERT.
    let random_floor = floor(&admin, &ingest, "floor", columns, "cityHash64(span_id)", args.spans).await?;
    let sorted_floor = floor(
        &admin,
        &ingest,
        "floor_sorted",
        columns,
        "service, start_us",
        args.spans,
    )
    .await?;
    let (floor_rate, ch_cpu_floor, floor_secs) = random_floor;

    // --- Grow to total_spans with new trace ids (last id byte set per round), each round an
    // hour earlier, then compact.
    let copy_columns = columns
        .replacen(
            "trace_id",
            "unhex(concat(substring(hex(trace_id), 1, 30), hex(toUInt8(?)))) AS trace_id",
            1,
        )
        .replacen("start_us", "start_us - ? * 3600000000 AS start_us", 1);
    let rounds = args.total_spans.saturating_sub(args.spans).div_ceil(args.spans);
    let floor_rows = count(&admin, "floor.spans").await?.max(1);
    let copy_columns = copy_columns.replace("{batch_rows}", &floor_rows.to_string());
    for round in 1..=rounds {
        // floor.spans holds exactly the original rows; each round gives them new trace ids, as
        // one block (the views write only whole INSERTs).
        admin
            .query(&format!(
                "INSERT INTO ingest.spans_input SELECT {copy_columns} FROM floor.spans"
            ))
            .bind(200 + round as u8)
            .bind(round as u64)
            .with_setting("max_insert_block_size", floor_rows.to_string())
            .with_setting("min_insert_block_size_rows", floor_rows.to_string())
            .with_setting("min_insert_block_size_bytes", "0")
            .execute()
            .await?;
    }
    let total_rows = count(&ingest, "spans").await?;
    // 18.16's OPTIMIZE ... FINAL without PARTITION does not merge every partition, and it
    // silently does nothing while a background merge holds the parts: go partition by
    // partition, and repeat until each is one part.
    let started = Instant::now();
    for table in ["spans", "trace_index"] {
        for _attempt in 0..60 {
            #[derive(clickhouse::Row, serde::Deserialize)]
            struct Partition {
                id: String,
                parts: u64,
            }
            let partitions: Vec<Partition> = admin
                .query(
                    "SELECT partition_id AS id, count() AS parts FROM system.parts \
                     WHERE database = 'ingest' AND table = ? AND active GROUP BY id",
                )
                .bind(table)
                .fetch_all()
                .await?;
            if partitions.iter().all(|p| p.parts == 1) {
                break;
            }
            for partition in partitions.into_iter().filter(|p| p.parts > 1) {
                admin
                    .query(&format!("OPTIMIZE TABLE ingest.{table} PARTITION ID ? FINAL"))
                    .bind(partition.id)
                    .execute()
                    .await?;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let optimize_secs = started.elapsed().as_secs_f64();
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Parts {
        bytes: u64,
        rows: u64,
        parts: u64,
    }
    let parts: Parts = admin
        .query("SELECT sum(data_compressed_bytes) AS bytes, sum(rows) AS rows, count() AS parts FROM system.parts WHERE database = 'ingest' AND table = 'spans' AND active")
        .fetch_one()
        .await?;
    let index_parts: Parts = admin
        .query("SELECT sum(data_compressed_bytes) AS bytes, sum(rows) AS rows, count() AS parts FROM system.parts WHERE database = 'ingest' AND table = 'trace_index' AND active")
        .fetch_one()
        .await?;

    #[derive(clickhouse::Row, serde::Deserialize)]
    struct ColumnBytes {
        name: String,
        bytes: u64,
    }
    let columns_bytes: Vec<ColumnBytes> = admin
        .query("SELECT name, data_compressed_bytes AS bytes FROM system.columns WHERE database = 'ingest' AND table = 'spans' ORDER BY bytes DESC")
        .fetch_all()
        .await?;
    let per_column = columns_bytes
        .iter()
        .take(8)
        .map(|c| format!("{} {:.1}", c.name, c.bytes as f64 / parts.rows.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ");

    // --- Trace by id through the API, on total_rows spans.
    let ids: Vec<String> = admin
        .query("SELECT lower(hex(trace_id)) FROM ingest.trace_index ORDER BY rand() LIMIT ?")
        .bind(args.lookups as u64)
        .fetch_all()
        .await?;
    let mut latencies = Vec::new();
    for id in &ids {
        let t = Instant::now();
        let status = http_get(&format!("http://127.0.0.1:{api}/api/v1/traces/{id}")).await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        if status != 200 {
            bail!("trace {id}: HTTP {status}");
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];

    println!(
        "ingest-bench: {} spans ({} per request, {} clients), {:.0} B/span on the wire",
        args.spans,
        args.spans_per_request,
        args.clients,
        request_bytes as f64 / args.spans as f64
    );
    println!(
        "  collector OTLP/gRPC end to end: {:.0} spans/s ({:.2} s; all sent after {:.2} s; {} busy answers)",
        collector_rate,
        collector_secs,
        sent_secs,
        busy.load(Ordering::Relaxed)
    );
    println!(
        "    collector CPU {:.2} cores -> {:.0} spans/s per collector core; ClickHouse CPU {:.2} cores",
        collector_cpu / collector_secs,
        args.spans as f64 / collector_cpu,
        ch_cpu_collector / collector_secs
    );
    println!("  floor: the same rows as RowBinary straight into the schema, arrival order (2 concurrent INSERTs): {:.0} rows/s ({:.2} s; ClickHouse CPU {:.2} cores)", floor_rate, floor_secs, ch_cpu_floor / floor_secs);
    println!("    latency_1m rows written alongside: {latency_rows}");
    println!(
        "  floor with the rows pre-sorted by (service, start): {:.0} rows/s ({:.2} s; ClickHouse CPU {:.2} cores)",
        sorted_floor.0,
        sorted_floor.2,
        sorted_floor.1 / sorted_floor.2
    );
    println!(
        "  ratio collector / floor: {:.2} (arrival order), {:.2} (pre-sorted)",
        collector_rate / floor_rate,
        collector_rate / sorted_floor.0
    );
    println!(
        "  storage after OPTIMIZE FINAL per partition ({:.1} s) on {} spans: {:.1} B/span in spans ({} parts), {:.1} B/span in trace_index ({} parts)",
        optimize_secs,
        total_rows,
        parts.bytes as f64 / parts.rows.max(1) as f64,
        parts.parts,
        index_parts.bytes as f64 / parts.rows.max(1) as f64,
        index_parts.parts
    );
    println!("    B/span by column: {per_column}");
    println!(
        "  trace by id via /api/v1/traces/{{id}} on {} spans, {} lookups: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
        total_rows,
        latencies.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99)
    );
    drop(collector);
    Ok(())
}
