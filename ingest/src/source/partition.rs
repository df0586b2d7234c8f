//! One partition's source state.

use serde::{Deserialize, Serialize};

/// What a source knows of one partition: where reading stands, and the event-time state its
/// watermark is computed from. One serializable value per partition, owned by the reader
/// ([`super::RecordReader::partitions`]); the ingest operator updates its event time as events
/// are accepted, the reader its offset as records are read.
///
/// This is the *live* state: `next_offset` and `max_event_ms` run ahead of what is durable. A
/// restart must not resume from it as it is: a checkpoint is this state as of a committed
/// offset (the committed offset, and the event time of the records before it), which is what
/// [`PartitionState::seeded`] starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// Kafka topic, or `file:<path>` for a file.
    pub topic: String,
    /// Kafka partition (0 for a file).
    pub partition: i32,
    /// The next offset to read: after the last record read, or where reading resumes (a
    /// committed offset). `None` before either is known.
    pub next_offset: Option<i64>,
    /// The largest event time accepted from this partition, ms since the epoch.
    pub max_event_ms: Option<u64>,
}

impl PartitionState {
    /// A partition nothing is known of yet.
    pub fn new(topic: &str, partition: i32) -> PartitionState {
        PartitionState::seeded(topic, partition, None, None)
    }

    /// A partition resumed at `next_offset` with the event-time state `max_event_ms` (for
    /// example, restored from a checkpoint): its watermark starts from there.
    pub fn seeded(
        topic: &str,
        partition: i32,
        next_offset: Option<i64>,
        max_event_ms: Option<u64>,
    ) -> PartitionState {
        PartitionState {
            topic: topic.to_owned(),
            partition,
            next_offset,
            max_event_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let state =
            PartitionState::seeded("telemetry.events", 3, Some(1_204), Some(1_769_178_600_000));
        let json = serde_json::to_string(&state).expect("serializes");
        assert_eq!(
            json,
            r#"{"topic":"telemetry.events","partition":3,"next_offset":1204,"max_event_ms":1769178600000}"#
        );
        let back: PartitionState = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, state);
    }
}
