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
//! The object keeps the entry of the last offset the broker confirmed and any newer ones (a
//! [`Ledger`]), so whichever of them the broker holds after a crash (the write and the commit
//! are two steps, and a commit reported as failed may have reached the broker), its entry is
//! there; older entries are dropped at each write, so the object stays small and needs no
//! cleaning. An idle mark is written into the object before the record it applies to is
//! decided. At start the reader resumes each partition from the entry of its committed
//! offset.
//!
//! Why not the commit's own metadata, which Kafka keeps with the offset: tansu 0.6 accepts it
//! and returns it empty (`the_broker_keeps_committed_offsets_per_group` in
//! `integration-tests/tests/exactly_once.rs` prints what comes back), and a broker that
//! silently drops it would bring back exactly the partial rewrites this prevents.
//!
//! The format is versioned: an object of another version is refused with a clear error at
//! start, never misread. An offset committed with no entry (by an older Sightline, or after
//! the lake was wiped) resumes with no event-time state, as a first start does, with a
//! warning.

use serde::{Deserialize, Serialize};

use super::partition::Clock;

/// The checkpoint format this build writes and reads.
pub const VERSION: u32 = 1;

/// The offset of the *start entry*: the state of a partition read from its start, before any
/// commit (no clock; idle marks from the start on).
pub const START: i64 = -1;

/// How many offsets a partition's object keeps beyond the last confirmed commit: after that
/// many failed commits in a row, the newest is tried again instead of a new one.
pub const MAX_UNCONFIRMED: usize = 16;

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
    /// `idle_ms`. Offsets are at or after the entry's, in increasing order.
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

/// One partition's checkpoint bookkeeping between confirmed commits: the entries its object
/// holds and the idle marks since the last confirmed commit. Whichever offset the broker ends
/// up with (a commit reported as failed may have reached it), its entry is in the object, with
/// every idle mark at or after it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    entries: Vec<Checkpoint>,
    marks: Vec<(i64, u64)>,
    committed: Option<i64>,
}

impl Ledger {
    /// The bookkeeping of a partition resumed at `committed` (or from its start, [`START`])
    /// from `entry`, its object's entry for that offset; without one, from no state, which is
    /// then the entry (so that idle marks can be written against it before any commit).
    pub fn resumed(committed: Option<i64>, entry: Option<Checkpoint>) -> Ledger {
        let entry = entry.unwrap_or_else(|| Checkpoint {
            offset: committed.unwrap_or(START),
            ..Checkpoint::default()
        });
        Ledger {
            marks: entry.idle.clone(),
            entries: vec![entry],
            committed,
        }
    }

    /// The last offset the broker confirmed.
    pub fn committed(&self) -> Option<i64> {
        self.committed
    }

    /// Whether the partition resumed from an entry, or has made one since.
    pub fn has_entries(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Records that the partition's idle time rose to `idle_ms` before the record at
    /// `offset` was read.
    pub fn mark(&mut self, offset: i64, idle_ms: u64) {
        self.marks.push((offset, idle_ms));
    }

    /// Prepares the commit of `target` (the partition's clock just before it was `clock`, the
    /// durable frontier `durable`): adds its entry and returns the offset to commit, which is
    /// `target`, or after [`MAX_UNCONFIRMED`] unconfirmed tries in a row the newest of them.
    /// `None` if `target` is not past the confirmed commit.
    pub fn prepare(&mut self, target: i64, durable: u64, clock: Clock) -> Option<i64> {
        let committed = self.committed;
        if committed.is_some_and(|c| target <= c) {
            return None;
        }
        // Entries before the confirmed commit can no longer be what the broker holds.
        self.entries
            .retain(|e| committed.is_none_or(|c| e.offset >= c) && e.offset < target);
        let unconfirmed = self
            .entries
            .iter()
            .filter(|e| committed.is_none_or(|c| e.offset > c))
            .count();
        match self.entries.last() {
            Some(last) if unconfirmed >= MAX_UNCONFIRMED => Some(last.offset),
            _ => {
                self.entries.push(Checkpoint {
                    offset: target,
                    durable,
                    clock,
                    idle: Vec::new(),
                });
                Some(target)
            }
        }
    }

    /// Records that the broker confirmed `offset`.
    pub fn confirmed(&mut self, offset: i64) {
        if self.committed.is_none_or(|c| offset > c) {
            self.committed = Some(offset);
            self.marks.retain(|(o, _)| *o >= offset);
        }
    }

    /// The partition's object: every entry, each with the idle marks at or after it.
    pub fn file(&self, topic: &str, partition: i32) -> PartitionCheckpoints {
        let entries = self
            .entries
            .iter()
            .map(|e| Checkpoint {
                idle: self
                    .marks
                    .iter()
                    .copied()
                    .filter(|(o, _)| *o >= e.offset)
                    .collect(),
                ..e.clone()
            })
            .collect();
        PartitionCheckpoints {
            v: VERSION,
            topic: topic.to_owned(),
            partition,
            entries,
        }
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
            idle: (0..32)
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

    fn clock(ms: u64) -> Clock {
        Clock {
            max_event_ms: Some(ms),
            idle_ms: None,
        }
    }

    #[test]
    fn a_commit_reported_as_failed_keeps_its_entry() {
        // A new group: the first commit (of 10) is reported as failed but reached the broker;
        // the next object must still hold 10's entry.
        let mut ledger = Ledger::default();
        assert_eq!(ledger.prepare(10, 100, clock(1)), Some(10));
        assert_eq!(ledger.prepare(20, 200, clock(2)), Some(20));
        let file = ledger.file("t", 0);
        assert_eq!(file.at(10).map(|e| e.durable), Some(100));
        assert_eq!(file.at(20).map(|e| e.durable), Some(200));
        // Once 20 is confirmed, 10 can no longer be the broker's offset.
        ledger.confirmed(20);
        assert_eq!(ledger.prepare(30, 300, clock(3)), Some(30));
        let file = ledger.file("t", 0);
        assert_eq!(file.at(10), None);
        assert!(file.at(20).is_some() && file.at(30).is_some());
        assert_eq!(ledger.prepare(30, 300, clock(3)), Some(30), "tried again");
        ledger.confirmed(30);
        assert_eq!(
            ledger.prepare(25, 300, clock(3)),
            None,
            "not past the commit"
        );
    }

    #[test]
    fn idle_marks_go_with_every_entry_at_or_before_them_until_a_commit_passes_them() {
        let mut ledger = Ledger::resumed(
            Some(10),
            Some(Checkpoint {
                offset: 10,
                durable: 5,
                clock: clock(1),
                idle: vec![(12, 500)],
            }),
        );
        ledger.mark(15, 600);
        assert_eq!(ledger.prepare(15, 7, clock(2)), Some(15));
        let file = ledger.file("t", 0);
        assert_eq!(
            file.at(10).map(|e| e.idle.clone()),
            Some(vec![(12, 500), (15, 600)])
        );
        // The entry of 15 was made before record 15 was read: its mark at 15 still applies.
        assert_eq!(file.at(15).map(|e| e.idle.clone()), Some(vec![(15, 600)]));
        ledger.confirmed(15);
        assert_eq!(
            ledger.file("t", 0).at(15).map(|e| e.idle.clone()),
            Some(vec![(15, 600)])
        );
        ledger.confirmed(16);
        assert!(
            ledger
                .file("t", 0)
                .entries
                .iter()
                .all(|e| e.idle.is_empty())
        );
    }

    #[test]
    fn before_any_commit_the_start_entry_carries_the_idle_marks() {
        let mut ledger = Ledger::resumed(None, None);
        ledger.mark(3, 900);
        let file = ledger.file("t", 0);
        assert_eq!(file.at(START).map(|e| e.idle.clone()), Some(vec![(3, 900)]));
        // Kept until a commit is confirmed.
        assert_eq!(ledger.prepare(10, 5, clock(1)), Some(10));
        assert!(ledger.file("t", 0).at(START).is_some());
        ledger.confirmed(10);
        assert_eq!(ledger.prepare(20, 6, clock(2)), Some(20));
        assert_eq!(ledger.file("t", 0).at(START), None);
    }

    #[test]
    fn after_many_failed_commits_the_newest_is_tried_again() {
        let mut ledger = Ledger::default();
        for i in 1..=MAX_UNCONFIRMED as i64 {
            assert_eq!(ledger.prepare(i * 10, 0, clock(1)), Some(i * 10));
        }
        let newest = MAX_UNCONFIRMED as i64 * 10;
        assert_eq!(ledger.prepare(newest + 10, 0, clock(1)), Some(newest));
        assert_eq!(ledger.file("t", 0).entries.len(), MAX_UNCONFIRMED);
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
