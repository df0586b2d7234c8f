//! Saving a long-horizon operator's state: its live inputs as of a frontier.
//!
//! A long-horizon operator (a funnel) keeps, per unit, inputs that arrived long ago. A restart
//! must not read them again from Kafka (a 30-day funnel would need 30 days of input), so the
//! operator's *sufficient statistics* (for a funnel: its live touches, each with its time) are
//! saved as of a frontier `S` and restored at the next start. Worker 0 takes the snapshots
//! (the records are exchanged to it): a snapshot needs one `S` for every record, and workers
//! that each chose their own `S` would not agree (a restore needs a snapshot at or after the
//! durable frontier that covers every record). See ARCHITECTURE.md, "Long-horizon
//! state", for why the restore is exact.
//!
//! [`snapshots`] watches the operator's input. Every `every_ms` of event time it takes a
//! snapshot at `S` = the smaller of its input frontier and the frontier up to which the other
//! outputs are durable (`outputs`): every record before `S` that has not expired by `S`. A
//! snapshot is emitted under a capability held at the previous snapshot's frontier, so the sink
//! that saves it (and with it the durable frontier that gates offset commits) cannot pass that
//! frontier before the new snapshot is saved: a committed offset never points past state that
//! is not saved.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::probe::Handle as ProbeHandle;

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

/// Settings of [`snapshots`].
#[derive(Clone, Debug)]
pub struct SnapshotSettings {
    /// The operator's name in the saved state.
    pub operator: String,
    /// Fingerprint of its definition.
    pub definition: u64,
    /// Event time between two snapshots, ms.
    pub every_ms: u64,
    /// The frontier of the restored state (0 when none): the first snapshot is not before it.
    pub restored_at: Time,
    /// Set when the pipeline stops: a snapshot is taken as soon as the outputs have moved,
    /// whatever `every_ms` says, so that the last commit covers every written window.
    pub flush: Arc<AtomicBool>,
}

/// Takes snapshots of the live records of `inserts` (insertions only, each live until
/// `expiry(record, time)`); see the module documentation. `outputs` is the frontier up to which
/// the other outputs are durable, `durable` the one of everything including the saved state.
pub fn snapshots<'s, D>(
    inserts: StreamVec<'s, Time, (D, Time, isize)>,
    expiry: impl Fn(&D, Time) -> Time + 'static,
    settings: SnapshotSettings,
    outputs: ProbeHandle<Time>,
    durable: ProbeHandle<Time>,
) -> StreamVec<'s, Time, StateShard<D>>
where
    D: timely::ExchangeData + Clone,
{
    let scope = inserts.scope();
    let worker = scope.index();
    let name = format!("Snapshot({})", settings.operator);
    // Worker 0 takes every snapshot: a snapshot is one frontier `S` for all records, and
    // workers that decided `S` each on their own would not agree on it.
    let to_first = Exchange::new(|_: &(D, Time, isize)| 0u64);
    inserts.unary_frontier(to_first, &name, move |capability, info| {
        let activator = scope.activator_for(info.address.clone());
        let mut capability = (worker == 0).then_some(capability);
        // (record, time, expiry) of every live record, in arrival order.
        let mut live: Vec<(D, Time, Time)> = Vec::new();
        let mut last = settings.restored_at;
        // (time the snapshot was emitted at, its frontier), oldest first.
        let mut emitted: VecDeque<(Time, Time)> = VecDeque::new();
        let mut complete: Option<Time> = None;
        move |(input, frontier), output| {
            input.for_each(|_cap, data| {
                for (record, time, diff) in data.drain(..) {
                    let ends = expiry(&record, time);
                    for _ in 0..diff.max(0) {
                        live.push((record.clone(), time, ends));
                    }
                }
            });
            let Some(cap) = capability.as_mut() else {
                return;
            };
            if *cap.time() < last {
                cap.downgrade(&last);
            }
            let at_input = frontier.frontier().first().copied();
            let Some(at_input) = at_input else {
                // The input is finished (a bounded replay): nothing more to save.
                capability = None;
                return;
            };
            let saved = durable.with_frontier(|f| f.first().copied().unwrap_or(Time::MAX));
            while let Some(&(at, frontier)) = emitted.front() {
                if saved <= at {
                    break;
                }
                complete = Some(frontier);
                emitted.pop_front();
            }
            let at_outputs = outputs.with_frontier(|f| f.first().copied().unwrap_or(Time::MAX));
            let s = at_input.min(at_outputs);
            let flushing = settings.flush.load(Ordering::Relaxed);
            // The outputs move without telling this operator, and the input stands still while
            // the pipeline stops: look again soon.
            activator.activate_after(Duration::from_millis(if flushing { 20 } else { 200 }));
            let every = if flushing {
                1
            } else {
                settings.every_ms.max(1)
            };
            if s < last.saturating_add(every) {
                return;
            }
            live.retain(|(_, _, ends)| *ends >= s);
            let records = live
                .iter()
                .filter(|(_, time, _)| *time < s)
                .map(|(record, time, _)| (record.clone(), *time))
                .collect();
            output.session(&*cap).give(StateShard {
                operator: settings.operator.clone(),
                definition: settings.definition,
                frontier: s,
                complete,
                worker: 0,
                workers: 1,
                records,
            });
            emitted.push_back((*cap.time(), s));
            cap.downgrade(&s);
            last = s;
        }
    })
}
