//! The product-analytics tables: `funnels` (and, as they are added, the command-queue,
//! integration-health, feedback, alerts and triage tables).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};
use sightline_operators::funnel::{FunnelDef, FunnelKey};
use sightline_operators::{ClosedWindow, LatencyHistogram};

use crate::tables::{batch, floats, ints, strings, window_columns, window_fields};
use crate::{Result, Table};

/// A row of `funnels`: one entry window, funnel, breakdown value and step.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct FunnelRow {
    /// Entry window start, ms since the epoch.
    pub window_start_ms: u64,
    /// Entry window end, ms since the epoch.
    pub window_end_ms: u64,
    /// The funnel's name.
    pub funnel: String,
    /// `all`, or the breakdown's name (`experiment:<id>`, `platform`, …).
    pub breakdown: String,
    /// `all`, or the value.
    pub breakdown_value: String,
    /// The step, 1-based.
    pub step: i64,
    /// The step's event name (`k of n steps` in an unordered funnel).
    pub step_name: String,
    /// Units that entered in the window and reached the step.
    pub units: i64,
    /// `units` ÷ the units of step 1.
    pub conversion_from_entry: f64,
    /// `units` ÷ the units of the step before (1 for step 1).
    pub conversion_from_previous: f64,
    /// Median time from the step-1 event to the step, ms (within 1%).
    pub median_time_to_convert_ms: f64,
    /// 90th percentile of the same, ms (within 1%).
    pub p90_time_to_convert_ms: f64,
}

impl FunnelRow {
    /// The rows of one closed window of the funnel operator, per route and funnel: the
    /// conversions are filled in by [`Table::combine`], once every worker's part is in.
    pub fn from_closed(
        w: &ClosedWindow<FunnelKey, LatencyHistogram>,
        defs: &[FunnelDef],
        restricted: bool,
    ) -> BTreeMap<u16, Vec<FunnelRow>> {
        let mut out: BTreeMap<u16, Vec<FunnelRow>> = BTreeMap::new();
        for (key, h) in w.entries.iter().filter(|(k, _)| k.restricted == restricted) {
            let Some(def) = defs.get(usize::from(key.funnel)) else {
                continue;
            };
            let ms = |q: f64| h.quantile(q).map_or(0.0, |us| us / 1000.0);
            out.entry(key.funnel).or_default().push(FunnelRow {
                window_start_ms: w.window_start_ms,
                window_end_ms: w.window_end_ms,
                funnel: def.name.to_string(),
                breakdown: key.breakdown.to_string(),
                breakdown_value: key.value.to_string(),
                step: i64::from(key.step),
                step_name: def.step_name(usize::from(key.step)),
                units: h.count,
                conversion_from_entry: 0.0,
                conversion_from_previous: 0.0,
                median_time_to_convert_ms: ms(0.5),
                p90_time_to_convert_ms: ms(0.9),
            });
        }
        out
    }
}

impl Table for FunnelRow {
    const NAME: &'static str = "funnels";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("funnel", DataType::Utf8, false),
            Field::new("breakdown", DataType::Utf8, false),
            Field::new("breakdown_value", DataType::Utf8, false),
            Field::new("step", DataType::Int64, false),
            Field::new("step_name", DataType::Utf8, false),
            Field::new("units", DataType::Int64, false),
            Field::new("conversion_from_entry", DataType::Float64, false),
            Field::new("conversion_from_previous", DataType::Float64, false),
            Field::new("median_time_to_convert_ms", DataType::Float64, false),
            Field::new("p90_time_to_convert_ms", DataType::Float64, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            strings(rows, |r| &r.funnel),
            strings(rows, |r| &r.breakdown),
            strings(rows, |r| &r.breakdown_value),
            ints(rows, |r| r.step),
            strings(rows, |r| &r.step_name),
            ints(rows, |r| r.units),
            floats(rows, |r| r.conversion_from_entry),
            floats(rows, |r| r.conversion_from_previous),
            floats(rows, |r| r.median_time_to_convert_ms),
            floats(rows, |r| r.p90_time_to_convert_ms),
        ]);
        batch(Self::schema(), columns)
    }

    /// Fills in the conversions, which need the units of step 1 and of the step before: the
    /// steps of one breakdown value may have been counted on different workers.
    fn combine(mut rows: Vec<Self>) -> Vec<Self> {
        let units: BTreeMap<(String, String, String, i64), i64> = rows
            .iter()
            .map(|r| {
                (
                    (
                        r.funnel.clone(),
                        r.breakdown.clone(),
                        r.breakdown_value.clone(),
                        r.step,
                    ),
                    r.units,
                )
            })
            .collect();
        for r in &mut rows {
            let of = |step: i64| {
                units
                    .get(&(
                        r.funnel.clone(),
                        r.breakdown.clone(),
                        r.breakdown_value.clone(),
                        step,
                    ))
                    .copied()
                    .unwrap_or(0)
            };
            let ratio = |n: i64, d: i64| if d > 0 { n as f64 / d as f64 } else { 0.0 };
            r.conversion_from_entry = ratio(r.units, of(1));
            r.conversion_from_previous = if r.step == 1 {
                1.0
            } else {
                ratio(r.units, of(r.step - 1))
            };
        }
        rows
    }
}
