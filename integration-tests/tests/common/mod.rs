//! Shared helpers of the integration tests: reading the lake back with a real Parquet reader,
//! and an independent reference computation of every table.

#![allow(dead_code)]

pub mod kafka;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arrow_array::{
    Array, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sightline::config::Config;
use sightline::generator::{Generator, GeneratorConfig, LineKind};
use sightline::run::{Input, Job, Summary, run};

/// What the reference knows of a rejected line: the event name it is counted under (None →
/// `unknown`) and its failure kind; `None` for a valid line.
pub type Failure = Option<(Option<String>, String)>;

pub const WINDOW_MS: u64 = 10_000;
pub const LATENESS_MS: u64 = 10_000;
pub const TICK_MS: u64 = 1_000;

/// A test configuration: 10 s windows, 10 s lateness, `workers` threads.
pub fn config(workers: usize) -> Config {
    let mut config = Config::default();
    config.pipeline.workers = workers;
    config.pipeline.window_ms = WINDOW_MS;
    config.pipeline.allowed_lateness_ms = LATENESS_MS;
    config.pipeline.tick_ms = TICK_MS;
    config.pipeline.batch_size = 97;
    config.privacy.key = Some(TEST_KEY.into());
    config
}

/// The tests' pseudonymization secret (configured like a deployment's, never built in).
pub const TEST_KEY: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

/// Generated lines with what the generator meant each to be.
pub fn generate(events: usize, seed: u64, bad: f64, late: f64) -> Vec<(Vec<u8>, LineKind)> {
    let mut generator = Generator::new(GeneratorConfig {
        seed,
        bad_fraction: bad,
        late_fraction: late,
        events_per_second: 500.0,
        ..GeneratorConfig::default()
    });
    (0..events)
        .map(|_| {
            let mut line = Vec::new();
            let kind = generator.next_line(&mut line);
            (line, kind)
        })
        .collect()
}

/// Writes lines as an NDJSON file.
pub fn write_ndjson(path: &Path, lines: &[(Vec<u8>, LineKind)]) {
    let mut bytes = Vec::new();
    for (line, _) in lines {
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
    }
    std::fs::write(path, bytes).expect("writing the input");
}

/// Replays a file through the library with the given configuration.
pub fn replay(input: &Path, lake_dir: &Path, config: Config) -> Summary {
    let lake = sightline_sinks::Lake::open(lake_dir.to_str().expect("utf-8")).expect("lake");
    let job = Job {
        config,
        input: Input::Ndjson(input.to_str().expect("utf-8").into()),
        lake,
        stop: Arc::new(AtomicBool::new(false)),
        print_windows: false,
        format: Default::default(),
    };
    run(job).expect("replay")
}

/// Every Parquet file under `dir`, recursively.
pub fn parquet_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            parquet_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "parquet") {
            out.push(path);
        }
    }
}

/// Every record batch of a table, read with the Parquet reader.
pub fn read_table(lake_dir: &Path, table: &str) -> Vec<RecordBatch> {
    let mut files = Vec::new();
    parquet_files(&lake_dir.join(table), &mut files);
    files.sort();
    let mut batches = Vec::new();
    for file in files {
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&file).expect("open"))
                .expect("parquet")
                .build()
                .expect("reader");
        batches.extend(reader.map(|b| b.expect("batch")));
    }
    batches
}

fn col<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> &'a T {
    batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("column {name}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap_or_else(|| panic!("type of {name}"))
}

fn s(batch: &RecordBatch, name: &str, i: usize) -> String {
    col::<StringArray>(batch, name).value(i).to_string()
}

fn ws(batch: &RecordBatch, i: usize) -> u64 {
    (col::<TimestampMicrosecondArray>(batch, "window_start").value(i) / 1000) as u64
}

/// `event_counts` as (window start ms, name, type, area) → count.
pub fn event_counts(lake_dir: &Path) -> BTreeMap<(u64, String, String, String), i64> {
    let mut out = BTreeMap::new();
    for b in read_table(lake_dir, "event_counts") {
        for i in 0..b.num_rows() {
            let key = (
                ws(&b, i),
                s(&b, "event_name", i),
                s(&b, "event_type", i),
                s(&b, "feature_area", i),
            );
            assert!(
                out.insert(key, col::<Int64Array>(&b, "count").value(i))
                    .is_none(),
                "duplicate event_counts row"
            );
        }
    }
    out
}

/// A latency row's measures: count, mean, p50, p90, p95, p99, max (ms).
pub type Stats = (i64, [f64; 6]);

fn stats(b: &RecordBatch, i: usize) -> Stats {
    let f = |n: &str| col::<Float64Array>(b, n).value(i);
    (
        col::<Int64Array>(b, "count").value(i),
        [
            f("mean_ms"),
            f("p50_ms"),
            f("p90_ms"),
            f("p95_ms"),
            f("p99_ms"),
            f("max_ms"),
        ],
    )
}

/// A latency table as (window start, name, first dimension, second dimension) → stats.
fn latency_table(
    lake_dir: &Path,
    table: &str,
    dims: [&str; 2],
) -> BTreeMap<(u64, String, String, String), Stats> {
    let mut out = BTreeMap::new();
    for b in read_table(lake_dir, table) {
        for i in 0..b.num_rows() {
            let key = (
                ws(&b, i),
                s(&b, "event_name", i),
                s(&b, dims[0], i),
                s(&b, dims[1], i),
            );
            assert!(
                out.insert(key, stats(&b, i)).is_none(),
                "duplicate {table} row"
            );
        }
    }
    out
}

/// `latency` as (window start, name, area, surface) → stats.
pub fn latency(lake_dir: &Path) -> BTreeMap<(u64, String, String, String), Stats> {
    latency_table(lake_dir, "latency", ["feature_area", "surface"])
}

/// `latency_by_variant` as (window start, name, experiment, variant) → stats.
pub fn latency_by_variant(lake_dir: &Path) -> BTreeMap<(u64, String, String, String), Stats> {
    latency_table(lake_dir, "latency_by_variant", ["experiment_id", "variant"])
}

/// The privacy counters among `quality`'s outcomes.
pub const PRIVACY_COUNTERS: [&str; 4] = [
    "pseudonymized_fields",
    "scrubbed_fields",
    "dropped_fields",
    "pii_violations",
];

fn quality_rows(lake_dir: &Path) -> BTreeMap<(u64, String, String), i64> {
    let mut out = BTreeMap::new();
    for b in read_table(lake_dir, "quality") {
        for i in 0..b.num_rows() {
            let key = (ws(&b, i), s(&b, "event_name", i), s(&b, "outcome", i));
            assert!(
                out.insert(key, col::<Int64Array>(&b, "count").value(i))
                    .is_none(),
                "duplicate quality row"
            );
        }
    }
    out
}

/// `quality`'s record outcomes (accepted, late, failure kinds) as (window start, name,
/// outcome) → count; the privacy counters are left out (see [`privacy_counters`]).
pub fn quality(lake_dir: &Path) -> BTreeMap<(u64, String, String), i64> {
    quality_rows(lake_dir)
        .into_iter()
        .filter(|(k, _)| !PRIVACY_COUNTERS.contains(&k.2.as_str()))
        .collect()
}

/// `quality`'s privacy counters, summed over windows and event names: counter → total.
pub fn privacy_counters(lake_dir: &Path) -> BTreeMap<String, i64> {
    quality_rows(lake_dir)
        .into_iter()
        .filter(|(k, _)| PRIVACY_COUNTERS.contains(&k.2.as_str()))
        .fold(BTreeMap::new(), |mut m, (k, n)| {
            *m.entry(k.2).or_default() += n;
            m
        })
}

/// The two routes of a lake: the standard one at its root, the restricted one under
/// `restricted/`.
pub fn routes(lake_dir: &Path) -> [PathBuf; 2] {
    [lake_dir.to_path_buf(), lake_dir.join("restricted")]
}

/// Records counted in `quality` over both routes.
pub fn records_counted(lake_dir: &Path) -> i64 {
    routes(lake_dir)
        .iter()
        .map(|r| quality(r).values().sum::<i64>())
        .sum()
}

/// Dead letters of both routes.
pub fn all_dead_letters(lake_dir: &Path) -> BTreeMap<(String, i32, i64), SeenDeadLetter> {
    routes(lake_dir)
        .iter()
        .flat_map(|r| dead_letters(r))
        .collect()
}

/// A `dead_letter` row as read back.
#[derive(Clone, Debug)]
pub struct SeenDeadLetter {
    /// Failure kind.
    pub kind: String,
    /// The reason.
    pub reason: String,
    /// The violations, a JSON array.
    pub violations: Vec<serde_json::Value>,
    /// The redacted payload.
    pub payload: Option<String>,
}

impl SeenDeadLetter {
    /// The reason followed by the violations, as a reader sees them.
    pub fn explained(&self) -> String {
        format!(
            "{} {}",
            self.reason,
            serde_json::Value::from(self.violations.clone())
        )
    }
}

/// `dead_letter` as ((topic, partition, offset) → the row).
pub fn dead_letters(lake_dir: &Path) -> BTreeMap<(String, i32, i64), SeenDeadLetter> {
    let mut out = BTreeMap::new();
    for b in read_table(lake_dir, "dead_letter") {
        for i in 0..b.num_rows() {
            let offset = col::<Int64Array>(&b, "offset").value(i);
            let partition = col::<arrow_array::Int32Array>(&b, "partition").value(i);
            let topic = s(&b, "topic", i);
            let payload = col::<StringArray>(&b, "payload");
            let seen = SeenDeadLetter {
                kind: s(&b, "kind", i),
                reason: s(&b, "reason", i),
                violations: serde_json::from_str(&s(&b, "violations", i)).expect("a JSON array"),
                payload: payload.is_valid(i).then(|| payload.value(i).to_owned()),
            };
            assert!(
                out.insert((topic, partition, offset), seen).is_none(),
                "duplicate dead letter at {partition}/{offset}"
            );
        }
    }
    out
}

/// The latency field of each event and its unit in ms, written down here independently of
/// the pipeline's catalog.
fn latency_field(name: &str) -> Option<(&'static str, f64)> {
    Some(match name {
        "project_viewed" => ("time_to_first_paint_ms", 1.0),
        "project_created" | "action_executed" | "integration_call_success" => ("duration_ms", 1.0),
        "task_assigned" => ("assignment_latency_ms", 1.0),
        "recommendation_accepted" => ("time_to_decision_seconds", 1000.0),
        "signal_processed" => ("processing_duration_ms", 1.0),
        _ => return None,
    })
}

/// The aggregates of one route.
#[derive(Debug, Default)]
pub struct Aggregates {
    pub counts: BTreeMap<(u64, String, String, String), i64>,
    pub latency: BTreeMap<(u64, String, String, String), Vec<u64>>,
    pub variants: BTreeMap<(u64, String, String, String), Vec<u64>>,
    pub quality: BTreeMap<(u64, String, String), i64>,
}

/// Whether a record goes to the restricted route, decided from its raw JSON as documented:
/// `data_sensitivity: restricted` or `pii_classification: high` (records that are not JSON
/// objects stay on the standard route).
fn restricted(line: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
        return false;
    };
    v["data_sensitivity"] == "restricted" || v["pii_classification"] == "high"
}

/// The reference: every table computed from scratch with serde_json and chrono, following the
/// documented rules (per-worker round-robin lines, watermark = newest − lateness, dead letters
/// at the tick of the newest accepted event before them, or of the first one after, records
/// routed by their declared sensitivity).
#[derive(Debug, Default)]
pub struct Reference {
    /// The standard route.
    pub standard: Aggregates,
    /// The restricted route.
    pub restricted: Aggregates,
    /// Offsets (line numbers) of dead letters, with the expected kind when the test knows it.
    pub dead: BTreeSet<i64>,
    pub accepted: u64,
    pub late: u64,
    pub rejected: u64,
}

impl Reference {
    /// `lines`: raw line and whether it is a valid event; `rejected_name`: the event name a
    /// rejected line is counted under in `quality` (None → `unknown`), with its failure kind.
    pub fn compute(lines: &[(Vec<u8>, Failure)], workers: usize) -> Reference {
        Reference::compute_with(lines, workers, WINDOW_MS, LATENESS_MS)
    }

    /// [`Reference::compute`] with other windows and lateness.
    pub fn compute_with(
        lines: &[(Vec<u8>, Failure)],
        workers: usize,
        window_ms: u64,
        lateness_ms: u64,
    ) -> Reference {
        let window = |ms: u64| ms - ms % window_ms;
        let mut r = Reference::default();
        for worker in 0..workers {
            let mut newest: Option<u64> = None;
            let mut waiting: Vec<(String, String, bool)> = Vec::new();
            for (offset, (line, failure)) in lines
                .iter()
                .enumerate()
                .filter(|(i, _)| i % workers == worker)
            {
                let route_restricted = restricted(line);
                fn pick(r: &mut Reference, restricted: bool) -> &mut Aggregates {
                    if restricted {
                        &mut r.restricted
                    } else {
                        &mut r.standard
                    }
                }

                let outcome: Result<serde_json::Value, (String, String)> = match failure {
                    Some((name, kind)) => Err((
                        name.clone().unwrap_or_else(|| "unknown".into()),
                        kind.clone(),
                    )),
                    None => Ok(serde_json::from_slice(line).expect("valid line is JSON")),
                };
                let value = match outcome {
                    Err((name, kind)) => {
                        r.rejected += 1;
                        r.dead.insert(offset as i64);
                        match newest {
                            Some(n) => {
                                *pick(&mut r, route_restricted)
                                    .quality
                                    .entry((window(n), name, kind))
                                    .or_default() += 1
                            }
                            None => waiting.push((name, kind, route_restricted)),
                        }
                        continue;
                    }
                    Ok(v) => v,
                };
                let name = value["event_name"].as_str().expect("name").to_string();
                let ts = chrono::DateTime::parse_from_rfc3339(
                    value["timestamp"].as_str().expect("timestamp"),
                )
                .expect("rfc3339");
                let t = ts.timestamp_millis() as u64;
                let watermark = newest.map_or(0, |n| n.saturating_sub(lateness_ms));
                if t < watermark {
                    r.late += 1;
                    r.dead.insert(offset as i64);
                    *pick(&mut r, route_restricted)
                        .quality
                        .entry((window(newest.unwrap_or(0)), name, "late".into()))
                        .or_default() += 1;
                    continue;
                }
                r.accepted += 1;
                newest = Some(newest.map_or(t, |n| n.max(t)));
                for (n, kind, in_restricted) in waiting.drain(..) {
                    let q = if in_restricted {
                        &mut r.restricted.quality
                    } else {
                        &mut r.standard.quality
                    };
                    *q.entry((window(t), n, kind)).or_default() += 1;
                }
                let w = window(t);
                let area = value["feature_area"].as_str().expect("area").to_string();
                let a = pick(&mut r, route_restricted);
                *a.counts
                    .entry((
                        w,
                        name.clone(),
                        value["event_type"].as_str().expect("type").to_string(),
                        area.clone(),
                    ))
                    .or_default() += 1;
                *a.quality
                    .entry((w, name.clone(), "accepted".into()))
                    .or_default() += 1;
                if let Some((field, scale)) = latency_field(&name)
                    && let Some(v) = value["properties"][field].as_f64()
                {
                    let us = (v * scale * 1000.0).round() as u64;
                    let surface = value["surface"].as_str().unwrap_or_default().to_string();
                    a.latency
                        .entry((w, name.clone(), area, surface))
                        .or_default()
                        .push(us);
                    if let Some(map) = value["experiment_assignments"].as_object() {
                        for (experiment, variant) in map {
                            a.variants
                                .entry((
                                    w,
                                    name.clone(),
                                    experiment.clone(),
                                    variant.as_str().expect("variant").to_string(),
                                ))
                                .or_default()
                                .push(us);
                        }
                    }
                }
            }
        }
        r
    }
}

/// Asserts that one route of the lake holds exactly the reference's aggregates: counts and
/// record outcomes exact, latency counts exact and quantiles within 1%.
pub fn assert_route_matches(route_dir: &Path, want: &Aggregates) {
    let what = route_dir.display();
    assert_maps_eq(
        &event_counts(route_dir),
        &want.counts,
        &format!("event_counts of {what}"),
    );
    assert_maps_eq(
        &quality(route_dir),
        &want.quality,
        &format!("quality of {what}"),
    );
    let got = latency(route_dir);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.latency.keys().collect::<Vec<_>>(),
        "latency keys of {what}"
    );
    for (key, samples) in &want.latency {
        assert_stats(key, &got[key], samples);
    }
    let got = latency_by_variant(route_dir);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.variants.keys().collect::<Vec<_>>(),
        "latency_by_variant keys of {what}"
    );
    for (key, samples) in &want.variants {
        assert_stats(key, &got[key], samples);
    }
}

/// Asserts that a latency row matches the samples: exact count and mean, quantiles within 1%.
pub fn assert_stats(key: &impl std::fmt::Debug, got: &Stats, samples: &[u64]) {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    assert_eq!(got.0, n as i64, "count of {key:?}");
    let mean = sorted.iter().map(|&s| s as f64).sum::<f64>() / n as f64 / 1000.0;
    assert!(
        (got.1[0] - mean).abs() <= 1e-9 * mean.max(1.0),
        "mean of {key:?}: {} vs {mean}",
        got.1[0]
    );
    for (i, q) in [0.5, 0.9, 0.95, 0.99, 1.0].into_iter().enumerate() {
        let exact = sorted[(q * (n - 1) as f64).floor() as usize] as f64 / 1000.0;
        let value = got.1[i + 1];
        assert!(
            (value - exact).abs() <= 0.01 * exact + 1e-9,
            "q{q} of {key:?}: {value} vs exact {exact}"
        );
    }
}

/// Asserts two maps are equal, printing only the keys that differ.
pub fn assert_maps_eq<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    got: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    what: &str,
) {
    let mut diffs = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            Some(g) if g == v => {}
            other => diffs.push(format!("{k:?}: got {other:?}, want {v:?}")),
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            diffs.push(format!("{k:?}: got {g:?}, want nothing"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences, first ones:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
