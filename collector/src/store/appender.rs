//! The spool's appender: the one thread that owns the spool files.
//!
//! Receivers hand it encoded batches without waiting ([`SpoolHandle::try_append`]) and get a
//! [`Receipt`] that resolves once the batch is synced to disk: only then is it acknowledged to
//! its sender. The thread writes every batch waiting as one group with one sync, publishes the
//! last durable seq to the writer, and deletes segments the writer reports as written.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc as std_mpsc, Arc,
    },
    thread,
    time::Duration,
};

use tokio::sync::{oneshot, watch};
use tracing::{error, info};

use super::spool::{Recovered, SpoolError, SpoolFiles};
use crate::{config::SpoolConfig, metrics::Metrics};

/// At most this much is written per group: a reply is not held back by a huge group.
const MAX_GROUP_BYTES: usize = 16 << 20;

/// Why a batch was not taken.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AppendError {
    /// Too many batches wait for the disk (`queue_batches` or `max_pending_bytes`).
    #[error("too many batches wait for the spool")]
    QueueFull,
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// Resolves to the batch's seq once it is durable.
pub struct Receipt(oneshot::Receiver<Result<u64, SpoolError>>);

impl Receipt {
    pub async fn durable(self) -> Result<u64, SpoolError> {
        self.0
            .await
            .unwrap_or_else(|_| Err(SpoolError::Io("the spool stopped".into())))
    }
}

struct Append {
    payload: Vec<u8>,
    reply: oneshot::Sender<Result<u64, SpoolError>>,
}

/// Cheap to clone; the pipeline holds one. The thread ends once every handle is dropped.
#[derive(Clone)]
pub struct SpoolHandle {
    queue: std_mpsc::SyncSender<Append>,
    pending_bytes: Arc<AtomicU64>,
    /// Bytes on disk, as of the last group (a refusal here spares the sender a round trip).
    disk_bytes: Arc<AtomicU64>,
    config: Arc<SpoolConfig>,
    metrics: Arc<Metrics>,
}

impl SpoolHandle {
    /// Queues an encoded batch for the disk; never waits.
    pub fn try_append(&self, payload: Vec<u8>) -> Result<Receipt, AppendError> {
        let size = payload.len() as u64;
        let used = self.disk_bytes.load(Ordering::Relaxed);
        if used + size > self.config.max_bytes {
            return Err(SpoolError::Full {
                used,
                limit: self.config.max_bytes,
            }
            .into());
        }
        if self.pending_bytes.fetch_add(size, Ordering::Relaxed) + size > self.config.max_pending_bytes {
            self.pending_bytes.fetch_sub(size, Ordering::Relaxed);
            return Err(AppendError::QueueFull);
        }
        let (reply, receipt) = oneshot::channel();
        match self.queue.try_send(Append { payload, reply }) {
            Ok(()) => {
                self.metrics
                    .spool_pending_bytes
                    .set(self.pending_bytes.load(Ordering::Relaxed) as i64);
                Ok(Receipt(receipt))
            }
            Err(_) => {
                self.pending_bytes.fetch_sub(size, Ordering::Relaxed);
                Err(AppendError::QueueFull)
            }
        }
    }
}

/// What the writer gets: the last durable seq as it moves, and where to report progress.
pub struct SpoolFeed {
    /// The last durable seq (0: none yet). Closed once the appender has stopped.
    pub durable: watch::Receiver<u64>,
    /// Every batch up to this seq is in ClickHouse: its segments may go.
    pub written: Arc<AtomicU64>,
    pub recovered: Recovered,
}

/// Opens the spool in `dir` and starts the appender thread.
pub fn start(
    dir: &Path,
    config: &SpoolConfig,
    queue_batches: usize,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(SpoolHandle, SpoolFeed)> {
    let (mut files, recovered) = SpoolFiles::open(dir, config.max_bytes, config.segment_bytes)
        .map_err(|e| anyhow::anyhow!("cannot open the spool in {}: {e}", dir.display()))?;
    if recovered.records > 0 || recovered.corrupt > 0 {
        info!(
            records = recovered.records,
            corrupt = recovered.corrupt,
            bytes = files.bytes(),
            "spool holds batches from before: writing them first"
        );
    }
    metrics.spool_corrupt_records.inc_by(recovered.corrupt);
    let (queue, incoming) = std_mpsc::sync_channel::<Append>(queue_batches.max(1));
    let pending_bytes = Arc::new(AtomicU64::new(0));
    let disk_bytes = Arc::new(AtomicU64::new(files.bytes()));
    let (durable_tx, durable) = watch::channel(recovered.last_seq.unwrap_or(0));
    metrics.spool_durable_seq.set(recovered.last_seq.unwrap_or(0) as i64);
    let written = Arc::new(AtomicU64::new(0));
    let handle = SpoolHandle {
        queue,
        pending_bytes: pending_bytes.clone(),
        disk_bytes: disk_bytes.clone(),
        config: Arc::new(config.clone()),
        metrics: metrics.clone(),
    };
    let written_seen = written.clone();
    thread::Builder::new().name("sightline-spool".into()).spawn(move || {
        let mut released = 0;
        loop {
            let first = match incoming.recv_timeout(Duration::from_millis(200)) {
                Ok(first) => Some(first),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            };
            release(&mut files, &written_seen, &mut released);
            let Some(first) = first else {
                disk_bytes.store(files.bytes(), Ordering::Relaxed);
                metrics.spool_bytes.set(files.bytes() as i64);
                continue;
            };
            let mut group = vec![first];
            let mut size = group[0].payload.len();
            while size < MAX_GROUP_BYTES {
                let Ok(next) = incoming.try_recv() else { break };
                size += next.payload.len();
                group.push(next);
            }
            let payloads: Vec<Vec<u8>> = group.iter_mut().map(|a| std::mem::take(&mut a.payload)).collect();
            let result = files.append(&payloads);
            pending_bytes.fetch_sub(size as u64, Ordering::Relaxed);
            disk_bytes.store(files.bytes(), Ordering::Relaxed);
            metrics.spool_bytes.set(files.bytes() as i64);
            metrics
                .spool_pending_bytes
                .set(pending_bytes.load(Ordering::Relaxed) as i64);
            match result {
                Ok(first_seq) => {
                    metrics.spool_batches.inc_by(group.len() as u64);
                    let last = first_seq + group.len() as u64 - 1;
                    metrics.spool_durable_seq.set(last as i64);
                    durable_tx.send_replace(last);
                    for (i, append) in group.into_iter().enumerate() {
                        let _ = append.reply.send(Ok(first_seq + i as u64));
                    }
                }
                Err(e) => {
                    metrics.spool_refused_batches.inc_by(group.len() as u64);
                    if matches!(e, SpoolError::Io(_)) {
                        error!("spool write failed, {} batches refused: {e}", group.len());
                    }
                    for append in group {
                        let _ = append.reply.send(Err(e.clone()));
                    }
                }
            }
        }
        // Every receiver is gone: the writer drains what is durable, and reports it written.
        drop(durable_tx);
        while Arc::strong_count(&written_seen) > 1 {
            release(&mut files, &written_seen, &mut released);
            thread::sleep(Duration::from_millis(20));
        }
        release(&mut files, &written_seen, &mut released);
    })?;
    Ok((
        handle,
        SpoolFeed {
            durable,
            written,
            recovered,
        },
    ))
}

fn release(files: &mut SpoolFiles, written: &AtomicU64, released: &mut u64) {
    let through = written.load(Ordering::Acquire);
    if through > *released {
        files.release(through);
        *released = through;
    }
}
