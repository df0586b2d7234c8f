//! Experiments in the stream, second half: the results at every closed window (cumulative
//! since the experiment's start), and the guardrail decisions at every sampling interval.
//!
//! The input is the per-arm statistics collection of [`super::experiments`]. The operator
//! applies its updates in time order once the frontier has passed them and, when the frontier
//! passes a window's end, computes every result from the sums as they were at that end with
//! `sightline-stats`: per metric and arm, units, mean and variance; per treatment arm, the
//! absolute and relative effects against control with their always-valid intervals and
//! p-values (kept monotone over looks: running minimum of p, running intersection of
//! intervals); the SRM p-value of the experiment; and the state. Every `interval_windows`
//! windows, each guardrail is evaluated and a decision (`kill`, `hold`, `advance`) is
//! emitted, keyed by experiment, rule and decision epoch, so that a replay yields the same keys.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sightline_schemas::Label;
use sightline_stats::Moments;
use sightline_stats::effect;
use sightline_stats::guardrail::{Action, Evidence, Harm, Persistence, breached};
use sightline_stats::sequential::{Interval, Running, Sequential};
use sightline_stats::srm::{SRM_THRESHOLD, srm_p_value};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;

use super::ArmKey;
use crate::close::ClosedWindow;
use crate::state::{Pending, input_frontier};
use crate::window::{Time, Windows};

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
    /// `running`, `significant_positive`, `significant_negative`, `breach`, `killed` or
    /// `unhealthy`.
    pub state: &'static str,
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

/// The operator's outputs: result rows per window, decisions per window.
pub struct Results<'s> {
    /// `experiment_results` rows, one closed window each.
    pub results: StreamVec<'s, Time, ClosedWindow<ResultRow, isize>>,
    /// Guardrail decisions, one closed window each (the windows that end a sampling interval).
    pub decisions: StreamVec<'s, Time, ClosedWindow<Decision, isize>>,
}

/// What the operator keeps per experiment.
#[derive(Default)]
struct Tracked {
    /// Cumulative sums per (metric, arm).
    sums: BTreeMap<(Label, Label), Moments>,
    /// The first window with data.
    first_window: Option<u64>,
    /// Running inference per (metric, arm, relative?).
    running: BTreeMap<(Label, Label, bool), Running>,
    /// Persistence per (guardrail metric, arm).
    persistence: BTreeMap<(Label, Label), Persistence>,
    /// Breached at the last interval, per (metric, arm).
    breached: BTreeMap<(Label, Label), bool>,
    killed: bool,
    unhealthy: bool,
}

/// Results and decisions of the experiments in `stats`, analysed as `analyses` says (an
/// experiment without an entry gets [`Analysis::default`]).
pub fn results<'s>(
    stats: differential_dataflow::VecCollection<'s, Time, ArmKey, Moments>,
    analyses: Arc<BTreeMap<Label, Analysis>>,
    windows: Windows,
) -> Results<'s> {
    let scope = stats.inner.scope();
    let worker = scope.index();
    let mut builder = OperatorBuilder::new("ExperimentResults".to_owned(), scope);
    let to_first = Exchange::new(|_: &(ArmKey, Time, Moments)| 0u64);
    let mut input = builder.new_input(stats.inner, to_first);
    let (results_out, results) = builder.new_output::<Vec<ClosedWindow<ResultRow, isize>>>();
    let (decisions_out, decisions) = builder.new_output::<Vec<ClosedWindow<Decision, isize>>>();
    let mut results_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(results_out);
    let mut decisions_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(decisions_out);
    builder.build(move |_| {
        let mut pending: Pending<(ArmKey, Moments)> = Pending::default();
        let mut experiments: BTreeMap<Label, Tracked> = BTreeMap::new();
        // The capability to emit the next window's rows (one per output).
        let mut caps: Option<(Capability<Time>, Capability<Time>)> = None;
        // The next window to emit.
        let mut next_start: Option<u64> = None;
        let mut last_data: u64 = 0;
        move |frontiers| {
            let mut results_out = results_out.activate();
            let mut decisions_out = decisions_out.activate();
            input.for_each(|cap, data| {
                for (key, time, m) in data.drain(..) {
                    let start = windows.start_of(time);
                    // Hold the capability of the earliest window with data.
                    let at = windows.end_of(start) - 1;
                    if caps.as_ref().is_none_or(|(c, _)| *c.time() > at) {
                        caps = Some((cap.delayed(&at, 0), cap.delayed(&at, 1)));
                    }
                    next_start = Some(next_start.map_or(start, |s: u64| s.min(start)));
                    last_data = last_data.max(time);
                    pending.add(time, (key, m), 1);
                }
            });
            if worker != 0 {
                caps = None;
                return;
            }
            let frontier = input_frontier(frontiers);
            let Some(mut start) = next_start else {
                return;
            };
            loop {
                let end = windows.end_of(start);
                // A window is final once the frontier has passed its end; when the input is
                // finished, windows after the last data are not emitted.
                if end > frontier || (frontier == Time::MAX && start > last_data) {
                    break;
                }
                for (key, m) in pending.take_before(end, |(k, _)| k.clone()) {
                    let tracked = experiments.entry(key.experiment.clone()).or_default();
                    tracked.first_window.get_or_insert(start);
                    let sum = tracked.sums.entry((key.metric, key.arm)).or_default();
                    *sum = sum.plus(&m);
                }
                let (mut rows, mut decided) = (Vec::new(), Vec::new());
                for (id, tracked) in experiments.iter_mut() {
                    let default = Analysis::default();
                    let analysis = analyses.get(id).unwrap_or(&default);
                    look(id, tracked, analysis, start, end, &mut rows, &mut decided);
                }
                if let Some((rc, dc)) = caps.as_mut() {
                    let at = end - 1;
                    rc.downgrade(&at);
                    dc.downgrade(&at);
                    if !rows.is_empty() {
                        results_out.session(rc).give(ClosedWindow {
                            window_start_ms: start,
                            window_end_ms: end,
                            entries: rows.into_iter().map(|r| (r, 1)).collect(),
                        });
                    }
                    if !decided.is_empty() {
                        decisions_out.session(dc).give(ClosedWindow {
                            window_start_ms: start,
                            window_end_ms: end,
                            entries: decided.into_iter().map(|d| (d, 1)).collect(),
                        });
                    }
                }
                start = end;
            }
            next_start = Some(start);
            if frontier == Time::MAX {
                caps = None;
            } else if let Some((rc, dc)) = caps.as_mut() {
                let at = windows.end_of(start) - 1;
                rc.downgrade(&at);
                dc.downgrade(&at);
            }
        }
    });
    Results { results, decisions }
}

/// The arms of an experiment in the order of its analysis (or sorted), with the control.
fn arms_of(tracked: &Tracked, analysis: &Analysis) -> (Vec<(Label, f64)>, Label) {
    let mut arms: Vec<(Label, f64)> = if analysis.arms.is_empty() {
        let mut seen: Vec<Label> = tracked.sums.keys().map(|(_, a)| a.clone()).collect();
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
fn look(
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
    let metrics: Vec<Label> = {
        let mut m: Vec<Label> = tracked.sums.keys().map(|(m, _)| m.clone()).collect();
        m.dedup();
        m
    };
    // Units per arm: every exposed unit contributes to every metric, so any metric's n.
    let units: Vec<(Label, i64)> = arms
        .iter()
        .map(|(arm, _)| {
            let n = metrics
                .first()
                .and_then(|m| tracked.sums.get(&(m.clone(), arm.clone())))
                .map_or(0, |s| s.n);
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
    let at_interval = (end - first).is_multiple_of(interval_end);
    let epoch = (end - first) / interval_end - 1;
    let mut effects: BTreeMap<(Label, Label), effect::Effect> = BTreeMap::new();
    for metric in &metrics {
        let summary = |arm: &Label| {
            tracked
                .sums
                .get(&(metric.clone(), arm.clone()))
                .copied()
                .unwrap_or_default()
                .summary()
        };
        let c = summary(&control);
        for (arm, _) in &arms {
            let s = summary(arm);
            let is_control = *arm == control;
            let (mut absolute, mut relative) = (None, None);
            if !is_control {
                if let Some(d) = effect::absolute(&s, &c) {
                    effects.insert((metric.clone(), arm.clone()), d);
                    let run = tracked
                        .running
                        .entry((metric.clone(), arm.clone(), false))
                        .or_default();
                    run.look(
                        test.p_value(d.estimate, d.se, d.n, 0.0),
                        test.interval(d.estimate, d.se, d.n),
                    );
                    absolute = Some(Inference {
                        estimate: d.estimate,
                        interval: run.interval,
                        p_value: run.p_value,
                    });
                }
                if let Some(r) =
                    effect::relative(&s, &c).filter(|_| effect::relative_allowed(&c, &test))
                {
                    let run = tracked
                        .running
                        .entry((metric.clone(), arm.clone(), true))
                        .or_default();
                    run.look(
                        test.p_value(r.estimate, r.se, r.n, 0.0),
                        test.interval(r.estimate, r.se, r.n),
                    );
                    relative = Some(Inference {
                        estimate: r.estimate,
                        interval: run.interval,
                        p_value: run.p_value,
                    });
                }
            }
            let state = if tracked.killed {
                "killed"
            } else if tracked.unhealthy {
                "unhealthy"
            } else if tracked
                .breached
                .get(&(metric.clone(), arm.clone()))
                .copied()
                .unwrap_or(false)
            {
                "breach"
            } else {
                match absolute {
                    Some(a) if a.p_value < test.alpha && a.estimate > 0.0 => "significant_positive",
                    Some(a) if a.p_value < test.alpha => "significant_negative",
                    _ => "running",
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
    let units_ok = counts.iter().all(|n| *n >= analysis.min_units);
    let srm_ok = !tracked.unhealthy;
    for (arm, _) in arms.iter().filter(|(a, _)| *a != control) {
        let confident = analysis.primary.as_ref().is_some_and(|p| {
            tracked
                .running
                .get(&(p.clone(), arm.clone(), false))
                .is_some_and(|r| r.p_value < test.alpha && r.interval.lo > 0.0)
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
                    tracked
                        .breached
                        .insert((g.metric.clone(), arm.clone()), breach);
                    (g.metric.clone(), d, breach, bound)
                }
                None => (Label::from("rollout"), None, false, None),
            };
            let persistence = tracked
                .persistence
                .entry((rule.clone(), arm.clone()))
                .or_default();
            let action = persistence.decide(
                Evidence {
                    breached: breach,
                    units_ok,
                    srm_ok,
                    confident,
                },
                analysis.srm_kills,
            );
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
                breached_intervals: persistence.breached_intervals,
                srm_p_value: srm,
                watermark_ms: end,
                config_version: analysis.version,
            });
        }
    }
}
