//! Closing windows: turning a windowed collection into one final result per window.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use differential_dataflow::difference::{IsZero, Semigroup};
use differential_dataflow::{Hashable, VecCollection};
use serde::{Deserialize, Serialize};
use timely::ExchangeData;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::{Exchange, ParallelizationContract, Pipeline};
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;

use crate::window::{Time, WindowKey, Windows};

/// Closed windows of one aggregate: each window once, when the frontier has passed it, one
/// part per worker that owns some of its keys.
pub type Closed<'s, K, R> = StreamVec<'s, Time, ClosedWindow<K, R>>;

/// The final contents of one window on one worker: every key with a non-zero accumulation,
/// sorted by key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedWindow<K, R> {
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// Window end (exclusive), ms since the epoch.
    pub window_end_ms: u64,
    /// `(key, accumulated difference)`, sorted by key, zero accumulations left out.
    pub entries: Vec<(K, R)>,
}

/// Emits each window of `updates` once, when it is closed.
///
/// Input: a collection whose keys name their window ([`WindowKey`]) and whose differences are
/// the aggregate, each update at a time inside its key's window. Aggregation has two phases:
/// each worker first combines its own updates per window and key, without moving them; when
/// its input frontier passes a window's end, it sends its partial sums, exchanged by key, to
/// the key's owner, which adds them up and emits one [`ClosedWindow`] with its share of the
/// keys, at time `window_end − 1`, once every worker's partials are in. Per-event traffic
/// between workers is therefore nil (only keys × workers per window cross), and state is
/// bounded by the open windows, not by history. Exact because differences form a semigroup.
///
/// An update that arrives for a window that is already closed cannot happen while the time
/// invariant holds (the frontier has passed every time in it); such an update would start a
/// new accumulation and be emitted as a second part of that window.
pub fn close_windows<'s, K, R>(
    updates: VecCollection<'s, Time, K, R>,
    windows: Windows,
    name: &str,
) -> StreamVec<'s, Time, ClosedWindow<K, R>>
where
    K: WindowKey + ExchangeData + Hash + Eq + Ord + Clone,
    R: Semigroup + ExchangeData,
{
    close_at(updates, windows, window_end(windows), name)
}

/// The horizon of a key in [`close_windows`]: the end of its window.
fn window_end<K: WindowKey>(windows: Windows) -> impl Fn(&K) -> u64 + Clone + 'static {
    move |key: &K| windows.end_of(key.window_start_ms())
}

/// [`close_windows`] with a later horizon: each key's window is emitted once the frontier has
/// passed `horizon(key)` (at least the window's end), at time `horizon − 1`. A funnel's entry
/// window, for example, is final only one conversion window after its end. Every update of a
/// key must come at a time before its horizon.
pub fn close_at<'s, K, R>(
    updates: VecCollection<'s, Time, K, R>,
    windows: Windows,
    horizon: impl Fn(&K) -> u64 + Clone + 'static,
    name: &str,
) -> StreamVec<'s, Time, ClosedWindow<K, R>>
where
    K: WindowKey + ExchangeData + Hash + Eq + Ord + Clone,
    R: Semigroup + ExchangeData,
{
    let partials = accumulate(
        updates.inner,
        Pipeline,
        windows,
        horizon.clone(),
        &format!("{name}Combine"),
    );
    merge_partials(partials, windows, horizon, name)
}

/// The first phase of [`close_windows`] alone: each worker's own updates combined per window
/// and key, one partial [`ClosedWindow`] per window, when the frontier has passed its end.
pub(crate) fn combine<'s, K, R>(
    updates: VecCollection<'s, Time, K, R>,
    windows: Windows,
    name: &str,
) -> StreamVec<'s, Time, ClosedWindow<K, R>>
where
    K: WindowKey + ExchangeData + Hash + Eq + Ord + Clone,
    R: Semigroup + ExchangeData,
{
    accumulate(updates.inner, Pipeline, windows, window_end(windows), name)
}

/// The second phase of [`close_windows`]: [`merge_partials`] at each window's end.
pub(crate) fn close_partials<'s, K, R>(
    partials: StreamVec<'s, Time, ClosedWindow<K, R>>,
    windows: Windows,
    name: &str,
) -> StreamVec<'s, Time, ClosedWindow<K, R>>
where
    K: WindowKey + ExchangeData + Hash + Eq + Ord + Clone,
    R: Semigroup + ExchangeData,
{
    merge_partials(partials, windows, window_end(windows), name)
}

/// The second phase of [`close_at`]: the workers' partial windows (each emitted at its
/// horizon − 1), exchanged by key and added up, each window once when every partial is in.
fn merge_partials<'s, K, R>(
    partials: StreamVec<'s, Time, ClosedWindow<K, R>>,
    windows: Windows,
    horizon: impl Fn(&K) -> u64 + Clone + 'static,
    name: &str,
) -> StreamVec<'s, Time, ClosedWindow<K, R>>
where
    K: WindowKey + ExchangeData + Hash + Eq + Ord + Clone,
    R: Semigroup + ExchangeData,
{
    use timely::dataflow::operators::vec::Map;

    let at = horizon.clone();
    let partials = partials.flat_map(move |w| {
        let at = at.clone();
        w.entries.into_iter().map(move |(key, diff)| {
            let time = at(&key).saturating_sub(1);
            (key, time, diff)
        })
    });
    let exchange = Exchange::new(|(key, _time, _diff): &(K, Time, R)| key.hashed());
    accumulate(partials, exchange, windows, horizon, name)
}

/// One window's accumulation per key. foldhash rather than std's SipHash: the keys are short
/// labels, hashed once per update, and foldhash is seeded per process like SipHash.
pub(crate) type Accumulation<K, R> = HashMap<K, R, foldhash::fast::RandomState>;

/// Adds `diff` to `key`'s accumulation.
pub(crate) fn add_to<K: Hash + Eq, R: Semigroup>(acc: &mut Accumulation<K, R>, key: K, diff: R) {
    match acc.entry(key) {
        std::collections::hash_map::Entry::Occupied(mut o) => o.get_mut().plus_equals(&diff),
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(diff);
        }
    }
}

/// The keys of an accumulation whose sum is not zero, in no order.
pub(crate) fn non_zero<K, R: IsZero>(acc: Accumulation<K, R>) -> Vec<(K, R)> {
    acc.into_iter().filter(|(_, r)| !r.is_zero()).collect()
}

/// An open window: the capability to emit it, and its accumulation.
type Open<K, R> = (Capability<Time>, Accumulation<K, R>);

/// Accumulates `(key, time, diff)` per horizon, window and key, and emits each window once the
/// input frontier has passed its horizon.
fn accumulate<'s, K, R, P>(
    updates: StreamVec<'s, Time, (K, Time, R)>,
    pact: P,
    windows: Windows,
    horizon: impl Fn(&K) -> u64 + 'static,
    name: &str,
) -> StreamVec<'s, Time, ClosedWindow<K, R>>
where
    K: WindowKey + ExchangeData + Hash + Eq + Ord + Clone,
    R: Semigroup + ExchangeData,
    P: ParallelizationContract<Time, Vec<(K, Time, R)>>,
{
    updates.unary_frontier(pact, name, move |_capability, _info| {
        // Keyed by (horizon, window start): windows are emitted in horizon order.
        let mut open: BTreeMap<(u64, u64), Open<K, R>> = BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each(|cap, data| {
                // Every message here is sent under a capability; one without would carry no time.
                let Some(&least) = cap.least() else {
                    debug_assert!(false, "updates without a capability");
                    return;
                };
                for (key, _time, diff) in data.drain(..) {
                    let start = key.window_start_ms();
                    let closes = horizon(&key);
                    let (_, acc) = open.entry((closes, start)).or_insert_with(|| {
                        let emit_at = closes.saturating_sub(1).max(least);
                        (cap.delayed(&emit_at, 0), Accumulation::default())
                    });
                    add_to(acc, key, diff);
                }
            });
            while let Some((&(closes, start), _)) = open.first_key_value() {
                if frontier.less_than(&closes) {
                    break;
                }
                let end = windows.end_of(start);
                if let Some((_, (cap, acc))) = open.pop_first() {
                    let mut entries = non_zero(acc);
                    if entries.is_empty() {
                        continue;
                    }
                    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                    output.session(&cap).give(ClosedWindow {
                        window_start_ms: start,
                        window_end_ms: end,
                        entries,
                    });
                }
            }
        }
    })
}
