//! The one latency-histogram layout of Sightline.
//!
//! `hdrhistogram` with a microsecond unit and 2 significant digits: about 1% relative error
//! from 1 µs to 1 hour. On the wire and in ClickHouse a histogram is sparse (bucket value,
//! count) pairs, where the bucket value is the highest value equivalent to everything the
//! bucket holds. Histograms therefore merge by adding counts per bucket value, which is what
//! ClickHouse's SummingMergeTree and `sumMap` do, so per-minute histograms roll up exactly.

use hdrhistogram::Histogram;

/// Smallest trackable latency, in microseconds.
pub const LOWEST_MICROS: u64 = 1;
/// Largest trackable latency (one hour), in microseconds. Larger values are clamped.
pub const HIGHEST_MICROS: u64 = 3_600_000_000;
/// Significant decimal digits kept per value.
pub const SIGNIFICANT_DIGITS: u8 = 2;

/// A fresh, empty histogram in the shared layout.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(LOWEST_MICROS, HIGHEST_MICROS, SIGNIFICANT_DIGITS)
        .expect("the shared layout's bounds are valid")
}

/// The bucket value a latency falls into: what is stored and sent for it.
///
/// The layout's `highest_equivalent`, worked out without a histogram: application threads fold
/// RED themselves (the agent), and a histogram to ask (~26 KB) on every such thread, behind a
/// lazily made thread-local, cost more than the answer. With a lowest value of 1 and 2
/// significant digits, hdrhistogram keeps 256 sub-buckets per power of two: values below 256
/// are their own buckets, and above, a value's bits below its top 8 are what its bucket holds
/// alike. `bucket_of_is_the_layouts_highest_equivalent` checks this against hdrhistogram.
#[inline]
pub fn bucket_of(micros: u64) -> u64 {
    let value = clamp(micros);
    value | ((1u64 << shared_bits(value)) - 1)
}

/// How many low bits the values of `value`'s bucket share (the bits below its top 8).
#[inline]
fn shared_bits(value: u64) -> u32 {
    (u64::BITS - value.leading_zeros()).saturating_sub(SUB_BUCKET_BITS)
}

/// A latency's bucket as a dense index: buckets in order, numbered from 0 without gaps, so that
/// counts over a range of them fit an array (the agent's exporter counts a batch of latencies
/// that way before adding each bucket to a map once). Below 256 a value is its own index; above,
/// each power of two adds 128 buckets (its values' top 8 bits, the highest always set).
#[inline]
pub fn bucket_index(micros: u64) -> usize {
    let value = clamp(micros);
    let shared_bits = shared_bits(value);
    ((shared_bits << (SUB_BUCKET_BITS - 1)) as usize) + (value >> shared_bits) as usize
}

/// The bucket value (as [`bucket_of`] gives it) at a dense index from [`bucket_index`].
#[inline]
pub fn bucket_at(index: usize) -> u64 {
    let shared_bits = ((index >> (SUB_BUCKET_BITS - 1)) as u32).saturating_sub(1);
    let top = (index as u64) - (u64::from(shared_bits) << (SUB_BUCKET_BITS - 1));
    (top << shared_bits) | ((1u64 << shared_bits) - 1)
}

/// log2 of the layout's sub-buckets per power of two (2 significant digits: 256).
const SUB_BUCKET_BITS: u32 = 8;

#[inline]
fn clamp(micros: u64) -> u64 {
    micros.clamp(LOWEST_MICROS, HIGHEST_MICROS)
}

/// Records one latency, clamped into the layout's range.
pub fn record(hist: &mut Histogram<u64>, micros: u64) {
    hist.saturating_record(clamp(micros));
}

/// The sparse (bucket value, count) pairs of a histogram, ascending by bucket.
pub fn to_sparse(hist: &Histogram<u64>) -> Vec<(u64, u64)> {
    hist.iter_recorded()
        .map(|v| (hist.highest_equivalent(v.value_iterated_to()), v.count_at_value()))
        .collect()
}

/// Rebuilds a histogram from sparse pairs (as read back with `sumMap`).
pub fn from_sparse(pairs: impl IntoIterator<Item = (u64, u64)>) -> Histogram<u64> {
    let mut hist = new_histogram();
    for (bucket, count) in pairs {
        // saturating: counts from storage may exceed what one histogram can hold in theory.
        let _ = hist.record_n(clamp(bucket), count);
    }
    hist
}

/// Values at quantiles `qs` (each in (0, 1]) of sparse pairs in any order, repeats allowed:
/// what `from_sparse(pairs).value_at_quantile(q)` answers, without building a histogram (one
/// in this layout is ~26 KB to zero and scan, which a topology of 2,000 edges felt). Empty
/// pairs give `None`.
pub fn sparse_quantiles<const N: usize>(pairs: impl IntoIterator<Item = (u64, u64)>, qs: [f64; N]) -> Option<[u64; N]> {
    let mut pairs: Vec<(u64, u64)> = pairs.into_iter().filter(|(_, count)| *count > 0).collect();
    if !pairs.is_sorted_by_key(|(bucket, _)| *bucket) {
        pairs.sort_unstable_by_key(|(bucket, _)| *bucket);
    }
    let total: u64 = pairs.iter().map(|(_, count)| count).sum();
    if total == 0 {
        return None;
    }
    // hdrhistogram's rule: the first bucket whose running count reaches ceil(q * total).
    Some(qs.map(|q| {
        let target = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut running = 0;
        pairs
            .iter()
            .find(|(_, count)| {
                running += count;
                running >= target
            })
            .map_or(HIGHEST_MICROS, |(bucket, _)| clamp(*bucket))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_indices_number_the_buckets_in_order() {
        let mut last: Option<(usize, u64)> = None;
        let mut check = |micros: u64| {
            let index = bucket_index(micros);
            assert_eq!(bucket_at(index), bucket_of(micros), "{micros} us");
            if let Some((last_index, last_bucket)) = last {
                // In order and without gaps: the next bucket's index is one more.
                match bucket_of(micros).cmp(&last_bucket) {
                    std::cmp::Ordering::Equal => assert_eq!(index, last_index, "{micros} us"),
                    std::cmp::Ordering::Greater => assert_eq!(index, last_index + 1, "{micros} us"),
                    std::cmp::Ordering::Less => panic!("not ascending at {micros} us"),
                }
            }
            last = Some((index, bucket_of(micros)));
        };
        // Every value up to 2 s, then the first of each bucket beyond to the layout's top.
        (0..2_000_000).for_each(&mut check);
        let mut micros = 2_000_000;
        while micros <= HIGHEST_MICROS {
            check(micros);
            micros = bucket_of(micros) + 1;
        }
        check(u64::MAX);
    }

    #[test]
    fn bucket_of_is_the_layouts_highest_equivalent() {
        let layout = new_histogram();
        let check = |micros: u64| {
            assert_eq!(
                bucket_of(micros),
                layout.highest_equivalent(clamp(micros)),
                "{micros} us"
            )
        };
        (0..1_100_000).for_each(check);
        for shift in 0..64 {
            let power = 1u64 << shift;
            [power - 1, power, power + 1, power | (power >> 1)]
                .into_iter()
                .for_each(check);
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            check(x % (2 * HIGHEST_MICROS));
        }
        check(u64::MAX);
    }

    #[test]
    fn sparse_quantiles_answer_what_the_rebuilt_histogram_answers() {
        // Several shapes, pairs unsorted and split into repeats, as per-minute rows arrive.
        let shapes: [&dyn Fn(u64) -> u64; 4] = [
            &|i| i * 7,
            &|i| 1 + i % 13,
            &|i| if i % 100 == 0 { 2_000_000 + i } else { 900 + i % 50 },
            &|i| (i * i) % 5_000_000 + 1,
        ];
        for (n, shape) in shapes.iter().enumerate() {
            let mut halves = [new_histogram(), new_histogram()];
            for i in 1..=20_000u64 {
                record(&mut halves[(i % 2) as usize], shape(i));
            }
            let mut pairs = to_sparse(&halves[0]);
            pairs.extend(to_sparse(&halves[1]));
            pairs.reverse();
            let whole = from_sparse(pairs.clone());
            let qs = [0.001, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0];
            let fast = sparse_quantiles(pairs, qs).unwrap();
            for (q, got) in qs.iter().zip(fast) {
                assert_eq!(got, whole.value_at_quantile(*q), "shape {n}, q{q}");
            }
        }
        assert_eq!(sparse_quantiles(Vec::new(), [0.5]), None);
        assert_eq!(sparse_quantiles(vec![(5, 0)], [0.5]), None);
    }

    #[test]
    fn sparse_round_trip_keeps_quantiles_within_one_percent() {
        let mut hist = new_histogram();
        for micros in 1..=100_000u64 {
            record(&mut hist, micros * 7);
        }
        let back = from_sparse(to_sparse(&hist));
        assert_eq!(back.len(), hist.len());
        for q in [0.5, 0.9, 0.99] {
            let exact = (q * 100_000.0) * 7.0;
            let read = back.value_at_quantile(q) as f64;
            assert!((read - exact).abs() / exact < 0.01, "q{q}: {read} vs {exact}");
        }
    }

    #[test]
    fn merging_by_bucket_addition_equals_recording_together() {
        let (mut a, mut b, mut both) = (new_histogram(), new_histogram(), new_histogram());
        for v in [3u64, 150, 150, 9_999, 1_234_567] {
            record(&mut a, v);
            record(&mut both, v);
        }
        for v in [150u64, 42, 7_000_000_000] {
            record(&mut b, v);
            record(&mut both, v);
        }
        let mut summed = std::collections::BTreeMap::new();
        for (bucket, count) in to_sparse(&a).into_iter().chain(to_sparse(&b)) {
            *summed.entry(bucket).or_insert(0) += count;
        }
        assert_eq!(summed.into_iter().collect::<Vec<_>>(), to_sparse(&both));
        assert_eq!(bucket_of(7_000_000_000), bucket_of(HIGHEST_MICROS));
    }
}
