//! On ClickHouse 18.16 (no TTL) retention drops whole day partitions older than
//! `retention_days`, from spans, the trace index and the latency aggregates alike.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use sightline_collector::{store, Collector};
use sightline_tests::{
    eventually, get,
    otlp::{request, span, trace_id},
    testing,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_day_partitions_are_dropped_and_recent_ones_kept() {
    let config = testing::config("retention");
    let (url, database) = (config.clickhouse.url.clone(), config.clickhouse.database.clone());
    let collector = Collector::start(config.clone()).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let mut client = TraceServiceClient::connect(format!("http://{}", collector.grpc_addr))
        .await
        .unwrap();

    let (old, recent) = (trace_id(), trace_id());
    let mut old_span = span(&old, 1, "Login", 4, vec![]);
    let forty_days = 40 * 86_400 * 1_000_000_000u64;
    old_span.start_time_unix_nano -= forty_days;
    old_span.end_time_unix_nano -= forty_days;
    client
        .export(request("auth", vec![old_span, span(&recent, 2, "Login", 4, vec![])]))
        .await
        .unwrap();
    for id in [&old, &recent] {
        let id = hex::encode(id);
        eventually("both spans", Duration::from_secs(20), || async {
            (get(&format!("{api}/api/v1/traces/{id}")).await.status == 200).then_some(())
        })
        .await;
    }
    let ch = store::client(&url, &database, &config.clickhouse);
    // Distinct days of rows in an aggregate table (its time column is `minute` or `time`).
    let minutes = |table: &'static str| {
        let column = if table == "latency_10s" { "time" } else { "minute" };
        ch.query(&format!("SELECT count(DISTINCT toDate({column})) FROM {table}"))
            .fetch_one::<u64>()
    };
    eventually("aggregate rows for both days", Duration::from_secs(20), || async {
        let mut both_days = true;
        for table in ["latency_1m", "edges_1m", "stages_1m"] {
            both_days &= minutes(table).await.unwrap() == 2;
        }
        both_days.then_some(())
    })
    .await;

    let today = time::OffsetDateTime::now_utc().date();
    let dropped = store::retention::drop_expired(&ch, &database, 30, today).await.unwrap();
    let mut tables: Vec<_> = dropped
        .iter()
        .map(|d| d.split('/').next().unwrap().to_string())
        .collect();
    tables.sort();
    assert_eq!(
        tables,
        [
            "edges_1m",
            "latency_10s",
            "latency_1m",
            "spans",
            "stages_1m",
            "trace_index"
        ],
        "{dropped:?}"
    );

    assert_eq!(
        get(&format!("{api}/api/v1/traces/{}", hex::encode(&old))).await.status,
        404
    );
    assert_eq!(
        get(&format!("{api}/api/v1/traces/{}", hex::encode(&recent)))
            .await
            .status,
        200
    );
    assert_eq!(minutes("latency_1m").await.unwrap(), 1);
    assert_eq!(minutes("edges_1m").await.unwrap(), 1);
    // A second pass finds nothing more to drop.
    assert!(store::retention::drop_expired(&ch, &database, 30, today)
        .await
        .unwrap()
        .is_empty());
    collector.shutdown().await.unwrap();
}
