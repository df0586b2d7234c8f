//! What a Kafka source saves before it commits an offset, and reads back at start.
//!
//! A committed offset alone says where to resume, not what was decided before it. So before
//! the reader commits offset `o` of a partition, it writes that partition's checkpoint object
//! (one small JSON object per partition, [`object_name`], in the lake's store through a
//! [`CheckpointStore`]) holding an entry for `o`:
//!
//! - `durable`: the durable frontier when the entry was made: every window ending at or before
//!   it is written in every sink. At start the source takes the largest over all partitions of
//!   all its topics (every worker reads all of them, so the whole cluster agrees) and drops,
//!   counting them, the re-read records whose windows are already written: a window is written
//!   once, from its whole input, and never again from part of it.
//! - `clock`: the partition's [`Clock`] just before the record at `o`, so that the records
//!   after it are judged late or on time exactly as before.
//! - `idle`: the times the partition was moved to while idle *after* `o`, each with the offset
//!   of the first record read after it, so that those decisions repeat too.
//!
//! The object keeps the entry of the last offset the broker confirmed and any newer ones, so
//! whichever of them the broker holds after a crash (the write and the commit are two steps),
//! its entry is there; older entries are dropped at each write, so the object stays small and
//! needs no cleaning. At start the reader resumes each partition from the entry of its
//! committed offset.
//!
//! Why not the commit's own metadata, which Kafka keeps with the offset: tansu 0.6 accepts it
//! and returns it empty (`the_broker_keeps_commit_metadata_per_group` in
//! `integration-tests/tests/exactly_once.rs`), and a broker that silently drops it would bring
//! back exactly the partial rewrites this prevents.
//!
//! The format is versioned: an object of another version is refused with a clear error at
//! start, never misread. An offset committed with no entry (by an older Sightline, or after
//! the lake was wiped) resumes with no event-time state, as a first start does, with a
//! warning.

use serde::{Deserialize, Serialize};

use super::partition::Clock;

/// The checkpoint format this build writes and reads.
pub const VERSION: u32 = 1;

/// The most idle periods one entry records; a partition that would need more is not
/// declared idle again until a commit has moved past some of them (its frontier waits a
/// little longer; no decision changes).
pub const MAX_IDLE_MARKS: usize = 32;

/// Where the checkpoint objects are kept: the lake's object store, in the pipeline.
pub trait CheckpointStore: Send + Sync {
    /// The object `name`, or `None` if there is none.
    fn load(&self, name: &str) -> Result<Option<Vec<u8>>, String>;
    /// Writes every object; an error means some may not be written.
    fn save(&self, objects: Vec<(String, Vec<u8>)>) -> Result<(), String>;
}

/// The object of `topic`'s `partition` for consumer group `group`.
pub fn object_name(group: &str, topic: &str, partition: i32) -> String {
    format!("_sightline/checkpoints/{group}/{topic}/{partition}.json")
}

/// The state of a partition as of one offset: see the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The offset the entry is for: the next record to read.
    pub offset: i64,
    /// The durable frontier when the entry was made, ms since the epoch.
    pub durable: u64,
    /// The partition's clock just before `offset`.
    #[serde(default)]
    pub clock: Clock,
    /// `(offset, idle_ms)`: from the record at `offset` on, the partition's idle time was
    /// `idle_ms`. Offsets are after the entry's, in increasing order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub idle: Vec<(i64, u64)>,
}

/// One partition's checkpoint object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionCheckpoints {
    /// The format version, [`VERSION`].
    pub v: u32,
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// Entries by increasing offset.
    pub entries: Vec<Checkpoint>,
}

/// A checkpoint object that this build cannot use.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Written by a build with another checkpoint format.
    #[error(
        "the checkpoint {name} is version {found}; this build reads version {VERSION} only. Resume with the Sightline version that wrote it, or start a new consumer group (which reads and writes every window again)"
    )]
    Version {
        /// The object.
        name: String,
        /// The version found.
        found: u64,
    },
    /// Not a checkpoint at all.
    #[error("the checkpoint {name} cannot be read ({reason})")]
    Malformed {
        /// The object.
        name: String,
        /// Why it could not be read.
        reason: String,
    },
    /// The store failed.
    #[error("reading the checkpoint {name} failed: {reason}")]
    Store {
        /// The object.
        name: String,
        /// The store's error.
        reason: String,
    },
}

impl PartitionCheckpoints {
    /// The object's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the object `name`.
    pub fn decode(name: &str, bytes: &[u8]) -> Result<PartitionCheckpoints, CheckpointError> {
        let malformed = |reason: String| CheckpointError::Malformed {
            name: name.to_owned(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        match value.get("v").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(VERSION) => {}
            Some(found) => {
                return Err(CheckpointError::Version {
                    name: name.to_owned(),
                    found,
                });
            }
            None => return Err(malformed("no version field \"v\"".into())),
        }
        serde_json::from_value(value).map_err(|e| malformed(e.to_string()))
    }

    /// The entry for `offset`.
    pub fn at(&self, offset: i64) -> Option<&Checkpoint> {
        self.entries.iter().find(|e| e.offset == offset)
    }

    /// The largest durable frontier of any entry.
    pub fn durable(&self) -> u64 {
        self.entries.iter().map(|e| e.durable).max().unwrap_or(0)
    }
}

/// Loads and decodes the object `name` from `store`: `None` if there is none.
pub fn load(
    store: &dyn CheckpointStore,
    name: &str,
) -> Result<Option<PartitionCheckpoints>, CheckpointError> {
    match store.load(name) {
        Ok(Some(bytes)) => PartitionCheckpoints::decode(name, &bytes).map(Some),
        Ok(None) => Ok(None),
        Err(reason) => Err(CheckpointError::Store {
            name: name.to_owned(),
            reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_stays_small() {
        let entry = Checkpoint {
            offset: 9_000_000_000,
            durable: 1_769_178_660_000,
            clock: Clock {
                max_event_ms: Some(1_769_178_671_234),
                idle_ms: Some(1_769_178_600_000),
            },
            idle: (0..MAX_IDLE_MARKS as i64)
                .map(|i| (9_000_000_001 + i, 1_769_178_700_000 + i as u64))
                .collect(),
        };
        let file = PartitionCheckpoints {
            v: VERSION,
            topic: "telemetry.events".into(),
            partition: 7,
            entries: vec![
                entry.clone(),
                Checkpoint {
                    offset: 9_000_000_100,
                    ..entry
                },
            ],
        };
        let bytes = file.encode();
        assert!(bytes.len() < 4096, "{} bytes", bytes.len());
        let back = PartitionCheckpoints::decode("x", &bytes).unwrap();
        assert_eq!(back, file);
        assert_eq!(
            back.at(9_000_000_100).map(|e| e.offset),
            Some(9_000_000_100)
        );
        assert_eq!(back.at(5), None);
        assert_eq!(back.durable(), 1_769_178_660_000);
    }

    #[test]
    fn another_version_or_garbage_is_refused() {
        let err = PartitionCheckpoints::decode("p.json", br#"{"v":2,"entries":[]}"#).unwrap_err();
        assert!(
            matches!(err, CheckpointError::Version { found: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("p.json is version 2"), "{err}");
        for bad in [
            &b"hello"[..],
            br#"{"entries":[]}"#,
            br#"{"v":1,"topic":"t","partition":0,"entries":"x"}"#,
        ] {
            assert!(
                matches!(
                    PartitionCheckpoints::decode("p", bad),
                    Err(CheckpointError::Malformed { .. })
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
