//! Service-level objectives per BT (or endpoint): a latency objective (a share of calls faster
//! than a threshold) and an availability objective (a share of calls without error) over a
//! window of days. The error budget is the share of calls the objective allows to be bad; the
//! burn rate is how fast it goes (1 = exactly used up at the window's end). Alerts follow the
//! multi-window rule of Google's SRE workbook: page when the last hour and the last 5 minutes
//! both burn at 14.4x or more (2% of a 30-day budget in an hour), open a ticket when the last
//! 6 hours and the last 30 minutes both burn at 6x or more. The short window makes an alert
//! resolve soon after the cause ends.

use serde::{Deserialize, Serialize};

use super::Severity;

/// Burn-rate alert windows, seconds.
pub const FAST: (u64, u64) = (3600, 300);
pub const SLOW: (u64, u64) = (6 * 3600, 1800);
pub const FAST_BURN: f64 = 14.4;
pub const SLOW_BURN: f64 = 6.0;

/// One SLO, from `sightline.toml` (`[[alerts.slos]]`) or `PUT /api/v1/slos/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloDefinition {
    pub name: String,
    pub service: String,
    /// The BT it is about; or empty, with `operation`, for an endpoint.
    #[serde(default)]
    pub bt: String,
    #[serde(default)]
    pub operation: String,
    /// Calls slower than this are bad for the latency objective.
    #[serde(default)]
    pub latency_ms: Option<f64>,
    /// Share of calls that must be faster than `latency_ms` (0.99).
    #[serde(default)]
    pub latency_objective: Option<f64>,
    /// Share of calls that must succeed (0.999).
    #[serde(default)]
    pub availability_objective: Option<f64>,
    /// The window the objectives hold over.
    #[serde(default = "default_window_days")]
    pub window_days: u32,
}

fn default_window_days() -> u32 {
    30
}

impl SloDefinition {
    /// Why the definition cannot be used, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 100
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err("an SLO name is 1-100 letters, digits, '-', '_' or '.'".into());
        }
        if self.service.is_empty() {
            return Err(format!("SLO {}: service is required", self.name));
        }
        if self.bt.is_empty() == self.operation.is_empty() {
            return Err(format!("SLO {}: give either bt or operation", self.name));
        }
        let objective_ok = |o: Option<f64>| o.is_none_or(|o| o > 0.0 && o < 1.0);
        if !objective_ok(self.latency_objective) || !objective_ok(self.availability_objective) {
            return Err(format!(
                "SLO {}: objectives are shares between 0 and 1 (0.99), exclusive",
                self.name
            ));
        }
        match (self.latency_ms, self.latency_objective) {
            (Some(ms), Some(_)) if ms > 0.0 && ms.is_finite() => {}
            (None, None) => {}
            _ => {
                return Err(format!(
                    "SLO {}: a latency objective needs both latency_ms (> 0) and latency_objective",
                    self.name
                ))
            }
        }
        if self.latency_objective.is_none() && self.availability_objective.is_none() {
            return Err(format!(
                "SLO {}: give a latency or an availability objective",
                self.name
            ));
        }
        if !(1..=90).contains(&self.window_days) {
            return Err(format!("SLO {}: window_days is 1 to 90", self.name));
        }
        Ok(())
    }

    /// The objectives it has: (name, target).
    pub fn objectives(&self) -> Vec<(Objective, f64)> {
        let mut out = Vec::new();
        if let Some(target) = self.latency_objective {
            out.push((Objective::Latency, target));
        }
        if let Some(target) = self.availability_objective {
            out.push((Objective::Availability, target));
        }
        out
    }

    /// The latency threshold in µs (0 without a latency objective).
    pub fn threshold_us(&self) -> u64 {
        self.latency_ms.map_or(0, |ms| (ms * 1000.0) as u64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    Latency,
    Availability,
}

/// Calls in a window and how many were bad for each objective.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Counts {
    pub calls: u64,
    pub slow: u64,
    pub errors: u64,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.calls += other.calls;
        self.slow += other.slow;
        self.errors += other.errors;
    }

    pub fn bad(&self, objective: Objective) -> u64 {
        match objective {
            Objective::Latency => self.slow,
            Objective::Availability => self.errors,
        }
    }

    /// How fast this window spends the budget of `target` (0 without calls).
    pub fn burn_rate(&self, objective: Objective, target: f64) -> f64 {
        if self.calls == 0 {
            return 0.0;
        }
        self.bad(objective) as f64 / self.calls as f64 / (1.0 - target)
    }
}

/// Calls slower than `threshold_us` in a sparse histogram (bucket value µs, count).
pub fn slow_calls(histogram: impl IntoIterator<Item = (u64, u64)>, threshold_us: u64) -> u64 {
    histogram
        .into_iter()
        .filter(|(bucket, _)| *bucket > threshold_us)
        .map(|(_, count)| count)
        .sum()
}

/// The four alert windows of one SLO, ending now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Windows {
    pub last_5m: Counts,
    pub last_30m: Counts,
    pub last_1h: Counts,
    pub last_6h: Counts,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BurnRates {
    pub last_5m: f64,
    pub last_30m: f64,
    pub last_1h: f64,
    pub last_6h: f64,
}

impl Windows {
    pub fn burn_rates(&self, objective: Objective, target: f64) -> BurnRates {
        BurnRates {
            last_5m: self.last_5m.burn_rate(objective, target),
            last_30m: self.last_30m.burn_rate(objective, target),
            last_1h: self.last_1h.burn_rate(objective, target),
            last_6h: self.last_6h.burn_rate(objective, target),
        }
    }
}

impl BurnRates {
    /// The multi-window rule: page on the fast pair, ticket on the slow pair.
    pub fn alert(&self) -> Option<Severity> {
        if self.last_1h >= FAST_BURN && self.last_5m >= FAST_BURN {
            Some(Severity::Critical)
        } else if self.last_6h >= SLOW_BURN && self.last_30m >= SLOW_BURN {
            Some(Severity::Warning)
        } else {
            None
        }
    }
}

/// Share of the window's error budget left (negative once overspent; 1 without calls).
pub fn budget_remaining(window: &Counts, objective: Objective, target: f64) -> f64 {
    if window.calls == 0 {
        return 1.0;
    }
    let allowed = window.calls as f64 * (1.0 - target);
    1.0 - window.bad(objective) as f64 / allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login() -> SloDefinition {
        SloDefinition {
            name: "login-latency".into(),
            service: "auth".into(),
            bt: "Login".into(),
            operation: String::new(),
            latency_ms: Some(300.0),
            latency_objective: Some(0.99),
            availability_objective: Some(0.999),
            window_days: 30,
        }
    }

    #[test]
    fn definitions_are_checked_with_a_reason() {
        assert_eq!(login().check(), Ok(()));
        let mut bad = login();
        bad.latency_objective = Some(99.0);
        assert!(bad.check().unwrap_err().contains("between 0 and 1"));
        let mut bad = login();
        bad.operation = "POST /login".into();
        assert!(bad.check().unwrap_err().contains("either bt or operation"));
        let mut bad = login();
        bad.latency_ms = None;
        assert!(bad.check().unwrap_err().contains("latency_ms"));
        let mut bad = login();
        bad.name = "a b".into();
        assert!(bad.check().is_err());
    }

    #[test]
    fn burning_at_fifteen_times_pages_and_the_short_window_resolves_it() {
        // 99% objective, 15% slow: burn 15x in both fast windows.
        let burning = Counts {
            calls: 1000,
            slow: 150,
            errors: 0,
        };
        let windows = Windows {
            last_5m: burning,
            last_30m: burning,
            last_1h: burning,
            last_6h: Counts {
                calls: 6000,
                slow: 150,
                errors: 0,
            },
        };
        let rates = windows.burn_rates(Objective::Latency, 0.99);
        assert!((rates.last_1h - 15.0).abs() < 1e-9);
        assert_eq!(rates.alert(), Some(Severity::Critical));
        // The cause ended: the last 5 minutes are clean, the hour still remembers.
        let ended = Windows {
            last_5m: Counts {
                calls: 1000,
                slow: 5,
                errors: 0,
            },
            ..windows
        };
        assert_eq!(ended.burn_rates(Objective::Latency, 0.99).alert(), None);
        // A slow, steady burn over hours is a ticket.
        let steady = Counts {
            calls: 1000,
            slow: 70,
            errors: 0,
        };
        let slow = Windows {
            last_5m: steady,
            last_30m: steady,
            last_1h: steady,
            last_6h: steady,
        };
        assert_eq!(
            slow.burn_rates(Objective::Latency, 0.99).alert(),
            Some(Severity::Warning)
        );
        assert!((budget_remaining(&steady, Objective::Latency, 0.99) + 6.0).abs() < 1e-9);
        assert_eq!(slow_calls([(250_000, 5), (310_000, 2), (900_000, 1)], 300_000), 3);
    }
}
