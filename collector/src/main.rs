//! `sightline`: the collector's command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sightline_collector::{Collector, Config};
use tracing_subscriber::EnvFilter;

// Decoding OTLP allocates a few dozen small strings a span; glibc's allocator spent half the
// collector's CPU on them (benches/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc asks the kernel for transparent huge pages, and khugepaged then folds sparsely used
/// 2 MiB regions into whole huge pages: in a 30-minute soak the collector's RSS stepped up by
/// ~12 MiB and stayed (half its RSS was huge pages). Its heap is small and churns: 4 KiB pages
/// keep resident memory to what is in use. The flag holds for every mapping, earlier ones too.
fn without_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Sightline: application performance monitoring built around business transactions.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the collector: OTLP gRPC on 127.0.0.1:4317, OTLP/HTTP on :4318, the API on :8480.
    ///
    /// With no ClickHouse URL configured it starts a private ClickHouse server (found as
    /// clickhouse-server or clickhouse on PATH) with its data in <data_dir>/clickhouse, and stops
    /// it on exit. Every setting can also come from the environment: SIGHTLINE_DATA_DIR,
    /// SIGHTLINE_CLICKHOUSE__URL, SIGHTLINE_API__LISTEN, SIGHTLINE_WRITER__BATCH_ROWS, ...
    /// (a double underscore separates the section from the key). Log level: RUST_LOG.
    Serve {
        /// TOML configuration file (see sightline.example.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the demo: the collector on its private ClickHouse, an instrumented chat app under
    /// load, and two incidents replayed (a session cache stall, a DB lock shipped in 1.5.0).
    ///
    /// Prints the dashboard's URL and, after 75 s, the gate's verdict on the agent workspace's
    /// 1.5.0 against 1.4.2. Stops cleanly on Ctrl-C. Needs the examples' demo-service binary
    /// beside this one (cargo build --release -p sightline-examples).
    Demo {
        /// TOML configuration file for the collector (ports, ClickHouse).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Keep the data here (default: a temporary folder removed on exit).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Seconds until the gate compares the two workspace versions.
        #[arg(long, default_value_t = 75)]
        gate_after: u64,
        /// Seconds until the session cache stalls.
        #[arg(long, default_value_t = 90)]
        stall_after: u64,
        /// Seconds the stall lasts.
        #[arg(long, default_value_t = 120)]
        stall_for: u64,
    },
    /// Compare two versions of a service through a collector and fail CI on a real regression.
    ///
    /// Exit codes: 0 pass, 1 fail, 2 warn (only with --fail-on-warn; otherwise a warning
    /// passes), 3 inconclusive (too little traffic to judge), 4 error (collector unreachable,
    /// unknown service or version, bad input).
    Gate {
        #[command(flatten)]
        args: sightline_collector::gate::GateArgs,
        /// Write the report here instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    without_transparent_huge_pages();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        // Logs on stderr: the gate's report is standard output.
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Demo {
            config,
            data_dir,
            gate_after,
            stall_after,
            stall_for,
        } => demo(config, data_dir, [gate_after, stall_after, stall_for]),
        Command::Gate { args, output } => {
            return gate(&args, output);
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the gate; its exit code is the verdict's (4 on any error).
fn gate(args: &sightline_collector::gate::GateArgs, output: Option<PathBuf>) -> std::process::ExitCode {
    use sightline_collector::gate;
    let outcome = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(gate::run(args)));
    let written = outcome.and_then(|(report, code)| {
        match &output {
            Some(path) => std::fs::write(path, &report).with_context(|| format!("cannot write {}", path.display()))?,
            None => print!("{report}"),
        }
        Ok(code)
    });
    match written {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(gate::ERROR_EXIT)
        }
    }
}

fn serve(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config_path.as_deref())?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let collector = Collector::start(config).await?;
        collector.run_until_signal().await
    })
}

fn demo(
    config_path: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    [gate_after, stall_after, stall_for]: [u64; 3],
) -> anyhow::Result<()> {
    use sightline_collector::demo::{Demo, DemoOptions};
    let mut config = Config::load(config_path.as_deref())?;
    let temporary = match data_dir {
        Some(dir) => {
            config.data_dir = dir;
            None
        }
        None => {
            let dir = tempfile::Builder::new().prefix("sightline-demo-").tempdir()?;
            config.data_dir = dir.path().to_path_buf();
            Some(dir)
        }
    };
    let exe = std::env::current_exe().context("cannot find this binary's folder")?;
    let services = exe.with_file_name("demo-service");
    let mut options = DemoOptions::new(services, config);
    options.gate_after = std::time::Duration::from_secs(gate_after);
    options.stall_after = std::time::Duration::from_secs(stall_after);
    options.stall_for = std::time::Duration::from_secs(stall_for);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        println!("starting ClickHouse, the collector and the chat app (gateway, auth, messages, workspace 1.4.2 + 1.5.0, push API)...");
        let demo = Demo::start(options).await?;
        println!(
            "\nDashboard: http://{}/   (data arrives at once; the gate runs at {gate_after} s, the cache stalls at {stall_after} s)\n\
             Load: 50 requests/s into the gateway. Ctrl-C stops everything.",
            demo.api_addr
        );
        demo.run_until_signal().await
    })?;
    drop(temporary);
    Ok(())
}
