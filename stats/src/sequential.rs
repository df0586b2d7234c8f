//! Always-valid inference: the asymptotic confidence sequence of Waudby-Smith et al. (the
//! normal-mixture boundary GrowthBook and Eppo use), its p-values, and the running minimum
//! and running intersection that keep a result from turning "un-significant" at a later look.
//!
//! For an estimate with standard error `se` after `n` units (both arms together), write
//! `s² = se²·n` (the per-unit variance of the contrast). With the mixing parameter tuned so
//! that the interval is narrowest at `n = N*`,
//!
//! ```text
//! ρ²  = (−2 ln α′ + ln(−2 ln α′ + 1)) / N*          α′ = α (two-sided), 2α (one-sided)
//! two-sided half-width  = sqrt( s² · 2(nρ²+1)/(n²ρ²) · ln( sqrt(nρ²+1) / α ) )
//! one-sided half-width  = sqrt( s² · 2(nρ²+1)/(n²ρ²) · ln( 1 + sqrt(nρ²+1) / (2α) ) )
//! ```
//!
//! (arXiv 2103.06476 eqs 9, 134 and 161; `gbstats/frequentist/tests.py`). The p-values are
//! the exact inversions at the same ρ: two-sided `p = min(1, sqrt(nρ²+1)·exp(−E))`, one-sided
//! `p = min(1, sqrt(nρ²+1) / (2(eᴱ − 1)))`, with `E = nρ²z² / (2(nρ²+1))` and
//! `z = (estimate − null)/se`. ρ is a tuning constant (it never depends on the data), so the
//! sequence is valid at every `α` and every look; `α` only sets where it is tightest.
//!
//! Assumptions: units are independent; the estimate is asymptotically normal (a mean or a
//! delta-method ratio of means over many units); the effect is constant over time (a changing
//! effect shows as a running intersection that becomes empty, [`Running::disjoint`]).

use serde::{Deserialize, Serialize};

/// Which tail(s) an interval bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sides {
    /// Both.
    Two,
    /// One: the lower bound of a "greater" test or the upper bound of a "less" test.
    One,
}

/// The direction of a one-sided test: the alternative is that the effect is above (or
/// below) the null value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// H₁: effect > null.
    Greater,
    /// H₁: effect < null.
    Less,
}

/// An interval of effects. Serialized with an unbounded side as `null` (JSON has no
/// infinities), and read back as ∓∞.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Lower bound (−∞ for a one-sided "less" interval).
    #[serde(with = "lower")]
    pub lo: f64,
    /// Upper bound (+∞ for a one-sided "greater" interval).
    #[serde(with = "upper")]
    pub hi: f64,
}

/// A bound as an optional finite number.
pub(crate) fn serialize_bound<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_some(v)
    } else {
        s.serialize_none()
    }
}

/// A lower bound: `null` is −∞.
mod lower {
    use serde::{Deserialize, Deserializer};

    pub(crate) use super::serialize_bound as serialize;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NEG_INFINITY))
    }
}

/// An upper bound: `null` is +∞.
mod upper {
    use serde::{Deserialize, Deserializer};

    pub(crate) use super::serialize_bound as serialize;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
    }
}

impl Interval {
    /// Whether `value` is inside.
    pub fn contains(&self, value: f64) -> bool {
        self.lo <= value && value <= self.hi
    }
}

/// The always-valid test of one experiment: its significance level and the planned number of
/// units N* (both arms compared) that tunes the mixing variance.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sequential {
    /// α.
    pub alpha: f64,
    /// N*: where the interval is narrowest.
    pub n_star: f64,
}

impl Sequential {
    /// ρ² for these sides.
    pub fn rho2(&self, sides: Sides) -> f64 {
        let a = match sides {
            Sides::Two => self.alpha,
            Sides::One => 2.0 * self.alpha,
        };
        let l = -2.0 * a.ln();
        (l + (l + 1.0).ln()) / self.n_star
    }

    /// The half-width of the interval around an estimate with standard error `se` after `n`
    /// units; ∞ before any unit.
    pub fn half_width(&self, se: f64, n: f64, sides: Sides) -> f64 {
        if n <= 0.0 || !se.is_finite() {
            return f64::INFINITY;
        }
        let rho2 = self.rho2(sides);
        let s2 = se * se * n;
        let nr = n * rho2 + 1.0;
        let log_term = match sides {
            Sides::Two => (nr.sqrt() / self.alpha).ln(),
            Sides::One => (1.0 + nr.sqrt() / (2.0 * self.alpha)).ln(),
        };
        (s2 * 2.0 * nr / (n * n * rho2) * log_term).sqrt()
    }

    /// The two-sided interval.
    pub fn interval(&self, estimate: f64, se: f64, n: f64) -> Interval {
        let h = self.half_width(se, n, Sides::Two);
        Interval {
            lo: estimate - h,
            hi: estimate + h,
        }
    }

    /// The one-sided interval of a test in `direction`: `[lo, ∞)` for `Greater`,
    /// `(−∞, hi]` for `Less`.
    pub fn one_sided(&self, estimate: f64, se: f64, n: f64, direction: Direction) -> Interval {
        let h = self.half_width(se, n, Sides::One);
        match direction {
            Direction::Greater => Interval {
                lo: estimate - h,
                hi: f64::INFINITY,
            },
            Direction::Less => Interval {
                lo: f64::NEG_INFINITY,
                hi: estimate + h,
            },
        }
    }

    /// The always-valid two-sided p-value of `effect = null`.
    pub fn p_value(&self, estimate: f64, se: f64, n: f64, null: f64) -> f64 {
        let Some((e, root)) = self.exponent(estimate, se, n, null, Sides::Two) else {
            return 1.0;
        };
        (root.ln() - e).exp().min(1.0)
    }

    /// The always-valid one-sided p-value of `effect = null` against `direction`.
    pub fn p_value_one_sided(
        &self,
        estimate: f64,
        se: f64,
        n: f64,
        null: f64,
        direction: Direction,
    ) -> f64 {
        let toward = match direction {
            Direction::Greater => estimate > null,
            Direction::Less => estimate < null,
        };
        if !toward {
            return 1.0;
        }
        let Some((e, root)) = self.exponent(estimate, se, n, null, Sides::One) else {
            return 1.0;
        };
        (root / (2.0 * e.exp_m1())).min(1.0)
    }

    /// `E = nρ²z²/(2(nρ²+1))` and `sqrt(nρ²+1)`; `None` without units or with no variance.
    fn exponent(
        &self,
        estimate: f64,
        se: f64,
        n: f64,
        null: f64,
        sides: Sides,
    ) -> Option<(f64, f64)> {
        if n <= 0.0 || se.is_nan() || se <= 0.0 || !se.is_finite() || !estimate.is_finite() {
            return None;
        }
        let rho2 = self.rho2(sides);
        let z = (estimate - null) / se;
        let nr = n * rho2;
        Some((nr * z * z / (2.0 * (nr + 1.0)), (nr + 1.0).sqrt()))
    }
}

/// What the looks so far allow: the smallest p-value and the intersection of the intervals.
/// Both only ever tighten, so a result never turns "un-significant".
///
/// The intersection assumes one effect throughout (the confidence sequence covers a constant
/// parameter). A new interval that does not meet it shows that the effect changed over time
/// (a regression part-way through, say): the intersection then restarts from that interval,
/// so that the interval reported is never one the data has left, and `disjoint` stays set to
/// say so.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Running {
    /// The smallest p-value seen.
    pub p_value: f64,
    /// The intersection of every interval seen.
    pub interval: Interval,
    /// A new interval did not meet the intersection: the effect is not constant over time.
    /// The intersection restarted from that interval.
    pub disjoint: bool,
}

impl Default for Running {
    fn default() -> Running {
        Running {
            p_value: 1.0,
            interval: Interval {
                lo: f64::NEG_INFINITY,
                hi: f64::INFINITY,
            },
            disjoint: false,
        }
    }
}

impl Running {
    /// Takes one more look.
    pub fn look(&mut self, p_value: f64, interval: Interval) {
        if p_value.is_finite() {
            self.p_value = self.p_value.min(p_value);
        }
        let lo = self.interval.lo.max(interval.lo);
        let hi = self.interval.hi.min(interval.hi);
        if lo <= hi {
            self.interval = Interval { lo, hi };
        } else {
            self.interval = interval;
            self.disjoint = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_multiplier_matches_growthbooks_table() {
        // anchors/experiments.md §1.1: N* = 5,000, α = 0.05; multiplier = half-width / SE,
        // where n is the total and SE² = s²/n.
        let seq = Sequential {
            alpha: 0.05,
            n_star: 5000.0,
        };
        for (n, want) in [(500.0, 3.86), (5000.0, 3.04), (100_000.0, 3.34)] {
            let got = seq.half_width(1.0, n, Sides::Two);
            assert!((got - want).abs() < 0.01, "n {n}: {got} vs {want}");
        }
    }

    #[test]
    fn p_values_invert_the_intervals() {
        let seq = Sequential {
            alpha: 0.05,
            n_star: 2000.0,
        };
        let (se, n) = (0.3, 1500.0);
        let h2 = seq.half_width(se, n, Sides::Two);
        assert!((seq.p_value(h2, se, n, 0.0) - 0.05).abs() < 1e-9);
        let h1 = seq.half_width(se, n, Sides::One);
        let p = seq.p_value_one_sided(h1, se, n, 0.0, Direction::Greater);
        assert!((p - 0.05).abs() < 1e-9, "{p}");
        assert_eq!(
            seq.p_value_one_sided(-h1, se, n, 0.0, Direction::Greater),
            1.0
        );
        assert!(h1 < h2);
    }

    #[test]
    fn unbounded_intervals_survive_json() {
        let i = Running::default().interval;
        let text = serde_json::to_string(&i).unwrap_or_default();
        assert_eq!(text, r#"{"lo":null,"hi":null}"#);
        let back: Interval = serde_json::from_str(&text).unwrap_or(Interval { lo: 0.0, hi: 0.0 });
        assert_eq!(back, i);
    }

    #[test]
    fn running_results_only_tighten() {
        let mut r = Running::default();
        r.look(0.2, Interval { lo: -1.0, hi: 2.0 });
        r.look(0.5, Interval { lo: -2.0, hi: 1.5 });
        assert_eq!(r.p_value, 0.2);
        assert_eq!(r.interval, Interval { lo: -1.0, hi: 1.5 });
        r.look(0.5, Interval { lo: 3.0, hi: 4.0 });
        assert!(r.disjoint);
        assert_eq!(r.interval, Interval { lo: 3.0, hi: 4.0 });
        r.look(0.5, Interval { lo: 2.0, hi: 3.5 });
        assert_eq!(r.interval, Interval { lo: 3.0, hi: 3.5 });
    }
}
