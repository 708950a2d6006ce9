//! `span-loop`: traces of `--spans` spans (a root and its children, entered and exited on one
//! thread, as `benches/benches/span_overhead.rs` makes them), `--traces` times, with the agent
//! running and nothing listening: a fixed workload for instruction counts of the span path
//! (`valgrind --tool=callgrind target/release/span-loop`) and for `perf`, where criterion's
//! timing loop would get in the way.

use clap::Parser;

#[derive(Parser)]
#[command(about = "A fixed number of traces through the agent, for profilers")]
struct Args {
    /// Traces made.
    #[arg(long, default_value_t = 2000)]
    traces: u64,
    /// Spans per trace, the root included.
    #[arg(long, default_value_t = 100)]
    spans: u64,
    /// Roots continue a trace whose caller did not sample it (as the bench's
    /// `sightline_unsampled`): the children are the unsampled path.
    #[arg(long)]
    unsampled: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _agent = sightline::init(sightline::Config {
        service: "span-loop".into(),
        collector: "http://127.0.0.1:9".into(),
        max_pending_spans: 0,
        ..Default::default()
    })?;
    let cpu_before = thread_cpu_ns();
    let caller = args.unsampled.then(sightline_benches::unsampled_caller);
    for _ in 0..args.traces {
        let _root = sightline::transaction("Login").child_of(caller.clone()).entered();
        for _ in 1..args.spans {
            let _child = sightline::span("child").entered();
        }
    }
    let cpu = thread_cpu_ns().zip(cpu_before).map(|(after, before)| after - before);
    println!(
        "{} traces of {} spans; dropped by the capped exporter: {}; application thread CPU: {}",
        args.traces,
        args.spans,
        sightline::dropped_spans(),
        cpu.map_or("unknown".into(), |ns| format!(
            "{:.1} ns a span",
            ns as f64 / (args.traces * args.spans) as f64
        )),
    );
    Ok(())
}

/// This thread's time on a CPU so far (Linux's schedstat, in nanoseconds): the span path's own
/// cost, apart from the exporter's thread.
fn thread_cpu_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}
