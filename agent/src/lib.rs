//! The Sightline in-process agent.
//!
//! Not yet implemented: this crate reserves the name and the place in the workspace. Its
//! API (business transactions, spans as guards, W3C propagation, the native `sightline.v1`
//! exporter) is the agent issue's work; until then, services send OTLP from any
//! OpenTelemetry SDK to the collector.

/// The wire contract the agent will speak, re-exported for convenience.
pub use sightline_proto as proto;
