//! `service-overhead`: an axum service (examples' `hello-service`) at a fixed request rate, bare
//! and with the agent (server layer, a child span per request, exporting to a real collector),
//! one after the other in the same run. Latency is measured open-loop from each request's
//! scheduled time (no coordinated omission); the service's CPU comes from /proc.
//!
//! Run: cargo build --release -p sightline-collector -p sightline-examples -p sightline-benches \
//!        && target/release/service-overhead

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::bail;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use sightline_collector::{testing, Collector};

#[derive(Parser)]
#[command(about = "Service latency and CPU with and without the sightline agent")]
struct Args {
    /// Requests per second.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Measured seconds per mode.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Unmeasured seconds before each measurement.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// The agent's sampling ratio.
    #[arg(long, default_value_t = 1.0)]
    sampling_ratio: f64,
    /// Pin the service to this CPU and this tool (load, collector; ClickHouse inherits) to the
    /// others, so the service does not share its core with what measures it.
    #[arg(long)]
    service_cpu: Option<usize>,
    /// Send the agent's data here instead of to the bench's collector (e.g. a closed port, to
    /// see the agent without its export work).
    #[arg(long)]
    agent_collector: Option<String>,
}

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

struct Outcome {
    p50_us: f64,
    p99_us: f64,
    cpu_cores: f64,
    errors: u64,
}

/// Open-loop load: request i is sent at start + i/rate, latency counted from then.
async fn load(url: &str, rate: u64, duration: Duration) -> (Vec<u64>, u64) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let total = rate * duration.as_secs();
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let at = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        tokio::time::sleep_until(at).await;
        let (client, url) = (client.clone(), format!("{url}/users/{i}"));
        tasks.push(tokio::spawn(async move {
            let ok = match client.get(url.parse().unwrap()).await {
                Ok(response) => response.status().is_success() && response.into_body().collect().await.is_ok(),
                Err(_) => false,
            };
            (at.elapsed().as_micros() as u64, ok)
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    for task in tasks {
        let (micros, ok) = task.await.unwrap();
        latencies.push(micros);
        errors += u64::from(!ok);
    }
    (latencies, errors)
}

async fn run(binary: &PathBuf, collector: Option<&str>, args: &Args) -> anyhow::Result<Outcome> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut command = match args.service_cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string()]).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    command
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null());
    if let Some(collector) = collector {
        command.args([
            "--collector",
            collector,
            "--sampling-ratio",
            &args.sampling_ratio.to_string(),
        ]);
    }
    let service = Service(command.spawn()?);
    let url = format!("http://127.0.0.1:{port}");
    let ready = Instant::now();
    while Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>()
        .get(format!("{url}/users/1").parse()?)
        .await
        .is_err()
    {
        if ready.elapsed() > Duration::from_secs(30) {
            bail!("service did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load(&url, args.rate, Duration::from_secs(args.warmup)).await;
    let cpu = cpu_seconds(service.0.id());
    let started = Instant::now();
    let (mut latencies, errors) = load(&url, args.rate, Duration::from_secs(args.seconds)).await;
    let cpu_cores = (cpu_seconds(service.0.id()) - cpu) / started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize] as f64;
    Ok(Outcome {
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        cpu_cores,
        errors,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(cpu) = args.service_cpu {
        // Everything else here, and the ClickHouse child started below, on the other CPUs.
        let others: Vec<String> = (0..std::thread::available_parallelism()?.get())
            .filter(|&c| c != cpu)
            .map(|c| c.to_string())
            .collect();
        let pid = std::process::id().to_string();
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", &others.join(","), &pid])
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("taskset failed");
        }
    }
    let binary = std::env::current_exe()?.with_file_name("hello-service");
    if !binary.exists() {
        bail!(
            "{} not found: cargo build --release -p sightline-examples",
            binary.display()
        );
    }
    // A real collector on a private ClickHouse receives the agent's data.
    let collector = Collector::start(testing::config("overhead")).await?;
    let grpc = format!("http://{}", collector.grpc_addr);
    let collector = Arc::new(tokio::sync::Mutex::new(Some(collector)));

    let bare = run(&binary, None, &args).await?;
    let agent = run(&binary, Some(args.agent_collector.as_deref().unwrap_or(&grpc)), &args).await?;
    println!(
        "service-overhead: {} requests/s for {} s per mode, agent sampling {}",
        args.rate, args.seconds, args.sampling_ratio
    );
    for (name, o) in [("bare", &bare), ("agent", &agent)] {
        println!(
            "  {name:5}  p50 {:7.0} us  p99 {:7.0} us  service CPU {:.3} cores  errors {}",
            o.p50_us, o.p99_us, o.cpu_cores, o.errors
        );
    }
    println!(
        "  agent / bare: p99 {:+.1}%, p50 {:+.1}%, CPU {:+.1}%",
        (agent.p99_us / bare.p99_us - 1.0) * 100.0,
        (agent.p50_us / bare.p50_us - 1.0) * 100.0,
        (agent.cpu_cores / bare.cpu_cores - 1.0) * 100.0
    );
    if let Some(collector) = collector.lock().await.take() {
        collector.shutdown().await?;
    }
    Ok(())
}
