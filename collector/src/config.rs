//! Collector configuration: defaults, then `sightline.toml`, then `SIGHTLINE_*` environment
//! variables (sections separated by a double underscore: `SIGHTLINE_CLICKHOUSE__URL`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Folder for the private ClickHouse server's data and the spool.
    pub data_dir: PathBuf,
    pub clickhouse: ClickHouseConfig,
    pub receivers: ReceiversConfig,
    pub api: ApiConfig,
    pub limits: Limits,
    pub writer: WriterConfig,
    pub spool: SpoolConfig,
    pub auth: AuthConfig,
    pub agents: AgentsConfig,
    pub edges: EdgesConfig,
    /// SLOs, baselines, detectors and webhooks (crate::alerts).
    pub alerts: crate::alerts::evaluator::AlertsConfig,
}

/// Bearer tokens (`Authorization: Bearer <token>`); empty: no token asked.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Asked of agents and OTLP senders (gRPC and HTTP).
    pub ingest_token: String,
    /// Asked of API clients and the dashboard (`/api/*`, `/metrics`); health checks stay open.
    pub api_token: String,
}

/// The on-disk hand-off between receivers and the writer (store/spool.rs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Empty: `data_dir/spool`.
    pub dir: PathBuf,
    /// Past it new batches are refused (RESOURCE_EXHAUSTED / HTTP 429) until the writer
    /// catches up.
    pub max_bytes: u64,
    pub segment_bytes: u64,
    /// Encoded batches waiting for the disk, in memory; past it senders are told to retry.
    pub max_pending_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            max_pending_bytes: 256 << 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP URL of an existing server. Empty: start a private server in `data_dir`.
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
    /// Explicit server binary for the private server; empty means search PATH.
    pub binary: String,
    /// Days spans, trace index and latency aggregates are kept: a TTL on modern servers,
    /// day partitions dropped hourly on 18.16.
    pub retention_days: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReceiversConfig {
    /// OTLP/gRPC and sightline.v1.
    pub grpc_listen: SocketAddr,
    /// OTLP/HTTP (protobuf and JSON).
    pub http_listen: SocketAddr,
}

/// Topology edges from OTLP spans: how long a client or server span waits for its other half.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgesConfig {
    /// Past it, an unpaired client span becomes an edge to an external node.
    pub pairing_window_ms: u64,
    /// Spans waiting at most; past it the oldest expire early.
    pub max_waiting: usize,
}

impl Default for EdgesConfig {
    fn default() -> Self {
        Self {
            pairing_window_ms: 10_000,
            max_waiting: 200_000,
        }
    }
}

/// What the collector tells connected agents, and how it judges them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentsConfig {
    /// An agent whose last heartbeat is older than this is reported silent (three missed
    /// heartbeats at the agent's default 10 s).
    pub silent_after_secs: u32,
    /// Sampling ratios pushed to agents (changeable at run time through the API).
    pub sampling: crate::sampling::SamplingPolicy,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self {
            silent_after_secs: crate::query::SILENT_AFTER_SECS,
            sampling: crate::sampling::SamplingPolicy::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// The built web dashboard (dashboards/web/dist), served at `/`. Unset: `dashboards/web/dist`
    /// under the working directory, else the one in the source tree this binary was built from.
    pub dashboard_dir: Option<PathBuf>,
    /// The longest window a request may ask for (`to - from`).
    pub max_window_days: u32,
    /// Rows a query may answer; past it the request is refused (422) and should be narrowed.
    pub max_result_rows: u64,
    /// Time a query may run before it is stopped (503).
    pub query_timeout_secs: u32,
}

/// What one request may carry. Larger requests are refused whole; oversized strings are
/// truncated and counted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_spans_per_request: usize,
    pub max_attributes_per_span: usize,
    pub max_name_bytes: usize,
    pub max_value_bytes: usize,
    /// Spans may start at most this far in the future (clock skew).
    pub max_future_skew_secs: u64,
    /// Spans may last at most this long.
    pub max_duration_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriterConfig {
    /// Insert when this many spans are pending...
    pub batch_rows: usize,
    /// ...or when the oldest pending span has waited this long.
    pub flush_interval_ms: u64,
    /// Concurrent INSERTs (ClickHouse parses one INSERT on one core).
    pub inserters: usize,
    /// Batches of received spans that may wait between receivers and the writer.
    pub queue_batches: usize,
    /// Attempts per INSERT before its rows are dropped and counted.
    pub max_attempts: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("sightline-data"),
            clickhouse: ClickHouseConfig::default(),
            receivers: ReceiversConfig::default(),
            api: ApiConfig::default(),
            limits: Limits::default(),
            writer: WriterConfig::default(),
            spool: SpoolConfig::default(),
            auth: AuthConfig::default(),
            agents: AgentsConfig::default(),
            edges: EdgesConfig::default(),
            alerts: Default::default(),
        }
    }
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            database: "sightline".into(),
            user: "default".into(),
            password: String::new(),
            binary: String::new(),
            retention_days: 30,
        }
    }
}

impl Default for ReceiversConfig {
    fn default() -> Self {
        Self {
            grpc_listen: ([127, 0, 0, 1], 4317).into(),
            http_listen: ([127, 0, 0, 1], 4318).into(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8480).into(),
            dashboard_dir: None,
            max_window_days: 31,
            max_result_rows: 100_000,
            query_timeout_secs: 30,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 8 << 20,
            max_spans_per_request: 50_000,
            max_attributes_per_span: 128,
            max_name_bytes: 256,
            max_value_bytes: 4096,
            max_future_skew_secs: 3600,
            max_duration_secs: 86_400,
        }
    }
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            batch_rows: 50_000,
            flush_interval_ms: 1000,
            inserters: 2,
            queue_batches: 1024,
            max_attempts: 8,
        }
    }
}

impl WriterConfig {
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms.max(1))
    }
}

impl Config {
    /// Where the spool lives.
    pub fn spool_dir(&self) -> PathBuf {
        if self.spool.dir.as_os_str().is_empty() {
            self.data_dir.join("spool")
        } else {
            self.spool.dir.clone()
        }
    }

    /// Defaults, then the TOML file (if given), then `SIGHTLINE_*` variables.
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            if !path.exists() {
                anyhow::bail!("config file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file(path));
        }
        let config: Config = figment
            .merge(Env::prefixed("SIGHTLINE_").split("__"))
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        let db = &self.clickhouse.database;
        if db.is_empty() || !db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            anyhow::bail!("clickhouse.database must be letters, digits and '_', got {db:?}");
        }
        // DateTime ends in 2106: a longer TTL would wrap around and expire rows at once.
        if !(1..=3650).contains(&self.clickhouse.retention_days) {
            anyhow::bail!(
                "clickhouse.retention_days must be 1..=3650, got {}",
                self.clickhouse.retention_days
            );
        }
        if self.writer.inserters == 0 || self.writer.batch_rows == 0 {
            anyhow::bail!("writer.inserters and writer.batch_rows must be at least 1");
        }
        self.agents
            .sampling
            .check()
            .map_err(|e| anyhow::anyhow!("agents.sampling: {e}"))?;
        self.alerts.check().map_err(|e| anyhow::anyhow!("alerts: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail API
mod tests {
    use super::*;

    #[test]
    fn toml_then_environment_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "s.toml",
                "data_dir = \"/var/lib/s\"\n[clickhouse]\nurl = \"http://ch:8123\"\n[writer]\nbatch_rows = 10\n",
            )?;
            jail.set_env("SIGHTLINE_WRITER__BATCH_ROWS", "20");
            jail.set_env("SIGHTLINE_API__LISTEN", "0.0.0.0:9999");
            let config = Config::load(Some(std::path::Path::new("s.toml"))).unwrap();
            assert_eq!(config.data_dir, PathBuf::from("/var/lib/s"));
            assert_eq!(config.clickhouse.url, "http://ch:8123");
            assert_eq!(config.writer.batch_rows, 20);
            assert_eq!(config.api.listen.port(), 9999);
            assert_eq!(config.receivers.grpc_listen.port(), 4317);
            Ok(())
        });
    }

    #[test]
    fn example_config_parses_and_states_the_defaults() {
        let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../sightline.example.toml"));
        let example = Config::load(Some(path)).unwrap();
        assert_eq!(
            serde_json::to_value(example).unwrap(),
            serde_json::to_value(Config::default()).unwrap()
        );
    }

    #[test]
    fn unknown_keys_and_bad_database_names_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("a.toml", "[clickhouse]\nurll = \"x\"\n")?;
            let err = Config::load(Some(std::path::Path::new("a.toml"))).unwrap_err();
            assert!(err.to_string().contains("urll"), "{err}");
            jail.create_file("b.toml", "[clickhouse]\ndatabase = \"x; DROP\"\n")?;
            assert!(Config::load(Some(std::path::Path::new("b.toml"))).is_err());
            Ok(())
        });
    }
}
