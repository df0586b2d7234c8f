//! Each unit's state in the experiments: its exposures (arm, phase, metric values, latency
//! samples, CUPED covariates) and its pre-exposure history, and `apply`, which applies one
//! event to it and reports what changed.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sightline_schemas::{Event, Label};
use sightline_stats::Moments;
use smallvec::SmallVec;

use super::metric::{Metric, MetricKind, ONE};
use super::{ArmKey, ExposureKey, ExposureKind, Setup, Unit};
use crate::histogram::LatencyHistogram;
use crate::window::Windows;

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
/// index into the setup's distinct covariates (`ACTIVE`, 255: events, so that a unit seen with
/// only zero values has pre-exposure data), the value the sum of the covariate's increments
/// in the period (millionths). Only the last [`Lookback::periods`] are kept.
pub type History = SmallVec<[(u32, u8, i64); 2]>;

/// A unit's state: its history and its exposures.
#[derive(Clone, Debug, Default)]
pub(super) struct UnitEntry {
    pub(super) history: History,
    pub(super) exposures: UnitState,
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
    pub(super) fn period(&self, at_ms: u64) -> u32 {
        (at_ms / self.period_ms.max(1)).min(u64::from(u32::MAX)) as u32
    }
}

/// The distinct covariates of a setup: every metric with one, by kind, deduplicated across
/// experiments.
#[derive(Clone, Debug)]
pub(super) struct Covariates {
    /// One metric of each kind.
    metrics: Vec<Metric>,
    /// The lookback.
    pub(super) lookback: Lookback,
}

impl Covariates {
    /// The covariates of `setup`; `None` when CUPED is off.
    pub(super) fn of(setup: &Setup) -> Option<Covariates> {
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

/// Per unit: its exposures, by experiment.
pub(super) type UnitState = SmallVec<[(Label, Exposure); 1]>;

/// Where [`apply`] sends what an event changed.
pub(super) struct Updates<'a, S, L, X> {
    /// A change of a per-arm sum.
    pub(super) stats: &'a mut S,
    /// A change of a per-arm latency histogram (negative counts retract), with the metric's
    /// quantile.
    pub(super) samples: &'a mut L,
    /// An exposure (first, or a second arm).
    pub(super) exposures: &'a mut X,
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
pub(super) fn apply<S, L, X>(
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
