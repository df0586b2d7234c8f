//! The Kafka source: one consumer per worker, partitions assigned across the cluster's workers.
//!
//! Every worker reads the metadata of the configured topics, lists all their partitions in
//! a fixed order, and assigns itself those whose position is congruent to its global worker
//! index modulo the number of workers; so partitions are spread over every worker of every
//! process without a group rebalance. Offsets are not auto-committed: the pipeline tracks,
//! per partition, the smallest offset whose window is not yet durable, and commits up to it
//! (see [`RecordReader::durable_up_to`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use sightline_operators::Windows;
use tracing::{debug, info, warn};

use super::{Emit, PartitionState, Payload, ReadStatus, Record, RecordReader};
use crate::Error;

/// What the reader keeps of one partition besides its [`PartitionState`]: the bookkeeping
/// of this run (commits, end-of-partition checks), which a restart does not need.
#[derive(Debug, Default)]
struct Progress {
    /// The gap to the partition's end at the last check, to notice a gap that never closes.
    last_gap: Option<i64>,
    /// Consecutive failed queries of the partition's end.
    failed_checks: u32,
    /// When the partition was last found caught up with its end, or not.
    caught_up: Option<(Instant, bool)>,
    /// The offset after the last record handed to the dataflow (a record read before any event
    /// time is known waits in the source, so this may lag `next_offset`).
    tracked_next: Option<i64>,
    /// Window start → smallest offset written into that window and not yet durable.
    pending: BTreeMap<u64, i64>,
    /// The last offset the broker confirmed as committed.
    committed: Option<i64>,
}

/// One worker's Kafka consumer.
pub struct KafkaReader {
    consumer: BaseConsumer,
    topics: Vec<String>,
    /// `index[topic][partition]` → slot in `partitions`.
    index: Vec<Vec<Option<usize>>>,
    partitions: Vec<PartitionState>,
    /// Per slot, this run's bookkeeping.
    progress: Vec<Progress>,
    windows: Windows,
    max_event_bytes: usize,
    commit_interval: Duration,
    last_commit: Instant,
    last_durable_ms: u64,
    last_end_query: Option<Instant>,
}

/// The partitions of `topics` that worker `worker` of `peers` reads, in assignment order.
pub fn assign_partitions(
    partition_counts: &[(String, i32)],
    worker: usize,
    peers: usize,
) -> Vec<(String, i32)> {
    let mut all: Vec<(String, i32)> = partition_counts
        .iter()
        .flat_map(|(t, n)| (0..*n).map(move |p| (t.clone(), p)))
        .collect();
    all.sort();
    all.into_iter()
        .enumerate()
        .filter(|(i, _)| i % peers.max(1) == worker)
        .map(|(_, tp)| tp)
        .collect()
}

/// What a Kafka source reads, and how.
#[derive(Clone, Debug)]
pub struct KafkaSource {
    /// The consumer's librdkafka settings: brokers, `group.id`, and
    /// [`KafkaReader::CONSUMER_SETTINGS`] unless a deployment overrides them.
    pub client: ClientConfig,
    /// The topics; their partitions are spread over all workers.
    pub topics: Vec<String>,
    /// How often durable offsets are committed.
    pub commit_interval: Duration,
    /// How long to wait at start-up for the topics to exist.
    pub metadata_timeout: Duration,
}

impl KafkaReader {
    /// The consumer settings the reader's contract depends on: offsets are committed by the
    /// reader only (never automatically), a partition without a committed offset is read from
    /// its start, and reaching a partition's end is not an event.
    pub const CONSUMER_SETTINGS: [(&'static str, &'static str); 4] = [
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", "false"),
    ];

    /// Connects, reads topic metadata and assigns this worker's partitions.
    pub fn connect(
        source: &KafkaSource,
        worker: usize,
        peers: usize,
        windows: Windows,
        max_event_bytes: usize,
    ) -> crate::Result<KafkaReader> {
        let kafka = |action| move |source| Error::Kafka { action, source };
        let consumer: BaseConsumer = source
            .client
            .create()
            .map_err(kafka("creating the Kafka consumer"))?;
        let deadline = Instant::now() + source.metadata_timeout;
        let mut counts = Vec::new();
        for topic in &source.topics {
            let partitions = loop {
                let found = consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .ok()
                    .and_then(|md| {
                        md.topics()
                            .iter()
                            .find(|t| t.name() == topic && t.error().is_none())
                            .map(|t| t.partitions().len() as i32)
                    })
                    .filter(|n| *n > 0);
                match found {
                    Some(n) => break n,
                    None if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(250))
                    }
                    None => {
                        return Err(Error::TopicNotFound {
                            topic: topic.clone(),
                            servers: source
                                .client
                                .get("bootstrap.servers")
                                .unwrap_or_default()
                                .to_owned(),
                            timeout_ms: source.metadata_timeout.as_millis() as u64,
                        });
                    }
                }
            };
            counts.push((topic.clone(), partitions));
        }
        let mine = assign_partitions(&counts, worker, peers);
        let mut tpl = TopicPartitionList::new();
        let topics = source.topics.clone();
        let mut index: Vec<Vec<Option<usize>>> = counts
            .iter()
            .map(|(_, n)| vec![None; *n as usize])
            .collect();
        let mut partitions = Vec::new();
        for (topic, partition) in &mine {
            tpl.add_partition_offset(topic, *partition, Offset::Stored)
                .map_err(kafka("building the assignment"))?;
            let t = topics.iter().position(|n| n == topic).unwrap_or(0);
            index[t][*partition as usize] = Some(partitions.len());
            partitions.push(PartitionState::new(topic, *partition));
        }
        // Where each partition resumes, so that a partition can be known to be caught up
        // before it has delivered anything.
        if let Ok(committed) = consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            for element in committed.elements() {
                if let (Offset::Offset(o), Some(t)) = (
                    element.offset(),
                    topics.iter().position(|n| n == element.topic()),
                ) && let Some(Some(i)) = index[t].get(element.partition() as usize)
                {
                    partitions[*i].next_offset = Some(o);
                }
            }
        }
        consumer
            .assign(&tpl)
            .map_err(kafka("assigning partitions"))?;
        info!(worker, peers, partitions = ?mine, "kafka source assigned");
        Ok(KafkaReader {
            consumer,
            topics,
            index,
            progress: partitions.iter().map(|_| Progress::default()).collect(),
            partitions,
            windows,
            max_event_bytes,
            commit_interval: source.commit_interval,
            last_commit: Instant::now(),
            last_durable_ms: 0,
            last_end_query: None,
        })
    }

    /// Commits, synchronously, every partition's smallest offset whose window is not durable
    /// at `durable_ms`. An offset counts as committed only once the broker said so, so a
    /// failed commit is tried again at the next call.
    fn commit(&mut self, durable_ms: u64) {
        let mut tpl = TopicPartitionList::new();
        let width = self.windows.width_ms();
        for (state, p) in self.partitions.iter().zip(&mut self.progress) {
            p.pending
                .retain(|start, _| start.saturating_add(width) > durable_ms);
            let Some(next) = p.tracked_next else { continue };
            let committable = p.pending.values().copied().min().unwrap_or(next);
            if p.committed.is_none_or(|c| committable > c) {
                // Adding a partition to a fresh list cannot fail for a valid offset.
                let _ = tpl.add_partition_offset(
                    &state.topic,
                    state.partition,
                    Offset::Offset(committable),
                );
            }
        }
        if tpl.count() == 0 {
            return;
        }
        match self.consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                for element in tpl.elements() {
                    let committed = match element.offset() {
                        Offset::Offset(o) => o,
                        _ => continue,
                    };
                    let slot = self.partitions.iter().position(|p| {
                        p.partition == element.partition() && p.topic == element.topic()
                    });
                    if let Some(p) = slot.and_then(|slot| self.progress.get_mut(slot)) {
                        p.committed = Some(committed);
                    }
                }
                debug!(partitions = tpl.count(), durable_ms, "committed offsets");
            }
            Err(err) => warn!(error = %err, "offset commit failed; will retry"),
        }
    }
}

impl Drop for KafkaReader {
    /// A last commit of what is durable, so that a clean stop resumes where it left off.
    fn drop(&mut self) {
        self.commit(self.last_durable_ms);
    }
}

impl RecordReader for KafkaReader {
    fn partitions(&self) -> &[PartitionState] {
        &self.partitions
    }

    fn is_bounded(&self) -> bool {
        false
    }

    fn read(&mut self, max: usize, emit: &mut Emit<'_>) -> crate::Result<ReadStatus> {
        for _ in 0..max {
            let message = match self.consumer.poll(Duration::ZERO) {
                None => return Ok(ReadStatus::Idle),
                Some(Err(err)) => {
                    warn!(error = %err, "kafka consumer error");
                    return Ok(ReadStatus::Idle);
                }
                Some(Ok(message)) => message,
            };
            let topic = message.topic();
            let Some(slot) = self.topics.iter().position(|t| t == topic).and_then(|t| {
                self.index[t]
                    .get(message.partition() as usize)
                    .copied()
                    .flatten()
            }) else {
                warn!(
                    topic,
                    partition = message.partition(),
                    "message from an unassigned partition ignored by this worker"
                );
                continue;
            };
            if let Some(p) = self.partitions.get_mut(slot) {
                p.next_offset = Some(message.offset() + 1);
            }
            let bytes = message.payload().unwrap_or_default();
            let payload = if bytes.len() > self.max_event_bytes {
                Payload::Oversize(bytes.len() as u64)
            } else {
                Payload::Bytes(bytes)
            };
            let record = Record {
                slot,
                topic,
                partition: message.partition(),
                offset: message.offset(),
                payload,
            };
            emit(record, &mut self.partitions);
        }
        Ok(ReadStatus::More)
    }

    fn caught_up(&mut self, slot: usize) -> bool {
        let (Some(state), Some(p)) = (self.partitions.get(slot), self.progress.get_mut(slot))
        else {
            return true;
        };
        if let Some((checked, answer)) = p.caught_up
            && checked.elapsed() < Duration::from_secs(1)
        {
            return answer;
        }
        // One broker round trip (at most 1 s), only for a partition that has been silent for
        // the idle timeout, and at most one every 200 ms for the whole worker, so that many
        // silent partitions cannot stall the worker thread.
        if self
            .last_end_query
            .is_some_and(|at| at.elapsed() < Duration::from_millis(200))
        {
            return p.caught_up.is_some_and(|(_, answer)| answer);
        }
        self.last_end_query = Some(Instant::now());
        let answer = match self.consumer.fetch_watermarks(
            &state.topic,
            state.partition,
            Duration::from_secs(1),
        ) {
            Ok((low, high)) => {
                // Retention may have moved the start past where this reader resumes.
                let next = state.next_offset.unwrap_or(low).max(low);
                let gap = high - next;
                // A gap that stays the same while nothing arrives is not data on its way (for
                // example transaction markers, which a consumer never receives).
                let stuck = gap > 0 && p.last_gap == Some(gap);
                p.last_gap = Some(gap);
                p.failed_checks = 0;
                gap <= 0 || stuck
            }
            Err(err) => {
                // A broker that cannot say where the partition ends must not stall the
                // pipeline for good: after three failed checks, silence alone decides.
                p.failed_checks += 1;
                let give_up = p.failed_checks >= 3;
                warn!(topic = %state.topic, partition = state.partition, error = %err, treated_as_idle = give_up, "could not read the partition's end");
                give_up
            }
        };
        p.caught_up = Some((Instant::now(), answer));
        answer
    }

    fn track(&mut self, slot: usize, offset: i64, window_start_ms: u64) {
        if let Some(p) = self.progress.get_mut(slot) {
            p.tracked_next = Some(p.tracked_next.map_or(offset + 1, |n| n.max(offset + 1)));
            let smallest = p.pending.entry(window_start_ms).or_insert(offset);
            *smallest = (*smallest).min(offset);
        }
    }

    fn durable_up_to(&mut self, durable_ms: u64) {
        self.last_durable_ms = durable_ms;
        if self.last_commit.elapsed() >= self.commit_interval {
            self.last_commit = Instant::now();
            self.commit(durable_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_spread_over_all_workers() {
        let counts = vec![("b".to_string(), 3), ("a".to_string(), 2)];
        let all: Vec<_> = (0..3)
            .flat_map(|w| assign_partitions(&counts, w, 3))
            .collect();
        assert_eq!(all.len(), 5);
        assert_eq!(
            assign_partitions(&counts, 0, 3),
            vec![("a".to_string(), 0), ("b".to_string(), 1)]
        );
        assert!(assign_partitions(&counts, 5, 6).is_empty());
    }
}
