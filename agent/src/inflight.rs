//! Open business transactions, so that work stuck *now* is visible before it finishes
//! ("Login, 14 s, in redis GET session").
//!
//! A transaction's context registers when its entry span starts and leaves when it ends: one
//! short, sharded lock per transaction (not per span), which the exporter takes only for its
//! periodic snapshot. Calls out (client spans, sampled or not) note themselves as the
//! transaction's current call.

use std::{
    cell::RefCell,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
};

use rustc_hash::FxHashMap;

use crate::{
    recent::Recent,
    span::{Call, Name, TraceCtx},
};

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

fn shard(entry_span_id: u64) -> &'static Shard {
    &REGISTRY[(entry_span_id as usize) % SHARDS]
}

pub(crate) fn register(trace: Arc<TraceCtx>) {
    if let Ok(mut shard) = shard(trace.entry_span_id).lock() {
        let slot = match shard.free.pop() {
            Some(slot) => slot,
            None => {
                shard.open.push(None);
                (shard.open.len() - 1) as u32
            }
        };
        trace.inflight_slot.store(slot, Ordering::Relaxed);
        shard.open[slot as usize] = Some(trace);
    }
}

/// `trace` is no longer open. The context leaves its slot here, on the transaction's thread,
/// not when the exporter lets go of its last copy.
pub(crate) fn unregister(trace: &TraceCtx) {
    let slot = trace.inflight_slot.load(Ordering::Relaxed);
    if let Ok(mut shard) = shard(trace.entry_span_id).lock() {
        let held = shard.open.get_mut(slot as usize).and_then(Option::take);
        // Only its own slot: a context that never registered (0 by default) must not take
        // another's out.
        match held {
            Some(held) if std::ptr::eq(Arc::as_ptr(&held), trace) => {
                shard.free.push(slot);
                drop(shard);
                drop(held);
            }
            Some(other) => shard.open[slot as usize] = Some(other),
            None => {}
        }
    }
}

/// The call out an open transaction is inside now: noted by every client span at its start and
/// end, read by the snapshot once a second. A call of static names (nearly all) is noted as
/// the id of its interned pair with one atomic store; a mutex held the names before, ~150
/// instructions a call (`instructions-per-request.sh`).
#[derive(Debug, Default)]
pub(crate) struct CurrentCall {
    /// 0: none; [`OWNED_CALL`]: in `owned`; else the pair's index in [`CALLS`] plus one.
    id: AtomicU32,
    owned: Mutex<Option<Call>>,
}

const OWNED_CALL: u32 = u32::MAX;

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

    fn enter_static(&self, operation: &'static str, peer: &'static str) {
        match static_call_id(operation, peer) {
            Some(id) => {
                if self.id.swap(id, Ordering::AcqRel) == OWNED_CALL {
                    self.clear_owned();
                }
            }
            None => self.enter_owned(operation, peer),
        }
    }

    #[cold]
    fn enter_owned(&self, operation: &str, peer: &str) {
        if let Ok(mut owned) = self.owned.lock() {
            *owned = Some((Name::Owned(operation.into()), Name::Owned(peer.into())));
        }
        self.id.store(OWNED_CALL, Ordering::Release);
    }

    /// Empty again, for a context reused by another transaction (nothing else holds it).
    pub(crate) fn reset(&mut self) {
        *self.id.get_mut() = 0;
        if let Ok(owned) = self.owned.get_mut() {
            if owned.is_some() {
                *owned = None;
            }
        }
    }

    pub(crate) fn leave(&self) {
        if self.id.swap(0, Ordering::AcqRel) == OWNED_CALL {
            self.clear_owned();
        }
    }

    fn clear_owned(&self) {
        if let Ok(mut owned) = self.owned.lock() {
            *owned = None;
        }
    }

    pub(crate) fn get(&self) -> Option<Call> {
        match self.id.load(Ordering::Acquire) {
            0 => None,
            OWNED_CALL => self.owned.lock().ok().and_then(|owned| owned.clone()),
            id => {
                let calls = CALLS.lock().ok()?;
                let &(operation, peer) = calls.pairs.get(id as usize - 1)?;
                Some((Name::Borrowed(operation), Name::Borrowed(peer)))
            }
        }
    }
}

/// Calls of static names, each pair once (static texts by address: an address of a
/// `&'static str` never holds other text).
struct CallTable {
    ids: FxHashMap<CallKey, u32>,
    pairs: Vec<(&'static str, &'static str)>,
}

type CallKey = (usize, usize, usize, usize);

/// Pairs kept; past it calls are noted by name (a program has few static call names).
const MAX_CALLS: usize = 4096;

static CALLS: Mutex<CallTable> = Mutex::new(CallTable {
    ids: FxHashMap::with_hasher(rustc_hash::FxBuildHasher),
    pairs: Vec::new(),
});

thread_local! {
    /// Pairs this thread noted lately: the table's lock only on a miss.
    static CALL_IDS: RefCell<Recent<CallKey, u32, 64>> = const { RefCell::new(Recent::new()) };
}

fn static_call_id(operation: &'static str, peer: &'static str) -> Option<u32> {
    let key = (
        operation.as_ptr() as usize,
        operation.len(),
        peer.as_ptr() as usize,
        peer.len(),
    );
    let hash = (key.0 ^ key.2.rotate_left(23) ^ key.1.rotate_left(47) ^ key.3) as u64;
    let cached = CALL_IDS.with_borrow(|ids| ids.get(hash, &key));
    if cached.is_some() {
        return cached;
    }
    let id = {
        let mut calls = CALLS.lock().ok()?;
        match calls.ids.get(&key) {
            Some(&id) => id,
            None if calls.pairs.len() < MAX_CALLS => {
                calls.pairs.push((operation, peer));
                let id = calls.pairs.len() as u32;
                calls.ids.insert(key, id);
                id
            }
            None => return None,
        }
    };
    CALL_IDS.with_borrow_mut(|ids| ids.put(hash, key, id));
    Some(id)
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
        // Another thread reads the same pair's id from the shared table.
        call.enter(&Name::Borrowed("GET session"), &Name::Borrowed("redis"));
        let seen = std::thread::scope(|s| s.spawn(|| owned(call.get())).join().unwrap());
        assert_eq!(seen, Some(("GET session".into(), "redis".into())));
        call.leave();
        assert!(call.get().is_none());
        assert!(call.owned.lock().unwrap().is_none(), "owned names freed at leave");
    }

    #[test]
    fn open_transactions_are_listed_until_they_leave_and_slots_are_reused() {
        // Entry span ids that share a shard, so slots are reused within it.
        let contexts: Vec<_> = (0..40u64)
            .map(|i| context(0xABC0_0000 + u128::from(i), i * SHARDS as u64 + 3))
            .collect();
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
        let grown = REGISTRY[3].lock().unwrap().open.len();
        let again: Vec<_> = (0..20u64)
            .map(|i| context(0xABC1_0000 + u128::from(i), i * SHARDS as u64 + 3))
            .collect();
        for trace in &again {
            register(trace.clone());
        }
        assert_eq!(REGISTRY[3].lock().unwrap().open.len(), grown);
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
    }
}
