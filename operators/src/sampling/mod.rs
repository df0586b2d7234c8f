//! Adaptive telemetry budgets: per-segment sampling rates under a global budget, published
//! every interval for the SDKs and edge collectors to apply.
//!
//! Three parts, apart so that each is tested on its own:
//!
//! - [`segment_counts`], the only per-event cost: every accepted event adds one
//!   [`SegmentTally`] to its window's [`SegmentKey`] (its segment, app version, tenant link and
//!   experiment assignments), closed with [`crate::close_windows`] like any aggregate;
//! - [`plan::evaluate`], a pure function from one interval's tallies and the carried
//!   [`SamplingState`] to the rate table and the next state (risk terms, baselines, damping);
//! - [`rates::solve`], the budget itself: the rates whose expected kept volume meets it;
//!
//! and [`budgets`], the operator that feeds the closed windows to [`plan::evaluate`] in window
//! order on one worker (a few hundred rows per window) and carries the state, which the
//! pipeline saves after every window so that a restart resumes from it.
//!
//! Rates depend on segment fields only, never on an experiment's variant: every arm of an
//! experiment gets the same rate, so sampling cannot bias the comparison.

pub mod plan;
pub mod rates;

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::sync::Arc;

use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use sightline_schemas::{Event, EventType, Label};
use smallvec::SmallVec;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;

use crate::close::ClosedWindow;
use crate::experiment::Decision;
use crate::window::{Time, WindowKey, Windows};

pub use plan::{BudgetRow, BudgetTable, SamplingState};

/// The most segment fields a segment key may have.
pub const MAX_SEGMENT_FIELDS: usize = 4;

/// A segment's values, in the order of [`SamplingRules::fields`].
pub type Segment = SmallVec<[Label; MAX_SEGMENT_FIELDS]>;

/// The value a segment shows for a field the event does not have.
pub const NO_VALUE: &str = "none";

/// An envelope field a segment key may use: the ones that describe a flow, never an
/// identifier, a country or a variant (rates are the same across the arms of an experiment).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SegmentField {
    /// `feature_area`.
    FeatureArea,
    /// `event_type`.
    EventType,
    /// `event_name`.
    EventName,
    /// `app_version`.
    AppVersion,
    /// `platform`.
    Platform,
    /// `source`.
    Source,
    /// `surface`.
    Surface,
    /// `workflow_name`.
    WorkflowName,
    /// `user_role`.
    UserRole,
}

impl SegmentField {
    /// Every field, in the order [`SegmentField::parse`] documents them.
    pub const ALL: [SegmentField; 9] = [
        SegmentField::FeatureArea,
        SegmentField::EventType,
        SegmentField::EventName,
        SegmentField::AppVersion,
        SegmentField::Platform,
        SegmentField::Source,
        SegmentField::Surface,
        SegmentField::WorkflowName,
        SegmentField::UserRole,
    ];

    /// The envelope field's name.
    pub fn name(self) -> &'static str {
        match self {
            SegmentField::FeatureArea => "feature_area",
            SegmentField::EventType => "event_type",
            SegmentField::EventName => "event_name",
            SegmentField::AppVersion => "app_version",
            SegmentField::Platform => "platform",
            SegmentField::Source => "source",
            SegmentField::Surface => "surface",
            SegmentField::WorkflowName => "workflow_name",
            SegmentField::UserRole => "user_role",
        }
    }

    /// The field named `name`, if a segment may use it.
    pub fn parse(name: &str) -> Option<SegmentField> {
        SegmentField::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The field's value on `event` ([`NO_VALUE`] when absent), as a shared label: no
    /// allocation per event.
    pub fn value(self, event: &Event) -> Label {
        let or_none = |l: &Option<Label>| l.clone().unwrap_or_else(|| shared(NO_VALUE));
        match self {
            SegmentField::FeatureArea => event.feature_area.clone(),
            SegmentField::EventType => shared(event.event_type.as_str()),
            SegmentField::EventName => event.event_name.label(),
            SegmentField::AppVersion => event.app_version.clone(),
            SegmentField::Platform => shared(crate::funnel::platform_name(event.platform)),
            SegmentField::Source => shared(crate::funnel::source_name(event.source)),
            SegmentField::Surface => or_none(&event.surface),
            SegmentField::WorkflowName => or_none(&event.workflow_name),
            SegmentField::UserRole => or_none(&event.user_role),
        }
    }
}

/// A label for a fixed string, made once per worker thread.
fn shared(text: &'static str) -> Label {
    thread_local! {
        static LABELS: std::cell::RefCell<std::collections::HashMap<&'static str, Label>> =
            std::cell::RefCell::default();
    }
    LABELS.with(|labels| {
        labels
            .borrow_mut()
            .entry(text)
            .or_insert_with(|| Label::from(text))
            .clone()
    })
}

/// The weights of the risk terms (each term is in [0, 1]; risk = 1 + Σ weight × term).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RiskWeights {
    /// A new release.
    pub new_release: f64,
    /// A new tenant.
    pub new_tenant: f64,
    /// An error share above the segment's own baseline.
    pub error_rate: f64,
    /// An experiment ramping, or with a guardrail breach in progress.
    pub experiment: f64,
}

impl Default for RiskWeights {
    fn default() -> Self {
        RiskWeights {
            new_release: 3.0,
            new_tenant: 1.0,
            error_rate: 4.0,
            experiment: 2.0,
        }
    }
}

/// How the budgets are computed (`[sampling]` in the configuration; checked there).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingRules {
    /// The segment key's fields, in order.
    pub fields: Vec<SegmentField>,
    /// Events per second kept across all segments, never-sampled ones included.
    pub budget_per_second: f64,
    /// Windows per interval (the table is recomputed every interval).
    pub interval_windows: u64,
    /// The lowest rate an active segment gets.
    pub floor: f64,
    /// The rate of a segment never seen before (and the table's default row).
    pub initial_rate: f64,
    /// A rate grows at most this many times per interval.
    pub max_increase: f64,
    /// A rate shrinks at most this many times per interval (unless the budget needs more).
    pub max_decrease: f64,
    /// An app version is new for this long after it is first seen, ms (its term decays
    /// linearly from 1 to 0).
    pub new_release_ms: u64,
    /// A tenant is new for this long after it is first seen, ms.
    pub new_tenant_ms: u64,
    /// The error share's z-score above its baseline at which the error term starts; it is 1
    /// at twice this.
    pub error_z: f64,
    /// The weight of one interval in the moving error baseline (exponential moving average).
    pub baseline_weight: f64,
    /// Fewer events than this in a segment's context: no error z-score.
    pub min_events: i64,
    /// The risk terms' weights.
    pub weights: RiskWeights,
    /// Event types always kept (rate 1, outside the budget's share).
    pub never_sampled: Vec<EventType>,
    /// Event names always kept (feedback, by default).
    pub never_sampled_names: Vec<sightline_schemas::EventName>,
    /// A segment idle for more intervals than this leaves the table (with one `forgotten`
    /// row at the initial rate).
    pub forget_after_intervals: u32,
    /// App versions and tenants unseen for this long are forgotten (seen again, they are new).
    pub remember_ms: u64,
    /// Experiments with rollout phases: (id, first phase start, last phase start). Between
    /// the two, the experiment is ramping.
    pub ramps: Vec<(Label, u64, u64)>,
}

impl Default for SamplingRules {
    fn default() -> Self {
        SamplingRules {
            fields: vec![
                SegmentField::FeatureArea,
                SegmentField::EventType,
                SegmentField::AppVersion,
            ],
            budget_per_second: 1_000.0,
            interval_windows: 5,
            floor: 0.001,
            initial_rate: 0.1,
            max_increase: 10.0,
            max_decrease: 2.0,
            new_release_ms: 3_600_000,
            new_tenant_ms: 86_400_000,
            error_z: 3.0,
            baseline_weight: 0.1,
            min_events: 20,
            weights: RiskWeights::default(),
            never_sampled: vec![EventType::Error],
            never_sampled_names: crate::product::FEEDBACK_EVENTS
                .iter()
                .filter_map(|n| sightline_schemas::EventName::from_name(n))
                .collect(),
            forget_after_intervals: 12,
            remember_ms: 30 * 86_400_000,
            ramps: Vec::new(),
        }
    }
}

impl SamplingRules {
    /// Whether `event` is never sampled.
    pub fn never_samples(&self, event: &Event) -> bool {
        self.never_sampled.contains(&event.event_type)
            || self.never_sampled_names.contains(&event.event_name)
    }

    /// Whether the tenant term is on (it needs the tenant link of every event).
    pub fn uses_tenants(&self) -> bool {
        self.weights.new_tenant > 0.0
    }

    /// Whether the experiment term is on.
    pub fn uses_experiments(&self) -> bool {
        self.weights.experiment > 0.0
    }

    /// The interval's length, ms.
    pub fn interval_ms(&self, windows: Windows) -> u64 {
        self.interval_windows * windows.width_ms()
    }
}

/// One window's count key: the segment and what its risk terms read.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SegmentKey {
    /// Window start, ms.
    pub window_start_ms: u64,
    /// What the events count under.
    pub part: SegmentPart,
}

/// A segment key without its window: what an interval accumulates.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SegmentPart {
    /// The segment's values.
    pub segment: Segment,
    /// `app_version` (for the new-release term).
    pub app_version: Label,
    /// The tenant's link (0 when the new-tenant term is off).
    pub tenant: u64,
    /// The experiment assignments (empty when the experiment term is off).
    pub assignments: Arc<[(Label, Label)]>,
}

impl WindowKey for SegmentKey {
    fn window_start_ms(&self) -> u64 {
        self.window_start_ms
    }
}

/// The difference of [`segment_counts`]. Volumes are Horvitz–Thompson weighted (an event
/// counts 1 / its sample rate) and kept in millionths so that they add exactly.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct SegmentTally {
    /// Events received (unweighted).
    pub events: i64,
    /// Errors received (unweighted).
    pub errors: i64,
    /// Weighted volume of the sampleable events, millionths.
    pub sampleable_micros: i64,
    /// Weighted volume of the never-sampled events, millionths.
    pub always_micros: i64,
}

/// The weight of an event that was not sampled, in millionths.
pub const WEIGHT_ONE: i64 = sightline_schemas::WEIGHT_ONE as i64;

impl SegmentTally {
    /// The tally of one event.
    pub fn of_event(event: &Event, never_sampled: bool) -> SegmentTally {
        let weight = event.weight_micros as i64;
        SegmentTally {
            events: 1,
            errors: i64::from(event.event_type == EventType::Error),
            sampleable_micros: if never_sampled { 0 } else { weight },
            always_micros: if never_sampled { weight } else { 0 },
        }
    }
}

crate::aggregates::summed_difference!(SegmentTally {
    events,
    errors,
    sampleable_micros,
    always_micros
});

/// The per-event part: each accepted event's tally under its window and segment.
pub fn segment_counts<'s, E: Borrow<Event> + Clone + 'static>(
    events: VecCollection<'s, Time, E>,
    windows: Windows,
    rules: &SamplingRules,
) -> VecCollection<'s, Time, SegmentKey, SegmentTally> {
    let (tenants, experiments) = (rules.uses_tenants(), rules.uses_experiments());
    let rules = rules.clone();
    let no_assignments: Arc<[(Label, Label)]> = Arc::from(Vec::new());
    events.explode(move |e| {
        let e = e.borrow();
        let key = SegmentKey {
            window_start_ms: windows.start_of(e.event_time_ms as u64),
            part: SegmentPart {
                segment: rules.fields.iter().map(|f| f.value(e)).collect(),
                app_version: e.app_version.clone(),
                tenant: if tenants { e.links.tenant } else { 0 },
                assignments: if experiments {
                    e.experiment_assignments.clone()
                } else {
                    no_assignments.clone()
                },
            },
        };
        let tally = SegmentTally::of_event(e, rules.never_samples(e));
        Some((key, tally))
    })
}

/// What [`budgets`] reads: closed windows of segment tallies, and guardrail decisions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BudgetInput {
    /// One worker's part of a window of segment tallies.
    Counts(ClosedWindow<SegmentKey, SegmentTally>),
    /// A window's guardrail decisions.
    Decisions(ClosedWindow<Decision, isize>),
}

impl BudgetInput {
    fn window_start_ms(&self) -> u64 {
        match self {
            BudgetInput::Counts(w) => w.window_start_ms,
            BudgetInput::Decisions(w) => w.window_start_ms,
        }
    }
}

/// One processed window: the state after it, and the rate table when an interval ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetWindow {
    /// Window start, ms.
    pub window_start_ms: u64,
    /// Window end, ms.
    pub window_end_ms: u64,
    /// The table of the interval that ended with this window, if one did.
    pub table: Option<BudgetTable>,
    /// The state after the window.
    pub state: SamplingState,
}

/// What a window brings to the interval: tallies by segment part, and decisions.
#[derive(Default)]
struct Arrived {
    tallies: BTreeMap<SegmentPart, SegmentTally>,
    decisions: Vec<Decision>,
}

/// Computes the budgets: every window's tallies and decisions, in window order on worker 0,
/// accumulated per interval (intervals are aligned to the epoch: `interval_windows` windows
/// each), and the rate table of each interval that had data, published when its last window
/// is processed, or, when its last windows had no data, when the next window with data comes
/// (or the input ends). Starts from `initial` (the state saved before a restart, or empty).
pub fn budgets<'s>(
    input: StreamVec<'s, Time, BudgetInput>,
    windows: Windows,
    rules: Arc<SamplingRules>,
    initial: SamplingState,
) -> StreamVec<'s, Time, BudgetWindow> {
    let to_first = Exchange::new(|_: &BudgetInput| 0u64);
    let interval_ms = rules.interval_ms(windows);
    let first = input.scope().index() == 0;
    input.unary_frontier(to_first, "SamplingBudgets", move |capability, _info| {
        // Resuming inside an interval: its table is due when the frontier passes its end,
        // whether or not another window of it comes.
        let mut held = (first && initial.interval_start_ms.is_some()).then(|| {
            let mut cap = capability;
            cap.downgrade(&initial.window_end_ms.max(*cap.time()));
            cap
        });
        let mut state = initial;
        let mut pending: BTreeMap<u64, (Capability<Time>, Arrived)> = BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each(|cap, data| {
                let Some(cap) = cap.retain_least(0) else {
                    return;
                };
                for item in data.drain(..) {
                    let start = item.window_start_ms();
                    // Already in the restored state.
                    if windows.end_of(start) <= state.window_end_ms {
                        continue;
                    }
                    let (_, arrived) = pending
                        .entry(start)
                        .or_insert_with(|| (cap.clone(), Arrived::default()));
                    match item {
                        BudgetInput::Counts(w) => {
                            for (key, tally) in w.entries {
                                use differential_dataflow::difference::Semigroup;
                                arrived
                                    .tallies
                                    .entry(key.part)
                                    .or_default()
                                    .plus_equals(&tally);
                            }
                        }
                        BudgetInput::Decisions(w) => arrived
                            .decisions
                            .extend(w.entries.into_iter().map(|(d, _)| d)),
                    }
                }
            });
            loop {
                // The open interval's table is due when the next window to process belongs
                // to a later interval, or when the input has ended. Never because the frontier
                // alone moved on: what is published depends on the input, not on how far the
                // wall clock had moved an idle source when a run stopped.
                let next = pending
                    .first_key_value()
                    .map(|(&start, _)| start)
                    .filter(|&start| !frontier.less_than(&windows.end_of(start)));
                if let Some(interval) = state.interval_start_ms {
                    let end = interval + interval_ms;
                    let due = next.map_or(frontier.is_empty(), |start| start >= end);
                    // `held` is there while an interval is open; the next window's
                    // capability stands in should it not be.
                    let cap = held
                        .take()
                        .or_else(|| pending.first_key_value().map(|(_, (c, _))| c.clone()));
                    match (due, cap) {
                        (true, Some(mut cap)) => {
                            let table = plan::close_interval(&mut state, &rules, end);
                            cap.downgrade(&(end - 1).max(*cap.time()));
                            output.session(&cap).give(BudgetWindow {
                                window_start_ms: end - windows.width_ms(),
                                window_end_ms: end,
                                table: Some(table),
                                state: state.clone(),
                            });
                            continue;
                        }
                        (_, cap) => held = cap,
                    }
                }
                let Some(start) = next else {
                    break;
                };
                let Some((_, (cap, arrived))) = pending.pop_first() else {
                    break;
                };
                let end = windows.end_of(start);
                let interval = start - start % interval_ms;
                plan::add_window(
                    &mut state,
                    interval,
                    end,
                    arrived.tallies,
                    arrived.decisions,
                );
                let table = (end == interval + interval_ms)
                    .then(|| plan::close_interval(&mut state, &rules, end));
                // Held at the window's end, not before it: the window itself is complete.
                held = match (table.is_some(), held.take()) {
                    (true, _) => None,
                    (false, h) => {
                        let mut h = h.unwrap_or_else(|| cap.clone());
                        h.downgrade(&end.max(*h.time()));
                        Some(h)
                    }
                };
                output.session(&cap).give(BudgetWindow {
                    window_start_ms: start,
                    window_end_ms: end,
                    table,
                    state: state.clone(),
                });
            }
        }
    })
}
