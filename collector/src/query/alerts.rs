//! Reads for the alert evaluator and the SLO API: each BT's minutes at its entry points (the
//! baselines' history), its last minute at 10-second resolution, an SLO's windows, and the SLOs
//! defined through the API. Aggregates only, never raw spans.

use std::collections::HashMap;

use clickhouse::{query::Query, Row};
use serde::Deserialize;

use super::{p50_p99_ms, Queries};
use crate::alerts::{
    baseline::{Current, History, MinuteStats},
    slo::{slow_calls, Counts, SloDefinition, Windows},
};

/// (service, BT).
pub type BtKey = (String, String);

/// A p99 is read from a minute only with at least this many calls.
const MIN_CALLS_FOR_P99: u64 = 20;

#[derive(Debug, Row, Deserialize)]
struct BtMinuteRecord {
    minute: u32,
    service: String,
    bt: String,
    calls: u64,
    errors: u64,
    buckets: Vec<u64>,
    counts: Vec<u64>,
}

/// Minutes either in the rolling window (from the third `?`) or at the same time of day as
/// the band's window (`(minute - offset) mod 1 day < width`).
pub const BT_HISTORY_SQL: &str = "SELECT toUInt32(minute) AS minute, service, bt, sum(calls) AS calls,
  sum(errors) AS errors, (sumMap(histMap.bucket, histMap.count) AS h).1 AS buckets, h.2 AS counts
FROM latency_1m
WHERE minute >= toDateTime(?) AND minute < toDateTime(?)
  AND (minute >= toDateTime(?) OR (toUInt32(minute) + 86400 - ?) % 86400 < ?)
  AND kind IN ('server', 'consumer') AND bt != ''
GROUP BY minute, service, bt";

#[derive(Debug, Row, Deserialize)]
struct BtWindowRecord {
    service: String,
    bt: String,
    calls: u64,
    errors: u64,
    buckets: Vec<u64>,
    counts: Vec<u64>,
}

pub const BT_RECENT_SQL: &str = "SELECT service, bt, sum(calls) AS calls, sum(errors) AS errors,
  (sumMap(histMap.bucket, histMap.count) AS h).1 AS buckets, h.2 AS counts
FROM latency_10s
WHERE time >= toDateTime(?) AND time < toDateTime(?) AND kind IN ('server', 'consumer') AND bt != ''
GROUP BY service, bt";

#[derive(Debug, Row, Deserialize)]
struct SloSliceRecord {
    at: u32,
    calls: u64,
    errors: u64,
    buckets: Vec<u64>,
    counts: Vec<u64>,
}

/// `{table}` and `{time}`: latency_10s/time or latency_1m/minute.
const SLO_SLICES_SQL: &str = "SELECT toUInt32({time}) AS at, sum(calls) AS calls, sum(errors) AS errors,
  (sumMap(histMap.bucket, histMap.count) AS h).1 AS buckets, h.2 AS counts
FROM {table}
WHERE {time} >= toDateTime(?) AND {time} < toDateTime(?) AND service = ?
  AND (? = '' OR bt = ?) AND (? = '' OR operation = ?) AND kind IN ('server', 'consumer')
GROUP BY at";

#[derive(Debug, Row, Deserialize)]
struct SloRecord {
    name: String,
    definition: String,
    deleted: u8,
}

const SLOS_SQL: &str =
    "SELECT name, argMax(definition, updated_at) AS definition, argMax(deleted, updated_at) AS deleted
FROM slos GROUP BY name ORDER BY name";

/// The time-of-day windows and the rolling window the baselines read.
#[derive(Debug, Clone, Copy)]
pub struct HistorySpan {
    /// Unix seconds: the oldest minute read.
    pub from: u64,
    /// Unix seconds: the newest minute read is before this.
    pub to: u64,
    /// Every minute from here on (the rolling window).
    pub rolling_from: u64,
    /// Seconds after midnight UTC where the same-time-of-day window starts, and its width.
    pub day_offset: u64,
    pub day_width: u64,
}

impl Queries {
    /// Each BT's minutes in `span`, by (service, BT).
    pub async fn bt_history(&self, span: HistorySpan) -> clickhouse::error::Result<HashMap<BtKey, History>> {
        let records: Vec<BtMinuteRecord> = self.bt_history_query(span).fetch_all().await?;
        let mut out: HashMap<BtKey, History> = HashMap::new();
        for r in records {
            let p99_ms = (r.calls >= MIN_CALLS_FOR_P99).then(|| p50_p99_ms(r.buckets.into_iter().zip(r.counts)).1);
            out.entry((r.service, r.bt)).or_default().insert(
                r.minute / 60,
                MinuteStats {
                    calls: r.calls,
                    errors: r.errors,
                    p99_ms,
                },
            );
        }
        Ok(out)
    }

    pub fn bt_history_query(&self, span: HistorySpan) -> Query {
        self.client
            .query(BT_HISTORY_SQL)
            .bind(span.from)
            .bind(span.to)
            .bind(span.rolling_from)
            .bind(span.day_offset)
            .bind(span.day_width)
    }

    /// Each BT's calls, errors and p99 in [from, to) (Unix seconds, 10-second aligned).
    pub async fn bt_recent(&self, from: u64, to: u64) -> clickhouse::error::Result<HashMap<BtKey, Current>> {
        let records: Vec<BtWindowRecord> = self.bt_recent_query(from, to).fetch_all().await?;
        Ok(records
            .into_iter()
            .map(|r| {
                let p99_ms = (r.calls >= MIN_CALLS_FOR_P99).then(|| p50_p99_ms(r.buckets.into_iter().zip(r.counts)).1);
                (
                    (r.service, r.bt),
                    Current {
                        calls: r.calls,
                        errors: r.errors,
                        p99_ms,
                    },
                )
            })
            .collect())
    }

    pub fn bt_recent_query(&self, from: u64, to: u64) -> Query {
        self.client.query(BT_RECENT_SQL).bind(from).bind(to)
    }

    /// The SLO's four alert windows ending at `end` (Unix seconds, 10-second aligned): the hour
    /// at 10-second resolution, six hours by the minute.
    pub async fn slo_windows(&self, slo: &SloDefinition, end: u64) -> clickhouse::error::Result<Windows> {
        let threshold = slo.threshold_us();
        let (fine, minutes) = tokio::try_join!(
            self.slo_slices_query(slo, "latency_10s", end - 3600, end)
                .fetch_all::<SloSliceRecord>(),
            self.slo_slices_query(slo, "latency_1m", end - 6 * 3600, end)
                .fetch_all::<SloSliceRecord>(),
        )?;
        let mut windows = Windows::default();
        for slice in fine {
            let counts = slice_counts(&slice, threshold);
            let age = end - u64::from(slice.at);
            if age <= 300 {
                windows.last_5m.add(counts);
            }
            if age <= 1800 {
                windows.last_30m.add(counts);
            }
            windows.last_1h.add(counts);
        }
        for slice in minutes {
            windows.last_6h.add(slice_counts(&slice, threshold));
        }
        Ok(windows)
    }

    /// The SLO's calls over its whole window (for the error budget).
    pub async fn slo_budget_window(&self, slo: &SloDefinition, end: u64) -> clickhouse::error::Result<Counts> {
        let from = end.saturating_sub(u64::from(slo.window_days) * 86_400);
        let slices: Vec<SloSliceRecord> = self.slo_slices_query(slo, "latency_1m", from, end).fetch_all().await?;
        let mut total = Counts::default();
        for slice in &slices {
            total.add(slice_counts(slice, slo.threshold_us()));
        }
        Ok(total)
    }

    pub fn slo_slices_query(&self, slo: &SloDefinition, table: &str, from: u64, to: u64) -> Query {
        let time = if table == "latency_10s" { "time" } else { "minute" };
        let sql = SLO_SLICES_SQL.replace("{table}", table).replace("{time}", time);
        self.client
            .query(&sql)
            .bind(from)
            .bind(to)
            .bind(&slo.service)
            .bind(&slo.bt)
            .bind(&slo.bt)
            .bind(&slo.operation)
            .bind(&slo.operation)
    }

    /// SLOs defined through the API (deleted ones left out).
    pub async fn stored_slos(&self) -> clickhouse::error::Result<Vec<SloDefinition>> {
        let records: Vec<SloRecord> = self.client.query(SLOS_SQL).fetch_all().await?;
        Ok(records
            .into_iter()
            .filter(|r| r.deleted == 0)
            .filter_map(|r| match serde_json::from_str::<SloDefinition>(&r.definition) {
                Ok(slo) => Some(slo),
                Err(e) => {
                    tracing::warn!(name = r.name, "stored SLO cannot be read: {e}");
                    None
                }
            })
            .collect())
    }

    /// Stores (or with `definition: None`, deletes) an API-defined SLO.
    pub async fn store_slo(&self, name: &str, definition: Option<&SloDefinition>) -> clickhouse::error::Result<()> {
        let text = definition.map_or(String::new(), |d| serde_json::to_string(d).expect("SLOs serialize"));
        // Microseconds: two changes within a second still order.
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.client
            .query("INSERT INTO slos (name, definition, updated_at, deleted) VALUES (?, ?, ?, ?)")
            .bind(name)
            .bind(text)
            .bind(now_us)
            .bind(u8::from(definition.is_none()))
            .execute()
            .await
    }
}

fn slice_counts(slice: &SloSliceRecord, threshold_us: u64) -> Counts {
    Counts {
        calls: slice.calls,
        errors: slice.errors,
        slow: if threshold_us == 0 {
            0
        } else {
            slow_calls(
                slice.buckets.iter().copied().zip(slice.counts.iter().copied()),
                threshold_us,
            )
        },
    }
}
