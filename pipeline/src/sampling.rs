//! `[sampling]`: the adaptive telemetry budgets' configuration, checked with the field named,
//! and turned into the operator's [`SamplingRules`].

use anyhow::bail;
use serde::{Deserialize, Serialize};
use sightline_operators::sampling::plan::event_type_named;
use sightline_operators::sampling::{MAX_SEGMENT_FIELDS, RiskWeights, SamplingRules, SegmentField};
use sightline_schemas::{EventName, Label};

use crate::experiments::ExperimentConfig;

/// The budgets (`[sampling]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Compute and publish the budgets.
    pub enabled: bool,
    /// Events per second kept across all segments (never-sampled events included).
    pub budget_events_per_second: f64,
    /// The segment key: envelope fields (`feature_area`, `event_type`, `event_name`,
    /// `app_version`, `platform`, `source`, `surface`, `workflow_name`, `user_role`), at most
    /// four.
    pub segment_fields: Vec<String>,
    /// Windows per update interval.
    pub interval_windows: u64,
    /// The lowest rate an active segment gets, in (0, 1].
    pub floor: f64,
    /// The rate of a segment never seen before, and of the table's default row.
    pub initial_rate: f64,
    /// A rate grows at most this many times per interval (≥ 1).
    pub max_rate_increase: f64,
    /// A rate shrinks at most this many times per interval (≥ 1), unless the budget needs
    /// more.
    pub max_rate_decrease: f64,
    /// How long an app version counts as a new release after it is first seen, ms.
    pub new_release_ms: u64,
    /// How long a tenant counts as new after it is first seen, ms.
    pub new_tenant_ms: u64,
    /// The error share's z-score at which the error term starts (it is 1 at twice this).
    pub error_z_threshold: f64,
    /// The weight of one interval in the moving error baseline, in (0, 1].
    pub baseline_weight: f64,
    /// Fewer events than this in an interval: no error z-score for the segment.
    pub min_events: i64,
    /// The risk terms' weights (risk = 1 + Σ weight × term).
    pub weights: WeightsConfig,
    /// Event types (`error`, …) and event names kept at rate 1, always.
    pub never_sampled: Vec<String>,
    /// A segment idle for more intervals than this leaves the table.
    pub forget_after_intervals: u32,
    /// App versions and tenants unseen this long are forgotten, ms.
    pub remember_ms: u64,
}

/// The risk terms' weights (`[sampling.weights]`), each ≥ 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct WeightsConfig {
    /// A new release.
    pub new_release: f64,
    /// A new tenant.
    pub new_tenant: f64,
    /// An error share above its baseline.
    pub error_rate: f64,
    /// An experiment ramping or breaching a guardrail.
    pub experiment: f64,
}

impl Default for WeightsConfig {
    fn default() -> Self {
        let w = RiskWeights::default();
        WeightsConfig {
            new_release: w.new_release,
            new_tenant: w.new_tenant,
            error_rate: w.error_rate,
            experiment: w.experiment,
        }
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        let r = SamplingRules::default();
        SamplingConfig {
            enabled: true,
            budget_events_per_second: r.budget_per_second,
            segment_fields: r.fields.iter().map(|f| f.name().to_owned()).collect(),
            interval_windows: r.interval_windows,
            floor: r.floor,
            initial_rate: r.initial_rate,
            max_rate_increase: r.max_increase,
            max_rate_decrease: r.max_decrease,
            new_release_ms: r.new_release_ms,
            new_tenant_ms: r.new_tenant_ms,
            error_z_threshold: r.error_z,
            baseline_weight: r.baseline_weight,
            min_events: r.min_events,
            weights: WeightsConfig::default(),
            never_sampled: r
                .never_sampled
                .iter()
                .map(|t| t.as_str().to_owned())
                .chain(r.never_sampled_names.iter().map(|n| n.as_str().to_owned()))
                .collect(),
            forget_after_intervals: r.forget_after_intervals,
            remember_ms: r.remember_ms,
        }
    }
}

impl SamplingConfig {
    /// The operator's rules, checked (an error names the field); `None` when off. Experiments
    /// with two or more phases ramp between their first and last phase start.
    pub fn rules(&self, experiments: &[ExperimentConfig]) -> anyhow::Result<Option<SamplingRules>> {
        let mut fields = Vec::new();
        for (i, name) in self.segment_fields.iter().enumerate() {
            let Some(field) = SegmentField::parse(name) else {
                bail!(
                    "sampling.segment-fields[{i}]: `{name}` is not a segment field (one of {})",
                    SegmentField::ALL.map(|f| f.name()).join(", ")
                );
            };
            if fields.contains(&field) {
                bail!("sampling.segment-fields[{i}]: `{name}` is listed twice");
            }
            fields.push(field);
        }
        if fields.is_empty() || fields.len() > MAX_SEGMENT_FIELDS {
            bail!("sampling.segment-fields must list 1 to {MAX_SEGMENT_FIELDS} fields");
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let rate = |v: f64| positive(v) && v <= 1.0;
        if !positive(self.budget_events_per_second) {
            bail!("sampling.budget-events-per-second must be positive");
        }
        if !(1..=10_000).contains(&self.interval_windows) {
            bail!("sampling.interval-windows must be 1 to 10000");
        }
        for (key, v) in [
            ("floor", self.floor),
            ("initial-rate", self.initial_rate),
            ("baseline-weight", self.baseline_weight),
        ] {
            if !rate(v) {
                bail!("sampling.{key} ({v}) must be in (0, 1]");
            }
        }
        if self.initial_rate < self.floor {
            bail!("sampling.initial-rate must be at least sampling.floor");
        }
        for (key, v) in [
            ("max-rate-increase", self.max_rate_increase),
            ("max-rate-decrease", self.max_rate_decrease),
        ] {
            if !(v.is_finite() && v >= 1.0) {
                bail!("sampling.{key} ({v}) must be at least 1");
            }
        }
        if !positive(self.error_z_threshold) {
            bail!("sampling.error-z-threshold must be positive");
        }
        if self.min_events < 1 {
            bail!("sampling.min-events must be at least 1");
        }
        let w = &self.weights;
        for (key, v) in [
            ("new-release", w.new_release),
            ("new-tenant", w.new_tenant),
            ("error-rate", w.error_rate),
            ("experiment", w.experiment),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("sampling.weights.{key} ({v}) must be zero or positive");
            }
        }
        let (mut types, mut names) = (Vec::new(), Vec::new());
        for (i, name) in self.never_sampled.iter().enumerate() {
            if let Some(t) = event_type_named(name) {
                types.push(t);
            } else if let Some(n) = EventName::from_name(name) {
                names.push(n);
            } else {
                bail!(
                    "sampling.never-sampled[{i}]: `{name}` is neither an event type nor a registered event name"
                );
            }
        }
        let ramps = experiments
            .iter()
            .filter(|e| e.phases.len() >= 2)
            .filter_map(|e| {
                let (first, last) = (e.phases.first()?, e.phases.last()?);
                Some((Label::from(e.id.as_str()), first.start_ms, last.start_ms))
            })
            .collect();
        if !self.enabled {
            return Ok(None);
        }
        Ok(Some(SamplingRules {
            fields,
            budget_per_second: self.budget_events_per_second,
            interval_windows: self.interval_windows,
            floor: self.floor,
            initial_rate: self.initial_rate,
            max_increase: self.max_rate_increase,
            max_decrease: self.max_rate_decrease,
            new_release_ms: self.new_release_ms,
            new_tenant_ms: self.new_tenant_ms,
            error_z: self.error_z_threshold,
            baseline_weight: self.baseline_weight,
            min_events: self.min_events,
            weights: RiskWeights {
                new_release: w.new_release,
                new_tenant: w.new_tenant,
                error_rate: w.error_rate,
                experiment: w.experiment,
            },
            never_sampled: types,
            never_sampled_names: names,
            forget_after_intervals: self.forget_after_intervals,
            remember_ms: self.remember_ms,
            ramps,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<SamplingConfig, Box<figment::Error>> {
        use figment::providers::{Format, Toml};
        figment::Figment::from(Toml::string(toml))
            .extract()
            .map_err(Box::new)
    }

    fn refused(toml: &str, field: &str) {
        let config = parse(toml).expect("parses");
        let err = config.rules(&[]).expect_err("refused").to_string();
        assert!(err.contains(field), "{err} does not name {field}");
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        refused(
            "segment-fields = [\"user_id\"]",
            "sampling.segment-fields[0]",
        );
        refused(
            "segment-fields = [\"country\"]",
            "sampling.segment-fields[0]",
        );
        refused("segment-fields = []", "sampling.segment-fields");
        refused(
            "budget-events-per-second = 0",
            "sampling.budget-events-per-second",
        );
        refused("floor = 0", "sampling.floor");
        refused("floor = 0.5\ninitial-rate = 0.1", "sampling.initial-rate");
        refused("max-rate-increase = 0.5", "sampling.max-rate-increase");
        refused("interval-windows = 0", "sampling.interval-windows");
        refused(
            "weights = { error-rate = -1 }",
            "sampling.weights.error-rate",
        );
        refused("never-sampled = [\"nope\"]", "sampling.never-sampled[0]");
        assert!(parse("budget = 3").is_err(), "unknown keys are refused");
        let defaults = SamplingConfig::default().rules(&[]).expect("defaults");
        assert_eq!(defaults, Some(SamplingRules::default()));
    }
}
