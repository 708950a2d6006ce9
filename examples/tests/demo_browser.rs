//! Issue 7's acceptance in a real browser: `sightline demo` (its collector, the chat app's
//! services as processes, load, both incidents) and Chromium driven by playwright-core. The
//! topology shows the app's nodes with the stalled cache's edge critical, clicking that edge
//! filters the BT table to Login, the comparison marks AcceptChat regressed in the db stage, a
//! trace opens as a waterfall, and stuck Logins name the cache call. Screenshots are saved in
//! dashboards/web/test-artifacts/demo.

use std::time::Duration;

use sightline_collector::demo::{Demo, DemoOptions};
use sightline_tests::{browser_test, dashboard_dir, testing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_in_a_browser_shows_both_incidents() {
    let mut config = testing::config("demo_browser");
    config.api.dashboard_dir = Some(dashboard_dir());
    let mut options = DemoOptions::new(env!("CARGO_BIN_EXE_demo-service").into(), config);
    // The stall starts early and lasts, so that the browser sees it; the gate needs five
    // 10-second blocks of each version.
    options.stall_after = Duration::from_secs(5);
    options.stall_for = Duration::from_secs(600);
    options.gate_after = Duration::from_secs(60);
    let demo = Demo::start(options).await.unwrap();
    let api = format!("http://{}", demo.api_addr);

    let mut progress = demo.progress.clone();
    let gate = tokio::time::timeout(Duration::from_secs(180), progress.wait_for(|p| p.gate.is_some()))
        .await
        .expect("the gate judged within 180 s")
        .unwrap()
        .gate
        .clone()
        .unwrap();
    let (report, code) = gate;
    assert_eq!(code, 1, "the gate fails 1.5.0:\n{report}");
    let accept = report.lines().find(|l| l.contains("AcceptChat")).unwrap_or_default();
    assert!(accept.contains("FAIL") && accept.contains("db +"), "{report}");
    assert!(demo.progress.borrow().cache_stalled);

    let output = browser_test("demo", &api).await;
    println!("{output}");
    demo.shutdown().await.unwrap();
}
