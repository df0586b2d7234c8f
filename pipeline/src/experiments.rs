//! Experiments as configured (`[[experiments]]`, and `analytics.experiments` for the ones that
//! are not declared), checked, into the operators' [`Setup`].
//!
//! An experiment that appears in `experiment_assignments` without a declaration is analysed
//! with the defaults when `analytics.experiments` is on (the default): equal weights over the
//! arms seen, control `control` (or the first arm), the [`default_metrics`], and the errors
//! guardrail, so that a fresh deployment watches every experiment it sees.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::bail;
use serde::{Deserialize, Serialize};
use sightline_operators::experiment::{
    Analysis, ExperimentDef, Guardrail, Lookback, Metric, MetricKind, Rollout, Setup, did,
};
use sightline_operators::funnel::fnv1a;
use sightline_operators::triage::TriageRules;
use sightline_schemas::{EventName, Label};
use sightline_stats::guardrail::Harm;
use sightline_stats::sequential::Sequential;

/// One experiment as configured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Its id, as in `experiment_assignments`.
    pub id: String,
    /// Arms with their planned weights; empty: the arms seen, equal weights.
    #[serde(default)]
    pub arms: Vec<ArmConfig>,
    /// The control arm (default `control`, or the first arm).
    #[serde(default)]
    pub control: Option<String>,
    /// Significance level α.
    #[serde(default = "alpha")]
    pub alpha: f64,
    /// N*: the planned number of units of the two arms compared; it tunes the always-valid
    /// test (its intervals are narrowest there).
    #[serde(default = "planned_units")]
    pub planned_units: u64,
    /// Units every arm needs before any decision.
    #[serde(default = "min_units")]
    pub min_units: u64,
    /// Windows per sampling interval (guardrails are evaluated at the end of each).
    #[serde(default = "interval")]
    pub sampling_interval_windows: u64,
    /// Its metrics; empty: the default metrics.
    #[serde(default)]
    pub metrics: Vec<MetricConfig>,
    /// Its guardrails; absent: the errors guardrail.
    #[serde(default)]
    pub guardrails: Option<Vec<GuardrailConfig>>,
    /// The metric whose confidently positive effect advances a rollout.
    #[serde(default)]
    pub primary: Option<String>,
    /// Whether a sample-ratio mismatch alone kills (default: it only makes the experiment
    /// unhealthy).
    #[serde(default)]
    pub srm_kills: bool,
    /// Its rollout phases, in order (none by default): each a stratum of the analysis, with
    /// its own planned weights.
    #[serde(default)]
    pub phases: Vec<PhaseConfig>,
    /// The tenants (`tenant_id`, as sent) it may analyse; absent: every tenant that is not
    /// restricted. Events of other tenants that carry its assignment are counted
    /// (`compliance_events`) and raise a `compliance` alert.
    #[serde(default)]
    pub tenants: Option<Vec<String>>,
    /// A rollout by tenant that is not randomised, in cohorts: analysed by difference in
    /// differences against the tenants never rolled out to (`experiment_did`), not by arm.
    #[serde(default)]
    pub rollout: Vec<CohortConfig>,
}

/// A cohort of a rollout by tenant: its tenants get the feature from `start-ms` on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CohortConfig {
    /// When the cohort's tenants get the feature (event time, ms since the epoch).
    pub start_ms: u64,
    /// Its tenants (`tenant_id`, as sent).
    pub tenants: Vec<String>,
}

fn alpha() -> f64 {
    0.05
}
fn planned_units() -> u64 {
    10_000
}
fn min_units() -> u64 {
    100
}
fn interval() -> u64 {
    5
}
fn one() -> f64 {
    1.0
}
fn increase() -> String {
    "increase".into()
}

/// An arm and its planned weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ArmConfig {
    /// The variant, as in `experiment_assignments`.
    pub name: String,
    /// Its planned share (relative).
    #[serde(default = "one")]
    pub weight: f64,
}

/// A rollout phase: from `start-ms` on, units are exposed with these planned weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PhaseConfig {
    /// Its name (for example `5%`).
    pub name: String,
    /// When it starts (event time, ms since the epoch).
    pub start_ms: u64,
    /// The arms' planned weights in this phase (0: not exposed yet).
    pub arms: Vec<ArmConfig>,
}

/// A metric per unit since exposure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MetricConfig {
    /// Its name (a column value).
    pub name: String,
    /// `count` (events of `event`), `sum` (of the kept measure `field` over events of
    /// `event`), `conversion` (an event of `event` within `within-ms` after exposure),
    /// `errors` (error events), `events` (every event), `tickets` (critical feedback, by the
    /// triage rules), `abandonment` (of the units that performed `event`, the share without
    /// `goal` within `within-ms` after exposure), `ratio` (`numerator` ÷ `denominator`, two
    /// other metrics of the experiment) or `latency` (the `quantile` of `event`'s latency
    /// measure, event-level).
    pub kind: String,
    /// The event it reads.
    #[serde(default)]
    pub event: Option<String>,
    /// For `sum`: the kept measure.
    #[serde(default)]
    pub field: Option<String>,
    /// For `conversion` and `abandonment`: how long after exposure it counts, ms.
    #[serde(default)]
    pub within_ms: Option<u64>,
    /// For `abandonment`: the event that completes the funnel.
    #[serde(default)]
    pub goal: Option<String>,
    /// For `ratio`: the metric divided.
    #[serde(default)]
    pub numerator: Option<String>,
    /// For `ratio`: the metric it is divided by.
    #[serde(default)]
    pub denominator: Option<String>,
    /// For `latency`: the quantile, in (0, 1) (default 0.95).
    #[serde(default)]
    pub quantile: Option<f64>,
}

/// A guardrail: a metric, the direction in which it harms, and its non-inferiority margin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GuardrailConfig {
    /// The metric (one of the experiment's).
    pub metric: String,
    /// `increase` (default) or `decrease`.
    #[serde(default = "increase")]
    pub harm: String,
    /// The margin, in the metric's unit (absolute difference).
    #[serde(default)]
    pub margin: f64,
}

/// The metrics of an experiment without its own: for each built-in funnel its conversion
/// (its last step within its conversion window after exposure) and its abandonment; errors and
/// events per unit and the error rate (errors ÷ events); support tickets (critical feedback by
/// `triage`); and the p95 latency of every event that has a latency measure.
pub fn default_metrics(triage: &TriageRules) -> Vec<Metric> {
    let mut out = Vec::new();
    for funnel in crate::analytics::builtin_funnels() {
        let step = |s: Option<&crate::analytics::StepConfig>| {
            s.and_then(|s| EventName::from_name(s.event_name()))
        };
        let (Some(entry), Some(goal)) = (step(funnel.steps.first()), step(funnel.steps.last()))
        else {
            continue;
        };
        let within_ms = funnel.conversion_window_ms;
        out.push(Metric {
            name: format!("{}_conversion", funnel.name).as_str().into(),
            kind: MetricKind::Conversion {
                event: goal,
                within_ms,
            },
        });
        out.push(Metric {
            name: format!("{}_abandonment", funnel.name).as_str().into(),
            kind: MetricKind::Abandonment {
                entry,
                goal,
                within_ms,
            },
        });
    }
    let errors = out.len();
    out.push(Metric {
        name: "errors".into(),
        kind: MetricKind::Errors,
    });
    out.push(Metric {
        name: "events".into(),
        kind: MetricKind::Events,
    });
    out.push(Metric {
        name: "error_rate".into(),
        kind: MetricKind::Ratio {
            numerator: errors,
            denominator: errors + 1,
        },
    });
    out.push(Metric {
        name: "support_tickets".into(),
        kind: MetricKind::Tickets {
            rules: triage.clone(),
        },
    });
    for name in EventName::all() {
        if name.spec().latency().is_some() {
            out.push(Metric {
                name: format!("p95_latency_{}", name.as_str()).as_str().into(),
                kind: MetricKind::Latency {
                    event: name,
                    permille: 950,
                },
            });
        }
    }
    out
}

/// The guardrails of an experiment without its own, each against an increase with margin 0:
/// the error rate, every abandonment, support tickets and every p95 latency among `metrics`.
fn default_guardrails(metrics: &[Metric]) -> Vec<Guardrail> {
    metrics
        .iter()
        .filter(|m| {
            matches!(
                m.kind,
                MetricKind::Abandonment { .. }
                    | MetricKind::Latency { .. }
                    | MetricKind::Tickets { .. }
            ) || &*m.name == "error_rate"
        })
        .map(|m| Guardrail {
            metric: m.name.clone(),
            harm: Harm::Increase,
            margin: 0.0,
        })
        .collect()
}

/// The analysis of an undeclared experiment.
fn default_analysis(triage: &TriageRules) -> Analysis {
    Analysis {
        guardrails: default_guardrails(&default_metrics(triage)),
        ..Analysis::default()
    }
}

/// The experiments' setup: checked, with every field named in what it refuses. `undeclared`:
/// whether experiments without a declaration are analysed with the defaults; `triage`: what
/// makes a support ticket; `link`: the unit link of a tenant id (for allowlists).
pub fn setup(
    configs: &[ExperimentConfig],
    undeclared: bool,
    triage: &TriageRules,
    link: &mut dyn FnMut(&str) -> u64,
) -> anyhow::Result<Setup> {
    let mut ids = BTreeSet::new();
    let mut defs = Vec::new();
    let mut analyses = BTreeMap::new();
    for (i, c) in configs.iter().enumerate() {
        let at = format!("experiments[{i}]");
        if c.id.trim().is_empty() {
            bail!("{at}.id must not be empty");
        }
        if !ids.insert(c.id.clone()) {
            bail!("{at}.id: `{}` is declared twice", c.id);
        }
        let mut arms = Vec::new();
        for (j, arm) in c.arms.iter().enumerate() {
            if arm.name.trim().is_empty() {
                bail!("{at}.arms[{j}].name must not be empty");
            }
            if !(arm.weight.is_finite() && arm.weight > 0.0) {
                bail!("{at}.arms[{j}].weight must be positive");
            }
            if arms.iter().any(|(a, _): &(Label, f64)| **a == *arm.name) {
                bail!("{at}.arms[{j}].name: `{}` is listed twice", arm.name);
            }
            arms.push((Label::from(arm.name.as_str()), arm.weight));
        }
        if let Some(control) = &c.control
            && !arms.is_empty()
            && !arms.iter().any(|(a, _)| **a == **control)
        {
            bail!("{at}.control: `{control}` is not one of its arms");
        }
        if !(c.alpha > 0.0 && c.alpha < 0.5) {
            bail!("{at}.alpha ({}) must be in (0, 0.5)", c.alpha);
        }
        if c.planned_units == 0 {
            bail!("{at}.planned-units must be positive");
        }
        if c.sampling_interval_windows == 0 {
            bail!("{at}.sampling-interval-windows must be at least 1");
        }
        if c.metrics.len() > usize::from(u8::MAX) {
            bail!("{at}.metrics: at most {} metrics per experiment", u8::MAX);
        }
        let metrics = if c.metrics.is_empty() && !c.rollout.is_empty() {
            rollout_metrics(default_metrics(triage))
        } else if c.metrics.is_empty() {
            default_metrics(triage)
        } else {
            let mut out: Vec<Metric> = Vec::new();
            for (j, m) in c.metrics.iter().enumerate() {
                let here = format!("{at}.metrics[{j}]");
                if m.name.trim().is_empty() {
                    bail!("{here}.name must not be empty");
                }
                if c.metrics[..j].iter().any(|o| o.name == m.name) {
                    bail!("{here}.name: `{}` is defined twice", m.name);
                }
                out.push(Metric {
                    name: m.name.as_str().into(),
                    kind: metric_kind(m, &here, &c.metrics, triage)?,
                });
            }
            out
        };
        let (phase_starts, phase_weights) = phases(c, &arms, &at)?;
        if arms.is_empty()
            && let Some(last) = phase_weights.last()
        {
            // The arms of an experiment declared by its phases alone.
            arms = last.iter().map(|(a, _)| (a.clone(), 1.0)).collect();
        }
        if let Some(tenants) = &c.tenants
            && let Some(j) = tenants.iter().position(|t| t.trim().is_empty())
        {
            bail!("{at}.tenants[{j}] must not be empty");
        }
        let guardrails = match &c.guardrails {
            None => default_guardrails(&metrics),
            Some(list) => {
                let mut out = Vec::new();
                for (j, g) in list.iter().enumerate() {
                    let here = format!("{at}.guardrails[{j}]");
                    if !metrics.iter().any(|m| *m.name == *g.metric) {
                        bail!(
                            "{here}.metric: `{}` is not one of the experiment's metrics",
                            g.metric
                        );
                    }
                    let harm = match g.harm.as_str() {
                        "increase" => Harm::Increase,
                        "decrease" => Harm::Decrease,
                        other => bail!("{here}.harm: `{other}` is not `increase` or `decrease`"),
                    };
                    if !g.margin.is_finite() || g.margin < 0.0 {
                        bail!("{here}.margin must be a non-negative number");
                    }
                    out.push(Guardrail {
                        metric: g.metric.as_str().into(),
                        harm,
                        margin: g.margin,
                    });
                }
                out
            }
        };
        if let Some(primary) = &c.primary
            && !metrics.iter().any(|m| *m.name == **primary)
        {
            bail!("{at}.primary: `{primary}` is not one of the experiment's metrics");
        }
        let rollout = rollout(c, &metrics, &at, link)?;
        let version = fnv1a(&serde_json::to_vec(c).unwrap_or_default());
        analyses.insert(
            Label::from(c.id.as_str()),
            Analysis {
                arms,
                control: c.control.as_deref().map(Label::from),
                test: Sequential {
                    alpha: c.alpha,
                    n_star: c.planned_units as f64,
                },
                min_units: c.min_units as i64,
                interval_windows: c.sampling_interval_windows,
                guardrails,
                primary: c.primary.as_deref().map(Label::from),
                srm_kills: c.srm_kills,
                version,
                phases: phase_weights,
            },
        );
        defs.push(ExperimentDef {
            id: c.id.as_str().into(),
            metrics,
            tenants: c
                .tenants
                .as_ref()
                .map(|list| list.iter().map(|t| link(t)).collect()),
            phases: phase_starts,
            rollout,
        });
    }
    let definition = fnv1a(&serde_json::to_vec(&(configs, undeclared)).unwrap_or_default());
    Ok(Setup {
        defs,
        default_metrics: undeclared.then(|| default_metrics(triage)),
        analyses,
        default_analysis: default_analysis(triage),
        definition,
        // Set from `analytics.cuped-lookback-ms` by the caller.
        lookback: None,
    })
}

/// The rollout by tenant of experiment `c` (with `metrics`, at `at`), checked; `None` when it
/// declares none. Its lookback is set by the caller, with CUPED's.
fn rollout(
    c: &ExperimentConfig,
    metrics: &[Metric],
    at: &str,
    link: &mut dyn FnMut(&str) -> u64,
) -> anyhow::Result<Option<Rollout>> {
    if c.rollout.is_empty() {
        return Ok(None);
    }
    if !c.phases.is_empty() {
        bail!("{at}.rollout: a rollout by tenant has no phases (its cohorts are its steps)");
    }
    if !c.arms.is_empty() {
        bail!("{at}.rollout: a rollout by tenant has no arms (it is not randomised)");
    }
    if c.guardrails.is_some() || c.primary.is_some() {
        bail!(
            "{at}.rollout: a rollout by tenant takes no guardrails or primary metric (its difference in differences is descriptive: no decision is taken on it)"
        );
    }
    if let Some(j) = metrics.iter().position(|m| !did::supports(m)) {
        bail!(
            "{at}.metrics[{j}]: a rollout by tenant follows count, sum, errors, events, tickets and ratio metrics per tenant and period, not `{}`",
            metrics[j].name
        );
    }
    let mut cohorts: Vec<(u64, BTreeSet<u64>)> = Vec::new();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for (k, cohort) in c.rollout.iter().enumerate() {
        let here = format!("{at}.rollout[{k}]");
        if cohort.tenants.is_empty() {
            bail!("{here}.tenants must list at least one tenant");
        }
        if cohorts.last().is_some_and(|(s, _)| *s >= cohort.start_ms) {
            bail!("{here}.start-ms must be later than the cohort before");
        }
        let mut links = BTreeSet::new();
        for (j, tenant) in cohort.tenants.iter().enumerate() {
            if tenant.trim().is_empty() {
                bail!("{here}.tenants[{j}] must not be empty");
            }
            if !seen.insert(tenant) {
                bail!("{here}.tenants[{j}]: `{tenant}` is in two cohorts");
            }
            if c.tenants
                .as_ref()
                .is_some_and(|allowed| !allowed.contains(tenant))
            {
                bail!("{here}.tenants[{j}]: `{tenant}` is not in the experiment's tenants");
            }
            links.insert(link(tenant));
        }
        cohorts.push((cohort.start_ms, links));
    }
    Ok(Some(Rollout {
        cohorts,
        lookback: Lookback::days(14),
    }))
}

/// `metrics` less those a rollout by tenant cannot follow ([`did::supports`]), with the
/// indexes of ratios moved to their parts' new places (a ratio goes with a part).
fn rollout_metrics(metrics: Vec<Metric>) -> Vec<Metric> {
    let kept: Vec<Option<usize>> = metrics
        .iter()
        .scan(0, |next, m| {
            Some(did::supports(m).then(|| {
                *next += 1;
                *next - 1
            }))
        })
        .collect();
    metrics
        .into_iter()
        .filter(did::supports)
        .filter_map(|mut m| {
            if let MetricKind::Ratio {
                numerator,
                denominator,
            } = &mut m.kind
            {
                *numerator = kept.get(*numerator).copied().flatten()?;
                *denominator = kept.get(*denominator).copied().flatten()?;
            }
            Some(m)
        })
        .collect()
}

/// The phases of experiment `c` (declared `arms`, if any, at `at`), checked: their starts and
/// their planned weights.
type Phases = (Vec<u64>, Vec<Vec<(Label, f64)>>);

fn phases(c: &ExperimentConfig, arms: &[(Label, f64)], at: &str) -> anyhow::Result<Phases> {
    let (mut starts, mut weights) = (Vec::new(), Vec::new());
    if c.phases.len() > usize::from(u8::MAX) {
        bail!("{at}.phases: at most {} phases", u8::MAX);
    }
    for (k, phase) in c.phases.iter().enumerate() {
        let here = format!("{at}.phases[{k}]");
        if phase.name.trim().is_empty() {
            bail!("{here}.name must not be empty");
        }
        if c.phases[..k].iter().any(|p| p.name == phase.name) {
            bail!("{here}.name: `{}` is used twice", phase.name);
        }
        if starts.last().is_some_and(|s| *s >= phase.start_ms) {
            bail!("{here}.start-ms must be later than the phase before");
        }
        let mut planned: Vec<(Label, f64)> = Vec::new();
        for (j, arm) in phase.arms.iter().enumerate() {
            if !arms.is_empty() && !arms.iter().any(|(a, _)| **a == *arm.name) {
                bail!(
                    "{here}.arms[{j}].name: `{}` is not one of the experiment's arms",
                    arm.name
                );
            }
            if !(arm.weight.is_finite() && arm.weight >= 0.0) {
                bail!("{here}.arms[{j}].weight must not be negative");
            }
            if planned.iter().any(|(a, _)| **a == *arm.name) {
                bail!("{here}.arms[{j}].name: `{}` is listed twice", arm.name);
            }
            planned.push((Label::from(arm.name.as_str()), arm.weight));
        }
        if planned.iter().filter(|(_, w)| *w > 0.0).count() < 2 {
            bail!("{here}.arms: at least two arms need a positive weight");
        }
        starts.push(phase.start_ms);
        weights.push(planned);
    }
    Ok((starts, weights))
}

fn metric_kind(
    m: &MetricConfig,
    here: &str,
    all: &[MetricConfig],
    triage: &TriageRules,
) -> anyhow::Result<MetricKind> {
    let event = || -> anyhow::Result<EventName> {
        let Some(name) = &m.event else {
            bail!("{here}.event is required for a `{}` metric", m.kind);
        };
        EventName::from_name(name).ok_or_else(|| {
            anyhow::anyhow!("{here}.event: `{name}` is not an event of the schema registry")
        })
    };
    Ok(match m.kind.as_str() {
        "count" => MetricKind::Count { event: event()? },
        "sum" => {
            let Some(field) = m.field.as_deref().filter(|f| !f.trim().is_empty()) else {
                bail!("{here}.field is required for a `sum` metric (a kept measure of its event)");
            };
            MetricKind::Sum {
                event: event()?,
                field: field.into(),
            }
        }
        "conversion" => {
            let within_ms = m.within_ms.unwrap_or(0);
            if within_ms == 0 {
                bail!("{here}.within-ms must be positive for a `conversion` metric");
            }
            MetricKind::Conversion {
                event: event()?,
                within_ms,
            }
        }
        "errors" => MetricKind::Errors,
        "events" => MetricKind::Events,
        "tickets" => MetricKind::Tickets {
            rules: triage.clone(),
        },
        "abandonment" => {
            let within_ms = m.within_ms.unwrap_or(0);
            if within_ms == 0 {
                bail!("{here}.within-ms must be positive for an `abandonment` metric");
            }
            let Some(goal) = &m.goal else {
                bail!("{here}.goal is required for an `abandonment` metric");
            };
            let goal = EventName::from_name(goal).ok_or_else(|| {
                anyhow::anyhow!("{here}.goal: `{goal}` is not an event of the schema registry")
            })?;
            MetricKind::Abandonment {
                entry: event()?,
                goal,
                within_ms,
            }
        }
        "latency" => {
            let q = m.quantile.unwrap_or(0.95);
            if !(q > 0.0 && q < 1.0) {
                bail!("{here}.quantile ({q}) must be in (0, 1)");
            }
            let event = event()?;
            if event.spec().latency().is_none() {
                bail!(
                    "{here}.event: `{}` has no latency measure in the schema registry",
                    event.as_str()
                );
            }
            MetricKind::Latency {
                event,
                permille: (q * 1000.0).round() as u16,
            }
        }
        "ratio" => {
            let part = |field: &str, name: &Option<String>| -> anyhow::Result<usize> {
                let Some(name) = name else {
                    bail!("{here}.{field} is required for a `ratio` metric");
                };
                let Some(i) = all.iter().position(|o| o.name == *name) else {
                    bail!("{here}.{field}: `{name}` is not one of the experiment's metrics");
                };
                if matches!(all[i].kind.as_str(), "ratio" | "latency" | "abandonment") {
                    bail!(
                        "{here}.{field}: `{name}` is a `{}` metric, not a per-unit value",
                        all[i].kind
                    );
                }
                Ok(i)
            };
            MetricKind::Ratio {
                numerator: part("numerator", &m.numerator)?,
                denominator: part("denominator", &m.denominator)?,
            }
        }
        other => bail!(
            "{here}.kind: `{other}` is not `count`, `sum`, `conversion`, `errors`, `events`, \
             `tickets`, `abandonment`, `ratio` or `latency`"
        ),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn one(toml_text: &str) -> anyhow::Result<Setup> {
        #[derive(Deserialize)]
        struct Doc {
            experiments: Vec<ExperimentConfig>,
        }
        use figment::providers::Format;
        let doc: Doc =
            figment::Figment::from(figment::providers::Toml::string(toml_text)).extract()?;
        setup(&doc.experiments, true, &TriageRules::default(), &mut |t| {
            fnv1a(t.as_bytes())
        })
    }

    #[test]
    fn a_declared_experiment_compiles() {
        let s = one(r#"[[experiments]]
id = "exp_onboarding_v2"
arms = [{ name = "control" }, { name = "treatment", weight = 2 }]
planned-units = 5000
metrics = [{ name = "created", kind = "count", event = "project_created" },
           { name = "errors", kind = "errors" }]
guardrails = [{ metric = "errors" }]"#)
        .unwrap();
        assert_eq!(s.defs[0].metrics.len(), 2);
        let a = &s.analyses[&Label::from("exp_onboarding_v2")];
        assert_eq!(a.test.n_star, 5000.0);
        assert_eq!(a.guardrails[0].harm, Harm::Increase);
        assert!(s.default_metrics.is_some());
    }

    #[test]
    fn a_rollout_by_tenant_keeps_the_metrics_it_can_follow() {
        let s = one(r#"[[experiments]]
id = "new_editor"
rollout = [{ start-ms = 1000, tenants = ["t1", "t2"] }, { start-ms = 5000, tenants = ["t3"] }]"#)
        .unwrap();
        let def = &s.defs[0];
        let rollout = def.rollout.as_ref().unwrap();
        assert_eq!(rollout.cohorts.len(), 2);
        assert_eq!(rollout.cohorts[0].1.len(), 2);
        let names: Vec<&str> = def.metrics.iter().map(|m| &*m.name).collect();
        assert_eq!(names, ["errors", "events", "error_rate", "support_tickets"]);
        // The ratio points at its parts' new places.
        assert_eq!(
            def.metrics[2].kind,
            MetricKind::Ratio {
                numerator: 0,
                denominator: 1
            }
        );
    }

    #[test]
    fn bad_definitions_are_refused_with_the_field_named() {
        for (text, field) in [
            (
                r#"[[experiments]]
id = """#,
                "experiments[0].id",
            ),
            (
                r#"[[experiments]]
id = "e"
metrics = [{ name = "m", kind = "count", event = "no_such_event" }]"#,
                "experiments[0].metrics[0].event",
            ),
            (
                r#"[[experiments]]
id = "e"
alpha = 0.9"#,
                "experiments[0].alpha",
            ),
            (
                r#"[[experiments]]
id = "e"
sampling-interval-windows = 0"#,
                "experiments[0].sampling-interval-windows",
            ),
            (
                r#"[[experiments]]
id = "e"
guardrails = [{ metric = "nope" }]"#,
                "experiments[0].guardrails[0].metric",
            ),
            (
                r#"[[experiments]]
id = "e"
arms = [{ name = "a" }, { name = "b" }]
control = "c""#,
                "experiments[0].control",
            ),
            (
                r#"[[experiments]]
id = "e"
metrics = [{ name = "m", kind = "conversion", event = "project_created" }]"#,
                "experiments[0].metrics[0].within-ms",
            ),
            (
                r#"[[experiments]]
id = "e"
phases = [{ name = "a", start-ms = 10, arms = [{ name = "c" }, { name = "t" }] },
          { name = "b", start-ms = 5, arms = [{ name = "c" }, { name = "t" }] }]"#,
                "experiments[0].phases[1].start-ms",
            ),
            (
                r#"[[experiments]]
id = "e"
arms = [{ name = "c" }, { name = "t" }]
phases = [{ name = "a", start-ms = 10, arms = [{ name = "c" }, { name = "x" }] }]"#,
                "experiments[0].phases[0].arms[1].name",
            ),
            (
                r#"[[experiments]]
id = "e"
metrics = [{ name = "r", kind = "ratio", numerator = "nope", denominator = "nope" }]"#,
                "experiments[0].metrics[0].numerator",
            ),
            (
                r#"[[experiments]]
id = "e"
metrics = [{ name = "p", kind = "latency", event = "project_created", quantile = 1.5 }]"#,
                "experiments[0].metrics[0].quantile",
            ),
            (
                r#"[[experiments]]
id = "e"
metrics = [{ name = "c", kind = "conversion", event = "project_created", within-ms = 10 }]
rollout = [{ start-ms = 10, tenants = ["t1"] }]"#,
                "experiments[0].metrics[0]: a rollout by tenant",
            ),
            (
                r#"[[experiments]]
id = "e"
rollout = [{ start-ms = 10, tenants = ["t1"] }, { start-ms = 20, tenants = ["t2", "t1"] }]"#,
                "experiments[0].rollout[1].tenants[1]",
            ),
            (
                r#"[[experiments]]
id = "e"
rollout = [{ start-ms = 10, tenants = ["t1"] }, { start-ms = 10, tenants = ["t2"] }]"#,
                "experiments[0].rollout[1].start-ms",
            ),
            (
                r#"[[experiments]]
id = "e"
tenants = ["t1", "t3"]
rollout = [{ start-ms = 10, tenants = ["t2"] }]"#,
                "experiments[0].rollout[0].tenants[0]",
            ),
            (
                r#"[[experiments]]
id = "e"
arms = [{ name = "c" }, { name = "t" }]
rollout = [{ start-ms = 10, tenants = ["t2"] }]"#,
                "experiments[0].rollout: a rollout by tenant has no arms",
            ),
            (
                r#"[[experiments]]
id = "e"
rollout = [{ start-ms = 10, tenants = [] }]"#,
                "experiments[0].rollout[0].tenants",
            ),
        ] {
            let err = one(text).err().unwrap().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
    }
}
