//! The output tables: one row type each, built from closed windows.
//!
//! Every table starts with `window_start` and `window_end`, UTC timestamps in microseconds;
//! latencies are in milliseconds. Rows are built by `from_closed` from the
//! [`ClosedWindow`]s of the matching aggregate.

use std::sync::Arc;

use arrow_array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};
use sightline_operators::{
    ClosedWindow, CountKey, Counted, LatencyHistogram, LatencyKey, Outcome, QualityCounts,
    QualityKey, QualityTotals, VariantKey, WindowedDeadLetter,
};
use sightline_schemas::{DeadLetter, Origin, Violation, WEIGHT_ONE};

use crate::{Result, Table};

pub(crate) fn window_fields() -> Vec<Field> {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    vec![
        Field::new("window_start", ts.clone(), false),
        Field::new("window_end", ts, false),
    ]
}

pub(crate) fn window_columns<T>(
    rows: &[T],
    start: impl Fn(&T) -> u64,
    end: impl Fn(&T) -> u64,
) -> Vec<ArrayRef> {
    let micros = |f: &dyn Fn(&T) -> u64| -> ArrayRef {
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| f(r) as i64 * 1000))
                .with_timezone("UTC"),
        )
    };
    vec![micros(&start), micros(&end)]
}

pub(crate) fn strings<T>(rows: &[T], f: impl Fn(&T) -> &str) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
}

pub(crate) fn opt_strings<T>(rows: &[T], f: impl Fn(&T) -> Option<&str>) -> ArrayRef {
    Arc::new(StringArray::from_iter(rows.iter().map(f)))
}

pub(crate) fn ints<T>(rows: &[T], f: impl Fn(&T) -> i64) -> ArrayRef {
    Arc::new(Int64Array::from_iter_values(rows.iter().map(f)))
}

pub(crate) fn floats<T>(rows: &[T], f: impl Fn(&T) -> f64) -> ArrayRef {
    Arc::new(Float64Array::from_iter_values(rows.iter().map(f)))
}

/// A nullable float column; non-finite values are null.
pub(crate) fn opt_floats<T>(rows: &[T], f: impl Fn(&T) -> Option<f64>) -> ArrayRef {
    Arc::new(Float64Array::from_iter(
        rows.iter().map(|r| f(r).filter(|v| v.is_finite())),
    ))
}

/// A nullable integer column.
pub(crate) fn opt_ints<T>(rows: &[T], f: impl Fn(&T) -> Option<i64>) -> ArrayRef {
    Arc::new(Int64Array::from_iter(rows.iter().map(f)))
}

pub(crate) fn batch(schema: SchemaRef, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// Latency summary columns shared by the latency tables, in milliseconds.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Number of samples.
    pub count: i64,
    /// The events they stand for: Σ 1 / `sample_rate` (Horvitz–Thompson; `count` when none
    /// is sampled). The mean and the quantiles are those of the weighted samples.
    pub weighted_count: f64,
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
            weighted_count: h.weighted_count(),
            mean_ms: h.mean_us().unwrap_or(0.0) / 1000.0,
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            max_ms: h.max().unwrap_or(0.0) / 1000.0,
        }
    }

    fn fields() -> Vec<Field> {
        let mut fields = vec![
            Field::new("count", DataType::Int64, false),
            Field::new("weighted_count", DataType::Float64, false),
        ];
        for name in ["mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms"] {
            fields.push(Field::new(name, DataType::Float64, false));
        }
        fields
    }

    fn columns<T>(rows: &[T], f: impl Fn(&T) -> &LatencyStats) -> Vec<ArrayRef> {
        vec![
            ints(rows, |r| f(r).count),
            floats(rows, |r| f(r).weighted_count),
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
    /// The events emitted, estimated: the sum of the accepted events' weights (1 / their
    /// `sample_rate`; `count` when none was sampled).
    pub weighted_count: f64,
}

impl EventCountRow {
    /// Rows of a closed `event_counts` window.
    pub fn from_closed(w: ClosedWindow<CountKey, Counted>) -> Vec<EventCountRow> {
        w.entries
            .into_iter()
            .map(|(k, n)| EventCountRow {
                window_start_ms: w.window_start_ms,
                window_end_ms: w.window_end_ms,
                event_name: k.event_name.as_str().to_owned(),
                event_type: k.event_type.as_str().to_owned(),
                feature_area: k.feature_area.to_string(),
                count: n.count,
                weighted_count: n.weighted(),
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
            Field::new("weighted_count", DataType::Float64, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            strings(rows, |r| &r.event_name),
            strings(rows, |r| &r.event_type),
            strings(rows, |r| &r.feature_area),
            ints(rows, |r| r.count),
            floats(rows, |r| r.weighted_count),
        ]);
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
                window_start_ms: w.window_start_ms,
                window_end_ms: w.window_end_ms,
                event_name: k.event_name.as_str().to_owned(),
                feature_area: k.feature_area.to_string(),
                surface: k.surface.to_string(),
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
        columns.extend([
            strings(rows, |r| &r.event_name),
            strings(rows, |r| &r.feature_area),
            strings(rows, |r| &r.surface),
        ]);
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
                window_start_ms: w.window_start_ms,
                window_end_ms: w.window_end_ms,
                event_name: k.event_name.as_str().to_owned(),
                experiment_id: k.experiment_id.to_string(),
                variant: k.variant.to_string(),
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
        columns.extend([
            strings(rows, |r| &r.event_name),
            strings(rows, |r| &r.experiment_id),
            strings(rows, |r| &r.variant),
        ]);
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
    /// The records weighted by 1 / their `sample_rate` (accepted events that declare one; any
    /// other record, and the privacy counters, count 1 each).
    pub weighted_count: f64,
}

impl QualityRow {
    /// Rows of a closed `quality` window.
    pub fn from_closed(w: ClosedWindow<QualityKey, QualityCounts>) -> Vec<QualityRow> {
        let mut rows = Vec::with_capacity(w.entries.len() * 2);
        for (k, counts) in w.entries {
            let row = |outcome: Outcome, count: i64, weighted_count: f64| QualityRow {
                window_start_ms: w.window_start_ms,
                window_end_ms: w.window_end_ms,
                event_name: k.event_name.to_string(),
                outcome: outcome.as_str().to_owned(),
                count,
                weighted_count,
            };
            if counts.records != 0 {
                let weighted = counts.weighted_micros as f64 / WEIGHT_ONE as f64;
                rows.push(row(k.outcome, counts.records, weighted));
            }
            rows.extend(
                counts
                    .privacy_counters()
                    .into_iter()
                    .filter(|(_, n)| *n != 0)
                    .map(|(o, n)| row(o, n, n as f64)),
            );
        }
        rows
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
            Field::new("weighted_count", DataType::Float64, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            strings(rows, |r| &r.event_name),
            strings(rows, |r| &r.outcome),
            ints(rows, |r| r.count),
            floats(rows, |r| r.weighted_count),
        ]);
        batch(Self::schema(), columns)
    }
}

/// Name and version of the processor, recorded in every dead-letter row.
pub const PROCESSOR: &str = concat!("sightline ", env!("CARGO_PKG_VERSION"));

/// A dead letter as one flat, self-describing record: what the `dead_letter` table and the
/// dead-letter topic both carry (the topic as this record's JSON). The payload is the one the
/// privacy layer left (identifiers pseudonymized, free text scrubbed, undeclared values
/// redacted); the raw record never is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    /// Processor name and version (`sightline 0.1.0`).
    pub processor: String,
    /// Failure kind (`missing_field`, `late`, …).
    pub kind: String,
    /// Reason, naming the field where known.
    pub reason: String,
    /// Event name, when known.
    pub event_name: Option<String>,
    /// Schema version tried, when known.
    pub schema_version: Option<String>,
    /// Every violation: pointer, keyword, message.
    pub violations: Vec<Violation>,
    /// Event time, ms since the epoch, when known (RFC 3339 `event_time` in JSON; ms where
    /// RFC 3339 cannot hold it exactly).
    #[serde(rename = "event_time", with = "rfc3339_ms")]
    pub event_time_ms: Option<i64>,
    /// Where the record came from.
    pub origin: Origin,
    /// Size of the raw record.
    pub payload_bytes: u64,
    /// The redacted payload (none for records over the size limit).
    pub payload: Option<String>,
    /// Whether the record declared restricted data.
    pub restricted: bool,
}

impl DeadLetterRecord {
    /// The record of `dead`.
    pub fn of(dead: DeadLetter) -> DeadLetterRecord {
        DeadLetterRecord {
            processor: PROCESSOR.to_owned(),
            kind: dead.kind.as_str().to_owned(),
            reason: dead.reason,
            event_name: dead.event_name,
            schema_version: dead.schema_version,
            violations: dead.violations,
            event_time_ms: dead.event_time_ms,
            origin: dead.origin,
            payload_bytes: dead.payload_bytes,
            payload: dead.payload,
            restricted: dead.restricted,
        }
    }

    /// The key of the record on a topic: `<topic>/<partition>/<offset>` of its source, so that
    /// a compacted or replayed topic keeps one record per bad event.
    pub fn key(&self) -> String {
        let origin = &self.origin;
        format!("{}/{}/{}", origin.topic, origin.partition, origin.offset)
    }
}

impl Ord for DeadLetterRecord {
    /// Field by field, with the violations compared as their JSON text (the `violations`
    /// column), so that a file's rows keep the order they always had.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let violations = |r: &Self| serde_json::to_string(&r.violations).unwrap_or_default();
        (
            &self.processor,
            &self.kind,
            &self.reason,
            &self.event_name,
            &self.schema_version,
        )
            .cmp(&(
                &other.processor,
                &other.kind,
                &other.reason,
                &other.event_name,
                &other.schema_version,
            ))
            .then_with(|| violations(self).cmp(&violations(other)))
            .then_with(|| {
                (
                    &self.event_time_ms,
                    &self.origin,
                    self.payload_bytes,
                    &self.payload,
                    self.restricted,
                )
                    .cmp(&(
                        &other.event_time_ms,
                        &other.origin,
                        other.payload_bytes,
                        &other.payload,
                        other.restricted,
                    ))
            })
    }
}

impl PartialOrd for DeadLetterRecord {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// `Option<i64>` ms as an RFC 3339 string in human-readable formats (the topic's JSON),
/// losslessly: a time RFC 3339 cannot hold exactly (outside years 0–9999) stays a number of
/// ms. Binary formats (timely's exchange between processes) carry the number.
mod rfc3339_ms {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        match ms {
            Some(ms) if s.is_human_readable() => {
                let text = sightline_schemas::format_rfc3339_ms(*ms);
                if sightline_schemas::parse_rfc3339_ms(&text) == Some(*ms) {
                    s.serialize_some(&text)
                } else {
                    s.serialize_some(ms)
                }
            }
            Some(ms) => s.serialize_some(ms),
            None => s.serialize_none(),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Time {
        Text(String),
        Ms(i64),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        if !d.is_human_readable() {
            return Option::<i64>::deserialize(d);
        }
        Ok(match Option::<Time>::deserialize(d)? {
            None => None,
            Some(Time::Ms(ms)) => Some(ms),
            Some(Time::Text(t)) => Some(
                sightline_schemas::parse_rfc3339_ms(&t)
                    .ok_or_else(|| serde::de::Error::custom(format!("not RFC 3339: {t}")))?,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(event_time_ms: Option<i64>) -> DeadLetterRecord {
        DeadLetterRecord::of(DeadLetter {
            kind: sightline_schemas::FailureKind::Late,
            reason: "behind".into(),
            event_name: Some("project_viewed".into()),
            event_time_ms,
            origin: Origin {
                topic: "t".into(),
                partition: 2,
                offset: 7,
            },
            payload_bytes: 10,
            schema_version: None,
            violations: Vec::new(),
            payload: None,
            restricted: false,
        })
    }

    #[test]
    fn the_topic_json_is_the_documented_record_and_round_trips() {
        let dead = record(Some(1_769_178_600_250));
        let json = serde_json::to_string(&dead).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"processor":"{PROCESSOR}","kind":"late","reason":"behind","event_name":"project_viewed","schema_version":null,"violations":[],"event_time":"2026-01-23T14:30:00.250Z","origin":{{"topic":"t","partition":2,"offset":7}},"payload_bytes":10,"payload":null,"restricted":false}}"#
            )
        );
        assert_eq!(dead.key(), "t/2/7");
        for t in [
            None,
            Some(0),
            Some(1_769_178_600_250),
            Some(-62_167_219_200_001),
        ] {
            let dead = record(t);
            let back: DeadLetterRecord =
                serde_json::from_str(&serde_json::to_string(&dead).unwrap()).unwrap();
            assert_eq!(back, dead, "{t:?}");
        }
    }

    #[test]
    fn rows_order_violations_as_their_json_text() {
        let v = |pointer: &str| Violation {
            pointer: pointer.into(),
            keyword: "required".into(),
            message: "m".into(),
        };
        let (mut one, mut two) = (record(None), record(None));
        one.violations = vec![v("/a")];
        two.violations = vec![v("/a"), v("/b")];
        // As text, `[A,B]` sorts before `[A]` (`,` < `]`): the order the files always had.
        assert!(two < one);
    }
}

/// A row of `dead_letter`: one rejected or late record in the window in which it was
/// processed.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct DeadLetterRow {
    /// Start of the window in which the record was processed, ms since the epoch.
    pub window_start_ms: u64,
    /// End of that window.
    pub window_end_ms: u64,
    /// The record.
    pub record: DeadLetterRecord,
    /// How many identical records (same origin) this row stands for; 1 unless a source replayed.
    pub copies: i64,
}

impl DeadLetterRow {
    /// Rows of a closed `dead_letter` window.
    pub fn from_closed(w: ClosedWindow<WindowedDeadLetter, isize>) -> Vec<DeadLetterRow> {
        w.entries
            .into_iter()
            .map(|(k, n)| DeadLetterRow {
                window_start_ms: w.window_start_ms,
                window_end_ms: w.window_end_ms,
                record: DeadLetterRecord::of(k.record),
                copies: n as i64,
            })
            .collect()
    }
}

impl Table for DeadLetterRow {
    const NAME: &'static str = "dead_letter";
    const RAW: bool = true;

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("processor", DataType::Utf8, false),
            Field::new("kind", DataType::Utf8, false),
            Field::new("reason", DataType::Utf8, false),
            Field::new("event_name", DataType::Utf8, true),
            Field::new("schema_version", DataType::Utf8, true),
            Field::new("violations", DataType::Utf8, false),
            Field::new(
                "event_time",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("topic", DataType::Utf8, false),
            Field::new("partition", DataType::Int32, false),
            Field::new("offset", DataType::Int64, false),
            Field::new("payload_bytes", DataType::Int64, false),
            Field::new("payload", DataType::Utf8, true),
            Field::new("copies", DataType::Int64, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        let violations: Vec<String> = rows
            .iter()
            .map(|r| serde_json::to_string(&r.record.violations).unwrap_or_else(|_| "[]".into()))
            .collect();
        columns.extend([
            strings(rows, |r| &r.record.processor),
            strings(rows, |r| &r.record.kind),
            strings(rows, |r| &r.record.reason),
            opt_strings(rows, |r| r.record.event_name.as_deref()),
            opt_strings(rows, |r| r.record.schema_version.as_deref()),
            Arc::new(StringArray::from_iter_values(violations)) as ArrayRef,
            Arc::new(
                TimestampMicrosecondArray::from_iter(
                    rows.iter()
                        .map(|r| r.record.event_time_ms.map(|t| t * 1000)),
                )
                .with_timezone("UTC"),
            ) as ArrayRef,
            strings(rows, |r| &r.record.origin.topic),
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| r.record.origin.partition),
            )) as ArrayRef,
            ints(rows, |r| r.record.origin.offset),
            ints(rows, |r| r.record.payload_bytes as i64),
            opt_strings(rows, |r| r.record.payload.as_deref()),
            ints(rows, |r| r.copies),
        ]);
        batch(Self::schema(), columns)
    }
}

/// A row of `quality_summary`: one window's totals and the platform spec's success criteria
/// (< 1% of records rejected for schema violations, < 0.1% of accepted events with PII
/// violations).
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct QualitySummaryRow {
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// Window end, ms since the epoch.
    pub window_end_ms: u64,
    /// Records accepted.
    pub accepted: i64,
    /// Accepted events weighted by 1 / their `sample_rate`: the events emitted, estimated.
    pub weighted_accepted: f64,
    /// Records rejected (every failure kind but `late`).
    pub rejected: i64,
    /// Records that arrived behind the watermark.
    pub late: i64,
    /// Accepted events with PII violations.
    pub pii_violations: i64,
    /// `rejected / (accepted + rejected)`; 0 for an empty window.
    pub rejection_rate: f64,
    /// `pii_violations / accepted`; 0 for an empty window.
    pub pii_violation_rate: f64,
    /// `rejection_rate < 1%`.
    pub meets_rejection_target: bool,
    /// `pii_violation_rate < 0.1%`.
    pub meets_pii_target: bool,
}

impl QualitySummaryRow {
    /// The summary of one worker's part of a closed `quality` window (parts are merged by
    /// [`Table::combine`] before writing).
    pub fn from_closed(w: &ClosedWindow<QualityKey, QualityCounts>) -> Vec<QualitySummaryRow> {
        vec![QualitySummaryRow::of_totals(
            w.window_start_ms,
            w.window_end_ms,
            QualityTotals::of_window(w),
        )]
    }

    fn of_totals(window_start_ms: u64, window_end_ms: u64, t: QualityTotals) -> QualitySummaryRow {
        QualitySummaryRow {
            window_start_ms,
            window_end_ms,
            accepted: t.accepted,
            weighted_accepted: t.weighted_accepted_micros as f64 / WEIGHT_ONE as f64,
            rejected: t.rejected,
            late: t.late,
            pii_violations: t.pii_violations,
            rejection_rate: t.rejection_rate(),
            pii_violation_rate: t.pii_violation_rate(),
            meets_rejection_target: t.meets_rejection_target(),
            meets_pii_target: t.meets_pii_target(),
        }
    }

    fn totals(&self) -> QualityTotals {
        QualityTotals {
            accepted: self.accepted,
            rejected: self.rejected,
            late: self.late,
            pii_violations: self.pii_violations,
            weighted_accepted_micros: (self.weighted_accepted * WEIGHT_ONE as f64).round() as i64,
        }
    }
}

impl Table for QualitySummaryRow {
    const NAME: &'static str = "quality_summary";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("accepted", DataType::Int64, false),
            Field::new("weighted_accepted", DataType::Float64, false),
            Field::new("rejected", DataType::Int64, false),
            Field::new("late", DataType::Int64, false),
            Field::new("pii_violations", DataType::Int64, false),
            Field::new("rejection_rate", DataType::Float64, false),
            Field::new("pii_violation_rate", DataType::Float64, false),
            Field::new("meets_rejection_target", DataType::Boolean, false),
            Field::new("meets_pii_target", DataType::Boolean, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            ints(rows, |r| r.accepted),
            floats(rows, |r| r.weighted_accepted),
            ints(rows, |r| r.rejected),
            ints(rows, |r| r.late),
            ints(rows, |r| r.pii_violations),
            floats(rows, |r| r.rejection_rate),
            floats(rows, |r| r.pii_violation_rate),
            Arc::new(BooleanArray::from_iter(
                rows.iter().map(|r| Some(r.meets_rejection_target)),
            )) as ArrayRef,
            Arc::new(BooleanArray::from_iter(
                rows.iter().map(|r| Some(r.meets_pii_target)),
            )) as ArrayRef,
        ]);
        batch(Self::schema(), columns)
    }

    fn combine(rows: Vec<Self>) -> Vec<Self> {
        let Some(first) = rows.first() else {
            return rows;
        };
        let (start, end) = (first.window_start_ms, first.window_end_ms);
        let mut totals = QualityTotals::default();
        for row in &rows {
            totals.add(&row.totals());
        }
        vec![QualitySummaryRow::of_totals(start, end, totals)]
    }
}
