//! `service-overhead`: an axum service (examples' `hello-service`) at a fixed request rate, bare
//! and with the agent (server layer, a child span per request, exporting to a real collector),
//! alternating for `--rounds` rounds in the same run (medians reported: single runs on this
//! shared machine moved +-30%). Requests are sent open-loop on a fixed schedule, each in its own
//! task, so a slow response never delays the next request; latency counts from the moment each
//! request is sent (tokio's millisecond timer would otherwise add up to 1 ms of pacing slack to
//! every figure). The service's CPU comes from /proc. With `--interleave-ms`, every mode's
//! service runs at once and the load moves between them slice by slice, so that the modes
//! share the machine's noise and their ratios come with bootstrap intervals (benches/README.md).
//! With `--mix-ms`, every mode's service runs at once and the requests themselves are dealt
//! among them in turn, so that the host's stalls of a few milliseconds fall on every mode alike.
//!
//! Run: cargo build --release -p sightline-collector -p sightline-examples -p sightline-benches \
//!        && target/release/service-overhead

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::bail;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use sightline_benches::{collector_binary, cpu_seconds, data_dir_env, rss_mib, thread_cpu_seconds, CollectorProcess};
use sightline_compare::stats::{block_bootstrap, BlockHistograms};
use sightline_proto::v1::{agent_message, agent_server, collector_message, Ack, AgentMessage, CollectorMessage};

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
    /// Bare/agent pairs, alternating; the medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The agent's sampling ratio (and the peers').
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
    /// Also run, in every round, the agent with its collector absent (a closed port) beside
    /// the agent exporting to the collector: what a collector outage does to the service,
    /// compared with the agent's normal overhead measured in the same run.
    #[arg(long)]
    collector_absent_too: bool,
    /// The agent sends to an acknowledging sink in this tool (decodes each batch, answers its
    /// acknowledgement, keeps nothing) instead of the collector and ClickHouse: the agent's own
    /// cost, without the backend's work on the machine the load generator shares.
    #[arg(long)]
    sink: bool,
    /// Only serve the acknowledging sink on this address until interrupted (for measuring the
    /// service by other means, e.g. instruction counts under callgrind; benches/README.md).
    #[arg(long)]
    serve_sink: Option<std::net::SocketAddr>,
    /// Run every mode's service at once and move the load from one to the next every this
    /// many milliseconds (a round: one slice per mode, the order rotated each round), instead
    /// of one service after another for `--seconds` each. Every mode then sees the same
    /// minutes of this shared machine; the ratios to bare come with 95% intervals from a
    /// bootstrap over rounds. `--rounds` counts rounds; `--warmup` warms each service first.
    #[arg(long)]
    interleave_ms: Option<u64>,
    /// Run every mode's service at once and deal the requests among them in turn (cycles of
    /// one request a mode, each cycle in a random order; `--rate` is the total), measured in
    /// blocks of this many milliseconds. The host's stalls then fall on every mode within the
    /// same milliseconds, not only the same minutes as with `--interleave-ms`; ratios to bare
    /// come with 95% intervals from a bootstrap over blocks. `--rounds` counts blocks.
    #[arg(long, conflicts_with = "interleave_ms")]
    mix_ms: Option<u64>,
    /// Also run, in every round, the agent put on each handler (`ServerLayer::handler`,
    /// hello-service `--traced-handlers`) instead of on the router: without axum's per-route
    /// boxed service that any router layer adds.
    #[arg(long)]
    traced_handlers_too: bool,
    /// Also run, in every round, the service traced by fastrace and by the OpenTelemetry SDK
    /// instead of the agent (hello-service `--peer`: each as a `from_fn` middleware on the
    /// router, its spans discarded rather than exported), and with that middleware tracing
    /// nothing: the peers' cost on the same request.
    #[arg(long)]
    peers_too: bool,
    /// Rounds of CPU work in each request's handler (hello-service `--work-rounds`; 20,000 is
    /// ~20 us here, a 35-us request): the request's weight, against which the tracers' fixed
    /// cost a request is a share.
    #[arg(long, default_value_t = 20_000)]
    work_rounds: u64,
    /// Also run, in every round, the bare service with 10% more work in its handler (a tenth
    /// of `--work-rounds` more rounds): a difference of known sign, which the run's intervals
    /// must find, to show what this machine lets a run resolve.
    #[arg(long)]
    control_too: bool,
}

/// How much more work the control's handler does (`--control-too`), in percent.
const CONTROL_PERCENT: u64 = 10;

/// How a mode's service is traced.
#[derive(Clone, Copy)]
enum Tracing<'a> {
    Bare,
    /// Bare, its handler doing this many percent more work: a known difference (see
    /// `--control-too`).
    Heavier(u64),
    Agent(AgentMode<'a>),
    /// hello-service `--peer` with this value.
    Peer(&'static str),
}

/// A mode's agent: where it sends, and whether it wraps the handlers instead of the router.
#[derive(Clone, Copy)]
struct AgentMode<'a> {
    collector: &'a str,
    traced_handlers: bool,
}

impl<'a> AgentMode<'a> {
    fn on_router(collector: &'a str) -> Tracing<'a> {
        Tracing::Agent(Self {
            collector,
            traced_handlers: false,
        })
    }
}

/// The `sightline.v1` service at its smallest: every batch acknowledged, nothing kept.
struct AckSink;

#[tonic::async_trait]
impl agent_server::Agent for AckSink {
    type StreamStream = tokio_stream::wrappers::ReceiverStream<Result<CollectorMessage, tonic::Status>>;

    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<AgentMessage>>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(agent_message::Body::Batch(batch)) = message.body {
                    let ack = CollectorMessage {
                        body: Some(collector_message::Body::Ack(Ack {
                            batch_id: batch.batch_id,
                        })),
                    };
                    if tx.send(Ok(ack)).await.is_err() {
                        break;
                    }
                }
            }
        });
        Ok(tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

/// Serves [`AckSink`] on a free local port; its address.
async fn start_sink(address: std::net::SocketAddr) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let address = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(agent_server::AgentServer::new(AckSink))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(format!("http://{address}"))
}

/// The agent's exporter thread's name (as the kernel shortens it).
const EXPORTER_THREAD: &str = "sightline-expor";

/// Where the agent sends when its collector is away: nothing listens on port 1.
const CLOSED_PORT: &str = "http://127.0.0.1:1";

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Outcome {
    p50_us: f64,
    p99_us: f64,
    cpu_cores: f64,
    /// Of which the agent's exporter thread.
    exporter_cores: f64,
    errors: u64,
    /// The service's resident memory: highest reading, and the mean of the measured period's
    /// last tenth (a rise to the end is an agent holding more and more).
    rss_peak_mib: f64,
    rss_end_mib: f64,
}

/// Open-loop load: request i is sent at start + i/rate; its latency counts from its send.
async fn load(client: &HttpClient, url: &str, rate: u64, duration: Duration) -> (Vec<u64>, u64) {
    let (mut latencies, errors) = load_dealt(&[(client, url)], |_| 0, rate, duration).await;
    (latencies.pop().unwrap_or_default(), errors)
}

/// Open-loop load over several services: request i is sent at start + i/rate to the target
/// `deal(i)` names. Each target's latencies, and the failed requests of all.
async fn load_dealt(
    targets: &[(&HttpClient, &str)],
    deal: impl Fn(u64) -> usize,
    rate: u64,
    duration: Duration,
) -> (Vec<Vec<u64>>, u64) {
    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let at = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        tokio::time::sleep_until(at).await;
        let target = deal(i);
        let (client, url) = (targets[target].0.clone(), format!("{}/users/{i}", targets[target].1));
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let ok = match client.get(url.parse().unwrap()).await {
                Ok(response) => response.status().is_success() && response.into_body().collect().await.is_ok(),
                Err(_) => false,
            };
            (target, sent.elapsed().as_micros() as u64, ok)
        }));
    }
    let mut latencies = vec![Vec::with_capacity(tasks.len() / targets.len() + 1); targets.len()];
    let mut errors = 0;
    for task in tasks {
        let (target, micros, ok) = task.await.unwrap();
        latencies[target].push(micros);
        errors += u64::from(!ok);
    }
    (latencies, errors)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Starts `hello-service` traced as `tracing` says and waits until it answers; the process and
/// its URL.
async fn start_service(binary: &PathBuf, tracing: Tracing<'_>, args: &Args) -> anyhow::Result<(Service, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let work_rounds = match tracing {
        Tracing::Heavier(percent) => args.work_rounds * (100 + percent) / 100,
        _ => args.work_rounds,
    };
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
        .args(["--work-rounds", &work_rounds.to_string()])
        .stdout(Stdio::null());
    if let Tracing::Peer(peer) = tracing {
        command.args(["--peer", peer, "--sampling-ratio", &args.sampling_ratio.to_string()]);
    }
    if let Tracing::Agent(agent) = tracing {
        command.args([
            "--collector",
            agent.collector,
            "--sampling-ratio",
            &args.sampling_ratio.to_string(),
        ]);
        if agent.traced_handlers {
            command.arg("--traced-handlers");
        }
    }
    let service = Service(command.spawn()?);
    let url = format!("http://127.0.0.1:{port}");
    let ready = Instant::now();
    while http_client().get(format!("{url}/users/1").parse()?).await.is_err() {
        if ready.elapsed() > Duration::from_secs(30) {
            bail!("service did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((service, url))
}

async fn run(binary: &PathBuf, tracing: Tracing<'_>, args: &Args) -> anyhow::Result<Outcome> {
    let (service, url) = start_service(binary, tracing, args).await?;
    let client = http_client();
    load(&client, &url, args.rate, Duration::from_secs(args.warmup)).await;
    let cpu = cpu_seconds(service.0.id());
    let exporter_cpu = thread_cpu_seconds(service.0.id(), EXPORTER_THREAD);
    let started = Instant::now();
    let pid = service.0.id();
    let readings = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let rss_sampler = tokio::spawn({
        let readings = readings.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                readings.lock().expect("sampler").push(rss_mib(pid).0);
            }
        }
    });
    let (mut latencies, errors) = load(&client, &url, args.rate, Duration::from_secs(args.seconds)).await;
    let cpu_cores = (cpu_seconds(service.0.id()) - cpu) / started.elapsed().as_secs_f64();
    let exporter_cores =
        (thread_cpu_seconds(service.0.id(), EXPORTER_THREAD) - exporter_cpu) / started.elapsed().as_secs_f64();
    rss_sampler.abort();
    let mut readings = std::mem::take(&mut *readings.lock().expect("sampler"));
    if readings.is_empty() {
        readings.push(rss_mib(pid).0);
    }
    let last_tenth = &readings[readings.len() - (readings.len() / 10).max(1)..];
    let rss_end_mib = last_tenth.iter().sum::<f64>() / last_tenth.len() as f64;
    let rss_peak_mib = readings.iter().copied().fold(0.0, f64::max);
    latencies.sort_unstable();
    let pct = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize] as f64;
    Ok(Outcome {
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        cpu_cores,
        exporter_cores,
        errors,
        rss_peak_mib,
        rss_end_mib,
    })
}

/// Each figure's median over the rounds.
fn median(outcomes: &[Outcome]) -> Outcome {
    let of = |f: fn(&Outcome) -> f64| {
        let mut values: Vec<f64> = outcomes.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Outcome {
        p50_us: of(|o| o.p50_us),
        p99_us: of(|o| o.p99_us),
        cpu_cores: of(|o| o.cpu_cores),
        exporter_cores: of(|o| o.exporter_cores),
        errors: outcomes.iter().map(|o| o.errors).sum(),
        rss_peak_mib: of(|o| o.rss_peak_mib),
        rss_end_mib: of(|o| o.rss_end_mib),
    }
}

/// Latencies on a shared axis for the bootstrap: exact to 1 ms, three significant digits above
/// (the axis stays short however long the tail).
fn latency_bucket(micros: u64) -> u64 {
    let mut scale = 1;
    while micros / scale >= 1000 {
        scale *= 10;
    }
    micros / scale * scale
}

/// What a run of every mode's services at once measured, round by round (a round: a slice of
/// each mode, or a block of dealt requests).
struct Rounds<'m> {
    names: Vec<&'m str>,
    /// Per mode, per round: the sparse latency histogram of its requests in the round.
    histograms: Vec<Vec<Vec<(u64, u64)>>>,
    /// Per mode, per round: its process's CPU seconds over the whole round (work the agent's
    /// exporter does after its slice included).
    cpu: Vec<Vec<f64>>,
    requests: Vec<u64>,
    errors: u64,
}

impl<'m> Rounds<'m> {
    fn new(modes: &[(&'m str, Tracing<'_>)]) -> Self {
        Self {
            names: modes.iter().map(|(name, _)| *name).collect(),
            histograms: vec![Vec::new(); modes.len()],
            cpu: vec![Vec::new(); modes.len()],
            requests: vec![0; modes.len()],
            errors: 0,
        }
    }

    /// Adds a round: each mode's latencies in it, and its CPU seconds over it.
    fn push(&mut self, latencies: Vec<Vec<u64>>, cpu: &[f64], errors: u64) {
        self.errors += errors;
        let mut p99 = Vec::new();
        for (m, mut latencies) in latencies.into_iter().enumerate() {
            self.requests[m] += latencies.len() as u64;
            latencies.sort_unstable();
            p99.push(latencies.get(latencies.len() * 99 / 100).copied().unwrap_or(0));
            let mut sparse: Vec<(u64, u64)> = Vec::new();
            for micros in latencies {
                let bucket = latency_bucket(micros);
                match sparse.last_mut() {
                    Some((last, count)) if *last == bucket => *count += 1,
                    _ => sparse.push((bucket, 1)),
                }
            }
            self.histograms[m].push(sparse);
            self.cpu[m].push(cpu[m]);
        }
        println!(
            "  round {:3}  p99 {}  CPU {}",
            self.cpu[0].len(),
            self.names
                .iter()
                .zip(&p99)
                .map(|(name, p)| format!("{name} {p:6} us"))
                .collect::<Vec<_>>()
                .join(", "),
            self.names
                .iter()
                .zip(cpu)
                .map(|(name, c)| format!("{name} {:.1} ms", c * 1e3))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    /// Each mode's pooled figures, and its ratios to bare (the first mode) with 95% intervals.
    fn report(&self, what: &str) {
        let rounds = self.cpu[0].len();
        let mut axis: Vec<u64> = self.histograms.iter().flatten().flatten().map(|&(b, _)| b).collect();
        axis.sort_unstable();
        axis.dedup();
        let pooled: Vec<BlockHistograms> = self
            .histograms
            .iter()
            .map(|blocks| BlockHistograms::new(axis.clone(), &blocks.iter().map(Vec::as_slice).collect::<Vec<_>>()))
            .collect();
        let all: Vec<usize> = (0..rounds).collect();
        let quantile = |m: usize, blocks: &[usize], q: f64| pooled[m].quantile(blocks, q).unwrap_or(0) as f64;
        let cpu_of = |m: usize, blocks: &[usize]| blocks.iter().map(|&r| self.cpu[m][r]).sum::<f64>();
        println!("  {rounds} {what}, {} errors", self.errors);
        for (m, name) in self.names.iter().enumerate() {
            println!(
                "  {name:6}  p50 {:5.0} us  p90 {:5.0} us  p99 {:6.0} us  CPU {:.1} us a request",
                quantile(m, &all, 0.5),
                quantile(m, &all, 0.9),
                quantile(m, &all, 0.99),
                cpu_of(m, &all) / self.requests[m].max(1) as f64 * 1e6
            );
        }
        // Rounds resampled whole and the same rounds for both modes: a round's minutes of this
        // machine are shared by its slices (or its dealt requests), which is what makes the
        // modes comparable.
        let mut rng = StdRng::seed_from_u64(7);
        for (m, name) in self.names.iter().enumerate().skip(1) {
            let ratios = |statistic: &dyn Fn(&[usize]) -> f64, rng: &mut StdRng| {
                let mut resampled = block_bootstrap(rounds, 2000, rng, |drawn| Some(statistic(drawn)));
                resampled.sort_by(f64::total_cmp);
                let at = |q: f64| resampled[((resampled.len() - 1) as f64 * q).round() as usize];
                format!("{:+.1}% [{:+.1}%, {:+.1}%]", statistic(&all), at(0.025), at(0.975))
            };
            let p99 = |drawn: &[usize]| (quantile(m, drawn, 0.99) / quantile(0, drawn, 0.99) - 1.0) * 100.0;
            let p50 = |drawn: &[usize]| (quantile(m, drawn, 0.5) / quantile(0, drawn, 0.5) - 1.0) * 100.0;
            // CPU a request: in a dealt block the modes' request counts differ by one or two.
            let requests = |m: usize, blocks: &[usize]| -> f64 {
                blocks
                    .iter()
                    .map(|&r| self.histograms[m][r].iter().map(|&(_, n)| n).sum::<u64>())
                    .sum::<u64>() as f64
            };
            let cpu = |drawn: &[usize]| {
                (cpu_of(m, drawn) / requests(m, drawn) / (cpu_of(0, drawn) / requests(0, drawn)) - 1.0) * 100.0
            };
            println!(
                "  {name} / bare (95% interval): p99 {}, p50 {}, CPU {}",
                ratios(&p99, &mut rng),
                ratios(&p50, &mut rng),
                ratios(&cpu, &mut rng)
            );
            // The pooled p99 is set by the rounds the host stalled most; each round's own p99
            // ratio weighs quiet rounds alike.
            let mut each: Vec<f64> = (0..rounds).map(|r| p99(&[r])).collect();
            each.sort_by(f64::total_cmp);
            // The median's 95% interval by the sign test (normal approximation).
            let reach = (1.96 * (rounds as f64).sqrt() / 2.0).ceil() as usize;
            let (low, high) = ((rounds / 2).saturating_sub(reach), (rounds / 2 + reach).min(rounds - 1));
            println!(
                "  {name} / bare, each round's p99: median {:+.1}% [{:+.1}%, {:+.1}%], higher than bare's in {} of {rounds}",
                each[rounds / 2],
                each[low],
                each[high],
                each.iter().filter(|&&r| r > 0.0).count()
            );
        }
    }
}

/// Starts every mode's service and warms each; the services and a client for each.
async fn start_all(
    binary: &PathBuf,
    modes: &[(&str, Tracing<'_>)],
    args: &Args,
) -> anyhow::Result<(Vec<(Service, String)>, Vec<HttpClient>)> {
    let mut services = Vec::new();
    for (_, tracing) in modes {
        services.push(start_service(binary, *tracing, args).await?);
    }
    let clients: Vec<HttpClient> = modes.iter().map(|_| http_client()).collect();
    for ((_, url), client) in services.iter().zip(&clients) {
        load(client, url, args.rate, Duration::from_secs(args.warmup)).await;
    }
    Ok((services, clients))
}

/// Every process's CPU seconds so far: its threads' run time in ns (`schedstat`), since
/// /proc/<pid>/stat's 10-ms ticks are too coarse for a slice.
fn cpu_now(services: &[(Service, String)]) -> Vec<f64> {
    services.iter().map(|(s, _)| thread_cpu_seconds(s.0.id(), "")).collect()
}

/// Every process's CPU seconds since `before` (a [`cpu_now`] reading).
fn cpu_since(services: &[(Service, String)], before: &[f64]) -> Vec<f64> {
    cpu_now(services)
        .iter()
        .zip(before)
        .map(|(now, then)| now - then)
        .collect()
}

/// Every mode's service at once, the load moved between them slice by slice (see
/// `--interleave-ms`).
async fn interleaved(
    binary: &PathBuf,
    modes: &[(&str, Tracing<'_>)],
    slice: Duration,
    args: &Args,
) -> anyhow::Result<()> {
    let (services, clients) = start_all(binary, modes, args).await?;
    let mut rounds = Rounds::new(modes);
    for round in 0..args.rounds.max(2) {
        let before = cpu_now(&services);
        let mut latencies = vec![Vec::new(); modes.len()];
        let mut errors = 0;
        for k in 0..modes.len() {
            let m = (round + k) % modes.len();
            let (slice_latencies, failed) = load(&clients[m], &services[m].1, args.rate, slice).await;
            latencies[m] = slice_latencies;
            errors += failed;
        }
        rounds.push(latencies, &cpu_since(&services, &before), errors);
    }
    rounds.report(&format!(
        "rounds of {} ms a mode at {} requests/s",
        slice.as_millis(),
        args.rate
    ));
    Ok(())
}

/// Every mode's service at once, the requests dealt among them in turn (see `--mix-ms`).
async fn mixed(binary: &PathBuf, modes: &[(&str, Tracing<'_>)], block: Duration, args: &Args) -> anyhow::Result<()> {
    let (services, clients) = start_all(binary, modes, args).await?;
    let targets: Vec<(&HttpClient, &str)> = clients
        .iter()
        .zip(&services)
        .map(|(c, (_, url))| (c, url.as_str()))
        .collect();
    let mut rng = StdRng::seed_from_u64(11);
    let mut rounds = Rounds::new(modes);
    let per_block = (args.rate as f64 * block.as_secs_f64()).round() as usize;
    for _ in 0..args.rounds.max(2) {
        // Cycles of one request a mode, each cycle in a fresh order: no mode always follows
        // the same other one (whose work would leave the caches as it left them).
        let mut order: Vec<usize> = Vec::with_capacity(per_block + modes.len());
        while order.len() < per_block {
            let mut cycle: Vec<usize> = (0..modes.len()).collect();
            cycle.shuffle(&mut rng);
            order.extend(cycle);
        }
        let before = cpu_now(&services);
        let (latencies, errors) = load_dealt(&targets, |i| order[i as usize], args.rate, block).await;
        rounds.push(latencies, &cpu_since(&services, &before), errors);
    }
    rounds.report(&format!(
        "blocks of {} ms, {} requests/s dealt among {} modes",
        block.as_millis(),
        args.rate,
        modes.len()
    ));
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(address) = args.serve_sink {
        println!("acknowledging sink at {}", start_sink(address).await?);
        tokio::signal::ctrl_c().await?;
        return Ok(());
    }
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
    // A real collector on its private ClickHouse receives the agent's data: a separate process
    // under SCHED_IDLE (ClickHouse, its child, inherits it), so that it runs only in the CPU
    // time this tool's load generator leaves. Run in this process, its ingest work shared the
    // generator's runtime and showed as milliseconds of service "latency".
    let data = tempfile::tempdir()?;
    let mut command = Command::new("chrt");
    command.args(["--idle", "0"]).arg(collector_binary()?);
    let collector = CollectorProcess::start(command, &[data_dir_env(data.path())]).await?;
    let grpc = if args.sink {
        start_sink(([127, 0, 0, 1], 0).into()).await?
    } else {
        format!("http://127.0.0.1:{}", collector.grpc)
    };

    println!(
        "service-overhead: {} requests/s for {} s per mode, {} rounds, agent sampling {}, handler work {} rounds",
        args.rate, args.seconds, args.rounds, args.sampling_ratio, args.work_rounds
    );
    // The modes of a round, in the order they run: the service bare, with the agent, and
    // optionally with the agent while its collector is away. (name, where the agent sends)
    let collector_address = args.agent_collector.as_deref().unwrap_or(&grpc);
    let mut modes: Vec<(&str, Tracing)> = vec![
        ("bare", Tracing::Bare),
        ("agent", AgentMode::on_router(collector_address)),
    ];
    if args.collector_absent_too {
        modes.push(("absent", AgentMode::on_router(CLOSED_PORT)));
    }
    if args.traced_handlers_too {
        let agent = AgentMode {
            collector: collector_address,
            traced_handlers: true,
        };
        modes.push(("handlers", Tracing::Agent(agent)));
    }
    if args.control_too {
        modes.push(("heavier", Tracing::Heavier(CONTROL_PERCENT)));
    }
    if args.peers_too {
        modes.push(("from_fn", Tracing::Peer("middleware")));
        modes.push(("fastrace", Tracing::Peer("fastrace")));
        modes.push(("otel", Tracing::Peer("opentelemetry")));
    }
    if let Some(block_ms) = args.mix_ms {
        mixed(&binary, &modes, Duration::from_millis(block_ms), &args).await?;
        drop(collector);
        return Ok(());
    }
    if let Some(slice_ms) = args.interleave_ms {
        interleaved(&binary, &modes, Duration::from_millis(slice_ms), &args).await?;
        drop(collector);
        return Ok(());
    }
    let mut outcomes: Vec<Vec<Outcome>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.rounds.max(1) {
        for ((name, tracing), outcomes) in modes.iter().zip(&mut outcomes) {
            let o = run(&binary, *tracing, &args).await?;
            println!(
                "  round {round} {name:6}  p50 {:7.0} us  p99 {:7.0} us  service CPU {:.4} cores \
                 (exporter {:.4})  errors {}  RSS peak {:.1} MiB, at the end {:.1} MiB",
                o.p50_us, o.p99_us, o.cpu_cores, o.exporter_cores, o.errors, o.rss_peak_mib, o.rss_end_mib
            );
            outcomes.push(o);
        }
    }
    let medians: Vec<Outcome> = outcomes.iter().map(|o| median(o)).collect();
    for ((name, _), o) in modes.iter().zip(&medians) {
        println!(
            "  median {name:6}  p50 {:7.0} us  p99 {:7.0} us  service CPU {:.4} cores (exporter {:.4})  \
             RSS peak {:.1} MiB",
            o.p50_us, o.p99_us, o.cpu_cores, o.exporter_cores, o.rss_peak_mib
        );
    }
    let bare = &medians[0];
    for ((name, _), o) in modes.iter().zip(&medians).skip(1) {
        println!(
            "  {name} / bare: p99 {:+.1}%, p50 {:+.1}%, CPU {:+.1}%",
            (o.p99_us / bare.p99_us - 1.0) * 100.0,
            (o.p50_us / bare.p50_us - 1.0) * 100.0,
            (o.cpu_cores / bare.cpu_cores - 1.0) * 100.0
        );
    }
    if args.collector_absent_too {
        let (agent, absent) = (&medians[1], &medians[2]);
        println!(
            "  absent / agent: p99 {:+.1}%, p50 {:+.1}%, CPU {:+.1}%",
            (absent.p99_us / agent.p99_us - 1.0) * 100.0,
            (absent.p50_us / agent.p50_us - 1.0) * 100.0,
            (absent.cpu_cores / agent.cpu_cores - 1.0) * 100.0
        );
    }
    drop(collector);
    Ok(())
}
