//! [`route_aggregates`]: every per-event aggregate of one route (`event_counts`, `latency`,
//! `latency_by_variant`, `quality`, `command_queue`, `feedback`, `integration_health`) in one
//! pass over its events.
//!
//! Each aggregate alone is an `explode` into `(key, time, diff)` records and the first phase of
//! [`crate::close_windows`], which adds them up per window and key on each worker. Seven of
//! them visit each event seven times (a cache miss and a reference-count round trip each) and
//! copy each update twice (into the exploded batch, then into the sums). Here one operator
//! reads each event once and adds its updates straight into the window's sums; only the
//! second phase (the exchange by key and the final sums) stays per aggregate. The results are
//! the same as the aggregates' one by one: each update comes from the same per-event function
//! ([`crate::aggregates::count_update`], …, [`crate::product::feedback_updates`]), and the
//! reference tests run both.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::hash::Hash;

use differential_dataflow::VecCollection;
use differential_dataflow::difference::{IsZero, Multiply, Semigroup};
use sightline_schemas::{DeadLetter, Event, EventName};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::Concat;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::{Map, Partition};

use crate::aggregates::{
    CountKey, Counted, LatencyKey, QualityCounts, QualityKey, VariantKey, count_update,
    latency_update, quality_rejected, quality_update, variant_updates,
};
use crate::close::{Accumulation, ClosedWindow, add_to, close_partials, combine, non_zero};
use crate::histogram::{HistogramSum, LatencyHistogram};
use crate::product::{
    COMMAND_QUEUE_EVENTS, FEEDBACK_EVENTS, INTEGRATION_EVENTS, ProductKey, Tallies, Tally,
    command_queue_into, feedback_into, integration_into,
};
use crate::window::{Time, Windows};

pub use crate::close::Closed;

/// Every per-event aggregate of one route, closed: each window once, when the frontier has
/// passed it, one part per worker that owns some of its keys.
pub struct RouteAggregates<'s> {
    /// `event_counts`.
    pub event_counts: Closed<'s, CountKey, Counted>,
    /// `latency`.
    pub latency: Closed<'s, LatencyKey, LatencyHistogram>,
    /// `latency_by_variant`.
    pub latency_by_variant: Closed<'s, VariantKey, LatencyHistogram>,
    /// `quality`: the accepted events and the route's dead letters.
    pub quality: Closed<'s, QualityKey, QualityCounts>,
    /// `command_queue`.
    pub command_queue: Closed<'s, ProductKey, Tally>,
    /// `feedback`.
    pub feedback: Closed<'s, ProductKey, Tally>,
    /// `integration_health`'s tallies.
    pub integrations: Closed<'s, ProductKey, Tally>,
}

/// Which product aggregate reads an event name (at most one does).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Product {
    None,
    CommandQueue,
    Integrations,
    Feedback,
}

/// The product aggregate of each event name, indexed by its number.
struct Readers(Vec<Product>);

impl Readers {
    fn new() -> Readers {
        let mut table = vec![Product::None; EventName::all().count()];
        for (names, product) in [
            (&COMMAND_QUEUE_EVENTS[..], Product::CommandQueue),
            (&INTEGRATION_EVENTS[..], Product::Integrations),
            (&FEEDBACK_EVENTS[..], Product::Feedback),
        ] {
            for name in names.iter().filter_map(|n| EventName::from_name(n)) {
                if let Some(slot) = table.get_mut(usize::from(u16::from(name))) {
                    *slot = product;
                }
            }
        }
        Readers(table)
    }

    fn of(&self, name: EventName) -> Product {
        self.0
            .get(usize::from(u16::from(name)))
            .copied()
            .unwrap_or(Product::None)
    }
}

/// One window's sums of one aggregate on one worker, as [`crate::close_windows`] keeps them.
type Sums<K, R> = Accumulation<K, R>;

/// `diff` copies of `r` (`r` itself for one copy, as for every accepted event).
fn copies<R: Multiply<isize, Output = R>>(r: R, diff: isize) -> R {
    if diff == 1 { r } else { r.multiply(&diff) }
}

/// Adds `diff` copies of `r` to `key`'s sum.
fn add<K: Hash + Eq, R: Semigroup + Multiply<isize, Output = R>>(
    sums: &mut Sums<K, R>,
    key: K,
    r: R,
    diff: isize,
) {
    add_to(sums, key, copies(r, diff));
}

/// Adds `diff` copies of the histogram `h` to `key`'s sum.
fn add_histogram<K: Hash + Eq>(
    sums: &mut Sums<K, HistogramSum>,
    key: K,
    h: LatencyHistogram,
    diff: isize,
) {
    sums.entry(key).or_default().add(&copies(h, diff));
}

/// The sums of one window, every aggregate.
#[derive(Default)]
struct WindowSums {
    counts: Sums<CountKey, Counted>,
    latency: Sums<LatencyKey, HistogramSum>,
    variants: Sums<VariantKey, HistogramSum>,
    quality: Sums<QualityKey, QualityCounts>,
    command_queue: Sums<ProductKey, Tally>,
    feedback: Sums<ProductKey, Tally>,
    integrations: Sums<ProductKey, Tally>,
}

impl WindowSums {
    /// Adds `diff` copies of `e`'s updates of every aggregate.
    fn add(&mut self, e: &Event, diff: isize, windows: Windows, readers: &Readers) {
        let (key, count) = count_update(e, windows);
        add(&mut self.counts, key, count, diff);
        if let Some((key, h)) = latency_update(e, windows) {
            add_histogram(&mut self.latency, key, h, diff);
        }
        if !e.experiment_assignments.is_empty() {
            for (key, h) in variant_updates(e, windows) {
                add_histogram(&mut self.variants, key, h, diff);
            }
        }
        let (key, q) = quality_update(e, windows);
        add(&mut self.quality, key, q, diff);
        match readers.of(e.event_name) {
            Product::None => {}
            Product::CommandQueue => add_product(
                &mut self.command_queue,
                e,
                diff,
                windows,
                command_queue_into,
            ),
            Product::Integrations => {
                add_product(&mut self.integrations, e, diff, windows, integration_into)
            }
            Product::Feedback => add_product(&mut self.feedback, e, diff, windows, feedback_into),
        }
    }

    /// The window's partial results, one per aggregate with a non-zero sum.
    fn into_partials(self, start: u64, end: u64) -> impl Iterator<Item = Partial> {
        fn part<K, R: IsZero>(
            sums: Sums<K, R>,
            start: u64,
            end: u64,
        ) -> Option<ClosedWindow<K, R>> {
            closed(non_zero(sums), start, end)
        }
        fn histograms<K>(
            sums: Sums<K, HistogramSum>,
            start: u64,
            end: u64,
        ) -> Option<ClosedWindow<K, LatencyHistogram>> {
            let sums = sums.into_iter().map(|(k, sum)| (k, sum.into_histogram()));
            closed(sums.filter(|(_, h)| !h.is_zero()).collect(), start, end)
        }
        fn closed<K, R>(entries: Vec<(K, R)>, start: u64, end: u64) -> Option<ClosedWindow<K, R>> {
            (!entries.is_empty()).then_some(ClosedWindow {
                window_start_ms: start,
                window_end_ms: end,
                entries,
            })
        }
        [
            part(self.counts, start, end).map(Partial::Counts),
            histograms(self.latency, start, end).map(Partial::Latency),
            histograms(self.variants, start, end).map(Partial::Variants),
            part(self.quality, start, end).map(Partial::Quality),
            part(self.command_queue, start, end).map(Partial::CommandQueue),
            part(self.feedback, start, end).map(Partial::Feedback),
            part(self.integrations, start, end).map(Partial::Integrations),
        ]
        .into_iter()
        .flatten()
    }
}

/// Adds `diff` copies of `e`'s updates of one product aggregate (`into`, such as
/// [`command_queue_into`]) to `sums`: in place for one copy (every accepted event), without a
/// tally per event; through one tally per key, multiplied, otherwise.
fn add_product(
    sums: &mut Sums<ProductKey, Tally>,
    e: &Event,
    diff: isize,
    windows: Windows,
    into: fn(&Event, Windows, &mut dyn Tallies),
) {
    if diff == 1 {
        into(e, windows, sums);
        return;
    }
    let mut updates = Vec::new();
    into(e, windows, &mut updates);
    for (key, t) in updates {
        add(sums, key, t, diff);
    }
}

/// One worker's partial sums of one window of one aggregate.
#[derive(Clone)]
enum Partial {
    Counts(ClosedWindow<CountKey, Counted>),
    Latency(ClosedWindow<LatencyKey, LatencyHistogram>),
    Variants(ClosedWindow<VariantKey, LatencyHistogram>),
    Quality(ClosedWindow<QualityKey, QualityCounts>),
    CommandQueue(ClosedWindow<ProductKey, Tally>),
    Feedback(ClosedWindow<ProductKey, Tally>),
    Integrations(ClosedWindow<ProductKey, Tally>),
}

impl Partial {
    /// Its aggregate's place in [`WindowSums::into_partials`]'s order.
    fn index(&self) -> u64 {
        match self {
            Partial::Counts(_) => 0,
            Partial::Latency(_) => 1,
            Partial::Variants(_) => 2,
            Partial::Quality(_) => 3,
            Partial::CommandQueue(_) => 4,
            Partial::Feedback(_) => 5,
            Partial::Integrations(_) => 6,
        }
    }
}

/// Every per-event aggregate of the accepted `events` of one route and its `dead` letters,
/// closed. `name` tells the operators of one route from another's. Each window's results are
/// those of [`crate::event_counts`], [`crate::latency`], [`crate::latency_by_variant`],
/// [`crate::quality`], [`crate::product::command_queue`], [`crate::product::feedback`] and
/// [`crate::product::integration_health`], each through [`crate::close_windows`].
pub fn route_aggregates<'s, E>(
    events: VecCollection<'s, Time, E>,
    dead: VecCollection<'s, Time, DeadLetter>,
    windows: Windows,
    name: &str,
) -> RouteAggregates<'s>
where
    E: Borrow<Event> + Clone + 'static,
{
    let readers = Readers::new();
    let partials = events.inner.unary_frontier(
        Pipeline,
        &format!("RouteAggregates({name})"),
        move |_capability, _info| {
            // Window start → the capability to emit it (at its end − 1) and its sums.
            let mut open: BTreeMap<u64, (Capability<Time>, WindowSums)> = BTreeMap::new();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    // Every message here is sent under a capability; one without would carry
                    // no time.
                    let Some(&least) = cap.least() else {
                        debug_assert!(false, "events without a capability");
                        return;
                    };
                    for (event, _time, diff) in data.drain(..) {
                        let e: &Event = event.borrow();
                        let start = windows.start_of(e.event_time_ms as u64);
                        let (_, sums) = open.entry(start).or_insert_with(|| {
                            let emit_at = windows.end_of(start).saturating_sub(1).max(least);
                            (cap.delayed(&emit_at, 0), WindowSums::default())
                        });
                        sums.add(e, diff, windows, &readers);
                    }
                });
                while let Some(entry) = open.first_entry() {
                    let start = *entry.key();
                    let end = windows.end_of(start);
                    if frontier.less_than(&end) {
                        break;
                    }
                    let (cap, sums) = entry.remove();
                    let mut session = output.session(&cap);
                    for partial in sums.into_partials(start, end) {
                        session.give(partial);
                    }
                }
            }
        },
    );
    let mut parts = partials.partition(7, |p| (p.index(), p)).into_iter();
    let mut next = || parts.next().expect("seven parts");
    // One aggregate's partials, out of their part.
    macro_rules! pick {
        ($part:expr, $variant:path) => {
            $part.flat_map(|p| match p {
                $variant(w) => Some(w),
                _ => None,
            })
        };
    }
    let label = |what: &str| format!("{what}({name})");
    let counts = pick!(next(), Partial::Counts);
    let latency = pick!(next(), Partial::Latency);
    let variants = pick!(next(), Partial::Variants);
    let quality = pick!(next(), Partial::Quality);
    let command_queue = pick!(next(), Partial::CommandQueue);
    let feedback = pick!(next(), Partial::Feedback);
    let integrations = pick!(next(), Partial::Integrations);
    // The dead letters' quality counts, combined apart and merged with the events'.
    let rejected = combine(
        quality_rejected(dead, windows),
        windows,
        &label("CombineRejected"),
    );
    RouteAggregates {
        event_counts: close_partials(counts, windows, &label("CloseEventCounts")),
        latency: close_partials(latency, windows, &label("CloseLatency")),
        latency_by_variant: close_partials(variants, windows, &label("CloseLatencyByVariant")),
        quality: close_partials(quality.concat(rejected), windows, &label("CloseQuality")),
        command_queue: close_partials(command_queue, windows, &label("CloseCommandQueue")),
        feedback: close_partials(feedback, windows, &label("CloseFeedback")),
        integrations: close_partials(integrations, windows, &label("CloseIntegrationHealth")),
    }
}
