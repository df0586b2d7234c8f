//! The windowed aggregates, each a function from collections to a collection whose key names a
//! window and whose difference is the aggregate itself.
//!
//! Every aggregate here is linear: its difference type is a count (`isize`), a
//! [`LatencyHistogram`] or [`QualityCounts`], all abelian, so the accumulated difference of a key *is* the
//! aggregate, insertions and retractions are exact, and batches merge in any order. Closing a
//! window (see [`crate::close_windows`]) reads that accumulation once the frontier has passed.
//!
//! The functions take any `E: Borrow<Event>`: the pipeline passes `Arc<Event>`, so that the
//! four aggregates share each event instead of each receiving a deep copy, and copy out only
//! the fields their keys need.

use std::borrow::{Borrow, Cow};

use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use sightline_schemas::{DeadLetter, Event, EventName, EventType, FailureKind, Label};

use crate::histogram::LatencyHistogram;
use crate::window::{Time, WindowKey, Windows};

/// `value` (any fixed-point quantity) times a Horvitz–Thompson weight in millionths (an
/// event's [`Event::weight_micros`]): unchanged for weight 1, saturating at the `i64` bounds.
pub fn scaled_by_weight(value: i64, weight_micros: u64) -> i64 {
    if weight_micros == sightline_schemas::WEIGHT_ONE {
        return value;
    }
    let product =
        i128::from(value) * i128::from(weight_micros) / i128::from(sightline_schemas::WEIGHT_ONE);
    product.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// Implements the difference traits of a struct of `i64` counts that add field by field
/// (`IsZero`, `Semigroup`, `Monoid`, `Abelian`, `Multiply<isize>`); it must derive `Default`.
macro_rules! summed_difference {
    ($t:ident { $($f:ident),+ }) => {
        impl differential_dataflow::difference::IsZero for $t {
            fn is_zero(&self) -> bool {
                *self == $t::default()
            }
        }

        impl differential_dataflow::difference::Semigroup for $t {
            fn plus_equals(&mut self, rhs: &Self) {
                $(self.$f += rhs.$f;)+
            }
        }

        impl differential_dataflow::difference::Monoid for $t {
            fn zero() -> Self {
                $t::default()
            }
        }

        impl differential_dataflow::difference::Abelian for $t {
            fn negate(&mut self) {
                $(self.$f = -self.$f;)+
            }
        }

        impl differential_dataflow::difference::Multiply<isize> for $t {
            type Output = $t;

            fn multiply(self, rhs: &isize) -> $t {
                let k = *rhs as i64;
                $t { $($f: self.$f * k),+ }
            }
        }
    };
}
pub(crate) use summed_difference;

/// The difference of `event_counts`: events, and their Horvitz–Thompson weight.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Counted {
    /// Events.
    pub count: i64,
    /// The sum of their [`Event::weight_micros`]: the estimate of the events emitted, in
    /// millionths, when the emitters sampled.
    pub weighted_micros: i64,
}

impl Counted {
    /// One event.
    pub fn of_event(e: &Event) -> Counted {
        Counted {
            count: 1,
            weighted_micros: e.weight_micros as i64,
        }
    }

    /// The weighted count (events emitted, estimated).
    pub fn weighted(&self) -> f64 {
        self.weighted_micros as f64 / sightline_schemas::WEIGHT_ONE as f64
    }
}

summed_difference!(Counted {
    count,
    weighted_micros
});

/// Key of `event_counts`: one window, event name, event type and feature area.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CountKey {
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// `event_name`.
    pub event_name: EventName,
    /// `event_type`.
    pub event_type: EventType,
    /// `feature_area`.
    pub feature_area: Label,
}

/// Key of `latency`: one window, event name, feature area and surface (empty when absent).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LatencyKey {
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// `event_name`.
    pub event_name: EventName,
    /// `feature_area`.
    pub feature_area: Label,
    /// `surface`, or the empty string when the event has none.
    pub surface: Label,
}

/// Key of `latency_by_variant`: one window, event name, experiment and variant.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VariantKey {
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// `event_name`.
    pub event_name: EventName,
    /// An experiment id from `experiment_assignments`.
    pub experiment_id: Label,
    /// The event's bucket in that experiment.
    pub variant: Label,
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

/// The difference of `quality`: records, and what the privacy layer did to them, summed. One
/// update per record carries all five counts (instead of one update per counter).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct QualityCounts {
    /// Records.
    pub records: i64,
    /// Their Horvitz–Thompson weight in millionths (an accepted event weighs its
    /// [`Event::weight_micros`]; any other record weighs 1).
    pub weighted_micros: i64,
    /// Identifier and contact fields pseudonymized.
    pub pseudonymized: i64,
    /// Free-text fields in which personal data was scrubbed.
    pub scrubbed: i64,
    /// Fields dropped by policy.
    pub dropped: i64,
    /// Records with PII violations.
    pub pii_violations: i64,
}

impl QualityCounts {
    /// The counts of one record (`n` copies of it) with nothing done to it.
    pub fn records(n: i64) -> QualityCounts {
        QualityCounts {
            records: n,
            weighted_micros: n * sightline_schemas::WEIGHT_ONE as i64,
            ..QualityCounts::default()
        }
    }

    /// The counts of one accepted event.
    pub fn of_event(e: &Event) -> QualityCounts {
        let p = e.privacy;
        QualityCounts {
            records: 1,
            weighted_micros: e.weight_micros as i64,
            pseudonymized: i64::from(p.pseudonymized),
            scrubbed: i64::from(p.scrubbed),
            dropped: i64::from(p.dropped),
            pii_violations: i64::from(p.violation()),
        }
    }

    /// The privacy counters with their outcome names, for the table rows.
    pub fn privacy_counters(&self) -> [(Outcome, i64); 4] {
        [
            (Outcome::PseudonymizedFields, self.pseudonymized),
            (Outcome::ScrubbedFields, self.scrubbed),
            (Outcome::DroppedFields, self.dropped),
            (Outcome::PiiViolations, self.pii_violations),
        ]
    }
}

summed_difference!(QualityCounts {
    records,
    weighted_micros,
    pseudonymized,
    scrubbed,
    dropped,
    pii_violations
});

/// Key of `quality`: one window, event name (`unknown` when the record had none) and outcome.
///
/// Accepted events count in the window of their event time. Rejected and late records count
/// in the window of the time at which the pipeline processed them (their partition's clock
/// position when they were read: its newest event time, or the time it went idle; never behind
/// the source's capability), because a late event's own window has already been closed and
/// written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QualityKey {
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// The event name, or `unknown` (borrowed from the catalog for accepted events).
    pub event_name: Cow<'static, str>,
    /// What happened to the records counted here.
    pub outcome: Outcome,
}

macro_rules! window_key {
    ($($t:ty),*) => {$(
        impl WindowKey for $t {
            fn window_start_ms(&self) -> u64 { self.window_start_ms }
        }
    )*};
}
window_key!(CountKey, LatencyKey, VariantKey, QualityKey);

/// Counts events per window, `event_name`, `event_type` and `feature_area`.
///
/// Input: accepted events at their event-time tick. Output: `(CountKey, Counted)`: the count
/// and the weighted count as the difference.
pub fn event_counts<'s, E: Borrow<Event> + Clone + 'static>(
    events: VecCollection<'s, Time, E>,
    windows: Windows,
) -> VecCollection<'s, Time, CountKey, Counted> {
    events.explode(move |e| Some(count_update(e.borrow(), windows)))
}

/// The `event_counts` update of one event.
pub fn count_update(e: &Event, windows: Windows) -> (CountKey, Counted) {
    let key = CountKey {
        window_start_ms: windows.start_of(e.event_time_ms as u64),
        event_name: e.event_name,
        event_type: e.event_type,
        feature_area: e.feature_area.clone(),
    };
    (key, Counted::of_event(e))
}

/// Latency distribution per window, `event_name`, `feature_area` and `surface`.
///
/// Input: accepted events; those without a latency measure are skipped. Output:
/// `(LatencyKey, histogram)` with the histogram of the events' latency as the difference,
/// each sample weighted by its event's `sample_rate` (see [`LatencyHistogram`]).
pub fn latency<'s, E: Borrow<Event> + Clone + 'static>(
    events: VecCollection<'s, Time, E>,
    windows: Windows,
) -> VecCollection<'s, Time, LatencyKey, LatencyHistogram> {
    events.explode(move |e| latency_update(e.borrow(), windows))
}

/// The empty surface, shared.
static NO_SURFACE: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| Label::from(""));

/// The `latency` update of one event: none without a latency measure.
pub fn latency_update(e: &Event, windows: Windows) -> Option<(LatencyKey, LatencyHistogram)> {
    let latency = e.latency_us?;
    let key = LatencyKey {
        window_start_ms: windows.start_of(e.event_time_ms as u64),
        event_name: e.event_name,
        feature_area: e.feature_area.clone(),
        surface: e.surface.clone().unwrap_or_else(|| NO_SURFACE.clone()),
    };
    Some((
        key,
        LatencyHistogram::from_weighted_sample(latency, e.weight_micros),
    ))
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
    events.explode(move |e| variant_updates(e.borrow(), windows))
}

/// The `latency_by_variant` updates of one event: one per assignment, none without a latency
/// measure.
pub fn variant_updates(
    e: &Event,
    windows: Windows,
) -> impl Iterator<Item = (VariantKey, LatencyHistogram)> + use<> {
    let window_start_ms = windows.start_of(e.event_time_ms as u64);
    let event_name = e.event_name;
    // The event's shared assignment list, iterated without a per-event vector.
    let weight = e.weight_micros;
    let (latency, assignments) = match e.latency_us {
        Some(l) => (l, e.experiment_assignments.clone()),
        None => (0, Default::default()),
    };
    (0..assignments.len()).map(move |i| {
        let (experiment_id, variant) = &assignments[i];
        let key = VariantKey {
            window_start_ms,
            event_name,
            experiment_id: experiment_id.clone(),
            variant: variant.clone(),
        };
        (key, LatencyHistogram::from_weighted_sample(latency, weight))
    })
}

/// Counts records per window, event name and outcome (accepted, or each rejection kind), with
/// the privacy layer's counters of the accepted ones.
///
/// Inputs: accepted events at their event-time tick; dead-letter records at the tick at which
/// they were processed. Output: `(QualityKey, QualityCounts)`; keys are `Accepted` or
/// `Rejected(kind)`.
pub fn quality<'s, E: Borrow<Event> + Clone + 'static>(
    events: VecCollection<'s, Time, E>,
    rejected: VecCollection<'s, Time, DeadLetter>,
    windows: Windows,
) -> VecCollection<'s, Time, QualityKey, QualityCounts> {
    let accepted = events.explode(move |e| Some(quality_update(e.borrow(), windows)));
    accepted.concat(quality_rejected(rejected, windows))
}

/// The `quality` update of one accepted event.
pub fn quality_update(e: &Event, windows: Windows) -> (QualityKey, QualityCounts) {
    let key = QualityKey {
        window_start_ms: windows.start_of(e.event_time_ms as u64),
        event_name: Cow::Borrowed(e.event_name.as_str()),
        outcome: Outcome::Accepted,
    };
    (key, QualityCounts::of_event(e))
}

/// The `quality` updates of the rejected records.
pub fn quality_rejected<'s>(
    rejected: VecCollection<'s, Time, DeadLetter>,
    windows: Windows,
) -> VecCollection<'s, Time, QualityKey, QualityCounts> {
    use differential_dataflow::AsCollection;
    use timely::dataflow::operators::vec::Map;

    rejected
        .inner
        .map(move |(record, time, diff)| {
            let key = QualityKey {
                window_start_ms: windows.start_of(time),
                event_name: record
                    .event_name
                    .map_or(Cow::Borrowed("unknown"), Cow::Owned),
                outcome: Outcome::Rejected(record.kind),
            };
            (key, time, QualityCounts::records(diff as i64))
        })
        .as_collection()
}

/// A dead letter keyed by the window of the time at which it was processed: the key of the
/// `dead_letter` table, one entry per record (the difference counts copies).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WindowedDeadLetter {
    /// Processing window start, ms since the epoch.
    pub window_start_ms: u64,
    /// The record.
    pub record: DeadLetter,
}

impl WindowKey for WindowedDeadLetter {
    fn window_start_ms(&self) -> u64 {
        self.window_start_ms
    }
}

/// Dead letters per window of their processing time.
///
/// Input: dead-letter records at the tick at which they were processed. Output:
/// `(WindowedDeadLetter, copies)`.
pub fn windowed_dead_letters<'s>(
    rejected: VecCollection<'s, Time, DeadLetter>,
    windows: Windows,
) -> VecCollection<'s, Time, WindowedDeadLetter> {
    use differential_dataflow::AsCollection;
    use timely::dataflow::operators::vec::Map;

    rejected
        .inner
        .map(move |(record, time, diff)| {
            let window_start_ms = windows.start_of(time);
            (
                WindowedDeadLetter {
                    window_start_ms,
                    record,
                },
                time,
                diff,
            )
        })
        .as_collection()
}

/// The platform spec's target: fewer than 1% of records rejected.
pub const REJECTION_TARGET: f64 = 0.01;
/// The platform spec's target: fewer than 0.1% of accepted events with PII violations.
pub const PII_VIOLATION_TARGET: f64 = 0.001;

/// One window's record totals, read off its `quality` counts: the one place that says which
/// outcome counts as what.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QualityTotals {
    /// Records accepted.
    pub accepted: i64,
    /// Records rejected (every failure kind but `late`).
    pub rejected: i64,
    /// Records that arrived behind the watermark.
    pub late: i64,
    /// Accepted events with PII violations.
    pub pii_violations: i64,
    /// The accepted events' Horvitz–Thompson weight, millionths.
    pub weighted_accepted_micros: i64,
}

impl QualityTotals {
    /// The totals of a closed `quality` window (or one worker's part of it).
    pub fn of_window(w: &crate::ClosedWindow<QualityKey, QualityCounts>) -> QualityTotals {
        let mut totals = QualityTotals::default();
        for (key, counts) in &w.entries {
            totals.pii_violations += counts.pii_violations;
            match key.outcome {
                Outcome::Accepted => {
                    totals.accepted += counts.records;
                    totals.weighted_accepted_micros += counts.weighted_micros;
                }
                Outcome::Rejected(FailureKind::Late) => totals.late += counts.records,
                Outcome::Rejected(_) => totals.rejected += counts.records,
                Outcome::PseudonymizedFields
                | Outcome::ScrubbedFields
                | Outcome::DroppedFields
                | Outcome::PiiViolations => {}
            }
        }
        totals
    }

    /// Adds `other`'s totals (another worker's part of the same window).
    pub fn add(&mut self, other: &QualityTotals) {
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.late += other.late;
        self.pii_violations += other.pii_violations;
        self.weighted_accepted_micros += other.weighted_accepted_micros;
    }

    /// `rejected / (accepted + rejected)`; 0 for an empty window.
    pub fn rejection_rate(&self) -> f64 {
        ratio(self.rejected, self.accepted + self.rejected)
    }

    /// `pii_violations / accepted`; 0 for an empty window.
    pub fn pii_violation_rate(&self) -> f64 {
        ratio(self.pii_violations, self.accepted)
    }

    /// Whether the window meets [`REJECTION_TARGET`].
    pub fn meets_rejection_target(&self) -> bool {
        self.rejection_rate() < REJECTION_TARGET
    }

    /// Whether the window meets [`PII_VIOLATION_TARGET`].
    pub fn meets_pii_target(&self) -> bool {
        self.pii_violation_rate() < PII_VIOLATION_TARGET
    }
}

fn ratio(a: i64, b: i64) -> f64 {
    if b > 0 { a as f64 / b as f64 } else { 0.0 }
}
