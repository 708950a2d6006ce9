//! `/api/v1/compare`: a service's two versions from stored 10-second aggregates. Version 1.5.0
//! of `chat` takes a database lock on AcceptChat (its DB calls 20 -> 45 ms); Login is the same
//! in both. The comparison fails AcceptChat naming the db stage, passes Login, takes a caller's
//! bands (POST), and refuses unknown versions and bad parameters with clear messages.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use serde_json::{json, Value};
use sightline_collector::Collector;
use sightline_tests::{eventually, get, otlp, request as http, testing};

const BLOCKS: u64 = 60;
const PER_BLOCK: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_fails_the_regressed_transaction_and_names_its_stage() {
    let collector = Collector::start(testing::config("compare_api")).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let mut client = TraceServiceClient::connect(format!("http://{}", collector.grpc_addr))
        .await
        .unwrap();
    let now_s = otlp::now_ns() / 1_000_000_000 / 10 * 10;
    let (base_from, cand_from) = (now_s - 2 * BLOCKS * 10, now_s - BLOCKS * 10);
    for (version, first, db_ms) in [("1.4.2", base_from, 20), ("1.5.0", cand_from, 45)] {
        let spans = otlp::chat_blocks(first, BLOCKS, PER_BLOCK, db_ms);
        otlp::send_version(&mut client, "chat", version, spans).await;
    }

    let url = format!(
        "{api}/api/v1/compare?service=chat&baseline=1.4.2&candidate=1.5.0&from={}&to={}",
        base_from * 1000,
        (now_s + 10) * 1000
    );
    let report: Value = eventually("every block stored", Duration::from_secs(30), || async {
        let r = get(&url).await;
        let body = (r.status == 200).then(|| r.json())?;
        let complete = body["transactions"]
            .as_array()?
            .iter()
            // Stage sums are a separate INSERT from the latency blocks: wait for them too.
            .all(|t| {
                let stages_in = t["bt"] != "AcceptChat" || !t["stage"].is_null();
                t["candidate_blocks"] == BLOCKS && t["baseline_blocks"] == BLOCKS && stages_in
            });
        complete.then_some(body)
    })
    .await;
    assert_eq!(report["verdict"], "fail", "{report:#}");
    assert_eq!(report["block_seconds"], 10);
    let transactions = report["transactions"].as_array().unwrap();
    let accept = &transactions[0];
    assert_eq!(accept["bt"], "AcceptChat", "worst first");
    assert_eq!(accept["verdict"], "fail");
    assert_eq!(accept["candidate_calls"], BLOCKS * PER_BLOCK);
    assert_eq!(accept["stage"][0], "db", "{accept:#}");
    let reason = accept["reason"].as_str().unwrap();
    assert!(
        reason.contains("beyond") && reason.contains("60 vs 60 blocks") && reason.contains("db +"),
        "{reason}"
    );
    let login = transactions.iter().find(|t| t["bt"] == "Login").unwrap();
    assert_eq!(login["verdict"], "pass", "{login:#}");

    // A caller's bands: +200% allowed on AcceptChat's p50 and p99 makes it a warning.
    let relaxed = json!({ "bt": { "AcceptChat": { "p50": 2.0, "p90": 2.0, "p99": 2.0, "errors": 0.005 } } });
    let r = http("POST", &url, Some("application/json"), relaxed.to_string().into_bytes()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["transactions"][0]["verdict"], "warn", "{:#}", r.json());

    // Clear refusals.
    let unknown = get(&format!(
        "{api}/api/v1/compare?service=chat&baseline=1.4.2&candidate=9.9.9&from={}",
        base_from * 1000
    ))
    .await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["error"].as_str().unwrap().contains("9.9.9"));
    for bad in [
        "service=chat&baseline=1.4.2",
        "service=chat&baseline=1&candidate=1",
        "service=chat&baseline=1&candidate=2&block=5s",
    ] {
        let r = get(&format!("{api}/api/v1/compare?{bad}")).await;
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.json()["error"].is_string());
    }
    for bad in [
        r#"{"alpha": "x"}"#,
        r#"{"resamples": 100000000}"#,
        r#"{"alpha": 0}"#,
        r#"{"bt": {"Login": {"p99": -1}}}"#,
    ] {
        let r = http("POST", &url, Some("application/json"), bad.as_bytes().to_vec()).await;
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.json()["error"].is_string(), "{bad}");
    }
    collector.shutdown().await.unwrap();
}
