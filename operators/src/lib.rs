//! Sightline's differential-dataflow operators.
//!
//! One concern per module:
//!
//! - [`window`]: event-time tumbling windows and the [`Time`] of every dataflow;
//! - [`histogram`]: the subtractable log-bucketed [`LatencyHistogram`] (≤ 1% relative error);
//! - [`aggregates`]: the windowed aggregates (`event_counts`, `latency`, `latency_by_variant`,
//!   `quality`, `windowed_dead_letters`), each a function from collections to a collection
//!   whose difference is the aggregate, and [`QualityTotals`], the one reading of quality
//!   counts as accepted, rejected and late records against the platform spec's targets;
//! - [`close`]: [`close_windows`], which emits each window once, when the frontier has passed it
//!   (and [`close_at`], at a later horizon);
//! - [`experiment`]: experiment exposures and per-arm sufficient statistics (`sightline-stats`);
//! - [`funnel`]: conversion funnels, the first operator whose state spans windows;
//! - [`state`]: snapshots of a long-horizon operator's state, for restarts;
//! - [`product`]: command-queue, integration-health and feedback aggregates ([`product::Tally`]);
//! - [`route`]: every per-event aggregate of one route in one pass ([`route::route_aggregates`]);
//! - [`alerts`]: integration health across windows (breaker state) and the alert rules;
//! - [`sampling`]: adaptive telemetry budgets (per-segment sampling rates under a global
//!   budget, from segment counts, risk terms and damping);
//! - [`select`]: one pass that gives each consumer only the events it reads;
//! - [`triage`]: P1 records of critical feedback, joined with the user's recent errors.
//!
//! ```
//! use differential_dataflow::input::Input;
//! use sightline_operators::{close_windows, event_counts, Windows};
//! use timely::dataflow::operators::Inspect;
//!
//! timely::execute_directly(|worker| {
//!     let mut input = worker.dataflow::<u64, _, _>(|scope| {
//!         let (input, events) = scope.new_collection();
//!         let windows = Windows::new(60_000);
//!         close_windows(event_counts(events, windows), windows, "counts")
//!             .inspect(|w| println!("window {} has {} keys", w.window_start_ms, w.entries.len()));
//!         input
//!     });
//!     # let _: &mut differential_dataflow::input::InputSession<u64, sightline_schemas::Event, isize> = &mut input;
//!     input.close();
//! });
//! ```

pub mod aggregates;
pub mod alerts;
pub mod close;
pub mod experiment;
pub mod funnel;
pub mod histogram;
pub mod product;
pub mod route;
pub mod sampling;
pub mod select;
pub mod state;
pub mod triage;
pub mod window;

pub use aggregates::{
    CountKey, Counted, LatencyKey, Outcome, PII_VIOLATION_TARGET, QualityCounts, QualityKey,
    QualityTotals, REJECTION_TARGET, VariantKey, WindowedDeadLetter, event_counts, latency,
    latency_by_variant, quality, windowed_dead_letters,
};
pub use close::{ClosedWindow, close_at, close_windows};
pub use histogram::LatencyHistogram;
pub use window::{Time, WindowKey, Windows};
