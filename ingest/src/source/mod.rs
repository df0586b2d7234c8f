//! Sources: where records come from, and the timely operator that turns them into events.
//!
//! A [`RecordReader`] hands out raw records (Kafka messages, NDJSON lines); [`ingest`] is the
//! source operator that decodes them, tracks per-partition watermarks, holds the worker's
//! capability at its watermark, and emits every record exactly once as either an accepted
//! [`Event`] at its event-time tick or a [`DeadLetter`] (decode failure or late) at its
//! processing tick (see [`ingest`]).

pub mod checkpoint;
pub mod kafka;
pub mod ndjson;
pub mod partition;
pub mod watermark;

pub use partition::{Clock, PartitionState};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sightline_operators::{Time, Windows};
use sightline_schemas::{DeadLetter, Event, FailureKind, Origin, wall_clock_ms};
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::{Scope, StreamVec};

use crate::{DecodeError, Decoder};

use watermark::Watermarks;

/// The payload of a raw record.
#[derive(Clone, Copy, Debug)]
pub enum Payload<'a> {
    /// The record's bytes.
    Bytes(&'a [u8]),
    /// The record was larger than the limit; only its size was kept.
    Oversize(u64),
}

/// One raw record from a reader.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    /// Where the record's partition is in the reader's [`RecordReader::partitions`].
    pub slot: usize,
    /// Kafka topic, or `file:<path>`.
    pub topic: &'a str,
    /// Kafka partition number (0 for files).
    pub partition: i32,
    /// Kafka offset, or 0-based line number.
    pub offset: i64,
    /// When the record was produced (the Kafka message timestamp), ms since the epoch; `None`
    /// for files. The future-skew check measures against it, so that it gives the same answer
    /// when the record is read again after a restart.
    pub timestamp_ms: Option<i64>,
    /// The bytes.
    pub payload: Payload<'a>,
}

/// What a read call found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadStatus {
    /// More records may be available right away.
    More,
    /// Nothing available now; try again later.
    Idle,
    /// The input is bounded and has ended.
    Exhausted,
}

/// What a reader hands each record to: the record, and the states of the reader's partitions.
pub type Emit<'a> = dyn FnMut(Record<'_>, &mut [PartitionState]) + 'a;

/// A worker's share of an input.
pub trait RecordReader {
    /// The state of each partition this worker reads, in a fixed order (a record names its
    /// partition by its place here, [`Record::slot`]).
    fn partitions(&self) -> &[PartitionState];

    /// The same states, to update (the ingest operator moves an idle partition's clock).
    fn partitions_mut(&mut self) -> &mut [PartitionState];

    /// Reads up to `max` records, handing each to `emit` together with the partitions' states
    /// (the ingest operator records accepted event times in them). The reader has updated the
    /// record's `next_offset` before.
    fn read(&mut self, max: usize, emit: &mut Emit<'_>) -> crate::Result<ReadStatus>;

    /// Whether the input is bounded (a file) rather than a live stream.
    fn is_bounded(&self) -> bool;

    /// Told, at every activation, that every record whose data lives in windows ending at or
    /// before `durable_ms` is durable in every sink; a Kafka reader commits offsets here.
    fn durable_up_to(&mut self, _durable_ms: u64) {}

    /// Notes that the record at `offset` of the partition in `slot` was written into the
    /// window starting at `window_start`, so that its offset is committed only once that
    /// window is durable (`None`: into no window, it was already written before a restart).
    /// `before` is the partition's clock just before the record: what a restart resuming at
    /// this record starts from.
    fn track(&mut self, _slot: usize, _offset: i64, _window_start: Option<u64>, _before: Clock) {}

    /// The durable frontier restored at start: every window ending at or before it was
    /// written by an earlier run, so records that fall into one are dropped (and counted)
    /// instead of writing it again from part of its input. 0 for a first start.
    fn written_up_to(&self) -> u64 {
        0
    }

    /// Whether everything the partition in `slot` holds has been read (asked before a silent
    /// partition is treated as idle). Readers that cannot tell say yes.
    fn caught_up(&mut self, _slot: usize) -> bool {
        true
    }

    /// The committed offset and the end offset of the partition in `slot`, where the reader
    /// knows them (Kafka); `(None, None)` otherwise.
    fn offsets(&self, _slot: usize) -> (Option<i64>, Option<i64>) {
        (None, None)
    }
}

/// Counters of one process's sources, shared by its workers.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Records read.
    pub read: AtomicU64,
    /// Events accepted.
    pub accepted: AtomicU64,
    /// Records rejected by decoding.
    pub rejected: AtomicU64,
    /// Events behind the watermark.
    pub late: AtomicU64,
    /// Records read again after a restart whose windows had already been written; dropped.
    /// They are not in `accepted`, `rejected` or `late`.
    pub already_written: AtomicU64,
    /// Windows whose closing delay was measured: from the moment the watermark of every source
    /// passed a window's end to the moment every table of that window was durable.
    pub closed_windows: AtomicU64,
    /// The largest such delay, in ms (sampled every 50 ms by the run loop).
    pub max_close_delay_ms: AtomicU64,
    /// Per source partition (topic, partition), where it stands: published by the ingest
    /// operator about twice a second, for the pipeline's metrics.
    pub partitions: Mutex<BTreeMap<(String, i32), PartitionGauge>>,
}

/// Where one source partition stands, for the pipeline's metrics (freshness, consumer lag).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartitionGauge {
    /// The partition's watermark (its position less the allowed lateness), ms since the epoch;
    /// `None` before it has a position.
    pub watermark_ms: Option<u64>,
    /// The next offset to read.
    pub next_offset: Option<i64>,
    /// The last offset committed (Kafka).
    pub committed: Option<i64>,
    /// The partition's end: the offset the next record produced will get (Kafka's high
    /// watermark, fetched every few seconds).
    pub end_offset: Option<i64>,
}

impl PartitionGauge {
    /// Records produced and not yet committed: end offset less committed offset (from the
    /// partition's start, 0, when nothing is committed); `None` without an end offset.
    pub fn consumer_lag(&self) -> Option<i64> {
        Some((self.end_offset? - self.committed.unwrap_or(0)).max(0))
    }
}

impl IngestStats {
    /// `(read, accepted, rejected, late)` as of now.
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.read.load(Ordering::Relaxed),
            self.accepted.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
            self.late.load(Ordering::Relaxed),
        )
    }
}

/// A graceful stop, shared by the workers of one process. Once it is requested, every source
/// stops reading but keeps its capability, so that open windows stay open (they are not final)
/// while the windows already closed are written; each source keeps handing the durable
/// frontier to its reader (which commits on it) and records here how far it has, so that the
/// run loop knows when the last commit covers every written window.
#[derive(Debug, Default)]
pub struct Drain {
    requested: AtomicBool,
    /// Per worker, the durable frontier its source has handed to its reader.
    handed: Vec<AtomicU64>,
}

impl Drain {
    /// A stop not yet requested, for `workers` workers.
    pub fn new(workers: usize) -> Drain {
        Drain {
            requested: AtomicBool::new(false),
            handed: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Asks every source to stop reading.
    pub fn request(&self) {
        self.requested.store(true, Ordering::Relaxed);
    }

    /// Whether a stop was requested.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    /// Whether every worker's reader has been told that everything before `ms` is durable.
    pub fn handed_at_least(&self, ms: u64) -> bool {
        self.handed.iter().all(|h| h.load(Ordering::Acquire) >= ms)
    }

    /// `worker` is timely's index; a process's workers are `process × workers + i`.
    fn hand(&self, worker: usize, ms: u64) {
        if let Some(h) = self.handed.get(worker % self.handed.len().max(1)) {
            h.fetch_max(ms, Ordering::Release);
        }
    }
}

/// Settings of the ingest operator.
#[derive(Clone, Debug)]
pub struct IngestSettings {
    /// Timestamp granularity, ms.
    pub tick_ms: u64,
    /// Allowed lateness, ms.
    pub lateness_ms: u64,
    /// Idle timeout of a partition (unbounded inputs only).
    pub idle_timeout: Duration,
    /// Records per activation.
    pub batch_size: usize,
    /// The windows (to tell the reader which window each record lands in).
    pub windows: Windows,
    /// The decoders, by topic.
    pub decoders: Decoders,
    /// How far ahead of the time a record was produced (the wall clock for files) an event
    /// time may be, ms.
    pub max_future_skew_ms: u64,
    /// The process's graceful stop.
    pub drain: Arc<Drain>,
}

/// One worker's decoders: the default one (canonical envelope, or the format a replay was
/// given) and one per topic declared with another format.
#[derive(Clone, Debug)]
pub struct Decoders {
    default: Decoder,
    by_topic: Vec<(String, Decoder)>,
}

impl Decoders {
    /// Decoders that all use `default`.
    pub fn new(default: Decoder) -> Decoders {
        Decoders {
            default,
            by_topic: Vec::new(),
        }
    }

    /// Uses `decoder` for records of `topic`.
    pub fn with_topic(mut self, topic: &str, decoder: Decoder) -> Decoders {
        self.by_topic.push((topic.to_owned(), decoder));
        self
    }

    /// The decoder of `topic`.
    pub fn for_topic(&mut self, topic: &str) -> &mut Decoder {
        match self.by_topic.iter_mut().find(|(t, _)| t == topic) {
            Some((_, decoder)) => decoder,
            None => &mut self.default,
        }
    }
}

/// An accepted event or a dead letter, with its time and multiplicity. Both are behind a
/// pointer: an event is about 200 bytes and a record is moved through several containers on
/// its way to the aggregates, which share it (`Arc`) instead of copying it.
pub type Ingested = (Decoded, Time, isize);

/// What a record became: a shared event or a boxed dead letter.
pub type Decoded = Result<Arc<Event>, Box<DeadLetter>>;

/// The source operator: reads, decodes, watermarks. See the module documentation.
///
/// Accepted events are emitted at their event-time tick. Dead letters (decode failures and
/// late events) are emitted at their partition's processing time: the tick of the
/// partition's clock position when they were read (its newest event time, or its idle time),
/// which is never behind the worker's capability and depends only on the partition's own
/// records. Records that fail before their partition has a position are processed at the time
/// they were produced (the Kafka timestamp); without one (files), they wait for the position
/// (the first accepted event, or the partition going idle), and if a bounded input ends
/// first, they are processed at the wall-clock tick.
///
/// After a restart, records whose window ends at or before the reader's
/// [`RecordReader::written_up_to`] were written by the run before: they are dropped and
/// counted in [`IngestStats::already_written`].
///
/// `durable` is a probe on the sinks' output; the operator reports its frontier to the reader
/// so that a Kafka reader commits only offsets whose windows are durable. Reader errors are
/// logged and retried on the next activation; they never lose a record.
pub fn ingest<'s>(
    scope: Scope<'s, Time>,
    mut reader: Box<dyn RecordReader>,
    settings: IngestSettings,
    durable: ProbeHandle<Time>,
    stats: Arc<IngestStats>,
) -> StreamVec<'s, Time, Ingested> {
    let mut decoders = settings.decoders.clone();
    source(scope, "Ingest", move |capability, info| {
        let activator = scope.activator_for(info.address.clone());
        let worker = scope.index();
        let bounded = reader.is_bounded();
        let idle_timeout = (!bounded).then_some(settings.idle_timeout);
        let mut marks = Watermarks::new(
            reader.partitions(),
            settings.lateness_ms,
            idle_timeout,
            Instant::now(),
        );
        let mut cap = Some(capability);
        let tick = settings.tick_ms.max(1);
        let windows = settings.windows;
        let written_up_to = reader.written_up_to();
        let mut last_durable = 0;
        let mut published: Option<Instant> = None;
        // Dead letters of partitions that have no clock position yet.
        let mut waiting: Vec<Pending> = Vec::new();
        let mut ready: Vec<(Pending, Time)> = Vec::with_capacity(settings.batch_size);
        move |output| {
            let Some(c) = cap.as_mut() else { return };
            if let Some(durable_ms) = durable.with_frontier(|f| f.first().copied()) {
                // Every activation, so that a reader can retry a failed commit.
                reader.durable_up_to(durable_ms);
                if durable_ms > last_durable {
                    last_durable = durable_ms;
                    settings.drain.hand(worker, durable_ms);
                }
            }
            if settings.drain.is_requested() {
                // Stopping: read nothing more, hold the capability, keep reporting.
                activator.activate_after(Duration::from_millis(20));
                return;
            }
            let now = Instant::now();
            let wall_ms = wall_clock_ms();
            let mut read = 0u64;
            let status = {
                let decoders = &mut decoders;
                let marks = &mut marks;
                let (ready, waiting) = (&mut ready, &mut waiting);
                reader.read(settings.batch_size, &mut |record, partitions| {
                    read += 1;
                    let slot = record.slot;
                    let before = partitions.get(slot).map(|p| p.clock).unwrap_or_default();
                    let origin = || Origin {
                        topic: record.topic.to_owned(),
                        partition: record.partition,
                        offset: record.offset,
                    };
                    let decoder = decoders.for_topic(record.topic);
                    // The future-skew horizon is measured from when the record was produced,
                    // so that reading it again gives the same answer.
                    let produced_ms = record.timestamp_ms.filter(|&t| t > 0);
                    let horizon_ms = produced_ms
                        .map_or(wall_ms, |t| t as u64)
                        .saturating_add(settings.max_future_skew_ms);
                    let item =
                        match record.payload {
                            Payload::Oversize(size) => Err(decoder
                                .oversize(size)
                                .into_dead_letter(origin(), size, None)),
                            Payload::Bytes(bytes) => match decoder.decode(bytes) {
                                Ok(event) if event.event_time_ms as u64 > horizon_ms => {
                                    let reason = format!(
                                        "timestamp {} is more than {} s ahead of {}",
                                        sightline_schemas::format_rfc3339_ms(event.event_time_ms),
                                        settings.max_future_skew_ms / 1000,
                                        match produced_ms {
                                            Some(_) => "the time the record was produced",
                                            None => "the wall clock",
                                        }
                                    );
                                    let err = DecodeError::new(FailureKind::InvalidValue, reason)
                                        .of_event(&event);
                                    let payload =
                                        decoder.redact_payload(bytes, Some(event.event_time_ms));
                                    Err(err.into_dead_letter(origin(), bytes.len() as u64, payload))
                                }
                                Ok(event) => {
                                    let event_ms = event.event_time_ms as u64;
                                    let watermark = marks.of(partitions, slot);
                                    if event_ms < watermark {
                                        let payload = decoder
                                            .redact_payload(bytes, Some(event.event_time_ms));
                                        Err(DeadLetter::late(
                                            &event,
                                            watermark,
                                            origin(),
                                            bytes.len() as u64,
                                            payload,
                                        ))
                                    } else {
                                        marks.observe(partitions, slot, event_ms, now);
                                        Ok(event)
                                    }
                                }
                                Err(err) => {
                                    let time = err.event_time_ms.or(record.timestamp_ms);
                                    let payload = decoder.redact_payload(bytes, time);
                                    Err(err.into_dead_letter(origin(), bytes.len() as u64, payload))
                                }
                            },
                        };
                    let pending = |item| Pending {
                        item,
                        slot,
                        offset: record.offset,
                        before,
                    };
                    match item {
                        Ok(event) => {
                            let t = event.event_time_ms as u64;
                            let t = t - t % tick;
                            // The partition's first position: its dead letters so far are
                            // processed here.
                            if before.position_ms().is_none() {
                                release(waiting, ready, |p| p.slot == slot, t);
                            }
                            ready.push((pending(Ok(Arc::new(event))), t));
                        }
                        // A partition with no position yet: the record's produce time, so
                        // that a stream of only broken records never piles up here.
                        Err(dead) => match before.position_ms().or(produced_ms.map(|t| t as u64)) {
                            Some(position) => ready
                                .push((pending(Err(Box::new(dead))), position - position % tick)),
                            None => waiting.push(pending(Err(Box::new(dead)))),
                        },
                    }
                })
            };
            let status = match status {
                Ok(status) => status,
                Err(err) => {
                    tracing::warn!(error = %err, cause = ?std::error::Error::source(&err), "source read failed; retrying");
                    ReadStatus::Idle
                }
            };
            let idle: Vec<usize> = if status == ReadStatus::Exhausted {
                Vec::new()
            } else {
                marks
                    .silent(Instant::now())
                    .into_iter()
                    .filter(|&slot| reader.caught_up(slot))
                    .collect()
            };
            let watermark = marks.advance(reader.partitions_mut(), &idle, wall_ms);
            if published.is_none_or(|at| at.elapsed() >= PUBLISH_EVERY) {
                published = Some(Instant::now());
                publish(reader.as_ref(), settings.lateness_ms, &stats);
            }
            if !waiting.is_empty() {
                // Partitions that went idle without an event: their dead letters are processed
                // at the idle time. If a bounded input ended, at the wall clock.
                for &slot in &idle {
                    if let Some(position) = reader
                        .partitions()
                        .get(slot)
                        .and_then(|p| p.clock.position_ms())
                    {
                        release(
                            &mut waiting,
                            &mut ready,
                            |p| p.slot == slot,
                            position - position % tick,
                        );
                    }
                }
                if status == ReadStatus::Exhausted {
                    release(&mut waiting, &mut ready, |_| true, wall_ms - wall_ms % tick);
                }
            }
            if !ready.is_empty() {
                let floor = *c.time();
                let mut session = output.session(c);
                let (mut accepted, mut rejected, mut late, mut skipped) = (0u64, 0u64, 0u64, 0u64);
                for (p, time) in ready.drain(..) {
                    // Never behind the capability (a partition's position is at or ahead of
                    // the worker's watermark); kept as a guard.
                    let time = time.max(floor);
                    let start = windows.start_of(time);
                    if windows.end_of(start) <= written_up_to {
                        skipped += 1;
                        if !bounded {
                            reader.track(p.slot, p.offset, None, p.before);
                        }
                        continue;
                    }
                    match &p.item {
                        Ok(_) => accepted += 1,
                        Err(dead) if dead.kind == FailureKind::Late => late += 1,
                        Err(_) => rejected += 1,
                    }
                    if !bounded {
                        reader.track(p.slot, p.offset, Some(start), p.before);
                    }
                    session.give((p.item, time, 1));
                }
                stats.accepted.fetch_add(accepted, Ordering::Relaxed);
                stats.rejected.fetch_add(rejected, Ordering::Relaxed);
                stats.late.fetch_add(late, Ordering::Relaxed);
                stats.already_written.fetch_add(skipped, Ordering::Relaxed);
            }
            stats.read.fetch_add(read, Ordering::Relaxed);
            if status == ReadStatus::Exhausted {
                publish(reader.as_ref(), settings.lateness_ms, &stats);
                cap = None;
                return;
            }
            let target = watermark - watermark % tick;
            if target > *c.time() {
                c.downgrade(&target);
            }
            match status {
                ReadStatus::More => activator.activate(),
                _ => activator.activate_after(Duration::from_millis(20)),
            }
        }
    })
}

/// How often a source publishes where its partitions stand.
const PUBLISH_EVERY: Duration = Duration::from_millis(500);

/// Publishes where `reader`'s partitions stand to `stats`.
fn publish(reader: &dyn RecordReader, lateness_ms: u64, stats: &IngestStats) {
    let Ok(mut gauges) = stats.partitions.lock() else {
        return;
    };
    for (slot, p) in reader.partitions().iter().enumerate() {
        let (committed, end_offset) = reader.offsets(slot);
        gauges.insert(
            (p.topic.clone(), p.partition),
            PartitionGauge {
                watermark_ms: p.clock.watermark_ms(lateness_ms),
                next_offset: p.next_offset,
                committed,
                end_offset,
            },
        );
    }
}

/// A decoded record on its way out of the source, with where it came from.
struct Pending {
    item: Decoded,
    slot: usize,
    offset: i64,
    /// Its partition's clock just before it.
    before: Clock,
}

/// Moves the `waiting` records that `which` selects to `ready`, at `time`.
fn release(
    waiting: &mut Vec<Pending>,
    ready: &mut Vec<(Pending, Time)>,
    which: impl Fn(&Pending) -> bool,
    time: Time,
) {
    let mut i = 0;
    while i < waiting.len() {
        if which(&waiting[i]) {
            ready.push((waiting.remove(i), time));
        } else {
            i += 1;
        }
    }
}
