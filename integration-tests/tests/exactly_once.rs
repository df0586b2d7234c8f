//! Exactly-once in effect, against a real tansu broker and the real `sightline` binary: a
//! crash at any moment (SIGKILL), a stop (SIGTERM), a paused broker, and a burst change no
//! output. Each test compares the lake with an uninterrupted run's, file by file and row by
//! row, and checks that the dead-letter topic never holds two different values for one key.
//! Seeds are printed; `SIGHTLINE_CHAOS_SEED=<seed>` repeats a run.

use std::time::{Duration, Instant};

use sightline_integration_tests::chaos::{
    Deployment, Rng, Workload, by_version, difference, read_topic, seed, snapshot, topic_conflicts,
};
use sightline_integration_tests::servers::Tansu;

/// Produces `workload`, runs `name` uninterrupted to the end, stops it with SIGTERM (which must
/// exit 0), and returns the deployment.
fn reference(
    broker: &Tansu,
    dir: &std::path::Path,
    workload: &Workload,
    workers: usize,
) -> Deployment {
    let deployment = Deployment::new(dir, "reference", &broker.bootstrap, workload, workers, "");
    for topic in &deployment.output_topics {
        broker.create_topic(topic, 1);
    }
    let mut process = deployment.start();
    deployment.wait_for_records(&mut process, workload.events, Duration::from_secs(180));
    let (status, took) = process.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "SIGTERM must exit 0, got {status}:\n{}",
        deployment.log_tail()
    );
    println!(
        "reference run: {:?} to the end, stopped in {took:?}",
        deployment.log
    );
    deployment
}

/// Checks the output-topic contract on every output topic of `chaos`, and that it holds every
/// key the reference's topic holds.
fn check_output_topics(broker: &Tansu, reference: &Deployment, chaos: &Deployment) {
    for (expected, actual) in reference.output_topics.iter().zip(&chaos.output_topics) {
        let (mut want, mut got) = (
            read_topic(&broker.bootstrap, expected, 1),
            read_topic(&broker.bootstrap, actual, 1),
        );
        if actual.ends_with(".sampling") {
            (want, got) = (by_version(want), by_version(got));
        }
        let conflicts = topic_conflicts(&got);
        assert!(
            conflicts.is_empty(),
            "{actual}: keys with two different values: {conflicts:?}"
        );
        assert!(
            !want.is_empty(),
            "{expected} is empty: the workload makes dead letters, fires alerts, has critical feedback and experiments"
        );
        let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        assert!(missing.is_empty(), "{actual} lacks keys: {missing:?}");
        for (key, values) in &want {
            assert_eq!(
                &got[key][0], &values[0],
                "{actual}: key {key} differs from the reference"
            );
        }
        let repeats: usize = got.values().map(|v| v.len() - 1).sum();
        println!("{actual}: {} keys, {repeats} identical repeats", got.len());
        let kafka = sightline::config::KafkaConfig {
            bootstrap_servers: broker.bootstrap.clone(),
            ..Default::default()
        };
        let scan = sightline::pii_scan::scan_topic(&kafka, actual).expect("pii-scan");
        assert!(scan.findings.is_empty(), "{actual}: {:?}", scan.findings);
    }
}

#[test]
fn kill_9_at_twenty_random_moments_changes_no_output() {
    let seed = seed("chaos");
    let mut rng = Rng::new(seed);
    let broker = Tansu::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let workload = Workload::new(&format!("chaos-{seed}"), 4, 40_000, seed);
    broker.create_topic(&workload.topic, workload.partitions);
    workload.produce(&broker.bootstrap);
    workload.check_resume(&broker.bootstrap, &mut rng, 3);
    let started = Instant::now();
    let reference = reference(&broker, dir.path(), &workload, 2);
    let uninterrupted = started.elapsed();

    let chaos = Deployment::new(dir.path(), "chaos", &broker.bootstrap, &workload, 2, "");
    for topic in &chaos.output_topics {
        broker.create_topic(topic, 1);
    }
    // Kills at random moments of a run as long as the uninterrupted one, so that they fall
    // in start-up, reading, lake writes and commits alike; two of the twenty stops are
    // SIGTERMs, which must exit 0 within the grace period.
    let longest = uninterrupted.as_millis() as u64;
    for round in 0..20 {
        let process = chaos.start();
        let at = Duration::from_millis(rng.between(300, longest.max(600)));
        std::thread::sleep(at);
        if round == 7 || round == 14 {
            let (status, took) = process.terminate(Duration::from_secs(30));
            assert!(
                status.success(),
                "SIGTERM in round {round} exited with {status}:\n{}",
                chaos.log_tail()
            );
            println!("round {round}: SIGTERM after {at:?}, exited 0 in {took:?}");
        } else {
            process.kill9();
            println!("round {round}: SIGKILL after {at:?}");
        }
    }
    let mut last = chaos.start();
    chaos.wait_for_records(&mut last, workload.events, Duration::from_secs(180));
    let (status, _) = last.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit {status}:\n{}", chaos.log_tail());

    let (want, got) = (snapshot(&reference.lake), snapshot(&chaos.lake));
    assert!(want.len() > 20, "the reference wrote {} files", want.len());
    let funnel_files = want.keys().filter(|k| k.contains("funnels/")).count();
    assert!(
        funnel_files > 10,
        "the reference wrote {funnel_files} funnel files"
    );
    if let Some(diff) = difference(&want, &got) {
        panic!(
            "after 20 restarts the lake differs from the uninterrupted run's (seed {seed}): {diff}\n{}",
            chaos.log_tail()
        );
    }
    check_output_topics(&broker, &reference, &chaos);
    let log = std::fs::read_to_string(&chaos.log).unwrap_or_default();
    assert!(
        log.contains("written_up_to"),
        "the restarts resumed from checkpoints"
    );
    assert!(
        log.contains("funnel state restored"),
        "the restarts restored the funnels' state"
    );
    assert!(
        log.contains("experiment state restored"),
        "the restarts restored the experiments' state"
    );
    let experiment_files = want
        .keys()
        .filter(|k| k.contains("experiment_results/"))
        .count();
    assert!(
        experiment_files > 10,
        "the reference wrote {experiment_files} experiment_results files"
    );
    let sampling_files = want
        .keys()
        .filter(|k| k.contains("sampling_budgets/"))
        .count();
    assert!(
        sampling_files > 3,
        "the reference wrote {sampling_files} sampling_budgets files"
    );
}

/// The broker stops answering for 30 s in the middle of a run (SIGSTOP, then SIGCONT: tansu's
/// in-memory storage would lose its topics if the process died). The pipeline waits, never
/// exits, and the lake ends as an uninterrupted run's.
#[test]
fn a_broker_unreachable_for_thirty_seconds_loses_and_duplicates_nothing() {
    let seed = seed("broker outage");
    let broker = Tansu::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let workload = Workload::new("outage", 3, 20_000, seed);
    broker.create_topic(&workload.topic, workload.partitions);
    workload.produce(&broker.bootstrap);
    let reference = reference(&broker, dir.path(), &workload, 1);

    let faulty = Deployment::new(dir.path(), "outage", &broker.bootstrap, &workload, 1, "");
    for topic in &faulty.output_topics {
        broker.create_topic(topic, 1);
    }
    let mut process = faulty.start();
    std::thread::sleep(Duration::from_millis(1500));
    broker.pause();
    std::thread::sleep(Duration::from_secs(30));
    assert!(
        process.exited().is_none(),
        "the pipeline exited while the broker was away:\n{}",
        faulty.log_tail()
    );
    broker.resume();
    faulty.wait_for_records(&mut process, workload.events, Duration::from_secs(180));
    let (status, _) = process.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit {status}:\n{}", faulty.log_tail());
    if let Some(diff) = difference(&snapshot(&reference.lake), &snapshot(&faulty.lake)) {
        panic!("after the outage the lake differs: {diff}");
    }
    check_output_topics(&broker, &reference, &faulty);
}

/// Ten times the normal rate for a while: memory stays bounded (the consumer's prefetch is
/// bounded, so the burst waits in the broker) and the pipeline catches up. The peak is printed;
/// `benches/REPORT.md` keeps the measured figure.
#[test]
fn a_burst_of_ten_times_the_rate_keeps_memory_bounded_and_catches_up() {
    let seed = seed("burst");
    let broker = Tansu::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let normal = 1_000.0;
    let mut calm = Workload::new(&format!("burst-{seed}"), 4, 4_000, seed);
    calm.start_ms = sightline_integration_tests::chaos::now_ms();
    calm.events_per_second = normal;
    calm.late_fraction = 0.0;
    broker.create_topic(&calm.topic, calm.partitions);
    let deployment = Deployment::new(dir.path(), "burst", &broker.bootstrap, &calm, 1, "");
    for topic in &deployment.output_topics {
        broker.create_topic(topic, 1);
    }
    let mut process = deployment.start();
    // Normal rate, then ten times the rate (event time keeps pace with the wall clock), then
    // the normal rate again.
    let mut produced = 0;
    let mut peak_kib = 0;
    for (events, rate) in [(4_000, normal), (60_000, normal * 10.0), (4_000, normal)] {
        let mut phase = calm.clone();
        phase.events = events;
        phase.seed = seed + produced as u64;
        phase.start_ms = sightline_integration_tests::chaos::now_ms();
        phase.events_per_second = rate;
        let started = Instant::now();
        phase.produce_paced(&broker.bootstrap, Some(rate));
        println!(
            "burst: {events} records at {:.0}/s (asked {rate}/s)",
            events as f64 / started.elapsed().as_secs_f64()
        );
        produced += events;
        peak_kib = peak_kib.max(process.peak_rss_kib().unwrap_or(0));
    }
    deployment.wait_for_records(&mut process, produced, Duration::from_secs(240));
    peak_kib = peak_kib.max(process.peak_rss_kib().unwrap_or(0));
    let (status, _) = process.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit {status}:\n{}",
        deployment.log_tail()
    );
    println!(
        "burst: {produced} records, peak RSS {} MiB",
        peak_kib / 1024
    );
    assert!(peak_kib > 0, "the peak RSS was read");
    assert!(
        peak_kib < 1024 * 1024,
        "peak RSS {} MiB is over the 1 GiB bound",
        peak_kib / 1024
    );
}

/// What the source relies on from the broker: committed offsets round-trip, per group. (The
/// commit's metadata does not: tansu 0.6 accepts it and returns it empty, which is why the
/// source's checkpoints are objects in the lake; see `ingest/src/source/checkpoint.rs`.)
#[test]
fn the_broker_keeps_committed_offsets_per_group() {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let broker = Tansu::shared();
    broker.create_topic("offsets-roundtrip", 2);
    let consumer = |group: &str| -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &broker.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer")
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("offsets-roundtrip", 1, Offset::Offset(7))
        .expect("tpl");
    tpl.find_partition("offsets-roundtrip", 1)
        .expect("element")
        .set_metadata("checkpoint");
    consumer("offsets-a")
        .commit(&tpl, CommitMode::Sync)
        .expect("commit");
    let mut ask = TopicPartitionList::new();
    ask.add_partition("offsets-roundtrip", 0);
    ask.add_partition("offsets-roundtrip", 1);
    let read = |group: &str| {
        consumer(group)
            .committed_offsets(ask.clone(), Duration::from_secs(10))
            .expect("committed")
            .elements()
            .iter()
            .map(|e| {
                println!(
                    "{group}: {}[{}] metadata {:?}",
                    e.topic(),
                    e.partition(),
                    e.metadata()
                );
                (e.partition(), e.offset())
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        read("offsets-a"),
        vec![(0, Offset::Invalid), (1, Offset::Offset(7))]
    );
    assert_eq!(
        read("offsets-b"),
        vec![(0, Offset::Invalid), (1, Offset::Invalid)],
        "another group has no commits"
    );
}

/// A record judged late only because its partition had gone idle (its clock had moved to the
/// wall clock) is judged late again after a SIGKILL and a restart: the idle move is written to
/// the partition's checkpoint before the record is decided.
#[test]
fn a_decision_that_depends_on_idleness_survives_a_kill() {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use sightline::generator::{Generator, GeneratorConfig};
    use sightline_integration_tests::chaos::now_ms;

    let seed = seed("idle decisions");
    let broker = Tansu::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let workload = Workload::new(&format!("idle-marks-{seed}"), 1, 0, seed);
    broker.create_topic(&workload.topic, 1);
    let deployment = Deployment::new(
        dir.path(),
        "idle-marks",
        &broker.bootstrap,
        &workload,
        1,
        "",
    );
    for topic in &deployment.output_topics {
        broker.create_topic(topic, 1);
    }
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()
        .expect("producer");
    let mut generator = Generator::new(GeneratorConfig {
        seed,
        bad_fraction: 0.0,
        late_fraction: 0.0,
        ..GeneratorConfig::default()
    });
    let send = |event_ms: i64, generator: &mut Generator| {
        let mut line = Vec::new();
        generator.event(event_ms, &mut line);
        producer
            .send(
                BaseRecord::<(), [u8]>::to(&workload.topic)
                    .partition(0)
                    .payload(&line),
            )
            .expect("send");
        producer.flush(Duration::from_secs(10)).expect("flush");
    };

    let process = deployment.start();
    let t0 = now_ms();
    for i in 0..20 {
        send(t0 + i, &mut generator);
    }
    // The partition is read to its end and goes idle (1 s): its clock follows the wall clock.
    std::thread::sleep(Duration::from_secs(4));
    // 2.5 s behind the wall clock: on time against the partition's events (lateness 1 s from
    // t0 + 19 ms), late against its idle time.
    let late_ms = now_ms() - 2_500;
    assert!(late_ms > t0 + 19 - 1_000);
    send(late_ms, &mut generator);
    let key = format!("{}/0/20", workload.topic);
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let records = read_topic(&broker.bootstrap, &deployment.output_topics[0], 1);
        if let Some(values) = records.get(&key) {
            break values[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "record 20 never became a dead letter"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(first.contains("\"late\""), "{first}");
    // Killed before the dead letter's window is written, so the restart reads record 20 again.
    process.kill9();

    let mut process = deployment.start();
    deployment.wait_for_records(&mut process, 21, Duration::from_secs(60));
    let (status, _) = process.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit {status}:\n{}",
        deployment.log_tail()
    );
    let records = read_topic(&broker.bootstrap, &deployment.output_topics[0], 1);
    assert!(
        topic_conflicts(&records).is_empty(),
        "{:?}",
        topic_conflicts(&records)
    );
    let lake = snapshot(&deployment.lake);
    let dead: Vec<&String> = lake
        .iter()
        .filter(|(path, _)| {
            path.starts_with("dead_letter/") || path.starts_with("restricted/dead_letter/")
        })
        .flat_map(|(_, rows)| rows)
        .filter(|row| row.contains("offset=20 "))
        .collect();
    assert_eq!(dead.len(), 1, "record 20 is one late dead letter: {dead:?}");
    assert!(dead[0].contains("kind=\"late\""), "{}", dead[0]);
}
