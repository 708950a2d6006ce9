//! `GET /api/v1/topology`: nodes and edges over a window, read from the per-minute edge
//! aggregates only (never raw spans), with calls, errors, error rate and p50/p99 from the summed
//! histograms. A node's figures are those of the calls into it.
//!
//! Health is judged at the window's end, whatever its length: each of the last
//! [`JUDGED_MINUTES`] minutes with enough calls is compared with the same node's or edge's
//! previous hour ([`BASELINE_MINUTES`] before the last [`RECENT_MINUTES`]); the state is the
//! latest judged minute's, and `health_since` the first minute of its current run (absent when
//! the state held over every judged minute). Without a baseline, absolute error rates decide.

use std::collections::BTreeMap;

use clickhouse::{query::Query, Row};
use serde::{Deserialize, Serialize};

use super::{p50_p99_ms, Queries, Window};

/// Minutes at the end of the window whose state is judged (and where `health_since` can fall).
pub const JUDGED_MINUTES: u32 = 15;
/// The recent minutes kept out of the baseline, so that a change does not raise its own bar.
pub const RECENT_MINUTES: u32 = 5;
/// The baseline: this many minutes before the recent ones.
pub const BASELINE_MINUTES: u32 = 60;
/// Calls a minute needs to be judged; a baseline needs four times as many.
const MIN_CALLS: u64 = 5;

/// ok, warn or critical, and since when (Unix ms of the minute it turned).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Health {
    #[serde(rename = "health")]
    pub state: HealthState,
    #[serde(rename = "health_since")]
    pub since: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    Ok,
    Warn,
    Critical,
}

/// One minute of calls.
#[derive(Debug, Clone, Default)]
struct Minute {
    calls: u64,
    errors: u64,
    sparse: Sparse,
}

impl Minute {
    fn add(&mut self, calls: u64, errors: u64, sparse: &Sparse) {
        self.calls += calls;
        self.errors += errors;
        for (bucket, count) in sparse {
            *self.sparse.entry(*bucket).or_insert(0) += count;
        }
    }

    fn error_rate(&self) -> f64 {
        self.errors as f64 / self.calls.max(1) as f64
    }

    fn p99_ms(&self) -> f64 {
        traffic(self.calls, self.errors, &self.sparse).p99_ms
    }
}

/// A minute's state against the baseline (if it has enough calls to be one).
fn classify(minute: &Minute, baseline: Option<&Minute>) -> HealthState {
    let err = minute.error_rate();
    let Some(base) = baseline else {
        return if err >= 0.10 {
            HealthState::Critical
        } else if err >= 0.02 {
            HealthState::Warn
        } else {
            HealthState::Ok
        };
    };
    let (base_err, base_p99, p99) = (base.error_rate(), base.p99_ms(), minute.p99_ms());
    let errors_up = |points: f64, factor: f64| err >= base_err + points && err >= base_err * factor;
    let slower = |factor: f64, floor_ms: f64| p99 >= base_p99 * factor && p99 - base_p99 >= floor_ms;
    if errors_up(0.05, 2.0) || slower(3.0, 20.0) {
        HealthState::Critical
    } else if errors_up(0.01, 1.5) || slower(1.5, 10.0) {
        HealthState::Warn
    } else {
        HealthState::Ok
    }
}

/// Health from per-minute series (minute start, Unix seconds) ending at `last_minute`.
fn judge(series: &BTreeMap<u32, Minute>, last_minute: u32) -> Health {
    let recent_from = last_minute.saturating_sub((RECENT_MINUTES - 1) * 60);
    let baseline_from = recent_from.saturating_sub(BASELINE_MINUTES * 60);
    let mut baseline = Minute::default();
    for (_, m) in series.range(baseline_from..recent_from) {
        baseline.add(m.calls, m.errors, &m.sparse);
    }
    let baseline = (baseline.calls >= 4 * MIN_CALLS).then_some(&baseline);
    let judged_from = last_minute.saturating_sub((JUDGED_MINUTES - 1) * 60);
    let states: Vec<(u32, HealthState)> = series
        .range(judged_from..=last_minute)
        .filter(|(_, m)| m.calls >= MIN_CALLS)
        .map(|(minute, m)| (*minute, classify(m, baseline)))
        .collect();
    let Some(&(_, state)) = states.last() else {
        return Health {
            state: HealthState::Ok,
            since: None,
        };
    };
    let run = states.iter().rev().take_while(|(_, s)| *s == state).count();
    let since = (run < states.len()).then(|| u64::from(states[states.len() - run].0) * 1000);
    Health { state, since }
}

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
    #[serde(flatten)]
    pub health: Health,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EdgeView {
    pub caller: String,
    pub caller_type: String,
    pub callee: String,
    pub callee_type: String,
    #[serde(flatten)]
    pub traffic: Traffic,
    #[serde(flatten)]
    pub health: Health,
    /// The business transactions whose calls took this edge (what clicking it filters to).
    pub bts: Vec<String>,
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
    bts: Vec<String>,
}

const TOPOLOGY_SQL: &str = "SELECT caller, toString(caller_type) AS caller_type, callee,
  toString(callee_type) AS callee_type, sum(calls) AS calls, sum(errors) AS errors,
  (sumMap(histMap.bucket, histMap.count) AS h).1 AS buckets, h.2 AS counts,
  arraySort(groupUniqArray(bt)) AS bts
FROM edges_1m
WHERE minute >= toDateTime(?) AND minute < toDateTime(?)
  AND (? = '' OR bt = ?)
  AND (? = '' OR caller_version = ? OR callee_version = ?)
GROUP BY caller, caller_type, callee, callee_type
ORDER BY caller, callee";

#[derive(Debug, Row, Deserialize)]
struct EdgeMinuteRecord {
    minute: u32,
    caller: String,
    caller_type: String,
    callee: String,
    callee_type: String,
    calls: u64,
    errors: u64,
    buckets: Vec<u64>,
    counts: Vec<u64>,
}

/// Per-minute edge traffic over the hour and more that health is judged on.
const HEALTH_SQL: &str = "SELECT toUInt32(minute) AS minute, caller, toString(caller_type) AS caller_type,
  callee, toString(callee_type) AS callee_type, sum(calls) AS calls, sum(errors) AS errors,
  (sumMap(histMap.bucket, histMap.count) AS h).1 AS buckets, h.2 AS counts
FROM edges_1m
WHERE minute >= toDateTime(?) AND minute < toDateTime(?)
  AND (? = '' OR bt = ?)
  AND (? = '' OR caller_version = ? OR callee_version = ?)
GROUP BY minute, caller, caller_type, callee, callee_type";

type EdgeId = (String, String, String, String);
type NodeId = (String, String);

/// Sparse histogram pairs summed across edges.
type Sparse = BTreeMap<u64, u64>;

fn traffic(calls: u64, errors: u64, sparse: &Sparse) -> Traffic {
    let (p50_ms, p99_ms) = p50_p99_ms(sparse.iter().map(|(b, c)| (*b, *c)));
    Traffic {
        calls,
        errors,
        error_rate: if calls == 0 { 0.0 } else { errors as f64 / calls as f64 },
        p50_ms,
        p99_ms,
    }
}

impl Queries {
    pub async fn topology(&self, window: Window, filter: &TopologyFilter) -> clickhouse::error::Result<Topology> {
        // Two independent reads: asked together, the answer costs the slower of the two.
        let (records, minutes): (Vec<EdgeRecord>, Vec<EdgeMinuteRecord>) = tokio::try_join!(
            self.topology_query(window, filter).fetch_all(),
            self.health_query(window, filter).fetch_all()
        )?;
        let last_minute = ((window.to_us.saturating_sub(1)) / 1_000_000 / 60 * 60) as u32;
        let mut edge_series: BTreeMap<EdgeId, BTreeMap<u32, Minute>> = BTreeMap::new();
        let mut node_series: BTreeMap<NodeId, BTreeMap<u32, Minute>> = BTreeMap::new();
        for m in minutes {
            let sparse: Sparse = m.buckets.iter().copied().zip(m.counts.iter().copied()).collect();
            node_series
                .entry((m.callee.clone(), m.callee_type.clone()))
                .or_default()
                .entry(m.minute)
                .or_default()
                .add(m.calls, m.errors, &sparse);
            edge_series
                .entry((m.caller, m.caller_type, m.callee, m.callee_type))
                .or_default()
                .entry(m.minute)
                .or_default()
                .add(m.calls, m.errors, &sparse);
        }
        let no_series = BTreeMap::new();
        let edge_health = |id: &EdgeId| judge(edge_series.get(id).unwrap_or(&no_series), last_minute);
        let node_health = |id: &NodeId| judge(node_series.get(id).unwrap_or(&no_series), last_minute);
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
            let id = (r.caller, r.caller_type, r.callee, r.callee_type);
            let health = edge_health(&id);
            let (caller, caller_type, callee, callee_type) = id;
            edges.push(EdgeView {
                traffic: traffic(r.calls, r.errors, &sparse),
                health,
                bts: r.bts,
                caller,
                caller_type,
                callee,
                callee_type,
            });
        }
        let nodes = nodes
            .into_iter()
            .map(|((name, node_type), (calls, errors, sparse))| {
                let health = node_health(&(name.clone(), node_type.clone()));
                NodeView {
                    name,
                    node_type,
                    traffic: traffic(calls, errors, &sparse),
                    health,
                }
            })
            .collect();
        Ok(Topology { nodes, edges })
    }

    /// Per-minute rows from the baseline's start to the window's end.
    pub fn health_query(&self, window: Window, filter: &TopologyFilter) -> Query {
        let last_minute = window.to_us.saturating_sub(1) / 1_000_000 / 60 * 60;
        let span = u64::from(RECENT_MINUTES + BASELINE_MINUTES) * 60;
        filtered(
            self.client.query(HEALTH_SQL),
            last_minute.saturating_sub(span),
            window,
            filter,
        )
    }

    pub fn topology_query(&self, window: Window, filter: &TopologyFilter) -> Query {
        filtered(
            self.client.query(TOPOLOGY_SQL),
            window.from_us / 1_000_000 / 60 * 60,
            window,
            filter,
        )
    }
}

/// Binds the time range (from `from_s` to the window's end) and the filters, in the order both
/// queries' WHERE clauses take them.
fn filtered(query: Query, from_s: u64, window: Window, filter: &TopologyFilter) -> Query {
    let bt = filter.bt.as_deref().unwrap_or("");
    let version = filter.version.as_deref().unwrap_or("");
    query
        .bind(from_s)
        .bind(window.to_us.div_ceil(1_000_000))
        .bind(bt)
        .bind(bt)
        .bind(version)
        .bind(version)
        .bind(version)
}

#[cfg(test)]
mod tests {
    use sightline_proto::histogram;

    use super::*;

    const NOW: u32 = 1_700_000_040 / 60 * 60;

    /// 20 calls a minute from an hour ago to now; the last minutes from `turned` on as `late`.
    fn series(turned: u32, late: (u64, u64)) -> BTreeMap<u32, Minute> {
        (0..=70)
            .map(|k| {
                let minute = NOW - k * 60;
                let (micros, errors) = if minute >= turned { late } else { (5_000, 0) };
                let mut m = Minute::default();
                m.add(20, errors, &Sparse::from([(histogram::bucket_of(micros), 20)]));
                (minute, m)
            })
            .collect()
    }

    #[test]
    fn a_slow_and_failing_dependency_is_critical_since_the_minute_it_turned() {
        let turned = NOW - 2 * 60;
        let health = judge(&series(turned, (300_000, 8)), NOW);
        assert_eq!(health.state, HealthState::Critical);
        assert_eq!(health.since, Some(u64::from(turned) * 1000));
    }

    #[test]
    fn mild_changes_warn_and_steady_traffic_is_ok_throughout() {
        // p99 5 ms -> 20 ms: 4x but only +15 ms: above the warning floor, under the critical one.
        let health = judge(&series(NOW - 60, (20_000, 0)), NOW);
        assert_eq!(health.state, HealthState::Warn);
        assert_eq!(health.since, Some(u64::from(NOW - 60) * 1000));
        let steady = judge(&series(NOW + 60, (0, 0)), NOW);
        assert_eq!(
            steady,
            Health {
                state: HealthState::Ok,
                since: None
            }
        );
    }

    #[test]
    fn recovery_is_ok_since_it_came_back_and_new_nodes_use_absolute_error_rates() {
        let mut s = series(NOW - 5 * 60, (300_000, 10));
        for k in 0..2 {
            s.insert(NOW - k * 60, series(NOW + 60, (0, 0))[&NOW].clone());
        }
        assert_eq!(
            judge(&s, NOW),
            Health {
                state: HealthState::Ok,
                since: Some(u64::from(NOW - 60) * 1000)
            }
        );
        // Only three minutes of history: no baseline; 3 errors in 20 calls is 15%.
        let young: BTreeMap<u32, Minute> = series(NOW - 60, (5_000, 3))
            .into_iter()
            .filter(|(m, _)| *m > NOW - 180)
            .collect();
        assert_eq!(judge(&young, NOW).state, HealthState::Critical);
    }
}
