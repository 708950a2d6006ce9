//! A service instrumented with the `sightline` crate sends its call chain over the native
//! sightline.v1 stream; the collector stores it with the BT on every span, correct parents,
//! DB and cache children with their peers, and the caller from baggage on the downstream entry.

use std::time::Duration;

use serde_json::Value;
use sightline_collector::Collector;
use sightline_tests::{eventually, get, metric, span_of, testing, trace_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_chain_arrives_over_the_native_stream() {
    let collector = Collector::start(testing::config("agent_native")).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let agent = sightline::init(sightline::Config {
        service: "auth".into(),
        version: "1.5.0".into(),
        instance: "auth-1".into(),
        collector: format!("http://{}", collector.grpc_addr),
        flush_interval: Duration::from_millis(100),
        heartbeat_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .unwrap();
    assert!(
        sightline::init(sightline::Config::default()).is_err(),
        "one agent per process"
    );

    let trace_id;
    {
        let login = sightline::transaction("Login").operation("POST /login").entered();
        trace_id = login.trace_id().unwrap();
        {
            let mut query = sightline::span("SELECT users").client("db", "postgres:users").entered();
            query.set_attribute("db.query.text", "SELECT id FROM users WHERE login = $1");
        }
        {
            let mut cache = sightline::span("GET session").client("cache", "redis").entered();
            cache.set_error("Timeout", "redis did not answer in 5 ms");
        }
        // Async work on the runtime, started inside the transaction.
        let pending = sightline::span("GET profile")
            .client("http", "profiles")
            .start()
            .instrument(async {
                tokio::time::sleep(Duration::from_millis(3)).await;
            });
        pending.await;
        // A downstream service's handler on another thread: context only through headers.
        let mut headers = Vec::new();
        {
            let _call = sightline::span("Sessions/Create").client("grpc", "sessions").entered();
            sightline::propagation::inject(|name, value| headers.push((name, value)));
        }
        std::thread::spawn(move || {
            let remote = sightline::propagation::extract(|name| {
                headers.iter().find(|(h, _)| *h == name).map(|(_, v)| v.as_str())
            });
            assert!(remote.is_some(), "traceparent was injected");
            let _entry = sightline::span("Sessions/Create")
                .kind(sightline::Kind::Server)
                .child_of(remote)
                .entered();
        })
        .join()
        .unwrap();
    }

    let trace: Value = trace_with(&api, &trace_id, 6).await;
    let spans = trace["spans"].as_array().unwrap();
    let find = |operation: &str, kind: &str| span_of(&trace, operation, kind);
    let root = find("POST /login", "server");
    let db = find("SELECT users", "client");
    let cache = find("GET session", "client");
    let profile = find("GET profile", "client");
    let call = find("Sessions/Create", "client");
    let downstream = find("Sessions/Create", "server");
    assert_eq!(root["parent_span_id"], Value::Null);
    for child in [db, cache, profile, call] {
        assert_eq!(child["parent_span_id"], root["span_id"], "{}", child["operation"]);
    }
    assert_eq!(downstream["parent_span_id"], call["span_id"]);
    assert!(spans.iter().all(|s| s["bt"] == "Login"), "BT on every span: {trace:#}");
    assert!(spans
        .iter()
        .all(|s| s["service"] == "auth" && s["service_version"] == "1.5.0" && s["instance"] == "auth-1"));
    assert_eq!(
        (db["component"].as_str(), db["peer"].as_str()),
        (Some("db"), Some("postgres:users"))
    );
    assert_eq!(
        db["attributes"]["db.query.text"],
        "SELECT id FROM users WHERE login = $1"
    );
    assert_eq!(
        (cache["component"].as_str(), cache["peer"].as_str()),
        (Some("cache"), Some("redis"))
    );
    assert_eq!(
        (cache["status"].as_str(), cache["error_type"].as_str()),
        (Some("error"), Some("Timeout"))
    );
    assert!(profile["duration_us"].as_u64().unwrap() >= 3000);
    assert_eq!(downstream["attributes"]["sightline.caller.service"], "auth");
    assert_eq!(downstream["attributes"]["sightline.caller.operation"], "POST /login");

    // A transaction longer than one thread buffer: its open entry span moves from buffer to
    // buffer and still arrives whole, with what was set on it at the end.
    let long_trace_id;
    {
        let mut import = sightline::transaction("Import").entered();
        long_trace_id = import.trace_id().unwrap();
        for _ in 0..300 {
            let _row = sightline::span("INSERT row").client("db", "postgres:orders").entered();
        }
        import.set_attribute("rows", 300);
    }
    let long: Value = trace_with(&api, &long_trace_id, 301).await;
    let long_spans = long["spans"].as_array().unwrap();
    let import = long_spans.iter().find(|s| s["operation"] == "Import").unwrap();
    assert_eq!(import["attributes"]["rows"], "300", "{import:#}");
    let rows: Vec<_> = long_spans.iter().filter(|s| s["operation"] == "INSERT row").collect();
    assert_eq!(rows.len(), 300);
    assert!(rows
        .iter()
        .all(|r| r["parent_span_id"] == import["span_id"] && r["bt"] == "Import"));

    // Spans ended out of order: the transaction's guard goes first while its child is still
    // open; the child keeps the trace (its BT, its place) and a span entered under it after
    // that still joins the trace. The child's name is owned (built at run time).
    let reordered_trace_id;
    {
        let order = sightline::transaction("Reorder").entered();
        reordered_trace_id = order.trace_id().unwrap();
        let step = sightline::span(format!("step {}", 1)).entered();
        drop(order);
        assert_eq!(step.business_transaction().as_deref(), Some("Reorder"));
        {
            let _inner = sightline::span("GET step").client("cache", "redis").entered();
        }
        drop(step);
    }
    let reordered: Value = trace_with(&api, &reordered_trace_id, 3).await;
    let order = span_of(&reordered, "Reorder", "server");
    let step = span_of(&reordered, "step 1", "internal");
    let inner = span_of(&reordered, "GET step", "client");
    assert_eq!(step["parent_span_id"], order["span_id"]);
    assert_eq!(inner["parent_span_id"], step["span_id"]);
    assert!(
        reordered["spans"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["bt"] == "Reorder"),
        "{reordered:#}"
    );

    // Heartbeats arrive; nothing was dropped.
    eventually("a heartbeat", Duration::from_secs(10), || async {
        let text = String::from_utf8(get(&format!("{api}/metrics")).await.body.to_vec()).unwrap();
        (metric(&text, "sightline_agent_heartbeats_total") >= 1.0).then_some(())
    })
    .await;
    assert_eq!(sightline::dropped_spans(), 0);
    drop(agent);
    collector.shutdown().await.unwrap();
}
