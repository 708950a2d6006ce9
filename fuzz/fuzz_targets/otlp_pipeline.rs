//! Arbitrary bytes as an OTLP export (protobuf, and JSON when the first byte says so) through
//! the whole pipeline: validation, mapping, BT naming, aggregates, edges, stages, encoding.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let request = if first & 1 == 0 {
        ExportTraceServiceRequest::decode(rest).ok()
    } else {
        serde_json::from_slice::<ExportTraceServiceRequest>(rest).ok()
    };
    let Some(request) = request else { return };
    let spans = sightline_collector::pipeline::otlp::span_count(&request);
    if let Ok(taken) = common::pipeline().ingest_otlp("fuzz", request) {
        // Every span is either accepted or rejected, never lost or counted twice.
        assert_eq!(taken.accepted.accepted + taken.accepted.rejected, spans as u64);
    }
});
