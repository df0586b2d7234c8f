//! The event catalog: every `event_name` Sightline accepts, with the metadata the pipeline needs.
//!
//! The catalog holds the five example events of the platform spec (`000_…txt`, project creation
//! and task assignment) and the sixteen events of the command-center spec (`004_…txt`). For each
//! it records the event's `event_type` and, where the event carries one, the property that holds
//! its latency measure and the factor that turns it into milliseconds.
//!
//! The versioned JSON Schema registry (one file per event and version, with per-field PII
//! handling) is built on top of this table; until then the catalog is the allowlist of names.

use crate::EventType;

/// What the pipeline knows about one `event_name`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EventSpec {
    /// The event's name, as in `event_name`.
    pub name: &'static str,
    /// The taxonomy class the event must declare in `event_type`.
    pub event_type: EventType,
    /// The `properties` field holding the event's latency measure, if it has one.
    pub latency_field: Option<&'static str>,
    /// Multiplier from the latency field's unit to milliseconds (1 for `_ms`, 1000 for `_seconds`).
    pub latency_scale_ms: f64,
    /// The seed document the event comes from.
    pub origin: &'static str,
}

const fn spec(name: &'static str, event_type: EventType, latency_field: Option<&'static str>, latency_scale_ms: f64, origin: &'static str) -> EventSpec {
    EventSpec { name, event_type, latency_field, latency_scale_ms, origin }
}

/// `origin` of the events of the platform spec (`000_…txt`).
pub const PLATFORM: &str = "000 platform spec";
/// `origin` of the events of the command-center spec (`004_…txt`).
pub const COMMAND_CENTER: &str = "004 command-center spec";

/// Every event Sightline accepts, in the order the seed documents list them.
pub const CATALOG: &[EventSpec] = &[
    spec("project_viewed", EventType::View, Some("time_to_first_paint_ms"), 1.0, PLATFORM),
    spec("project_created", EventType::Outcome, Some("duration_ms"), 1.0, PLATFORM),
    spec("task_assigned", EventType::Action, Some("assignment_latency_ms"), 1.0, PLATFORM),
    spec("project_creation_error", EventType::Error, None, 1.0, PLATFORM),
    spec("project_feedback_submitted", EventType::Outcome, None, 1.0, PLATFORM),
    spec("recommendation_generated", EventType::SystemHealth, None, 1.0, COMMAND_CENTER),
    spec("recommendation_viewed", EventType::View, None, 1.0, COMMAND_CENTER),
    spec("recommendation_accepted", EventType::Action, Some("time_to_decision_seconds"), 1000.0, COMMAND_CENTER),
    spec("recommendation_dismissed", EventType::Action, None, 1.0, COMMAND_CENTER),
    spec("action_executed", EventType::Outcome, Some("duration_ms"), 1.0, COMMAND_CENTER),
    spec("action_failed", EventType::Error, None, 1.0, COMMAND_CENTER),
    spec("action_rolled_back", EventType::Action, None, 1.0, COMMAND_CENTER),
    spec("outcome_reply_received", EventType::Outcome, None, 1.0, COMMAND_CENTER),
    spec("outcome_meeting_booked", EventType::Outcome, None, 1.0, COMMAND_CENTER),
    spec("outcome_deal_advanced", EventType::Outcome, None, 1.0, COMMAND_CENTER),
    spec("outcome_deliverable_shipped", EventType::Outcome, None, 1.0, COMMAND_CENTER),
    spec("signal_received", EventType::SystemHealth, None, 1.0, COMMAND_CENTER),
    spec("signal_processed", EventType::SystemHealth, Some("processing_duration_ms"), 1.0, COMMAND_CENTER),
    spec("integration_call_success", EventType::SystemHealth, Some("duration_ms"), 1.0, COMMAND_CENTER),
    spec("integration_call_failed", EventType::Error, None, 1.0, COMMAND_CENTER),
    spec("circuit_breaker_opened", EventType::SystemHealth, None, 1.0, COMMAND_CENTER),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_has_both_seed_taxonomies_without_duplicates() {
        assert_eq!(CATALOG.iter().filter(|s| s.origin == PLATFORM).count(), 5);
        assert_eq!(CATALOG.iter().filter(|s| s.origin == COMMAND_CENTER).count(), 16);
        let mut names: Vec<_> = CATALOG.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CATALOG.len());
        assert_eq!(crate::EventName::from_name("signal_processed").and_then(|n| n.spec().latency_field), Some("processing_duration_ms"));
        assert!(crate::EventName::from_name("no_such_event").is_none());
    }
}
