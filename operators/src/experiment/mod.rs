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
//! Like the funnels, the operator runs on worker 0 and applies its input once the frontier has
//! passed it, in sequence order ([`crate::state::Pending`]). A unit's state lives as long as
//! the experiment (a few dozen bytes per unit and experiment).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use sightline_schemas::{Event, EventName, Label};
use sightline_stats::Moments;
use smallvec::SmallVec;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;

pub mod results;

pub use results::{Analysis, Decision, Guardrail, Inference, ResultRow, Results, results};

use crate::funnel::fnv1a;
use crate::state::{Pending, input_frontier};
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
    /// The value `event` adds to a unit whose value is `value`, exposed at `exposed_at`.
    fn apply(&self, value: i64, event: &Event, at_ms: u64, exposed_at: u64) -> i64 {
        match &self.kind {
            MetricKind::Count { event: name } if event.event_name == *name => value + ONE,
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

/// The operator's outputs.
pub struct Experiments<'s> {
    /// Per-arm sufficient statistics of every metric of every experiment.
    pub stats: VecCollection<'s, Time, ArmKey, Moments>,
    /// Exposures per window and arm.
    pub exposures: VecCollection<'s, Time, ExposureKey, isize>,
}

/// One unit's state in one experiment.
#[derive(Clone, Debug)]
struct Exposure {
    arm: Label,
    exposed_at: u64,
    multiple: bool,
    /// One value per metric, in millionths.
    values: SmallVec<[i64; 4]>,
}

/// A unit: (tenant link, user link).
type Unit = (u64, u64);

/// The per-arm statistics and exposures of `defs` over `events` (standard-route events with
/// their tenant and user links; others are left out).
pub fn experiments<'s, E>(
    events: VecCollection<'s, Time, E>,
    defs: Arc<[ExperimentDef]>,
    windows: Windows,
) -> Experiments<'s>
where
    E: std::borrow::Borrow<Event> + Clone + 'static,
{
    let scope = events.inner.scope();
    let worker = scope.index();
    use timely::dataflow::operators::vec::Map;
    let units = events.inner.flat_map(|(e, time, diff)| {
        let event: &Event = e.borrow();
        let unit = (event.links.tenant, event.links.user);
        (!event.is_restricted() && unit.0 != 0 && unit.1 != 0)
            .then(|| ((unit, Arc::new(event.clone())), time, diff))
    });
    let mut builder = OperatorBuilder::new("Experiments".to_owned(), scope);
    let to_first = Exchange::new(|_: &((Unit, Arc<Event>), Time, isize)| 0u64);
    let mut input = builder.new_input(units, to_first);
    let (stats_out, stats) = builder.new_output::<Vec<(ArmKey, Time, Moments)>>();
    let (exposures_out, exposures) = builder.new_output::<Vec<(ExposureKey, Time, isize)>>();
    let mut stats_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(stats_out);
    let mut exposures_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(exposures_out);
    builder.build(move |_capabilities| {
        let mut units: HashMap<Unit, SmallVec<[Option<Exposure>; 1]>, foldhash::fast::RandomState> =
            HashMap::default();
        let mut pending: Pending<(Unit, Arc<Event>, Time)> = Pending::default();
        // Capabilities (one per output) for every time with pending input: what an event
        // changes goes out at its time.
        let mut caps: BTreeMap<Time, (Capability<Time>, Capability<Time>)> = BTreeMap::new();
        let mut applied_to: Time = 0;
        move |frontiers| {
            let mut stats_out = stats_out.activate();
            let mut exposures_out = exposures_out.activate();
            input.for_each(|cap, data| {
                for ((unit, event), time, diff) in data.drain(..) {
                    caps.entry(time)
                        .or_insert_with(|| (cap.delayed(&time, 0), cap.delayed(&time, 1)));
                    pending.add(time, (unit, event, time), diff);
                }
            });
            if worker != 0 {
                caps.clear();
                return;
            }
            let frontier = input_frontier(frontiers);
            if frontier <= applied_to && frontier != Time::MAX {
                return;
            }
            let ready = pending.take_before(frontier, |(_, e, _)| {
                (e.event_time_ms, fnv1a(e.event_id.as_bytes()))
            });
            for (unit, event, time) in ready {
                let Some((stats_cap, exposures_cap)) = caps.get(&time) else {
                    continue;
                };
                let mut stats = stats_out.session(stats_cap);
                let mut exposed = exposures_out.session(exposures_cap);
                let state = units
                    .entry(unit)
                    .or_insert_with(|| SmallVec::from_elem(None, defs.len()));
                let at_ms = event.event_time_ms.max(0) as u64;
                for (def, slot) in defs.iter().zip(state.iter_mut()) {
                    let assigned = event
                        .experiment_assignments
                        .iter()
                        .find(|(id, _)| *id == def.id)
                        .map(|(_, arm)| arm);
                    let key = |metric: &Metric, arm: &Label| ArmKey {
                        experiment: def.id.clone(),
                        metric: metric.name.clone(),
                        arm: arm.clone(),
                    };
                    match slot {
                        None => {
                            let Some(arm) = assigned else { continue };
                            let values: SmallVec<[i64; 4]> = def
                                .metrics
                                .iter()
                                .map(|m| m.apply(0, &event, at_ms, at_ms))
                                .collect();
                            for (metric, value) in def.metrics.iter().zip(&values) {
                                stats.give((key(metric, arm), time, Moments::unit(*value, None)));
                            }
                            exposed.give((
                                ExposureKey {
                                    window_start_ms: windows.start_of(at_ms),
                                    experiment: def.id.clone(),
                                    arm: arm.clone(),
                                    multiple: false,
                                },
                                time,
                                1,
                            ));
                            *slot = Some(Exposure {
                                arm: arm.clone(),
                                exposed_at: at_ms,
                                multiple: false,
                                values,
                            });
                        }
                        Some(exposure) if exposure.multiple => {}
                        Some(exposure) => {
                            if let Some(other) = assigned
                                && *other != exposure.arm
                            {
                                exposure.multiple = true;
                                for (metric, value) in def.metrics.iter().zip(&exposure.values) {
                                    stats.give((
                                        key(metric, &exposure.arm),
                                        time,
                                        Moments::unit(*value, None).negated(),
                                    ));
                                }
                                exposed.give((
                                    ExposureKey {
                                        window_start_ms: windows.start_of(at_ms),
                                        experiment: def.id.clone(),
                                        arm: exposure.arm.clone(),
                                        multiple: true,
                                    },
                                    time,
                                    1,
                                ));
                                continue;
                            }
                            for (metric, value) in
                                def.metrics.iter().zip(exposure.values.iter_mut())
                            {
                                let new = metric.apply(*value, &event, at_ms, exposure.exposed_at);
                                if new != *value {
                                    let k = key(metric, &exposure.arm);
                                    stats.give((
                                        k.clone(),
                                        time,
                                        Moments::unit(*value, None).negated(),
                                    ));
                                    stats.give((k, time, Moments::unit(new, None)));
                                    *value = new;
                                }
                            }
                        }
                    }
                }
            }
            applied_to = frontier;
            // Times before the frontier have no input left.
            caps = caps.split_off(&frontier);
        }
    });
    Experiments {
        stats: stats.as_collection(),
        exposures: exposures.as_collection(),
    }
}
