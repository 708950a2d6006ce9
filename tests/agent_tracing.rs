//! Code instrumented with `tracing` reports through the agent: tracing spans become Sightline
//! spans with their BT, kind, component and peer from fields, the rest as attributes; an ERROR
//! event fails its span; Sightline spans opened inside a tracing span attach to it.

use std::time::Duration;

use serde_json::Value;
use sightline::tracing_layer::SightlineLayer;
use sightline_collector::Collector;
use sightline_tests::{first_trace, testing, trace_with};
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_spans_become_sightline_spans() {
    let collector = Collector::start(testing::config("agent_tracing")).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let agent = sightline::init(sightline::Config {
        service: "auth".into(),
        collector: format!("http://{}", collector.grpc_addr),
        flush_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .unwrap();
    let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry().with(SightlineLayer));

    {
        let login = tracing::info_span!("POST /login", bt = "Login", otel.kind = "server", user = 7);
        let _login = login.enter();
        {
            let query = tracing::info_span!("SELECT users", component = "db", peer = "postgres:users");
            let _query = query.enter();
        }
        {
            let cache = tracing::info_span!("GET session", component = "cache", peer = "redis");
            let _cache = cache.enter();
            tracing::error!("cache timed out after 5 ms");
        }
        let _render = sightline::span("render page").entered();
    }

    let trace_id = first_trace(&api, "bt=Login").await;
    let trace: Value = trace_with(&api, &trace_id, 4).await;
    let spans = trace["spans"].as_array().unwrap();
    let find = |op: &str| {
        spans
            .iter()
            .find(|s| s["operation"] == op)
            .unwrap_or_else(|| panic!("{op} in {trace:#}"))
    };
    let (login, query, cache, render) = (
        find("POST /login"),
        find("SELECT users"),
        find("GET session"),
        find("render page"),
    );
    assert_eq!(
        (login["kind"].as_str(), login["parent_span_id"].clone()),
        (Some("server"), Value::Null)
    );
    assert_eq!(login["attributes"]["user"], "7");
    for child in [query, cache, render] {
        assert_eq!(child["parent_span_id"], login["span_id"], "{}", child["operation"]);
    }
    assert!(spans.iter().all(|s| s["bt"] == "Login"), "{trace:#}");
    assert_eq!(
        (
            query["kind"].as_str(),
            query["component"].as_str(),
            query["peer"].as_str()
        ),
        (Some("client"), Some("db"), Some("postgres:users"))
    );
    assert_eq!(
        (cache["status"].as_str(), cache["peer"].as_str()),
        (Some("error"), Some("redis"))
    );
    assert!(cache["error_message"].as_str().unwrap().contains("cache timed out"));
    drop(agent);
    collector.shutdown().await.unwrap();
}
