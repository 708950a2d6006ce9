//! The read API: bad parameters get a 4xx with a JSON message, hostile values never reach SQL
//! as SQL, and the services view lists versions and instances.

use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use sightline_collector::Collector;
use sightline_tests::{
    eventually, get,
    otlp::{kv, request, span, trace_id},
    testing,
};

fn encode(value: &str) -> String {
    utf8_percent_encode(value, NON_ALPHANUMERIC).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_get_4xx_and_injection_attempts_match_nothing() {
    let collector = Collector::start(testing::config("api_params")).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let mut client =
        opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient::connect(format!(
            "http://{}",
            collector.grpc_addr
        ))
        .await
        .unwrap();
    let trace = trace_id();
    let mut entry = span(&trace, 1, "POST /login", 12, vec![kv("sightline.bt", "Login")]);
    entry.kind = SpanKind::Server as i32;
    let mut req = request("auth", vec![entry]);
    req.resource_spans[0]
        .resource
        .as_mut()
        .unwrap()
        .attributes
        .extend([kv("service.version", "1.4.2"), kv("service.instance.id", "auth-7")]);
    client.export(req).await.unwrap();
    let id = hex::encode(&trace);
    eventually("the span", Duration::from_secs(20), || async {
        (get(&format!("{api}/api/v1/traces/{id}")).await.status == 200).then_some(())
    })
    .await;
    let search = |query: String| {
        let api = api.clone();
        async move { get(&format!("{api}/api/v1/traces?{query}")).await }
    };
    assert_eq!(
        search("service=auth".into()).await.json()["traces"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Values that would widen the query if they were spliced into SQL match nothing instead.
    for hostile in [
        "x' OR '1'='1",
        "auth' OR 1=1 --",
        "auth'; DROP TABLE spans; --",
        "auth\\' OR 1=1 OR \\'",
        "auth\" OR \"1\"=\"1",
        "?",
        "auth`",
    ] {
        for param in ["service", "bt"] {
            let response = search(format!("{param}={}", encode(hostile))).await;
            assert_eq!(
                response.status,
                200,
                "{param}={hostile}: {}",
                String::from_utf8_lossy(&response.body)
            );
            assert_eq!(response.json()["traces"], serde_json::json!([]), "{param}={hostile}");
        }
    }
    // The table is still there and still answers.
    assert_eq!(get(&format!("{api}/api/v1/traces/{id}")).await.status, 200);

    // Malformed values: 4xx with a JSON message naming the parameter, no storage error text.
    for (query, needle) in [
        ("from=yesterday", "from"),
        ("to=2024-13-45T00:00:00Z", "to"),
        ("from=1700000000000;DROP", "from"),
        ("from=1700000000000&to=1600000000000", "before"),
        ("min_duration_ms=abc", "min_duration_ms"),
        ("min_duration_ms=-5", "min_duration_ms"),
        ("error=maybe", "error"),
        ("limit=1;SELECT%201", "limit"),
        ("limit=99999999", "limit"),
    ] {
        let response = search(query.into()).await;
        assert_eq!(response.status, 400, "{query}");
        let message = response.json()["error"].as_str().unwrap().to_string();
        assert!(message.contains(needle), "{query}: {message}");
        assert!(
            !message.contains("DB::Exception") && !message.contains("Code:"),
            "{message}"
        );
    }
    let long = "a".repeat(300);
    assert_eq!(search(format!("service={long}")).await.status, 400);
    for bad_id in [
        "zz",
        "0123",
        &"0".repeat(32),
        "0123456789abcdef0123456789abcde'",
        "0123456789abcdef0123456789abcdef00",
    ] {
        let response = get(&format!("{api}/api/v1/traces/{}", encode(bad_id))).await;
        assert_eq!(response.status, 400, "{bad_id}");
        assert!(response.json()["error"].as_str().unwrap().contains("32 hex digits"));
    }
    let unknown = get(&format!("{api}/api/v1/traces/{}", "ab".repeat(16))).await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["error"].as_str().unwrap().contains("not found"));
    assert_eq!(get(&format!("{api}/api/v1/nothing")).await.status, 404);
    assert_eq!(
        search("service=nobody".into()).await.json()["traces"],
        serde_json::json!([])
    );
    assert_eq!(get(&format!("{api}/api/v1/services?from=soon")).await.status, 400);

    // Services: the version with its first-seen minute, and the instance.
    let services = get(&format!("{api}/api/v1/services")).await.json();
    let auth = &services["services"][0];
    assert_eq!(auth["name"], "auth");
    assert_eq!(auth["versions"][0]["version"], "1.4.2");
    assert_eq!(auth["versions"][0]["spans"], 1);
    let first_seen = auth["versions"][0]["first_seen"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        first_seen <= now && now - first_seen < 180,
        "first seen {first_seen}, now {now}"
    );
    assert_eq!(auth["instances"][0]["instance"], "auth-7");
    let old = get(&format!(
        "{api}/api/v1/services?from=2020-01-01T00:00:00Z&to=2020-01-02T00:00:00Z"
    ))
    .await;
    assert_eq!(old.json()["services"], serde_json::json!([]));

    assert_eq!(get(&format!("{api}/readyz")).await.status, 200);
    assert_eq!(get(&format!("{api}/healthz")).await.status, 200);
    collector.shutdown().await.unwrap();
}
