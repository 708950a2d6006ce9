//! Open business transactions, so that work stuck *now* is visible before it finishes
//! ("Login, 14 s, in redis GET session").
//!
//! A transaction's context registers when its entry span starts and leaves when it ends: one
//! short, sharded lock per transaction (not per span), which the exporter takes only for its
//! periodic snapshot. A thread registers in its own home shard, so that the lock and slots a
//! request takes are those its thread took last, not ones another core wrote. Calls out
//! (client spans, sampled or not) note themselves as the transaction's current call.

use std::cell::Cell;
use std::sync::{
    atomic::{AtomicPtr, AtomicU32, AtomicU8, AtomicUsize, Ordering},
    Arc, Mutex,
};

use crate::span::{Call, Name, TraceCtx};

const SHARDS: usize = 16;

/// A shard's open transactions in slots, reused through a free list: registering and leaving
/// are a push and a store, no hashing (a hash map's insert and remove were ~160 instructions a
/// request, `instructions-per-request.sh`).
struct Slots {
    open: Vec<Option<Arc<TraceCtx>>>,
    free: Vec<u32>,
}

type Shard = Mutex<Slots>;

static REGISTRY: [Shard; SHARDS] = [const {
    Mutex::new(Slots {
        open: Vec::new(),
        free: Vec::new(),
    })
}; SHARDS];

/// Home shards handed to threads in turn.
static NEXT_HOME: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's home shard, or `SHARDS` until it first registers.
    static HOME: Cell<usize> = const { Cell::new(SHARDS) };
}

/// This thread's shard. Picked by the transaction's random span id instead, a request locks
/// a shard whose lock and slots another core may have written last; `perf record` of the
/// one-core service put the most samples of the agent's functions in `register` (cold lines),
/// though there the misses only moved to the next function (benches/README.md).
#[inline]
fn home_shard() -> usize {
    HOME.with(|home| {
        let shard = home.get();
        if shard < SHARDS {
            return shard;
        }
        let shard = NEXT_HOME.fetch_add(1, Ordering::Relaxed) % SHARDS;
        home.set(shard);
        shard
    })
}

/// Where an open context is kept: its shard and its slot there, in one number (the context's
/// `inflight_slot`), since it may end on another thread than the one it registered on.
fn place(kept: u32) -> (usize, usize) {
    (kept as usize % SHARDS, kept as usize / SHARDS)
}

pub(crate) fn register(trace: Arc<TraceCtx>) {
    let home = home_shard();
    if let Ok(mut shard) = REGISTRY[home].lock() {
        let slot = match shard.free.pop() {
            Some(slot) => slot,
            None => {
                shard.open.push(None);
                (shard.open.len() - 1) as u32
            }
        };
        trace
            .inflight_slot
            .store(slot * SHARDS as u32 + home as u32, Ordering::Relaxed);
        shard.open[slot as usize] = Some(trace);
    }
}

/// `trace` is no longer open. The context leaves its slot here, on the transaction's thread,
/// not when the exporter lets go of its last copy.
pub(crate) fn unregister(trace: &TraceCtx) {
    let (home, slot) = place(trace.inflight_slot.load(Ordering::Relaxed));
    if let Ok(mut shard) = REGISTRY[home].lock() {
        let held = shard.open.get_mut(slot).and_then(Option::take);
        // Only its own slot: a context that never registered (0 by default) must not take
        // another's out.
        match held {
            Some(held) if std::ptr::eq(Arc::as_ptr(&held), trace) => {
                shard.free.push(slot as u32);
                drop(shard);
                drop(held);
            }
            Some(other) => shard.open[slot] = Some(other),
            None => {}
        }
    }
}

/// The call out an open transaction is inside now: noted by every client span at its start and
/// end, read by the snapshot once a second. A call of static names (nearly all) is noted as the
/// names' addresses and lengths, written under a sequence lock: a few plain stores on the
/// span's path, where looking the pair's id up in an interned table cost ~90 instructions a
/// call (`instructions-per-request.sh`) and a mutex over the names ~150 before that. Owned
/// names go in a mutex.
#[derive(Debug, Default)]
pub(crate) struct CurrentCall {
    /// Even while the names below are whole, odd while a writer changes them. A writer takes
    /// it with a compare-exchange (a transaction's spans may end on two threads at once); the
    /// reader retries until it reads the same even value before and after them.
    sequence: AtomicU32,
    /// [`NO_CALL`], [`STATIC_CALL`] (the names below) or [`OWNED_CALL`] (in `owned`).
    state: AtomicU8,
    operation: AtomicPtr<u8>,
    operation_len: AtomicUsize,
    peer: AtomicPtr<u8>,
    peer_len: AtomicUsize,
    owned: Mutex<Option<Call>>,
}

const NO_CALL: u8 = 0;
const STATIC_CALL: u8 = 1;
const OWNED_CALL: u8 = 2;

impl CurrentCall {
    /// Notes the call (operation, peer) as the current one. Inline, reading the names' parts
    /// only: a reference to a name passed to a call out of line put it in memory, and the
    /// record's copy of it then waited on those stores (a store-forwarding stall, `perf
    /// annotate`).
    #[inline(always)]
    pub(crate) fn enter(&self, operation: &Name, peer: &Name) {
        match (operation, peer) {
            (Name::Borrowed(operation), Name::Borrowed(peer)) => self.enter_static(operation, peer),
            _ => self.enter_owned(operation.as_ref(), peer.as_ref()),
        }
    }

    #[inline]
    pub(crate) fn enter_static(&self, operation: &'static str, peer: &'static str) {
        self.write_names(operation, peer);
        if self.state.swap(STATIC_CALL, Ordering::Release) == OWNED_CALL {
            self.clear_owned();
        }
    }

    #[cold]
    fn enter_owned(&self, operation: &str, peer: &str) {
        if let Ok(mut owned) = self.owned.lock() {
            *owned = Some((Name::Owned(operation.into()), Name::Owned(peer.into())));
        }
        self.state.store(OWNED_CALL, Ordering::Release);
    }

    /// The state alone changes: the names stay whole for a reader that saw the call a moment
    /// before.
    #[inline]
    pub(crate) fn leave(&self) {
        if self.state.swap(NO_CALL, Ordering::Release) == OWNED_CALL {
            self.clear_owned();
        }
    }

    /// Writes the static names with the sequence held odd. Only the names need it: `state` is
    /// one value, and a reader that sees [`STATIC_CALL`] reads whichever whole pair is there.
    #[inline(always)]
    fn write_names(&self, operation: &'static str, peer: &'static str) {
        let mut spins = 0u32;
        let even = loop {
            let seen = self.sequence.load(Ordering::Relaxed);
            if seen & 1 == 0
                && self
                    .sequence
                    .compare_exchange_weak(seen, seen.wrapping_add(1), Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                break seen;
            }
            // Another thread of the transaction is noting a call: a few stores.
            spins += 1;
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        };
        // A reader that sees any of the stores below then sees the sequence odd (or past it)
        // when it reads it again after its acquire fence.
        std::sync::atomic::fence(Ordering::Release);
        self.operation.store(operation.as_ptr().cast_mut(), Ordering::Relaxed);
        self.operation_len.store(operation.len(), Ordering::Relaxed);
        self.peer.store(peer.as_ptr().cast_mut(), Ordering::Relaxed);
        self.peer_len.store(peer.len(), Ordering::Relaxed);
        self.sequence.store(even.wrapping_add(2), Ordering::Release);
    }

    fn clear_owned(&self) {
        if let Ok(mut owned) = self.owned.lock() {
            *owned = None;
        }
    }

    /// Empty again, for a context reused by another transaction (nothing else holds it).
    #[inline]
    pub(crate) fn reset(&mut self) {
        if std::mem::replace(self.state.get_mut(), NO_CALL) == OWNED_CALL {
            if let Ok(owned) = self.owned.get_mut() {
                *owned = None;
            }
        }
    }

    pub(crate) fn get(&self) -> Option<Call> {
        loop {
            let before = self.sequence.load(Ordering::Acquire);
            if before & 1 == 1 {
                std::thread::yield_now();
                continue;
            }
            let state = self.state.load(Ordering::Acquire);
            let operation = (
                self.operation.load(Ordering::Relaxed),
                self.operation_len.load(Ordering::Relaxed),
            );
            let peer = (self.peer.load(Ordering::Relaxed), self.peer_len.load(Ordering::Relaxed));
            std::sync::atomic::fence(Ordering::Acquire);
            if self.sequence.load(Ordering::Relaxed) != before {
                continue;
            }
            return match state {
                NO_CALL => None,
                OWNED_CALL => self.owned.lock().ok().and_then(|owned| owned.clone()),
                _ => {
                    // SAFETY: read between two equal even sequence values, so written together
                    // by one `enter_static`, from the parts of two `&'static str`.
                    let (operation, peer) = unsafe { (static_str(operation), static_str(peer)) };
                    Some((Name::Borrowed(operation), Name::Borrowed(peer)))
                }
            };
        }
    }
}

/// The `&'static str` whose address and length these are.
///
/// # Safety
/// `parts` must be those of a `&'static str`.
unsafe fn static_str((ptr, len): (*mut u8, usize)) -> &'static str {
    // SAFETY: the caller's promise.
    unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(ptr, len)) }
}

/// A copy of every transaction open since before `started_before_raw` (a raw clock reading),
/// with its call.
///
/// A shard's lock is held only to pick its old transactions out; their calls are read after it
/// is let go. Transactions start and end under that lock, and the exporter runs at a lower
/// priority: the shorter it holds the lock, the rarer a request waits on an exporter that was
/// taken off its core while holding it (thousands of transactions can be open in a stall).
pub(crate) fn older_than(started_before_raw: u64) -> Vec<(Arc<TraceCtx>, Option<Call>)> {
    let mut old = Vec::new();
    for shard in &REGISTRY {
        let Ok(shard) = shard.lock() else { continue };
        old.extend(
            shard
                .open
                .iter()
                .flatten()
                .filter(|t| t.start_raw < started_before_raw)
                .cloned(),
        );
    }
    old.into_iter()
        .map(|trace| {
            let call = trace.current_call.get();
            (trace, call)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::SharedName;

    fn context(trace_id: u128, entry_span_id: u64) -> Arc<TraceCtx> {
        Arc::new(TraceCtx {
            trace_id,
            sampled: true,
            bt: SharedName::Static("Login"),
            entry_operation: SharedName::Static("POST /login"),
            entry_span_id,
            start_raw: 1,
            current_call: Default::default(),
            inflight_slot: Default::default(),
        })
    }

    fn open_of_this_test() -> Vec<u128> {
        let mut open: Vec<u128> = older_than(2)
            .into_iter()
            .map(|(trace, _)| trace.trace_id)
            .filter(|&id| id >= 0xABC0_0000)
            .collect();
        open.sort();
        open
    }

    #[test]
    fn the_current_call_is_the_last_entered_until_it_leaves_static_names_or_not() {
        let call = CurrentCall::default();
        assert!(call.get().is_none());
        call.enter(&Name::Borrowed("GET session"), &Name::Borrowed("redis"));
        let owned = |c: Option<Call>| c.map(|(o, p)| (o.into_owned(), p.into_owned()));
        assert_eq!(owned(call.get()), Some(("GET session".into(), "redis".into())));
        call.leave();
        assert!(call.get().is_none());
        call.enter(&Name::Owned("SELECT 42".into()), &Name::Borrowed("postgres"));
        assert_eq!(owned(call.get()), Some(("SELECT 42".into(), "postgres".into())));
        // Another thread reads the pair.
        call.enter(&Name::Borrowed("GET session"), &Name::Borrowed("redis"));
        let seen = std::thread::scope(|s| s.spawn(|| owned(call.get())).join().unwrap());
        assert_eq!(seen, Some(("GET session".into(), "redis".into())));
        call.leave();
        assert!(call.get().is_none());
        assert!(call.owned.lock().unwrap().is_none(), "owned names freed at leave");
    }

    #[test]
    fn a_call_noted_from_two_threads_is_read_whole() {
        // The snapshot reads while the transaction's threads note calls (spans may end on two
        // threads at once): it never pairs one call's operation with another's peer.
        let call = CurrentCall::default();
        let pairs = [("GET session", "redis"), ("SELECT orders by customer", "postgres")];
        let stop = std::sync::atomic::AtomicBool::new(false);
        let seen = std::thread::scope(|s| {
            for first in 0..2 {
                let (call, stop) = (&call, &stop);
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for (operation, peer) in [pairs[first], pairs[1 - first]] {
                            call.enter(&Name::Borrowed(operation), &Name::Borrowed(peer));
                            // The span's work: the reader mostly finds the call whole.
                            (0..20).for_each(|_| std::hint::spin_loop());
                        }
                    }
                });
            }
            let mut seen = [0usize; 2];
            let started = std::time::Instant::now();
            while started.elapsed() < std::time::Duration::from_millis(500) {
                if let Some((operation, peer)) = call.get() {
                    let i = pairs
                        .iter()
                        .position(|&(o, p)| o == operation && p == peer)
                        .unwrap_or_else(|| panic!("a torn call: {operation:?} on {peer:?}"));
                    seen[i] += 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            seen
        });
        assert!(seen[0] > 0 && seen[1] > 0, "both calls seen: {seen:?}");
    }

    #[test]
    fn open_transactions_are_listed_until_they_leave_and_slots_are_reused() {
        // All registered on this thread, so in its home shard, where slots are reused.
        let contexts: Vec<_> = (0..40u64).map(|i| context(0xABC0_0000 + u128::from(i), i)).collect();
        for trace in &contexts {
            trace
                .current_call
                .enter(&Name::Borrowed("GET session"), &Name::Borrowed("redis"));
        }
        for trace in &contexts {
            register(trace.clone());
        }
        assert_eq!(open_of_this_test().len(), 40);
        for trace in contexts.iter().step_by(2) {
            unregister(trace);
        }
        let odd: Vec<u128> = contexts.iter().skip(1).step_by(2).map(|t| t.trace_id).collect();
        assert_eq!(open_of_this_test(), odd);
        // New ones take the freed slots: the shard does not grow.
        let grown = REGISTRY[home_shard()].lock().unwrap().open.len();
        let again: Vec<_> = (0..20u64)
            .map(|i| context(0xABC1_0000 + u128::from(i), 100 + i))
            .collect();
        for trace in &again {
            register(trace.clone());
        }
        assert_eq!(REGISTRY[home_shard()].lock().unwrap().open.len(), grown);
        assert_eq!(open_of_this_test().len(), 40);
        let (_, call) = older_than(2).into_iter().find(|(t, _)| t.trace_id == odd[0]).unwrap();
        assert_eq!(
            call.map(|c| (c.0.into_owned(), c.1.into_owned())),
            Some(("GET session".into(), "redis".into()))
        );
        for trace in contexts.iter().skip(1).step_by(2).chain(&again) {
            unregister(trace);
        }
        assert!(open_of_this_test().is_empty());
        // Leaving twice takes nothing else out.
        register(contexts[0].clone());
        unregister(&contexts[1]);
        assert_eq!(open_of_this_test(), [contexts[0].trace_id]);
        unregister(&contexts[0]);
        assert!(open_of_this_test().is_empty());

        // Registered on one thread and ended on another (its task moved): it leaves all the same.
        let moved = context(0xABC2_0000, 7);
        let registered = moved.clone();
        let other_home = std::thread::spawn(move || {
            register(registered);
            home_shard()
        })
        .join()
        .unwrap();
        assert_ne!(other_home, home_shard());
        assert_eq!(open_of_this_test(), [moved.trace_id]);
        unregister(&moved);
        assert!(open_of_this_test().is_empty());
    }
}
