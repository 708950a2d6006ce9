//! Issue 6's end-to-end acceptance: the same example service (`hello-service`) runs as three
//! versions at once through a real collector under the same load for ~70 s: the baseline
//! 1.0.0, 1.0.1 with the same code, and 1.1.0 whose PlaceOrder database calls are 15% slower.
//! The gate passes (or finds too little to judge) 1.0.1 against 1.0.0, and fails 1.1.0 naming
//! PlaceOrder and its db stage.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{free_port, Service};
use sightline_collector::{
    gate::{self, Format, GateArgs},
    Collector,
};
use sightline_tests::testing;

const LOAD: Duration = Duration::from_secs(70);
/// Requests per second per BT per version.
const RATE: u64 = 20;

fn start(version: &str, port: u16, collector: &str, slow: bool) -> Service {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hello-service"));
    command.args(["--listen", &format!("127.0.0.1:{port}"), "--collector", collector]);
    command.args(["--service-version", version, "--db-ms", "40"]);
    if slow {
        command.args(["--slow-bt", "PlaceOrder", "--db-slowdown", "1.15"]);
    }
    Service(command.stdout(Stdio::null()).spawn().expect("hello-service runs"))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_passes_the_same_code_and_fails_a_db_slowdown_naming_it() {
    let collector = Collector::start(testing::config("gate_end_to_end")).await.unwrap();
    let grpc = format!("http://{}", collector.grpc_addr);
    let versions = [("1.0.0", false), ("1.0.1", false), ("1.1.0", true)];
    let ports: Vec<u16> = versions.iter().map(|_| free_port()).collect();
    let _services: Vec<Service> = versions
        .iter()
        .zip(&ports)
        .map(|((version, slow), port)| start(version, *port, &grpc, *slow))
        .collect();
    for port in &ports {
        sightline_tests::eventually("the service to answer", Duration::from_secs(30), || async {
            let url = format!("http://127.0.0.1:{port}/orders");
            let r = sightline_tests::try_request("POST", &url, None, vec![]).await;
            r.is_ok_and(|r| r.status == 200).then_some(())
        })
        .await;
    }

    // Open-loop load: every version gets the same requests at the same moments.
    let from = now_ms();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
    let mut requests = tokio::task::JoinSet::new();
    let mut i = 0u64;
    while started.elapsed() < LOAD {
        tick.tick().await;
        i += 1;
        for port in &ports {
            let (order, user) = (
                format!("http://127.0.0.1:{port}/orders"),
                format!("http://127.0.0.1:{port}/users/{i}"),
            );
            requests.spawn(async move {
                let a = sightline_tests::try_request("POST", &order, None, vec![]).await;
                let b = sightline_tests::try_request("GET", &user, None, vec![]).await;
                a.is_ok_and(|r| r.status == 200) && b.is_ok_and(|r| r.status == 200)
            });
        }
    }
    let mut failed = 0;
    while let Some(ok) = requests.join_next().await {
        failed += usize::from(!ok.unwrap());
    }
    assert_eq!(failed, 0, "every request answered");
    // The agents send every 100 ms and the writer flushes every second.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let args = |candidate: &str| GateArgs {
        service: "hello".into(),
        baseline: "1.0.0".into(),
        candidate: candidate.into(),
        from: Some(from.to_string()),
        to: Some((now_ms() + 10_000).to_string()),
        url: format!("http://{}", collector.api_addr),
        format: Format::Json,
        fail_on_warn: false,
        config: None,
    };
    let (same, code) = gate::run(&args("1.0.1")).await.unwrap();
    assert!(code == 0 || code == 3, "same code: exit {code}\n{same}");

    // Stage sums are written in their own INSERT: wait until the slow version's are in.
    let (report, code) = sightline_tests::eventually("the stage sums", Duration::from_secs(30), || async {
        let (slow, code) = gate::run(&args("1.1.0")).await.ok()?;
        let report: serde_json::Value = serde_json::from_str(&slow).unwrap();
        let order = report["transactions"]
            .as_array()?
            .iter()
            .find(|t| t["bt"] == "PlaceOrder")?;
        (!order["stage"].is_null()).then_some((report, code))
    })
    .await;
    assert_eq!(code, 1, "{report:#}");
    let order = report["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["bt"] == "PlaceOrder")
        .unwrap();
    assert_eq!(order["verdict"], "fail", "{report:#}");
    assert_eq!(order["stage"][0], "db", "{order:#}");
    assert!(order["reason"].as_str().unwrap().contains("db +"), "{order:#}");
    let user = report["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["bt"] == "GetUser")
        .unwrap();
    assert_ne!(user["verdict"], "fail", "{report:#}");
    collector.shutdown().await.unwrap();
}
