//! Difference-in-differences for a rollout by tenant that is not randomised: the feature is
//! turned on for chosen tenants (a *cohort*) at a start time, maybe several cohorts at
//! different times, and the other tenants stay off.
//!
//! **What is compared.** Each tenant's *change* `d` is the mean of its metric over the periods
//! after its cohort's start less the mean over the periods before it (the caller computes
//! them, per cohort, for the treated tenants and for every never-treated *control* tenant over
//! the same periods). The effect of cohort `g` is
//!
//! `Δ_g = mean(d_t, t ∈ T_g) − mean(d_c, c ∈ C)`
//!
//! (Callaway and Sant'Anna's group-time effect with the never-treated as comparison group),
//! and the overall effect `Δ = Σ_g w_g Δ_g` with `w_g = |T_g| / Σ|T|`: every treated tenant
//! counts once. Comparing changes rather than levels removes what is constant per tenant (the
//! chosen tenants are rarely like the others) and what is common to all tenants per period.
//!
//! **What it assumes.** *Parallel trends*: without the rollout, the treated tenants' metric
//! would have moved like the controls'. [`did`] on the changes *within* the pre-period (its
//! second half less its first) is the placebo that checks it: an effect there is a
//! pre-trend, and the estimate is then not to be trusted. Tenants are the independent units
//! (every unit of a tenant shares its treatment, so errors are clustered by tenant);
//! there are few of them, hence Student's t.
//!
//! **Variance.** Tenants are independent, so the variance of `Δ` is the sum of the squared
//! influences of the tenants, with the `n / (n − 1)` correction per group:
//!
//! - treated tenant `t` of cohort `g`: `w_g (d_t − d̄_{T_g}) / |T_g|`, giving
//!   `w_g² s²_{T_g} / |T_g|`;
//! - control `c`: `Σ_g w_g (d_c^g − d̄_C^g) / |C_g|` over the cohorts it has data for (a control
//!   serves every cohort, so its terms are summed before squaring: the cohorts' estimates are
//!   correlated through the shared controls).
//!
//! With one cohort this is Welch's `s²_T/|T| + s²_C/|C|`. A cohort of a single treated tenant
//! has no spread of its own: its term is `w_g² s²_{C_g}`, the controls' spread of changes
//! (assuming a treated tenant's change would vary like a control's: Conley and Taber's
//! argument for few treated clusters). Degrees of freedom by Welch–Satterthwaite over the
//! terms. The interval and the p-value are *fixed-horizon*: they hold at one look, not under
//! continuous peeking; a DiD row is descriptive and never drives a guardrail decision.

/// The changes of one cohort's tenants.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CohortChanges {
    /// The change of each treated tenant of the cohort that has data before and after.
    pub treated: Vec<f64>,
    /// The change of each control tenant over the cohort's periods, `None` for one without
    /// data before or after; the same controls, in the same order, for every cohort.
    pub controls: Vec<Option<f64>>,
}

/// A difference-in-differences estimate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Did {
    /// `Δ`: the treated tenants' mean change less the controls'.
    pub estimate: f64,
    /// The treated tenants' mean change (weighted over cohorts).
    pub treated_change: f64,
    /// The controls' mean change (weighted over cohorts as the treated).
    pub control_change: f64,
    /// Its standard error.
    pub se: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// The `1 − α` interval, lower bound.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
    /// Two-sided p-value of `Δ = 0`.
    pub p_value: f64,
    /// Treated tenants counted.
    pub treated: usize,
    /// Control tenants counted.
    pub controls: usize,
}

/// Mean and sample variance (`n − 1`) of `xs` (variance `None` below two values).
fn mean_var(xs: impl Iterator<Item = f64> + Clone) -> (f64, usize, Option<f64>) {
    let n = xs.clone().count();
    let mean = xs.clone().sum::<f64>() / n as f64;
    let var = (n >= 2).then(|| xs.map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64);
    (mean, n, var)
}

/// The difference in differences over `cohorts`, with a `1 − alpha` interval. Cohorts without
/// a treated tenant or with fewer than two controls with data are left out; `None` when none
/// is left or the changes have no spread (the variance is 0 or undefined).
pub fn did(cohorts: &[CohortChanges], alpha: f64) -> Option<Did> {
    let usable: Vec<&CohortChanges> = cohorts
        .iter()
        .filter(|c| !c.treated.is_empty() && c.controls.iter().flatten().count() >= 2)
        .collect();
    let treated: usize = usable.iter().map(|c| c.treated.len()).sum();
    if treated == 0 {
        return None;
    }
    let controls = usable.first().map_or(0, |c| c.controls.len());
    if usable.iter().any(|c| c.controls.len() != controls) {
        return None;
    }
    let mut estimate = 0.0;
    let (mut treated_change, mut control_change) = (0.0, 0.0);
    // Variance terms with their degrees of freedom.
    let mut terms: Vec<(f64, f64)> = Vec::new();
    // Per control, the sum of its influences over cohorts.
    let mut influence = vec![0.0f64; controls];
    let mut with_data = vec![false; controls];
    for c in &usable {
        let w = c.treated.len() as f64 / treated as f64;
        let (mt, nt, vt) = mean_var(c.treated.iter().copied());
        let (mc, nc, vc) = mean_var(c.controls.iter().flatten().copied());
        treated_change += w * mt;
        control_change += w * mc;
        estimate += w * (mt - mc);
        let vc = vc?;
        match vt {
            Some(vt) => terms.push((w * w * vt / nt as f64, (nt - 1) as f64)),
            None => terms.push((w * w * vc, (nc - 1) as f64)),
        }
        for (k, d) in c.controls.iter().enumerate() {
            if let Some(d) = d {
                influence[k] += w * (d - mc) / nc as f64;
                with_data[k] = true;
            }
        }
    }
    let n_controls = with_data.iter().filter(|b| **b).count();
    let squares: f64 = influence.iter().map(|x| x * x).sum();
    let correction = n_controls as f64 / (n_controls as f64 - 1.0);
    terms.push((squares * correction, (n_controls - 1) as f64));
    let variance: f64 = terms.iter().map(|(v, _)| v).sum();
    if !(variance > 0.0 && variance.is_finite()) {
        return None;
    }
    let df = variance * variance
        / terms
            .iter()
            .filter(|(v, _)| *v > 0.0)
            .map(|(v, df)| v * v / df)
            .sum::<f64>();
    let se = variance.sqrt();
    let half = crate::dist::student_t_quantile(1.0 - alpha / 2.0, df) * se;
    Some(Did {
        estimate,
        treated_change,
        control_change,
        se,
        df,
        lower: estimate - half,
        upper: estimate + half,
        p_value: (2.0 * crate::dist::student_t_sf(estimate.abs() / se, df)).min(1.0),
        treated,
        controls: n_controls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cohort_is_welch() {
        let c = CohortChanges {
            treated: vec![1.0, 2.0, 4.0],
            controls: vec![Some(0.0), Some(1.0), None, Some(-1.0), Some(0.5)],
        };
        let d = did(&[c], 0.05).unwrap();
        // Treated: mean 7/3, s² = 7/3; controls: mean 0.125, s² = 0.729166…
        let (vt, vc): (f64, f64) = (7.0 / 3.0 / 3.0, 0.729_166_666_666_666_7 / 4.0);
        assert!((d.estimate - (7.0 / 3.0 - 0.125)).abs() < 1e-12);
        assert!((d.se - (vt + vc).sqrt()).abs() < 1e-12);
        let df = (vt + vc).powi(2) / (vt * vt / 2.0 + vc * vc / 3.0);
        assert!((d.df - df).abs() < 1e-9);
        assert_eq!((d.treated, d.controls), (3, 4));
    }

    #[test]
    fn a_single_treated_tenant_borrows_the_controls_spread() {
        let c = CohortChanges {
            treated: vec![3.0],
            controls: vec![Some(0.0), Some(1.0), Some(2.0)],
        };
        let d = did(&[c], 0.05).unwrap();
        // s²_C = 1: Var = 1 + 1/3.
        assert!((d.se - (4.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((d.estimate - 2.0).abs() < 1e-12);
    }

    #[test]
    fn too_few_controls_or_no_spread_gives_nothing() {
        let one_control = CohortChanges {
            treated: vec![1.0, 2.0],
            controls: vec![Some(0.0), None],
        };
        assert!(did(&[one_control], 0.05).is_none());
        let flat = CohortChanges {
            treated: vec![1.0, 1.0],
            controls: vec![Some(0.0), Some(0.0)],
        };
        assert!(did(&[flat], 0.05).is_none());
    }

    #[test]
    fn cohorts_sharing_controls_add_their_control_influences() {
        // Two cohorts, the same controls with the same changes: the controls' term is that of
        // one cohort (the cohorts' control means are perfectly correlated), not half of it.
        let controls = vec![Some(0.0), Some(1.0), Some(2.0), Some(3.0)];
        let a = CohortChanges {
            treated: vec![5.0, 6.0],
            controls: controls.clone(),
        };
        let b = CohortChanges {
            treated: vec![5.0, 6.0],
            controls,
        };
        let one = did(std::slice::from_ref(&a), 0.05).unwrap();
        let two = did(&[a, b], 0.05).unwrap();
        let control_term = (5.0 / 3.0) / 4.0;
        let treated_term = 0.5 / 2.0;
        assert!((one.se.powi(2) - (treated_term + control_term)).abs() < 1e-12);
        assert!((two.se.powi(2) - (treated_term / 2.0 + control_term)).abs() < 1e-12);
    }
}
