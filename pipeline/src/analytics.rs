//! Product-analytics configuration: the funnels (`[[funnels]]` and the built-in ones), checked
//! at start-up and compiled into the operators' definitions.
//!
//! Every check names the field it refuses (`funnels[1].steps[0].event`), so that a bad
//! definition stops the start, never a worker.

use std::collections::BTreeSet;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sightline_operators::alerts::AlertRules;
use sightline_operators::funnel::{
    Breakdown, Exclusion, Field, FunnelDef, MAX_FUNNELS, MAX_STEPS, Matcher, Order,
};
use sightline_operators::select::Names;
use sightline_operators::triage::TriageRules;
use sightline_schemas::registry::{KeptKind, Registry};
use sightline_schemas::{EventName, Label};

/// Product-analytics switches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AnalyticsConfig {
    /// Run the two built-in funnels (`project_creation`, `command_queue_outcomes`).
    pub builtin_funnels: bool,
    /// Event time between two snapshots of the long-horizon state (the funnels' units), ms.
    /// Offsets are committed only up to the last snapshot, so a restart reads at most about
    /// this much event time again, and never the funnels' whole conversion windows.
    pub save_state_every_ms: u64,
    /// Analyse experiments that appear in `experiment_assignments` without a declaration, with
    /// the default metrics and guardrails.
    pub experiments: bool,
    /// CUPED's pre-exposure lookback, ms: the covariate of a unit's metric is the same metric
    /// over the whole periods (`cuped-period-ms`) of this span before the period of its
    /// exposure. 0: CUPED off, no per-unit history kept.
    pub cuped_lookback_ms: u64,
    /// The resolution of that history, ms (a UTC day by default); the lookback is a multiple
    /// of it.
    pub cuped_period_ms: u64,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        AnalyticsConfig {
            builtin_funnels: true,
            save_state_every_ms: 60_000,
            experiments: true,
            cuped_lookback_ms: 14 * 86_400_000,
            cuped_period_ms: 86_400_000,
        }
    }
}

/// The integration alert rules (`[alerts]`), evaluated on every closed window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// `error_rate` fires above this share of failed calls.
    pub error_rate: f64,
    /// Its severity.
    pub error_rate_severity: String,
    /// `latency_p99` fires above this p99 of successful calls, ms.
    pub latency_p99_ms: f64,
    /// Its severity.
    pub latency_p99_severity: String,
    /// `breaker_open`'s severity.
    pub breaker_open_severity: String,
    /// Below this many calls in a window the error-rate and latency rules do not fire.
    pub min_calls: i64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        let r = AlertRules::default();
        AlertsConfig {
            error_rate: r.error_rate,
            error_rate_severity: r.error_rate_severity,
            latency_p99_ms: r.p99_ms,
            latency_p99_severity: r.p99_severity,
            breaker_open_severity: r.breaker_severity,
            min_calls: r.min_calls,
        }
    }
}

impl AlertsConfig {
    /// The rules.
    pub fn rules(&self) -> AlertRules {
        AlertRules {
            error_rate: self.error_rate,
            error_rate_severity: self.error_rate_severity.clone(),
            p99_ms: self.latency_p99_ms,
            p99_severity: self.latency_p99_severity.clone(),
            breaker_severity: self.breaker_open_severity.clone(),
            min_calls: self.min_calls,
        }
    }

    /// Refuses thresholds that cannot be meant.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(0.0..1.0).contains(&self.error_rate) {
            bail!("alerts.error-rate ({}) must be in [0, 1)", self.error_rate);
        }
        if self.latency_p99_ms.is_nan() || self.latency_p99_ms <= 0.0 {
            bail!("alerts.latency-p99-ms must be positive");
        }
        if self.min_calls < 0 {
            bail!("alerts.min-calls must not be negative");
        }
        for (key, value) in [
            ("error-rate-severity", &self.error_rate_severity),
            ("latency-p99-severity", &self.latency_p99_severity),
            ("breaker-open-severity", &self.breaker_open_severity),
        ] {
            if value.trim().is_empty() {
                bail!("alerts.{key} must not be empty");
            }
        }
        Ok(())
    }
}

/// P1 triage (`[triage]`): which feedback opens a P1 record, and which errors count as recent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct TriageConfig {
    /// Feedback with a score at or below this opens a P1 record.
    pub max_score: f64,
    /// Feedback that says the user was blocked opens one too.
    pub include_blocked: bool,
    /// Errors of the same user this long before the feedback are its recent errors, ms.
    pub recent_errors_ms: u64,
}

impl Default for TriageConfig {
    fn default() -> Self {
        let r = TriageRules::default();
        TriageConfig {
            max_score: r.max_score,
            include_blocked: r.blocked,
            recent_errors_ms: r.recent_errors_ms,
        }
    }
}

impl TriageConfig {
    /// The rules.
    pub fn rules(&self) -> TriageRules {
        TriageRules {
            max_score: self.max_score,
            blocked: self.include_blocked,
            recent_errors_ms: self.recent_errors_ms,
        }
    }

    /// Refuses values that cannot be meant.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1.0..=5.0).contains(&self.max_score) {
            bail!(
                "triage.max-score ({}) must be a score from 1 to 5",
                self.max_score
            );
        }
        if self.recent_errors_ms == 0 {
            bail!("triage.recent-errors-ms must be positive");
        }
        Ok(())
    }
}

/// One funnel as configured (`[[funnels]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FunnelConfig {
    /// Its name, a column value in the `funnels` table.
    pub name: String,
    /// What a unit is: `user_id`, `session_id`, `tenant_id`, or `properties.<name>` (a
    /// property the step events keep).
    pub unit: String,
    /// The steps, in order: an event name, or `{ event = "…", where = { field = "value" } }`.
    pub steps: Vec<StepConfig>,
    /// How long after its step-1 event a chain may reach its last step, ms.
    pub conversion_window_ms: u64,
    /// `ordered` (default), `strict` or `unordered`.
    #[serde(default = "ordered")]
    pub order: String,
    /// Events that break a chain between two of its steps.
    #[serde(default)]
    pub exclusions: Vec<ExclusionConfig>,
    /// `experiments` (every experiment), `experiment:<id>`, or a segment field (`platform`,
    /// `user_role`, `app_version`, `country`, `feature_area`, `properties.<name>`, …).
    #[serde(default)]
    pub breakdowns: Vec<String>,
}

fn ordered() -> String {
    "ordered".into()
}

/// One step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StepConfig {
    /// Just the event name.
    Event(String),
    /// An event name with equality filters.
    Filtered {
        /// The event name.
        event: String,
        /// `field = value` filters on envelope fields or `properties.<name>`.
        #[serde(rename = "where", default)]
        filters: std::collections::BTreeMap<String, String>,
    },
}

impl StepConfig {
    /// The step's event name.
    pub fn event_name(&self) -> &str {
        match self {
            StepConfig::Event(name) | StepConfig::Filtered { event: name, .. } => name,
        }
    }
}

/// One exclusion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ExclusionConfig {
    /// The excluding event.
    pub event: String,
    /// `field = value` filters.
    #[serde(rename = "where", default)]
    pub filters: std::collections::BTreeMap<String, String>,
    /// The step after which it applies (default 1).
    #[serde(default)]
    pub from_step: Option<usize>,
    /// The step before which it applies (default: the last step).
    #[serde(default)]
    pub to_step: Option<usize>,
}

/// Steps that are plain event names.
pub fn steps(names: &[&str]) -> Vec<StepConfig> {
    names
        .iter()
        .map(|n| StepConfig::Event((*n).into()))
        .collect()
}

/// The built-in funnels of the two seed specifications.
pub fn builtin_funnels() -> Vec<FunnelConfig> {
    vec![
        FunnelConfig {
            name: "project_creation".into(),
            unit: "user_id".into(),
            steps: steps(&["project_viewed", "project_created", "task_assigned"]),
            conversion_window_ms: 30 * 60_000,
            order: ordered(),
            exclusions: Vec::new(),
            breakdowns: vec!["experiments".into()],
        },
        FunnelConfig {
            name: "command_queue_outcomes".into(),
            unit: "properties.recommendation_id".into(),
            steps: steps(&[
                "recommendation_generated",
                "recommendation_accepted",
                "action_executed",
                "outcome_reply_received",
                "outcome_meeting_booked",
                "outcome_deal_advanced",
            ]),
            conversion_window_ms: 30 * 86_400_000,
            order: ordered(),
            exclusions: Vec::new(),
            breakdowns: vec!["properties.action_type".into()],
        },
    ]
}

/// The funnels a configuration runs: the built-in ones (when on) and then `[[funnels]]`,
/// checked and compiled. `tick_ms` is the dataflow's tick: conversion windows are multiples
/// of it.
pub fn funnel_defs(
    analytics: &AnalyticsConfig,
    configured: &[FunnelConfig],
    tick_ms: u64,
) -> anyhow::Result<Vec<FunnelDef>> {
    let mut all: Vec<(String, &FunnelConfig)> = Vec::new();
    let builtins = builtin_funnels();
    if analytics.builtin_funnels {
        for f in &builtins {
            all.push((format!("built-in funnel `{}`", f.name), f));
        }
    }
    for (i, f) in configured.iter().enumerate() {
        all.push((format!("funnels[{i}]"), f));
    }
    if all.len() > MAX_FUNNELS {
        bail!(
            "funnels: at most {MAX_FUNNELS} funnels, built-in ones included ({} defined)",
            all.len()
        );
    }
    let mut names = BTreeSet::new();
    let mut defs = Vec::new();
    for (at, f) in all {
        if !names.insert(f.name.clone()) {
            bail!("{at}.name: a funnel named `{}` is already defined", f.name);
        }
        defs.push(compile(&at, f, tick_ms)?);
    }
    Ok(defs)
}

fn compile(at: &str, f: &FunnelConfig, tick_ms: u64) -> anyhow::Result<FunnelDef> {
    if f.name.is_empty()
        || !f
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        bail!(
            "{at}.name (`{}`) must be letters, digits, `_` and `-`: it names files and saved state",
            f.name
        );
    }
    if f.steps.len() < 2 || f.steps.len() > MAX_STEPS {
        bail!(
            "{at}.steps: a funnel needs 2 to {MAX_STEPS} steps, found {}",
            f.steps.len()
        );
    }
    if f.conversion_window_ms == 0 || !f.conversion_window_ms.is_multiple_of(tick_ms) {
        bail!(
            "{at}.conversion-window-ms ({}) must be a positive multiple of pipeline.tick-ms ({tick_ms})",
            f.conversion_window_ms
        );
    }
    let order = Order::parse(&f.order).with_context(|| {
        format!(
            "{at}.order: `{}` is not one of ordered, strict, unordered",
            f.order
        )
    })?;
    let mut steps = Vec::new();
    for (i, step) in f.steps.iter().enumerate() {
        let (event, filters) = match step {
            StepConfig::Event(e) => (e, None),
            StepConfig::Filtered { event, filters } => (event, Some(filters)),
        };
        steps.push(matcher(&format!("{at}.steps[{i}]"), event, filters)?);
    }
    let unit = Field::parse(&f.unit).with_context(|| {
        format!(
            "{at}.unit: `{}` is not tenant_id, user_id, session_id or properties.<name>",
            f.unit
        )
    })?;
    match &unit {
        Field::TenantId | Field::UserId | Field::SessionId => {}
        Field::Property(p) => {
            if !steps.iter().any(|s| keeps(s.event, p)) {
                bail!(
                    "{at}.unit: no step event's schema declares `{p}` as kept (x-sightline.keep), so no event would carry the unit"
                );
            }
        }
        other => bail!(
            "{at}.unit: `{}` is a segment, not a unit: use tenant_id, user_id, session_id or properties.<name>",
            other.name()
        ),
    }
    let mut exclusions = Vec::new();
    for (i, x) in f.exclusions.iter().enumerate() {
        let here = format!("{at}.exclusions[{i}]");
        let m = matcher(&here, &x.event, Some(&x.filters))?;
        if steps.iter().any(|s| s.event == m.event) {
            bail!(
                "{here}.event: `{}` is also a step of the funnel; an exclusion must be another event",
                x.event
            );
        }
        let n = steps.len();
        let (from, to) = (x.from_step.unwrap_or(1), x.to_step.unwrap_or(n));
        if from < 1 || to > n || from >= to {
            bail!("{here}: from-step ({from}) and to-step ({to}) must satisfy 1 ≤ from < to ≤ {n}");
        }
        if order == Order::Unordered && (from, to) != (1, n) {
            bail!(
                "{here}: in an unordered funnel an exclusion spans the whole funnel (from-step 1, to-step {n})"
            );
        }
        exclusions.push(Exclusion {
            matcher: m,
            from_step: from,
            to_step: to,
        });
    }
    if exclusions.len() > MAX_STEPS {
        bail!("{at}.exclusions: at most {MAX_STEPS}");
    }
    let mut breakdowns = Vec::new();
    for (i, b) in f.breakdowns.iter().enumerate() {
        let here = format!("{at}.breakdowns[{i}]");
        breakdowns.push(match b.as_str() {
            "experiments" => Breakdown::Experiments,
            other => match other.strip_prefix("experiment:") {
                Some(id) if !id.is_empty() => Breakdown::Experiment(Label::from(id)),
                Some(_) => bail!("{here}: `experiment:` needs an experiment id"),
                None => {
                    let field = Field::parse(other)
                        .with_context(|| format!("{here}: `{other}` is not a known field"))?;
                    if field.is_identifier() {
                        bail!("{here}: `{other}` is an identifier; breakdowns take segments (platform, user_role, app_version, …)");
                    }
                    if let Field::Property(p) = &field
                        && !keeps(steps[0].event, p)
                    {
                        bail!("{here}: the step-1 event `{}` does not keep `{p}` (x-sightline.keep)", steps[0].event.as_str());
                    }
                    Breakdown::Field(field)
                }
            },
        });
    }
    Ok(FunnelDef {
        name: Label::from(f.name.as_str()),
        unit,
        steps,
        window_ms: f.conversion_window_ms,
        order,
        exclusions,
        breakdowns,
    })
}

/// Whether some version of `event`'s schema keeps property `name`.
fn keeps(event: EventName, name: &str) -> bool {
    event.spec().versions.iter().any(|v| {
        v.keep
            .iter()
            .any(|k| k.field == name && k.kind != KeptKind::Labels)
    })
}

fn matcher(
    at: &str,
    event: &str,
    filters: Option<&std::collections::BTreeMap<String, String>>,
) -> anyhow::Result<Matcher> {
    let Some(name) = EventName::from_name(event) else {
        let known: Vec<&str> = Registry::embedded()
            .events()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        bail!(
            "{at}.event: `{event}` is not an event of the schema registry ({})",
            known.join(", ")
        );
    };
    let mut out = Vec::new();
    for (field, value) in filters.into_iter().flatten() {
        let parsed = Field::parse(field)
            .with_context(|| format!("{at}.where: `{field}` is not a known field"))?;
        if parsed.is_identifier() {
            bail!("{at}.where: `{field}` is an identifier, which is never compared in the clear");
        }
        if let Field::Property(p) = &parsed
            && !keeps(name, p)
        {
            bail!("{at}.where: `{event}` does not keep `{p}` (x-sightline.keep)");
        }
        out.push((parsed, value.clone()));
    }
    Ok(Matcher {
        event: name,
        filters: out,
    })
}

/// Which identifiers the funnels, triage and the experiments follow, for the decoders' unit
/// links (triage always follows users), and on which events: the ones those operators read
/// (every event when experiments are analysed: their units are (tenant, user) pairs, and any
/// event can carry an assignment), and tenants on every event when the sampling budgets'
/// new-tenant term is on (`tenants`).
pub fn link_fields(
    defs: &[FunnelDef],
    experiments: bool,
    tenants: bool,
) -> sightline_ingest::LinkFields {
    let mut links = sightline_ingest::LinkFields {
        user: true,
        ..Default::default()
    };
    let mut read = vec![TriageRules::names()];
    for d in defs {
        match d.unit {
            Field::TenantId => links.tenant = true,
            Field::UserId => links.user = true,
            Field::SessionId => links.session = true,
            _ => continue,
        }
        read.push(d.names());
    }
    if experiments {
        links.tenant = true;
        links.user = true;
        read.push(Names::All);
    }
    if tenants {
        links.tenant = true;
        read.push(Names::All);
    }
    links.names = match Names::union(&read) {
        Names::All => None,
        Names::Only(names) => Some(names.into()),
    };
    links
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn one(toml_text: &str) -> anyhow::Result<Vec<FunnelDef>> {
        #[derive(Deserialize)]
        struct Doc {
            funnels: Vec<FunnelConfig>,
        }
        use figment::providers::Format;
        let doc: Doc = figment::Figment::from(figment::providers::Toml::string(toml_text))
            .extract()
            .unwrap();
        funnel_defs(
            &AnalyticsConfig {
                builtin_funnels: false,
                ..AnalyticsConfig::default()
            },
            &doc.funnels,
            1000,
        )
    }

    #[test]
    fn builtins_compile() {
        let defs = funnel_defs(&AnalyticsConfig::default(), &[], 1000).unwrap();
        assert_eq!(defs.len(), 2);
        assert_eq!(defs[1].steps.len(), 6);
    }

    #[test]
    fn bad_definitions_name_the_field() {
        let base = r#"name = "f"
unit = "user_id"
conversion-window-ms = 60000
"#;
        let cases = [
            (
                r#"steps = ["project_viewed", "nope"]"#,
                "funnels[0].steps[1].event: `nope` is not an event",
            ),
            (r#"steps = []"#, "funnels[0].steps: a funnel needs 2 to"),
            (
                r#"steps = ["project_viewed", "project_created"]
unit = "properties.nothing""#,
                "funnels[0].unit: no step event's schema declares `nothing`",
            ),
            (
                r#"steps = ["project_viewed", "project_created"]
exclusions = [{ event = "project_viewed" }]"#,
                "funnels[0].exclusions[0].event: `project_viewed` is also a step",
            ),
            (
                r#"steps = ["project_viewed", "project_created"]
breakdowns = ["user_id"]"#,
                "funnels[0].breakdowns[0]: `user_id` is an identifier",
            ),
        ];
        for (extra, expected) in cases {
            // A later `unit` wins over the base one: TOML refuses duplicate keys, so drop it.
            let base = if extra.contains("unit =") {
                base.replace("unit = \"user_id\"\n", "")
            } else {
                base.to_owned()
            };
            let text = format!("[[funnels]]\n{base}{extra}\n");
            let err = one(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}\nexpected: {expected}");
        }
        let zero = "[[funnels]]\nname = \"f\"\nunit = \"user_id\"\nconversion-window-ms = 0\nsteps = [\"project_viewed\", \"project_created\"]\n";
        assert!(
            one(zero)
                .unwrap_err()
                .to_string()
                .contains("funnels[0].conversion-window-ms (0) must be a positive multiple")
        );
    }

    #[test]
    fn too_many_funnels_are_refused() {
        let funnel = |i: usize| {
            format!(
                "[[funnels]]\nname = \"f{i}\"\nunit = \"user_id\"\nconversion-window-ms = 60000\nsteps = [\"project_viewed\", \"project_created\"]\n"
            )
        };
        let fits: String = (0..MAX_FUNNELS).map(funnel).collect();
        assert_eq!(one(&fits).unwrap().len(), MAX_FUNNELS);
        let over: String = (0..=MAX_FUNNELS).map(funnel).collect();
        let err = one(&over).unwrap_err().to_string();
        assert!(err.contains("funnels: at most 32 funnels"), "{err}");
    }

    #[test]
    fn filters_and_breakdowns_compile() {
        let text = r#"[[funnels]]
name = "dismissals"
unit = "properties.recommendation_id"
conversion-window-ms = 3600000
order = "strict"
steps = [{ event = "recommendation_generated", where = { "properties.action_type" = "send_email" } }, "recommendation_dismissed"]
breakdowns = ["experiments", "platform", "properties.action_type"]
"#;
        let defs = one(text).unwrap();
        assert_eq!(defs[0].order, Order::Strict);
        assert_eq!(defs[0].steps[0].filters.len(), 1);
        assert_eq!(defs[0].breakdowns.len(), 3);
    }
}
