//! Effects of a treatment arm against control from the arms' [`Summary`]s: the absolute
//! difference of means, the relative lift by the delta method, and both adjusted by CUPED.
//!
//! ```text
//! absolute   Δ = ȳ_T − ȳ_C                       Var = σ²_T/n_T + σ²_C/n_C
//! relative   Δ = (ȳ_T − ȳ_C)/|ȳ_C|               Var = σ²_T/(n_T ȳ_C²) + σ²_C ȳ_T²/(n_C ȳ_C⁴)
//! CUPED      θ = cov(x, y)/var(x), both arms pooled (Deng et al. 2013, eq. 4)
//!            V_adj = σ²_y + θ²σ²_x − 2θσ_xy      (per arm)
//!   absolute Δ = (ȳ_T − θx̄_T) − (ȳ_C − θx̄_C)    Var = V_adj,T/n_T + V_adj,C/n_C
//!   relative Δ = [(ȳ_T − θx̄_T) − (ȳ_C − θx̄_C)]/|ȳ_C|
//!            Var = V_adj,T/(n_T ȳ_C²) + (σ²_yC r² − 2θσ_xyC r + θ²σ²_xC)/(n_C ȳ_C²),  r = ȳ_T/ȳ_C
//! ```
//!
//! The relative CUPED variance keeps the covariance between the adjusted control mean in the
//! numerator and the unadjusted control mean in the denominator (the term GrowthBook's engine
//! omitted before its PR #3610; without it, intervals undercover when the lift is large).
//! Dividing by |ȳ_C| keeps the sign of the lift right for negative means (GrowthBook PR
//! #6658). The delta method assumes many units per arm and a control mean away from 0.

use serde::{Deserialize, Serialize};

use crate::moments::{Moments, Summary};
use crate::sequential::Sequential;

/// Units with pre-exposure data below which CUPED falls back to the unadjusted estimate.
pub const CUPED_MIN_UNITS: i64 = 100;

/// An effect estimate with its standard error and the units behind it (both arms), as the
/// sequential test takes it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    /// The point estimate.
    pub estimate: f64,
    /// Its standard error.
    pub se: f64,
    /// Units of both arms.
    pub n: f64,
}

fn enough(t: &Summary, c: &Summary) -> bool {
    t.n >= 2 && c.n >= 2
}

/// The absolute difference of means; `None` with fewer than two units in an arm.
pub fn absolute(t: &Summary, c: &Summary) -> Option<Effect> {
    enough(t, c).then(|| Effect {
        estimate: t.mean_y - c.mean_y,
        se: (t.var_y / t.n as f64 + c.var_y / c.n as f64).sqrt(),
        n: (t.n + c.n) as f64,
    })
}

/// The relative lift; `None` with fewer than two units in an arm or a zero control mean.
pub fn relative(t: &Summary, c: &Summary) -> Option<Effect> {
    if !enough(t, c) || c.mean_y == 0.0 {
        return None;
    }
    let (nt, nc, mc, mt) = (t.n as f64, c.n as f64, c.mean_y, t.mean_y);
    let var = t.var_y / (nt * mc * mc) + c.var_y * mt * mt / (nc * mc.powi(4));
    Some(Effect {
        estimate: (mt - mc) / mc.abs(),
        se: var.sqrt(),
        n: nt + nc,
    })
}

/// A ratio metric's arm as a per-unit metric: `R = ȳ / x̄` (numerator ÷ denominator sums) and
/// the delta-method variance per unit `(s²_y − 2R s_xy + R² s²_x) / x̄²`, so that
/// [`absolute`] and [`relative`] apply to it unchanged (Deng et al. 2018, "Applying the delta
/// method in metric analytics"). `None` when the denominator's mean is 0.
pub fn ratio_summary(s: &Summary) -> Option<Summary> {
    if s.mean_x == 0.0 || !s.mean_x.is_finite() {
        return None;
    }
    let r = s.mean_y / s.mean_x;
    let var = (s.var_y - 2.0 * r * s.cov_xy + r * r * s.var_x) / (s.mean_x * s.mean_x);
    Some(Summary {
        n: s.n,
        n_pre: 0,
        mean_y: r,
        var_y: var.max(0.0),
        mean_x: 0.0,
        var_x: 0.0,
        cov_xy: 0.0,
    })
}

/// The effect of a rollout in phases (strata), post-stratified: each phase's difference of
/// means weighted by its share of the units, `d = Σ_k w_k (ȳ_Tk − ȳ_Ck)`, `w_k = n_k / Σ n`,
/// with `Var d = Σ_k w_k² (s²_Tk/n_Tk + s²_Ck/n_Ck)`. Within a phase the assignment is
/// randomized with fixed weights; across phases the weights change, so when the metric drifts
/// over time a pooled difference mixes the drift into the effect (the ramp-up bias, Simpson's
/// paradox) and this does not. Phases where an arm has fewer than two units are left out.
/// Also the relative lift `d / c̄` (c̄ = Σ w_k ȳ_Ck), by the delta method with the two
/// arms' stratified means independent. `None` when no phase has two units in both arms.
pub fn stratified(strata: &[(Summary, Summary)]) -> Option<(Effect, Option<Effect>)> {
    let usable: Vec<&(Summary, Summary)> = strata.iter().filter(|(t, c)| enough(t, c)).collect();
    let total: f64 = usable.iter().map(|(t, c)| (t.n + c.n) as f64).sum();
    if usable.is_empty() || total <= 0.0 {
        return None;
    }
    let (mut d, mut var, mut mean_t, mut mean_c, mut var_t, mut var_c) =
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for (t, c) in &usable {
        let w = (t.n + c.n) as f64 / total;
        let (vt, vc) = (t.var_y / t.n as f64, c.var_y / c.n as f64);
        d += w * (t.mean_y - c.mean_y);
        var += w * w * (vt + vc);
        mean_t += w * t.mean_y;
        mean_c += w * c.mean_y;
        var_t += w * w * vt;
        var_c += w * w * vc;
    }
    let absolute = Effect {
        estimate: d,
        se: var.sqrt(),
        n: total,
    };
    let relative = (mean_c != 0.0).then(|| Effect {
        estimate: d / mean_c.abs(),
        se: (var_t / (mean_c * mean_c) + mean_t * mean_t * var_c / mean_c.powi(4)).sqrt(),
        n: total,
    });
    Some((absolute, relative))
}

/// Whether a relative lift may be reported: the control mean's always-valid interval
/// excludes 0 (otherwise the ratio, and its delta-method variance, are meaningless).
pub fn relative_allowed(c: &Summary, test: &Sequential) -> bool {
    if c.n < 2 {
        return false;
    }
    let n = c.n as f64;
    !test
        .interval(c.mean_y, (c.var_y / n).sqrt(), n)
        .contains(0.0)
}

/// CUPED's θ from both arms' sums pooled; `None` (use the unadjusted estimates) when fewer
/// than [`CUPED_MIN_UNITS`] units have pre-exposure data or the covariate does not vary.
pub fn theta(t: &Moments, c: &Moments) -> Option<f64> {
    let joint = t.plus(c).summary();
    if joint.n_pre < CUPED_MIN_UNITS || joint.var_x.is_nan() || joint.var_x <= 0.0 {
        return None;
    }
    let theta = joint.cov_xy / joint.var_x;
    theta.is_finite().then_some(theta)
}

/// An arm's per-unit variance after adjustment by `theta`.
pub fn adjusted_variance(s: &Summary, theta: f64) -> f64 {
    (s.var_y + theta * theta * s.var_x - 2.0 * theta * s.cov_xy).max(0.0)
}

/// An arm's CUPED-adjusted mean, ȳ − θx̄.
pub fn adjusted_mean(s: &Summary, theta: f64) -> f64 {
    s.mean_y - theta * s.mean_x
}

/// The CUPED-adjusted absolute difference; `None` with fewer than two units in an arm.
pub fn cuped_absolute(t: &Summary, c: &Summary, theta: f64) -> Option<Effect> {
    enough(t, c).then(|| Effect {
        estimate: adjusted_mean(t, theta) - adjusted_mean(c, theta),
        se: (adjusted_variance(t, theta) / t.n as f64 + adjusted_variance(c, theta) / c.n as f64)
            .sqrt(),
        n: (t.n + c.n) as f64,
    })
}

/// The CUPED-adjusted relative lift (with the covariance term); `None` with fewer than two
/// units in an arm or a zero control mean.
pub fn cuped_relative(t: &Summary, c: &Summary, theta: f64) -> Option<Effect> {
    if !enough(t, c) || c.mean_y == 0.0 {
        return None;
    }
    let (nt, nc, mc) = (t.n as f64, c.n as f64, c.mean_y);
    let r = t.mean_y / mc;
    let control = c.var_y * r * r - 2.0 * theta * c.cov_xy * r + theta * theta * c.var_x;
    let var = adjusted_variance(t, theta) / (nt * mc * mc) + control.max(0.0) / (nc * mc * mc);
    Some(Effect {
        estimate: (adjusted_mean(t, theta) - adjusted_mean(c, theta)) / mc.abs(),
        se: var.sqrt(),
        n: nt + nc,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::moments::fixed;

    fn arm(ys: &[f64], xs: &[f64]) -> Moments {
        ys.iter()
            .zip(xs)
            .map(|(y, x)| Moments::unit(fixed(*y).unwrap(), Some(fixed(*x).unwrap())))
            .fold(Moments::default(), |a, b| a.plus(&b))
    }

    #[test]
    fn theta_zero_is_the_unadjusted_effect() {
        let t = arm(&[3.0, 4.0, 6.0], &[1.0, 2.0, 2.0]).summary();
        let c = arm(&[1.0, 2.0, 4.0], &[1.0, 1.0, 3.0]).summary();
        assert_eq!(cuped_absolute(&t, &c, 0.0), absolute(&t, &c));
        let (a, b) = (
            cuped_relative(&t, &c, 0.0).unwrap(),
            relative(&t, &c).unwrap(),
        );
        assert!((a.estimate - b.estimate).abs() < 1e-12 && (a.se - b.se).abs() < 1e-12);
    }

    #[test]
    fn the_lift_keeps_its_sign_under_a_negative_control_mean() {
        let t = arm(&[-1.0, -1.2, -0.8], &[0.0; 3]).summary();
        let c = arm(&[-2.0, -2.2, -1.8], &[0.0; 3]).summary();
        // Treatment is higher (less negative): a positive lift.
        assert!(relative(&t, &c).unwrap().estimate > 0.0);
    }

    #[test]
    fn cuped_needs_enough_units_with_pre_exposure_data() {
        let few = arm(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.5]);
        assert_eq!(theta(&few, &few), None);
    }
}
