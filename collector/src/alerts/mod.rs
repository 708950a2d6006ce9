//! Alerts: SLO burn rates, per-BT baselines and the detectors for the incidents Sightline exists
//! for (a login rate that drops, requests stuck on a cache, agents gone silent, a dependency
//! turning critical), evaluated on a schedule from the aggregates ClickHouse holds.
//!
//! Data flows one way: `evaluator` (reads through `crate::query`) -> detectors (`baseline`,
//! `slo`, and the simple ones in `evaluator`) -> `book` (firing / resolved, deduplicated) ->
//! `notify` (webhooks, grouped by service). The API reads the book; nothing writes back.

pub mod baseline;
pub mod book;
pub mod evaluator;
pub mod notify;
pub mod slo;

use serde::{Deserialize, Serialize};

/// How bad an alert is: critical pages someone, a warning is a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Critical,
}

/// A condition a detector sees at one evaluation. The same condition keeps its key from one
/// evaluation to the next; that is what deduplicates it into one alert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub key: String,
    pub service: String,
    /// The BT, SLO, agent instance or edge it is about.
    pub subject: String,
    pub kind: Kind,
    pub severity: Severity,
    /// One line a person reads first: what, how far off, where.
    pub summary: String,
    pub details: serde_json::Value,
}

/// The detector behind a finding. A detector that could not read its data in an evaluation
/// resolves nothing of its kind in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A BT's request rate below its baseline ("nobody can log in").
    RateDrop,
    /// A BT's error rate above its baseline.
    ErrorRate,
    /// A BT's p99 above its baseline.
    Latency,
    /// An SLO's error budget burning fast (both windows of a pair over the rate).
    SloBurn,
    /// Transactions open past their agent's threshold, now.
    Stuck,
    /// An agent whose heartbeats stopped.
    AgentSilent,
    /// A topology edge (a call to a service, database, cache, queue) turned critical.
    Dependency,
    /// The evaluator itself has not completed an evaluation for a while.
    EvaluatorStalled,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::RateDrop => "rate_drop",
            Kind::ErrorRate => "error_rate",
            Kind::Latency => "latency",
            Kind::SloBurn => "slo_burn",
            Kind::Stuck => "stuck",
            Kind::AgentSilent => "agent_silent",
            Kind::Dependency => "dependency",
            Kind::EvaluatorStalled => "evaluator_stalled",
        }
    }
}
