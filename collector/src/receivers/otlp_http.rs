//! OTLP/HTTP trace receiver: `POST /v1/traces` with `application/x-protobuf` or
//! `application/json` bodies (gzip accepted). Answers in the request's encoding, as the OTLP
//! specification asks: an ExportTraceServiceResponse (with partial success) on 200, a
//! google.rpc.Status on 4xx/5xx, and `Retry-After` when the collector is busy.

use axum::{
    body::{to_bytes, Body},
    extract::State,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Router,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tower_http::decompression::RequestDecompressionLayer;

use crate::pipeline::{IngestError, Pipeline};

const RECEIVER: &str = "otlp_http";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

pub fn router(pipeline: Pipeline) -> Router {
    let auth = (pipeline.ingest_token().clone(), pipeline.metrics().clone(), RECEIVER);
    Router::new()
        .route("/v1/traces", post(export))
        .layer(RequestDecompressionLayer::new())
        // Outermost: a sender without the token costs no decompression.
        .layer(axum::middleware::from_fn_with_state(auth, crate::auth::require))
        .with_state(pipeline)
}

async fn export(State(pipeline): State<Pipeline>, headers: HeaderMap, body: Body) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let encoding = match content_type.split(';').next().unwrap_or("").trim() {
        "application/x-protobuf" | "application/protobuf" => Encoding::Protobuf,
        "application/json" => Encoding::Json,
        other => {
            pipeline.metrics().reject_request(RECEIVER, "unsupported_media_type");
            return status_response(
                Encoding::Json,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content type {other:?} is not supported; send application/x-protobuf or application/json"),
            );
        }
    };
    // The limit applies after decompression, so a small gzip bomb is refused too.
    let max = pipeline.limits().max_request_bytes;
    let bytes = match to_bytes(body, max).await {
        Ok(bytes) => bytes,
        Err(e) => {
            let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if too_large {
                pipeline.metrics().reject_request(RECEIVER, "too_large");
                status_response(
                    encoding,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body exceeds the limit of {max} bytes"),
                )
            } else {
                pipeline.metrics().reject_request(RECEIVER, "malformed");
                status_response(
                    encoding,
                    StatusCode::BAD_REQUEST,
                    format!("cannot read request body: {e}"),
                )
            };
        }
    };
    let request = match encoding {
        Encoding::Protobuf => ExportTraceServiceRequest::decode(bytes).map_err(|e| e.to_string()),
        Encoding::Json => serde_json::from_slice::<ExportTraceServiceRequest>(&bytes).map_err(|e| e.to_string()),
    };
    let request = match request {
        Ok(request) => request,
        Err(e) => {
            pipeline.metrics().reject_request(RECEIVER, "malformed");
            return status_response(
                encoding,
                StatusCode::BAD_REQUEST,
                format!("cannot decode ExportTraceServiceRequest: {e}"),
            );
        }
    };
    // Answered once the batch is durable in the spool.
    let result = match pipeline.ingest_otlp(RECEIVER, request) {
        Ok(taken) => taken.durable().await,
        Err(e) => Err(e),
    };
    match result {
        Ok(accepted) => {
            let response = super::export_response(accepted);
            match encoding {
                Encoding::Protobuf => protobuf(StatusCode::OK, response.encode_to_vec()),
                Encoding::Json => (StatusCode::OK, axum::Json(response)).into_response(),
            }
        }
        Err(IngestError::Invalid(message)) => status_response(encoding, StatusCode::BAD_REQUEST, message),
        Err(e @ IngestError::Busy(delay)) => {
            retry_later(encoding, StatusCode::SERVICE_UNAVAILABLE, e.to_string(), delay)
        }
        Err(IngestError::Exhausted { message, retry }) => {
            retry_later(encoding, StatusCode::TOO_MANY_REQUESTS, message, retry)
        }
    }
}

fn retry_later(encoding: Encoding, status: StatusCode, message: String, delay: std::time::Duration) -> Response {
    let mut response = status_response(encoding, status, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(delay.as_secs().max(1)));
    response
}

fn protobuf(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/x-protobuf")], body).into_response()
}

/// A google.rpc.Status in the request's encoding; the JSON form also carries `error`, the
/// collector's usual error field.
fn status_response(encoding: Encoding, status: StatusCode, message: String) -> Response {
    let code = match status {
        StatusCode::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
        StatusCode::TOO_MANY_REQUESTS => tonic::Code::ResourceExhausted,
        _ => tonic::Code::InvalidArgument,
    } as i32;
    match encoding {
        Encoding::Protobuf => protobuf(
            status,
            tonic_types::Status {
                code,
                message,
                details: vec![],
            }
            .encode_to_vec(),
        ),
        Encoding::Json => (
            status,
            axum::Json(serde_json::json!({ "code": code, "message": message, "error": message })),
        )
            .into_response(),
    }
}
