//! The data behind `/api/v1/compare`: for one service's two versions over a window, each BT's
//! blocks of traffic (10-second or one-minute aggregates: exact under sampling), its error
//! types (from stored spans) and its stage milliseconds (stage shares of self-time times the
//! mean latency), ready for the comparison engine.

use std::collections::{BTreeMap, BTreeSet};

use clickhouse::{query::Query, Row};
use serde::Deserialize;
use sightline_compare::{Block, BtInput, Side};

use super::{Queries, Window};

/// What to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompareScope {
    pub service: String,
    pub baseline: String,
    pub candidate: String,
    pub window: Window,
    /// 10 or 60.
    pub block_seconds: u32,
}

#[derive(Debug, Row, Deserialize)]
struct BlockRecord {
    // Read in column order; the blocks come sorted by it.
    #[allow(dead_code)]
    block: u32,
    bt: String,
    version: String,
    calls: u64,
    errors: u64,
    duration_us_sum: u64,
    buckets: Vec<u64>,
    counts: Vec<u64>,
}

#[derive(Debug, Row, Deserialize)]
struct ErrorTypesRecord {
    bt: String,
    version: String,
    error_types: Vec<String>,
}

#[derive(Debug, Row, Deserialize)]
struct StageRecord {
    bt: String,
    version: String,
    stage: String,
    self_us_sum: u64,
}

/// Entry spans' blocks from either table; `{table}` and `{time}` are fixed names.
fn blocks_sql(table: &str, time: &str) -> String {
    format!(
        "SELECT toUInt32({time}) AS block, bt, service_version AS version, sum(calls) AS calls,
  sum(errors) AS errors, sum(duration_us_sum) AS duration_us_sum,
  (sumMap(histMap.bucket, histMap.count) AS h).1 AS buckets, h.2 AS counts
FROM {table}
WHERE service = ? AND service_version IN (?, ?) AND {time} >= toDateTime(?) AND {time} < toDateTime(?)
  AND kind IN ('server', 'consumer')
GROUP BY block, bt, version
ORDER BY bt, version, block"
    )
}

const ERROR_TYPES_SQL: &str = "SELECT bt, service_version AS version, groupUniqArray(error_type) AS error_types
FROM spans
WHERE service = ? AND service_version IN (?, ?) AND start_us >= ? AND start_us < ?
  AND status = 'error' AND error_type != ''
GROUP BY bt, version";

const STAGES_SQL: &str = "SELECT bt, service_version AS version, stage, sum(self_us_sum) AS self_us_sum
FROM stages_1m
WHERE service = ? AND service_version IN (?, ?) AND minute >= toDateTime(?) AND minute < toDateTime(?)
GROUP BY bt, version, stage";

impl Queries {
    /// Every BT either version served in the window. Empty when neither has traffic; a version
    /// without traffic has no blocks.
    pub async fn compare_inputs(&self, scope: &CompareScope) -> clickhouse::error::Result<Vec<BtInput>> {
        let blocks: Vec<BlockRecord> = self.compare_blocks_query(scope).fetch_all().await?;
        let errors: Vec<ErrorTypesRecord> = self.compare_error_types_query(scope).fetch_all().await?;
        let stages: Vec<StageRecord> = self.compare_stages_query(scope).fetch_all().await?;
        let mut inputs: BTreeMap<String, BtInput> = BTreeMap::new();
        let mut durations: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
        for r in blocks {
            let input = inputs.entry(r.bt.clone()).or_insert_with(|| BtInput {
                bt: r.bt.clone(),
                ..BtInput::default()
            });
            let Some(side) = side_of(input, &r.version, scope) else {
                continue;
            };
            side.blocks.push(Block {
                calls: r.calls,
                errors: r.errors,
                histogram: r.buckets.into_iter().zip(r.counts).collect(),
            });
            let total = durations.entry((r.bt, r.version)).or_default();
            total.0 += r.calls;
            total.1 += r.duration_us_sum;
        }
        for r in errors {
            if let Some(side) = inputs.get_mut(&r.bt).and_then(|i| side_of(i, &r.version, scope)) {
                side.error_types = r.error_types.into_iter().collect::<BTreeSet<_>>();
            }
        }
        // Stage milliseconds: the stage's share of the self-time times the mean latency.
        let mut self_time: BTreeMap<(String, String), Vec<(String, u64)>> = BTreeMap::new();
        for r in stages {
            self_time
                .entry((r.bt, r.version))
                .or_default()
                .push((r.stage, r.self_us_sum));
        }
        for ((bt, version), parts) in self_time {
            let total: u64 = parts.iter().map(|(_, us)| us).sum();
            let Some(&(calls, duration_us)) = durations.get(&(bt.clone(), version.clone())) else {
                continue;
            };
            let Some(side) = inputs.get_mut(&bt).and_then(|i| side_of(i, &version, scope)) else {
                continue;
            };
            if total == 0 || calls == 0 {
                continue;
            }
            let mean_ms = duration_us as f64 / calls as f64 / 1000.0;
            side.stages_ms = parts
                .into_iter()
                .map(|(stage, us)| (stage, us as f64 / total as f64 * mean_ms))
                .collect();
        }
        Ok(inputs.into_values().collect())
    }

    fn bind_scope(query: Query, scope: &CompareScope, from: u64, to: u64) -> Query {
        query
            .bind(&scope.service)
            .bind(&scope.baseline)
            .bind(&scope.candidate)
            .bind(from)
            .bind(to)
    }

    pub fn compare_blocks_query(&self, scope: &CompareScope) -> Query {
        let sql = if scope.block_seconds < 60 {
            blocks_sql("latency_10s", "time")
        } else {
            blocks_sql("latency_1m", "minute")
        };
        let (from, to) = (scope.window.from_us / 1_000_000, scope.window.to_us.div_ceil(1_000_000));
        Self::bind_scope(self.client.query(&sql), scope, from, to)
    }

    pub fn compare_error_types_query(&self, scope: &CompareScope) -> Query {
        Self::bind_scope(
            self.client.query(ERROR_TYPES_SQL),
            scope,
            scope.window.from_us,
            scope.window.to_us,
        )
    }

    pub fn compare_stages_query(&self, scope: &CompareScope) -> Query {
        let (from, to) = (
            scope.window.from_us / 1_000_000 / 60 * 60,
            scope.window.to_us.div_ceil(1_000_000),
        );
        Self::bind_scope(self.client.query(STAGES_SQL), scope, from, to)
    }
}

fn side_of<'a>(input: &'a mut BtInput, version: &str, scope: &CompareScope) -> Option<&'a mut Side> {
    if version == scope.baseline {
        Some(&mut input.baseline)
    } else if version == scope.candidate {
        Some(&mut input.candidate)
    } else {
        None
    }
}
