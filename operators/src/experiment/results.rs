//! Experiments in the stream, second half: the results at every closed window with data
//! (cumulative since the experiment's start), and the guardrail decisions once per sampling
//! interval.
//!
//! [`super::experiments`] applies its input window by window once the frontier has passed a
//! window's end, adds the per-arm statistics' updates to each experiment's [`Tracked`] sums,
//! and then takes a [`look`]: every result from the sums as they were at that end, with
//! `sightline-stats`: per metric and arm, units, mean and variance; per treatment arm, the
//! absolute and relative effects against control with their always-valid intervals and
//! p-values (kept monotone over looks: running minimum of p, running intersection of
//! intervals); the SRM p-value of the experiment; and the state. At the first look after each
//! `interval_windows` windows, each guardrail is evaluated and a decision (`kill`, `hold`,
//! `advance`) is emitted, keyed by experiment, rule and decision epoch, so that a replay
//! yields the same keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sightline_schemas::Label;

use super::Metric;
use crate::histogram::{LatencyHistogram, bucket_bounds};
use sightline_stats::effect;
use sightline_stats::guardrail::{Action, Evidence, Harm, Persistence, breached};
use sightline_stats::rank;
use sightline_stats::sequential::{Interval, Running, Sequential};
use sightline_stats::srm::{SRM_THRESHOLD, srm_p_value, srm_p_value_stratified};
use sightline_stats::{Moments, Summary};

/// A guardrail of an experiment: a metric, the direction in which it harms, and the
/// non-inferiority margin (in the metric's unit, absolute).
#[derive(Clone, Debug, PartialEq)]
pub struct Guardrail {
    /// The metric watched.
    pub metric: Label,
    /// The harmful direction.
    pub harm: Harm,
    /// The margin.
    pub margin: f64,
}

/// How one experiment is analysed.
#[derive(Clone, Debug, PartialEq)]
pub struct Analysis {
    /// Arms and their planned weights; empty: every arm seen, equal weights.
    pub arms: Vec<(Label, f64)>,
    /// The control arm; `None`: `control` if an arm has that name, else the first arm.
    pub control: Option<Label>,
    /// The always-valid test (α, N*).
    pub test: Sequential,
    /// Units every arm needs before any decision.
    pub min_units: i64,
    /// Windows per sampling interval.
    pub interval_windows: u64,
    /// Its guardrails.
    pub guardrails: Vec<Guardrail>,
    /// The metric whose confidently positive effect advances a rollout.
    pub primary: Option<Label>,
    /// Whether an SRM failure alone kills.
    pub srm_kills: bool,
    /// A fingerprint of the configuration, carried by every decision.
    pub version: u64,
    /// Planned weights per rollout phase (in the order of the experiment's phases); empty:
    /// no phases (`arms` holds the weights).
    pub phases: Vec<Vec<(Label, f64)>>,
}

impl Default for Analysis {
    fn default() -> Analysis {
        Analysis {
            arms: Vec::new(),
            control: None,
            test: Sequential {
                alpha: 0.05,
                n_star: 10_000.0,
            },
            min_units: 100,
            interval_windows: 5,
            guardrails: Vec::new(),
            primary: None,
            srm_kills: false,
            version: 0,
            phases: Vec::new(),
        }
    }
}

/// One row of `experiment_results`: a metric and arm of an experiment, cumulative at the end
/// of a window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    /// Experiment id.
    pub experiment: Label,
    /// Metric name.
    pub metric: Label,
    /// Arm.
    pub arm: Label,
    /// Whether this arm is the control.
    pub control: bool,
    /// Units analysed.
    pub units: i64,
    /// Mean per unit.
    pub mean: f64,
    /// Sample variance per unit.
    pub variance: f64,
    /// Against control (treatment arms only): the absolute effect.
    pub absolute: Option<Inference>,
    /// Against control: the relative lift, when the control mean is away from 0.
    pub relative: Option<Inference>,
    /// The experiment's SRM p-value.
    pub srm_p_value: f64,
    /// Where the experiment stands for this metric and arm.
    pub state: ResultState,
    /// For an event-level latency metric: its quantile and the rank test (`mean` and
    /// `variance` are then the events' latency in ms, and the effects are differences of the
    /// quantile).
    #[serde(default)]
    pub quantile: Option<QuantileFigures>,
    /// CUPED-adjusted figures, when enough units have pre-exposure data.
    #[serde(default)]
    pub cuped: Option<CupedFigures>,
    /// The rollout phases the effects are stratified over (0: none).
    #[serde(default)]
    pub phases: u32,
}

/// A metric's CUPED-adjusted figures in one arm (Deng et al. 2013; the covariate is the same
/// metric over the lookback before exposure).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CupedFigures {
    /// θ = cov(x, y) / var(x), pooled over the arm and control.
    pub theta: f64,
    /// Units of the arm with pre-exposure data.
    pub units_with_pre: i64,
    /// The adjusted mean, ȳ − θx̄.
    pub mean: f64,
    /// Against control: the adjusted absolute effect.
    pub absolute: Option<Inference>,
    /// Against control: the adjusted relative lift (with the covariance term of GrowthBook's
    /// PR #3610).
    pub relative: Option<Inference>,
}

/// The figures of an event-level latency metric in one arm.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantileFigures {
    /// The quantile (0.95: p95).
    pub q: f64,
    /// The arm's quantile, ms (the midpoint of the bucket that holds it).
    pub value_ms: Option<f64>,
    /// Latency samples (events) in the arm.
    pub samples: i64,
    /// Mann-Whitney against control (treatment arms): P(treatment > control) + ½ P(tie), at
    /// bucket resolution.
    pub auc: Option<f64>,
    /// Its two-sided p-value: fixed-horizon, not always-valid, and event-level (see
    /// `sightline_stats::rank`): a description, never a decision.
    pub mann_whitney_p_value: Option<f64>,
}

/// The latency histograms of one event-level latency metric, per arm.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Samples {
    /// The quantile in thousandths.
    pub permille: u16,
    /// Per arm, every analysed unit's samples since exposure.
    pub arms: BTreeMap<Label, LatencyHistogram>,
    /// Per arm, the cluster-robust spread of the quantile's rank, computed from the units'
    /// own histograms before each look (not saved: recomputed from the saved units).
    #[serde(skip)]
    pub rank_sd: BTreeMap<Label, f64>,
}

impl Samples {
    /// The quantile, as a share.
    pub fn quantile(&self) -> f64 {
        f64::from(self.permille) / 1000.0
    }

    /// Per arm, the bucket that holds the quantile's rank `nq`.
    pub fn thresholds(&self) -> BTreeMap<Label, u16> {
        let q = self.quantile();
        self.arms
            .iter()
            .filter_map(|(arm, h)| {
                let i = rank::quantile_bucket(&buckets_ms(h), q)?;
                Some((arm.clone(), h.buckets[i].0))
            })
            .collect()
    }
}

/// A histogram's buckets with their edges in ms, for [`rank`].
fn buckets_ms(h: &LatencyHistogram) -> Vec<rank::Bucket> {
    h.buckets
        .iter()
        .map(|&(b, count)| {
            let (lower, upper) = bucket_bounds(b);
            rank::Bucket {
                lower: lower / 1000.0,
                upper: upper / 1000.0,
                count,
            }
        })
        .collect()
}

/// The state of a result row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultState {
    /// Collecting data, nothing conclusive.
    Running,
    /// The effect is significantly positive (always-valid).
    SignificantPositive,
    /// The effect is significantly negative.
    SignificantNegative,
    /// A guardrail on this metric is breached at the last sampling interval.
    Breach,
    /// The experiment was killed.
    Killed,
    /// The SRM check fails: results are not trusted.
    Unhealthy,
}

impl ResultState {
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            ResultState::Running => "running",
            ResultState::SignificantPositive => "significant_positive",
            ResultState::SignificantNegative => "significant_negative",
            ResultState::Breach => "breach",
            ResultState::Killed => "killed",
            ResultState::Unhealthy => "unhealthy",
        }
    }
}

/// An effect with its always-valid inference.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inference {
    /// The estimate at this look.
    pub estimate: f64,
    /// The running intersection of the intervals so far.
    pub interval: Interval,
    /// The running minimum of the p-values so far.
    pub p_value: f64,
    /// An interval once fell outside the intersection: the effect changed over time, and the
    /// intersection restarted there.
    #[serde(default)]
    pub drift: bool,
}

/// A guardrail decision at a sampling interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Experiment id.
    pub experiment: Label,
    /// The rule: the guardrail's metric, or `srm` / `rollout` when no guardrail is configured.
    pub rule: Label,
    /// The sampling interval's index since the experiment's first window (0-based).
    pub epoch: u64,
    /// What to do.
    pub action: Action,
    /// The treatment arm the evidence is about.
    pub arm: Label,
    /// The metric's estimate (absolute effect), if computable.
    pub estimate: Option<f64>,
    /// Its one-sided always-valid bound on the harmful side.
    pub bound: Option<f64>,
    /// α.
    pub alpha: f64,
    /// N*.
    pub n_star: f64,
    /// Units per arm.
    pub units: Vec<(Label, i64)>,
    /// Consecutive breached intervals.
    pub breached_intervals: u32,
    /// The SRM p-value.
    pub srm_p_value: f64,
    /// The watermark the decision was made at (the window's end, ms).
    pub watermark_ms: u64,
    /// The configuration's fingerprint.
    pub config_version: u64,
}

/// What an experiment's looks keep across windows: the cumulative sums, the running
/// inference, the guardrails' persistence. Saved with the operator's state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tracked {
    /// Cumulative sums per (metric, arm).
    pub sums: BTreeMap<Label, BTreeMap<Label, Moments>>,
    /// The first window with data.
    pub first_window: Option<u64>,
    /// Running inference per (metric, arm), absolute then relative.
    pub running: Vec<((Label, Label, bool), SavedRunning)>,
    /// Persistence per (rule, arm).
    pub persistence: Vec<((Label, Label), Persistence)>,
    /// Breached at the last interval, per (metric, arm).
    pub breached: Vec<((Label, Label), bool)>,
    /// Killed (for good).
    pub killed: bool,
    /// The SRM check failed at the last look.
    pub unhealthy: bool,
    /// Sampling intervals completed at the last decision.
    #[serde(default)]
    pub intervals_decided: u64,
    /// Latency histograms per event-level latency metric.
    #[serde(default)]
    pub samples: BTreeMap<Label, Samples>,
    /// Units analysed per arm (exposed, less those found in a second arm).
    #[serde(default)]
    pub exposed: BTreeMap<Label, i64>,
    /// The compliance alert is firing.
    #[serde(default)]
    pub compliance_firing: bool,
    /// Per metric, the sums per rollout phase and arm (experiments with phases).
    #[serde(default, with = "crate::state::pairs::nested")]
    pub strata: BTreeMap<Label, BTreeMap<(u8, Label), Moments>>,
    /// Units analysed per rollout phase and arm (experiments with phases).
    #[serde(default, with = "crate::state::pairs")]
    pub exposed_strata: BTreeMap<(u8, Label), i64>,
    /// Per tenant and period, the figures of a rollout by tenant.
    #[serde(default)]
    pub panel: super::did::Panel,
}

/// [`Running`] as saved: infinite bounds as `None` (JSON has no infinities).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SavedRunning {
    /// The running minimum p-value.
    pub p_value: f64,
    /// Lower bound, `None` for −∞.
    pub lo: Option<f64>,
    /// Upper bound, `None` for +∞.
    pub hi: Option<f64>,
    /// The intersection became empty once.
    pub disjoint: bool,
}

impl SavedRunning {
    fn of(r: &Running) -> SavedRunning {
        let finite = |v: f64| v.is_finite().then_some(v);
        SavedRunning {
            p_value: r.p_value,
            lo: finite(r.interval.lo),
            hi: finite(r.interval.hi),
            disjoint: r.disjoint,
        }
    }

    fn running(&self) -> Running {
        Running {
            p_value: self.p_value,
            interval: Interval {
                lo: self.lo.unwrap_or(f64::NEG_INFINITY),
                hi: self.hi.unwrap_or(f64::INFINITY),
            },
            disjoint: self.disjoint,
        }
    }
}

impl Tracked {
    /// Adds `m` to the sums of `metric` and `arm`, and notes the first window.
    pub fn add(&mut self, metric: &Label, arm: &Label, m: &Moments, window_start: u64) {
        self.first_window.get_or_insert(window_start);
        let sum = self
            .sums
            .entry(metric.clone())
            .or_default()
            .entry(arm.clone())
            .or_default();
        *sum = sum.plus(m);
    }

    /// Adds `h` (negative counts retract) to the histogram of latency metric `metric` and
    /// `arm`, whose quantile is `quantile`.
    pub fn add_samples(
        &mut self,
        metric: &Label,
        arm: &Label,
        quantile: f64,
        h: &LatencyHistogram,
    ) {
        let s = self.samples.entry(metric.clone()).or_default();
        s.permille = (quantile * 1000.0).round() as u16;
        let arm = s.arms.entry(arm.clone()).or_default();
        differential_dataflow::difference::Semigroup::plus_equals(arm, h);
    }

    /// Counts `delta` units of `arm` (exposed in rollout phase `phase`) in or out of the
    /// analysis.
    pub fn expose(&mut self, arm: &Label, phase: Option<u8>, delta: i64) {
        *self.exposed.entry(arm.clone()).or_default() += delta;
        if let Some(phase) = phase {
            *self.exposed_strata.entry((phase, arm.clone())).or_default() += delta;
        }
    }

    /// Adds `m` to the sums of `metric` in rollout phase `phase` and `arm`.
    pub fn add_stratum(&mut self, metric: &Label, phase: u8, arm: &Label, m: &Moments) {
        let sum = self
            .strata
            .entry(metric.clone())
            .or_default()
            .entry((phase, arm.clone()))
            .or_default();
        *sum = sum.plus(m);
    }

    fn sum(&self, metric: &Label, arm: &Label) -> Moments {
        self.sums
            .get(metric)
            .and_then(|a| a.get(arm))
            .copied()
            .unwrap_or_default()
    }

    fn running_mut(&mut self, key: (Label, Label, bool)) -> Running {
        self.running
            .iter()
            .find(|(k, _)| *k == key)
            .map_or_else(Running::default, |(_, r)| r.running())
    }

    fn set_running(&mut self, key: (Label, Label, bool), r: &Running) {
        let saved = SavedRunning::of(r);
        match self.running.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = saved,
            None => self.running.push((key, saved)),
        }
    }

    fn persistence_mut(&mut self, key: (Label, Label)) -> &mut Persistence {
        let i = match self.persistence.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.persistence.push((key, Persistence::default()));
                self.persistence.len() - 1
            }
        };
        &mut self.persistence[i].1
    }

    fn was_breached(&self, key: &(Label, Label)) -> bool {
        self.breached.iter().any(|(k, b)| k == key && *b)
    }

    fn set_breached(&mut self, key: (Label, Label), breached: bool) {
        match self.breached.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = breached,
            None => self.breached.push((key, breached)),
        }
    }
}

/// Whether an estimate with standard error `se` carries information for a look.
fn informative(se: f64) -> bool {
    se.is_finite() && se > 0.0
}

/// The arms of an experiment in the order of its analysis (or sorted), with the control.
fn arms_of(tracked: &Tracked, analysis: &Analysis) -> (Vec<(Label, f64)>, Label) {
    let mut arms: Vec<(Label, f64)> = if analysis.arms.is_empty() {
        let mut seen: Vec<Label> = tracked
            .sums
            .values()
            .flat_map(|arms| arms.keys().cloned())
            .chain(
                tracked
                    .samples
                    .values()
                    .flat_map(|s| s.arms.keys().cloned()),
            )
            .chain(tracked.exposed.keys().cloned())
            .collect();
        seen.sort();
        seen.dedup();
        seen.into_iter().map(|a| (a, 1.0)).collect()
    } else {
        analysis.arms.clone()
    };
    let control = analysis.control.clone().unwrap_or_else(|| {
        arms.iter()
            .find(|(a, _)| &**a == "control")
            .or(arms.first())
            .map(|(a, _)| a.clone())
            .unwrap_or_else(|| Label::from("control"))
    });
    if !arms.iter().any(|(a, _)| *a == control) {
        arms.insert(0, (control.clone(), 1.0));
    }
    (arms, control)
}

/// The running inference of `key` after a look at `e` (a look without variance says nothing:
/// its interval would be a point and the running intersection would stay one).
fn infer(
    tracked: &mut Tracked,
    key: (Label, Label, bool),
    test: &Sequential,
    e: &effect::Effect,
) -> Inference {
    let mut run = tracked.running_mut(key.clone());
    if informative(e.se) {
        run.look(
            test.p_value(e.estimate, e.se, e.n, 0.0),
            test.interval(e.estimate, e.se, e.n),
        );
    }
    tracked.set_running(key, &run);
    Inference {
        estimate: e.estimate,
        interval: run.interval,
        p_value: run.p_value,
        drift: run.disjoint,
    }
}

/// The running inference of the absolute effect `d` of `metric` in `arm`, noted in `effects`
/// for the guardrails.
fn absolute_effect(
    tracked: &mut Tracked,
    effects: &mut BTreeMap<(Label, Label), effect::Effect>,
    metric: &Label,
    arm: &Label,
    test: &Sequential,
    d: effect::Effect,
) -> Inference {
    effects.insert((metric.clone(), arm.clone()), d);
    infer(tracked, (metric.clone(), arm.clone(), false), test, &d)
}

/// One arm's figures for one metric at a look, before its row is made.
struct ArmFigures {
    units: i64,
    mean: f64,
    variance: f64,
    absolute: Option<Inference>,
    relative: Option<Inference>,
    quantile: Option<QuantileFigures>,
    cuped: Option<CupedFigures>,
}

/// The figures of a unit-level metric (a mean, or a ratio) in every arm; the absolute effects
/// go to `effects` for the guardrails.
fn unit_level(
    tracked: &mut Tracked,
    metric: &Label,
    shape: Shape,
    arms: &[(Label, f64)],
    control: &Label,
    test: &Sequential,
    effects: &mut BTreeMap<(Label, Label), effect::Effect>,
) -> Vec<ArmFigures> {
    let Shape { ratio, phases } = shape;
    let as_metric = |m: Moments| -> Summary {
        let s = m.summary();
        if ratio {
            effect::ratio_summary(&s).unwrap_or(Summary {
                n: s.n,
                ..Summary::default()
            })
        } else {
            s
        }
    };
    let summary = |t: &Tracked, arm: &Label| as_metric(t.sum(metric, arm));
    // Per rollout phase, the arm's and the control's summaries.
    let strata = |t: &Tracked, arm: &Label| -> Vec<(Summary, Summary)> {
        let of = |phase: usize, arm: &Label| {
            let key = (phase as u8, arm.clone());
            as_metric(
                t.strata
                    .get(metric)
                    .and_then(|s| s.get(&key))
                    .copied()
                    .unwrap_or_default(),
            )
        };
        (0..phases).map(|k| (of(k, arm), of(k, control))).collect()
    };
    let c = summary(tracked, control);
    let mut out = Vec::new();
    for (arm, _) in arms {
        let s = summary(tracked, arm);
        let (mut absolute, mut relative) = (None, None);
        if arm != control && phases > 0 {
            // Post-stratified over the phases: the pooled means mix the phases' drift in.
            if let Some((d, r)) = effect::stratified(&strata(tracked, arm)) {
                absolute = Some(absolute_effect(tracked, effects, metric, arm, test, d));
                if let Some(r) = r.filter(|_| effect::relative_allowed(&c, test)) {
                    relative = Some(infer(
                        tracked,
                        (metric.clone(), arm.clone(), true),
                        test,
                        &r,
                    ));
                }
            }
        } else if arm != control {
            if let Some(d) = effect::absolute(&s, &c) {
                absolute = Some(absolute_effect(tracked, effects, metric, arm, test, d));
            }
            if let Some(r) = effect::relative(&s, &c).filter(|_| effect::relative_allowed(&c, test))
            {
                relative = Some(infer(
                    tracked,
                    (metric.clone(), arm.clone(), true),
                    test,
                    &r,
                ));
            }
        }
        // (CUPED on pooled sums would carry the phases' drift: not with phases.)
        let cuped = if ratio || phases > 0 {
            None
        } else {
            cuped_figures(tracked, metric, arm, arms, control, test)
        };
        out.push(ArmFigures {
            units: s.n,
            mean: s.mean_y,
            variance: s.var_y,
            absolute,
            relative,
            quantile: None,
            cuped,
        });
    }
    out
}

/// How a unit-level metric is analysed.
#[derive(Clone, Copy)]
struct Shape {
    /// A ratio of per-unit sums.
    ratio: bool,
    /// Rollout phases to stratify over (0: none).
    phases: usize,
}

/// CUPED's figures of `metric` in `arm`: θ pooled over the arm and control (over every arm
/// for the control's row), the adjusted mean and, for a treatment arm, the adjusted absolute
/// and relative effects with their own running always-valid inference. `None` below
/// [`effect::CUPED_MIN_UNITS`] units with pre-exposure data (the unadjusted figures stand).
fn cuped_figures(
    tracked: &mut Tracked,
    metric: &Label,
    arm: &Label,
    arms: &[(Label, f64)],
    control: &Label,
    test: &Sequential,
) -> Option<CupedFigures> {
    let (t, c) = (tracked.sum(metric, arm), tracked.sum(metric, control));
    let pooled = if arm == control {
        arms.iter()
            .filter(|(a, _)| a != control)
            .fold(Moments::default(), |m, (a, _)| {
                m.plus(&tracked.sum(metric, a))
            })
    } else {
        t
    };
    let theta = effect::theta(&pooled, &c)?;
    let (ts, cs) = (t.summary(), c.summary());
    let key = |relative: bool| {
        (
            Label::from(format!("{metric}#cuped").as_str()),
            arm.clone(),
            relative,
        )
    };
    let (mut absolute, mut relative) = (None, None);
    if arm != control {
        if let Some(d) = effect::cuped_absolute(&ts, &cs, theta) {
            absolute = Some(infer(tracked, key(false), test, &d));
        }
        if let Some(r) =
            effect::cuped_relative(&ts, &cs, theta).filter(|_| effect::relative_allowed(&cs, test))
        {
            relative = Some(infer(tracked, key(true), test, &r));
        }
    }
    Some(CupedFigures {
        theta,
        units_with_pre: ts.n_pre,
        mean: effect::adjusted_mean(&ts, theta),
        absolute,
        relative,
    })
}

/// The figures of an event-level latency metric in every arm: the quantile's difference
/// against control with its always-valid interval (the quantile's standard error from the
/// outer interval with the cluster-robust rank spread; `n` the units of both arms), the
/// relative difference when the control's quantile is away from 0, and Mann-Whitney.
fn latency_level(
    tracked: &mut Tracked,
    metric: &Label,
    arms: &[(Label, f64)],
    control: &Label,
    test: &Sequential,
    effects: &mut BTreeMap<(Label, Label), effect::Effect>,
) -> Vec<ArmFigures> {
    let Some(samples) = tracked.samples.get(metric).cloned() else {
        return Vec::new();
    };
    let q = samples.quantile();
    let empty = LatencyHistogram::default();
    let histogram = |arm: &Label| samples.arms.get(arm).unwrap_or(&empty);
    let quantile_of = |arm: &Label| {
        rank::quantile_clustered(
            &buckets_ms(histogram(arm)),
            q,
            test.alpha,
            samples.rank_sd.get(arm).copied(),
        )
    };
    let pairs = |h: &LatencyHistogram| -> Vec<(i64, i64)> {
        h.buckets.iter().map(|&(b, n)| (i64::from(b), n)).collect()
    };
    let exposed = tracked.exposed.clone();
    let units = |arm: &Label| exposed.get(arm).copied().unwrap_or(0);
    let c = quantile_of(control);
    let c_pairs = pairs(histogram(control));
    let z = sightline_stats::dist::normal_quantile(1.0 - test.alpha / 2.0);
    let mut out = Vec::new();
    for (arm, _) in arms {
        let h = histogram(arm);
        let t = quantile_of(arm);
        let n = (units(arm) + units(control)) as f64;
        let (mut absolute, mut relative, mut auc, mut mw_p) = (None, None, None, None);
        if arm != control {
            if let (Some(t), Some(c)) = (t, c) {
                let d = effect::Effect {
                    estimate: t.estimate - c.estimate,
                    se: (t.sigma * t.sigma + c.sigma * c.sigma).sqrt(),
                    n,
                };
                absolute = Some(absolute_effect(tracked, effects, metric, arm, test, d));
                if c.estimate - z * c.sigma > 0.0 {
                    let (ct, cc) = (t.estimate, c.estimate);
                    let r = effect::Effect {
                        estimate: (ct - cc) / cc,
                        se: (t.sigma * t.sigma / (cc * cc)
                            + ct * ct * c.sigma * c.sigma / cc.powi(4))
                        .sqrt(),
                        n,
                    };
                    relative = Some(infer(
                        tracked,
                        (metric.clone(), arm.clone(), true),
                        test,
                        &r,
                    ));
                }
            }
            if let Some(m) = rank::mann_whitney(&pairs(h), &c_pairs) {
                auc = Some(m.auc);
                mw_p = Some(m.p_value);
            }
        }
        // The events' latency: the mean is exact, the variance at bucket resolution.
        let count = h.count as f64;
        let mean = h.mean_us().unwrap_or(0.0) / 1000.0;
        let second: f64 = h
            .buckets
            .iter()
            .map(|&(b, k)| {
                let v = crate::histogram::bucket_value(b) / 1000.0;
                k as f64 * v * v
            })
            .sum();
        let variance = if count > 1.0 {
            ((second - count * mean * mean) / (count - 1.0)).max(0.0)
        } else {
            0.0
        };
        out.push(ArmFigures {
            units: units(arm),
            mean,
            variance,
            absolute,
            relative,
            cuped: None,
            quantile: Some(QuantileFigures {
                q,
                value_ms: t.map(|t| t.estimate),
                samples: h.count,
                auc,
                mann_whitney_p_value: mw_p,
            }),
        });
    }
    out
}

/// One look at an experiment at the end of window `[start, end)`: its rows and, at the end of a
/// sampling interval, its decisions. `metrics` are its definitions (to tell ratios apart).
#[allow(clippy::too_many_arguments)]
pub fn look(
    id: &Label,
    tracked: &mut Tracked,
    analysis: &Analysis,
    metrics: &[Metric],
    start: u64,
    end: u64,
    rows: &mut Vec<ResultRow>,
    decided: &mut Vec<Decision>,
) {
    let Some(first) = tracked.first_window else {
        return;
    };
    let (arms, control) = arms_of(tracked, analysis);
    let unit_metrics: Vec<Label> = tracked.sums.keys().cloned().collect();
    let latency_metrics: Vec<Label> = tracked.samples.keys().cloned().collect();
    // Units per arm: the units analysed (before exposures were counted apart, any metric's n).
    let units: Vec<(Label, i64)> = arms
        .iter()
        .map(|(arm, _)| {
            let n = match tracked.exposed.get(arm) {
                Some(n) => *n,
                None if tracked.exposed.is_empty() => {
                    unit_metrics.first().map_or(0, |m| tracked.sum(m, arm).n)
                }
                None => 0,
            };
            (arm.clone(), n)
        })
        .collect();
    let counts: Vec<i64> = units.iter().map(|u| u.1).collect();
    let weights: Vec<f64> = arms.iter().map(|a| a.1).collect();
    // With rollout phases, each phase is tested against its own planned weights.
    let srm = if analysis.phases.is_empty() {
        srm_p_value(&counts, &weights)
    } else {
        let strata: Vec<(Vec<i64>, Vec<f64>)> = analysis
            .phases
            .iter()
            .enumerate()
            .map(|(k, planned)| {
                let phase = k.min(usize::from(u8::MAX)) as u8;
                let n = |arm: &Label| {
                    let key = (phase, arm.clone());
                    tracked.exposed_strata.get(&key).copied().unwrap_or(0)
                };
                (
                    planned.iter().map(|(arm, _)| n(arm)).collect(),
                    planned.iter().map(|(_, w)| *w).collect(),
                )
            })
            .collect();
        srm_p_value_stratified(&strata)
    };
    tracked.unhealthy = srm < SRM_THRESHOLD;
    let test = analysis.test;
    let width = end - start;
    let interval_end = analysis.interval_windows.max(1) * width;
    // A look decides when a sampling interval has ended since the last decision (looks happen
    // only at windows with data, so that every output depends on the data alone, never on how
    // far an idle watermark moved); the epoch is the newest interval ended.
    let intervals = (end - first) / interval_end;
    let at_interval = intervals > tracked.intervals_decided;
    let epoch = intervals.saturating_sub(1);
    let mut effects: BTreeMap<(Label, Label), effect::Effect> = BTreeMap::new();
    let is_ratio = |name: &Label| metrics.iter().any(|m| m.name == *name && m.is_ratio());
    let mut figures: Vec<(Label, Vec<ArmFigures>)> = Vec::new();
    let phases = analysis.phases.len();
    for metric in &unit_metrics {
        let ratio = is_ratio(metric);
        let shape = Shape { ratio, phases };
        let f = unit_level(tracked, metric, shape, &arms, &control, &test, &mut effects);
        figures.push((metric.clone(), f));
    }
    for metric in &latency_metrics {
        let f = latency_level(tracked, metric, &arms, &control, &test, &mut effects);
        figures.push((metric.clone(), f));
    }
    for (metric, per_arm) in figures {
        for ((arm, _), f) in arms.iter().zip(per_arm) {
            let state = if tracked.killed {
                ResultState::Killed
            } else if tracked.unhealthy {
                ResultState::Unhealthy
            } else if tracked.was_breached(&(metric.clone(), arm.clone())) {
                ResultState::Breach
            } else {
                match f.absolute {
                    Some(a) if a.p_value < test.alpha && a.estimate > 0.0 => {
                        ResultState::SignificantPositive
                    }
                    Some(a) if a.p_value < test.alpha => ResultState::SignificantNegative,
                    _ => ResultState::Running,
                }
            };
            rows.push(ResultRow {
                experiment: id.clone(),
                metric: metric.clone(),
                arm: arm.clone(),
                control: *arm == control,
                units: f.units,
                mean: f.mean,
                variance: f.variance,
                absolute: f.absolute,
                relative: f.relative,
                srm_p_value: srm,
                state,
                quantile: f.quantile,
                cuped: f.cuped,
                phases: if f.quantile.is_some() {
                    0
                } else {
                    phases as u32
                },
            });
        }
    }
    if !at_interval {
        return;
    }
    tracked.intervals_decided = intervals;
    let units_ok = counts.iter().all(|n| *n >= analysis.min_units);
    let srm_ok = !tracked.unhealthy;
    for (arm, _) in arms.iter().filter(|(a, _)| *a != control) {
        let confident = analysis.primary.as_ref().is_some_and(|p| {
            let r = tracked.running_mut((p.clone(), arm.clone(), false));
            r.p_value < test.alpha && r.interval.lo > 0.0
        });
        let rules: Vec<Option<&Guardrail>> = if analysis.guardrails.is_empty() {
            vec![None]
        } else {
            analysis.guardrails.iter().map(Some).collect()
        };
        for guardrail in rules {
            let (rule, d, breach, bound) = match guardrail {
                Some(g) => {
                    let d = effects.get(&(g.metric.clone(), arm.clone())).copied();
                    let breach = d.is_some_and(|d| breached(&d, &test, g.margin, g.harm));
                    let bound = d.map(|d| {
                        let direction = match g.harm {
                            Harm::Increase => sightline_stats::sequential::Direction::Greater,
                            Harm::Decrease => sightline_stats::sequential::Direction::Less,
                        };
                        let i = test.one_sided(d.estimate, d.se, d.n, direction);
                        if g.harm == Harm::Increase { i.lo } else { i.hi }
                    });
                    tracked.set_breached((g.metric.clone(), arm.clone()), breach);
                    (g.metric.clone(), d, breach, bound)
                }
                None => (Label::from("rollout"), None, false, None),
            };
            let persistence = tracked.persistence_mut((rule.clone(), arm.clone()));
            let action = persistence.decide(
                Evidence {
                    breached: breach,
                    units_ok,
                    srm_ok,
                    confident,
                },
                analysis.srm_kills,
            );
            let breached_intervals = persistence.breached_intervals;
            if action == Action::Kill {
                tracked.killed = true;
            }
            decided.push(Decision {
                experiment: id.clone(),
                rule,
                epoch,
                action,
                arm: arm.clone(),
                estimate: d.map(|d| d.estimate),
                bound,
                alpha: test.alpha,
                n_star: test.n_star,
                units: units.clone(),
                breached_intervals,
                srm_p_value: srm,
                watermark_ms: end,
                config_version: analysis.version,
            });
        }
    }
}
