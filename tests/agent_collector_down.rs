//! The collector is not there while the app serves: the app runs on, the agent keeps at most
//! its cap of spans and counts the rest as dropped, and once a collector appears the agent
//! sends what it kept, its exact RED, and reports the drops in its heartbeats. When the
//! collector goes away again and another one takes its place, the new stream is told the names
//! the agent's spans were encoded with.

use std::time::Duration;

use sightline_collector::{store, Collector};
use sightline_tests::{eventually, get, metric, testing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keeps_its_cap_while_the_collector_is_away_and_reports_drops_after() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    const CAP: usize = 2_000;
    let agent = sightline::init(sightline::Config {
        service: "push".into(),
        version: "3.1.0".into(),
        instance: "push-1".into(),
        collector: format!("http://127.0.0.1:{port}"),
        max_pending_spans: CAP,
        flush_interval: Duration::from_millis(100),
        heartbeat_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .unwrap();

    // 5,000 requests of 2 spans each, while nothing listens.
    const REQUESTS: u64 = 5_000;
    for i in 0..REQUESTS {
        if i % 500 == 499 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _request = sightline::transaction("Notify").operation("POST /push").entered();
        let _call = sightline::span("POST /v1/send").client("http", "apns").entered();
    }
    // Everything beyond the cap is dropped and counted, nothing more is held.
    let dropped = eventually("drops beyond the cap", Duration::from_secs(10), || async {
        let dropped = sightline::dropped_spans();
        (dropped >= 2 * REQUESTS - CAP as u64).then_some(dropped)
    })
    .await;
    assert_eq!(
        dropped,
        2 * REQUESTS - CAP as u64,
        "exactly the spans over the cap are dropped"
    );

    // The collector comes up on the agent's address.
    let mut config = testing::config("agent_down");
    config.receivers.grpc_listen = ([127, 0, 0, 1], port).into();
    let collector = Collector::start(config.clone()).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let ch = store::client(&config.clickhouse.url, &config.clickhouse.database, &config.clickhouse);

    // What was kept arrives (the newest CAP spans), and RED counts every request.
    eventually("the kept spans", Duration::from_secs(30), || async {
        let stored: u64 = ch.query("SELECT count() FROM spans").fetch_one().await.unwrap();
        (stored == CAP as u64).then_some(())
    })
    .await;
    let calls = eventually("exact RED", Duration::from_secs(30), || async {
        let calls: u64 = ch
            .query("SELECT sum(calls) FROM latency_1m WHERE bt = 'Notify' AND kind = 'server'")
            .fetch_one()
            .await
            .unwrap();
        (calls == REQUESTS).then_some(calls)
    })
    .await;
    assert_eq!(calls, REQUESTS);
    // The heartbeat tells the collector how much the agent dropped.
    let sample = "sightline_agent_dropped_spans{service=\"push\",instance=\"push-1\"}";
    eventually("the drops reported", Duration::from_secs(10), || async {
        let text = String::from_utf8(get(&format!("{api}/metrics")).await.body.to_vec()).unwrap();
        (metric(&text, sample) == dropped as f64).then_some(())
    })
    .await;

    // The collector goes away; spans made meanwhile, with names old and new, reach the next one.
    collector.shutdown().await.unwrap();
    for _ in 0..100 {
        let _request = sightline::transaction("Notify").operation("POST /push").entered();
        let _call = sightline::span("POST /v1/send").client("http", "apns").entered();
        let _new = sightline::span("GET /v1/token").client("http", "fcm").entered();
    }
    let collector = Collector::start(config.clone()).await.unwrap();
    let names = eventually("the spans made while away", Duration::from_secs(30), || async {
        let names: Vec<(String, String, String, u64)> = ch
            .query("SELECT operation, bt, peer, count() FROM spans GROUP BY operation, bt, peer ORDER BY operation")
            .fetch_all()
            .await
            .unwrap();
        (names.iter().map(|n| n.3).sum::<u64>() == CAP as u64 + 300).then_some(names)
    })
    .await;
    let expected = [
        ("GET /v1/token", "Notify", "fcm", 100),
        ("POST /push", "Notify", "", CAP as u64 / 2 + 100),
        ("POST /v1/send", "Notify", "apns", CAP as u64 / 2 + 100),
    ];
    let names: Vec<(&str, &str, &str, u64)> = names
        .iter()
        .map(|(o, b, p, c)| (o.as_str(), b.as_str(), p.as_str(), *c))
        .collect();
    assert_eq!(names, expected);
    drop(agent);
    collector.shutdown().await.unwrap();
}
