//! The comparison engine on simulated traffic with known truth, >= 1000 runs per scenario with
//! fixed seeds: realistic latency (a lognormal mixture: a fast path and a slow path, rare
//! spikes), per-block multiplicative drift, three BTs of different volumes, 30 one-minute
//! blocks per version. It prints, per scenario, how often the engine alarms (warn or fail), and
//! beside it how often a per-request Mann-Whitney test (the usual canary judge, one-sided at 1%,
//! on a 2000-request subsample per side) does on the same data.
//!
//! A/A (identical versions): alarms < 1%. Candidate 10% slower everywhere: caught >= 99%. Only
//! the slow path 20% slower (p99 +~20%, median unmoved): caught >= 95%. Error rate +1 point:
//! caught >= 95%.

use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Normal};
use sightline_compare::{compare, stats, Block, BtInput, Settings, Side, Verdict};
use sightline_proto::histogram;

const RUNS: usize = 1000;
const BLOCKS: usize = 30;

#[derive(Clone, Copy)]
struct Version {
    /// Multiplies every latency.
    all: f64,
    /// Multiplies the slow path's latencies only.
    slow_path: f64,
    error_rate: f64,
}

const SAME: Version = Version {
    all: 1.0,
    slow_path: 1.0,
    error_rate: 0.01,
};

/// Requests per minute, fast-path median ms.
const BTS: [(&str, u64, f64); 3] = [("Login", 600, 20.0), ("SendMessage", 240, 35.0), ("Search", 60, 120.0)];

struct Generated {
    side: Side,
    /// A subsample of Login's raw latencies, for the per-request test.
    login_sample: Vec<f64>,
}

fn generate(rng: &mut StdRng, bt_index: usize, version: Version) -> Generated {
    let (_, per_minute, median_ms) = BTS[bt_index];
    let fast: LogNormal<f64> = LogNormal::new((median_ms * 1000.0).ln(), 0.35).unwrap();
    let slow: LogNormal<f64> = LogNormal::new((median_ms * 4000.0).ln(), 0.5).unwrap();
    let drift: Normal<f64> = Normal::new(0.0, 0.06).unwrap();
    let mut side = Side::default();
    let mut login_sample = Vec::new();
    for _ in 0..BLOCKS {
        let block_factor = drift.sample(rng).exp() * version.all;
        let mut counts = std::collections::BTreeMap::new();
        let mut errors = 0;
        for _ in 0..per_minute {
            let slow_path = rng.random::<f64>() < 0.08;
            let mut micros = if slow_path {
                slow.sample(rng) * version.slow_path
            } else {
                fast.sample(rng)
            } * block_factor;
            if rng.random::<f64>() < 0.001 {
                micros *= 10.0; // a spike: GC, a lock, a retry
            }
            errors += u64::from(rng.random::<f64>() < version.error_rate);
            *counts.entry(histogram::bucket_of(micros as u64)).or_insert(0u64) += 1;
            if bt_index == 0 && login_sample.len() < 2000 && rng.random::<f64>() < 0.12 {
                login_sample.push(micros);
            }
        }
        side.blocks.push(Block {
            calls: per_minute,
            errors,
            histogram: counts.into_iter().collect(),
        });
    }
    Generated { side, login_sample }
}

/// (engine alarm rate, per-request Mann-Whitney alarm rate) over RUNS runs.
fn rates(seed: u64, candidate: Version) -> (f64, f64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let settings = Settings::default();
    let (mut engine_alarms, mut per_request_alarms) = (0, 0);
    for _ in 0..RUNS {
        let mut inputs = Vec::new();
        let mut samples = (Vec::new(), Vec::new());
        for (i, (bt, _, _)) in BTS.iter().enumerate() {
            let base = generate(&mut rng, i, SAME);
            let cand = generate(&mut rng, i, candidate);
            if i == 0 {
                samples = (base.login_sample, cand.login_sample);
            }
            inputs.push(BtInput {
                bt: bt.to_string(),
                baseline: base.side,
                candidate: cand.side,
            });
        }
        let report = compare(&inputs, &settings);
        engine_alarms += usize::from(report.verdict >= Verdict::Warn);
        per_request_alarms += usize::from(stats::mann_whitney_greater(&samples.0, &samples.1) < 0.01);
    }
    (
        engine_alarms as f64 / RUNS as f64,
        per_request_alarms as f64 / RUNS as f64,
    )
}

#[test]
fn blocks_keep_false_alarms_rare_and_catch_real_regressions() {
    let scenarios = [
        ("A/A, identical versions", SAME, 1),
        ("p50 +10% (everything 10% slower)", Version { all: 1.10, ..SAME }, 2),
        (
            "p99-only +20% (slow path 20% slower)",
            Version {
                slow_path: 1.20,
                ..SAME
            },
            3,
        ),
        (
            "errors +1 point",
            Version {
                error_rate: 0.02,
                ..SAME
            },
            4,
        ),
    ];
    let mut results = Vec::new();
    println!("scenario                                   engine alarms   per-request Mann-Whitney alarms   ({RUNS} runs each)");
    for (name, candidate, seed) in scenarios {
        let (engine, per_request) = rates(seed, candidate);
        println!("{name:42} {:>12.1}%   {:>12.1}%", engine * 100.0, per_request * 100.0);
        results.push(engine);
    }
    assert!(results[0] < 0.01, "A/A false alarms {:.1}%", results[0] * 100.0);
    assert!(results[1] >= 0.99, "10% p50 slowdown caught {:.1}%", results[1] * 100.0);
    assert!(
        results[2] >= 0.95,
        "20% p99-only slowdown caught {:.1}%",
        results[2] * 100.0
    );
    assert!(results[3] >= 0.95, "+1 point errors caught {:.1}%", results[3] * 100.0);
}
