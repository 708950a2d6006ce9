//! Wires the collector together: store (private ClickHouse or a configured URL), migrations,
//! spool, writer, pipeline, receivers and API; and takes it apart in the reverse order, so
//! that everything received is written (or, with ClickHouse away, kept in the spool) before
//! the process ends.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::{
    api::{self, ApiState},
    auth::Token,
    config::Config,
    metrics::Metrics,
    pipeline::Pipeline,
    query::Queries,
    receivers::{native::NativeAgentService, otlp_grpc::OtlpTraceService, otlp_http},
    store::{self, appender, launcher::ClickHouseServer, retention, schema, writer},
};

/// A running collector. Dropping it without [`Collector::shutdown`] stops the servers abruptly.
pub struct Collector {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub clickhouse_url: String,
    pub clickhouse_version: String,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    servers: JoinSet<anyhow::Result<()>>,
    writer: JoinSet<()>,
    /// Periodic store maintenance (retention on servers without TTL); aborted on shutdown.
    background: JoinSet<()>,
    clickhouse: Option<ClickHouseServer>,
}

impl Collector {
    /// Starts everything and returns once all ports are bound and the schema is in place.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let (clickhouse, url) = if config.clickhouse.url.is_empty() {
            let dir: PathBuf = config.data_dir.join("clickhouse");
            let binary = config.clickhouse.binary.clone();
            let server = tokio::task::spawn_blocking(move || ClickHouseServer::start(&dir, &binary)).await??;
            let url = server.url();
            info!(url, data = %server.data_dir().display(), "started private ClickHouse");
            (Some(server), url)
        } else {
            (None, config.clickhouse.url.clone())
        };
        let database = &config.clickhouse.database;
        let client = store::client(&url, database, &config.clickhouse);
        let version = schema::migrate(&client, database, config.clickhouse.retention_days)
            .await
            .with_context(|| format!("cannot prepare database {database} on ClickHouse at {url}"))?;
        info!(version, database, "schema ready");

        let mut background = JoinSet::new();
        if !schema::is_modern(&version) {
            background.spawn(retention::run(
                client.clone(),
                database.clone(),
                config.clickhouse.retention_days,
            ));
        }

        let metrics = Arc::new(Metrics::new());
        let spool_dir = config.spool_dir();
        let (spool, feed) = appender::start(&spool_dir, &config.spool, config.writer.queue_batches, metrics.clone())?;
        let writer_tasks = writer::start(
            store::writer_client(&url, database, &config.clickhouse),
            database,
            &config.writer,
            &spool_dir,
            feed,
            metrics.clone(),
        );
        let pipeline = Pipeline::new(
            config.limits.clone(),
            &config.edges,
            metrics.clone(),
            spool,
            Token::new(&config.auth.ingest_token),
        );
        let sweeping = pipeline.clone();
        background.spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                sweeping.sweep_edges();
            }
        });

        let grpc_listener = bind(config.receivers.grpc_listen, "OTLP/gRPC").await?;
        let http_listener = bind(config.receivers.http_listen, "OTLP/HTTP").await?;
        let api_listener = bind(config.api.listen, "API").await?;
        let (grpc_addr, http_addr, api_addr) = (
            grpc_listener.local_addr()?,
            http_listener.local_addr()?,
            api_listener.local_addr()?,
        );

        let (stop, stopped) = watch::channel(false);
        let sampling = Arc::new(watch::Sender::new(config.agents.sampling.clone()));
        let mut servers = JoinSet::new();
        // Without TCP_NODELAY a large export waits on delayed ACKs (40 ms a request).
        let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
        let grpc = tonic::transport::Server::builder()
            .add_service(OtlpTraceService::new(pipeline.clone()))
            .add_service(NativeAgentService::server(
                pipeline.clone(),
                stop.subscribe(),
                sampling.subscribe(),
            ));
        servers.spawn(async move { Ok(grpc.serve_with_incoming_shutdown(incoming, signal(stopped)).await?) });
        let http_app = otlp_http::router(pipeline);
        let stopped = stop.subscribe();
        servers.spawn(async move {
            Ok(axum::serve(http_listener.tap_io(nodelay), http_app)
                .with_graceful_shutdown(signal(stopped))
                .await?)
        });
        let alerts = crate::alerts::evaluator::start(
            Queries::new(client.clone()).silent_after(config.agents.silent_after_secs),
            config.alerts.clone(),
            metrics.clone(),
            &mut background,
        )
        .await;
        let api_app = api::router(
            ApiState {
                alerts,
                queries: Queries::new(api_client(&client, &config.api)).silent_after(config.agents.silent_after_secs),
                max_window_us: u64::from(config.api.max_window_days) * 86_400 * 1_000_000,
                metrics: metrics.clone(),
                sampling,
                api_token: Token::new(&config.auth.api_token),
            },
            &api::dashboard::locate(config.api.dashboard_dir.as_deref()),
        );
        let stopped = stop.subscribe();
        servers.spawn(async move {
            Ok(axum::serve(api_listener.tap_io(nodelay), api_app)
                .with_graceful_shutdown(signal(stopped))
                .await?)
        });
        info!(%grpc_addr, %http_addr, %api_addr, "collector listening");
        for (addr, token, what) in [
            (grpc_addr, &config.auth.ingest_token, "ingest (gRPC)"),
            (http_addr, &config.auth.ingest_token, "ingest (HTTP)"),
            (api_addr, &config.auth.api_token, "the API"),
        ] {
            if !addr.ip().is_loopback() && token.is_empty() {
                warn!(%addr, "{what} listens beyond loopback without a token: anyone who reaches it may use it (set [auth])");
            }
        }

        Ok(Self {
            grpc_addr,
            http_addr,
            api_addr,
            clickhouse_url: url,
            clickhouse_version: version,
            metrics,
            stop,
            servers,
            writer: writer_tasks,
            background,
            clickhouse,
        })
    }

    /// Waits until a server fails or Ctrl-C / SIGTERM arrives, then shuts down.
    pub async fn run_until_signal(mut self) -> anyhow::Result<()> {
        let failed = tokio::select! {
            _ = shutdown_signal() => None,
            Some(result) = self.servers.join_next() => Some(result),
        };
        if let Some(result) = failed {
            self.shutdown().await?;
            return match result {
                Ok(Ok(())) => Err(anyhow::anyhow!("a server stopped unexpectedly")),
                Ok(Err(e)) => Err(e.context("server failed")),
                Err(e) => Err(anyhow::anyhow!("server task panicked: {e}")),
            };
        }
        info!("shutting down");
        self.shutdown().await
    }

    /// Stops accepting, writes everything received, then stops the private ClickHouse.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.background.shutdown().await;
        // Connections get a bounded time to finish; a client that keeps one open must not
        // keep the collector (and the data it holds) from shutting down.
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(result) = self.servers.join_next().await {
                if let Ok(Err(e)) = result {
                    warn!("server ended with error: {e:#}");
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
            self.servers.shutdown().await;
        }
        // The servers held the last pipeline handles; with them gone the spool's appender
        // stops and the writer drains what is durable.
        while self.writer.join_next().await.is_some() {}
        if let Some(mut server) = self.clickhouse.take() {
            tokio::task::spawn_blocking(move || server.stop()).await?;
        }
        Ok(())
    }
}

/// The API's reads: ClickHouse itself refuses an answer over `max_result_rows` and stops a
/// query past the timeout, so no request can make the API hold a huge answer or run forever.
fn api_client(client: &clickhouse::Client, config: &crate::config::ApiConfig) -> clickhouse::Client {
    client
        .clone()
        .with_setting("max_result_rows", config.max_result_rows.to_string())
        .with_setting("result_overflow_mode", "throw")
        .with_setting("max_execution_time", config.query_timeout_secs.to_string())
}

/// How long shutdown waits for open connections.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr} (is another collector running?)"))
}

fn nodelay(stream: &mut tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
}

async fn signal(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
