//! A fast clock: the CPU's counter (via quanta), anchored once to the wall clock so spans carry
//! Unix nanoseconds without a system call per reading.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        OnceLock,
    },
    time::{SystemTime, UNIX_EPOCH},
};

/// Set once quanta's raw readings are known to be the CPU's time-stamp counter: the span path
/// then reads it inline, without the call, the clock-kind match and the set-up check (a tenth
/// of a span's time in `perf`).
static RAW_IS_TSC: AtomicBool = AtomicBool::new(false);

struct Anchor {
    clock: quanta::Clock,
    raw: u64,
    unix_ns: u64,
}

fn anchor() -> &'static Anchor {
    static ANCHOR: OnceLock<Anchor> = OnceLock::new();
    ANCHOR.get_or_init(|| {
        let clock = quanta::Clock::new();
        RAW_IS_TSC.store(raw_is_tsc(&clock), Ordering::Relaxed);
        let raw = clock.raw();
        let unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Anchor { clock, raw, unix_ns }
    })
}

/// Whether `clock`'s raw readings are the time-stamp counter's: each falls between two
/// readings of the counter taken around it (a reading of another clock, nanoseconds since
/// boot, cannot, three times over).
fn raw_is_tsc(clock: &quanta::Clock) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (0..3).all(|_| {
            let before = tsc();
            let raw = clock.raw();
            before <= raw && raw <= tsc()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = clock;
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn tsc() -> u64 {
    // SAFETY: `rdtsc` has no preconditions on x86_64.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
}

/// A raw counter reading; cheap.
#[inline(always)]
pub(crate) fn now_raw() -> u64 {
    // For measuring the span path without its two counter reads (benches/README.md): built
    // with `RUSTFLAGS="--cfg sightline_stub_clock"`, every reading is the same.
    #[cfg(sightline_stub_clock)]
    if RAW_IS_TSC.load(Ordering::Relaxed) {
        return 1;
    }
    #[cfg(target_arch = "x86_64")]
    if RAW_IS_TSC.load(Ordering::Relaxed) {
        return tsc();
    }
    anchor().clock.raw()
}

/// Nanoseconds between two raw readings.
#[inline]
pub(crate) fn delta_ns(start: u64, end: u64) -> u64 {
    anchor().clock.delta_as_nanos(start, end)
}

/// Raw ticks to nanoseconds as one multiply and shift, for converting many durations at once:
/// [`delta_ns`] a value went through quanta's call and clock match (the exporter converts every
/// duration an application thread folded). Within a nanosecond of [`delta_ns`] per 2^40 ticks
/// (minutes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TickScale {
    /// Nanoseconds in 2^40 ticks.
    ns_per_2p40_ticks: u64,
}

impl TickScale {
    pub(crate) fn get() -> Self {
        static SCALE: OnceLock<TickScale> = OnceLock::new();
        *SCALE.get_or_init(|| TickScale {
            ns_per_2p40_ticks: delta_ns(0, 1 << 40),
        })
    }

    #[inline]
    pub(crate) fn ns(self, ticks: u64) -> u64 {
        ((u128::from(ticks) * u128::from(self.ns_per_2p40_ticks)) >> 40) as u64
    }
}

/// About how many raw ticks `ns` nanoseconds are: the inverse of [`delta_ns`], to within a
/// tick over minutes (an `f64` of the scale).
pub(crate) fn ticks_in_ns(ns: u64) -> u64 {
    static TICKS_PER_NS: OnceLock<f64> = OnceLock::new();
    let per_ns = *TICKS_PER_NS.get_or_init(|| {
        const TICKS: u64 = 1 << 40;
        TICKS as f64 / delta_ns(0, TICKS).max(1) as f64
    });
    (ns as f64 * per_ns) as u64
}

/// A raw reading as Unix nanoseconds.
pub(crate) fn unix_ns(raw: u64) -> u64 {
    let a = anchor();
    if raw >= a.raw {
        a.unix_ns + a.clock.delta_as_nanos(a.raw, raw)
    } else {
        a.unix_ns - a.clock.delta_as_nanos(raw, a.raw)
    }
}

/// Ids: a per-thread xorshift generator seeded from the clock and the thread; ids are never 0.
pub(crate) mod ids {
    use std::cell::Cell;

    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }

    fn seed() -> u64 {
        let local = 0u8;
        let mixed = super::now_raw() ^ ((&local as *const u8 as u64).rotate_left(29)) ^ 0x9E37_79B9_7F4A_7C15;
        mixed | 1
    }

    #[inline]
    pub(crate) fn next_u64() -> u64 {
        STATE.with(|s| {
            let mut state = s.get();
            let id = step(&mut state);
            s.set(state);
            id
        })
    }

    /// The next id from `state` (non-zero), advancing it: xorshift64*, fast and good enough for
    /// ids and sampling decisions.
    #[inline]
    pub(crate) fn step(state: &mut u64) -> u64 {
        let mut x = *state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1
    }

    /// A new trace's id and whether it is sampled (true with probability `ratio`), from one
    /// visit to the generator.
    pub(crate) fn new_trace(ratio: f64) -> (u128, bool) {
        STATE.with(|s| {
            let mut state = s.get();
            let high = step(&mut state);
            let low = step(&mut state);
            let sampled = ratio >= 1.0 || (ratio > 0.0 && unit(step(&mut state)) < ratio);
            s.set(state);
            ((u128::from(high) << 64) | u128::from(low), sampled)
        })
    }

    /// `id` as a number in [0, 1).
    fn unit(id: u64) -> f64 {
        (id >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_scale_converts_as_the_clock_does() {
        let scale = TickScale::get();
        let mut ticks = 1u64;
        while ticks < 1 << 44 {
            for t in [ticks - 1, ticks, ticks + ticks / 3] {
                let (exact, scaled) = (delta_ns(0, t), scale.ns(t));
                let allowed = 1 + (t >> 40);
                assert!(
                    exact.abs_diff(scaled) <= allowed,
                    "{t} ticks: {exact} ns against {scaled}"
                );
            }
            ticks *= 2;
        }
    }
}
