//! The pipeline against librdkafka's in-process mock cluster (the demo's embedded broker).

mod common;

use rdkafka::mocking::MockCluster;

#[test]
fn mock_cluster_round_trip_on_two_workers() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("mock.events", 3, 1).expect("topic");
    cluster.create_topic("mock.sampling", 1, 1).expect("topic");
    common::kafka::round_trip(
        &cluster.bootstrap_servers(),
        &[("mock.events", 3)],
        2_000,
        2,
        Some("mock.sampling"),
    );
}

/// A flat topic fed every example payload of the command-center spec plus a broken one, and an
/// envelope topic fed dirty events (personal data where it must not be): every example is
/// accepted, every bad record is one self-describing record on the dead-letter topic, and
/// neither the lake nor the dead-letter topic holds an e-mail address, IP address or token.
#[test]
fn flat_topic_dead_letter_topic_and_nothing_private_stored() {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use sightline::config::{TopicConfig, TopicFormat};
    use sightline::generator::{Generator, GeneratorConfig, LineKind};
    use sightline::pii_scan::{scan_lake, scan_topic};

    let cluster = MockCluster::new(1).expect("mock cluster");
    for (topic, partitions) in [("casey.flat", 1), ("mock.dirty", 2), ("mock.dlq", 1)] {
        cluster.create_topic(topic, partitions, 1).expect("topic");
    }
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");
    let lake_dir = dir.path().join("lake");

    let mut config = common::kafka::kafka_config(&bootstrap, "flat-dlq", 2);
    config.kafka.dead_letter_topic = Some("mock.dlq".into());
    let mut flat = TopicConfig::envelope("casey.flat");
    flat.format = TopicFormat::Flat;
    config.kafka.topics = vec![flat, TopicConfig::envelope("mock.dirty")];
    let (stop, pipeline) = common::kafka::start(&config, &lake_dir);

    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("producer");
    let send = |topic: &str, payload: &[u8]| {
        producer
            .send(BaseRecord::<(), [u8]>::to(topic).payload(payload))
            .expect("send");
        producer.poll(Duration::ZERO);
    };
    let now = common::kafka::now_ms();
    let examples = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schemas/fixtures/command_center_examples.ndjson"
    ))
    .expect("fixtures");
    let mut flat_lines = 0;
    for (i, line) in examples.lines().enumerate() {
        let mut record: serde_json::Value = serde_json::from_str(line).expect("example");
        record["timestamp"] = sightline_schemas::format_rfc3339_ms(now + i as i64).into();
        send("casey.flat", record.to_string().as_bytes());
        flat_lines += 1;
    }
    let broken = format!(
        r#"{{"event":"integration_call_failed","integration":"salesforce","endpoint":"/x","method":"GET","status_code":500,"error_message":"token sk_live_4eC39HqLyjWDarjtT1zdp7dc","retryable":true,"timestamp":"{}"}}"#,
        sightline_schemas::format_rfc3339_ms(now)
    );
    send("casey.flat", broken.as_bytes());

    let mut generator = Generator::new(GeneratorConfig {
        seed: 5,
        start_ms: now,
        late_fraction: 0.0,
        bad_fraction: 0.0,
        dirty_fraction: 0.5,
        jitter_ms: 200,
        ..GeneratorConfig::default()
    });
    let (mut accepted, mut rejected) = (flat_lines as u64, 1u64);
    for _ in 0..400 {
        let mut line = Vec::new();
        match generator.next_line(&mut line) {
            LineKind::Bad => rejected += 1,
            _ => accepted += 1,
        }
        send("mock.dirty", &line);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    let total = accepted + rejected;

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut dlq = scan_topic(&config.kafka, "mock.dlq").expect("scan");
    while (common::records_counted(&lake_dir) as u64) < total || dlq.values < rejected {
        assert!(
            Instant::now() < deadline,
            "{} of {total} records counted, {} of {rejected} dead letters on the topic",
            common::records_counted(&lake_dir),
            dlq.values
        );
        assert!(
            !pipeline.is_finished(),
            "the pipeline stopped early: {:?}",
            pipeline.join()
        );
        std::thread::sleep(Duration::from_millis(250));
        dlq = scan_topic(&config.kafka, "mock.dlq").expect("scan");
    }
    stop.store(true, Ordering::Relaxed);
    let summary = pipeline.join().expect("pipeline thread").expect("pipeline");
    assert_eq!(
        (summary.accepted, summary.rejected, summary.late),
        (accepted, rejected, 0),
        "every example accepted, every bad record rejected"
    );

    assert_eq!(dlq.values, rejected, "one dead-letter record per bad event");
    assert!(
        dlq.findings.is_empty(),
        "the dead-letter topic leaks: {dlq}"
    );
    let lake_scan =
        scan_lake(lake_dir.to_str().expect("utf-8"), &Default::default()).expect("scan lake");
    assert!(
        lake_scan.values > 0 && lake_scan.findings.is_empty(),
        "{lake_scan}"
    );

    // The broken flat record's dead letter explains itself.
    let dead: Vec<serde_json::Value> = read_topic(&bootstrap, "mock.dlq");
    let record = dead
        .iter()
        .find(|d| d["origin"]["topic"] == "casey.flat")
        .expect("the flat dead letter");
    assert_eq!(record["kind"], "invalid_value");
    assert_eq!(
        record["violations"][0]["pointer"],
        "/properties/integration"
    );
    assert_eq!(record["violations"][0]["keyword"], "enum");
    assert!(
        record["processor"]
            .as_str()
            .unwrap_or_default()
            .starts_with("sightline ")
    );
    assert!(
        record["payload"]
            .as_str()
            .unwrap_or_default()
            .contains("[token]"),
        "{record}"
    );

    // The dirty events that were accepted show up as PII violations and scrubbed fields.
    let privacy =
        common::routes(&lake_dir)
            .iter()
            .fold(std::collections::BTreeMap::new(), |mut m, r| {
                for (k, v) in common::privacy_counters(r) {
                    *m.entry(k).or_insert(0) += v;
                }
                m
            });
    assert!(
        privacy.get("scrubbed_fields").copied().unwrap_or(0) > 0
            && privacy.get("pii_violations").copied().unwrap_or(0) > 0,
        "{privacy:?}"
    );
}

fn read_topic(bootstrap: &str, topic: &str) -> Vec<serde_json::Value> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "reader")
        .create()
        .expect("consumer");
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, std::time::Duration::from_secs(5))
        .expect("watermarks");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low))
        .expect("partition");
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while (out.len() as i64) < high - low && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(std::time::Duration::from_millis(200)) {
            out.push(
                serde_json::from_slice(m.payload().unwrap_or_default())
                    .expect("dead letters are JSON"),
            );
        }
    }
    out
}
