//! The metrics of an experiment: what each measures per unit since exposure, how an event
//! changes a unit's value, what the unit contributes to its arm's sums, and its CUPED
//! covariate's increments.

use sightline_schemas::{Event, EventName, Label};
use sightline_stats::Moments;

/// Fixed-point scale of metric values (millionths), as [`sightline_stats::moments::SCALE`].
pub(super) const ONE: i64 = 1_000_000;

/// `increment` (millionths) times the event's Horvitz–Thompson weight (1 / `sample_rate`):
/// unchanged for an event that was not sampled.
fn weighted(increment: i64, event: &Event) -> i64 {
    crate::aggregates::scaled_by_weight(increment, event.weight_micros)
}

/// What a metric measures per unit since exposure.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricKind {
    /// The number of events named `event`.
    Count {
        /// The event counted.
        event: EventName,
    },
    /// The sum of the kept measure `field` over events named `event`.
    Sum {
        /// The event.
        event: EventName,
        /// Its kept measure.
        field: Label,
    },
    /// The number of error events (every event whose type is `error`).
    Errors,
    /// 1 when an event named `event` happened within `within_ms` after exposure, else 0.
    Conversion {
        /// The converting event.
        event: EventName,
        /// How long after exposure it counts, ms.
        within_ms: u64,
    },
    /// An event-level quantile of the latency measure of events named `event` (every such
    /// event of an exposed unit since its exposure is one sample of its arm's histogram).
    Latency {
        /// The event whose latency measure is read.
        event: EventName,
        /// The quantile in thousandths (950: p95).
        permille: u16,
    },
    /// The ratio of two unit-level metrics of the same experiment (for example error events
    /// ÷ all events), each unit contributing its numerator and denominator: the ratio of the
    /// arm's sums, with a delta-method variance.
    Ratio {
        /// Index of the numerator in the experiment's metrics.
        numerator: usize,
        /// Index of the denominator.
        denominator: usize,
    },
    /// The number of events per unit (every event the unit emits since exposure).
    Events,
    /// The share of the units that performed `entry` and not `goal` within `within_ms` after
    /// exposure, among the units that performed `entry` (a ratio: abandoned ÷ entered).
    Abandonment {
        /// The funnel's first step.
        entry: EventName,
        /// Its last step.
        goal: EventName,
        /// How long after exposure the goal counts, ms.
        within_ms: u64,
    },
    /// Support tickets per unit: its critical feedback, by the triage rules.
    Tickets {
        /// What makes feedback critical.
        rules: crate::triage::TriageRules,
    },
}

/// A metric of an experiment.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    /// Its name, a column value.
    pub name: Label,
    /// What it measures.
    pub kind: MetricKind,
}

impl Metric {
    /// Whether the metric reads events named `name`.
    pub fn reads(&self, name: EventName) -> bool {
        match &self.kind {
            MetricKind::Count { event }
            | MetricKind::Sum { event, .. }
            | MetricKind::Latency { event, .. }
            | MetricKind::Conversion { event, .. } => *event == name,
            MetricKind::Errors => name.spec().event_type == sightline_schemas::EventType::Error,
            MetricKind::Events => true,
            MetricKind::Abandonment { entry, goal, .. } => *entry == name || *goal == name,
            MetricKind::Tickets { .. } => name.as_str() == "feedback_submitted",
            // Its parts read for it.
            MetricKind::Ratio { .. } => false,
        }
    }

    /// The quantile of an event-level latency metric.
    pub fn quantile(&self) -> Option<f64> {
        match self.kind {
            MetricKind::Latency { permille, .. } => Some(f64::from(permille) / 1000.0),
            _ => None,
        }
    }

    /// Whether per-unit values of the metric go to the per-arm [`Moments`] (all but the
    /// event-level latency metrics).
    pub(super) fn is_unit_level(&self) -> bool {
        !matches!(self.kind, MetricKind::Latency { .. })
    }

    /// Whether the metric is a ratio of per-unit sums (its rows and effects are those of the
    /// ratio, by the delta method).
    pub fn is_ratio(&self) -> bool {
        matches!(
            self.kind,
            MetricKind::Ratio { .. } | MetricKind::Abandonment { .. }
        )
    }

    /// The unit's contribution to the per-arm sums, from its values of every metric and, for
    /// CUPED, its pre-exposure covariate `x` (`None`: no pre-exposure data).
    pub(super) fn moments(&self, values: &[i64], own: i64, x: Option<i64>) -> Moments {
        match self.kind {
            // Not entered: (0, 0); entered: (1, 1); converted: (0, 1).
            MetricKind::Abandonment { .. } => match own {
                0 => Moments::unit(0, Some(0)),
                ONE => Moments::unit(ONE, Some(ONE)),
                _ => Moments::unit(0, Some(ONE)),
            },
            MetricKind::Ratio {
                numerator,
                denominator,
            } => Moments::unit(
                values.get(numerator).copied().unwrap_or(0),
                Some(values.get(denominator).copied().unwrap_or(0)),
            ),
            _ => Moments::unit(own, x),
        }
    }

    /// What `event` adds to the metric's pre-exposure covariate: the metric's own increment
    /// (an occurrence, for a conversion); 0 for metrics without a covariate.
    pub(super) fn pre_increment(&self, event: &Event) -> i64 {
        match &self.kind {
            MetricKind::Conversion { event: name, .. } if event.event_name == *name => ONE,
            MetricKind::Count { .. }
            | MetricKind::Sum { .. }
            | MetricKind::Errors
            | MetricKind::Events
            | MetricKind::Tickets { .. } => self.apply(0, event, 0, 0),
            _ => 0,
        }
    }

    /// Whether the metric has a CUPED covariate: the same metric before exposure (not for
    /// ratios, abandonment and latency, whose covariate slot is taken or meaningless).
    pub(super) fn has_covariate(&self) -> bool {
        matches!(
            self.kind,
            MetricKind::Count { .. }
                | MetricKind::Sum { .. }
                | MetricKind::Errors
                | MetricKind::Events
                | MetricKind::Tickets { .. }
                | MetricKind::Conversion { .. }
        )
    }

    /// The value `event` adds to a unit whose value is `value`, exposed at `exposed_at`.
    ///
    /// Counts and sums add the event weighted by 1 / its `sample_rate` (Horvitz–Thompson), so
    /// that a unit's value estimates what it emitted; the indicators (conversion, abandonment)
    /// are not weighted (see the README's "Adaptive sampling budgets").
    pub(super) fn apply(&self, value: i64, event: &Event, at_ms: u64, exposed_at: u64) -> i64 {
        match &self.kind {
            MetricKind::Count { event: name } if event.event_name == *name => {
                value.saturating_add(weighted(ONE, event))
            }
            MetricKind::Errors if event.event_type == sightline_schemas::EventType::Error => {
                value.saturating_add(weighted(ONE, event))
            }
            MetricKind::Sum { event: name, field } if event.event_name == *name => {
                let measure = event
                    .kept
                    .get(field)
                    .and_then(|v| match v {
                        sightline_schemas::KeptValue::Measure(m) => Some(m.0),
                        _ => None,
                    })
                    .unwrap_or(0);
                value.saturating_add(weighted(measure, event))
            }
            MetricKind::Conversion {
                event: name,
                within_ms,
            } if event.event_name == *name && at_ms <= exposed_at + within_ms => ONE,
            MetricKind::Events => value.saturating_add(weighted(ONE, event)),
            MetricKind::Tickets { rules } if rules.is_critical(event) => {
                value.saturating_add(weighted(ONE, event))
            }
            MetricKind::Abandonment {
                entry,
                goal,
                within_ms,
            } => {
                if value == 0 && event.event_name == *entry {
                    ONE
                } else if value == ONE
                    && event.event_name == *goal
                    && at_ms <= exposed_at + within_ms
                {
                    2 * ONE
                } else {
                    value
                }
            }
            _ => value,
        }
    }
}
