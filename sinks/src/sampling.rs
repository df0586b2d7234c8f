//! The `sampling_budgets` table and the records of the sampling topic: one row per segment of
//! each interval's rate table.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};
use sightline_operators::sampling::{BudgetTable, SegmentField};

use crate::tables::{batch, floats, ints, strings, window_columns, window_fields};
use crate::{Result, Table};

/// A row of `sampling_budgets`, and the value of a record on the sampling topic (keyed by
/// [`BudgetRow::key`], its segment, so that a compacted topic keeps the latest table).
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct BudgetRow {
    /// Interval start, ms.
    pub window_start_ms: u64,
    /// Interval end, ms.
    pub window_end_ms: u64,
    /// The table's version: every row of one table has it; a newer table has a higher one.
    pub version: u64,
    /// The segment's values joined with `/`, in the configured field order; `*` in every
    /// place for the default row (the rate of a segment not in the table).
    pub segment: String,
    /// The segment's values by field name.
    pub fields: BTreeMap<String, String>,
    /// Weighted sampleable events in the interval.
    pub volume: f64,
    /// Weighted never-sampled events in the interval (kept at rate 1).
    pub always_kept: f64,
    /// Events received (unweighted).
    pub events: i64,
    /// The new-release risk term, in [0, 1].
    pub new_release: f64,
    /// The new-tenant risk term.
    pub new_tenant: f64,
    /// The segment's context's error share in the interval.
    pub error_share: f64,
    /// Its moving baseline before the interval.
    pub error_baseline: f64,
    /// The z-score of the share against the baseline.
    pub error_z: f64,
    /// The elevated-error risk term.
    pub elevated_errors: f64,
    /// The experiment risk term (ramping, or a guardrail breach in progress).
    pub experiment: f64,
    /// 1 + the weighted terms.
    pub risk: f64,
    /// The sampling rate an SDK applies to the segment, in (0, 1].
    pub rate: f64,
    /// `rate × volume`.
    pub expected_kept: f64,
    /// `budget`, `cap`, `floor`, `damped`, `under_budget`, `never_sampled`, `idle`,
    /// `forgotten` or `default`.
    pub reason: String,
}

impl BudgetRow {
    /// The rows of one table; `fields` are the segment's fields, in order.
    pub fn of_table(table: &BudgetTable, fields: &[SegmentField]) -> Vec<BudgetRow> {
        table
            .rows
            .iter()
            .map(|r| BudgetRow {
                window_start_ms: table.window_start_ms,
                window_end_ms: table.window_end_ms,
                version: table.version,
                segment: r.segment.join("/"),
                fields: fields
                    .iter()
                    .zip(&r.segment)
                    .map(|(f, v)| (f.name().to_owned(), v.to_string()))
                    .collect(),
                volume: r.volume,
                always_kept: r.always_kept,
                events: r.events,
                new_release: r.new_release,
                new_tenant: r.new_tenant,
                error_share: r.error_share,
                error_baseline: r.error_baseline,
                error_z: r.error_z,
                elevated_errors: r.elevated_errors,
                experiment: r.experiment,
                risk: r.risk,
                rate: r.rate,
                expected_kept: r.expected_kept,
                reason: r.reason.clone(),
            })
            .collect()
    }

    /// The record key on the sampling topic: the segment.
    pub fn key(&self) -> String {
        self.segment.clone()
    }
}

impl Table for BudgetRow {
    const NAME: &'static str = "sampling_budgets";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        let float = |name: &str| Field::new(name, DataType::Float64, false);
        fields.extend([
            Field::new("version", DataType::Int64, false),
            Field::new("segment", DataType::Utf8, false),
            Field::new("fields", DataType::Utf8, false),
            float("volume"),
            float("always_kept"),
            Field::new("events", DataType::Int64, false),
            float("new_release"),
            float("new_tenant"),
            float("error_share"),
            float("error_baseline"),
            float("error_z"),
            float("elevated_errors"),
            float("experiment"),
            float("risk"),
            float("rate"),
            float("expected_kept"),
            Field::new("reason", DataType::Utf8, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        let fields: Vec<String> = rows
            .iter()
            .map(|r| serde_json::to_string(&r.fields).unwrap_or_default())
            .collect();
        columns.extend([
            ints(rows, |r| r.version as i64),
            strings(rows, |r| &r.segment),
            strings(&fields, |f| f),
            floats(rows, |r| r.volume),
            floats(rows, |r| r.always_kept),
            ints(rows, |r| r.events),
            floats(rows, |r| r.new_release),
            floats(rows, |r| r.new_tenant),
            floats(rows, |r| r.error_share),
            floats(rows, |r| r.error_baseline),
            floats(rows, |r| r.error_z),
            floats(rows, |r| r.elevated_errors),
            floats(rows, |r| r.experiment),
            floats(rows, |r| r.risk),
            floats(rows, |r| r.rate),
            floats(rows, |r| r.expected_kept),
            strings(rows, |r| &r.reason),
        ]);
        batch(Self::schema(), columns)
    }
}
