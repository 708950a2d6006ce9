//! OTLP -> span model: validation and the OpenTelemetry semantic conventions.
//!
//! Invalid spans are rejected one by one (the rest of the request still goes through) with a
//! reason that is both counted and told to the sender; oversized strings and attribute lists
//! are cut to the limits and counted.

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value::Value, AnyValue},
    trace::v1::Span as OtlpSpan,
};

use super::validate::{bound, TimeBounds};
use crate::{
    config::Limits,
    model::{Span, SpanKind, SpanStatus},
};

/// Database systems whose calls count as cache calls (stage "cache", virtual node "cache").
const CACHE_SYSTEMS: [&str; 6] = ["redis", "memcached", "hazelcast", "ignite", "coherence", "geode"];

/// The outcome of mapping one request.
#[derive(Debug, Default)]
pub struct Conversion {
    pub spans: Vec<Span>,
    /// Rejected spans per reason.
    pub rejected: Vec<(&'static str, u64)>,
    /// The first rejection, spelled out for the sender.
    pub first_rejection: Option<String>,
    pub truncated: u64,
}

impl Conversion {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|(_, n)| n).sum()
    }

    pub(crate) fn reject(&mut self, reason: &'static str, detail: impl FnOnce() -> String) {
        match self.rejected.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.rejected.push((reason, 1)),
        }
        if self.first_rejection.is_none() {
            self.first_rejection = Some(detail());
        }
    }
}

/// Number of spans a request carries, to refuse oversized ones before any work.
pub fn span_count(request: &ExportTraceServiceRequest) -> usize {
    request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum()
}

pub fn convert(request: ExportTraceServiceRequest, limits: &Limits, now_ns: u64) -> Conversion {
    let mut out = Conversion {
        spans: Vec::with_capacity(span_count(&request)),
        ..Conversion::default()
    };
    let bounds = TimeBounds::new(limits, now_ns);
    for resource_spans in request.resource_spans {
        let resource_attributes = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
        let find = |key: &str| {
            resource_attributes
                .iter()
                .find(|kv| kv.key == key)
                .map(|kv| any_value_string(kv.value.as_ref()))
        };
        let mut truncated = 0;
        let mut bounded = |s: String, max: usize| bound(s, max, &mut truncated);
        let service = bounded(
            find("service.name")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "unknown_service".into()),
            limits.max_name_bytes,
        );
        let service_version = bounded(find("service.version").unwrap_or_default(), limits.max_name_bytes);
        let instance = bounded(
            find("service.instance.id")
                .or_else(|| find("host.name"))
                .unwrap_or_default(),
            limits.max_name_bytes,
        );
        out.truncated += truncated;
        for scope_spans in resource_spans.scope_spans {
            for otlp in scope_spans.spans {
                if let Some(span) = convert_span(otlp, &service, &service_version, &instance, limits, &bounds, &mut out)
                {
                    out.spans.push(span);
                }
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn convert_span(
    otlp: OtlpSpan,
    service: &str,
    service_version: &str,
    instance: &str,
    limits: &Limits,
    bounds: &TimeBounds,
    out: &mut Conversion,
) -> Option<Span> {
    let Ok(trace_id) = <[u8; 16]>::try_from(otlp.trace_id.as_slice()) else {
        let len = otlp.trace_id.len();
        out.reject("invalid_trace_id", || format!("trace id must be 16 bytes, got {len}"));
        return None;
    };
    if trace_id == [0; 16] {
        out.reject("invalid_trace_id", || "trace id must not be all zero".into());
        return None;
    }
    let span_id = match <[u8; 8]>::try_from(otlp.span_id.as_slice()) {
        Ok(bytes) if bytes != [0; 8] => u64::from_be_bytes(bytes),
        _ => {
            let len = otlp.span_id.len();
            out.reject("invalid_span_id", || {
                format!("span id must be 8 non-zero bytes, got {len} bytes")
            });
            return None;
        }
    };
    let parent_span_id = match otlp.parent_span_id.len() {
        0 => 0,
        8 => u64::from_be_bytes(otlp.parent_span_id.as_slice().try_into().expect("length checked")),
        len => {
            out.reject("invalid_parent_span_id", || {
                format!("parent span id must be empty or 8 bytes, got {len}")
            });
            return None;
        }
    };
    let (start, end) = (otlp.start_time_unix_nano, otlp.end_time_unix_nano);
    if let Err((reason, message)) = bounds.check(span_id, start, end) {
        out.reject(reason, || message);
        return None;
    }

    let mut truncated = 0;
    let kind = SpanKind::from_otlp(otlp.kind);
    let mut attributes: Vec<(String, String)> =
        Vec::with_capacity(otlp.attributes.len().min(limits.max_attributes_per_span));
    for kv in otlp.attributes {
        if attributes.len() == limits.max_attributes_per_span {
            truncated += 1;
            break;
        }
        let value = into_string(kv.value);
        let key = kv.key;
        attributes.push((
            bound(key, limits.max_name_bytes, &mut truncated),
            bound(value, limits.max_value_bytes, &mut truncated),
        ));
    }
    let attr = |key: &str| {
        attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let any = |keys: &[&str]| keys.iter().find_map(|k| attr(k));

    let method = any(&["http.request.method", "http.method"]);
    let db_system = any(&["db.system", "db.system.name"]);
    let messaging_system = attr("messaging.system");
    let rpc_system = attr("rpc.system");
    let operation = if let Some(route) = attr("http.route") {
        match method {
            Some(m) => format!("{m} {route}"),
            None => route.to_string(),
        }
    } else if let Some(rpc_method) = attr("rpc.method") {
        match attr("rpc.service") {
            Some(svc) => format!("{svc}/{rpc_method}"),
            None => rpc_method.to_string(),
        }
    } else {
        otlp.name
    };
    // Sightline's agent in OTLP mode names the component itself.
    let component = if let Some(component) = attr("sightline.component") {
        component
    } else if let Some(system) = db_system {
        if CACHE_SYSTEMS.contains(&system) {
            "cache"
        } else {
            "db"
        }
    } else if messaging_system.is_some() {
        "mq"
    } else if let Some(system) = rpc_system {
        if system == "grpc" {
            "grpc"
        } else {
            "rpc"
        }
    } else if method.is_some() {
        "http"
    } else {
        ""
    };
    let peer = if matches!(kind, SpanKind::Client | SpanKind::Producer | SpanKind::Consumer) {
        if let Some(peer) = attr("peer.service") {
            peer.to_string()
        } else if let Some(system) = db_system {
            join_non_empty(system, any(&["db.namespace", "db.name"]))
        } else if let Some(system) = messaging_system {
            join_non_empty(system, attr("messaging.destination.name"))
        } else {
            any(&["server.address", "net.peer.name"])
                .unwrap_or_default()
                .to_string()
        }
    } else {
        String::new()
    };
    let bt = any(&["sightline.bt", "bt"]).unwrap_or_default().to_string();

    // Errors: the status, then the first exception event for its type and message.
    let status_code = otlp.status.as_ref().map_or(0, |s| s.code);
    let mut status = SpanStatus::from_otlp(status_code);
    let mut error_message = otlp.status.map(|s| s.message).unwrap_or_default();
    let mut error_type = attr("error.type").unwrap_or_default().to_string();
    if let Some(exception) = otlp.events.iter().find(|e| e.name == "exception") {
        let event_attr = |key: &str| {
            exception
                .attributes
                .iter()
                .find(|kv| kv.key == key)
                .map(|kv| any_value_string(kv.value.as_ref()))
        };
        if error_type.is_empty() {
            error_type = event_attr("exception.type").unwrap_or_default();
        }
        if error_message.is_empty() {
            error_message = event_attr("exception.message").unwrap_or_default();
        }
    }
    if status == SpanStatus::Unset && !error_type.is_empty() && attr("error.type").is_some() {
        status = SpanStatus::Error;
    }

    let span = Span {
        trace_id,
        span_id,
        parent_span_id,
        service: service.to_string(),
        service_version: service_version.to_string(),
        instance: instance.to_string(),
        operation: bound(operation, limits.max_name_bytes, &mut truncated),
        kind,
        component: bound(component.to_string(), limits.max_name_bytes, &mut truncated),
        peer: bound(peer, limits.max_name_bytes, &mut truncated),
        bt: bound(bt, limits.max_name_bytes, &mut truncated),
        start_ns: start,
        duration_ns: end - start,
        status,
        error_type: bound(error_type, limits.max_name_bytes, &mut truncated),
        error_message: bound(error_message, limits.max_value_bytes, &mut truncated),
        attributes,
    };
    out.truncated += truncated;
    Some(span)
}

fn join_non_empty(first: &str, second: Option<&str>) -> String {
    match second {
        Some(s) => format!("{first}:{s}"),
        None => first.to_string(),
    }
}

/// Like [`any_value_string`], moving a string value out instead of copying it.
fn into_string(value: Option<AnyValue>) -> String {
    match value.and_then(|v| v.value) {
        Some(Value::StringValue(s)) => s,
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        None => String::new(),
        Some(other) => any_value_json(&other).to_string(),
    }
}

/// An attribute value as text: strings as they are, scalars printed, arrays and maps as JSON.
pub fn any_value_string(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        Some(other) => any_value_json(other).to_string(),
    }
}

fn any_value_json(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Value::StringValue(s) => J::String(s.clone()),
        Value::BoolValue(b) => J::Bool(*b),
        Value::IntValue(i) => J::from(*i),
        Value::DoubleValue(d) => serde_json::Number::from_f64(*d).map_or(J::Null, J::Number),
        Value::BytesValue(b) => J::String(hex::encode(b)),
        Value::ArrayValue(a) => J::Array(
            a.values
                .iter()
                .map(|v| v.value.as_ref().map_or(J::Null, any_value_json))
                .collect(),
        ),
        Value::KvlistValue(kv) => J::Object(
            kv.values
                .iter()
                .map(|kv| {
                    (
                        kv.key.clone(),
                        kv.value
                            .as_ref()
                            .and_then(|v| v.value.as_ref())
                            .map_or(J::Null, any_value_json),
                    )
                })
                .collect(),
        ),
        // Newer OTLP value kinds (e.g. references) are kept as their debug text.
        #[allow(unreachable_patterns)]
        other => J::String(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        common::v1::{InstrumentationScope, KeyValue},
        resource::v1::Resource,
        trace::v1::{span::Event, ResourceSpans, ScopeSpans, Status},
    };

    use super::*;

    const NOW: u64 = 1_750_000_000_000_000_000;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(value.into())),
            }),
            ..KeyValue::default()
        }
    }

    fn otlp_span(id: u8, parent: u8, kind: i32, attributes: Vec<KeyValue>) -> OtlpSpan {
        OtlpSpan {
            trace_id: vec![7; 16],
            span_id: vec![id; 8],
            parent_span_id: if parent == 0 { vec![] } else { vec![parent; 8] },
            name: format!("span-{id}"),
            kind,
            start_time_unix_nano: NOW - 5_000_000,
            end_time_unix_nano: NOW,
            attributes,
            ..OtlpSpan::default()
        }
    }

    fn request(spans: Vec<OtlpSpan>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", "auth"),
                        kv("service.version", "1.4.2"),
                        kv("service.instance.id", "auth-1"),
                    ],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope::default()),
                    spans,
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        }
    }

    #[test]
    fn maps_semantic_conventions() {
        let server = otlp_span(
            1,
            0,
            2,
            vec![
                kv("http.request.method", "POST"),
                kv("http.route", "/login"),
                kv("sightline.bt", "Login"),
            ],
        );
        let db = otlp_span(
            2,
            1,
            3,
            vec![kv("db.system", "postgresql"), kv("db.namespace", "users")],
        );
        let cache = otlp_span(3, 1, 3, vec![kv("db.system", "redis")]);
        let mut downstream = otlp_span(
            4,
            1,
            3,
            vec![
                kv("rpc.system", "grpc"),
                kv("rpc.service", "Sessions"),
                kv("rpc.method", "Get"),
                kv("peer.service", "sessions"),
            ],
        );
        downstream.status = Some(Status {
            code: 2,
            message: String::new(),
        });
        downstream.events.push(Event {
            name: "exception".into(),
            attributes: vec![
                kv("exception.type", "TimeoutError"),
                kv("exception.message", "deadline exceeded"),
            ],
            ..Event::default()
        });
        let out = convert(request(vec![server, db, cache, downstream]), &Limits::default(), NOW);
        assert_eq!(out.rejected_total(), 0);
        let [server, db, cache, downstream] = &out.spans[..] else {
            panic!("4 spans")
        };
        assert_eq!(
            (
                server.service.as_str(),
                server.service_version.as_str(),
                server.instance.as_str()
            ),
            ("auth", "1.4.2", "auth-1")
        );
        assert_eq!(
            (server.operation.as_str(), server.component.as_str(), server.bt.as_str()),
            ("POST /login", "http", "Login")
        );
        assert_eq!(server.parent_span_id, 0);
        assert_eq!(server.duration_ns, 5_000_000);
        assert_eq!((db.component.as_str(), db.peer.as_str()), ("db", "postgresql:users"));
        assert_eq!(db.parent_span_id, u64::from_be_bytes([1; 8]));
        assert_eq!((cache.component.as_str(), cache.peer.as_str()), ("cache", "redis"));
        assert_eq!(
            (
                downstream.operation.as_str(),
                downstream.component.as_str(),
                downstream.peer.as_str()
            ),
            ("Sessions/Get", "grpc", "sessions")
        );
        assert_eq!(downstream.status, SpanStatus::Error);
        assert_eq!(
            (downstream.error_type.as_str(), downstream.error_message.as_str()),
            ("TimeoutError", "deadline exceeded")
        );
    }

    #[test]
    fn rejects_bad_spans_one_by_one_and_keeps_the_good() {
        let mut zero_trace = otlp_span(1, 0, 2, vec![]);
        zero_trace.trace_id = vec![0; 16];
        let mut short_trace = otlp_span(2, 0, 2, vec![]);
        short_trace.trace_id = vec![1; 8];
        let mut backwards = otlp_span(3, 0, 2, vec![]);
        backwards.end_time_unix_nano = backwards.start_time_unix_nano - 1;
        let mut zero_span = otlp_span(4, 0, 2, vec![]);
        zero_span.span_id = vec![0; 8];
        let mut ancient = otlp_span(5, 0, 2, vec![]);
        (ancient.start_time_unix_nano, ancient.end_time_unix_nano) = (1, 2);
        let good = otlp_span(6, 0, 2, vec![]);
        let out = convert(
            request(vec![zero_trace, short_trace, backwards, zero_span, ancient, good]),
            &Limits::default(),
            NOW,
        );
        assert_eq!(out.spans.len(), 1);
        assert_eq!(out.spans[0].span_id, u64::from_be_bytes([6; 8]));
        let mut rejected = out.rejected.clone();
        rejected.sort();
        assert_eq!(
            rejected,
            vec![
                ("end_before_start", 1),
                ("invalid_span_id", 1),
                ("invalid_trace_id", 2),
                ("timestamp_out_of_range", 1)
            ]
        );
        assert_eq!(out.first_rejection.as_deref(), Some("trace id must not be all zero"));
    }

    #[test]
    fn cuts_long_strings_and_attribute_lists() {
        let limits = Limits {
            max_attributes_per_span: 2,
            max_value_bytes: 5,
            ..Limits::default()
        };
        let span = otlp_span(1, 0, 1, vec![kv("a", "ééééé"), kv("b", "ok"), kv("c", "dropped")]);
        let out = convert(request(vec![span]), &limits, NOW);
        assert_eq!(
            out.spans[0].attributes,
            vec![("a".into(), "éé".into()), ("b".into(), "ok".into())]
        );
        assert_eq!(out.truncated, 2);
    }
}
