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
use sightline_stats::Moments;
use sightline_stats::effect;
use sightline_stats::guardrail::{Action, Evidence, Harm, Persistence, breached};
use sightline_stats::sequential::{Interval, Running, Sequential};
use sightline_stats::srm::{SRM_THRESHOLD, srm_p_value};

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

/// One look at an experiment at the end of window `[start, end)`: its rows and, at the end of a
/// sampling interval, its decisions.
pub fn look(
    id: &Label,
    tracked: &mut Tracked,
    analysis: &Analysis,
    start: u64,
    end: u64,
    rows: &mut Vec<ResultRow>,
    decided: &mut Vec<Decision>,
) {
    let Some(first) = tracked.first_window else {
        return;
    };
    let (arms, control) = arms_of(tracked, analysis);
    let metrics: Vec<Label> = tracked.sums.keys().cloned().collect();
    // Units per arm: every exposed unit contributes to every metric, so any metric's n.
    let units: Vec<(Label, i64)> = arms
        .iter()
        .map(|(arm, _)| {
            let n = metrics.first().map_or(0, |m| tracked.sum(m, arm).n);
            (arm.clone(), n)
        })
        .collect();
    let counts: Vec<i64> = units.iter().map(|u| u.1).collect();
    let weights: Vec<f64> = arms.iter().map(|a| a.1).collect();
    let srm = srm_p_value(&counts, &weights);
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
    for metric in &metrics {
        let c = tracked.sum(metric, &control).summary();
        for (arm, _) in &arms {
            let s = tracked.sum(metric, arm).summary();
            let is_control = *arm == control;
            let (mut absolute, mut relative) = (None, None);
            if !is_control {
                if let Some(d) = effect::absolute(&s, &c) {
                    effects.insert((metric.clone(), arm.clone()), d);
                    let key = (metric.clone(), arm.clone(), false);
                    let mut run = tracked.running_mut(key.clone());
                    // A look without variance (every unit alike so far) says nothing: its
                    // interval would be a point and the running intersection would stay one.
                    if informative(d.se) {
                        run.look(
                            test.p_value(d.estimate, d.se, d.n, 0.0),
                            test.interval(d.estimate, d.se, d.n),
                        );
                    }
                    tracked.set_running(key, &run);
                    absolute = Some(Inference {
                        estimate: d.estimate,
                        interval: run.interval,
                        p_value: run.p_value,
                    });
                }
                if let Some(r) =
                    effect::relative(&s, &c).filter(|_| effect::relative_allowed(&c, &test))
                {
                    let key = (metric.clone(), arm.clone(), true);
                    let mut run = tracked.running_mut(key.clone());
                    if informative(r.se) {
                        run.look(
                            test.p_value(r.estimate, r.se, r.n, 0.0),
                            test.interval(r.estimate, r.se, r.n),
                        );
                    }
                    tracked.set_running(key, &run);
                    relative = Some(Inference {
                        estimate: r.estimate,
                        interval: run.interval,
                        p_value: run.p_value,
                    });
                }
            }
            let state = if tracked.killed {
                ResultState::Killed
            } else if tracked.unhealthy {
                ResultState::Unhealthy
            } else if tracked.was_breached(&(metric.clone(), arm.clone())) {
                ResultState::Breach
            } else {
                match absolute {
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
                control: is_control,
                units: s.n,
                mean: s.mean_y,
                variance: s.var_y,
                absolute,
                relative,
                srm_p_value: srm,
                state,
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
