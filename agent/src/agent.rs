//! The process-wide agent: identity, the per-thread rings to the exporter, live sampling and
//! the drop counter. Set once by [`crate::init`].
//!
//! Each application thread gets two single-producer single-consumer rings on its first
//! hand-off: full batches to the exporter, emptied buffers back. Pushing is a few atomic
//! operations on memory only that thread and the exporter touch; the exporter takes the
//! registry's lock to visit the rings, application threads only to register. What waits in a
//! thread's ring is bounded in spans (the exporter counts what it took), so a thread that
//! outruns the exporter holds a bounded buffer, not one per hand-off.

use std::sync::{
    atomic::{AtomicPtr, AtomicU64, Ordering},
    Arc, Mutex, OnceLock,
};

use crate::span::Batch;

/// Emptied buffers waiting to go back to a thread; beyond it they are freed. A thread hands off
/// full buffers (`span::FLUSH_AT` spans) and its parked one once a drain, so this covers every
/// buffer a drain can take from a thread within `queue_spans` (512 at the defaults): with too
/// few, a thread allocated most buffers and the exporter freed them, and malloc's cross-thread
/// path cost more than the spans (callgrind, benches/README.md). Buffers exist only as far as
/// hand-offs made them, and no more of them than the spans `queue_spans` lets wait; the ring
/// itself is 56 bytes a slot.
const SPARE_BATCHES: usize = 1024;

/// Spans waiting in a thread's ring that wake the exporter before its next flush (at most once
/// every 100 ms, `exporter::MIN_DRAIN_GAP`): what it then does at once stays short (~0.3 ms at
/// sampling 1.0), since the application's threads may share its core and wait behind it. A
/// whole second of a busy service's spans at once showed as tail latency (service-overhead, p99
/// +33% at 2,000 requests/s).
const WAKE_AT_SPANS: u64 = 512;

pub(crate) struct Agent {
    service: String,
    pub(crate) version: String,
    pub(crate) instance: String,
    queue_spans: usize,
    rings: Mutex<Vec<ExporterEnd>>,
    sampling_ratio_bits: AtomicU64,
    pub(crate) dropped_spans: AtomicU64,
    /// Wakes the exporter before its next flush: a thread's ring is filling up.
    pub(crate) exporter_wake: tokio::sync::Notify,
}

/// A thread's ends of its rings.
pub(crate) struct ThreadRing {
    full: rtrb::Producer<Batch>,
    spare: rtrb::Consumer<Batch>,
    parked: Arc<Parked>,
    /// Records this thread handed off, ever.
    sent_records: u64,
    /// Records the exporter took from this ring, ever (written by the exporter only).
    taken_records: Arc<AtomicU64>,
    queue_spans: u64,
    /// Records waiting past which the exporter is woken before its next flush.
    wake_at: u64,
    /// `taken_records` when this thread last woke the exporter: once a drain, not once a
    /// hand-off.
    woke_at_taken: u64,
}

/// The exporter's ends of one thread's rings.
struct ExporterEnd {
    full: rtrb::Consumer<Batch>,
    spare: rtrb::Producer<Batch>,
    parked: Arc<Parked>,
    taken_records: Arc<AtomicU64>,
}

/// A thread's unfinished batch, left where the exporter can take it while the thread is out of
/// instrumented code (between requests): the thread takes it back when it starts its next
/// span, or finds it taken and starts a new one. A thread that serves one short request after
/// another thus fills a batch over many requests with one atomic swap each way, instead of
/// handing off a batch of a few spans per request, and an idle thread's spans still leave at
/// the exporter's next drain.
#[derive(Default)]
struct Parked(AtomicPtr<Batch>);

impl Parked {
    fn put(&self, batch: Box<Batch>) {
        let previous = self.0.swap(Box::into_raw(batch), Ordering::AcqRel);
        // Only the thread puts, and it takes back before it puts again.
        debug_assert!(previous.is_null(), "a batch parked twice");
        if !previous.is_null() {
            // SAFETY: every pointer in the slot came from `Box::into_raw`, and the swap gave
            // this call the only copy of it.
            drop(unsafe { Box::from_raw(previous) });
        }
    }

    fn take(&self) -> Option<Box<Batch>> {
        let batch = self.0.swap(std::ptr::null_mut(), Ordering::AcqRel);
        // SAFETY: as in `put`: from `Box::into_raw`, and the swap gave this call the only copy.
        (!batch.is_null()).then(|| unsafe { Box::from_raw(batch) })
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        drop(self.take());
    }
}

impl ThreadRing {
    /// An emptied buffer back from the exporter, if one is there.
    pub(crate) fn spare(&mut self) -> Option<Batch> {
        self.spare.pop().ok()
    }

    /// Whether `records` more fit in what may wait for the exporter.
    pub(crate) fn has_room(&self, records: usize) -> bool {
        let waiting = self.sent_records - self.taken_records.load(Ordering::Acquire);
        waiting + records as u64 <= self.queue_spans && !self.full.is_full()
    }

    /// Leaves the thread's unfinished batch for the exporter to take (see [`Parked`]).
    pub(crate) fn park(&self, batch: Box<Batch>) {
        self.parked.put(batch);
    }

    /// The parked batch, unless the exporter took it meanwhile.
    pub(crate) fn unpark(&self) -> Option<Box<Batch>> {
        self.parked.take()
    }

    /// Hands a batch to the exporter; never waits. Call [`ThreadRing::has_room`] first: a
    /// batch that does not fit is dropped here and its spans counted.
    pub(crate) fn send(&mut self, batch: Batch, agent: &Agent) {
        let records = batch.records().len() as u64;
        match self.full.push(batch) {
            Ok(()) => self.sent_records += records,
            Err(rtrb::PushError::Full(batch)) => {
                agent.count_dropped(&batch);
            }
        }
        self.wake_if_filling(agent);
    }

    /// Wakes the exporter when [`WAKE_AT_SPANS`] (at most a quarter of `queue_spans`) wait, or
    /// when spans are being dropped: a busy thread is drained sooner than the flush interval,
    /// in short goes, instead of dropping. Once a drain: the exporter's wake-ups stay few, each
    /// costing more CPU than many spans.
    pub(crate) fn wake_if_filling(&mut self, agent: &Agent) {
        let taken = self.taken_records.load(Ordering::Acquire);
        if self.sent_records - taken >= self.wake_at && self.woke_at_taken != taken {
            self.woke_at_taken = taken;
            agent.exporter_wake.notify_one();
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
        queue_spans: usize,
        sampling_ratio: f64,
    ) -> Self {
        Self {
            service,
            version,
            instance,
            queue_spans: queue_spans.max(1),
            rings: Mutex::new(Vec::new()),
            sampling_ratio_bits: AtomicU64::new(sampling_ratio.clamp(0.0, 1.0).to_bits()),
            dropped_spans: AtomicU64::new(0),
            exporter_wake: tokio::sync::Notify::new(),
        }
    }

    /// Counts the finished spans of a batch that will not reach the exporter.
    pub(crate) fn count_dropped(&self, batch: &Batch) {
        let spans = batch.records().iter().filter(|r| r.span_id != 0).count();
        self.dropped_spans.fetch_add(spans as u64, Ordering::Relaxed);
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
        // A batch holds at least one record, so the span bound is reached before the ring's.
        let (full_tx, full_rx) = rtrb::RingBuffer::new(self.queue_spans);
        let (spare_tx, spare_rx) = rtrb::RingBuffer::new(SPARE_BATCHES);
        let taken_records = Arc::new(AtomicU64::new(0));
        let parked = Arc::new(Parked::default());
        if let Ok(mut rings) = self.rings.lock() {
            rings.push(ExporterEnd {
                full: full_rx,
                spare: spare_tx,
                parked: parked.clone(),
                taken_records: taken_records.clone(),
            });
        }
        ThreadRing {
            full: full_tx,
            spare: spare_rx,
            parked,
            sent_records: 0,
            taken_records,
            queue_spans: self.queue_spans as u64,
            wake_at: (self.queue_spans as u64 / 4).clamp(1, WAKE_AT_SPANS),
            woke_at_taken: u64::MAX,
        }
    }

    /// Every batch handed off so far and every parked one, to `consume` with the number of
    /// records all of them hold
    /// (so that room for them is made once: a vector grown as they came copied them again and
    /// again, ~170 exporter instructions a span); the batches are emptied after and go back to
    /// their threads. Rings of threads that ended are dropped once drained.
    pub(crate) fn drain(&self, mut consume: impl FnMut(usize, &mut Batch)) {
        let Ok(mut rings) = self.rings.lock() else { return };
        let mut taken: Vec<(usize, Batch)> = Vec::new();
        for (index, ring) in rings.iter_mut().enumerate() {
            while let Ok(batch) = ring.full.pop() {
                ring.taken_records
                    .fetch_add(batch.records().len() as u64, Ordering::Release);
                taken.push((index, batch));
            }
            // After the ring: its spans are newer. (Never counted as waiting in the ring.)
            if let Some(batch) = ring.parked.take() {
                taken.push((index, *batch));
            }
        }
        let records = taken.iter().map(|(_, batch)| batch.records().len()).sum();
        for (index, mut batch) in taken {
            consume(records, &mut batch);
            batch.clear_records();
            // Contexts held by nothing else go back with the buffer, to be reused by the
            // thread (span.rs); no one can take another reference to them meanwhile.
            batch
                .traces
                .retain(|trace| Arc::strong_count(trace) == 1 && Arc::weak_count(trace) == 0);
            let _ = rings[index].spare.push(batch);
        }
        rings.retain(|ring| !ring.full.is_abandoned() || !ring.full.is_empty());
    }

    /// Sampled spans an early drain sends at once (half of what wakes the exporter); fewer wait
    /// for the flush. At full sampling an early drain has a ring's notification's worth and
    /// sends it, as a second's spans sent at once moved the benchmark's p90 (benches/README.md);
    /// at a low ratio its few sampled spans would each cost a send and an acknowledgement, two
    /// wake-ups of the exporter.
    pub(crate) fn early_send_spans(&self) -> usize {
        (self.queue_spans / 8).clamp(1, WAKE_AT_SPANS as usize / 2)
    }

    /// Batches waiting in the rings.
    pub(crate) fn queued_batches(&self) -> usize {
        self.rings
            .lock()
            .map_or(0, |rings| rings.iter().map(|r| r.full.slots()).sum())
    }
}
