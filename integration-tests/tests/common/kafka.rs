//! Kafka round trips: produce generated events to a topic, run the pipeline on it, check
//! the lake against the reference and the committed offsets against the topic's end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use sightline::config::{Config, TopicConfig};
use sightline::generator::{Generator, GeneratorConfig, LineKind};
use sightline::run::{Input, Job, run};

use super::*;

/// The configuration of a Kafka test run: 5 s windows, 1 s lateness and idle timeout, the test
/// key, offsets committed at every chance, state saved every second of event time.
pub fn kafka_config(bootstrap: &str, group: &str, workers: usize) -> Config {
    let mut config = Config::default();
    config.pipeline.workers = workers;
    config.privacy.key = Some(TEST_KEY.into());
    config.pipeline.window_ms = 5_000;
    config.pipeline.allowed_lateness_ms = 1_000;
    config.pipeline.idle_timeout_ms = 1_000;
    config.kafka.bootstrap_servers = bootstrap.into();
    config.kafka.group_id = group.into();
    config.kafka.commit_interval_ms = 0;
    // Offsets are committed up to the last snapshot of the funnels' state: take them often, so
    // that the committed offsets reach the topics' ends soon after the input.
    config.analytics.save_state_every_ms = 1_000;
    config
}

/// Runs the pipeline over `config`'s Kafka input on a thread, writing to `lake_dir`; returns
/// its stop flag and the thread.
pub fn start(
    config: &Config,
    lake_dir: &Path,
) -> (
    Arc<AtomicBool>,
    std::thread::JoinHandle<anyhow::Result<sightline::run::Summary>>,
) {
    let lake = sightline_sinks::Lake::open(lake_dir.to_str().expect("utf-8")).expect("lake");
    start_with_lake(config, lake)
}

/// [`start`], writing to `lake`.
pub fn start_with_lake(
    config: &Config,
    lake: sightline_sinks::Lake,
) -> (
    Arc<AtomicBool>,
    std::thread::JoinHandle<anyhow::Result<sightline::run::Summary>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let job = Job {
        config: config.clone(),
        input: Input::Kafka(config.kafka.clone()),
        lake,
        stop: Arc::clone(&stop),
        print_windows: false,
        format: Default::default(),
    };
    (stop, std::thread::spawn(move || run(job)))
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A test client of `bootstrap` with `security`'s settings (TLS, SASL) added.
fn client(bootstrap: &str, security: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (k, v) in security {
        config.set(*k, *v);
    }
    config
}

/// Reads `topics` from the beginning with a plain consumer until `events` records have come
/// back, and returns each partition's next offset (last offset + 1).
fn end_offsets(
    bootstrap: &str,
    security: &[(&str, &str)],
    topics: &[(&str, i32)],
    events: usize,
) -> BTreeMap<(String, i32), i64> {
    use rdkafka::Message;
    let consumer: BaseConsumer = client(bootstrap, security)
        .set("group.id", "sightline-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for (topic, partitions) in topics {
        for p in 0..*partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("assignment");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut next = BTreeMap::new();
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen < events {
        assert!(
            Instant::now() < deadline,
            "a plain consumer read back only {seen} of {events} records"
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            seen += 1;
            let slot = next
                .entry((m.topic().to_string(), m.partition()))
                .or_insert(0);
            *slot = (*slot).max(m.offset() + 1);
        }
    }
    next
}

/// Runs the pipeline on `topics` (which must exist with the given partition counts),
/// produces `events` generated events to them, round-robin, while it runs, and checks
/// everything the lake and the consumer group hold.
pub fn round_trip(
    bootstrap: &str,
    topics: &[(&str, i32)],
    events: usize,
    workers: usize,
    sampling_topic: Option<&str>,
) {
    round_trip_secured(
        bootstrap,
        &[],
        |_| {},
        topics,
        events,
        workers,
        sampling_topic,
    )
}

/// [`round_trip`] against a secured broker: the test's own clients use `security`, the
/// pipeline's configuration is what `configure` makes of the test's.
pub fn round_trip_secured(
    bootstrap: &str,
    security: &[(&str, &str)],
    configure: impl FnOnce(&mut Config),
    topics: &[(&str, i32)],
    events: usize,
    workers: usize,
    sampling_topic: Option<&str>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let lake_dir = dir.path().join("lake");
    let group = format!("sightline-test-{}", topics[0].0);

    let mut config = kafka_config(bootstrap, &group, workers);
    configure(&mut config);
    // A rate table every window, on the topic when one is given.
    config.sampling.interval_windows = 1;
    config.sampling.budget_events_per_second = 20.0;
    config.kafka.sampling_topic = sampling_topic.map(str::to_owned);
    config.kafka.topics = topics
        .iter()
        .map(|(name, _)| TopicConfig::envelope(name))
        .collect();
    let (stop, pipeline) = start(&config, &lake_dir);

    // Event times start now, so that no partition's idle clock makes them late.
    let mut generator = Generator::new(GeneratorConfig {
        seed: 11,
        start_ms: now_ms(),
        events_per_second: 1000.0,
        late_fraction: 0.0,
        bad_fraction: 0.01,
        jitter_ms: 500,
        ..GeneratorConfig::default()
    });
    let producer: ThreadedProducer<DefaultProducerContext> = client(bootstrap, security)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut lines = Vec::new();
    for i in 0..events {
        let mut line = Vec::new();
        let kind = generator.next_line(&mut line);
        let key = (i % 97).to_string();
        let topic = topics[i % topics.len()].0;
        // A full queue drains; any other error, or a queue that stays full, fails the test.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match producer.send(BaseRecord::to(topic).payload(&line).key(&key)) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err((err, _)) => panic!("producing test record {i} to {topic}: {err}"),
            }
        }
        lines.push((line, kind));
    }
    producer.flush(Duration::from_secs(30)).expect("flush");

    // Wait until every record is in the quality table, then until the group's committed
    // offsets reach the end of every partition.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let counted = records_counted(&lake_dir);
        if counted as usize >= events {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {counted} of {events} records reached the lake"
        );
        assert!(
            !pipeline.is_finished(),
            "the pipeline stopped early: {:?}",
            pipeline.join()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The end of each partition, read by a plain consumer from the beginning. (tansu 0.6's
    // ListOffsets answer lags behind what it serves, so the high watermark is not used.)
    let end_offsets = end_offsets(bootstrap, security, topics, events);
    let consumer: BaseConsumer = client(bootstrap, security)
        .set("group.id", &group)
        .create()
        .expect("consumer");
    let mut ends = TopicPartitionList::new();
    for (topic, partitions) in topics {
        for p in 0..*partitions {
            ends.add_partition(topic, p);
        }
    }
    let mut committed = BTreeMap::new();
    while Instant::now() < deadline {
        committed = consumer
            .committed_offsets(ends.clone(), Duration::from_secs(10))
            .expect("committed offsets")
            .elements()
            .iter()
            .map(|e| {
                (
                    (e.topic().to_string(), e.partition()),
                    if let Offset::Offset(o) = e.offset() {
                        o
                    } else {
                        0
                    },
                )
            })
            .collect();
        if committed == end_offsets {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        committed, end_offsets,
        "offsets are committed up to the end once every window is durable"
    );
    stop.store(true, Ordering::Relaxed);
    let summary = pipeline.join().expect("pipeline thread").expect("pipeline");
    assert_eq!(summary.read, events as u64);

    // Accepted events: exact. Rejected ones: exact per event name and kind (their processing
    // window depends on how partitions interleave).
    let classified: Vec<(Vec<u8>, Failure)> = lines
        .iter()
        .map(|(l, k)| {
            (
                l.clone(),
                (*k == LineKind::Bad).then(|| (None, "rejected".to_string())),
            )
        })
        .collect();
    let want = Reference::compute_with(&classified, 1, 5_000, 1_000);
    assert_eq!(want.late, 0);
    for (route, want) in routes(&lake_dir)
        .iter()
        .zip([&want.standard, &want.restricted])
    {
        assert_maps_eq(&event_counts(route), &want.counts, "event_counts");
        let accepted: BTreeMap<_, _> = quality(route)
            .into_iter()
            .filter(|(k, _)| k.2 == "accepted")
            .collect();
        let want_accepted: BTreeMap<_, _> = want
            .quality
            .iter()
            .filter(|(k, _)| k.2 == "accepted")
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        assert_maps_eq(&accepted, &want_accepted, "quality (accepted)");
        let got = latency(route);
        for (key, samples) in &want.latency {
            assert_stats(key, &got[key], samples);
        }
    }
    let rejected: i64 = routes(&lake_dir)
        .iter()
        .flat_map(|r| quality(r))
        .filter(|(k, _)| k.2 != "accepted")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(rejected as u64, want.rejected);
    assert_eq!(summary.rejected, want.rejected);
    let dead = all_dead_letters(&lake_dir);
    assert_eq!(
        dead.len() as u64,
        want.rejected,
        "one dead letter per rejected record"
    );
    if let Some(topic) = sampling_topic {
        check_sampling_topic(bootstrap, security, topic, &lake_dir);
    }
}

/// The sampling topic holds exactly the `sampling_budgets` table's rows: one record per
/// segment and table version, keyed by the segment, with the same rate, volume and reason.
fn check_sampling_topic(
    bootstrap: &str,
    security: &[(&str, &str)],
    topic: &str,
    lake_dir: &std::path::Path,
) {
    use arrow_array::{Float64Array, Int64Array, StringArray};
    use rdkafka::Message;
    type Row = (String, i64, String, String, String);
    let mut want: Vec<Row> = Vec::new();
    for b in read_table(lake_dir, "sampling_budgets") {
        let text = |name: &str| {
            b.column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .unwrap_or_else(|| panic!("column {name}"))
                .clone()
        };
        let float = |name: &str| {
            b.column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<Float64Array>())
                .unwrap_or_else(|| panic!("column {name}"))
                .clone()
        };
        let version = b
            .column_by_name("version")
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .expect("version")
            .clone();
        let (segment, reason, rate, volume) = (
            text("segment"),
            text("reason"),
            float("rate"),
            float("volume"),
        );
        for i in 0..b.num_rows() {
            want.push((
                segment.value(i).to_owned(),
                version.value(i),
                reason.value(i).to_owned(),
                rate.value(i).to_string(),
                volume.value(i).to_string(),
            ));
        }
    }
    assert!(
        want.iter().any(|r| r.2 == "budget" || r.2 == "cap"),
        "the sampling_budgets table has solved rows: {want:?}"
    );
    let consumer: BaseConsumer = client(bootstrap, security)
        .set("group.id", "sightline-test-sampling-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("assignment");
    consumer.assign(&tpl).expect("assign");
    let mut got: Vec<Row> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < want.len() && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let v: serde_json::Value =
                serde_json::from_slice(m.payload().unwrap_or_default()).expect("a JSON record");
            assert_eq!(
                v["segment"].as_str(),
                Some(key.as_str()),
                "keyed by segment"
            );
            assert!(v["fields"].is_object(), "{v}");
            got.push((
                key,
                v["version"].as_i64().expect("version"),
                v["reason"].as_str().expect("reason").to_owned(),
                v["rate"].as_f64().expect("rate").to_string(),
                v["volume"].as_f64().expect("volume").to_string(),
            ));
        }
    }
    want.sort();
    got.sort();
    assert_eq!(
        got, want,
        "the sampling topic against the sampling_budgets table"
    );
}
