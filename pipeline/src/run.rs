//! Running a pipeline: timely workers, the reporting loop, shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use sightline_ingest::{Decoder, Format};
use sightline_operators::Time;
use sightline_privacy::KeyRing;
use sightline_sinks::kafka::TopicSink;
use sightline_sinks::timing::Timing;
use sightline_sinks::{Lake, SinkHealth};
use tracing::{info, warn};

use crate::config::{Config, KafkaConfig};
use crate::dataflow::{Analytics, Route, build, windows_of};
use crate::emit::Outputs;
use crate::report::{ProcessTotals, Progress, Report, window_line};
use sightline_ingest::source::checkpoint::CheckpointStore;
use sightline_ingest::source::kafka::KafkaReader;
use sightline_ingest::source::ndjson::NdjsonReader;
use sightline_ingest::source::{Decoders, Drain, IngestSettings, IngestStats, RecordReader};

/// Makes worker `index` of `peers` its reader (for inputs the CLI does not know: benchmarks,
/// tests).
pub type ReaderFactory =
    Arc<dyn Fn(usize, usize) -> anyhow::Result<Box<dyn RecordReader>> + Send + Sync>;

/// Where a run reads from.
// Made once per run: the Kafka configuration's size beside a path costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Input {
    /// An NDJSON file, or `-` for standard input (bounded).
    Ndjson(String),
    /// Kafka topics (unbounded).
    Kafka(KafkaConfig),
    /// Any reader.
    Custom(ReaderFactory),
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Ndjson(path) => f.debug_tuple("Ndjson").field(path).finish(),
            Input::Kafka(kafka) => f.debug_tuple("Kafka").field(kafka).finish(),
            Input::Custom(_) => f.write_str("Custom"),
        }
    }
}

/// A run of the pipeline.
#[derive(Clone, Debug)]
pub struct Job {
    /// The configuration (workers, windows, lateness, limits).
    pub config: Config,
    /// The input.
    pub input: Input,
    /// The lake the sinks write to.
    pub lake: Lake,
    /// Set to stop an unbounded run gracefully: the sources stop reading, the windows already
    /// closed are written and their offsets committed (within `pipeline.shutdown-grace-ms`),
    /// and the run returns. Open windows are not written: they are not final, and a restart
    /// reads their records again.
    pub stop: Arc<AtomicBool>,
    /// Print one line per closed window on standard output.
    pub print_windows: bool,
    /// Record format of file and custom inputs (Kafka topics declare their own).
    pub format: Format,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records read.
    pub read: u64,
    /// Events accepted.
    pub accepted: u64,
    /// Records rejected by decoding.
    pub rejected: u64,
    /// Late events.
    pub late: u64,
    /// Windows closed and written.
    pub windows: u64,
    /// Files written.
    pub files: u64,
    /// Rows written.
    pub rows: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Records read again after a restart whose windows had already been written (dropped).
    pub already_written: u64,
    /// Failed deliveries, each retried.
    pub retries: u64,
    /// The metrics store, when configured: samples sent, rejected for good, dropped from a
    /// full queue, still queued at the end; and requests retried.
    pub remote_write: Option<(u64, u64, u64, u64, u64)>,
    /// In a cluster: this process's index, the number of processes, and whether the record
    /// counts are the whole cluster's (process 0 after a bounded run, when every process has
    /// reported its totals) or this process's own share (the other processes, and any process
    /// after a stop).
    pub cluster: Option<(usize, usize, bool)>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "read {} · accepted {} · rejected {} · late {} · windows {} · files written {} ({} rows, {} bytes)",
            self.read,
            self.accepted,
            self.rejected,
            self.late,
            self.windows,
            self.files,
            self.rows,
            self.bytes
        )?;
        if self.already_written > 0 {
            write!(
                f,
                " · already written before a restart {}",
                self.already_written
            )?;
        }
        if self.retries > 0 {
            write!(f, " · delivery retries {}", self.retries)?;
        }
        if let Some((sent, rejected, dropped, queued, retries)) = self.remote_write {
            write!(
                f,
                " · remote-write: {sent} samples sent, {rejected} rejected, {dropped} dropped"
            )?;
            if queued > 0 {
                write!(f, ", {queued} not sent")?;
            }
            if retries > 0 {
                write!(f, " ({retries} requests retried)")?;
            }
        }
        match self.cluster {
            Some((_, n, true)) => write!(f, " · cluster of {n} processes")?,
            Some((0, n, false)) => write!(
                f,
                " · process 0 of {n}: the cluster's windows and files, its own share of the records"
            )?,
            Some((i, n, false)) => write!(
                f,
                " · process {i} of {n}: its own share of the records (process 0 counts the cluster's windows and files)"
            )?,
            None => {}
        }
        Ok(())
    }
}

fn open_reader(job: &Job, worker: usize, peers: usize) -> anyhow::Result<Box<dyn RecordReader>> {
    let max = job.config.pipeline.max_event_bytes;
    Ok(match &job.input {
        Input::Ndjson(path) => Box::new(NdjsonReader::open(path, worker, peers, max)?),
        Input::Kafka(kafka) => Box::new(KafkaReader::connect(
            &kafka.source(),
            worker,
            peers,
            windows_of(&job.config.pipeline),
            max,
            Arc::new(LakeCheckpoints(job.lake.clone())),
        )?),
        Input::Custom(factory) => factory(worker, peers)?,
    })
}

/// The Kafka source's checkpoints, kept in the lake (see
/// [`sightline_ingest::source::checkpoint`]).
pub struct LakeCheckpoints(pub Lake);

impl CheckpointStore for LakeCheckpoints {
    fn load(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        self.0
            .get_if_exists(name)
            .map(|bytes| bytes.map(|b| b.to_vec()))
            .map_err(|e| format!("{e:#}"))
    }

    fn save(&self, objects: Vec<(String, Vec<u8>)>) -> Result<(), String> {
        let objects = objects
            .into_iter()
            .map(|(name, bytes)| (name, bytes.into()))
            .collect();
        self.0.put_all(objects).map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            format!("{e}{cause}")
        })
    }
}

/// The decoders of one worker: the replay format (or the canonical envelope) by default, and
/// each Kafka topic's declared format.
fn decoders_for(job: &Job, keys: &Arc<KeyRing>, analytics: &Analytics) -> Decoders {
    let base = Decoder::new(job.config.pipeline.max_event_bytes, Arc::clone(keys)).with_links(
        crate::analytics::link_fields(
            &analytics.funnels,
            analytics.experiments.is_on(),
            analytics
                .sampling
                .as_ref()
                .is_some_and(|s| s.uses_tenants()),
        ),
    );
    let mut decoders = Decoders::new(base.clone().with_format(job.format.clone()));
    if let Input::Kafka(kafka) = &job.input {
        for topic in &kafka.topics {
            decoders = decoders.with_topic(
                &topic.name,
                base.clone().with_format(topic.decoder_format()),
            );
        }
    }
    decoders
}

/// The producer of the topic `topic` picks from the Kafka configuration, when the input is
/// Kafka and the topic is set; `what` names it in errors.
fn topic_sink<V: serde::Serialize + timely::ExchangeData>(
    job: &Job,
    topic: impl Fn(&KafkaConfig) -> Option<&str>,
    what: &str,
) -> anyhow::Result<Option<TopicSink<V>>> {
    match &job.input {
        Input::Kafka(kafka) => topic(kafka)
            .map(|t| TopicSink::connect(&kafka.client_config(&[]), t))
            .transpose()
            .with_context(|| format!("creating the {what} producer")),
        _ => Ok(None),
    }
}

/// Counts a worker out when it ends, however it ends. A worker that fails or panics also sets
/// the run's abort flag: the others cannot make progress without it.
struct WorkerExit<'a> {
    finished: &'a AtomicU64,
    abort: &'a AtomicBool,
    failed: bool,
}

impl Drop for WorkerExit<'_> {
    fn drop(&mut self) {
        if self.failed || std::thread::panicking() {
            self.abort.store(true, Ordering::Relaxed);
        }
        self.finished.fetch_add(1, Ordering::Release);
    }
}

/// Measures, per window, the delay between the watermark passing its end and the window being
/// durable in every table.
struct CloseDelays {
    width_ms: u64,
    next_end: Option<u64>,
    passed: std::collections::VecDeque<(u64, Instant)>,
}

impl CloseDelays {
    fn new(width_ms: u64) -> CloseDelays {
        CloseDelays {
            width_ms: width_ms.max(1),
            next_end: None,
            passed: Default::default(),
        }
    }

    fn observe(
        &mut self,
        watermark: u64,
        durable: u64,
        stats: &IngestStats,
        timing: &Mutex<Timing>,
    ) {
        let now = Instant::now();
        // The end of input is not a watermark: nothing is timed past it.
        if watermark != u64::MAX && watermark > 0 {
            let next = self
                .next_end
                .get_or_insert(watermark - watermark % self.width_ms + self.width_ms);
            // A jump over many windows (idle partitions reaching the wall clock) times only the
            // last of them, so that the bookkeeping stays small.
            if watermark.saturating_sub(*next) / self.width_ms > 1_000 {
                *next = watermark - watermark % self.width_ms;
            }
            while *next <= watermark {
                self.passed.push_back((*next, now));
                *next += self.width_ms;
            }
        }
        while let Some(&(end, at)) = self.passed.front() {
            if durable < end {
                break;
            }
            self.passed.pop_front();
            let delay = now.duration_since(at);
            stats.closed_windows.fetch_add(1, Ordering::Relaxed);
            stats
                .max_close_delay_ms
                .fetch_max(delay.as_millis() as u64, Ordering::Relaxed);
            if let Ok(mut timing) = timing.lock() {
                timing.record(delay);
            }
        }
    }
}

/// In a cluster, the reports of each process reach process 0's run loop through a small
/// dataflow of their own: each process's first worker sends what its sinks report, at the
/// durable frontier it has seen, to worker 0, which hands them to its run loop; the dataflow's
/// frontier there says up to where every process's reports are in.
struct Forward {
    /// The input (each process's first worker only; dropped elsewhere).
    input: Option<timely::dataflow::InputHandleVec<Time, Report>>,
    /// What this process's sinks report.
    from: Option<mpsc::Receiver<Report>>,
    /// Where every process's reports have all arrived at worker 0.
    probe: timely::dataflow::ProbeHandle<Time>,
}

impl Forward {
    fn build(
        worker: &mut timely::worker::Worker,
        from: Option<mpsc::Receiver<Report>>,
        to_run_loop: mpsc::Sender<Report>,
    ) -> Forward {
        use timely::dataflow::operators::vec::Input as _;
        use timely::dataflow::operators::{Exchange as _, Inspect as _, Probe as _};
        let mut input = timely::dataflow::InputHandleVec::new();
        let probe = worker.dataflow::<Time, _, _>(|scope| {
            scope
                .input_from(&mut input)
                .exchange(|_| 0)
                .inspect(move |report: &Report| {
                    let _ = to_run_loop.send(report.clone());
                })
                .probe()
                .0
        });
        Forward {
            input: from.is_some().then_some(input),
            from,
            probe,
        }
    }

    /// Sends what the sinks reported so far, then promises nothing more before `durable`: the
    /// sinks report a window before the durable frontier passes it, and `durable` was read
    /// before the reports.
    fn pass(&mut self, durable: u64) {
        let (Some(input), Some(from)) = (self.input.as_mut(), self.from.as_ref()) else {
            return;
        };
        while let Ok(report) = from.try_recv() {
            input.send(report);
        }
        if durable > *input.time() {
            input.advance_to(durable);
        }
    }

    /// Sends this process's totals and closes the input.
    fn finish(&mut self, totals: ProcessTotals) {
        if let Some(mut input) = self.input.take() {
            input.send(Report::Totals(totals));
        }
    }
}

/// What this process read and retried so far.
fn process_totals(stats: &IngestStats, health: &SinkHealth) -> ProcessTotals {
    let (read, accepted, rejected, late) = stats.snapshot();
    ProcessTotals {
        read,
        accepted,
        rejected,
        late,
        already_written: stats.already_written.load(Ordering::Relaxed),
        retries: health.retries(),
    }
}

/// What `sightline run` logs (info) once a stop signal is handled: before that line, SIGTERM
/// ends the process at once, like any process that has not set up its handlers yet.
pub const STOP_HANDLED: &str = "stop signals handled (SIGTERM, SIGINT, SIGHUP)";

/// Runs `job` to completion (bounded input) or until `job.stop` is set, and returns what it did.
pub fn run(job: Job) -> anyhow::Result<Summary> {
    run_with_stats(job, Arc::new(IngestStats::default()))
}

/// [`run`], updating `stats` as records are read, so that a caller can watch progress.
pub fn run_with_stats(job: Job, stats: Arc<IngestStats>) -> anyhow::Result<Summary> {
    run_observed(job, Arc::new(crate::http::Telemetry::new(stats)))
}

/// [`run`], keeping `telemetry` (what `/metrics`, `/healthz` and `/readyz` show) up to date.
pub fn run_observed(job: Job, telemetry: Arc<crate::http::Telemetry>) -> anyhow::Result<Summary> {
    let stats = Arc::clone(&telemetry.ingest);
    let workers = job.config.pipeline.workers;
    let place = job.config.cluster.place()?;
    let keys = match job.config.privacy.key_ring()? {
        Some(ring) => Arc::new(ring),
        None if place.is_some() => anyhow::bail!(
            "a cluster needs a configured pseudonymization key (privacy.key or privacy.key-file): every process must pseudonymize alike"
        ),
        None => {
            warn!(
                "no pseudonymization key configured (privacy.key or privacy.key-file): using a random key for this run"
            );
            Arc::new(KeyRing::ephemeral(job.config.privacy.rotation_days)?)
        }
    };
    let funnels: Arc<[sightline_operators::funnel::FunnelDef]> = job.config.funnel_defs()?.into();
    let mut linker = sightline_privacy::Pseudonymizer::new(Arc::clone(&keys));
    let experiments = Arc::new(job.config.experiment_setup(&mut |t| linker.link_of(t))?);
    let flush = Arc::new(AtomicBool::new(false));
    let remote = job
        .config
        .metrics_store
        .options()?
        .map(sightline_sinks::remote_write::RemoteWrite::start)
        .transpose()
        .context("starting the metrics store's sender")?;
    // The long-horizon state is saved and restored for Kafka sources: they resume from
    // committed offsets. A file replay starts from its beginning every time.
    let (restored, state_target) = match &job.input {
        Input::Kafka(kafka) => {
            let prefix = job.config.lake.restricted_prefix.clone();
            let restored = crate::restore::restore_funnels(
                &job.lake,
                &prefix,
                &kafka.group_id,
                &funnels,
                &job.config.triage.rules(),
                &experiments,
                windows_of(&job.config.pipeline),
            )?;
            let target = crate::emit::StateTarget {
                lake: job.lake.clone(),
                restricted_prefix: prefix,
                group: kafka.group_id.clone(),
                windows: windows_of(&job.config.pipeline),
            };
            (Some(Arc::new(restored)), Some(target))
        }
        _ => (None, None),
    };
    let health = match (&job.input, &restored) {
        (Input::Kafka(kafka), Some(restored)) => Route::ALL
            .iter()
            .map(|route| {
                sightline_sinks::state::load_window_state(
                    &job.lake,
                    &kafka.group_id,
                    &sightline_sinks::state::health_name(route.as_str()),
                    restored.resume_ms,
                    windows_of(&job.config.pipeline),
                )
                .map_err(|e| anyhow::anyhow!(e))
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        _ => Vec::new(),
    };
    let sampling = job
        .config
        .sampling
        .rules(&job.config.experiments)?
        .map(Arc::new);
    let sampling_resume = match (&job.input, &restored, &sampling) {
        (Input::Kafka(kafka), Some(restored), Some(_)) => {
            sightline_sinks::state::load_window_state(
                &job.lake,
                &kafka.group_id,
                "sampling",
                restored.resume_ms,
                windows_of(&job.config.pipeline),
            )
            .map_err(|e| anyhow::anyhow!(e))?
        }
        _ => Default::default(),
    };
    let analytics = Analytics {
        resume: Vec::new(),
        rules: job.config.alerts.rules(),
        health,
        triage: job.config.triage.rules(),
        save_every_ms: state_target
            .as_ref()
            .map(|_| job.config.analytics.save_state_every_ms),
        flush: Arc::clone(&flush),
        experiments,
        sampling,
        sampling_resume,
        ..Analytics::of(funnels)
    };
    // What the run loop reads. In a cluster the sinks report to their process's first worker,
    // which forwards everything to process 0's worker 0 (`Forward`), so that process 0's lines
    // and summary are the cluster's.
    let (reports_tx, reports_rx) = mpsc::channel();
    let (sink_tx, forward_rx) = match place {
        Some(_) => {
            let (tx, rx) = mpsc::channel();
            (tx, Some(rx))
        }
        None => (reports_tx.clone(), None),
    };
    let forward_rx = Arc::new(Mutex::new(forward_rx));
    // How far process 0 has every process's reports (a cluster's process 0 only).
    let reported = Arc::new(AtomicU64::new(0));
    let main_done = Arc::new(AtomicU64::new(0));
    // A cluster's process that leaves on its own (a stop, an error): its network threads'
    // failures are then expected, and its workers' errors are collected here, since they do
    // not return (see below).
    let leaving = Arc::new(AtomicBool::new(false));
    let peer_gone = Arc::new(AtomicBool::new(false));
    let left_errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let frontiers: Arc<Vec<AtomicU64>> =
        Arc::new((0..workers).map(|_| AtomicU64::new(0)).collect());
    let watermarks: Arc<Vec<AtomicU64>> =
        Arc::new((0..workers).map(|_| AtomicU64::new(0)).collect());
    let finished = Arc::new(AtomicU64::new(0));
    // Set when a worker fails or a sink gives up: every worker stops at once, without writing
    // anything more (a restart resumes from the committed offsets).
    let abort = Arc::new(AtomicBool::new(false));
    let drain = Arc::new(Drain::new(workers));
    let health = Arc::new(SinkHealth::default());
    if let Ok(mut sinks) = telemetry.sinks.lock() {
        *sinks = Some(Arc::clone(&health));
    }
    if let Ok(mut r) = telemetry.remote.lock() {
        r.clone_from(&remote);
    }
    telemetry
        .window_ms
        .store(job.config.pipeline.window_ms, Ordering::Relaxed);
    let grace = Duration::from_millis(job.config.pipeline.shutdown_grace_ms);
    let started = Instant::now();

    let guards = {
        let (job, stats, frontiers, watermarks, finished, keys) = (
            job.clone(),
            Arc::clone(&stats),
            Arc::clone(&frontiers),
            Arc::clone(&watermarks),
            Arc::clone(&finished),
            Arc::clone(&keys),
        );
        let (abort, drain, health) = (Arc::clone(&abort), Arc::clone(&drain), Arc::clone(&health));
        let (analytics, restored, state_target) =
            (analytics.clone(), restored.clone(), state_target.clone());
        let views = sightline_sinks::board::Views {
            remote: remote.clone(),
            board: telemetry.board.clone(),
        };
        let reports_tx = std::sync::Mutex::new(reports_tx);
        let sink_tx = std::sync::Mutex::new(sink_tx);
        let (forward_rx, reported, main_done, left_errors) = (
            Arc::clone(&forward_rx),
            Arc::clone(&reported),
            Arc::clone(&main_done),
            Arc::clone(&left_errors),
        );
        let cluster = place.is_some();
        let (builders, comms) = match &place {
            None => (
                timely::CommunicationConfig::Process(workers)
                    .try_build()
                    .map_err(|e| anyhow::anyhow!("starting timely workers: {e}"))?
                    .0,
                None,
            ),
            Some(place) => {
                crate::cluster::exit_on_lost_peer(
                    place.process,
                    Arc::clone(&job.stop),
                    Arc::clone(&leaving),
                    Arc::clone(&peer_gone),
                );
                // Every value hashed with the privacy key: nothing sent reveals a value.
                let mut keyed = sightline_privacy::Pseudonymizer::new(Arc::clone(&keys));
                let fingerprint =
                    crate::cluster::fingerprint(&job.config, &mut |v| keyed.link_of(v));
                let (builders, comms) = crate::cluster::start(place, workers, &fingerprint)?;
                (builders, Some(comms))
            }
        };
        let guards = timely::execute::execute_from(
            builders,
            Box::new(()),
            timely::WorkerConfig::default(),
            move |worker| -> anyhow::Result<()> {
                let mut exit = WorkerExit {
                    finished: &finished,
                    abort: &abort,
                    failed: false,
                };
                let result = (|| {
                    let (index, peers) = (worker.index(), worker.peers());
                    // A process's workers are `process × workers + local`.
                    let local = index % workers;
                    let reader = open_reader(&job, index, peers)?;
                    let analytics = Analytics {
                        resume: restored
                            .as_ref()
                            .map(|r| r.share(index))
                            .unwrap_or_default(),
                        triage_resume: restored
                            .as_ref()
                            .map(|r| r.triage_share(index))
                            .unwrap_or_default(),
                        experiments_resume: restored
                            .as_ref()
                            .map(|r| r.experiments_share(index))
                            .unwrap_or_default(),
                        // The budgets run on worker 0, which resumes their whole state.
                        sampling_resume: if index == 0 {
                            analytics.sampling_resume.clone()
                        } else {
                            Default::default()
                        },
                        ..analytics.clone()
                    };
                    let p = &job.config.pipeline;
                    let settings = IngestSettings {
                        tick_ms: p.tick_ms,
                        lateness_ms: p.allowed_lateness_ms,
                        idle_timeout: Duration::from_millis(p.idle_timeout_ms),
                        batch_size: p.batch_size,
                        windows: windows_of(p),
                        decoders: decoders_for(&job, &keys, &analytics),
                        max_future_skew_ms: p.max_future_skew_ms,
                        drain: Arc::clone(&drain),
                    };
                    let reports = sink_tx
                        .lock()
                        .map_err(|_| anyhow::anyhow!("report channel poisoned"))?
                        .clone();
                    let dead_letter_topic =
                        topic_sink(&job, |k| k.dead_letter_topic.as_deref(), "dead-letter")?;
                    let l = &job.config.lake;
                    let outputs = Outputs {
                        lake: job.lake.clone(),
                        restricted_lake: job.lake.routed(
                            Route::Restricted.as_str(),
                            &l.restricted_prefix,
                            l.restricted_retention_days,
                        ),
                        dead_letter_topic,
                        retry: job.config.delivery.retry_policy(),
                        health: Arc::clone(&health),
                        reports,
                        state: state_target.clone(),
                        alerts_topic: topic_sink(&job, |k| k.alerts_topic.as_deref(), "alerts")?,
                        triage_topic: topic_sink(&job, |k| k.triage_topic.as_deref(), "triage")?,
                        guardrail_topic: topic_sink(
                            &job,
                            |k| k.guardrail_topic.as_deref(),
                            "guardrail",
                        )?,
                        sampling_topic: topic_sink(
                            &job,
                            |k| k.sampling_topic.as_deref(),
                            "sampling",
                        )?,
                        views: views.clone(),
                    };
                    let main_id = worker.next_dataflow_index();
                    let probes = worker.dataflow::<Time, _, _>(|scope| {
                        build(scope, reader, settings, &analytics, Arc::clone(&stats), outputs)
                    });
                    let mut forward = if cluster {
                        let to_run_loop = reports_tx
                            .lock()
                            .map_err(|_| anyhow::anyhow!("report channel poisoned"))?
                            .clone();
                        let from = if local == 0 {
                            forward_rx.lock().ok().and_then(|mut rx| rx.take())
                        } else {
                            None
                        };
                        Some(Forward::build(worker, from, to_run_loop))
                    } else {
                        None
                    };
                    let windows = windows_of(p);
                    let frontier = |p: &timely::dataflow::ProbeHandle<Time>| {
                        p.with_frontier(|f| f.first().copied().unwrap_or(u64::MAX))
                    };
                    let mut deadline = None;
                    let stopped = loop {
                        let durable = frontier(&probes.durable);
                        let mark = frontier(&probes.watermark);
                        // Windows are reported once their files are written; the saved state
                        // may follow a little later.
                        let written = frontier(&probes.written);
                        frontiers[local].store(written, Ordering::Release);
                        watermarks[local].store(mark, Ordering::Release);
                        if let Some(forward) = forward.as_mut() {
                            forward.pass(written);
                            if index == 0 {
                                reported.store(frontier(&forward.probe), Ordering::Release);
                            }
                        }
                        if abort.load(Ordering::Relaxed) {
                            break true;
                        }
                        if job.stop.load(Ordering::Relaxed) {
                            // Graceful stop: wait until every window the watermark has closed
                            // is durable and every reader has been told (its last commit, when
                            // it is dropped below, covers them), or until the grace period ends.
                            drain.request();
                            analytics.flush.store(true, Ordering::Relaxed);
                            let deadline = *deadline.get_or_insert_with(|| Instant::now() + grace);
                            let closed = if mark == u64::MAX { mark } else { windows.start_of(mark) };
                            if durable >= closed && drain.handed_at_least(closed) {
                                info!(worker = index, durable, "stopped: every closed window is written");
                                break true;
                            }
                            if Instant::now() >= deadline {
                                warn!(worker = index, durable, closed, "the shutdown grace period ended before every closed window was written; a restart writes them");
                                break true;
                            }
                        }
                        worker.step_or_park(Some(Duration::from_millis(20)));
                        if !worker.installed_dataflows().contains(&main_id) {
                            break false;
                        }
                    };
                    if stopped {
                        // Open windows are not final: drop the dataflow without closing them. Their
                        // records' offsets were never committed, so a restart reads them again.
                        for id in worker.installed_dataflows() {
                            worker.drop_dataflow(id);
                        }
                    } else {
                        frontiers[local].store(u64::MAX, Ordering::Release);
                        main_done.fetch_add(1, Ordering::AcqRel);
                        if let Some(mut forward) = forward.take()
                            && forward.input.is_some()
                        {
                            // This process's last reports and its totals, once every worker of
                            // the process is done reading.
                            let leaving = || {
                                job.stop.load(Ordering::Relaxed) || abort.load(Ordering::Relaxed)
                            };
                            while main_done.load(Ordering::Acquire) < workers as u64 {
                                if leaving() {
                                    return Ok(true);
                                }
                                forward.pass(u64::MAX);
                                worker.step_or_park(Some(Duration::from_millis(20)));
                            }
                            forward.pass(u64::MAX);
                            forward.finish(process_totals(&stats, &health));
                            // Process 0's worker 0 keeps the reports frontier up to date
                            // until every process has finished.
                            while index == 0 && worker.step_or_park(Some(Duration::from_millis(20))) {
                                if leaving() {
                                    return Ok(true);
                                }
                                reported.store(frontier(&forward.probe), Ordering::Release);
                            }
                            reported.store(u64::MAX, Ordering::Release);
                        }
                    }
                    Ok(stopped)
                })();
                exit.failed = result.is_err();
                // A cluster's process that leaves on its own (a stop, an error) keeps this
                // thread: when a worker returns, its connections say a clean goodbye, after
                // which the peers would wait for it forever. The process ends without joining
                // it, the connections break, and the peers stop (`cluster::exit_on_lost_peer`).
                let leaves = match &result {
                    Ok(stopped) => *stopped,
                    Err(_) => true,
                };
                if cluster && leaves {
                    if let Err(e) = &result
                        && let Ok(mut errors) = left_errors.lock()
                    {
                        errors.push(format!("{e:#}"));
                    }
                    drop(exit);
                    loop {
                        std::thread::park();
                    }
                }
                result.map(|_| ())
            },
        )
        .map_err(|e| anyhow::anyhow!("starting timely workers: {e}"))?;
        (guards, comms)
    };
    let (guards, comms) = guards;

    let mut progress = Progress::default();
    let mut delays = CloseDelays::new(job.config.pipeline.window_ms);
    telemetry.ready.store(true, Ordering::Release);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        // Frontiers first, then reports: every report of a window behind this frontier was
        // sent before the frontier passed it, so it is in the channel by now.
        let durable = frontiers
            .iter()
            .map(|f| f.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX);
        // In a cluster, a window's line waits for every process's reports of it.
        let release = if place.is_some() {
            reported.load(Ordering::Acquire)
        } else {
            durable
        };
        let watermark = watermarks
            .iter()
            .map(|f| f.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX);
        delays.observe(watermark, durable, &stats, &telemetry.close_delay);
        if let Some(failure) = health.failed()
            && !abort.swap(true, Ordering::Relaxed)
        {
            warn!(%failure, "a sink gave up; stopping");
        }
        if place.is_some() && abort.load(Ordering::Relaxed) {
            leaving.store(true, Ordering::Relaxed);
        }
        while let Ok(report) = reports_rx.try_recv() {
            if let Report::Alert(line) = &report {
                if job.print_windows {
                    println!("{line}");
                }
                continue;
            }
            progress.add(report);
        }
        for (start, window) in progress.release(release) {
            if job.print_windows {
                println!("{}", window_line(start, &window));
            }
        }
        telemetry.observe(&progress);
        if finished.load(Ordering::Acquire) as usize == workers {
            break;
        }
    }
    let mut errors = Vec::new();
    // A cluster's process that leaves on its own does not join its workers (they wait for the
    // process to end: see the worker closure); their errors were collected.
    let left =
        place.is_some() && (job.stop.load(Ordering::Relaxed) || abort.load(Ordering::Relaxed));
    if left {
        leaving.store(true, Ordering::Relaxed);
        std::mem::forget(guards);
        if let Ok(mut left_errors) = left_errors.lock() {
            errors.append(&mut left_errors);
        }
    } else {
        for result in guards.join() {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("{e:#}")),
                Err(panic) => errors.push(format!("worker panicked: {panic}")),
            }
        }
    }
    while let Ok(report) = reports_rx.try_recv() {
        progress.add(report);
    }
    if let Some(failure) = health.failed() {
        errors.insert(0, failure);
    }
    // The network threads end once every process has ended cleanly; after a stop or an error
    // the other processes may still run: this process ends without waiting for them (they
    // lose their peer and stop too).
    if let Some(comms) = comms {
        if left || !errors.is_empty() {
            comms.leave();
        } else {
            comms.finish();
        }
    }
    // A cluster stopped as a whole: the other processes give process 0, which reports the
    // cluster's windows, a few seconds to go first (its peers then stop quietly instead of it).
    if let Some(place) = &place
        && left
        && place.process != 0
        && job.stop.load(Ordering::Relaxed)
    {
        let until = Instant::now() + grace.min(Duration::from_secs(5));
        while !peer_gone.load(Ordering::Relaxed) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if !job.stop.load(Ordering::Relaxed) && !abort.load(Ordering::Relaxed) {
        for (start, window) in progress.release(u64::MAX) {
            if job.print_windows {
                println!("{}", window_line(start, &window));
            }
        }
    }
    if let Some(first) = errors.first() {
        return Err(anyhow::anyhow!("{first}")).context(format!(
            "the pipeline stopped on an error ({} error(s))",
            errors.len()
        ));
    }
    // The metrics store gets what is queued (for a while: it is not part of the durability
    // frontier, so a stop does not wait for it forever).
    let remote_write = remote.map(|r| {
        let limit = Duration::from_millis(job.config.metrics_store.finish_timeout_ms);
        if !r.finish(limit) {
            warn!(
                queued = r.queued(),
                "remote-write: the metrics store did not take every sample before the stop"
            );
        }
        let (sent, retries, rejected, dropped) = r.stats().snapshot();
        (sent, rejected, dropped, r.queued() as u64, retries)
    });
    telemetry.observe(&progress);
    // Process 0 of a cluster sums every process's totals.
    let totals = progress
        .processes
        .map_or_else(|| process_totals(&stats, &health), |(_, sum)| sum);
    let t = &progress.totals;
    let summary = Summary {
        read: totals.read,
        accepted: totals.accepted,
        rejected: totals.rejected,
        late: totals.late,
        windows: progress.windows,
        files: t.files,
        rows: t.rows,
        bytes: t.bytes,
        already_written: totals.already_written,
        retries: totals.retries,
        remote_write,
        cluster: place.as_ref().map(|p| {
            let n = p.addresses.len();
            let whole = progress
                .processes
                .is_some_and(|(reported, _)| reported == n);
            (p.process, n, whole)
        }),
    };
    info!(elapsed_ms = started.elapsed().as_millis() as u64, %summary, "run finished");
    Ok(summary)
}
