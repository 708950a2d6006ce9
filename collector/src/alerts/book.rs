//! The alert book: which alerts fire now and which resolved lately. Findings with the same key
//! are one alert (deduplicated across evaluations); an alert whose finding is gone from an
//! evaluation that ran its detector is resolved. Each change is an event, handed on to the
//! notifier grouped by service.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use super::{Finding, Kind, Severity};

/// Resolved alerts kept for `GET /api/v1/alerts`.
const RECENT: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Firing,
    Resolved,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub id: u64,
    pub key: String,
    pub service: String,
    pub subject: String,
    pub kind: Kind,
    pub severity: Severity,
    /// The highest severity it reached.
    pub peak: Severity,
    pub state: State,
    pub summary: String,
    pub details: serde_json::Value,
    /// Unix seconds.
    pub started_at: u64,
    pub updated_at: u64,
    pub resolved_at: Option<u64>,
}

/// What changed about an alert in an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Firing,
    /// Its severity changed while firing.
    Changed,
    Resolved,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub change: Change,
    pub alert: Alert,
}

#[derive(Debug, Default)]
pub struct Book {
    active: BTreeMap<String, Alert>,
    recent: VecDeque<Alert>,
    next_id: u64,
}

impl Book {
    /// Takes one evaluation's findings from the detectors of `kinds` (those that ran) at `now`.
    pub fn apply(&mut self, now: u64, kinds: &[Kind], findings: Vec<Finding>) -> Vec<Event> {
        let mut events = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for finding in findings {
            seen.insert(finding.key.clone());
            match self.active.get_mut(&finding.key) {
                Some(alert) => {
                    let changed = alert.severity != finding.severity;
                    alert.severity = finding.severity;
                    alert.peak = alert.peak.max(finding.severity);
                    alert.summary = finding.summary;
                    alert.details = finding.details;
                    alert.updated_at = now;
                    if changed {
                        events.push(Event {
                            change: Change::Changed,
                            alert: alert.clone(),
                        });
                    }
                }
                None => {
                    self.next_id += 1;
                    let alert = Alert {
                        id: self.next_id,
                        key: finding.key.clone(),
                        service: finding.service,
                        subject: finding.subject,
                        kind: finding.kind,
                        severity: finding.severity,
                        peak: finding.severity,
                        state: State::Firing,
                        summary: finding.summary,
                        details: finding.details,
                        started_at: now,
                        updated_at: now,
                        resolved_at: None,
                    };
                    events.push(Event {
                        change: Change::Firing,
                        alert: alert.clone(),
                    });
                    self.active.insert(finding.key, alert);
                }
            }
        }
        let gone: Vec<String> = self
            .active
            .iter()
            .filter(|(key, alert)| kinds.contains(&alert.kind) && !seen.contains(*key))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            let Some(mut alert) = self.active.remove(&key) else {
                continue;
            };
            alert.state = State::Resolved;
            alert.resolved_at = Some(now);
            alert.updated_at = now;
            events.push(Event {
                change: Change::Resolved,
                alert: alert.clone(),
            });
            if self.recent.len() == RECENT {
                self.recent.pop_back();
            }
            self.recent.push_front(alert);
        }
        events
    }

    /// Firing alerts, most severe first, then oldest first.
    pub fn active(&self) -> Vec<Alert> {
        let mut active: Vec<Alert> = self.active.values().cloned().collect();
        active.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.started_at.cmp(&b.started_at)));
        active
    }

    /// Resolved alerts, newest first.
    pub fn recent(&self) -> Vec<Alert> {
        self.recent.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(key: &str, kind: Kind, severity: Severity) -> Finding {
        Finding {
            key: key.into(),
            service: "auth".into(),
            subject: "Login".into(),
            kind,
            severity,
            summary: format!("{key} {severity:?}"),
            details: serde_json::Value::Null,
        }
    }

    #[test]
    fn one_alert_per_key_escalates_and_resolves_only_when_its_detector_ran() {
        let mut book = Book::default();
        let kinds = [Kind::RateDrop, Kind::Stuck];
        let events = book.apply(100, &kinds, vec![finding("a", Kind::RateDrop, Severity::Warning)]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].change, Change::Firing);
        // Same key again: no new alert; a new severity is one change.
        assert!(book
            .apply(115, &kinds, vec![finding("a", Kind::RateDrop, Severity::Warning)])
            .is_empty());
        let events = book.apply(130, &kinds, vec![finding("a", Kind::RateDrop, Severity::Critical)]);
        assert_eq!(events[0].change, Change::Changed);
        assert_eq!(book.active().len(), 1);
        // Its detector did not run (its data could not be read): nothing resolves.
        assert!(book.apply(145, &[Kind::Stuck], vec![]).is_empty());
        let events = book.apply(160, &kinds, vec![]);
        assert_eq!(events[0].change, Change::Resolved);
        assert_eq!(events[0].alert.peak, Severity::Critical);
        assert_eq!(events[0].alert.started_at, 100);
        assert!(book.active().is_empty());
        assert_eq!(book.recent()[0].resolved_at, Some(160));
    }
}
