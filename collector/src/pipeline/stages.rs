//! Stages: where a transaction's time goes. Each span's self-time (its duration minus that of
//! its children in the same service) is attributed to one stage by what the span is: `db`,
//! `cache`, `mq` (calls through those components), `downstream` (other calls out) or `own`
//! (the service's own code), and summed per (minute, service, version, BT, stage).
//!
//! Children are found within the batch being ingested: a service's spans of one trace arrive
//! together from SDKs and agents alike. The API turns the sums into shares of the BT's time;
//! with sampled traces (the agent), the shares are estimated from the sampled ones while the
//! latency they divide comes from exact RED.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Deserializer, Serialize};

use crate::model::{Span, SpanKind};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct StageKey {
    pub minute: u32,
    pub service: String,
    pub service_version: String,
    pub bt: String,
    pub stage: &'static str,
}

/// A [`StageKey`] as read back from the spool, its stage one of [`STAGES`] once checked.
#[derive(Deserialize)]
struct StoredStageKey {
    minute: u32,
    service: String,
    service_version: String,
    bt: String,
    stage: String,
}

impl<'de> Deserialize<'de> for StageKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let key = StoredStageKey::deserialize(deserializer)?;
        let stage = STAGES
            .into_iter()
            .find(|s| *s == key.stage)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown stage {:?}", key.stage)))?;
        Ok(Self {
            minute: key.minute,
            service: key.service,
            service_version: key.service_version,
            bt: key.bt,
            stage,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageValue {
    pub spans: u64,
    pub self_us_sum: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StageAggregates {
    entries: FxHashMap<StageKey, StageValue>,
}

/// Every stage [`stage_of`] names.
pub const STAGES: [&str; 5] = ["db", "cache", "mq", "downstream", "own"];

/// The stage a span's self-time belongs to.
pub fn stage_of(span: &Span) -> &'static str {
    match (span.kind, span.component.as_str()) {
        (_, "db") => "db",
        (_, "cache") => "cache",
        (_, "mq") => "mq",
        (SpanKind::Client | SpanKind::Producer, _) => "downstream",
        _ => "own",
    }
}

impl StageAggregates {
    pub fn from_spans(spans: &[Span]) -> Self {
        // Time spent in children, by (trace, parent span id), children of the same service only:
        // a remote server span's time is already its caller's client span.
        let mut in_children: FxHashMap<([u8; 16], u64, &str), u64> = FxHashMap::default();
        for span in spans.iter().filter(|s| s.parent_span_id != 0) {
            *in_children
                .entry((span.trace_id, span.parent_span_id, &span.service))
                .or_insert(0) += span.duration_ns;
        }
        let mut entries: FxHashMap<StageKey, StageValue> = FxHashMap::default();
        for span in spans {
            let children = in_children
                .get(&(span.trace_id, span.span_id, span.service.as_str()))
                .copied()
                .unwrap_or(0);
            let self_us = span.duration_ns.saturating_sub(children) / 1000;
            let key = StageKey {
                minute: ((span.start_ns / 1_000_000_000) / 60 * 60) as u32,
                service: span.service.clone(),
                service_version: span.service_version.clone(),
                bt: span.bt.clone(),
                stage: stage_of(span),
            };
            let value = entries.entry(key).or_default();
            value.spans += 1;
            value.self_us_sum += self_us;
        }
        Self { entries }
    }

    pub fn merge(&mut self, other: StageAggregates) {
        for (key, value) in other.entries {
            let entry = self.entries.entry(key).or_default();
            entry.spans += value.spans;
            entry.self_us_sum += value.self_us_sum;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn drain(&mut self) -> Vec<(StageKey, StageValue)> {
        self.entries.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: u64, parent: u64, kind: SpanKind, component: &str, ms: u64) -> Span {
        Span {
            trace_id: [7; 16],
            span_id: id,
            parent_span_id: parent,
            service: "auth".into(),
            bt: "Login".into(),
            kind,
            component: component.into(),
            start_ns: 120 * 1_000_000_000,
            duration_ns: ms * 1_000_000,
            ..Span::default()
        }
    }

    #[test]
    fn self_time_goes_to_the_stage_of_the_span() {
        let spans = [
            span(1, 0, SpanKind::Server, "http", 100),
            span(2, 1, SpanKind::Client, "db", 30),
            span(3, 1, SpanKind::Internal, "", 50),
            span(4, 3, SpanKind::Client, "cache", 20),
            span(5, 3, SpanKind::Client, "grpc", 15),
        ];
        let mut stages = StageAggregates::from_spans(&spans).drain();
        stages.sort_by_key(|(k, _)| k.stage);
        let sums: Vec<(&str, u64)> = stages.iter().map(|(k, v)| (k.stage, v.self_us_sum / 1000)).collect();
        // own: 100 - 30 - 50 = 20, plus the internal span's 50 - 20 - 15 = 15.
        assert_eq!(sums, [("cache", 20), ("db", 30), ("downstream", 15), ("own", 35)]);
    }
}
