//! Rank and quantile statistics from histograms: the Mann-Whitney U test with tie correction,
//! and the "outer" confidence interval of a quantile and of a difference of quantiles.
//!
//! **Mann-Whitney from buckets.** With `a_b`, `c_b` the two arms' counts in bucket `b` and
//! every bucket a tie group (midranks):
//!
//! ```text
//! U_A = Σ_b a_b (C_<b + c_b/2)         C_<b = Σ_{b' < b} c_b'
//! σ²_U = n_A n_B / 12 · ((N + 1) − Σ_b (t_b³ − t_b) / (N(N − 1)))      t_b = a_b + c_b
//! z = (U_A − n_A n_B / 2) / σ_U        p = 2 P(Z > |z|)                  AUC = U_A / (n_A n_B)
//! ```
//!
//! This is exactly the rank test on the data coarsened to the bucket edges (scipy's
//! `mannwhitneyu(method="asymptotic", use_continuity=False)` on bucket representatives). It
//! tests stochastic dominance (AUC ≠ ½), not a difference of means; it assumes independent
//! observations, so event-level histograms under user randomization make it anti-conservative;
//! it is fixed-horizon (not always-valid) and labelled so.
//!
//! **Quantiles (outer CI, Deng, Knoblich & Yu 2018).** Per arm, the ranks
//! `L, U = nq ∓ z·sqrt(nq(1 − q))`; `Y_(L)` is the lower edge of the bucket that holds rank L and
//! `Y_(U)` the upper edge of the bucket that holds rank U (so the bucket error is inside);
//! `σ_q = (Y_(U) − Y_(L)) / (2z)`. A difference of two arms' quantiles gets
//! `(q̂_T − q̂_C) ± z·sqrt(σ²_T + σ²_C)`. Refused when `n ≤ z²q/(1−q)` or `n ≤ z²(1−q)/q`.
//!
//! **Clustered observations.** `sqrt(nq(1 − q))` is the standard deviation of the number of
//! observations below the quantile when observations are independent. Event-level latencies
//! under user randomization are not: one slow user contributes many slow events. With `b_i`
//! the events of unit `i` at or below `q̂` and `n_i` its events, the cluster-robust (sandwich)
//! standard deviation of that count is `sqrt(Σ_i (b_i − q n_i)²)` ([`clustered_rank_sd`]);
//! [`quantile_clustered`] puts it in place of `sqrt(nq(1 − q))`. With one event per unit it
//! equals the independent case in expectation.

use serde::{Deserialize, Serialize};

use crate::dist::{normal_quantile, normal_sf};
use crate::sequential::Interval;

/// The result of a Mann-Whitney U test.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MannWhitney {
    /// U of the first arm.
    pub u: f64,
    /// U / (n_A n_B): P(A > B) + ½ P(A = B at bucket resolution).
    pub auc: f64,
    /// The tie-corrected z score.
    pub z: f64,
    /// The two-sided p-value (normal approximation).
    pub p_value: f64,
}

/// The test of arm `a` against arm `b`, each a list of `(bucket, count)` sorted by bucket;
/// `None` when an arm is empty or every observation is in one bucket.
pub fn mann_whitney(a: &[(i64, i64)], b: &[(i64, i64)]) -> Option<MannWhitney> {
    let n_a: f64 = a.iter().map(|x| x.1 as f64).sum();
    let n_b: f64 = b.iter().map(|x| x.1 as f64).sum();
    if n_a <= 0.0 || n_b <= 0.0 {
        return None;
    }
    let (mut i, mut j) = (0, 0);
    let (mut u, mut ties, mut below_b) = (0.0f64, 0.0f64, 0.0f64);
    while i < a.len() || j < b.len() {
        let bucket = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => x.0.min(y.0),
            (Some(x), None) => x.0,
            (None, Some(y)) => y.0,
            (None, None) => break,
        };
        let take = |list: &[(i64, i64)], at: &mut usize| match list.get(*at) {
            Some(&(k, c)) if k == bucket => {
                *at += 1;
                c as f64
            }
            _ => 0.0,
        };
        let (ca, cb) = (take(a, &mut i), take(b, &mut j));
        u += ca * (below_b + cb / 2.0);
        let t = ca + cb;
        ties += t * t * t - t;
        below_b += cb;
    }
    let n = n_a + n_b;
    let var = n_a * n_b / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if var.is_nan() || var <= 0.0 {
        return None;
    }
    let z = (u - n_a * n_b / 2.0) / var.sqrt();
    Some(MannWhitney {
        u,
        auc: u / (n_a * n_b),
        z,
        p_value: (2.0 * normal_sf(z.abs())).min(1.0),
    })
}

/// One histogram bucket: `[lower, upper)` and its count.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Lower edge.
    pub lower: f64,
    /// Upper edge.
    pub upper: f64,
    /// Observations in it.
    pub count: i64,
}

/// A quantile of one arm with its outer-CI standard error.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quantile {
    /// The estimate: the midpoint of the bucket that holds rank nq.
    pub estimate: f64,
    /// σ_q.
    pub sigma: f64,
}

/// The `q`-quantile of `buckets` (sorted, non-overlapping) with its standard error at
/// confidence `1 − alpha`; `None` for too few observations (see the module docs).
pub fn quantile(buckets: &[Bucket], q: f64, alpha: f64) -> Option<Quantile> {
    quantile_clustered(buckets, q, alpha, None)
}

/// The index in `buckets` of the bucket that holds the `q`-quantile (rank `nq`); `None` when
/// empty.
pub fn quantile_bucket(buckets: &[Bucket], q: f64) -> Option<usize> {
    let n: f64 = buckets.iter().map(|b| b.count.max(0) as f64).sum();
    if n <= 0.0 {
        return None;
    }
    let rank = (n * q).clamp(1.0, n);
    let mut seen = 0.0;
    for (i, b) in buckets.iter().enumerate() {
        seen += b.count.max(0) as f64;
        if seen >= rank {
            return Some(i);
        }
    }
    Some(buckets.len() - 1)
}

/// The cluster-robust standard deviation of the number of observations at or below the
/// `q`-quantile: `sqrt(Σ_i (b_i − q n_i)²)` over units `i`, each given as `(b_i, n_i)`.
pub fn clustered_rank_sd(units: impl IntoIterator<Item = (i64, i64)>, q: f64) -> f64 {
    units
        .into_iter()
        .map(|(below, n)| {
            let r = below as f64 - q * n as f64;
            r * r
        })
        .sum::<f64>()
        .sqrt()
}

/// [`quantile`] with the standard deviation of the rank `rank_sd` given (for example
/// [`clustered_rank_sd`]); `None`: independent observations, `sqrt(nq(1 − q))`.
pub fn quantile_clustered(
    buckets: &[Bucket],
    q: f64,
    alpha: f64,
    rank_sd: Option<f64>,
) -> Option<Quantile> {
    let n: f64 = buckets.iter().map(|b| b.count.max(0) as f64).sum();
    let z = normal_quantile(1.0 - alpha / 2.0);
    if !(0.0 < q && q < 1.0) || n <= z * z * q / (1.0 - q) || n <= z * z * (1.0 - q) / q {
        return None;
    }
    let sd = rank_sd
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or_else(|| (n * q * (1.0 - q)).sqrt());
    let spread = z * sd;
    let holding = |rank: f64| {
        let rank = rank.clamp(1.0, n);
        let mut seen = 0.0;
        for b in buckets {
            seen += b.count.max(0) as f64;
            if seen >= rank {
                return Some(*b);
            }
        }
        buckets.last().copied()
    };
    let (mid, low, high) = (
        holding(n * q)?,
        holding(n * q - spread)?,
        holding(n * q + spread)?,
    );
    Some(Quantile {
        estimate: (mid.lower + mid.upper) / 2.0,
        sigma: (high.upper - low.lower) / (2.0 * z),
    })
}

/// The `1 − alpha` interval of `q_T − q_C`, with the estimate.
pub fn quantile_difference(
    treatment: &[Bucket],
    control: &[Bucket],
    q: f64,
    alpha: f64,
) -> Option<(f64, Interval)> {
    let (t, c) = (quantile(treatment, q, alpha)?, quantile(control, q, alpha)?);
    let z = normal_quantile(1.0 - alpha / 2.0);
    let d = t.estimate - c.estimate;
    let h = z * (t.sigma * t.sigma + c.sigma * c.sigma).sqrt();
    Some((
        d,
        Interval {
            lo: d - h,
            hi: d + h,
        },
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn identical_arms_have_auc_one_half() {
        let a = [(1, 10), (2, 20), (5, 3)];
        let m = mann_whitney(&a, &a).unwrap();
        assert!(
            (m.auc - 0.5).abs() < 1e-12 && m.z.abs() < 1e-12 && (m.p_value - 1.0).abs() < 1e-12
        );
    }

    #[test]
    fn a_shifted_arm_dominates() {
        let a = [(3, 50), (4, 50)];
        let b = [(1, 50), (2, 50)];
        let m = mann_whitney(&a, &b).unwrap();
        assert_eq!(m.auc, 1.0);
        assert!(m.p_value < 1e-20);
    }

    #[test]
    fn a_quantile_interval_holds_the_bucket() {
        let buckets: Vec<Bucket> = (0..100)
            .map(|i| Bucket {
                lower: f64::from(i),
                upper: f64::from(i + 1),
                count: 10,
            })
            .collect();
        let q = quantile(&buckets, 0.5, 0.05).unwrap();
        assert!((q.estimate - 49.5).abs() < 1e-9);
        // ranks 500 ∓ 1.96·sqrt(250) = 469..531 → buckets 46..53.
        assert!((q.sigma - (54.0 - 46.0) / (2.0 * 1.959_963_984_540_054)).abs() < 1e-9);
    }
}
