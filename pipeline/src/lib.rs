//! Sightline: product telemetry from Kafka to event-time windowed aggregates on
//! timely/differential dataflow, written as Parquet to object storage.
//!
//! The binary (`sightline`) is a thin CLI over this library:
//!
//! - [`config`]: the layered configuration tree;
//! - [`dataflow`]: what the dataflow computes, as a typed bundle of closed-window streams;
//! - [`emit`]: where it goes: every output attached to the bundle through the durable sink;
//! - [`run`]: workers, reporting and shutdown;
//! - [`cluster`]: `[cluster]`, connecting the processes of a multi-process run;
//! - [`generator`]: the built-in generator of realistic events;
//! - [`sampling`]: the `[sampling]` section (adaptive telemetry budgets);
//! - [`demo`]: the embedded default — mock Kafka cluster, live generator, local lake;
//! - [`pii_scan`]: the audit of stored output.
//!
//! ```no_run
//! use std::sync::{atomic::AtomicBool, Arc};
//! use sightline::{config::Config, run::{run, Input, Job}};
//!
//! let job = Job {
//!     config: Config::default(),
//!     input: Input::Ndjson("events.ndjson".into()),
//!     lake: sightline_sinks::Lake::open("./out").unwrap(),
//!     stop: Arc::new(AtomicBool::new(false)),
//!     print_windows: true,
//!     format: sightline_ingest::Format::Envelope,
//! };
//! let summary = run(job).unwrap();
//! println!("{summary}");
//! ```

/// The allocator of every Sightline binary (the CLI, the benchmarks, the tests): mimalloc.
/// The decoder and the operators make many small, short-lived allocations (kept values,
/// labels, tallies); glibc's allocator spent about a tenth of the pipeline's time on them
/// (`benches/README.md`, "Product analytics"). It is built without transparent huge pages
/// (the `no_thp` feature): with them, each page it purges and reuses faults back in as a 2 MiB
/// page the kernel zeroes, which cost about 5% of the throughput (measured there).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod analytics;
pub mod cluster;
pub mod config;
pub mod dataflow;
pub mod demo;
pub mod emit;
pub mod experiments;
pub mod generator;
pub mod http;
pub mod pii_scan;
pub mod progress;
pub mod report;
pub mod restore;
pub mod run;
pub mod sampling;
