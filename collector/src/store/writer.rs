//! The store writer: the one owner of rows on their way into ClickHouse.
//!
//! Receivers hand it batches through a bounded queue ([`WriterHandle::try_submit`]); a full
//! queue is the collector's backpressure signal. One batcher task collects spans until
//! `batch_rows` or `flush_interval`, merges latency partials per key, and gives the chunks to
//! a pool of inserter tasks: several INSERTs run at once because ClickHouse parses each on one
//! core. An INSERT that fails is retried with backoff; after `max_attempts` its rows are dropped
//! and counted.

use std::{sync::Arc, time::Duration};

use clickhouse::Client;
use tokio::{
    sync::{mpsc, Mutex},
    task::JoinSet,
    time::{sleep, Instant},
};
use tracing::{error, warn};

use super::rows::{EdgeRow, FineLatencyRow, HeartbeatRow, InflightRow, LatencyRow, SpanRow, StageRow};
use crate::{
    config::WriterConfig,
    metrics::{Metrics, ReasonLabel, TableLabel},
    model::Span,
    pipeline::{
        aggregate::{LatencyAggregates, LatencyKey, LatencyValue},
        edges::{EdgeAggregates, EdgeKey},
        stages::{StageAggregates, StageKey, StageValue},
    },
};

/// What one receiver request contributes.
#[derive(Default)]
pub struct WriteBatch {
    pub spans: Vec<Span>,
    pub latency: LatencyAggregates,
    pub edges: EdgeAggregates,
    pub stages: StageAggregates,
    pub heartbeats: Vec<HeartbeatRow>,
    pub inflight: Vec<InflightRow>,
}

/// The queue is full: the sender should retry after a while.
#[derive(Debug)]
pub struct QueueFull;

/// Cheap to clone; every receiver holds one.
#[derive(Clone)]
pub struct WriterHandle {
    queue: mpsc::Sender<WriteBatch>,
    metrics: Arc<Metrics>,
}

impl WriterHandle {
    /// Enqueues without waiting: never stalls a receiver.
    pub fn try_submit(&self, batch: WriteBatch) -> Result<(), QueueFull> {
        let spans = batch.spans.len() as i64;
        match self.queue.try_send(batch) {
            Ok(()) => {
                self.metrics.write_queue_spans.inc_by(spans);
                Ok(())
            }
            Err(_) => Err(QueueFull),
        }
    }
}

enum InsertJob {
    Spans(Vec<Span>),
    Latency(Vec<(LatencyKey, LatencyValue)>),
    FineLatency(Vec<(LatencyKey, LatencyValue)>),
    Edges(Vec<(EdgeKey, LatencyValue)>),
    Stages(Vec<(StageKey, StageValue)>),
    Heartbeats(Vec<HeartbeatRow>),
    Inflight(Vec<InflightRow>),
}

/// Starts the batcher and inserters. They run until every `WriterHandle` is dropped, then
/// write what is pending and end; await the returned set to know it is all written.
pub fn start(client: Client, config: &WriterConfig, metrics: Arc<Metrics>) -> (WriterHandle, JoinSet<()>) {
    let (queue_tx, queue_rx) = mpsc::channel(config.queue_batches.max(1));
    let (jobs_tx, jobs_rx) = mpsc::channel::<InsertJob>(config.inserters);
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    // Span buffers go back to the batcher once inserted: a fresh 50k-span buffer per batch
    // cost more CPU in page faults than the rest of the writer.
    let (spare_tx, spare_rx) = mpsc::channel::<Vec<Span>>(config.inserters + 1);
    let mut tasks = JoinSet::new();
    tasks.spawn(batcher(queue_rx, jobs_tx, spare_rx, config.clone()));
    for _ in 0..config.inserters {
        let spare = spare_tx.clone();
        tasks.spawn(inserter(
            client.clone(),
            jobs_rx.clone(),
            spare,
            config.max_attempts,
            metrics.clone(),
        ));
    }
    (
        WriterHandle {
            queue: queue_tx,
            metrics,
        },
        tasks,
    )
}

async fn batcher(
    mut queue: mpsc::Receiver<WriteBatch>,
    jobs: mpsc::Sender<InsertJob>,
    mut spare: mpsc::Receiver<Vec<Span>>,
    config: WriterConfig,
) {
    let interval = config.flush_interval();
    let mut spans: Vec<Span> = Vec::new();
    let mut latency = LatencyAggregates::default();
    let mut edges = EdgeAggregates::default();
    let mut stages = StageAggregates::default();
    let (mut heartbeats, mut inflight) = (Vec::new(), Vec::new());
    let mut deadline: Option<Instant> = None;
    loop {
        let received = match deadline {
            Some(at) => tokio::select! {
                batch = queue.recv() => Some(batch),
                _ = tokio::time::sleep_until(at) => None,
            },
            None => Some(queue.recv().await),
        };
        match received {
            Some(Some(batch)) => {
                if spans.capacity() == 0 {
                    spans = spare
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(config.batch_rows));
                }
                spans.extend(batch.spans);
                latency.merge(batch.latency);
                edges.merge(batch.edges);
                stages.merge(batch.stages);
                heartbeats.extend(batch.heartbeats);
                inflight.extend(batch.inflight);
                deadline.get_or_insert_with(|| Instant::now() + interval);
                // A batch may end up a request's worth over batch_rows: cheaper than splitting.
                if spans.len() >= config.batch_rows
                    && jobs.send(InsertJob::Spans(std::mem::take(&mut spans))).await.is_err()
                {
                    return;
                }
            }
            // Flush time, or every sender is gone: write everything pending.
            Some(None) | None => {
                let closed = received.is_some();
                if !spans.is_empty() && jobs.send(InsertJob::Spans(std::mem::take(&mut spans))).await.is_err() {
                    return;
                }
                let rows = latency.drain();
                if !rows.is_empty() {
                    let minutes = LatencyAggregates::by_minute(&rows);
                    if jobs.send(InsertJob::Latency(minutes)).await.is_err()
                        || jobs.send(InsertJob::FineLatency(rows)).await.is_err()
                    {
                        return;
                    }
                }
                let rows = edges.drain();
                if !rows.is_empty() && jobs.send(InsertJob::Edges(rows)).await.is_err() {
                    return;
                }
                let rows = stages.drain();
                if !rows.is_empty() && jobs.send(InsertJob::Stages(rows)).await.is_err() {
                    return;
                }
                if !heartbeats.is_empty()
                    && jobs
                        .send(InsertJob::Heartbeats(std::mem::take(&mut heartbeats)))
                        .await
                        .is_err()
                {
                    return;
                }
                if !inflight.is_empty()
                    && jobs
                        .send(InsertJob::Inflight(std::mem::take(&mut inflight)))
                        .await
                        .is_err()
                {
                    return;
                }
                deadline = None;
                if closed {
                    return;
                }
            }
        }
    }
}

async fn inserter(
    client: Client,
    jobs: Arc<Mutex<mpsc::Receiver<InsertJob>>>,
    spare: mpsc::Sender<Vec<Span>>,
    max_attempts: u32,
    metrics: Arc<Metrics>,
) {
    loop {
        let job = jobs.lock().await.recv().await;
        let Some(mut job) = job else { return };
        if let InsertJob::Spans(spans) = &mut job {
            // In the table's key order: ClickHouse sorts every INSERT by (service, start), and
            // takes sorted input at about twice the rate of arrival order (benches/README.md).
            spans.sort_unstable_by(|a, b| (&a.service, a.start_ns).cmp(&(&b.service, b.start_ns)));
        }
        let (table, rows) = match &job {
            InsertJob::Spans(spans) => ("spans", spans.len()),
            InsertJob::Latency(rows) => ("latency_1m", rows.len()),
            InsertJob::FineLatency(rows) => ("latency_10s", rows.len()),
            InsertJob::Edges(rows) => ("edges_1m", rows.len()),
            InsertJob::Stages(rows) => ("stages_1m", rows.len()),
            InsertJob::Heartbeats(rows) => ("agent_heartbeats", rows.len()),
            InsertJob::Inflight(rows) => ("inflight", rows.len()),
        };
        let label = TableLabel { table };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = std::time::Instant::now();
            let result = match &job {
                InsertJob::Spans(spans) => insert_spans(&client, spans).await,
                InsertJob::Latency(rows) => insert_latency(&client, rows).await,
                InsertJob::FineLatency(rows) => insert_fine_latency(&client, rows).await,
                InsertJob::Edges(rows) => insert_edges(&client, rows).await,
                InsertJob::Stages(rows) => insert_stages(&client, rows).await,
                InsertJob::Heartbeats(rows) => insert_owned(&client, "agent_heartbeats", rows).await,
                InsertJob::Inflight(rows) => insert_owned(&client, "inflight", rows).await,
            };
            match result {
                Ok(()) => {
                    metrics
                        .insert_duration_seconds
                        .get_or_create(&label)
                        .observe(started.elapsed().as_secs_f64());
                    metrics.written_rows.get_or_create(&label).inc_by(rows as u64);
                    break;
                }
                Err(e) => {
                    metrics.insert_failures.get_or_create(&label).inc();
                    if attempt >= max_attempts {
                        error!(table, rows, attempts = attempt, "giving up on INSERT: {e}");
                        if table == "spans" {
                            metrics
                                .dropped_spans
                                .get_or_create(&ReasonLabel {
                                    reason: "insert_failed",
                                })
                                .inc_by(rows as u64);
                        }
                        break;
                    }
                    let backoff = Duration::from_millis(100 << attempt.min(6)).min(Duration::from_secs(5));
                    warn!(table, rows, attempt, ?backoff, "INSERT failed, retrying: {e}");
                    sleep(backoff).await;
                }
            }
        }
        if let InsertJob::Spans(mut spans) = job {
            metrics.write_queue_spans.dec_by(spans.len() as i64);
            spans.clear();
            let _ = spare.try_send(spans);
        }
    }
}

const INSERT_TIMEOUT: Option<Duration> = Some(Duration::from_secs(60));

async fn insert_spans(client: &Client, spans: &[Span]) -> clickhouse::error::Result<()> {
    let mut insert = client
        .insert::<SpanRow<'_>>("spans_input")
        .await?
        .with_timeouts(INSERT_TIMEOUT, INSERT_TIMEOUT);
    for span in spans {
        insert.write(&SpanRow::from(span)).await?;
    }
    insert.end().await
}

async fn insert_latency(client: &Client, rows: &[(LatencyKey, LatencyValue)]) -> clickhouse::error::Result<()> {
    let mut insert = client
        .insert::<LatencyRow<'_>>("latency_1m")
        .await?
        .with_timeouts(INSERT_TIMEOUT, INSERT_TIMEOUT);
    for (key, value) in rows {
        insert.write(&LatencyRow::new(key, value)).await?;
    }
    insert.end().await
}

async fn insert_fine_latency(client: &Client, rows: &[(LatencyKey, LatencyValue)]) -> clickhouse::error::Result<()> {
    let mut insert = client
        .insert::<FineLatencyRow<'_>>("latency_10s")
        .await?
        .with_timeouts(INSERT_TIMEOUT, INSERT_TIMEOUT);
    for (key, value) in rows {
        insert.write(&FineLatencyRow::new(key, value)).await?;
    }
    insert.end().await
}

async fn insert_edges(client: &Client, rows: &[(EdgeKey, LatencyValue)]) -> clickhouse::error::Result<()> {
    let mut insert = client
        .insert::<EdgeRow<'_>>("edges_1m")
        .await?
        .with_timeouts(INSERT_TIMEOUT, INSERT_TIMEOUT);
    for (key, value) in rows {
        insert.write(&EdgeRow::new(key, value)).await?;
    }
    insert.end().await
}

async fn insert_stages(client: &Client, rows: &[(StageKey, StageValue)]) -> clickhouse::error::Result<()> {
    let mut insert = client
        .insert::<StageRow<'_>>("stages_1m")
        .await?
        .with_timeouts(INSERT_TIMEOUT, INSERT_TIMEOUT);
    for (key, value) in rows {
        insert.write(&StageRow::new(key, value)).await?;
    }
    insert.end().await
}

async fn insert_owned<T: clickhouse::RowOwned + clickhouse::RowWrite>(
    client: &Client,
    table: &str,
    rows: &[T],
) -> clickhouse::error::Result<()> {
    let mut insert = client
        .insert::<T>(table)
        .await?
        .with_timeouts(INSERT_TIMEOUT, INSERT_TIMEOUT);
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}
