#![allow(clippy::unwrap_used)]

//! Why the aggregates' latency histogram is not `hdrhistogram` (ARCHITECTURE.md, "Two
//! histograms"): in differential dataflow every event is a *difference*, added to and
//! subtracted from accumulations, and a retraction may arrive before the addition it cancels.
//! The difference type must therefore be small per event and exact under subtraction, below
//! zero too. This test measures both for `LatencyHistogram` and for `hdrhistogram::Histogram`
//! (which the pipeline uses for its own timings, where neither matters), and prints the figures
//! that ARCHITECTURE.md quotes.

use differential_dataflow::difference::{Abelian, IsZero, Semigroup};
use sightline_operators::histogram::LatencyHistogram;

/// Latencies of a realistic spread, µs (1 ms to 100 s).
fn samples() -> Vec<u64> {
    (0..10_000u64)
        .map(|i| 1_000 + (i * 7_919 % 10_000) * (i % 97 + 1) * 100)
        .collect()
}

#[test]
fn a_per_event_difference_is_small_and_subtracts_exactly() {
    // Size of one event's difference.
    let ours = std::mem::size_of::<LatencyHistogram>();
    let one = LatencyHistogram::from_sample(12_345);
    assert!(
        !one.buckets.spilled(),
        "one sample stays inline: no allocation"
    );
    let hdr = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
    let hdr_bytes =
        std::mem::size_of_val(&hdr) + hdr.distinct_values() * std::mem::size_of::<u64>();
    println!(
        "one event's difference: LatencyHistogram {ours} bytes, no allocation; \
         hdrhistogram (1 µs..1 h, 3 digits) {hdr_bytes} bytes ({} counters)",
        hdr.distinct_values()
    );
    assert!(
        hdr_bytes > 100 * ours,
        "hdrhistogram's per-event cost is its whole counts array"
    );

    // Retraction first, then the addition: ours passes through −1 and back to zero, exactly.
    let xs = samples();
    let mut acc = LatencyHistogram::default();
    for &x in &xs {
        let mut retraction = LatencyHistogram::from_sample(x);
        retraction.negate();
        acc.plus_equals(&retraction);
    }
    assert_eq!(acc.count, -(xs.len() as i64));
    for &x in &xs {
        acc.plus_equals(&LatencyHistogram::from_sample(x));
    }
    assert!(
        acc.is_zero(),
        "a retraction before its addition cancels exactly"
    );

    // hdrhistogram counts are unsigned: the same order of updates is refused.
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
    let mut one_event = h.clone();
    one_event.record(xs[0]).unwrap();
    let refused = h.subtract(&one_event).is_err();
    println!("hdrhistogram: subtracting an event before adding it is refused: {refused}");
    assert!(refused);
    // And added then subtracted it is exact too, but only in that order.
    h.add(&one_event).unwrap();
    h.subtract(&one_event).unwrap();
    assert_eq!(h.len(), 0);
}
