//! The Kafka dead-letter topic: one JSON record per dead letter.
//!
//! Each record is self-describing (processor and version, failure kind, reason, event name,
//! schema version tried, the JSON pointer and keyword of every violation, the source topic,
//! partition and offset, and the payload as the privacy layer left it), keyed by
//! `<topic>/<partition>/<offset>` of the source record, so that a compacted or replayed topic
//! still has one record per bad event.
//!
//! **Delivery contract.** The operator holds the capability of every dead letter until the
//! broker has acknowledged it: a batch counts as delivered only when `flush` returned and the
//! delivery reports of all its records were successes. The sinks' durability frontier, and with
//! it the source offsets that are committed, never passes a dead letter that is not in the
//! topic. A failed batch is sent again with backoff, so delivery is at-least-once: a retry may
//! repeat records, which their keys identify. Nothing is dropped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};
use serde::Serialize;
use sightline_operators::Time;
use sightline_schemas::{DeadLetter, Origin, Violation};
use sightline_sinks::WrittenWindow;
use sightline_sinks::tables::PROCESSOR;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;
use tracing::warn;

use crate::config::KafkaConfig;

/// The JSON form of a dead letter on the topic.
#[derive(Debug, Serialize)]
pub struct DeadLetterRecord<'a> {
    /// `sightline <version>`.
    pub processor: &'static str,
    /// Failure kind (`missing_field`, `late`, …).
    pub kind: &'static str,
    /// Human-readable reason.
    pub reason: &'a str,
    /// Event name, when known.
    pub event_name: Option<&'a str>,
    /// Schema version tried, when known.
    pub schema_version: Option<&'a str>,
    /// Every violation: pointer, keyword, message.
    pub violations: &'a [Violation],
    /// Event time, RFC 3339, when known.
    pub event_time: Option<String>,
    /// Source of the record.
    pub origin: &'a Origin,
    /// Size of the raw record.
    pub payload_bytes: u64,
    /// The redacted payload.
    pub payload: Option<&'a str>,
    /// Whether the record declared restricted data.
    pub restricted: bool,
}

impl<'a> DeadLetterRecord<'a> {
    /// The record of `dead`.
    pub fn of(dead: &'a DeadLetter) -> DeadLetterRecord<'a> {
        DeadLetterRecord {
            processor: PROCESSOR,
            kind: dead.kind.as_str(),
            reason: &dead.reason,
            event_name: dead.event_name.as_deref(),
            schema_version: dead.schema_version.as_deref(),
            violations: &dead.violations,
            event_time: dead.event_time_ms.map(sightline_schemas::format_rfc3339_ms),
            origin: &dead.origin,
            payload_bytes: dead.payload_bytes,
            payload: dead.payload.as_deref(),
            restricted: dead.restricted,
        }
    }
}

/// Counts failed deliveries, from librdkafka's delivery reports.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((err, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = self.last_error.lock() {
                *last = Some(err.to_string());
            }
        }
    }
}

/// A producer for the dead-letter topic.
pub struct DeadLetterTopic {
    producer: BaseProducer<Deliveries>,
    topic: String,
}

impl DeadLetterTopic {
    /// Connects a producer (`acks=all`) for `topic` with the consumer's settings.
    pub fn connect(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<DeadLetterTopic> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &kafka.bootstrap_servers).set("acks", "all").set("linger.ms", "5");
        for (key, value) in &kafka.options {
            config.set(key, value);
        }
        let producer = config.create_with_context(Deliveries::default()).context("creating the dead-letter producer")?;
        Ok(DeadLetterTopic { producer, topic: topic.to_owned() })
    }

    /// Sends `records` and waits until the broker has acknowledged every one of them.
    fn send_all(&self, records: &[DeadLetter]) -> anyhow::Result<()> {
        let failed_before = self.producer.context().failed.load(Ordering::Relaxed);
        for dead in records {
            let json = serde_json::to_vec(&DeadLetterRecord::of(dead))?;
            let key = format!("{}/{}/{}", dead.origin.topic, dead.origin.partition, dead.origin.offset);
            loop {
                match self.producer.send(BaseRecord::to(&self.topic).key(&key).payload(&json)) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        self.producer.poll(Duration::from_millis(10));
                    }
                    Err((err, _)) => return Err(err).context("producing a dead letter"),
                }
            }
        }
        self.producer.flush(Duration::from_secs(10)).context("waiting for the broker to acknowledge dead letters")?;
        let deliveries = self.producer.context();
        let failed = deliveries.failed.load(Ordering::Relaxed) - failed_before;
        if failed > 0 {
            let last = deliveries.last_error.lock().ok().and_then(|l| l.clone()).unwrap_or_default();
            anyhow::bail!("{failed} of {} dead letters were not delivered (last error: {last})", records.len());
        }
        Ok(())
    }
}

/// Sends every dead letter of `dead` to the topic; see the module's delivery contract. The
/// output carries nothing: its frontier is the topic's durability frontier.
pub fn produce_dead_letters<'s>(dead: StreamVec<'s, Time, (DeadLetter, Time, isize)>, topic: DeadLetterTopic) -> StreamVec<'s, Time, WrittenWindow> {
    let scope = dead.scope();
    dead.unary_frontier(Pipeline, "DeadLetterTopic", move |_capability, info| {
        let activator = scope.activator_for(info.address.clone());
        let mut pending: BTreeMap<Time, (Capability<Time>, Vec<DeadLetter>)> = BTreeMap::new();
        let mut retry_at: Option<(Instant, Duration)> = None;
        move |(input, _frontier),
              _output: &mut timely::dataflow::operators::generic::OutputBuilderSession<
            '_,
            Time,
            timely::container::CapacityContainerBuilder<Vec<WrittenWindow>>,
        >| {
            input.for_each(|cap, data| {
                let Some(&least) = cap.least() else { return };
                for (record, time, diff) in data.drain(..) {
                    // A retraction (negative diff) never happens on this path; multiplicities
                    // above one are the same record read twice.
                    if diff > 0 {
                        let (_, records) = pending.entry(time).or_insert_with(|| (cap.delayed(&least.max(time), 0), Vec::new()));
                        records.push(record);
                    }
                }
            });
            if pending.is_empty() {
                return;
            }
            if let Some((at, _)) = retry_at
                && Instant::now() < at
            {
                activator.activate_after(at - Instant::now());
                return;
            }
            // Send everything pending, in time order; a capability is released once its
            // records are acknowledged.
            let times: Vec<Time> = pending.keys().copied().collect();
            for time in times {
                let Some((_, records)) = pending.get(&time) else { continue };
                match topic.send_all(records) {
                    Ok(()) => {
                        retry_at = None;
                        pending.remove(&time);
                    }
                    Err(err) => {
                        let delay = retry_at.map_or(Duration::from_millis(100), |(_, d)| (d * 2).min(Duration::from_secs(30)));
                        warn!(error = %format!("{err:#}"), retry_in_ms = delay.as_millis() as u64, "dead-letter topic write failed; retrying");
                        retry_at = Some((Instant::now() + delay, delay));
                        activator.activate_after(delay);
                        return;
                    }
                }
            }
        }
    })
}
