//! The rate solve: given each segment's sampleable volume, its weight (risk × ln(1 + volume))
//! and the bounds its rate must stay in, the rates whose expected kept volume meets a target.
//!
//! Each segment's rate is `clamp(λ · weightₛ / volumeₛ, loₛ, hiₛ)` for one λ shared by all
//! segments: between its bounds a segment keeps `λ · weightₛ` events, so kept shares grow with
//! risk and with the logarithm of volume (Refinery's dynamic samplers give each key a share of
//! the budget that grows with the log of its count), a segment that reaches its upper bound
//! hands what it cannot use to the others, and one at its lower bound takes what it must.
//! `kept(λ) = Σ volumeₛ · rateₛ(λ)` is continuous, non-decreasing and piecewise linear in λ,
//! with breakpoints where a segment leaves a bound; [`solve`] walks the breakpoints in order
//! and solves the linear piece that holds the target, exactly (no iteration, no tolerance).

/// What one segment asks of the budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Demand {
    /// Its sampleable volume in the interval (events; positive).
    pub volume: f64,
    /// Its weight: risk × ln(1 + volume) (positive).
    pub weight: f64,
    /// The lowest rate it may get.
    pub lo: f64,
    /// The highest rate it may get (at least `lo`, at most 1).
    pub hi: f64,
}

/// How the target was met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// Some λ meets the target exactly.
    Met,
    /// Even every segment at its lower bound keeps more than the target.
    AboveAtLowest,
    /// Even every segment at its upper bound keeps less than the target.
    BelowAtHighest,
}

/// The rates (one per demand, in order) whose expected kept volume is `target`, or the
/// nearest the bounds allow, and how the target was met. Deterministic: the same demands in
/// the same order give the same rates, bit for bit.
pub fn solve(demands: &[Demand], target: f64) -> (Vec<f64>, Fit) {
    let at_lo: f64 = demands.iter().map(|d| d.volume * d.lo).sum();
    let at_hi: f64 = demands.iter().map(|d| d.volume * d.hi).sum();
    if target <= at_lo {
        return (demands.iter().map(|d| d.lo).collect(), Fit::AboveAtLowest);
    }
    if target >= at_hi {
        return (demands.iter().map(|d| d.hi).collect(), Fit::BelowAtHighest);
    }
    // Breakpoints: λ at which a segment leaves its lower bound, and reaches its upper one.
    let mut points: Vec<(f64, usize, bool)> = Vec::with_capacity(2 * demands.len());
    for (i, d) in demands.iter().enumerate() {
        points.push((d.lo * d.volume / d.weight, i, true));
        points.push((d.hi * d.volume / d.weight, i, false));
    }
    points.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(b.2.cmp(&a.2)));
    // Walking λ up: `fixed` is what the segments at a bound keep, `slope` the weight of
    // those in between (kept(λ) = fixed + λ · slope on the current piece).
    let mut fixed = at_lo;
    let mut slope = 0.0;
    let mut lambda = 0.0;
    for &(at, i, leaves_lo) in &points {
        let reached = fixed + at * slope;
        if reached >= target && slope > 0.0 {
            lambda = (target - fixed) / slope;
            break;
        }
        let d = demands[i];
        if leaves_lo {
            fixed -= d.volume * d.lo;
            slope += d.weight;
        } else {
            fixed += d.volume * d.hi;
            slope -= d.weight;
        }
        lambda = at;
    }
    let rates = demands
        .iter()
        .map(|d| (lambda * d.weight / d.volume).clamp(d.lo, d.hi))
        .collect();
    (rates, Fit::Met)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference model: bisection on λ over the definition, independent of the
    /// breakpoint walk.
    fn reference(demands: &[Demand], target: f64) -> Vec<f64> {
        let rate = |d: &Demand, l: f64| (l * d.weight / d.volume).clamp(d.lo, d.hi);
        let kept = |l: f64| demands.iter().map(|d| d.volume * rate(d, l)).sum::<f64>();
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        while kept(hi) < target && hi < 1e30 {
            hi *= 2.0;
        }
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if kept(mid) < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        demands.iter().map(|d| rate(d, hi)).collect()
    }

    fn demands() -> impl Strategy<Value = Vec<Demand>> {
        prop::collection::vec((1u32..1_000_000, 1.0f64..10.0, 0.0f64..0.5), 1..40).prop_map(|v| {
            v.into_iter()
                .map(|(volume, risk, lo)| {
                    let volume = f64::from(volume);
                    Demand {
                        volume,
                        weight: risk * (1.0 + volume).ln(),
                        lo: lo.max(1e-4),
                        hi: 1.0,
                    }
                })
                .collect()
        })
    }

    proptest! {
        /// The budget is met within 1% whenever it is reachable; no rate leaves its bounds;
        /// the rates agree with the reference model.
        #[test]
        fn meets_the_budget_within_bounds(ds in demands(), share in 0.0f64..1.2) {
            let total: f64 = ds.iter().map(|d| d.volume).sum();
            let target = share * total;
            let (rates, fit) = solve(&ds, target);
            let kept: f64 = ds.iter().zip(&rates).map(|(d, r)| d.volume * r).sum();
            for (d, r) in ds.iter().zip(&rates) {
                prop_assert!(*r >= d.lo && *r <= d.hi && *r > 0.0 && *r <= 1.0);
            }
            match fit {
                Fit::Met => prop_assert!((kept - target).abs() <= 0.01 * target, "{kept} vs {target}"),
                Fit::AboveAtLowest => prop_assert!(kept >= target * 0.99),
                Fit::BelowAtHighest => prop_assert!(kept <= target * 1.01),
            }
            let expected = reference(&ds, target);
            for (got, want) in rates.iter().zip(&expected) {
                prop_assert!((got - want).abs() <= 1e-6 * want.max(1e-3), "{got} vs {want}");
            }
        }

        /// At equal volume and bounds, a riskier segment never gets a lower rate.
        #[test]
        fn risk_never_lowers_the_rate(ds in demands(), volume in 1u32..1_000_000, share in 0.0f64..1.0) {
            let volume = f64::from(volume);
            let mut ds = ds;
            let calm = Demand { volume, weight: (1.0 + volume).ln(), lo: 1e-3, hi: 1.0 };
            let risky = Demand { weight: 3.0 * calm.weight, ..calm };
            ds.push(calm);
            ds.push(risky);
            let total: f64 = ds.iter().map(|d| d.volume).sum();
            let (rates, _) = solve(&ds, share * total);
            let n = rates.len();
            prop_assert!(rates[n - 1] >= rates[n - 2]);
        }
    }

    /// Unused budget moves to the others: a small segment capped at 1 leaves its share.
    #[test]
    fn a_capped_segment_hands_back_its_share() {
        let ds = [
            Demand {
                volume: 10.0,
                weight: 10.0 * (11f64).ln(),
                lo: 0.01,
                hi: 1.0,
            },
            Demand {
                volume: 10_000.0,
                weight: (10_001f64).ln(),
                lo: 0.01,
                hi: 1.0,
            },
        ];
        let (rates, fit) = solve(&ds, 1_010.0);
        assert_eq!(fit, Fit::Met);
        assert_eq!(rates[0], 1.0);
        assert!((rates[1] - 0.1).abs() < 1e-9, "{}", rates[1]);
    }
}
