//! The statistics behind the comparison: Mann-Whitney with the Hodges-Lehmann interval, block
//! bootstrap standard errors, quantiles of summed histograms, and a binned KS distance.
//! Special functions (the normal distribution) come from `statrs`.

use rand::{rngs::StdRng, Rng};
use statrs::distribution::{ContinuousCDF, Normal, StudentsT};

/// The standard normal quantile.
pub fn z_quantile(p: f64) -> f64 {
    Normal::standard().inverse_cdf(p)
}

/// Student's t quantile with `df` degrees of freedom (the normal one when `df` is large).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    match StudentsT::new(0.0, 1.0, df.max(1.0)) {
        Ok(t) => t.inverse_cdf(p),
        Err(_) => z_quantile(p),
    }
}

/// Mann-Whitney U test of `b` against `a` (normal approximation with tie correction): the
/// one-sided p-value that `b` tends to be larger.
pub fn mann_whitney_greater(a: &[f64], b: &[f64]) -> f64 {
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    if a.is_empty() || b.is_empty() {
        return 1.0;
    }
    let mut all: Vec<(f64, bool)> = a
        .iter()
        .map(|&x| (x, false))
        .chain(b.iter().map(|&x| (x, true)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = all.len();
    let (mut rank_sum_b, mut ties) = (0.0, 0.0);
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        // Ranks i+1..=j+1 share their mean.
        let mean_rank = (i + j + 2) as f64 / 2.0;
        let t = (j - i + 1) as f64;
        ties += t * t * t - t;
        rank_sum_b += all[i..=j].iter().filter(|(_, is_b)| *is_b).count() as f64 * mean_rank;
        i = j + 1;
    }
    let u = rank_sum_b - n2 * (n2 + 1.0) / 2.0;
    let mean = n1 * n2 / 2.0;
    let total = n1 + n2;
    let variance = n1 * n2 / 12.0 * ((total + 1.0) - ties / (total * (total - 1.0)));
    if variance <= 0.0 {
        return 1.0;
    }
    // Continuity correction.
    let z = (u - mean - 0.5) / variance.sqrt();
    1.0 - Normal::standard().cdf(z)
}

/// The Hodges-Lehmann shift of `b` over `a` (median of all pairwise differences) with its
/// two-sided interval at confidence `1 - 2 * alpha_one_sided`, from the order statistics of the
/// differences (the Mann-Whitney distribution, normal approximation).
pub fn hodges_lehmann(a: &[f64], b: &[f64], alpha_one_sided: f64) -> (f64, f64, f64) {
    let mut diffs: Vec<f64> = b.iter().flat_map(|y| a.iter().map(move |x| y - x)).collect();
    if diffs.is_empty() {
        return (0.0, f64::NEG_INFINITY, f64::INFINITY);
    }
    diffs.sort_by(f64::total_cmp);
    let m = diffs.len();
    let median = if m % 2 == 1 {
        diffs[m / 2]
    } else {
        (diffs[m / 2 - 1] + diffs[m / 2]) / 2.0
    };
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let z = z_quantile(1.0 - alpha_one_sided);
    let k = (n1 * n2 / 2.0 - z * (n1 * n2 * (n1 + n2 + 1.0) / 12.0).sqrt()).floor();
    if k < 1.0 {
        return (median, f64::NEG_INFINITY, f64::INFINITY);
    }
    let k = k as usize;
    (median, diffs[k - 1], diffs[m - k])
}

/// Histograms of blocks over one shared bucket axis, cumulated, so that the quantile of any
/// multiset of blocks is found by a binary search over buckets.
pub struct BlockHistograms {
    /// Bucket values (µs), ascending.
    pub buckets: Vec<u64>,
    /// Per block, cumulative counts over `buckets`.
    cumulative: Vec<Vec<u64>>,
}

impl BlockHistograms {
    /// `blocks`: sparse (bucket, count) pairs per block, on the shared bucket axis `buckets`.
    pub fn new(buckets: Vec<u64>, blocks: &[&[(u64, u64)]]) -> Self {
        let cumulative = blocks
            .iter()
            .map(|sparse| {
                let mut dense = vec![0u64; buckets.len()];
                for (bucket, count) in sparse.iter() {
                    if let Ok(i) = buckets.binary_search(bucket) {
                        dense[i] += count;
                    }
                }
                let mut total = 0;
                for c in &mut dense {
                    total += *c;
                    *c = total;
                }
                dense
            })
            .collect();
        Self { buckets, cumulative }
    }

    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }

    fn total(&self, blocks: &[usize]) -> u64 {
        blocks
            .iter()
            .map(|&b| self.cumulative[b].last().copied().unwrap_or(0))
            .sum()
    }

    /// The `q` quantile (bucket value, µs) of the blocks `blocks` (with repeats) pooled.
    pub fn quantile(&self, blocks: &[usize], q: f64) -> Option<u64> {
        let total = self.total(blocks);
        if total == 0 || self.buckets.is_empty() {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let (mut lo, mut hi) = (0, self.buckets.len() - 1);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let below: u64 = blocks.iter().map(|&b| self.cumulative[b][mid]).sum();
            if below >= rank {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Some(self.buckets[lo])
    }

    /// The pooled distribution of every block, cumulative and normalised (for KS).
    pub fn cdf(&self) -> Vec<f64> {
        let all: Vec<usize> = (0..self.len()).collect();
        let total = self.total(&all).max(1) as f64;
        (0..self.buckets.len())
            .map(|i| all.iter().map(|&b| self.cumulative[b][i]).sum::<u64>() as f64 / total)
            .collect()
    }
}

/// A bootstrap of whole blocks: `resamples` draws of as many blocks as there are, with
/// replacement; `statistic` sees the drawn block indices. Returns the statistics.
pub fn block_bootstrap(
    blocks: usize,
    resamples: usize,
    rng: &mut StdRng,
    mut statistic: impl FnMut(&[usize]) -> Option<f64>,
) -> Vec<f64> {
    let mut drawn = vec![0usize; blocks];
    (0..resamples)
        .filter_map(|_| {
            for d in drawn.iter_mut() {
                *d = rng.random_range(0..blocks);
            }
            statistic(&drawn)
        })
        .collect()
}

/// The standard error a block bootstrap gives for `blocks` blocks: the resamples' standard
/// deviation, corrected for its small-sample bias (it divides by n, the true one by n - 1).
pub fn bootstrap_se(resampled: &[f64], blocks: usize) -> f64 {
    let n = blocks as f64;
    std_dev(resampled) * (n / (n - 1.0).max(1.0)).sqrt()
}

/// Welch-Satterthwaite degrees of freedom for the difference of two means whose standard
/// errors are `se_a` (from `n_a` blocks) and `se_b` (from `n_b`).
pub fn welch_df(se_a: f64, n_a: usize, se_b: f64, n_b: usize) -> f64 {
    let (va, vb) = (se_a * se_a, se_b * se_b);
    let denominator = va * va / (n_a as f64 - 1.0).max(1.0) + vb * vb / (n_b as f64 - 1.0).max(1.0);
    if denominator > 0.0 && denominator.is_finite() {
        (va + vb).powi(2) / denominator
    } else {
        (n_a.min(n_b) as f64 - 1.0).max(1.0)
    }
}

/// The standard deviation of `values`.
pub fn std_dev(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return f64::INFINITY;
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1) as f64).sqrt()
}

/// The largest gap between two cumulative distributions on the same axis.
pub fn ks_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mann_whitney_and_hodges_lehmann_on_shifted_samples() {
        let a: Vec<f64> = (0..30).map(f64::from).collect();
        let b: Vec<f64> = (0..30).map(|i| f64::from(i) + 10.0).collect();
        assert!(mann_whitney_greater(&a, &b) < 0.01);
        assert!(mann_whitney_greater(&b, &a) > 0.99);
        assert!((mann_whitney_greater(&a, &a) - 0.5).abs() < 0.1);
        let (shift, low, high) = hodges_lehmann(&a, &b, 0.025);
        assert_eq!(shift, 10.0);
        assert!(low < 10.0 && high > 10.0 && low > 0.0, "{low} {high}");
    }

    #[test]
    fn quantiles_of_pooled_blocks() {
        let one: &[(u64, u64)] = &[(10, 90), (100, 10)];
        let two: &[(u64, u64)] = &[(10, 50), (1000, 50)];
        let h = BlockHistograms::new(vec![10, 100, 1000], &[one, two]);
        assert_eq!(h.quantile(&[0], 0.5), Some(10));
        assert_eq!(h.quantile(&[0], 0.95), Some(100));
        assert_eq!(h.quantile(&[0, 1], 0.9), Some(1000));
        assert_eq!(h.quantile(&[1, 1], 0.5), Some(10));
        assert!((ks_distance(&h.cdf(), &[0.7, 0.75, 1.0]) - 0.0).abs() < 1e-12);
    }
}
