//! The windowed aggregates, each a function from collections to a collection whose key names a
//! window and whose difference is the aggregate itself.
//!
//! Every aggregate here is linear: its difference type is a count (`isize`) or a
//! [`LatencyHistogram`], both abelian, so the accumulated difference of a key *is* the
//! aggregate, insertions and retractions are exact, and batches merge in any order. Closing a
//! window (see [`crate::close_windows`]) reads that accumulation once the frontier has passed.
//!
//! The functions take any `E: Borrow<Event>`: the pipeline passes `Arc<Event>`, so that the
//! four aggregates share each event instead of each receiving a deep copy, and copy out only
//! the fields their keys need.

use std::borrow::{Borrow, Cow};

use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use sightline_schemas::{DeadLetter, Event, EventName, EventType, FailureKind};

use crate::histogram::LatencyHistogram;
use crate::window::{Time, WindowKey, Windows};

/// Key of `event_counts`: one window, event name, event type and feature area.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CountKey {
    /// Window start, ms since the epoch.
    pub window_start: u64,
    /// `event_name`.
    pub event_name: EventName,
    /// `event_type`.
    pub event_type: EventType,
    /// `feature_area`.
    pub feature_area: String,
}

/// Key of `latency`: one window, event name, feature area and surface (empty when absent).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LatencyKey {
    /// Window start, ms since the epoch.
    pub window_start: u64,
    /// `event_name`.
    pub event_name: EventName,
    /// `feature_area`.
    pub feature_area: String,
    /// `surface`, or the empty string when the event has none.
    pub surface: String,
}

/// Key of `latency_by_variant`: one window, event name, experiment and variant.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VariantKey {
    /// Window start, ms since the epoch.
    pub window_start: u64,
    /// `event_name`.
    pub event_name: EventName,
    /// An experiment id from `experiment_assignments`.
    pub experiment_id: String,
    /// The event's bucket in that experiment.
    pub variant: String,
}

/// What a `quality` count counts: records by outcome (accepted, or rejected for a reason,
/// late included), and the privacy layer's work on accepted events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// Records decoded, validated and inside the watermark.
    Accepted,
    /// Records sent to the dead-letter path.
    Rejected(FailureKind),
    /// Identifier and contact fields of accepted events, pseudonymized.
    PseudonymizedFields,
    /// Free-text fields of accepted events in which personal data or a secret was scrubbed.
    ScrubbedFields,
    /// Fields of accepted events dropped by policy (IPs, secrets, geo without consent).
    DroppedFields,
    /// Accepted events that carried personal data where they should not (scrubbed or dropped
    /// fields): the platform spec's "PII violations".
    PiiViolations,
}

impl Outcome {
    /// `accepted`, the failure kind's name, or the privacy counter's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Rejected(kind) => kind.as_str(),
            Outcome::PseudonymizedFields => "pseudonymized_fields",
            Outcome::ScrubbedFields => "scrubbed_fields",
            Outcome::DroppedFields => "dropped_fields",
            Outcome::PiiViolations => "pii_violations",
        }
    }
}

/// Key of `quality`: one window, event name (`unknown` when the record had none) and outcome.
///
/// Accepted events count in the window of their event time. Rejected and late records count
/// in the window of the time at which the pipeline processed them (the newest event time their
/// source worker had accepted, never behind its capability), because a late event's own
/// window has already been closed and written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QualityKey {
    /// Window start, ms since the epoch.
    pub window_start: u64,
    /// The event name, or `unknown` (borrowed from the catalog for accepted events).
    pub event_name: Cow<'static, str>,
    /// What happened to the records counted here.
    pub outcome: Outcome,
}

macro_rules! window_key {
    ($($t:ty),*) => {$(
        impl WindowKey for $t {
            fn window_start(&self) -> u64 { self.window_start }
        }
    )*};
}
window_key!(CountKey, LatencyKey, VariantKey, QualityKey);

/// Counts events per window, `event_name`, `event_type` and `feature_area`.
///
/// Input: accepted events at their event-time tick. Output: `(CountKey, count)` as the
/// difference.
pub fn event_counts<'s, E: Borrow<Event> + Clone + 'static>(events: VecCollection<'s, Time, E>, windows: Windows) -> VecCollection<'s, Time, CountKey> {
    events.explode(move |e| {
        let e = e.borrow();
        let key = CountKey {
            window_start: windows.start_of(e.event_time_ms as u64),
            event_name: e.event_name,
            event_type: e.event_type,
            feature_area: e.feature_area.clone(),
        };
        Some((key, 1isize))
    })
}

/// Latency distribution per window, `event_name`, `feature_area` and `surface`.
///
/// Input: accepted events; those without a latency measure are skipped. Output:
/// `(LatencyKey, histogram)` with the histogram of the events' latency as the difference.
pub fn latency<'s, E: Borrow<Event> + Clone + 'static>(
    events: VecCollection<'s, Time, E>,
    windows: Windows,
) -> VecCollection<'s, Time, LatencyKey, LatencyHistogram> {
    events.explode(move |e| {
        let e = e.borrow();
        let latency = e.latency_us?;
        let key = LatencyKey {
            window_start: windows.start_of(e.event_time_ms as u64),
            event_name: e.event_name,
            feature_area: e.feature_area.clone(),
            surface: e.surface.clone().unwrap_or_default(),
        };
        Some((key, LatencyHistogram::from_sample(latency)))
    })
}

/// Latency distribution per window, `event_name`, experiment and variant.
///
/// Input: accepted events; an event contributes once for each of its
/// `experiment_assignments`, and not at all without a latency measure. Output:
/// `(VariantKey, histogram)`.
pub fn latency_by_variant<'s, E: Borrow<Event> + Clone + 'static>(
    events: VecCollection<'s, Time, E>,
    windows: Windows,
) -> VecCollection<'s, Time, VariantKey, LatencyHistogram> {
    events.explode(move |e| {
        let e = e.borrow();
        let window_start = windows.start_of(e.event_time_ms as u64);
        let event_name = e.event_name;
        let mut out = Vec::new();
        if let Some(l) = e.latency_us {
            for (experiment_id, variant) in &e.experiment_assignments {
                out.push((
                    VariantKey { window_start, event_name, experiment_id: experiment_id.clone(), variant: variant.clone() },
                    LatencyHistogram::from_sample(l),
                ));
            }
        }
        out
    })
}

/// Counts records per window, event name and outcome: accepted, or each rejection kind.
///
/// Inputs: accepted events at their event-time tick; dead-letter records at the tick at which
/// they were processed. Output: `(QualityKey, count)`.
pub fn quality<'s, E: Borrow<Event> + Clone + 'static>(
    events: VecCollection<'s, Time, E>,
    rejected: VecCollection<'s, Time, DeadLetter>,
    windows: Windows,
) -> VecCollection<'s, Time, QualityKey> {
    use differential_dataflow::AsCollection;
    use timely::dataflow::operators::vec::Map;

    let accepted = events.explode(move |e| {
        let e = e.borrow();
        let (window_start, name, p) = (windows.start_of(e.event_time_ms as u64), e.event_name.as_str(), e.privacy);
        let key = move |outcome| QualityKey { window_start, event_name: Cow::Borrowed(name), outcome };
        [
            (Outcome::Accepted, 1isize),
            (Outcome::PseudonymizedFields, p.pseudonymized as isize),
            (Outcome::ScrubbedFields, p.scrubbed as isize),
            (Outcome::DroppedFields, p.dropped as isize),
            (Outcome::PiiViolations, isize::from(p.violation())),
        ]
        .into_iter()
        .filter(|(_, n)| *n != 0)
        .map(move |(outcome, n)| (key(outcome), n))
    });
    let rejected = rejected
        .inner
        .map(move |(record, time, diff)| {
            let key = QualityKey {
                window_start: windows.start_of(time),
                event_name: record.event_name.map_or(Cow::Borrowed("unknown"), Cow::Owned),
                outcome: Outcome::Rejected(record.kind),
            };
            (key, time, diff)
        })
        .as_collection();
    accepted.concat(rejected)
}
