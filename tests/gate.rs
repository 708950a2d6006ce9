//! `sightline gate` against a collector holding two versions of `chat` (1.5.0 takes a DB lock
//! on AcceptChat): every output format checked (the table, Markdown for a pull request, JUnit
//! that parses as XML with one testcase per BT, JSON with its fields), the exit codes (fail;
//! warn only with --fail-on-warn under a gate.toml's wider bands), and clear errors for an
//! unknown version and an unreachable collector.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use sightline_collector::{
    gate::{self, Format, GateArgs},
    Collector,
};
use sightline_tests::{eventually, otlp, testing};

const BLOCKS: u64 = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_reports_in_every_format_and_exits_by_verdict() {
    let collector = Collector::start(testing::config("gate")).await.unwrap();
    let mut client = TraceServiceClient::connect(format!("http://{}", collector.grpc_addr))
        .await
        .unwrap();
    let now_s = otlp::now_ns() / 1_000_000_000 / 10 * 10;
    let from = now_s - 2 * BLOCKS * 10;
    for (version, first, db_ms) in [("1.4.2", from, 20), ("1.5.0", now_s - BLOCKS * 10, 45)] {
        otlp::send_version(
            &mut client,
            "chat",
            version,
            otlp::chat_blocks(first, BLOCKS, 40, db_ms),
        )
        .await;
    }
    let args = |format: Format| GateArgs {
        service: "chat".into(),
        baseline: "1.4.2".into(),
        candidate: "1.5.0".into(),
        from: Some((from * 1000).to_string()),
        to: Some(((now_s + 10) * 1000).to_string()),
        url: format!("http://{}", collector.api_addr),
        format,
        fail_on_warn: false,
        config: None,
    };

    // JSON first, until every block is in.
    let json: serde_json::Value = eventually("all blocks stored", Duration::from_secs(30), || async {
        let (text, _) = gate::run(&args(Format::Json)).await.ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let complete = json["transactions"]
            .as_array()?
            .iter()
            // Stage sums are a separate INSERT from the latency blocks: wait for them too.
            .all(|t| {
                let stages_in = t["bt"] != "AcceptChat" || !t["stage"].is_null();
                t["candidate_blocks"] == BLOCKS && t["baseline_blocks"] == BLOCKS && stages_in
            });
        complete.then_some(json)
    })
    .await;
    for field in [
        "service",
        "baseline",
        "candidate",
        "from",
        "to",
        "block_seconds",
        "verdict",
        "reweighted_mean_ratio",
        "dashboard",
        "transactions",
    ] {
        assert!(!json[field].is_null(), "JSON lacks {field}: {json:#}");
    }
    assert_eq!(json["verdict"], "fail");
    assert!(json["dashboard"]
        .as_str()
        .unwrap()
        .contains("/#/compare?service=chat&baseline=1.4.2&candidate=1.5.0"));

    let (table, code) = gate::run(&args(Format::Table)).await.unwrap();
    assert_eq!(code, 1, "a failure exits 1");
    let accept_line = table.lines().find(|l| l.contains("AcceptChat")).unwrap();
    assert!(
        accept_line.starts_with("FAIL") && accept_line.contains("db +"),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("pass") && l.contains("Login")),
        "{table}"
    );

    let (markdown, _) = gate::run(&args(Format::Markdown)).await.unwrap();
    assert!(
        markdown.starts_with("### :x: Sightline gate: chat 1.5.0 vs 1.4.2: FAIL"),
        "{markdown}"
    );
    assert!(markdown.contains("| | Transaction | p50 | p99 | Errors | Why |"));
    assert!(markdown.contains("| :x: | AcceptChat |") && markdown.contains("[Open the comparison](http://"));

    let (junit, _) = gate::run(&args(Format::Junit)).await.unwrap();
    let doc = roxmltree::Document::parse(&junit).unwrap_or_else(|e| panic!("not XML ({e}):\n{junit}"));
    let suite = doc.root_element();
    assert_eq!(
        (
            suite.tag_name().name(),
            suite.attribute("tests"),
            suite.attribute("failures")
        ),
        ("testsuite", Some("2"), Some("1"))
    );
    let cases: Vec<_> = suite.children().filter(|n| n.has_tag_name("testcase")).collect();
    assert_eq!(cases.len(), 2);
    let accept = cases
        .iter()
        .find(|c| c.attribute("name") == Some("AcceptChat"))
        .unwrap();
    let failure = accept
        .children()
        .find(|n| n.has_tag_name("failure"))
        .expect("a failure element");
    assert!(failure.attribute("message").unwrap().contains("beyond"));

    // Wider bands for AcceptChat: a warning, which fails the build only with --fail-on-warn.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "[bt.AcceptChat]\np50 = 2.0\np99 = 2.0\n").unwrap();
    let relaxed = GateArgs {
        config: Some(config.path().to_path_buf()),
        ..args(Format::Table)
    };
    assert_eq!(gate::run(&relaxed).await.unwrap().1, 0, "a warning passes by default");
    let strict = GateArgs {
        fail_on_warn: true,
        ..relaxed.clone()
    };
    assert_eq!(gate::run(&strict).await.unwrap().1, 2);

    // Errors (the binary exits 4 on these): an unknown version, a bad config, no collector.
    let unknown = GateArgs {
        candidate: "9.9.9".into(),
        ..args(Format::Table)
    };
    let message = gate::run(&unknown).await.unwrap_err().to_string();
    assert!(message.contains("9.9.9") && message.contains("404"), "{message}");
    std::fs::write(config.path(), "[bands]\np50 = \"ten\"\n").unwrap();
    assert!(gate::run(&relaxed)
        .await
        .unwrap_err()
        .to_string()
        .contains("invalid gate config"));
    let unreachable = GateArgs {
        url: "http://127.0.0.1:9".into(),
        ..args(Format::Table)
    };
    assert!(gate::run(&unreachable)
        .await
        .unwrap_err()
        .to_string()
        .contains("cannot reach the collector"));
    collector.shutdown().await.unwrap();
}
