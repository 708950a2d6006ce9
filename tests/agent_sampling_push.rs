//! The collector sets agents' sampling ratio: from its configuration when an agent connects,
//! and live when the policy changes through the API. Bad policies are refused with a JSON
//! message and change nothing.

use std::{collections::BTreeMap, time::Duration};

use serde_json::json;
use sightline_collector::{sampling::SamplingPolicy, Collector};
use sightline_tests::{eventually, get, request, testing};

/// Sends one transaction, so that the agent has a batch to open its stream with.
fn one_request() {
    let _request = sightline::transaction("Deliver").operation("POST /deliver").entered();
}

async fn ratio_becomes(expected: f64) {
    eventually(
        &format!("the agent's sampling ratio at {expected}"),
        Duration::from_secs(10),
        || async {
            one_request();
            (sightline::sampling_ratio() == expected).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_pushes_sampling_at_connect_and_on_change() {
    let mut config = testing::config("agent_sampling_push");
    config.agents.sampling = SamplingPolicy {
        default_ratio: Some(0.25),
        services: BTreeMap::new(),
    };
    let collector = Collector::start(config).await.unwrap();
    let api = format!("http://{}/api/v1/agents/sampling", collector.api_addr);
    let agent = sightline::init(sightline::Config {
        service: "push".into(),
        collector: format!("http://{}", collector.grpc_addr),
        sampling_ratio: 1.0,
        flush_interval: Duration::from_millis(50),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(sightline::sampling_ratio(), 1.0);

    // At connect: the configured default.
    ratio_becomes(0.25).await;
    assert_eq!(get(&api).await.json(), json!({ "default_ratio": 0.25, "services": {} }));

    // Live: an override for this service wins over the default.
    let put = |body: serde_json::Value| {
        let api = api.clone();
        async move { request("PUT", &api, Some("application/json"), body.to_string().into_bytes()).await }
    };
    let reply = put(json!({ "default_ratio": 0.25, "services": { "push": 0.0 } })).await;
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    ratio_becomes(0.0).await;
    // Nothing sampled now, so no new call chains; the policy reads back as set.
    assert!(!sightline::transaction("Deliver").entered().is_recording());
    assert_eq!(get(&api).await.json()["services"]["push"], 0.0);

    // Bad policies: a clear 400, and the policy stays.
    for bad in [
        json!({ "default_ratio": 2.0 }),
        json!({ "services": { "push": -0.5 } }),
        json!({ "services": { "": 0.5 } }),
        json!({ "sampling": 0.5 }),
        json!("0.5"),
    ] {
        let reply = put(bad.clone()).await;
        assert_eq!(reply.status, 400, "{bad}");
        assert!(reply.json()["error"].as_str().is_some_and(|e| !e.is_empty()), "{bad}");
    }
    assert_eq!(get(&api).await.json()["services"]["push"], 0.0);
    assert_eq!(sightline::sampling_ratio(), 0.0);

    // Back to the default for everyone.
    put(json!({ "default_ratio": 1.0 })).await;
    ratio_becomes(1.0).await;
    drop(agent);
    collector.shutdown().await.unwrap();
}
