//! Baselines: what a BT's request rate, error rate and p99 usually are at this time, from its
//! own history. With enough days of history the band is the same hour on previous days (daily
//! seasonality); without, a rolling band over the last hour. Both are robust (median and MAD),
//! so one bad minute in the history does not widen or move them. A signal outside its band is
//! graded: a warning after it stays out for a few minutes, critical once it is far out (a rate
//! under half the expected, an error rate or p99 twice the band away) for half a minute.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::json;
use statrs::statistics::{Data, Median};

use super::{Finding, Kind, Severity};

/// One minute of a BT at its entry points.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MinuteStats {
    pub calls: u64,
    pub errors: u64,
    /// None when the minute had too few calls to read a p99 from.
    pub p99_ms: Option<f64>,
}

/// One BT's minutes (Unix minute -> figures); minutes without calls are absent.
pub type History = BTreeMap<u32, MinuteStats>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BaselineConfig {
    /// Previous days looked at for the same time of day.
    pub same_hour_days: u32,
    /// Days with history needed before the same-hour band replaces the rolling one.
    pub min_days: u32,
    /// Minutes either side of this time of day on each previous day.
    pub same_hour_half_width_minutes: u32,
    /// Length of the rolling band's history.
    pub rolling_minutes: u32,
    /// Robust standard deviations between expected and the band's edge.
    pub z: f64,
    /// The band is at least this share of the expected value wide (rate, p99).
    pub min_relative_width: f64,
    /// The error-rate band is at least this wide (absolute, 0.01 = one percentage point).
    pub min_error_rate_width: f64,
    /// BTs expected below this many calls a minute are not alerted on for their rate.
    pub min_expected_calls: f64,
    /// A p99 needs at least this many calls in the minute.
    pub min_calls_for_p99: u64,
    /// An error-rate alert needs at least this many errors in the minute.
    pub min_errors: u64,
    /// Outside the band this long: warning.
    pub warn_after_secs: u64,
    /// Far outside (see the module docs) this long: critical.
    pub critical_after_secs: u64,
    /// The same for p99: one slow minute is no page.
    pub latency_critical_after_secs: u64,
    /// Back inside this long: resolved.
    pub clear_after_secs: u64,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            same_hour_days: 7,
            min_days: 3,
            same_hour_half_width_minutes: 30,
            rolling_minutes: 60,
            z: 4.0,
            min_relative_width: 0.3,
            min_error_rate_width: 0.01,
            min_expected_calls: 10.0,
            min_calls_for_p99: 100,
            min_errors: 5,
            warn_after_secs: 180,
            critical_after_secs: 30,
            latency_critical_after_secs: 180,
            clear_after_secs: 120,
        }
    }
}

/// Where a band's history came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BandSource {
    /// The same time of day on this many previous days.
    SameHour(u32),
    /// The minutes before.
    Rolling,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Band {
    pub expected: f64,
    pub low: f64,
    pub high: f64,
    pub source: BandSource,
}

fn median(values: Vec<f64>) -> f64 {
    Data::new(values).median()
}

/// Median absolute deviation scaled to a normal's standard deviation.
fn robust_sigma(values: &[f64], center: f64) -> f64 {
    1.4826 * median(values.iter().map(|v| (v - center).abs()).collect())
}

/// The minutes a band is made of: the same time of day on previous days when enough days
/// have history there, else the rolling window before `until`. Minutes without calls inside a
/// day's span (or the rolling window after the BT's first minute) count as zero calls.
fn band_minutes(
    history: &History,
    at: u32,
    until: u32,
    config: &BaselineConfig,
) -> Option<(Vec<MinuteStats>, BandSource)> {
    let half = config.same_hour_half_width_minutes;
    let mut same_hour = Vec::new();
    let mut days = 0;
    for day in 1..=config.same_hour_days {
        let Some(center) = at.checked_sub(day * 1440) else {
            break;
        };
        let (from, to) = (center.saturating_sub(half), center + half + 1);
        if history.range(from..to).next().is_none() {
            continue;
        }
        days += 1;
        same_hour.extend((from..to).map(|m| history.get(&m).copied().unwrap_or_default()));
    }
    if days >= config.min_days {
        return Some((same_hour, BandSource::SameHour(days)));
    }
    let first = *history.keys().next()?;
    let from = until.saturating_sub(config.rolling_minutes).max(first);
    // Too short a history says nothing yet.
    if until.saturating_sub(from) < config.rolling_minutes / 3 {
        return None;
    }
    let rolling = (from..until)
        .map(|m| history.get(&m).copied().unwrap_or_default())
        .collect();
    Some((rolling, BandSource::Rolling))
}

/// Calls per minute: Poisson noise at least, and never narrower than the relative floor.
pub fn rate_band(history: &History, at: u32, until: u32, config: &BaselineConfig) -> Option<Band> {
    let (minutes, source) = band_minutes(history, at, until, config)?;
    let calls: Vec<f64> = minutes.iter().map(|m| m.calls as f64).collect();
    let expected = median(calls.clone());
    let sigma = robust_sigma(&calls, expected).max(expected.sqrt());
    let width = (config.z * sigma).max(config.min_relative_width * expected);
    Some(Band {
        expected,
        low: (expected - width).max(0.0),
        high: expected + width,
        source,
    })
}

/// Errors per call: the pooled rate, its minute-to-minute spread, and the binomial noise of a
/// minute of `current_calls`.
pub fn error_band(history: &History, at: u32, until: u32, current_calls: u64, config: &BaselineConfig) -> Option<Band> {
    let (minutes, source) = band_minutes(history, at, until, config)?;
    let (calls, errors) = minutes
        .iter()
        .fold((0u64, 0u64), |(c, e), m| (c + m.calls, e + m.errors));
    if calls == 0 || current_calls == 0 {
        return None;
    }
    let expected = errors as f64 / calls as f64;
    let ratios: Vec<f64> = minutes
        .iter()
        .filter(|m| m.calls > 0)
        .map(|m| m.errors as f64 / m.calls as f64)
        .collect();
    let binomial = (expected * (1.0 - expected) / current_calls as f64).sqrt();
    let sigma = robust_sigma(&ratios, median(ratios.clone())).max(binomial);
    let width = (config.z * sigma)
        .max(config.min_error_rate_width)
        .max(config.min_relative_width * expected);
    Some(Band {
        expected,
        low: (expected - width).max(0.0),
        high: (expected + width).min(1.0),
        source,
    })
}

/// p99 in ms over the minutes that had enough calls for one.
pub fn p99_band(history: &History, at: u32, until: u32, config: &BaselineConfig) -> Option<Band> {
    let (minutes, source) = band_minutes(history, at, until, config)?;
    let p99s: Vec<f64> = minutes.iter().filter_map(|m| m.p99_ms).collect();
    if p99s.len() < 10 {
        return None;
    }
    let expected = median(p99s.clone());
    let width = (config.z * robust_sigma(&p99s, expected)).max(config.min_relative_width * expected);
    Some(Band {
        expected,
        low: (expected - width).max(0.0),
        high: expected + width,
        source,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deviation {
    Inside,
    Outside,
    Far,
}

/// How long a signal has been where it is, and the level it reached.
#[derive(Debug, Clone, Default)]
struct SignalState {
    outside_since: Option<u64>,
    far_since: Option<u64>,
    inside_since: Option<u64>,
    level: Option<Severity>,
    /// The minute the rolling history stops at while the signal is out: an outage must not
    /// become its own baseline.
    frozen_until: Option<u32>,
}

impl SignalState {
    fn update(
        &mut self,
        now: u64,
        deviation: Deviation,
        config: &BaselineConfig,
        critical_after: u64,
    ) -> Option<Severity> {
        match deviation {
            Deviation::Inside => {
                self.outside_since = None;
                self.far_since = None;
                self.frozen_until = None;
                if self.level.is_some() {
                    let since = *self.inside_since.get_or_insert(now);
                    if now - since >= config.clear_after_secs {
                        self.level = None;
                        self.inside_since = None;
                    }
                }
            }
            Deviation::Outside | Deviation::Far => {
                self.inside_since = None;
                self.outside_since.get_or_insert(now);
                if deviation == Deviation::Far {
                    self.far_since.get_or_insert(now);
                } else {
                    self.far_since = None;
                }
            }
        }
        let reached = match (self.far_since, self.outside_since) {
            (Some(far), _) if now - far >= critical_after => Some(Severity::Critical),
            (_, Some(out)) if now - out >= config.warn_after_secs => Some(Severity::Warning),
            _ => None,
        };
        // Once raised, a level holds until the signal is back inside for `clear_after_secs`.
        self.level = self.level.max(reached);
        self.level
    }
}

/// The minute-level figures of a BT's last minute (the newest complete 60 s).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Current {
    pub calls: u64,
    pub errors: u64,
    pub p99_ms: Option<f64>,
}

/// Baseline detectors for every BT, with what they remember between evaluations.
#[derive(Debug, Default)]
pub struct Baselines {
    pub config: BaselineConfig,
    states: HashMap<(String, String, Kind), SignalState>,
}

impl Baselines {
    pub fn new(config: BaselineConfig) -> Self {
        Self {
            config,
            states: HashMap::new(),
        }
    }

    /// Evaluates one BT at `now` (Unix seconds): `current` is its last minute, `history` its
    /// minutes before that (at least those the bands need).
    pub fn evaluate(
        &mut self,
        now: u64,
        service: &str,
        bt: &str,
        current: &Current,
        history: &History,
    ) -> Vec<Finding> {
        let config = self.config.clone();
        // The current window covers the minute before `at`; the history stops there.
        let at = (now / 60) as u32;
        let until = at.saturating_sub(1);
        let mut findings = Vec::new();

        let rate = self.signal(service, bt, Kind::RateDrop);
        let band = rate_band(history, at, rate.frozen_until.unwrap_or(until), &config);
        let observed = current.calls as f64;
        let deviation = match band {
            Some(b) if b.expected >= config.min_expected_calls && observed < b.low => {
                if observed < 0.5 * b.expected {
                    Deviation::Far
                } else {
                    Deviation::Outside
                }
            }
            _ => Deviation::Inside,
        };
        if let (Some(level), Some(b)) = (self.track(now, service, bt, Kind::RateDrop, deviation, until), band) {
            findings.push(finding(
                service,
                bt,
                Kind::RateDrop,
                level,
                format!(
                    "{bt} ({service}): {} requests in the last minute, expected {:.0} (at least {:.0}; {})",
                    current.calls,
                    b.expected,
                    b.low,
                    source_text(b.source)
                ),
                json!({ "observed_per_minute": current.calls, "band": b }),
            ));
        }

        let errors = self.signal(service, bt, Kind::ErrorRate);
        let band = error_band(
            history,
            at,
            errors.frozen_until.unwrap_or(until),
            current.calls,
            &config,
        );
        let observed = if current.calls > 0 {
            current.errors as f64 / current.calls as f64
        } else {
            0.0
        };
        let deviation = match band {
            Some(b) if current.errors >= config.min_errors && observed > b.high => {
                if observed > b.expected + 2.0 * (b.high - b.expected) {
                    Deviation::Far
                } else {
                    Deviation::Outside
                }
            }
            _ => Deviation::Inside,
        };
        if let (Some(level), Some(b)) = (self.track(now, service, bt, Kind::ErrorRate, deviation, until), band) {
            findings.push(finding(
                service,
                bt,
                Kind::ErrorRate,
                level,
                format!(
                    "{bt} ({service}): {:.1}% of requests failed in the last minute ({} of {}), usually {:.2}% (at most {:.2}%; {})",
                    observed * 100.0,
                    current.errors,
                    current.calls,
                    b.expected * 100.0,
                    b.high * 100.0,
                    source_text(b.source)
                ),
                json!({ "observed_error_rate": observed, "errors": current.errors, "calls": current.calls, "band": b }),
            ));
        }

        let latency = self.signal(service, bt, Kind::Latency);
        let band = p99_band(history, at, latency.frozen_until.unwrap_or(until), &config);
        let deviation = match (band, current.p99_ms) {
            (Some(b), Some(p99)) if current.calls >= config.min_calls_for_p99 && p99 > b.high => {
                if p99 > b.expected + 2.0 * (b.high - b.expected) {
                    Deviation::Far
                } else {
                    Deviation::Outside
                }
            }
            // Too few calls to read a p99 from: no news, not good news.
            (Some(_), None)
                if self
                    .states
                    .get(&key(service, bt, Kind::Latency))
                    .is_some_and(|s| s.level.is_some()) =>
            {
                Deviation::Outside
            }
            _ => Deviation::Inside,
        };
        if let (Some(level), Some(b)) = (self.track(now, service, bt, Kind::Latency, deviation, until), band) {
            findings.push(finding(
                service,
                bt,
                Kind::Latency,
                level,
                format!(
                    "{bt} ({service}): p99 {} in the last minute, usually {:.0} ms (at most {:.0} ms; {})",
                    current.p99_ms.map_or("unknown".to_string(), |p| format!("{p:.0} ms")),
                    b.expected,
                    b.high,
                    source_text(b.source)
                ),
                json!({ "observed_p99_ms": current.p99_ms, "calls": current.calls, "band": b }),
            ));
        }
        findings
    }

    fn signal(&self, service: &str, bt: &str, kind: Kind) -> SignalState {
        self.states.get(&key(service, bt, kind)).cloned().unwrap_or_default()
    }

    fn track(
        &mut self,
        now: u64,
        service: &str,
        bt: &str,
        kind: Kind,
        deviation: Deviation,
        until: u32,
    ) -> Option<Severity> {
        let config = self.config.clone();
        let state = self.states.entry(key(service, bt, kind)).or_default();
        if deviation != Deviation::Inside && state.frozen_until.is_none() {
            state.frozen_until = Some(until);
        }
        let critical_after = if kind == Kind::Latency {
            config.latency_critical_after_secs
        } else {
            config.critical_after_secs
        };
        let level = state.update(now, deviation, &config, critical_after);
        if level.is_none() && state.outside_since.is_none() {
            self.states.remove(&key(service, bt, kind));
        }
        level
    }
}

fn key(service: &str, bt: &str, kind: Kind) -> (String, String, Kind) {
    (service.to_string(), bt.to_string(), kind)
}

fn source_text(source: BandSource) -> String {
    match source {
        BandSource::SameHour(days) => format!("same hour on {days} previous days"),
        BandSource::Rolling => "the last hour".to_string(),
    }
}

fn finding(
    service: &str,
    bt: &str,
    kind: Kind,
    severity: Severity,
    summary: String,
    details: serde_json::Value,
) -> Finding {
    Finding {
        key: format!("{}/{service}/{bt}", kind.name()),
        service: service.to_string(),
        subject: bt.to_string(),
        kind,
        severity,
        summary,
        details,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steady(minutes: std::ops::Range<u32>, calls: u64) -> History {
        minutes
            .map(|m| {
                (
                    m,
                    MinuteStats {
                        calls,
                        errors: calls / 100,
                        p99_ms: Some(120.0),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_rate_drop_warns_after_minutes_and_a_collapse_is_critical_at_once() {
        let start = 28_000_000u32;
        let history = steady(start..start + 120, 100);
        let mut baselines = Baselines::default();
        let mut now = u64::from(start + 121) * 60;
        let normal = Current {
            calls: 100,
            errors: 1,
            p99_ms: Some(120.0),
        };
        assert!(baselines.evaluate(now, "auth", "Login", &normal, &history).is_empty());

        // 45% down: outside the band (at least 60), a warning only after warn_after_secs.
        let dip = Current { calls: 55, ..normal };
        now += 60;
        assert!(baselines.evaluate(now, "auth", "Login", &dip, &history).is_empty());
        now += 180;
        let findings = baselines.evaluate(now, "auth", "Login", &dip, &history);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(
            (findings[0].kind, findings[0].severity),
            (Kind::RateDrop, Severity::Warning)
        );

        // 90% down: critical within critical_after_secs.
        let collapse = Current { calls: 10, ..normal };
        now += 15;
        baselines.evaluate(now, "auth", "Login", &collapse, &history);
        now += 30;
        let findings = baselines.evaluate(now, "auth", "Login", &collapse, &history);
        assert_eq!(findings[0].severity, Severity::Critical);
        assert!(findings[0].summary.contains("10 requests"), "{}", findings[0].summary);

        // Back to normal: held for clear_after_secs, then resolved.
        now += 60;
        assert_eq!(baselines.evaluate(now, "auth", "Login", &normal, &history).len(), 1);
        now += 120;
        assert!(baselines.evaluate(now, "auth", "Login", &normal, &history).is_empty());
    }

    #[test]
    fn same_hour_bands_follow_the_time_of_day() {
        let day = 1440u32;
        let base = 28_000_000u32 / day * day;
        // Quiet nights (10/min at minute 0-59 of the day), busy afternoons (1000/min at 900-959).
        let mut history = History::new();
        for d in 0..5 {
            for m in 0..60 {
                history.insert(
                    base + d * day + m,
                    MinuteStats {
                        calls: 10,
                        errors: 0,
                        p99_ms: None,
                    },
                );
                history.insert(
                    base + d * day + 900 + m,
                    MinuteStats {
                        calls: 1000,
                        errors: 0,
                        p99_ms: None,
                    },
                );
            }
        }
        let config = BaselineConfig::default();
        let afternoon = base + 5 * day + 930;
        let band = rate_band(&history, afternoon, afternoon - 1, &config).unwrap();
        assert_eq!(band.source, BandSource::SameHour(5));
        assert!((band.expected - 1000.0).abs() < 1.0 || band.expected < 1000.0);
        let night = base + 5 * day + 30;
        let band = rate_band(&history, night, night - 1, &config).unwrap();
        assert!(band.expected <= 10.0, "{band:?}");
    }

    #[test]
    fn an_error_burst_and_a_slow_p99_are_flagged_and_quiet_minutes_are_not() {
        let start = 28_000_000u32;
        let history = steady(start..start + 120, 200);
        let mut baselines = Baselines::default();
        let now = u64::from(start + 121) * 60;
        let failing = Current {
            calls: 200,
            errors: 60,
            p99_ms: Some(900.0),
        };
        baselines.evaluate(now, "chat", "AcceptChat", &failing, &history);
        let findings = baselines.evaluate(now + 30, "chat", "AcceptChat", &failing, &history);
        let kinds: Vec<_> = findings.iter().map(|f| (f.kind, f.severity)).collect();
        // Errors page at once; a slow p99 only once it has lasted (one slow minute is no page).
        assert_eq!(kinds, vec![(Kind::ErrorRate, Severity::Critical)]);
        let findings = baselines.evaluate(now + 180, "chat", "AcceptChat", &failing, &history);
        let kinds: Vec<_> = findings.iter().map(|f| (f.kind, f.severity)).collect();
        assert_eq!(
            kinds,
            vec![
                (Kind::ErrorRate, Severity::Critical),
                (Kind::Latency, Severity::Critical)
            ]
        );
        // A BT with too few calls has no rate alert: Poisson noise is all a drop would be.
        let sparse = steady(start..start + 120, 3);
        let mut baselines = Baselines::default();
        for step in 0..10 {
            let none = Current::default();
            assert!(baselines
                .evaluate(now + step * 60, "admin", "Export", &none, &sparse)
                .is_empty());
        }
    }
}
