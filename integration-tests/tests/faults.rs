//! Faults survived with nothing lost and nothing duplicated, in-process against the suite's
//! tansu broker: a backlog read unevenly (catch-up is not idleness), an object store that fails
//! a fifth of its requests, a full disk under a local lake, and a store that refuses the
//! credentials (which stops the pipeline with a clear error; the restart then resumes
//! exactly-once). Each compares the lake with a clean run's, file by file and row by row.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::kafka::{kafka_config, start_with_lake};
use sightline::config::{Config, TopicConfig};
use sightline::run::{Input, Job, LakeCheckpoints, run};
use sightline_ingest::source::kafka::KafkaReader;
use sightline_ingest::source::{Clock, Emit, PartitionState, ReadStatus, RecordReader};
use sightline_integration_tests::chaos::{
    Rng, Workload, difference, now_ms, records_counted, seed, snapshot, wait_for_lake,
};
use sightline_integration_tests::faults::FaultyStore;
use sightline_integration_tests::servers::Tansu;
use sightline_sinks::Lake;

/// A configuration reading `workload`'s topic: 2 s windows, 2 s lateness, commits at every
/// chance, fast retries.
fn config(bootstrap: &str, group: &str, workload: &Workload, idle_timeout_ms: u64) -> Config {
    let mut config = kafka_config(bootstrap, group, 1);
    config.pipeline.window_ms = 2_000;
    config.pipeline.allowed_lateness_ms = 2_000;
    config.pipeline.idle_timeout_ms = idle_timeout_ms;
    config.kafka.topics = vec![TopicConfig::envelope(&workload.topic)];
    config.delivery.retry_max_ms = 500;
    config
}

/// Runs `job` on a thread until its lake counts `records` records, then stops it and returns
/// its summary. Panics if the run ends early or stalls for 45 s.
fn run_until(job: Job, lake_dir: &Path, records: usize) -> sightline::run::Summary {
    let stop = Arc::clone(&job.stop);
    let handle = std::thread::spawn(move || run(job));
    let waited = wait_for_lake(lake_dir, records, Duration::from_secs(300), || {
        if handle.is_finished() {
            Err("the run ended".into())
        } else {
            Ok(())
        }
    });
    if let Err(why) = waited {
        // Say how the run ended, if it did.
        let ended = if handle.is_finished() {
            match handle.join() {
                Ok(Ok(summary)) => format!(": {summary}"),
                Ok(Err(e)) => format!(": {e:#}"),
                Err(_) => ": it panicked".to_owned(),
            }
        } else {
            String::new()
        };
        panic!("{why}{ended}");
    }
    stop.store(true, Ordering::Relaxed);
    handle.join().expect("run thread").expect("run")
}

/// A workload of `events` records on two partitions of a topic named after `name`, produced,
/// with a clean reference run of it: the workload and the reference's lake.
fn produced_with_reference(
    broker: &Tansu,
    dir: &Path,
    name: &str,
    events: usize,
    seed: u64,
) -> (Workload, std::path::PathBuf) {
    let workload = Workload::new(&format!("{name}-{seed}"), 2, events, seed);
    broker.create_topic(&workload.topic, workload.partitions);
    workload.produce(&broker.bootstrap);
    let expected = reference(&broker.bootstrap, dir, &workload);
    (workload, expected)
}

fn job(config: &Config, input: Input, lake: Lake) -> Job {
    Job {
        config: config.clone(),
        input,
        lake,
        stop: Default::default(),
        print_windows: false,
        format: Default::default(),
    }
}

fn local_lake(dir: &Path) -> Lake {
    Lake::open(dir.to_str().expect("utf-8")).expect("lake")
}

/// A clean reference run of `workload` into `<dir>/reference`.
fn reference(bootstrap: &str, dir: &Path, workload: &Workload) -> std::path::PathBuf {
    let lake_dir = dir.join("reference");
    let config = config(
        bootstrap,
        &format!("reference-{}", workload.topic),
        workload,
        1_000,
    );
    run_until(
        job(
            &config,
            Input::Kafka(config.kafka.clone()),
            local_lake(&lake_dir),
        ),
        &lake_dir,
        workload.events,
    );
    lake_dir
}

fn assert_same_lake(expected: &Path, actual: &Path, what: &str) {
    let (want, got) = (snapshot(expected), snapshot(actual));
    assert!(want.len() > 5, "the reference wrote {} files", want.len());
    if let Some(diff) = difference(&want, &got) {
        panic!("{what}: the lake differs from the clean run's: {diff}");
    }
}

/// A Kafka reader whose consumer serves some partitions late: each slot is paused until its
/// time has come.
struct Uneven {
    inner: KafkaReader,
    started: Instant,
    paused_for: Vec<Duration>,
    paused: Vec<bool>,
}

impl Uneven {
    fn new(inner: KafkaReader, paused_for: Vec<Duration>) -> Uneven {
        for (slot, wait) in paused_for.iter().enumerate() {
            if !wait.is_zero() {
                inner.pause(slot, true).expect("pause");
            }
        }
        let paused = paused_for.iter().map(|w| !w.is_zero()).collect();
        Uneven {
            inner,
            started: Instant::now(),
            paused_for,
            paused,
        }
    }
}

impl RecordReader for Uneven {
    fn partitions(&self) -> &[PartitionState] {
        self.inner.partitions()
    }

    fn partitions_mut(&mut self) -> &mut [PartitionState] {
        self.inner.partitions_mut()
    }

    fn read(&mut self, max: usize, emit: &mut Emit<'_>) -> sightline_ingest::Result<ReadStatus> {
        for slot in 0..self.paused.len() {
            if self.paused[slot] && self.started.elapsed() >= self.paused_for[slot] {
                self.inner.pause(slot, false)?;
                self.paused[slot] = false;
            }
        }
        self.inner.read(max, emit)
    }

    fn is_bounded(&self) -> bool {
        false
    }

    fn durable_up_to(&mut self, durable_ms: u64) {
        self.inner.durable_up_to(durable_ms)
    }

    fn track(&mut self, slot: usize, offset: i64, window_start: Option<u64>, before: Clock) {
        self.inner.track(slot, offset, window_start, before)
    }

    fn caught_up(&mut self, slot: usize) -> bool {
        self.inner.caught_up(slot)
    }

    fn written_up_to(&self) -> u64 {
        self.inner.written_up_to()
    }
}

/// Reading a backlog gives the lake of a live run, whatever the timing: one worker, a 100 ms
/// idle timeout, and a consumer that leaves two of four partitions unserved for seconds (the
/// busiest one longest), for three seeds. Before partitions were known to be caught up only by
/// their end-of-partition report, such a partition was taken for idle and its backlog counted
/// late.
#[test]
fn a_backlog_read_unevenly_gives_the_lake_of_a_live_run() {
    let broker = Tansu::shared();
    let first = seed("catch-up");
    for round in 0..3u64 {
        let seed = first + round;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut workload = Workload::new(&format!("catchup-{seed}"), 4, 6_000, seed);
        workload.weights = vec![3, 1, 1, 1];
        workload.start_ms = now_ms();
        workload.events_per_second = 2_000.0;
        broker.create_topic(&workload.topic, workload.partitions);

        // Live: the pipeline runs while the events are produced at the pace of their times.
        let live_dir = dir.path().join("live");
        // A live run whose partitions never go idle while the events flow (a 5 s idle
        // timeout): what the backlog run, with a 100 ms timeout, must reproduce.
        let live = config(&broker.bootstrap, &format!("live-{seed}"), &workload, 5_000);
        let (stop, handle) = start_with_lake(&live, local_lake(&live_dir));
        workload.produce_paced(&broker.bootstrap, Some(workload.events_per_second));
        let deadline = Instant::now() + Duration::from_secs(90);
        while records_counted(&snapshot(&live_dir)) < workload.events as i64 {
            assert!(Instant::now() < deadline, "the live run did not finish");
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        handle.join().expect("thread").expect("live run");

        // Backlog: everything is there; partitions 0 and 1 are served seconds late.
        let backlog_dir = dir.path().join("backlog");
        let backlog = config(
            &broker.bootstrap,
            &format!("backlog-{seed}"),
            &workload,
            100,
        );
        let lake = local_lake(&backlog_dir);
        let (source, windows, store) = (
            backlog.kafka.source(),
            sightline_operators::Windows::new(backlog.pipeline.window_ms),
            Arc::new(LakeCheckpoints(lake.clone())),
        );
        let mut rng = Rng::new(seed);
        let pauses = vec![
            Duration::from_millis(rng.between(1_500, 3_000)),
            Duration::from_millis(rng.between(300, 1_500)),
            Duration::ZERO,
            Duration::ZERO,
        ];
        println!("round {round}: seed {seed}, partitions 0 and 1 unserved for {pauses:?}");
        let factory: sightline::run::ReaderFactory = Arc::new(move |worker, peers| {
            let reader =
                KafkaReader::connect(&source, worker, peers, windows, 1 << 20, store.clone())?;
            Ok(Box::new(Uneven::new(reader, pauses.clone())) as Box<dyn RecordReader>)
        });
        let summary = run_until(
            job(&backlog, Input::Custom(factory), lake),
            &backlog_dir,
            workload.events,
        );
        println!("round {round}: backlog run {summary}");
        assert_same_lake(&live_dir, &backlog_dir, &format!("seed {seed}"));
    }
}

/// The object store fails a fifth of its requests, half of them after hanging for a second,
/// while the pipeline writes every window and its checkpoints: every failure is retried, the
/// retries are counted, and the lake is the clean run's.
#[test]
fn an_object_store_failing_a_fifth_of_its_requests_loses_and_duplicates_nothing() {
    let seed = seed("store faults");
    let broker = Tansu::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let (workload, expected) =
        produced_with_reference(&broker, dir.path(), "store-faults", 8_000, seed);

    let faulty_dir = dir.path().join("faulty");
    std::fs::create_dir_all(&faulty_dir).expect("dir");
    let local = object_store::local::LocalFileSystem::new_with_prefix(&faulty_dir).expect("fs");
    let store = FaultyStore::new(Arc::new(local), 0.2, Duration::from_secs(1), seed);
    let injected = Arc::clone(&store.injected);
    let lake = Lake::from_store(Arc::new(store), "faulty").expect("lake");
    let config = config(
        &broker.bootstrap,
        &format!("faulty-{seed}"),
        &workload,
        1_000,
    );
    let summary = run_until(
        job(&config, Input::Kafka(config.kafka.clone()), lake),
        &faulty_dir,
        workload.events,
    );
    let (errors, timeouts) = (
        injected.errors.load(Ordering::Relaxed),
        injected.timeouts.load(Ordering::Relaxed),
    );
    println!("store faults: {errors} errors and {timeouts} timeouts injected; {summary}");
    assert!(errors > 0 && timeouts > 0, "faults were injected");
    assert!(summary.retries > 0, "the retries are counted: {summary}");
    assert_same_lake(&expected, &faulty_dir, "a store failing 20% of requests");
}

/// The disk under a local lake fills up: writes fail (ENOSPC) and are retried, nothing is
/// lost; once space is freed the pipeline finishes and the lake is the clean run's. The disk
/// is a small tmpfs (the test mounts it, and needs root, as CI has).
#[test]
fn a_full_disk_under_a_local_lake_loses_and_duplicates_nothing() {
    let seed = seed("full disk");
    let broker = Tansu::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let (workload, expected) =
        produced_with_reference(&broker, dir.path(), "full-disk", 8_000, seed);

    let disk = dir.path().join("disk");
    std::fs::create_dir_all(&disk).expect("dir");
    let mount = |options: &str| {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&disk)
            .status()
            .expect("mount(8)");
        assert!(
            status.success(),
            "mount -o {options} failed (the test needs root)"
        );
    };
    mount("size=160k");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&disk);
    let lake_dir = disk.join("lake");
    let config = config(
        &broker.bootstrap,
        &format!("full-disk-{seed}"),
        &workload,
        1_000,
    );
    let running = job(
        &config,
        Input::Kafka(config.kafka.clone()),
        local_lake(&lake_dir),
    );
    let stop = Arc::clone(&running.stop);
    let handle = std::thread::spawn(move || run(running));
    // Wait until the disk is full and the pipeline is stuck on it, then free space.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (-1, Instant::now());
    loop {
        let counted = records_counted(&snapshot(&lake_dir));
        assert!(
            counted < workload.events as i64,
            "the whole input fit on the small disk: make it smaller"
        );
        if counted != last.0 {
            last = (counted, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        assert!(Instant::now() < deadline, "the disk never filled up");
        assert!(
            !handle.is_finished(),
            "the run ended on a full disk: {:?}",
            handle.join()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("disk full at {} records; freeing space", last.0);
    mount("remount,size=64m");
    let deadline = Instant::now() + Duration::from_secs(60);
    while records_counted(&snapshot(&lake_dir)) < workload.events as i64 {
        assert!(Instant::now() < deadline, "the pipeline did not recover");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let summary = handle.join().expect("thread").expect("run");
    println!("full disk: {summary}");
    assert!(summary.retries > 0, "the retries are counted: {summary}");
    assert_same_lake(&expected, &lake_dir, "a full disk");
}

/// A store that refuses the credentials cannot heal: the pipeline stops with that error after
/// `delivery.give-up-after-ms`, not before and not never; restarted with a working store, it
/// resumes exactly-once.
#[test]
fn a_fault_that_cannot_heal_stops_the_pipeline_with_a_clear_error_and_the_restart_resumes() {
    let seed = seed("bad credentials");
    let broker = Tansu::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let (workload, expected) =
        produced_with_reference(&broker, dir.path(), "bad-credentials", 6_000, seed);

    let lake_dir = dir.path().join("lake");
    let mut config = config(
        &broker.bootstrap,
        &format!("refused-{seed}"),
        &workload,
        1_000,
    );
    config.delivery.give_up_after_ms = 2_000;
    std::fs::create_dir_all(&lake_dir).expect("dir");
    let local = object_store::local::LocalFileSystem::new_with_prefix(&lake_dir).expect("fs");
    let mut store = FaultyStore::new(Arc::new(local), 1.0, Duration::ZERO, seed);
    store.permanent = true;
    // The credentials are revoked a second into the run.
    store.on.store(false, Ordering::Relaxed);
    let revoke = Arc::clone(&store.on);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        revoke.store(true, Ordering::Relaxed);
    });
    let refused = Lake::from_store(Arc::new(store), "refused").expect("lake");
    let started = Instant::now();
    let err = run(job(&config, Input::Kafka(config.kafka.clone()), refused))
        .expect_err("a store that refuses the credentials stops the pipeline");
    let took = started.elapsed();
    let message = format!("{err:#}");
    println!("stopped after {took:?}: {message}");
    assert!(
        message.contains("failed permanently") && message.contains("not valid"),
        "{message}"
    );
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(60),
        "{took:?}"
    );

    let summary = run_until(
        job(
            &config,
            Input::Kafka(config.kafka.clone()),
            local_lake(&lake_dir),
        ),
        &lake_dir,
        workload.events,
    );
    println!("restarted: {summary}");
    assert_same_lake(
        &expected,
        &lake_dir,
        "a restart after a fault that cannot heal",
    );
}
