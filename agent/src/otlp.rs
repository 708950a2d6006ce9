//! The OTLP exporter option ([`crate::Protocol::Otlp`]): sampled spans as OTLP/gRPC
//! `ExportTraceServiceRequest`s, so the agent can feed any OTLP backend (the Sightline
//! collector's OTLP receiver included).
//!
//! Sightline's own fields become attributes an OTLP backend understands: the BT as
//! `sightline.bt`, the caller from baggage as `sightline.caller.service` /
//! `sightline.caller.operation`, calls out with `peer.service`, `sightline.component` and the
//! semantic convention of their kind (`db.system`, `messaging.system`, `rpc.system`), errors as
//! an ERROR status with `error.type`. What OTLP traces cannot carry is not sent: the exact RED
//! histograms (an OTLP backend computes RED from the sampled spans it gets) and in-flight
//! snapshots; for those, use the native protocol.

use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    resource::v1::Resource,
    trace::v1::{span::SpanKind as OtlpKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, Status},
};
use prost::Message;
use sightline_proto::v1::{self as wire, Status as WireStatus};
use tonic::transport::Channel;

use crate::dictionary::Dictionary;

/// The gRPC method every OTLP trace receiver serves.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A connection to an OTLP/gRPC trace receiver.
pub(crate) struct OtlpClient {
    grpc: tonic::client::Grpc<Channel>,
    authorization: Option<tonic::metadata::AsciiMetadataValue>,
}

/// The `authorization` metadata for a collector token (none when the token is empty).
pub(crate) fn authorization(token: &str) -> Result<Option<tonic::metadata::AsciiMetadataValue>, String> {
    if token.is_empty() {
        return Ok(None);
    }
    format!("Bearer {token}")
        .parse()
        .map(Some)
        .map_err(|_| "the collector token must be printable ASCII".to_string())
}

impl OtlpClient {
    pub(crate) async fn connect(endpoint: String, token: &str) -> Result<Self, String> {
        let authorization = authorization(token)?;
        let channel = Channel::from_shared(endpoint)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            grpc: tonic::client::Grpc::new(channel),
            authorization,
        })
    }

    /// Sends one request; Ok once the receiver accepted it.
    pub(crate) async fn export(&mut self, request: ExportTraceServiceRequest) -> Result<(), String> {
        self.grpc.ready().await.map_err(|e| e.to_string())?;
        let codec = tonic_prost::ProstCodec::<ExportTraceServiceRequest, ExportTraceServiceResponse>::default();
        let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
        let mut request = tonic::Request::new(request);
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        self.grpc
            .unary(request, path, codec)
            .await
            .map(|_| ())
            .map_err(|status| format!("OTLP export refused: {status}"))
    }
}

/// The process's identity as an OTLP resource.
pub(crate) struct Identity<'a> {
    pub service: &'a str,
    pub version: &'a str,
    pub instance: &'a str,
}

/// One request for `spans` (encoded by the exporter as native `Batch.spans` fields, names as
/// ids of `dictionary`), all from this process.
pub(crate) fn request(
    identity: &Identity<'_>,
    spans: &[u8],
    dictionary: &Dictionary,
) -> Result<ExportTraceServiceRequest, String> {
    // The spans' bytes are a `Batch` of spans only.
    let spans = wire::Batch::decode(spans)
        .map_err(|e| format!("pending spans do not decode: {e}"))?
        .spans;
    let mut resource = vec![kv("service.name", identity.service)];
    if !identity.version.is_empty() {
        resource.push(kv("service.version", identity.version));
    }
    resource.push(kv("service.instance.id", identity.instance));
    Ok(ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource,
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "sightline".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..InstrumentationScope::default()
                }),
                spans: spans.into_iter().map(|s| span(s, dictionary)).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    })
}

fn span(native: wire::Span, dictionary: &Dictionary) -> Span {
    let text = |id: u32| dictionary.text(id);
    let (component, peer) = (text(native.component), text(native.peer));
    let mut attributes = vec![kv("sightline.bt", text(native.business_transaction))];
    if !component.is_empty() {
        attributes.push(kv("sightline.component", component));
    }
    if !peer.is_empty() {
        attributes.push(kv("peer.service", peer));
        // "postgres:orders" is system and namespace; the semantic convention of the kind.
        let (system, namespace) = peer.split_once(':').unwrap_or((peer, ""));
        match component {
            "db" | "cache" => {
                attributes.push(kv("db.system", system));
                if !namespace.is_empty() {
                    attributes.push(kv("db.namespace", namespace));
                }
            }
            "mq" => attributes.push(kv("messaging.system", system)),
            "grpc" => attributes.push(kv("rpc.system", "grpc")),
            _ => {}
        }
    }
    if native.caller_service != 0 || native.caller_operation != 0 {
        attributes.push(kv("sightline.caller.service", text(native.caller_service)));
        attributes.push(kv("sightline.caller.operation", text(native.caller_operation)));
    }
    let mut status = None;
    if native.status == WireStatus::Error as i32 {
        attributes.push(kv("error.type", text(native.error_type)));
        status = Some(Status {
            message: native.error_message,
            code: StatusCode::Error as i32,
        });
    }
    attributes.extend(native.attributes.iter().map(|a| kv(text(a.key), &a.value)));
    let kind = match wire::SpanKind::try_from(native.kind).unwrap_or(wire::SpanKind::Internal) {
        wire::SpanKind::Server => OtlpKind::Server,
        wire::SpanKind::Client => OtlpKind::Client,
        wire::SpanKind::Producer => OtlpKind::Producer,
        wire::SpanKind::Consumer => OtlpKind::Consumer,
        _ => OtlpKind::Internal,
    };
    Span {
        trace_id: native.trace_id,
        span_id: native.span_id.to_be_bytes().to_vec(),
        parent_span_id: if native.parent_span_id == 0 {
            Vec::new()
        } else {
            native.parent_span_id.to_be_bytes().to_vec()
        },
        name: text(native.operation).to_string(),
        kind: kind as i32,
        start_time_unix_nano: native.start_unix_nanos,
        end_time_unix_nano: native.start_unix_nanos + native.duration_nanos,
        attributes,
        status,
        ..Span::default()
    }
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..KeyValue::default()
    }
}
