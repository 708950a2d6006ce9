//! Open business transactions, so that work stuck *now* is visible before it finishes
//! ("Login, 14 s, in redis GET session").
//!
//! A transaction's context registers when its entry span starts and leaves when it ends: one
//! short, sharded lock per transaction (not per span), which the exporter takes only for its
//! periodic snapshot. Calls out (client spans, sampled or not) note themselves as the
//! transaction's current call.

use std::sync::{Arc, Mutex};

use rustc_hash::FxHashMap;

use crate::span::{Call, TraceCtx};

const SHARDS: usize = 16;

type Shard = Mutex<FxHashMap<u64, Arc<TraceCtx>>>;

static REGISTRY: [Shard; SHARDS] = [const { Mutex::new(FxHashMap::with_hasher(rustc_hash::FxBuildHasher)) }; SHARDS];

fn shard(entry_span_id: u64) -> &'static Shard {
    &REGISTRY[(entry_span_id as usize) % SHARDS]
}

pub(crate) fn register(trace: Arc<TraceCtx>) {
    if let Ok(mut shard) = shard(trace.entry_span_id).lock() {
        shard.insert(trace.entry_span_id, trace);
    }
}

pub(crate) fn unregister(entry_span_id: u64) {
    if let Ok(mut shard) = shard(entry_span_id).lock() {
        shard.remove(&entry_span_id);
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
                .values()
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
