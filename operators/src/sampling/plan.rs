//! One interval's rate table from its tallies and the carried state: the risk terms, the
//! moving baselines, the damping, and the budget ([`super::rates::solve`]).
//!
//! The risk of a segment is `1 + Σ weightₖ × termₖ`, each term in [0, 1]:
//!
//! - `new_release`: the share of the segment's volume from app versions first seen less than
//!   `new_release_ms` before the interval, each weighted by how new it is (1 when first seen in
//!   this interval, falling linearly to 0 at `new_release_ms`). What the first table ever
//!   sees is established (a pipeline started without state cannot tell new from old);
//! - `new_tenant`: the same for tenants (by their link, which does not rotate), over
//!   `new_tenant_ms`;
//! - `elevated_errors`: the z-score of the error share of the segment's *context* (the segment
//!   without its `event_type`, so that a release's views and actions are kept more when its
//!   errors rise) against the context's moving baseline, `z = (p − b) / √(b(1 − b) / n)`,
//!   mapped to `(z − z₀) / z₀` clamped to [0, 1]. The baseline is an exponential moving
//!   average over intervals; a context never seen starts from the pooled baseline of all
//!   traffic, so a new release that starts failing is compared with the rest, not with itself;
//! - `experiment`: the share of the segment's volume that carries an experiment ramping
//!   (between its first and last phase start) or with a guardrail breach in progress.
//!
//! The rate of each segment with volume then comes from [`super::rates::solve`] with weight
//! `risk × ln(1 + volume)`, inside `[max(floor, previous / max_decrease), min(1, previous ×
//! max_increase)]`; when even those lower bounds keep more than the budget, the budget wins and
//! the lower bounds drop to the floor.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sightline_schemas::{EventType, Label};

use super::rates::{Demand, Fit, solve};
use super::{SamplingRules, Segment, SegmentField, SegmentPart, SegmentTally, WEIGHT_ONE};
use crate::experiment::Decision;

/// A segment's published rate and how long it has been idle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentRate {
    /// The segment.
    pub segment: Segment,
    /// Its rate.
    pub rate: f64,
    /// Intervals in a row without events.
    pub idle_intervals: u32,
}

/// When an app version or a tenant was first and last seen (interval starts, ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// First seen.
    pub first_ms: u64,
    /// Last seen.
    pub last_ms: u64,
}

/// What carries over from one window to the next; saved after every window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingState {
    /// The end of the last window processed, ms (0: none yet).
    pub window_end_ms: u64,
    /// Tables published so far (the last one's version).
    pub version: u64,
    /// The start of the interval being accumulated, if one is open.
    pub interval_start_ms: Option<u64>,
    /// Its tallies so far.
    pub partial: Vec<(SegmentPart, SegmentTally)>,
    /// App versions seen.
    pub versions: Vec<(Label, Seen)>,
    /// Tenants (links) seen.
    pub tenants: Vec<(u64, Seen)>,
    /// Moving error-share baselines by context.
    pub baselines: Vec<(Segment, f64)>,
    /// The pooled baseline of all traffic.
    pub pooled: Option<f64>,
    /// Every segment's rate, in segment order.
    pub rates: Vec<SegmentRate>,
    /// `(experiment, arm, rule)` of the guardrails breaching now.
    pub breaching: Vec<(Label, Label, Label)>,
}

/// One segment's row of a rate table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetRow {
    /// The segment's values, in the order of the configured fields (`*` for the default row).
    pub segment: Segment,
    /// Weighted sampleable events in the interval.
    pub volume: f64,
    /// Weighted never-sampled events in the interval (kept at rate 1).
    pub always_kept: f64,
    /// Events received (unweighted).
    pub events: i64,
    /// The `new_release` term.
    pub new_release: f64,
    /// The `new_tenant` term.
    pub new_tenant: f64,
    /// The context's error share in the interval.
    pub error_share: f64,
    /// The context's baseline before the interval.
    pub error_baseline: f64,
    /// The z-score of the error share.
    pub error_z: f64,
    /// The `elevated_errors` term.
    pub elevated_errors: f64,
    /// The `experiment` term.
    pub experiment: f64,
    /// The risk.
    pub risk: f64,
    /// The published rate.
    pub rate: f64,
    /// `rate × volume`.
    pub expected_kept: f64,
    /// Why the rate is what it is: `budget`, `cap`, `floor`, `damped`, `under_budget`,
    /// `never_sampled`, `idle`, `forgotten`, `default`.
    pub reason: String,
}

/// One interval's rate table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetTable {
    /// Its version (1, 2, …).
    pub version: u64,
    /// Interval start, ms.
    pub window_start_ms: u64,
    /// Interval end, ms.
    pub window_end_ms: u64,
    /// Events the budget allows in the interval.
    pub budget: f64,
    /// Events expected kept at these rates (never-sampled ones included).
    pub expected_kept: f64,
    /// Rows, by segment, then the default row.
    pub rows: Vec<BudgetRow>,
}

/// Adds one window's tallies and decisions to the open interval (opening it at
/// `interval_start`).
pub fn add_window(
    state: &mut SamplingState,
    interval_start: u64,
    window_end: u64,
    tallies: BTreeMap<SegmentPart, SegmentTally>,
    decisions: Vec<Decision>,
) {
    use differential_dataflow::difference::Semigroup;
    state.window_end_ms = window_end;
    state.interval_start_ms = Some(interval_start);
    let mut partial: BTreeMap<SegmentPart, SegmentTally> =
        std::mem::take(&mut state.partial).into_iter().collect();
    for (part, tally) in tallies {
        partial.entry(part).or_default().plus_equals(&tally);
    }
    state.partial = partial.into_iter().collect();
    let mut breaching: BTreeSet<(Label, Label, Label)> =
        std::mem::take(&mut state.breaching).into_iter().collect();
    for d in decisions {
        let key = (d.experiment, d.arm, d.rule);
        let kill = d.action == sightline_stats::guardrail::Action::Kill;
        if d.breached_intervals > 0 || kill {
            breaching.insert(key);
        } else {
            breaching.remove(&key);
        }
    }
    state.breaching = breaching.into_iter().collect();
}

/// What one segment gathered in an interval.
#[derive(Default)]
struct Gathered {
    tally: SegmentTally,
    /// Weighted volume (all events) per app version, per tenant, and carrying a hot experiment.
    versions: BTreeMap<Label, i64>,
    tenants: BTreeMap<u64, i64>,
    hot: i64,
}

/// Closes the open interval ending at `end`: its table, and the state after it.
pub fn close_interval(state: &mut SamplingState, rules: &SamplingRules, end: u64) -> BudgetTable {
    use differential_dataflow::difference::Semigroup;
    let start = state.interval_start_ms.take().unwrap_or(end);
    let partial = std::mem::take(&mut state.partial);
    let hot = hot_experiments(rules, state, start);
    // Per segment.
    let mut segments: BTreeMap<Segment, Gathered> = BTreeMap::new();
    let mut versions: BTreeMap<Label, Seen> =
        std::mem::take(&mut state.versions).into_iter().collect();
    let mut tenants: BTreeMap<u64, Seen> = std::mem::take(&mut state.tenants).into_iter().collect();
    // What the first table ever sees is established, not new: a pipeline started without
    // state has nothing to compare with, and boosting everything would boost nothing.
    let first_seen = if state.version == 0 { 0 } else { start };
    let new_seen = Seen {
        first_ms: first_seen,
        last_ms: start,
    };
    for (part, tally) in &partial {
        let g = segments.entry(part.segment.clone()).or_default();
        g.tally.plus_equals(tally);
        let weight = tally.sampleable_micros + tally.always_micros;
        *g.versions.entry(part.app_version.clone()).or_default() += weight;
        let seen = |s: &mut Seen| s.last_ms = s.last_ms.max(start);
        seen(versions.entry(part.app_version.clone()).or_insert(new_seen));
        if part.tenant != 0 {
            *g.tenants.entry(part.tenant).or_default() += weight;
            seen(tenants.entry(part.tenant).or_insert(new_seen));
        }
        if part.assignments.iter().any(|(e, _)| hot.contains(e)) {
            g.hot += weight;
        }
    }
    let forget_before = start.saturating_sub(rules.remember_ms);
    versions.retain(|_, s| s.last_ms >= forget_before);
    tenants.retain(|_, s| s.last_ms >= forget_before);
    // Error shares per context.
    let context_of = context_fn(rules);
    let mut contexts: BTreeMap<Segment, (i64, i64)> = BTreeMap::new();
    for (segment, g) in &segments {
        let c = contexts.entry(context_of(segment)).or_default();
        c.0 += g.tally.events;
        c.1 += g.tally.errors;
    }
    let mut baselines: BTreeMap<Segment, f64> =
        std::mem::take(&mut state.baselines).into_iter().collect();
    let (all_events, all_errors) = contexts
        .values()
        .fold((0, 0), |(n, e), (cn, ce)| (n + cn, e + ce));
    let pooled_before = state.pooled;
    let alpha = rules.baseline_weight;
    let mut errors: BTreeMap<Segment, (f64, f64, f64, f64)> = BTreeMap::new();
    for (context, &(n, e)) in &contexts {
        let p = if n > 0 { e as f64 / n as f64 } else { 0.0 };
        let before = baselines.get(context).copied().or(pooled_before);
        let (z, term) = match before {
            Some(b) if n >= rules.min_events => {
                let z = (p - b) / ((b * (1.0 - b)).max(1e-4) / n as f64).sqrt();
                (z, ((z - rules.error_z) / rules.error_z).clamp(0.0, 1.0))
            }
            _ => (0.0, 0.0),
        };
        errors.insert(context.clone(), (p, before.unwrap_or(p), z, term));
        if n >= rules.min_events {
            let b = before.unwrap_or(p);
            baselines.insert(context.clone(), (1.0 - alpha) * b + alpha * p);
        }
    }
    if all_events >= rules.min_events {
        let p = all_errors as f64 / all_events as f64;
        state.pooled = Some(pooled_before.map_or(p, |b| (1.0 - alpha) * b + alpha * p));
    }
    // Risk, demand and bounds per segment with volume.
    let previous: BTreeMap<Segment, SegmentRate> = std::mem::take(&mut state.rates)
        .into_iter()
        .map(|r| (r.segment.clone(), r))
        .collect();
    let interval_s = (end - start) as f64 / 1000.0;
    let budget = rules.budget_per_second * interval_s;
    let micros = |m: i64| m as f64 / WEIGHT_ONE as f64;
    let always: f64 = segments
        .values()
        .map(|g| micros(g.tally.always_micros))
        .sum();
    let mut rows: Vec<BudgetRow> = Vec::new();
    let mut demands: Vec<(usize, Demand)> = Vec::new();
    // First seen at 0: established (see above).
    let newness = |seen: Option<&Seen>, span: u64| match seen {
        Some(s) if s.first_ms > 0 && span > 0 => {
            let age = start.saturating_sub(s.first_ms);
            (1.0 - age as f64 / span as f64).max(0.0)
        }
        _ => 0.0,
    };
    for (segment, g) in &segments {
        let total = (g.tally.sampleable_micros + g.tally.always_micros).max(1) as f64;
        let share = |parts: f64| (parts / total).clamp(0.0, 1.0);
        let new_release = share(
            g.versions
                .iter()
                .map(|(v, w)| *w as f64 * newness(versions.get(v), rules.new_release_ms))
                .sum(),
        );
        let new_tenant = share(
            g.tenants
                .iter()
                .map(|(t, w)| *w as f64 * newness(tenants.get(t), rules.new_tenant_ms))
                .sum(),
        );
        let experiment = share(g.hot as f64);
        let (error_share, error_baseline, error_z, elevated_errors) = errors
            .get(&context_of(segment))
            .copied()
            .unwrap_or_default();
        let w = &rules.weights;
        let risk = 1.0
            + w.new_release * new_release
            + w.new_tenant * new_tenant
            + w.error_rate * elevated_errors
            + w.experiment * experiment;
        let volume = micros(g.tally.sampleable_micros);
        if volume > 0.0 {
            let before = previous.get(segment).map_or(rules.initial_rate, |r| r.rate);
            let hi = (before * rules.max_increase).min(1.0).max(rules.floor);
            let lo = (before / rules.max_decrease).max(rules.floor).min(hi);
            let demand = Demand {
                volume,
                weight: risk * (1.0 + volume).ln(),
                lo,
                hi,
            };
            demands.push((rows.len(), demand));
        }
        rows.push(BudgetRow {
            segment: segment.clone(),
            volume: round(volume, 3),
            always_kept: round(micros(g.tally.always_micros), 3),
            events: g.tally.events,
            new_release: round(new_release, 4),
            new_tenant: round(new_tenant, 4),
            error_share: round(error_share, 4),
            error_baseline: round(error_baseline, 4),
            error_z: round(error_z, 2),
            elevated_errors: round(elevated_errors, 4),
            experiment: round(experiment, 4),
            risk: round(risk, 4),
            rate: 1.0,
            expected_kept: 0.0,
            reason: "never_sampled".into(),
        });
    }
    let target = budget - always;
    let only: Vec<Demand> = demands.iter().map(|(_, d)| *d).collect();
    let (mut rates, mut fit) = solve(&only, target.max(0.0));
    if fit == Fit::AboveAtLowest {
        // Damping must not break the budget: the lower bounds drop to the floor.
        let floors: Vec<Demand> = only
            .iter()
            .map(|d| Demand {
                lo: rules.floor.min(d.hi),
                ..*d
            })
            .collect();
        (rates, fit) = solve(&floors, target.max(0.0));
    }
    for ((row, d), rate) in demands.iter().zip(rates) {
        let rate = published(rate, rules.floor);
        let r = &mut rows[*row];
        r.rate = rate;
        r.expected_kept = round(rate * d.volume, 3);
        r.reason = reason(rate, d, fit, rules.floor).into();
    }
    // The state's rates: this interval's, then the idle ones.
    let mut next_rates: Vec<SegmentRate> = Vec::new();
    for r in &rows {
        next_rates.push(SegmentRate {
            segment: r.segment.clone(),
            rate: r.rate,
            idle_intervals: 0,
        });
    }
    for (segment, before) in previous {
        if segments.contains_key(&segment) {
            continue;
        }
        let idle = before.idle_intervals + 1;
        let forgotten = idle > rules.forget_after_intervals;
        let rate = if forgotten {
            rules.initial_rate
        } else {
            before.rate
        };
        rows.push(idle_row(
            segment.clone(),
            rate,
            if forgotten { "forgotten" } else { "idle" },
        ));
        if !forgotten {
            next_rates.push(SegmentRate {
                segment,
                rate,
                idle_intervals: idle,
            });
        }
    }
    rows.sort_by(|a, b| a.segment.cmp(&b.segment));
    next_rates.sort_by(|a, b| a.segment.cmp(&b.segment));
    let default = std::iter::repeat_n(Label::from("*"), rules.fields.len()).collect();
    rows.push(idle_row(default, rules.initial_rate, "default"));
    // Baselines of contexts no segment uses any more are forgotten with them.
    let live: BTreeSet<Segment> = next_rates.iter().map(|r| context_of(&r.segment)).collect();
    baselines.retain(|c, _| live.contains(c));
    state.baselines = baselines.into_iter().collect();
    state.versions = versions.into_iter().collect();
    state.tenants = tenants.into_iter().collect();
    state.rates = next_rates;
    state.version += 1;
    let expected_kept = rows.iter().map(|r| r.expected_kept).sum::<f64>() + always;
    BudgetTable {
        version: state.version,
        window_start_ms: start,
        window_end_ms: end,
        budget: round(budget, 3),
        expected_kept: round(expected_kept, 3),
        rows,
    }
}

/// The experiments whose traffic is at risk at `at`: ramping, or breaching a guardrail.
fn hot_experiments(rules: &SamplingRules, state: &SamplingState, at: u64) -> BTreeSet<Label> {
    let mut hot: BTreeSet<Label> = rules
        .ramps
        .iter()
        .filter(|(_, first, last)| *first <= at && at < *last)
        .map(|(id, _, _)| id.clone())
        .collect();
    hot.extend(state.breaching.iter().map(|(e, _, _)| e.clone()));
    hot
}

/// The segment → context map: the segment with its `event_type` value replaced by `*`.
fn context_fn(rules: &SamplingRules) -> impl Fn(&Segment) -> Segment + use<> {
    let at = rules
        .fields
        .iter()
        .position(|f| *f == SegmentField::EventType);
    let any: Label = Arc::from("*");
    move |segment: &Segment| {
        let mut c = segment.clone();
        if let Some(i) = at
            && let Some(v) = c.get_mut(i)
        {
            *v = any.clone();
        }
        c
    }
}

/// A row without volume.
fn idle_row(segment: Segment, rate: f64, reason: &str) -> BudgetRow {
    BudgetRow {
        segment,
        volume: 0.0,
        always_kept: 0.0,
        events: 0,
        new_release: 0.0,
        new_tenant: 0.0,
        error_share: 0.0,
        error_baseline: 0.0,
        error_z: 0.0,
        elevated_errors: 0.0,
        experiment: 0.0,
        risk: 1.0,
        rate,
        expected_kept: 0.0,
        reason: reason.into(),
    }
}

/// Why a solved rate is what it is.
fn reason(rate: f64, d: &Demand, fit: Fit, floor: f64) -> &'static str {
    let near = |a: f64, b: f64| (a - b).abs() <= 1e-9_f64.max(1e-6 * b);
    match fit {
        Fit::BelowAtHighest if near(rate, 1.0) => "under_budget",
        Fit::AboveAtLowest if near(rate, floor) => "floor",
        Fit::BelowAtHighest | Fit::AboveAtLowest => "damped",
        Fit::Met if near(rate, 1.0) => "cap",
        Fit::Met if near(rate, floor) => "floor",
        Fit::Met if near(rate, d.lo) || near(rate, d.hi) => "damped",
        Fit::Met => "budget",
    }
}

/// A rate as published: six significant digits, never below the floor nor above 1. What an
/// SDK reads is exactly what the next interval damps from.
fn published(rate: f64, floor: f64) -> f64 {
    if rate <= 0.0 {
        return floor;
    }
    let digits = 5 - rate.log10().floor() as i32;
    let scale = 10f64.powi(digits);
    ((rate * scale).round() / scale).clamp(floor, 1.0)
}

/// `value` rounded to `places` decimals (no long digit runs in a table or on a topic).
fn round(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

/// The event types a configuration may name as never sampled, by name.
pub fn event_type_named(name: &str) -> Option<EventType> {
    [
        EventType::View,
        EventType::Action,
        EventType::Outcome,
        EventType::Error,
        EventType::SystemHealth,
    ]
    .into_iter()
    .find(|t| t.as_str() == name)
}
