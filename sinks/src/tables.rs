//! The output tables: one row type each, built from closed windows.
//!
//! Every table starts with `window_start` and `window_end`, UTC timestamps in microseconds;
//! latencies are in milliseconds. Rows are built by `from_closed` from the
//! [`ClosedWindow`]s of the matching aggregate.

use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};
use sightline_operators::{ClosedWindow, CountKey, LatencyHistogram, LatencyKey, QualityKey, VariantKey};
use sightline_schemas::DeadLetter;

use crate::{Result, Table};

fn window_fields() -> Vec<Field> {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    vec![Field::new("window_start", ts.clone(), false), Field::new("window_end", ts, false)]
}

fn window_columns<T>(rows: &[T], start: impl Fn(&T) -> u64, end: impl Fn(&T) -> u64) -> Vec<ArrayRef> {
    let micros = |f: &dyn Fn(&T) -> u64| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| f(r) as i64 * 1000)).with_timezone("UTC"))
    };
    vec![micros(&start), micros(&end)]
}

fn strings<T>(rows: &[T], f: impl Fn(&T) -> &str) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
}

fn opt_strings<T>(rows: &[T], f: impl Fn(&T) -> Option<&str>) -> ArrayRef {
    Arc::new(StringArray::from_iter(rows.iter().map(f)))
}

fn ints<T>(rows: &[T], f: impl Fn(&T) -> i64) -> ArrayRef {
    Arc::new(Int64Array::from_iter_values(rows.iter().map(f)))
}

fn floats<T>(rows: &[T], f: impl Fn(&T) -> f64) -> ArrayRef {
    Arc::new(Float64Array::from_iter_values(rows.iter().map(f)))
}

fn batch(schema: SchemaRef, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// Latency summary columns shared by the latency tables, in milliseconds.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Number of samples.
    pub count: i64,
    /// Exact mean.
    pub mean_ms: f64,
    /// Median, within 1%.
    pub p50_ms: f64,
    /// 90th percentile, within 1%.
    pub p90_ms: f64,
    /// 95th percentile, within 1%.
    pub p95_ms: f64,
    /// 99th percentile, within 1%.
    pub p99_ms: f64,
    /// Largest sample, within 1%.
    pub max_ms: f64,
}

impl LatencyStats {
    /// Reads the summary off an accumulated histogram.
    pub fn from_histogram(h: &LatencyHistogram) -> LatencyStats {
        let q = |q: f64| h.quantile(q).unwrap_or(0.0) / 1000.0;
        LatencyStats {
            count: h.count,
            mean_ms: h.mean_us().unwrap_or(0.0) / 1000.0,
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            max_ms: h.max().unwrap_or(0.0) / 1000.0,
        }
    }

    fn fields() -> Vec<Field> {
        let mut fields = vec![Field::new("count", DataType::Int64, false)];
        for name in ["mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms"] {
            fields.push(Field::new(name, DataType::Float64, false));
        }
        fields
    }

    fn columns<T>(rows: &[T], f: impl Fn(&T) -> &LatencyStats) -> Vec<ArrayRef> {
        vec![
            ints(rows, |r| f(r).count),
            floats(rows, |r| f(r).mean_ms),
            floats(rows, |r| f(r).p50_ms),
            floats(rows, |r| f(r).p90_ms),
            floats(rows, |r| f(r).p95_ms),
            floats(rows, |r| f(r).p99_ms),
            floats(rows, |r| f(r).max_ms),
        ]
    }
}

/// A row of `event_counts`.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct EventCountRow {
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// Window end, ms since the epoch.
    pub window_end_ms: u64,
    /// `event_name`.
    pub event_name: String,
    /// `event_type`.
    pub event_type: String,
    /// `feature_area`.
    pub feature_area: String,
    /// Number of accepted events.
    pub count: i64,
}

impl EventCountRow {
    /// Rows of a closed `event_counts` window.
    pub fn from_closed(w: ClosedWindow<CountKey, isize>) -> Vec<EventCountRow> {
        w.entries
            .into_iter()
            .map(|(k, n)| EventCountRow {
                window_start_ms: w.window_start,
                window_end_ms: w.window_end,
                event_name: k.event_name.as_str().to_owned(),
                event_type: k.event_type.as_str().to_owned(),
                feature_area: k.feature_area,
                count: n as i64,
            })
            .collect()
    }
}

impl Table for EventCountRow {
    const NAME: &'static str = "event_counts";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("event_name", DataType::Utf8, false),
            Field::new("event_type", DataType::Utf8, false),
            Field::new("feature_area", DataType::Utf8, false),
            Field::new("count", DataType::Int64, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([strings(rows, |r| &r.event_name), strings(rows, |r| &r.event_type), strings(rows, |r| &r.feature_area), ints(rows, |r| r.count)]);
        batch(Self::schema(), columns)
    }
}

/// A row of `latency`.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct LatencyRow {
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// Window end, ms since the epoch.
    pub window_end_ms: u64,
    /// `event_name`.
    pub event_name: String,
    /// `feature_area`.
    pub feature_area: String,
    /// `surface`, empty when the events had none.
    pub surface: String,
    /// The latency summary.
    pub stats: LatencyStats,
}

impl LatencyRow {
    /// Rows of a closed `latency` window.
    pub fn from_closed(w: ClosedWindow<LatencyKey, LatencyHistogram>) -> Vec<LatencyRow> {
        w.entries
            .into_iter()
            .map(|(k, h)| LatencyRow {
                window_start_ms: w.window_start,
                window_end_ms: w.window_end,
                event_name: k.event_name.as_str().to_owned(),
                feature_area: k.feature_area,
                surface: k.surface,
                stats: LatencyStats::from_histogram(&h),
            })
            .collect()
    }
}

impl Table for LatencyRow {
    const NAME: &'static str = "latency";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("event_name", DataType::Utf8, false),
            Field::new("feature_area", DataType::Utf8, false),
            Field::new("surface", DataType::Utf8, false),
        ]);
        fields.extend(LatencyStats::fields());
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([strings(rows, |r| &r.event_name), strings(rows, |r| &r.feature_area), strings(rows, |r| &r.surface)]);
        columns.extend(LatencyStats::columns(rows, |r| &r.stats));
        batch(Self::schema(), columns)
    }
}

/// A row of `latency_by_variant`.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct VariantLatencyRow {
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// Window end, ms since the epoch.
    pub window_end_ms: u64,
    /// `event_name`.
    pub event_name: String,
    /// Experiment id.
    pub experiment_id: String,
    /// Variant (bucket).
    pub variant: String,
    /// The latency summary.
    pub stats: LatencyStats,
}

impl VariantLatencyRow {
    /// Rows of a closed `latency_by_variant` window.
    pub fn from_closed(w: ClosedWindow<VariantKey, LatencyHistogram>) -> Vec<VariantLatencyRow> {
        w.entries
            .into_iter()
            .map(|(k, h)| VariantLatencyRow {
                window_start_ms: w.window_start,
                window_end_ms: w.window_end,
                event_name: k.event_name.as_str().to_owned(),
                experiment_id: k.experiment_id,
                variant: k.variant,
                stats: LatencyStats::from_histogram(&h),
            })
            .collect()
    }
}

impl Table for VariantLatencyRow {
    const NAME: &'static str = "latency_by_variant";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("event_name", DataType::Utf8, false),
            Field::new("experiment_id", DataType::Utf8, false),
            Field::new("variant", DataType::Utf8, false),
        ]);
        fields.extend(LatencyStats::fields());
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([strings(rows, |r| &r.event_name), strings(rows, |r| &r.experiment_id), strings(rows, |r| &r.variant)]);
        columns.extend(LatencyStats::columns(rows, |r| &r.stats));
        batch(Self::schema(), columns)
    }
}

/// A row of `quality`: how many records of one event name had one outcome in a window.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct QualityRow {
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// Window end, ms since the epoch.
    pub window_end_ms: u64,
    /// The event name, or `unknown`.
    pub event_name: String,
    /// `accepted`, `late`, or a rejection kind.
    pub outcome: String,
    /// Number of records.
    pub count: i64,
}

impl QualityRow {
    /// Rows of a closed `quality` window.
    pub fn from_closed(w: ClosedWindow<QualityKey, isize>) -> Vec<QualityRow> {
        w.entries
            .into_iter()
            .map(|(k, n)| QualityRow {
                window_start_ms: w.window_start,
                window_end_ms: w.window_end,
                event_name: k.event_name.into_owned(),
                outcome: k.outcome.as_str().to_owned(),
                count: n as i64,
            })
            .collect()
    }
}

impl Table for QualityRow {
    const NAME: &'static str = "quality";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("event_name", DataType::Utf8, false),
            Field::new("outcome", DataType::Utf8, false),
            Field::new("count", DataType::Int64, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([strings(rows, |r| &r.event_name), strings(rows, |r| &r.outcome), ints(rows, |r| r.count)]);
        batch(Self::schema(), columns)
    }
}

/// A row of `dead_letter`: one rejected or late record, without its payload.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct DeadLetterRow {
    /// Start of the window in which the record was processed, ms since the epoch.
    pub window_start_ms: u64,
    /// End of that window.
    pub window_end_ms: u64,
    /// Failure kind.
    pub kind: String,
    /// Reason, naming the field where known.
    pub reason: String,
    /// Event name, when known.
    pub event_name: Option<String>,
    /// Event time, ms since the epoch, when known.
    pub event_time_ms: Option<i64>,
    /// Source topic (or `file:<path>`).
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset (or line number).
    pub offset: i64,
    /// Size of the raw record.
    pub payload_bytes: i64,
    /// How many identical records (same origin) this row stands for; 1 unless a source replayed.
    pub copies: i64,
}

impl DeadLetterRow {
    /// Rows of a closed `dead_letter` window.
    pub fn from_closed(w: ClosedWindow<crate::tables::WindowedDeadLetter, isize>) -> Vec<DeadLetterRow> {
        w.entries
            .into_iter()
            .map(|(k, n)| {
                let d = k.record;
                DeadLetterRow {
                    window_start_ms: w.window_start,
                    window_end_ms: w.window_end,
                    kind: d.kind.as_str().to_owned(),
                    reason: d.reason,
                    event_name: d.event_name,
                    event_time_ms: d.event_time_ms,
                    topic: d.origin.topic,
                    partition: d.origin.partition,
                    offset: d.origin.offset,
                    payload_bytes: d.payload_bytes as i64,
                    copies: n as i64,
                }
            })
            .collect()
    }
}

/// A dead-letter record keyed by the window in which it was processed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WindowedDeadLetter {
    /// Processing window start, ms since the epoch.
    pub window_start: u64,
    /// The record.
    pub record: DeadLetter,
}

impl sightline_operators::WindowKey for WindowedDeadLetter {
    fn window_start(&self) -> u64 {
        self.window_start
    }
}

impl Table for DeadLetterRow {
    const NAME: &'static str = "dead_letter";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("kind", DataType::Utf8, false),
            Field::new("reason", DataType::Utf8, false),
            Field::new("event_name", DataType::Utf8, true),
            Field::new("event_time", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
            Field::new("topic", DataType::Utf8, false),
            Field::new("partition", DataType::Int32, false),
            Field::new("offset", DataType::Int64, false),
            Field::new("payload_bytes", DataType::Int64, false),
            Field::new("copies", DataType::Int64, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            strings(rows, |r| &r.kind),
            strings(rows, |r| &r.reason),
            opt_strings(rows, |r| r.event_name.as_deref()),
            Arc::new(TimestampMicrosecondArray::from_iter(rows.iter().map(|r| r.event_time_ms.map(|t| t * 1000))).with_timezone("UTC")) as ArrayRef,
            strings(rows, |r| &r.topic),
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.partition))) as ArrayRef,
            ints(rows, |r| r.offset),
            ints(rows, |r| r.payload_bytes),
            ints(rows, |r| r.copies),
        ]);
        batch(Self::schema(), columns)
    }
}
