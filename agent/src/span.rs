//! Spans: RAII guards on the hot path (fastrace's shape).
//!
//! A service's part of a trace shares one [`TraceCtx`], made by its entry span (one allocation
//! per request). A span entered on a thread is a stack frame plus a record written once, in
//! place, in this thread's buffer (its end time is filled in when the guard drops); the guard
//! itself is two words. No atomic reference count, no lock, no allocation beyond the buffer.
//! The buffer goes to the exporter through this thread's own lock-free ring when it holds
//! [`FLUSH_AT`] spans (spans still open then move to the next buffer); when the thread leaves
//! instrumented code (its stack is empty) the buffer is parked where the exporter takes it at
//! its next drain, unless the thread takes it back first (see [`Local::leave`]). Whether a trace is recorded is decided once, at its root, before any
//! attribute exists. Inside an unsampled trace an internal child span is a no-op; calls out
//! (client spans) are still timed, for exact RED per stage and for naming the call a stuck
//! transaction is inside.

use std::{
    borrow::Cow,
    cell::{Cell, UnsafeCell},
    marker::PhantomData,
    mem::{ManuallyDrop, MaybeUninit},
    ptr::NonNull,
    rc::Rc,
    sync::Arc,
};

use crate::{
    agent::{self, ThreadRing},
    clock::{self, ids},
    inflight,
    propagation::RemoteContext,
    red::{self, LocalRed},
};

/// Names: static strings cost nothing, owned ones are kept as they are.
pub type Name = Cow<'static, str>;

/// Spans buffered per thread before a hand-off even when the thread stays busy.
pub const FLUSH_AT: usize = 128;

/// What kind of work a span measures (OpenTelemetry's span kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Work inside the service: a step of a handler.
    Internal = 1,
    /// Work entering the service: an HTTP route, an RPC method.
    Server = 2,
    /// A call out: database, cache, another service.
    Client = 3,
    /// A message sent to a queue.
    Producer = 4,
    /// A message taken from a queue and handled.
    Consumer = 5,
}

/// A name every span of a trace shares: free to clone when static (the usual case: a BT or
/// route named in code), a reference count otherwise. Compared and hashed by its text.
#[derive(Clone, Debug)]
pub(crate) enum SharedName {
    Static(&'static str),
    Shared(Arc<str>),
}

impl SharedName {
    fn new(name: &Name) -> Self {
        match name {
            Cow::Borrowed(s) => Self::Static(s),
            Cow::Owned(s) => Self::Shared(Arc::from(s.as_str())),
        }
    }
}

impl std::ops::Deref for SharedName {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Self::Static(s) => s,
            Self::Shared(s) => s,
        }
    }
}

impl PartialEq for SharedName {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for SharedName {}

impl std::hash::Hash for SharedName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

/// A call out: (operation, peer).
pub(crate) type Call = (Name, Name);

/// One service's part of a trace, shared by all its spans: made by the entry span and
/// registered as an open transaction (for in-flight snapshots) until the entry span ends.
#[derive(Debug)]
pub(crate) struct TraceCtx {
    pub trace_id: u128,
    pub sampled: bool,
    pub bt: SharedName,
    /// The entry span's operation: the "caller operation" downstream.
    pub entry_operation: SharedName,
    pub entry_span_id: u64,
    /// The entry span's start, a raw clock reading: converted to Unix time only for an
    /// in-flight snapshot (a conversion per request otherwise, ~35 instructions).
    pub start_raw: u64,
    /// The call out the transaction is inside now. Noted by client spans (which wrap I/O) and,
    /// once per snapshot interval, read by the exporter.
    pub current_call: inflight::CurrentCall,
    /// Where [`inflight`] keeps it while open (written by `register`, read by `unregister`,
    /// both on the transaction's own path).
    pub inflight_slot: std::sync::atomic::AtomicU32,
}

/// A span as propagation and the `tracing` layer see it: its id and its trace.
#[derive(Clone, Debug)]
pub(crate) struct Current {
    pub span_id: u64,
    pub trace: Arc<TraceCtx>,
}

/// A span in a thread's buffer; times are raw clock readings, converted by the exporter.
#[derive(Debug)]
pub(crate) struct Record {
    /// Index into its batch's `traces`.
    pub trace: u32,
    pub kind: Kind,
    /// The entry span of its service: registered as an open transaction while it runs.
    pub entry: bool,
    /// The HTTP response status of a server or client span (0: none); in the record's padding,
    /// so that the usual attribute costs no allocation.
    pub http_status: u16,
    /// 0 for the hole an open span leaves when it moves to the next buffer.
    pub span_id: u64,
    pub parent_span_id: u64,
    pub start_raw: u64,
    pub end_raw: u64,
    pub operation: Name,
    pub component: Name,
    pub peer: Name,
    pub detail: Option<Box<Detail>>,
}

impl Record {
    /// What an open span leaves behind in a buffer handed off.
    const HOLE: Record = Record {
        trace: 0,
        kind: Kind::Internal,
        entry: false,
        http_status: 0,
        span_id: 0,
        parent_span_id: 0,
        start_raw: 0,
        end_raw: 0,
        operation: Cow::Borrowed(""),
        component: Cow::Borrowed(""),
        peer: Cow::Borrowed(""),
        detail: None,
    };

    fn set_attribute(&mut self, key: Name, value: String) {
        let detail = self.detail.get_or_insert_with(Box::default);
        detail.attributes.push((key, value));
    }

    fn set_error(&mut self, error_type: Name, message: String) {
        let detail = self.detail.get_or_insert_with(Box::default);
        detail.error = Some((error_type, message));
    }

    /// Whether dropping it frees memory.
    #[inline]
    fn owns_heap(&self) -> bool {
        matches!(self.operation, Cow::Owned(_))
            || matches!(self.component, Cow::Owned(_))
            || matches!(self.peer, Cow::Owned(_))
            || self.detail.is_some()
    }

    /// Bookkeeping at the end of a span.
    #[inline]
    fn end(&mut self, trace: &TraceCtx, end_raw: u64) {
        self.end_raw = end_raw;
        AtEnd::of(self.kind, self.entry).run(trace);
    }
}

/// What the end of a span does besides taking the time.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AtEnd {
    Nothing,
    /// An entry span: its transaction is no longer open.
    Unregister,
    /// A call out: the transaction is no longer inside it.
    ClearCall,
}

impl AtEnd {
    #[inline(always)]
    fn of(kind: Kind, entry: bool) -> Self {
        if entry {
            AtEnd::Unregister
        } else if kind == Kind::Client {
            AtEnd::ClearCall
        } else {
            AtEnd::Nothing
        }
    }

    #[inline(always)]
    fn run(self, trace: &TraceCtx) {
        match self {
            AtEnd::Nothing => {}
            AtEnd::Unregister => inflight::unregister(trace),
            AtEnd::ClearCall => trace.current_call.leave(),
        }
    }
}

/// What few spans carry: kept out of line so that the common record stays small.
#[derive(Debug, Default)]
pub(crate) struct Detail {
    /// Error type and message.
    pub error: Option<(Name, String)>,
    pub attributes: Vec<(Name, String)>,
    /// The calling service and operation, from baggage (entry spans).
    pub caller: Option<(String, String)>,
}

/// One hand-off from a thread to the exporter: records and the traces they point at.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub traces: Vec<Arc<TraceCtx>>,
    records: Vec<Record>,
    /// Whether a record may hold heap memory (an owned name, details): only then are records
    /// dropped one by one when the batch is emptied. Nearly all spans have static names and no
    /// details, and dropping each of their records (a check of four fields) was a tenth of a
    /// span's work on the application thread and work again on the exporter's.
    heap: bool,
    /// RED of spans the thread folded itself instead of writing records (unsampled traces).
    /// Boxed, made at the first fold: a batch is moved whole at every parking (twice a
    /// request), and the table inline made each move a copy of twice the bytes.
    pub(crate) red: Option<Box<LocalRed>>,
}

impl Batch {
    /// An empty batch with room for `records` without growing.
    pub(crate) fn with_capacity(traces: usize, records: usize) -> Self {
        Self {
            traces: Vec::with_capacity(traces),
            records: Vec::with_capacity(records),
            heap: false,
            red: None,
        }
    }

    pub(crate) fn records(&self) -> &[Record] {
        &self.records
    }

    pub(crate) fn push(&mut self, record: Record) {
        self.heap |= record.owns_heap();
        self.records.push(record);
    }

    /// The record at `index`, to change; from then on records are dropped one by one.
    fn record_mut(&mut self, index: u32) -> Option<&mut Record> {
        self.heap = true;
        self.records.get_mut(index as usize)
    }

    /// Keeps the first `len` records.
    fn truncate(&mut self, len: usize) {
        debug_assert!(
            self.heap || self.records.iter().all(|r| !r.owns_heap()),
            "a record owning memory in a batch not marked"
        );
        if self.heap {
            self.records.truncate(len);
        } else if len < self.records.len() {
            // SAFETY: the records past `len` own no heap memory (`heap` is set by every write
            // that can give a record some), so forgetting them leaks nothing; `len` is within
            // the initialized length.
            unsafe { self.records.set_len(len) };
        }
    }

    /// Empties the records, keeping the buffer.
    pub(crate) fn clear_records(&mut self) {
        self.truncate(0);
        self.heap = false;
    }
}

/// A trace as this thread's stack holds it, with where it sits in the current batch.
#[derive(Debug)]
struct TraceEntry {
    ctx: Arc<TraceCtx>,
    /// The batch generation `slot` belongs to.
    generation: Cell<u32>,
    slot: Cell<u32>,
}

impl TraceEntry {
    fn new(ctx: Arc<TraceCtx>) -> Rc<Self> {
        Rc::new(Self {
            ctx,
            generation: Cell::new(u32::MAX),
            slot: Cell::new(0),
        })
    }
}

struct Frame {
    span_id: u64,
    /// Copied from the trace: the unsampled path reads nothing else.
    sampled: bool,
    /// Copied from the record, so that ending the span only writes to it (reading the record
    /// right after writing it showed as a stall in `perf annotate`).
    at_end: AtEnd,
    /// Its record's index in the current buffer; [`NO_RECORD`] when the span's data lives
    /// elsewhere (a [`Span`] made current for a while).
    record: u32,
    /// Its trace, kept alive by a frame that [owns](Frame::owner) it: a child span's frame
    /// borrows its parent's, as a reference count per child made each span's enter and exit
    /// wait on the last one's update of it.
    trace: NonNull<TraceEntry>,
    /// Set in the frame that made the trace current here (an entry span, a scope); handed to
    /// another frame of the same trace if this one goes first.
    owner: Option<Rc<TraceEntry>>,
}

impl Frame {
    #[inline(always)]
    fn trace(&self) -> &TraceEntry {
        // SAFETY: a frame on the stack owns this trace entry (see `owner`).
        unsafe { self.trace.as_ref() }
    }
}

const NO_RECORD: u32 = u32::MAX;

/// The trace slot of an unsampled span's record while it is open: its trace joins the batch
/// only if the record stays (most are folded into RED at their end, see [`LocalRed`]).
const NO_TRACE: u32 = u32::MAX;

/// This thread's state: entered spans, the batch being filled, its ring to the exporter.
struct Local {
    stack: Vec<Frame>,
    batch: Batch,
    /// Span ids for children entered here (xorshift64*; 0 until seeded): the hot path reads
    /// one thread-local, not two.
    id_state: u64,
    /// Trace contexts no one else holds, back from the exporter with emptied buffers: a
    /// transaction reuses one instead of allocating what the exporter would free (a free from
    /// another thread takes glibc's slow path on both sides).
    recycled: Vec<Arc<TraceCtx>>,
    /// Bumped at every hand-off: a [`TraceEntry`]'s slot is valid while it matches.
    generation: u32,
    ring: Option<ThreadRing>,
    /// The last trace made current from a [`Span`]: futures are polled again and again.
    last_scoped: Option<Rc<TraceEntry>>,
    /// Whether `batch` is parked for the exporter (see [`Local::leave`]); nothing is written
    /// to the batch meanwhile (scopes may be current: see [`push_frame`]).
    parked: bool,
    /// The box a batch is parked in, kept between parkings.
    park_box: Option<Box<Batch>>,
    /// A [`Span`]'s box, kept for the next: a request's entry span allocated and freed one.
    spare_span: Option<SpareSpan>,
}

/// A scope entered on an empty stack and not yet pushed (see [`enter_scope`]): its span's id
/// and trace. The trace is the [`Span`]'s, which outlives the scope (the scope's end, [`pop`],
/// clears it, on unwinding too).
#[derive(Clone, Copy)]
struct PendingScope {
    span_id: u64,
    trace: NonNull<TraceCtx>,
    /// A call ended in it took the batch out without parking it again (see
    /// [`Local::after_call`]): the scope's end parks it.
    wrote: bool,
}

impl Local {
    /// Empty: a `const` thread-local needs no lazy set-up on every access.
    const fn new() -> Self {
        Self {
            stack: Vec::new(),
            batch: Batch {
                traces: Vec::new(),
                records: Vec::new(),
                heap: false,
                red: None,
            },
            id_state: 0,
            recycled: Vec::new(),
            generation: 0,
            ring: None,
            last_scoped: None,
            parked: false,
            park_box: None,
            spare_span: None,
        }
    }

    /// Pushes the pending scope, if any, before the stack is read or changed.
    #[inline]
    fn settle(&mut self) {
        if let Some(pending) = PENDING.with(Cell::take) {
            // SAFETY: from `Arc::as_ptr` of the scope's span's trace, alive while the scope is
            // pending (see `PendingScope`); borrowed without touching its count.
            let trace = std::mem::ManuallyDrop::new(unsafe { Arc::from_raw(pending.trace.as_ptr()) });
            self.push_scope(pending.span_id, &trace);
        }
    }

    /// A frame for a span made current for a while (a scope): its data stays with its guard.
    fn push_scope(&mut self, span_id: u64, trace: &Arc<TraceCtx>) {
        // The batch stays parked until a record is written: a scope that starts no span leaves
        // nothing to take back and park again.
        let sampled = trace.sampled;
        let trace = self.scoped_entry(trace);
        self.stack.push(Frame {
            span_id,
            sampled,
            // The span's own guard does its end.
            at_end: AtEnd::Nothing,
            record: NO_RECORD,
            trace: NonNull::from(&*trace),
            owner: Some(trace),
        });
        self.sync_top();
    }

    /// A span id (never 0).
    #[inline]
    fn next_id(&mut self) -> u64 {
        if self.id_state == 0 {
            self.id_state = ids::next_u64();
        }
        ids::step(&mut self.id_state)
    }

    /// Keeps [`TOP`] in step with the stack; called after every change to it.
    #[inline(always)]
    fn sync_top(&self) {
        let top = match self.stack.last() {
            None => Top::None,
            Some(frame) if frame.sampled => Top::Sampled,
            Some(_) => Top::Unsampled,
        };
        // Through `with`: `LocalKey::set` was left a call (`initialize_with`) where inlined
        // into the span's end.
        TOP.with(|cell| cell.set(top));
    }

    /// The index of `trace` in the current batch, adding it on first use.
    #[inline]
    fn slot_of_entry(&mut self, trace: &TraceEntry) -> u32 {
        if trace.generation.get() != self.generation {
            trace.generation.set(self.generation);
            trace.slot.set(self.batch.traces.len() as u32);
            self.batch.traces.push(trace.ctx.clone());
        }
        trace.slot.get()
    }

    fn slot_of(&mut self, trace: &Arc<TraceCtx>) -> u32 {
        let traces = &self.batch.traces;
        if let Some(i) = traces.iter().rev().take(4).position(|t| Arc::ptr_eq(t, trace)) {
            return (traces.len() - 1 - i) as u32;
        }
        self.batch.traces.push(trace.clone());
        (self.batch.traces.len() - 1) as u32
    }

    fn push_record(&mut self, record: Record) {
        self.batch.push(record);
        self.after_end();
    }

    /// After a span ends or a scope closes: a full batch goes to the exporter; one left when
    /// the thread leaves instrumented code is parked for it.
    #[inline(always)]
    fn after_end(&mut self) {
        if self.batch_is_due() {
            self.hand_off();
        } else if self.stack.is_empty() {
            self.leave();
        }
    }

    /// Whether the batch goes to the exporter now: full of records or folds, or holding RED of
    /// a window that has passed.
    #[inline(always)]
    fn batch_is_due(&self) -> bool {
        let (folded, stale) = self
            .batch
            .red
            .as_ref()
            .map_or((0, false), |red| (red.folded, red.stale));
        self.batch.records.len() >= FLUSH_AT || folded >= red::FOLDS_PER_HAND_OFF || stale
    }

    /// [`Local::after_end`] for a call ended off the stack ([`UnsampledCall`]), but inside a
    /// pending scope the batch is not parked yet: the scope's end does it ([`pop`]), after the
    /// request's entry span has usually ended in the same scope and parked it once for both.
    #[inline(always)]
    fn after_call(&mut self) {
        if self.batch_is_due() {
            self.hand_off();
        } else if self.stack.is_empty() {
            match PENDING.get() {
                Some(pending) => PENDING.set(Some(PendingScope { wrote: true, ..pending })),
                None => self.leave(),
            }
        }
    }

    /// The thread leaves instrumented code: what it buffered is parked where the exporter
    /// takes it at its next drain, unless the thread takes it back first to go on filling it
    /// (see [`Local::resume`]). One atomic swap each way, where a hand-off a request cost a
    /// ring slot, a buffer (often a fresh one) and the exporter's work on a batch of a few
    /// spans.
    fn leave(&mut self) {
        if self.agent_for_batch().is_none() {
            return;
        }
        let ring = self.ring.as_ref().expect("made by agent_for_batch");
        let mut parked = self.park_box.take().unwrap_or_default();
        std::mem::swap(&mut *parked, &mut self.batch);
        ring.park(parked);
        self.parked = true;
    }

    /// Before the thread writes to its batch: its parked batch back, or, when the exporter took
    /// it, a new one.
    #[inline]
    fn resume(&mut self) {
        if self.parked {
            self.unpark();
        }
    }

    fn unpark(&mut self) {
        self.parked = false;
        let Some(ring) = &mut self.ring else { return };
        match ring.unpark() {
            Some(mut parked) => {
                std::mem::swap(&mut *parked, &mut self.batch);
                self.park_box = Some(parked);
            }
            None => {
                // Its traces went with it: no trace entry's slot holds any more.
                self.generation = self.generation.wrapping_add(1);
                if let Some(spare) = self.take_spare() {
                    self.batch = spare;
                }
            }
        }
    }

    /// Empties the batch's traces; no trace entry's slot holds after.
    fn clear_traces(&mut self) {
        if !self.batch.traces.is_empty() {
            self.batch.traces.clear();
            self.generation = self.generation.wrapping_add(1);
        }
    }

    /// A buffer the exporter emptied, with the contexts it held kept for reuse.
    fn take_spare(&mut self) -> Option<Batch> {
        let mut spare = self.ring.as_mut()?.spare()?;
        // Contexts the exporter held last: this thread's next transactions reuse them (what
        // does not fit is dropped). One by one: usually there is one, and
        // `extend(drain().take())` cost ~80 instructions for it.
        while self.recycled.len() < RECYCLED_TRACES {
            let Some(trace) = spare.traces.pop() else { break };
            self.recycled.push(trace);
        }
        spare.traces.clear();
        Some(spare)
    }

    /// A record written in place for a span entered now.
    fn open(&mut self, span_id: u64, trace: Rc<TraceEntry>, record: Record) {
        self.resume();
        let slot = self.slot_of_entry(&trace);
        let index = self.batch.records.len() as u32;
        let at_end = AtEnd::of(record.kind, record.entry);
        self.batch.push(Record { trace: slot, ..record });
        self.stack.push(Frame {
            span_id,
            sampled: trace.ctx.sampled,
            at_end,
            record: index,
            trace: NonNull::from(&*trace),
            owner: Some(trace),
        });
        self.sync_top();
    }

    /// Ends the usual span, inline: the top of the stack, whose end only takes the time and
    /// leaves its parent current. `false` when [`Local::close`] is needed.
    #[inline(always)]
    fn close_top(&mut self, span_id: u64, end_raw: u64) -> bool {
        let len = self.stack.len();
        let Some(frame) = self.stack.last() else {
            return false;
        };
        if frame.span_id != span_id || frame.at_end != AtEnd::Nothing || frame.owner.is_some() || len == 1 {
            return false;
        }
        let Some(record) = self.batch.records.get_mut(frame.record as usize) else {
            return false;
        };
        record.end_raw = end_raw;
        self.stack.truncate(len - 1);
        self.sync_top();
        if self.batch.records.len() >= FLUSH_AT {
            self.hand_off();
        }
        true
    }

    /// Ends an entered span: off the stack, its end time in its record.
    #[inline(never)]
    fn close(&mut self, span_id: u64, end_raw: u64) {
        // Read in place: copying the frame out first showed in profiles.
        let top = self.stack.len().wrapping_sub(1);
        let found = match self.stack.last() {
            Some(frame) if frame.span_id == span_id => Some(top),
            _ => self.stack.iter().rposition(|f| f.span_id == span_id),
        };
        if let Some(i) = found {
            let frame = &self.stack[i];
            let index = frame.record as usize;
            let mut needs_trace = false;
            if let Some(record) = self.batch.records.get_mut(index) {
                record.end_raw = end_raw;
                if !frame.sampled
                    && self
                        .batch
                        .red
                        .get_or_insert_with(Box::default)
                        .fold(&frame.trace().ctx, record)
                {
                    // Its RED is kept here: the record goes (a hole while others follow it).
                    record.span_id = 0;
                    if index + 1 == self.batch.records.len() {
                        self.batch.truncate(index);
                    }
                } else {
                    needs_trace = record.trace == NO_TRACE;
                }
            }
            if needs_trace {
                // SAFETY: a frame on the stack owns it (see `Frame::owner`).
                let slot = self.slot_of_entry(unsafe { self.stack[i].trace.as_ref() });
                self.batch.records[index].trace = slot;
            }
            let frame = &self.stack[i];
            if frame.at_end != AtEnd::Nothing {
                frame.at_end.run(&frame.trace().ctx);
            }
            if frame.owner.is_some() {
                self.hand_over(i);
            }
            if i == top {
                // Dropped in place: `pop` reads the whole frame out, and its 8-byte load over
                // the narrower stores of a span entered just now stalls.
                self.stack.truncate(top);
            } else {
                self.stack.remove(i);
            }
            self.sync_top();
        }
        self.after_end();
    }

    /// The record of the entered span `span_id`.
    fn record_of(&mut self, span_id: u64) -> Option<&mut Record> {
        let frame = self.stack.iter().rev().find(|f| f.span_id == span_id)?;
        self.batch.record_mut(frame.record)
    }

    /// The agent, with this thread's ring made, when the batch has records for it; otherwise
    /// the batch is emptied and `None`.
    fn agent_for_batch(&mut self) -> Option<&'static agent::Agent> {
        if self.batch.records.is_empty() && self.batch.red.as_ref().is_none_or(|red| red.is_empty()) {
            self.clear_traces();
            return None;
        }
        let Some(agent) = agent::get() else {
            self.batch.clear_records();
            if let Some(red) = &mut self.batch.red {
                red.clear();
            }
            self.clear_traces();
            return None;
        };
        self.ring.get_or_insert_with(|| agent.new_ring());
        Some(agent)
    }

    fn hand_off(&mut self) {
        let Some(agent) = self.agent_for_batch() else {
            return;
        };
        let ring = self.ring.as_mut().expect("made by agent_for_batch");
        if !ring.has_room(self.batch.records.len()) {
            ring.wake_if_filling(agent);
            self.drop_finished(agent);
            return;
        }
        // A buffer the exporter emptied: growing a fresh one per hand-off cost more than the
        // spans (benches/README.md). A fresh one has room for a full batch at once: with
        // batches parked between requests, most hand-offs are of full ones.
        let fresh = self.take_spare().unwrap_or_else(|| Batch::with_capacity(8, FLUSH_AT));
        let mut full = std::mem::replace(&mut self.batch, fresh);
        self.generation = self.generation.wrapping_add(1);
        // Spans still open move on: a buffer handed off holds finished spans only.
        for i in 0..self.stack.len() {
            let index = self.stack[i].record;
            if index == NO_RECORD {
                continue;
            }
            let record = std::mem::replace(&mut full.records[index as usize], Record::HOLE);
            // SAFETY: a frame on the stack owns it (see `Frame::owner`).
            let slot = self.slot_of_entry(unsafe { self.stack[i].trace.as_ref() });
            self.stack[i].record = self.batch.records.len() as u32;
            self.batch.push(Record { trace: slot, ..record });
        }
        let ring = self.ring.as_mut().expect("made above");
        ring.send(full, agent);
    }

    /// The exporter is behind: this buffer's finished spans are dropped (and counted) and the
    /// buffer is kept for what comes next, with the open spans' records moved to its front.
    /// A thread outrunning the exporter thus reuses one warm buffer instead of allocating one
    /// per hand-off.
    fn drop_finished(&mut self, agent: &agent::Agent) {
        let records = &mut self.batch.records;
        let mut kept = 0;
        // Open spans' records sit in stack order (a span's record is pushed when it is
        // entered), so each moves to a slot at or before its own.
        for frame in &mut self.stack {
            if frame.record == NO_RECORD {
                continue;
            }
            let at = frame.record as usize;
            debug_assert!(at >= kept, "open records out of stack order");
            if at < kept {
                frame.record = NO_RECORD;
                continue;
            }
            records.swap(kept, at);
            frame.record = kept as u32;
            kept += 1;
        }
        let dropped = records[kept..].iter().filter(|r| r.span_id != 0).count();
        agent
            .dropped_spans
            .fetch_add(dropped as u64, std::sync::atomic::Ordering::Relaxed);
        self.batch.truncate(kept);
        self.batch.traces.clear();
        self.generation = self.generation.wrapping_add(1);
        for i in 0..self.stack.len() {
            let index = self.stack[i].record;
            if index == NO_RECORD {
                continue;
            }
            // SAFETY: a frame on the stack owns it (see `Frame::owner`).
            let slot = self.slot_of_entry(unsafe { self.stack[i].trace.as_ref() });
            self.batch.records[index as usize].trace = slot;
        }
    }

    #[inline]
    fn keep_spare_span(&mut self, spare: SpareSpan) {
        if self.spare_span.is_none() {
            self.spare_span = Some(spare);
        }
    }

    /// Keeps `trace` for a transaction to come when nothing else holds it. Contexts of sampled
    /// transactions come back from the exporter (see [`Local::take_spare`]); those of folded
    /// ones never leave the thread.
    #[inline]
    fn recycle(&mut self, trace: Arc<TraceCtx>) {
        recycle_into(&mut self.recycled, trace);
    }

    fn scoped_entry(&mut self, trace: &Arc<TraceCtx>) -> Rc<TraceEntry> {
        if let Some(entry) = &mut self.last_scoped {
            if Arc::ptr_eq(&entry.ctx, trace) {
                return entry.clone();
            }
            // No frame holds the last one (its request's poll is over): reused for this trace
            // rather than freed and allocated again, once per request.
            if let Some(reused) = Rc::get_mut(entry) {
                let previous = std::mem::replace(&mut reused.ctx, trace.clone());
                recycle_into(&mut self.recycled, previous);
                reused.generation.set(u32::MAX);
                reused.slot.set(0);
                return entry.clone();
            }
        }
        let entry = TraceEntry::new(trace.clone());
        self.last_scoped = Some(entry.clone());
        entry
    }

    fn remove_frame(&mut self, span_id: u64) {
        let top = self.stack.len().wrapping_sub(1);
        let found = match self.stack.last() {
            Some(frame) if frame.span_id == span_id => Some(top),
            _ => self.stack.iter().rposition(|f| f.span_id == span_id),
        };
        let Some(i) = found else {
            return;
        };
        if self.stack[i].owner.is_some() {
            self.hand_over(i);
        }
        if i == top {
            self.stack.truncate(top);
        } else {
            self.stack.remove(i);
        }
        self.sync_top();
    }

    /// Before frame `i` owning its trace goes: another frame of the same trace takes the
    /// ownership over, if there is one (spans ended out of order); otherwise it is released.
    fn hand_over(&mut self, i: usize) {
        let owner = self.stack[i].owner.take();
        let trace = self.stack[i].trace;
        let heir = self
            .stack
            .iter_mut()
            .enumerate()
            .find(|(j, f)| *j != i && f.trace == trace);
        if let Some((_, heir)) = heir {
            if heir.owner.is_none() {
                heir.owner = owner;
            }
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // The thread is ending: what it buffered still goes.
        let _ = PENDING.try_with(|pending| pending.set(None));
        self.stack.clear();
        let _ = TOP.try_with(|top| top.set(Top::None));
        self.resume();
        self.hand_off();
    }
}

thread_local! {
    static LOCAL: LocalCell = const { LocalCell::new() };
    /// What the top of this thread's stack is, readable without touching [`LOCAL`]: a plain
    /// thread-local byte makes the unsampled path a single load.
    static TOP: Cell<Top> = const { Cell::new(Top::None) };
    /// A scope not yet pushed. Most scopes start no span (a server layer's `call`, a poll that
    /// finds nothing ready), and pushing and popping a frame for them was ~200 instructions a
    /// request. Only while the stack is empty; [`TOP`] is then [`Top::Pending`], and whatever
    /// reads or changes the stack pushes it first ([`Local::settle`]). Beside [`LOCAL`], not in
    /// it: a field there changed the code of every span's start and end (+10 instructions).
    static PENDING: Cell<Option<PendingScope>> = const { Cell::new(None) };
}

/// Trace contexts a thread keeps for reuse.
const RECYCLED_TRACES: usize = 64;

/// See [`Local::recycle`].
#[inline]
fn recycle_into(recycled: &mut Vec<Arc<TraceCtx>>, trace: Arc<TraceCtx>) {
    if recycled.len() < RECYCLED_TRACES && Arc::strong_count(&trace) == 1 && Arc::weak_count(&trace) == 0 {
        recycled.push(trace);
    }
}

/// What a transaction's context starts with (the rest starts empty).
struct TraceStart {
    trace_id: u128,
    sampled: bool,
    bt: SharedName,
    entry_operation: SharedName,
    entry_span_id: u64,
    start_raw: u64,
}

/// A context of this thread's recycled ones when one is there, else a new one. A recycled one
/// is set field by field: assigned whole, the context was built on the stack, copied in and
/// the old one dropped (~50 instructions a request).
fn new_trace_ctx(start: TraceStart) -> Arc<TraceCtx> {
    let recycled = with_local(|local| local.recycled.pop()).flatten();
    if let Some(mut ctx) = recycled {
        if let Some(slot) = Arc::get_mut(&mut ctx) {
            slot.trace_id = start.trace_id;
            slot.sampled = start.sampled;
            slot.bt = start.bt;
            slot.entry_operation = start.entry_operation;
            slot.entry_span_id = start.entry_span_id;
            slot.start_raw = start.start_raw;
            slot.current_call.reset();
            *slot.inflight_slot.get_mut() = 0;
            return ctx;
        }
    }
    Arc::new(TraceCtx {
        trace_id: start.trace_id,
        sampled: start.sampled,
        bt: start.bt,
        entry_operation: start.entry_operation,
        entry_span_id: start.entry_span_id,
        start_raw: start.start_raw,
        current_call: Default::default(),
        inflight_slot: Default::default(),
    })
}

/// `name`, moved as its parts: a static name is rebuilt from its pointer and length, where a
/// move of the whole `Cow` copies it with a 16-byte load over the 8-byte stores that made it
/// (a store-forwarding stall).
#[inline(always)]
#[allow(clippy::needless_match)] // the match is the point: see above
fn by_parts(name: Name) -> Name {
    match name {
        Cow::Borrowed(s) => Cow::Borrowed(s),
        owned => owned,
    }
}

/// Makes room for one more element of `vec`, before the values of a span are made: a growth
/// check (a call) between making them and storing them left them spilled to the stack and
/// copied from there in wide moves that waited on their narrow stores.
#[inline(always)]
fn reserve_one<T>(vec: &mut Vec<T>) {
    if vec.len() == vec.capacity() {
        vec.reserve(1);
    }
}

/// Appends `value`, written straight into place.
///
/// # Safety
/// `vec` has room for it ([`reserve_one`] since its last push).
#[inline(always)]
unsafe fn push_reserved<T>(vec: &mut Vec<T>, value: T) {
    let len = vec.len();
    debug_assert!(len < vec.capacity());
    // SAFETY: `len < capacity` (the caller's promise), so the slot is allocated and unused;
    // the length covers it only once it is written.
    unsafe {
        vec.as_mut_ptr().add(len).write(value);
        vec.set_len(len + 1);
    }
}

/// This thread's [`Local`], used without a borrow flag: a `RefCell`'s check, set and reset
/// around each span's start and end were ~1.3 ns a span (`span-loop`). Exclusive use holds
/// because nothing done while it is in use comes back to it: the code given it runs no code of
/// the caller's (attribute values are made before) and starts or ends no span; the records and
/// contexts it drops free memory only. Debug builds check this.
struct LocalCell {
    local: UnsafeCell<Local>,
    #[cfg(debug_assertions)]
    in_use: Cell<bool>,
}

impl LocalCell {
    const fn new() -> Self {
        Self {
            local: UnsafeCell::new(Local::new()),
            #[cfg(debug_assertions)]
            in_use: Cell::new(false),
        }
    }
}

/// Runs `f` on this thread's [`Local`], `None` once it is gone (the thread is ending), with a
/// pending scope pushed first. `f` must not reach it again (see [`LocalCell`]).
#[inline(always)]
fn with_local<R>(f: impl FnOnce(&mut Local) -> R) -> Option<R> {
    with_local_unsettled(|local| {
        local.settle();
        f(local)
    })
}

/// [`with_local`] leaving a pending scope pending: for what neither reads nor changes the stack
/// below its top, or cannot run while a scope is pending (an entered span's end: it was entered
/// on a stack that was not empty).
#[inline(always)]
fn with_local_unsettled<R>(f: impl FnOnce(&mut Local) -> R) -> Option<R> {
    // SAFETY: the reference lives only within this call.
    unsafe { local() }.map(|mut local| f(&mut local))
}

/// This thread's [`Local`] in use, `None` once it is gone; ready for use again when dropped.
///
/// The closure given to `LocalKey::try_with` only takes the address: with the span's work inside
/// it, `try_with` stayed an out-of-line call reaching the thread-local through a function
/// pointer, about a tenth of a span's instructions (callgrind, `span-loop`). For the same reason
/// the span's hot paths take this guard rather than pass a closure to [`with_local`].
///
/// # Safety
/// The guard must not outlive the caller's call (the thread's end destroys `LOCAL`), and
/// nothing done while it is held may reach `LOCAL` again (see [`LocalCell`]).
#[inline(always)]
unsafe fn local<'a>() -> Option<LocalInUse<'a>> {
    let cell = LOCAL.try_with(|l| l as *const LocalCell).ok()?;
    // SAFETY: the address is this thread's live `LOCAL` (`try_with` succeeded); the caller
    // keeps the guard no longer than its own call.
    let cell = unsafe { &*cell };
    #[cfg(debug_assertions)]
    assert!(!cell.in_use.replace(true), "span state reached again while in use");
    Some(LocalInUse {
        // SAFETY: exclusive: only this thread reaches its `LOCAL`, and not again while this
        // guard is held (the caller's promise; checked in debug builds above).
        local: unsafe { &mut *cell.local.get() },
        #[cfg(debug_assertions)]
        in_use: &cell.in_use,
    })
}

/// See [`local`].
struct LocalInUse<'a> {
    local: &'a mut Local,
    #[cfg(debug_assertions)]
    in_use: &'a Cell<bool>,
}

impl std::ops::Deref for LocalInUse<'_> {
    type Target = Local;
    #[inline(always)]
    fn deref(&self) -> &Local {
        self.local
    }
}

impl std::ops::DerefMut for LocalInUse<'_> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut Local {
        self.local
    }
}

#[cfg(debug_assertions)]
impl Drop for LocalInUse<'_> {
    fn drop(&mut self) {
        self.in_use.set(false);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Top {
    None,
    Sampled,
    Unsampled,
    /// A scope is pending (see [`PENDING`]); the stack is empty.
    Pending,
}

/// Describes a span before it starts. Made by [`crate::transaction`] and [`crate::span`].
#[must_use = "a builder does nothing until started"]
pub struct SpanBuilder {
    operation: Name,
    kind: Kind,
    component: Name,
    peer: Name,
    bt: Option<Name>,
    /// Boxed: the builder is moved on every span, the remote context is rare.
    remote: Option<Box<RemoteContext>>,
    /// A parent given explicitly instead of this thread's current span.
    parent: Option<Current>,
}

impl SpanBuilder {
    #[inline]
    pub(crate) fn new(operation: Name, kind: Kind, bt: Option<Name>) -> Self {
        Self {
            operation,
            kind,
            component: Cow::Borrowed(""),
            peer: Cow::Borrowed(""),
            bt,
            remote: None,
            parent: None,
        }
    }

    /// The operation, when it differs from the name given: a route template, never a raw URL.
    #[inline]
    pub fn operation(mut self, operation: impl Into<Name>) -> Self {
        self.operation = operation.into();
        self
    }

    /// The span's kind, when neither [`crate::transaction`] (server) nor
    /// [`SpanBuilder::client`] says it.
    #[inline]
    pub fn kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }

    /// A call to `peer` (`redis`, `postgres:orders`, `auth`) through `component` (`db`,
    /// `cache`, `mq`, `http`, `grpc`).
    #[inline]
    pub fn client(mut self, component: impl Into<Name>, peer: impl Into<Name>) -> Self {
        self.kind = Kind::Client;
        self.component = component.into();
        self.peer = peer.into();
        self
    }

    /// Names the business transaction this span starts (for an entry span). Ignored when the
    /// caller already named one in baggage: downstream services serve the caller's BT.
    pub fn business_transaction(mut self, name: impl Into<Name>) -> Self {
        self.bt = Some(name.into());
        self
    }

    /// Starts the span under `parent` rather than under this thread's current span.
    #[cfg_attr(not(feature = "tracing-layer"), allow(dead_code))]
    pub(crate) fn parent(mut self, parent: Option<Current>) -> Self {
        self.parent = parent;
        self
    }

    /// Continues a trace that came from another service (see [`crate::propagation::extract`]).
    pub fn child_of(mut self, remote: Option<RemoteContext>) -> Self {
        self.remote = remote.map(Box::new);
        self
    }

    /// A child of a span in `trace`: `None` when it would not be recorded (inside an unsampled
    /// trace only calls out are timed).
    fn child_record(self, trace: &TraceCtx, parent_span_id: u64) -> Option<Record> {
        if !trace.sampled && self.kind != Kind::Client {
            return None;
        }
        if self.kind == Kind::Client {
            trace.current_call.enter(&self.operation, &self.peer);
        }
        Some(Record {
            trace: 0,
            kind: self.kind,
            entry: false,
            http_status: 0,
            span_id: ids::next_u64(),
            parent_span_id,
            start_raw: clock::now_raw(),
            end_raw: 0,
            operation: self.operation,
            component: self.component,
            peer: self.peer,
            detail: None,
        })
    }

    /// Starts the span without entering it: for async work (see [`Span::instrument`]) or when
    /// the guard moves across threads.
    #[allow(clippy::redundant_closure)] // the closure is the point: see `start_server_entry`
    pub fn start(self) -> Span {
        // A closure, as in `start_server_entry`.
        self.start_with(|trace, record| Span::of(trace, record))
            .unwrap_or(Span { data: None })
    }

    /// Starts the span and gives its trace and record to `finish` (which boxes them for a
    /// [`Span`], or opens them on this thread's stack for an entered one): `None` when it is
    /// not recorded. Generic, so that the record is written where `finish` keeps it rather
    /// than returned and copied (~130 bytes).
    #[inline(always)]
    fn start_with<R>(mut self, finish: impl FnOnce(Arc<TraceCtx>, Record) -> R) -> Option<R> {
        agent::get()?;
        let parent = match self.parent.take() {
            Some(parent) => Some(parent),
            None if self.remote.is_none() => current_context(),
            None => None,
        };
        match parent {
            Some(parent) => {
                let record = self.child_record(&parent.trace, parent.span_id)?;
                Some(finish(parent.trace, record))
            }
            None => Some(self.entry(finish)),
        }
    }

    /// The entry span of this service's part of a trace: a new trace at a root, or the
    /// continuation of a remote one.
    fn entry<R>(self, finish: impl FnOnce(Arc<TraceCtx>, Record) -> R) -> R {
        let SpanBuilder {
            operation,
            kind,
            component,
            peer,
            bt,
            remote,
            parent: _,
        } = self;
        start_entry(operation, kind, component, peer, bt, remote, finish)
    }

    /// Starts the span and makes it the current one on this thread until the guard drops: for
    /// synchronous code.
    #[inline(always)]
    pub fn entered(self) -> EnteredSpan {
        if self.parent.is_none() && self.remote.is_none() {
            // The common case, a child of this thread's current span: one look at the stack.
            // A frame there means the agent runs.
            match TOP.get() {
                Top::Unsampled if self.kind != Kind::Client => {
                    self.discard();
                    return EnteredSpan::off();
                }
                Top::None => {}
                // Sampled, a call out in an unsampled trace, or a scope pending (pushed by
                // `enter_child` on finding the stack empty).
                top => {
                    let SpanBuilder {
                        operation,
                        kind,
                        component,
                        peer,
                        bt,
                        remote,
                        parent,
                    } = self;
                    // Both `None` (checked above): nothing to drop, and no check of it again.
                    std::mem::forget((remote, parent));
                    // A child's BT is its trace's: a name given here is dropped unused.
                    drop(bt);
                    if kind == Kind::Client && top != Top::Sampled {
                        if let (Cow::Borrowed(operation), Cow::Borrowed(component), Cow::Borrowed(peer)) =
                            (&operation, &component, &peer)
                        {
                            if let Some(call) = UnsampledCall::enter(top, operation, component, peer) {
                                return EnteredSpan::of(EnteredState::Call(call));
                            }
                        }
                    }
                    return Self::enter_child(operation, kind, component, peer);
                }
            }
        }
        self.entered_other()
    }

    /// Drops a builder not used, inline: when it holds nothing owned (static names, the
    /// usual case) there is nothing to free, and an out-of-line drop was most of the unsampled
    /// path's cost.
    #[inline]
    fn discard(self) {
        let owns_memory = matches!(self.operation, Cow::Owned(_))
            || matches!(self.component, Cow::Owned(_))
            || matches!(self.peer, Cow::Owned(_))
            || self.bt.is_some()
            || self.remote.is_some()
            || self.parent.is_some();
        if owns_memory {
            drop(self);
        } else {
            std::mem::forget(self);
        }
    }

    /// Enters a child of this thread's current span: inline into the caller, so that the
    /// builder's fields stay in registers. Built in memory and read back by a function of its
    /// own, the builder (then the record and the frame, made on the stack and copied) was read
    /// with wider loads than its stores, and each such load waited for those stores to retire
    /// (a store-forwarding stall; four of them were most of a span in `perf annotate`).
    #[inline(always)]
    fn enter_child(operation: Name, kind: Kind, component: Name, peer: Name) -> EnteredSpan {
        // SAFETY: used within this call only; nothing below starts or ends a span or runs the
        // caller's code.
        let Some(mut local) = (unsafe { local() }) else {
            return EnteredSpan::off();
        };
        // A scope may be current with the batch still parked (see `push_frame`).
        local.resume();
        reserve_one(&mut local.batch.records);
        reserve_one(&mut local.stack);
        let Some(top) = local.stack.last() else {
            // `Top::Pending`: the scope goes on the stack first. (The guard has a `Drop` only
            // in debug builds, where it checks for reentrance.)
            #[allow(clippy::drop_non_drop)]
            drop(local);
            return Self::enter_under_pending(operation, kind, component, peer);
        };
        let (parent_span_id, trace_ptr, sampled) = (top.span_id, top.trace, top.sampled);
        // SAFETY: a frame on the stack owns it (see `Frame::owner`), and the new frame stays
        // above that one or takes it over.
        let trace = unsafe { trace_ptr.as_ref() };
        if !sampled && kind != Kind::Client {
            return EnteredSpan::off();
        }
        if kind == Kind::Client {
            trace.ctx.current_call.enter(&operation, &peer);
        }
        let span_id = local.next_id();
        let slot = if sampled { local.slot_of_entry(trace) } else { NO_TRACE };
        let start_raw = clock::now_raw();
        let index = local.batch.records.len() as u32;
        local.batch.heap |=
            matches!(operation, Cow::Owned(_)) | matches!(component, Cow::Owned(_)) | matches!(peer, Cow::Owned(_));
        // SAFETY: room made above; nothing since pushed to either vector.
        unsafe {
            push_reserved(
                &mut local.batch.records,
                Record {
                    trace: slot,
                    kind,
                    entry: false,
                    http_status: 0,
                    span_id,
                    parent_span_id,
                    start_raw,
                    end_raw: 0,
                    operation: by_parts(operation),
                    component: by_parts(component),
                    peer: by_parts(peer),
                    detail: None,
                },
            );
            push_reserved(
                &mut local.stack,
                Frame {
                    span_id,
                    sampled,
                    at_end: AtEnd::of(kind, false),
                    record: index,
                    trace: trace_ptr,
                    owner: None,
                },
            );
        }
        // What `sync_top` would read back from the frame just written.
        TOP.with(|top| top.set(if sampled { Top::Sampled } else { Top::Unsampled }));
        EnteredSpan::of(EnteredState::Stacked(Entered { span_id, sampled }))
    }

    /// [`SpanBuilder::enter_child`] inside a pending scope: the scope is pushed first. (The
    /// first span of a poll comes here: not cold.)
    #[inline(never)]
    fn enter_under_pending(operation: Name, kind: Kind, component: Name, peer: Name) -> EnteredSpan {
        if PENDING.get().is_none() {
            return EnteredSpan::off();
        }
        with_local(|_| {});
        Self::enter_child(operation, kind, component, peer)
    }

    fn entered_other(self) -> EnteredSpan {
        let opened = self.start_with(|trace, record| {
            let sampled = trace.sampled;
            let span_id = record.span_id;
            with_local(|local| {
                let entry = local.scoped_entry(&trace);
                local.open(span_id, entry, record);
            });
            EnteredSpan::of(EnteredState::Stacked(Entered { span_id, sampled }))
        });
        opened.unwrap_or_else(EnteredSpan::off)
    }
}

/// The entry span of this service's part of a trace: a new trace at a root, or the
/// continuation of a remote one, given to `finish`. The agent runs.
#[inline]
fn start_entry<R>(
    operation: Name,
    kind: Kind,
    component: Name,
    peer: Name,
    bt_named: Option<Name>,
    remote: Option<Box<RemoteContext>>,
    finish: impl FnOnce(Arc<TraceCtx>, Record) -> R,
) -> R {
    let agent = agent::get().expect("checked by the caller");
    let entry_operation = SharedName::new(&operation);
    let (trace_id, parent_span_id, sampled, bt, caller) = match remote {
        Some(remote) => {
            let remote = *remote;
            let bt = match (&bt_named, remote.bt) {
                (_, Some(inherited)) => SharedName::Shared(inherited.into()),
                (Some(named), None) => SharedName::new(named),
                (None, None) => entry_operation.clone(),
            };
            let caller = remote
                .caller_service
                .map(|service| (service, remote.caller_operation.unwrap_or_default()));
            (remote.trace_id, remote.parent_span_id, remote.sampled, bt, caller)
        }
        None => {
            let bt = match &bt_named {
                Some(named) => SharedName::new(named),
                None => entry_operation.clone(),
            };
            let (trace_id, sampled) = ids::new_trace(agent.sampling_ratio());
            (trace_id, 0, sampled, bt, None)
        }
    };
    let span_id = ids::next_u64();
    let start_raw = clock::now_raw();
    let trace = new_trace_ctx(TraceStart {
        trace_id,
        sampled,
        bt,
        entry_operation,
        entry_span_id: span_id,
        start_raw,
    });
    inflight::register(trace.clone());
    finish(
        trace,
        Record {
            trace: 0,
            kind,
            entry: true,
            http_status: 0,
            span_id,
            parent_span_id,
            start_raw,
            end_raw: 0,
            operation,
            component,
            peer,
            detail: caller.map(|caller| {
                Box::new(Detail {
                    caller: Some(caller),
                    ..Detail::default()
                })
            }),
        },
    )
}

/// Starts a server's entry span (an integration's, per request) as [`SpanBuilder::start`] would
/// from a builder of these parts, without one: the builder was moved at each step (~50
/// instructions a request).
#[allow(clippy::redundant_closure)] // the closure is the point: see below
pub(crate) fn start_server_entry(operation: Name, bt: Option<Name>, remote: Option<RemoteContext>) -> Span {
    if agent::get().is_none() {
        return Span { data: None };
    }
    if remote.is_none() && TOP.get() != Top::None {
        // Inside a span of this thread (or a scope): its child, as the builder makes it.
        return SpanBuilder::new(operation, Kind::Server, bt).start();
    }
    let none = || Cow::Borrowed("");
    start_entry(
        operation,
        Kind::Server,
        none(),
        none(),
        bt,
        remote.map(Box::new),
        // A closure, not the function: given as a function item it stayed a call, and the
        // record was built on the stack and copied into the box.
        |trace, record| Span::of(trace, record),
    )
}

struct SpanData {
    trace: Arc<TraceCtx>,
    /// Its batch slot is set when it is buffered.
    record: Record,
}

/// A box of a [`SpanData`] moved out, to box another.
type SpareSpan = Box<MaybeUninit<SpanData>>;

/// `data`'s contents and its box, to reuse.
fn unbox(data: Box<SpanData>) -> (SpanData, SpareSpan) {
    let raw = Box::into_raw(data);
    // SAFETY: `raw` is a live box's, read once; the box is then owned as uninitialized memory,
    // so its contents are not dropped twice.
    unsafe { (raw.read(), Box::from_raw(raw.cast::<MaybeUninit<SpanData>>())) }
}

/// A running span; it ends when dropped. It may move across threads (async work). Disabled
/// (free) when the agent is not running or the trace is not recorded.
pub struct Span {
    /// Boxed: a span lives in futures that are moved a few times each (a server's response
    /// future through the framework's wrappers), and its ~130 bytes inline were copied at each
    /// move (~100 instructions a request). The thread keeps a box to reuse ([`Local::spare_span`]).
    data: Option<Box<SpanData>>,
}

impl Span {
    /// A running span of `trace`, boxed in this thread's spare box when there is one.
    #[inline(always)]
    fn of(trace: Arc<TraceCtx>, record: Record) -> Span {
        let spare = with_local_unsettled(|local| local.spare_span.take()).flatten();
        let data = SpanData { trace, record };
        Span {
            data: Some(match spare {
                Some(spare) => Box::write(spare, data),
                None => Box::new(data),
            }),
        }
    }

    /// Whether this span is recorded with its attributes.
    pub fn is_recording(&self) -> bool {
        self.data.as_ref().is_some_and(|d| d.trace.sampled)
    }

    /// Adds an attribute; costs nothing when the span is not recorded.
    pub fn set_attribute(&mut self, key: impl Into<Name>, value: impl ToString) {
        if let Some(data) = &mut self.data {
            if data.trace.sampled {
                data.record.set_attribute(key.into(), value.to_string());
            }
        }
    }

    /// Marks the span failed, with an error type (`Timeout`, `sqlx::Error`) and message.
    pub fn set_error(&mut self, error_type: impl Into<Name>, message: impl ToString) {
        if let Some(data) = &mut self.data {
            data.record.set_error(error_type.into(), message.to_string());
        }
    }

    /// The HTTP response status, exported as `http.response.status_code`.
    #[cfg_attr(not(any(feature = "reqwest", test)), allow(dead_code))]
    pub(crate) fn set_http_status(&mut self, status: u16) {
        if let Some(data) = &mut self.data {
            data.record.http_status = status;
        }
    }

    /// The business transaction this span serves, if it is running.
    pub fn business_transaction(&self) -> Option<&str> {
        self.data.as_ref().map(|d| &*d.trace.bt)
    }

    /// The trace id, as 32 hex digits.
    pub fn trace_id(&self) -> Option<String> {
        self.data.as_ref().map(|d| format!("{:032x}", d.trace.trace_id))
    }

    pub(crate) fn current(&self) -> Option<Current> {
        self.data.as_ref().map(|d| Current {
            span_id: d.record.span_id,
            trace: d.trace.clone(),
        })
    }

    /// Runs `f` with this span current on this thread: spans started inside are its children.
    pub fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        let _exit = self.scope();
        f()
    }

    /// This span current on this thread until the guard drops: [`Span::in_scope`] without a
    /// closure, for a call whose arguments a closure would copy (an HTTP request is 240 bytes).
    #[inline]
    pub(crate) fn scope(&self) -> Option<ScopeExit> {
        let data = self.data.as_ref()?;
        enter_scope(data.record.span_id, &data.trace);
        Some(ScopeExit(data.record.span_id))
    }

    /// Polls through `poll` with the span in `slot` current; when the poll is ready, `on_ready`
    /// sees the span and the output, and the span ends, still current: its record joins the
    /// buffer before the scope closes, so the thread leaves instrumented code once for the
    /// whole poll (the spans ended inside it and this one) rather than twice.
    pub(crate) fn poll_in_scope<T>(
        slot: &mut Option<Span>,
        poll: impl FnOnce() -> std::task::Poll<T>,
        on_ready: impl FnOnce(&mut Span, &T),
    ) -> std::task::Poll<T> {
        // A disabled span (agent off, trace not recorded) makes no scope.
        let _exit = slot.as_ref().and_then(|span| span.data.as_ref()).map(|data| {
            enter_scope(data.record.span_id, &data.trace);
            ScopeExit(data.record.span_id)
        });
        let result = poll();
        if let std::task::Poll::Ready(output) = &result {
            if let Some(span) = slot {
                on_ready(span, output);
                // Ended in place: taken out first, the span was copied whole to end it.
                *slot = None;
            }
        }
        result
    }

    /// Runs `future` with this span current on every poll, and ends the span when the future
    /// completes or is dropped.
    pub fn instrument<F: std::future::Future>(self, future: F) -> crate::future::Instrumented<F> {
        crate::future::Instrumented::new(self, future)
    }

    /// Ends the span now.
    pub fn end(self) {}
}

impl Drop for Span {
    fn drop(&mut self) {
        let Some(mut data) = self.data.take() else {
            return;
        };
        let SpanData { trace, record } = &mut *data;
        record.end(trace, clock::now_raw());
        // A pending scope stays so: a record written leaves the stack as it is.
        with_local_unsettled(|local| {
            local.resume();
            if !data.trace.sampled
                && local
                    .batch
                    .red
                    .get_or_insert_with(Box::default)
                    .fold(&data.trace, &data.record)
            {
                let raw = Box::into_raw(data);
                // SAFETY: `raw` is a live box's. Its record was folded, which it is only with
                // static names and no details: left unread, it frees nothing. Its trace is
                // read once, and the box then owned as uninitialized memory.
                let (trace, spare) = unsafe {
                    (
                        std::ptr::addr_of!((*raw).trace).read(),
                        Box::from_raw(raw.cast::<MaybeUninit<SpanData>>()),
                    )
                };
                local.recycle(trace);
                local.keep_spare_span(spare);
                local.after_end();
                return;
            }
            let (SpanData { trace, record }, spare) = unbox(data);
            local.keep_spare_span(spare);
            let slot = local.slot_of(&trace);
            local.push_record(Record { trace: slot, ..record });
        });
    }
}

/// An entered span's guard: its data is in this thread's buffer and its trace in its frame.
/// (A reference to the trace here too cost two more reference-count updates a span, each
/// waiting on the last.)
struct Entered {
    span_id: u64,
    sampled: bool,
}

impl Entered {
    /// Its trace, from its frame.
    fn trace(&self) -> Option<Arc<TraceCtx>> {
        with_local(|local| {
            let frame = local.stack.iter().rev().find(|f| f.span_id == self.span_id)?;
            Some(frame.trace().ctx.clone())
        })
        .flatten()
    }
}

/// A call out (a client span) of an unsampled trace, entered: timed in its guard and folded
/// into RED at its end, without a frame on this thread's stack or a record in its buffer. Most
/// requests are unsampled and most make such calls; pushing the call's frame (and the
/// pending scope's under it), writing its record and taking both off again was ~500
/// instructions a request of the 35-us example's (benches/README.md). Spans entered inside it
/// see its parent as theirs, which is unrecorded in an unsampled trace but for one thing: a
/// `traceparent` injected inside the call names its parent (see [`crate::propagation::inject`]).
/// Static names only: owned ones take the usual path.
struct UnsampledCall {
    /// One more reference to the trace: a pending scope's trace lives only as long as the scope.
    trace: Arc<TraceCtx>,
    parent_span_id: u64,
    start_raw: u64,
    operation: &'static str,
    component: &'static str,
    peer: &'static str,
    /// Set by [`EnteredSpan::set_error`]: the call then goes as a record (an error is never
    /// folded).
    detail: Option<Box<Detail>>,
}

impl UnsampledCall {
    /// The call, when the current span (`top`: pending or on the stack) is of an unsampled
    /// trace.
    #[inline(always)]
    fn enter(top: Top, operation: &'static str, component: &'static str, peer: &'static str) -> Option<Self> {
        let (parent_span_id, trace) = match top {
            Top::Pending => {
                let pending = PENDING.get()?;
                // SAFETY: the scope's span's trace, alive while the scope is pending (see
                // `PendingScope`).
                if unsafe { pending.trace.as_ref() }.sampled {
                    return None;
                }
                // SAFETY: from `Arc::as_ptr` of that live trace: one more strong reference,
                // owned by the `Arc` made from it.
                let trace = unsafe {
                    Arc::increment_strong_count(pending.trace.as_ptr());
                    Arc::from_raw(pending.trace.as_ptr())
                };
                (pending.span_id, trace)
            }
            Top::Unsampled => {
                // SAFETY: used within this call only; nothing here starts or ends a span.
                let local = unsafe { local() }?;
                let frame = local.stack.last()?;
                (frame.span_id, frame.trace().ctx.clone())
            }
            Top::None | Top::Sampled => return None,
        };
        trace.current_call.enter_static(operation, peer);
        Some(UnsampledCall {
            trace,
            parent_span_id,
            start_raw: clock::now_raw(),
            operation,
            component,
            peer,
            detail: None,
        })
    }

    /// Folds the call into this thread's RED, or buffers its record when it cannot be folded.
    /// Through the guard of [`local`] and the fields in place: through `with_local`'s closures
    /// the call was copied twice more (~50 instructions).
    #[inline(always)]
    fn end(self) {
        let end_raw = clock::now_raw();
        self.trace.current_call.leave();
        // SAFETY: used within this call only; what runs meanwhile frees memory at most.
        let Some(mut local) = (unsafe { local() }) else {
            return;
        };
        local.resume();
        if self.detail.is_none()
            && local.batch.red.get_or_insert_with(Box::default).fold_static(
                &self.trace,
                Kind::Client,
                self.operation,
                self.component,
                (self.start_raw, end_raw),
            )
        {
            local.recycle(self.trace);
        } else {
            local.keep_call(self, end_raw);
        }
        local.after_call();
    }
}

impl Local {
    /// A call that could not be folded ([`UnsampledCall`]) as a record in the batch.
    #[cold]
    fn keep_call(&mut self, call: UnsampledCall, end_raw: u64) {
        let slot = self.slot_of(&call.trace);
        let span_id = self.next_id();
        self.batch.push(Record {
            trace: slot,
            kind: Kind::Client,
            entry: false,
            http_status: 0,
            span_id,
            parent_span_id: call.parent_span_id,
            start_raw: call.start_raw,
            end_raw,
            operation: Cow::Borrowed(call.operation),
            component: Cow::Borrowed(call.component),
            peer: Cow::Borrowed(call.peer),
            detail: call.detail,
        });
    }
}

enum EnteredState {
    /// Not recorded: the agent is off, or a span inside an unsampled trace that is not a call
    /// out.
    Off,
    Stacked(Entered),
    Call(UnsampledCall),
}

/// A span that is current on this thread; ends (and stops being current) when dropped. It
/// stays on its thread: for work that moves, use [`SpanBuilder::start`] and
/// [`Span::instrument`].
pub struct EnteredSpan {
    /// Dropped by hand, in [`EnteredSpan`]'s drop: drop glue for its fields after that made the
    /// guard's end an out-of-line call at every span (~15 instructions, `span-loop`).
    state: ManuallyDrop<EnteredState>,
    /// Its frame (or its fold) is its thread's.
    _not_send: PhantomData<Rc<()>>,
}

impl EnteredSpan {
    #[inline(always)]
    fn of(state: EnteredState) -> Self {
        Self {
            state: ManuallyDrop::new(state),
            _not_send: PhantomData,
        }
    }

    #[inline(always)]
    fn off() -> Self {
        Self::of(EnteredState::Off)
    }

    /// Whether this span is recorded with its attributes.
    pub fn is_recording(&self) -> bool {
        matches!(&*self.state, EnteredState::Stacked(entered) if entered.sampled)
    }

    /// Runs `f` on this span's record. `f` must not run the caller's code: it runs with this
    /// thread's span state in use (see [`with_local`]).
    fn with_record(&self, f: impl FnOnce(&mut Record)) {
        if let EnteredState::Stacked(entered) = &*self.state {
            with_local(|local| {
                if let Some(record) = local.record_of(entered.span_id) {
                    f(record);
                }
            });
        }
    }

    /// Adds an attribute; costs nothing when the span is not recorded.
    pub fn set_attribute(&mut self, key: impl Into<Name>, value: impl ToString) {
        if self.is_recording() {
            // Made here: the caller's conversions may start spans of their own.
            let (key, value) = (key.into(), value.to_string());
            self.with_record(|record| record.set_attribute(key, value));
        }
    }

    /// Marks the span failed, with an error type (`Timeout`, `sqlx::Error`) and message.
    pub fn set_error(&mut self, error_type: impl Into<Name>, message: impl ToString) {
        match &mut *self.state {
            EnteredState::Off => {}
            EnteredState::Stacked(_) => {
                let (error_type, message) = (error_type.into(), message.to_string());
                self.with_record(|record| record.set_error(error_type, message));
            }
            EnteredState::Call(call) => {
                call.detail.get_or_insert_with(Box::default).error = Some((error_type.into(), message.to_string()));
            }
        }
    }

    /// The business transaction this span serves, if it is running.
    pub fn business_transaction(&self) -> Option<String> {
        match &*self.state {
            EnteredState::Off => None,
            EnteredState::Stacked(entered) => Some(entered.trace()?.bt.to_string()),
            EnteredState::Call(call) => Some(call.trace.bt.to_string()),
        }
    }

    /// The trace id, as 32 hex digits.
    pub fn trace_id(&self) -> Option<String> {
        let trace_id = match &*self.state {
            EnteredState::Off => return None,
            EnteredState::Stacked(entered) => entered.trace()?.trace_id,
            EnteredState::Call(call) => call.trace.trace_id,
        };
        Some(format!("{trace_id:032x}"))
    }

    /// Ends the span now.
    pub fn end(self) {}
}

impl Drop for EnteredSpan {
    #[inline(always)]
    fn drop(&mut self) {
        // The state is read in place: moved out whole (88 bytes) at every end, an unsampled
        // trace's discarded span cost four times as much (criterion, `sightline_unsampled`).
        match &*self.state {
            EnteredState::Off => {}
            EnteredState::Stacked(entered) => entered.close(),
            EnteredState::Call(_) => self.end_call(),
        }
    }
}

impl EnteredSpan {
    /// Out of line: inside the guard's drop, it made the drop a call at every span's end.
    #[inline(never)]
    fn end_call(&mut self) {
        // SAFETY: read once, from the guard's drop; the state is not used after.
        if let EnteredState::Call(call) = unsafe { ManuallyDrop::take(&mut self.state) } {
            call.end();
        }
    }
}

impl Entered {
    #[inline(always)]
    fn close(&self) {
        let end_raw = clock::now_raw();
        with_local_unsettled(|local| {
            debug_assert!(PENDING.get().is_none(), "an entered span's end with a scope pending");
            if !local.close_top(self.span_id, end_raw) {
                local.close(self.span_id, end_raw);
            }
        });
    }
}

/// Makes a span of `trace` current on this thread (entering a [`Span`], a `tracing` span).
#[cfg_attr(not(feature = "tracing-layer"), allow(dead_code))]
pub(crate) fn push_frame(span_id: u64, trace: &Arc<TraceCtx>) {
    with_local(|local| local.push_scope(span_id, trace));
}

/// Makes the span `span_id` of `trace` current until [`pop`], as [`push_frame`] does, but on an
/// empty stack only notes it: a frame is pushed when something reads or changes the stack (see
/// [`PENDING`]). `trace` must stay alive until the `pop`.
#[inline]
pub(crate) fn enter_scope(span_id: u64, trace: &Arc<TraceCtx>) {
    // `Top::None`: the stack is empty and no scope pending; known without touching `LOCAL`.
    if TOP.get() == Top::None {
        PENDING.set(Some(PendingScope {
            span_id,
            trace: NonNull::from(&**trace),
            wrote: false,
        }));
        TOP.set(Top::Pending);
        return;
    }
    push_frame_out_of_line(span_id, trace);
}

/// [`push_frame`], apart from the pending scope's path: its registers saved there made every
/// scope's entry and end cost ~25 instructions more.
#[inline(never)]
fn push_frame_out_of_line(span_id: u64, trace: &Arc<TraceCtx>) {
    with_local(|local| local.push_scope(span_id, trace));
}

/// Removes `span_id` from this thread's stack (normally the top); parks the buffer when the
/// thread leaves instrumented code.
#[inline]
pub(crate) fn pop(span_id: u64) {
    if let Some(pending) = PENDING.get().filter(|p| p.span_id == span_id) {
        // Never pushed: nothing was started or read in the scope.
        PENDING.set(None);
        TOP.set(Top::None);
        if pending.wrote {
            park_after_scope();
        }
        return;
    }
    pop_frame(span_id);
}

/// A call folded in a pending scope took the batch out (see `Local::after_call`): parked again
/// at the scope's end unless the thread is inside instrumented code or parked it since.
#[inline(never)]
fn park_after_scope() {
    with_local_unsettled(|local| {
        if local.stack.is_empty() && !local.parked {
            local.leave();
        }
    });
}

/// [`pop`] of a scope that was pushed.
#[inline(never)]
fn pop_frame(span_id: u64) {
    with_local_unsettled(|local| {
        local.settle();
        local.remove_frame(span_id);
        if local.stack.is_empty() {
            local.after_end();
        }
    });
}

/// Ends a scope at [`pop`] when dropped: on unwinding too, so that no pending scope outlives
/// its span.
pub(crate) struct ScopeExit(u64);

impl Drop for ScopeExit {
    fn drop(&mut self) {
        pop(self.0);
    }
}

/// The context to propagate: the current span on this thread.
pub(crate) fn current_context() -> Option<Current> {
    with_local(|local| {
        local.stack.last().map(|f| Current {
            span_id: f.span_id,
            trace: f.trace().ctx.clone(),
        })
    })
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent, started once for this test process (nothing listens; spans are dropped).
    fn agent_running() {
        static AGENT: std::sync::OnceLock<crate::AgentGuard> = std::sync::OnceLock::new();
        AGENT.get_or_init(|| {
            crate::init(crate::Config {
                service: "span-tests".into(),
                collector: "http://127.0.0.1:9".into(),
                ..Default::default()
            })
            .expect("one agent in this process")
        });
    }

    fn frames() -> Vec<(u64, bool)> {
        with_local_unsettled(|l| l.stack.iter().map(|f| (f.span_id, f.owner.is_some())).collect()).unwrap()
    }

    #[test]
    fn a_child_takes_its_trace_over_when_the_transaction_ends_first() {
        agent_running();
        let order = crate::transaction("Reorder").entered();
        let step = crate::span("step").entered();
        let inner = crate::span("inner").entered();
        assert_eq!(
            frames().iter().map(|&(_, owns)| owns).collect::<Vec<_>>(),
            [true, false, false],
            "children borrow the transaction's trace"
        );
        drop(order);
        assert_eq!(frames().len(), 2);
        assert_eq!(
            frames().iter().filter(|&&(_, owns)| owns).count(),
            1,
            "one remaining frame holds the trace: {:?}",
            frames()
        );
        assert_eq!(inner.business_transaction().as_deref(), Some("Reorder"));
        drop(step);
        assert_eq!(frames().len(), 1);
        assert!(frames()[0].1, "the last frame holds the trace");
        assert_eq!(inner.business_transaction().as_deref(), Some("Reorder"));
        drop(inner);
        assert!(frames().is_empty());
    }

    fn pending() -> Option<u64> {
        PENDING.get().map(|p| p.span_id)
    }

    #[test]
    fn a_scope_pushes_its_frame_only_when_a_span_starts_inside_it() {
        agent_running();
        let request = crate::transaction("Scoped").start();
        let request_id = request.data.as_ref().unwrap().record.span_id;
        // Nothing started inside: no frame pushed, nothing current after.
        request.in_scope(|| {
            assert_eq!(pending(), Some(request_id));
            assert!(frames().is_empty(), "a scope starting nothing pushes no frame");
        });
        assert_eq!(pending(), None);
        assert!(TOP.get() == Top::None);
        // An entered child: the scope's frame goes first, and the child is the scope's span's.
        request.in_scope(|| {
            let child = crate::span("child").client("cache", "redis").entered();
            assert_eq!(pending(), None);
            assert_eq!(frames().iter().map(|f| f.0).next(), Some(request_id));
            let parent = with_local(|l| {
                let frame = l.stack.last().unwrap();
                l.batch.records[frame.record as usize].parent_span_id
            });
            assert_eq!(parent, Some(request_id));
            assert_eq!(child.business_transaction().as_deref(), Some("Scoped"));
        });
        assert!(frames().is_empty());
        // A started child and the context to propagate see the scope's span too.
        request.in_scope(|| {
            let started = crate::span("started").start();
            assert_eq!(started.data.as_ref().unwrap().record.parent_span_id, request_id);
            assert_eq!(current_context().map(|c| c.span_id), Some(request_id));
        });
        assert!(frames().is_empty());
        assert_eq!(pending(), None);
    }

    #[test]
    fn a_scope_left_by_a_panic_leaves_nothing_current() {
        agent_running();
        let request = crate::transaction("Unwound").start();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            request.in_scope(|| panic!("handler failed"));
        }));
        assert!(unwound.is_err());
        assert_eq!(pending(), None);
        assert!(frames().is_empty());
        assert!(TOP.get() == Top::None);
        drop(request);
        // The next transaction starts a trace of its own.
        let next = crate::transaction("After").entered();
        assert_eq!(next.business_transaction().as_deref(), Some("After"));
    }

    /// A trace continued from a caller that does not record it.
    fn unsampled(bt: &'static str) -> SpanBuilder {
        crate::transaction(bt).child_of(Some(RemoteContext {
            trace_id: 0x5eed,
            parent_span_id: 9,
            sampled: false,
            bt: None,
            caller_service: None,
            caller_operation: None,
        }))
    }

    /// Spans folded into this thread's RED so far, its batch taken back first.
    fn folded() -> u32 {
        with_local_unsettled(|l| {
            l.resume();
            l.batch.red.as_ref().map_or(0, |red| red.folded)
        })
        .unwrap()
    }

    #[test]
    fn an_unsampled_call_is_timed_and_folded_without_a_frame() {
        agent_running();
        let request = unsampled("Unsampled").start();
        let request_id = request.data.as_ref().unwrap().record.span_id;
        let trace = request.data.as_ref().unwrap().trace.clone();
        request.in_scope(|| {
            let before = folded();
            let call = crate::span("GET session").client("cache", "redis").entered();
            assert!(frames().is_empty(), "no frame for the call, none for the scope");
            assert_eq!(pending(), Some(request_id));
            assert_eq!(call.business_transaction().as_deref(), Some("Unsampled"));
            assert_eq!(call.trace_id(), Some(format!("{:032x}", 0x5eed)));
            assert!(!call.is_recording());
            assert_eq!(
                trace.current_call.get(),
                Some((Name::Borrowed("GET session"), Name::Borrowed("redis"))),
                "the in-flight snapshot sees the call"
            );
            drop(call);
            assert_eq!(trace.current_call.get(), None);
            assert_eq!(folded(), before + 1, "its RED is kept");
        });
        assert_eq!(pending(), None);
        assert!(
            with_local_unsettled(|l| l.parked).unwrap(),
            "the batch is parked for the exporter when the scope ends"
        );
        // Under an entered unsampled span too, with that span's frame alone on the stack.
        let entry = unsampled("Entered").entered();
        let before = folded();
        let call = crate::span("SELECT users").client("db", "postgres").entered();
        assert_eq!(frames().len(), 1);
        assert_eq!(call.business_transaction().as_deref(), Some("Entered"));
        drop(call);
        assert_eq!(folded(), before + 1);
        drop(entry);
    }

    #[test]
    fn an_unsampled_call_outliving_its_scope_and_transaction_still_folds() {
        agent_running();
        let request = unsampled("Outlived").start();
        // The guards leave the scope they were entered in, and the transaction ends before them.
        let (first, second) = request.in_scope(|| {
            let call = || crate::span("GET session").client("cache", "redis").entered();
            (call(), call())
        });
        assert_eq!(pending(), None);
        drop(request);
        assert_eq!(
            first.business_transaction().as_deref(),
            Some("Outlived"),
            "its trace is its own to hold"
        );
        // Another transaction's span on the stack keeps the batch out while it is read.
        let holder = unsampled("Holder").entered();
        let before = folded();
        drop(first);
        assert_eq!(folded(), before + 1);
        drop(holder);
        // Ended outside instrumented code: its batch parked for the exporter at once.
        drop(second);
        assert!(frames().is_empty());
        assert!(with_local_unsettled(|l| l.parked).unwrap());
    }

    #[test]
    fn an_unsampled_call_that_failed_goes_as_a_record_with_its_error() {
        agent_running();
        let request = unsampled("Failing").start();
        let request_id = request.data.as_ref().unwrap().record.span_id;
        request.in_scope(|| {
            let mut call = crate::span("GET session").client("cache", "redis").entered();
            call.set_error("Timeout", "no answer in 2 s");
            drop(call);
            let kept = with_local_unsettled(|l| {
                l.batch
                    .records
                    .iter()
                    .filter(|r| r.span_id != 0 && r.operation == "GET session")
                    .map(|r| {
                        (
                            r.kind,
                            r.parent_span_id,
                            r.detail.as_ref().and_then(|d| d.error.clone()),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap();
            assert_eq!(
                kept,
                [(
                    Kind::Client,
                    request_id,
                    Some((Name::Borrowed("Timeout"), "no answer in 2 s".to_string()))
                )]
            );
        });
    }

    /// An attribute value whose formatting starts a span of its own.
    struct Traced;

    impl std::fmt::Display for Traced {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let _inside = crate::span("format").entered();
            f.write_str("formatted")
        }
    }

    #[test]
    fn an_attribute_may_start_spans_while_it_is_made() {
        agent_running();
        let mut order = crate::transaction("Format").entered();
        order.set_attribute("value", Traced);
        order.set_error("Invalid", Traced);
        let mut started = crate::span("started").start();
        started.set_attribute("value", Traced);
        drop(started);
        assert_eq!(frames().len(), 1, "the formatting's span ended");
        LOCAL.with(|cell| {
            // SAFETY: nothing else uses this thread's state during this read.
            let local = unsafe { &*cell.local.get() };
            let record = &local.batch.records[local.stack[0].record as usize];
            let detail = record.detail.as_ref().expect("attribute and error kept");
            assert_eq!(detail.attributes, [(Name::Borrowed("value"), "formatted".to_string())]);
            assert_eq!(detail.error, Some((Name::Borrowed("Invalid"), "formatted".to_string())));
        });
    }
}
