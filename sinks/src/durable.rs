//! The one durable sink operator. Every output of the pipeline (each lake table, the dead-letter
//! topic, and whatever comes next: remote write, decision topics) is a [`Deliver`]
//! implementation that says *what* to send; [`durable_sink`] owns *how*: the exchange, the
//! order, the retries, the held capability and the durability frontier.
//!
//! # Delivery contract: stall, never drop
//!
//! - Items are grouped into batches ([`Deliver::batch_of`]). Items with the same
//!   [`Deliver::route`] hash are exchanged to one worker, so one worker delivers each batch of
//!   a routed sink; a sink that routes `None` delivers each worker's items where they are.
//! - A batch of a [`Completeness::Whole`] sink is delivered once, when the operator's input
//!   frontier has passed its time (every worker's share has arrived): one file per window.
//!   Items for a whole batch that is already sealed can only come with a later time, which
//!   breaks the invariant that a closed window receives nothing more; they are logged as an
//!   error and delivered as a second delivery of that batch (for a lake table, a file that
//!   replaces the first), as the sink before this one did. A batch of a
//!   [`Completeness::Eager`] sink is delivered as soon as it is there, in as many deliveries as
//!   it takes (records on a topic).
//! - Batches are delivered in key order, one at a time; a batch is sealed
//!   ([`Deliver::seal`], which sorts and combines) once, and the same sealed batch is sent
//!   again after a failure, so a retry repeats exactly the same delivery (idempotent for a
//!   lake file, identified by key for a topic).
//! - Until a batch's delivery has succeeded, the operator holds the capability of its
//!   earliest item. Its output frontier, which the pipeline probes to decide which source
//!   offsets to commit, therefore never passes an item that is not durable.
//! - **Every failure is retried**, with the exponential backoff of the [`RetryPolicy`], and
//!   counted in the [`SinkHealth`]. A retryable failure (an unreachable store or broker, a
//!   full disk) is logged as a warning and retried for as long as it lasts: the pipeline never
//!   stops on a transient fault. A permanent one (bad credentials, a deleted bucket, an
//!   encoding bug) is logged as an error, because it needs an operator, and is retried all
//!   the same; once permanent failures have lasted [`RetryPolicy::give_up_after`] without a
//!   success in between, the sink reports itself failed in its [`SinkHealth`], and the
//!   pipeline stops with that error. Nothing is ever dropped: the sink, and the frontier
//!   behind it, stall until the failure is fixed, and a restart resumes from the offsets
//!   committed before it.
//! - A successful delivery emits its [`Deliver::Receipt`] at the batch's capability.
//!
//! `tests/delivery.rs` proves the contract by injecting failures.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sightline_operators::Time;
use timely::ExchangeData;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::probe::{Handle as ProbeHandle, Probe};
use tracing::{error, warn};

use crate::Error;
use crate::timing::Timing;

/// When a batch may be delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completeness {
    /// Only once the input frontier has passed the batch's time: the batch is complete and is
    /// delivered once, whole (a window's file).
    Whole,
    /// As soon as items are there; a batch may be delivered in several parts (records on a
    /// topic).
    Eager,
}

/// What a durable sink delivers, and how. See the module's delivery contract.
pub trait Deliver: 'static {
    /// What the sink receives.
    type Item: ExchangeData;
    /// Which delivery an item belongs to; batches are delivered in this order.
    type Batch: Ord + Clone + Debug + 'static;
    /// A batch made ready to send: sorted, combined, encoded as far as it can be without
    /// failing. Sent again unchanged after a failure.
    type Sealed: 'static;
    /// What a successful delivery reports downstream.
    type Receipt: Clone + 'static;

    /// When a batch may be delivered.
    const COMPLETENESS: Completeness;

    /// The operator's name, for timely's logs and ours.
    fn name(&self) -> String;

    /// Which worker delivers `item`: `Some(hash)` sends it to the worker that owns `hash`, so
    /// that every item of a batch meets on one worker; `None` delivers it where it is.
    fn route(item: &Self::Item) -> Option<u64>;

    /// The batch `item` belongs to.
    fn batch_of(item: &Self::Item) -> Self::Batch;

    /// Seals the items of `batch` for delivery.
    fn seal(&mut self, batch: &Self::Batch, items: Vec<Self::Item>) -> Self::Sealed;

    /// Delivers a sealed batch and returns its receipt once it is durable. Called again with
    /// the same batch after a failure.
    fn deliver(
        &mut self,
        batch: &Self::Batch,
        sealed: &Self::Sealed,
    ) -> Result<Self::Receipt, Error>;

    /// For a sink of saved state: the operator whose snapshot `sealed` is, its records and
    /// its bytes (a gauge of the pipeline's metrics once delivered). `None` for other sinks.
    fn size(&self, _batch: &Self::Batch, _sealed: &Self::Sealed) -> Option<(String, u64, u64)> {
        None
    }
}

/// How failed deliveries are retried: exponential backoff from `initial`, doubling up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Longest delay between two attempts.
    pub max: Duration,
    /// How long permanent failures may last, with no success in between, before the sink
    /// reports itself failed.
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    /// 100 ms, doubling to 30 s; failed after 5 minutes of permanent failures.
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            give_up_after: Duration::from_secs(300),
        }
    }
}

/// What the sinks of one process report about their deliveries: shared by every durable sink
/// of the pipeline, read by the run loop (and its summary).
#[derive(Debug, Default)]
pub struct SinkHealth {
    failed: Mutex<Option<String>>,
    /// Per sink (its operator name), what it delivered: read by the pipeline's `/metrics`.
    per_sink: Mutex<BTreeMap<String, SinkStats>>,
    /// Per long-horizon operator, the records and bytes of its last saved snapshot.
    state_sizes: Mutex<BTreeMap<String, (u64, u64)>>,
}

/// What one sink delivered.
#[derive(Clone, Debug, Default)]
pub struct SinkStats {
    /// Batches delivered (windows written, records produced).
    pub writes: u64,
    /// Failed delivery attempts (each retried).
    pub failures: u64,
    /// Of those, the failures classified as permanent.
    pub permanent_failures: u64,
    /// How long each successful delivery took.
    pub latency: Timing,
}

impl SinkHealth {
    /// Why a sink gave up, if one did: the pipeline must stop.
    pub fn failed(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }

    /// Failed delivery attempts of every sink, each retried.
    pub fn retries(&self) -> u64 {
        self.per_sink().values().map(|s| s.failures).sum()
    }

    /// Of those, the failures classified as permanent.
    pub fn permanent_failures(&self) -> u64 {
        self.per_sink().values().map(|s| s.permanent_failures).sum()
    }

    /// Per sink, what it delivered so far.
    pub fn per_sink(&self) -> BTreeMap<String, SinkStats> {
        self.per_sink.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Per long-horizon operator, the records and bytes of its last saved snapshot.
    pub fn state_sizes(&self) -> BTreeMap<String, (u64, u64)> {
        self.state_sizes
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    fn note(&self, sink: &str, outcome: Result<Duration, bool>) {
        let Ok(mut all) = self.per_sink.lock() else {
            return;
        };
        let stats = all.entry(sink.to_owned()).or_default();
        match outcome {
            Ok(took) => {
                stats.writes += 1;
                stats.latency.record(took);
            }
            Err(permanent) => {
                stats.failures += 1;
                stats.permanent_failures += u64::from(permanent);
            }
        }
    }

    fn give_up(&self, why: String) {
        if let Ok(mut failed) = self.failed.lock()
            && failed.is_none()
        {
            *failed = Some(why);
        }
    }
}

/// The retry state of one sink. Time is passed in, so that it is tested with a deterministic
/// clock.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    /// When the next attempt may be made, and the delay that led to it.
    next: Option<(Instant, Duration)>,
}

impl Backoff {
    /// No failure yet.
    pub fn new(policy: RetryPolicy) -> Backoff {
        Backoff { policy, next: None }
    }

    /// How long to wait at `now` before the next attempt; `None` when an attempt may be made.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        match self.next {
            Some((at, _)) if now < at => Some(at - now),
            _ => None,
        }
    }

    /// Records a failed attempt at `now` and returns the delay before the next one: the
    /// policy's initial delay after a success, then twice the previous delay, at most `max`.
    pub fn failed(&mut self, now: Instant) -> Duration {
        let delay = match self.next {
            None => self.policy.initial,
            Some((_, previous)) => (previous * 2).min(self.policy.max),
        };
        self.next = Some((now + delay, delay));
        delay
    }

    /// Records a successful attempt: the next failure starts from the initial delay again.
    pub fn succeeded(&mut self) {
        self.next = None;
    }
}

/// A batch waiting for delivery, under the capability of its earliest item.
struct Pending<T> {
    capability: Capability<Time>,
    contents: T,
}

/// Attaches `sink` to `items`: see the module's delivery contract. The output carries one
/// receipt per delivered batch; its frontier, also reported to `durable`, is the sink's
/// durability frontier. Failures are counted in `health`.
pub fn durable_sink<'s, D: Deliver>(
    items: StreamVec<'s, Time, D::Item>,
    mut sink: D,
    policy: RetryPolicy,
    health: &Arc<SinkHealth>,
    durable: &ProbeHandle<Time>,
) -> StreamVec<'s, Time, D::Receipt> {
    let health = Arc::clone(health);
    let scope = items.scope();
    // Items that stay put are "exchanged" to the worker they are on.
    let me = scope.index() as u64;
    let exchange = Exchange::new(move |item: &D::Item| D::route(item).unwrap_or(me));
    let name = sink.name();
    let label = name.clone();
    let receipts = items.unary_frontier(exchange, &name, move |_capability, info| {
        let activator = scope.activator_for(info.address.clone());
        let mut open: BTreeMap<D::Batch, Pending<Vec<D::Item>>> = BTreeMap::new();
        let mut sealed: BTreeMap<D::Batch, Pending<D::Sealed>> = BTreeMap::new();
        let mut backoff = Backoff::new(policy);
        // When the current run of permanent failures began.
        let mut failing_since: Option<Instant> = None;
        move |(input, frontier), output| {
            input.for_each(|cap, data| {
                // Every message here is sent under a capability; one without has no time.
                let Some(&least) = cap.least() else {
                    debug_assert!(false, "items without a capability");
                    return;
                };
                for item in data.drain(..) {
                    let batch = open.entry(D::batch_of(&item)).or_insert_with(|| Pending {
                        capability: cap.delayed(&least, 0),
                        contents: Vec::new(),
                    });
                    if least < *batch.capability.time() {
                        batch.capability = cap.delayed(&least, 0);
                    }
                    batch.contents.push(item);
                }
            });
            // Seal what may be delivered. A batch already in flight keeps its place; items
            // that arrive for it meanwhile form the next delivery of that batch (for a whole
            // batch, only if the closed-window invariant was broken upstream: see the module).
            let ready: Vec<D::Batch> = open
                .iter()
                .filter(|(batch, pending)| {
                    !sealed.contains_key(*batch)
                        && match D::COMPLETENESS {
                            Completeness::Whole => !frontier.less_equal(pending.capability.time()),
                            Completeness::Eager => true,
                        }
                })
                .map(|(batch, _)| batch.clone())
                .collect();
            if D::COMPLETENESS == Completeness::Whole
                && let Some((batch, _)) = open.iter().find(|(batch, _)| sealed.contains_key(*batch))
            {
                debug_assert!(false, "items for a whole batch already sealed: {batch:?}");
                error!(sink = %label, batch = ?batch, "items arrived for a batch already sealed; they will be delivered apart");
            }
            for batch in ready {
                if let Some(Pending { capability, contents }) = open.remove(&batch) {
                    let contents = sink.seal(&batch, contents);
                    sealed.insert(batch, Pending { capability, contents });
                }
            }
            if sealed.is_empty() {
                return;
            }
            let now = Instant::now();
            if let Some(wait) = backoff.wait(now) {
                activator.activate_after(wait);
                return;
            }
            while let Some(entry) = sealed.first_entry() {
                let began = Instant::now();
                match sink.deliver(entry.key(), &entry.get().contents) {
                    Ok(receipt) => {
                        health.note(&label, Ok(began.elapsed()));
                        if let Some((operator, records, bytes)) =
                            sink.size(entry.key(), &entry.get().contents)
                            && let Ok(mut sizes) = health.state_sizes.lock()
                        {
                            sizes.insert(operator, (records, bytes));
                        }
                        backoff.succeeded();
                        failing_since = None;
                        let (_, Pending { capability, .. }) = entry.remove_entry();
                        output.session(&capability).give(receipt);
                    }
                    Err(err) => {
                        let delay = backoff.failed(Instant::now());
                        let retry_in_ms = delay.as_millis() as u64;
                        let batch = format!("{:?}", entry.key());
                        health.note(&label, Err(!err.is_retryable()));
                        if err.is_retryable() {
                            warn!(sink = %label, %batch, error = %err, cause = ?std::error::Error::source(&err), retry_in_ms, "delivery failed; retrying");
                        } else {
                            error!(sink = %label, %batch, error = %err, cause = ?std::error::Error::source(&err), retry_in_ms, "delivery failed with a permanent error; retrying anyway, so that nothing is dropped");
                            let since = *failing_since.get_or_insert(now);
                            if now.duration_since(since) >= policy.give_up_after {
                                let cause = std::error::Error::source(&err)
                                    .map(|c| format!(": {c}"))
                                    .unwrap_or_default();
                                health.give_up(format!(
                                    "sink {label} failed permanently for {} s (batch {batch}): {err}{cause}",
                                    policy.give_up_after.as_secs()
                                ));
                            }
                        }
                        activator.activate_after(delay);
                        return;
                    }
                }
            }
            // Items of a batch that was in flight may now be delivered.
            if !open.is_empty() {
                activator.activate();
            }
        }
    });
    receipts.probe_with(durable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_limit_and_resets_on_success() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
            ..RetryPolicy::default()
        };
        let mut backoff = Backoff::new(policy);
        let t0 = Instant::now();
        assert_eq!(backoff.wait(t0), None, "no failure: go");
        assert_eq!(backoff.failed(t0), Duration::from_millis(100));
        assert_eq!(backoff.wait(t0), Some(Duration::from_millis(100)));
        assert_eq!(
            backoff.wait(t0 + Duration::from_millis(60)),
            Some(Duration::from_millis(40))
        );
        assert_eq!(backoff.wait(t0 + Duration::from_millis(100)), None);
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(backoff.failed(t1), Duration::from_millis(200));
        assert_eq!(
            backoff.failed(t1),
            Duration::from_millis(350),
            "capped at max"
        );
        assert_eq!(backoff.failed(t1), Duration::from_millis(350));
        backoff.succeeded();
        assert_eq!(backoff.wait(t1), None);
        assert_eq!(
            backoff.failed(t1),
            Duration::from_millis(100),
            "starts over"
        );
    }
}
