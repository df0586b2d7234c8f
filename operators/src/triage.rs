//! P1 triage: every critical feedback (score ≤ 2, or blocked, by default) becomes one record
//! with the context a support ticket needs, joined with the same user's *recent errors*: the
//! error events in the span before the feedback (15 minutes by default).
//!
//! It is a join, not a lookup: errors that arrive after the feedback, within the allowed
//! lateness, still count, so a record is emitted once, when the feedback's window closes. Both
//! sides are keyed by `(route, user link)` (the link follows a user across key periods) and live
//! in the collection until they can no longer matter, retracted by a delayed negation as the
//! funnels' touches are: an error until the window of `its time + span` has closed, a feedback
//! until its own window has. A `reduce` per user pairs each feedback with its errors; the
//! records are closed at their window's end like any window. The state is the live items, saved
//! and restored as the funnels' is.

use std::sync::Arc;

use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use sightline_schemas::{Event, EventType, Label};
use timely::dataflow::StreamVec;
use timely::dataflow::operators::Concat;
use timely::dataflow::operators::vec::{Filter, Map, ToStream};

use crate::close::{ClosedWindow, close_at};
use crate::funnel::{Resume, StateHooks, fnv1a};
use crate::state::{SnapshotSettings, StateShard, snapshots};
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

impl TriageRules {
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
                .or_else(|| {
                    event
                        .kept
                        .measure("status_code")
                        .map(|s| Label::from(format!("{s}").as_str()))
                });
            TriageItem::Error {
                at_ms,
                order: fnv1a(event.event_id.as_bytes()),
                name: Label::from(event.event_name.as_str()),
                code,
            }
        } else if event.event_name.as_str() == "project_feedback_submitted" {
            let score = event.kept.measure("score");
            let blocked = event.kept.measure("blocked") == Some(1.0);
            let critical = score.is_some_and(|s| s <= self.max_score) || (self.blocked && blocked);
            if !critical {
                return None;
            }
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

    /// When an item stops mattering: an error once the window of its time plus the span has
    /// closed, a feedback once its own window has.
    pub fn expiry(&self, windows: Windows, item: &TriageItem, time: Time) -> Time {
        let until = match item {
            TriageItem::Error { .. } => time.saturating_add(self.recent_errors_ms),
            TriageItem::Feedback { .. } => time,
        };
        windows.end_of(windows.start_of(until))
    }

    /// The records of one user from their live items (a pure function).
    pub fn records(
        &self,
        windows: Windows,
        restricted: bool,
        items: &[&TriageItem],
    ) -> Vec<TriageRecord> {
        let mut errors: Vec<(u64, u64, &Label, &Option<Label>)> = items
            .iter()
            .filter_map(|i| match i {
                TriageItem::Error {
                    at_ms,
                    order,
                    name,
                    code,
                } => Some((*at_ms, *order, name, code)),
                _ => None,
            })
            .collect();
        errors.sort();
        items
            .iter()
            .filter_map(|i| match i {
                TriageItem::Feedback { at_ms, context } => Some(TriageRecord {
                    window_start_ms: windows.start_of(*at_ms),
                    restricted,
                    at_ms: *at_ms,
                    context: (**context).clone(),
                    errors: errors
                        .iter()
                        .filter(|(t, ..)| *t <= *at_ms && *t + self.recent_errors_ms >= *at_ms)
                        .map(|(t, _, name, code)| (*t, (*name).clone(), (*code).clone()))
                        .collect(),
                }),
                _ => None,
            })
            .collect()
    }
}

/// Triage's outputs: the closed records, and the snapshots of its state when it is saved.
pub type Triage<'s> = (
    StreamVec<'s, Time, ClosedWindow<TriageRecord, isize>>,
    Option<StreamVec<'s, Time, StateShard<SavedItem>>>,
);

/// Triage over the accepted `events`: each critical feedback's record, once, when its window
/// closes. Resumes from `resume` and saves its state with `hooks`, as the funnels do.
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
    let rules = Arc::new(rules);
    let of = Arc::clone(&rules);
    let restored_at = resume.restored_at;
    let read = events
        .flat_map(move |e| of.item_of(e.borrow()))
        .inner
        .filter(move |(_, time, _)| *time >= restored_at);
    let restored = resume
        .restored
        .into_iter()
        .map(|(item, time)| (item, time, 1isize))
        .to_stream(scope);
    let items = read.concat(restored).as_collection();
    let expiry = Arc::clone(&rules);
    let state = hooks.map(|hooks| {
        let expiry = Arc::clone(&expiry);
        snapshots(
            items.inner.clone(),
            move |(_, item): &SavedItem, t| expiry.expiry(windows, item, t),
            SnapshotSettings {
                operator: "triage".into(),
                definition: resume.definition,
                every_ms: hooks.every_ms,
                restored_at,
                flush: Arc::clone(&hooks.flush),
            },
            hooks.outputs.clone(),
            hooks.durable.clone(),
        )
    });
    let negated = {
        let expiry = Arc::clone(&expiry);
        items
            .clone()
            .inner
            .map(move |((key, item), time, diff): (SavedItem, Time, isize)| {
                let until = expiry.expiry(windows, &item, time);
                ((key, item), until, -diff)
            })
    };
    // A delayed negation whose delay depends on the item: each is sent at its own expiry.
    let negated = delay_each(negated);
    let live = items.concat(negated.as_collection());
    let logic = Arc::clone(&rules);
    let records = live.reduce_named(
        "Triage",
        move |(restricted, _user): &(bool, u64),
              input: &[(&TriageItem, isize)],
              output: &mut Vec<(TriageRecord, isize)>| {
            let items: Vec<&TriageItem> = input
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(i, _)| *i)
                .collect();
            output.extend(
                logic
                    .records(windows, *restricted, &items)
                    .into_iter()
                    .map(|r| (r, 1)),
            );
        },
    );
    let written_before = resume.written_before;
    let keyed = records
        .map(|(_, record)| record)
        .inner
        .filter(move |(record, time, _)| {
            let horizon = windows.end_of(record.window_start_ms);
            *time < horizon && horizon > written_before
        })
        .as_collection();
    (
        close_at(
            keyed,
            windows,
            move |r: &TriageRecord| windows.end_of(r.window_start_ms),
            "CloseTriage",
        ),
        state,
    )
}

/// Sends each update at its own (later) time: the capability of its message, delayed.
fn delay_each<'s, D: timely::ExchangeData>(
    updates: StreamVec<'s, Time, (D, Time, isize)>,
) -> StreamVec<'s, Time, (D, Time, isize)> {
    use timely::dataflow::channels::pact::Pipeline;
    use timely::dataflow::operators::generic::Operator;
    updates.unary(Pipeline, "DelayEach", |_, _| {
        move |input, output| {
            input.for_each(|cap, data| {
                for (d, t, r) in data.drain(..) {
                    let Some(held) = cap.retain_least(0) else {
                        continue;
                    };
                    let at = t.max(*held.time());
                    output.session(&held.delayed(&at)).give((d, at, r));
                }
            });
        }
    })
}
