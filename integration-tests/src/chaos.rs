//! The chaos harness: the real `sightline` binary against a real broker, killed, paused,
//! starved and restarted, and what it wrote compared with an uninterrupted run.
//!
//! It is built to be extended rather than copied:
//! - a [`Workload`] says what is produced (topic, partitions, events, seed); a later operator
//!   that needs other events adds fields to it;
//! - [`snapshot`] reads *every* Parquet file of a lake, by its deterministic path, so a new
//!   table is compared without any change here;
//! - [`Deployment::output_topics`] lists the topics a run produces to; [`topic_conflicts`]
//!   checks the output-topic contract on each.
//!
//! Every random choice comes from a printed seed ([`seed`]), so that a failure can be
//! reproduced with `SIGHTLINE_CHAOS_SEED=<seed>`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};
use sightline::generator::{Generator, GeneratorConfig};

use crate::parquet_text;

/// The pseudonymization key of every test run.
pub const TEST_KEY: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

/// The seed of this test run: `SIGHTLINE_CHAOS_SEED` if set, else the clock. Printed, so that
/// a failing run can be repeated.
pub fn seed(what: &str) -> u64 {
    let seed = std::env::var("SIGHTLINE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_ms() as u64);
    println!("{what}: seed {seed} (repeat with SIGHTLINE_CHAOS_SEED={seed})");
    seed
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A small deterministic random sequence (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A sequence from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `[low, high)`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low).max(1)
    }
}

/// What is produced to the input topic.
#[derive(Clone, Debug)]
pub struct Workload {
    /// The input topic.
    pub topic: String,
    /// Its partitions; events go round-robin, so each partition's order is fixed.
    pub partitions: i32,
    /// How many records.
    pub events: usize,
    /// The generator's seed.
    pub seed: u64,
    /// The event time of the first event, ms since the epoch.
    pub start_ms: i64,
    /// Events per second of event time.
    pub events_per_second: f64,
    /// Fraction of broken records (dead letters).
    pub bad_fraction: f64,
    /// Fraction of events held back 30–120 s (late ones).
    pub late_fraction: f64,
    /// Out-of-order jitter, ms.
    pub jitter_ms: u64,
    /// Partition `p` gets `weights[p]` records per round (all 1 if empty): an uneven backlog.
    pub weights: Vec<usize>,
}

impl Workload {
    /// `events` generated events on `partitions` partitions of `topic`, event times starting
    /// ten minutes ago (so that every window is closed by the wall clock once the input is
    /// read), with some broken and some late records.
    pub fn new(topic: &str, partitions: i32, events: usize, seed: u64) -> Workload {
        Workload {
            topic: topic.to_owned(),
            partitions,
            events,
            seed,
            start_ms: now_ms() - 600_000,
            events_per_second: 1_000.0,
            bad_fraction: 0.01,
            late_fraction: 0.002,
            jitter_ms: 400,
            weights: Vec::new(),
        }
    }

    /// The records, each with its partition.
    pub fn records(&self) -> Vec<(i32, Vec<u8>)> {
        let mut generator = Generator::new(GeneratorConfig {
            seed: self.seed,
            start_ms: self.start_ms,
            events_per_second: self.events_per_second,
            late_fraction: self.late_fraction,
            bad_fraction: self.bad_fraction,
            jitter_ms: self.jitter_ms,
            ..GeneratorConfig::default()
        });
        let schedule: Vec<i32> = (0..self.partitions)
            .flat_map(|p| {
                let w = self.weights.get(p as usize).copied().unwrap_or(1);
                std::iter::repeat_n(p, w)
            })
            .collect();
        (0..self.events)
            .map(|i| {
                let mut line = Vec::new();
                generator.next_line(&mut line);
                (schedule[i % schedule.len()], line)
            })
            .collect()
    }

    /// Produces [`Workload::records`], in order, one record per record batch: tansu 0.6
    /// skips the rest of a batch when asked to fetch from inside it (see DESIGN.md), so every
    /// offset a restart may resume at must start a batch. [`Workload::check_resume`] checks
    /// that it does.
    pub fn produce(&self, bootstrap: &str) {
        self.produce_paced(bootstrap, None);
    }

    /// [`Workload::produce`], at most `rate` records per second if given (a live run).
    pub fn produce_paced(&self, bootstrap: &str, rate: Option<f64>) {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", "0")
            .set("batch.num.messages", "1")
            .set("enable.idempotence", "true")
            .create()
            .expect("producer");
        let started = Instant::now();
        for (i, (partition, line)) in self.records().into_iter().enumerate() {
            if let Some(rate) = rate {
                let due = Duration::from_secs_f64(i as f64 / rate);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            let key = i.to_string();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let record = BaseRecord::to(&self.topic)
                    .partition(partition)
                    .payload(&line)
                    .key(&key);
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                        if Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err((err, _)) => panic!("producing record {i} to {}: {err}", self.topic),
                }
            }
        }
        // The broker may take a while with every record its own request (a 10× burst on a
        // busy two-core machine has taken more than a minute): wait as long as the records
        // still leave, and give up only when none has left for a whole minute.
        let (mut waiting, mut since) = (producer.in_flight_count(), Instant::now());
        while let Err(err) = producer.flush(Duration::from_secs(10)) {
            let now = producer.in_flight_count();
            if now < waiting {
                (waiting, since) = (now, Instant::now());
            }
            assert!(
                since.elapsed() < Duration::from_secs(60),
                "flush: {err}: {now} records to {} have not left for a minute",
                self.topic
            );
        }
    }

    /// Checks, at `probes` offsets per partition, that a consumer asked to start there gets
    /// exactly that record first: the broker resumes where a restart asks it to.
    pub fn check_resume(&self, bootstrap: &str, rng: &mut Rng, probes: usize) {
        let per_partition = self.events as i64 / i64::from(self.partitions.max(1));
        for partition in 0..self.partitions {
            for _ in 0..probes {
                let offset = rng.between(0, per_partition.max(1) as u64) as i64;
                let consumer: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", bootstrap)
                    .set("group.id", "sightline-chaos-probe")
                    .set("enable.auto.commit", "false")
                    .create()
                    .expect("consumer");
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                    .expect("tpl");
                consumer.assign(&tpl).expect("assign");
                let deadline = Instant::now() + Duration::from_secs(20);
                let first = loop {
                    assert!(
                        Instant::now() < deadline,
                        "no record from {partition}@{offset}"
                    );
                    if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                        break m.offset();
                    }
                };
                assert_eq!(
                    first, offset,
                    "the broker resumed {}[{partition}] at {first}, not at {offset}",
                    self.topic
                );
            }
        }
    }
}

/// One deployment of the pipeline: its configuration file, lake, consumer group and output
/// topics, under a directory of the test.
#[derive(Clone, Debug)]
pub struct Deployment {
    /// The configuration file.
    pub config: PathBuf,
    /// The lake directory.
    pub lake: PathBuf,
    /// Where each process's standard error is appended.
    pub log: PathBuf,
    /// The consumer group.
    pub group: String,
    /// The topics it produces to: the dead letters, the alerts, the triage items, the
    /// guardrail decisions and the sampling-rate tables.
    pub output_topics: Vec<String>,
}

impl Deployment {
    /// A deployment named `name` reading `workload`'s topic with `workers` workers: 2 s
    /// windows, 1 s lateness and idle timeout, offsets committed at every chance, a
    /// dead-letter topic `<name>.dlq`, an alerts topic `<name>.alerts`, a triage topic
    /// `<name>.triage`, a guardrail topic `<name>.guardrail` and a sampling topic `<name>.sampling` (which the caller creates), the
    /// generator's experiments analysed with the defaults, and two funnels with 20 s
    /// and 30 s conversion windows whose state is saved every 4 s of event time. `extra` is appended to the
    /// configuration (TOML: more keys of the `[pipeline]` table first, then other tables).
    pub fn new(
        dir: &Path,
        name: &str,
        bootstrap: &str,
        workload: &Workload,
        workers: usize,
        extra: &str,
    ) -> Deployment {
        let root = dir.join(name);
        std::fs::create_dir_all(&root).expect("deployment dir");
        let lake = root.join("lake");
        let config = root.join("sightline.toml");
        let group = format!("sightline-{name}-{}", workload.seed);
        let dlq = format!("{name}.dlq");
        let alerts = format!("{name}.alerts");
        let triage = format!("{name}.triage");
        let guardrail = format!("{name}.guardrail");
        let sampling = format!("{name}.sampling");
        let mut file = std::fs::File::create(&config).expect("config");
        write!(
            file,
            r#"[pipeline]
workers = {workers}
window-ms = 2000
allowed-lateness-ms = 1000
idle-timeout-ms = 1000
{extra}

[kafka]
bootstrap-servers = "{bootstrap}"
group-id = "{group}"
topics = [{{ name = "{topic}" }}]
dead-letter-topic = "{dlq}"
alerts-topic = "{alerts}"
triage-topic = "{triage}"
guardrail-topic = "{guardrail}"
sampling-topic = "{sampling}"
commit-interval-ms = 0

[lake]
location = "{lake}"

[privacy]
key = "{TEST_KEY}"

# Funnels whose conversion windows span many 2 s windows, so that their chains, and the
# state that follows them, span restarts; their state is saved every two windows.
[analytics]
save-state-every-ms = 4000

[[funnels]]
name = "quick_projects"
unit = "user_id"
steps = ["project_viewed", "project_created", "task_assigned"]
conversion-window-ms = 20000
breakdowns = ["experiments", "platform"]

[[funnels]]
name = "quick_recommendations"
unit = "properties.recommendation_id"
steps = ["recommendation_generated", "recommendation_accepted", "action_executed", "outcome_reply_received"]
conversion-window-ms = 30000
"#,
            topic = workload.topic,
            lake = lake.display(),
        )
        .expect("write config");
        Deployment {
            config,
            lake,
            log: root.join("stderr.log"),
            group,
            output_topics: vec![dlq, alerts, triage, guardrail, sampling],
        }
    }

    /// Starts `sightline run` on this deployment.
    pub fn start(&self) -> Process {
        self.start_with_env(&[])
    }

    /// Starts `sightline run` on this deployment with environment variables added (for
    /// example `SIGHTLINE__CLUSTER__PROCESS`: one process of a cluster).
    pub fn start_with_env(&self, env: &[(&str, String)]) -> Process {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let log_from = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(sightline_binary())
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("SIGHTLINE_LOG", "warn,sightline_ingest=info,sightline=info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting sightline");
        Process {
            child,
            started: Instant::now(),
            log: self.log.clone(),
            log_from,
        }
    }

    /// Waits until the lake counts `records` records (every window of the input written),
    /// while `process` runs; panics with the log's tail otherwise, or as soon as the count has
    /// not moved for 45 s.
    pub fn wait_for_records(&self, process: &mut Process, records: usize, timeout: Duration) {
        wait_for_lake(&self.lake, records, timeout, || {
            match process.child.try_wait() {
                Ok(Some(status)) => Err(format!("sightline exited ({status})")),
                _ => Ok(()),
            }
        })
        .unwrap_or_else(|why| panic!("{why}\n{}", self.log_tail()));
    }

    /// The last lines of the deployment's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// Waits until the lake at `lake` counts `records` records (every window of the input
/// written), checking `running` (an `Err` says the pipeline has ended) as it goes. Fails with
/// the reason if the pipeline ends, if the count has not moved for 45 s, or after `timeout`;
/// panics if more records are counted than were produced.
pub fn wait_for_lake(
    lake: &Path,
    records: usize,
    timeout: Duration,
    mut running: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last = (-1, Instant::now());
    loop {
        let counted = records_counted(&snapshot(lake));
        if counted >= records as i64 {
            assert_eq!(
                counted, records as i64,
                "more records counted than produced"
            );
            return Ok(());
        }
        if counted != last.0 {
            last = (counted, Instant::now());
        }
        if last.1.elapsed() >= Duration::from_secs(45) {
            return Err(format!("stuck at {counted} of {records} records counted"));
        }
        running().map_err(|why| format!("{counted} of {records} records counted: {why}"))?;
        if Instant::now() >= deadline {
            return Err(format!(
                "only {counted} of {records} records counted after {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `sightline` binary of this build: `SIGHTLINE_BIN`, or next to the test executable's
/// directory (cargo and nextest build it with the workspace's tests).
pub fn sightline_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("SIGHTLINE_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join("sightline");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin
}

/// A running `sightline` process.
#[derive(Debug)]
pub struct Process {
    child: Child,
    /// When it was started.
    pub started: Instant,
    /// The log it writes to (shared with the deployment's earlier processes) …
    log: PathBuf,
    /// … from this byte on.
    log_from: u64,
}

impl Process {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and waits for it to be gone.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and waits up to `timeout` for it to exit; returns its status and how long it
    /// took (it is killed, and the test fails, if it does not exit in time).
    pub fn terminate(mut self, timeout: Duration) -> (ExitStatus, Duration) {
        self.wait_until_stoppable(timeout);
        signal(self.pid(), "TERM");
        let asked = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (status, asked.elapsed());
            }
            if asked.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("sightline did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the process handles stop signals (its log says so): a SIGTERM before that
    /// ends it at once, as it would any process, which is not what a test of a clean stop means.
    fn wait_until_stoppable(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read(&self.log).unwrap_or_default();
            let ours = &text[(self.log_from as usize).min(text.len())..];
            if String::from_utf8_lossy(ours).contains(sightline::run::STOP_HANDLED) {
                return;
            }
            if self.exited().is_some() || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Its peak resident memory so far, KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `SIG<name>` to `pid` with `kill(1)`.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill(1)");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// Every Parquet file of a lake, by its path relative to the lake, with its rows as sorted
/// `column=value | …` lines. Windows have deterministic file names, so two lakes that hold the
/// same windows hold the same paths.
pub fn snapshot(lake: &Path) -> BTreeMap<String, Vec<String>> {
    let mut files = Vec::new();
    collect_parquet(lake, &mut files);
    files
        .into_iter()
        .filter_map(|file| {
            let bytes = std::fs::read(&file).ok()?;
            let (rows, _) = parquet_text::read(bytes.into());
            let mut lines: Vec<String> = rows.iter().map(|r| parquet_text::line(r)).collect();
            lines.sort();
            let name = file.strip_prefix(lake).ok()?.display().to_string();
            Some((name, lines))
        })
        .collect()
}

fn collect_parquet(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_parquet(&path, out);
        } else if path.extension().is_some_and(|e| e == "parquet") {
            out.push(path);
        }
    }
}

/// Records counted in the `quality` tables of a snapshot (both routes): every record the
/// pipeline read, accepted, late or rejected, is counted once in the window it went to.
pub fn records_counted(snapshot: &BTreeMap<String, Vec<String>>) -> i64 {
    const PRIVACY_COUNTERS: [&str; 4] = [
        "\"pseudonymized_fields\"",
        "\"scrubbed_fields\"",
        "\"dropped_fields\"",
        "\"pii_violations\"",
    ];
    snapshot
        .iter()
        .filter(|(path, _)| path.starts_with("quality/") || path.starts_with("restricted/quality/"))
        .flat_map(|(_, rows)| rows)
        .filter_map(|row| {
            let cell = |name: &str| {
                row.split(" | ")
                    .find_map(|c| c.strip_prefix(&format!("{name}=")))
                    .map(str::to_owned)
            };
            let outcome = cell("outcome")?;
            if PRIVACY_COUNTERS.contains(&outcome.as_str()) {
                return None;
            }
            cell("count")?.parse::<i64>().ok()
        })
        .sum()
}

/// The first difference between two snapshots, described; `None` if they are equal.
pub fn difference(
    expected: &BTreeMap<String, Vec<String>>,
    actual: &BTreeMap<String, Vec<String>>,
) -> Option<String> {
    for (path, rows) in expected {
        match actual.get(path) {
            None => return Some(format!("{path}: missing")),
            Some(got) if got != rows => {
                let missing: Vec<&String> = rows.iter().filter(|r| !got.contains(r)).collect();
                let extra: Vec<&String> = got.iter().filter(|r| !rows.contains(r)).collect();
                return Some(format!(
                    "{path}: {} rows expected, {} found; first missing {:?}; first extra {:?}",
                    rows.len(),
                    got.len(),
                    missing.first(),
                    extra.first()
                ));
            }
            Some(_) => {}
        }
    }
    actual
        .keys()
        .find(|path| !expected.contains_key(*path))
        .map(|path| format!("{path}: not in the expected lake"))
}

/// Reads all of `topic` (one partition or more) and returns each key with its values, in the
/// order read.
pub fn read_topic(bootstrap: &str, topic: &str, partitions: i32) -> BTreeMap<String, Vec<String>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "sightline-chaos-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ended = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ended.len() < partitions as usize && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let value = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                out.entry(key).or_default().push(value);
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ended.insert(p);
            }
            _ => {}
        }
    }
    out
}

/// The records of a topic whose key is not the whole identity of a record (the sampling
/// topic's key is the segment, so that compaction keeps the latest table): re-keyed by key and
/// `version`, which is.
pub fn by_version(records: BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, values) in records {
        for value in values {
            let version = serde_json::from_str::<serde_json::Value>(&value)
                .ok()
                .and_then(|v| v["version"].as_u64())
                .unwrap_or_default();
            out.entry(format!("{key}@v{version}"))
                .or_default()
                .push(value);
        }
    }
    out
}

/// The keys of `records` that carry two different values: what the output-topic contract
/// forbids (a repeat must repeat the same value).
pub fn topic_conflicts(records: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    records
        .iter()
        .filter(|(_, values)| values.iter().any(|v| v != &values[0]))
        .map(|(key, values)| format!("{key}: {values:?}"))
        .collect()
}
