//! Tables and their migrations. One schema serves ClickHouse 18.16 (tests, CI) and modern
//! servers (23.8+): the DDL is generated per server generation, and modern servers also get
//! column codecs, a TTL and skip indexes. Applied migrations are recorded in
//! `schema_migrations`; every statement is idempotent, so a half-applied migration is safe to
//! run again.
//!
//! Data enters through `spans_input` (a `Null` table of plain columns: RowBinary parses at full
//! speed) and materialized views fan it out to `spans` (LowCardinality columns), the trace-id
//! lookup and the instance list. Latency aggregates are written by the collector itself.

use clickhouse::{sql::Identifier, Client};
use tracing::info;

/// What the DDL depends on.
#[derive(Debug, Clone)]
pub struct Ddl {
    pub database: String,
    /// ClickHouse 23.8 or newer: codecs, TTL, skip indexes.
    pub modern: bool,
    pub retention_days: u32,
}

/// A named, numbered set of statements, applied once per database.
pub struct Migration {
    pub id: u32,
    pub name: &'static str,
    pub statements: fn(&Ddl) -> Vec<String>,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: 1,
        name: "spans, trace index, instances",
        statements: spans_tables,
    },
    Migration {
        id: 2,
        name: "per-minute latency aggregates",
        statements: latency_tables,
    },
    Migration {
        id: 3,
        name: "agent heartbeats and in-flight transactions",
        statements: agent_tables,
    },
    Migration {
        id: 4,
        name: "per-minute topology edges",
        statements: edge_tables,
    },
    Migration {
        id: 5,
        name: "per-minute stage self-time",
        statements: stage_tables,
    },
    Migration {
        id: 6,
        name: "10-second latency aggregates",
        statements: fine_latency_tables,
    },
    Migration {
        id: 7,
        name: "batch ids and the write ledger (idempotent replays from the spool)",
        statements: ledger_tables,
    },
    Migration {
        id: 8,
        name: "SLOs defined through the API",
        statements: slo_tables,
    },
    Migration {
        id: 9,
        name: "whole INSERTs only (row counts on the inputs), the ledger view last",
        statements: ledgered_inputs,
    },
];

/// Tables written with batch ids, each through a Null `*_input` table whose views write the
/// rows and, in the same INSERT, one `write_ledger` row per batch range (store/writer.rs).
pub const LEDGERED: [&str; 5] = ["spans", "latency_1m", "latency_10s", "edges_1m", "stages_1m"];

/// Every view from a ledgered input writes only a block that is the whole INSERT: each row
/// carries the INSERT's row count. ClickHouse 18.16 ends a chunked HTTP body at a lost
/// connection as if it were complete, so an INSERT cut off at a row boundary (a collector killed
/// mid-send) would otherwise commit its first rows, with a ledger row claiming its batches.
const WHOLE_INSERT: &str = "WHERE blockSize() = batch_rows";

/// Days the 10-second aggregates are kept (at most `retention_days`): they serve comparisons of
/// short load tests, which look at the last hours.
pub const FINE_RETENTION_DAYS: u32 = 3;

/// Node types of topology edges (crate::pipeline::edges::NodeType).
pub const NODE_ENUM: &str = "Enum8('user' = 1, 'service' = 2, 'database' = 3, 'cache' = 4, 'mq' = 5, 'external' = 6)";

pub const KIND_ENUM: &str =
    "Enum8('unspecified' = 0, 'internal' = 1, 'server' = 2, 'client' = 3, 'producer' = 4, 'consumer' = 5)";
pub const STATUS_ENUM: &str = "Enum8('unset' = 0, 'ok' = 1, 'error' = 2)";

/// The server generation, from `version()`.
pub fn is_modern(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (23, 8)
}

fn spans_tables(d: &Ddl) -> Vec<String> {
    let db = &d.database;
    // Modern servers: Delta for sorted times, ZSTD everywhere, skip indexes for the filters
    // trace search uses, and the retention TTL (18.16 drops day partitions instead).
    let (delta, zstd) = if d.modern {
        (" CODEC(Delta, ZSTD(1))", " CODEC(ZSTD(1))")
    } else {
        ("", "")
    };
    let extras = if d.modern {
        ",\n  INDEX idx_trace_id trace_id TYPE bloom_filter(0.01) GRANULARITY 4\
         ,\n  INDEX idx_operation operation TYPE set(1000) GRANULARITY 4\
         ,\n  INDEX idx_bt bt TYPE set(1000) GRANULARITY 4\
         ,\n  INDEX idx_duration duration_us TYPE minmax GRANULARITY 1"
    } else {
        ""
    };
    let ttl = if d.modern {
        format!(
            "\nTTL toDateTime(intDiv(start_us, 1000000)) + INTERVAL {} DAY",
            d.retention_days
        )
    } else {
        String::new()
    };
    let mut statements = vec![
        // Sorted by (service, start): a trace's spans in one service sit together, which is
        // what keeps bytes per span low; operation is left out of the key on purpose (it
        // costs ~11 B/span), modern servers index it instead.
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.spans (
  trace_id FixedString(16){zstd},
  span_id UInt64{zstd},
  parent_span_id UInt64{zstd},
  service LowCardinality(String),
  service_version LowCardinality(String),
  instance LowCardinality(String),
  operation LowCardinality(String),
  kind {KIND_ENUM},
  component LowCardinality(String),
  peer LowCardinality(String),
  bt LowCardinality(String),
  start_us UInt64{delta},
  duration_us UInt64{zstd},
  status {STATUS_ENUM},
  error_type LowCardinality(String),
  error_message String{zstd},
  attributes Nested(key String, value String){extras}
) ENGINE = MergeTree
PARTITION BY toDate(intDiv(start_us, 1000000))
ORDER BY (service, start_us){ttl}
SETTINGS index_granularity = 8192"
        ),
    ];
    statements.extend(spans_input_and_views(d));
    statements
}

/// `spans_input` and the views from it (migration 1; again in migration 7 with batch ids).
fn spans_input_and_views(d: &Ddl) -> Vec<String> {
    let db = &d.database;
    let ttl_index = if d.modern {
        format!("\nTTL day + INTERVAL {} DAY", d.retention_days)
    } else {
        String::new()
    };
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.spans_input (
  trace_id FixedString(16),
  span_id UInt64,
  parent_span_id UInt64,
  service String,
  service_version String,
  instance String,
  operation String,
  kind Int8,
  component String,
  peer String,
  bt String,
  start_us UInt64,
  duration_us UInt64,
  status Int8,
  error_type String,
  error_message String,
  `attributes.key` Array(String),
  `attributes.value` Array(String),
  batch_lo UInt64,
  batch_hi UInt64,
  batch_rows UInt64
) ENGINE = Null"
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.spans_mv TO {db}.spans AS SELECT
  trace_id, span_id, parent_span_id,
  CAST(service AS LowCardinality(String)) AS service,
  CAST(service_version AS LowCardinality(String)) AS service_version,
  CAST(instance AS LowCardinality(String)) AS instance,
  CAST(operation AS LowCardinality(String)) AS operation,
  CAST(kind AS {KIND_ENUM}) AS kind,
  CAST(component AS LowCardinality(String)) AS component,
  CAST(peer AS LowCardinality(String)) AS peer,
  CAST(bt AS LowCardinality(String)) AS bt,
  start_us, duration_us,
  CAST(status AS {STATUS_ENUM}) AS status,
  CAST(error_type AS LowCardinality(String)) AS error_type,
  error_message, `attributes.key`, `attributes.value`
FROM {db}.spans_input
{WHOLE_INSERT}"
        ),
        // Trace id -> time range and services: a trace opens by primary key, not by scan.
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.trace_index (
  trace_id FixedString(16),
  day Date,
  first_start_us UInt64,
  last_end_us UInt64,
  services Array(String)
) ENGINE = MergeTree
PARTITION BY day
ORDER BY trace_id{ttl_index}"
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.trace_index_mv TO {db}.trace_index AS SELECT
  trace_id,
  toDate(intDiv(min(start_us), 1000000)) AS day,
  min(start_us) AS first_start_us,
  max(start_us + duration_us) AS last_end_us,
  groupUniqArray(service) AS services
FROM {db}.spans_input
{WHOLE_INSERT}
GROUP BY trace_id"
        ),
        // Which instances of which versions sent spans, per minute: versions' first-seen
        // times (deployment markers) without reading raw spans.
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.service_instances (
  minute DateTime,
  service LowCardinality(String),
  service_version LowCardinality(String),
  instance LowCardinality(String),
  spans UInt64
) ENGINE = SummingMergeTree((spans))
PARTITION BY toYYYYMM(minute)
ORDER BY (service, service_version, instance, minute)"
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.service_instances_mv TO {db}.service_instances AS SELECT
  toStartOfMinute(toDateTime(intDiv(start_us, 1000000))) AS minute,
  CAST(service AS LowCardinality(String)) AS service,
  CAST(service_version AS LowCardinality(String)) AS service_version,
  CAST(instance AS LowCardinality(String)) AS instance,
  count() AS spans
FROM {db}.spans_input
{WHOLE_INSERT}
GROUP BY minute, service, service_version, instance"
        ),
    ]
}

fn latency_tables(d: &Ddl) -> Vec<String> {
    vec![latency_table(&d.database, "latency_1m", "minute", "")]
}

/// A latency aggregate table with its time column named `time` and an optional TTL clause.
fn latency_table(db: &str, table: &str, time: &str, ttl: &str) -> String {
    // The histogram column's name must end in `Map` for 18.16's SummingMergeTree to sum it by
    // bucket on merge; `sumMap(histMap.bucket, histMap.count)` reads it back.
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.{table} (
  {time} DateTime,
  service LowCardinality(String),
  service_version LowCardinality(String),
  bt LowCardinality(String),
  operation LowCardinality(String),
  kind {KIND_ENUM},
  status {STATUS_ENUM},
  calls UInt64,
  errors UInt64,
  duration_us_sum UInt64,
  histMap Nested(bucket UInt64, count UInt64)
) ENGINE = SummingMergeTree((calls, errors, duration_us_sum))
PARTITION BY toDate({time})
ORDER BY (service, {time}, service_version, bt, operation, kind, status){ttl}"
    )
}

fn edge_tables(d: &Ddl) -> Vec<String> {
    let db = &d.database;
    // Like latency_1m: SummingMergeTree adds partials per key, `histMap` by bucket.
    vec![format!(
        "CREATE TABLE IF NOT EXISTS {db}.edges_1m (
  minute DateTime,
  caller LowCardinality(String),
  caller_type {NODE_ENUM},
  callee LowCardinality(String),
  callee_type {NODE_ENUM},
  bt LowCardinality(String),
  caller_version LowCardinality(String),
  callee_version LowCardinality(String),
  calls UInt64,
  errors UInt64,
  duration_us_sum UInt64,
  histMap Nested(bucket UInt64, count UInt64)
) ENGINE = SummingMergeTree((calls, errors, duration_us_sum))
PARTITION BY toDate(minute)
ORDER BY (minute, caller, callee, bt, caller_type, callee_type, caller_version, callee_version)"
    )]
}

fn fine_latency_tables(d: &Ddl) -> Vec<String> {
    let ttl = if d.modern {
        format!(
            "\nTTL time + INTERVAL {} DAY",
            d.retention_days.min(FINE_RETENTION_DAYS)
        )
    } else {
        String::new()
    };
    vec![latency_table(&d.database, "latency_10s", "time", &ttl)]
}

fn stage_tables(d: &Ddl) -> Vec<String> {
    let db = &d.database;
    vec![format!(
        "CREATE TABLE IF NOT EXISTS {db}.stages_1m (
  minute DateTime,
  service LowCardinality(String),
  service_version LowCardinality(String),
  bt LowCardinality(String),
  stage LowCardinality(String),
  spans UInt64,
  self_us_sum UInt64
) ENGINE = SummingMergeTree((spans, self_us_sum))
PARTITION BY toDate(minute)
ORDER BY (service, minute, service_version, bt, stage)"
    )]
}

fn agent_tables(d: &Ddl) -> Vec<String> {
    let db = &d.database;
    let ttl = |column: &str| {
        if d.modern {
            format!("\nTTL {column} + INTERVAL {} DAY", d.retention_days)
        } else {
            String::new()
        }
    };
    let (heartbeat_ttl, inflight_ttl) = (ttl("time"), ttl("snapshot_time"));
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.agent_heartbeats (
  time DateTime,
  service LowCardinality(String),
  service_version LowCardinality(String),
  instance LowCardinality(String),
  queue_depth UInt64,
  dropped_spans UInt64,
  sent_spans UInt64
) ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (service, instance, time){heartbeat_ttl}"
        ),
        // Transactions open longer than an agent's threshold, as each snapshot saw them.
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.inflight (
  snapshot_time DateTime,
  service LowCardinality(String),
  service_version LowCardinality(String),
  instance LowCardinality(String),
  bt LowCardinality(String),
  operation LowCardinality(String),
  trace_id FixedString(16),
  span_id UInt64,
  start_us UInt64,
  current_operation String,
  current_peer String
) ENGINE = MergeTree
PARTITION BY toDate(snapshot_time)
ORDER BY (service, snapshot_time){inflight_ttl}"
        ),
    ]
}

/// A column of an aggregate's input table: name, type as written, and the table's type when
/// the view must cast (LowCardinality, enums).
type InputColumn = (&'static str, &'static str, Option<&'static str>);

const LOW: Option<&str> = Some("LowCardinality(String)");

fn latency_input(time: &'static str) -> Vec<InputColumn> {
    vec![
        (time, "DateTime", None),
        ("service", "String", LOW),
        ("service_version", "String", LOW),
        ("bt", "String", LOW),
        ("operation", "String", LOW),
        ("kind", "Int8", Some(KIND_ENUM)),
        ("status", "Int8", Some(STATUS_ENUM)),
        ("calls", "UInt64", None),
        ("errors", "UInt64", None),
        ("duration_us_sum", "UInt64", None),
        ("histMap.bucket", "Array(UInt64)", None),
        ("histMap.count", "Array(UInt64)", None),
    ]
}

/// Migration 8: each change to an API-defined SLO is a row; the newest per name wins.
fn slo_tables(d: &Ddl) -> Vec<String> {
    let db = &d.database;
    vec![format!(
        "CREATE TABLE IF NOT EXISTS {db}.slos (
  name String,
  definition String,
  updated_at UInt64,
  deleted UInt8
) ENGINE = ReplacingMergeTree(updated_at)
ORDER BY name"
    )]
}

/// Migration 7: batch ids on every ledgered table's input and the ledger they write.
fn ledger_tables(d: &Ddl) -> Vec<String> {
    let db = &d.database;
    let ttl = if d.modern {
        format!("\nTTL written_at + INTERVAL {} DAY", d.retention_days)
    } else {
        String::new()
    };
    let mut statements = vec![format!(
        "CREATE TABLE IF NOT EXISTS {db}.write_ledger (
  target LowCardinality(String),
  batch_lo UInt64,
  batch_hi UInt64,
  rows UInt64,
  written_at DateTime
) ENGINE = MergeTree
PARTITION BY toDate(written_at)
ORDER BY (batch_hi, target){ttl}"
    )];
    statements.extend(ledgered_inputs(d));
    statements
}

/// The Null `*_input` tables of the ledgered tables and their views (migrations 7 and 9).
/// 18.16 can neither add a column only if it is missing nor change a view: they are dropped
/// and created again (they hold no data).
fn ledgered_inputs(d: &Ddl) -> Vec<String> {
    let db = &d.database;
    let mut statements = Vec::new();
    for table in LEDGERED {
        for view in [
            format!("{table}_mv"),
            format!("{table}_ledger_mv"),
            ledger_view_name(table),
        ] {
            statements.push(format!("DROP TABLE IF EXISTS {db}.{view}"));
        }
    }
    for table in ["trace_index_mv", "service_instances_mv"]
        .map(String::from)
        .into_iter()
        .chain(LEDGERED.map(|t| format!("{t}_input")))
    {
        statements.push(format!("DROP TABLE IF EXISTS {db}.{table}"));
    }
    statements.extend(spans_input_and_views(d));
    statements.push(ledger_view(db, "spans", "spans_input"));
    let node = Some(NODE_ENUM);
    let inputs: [(&str, Vec<InputColumn>); 4] = [
        ("latency_1m", latency_input("minute")),
        ("latency_10s", latency_input("time")),
        (
            "edges_1m",
            vec![
                ("minute", "DateTime", None),
                ("caller", "String", LOW),
                ("caller_type", "Int8", node),
                ("callee", "String", LOW),
                ("callee_type", "Int8", node),
                ("bt", "String", LOW),
                ("caller_version", "String", LOW),
                ("callee_version", "String", LOW),
                ("calls", "UInt64", None),
                ("errors", "UInt64", None),
                ("duration_us_sum", "UInt64", None),
                ("histMap.bucket", "Array(UInt64)", None),
                ("histMap.count", "Array(UInt64)", None),
            ],
        ),
        (
            "stages_1m",
            vec![
                ("minute", "DateTime", None),
                ("service", "String", LOW),
                ("service_version", "String", LOW),
                ("bt", "String", LOW),
                ("stage", "String", LOW),
                ("spans", "UInt64", None),
                ("self_us_sum", "UInt64", None),
            ],
        ),
    ];
    for (table, columns) in inputs {
        let input = format!("{table}_input");
        let declared: Vec<String> = columns.iter().map(|(name, ty, _)| format!("  `{name}` {ty}")).collect();
        statements.push(format!(
            "CREATE TABLE IF NOT EXISTS {db}.{input} (\n{},\n  batch_lo UInt64,\n  batch_hi UInt64,\n  batch_rows UInt64\n) ENGINE = Null",
            declared.join(",\n")
        ));
        let selected: Vec<String> = columns
            .iter()
            .map(|(name, _, cast)| match cast {
                Some(to) => format!("CAST(`{name}` AS {to}) AS `{name}`"),
                None => format!("`{name}`"),
            })
            .collect();
        statements.push(format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{table}_mv TO {db}.{table} AS SELECT\n  {}\nFROM {db}.{input}\n{WHOLE_INSERT}",
            selected.join(",\n  ")
        ));
        statements.push(ledger_view(db, table, &input));
    }
    statements
}

/// 18.16 pushes an INSERT to its views one after the other in the order of their names: the
/// ledger's view sorts after every view writing rows (`write_` > `trace_`, `spans_`, ...), so
/// an INSERT that fails in one of those leaves no ledger row claiming its batches.
fn ledger_view_name(table: &str) -> String {
    format!("write_ledger_{table}_mv")
}

/// The view that records, per INSERT into `input`, which batches it carried into `table`.
fn ledger_view(db: &str, table: &str, input: &str) -> String {
    let name = ledger_view_name(table);
    format!(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{name} TO {db}.write_ledger AS SELECT
  CAST('{table}' AS LowCardinality(String)) AS target, batch_lo, batch_hi, count() AS rows, now() AS written_at
FROM {db}.{input}
{WHOLE_INSERT}
GROUP BY batch_lo, batch_hi"
    )
}

/// Every statement of every migration, in order (for checks against other servers).
pub fn all_statements(ddl: &Ddl) -> Vec<String> {
    MIGRATIONS.iter().flat_map(|m| (m.statements)(ddl)).collect()
}

/// Creates the database and applies the migrations it has not seen. Returns the server version.
pub async fn migrate(client: &Client, database: &str, retention_days: u32) -> anyhow::Result<String> {
    // The database may not exist yet: talk to `default` until it does; all names below are
    // qualified with the database anyway.
    let client = client.clone().with_database("default");
    let version: String = client.query("SELECT version()").fetch_one().await?;
    let ddl = Ddl {
        database: database.to_string(),
        modern: is_modern(&version),
        retention_days,
    };
    let client = if ddl.modern {
        client.clone()
    } else {
        // 18.16 needs this to create LowCardinality columns; modern servers do not know it.
        client
            .clone()
            .with_setting("allow_experimental_low_cardinality_type", "1")
    };
    client
        .query("CREATE DATABASE IF NOT EXISTS ?")
        .bind(Identifier(database))
        .execute()
        .await?;
    client
        .query(
            "CREATE TABLE IF NOT EXISTS ?.schema_migrations (id UInt32, name String, applied_at DateTime)
             ENGINE = MergeTree ORDER BY id",
        )
        .bind(Identifier(database))
        .execute()
        .await?;
    let applied: Vec<u32> = client
        .query("SELECT DISTINCT id FROM ?.schema_migrations")
        .bind(Identifier(database))
        .fetch_all()
        .await?;
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.id)) {
        for statement in (migration.statements)(&ddl) {
            client.query(&statement).execute().await.map_err(|e| {
                anyhow::anyhow!(
                    "migration {} ({}) failed: {e}\n{statement}",
                    migration.id,
                    migration.name
                )
            })?;
        }
        client
            .query("INSERT INTO ?.schema_migrations (id, name, applied_at) VALUES (?, ?, now())")
            .bind(Identifier(database))
            .bind(migration.id)
            .bind(migration.name)
            .execute()
            .await?;
        info!(id = migration.id, name = migration.name, "applied migration");
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_generation_from_version() {
        assert!(!is_modern("18.16.1"));
        assert!(!is_modern("23.3.1.2823"));
        assert!(is_modern("23.8.2.7"));
        assert!(is_modern("26.9.1.1"));
        assert!(!is_modern("garbage"));
    }

    #[test]
    fn only_modern_ddl_has_codecs_ttl_and_indexes() {
        let legacy = all_statements(&Ddl {
            database: "d".into(),
            modern: false,
            retention_days: 7,
        })
        .join("\n");
        let modern = all_statements(&Ddl {
            database: "d".into(),
            modern: true,
            retention_days: 7,
        })
        .join("\n");
        for word in ["CODEC", "TTL", "INDEX", "bloom_filter"] {
            assert!(!legacy.contains(word), "{word} in 18.16 DDL");
            assert!(modern.contains(word), "{word} missing from modern DDL");
        }
        assert!(modern.contains("INTERVAL 7 DAY"));
    }

    /// Views as the last migration leaves them: (name, input read).
    fn views_of_inputs() -> Vec<(String, String)> {
        let statements = ledgered_inputs(&Ddl {
            database: "d".into(),
            modern: false,
            retention_days: 7,
        });
        statements
            .iter()
            .filter_map(|s| {
                let name = s.strip_prefix("CREATE MATERIALIZED VIEW IF NOT EXISTS d.")?;
                let name = name.split_whitespace().next()?.to_string();
                let input = s.split("FROM d.").nth(1)?.split_whitespace().next()?.to_string();
                assert!(s.contains(WHOLE_INSERT), "view {name} writes partial INSERTs:\n{s}");
                Some((name, input))
            })
            .collect()
    }

    #[test]
    fn every_view_of_a_ledgered_input_writes_whole_inserts_and_the_ledger_comes_last() {
        let views = views_of_inputs();
        for table in LEDGERED {
            let input = format!("{table}_input");
            let mut names: Vec<&str> = views
                .iter()
                .filter(|(_, from)| *from == input)
                .map(|(name, _)| name.as_str())
                .collect();
            assert!(names.len() >= 2, "{input}: {names:?}");
            // ClickHouse 18.16 runs them in name order.
            names.sort_unstable();
            assert_eq!(
                names.last().copied(),
                Some(ledger_view_name(table).as_str()),
                "{input}: {names:?}"
            );
        }
    }
}
