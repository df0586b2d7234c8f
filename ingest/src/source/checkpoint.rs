//! What a Kafka source saves with each committed offset, and reads back at start.
//!
//! A committed offset alone says where to resume, not what was decided before it. The
//! checkpoint travels in the commit's metadata (one small JSON object per partition, well
//! under the broker's 4 KiB `offset.metadata.max.bytes`), so the offset and what it needs
//! are stored by one request and can never disagree:
//!
//! - `durable`: the durable frontier when the offset was committed: every window ending at or
//!   before it is written in every sink. At start the source takes the largest over all
//!   partitions of all its topics (every worker reads all of them, so the whole cluster agrees)
//!   and drops, counting them, the re-read records whose windows are already written: a window
//!   is written once, from its whole input, and never again from part of it.
//! - `clock`: the partition's [`Clock`] just before the record at the committed offset, so
//!   that the records after it are judged late or on time exactly as before.
//! - `idle`: the times the partition was moved to while idle *after* the committed offset, each
//!   with the offset of the first record read after it, so that those decisions repeat too.
//!
//! The format is versioned: a checkpoint of another version is refused with a clear error at
//! start, never misread. An offset committed without metadata (by an older Sightline or
//! another tool) resumes with no event-time state, as a first start does.

use serde::{Deserialize, Serialize};

use super::partition::Clock;

/// The checkpoint format this build writes and reads.
pub const VERSION: u32 = 1;

/// The most idle periods one checkpoint records; a partition that would need more is not
/// declared idle again until a commit has moved past some of them (its frontier waits a
/// little longer; no decision changes).
pub const MAX_IDLE_MARKS: usize = 32;

/// One partition's checkpoint: see the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The format version, [`VERSION`].
    pub v: u32,
    /// The durable frontier at the commit, ms since the epoch.
    pub durable: u64,
    /// The partition's clock just before the committed offset.
    #[serde(default)]
    pub clock: Clock,
    /// `(offset, idle_ms)`: from the record at `offset` on, the partition's idle time was
    /// `idle_ms`. Offsets are at or after the committed one, in increasing order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub idle: Vec<(i64, u64)>,
}

/// A commit's metadata that this build cannot use.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Written by a build with another checkpoint format.
    #[error(
        "the committed offset carries a version {found} checkpoint; this build reads version {VERSION} only. Resume with the Sightline version that wrote it, or reset the consumer group's offsets (which re-reads and rewrites every window)"
    )]
    Version {
        /// The version found.
        found: u64,
    },
    /// Not a checkpoint at all.
    #[error("the committed offset's metadata is not a Sightline checkpoint ({reason}): {text:?}")]
    Malformed {
        /// Why it could not be read.
        reason: String,
        /// The metadata, as found.
        text: String,
    },
}

impl Checkpoint {
    /// The metadata string of this checkpoint.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a commit's metadata: `None` for none (an offset committed by something else).
    pub fn decode(text: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        if text.trim().is_empty() {
            return Ok(None);
        }
        let malformed = |reason: String| CheckpointError::Malformed {
            reason,
            text: text.chars().take(200).collect(),
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
        match value.get("v").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(VERSION) => {}
            Some(found) => return Err(CheckpointError::Version { found }),
            None => return Err(malformed("no version field \"v\"".into())),
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_stays_small() {
        let checkpoint = Checkpoint {
            v: VERSION,
            durable: 1_769_178_660_000,
            clock: Clock {
                max_event_ms: Some(1_769_178_671_234),
                idle_ms: Some(1_769_178_600_000),
            },
            idle: (0..MAX_IDLE_MARKS as i64)
                .map(|i| (9_000_000_000 + i, 1_769_178_700_000 + i as u64))
                .collect(),
        };
        let text = checkpoint.encode();
        assert!(text.len() < 4096, "{} bytes", text.len());
        assert_eq!(Checkpoint::decode(&text).unwrap(), Some(checkpoint));
        let small = Checkpoint {
            v: VERSION,
            durable: 5,
            ..Default::default()
        };
        assert_eq!(small.encode(), r#"{"v":1,"durable":5,"clock":{}}"#);
    }

    #[test]
    fn another_version_or_garbage_is_refused_and_nothing_is_no_checkpoint() {
        assert_eq!(Checkpoint::decode("").unwrap(), None);
        let err = Checkpoint::decode(r#"{"v":2,"durable":5,"frontiers":[]}"#).unwrap_err();
        assert!(
            matches!(err, CheckpointError::Version { found: 2 }),
            "{err}"
        );
        assert!(err.to_string().contains("version 2 checkpoint"));
        for bad in ["hello", r#"{"durable":5}"#, r#"{"v":1,"durable":"x"}"#] {
            assert!(
                matches!(
                    Checkpoint::decode(bad),
                    Err(CheckpointError::Malformed { .. })
                ),
                "{bad}"
            );
        }
    }
}
