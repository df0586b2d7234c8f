//! One partition's source state.

use serde::{Deserialize, Serialize};

/// A partition's event-time position: everything its watermark, its lateness decisions and the
/// processing time of its dead letters are computed from. It depends only on the partition's
/// own records (and on when the partition was idle), never on how a worker interleaves
/// partitions, so a restart that resumes at an offset with the clock as of that offset makes
/// the same decisions as the run it replaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clock {
    /// The largest event time accepted from the partition, ms since the epoch.
    #[serde(rename = "max", default, skip_serializing_if = "Option::is_none")]
    pub max_event_ms: Option<u64>,
    /// The wall-clock time the partition was moved to while it was idle (caught up with its
    /// end and silent for the idle timeout), ms since the epoch.
    #[serde(rename = "idle", default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
}

impl Clock {
    /// Where the partition stands in event time: the larger of its largest event time and
    /// its idle time; `None` before it has either.
    pub fn position_ms(self) -> Option<u64> {
        match (self.max_event_ms, self.idle_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// The partition's watermark: its position less the allowed lateness. An event of this
    /// partition with an earlier time is late.
    pub fn watermark_ms(self, lateness_ms: u64) -> Option<u64> {
        self.position_ms().map(|p| p.saturating_sub(lateness_ms))
    }
}

/// What a source knows of one partition: where reading stands, and its event-time [`Clock`].
/// One serializable value per partition, owned by the reader
/// ([`super::RecordReader::partitions`]); the ingest operator updates the clock as events are
/// accepted and as the partition goes idle, the reader the offset as records are read.
///
/// This is the *live* state: `next_offset` and `clock` run ahead of what is durable. A restart
/// does not resume from it as it is: a Kafka reader's checkpoint is this state as of a
/// committed offset (see [`super::checkpoint`]), which is what [`PartitionState::seeded`]
/// starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// Kafka topic, or `file:<path>` for a file.
    pub topic: String,
    /// Kafka partition (0 for a file).
    pub partition: i32,
    /// The next offset to read: after the last record read, or where reading resumes (a
    /// committed offset). `None` before either is known.
    pub next_offset: Option<i64>,
    /// The partition's event-time position.
    pub clock: Clock,
}

impl PartitionState {
    /// A partition nothing is known of yet.
    pub fn new(topic: &str, partition: i32) -> PartitionState {
        PartitionState::seeded(topic, partition, None, Clock::default())
    }

    /// A partition resumed at `next_offset` with the clock `clock` (for example, restored
    /// from a checkpoint): its watermark starts from there.
    pub fn seeded(
        topic: &str,
        partition: i32,
        next_offset: Option<i64>,
        clock: Clock,
    ) -> PartitionState {
        PartitionState {
            topic: topic.to_owned(),
            partition,
            next_offset,
            clock,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let clock = Clock {
            max_event_ms: Some(1_769_178_600_000),
            idle_ms: None,
        };
        let state = PartitionState::seeded("telemetry.events", 3, Some(1_204), clock);
        let json = serde_json::to_string(&state).expect("serializes");
        assert_eq!(
            json,
            r#"{"topic":"telemetry.events","partition":3,"next_offset":1204,"clock":{"max":1769178600000}}"#
        );
        let back: PartitionState = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, state);
    }

    #[test]
    fn the_position_is_the_later_of_event_time_and_idle_time() {
        let mut clock = Clock::default();
        assert_eq!(clock.position_ms(), None);
        assert_eq!(clock.watermark_ms(1_000), None);
        clock.idle_ms = Some(50_000);
        assert_eq!(clock.position_ms(), Some(50_000));
        clock.max_event_ms = Some(70_000);
        assert_eq!(clock.watermark_ms(1_000), Some(69_000));
        clock.idle_ms = Some(90_000);
        assert_eq!(clock.watermark_ms(100_000), Some(0));
        assert_eq!(clock.position_ms(), Some(90_000));
    }
}
