//! The experiment tables: `experiment_results` (cumulative per closed window),
//! `experiment_exposures` (per window) and `guardrail_decisions` (per sampling interval; also
//! the value of a record on the guardrail topic), and `experiment_did` (the rollouts by
//! tenant, per closed window).

use std::sync::Arc;

use arrow_array::{ArrayRef, BooleanArray, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};
use sightline_operators::ClosedWindow;
use sightline_operators::experiment::{
    Decision, DidFigures, DidRow, ExposureKey, ExposureKind, ResultRow,
};

use crate::tables::{
    batch, floats, ints, opt_floats, opt_ints, strings, window_columns, window_fields,
};
use crate::{Result, Table};

fn bools<T>(rows: &[T], f: impl Fn(&T) -> bool) -> ArrayRef {
    Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(f(r)))))
}

/// A row of `experiment_results`: one metric and arm of an experiment, cumulative since the
/// experiment's start, at the end of a window.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct ExperimentResultRow {
    /// Window start, ms.
    pub window_start_ms: u64,
    /// Window end, ms: the results are as of this watermark.
    pub window_end_ms: u64,
    /// Experiment id.
    pub experiment_id: String,
    /// Metric.
    pub metric: String,
    /// Arm.
    pub arm: String,
    /// Whether the arm is the control.
    pub is_control: bool,
    /// Units analysed.
    pub units: i64,
    /// Mean per unit.
    pub mean: f64,
    /// Variance per unit.
    pub variance: f64,
    /// Absolute effect against control (treatment arms).
    pub effect: Option<f64>,
    /// Its always-valid interval (running intersection), lower bound.
    pub effect_lower: Option<f64>,
    /// Upper bound.
    pub effect_upper: Option<f64>,
    /// Its always-valid p-value (running minimum).
    pub p_value: Option<f64>,
    /// The effect changed over time: an interval fell outside the running intersection,
    /// which restarted there.
    pub effect_drift: Option<bool>,
    /// Relative lift against control, when the control mean is away from 0.
    pub lift: Option<f64>,
    /// Its interval, lower bound.
    pub lift_lower: Option<f64>,
    /// Upper bound.
    pub lift_upper: Option<f64>,
    /// Its p-value.
    pub lift_p_value: Option<f64>,
    /// The experiment's sample-ratio-mismatch p-value.
    pub srm_p_value: f64,
    /// `running`, `significant_positive`, `significant_negative`, `breach`, `killed` or
    /// `unhealthy`.
    pub state: String,
    /// For a latency metric: the quantile (0.95), and then `mean` and `variance` are the
    /// events' latency in ms and `effect`, `lift` the difference of the quantile.
    pub quantile: Option<f64>,
    /// The arm's quantile, ms.
    pub quantile_ms: Option<f64>,
    /// Latency samples (events) in the arm.
    pub samples: Option<i64>,
    /// Mann-Whitney against control: P(treatment > control) + ½ P(tie).
    pub mann_whitney_auc: Option<f64>,
    /// Its two-sided p-value (fixed-horizon, event-level: descriptive).
    pub mann_whitney_p_value: Option<f64>,
    /// CUPED's θ (when at least 100 units of the arm and control had pre-exposure data).
    pub cuped_theta: Option<f64>,
    /// Units of the arm with pre-exposure data.
    pub cuped_units_with_pre: Option<i64>,
    /// The CUPED-adjusted mean.
    pub cuped_mean: Option<f64>,
    /// The adjusted absolute effect, its always-valid interval and p-value.
    pub cuped_effect: Option<f64>,
    /// Lower bound.
    pub cuped_effect_lower: Option<f64>,
    /// Upper bound.
    pub cuped_effect_upper: Option<f64>,
    /// p-value.
    pub cuped_p_value: Option<f64>,
    /// The adjusted relative lift.
    pub cuped_lift: Option<f64>,
    /// Lower bound.
    pub cuped_lift_lower: Option<f64>,
    /// Upper bound.
    pub cuped_lift_upper: Option<f64>,
    /// The rollout phases the effects are post-stratified over (0: none).
    pub phases: i64,
}

impl ExperimentResultRow {
    /// Rows of one closed window.
    pub fn from_closed(w: &ClosedWindow<ResultRow, isize>) -> Vec<ExperimentResultRow> {
        w.entries
            .iter()
            .map(|(r, _)| ExperimentResultRow {
                window_start_ms: w.window_start_ms,
                window_end_ms: w.window_end_ms,
                experiment_id: r.experiment.to_string(),
                metric: r.metric.to_string(),
                arm: r.arm.to_string(),
                is_control: r.control,
                units: r.units,
                mean: r.mean,
                variance: r.variance,
                effect: r.absolute.map(|a| a.estimate),
                effect_lower: r.absolute.map(|a| a.interval.lo),
                effect_upper: r.absolute.map(|a| a.interval.hi),
                p_value: r.absolute.map(|a| a.p_value),
                effect_drift: r.absolute.map(|a| a.drift),
                lift: r.relative.map(|a| a.estimate),
                lift_lower: r.relative.map(|a| a.interval.lo),
                lift_upper: r.relative.map(|a| a.interval.hi),
                lift_p_value: r.relative.map(|a| a.p_value),
                srm_p_value: r.srm_p_value,
                state: r.state.as_str().to_owned(),
                quantile: r.quantile.map(|q| q.q),
                quantile_ms: r.quantile.and_then(|q| q.value_ms),
                samples: r.quantile.map(|q| q.samples),
                mann_whitney_auc: r.quantile.and_then(|q| q.auc),
                mann_whitney_p_value: r.quantile.and_then(|q| q.mann_whitney_p_value),
                cuped_theta: r.cuped.map(|c| c.theta),
                cuped_units_with_pre: r.cuped.map(|c| c.units_with_pre),
                cuped_mean: r.cuped.map(|c| c.mean),
                cuped_effect: r.cuped.and_then(|c| c.absolute).map(|a| a.estimate),
                cuped_effect_lower: r.cuped.and_then(|c| c.absolute).map(|a| a.interval.lo),
                cuped_effect_upper: r.cuped.and_then(|c| c.absolute).map(|a| a.interval.hi),
                cuped_p_value: r.cuped.and_then(|c| c.absolute).map(|a| a.p_value),
                cuped_lift: r.cuped.and_then(|c| c.relative).map(|a| a.estimate),
                cuped_lift_lower: r.cuped.and_then(|c| c.relative).map(|a| a.interval.lo),
                cuped_lift_upper: r.cuped.and_then(|c| c.relative).map(|a| a.interval.hi),
                phases: i64::from(r.phases),
            })
            .collect()
    }
}

impl Table for ExperimentResultRow {
    const NAME: &'static str = "experiment_results";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        let opt = |name: &str| Field::new(name, DataType::Float64, true);
        fields.extend([
            Field::new("experiment_id", DataType::Utf8, false),
            Field::new("metric", DataType::Utf8, false),
            Field::new("arm", DataType::Utf8, false),
            Field::new("is_control", DataType::Boolean, false),
            Field::new("units", DataType::Int64, false),
            Field::new("mean", DataType::Float64, false),
            Field::new("variance", DataType::Float64, false),
            opt("effect"),
            opt("effect_lower"),
            opt("effect_upper"),
            opt("p_value"),
            Field::new("effect_drift", DataType::Boolean, true),
            opt("lift"),
            opt("lift_lower"),
            opt("lift_upper"),
            opt("lift_p_value"),
            Field::new("srm_p_value", DataType::Float64, false),
            Field::new("state", DataType::Utf8, false),
            opt("quantile"),
            opt("quantile_ms"),
            Field::new("samples", DataType::Int64, true),
            opt("mann_whitney_auc"),
            opt("mann_whitney_p_value"),
            opt("cuped_theta"),
            Field::new("cuped_units_with_pre", DataType::Int64, true),
            opt("cuped_mean"),
            opt("cuped_effect"),
            opt("cuped_effect_lower"),
            opt("cuped_effect_upper"),
            opt("cuped_p_value"),
            opt("cuped_lift"),
            opt("cuped_lift_lower"),
            opt("cuped_lift_upper"),
            Field::new("phases", DataType::Int64, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            strings(rows, |r| &r.experiment_id),
            strings(rows, |r| &r.metric),
            strings(rows, |r| &r.arm),
            bools(rows, |r| r.is_control),
            ints(rows, |r| r.units),
            floats(rows, |r| r.mean),
            floats(rows, |r| r.variance),
            opt_floats(rows, |r| r.effect),
            opt_floats(rows, |r| r.effect_lower),
            opt_floats(rows, |r| r.effect_upper),
            opt_floats(rows, |r| r.p_value),
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| r.effect_drift))),
            opt_floats(rows, |r| r.lift),
            opt_floats(rows, |r| r.lift_lower),
            opt_floats(rows, |r| r.lift_upper),
            opt_floats(rows, |r| r.lift_p_value),
            floats(rows, |r| r.srm_p_value),
            strings(rows, |r| &r.state),
            opt_floats(rows, |r| r.quantile),
            opt_floats(rows, |r| r.quantile_ms),
            Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.samples))),
            opt_floats(rows, |r| r.mann_whitney_auc),
            opt_floats(rows, |r| r.mann_whitney_p_value),
            opt_floats(rows, |r| r.cuped_theta),
            Arc::new(Int64Array::from_iter(
                rows.iter().map(|r| r.cuped_units_with_pre),
            )),
            opt_floats(rows, |r| r.cuped_mean),
            opt_floats(rows, |r| r.cuped_effect),
            opt_floats(rows, |r| r.cuped_effect_lower),
            opt_floats(rows, |r| r.cuped_effect_upper),
            opt_floats(rows, |r| r.cuped_p_value),
            opt_floats(rows, |r| r.cuped_lift),
            opt_floats(rows, |r| r.cuped_lift_lower),
            opt_floats(rows, |r| r.cuped_lift_upper),
            ints(rows, |r| r.phases),
        ]);
        batch(Self::schema(), columns)
    }
}

/// A row of `experiment_exposures`: units first exposed to an arm in a window, and units found
/// in a second arm (multiple exposures, left out of the analysis).
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct ExposureRow {
    /// Window start, ms.
    pub window_start_ms: u64,
    /// Window end, ms.
    pub window_end_ms: u64,
    /// Experiment id.
    pub experiment_id: String,
    /// Arm (for a multiple exposure: the arm the unit was first exposed to).
    pub arm: String,
    /// Units first exposed.
    pub exposures: i64,
    /// Units seen in another arm in this window.
    pub multiple_exposures: i64,
    /// Events with this arm's assignment that may not be analysed (a restricted tenant, or
    /// one outside the experiment's allowlist): counted, never analysed.
    pub compliance_events: i64,
}

impl ExposureRow {
    /// Rows of one closed window of exposure counts.
    pub fn from_closed(w: &ClosedWindow<ExposureKey, isize>) -> Vec<ExposureRow> {
        let mut rows: Vec<ExposureRow> = Vec::new();
        for (k, n) in &w.entries {
            let row = match rows
                .iter_mut()
                .find(|r| r.experiment_id == *k.experiment && r.arm == *k.arm)
            {
                Some(row) => row,
                None => {
                    rows.push(ExposureRow {
                        window_start_ms: w.window_start_ms,
                        window_end_ms: w.window_end_ms,
                        experiment_id: k.experiment.to_string(),
                        arm: k.arm.to_string(),
                        exposures: 0,
                        multiple_exposures: 0,
                        compliance_events: 0,
                    });
                    let last = rows.len() - 1;
                    &mut rows[last]
                }
            };
            let n = *n as i64;
            match k.kind {
                ExposureKind::First => row.exposures += n,
                ExposureKind::Multiple => row.multiple_exposures += n,
                ExposureKind::Compliance => row.compliance_events += n,
            }
        }
        rows
    }
}

impl Table for ExposureRow {
    const NAME: &'static str = "experiment_exposures";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("experiment_id", DataType::Utf8, false),
            Field::new("arm", DataType::Utf8, false),
            Field::new("exposures", DataType::Int64, false),
            Field::new("multiple_exposures", DataType::Int64, false),
            Field::new("compliance_events", DataType::Int64, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            strings(rows, |r| &r.experiment_id),
            strings(rows, |r| &r.arm),
            ints(rows, |r| r.exposures),
            ints(rows, |r| r.multiple_exposures),
            ints(rows, |r| r.compliance_events),
        ]);
        batch(Self::schema(), columns)
    }
}

/// A row of `guardrail_decisions`, and the value of a record on the guardrail topic: what a
/// feature-flag platform acts on, with its evidence.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct DecisionRow {
    /// Window start, ms.
    pub window_start_ms: u64,
    /// Window end, ms: the watermark of the decision.
    pub window_end_ms: u64,
    /// Experiment id.
    pub experiment_id: String,
    /// The guardrail's metric, or `rollout` for an experiment without guardrails.
    pub rule: String,
    /// The sampling interval's index since the experiment's first window.
    pub decision_epoch: i64,
    /// `kill`, `hold` or `advance`.
    pub action: String,
    /// The treatment arm.
    pub arm: String,
    /// The metric's absolute effect.
    pub estimate: Option<f64>,
    /// Its one-sided always-valid bound on the harmful side.
    pub bound: Option<f64>,
    /// α.
    pub alpha: f64,
    /// N*.
    pub planned_units: f64,
    /// Units per arm, as a JSON object.
    pub units: String,
    /// Consecutive breached sampling intervals.
    pub breached_intervals: i64,
    /// The experiment's SRM p-value.
    pub srm_p_value: f64,
    /// The configuration's fingerprint.
    pub config_version: String,
}

impl DecisionRow {
    /// Rows of one closed window of decisions.
    pub fn from_closed(w: &ClosedWindow<Decision, isize>) -> Vec<DecisionRow> {
        w.entries
            .iter()
            .map(|(d, _)| {
                let units: std::collections::BTreeMap<&str, i64> =
                    d.units.iter().map(|(a, n)| (&**a, *n)).collect();
                DecisionRow {
                    window_start_ms: w.window_start_ms,
                    window_end_ms: w.window_end_ms,
                    experiment_id: d.experiment.to_string(),
                    rule: d.rule.to_string(),
                    decision_epoch: d.epoch as i64,
                    action: d.action.as_str().to_owned(),
                    arm: d.arm.to_string(),
                    estimate: d.estimate,
                    bound: d.bound,
                    alpha: d.alpha,
                    planned_units: d.n_star,
                    units: serde_json::to_string(&units).unwrap_or_default(),
                    breached_intervals: i64::from(d.breached_intervals),
                    srm_p_value: d.srm_p_value,
                    config_version: format!("{:016x}", d.config_version),
                }
            })
            .collect()
    }

    /// Its key on the guardrail topic: experiment, rule, arm and decision epoch, the same in a
    /// replay.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.experiment_id, self.rule, self.arm, self.decision_epoch
        )
    }
}

impl Table for DecisionRow {
    const NAME: &'static str = "guardrail_decisions";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("experiment_id", DataType::Utf8, false),
            Field::new("rule", DataType::Utf8, false),
            Field::new("decision_epoch", DataType::Int64, false),
            Field::new("action", DataType::Utf8, false),
            Field::new("arm", DataType::Utf8, false),
            Field::new("estimate", DataType::Float64, true),
            Field::new("bound", DataType::Float64, true),
            Field::new("alpha", DataType::Float64, false),
            Field::new("planned_units", DataType::Float64, false),
            Field::new("units", DataType::Utf8, false),
            Field::new("breached_intervals", DataType::Int64, false),
            Field::new("srm_p_value", DataType::Float64, false),
            Field::new("config_version", DataType::Utf8, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            strings(rows, |r| &r.experiment_id),
            strings(rows, |r| &r.rule),
            ints(rows, |r| r.decision_epoch),
            strings(rows, |r| &r.action),
            strings(rows, |r| &r.arm),
            opt_floats(rows, |r| r.estimate),
            opt_floats(rows, |r| r.bound),
            floats(rows, |r| r.alpha),
            floats(rows, |r| r.planned_units),
            strings(rows, |r| &r.units),
            ints(rows, |r| r.breached_intervals),
            floats(rows, |r| r.srm_p_value),
            strings(rows, |r| &r.config_version),
        ]);
        batch(Self::schema(), columns)
    }
}

/// A row of `experiment_did`: a metric of a rollout by tenant, for one cohort (or all that
/// have started), by difference in differences against the never-treated tenants, as of the
/// end of a window. The interval and p-value are fixed-horizon (descriptive: no decision is
/// taken on them).
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct ExperimentDidRow {
    /// Window start, ms.
    pub window_start_ms: u64,
    /// Window end, ms.
    pub window_end_ms: u64,
    /// Experiment id.
    pub experiment_id: String,
    /// Metric.
    pub metric: String,
    /// The cohort's start, ms; `None`: every cohort that has started, combined.
    pub cohort_start_ms: Option<i64>,
    /// Treated tenants with data before and after.
    pub treated_tenants: i64,
    /// Control tenants with data before and after.
    pub control_tenants: i64,
    /// Periods before the start that are compared.
    pub pre_periods: i64,
    /// Periods since the start.
    pub post_periods: i64,
    /// The treated tenants' mean change (after less before, per active unit).
    pub treated_change: Option<f64>,
    /// The controls' mean change.
    pub control_change: Option<f64>,
    /// The difference in differences.
    pub estimate: Option<f64>,
    /// Its interval (1 − α, Student's t), lower bound.
    pub lower: Option<f64>,
    /// Upper bound.
    pub upper: Option<f64>,
    /// Its two-sided p-value.
    pub p_value: Option<f64>,
    /// The pre-trend check: the same estimate on the pre-period's later half less its
    /// earlier half.
    pub pre_trend: Option<f64>,
    /// Its p-value (below α: the state is `pre_trend`).
    pub pre_trend_p_value: Option<f64>,
    /// `insufficient`, `pre_trend`, `significant_positive`, `significant_negative` or
    /// `running`.
    pub state: String,
}

impl ExperimentDidRow {
    /// Rows of one closed window.
    pub fn from_closed(w: &ClosedWindow<DidRow, isize>) -> Vec<ExperimentDidRow> {
        let fig = |f: Option<DidFigures>, g: fn(DidFigures) -> f64| f.map(g);
        w.entries
            .iter()
            .map(|(r, _)| ExperimentDidRow {
                window_start_ms: w.window_start_ms,
                window_end_ms: w.window_end_ms,
                experiment_id: r.experiment.to_string(),
                metric: r.metric.to_string(),
                cohort_start_ms: r.cohort_start_ms.map(|s| s as i64),
                treated_tenants: r.treated_tenants,
                control_tenants: r.control_tenants,
                pre_periods: r.pre_periods,
                post_periods: r.post_periods,
                treated_change: fig(r.estimate, |f| f.treated_change),
                control_change: fig(r.estimate, |f| f.control_change),
                estimate: fig(r.estimate, |f| f.estimate),
                lower: fig(r.estimate, |f| f.lower),
                upper: fig(r.estimate, |f| f.upper),
                p_value: fig(r.estimate, |f| f.p_value),
                pre_trend: fig(r.pre_trend, |f| f.estimate),
                pre_trend_p_value: fig(r.pre_trend, |f| f.p_value),
                state: r.state.as_str().to_owned(),
            })
            .collect()
    }
}

impl Table for ExperimentDidRow {
    const NAME: &'static str = "experiment_did";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("experiment_id", DataType::Utf8, false),
            Field::new("metric", DataType::Utf8, false),
            Field::new("cohort_start_ms", DataType::Int64, true),
            Field::new("treated_tenants", DataType::Int64, false),
            Field::new("control_tenants", DataType::Int64, false),
            Field::new("pre_periods", DataType::Int64, false),
            Field::new("post_periods", DataType::Int64, false),
            Field::new("treated_change", DataType::Float64, true),
            Field::new("control_change", DataType::Float64, true),
            Field::new("estimate", DataType::Float64, true),
            Field::new("lower", DataType::Float64, true),
            Field::new("upper", DataType::Float64, true),
            Field::new("p_value", DataType::Float64, true),
            Field::new("pre_trend", DataType::Float64, true),
            Field::new("pre_trend_p_value", DataType::Float64, true),
            Field::new("state", DataType::Utf8, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            strings(rows, |r| &r.experiment_id),
            strings(rows, |r| &r.metric),
            opt_ints(rows, |r| r.cohort_start_ms),
            ints(rows, |r| r.treated_tenants),
            ints(rows, |r| r.control_tenants),
            ints(rows, |r| r.pre_periods),
            ints(rows, |r| r.post_periods),
            opt_floats(rows, |r| r.treated_change),
            opt_floats(rows, |r| r.control_change),
            opt_floats(rows, |r| r.estimate),
            opt_floats(rows, |r| r.lower),
            opt_floats(rows, |r| r.upper),
            opt_floats(rows, |r| r.p_value),
            opt_floats(rows, |r| r.pre_trend),
            opt_floats(rows, |r| r.pre_trend_p_value),
            strings(rows, |r| &r.state),
        ]);
        batch(Self::schema(), columns)
    }
}
