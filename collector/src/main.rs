//! `sightline`: the collector's command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sightline_collector::{Collector, Config};
use tracing_subscriber::EnvFilter;

// Decoding OTLP allocates a few dozen small strings a span; glibc's allocator spent half the
// collector's CPU on them (benches/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
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
