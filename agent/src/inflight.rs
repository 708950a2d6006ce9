//! Open business transactions, so that work stuck *now* is visible before it finishes
//! ("Login, 14 s, in redis GET session").
//!
//! A transaction's context registers when its entry span starts and leaves when it ends: one
//! short, sharded lock per transaction (not per span), which the exporter takes only for its
//! periodic snapshot. Calls out (client spans, sampled or not) note themselves as the
//! transaction's current call.

use std::sync::{atomic::Ordering, Arc, Mutex};

use crate::span::{Call, TraceCtx};

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

/// A copy of every transaction open since before `started_before_unix_ns`, with its call.
///
/// A shard's lock is held only to pick its old transactions out; their calls are read after it
/// is let go. Transactions start and end under that lock, and the exporter runs at a lower
/// priority: the shorter it holds the lock, the rarer a request waits on an exporter that was
/// taken off its core while holding it (thousands of transactions can be open in a stall).
pub(crate) fn older_than(started_before_unix_ns: u64) -> Vec<(Arc<TraceCtx>, Option<Call>)> {
    let mut old = Vec::new();
    for shard in &REGISTRY {
        let Ok(shard) = shard.lock() else { continue };
        old.extend(
            shard
                .open
                .iter()
                .flatten()
                .filter(|t| t.start_unix_ns < started_before_unix_ns)
                .cloned(),
        );
    }
    old.into_iter()
        .map(|trace| {
            let call = trace.current_call.lock().ok().and_then(|c| c.clone());
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
            start_unix_ns: 1,
            current_call: Mutex::new(Some((
                crate::span::Name::Borrowed("GET session"),
                crate::span::Name::Borrowed("redis"),
            ))),
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
    fn open_transactions_are_listed_until_they_leave_and_slots_are_reused() {
        // Entry span ids that share a shard, so slots are reused within it.
        let contexts: Vec<_> = (0..40u64)
            .map(|i| context(0xABC0_0000 + u128::from(i), i * SHARDS as u64 + 3))
            .collect();
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
