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

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Multiply, Semigroup};
use serde::{Deserialize, Serialize};

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
}

impl LatencyHistogram {
    /// The histogram of a single sample.
    pub fn from_sample(value_us: u64) -> LatencyHistogram {
        LatencyHistogram {
            count: 1,
            sum_us: i128::from(value_us),
            buckets: smallvec::smallvec![(bucket_of(value_us), 1)],
        }
    }

    /// Adds one sample.
    pub fn record(&mut self, value_us: u64) {
        self.count += 1;
        self.sum_us += i128::from(value_us);
        self.add_to_bucket(bucket_of(value_us), 1);
    }

    fn add_to_bucket(&mut self, bucket: u16, n: i64) {
        match self.buckets.binary_search_by_key(&bucket, |&(b, _)| b) {
            Ok(i) => {
                self.buckets[i].1 += n;
                if self.buckets[i].1 == 0 {
                    self.buckets.remove(i);
                }
            }
            Err(i) => self.buckets.insert(i, (bucket, n)),
        }
    }

    /// The mean in microseconds, exact up to floating-point division; `None` when empty.
    pub fn mean_us(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_us as f64 / self.count as f64)
    }

    /// The `q`-quantile (`0 ≤ q ≤ 1`) in microseconds, within 1% of the exact sample at rank
    /// `⌊q·(n−1)⌋`; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * (self.count - 1) as f64).floor() as i64;
        let mut seen = 0i64;
        for &(bucket, n) in &self.buckets {
            seen += n;
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

impl IsZero for LatencyHistogram {
    fn is_zero(&self) -> bool {
        self.count == 0 && self.sum_us == 0 && self.buckets.is_empty()
    }
}

impl Semigroup for LatencyHistogram {
    fn plus_equals(&mut self, rhs: &Self) {
        self.count += rhs.count;
        self.sum_us += rhs.sum_us;
        if let [(bucket, n)] = rhs.buckets[..] {
            // The common case: merging one sample into an accumulation.
            self.add_to_bucket(bucket, n);
            return;
        }
        let mut merged = Buckets::with_capacity(self.buckets.len() + rhs.buckets.len());
        let (mut a, mut b) = (
            self.buckets.iter().peekable(),
            rhs.buckets.iter().peekable(),
        );
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&(ba, na)), Some(&&(bb, nb))) if ba == bb => {
                    a.next();
                    b.next();
                    (ba, na + nb)
                }
                (Some(&&(ba, na)), Some(&&(bb, _))) if ba < bb => {
                    a.next();
                    (ba, na)
                }
                (_, Some(&&(bb, nb))) => {
                    b.next();
                    (bb, nb)
                }
                (Some(&&(ba, na)), None) => {
                    a.next();
                    (ba, na)
                }
                (None, None) => break,
            };
            if next.1 != 0 {
                merged.push(next);
            }
        }
        self.buckets = merged;
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
        self
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
