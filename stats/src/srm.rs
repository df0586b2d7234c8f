//! Sample-ratio mismatch: Pearson's χ² goodness-of-fit test of the units exposed per arm
//! against the planned weights (GrowthBook's `check_srm`; flagged below p = 0.001).
//!
//! ```text
//! χ² = Σ_i (o_i − e_i)² / e_i,   e_i = N·w_i / Σw,   df = k − 1,   p = P(χ²_df > χ²)
//! ```
//!
//! Arms with a weight ≤ 0 are left out. Assumes independent exposures; re-testing at every
//! window is not sequentially valid (as Eppo's docs say), which is why the threshold is as
//! low as 0.001.

use crate::dist::chi2_sf;

/// The p-value below which an experiment's exposures are flagged.
pub const SRM_THRESHOLD: f64 = 0.001;

/// The p-value of the χ² test of `counts` against `weights` (same order); 1 when fewer than
/// two arms have a positive weight or no unit is exposed.
pub fn srm_p_value(counts: &[i64], weights: &[f64]) -> f64 {
    match chi2(counts, weights) {
        Some((statistic, df)) => chi2_sf(statistic, df),
        None => 1.0,
    }
}

/// The test over strata (rollout phases), each with its own planned weights: the sum of the
/// strata's χ² statistics against the sum of their degrees of freedom (the strata are
/// independent). 1 when no stratum can be tested.
pub fn srm_p_value_stratified(strata: &[(Vec<i64>, Vec<f64>)]) -> f64 {
    let (statistic, df) = strata
        .iter()
        .filter_map(|(counts, weights)| chi2(counts, weights))
        .fold((0.0, 0.0), |(s, d), (x, k)| (s + x, d + k));
    if df == 0.0 {
        1.0
    } else {
        chi2_sf(statistic, df)
    }
}

/// Pearson's χ² of `counts` against `weights` and its degrees of freedom; `None` when fewer
/// than two arms have a positive weight or no unit is exposed.
fn chi2(counts: &[i64], weights: &[f64]) -> Option<(f64, f64)> {
    let arms: Vec<(f64, f64)> = counts
        .iter()
        .zip(weights)
        .filter(|(_, w)| **w > 0.0 && w.is_finite())
        .map(|(c, w)| (*c as f64, *w))
        .collect();
    let total: f64 = arms.iter().map(|a| a.0).sum();
    let weight: f64 = arms.iter().map(|a| a.1).sum();
    if arms.len() < 2 || total <= 0.0 {
        return None;
    }
    let statistic: f64 = arms
        .iter()
        .map(|(observed, w)| {
            let expected = total * w / weight;
            (observed - expected).powi(2) / expected
        })
        .sum();
    Some((statistic, (arms.len() - 1) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planned_split_passes_and_a_skewed_one_fails() {
        assert!((srm_p_value(&[500, 500], &[1.0, 1.0]) - 1.0).abs() < 1e-12);
        assert!(srm_p_value(&[100, 900], &[1.0, 1.0]) < 1e-100);
        // 90/10 planned, 90/10 observed.
        assert!(srm_p_value(&[900, 100], &[0.9, 0.1]) > 0.99);
        assert_eq!(srm_p_value(&[0, 0], &[1.0, 1.0]), 1.0);
    }

    #[test]
    fn strata_are_tested_against_their_own_weights() {
        // 5% then 50% in treatment: as planned in each phase, but far from any single split.
        let strata = vec![
            (vec![950, 50], vec![95.0, 5.0]),
            (vec![500, 500], vec![50.0, 50.0]),
        ];
        assert!(srm_p_value_stratified(&strata) > 0.99);
        assert!(srm_p_value(&[1450, 550], &[1.0, 1.0]) < 1e-50);
        // One skewed phase fails the whole.
        let skewed = vec![
            (vec![950, 50], vec![95.0, 5.0]),
            (vec![600, 400], vec![50.0, 50.0]),
        ];
        assert!(srm_p_value_stratified(&skewed) < 1e-6);
    }
}
