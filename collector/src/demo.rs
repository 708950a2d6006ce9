//! `sightline demo`: the collector on its private ClickHouse, the example chat app's services
//! (examples' `demo-service`) as child processes instrumented with the agent, steady load, and
//! the two incidents Sightline exists for, replayed:
//!
//! 1. version 1.5.0 of the agent workspace runs as a canary beside 1.4.2 and waits on a DB lock
//!    in AcceptChat: the comparison marks it regressed in the db stage and the gate fails it;
//! 2. auth's session cache stalls: Login requests pile up inside `redis GET session` (stuck
//!    BTs, before any of them finishes) and the auth -> redis:sessions edge turns critical.

use std::{net::SocketAddr, path::PathBuf, process::Stdio, sync::Arc, time::Duration};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::{process::Child, sync::watch, task::JoinSet};

use crate::{gate, Collector, Config};

/// The service the comparison and the gate judge, and its two versions.
pub const COMPARED_SERVICE: &str = "workspace";
pub const BASELINE: &str = "1.4.2";
pub const CANDIDATE: &str = "1.5.0";

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The examples' `demo-service` binary.
    pub service_binary: PathBuf,
    /// The collector's configuration (ports, ClickHouse, data folder).
    pub collector: Config,
    /// When the gate compares the workspace's two versions (it needs five 10-second blocks of
    /// each).
    pub gate_after: Duration,
    /// When auth's session cache stalls, and for how long.
    pub stall_after: Duration,
    pub stall_for: Duration,
    /// Requests per second into the gateway, all BTs together.
    pub requests_per_sec: f64,
}

impl DemoOptions {
    /// The demo's default timeline with the collector on `collector`.
    pub fn new(service_binary: PathBuf, collector: Config) -> Self {
        Self {
            service_binary,
            collector,
            gate_after: Duration::from_secs(75),
            stall_after: Duration::from_secs(90),
            stall_for: Duration::from_secs(120),
            requests_per_sec: 50.0,
        }
    }
}

/// What the demo has shown so far.
#[derive(Debug, Clone, Default)]
pub struct DemoProgress {
    /// The gate's report (table) and exit code, once it has run.
    pub gate: Option<(String, u8)>,
    /// Whether the session cache is stalled now.
    pub cache_stalled: bool,
}

/// A running demo.
pub struct Demo {
    /// The dashboard and API.
    pub api_addr: SocketAddr,
    /// The gateway the load goes to.
    pub gateway_addr: SocketAddr,
    /// Updated as the timeline goes on.
    pub progress: watch::Receiver<DemoProgress>,
    collector: Collector,
    services: Vec<Child>,
    tasks: JoinSet<()>,
}

/// Tries at starting one service, each on a port of its own.
const START_TRIES: usize = 5;

impl Demo {
    /// Starts the collector, the services and the load; the timeline runs in the background.
    pub async fn start(options: DemoOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(
            options.service_binary.is_file(),
            "the demo's services are not built: no {} (cargo build --release -p sightline-examples)",
            options.service_binary.display()
        );
        let collector = Collector::start(options.collector.clone()).await?;
        let grpc = format!("http://{}", collector.grpc_addr);
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        // Callees first: each service is told the ports of those it calls.
        let mut services = Vec::new();
        let start = |role: &'static str, version: &'static str, extra: Vec<String>| {
            start_service(&options.service_binary, &grpc, role, version, extra)
        };
        let (push, child) = start("push-provider", "1.0.0", vec![]).await?;
        services.push(child);
        let (auth, child) = start("auth", "2.3.1", vec![]).await?;
        services.push(child);
        let (messages, child) = start("messages", "3.0.4", vec!["--push".into(), url(push)]).await?;
        services.push(child);
        let (ws_old, child) = start("workspace", BASELINE, vec![]).await?;
        services.push(child);
        let (ws_new, child) = start("workspace", CANDIDATE, vec!["--db-lock-ms".into(), "12".into()]).await?;
        services.push(child);
        let gateway_calls = vec![
            "--auth".into(),
            url(auth),
            "--messages".into(),
            url(messages),
            "--workspace".into(),
            url(ws_old),
            "--workspace".into(),
            url(ws_new),
        ];
        let (gateway, child) = start("gateway", "1.9.0", gateway_calls).await?;
        services.push(child);
        let gateway_addr: SocketAddr = ([127, 0, 0, 1], gateway).into();
        let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let answered = async {
            loop {
                if post(&http, &format!("{}/login", url(gateway))).await.is_some() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), answered)
            .await
            .context("the demo's services did not answer within 30 s")?;

        let (progress_tx, progress) = watch::channel(DemoProgress::default());
        let progress_tx = Arc::new(progress_tx);
        let mut tasks = JoinSet::new();
        // Traffic mix: Login 20%, SendMessage 30%, AcceptChat 50% (half to each version).
        for (path, share) in [("/login", 0.2), ("/chats/7/messages", 0.3), ("/chats/7/accept", 0.5)] {
            let rate = options.requests_per_sec * share;
            tasks.spawn(drive(http.clone(), format!("{}{path}", url(gateway)), rate));
        }
        let api_addr = collector.api_addr;
        let timeline = timeline(options, api_addr, url(auth), http, progress_tx);
        tasks.spawn(timeline);
        Ok(Self {
            api_addr,
            gateway_addr,
            progress,
            collector,
            services,
            tasks,
        })
    }

    /// Runs until Ctrl-C or SIGTERM, then stops cleanly.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        crate::serve::shutdown_signal().await;
        println!("stopping: services, collector, ClickHouse");
        self.shutdown().await
    }

    /// Stops the load, the services (SIGTERM, then kill), the collector and its ClickHouse.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.tasks.shutdown().await;
        for child in &mut self.services {
            if let Some(pid) = child.id() {
                // SAFETY: sending a signal to our own child process.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        // Requests stuck on the stalled cache hold connections open: three seconds for all to
        // finish, then the rest are killed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        for child in &mut self.services {
            if tokio::time::timeout_at(deadline, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        self.collector.shutdown().await
    }
}

/// Requests at a steady rate, each on its own task so that slow answers (a stalled cache) pile
/// up as they would behind a real load balancer instead of slowing the load down.
async fn drive(http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>, url: String, rate: f64) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), post(&http, &url)).await;
        });
    }
}

/// The incidents and the gate, on the demo's clock.
async fn timeline(
    options: DemoOptions,
    api_addr: SocketAddr,
    auth: String,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    progress: Arc<watch::Sender<DemoProgress>>,
) {
    let started = tokio::time::Instant::now();
    let api = format!("http://{api_addr}");
    let mut events = vec![
        (options.gate_after, Event::Gate),
        (options.stall_after, Event::Stall),
        (options.stall_after + options.stall_for, Event::Recover),
    ];
    events.sort_by_key(|(at, _)| *at);
    for (at, event) in events {
        tokio::time::sleep_until(started + at).await;
        match event {
            Event::Gate => {
                let args = gate::GateArgs {
                    service: COMPARED_SERVICE.into(),
                    baseline: BASELINE.into(),
                    candidate: CANDIDATE.into(),
                    from: None,
                    to: None,
                    url: api.clone(),
                    format: gate::Format::Table,
                    fail_on_warn: false,
                    config: None,
                };
                // A slow start can leave a version without enough stored blocks yet: try again
                // for a minute before reporting the error.
                let mut outcome = gate::run(&args).await;
                let inconclusive = gate::exit_code(crate::compare::Verdict::Inconclusive, false);
                for _ in 0..6 {
                    if matches!(&outcome, Ok((_, code)) if *code != inconclusive) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    outcome = gate::run(&args).await;
                }
                match &outcome {
                    Ok((report, code)) => {
                        println!(
                            "\n== the gate: {COMPARED_SERVICE} {CANDIDATE} against {BASELINE} (exit {code}) ==\n\
                             $ sightline gate --service {COMPARED_SERVICE} --baseline {BASELINE} --candidate {CANDIDATE} --url {api}\n{report}"
                        );
                    }
                    Err(e) => println!("\nthe gate could not judge yet: {e:#}"),
                }
                progress.send_modify(|p| p.gate = outcome.ok());
            }
            Event::Stall => {
                let seconds = options.stall_for.as_secs();
                if post(&http, &format!("{auth}/admin/stall?seconds={seconds}"))
                    .await
                    .is_some()
                {
                    println!(
                        "\n== incident: auth's session cache stalls for {seconds} s ==\n\
                         Login requests now hang in `redis GET session`: see the stuck BTs at {api}/#/services \
                         and the auth -> redis:sessions edge at {api}/#/topology"
                    );
                    progress.send_modify(|p| p.cache_stalled = true);
                }
            }
            Event::Recover => {
                println!("\n== the session cache answers again; the edge recovers ==");
                progress.send_modify(|p| p.cache_stalled = false);
            }
        }
    }
}

enum Event {
    Gate,
    Stall,
    Recover,
}

/// POSTs with an empty body; the status, or None when the service did not answer.
async fn post(
    http: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
) -> Option<http::StatusCode> {
    let request = http::Request::post(url).body(Full::new(Bytes::new())).ok()?;
    http.request(request).await.ok().map(|r| r.status())
}

/// A free loopback port (the services bind it themselves right after).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts one service on a free port and waits until it listens there. A port found free can
/// be taken before the service binds it (another process's connection gets it as its local
/// port): the service then exits, and is started again on another.
async fn start_service(
    binary: &std::path::Path,
    collector: &str,
    role: &'static str,
    version: &'static str,
    extra: Vec<String>,
) -> anyhow::Result<(u16, Child)> {
    for _ in 0..START_TRIES {
        let port = free_port()?;
        let mut child = tokio::process::Command::new(binary)
            .args(["--role", role, "--version", version, "--collector", collector])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(&extra)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if child.try_wait()?.is_some() {
                break; // exited: its port was taken; another
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok((port, child));
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{role} {version} did not listen within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    anyhow::bail!("{role} {version} exited {START_TRIES} times at its start")
}
