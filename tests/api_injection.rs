//! Hostile values in every API parameter run no query but the intended one: ClickHouse's own
//! query log is compared, query by query, with what benign values ran. And the API's limits
//! on window length and answer size refuse with a clear message and a counter.

use std::{collections::BTreeSet, time::Duration};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use sightline_collector::{store, Collector};
use sightline_tests::{
    eventually, get, metric,
    otlp::{chat_blocks, send_version},
    testing,
};

fn encode(value: &str) -> String {
    utf8_percent_encode(value, NON_ALPHANUMERIC).to_string()
}

/// A query with its literals taken out: string literals become `'?'`, numbers `N`, lists of
/// either one item, whitespace one space. Two queries with one shape differ only in values.
fn shape(query: &str) -> String {
    let mut out = String::new();
    let mut chars = query.chars().peekable();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        if c == '\'' {
            while let Some(d) = chars.next() {
                match d {
                    '\\' => {
                        chars.next();
                    }
                    '\'' if chars.peek() == Some(&'\'') => {
                        chars.next();
                    }
                    '\'' => break,
                    _ => {}
                }
            }
            out.push_str("'?'");
            in_word = false;
            continue;
        }
        if c.is_ascii_digit() && !in_word {
            while chars.peek().is_some_and(|d| d.is_ascii_alphanumeric() || *d == '.') {
                chars.next();
            }
            out.push('N');
            in_word = true;
            continue;
        }
        in_word = c.is_alphanumeric() || c == '_';
        out.push(c);
    }
    let mut shape = out.split_whitespace().collect::<Vec<_>>().join(" ");
    for (list, one) in [("'?', '?'", "'?'"), ("'?','?'", "'?'"), ("N, N", "N"), ("N,N", "N")] {
        while shape.contains(list) {
            shape = shape.replace(list, one);
        }
    }
    shape
}

#[test]
fn shapes_hide_values_only() {
    assert_eq!(
        shape("SELECT a FROM t WHERE s = 'x\\' OR 1=1 --' AND n >= 17 AND v IN ('a', 'b')"),
        shape("SELECT a FROM t WHERE s = 'auth' AND n >= 2 AND v IN ('c')")
    );
    assert_ne!(
        shape("SELECT a FROM t WHERE s = 'x' OR 1=1"),
        shape("SELECT a FROM t WHERE s = 'x'")
    );
    assert_eq!(shape("SELECT * FROM latency_1m"), "SELECT * FROM latency_1m");
}

/// Every request a dashboard or the gate makes, with each name-like parameter set to `value`.
fn requests(value: &str) -> Vec<String> {
    let v = encode(value);
    let window = "from=1700000000000&to=1700003600000";
    vec![
        format!("/api/v1/traces?service={v}"),
        format!("/api/v1/traces?bt={v}&min_duration_ms=1&error=true&limit=5"),
        format!("/api/v1/topology?bt={v}"),
        format!("/api/v1/topology?version={v}"),
        format!("/api/v1/transactions?service={v}"),
        format!("/api/v1/compare?service={v}&baseline=1.0&candidate=2.0&{window}"),
        format!("/api/v1/compare?service=chat&baseline={v}&candidate=2.0&{window}"),
        format!("/api/v1/compare?service=chat&baseline=1.0&candidate={v}&{window}"),
        format!("/api/v1/services?{window}"),
    ]
}

/// Values a parser must refuse before any query runs: time, numbers, flags, block, trace id.
fn refused(value: &str) -> Vec<String> {
    let v = encode(value);
    vec![
        format!("/api/v1/traces?from={v}"),
        format!("/api/v1/traces?to={v}"),
        format!("/api/v1/traces?min_duration_ms={v}"),
        format!("/api/v1/traces?error={v}"),
        format!("/api/v1/traces?limit={v}"),
        format!("/api/v1/topology?from={v}"),
        format!("/api/v1/services?to={v}"),
        format!("/api/v1/compare?service=chat&baseline=1.0&candidate=2.0&block={v}"),
        format!("/api/v1/traces/{v}"),
    ]
}

const HOSTILE: [&str; 10] = [
    "x' OR '1'='1",
    "chat'; DROP TABLE spans; --",
    "chat\\' OR 1=1 --",
    "chat' UNION ALL SELECT name, name FROM system.tables --",
    "1) OR (1=1",
    "chat\" OR \"\"=\"",
    "?",
    "chat`; SELECT 1",
    "chat\u{0}' OR 1",
    "%27 OR 1=1",
];

struct Logged {
    kind: u8,
    query: String,
}

/// The queries ClickHouse ran since the last call (by query id and log entry type), and how
/// each ended.
async fn logged(admin: &clickhouse::Client, seen: &mut BTreeSet<(String, u8)>) -> Vec<Logged> {
    admin.query("SYSTEM FLUSH LOGS").execute().await.unwrap();
    let rows: Vec<(String, u8, String)> = admin
        .query(
            "SELECT query_id, toUInt8(type) AS kind, query FROM system.query_log
             WHERE query NOT LIKE '%query_log%' AND query != 'SYSTEM FLUSH LOGS'",
        )
        .fetch_all()
        .await
        .unwrap();
    rows.into_iter()
        .filter(|(id, kind, _)| seen.insert((id.clone(), *kind)))
        .map(|(_, kind, query)| Logged { kind, query })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_in_every_parameter_run_only_the_intended_queries() {
    let mut config = testing::config("api_injection");
    // The spans are of November 2023: the second collector started below would otherwise drop
    // their day partitions at its start (retention on 18.16), racing the queries that read them.
    config.clickhouse.retention_days = 3650;
    let collector = Collector::start(config.clone()).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let admin = store::client(&config.clickhouse.url, "system", &config.clickhouse);
    let grpc = format!("http://{}", collector.grpc_addr);
    let mut client = TraceServiceClient::connect(grpc).await.unwrap();
    send_version(&mut client, "chat", "1.0", chat_blocks(1_700_000_000, 3, 4, 20)).await;
    send_version(&mut client, "chat", "2.0", chat_blocks(1_700_000_000, 3, 4, 40)).await;
    let data = store::client(&config.clickhouse.url, &config.clickhouse.database, &config.clickhouse);
    let spans = eventually("the spans", Duration::from_secs(20), || async {
        let n: u64 = data.query("SELECT count() FROM spans").fetch_one().await.unwrap();
        (n == 96).then_some(n)
    })
    .await;
    let mut seen = BTreeSet::new();
    logged(&admin, &mut seen).await;

    // Benign values: the queries each request is meant to run.
    for path in requests("chat").into_iter().chain(requests("Login")) {
        let response = get(&format!("{api}{path}")).await;
        assert!(response.status < 500, "{path}: {}", response.status);
    }
    let intended: BTreeSet<String> = logged(&admin, &mut seen)
        .await
        .iter()
        .map(|l| shape(&l.query))
        .collect();
    assert!(intended.len() >= 5, "the API ran its queries: {intended:#?}");

    // Hostile values: answered as plain values (no match, or a 4xx), and every query ClickHouse
    // ran has the shape of an intended one and ran without a syntax error.
    for hostile in HOSTILE {
        for path in requests(hostile) {
            let response = get(&format!("{api}{path}")).await;
            assert!(
                [200, 404].contains(&response.status),
                "{path}: {} {}",
                response.status,
                String::from_utf8_lossy(&response.body)
            );
            if response.status == 200 && path.starts_with("/api/v1/traces") {
                assert_eq!(response.json()["traces"], serde_json::json!([]), "{path}");
            }
        }
        for path in refused(hostile) {
            let response = get(&format!("{api}{path}")).await;
            assert_eq!(
                response.status,
                400,
                "{path}: {}",
                String::from_utf8_lossy(&response.body)
            );
            let message = response.json()["error"].as_str().unwrap().to_string();
            assert!(!message.contains("Code:") && !message.contains("DB::"), "{message}");
        }
    }
    let ran = logged(&admin, &mut seen).await;
    assert!(
        ran.len() > HOSTILE.len(),
        "the hostile requests ran queries ({})",
        ran.len()
    );
    for query in &ran {
        // 1 = started, 2 = finished; 3 and 4 are exceptions (a broken statement would be one).
        assert!([1, 2].contains(&query.kind), "query failed: {}", query.query);
        let shape = shape(&query.query);
        let writer = shape.starts_with("INSERT INTO") || shape.contains("FROM write_ledger");
        assert!(
            writer || intended.contains(&shape),
            "a query no benign request ran:\n{}\nshape: {shape}",
            query.query
        );
    }
    println!(
        "{} hostile values x {} requests: {} queries logged, {} shapes, all intended",
        HOSTILE.len(),
        requests("").len() + refused("").len(),
        ran.len(),
        ran.iter().map(|q| shape(&q.query)).collect::<BTreeSet<_>>().len()
    );
    let still: u64 = data.query("SELECT count() FROM spans").fetch_one().await.unwrap();
    assert_eq!(still, spans, "the data is untouched");

    // Limits: a window past api.max_window_days, and answers past api.max_result_rows.
    let long = get(&format!("{api}/api/v1/topology?from=1600000000000&to=1700000000000")).await;
    assert_eq!(long.status, 400);
    assert!(long.json()["error"].as_str().unwrap().contains("max_window_days"));
    let mut small = config.clone();
    small.api.max_result_rows = 3;
    let limited = Collector::start(small).await.unwrap();
    let limited_api = format!("http://{}", limited.api_addr);
    let window = "from=1699999000000&to=1700003600000";
    let big = get(&format!("{limited_api}/api/v1/traces?{window}&limit=50")).await;
    assert_eq!(big.status, 422, "{}", String::from_utf8_lossy(&big.body));
    assert!(big.json()["error"].as_str().unwrap().contains("max_result_rows"));
    let narrow = get(&format!("{limited_api}/api/v1/traces?{window}&limit=2")).await;
    assert_eq!(narrow.status, 200, "a narrower request is answered");
    let text = String::from_utf8(get(&format!("{limited_api}/metrics")).await.body.to_vec()).unwrap();
    assert_eq!(
        metric(
            &text,
            "sightline_rejected_requests_total{receiver=\"api\",reason=\"result_too_large\"}"
        ),
        1.0
    );
    let text = String::from_utf8(get(&format!("{api}/metrics")).await.body.to_vec()).unwrap();
    assert!(
        metric(
            &text,
            "sightline_rejected_requests_total{receiver=\"api\",reason=\"bad_parameter\"}"
        ) >= 90.0
    );
    limited.shutdown().await.unwrap();
    collector.shutdown().await.unwrap();
}
