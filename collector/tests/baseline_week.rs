//! A simulated week of steady traffic for three BTs, with daily seasonality (quiet nights, busy
//! afternoons), Poisson arrivals, a slow random drift and lognormal latencies, evaluated minute
//! by minute exactly as the collector's evaluator does (same baselines, same alert book). Normal
//! traffic may raise at most one alert per BT over the week; the same week with real incidents
//! (logins down 90%, AcceptChat failing, SendMessage slow) must page for each.

use std::collections::HashMap;

use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Binomial, Distribution, LogNormal, Normal, Poisson};
use sightline_collector::alerts::{
    baseline::{Baselines, Current, History, MinuteStats},
    book::{Book, Change},
    Kind,
};

const DAY: u32 = 1440;
const WEEK: u32 = 7 * DAY;
/// Monday 2026-11-16 00:00 UTC, in minutes.
const START: u32 = 1_763_251_200 / 60;

struct Bt {
    name: &'static str,
    /// Calls a minute at the daily peak.
    peak: f64,
    error_rate: f64,
    /// Median latency, ms.
    median_ms: f64,
}

const BTS: [Bt; 3] = [
    Bt {
        name: "Login",
        peak: 300.0,
        error_rate: 0.004,
        median_ms: 40.0,
    },
    Bt {
        name: "SendMessage",
        peak: 1200.0,
        error_rate: 0.001,
        median_ms: 15.0,
    },
    Bt {
        name: "AcceptChat",
        peak: 60.0,
        error_rate: 0.01,
        median_ms: 120.0,
    },
];

#[derive(Clone, Copy)]
enum Trouble {
    /// 90% of the calls never arrive (nobody can log in).
    Outage,
    /// 20% of the calls fail (the DB locks that broke AcceptChat).
    Failing,
    /// Every call four times slower.
    Slow,
}

/// A week of minutes for one BT, with `incident` (trouble, first minute, minutes).
fn simulate(bt: &Bt, seed: u64, incident: Option<(Trouble, u32, u32)>) -> History {
    let mut rng = StdRng::seed_from_u64(seed);
    let drift_step = Normal::new(0.0, 0.01).unwrap();
    let latency = LogNormal::new(bt.median_ms.ln(), 0.6).unwrap();
    let mut drift = 0.0f64;
    let mut history = History::new();
    for m in 0..WEEK {
        // Daily shape: from ~10% of the peak at 04:00 to the peak at 16:00 UTC.
        let phase = f64::from((m + DAY - 240) % DAY) / f64::from(DAY) * std::f64::consts::TAU;
        let shape = 0.55 - 0.45 * phase.cos();
        drift = (drift + drift_step.sample(&mut rng)).clamp(-0.1, 0.1);
        let mut mean = bt.peak * shape.clamp(0.08, 1.0) * (1.0 + drift);
        let trouble = incident
            .filter(|(_, from, len)| m >= *from && m < from + len)
            .map(|(t, _, _)| t);
        if let Some(Trouble::Outage) = trouble {
            mean *= 0.1;
        }
        let (error_rate, slowdown) = match trouble {
            Some(Trouble::Failing) => (0.2, 1.0),
            Some(Trouble::Slow) => (bt.error_rate, 4.0),
            _ => (bt.error_rate, 1.0),
        };
        let calls = Poisson::new(mean.max(0.1)).unwrap().sample(&mut rng) as u64;
        let errors = if calls == 0 {
            0
        } else {
            Binomial::new(calls, error_rate).unwrap().sample(&mut rng)
        };
        let p99_ms = (calls >= 20).then(|| {
            let mut sample: Vec<f64> = (0..calls.min(400))
                .map(|_| latency.sample(&mut rng) * slowdown)
                .collect();
            sample.sort_by(f64::total_cmp);
            sample[((sample.len() - 1) as f64 * 0.99).round() as usize]
        });
        if calls > 0 {
            history.insert(START + m, MinuteStats { calls, errors, p99_ms });
        }
    }
    history
}

/// Evaluates every minute after the first hour as the evaluator would; the firing events.
fn evaluate_week(histories: &HashMap<&'static str, History>) -> Vec<(u32, String, Kind, String)> {
    let mut baselines = Baselines::default();
    let mut book = Book::default();
    let kinds = [Kind::RateDrop, Kind::ErrorRate, Kind::Latency];
    let mut fired = Vec::new();
    for m in 60..WEEK {
        let minute = START + m;
        // Evaluations every 30 s over the minute that just ended.
        for offset in [60, 90] {
            let now = u64::from(minute) * 60 + offset;
            let mut findings = Vec::new();
            for bt in &BTS {
                let history = &histories[bt.name];
                let stats = history.get(&minute).copied().unwrap_or_default();
                let current = Current {
                    calls: stats.calls,
                    errors: stats.errors,
                    p99_ms: stats.p99_ms,
                };
                findings.extend(baselines.evaluate(now, "chat", bt.name, &current, history));
            }
            for event in book.apply(now, &kinds, findings) {
                if event.change == Change::Firing || event.change == Change::Changed {
                    fired.push((
                        m,
                        event.alert.subject.clone(),
                        event.alert.kind,
                        format!("{:?}", event.alert.severity),
                    ));
                }
            }
        }
    }
    fired
}

#[test]
fn a_week_of_normal_traffic_raises_at_most_one_alert_per_bt_and_an_outage_is_caught() {
    let histories: HashMap<&'static str, History> = BTS
        .iter()
        .enumerate()
        .map(|(i, bt)| (bt.name, simulate(bt, 7 + i as u64, None)))
        .collect();
    let fired = evaluate_week(&histories);
    let mut too_many = Vec::new();
    for bt in &BTS {
        let alerts: Vec<_> = fired.iter().filter(|(_, name, _, _)| name == bt.name).collect();
        let firing = alerts.len();
        println!("{}: {firing} alert events over the week: {alerts:?}", bt.name);
        if firing > 1 {
            too_many.push(format!("{} raised {firing} false alerts", bt.name));
        }
    }
    assert!(too_many.is_empty(), "{too_many:?}");

    // The same week with three incidents, ten minutes each: logins down 90% (last day,
    // 14:00), AcceptChat failing 20% (day 6, 10:00), SendMessage four times slower (day 5,
    // 15:00). Each must page, the first two within two minutes.
    let incidents = [
        ("Login", Trouble::Outage, 6 * DAY + 14 * 60, Kind::RateDrop, 2),
        ("AcceptChat", Trouble::Failing, 5 * DAY + 10 * 60, Kind::ErrorRate, 2),
        ("SendMessage", Trouble::Slow, 4 * DAY + 15 * 60, Kind::Latency, 4),
    ];
    let mut troubled = histories.clone();
    for (name, trouble, start, _, _) in incidents {
        let i = i_of(name);
        troubled.insert(name, simulate(&BTS[i], 7 + i as u64, Some((trouble, start, 10))));
    }
    let fired = evaluate_week(&troubled);
    for (name, _, start, kind, within) in incidents {
        let caught = fired
            .iter()
            .find(|(m, bt, k, severity)| *m >= start && bt == name && *k == kind && severity == "Critical")
            .unwrap_or_else(|| panic!("{name}'s incident raised no critical {kind:?} alert: {fired:?}"));
        let minutes = caught.0 - start;
        println!("{name}: critical {kind:?} alert {minutes} minute(s) after the incident began");
        assert!(minutes <= within, "{caught:?}");
    }
}

fn i_of(name: &str) -> usize {
    BTS.iter().position(|b| b.name == name).expect("a simulated BT")
}
