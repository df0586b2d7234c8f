//! A subtractable log-bucketed latency histogram, used as a differential-dataflow difference type.
//!
//! Values (latencies in microseconds) fall into logarithmic buckets: bucket `b ≥ 1` holds the
//! values in `(γ^(b−2), γ^(b−1)]` with `γ = (1 + α) / (1 − α)` and `α = 0.01`; bucket `0` holds
//! the value `0`. A bucket is read back as `2γ^(b−1) / (γ + 1)`, which is within a relative error of
//! `α` (1%) of every value in the bucket — the DDSketch construction. The histogram stores a
//! count per bucket, an exact count and an exact sum, all integers, so that adding,
//! subtracting (retractions) and merging are exact: it implements differential's
//! `Semigroup`, `Monoid` and `Abelian`, and updates to it consolidate like any other
//! difference. (A t-digest cannot be subtracted, which is why it is not used here.)
//!
//! **Stated error**: for a quantile `q`, [`LatencyHistogram::quantile`] returns a value within
//! 1% (relative) of the exact value at rank `⌊q·(n−1)⌋` of the sorted samples; the same holds
//! for [`LatencyHistogram::max`]. The count and the mean are exact.
//!
//! **Weights.** A sample of a sampled event weighs 1 / `sample_rate` (Horvitz–Thompson, in
//! millionths: [`sightline_schemas::WEIGHT_ONE`] is 1). What weights other than 1 add is kept
//! apart, in an [`Excess`] that is absent while every sample weighs 1: unsampled traffic costs
//! nothing more, `count` and `buckets` stay the raw sample counts (the experiments' rank tests
//! read them), and the quantiles and the mean are those of the weighted samples: the value at
//! weighted rank `⌊q·(N̂−1)⌋`, `N̂` the total weight, which is the rank above when every weight
//! is 1.

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Multiply, Semigroup};
use serde::{Deserialize, Serialize};
use sightline_schemas::WEIGHT_ONE;

/// Weight 1, in millionths, as a signed count.
const ONE: i64 = WEIGHT_ONE as i64;

/// The buckets of a [`LatencyHistogram`]: one `(bucket, count)` pair inline, more on the heap.
pub type Buckets = smallvec::SmallVec<[(u16, i64); 1]>;

/// The histogram's relative accuracy, `α`.
pub const RELATIVE_ACCURACY: f64 = 0.01;

const GAMMA: f64 = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY);

/// The bucket index of a value in microseconds.
#[inline]
pub fn bucket_of(value_us: u64) -> u16 {
    if value_us == 0 {
        return 0;
    }
    // ln(u64::MAX) / ln(γ) ≈ 2,200, comfortably inside u16. At an exact bucket boundary the
    // rounding of `ln` may pick the neighbouring bucket, whose value is then exactly α away.
    let index = ((value_us as f64).ln() / GAMMA.ln()).ceil();
    (index.max(0.0) as u16).saturating_add(1)
}

/// The representative value of a bucket, in microseconds.
#[inline]
pub fn bucket_value(bucket: u16) -> f64 {
    if bucket == 0 {
        return 0.0;
    }
    let i = f64::from(bucket - 1);
    2.0 * GAMMA.powf(i) / (GAMMA + 1.0)
}

/// The edges of a bucket in microseconds: `(γ^(b−2), γ^(b−1)]` for `b ≥ 1`, `[0, 0]` for
/// bucket 0.
pub fn bucket_bounds(bucket: u16) -> (f64, f64) {
    if bucket == 0 {
        return (0.0, 0.0);
    }
    let i = f64::from(bucket) - 1.0;
    (GAMMA.powf(i - 1.0), GAMMA.powf(i))
}

/// Latency samples of one group: exact count and sum, and per-bucket counts.
///
/// Counts may be negative while updates are in flight (a retraction seen before its
/// insertion); an accumulated histogram of a real group has non-negative counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// Number of samples.
    pub count: i64,
    /// Sum of the samples in microseconds.
    pub sum_us: i128,
    /// `(bucket, count)` pairs, sorted by bucket, with no zero counts. One pair is stored
    /// inline: every event's latency is a one-sample histogram, which then costs no allocation.
    pub buckets: Buckets,
    /// What the samples' weights add beyond 1 each; `None` while every weight is 1.
    #[serde(default)]
    pub excess: Option<Box<Excess>>,
}

/// The part of a [`LatencyHistogram`]'s weights beyond 1 per sample, in millionths: a sample of
/// weight `w` adds `w − 1` here.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Excess {
    /// Σ (w − 1), millionths.
    pub weight_micros: i64,
    /// Σ (w − 1) × value, in µs × millionths.
    pub sum_us_micros: i128,
    /// `(bucket, Σ (w − 1))`, sorted by bucket, no zeros.
    pub buckets: Buckets,
}

impl Excess {
    fn is_zero(&self) -> bool {
        self.weight_micros == 0 && self.sum_us_micros == 0 && self.buckets.is_empty()
    }
}

impl LatencyHistogram {
    /// The histogram of a single sample.
    pub fn from_sample(value_us: u64) -> LatencyHistogram {
        LatencyHistogram {
            count: 1,
            sum_us: i128::from(value_us),
            buckets: smallvec::smallvec![(bucket_of(value_us), 1)],
            excess: None,
        }
    }

    /// The histogram of a single sample of weight `weight_micros` (millionths; an event's
    /// [`sightline_schemas::Event::weight_micros`]).
    pub fn from_weighted_sample(value_us: u64, weight_micros: u64) -> LatencyHistogram {
        LatencyHistogram::from_sample(value_us).with_weight(weight_micros)
    }

    /// This histogram with every sample weighing `weight_micros` instead of 1 (for a
    /// histogram of unweighted samples, as [`LatencyHistogram::from_sample`] and
    /// [`LatencyHistogram::record`] build; weights it already had are replaced alike).
    pub fn with_weight(mut self, weight_micros: u64) -> LatencyHistogram {
        let extra = (weight_micros.min(i64::MAX as u64) as i64).saturating_sub(ONE);
        self.excess = (extra != 0 && self.count != 0).then(|| {
            Box::new(Excess {
                weight_micros: self.count.saturating_mul(extra),
                sum_us_micros: self.sum_us * i128::from(extra),
                buckets: self
                    .buckets
                    .iter()
                    .map(|&(b, n)| (b, n.saturating_mul(extra)))
                    .collect(),
            })
        });
        self
    }

    /// The samples' total weight in millionths (`count × 1_000_000` when none is sampled).
    pub fn weight_micros(&self) -> i64 {
        self.count * ONE + self.excess.as_ref().map_or(0, |x| x.weight_micros)
    }

    /// The samples' total weight: the number of events they stand for.
    pub fn weighted_count(&self) -> f64 {
        self.weight_micros() as f64 / ONE as f64
    }

    /// Adds one sample.
    pub fn record(&mut self, value_us: u64) {
        self.count += 1;
        self.sum_us += i128::from(value_us);
        self.add_to_bucket(bucket_of(value_us), 1);
    }

    fn add_to_bucket(&mut self, bucket: u16, n: i64) {
        add_to_bucket(&mut self.buckets, bucket, n);
    }

    /// The (weighted) mean in microseconds, exact up to floating-point division; `None` when
    /// empty.
    pub fn mean_us(&self) -> Option<f64> {
        if self.count <= 0 {
            return None;
        }
        match &self.excess {
            None => Some(self.sum_us as f64 / self.count as f64),
            Some(x) => {
                let weight = self.weight_micros();
                let sum = self.sum_us * i128::from(ONE) + x.sum_us_micros;
                (weight > 0).then(|| sum as f64 / weight as f64)
            }
        }
    }

    /// The `q`-quantile (`0 ≤ q ≤ 1`) in microseconds, within 1% of the exact sample at
    /// (weighted) rank `⌊q·(n−1)⌋`; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        let Some(excess) = &self.excess else {
            let rank = (q * (self.count - 1) as f64).floor() as i64;
            let mut seen = 0i64;
            for &(bucket, n) in &self.buckets {
                seen += n;
                if seen > rank {
                    return Some(bucket_value(bucket));
                }
            }
            return self.buckets.last().map(|&(b, _)| bucket_value(b));
        };
        // Weighted: the first bucket whose cumulative weight passes ⌊q·(N̂−1)⌋ events. With
        // every weight 1 (N̂ = n) this is the rank above: (N̂−1) is then an exact integer.
        let weight = self.weight_micros();
        let events_less_one = (weight - ONE).max(0) as f64 / ONE as f64;
        let rank = (q * events_less_one).floor() as i128 * i128::from(ONE);
        let mut seen = 0i128;
        let mut extra = excess.buckets.iter().peekable();
        for &(bucket, n) in &self.buckets {
            seen += i128::from(n) * i128::from(ONE);
            while let Some(&&(b, w)) = extra.peek() {
                if b > bucket {
                    break;
                }
                // Excess only exists where samples are (a sample's excess is in its bucket).
                if b == bucket {
                    seen += i128::from(w);
                }
                extra.next();
            }
            if seen > rank {
                return Some(bucket_value(bucket));
            }
        }
        self.buckets.last().map(|&(b, _)| bucket_value(b))
    }

    /// The largest sample in microseconds, within 1%; `None` when empty.
    pub fn max(&self) -> Option<f64> {
        self.quantile(1.0)
    }
}

fn add_to_bucket(buckets: &mut Buckets, bucket: u16, n: i64) {
    match buckets.binary_search_by_key(&bucket, |&(b, _)| b) {
        Ok(i) => {
            buckets[i].1 += n;
            if buckets[i].1 == 0 {
                buckets.remove(i);
            }
        }
        Err(i) => buckets.insert(i, (bucket, n)),
    }
}

/// `a += b`, bucket by bucket; zeros leave.
fn merge_buckets(a: &mut Buckets, b: &Buckets) {
    if let [(bucket, n)] = b[..] {
        // The common case: merging one sample into an accumulation.
        add_to_bucket(a, bucket, n);
        return;
    }
    let mut merged = Buckets::with_capacity(a.len() + b.len());
    let (mut a_iter, mut b_iter) = (a.iter().peekable(), b.iter().peekable());
    loop {
        let next = match (a_iter.peek(), b_iter.peek()) {
            (Some(&&(ba, na)), Some(&&(bb, nb))) if ba == bb => {
                a_iter.next();
                b_iter.next();
                (ba, na + nb)
            }
            (Some(&&(ba, na)), Some(&&(bb, _))) if ba < bb => {
                a_iter.next();
                (ba, na)
            }
            (_, Some(&&(bb, nb))) => {
                b_iter.next();
                (bb, nb)
            }
            (Some(&&(ba, na)), None) => {
                a_iter.next();
                (ba, na)
            }
            (None, None) => break,
        };
        if next.1 != 0 {
            merged.push(next);
        }
    }
    *a = merged;
}

impl IsZero for LatencyHistogram {
    fn is_zero(&self) -> bool {
        self.count == 0 && self.sum_us == 0 && self.buckets.is_empty() && self.excess.is_none()
    }
}

impl Semigroup for LatencyHistogram {
    fn plus_equals(&mut self, rhs: &Self) {
        self.count += rhs.count;
        self.sum_us += rhs.sum_us;
        merge_buckets(&mut self.buckets, &rhs.buckets);
        if let Some(r) = &rhs.excess {
            let x = self.excess.get_or_insert_with(Default::default);
            x.weight_micros += r.weight_micros;
            x.sum_us_micros += r.sum_us_micros;
            merge_buckets(&mut x.buckets, &r.buckets);
            if x.is_zero() {
                self.excess = None;
            }
        }
    }
}
impl Monoid for LatencyHistogram {
    fn zero() -> Self {
        LatencyHistogram::default()
    }
}

impl Abelian for LatencyHistogram {
    fn negate(&mut self) {
        self.count = -self.count;
        self.sum_us = -self.sum_us;
        for (_, n) in &mut self.buckets {
            *n = -*n;
        }
        if let Some(x) = &mut self.excess {
            x.weight_micros = -x.weight_micros;
            x.sum_us_micros = -x.sum_us_micros;
            for (_, n) in &mut x.buckets {
                *n = -*n;
            }
        }
    }
}

impl Multiply<isize> for LatencyHistogram {
    type Output = LatencyHistogram;

    fn multiply(mut self, rhs: &isize) -> LatencyHistogram {
        let k = *rhs as i64;
        self.count *= k;
        self.sum_us *= i128::from(k);
        self.buckets.retain_mut(|(_, n)| {
            *n *= k;
            *n != 0
        });
        if let Some(x) = &mut self.excess {
            x.weight_micros *= k;
            x.sum_us_micros *= i128::from(k);
            x.buckets.retain_mut(|(_, n)| {
                *n *= k;
                *n != 0
            });
            if x.is_zero() {
                self.excess = None;
            }
        }
        self
    }
}

/// A sum of many [`LatencyHistogram`]s (one window's sum for one key), built for adding
/// one-sample histograms. Once the sum has [`HistogramSum::DENSE_FROM`] buckets, the buckets of
/// unweighted updates are counted in one run of counters, from the lowest bucket seen to the
/// highest. An update then finds its counter by an index instead of a binary search through the
/// sorted pairs (whose probes miss the cache when the histogram is large and cold). Everything
/// else (small sums, weighted samples, updates of several buckets) is added to an ordinary
/// histogram. [`HistogramSum::into_histogram`] is exactly what adding the same updates with
/// [`Semigroup::plus_equals`] gives.
#[derive(Clone, Debug, Default)]
pub struct HistogramSum {
    /// The bucket of `dense[0]`.
    first: u16,
    /// Counts per bucket from `first` on; empty until the sum is large.
    dense: Vec<i64>,
    /// The count of the updates counted in `dense`.
    count: i64,
    /// Their sum, µs.
    sum_us: i128,
    /// The other updates.
    rest: LatencyHistogram,
}

impl HistogramSum {
    /// How many buckets the sum has before it counts them densely. Below it the sorted pairs
    /// are small (a few cache lines) and take less memory than a run of counters would.
    pub const DENSE_FROM: usize = 16;

    /// Adds `h`.
    pub fn add(&mut self, h: &LatencyHistogram) {
        match (&h.excess, &h.buckets[..]) {
            (None, &[(bucket, n)])
                if !self.dense.is_empty() || self.rest.buckets.len() >= Self::DENSE_FROM =>
            {
                self.count += h.count;
                self.sum_us += h.sum_us;
                self.add_dense(bucket, n);
            }
            _ => self.rest.plus_equals(h),
        }
    }

    fn add_dense(&mut self, bucket: u16, n: i64) {
        if self.dense.is_empty() {
            self.first = bucket;
        } else if bucket < self.first {
            let grow = usize::from(self.first - bucket);
            self.dense.splice(0..0, std::iter::repeat_n(0, grow));
            self.first = bucket;
        }
        let i = usize::from(bucket - self.first);
        if i >= self.dense.len() {
            self.dense.resize(i + 1, 0);
        }
        self.dense[i] += n;
    }

    /// The sum, as a histogram.
    pub fn into_histogram(self) -> LatencyHistogram {
        let dense = LatencyHistogram {
            count: self.count,
            sum_us: self.sum_us,
            buckets: (self.first..=u16::MAX)
                .zip(self.dense)
                .filter(|&(_, n)| n != 0)
                .collect(),
            excess: None,
        };
        let mut sum = self.rest;
        sum.plus_equals(&dense);
        sum
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact_quantile(sorted: &[u64], q: f64) -> f64 {
        sorted[(q * (sorted.len() - 1) as f64).floor() as usize] as f64
    }

    fn within(actual: f64, exact: f64) -> bool {
        (actual - exact).abs() <= RELATIVE_ACCURACY * exact * (1.0 + 1e-9) + 1e-9
    }

    #[test]
    fn every_bucket_represents_its_values_within_one_percent() {
        for v in (0..200_000u64)
            .chain((1..2000).map(|i| i * 1_000_003))
            .chain([u64::MAX / 2, u64::MAX])
        {
            let rep = bucket_value(bucket_of(v));
            assert!(within(rep, v as f64), "value {v} read back as {rep}");
        }
    }

    #[test]
    fn unit_weights_add_no_excess() {
        let h = LatencyHistogram::from_weighted_sample(1_234, WEIGHT_ONE);
        assert_eq!(h, LatencyHistogram::from_sample(1_234));
        let half = LatencyHistogram::from_weighted_sample(1_234, 2 * WEIGHT_ONE);
        assert_eq!(half.weighted_count(), 2.0);
        assert_eq!(half.count, 1);
    }

    #[test]
    fn add_then_subtract_is_zero() {
        let mut h = LatencyHistogram::default();
        let samples = [5u64, 500, 500, 0, 77_000];
        for &s in &samples {
            h.record(s);
        }
        for &s in &samples {
            let mut neg = LatencyHistogram::from_sample(s);
            neg.negate();
            h.plus_equals(&neg);
        }
        assert!(h.is_zero(), "{h:?}");
    }

    proptest! {
        /// A dense sum gives exactly the sum of the same updates added one by one: unweighted
        /// and weighted samples, multiplied (retractions among them), in any order, with
        /// buckets far below and above the dense run.
        #[test]
        fn a_histogram_sum_is_the_sum_of_its_updates(updates in proptest::collection::vec((0u64..100_000_000_000, 1u64..4, -2isize..3), 0..300)) {
            let mut sum = HistogramSum::default();
            let mut reference = LatencyHistogram::default();
            for &(value, weight, k) in &updates {
                let h = LatencyHistogram::from_weighted_sample(value, weight * WEIGHT_ONE / 2)
                    .multiply(&k);
                sum.add(&h);
                reference.plus_equals(&h);
            }
            prop_assert_eq!(sum.into_histogram(), reference);
        }

        #[test]
        fn quantiles_within_stated_error(mut samples in proptest::collection::vec(0u64..10_000_000_000, 1..400), split in 0usize..400) {
            // Built in two halves and merged, to exercise the general merge.
            let split = split.min(samples.len());
            let mut left = LatencyHistogram::default();
            let mut right = LatencyHistogram::default();
            for &s in &samples[..split] { left.record(s); }
            for &s in &samples[split..] { right.record(s); }
            left.plus_equals(&right);
            samples.sort_unstable();
            prop_assert_eq!(left.count, samples.len() as i64);
            prop_assert_eq!(left.sum_us, samples.iter().map(|&s| i128::from(s)).sum::<i128>());
            for q in [0.0, 0.5, 0.9, 0.95, 0.99, 1.0] {
                let got = left.quantile(q).unwrap();
                let want = exact_quantile(&samples, q);
                prop_assert!(within(got, want), "q={} got={} want={}", q, got, want);
            }
        }

        #[test]
        fn weighted_samples_read_as_their_replicas(samples in proptest::collection::vec((0u64..10_000_000, 1u64..6), 1..200), split in 0usize..200) {
            // A sample of weight k (an event kept at rate 1/k) reads as k copies of itself:
            // the naive model is the unweighted histogram of the replicated samples.
            let split = split.min(samples.len());
            let mut weighted = LatencyHistogram::default();
            let mut rest = LatencyHistogram::default();
            let mut replicas = LatencyHistogram::default();
            for (i, &(x, k)) in samples.iter().enumerate() {
                let h = LatencyHistogram::from_weighted_sample(x, k * WEIGHT_ONE);
                if i < split { weighted.plus_equals(&h) } else { rest.plus_equals(&h) }
                for _ in 0..k { replicas.record(x); }
            }
            weighted.plus_equals(&rest);
            prop_assert_eq!(weighted.count, samples.len() as i64);
            prop_assert_eq!(weighted.weighted_count(), replicas.count as f64);
            for q in [0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 1.0] {
                prop_assert_eq!(weighted.quantile(q), replicas.quantile(q), "q={}", q);
            }
            let (m, r) = (weighted.mean_us().unwrap(), replicas.mean_us().unwrap());
            prop_assert!((m - r).abs() <= 1e-9 * r.max(1.0), "mean {} vs {}", m, r);
            // Retracting every weighted sample leaves nothing, excess included.
            for &(x, k) in &samples {
                let mut neg = LatencyHistogram::from_weighted_sample(x, k * WEIGHT_ONE);
                neg.negate();
                weighted.plus_equals(&neg);
            }
            prop_assert!(weighted.is_zero(), "{:?}", weighted);
        }

        #[test]
        fn merge_is_commutative_and_negation_inverts(a in proptest::collection::vec(0u64..1_000_000, 0..50), b in proptest::collection::vec(0u64..1_000_000, 0..50)) {
            let build = |xs: &[u64]| { let mut h = LatencyHistogram::default(); for &x in xs { h.record(x); } h };
            let (ha, hb) = (build(&a), build(&b));
            let mut ab = ha.clone(); ab.plus_equals(&hb);
            let mut ba = hb.clone(); ba.plus_equals(&ha);
            prop_assert_eq!(&ab, &ba);
            let mut neg = hb.clone(); neg.negate();
            ab.plus_equals(&neg);
            prop_assert_eq!(ab, ha);
        }
    }
}
