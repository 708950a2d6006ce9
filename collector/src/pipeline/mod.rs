//! The pipeline between receivers and the store: validate and map (`otlp`), name business
//! transactions (`enrich`), pre-aggregate latency (`aggregate`), then encode the batch into
//! the spool (`store::appender`).
//!
//! These steps run in the receiving request's task, so decoding, mapping and encoding spread
//! over all cores; the spool's queue is the one hand-off. A request is answered once its batch
//! is durable ([`Taken::durable`]); a full queue or spool is answered with "retry later".

pub mod aggregate;
pub mod edges;
pub mod enrich;
pub mod native;
pub mod otlp;
pub mod stages;
pub mod validate;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

use crate::{
    auth::Token,
    config::Limits,
    metrics::{Metrics, ReasonLabel, ReceiverLabel},
    store::{
        appender::{AppendError, Receipt, SpoolHandle},
        rows::{HeartbeatRow, InflightRow},
        spool::SpoolError,
        writer::WriteBatch,
    },
};
use aggregate::LatencyAggregates;
use edges::Pairing;

/// How long a sender is asked to wait when the queue is full.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Pipeline {
    limits: Arc<Limits>,
    metrics: Arc<Metrics>,
    spool: SpoolHandle,
    pairing: Arc<Pairing>,
    ingest_token: Token,
}

/// A request the pipeline took, possibly in part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub accepted: u64,
    pub rejected: u64,
    /// Why the first rejected span was rejected; empty when none was.
    pub message: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IngestError {
    /// Nothing in the request is acceptable; sending it again will not help.
    #[error("{0}")]
    Invalid(String),
    /// Too much waits for the spool's disk; the sender should retry after the delay.
    #[error("the collector is busy (write queue full), retry in {} s", .0.as_secs())]
    Busy(Duration),
    /// The spool is full (ClickHouse behind or away) or cannot write: nothing was kept.
    #[error("{message}; retry in {} s", .retry.as_secs())]
    Exhausted { message: String, retry: Duration },
}

impl From<SpoolError> for IngestError {
    fn from(e: SpoolError) -> Self {
        Self::Exhausted {
            message: e.to_string(),
            retry: RETRY_AFTER,
        }
    }
}

/// A request taken into the pipeline, its batch on its way to the disk.
#[must_use = "a request is answered once its batch is durable"]
pub struct Taken {
    pub accepted: Accepted,
    /// None when there was nothing to keep.
    receipt: Option<Receipt>,
}

impl Taken {
    /// Waits until the batch is durable in the spool: only then may the sender be told so.
    pub async fn durable(self) -> Result<Accepted, IngestError> {
        if let Some(receipt) = self.receipt {
            receipt.durable().await?;
        }
        Ok(self.accepted)
    }
}

impl Pipeline {
    pub fn new(
        limits: Limits,
        edges: &crate::config::EdgesConfig,
        metrics: Arc<Metrics>,
        spool: SpoolHandle,
        ingest_token: Token,
    ) -> Self {
        let pairing = Pairing::new(
            Duration::from_millis(edges.pairing_window_ms),
            edges.max_waiting,
            metrics.clone(),
        );
        Self {
            limits: Arc::new(limits),
            metrics,
            spool,
            pairing: Arc::new(pairing),
            ingest_token,
        }
    }

    /// Ends the wait of spans whose other half did not come in time (every second, from
    /// `serve`); their edges go to the spool. A full spool loses them.
    pub fn sweep_edges(&self) {
        let edges = self.pairing.sweep();
        if !edges.is_empty() {
            let batch = WriteBatch {
                edges,
                ..WriteBatch::default()
            };
            let _ = self.spool.try_append(batch.encode());
        }
    }

    /// What receivers ask of senders.
    pub fn ingest_token(&self) -> &Token {
        &self.ingest_token
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Takes one decoded OTLP request through the pipeline.
    pub fn ingest_otlp(
        &self,
        receiver: &'static str,
        request: ExportTraceServiceRequest,
    ) -> Result<Taken, IngestError> {
        let count = otlp::span_count(&request);
        if count > self.limits.max_spans_per_request {
            self.metrics.reject_request(receiver, "too_many_spans");
            return Err(IngestError::Invalid(format!(
                "request carries {count} spans, more than the limit of {}",
                self.limits.max_spans_per_request
            )));
        }
        let mut conversion = otlp::convert(request, &self.limits, now_ns());
        self.accept(
            receiver,
            &mut conversion,
            LatencyAggregates::default(),
            Vec::new(),
            true,
        )
    }

    /// Takes one sightline.v1 batch through the pipeline. The agent's histograms, which count
    /// sampled and unsampled requests alike, become the latency aggregates.
    pub fn ingest_native(
        &self,
        receiver: &'static str,
        batch: sightline_proto::v1::Batch,
        dictionary: &mut native::Dictionary,
    ) -> Result<Taken, NativeError> {
        let native::NativeBatch {
            mut conversion,
            latency,
            inflight,
        } = native::convert(batch, dictionary, &self.limits, now_ns()).map_err(|native::BrokenStream(m)| {
            self.metrics.reject_request(receiver, "broken_stream");
            NativeError::BrokenStream(m)
        })?;
        Ok(self.accept(receiver, &mut conversion, latency, inflight, false)?)
    }

    /// An agent's heartbeat, stored with the rest (batched by the writer). A full spool loses
    /// it: the next one comes in seconds.
    pub fn ingest_heartbeat(&self, heartbeat: HeartbeatRow) {
        let batch = WriteBatch {
            heartbeats: vec![heartbeat],
            ..WriteBatch::default()
        };
        let _ = self.spool.try_append(batch.encode());
    }

    /// Counts rejections, names BTs, aggregates (unless the sender already did) and hands the
    /// spans and aggregates to the spool.
    fn accept(
        &self,
        receiver: &'static str,
        conversion: &mut otlp::Conversion,
        mut latency: LatencyAggregates,
        inflight: Vec<InflightRow>,
        aggregate_spans: bool,
    ) -> Result<Taken, IngestError> {
        self.metrics.truncated_values.inc_by(conversion.truncated);
        for (reason, n) in &conversion.rejected {
            self.metrics
                .rejected_spans
                .get_or_create(&ReasonLabel { reason })
                .inc_by(*n);
        }
        let rejected = conversion.rejected_total();
        let message = conversion.first_rejection.take().unwrap_or_default();
        if conversion.spans.is_empty() && latency.is_empty() && inflight.is_empty() {
            return if rejected > 0 {
                self.metrics.reject_request(receiver, "all_spans_invalid");
                Err(IngestError::Invalid(format!(
                    "all {rejected} spans rejected; first: {message}"
                )))
            } else {
                Ok(Taken {
                    accepted: Accepted {
                        accepted: 0,
                        rejected: 0,
                        message,
                    },
                    receipt: None,
                })
            };
        }
        let mut spans = std::mem::take(&mut conversion.spans);
        enrich::fill_business_transactions(&mut spans);
        if aggregate_spans {
            latency.merge(LatencyAggregates::from_spans(&spans));
        }
        let edges = self.pairing.edges(&spans);
        let stages = stages::StageAggregates::from_spans(&spans);
        let accepted = spans.len() as u64;
        let batch = WriteBatch {
            spans,
            latency,
            edges,
            stages,
            inflight,
            ..WriteBatch::default()
        };
        let receipt = match self.spool.try_append(batch.encode()) {
            Ok(receipt) => receipt,
            Err(AppendError::QueueFull) => {
                self.metrics.reject_request(receiver, "queue_full");
                return Err(IngestError::Busy(RETRY_AFTER));
            }
            Err(AppendError::Spool(e)) => {
                self.metrics.reject_request(receiver, "spool_full");
                return Err(e.into());
            }
        };
        self.metrics
            .received_spans
            .get_or_create(&ReceiverLabel { receiver })
            .inc_by(accepted);
        Ok(Taken {
            accepted: Accepted {
                accepted,
                rejected,
                message,
            },
            receipt: Some(receipt),
        })
    }
}

/// Why a native stream cannot go on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NativeError {
    /// The batch does not fit the stream's dictionary: the stream must start over.
    #[error("{0}")]
    BrokenStream(String),
    #[error(transparent)]
    Ingest(#[from] IngestError),
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
