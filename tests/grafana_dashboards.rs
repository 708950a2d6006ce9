//! Issue 7: the Grafana dashboards (dashboards/grafana, for Grafana's official ClickHouse data
//! source) query the schema as it is. Every panel's SQL and every variable's query runs on the
//! private ClickHouse against real data, with the plugin's macros and the variables filled in
//! as Grafana would, and returns rows in the shape its panel needs (the node graph's id,
//! source and target fields among them).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use serde_json::Value;
use sightline_collector::Collector;
use sightline_tests::{eventually, get, otlp, request, testing};

const PLUGIN: &str = "grafana-clickhouse-datasource";

/// One query of a dashboard: where it comes from, and its SQL as written.
struct DashboardQuery {
    place: String,
    panel_type: String,
    ref_id: String,
    sql: String,
}

fn queries(dashboard: &Value, file: &str) -> Vec<DashboardQuery> {
    let mut out = Vec::new();
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] == "query" {
            assert_eq!(
                variable["datasource"]["type"], PLUGIN,
                "{file}: variable {}",
                variable["name"]
            );
            out.push(DashboardQuery {
                place: format!("{file}: variable {}", variable["name"]),
                panel_type: "variable".into(),
                ref_id: String::new(),
                sql: variable["query"].as_str().unwrap().into(),
            });
        }
    }
    for panel in dashboard["panels"].as_array().unwrap() {
        assert_eq!(panel["datasource"]["type"], PLUGIN, "{file}: panel {}", panel["title"]);
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{file}: panel {} has no query", panel["title"]);
        for target in targets {
            assert_eq!(target["editorType"], "sql");
            out.push(DashboardQuery {
                place: format!("{file}: panel {:?} query {}", panel["title"], target["refId"]),
                panel_type: panel["type"].as_str().unwrap().into(),
                ref_id: target["refId"].as_str().unwrap().into(),
                sql: target["rawSql"].as_str().unwrap().into(),
            });
        }
    }
    out
}

/// What Grafana sends for the SQL: the plugin's macros expanded, variables replaced.
fn expand(sql: &str, variables: &BTreeMap<&str, String>, from_s: u64, to_s: u64) -> String {
    let mut sql = sql.to_string();
    while let Some(at) = sql.find("$__timeFilter(") {
        let close = at + sql[at..].find(')').expect("macro closes");
        let column = sql[at + "$__timeFilter(".len()..close].trim().to_string();
        sql.replace_range(
            at..=close,
            &format!("{column} >= toDateTime({from_s}) AND {column} <= toDateTime({to_s})"),
        );
    }
    sql = sql
        .replace("$__fromTime", &format!("toDateTime({from_s})"))
        .replace("$__toTime", &format!("toDateTime({to_s})"));
    for (name, value) in variables {
        sql = sql.replace(&format!("${{{name}}}"), value);
    }
    assert!(
        !sql.contains("$__") && !sql.contains("${"),
        "unexpanded macro or variable in:\n{sql}"
    );
    sql
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_runs_against_the_schema_and_returns_its_fields() {
    let config = testing::config("grafana_dashboards");
    let (clickhouse, database) = (config.clickhouse.url.clone(), config.clickhouse.database.clone());
    let collector = Collector::start(config).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let mut client = TraceServiceClient::connect(format!("http://{}", collector.grpc_addr))
        .await
        .unwrap();
    // Two versions of `chat` (AcceptChat and Login, each with a database call) over the last
    // few minutes.
    let now_s = otlp::now_ns() / 1_000_000_000 / 10 * 10;
    for (version, first, db_ms) in [("1.4.2", now_s - 240, 20), ("1.5.0", now_s - 120, 45)] {
        otlp::send_version(&mut client, "chat", version, otlp::chat_blocks(first, 12, 5, db_ms)).await;
    }
    eventually("the aggregates", Duration::from_secs(30), || async {
        let body = get(&format!(
            "{api}/api/v1/transactions?service=chat&from={}",
            (now_s - 600) * 1000
        ))
        .await
        .json();
        let all = body["transactions"].as_array()?;
        let done = all.len() == 2
            && all
                .iter()
                .all(|t| t["calls"] == 120 && t["stages"].as_array().is_some_and(|s| !s.is_empty()));
        done.then_some(())
    })
    .await;

    let variables: BTreeMap<&str, String> = [
        ("database", database.clone()),
        ("service", "chat".into()),
        ("bt", "*".into()),
        ("baseline", "1.4.2".into()),
        ("candidate", "1.5.0".into()),
    ]
    .into();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dashboards/grafana");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        3,
        "RED, topology and comparison dashboards in {}",
        dir.display()
    );
    let mut ran = 0;
    for path in &files {
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        // The same queries with one business transaction chosen instead of all.
        for bt in ["*", "AcceptChat"] {
            let mut variables = variables.clone();
            variables.insert("bt", bt.into());
            for query in queries(&dashboard, &file) {
                let sql = expand(&query.sql, &variables, now_s - 900, now_s + 60);
                let response = request(
                    "POST",
                    &format!("{clickhouse}/?database={database}"),
                    None,
                    format!("{sql}\nFORMAT JSON").into_bytes(),
                )
                .await;
                let body = String::from_utf8_lossy(&response.body).to_string();
                assert_eq!(response.status, 200, "{} (bt {bt}) failed:\n{sql}\n{body}", query.place);
                let result: Value = serde_json::from_str(&body).unwrap();
                let rows = result["data"].as_array().unwrap();
                assert!(!rows.is_empty(), "{} (bt {bt}) returned no rows:\n{sql}", query.place);
                let columns: Vec<&str> = result["meta"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["name"].as_str().unwrap())
                    .collect();
                // Percentiles read from the summed histograms land where the data is (ms).
                for row in rows {
                    if let Some(p99) = row.get("p99_ms") {
                        let p99 = p99.as_f64().unwrap_or_default();
                        assert!((5.0..200.0).contains(&p99), "{}: p99 {p99} ms in {row}", query.place);
                    }
                }
                if query.panel_type == "timeseries" {
                    assert_eq!(columns[0], "time", "{}: time first", query.place);
                }
                if query.panel_type == "nodeGraph" {
                    let needed: &[&str] = if query.ref_id == "A" {
                        &["id", "title", "mainstat", "arc__failed", "arc__passed"]
                    } else {
                        &["id", "source", "target", "mainstat"]
                    };
                    for field in needed {
                        assert!(columns.contains(field), "{}: no {field} in {columns:?}", query.place);
                    }
                    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
                    if query.ref_id == "A" && bt == "*" {
                        assert!(
                            ids.contains(&"user:user") && ids.contains(&"service:chat"),
                            "nodes {ids:?}"
                        );
                        assert!(ids.iter().any(|id| id.starts_with("database:")), "nodes {ids:?}");
                    }
                }
                ran += 1;
            }
        }
    }
    println!("{ran} dashboard queries ran against the schema");
    assert!(ran >= 2 * 14, "{ran} queries");
    collector.shutdown().await.unwrap();
}
