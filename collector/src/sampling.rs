//! Sampling ratios the collector pushes to agents: a default and per-service overrides, from
//! the configuration and changed at run time through the API (`PUT /api/v1/agents/sampling`).
//! Every agent stream gets its service's ratio once the collector knows the service (its first
//! batch) and again whenever the policy changes; the agent applies it to the next transaction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which share of transactions agents record as call chains. RED figures count every request
/// whatever the ratio.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingPolicy {
    /// For every agent; absent: agents keep the ratio they were started with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_ratio: Option<f64>,
    /// Per service, over the default.
    pub services: BTreeMap<String, f64>,
}

impl SamplingPolicy {
    /// The ratio for `service`'s agents, if the collector sets one.
    pub fn ratio_for(&self, service: &str) -> Option<f64> {
        self.services.get(service).copied().or(self.default_ratio)
    }

    /// Every ratio within 0..=1 and every service named.
    pub fn check(&self) -> Result<(), String> {
        let in_range = |r: f64| (0.0..=1.0).contains(&r);
        if let Some(r) = self.default_ratio.filter(|r| !in_range(*r)) {
            return Err(format!("default_ratio must be within 0..=1, got {r}"));
        }
        for (service, ratio) in &self.services {
            if service.is_empty() {
                return Err("service names must not be empty".into());
            }
            if !in_range(*ratio) {
                return Err(format!("ratio for {service:?} must be within 0..=1, got {ratio}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_override_the_default_and_ratios_are_checked() {
        let policy = SamplingPolicy {
            default_ratio: Some(0.1),
            services: BTreeMap::from([("auth".to_string(), 1.0)]),
        };
        assert_eq!(policy.ratio_for("auth"), Some(1.0));
        assert_eq!(policy.ratio_for("messages"), Some(0.1));
        assert_eq!(SamplingPolicy::default().ratio_for("auth"), None);
        assert!(policy.check().is_ok());
        let bad = SamplingPolicy {
            default_ratio: Some(1.5),
            ..SamplingPolicy::default()
        };
        assert!(bad.check().unwrap_err().contains("default_ratio"));
        let bad = SamplingPolicy {
            services: BTreeMap::from([("auth".to_string(), f64::NAN)]),
            ..SamplingPolicy::default()
        };
        assert!(bad.check().unwrap_err().contains("auth"));
    }
}
