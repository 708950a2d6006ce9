//! Rows as ClickHouse receives them (RowBinary, column order = field order). Spans are written
//! borrowed from the model, so encoding copies no strings.

use clickhouse::Row;
use serde::{ser::SerializeSeq, Deserialize, Serialize, Serializer};

use crate::{
    model::Span,
    pipeline::{
        aggregate::{LatencyKey, LatencyValue},
        edges::EdgeKey,
        stages::{StageKey, StageValue},
    },
};

/// The spool batches (seqs `lo..=hi`) an INSERT carries: written with its rows so that the
/// write ledger records them in the same INSERT (`schema.rs`, migration 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BatchRange {
    pub lo: u64,
    pub hi: u64,
}

/// What every row of an INSERT says about the INSERT: the batches it carries and how many rows
/// it has (the views write a block only if it has them all: `schema.rs`, `WHOLE_INSERT`).
#[derive(Debug, Clone, Copy)]
pub struct InsertTag {
    pub range: BatchRange,
    pub rows: u64,
}

/// One row of `spans_input` (see `schema.rs`).
#[derive(Row, Serialize)]
pub struct SpanRow<'a> {
    trace_id: &'a [u8; 16],
    span_id: u64,
    parent_span_id: u64,
    service: &'a str,
    service_version: &'a str,
    instance: &'a str,
    operation: &'a str,
    kind: i8,
    component: &'a str,
    peer: &'a str,
    bt: &'a str,
    start_us: u64,
    duration_us: u64,
    status: i8,
    error_type: &'a str,
    error_message: &'a str,
    #[serde(rename = "attributes.key")]
    attribute_keys: AttributeColumn<'a, 0>,
    #[serde(rename = "attributes.value")]
    attribute_values: AttributeColumn<'a, 1>,
    batch_lo: u64,
    batch_hi: u64,
    batch_rows: u64,
}

impl<'a> SpanRow<'a> {
    pub fn new(s: &'a Span, tag: InsertTag) -> Self {
        Self {
            trace_id: &s.trace_id,
            span_id: s.span_id,
            parent_span_id: s.parent_span_id,
            service: &s.service,
            service_version: &s.service_version,
            instance: &s.instance,
            operation: &s.operation,
            kind: s.kind as i8,
            component: &s.component,
            peer: &s.peer,
            bt: &s.bt,
            start_us: s.start_ns / 1000,
            // Rounded up: a span that ran is never stored as taking no time.
            duration_us: s.duration_ns.div_ceil(1000),
            status: s.status as i8,
            error_type: &s.error_type,
            error_message: &s.error_message,
            attribute_keys: AttributeColumn(&s.attributes),
            attribute_values: AttributeColumn(&s.attributes),
            batch_lo: tag.range.lo,
            batch_hi: tag.range.hi,
            batch_rows: tag.rows,
        }
    }
}

/// One side (0 = keys, 1 = values) of the attribute pairs, serialized as an array.
struct AttributeColumn<'a, const SIDE: usize>(&'a [(String, String)]);

impl<const SIDE: usize> Serialize for AttributeColumn<'_, SIDE> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for (key, value) in self.0 {
            seq.serialize_element(if SIDE == 0 { key } else { value })?;
        }
        seq.end()
    }
}

/// One row of `latency_1m` (through `latency_1m_input`): a partial sum that SummingMergeTree adds to the others.
#[derive(Row, Serialize)]
pub struct LatencyRow<'a> {
    minute: u32,
    service: &'a str,
    service_version: &'a str,
    bt: &'a str,
    operation: &'a str,
    kind: i8,
    status: i8,
    calls: u64,
    errors: u64,
    duration_us_sum: u64,
    #[serde(rename = "histMap.bucket")]
    buckets: Vec<u64>,
    #[serde(rename = "histMap.count")]
    counts: Vec<u64>,
    batch_lo: u64,
    batch_hi: u64,
    batch_rows: u64,
}

impl<'a> LatencyRow<'a> {
    /// From a key rolled up to its minute.
    pub fn new(key: &'a LatencyKey, value: &LatencyValue, tag: InsertTag) -> Self {
        Self {
            minute: key.window,
            service: &key.service,
            service_version: &key.service_version,
            bt: &key.bt,
            operation: &key.operation,
            kind: key.kind as i8,
            status: key.status as i8,
            calls: value.calls,
            errors: value.errors,
            duration_us_sum: value.duration_us_sum,
            buckets: value.buckets(),
            counts: value.counts(),
            batch_lo: tag.range.lo,
            batch_hi: tag.range.hi,
            batch_rows: tag.rows,
        }
    }
}

/// One row of `latency_10s` (through `latency_10s_input`): the same partial sums per 10-second window.
#[derive(Row, Serialize)]
pub struct FineLatencyRow<'a> {
    time: u32,
    service: &'a str,
    service_version: &'a str,
    bt: &'a str,
    operation: &'a str,
    kind: i8,
    status: i8,
    calls: u64,
    errors: u64,
    duration_us_sum: u64,
    #[serde(rename = "histMap.bucket")]
    buckets: Vec<u64>,
    #[serde(rename = "histMap.count")]
    counts: Vec<u64>,
    batch_lo: u64,
    batch_hi: u64,
    batch_rows: u64,
}

impl<'a> FineLatencyRow<'a> {
    pub fn new(key: &'a LatencyKey, value: &LatencyValue, tag: InsertTag) -> Self {
        Self {
            time: key.window,
            service: &key.service,
            service_version: &key.service_version,
            bt: &key.bt,
            operation: &key.operation,
            kind: key.kind as i8,
            status: key.status as i8,
            calls: value.calls,
            errors: value.errors,
            duration_us_sum: value.duration_us_sum,
            buckets: value.buckets(),
            counts: value.counts(),
            batch_lo: tag.range.lo,
            batch_hi: tag.range.hi,
            batch_rows: tag.rows,
        }
    }
}

/// One row of `edges_1m` (through `edges_1m_input`): a partial sum that SummingMergeTree adds to the others.
#[derive(Row, Serialize)]
pub struct EdgeRow<'a> {
    minute: u32,
    caller: &'a str,
    caller_type: i8,
    callee: &'a str,
    callee_type: i8,
    bt: &'a str,
    caller_version: &'a str,
    callee_version: &'a str,
    calls: u64,
    errors: u64,
    duration_us_sum: u64,
    #[serde(rename = "histMap.bucket")]
    buckets: Vec<u64>,
    #[serde(rename = "histMap.count")]
    counts: Vec<u64>,
    batch_lo: u64,
    batch_hi: u64,
    batch_rows: u64,
}

impl<'a> EdgeRow<'a> {
    pub fn new(key: &'a EdgeKey, value: &LatencyValue, tag: InsertTag) -> Self {
        Self {
            minute: key.minute,
            caller: &key.caller,
            caller_type: key.caller_type as i8,
            callee: &key.callee,
            callee_type: key.callee_type as i8,
            bt: &key.bt,
            caller_version: &key.caller_version,
            callee_version: &key.callee_version,
            calls: value.calls,
            errors: value.errors,
            duration_us_sum: value.duration_us_sum,
            buckets: value.buckets(),
            counts: value.counts(),
            batch_lo: tag.range.lo,
            batch_hi: tag.range.hi,
            batch_rows: tag.rows,
        }
    }
}

/// One row of `stages_1m` (through `stages_1m_input`).
#[derive(Row, Serialize)]
pub struct StageRow<'a> {
    minute: u32,
    service: &'a str,
    service_version: &'a str,
    bt: &'a str,
    stage: &'a str,
    spans: u64,
    self_us_sum: u64,
    batch_lo: u64,
    batch_hi: u64,
    batch_rows: u64,
}

impl<'a> StageRow<'a> {
    pub fn new(key: &'a StageKey, value: &StageValue, tag: InsertTag) -> Self {
        Self {
            minute: key.minute,
            service: &key.service,
            service_version: &key.service_version,
            bt: &key.bt,
            stage: key.stage,
            spans: value.spans,
            self_us_sum: value.self_us_sum,
            batch_lo: tag.range.lo,
            batch_hi: tag.range.hi,
            batch_rows: tag.rows,
        }
    }
}

/// One row of `agent_heartbeats`.
#[derive(Row, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct HeartbeatRow {
    /// Unix seconds.
    pub time: u32,
    pub service: String,
    pub service_version: String,
    pub instance: String,
    pub queue_depth: u64,
    pub dropped_spans: u64,
    pub sent_spans: u64,
}

/// One row of `inflight`: a transaction an agent saw open past its threshold.
#[derive(Row, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct InflightRow {
    /// Unix seconds.
    pub snapshot_time: u32,
    pub service: String,
    pub service_version: String,
    pub instance: String,
    pub bt: String,
    pub operation: String,
    pub trace_id: [u8; 16],
    pub span_id: u64,
    pub start_us: u64,
    pub current_operation: String,
    pub current_peer: String,
}
