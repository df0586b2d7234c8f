//! The end-to-end benchmark: the whole dataflow (decode, watermarks, every aggregate, closing
//! windows, Parquet encoding, the lake) over generated events held in memory, beside the
//! parse-only baseline over the same bytes, and memory growth with the number of events.
//!
//! Run `benches/run` (or `cargo bench -p sightline-benches --bench end_to_end -- --report
//! benches/REPORT.md`). Each configuration runs in a child process of its own, so that its peak
//! resident memory (`VmHWM`) is its own. Figures are reported per worker thread and as ratios
//! measured in the same run; compare ratios, not bare times, across machines.
//!
//! - **pipeline**: `sightline::run` with a [`CyclingReader`] on 1 and 2 workers, lake in a
//!   temporary directory (an in-memory lake would count every file written as resident memory).
//! - **parse-only**: the same reader on the same number of threads, each event's envelope read by
//!   `Decoder::parse_only` (the envelope reader with `properties` skipped: no validation, no
//!   privacy) and dropped: the fastest way this code base has to read these bytes into events.
//! - **memory growth**: the pipeline on 1 worker over N, 4N and 16N events with the same key
//!   cardinality, event time advancing so that 16N events span one hour.
//! - **Kafka path** (with `--kafka`; needs tansu, which `scripts/test` installs): the same
//!   events produced to a local tansu broker, read by a bare rdkafka consumer (the broker's
//!   limit) and by the pipeline on 1 worker.
//! - **cost of one event** (when valgrind is installed): instructions and L1 data misses per
//!   event of the pipeline and of parse-only on 1 worker, from cachegrind runs at two sizes.
//!   Deterministic where the timings are not: decisions between close alternatives were made
//!   on these counts (`benches/README.md`).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use sightline::config::TopicConfig;
use sightline_ingest::source::IngestStats;

use sightline::config::Config;
use sightline::run::{Input, Job, run};
use sightline_benches::{Block, CyclingReader, peak_rss_kib};
use sightline_ingest::Decoder;
use sightline_privacy::KeyRing;

const BLOCK: usize = 20_000;
const START_MS: i64 = 1_769_178_600_000;
/// 16N events over one hour of event time.
const BASE_EVENTS: u64 = 625_000;
/// Events through the Kafka path.
const KAFKA_EVENTS: u64 = 200_000;
/// Events of the restart measurement.
const RESTART_EVENTS: u64 = 60_000;
/// Its topic.
const RESTART_TOPIC: &str = "bench.restart";
const EVENTS_PER_SECOND: f64 = (16 * BASE_EVENTS) as f64 / 3600.0;

#[derive(Debug, Clone)]
struct Measurement {
    mode: String,
    workers: usize,
    events: u64,
    seconds: f64,
    rss_kib: u64,
}

/// Runs of each throughput configuration.
const ROUNDS: usize = 5;

/// The median run of a configuration, and the range of events/s per worker over its runs.
struct Median {
    median: Measurement,
    low: f64,
    high: f64,
}

impl Median {
    fn of(mut runs: Vec<Measurement>) -> Median {
        runs.sort_by(|a, b| a.per_worker().total_cmp(&b.per_worker()));
        let (low, high) = (runs[0].per_worker(), runs[runs.len() - 1].per_worker());
        Median {
            median: runs.swap_remove(runs.len() / 2),
            low,
            high,
        }
    }
}

impl Measurement {
    fn per_worker(&self) -> f64 {
        self.events as f64 / self.seconds / self.workers as f64
    }
}

/// Reads the endpoints as an open dashboard page and Prometheus would, only more often, until
/// `done`: `/api/status`, `/api/board` with the page's metric names, and `/metrics`, every
/// second (the page polls every 3 s, Prometheus scrapes every 15 s by default; a benchmark run
/// lasts a few seconds). Returns the bytes read.
fn scrape_like_a_page(addr: std::net::SocketAddr, done: &std::sync::atomic::AtomicBool) -> usize {
    use std::io::{Read, Write};
    // The page's own list of names, so that the benchmark asks for what the page asks for.
    let page = sightline::http::DASHBOARD_PAGE;
    let names: Vec<&str> = page
        .split_once("const NAMES = [")
        .and_then(|(_, rest)| rest.split_once("];"))
        .map(|(list, _)| list.split('"').skip(1).step_by(2).collect())
        .unwrap_or_default();
    let board = format!("/api/board?last=30&names={}", names.join(","));
    let mut bytes = 0;
    while !done.load(Ordering::Relaxed) {
        for path in ["/api/status", board.as_str(), "/metrics"] {
            if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                let mut body = Vec::new();
                if write!(s, "GET {path} HTTP/1.0\r\n\r\n").is_ok()
                    && s.read_to_end(&mut body).is_ok()
                {
                    bytes += body.len();
                }
            }
        }
        // In steps, so that the end of the run is not held up.
        for _ in 0..10 {
            if done.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    bytes
}

fn child(mode: &str, workers: usize, events: u64) -> anyhow::Result<()> {
    let block = Block::generate_or_load(BLOCK, 1)?;
    let started = Instant::now();
    match mode {
        "pipeline" => {
            // `SIGHTLINE_BENCH_CONFIG`: a configuration file over the defaults (the memory
            // runs at a fixed number of active units use `benches/fixed-units.toml`).
            let file = std::env::var_os("SIGHTLINE_BENCH_CONFIG").map(std::path::PathBuf::from);
            let mut config = match &file {
                Some(file) => Config::load(Some(file))?,
                None => Config::default(),
            };
            config.pipeline.workers = workers;
            if let Some(batch) = std::env::var("SIGHTLINE_BENCH_BATCH")
                .ok()
                .and_then(|b| b.parse().ok())
            {
                config.pipeline.batch_size = batch;
            }
            let factory_block = Arc::clone(&block);
            let factory: sightline::run::ReaderFactory = Arc::new(move |worker, peers| {
                Ok(Box::new(CyclingReader::new(
                    Arc::clone(&factory_block),
                    worker,
                    peers,
                    events,
                    START_MS,
                    EVENTS_PER_SECOND,
                ))
                    as Box<dyn sightline_ingest::source::RecordReader>)
            });
            // A lake on local disk: an in-memory lake would hold every file written, so its
            // size (which grows with the event-time span) would count as the pipeline's memory.
            let lake_dir = tempfile::tempdir()?;
            let job = Job {
                config,
                input: Input::Custom(factory),
                lake: sightline_sinks::Lake::open(&lake_dir.path().to_string_lossy())?,
                stop: Default::default(),
                print_windows: false,
                format: Default::default(),
            };
            // With `[http] listen` in the configuration, the endpoints and the dashboard's board
            // run too, read as an open page and Prometheus would (`scrape_like_a_page`).
            let summary = if job
                .config
                .http
                .listen
                .as_deref()
                .is_some_and(|l| !l.is_empty())
            {
                let telemetry = sightline::http::telemetry_for(&job.config.http);
                let addr = sightline::http::start(&job.config.http, Arc::clone(&telemetry))?
                    .ok_or_else(|| anyhow::anyhow!("the endpoints did not start"))?;
                let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let scraper = {
                    let done = Arc::clone(&done);
                    std::thread::spawn(move || scrape_like_a_page(addr, &done))
                };
                let summary = sightline::run::run_observed(job, telemetry);
                done.store(true, Ordering::Relaxed);
                let scraped = scraper.join().unwrap_or(0);
                eprintln!("endpoints: {scraped} bytes scraped");
                summary?
            } else {
                run(job)?
            };
            anyhow::ensure!(summary.read == events, "read {} of {events}", summary.read);
        }
        "parse" => {
            // A fixed key for measurement only (parse-only does not pseudonymize anyway).
            let keys = Arc::new(KeyRing::from_hex("bench", &"3c".repeat(32), 30)?);
            let threads: Vec<_> = (0..workers)
                .map(|worker| {
                    let (block, keys) = (Arc::clone(&block), Arc::clone(&keys));
                    std::thread::spawn(move || {
                        let decoder = Decoder::new(1 << 20, keys);
                        let mut reader = CyclingReader::new(
                            block,
                            worker,
                            workers,
                            events,
                            START_MS,
                            EVENTS_PER_SECOND,
                        );
                        let mut accepted = 0u64;
                        reader.for_each(|line| {
                            accepted += u64::from(decoder.parse_only(line).is_ok())
                        });
                        accepted
                    })
                })
                .collect();
            let accepted: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
            anyhow::ensure!(accepted > events / 2, "only {accepted} of {events} decoded");
        }
        other => anyhow::bail!("unknown mode {other}"),
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "RESULT {mode} {workers} {events} {seconds} {}",
        peak_rss_kib().unwrap_or(0)
    );
    Ok(())
}

fn measure(mode: &str, workers: usize, events: u64) -> anyhow::Result<Measurement> {
    measure_with_batch(mode, workers, events, None)
}

fn measure_with_batch(
    mode: &str,
    workers: usize,
    events: u64,
    batch: Option<usize>,
) -> anyhow::Result<Measurement> {
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    command.args(["--child", mode, &workers.to_string(), &events.to_string()]);
    if let Some(batch) = batch {
        command.env("SIGHTLINE_BENCH_BATCH", batch.to_string());
    }
    let output = command.output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "{mode} on {workers} workers failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .ok_or_else(|| anyhow::anyhow!("no result in {stdout}"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let m = Measurement {
        mode: mode.into(),
        workers,
        events,
        seconds: fields[4].parse()?,
        rss_kib: fields[5].parse()?,
    };
    eprintln!(
        "{:>9} {} worker(s) {:>9} events: {:7.2} s, {:>9.0} events/s per worker, peak RSS {} MiB",
        m.mode,
        m.workers,
        m.events,
        m.seconds,
        m.per_worker(),
        m.rss_kib / 1024
    );
    Ok(m)
}

/// Instructions and level-1 data-cache misses per event of one mode, from cachegrind.
#[derive(Debug, Clone, Copy)]
struct PerEvent {
    instructions: f64,
    l1_data_misses: f64,
}

/// Events of the two cachegrind runs whose difference gives the cost of one event.
const CACHEGRIND_EVENTS: [u64; 2] = [40_000, 100_000];

/// The marginal cost of one event in `mode` on one worker: cachegrind's counts over
/// [`CACHEGRIND_EVENTS`], the difference divided by the difference in events (so start-up and
/// the input block's generation cancel out). Deterministic, unlike wall-clock time on a shared
/// machine. `None` when valgrind is not installed.
fn per_event(mode: &str) -> anyhow::Result<Option<PerEvent>> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        return Ok(None);
    }
    let exe = std::env::current_exe()?;
    let mut totals = Vec::new();
    for events in CACHEGRIND_EVENTS {
        let out = tempfile::NamedTempFile::new()?;
        let status = Command::new("valgrind")
            .args([
                "--tool=cachegrind",
                "--cache-sim=yes",
                "--quiet",
                &format!("--cachegrind-out-file={}", out.path().display()),
            ])
            .arg(&exe)
            .args(["--child", mode, "1", &events.to_string()])
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "cachegrind of {mode} failed");
        // The totals line: `summary: Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw`.
        let text = std::fs::read_to_string(out.path())?;
        let events_line = text
            .lines()
            .find_map(|l| l.strip_prefix("events: "))
            .ok_or_else(|| anyhow::anyhow!("no events line"))?;
        let summary = text
            .lines()
            .find_map(|l| l.strip_prefix("summary: "))
            .ok_or_else(|| anyhow::anyhow!("no summary line"))?;
        let counts: std::collections::HashMap<&str, f64> = events_line
            .split_whitespace()
            .zip(summary.split_whitespace().map(|n| n.parse().unwrap_or(0.0)))
            .collect();
        let count = |name: &str| counts.get(name).copied().unwrap_or(0.0);
        totals.push((count("Ir"), count("D1mr") + count("D1mw")));
    }
    let events = (CACHEGRIND_EVENTS[1] - CACHEGRIND_EVENTS[0]) as f64;
    let per = PerEvent {
        instructions: (totals[1].0 - totals[0].0) / events,
        l1_data_misses: (totals[1].1 - totals[0].1) / events,
    };
    eprintln!(
        "{mode:>9} per event: {:.0} instructions, {:.1} L1 data misses",
        per.instructions, per.l1_data_misses
    );
    Ok(Some(per))
}

/// What the Kafka path measured.
#[derive(Debug, Clone, Copy)]
struct KafkaPath {
    /// Bare consumer, events/s.
    bare: f64,
    /// Pipeline on one worker, events/s.
    pipeline: f64,
    /// Windows whose closing delay was measured while the pipeline ran.
    closed_windows: u64,
    /// The largest delay from the watermark passing a window's end to the window being durable.
    max_close_delay_ms: u64,
    /// Pipeline, 1 worker, saving the source state at every durable advance
    /// (`commit-interval-ms = 0`), events/s.
    saving_always: f64,
    /// Pipeline, 1 worker, saving no source state while it reads (a one-hour commit interval),
    /// events/s.
    saving_never: f64,
    /// The restart after a stop halfway.
    restart: Restart,
}

/// A restart after a stop halfway through the topic.
#[derive(Debug, Clone, Copy)]
struct Restart {
    /// Records the first run had read when it was stopped.
    read_before: u64,
    /// The committed offsets' sum when it stopped: where the restart resumes.
    resumed_at: u64,
    /// Records the restart read again (read before the stop, after the committed offsets).
    reread: u64,
    /// Of those, records of windows already written, dropped.
    already_written: u64,
    /// From the restart's start to its first record, s.
    first_record_s: f64,
    /// From the restart's start to reading the end of the topic, s.
    caught_up_s: f64,
}

/// Runs the pipeline (1 worker) on `topic` as consumer group `group` until it has read
/// `until` records, then stops it (with `grace_ms` to write closed windows); returns the
/// elapsed time, the time to the first record, the summary, and the windows closed with the
/// largest closing delay.
fn pipeline_run(
    bootstrap: &str,
    topic: &str,
    group: &str,
    lake_dir: &std::path::Path,
    commit_interval_ms: u64,
    until: u64,
    grace_ms: u64,
) -> anyhow::Result<(Duration, Duration, sightline::run::Summary, (u64, u64))> {
    let mut config = Config::default();
    config.kafka.bootstrap_servers = bootstrap.to_owned();
    config.kafka.group_id = group.into();
    config.kafka.topics = vec![TopicConfig::envelope(topic)];
    config.kafka.commit_interval_ms = commit_interval_ms;
    config.pipeline.shutdown_grace_ms = grace_ms;
    let stats = Arc::new(IngestStats::default());
    let job = Job {
        input: Input::Kafka(config.kafka.clone()),
        config,
        lake: sightline_sinks::Lake::open(&lake_dir.to_string_lossy())?,
        stop: Default::default(),
        print_windows: false,
        format: Default::default(),
    };
    let stop = Arc::clone(&job.stop);
    let started = Instant::now();
    let pipeline = {
        let stats = Arc::clone(&stats);
        std::thread::spawn(move || sightline::run::run_with_stats(job, stats))
    };
    let mut first = None;
    while stats.read.load(Ordering::Relaxed) < until {
        anyhow::ensure!(
            !pipeline.is_finished() && started.elapsed() < Duration::from_secs(600),
            "the pipeline read only {:?}",
            stats.snapshot()
        );
        if first.is_none() && stats.read.load(Ordering::Relaxed) > 0 {
            first = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let summary = pipeline
        .join()
        .map_err(|_| anyhow::anyhow!("pipeline panicked"))??;
    let delays = (
        stats.closed_windows.load(Ordering::Relaxed),
        stats.max_close_delay_ms.load(Ordering::Relaxed),
    );
    Ok((elapsed, first.unwrap_or(elapsed), summary, delays))
}

/// The sum of `group`'s committed offsets on `topic`'s `partitions`.
fn committed_sum(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<u64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o.max(0) as u64,
            _ => 0,
        })
        .sum())
}

/// Events through the Kafka path.
fn kafka_path(events: u64) -> anyhow::Result<KafkaPath> {
    use sightline_integration_tests::servers::Tansu;
    const TOPIC: &str = "bench.events";
    let broker = Tansu::start();
    broker.create_topic(TOPIC, 2);
    // Event time starts now, so that no idle partition makes the events late.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "500000")
        .create()?;
    // Ten minutes of event time, so that ten windows close while the pipeline reads.
    let mut reader = CyclingReader::new(
        Block::generate(BLOCK, 1),
        0,
        1,
        events,
        now,
        events as f64 / 600.0,
    );
    let mut failed = None;
    reader.for_each(|line| {
        loop {
            match producer.send(BaseRecord::<(), [u8]>::to(TOPIC).payload(line)) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => std::thread::sleep(Duration::from_millis(2)),
                Err((err, _)) => {
                    failed = Some(err);
                    break;
                }
            }
        }
    });
    if let Some(err) = failed {
        anyhow::bail!("producing to tansu: {err}");
    }
    producer.flush(Duration::from_secs(120))?;

    // The bare consumer: read every record once, do nothing with it.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", "bench-bare")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(TOPIC, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let mut seen = 0u64;
    while seen < events {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "bare consumer read only {seen} of {events}"
        );
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            seen += 1;
        }
    }
    let bare = events as f64 / started.elapsed().as_secs_f64();
    drop(consumer);

    // The pipeline on one worker, from the same topic, as deployed (commits every 5 s).
    let lake_dir = tempfile::tempdir()?;
    let (elapsed, _, _, delays) = pipeline_run(
        &broker.bootstrap,
        TOPIC,
        "bench-pipeline",
        lake_dir.path(),
        5_000,
        events,
        0,
    )?;
    let through_pipeline = events as f64 / elapsed.as_secs_f64();

    // The cost of saving the source state: at every durable advance, against never.
    let timed = |group: &str, interval: u64| -> anyhow::Result<f64> {
        let dir = tempfile::tempdir()?;
        let (elapsed, _, _, _) = pipeline_run(
            &broker.bootstrap,
            TOPIC,
            group,
            dir.path(),
            interval,
            events,
            0,
        )?;
        Ok(events as f64 / elapsed.as_secs_f64())
    };
    let saving_always = timed("bench-save-always", 0)?;
    let saving_never = timed("bench-save-never", 3_600_000)?;

    // A restart: stop halfway without writing open windows, then start again. On a topic
    // produced one record per batch: tansu 0.6 skips the rest of a batch when a fetch starts
    // inside it (see DESIGN.md), which would lose records at the resume offset.
    let workload = sightline_integration_tests::chaos::Workload::new(
        RESTART_TOPIC,
        2,
        RESTART_EVENTS as usize,
        7,
    );
    broker.create_topic(RESTART_TOPIC, 2);
    workload.produce(&broker.bootstrap);
    let dir = tempfile::tempdir()?;
    let (_, _, first, _) = pipeline_run(
        &broker.bootstrap,
        RESTART_TOPIC,
        "bench-restart",
        dir.path(),
        1_000,
        RESTART_EVENTS / 2,
        0,
    )?;
    let resumed_at = committed_sum(&broker.bootstrap, "bench-restart", RESTART_TOPIC, 2)?;
    let (caught_up, first_record, second, _) = pipeline_run(
        &broker.bootstrap,
        RESTART_TOPIC,
        "bench-restart",
        dir.path(),
        1_000,
        RESTART_EVENTS - resumed_at,
        0,
    )?;
    let restart = Restart {
        read_before: first.read,
        resumed_at,
        reread: first.read.saturating_sub(resumed_at),
        already_written: second.already_written,
        first_record_s: first_record.as_secs_f64(),
        caught_up_s: caught_up.as_secs_f64(),
    };
    Ok(KafkaPath {
        bare,
        pipeline: through_pipeline,
        closed_windows: delays.0,
        max_close_delay_ms: delays.1,
        saving_always,
        saving_never,
        restart,
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    });
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().next().map(|l| {
            l.split_whitespace()
                .nth(1)
                .unwrap_or("0")
                .parse::<u64>()
                .unwrap_or(0)
                / 1024
                / 1024
        })
    });
    format!(
        "{} core(s), {} GiB, {}",
        cores,
        mem.unwrap_or(0),
        cpu.unwrap_or_else(|| "unknown CPU".into())
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**not met**" }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        return child(&args[i + 1], args[i + 2].parse()?, args[i + 3].parse()?);
    }
    if let Some(i) = args.iter().position(|a| a == "--dump-block") {
        let path = args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("--dump-block FILE"))?;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        Block::generate(BLOCK, 1).write_to(&mut out)?;
        return Ok(std::io::Write::flush(&mut out)?);
    }
    let report = args
        .iter()
        .position(|a| a == "--report")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let block_bytes = Block::generate(BLOCK, 1).bytes() / BLOCK;

    // This machine's run-to-run spread is ±15%: each throughput configuration runs ROUNDS
    // times, the pipeline and its parse-only baseline interleaved so that drift hits both, and
    // the median is reported with the range.
    let mut rounds: Vec<[Measurement; 4]> = Vec::new();
    for _ in 0..ROUNDS {
        rounds.push([
            measure("pipeline", 1, BASE_EVENTS)?,
            measure("parse", 1, BASE_EVENTS)?,
            measure("pipeline", 2, BASE_EVENTS)?,
            measure("parse", 2, BASE_EVENTS)?,
        ]);
    }
    let runs = |i: usize| rounds.iter().map(|r| r[i].clone()).collect::<Vec<_>>();
    let pipeline = [Median::of(runs(0)), Median::of(runs(2))];
    let parse = [Median::of(runs(1)), Median::of(runs(3))];
    let growth = [
        pipeline[0].median.clone(),
        measure("pipeline", 1, 4 * BASE_EVENTS)?,
        measure("pipeline", 1, 16 * BASE_EVENTS)?,
    ];
    const BATCHES: [usize; 4] = [256, 1024, 4096, 16384];
    let mut batch_runs: Vec<Vec<Measurement>> = vec![Vec::new(); BATCHES.len()];
    for _ in 0..ROUNDS {
        for (runs, batch) in batch_runs.iter_mut().zip(BATCHES) {
            runs.push(measure_with_batch("pipeline", 1, BASE_EVENTS, Some(batch))?);
        }
    }
    let batches: Vec<(usize, Median)> = BATCHES
        .into_iter()
        .zip(batch_runs.into_iter().map(Median::of))
        .collect();
    let cachegrind = match (per_event("pipeline")?, per_event("parse")?) {
        (Some(pipeline), Some(parse)) => Some((pipeline, parse)),
        _ => None,
    };
    let kafka = if args.iter().any(|a| a == "--kafka") {
        let k = kafka_path(KAFKA_EVENTS)?;
        eprintln!(
            "    kafka {KAFKA_EVENTS} events: bare consumer {:.0} events/s, pipeline (1 worker) {:.0} events/s; {} windows closed, max delay {} ms",
            k.bare, k.pipeline, k.closed_windows, k.max_close_delay_ms
        );
        Some(k)
    } else {
        None
    };

    let mut md = String::new();
    md.push_str("# Sightline end-to-end benchmark\n\n");
    md.push_str(&format!(
        "- machine: {}\n- command: `benches/run` (`cargo bench -p sightline-benches --bench end_to_end -- --kafka --report benches/REPORT.md`)\n",
        machine()
    ));
    md.push_str(&format!("- input: generated events cycled from a block of {BLOCK} lines, {block_bytes} bytes each on average, 0.1% late and 0.1% broken; event time advances {EVENTS_PER_SECOND:.0} events/s (16 × {BASE_EVENTS} events span one hour)\n"));
    md.push_str("- pipeline: decode, schema validation (streaming, in the same pass as the envelope read, compiled registry), privacy (3 keyed-BLAKE3 pseudonyms per event, computed inline; scrubbed labels memoized per worker; scrubbing of free text), watermarks, event_counts, latency, latency_by_variant, quality, quality_summary, dead letters, standard and restricted routes, closing windows, Parquet encoding, lake on local disk (a temporary directory); 60 s windows.\n- parse-only: the envelope read with `properties` skipped (`Decoder::parse_only`: no validation, no privacy), the fastest way this code base has to turn the bytes into envelope fields.\n\n");
    md.push_str(&format!(
        "## Throughput (median of {ROUNDS} interleaved runs)\n\n| run | workers | events | seconds | events/s per worker | range of the runs | peak RSS (MiB) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    ));
    for run in pipeline.iter().chain(parse.iter()) {
        let m = &run.median;
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.0}–{:.0} | {} |\n",
            m.mode,
            m.workers,
            m.events,
            m.seconds,
            m.per_worker(),
            run.low,
            run.high,
            m.rss_kib / 1024
        ));
    }
    md.push_str(&format!(
        "\n## Source batch size (`pipeline.batch-size`, 1 worker, median of {ROUNDS} interleaved runs)\n\n| batch | events/s | range of the runs | peak RSS (MiB) |\n| ---: | ---: | ---: | ---: |\n"
    ));
    for (batch, run) in &batches {
        md.push_str(&format!(
            "| {batch} | {:.0} | {:.0}–{:.0} | {} |\n",
            run.median.per_worker(),
            run.low,
            run.high,
            run.median.rss_kib / 1024
        ));
    }
    md.push_str("\n## Memory growth (1 worker, same key cardinality)\n\n| events | × | seconds | peak RSS (MiB) | RSS / RSS at 1× |\n| ---: | ---: | ---: | ---: | ---: |\n");
    for (m, x) in growth.iter().zip([1, 4, 16]) {
        md.push_str(&format!(
            "| {} | {x} | {:.2} | {} | {:.2} |\n",
            m.events,
            m.seconds,
            m.rss_kib / 1024,
            m.rss_kib as f64 / growth[0].rss_kib as f64
        ));
    }
    if let Some((p, q)) = cachegrind {
        md.push_str(&format!(
            "\n## Cost of one event (1 worker, cachegrind)\n\nThe difference between runs of {} and {} events, divided by the difference: deterministic, where the wall-clock figures above spread with the machine's load. L1 data misses are cachegrind's model of this machine's first-level cache; a miss costs more than an instruction, so the time ratio is lower than the instruction ratio.\n\n| run | instructions | L1 data misses |\n| --- | ---: | ---: |\n| pipeline | {:.0} | {:.1} |\n| parse | {:.0} | {:.1} |\n| parse / pipeline | {:.0}% | {:.0}% |\n",
            CACHEGRIND_EVENTS[0],
            CACHEGRIND_EVENTS[1],
            p.instructions,
            p.l1_data_misses,
            q.instructions,
            q.l1_data_misses,
            100.0 * q.instructions / p.instructions,
            100.0 * q.l1_data_misses / p.l1_data_misses
        ));
    }
    // The ratio of each round (pipeline and parse-only run back to back), then the median:
    // the machine's speed drifts over minutes, and a round's two runs see the same machine.
    let ratios: Vec<(f64, f64, f64)> = (0..2)
        .map(|w| {
            let mut r: Vec<f64> = rounds
                .iter()
                .map(|round| round[2 * w].per_worker() / round[2 * w + 1].per_worker())
                .collect();
            r.sort_by(f64::total_cmp);
            (r[r.len() / 2], r[0], r[r.len() - 1])
        })
        .collect();
    let growth_ratio = growth[2].rss_kib as f64 / growth[0].rss_kib as f64;
    if let Some(k) = kafka {
        md.push_str(&format!(
            "\n## Kafka path ({KAFKA_EVENTS} events, local tansu broker, in-memory storage, 2 partitions)\n\n| reader | events/s |\n| --- | ---: |\n| bare rdkafka consumer | {:.0} |\n| pipeline, 1 worker | {:.0} |\n| pipeline, 1 worker, source state saved at every durable advance | {:.0} |\n| pipeline, 1 worker, no source state saved while reading | {:.0} |\n\nWhile it ran, {} windows closed; the largest delay from the watermark passing a window's end to the window being durable in every table was {} ms (sampled every 50 ms).\n",
            k.bare, k.pipeline, k.saving_always, k.saving_never, k.closed_windows, k.max_close_delay_ms
        ));
        let r = k.restart;
        md.push_str(&format!(
            "\n## Restart ({RESTART_EVENTS} events, one record per batch, 2 partitions, 1 worker, commits every second)\n\nA run stopped after reading {} records, without writing its open windows; its committed offsets summed to {}. The restart read again the {} records between the committed offsets and where the first run stopped ({} of them in windows already written, dropped and counted), got its first record {:.2} s after it started, and read to the end of the topic ({} records) {:.2} s after it started.\n",
            r.read_before,
            r.resumed_at,
            r.reread,
            r.already_written,
            r.first_record_s,
            RESTART_EVENTS - r.resumed_at,
            r.caught_up_s
        ));
    }
    md.push_str("\n## Targets\n\n| target | measured | verdict |\n| --- | --- | --- |\n");
    for (i, run) in pipeline.iter().map(|p| &p.median).enumerate() {
        md.push_str(&format!(
            "| ≥ 1,000,000 events/s per worker ({} worker(s)) | {:.0} | {} |\n",
            i + 1,
            run.per_worker(),
            verdict(run.per_worker() >= 1e6)
        ));
        let (median, low, high) = ratios[i];
        md.push_str(&format!(
            "| pipeline ≥ 50% of parse-only ({} worker(s); median of the rounds' ratios) | {:.0}% (rounds: {:.0}–{:.0}%) | {} |\n",
            i + 1,
            100.0 * median,
            100.0 * low,
            100.0 * high,
            verdict(median >= 0.5)
        ));
    }
    md.push_str(&format!(
        "| peak RSS at 16× within 10% of 1× | {:.2}× | {} |\n",
        growth_ratio,
        verdict(growth_ratio <= 1.10)
    ));
    md.push_str(&format!(
        "| under 1 GiB for {} events over one hour | {} MiB | {} |\n",
        growth[2].events,
        growth[2].rss_kib / 1024,
        verdict(growth[2].rss_kib < 1024 * 1024)
    ));
    match kafka {
        Some(k) => {
            md.push_str(&format!(
                "| Kafka path ≥ 80% of the bare consumer | {:.0}% | {} |\n",
                100.0 * k.pipeline / k.bare,
                verdict(k.pipeline >= 0.8 * k.bare)
            ));
            md.push_str(&format!(
                "| saving the source state keeps ≥ 95% of the throughput (saved at every durable advance vs never) | {:.0}% | {} |\n",
                100.0 * k.saving_always / k.saving_never,
                verdict(k.saving_always >= 0.95 * k.saving_never)
            ));
            md.push_str(&format!(
                "| closed windows durable within 1 s of the watermark passing their end | max {} ms over {} windows | {} |\n",
                k.max_close_delay_ms,
                k.closed_windows,
                verdict(k.closed_windows > 0 && k.max_close_delay_ms <= 1000)
            ));
        }
        None => {
            md.push_str("| Kafka path ≥ 80% of the bare consumer | not run (`--kafka`) | — |\n")
        }
    }
    print!("{md}");
    if let Some(path) = report {
        std::fs::write(&path, md)?;
        eprintln!("wrote {path}");
    }
    Ok(())
}
