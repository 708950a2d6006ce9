//! The collector's self-metrics, exposed on `/metrics` in Prometheus text format. One
//! `Metrics` is shared (behind an `Arc`) by every stage; each stage only increments its own.

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReceiverLabel {
    pub receiver: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestRejectionLabels {
    pub receiver: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    pub service: String,
    pub instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// Spans accepted into the pipeline, by receiver.
    pub received_spans: Family<ReceiverLabel, Counter>,
    /// Spans refused by validation, by reason.
    pub rejected_spans: Family<ReasonLabel, Counter>,
    /// Whole requests refused, by receiver and reason.
    pub rejected_requests: Family<RequestRejectionLabels, Counter>,
    /// Strings cut to the configured limit, and attributes past the per-span cap.
    pub truncated_values: Counter,
    pub written_rows: Family<TableLabel, Counter>,
    pub insert_failures: Family<TableLabel, Counter>,
    /// Spans given up after the last insert attempt.
    pub dropped_spans: Family<ReasonLabel, Counter>,
    /// Spans between receivers and ClickHouse (queued and batching).
    pub write_queue_spans: Gauge,
    pub insert_duration_seconds: Family<TableLabel, Histogram>,
    /// Heartbeats received from native agents.
    pub agent_heartbeats: Counter,
    /// Spans each agent reports it dropped (collector away, queue full), from its heartbeats.
    pub agent_dropped_spans: Family<AgentLabels, Gauge>,
    /// Each agent's hand-off queue depth, from its heartbeats.
    pub agent_queue_depth: Family<AgentLabels, Gauge>,
    /// Calls whose client and server spans were paired into an edge.
    pub edge_pairs_paired: Counter,
    /// Client or server spans whose other half did not come within the window.
    pub edge_pairs_expired: Counter,
    /// Spans waiting for their other half.
    pub edge_pairing_waiting: Gauge,
    /// paired / (paired + expired) since start.
    pub edge_completeness: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Bytes of batches in the spool (durable, not yet all written to ClickHouse).
    pub spool_bytes: Gauge,
    /// Encoded batches waiting for the spool's disk, in bytes.
    pub spool_pending_bytes: Gauge,
    /// Batches made durable in the spool.
    pub spool_batches: Counter,
    /// Batches the spool refused (full, or a write error): not acknowledged.
    pub spool_refused_batches: Counter,
    /// Spool records that failed their checksum or could not be decoded.
    pub spool_corrupt_records: Counter,
    /// The last seq made durable in the spool; with `spool_written_seq`, how far ClickHouse
    /// is behind, in batches.
    pub spool_durable_seq: Gauge,
    /// Every batch up to this seq is in ClickHouse (in this run).
    pub spool_written_seq: Gauge,
    /// Batches replayed from the spool whose rows the write ledger showed already written.
    pub replay_skipped: Family<TableLabel, Counter>,
    /// Alert evaluations, by outcome (ok, failed).
    pub alert_evaluations: Family<OutcomeLabel, Counter>,
    /// Seconds since the last complete alert evaluation.
    pub alert_evaluation_lag_seconds: Gauge,
    pub alerts_firing: Gauge,
    /// Webhook messages by outcome: delivered, retried (one per failed attempt), refused
    /// (given up after the receiver refused it), dropped (queue full).
    pub webhook_messages: Family<OutcomeLabel, Counter>,
    /// Messages waiting for their webhook.
    pub webhook_queue: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sightline");
        let metrics = Self {
            received_spans: Family::default(),
            rejected_spans: Family::default(),
            rejected_requests: Family::default(),
            truncated_values: Counter::default(),
            written_rows: Family::default(),
            insert_failures: Family::default(),
            dropped_spans: Family::default(),
            write_queue_spans: Gauge::default(),
            insert_duration_seconds: Family::new_with_constructor(|| {
                Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            }),
            agent_heartbeats: Counter::default(),
            agent_dropped_spans: Family::default(),
            agent_queue_depth: Family::default(),
            edge_pairs_paired: Counter::default(),
            edge_pairs_expired: Counter::default(),
            edge_pairing_waiting: Gauge::default(),
            edge_completeness: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_pending_bytes: Gauge::default(),
            spool_batches: Counter::default(),
            spool_refused_batches: Counter::default(),
            spool_corrupt_records: Counter::default(),
            spool_durable_seq: Gauge::default(),
            spool_written_seq: Gauge::default(),
            replay_skipped: Family::default(),
            alert_evaluations: Family::default(),
            alert_evaluation_lag_seconds: Gauge::default(),
            alerts_firing: Gauge::default(),
            webhook_messages: Family::default(),
            webhook_queue: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "received_spans",
            "Spans accepted, by receiver",
            metrics.received_spans.clone(),
        );
        registry.register(
            "rejected_spans",
            "Spans refused by validation, by reason",
            metrics.rejected_spans.clone(),
        );
        registry.register(
            "rejected_requests",
            "Requests refused whole, by receiver and reason",
            metrics.rejected_requests.clone(),
        );
        registry.register(
            "truncated_values",
            "Strings and attribute lists cut to their limits",
            metrics.truncated_values.clone(),
        );
        registry.register(
            "written_rows",
            "Rows written to ClickHouse, by table",
            metrics.written_rows.clone(),
        );
        registry.register(
            "insert_failures",
            "Failed INSERT attempts, by table",
            metrics.insert_failures.clone(),
        );
        registry.register(
            "dropped_spans",
            "Spans given up, by reason",
            metrics.dropped_spans.clone(),
        );
        registry.register(
            "write_queue_spans",
            "Spans waiting to be written",
            metrics.write_queue_spans.clone(),
        );
        registry.register(
            "insert_duration_seconds",
            "Time per INSERT, by table",
            metrics.insert_duration_seconds.clone(),
        );
        registry.register(
            "edge_pairs_paired",
            "Calls whose client and server spans were paired into a topology edge",
            metrics.edge_pairs_paired.clone(),
        );
        registry.register(
            "edge_pairs_expired",
            "Client or server spans whose other half did not arrive within the pairing window",
            metrics.edge_pairs_expired.clone(),
        );
        registry.register(
            "edge_pairing_waiting",
            "Spans waiting in the pairing store for their other half",
            metrics.edge_pairing_waiting.clone(),
        );
        registry.register(
            "edge_completeness",
            "Edge completeness: paired / (paired + expired)",
            metrics.edge_completeness.clone(),
        );
        registry.register(
            "agent_heartbeats",
            "Heartbeats from native agents",
            metrics.agent_heartbeats.clone(),
        );
        registry.register(
            "agent_dropped_spans",
            "Spans an agent reports it dropped, by service and instance",
            metrics.agent_dropped_spans.clone(),
        );
        registry.register(
            "agent_queue_depth",
            "An agent's hand-off queue depth, by service and instance",
            metrics.agent_queue_depth.clone(),
        );
        registry.register(
            "spool_bytes",
            "Bytes of batches in the spool, not yet all in ClickHouse",
            metrics.spool_bytes.clone(),
        );
        registry.register(
            "spool_pending_bytes",
            "Bytes of batches waiting for the spool's disk",
            metrics.spool_pending_bytes.clone(),
        );
        registry.register(
            "spool_batches",
            "Batches made durable in the spool",
            metrics.spool_batches.clone(),
        );
        registry.register(
            "spool_refused_batches",
            "Batches the spool refused (full or a write error), not acknowledged",
            metrics.spool_refused_batches.clone(),
        );
        registry.register(
            "spool_corrupt_records",
            "Spool records failing their checksum or undecodable",
            metrics.spool_corrupt_records.clone(),
        );
        registry.register(
            "spool_durable_seq",
            "The last seq made durable in the spool",
            metrics.spool_durable_seq.clone(),
        );
        registry.register(
            "spool_written_seq",
            "Every spool batch up to this seq is in ClickHouse",
            metrics.spool_written_seq.clone(),
        );
        registry.register(
            "replay_skipped",
            "Replayed batch parts already in ClickHouse by the write ledger, by table",
            metrics.replay_skipped.clone(),
        );
        registry.register(
            "alert_evaluations",
            "Alert evaluations, by outcome",
            metrics.alert_evaluations.clone(),
        );
        registry.register(
            "alert_evaluation_lag_seconds",
            "Seconds since the last complete alert evaluation",
            metrics.alert_evaluation_lag_seconds.clone(),
        );
        registry.register("alerts_firing", "Alerts firing now", metrics.alerts_firing.clone());
        registry.register(
            "webhook_messages",
            "Webhook messages by outcome (delivered, retried, refused, dropped)",
            metrics.webhook_messages.clone(),
        );
        registry.register(
            "webhook_queue",
            "Webhook messages waiting for their receiver",
            metrics.webhook_queue.clone(),
        );
        Self { registry, ..metrics }
    }

    pub fn reject_request(&self, receiver: &'static str, reason: &'static str) {
        self.rejected_requests
            .get_or_create(&RequestRejectionLabels { receiver, reason })
            .inc();
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
