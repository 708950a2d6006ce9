//! The comparison engine behind `/api/v1/compare` and `sightline gate`: is the candidate
//! version slower or failing more than the baseline, per business transaction, beyond noise?
//!
//! Each version's traffic comes as **blocks** of time (a minute, or less for short load tests),
//! each a histogram in the shared layout with its calls and errors. Blocks, not requests, are
//! the unit of evidence: latency drifts from block to block (GC, neighbours, caches), and a test
//! that treats every request as independent mistakes that drift for a regression (the
//! simulation test shows how often). Per BT:
//! - **central shift**: Mann-Whitney over the per-block medians, with the Hodges-Lehmann
//!   estimate of the shift (on the log scale, reported as a ratio) and its interval;
//! - **tail**: p90 and p99 ratios; the pooled quantile's standard error from a block bootstrap
//!   (whole blocks resampled, their histograms summed, the quantile read), a normal interval on
//!   the log scale;
//! - **errors**: the error-rate difference with a block-bootstrap interval (a zero baseline
//!   works); error types only the candidate shows are listed;
//! - **shape**: a binned KS distance between the pooled histograms, shown, never failing alone.
//!
//! The p90 ratio is estimated and shown with its interval but, like the shape, not judged: the
//! bands are p50, p99 and errors, and a fourth test per BT would spend the false-alarm budget on
//! a figure that moves with the other two.
//!
//! A metric **fails** when its interval lies wholly beyond its band (defaults p50 +10%, p99
//! +20%, errors +0.5 points), **warns** when it lies wholly above no change but not beyond the
//! band, and is **inconclusive** below its minimum samples (a quantile q needs n(1-q) >= 10 per
//! side); a BT passes only with every metric judged and none worse. Intervals are one-sided at
//! `alpha` divided over every metric of every BT compared (Bonferroni), so the chance of any
//! false alarm in a whole comparison stays under `alpha`.

pub mod stats;

use std::collections::{BTreeMap, BTreeSet};

use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use stats::BlockHistograms;

/// One block of a version's traffic for one BT.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Block {
    pub calls: u64,
    pub errors: u64,
    /// Sparse (bucket value µs, count), ascending, in the shared histogram layout.
    pub histogram: Vec<(u64, u64)>,
}

/// One version's side of a BT.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Side {
    pub blocks: Vec<Block>,
    pub error_types: BTreeSet<String>,
    /// Mean milliseconds per call by stage (own, db, cache, mq, downstream).
    pub stages_ms: BTreeMap<String, f64>,
}

/// A BT to compare.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BtInput {
    pub bt: String,
    pub baseline: Side,
    pub candidate: Side,
}

/// How much worse is still fine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Bands {
    /// Median slowdown, as a fraction (0.10 = +10%).
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    /// Error-rate increase, absolute (0.005 = +0.5 points).
    pub errors: f64,
}

impl Default for Bands {
    fn default() -> Self {
        Self {
            p50: 0.10,
            p90: 0.15,
            p99: 0.20,
            errors: 0.005,
        }
    }
}

/// The comparison's settings (`gate.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub bands: Bands,
    /// Per-BT bands, over the defaults.
    pub bt: BTreeMap<String, Bands>,
    /// The chance of any false alarm in one comparison.
    pub alpha: f64,
    /// Block-bootstrap resamples.
    pub resamples: usize,
    /// Blocks per side below which nothing is judged.
    pub min_blocks: usize,
    /// Fixed, so that the same data gives the same verdict.
    pub seed: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            bands: Bands::default(),
            bt: BTreeMap::new(),
            alpha: 0.01,
            resamples: 200,
            min_blocks: 5,
            seed: 0x5eed,
        }
    }
}

impl Settings {
    /// Settings the engine can work with: a false-alarm budget in (0, 0.5], 20..=10,000
    /// resamples, at least 2 blocks, bands finite and not negative.
    pub fn check(&self) -> Result<(), String> {
        if !(self.alpha > 0.0 && self.alpha <= 0.5) {
            return Err(format!("alpha must be in (0, 0.5], got {}", self.alpha));
        }
        if !(20..=10_000).contains(&self.resamples) {
            return Err(format!("resamples must be 20..=10000, got {}", self.resamples));
        }
        if self.min_blocks < 2 {
            return Err(format!("min_blocks must be at least 2, got {}", self.min_blocks));
        }
        let bands = std::iter::once(("bands", &self.bands)).chain(self.bt.iter().map(|(bt, b)| (bt.as_str(), b)));
        for (name, b) in bands {
            for (metric, value) in [("p50", b.p50), ("p90", b.p90), ("p99", b.p99), ("errors", b.errors)] {
                if !(value.is_finite() && value >= 0.0) {
                    return Err(format!("{name}.{metric} must be a number >= 0, got {value}"));
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Inconclusive,
    Warn,
    Fail,
}

/// One metric's finding: the estimate and interval of the change, and its verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricResult {
    /// Candidate / baseline for latencies; candidate - baseline for the error rate.
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
    /// The band it is judged against (a fraction or points).
    pub band: f64,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BtResult {
    pub bt: String,
    pub verdict: Verdict,
    /// One line: the worst finding and its evidence.
    pub reason: String,
    pub baseline_calls: u64,
    pub candidate_calls: u64,
    pub baseline_blocks: usize,
    pub candidate_blocks: usize,
    pub p50: Option<MetricResult>,
    pub p90: Option<MetricResult>,
    pub p99: Option<MetricResult>,
    pub errors: Option<MetricResult>,
    pub baseline_error_rate: f64,
    pub candidate_error_rate: f64,
    pub new_error_types: Vec<String>,
    /// Binned KS distance between the two latency distributions (shown, never judged).
    pub shape_ks: f64,
    /// The stage whose time grew most, and by how many ms per call.
    pub stage: Option<(String, f64)>,
    /// This BT's share of all calls, baseline and candidate.
    pub baseline_share: f64,
    pub candidate_share: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    pub transactions: Vec<BtResult>,
    /// Mean latency over all BTs, the candidate's reweighted to the baseline's traffic mix, as
    /// candidate / baseline (a change of mix alone does not move it).
    pub reweighted_mean_ratio: Option<f64>,
}

/// Compares every BT; the report's verdict is the worst.
pub fn compare(inputs: &[BtInput], settings: &Settings) -> Report {
    // p50, p99 and errors of every BT share the false-alarm budget.
    let tests = (inputs.len() * 3).max(1) as f64;
    let alpha = settings.alpha / tests;
    let total = |side: fn(&BtInput) -> &Side| -> u64 {
        inputs
            .iter()
            .map(|i| side(i).blocks.iter().map(|b| b.calls).sum::<u64>())
            .sum()
    };
    let (base_total, cand_total) = (total(|i| &i.baseline), total(|i| &i.candidate));
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mut transactions: Vec<BtResult> = inputs
        .iter()
        .map(|input| {
            let bands = settings.bt.get(&input.bt).copied().unwrap_or(settings.bands);
            compare_bt(input, &bands, settings, alpha, &mut rng, (base_total, cand_total))
        })
        .collect();
    transactions.sort_by(|a, b| b.verdict.cmp(&a.verdict).then_with(|| a.bt.cmp(&b.bt)));
    let verdict = transactions
        .iter()
        .map(|t| t.verdict)
        .max()
        .unwrap_or(Verdict::Inconclusive);
    Report {
        verdict,
        reweighted_mean_ratio: reweighted_mean_ratio(inputs),
        transactions,
    }
}

fn mean_ms(side: &Side) -> Option<(u64, f64)> {
    let calls: u64 = side.blocks.iter().map(|b| b.calls).sum();
    let micros: f64 = side
        .blocks
        .iter()
        .flat_map(|b| b.histogram.iter())
        .map(|(bucket, count)| *bucket as f64 * *count as f64)
        .sum();
    (calls > 0).then(|| (calls, micros / calls as f64 / 1000.0))
}

fn reweighted_mean_ratio(inputs: &[BtInput]) -> Option<f64> {
    let (mut base, mut cand, mut weight) = (0.0, 0.0, 0.0);
    for input in inputs {
        if let (Some((calls, b)), Some((_, c))) = (mean_ms(&input.baseline), mean_ms(&input.candidate)) {
            base += calls as f64 * b;
            cand += calls as f64 * c;
            weight += calls as f64;
        }
    }
    (weight > 0.0 && base > 0.0).then(|| cand / base)
}

/// The verdict of a change whose one-sided interval is [low, ..] against `band`, where
/// `no_change` is what equal versions would give.
fn judge(low: f64, no_change: f64, band: f64) -> Verdict {
    if low > no_change + band {
        Verdict::Fail
    } else if low > no_change {
        Verdict::Warn
    } else {
        Verdict::Pass
    }
}

fn compare_bt(
    input: &BtInput,
    bands: &Bands,
    settings: &Settings,
    alpha: f64,
    rng: &mut StdRng,
    (base_total, cand_total): (u64, u64),
) -> BtResult {
    let (base, cand) = (&input.baseline, &input.candidate);
    let calls = |side: &Side| side.blocks.iter().map(|b| b.calls).sum::<u64>();
    let errors = |side: &Side| side.blocks.iter().map(|b| b.errors).sum::<u64>();
    let (base_calls, cand_calls) = (calls(base), calls(cand));
    let rate = |e: u64, c: u64| if c == 0 { 0.0 } else { e as f64 / c as f64 };
    let (base_rate, cand_rate) = (rate(errors(base), base_calls), rate(errors(cand), cand_calls));
    // One bucket axis for both sides.
    let axis: Vec<u64> = base
        .blocks
        .iter()
        .chain(&cand.blocks)
        .flat_map(|b| b.histogram.iter().map(|(bucket, _)| *bucket))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let hist = |side: &Side| {
        let blocks: Vec<&[(u64, u64)]> = side.blocks.iter().map(|b| b.histogram.as_slice()).collect();
        BlockHistograms::new(axis.clone(), &blocks)
    };
    let (base_h, cand_h) = (hist(base), hist(cand));
    let enough_blocks = base.blocks.len() >= settings.min_blocks && cand.blocks.len() >= settings.min_blocks;
    // Intervals from the two sides' bootstrap standard errors use Student's t with Welch's
    // degrees of freedom: a normal quantile was anti-conservative with 30 blocks (1.6% A/A
    // alarms in the simulation test against a 1% budget).
    let (n_base, n_cand) = (base.blocks.len(), cand.blocks.len());
    let quantile =
        |se_base: f64, se_cand: f64| stats::t_quantile(1.0 - alpha, stats::welch_df(se_base, n_base, se_cand, n_cand));

    // Central shift: Hodges-Lehmann on log block medians.
    let log_medians = |h: &BlockHistograms| -> Vec<f64> {
        (0..h.len())
            .filter_map(|b| h.quantile(&[b], 0.5))
            .map(|us| (us.max(1) as f64).ln())
            .collect()
    };
    let p50 = (enough_blocks && has_samples(base_calls, cand_calls, 0.5)).then(|| {
        let (shift, low, high) = stats::hodges_lehmann(&log_medians(&base_h), &log_medians(&cand_h), alpha);
        let (estimate, low, high) = (shift.exp(), low.exp(), high.exp());
        MetricResult {
            estimate,
            low,
            high,
            band: bands.p50,
            verdict: judge(low, 1.0, bands.p50),
        }
    });
    let tail = |q: f64, band: f64, rng: &mut StdRng| -> Option<MetricResult> {
        if !(enough_blocks && has_samples(base_calls, cand_calls, q)) {
            return None;
        }
        let all = |h: &BlockHistograms| (0..h.len()).collect::<Vec<_>>();
        let log_q = |h: &BlockHistograms, blocks: &[usize]| h.quantile(blocks, q).map(|us| (us.max(1) as f64).ln());
        let (b0, c0) = (log_q(&base_h, &all(&base_h))?, log_q(&cand_h, &all(&cand_h))?);
        let boot = |h: &BlockHistograms, rng: &mut StdRng| {
            stats::block_bootstrap(h.len(), settings.resamples, rng, |blocks| log_q(h, blocks))
        };
        let (se_base, se_cand) = (
            stats::bootstrap_se(&boot(&base_h, rng), n_base),
            stats::bootstrap_se(&boot(&cand_h, rng), n_cand),
        );
        let se = se_base.hypot(se_cand);
        let z = quantile(se_base, se_cand);
        let shift = c0 - b0;
        let (low, high) = (shift - z * se, shift + z * se);
        Some(MetricResult {
            estimate: shift.exp(),
            low: low.exp(),
            high: high.exp(),
            band,
            verdict: judge(low.exp(), 1.0, band),
        })
    };
    let p90 = tail(0.90, bands.p90, rng);
    let p99 = tail(0.99, bands.p99, rng);
    let errors_result = enough_blocks.then(|| {
        let boot_rate = |side: &Side, rng: &mut StdRng| {
            stats::block_bootstrap(side.blocks.len(), settings.resamples, rng, |blocks| {
                let (e, c) = blocks.iter().fold((0, 0), |(e, c), &b| {
                    (e + side.blocks[b].errors, c + side.blocks[b].calls)
                });
                Some(rate(e, c))
            })
        };
        let (se_base, se_cand) = (
            stats::bootstrap_se(&boot_rate(base, rng), n_base),
            stats::bootstrap_se(&boot_rate(cand, rng), n_cand),
        );
        let se = se_base.hypot(se_cand);
        let z = quantile(se_base, se_cand);
        let diff = cand_rate - base_rate;
        let (low, high) = (diff - z * se, diff + z * se);
        // A zero-variance bootstrap (no errors on either side) says nothing changed.
        let low = if se.is_finite() { low } else { f64::NEG_INFINITY };
        MetricResult {
            estimate: diff,
            low,
            high,
            band: bands.errors,
            verdict: judge(low, 0.0, bands.errors),
        }
    });
    let shape_ks = stats::ks_distance(&base_h.cdf(), &cand_h.cdf());
    let stage = cand
        .stages_ms
        .iter()
        .map(|(stage, ms)| (stage.clone(), ms - base.stages_ms.get(stage).copied().unwrap_or(0.0)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .filter(|(_, grew)| *grew > 0.0);
    let new_error_types: Vec<String> = cand.error_types.difference(&base.error_types).cloned().collect();

    // The BT's verdict: the worst judged metric; inconclusive if one could not be judged and
    // nothing is worse than a pass.
    let metrics = [("p50", &p50), ("p99", &p99), ("errors", &errors_result)];
    let worst = metrics.iter().filter_map(|(_, m)| m.as_ref().map(|m| m.verdict)).max();
    let verdict = match worst {
        Some(v) if v > Verdict::Pass => v,
        _ if metrics.iter().any(|(_, m)| m.is_none()) => Verdict::Inconclusive,
        _ => Verdict::Pass,
    };
    let reason = reason(
        &metrics,
        verdict,
        base.blocks.len(),
        cand.blocks.len(),
        &stage,
        base_calls,
        cand_calls,
    );
    let share = |calls: u64, total: u64| if total == 0 { 0.0 } else { calls as f64 / total as f64 };
    BtResult {
        bt: input.bt.clone(),
        verdict,
        reason,
        baseline_calls: base_calls,
        candidate_calls: cand_calls,
        baseline_blocks: base.blocks.len(),
        candidate_blocks: cand.blocks.len(),
        p50,
        p90,
        p99,
        errors: errors_result,
        baseline_error_rate: base_rate,
        candidate_error_rate: cand_rate,
        new_error_types,
        shape_ks,
        stage,
        baseline_share: share(base_calls, base_total),
        candidate_share: share(cand_calls, cand_total),
    }
}

/// A quantile q is judged only with n(1-q) >= 10 calls on each side.
fn has_samples(base_calls: u64, cand_calls: u64, q: f64) -> bool {
    let need = (10.0 / (1.0 - q)).ceil() as u64;
    base_calls >= need && cand_calls >= need
}

fn reason(
    metrics: &[(&str, &Option<MetricResult>)],
    verdict: Verdict,
    base_blocks: usize,
    cand_blocks: usize,
    stage: &Option<(String, f64)>,
    base_calls: u64,
    cand_calls: u64,
) -> String {
    let evidence = format!("{base_blocks} vs {cand_blocks} blocks");
    let stage = stage
        .as_ref()
        .map(|(s, ms)| format!("; {s} +{ms:.1} ms"))
        .unwrap_or_default();
    let worst = metrics
        .iter()
        .filter_map(|(name, m)| m.as_ref().map(|m| (name, m)))
        .max_by(|a, b| a.1.verdict.cmp(&b.1.verdict));
    match (verdict, worst) {
        (Verdict::Inconclusive, _) => {
            format!("too little traffic to judge every metric ({base_calls} vs {cand_calls} calls; {evidence})")
        }
        (_, Some((name, m))) if verdict > Verdict::Pass => {
            let relation = if verdict == Verdict::Fail { "beyond" } else { "within" };
            if **name == *"errors" {
                format!(
                    "errors {:+.2} points [{:+.2}, {:+.2}] {relation} +{:.2}; {evidence}{stage}",
                    m.estimate * 100.0,
                    m.low * 100.0,
                    m.high * 100.0,
                    m.band * 100.0
                )
            } else {
                let pct = |r: f64| (r - 1.0) * 100.0;
                format!(
                    "{name} {:+.0}% [{:+.0}, {:+.0}] {relation} +{:.0}%; {evidence}{stage}",
                    pct(m.estimate),
                    pct(m.low),
                    pct(m.high),
                    m.band * 100.0
                )
            }
        }
        _ => format!("no significant change; {evidence}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `blocks` blocks of `calls` calls at `micros`, with `errors` errors each.
    fn side(blocks: usize, calls: u64, micros: u64, errors: u64) -> Side {
        // Buckets are plain values here: the engine only needs them ordered.
        let bucket = micros;
        Side {
            blocks: (0..blocks)
                .map(|i| Block {
                    calls,
                    errors,
                    // A little spread between blocks, as real traffic has.
                    histogram: vec![(bucket + (i as u64 % 3), calls)],
                })
                .collect(),
            ..Side::default()
        }
    }

    fn one(baseline: Side, candidate: Side) -> BtResult {
        let report = compare(
            &[BtInput {
                bt: "Login".into(),
                baseline,
                candidate,
            }],
            &Settings::default(),
        );
        report.transactions.into_iter().next().unwrap()
    }

    #[test]
    fn a_clear_slowdown_fails_with_a_reason_naming_it_and_the_stage() {
        let mut candidate = side(30, 2000, 130_000, 0);
        candidate.stages_ms = BTreeMap::from([("db".to_string(), 80.0), ("own".to_string(), 50.0)]);
        let mut baseline = side(30, 2000, 100_000, 0);
        baseline.stages_ms = BTreeMap::from([("db".to_string(), 50.0), ("own".to_string(), 50.0)]);
        let result = one(baseline, candidate);
        assert_eq!(result.verdict, Verdict::Fail, "{result:?}");
        assert!(
            result.reason.starts_with("p50 +30%") || result.reason.starts_with("p99 +30%"),
            "{}",
            result.reason
        );
        assert!(
            result.reason.contains("30 vs 30 blocks") && result.reason.contains("db +30.0 ms"),
            "{}",
            result.reason
        );
        assert_eq!(result.stage, Some(("db".to_string(), 30.0)));
    }

    #[test]
    fn equal_versions_pass_and_too_little_traffic_is_inconclusive_never_pass() {
        assert_eq!(
            one(side(30, 2000, 100_000, 20), side(30, 2000, 100_000, 20)).verdict,
            Verdict::Pass
        );
        // 30 x 20 = 600 calls a side: p99 needs 1000.
        let few = one(side(30, 20, 100_000, 0), side(30, 20, 100_000, 0));
        assert_eq!(few.verdict, Verdict::Inconclusive);
        assert!(few.p99.is_none() && few.p50.is_some());
        assert_eq!(
            one(side(2, 5000, 100_000, 0), side(2, 5000, 100_000, 0)).verdict,
            Verdict::Inconclusive
        );
    }

    #[test]
    fn errors_from_a_zero_baseline_and_new_error_types() {
        let mut candidate = side(30, 2000, 100_000, 40);
        candidate.error_types.insert("LockTimeout".into());
        let result = one(side(30, 2000, 100_000, 0), candidate);
        // +2 points, beyond the 0.5-point band.
        assert_eq!(result.errors.as_ref().unwrap().verdict, Verdict::Fail);
        assert_eq!(result.verdict, Verdict::Fail);
        assert_eq!(result.new_error_types, ["LockTimeout"]);
        assert!(result.reason.starts_with("errors +2.00 points"), "{}", result.reason);
    }
}
