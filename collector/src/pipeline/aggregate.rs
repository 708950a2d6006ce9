//! Latency aggregates: calls, errors and a sparse histogram per (10-second window, service,
//! version, BT, operation, kind, status), stored as they are for short comparisons and rolled up
//! to minutes for everything else. Every span counts, so RED figures stay exact however
//! traces are sampled. Partials from each request are merged in the writer and again by
//! ClickHouse's SummingMergeTree.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use sightline_proto::histogram;

use crate::model::{Span, SpanKind, SpanStatus};

/// The finest window: short load tests compare in blocks this long.
pub const WINDOW_SECS: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LatencyKey {
    /// Unix seconds at the start of its window: [`WINDOW_SECS`], or a minute once rolled up.
    pub window: u32,
    pub service: String,
    pub service_version: String,
    pub bt: String,
    pub operation: String,
    pub kind: SpanKind,
    pub status: SpanStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyValue {
    pub calls: u64,
    pub errors: u64,
    pub duration_us_sum: u64,
    /// Bucket value (shared layout, µs) -> count.
    pub histogram: BTreeMap<u64, u64>,
}

impl LatencyValue {
    /// Counts one call of `micros`.
    pub fn record(&mut self, micros: u64, error: bool) {
        self.calls += 1;
        self.errors += u64::from(error);
        self.duration_us_sum += micros;
        *self.histogram.entry(histogram::bucket_of(micros)).or_insert(0) += 1;
    }

    /// The histogram's bucket values, ascending: the `histMap.bucket` column.
    pub fn buckets(&self) -> Vec<u64> {
        self.histogram.keys().copied().collect()
    }

    /// The counts, in the buckets' order: the `histMap.count` column.
    pub fn counts(&self) -> Vec<u64> {
        self.histogram.values().copied().collect()
    }

    pub fn add(&mut self, other: LatencyValue) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.duration_us_sum += other.duration_us_sum;
        for (bucket, count) in other.histogram {
            *self.histogram.entry(bucket).or_insert(0) += count;
        }
    }
}

/// A [`LatencyKey`] borrowing its strings from the spans being counted.
type BorrowedKey<'a> = (u32, &'a str, &'a str, &'a str, &'a str, SpanKind, SpanStatus);

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LatencyAggregates {
    entries: FxHashMap<LatencyKey, LatencyValue>,
}

impl LatencyAggregates {
    /// Aggregates a batch of spans. Keys borrow from the spans while counting and are copied
    /// once per distinct key at the end, not once per span.
    pub fn from_spans(spans: &[Span]) -> Self {
        let mut borrowed: FxHashMap<BorrowedKey<'_>, LatencyValue> = FxHashMap::default();
        for span in spans {
            let micros = span.duration_ns.div_ceil(1000);
            let window = (span.start_ns / 1_000_000_000) as u32 / WINDOW_SECS * WINDOW_SECS;
            let value = borrowed
                .entry((
                    window,
                    &span.service,
                    &span.service_version,
                    &span.bt,
                    &span.operation,
                    span.kind,
                    span.status,
                ))
                .or_default();
            value.calls += 1;
            value.errors += u64::from(span.status == SpanStatus::Error);
            value.duration_us_sum += micros;
            *value.histogram.entry(histogram::bucket_of(micros)).or_insert(0) += 1;
        }
        let entries = borrowed
            .into_iter()
            .map(
                |((window, service, service_version, bt, operation, kind, status), value)| {
                    let key = LatencyKey {
                        window,
                        service: service.to_string(),
                        service_version: service_version.to_string(),
                        bt: bt.to_string(),
                        operation: operation.to_string(),
                        kind,
                        status,
                    };
                    (key, value)
                },
            )
            .collect();
        Self { entries }
    }

    pub fn add(&mut self, key: LatencyKey, value: LatencyValue) {
        self.entries.entry(key).or_default().add(value);
    }

    pub fn merge(&mut self, other: LatencyAggregates) {
        for (key, value) in other.entries {
            self.add(key, value);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `rows` rolled up to minutes (windows of one minute summed).
    pub fn by_minute(rows: &[(LatencyKey, LatencyValue)]) -> Vec<(LatencyKey, LatencyValue)> {
        let mut minutes = Self::default();
        for (key, value) in rows {
            let key = LatencyKey {
                window: key.window / 60 * 60,
                ..key.clone()
            };
            minutes.add(key, value.clone());
        }
        minutes.drain()
    }

    /// Takes every entry out, leaving the aggregates empty.
    pub fn drain(&mut self) -> Vec<(LatencyKey, LatencyValue)> {
        self.entries.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start_s: u64, micros: u64, status: SpanStatus) -> Span {
        Span {
            service: "auth".into(),
            bt: "Login".into(),
            operation: "POST /login".into(),
            kind: SpanKind::Server,
            start_ns: start_s * 1_000_000_000,
            duration_ns: micros * 1000,
            status,
            ..Span::default()
        }
    }

    #[test]
    fn counts_calls_errors_and_buckets_per_minute() {
        let spans = [
            span(120, 100, SpanStatus::Ok),
            span(150, 100, SpanStatus::Error),
            span(179, 5000, SpanStatus::Ok),
            span(180, 100, SpanStatus::Ok),
        ];
        let mut aggregates = LatencyAggregates::from_spans(&spans);
        aggregates.merge(LatencyAggregates::from_spans(&spans[..1]));
        let mut rows = aggregates.drain();
        rows = LatencyAggregates::by_minute(&rows);
        rows.sort_by_key(|(k, _)| (k.window, k.status as u8));
        let summary: Vec<_> = rows
            .iter()
            .map(|(k, v)| (k.window, k.status, v.calls, v.errors))
            .collect();
        assert_eq!(
            summary,
            vec![
                (120, SpanStatus::Ok, 3, 0),
                (120, SpanStatus::Error, 1, 1),
                (180, SpanStatus::Ok, 1, 0)
            ]
        );
        let first = &rows[0].1;
        assert_eq!(first.duration_us_sum, 5200);
        assert_eq!(first.histogram.get(&histogram::bucket_of(100)), Some(&2));
        assert!(aggregates.is_empty());
    }
}
