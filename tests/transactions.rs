//! `/api/v1/transactions`: per service and BT, exact RED and the stage breakdown of a known
//! OTLP workload (Login in auth: 100 ms, of which 30 in the database, 20 in the cache, 40 in a
//! call to sessions, 10 in its own code).

use std::time::Duration;

use opentelemetry_proto::tonic::{
    collector::trace::v1::trace_service_client::TraceServiceClient,
    trace::v1::{span::SpanKind, status::StatusCode, Status},
};
use serde_json::Value;
use sightline_collector::Collector;
use sightline_tests::{
    eventually, get,
    otlp::{kv, request, span_in, trace_id},
    testing,
};

const REQUESTS: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_have_exact_red_and_their_stage_breakdown() {
    let collector = Collector::start(testing::config("transactions")).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let mut client = TraceServiceClient::connect(format!("http://{}", collector.grpc_addr))
        .await
        .unwrap();

    let (mut auth, mut sessions) = (Vec::new(), Vec::new());
    for i in 0..REQUESTS {
        let t = trace_id();
        let bt = kv("sightline.bt", "Login");
        let mut entry = span_in(
            &t,
            (1, 0),
            SpanKind::Server,
            "POST /login",
            (0, 100),
            vec![
                bt.clone(),
                kv("http.route", "/login"),
                kv("http.request.method", "POST"),
            ],
        );
        if i % 10 == 0 {
            entry.status = Some(Status {
                code: StatusCode::Error as i32,
                message: "denied".into(),
            });
        }
        auth.push(entry);
        auth.push(span_in(
            &t,
            (2, 1),
            SpanKind::Client,
            "SELECT",
            (5, 30),
            vec![bt.clone(), kv("db.system", "postgresql")],
        ));
        auth.push(span_in(
            &t,
            (3, 1),
            SpanKind::Client,
            "GET",
            (40, 20),
            vec![bt.clone(), kv("db.system", "redis")],
        ));
        auth.push(span_in(
            &t,
            (4, 1),
            SpanKind::Client,
            "Sessions/Create",
            (60, 40),
            vec![bt.clone(), kv("rpc.system", "grpc"), kv("peer.service", "sessions")],
        ));
        sessions.push(span_in(
            &t,
            (5, 4),
            SpanKind::Server,
            "Sessions/Create",
            (62, 35),
            vec![
                bt,
                kv("rpc.system", "grpc"),
                kv("rpc.service", "Sessions"),
                kv("rpc.method", "Create"),
            ],
        ));
    }
    client.export(request("auth", auth)).await.unwrap();
    client.export(request("sessions", sessions)).await.unwrap();

    let all = eventually("both services' Login", Duration::from_secs(30), || async {
        let body = get(&format!("{api}/api/v1/transactions")).await.json();
        let rows = body["transactions"].as_array()?.clone();
        let stored = rows.len() == 2
            && rows
                .iter()
                .all(|r| r["calls"] == REQUESTS && !r["stages"].as_array().unwrap().is_empty());
        stored.then_some(rows)
    })
    .await;
    let auth = all.iter().find(|r| r["service"] == "auth").unwrap();
    assert_eq!(auth["bt"], "Login");
    assert_eq!(
        (auth["calls"].as_u64(), auth["errors"].as_u64()),
        (Some(REQUESTS), Some(REQUESTS / 10))
    );
    assert!((auth["mean_ms"].as_f64().unwrap() - 100.0).abs() < 1e-6, "{auth}");
    assert!((auth["p99_ms"].as_f64().unwrap() - 100.0).abs() <= 1.0, "{auth}");
    let stages: Vec<(String, f64, f64)> = auth["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s: &Value| {
            (
                s["stage"].as_str().unwrap().to_string(),
                s["share"].as_f64().unwrap(),
                s["mean_ms"].as_f64().unwrap(),
            )
        })
        .collect();
    let expected = [("downstream", 0.4), ("db", 0.3), ("cache", 0.2), ("own", 0.1)];
    assert_eq!(stages.len(), expected.len(), "{stages:?}");
    for ((stage, share, mean_ms), (want, want_share)) in stages.iter().zip(expected) {
        assert_eq!(stage, want);
        assert!((share - want_share).abs() < 1e-9, "{stages:?}");
        assert!((mean_ms - want_share * 100.0).abs() < 1e-6, "{stages:?}");
    }
    let sessions = all.iter().find(|r| r["service"] == "sessions").unwrap();
    assert_eq!(sessions["stages"][0]["stage"], "own");
    assert!((sessions["stages"][0]["share"].as_f64().unwrap() - 1.0).abs() < 1e-9);

    // One service's transactions only; a bad service name is a 400.
    let only = get(&format!("{api}/api/v1/transactions?service=sessions")).await.json();
    assert_eq!(only["transactions"].as_array().unwrap().len(), 1);
    let long = "x".repeat(300);
    assert_eq!(
        get(&format!("{api}/api/v1/transactions?service={long}")).await.status,
        400
    );
    collector.shutdown().await.unwrap();
}
