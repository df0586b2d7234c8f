//! The durable sink's delivery contract, proved by injecting failures: "stall, never drop".
//!
//! - A lake whose store refuses every write (a wrapper around the in-memory store, composed
//!   the way `object_store`'s own `ThrottledStore` is) holds the durability frontier below the
//!   window for as long as it refuses, and writes every window, whole, once it recovers.
//! - A sink that fails with a *permanent* error is retried all the same: every batch is
//!   delivered exactly once, in order, after the failures.
//! - Items that arrive for a batch while it is in flight are delivered in the next delivery.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use sightline_sinks::durable::Completeness;
use sightline_sinks::tables::EventCountRow;
use sightline_sinks::{
    Deliver, Error, Lake, RetryPolicy, SinkHealth, WindowRows, durable_sink, write_windows,
};
use timely::dataflow::InputHandle;
use timely::dataflow::operators::Input;
use timely::dataflow::operators::probe::Handle as ProbeHandle;

/// A store that refuses every write while `down` is set, and counts refused writes.
#[derive(Debug)]
struct FailingStore {
    inner: InMemory,
    down: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
}

impl fmt::Display for FailingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FailingStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FailingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(object_store::Error::Generic {
                store: "FailingStore",
                source: "injected outage".into(),
            });
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

const WIDTH: u64 = 10_000;

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(1),
        max: Duration::from_millis(20),
        give_up_after: Duration::from_secs(60),
    }
}

/// Worker `w`'s part of window `k`: one row per worker, counting `k + 1`.
fn part(k: u64, w: usize) -> WindowRows<EventCountRow> {
    WindowRows {
        window_start_ms: k * WIDTH,
        window_end_ms: (k + 1) * WIDTH,
        part: None,
        rows: vec![EventCountRow {
            window_start_ms: k * WIDTH,
            window_end_ms: (k + 1) * WIDTH,
            event_name: format!("from_worker_{w}"),
            event_type: "view".into(),
            feature_area: "projects".into(),
            count: k as i64 + 1,
            weighted_count: k as f64 + 1.0,
        }],
    }
}

#[test]
fn a_store_outage_stalls_the_frontier_and_loses_nothing() {
    let down = Arc::new(AtomicBool::new(true));
    let refused = Arc::new(AtomicUsize::new(0));
    let inner = Arc::new(FailingStore {
        inner: InMemory::new(),
        down: Arc::clone(&down),
        refused: Arc::clone(&refused),
    });
    let lake = Lake::from_store(inner.clone(), "memory://failing").expect("lake");
    let (up_again, refused_at_recovery) = (Arc::clone(&down), Arc::clone(&refused));
    let recovery = std::thread::spawn(move || {
        // Recover only after every worker has seen many refused writes.
        let deadline = Instant::now() + Duration::from_secs(20);
        while refused_at_recovery.load(Ordering::SeqCst) < 20 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        up_again.store(false, Ordering::SeqCst);
    });
    let check = lake.clone();
    let stalled = timely::execute(timely::Config::process(2), move |worker| {
        let index = worker.index();
        let mut input = InputHandle::new();
        let durable = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            let parts = scope.input_from(&mut input);
            write_windows(
                parts,
                lake.clone(),
                fast_retries(),
                &Default::default(),
                &durable,
            );
        });
        for k in 0..3 {
            input.advance_to((k + 1) * WIDTH - 1);
            input.send(part(k, index));
        }
        input.close();
        let mut stalled_steps = 0;
        while !durable.done() {
            worker.step_or_park(Some(Duration::from_millis(1)));
            // `down` only ever goes from true to false: if it is still true after a step,
            // every write in that step was refused, and nothing may be durable.
            if down.load(Ordering::SeqCst) {
                assert!(
                    durable.less_than(&WIDTH),
                    "the frontier passed a window that is not written"
                );
                stalled_steps += 1;
            }
        }
        stalled_steps
    })
    .expect("workers")
    .join();
    recovery.join().expect("recovery thread");
    let stalled: Vec<usize> = stalled.into_iter().map(|r| r.expect("worker")).collect();
    assert!(
        stalled.iter().all(|s| *s > 0),
        "every worker stalled: {stalled:?}"
    );
    assert!(refused.load(Ordering::SeqCst) >= 20);
    // Every window, whole: both workers' rows, in one file each.
    let files = check.list("event_counts").expect("list");
    assert_eq!(files.len(), 3, "{files:?}");
    for (k, path) in files.iter().enumerate() {
        assert_eq!(
            check.read_rows(path).expect("rows"),
            2,
            "window {k}: {path}"
        );
    }
}

/// What a test sink delivered: each batch with its values, in delivery order.
type Delivered = Arc<Mutex<Vec<(u64, Vec<u32>)>>>;

/// A sink that fails the first `failures` attempts with a permanent error, then records what
/// it delivers.
struct Refusing {
    failures: usize,
    attempts: Arc<AtomicUsize>,
    delivered: Delivered,
}

impl Deliver for Refusing {
    type Item = (u64, u32);
    type Batch = u64;
    type Sealed = Vec<u32>;
    type Receipt = u64;

    const COMPLETENESS: Completeness = Completeness::Whole;

    fn name(&self) -> String {
        "Refusing".into()
    }

    fn route(item: &(u64, u32)) -> Option<u64> {
        Some(item.0)
    }

    fn batch_of(item: &(u64, u32)) -> u64 {
        item.0
    }

    fn seal(&mut self, _: &u64, items: Vec<(u64, u32)>) -> Vec<u32> {
        let mut values: Vec<u32> = items.into_iter().map(|(_, v)| v).collect();
        values.sort_unstable();
        values
    }

    fn deliver(&mut self, batch: &u64, values: &Vec<u32>) -> Result<u64, Error> {
        if self.attempts.fetch_add(1, Ordering::SeqCst) < self.failures {
            return Err(Error::Encode("injected permanent failure".into()));
        }
        self.delivered
            .lock()
            .expect("lock")
            .push((*batch, values.clone()));
        Ok(*batch)
    }
}

#[test]
fn a_permanent_failure_is_retried_and_every_batch_is_delivered_once_in_order() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let (a, d) = (Arc::clone(&attempts), Arc::clone(&delivered));
    timely::execute_directly(move |worker| {
        let mut input = InputHandle::new();
        let durable = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            let items = scope.input_from(&mut input);
            let sink = Refusing {
                failures: 5,
                attempts: a,
                delivered: d,
            };
            durable_sink(items, sink, fast_retries(), &Default::default(), &durable);
        });
        for batch in 0..4u64 {
            input.advance_to(batch);
            for value in (0..10u32).rev() {
                input.send((batch, value));
            }
        }
        input.close();
        while !durable.done() {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
    });
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        5 + 4,
        "five refusals, then one per batch"
    );
    let delivered = delivered.lock().expect("lock");
    let want: Vec<(u64, Vec<u32>)> = (0..4).map(|b| (b, (0..10).collect())).collect();
    assert_eq!(*delivered, want);
}

/// An eager sink that fails every other attempt and records every value it delivers.
struct Flaky {
    attempts: usize,
    delivered: Arc<Mutex<BTreeMap<u32, usize>>>,
}

impl Deliver for Flaky {
    type Item = u32;
    type Batch = ();
    type Sealed = Vec<u32>;
    type Receipt = usize;

    const COMPLETENESS: Completeness = Completeness::Eager;

    fn name(&self) -> String {
        "Flaky".into()
    }

    fn route(_: &u32) -> Option<u64> {
        None
    }

    fn batch_of(_: &u32) {}

    fn seal(&mut self, _: &(), items: Vec<u32>) -> Vec<u32> {
        items
    }

    fn deliver(&mut self, _: &(), values: &Vec<u32>) -> Result<usize, Error> {
        self.attempts += 1;
        if self.attempts % 2 == 1 {
            return Err(Error::Undelivered {
                failed: 1,
                total: values.len() as u64,
                last_error: "injected".into(),
            });
        }
        let mut delivered = self.delivered.lock().expect("lock");
        for v in values {
            *delivered.entry(*v).or_default() += 1;
        }
        Ok(values.len())
    }
}

#[test]
fn items_arriving_during_retries_are_delivered_once_later() {
    let delivered = Arc::new(Mutex::new(BTreeMap::new()));
    let d = Arc::clone(&delivered);
    timely::execute_directly(move |worker| {
        let mut input = InputHandle::new();
        let durable = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            let items = scope.input_from(&mut input);
            let sink = Flaky {
                attempts: 0,
                delivered: d,
            };
            durable_sink(items, sink, fast_retries(), &Default::default(), &durable);
        });
        for round in 0..50u32 {
            input.advance_to(u64::from(round));
            for i in 0..20 {
                input.send(round * 20 + i);
            }
            worker.step();
        }
        input.close();
        while !durable.done() {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
    });
    let delivered = delivered.lock().expect("lock");
    assert_eq!(delivered.len(), 1_000, "every value delivered");
    assert!(delivered.values().all(|n| *n == 1), "and none twice");
}

#[test]
fn permanent_failures_that_last_past_the_limit_fail_the_sink_and_transient_ones_never_do() {
    for (permanent, expect_failed) in [(true, true), (false, false)] {
        let health = Arc::new(SinkHealth::default());
        let h = Arc::clone(&health);
        let policy = RetryPolicy {
            give_up_after: Duration::from_millis(100),
            ..fast_retries()
        };
        timely::execute_directly(move |worker| {
            let mut input = InputHandle::new();
            let durable = ProbeHandle::new();
            worker.dataflow::<u64, _, _>(|scope| {
                let items = scope.input_from(&mut input);
                durable_sink(items, Failing { permanent }, policy, &h, &durable);
            });
            input.send(1u32);
            input.close();
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_millis(400) {
                worker.step_or_park(Some(Duration::from_millis(1)));
            }
            assert!(!durable.done(), "nothing failed is ever taken as delivered");
            for id in worker.installed_dataflows() {
                worker.drop_dataflow(id);
            }
        });
        assert!(health.retries() > 3);
        assert_eq!(
            health.failed().is_some(),
            expect_failed,
            "permanent: {permanent}, {:?}",
            health.failed()
        );
        if let Some(why) = health.failed() {
            assert!(
                why.contains("Failing") && why.contains("bucket gone"),
                "{why}"
            );
        }
    }
}

/// A sink whose every delivery fails, permanently or not.
struct Failing {
    permanent: bool,
}

impl Deliver for Failing {
    type Item = u32;
    type Batch = ();
    type Sealed = ();
    type Receipt = ();

    const COMPLETENESS: Completeness = Completeness::Eager;

    fn name(&self) -> String {
        "Failing".into()
    }

    fn route(_: &u32) -> Option<u64> {
        None
    }

    fn batch_of(_: &u32) {}

    fn seal(&mut self, _: &(), _: Vec<u32>) {}

    fn deliver(&mut self, _: &(), _: &()) -> Result<(), Error> {
        Err(if self.permanent {
            Error::Encode("bucket gone".into())
        } else {
            Error::Undelivered {
                failed: 1,
                total: 1,
                last_error: "broker unreachable".into(),
            }
        })
    }
}
