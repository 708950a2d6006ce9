//! OTLP/gRPC trace receiver (`opentelemetry.proto.collector.trace.v1.TraceService/Export`).
//!
//! Written over tonic's server machinery with a pass-through codec rather than the generated
//! server: that way a request that does not decode is ours to answer (INVALID_ARGUMENT, and a
//! counter) instead of tonic's INTERNAL, and tonic's size-limit refusal, which uses the
//! retryable OUT_OF_RANGE, can be counted and turned into a permanent INVALID_ARGUMENT.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use bytes::{Buf, BufMut, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tonic::{
    codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder},
    server::{NamedService, UnaryService},
    Code, Status,
};

use crate::pipeline::Pipeline;

const RECEIVER: &str = "otlp_grpc";
pub(crate) const UNAUTHENTICATED: &str = "ingest needs a bearer token: send `authorization: Bearer <token>`";
pub const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The TraceService, ready to be added to a tonic `Server`.
#[derive(Clone)]
pub struct OtlpTraceService {
    pipeline: Pipeline,
}

impl OtlpTraceService {
    pub fn new(pipeline: Pipeline) -> Self {
        Self { pipeline }
    }
}

impl NamedService for OtlpTraceService {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<B> tower::Service<http::Request<B>> for OtlpTraceService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != EXPORT_PATH {
            return Box::pin(async { Ok(Status::unimplemented("unknown method").into_http()) });
        }
        let pipeline = self.pipeline.clone();
        if !pipeline.ingest_token().allows_headers(request.headers()) {
            pipeline.metrics().reject_request(RECEIVER, "unauthenticated");
            return Box::pin(async { Ok(Status::unauthenticated(UNAUTHENTICATED).into_http()) });
        }
        Box::pin(async move {
            let max = pipeline.limits().max_request_bytes;
            let mut grpc = tonic::server::Grpc::new(PassThrough)
                .accept_compressed(CompressionEncoding::Gzip)
                .apply_max_message_size_config(Some(max), None);
            let reached = Arc::new(AtomicBool::new(false));
            let handler = ExportHandler {
                pipeline: pipeline.clone(),
                reached: reached.clone(),
            };
            let response = grpc.unary(handler, request).await;
            if reached.load(Ordering::Relaxed) {
                return Ok(response);
            }
            // Refused by tonic before our handler ran: size limit, compression, framing.
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(Code::from_i32);
            let message = response
                .headers()
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                // grpc-message is percent-encoded on the wire.
                .map(|m| percent_encoding::percent_decode_str(m).decode_utf8_lossy().into_owned())
                .unwrap_or_default();
            Ok(match code {
                Some(Code::OutOfRange) => {
                    pipeline.metrics().reject_request(RECEIVER, "too_large");
                    Status::invalid_argument(format!("request too large: {message}")).into_http()
                }
                Some(Code::Ok) | None => response,
                Some(_) => {
                    pipeline.metrics().reject_request(RECEIVER, "malformed");
                    response
                }
            })
        })
    }
}

struct ExportHandler {
    pipeline: Pipeline,
    reached: Arc<AtomicBool>,
}

impl UnaryService<Bytes> for ExportHandler {
    type Response = Bytes;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        self.reached.store(true, Ordering::Relaxed);
        let pipeline = self.pipeline.clone();
        Box::pin(async move {
            let request = ExportTraceServiceRequest::decode(request.into_inner()).map_err(|e| {
                pipeline.metrics().reject_request(RECEIVER, "malformed");
                Status::invalid_argument(format!("cannot decode ExportTraceServiceRequest: {e}"))
            })?;
            // Answered once the batch is durable in the spool.
            let taken = pipeline.ingest_otlp(RECEIVER, request).map_err(super::ingest_status)?;
            let accepted = taken.durable().await.map_err(super::ingest_status)?;
            let response = super::export_response(accepted);
            Ok(tonic::Response::new(response.encode_to_vec().into()))
        })
    }
}

/// A tonic codec that hands message bytes through untouched: the receiver decodes in its
/// handler, and test clients use it to send bytes that are not a valid message.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassThrough;

impl Codec for PassThrough {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = PassThrough;
    type Decoder = PassThrough;

    fn encoder(&mut self) -> Self::Encoder {
        PassThrough
    }

    fn decoder(&mut self) -> Self::Decoder {
        PassThrough
    }
}

impl Encoder for PassThrough {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for PassThrough {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
