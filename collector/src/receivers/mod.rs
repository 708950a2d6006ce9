//! Receivers: the network edge. Each decodes its protocol, refuses what it cannot take with
//! that protocol's status (and a counter), and hands the rest to the pipeline.

pub mod native;
pub mod otlp_grpc;
pub mod otlp_http;

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};
use tonic_types::{ErrorDetails, StatusExt};

use crate::pipeline::{Accepted, IngestError};

/// gRPC status for "busy, retry after `delay`", with a google.rpc.RetryInfo the OTLP
/// exporters understand.
pub fn unavailable_with_retry(message: String, delay: Duration) -> tonic::Status {
    tonic::Status::with_error_details(
        tonic::Code::Unavailable,
        message,
        ErrorDetails::with_retry_info(Some(delay)),
    )
}

/// The gRPC status for a request the pipeline could not take.
pub fn ingest_status(error: IngestError) -> tonic::Status {
    match error {
        IngestError::Invalid(message) => tonic::Status::invalid_argument(message),
        e @ IngestError::Busy(delay) => unavailable_with_retry(e.to_string(), delay),
        IngestError::Exhausted { message, retry } => tonic::Status::with_error_details(
            tonic::Code::ResourceExhausted,
            message,
            ErrorDetails::with_retry_info(Some(retry)),
        ),
    }
}

/// The OTLP answer to an accepted request: partial success when some spans were rejected.
pub fn export_response(accepted: Accepted) -> ExportTraceServiceResponse {
    ExportTraceServiceResponse {
        partial_success: (accepted.rejected > 0).then_some(ExportTracePartialSuccess {
            rejected_spans: accepted.rejected as i64,
            error_message: accepted.message,
        }),
    }
}
