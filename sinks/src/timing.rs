//! The pipeline's own timing distributions (window close delay, sink writes, remote-write
//! requests), kept in an [`hdrhistogram`] and exported as Prometheus histograms.
//!
//! These are measurements *of* the pipeline, recorded a few times per window; they only grow,
//! so a high-dynamic-range histogram with fixed precision suits them. The aggregates' latency
//! quantiles use the subtractable [`sightline_operators::histogram::LatencyHistogram`] instead:
//! a differential difference must be small and must subtract exactly, below zero too (see
//! ARCHITECTURE.md, "Two histograms").

use std::time::Duration;

use hdrhistogram::Histogram;

/// The bucket bounds every timing is exported with, in seconds (Prometheus' `le`).
pub const BOUNDS_SECONDS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// One timing distribution: durations to the microsecond, 3 significant digits, and their
/// exact sum.
#[derive(Clone, Debug)]
pub struct Timing {
    histogram: Histogram<u64>,
    sum_us: u128,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            // 1 µs to 1 hour at 3 significant digits; longer durations are clamped to the top.
            histogram: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .unwrap_or_else(|_| unreachable!("constant bounds are valid")),
            sum_us: 0,
        }
    }
}

impl Timing {
    /// Records one duration.
    pub fn record(&mut self, duration: Duration) {
        let us = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(us.max(1));
        self.sum_us += u128::from(us);
    }

    /// Durations recorded.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// Their sum, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_us as f64 / 1e6
    }

    /// The value at quantile `q`, in seconds (0 when empty).
    pub fn quantile_seconds(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64 / 1e6
    }

    /// Per bucket of [`BOUNDS_SECONDS`] and a last one to infinity, the durations in it (not
    /// cumulative): what a Prometheus histogram encoder takes.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        let mut out = Vec::with_capacity(BOUNDS_SECONDS.len() + 1);
        let mut below = 0;
        for bound in BOUNDS_SECONDS {
            let upto = self.histogram.count_between(0, (bound * 1e6) as u64);
            out.push((bound, upto - below));
            below = upto;
        }
        out.push((f64::INFINITY, self.count() - below));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_count_each_duration_once_in_its_bucket() {
        let mut t = Timing::default();
        for ms in [0, 3, 3, 40, 900, 7_000, 4_000_000] {
            t.record(Duration::from_millis(ms));
        }
        let buckets = t.buckets();
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 7);
        let at = |le: f64| buckets.iter().find(|b| b.0 == le).map(|b| b.1);
        assert_eq!(at(0.001), Some(1)); // 0 ms, recorded as 1 µs
        assert_eq!(at(0.005), Some(2));
        assert_eq!(at(0.05), Some(1));
        assert_eq!(at(1.0), Some(1));
        assert_eq!(at(10.0), Some(1));
        assert_eq!(at(f64::INFINITY), Some(1)); // over an hour: clamped, still counted
        assert_eq!(t.count(), 7);
        assert!((t.sum_seconds() - 4_007.946).abs() < 1e-9);
        assert!((t.quantile_seconds(0.5) - 0.040).abs() < 0.001);
    }
}
