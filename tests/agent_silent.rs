//! An agent that stops sending heartbeats is reported silent once three of its heartbeats are
//! missing (here 200 ms heartbeats and a 1 s threshold; 10 s and 30 s by default), and its
//! service's new version shows with its first-seen time.

use std::time::{Duration, Instant};

use serde_json::Value;
use sightline_collector::Collector;
use sightline_tests::{eventually, get, testing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_is_silent_within_three_heartbeats() {
    let mut config = testing::config("agent_silent");
    config.agents.silent_after_secs = 1;
    let collector = Collector::start(config).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let agent = sightline::init(sightline::Config {
        service: "push".into(),
        version: "2.1.0".into(),
        instance: "push-3".into(),
        collector: format!("http://{}", collector.grpc_addr),
        flush_interval: Duration::from_millis(50),
        heartbeat_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .unwrap();
    drop(sightline::transaction("Notify").entered());

    let agent_of = |services: &Value| -> Option<Value> {
        let push = services["services"].as_array()?.iter().find(|s| s["name"] == "push")?;
        push["agents"]
            .as_array()?
            .iter()
            .find(|a| a["instance"] == "push-3")
            .cloned()
    };
    let services = eventually("the agent reporting", Duration::from_secs(10), || async {
        let services = get(&format!("{api}/api/v1/services")).await.json();
        agent_of(&services).filter(|a| a["status"] == "ok").map(|_| services)
    })
    .await;
    // The new version, first seen now.
    let push = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "push")
        .unwrap();
    let version = push["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == "2.1.0")
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(version["first_seen"].as_u64().unwrap()) < 120, "{version}");

    drop(agent);
    let stopped = Instant::now();
    eventually("the agent silent", Duration::from_secs(10), || async {
        let services = get(&format!("{api}/api/v1/services")).await.json();
        agent_of(&services).filter(|a| a["status"] == "silent")
    })
    .await;
    // Heartbeats are stored with second resolution: the threshold plus up to two seconds.
    assert!(
        stopped.elapsed() < Duration::from_secs(4),
        "silent after {:?}",
        stopped.elapsed()
    );
    collector.shutdown().await.unwrap();
}
