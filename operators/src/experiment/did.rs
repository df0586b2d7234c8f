//! Rollouts by tenant that are not randomised: the panel of per-tenant, per-period metric
//! values they need, and the difference-in-differences look at every closed window
//! ([`sightline_stats::did`] has the estimator, its assumptions and formulas).
//!
//! A rollout experiment ([`Rollout`]) turns a feature on for cohorts of tenants, each at its
//! start; the other tenants it may analyse (its allowlist, or every tenant that is not
//! restricted) are the never-treated controls. Every event of those tenants goes to the
//! [`Panel`]: per (tenant, period), the distinct active units and each metric's sum. A
//! tenant's value in a period is its metric per active unit (for a ratio metric: the ratio of
//! its two sums). At each look, per metric and cohort (and over all cohorts), a tenant's
//! change is its mean value over the periods from its cohort's start less its mean over the
//! `lookback` periods before (a period that straddles the start is in neither), and the
//! placebo change, for the pre-trend check, is the later half of those pre periods less the
//! earlier half.
//!
//! A rollout experiment has no arms and no randomised analysis: its events' assignments, if
//! any, are not read.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sightline_schemas::{Event, Label};
use sightline_stats::did::{CohortChanges, Did, did};

use super::metric::ONE;
use super::{Lookback, Metric, MetricKind};

/// A rollout by tenant.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    /// The cohorts: when each starts (ms) and its tenants (links), by start.
    pub cohorts: Vec<(u64, BTreeSet<u64>)>,
    /// The periods: a tenant's value is per period, and the pre-period of a cohort is the
    /// `lookback.periods` periods before its start.
    pub lookback: Lookback,
}

impl Rollout {
    /// The cohort of tenant `tenant`, if it is treated.
    fn cohort_of(&self, tenant: u64) -> Option<usize> {
        self.cohorts.iter().position(|(_, t)| t.contains(&tenant))
    }

    /// The first period any look reads: the first pre period of the first cohort.
    fn first_period(&self) -> u32 {
        let first = self.cohorts.iter().map(|(s, _)| *s).min().unwrap_or(0);
        self.lookback
            .period(first)
            .saturating_sub(self.lookback.periods)
    }
}

/// Whether a metric can be followed per tenant and period: counts and sums per active unit,
/// and ratios of them (not conversions within a time of exposure, abandonment or latency
/// quantiles, which are defined from an exposure).
pub fn supports(metric: &Metric) -> bool {
    matches!(
        metric.kind,
        MetricKind::Count { .. }
            | MetricKind::Sum { .. }
            | MetricKind::Errors
            | MetricKind::Events
            | MetricKind::Tickets { .. }
            | MetricKind::Ratio { .. }
    )
}

/// One tenant's figures in one period.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Distinct active units.
    pub units: i64,
    /// Each metric's sum (fixed point; 0 for a ratio metric, whose parts hold its sums).
    pub sums: Vec<i64>,
    /// The units seen while the period is open (emptied once it has closed).
    pub open: BTreeSet<u64>,
}

/// The per-tenant, per-period figures of a rollout experiment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Panel {
    /// By (tenant link, period).
    #[serde(with = "crate::state::pairs")]
    pub cells: BTreeMap<(u64, u32), Cell>,
}

impl Panel {
    /// Adds `event` (of an allowed tenant, with a user) to the panel. Returns whether it was
    /// read.
    pub fn add(&mut self, rollout: &Rollout, metrics: &[Metric], event: &Event) -> bool {
        let at_ms = event.event_time_ms.max(0) as u64;
        let period = rollout.lookback.period(at_ms);
        if period < rollout.first_period() {
            return false;
        }
        let cell = self
            .cells
            .entry((event.links.tenant, period))
            .or_insert_with(|| Cell {
                sums: vec![0; metrics.len()],
                ..Cell::default()
            });
        if cell.open.insert(event.links.user) {
            cell.units += 1;
        }
        for (sum, metric) in cell.sums.iter_mut().zip(metrics) {
            if !matches!(metric.kind, MetricKind::Ratio { .. }) {
                *sum += metric.pre_increment(event);
            }
        }
        true
    }

    /// Forgets the units of the periods that have ended by `end_ms` (none of their events can
    /// come any more).
    pub fn close(&mut self, lookback: Lookback, end_ms: u64) {
        for ((_, period), cell) in self.cells.iter_mut() {
            if (u64::from(*period) + 1) * lookback.period_ms <= end_ms && !cell.open.is_empty() {
                cell.open = BTreeSet::new();
            }
        }
    }

    /// A tenant's value of metric `i` in a period.
    fn value(cell: &Cell, metrics: &[Metric], i: usize) -> Option<f64> {
        match metrics.get(i)?.kind {
            MetricKind::Ratio {
                numerator,
                denominator,
            } => {
                let (num, den) = (*cell.sums.get(numerator)?, *cell.sums.get(denominator)?);
                (den != 0).then(|| num as f64 / den as f64)
            }
            _ => {
                let sum = *cell.sums.get(i)?;
                (cell.units > 0).then(|| sum as f64 / ONE as f64 / cell.units as f64)
            }
        }
    }
}

/// Where a rollout stands for a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DidState {
    /// Too few tenants or periods with data for an estimate.
    Insufficient,
    /// The pre-trend check fails: the treated tenants already moved apart before the start,
    /// so the estimate is not to be trusted.
    PreTrend,
    /// Significantly positive (fixed-horizon).
    SignificantPositive,
    /// Significantly negative.
    SignificantNegative,
    /// Nothing conclusive.
    Running,
}

impl DidState {
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            DidState::Insufficient => "insufficient",
            DidState::PreTrend => "pre_trend",
            DidState::SignificantPositive => "significant_positive",
            DidState::SignificantNegative => "significant_negative",
            DidState::Running => "running",
        }
    }
}

/// One row of `experiment_did`: a metric of a rollout experiment, for one cohort (or all of
/// them), as of the end of a window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DidRow {
    /// Experiment id.
    pub experiment: Label,
    /// Metric name.
    pub metric: Label,
    /// The cohort's start (ms); `None`: every cohort that has started, combined.
    pub cohort_start_ms: Option<u64>,
    /// Treated tenants with data before and after.
    pub treated_tenants: i64,
    /// Control tenants with data before and after.
    pub control_tenants: i64,
    /// Pre periods per tenant (the lookback).
    pub pre_periods: i64,
    /// Post periods so far (of the cohort; of the earliest cohort when combined).
    pub post_periods: i64,
    /// The estimate, when there is one.
    pub estimate: Option<DidFigures>,
    /// The pre-trend check: the same estimator on the pre-period's halves.
    pub pre_trend: Option<DidFigures>,
    /// Where it stands.
    pub state: DidState,
}

/// The figures of a difference-in-differences estimate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DidFigures {
    /// Treated less control change.
    pub estimate: f64,
    /// The treated tenants' mean change.
    pub treated_change: f64,
    /// The controls' mean change.
    pub control_change: f64,
    /// Lower bound of the `1 − α` interval (fixed-horizon).
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
    /// Two-sided p-value.
    pub p_value: f64,
}

impl From<Did> for DidFigures {
    fn from(d: Did) -> DidFigures {
        DidFigures {
            estimate: d.estimate,
            treated_change: d.treated_change,
            control_change: d.control_change,
            lower: d.lower,
            upper: d.upper,
            p_value: d.p_value,
        }
    }
}

/// A tenant's value per period.
type Series = BTreeMap<u32, f64>;

/// The mean of `values` over the periods `from..to` that have one.
fn mean_over(values: &Series, from: u32, to: u32) -> Option<f64> {
    let (n, sum) = values
        .range(from..to.max(from))
        .fold((0usize, 0.0), |(n, s), (_, v)| (n + 1, s + v));
    (n > 0).then(|| sum / n as f64)
}

/// A cohort's periods: pre `[pre_from, pre_to)`, post `[post_from, now]`.
struct Periods {
    pre_from: u32,
    pre_to: u32,
    post_from: u32,
    now: u32,
}

impl Periods {
    fn of(lookback: Lookback, start_ms: u64, now: u32) -> Periods {
        let pre_to = lookback.period(start_ms);
        let post_from = lookback.period(start_ms + lookback.period_ms - 1);
        Periods {
            pre_from: pre_to.saturating_sub(lookback.periods),
            pre_to,
            post_from,
            now,
        }
    }

    fn change(&self, values: &Series) -> Option<f64> {
        Some(
            mean_over(values, self.post_from, self.now + 1)?
                - mean_over(values, self.pre_from, self.pre_to)?,
        )
    }

    fn placebo(&self, values: &Series) -> Option<f64> {
        let mid = self.pre_from + (self.pre_to - self.pre_from) / 2;
        if mid == self.pre_from {
            return None;
        }
        Some(mean_over(values, mid, self.pre_to)? - mean_over(values, self.pre_from, mid)?)
    }
}

/// The DiD rows of rollout experiment `id` at the end of the window ending at `end_ms`: per
/// metric, one per cohort that has started and, with two or more, one over all of them.
pub fn look(
    id: &Label,
    panel: &Panel,
    rollout: &Rollout,
    metrics: &[Metric],
    alpha: f64,
    end_ms: u64,
    rows: &mut Vec<DidRow>,
) {
    let lookback = rollout.lookback;
    let now = lookback.period(end_ms.saturating_sub(1));
    let started: Vec<(u64, Periods)> = rollout
        .cohorts
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| *s < end_ms)
        .map(|s| (s, Periods::of(lookback, s, now)))
        .collect();
    if started.is_empty() {
        return;
    }
    let controls: Vec<u64> = panel
        .cells
        .keys()
        .map(|(t, _)| *t)
        .filter(|t| rollout.cohort_of(*t).is_none())
        .collect::<BTreeSet<u64>>()
        .into_iter()
        .collect();
    for (i, metric) in metrics.iter().enumerate() {
        // Per tenant, its value per period.
        let mut series: BTreeMap<u64, Series> = BTreeMap::new();
        for ((tenant, period), cell) in &panel.cells {
            if let Some(v) = Panel::value(cell, metrics, i) {
                series.entry(*tenant).or_default().insert(*period, v);
            }
        }
        let empty = BTreeMap::new();
        let of = |t: &u64| series.get(t).unwrap_or(&empty);
        let changes = |(start, periods): &(u64, Periods),
                       f: &dyn Fn(&Periods, &Series) -> Option<f64>| {
            let cohort = rollout.cohorts.iter().find(|(s, _)| s == start);
            CohortChanges {
                treated: cohort
                    .into_iter()
                    .flat_map(|(_, tenants)| tenants)
                    .filter_map(|t| f(periods, of(t)))
                    .collect(),
                controls: controls.iter().map(|t| f(periods, of(t))).collect(),
            }
        };
        let main: Vec<CohortChanges> = started
            .iter()
            .map(|c| changes(c, &|p, v| p.change(v)))
            .collect();
        let placebo: Vec<CohortChanges> = started
            .iter()
            .map(|c| changes(c, &|p, v| p.placebo(v)))
            .collect();
        let mut row = |cohort_start_ms: Option<u64>,
                       main: &[CohortChanges],
                       placebo: &[CohortChanges],
                       post: i64| {
            let estimate = did(main, alpha);
            let pre_trend = did(placebo, alpha);
            let state = match (estimate, pre_trend) {
                (None, _) => DidState::Insufficient,
                (Some(_), Some(p)) if p.p_value < alpha => DidState::PreTrend,
                (Some(d), _) if d.p_value < alpha && d.estimate > 0.0 => {
                    DidState::SignificantPositive
                }
                (Some(d), _) if d.p_value < alpha => DidState::SignificantNegative,
                _ => DidState::Running,
            };
            let counted = |f: fn(&CohortChanges) -> usize| main.iter().map(f).sum::<usize>() as i64;
            rows.push(DidRow {
                experiment: id.clone(),
                metric: metric.name.clone(),
                cohort_start_ms,
                treated_tenants: counted(|c| c.treated.len()),
                control_tenants: (0..controls.len())
                    .filter(|k| {
                        main.iter()
                            .any(|c| c.controls.get(*k).is_some_and(|d| d.is_some()))
                    })
                    .count() as i64,
                pre_periods: i64::from(lookback.periods),
                post_periods: post,
                estimate: estimate.map(DidFigures::from),
                pre_trend: pre_trend.map(DidFigures::from),
                state,
            });
        };
        for (k, (start, periods)) in started.iter().enumerate() {
            let post = i64::from(now + 1) - i64::from(periods.post_from);
            row(Some(*start), &main[k..=k], &placebo[k..=k], post.max(0));
        }
        if started.len() > 1 {
            let post = i64::from(now + 1) - i64::from(started[0].1.post_from);
            row(None, &main, &placebo, post.max(0));
        }
    }
}
