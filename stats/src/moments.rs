//! [`Moments`]: the per-arm sufficient statistics of a metric, in fixed point, so that merging
//! and retracting units is exact (a differential-dataflow difference type).

use differential_dataflow::difference::{IsZero, Monoid, Semigroup};
use serde::{Deserialize, Serialize};

/// Fixed-point scale of a value: values are kept in millionths.
pub const SCALE: f64 = 1_000_000.0;

/// A value in millionths; `None` for a value that is not finite or too large to square
/// exactly (|v| ≥ 10¹², which no metric reaches).
pub fn fixed(value: f64) -> Option<i64> {
    let scaled = (value * SCALE).round();
    (scaled.is_finite() && scaled.abs() < 1e18).then_some(scaled as i64)
}

/// The sums a metric's statistics are a pure function of, for one arm: units `n`, the metric
/// `y` (Σy, Σy²) and, for CUPED, the pre-exposure covariate `x` (Σx, Σx², Σxy), with the
/// number of units that had pre-exposure data. Values in millionths ([`SCALE`]), squares in
/// millionths squared, all in `i128`: a unit's contribution is added when it is exposed and
/// replaced (retracted, then added again) when its value changes, and the sums stay exact
/// whatever the order.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Moments {
    /// Units.
    pub n: i64,
    /// Units with pre-exposure data (their `x` is real; others count `x = 0`).
    pub n_pre: i64,
    /// Σy.
    pub sum_y: i128,
    /// Σy².
    pub sum_y2: i128,
    /// Σx.
    pub sum_x: i128,
    /// Σx².
    pub sum_x2: i128,
    /// Σxy.
    pub sum_xy: i128,
}

impl Moments {
    /// One unit with metric `y` and, if it had pre-exposure data, covariate `x` (both in
    /// millionths, see [`fixed`]).
    pub fn unit(y: i64, x: Option<i64>) -> Moments {
        let (y, xv) = (i128::from(y), i128::from(x.unwrap_or(0)));
        Moments {
            n: 1,
            n_pre: i64::from(x.is_some()),
            sum_y: y,
            sum_y2: y * y,
            sum_x: xv,
            sum_x2: xv * xv,
            sum_xy: xv * y,
        }
    }

    /// The same sums with every sign flipped: a retraction.
    pub fn negated(self) -> Moments {
        Moments {
            n: -self.n,
            n_pre: -self.n_pre,
            sum_y: -self.sum_y,
            sum_y2: -self.sum_y2,
            sum_x: -self.sum_x,
            sum_x2: -self.sum_x2,
            sum_xy: -self.sum_xy,
        }
    }

    /// The sums of `self` and `other` (two arms pooled, as CUPED's θ needs).
    pub fn plus(mut self, other: &Moments) -> Moments {
        self.plus_equals(other);
        self
    }

    /// The arm's summary in floating point: means, sample variances and covariance.
    pub fn summary(&self) -> Summary {
        let n = self.n as f64;
        let mean = |sum: i128| {
            if self.n > 0 {
                sum as f64 / SCALE / n
            } else {
                0.0
            }
        };
        // Sample (co)variance, n − 1 in the denominator, from the exact centred numerator
        // n·Σab − Σa·Σb (in i128 unless it overflows, which only sums beyond 10¹⁹ do).
        let centred = |sum_ab: i128, sum_a: i128, sum_b: i128| {
            if self.n < 2 {
                return 0.0;
            }
            let exact = i128::from(self.n)
                .checked_mul(sum_ab)
                .zip(sum_a.checked_mul(sum_b))
                .and_then(|(a, b)| a.checked_sub(b));
            let numerator = match exact {
                Some(v) => v as f64,
                None => n * sum_ab as f64 - sum_a as f64 * sum_b as f64,
            };
            numerator / (n * (n - 1.0)) / (SCALE * SCALE)
        };
        Summary {
            n: self.n,
            n_pre: self.n_pre,
            mean_y: mean(self.sum_y),
            var_y: centred(self.sum_y2, self.sum_y, self.sum_y).max(0.0),
            mean_x: mean(self.sum_x),
            var_x: centred(self.sum_x2, self.sum_x, self.sum_x).max(0.0),
            cov_xy: centred(self.sum_xy, self.sum_x, self.sum_y),
        }
    }
}

/// An arm's metric in floating point ([`Moments::summary`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    /// Units.
    pub n: i64,
    /// Units with pre-exposure data.
    pub n_pre: i64,
    /// ȳ.
    pub mean_y: f64,
    /// Sample variance of y.
    pub var_y: f64,
    /// x̄.
    pub mean_x: f64,
    /// Sample variance of x.
    pub var_x: f64,
    /// Sample covariance of x and y.
    pub cov_xy: f64,
}

impl IsZero for Moments {
    fn is_zero(&self) -> bool {
        *self == Moments::default()
    }
}

impl Semigroup for Moments {
    fn plus_equals(&mut self, rhs: &Self) {
        self.n += rhs.n;
        self.n_pre += rhs.n_pre;
        self.sum_y += rhs.sum_y;
        self.sum_y2 += rhs.sum_y2;
        self.sum_x += rhs.sum_x;
        self.sum_x2 += rhs.sum_x2;
        self.sum_xy += rhs.sum_xy;
    }
}

impl Monoid for Moments {
    fn zero() -> Self {
        Moments::default()
    }
}

impl differential_dataflow::difference::Abelian for Moments {
    fn negate(&mut self) {
        *self = self.negated();
    }
}

impl differential_dataflow::difference::Multiply<isize> for Moments {
    type Output = Moments;

    fn multiply(self, rhs: &isize) -> Moments {
        let k = *rhs as i64;
        let k128 = i128::from(k);
        Moments {
            n: self.n * k,
            n_pre: self.n_pre * k,
            sum_y: self.sum_y * k128,
            sum_y2: self.sum_y2 * k128,
            sum_x: self.sum_x * k128,
            sum_x2: self.sum_x2 * k128,
            sum_xy: self.sum_xy * k128,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn retracting_a_unit_restores_the_sums_exactly() {
        let a = Moments::unit(fixed(1.25).unwrap(), Some(fixed(0.5).unwrap()));
        let b = Moments::unit(fixed(-3.1).unwrap(), None);
        let mut sum = a.plus(&b);
        sum.plus_equals(&b.negated());
        assert_eq!(sum, a);
        sum.plus_equals(&a.negated());
        assert!(sum.is_zero());
    }

    #[test]
    fn the_summary_is_the_textbook_one() {
        let ys = [1.0, 2.0, 4.0, 7.0];
        let xs = [0.5, 1.0, 1.5, 3.0];
        let m = ys
            .iter()
            .zip(xs)
            .map(|(y, x)| Moments::unit(fixed(*y).unwrap(), Some(fixed(x).unwrap())))
            .fold(Moments::default(), |a, b| a.plus(&b));
        let s = m.summary();
        assert_eq!((s.n, s.n_pre), (4, 4));
        assert!((s.mean_y - 3.5).abs() < 1e-12);
        // Σ(y−ȳ)² = 6.25 + 2.25 + 0.25 + 12.25 = 21, / 3.
        assert!((s.var_y - 7.0).abs() < 1e-12);
        // x̄ = 1.5; Σ(x−x̄)(y−ȳ) = 2.5 + 0.75 + 0 + 5.25 = 8.5, / 3.
        assert!((s.cov_xy - 8.5 / 3.0).abs() < 1e-12);
    }
}
