use std::time::Duration;

/// What the agent speaks to `collector`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    /// The Sightline collector's `sightline.v1` stream: spans, exact RED histograms under
    /// sampling, in-flight snapshots, heartbeats, sampling pushed back.
    #[default]
    Native,
    /// OTLP/gRPC trace export to any OpenTelemetry backend: sampled spans only (RED is then
    /// computed by the backend from what it receives).
    Otlp,
}

/// How the agent identifies its service and where it sends.
#[derive(Debug, Clone)]
pub struct Config {
    /// The service's name, e.g. `auth`.
    pub service: String,
    /// The running version, e.g. `1.4.2`: what version comparisons compare.
    pub version: String,
    /// This process, e.g. a pod name. Empty: `<host>-<pid>`.
    pub instance: String,
    /// The collector's gRPC endpoint (or, with [`Protocol::Otlp`], any OTLP/gRPC receiver).
    pub collector: String,
    /// How to speak to it.
    pub protocol: Protocol,
    /// The collector's ingest token, sent as `authorization: Bearer <token>`; empty: none.
    pub token: String,
    /// Share of business transactions whose call chain is recorded, 0.0..=1.0. RED figures of
    /// transactions count every request regardless. The collector may change it at run time.
    pub sampling_ratio: f64,
    /// Spans waiting for the exporter, per application thread (handed off once per finished
    /// request, or per 128 spans of a busy thread). When full, new spans are dropped and
    /// counted: the application never waits. A span's record is 120 bytes (plus attributes
    /// when sampled); the default absorbs a 20,000-request burst from one thread while the
    /// exporter gets no CPU (tests/agent_sampling.rs under load).
    pub queue_spans: usize,
    /// Spans the exporter keeps while the collector is slow or away (not yet acknowledged).
    /// Past it the oldest are dropped and counted.
    pub max_pending_spans: usize,
    /// The memory those spans may take (they are held encoded, as sent: 70-100 bytes for a
    /// span without long attributes); the agent's memory cap while the collector is away. Past it the oldest are dropped and
    /// counted. Besides it, each application thread holds at most `queue_spans` spans waiting
    /// for the exporter.
    pub max_pending_bytes: usize,
    /// How often the exporter takes the threads' spans, folds them into RED and sends what it
    /// has; sooner (at most every 100 ms) for a thread with 512 spans waiting, or a quarter of
    /// `queue_spans` if that is fewer.
    pub flush_interval: Duration,
    /// How often the agent says it is alive.
    pub heartbeat_interval: Duration,
    /// Transactions open longer than this are reported as in flight ("stuck now").
    pub inflight_threshold: Duration,
    /// How often open transactions are checked against the threshold.
    pub inflight_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            service: "unknown_service".into(),
            version: String::new(),
            instance: String::new(),
            collector: "http://127.0.0.1:4317".into(),
            protocol: Protocol::Native,
            token: String::new(),
            sampling_ratio: 1.0,
            queue_spans: 65_536,
            max_pending_spans: 200_000,
            max_pending_bytes: 64 << 20,
            // Each wake-up of the exporter costs more CPU than a thousand spans
            // (benches/README.md); a second is far inside what the collector's 10-second
            // aggregates resolve.
            flush_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(10),
            inflight_threshold: Duration::from_secs(2),
            inflight_interval: Duration::from_secs(1),
        }
    }
}
