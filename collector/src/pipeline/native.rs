//! sightline.v1 batches -> span model and latency aggregates.
//!
//! Strings arrive once per stream in the batch's `new_strings` and are referenced by index
//! afterwards; the stream's [`Dictionary`] is the receiver's to keep between batches. The
//! agent's per-minute histograms count every request, sampled or not, so they (not the spans)
//! feed the latency aggregates.

use std::collections::BTreeMap;

use sightline_proto::v1::{Batch, Span as WireSpan};

use super::{
    aggregate::{LatencyAggregates, LatencyKey, LatencyValue, WINDOW_SECS},
    otlp::Conversion,
    validate::{bound, TimeBounds},
};
use crate::{
    config::Limits,
    model::{Span, SpanKind, SpanStatus},
    store::rows::InflightRow,
};

/// Strings one stream may define; past it the stream is refused (an agent's names are bounded).
pub const MAX_DICTIONARY: usize = 1_000_000;

/// One stream's string table: index 0 is the empty string.
#[derive(Debug)]
pub struct Dictionary {
    strings: Vec<String>,
}

impl Default for Dictionary {
    fn default() -> Self {
        Self {
            strings: vec![String::new()],
        }
    }
}

impl Dictionary {
    pub fn get(&self, index: u32) -> Result<&str, String> {
        self.strings.get(index as usize).map(String::as_str).ok_or_else(|| {
            format!(
                "string index {index} is not in the stream's dictionary ({} entries)",
                self.strings.len()
            )
        })
    }
}

/// A batch the stream cannot go on from (its dictionary would be out of step).
#[derive(Debug, PartialEq, Eq)]
pub struct BrokenStream(pub String);

/// What one batch becomes.
#[derive(Debug, Default)]
pub struct NativeBatch {
    pub conversion: Conversion,
    pub latency: LatencyAggregates,
    pub inflight: Vec<InflightRow>,
}

pub fn convert(
    batch: Batch,
    dictionary: &mut Dictionary,
    limits: &Limits,
    now_ns: u64,
) -> Result<NativeBatch, BrokenStream> {
    if dictionary.strings.len() + batch.new_strings.len() > MAX_DICTIONARY {
        return Err(BrokenStream(format!(
            "the stream defines more than {MAX_DICTIONARY} strings"
        )));
    }
    let mut truncated = 0;
    dictionary.strings.extend(
        batch
            .new_strings
            .into_iter()
            .map(|s| bound(s, limits.max_value_bytes, &mut truncated)),
    );
    let d = &*dictionary;
    let name = |i: u32, truncated: &mut u64| -> Result<String, BrokenStream> {
        d.get(i)
            .map(|s| bound(s.to_string(), limits.max_name_bytes, truncated))
            .map_err(BrokenStream)
    };
    let resource = batch.resource.unwrap_or_default();
    let service = match name(resource.service, &mut truncated)? {
        s if s.is_empty() => "unknown_service".to_string(),
        s => s,
    };
    let service_version = name(resource.service_version, &mut truncated)?;
    let instance = name(resource.instance, &mut truncated)?;

    let mut out = Conversion {
        spans: Vec::with_capacity(batch.spans.len()),
        ..Conversion::default()
    };
    let bounds = TimeBounds::new(limits, now_ns);
    for wire in batch.spans {
        if let Some(span) = convert_span(
            wire,
            &service,
            &service_version,
            &instance,
            d,
            limits,
            &bounds,
            &mut truncated,
            &mut out,
        )? {
            out.spans.push(span);
        }
    }

    let mut latency = LatencyAggregates::default();
    for h in batch.histograms {
        if h.bucket_micros.len() != h.bucket_counts.len() {
            out.reject("invalid_histogram", || {
                "histogram buckets and counts differ in length".into()
            });
            continue;
        }
        let key = LatencyKey {
            window: u32::try_from(h.window_unix_seconds).unwrap_or(u32::MAX) / WINDOW_SECS * WINDOW_SECS,
            service: service.clone(),
            service_version: service_version.clone(),
            bt: name(h.business_transaction, &mut truncated)?,
            operation: name(h.operation, &mut truncated)?,
            kind: SpanKind::from_otlp(h.kind),
            status: SpanStatus::from_otlp(h.status),
        };
        let mut histogram = BTreeMap::new();
        for (bucket, count) in h.bucket_micros.into_iter().zip(h.bucket_counts) {
            *histogram
                .entry(sightline_proto::histogram::bucket_of(bucket))
                .or_insert(0) += count;
        }
        latency.add(
            key,
            LatencyValue {
                calls: h.calls,
                errors: h.errors,
                duration_us_sum: h.sum_micros,
                histogram,
            },
        );
    }
    let snapshot_time = (now_ns / 1_000_000_000) as u32;
    let mut inflight = Vec::with_capacity(batch.inflight.len());
    for t in batch.inflight {
        let Ok(trace_id) = <[u8; 16]>::try_from(t.trace_id.as_slice()) else {
            out.reject("invalid_trace_id", || {
                "in-flight transaction with a trace id not of 16 bytes".into()
            });
            continue;
        };
        inflight.push(InflightRow {
            snapshot_time,
            service: service.clone(),
            service_version: service_version.clone(),
            instance: instance.clone(),
            bt: name(t.business_transaction, &mut truncated)?,
            operation: name(t.operation, &mut truncated)?,
            trace_id,
            span_id: t.span_id,
            start_us: t.start_unix_nanos / 1000,
            current_operation: name(t.current_span_operation, &mut truncated)?,
            current_peer: name(t.current_span_peer, &mut truncated)?,
        });
    }
    out.truncated += truncated;
    Ok(NativeBatch {
        conversion: out,
        latency,
        inflight,
    })
}

#[allow(clippy::too_many_arguments)]
fn convert_span(
    wire: WireSpan,
    service: &str,
    service_version: &str,
    instance: &str,
    d: &Dictionary,
    limits: &Limits,
    bounds: &TimeBounds,
    truncated: &mut u64,
    out: &mut Conversion,
) -> Result<Option<Span>, BrokenStream> {
    let trace_id = match <[u8; 16]>::try_from(wire.trace_id.as_slice()) {
        Ok(id) if id != [0; 16] => id,
        _ => {
            let len = wire.trace_id.len();
            out.reject("invalid_trace_id", || {
                format!("trace id must be 16 non-zero bytes, got {len} bytes")
            });
            return Ok(None);
        }
    };
    if wire.span_id == 0 {
        out.reject("invalid_span_id", || "span id must not be zero".into());
        return Ok(None);
    }
    let end = wire.start_unix_nanos.saturating_add(wire.duration_nanos);
    if let Err((reason, message)) = bounds.check(wire.span_id, wire.start_unix_nanos, end) {
        out.reject(reason, || message);
        return Ok(None);
    }
    let get = |i: u32| d.get(i).map_err(BrokenStream);
    let short = |i: u32, truncated: &mut u64| get(i).map(|s| bound(s.to_string(), limits.max_name_bytes, truncated));
    let mut attributes = Vec::with_capacity(wire.attributes.len().min(limits.max_attributes_per_span) + 2);
    for a in wire.attributes {
        if attributes.len() == limits.max_attributes_per_span {
            *truncated += 1;
            break;
        }
        attributes.push((
            short(a.key, truncated)?,
            bound(a.value, limits.max_value_bytes, truncated),
        ));
    }
    // The caller from baggage: kept with the span until edges have columns of their own.
    if wire.caller_service != 0 {
        attributes.push((
            "sightline.caller.service".into(),
            short(wire.caller_service, truncated)?,
        ));
        attributes.push((
            "sightline.caller.operation".into(),
            short(wire.caller_operation, truncated)?,
        ));
    }
    Ok(Some(Span {
        trace_id,
        span_id: wire.span_id,
        parent_span_id: wire.parent_span_id,
        service: service.to_string(),
        service_version: service_version.to_string(),
        instance: instance.to_string(),
        operation: short(wire.operation, truncated)?,
        kind: SpanKind::from_otlp(wire.kind),
        component: short(wire.component, truncated)?,
        peer: short(wire.peer, truncated)?,
        bt: short(wire.business_transaction, truncated)?,
        start_ns: wire.start_unix_nanos,
        duration_ns: wire.duration_nanos,
        status: SpanStatus::from_otlp(wire.status),
        error_type: short(wire.error_type, truncated)?,
        error_message: bound(wire.error_message, limits.max_value_bytes, truncated),
        attributes,
    }))
}
