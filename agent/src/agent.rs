//! The process-wide agent: identity, the per-thread rings to the exporter, live sampling and
//! the drop counter. Set once by [`crate::init`].
//!
//! Each application thread gets two single-producer single-consumer rings on its first
//! hand-off: full batches to the exporter, emptied buffers back. Pushing is a few atomic
//! operations on memory only that thread and the exporter touch; the exporter takes the
//! registry's lock to visit the rings, application threads only to register.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex, OnceLock,
};

use crate::span::Batch;

/// Emptied buffers waiting to go back to a thread; beyond it they are freed.
const SPARE_BATCHES: usize = 64;

pub(crate) struct Agent {
    service: String,
    pub(crate) version: String,
    pub(crate) instance: String,
    ring_batches: usize,
    rings: Mutex<Vec<ExporterEnd>>,
    sampling_ratio_bits: AtomicU64,
    pub(crate) dropped_spans: AtomicU64,
}

/// A thread's ends of its rings.
pub(crate) struct ThreadRing {
    full: rtrb::Producer<Batch>,
    spare: rtrb::Consumer<Batch>,
}

/// The exporter's ends of one thread's rings.
struct ExporterEnd {
    full: rtrb::Consumer<Batch>,
    spare: rtrb::Producer<Batch>,
}

impl ThreadRing {
    /// An emptied buffer back from the exporter, if one is there.
    pub(crate) fn spare(&mut self) -> Option<Batch> {
        self.spare.pop().ok()
    }

    /// Hands a batch to the exporter; never waits. A full ring (the exporter is behind) drops
    /// the batch and counts its spans.
    pub(crate) fn send(&mut self, batch: Batch, agent: &Agent) {
        if let Err(rtrb::PushError::Full(batch)) = self.full.push(batch) {
            agent
                .dropped_spans
                .fetch_add(batch.records.len() as u64, Ordering::Relaxed);
        }
    }
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
        ring_batches: usize,
        sampling_ratio: f64,
    ) -> Self {
        Self {
            service,
            version,
            instance,
            ring_batches: ring_batches.max(1),
            rings: Mutex::new(Vec::new()),
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

    /// Rings for a thread's first hand-off.
    pub(crate) fn new_ring(&self) -> ThreadRing {
        let (full_tx, full_rx) = rtrb::RingBuffer::new(self.ring_batches);
        let (spare_tx, spare_rx) = rtrb::RingBuffer::new(SPARE_BATCHES);
        if let Ok(mut rings) = self.rings.lock() {
            rings.push(ExporterEnd {
                full: full_rx,
                spare: spare_tx,
            });
        }
        ThreadRing {
            full: full_tx,
            spare: spare_rx,
        }
    }

    /// Every batch handed off so far, to `consume` (which empties it); the emptied buffers go
    /// back to their threads. Rings of threads that ended are dropped once drained.
    pub(crate) fn drain(&self, mut consume: impl FnMut(&mut Batch)) {
        let Ok(mut rings) = self.rings.lock() else { return };
        for ring in rings.iter_mut() {
            while let Ok(mut batch) = ring.full.pop() {
                consume(&mut batch);
                batch.records.clear();
                batch.traces.clear();
                let _ = ring.spare.push(batch);
            }
        }
        rings.retain(|ring| !ring.full.is_abandoned() || !ring.full.is_empty());
    }

    /// Batches waiting in the rings.
    pub(crate) fn queued_batches(&self) -> usize {
        self.rings
            .lock()
            .map_or(0, |rings| rings.iter().map(|r| r.full.slots()).sum())
    }
}
