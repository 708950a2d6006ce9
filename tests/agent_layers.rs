//! Two axum services instrumented only through the crate's tower layers: the gateway's handler
//! calls the messages service through the client layer; one trace comes out with route
//! templates as operations, the BT named by a rule and carried downstream in baggage, the
//! downstream entry a child of the client span, and the handler's DB span inside it. The
//! gateway has the server layer on its router, the messages service on each handler
//! (`ServerLayer::handler`): both ways give the same spans.

use std::time::Duration;

use axum::{http::StatusCode, routing, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::Value;
use sightline::tower::{ClientLayer, ServerLayer};
use sightline_collector::Collector;
use sightline_tests::{eventually, get, testing, trace_with};
use tower::{Layer, ServiceExt};

async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_give_one_trace_across_two_services() {
    let collector = Collector::start(testing::config("agent_layers")).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let agent = sightline::init(sightline::Config {
        service: "chat".into(),
        version: "1.5.0".into(),
        collector: format!("http://{}", collector.grpc_addr),
        flush_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .unwrap();

    let traced = ServerLayer::new();
    let messages = Router::new()
        .route(
            "/chats/{id}/messages",
            routing::post(traced.handler(|| async {
                let _insert = sightline::span("INSERT messages")
                    .client("db", "postgres:chat")
                    .entered();
                StatusCode::CREATED
            })),
        )
        .route(
            "/broken",
            routing::get(traced.handler(|| async { StatusCode::INTERNAL_SERVER_ERROR })),
        );
    let messages_addr = serve(messages).await;

    let gateway = Router::new()
        .route(
            "/send/{chat}",
            routing::get(move || async move {
                let client = ClientLayer::new()
                    .peer("messages")
                    .layer(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
                let request = http::Request::post(format!("http://{messages_addr}/chats/42/messages"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let response = client.oneshot(request).await.unwrap();
                response.status()
            }),
        )
        .route(
            "/broken",
            routing::get(move || async move {
                let client =
                    ClientLayer::new().layer(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
                let request = http::Request::get(format!("http://{messages_addr}/broken"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                client.oneshot(request).await.unwrap().status()
            }),
        )
        .layer(ServerLayer::new().naming(|op| (op == "GET /send/{chat}").then(|| "SendMessage".to_string())));
    let gateway_addr = serve(gateway).await;

    let plain = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let send = |chat: u32| {
        let request = plain.get(format!("http://{gateway_addr}/send/{chat}").parse().unwrap());
        async move {
            let response = request.await.unwrap();
            assert_eq!(response.status(), 201);
            let _ = response.into_body().collect().await;
        }
    };
    send(7).await;
    let response = plain
        .get(format!("http://{gateway_addr}/broken").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 500);

    let hits = eventually("the SendMessage trace", Duration::from_secs(20), || async {
        let r = get(&format!("{api}/api/v1/traces?bt=SendMessage")).await.json();
        let hits = r["traces"].as_array().unwrap().clone();
        (!hits.is_empty()).then_some(hits)
    })
    .await;
    let trace_id = hits[0]["trace_id"].as_str().unwrap().to_string();
    let trace: Value = trace_with(&api, &trace_id, 4).await;
    let spans = trace["spans"].as_array().unwrap();
    let by_kind_op = |kind: &str, op: &str| -> &Value {
        spans
            .iter()
            .find(|s| s["kind"] == kind && s["operation"] == op)
            .unwrap_or_else(|| panic!("{kind} {op} in {trace:#}"))
    };
    let entry = by_kind_op("server", "GET /send/{chat}");
    let call = by_kind_op("client", "POST");
    let downstream = by_kind_op("server", "POST /chats/{id}/messages");
    let insert = by_kind_op("client", "INSERT messages");
    assert_eq!(entry["parent_span_id"], Value::Null);
    assert_eq!(call["parent_span_id"], entry["span_id"]);
    assert_eq!(downstream["parent_span_id"], call["span_id"]);
    assert_eq!(insert["parent_span_id"], downstream["span_id"]);
    assert!(spans.iter().all(|s| s["bt"] == "SendMessage"), "{trace:#}");
    assert_eq!(
        (call["component"].as_str(), call["peer"].as_str()),
        (Some("http"), Some("messages"))
    );
    assert_eq!(call["attributes"]["http.response.status_code"], "201");
    assert_eq!(
        downstream["attributes"]["sightline.caller.operation"],
        "GET /send/{chat}"
    );
    assert_eq!(insert["peer"], "postgres:chat");

    // A 5xx downstream marks the downstream entry and the call failed, and the gateway's entry
    // too, since it passes the 500 on.
    let failed = eventually("the failed trace", Duration::from_secs(20), || async {
        let r = get(&format!("{api}/api/v1/traces?bt=GET%20%2Fbroken&error=true"))
            .await
            .json();
        let hits = r["traces"].as_array().unwrap().clone();
        (hits.first().is_some_and(|h| h["error_spans"] == 3)).then_some(hits)
    })
    .await;
    assert_eq!(failed.len(), 1);

    // Requests to a route already named (found again by its template, not named anew) keep
    // their operation and BT.
    for chat in [8, 9, 10] {
        send(chat).await;
    }
    let again = eventually("four SendMessage traces", Duration::from_secs(20), || async {
        let r = get(&format!("{api}/api/v1/traces?bt=SendMessage")).await.json();
        let hits = r["traces"].as_array().unwrap().clone();
        (hits.len() == 4).then_some(hits)
    })
    .await;
    for hit in &again {
        let trace = trace_with(&api, hit["trace_id"].as_str().unwrap(), 4).await;
        let spans = trace["spans"].as_array().unwrap();
        let operations: Vec<(&str, &str)> = spans
            .iter()
            .filter(|s| s["kind"] == "server")
            .map(|s| (s["operation"].as_str().unwrap(), s["bt"].as_str().unwrap()))
            .collect();
        assert_eq!(operations.len(), 2, "{trace:#}");
        assert!(operations.contains(&("GET /send/{chat}", "SendMessage")), "{trace:#}");
        assert!(
            operations.contains(&("POST /chats/{id}/messages", "SendMessage")),
            "{trace:#}"
        );
    }
    drop(agent);
    collector.shutdown().await.unwrap();
}
