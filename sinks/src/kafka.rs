//! Keyed records onto a Kafka topic: the durable sink's Kafka side.
//!
//! Any serializable value goes out as one JSON record under a key that identifies it (a dead
//! letter's source offset; later, a decision's rule, subject and window), so that a consumer
//! that keeps the latest value per key sees each record once even though a retry may repeat it.
//! A batch counts as delivered only when `flush` returned and the delivery report of every
//! record in it was a success.

use std::marker::PhantomData;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};
use serde::{Deserialize, Serialize};
use timely::ExchangeData;

use crate::Error;
use crate::durable::{Completeness, Deliver};

/// A record for a topic: its key and its value, sent as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedRecord<V> {
    /// What identifies the record; a repeated delivery repeats the key.
    pub key: String,
    /// The value.
    pub value: V,
}

/// What a delivery to a topic reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredRecords {
    /// The topic.
    pub topic: String,
    /// Records acknowledged by the broker.
    pub records: u64,
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

/// A topic that receives records of type `V`, produced with `acks=all` by an idempotent
/// producer.
///
/// # Output-topic contract
///
/// Every record has a key that identifies what it is about (for a dead letter, the topic,
/// partition and offset of the record that failed) and a value that is a deterministic
/// function of the input. A record is produced again only when a restart re-reads input whose
/// outputs were not yet durable, and then with the same key and the same value. So a consumer
/// that keeps the latest value per key (or a compacted topic) sees each record exactly once;
/// a consumer that reads every record sees each at least once, repeats being identical. The
/// idempotent producer keeps the broker's own retries from reordering or repeating records
/// within a run.
pub struct TopicSink<V> {
    producer: BaseProducer<Deliveries>,
    topic: String,
    value: PhantomData<V>,
}

impl<V> TopicSink<V> {
    /// A producer for `topic` with the settings of `client` (brokers, security, options), a
    /// 5 ms linger unless `client` sets one, and `acks=all` and idempotence always: a record
    /// counts as delivered only when every in-sync replica has it, and the producer's
    /// internal retries never write it twice.
    pub fn connect(client: &ClientConfig, topic: &str) -> Result<TopicSink<V>, Error> {
        let mut config = client.clone();
        if config.get("linger.ms").is_none() {
            config.set("linger.ms", "5");
        }
        config.set("acks", "all");
        config.set("enable.idempotence", "true");
        let producer = config.create_with_context(Deliveries::default())?;
        Ok(TopicSink {
            producer,
            topic: topic.to_owned(),
            value: PhantomData,
        })
    }
}

impl<V: Serialize + ExchangeData> Deliver for TopicSink<V> {
    type Item = KeyedRecord<V>;
    type Batch = ();
    /// Keys and JSON values, or the first encoding error.
    type Sealed = Result<Vec<(String, Vec<u8>)>, String>;
    type Receipt = DeliveredRecords;

    const COMPLETENESS: Completeness = Completeness::Eager;

    fn name(&self) -> String {
        format!("Produce({})", self.topic)
    }

    fn route(_: &KeyedRecord<V>) -> Option<u64> {
        None
    }

    fn batch_of(_: &KeyedRecord<V>) {}

    fn seal(&mut self, _: &(), records: Vec<KeyedRecord<V>>) -> Self::Sealed {
        records
            .into_iter()
            .map(|r| {
                Ok((
                    r.key,
                    serde_json::to_vec(&r.value).map_err(|e| e.to_string())?,
                ))
            })
            .collect()
    }

    fn deliver(&mut self, _: &(), sealed: &Self::Sealed) -> Result<DeliveredRecords, Error> {
        let records = sealed.as_ref().map_err(|e| Error::Encode(e.clone()))?;
        let failed_before = self.producer.context().failed.load(Ordering::Relaxed);
        for (key, value) in records {
            loop {
                match self
                    .producer
                    .send(BaseRecord::to(&self.topic).key(key).payload(value))
                {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        self.producer.poll(Duration::from_millis(10));
                    }
                    Err((err, _)) => return Err(err.into()),
                }
            }
        }
        self.producer.flush(Duration::from_secs(10))?;
        let deliveries = self.producer.context();
        let failed = deliveries.failed.load(Ordering::Relaxed) - failed_before;
        if failed > 0 {
            let last_error = deliveries
                .last_error
                .lock()
                .ok()
                .and_then(|l| l.clone())
                .unwrap_or_default();
            return Err(Error::Undelivered {
                failed,
                total: records.len() as u64,
                last_error,
            });
        }
        Ok(DeliveredRecords {
            topic: self.topic.clone(),
            records: records.len() as u64,
        })
    }
}
