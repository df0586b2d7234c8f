//! P1 triage: every critical feedback (score ≤ 2, or blocked, by default) becomes one record
//! with the context a support ticket needs, joined with the same user's *recent errors*: the
//! error events in the span before the feedback (15 minutes by default).
//!
//! It is a join, not a lookup: errors that arrive after the feedback, within the allowed
//! lateness, still count, so a record is emitted once, when the feedback's window closes. Both
//! sides are keyed by `(route, user link)` (the link follows a user across key periods). The
//! operator ([`triage`]) keeps per user the errors a feedback may still count and the feedback
//! not yet written, and saves them as the funnels save their progress.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use sightline_schemas::{Event, EventType, Label};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::vec::Map;

use crate::close::ClosedWindow;
use crate::funnel::{Resume, StateHooks, fnv1a};
use crate::select::Names;
use crate::state::{Pending, Schedule, StateShard, input_frontier};
use crate::window::{Time, WindowKey, Windows};

/// Which feedback is critical.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TriageRules {
    /// Feedback with a score at or below this is critical.
    pub max_score: f64,
    /// Feedback that says the user was blocked is critical too.
    pub blocked: bool,
    /// How far before the feedback an error counts as recent, ms.
    pub recent_errors_ms: u64,
}

impl Default for TriageRules {
    fn default() -> Self {
        TriageRules {
            max_score: 2.0,
            blocked: true,
            recent_errors_ms: 15 * 60_000,
        }
    }
}

/// A critical feedback's context.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FeedbackContext {
    /// `event_id` of the feedback: the record's key.
    pub event_id: String,
    /// Tenant pseudonym.
    pub tenant_id: String,
    /// User pseudonym.
    pub user_id: String,
    /// `feature_area`.
    pub feature_area: Label,
    /// `workflow_name`, if any.
    pub workflow_name: Option<Label>,
    /// `surface`, if any.
    pub surface: Option<Label>,
    /// Experiment id → variant.
    pub experiments: Arc<[(Label, Label)]>,
    /// `correlation_id`, if kept.
    pub correlation_id: Option<Label>,
    /// The score (millionths, exact).
    pub score_millis: Option<i64>,
    /// Whether the user was blocked.
    pub blocked: bool,
    /// `sentiment`, if kept.
    pub sentiment: Option<Label>,
}

/// One item of a user's triage state.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TriageItem {
    /// An error event.
    Error {
        /// Event time, ms.
        at_ms: u64,
        /// Order among events at the same millisecond.
        order: u64,
        /// Its event name.
        name: Label,
        /// Its error code (`error_code`, `error_type` or `status_code`), if any.
        code: Option<Label>,
    },
    /// A critical feedback.
    Feedback {
        /// Event time, ms.
        at_ms: u64,
        /// Its context.
        context: Box<FeedbackContext>,
    },
}

impl TriageItem {
    /// The item's event time.
    pub fn at_ms(&self) -> u64 {
        match self {
            TriageItem::Error { at_ms, .. } | TriageItem::Feedback { at_ms, .. } => *at_ms,
        }
    }

    /// Its order among items at the same millisecond (a hash of the event id).
    pub fn order(&self) -> u64 {
        match self {
            TriageItem::Error { order, .. } => *order,
            TriageItem::Feedback { context, .. } => fnv1a(context.event_id.as_bytes()),
        }
    }
}

/// What triage saves: an item with its key (route, user link).
pub type SavedItem = ((bool, u64), TriageItem);

/// One P1 record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TriageRecord {
    /// The feedback's window start.
    pub window_start_ms: u64,
    /// Restricted route.
    pub restricted: bool,
    /// The feedback's time, ms.
    pub at_ms: u64,
    /// The feedback's context.
    pub context: FeedbackContext,
    /// Recent errors: `(time, event name, code)`, in time order.
    pub errors: Vec<(u64, Label, Option<Label>)>,
}

impl WindowKey for TriageRecord {
    fn window_start_ms(&self) -> u64 {
        self.window_start_ms
    }
}

/// The feedback event.
const FEEDBACK: &str = "project_feedback_submitted";

impl TriageRules {
    /// The events triage reads: errors and feedback (see [`crate::select`]).
    pub fn names() -> Names {
        Names::of(&[FEEDBACK], &[EventType::Error])
    }

    /// Whether `event` is critical feedback: a support ticket.
    pub fn is_critical(&self, event: &Event) -> bool {
        if event.event_name.as_str() != FEEDBACK {
            return false;
        }
        let score = event.kept.measure("score");
        let blocked = event.kept.measure("blocked") == Some(1.0);
        score.is_some_and(|s| s <= self.max_score) || (self.blocked && blocked)
    }

    /// The item `event` contributes, keyed by `(restricted, user link)`; `None` for events that
    /// are neither errors nor critical feedback, or that have no user link.
    pub fn item_of(&self, event: &Event) -> Option<((bool, u64), TriageItem)> {
        let user = event.links.user;
        if user == 0 {
            return None;
        }
        let at_ms = event.event_time_ms.max(0) as u64;
        let item = if event.event_type == EventType::Error {
            let code = ["error_code", "error_type"]
                .iter()
                .find_map(|f| event.kept.label(f).cloned())
                .or_else(|| event.kept.measure("status_code").map(status_label));
            TriageItem::Error {
                at_ms,
                order: fnv1a(event.event_id.as_bytes()),
                name: event.event_name.label(),
                code,
            }
        } else if event.event_name.as_str() == FEEDBACK {
            if !self.is_critical(event) {
                return None;
            }
            let score = event.kept.measure("score");
            let blocked = event.kept.measure("blocked") == Some(1.0);
            TriageItem::Feedback {
                at_ms,
                context: Box::new(FeedbackContext {
                    event_id: event.event_id.clone(),
                    tenant_id: event.tenant_id.as_str().to_owned(),
                    user_id: event.user_id.as_str().to_owned(),
                    feature_area: event.feature_area.clone(),
                    workflow_name: event.workflow_name.clone(),
                    surface: event.surface.clone(),
                    experiments: Arc::clone(&event.experiment_assignments),
                    correlation_id: event.kept.label("correlation_id").cloned(),
                    score_millis: score.map(|s| (s * 1000.0).round() as i64),
                    blocked,
                    sentiment: event.kept.label("sentiment").cloned(),
                }),
            }
        } else {
            return None;
        };
        Some(((event.is_restricted(), user), item))
    }
}

/// A status code as a label, made once per code and thread (a few codes repeat).
fn status_label(code: f64) -> Label {
    thread_local! {
        static CODES: std::cell::RefCell<HashMap<u64, Label>> = Default::default();
    }
    let make = || Label::from(format!("{code}").as_str());
    CODES.with(|codes| {
        let mut codes = codes.borrow_mut();
        if let Some(label) = codes.get(&code.to_bits()) {
            return label.clone();
        }
        let label = make();
        if codes.len() < 1024 {
            codes.insert(code.to_bits(), label.clone());
        }
        label
    })
}

/// Triage's outputs: the closed records, and the snapshots of its state when it is saved.
pub type Triage<'s> = (
    StreamVec<'s, Time, ClosedWindow<TriageRecord, isize>>,
    Option<StreamVec<'s, Time, StateShard<SavedItem>>>,
);

/// An error a user had, in sequence order: `(time, order, event name, code)`.
type UserError = (u64, u64, Label, Option<Label>);

/// A critical feedback a user gave: its time, context, and whether its record was emitted.
type UserFeedback = (u64, Box<FeedbackContext>, bool);

/// Feedback windows not yet closed: start → (capability at end − 1, users with feedback in it).
type FeedbackWindows = BTreeMap<u64, (Option<Capability<Time>>, Vec<(bool, u64)>)>;

/// One user's items: the errors that a feedback in the state or to come may still count, and
/// the feedback whose records are not known to be written.
#[derive(Default)]
struct UserItems {
    errors: VecDeque<UserError>,
    feedback: Vec<UserFeedback>,
}

impl UserItems {
    fn add(&mut self, item: TriageItem) {
        match item {
            TriageItem::Error {
                at_ms,
                order,
                name,
                code,
            } => self.errors.push_back((at_ms, order, name, code)),
            TriageItem::Feedback { at_ms, context } => self.feedback.push((at_ms, context, false)),
        }
    }

    /// Drops the errors no feedback from `from` on, nor any in the state, can count.
    fn prune(&mut self, from: u64, span: u64) {
        let oldest = self.feedback.iter().map(|f| f.0).min().unwrap_or(u64::MAX);
        let bound = from.min(oldest);
        while self
            .errors
            .front()
            .is_some_and(|e| e.0.saturating_add(span) < bound)
        {
            self.errors.pop_front();
        }
    }

    fn is_empty(&self) -> bool {
        self.errors.is_empty() && self.feedback.is_empty()
    }
}

/// Triage over the accepted `events`: each critical feedback's record, once, when its window
/// closes. Resumes from `resume` and saves its state with `hooks`.
///
/// One operator on worker 0, as a funnel: items wait until the frontier has passed their time
/// and are then added to their user's items in sequence order; when the frontier passes a
/// feedback window's end, every error before it is in, and each of its critical feedback gets
/// its record with the errors of the span before it. State: per user, the errors that a
/// feedback may still count (at most the span's) and the feedback whose records are not known
/// to be written; saved every `hooks.every_ms` at the operator's input frontier, as the
/// funnels' is, and a restart writes again the records not known written.
pub fn triage<'s, E>(
    events: VecCollection<'s, Time, E>,
    rules: TriageRules,
    windows: Windows,
    resume: Resume<SavedItem>,
    hooks: Option<&StateHooks>,
) -> Triage<'s>
where
    E: std::borrow::Borrow<Event> + Clone + 'static,
{
    let scope = events.inner.scope();
    let worker = scope.index();
    let rules = Arc::new(rules);
    let of = Arc::clone(&rules);
    let restored_at = resume.restored_at;
    let items = events.inner.flat_map(move |(e, time, diff)| {
        (time >= restored_at)
            .then(|| of.item_of(e.borrow()))
            .flatten()
            .map(|item| (item, time, diff))
    });
    let mut builder = OperatorBuilder::new("Triage".to_owned(), scope);
    let activator = scope.activator_for(builder.operator_info().address);
    let to_first = Exchange::new(|_: &(SavedItem, Time, isize)| 0u64);
    let mut input = builder.new_input(items, to_first);
    let (closed_out, closed) = builder.new_output::<Vec<ClosedWindow<TriageRecord, isize>>>();
    let (state_out, state) = builder.new_output::<Vec<StateShard<SavedItem>>>();
    let mut closed_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(closed_out);
    let mut state_out = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(state_out);
    let hooks = hooks.cloned();
    let saving = hooks.is_some();
    let span = rules.recent_errors_ms;
    builder.build(move |capabilities| {
        let (mut restore_cap, mut schedule) =
            Schedule::on_worker_zero(capabilities, worker, saving, resume.restored_at);
        let mut users: HashMap<(bool, u64), UserItems, foldhash::fast::RandomState> =
            HashMap::default();
        let mut open: FeedbackWindows = BTreeMap::new();
        // Closed windows whose records are not known to be written: end → users.
        let mut unwritten: BTreeMap<Time, Vec<(bool, u64)>> = BTreeMap::new();
        let mut pending = Pending::default();
        let mut applied_to = resume.restored_at;
        let mut restored = Some(resume.restored);
        let written_before = resume.written_before;
        move |frontiers| {
            let mut closed_out = closed_out.activate();
            let mut state_out = state_out.activate();
            if let (Some(records), Some(cap)) = (restored.take(), restore_cap.as_ref()) {
                let mut records = records;
                records.sort_by_key(|((_, item), _)| (item.at_ms(), item.order()));
                for ((key, item), _) in records {
                    if let TriageItem::Feedback { at_ms, .. } = &item {
                        let start = windows.start_of(*at_ms);
                        let end = windows.end_of(start);
                        open.entry(start)
                            .or_insert_with(|| (Some(cap.delayed(&(end - 1))), Vec::new()))
                            .1
                            .push(key);
                    }
                    users.entry(key).or_default().add(item);
                }
            }
            restore_cap = None;
            input.for_each(|cap, data| {
                for ((key, item), time, diff) in data.drain(..) {
                    if let TriageItem::Feedback { at_ms, .. } = &item {
                        let start = windows.start_of(*at_ms);
                        let end = windows.end_of(start);
                        open.entry(start)
                            .or_insert_with(|| (Some(cap.delayed(&(end - 1), 0)), Vec::new()));
                    }
                    pending.add(time, (key, item), diff);
                }
            });
            if worker != 0 {
                return;
            }
            let frontier = input_frontier(frontiers);
            if frontier > applied_to {
                let ready = pending.take_before(frontier, |(_, i)| (i.at_ms(), i.order()));
                for (key, item) in ready {
                    if let TriageItem::Feedback { at_ms, .. } = &item
                        && let Some((_, keys)) = open.get_mut(&windows.start_of(*at_ms))
                    {
                        keys.push(key);
                    }
                    users.entry(key).or_default().add(item);
                }
                applied_to = frontier;
            }
            let mut closed_any = false;
            while let Some((&start, _)) = open.first_key_value() {
                let end = windows.end_of(start);
                if frontier < end {
                    break;
                }
                let Some((_, (cap, keys))) = open.pop_first() else {
                    break;
                };
                closed_any = true;
                let mut records: Vec<(TriageRecord, isize)> = Vec::new();
                for key in &keys {
                    let Some(user) = users.get_mut(key) else {
                        continue;
                    };
                    let UserItems { errors, feedback } = user;
                    for (at_ms, context, emitted) in feedback.iter_mut() {
                        if *emitted || windows.start_of(*at_ms) != start {
                            continue;
                        }
                        *emitted = true;
                        records.push((
                            TriageRecord {
                                window_start_ms: start,
                                restricted: key.0,
                                at_ms: *at_ms,
                                context: (**context).clone(),
                                errors: errors
                                    .iter()
                                    .filter(|(t, ..)| *t <= *at_ms && *t + span >= *at_ms)
                                    .map(|(t, _, name, code)| (*t, name.clone(), code.clone()))
                                    .collect(),
                            },
                            1,
                        ));
                    }
                }
                unwritten.entry(end).or_default().extend(keys);
                // Windows a restart without state saw only in part are not written.
                if records.is_empty() || end <= written_before {
                    continue;
                }
                records.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                if let Some(cap) = cap.as_ref() {
                    closed_out.session(cap).give(ClosedWindow {
                        window_start_ms: start,
                        window_end_ms: end,
                        entries: records,
                    });
                }
            }
            // Feedback whose records are written leaves the state (all of it, when nothing
            // is saved); errors leave it once nothing can count them.
            let written = match hooks.as_ref() {
                Some(hooks) => hooks
                    .outputs
                    .with_frontier(|f| f.first().copied().unwrap_or(Time::MAX)),
                None => Time::MAX,
            };
            while let Some((&end, _)) = unwritten.first_key_value() {
                if written < end {
                    break;
                }
                let Some((_, keys)) = unwritten.pop_first() else {
                    break;
                };
                for key in keys {
                    if let Some(user) = users.get_mut(&key) {
                        user.feedback.retain(|(at, _, emitted)| {
                            !(*emitted && windows.end_of(windows.start_of(*at)) <= end)
                        });
                    }
                }
            }
            if closed_any {
                users.retain(|_, user| {
                    user.prune(applied_to, span);
                    !user.is_empty()
                });
            }
            let Some(hooks) = hooks.as_ref() else {
                return;
            };
            let s = applied_to;
            if !schedule.due(s, frontier, hooks, &activator) {
                return;
            }
            let mut records: Vec<(SavedItem, Time)> = Vec::new();
            for (key, user) in &users {
                for (at_ms, order, name, code) in &user.errors {
                    let item = TriageItem::Error {
                        at_ms: *at_ms,
                        order: *order,
                        name: name.clone(),
                        code: code.clone(),
                    };
                    records.push(((*key, item), s));
                }
                for (at_ms, context, _) in &user.feedback {
                    let item = TriageItem::Feedback {
                        at_ms: *at_ms,
                        context: context.clone(),
                    };
                    records.push(((*key, item), s));
                }
            }
            schedule.take(s, "triage", resume.definition, records, |cap, shard| {
                state_out.session(cap).give(shard)
            });
        }
    });
    (closed, saving.then_some(state))
}
