//! Experiments in the stream: the operator ([`experiments`]) that follows every unit's
//! exposures and metric values and keeps the per-arm sufficient statistics ([`Moments`]) as a
//! differential collection, then looks at them when windows close. Its parts: [`metric`] (what
//! a metric measures), [`mod@unit`] (a unit's state and how an event changes it), [`results`]
//! (the looks: rows and guardrail decisions).
//!
//! **Units and exposure.** The unit is the pair (`tenant_id`, `user_id`), followed by their
//! links ([`sightline_schemas::Links`]) so that it survives the pseudonyms' rotation like a
//! funnel's unit. A unit is exposed to an experiment at its first event, in sequence order
//! (event time, then a hash of the event id), that carries the experiment in its
//! `experiment_assignments`; its arm is the variant there, its stratum the rollout phase in
//! effect then. A unit seen later in another arm is a *multiple exposure*: its contribution is
//! retracted from the analysis and it is counted apart. Restricted events, and events of
//! tenants outside an experiment's allowlist, are never analysed: they are counted
//! ([`ExposureKind::Compliance`]) and raise a `compliance` alert.
//!
//! **Metrics** ([`MetricKind`]). Per unit, since its exposure (the exposing event included):
//! counts, sums of a kept measure, conversions within a time, errors, events, support tickets,
//! abandonment, ratios of two of them; and, event-level, latency quantiles from a subtractable
//! histogram per arm. Values are fixed point, so sums are exact. With a CUPED lookback, each
//! unit's covariate is the same metric over the periods before its exposure ([`mod@unit`]).
//!
//! **The collection.** When a unit's value changes, its old contribution
//! `Moments::unit(old)` is retracted and its new one added, at the time of the event that
//! changed it: the collection's accumulation at any time is the per-arm sums of the units as
//! of that time, exactly, whatever the arrival order or the number of workers. Latency samples
//! are a second collection (histograms per arm), exposures a third, counted in the window of
//! the exposing event.
//!
//! **Results.** The same operator applies its input window by window, once the frontier has
//! passed a window's end, in sequence order ([`crate::state::Pending`]); it adds every update of
//! the collection to the experiment's cumulative sums and then looks at them
//! ([`results::look`]): result rows at every window in which the experiment had an update,
//! guardrail decisions at the first such window after each sampling interval has ended. (Looks
//! never happen in windows without data: every output depends on the data alone, not on how
//! far an idle watermark moved.) One operator holds both halves so that one snapshot covers
//! them: saved state (units, sums, looks) is as of one frontier, like the funnels'. It runs on
//! worker 0. A unit's state lives as long as the experiment (`benches/README.md` has its size).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use sightline_schemas::{Event, Label};
use sightline_stats::Moments;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::vec::Map;

pub mod did;
pub mod metric;
pub mod results;
pub mod unit;

pub use did::{DidFigures, DidRow, DidState, Panel, Rollout};
pub use metric::{Metric, MetricKind};
use unit::{Covariates, UnitEntry, Updates, apply};
pub use unit::{Exposure, History, Lookback, UnitStates};

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
    /// For a rollout by tenant that is not randomised: its cohorts, analysed by difference
    /// in differences ([`did`]) instead of by arm.
    pub rollout: Option<Rollout>,
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
    /// `experiment_did` rows of the rollouts, one closed window each.
    pub did: StreamVec<'s, Time, ClosedWindow<DidRow, isize>>,
    /// Snapshots of the state (worker 0), when saving.
    pub state: Option<StreamVec<'s, Time, StateShard<Saved>>>,
}

/// A unit: (tenant link, user link).
pub type Unit = (u64, u64);

/// An input waiting for its window: its sequence order (event time, hash of the event id),
/// unit, event and time.
type Queued = ((i64, u64), Unit, Arc<Event>, Time);

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

impl Setup {
    /// Whether any experiment is analysed.
    pub fn is_on(&self) -> bool {
        !self.defs.is_empty() || self.default_metrics.is_some()
    }

    /// Whether `event` can matter: it carries assignments, a metric reads its name, or a
    /// rollout counts its tenant's active units.
    pub fn reads(&self, event: &Event) -> bool {
        !event.experiment_assignments.is_empty()
            || self.defs.iter().any(|d| d.rollout.is_some())
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

    /// The metrics of experiment `id`, if it is analysed by arm (not a rollout).
    fn metrics_of(&self, id: &Label) -> Option<&[Metric]> {
        match self.defs.iter().find(|d| d.id == *id) {
            Some(d) if d.rollout.is_some() => None,
            Some(d) => Some(&d.metrics),
            None => self.default_metrics.as_deref(),
        }
    }
}

/// What one closed window emits: result rows, decisions, exposure counts, alerts and the
/// rollouts' difference-in-differences rows.
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
    /// `experiment_did` rows.
    #[serde(default)]
    pub did: Vec<DidRow>,
}

impl WindowOut {
    fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.decisions.is_empty()
            && self.exposures.is_empty()
            && self.alerts.is_empty()
            && self.did.is_empty()
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
        let mut pending: Pending<Queued> = Pending::default();
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
                            // Rollouts by tenant read every event of their tenants.
                            for def in &setup.defs {
                                let Some(rollout) = &def.rollout else {
                                    continue;
                                };
                                if def.tenants.as_ref().is_some_and(|t| !t.contains(&unit.0)) {
                                    continue;
                                }
                                let t = tracked.entry(def.id.clone()).or_default();
                                if t.panel.add(rollout, &def.metrics, &event) {
                                    touch(&mut tracked, &mut touched, &def.id, start);
                                }
                            }
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
                        if let Some(def) = setup.defs.iter().find(|d| d.id == *id)
                            && let Some(rollout) = &def.rollout
                        {
                            t.panel.close(rollout.lookback, end);
                            did::look(
                                id,
                                &t.panel,
                                rollout,
                                &def.metrics,
                                analysis.test.alpha,
                                end,
                                &mut out.did,
                            );
                            continue;
                        }
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
        alerts: closed_windows
            .clone()
            .flat_map(part(width, |o: &WindowOut| counted(&o.alerts))),
        did: closed_windows.flat_map(part(width, |o: &WindowOut| counted(&o.did))),
        state: saving.then_some(state),
    }
}
