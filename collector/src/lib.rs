//! The Sightline collector: receives spans (OTLP gRPC/HTTP and the native `sightline.v1`
//! protocol), validates and enriches them, writes them to ClickHouse, and serves
//! them back over an HTTP API. See `docs/architecture.md` for the way a span takes.

pub mod alerts;
pub mod api;
pub mod auth;
pub mod config;
pub mod demo;
pub mod gate;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod query;
pub mod receivers;
pub mod sampling;
pub mod serve;
pub mod store;
pub mod testing;

pub use config::Config;
pub use serve::Collector;
/// The comparison engine (crate `sightline-compare`), shared with `sightline gate`.
pub use sightline_compare as compare;
