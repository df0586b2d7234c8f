//! Conversion funnels: per unit, how far it got through ordered steps within a conversion
//! window, counted per entry window.
//!
//! # Semantics
//!
//! A funnel has steps `1…n` (each an event name with equality filters), a *unit* (a user, a
//! session, a tenant or a property such as `recommendation_id`) and a conversion window `C`.
//! A unit's events are put in one sequence, ordered by event time and then by a hash of their
//! `event_id` (so that events at the same millisecond have a fixed order whatever their
//! arrival; a chain may use two of them, in that order).
//!
//! - The **entry window** of a step-1 event is the pipeline window holding it. A unit *enters*
//!   window `W` when it has at least one step-1 event in `W`; it counts once per entry window.
//! - From a step-1 event at `t₁`, a **chain** is a sequence of distinct events matching steps
//!   `1, 2, …, k`, each later in the sequence than the one before, all at most `t₁ + C`:
//!   - `ordered`: other events may come between the steps;
//!   - `strict`: no other event of the unit comes between them (every event of the unit
//!     takes part, not only step events);
//!   - `unordered`: the chain holds `t₁` and `k − 1` further events matching distinct other
//!     steps, in any order; "step k" then means "k of the n steps done".
//! - An **exclusion** `(event, from, to)` breaks every chain that has a matching event
//!   between its step `from` and its step `to` (strictly, in the sequence): such a chain does
//!   not count for steps `to` and beyond; its steps before `to` still count. In `unordered`
//!   funnels an exclusion spans the whole funnel: nothing after it counts.
//! - A unit **reaches step k** in `W` when some step-1 event of `W` starts a chain reaching
//!   `k`. Its **time to convert** to step k is the shortest `t_k − t₁` over those chains.
//!   A unit that reaches k has reached every step before it, so a step never counts more
//!   units than the one before, and conversion is in [0, 1].
//! - **Weights.** Under sampling (events with a `sample_rate`), a unit counts at step k with
//!   its Horvitz–Thompson weight there: the largest weight among its first step-1 event of
//!   `W` and the events that first took it to steps 2…k ([`Entry::weights`]); the rows' time
//!   to convert is weighted the same way. Without sampling every weight is 1.
//! - **Breakdowns** are first-touch: the unit's value in `W` is the value on its first step-1
//!   event in `W` (`(none)` when that event has no value; for experiments, each experiment the
//!   event carries an assignment of).
//!
//! # Dataflow and state
//!
//! Each event becomes a [`Touch`] (time, order hash, which steps and exclusions it matches,
//! the breakdown values of a step-1 event) keyed by `(route, unit)`. One operator per funnel,
//! on worker 0, buffers touches until the frontier has passed their time and then applies
//! them, in sequence order, to their unit's [`Progress`]: per entry window it has entered,
//! the chains that could still go further and the shortest time to convert per step (see
//! [`progress`] for why that is exact and bounded by the steps). When the frontier passes an
//! entry window's end plus `C` (its *horizon*) no later event can change it: the window's
//! rows are emitted once, at time `horizon − 1`, and its entries leave the state.
//!
//! State per active unit: one [`Entry`] per open entry window (about 240 bytes with its chains
//! and the breakdown values of its first step-1 event, measured by `benches/state_size`),
//! whatever the unit's activity (`unordered` funnels: plus one matching per open chain);
//! a unit without open entry windows takes nothing. Touches wait in a buffer only while the
//! frontier has not passed them (the allowed lateness).
//!
//! Routes: the unit key includes the route, so a chain never links a standard and a restricted
//! event; restricted chains are counted apart and written to the restricted lake.

pub mod progress;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use differential_dataflow::VecCollection;
use differential_dataflow::difference::Semigroup;
use serde::{Deserialize, Serialize};
use sightline_schemas::{Event, EventName, Label};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::Concatenate;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::{Scope, StreamVec};

pub use progress::{Chain, Entry, Matching, Progress};

use crate::close::ClosedWindow;
use crate::histogram::LatencyHistogram;
use crate::select::{Names, Subscriber, select};
use crate::state::{Pending, Schedule, StateShard, input_frontier};
use crate::window::{Time, WindowKey, Windows};

/// Most steps a funnel may have (and most exclusions).
pub const MAX_STEPS: usize = 16;

/// Most funnels a pipeline may define: each is one consumer of the pipeline's one pass over
/// its events ([`select`] serves at most 64).
pub const MAX_FUNNELS: usize = 32;

/// How the steps of a chain may be ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Order {
    /// Each step after the one before; other events may come between.
    Ordered,
    /// Each step directly after the one before: no other event of the unit between.
    Strict,
    /// Steps in any order after the step-1 event.
    Unordered,
}

impl Order {
    /// `ordered`, `strict` or `unordered`.
    pub fn parse(text: &str) -> Option<Order> {
        match text {
            "ordered" => Some(Order::Ordered),
            "strict" => Some(Order::Strict),
            "unordered" => Some(Order::Unordered),
            _ => None,
        }
    }
}

/// A field of an event, for units, filters and breakdowns.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Field {
    /// `tenant_id` (a unit: followed by its link, never by its pseudonym).
    TenantId,
    /// `user_id` (a unit).
    UserId,
    /// `session_id` (a unit).
    SessionId,
    /// `platform`.
    Platform,
    /// `source`.
    Source,
    /// `app_version`.
    AppVersion,
    /// `feature_area`.
    FeatureArea,
    /// `surface`.
    Surface,
    /// `workflow_name`.
    WorkflowName,
    /// `user_role`.
    UserRole,
    /// `country` (only with geo consent).
    Country,
    /// A kept property (`properties.<name>`).
    Property(String),
}

impl Field {
    /// Parses an envelope field name or `properties.<name>`.
    pub fn parse(text: &str) -> Option<Field> {
        Some(match text {
            "tenant_id" => Field::TenantId,
            "user_id" => Field::UserId,
            "session_id" => Field::SessionId,
            "platform" => Field::Platform,
            "source" => Field::Source,
            "app_version" => Field::AppVersion,
            "feature_area" => Field::FeatureArea,
            "surface" => Field::Surface,
            "workflow_name" => Field::WorkflowName,
            "user_role" => Field::UserRole,
            "country" => Field::Country,
            other => {
                let name = other.strip_prefix("properties.")?;
                if name.is_empty() || name.contains('.') {
                    return None;
                }
                Field::Property(name.to_owned())
            }
        })
    }

    /// The name as configured.
    pub fn name(&self) -> String {
        match self {
            Field::TenantId => "tenant_id".into(),
            Field::UserId => "user_id".into(),
            Field::SessionId => "session_id".into(),
            Field::Platform => "platform".into(),
            Field::Source => "source".into(),
            Field::AppVersion => "app_version".into(),
            Field::FeatureArea => "feature_area".into(),
            Field::Surface => "surface".into(),
            Field::WorkflowName => "workflow_name".into(),
            Field::UserRole => "user_role".into(),
            Field::Country => "country".into(),
            Field::Property(p) => format!("properties.{p}"),
        }
    }

    /// Whether the field is an identifier (a unit, never a label).
    pub fn is_identifier(&self) -> bool {
        matches!(self, Field::TenantId | Field::UserId | Field::SessionId)
    }

    /// The field's value on `event` as text; `None` when absent, and always for identifiers
    /// (they are never compared or stored as labels).
    pub fn text<'e>(&self, event: &'e Event) -> Option<Cow<'e, str>> {
        let label = |l: &'e Label| Cow::Borrowed(&**l);
        match self {
            Field::TenantId | Field::UserId | Field::SessionId => None,
            Field::Platform => Some(Cow::Borrowed(platform_name(event.platform))),
            Field::Source => Some(Cow::Borrowed(source_name(event.source))),
            Field::AppVersion => Some(label(&event.app_version)),
            Field::FeatureArea => Some(label(&event.feature_area)),
            Field::Surface => event.surface.as_ref().map(label),
            Field::WorkflowName => event.workflow_name.as_ref().map(label),
            Field::UserRole => event.user_role.as_ref().map(label),
            Field::Country => event.country.as_ref().map(label),
            Field::Property(p) => match event.kept.label(p) {
                Some(l) => Some(label(l)),
                None => event.kept.text(p).map(Cow::Owned),
            },
        }
    }

    /// The field's value on `event` as a shared label (no copy for label fields).
    pub fn label(&self, event: &Event) -> Option<Label> {
        match self {
            Field::AppVersion => Some(event.app_version.clone()),
            Field::FeatureArea => Some(event.feature_area.clone()),
            Field::Surface => event.surface.clone(),
            Field::WorkflowName => event.workflow_name.clone(),
            Field::UserRole => event.user_role.clone(),
            Field::Country => event.country.clone(),
            Field::Property(p) => match event.kept.label(p) {
                Some(l) => Some(l.clone()),
                None => event.kept.text(p).map(|t| Label::from(t.as_str())),
            },
            other => other.text(event).map(|t| Label::from(&*t)),
        }
    }

    /// The unit key of `event` for this field: the unit link of an identifier (0 when the
    /// decoder did not compute it), or a fixed hash of a property's value. `None` when the
    /// event has no such unit.
    pub fn unit_of(&self, event: &Event) -> Option<u64> {
        let link = |l: u64| (l != 0).then_some(l);
        match self {
            Field::TenantId => link(event.links.tenant),
            Field::UserId => link(event.links.user),
            Field::SessionId => link(event.links.session),
            other => other.text(event).map(|t| fnv1a(t.as_bytes()).max(1)),
        }
    }
}

pub(crate) fn platform_name(p: sightline_schemas::Platform) -> &'static str {
    use sightline_schemas::Platform::*;
    match p {
        Web => "web",
        Ios => "ios",
        Android => "android",
        Cli => "cli",
        Api => "api",
    }
}

pub(crate) fn source_name(s: sightline_schemas::Source) -> &'static str {
    use sightline_schemas::Source::*;
    match s {
        Client => "client",
        Server => "server",
        Worker => "worker",
        Api => "api",
    }
}

static NONE: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| Label::from(NONE_VALUE));

thread_local! {
    /// `experiment:<id>` labels by experiment id, made once per worker thread.
    static EXPERIMENT_NAMES: std::cell::RefCell<std::collections::HashMap<Label, Label>> =
        Default::default();
    /// Field-name labels by field.
    static FIELD_NAMES: std::cell::RefCell<std::collections::HashMap<Field, Label>> =
        Default::default();
}

/// The breakdown name of an experiment: `experiment:<id>` (memoized: step-1 events repeat a
/// few experiments).
fn experiment_breakdown(id: &Label) -> Label {
    EXPERIMENT_NAMES.with(|names| {
        let mut names = names.borrow_mut();
        if let Some(label) = names.get(id) {
            return label.clone();
        }
        let label = Label::from(format!("experiment:{id}").as_str());
        if names.len() < 4096 {
            names.insert(id.clone(), label.clone());
        }
        label
    })
}

fn field_breakdown(field: &Field) -> Label {
    FIELD_NAMES.with(|names| {
        names
            .borrow_mut()
            .entry(field.clone())
            .or_insert_with(|| Label::from(field.name().as_str()))
            .clone()
    })
}

/// FNV-1a, 64 bits: a fixed hash (the same in every process and run) for the order of events
/// at the same millisecond and for the keys of non-personal property units.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// An event name with equality filters on fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Matcher {
    /// The event.
    pub event: EventName,
    /// `(field, value)`: the event's field must equal the value.
    pub filters: Vec<(Field, String)>,
}

impl Matcher {
    /// Whether `event` matches.
    #[inline]
    pub fn matches(&self, event: &Event) -> bool {
        event.event_name == self.event
            && self
                .filters
                .iter()
                .all(|(field, value)| field.text(event).is_some_and(|v| v == value.as_str()))
    }
}

/// An exclusion: a chain with a matching event between its steps `from` and `to` (1-based)
/// does not count from step `to` on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusion {
    /// The excluding event.
    pub matcher: Matcher,
    /// The step after which the exclusion applies.
    pub from_step: usize,
    /// The step before which it applies.
    pub to_step: usize,
}

/// A breakdown of a funnel's counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Breakdown {
    /// Every experiment the first step-1 event carries: `experiment:<id>` = its variant.
    Experiments,
    /// One experiment.
    Experiment(Label),
    /// A segment field.
    Field(Field),
}

/// A funnel, checked (see `sightline`'s configuration for the checks).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunnelDef {
    /// Its name (a column value).
    pub name: Label,
    /// What a unit is.
    pub unit: Field,
    /// The steps, 1 to n.
    pub steps: Vec<Matcher>,
    /// The conversion window, ms (a multiple of the tick).
    pub window_ms: u64,
    /// How steps may be ordered.
    pub order: Order,
    /// Exclusions.
    pub exclusions: Vec<Exclusion>,
    /// Breakdowns (`all` is always there).
    pub breakdowns: Vec<Breakdown>,
}

/// The breakdown value of an event that has none for a field.
pub const NONE_VALUE: &str = "(none)";

impl FunnelDef {
    /// The name of step `step` (1-based) in output rows: its event name, or "k of n steps" in
    /// an unordered funnel.
    pub fn step_name(&self, step: usize) -> String {
        match self.order {
            Order::Unordered => format!("{step} of {} steps", self.steps.len()),
            _ => self
                .steps
                .get(step.wrapping_sub(1))
                .map_or_else(String::new, |s| s.event.as_str().to_owned()),
        }
    }

    /// The name the funnel's state is saved under (`-progress`: the state is each unit's
    /// [`Progress`]; the touches that earlier versions saved under `funnel-<name>` are not
    /// read).
    pub fn state_name(&self) -> String {
        format!("funnel-{}-progress", self.name)
    }

    /// The events the funnel reads: its steps' and exclusions' names, or every event in a
    /// `strict` funnel (any event of the unit between two steps breaks a chain).
    pub fn names(&self) -> Names {
        if self.order == Order::Strict {
            return Names::All;
        }
        let mut names: Vec<EventName> = self.steps.iter().map(|s| s.event).collect();
        names.extend(self.exclusions.iter().map(|x| x.matcher.event));
        names.sort_unstable();
        names.dedup();
        Names::Only(names)
    }

    /// The touch of `event`, keyed by `(restricted, unit)`; `None` for an event that takes
    /// no part in the funnel.
    pub fn touch_of(
        &self,
        event: &Event,
        memo: &mut BreakdownMemo,
    ) -> Option<((bool, u64), Touch)> {
        let mut steps = 0u32;
        for (i, step) in self.steps.iter().enumerate() {
            if step.matches(event) {
                steps |= 1 << i;
            }
        }
        let mut exclusions = 0u32;
        for (i, x) in self.exclusions.iter().enumerate() {
            if x.matcher.matches(event) {
                exclusions |= 1 << i;
            }
        }
        if steps == 0 && exclusions == 0 && self.order != Order::Strict {
            return None;
        }
        let unit = self.unit.unit_of(event)?;
        let breakdown = if steps & 1 != 0 {
            memo.breakdown_of(self, event)
        } else {
            memo.empty.clone()
        };
        Some((
            (event.is_restricted(), unit),
            Touch {
                at_ms: event.event_time_ms.max(0) as u64,
                order: fnv1a(event.event_id.as_bytes()),
                steps,
                exclusions,
                breakdown,
                weight_micros: event.weight_micros,
            },
        ))
    }

    /// The breakdown values of a step-1 event: `(breakdown name, value)` for each breakdown.
    fn breakdown_of(&self, event: &Event) -> Breakdowns {
        let mut pairs: Vec<(Label, Label)> = Vec::new();
        for b in &self.breakdowns {
            match b {
                Breakdown::Experiments => {
                    for (experiment, variant) in event.experiment_assignments.iter() {
                        pairs.push((experiment_breakdown(experiment), variant.clone()));
                    }
                }
                Breakdown::Experiment(id) => {
                    if let Some((_, variant)) =
                        event.experiment_assignments.iter().find(|(e, _)| e == id)
                    {
                        pairs.push((experiment_breakdown(id), variant.clone()));
                    }
                }
                Breakdown::Field(field) => {
                    let value = field.label(event).unwrap_or_else(|| NONE.clone());
                    pairs.push((field_breakdown(field), value));
                }
            }
        }
        pairs.into()
    }
}

/// The breakdown values of step-1 events, made once per assignment set where they can be.
///
/// A funnel whose breakdowns are all experiments gives every event with the same experiment
/// assignments the same values, and the decoder hands events with the same assignments one
/// shared list: so the values are looked up by the list's address (one hash of a pointer)
/// instead of built for each event. The memo holds each list it has seen, so that an address
/// is never reused while it is a key; it is emptied when it reaches [`BreakdownMemo::MAX`].
/// A funnel broken down by a field gets its values built per event.
#[derive(Debug)]
pub struct BreakdownMemo {
    /// The breakdowns of a touch that is not a step-1 event.
    empty: Breakdowns,
    /// Whether the funnel's values depend on the assignments only.
    by_assignments: bool,
    /// Assignment list address → (the list, its breakdown values).
    seen: HashMap<usize, (Breakdowns, Breakdowns), foldhash::fast::RandomState>,
}

impl BreakdownMemo {
    /// Assignment sets held at most.
    pub const MAX: usize = 4096;

    /// The memo of `def`'s breakdowns.
    pub fn new(def: &FunnelDef) -> BreakdownMemo {
        BreakdownMemo {
            empty: Arc::from(Vec::new()),
            by_assignments: def
                .breakdowns
                .iter()
                .all(|b| !matches!(b, Breakdown::Field(_))),
            seen: HashMap::default(),
        }
    }

    /// `def`'s breakdown values for the step-1 event `event`.
    fn breakdown_of(&mut self, def: &FunnelDef, event: &Event) -> Breakdowns {
        if !self.by_assignments {
            return def.breakdown_of(event);
        }
        let set = &event.experiment_assignments;
        let address = Arc::as_ptr(set).cast::<()>() as usize;
        if let Some((_, values)) = self.seen.get(&address) {
            return Arc::clone(values);
        }
        if self.seen.len() >= BreakdownMemo::MAX {
            self.seen.clear();
        }
        let values = def.breakdown_of(event);
        self.seen
            .insert(address, (Arc::clone(set), Arc::clone(&values)));
        values
    }
}

/// Kuhn's augmenting path: finds a step for `event` among its `masks` bits, moving earlier
/// events to other steps if need be.
fn augment(event: usize, masks: &[u32], taken: &mut [Option<usize>], visited: &mut u32) -> bool {
    let mut candidates = masks[event] & !*visited;
    while candidates != 0 {
        let step = candidates.trailing_zeros() as usize;
        candidates &= candidates - 1;
        *visited |= 1 << step;
        let free = match taken[step] {
            None => true,
            Some(other) => augment(other, masks, taken, visited),
        };
        if free {
            taken[step] = Some(event);
            return true;
        }
    }
    false
}

/// Breakdown values of a step-1 event, shared.
pub type Breakdowns = Arc<[(Label, Label)]>;

/// One event of a unit, as a funnel sees it. Ordered by time, then by a hash of the event id:
/// the sequence order of the semantics.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Touch {
    /// Event time, ms.
    pub at_ms: u64,
    /// Order among events at the same millisecond ([`fnv1a`] of the event id).
    pub order: u64,
    /// Bit i: the event matches step i + 1.
    pub steps: u32,
    /// Bit i: the event matches exclusion i.
    pub exclusions: u32,
    /// `(breakdown, value)` pairs of a step-1 event; empty otherwise.
    pub breakdown: Breakdowns,
    /// The event's Horvitz–Thompson weight, millionths (1 / `sample_rate`; see [`Entry`]).
    #[serde(default = "unit_weight")]
    pub weight_micros: u64,
}

/// Weight 1, in millionths: an event that was not sampled.
pub fn unit_weight() -> u64 {
    sightline_schemas::WEIGHT_ONE
}

/// One unit's result in one entry window, for one breakdown value and one step it reached.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Reach {
    /// The entry window.
    pub window_start_ms: u64,
    /// `all`, or the breakdown's name.
    pub breakdown: Label,
    /// `all`, or the unit's value.
    pub value: Label,
    /// The step reached (1-based).
    pub step: u8,
    /// Shortest time from a step-1 event of the window to the step, ms.
    pub ttc_ms: u64,
    /// The unit's Horvitz–Thompson weight at this step, millionths (see [`Entry`]).
    pub weight_micros: u64,
}

/// The key of one funnel row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FunnelKey {
    /// Entry window start.
    pub window_start_ms: u64,
    /// Restricted route.
    pub restricted: bool,
    /// Index of the funnel in the definitions.
    pub funnel: u16,
    /// `all`, or the breakdown's name.
    pub breakdown: Label,
    /// The breakdown value.
    pub value: Label,
    /// The step (1-based).
    pub step: u8,
}

impl WindowKey for FunnelKey {
    fn window_start_ms(&self) -> u64 {
        self.window_start_ms
    }
}

/// What a funnel saves, as of a frontier, per route: each unit's progress in its open entry
/// windows, and the entry windows already closed whose rows are not yet known to be written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Saved {
    /// A unit's progress (keyed by route and unit).
    Unit(Progress),
    /// A closed entry window's rows of one route (keyed by route and 0).
    Closed(ClosedWindow<FunnelKey, LatencyHistogram>),
}

/// A saved record with its key: `(restricted, unit)`.
pub type SavedFunnel = ((bool, u64), Saved);

/// Where one funnel resumes from.
pub type FunnelResume = Resume<SavedFunnel>;

/// Where a long-horizon operator resumes from.
#[derive(Clone, Debug)]
pub struct Resume<D> {
    /// This worker's share of the restored records, each with its time.
    pub restored: Vec<(D, Time)>,
    /// The frontier of the restored state: input before it is in `restored` (0: none).
    pub restored_at: Time,
    /// Entry windows whose horizon is at or before this are written already.
    pub written_before: Time,
    /// Fingerprint of the definition, saved with its state.
    pub definition: u64,
}

impl<D> Default for Resume<D> {
    fn default() -> Self {
        Resume {
            restored: Vec::new(),
            restored_at: 0,
            written_before: 0,
            definition: 0,
        }
    }
}

/// Saving the funnels' state (see [`funnels`]).
pub use crate::state::StateHooks;

/// The funnels' outputs.
pub struct Funnels<'s> {
    /// Per entry window and funnel, for each key the units that reached the step (the
    /// histogram's count) and their times to convert (in the histogram's microseconds); each
    /// window once, at its horizon, at time `horizon − 1`.
    pub closed: StreamVec<'s, Time, ClosedWindow<FunnelKey, LatencyHistogram>>,
    /// Snapshots of every funnel's state, when state is saved.
    pub state: Option<StreamVec<'s, Time, StateShard<SavedFunnel>>>,
}

/// The events each funnel of `defs` reads, as [`select`] subscribers (one per funnel, in
/// order): a pipeline that selects its consumers' events in one pass adds these to it and
/// hands the streams to [`funnels_of`].
pub fn subscribers(defs: &[FunnelDef]) -> Vec<Subscriber> {
    defs.iter()
        .map(|def| Subscriber {
            restricted: None,
            names: def.names(),
        })
        .collect()
}

/// Every funnel of `defs` over the accepted `events`, resuming from `resume` (one per funnel,
/// or none), saving state with `hooks` when given: [`funnels_of`] over each funnel's events,
/// selected here.
pub fn funnels<'s, E>(
    events: VecCollection<'s, Time, E>,
    defs: Arc<[FunnelDef]>,
    windows: Windows,
    resume: &[FunnelResume],
    hooks: Option<&StateHooks>,
) -> Funnels<'s>
where
    E: std::borrow::Borrow<Event> + Clone + 'static,
{
    let scope = events.inner.scope();
    let selected = select(events.inner, &subscribers(&defs));
    funnels_of(scope, selected, defs, windows, resume, hooks)
}

/// Every funnel of `defs`, each over its own events (`events[i]`: the events
/// [`subscribers`]`(defs)[i]` reads), resuming from `resume` (one per funnel, or none), saving
/// state with `hooks` when given.
///
/// Each funnel is one operator on worker 0 (every touch is exchanged to it): it buffers
/// touches until the frontier passes their time, applies them to their unit's [`Progress`]
/// in sequence order, and emits each entry window once the frontier passes its horizon. A
/// touch costs a hash lookup and a few comparisons per open entry window of its unit, so one
/// worker keeps up with the whole input (measured in `benches/REPORT.md`); sharding it needs
/// the workers to agree on a snapshot frontier, which the multi-process cluster brings.
///
/// State is saved every `hooks.every_ms` of event time at `S` = the operator's input frontier:
/// every unit's progress (every touch before `S` applied, none after) and the closed windows
/// whose rows are not yet durable (`hooks.outputs`). A snapshot is emitted under a capability
/// held at the previous one's `S`, so the durable frontier, which gates offset commits, never
/// passes state that is not saved (see ARCHITECTURE.md, "Long-horizon state").
pub fn funnels_of<'s, E>(
    scope: Scope<'s, Time>,
    events: Vec<StreamVec<'s, Time, (E, Time, isize)>>,
    defs: Arc<[FunnelDef]>,
    windows: Windows,
    resume: &[FunnelResume],
    hooks: Option<&StateHooks>,
) -> Funnels<'s>
where
    E: std::borrow::Borrow<Event> + Clone + 'static,
{
    assert_eq!(
        events.len(),
        defs.len(),
        "funnels_of: one stream per funnel"
    );
    let mut closed = Vec::new();
    let mut shards = Vec::new();
    for ((index, def), events) in defs.iter().enumerate().zip(events) {
        let from = resume.get(index).cloned().unwrap_or_default();
        let def = Arc::new(def.clone());
        let mut memo = BreakdownMemo::new(&def);
        let of = Arc::clone(&def);
        let restored_at = from.restored_at;
        // Input before the restored frontier is in the restored state.
        let touches = events.flat_map(move |(e, time, diff)| {
            (time >= restored_at)
                .then(|| of.touch_of(e.borrow(), &mut memo))
                .flatten()
                .map(|touch| (touch, time, diff))
        });
        let (windows_out, state_out) =
            funnel_operator(touches, def, index as u16, windows, from, hooks);
        closed.push(windows_out);
        shards.extend(state_out);
    }
    let state = if shards.is_empty() {
        None
    } else {
        Some(scope.concatenate(shards))
    };
    Funnels {
        closed: scope.concatenate(closed),
        state,
    }
}

/// An open entry window of a funnel: the capability to emit it (at `horizon − 1`) and the
/// units that entered it.
struct OpenWindow {
    capability: Option<Capability<Time>>,
    units: Vec<(bool, u64)>,
}

/// One funnel's operator (see [`funnels`]).
#[allow(clippy::type_complexity)]
fn funnel_operator<'s>(
    touches: StreamVec<'s, Time, (((bool, u64), Touch), Time, isize)>,
    def: Arc<FunnelDef>,
    index: u16,
    windows: Windows,
    from: FunnelResume,
    hooks: Option<&StateHooks>,
) -> (
    StreamVec<'s, Time, ClosedWindow<FunnelKey, LatencyHistogram>>,
    Option<StreamVec<'s, Time, StateShard<SavedFunnel>>>,
) {
    let scope = touches.scope();
    let worker = scope.index();
    let mut builder = OperatorBuilder::new(format!("Funnel({})", def.name), scope);
    let activator = scope.activator_for(builder.operator_info().address);
    let to_first = Exchange::new(|_: &(((bool, u64), Touch), Time, isize)| 0u64);
    let mut input = builder.new_input(touches, to_first);
    let (closed_out, closed) =
        builder.new_output::<Vec<ClosedWindow<FunnelKey, LatencyHistogram>>>();
    let (state_out, state) = builder.new_output::<Vec<StateShard<SavedFunnel>>>();
    let mut closed_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(closed_out);
    let mut state_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(state_out);
    let hooks = hooks.cloned();
    let saving = hooks.is_some();
    let window_ms = def.window_ms;
    let horizon = move |start: u64| windows.end_of(start) + window_ms;
    builder.build(move |capabilities| {
        let (mut restore_cap, mut schedule) =
            Schedule::on_worker_zero(capabilities, worker, saving, from.restored_at);
        let mut units: HashMap<(bool, u64), Progress, foldhash::fast::RandomState> =
            HashMap::default();
        // (horizon, window start) → the window.
        let mut open: BTreeMap<(Time, u64), OpenWindow> = BTreeMap::new();
        // Closed windows whose rows are not known to be durable yet (kept for snapshots).
        let mut unwritten: BTreeMap<(Time, u64), ClosedWindow<FunnelKey, LatencyHistogram>> =
            BTreeMap::new();
        // Touches not yet applied: at or after the input frontier.
        let mut pending: Pending<((bool, u64), Touch)> = Pending::default();
        let mut applied_to: Time = from.restored_at;
        // The restored state, installed on the first activation (worker 0 only).
        let mut restored = Some(from.restored);
        let written_before = from.written_before;
        move |frontiers| {
            let mut closed_out = closed_out.activate();
            let mut state_out = state_out.activate();
            if let (Some(records), Some(cap)) = (restored.take(), restore_cap.as_ref()) {
                let mut closed: BTreeMap<(Time, u64), ClosedWindow<FunnelKey, LatencyHistogram>> =
                    BTreeMap::new();
                for ((key, record), _) in records {
                    match record {
                        Saved::Unit(progress) => {
                            for entry in &progress.entries {
                                let start = entry.window_start_ms;
                                let h = horizon(start);
                                let window = open.entry((h, start)).or_insert_with(|| OpenWindow {
                                    capability: Some(cap.delayed(&h.saturating_sub(1))),
                                    units: Vec::new(),
                                });
                                window.units.push(key);
                            }
                            units.insert(key, progress);
                        }
                        Saved::Closed(mut window) => {
                            // One record per route: the window's rows are merged again.
                            let start = window.window_start_ms;
                            match closed.entry((horizon(start), start)) {
                                std::collections::btree_map::Entry::Occupied(mut o) => {
                                    o.get_mut().entries.append(&mut window.entries);
                                    o.get_mut().entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                                }
                                std::collections::btree_map::Entry::Vacant(v) => {
                                    v.insert(window);
                                }
                            }
                        }
                    }
                }
                for ((h, _), window) in closed {
                    closed_out
                        .session(&cap.delayed(&h.saturating_sub(1)))
                        .give(window.clone());
                    if saving {
                        unwritten.insert((h, window.window_start_ms), window);
                    }
                }
            }
            restore_cap = None;
            input.for_each(|cap, data| {
                for ((key, touch), time, diff) in data.drain(..) {
                    if touch.steps & 1 != 0 {
                        let start = windows.start_of(touch.at_ms);
                        let h = horizon(start);
                        open.entry((h, start)).or_insert_with(|| OpenWindow {
                            capability: Some(cap.delayed(&h.saturating_sub(1), 0)),
                            units: Vec::new(),
                        });
                    }
                    pending.add(time, (key, touch), diff);
                }
            });
            if worker != 0 {
                return;
            }
            let frontier = input_frontier(frontiers);
            if frontier > applied_to {
                let ready = pending.take_before(frontier, |(_, t)| (t.at_ms, t.order));
                for (key, touch) in &ready {
                    // A step-1 event may enter a new unit; any other only follows a known one.
                    let progress = if touch.steps & 1 != 0 {
                        units.entry(*key).or_default()
                    } else {
                        match units.get_mut(key) {
                            Some(progress) => progress,
                            None => continue,
                        }
                    };
                    if let Some(start) = progress.apply(&def, windows, touch)
                        && let Some(window) = open.get_mut(&(horizon(start), start))
                    {
                        window.units.push(*key);
                    }
                }
                applied_to = frontier;
            }
            // Entry windows whose horizon the frontier has passed are final.
            while let Some((&(h, start), _)) = open.first_key_value() {
                if frontier < h {
                    break;
                }
                let Some((_, window)) = open.pop_first() else {
                    break;
                };
                let mut rows: HashMap<FunnelKey, LatencyHistogram, foldhash::fast::RandomState> =
                    HashMap::default();
                for key in &window.units {
                    let Some(progress) = units.get_mut(key) else {
                        continue;
                    };
                    if let Some(entry) = progress.take(start) {
                        for reach in entry.reaches() {
                            let sample = LatencyHistogram::from_weighted_sample(
                                reach.ttc_ms.saturating_mul(1000),
                                reach.weight_micros,
                            );
                            match rows.entry(FunnelKey {
                                window_start_ms: start,
                                restricted: key.0,
                                funnel: index,
                                breakdown: reach.breakdown,
                                value: reach.value,
                                step: reach.step,
                            }) {
                                std::collections::hash_map::Entry::Occupied(mut o) => {
                                    o.get_mut().plus_equals(&sample)
                                }
                                std::collections::hash_map::Entry::Vacant(v) => {
                                    v.insert(sample);
                                }
                            }
                        }
                    }
                    if progress.entries.is_empty() {
                        units.remove(key);
                    }
                }
                // Windows a restart without state saw only in part are not written.
                if rows.is_empty() || h <= written_before {
                    continue;
                }
                let mut entries: Vec<(FunnelKey, LatencyHistogram)> = rows.into_iter().collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                let closed = ClosedWindow {
                    window_start_ms: start,
                    window_end_ms: windows.end_of(start),
                    entries,
                };
                if let Some(cap) = window.capability.as_ref() {
                    closed_out.session(cap).give(closed.clone());
                }
                if saving {
                    unwritten.insert((h, start), closed);
                }
            }
            let Some(hooks) = hooks.as_ref() else {
                return;
            };
            let written = hooks.written();
            while let Some((&(h, _), _)) = unwritten.first_key_value() {
                if written < h {
                    break;
                }
                unwritten.pop_first();
            }
            let s = applied_to;
            if !schedule.due(s, frontier, hooks, &activator) {
                return;
            }
            let mut records: Vec<(SavedFunnel, Time)> = units
                .iter()
                .map(|(key, progress)| ((*key, Saved::Unit(progress.clone())), s))
                .collect();
            for window in unwritten.values() {
                for restricted in [false, true] {
                    let entries: Vec<_> = window
                        .entries
                        .iter()
                        .filter(|(k, _)| k.restricted == restricted)
                        .cloned()
                        .collect();
                    if !entries.is_empty() {
                        let part = ClosedWindow {
                            window_start_ms: window.window_start_ms,
                            window_end_ms: window.window_end_ms,
                            entries,
                        };
                        records.push((((restricted, 0), Saved::Closed(part)), s));
                    }
                }
            }
            schedule.take(
                s,
                &def.state_name(),
                from.definition,
                records,
                |cap, shard| state_out.session(cap).give(shard),
            );
        }
    });
    (closed, saving.then_some(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(order: Order, steps: usize, window_ms: u64) -> FunnelDef {
        let names = [
            "project_viewed",
            "project_created",
            "task_assigned",
            "project_feedback_submitted",
        ];
        FunnelDef {
            name: "f".into(),
            unit: Field::UserId,
            steps: names[..steps]
                .iter()
                .map(|n| Matcher {
                    event: EventName::from_name(n).unwrap(),
                    filters: Vec::new(),
                })
                .collect(),
            window_ms,
            order,
            exclusions: Vec::new(),
            breakdowns: Vec::new(),
        }
    }

    fn touch(at_ms: u64, steps: u32, exclusions: u32) -> Touch {
        Touch {
            at_ms,
            order: at_ms,
            steps,
            exclusions,
            breakdown: Arc::from(Vec::new()),
            weight_micros: unit_weight(),
        }
    }

    /// The rows of every entry window after applying `touches` in order.
    fn reaches_of(d: &FunnelDef, windows: Windows, touches: &[Touch]) -> Vec<Reach> {
        let mut progress = Progress::default();
        for touch in touches {
            progress.apply(d, windows, touch);
        }
        progress.entries.iter().flat_map(Entry::reaches).collect()
    }

    fn steps_of(d: &FunnelDef, touches: &[Touch]) -> Vec<(u8, u64)> {
        reaches_of(d, Windows::new(60_000), touches)
            .into_iter()
            .map(|r| (r.step, r.ttc_ms))
            .collect()
    }

    #[test]
    fn ordered_chains_skip_other_events_and_respect_the_window() {
        let d = def(Order::Ordered, 3, 10_000);
        let t = [
            touch(1_000, 1, 0),
            touch(2_000, 0, 0),
            touch(3_000, 2, 0),
            touch(12_000, 4, 0),
        ];
        // Step 3 at 12 s is 11 s after t₁: outside the 10 s window.
        assert_eq!(steps_of(&d, &t), vec![(1, 0), (2, 2_000)]);
        let d = def(Order::Ordered, 3, 11_000);
        assert_eq!(steps_of(&d, &t), vec![(1, 0), (2, 2_000), (3, 11_000)]);
    }

    #[test]
    fn strict_chains_break_on_any_other_event() {
        let d = def(Order::Strict, 3, 60_000);
        let t = [
            touch(1_000, 1, 0),
            touch(2_000, 0, 0),
            touch(3_000, 2, 0),
            touch(4_000, 4, 0),
        ];
        assert_eq!(steps_of(&d, &t), vec![(1, 0)]);
        let t = [touch(1_000, 1, 0), touch(3_000, 2, 0), touch(4_000, 4, 0)];
        assert_eq!(steps_of(&d, &t), vec![(1, 0), (2, 2_000), (3, 3_000)]);
    }

    #[test]
    fn unordered_chains_count_distinct_steps() {
        let d = def(Order::Unordered, 3, 60_000);
        // Step 3 before step 2, both after t₁; an event matching 2 and 3 counts once.
        let t = [touch(1_000, 1, 0), touch(2_000, 4, 0), touch(3_000, 6, 0)];
        assert_eq!(steps_of(&d, &t), vec![(1, 0), (2, 1_000), (3, 2_000)]);
        let t = [touch(1_000, 1, 0), touch(2_000, 6, 0)];
        assert_eq!(steps_of(&d, &t), vec![(1, 0), (2, 1_000)]);
    }

    #[test]
    fn exclusions_break_chains_between_their_steps() {
        let mut d = def(Order::Ordered, 3, 60_000);
        d.exclusions.push(Exclusion {
            matcher: d.steps[0].clone(),
            from_step: 2,
            to_step: 3,
        });
        // 1, 2, X, 3: the chain to 3 has X between its steps 2 and 3.
        let t = [
            touch(1_000, 1, 0),
            touch(2_000, 2, 0),
            touch(3_000, 0, 1),
            touch(4_000, 4, 0),
        ];
        assert_eq!(steps_of(&d, &t), vec![(1, 0), (2, 1_000)]);
        // 1, X, 2, 3: X is before step 2, outside the span.
        let t = [
            touch(1_000, 1, 0),
            touch(2_000, 0, 1),
            touch(3_000, 2, 0),
            touch(4_000, 4, 0),
        ];
        assert_eq!(steps_of(&d, &t), vec![(1, 0), (2, 2_000), (3, 3_000)]);
        // 1, 2, X, 2, 3: the later step 2 starts a chain without X.
        let t = [
            touch(1_000, 1, 0),
            touch(2_000, 2, 0),
            touch(3_000, 0, 1),
            touch(4_000, 2, 0),
            touch(5_000, 4, 0),
        ];
        assert_eq!(steps_of(&d, &t), vec![(1, 0), (2, 1_000), (3, 4_000)]);
    }

    #[test]
    fn one_row_per_entry_window_with_the_fastest_chain() {
        let d = def(Order::Ordered, 2, 120_000);
        // Two step-1 events in window 0, one in window 60 s; one step 2 at 70 s.
        let t = [
            touch(1_000, 1, 0),
            touch(50_000, 1, 0),
            touch(65_000, 1, 0),
            touch(70_000, 2, 0),
        ];
        let rows: Vec<(u64, u8, u64)> = reaches_of(&d, Windows::new(60_000), &t)
            .into_iter()
            .map(|r| (r.window_start_ms, r.step, r.ttc_ms))
            .collect();
        assert_eq!(
            rows,
            vec![
                (0, 1, 0),
                (0, 2, 20_000),
                (60_000, 1, 0),
                (60_000, 2, 5_000)
            ]
        );
    }
}
