//! The process-wide agent: identity, the per-thread rings to the exporter, live sampling and
//! the drop counter. Set once by [`crate::init`].
//!
//! Each application thread gets two single-producer single-consumer rings on its first
//! hand-off: full batches to the exporter, emptied buffers back. Pushing is a few atomic
//! operations on memory only that thread and the exporter touch; the exporter takes the
//! registry's lock to visit the rings, application threads only to register.

use std::sync::{
    atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering},
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
    /// Of those, spans dropped because a thread's ring was full (the exporter behind).
    pub(crate) ring_dropped_spans: AtomicU64,
    /// The exporter thread's id (0 until it runs) and whether it was raised to catch up.
    pub(crate) exporter_tid: AtomicI32,
    pub(crate) exporter_raised: AtomicBool,
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
        // Half full: the exporter is starved (it runs at idle priority). Raise it once; it
        // lowers itself when caught up.
        let exporter = agent.exporter_tid.load(Ordering::Relaxed);
        if exporter != 0
            && self.full.slots() < self.full.buffer().capacity() / 2
            && !agent.exporter_raised.swap(true, Ordering::Relaxed)
        {
            crate::exporter_priority(exporter, true);
        }
        if let Err(rtrb::PushError::Full(batch)) = self.full.push(batch) {
            let spans = batch.records.len() as u64;
            agent.dropped_spans.fetch_add(spans, Ordering::Relaxed);
            agent.ring_dropped_spans.fetch_add(spans, Ordering::Relaxed);
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
            ring_dropped_spans: AtomicU64::new(0),
            exporter_tid: AtomicI32::new(0),
            exporter_raised: AtomicBool::new(false),
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
    /// back to their threads. Rings of threads that ended are dropped once drained. Returns
    /// how full the fullest ring was (0..=1): how far behind the exporter is.
    pub(crate) fn drain(&self, mut consume: impl FnMut(&mut Batch)) -> f64 {
        let Ok(mut rings) = self.rings.lock() else { return 0.0 };
        let mut fullest: f64 = 0.0;
        for ring in rings.iter_mut() {
            fullest = fullest.max(ring.full.slots() as f64 / ring.full.buffer().capacity() as f64);
            while let Ok(mut batch) = ring.full.pop() {
                consume(&mut batch);
                batch.records.clear();
                batch.traces.clear();
                let _ = ring.spare.push(batch);
            }
        }
        rings.retain(|ring| !ring.full.is_abandoned() || !ring.full.is_empty());
        fullest
    }

    /// Batches waiting in the rings.
    pub(crate) fn queued_batches(&self) -> usize {
        self.rings
            .lock()
            .map_or(0, |rings| rings.iter().map(|r| r.full.slots()).sum())
    }
}
