//! Sightline's in-process agent.
//!
//! Every request becomes a **business transaction** (Login, SendMessage, AcceptChat) with its
//! **call chain** (database, cache and downstream calls), streamed to the Sightline collector
//! over gRPC. The hot path takes no lock shared with the exporter and does no I/O: spans go to a
//! per-thread buffer that one background exporter drains. Whatever happens to the collector,
//! the application never waits; what cannot be sent is dropped and counted.
//!
//! ```no_run
//! # fn main() -> Result<(), sightline::InitError> {
//! let _agent = sightline::init(sightline::Config {
//!     service: "auth".into(),
//!     version: "1.4.2".into(),
//!     collector: "http://127.0.0.1:4317".into(),
//!     sampling_ratio: 0.1,
//!     ..Default::default()
//! })?;
//!
//! // At the entry point: one business transaction per request.
//! let _login = sightline::transaction("Login").operation("POST /login").entered();
//! {
//!     // Inside it, the call chain.
//!     let mut query = sightline::span("SELECT users").client("db", "postgres:users").entered();
//!     query.set_attribute("db.query.text", "SELECT id FROM users WHERE login = $1");
//! }
//! // Calling another service: put the context on the request.
//! let mut headers = Vec::new();
//! sightline::propagation::inject(|name, value| headers.push((name, value)));
//! # Ok(())
//! # }
//! ```
//!
//! To feed any OpenTelemetry backend instead, set `protocol: sightline::Protocol::Otlp` and point
//! `collector` at its OTLP/gRPC endpoint (sampled spans only; see [`Protocol`]).
//!
//! Async work: `future.instrument(...)` is spelled `span.instrument(future)`:
//!
//! ```no_run
//! # async fn get_session() {}
//! # async fn handler() {
//! sightline::span("GET session").client("cache", "redis").start().instrument(get_session()).await;
//! # }
//! ```

#![warn(missing_docs)]

mod agent;
mod clock;
mod config;
mod dictionary;
mod exporter;
pub mod future;
mod inflight;
mod names;
mod otlp;
pub mod propagation;
mod recent;
mod red;
#[cfg(feature = "reqwest")]
pub mod reqwest;
mod span;
pub mod tower;
#[cfg(feature = "tracing-layer")]
pub mod tracing_layer;
mod wire;

use std::{sync::atomic::Ordering, thread::JoinHandle};

pub use config::{Config, Protocol};
pub use span::{EnteredSpan, Kind, Name, Span, SpanBuilder};

/// Why the agent could not start.
#[derive(Debug)]
pub enum InitError {
    /// `init` was called before in this process.
    AlreadyRunning,
    /// The exporter thread could not be started.
    Thread(std::io::Error),
}

impl std::fmt::Display for InitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AlreadyRunning => write!(f, "the sightline agent is already running in this process"),
            Self::Thread(e) => write!(f, "cannot start the sightline exporter thread: {e}"),
        }
    }
}

impl std::error::Error for InitError {}

/// Starts the agent: once per process. Keep the guard alive for the life of the service;
/// dropping it sends what is left (waiting up to 5 s for the collector) and stops the exporter.
pub fn init(config: Config) -> Result<AgentGuard, InitError> {
    let instance = if config.instance.is_empty() {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    } else {
        config.instance.clone()
    };
    let agent = agent::Agent::new(
        config.service.clone(),
        config.version.clone(),
        instance,
        config.queue_spans,
        config.sampling_ratio,
    );
    let agent = agent::install(agent).map_err(|()| InitError::AlreadyRunning)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let exporter = exporter::Exporter::new(config, agent);
    let thread = std::thread::Builder::new()
        .name("sightline-exporter".into())
        .spawn(move || {
            lower_priority();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("exporter runtime");
            runtime.block_on(exporter.run(stop_rx));
        })
        .map_err(InitError::Thread)?;
    Ok(AgentGuard {
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// Keeps the agent's exporter running; see [`init`].
pub struct AgentGuard {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts describing a business transaction: the entry span of a request, named after the
/// user-facing unit of work. Downstream services inherit the name through baggage.
#[inline]
pub fn transaction(name: impl Into<Name>) -> SpanBuilder {
    let name = name.into();
    SpanBuilder::new(name.clone(), Kind::Server, Some(name))
}

/// Starts describing a span inside the current one (or a new trace when there is none).
#[inline]
pub fn span(operation: impl Into<Name>) -> SpanBuilder {
    SpanBuilder::new(operation.into(), Kind::Internal, None)
}

/// Spans dropped so far because the exporter was behind or the collector away.
pub fn dropped_spans() -> u64 {
    agent::get().map_or(0, |a| a.dropped_spans.load(Ordering::Relaxed))
}

/// The current sampling ratio (the collector may change it).
pub fn sampling_ratio() -> f64 {
    agent::get().map_or(0.0, |a| a.sampling_ratio())
}

/// The exporter must never take CPU from the application's own threads: it runs niced, so the
/// scheduler favours them (its bursts of encoding otherwise showed as tail latency;
/// benches/README.md). Not `SCHED_IDLE`, though it cut that latency further: on a machine kept
/// busy by other work the exporter starved into dropping (tests/agent_sampling.rs under load),
/// and an unprivileged thread cannot leave `SCHED_IDLE` to catch up.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on this thread's own id; no memory is touched.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}
