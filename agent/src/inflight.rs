//! Open business transactions, so that work stuck *now* is visible before it finishes
//! ("Login, 14 s, in redis GET session").
//!
//! A transaction registers when it starts and leaves when it ends: one short, sharded lock per
//! transaction (not per span), which the exporter takes only for its periodic snapshot. Calls
//! out (client spans) note themselves as the transaction's current call. Inside unsampled
//! transactions child spans are not recorded, so their snapshots name no current call.

use std::sync::{Arc, Mutex};

use rustc_hash::FxHashMap;

use crate::span::{Name, SharedName};

const SHARDS: usize = 16;

/// One open transaction.
#[derive(Debug)]
pub(crate) struct InflightSlot {
    pub trace_id: u128,
    pub span_id: u64,
    pub bt: SharedName,
    pub operation: SharedName,
    pub start_unix_ns: u64,
    /// The call out it is inside now.
    pub current_call: Mutex<Option<Call>>,
}

/// A call out: (operation, peer).
pub(crate) type Call = (Name, Name);

type Shard = Mutex<FxHashMap<u64, Arc<InflightSlot>>>;

static REGISTRY: [Shard; SHARDS] = [const { Mutex::new(FxHashMap::with_hasher(rustc_hash::FxBuildHasher)) }; SHARDS];

fn shard(span_id: u64) -> &'static Shard {
    &REGISTRY[(span_id as usize) % SHARDS]
}

pub(crate) fn register(slot: Arc<InflightSlot>) {
    if let Ok(mut shard) = shard(slot.span_id).lock() {
        shard.insert(slot.span_id, slot);
    }
}

pub(crate) fn unregister(span_id: u64) {
    if let Ok(mut shard) = shard(span_id).lock() {
        shard.remove(&span_id);
    }
}

/// A copy of every transaction open since before `started_before_unix_ns`.
pub(crate) fn older_than(started_before_unix_ns: u64) -> Vec<(Arc<InflightSlot>, Option<Call>)> {
    let mut out = Vec::new();
    for shard in &REGISTRY {
        let Ok(shard) = shard.lock() else { continue };
        for slot in shard.values().filter(|s| s.start_unix_ns < started_before_unix_ns) {
            let call = slot.current_call.lock().ok().and_then(|c| c.clone());
            out.push((slot.clone(), call));
        }
    }
    out
}
