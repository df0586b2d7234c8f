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

/// Finds `name` in a sorted list, or where it goes.
fn slot<V>(list: &[(Name, V)], name: &str) -> Result<usize, usize> {
    list.binary_search_by(|(n, _)| n.as_ref().cmp(name))
}

impl Tally {
    /// A tally of nothing.
    pub fn new() -> Tally {
        Tally::default()
    }

    /// Adds one event to counter `name` (weighed by [`Tally::weighted`]).
    pub fn count(self, name: impl Into<Name>) -> Tally {
        self.add(name.into(), ONE)
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

    fn add(mut self, name: Name, n: i64) -> Tally {
        match slot(&self.counts, &name) {
            Ok(i) => self.counts[i].1 += n,
            Err(i) => self.counts.insert(i, (name, n)),
        }
        self
    }

    /// Adds `value` (in its unit; kept in millionths) to distribution `name`; negative or
    /// non-finite values are left out.
    pub fn sample(mut self, name: &'static str, value: f64) -> Tally {
        if value.is_finite() && value >= 0.0 {
            let scaled = (value * 1_000_000.0).round() as u64;
            match slot(&self.dists, name) {
                Ok(i) => self.dists[i].1.record(scaled),
                Err(i) => self.dists.insert(
                    i,
                    (Name::Borrowed(name), LatencyHistogram::from_sample(scaled)),
                ),
            }
        }
        self
    }

    /// Records that `name` happened at `at_ms`.
    pub fn at(mut self, name: &'static str, at_ms: u64) -> Tally {
        match slot(&self.last, name) {
            Ok(i) => self.last[i].1 = self.last[i].1.max(at_ms),
            Err(i) => self.last.insert(i, (Name::Borrowed(name), at_ms)),
        }
        self
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

/// Command-queue health per window and `action_type` (and `all`): recommendations generated,
/// viewed (`all` only: views carry no action type), accepted and dismissed; APS scores of
/// accepted and dismissed ones; time to decision; dismissals per reason.
pub fn command_queue<'s, E: Borrow<Event> + Clone + 'static>(
    events: VecCollection<'s, Time, E>,
    windows: Windows,
) -> VecCollection<'s, Time, ProductKey, Tally> {
    events.explode(move |e| command_queue_updates(e.borrow(), windows))
}

/// The `command_queue` updates of one event: `all` and its action type; none for an event
/// [`command_queue`] does not read.
pub fn command_queue_updates(e: &Event, windows: Windows) -> SmallVec<[(ProductKey, Tally); 2]> {
    let aps = || e.kept.measure("aps_score");
    let tally = match e.event_name.as_str() {
        "recommendation_generated" => Tally::new().count("generated"),
        "recommendation_viewed" => Tally::new().count("viewed"),
        "recommendation_accepted" => {
            let mut t = Tally::new().count("accepted");
            if let Some(aps) = aps() {
                t = t.sample("aps_accepted", aps);
            }
            if let Some(s) = e.kept.measure("time_to_decision_seconds") {
                t = t.sample("time_to_decision_s", s);
            }
            t
        }
        "recommendation_dismissed" => {
            let reason = e
                .kept
                .label("dismiss_reason")
                .map_or("(none)", |l| &**l)
                .to_owned();
            let mut t = Tally::new()
                .count("dismissed")
                .count(format!("reason:{reason}"));
            if let Some(aps) = aps() {
                t = t.sample("aps_dismissed", aps);
            }
            t
        }
        _ => return SmallVec::new(),
    };
    let tally = tally.weighted(e.weight_micros);
    let start = windows.start_of(e.event_time_ms as u64);
    // `all` and the action type: two rows, inline.
    let mut out: SmallVec<[(ProductKey, Tally); 2]> = SmallVec::new();
    out.push((
        ProductKey {
            window_start_ms: start,
            group: ALL.clone(),
            breakdown: all(),
        },
        tally.clone(),
    ));
    if let Some(action_type) = e.kept.label("action_type") {
        out.push((
            ProductKey {
                window_start_ms: start,
                group: action_type.clone(),
                breakdown: all(),
            },
            tally,
        ));
    }
    out
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
    let at = e.event_time_ms.max(0) as u64;
    let (integration, tally) = if name_is(e, "integration_call_success") {
        let mut t = Tally::new().count("calls").at("success", at);
        if let Some(us) = e.latency_us {
            t = t.sample("latency_ms", us as f64 / 1000.0);
        }
        if e.kept.measure("status_code") == Some(429.0) {
            t = t.count("rate_limited");
        }
        (e.kept.label("integration"), t)
    } else if name_is(e, "integration_call_failed") {
        let mut t = Tally::new().count("calls").count("failures");
        if e.kept.measure("status_code") == Some(429.0) {
            t = t.count("rate_limited");
        }
        (e.kept.label("integration"), t)
    } else if name_is(e, "circuit_breaker_opened") {
        (
            e.kept.label("service"),
            Tally::new().count("breaker_opens").at("opened", at),
        )
    } else {
        return None;
    };
    Some((
        ProductKey {
            window_start_ms: windows.start_of(at),
            group: integration?.clone(),
            breakdown: all(),
        },
        tally.weighted(e.weight_micros),
    ))
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

/// The `feedback` updates of one event: `all`, each experiment's variant and `user_role`;
/// none for an event [`feedback`] does not read.
pub fn feedback_updates(e: &Event, windows: Windows) -> Vec<(ProductKey, Tally)> {
    if !name_is(e, "project_feedback_submitted") {
        return Vec::new();
    }
    let mut t = Tally::new().count("feedback");
    if let Some(score) = e.kept.measure("score") {
        t = t.count(format!("score:{}", score.round() as i64));
        t = t.sample("score", score);
    }
    if let Some(sentiment) = e.kept.label("sentiment") {
        t = t.count(format!("sentiment:{sentiment}"));
    }
    for tag in e.kept.labels("tags") {
        t = t.count(format!("tag:{tag}"));
    }
    if e.kept.measure("blocked") == Some(1.0) {
        t = t.count("blocked");
    }
    let t = t.weighted(e.weight_micros);
    let start = windows.start_of(e.event_time_ms as u64);
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
    breakdowns
        .into_iter()
        .map(|breakdown| {
            (
                ProductKey {
                    window_start_ms: start,
                    group: e.feature_area.clone(),
                    breakdown,
                },
                t.clone(),
            )
        })
        .collect()
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
