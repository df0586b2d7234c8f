//! The product-analytics tables: `funnels`, `command_queue`, `integration_health`, `alerts`
//! and `feedback`.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};
use sightline_operators::alerts::{Alert, HealthWindow};
use sightline_operators::funnel::{FunnelDef, FunnelKey};
use sightline_operators::product::{ProductKey, Tally};
use sightline_operators::{ClosedWindow, LatencyHistogram};

use crate::tables::{batch, floats, ints, opt_floats, strings, window_columns, window_fields};
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
    /// The units they stand for, Horvitz–Thompson (each weighs 1 / the smallest `sample_rate`
    /// of its events through the step; `units` when nothing was sampled).
    pub weighted_units: f64,
    /// `weighted_units` ÷ the weighted units of step 1.
    pub conversion_from_entry: f64,
    /// `weighted_units` ÷ the weighted units of the step before (1 for step 1).
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
                weighted_units: h.weighted_count(),
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
            Field::new("weighted_units", DataType::Float64, false),
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
            floats(rows, |r| r.weighted_units),
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
        let units: BTreeMap<(String, String, String, i64), f64> = rows
            .iter()
            .map(|r| {
                (
                    (
                        r.funnel.clone(),
                        r.breakdown.clone(),
                        r.breakdown_value.clone(),
                        r.step,
                    ),
                    r.weighted_units,
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
                    .unwrap_or(0.0)
            };
            // With no weights, n and d are whole numbers and the ratio is units ÷ units.
            let ratio = |n: f64, d: f64| if d > 0.0 { n / d } else { 0.0 };
            r.conversion_from_entry = ratio(r.weighted_units, of(1));
            r.conversion_from_previous = if r.step == 1 {
                1.0
            } else {
                ratio(r.weighted_units, of(r.step - 1))
            };
        }
        rows
    }
}

/// Count, mean, p50 and p90 of a distribution of a [`Tally`], in its unit.
#[derive(Clone, Debug, Default, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct Spread {
    /// Samples.
    pub count: i64,
    /// Exact mean (`None` without samples).
    pub mean: Option<f64>,
    /// Median, within 1%.
    pub p50: Option<f64>,
    /// 90th percentile, within 1%.
    pub p90: Option<f64>,
}

impl Spread {
    fn of(tally: &Tally, name: &str) -> Spread {
        let Some(h) = tally.dist(name) else {
            return Spread::default();
        };
        let unit = |v: f64| v / 1_000_000.0;
        Spread {
            count: h.count,
            mean: h.mean_us().map(unit),
            p50: h.quantile(0.5).map(unit),
            p90: h.quantile(0.9).map(unit),
        }
    }

    fn fields(prefix: &str) -> Vec<Field> {
        vec![
            Field::new(format!("{prefix}_count"), DataType::Int64, false),
            Field::new(format!("{prefix}_mean"), DataType::Float64, true),
            Field::new(format!("{prefix}_p50"), DataType::Float64, true),
            Field::new(format!("{prefix}_p90"), DataType::Float64, true),
        ]
    }

    fn columns<T>(rows: &[T], f: impl Fn(&T) -> &Spread) -> Vec<arrow_array::ArrayRef> {
        vec![
            ints(rows, |r| f(r).count),
            opt_floats(rows, |r| f(r).mean),
            opt_floats(rows, |r| f(r).p50),
            opt_floats(rows, |r| f(r).p90),
        ]
    }
}

fn json_counts(counts: &std::collections::BTreeMap<String, i64>) -> String {
    serde_json::to_string(counts).unwrap_or_else(|_| "{}".into())
}

/// A row of `command_queue`: one window and `action_type` (`all` for every type, the only
/// one that counts views).
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct CommandQueueRow {
    /// Window start, ms.
    pub window_start_ms: u64,
    /// Window end, ms.
    pub window_end_ms: u64,
    /// The action type, or `all`.
    pub action_type: String,
    /// `recommendation_generated` events.
    pub generated: i64,
    /// `recommendation_viewed` events (`all` only).
    pub viewed: i64,
    /// `recommendation_accepted` events.
    pub accepted: i64,
    /// `recommendation_dismissed` events.
    pub dismissed: i64,
    /// accepted ÷ generated in the window (the seed's query); `None` without generated ones.
    pub acceptance_rate: Option<f64>,
    /// APS scores of accepted recommendations.
    pub aps_accepted: Spread,
    /// APS scores of dismissed recommendations.
    pub aps_dismissed: Spread,
    /// Time to decision of accepted recommendations, seconds.
    pub time_to_decision_s: Spread,
    /// Dismissals per `dismiss_reason`, as a JSON object.
    pub dismiss_reasons: String,
}

impl CommandQueueRow {
    /// Rows of one closed window.
    pub fn from_closed(w: ClosedWindow<ProductKey, Tally>) -> Vec<CommandQueueRow> {
        w.entries
            .into_iter()
            .map(|(k, t)| {
                let generated = t.get("generated");
                CommandQueueRow {
                    window_start_ms: w.window_start_ms,
                    window_end_ms: w.window_end_ms,
                    action_type: k.group.to_string(),
                    generated,
                    viewed: t.get("viewed"),
                    accepted: t.get("accepted"),
                    dismissed: t.get("dismissed"),
                    acceptance_rate: (generated > 0)
                        .then(|| t.get("accepted") as f64 / generated as f64),
                    aps_accepted: Spread::of(&t, "aps_accepted"),
                    aps_dismissed: Spread::of(&t, "aps_dismissed"),
                    time_to_decision_s: Spread::of(&t, "time_to_decision_s"),
                    dismiss_reasons: json_counts(&t.counts_with("reason:")),
                }
            })
            .collect()
    }
}

impl Table for CommandQueueRow {
    const NAME: &'static str = "command_queue";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("action_type", DataType::Utf8, false),
            Field::new("generated", DataType::Int64, false),
            Field::new("viewed", DataType::Int64, false),
            Field::new("accepted", DataType::Int64, false),
            Field::new("dismissed", DataType::Int64, false),
            Field::new("acceptance_rate", DataType::Float64, true),
        ]);
        fields.extend(Spread::fields("aps_accepted"));
        fields.extend(Spread::fields("aps_dismissed"));
        fields.extend(Spread::fields("time_to_decision_s"));
        fields.push(Field::new("dismiss_reasons", DataType::Utf8, false));
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            strings(rows, |r| &r.action_type),
            ints(rows, |r| r.generated),
            ints(rows, |r| r.viewed),
            ints(rows, |r| r.accepted),
            ints(rows, |r| r.dismissed),
            opt_floats(rows, |r| r.acceptance_rate),
        ]);
        columns.extend(Spread::columns(rows, |r| &r.aps_accepted));
        columns.extend(Spread::columns(rows, |r| &r.aps_dismissed));
        columns.extend(Spread::columns(rows, |r| &r.time_to_decision_s));
        columns.push(strings(rows, |r| &r.dismiss_reasons));
        batch(Self::schema(), columns)
    }
}

/// A row of `integration_health`: one window and integration.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct IntegrationHealthRow {
    /// Window start, ms.
    pub window_start_ms: u64,
    /// Window end, ms.
    pub window_end_ms: u64,
    /// `integration` (or the breaker's `service`).
    pub integration: String,
    /// Calls (successful and failed).
    pub calls: i64,
    /// Failed calls.
    pub failures: i64,
    /// failures ÷ calls; `None` without calls.
    pub error_rate: Option<f64>,
    /// Calls answered 429.
    pub rate_limit_hits: i64,
    /// Successful calls with a latency.
    pub latency_count: i64,
    /// Their median latency, ms (within 1%).
    pub latency_p50_ms: Option<f64>,
    /// p95, ms.
    pub latency_p95_ms: Option<f64>,
    /// p99, ms.
    pub latency_p99_ms: Option<f64>,
    /// `circuit_breaker_opened` events.
    pub breaker_opens: i64,
    /// `open` or `closed` at the window's end.
    pub breaker_state: String,
}

impl IntegrationHealthRow {
    /// Rows of one evaluated window.
    pub fn from_health(w: &HealthWindow) -> Vec<IntegrationHealthRow> {
        w.rows
            .iter()
            .map(|r| {
                let t = &r.tally;
                let calls = t.get("calls");
                let latency = t.dist("latency_ms");
                let q = |q: f64| latency.and_then(|h| h.quantile(q)).map(|v| v / 1_000_000.0);
                IntegrationHealthRow {
                    window_start_ms: w.window_start_ms,
                    window_end_ms: w.window_end_ms,
                    integration: r.integration.to_string(),
                    calls,
                    failures: t.get("failures"),
                    error_rate: (calls > 0).then(|| t.get("failures") as f64 / calls as f64),
                    rate_limit_hits: t.get("rate_limited"),
                    latency_count: latency.map_or(0, |h| h.count),
                    latency_p50_ms: q(0.5),
                    latency_p95_ms: q(0.95),
                    latency_p99_ms: q(0.99),
                    breaker_opens: t.get("breaker_opens"),
                    breaker_state: if r.breaker_open { "open" } else { "closed" }.into(),
                }
            })
            .collect()
    }
}

impl Table for IntegrationHealthRow {
    const NAME: &'static str = "integration_health";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("integration", DataType::Utf8, false),
            Field::new("calls", DataType::Int64, false),
            Field::new("failures", DataType::Int64, false),
            Field::new("error_rate", DataType::Float64, true),
            Field::new("rate_limit_hits", DataType::Int64, false),
            Field::new("latency_count", DataType::Int64, false),
            Field::new("latency_p50_ms", DataType::Float64, true),
            Field::new("latency_p95_ms", DataType::Float64, true),
            Field::new("latency_p99_ms", DataType::Float64, true),
            Field::new("breaker_opens", DataType::Int64, false),
            Field::new("breaker_state", DataType::Utf8, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            strings(rows, |r| &r.integration),
            ints(rows, |r| r.calls),
            ints(rows, |r| r.failures),
            opt_floats(rows, |r| r.error_rate),
            ints(rows, |r| r.rate_limit_hits),
            ints(rows, |r| r.latency_count),
            opt_floats(rows, |r| r.latency_p50_ms),
            opt_floats(rows, |r| r.latency_p95_ms),
            opt_floats(rows, |r| r.latency_p99_ms),
            ints(rows, |r| r.breaker_opens),
            strings(rows, |r| &r.breaker_state),
        ]);
        batch(Self::schema(), columns)
    }
}

/// A row of `alerts`, and the value of a record on the alerts topic: a rule's change of state
/// for one integration in one window.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct AlertRow {
    /// Window start, ms.
    pub window_start_ms: u64,
    /// Window end, ms.
    pub window_end_ms: u64,
    /// `standard` or `restricted`.
    pub route: String,
    /// `error_rate`, `latency_p99` or `breaker_open`.
    pub rule: String,
    /// The integration.
    pub subject: String,
    /// `page`, `warning`, `critical`.
    pub severity: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// The rule's value in the window.
    pub value: f64,
    /// Its threshold.
    pub threshold: f64,
    /// Calls in the window.
    pub calls: i64,
}

impl AlertRow {
    /// Rows of one evaluated window.
    pub fn from_health(w: &HealthWindow, route: &str) -> Vec<AlertRow> {
        w.alerts.iter().map(|a| AlertRow::of(a, route)).collect()
    }

    /// The row of one alert on `route`.
    pub fn of(a: &Alert, route: &str) -> AlertRow {
        AlertRow {
            window_start_ms: a.window_start_ms,
            window_end_ms: a.window_end_ms,
            route: route.to_owned(),
            rule: a.rule.clone(),
            subject: a.subject.clone(),
            severity: a.severity.clone(),
            state: a.state.clone(),
            value: a.value,
            threshold: a.threshold,
            calls: a.calls,
        }
    }

    /// Its key on the alerts topic: route, rule, subject and window, the same in a replay.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.route, self.rule, self.subject, self.window_start_ms
        )
    }
}

impl Table for AlertRow {
    const NAME: &'static str = "alerts";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("route", DataType::Utf8, false),
            Field::new("rule", DataType::Utf8, false),
            Field::new("subject", DataType::Utf8, false),
            Field::new("severity", DataType::Utf8, false),
            Field::new("state", DataType::Utf8, false),
            Field::new("value", DataType::Float64, false),
            Field::new("threshold", DataType::Float64, false),
            Field::new("calls", DataType::Int64, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            strings(rows, |r| &r.route),
            strings(rows, |r| &r.rule),
            strings(rows, |r| &r.subject),
            strings(rows, |r| &r.severity),
            strings(rows, |r| &r.state),
            floats(rows, |r| r.value),
            floats(rows, |r| r.threshold),
            ints(rows, |r| r.calls),
        ]);
        batch(Self::schema(), columns)
    }
}

/// A row of `feedback`: one window, feature area and breakdown value.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct FeedbackRow {
    /// Window start, ms.
    pub window_start_ms: u64,
    /// Window end, ms.
    pub window_end_ms: u64,
    /// `feature_area`.
    pub feature_area: String,
    /// `all`, `experiment:<id>` or `user_role`.
    pub breakdown: String,
    /// Its value.
    pub breakdown_value: String,
    /// Feedback events.
    pub count: i64,
    /// Counts of scores 1 to 5.
    pub scores: [i64; 5],
    /// Mean score; `None` without scores.
    pub mean_score: Option<f64>,
    /// Counts per sentiment, as a JSON object.
    pub sentiments: String,
    /// Counts per tag, as a JSON object.
    pub tags: String,
    /// Feedback that says the user was blocked.
    pub blocked: i64,
}

impl FeedbackRow {
    /// Rows of one closed window.
    pub fn from_closed(w: ClosedWindow<ProductKey, Tally>) -> Vec<FeedbackRow> {
        w.entries
            .into_iter()
            .map(|(k, t)| FeedbackRow {
                window_start_ms: w.window_start_ms,
                window_end_ms: w.window_end_ms,
                feature_area: k.group.to_string(),
                breakdown: k.breakdown.0.to_string(),
                breakdown_value: k.breakdown.1.to_string(),
                count: t.get("feedback"),
                scores: [1, 2, 3, 4, 5].map(|s| t.get(&format!("score:{s}"))),
                mean_score: t
                    .dist("score")
                    .and_then(|h| h.mean_us())
                    .map(|m| m / 1_000_000.0),
                sentiments: json_counts(&t.counts_with("sentiment:")),
                tags: json_counts(&t.counts_with("tag:")),
                blocked: t.get("blocked"),
            })
            .collect()
    }
}

impl Table for FeedbackRow {
    const NAME: &'static str = "feedback";

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("feature_area", DataType::Utf8, false),
            Field::new("breakdown", DataType::Utf8, false),
            Field::new("breakdown_value", DataType::Utf8, false),
            Field::new("count", DataType::Int64, false),
        ]);
        for s in 1..=5 {
            fields.push(Field::new(format!("score_{s}"), DataType::Int64, false));
        }
        fields.extend([
            Field::new("mean_score", DataType::Float64, true),
            Field::new("sentiments", DataType::Utf8, false),
            Field::new("tags", DataType::Utf8, false),
            Field::new("blocked", DataType::Int64, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            strings(rows, |r| &r.feature_area),
            strings(rows, |r| &r.breakdown),
            strings(rows, |r| &r.breakdown_value),
            ints(rows, |r| r.count),
        ]);
        for s in 0..5 {
            columns.push(ints(rows, |r| r.scores[s]));
        }
        columns.extend([
            opt_floats(rows, |r| r.mean_score),
            strings(rows, |r| &r.sentiments),
            strings(rows, |r| &r.tags),
            ints(rows, |r| r.blocked),
        ]);
        batch(Self::schema(), columns)
    }
}

/// A row of `triage`, and the value of a record on the triage topic: one critical feedback
/// with its context and the user's recent errors.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct TriageRow {
    /// The feedback's window start, ms.
    pub window_start_ms: u64,
    /// Its end, ms.
    pub window_end_ms: u64,
    /// The feedback's `event_id`: the record's key.
    pub event_id: String,
    /// The feedback's time, ms.
    pub feedback_time_ms: u64,
    /// `standard` or `restricted`.
    pub route: String,
    /// Tenant pseudonym.
    pub tenant_id: String,
    /// User pseudonym.
    pub user_id: String,
    /// `feature_area`.
    pub feature_area: String,
    /// `workflow_name`, if any.
    pub workflow_name: Option<String>,
    /// `surface`, if any.
    pub surface: Option<String>,
    /// Experiment buckets, as a JSON object.
    pub experiments: String,
    /// `correlation_id`, if any.
    pub correlation_id: Option<String>,
    /// The score.
    pub score: Option<f64>,
    /// Whether the user was blocked.
    pub blocked: bool,
    /// `sentiment`, if any.
    pub sentiment: Option<String>,
    /// Errors of the same user in the span before the feedback.
    pub recent_errors: i64,
    /// Their event names, in time order, as a JSON array.
    pub recent_error_names: String,
    /// Their codes (`error_code`, `error_type` or `status_code`), as a JSON array.
    pub recent_error_codes: String,
}

impl TriageRow {
    /// Rows of one closed window.
    pub fn from_closed(
        w: &ClosedWindow<sightline_operators::triage::TriageRecord, isize>,
        restricted: bool,
    ) -> Vec<TriageRow> {
        w.entries
            .iter()
            .filter(|(r, n)| r.restricted == restricted && *n > 0)
            .map(|(r, _)| {
                let c = &r.context;
                let experiments: std::collections::BTreeMap<&str, &str> =
                    c.experiments.iter().map(|(e, v)| (&**e, &**v)).collect();
                let names: Vec<&str> = r.errors.iter().map(|(_, n, _)| &**n).collect();
                let codes: Vec<Option<&str>> =
                    r.errors.iter().map(|(_, _, c)| c.as_deref()).collect();
                TriageRow {
                    window_start_ms: w.window_start_ms,
                    window_end_ms: w.window_end_ms,
                    event_id: c.event_id.clone(),
                    feedback_time_ms: r.at_ms,
                    route: if restricted { "restricted" } else { "standard" }.into(),
                    tenant_id: c.tenant_id.clone(),
                    user_id: c.user_id.clone(),
                    feature_area: c.feature_area.to_string(),
                    workflow_name: c.workflow_name.as_ref().map(|l| l.to_string()),
                    surface: c.surface.as_ref().map(|l| l.to_string()),
                    experiments: serde_json::to_string(&experiments).unwrap_or_default(),
                    correlation_id: c.correlation_id.as_ref().map(|l| l.to_string()),
                    score: c.score_millis.map(|s| s as f64 / 1000.0),
                    blocked: c.blocked,
                    sentiment: c.sentiment.as_ref().map(|l| l.to_string()),
                    recent_errors: r.errors.len() as i64,
                    recent_error_names: serde_json::to_string(&names).unwrap_or_default(),
                    recent_error_codes: serde_json::to_string(&codes).unwrap_or_default(),
                }
            })
            .collect()
    }
}

impl Table for TriageRow {
    const NAME: &'static str = "triage";
    const RAW: bool = true;

    fn schema() -> SchemaRef {
        let mut fields = window_fields();
        fields.extend([
            Field::new("event_id", DataType::Utf8, false),
            Field::new("feedback_time_ms", DataType::Int64, false),
            Field::new("route", DataType::Utf8, false),
            Field::new("tenant_id", DataType::Utf8, false),
            Field::new("user_id", DataType::Utf8, false),
            Field::new("feature_area", DataType::Utf8, false),
            Field::new("workflow_name", DataType::Utf8, true),
            Field::new("surface", DataType::Utf8, true),
            Field::new("experiments", DataType::Utf8, false),
            Field::new("correlation_id", DataType::Utf8, true),
            Field::new("score", DataType::Float64, true),
            Field::new("blocked", DataType::Boolean, false),
            Field::new("sentiment", DataType::Utf8, true),
            Field::new("recent_errors", DataType::Int64, false),
            Field::new("recent_error_names", DataType::Utf8, false),
            Field::new("recent_error_codes", DataType::Utf8, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        use crate::tables::opt_strings;
        let mut columns = window_columns(rows, |r| r.window_start_ms, |r| r.window_end_ms);
        columns.extend([
            strings(rows, |r| &r.event_id),
            ints(rows, |r| r.feedback_time_ms as i64),
            strings(rows, |r| &r.route),
            strings(rows, |r| &r.tenant_id),
            strings(rows, |r| &r.user_id),
            strings(rows, |r| &r.feature_area),
            opt_strings(rows, |r| r.workflow_name.as_deref()),
            opt_strings(rows, |r| r.surface.as_deref()),
            strings(rows, |r| &r.experiments),
            opt_strings(rows, |r| r.correlation_id.as_deref()),
            opt_floats(rows, |r| r.score),
            Arc::new(arrow_array::BooleanArray::from_iter(
                rows.iter().map(|r| Some(r.blocked)),
            )),
            opt_strings(rows, |r| r.sentiment.as_deref()),
            ints(rows, |r| r.recent_errors),
            strings(rows, |r| &r.recent_error_names),
            strings(rows, |r| &r.recent_error_codes),
        ]);
        batch(Self::schema(), columns)
    }
}
