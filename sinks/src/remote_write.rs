//! The metrics store: every closed window's aggregates, as Prometheus remote-write 1.0
//! samples (a protobuf `WriteRequest`, snappy block-compressed, POSTed with the protocol's
//! headers), one sample per series at the window's end.
//!
//! **Naming** ([`series_of`]). A table's row becomes one series per numeric column:
//! `sightline_<table>_<column>`, a column in milliseconds ending `_ms` named `_milliseconds`
//! instead, a boolean as 0 or 1. Its labels are the table's key columns ([`SPECS`]: bounded
//! sets, never a user, session or event id) and `route` (`standard` or `restricted`, the lake's
//! route, for tables without a `route` column of their own). Null values have no sample.
//! Tables of records (`dead_letter`, `triage`) and columns of JSON text are not sent.
//!
//! **Delivery** ([`RemoteWrite`]). The lake sink hands each window it has written to a
//! bounded queue; one thread sends it, in order, in requests of at most
//! `max_samples_per_request` samples. A 2xx is sent; a 429, a 5xx or no answer is retried with
//! exponential backoff, the same request again (so one series' samples stay in time order);
//! any other 4xx, and a 5xx whose body says the samples can never be taken (Prometheus answers
//! "out of bounds", "too old", "out of order" or "duplicate sample" with 500 in some versions,
//! and one such sample rejects the whole request), is *rejected*: counted and dropped, never
//! retried. While the store is down the queue holds up to `buffer_samples`; beyond that the
//! oldest samples are dropped and counted, so memory stays bounded.
//!
//! **Not part of the durability frontier.** Kafka offsets are committed once the lake has a
//! window, whether or not the metrics store took it: the lake is the record and the store a
//! view of it, and an outage of the store must not stall the pipeline. What the store missed
//! (dropped from a full queue, or queued when the process died) is counted, and can be
//! backfilled from the lake.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use tracing::{info, warn};

use crate::timing::Timing;

/// Per exported table, its label columns (its key, bounded sets). Every other numeric column
/// is a series.
pub const SPECS: &[(&str, &[&str])] = &[
    (
        "event_counts",
        &["event_name", "event_type", "feature_area"],
    ),
    ("latency", &["event_name", "feature_area", "surface"]),
    (
        "latency_by_variant",
        &["event_name", "experiment_id", "variant"],
    ),
    ("quality", &["event_name", "outcome"]),
    ("quality_summary", &[]),
    (
        "funnels",
        &[
            "funnel",
            "breakdown",
            "breakdown_value",
            "step",
            "step_name",
        ],
    ),
    ("command_queue", &["action_type"]),
    ("integration_health", &["integration", "breaker_state"]),
    ("alerts", &["route", "rule", "subject", "severity", "state"]),
    (
        "feedback",
        &["feature_area", "breakdown", "breakdown_value"],
    ),
    (
        "experiment_results",
        &["experiment_id", "metric", "arm", "state"],
    ),
    ("experiment_exposures", &["experiment_id", "arm"]),
    (
        "guardrail_decisions",
        &["experiment_id", "rule", "action", "arm"],
    ),
    (
        "experiment_did",
        &["experiment_id", "metric", "cohort_start_ms", "state"],
    ),
    ("sampling_budgets", &["segment"]),
];

/// Columns that are numbers but not measures: never series.
const NOT_MEASURES: &[&str] = &["epoch", "config_version", "decision_epoch", "version"];

/// One series with one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Labels, sorted by name, `__name__` first among them by that order.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
    /// Milliseconds since the epoch.
    pub timestamp_ms: i64,
}

/// The metric name of `column` of `table`.
pub fn metric_name(table: &str, column: &str) -> String {
    match column.strip_suffix("_ms") {
        Some(stem) => format!("sightline_{table}_{stem}_milliseconds"),
        None => format!("sightline_{table}_{column}"),
    }
}

/// A cell of `array` as a label value (strings and integers), if present.
fn label_value(array: &dyn Array, row: usize) -> Option<String> {
    if array.is_null(row) {
        return None;
    }
    match array.data_type() {
        DataType::Utf8 => Some(array.as_string::<i32>().value(row).to_owned()),
        DataType::Int64 => Some(array.as_primitive::<Int64Type>().value(row).to_string()),
        DataType::Int32 => Some(array.as_primitive::<Int32Type>().value(row).to_string()),
        DataType::Boolean => Some(array.as_boolean().value(row).to_string()),
        _ => None,
    }
}

/// A cell of `array` as a sample value (numbers and booleans), if present and finite.
fn sample_value(array: &dyn Array, row: usize) -> Option<f64> {
    if array.is_null(row) {
        return None;
    }
    let v = match array.data_type() {
        DataType::Int64 => array.as_primitive::<Int64Type>().value(row) as f64,
        DataType::Int32 => f64::from(array.as_primitive::<Int32Type>().value(row)),
        DataType::Float64 => array.as_primitive::<Float64Type>().value(row),
        DataType::Boolean => f64::from(u8::from(array.as_boolean().value(row))),
        _ => return None,
    };
    v.is_finite().then_some(v)
}

/// The series of one window of `table` (written to the lake's `route`), its rows in `batch`,
/// at `timestamp_ms` (the window's end); empty for a table that is not exported.
pub fn series_of(table: &str, route: &str, batch: &RecordBatch, timestamp_ms: i64) -> Vec<Series> {
    let Some((_, keys)) = SPECS.iter().find(|(t, _)| *t == table) else {
        return Vec::new();
    };
    let schema = batch.schema();
    let key_columns: Vec<(&str, &dyn Array)> = keys
        .iter()
        .filter_map(|k| Some((*k, batch.column_by_name(k)?.as_ref())))
        .collect();
    let own_route = keys.contains(&"route");
    let measures: Vec<(String, &dyn Array)> = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(f, _)| {
            !keys.contains(&f.name().as_str())
                && !NOT_MEASURES.contains(&f.name().as_str())
                && matches!(
                    f.data_type(),
                    DataType::Int64 | DataType::Int32 | DataType::Float64 | DataType::Boolean
                )
        })
        .map(|(f, c)| (metric_name(table, f.name()), c.as_ref()))
        .collect();
    let mut out = Vec::with_capacity(batch.num_rows() * measures.len());
    for row in 0..batch.num_rows() {
        let mut labels: Vec<(String, String)> = key_columns
            .iter()
            .filter_map(|(k, a)| Some(((*k).to_owned(), label_value(*a, row)?)))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        if !own_route {
            labels.push(("route".to_owned(), route.to_owned()));
        }
        for (name, array) in &measures {
            let Some(value) = sample_value(*array, row) else {
                continue;
            };
            let mut labels = labels.clone();
            labels.push(("__name__".to_owned(), name.clone()));
            labels.sort();
            out.push(Series {
                labels,
                value,
                timestamp_ms,
            });
        }
    }
    out
}

/// Appends `value` as a protobuf varint.
fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends field `field` of wire type 2 (length-delimited) holding `bytes`.
fn length_delimited(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `series` as a remote-write 1.0 `WriteRequest` (prometheus/prompb/remote.proto):
/// `WriteRequest { repeated TimeSeries timeseries = 1; }`,
/// `TimeSeries { repeated Label labels = 1; repeated Sample samples = 2; }`,
/// `Label { string name = 1; string value = 2; }`,
/// `Sample { double value = 1; int64 timestamp = 2; }`.
pub fn encode(series: &[Series]) -> Vec<u8> {
    let mut out = Vec::with_capacity(series.len() * 96);
    let mut ts = Vec::with_capacity(256);
    let mut item = Vec::with_capacity(128);
    for s in series {
        ts.clear();
        for (name, value) in &s.labels {
            item.clear();
            length_delimited(&mut item, 1, name.as_bytes());
            length_delimited(&mut item, 2, value.as_bytes());
            length_delimited(&mut ts, 1, &item);
        }
        item.clear();
        // value: field 1, wire type 1 (64-bit); timestamp: field 2, varint (two's complement).
        varint(&mut item, (1 << 3) | 1);
        item.extend_from_slice(&s.value.to_le_bytes());
        varint(&mut item, 2 << 3);
        varint(&mut item, s.timestamp_ms as u64);
        length_delimited(&mut ts, 2, &item);
        length_delimited(&mut out, 1, &ts);
    }
    out
}

/// Where and how to send.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteWriteOptions {
    /// The endpoint (for Prometheus: `http://host:9090/api/v1/write`).
    pub url: String,
    /// Extra headers (for example `Authorization: Bearer …`).
    pub headers: Vec<(String, String)>,
    /// Samples per request, at most.
    pub max_samples_per_request: usize,
    /// Samples held while the store is slow or down, at most (the oldest are dropped beyond).
    pub buffer_samples: usize,
    /// Time allowed for one request.
    pub timeout: Duration,
    /// First retry delay; doubled up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

/// What the sender has done, for the run summary and `/metrics`.
#[derive(Debug, Default)]
pub struct RemoteWriteStats {
    /// Samples the store accepted.
    pub sent: AtomicU64,
    /// Requests sent again after a retryable failure.
    pub retries: AtomicU64,
    /// Samples the store rejected for good (counted, not retried).
    pub rejected: AtomicU64,
    /// Samples dropped from a full queue.
    pub dropped: AtomicU64,
    /// Requests accepted.
    pub requests: AtomicU64,
    /// How long each request took to be answered (any answer).
    pub latency: Mutex<Timing>,
}

impl RemoteWriteStats {
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// (sent, retries, rejected, dropped).
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            Self::get(&self.sent),
            Self::get(&self.retries),
            Self::get(&self.rejected),
            Self::get(&self.dropped),
        )
    }
}

struct Shared {
    queue: Mutex<VecDeque<Series>>,
    wake: Condvar,
    /// Set when the pipeline stops: send what is queued, then end.
    closing: AtomicBool,
    /// Set when nothing is queued or in flight.
    idle: Condvar,
    in_flight: AtomicBool,
    /// Samples of the request being sent.
    in_flight_samples: AtomicU64,
    stats: RemoteWriteStats,
}

/// The remote-write sender: a handle to a bounded queue and the thread that empties it.
#[derive(Clone)]
pub struct RemoteWrite {
    shared: Arc<Shared>,
    buffer: usize,
}

impl std::fmt::Debug for RemoteWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteWrite").finish_non_exhaustive()
    }
}

/// How one request went.
enum Outcome {
    Sent,
    Retry(String),
    Rejected(String),
}

/// Whether a 5xx body says the samples can never be taken.
fn permanent_500(body: &str) -> bool {
    let body = body.to_ascii_lowercase();
    [
        "out of bounds",
        "too old",
        "out of order",
        "duplicate sample",
    ]
    .iter()
    .any(|p| body.contains(p))
}

impl RemoteWrite {
    /// Starts the sender thread for `options`.
    pub fn start(options: RemoteWriteOptions) -> std::io::Result<RemoteWrite> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            closing: AtomicBool::new(false),
            idle: Condvar::new(),
            in_flight: AtomicBool::new(false),
            in_flight_samples: AtomicU64::new(0),
            stats: RemoteWriteStats::default(),
        });
        let buffer = options.buffer_samples.max(1);
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("remote-write".into())
            .spawn(move || send_loop(&worker, &options))?;
        Ok(RemoteWrite { shared, buffer })
    }

    /// Queues `series` (one window of one table), dropping the oldest queued samples beyond
    /// the buffer.
    pub fn push(&self, series: Vec<Series>) {
        if series.is_empty() {
            return;
        }
        let mut queue = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        queue.extend(series);
        let over = queue.len().saturating_sub(self.buffer);
        if over > 0 {
            queue.drain(..over);
            self.shared
                .stats
                .dropped
                .fetch_add(over as u64, Ordering::Relaxed);
        }
        drop(queue);
        self.shared.wake.notify_one();
    }

    /// What the sender has done.
    pub fn stats(&self) -> &RemoteWriteStats {
        &self.shared.stats
    }

    /// Samples not sent yet: queued, and in the request being sent.
    pub fn queued(&self) -> usize {
        let queued = self.shared.queue.lock().map_or(0, |q| q.len());
        queued + self.shared.in_flight_samples.load(Ordering::SeqCst) as usize
    }

    /// Waits until everything queued is sent (or rejected), for at most `limit`; then the
    /// sender ends. Returns whether the queue was emptied.
    pub fn finish(&self, limit: Duration) -> bool {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        let deadline = std::time::Instant::now() + limit;
        let mut queue = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while !queue.is_empty() || self.shared.in_flight.load(Ordering::SeqCst) {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            queue = match self.shared.idle.wait_timeout(queue, deadline - now) {
                Ok((q, _)) => q,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }
}

/// The sender thread: takes up to a request's worth of samples, sends them until they are
/// sent or rejected, and again, until closed and empty.
fn send_loop(shared: &Shared, options: &RemoteWriteOptions) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "remote-write: no runtime; samples will not be sent");
            return;
        }
    };
    let client = match reqwest::Client::builder().timeout(options.timeout).build() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "remote-write: no HTTP client; samples will not be sent");
            return;
        }
    };
    let mut encoder = snap::raw::Encoder::new();
    loop {
        let batch: Vec<Series> = {
            let mut queue = shared
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while queue.is_empty() {
                shared.in_flight.store(false, Ordering::SeqCst);
                shared.idle.notify_all();
                if shared.closing.load(Ordering::SeqCst) {
                    return;
                }
                queue = match shared.wake.wait_timeout(queue, Duration::from_millis(200)) {
                    Ok((q, _)) => q,
                    Err(poisoned) => poisoned.into_inner().0,
                };
            }
            shared.in_flight.store(true, Ordering::SeqCst);
            let n = queue.len().min(options.max_samples_per_request.max(1));
            shared.in_flight_samples.store(n as u64, Ordering::SeqCst);
            queue.drain(..n).collect()
        };
        let body = match encoder.compress_vec(&encode(&batch)) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "remote-write: compression failed; samples rejected");
                shared
                    .stats
                    .rejected
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                shared.in_flight_samples.store(0, Ordering::SeqCst);
                continue;
            }
        };
        let mut backoff = options.min_backoff;
        loop {
            let began = std::time::Instant::now();
            let outcome = runtime.block_on(post(&client, options, body.clone()));
            if let Ok(mut latency) = shared.stats.latency.lock() {
                latency.record(began.elapsed());
            }
            match outcome {
                Outcome::Sent => {
                    shared
                        .stats
                        .sent
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Outcome::Rejected(why) => {
                    warn!(samples = batch.len(), reason = %why, "remote-write: samples rejected for good");
                    shared
                        .stats
                        .rejected
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    break;
                }
                Outcome::Retry(why) => {
                    shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                    if backoff >= options.max_backoff {
                        info!(reason = %why, "remote-write: store unavailable, retrying");
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(options.max_backoff);
                }
            }
        }
        shared.in_flight_samples.store(0, Ordering::SeqCst);
    }
}

/// One POST of a compressed `WriteRequest`.
async fn post(client: &reqwest::Client, options: &RemoteWriteOptions, body: Vec<u8>) -> Outcome {
    let mut request = client
        .post(&options.url)
        .header("Content-Encoding", "snappy")
        .header("Content-Type", "application/x-protobuf")
        .header(
            "User-Agent",
            concat!("sightline/", env!("CARGO_PKG_VERSION")),
        )
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .body(body);
    for (name, value) in &options.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    let status = response.status();
    if status.is_success() {
        return Outcome::Sent;
    }
    let text = response.text().await.unwrap_or_default();
    let why = format!("{status}: {}", text.trim());
    if status.as_u16() == 429 || (status.is_server_error() && !permanent_500(&text)) {
        Outcome::Retry(why)
    } else {
        Outcome::Rejected(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_their_unit() {
        assert_eq!(
            metric_name("latency", "p95_ms"),
            "sightline_latency_p95_milliseconds"
        );
        assert_eq!(
            metric_name("event_counts", "count"),
            "sightline_event_counts_count"
        );
    }

    #[test]
    fn a_write_request_is_the_protobuf_of_its_series() {
        let s = Series {
            labels: vec![("__name__".into(), "m".into()), ("a".into(), "b".into())],
            value: 1.5,
            timestamp_ms: 1000,
        };
        let bytes = encode(&[s]);
        // WriteRequest.timeseries (1, LEN) holding labels (1, LEN) ×2 and a sample (2, LEN).
        let label = |n: &str, v: &str| {
            let mut l = vec![0x0a, n.len() as u8];
            l.extend_from_slice(n.as_bytes());
            l.extend([0x12, v.len() as u8]);
            l.extend_from_slice(v.as_bytes());
            l
        };
        let mut ts = Vec::new();
        for (n, v) in [("__name__", "m"), ("a", "b")] {
            let l = label(n, v);
            ts.extend([0x0a, l.len() as u8]);
            ts.extend(l);
        }
        let mut sample = vec![0x09];
        sample.extend(1.5f64.to_le_bytes());
        sample.extend([0x10, 0xe8, 0x07]);
        ts.extend([0x12, sample.len() as u8]);
        ts.extend(sample);
        let mut want = vec![0x0a, ts.len() as u8];
        want.extend(ts);
        assert_eq!(bytes, want);
    }

    #[test]
    fn a_store_that_is_down_holds_at_most_the_buffer_and_counts_the_rest() {
        // Nothing listens on the port: every request fails and is retried.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(1);
        let remote = RemoteWrite::start(RemoteWriteOptions {
            url: format!("http://127.0.0.1:{port}/api/v1/write"),
            headers: Vec::new(),
            max_samples_per_request: 4,
            buffer_samples: 10,
            timeout: Duration::from_millis(200),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let one = |t: i64| Series {
            labels: vec![("__name__".into(), "m".into())],
            value: 1.0,
            timestamp_ms: t,
        };
        for t in 0..25 {
            remote.push(vec![one(t)]);
        }
        assert!(remote.queued() <= 10);
        let (sent, _, rejected, dropped) = remote.stats().snapshot();
        assert_eq!((sent, rejected), (0, 0));
        // 25 pushed: at most 10 queued and 4 in flight; the rest dropped, and counted.
        assert!(dropped >= 11, "dropped {dropped}");
        assert!(!remote.finish(Duration::from_millis(100)));
        // What is not sent is what was pushed less what was dropped.
        let (_, _, _, dropped_now) = remote.stats().snapshot();
        assert_eq!(remote.queued() as u64 + dropped_now, 25);
        assert!(remote.stats().retries.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn permanent_rejections_are_told_from_outages() {
        assert!(permanent_500("out of bounds"));
        assert!(permanent_500("err: too old sample"));
        assert!(!permanent_500("context deadline exceeded"));
    }
}
