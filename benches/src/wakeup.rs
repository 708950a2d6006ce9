//! `wakeup-cost`: the CPU a thread is charged for each time it wakes from sleep, the unit of the
//! agent exporter's fixed cost (it sleeps between flushes). Measured from the kernel's run time
//! of the thread (`/proc/thread-self/schedstat`), which is what a service's CPU figure counts,
//! for a plain `std::thread::sleep` loop and for a tokio current-thread runtime's `interval` (the
//! exporter's kind of timer), at the given periods.
//!
//! Run: `target/release/wakeup-cost [--periods-ms 10,100,1000] [--seconds 10]` (pin it with
//! `taskset -c 1` to measure on the service's CPU of `service-overhead --service-cpu 1`).

use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Sleep periods to measure, ms.
    #[arg(long, value_delimiter = ',', default_values_t = [10u64, 100, 1000])]
    periods_ms: Vec<u64>,
    /// Measured seconds per period and kind.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// This thread's run time so far, ns.
fn run_ns() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let first = stat.split_whitespace().next().unwrap_or_default();
    Ok(first.parse()?)
}

/// Run time and wake-ups of `periods` sleeps of `period` in the way `kind` sleeps.
fn measure(kind: &str, period: Duration, periods: u64) -> anyhow::Result<(u64, u64)> {
    let kind = kind.to_owned();
    std::thread::spawn(move || -> anyhow::Result<(u64, u64)> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let switches = || -> u64 {
            std::fs::read_to_string("/proc/thread-self/status")
                .ok()
                .and_then(|status| {
                    status
                        .lines()
                        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
                        .and_then(|n| n.trim().parse().ok())
                })
                .unwrap_or(0)
        };
        let (start, woken) = (run_ns()?, switches());
        match kind.as_str() {
            "sleep" => (0..periods).for_each(|_| std::thread::sleep(period)),
            _ => runtime.block_on(async {
                let mut ticks = tokio::time::interval(period);
                for _ in 0..=periods {
                    ticks.tick().await;
                }
            }),
        }
        Ok((run_ns()? - start, switches() - woken))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("measuring thread panicked"))?
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("kind              period   CPU a second   wake-ups a second   CPU a wake-up");
    for &ms in &args.periods_ms {
        let period = Duration::from_millis(ms.max(1));
        let periods = (args.seconds * 1000 / ms.max(1)).max(1);
        for kind in ["sleep", "tokio interval"] {
            let (ns, wakeups) = measure(kind, period, periods)?;
            let seconds = (periods * ms.max(1)) as f64 / 1000.0;
            println!(
                "{kind:<16} {ms:>5} ms   {:>9.0} us   {:>17.1}   {:>10.1} us",
                ns as f64 / seconds / 1000.0,
                wakeups as f64 / seconds,
                ns as f64 / wakeups.max(1) as f64 / 1000.0
            );
        }
    }
    Ok(())
}
