//! Retention for servers without TTL (ClickHouse 18.16): day partitions older than
//! `retention_days` are dropped, once at start and then hourly. Modern servers expire rows by
//! the tables' TTL instead, and this does nothing there.

use std::time::Duration;

use clickhouse::{sql::Identifier, Client, Row};
use serde::Deserialize;
use time::{macros::format_description, Date, OffsetDateTime};
use tracing::{info, warn};

use super::schema::FINE_RETENTION_DAYS;

/// Tables partitioned by day (`partition_id` = YYYYMMDD).
const DAY_PARTITIONED: [&str; 9] = [
    "spans",
    "trace_index",
    "latency_1m",
    "edges_1m",
    "stages_1m",
    "latency_10s",
    "agent_heartbeats",
    "inflight",
    "write_ledger",
];
pub const INTERVAL: Duration = Duration::from_secs(3600);

#[derive(Row, Deserialize)]
struct Partition {
    table: String,
    partition_id: String,
}

/// Drops the day partitions older than `retention_days` before `today`; returns
/// `table/partition_id` of each dropped one.
pub async fn drop_expired(
    client: &Client,
    database: &str,
    retention_days: u32,
    today: Date,
) -> anyhow::Result<Vec<String>> {
    let oldest_kept = today - time::Duration::days(i64::from(retention_days));
    let partitions: Vec<Partition> = client
        .query(
            "SELECT DISTINCT table, partition_id FROM system.parts
             WHERE database = ? AND active AND has(?, table)",
        )
        .bind(database)
        .bind(DAY_PARTITIONED.to_vec())
        .fetch_all()
        .await?;
    let mut dropped = Vec::new();
    for p in partitions {
        let Ok(day) = Date::parse(&p.partition_id, format_description!("[year][month][day]")) else {
            continue;
        };
        let kept_from = if p.table == "latency_10s" {
            today - time::Duration::days(i64::from(retention_days.min(FINE_RETENTION_DAYS)))
        } else {
            oldest_kept
        };
        if day < kept_from {
            client
                .query("ALTER TABLE ?.? DROP PARTITION ID ?")
                .bind(Identifier(database))
                .bind(Identifier(&p.table))
                .bind(&p.partition_id)
                .execute()
                .await?;
            dropped.push(format!("{}/{}", p.table, p.partition_id));
        }
    }
    Ok(dropped)
}

/// The hourly task for `serve` on a server without TTL.
pub async fn run(client: Client, database: String, retention_days: u32) {
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tick.tick().await;
        match drop_expired(&client, &database, retention_days, OffsetDateTime::now_utc().date()).await {
            Ok(dropped) if !dropped.is_empty() => info!(?dropped, retention_days, "dropped expired partitions"),
            Ok(_) => {}
            Err(e) => warn!("retention pass failed: {e}"),
        }
    }
}
