//! What the load tools share: free ports, a process's CPU time, and the release collector run
//! as a separate process (so that its work is not counted in, or scheduled with, the tool's).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A trace its caller did not sample, to continue at a root: the children under such a root
/// are the agent's unsampled path (the span bench's `sightline_unsampled`, `span-loop
/// --unsampled`).
pub fn unsampled_caller() -> sightline::propagation::RemoteContext {
    sightline::propagation::RemoteContext {
        trace_id: 1,
        parent_span_id: 1,
        sampled: false,
        bt: None,
        caller_service: None,
        caller_operation: None,
    }
}

/// User + system CPU seconds of a process.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // After the command name: state is field 0, utime 11, stime 12 (stat(5) fields 14 and 15).
    // SAFETY: sysconf reads a constant.
    (ticks(11) + ticks(12)) / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// CPU time of `pid`'s threads whose name starts with `name` (the kernel's nanosecond
/// run-time count, `schedstat`): what one part of a process costs, e.g. an agent's exporter.
pub fn thread_cpu_seconds(pid: u32, name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.starts_with(name)))
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|schedstat| schedstat.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

/// Resident memory of `pid` in MiB: (all of it, the anonymous part: heap and stacks); zeros
/// once the process is gone.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// The release `sightline` binary next to the running tool.
pub fn collector_binary() -> anyhow::Result<PathBuf> {
    let binary = std::env::current_exe()?.with_file_name("sightline");
    if !binary.exists() {
        bail!(
            "{} not found: cargo build --release -p sightline-collector",
            binary.display()
        );
    }
    Ok(binary)
}

/// `sightline serve` as a child process; stopped with SIGTERM when dropped.
pub struct CollectorProcess {
    child: Child,
    pub grpc: u16,
    pub http: u16,
    pub api: u16,
}

impl CollectorProcess {
    /// Starts `command` (the collector binary, perhaps behind a wrapper such as `chrt`) with
    /// `serve`, free ports, and `env` (e.g. the ClickHouse URL or data folder); waits until
    /// `/readyz` answers 200.
    pub async fn start(mut command: Command, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let (grpc, http, api) = (free_port(), free_port(), free_port());
        command
            .arg("serve")
            .env("SIGHTLINE_RECEIVERS__GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
            .env("SIGHTLINE_RECEIVERS__HTTP_LISTEN", format!("127.0.0.1:{http}"))
            .env("SIGHTLINE_API__LISTEN", format!("127.0.0.1:{api}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let process = Self {
            child: command.spawn().context("starting the collector")?,
            grpc,
            http,
            api,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while ready(api).await != Some(200) {
            if Instant::now() > deadline {
                bail!("collector not ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(process)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

async fn ready(api: u16) -> Option<u16> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri = format!("http://127.0.0.1:{api}/readyz").parse().ok()?;
    client.get(uri).await.ok().map(|r| r.status().as_u16())
}

impl Drop for CollectorProcess {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A data folder for a collector's private ClickHouse.
pub fn data_dir_env(dir: &Path) -> (&'static str, String) {
    ("SIGHTLINE_DATA_DIR", dir.display().to_string())
}
