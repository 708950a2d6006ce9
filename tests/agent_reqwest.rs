//! reqwest middleware: a call made with reqwest from inside a transaction is a client span with
//! its peer, the callee's entry (axum, server layer) is its child in the same trace and serves
//! the caller's BT; a 5xx marks the client span failed.

use std::time::Duration;

use axum::{http::StatusCode, routing, Router};
use serde_json::Value;
use sightline::{
    reqwest::{Operation, TracingMiddleware},
    tower::ServerLayer,
};
use sightline_collector::Collector;
use sightline_tests::{span_of, testing, trace_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_calls_are_client_spans_and_carry_the_context() {
    let collector = Collector::start(testing::config("agent_reqwest")).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let agent = sightline::init(sightline::Config {
        service: "web".into(),
        collector: format!("http://{}", collector.grpc_addr),
        flush_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .unwrap();

    let profiles = Router::new()
        .route("/users/{id}", routing::get(|| async { "{}" }))
        .route("/broken", routing::get(|| async { StatusCode::BAD_GATEWAY }))
        .layer(ServerLayer::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, profiles).await.unwrap() });

    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(TracingMiddleware::new().peer("profiles"))
        .build();
    let page = sightline::transaction("ShowProfile").operation("GET /profile").start();
    let trace_id = page.trace_id().unwrap();
    page.instrument(async {
        let ok = client
            .get(format!("http://{addr}/users/42"))
            .with_extension(Operation("GET /users/{id}".into()))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        let broken = client.get(format!("http://{addr}/broken")).send().await.unwrap();
        assert_eq!(broken.status(), 502);
    })
    .await;

    let trace: Value = trace_with(&api, &trace_id, 5).await;
    let spans = trace["spans"].as_array().unwrap();
    let find = |operation: &str, kind: &str| span_of(&trace, operation, kind);
    let root = find("GET /profile", "server");
    let call = find("GET /users/{id}", "client");
    let callee = find("GET /users/{id}", "server");
    let failed_call = find("GET", "client");
    let failed_callee = find("GET /broken", "server");
    assert_eq!(call["parent_span_id"], root["span_id"]);
    assert_eq!(callee["parent_span_id"], call["span_id"]);
    assert_eq!(failed_callee["parent_span_id"], failed_call["span_id"]);
    assert_eq!(
        (call["component"].as_str(), call["peer"].as_str()),
        (Some("http"), Some("profiles"))
    );
    assert_eq!(call["attributes"]["http.response.status_code"], "200");
    assert_eq!(call["status"], "unset");
    assert_eq!(
        (failed_call["status"].as_str(), failed_call["error_type"].as_str()),
        (Some("error"), Some("HTTP 502"))
    );
    assert!(spans.iter().all(|s| s["bt"] == "ShowProfile"), "{trace:#}");
    drop(agent);
    collector.shutdown().await.unwrap();
}
