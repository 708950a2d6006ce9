//! The real OpenTelemetry Python SDK sends a trace across three services (gRPC and HTTP
//! exporters, W3C propagation with baggage); the API gives it back whole and finds it.

use std::{process::Command, time::Duration};

use serde_json::Value;
use sightline_collector::Collector;
use sightline_tests::{eventually, get, python, python_script, testing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_trace_across_three_services_comes_back_whole_and_is_searchable() {
    let collector = Collector::start(testing::config("python_sdk"))
        .await
        .expect("collector starts");
    let output = Command::new(python())
        .arg(python_script("three_services.py"))
        .arg(collector.grpc_addr.to_string())
        .arg(format!("http://{}", collector.http_addr))
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let sent: Value = serde_json::from_slice(&output.stdout).expect("script prints JSON");
    let trace_id = sent["trace_id"].as_str().unwrap().to_string();
    let api = format!("http://{}", collector.api_addr);

    let trace: Value = eventually("all 7 spans of the trace", Duration::from_secs(20), || async {
        let response = get(&format!("{api}/api/v1/traces/{trace_id}")).await;
        (response.status == 200 && response.json()["spans"].as_array().unwrap().len() == 7).then(|| response.json())
    })
    .await;
    let spans = trace["spans"].as_array().unwrap();
    let find = |service: &str, operation: &str| -> &Value {
        spans
            .iter()
            .find(|s| s["service"] == service && s["operation"] == operation)
            .unwrap_or_else(|| panic!("no {service} {operation} span in {trace:#}"))
    };
    let root = find("gateway", "POST /login");
    let call_auth = find("gateway", "POST");
    let auth_entry = find("auth", "POST /authenticate");
    let db = find("auth", "SELECT users");
    let call_users = spans
        .iter()
        .find(|s| s["service"] == "auth" && s["kind"] == "client" && s["operation"] == "Users/Get")
        .unwrap();
    let users_entry = spans
        .iter()
        .find(|s| s["service"] == "users" && s["kind"] == "server")
        .unwrap();
    let cache = find("users", "GET");

    // Parent links across three services and two exporters.
    assert_eq!(root["parent_span_id"], Value::Null);
    for (child, parent) in [
        (call_auth, root),
        (auth_entry, call_auth),
        (db, auth_entry),
        (call_users, auth_entry),
        (users_entry, call_users),
        (cache, users_entry),
    ] {
        assert_eq!(
            child["parent_span_id"], parent["span_id"],
            "{} -> {}",
            child["operation"], parent["operation"]
        );
        assert_eq!(child["depth"].as_u64().unwrap(), parent["depth"].as_u64().unwrap() + 1);
    }
    // Waterfall order: the root first, every span after its parent.
    assert_eq!(spans[0]["span_id"], root["span_id"]);

    // Service, version and instance from each SDK's resource; the BT on every span.
    for (span, service, version) in [
        (root, "gateway", "1.0.0"),
        (auth_entry, "auth", "2.1.0"),
        (cache, "users", "0.9.0"),
    ] {
        assert_eq!(
            (span["service"].as_str(), span["service_version"].as_str()),
            (Some(service), Some(version))
        );
        assert_eq!(span["instance"], format!("{service}-1"));
    }
    assert!(spans.iter().all(|s| s["bt"] == "Login"), "BT on every span: {trace:#}");

    // Semantic conventions: components, peers, errors.
    assert_eq!(
        (db["component"].as_str(), db["peer"].as_str()),
        (Some("db"), Some("postgresql:users"))
    );
    assert_eq!(
        (cache["component"].as_str(), cache["peer"].as_str()),
        (Some("cache"), Some("redis"))
    );
    assert_eq!(
        (call_users["component"].as_str(), call_users["peer"].as_str()),
        (Some("grpc"), Some("users"))
    );
    assert_eq!(call_auth["peer"], "auth");
    assert_eq!(
        (cache["status"].as_str(), cache["error_type"].as_str()),
        (Some("error"), Some("TimeoutError"))
    );
    assert!(cache["error_message"].as_str().unwrap().contains("cache timeout"));
    assert_eq!(users_entry["status"], "error");
    assert_eq!(root["status"], "unset");
    assert!(db["duration_us"].as_u64().unwrap() >= 60_000);
    assert_eq!(
        db["attributes"]["db.query.text"],
        "SELECT id, hash FROM users WHERE login = $1"
    );

    // Search finds it by service, BT, duration and error, and not by what does not match.
    let search = |query: String| {
        let api = api.clone();
        async move {
            let response = get(&format!("{api}/api/v1/traces?{query}")).await;
            assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
            response.json()["traces"].as_array().unwrap().clone()
        }
    };
    let ids = |hits: Vec<Value>| {
        hits.into_iter()
            .map(|h| h["trace_id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(search("service=auth".into()).await), vec![trace_id.clone()]);
    assert_eq!(ids(search("bt=Login".into()).await), vec![trace_id.clone()]);
    let slow = search("min_duration_ms=55&service=auth".into()).await;
    assert_eq!(ids(slow.clone()), vec![trace_id.clone()]);
    assert_eq!(slow[0]["operation"], "POST /authenticate", "longest matching span");
    let failed = search("error=true".into()).await;
    assert_eq!(ids(failed.clone()), vec![trace_id.clone()]);
    assert_eq!(failed[0]["error_spans"], 2);
    assert!(search("service=auth&min_duration_ms=5000".into()).await.is_empty());
    assert!(search("bt=Logout".into()).await.is_empty());
    assert!(search("service=gateway&error=true".into()).await.is_empty());
    assert!(search("from=2020-01-01T00:00:00Z&to=2020-01-02T00:00:00Z".into())
        .await
        .is_empty());

    // Both receivers counted what they took.
    let metrics = String::from_utf8(get(&format!("{api}/metrics")).await.body.to_vec()).unwrap();
    assert_eq!(
        sightline_tests::metric(&metrics, "sightline_received_spans_total{receiver=\"otlp_grpc\"}"),
        4.0
    );
    assert_eq!(
        sightline_tests::metric(&metrics, "sightline_received_spans_total{receiver=\"otlp_http\"}"),
        3.0
    );

    collector.shutdown().await.unwrap();
}
