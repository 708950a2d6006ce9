//! Bearer tokens: one for ingest (agents, OTLP gRPC and HTTP), another for the API and the
//! dashboard. Each side refuses the other's token; health checks stay open.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use prost::Message;
use sightline_collector::Collector;
use sightline_tests::{
    browser_test_with, dashboard_dir, eventually, get, metric,
    otlp::{request, span, trace_id},
    request_with, testing,
};
use tonic::{metadata::MetadataValue, Code};

const INGEST: &str = "ingest-5ecret";
const API: &str = "api-5ecret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_and_api_each_ask_their_own_token() {
    let mut config = testing::config("auth");
    config.auth.ingest_token = INGEST.into();
    config.auth.api_token = API.into();
    config.api.dashboard_dir = Some(dashboard_dir());
    let collector = Collector::start(config).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let bearer = |token: &str| format!("Bearer {token}");

    // OTLP/HTTP.
    let traces = format!("http://{}/v1/traces", collector.http_addr);
    let by_http = trace_id();
    let body = request("auth", vec![span(&by_http, 1, "POST /login", 4, vec![])]).encode_to_vec();
    let protobuf = ("content-type", "application/x-protobuf");
    for refused in [vec![protobuf], vec![protobuf, ("authorization", &bearer(API))]] {
        let response = request_with("POST", &traces, &refused, body.clone()).await;
        assert_eq!(response.status, 401, "{:?}", refused);
        assert!(response.json()["error"].as_str().unwrap().contains("bearer token"));
        assert_eq!(response.headers["www-authenticate"], "Bearer");
    }
    let ingest_header = bearer(INGEST);
    let accepted = request_with("POST", &traces, &[protobuf, ("authorization", &ingest_header)], body).await;
    assert_eq!(accepted.status, 200);

    // OTLP/gRPC.
    let mut client = TraceServiceClient::connect(format!("http://{}", collector.grpc_addr))
        .await
        .unwrap();
    let by_grpc = trace_id();
    let export = || request("auth", vec![span(&by_grpc, 2, "POST /logout", 3, vec![])]);
    let refused = client.export(export()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
    let mut with_token = tonic::Request::new(export());
    with_token
        .metadata_mut()
        .insert("authorization", MetadataValue::try_from(bearer(INGEST)).unwrap());
    client.export(with_token).await.unwrap();

    // The native agent sends its token on its stream.
    let agent = sightline::init(sightline::Config {
        service: "auth".into(),
        version: "2.0".into(),
        collector: format!("http://{}", collector.grpc_addr),
        token: INGEST.into(),
        flush_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .unwrap();
    let by_agent = {
        let login = sightline::transaction("Login").operation("POST /login").entered();
        login.trace_id().unwrap()
    };

    // The API: without a token, or with the ingest token, 401; with its own, the data.
    let api_header = bearer(API);
    for id in [hex::encode(&by_http), hex::encode(&by_grpc), by_agent.clone()] {
        let url = format!("{api}/api/v1/traces/{id}");
        eventually(
            &format!("trace {id} through the API"),
            Duration::from_secs(20),
            || async {
                (request_with("GET", &url, &[("authorization", &api_header)], vec![])
                    .await
                    .status
                    == 200)
                    .then_some(())
            },
        )
        .await;
        assert_eq!(get(&url).await.status, 401);
        let ingest_on_api = request_with("GET", &url, &[("authorization", &ingest_header)], vec![]).await;
        assert_eq!(ingest_on_api.status, 401);
    }
    assert_eq!(get(&format!("{api}/metrics")).await.status, 401);
    assert_eq!(get(&format!("{api}/healthz")).await.status, 200);
    assert_eq!(get(&format!("{api}/readyz")).await.status, 200);

    // The dashboard's login: the token comes back as a cookie the API takes.
    let login = format!("{api}/api/v1/login");
    let json = ("content-type", "application/json");
    let wrong = request_with("POST", &login, &[json], br#"{"token": "api-5ecreT"}"#.to_vec()).await;
    assert_eq!(wrong.status, 401);
    let right = request_with("POST", &login, &[json], format!(r#"{{"token": "{API}"}}"#).into_bytes()).await;
    assert_eq!(right.status, 204);
    let cookie = right.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    let services = request_with("GET", &format!("{api}/api/v1/services"), &[("cookie", pair)], vec![]).await;
    assert_eq!(services.status, 200);

    let metrics = request_with(
        "GET",
        &format!("{api}/metrics"),
        &[("authorization", &api_header)],
        vec![],
    )
    .await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for (receiver, at_least) in [("otlp_http", 2.0), ("otlp_grpc", 1.0), ("api", 4.0)] {
        let sample = format!("sightline_rejected_requests_total{{receiver=\"{receiver}\",reason=\"unauthenticated\"}}");
        assert!(metric(&text, &sample) >= at_least, "{sample} in\n{text}");
    }

    // And in a browser: the dashboard asks for the token, then shows the data.
    browser_test_with("token", &api, &[("API_TOKEN", API)]).await;

    drop(agent);
    collector.shutdown().await.unwrap();
}
