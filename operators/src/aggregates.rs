//! The windowed aggregates, each a function from collections to a collection whose key names a
//! window and whose difference is the aggregate itself.
//!
//! Every aggregate here is linear: its difference type is a count (`isize`) or a
//! [`LatencyHistogram`], both abelian, so the accumulated difference of a key *is* the
//! aggregate, insertions and retractions are exact, and batches merge in any order. Closing a
//! window (see [`crate::close_windows`]) reads that accumulation once the frontier has passed.

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

/// What happened to a record: accepted, or rejected for a reason (late included).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// Decoded and inside the watermark.
    Accepted,
    /// Sent to the dead-letter path.
    Rejected(FailureKind),
}

impl Outcome {
    /// `accepted`, or the failure kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Rejected(kind) => kind.as_str(),
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
    /// The event name, or `unknown`.
    pub event_name: String,
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
pub fn event_counts<'s>(events: VecCollection<'s, Time, Event>, windows: Windows) -> VecCollection<'s, Time, CountKey> {
    events.explode(move |e| {
        let key = CountKey {
            window_start: windows.start_of(e.event_time_ms as u64),
            event_name: e.event_name,
            event_type: e.event_type,
            feature_area: e.feature_area,
        };
        Some((key, 1isize))
    })
}

/// Latency distribution per window, `event_name`, `feature_area` and `surface`.
///
/// Input: accepted events; those without a latency measure are skipped. Output:
/// `(LatencyKey, histogram)` with the histogram of the events' latency as the difference.
pub fn latency<'s>(events: VecCollection<'s, Time, Event>, windows: Windows) -> VecCollection<'s, Time, LatencyKey, LatencyHistogram> {
    events.explode(move |e| {
        let latency = e.latency_us?;
        let key = LatencyKey {
            window_start: windows.start_of(e.event_time_ms as u64),
            event_name: e.event_name,
            feature_area: e.feature_area,
            surface: e.surface.unwrap_or_default(),
        };
        Some((key, LatencyHistogram::from_sample(latency)))
    })
}

/// Latency distribution per window, `event_name`, experiment and variant.
///
/// Input: accepted events; an event contributes once for each of its
/// `experiment_assignments`, and not at all without a latency measure. Output:
/// `(VariantKey, histogram)`.
pub fn latency_by_variant<'s>(events: VecCollection<'s, Time, Event>, windows: Windows) -> VecCollection<'s, Time, VariantKey, LatencyHistogram> {
    events.explode(move |e| {
        let window_start = windows.start_of(e.event_time_ms as u64);
        let latency = e.latency_us;
        let event_name = e.event_name;
        e.experiment_assignments.into_iter().filter_map(move |(experiment_id, variant)| {
            latency.map(|l| (VariantKey { window_start, event_name, experiment_id, variant }, LatencyHistogram::from_sample(l)))
        })
    })
}

/// Counts records per window, event name and outcome: accepted, or each rejection kind.
///
/// Inputs: accepted events at their event-time tick; dead-letter records at the tick at which
/// they were processed. Output: `(QualityKey, count)`.
pub fn quality<'s>(
    events: VecCollection<'s, Time, Event>,
    rejected: VecCollection<'s, Time, DeadLetter>,
    windows: Windows,
) -> VecCollection<'s, Time, QualityKey> {
    use differential_dataflow::AsCollection;
    use timely::dataflow::operators::vec::Map;

    let accepted = events.explode(move |e| {
        let key =
            QualityKey { window_start: windows.start_of(e.event_time_ms as u64), event_name: e.event_name.as_str().to_owned(), outcome: Outcome::Accepted };
        Some((key, 1isize))
    });
    let rejected = rejected
        .inner
        .map(move |(record, time, diff)| {
            let key = QualityKey {
                window_start: windows.start_of(time),
                event_name: record.event_name.unwrap_or_else(|| "unknown".to_owned()),
                outcome: Outcome::Rejected(record.kind),
            };
            (key, time, diff)
        })
        .as_collection();
    accepted.concat(rejected)
}
