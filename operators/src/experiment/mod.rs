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

pub use results::{Analysis, Decision, Guardrail, Inference, ResultRow, ResultState, Tracked};

use crate::close::ClosedWindow;
use crate::funnel::Resume;
use crate::funnel::fnv1a;
use crate::state::{Pending, Schedule, StateHooks, StateShard, input_frontier};
use crate::window::{Time, Windows};

/// Fixed-point scale of metric values (millionths), as [`sightline_stats::moments::SCALE`].
const ONE: i64 = 1_000_000;

/// What a metric measures per unit since exposure.
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

/// A metric of an experiment.
#[derive(Clone, Debug, PartialEq, Eq)]
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
            | MetricKind::Conversion { event, .. } => *event == name,
            MetricKind::Errors => name.spec().event_type == sightline_schemas::EventType::Error,
        }
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
            _ => value,
        }
    }
}

/// An experiment as the operator sees it: its id and its metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExperimentDef {
    /// The experiment id, as in `experiment_assignments`.
    pub id: Label,
    /// Its metrics.
    pub metrics: Vec<Metric>,
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
    /// `false`: a first exposure; `true`: the unit was seen in another arm (counted in the
    /// window of the event that showed it, under the arm it was first exposed to).
    pub multiple: bool,
}

impl crate::window::WindowKey for ExposureKey {
    fn window_start_ms(&self) -> u64 {
        self.window_start_ms
    }
}

/// The operator's outputs.
pub struct Experiments<'s> {
    /// Per-arm sufficient statistics of every metric of every experiment.
    pub stats: VecCollection<'s, Time, ArmKey, Moments>,
    /// Exposures per window and arm, one closed window each.
    pub exposures: StreamVec<'s, Time, ClosedWindow<ExposureKey, isize>>,
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
}

/// A unit: (tenant link, user link).
pub type Unit = (u64, u64);

/// A record of the saved state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Saved {
    /// A unit's exposure to an experiment.
    Unit(Unit, Label, Exposure),
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
}

impl WindowOut {
    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.decisions.is_empty() && self.exposures.is_empty()
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

/// Each of `items` once.
fn counted<K: Clone>(items: &[K]) -> Vec<(K, isize)> {
    items.iter().map(|k| (k.clone(), 1)).collect()
}

/// Per unit: its exposures, by experiment.
type UnitState = SmallVec<[(Label, Exposure); 1]>;

/// Applies `event` to `unit`'s state: the updates of the per-arm statistics and of the
/// exposures, each through `emit`.
fn apply(
    setup: &Setup,
    state: &mut UnitState,
    event: &Event,
    windows: Windows,
    stats: &mut impl FnMut(ArmKey, Moments),
    exposures: &mut impl FnMut(ExposureKey),
) {
    let at_ms = event.event_time_ms.max(0) as u64;
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
        let values: SmallVec<[i64; 4]> = metrics
            .iter()
            .map(|m| m.apply(0, event, at_ms, at_ms))
            .collect();
        for (metric, value) in metrics.iter().zip(&values) {
            stats(
                ArmKey {
                    experiment: id.clone(),
                    metric: metric.name.clone(),
                    arm: arm.clone(),
                },
                Moments::unit(*value, None),
            );
        }
        exposures(ExposureKey {
            window_start_ms: windows.start_of(at_ms),
            experiment: id.clone(),
            arm: arm.clone(),
            multiple: false,
        });
        state.push((
            id.clone(),
            Exposure {
                arm: arm.clone(),
                exposed_at: at_ms,
                multiple: false,
                values,
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
            exposure.multiple = true;
            for (metric, value) in metrics.iter().zip(&exposure.values) {
                stats(key(metric), Moments::unit(*value, None).negated());
            }
            exposures(ExposureKey {
                window_start_ms: windows.start_of(at_ms),
                experiment: id.clone(),
                arm: exposure.arm.clone(),
                multiple: true,
            });
            continue;
        }
        for (metric, value) in metrics.iter().zip(exposure.values.iter_mut()) {
            let new = metric.apply(*value, event, at_ms, exposure.exposed_at);
            if new != *value {
                stats(key(metric), Moments::unit(*value, None).negated());
                stats(key(metric), Moments::unit(new, None));
                *value = new;
            }
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
        (time >= restored_at
            && !event.is_restricted()
            && unit.0 != 0
            && unit.1 != 0
            && reads.reads(event))
        .then(|| ((unit, e.into()), time, diff))
    });
    let mut builder = OperatorBuilder::new("Experiments".to_owned(), scope);
    let activator = scope.activator_for(builder.operator_info().address);
    let to_first = Exchange::new(|_: &((Unit, Arc<Event>), Time, isize)| 0u64);
    let mut input = builder.new_input(units, to_first);
    let (stats_out, stats) = builder.new_output::<Vec<(ArmKey, Time, Moments)>>();
    let (exposures_out, exposures) = builder.new_output::<Vec<ClosedWindow<ExposureKey, isize>>>();
    let (results_out, results) = builder.new_output::<Vec<ClosedWindow<ResultRow, isize>>>();
    let (decisions_out, decisions) = builder.new_output::<Vec<ClosedWindow<Decision, isize>>>();
    let (state_out, state) = builder.new_output::<Vec<StateShard<Saved>>>();
    let mut stats_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(stats_out);
    let mut exposures_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(exposures_out);
    let mut results_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(results_out);
    let mut decisions_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(decisions_out);
    let mut state_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(state_out);
    let hooks = hooks.cloned();
    let saving = hooks.is_some();
    let definition = setup.definition;
    builder.build(move |capabilities| {
        let first = worker == 0;
        let mut capabilities = capabilities.into_iter();
        let held: Vec<Option<Capability<Time>>> = (0..4)
            .map(|_| capabilities.next().filter(|_| first))
            .collect();
        let mut schedule =
            Schedule::new(capabilities.next().filter(|_| first && saving), restored_at);
        // Capabilities to emit the exposures, rows and decisions of the next window (worker 0).
        let mut window_caps: Option<[Capability<Time>; 3]> = None;
        let mut restore_caps = held;
        let mut units: HashMap<Unit, UnitState, foldhash::fast::RandomState> = HashMap::default();
        let mut tracked: BTreeMap<Label, Tracked> = BTreeMap::new();
        let mut pending: Pending<(Unit, Arc<Event>, Time)> = Pending::default();
        // A capability of the statistics' output for every time with pending input.
        let mut caps: BTreeMap<Time, Capability<Time>> = BTreeMap::new();
        // The next window to look at, and the newest time with input.
        let mut next_start: Option<u64> = None;
        let mut last_data: Time = 0;
        // Closed windows whose outputs are not known to be written, by end.
        let mut unwritten: BTreeMap<u64, WindowOut> = BTreeMap::new();
        let mut restored = Some(resume.restored);
        move |frontiers| {
            let mut stats_out = stats_out.activate();
            let mut exposures_out = exposures_out.activate();
            let mut results_out = results_out.activate();
            let mut decisions_out = decisions_out.activate();
            // Emits one window's outputs under the three window capabilities.
            let mut emit = |caps: &[Capability<Time>; 3], end: u64, out: &WindowOut| {
                let start = end - windows.width_ms();
                let at = end - 1;
                if !out.exposures.is_empty() {
                    exposures_out.session(&caps[0].delayed(&at)).give(closed(
                        start,
                        end,
                        out.exposures.clone(),
                    ));
                }
                if !out.rows.is_empty() {
                    results_out.session(&caps[1].delayed(&at)).give(closed(
                        start,
                        end,
                        counted(&out.rows),
                    ));
                }
                if !out.decisions.is_empty() {
                    decisions_out.session(&caps[2].delayed(&at)).give(closed(
                        start,
                        end,
                        counted(&out.decisions),
                    ));
                }
            };
            let mut state_out = state_out.activate();
            if let Some(records) = restored.take()
                && first
            {
                for (record, _) in records {
                    match record {
                        Saved::Unit(unit, id, exposure) => {
                            units.entry(unit).or_default().push((id, exposure));
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
                let restore: Option<[Capability<Time>; 3]> = match &restore_caps[1..] {
                    [Some(a), Some(b), Some(c)] => Some([a.clone(), b.clone(), c.clone()]),
                    _ => None,
                };
                if let Some(held) = restore.as_ref() {
                    for (&end, out) in &unwritten {
                        emit(held, end, out);
                    }
                    if let Some(start) = next_start {
                        let at = (windows.end_of(start) - 1).max(*held[0].time());
                        window_caps = Some([
                            held[0].delayed(&at),
                            held[1].delayed(&at),
                            held[2].delayed(&at),
                        ]);
                    }
                }
            }
            restore_caps = vec![None, None, None, None];
            input.for_each(|cap, data| {
                for ((unit, event), time, diff) in data.drain(..) {
                    caps.entry(time).or_insert_with(|| cap.delayed(&time, 0));
                    let start = windows.start_of(time);
                    let at = windows.end_of(start) - 1;
                    if window_caps.as_ref().is_none_or(|c| *c[0].time() > at) {
                        window_caps = Some([
                            cap.delayed(&at, 1),
                            cap.delayed(&at, 2),
                            cap.delayed(&at, 3),
                        ]);
                    }
                    if next_start.is_none_or(|s| start < s) {
                        next_start = Some(start);
                    }
                    last_data = last_data.max(time);
                    pending.add(time, (unit, event, time), diff);
                }
            });
            if !first {
                caps.clear();
                window_caps = None;
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
                    let ready = pending.take_before(end, |(_, e, _)| {
                        (e.event_time_ms, fnv1a(e.event_id.as_bytes()))
                    });
                    // Experiments with an update in this window: only they are looked at.
                    let mut touched: BTreeSet<Label> = BTreeSet::new();
                    let mut exposed: BTreeMap<ExposureKey, isize> = BTreeMap::new();
                    for (unit, event, time) in ready {
                        let Some(sc) = caps.get(&time) else {
                            continue;
                        };
                        let mut stats = stats_out.session(sc);
                        let state = units.entry(unit).or_default();
                        apply(
                            &setup,
                            state,
                            &event,
                            windows,
                            &mut |key, m| {
                                if !touched.contains(&key.experiment) {
                                    touched.insert(key.experiment.clone());
                                }
                                tracked.entry(key.experiment.clone()).or_default().add(
                                    &key.metric,
                                    &key.arm,
                                    &m,
                                    start,
                                );
                                stats.give((key, time, m));
                            },
                            &mut |key| *exposed.entry(key).or_default() += 1,
                        );
                    }
                    let mut out = WindowOut {
                        exposures: exposed.into_iter().collect(),
                        ..WindowOut::default()
                    };
                    for (id, t) in tracked.iter_mut().filter(|(id, _)| touched.contains(*id)) {
                        let analysis = setup.analyses.get(id).unwrap_or(&setup.default_analysis);
                        results::look(
                            id,
                            t,
                            analysis,
                            start,
                            end,
                            &mut out.rows,
                            &mut out.decisions,
                        );
                    }
                    if let Some(held) = window_caps.as_mut() {
                        for c in held.iter_mut() {
                            c.downgrade(&(end - 1));
                        }
                        emit(held, end, &out);
                    }
                    if saving && !out.is_empty() {
                        unwritten.insert(end, out);
                    }
                    start = end;
                }
                next_start = Some(start);
                applied_to = applied_to.max(start);
                caps = caps.split_off(&start);
                if frontier == Time::MAX {
                    window_caps = None;
                } else if let Some(held) = window_caps.as_mut() {
                    let at = windows.end_of(start) - 1;
                    for c in held.iter_mut() {
                        c.downgrade(&at);
                    }
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
            for (unit, state) in &units {
                for (id, exposure) in state {
                    records.push((Saved::Unit(*unit, id.clone(), exposure.clone()), s));
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
    Experiments {
        stats: stats.as_collection(),
        exposures,
        results,
        decisions,
        state: saving.then_some(state),
    }
}
