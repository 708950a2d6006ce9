//! The agent's OTLP exporter option: a service instrumented with the `sightline` crate sends
//! OTLP/gRPC (here to the collector's OTLP receiver, as it would to any OTLP backend), and the
//! trace arrives with the BT, parents, calls out with component and peer, errors, attributes
//! and the caller from baggage.

use std::time::Duration;

use serde_json::Value;
use sightline_collector::Collector;
use sightline_tests::{get, metric, span_of, testing, trace_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_feeds_an_otlp_receiver() {
    let collector = Collector::start(testing::config("agent_otlp")).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let agent = sightline::init(sightline::Config {
        service: "gateway".into(),
        version: "2.3.0".into(),
        instance: "gw-1".into(),
        collector: format!("http://{}", collector.grpc_addr),
        protocol: sightline::Protocol::Otlp,
        flush_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .unwrap();

    let trace_id;
    {
        let login = sightline::transaction("Login").operation("POST /login").entered();
        trace_id = login.trace_id().unwrap();
        {
            let mut query = sightline::span("SELECT users").client("db", "postgres:users").entered();
            query.set_attribute("db.rows", 1);
        }
        {
            let mut cache = sightline::span("GET session").client("cache", "redis").entered();
            cache.set_error("Timeout", "no answer in 5 ms");
        }
        let mut headers = Vec::new();
        {
            let _call = sightline::span("Auth/Check").client("grpc", "auth").entered();
            sightline::propagation::inject(|name, value| headers.push((name, value)));
        }
        // The callee, in another thread, continues the trace from the headers alone.
        std::thread::spawn(move || {
            let remote = sightline::propagation::extract(|name| {
                headers.iter().find(|(h, _)| *h == name).map(|(_, v)| v.as_str())
            });
            let _entry = sightline::span("Auth/Check")
                .kind(sightline::Kind::Server)
                .child_of(remote)
                .entered();
        })
        .join()
        .unwrap();
    }

    let trace: Value = trace_with(&api, &trace_id, 5).await;
    let spans = trace["spans"].as_array().unwrap();
    let find = |operation: &str, kind: &str| span_of(&trace, operation, kind);
    let root = find("POST /login", "server");
    let db = find("SELECT users", "client");
    let cache = find("GET session", "client");
    let call = find("Auth/Check", "client");
    let callee = find("Auth/Check", "server");
    assert_eq!(root["parent_span_id"], Value::Null);
    for child in [db, cache, call] {
        assert_eq!(child["parent_span_id"], root["span_id"]);
    }
    assert_eq!(callee["parent_span_id"], call["span_id"]);
    assert!(spans.iter().all(|s| s["bt"] == "Login"), "{trace:#}");
    assert!(spans
        .iter()
        .all(|s| s["service"] == "gateway" && s["service_version"] == "2.3.0" && s["instance"] == "gw-1"));
    assert_eq!(
        (db["component"].as_str(), db["peer"].as_str()),
        (Some("db"), Some("postgres:users"))
    );
    assert_eq!(db["attributes"]["db.rows"], "1");
    assert_eq!(
        (cache["component"].as_str(), cache["peer"].as_str()),
        (Some("cache"), Some("redis"))
    );
    assert_eq!(
        (
            cache["status"].as_str(),
            cache["error_type"].as_str(),
            cache["error_message"].as_str()
        ),
        (Some("error"), Some("Timeout"), Some("no answer in 5 ms"))
    );
    assert_eq!(
        (call["component"].as_str(), call["peer"].as_str()),
        (Some("grpc"), Some("auth"))
    );
    assert_eq!(callee["attributes"]["sightline.caller.service"], "gateway");
    assert_eq!(callee["attributes"]["sightline.caller.operation"], "POST /login");

    // It came in over OTLP, not the native stream.
    let text = String::from_utf8(get(&format!("{api}/metrics")).await.body.to_vec()).unwrap();
    assert!(
        metric(&text, "sightline_received_spans_total{receiver=\"otlp_grpc\"}") >= 5.0,
        "{text}"
    );
    assert_eq!(metric(&text, "sightline_agent_heartbeats_total"), 0.0);
    drop(agent);
    collector.shutdown().await.unwrap();
}
