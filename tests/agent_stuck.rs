//! Stuck work shows up now, not when it ends: a Login blocked for 10 s in a cache call appears
//! in /api/v1/services within 5 s, naming the BT and the cache span, and is gone once it ends.
//! (The seed incident: login threads blocked on a stats cache until the pool ran out.)
//! Nothing is sampled here: stuck work must be visible whether or not its chain is recorded.

use std::time::{Duration, Instant};

use serde_json::Value;
use sightline_collector::Collector;
use sightline_tests::{eventually, get, testing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_login_is_reported_while_it_is_blocked() {
    let collector = Collector::start(testing::config("agent_stuck")).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let agent = sightline::init(sightline::Config {
        service: "auth".into(),
        version: "1.4.2".into(),
        instance: "auth-7".into(),
        collector: format!("http://{}", collector.grpc_addr),
        flush_interval: Duration::from_millis(100),
        heartbeat_interval: Duration::from_millis(500),
        sampling_ratio: 0.0,
        ..Default::default()
    })
    .unwrap();

    // A quick request that must never be reported stuck.
    drop(sightline::transaction("Logout").entered());
    let blocked_at = Instant::now();
    let handler = std::thread::spawn(|| {
        let _login = sightline::transaction("Login").operation("POST /login").entered();
        let _cache = sightline::span("GET session").client("cache", "stats-cache").entered();
        std::thread::sleep(Duration::from_secs(10));
    });

    let stuck_login = |services: &Value| -> Option<Value> {
        let auth = services["services"].as_array()?.iter().find(|s| s["name"] == "auth")?;
        auth["stuck"].as_array()?.iter().find(|t| t["bt"] == "Login").cloned()
    };
    let stuck = eventually(
        "the blocked Login in the services view",
        Duration::from_secs(5),
        || async { stuck_login(&get(&format!("{api}/api/v1/services")).await.json()) },
    )
    .await;
    assert!(blocked_at.elapsed() < Duration::from_secs(5));
    assert_eq!(stuck["operation"], "POST /login");
    assert_eq!(
        (stuck["current_operation"].as_str(), stuck["current_peer"].as_str()),
        (Some("GET session"), Some("stats-cache"))
    );
    assert_eq!(stuck["instance"], "auth-7");
    assert!(
        stuck["elapsed_ms"].as_u64().unwrap() >= 2000,
        "reported only past the 2 s threshold: {stuck}"
    );
    assert_eq!(stuck["trace_id"].as_str().unwrap().len(), 32);
    let services = get(&format!("{api}/api/v1/services")).await.json();
    let auth = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "auth")
        .unwrap()
        .clone();
    assert!(auth["stuck"].as_array().unwrap().iter().all(|t| t["bt"] != "Logout"));
    let agents = auth["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "{auth:#}");
    assert_eq!(
        (agents[0]["instance"].as_str(), agents[0]["status"].as_str()),
        (Some("auth-7"), Some("ok"))
    );

    handler.join().unwrap();
    eventually("the Login gone once it ended", Duration::from_secs(10), || async {
        stuck_login(&get(&format!("{api}/api/v1/services")).await.json())
            .is_none()
            .then_some(())
    })
    .await;
    drop(agent);
    collector.shutdown().await.unwrap();
}
