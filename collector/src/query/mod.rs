//! Read queries behind the HTTP API. Every value a user sends is bound with `?` (escaped by the
//! client), never spliced into SQL text.

pub mod alerts;
mod compare;
mod topology;
mod transactions;

use std::collections::HashMap;

use clickhouse::{query::Query, Client, Row};
use serde::{Deserialize, Serialize};

pub use compare::CompareScope;
pub use topology::{EdgeView, HealthState, NodeView, Topology, TopologyFilter, Traffic};
pub use transactions::{StageView, TransactionView};

/// The API's time window: [from, to) in Unix microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from_us: u64,
    pub to_us: u64,
}

/// Most spans one trace request returns.
pub const MAX_TRACE_SPANS: u64 = 20_000;

#[derive(Clone)]
pub struct Queries {
    client: Client,
    silent_after_secs: u32,
}

/// One span as the API serves it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SpanView {
    pub trace_id: String,
    pub span_id: String,
    /// Absent for a root span.
    pub parent_span_id: Option<String>,
    /// Distance from the trace's root in the waterfall (0 for roots and orphans).
    pub depth: u32,
    pub service: String,
    pub service_version: String,
    pub instance: String,
    pub operation: String,
    pub kind: String,
    pub component: String,
    pub peer: String,
    pub bt: String,
    pub start_us: u64,
    pub duration_us: u64,
    pub status: String,
    pub error_type: String,
    pub error_message: String,
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Row, Deserialize)]
struct SpanRecord {
    span_id: u64,
    parent_span_id: u64,
    service: String,
    service_version: String,
    instance: String,
    operation: String,
    kind: String,
    component: String,
    peer: String,
    bt: String,
    start_us: u64,
    duration_us: u64,
    status: String,
    error_type: String,
    error_message: String,
    attribute_keys: Vec<String>,
    attribute_values: Vec<String>,
}

#[derive(Debug, Row, Deserialize)]
struct TraceIndexRecord {
    first_start_us: u64,
    last_end_us: u64,
    services: Vec<String>,
    entries: u64,
}

/// A trace search hit: the longest matching span of one trace.
#[derive(Debug, Clone, Row, Deserialize, Serialize, PartialEq)]
pub struct TraceSummary {
    pub trace_id: String,
    pub service: String,
    pub operation: String,
    pub bt: String,
    pub start_us: u64,
    pub duration_us: u64,
    /// Spans of the trace that matched the filters.
    pub matched_spans: u64,
    pub error_spans: u64,
}

#[derive(Debug, Default, Clone)]
pub struct TraceFilter {
    pub service: Option<String>,
    pub bt: Option<String>,
    pub min_duration_us: Option<u64>,
    pub error: Option<bool>,
    pub limit: u64,
}

#[derive(Debug, Row, Deserialize)]
struct InstanceRecord {
    service: String,
    service_version: String,
    instance: String,
    first_seen: u32,
    last_seen: u32,
    spans: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServiceView {
    pub name: String,
    pub last_seen: u32,
    pub versions: Vec<VersionView>,
    pub instances: Vec<InstanceView>,
    /// Native agents of the service, by their heartbeats.
    pub agents: Vec<AgentView>,
    /// Transactions open past their agent's threshold now: work that is stuck before it ends.
    pub stuck: Vec<StuckView>,
}

/// An agent's last heartbeat. `status` is `silent` after three missed heartbeats.
#[derive(Debug, Clone, Row, Deserialize, Serialize, PartialEq)]
pub struct AgentView {
    #[serde(skip_serializing)]
    pub service: String,
    pub instance: String,
    pub version: String,
    pub last_heartbeat: u32,
    pub dropped_spans: u64,
    pub queue_depth: u64,
    #[serde(skip_deserializing)]
    pub status: &'static str,
}

/// A transaction an agent reported open past its threshold in the last few seconds.
#[derive(Debug, Clone, Row, Deserialize, Serialize, PartialEq)]
pub struct StuckView {
    #[serde(skip_serializing)]
    pub service: String,
    pub instance: String,
    pub span_id: u64,
    pub bt: String,
    pub operation: String,
    pub trace_id: String,
    pub start_us: u64,
    /// The call it is inside (operation, peer); empty when unknown.
    pub current_operation: String,
    pub current_peer: String,
    pub last_seen: u32,
    #[serde(skip_deserializing)]
    pub elapsed_ms: u64,
}

/// Heartbeats older than this mark an agent silent (three missed at the default 10 s); the
/// collector's `agents.silent_after_secs`.
pub const SILENT_AFTER_SECS: u32 = 30;
/// Snapshots newer than this count as "stuck now".
pub const STUCK_FRESH_SECS: u64 = 5;

pub const AGENTS_SQL: &str = "SELECT service, instance, argMax(service_version, time) AS agent_version,
  toUInt32(max(time)) AS last_heartbeat, argMax(dropped_spans, time) AS agent_dropped,
  argMax(queue_depth, time) AS agent_queue
FROM agent_heartbeats
WHERE time >= toDateTime(?) AND time < toDateTime(?)
GROUP BY service, instance
ORDER BY service, instance";

pub const STUCK_SQL: &str = "SELECT service, instance, span_id, argMax(bt, snapshot_time) AS stuck_bt,
  argMax(operation, snapshot_time) AS stuck_operation, lower(hex(argMax(trace_id, snapshot_time))) AS stuck_trace,
  min(start_us) AS stuck_start_us, argMax(current_operation, snapshot_time) AS stuck_call,
  argMax(current_peer, snapshot_time) AS stuck_peer, toUInt32(max(snapshot_time)) AS stuck_seen
FROM inflight
WHERE snapshot_time >= toDateTime(?)
GROUP BY service, instance, span_id
ORDER BY stuck_start_us";

/// A version of a service; `first_seen` (Unix seconds, minute resolution) is its deployment
/// marker.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VersionView {
    pub version: String,
    pub first_seen: u32,
    pub last_seen: u32,
    pub spans: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InstanceView {
    pub instance: String,
    pub version: String,
    pub first_seen: u32,
    pub last_seen: u32,
}

pub const TRACE_INDEX_SQL: &str = "SELECT min(first_start_us) AS first_start_us, max(last_end_us) AS last_end_us,
  groupUniqArrayArray(services) AS services, count() AS entries
FROM trace_index WHERE trace_id = unhex(?)";

/// `{services}` is replaced by one `?` per service of the trace.
pub const TRACE_SPANS_SQL: &str = "SELECT span_id, parent_span_id, service, service_version, instance, operation,
  toString(kind) AS kind, component, peer, bt, start_us, duration_us, toString(status) AS status,
  error_type, error_message, attributes.key AS attribute_keys, attributes.value AS attribute_values
FROM spans
WHERE service IN ({services}) AND start_us >= ? AND start_us <= ? AND trace_id = unhex(?)
ORDER BY start_us
LIMIT ?";

/// `{filters}` is replaced by the filter clauses in use, each with its `?`.
/// `{filters}` is replaced by the filter clauses in use, each with its `?`. Aliases differ from
/// column names on purpose: ClickHouse would otherwise read the aggregates into WHERE.
pub const SEARCH_SQL: &str = "SELECT lower(hex(trace_id)) AS hit_trace_id,
  argMax(service, duration_us) AS hit_service, argMax(operation, duration_us) AS hit_operation,
  argMax(bt, duration_us) AS hit_bt, min(start_us) AS hit_start_us, max(duration_us) AS hit_duration_us,
  count() AS matched_spans, countIf(status = 'error') AS error_spans
FROM spans
WHERE start_us >= ? AND start_us < ?{filters}
GROUP BY trace_id
ORDER BY hit_start_us DESC
LIMIT ?";

pub const SERVICES_SQL: &str = "SELECT service, service_version, instance,
  toUInt32(min(minute)) AS first_seen, toUInt32(max(minute)) AS last_seen, sum(spans) AS span_count
FROM service_instances
GROUP BY service, service_version, instance
HAVING max(minute) >= toDateTime(?) AND min(minute) < toDateTime(?)
ORDER BY service, service_version, instance";

impl Queries {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            silent_after_secs: SILENT_AFTER_SECS,
        }
    }

    /// Agents whose last heartbeat is older than this are reported silent.
    pub fn silent_after(mut self, secs: u32) -> Self {
        self.silent_after_secs = secs;
        self
    }

    pub fn silent_after_secs(&self) -> u32 {
        self.silent_after_secs
    }

    /// Every span of a trace, parents before children (a waterfall's order). `None` when the
    /// trace is unknown.
    pub async fn trace(&self, trace_id_hex: &str) -> clickhouse::error::Result<Option<Vec<SpanView>>> {
        let index: TraceIndexRecord = self
            .client
            .query(TRACE_INDEX_SQL)
            .bind(trace_id_hex)
            .fetch_one()
            .await?;
        if index.entries == 0 || index.services.is_empty() {
            return Ok(None);
        }
        let placeholders = vec!["?"; index.services.len()].join(", ");
        let mut query = self.client.query(&TRACE_SPANS_SQL.replace("{services}", &placeholders));
        for service in &index.services {
            query = query.bind(service);
        }
        let records: Vec<SpanRecord> = query
            .bind(index.first_start_us)
            .bind(index.last_end_us)
            .bind(trace_id_hex)
            .bind(MAX_TRACE_SPANS)
            .fetch_all()
            .await?;
        if records.is_empty() {
            return Ok(None);
        }
        Ok(Some(waterfall(trace_id_hex, records)))
    }

    pub async fn search(&self, window: Window, filter: &TraceFilter) -> clickhouse::error::Result<Vec<TraceSummary>> {
        self.search_query(window, filter).fetch_all().await
    }

    /// Services seen in the window, with every version's first and last minute ever seen.
    pub async fn services(&self, window: Window) -> clickhouse::error::Result<Vec<ServiceView>> {
        let records: Vec<InstanceRecord> = self.services_query(window).fetch_all().await?;
        let mut services: Vec<ServiceView> = Vec::new();
        for r in records {
            if services.last().is_none_or(|s| s.name != r.service) {
                services.push(ServiceView::new(r.service.clone()));
            }
            let service = services.last_mut().expect("pushed above");
            service.last_seen = service.last_seen.max(r.last_seen);
            match service.versions.iter_mut().find(|v| v.version == r.service_version) {
                Some(v) => {
                    v.first_seen = v.first_seen.min(r.first_seen);
                    v.last_seen = v.last_seen.max(r.last_seen);
                    v.spans += r.spans;
                }
                None => service.versions.push(VersionView {
                    version: r.service_version.clone(),
                    first_seen: r.first_seen,
                    last_seen: r.last_seen,
                    spans: r.spans,
                }),
            }
            service.instances.push(InstanceView {
                instance: r.instance,
                version: r.service_version,
                first_seen: r.first_seen,
                last_seen: r.last_seen,
            });
        }
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let now_s = now_us / 1_000_000;
        let agents: Vec<AgentView> = self.agents_query(window).fetch_all().await?;
        let stuck: Vec<StuckView> = self.stuck_query(now_s).fetch_all().await?;
        for mut agent in agents {
            let silent = u64::from(agent.last_heartbeat) + u64::from(self.silent_after_secs) < now_s;
            agent.status = if silent { "silent" } else { "ok" };
            service_entry(&mut services, &agent.service).agents.push(agent);
        }
        for mut transaction in stuck {
            transaction.elapsed_ms = now_us.saturating_sub(transaction.start_us) / 1000;
            service_entry(&mut services, &transaction.service)
                .stuck
                .push(transaction);
        }
        for service in &mut services {
            service.versions.sort_by_key(|v| v.first_seen);
        }
        Ok(services)
    }

    pub fn agents_query(&self, window: Window) -> Query {
        self.client
            .query(AGENTS_SQL)
            .bind(window.from_us / 1_000_000)
            .bind(window.to_us.div_ceil(1_000_000))
    }

    pub fn stuck_query(&self, now_s: u64) -> Query {
        self.client
            .query(STUCK_SQL)
            .bind(now_s.saturating_sub(STUCK_FRESH_SECS))
    }

    pub async fn ping(&self) -> clickhouse::error::Result<()> {
        self.client.query("SELECT 1").execute().await
    }

    // The statements, built apart from running them so they can be checked on other servers
    // (tests run each on a current ClickHouse, see tests/modern_clickhouse.rs).

    pub fn trace_index_query(&self, trace_id_hex: &str) -> Query {
        self.client.query(TRACE_INDEX_SQL).bind(trace_id_hex)
    }

    pub fn trace_spans_query(&self, trace_id_hex: &str, services: &[String], from_us: u64, to_us: u64) -> Query {
        let placeholders = vec!["?"; services.len().max(1)].join(", ");
        let mut query = self.client.query(&TRACE_SPANS_SQL.replace("{services}", &placeholders));
        for service in services {
            query = query.bind(service);
        }
        if services.is_empty() {
            query = query.bind("");
        }
        query.bind(from_us).bind(to_us).bind(trace_id_hex).bind(MAX_TRACE_SPANS)
    }

    pub fn search_query(&self, window: Window, filter: &TraceFilter) -> Query {
        let mut filters = String::new();
        if filter.service.is_some() {
            filters.push_str(" AND service = ?");
        }
        if filter.bt.is_some() {
            filters.push_str(" AND bt = ?");
        }
        if filter.min_duration_us.is_some() {
            filters.push_str(" AND duration_us >= ?");
        }
        match filter.error {
            Some(true) => filters.push_str(" AND status = 'error'"),
            Some(false) => filters.push_str(" AND status != 'error'"),
            None => {}
        }
        let mut query = self
            .client
            .query(&SEARCH_SQL.replace("{filters}", &filters))
            .bind(window.from_us)
            .bind(window.to_us);
        if let Some(service) = &filter.service {
            query = query.bind(service);
        }
        if let Some(bt) = &filter.bt {
            query = query.bind(bt);
        }
        if let Some(min) = filter.min_duration_us {
            query = query.bind(min);
        }
        query.bind(filter.limit)
    }

    pub fn services_query(&self, window: Window) -> Query {
        self.client
            .query(SERVICES_SQL)
            .bind(window.from_us / 1_000_000)
            .bind(window.to_us.div_ceil(1_000_000))
    }
}

/// Orders spans depth-first from the roots, children by start time, and sets their depth.
/// Spans whose parent is missing (not yet arrived, or dropped) are shown as roots.
fn waterfall(trace_id: &str, mut records: Vec<SpanRecord>) -> Vec<SpanView> {
    records.sort_by_key(|r| (r.start_us, r.span_id));
    let ids: HashMap<u64, usize> = records.iter().enumerate().map(|(i, r)| (r.span_id, i)).collect();
    let mut children: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if r.parent_span_id != 0 && r.parent_span_id != r.span_id && ids.contains_key(&r.parent_span_id) {
            children.entry(r.parent_span_id).or_default().push(i);
        } else {
            roots.push(i);
        }
    }
    let mut order: Vec<(usize, u32)> = Vec::with_capacity(records.len());
    let mut seen = vec![false; records.len()];
    let mut stack: Vec<(usize, u32)> = roots.into_iter().rev().map(|i| (i, 0)).collect();
    while let Some((i, depth)) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        order.push((i, depth));
        if let Some(kids) = children.get(&records[i].span_id) {
            stack.extend(kids.iter().rev().map(|&k| (k, depth + 1)));
        }
    }
    // Spans caught in a parent cycle were never reached from a root: append them as roots.
    order.extend((0..records.len()).filter(|&i| !seen[i]).map(|i| (i, 0)));

    let mut slots: Vec<Option<SpanRecord>> = records.into_iter().map(Some).collect();
    order
        .into_iter()
        .map(|(i, depth)| {
            let r = slots[i].take().expect("each span placed once");
            SpanView {
                trace_id: trace_id.to_ascii_lowercase(),
                span_id: crate::model::span_id_hex(r.span_id),
                parent_span_id: (r.parent_span_id != 0).then(|| crate::model::span_id_hex(r.parent_span_id)),
                depth,
                service: r.service,
                service_version: r.service_version,
                instance: r.instance,
                operation: r.operation,
                kind: r.kind,
                component: r.component,
                peer: r.peer,
                bt: r.bt,
                start_us: r.start_us,
                duration_us: r.duration_us,
                status: r.status,
                error_type: r.error_type,
                error_message: r.error_message,
                attributes: r
                    .attribute_keys
                    .into_iter()
                    .zip(r.attribute_values)
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect(),
            }
        })
        .collect()
}

impl ServiceView {
    fn new(name: String) -> Self {
        Self {
            name,
            last_seen: 0,
            versions: vec![],
            instances: vec![],
            agents: vec![],
            stuck: vec![],
        }
    }
}

/// The service's entry, added (in name order) when only agents or snapshots know it yet.
fn service_entry<'a>(services: &'a mut Vec<ServiceView>, name: &str) -> &'a mut ServiceView {
    let i = match services.binary_search_by(|s| s.name.as_str().cmp(name)) {
        Ok(i) => i,
        Err(i) => {
            services.insert(i, ServiceView::new(name.to_string()));
            i
        }
    };
    &mut services[i]
}

/// p50 and p99 in ms of a latency histogram's sparse (µs bucket, count) pairs; 0 when empty.
pub(crate) fn p50_p99_ms(pairs: impl IntoIterator<Item = (u64, u64)>) -> (f64, f64) {
    let [p50, p99] = sightline_proto::histogram::sparse_quantiles(pairs, [0.5, 0.99]).unwrap_or([0, 0]);
    (p50 as f64 / 1000.0, p99 as f64 / 1000.0)
}
