//! Per-partition event-time watermarks.
//!
//! A source worker's watermark is the minimum over its partitions of (largest event time
//! seen − allowed lateness). It only moves forward. A partition that has delivered no
//! accepted event for `idle_timeout`, and whose reader has caught up with its end, follows
//! the wall clock instead, so an idle partition never stalls the frontier; a worker with no
//! partitions at all follows the wall clock too. Rejected records do not keep a partition
//! active: a partition that sends only garbage goes idle like a silent one. A partition that
//! is silent because its reader is behind (a slow first fetch, a catch-up after a restart) is
//! not idle, so its backlog is not declared late. Bounded inputs (file replay) have no idle
//! timeout: their watermark is purely data-driven, and they end by dropping their capability.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
struct Partition {
    max_seen_ms: Option<u64>,
    last_activity: Instant,
}

/// Tracks the watermark of one source worker.
#[derive(Clone, Debug)]
pub struct Watermarks {
    lateness_ms: u64,
    idle_timeout: Option<Duration>,
    partitions: Vec<Partition>,
    current_ms: u64,
}

impl Watermarks {
    /// A tracker for `partitions` partitions, all starting active at `now`.
    pub fn new(partitions: usize, lateness_ms: u64, idle_timeout: Option<Duration>, now: Instant) -> Watermarks {
        Watermarks { lateness_ms, idle_timeout, partitions: vec![Partition { max_seen_ms: None, last_activity: now }; partitions], current_ms: 0 }
    }

    /// The current watermark, ms since the epoch. Events with an earlier time are late.
    pub fn current_ms(&self) -> u64 {
        self.current_ms
    }

    /// Records an on-time event of `partition` and advances the watermark as far as the data
    /// allows. Late events must not be observed.
    pub fn observe(&mut self, partition: usize, event_ms: u64, now: Instant) {
        let Some(p) = self.partitions.get_mut(partition) else { return };
        p.last_activity = now;
        if p.max_seen_ms.is_none_or(|m| event_ms > m) {
            p.max_seen_ms = Some(event_ms);
            self.recompute(None, 0);
        }
    }

    /// Re-evaluates idleness against the wall clock and returns the watermark. `caught_up` is
    /// asked, only for partitions silent for longer than the idle timeout, whether the reader
    /// has read everything the partition holds.
    pub fn advance(&mut self, now: Instant, wall_ms: u64, caught_up: &mut dyn FnMut(usize) -> bool) -> u64 {
        let idle: Vec<bool> = match self.idle_timeout {
            Some(timeout) => self.partitions.iter().enumerate().map(|(i, p)| now.duration_since(p.last_activity) >= timeout && caught_up(i)).collect(),
            None => vec![false; self.partitions.len()],
        };
        self.recompute(Some(&idle), wall_ms);
        self.current_ms
    }

    fn recompute(&mut self, idle: Option<&[bool]>, wall_ms: u64) {
        let candidate = if self.partitions.is_empty() {
            if idle.is_some() && self.idle_timeout.is_some() { Some(wall_ms) } else { None }
        } else {
            let mut min: Option<u64> = None;
            for (i, p) in self.partitions.iter().enumerate() {
                let is_idle = idle.is_some_and(|idle| idle.get(i).copied().unwrap_or(false));
                let high = if is_idle { Some(p.max_seen_ms.unwrap_or(0).max(wall_ms)) } else { p.max_seen_ms };
                let Some(high) = high else {
                    min = None;
                    break;
                };
                min = Some(min.map_or(high, |m| m.min(high)));
            }
            min
        };
        if let Some(high) = candidate {
            self.current_ms = self.current_ms.max(high.saturating_sub(self.lateness_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimum_over_partitions_minus_lateness() {
        let t0 = Instant::now();
        let mut w = Watermarks::new(2, 10_000, None, t0);
        w.observe(0, 100_000, t0);
        assert_eq!(w.current_ms(), 0, "partition 1 has not spoken yet");
        w.observe(1, 50_000, t0);
        assert_eq!(w.current_ms(), 40_000);
        w.observe(1, 200_000, t0);
        assert_eq!(w.current_ms(), 90_000);
        w.observe(0, 90_000, t0);
        assert_eq!(w.current_ms(), 90_000, "never moves back");
    }

    #[test]
    fn idle_partitions_follow_the_wall_clock() {
        let t0 = Instant::now();
        let mut w = Watermarks::new(2, 1_000, Some(Duration::from_secs(5)), t0);
        w.observe(0, 100_000, t0);
        assert_eq!(w.advance(t0 + Duration::from_secs(1), 500_000, &mut |_| true), 0);
        // Both partitions have been silent for 6 s, but partition 1's reader is behind: not idle.
        assert_eq!(w.advance(t0 + Duration::from_secs(6), 500_000, &mut |p| p == 0), 0);
        // Caught up: both follow the wall clock.
        assert_eq!(w.advance(t0 + Duration::from_secs(6), 500_000, &mut |_| true), 499_000);
        // Activity on partition 0 does not move the watermark back.
        w.observe(0, 100_001, t0 + Duration::from_secs(7));
        assert_eq!(w.current_ms(), 499_000);
    }

    #[test]
    fn a_worker_without_partitions_follows_the_clock_only_when_unbounded() {
        let t0 = Instant::now();
        assert_eq!(Watermarks::new(0, 1_000, Some(Duration::from_secs(1)), t0).advance(t0, 10_000, &mut |_| true), 9_000);
        assert_eq!(Watermarks::new(0, 1_000, None, t0).advance(t0, 10_000, &mut |_| true), 0);
    }

    #[test]
    fn bounded_inputs_never_go_idle() {
        let t0 = Instant::now();
        let mut w = Watermarks::new(1, 1_000, None, t0);
        w.observe(0, 5_000, t0);
        assert_eq!(w.advance(t0 + Duration::from_secs(3600), 1_000_000, &mut |_| true), 4_000);
    }
}
