//! The modern-server DDL (codecs, TTL, skip indexes) and every read query run on a current
//! ClickHouse (chdb-core, in-process) and give the expected rows, so users on 23.8+ are not
//! trusting SQL that was only ever run on 18.16.

use std::process::Command;

use serde_json::json;
use sightline_collector::{
    query::{CompareScope, Queries, TopologyFilter, TraceFilter, Window},
    store::schema::{all_statements, Ddl},
};
use sightline_tests::{python, python_script};

#[test]
fn modern_ddl_and_read_queries_run_on_current_clickhouse() {
    let database = "sightline";
    let ddl = all_statements(&Ddl {
        database: database.into(),
        modern: true,
        retention_days: 10_000,
    });
    let queries = Queries::new(clickhouse::Client::default());
    let trace = "0af7651916cd43dd8448eb211c80319c";
    // The sample spans start at 1_700_000_000 s (see chdb_check.py).
    let window = Window {
        from_us: 1_699_999_000_000_000,
        to_us: 1_700_001_000_000_000,
    };
    let filter = |service: Option<&str>, min_ms: Option<u64>, error: Option<bool>| TraceFilter {
        service: service.map(Into::into),
        bt: Some("Login".into()),
        min_duration_us: min_ms.map(|ms| ms * 1000),
        error,
        limit: 20,
    };
    let topology = |bt: &str, version: &str| TopologyFilter {
        bt: Some(bt.into()),
        version: (!version.is_empty()).then(|| version.into()),
    };
    let scope = |block_seconds: u32| CompareScope {
        service: "auth".into(),
        baseline: "1.4.2".into(),
        candidate: "1.5.0".into(),
        window,
        block_seconds,
    };
    let sql = |q: clickhouse::query::Query| q.sql_display().to_string();
    let spec = json!({
        "database": database,
        "ddl": ddl,
        "queries": {
            "trace_index": { "sql": sql(queries.trace_index_query(trace)), "rows": 1 },
            "trace_spans": {
                "sql": sql(queries.trace_spans_query(trace, &["auth".into(), "web".into()], 1_700_000_000_000_000, 1_700_000_000_120_000)),
                "rows": 2,
            },
            "search": { "sql": sql(queries.search_query(window, &filter(Some("auth"), Some(100), None))), "rows": 1 },
            "search_errors": { "sql": sql(queries.search_query(window, &filter(None, None, Some(true)))), "rows": 1 },
            "search_none": { "sql": sql(queries.search_query(window, &filter(Some("auth' OR 1=1 --"), None, None))), "rows": 0 },
            "services": { "sql": sql(queries.services_query(window)), "rows": 1 },
            "agents": { "sql": sql(queries.agents_query(window)), "rows": 0 },
            "stuck": { "sql": sql(queries.stuck_query(1_700_000_000)), "rows": 0 },
            "topology": { "sql": sql(queries.topology_query(window, &TopologyFilter::default())), "rows": 1 },
            "transactions": { "sql": sql(queries.transactions_query(window, Some("auth"))), "rows": 1 },
            "transactions_none": { "sql": sql(queries.transactions_query(window, Some("auth' OR 1=1 --"))), "rows": 0 },
            "stages": { "sql": sql(queries.stages_query(window, None)), "rows": 1 },
            "compare_blocks_1m": { "sql": sql(queries.compare_blocks_query(&scope(60))), "rows": 1 },
            "compare_blocks_10s": { "sql": sql(queries.compare_blocks_query(&scope(10))), "rows": 0 },
            "compare_error_types": { "sql": sql(queries.compare_error_types_query(&scope(60))), "rows": 1 },
            "compare_stages": { "sql": sql(queries.compare_stages_query(&scope(60))), "rows": 1 },
            "topology_health": { "sql": sql(queries.health_query(window, &TopologyFilter::default())), "rows": 1 },
            "topology_bt": { "sql": sql(queries.topology_query(window, &topology("Login", "1.4.2"))), "rows": 1 },
            "topology_none": { "sql": sql(queries.topology_query(window, &topology("Login' OR 1=1 --", ""))), "rows": 0 },
        },
    });
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let output = Command::new(python())
        .arg(python_script("chdb_check.py"))
        .arg(file.path())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chdb check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("all statements ran on"), "{stdout}");
    println!("{stdout}");
}
