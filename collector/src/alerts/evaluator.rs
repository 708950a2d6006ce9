//! The evaluator: every `interval_secs` it reads the aggregates, runs every detector, hands the
//! findings to the book and the book's changes to the notifier. It watches itself: a separate
//! watchdog task measures the time since the last complete evaluation (on /metrics), raises an
//! alert when it passes three intervals, and /readyz fails meanwhile.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::{
    baseline::{BaselineConfig, Baselines, Current, History},
    book::{Alert, Book},
    notify::{Notifier, WebhookConfig},
    slo::{budget_remaining, BurnRates, Objective, SloDefinition},
    Finding, Kind, Severity,
};
use crate::{
    metrics::{Metrics, OutcomeLabel},
    query::{
        alerts::{BtKey, HistorySpan},
        HealthState, Queries, StuckView, TopologyFilter, Window,
    },
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// Run the evaluator at all.
    pub enabled: bool,
    pub interval_secs: u64,
    /// Data younger than this may still be on its way: the last window ends before it.
    pub settle_secs: u64,
    pub webhooks: Vec<WebhookConfig>,
    /// Messages a webhook's queue holds while its receiver is away.
    pub webhook_queue: usize,
    pub baseline: BaselineConfig,
    /// Stuck transactions of one BT that make a stuck alert critical (fewer: a warning).
    pub stuck_critical_count: usize,
    /// A stuck transaction open this long makes the alert critical whatever the count.
    pub stuck_critical_secs: u64,
    pub slos: Vec<SloDefinition>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_secs: 15,
            settle_secs: 10,
            webhooks: Vec::new(),
            webhook_queue: 1000,
            baseline: BaselineConfig::default(),
            stuck_critical_count: 5,
            stuck_critical_secs: 30,
            slos: Vec::new(),
        }
    }
}

impl AlertsConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.interval_secs == 0 {
            return Err("alerts.interval_secs must be at least 1".into());
        }
        for hook in &self.webhooks {
            if !hook.url.starts_with("http://") {
                return Err(format!(
                    "alerts.webhooks: {} is not an http:// URL (HTTPS receivers need a relay for now)",
                    hook.url
                ));
            }
        }
        let mut names = HashSet::new();
        for slo in &self.slos {
            slo.check()?;
            if !names.insert(&slo.name) {
                return Err(format!("two SLOs are named {}", slo.name));
            }
        }
        Ok(())
    }
}

/// Where an SLO was defined: config SLOs cannot be changed through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SloSource {
    Config,
    Api,
}

/// The evaluator's state the API and /readyz read.
pub struct AlertsState {
    pub book: Mutex<Book>,
    /// False when `alerts.enabled` is off: nothing is evaluated, nothing can stall.
    pub enabled: bool,
    pub interval_secs: u64,
    started_at: u64,
    /// Unix seconds of the last evaluation that completed (0: none yet).
    last_success: AtomicU64,
    last_error: Mutex<String>,
    config_slos: Vec<SloDefinition>,
    api_slos: RwLock<BTreeMap<String, SloDefinition>>,
}

impl AlertsState {
    /// Seconds since the last complete evaluation (since start while there was none).
    pub fn lag_secs(&self, now: u64) -> u64 {
        let last = self.last_success.load(Ordering::Relaxed);
        now.saturating_sub(if last == 0 { self.started_at } else { last })
    }

    /// True when evaluation has stopped: three intervals without one completing.
    pub fn stalled(&self, now: u64) -> bool {
        self.enabled && self.lag_secs(now) > 3 * self.interval_secs.max(5)
    }

    pub fn last_error(&self) -> String {
        self.last_error.lock().expect("alerts state").clone()
    }

    pub fn last_success(&self) -> u64 {
        self.last_success.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> Vec<Alert> {
        self.book.lock().expect("alert book").active()
    }

    pub fn recent(&self) -> Vec<Alert> {
        self.book.lock().expect("alert book").recent()
    }

    /// Every SLO, config first, with where it came from.
    pub fn slos(&self) -> Vec<(SloDefinition, SloSource)> {
        let mut out: Vec<_> = self
            .config_slos
            .iter()
            .map(|s| (s.clone(), SloSource::Config))
            .collect();
        out.extend(
            self.api_slos
                .read()
                .expect("slos")
                .values()
                .map(|s| (s.clone(), SloSource::Api)),
        );
        out
    }

    pub fn is_config_slo(&self, name: &str) -> bool {
        self.config_slos.iter().any(|s| s.name == name)
    }

    /// Records an API change already stored in ClickHouse.
    pub fn put_api_slo(&self, slo: SloDefinition) {
        self.api_slos.write().expect("slos").insert(slo.name.clone(), slo);
    }

    pub fn remove_api_slo(&self, name: &str) -> bool {
        self.api_slos.write().expect("slos").remove(name).is_some()
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Starts the evaluator, its watchdog and the webhook senders in `tasks`.
pub async fn start(
    queries: Queries,
    config: AlertsConfig,
    metrics: Arc<Metrics>,
    tasks: &mut JoinSet<()>,
) -> Arc<AlertsState> {
    let stored = match queries.stored_slos().await {
        Ok(slos) => slos,
        Err(e) => {
            warn!("cannot read the SLOs defined through the API: {e}");
            Vec::new()
        }
    };
    let state = Arc::new(AlertsState {
        book: Mutex::new(Book::default()),
        enabled: config.enabled,
        interval_secs: config.interval_secs.max(1),
        started_at: unix_now(),
        last_success: AtomicU64::new(0),
        last_error: Mutex::new(String::new()),
        config_slos: config.slos.clone(),
        api_slos: RwLock::new(
            stored
                .into_iter()
                .filter(|s| !config.slos.iter().any(|c| c.name == s.name))
                .map(|s| (s.name.clone(), s))
                .collect(),
        ),
    });
    if !config.enabled {
        return state;
    }
    let notifier = Notifier::start(&config.webhooks, config.webhook_queue, metrics.clone(), tasks);
    let evaluator = Evaluator {
        queries,
        baselines: Baselines::new(config.baseline.clone()),
        history: None,
        config,
        state: state.clone(),
        metrics: metrics.clone(),
        notifier: notifier.clone(),
    };
    tasks.spawn(evaluator.run());
    tasks.spawn(watchdog(state.clone(), metrics, notifier));
    info!(interval_secs = state.interval_secs, "alert evaluator started");
    state
}

struct Evaluator {
    queries: Queries,
    config: AlertsConfig,
    baselines: Baselines,
    /// The baselines' history, read once a minute: (the minute it was read for, by BT).
    history: Option<(u32, HashMap<BtKey, History>)>,
    state: Arc<AlertsState>,
    metrics: Arc<Metrics>,
    notifier: Notifier,
}

impl Evaluator {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_secs(self.state.interval_secs));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = unix_now();
            // No evaluation may take longer than a few intervals; the watchdog says so if
            // they keep failing.
            let limit = Duration::from_secs(self.state.interval_secs * 3);
            let (kinds, findings, errors) = match tokio::time::timeout(limit, self.evaluate(now)).await {
                Ok(outcome) => outcome,
                Err(_) => (Vec::new(), Vec::new(), vec![format!("evaluation took over {limit:?}")]),
            };
            let events = self.state.book.lock().expect("alert book").apply(now, &kinds, findings);
            for event in &events {
                info!(change = ?event.change, key = event.alert.key, severity = ?event.alert.severity, "alert: {}", event.alert.summary);
            }
            self.notifier.send(now, &events);
            let firing = self.state.book.lock().expect("alert book").active().len();
            self.metrics.alerts_firing.set(firing as i64);
            if errors.is_empty() {
                self.state.last_success.store(now, Ordering::Relaxed);
                self.metrics
                    .alert_evaluations
                    .get_or_create(&OutcomeLabel { outcome: "ok" })
                    .inc();
            } else {
                let error = errors.join("; ");
                warn!("alert evaluation incomplete: {error}");
                *self.state.last_error.lock().expect("alerts state") = error;
                self.metrics
                    .alert_evaluations
                    .get_or_create(&OutcomeLabel { outcome: "failed" })
                    .inc();
            }
        }
    }

    /// Runs every detector at `now`: the kinds that ran, what they found, what failed.
    async fn evaluate(&mut self, now: u64) -> (Vec<Kind>, Vec<Finding>, Vec<String>) {
        let (mut kinds, mut findings, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        let mut outcome = |ran: &[Kind], result: Result<Vec<Finding>, String>| match result {
            Ok(found) => {
                kinds.extend_from_slice(ran);
                findings.extend(found);
            }
            Err(e) => errors.push(e),
        };
        outcome(
            &[Kind::RateDrop, Kind::ErrorRate, Kind::Latency],
            self.baselines(now).await,
        );
        outcome(&[Kind::SloBurn], self.slos(now).await);
        outcome(&[Kind::Stuck], self.stuck(now).await);
        outcome(&[Kind::AgentSilent], self.agents(now).await);
        outcome(&[Kind::Dependency], self.dependencies(now).await);
        (kinds, findings, errors)
    }

    /// End of the newest complete 10-second window.
    fn settled_end(&self, now: u64) -> u64 {
        now.saturating_sub(self.config.settle_secs) / 10 * 10
    }

    async fn baselines(&mut self, now: u64) -> Result<Vec<Finding>, String> {
        let at = (now / 60) as u32;
        if self.history.as_ref().is_none_or(|(read_for, _)| *read_for != at) {
            let config = &self.config.baseline;
            let half = u64::from(config.same_hour_half_width_minutes) * 60;
            let at_s = u64::from(at) * 60;
            let span = HistorySpan {
                from: at_s.saturating_sub(u64::from(config.same_hour_days) * 86_400 + half),
                to: at_s,
                rolling_from: at_s.saturating_sub(u64::from(config.rolling_minutes + 2) * 60),
                day_offset: (at_s + 86_400 - half) % 86_400,
                day_width: 2 * half + 60,
            };
            let history = self
                .queries
                .bt_history(span)
                .await
                .map_err(|e| format!("BT history: {e}"))?;
            self.history = Some((at, history));
        }
        let end = self.settled_end(now);
        let recent = self
            .queries
            .bt_recent(end - 60, end)
            .await
            .map_err(|e| format!("BT last minute: {e}"))?;
        let (_, history) = self.history.as_ref().expect("read above");
        let empty = History::new();
        let keys: HashSet<&BtKey> = history.keys().chain(recent.keys()).collect();
        let mut findings = Vec::new();
        for key in keys {
            let current = recent.get(key).copied().unwrap_or(Current::default());
            let history = history.get(key).unwrap_or(&empty);
            findings.extend(self.baselines.evaluate(now, &key.0, &key.1, &current, history));
        }
        Ok(findings)
    }

    async fn slos(&self, now: u64) -> Result<Vec<Finding>, String> {
        let end = self.settled_end(now);
        let mut findings = Vec::new();
        for (slo, _) in self.state.slos() {
            let windows = self
                .queries
                .slo_windows(&slo, end)
                .await
                .map_err(|e| format!("SLO {}: {e}", slo.name))?;
            for (objective, target) in slo.objectives() {
                let rates = windows.burn_rates(objective, target);
                if let Some(severity) = rates.alert() {
                    findings.push(slo_finding(&slo, objective, target, &rates, severity));
                }
            }
        }
        Ok(findings)
    }

    async fn stuck(&self, now: u64) -> Result<Vec<Finding>, String> {
        let stuck: Vec<StuckView> = self
            .queries
            .stuck_query(now)
            .fetch_all()
            .await
            .map_err(|e| format!("stuck transactions: {e}"))?;
        let mut by_bt: BTreeMap<(String, String), Vec<StuckView>> = BTreeMap::new();
        for t in stuck {
            by_bt.entry((t.service.clone(), t.bt.clone())).or_default().push(t);
        }
        let now_us = now * 1_000_000;
        Ok(by_bt
            .into_iter()
            .map(|((service, bt), transactions)| {
                // Oldest first (the query orders by start).
                let oldest = &transactions[0];
                let age_s = now_us.saturating_sub(oldest.start_us) / 1_000_000;
                let severity = if transactions.len() >= self.config.stuck_critical_count
                    || age_s >= self.config.stuck_critical_secs
                {
                    Severity::Critical
                } else {
                    Severity::Warning
                };
                let inside = match (oldest.current_operation.as_str(), oldest.current_peer.as_str()) {
                    ("", "") => String::new(),
                    (op, "") => format!(", in {op}"),
                    ("", peer) => format!(", in a call to {peer}"),
                    (op, peer) => format!(", in {peer} {op}"),
                };
                let bt_name = if bt.is_empty() { oldest.operation.clone() } else { bt.clone() };
                Finding {
                    key: format!("stuck/{service}/{bt}"),
                    service: service.clone(),
                    subject: bt_name.clone(),
                    kind: Kind::Stuck,
                    severity,
                    summary: format!(
                        "{bt_name} ({service}): {} stuck now, the longest open {age_s} s{inside}",
                        transactions.len()
                    ),
                    details: json!({
                        "stuck": transactions.len(),
                        "oldest_open_secs": age_s,
                        "current_operation": oldest.current_operation,
                        "current_peer": oldest.current_peer,
                        "trace_id": oldest.trace_id,
                        "instances": transactions.iter().map(|t| t.instance.clone()).collect::<std::collections::BTreeSet<_>>(),
                    }),
                }
            })
            .collect())
    }

    async fn agents(&self, now: u64) -> Result<Vec<Finding>, String> {
        let window = Window {
            from_us: now.saturating_sub(3600) * 1_000_000,
            to_us: (now + 1) * 1_000_000,
        };
        let agents: Vec<crate::query::AgentView> = self
            .queries
            .agents_query(window)
            .fetch_all()
            .await
            .map_err(|e| format!("agent heartbeats: {e}"))?;
        let silent_after = u64::from(self.queries.silent_after_secs());
        let mut by_service: BTreeMap<String, (usize, Vec<(String, u64)>)> = BTreeMap::new();
        for agent in agents {
            let entry = by_service.entry(agent.service.clone()).or_default();
            entry.0 += 1;
            let quiet = now.saturating_sub(u64::from(agent.last_heartbeat));
            if quiet > silent_after {
                entry.1.push((agent.instance, quiet));
            }
        }
        Ok(by_service
            .into_iter()
            .filter(|(_, (_, silent))| !silent.is_empty())
            .map(|(service, (total, silent))| {
                let all = silent.len() == total;
                let names: Vec<String> = silent.iter().map(|(i, q)| format!("{i} ({q} s)")).collect();
                Finding {
                    key: format!("agent_silent/{service}"),
                    service: service.clone(),
                    subject: service.clone(),
                    kind: Kind::AgentSilent,
                    severity: if all { Severity::Critical } else { Severity::Warning },
                    summary: if all {
                        format!(
                            "{service}: every agent is silent, nothing is watching it: {}",
                            names.join(", ")
                        )
                    } else {
                        format!(
                            "{service}: {} of {total} agents silent: {}",
                            silent.len(),
                            names.join(", ")
                        )
                    },
                    details: json!({ "silent": silent.iter().map(|(i, q)| json!({"instance": i, "silent_secs": q})).collect::<Vec<_>>(), "agents": total }),
                }
            })
            .collect())
    }

    async fn dependencies(&self, now: u64) -> Result<Vec<Finding>, String> {
        let end = self.settled_end(now);
        let window = Window {
            from_us: end.saturating_sub(80 * 60) * 1_000_000,
            to_us: end * 1_000_000,
        };
        let topology = self
            .queries
            .topology(window, &TopologyFilter::default())
            .await
            .map_err(|e| format!("topology: {e}"))?;
        Ok(topology
            .edges
            .into_iter()
            .filter(|e| e.health.state == HealthState::Critical && e.caller_type != "user")
            .map(|e| Finding {
                key: format!("dependency/{}/{}", e.caller, e.callee),
                service: e.caller.clone(),
                subject: format!("{} -> {}", e.caller, e.callee),
                kind: Kind::Dependency,
                severity: Severity::Critical,
                summary: format!(
                    "{} -> {} ({}) is critical: {:.1}% errors, p99 {:.0} ms over the last 80 minutes",
                    e.caller,
                    e.callee,
                    e.callee_type,
                    e.traffic.error_rate * 100.0,
                    e.traffic.p99_ms
                ),
                details: json!({ "edge": e }),
            })
            .collect())
    }
}

fn slo_finding(
    slo: &SloDefinition,
    objective: Objective,
    target: f64,
    rates: &BurnRates,
    severity: Severity,
) -> Finding {
    let subject = if slo.bt.is_empty() { &slo.operation } else { &slo.bt };
    let what = match objective {
        Objective::Latency => format!("{}% under {} ms", target * 100.0, slo.latency_ms.unwrap_or_default()),
        Objective::Availability => format!("{}% without error", target * 100.0),
    };
    let (long, short, long_rate, short_rate) = match severity {
        Severity::Critical => ("hour", "5 minutes", rates.last_1h, rates.last_5m),
        Severity::Warning => ("6 hours", "30 minutes", rates.last_6h, rates.last_30m),
    };
    // A page and a ticket are separate alerts: the page resolves when the fast burn stops,
    // while the slower burn may still warrant a ticket.
    let rule = match severity {
        Severity::Critical => "page",
        Severity::Warning => "ticket",
    };
    Finding {
        key: format!("slo_burn/{}/{}/{rule}", slo.name, objective_name(objective)),
        service: slo.service.clone(),
        subject: subject.clone(),
        kind: Kind::SloBurn,
        severity,
        summary: format!(
            "SLO {} ({subject}, {}: {what}): error budget burning at {long_rate:.1}x over the last {long}, {short_rate:.1}x over the last {short}",
            slo.name, slo.service
        ),
        details: json!({ "slo": slo, "objective": objective, "burn_rates": rates }),
    }
}

fn objective_name(objective: Objective) -> &'static str {
    match objective {
        Objective::Latency => "latency",
        Objective::Availability => "availability",
    }
}

/// Raises (and resolves) the evaluator-stalled alert and keeps the lag figure current; apart
/// from the evaluator so that a hung evaluation is still noticed.
async fn watchdog(state: Arc<AlertsState>, metrics: Arc<Metrics>, notifier: Notifier) {
    let mut tick = tokio::time::interval(Duration::from_secs(state.interval_secs.clamp(1, 5)));
    loop {
        tick.tick().await;
        let now = unix_now();
        let lag = state.lag_secs(now);
        metrics.alert_evaluation_lag_seconds.set(lag as i64);
        let finding = state.stalled(now).then(|| {
            let error = state.last_error();
            Finding {
                key: "evaluator_stalled".into(),
                service: "sightline".into(),
                subject: "alert evaluation".into(),
                kind: Kind::EvaluatorStalled,
                severity: Severity::Critical,
                summary: format!(
                    "alert evaluation has not completed for {lag} s; alerts are not being raised{}",
                    if error.is_empty() {
                        String::new()
                    } else {
                        format!(" (last error: {error})")
                    }
                ),
                details: json!({ "lag_secs": lag, "last_error": error }),
            }
        });
        let events =
            state
                .book
                .lock()
                .expect("alert book")
                .apply(now, &[Kind::EvaluatorStalled], finding.into_iter().collect());
        notifier.send(now, &events);
    }
}

/// An SLO's state for the API: burn rates of every window and the budget left.
pub async fn slo_status(
    queries: &Queries,
    slo: &SloDefinition,
    source: SloSource,
    now: u64,
) -> clickhouse::error::Result<serde_json::Value> {
    let end = now / 10 * 10;
    let (windows, whole) = tokio::try_join!(queries.slo_windows(slo, end), queries.slo_budget_window(slo, end))?;
    let objectives: Vec<serde_json::Value> = slo
        .objectives()
        .into_iter()
        .map(|(objective, target)| {
            let rates = windows.burn_rates(objective, target);
            json!({
                "objective": objective,
                "target": target,
                "burn_rates": rates,
                "alert": rates.alert(),
                "budget_remaining": budget_remaining(&whole, objective, target),
                "calls": whole.calls,
                "bad": whole.bad(objective),
            })
        })
        .collect();
    Ok(json!({ "slo": slo, "source": source, "objectives": objectives }))
}
