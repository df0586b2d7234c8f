//! Saving a long-horizon operator's state as of a frontier.
//!
//! A long-horizon operator keeps, per unit, what it saw long ago. A restart must not read that
//! input again from Kafka (a 30-day funnel would need 30 days of it), so the operator's
//! *sufficient statistics* are saved as of a frontier `S` and restored at the next start.
//! Worker 0 takes every snapshot: a snapshot needs one `S` for every record, and workers that
//! each chose their own `S` would not agree (a restore needs a snapshot at or after the
//! durable frontier that covers every record). See ARCHITECTURE.md, "Long-horizon state",
//! for why the restore is exact.
//!
//! [`Schedule`] is the bookkeeping every such operator shares: when a snapshot is due, and the
//! capability it is emitted under, held at the previous snapshot's frontier so that the sink
//! that saves it (and with it the durable frontier that gates offset commits) cannot pass that
//! frontier before the new snapshot is saved: a committed offset never points past state that
//! is not saved. The funnels save their per-unit progress with it
//! ([`crate::funnel::funnels`]), triage its users' items ([`crate::triage::triage`]); both hold
//! their inputs in [`Pending`] until the frontier has passed them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::progress::frontier::MutableAntichain;
use timely::scheduling::Activator;

use crate::window::Time;

/// One worker's share of a snapshot of one operator's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateShard<D> {
    /// The operator (`funnel:<name>`).
    pub operator: String,
    /// A fingerprint of the operator's definition: a restart with another definition does not
    /// restore this state.
    pub definition: u64,
    /// Every live record with a time before this is in the snapshot; none after.
    pub frontier: Time,
    /// The newest snapshot known to be saved on every worker when this one was taken: older
    /// ones may be deleted.
    pub complete: Option<Time>,
    /// The worker that took it.
    pub worker: usize,
    /// How many workers took one.
    pub workers: usize,
    /// Each live record with its time.
    pub records: Vec<(D, Time)>,
}

/// When an operator that saves its state takes a snapshot, and under which capability: the
/// bookkeeping the funnels and triage share.
///
/// A snapshot at `S` is emitted under a capability held at the previous snapshot's frontier
/// (so the sink that saves it, and the durable frontier after it, cannot pass that frontier
/// before the new snapshot is saved); afterwards the capability is held at `S`. Snapshots are
/// taken every `every_ms` of event time, or at every move while the pipeline stops. Each
/// snapshot names the newest one known saved when it was taken (`complete`), so that older
/// ones can be deleted.
pub struct Schedule {
    capability: Option<Capability<Time>>,
    last: Time,
    /// (time a snapshot was emitted at, its frontier), oldest first, until known saved.
    emitted: VecDeque<(Time, Time)>,
    complete: Option<Time>,
}

impl Schedule {
    /// From `capability` (none: this worker takes no snapshots), after state restored at
    /// `restored_at` (0: none).
    pub fn new(capability: Option<Capability<Time>>, restored_at: Time) -> Schedule {
        let capability = capability.map(|mut cap| {
            if *cap.time() < restored_at {
                cap.downgrade(&restored_at);
            }
            cap
        });
        Schedule {
            capability,
            last: restored_at,
            emitted: VecDeque::new(),
            complete: None,
        }
    }

    /// For an operator on worker 0 with two outputs (its results, its snapshots), from the
    /// capabilities it is built with: the results' capability (to emit restored state with,
    /// worker 0 only) and the snapshots' schedule (worker 0 only, and only when `saving`).
    pub fn on_worker_zero(
        capabilities: Vec<Capability<Time>>,
        worker: usize,
        saving: bool,
        restored_at: Time,
    ) -> (Option<Capability<Time>>, Schedule) {
        let mut capabilities = capabilities.into_iter();
        let (results, snapshots) = (capabilities.next(), capabilities.next());
        let first = worker == 0;
        (
            results.filter(|_| first),
            Schedule::new(snapshots.filter(|_| first && saving), restored_at),
        )
    }

    /// Whether a snapshot at `s` is due; notes which snapshots are known saved. With the input
    /// finished (`frontier` is `Time::MAX`, a bounded replay) there is nothing more to save.
    /// While snapshots are taken the operator is woken again soon (`activator`): the outputs
    /// move without telling it, and its input stands still while the pipeline stops.
    pub fn due(
        &mut self,
        s: Time,
        frontier: Time,
        hooks: &StateHooks,
        activator: &Activator,
    ) -> bool {
        if frontier == Time::MAX {
            self.capability = None;
        }
        if self.capability.is_none() {
            return false;
        }
        let flushing = hooks.flush.load(Ordering::Relaxed);
        activator.activate_after(Duration::from_millis(if flushing { 20 } else { 200 }));
        let saved = hooks
            .durable
            .with_frontier(|f| f.first().copied().unwrap_or(Time::MAX));
        while let Some(&(at, frontier)) = self.emitted.front() {
            if saved <= at {
                break;
            }
            self.complete = Some(frontier);
            self.emitted.pop_front();
        }
        let every = if flushing { 1 } else { hooks.every_ms.max(1) };
        s >= self.last.saturating_add(every)
    }

    /// Emits the snapshot at `s` of `operator` with `records` through `emit`, under the held
    /// capability, which then moves to `s`.
    pub fn take<D>(
        &mut self,
        s: Time,
        operator: &str,
        definition: u64,
        records: Vec<(D, Time)>,
        emit: impl FnOnce(&Capability<Time>, StateShard<D>),
    ) {
        let Some(cap) = self.capability.as_mut() else {
            return;
        };
        emit(
            cap,
            StateShard {
                operator: operator.to_owned(),
                definition,
                frontier: s,
                complete: self.complete,
                worker: 0,
                workers: 1,
                records,
            },
        );
        self.emitted.push_back((*cap.time(), s));
        cap.downgrade(&s);
        self.last = s;
    }
}

/// Inputs that wait until the frontier has passed their time (long-horizon operators apply
/// their inputs in event-time order, and only then is the order known).
pub struct Pending<T> {
    by_time: BTreeMap<Time, Vec<T>>,
    /// Emptied buffers of times already taken, with their capacity: a new time's items go
    /// into one of them instead of a buffer that grows by doubling (copying its items each
    /// time, into memory no cache holds).
    spare: Vec<Vec<T>>,
}

/// Emptied buffers a [`Pending`] keeps for reuse (times wait only for the allowed lateness,
/// so a few are in use at once).
const SPARE_BUFFERS: usize = 8;

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending {
            by_time: BTreeMap::new(),
            spare: Vec::new(),
        }
    }
}

impl<T: Clone> Pending<T> {
    /// Adds `item` at `time`, `diff` times (inputs are insertions: a multiplicity repeats the
    /// item; a retraction has no meaning here and is not added).
    pub fn add(&mut self, time: Time, item: T, diff: isize) {
        if diff <= 0 {
            return;
        }
        let spare = &mut self.spare;
        let at = self
            .by_time
            .entry(time)
            .or_insert_with(|| spare.pop().unwrap_or_default());
        for _ in 1..diff {
            at.push(item.clone());
        }
        at.push(item);
    }

    /// Every item with a time before `frontier`, removed, sorted by `order` (the sequence
    /// order: event time, then a hash of the event id), equal keys in the order they came.
    ///
    /// The keys are sorted, not the items: an item (a funnel touch, a triage item) is several
    /// times the size of its key, and a sort moves each element about log n times. The
    /// items are then put in place once (`sort_by_cached_key`).
    ///
    /// An item's time is the tick of its event time, which orders items of different times
    /// as `order` does: so each time's items are sorted alone (most times hold one or a few),
    /// not the whole batch. Whether the result is in order is checked, and a batch whose times
    /// do not follow `order` is sorted whole.
    pub fn take_before<K: Ord>(&mut self, frontier: Time, order: impl Fn(&T) -> K) -> Vec<T> {
        let later = self.by_time.split_off(&frontier);
        let by_time = std::mem::replace(&mut self.by_time, later);
        let mut ready: Vec<T> = Vec::with_capacity(by_time.values().map(Vec::len).sum());
        for (_, mut items) in by_time {
            if items.len() > 1 {
                items.sort_by_cached_key(&order);
            }
            ready.append(&mut items);
            if self.spare.len() < SPARE_BUFFERS {
                self.spare.push(items);
            }
        }
        if !ready.is_sorted_by_key(&order) {
            ready.sort_by_cached_key(order);
        }
        ready
    }
}

/// The frontier of an operator's only input (`Time::MAX` once it is finished).
pub fn input_frontier(frontiers: &[MutableAntichain<Time>]) -> Time {
    frontiers
        .first()
        .and_then(|f| f.frontier().first().copied())
        .unwrap_or(Time::MAX)
}

/// Saving a long-horizon operator's state.
#[derive(Clone, Debug)]
pub struct StateHooks {
    /// Event time between two snapshots, ms.
    pub every_ms: u64,
    /// Durable frontier of the outputs other than saved state.
    pub outputs: ProbeHandle<Time>,
    /// Durable frontier of everything.
    pub durable: ProbeHandle<Time>,
    /// Set when the pipeline stops: save at once.
    pub flush: Arc<AtomicBool>,
}

impl StateHooks {
    /// The frontier up to which the other outputs are written.
    pub fn written(&self) -> Time {
        self.outputs
            .with_frontier(|f| f.first().copied().unwrap_or(Time::MAX))
    }
}

/// Maps whose keys are not strings, saved as lists of `(key, value)` pairs (a JSON object's
/// keys are strings): `#[serde(with = "crate::state::pairs")]`.
pub mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Saves `map` as a list of pairs.
    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    /// Reads a list of pairs back into a map.
    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }

    /// The same one level down: a map of such maps.
    pub mod nested {
        use std::collections::BTreeMap;

        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        /// Saves each inner map as a list of pairs.
        pub fn serialize<O, K, V, S>(
            map: &BTreeMap<O, BTreeMap<K, V>>,
            s: S,
        ) -> Result<S::Ok, S::Error>
        where
            O: Serialize,
            K: Serialize,
            V: Serialize,
            S: Serializer,
        {
            s.collect_map(
                map.iter()
                    .map(|(o, inner)| (o, inner.iter().collect::<Vec<_>>())),
            )
        }

        /// Reads them back.
        pub fn deserialize<'de, O, K, V, D>(d: D) -> Result<BTreeMap<O, BTreeMap<K, V>>, D::Error>
        where
            O: Deserialize<'de> + Ord,
            K: Deserialize<'de> + Ord,
            V: Deserialize<'de>,
            D: Deserializer<'de>,
        {
            Ok(BTreeMap::<O, Vec<(K, V)>>::deserialize(d)?
                .into_iter()
                .map(|(o, inner)| (o, inner.into_iter().collect()))
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// What `take_before` hands out is every item before the frontier in a stable sort
        /// by `order`, whether the items' times follow their order (as event-time ticks do)
        /// or not; the rest stays.
        #[test]
        fn takes_the_items_before_the_frontier_in_order(
            items in proptest::collection::vec((0u64..20, 0u64..50, 0u8..4), 0..200),
            ticks in proptest::bool::ANY,
            frontier in 0u64..25,
        ) {
            // (time, key, tag): with `ticks`, the time is the key's tick (key / 3).
            let items: Vec<(u64, u64, u8)> = items
                .into_iter()
                .map(|(time, key, tag)| (if ticks { key / 3 } else { time }, key, tag))
                .collect();
            let mut pending = Pending::default();
            for &(time, key, tag) in &items {
                pending.add(time, (key, tag), 1);
            }
            let got = pending.take_before(frontier, |&(key, _)| key);
            // The naive model: the items before the frontier, in time order then as added,
            // stably sorted by key.
            let mut want: Vec<(u64, (u64, u8))> = items
                .iter()
                .filter(|(time, ..)| *time < frontier)
                .map(|&(time, key, tag)| (time, (key, tag)))
                .collect();
            want.sort_by_key(|&(time, _)| time);
            let mut want: Vec<(u64, u8)> = want.into_iter().map(|(_, item)| item).collect();
            want.sort_by_key(|&(key, _)| key);
            prop_assert_eq!(got, want);
            let rest = pending.take_before(Time::MAX, |&(key, _)| key);
            prop_assert_eq!(rest.len(), items.iter().filter(|(time, ..)| *time >= frontier).count());
        }
    }
}
