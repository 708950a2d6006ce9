//! Topology edges: who calls whom, per minute, BT and versions, with calls, errors and a
//! latency histogram (the callee's time).
//!
//! Where an edge comes from:
//! - a root server span: `user` -> its service;
//! - a server span whose caller came in baggage (Sightline's agent): caller -> service, at once;
//! - otherwise (OTLP) a server span and its caller's client span, paired on (trace id, the
//!   client's span id = the server's parent) within a window (Tempo's service-graph method);
//! - a call to a database, cache or queue (client or producer span with that component):
//!   service -> a virtual node named by the peer, at once; a consumer span: queue -> service;
//! - a client span left unpaired when the window ends: service -> an external node named by
//!   its peer (a call to something that sends no spans).
//!
//! Pairing needs both sides of a call on one collector: with several collectors, route by trace
//! id (docs/architecture.md). The waiting sides are capped; past the cap the oldest expire
//! early. Paired and expired counts give edge completeness on /metrics.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::aggregate::LatencyValue;
use crate::{
    metrics::Metrics,
    model::{Span, SpanKind, SpanStatus},
};

/// What a topology node stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum NodeType {
    User = 1,
    Service = 2,
    Database = 3,
    Cache = 4,
    Mq = 5,
    External = 6,
}

impl NodeType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Service => "service",
            Self::Database => "database",
            Self::Cache => "cache",
            Self::Mq => "mq",
            Self::External => "external",
        }
    }

    pub fn from_i8(value: i8) -> Option<Self> {
        Some(match value {
            1 => Self::User,
            2 => Self::Service,
            3 => Self::Database,
            4 => Self::Cache,
            5 => Self::Mq,
            6 => Self::External,
            _ => return None,
        })
    }

    /// The virtual node a call through `component` reaches, for components that never send
    /// spans themselves.
    fn of_component(component: &str) -> Option<Self> {
        match component {
            "db" => Some(Self::Database),
            "cache" => Some(Self::Cache),
            "mq" => Some(Self::Mq),
            _ => None,
        }
    }
}

/// The name of the node every root request comes from.
pub const USER: &str = "user";

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EdgeKey {
    /// Unix seconds at the start of the minute.
    pub minute: u32,
    pub caller: String,
    pub caller_type: NodeType,
    pub callee: String,
    pub callee_type: NodeType,
    pub bt: String,
    pub caller_version: String,
    pub callee_version: String,
}

/// Per-minute edge partials, merged in the writer and again by ClickHouse.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct EdgeAggregates {
    entries: FxHashMap<EdgeKey, LatencyValue>,
}

impl EdgeAggregates {
    fn record(&mut self, key: EdgeKey, duration_ns: u64, error: bool) {
        self.entries
            .entry(key)
            .or_default()
            .record(duration_ns.div_ceil(1000), error);
    }

    pub fn merge(&mut self, other: EdgeAggregates) {
        for (key, value) in other.entries {
            self.entries.entry(key).or_default().add(value);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Takes every entry out.
    pub fn drain(&mut self) -> Vec<(EdgeKey, LatencyValue)> {
        self.entries.drain().collect()
    }
}

fn minute_of(start_ns: u64) -> u32 {
    ((start_ns / 1_000_000_000) / 60 * 60) as u32
}

/// One side of a call, waiting for the other.
#[derive(Debug)]
struct Waiting {
    since: Instant,
    service: String,
    version: String,
    bt: String,
    peer: String,
    start_ns: u64,
    duration_ns: u64,
    error: bool,
    /// A server span whose edge came from baggage: it waits only to absorb its client span.
    counted: bool,
}

type CallId = (u128, u64);

#[derive(Default)]
struct Waiters {
    /// Client spans by (trace, own span id).
    clients: FxHashMap<CallId, Waiting>,
    /// Server spans by (trace, parent span id).
    servers: FxHashMap<CallId, Waiting>,
    /// Arrival order, for expiry: (arrived, is a client, id). Entries paired meanwhile are
    /// skipped when they come up.
    order: VecDeque<(Instant, bool, CallId)>,
}

/// The pairing store and the edge rules.
pub struct Pairing {
    waiters: Mutex<Waiters>,
    window: Duration,
    max_waiting: usize,
    metrics: Arc<Metrics>,
}

impl Pairing {
    pub fn new(window: Duration, max_waiting: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            waiters: Mutex::new(Waiters::default()),
            window,
            max_waiting: max_waiting.max(1),
            metrics,
        }
    }

    /// The edges `spans` make now; the sides still waiting for their other half are kept.
    pub fn edges(&self, spans: &[Span]) -> EdgeAggregates {
        let mut edges = EdgeAggregates::default();
        let now = Instant::now();
        let mut waiters = self.waiters.lock().expect("pairing lock");
        let mut paired = 0u64;
        for span in spans {
            let trace = u128::from_be_bytes(span.trace_id);
            let error = span.status == SpanStatus::Error;
            match span.kind {
                SpanKind::Server => {
                    let caller = span
                        .attributes
                        .iter()
                        .find(|(k, _)| k == "sightline.caller.service")
                        .map(|(_, v)| v.as_str())
                        .filter(|v| !v.is_empty());
                    if span.parent_span_id == 0 {
                        edges.record(edge(span, USER, NodeType::User, ""), span.duration_ns, error);
                        continue;
                    }
                    let id = (trace, span.parent_span_id);
                    match (waiters.clients.remove(&id), caller) {
                        (Some(client), _) => {
                            paired += 1;
                            edges.record(
                                edge(span, &client.service, NodeType::Service, &client.version),
                                span.duration_ns,
                                error,
                            );
                        }
                        (None, Some(caller)) => {
                            edges.record(edge(span, caller, NodeType::Service, ""), span.duration_ns, error);
                            waiters.wait(false, id, waiting(span, now, true));
                        }
                        (None, None) => waiters.wait(false, id, waiting(span, now, false)),
                    }
                }
                SpanKind::Consumer if !span.peer.is_empty() => {
                    edges.record(edge(span, &span.peer, NodeType::Mq, ""), span.duration_ns, error);
                }
                SpanKind::Client | SpanKind::Producer => {
                    if let Some(node) = NodeType::of_component(&span.component) {
                        let callee = if span.peer.is_empty() {
                            &span.component
                        } else {
                            &span.peer
                        };
                        edges.record(virtual_edge(span, callee, node), span.duration_ns, error);
                        continue;
                    }
                    let id = (trace, span.span_id);
                    match waiters.servers.remove(&id) {
                        Some(server) if server.counted => paired += 1,
                        Some(server) => {
                            paired += 1;
                            let key = EdgeKey {
                                minute: minute_of(server.start_ns),
                                caller: span.service.clone(),
                                caller_type: NodeType::Service,
                                callee: server.service,
                                callee_type: NodeType::Service,
                                bt: if server.bt.is_empty() {
                                    span.bt.clone()
                                } else {
                                    server.bt
                                },
                                caller_version: span.service_version.clone(),
                                callee_version: server.version,
                            };
                            edges.record(key, server.duration_ns, server.error);
                        }
                        None => waiters.wait(true, id, waiting(span, now, false)),
                    }
                }
                _ => {}
            }
        }
        // Past the cap the oldest go now, whatever their age.
        let mut expired = 0;
        while waiters.clients.len() + waiters.servers.len() > self.max_waiting {
            expired += waiters.expire_oldest(&mut edges);
        }
        self.account(&waiters, paired, expired);
        edges
    }

    /// Ends the wait of every side older than the window: client spans become edges to
    /// external nodes, server spans are counted as expired.
    pub fn sweep(&self) -> EdgeAggregates {
        let mut edges = EdgeAggregates::default();
        let mut waiters = self.waiters.lock().expect("pairing lock");
        let mut expired = 0;
        while waiters
            .order
            .front()
            .is_some_and(|(since, _, _)| since.elapsed() >= self.window)
        {
            expired += waiters.expire_oldest(&mut edges);
        }
        self.account(&waiters, 0, expired);
        edges
    }

    fn account(&self, waiters: &Waiters, paired: u64, expired: u64) {
        let m = &self.metrics;
        m.edge_pairs_paired.inc_by(paired);
        m.edge_pairs_expired.inc_by(expired);
        m.edge_pairing_waiting
            .set((waiters.clients.len() + waiters.servers.len()) as i64);
        let (paired, expired) = (m.edge_pairs_paired.get(), m.edge_pairs_expired.get());
        if paired + expired > 0 {
            m.edge_completeness.set(paired as f64 / (paired + expired) as f64);
        }
    }
}

impl Waiters {
    fn wait(&mut self, client: bool, id: CallId, waiting: Waiting) {
        self.order.push_back((waiting.since, client, id));
        if client {
            self.clients.insert(id, waiting);
        } else {
            self.servers.insert(id, waiting);
        }
    }

    /// Expires the oldest waiting side; returns 1 if it counts as an unpaired call.
    fn expire_oldest(&mut self, edges: &mut EdgeAggregates) -> u64 {
        let Some((since, client, id)) = self.order.pop_front() else {
            return 0;
        };
        let map = if client { &mut self.clients } else { &mut self.servers };
        // Paired (or replaced) since it queued: nothing to expire.
        if map.get(&id).is_none_or(|w| w.since != since) {
            return 0;
        }
        let waiting = map.remove(&id).expect("checked");
        if waiting.counted {
            return 0;
        }
        if client && !waiting.peer.is_empty() {
            let key = EdgeKey {
                minute: minute_of(waiting.start_ns),
                caller: waiting.service,
                caller_type: NodeType::Service,
                callee: waiting.peer,
                callee_type: NodeType::External,
                bt: waiting.bt,
                caller_version: waiting.version,
                callee_version: String::new(),
            };
            edges.record(key, waiting.duration_ns, waiting.error);
        }
        1
    }
}

fn waiting(span: &Span, since: Instant, counted: bool) -> Waiting {
    Waiting {
        since,
        service: span.service.clone(),
        version: span.service_version.clone(),
        bt: span.bt.clone(),
        peer: span.peer.clone(),
        start_ns: span.start_ns,
        duration_ns: span.duration_ns,
        error: span.status == SpanStatus::Error,
        counted,
    }
}

/// An edge into `span`'s service.
fn edge(span: &Span, caller: &str, caller_type: NodeType, caller_version: &str) -> EdgeKey {
    EdgeKey {
        minute: minute_of(span.start_ns),
        caller: caller.to_string(),
        caller_type,
        callee: span.service.clone(),
        callee_type: NodeType::Service,
        bt: span.bt.clone(),
        caller_version: caller_version.to_string(),
        callee_version: span.service_version.clone(),
    }
}

/// An edge from `span`'s service to a node that sends no spans.
fn virtual_edge(span: &Span, callee: &str, callee_type: NodeType) -> EdgeKey {
    EdgeKey {
        minute: minute_of(span.start_ns),
        caller: span.service.clone(),
        caller_type: NodeType::Service,
        callee: callee.to_string(),
        callee_type,
        bt: span.bt.clone(),
        caller_version: span.service_version.clone(),
        callee_version: String::new(),
    }
}
