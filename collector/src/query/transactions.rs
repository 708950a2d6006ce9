//! `GET /api/v1/transactions`: per service and business transaction, RED from the latency
//! aggregates (entry spans: exact under sampling) and the stage breakdown from the stage
//! self-time aggregates: each stage's share of the BT's time, and that share of its mean
//! latency; and a per-minute series (calls, errors, p99) for sparklines. Reads aggregates
//! only.

use std::collections::BTreeMap;

use clickhouse::{query::Query, Row};
use serde::{Deserialize, Serialize};

use super::{p50_p99_ms, Queries, Window};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageView {
    /// own | db | cache | mq | downstream
    pub stage: String,
    /// Of the BT's time in this service, 0..=1.
    pub share: f64,
    /// `share` of the mean latency.
    pub mean_ms: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TransactionView {
    pub service: String,
    pub bt: String,
    pub calls: u64,
    pub errors: u64,
    pub error_rate: f64,
    /// Calls per minute over the window.
    pub rate_per_min: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Largest first.
    pub stages: Vec<StageView>,
    /// Minute by minute, oldest first (minutes without calls left out).
    pub series: Vec<MinutePoint>,
}

/// One minute of a BT's calls.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MinutePoint {
    /// Unix ms of the minute's start.
    pub minute: u64,
    pub calls: u64,
    pub errors: u64,
    pub p99_ms: f64,
}

#[derive(Debug, Row, Deserialize)]
struct RedRecord {
    minute: u32,
    service: String,
    bt: String,
    calls: u64,
    errors: u64,
    duration_us_sum: u64,
    buckets: Vec<u64>,
    counts: Vec<u64>,
}

#[derive(Debug, Row, Deserialize)]
struct StageRecord {
    service: String,
    bt: String,
    stage: String,
    self_us_sum: u64,
}

const RED_SQL: &str = "SELECT toUInt32(minute) AS minute, service, bt, sum(calls) AS calls, sum(errors) AS errors,
  sum(duration_us_sum) AS duration_us_sum,
  (sumMap(histMap.bucket, histMap.count) AS h).1 AS buckets, h.2 AS counts
FROM latency_1m
WHERE minute >= toDateTime(?) AND minute < toDateTime(?) AND (? = '' OR service = ?)
  AND kind IN ('server', 'consumer')
GROUP BY minute, service, bt
ORDER BY service, bt, minute";

const STAGES_SQL: &str = "SELECT service, bt, stage, sum(self_us_sum) AS self_us_sum
FROM stages_1m
WHERE minute >= toDateTime(?) AND minute < toDateTime(?) AND (? = '' OR service = ?)
GROUP BY service, bt, stage";

impl Queries {
    pub async fn transactions(
        &self,
        window: Window,
        service: Option<&str>,
    ) -> clickhouse::error::Result<Vec<TransactionView>> {
        let red: Vec<RedRecord> = self.transactions_query(window, service).fetch_all().await?;
        let stages: Vec<StageRecord> = self.stages_query(window, service).fetch_all().await?;
        let mut self_time: BTreeMap<(String, String), Vec<(String, u64)>> = BTreeMap::new();
        for s in stages {
            self_time
                .entry((s.service, s.bt))
                .or_default()
                .push((s.stage, s.self_us_sum));
        }
        let minutes = (window.to_us.saturating_sub(window.from_us) as f64 / 60e6).max(1.0 / 60.0);
        // Minutes folded into one record per BT (rows arrive sorted by service, bt, minute).
        let mut totals: Vec<(RedRecord, Vec<MinutePoint>)> = Vec::new();
        for r in red {
            let point = MinutePoint {
                minute: u64::from(r.minute) * 1000,
                calls: r.calls,
                errors: r.errors,
                p99_ms: p50_p99_ms(r.buckets.iter().copied().zip(r.counts.iter().copied())).1,
            };
            match totals.last_mut() {
                Some((t, series)) if t.service == r.service && t.bt == r.bt => {
                    t.calls += r.calls;
                    t.errors += r.errors;
                    t.duration_us_sum += r.duration_us_sum;
                    t.buckets.extend(r.buckets);
                    t.counts.extend(r.counts);
                    series.push(point);
                }
                _ => totals.push((r, vec![point])),
            }
        }
        Ok(totals
            .into_iter()
            .map(|(r, series)| {
                let (p50_ms, p99_ms) = p50_p99_ms(r.buckets.iter().copied().zip(r.counts.iter().copied()));
                let mean_ms = r.duration_us_sum as f64 / r.calls.max(1) as f64 / 1000.0;
                let parts = self_time.remove(&(r.service.clone(), r.bt.clone())).unwrap_or_default();
                let total: u64 = parts.iter().map(|(_, us)| us).sum();
                let mut stages: Vec<StageView> = parts
                    .into_iter()
                    .filter(|_| total > 0)
                    .map(|(stage, us)| {
                        let share = us as f64 / total as f64;
                        StageView {
                            stage,
                            share,
                            mean_ms: share * mean_ms,
                        }
                    })
                    .collect();
                stages.sort_by(|a, b| b.share.total_cmp(&a.share));
                TransactionView {
                    error_rate: r.errors as f64 / r.calls.max(1) as f64,
                    rate_per_min: r.calls as f64 / minutes,
                    mean_ms,
                    p50_ms,
                    p99_ms,
                    stages,
                    series,
                    service: r.service,
                    bt: r.bt,
                    calls: r.calls,
                    errors: r.errors,
                }
            })
            .collect())
    }

    pub fn transactions_query(&self, window: Window, service: Option<&str>) -> Query {
        self.windowed(RED_SQL, window, service)
    }

    pub fn stages_query(&self, window: Window, service: Option<&str>) -> Query {
        self.windowed(STAGES_SQL, window, service)
    }

    fn windowed(&self, sql: &str, window: Window, service: Option<&str>) -> Query {
        let service = service.unwrap_or("");
        self.client
            .query(sql)
            .bind(window.from_us / 1_000_000 / 60 * 60)
            .bind(window.to_us.div_ceil(1_000_000))
            .bind(service)
            .bind(service)
    }
}
