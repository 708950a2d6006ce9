//! `GET /api/v1/topology`: nodes and edges over a window, read from the per-minute edge
//! aggregates only (never raw spans), with calls, errors, error rate and p50/p99 from the summed
//! histograms. A node's figures are those of the calls into it.

use std::collections::BTreeMap;

use clickhouse::{query::Query, Row};
use serde::{Deserialize, Serialize};
use sightline_proto::histogram;

use super::{Queries, Window};

/// Narrows the topology.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopologyFilter {
    /// Only this business transaction's calls.
    pub bt: Option<String>,
    /// Only calls made by or to this version of a service.
    pub version: Option<String>,
}

/// Calls, errors and latency of an edge or of the calls into a node.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Traffic {
    pub calls: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeView {
    pub name: String,
    /// service | database | cache | mq | external | user
    #[serde(rename = "type")]
    pub node_type: String,
    #[serde(flatten)]
    pub traffic: Traffic,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EdgeView {
    pub caller: String,
    pub caller_type: String,
    pub callee: String,
    pub callee_type: String,
    #[serde(flatten)]
    pub traffic: Traffic,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Topology {
    pub nodes: Vec<NodeView>,
    pub edges: Vec<EdgeView>,
}

#[derive(Debug, Row, Deserialize)]
struct EdgeRecord {
    caller: String,
    caller_type: String,
    callee: String,
    callee_type: String,
    calls: u64,
    errors: u64,
    buckets: Vec<u64>,
    counts: Vec<u64>,
}

const TOPOLOGY_SQL: &str = "SELECT caller, toString(caller_type) AS caller_type, callee,
  toString(callee_type) AS callee_type, sum(calls) AS calls, sum(errors) AS errors,
  (sumMap(histMap.bucket, histMap.count) AS h).1 AS buckets, h.2 AS counts
FROM edges_1m
WHERE minute >= toDateTime(?) AND minute < toDateTime(?)
  AND (? = '' OR bt = ?)
  AND (? = '' OR caller_version = ? OR callee_version = ?)
GROUP BY caller, caller_type, callee, callee_type
ORDER BY caller, callee";

/// Sparse histogram pairs summed across edges.
type Sparse = BTreeMap<u64, u64>;

fn traffic(calls: u64, errors: u64, sparse: &Sparse) -> Traffic {
    let hist = histogram::from_sparse(sparse.iter().map(|(b, c)| (*b, *c)));
    let ms = |q: f64| {
        if hist.is_empty() {
            0.0
        } else {
            hist.value_at_quantile(q) as f64 / 1000.0
        }
    };
    Traffic {
        calls,
        errors,
        error_rate: if calls == 0 { 0.0 } else { errors as f64 / calls as f64 },
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
    }
}

impl Queries {
    pub async fn topology(&self, window: Window, filter: &TopologyFilter) -> clickhouse::error::Result<Topology> {
        let records: Vec<EdgeRecord> = self.topology_query(window, filter).fetch_all().await?;
        // Nodes: every caller and callee; a node's traffic is the sum of the calls into it.
        let mut nodes: BTreeMap<(String, String), (u64, u64, Sparse)> = BTreeMap::new();
        let mut edges = Vec::with_capacity(records.len());
        for r in records {
            let sparse: Sparse = r.buckets.iter().copied().zip(r.counts.iter().copied()).collect();
            nodes.entry((r.caller.clone(), r.caller_type.clone())).or_default();
            let into = nodes.entry((r.callee.clone(), r.callee_type.clone())).or_default();
            into.0 += r.calls;
            into.1 += r.errors;
            for (bucket, count) in &sparse {
                *into.2.entry(*bucket).or_insert(0) += count;
            }
            edges.push(EdgeView {
                traffic: traffic(r.calls, r.errors, &sparse),
                caller: r.caller,
                caller_type: r.caller_type,
                callee: r.callee,
                callee_type: r.callee_type,
            });
        }
        let nodes = nodes
            .into_iter()
            .map(|((name, node_type), (calls, errors, sparse))| NodeView {
                name,
                node_type,
                traffic: traffic(calls, errors, &sparse),
            })
            .collect();
        Ok(Topology { nodes, edges })
    }

    pub fn topology_query(&self, window: Window, filter: &TopologyFilter) -> Query {
        let bt = filter.bt.as_deref().unwrap_or("");
        let version = filter.version.as_deref().unwrap_or("");
        self.client
            .query(TOPOLOGY_SQL)
            .bind(window.from_us / 1_000_000 / 60 * 60)
            .bind(window.to_us.div_ceil(1_000_000))
            .bind(bt)
            .bind(bt)
            .bind(version)
            .bind(version)
            .bind(version)
    }
}
