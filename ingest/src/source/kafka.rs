//! The Kafka source: one consumer per worker, partitions assigned across the cluster's workers.
//!
//! Every worker reads the metadata of the configured topics, lists all their partitions in
//! a fixed order, and assigns itself those whose position is congruent to its global worker
//! index modulo the number of workers; so partitions are spread over every worker of every
//! process without a group rebalance. Each partition gets its own consumer queue, served in
//! turn, so that one partition's backlog cannot starve the others, and so that the end of a
//! partition is known per partition: a partition is *caught up* only when the consumer has
//! reported its end (librdkafka's partition EOF, which counts transaction markers as read)
//! after its last record. A partition with unread records is never idle, however long it
//! waits to be served.
//!
//! Offsets are not auto-committed: the reader tracks, per partition, the smallest offset
//! whose window is not yet durable, writes the partition's [`Checkpoint`] for it to the
//! [`CheckpointStore`], and then commits it (see [`super::checkpoint`] and
//! [`RecordReader::durable_up_to`]). At start it reads the checkpoints of every partition of
//! its topics and resumes each of its own from the entry of its committed offset.
//! What the consumer prefetches is bounded by librdkafka's `queued.max.messages.kbytes`,
//! so a burst waits in the broker, not in memory.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, DefaultConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use sightline_operators::Windows;
use tracing::{debug, info, warn};

use super::checkpoint::{self, CheckpointError, CheckpointStore, Ledger, object_name};
use super::{Clock, Emit, PartitionState, Payload, ReadStatus, Record, RecordReader};
use crate::Error;

type PartitionQueue = rdkafka::consumer::base_consumer::PartitionQueue<DefaultConsumerContext>;

/// What the reader keeps of one partition besides its [`PartitionState`]: the bookkeeping
/// of this run that its checkpoints are made from.
#[derive(Debug, Default)]
struct Bookkeeping {
    /// Whether the consumer reported the partition's end after its last record.
    at_end: bool,
    /// Where this run started reading, until the first record shows where it really starts.
    resumed_at: Option<i64>,
    /// The offset after the last record handed to the dataflow (a record read before its
    /// partition has an event time waits in the source, so this may lag `next_offset`).
    tracked_next: Option<i64>,
    /// Window start → the smallest offset written into that window and not yet durable, with
    /// the partition's clock just before it.
    pending: BTreeMap<u64, (i64, Clock)>,
    /// The checkpoint entries and idle marks since the last confirmed commit.
    ledger: Ledger,
    /// Marks restored from the checkpoint, applied when their offset is read again.
    restored_marks: VecDeque<(i64, u64)>,
    /// The idle time when the last record was read.
    seen_idle: Option<u64>,
}

/// One worker's Kafka consumer.
pub struct KafkaReader {
    consumer: Arc<BaseConsumer>,
    /// Per slot, the partition's own queue.
    queues: Vec<PartitionQueue>,
    partitions: Vec<PartitionState>,
    /// Per slot, this run's bookkeeping.
    books: Vec<Bookkeeping>,
    /// The slot served next.
    cursor: usize,
    windows: Windows,
    max_event_bytes: usize,
    commit_interval: Duration,
    last_commit: Instant,
    /// Whether the durable frontier moved since the last commit.
    commit_due: bool,
    /// Whether the last checkpoint write or commit failed (it is tried again).
    commit_failed: bool,
    last_durable_ms: u64,
    /// The durable frontier restored from the checkpoints of all partitions.
    written_up_to: u64,
    store: Arc<dyn CheckpointStore>,
    group: String,
    /// Per slot, the partition's end offset as last fetched (-1 before), by [`watch_ends`].
    ends: Arc<Vec<AtomicI64>>,
}

/// How often the end offsets of a reader's partitions are fetched.
const END_OFFSETS_EVERY: Duration = Duration::from_secs(5);

/// Fetches the end offsets (high watermarks) of `partitions` into `ends` every
/// [`END_OFFSETS_EVERY`], from a thread of its own (a fetch is a round trip to the broker,
/// which the worker does not wait for), until the consumer is dropped.
fn watch_ends(
    consumer: std::sync::Weak<BaseConsumer>,
    partitions: Vec<(String, i32)>,
    ends: Arc<Vec<AtomicI64>>,
) {
    let spawned = std::thread::Builder::new()
        .name("kafka-ends".into())
        .spawn(move || {
            loop {
                let Some(consumer) = consumer.upgrade() else {
                    return;
                };
                for ((topic, partition), end) in partitions.iter().zip(ends.iter()) {
                    match consumer.fetch_watermarks(topic, *partition, Duration::from_secs(2)) {
                        Ok((_, high)) => end.store(high, Ordering::Relaxed),
                        Err(err) => {
                            debug!(topic, partition, error = %err, "fetching the end offset failed")
                        }
                    }
                }
                drop(consumer);
                std::thread::sleep(END_OFFSETS_EVERY);
            }
        });
    if let Err(err) = spawned {
        warn!(error = %err, "no consumer-lag metrics: the end offsets' thread did not start");
    }
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
    /// its start, and the end of a partition is reported (it is how a partition is known to
    /// be caught up). A deployment's `options` may not change them.
    pub const CONSUMER_SETTINGS: [(&'static str, &'static str); 4] = [
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", "true"),
    ];

    /// Connects, reads topic metadata, assigns this worker's partitions and resumes each from
    /// its checkpoint in `store`.
    pub fn connect(
        source: &KafkaSource,
        worker: usize,
        peers: usize,
        windows: Windows,
        max_event_bytes: usize,
        store: Arc<dyn CheckpointStore>,
    ) -> crate::Result<KafkaReader> {
        let group = source.client.get("group.id").unwrap_or_default().to_owned();
        let kafka = |action| move |source| Error::Kafka { action, source };
        let consumer: Arc<BaseConsumer> = Arc::new(
            source
                .client
                .create()
                .map_err(kafka("creating the Kafka consumer"))?,
        );
        let deadline = Instant::now() + source.metadata_timeout;
        let mut counts = Vec::new();
        for topic in &source.topics {
            let mut last_error = None;
            let partitions = loop {
                let found = consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .inspect(|_| last_error = None)
                    .map_err(|e| last_error = Some(e.to_string()))
                    .ok()
                    .and_then(|md| {
                        let found = md.topics().iter().find(|t| t.name() == topic);
                        // A topic-level error (not authorized, unknown) is the reason to give
                        // if the topic never appears.
                        if let Some(code) = found.and_then(|t| t.error()) {
                            last_error = Some(format!(
                                "the topic's metadata says {}",
                                rdkafka::types::RDKafkaErrorCode::from(code)
                            ));
                        }
                        found
                            .filter(|t| t.error().is_none())
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
                            last_error,
                        });
                    }
                }
            };
            counts.push((topic.clone(), partitions));
        }
        let mine = assign_partitions(&counts, worker, peers);
        let (partitions, books, written_up_to) =
            resume(&consumer, store.as_ref(), &group, &counts, &mine, deadline)?;

        let mut tpl = TopicPartitionList::new();
        for state in &partitions {
            let offset = state.next_offset.map_or(Offset::Beginning, Offset::Offset);
            tpl.add_partition_offset(&state.topic, state.partition, offset)
                .map_err(kafka("building the assignment"))?;
        }
        consumer
            .assign(&tpl)
            .map_err(kafka("assigning partitions"))?;
        let mut queues = Vec::with_capacity(partitions.len());
        for state in &partitions {
            match consumer.split_partition_queue(&state.topic, state.partition) {
                Some(queue) => queues.push(queue),
                None => {
                    return Err(kafka("giving each partition its own queue")(
                        KafkaError::Subscription(format!(
                            "no queue for {}[{}]",
                            state.topic, state.partition
                        )),
                    ));
                }
            }
        }
        let ends: Arc<Vec<AtomicI64>> =
            Arc::new(partitions.iter().map(|_| AtomicI64::new(-1)).collect());
        watch_ends(
            Arc::downgrade(&consumer),
            partitions
                .iter()
                .map(|p| (p.topic.clone(), p.partition))
                .collect(),
            Arc::clone(&ends),
        );
        info!(worker, peers, partitions = ?mine, written_up_to, resume = ?partitions.iter().map(|p| p.next_offset).collect::<Vec<_>>(), "kafka source assigned");
        Ok(KafkaReader {
            consumer,
            queues,
            partitions,
            books,
            cursor: 0,
            windows,
            max_event_bytes,
            commit_interval: source.commit_interval,
            last_commit: Instant::now(),
            commit_due: false,
            commit_failed: false,
            last_durable_ms: written_up_to,
            written_up_to,
            store,
            group,
            ends,
        })
    }

    /// Stops (`true`) or resumes fetching the partition in `slot`; a paused partition is not
    /// caught up. For tests that make the consumer serve partitions unevenly.
    pub fn pause(&self, slot: usize, paused: bool) -> crate::Result<()> {
        let Some(state) = self.partitions.get(slot) else {
            return Ok(());
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&state.topic, state.partition);
        let kafka = |action| move |source| Error::Kafka { action, source };
        if paused {
            self.consumer
                .pause(&tpl)
                .map_err(kafka("pausing a partition"))
        } else {
            self.consumer
                .resume(&tpl)
                .map_err(kafka("resuming a partition"))
        }
    }

    /// Commits, synchronously, every partition's smallest offset whose window is not durable
    /// at `durable_ms`, after writing each partition's checkpoint for it. An offset counts as
    /// committed only once the broker said so; a failed write or commit is tried again at the
    /// next call (at most every second).
    fn commit(&mut self, durable_ms: u64) {
        let durable_ms = durable_ms.max(self.written_up_to);
        let width = self.windows.width_ms();
        let mut tpl = TopicPartitionList::new();
        let mut objects = Vec::new();
        for (state, b) in self.partitions.iter().zip(&mut self.books) {
            b.pending
                .retain(|start, _| start.saturating_add(width) > durable_ms);
            let Some(next) = b.tracked_next else { continue };
            // The smallest offset not yet durable, and the clock just before it.
            let (target, clock) = b
                .pending
                .values()
                .copied()
                .min_by_key(|(offset, _)| *offset)
                .unwrap_or((next, state.clock));
            let Some(to_commit) = b.ledger.prepare(target, durable_ms, clock) else {
                continue;
            };
            let file = b.ledger.file(&state.topic, state.partition);
            objects.push((
                object_name(&self.group, &state.topic, state.partition),
                file.encode(),
            ));
            // Adding a partition to a fresh list cannot fail for a valid offset.
            let _ =
                tpl.add_partition_offset(&state.topic, state.partition, Offset::Offset(to_commit));
        }
        if tpl.count() == 0 {
            self.commit_failed = false;
            return;
        }
        if let Err(err) = self.store.save(objects) {
            self.commit_failed = true;
            warn!(error = %err, "writing the source checkpoints failed; the offsets are committed after a later write");
            return;
        }
        match self.consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                self.commit_failed = false;
                for element in tpl.elements() {
                    let Offset::Offset(committed) = element.offset() else {
                        continue;
                    };
                    let slot = self.partitions.iter().position(|p| {
                        p.partition == element.partition() && p.topic == element.topic()
                    });
                    if let Some(b) = slot.and_then(|slot| self.books.get_mut(slot)) {
                        b.ledger.confirmed(committed);
                    }
                }
                debug!(partitions = tpl.count(), durable_ms, "committed offsets");
            }
            Err(err) => {
                self.commit_failed = true;
                warn!(error = %err, "offset commit failed; will retry");
            }
        }
    }
}

/// Updates the bookkeeping of the partition in `slot` for its record at `offset`, before it is
/// handed on: its offset, its end, restored idle marks that apply from here, and a new idle
/// mark if the partition's idle time rose since its last record (returns whether it did).
fn note_record(state: &mut PartitionState, b: &mut Bookkeeping, offset: i64) -> bool {
    if let Some(resumed) = b.resumed_at.take()
        && offset != resumed
    {
        warn!(topic = %state.topic, partition = state.partition, resumed, first = offset, "the first record read is not at the resume offset (records compacted or deleted, transaction markers, or a broker that skips part of a batch)");
    }
    state.next_offset = Some(offset + 1);
    b.at_end = false;
    while let Some(&(at, idle_ms)) = b.restored_marks.front()
        && at <= offset
    {
        state.clock.idle_ms = Some(state.clock.idle_ms.unwrap_or(0).max(idle_ms));
        b.restored_marks.pop_front();
    }
    if state.clock.idle_ms > b.seen_idle {
        b.seen_idle = state.clock.idle_ms;
        if let Some(idle_ms) = state.clock.idle_ms {
            b.ledger.mark(offset, idle_ms);
            return true;
        }
    }
    false
}

/// Writes the checkpoint object of a partition now (`ledger` is its bookkeeping): an idle
/// mark was just recorded, and the record it applies to must not be decided before the mark is
/// durable (a restart that re-read the record without it could decide otherwise). Tried a few
/// times; if the store keeps failing, the record goes on, and the mark is in the next object
/// written (a crash before then may decide that record differently: see ARCHITECTURE.md).
fn save_marks(store: &dyn CheckpointStore, group: &str, state: &PartitionState, ledger: &Ledger) {
    let object = (
        object_name(group, &state.topic, state.partition),
        ledger.file(&state.topic, state.partition).encode(),
    );
    for attempt in 0..3u32 {
        match store.save(vec![object.clone()]) {
            Ok(()) => return,
            Err(err) => {
                warn!(topic = %state.topic, partition = state.partition, attempt, error = %err, "writing an idle mark failed");
                std::thread::sleep(Duration::from_millis(100 << attempt));
            }
        }
    }
}

/// Hands one message of the partition in `slot` to `emit`, after its bookkeeping
/// ([`note_record`]) and, if it recorded an idle mark, writing the mark to the partition's
/// checkpoint object (`checkpoints`: the store and the consumer group).
fn deliver(
    message: &BorrowedMessage<'_>,
    slot: usize,
    partitions: &mut [PartitionState],
    books: &mut [Bookkeeping],
    checkpoints: (&dyn CheckpointStore, &str),
    max_event_bytes: usize,
    emit: &mut Emit<'_>,
) {
    let (Some(state), Some(b)) = (partitions.get_mut(slot), books.get_mut(slot)) else {
        return;
    };
    if note_record(state, b, message.offset()) {
        save_marks(checkpoints.0, checkpoints.1, state, &b.ledger);
    }
    let bytes = message.payload().unwrap_or_default();
    let payload = if bytes.len() > max_event_bytes {
        Payload::Oversize(bytes.len() as u64)
    } else {
        Payload::Bytes(bytes)
    };
    let record = Record {
        slot,
        topic: message.topic(),
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        payload,
    };
    emit(record, partitions);
}

/// Where each of this worker's partitions (`mine`) resumes: its committed offset, and its
/// clock and idle marks from the checkpoint entry of that offset; and the durable frontier,
/// the largest over the checkpoints of every partition of every topic (`counts`), which every
/// worker of the cluster computes alike. Store and broker failures are retried until
/// `deadline`; a checkpoint of another version is refused at once.
fn resume(
    consumer: &BaseConsumer,
    store: &dyn CheckpointStore,
    group: &str,
    counts: &[(String, i32)],
    mine: &[(String, i32)],
    deadline: Instant,
) -> crate::Result<(Vec<PartitionState>, Vec<Bookkeeping>, u64)> {
    let kafka = |action| move |source| Error::Kafka { action, source };
    let mut partitions: Vec<PartitionState> = mine
        .iter()
        .map(|(topic, partition)| PartitionState::new(topic, *partition))
        .collect();
    let mut books: Vec<Bookkeeping> = partitions.iter().map(|_| Bookkeeping::default()).collect();

    // The committed offsets of this worker's partitions, and the checkpoints of every
    // partition: this worker's own to resume them, all of them for the durable frontier,
    // which the whole cluster must agree on.
    let mut own = TopicPartitionList::new();
    for (topic, partition) in mine {
        own.add_partition(topic, *partition);
    }
    let committed_offsets = loop {
        match consumer.committed_offsets(own.clone(), Duration::from_secs(10)) {
            Ok(list) => break list,
            Err(err) if Instant::now() < deadline => {
                warn!(error = %err, "reading the committed offsets failed; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(err) => return Err(kafka("reading the committed offsets")(err)),
        }
    };
    let mut written_up_to = 0;
    for (topic, n) in counts {
        for partition in 0..*n {
            let name = object_name(group, topic, partition);
            // A store that fails is asked again until the start-up deadline; a checkpoint
            // of another version is refused at once.
            let loaded = loop {
                match checkpoint::load(store, &name) {
                    Err(CheckpointError::Store { reason, .. }) if Instant::now() < deadline => {
                        warn!(%name, %reason, "reading a checkpoint failed; retrying");
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    other => {
                        break other.map_err(|source| Error::Checkpoint {
                            topic: topic.clone(),
                            partition,
                            source,
                        })?;
                    }
                }
            };
            let Some(file) = loaded else { continue };
            written_up_to = written_up_to.max(file.durable());
            let Some(slot) = mine.iter().position(|(t, q)| t == topic && *q == partition) else {
                continue;
            };
            let committed =
                committed_offsets
                    .find_partition(topic, partition)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
            // A partition read from its start (no commit yet) resumes from the start entry.
            let entry = file.at(committed.unwrap_or(checkpoint::START)).cloned();
            if let Some(entry) = entry {
                partitions[slot].clock = entry.clock;
                let b = &mut books[slot];
                b.seen_idle = entry.clock.idle_ms;
                b.restored_marks = entry.idle.iter().copied().collect();
                b.ledger = Ledger::resumed(committed, Some(entry));
            }
        }
    }
    for (slot, (topic, partition)) in mine.iter().enumerate() {
        let committed = committed_offsets
            .find_partition(topic, *partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let b = &mut books[slot];
        if let Some(offset) = committed {
            partitions[slot].next_offset = Some(offset);
            b.resumed_at = Some(offset);
        }
        if !b.ledger.has_entries() {
            if let Some(offset) = committed {
                warn!(
                    %topic,
                    partition,
                    offset,
                    "the committed offset has no checkpoint (committed by an older version, or the lake was emptied): resuming without event-time state, so windows open at the restart may be written again from part of their input"
                );
            }
            // The state this run starts from, so that idle marks can be written against it.
            b.ledger = Ledger::resumed(committed, None);
        }
    }
    Ok((partitions, books, written_up_to))
}

impl Drop for KafkaReader {
    /// A last commit of what is durable, so that a clean stop resumes where it left off.
    fn drop(&mut self) {
        self.commit(self.last_durable_ms);
    }
}

/// How many records one partition's queue hands out before the next partition is served.
const TURN: usize = 64;

impl RecordReader for KafkaReader {
    fn partitions(&self) -> &[PartitionState] {
        &self.partitions
    }

    fn partitions_mut(&mut self) -> &mut [PartitionState] {
        &mut self.partitions
    }

    fn is_bounded(&self) -> bool {
        false
    }

    fn read(&mut self, max: usize, emit: &mut Emit<'_>) -> crate::Result<ReadStatus> {
        // The main queue serves errors and callbacks; records arrive there only if they
        // were fetched before their partition got its own queue.
        while let Some(next) = self.consumer.poll(Duration::ZERO) {
            match next {
                Ok(message) => {
                    let slot = self.partitions.iter().position(|p| {
                        p.partition == message.partition() && p.topic == message.topic()
                    });
                    match slot {
                        Some(slot) => deliver(
                            &message,
                            slot,
                            &mut self.partitions,
                            &mut self.books,
                            (self.store.as_ref(), &self.group),
                            self.max_event_bytes,
                            emit,
                        ),
                        None => warn!(
                            topic = message.topic(),
                            partition = message.partition(),
                            "message from an unassigned partition ignored by this worker"
                        ),
                    }
                }
                Err(KafkaError::PartitionEOF(partition)) => {
                    // An end reported before the partition got its own queue; the report
                    // names no topic, so it counts only if one slot has that partition.
                    let mut slots = self
                        .partitions
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.partition == partition);
                    if let (Some((slot, _)), None) = (slots.next(), slots.next()) {
                        self.books[slot].at_end = true;
                    }
                }
                Err(err) => warn!(error = %err, "kafka consumer error"),
            }
        }
        let n = self.queues.len();
        let mut delivered = 0;
        let mut empty_turns = 0;
        while delivered < max && empty_turns < n {
            let slot = self.cursor;
            self.cursor = (self.cursor + 1) % n;
            let mut taken = 0;
            while taken < TURN && delivered < max {
                match self.queues[slot].poll(Duration::ZERO) {
                    None => break,
                    Some(Err(KafkaError::PartitionEOF(_))) => {
                        self.books[slot].at_end = true;
                        break;
                    }
                    Some(Err(err)) => {
                        warn!(error = %err, "kafka consumer error");
                        break;
                    }
                    Some(Ok(message)) => {
                        deliver(
                            &message,
                            slot,
                            &mut self.partitions,
                            &mut self.books,
                            (self.store.as_ref(), &self.group),
                            self.max_event_bytes,
                            emit,
                        );
                        taken += 1;
                        delivered += 1;
                    }
                }
            }
            empty_turns = if taken == 0 { empty_turns + 1 } else { 0 };
        }
        Ok(if delivered >= max {
            ReadStatus::More
        } else {
            ReadStatus::Idle
        })
    }

    fn caught_up(&mut self, slot: usize) -> bool {
        self.books.get(slot).is_none_or(|b| b.at_end)
    }

    fn offsets(&self, slot: usize) -> (Option<i64>, Option<i64>) {
        let committed = self.books.get(slot).and_then(|b| b.ledger.committed());
        let end = self
            .ends
            .get(slot)
            .map(|e| e.load(Ordering::Relaxed))
            .filter(|&e| e >= 0);
        (committed, end)
    }

    fn track(&mut self, slot: usize, offset: i64, window_start: Option<u64>, before: Clock) {
        if let Some(b) = self.books.get_mut(slot) {
            b.tracked_next = Some(b.tracked_next.map_or(offset + 1, |n| n.max(offset + 1)));
            if let Some(start) = window_start {
                let smallest = b.pending.entry(start).or_insert((offset, before));
                if offset < smallest.0 {
                    *smallest = (offset, before);
                }
            }
        }
    }

    fn written_up_to(&self) -> u64 {
        self.written_up_to
    }

    fn durable_up_to(&mut self, durable_ms: u64) {
        if durable_ms > self.last_durable_ms {
            self.last_durable_ms = durable_ms;
            self.commit_due = true;
        }
        // A new frontier is committed every `commit_interval`; a failed commit is tried again
        // at most every second even if the frontier does not move.
        let wait = if self.commit_failed {
            self.commit_interval.max(Duration::from_secs(1))
        } else {
            self.commit_interval
        };
        if (self.commit_due || self.commit_failed) && self.last_commit.elapsed() >= wait {
            self.last_commit = Instant::now();
            self.commit_due = false;
            self.commit(self.last_durable_ms);
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
