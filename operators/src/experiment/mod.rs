//! Experiments in the stream, first half: each unit's exposure and metric values, and the
//! per-arm sufficient statistics ([`Moments`]) as a differential collection.
//!
//! **Units and exposure.** The unit is the pair (`tenant_id`, `user_id`), followed by their
//! links ([`sightline_schemas::Links`]) so that it survives the pseudonyms' rotation like a
//! funnel's unit. A unit is exposed to an experiment at its first event, in sequence order
//! (event time, then a hash of the event id), that carries the experiment in its
//! `experiment_assignments`; its arm is the variant there. A unit seen later in another arm is
//! a *multiple exposure*: its contribution is retracted from the analysis and it is counted
//! apart. Restricted events are not analysed (they are counted by the compliance check, which
//! comes with the experiment configuration).
//!
//! **Metrics.** Per unit, since its exposure (the exposing event included): the number of
//! events of a name ([`MetricKind::Count`]), the sum of a kept measure over events of a name
//! ([`MetricKind::Sum`]), or whether an event of a name happened within a time after exposure
//! ([`MetricKind::Conversion`], 0 or 1). Values are fixed point, so sums are exact.
//!
//! **The collection.** When a unit's value changes, its old contribution
//! `Moments::unit(old)` is retracted and its new one added, at the time of the event that
//! changed it: the collection's accumulation at any time is the per-arm sums of the units as
//! of that time, exactly, whatever the arrival order or the number of workers. Exposures
//! are a second collection, counted in the window of the exposing event.
//!
//! **Results.** The same operator applies its input window by window, once the frontier has
//! passed a window's end, in sequence order ([`crate::state::Pending`]); it adds every update of
//! the collection to the experiment's cumulative sums and then looks at them
//! ([`results::look`]): result rows at every window in which the experiment had an update,
//! guardrail decisions at the first such window after each sampling interval has ended. (Looks
//! never happen in windows without data: every output depends on the data alone, not on how
//! far an idle watermark moved.) One operator holds both halves so that one snapshot covers them: saved state
//! (units, sums, looks) is as of one frontier, like the funnels'. It runs on worker 0. A
//! unit's state lives as long as the experiment (a few dozen bytes per unit and experiment).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use sightline_schemas::{Event, EventName, Label};
use sightline_stats::Moments;
use smallvec::SmallVec;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::vec::Map;

pub mod results;

pub use results::{
    Analysis, CupedFigures, Decision, Guardrail, Inference, QuantileFigures, ResultRow,
    ResultState, Samples, Tracked,
};

use crate::alerts::Alert;
use crate::close::ClosedWindow;
use crate::funnel::Resume;
use crate::funnel::fnv1a;
use crate::histogram::LatencyHistogram;
use crate::state::{Pending, Schedule, StateHooks, StateShard, input_frontier};
use crate::window::{Time, Windows};

/// Fixed-point scale of metric values (millionths), as [`sightline_stats::moments::SCALE`].
const ONE: i64 = 1_000_000;

/// What a metric measures per unit since exposure.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricKind {
    /// The number of events named `event`.
    Count {
        /// The event counted.
        event: EventName,
    },
    /// The sum of the kept measure `field` over events named `event`.
    Sum {
        /// The event.
        event: EventName,
        /// Its kept measure.
        field: Label,
    },
    /// The number of error events (every event whose type is `error`).
    Errors,
    /// 1 when an event named `event` happened within `within_ms` after exposure, else 0.
    Conversion {
        /// The converting event.
        event: EventName,
        /// How long after exposure it counts, ms.
        within_ms: u64,
    },
    /// An event-level quantile of the latency measure of events named `event` (every such
    /// event of an exposed unit since its exposure is one sample of its arm's histogram).
    Latency {
        /// The event whose latency measure is read.
        event: EventName,
        /// The quantile in thousandths (950: p95).
        permille: u16,
    },
    /// The ratio of two unit-level metrics of the same experiment (for example error events
    /// ÷ all events), each unit contributing its numerator and denominator: the ratio of the
    /// arm's sums, with a delta-method variance.
    Ratio {
        /// Index of the numerator in the experiment's metrics.
        numerator: usize,
        /// Index of the denominator.
        denominator: usize,
    },
    /// The number of events per unit (every event the unit emits since exposure).
    Events,
    /// The share of the units that performed `entry` and not `goal` within `within_ms` after
    /// exposure, among the units that performed `entry` (a ratio: abandoned ÷ entered).
    Abandonment {
        /// The funnel's first step.
        entry: EventName,
        /// Its last step.
        goal: EventName,
        /// How long after exposure the goal counts, ms.
        within_ms: u64,
    },
    /// Support tickets per unit: its critical feedback, by the triage rules.
    Tickets {
        /// What makes feedback critical.
        rules: crate::triage::TriageRules,
    },
}

/// A metric of an experiment.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    /// Its name, a column value.
    pub name: Label,
    /// What it measures.
    pub kind: MetricKind,
}

impl Metric {
    /// Whether the metric reads events named `name`.
    pub fn reads(&self, name: EventName) -> bool {
        match &self.kind {
            MetricKind::Count { event }
            | MetricKind::Sum { event, .. }
            | MetricKind::Latency { event, .. }
            | MetricKind::Conversion { event, .. } => *event == name,
            MetricKind::Errors => name.spec().event_type == sightline_schemas::EventType::Error,
            MetricKind::Events => true,
            MetricKind::Abandonment { entry, goal, .. } => *entry == name || *goal == name,
            MetricKind::Tickets { .. } => name.as_str() == "feedback_submitted",
            // Its parts read for it.
            MetricKind::Ratio { .. } => false,
        }
    }

    /// The quantile of an event-level latency metric.
    pub fn quantile(&self) -> Option<f64> {
        match self.kind {
            MetricKind::Latency { permille, .. } => Some(f64::from(permille) / 1000.0),
            _ => None,
        }
    }

    /// Whether per-unit values of the metric go to the per-arm [`Moments`] (all but the
    /// event-level latency metrics).
    fn is_unit_level(&self) -> bool {
        !matches!(self.kind, MetricKind::Latency { .. })
    }

    /// Whether the metric is a ratio of per-unit sums (its rows and effects are those of the
    /// ratio, by the delta method).
    pub fn is_ratio(&self) -> bool {
        matches!(
            self.kind,
            MetricKind::Ratio { .. } | MetricKind::Abandonment { .. }
        )
    }

    /// The unit's contribution to the per-arm sums, from its values of every metric and, for
    /// CUPED, its pre-exposure covariate `x` (`None`: no pre-exposure data).
    fn moments(&self, values: &[i64], own: i64, x: Option<i64>) -> Moments {
        match self.kind {
            // Not entered: (0, 0); entered: (1, 1); converted: (0, 1).
            MetricKind::Abandonment { .. } => match own {
                0 => Moments::unit(0, Some(0)),
                ONE => Moments::unit(ONE, Some(ONE)),
                _ => Moments::unit(0, Some(ONE)),
            },
            MetricKind::Ratio {
                numerator,
                denominator,
            } => Moments::unit(
                values.get(numerator).copied().unwrap_or(0),
                Some(values.get(denominator).copied().unwrap_or(0)),
            ),
            _ => Moments::unit(own, x),
        }
    }

    /// What `event` adds to the metric's pre-exposure covariate: the metric's own increment
    /// (an occurrence, for a conversion); 0 for metrics without a covariate.
    fn pre_increment(&self, event: &Event) -> i64 {
        match &self.kind {
            MetricKind::Conversion { event: name, .. } if event.event_name == *name => ONE,
            MetricKind::Count { .. }
            | MetricKind::Sum { .. }
            | MetricKind::Errors
            | MetricKind::Events
            | MetricKind::Tickets { .. } => self.apply(0, event, 0, 0),
            _ => 0,
        }
    }

    /// Whether the metric has a CUPED covariate: the same metric before exposure (not for
    /// ratios, abandonment and latency, whose covariate slot is taken or meaningless).
    fn has_covariate(&self) -> bool {
        matches!(
            self.kind,
            MetricKind::Count { .. }
                | MetricKind::Sum { .. }
                | MetricKind::Errors
                | MetricKind::Events
                | MetricKind::Tickets { .. }
                | MetricKind::Conversion { .. }
        )
    }

    /// The value `event` adds to a unit whose value is `value`, exposed at `exposed_at`.
    fn apply(&self, value: i64, event: &Event, at_ms: u64, exposed_at: u64) -> i64 {
        match &self.kind {
            MetricKind::Count { event: name } if event.event_name == *name => value + ONE,
            MetricKind::Errors if event.event_type == sightline_schemas::EventType::Error => {
                value + ONE
            }
            MetricKind::Sum { event: name, field } if event.event_name == *name => {
                value
                    + event
                        .kept
                        .get(field)
                        .and_then(|v| match v {
                            sightline_schemas::KeptValue::Measure(m) => Some(m.0),
                            _ => None,
                        })
                        .unwrap_or(0)
            }
            MetricKind::Conversion {
                event: name,
                within_ms,
            } if event.event_name == *name && at_ms <= exposed_at + within_ms => ONE,
            MetricKind::Events => value + ONE,
            MetricKind::Tickets { rules } if rules.is_critical(event) => value + ONE,
            MetricKind::Abandonment {
                entry,
                goal,
                within_ms,
            } => {
                if value == 0 && event.event_name == *entry {
                    ONE
                } else if value == ONE
                    && event.event_name == *goal
                    && at_ms <= exposed_at + within_ms
                {
                    2 * ONE
                } else {
                    value
                }
            }
            _ => value,
        }
    }
}

/// An experiment as the operator sees it: its id and its metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct ExperimentDef {
    /// The experiment id, as in `experiment_assignments`.
    pub id: Label,
    /// Its metrics.
    pub metrics: Vec<Metric>,
    /// The tenants (links) it may analyse; `None`: every tenant that is not restricted.
    pub tenants: Option<BTreeSet<u64>>,
    /// The starts of its rollout phases (ms, increasing); empty: one phase. A unit's stratum
    /// is the phase in effect at its exposure (the first phase before the first start).
    pub phases: Vec<u64>,
}

/// The key of the per-arm statistics.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ArmKey {
    /// Experiment id.
    pub experiment: Label,
    /// Metric name.
    pub metric: Label,
    /// Arm (variant).
    pub arm: Label,
}

/// The key of exposure counts: units first exposed in a window, or found in a second arm.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ExposureKey {
    /// Window start of the exposing event (ms).
    pub window_start_ms: u64,
    /// Experiment id.
    pub experiment: Label,
    /// Arm of the exposure.
    pub arm: Label,
    /// What is counted.
    pub kind: ExposureKind,
}

/// What an exposure count counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ExposureKind {
    /// Units first exposed (in the window of the exposing event).
    First,
    /// Units seen in another arm (in the window of the event that showed it, under the arm
    /// they were first exposed to): left out of the analysis.
    Multiple,
    /// Events that carry the experiment's assignment but may not be analysed: a restricted
    /// tenant's (`data_sensitivity: restricted`), or a tenant outside the experiment's
    /// allowlist. Counted, never analysed, and they raise a `compliance` alert.
    Compliance,
}

impl crate::window::WindowKey for ExposureKey {
    fn window_start_ms(&self) -> u64 {
        self.window_start_ms
    }
}

/// The operator's outputs.
pub struct Experiments<'s> {
    /// Per-arm sufficient statistics of every unit-level metric of every experiment.
    pub stats: VecCollection<'s, Time, ArmKey, Moments>,
    /// Per-arm latency histograms of every event-level latency metric.
    pub latency: VecCollection<'s, Time, ArmKey, LatencyHistogram>,
    /// Exposures per window and arm, one closed window each.
    pub exposures: StreamVec<'s, Time, ClosedWindow<ExposureKey, isize>>,
    /// Compliance alerts, one closed window each.
    pub alerts: StreamVec<'s, Time, ClosedWindow<Alert, isize>>,
    /// `experiment_results` rows, one closed window each.
    pub results: StreamVec<'s, Time, ClosedWindow<ResultRow, isize>>,
    /// Guardrail decisions, one closed window each (those that end a sampling interval).
    pub decisions: StreamVec<'s, Time, ClosedWindow<Decision, isize>>,
    /// Snapshots of the state (worker 0), when saving.
    pub state: Option<StreamVec<'s, Time, StateShard<Saved>>>,
}

/// One unit's state in one experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exposure {
    /// The arm it was first exposed to.
    pub arm: Label,
    /// When, ms.
    pub exposed_at: u64,
    /// Seen in another arm since: left out of the analysis.
    pub multiple: bool,
    /// One value per metric, in millionths.
    pub values: SmallVec<[i64; 4]>,
    /// Its latency samples since exposure, per event-level latency metric (by index), so that
    /// a multiple exposure retracts them.
    #[serde(default)]
    pub samples: Vec<(u8, LatencyHistogram)>,
    /// CUPED's covariate per metric (the same metric over the lookback before the exposure's
    /// day), fixed at exposure; `None`: the unit had no pre-exposure data.
    #[serde(default)]
    pub pre: Option<SmallVec<[i64; 4]>>,
    /// The rollout phase (stratum) it was exposed in, for an experiment with phases.
    #[serde(default)]
    pub phase: Option<u8>,
}

impl Exposure {
    /// The covariate of metric `i`.
    fn x(&self, i: usize) -> Option<i64> {
        self.pre.as_ref().map(|p| p.get(i).copied().unwrap_or(0))
    }
}

/// A unit's activity by period, for CUPED: `(period, covariate, value)`, the period the index
/// of a [`Lookback::period_ms`] period since the epoch (a UTC day by default), the covariate an
/// index into the setup's distinct covariates ([`ACTIVE`]: events, so that a unit seen with
/// only zero values has pre-exposure data), the value the sum of the covariate's increments
/// in the period (millionths). Only the last [`Lookback::periods`] are kept.
pub type History = SmallVec<[(u32, u8, i64); 2]>;

/// A unit's state: its history and its exposures.
#[derive(Clone, Debug, Default)]
struct UnitEntry {
    history: History,
    exposures: UnitState,
}

/// The covariate index of a [`History`]'s activity entries (events per day).
const ACTIVE: u8 = u8::MAX;

/// CUPED's pre-exposure lookback: the `periods` whole periods of `period_ms` before the period
/// of a unit's exposure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookback {
    /// Periods looked back.
    pub periods: u32,
    /// Length of a period, ms.
    pub period_ms: u64,
}

impl Lookback {
    /// `days` UTC days.
    pub fn days(days: u32) -> Lookback {
        Lookback {
            periods: days,
            period_ms: 86_400_000,
        }
    }

    /// The period of `at_ms`.
    fn period(&self, at_ms: u64) -> u32 {
        (at_ms / self.period_ms.max(1)).min(u64::from(u32::MAX)) as u32
    }
}

/// A unit: (tenant link, user link).
pub type Unit = (u64, u64);

/// A record of the saved state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Saved {
    /// A unit's exposure to an experiment.
    Unit(Unit, Label, Exposure),
    /// A unit's pre-exposure history.
    History(Unit, History),
    /// An experiment's sums and looks.
    Experiment(Label, Box<Tracked>),
    /// A closed window's outputs not known to be written: written again.
    Closed(u64, Box<WindowOut>),
    /// The next window to look at.
    Next(u64),
}

/// What the experiments are: their definitions (undeclared ones get `default_metrics`) and
/// analyses.
#[derive(Clone, Debug, Default)]
pub struct Setup {
    /// Declared experiments.
    pub defs: Vec<ExperimentDef>,
    /// Metrics of an experiment seen in `experiment_assignments` without a declaration;
    /// `None`: undeclared experiments are not analysed.
    pub default_metrics: Option<Vec<Metric>>,
    /// Analyses by experiment id.
    pub analyses: BTreeMap<Label, Analysis>,
    /// The analysis of an experiment without one.
    pub default_analysis: Analysis,
    /// A fingerprint of all of it, saved with the state.
    pub definition: u64,
    /// CUPED's pre-exposure lookback; `None`: CUPED is off (no history is kept).
    pub lookback: Option<Lookback>,
}

/// The distinct covariates of a setup: every metric with one, by kind, deduplicated across
/// experiments.
#[derive(Clone, Debug)]
struct Covariates {
    /// One metric of each kind.
    metrics: Vec<Metric>,
    /// The lookback.
    lookback: Lookback,
}

impl Covariates {
    /// The covariates of `setup`; `None` when CUPED is off.
    fn of(setup: &Setup) -> Option<Covariates> {
        let lookback = setup
            .lookback
            .filter(|l| l.periods > 0 && l.period_ms > 0)?;
        let mut metrics: Vec<Metric> = Vec::new();
        let all = setup
            .defs
            .iter()
            .flat_map(|d| &d.metrics)
            .chain(setup.default_metrics.iter().flatten());
        for m in all.filter(|m| m.has_covariate()) {
            // Indexes are bytes, and ACTIVE is taken.
            if !metrics.iter().any(|c| c.kind == m.kind) && metrics.len() < usize::from(ACTIVE) {
                metrics.push(m.clone());
            }
        }
        Some(Covariates { metrics, lookback })
    }

    /// The index of metric `m`'s covariate.
    fn index(&self, m: &Metric) -> Option<usize> {
        self.metrics.iter().position(|c| c.kind == m.kind)
    }

    /// Adds `event`'s increments to `history` (the event's day), dropping days older than the
    /// lookback.
    fn record(&self, history: &mut History, event: &Event) {
        let day = self.lookback.period(event.event_time_ms.max(0) as u64);
        let mut add =
            |i: u8, inc: i64| match history.iter_mut().find(|(d, c, _)| *d == day && *c == i) {
                Some(entry) => entry.2 += inc,
                None => history.push((day, i, inc)),
            };
        // The unit was active that day, whatever its metrics: it has pre-exposure data.
        add(ACTIVE, 1);
        for (i, m) in self.metrics.iter().enumerate() {
            let inc = m.pre_increment(event);
            if inc != 0 {
                add(i as u8, inc);
            }
        }
        let periods = self.lookback.periods;
        history.retain(|(d, _, _)| *d + periods >= day);
    }

    /// The covariates of `metrics` for a unit exposed at `at_ms`: the sums over the
    /// lookback's whole periods before the exposure's period; `None` without any activity then.
    fn pre(&self, history: &History, metrics: &[Metric], at_ms: u64) -> Option<SmallVec<[i64; 4]>> {
        let day = self.lookback.period(at_ms);
        let periods = self.lookback.periods;
        let within = |d: u32| d < day && d + periods >= day;
        if !history.iter().any(|(d, _, _)| within(*d)) {
            return None;
        }
        Some(
            metrics
                .iter()
                .map(|m| {
                    let Some(i) = self.index(m) else {
                        return 0;
                    };
                    let sum: i64 = history
                        .iter()
                        .filter(|(d, c, _)| within(*d) && usize::from(*c) == i)
                        .map(|e| e.2)
                        .sum();
                    match m.kind {
                        MetricKind::Conversion { .. } => sum.min(ONE),
                        _ => sum,
                    }
                })
                .collect(),
        )
    }
}

impl Setup {
    /// Whether any experiment is analysed.
    pub fn is_on(&self) -> bool {
        !self.defs.is_empty() || self.default_metrics.is_some()
    }

    /// Whether `event` can matter: it carries assignments, or a metric reads its name.
    pub fn reads(&self, event: &Event) -> bool {
        !event.experiment_assignments.is_empty()
            || self
                .defs
                .iter()
                .flat_map(|d| &d.metrics)
                .chain(self.default_metrics.iter().flatten())
                .any(|m| m.reads(event.event_name))
    }

    /// The rollout phase of experiment `id` at `at_ms`, if it has phases.
    pub fn phase_of(&self, id: &Label, at_ms: u64) -> Option<u8> {
        let def = self.defs.iter().find(|d| d.id == *id)?;
        if def.phases.is_empty() {
            return None;
        }
        let after = def
            .phases
            .iter()
            .take_while(|start| **start <= at_ms)
            .count();
        Some(after.saturating_sub(1).min(usize::from(u8::MAX)) as u8)
    }

    /// Whether experiment `id` may analyse events of the tenant with link `tenant`.
    pub fn allows(&self, id: &Label, tenant: u64) -> bool {
        match self.defs.iter().find(|d| d.id == *id) {
            Some(ExperimentDef {
                tenants: Some(allowed),
                ..
            }) => allowed.contains(&tenant),
            _ => true,
        }
    }

    /// The metrics of experiment `id`, if it is analysed.
    fn metrics_of(&self, id: &Label) -> Option<&[Metric]> {
        match self.defs.iter().find(|d| d.id == *id) {
            Some(d) => Some(&d.metrics),
            None => self.default_metrics.as_deref(),
        }
    }
}

/// What one closed window emits: result rows, decisions, exposure counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowOut {
    /// `experiment_results` rows.
    pub rows: Vec<ResultRow>,
    /// Guardrail decisions.
    pub decisions: Vec<Decision>,
    /// Exposure counts.
    pub exposures: Vec<(ExposureKey, isize)>,
    /// Compliance alerts (`firing`, `resolved`).
    #[serde(default)]
    pub alerts: Vec<Alert>,
}

impl WindowOut {
    fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.decisions.is_empty()
            && self.exposures.is_empty()
            && self.alerts.is_empty()
    }
}

/// A closed window of `entries`.
fn closed<K>(start: u64, end: u64, entries: Vec<(K, isize)>) -> ClosedWindow<K, isize> {
    ClosedWindow {
        window_start_ms: start,
        window_end_ms: end,
        entries,
    }
}

/// One part of each closed window's outputs, as a closed window (none when it is empty).
fn part<K: 'static>(
    width: u64,
    f: fn(&WindowOut) -> Vec<(K, isize)>,
) -> impl FnMut((u64, Arc<WindowOut>)) -> Option<ClosedWindow<K, isize>> + 'static {
    move |(end, out)| {
        let entries = f(&out);
        (!entries.is_empty()).then(|| closed(end - width, end, entries))
    }
}

/// Each of `items` once.
fn counted<K: Clone>(items: &[K]) -> Vec<(K, isize)> {
    items.iter().map(|k| (k.clone(), 1)).collect()
}

/// Per unit: its exposures, by experiment.
type UnitState = SmallVec<[(Label, Exposure); 1]>;

/// Where [`apply`] sends what an event changed.
struct Updates<'a, S, L, X> {
    /// A change of a per-arm sum.
    stats: &'a mut S,
    /// A change of a per-arm latency histogram (negative counts retract), with the metric's
    /// quantile.
    samples: &'a mut L,
    /// An exposure (first, or a second arm).
    exposures: &'a mut X,
}

/// The latency sample `event` adds to latency metric `metric`, if it is one and the event
/// has a latency measure.
fn sample_of(metric: &Metric, event: &Event) -> Option<u64> {
    match &metric.kind {
        MetricKind::Latency { event: name, .. } if event.event_name == *name => event.latency_us,
        _ => None,
    }
}

/// Adds `value_us` to the unit's histogram of metric `index`.
fn record(samples: &mut Vec<(u8, LatencyHistogram)>, index: usize, value_us: u64) {
    let index = index as u8;
    match samples.iter_mut().find(|(i, _)| *i == index) {
        Some((_, h)) => h.record(value_us),
        None => samples.push((index, LatencyHistogram::from_sample(value_us))),
    }
}

/// Applies `event` to `unit`'s state: the updates of the per-arm statistics, of the latency
/// histograms and of the exposures, each through `out`.
fn apply<S, L, X>(
    setup: &Setup,
    covariates: Option<&Covariates>,
    unit: &mut UnitEntry,
    event: &Event,
    windows: Windows,
    out: Updates<'_, S, L, X>,
) where
    S: FnMut(ArmKey, Option<u8>, Moments),
    L: FnMut(ArmKey, LatencyHistogram, f64),
    X: FnMut(ExposureKey, Option<u8>),
{
    let at_ms = event.event_time_ms.max(0) as u64;
    let state = &mut unit.exposures;
    // Experiments the unit was exposed to before this event (the event updates them).
    let before = state.len();
    // Assignments to experiments the unit has not seen yet expose it.
    for (id, arm) in event.experiment_assignments.iter() {
        if state.iter().any(|(e, _)| e == id) {
            continue;
        }
        let Some(metrics) = setup.metrics_of(id) else {
            continue;
        };
        if !setup.allows(id, event.links.tenant) {
            (out.exposures)(
                ExposureKey {
                    window_start_ms: windows.start_of(at_ms),
                    experiment: id.clone(),
                    arm: arm.clone(),
                    kind: ExposureKind::Compliance,
                },
                None,
            );
            continue;
        }
        let phase = setup.phase_of(id, at_ms);
        let key = |metric: &Metric| ArmKey {
            experiment: id.clone(),
            metric: metric.name.clone(),
            arm: arm.clone(),
        };
        let values: SmallVec<[i64; 4]> = metrics
            .iter()
            .map(|m| m.apply(0, event, at_ms, at_ms))
            .collect();
        let pre = covariates.and_then(|c| c.pre(&unit.history, metrics, at_ms));
        let mut samples = Vec::new();
        for (i, metric) in metrics.iter().enumerate() {
            if metric.is_unit_level() {
                let x = pre.as_ref().map(|p| p[i]);
                (out.stats)(key(metric), phase, metric.moments(&values, values[i], x));
            } else if let Some(us) = sample_of(metric, event) {
                record(&mut samples, i, us);
                let q = metric.quantile().unwrap_or(0.95);
                (out.samples)(key(metric), LatencyHistogram::from_sample(us), q);
            }
        }
        (out.exposures)(
            ExposureKey {
                window_start_ms: windows.start_of(at_ms),
                experiment: id.clone(),
                arm: arm.clone(),
                kind: ExposureKind::First,
            },
            phase,
        );
        state.push((
            id.clone(),
            Exposure {
                arm: arm.clone(),
                exposed_at: at_ms,
                multiple: false,
                values,
                samples,
                pre,
                phase,
            },
        ));
    }
    // (An experiment this event exposed the unit to has the event's contribution already.)
    for (id, exposure) in state.iter_mut().take(before) {
        if exposure.multiple {
            continue;
        }
        let Some(metrics) = setup.metrics_of(id) else {
            continue;
        };
        let key = |metric: &Metric| ArmKey {
            experiment: id.clone(),
            metric: metric.name.clone(),
            arm: exposure.arm.clone(),
        };
        let assigned = event
            .experiment_assignments
            .iter()
            .find(|(e, _)| e == id)
            .map(|(_, arm)| arm);
        if let Some(other) = assigned
            && *other != exposure.arm
        {
            // Seen in a second arm: everything the unit contributed is retracted.
            exposure.multiple = true;
            for (i, metric) in metrics.iter().enumerate() {
                if metric.is_unit_level() {
                    let x = exposure.x(i);
                    (out.stats)(
                        key(metric),
                        exposure.phase,
                        metric
                            .moments(&exposure.values, exposure.values[i], x)
                            .negated(),
                    );
                }
            }
            for (i, mut h) in std::mem::take(&mut exposure.samples) {
                if let Some(metric) = metrics.get(usize::from(i)) {
                    differential_dataflow::difference::Abelian::negate(&mut h);
                    (out.samples)(key(metric), h, metric.quantile().unwrap_or(0.95));
                }
            }
            (out.exposures)(
                ExposureKey {
                    window_start_ms: windows.start_of(at_ms),
                    experiment: id.clone(),
                    arm: exposure.arm.clone(),
                    kind: ExposureKind::Multiple,
                },
                exposure.phase,
            );
            continue;
        }
        let old: SmallVec<[i64; 16]> = SmallVec::from_slice(&exposure.values);
        let mut changed = false;
        for (i, metric) in metrics.iter().enumerate() {
            if let Some(us) = sample_of(metric, event) {
                record(&mut exposure.samples, i, us);
                let q = metric.quantile().unwrap_or(0.95);
                (out.samples)(key(metric), LatencyHistogram::from_sample(us), q);
            }
            let new = metric.apply(old[i], event, at_ms, exposure.exposed_at);
            changed |= new != old[i];
            exposure.values[i] = new;
        }
        if !changed {
            continue;
        }
        for (i, metric) in metrics.iter().enumerate() {
            if !metric.is_unit_level() {
                continue;
            }
            let x = exposure.x(i);
            let (was, now) = (
                metric.moments(&old, old[i], x),
                metric.moments(&exposure.values, exposure.values[i], x),
            );
            if was != now {
                (out.stats)(key(metric), exposure.phase, was.negated());
                (out.stats)(key(metric), exposure.phase, now);
            }
        }
    }
    if let Some(c) = covariates {
        c.record(&mut unit.history, event);
    }
}

/// The experiments' per-unit state alone (histories and exposures), as the operator keeps it,
/// for measuring its memory (`benches/benches/state_size.rs`).
pub struct UnitStates {
    setup: Arc<Setup>,
    covariates: Option<Covariates>,
    windows: Windows,
    units: HashMap<Unit, UnitEntry, foldhash::fast::RandomState>,
}

impl UnitStates {
    /// No units yet.
    pub fn new(setup: Arc<Setup>, windows: Windows) -> UnitStates {
        UnitStates {
            covariates: Covariates::of(&setup),
            setup,
            windows,
            units: HashMap::default(),
        }
    }

    /// Applies `event` to its unit (tenant and user links), discarding the updates.
    pub fn apply(&mut self, event: &Event) {
        let unit = (event.links.tenant, event.links.user);
        apply(
            &self.setup,
            self.covariates.as_ref(),
            self.units.entry(unit).or_default(),
            event,
            self.windows,
            Updates {
                stats: &mut |_, _, _| {},
                samples: &mut |_, _, _| {},
                exposures: &mut |_, _| {},
            },
        );
    }

    /// Units held.
    pub fn len(&self) -> usize {
        self.units.len()
    }

    /// Whether no unit is held.
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }
}

/// The looks kept for experiment `id`, noted as touched in the window starting at `start`.
fn touch<'t>(
    tracked: &'t mut BTreeMap<Label, Tracked>,
    touched: &mut BTreeSet<Label>,
    id: &Label,
    start: u64,
) -> &'t mut Tracked {
    if !touched.contains(id) {
        touched.insert(id.clone());
    }
    let t = tracked.entry(id.clone()).or_default();
    t.first_window.get_or_insert(start);
    t
}

/// The compliance alerts of a window: `firing` for an experiment that had events it may not
/// analyse in the window and was not firing, `resolved` for one that was firing and had data
/// but no such events.
fn compliance(
    tracked: &mut BTreeMap<Label, Tracked>,
    touched: &BTreeSet<Label>,
    exposed: &BTreeMap<ExposureKey, isize>,
    start: u64,
    end: u64,
) -> Vec<Alert> {
    let mut alerts = Vec::new();
    for id in touched {
        let events: isize = exposed
            .iter()
            .filter(|(k, _)| k.experiment == *id && k.kind == ExposureKind::Compliance)
            .map(|(_, n)| *n)
            .sum();
        let Some(t) = tracked.get_mut(id) else {
            continue;
        };
        let firing = events > 0;
        if firing != t.compliance_firing {
            t.compliance_firing = firing;
            alerts.push(Alert {
                rule: "compliance".into(),
                subject: id.to_string(),
                severity: "warning".into(),
                state: if firing { "firing" } else { "resolved" }.into(),
                window_start_ms: start,
                window_end_ms: end,
                value: events as f64,
                threshold: 0.0,
                calls: events as i64,
            });
        }
    }
    alerts
}

/// Before a look: the cluster-robust spread of the rank of each latency quantile
/// ([`sightline_stats::rank::clustered_rank_sd`]), per metric and arm of the experiments in
/// `touched`, from every analysed unit's own histogram.
fn spreads<S: std::hash::BuildHasher>(
    setup: &Setup,
    units: &HashMap<Unit, UnitEntry, S>,
    tracked: &mut BTreeMap<Label, Tracked>,
    touched: &BTreeSet<Label>,
) {
    // (experiment, metric index) → (metric, quantile, threshold bucket per arm).
    type Thresholds = BTreeMap<Label, (f64, BTreeMap<Label, u16>)>;
    let mut wanted: BTreeMap<&Label, (&[Metric], Thresholds)> = BTreeMap::new();
    for id in touched {
        let (Some(t), Some(metrics)) = (tracked.get(id), setup.metrics_of(id)) else {
            continue;
        };
        let thresholds: Thresholds = t
            .samples
            .iter()
            .map(|(metric, s)| (metric.clone(), (s.quantile(), s.thresholds())))
            .collect();
        if !thresholds.is_empty() {
            wanted.insert(id, (metrics, thresholds));
        }
    }
    if wanted.is_empty() {
        return;
    }
    let mut sums: BTreeMap<(Label, Label, Label), f64> = BTreeMap::new();
    for entry in units.values() {
        for (id, exposure) in &entry.exposures {
            let Some((metrics, thresholds)) = wanted.get(id) else {
                continue;
            };
            if exposure.multiple {
                continue;
            }
            for (i, h) in &exposure.samples {
                let Some(metric) = metrics.get(usize::from(*i)) else {
                    continue;
                };
                let Some((q, by_arm)) = thresholds.get(&metric.name) else {
                    continue;
                };
                let Some(&threshold) = by_arm.get(&exposure.arm) else {
                    continue;
                };
                let below: i64 = h
                    .buckets
                    .iter()
                    .take_while(|(b, _)| *b <= threshold)
                    .map(|(_, n)| n)
                    .sum();
                let r = below as f64 - q * h.count as f64;
                *sums
                    .entry((id.clone(), metric.name.clone(), exposure.arm.clone()))
                    .or_default() += r * r;
            }
        }
    }
    for ((id, metric, arm), sum) in sums {
        if let Some(s) = tracked
            .get_mut(&id)
            .and_then(|t| t.samples.get_mut(&metric))
        {
            s.rank_sd.insert(arm, sum.sqrt());
        }
    }
}

/// The experiments of `setup` over `events` (standard-route events with their tenant and
/// user links; others are left out), resuming from `resume`, saving state with `hooks`.
pub fn experiments<'s, E>(
    events: VecCollection<'s, Time, E>,
    setup: Arc<Setup>,
    windows: Windows,
    resume: Resume<Saved>,
    hooks: Option<&StateHooks>,
) -> Experiments<'s>
where
    E: std::borrow::Borrow<Event> + Into<Arc<Event>> + Clone + 'static,
{
    let scope = events.inner.scope();
    let worker = scope.index();
    let restored_at = resume.restored_at;
    let reads = Arc::clone(&setup);
    let units = events.inner.flat_map(move |(e, time, diff)| {
        let event: &Event = e.borrow();
        let unit = (event.links.tenant, event.links.user);
        // Restricted events are only counted (compliance), and only when they carry an
        // assignment.
        let wanted = if event.is_restricted() {
            !event.experiment_assignments.is_empty()
        } else {
            unit.0 != 0 && unit.1 != 0 && reads.reads(event)
        };
        (time >= restored_at && wanted).then(|| ((unit, e.into()), time, diff))
    });
    let mut builder = OperatorBuilder::new("Experiments".to_owned(), scope);
    let activator = scope.activator_for(builder.operator_info().address);
    let to_first = Exchange::new(|_: &((Unit, Arc<Event>), Time, isize)| 0u64);
    let mut input = builder.new_input(units, to_first);
    let (stats_out, stats) = builder.new_output::<Vec<(ArmKey, Time, Moments)>>();
    let (latency_out, latency) = builder.new_output::<Vec<(ArmKey, Time, LatencyHistogram)>>();
    let (windows_out, closed_windows) = builder.new_output::<Vec<(u64, Arc<WindowOut>)>>();
    let (state_out, state) = builder.new_output::<Vec<StateShard<Saved>>>();
    let mut stats_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(stats_out);
    let mut latency_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(latency_out);
    let mut windows_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(windows_out);
    let mut state_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(state_out);
    let hooks = hooks.cloned();
    let saving = hooks.is_some();
    let definition = setup.definition;
    let covariates = Covariates::of(&setup);
    builder.build(move |capabilities| {
        let first = worker == 0;
        let mut capabilities = capabilities.into_iter();
        // The statistics' capabilities are not held; the windows' is, to write the outputs
        // not known to be written again at a restart.
        let _ = capabilities.next();
        let _ = capabilities.next();
        let mut restore_cap = capabilities.next().filter(|_| first);
        let mut schedule =
            Schedule::new(capabilities.next().filter(|_| first && saving), restored_at);
        // The capability to emit the outputs of the next window (worker 0).
        let mut window_cap: Option<Capability<Time>> = None;
        let mut units: HashMap<Unit, UnitEntry, foldhash::fast::RandomState> = HashMap::default();
        // The day of the last sweep of units without exposures or recent history.
        let mut swept_day: u64 = 0;
        let mut tracked: BTreeMap<Label, Tracked> = BTreeMap::new();
        // Inputs with their sequence order (event time, hash of the event id), computed once.
        let mut pending: Pending<((i64, u64), Unit, Arc<Event>, Time)> = Pending::default();
        // Capabilities of the statistics' outputs for every time with pending input.
        let mut caps: BTreeMap<Time, [Capability<Time>; 2]> = BTreeMap::new();
        // The next window to look at, and the newest time with input.
        let mut next_start: Option<u64> = None;
        let mut last_data: Time = 0;
        // Closed windows whose outputs are not known to be written, by end.
        let mut unwritten: BTreeMap<u64, WindowOut> = BTreeMap::new();
        let mut restored = Some(resume.restored);
        move |frontiers| {
            let mut stats_out = stats_out.activate();
            let mut latency_out = latency_out.activate();
            let mut windows_out = windows_out.activate();
            // Emits one window's outputs.
            let mut emit = |cap: &Capability<Time>, end: u64, out: &WindowOut| {
                if !out.is_empty() {
                    windows_out
                        .session(&cap.delayed(&(end - 1)))
                        .give((end, Arc::new(out.clone())));
                }
            };
            let mut state_out = state_out.activate();
            if let Some(records) = restored.take()
                && first
            {
                for (record, _) in records {
                    match record {
                        Saved::Unit(unit, id, exposure) => {
                            units
                                .entry(unit)
                                .or_default()
                                .exposures
                                .push((id, exposure));
                        }
                        Saved::History(unit, history) => {
                            units.entry(unit).or_default().history = history;
                        }
                        Saved::Experiment(id, t) => {
                            tracked.insert(id, *t);
                        }
                        Saved::Closed(end, out) => {
                            unwritten.insert(end, *out);
                        }
                        Saved::Next(start) => next_start = Some(start),
                    }
                }
                // Outputs not known to be written are written again.
                if let Some(held) = restore_cap.as_ref() {
                    for (&end, out) in &unwritten {
                        emit(held, end, out);
                    }
                    if let Some(start) = next_start {
                        let at = (windows.end_of(start) - 1).max(*held.time());
                        window_cap = Some(held.delayed(&at));
                    }
                }
            }
            restore_cap = None;
            input.for_each(|cap, data| {
                for ((unit, event), time, diff) in data.drain(..) {
                    caps.entry(time)
                        .or_insert_with(|| [cap.delayed(&time, 0), cap.delayed(&time, 1)]);
                    let start = windows.start_of(time);
                    let at = windows.end_of(start) - 1;
                    if window_cap.as_ref().is_none_or(|c| *c.time() > at) {
                        window_cap = Some(cap.delayed(&at, 2));
                    }
                    if next_start.is_none_or(|s| start < s) {
                        next_start = Some(start);
                    }
                    last_data = last_data.max(time);
                    let order = (event.event_time_ms, fnv1a(event.event_id.as_bytes()));
                    pending.add(time, (order, unit, event, time), diff);
                }
            });
            if !first {
                caps.clear();
                window_cap = None;
                return;
            }
            let frontier = input_frontier(frontiers);
            let mut applied_to = restored_at;
            if let Some(mut start) = next_start {
                loop {
                    let end = windows.end_of(start);
                    if end > frontier || (frontier == Time::MAX && start > last_data) {
                        break;
                    }
                    let ready = pending.take_before(end, |(order, ..)| *order);
                    // Experiments with an update in this window: only they are looked at.
                    let mut touched: BTreeSet<Label> = BTreeSet::new();
                    let mut exposed: BTreeMap<ExposureKey, isize> = BTreeMap::new();
                    let mut moments_buf: Vec<(ArmKey, Option<u8>, Moments)> = Vec::new();
                    let mut samples_buf: Vec<(ArmKey, LatencyHistogram, f64)> = Vec::new();
                    let mut exposures_buf: Vec<(ExposureKey, Option<u8>)> = Vec::new();
                    for (_, unit, event, time) in ready {
                        let Some(sc) = caps.get(&time) else {
                            continue;
                        };
                        let mut stats = stats_out.session(&sc[0]);
                        let mut latency = latency_out.session(&sc[1]);
                        if event.is_restricted() {
                            // Counted, never analysed.
                            for (id, arm) in event.experiment_assignments.iter() {
                                if setup.metrics_of(id).is_some() {
                                    let key = ExposureKey {
                                        window_start_ms: start,
                                        experiment: id.clone(),
                                        arm: arm.clone(),
                                        kind: ExposureKind::Compliance,
                                    };
                                    exposures_buf.push((key, None));
                                }
                            }
                        } else {
                            apply(
                                &setup,
                                covariates.as_ref(),
                                units.entry(unit).or_default(),
                                &event,
                                windows,
                                Updates {
                                    stats: &mut |key, phase, m| moments_buf.push((key, phase, m)),
                                    samples: &mut |key, h, q| samples_buf.push((key, h, q)),
                                    exposures: &mut |key, phase| exposures_buf.push((key, phase)),
                                },
                            );
                        }
                        for (key, phase, m) in moments_buf.drain(..) {
                            let t = touch(&mut tracked, &mut touched, &key.experiment, start);
                            t.add(&key.metric, &key.arm, &m, start);
                            if let Some(phase) = phase {
                                t.add_stratum(&key.metric, phase, &key.arm, &m);
                            }
                            stats.give((key, time, m));
                        }
                        for (key, h, quantile) in samples_buf.drain(..) {
                            touch(&mut tracked, &mut touched, &key.experiment, start).add_samples(
                                &key.metric,
                                &key.arm,
                                quantile,
                                &h,
                            );
                            latency.give((key, time, h));
                        }
                        for (key, phase) in exposures_buf.drain(..) {
                            let delta = match key.kind {
                                ExposureKind::First => 1,
                                ExposureKind::Multiple => -1,
                                ExposureKind::Compliance => 0,
                            };
                            touch(&mut tracked, &mut touched, &key.experiment, start)
                                .expose(&key.arm, phase, delta);
                            *exposed.entry(key).or_default() += 1;
                        }
                    }
                    spreads(&setup, &units, &mut tracked, &touched);
                    let alerts = compliance(&mut tracked, &touched, &exposed, start, end);
                    let mut out = WindowOut {
                        exposures: exposed.into_iter().collect(),
                        alerts,
                        ..WindowOut::default()
                    };
                    for (id, t) in tracked.iter_mut().filter(|(id, _)| touched.contains(*id)) {
                        let analysis = setup.analyses.get(id).unwrap_or(&setup.default_analysis);
                        let metrics = setup.metrics_of(id).unwrap_or(&[]);
                        results::look(
                            id,
                            t,
                            analysis,
                            metrics,
                            start,
                            end,
                            &mut out.rows,
                            &mut out.decisions,
                        );
                    }
                    if let Some(held) = window_cap.as_mut() {
                        held.downgrade(&(end - 1));
                        emit(held, end, &out);
                    }
                    if saving && !out.is_empty() {
                        unwritten.insert(end, out);
                    }
                    start = end;
                }
                next_start = Some(start);
                applied_to = applied_to.max(start);
                // Once a period of event time (a day without CUPED): units without exposures
                // whose history is older than the lookback are forgotten (nothing of them can
                // matter any more).
                let lookback = covariates
                    .as_ref()
                    .map_or(Lookback::days(0), |c| c.lookback);
                let today = u64::from(lookback.period(start));
                if today > swept_day {
                    swept_day = today;
                    let keep_from = today.saturating_sub(u64::from(lookback.periods));
                    units.retain(|_, entry| {
                        entry.history.retain(|(d, _, _)| u64::from(*d) >= keep_from);
                        !entry.exposures.is_empty() || !entry.history.is_empty()
                    });
                }
                caps = caps.split_off(&start);
                if frontier == Time::MAX {
                    window_cap = None;
                } else if let Some(held) = window_cap.as_mut() {
                    held.downgrade(&(windows.end_of(start) - 1));
                }
            } else if frontier != Time::MAX {
                // No input yet: everything before the frontier is applied (there was none), so
                // snapshots, and with them the offsets the source commits, keep moving.
                applied_to = applied_to.max(windows.start_of(frontier));
            }
            let Some(hooks) = hooks.as_ref() else {
                return;
            };
            let written = hooks.written();
            unwritten.retain(|end, _| *end > written);
            if !schedule.due(applied_to, frontier, hooks, &activator) {
                return;
            }
            let s = applied_to;
            let mut records: Vec<(Saved, Time)> = Vec::new();
            for (unit, entry) in &units {
                for (id, exposure) in &entry.exposures {
                    records.push((Saved::Unit(*unit, id.clone(), exposure.clone()), s));
                }
                if !entry.history.is_empty() {
                    records.push((Saved::History(*unit, entry.history.clone()), s));
                }
            }
            for (id, t) in &tracked {
                records.push((Saved::Experiment(id.clone(), Box::new(t.clone())), s));
            }
            for (end, out) in &unwritten {
                records.push((Saved::Closed(*end, Box::new(out.clone())), s));
            }
            if let Some(start) = next_start {
                records.push((Saved::Next(start), s));
            }
            schedule.take(s, "experiments", definition, records, |cap, shard| {
                state_out.session(cap).give(shard);
            });
        }
    });
    let width = windows.width_ms();
    Experiments {
        stats: stats.as_collection(),
        latency: latency.as_collection(),
        exposures: closed_windows
            .clone()
            .flat_map(part(width, |o: &WindowOut| o.exposures.clone())),
        results: closed_windows
            .clone()
            .flat_map(part(width, |o: &WindowOut| counted(&o.rows))),
        decisions: closed_windows
            .clone()
            .flat_map(part(width, |o: &WindowOut| counted(&o.decisions))),
        alerts: closed_windows.flat_map(part(width, |o: &WindowOut| counted(&o.alerts))),
        state: saving.then_some(state),
    }
}
