//! `topology-bench`: the topology and transactions queries over 24 hours of aggregates
//! equivalent to 100M spans, through the collector's HTTP API.
//!
//! Starts a private ClickHouse 18.16 and the release `sightline serve` on it (which creates the
//! schema), fills `edges_1m`, `latency_1m` and `stages_1m` for the 24 hours before now
//! server-side (INSERT ... SELECT FROM numbers: 50 services each calling 4 others, a database
//! and a cache; 5 entry services; 3 BTs per edge, 20 BTs in all; 100M calls in total), merges
//! every partition, then times `GET /api/v1/topology` and `GET /api/v1/transactions` over the
//! whole day (and the topology filtered to one BT).
//!
//! Run: cargo build --release -p sightline-collector -p sightline-benches && target/release/topology-bench

use std::{process::Command, time::Instant};

use anyhow::Context;
use clap::Parser;
use sightline_benches::{collector_binary, CollectorProcess};
use sightline_collector::store::launcher::ClickHouseServer;

#[derive(Parser)]
#[command(about = "Topology and transactions queries over a day of aggregates")]
struct Args {
    /// Calls the day's aggregates stand for.
    #[arg(long, default_value_t = 100_000_000)]
    calls: u64,
    /// Timed requests per query.
    #[arg(long, default_value_t = 30)]
    requests: usize,
}

/// Edge rows per minute: 200 service-to-service edges, 100 to virtual nodes, 5 from the user,
/// each for 3 BTs.
const EDGE_ROWS_PER_MINUTE: u64 = 305 * 3;
const MINUTES: u64 = 1440;

fn edges_sql(db: &str, first_minute: u64, calls_per_row: u64) -> String {
    format!(
        "INSERT INTO {db}.edges_1m (minute, caller, caller_type, callee, callee_type, bt,
           caller_version, callee_version, calls, errors, duration_us_sum, `histMap.bucket`, `histMap.count`)
         SELECT toDateTime({first_minute} + intDiv(number, {EDGE_ROWS_PER_MINUTE}) * 60) AS minute,
           multiIf(e < 900, concat('svc', toString(k % 50)), 'user') AS caller,
           toInt8(if(e < 900, 2, 1)) AS caller_type,
           multiIf(e < 600, concat('svc', toString((k % 50 + 1 + intDiv(k, 50)) % 50)),
                   e < 900, if(k < 50, concat('db', toString(k % 50)), concat('cache', toString(k % 50))),
                   concat('svc', toString(k))) AS callee,
           toInt8(multiIf(e < 600, 2, e < 900, if(k < 50, 3, 4), 2)) AS callee_type,
           concat('BT', toString((k + e % 3 * 7) % 20)) AS bt,
           '1.0' AS caller_version, '1.0' AS callee_version,
           {calls_per_row} AS calls, intDiv({calls_per_row}, 100) AS errors,
           {calls_per_row} * 5000 AS duration_us_sum,
           [1000, 2000, 4000, 8000, 30000] AS b, [intDiv({calls_per_row}, 5), intDiv({calls_per_row}, 5),
             intDiv({calls_per_row}, 5), intDiv({calls_per_row}, 5), {calls_per_row} - 4 * intDiv({calls_per_row}, 5)] AS c
         FROM (SELECT number, number % {EDGE_ROWS_PER_MINUTE} AS e,
                 multiIf(e < 600, intDiv(e, 3), e < 900, intDiv(e - 600, 3), e - 900) AS k
               FROM numbers({rows}))",
        rows = EDGE_ROWS_PER_MINUTE * MINUTES
    )
}

/// Latency rows per minute: 50 services x 4 BTs x 5 operations (entry spans and calls out).
const LATENCY_ROWS_PER_MINUTE: u64 = 50 * 4 * 5;

fn latency_sql(db: &str, first_minute: u64, calls_per_row: u64) -> String {
    format!(
        "INSERT INTO {db}.latency_1m (minute, service, service_version, bt, operation, kind, status,
           calls, errors, duration_us_sum, `histMap.bucket`, `histMap.count`)
         SELECT toDateTime({first_minute} + intDiv(number, {LATENCY_ROWS_PER_MINUTE}) * 60),
           concat('svc', toString(r % 50)), '1.0', concat('BT', toString(intDiv(r, 50) % 4 + r % 5 * 4)),
           concat('op', toString(intDiv(r, 200))), toInt8(if(intDiv(r, 200) = 0, 2, 3)), toInt8(0),
           {calls_per_row}, intDiv({calls_per_row}, 100), {calls_per_row} * 5000,
           [1000, 2000, 4000, 8000, 30000], [intDiv({calls_per_row}, 5), intDiv({calls_per_row}, 5),
             intDiv({calls_per_row}, 5), intDiv({calls_per_row}, 5), {calls_per_row} - 4 * intDiv({calls_per_row}, 5)]
         FROM (SELECT number, number % {LATENCY_ROWS_PER_MINUTE} AS r FROM numbers({rows}))",
        rows = LATENCY_ROWS_PER_MINUTE * MINUTES
    )
}

fn stages_sql(db: &str, first_minute: u64) -> String {
    format!(
        "INSERT INTO {db}.stages_1m (minute, service, service_version, bt, stage, spans, self_us_sum)
         SELECT toDateTime({first_minute} + intDiv(number, 1000) * 60), concat('svc', toString(r % 50)), '1.0',
           concat('BT', toString(intDiv(r, 50) % 20)), ['own', 'db', 'cache', 'downstream', 'mq'][intDiv(r, 200) + 1],
           100, 100 * (1000 + r)
         FROM (SELECT number, number % 1000 AS r FROM numbers({rows}))",
        rows = 1000 * MINUTES
    )
}

async fn timed_get(url: &str, requests: usize) -> anyhow::Result<(f64, f64, usize)> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut times = Vec::with_capacity(requests);
    let mut size = 0;
    for _ in 0..requests {
        let started = Instant::now();
        let response = client.get(url.parse()?).await?;
        anyhow::ensure!(response.status() == 200, "{url}: {}", response.status());
        let body = http_body_util::BodyExt::collect(response.into_body()).await?.to_bytes();
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        size = body.len();
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[times.len() * 99 / 100], size))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data = tempfile::tempdir()?;
    let server = ClickHouseServer::start(&data.path().join("clickhouse"), "")?;
    let db = "topology";
    let collector = CollectorProcess::start(
        Command::new(collector_binary()?),
        &[
            ("SIGHTLINE_CLICKHOUSE__URL", server.url()),
            ("SIGHTLINE_CLICKHOUSE__DATABASE", db.into()),
        ],
    )
    .await?;
    let ch = sightline_collector::store::client(&server.url(), db, &Default::default())
        .with_setting("allow_experimental_low_cardinality_type", "1")
        .with_setting("max_execution_time", "600");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let first_minute = (now / 60 - MINUTES + 1) * 60;
    // The edges carry the calls; the latency and stage tables are the same day's RED and stages.
    let calls_per_edge_row = args.calls / (EDGE_ROWS_PER_MINUTE * MINUTES);
    let calls_per_latency_row = args.calls / (LATENCY_ROWS_PER_MINUTE * MINUTES);
    let started = Instant::now();
    for (table, sql) in [
        ("edges_1m", edges_sql(db, first_minute, calls_per_edge_row)),
        ("latency_1m", latency_sql(db, first_minute, calls_per_latency_row)),
        ("stages_1m", stages_sql(db, first_minute)),
    ] {
        ch.query(&sql)
            .execute()
            .await
            .with_context(|| format!("filling {table}"))?;
        ch.query(&format!("OPTIMIZE TABLE {db}.{table} FINAL"))
            .execute()
            .await?;
    }
    let rows = |table: &'static str| {
        ch.query(&format!("SELECT count() FROM {db}.{table}"))
            .fetch_one::<u64>()
    };
    let calls: u64 = ch
        .query(&format!("SELECT sum(calls) FROM {db}.edges_1m"))
        .fetch_one()
        .await?;
    println!(
        "topology-bench: {} edge rows ({calls} calls), {} latency rows, {} stage rows over 24 h, filled and merged in {:.1} s",
        rows("edges_1m").await?,
        rows("latency_1m").await?,
        rows("stages_1m").await?,
        started.elapsed().as_secs_f64()
    );
    let api = format!("http://127.0.0.1:{}", collector.api);
    let (from, to) = (first_minute * 1000, (now + 60) * 1000);
    for (name, path) in [
        ("topology, 24 h", format!("/api/v1/topology?from={from}&to={to}")),
        (
            "topology, 24 h, one BT",
            format!("/api/v1/topology?from={from}&to={to}&bt=BT7"),
        ),
        (
            "transactions, 24 h, one service",
            format!("/api/v1/transactions?from={from}&to={to}&service=svc7"),
        ),
        (
            "transactions, 24 h, all services",
            format!("/api/v1/transactions?from={from}&to={to}"),
        ),
    ] {
        let (p50, p99, size) = timed_get(&format!("{api}{path}"), args.requests).await?;
        println!("  {name:34} p50 {p50:7.1} ms  p99 {p99:7.1} ms  ({size} bytes)");
    }
    drop(collector);
    Ok(())
}
