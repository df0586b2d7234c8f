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
//! - **Breakdowns** are first-touch: the unit's value in `W` is the value on its first step-1
//!   event in `W` (`(none)` when that event has no value; for experiments, each experiment the
//!   event carries an assignment of).
//!
//! # Dataflow and state
//!
//! Each event becomes a [`Touch`] (time, order hash, which steps and exclusions it matches,
//! the breakdown values of a step-1 event) keyed by `(route, unit)`. Touches live in the
//! collection from their time until their **expiry**, `start of the event's window + window
//! width + C`, when a delayed negation retracts them (a temporal filter, scheduled in timely
//! time): no entry window they can affect is still open by then. A `reduce` keyed by unit
//! computes the unit's [`Reach`]es from its live touches; when a touch arrives late or
//! expires, the old reaches are retracted and the new ones added. Reaches become counts and
//! time-to-convert histograms keyed by [`FunnelKey`], which [`close_at`] emits once, when the
//! frontier passes the entry window's end plus `C` (its *horizon*). Updates at or after a
//! key's horizon are the expiry's retractions and are dropped before closing.
//!
//! State per active unit: its live touches (about 80 bytes each, plus the breakdown values of
//! step-1 events) in the reduce's input arrangement, and its reaches in the output
//! arrangement; a unit whose touches have all expired takes nothing.
//!
//! Routes: the unit key includes the route, so a chain never links a standard and a restricted
//! event; restricted chains are counted apart and written to the restricted lake.

use std::borrow::Cow;
use std::sync::Arc;

use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use sightline_schemas::{Event, EventName, Label};
use timely::dataflow::StreamVec;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::{Filter, ToStream};
use timely::dataflow::operators::{Concat, Concatenate};

use crate::close::{ClosedWindow, close_at};
use crate::histogram::LatencyHistogram;
use crate::state::{SnapshotSettings, StateShard, snapshots};
use crate::window::{Time, WindowKey, Windows};

/// Most steps a funnel may have (and most exclusions).
pub const MAX_STEPS: usize = 16;

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

fn platform_name(p: sightline_schemas::Platform) -> &'static str {
    use sightline_schemas::Platform::*;
    match p {
        Web => "web",
        Ios => "ios",
        Android => "android",
        Cli => "cli",
        Api => "api",
    }
}

fn source_name(s: sightline_schemas::Source) -> &'static str {
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

    /// The name the funnel's state is saved under.
    pub fn state_name(&self) -> String {
        format!("funnel-{}", self.name)
    }

    /// The touch of `event`, keyed by `(restricted, unit)`; `None` for an event that takes
    /// no part in the funnel.
    pub fn touch_of(&self, event: &Event, empty: &Breakdowns) -> Option<((bool, u64), Touch)> {
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
            self.breakdown_of(event)
        } else {
            empty.clone()
        };
        Some((
            (event.is_restricted(), unit),
            Touch {
                at_ms: event.event_time_ms.max(0) as u64,
                order: fnv1a(event.event_id.as_bytes()),
                steps,
                exclusions,
                breakdown,
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

    /// The reaches of one unit from its live touches, sorted in sequence order (a pure
    /// function: the reference tests and the operator both call it).
    pub fn reaches(&self, windows: Windows, touches: &[&Touch]) -> Vec<Reach> {
        let mut out = Vec::new();
        let n = self.steps.len();
        let mut i = 0;
        while i < touches.len() {
            if touches[i].steps & 1 == 0 {
                i += 1;
                continue;
            }
            // The step-1 events of one entry window.
            let start = windows.start_of(touches[i].at_ms);
            let first = i;
            let mut fastest = vec![u64::MAX; n];
            let mut j = i;
            while j < touches.len() && windows.start_of(touches[j].at_ms) == start {
                if touches[j].steps & 1 != 0 {
                    let t1 = touches[j].at_ms;
                    for (k, at) in self.chain(touches, j).into_iter().enumerate() {
                        if let Some(at) = at {
                            fastest[k] = fastest[k].min(at - t1);
                        }
                    }
                }
                j += 1;
            }
            let reached = fastest.iter().take_while(|t| **t != u64::MAX).count();
            let all = (crate::product::ALL.clone(), crate::product::ALL.clone());
            for (breakdown, value) in std::iter::once(&all).chain(touches[first].breakdown.iter()) {
                for (k, ttc) in fastest.iter().take(reached).enumerate() {
                    out.push(Reach {
                        window_start_ms: start,
                        breakdown: breakdown.clone(),
                        value: value.clone(),
                        step: (k + 1) as u8,
                        ttc_ms: *ttc,
                    });
                }
            }
            i = j;
        }
        out
    }

    /// For the chain starting at the step-1 event `touches[i]`: when each step was first
    /// reached (`None` when it was not).
    fn chain(&self, touches: &[&Touch], i: usize) -> Vec<Option<u64>> {
        let n = self.steps.len();
        let all: u32 = if n >= 32 { u32::MAX } else { (1 << n) - 1 };
        let t1 = touches[i].at_ms;
        let deadline = t1.saturating_add(self.window_ms);
        let mut first = vec![None; n];
        first[0] = Some(t1);
        let later = touches[i + 1..]
            .iter()
            .take_while(|t| t.at_ms <= deadline)
            .copied();
        match self.order {
            Order::Strict => {
                // Bit k: the chain has just reached step k + 1; any other event ends it.
                let mut alive: u32 = 1;
                for touch in later {
                    alive = (alive << 1) & touch.steps & all;
                    for (k, at) in first.iter_mut().enumerate() {
                        if at.is_none() && alive & (1 << k) != 0 {
                            *at = Some(touch.at_ms);
                        }
                    }
                    if alive == 0 {
                        break;
                    }
                }
            }
            Order::Ordered => {
                // ceiling[k]: among the chains that have reached step k + 1, the highest step
                // one of them may still reach (0: none has). An exclusion lowers the ceiling
                // of the chains it falls inside to the step before its `to`; keeping only the
                // highest ceiling per step is enough, as such a chain can do whatever a chain
                // with a lower one can.
                let mut ceiling = vec![0usize; n];
                ceiling[0] = n;
                for touch in later {
                    for (x, exclusion) in self.exclusions.iter().enumerate() {
                        if touch.exclusions & (1 << x) != 0 {
                            let to = exclusion.to_step.min(n);
                            for c in ceiling
                                .iter_mut()
                                .take(to.saturating_sub(1))
                                .skip(exclusion.from_step.saturating_sub(1))
                            {
                                *c = (*c).min(to - 1);
                            }
                        }
                    }
                    for k in (1..n).rev() {
                        if touch.steps & (1 << k) != 0 && ceiling[k - 1] > k {
                            ceiling[k] = ceiling[k].max(ceiling[k - 1]);
                            if first[k].is_none() {
                                first[k] = Some(touch.at_ms);
                            }
                        }
                    }
                }
            }
            Order::Unordered => {
                // t₁ takes step 1; each later event may take one other step: a maximum
                // matching of events to distinct steps, grown one event at a time.
                let mut masks: Vec<u32> = Vec::new();
                let mut taken: Vec<Option<usize>> = vec![None; n];
                let mut done = 1;
                for touch in later {
                    if touch.exclusions != 0 {
                        break;
                    }
                    let mask = touch.steps & all & !1;
                    if mask == 0 {
                        continue;
                    }
                    masks.push(mask);
                    let event = masks.len() - 1;
                    if augment(event, &masks, &mut taken, &mut 0) {
                        first[done] = Some(touch.at_ms);
                        done += 1;
                        if done == n {
                            break;
                        }
                    }
                }
            }
        }
        first
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

/// What a funnel saves: a touch with its unit key (route, unit).
pub type SavedTouch = ((bool, u64), Touch);

/// Where one funnel resumes from.
pub type FunnelResume = Resume<SavedTouch>;

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

/// Saving the funnels' state ([`crate::state::snapshots`]).
#[derive(Clone, Debug)]
pub struct StateHooks {
    /// Event time between two snapshots, ms.
    pub every_ms: u64,
    /// Durable frontier of the outputs other than saved state.
    pub outputs: ProbeHandle<Time>,
    /// Durable frontier of everything.
    pub durable: ProbeHandle<Time>,
    /// Set when the pipeline stops: save at once.
    pub flush: Arc<std::sync::atomic::AtomicBool>,
}

/// The funnels' outputs.
pub struct Funnels<'s> {
    /// Per entry window and key, the units that reached the step (the histogram's count) and
    /// their times to convert (in the histogram's microseconds); each window once, at its
    /// horizon.
    pub closed: StreamVec<'s, Time, ClosedWindow<FunnelKey, LatencyHistogram>>,
    /// Snapshots of every funnel's state, when state is saved.
    pub state: Option<StreamVec<'s, Time, StateShard<SavedTouch>>>,
}

/// Every funnel of `defs` over the accepted `events`, resuming from `resume` (one per funnel,
/// or none), saving state with `hooks` when given.
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
    let mut all = Vec::new();
    let mut shards = Vec::new();
    let mut written_before = Vec::new();
    for (index, def) in defs.iter().enumerate() {
        let from = resume.get(index).cloned().unwrap_or_default();
        written_before.push(from.written_before);
        let def = Arc::new(def.clone());
        let empty: Breakdowns = Arc::from(Vec::new());
        let of = Arc::clone(&def);
        let restored_at = from.restored_at;
        // Input before the restored frontier is in the restored state.
        let read = events
            .clone()
            .flat_map(move |e| of.touch_of(e.borrow(), &empty))
            .inner
            .filter(move |(_, time, _)| *time >= restored_at);
        let restored = from
            .restored
            .into_iter()
            .map(|(touch, time)| (touch, time, 1isize))
            .to_stream(scope);
        let touches = read.concat(restored).as_collection();
        let window_ms = def.window_ms;
        let expiry = move |t: &Time| windows.end_of(windows.start_of(*t)) + window_ms;
        if let Some(hooks) = hooks {
            let settings = SnapshotSettings {
                operator: def.state_name(),
                definition: from.definition,
                every_ms: hooks.every_ms,
                restored_at,
                flush: Arc::clone(&hooks.flush),
            };
            shards.push(snapshots(
                touches.inner.clone(),
                move |_, t| expiry(&t),
                settings,
                hooks.outputs.clone(),
                hooks.durable.clone(),
            ));
        }
        let live = touches.clone().concat(touches.negate().delay(expiry));
        let logic = Arc::clone(&def);
        let reaches = live.reduce_named(
            &format!("Funnel({})", def.name),
            move |_unit, input: &[(&Touch, isize)], output: &mut Vec<(Reach, isize)>| {
                let touches: Vec<&Touch> = input
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(t, _)| *t)
                    .collect();
                output.extend(logic.reaches(windows, &touches).into_iter().map(|r| (r, 1)));
            },
        );
        let funnel = index as u16;
        all.push(
            reaches.explode(move |((restricted, _unit), reach): SavedReach| {
                Some((
                    FunnelKey {
                        window_start_ms: reach.window_start_ms,
                        restricted,
                        funnel,
                        breakdown: reach.breakdown,
                        value: reach.value,
                        step: reach.step,
                    },
                    LatencyHistogram::from_sample(reach.ttc_ms.saturating_mul(1000)),
                ))
            }),
        );
    }
    let updates = differential_dataflow::collection::concatenate(scope, all);
    let horizon = {
        let defs = Arc::clone(&defs);
        move |key: &FunnelKey| {
            let window_ms = defs.get(usize::from(key.funnel)).map_or(0, |d| d.window_ms);
            windows.end_of(key.window_start_ms) + window_ms
        }
    };
    let before = horizon.clone();
    // Updates at or after a key's horizon are the expiry's retractions; windows whose horizon
    // is at or before the restart's are written.
    let updates = updates
        .inner
        .filter(move |(key, time, _)| {
            let h = before(key);
            let written = written_before
                .get(usize::from(key.funnel))
                .copied()
                .unwrap_or(0);
            *time < h && h > written
        })
        .as_collection();
    let state = if shards.is_empty() {
        None
    } else {
        Some(scope.concatenate(shards))
    };
    Funnels {
        closed: close_at(updates, windows, horizon, "CloseFunnels"),
        state,
    }
}

type SavedReach = ((bool, u64), Reach);

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
        }
    }

    fn steps_of(d: &FunnelDef, touches: &[Touch]) -> Vec<(u8, u64)> {
        let refs: Vec<&Touch> = touches.iter().collect();
        d.reaches(Windows::new(60_000), &refs)
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
        let refs: Vec<&Touch> = t.iter().collect();
        let rows: Vec<(u64, u8, u64)> = d
            .reaches(Windows::new(60_000), &refs)
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
