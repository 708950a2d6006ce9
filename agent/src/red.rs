//! RED (rate, errors, duration) as histograms per key: the value both sides keep, and the part
//! of it each application thread folds itself.
//!
//! A span of an unsampled trace is needed for nothing but its RED. Folded where it ends, into
//! its thread's [`LocalRed`] (which travels to the exporter with the thread's batch), it leaves
//! no record for the exporter to drain and fold: at 1% sampling that was most of the agent's
//! work a request on the exporter's thread (benches/README.md). Spans with owned names or
//! details (an error, attributes, a caller) still go as records: they are few.

use std::borrow::Cow;

use rustc_hash::FxHashMap;
use sightline_proto::histogram;

use crate::{
    clock::{self, TickScale},
    span::{Kind, Record, SharedName, TraceCtx},
};

/// RED histograms per 10-second window: short load tests compare in 10-second blocks.
pub(crate) const RED_WINDOW_SECS: u64 = 10;

/// Keys a thread keeps between two visits of the exporter; a span of another key past them
/// goes as a record.
const LOCAL_KEYS: usize = 64;

/// Spans a thread folds before its batch goes to the exporter even when the thread never
/// leaves instrumented code (its parked batch is taken at every drain otherwise).
pub(crate) const FOLDS_PER_HAND_OFF: u32 = 4096;

/// Spans a batch folds at most (8 bytes each): when the exporter is behind and the batch
/// cannot go, later spans go as records, which the thread drops and counts past its queue's
/// bound (span.rs), so what a thread holds stays bounded.
const MAX_FOLDS: u32 = 4 * FOLDS_PER_HAND_OFF;

#[derive(Default, Clone)]
pub(crate) struct RedValue {
    pub calls: u64,
    pub errors: u64,
    pub sum_micros: u64,
    /// Count per bucket; sorted when encoded. A `BTreeMap` here cost ~140 exporter
    /// instructions a span (its node walk and entry API), a hash map ~30.
    pub buckets: FxHashMap<u64, u64>,
}

impl RedValue {
    #[inline]
    pub(crate) fn record(&mut self, micros: u64, error: bool) {
        self.calls += 1;
        self.errors += u64::from(error);
        self.sum_micros += micros;
        *self.buckets.entry(histogram::bucket_of(micros)).or_insert(0) += 1;
    }

    /// Buckets and their counts in bucket order, the wire's.
    pub(crate) fn sorted_buckets(&self) -> (Vec<u64>, Vec<u64>) {
        let mut buckets: Vec<(u64, u64)> = self.buckets.iter().map(|(&b, &c)| (b, c)).collect();
        buckets.sort_unstable();
        buckets.into_iter().unzip()
    }

    /// Records durations in raw clock ticks, all of one error state: the buckets are counted
    /// in `scratch` over their dense index range when it is short beside the number of
    /// durations, then each bucket goes into the map once. A map update a value was ~25
    /// instructions of the ~100 the exporter spent on each duration an application thread
    /// folded (and `delta_ns` a value ~30 more).
    pub(crate) fn record_ticks(&mut self, ticks: &[u64], error: bool, scale: TickScale, scratch: &mut DenseCounts) {
        if ticks.is_empty() {
            return;
        }
        let (mut low, mut high, mut sum) = (usize::MAX, 0, 0u64);
        scratch.indices.clear();
        for &duration in ticks {
            let micros = scale.ns(duration).div_ceil(1000);
            sum += micros;
            let index = histogram::bucket_index(micros);
            low = low.min(index);
            high = high.max(index);
            scratch.indices.push(index as u32);
        }
        let calls = ticks.len() as u64;
        self.calls += calls;
        self.errors += if error { calls } else { 0 };
        self.sum_micros += sum;
        let range = high - low + 1;
        if range > DENSE_RANGE_PER_VALUE * ticks.len() {
            for &index in &scratch.indices {
                *self.buckets.entry(histogram::bucket_at(index as usize)).or_insert(0) += 1;
            }
            return;
        }
        scratch.counts.clear();
        scratch.counts.resize(range, 0);
        for &index in &scratch.indices {
            scratch.counts[index as usize - low] += 1;
        }
        for (offset, &count) in scratch.counts.iter().enumerate() {
            if count > 0 {
                *self.buckets.entry(histogram::bucket_at(low + offset)).or_insert(0) += u64::from(count);
            }
        }
    }

    pub(crate) fn add(&mut self, other: &RedValue) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.sum_micros += other.sum_micros;
        for (&bucket, &count) in &other.buckets {
            *self.buckets.entry(bucket).or_insert(0) += count;
        }
    }
}

/// Bucket indices past this many per duration recorded are counted in the map directly.
const DENSE_RANGE_PER_VALUE: usize = 4;

/// Scratch space of [`RedValue::record_ticks`], kept between calls.
#[derive(Default)]
pub(crate) struct DenseCounts {
    indices: Vec<u32>,
    counts: Vec<u32>,
}

/// The stage a span's time belongs to.
pub(crate) fn stage(kind: Kind, component: &str) -> &'static str {
    match (kind, component) {
        (_, "db") => "db",
        (_, "cache") => "cache",
        (_, "mq") => "mq",
        (Kind::Client, _) => "downstream",
        _ => "own",
    }
}

/// The RED window (Unix seconds) of a span started at `start_raw`.
#[inline]
pub(crate) fn window_of(start_raw: u64) -> u64 {
    window_at(clock::unix_ns(start_raw))
}

/// The RED window (Unix seconds) holding the instant `unix_ns`.
#[inline]
pub(crate) fn window_at(unix_ns: u64) -> u64 {
    unix_ns / 1_000_000_000 / RED_WINDOW_SECS * RED_WINDOW_SECS
}

/// Raw readings known to fall in one RED window: a span's window from two compares instead of
/// a conversion to Unix time (a 128-bit multiply and shift) a span.
#[derive(Debug, Default, Clone, Copy)]
struct WindowCache {
    from_raw: u64,
    until_raw: u64,
    window: u64,
}

impl WindowCache {
    /// The window of `raw` and the readings around it surely in it: its bounds converted to
    /// ticks, less a millisecond's worth at each end for the conversion's rounding.
    fn around(raw: u64) -> Self {
        let unix_ns = clock::unix_ns(raw);
        let window = window_at(unix_ns);
        let since_start_ns = unix_ns - window * 1_000_000_000;
        let until_end_ns = (window + RED_WINDOW_SECS) * 1_000_000_000 - unix_ns;
        let margin = clock::ticks_in_ns(1_000_000);
        let from_raw = raw
            .saturating_sub(clock::ticks_in_ns(since_start_ns))
            .saturating_add(margin);
        let until_raw = raw
            .saturating_add(clock::ticks_in_ns(until_end_ns))
            .saturating_sub(margin);
        Self {
            from_raw,
            until_raw,
            window,
        }
    }

    #[inline]
    fn window_of(&mut self, raw: u64) -> u64 {
        if raw < self.from_raw || raw >= self.until_raw {
            *self = Self::around(raw);
            if raw < self.from_raw || raw >= self.until_raw {
                // Within the margin of a bound: not cached.
                return window_of(raw);
            }
        }
        self.window
    }
}

/// A RED key of static names, with the span's component for its stage (worked out when the
/// exporter takes it: comparing the component's text a span cost more than the rest of the
/// key). Compared by the names' addresses: the same text at two addresses makes two keys here,
/// one in the exporter's table (which compares text). Spans folded here carry no error.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StaticKey {
    pub window: u64,
    pub bt: &'static str,
    pub operation: &'static str,
    pub component: &'static str,
    pub kind: Kind,
}

impl StaticKey {
    pub(crate) fn stage(&self) -> &'static str {
        stage(self.kind, self.component)
    }
}

impl PartialEq for StaticKey {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.window == other.window
            && std::ptr::eq(self.bt, other.bt)
            && std::ptr::eq(self.operation, other.operation)
            && std::ptr::eq(self.component, other.component)
            && self.kind == other.kind
    }
}

/// What a thread folded since the exporter last took its batch: each key's durations as they
/// came, in raw clock ticks (an append, where a histogram's bucket cost a conversion to
/// microseconds and a hash-map update a span on the application's thread; the exporter does
/// both). Entries are kept when taken, emptied, so that the few keys a thread sees find their
/// memory again.
#[derive(Debug, Default)]
pub(crate) struct LocalRed {
    entries: Vec<(StaticKey, Vec<u64>)>,
    windows: WindowCache,
    /// Spans folded since the exporter last took it.
    pub folded: u32,
    /// The window of the first of them: a fold in a later one hands the batch off soon (see
    /// [`LocalRed::stale`]), so a thread that never leaves instrumented code holds RED for a
    /// window at most.
    first_window: u64,
    /// A later window was folded than the first.
    pub stale: bool,
}

impl std::fmt::Debug for RedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedValue")
            .field("calls", &self.calls)
            .finish_non_exhaustive()
    }
}

impl LocalRed {
    pub(crate) fn is_empty(&self) -> bool {
        self.folded == 0
    }

    /// Folds the finished span `record` of the unsampled `trace` here, if its key is static and
    /// it carries no details; `false` when it must go as a record.
    #[inline]
    pub(crate) fn fold(&mut self, trace: &TraceCtx, record: &Record) -> bool {
        let (Cow::Borrowed(operation), Cow::Borrowed(component), None) =
            (&record.operation, &record.component, &record.detail)
        else {
            return false;
        };
        self.fold_static(
            trace,
            record.kind,
            operation,
            component,
            (record.start_raw, record.end_raw),
        )
    }

    /// [`LocalRed::fold`] of a span given by its parts (static names, no details), from its
    /// start to its end in raw ticks.
    #[inline(always)]
    pub(crate) fn fold_static(
        &mut self,
        trace: &TraceCtx,
        kind: Kind,
        operation: &'static str,
        component: &'static str,
        (start_raw, end_raw): (u64, u64),
    ) -> bool {
        let SharedName::Static(bt) = &trace.bt else {
            return false;
        };
        let key = StaticKey {
            window: self.windows.window_of(start_raw),
            bt,
            operation,
            component,
            kind,
        };
        self.add(key, end_raw.saturating_sub(start_raw))
    }

    #[inline(always)]
    fn add(&mut self, key: StaticKey, ticks: u64) -> bool {
        if self.folded >= MAX_FOLDS {
            return false;
        }
        let latencies = match self.entries.iter().position(|(k, _)| *k == key) {
            Some(i) => &mut self.entries[i].1,
            None => {
                // An entry emptied at the last take, else a new one while there is room.
                let i = match self.entries.iter().position(|(_, v)| v.is_empty()) {
                    Some(i) => i,
                    None if self.entries.len() < LOCAL_KEYS => {
                        self.entries.push((key, Vec::new()));
                        self.entries.len() - 1
                    }
                    None => return false,
                };
                self.entries[i].0 = key;
                &mut self.entries[i].1
            }
        };
        latencies.push(ticks);
        if self.folded == 0 {
            self.first_window = key.window;
        } else if key.window > self.first_window {
            self.stale = true;
        }
        self.folded += 1;
        true
    }

    /// Gives every key folded, with its durations in raw ticks, to `take` and empties the table
    /// (its memory kept).
    pub(crate) fn take(&mut self, mut take: impl FnMut(&StaticKey, &[u64])) {
        if self.folded == 0 {
            return;
        }
        for (key, latencies) in &mut self.entries {
            if !latencies.is_empty() {
                take(key, latencies);
                latencies.clear();
            }
        }
        self.folded = 0;
        self.stale = false;
    }

    /// Empties it, folded spans lost (the agent is gone).
    pub(crate) fn clear(&mut self) {
        self.take(|_, _| {});
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(window: u64, operation: &'static str) -> StaticKey {
        StaticKey {
            window,
            bt: "Login",
            operation,
            component: "",
            kind: Kind::Server,
        }
    }

    #[test]
    fn durations_counted_together_are_those_recorded_one_by_one() {
        let scale = TickScale::get();
        let mut scratch = DenseCounts::default();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut random = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Clustered (counted densely), spread over hours (one by one), and a mix.
        let clustered: Vec<u64> = (0..500)
            .map(|_| clock::ticks_in_ns(40_000 + random() % 20_000))
            .collect();
        let spread: Vec<u64> = (0..50)
            .map(|_| random() % clock::ticks_in_ns(7_200_000_000_000))
            .collect();
        let mixed: Vec<u64> = clustered.iter().chain(&spread).copied().collect();
        for (ticks, error) in [(&clustered, false), (&spread, true), (&mixed, false), (&vec![], false)] {
            let (mut together, mut one_by_one) = (RedValue::default(), RedValue::default());
            together.record_ticks(ticks, error, scale, &mut scratch);
            together.record_ticks(ticks, error, scale, &mut scratch);
            for &t in ticks.iter().chain(ticks.iter()) {
                one_by_one.record(scale.ns(t).div_ceil(1000), error);
            }
            assert_eq!(
                (together.calls, together.errors, together.sum_micros),
                (one_by_one.calls, one_by_one.errors, one_by_one.sum_micros)
            );
            assert_eq!(together.sorted_buckets(), one_by_one.sorted_buckets());
        }
    }

    #[test]
    fn cached_windows_are_the_windows() {
        let mut cache = WindowCache::default();
        let now = clock::now_raw();
        let step = clock::ticks_in_ns(97_000).max(1);
        let span = clock::ticks_in_ns(25_000_000_000);
        let mut raw = now.saturating_sub(span);
        let mut windows = std::collections::BTreeSet::new();
        while raw < now + span {
            assert_eq!(cache.window_of(raw), window_of(raw), "raw {raw}");
            windows.insert(window_of(raw));
            raw += step;
        }
        assert!(windows.len() >= 5, "crossed window bounds: {windows:?}");
        // Out of order, as spans end.
        for raw in [now, now - span, now + span / 2, now - 1] {
            assert_eq!(cache.window_of(raw), window_of(raw));
        }
    }

    #[test]
    fn a_thread_folds_by_key_and_hands_over_everything_once() {
        let mut red = LocalRed::default();
        assert!(red.is_empty());
        for micros in [10, 20, 30] {
            assert!(red.add(key(100, "POST /login"), micros));
        }
        assert!(red.add(key(100, "GET /me"), 5));
        assert!(!red.stale, "one window");
        assert!(red.add(key(110, "GET /me"), 7));
        assert!(red.stale, "a later window folded");
        let mut taken = Vec::new();
        red.take(|k, micros| taken.push((k.window, k.operation, micros.to_vec())));
        taken.sort();
        assert_eq!(
            taken,
            vec![
                (100, "GET /me", vec![5]),
                (100, "POST /login", vec![10, 20, 30]),
                (110, "GET /me", vec![7])
            ]
        );
        assert!(red.is_empty() && !red.stale);
        red.take(|_, _| panic!("taken twice"));
        // Emptied entries are used again before the table grows; past its keys, spans go as
        // records.
        assert!(red.add(key(120, "GET /me"), 1));
        assert_eq!(red.entries.len(), 3);
        let names: Vec<&'static str> = (0..LOCAL_KEYS)
            .map(|i| &*Box::leak(format!("GET /{i}").into_boxed_str()))
            .collect();
        let kept = names.iter().filter(|name| red.add(key(120, name), 1)).count();
        assert_eq!(kept, LOCAL_KEYS - 1, "one key was there already");
        // Bounded in spans too.
        let folded = (0..MAX_FOLDS).filter(|_| red.add(key(120, names[0]), 1)).count() as u32;
        assert_eq!(folded, MAX_FOLDS - LOCAL_KEYS as u32);
        assert!(!red.add(key(120, names[0]), 1), "full");
    }
}
