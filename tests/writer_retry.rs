//! ClickHouse goes away and comes back: the writer keeps the rows it was given, retries with
//! backoff, and writes them once the server answers again; /readyz tells the truth meanwhile.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use sightline_collector::{store::launcher::ClickHouseServer, Collector};
use sightline_tests::{
    eventually, get, metric,
    otlp::{request, span, trace_id},
    testing,
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
