//! The store writer: takes batches from the spool, in order, into ClickHouse.
//!
//! Receivers never hand rows to the writer directly: a batch is encoded into the spool
//! (`appender.rs`) and acknowledged once synced there, and the writer reads the spool up to
//! the last durable seq. So a ClickHouse outage waits on disk, not in memory, and a collector
//! killed at any moment replays on start whatever was not written.
//!
//! One batcher task collects spans until `batch_rows` or `flush_interval`, merges aggregate
//! partials per key, and cuts a *flush*: every table's rows from the spool batches `lo..=hi`.
//! A pool of inserter tasks runs the INSERTs concurrently (ClickHouse parses each on one
//! core). Each INSERT carries its batch range; a materialized view records it in
//! `write_ledger` in the same INSERT (schema.rs, migration 7). So:
//! - a replay after a crash skips, table by table, what the ledger shows already written;
//! - an INSERT that failed with a network error or timeout (it may have been applied) is
//!   checked against the ledger before it is tried again.
//!
//! Errors that ClickHouse may get over (network, timeouts, overload) are retried without end:
//! the spool holds the data, and the batcher stops reading while the inserters are stuck, so
//! memory stays bounded. Other errors are retried `max_attempts` times, then the rows are
//! dropped and counted, so that one poisoned batch never blocks the rest. Once every earlier
//! flush is done, the spool may delete the segments up to its `hi`.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex as StdMutex,
    },
    time::Duration,
};

use clickhouse::Client;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, Mutex},
    task::JoinSet,
    time::{sleep, Instant},
};
use tracing::{error, info, warn};

use super::{
    appender::SpoolFeed,
    rows::{BatchRange, EdgeRow, FineLatencyRow, HeartbeatRow, InflightRow, InsertTag, LatencyRow, SpanRow, StageRow},
    spool::SpoolReader,
};
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

/// What one receiver request contributes: the unit the spool stores.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WriteBatch {
    pub spans: Vec<Span>,
    pub latency: LatencyAggregates,
    pub edges: EdgeAggregates,
    pub stages: StageAggregates,
    pub heartbeats: Vec<HeartbeatRow>,
    pub inflight: Vec<InflightRow>,
}

impl WriteBatch {
    /// The spool's record of this batch.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding into memory cannot fail")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

enum Rows {
    Spans(Vec<Span>),
    Latency(Vec<(LatencyKey, LatencyValue)>),
    FineLatency(Vec<(LatencyKey, LatencyValue)>),
    Edges(Vec<(EdgeKey, LatencyValue)>),
    Stages(Vec<(StageKey, StageValue)>),
    Heartbeats(Vec<HeartbeatRow>),
    Inflight(Vec<InflightRow>),
}

impl Rows {
    fn table(&self) -> &'static str {
        match self {
            Rows::Spans(_) => "spans",
            Rows::Latency(_) => "latency_1m",
            Rows::FineLatency(_) => "latency_10s",
            Rows::Edges(_) => "edges_1m",
            Rows::Stages(_) => "stages_1m",
            Rows::Heartbeats(_) => "agent_heartbeats",
            Rows::Inflight(_) => "inflight",
        }
    }

    fn len(&self) -> usize {
        match self {
            Rows::Spans(r) => r.len(),
            Rows::Latency(r) | Rows::FineLatency(r) => r.len(),
            Rows::Edges(r) => r.len(),
            Rows::Stages(r) => r.len(),
            Rows::Heartbeats(r) => r.len(),
            Rows::Inflight(r) => r.len(),
        }
    }

    /// Whether the write ledger records this table (heartbeats and snapshots are exempt: a
    /// replayed duplicate of either changes no figure).
    fn ledgered(&self) -> bool {
        !matches!(self, Rows::Heartbeats(_) | Rows::Inflight(_))
    }
}

struct InsertJob {
    rows: Rows,
    range: BatchRange,
    flush: u64,
}

/// Flushes in the order they were cut, each with its INSERTs still running: the spool may
/// delete up to the `hi` of the last flush before which everything is done.
struct Progress {
    open: StdMutex<BTreeMap<u64, (u64, usize)>>,
    written: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

impl Progress {
    fn start(&self, flush: u64, hi: u64, jobs: usize) {
        self.open.lock().expect("progress lock").insert(flush, (hi, jobs));
        self.advance();
    }

    fn done(&self, flush: u64) {
        if let Some((_, jobs)) = self.open.lock().expect("progress lock").get_mut(&flush) {
            *jobs -= 1;
        }
        self.advance();
    }

    fn advance(&self) {
        let mut open = self.open.lock().expect("progress lock");
        while let Some(entry) = open.first_entry() {
            let (hi, jobs) = *entry.get();
            if jobs > 0 {
                break;
            }
            entry.remove();
            let before = self.written.fetch_max(hi, Ordering::Release);
            self.metrics.spool_written_seq.set(before.max(hi) as i64);
        }
    }
}

/// What the write ledger says was written of the batches being replayed.
#[derive(Default)]
struct Ledger {
    /// Per table, written batch ranges sorted by `lo`.
    written: FxHashMap<String, Vec<(u64, u64)>>,
    /// Seqs past this were not durable before this run: nothing to look up.
    until: u64,
}

#[derive(clickhouse::Row, Deserialize)]
struct LedgerRow {
    target: String,
    batch_lo: u64,
    batch_hi: u64,
}

impl Ledger {
    async fn load(client: &Client, from: u64, until: u64) -> clickhouse::error::Result<Self> {
        let rows: Vec<LedgerRow> = client
            .query("SELECT target, batch_lo, batch_hi FROM write_ledger WHERE batch_hi >= ? AND batch_lo <= ?")
            .bind(from)
            .bind(until)
            .fetch_all()
            .await?;
        let mut written: FxHashMap<String, Vec<(u64, u64)>> = FxHashMap::default();
        for row in rows {
            written
                .entry(row.target)
                .or_default()
                .push((row.batch_lo, row.batch_hi));
        }
        for ranges in written.values_mut() {
            ranges.sort_unstable();
        }
        Ok(Self { written, until })
    }

    fn covers(&self, table: &str, seq: u64) -> bool {
        if seq > self.until {
            return false;
        }
        let Some(ranges) = self.written.get(table) else {
            return false;
        };
        let after = ranges.partition_point(|(lo, _)| *lo <= seq);
        ranges[..after].iter().rev().any(|(lo, hi)| (*lo..=*hi).contains(&seq))
    }
}

/// Starts the batcher and the inserters. They run until the spool's appender stops (every
/// receiver gone), then write what is durable and end; await the returned set to know it is
/// all written. On a failing ClickHouse at that point they leave the rest in the spool.
pub fn start(
    client: Client,
    database: &str,
    config: &WriterConfig,
    spool_dir: &Path,
    feed: SpoolFeed,
    metrics: Arc<Metrics>,
) -> JoinSet<()> {
    let (jobs_tx, jobs_rx) = mpsc::channel::<InsertJob>(config.inserters);
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    let progress = Arc::new(Progress {
        open: StdMutex::new(BTreeMap::new()),
        written: feed.written.clone(),
        metrics: metrics.clone(),
    });
    let draining = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Writes::new(database));
    let mut tasks = JoinSet::new();
    tasks.spawn(
        Batcher {
            client: client.clone(),
            writes: writes.clone(),
            reader: SpoolReader::new(spool_dir),
            jobs: jobs_tx,
            config: config.clone(),
            metrics: metrics.clone(),
            progress: progress.clone(),
            draining: draining.clone(),
            pending: Pending::default(),
            flushes: 0,
        }
        .run(feed),
    );
    for _ in 0..config.inserters {
        tasks.spawn(inserter(
            client.clone(),
            writes.clone(),
            jobs_rx.clone(),
            config.max_attempts,
            metrics.clone(),
            progress.clone(),
            draining.clone(),
        ));
    }
    tasks
}

/// Rows read from the spool, not yet cut into a flush.
#[derive(Default)]
struct Pending {
    range: Option<BatchRange>,
    spans: Vec<Span>,
    /// Latency partials for both tables; `*_only` hold replayed batches already written to the
    /// other one.
    latency: LatencyAggregates,
    fine_only: LatencyAggregates,
    minute_only: LatencyAggregates,
    edges: EdgeAggregates,
    stages: StageAggregates,
    heartbeats: Vec<HeartbeatRow>,
    inflight: Vec<InflightRow>,
    since: Option<Instant>,
}

struct Batcher {
    client: Client,
    writes: Arc<Writes>,
    reader: SpoolReader,
    jobs: mpsc::Sender<InsertJob>,
    config: WriterConfig,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    draining: Arc<AtomicBool>,
    pending: Pending,
    flushes: u64,
}

impl Batcher {
    async fn run(mut self, feed: SpoolFeed) {
        let SpoolFeed {
            mut durable,
            recovered,
            written,
        } = feed;
        drop(written);
        let mut next = recovered.written_through.saturating_add(1);
        let replay_until = recovered.last_seq.unwrap_or(0);
        let ledger = if replay_until >= next {
            // An INSERT of the process before (killed, or timed out) may still be running on
            // the server: its ledger row comes with its end.
            self.writes.wait_for_running(&self.client, "").await;
            self.load_ledger(next, replay_until).await
        } else {
            Ledger::default()
        };
        let interval = self.config.flush_interval();
        loop {
            let until = *durable.borrow_and_update();
            if !self.read(&mut next, until, &ledger).await {
                return;
            }
            let deadline = self.pending.since.map(|since| since + interval);
            let closed = tokio::select! {
                changed = durable.changed() => changed.is_err(),
                _ = sleep_until_some(deadline) => {
                    if !self.flush().await {
                        return;
                    }
                    false
                }
            };
            if closed {
                // The appender stopped: what is durable now is all there will be.
                let until = *durable.borrow();
                if self.read(&mut next, until, &ledger).await {
                    self.flush().await;
                }
                self.draining.store(true, Ordering::Relaxed);
                return;
            }
        }
    }

    /// The ledger for a replay; ClickHouse answered the migrations a moment ago, so this
    /// waits for it rather than guess.
    async fn load_ledger(&self, from: u64, until: u64) -> Ledger {
        let mut attempt = 0u32;
        loop {
            match Ledger::load(&self.client, from, until).await {
                Ok(ledger) => {
                    info!(
                        ranges = ledger.written.values().map(Vec::len).sum::<usize>(),
                        "replaying the spool; the write ledger shows what is written already"
                    );
                    return ledger;
                }
                Err(e) => {
                    attempt += 1;
                    warn!(attempt, "cannot read the write ledger, retrying: {e}");
                    sleep(backoff(attempt)).await;
                }
            }
        }
    }

    /// Reads every durable batch from `next` on, flushing whenever enough spans are pending.
    /// False once the inserters are gone.
    async fn read(&mut self, next: &mut u64, until: u64, ledger: &Ledger) -> bool {
        loop {
            let (seq, payload) = match self.reader.read(*next, until) {
                Ok(Some(record)) => record,
                Ok(None) => return true,
                Err(e) => {
                    warn!("cannot read the spool, retrying: {e}");
                    sleep(Duration::from_secs(1)).await;
                    return true;
                }
            };
            *next = seq + 1;
            match WriteBatch::decode(&payload) {
                Ok(batch) => self.add(seq, batch, ledger),
                Err(e) => {
                    self.metrics.spool_corrupt_records.inc();
                    error!(seq, "undecodable spool record skipped: {e}");
                    continue;
                }
            }
            if self.pending.spans.len() >= self.config.batch_rows && !self.flush().await {
                return false;
            }
        }
    }

    fn add(&mut self, seq: u64, mut batch: WriteBatch, ledger: &Ledger) {
        let skipped = |table: &'static str| {
            let covered = ledger.covers(table, seq);
            if covered {
                self.metrics.replay_skipped.get_or_create(&TableLabel { table }).inc();
            }
            covered
        };
        if skipped("spans") {
            batch.spans.clear();
        }
        if skipped("edges_1m") {
            batch.edges = EdgeAggregates::default();
        }
        if skipped("stages_1m") {
            batch.stages = StageAggregates::default();
        }
        let (fine, minute) = (!skipped("latency_10s"), !skipped("latency_1m"));
        let pending = &mut self.pending;
        match (fine, minute) {
            (true, true) => pending.latency.merge(batch.latency),
            (true, false) => pending.fine_only.merge(batch.latency),
            (false, true) => pending.minute_only.merge(batch.latency),
            (false, false) => {}
        }
        let range = pending.range.get_or_insert(BatchRange { lo: seq, hi: seq });
        range.hi = seq;
        if pending.spans.capacity() == 0 {
            pending.spans.reserve(self.config.batch_rows);
        }
        self.metrics.write_queue_spans.inc_by(batch.spans.len() as i64);
        pending.spans.extend(batch.spans);
        pending.edges.merge(batch.edges);
        pending.stages.merge(batch.stages);
        pending.heartbeats.extend(batch.heartbeats);
        pending.inflight.extend(batch.inflight);
        pending.since.get_or_insert_with(Instant::now);
    }

    /// Cuts everything pending into one flush and hands its INSERTs to the inserters. False
    /// once they are gone.
    async fn flush(&mut self) -> bool {
        let pending = std::mem::take(&mut self.pending);
        let Some(range) = pending.range else { return true };
        let mut jobs = Vec::new();
        if !pending.spans.is_empty() {
            jobs.push(Rows::Spans(pending.spans));
        }
        let mut latency = pending.latency;
        let both = latency.drain();
        let mut fine = pending.fine_only;
        let mut minute = LatencyAggregates::by_minute(&both);
        let mut minute_only = pending.minute_only;
        minute.extend(LatencyAggregates::by_minute(&minute_only.drain()));
        let mut fine_rows = both;
        fine_rows.extend(fine.drain());
        if !minute.is_empty() {
            jobs.push(Rows::Latency(minute));
        }
        if !fine_rows.is_empty() {
            jobs.push(Rows::FineLatency(fine_rows));
        }
        let mut edges = pending.edges;
        if !edges.is_empty() {
            jobs.push(Rows::Edges(edges.drain()));
        }
        let mut stages = pending.stages;
        if !stages.is_empty() {
            jobs.push(Rows::Stages(stages.drain()));
        }
        if !pending.heartbeats.is_empty() {
            jobs.push(Rows::Heartbeats(pending.heartbeats));
        }
        if !pending.inflight.is_empty() {
            jobs.push(Rows::Inflight(pending.inflight));
        }
        self.flushes += 1;
        let flush = self.flushes;
        self.progress.start(flush, range.hi, jobs.len());
        for rows in jobs {
            if self.jobs.send(InsertJob { rows, range, flush }).await.is_err() {
                return false;
            }
        }
        true
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100 << attempt.min(6)).min(Duration::from_secs(5))
}

/// Errors ClickHouse may get over: retried without end while the collector runs.
fn is_transient(error: &clickhouse::error::Error) -> bool {
    use clickhouse::error::Error;
    match error {
        Error::Network(_) | Error::TimedOut => true,
        // Overload and server-side timeouts: too many parts (252), memory limit (241), too
        // many queries (202), timeouts (159, 209), network (210), shutting down (394).
        Error::BadResponse(message) => [252, 241, 202, 159, 209, 210, 394]
            .iter()
            .any(|code| message.contains(&format!("Code: {code},"))),
        _ => false,
    }
}

async fn inserter(
    client: Client,
    writes: Arc<Writes>,
    jobs: Arc<Mutex<mpsc::Receiver<InsertJob>>>,
    max_attempts: u32,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    draining: Arc<AtomicBool>,
) {
    loop {
        let job = jobs.lock().await.recv().await;
        let Some(mut job) = job else { return };
        if let Rows::Spans(spans) = &mut job.rows {
            // In the table's key order: ClickHouse sorts every INSERT by (service, start), and
            // takes sorted input at about twice the rate of arrival order (benches/README.md).
            spans.sort_unstable_by(|a, b| (&a.service, a.start_ns).cmp(&(&b.service, b.start_ns)));
        }
        let (table, rows) = (job.rows.table(), job.rows.len());
        let label = TableLabel { table };
        let mut attempt = 0;
        let mut query_id = String::new();
        let done = loop {
            attempt += 1;
            // Any failed attempt may have reached ClickHouse (a connection lost after the rows
            // were taken, a server stopped after its commit): before trying again, ask the
            // ledger, and do not insert until it can answer.
            if attempt > 1 && job.rows.ledgered() {
                // The attempt before may still be running on the server (our side timed out):
                // the ledger can only answer for it once it has ended.
                writes.wait_for_running(&client, &query_id).await;
                match in_ledger(&client, table, job.range).await {
                    Ok(true) => {
                        metrics.written_rows.get_or_create(&label).inc_by(rows as u64);
                        break true;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        if draining.load(Ordering::Relaxed) {
                            warn!(
                                table,
                                rows, "ClickHouse unreachable at shutdown; left in the spool: {e}"
                            );
                            break false;
                        }
                        let wait = backoff(attempt);
                        warn!(
                            table,
                            rows,
                            attempt,
                            ?wait,
                            "cannot read the write ledger, retrying: {e}"
                        );
                        sleep(wait).await;
                        continue;
                    }
                }
            }
            let started = std::time::Instant::now();
            query_id = writes.next_query_id();
            let Err(e) = insert(&client, &job.rows, job.range, &query_id).await else {
                metrics
                    .insert_duration_seconds
                    .get_or_create(&label)
                    .observe(started.elapsed().as_secs_f64());
                metrics.written_rows.get_or_create(&label).inc_by(rows as u64);
                break true;
            };
            metrics.insert_failures.get_or_create(&label).inc();
            let transient = is_transient(&e);
            if transient && draining.load(Ordering::Relaxed) {
                // Shutting down with ClickHouse away: the rows stay in the spool for the next run.
                warn!(
                    table,
                    rows, "ClickHouse unreachable at shutdown; left in the spool: {e}"
                );
                break false;
            }
            if !transient && attempt >= max_attempts {
                error!(table, rows, attempts = attempt, "giving up on INSERT: {e}");
                if let Rows::Spans(_) = job.rows {
                    metrics
                        .dropped_spans
                        .get_or_create(&ReasonLabel {
                            reason: "insert_failed",
                        })
                        .inc_by(rows as u64);
                }
                break true;
            }
            let wait = backoff(attempt);
            warn!(table, rows, attempt, ?wait, "INSERT failed, retrying: {e}");
            sleep(wait).await;
        };
        if let Rows::Spans(spans) = &job.rows {
            metrics.write_queue_spans.dec_by(spans.len() as i64);
        }
        if done {
            progress.done(job.flush);
        }
    }
}

/// Names this writer's INSERTs (`query_id`) so that one still running on the server can be
/// waited for. A collector killed mid-INSERT, or an attempt whose client gave up, leaves
/// ClickHouse finishing the INSERT, and its ledger row appears only at its end: a ledger read
/// before then says "not written" and the batch is written twice (a CI run of `durability`
/// stored 10,800 spans twice after a `kill -9`).
struct Writes {
    /// `sightline-write-<database>-`: shared by every collector process writing there.
    prefix: String,
    /// This process's part of the ids (ids must differ from any still running).
    run: u64,
    next: AtomicU64,
}

/// How long a replay or a retry waits for an INSERT still running before it reads the ledger
/// anyway (the INSERT's own timeout is 60 s).
const RUNNING_WAIT: Duration = Duration::from_secs(120);

impl Writes {
    fn new(database: &str) -> Self {
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Self {
            prefix: format!("sightline-write-{database}-"),
            run,
            next: AtomicU64::new(0),
        }
    }

    fn next_query_id(&self) -> String {
        format!(
            "{}{}-{}",
            self.prefix,
            self.run,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Waits while the INSERT `query_id` (or, with "", any INSERT of this database's writers)
    /// runs on the server. Returns at once if the server does not answer, as the callers'
    /// ledger reads then wait (or, shutting down, leave the rows in the spool); a server that
    /// restarted ended the queries it was running.
    async fn wait_for_running(&self, client: &Client, query_id: &str) {
        let deadline = Instant::now() + RUNNING_WAIT;
        let mut told = false;
        loop {
            let running = if query_id.is_empty() {
                client
                    .query("SELECT count() FROM system.processes WHERE position(query_id, ?) = 1")
                    .bind(self.prefix.as_str())
            } else {
                client
                    .query("SELECT count() FROM system.processes WHERE query_id = ?")
                    .bind(query_id)
            }
            .fetch_one::<u64>()
            .await;
            match running {
                Ok(0) | Err(_) => return,
                Ok(n) if Instant::now() >= deadline => {
                    warn!(
                        running = n,
                        "INSERTs still running on ClickHouse; reading the write ledger anyway"
                    );
                    return;
                }
                Ok(n) => {
                    if !std::mem::replace(&mut told, true) {
                        info!(
                            running = n,
                            "waiting for INSERTs still running on ClickHouse before reading the write ledger"
                        );
                    }
                    sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// Whether the ledger records `range` as written to `table`.
async fn in_ledger(client: &Client, table: &str, range: BatchRange) -> clickhouse::error::Result<bool> {
    client
        .query("SELECT count() FROM write_ledger WHERE target = ? AND batch_lo = ? AND batch_hi = ?")
        .bind(table)
        .bind(range.lo)
        .bind(range.hi)
        .fetch_one::<u64>()
        .await
        .map(|n| n > 0)
}

const INSERT_TIMEOUT: Option<Duration> = Some(Duration::from_secs(60));

/// One INSERT of `$rows` (`$len` of them) into `$table`, parsed and handed to the views as one
/// block: the views of ledgered tables write nothing of a block with fewer rows than the INSERT
/// says it has (`schema.rs`, `WHOLE_INSERT`), so an INSERT is applied whole or not at all.
macro_rules! insert_rows {
    ($client:expr, $query_id:expr, $table:expr, $row:ty, $len:expr, $rows:expr) => {{
        let len = $len.max(1).to_string();
        let mut insert = $client
            .insert::<$row>($table)
            .await?
            .with_timeouts(INSERT_TIMEOUT, INSERT_TIMEOUT)
            .with_setting("query_id", $query_id)
            .with_setting("max_insert_block_size", len.clone())
            .with_setting("min_insert_block_size_rows", len)
            .with_setting("min_insert_block_size_bytes", "0");
        for row in $rows {
            insert.write(&row).await?;
        }
        insert.end().await
    }};
}

async fn insert(client: &Client, rows: &Rows, range: BatchRange, query_id: &str) -> clickhouse::error::Result<()> {
    let len = rows.len();
    let tag = InsertTag {
        range,
        rows: len as u64,
    };
    match rows {
        Rows::Spans(spans) => insert_rows!(
            client,
            query_id,
            "spans_input",
            SpanRow<'_>,
            len,
            spans.iter().map(|s| SpanRow::new(s, tag))
        ),
        Rows::Latency(rows) => insert_rows!(
            client,
            query_id,
            "latency_1m_input",
            LatencyRow<'_>,
            len,
            rows.iter().map(|(k, v)| LatencyRow::new(k, v, tag))
        ),
        Rows::FineLatency(rows) => insert_rows!(
            client,
            query_id,
            "latency_10s_input",
            FineLatencyRow<'_>,
            len,
            rows.iter().map(|(k, v)| FineLatencyRow::new(k, v, tag))
        ),
        Rows::Edges(rows) => insert_rows!(
            client,
            query_id,
            "edges_1m_input",
            EdgeRow<'_>,
            len,
            rows.iter().map(|(k, v)| EdgeRow::new(k, v, tag))
        ),
        Rows::Stages(rows) => insert_rows!(
            client,
            query_id,
            "stages_1m_input",
            StageRow<'_>,
            len,
            rows.iter().map(|(k, v)| StageRow::new(k, v, tag))
        ),
        Rows::Heartbeats(rows) => insert_rows!(client, query_id, "agent_heartbeats", HeartbeatRow, len, rows),
        Rows::Inflight(rows) => insert_rows!(client, query_id, "inflight", InflightRow, len, rows),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::{SpanKind, SpanStatus};

    fn span() -> impl Strategy<Value = Span> {
        (
            (any::<[u8; 16]>(), 1u64.., any::<u64>(), 0u8..6, 0u8..3),
            ("\\PC{0,12}", "\\PC{0,12}", "[a-z]{0,6}", "\\PC{0,24}"),
            (0u64..4_000_000_000_000_000_000, 0u64..1 << 40),
            proptest::collection::vec(("\\PC{0,8}", "\\PC{0,8}"), 0..4),
        )
            .prop_map(
                |(
                    (trace_id, span_id, parent_span_id, kind, status),
                    (service, operation, component, bt),
                    (start_ns, duration_ns),
                    attributes,
                )| Span {
                    trace_id,
                    span_id,
                    parent_span_id,
                    service,
                    operation,
                    component,
                    bt,
                    kind: SpanKind::from_otlp(i32::from(kind)),
                    status: SpanStatus::from_otlp(i32::from(status)),
                    start_ns,
                    duration_ns,
                    attributes,
                    ..Span::default()
                },
            )
    }

    /// Entries in a stable order, to compare maps.
    fn sorted<T: std::fmt::Debug>(entries: Vec<T>) -> Vec<String> {
        let mut printed: Vec<String> = entries.iter().map(|e| format!("{e:?}")).collect();
        printed.sort();
        printed
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// What the writer reads back from the spool is what the pipeline wrote.
        #[test]
        fn a_batch_comes_back_whole_from_its_spool_record(spans in proptest::collection::vec(span(), 0..16)) {
            let batch = WriteBatch {
                spans: spans.clone(),
                latency: LatencyAggregates::from_spans(&spans),
                stages: StageAggregates::from_spans(&spans),
                ..WriteBatch::default()
            };
            let mut back = WriteBatch::decode(&batch.encode()).unwrap();
            prop_assert_eq!(&back.spans, &spans);
            prop_assert_eq!(sorted(back.latency.drain()), sorted(LatencyAggregates::from_spans(&spans).drain()));
            prop_assert_eq!(sorted(back.stages.drain()), sorted(StageAggregates::from_spans(&spans).drain()));
        }
    }

    #[test]
    fn the_ledger_covers_a_seq_only_for_the_table_and_range_written() {
        let mut written = FxHashMap::default();
        written.insert("spans".to_string(), vec![(10, 12), (20, 20)]);
        written.insert("latency_1m".to_string(), vec![(10, 15)]);
        let ledger = Ledger { written, until: 30 };
        assert!(ledger.covers("spans", 10) && ledger.covers("spans", 12) && ledger.covers("spans", 20));
        assert!(!ledger.covers("spans", 13) && !ledger.covers("spans", 9) && !ledger.covers("spans", 21));
        assert!(ledger.covers("latency_1m", 14) && !ledger.covers("latency_10s", 14));
        let ledger = Ledger { until: 11, ..ledger };
        assert!(!ledger.covers("spans", 12), "nothing past the replay is looked up");
    }
}
