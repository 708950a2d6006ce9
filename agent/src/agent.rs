//! The process-wide agent: identity, the hand-off queue to the exporter, live sampling and the
//! drop counter. Set once by [`crate::init`].

use std::sync::{
    atomic::{AtomicU64, Ordering},
    OnceLock,
};

use crossbeam_channel::{Receiver, Sender};

use crate::span::{Finished, FLUSH_AT};

/// Emptied hand-off buffers kept for reuse.
const SPARE_BUFFERS: usize = 1024;

pub(crate) struct Agent {
    service: String,
    pub(crate) version: String,
    pub(crate) instance: String,
    queue: Sender<Vec<Finished>>,
    spare_tx: Sender<Vec<Finished>>,
    spare_rx: Receiver<Vec<Finished>>,
    sampling_ratio_bits: AtomicU64,
    pub(crate) dropped_spans: AtomicU64,
}

static AGENT: OnceLock<Agent> = OnceLock::new();

#[inline]
pub(crate) fn get() -> Option<&'static Agent> {
    AGENT.get()
}

pub(crate) fn install(agent: Agent) -> Result<&'static Agent, ()> {
    AGENT.set(agent).map_err(|_| ())?;
    Ok(AGENT.get().expect("just set"))
}

impl Agent {
    pub(crate) fn new(
        service: String,
        version: String,
        instance: String,
        queue: Sender<Vec<Finished>>,
        sampling_ratio: f64,
    ) -> Self {
        let (spare_tx, spare_rx) = crossbeam_channel::bounded(SPARE_BUFFERS);
        Self {
            service,
            version,
            instance,
            queue,
            spare_tx,
            spare_rx,
            sampling_ratio_bits: AtomicU64::new(sampling_ratio.clamp(0.0, 1.0).to_bits()),
            dropped_spans: AtomicU64::new(0),
        }
    }

    pub(crate) fn service(&self) -> &str {
        &self.service
    }

    pub(crate) fn sampling_ratio(&self) -> f64 {
        f64::from_bits(self.sampling_ratio_bits.load(Ordering::Relaxed))
    }

    pub(crate) fn set_sampling_ratio(&self, ratio: f64) {
        self.sampling_ratio_bits
            .store(ratio.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// An empty buffer for a thread's finished spans, recycled when one is spare.
    pub(crate) fn spare_buffer(&self) -> Vec<Finished> {
        self.spare_rx
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(FLUSH_AT))
    }

    /// Gives an emptied buffer back for reuse (the exporter, after draining it).
    pub(crate) fn recycle(&self, buffer: Vec<Finished>) {
        debug_assert!(buffer.is_empty());
        let _ = self.spare_tx.try_send(buffer);
    }

    /// One thread's finished spans to the exporter; never waits. A full queue (the exporter
    /// is behind) drops the batch and counts it.
    pub(crate) fn hand_off(&self, batch: Vec<Finished>) {
        let n = batch.len() as u64;
        if self.queue.try_send(batch).is_err() {
            self.dropped_spans.fetch_add(n, Ordering::Relaxed);
        }
    }
}
