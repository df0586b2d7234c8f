//! The command-center dashboards as windowed aggregates: command-queue health, integration
//! health and feedback. Each is an `explode` into a [`Tally`] (named counters and named
//! distributions, a difference type like the latency histogram), closed by
//! [`crate::close_windows`] like every other aggregate. The values they read are the
//! properties the schemas keep (`x-sightline.keep`), by name.

use std::borrow::{Borrow, Cow};
use std::collections::BTreeMap;
use std::sync::LazyLock;

use differential_dataflow::VecCollection;
use differential_dataflow::difference::{IsZero, Monoid, Multiply, Semigroup};
use serde::{Deserialize, Serialize};
use sightline_schemas::{Event, Label};
use smallvec::SmallVec;

use crate::histogram::LatencyHistogram;
use crate::window::{Time, WindowKey, Windows};

/// The name of a counter, distribution or time in a [`Tally`]: a static name costs no
/// allocation; names made from data (`reason:<dismiss_reason>`, `tag:<tag>`) are owned.
pub type Name = Cow<'static, str>;

/// Named counters and named distributions of one group: the difference of the product
/// aggregates. Adding merges by name, exactly; zero entries are dropped. Each list is sorted by
/// name and short (a handful of names per event), so it is kept inline.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Tally {
    /// Counters by name, in millionths of an event: an event adds its Horvitz–Thompson weight
    /// (1 / `sample_rate`, [`sightline_schemas::WEIGHT_ONE`] when not sampled), so that a
    /// sampled stream counts what was emitted. Read them with [`Tally::get`].
    pub counts: SmallVec<[(Name, i64); 3]>,
    /// Distributions by name (values in millionths of their unit, as the histogram's
    /// "microseconds").
    pub dists: SmallVec<[(Name, LatencyHistogram); 1]>,
    /// Latest times of named occurrences (ms), for "what came last" within a window; a
    /// tally is only ever added to (events are never retracted), where max is exact.
    pub last: SmallVec<[(Name, u64); 1]>,
}

/// One event, in the millionths [`Tally::counts`] are kept in.
const ONE: i64 = sightline_schemas::WEIGHT_ONE as i64;

/// Millionths of an event, rounded to whole events.
fn events(micros: i64) -> i64 {
    (micros + ONE / 2).div_euclid(ONE)
}

/// Finds `name` in a sorted list, or where it goes. The lists are short and the name is
/// nearly always there: a scan for an equal name (lengths first, so that most entries cost no
/// string comparison) finds it with fewer string comparisons than a binary search, which
/// compares strings at every step; only a new name is placed by one.
fn slot<V>(list: &[(Name, V)], name: &str) -> Result<usize, usize> {
    match list.iter().position(|(n, _)| n.as_ref() == name) {
        Some(i) => Ok(i),
        None => list.binary_search_by(|(n, _)| n.as_ref().cmp(name)),
    }
}

impl Tally {
    /// A tally of nothing.
    pub fn new() -> Tally {
        Tally::default()
    }

    /// Adds one event to counter `name` (weighed by [`Tally::weighted`]).
    pub fn count(mut self, name: impl Into<Name>) -> Tally {
        self.add_count(&name.into(), ONE);
        self
    }

    /// The tally of one event of weight `weight_micros` (its
    /// [`Event::weight_micros`]): counters and distributions built with weight 1 are scaled to
    /// it. Unchanged for an event that was not sampled.
    pub fn weighted(mut self, weight_micros: u64) -> Tally {
        if weight_micros == sightline_schemas::WEIGHT_ONE {
            return self;
        }
        for (_, v) in &mut self.counts {
            *v = crate::aggregates::scaled_by_weight(*v, weight_micros);
        }
        for (_, h) in &mut self.dists {
            *h = std::mem::take(h).with_weight(weight_micros);
        }
        self
    }

    /// Adds `value` (in its unit; kept in millionths) to distribution `name`; negative or
    /// non-finite values are left out.
    pub fn sample(mut self, name: &'static str, value: f64) -> Tally {
        self.add_sample(name, value, sightline_schemas::WEIGHT_ONE);
        self
    }

    /// Records that `name` happened at `at_ms`.
    pub fn at(mut self, name: &'static str, at_ms: u64) -> Tally {
        self.add_at(name, at_ms);
        self
    }

    /// Adds `micros` millionths of an event to counter `name` in place (an event of weight
    /// `w` adds `w`: what [`Tally::count`] then [`Tally::weighted`] give, added with
    /// [`Semigroup::plus_equals`]).
    pub fn add_count(&mut self, name: &str, micros: i64) {
        match slot(&self.counts, name) {
            Ok(i) => {
                self.counts[i].1 += micros;
                if self.counts[i].1 == 0 {
                    self.counts.remove(i);
                }
            }
            Err(i) => self
                .counts
                .insert(i, (Name::Owned(name.to_owned()), micros)),
        }
    }

    /// Adds `value` (in its unit) of weight `weight_micros` to distribution `name` in place,
    /// as [`Tally::sample`] then [`Tally::weighted`] then [`Semigroup::plus_equals`] would;
    /// negative or non-finite values are left out.
    pub fn add_sample(&mut self, name: &'static str, value: f64, weight_micros: u64) {
        if !(value.is_finite() && value >= 0.0) {
            return;
        }
        let sample = LatencyHistogram::from_weighted_sample(
            (value * 1_000_000.0).round() as u64,
            weight_micros,
        );
        match slot(&self.dists, name) {
            Ok(i) => {
                self.dists[i].1.plus_equals(&sample);
                if self.dists[i].1.is_zero() {
                    self.dists.remove(i);
                }
            }
            Err(i) => self.dists.insert(i, (Name::Borrowed(name), sample)),
        }
    }

    /// Records in place that `name` happened at `at_ms` (what [`Tally::at`] does).
    pub fn add_at(&mut self, name: &'static str, at_ms: u64) {
        match slot(&self.last, name) {
            Ok(i) => self.last[i].1 = self.last[i].1.max(at_ms),
            Err(i) => self.last.insert(i, (Name::Borrowed(name), at_ms)),
        }
    }

    /// Counter `name` in events, rounded to whole ones (0 when absent): the count when no
    /// event was sampled, the Horvitz–Thompson estimate of the events emitted otherwise.
    pub fn get(&self, name: &str) -> i64 {
        slot(&self.counts, name).map_or(0, |i| events(self.counts[i].1))
    }

    /// Distribution `name`, if any sample.
    pub fn dist(&self, name: &str) -> Option<&LatencyHistogram> {
        slot(&self.dists, name)
            .ok()
            .map(|i| &self.dists[i].1)
            .filter(|h| h.count > 0)
    }

    /// The latest time of `name`, if it happened.
    pub fn last_at(&self, name: &str) -> Option<u64> {
        slot(&self.last, name).ok().map(|i| self.last[i].1)
    }

    /// Counters whose name starts with `prefix`, without it.
    pub fn counts_with(&self, prefix: &str) -> BTreeMap<String, i64> {
        self.counts
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_owned(), events(*v))))
            .filter(|(_, v)| *v != 0)
            .collect()
    }
}

impl IsZero for Tally {
    fn is_zero(&self) -> bool {
        self.counts.is_empty() && self.dists.is_empty() && self.last.is_empty()
    }
}

impl Semigroup for Tally {
    fn plus_equals(&mut self, rhs: &Self) {
        for (k, v) in &rhs.counts {
            match slot(&self.counts, k) {
                Ok(i) => {
                    self.counts[i].1 += v;
                    if self.counts[i].1 == 0 {
                        self.counts.remove(i);
                    }
                }
                Err(i) => self.counts.insert(i, (k.clone(), *v)),
            }
        }
        for (k, h) in &rhs.dists {
            match slot(&self.dists, k) {
                Ok(i) => {
                    self.dists[i].1.plus_equals(h);
                    if self.dists[i].1.is_zero() {
                        self.dists.remove(i);
                    }
                }
                Err(i) => self.dists.insert(i, (k.clone(), h.clone())),
            }
        }
        for (k, t) in &rhs.last {
            match slot(&self.last, k) {
                Ok(i) => self.last[i].1 = self.last[i].1.max(*t),
                Err(i) => self.last.insert(i, (k.clone(), *t)),
            }
        }
    }
}

impl Monoid for Tally {
    fn zero() -> Self {
        Tally::default()
    }
}

impl Multiply<isize> for Tally {
    type Output = Tally;

    /// Scales counters and distributions; the latest times are kept (they are only ever
    /// added, never retracted: see [`Tally::last`]).
    fn multiply(mut self, rhs: &isize) -> Tally {
        if *rhs == 1 {
            return self;
        }
        let k = *rhs as i64;
        self.counts.retain(|(_, v)| {
            *v *= k;
            *v != 0
        });
        for (_, h) in &mut self.dists {
            *h = std::mem::take(h).multiply(rhs);
        }
        self.dists.retain(|(_, h)| !h.is_zero());
        self
    }
}

/// A product aggregate's key: a window and one label (an action type, an integration, a
/// feature area and breakdown).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProductKey {
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// The group (an `action_type`, an `integration`, a `feature_area`).
    pub group: Label,
    /// A breakdown (`all`, `experiment:<id>`, `user_role`) and its value; `all`/`all` where
    /// there is none.
    pub breakdown: (Label, Label),
}

impl WindowKey for ProductKey {
    fn window_start_ms(&self) -> u64 {
        self.window_start_ms
    }
}

fn name_is(e: &Event, name: &str) -> bool {
    e.event_name.as_str() == name
}

/// The events [`command_queue`] reads.
pub const COMMAND_QUEUE_EVENTS: [&str; 4] = [
    "recommendation_generated",
    "recommendation_viewed",
    "recommendation_accepted",
    "recommendation_dismissed",
];

/// The events [`integration_health`] reads.
pub const INTEGRATION_EVENTS: [&str; 3] = [
    "integration_call_success",
    "integration_call_failed",
    "circuit_breaker_opened",
];

/// The events [`feedback`] reads.
pub const FEEDBACK_EVENTS: [&str; 1] = ["project_feedback_submitted"];

/// `all`, shared.
pub static ALL: LazyLock<Label> = LazyLock::new(|| Label::from("all"));

fn all() -> (Label, Label) {
    (ALL.clone(), ALL.clone())
}

/// Where one event's product updates go: for each of its keys, the tally they are added to.
/// A fresh tally per key makes the event's difference (the `explode` of [`command_queue`] and
/// the others); a window's sums take the updates in place (the fused route operator,
/// [`crate::route::route_aggregates`]), without a tally per event.
pub trait Tallies {
    /// The tally to add the event's updates under `key` to.
    fn of(&mut self, key: ProductKey) -> &mut Tally;
}

/// One fresh tally per key, in the order the keys come.
impl Tallies for Vec<(ProductKey, Tally)> {
    fn of(&mut self, key: ProductKey) -> &mut Tally {
        self.push((key, Tally::new()));
        let last = self.len() - 1;
        &mut self[last].1
    }
}

/// A window's sums: the tally already held for the key, or a new one.
impl<S: std::hash::BuildHasher> Tallies for std::collections::HashMap<ProductKey, Tally, S> {
    fn of(&mut self, key: ProductKey) -> &mut Tally {
        self.entry(key).or_default()
    }
}

/// The key of group `group`, breakdown `all`, in the window of `e`.
fn key_of(e: &Event, windows: Windows, group: Label) -> ProductKey {
    ProductKey {
        window_start_ms: windows.start_of(e.event_time_ms.max(0) as u64),
        group,
        breakdown: all(),
    }
}

/// An event's weight as the millionths it adds to a counter.
fn weight_of(e: &Event) -> i64 {
    crate::aggregates::scaled_by_weight(ONE, e.weight_micros)
}

/// Command-queue health per window and `action_type` (and `all`): recommendations generated,
/// viewed (`all` only: views carry no action type), accepted and dismissed; APS scores of
/// accepted and dismissed ones; time to decision; dismissals per reason.
pub fn command_queue<'s, E: Borrow<Event> + Clone + 'static>(
    events: VecCollection<'s, Time, E>,
    windows: Windows,
) -> VecCollection<'s, Time, ProductKey, Tally> {
    events.explode(move |e| command_queue_updates(e.borrow(), windows))
}

/// The `command_queue` updates of one event, one tally per key: `all` and its action type;
/// none for an event [`command_queue`] does not read.
pub fn command_queue_updates(e: &Event, windows: Windows) -> Vec<(ProductKey, Tally)> {
    let mut out = Vec::new();
    command_queue_into(e, windows, &mut out);
    out
}

/// Adds the `command_queue` updates of one event to `out`: under `all` and under its action
/// type.
pub fn command_queue_into(e: &Event, windows: Windows, out: &mut dyn Tallies) {
    let w = weight_of(e);
    let aps = e.kept.measure("aps_score");
    let reason;
    let apply: &dyn Fn(&mut Tally) = match e.event_name.as_str() {
        "recommendation_generated" => &|t: &mut Tally| t.add_count("generated", w),
        "recommendation_viewed" => &|t: &mut Tally| t.add_count("viewed", w),
        "recommendation_accepted" => &|t: &mut Tally| {
            t.add_count("accepted", w);
            if let Some(aps) = aps {
                t.add_sample("aps_accepted", aps, e.weight_micros);
            }
            if let Some(s) = e.kept.measure("time_to_decision_seconds") {
                t.add_sample("time_to_decision_s", s, e.weight_micros);
            }
        },
        "recommendation_dismissed" => {
            let why = e.kept.label("dismiss_reason").map_or("(none)", |l| &**l);
            reason = format!("reason:{why}");
            &|t: &mut Tally| {
                t.add_count("dismissed", w);
                t.add_count(&reason, w);
                if let Some(aps) = aps {
                    t.add_sample("aps_dismissed", aps, e.weight_micros);
                }
            }
        }
        _ => return,
    };
    apply(out.of(key_of(e, windows, ALL.clone())));
    if let Some(action_type) = e.kept.label("action_type") {
        apply(out.of(key_of(e, windows, action_type.clone())));
    }
}

/// Integration health per window and integration: calls, failures, rate-limit hits (status
/// 429), latency of successful calls, circuit-breaker opens, and the last open and the last
/// successful call (for the breaker's state at the window's end).
pub fn integration_health<'s, E: Borrow<Event> + Clone + 'static>(
    events: VecCollection<'s, Time, E>,
    windows: Windows,
) -> VecCollection<'s, Time, ProductKey, Tally> {
    events.explode(move |e| integration_update(e.borrow(), windows))
}

/// The `integration_health` update of one event; none for an event [`integration_health`]
/// does not read, or one without its integration (service).
pub fn integration_update(e: &Event, windows: Windows) -> Option<(ProductKey, Tally)> {
    let mut out = Vec::new();
    integration_into(e, windows, &mut out);
    out.pop()
}

/// Adds the `integration_health` update of one event to `out`, under its integration.
pub fn integration_into(e: &Event, windows: Windows, out: &mut dyn Tallies) {
    let at = e.event_time_ms.max(0) as u64;
    let w = weight_of(e);
    let rate_limited = || e.kept.measure("status_code") == Some(429.0);
    if name_is(e, "integration_call_success") {
        let Some(integration) = e.kept.label("integration") else {
            return;
        };
        let t = out.of(key_of(e, windows, integration.clone()));
        t.add_count("calls", w);
        t.add_at("success", at);
        if let Some(us) = e.latency_us {
            t.add_sample("latency_ms", us as f64 / 1000.0, e.weight_micros);
        }
        if rate_limited() {
            t.add_count("rate_limited", w);
        }
    } else if name_is(e, "integration_call_failed") {
        let Some(integration) = e.kept.label("integration") else {
            return;
        };
        let t = out.of(key_of(e, windows, integration.clone()));
        t.add_count("calls", w);
        t.add_count("failures", w);
        if rate_limited() {
            t.add_count("rate_limited", w);
        }
    } else if name_is(e, "circuit_breaker_opened") {
        let Some(service) = e.kept.label("service") else {
            return;
        };
        let t = out.of(key_of(e, windows, service.clone()));
        t.add_count("breaker_opens", w);
        t.add_at("opened", at);
    }
}

/// Feedback per window, `feature_area` and breakdown (`all`, each experiment's variant, and
/// `user_role`): count, counts per score, the score's distribution, counts per sentiment and
/// per tag, blocked count.
pub fn feedback<'s, E: Borrow<Event> + Clone + 'static>(
    events: VecCollection<'s, Time, E>,
    windows: Windows,
) -> VecCollection<'s, Time, ProductKey, Tally> {
    events.explode(move |e| feedback_updates(e.borrow(), windows))
}

/// The `feedback` updates of one event, one tally per key: `all`, each experiment's variant
/// and `user_role`; none for an event [`feedback`] does not read.
pub fn feedback_updates(e: &Event, windows: Windows) -> Vec<(ProductKey, Tally)> {
    let mut out = Vec::new();
    feedback_into(e, windows, &mut out);
    out
}

/// Adds the `feedback` updates of one event to `out`, under each of its breakdowns.
pub fn feedback_into(e: &Event, windows: Windows, out: &mut dyn Tallies) {
    if !name_is(e, "project_feedback_submitted") {
        return;
    }
    let w = weight_of(e);
    let score = e.kept.measure("score");
    // The counters named after values, named once for every breakdown.
    let mut named: Vec<String> = Vec::new();
    if let Some(score) = score {
        named.push(format!("score:{}", score.round() as i64));
    }
    if let Some(sentiment) = e.kept.label("sentiment") {
        named.push(format!("sentiment:{sentiment}"));
    }
    for tag in e.kept.labels("tags") {
        named.push(format!("tag:{tag}"));
    }
    let blocked = e.kept.measure("blocked") == Some(1.0);
    let apply = |t: &mut Tally| {
        t.add_count("feedback", w);
        for name in &named {
            t.add_count(name, w);
        }
        if let Some(score) = score {
            t.add_sample("score", score, e.weight_micros);
        }
        if blocked {
            t.add_count("blocked", w);
        }
    };
    let start = windows.start_of(e.event_time_ms.max(0) as u64);
    let mut breakdowns = vec![all()];
    for (experiment, variant) in e.experiment_assignments.iter() {
        breakdowns.push((
            Label::from(format!("experiment:{experiment}").as_str()),
            variant.clone(),
        ));
    }
    breakdowns.push((
        Label::from("user_role"),
        e.user_role
            .clone()
            .unwrap_or_else(|| Label::from(crate::funnel::NONE_VALUE)),
    ));
    for breakdown in breakdowns {
        apply(out.of(ProductKey {
            window_start_ms: start,
            group: e.feature_area.clone(),
            breakdown,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sightline_schemas::WEIGHT_ONE;

    #[test]
    fn a_sampled_event_counts_its_weight() {
        // Failures are never sampled; successes kept at ¼ weigh 4: the error rate read off
        // the weighted counters is the emitted one (1 in 5), not the kept one (1 in 2).
        let success = Tally::new()
            .count("calls")
            .sample("latency_ms", 12.0)
            .weighted(4 * WEIGHT_ONE);
        let failure = Tally::new().count("calls").count("failures");
        let mut t = success.clone();
        t.plus_equals(&failure);
        assert_eq!((t.get("calls"), t.get("failures")), (5, 1));
        let latency = t.dist("latency_ms").expect("a sample");
        assert_eq!((latency.count, latency.weighted_count()), (1, 4.0));
        // A weight of 1 changes nothing, and a weight of 1/0.3 rounds to whole events.
        assert_eq!(
            Tally::new().count("x").weighted(WEIGHT_ONE),
            Tally::new().count("x")
        );
        let third = Tally::new()
            .count("x")
            .weighted(sightline_schemas::weight_of_rate(0.3));
        assert_eq!(third.get("x"), 3);
        // Retraction still cancels exactly.
        let mut neg = success.clone();
        neg = neg.multiply(&-1);
        let mut zero = success;
        zero.plus_equals(&neg);
        assert!(zero.is_zero(), "{zero:?}");
    }
}
