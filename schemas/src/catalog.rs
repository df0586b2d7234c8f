//! The event catalog: every `event_name` Sightline accepts.
//!
//! The catalog *is* the [`registry`](crate::registry): one JSON Schema per event and version
//! in `schemas/registry/events/`. It holds the five example events of the platform spec
//! (`000_…txt`, project creation and task assignment) and the sixteen events of the
//! command-center spec (`004_…txt`). This module names the two origins.

/// `origin` of the events of the platform spec (`000_…txt`).
pub const PLATFORM: &str = "000";
/// `origin` of the events of the command-center spec (`004_…txt`).
pub const COMMAND_CENTER: &str = "004";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventName;

    #[test]
    fn catalog_has_both_seed_taxonomies_without_duplicates() {
        let names: Vec<EventName> = EventName::all().collect();
        assert_eq!(
            names.iter().filter(|n| n.spec().origin == PLATFORM).count(),
            5
        );
        assert_eq!(
            names
                .iter()
                .filter(|n| n.spec().origin == COMMAND_CENTER)
                .count(),
            16
        );
        assert_eq!(
            EventName::from_name("signal_processed")
                .and_then(|n| n.spec().latency())
                .map(|l| l.field.as_str()),
            Some("processing_duration_ms")
        );
        assert!(EventName::from_name("no_such_event").is_none());
    }
}
