//! Sightline's experiment statistics, as pure functions of per-arm sums, so that the
//! dataflow keeps only sums (exact, retractable) and every result is recomputed from them when
//! a window closes.
//!
//! - [`moments`]: [`Moments`], the per-arm sufficient statistics (n, Σy, Σy², Σx, Σx², Σxy in
//!   fixed point), a differential-dataflow difference type;
//! - [`effect`]: absolute and relative effects, and CUPED (θ pooled across arms, the relative
//!   variance with its covariance term);
//! - [`sequential`]: the always-valid confidence sequence, its p-values, and the running
//!   minimum and intersection over looks;
//! - [`srm`]: the χ² sample-ratio-mismatch test;
//! - [`rank`]: Mann-Whitney U and quantile intervals from histograms;
//! - [`did`]: difference-in-differences for rollouts by tenant that are not randomised, and
//!   its pre-trend check;
//! - [`guardrail`]: breaches, persistence and the kill / hold / advance decision;
//! - [`dist`]: the normal, χ² and Student's t distributions they need.
//!
//! Every formula, with what it assumes, is in its module's documentation. They are checked
//! against scipy on fixed inputs and calibrated by simulation (`tests/`).
//!
//! ```
//! use sightline_stats::{Moments, effect, moments::fixed, sequential::Sequential};
//!
//! let arm = |ys: &[f64]| ys.iter().fold(Moments::default(), |m, y| {
//!     m.plus(&Moments::unit(fixed(*y).unwrap(), None))
//! });
//! let (t, c) = (arm(&[2.0, 3.0, 4.0, 5.0]).summary(), arm(&[1.0, 2.0, 3.0, 4.0]).summary());
//! let d = effect::absolute(&t, &c).unwrap();
//! let test = Sequential { alpha: 0.05, n_star: 1000.0 };
//! let interval = test.interval(d.estimate, d.se, d.n);
//! assert!(interval.contains(1.0));
//! ```

pub mod did;
pub mod dist;
pub mod effect;
pub mod guardrail;
pub mod moments;
pub mod rank;
pub mod sequential;
pub mod srm;

pub use moments::{Moments, Summary};
