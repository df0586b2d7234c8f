//! Per-partition event-time watermarks.
//!
//! Each partition has its own watermark: its [`Clock`] position (largest event time seen, or
//! the wall clock it was moved to while idle) less the allowed lateness. An event is late when
//! it is behind *its own partition's* watermark, so whether an event is late depends only on
//! the records of its partition before it, never on how fast other partitions were read:
//! reading a backlog gives the same decisions as reading live, and a restart that resumes a
//! partition with its clock as of the resume offset repeats them exactly.
//!
//! A source worker's watermark, which it holds its capability at, is the minimum over its
//! partitions' watermarks; it only moves forward. A partition that has delivered no accepted
//! event for `idle_timeout`, and whose reader has read everything it holds, is idle: its
//! clock follows the wall clock, so an idle partition never stalls the frontier; a worker with
//! no partitions at all follows the wall clock too. Rejected records do not keep a partition
//! active. A partition that is silent because its reader is behind (a slow fetch, a catch-up
//! after a restart, a backfill) is never idle. Bounded inputs (file replay) have no idle
//! timeout: their watermark is purely data-driven, and they end by dropping their capability.

use std::time::{Duration, Instant};

use super::PartitionState;
#[cfg(doc)]
use super::partition::Clock;

/// Tracks the watermark of one source worker over its partitions' states, which hold each
/// partition's [`Clock`]; this keeps what does not survive a restart (when each partition was
/// last active) and the worker's watermark.
#[derive(Clone, Debug)]
pub struct Watermarks {
    lateness_ms: u64,
    idle_timeout: Option<Duration>,
    last_activity: Vec<Instant>,
    current_ms: u64,
}

impl Watermarks {
    /// A tracker of `partitions`, all active at `now`. Its watermark starts from their clocks
    /// (those of a restored state, or none).
    pub fn new(
        partitions: &[PartitionState],
        lateness_ms: u64,
        idle_timeout: Option<Duration>,
        now: Instant,
    ) -> Watermarks {
        let mut marks = Watermarks {
            lateness_ms,
            idle_timeout,
            last_activity: vec![now; partitions.len()],
            current_ms: 0,
        };
        marks.recompute(partitions, 0);
        marks
    }

    /// The worker's watermark, ms since the epoch: the minimum of its partitions' watermarks.
    pub fn current_ms(&self) -> u64 {
        self.current_ms
    }

    /// The watermark of the partition in `slot`: its events with an earlier time are late.
    pub fn of(&self, partitions: &[PartitionState], slot: usize) -> u64 {
        partitions
            .get(slot)
            .and_then(|p| p.clock.watermark_ms(self.lateness_ms))
            .unwrap_or(0)
    }

    /// Records an on-time event of partition `slot` in its clock and advances the watermark
    /// as far as the data allows. Late events must not be observed.
    pub fn observe(
        &mut self,
        partitions: &mut [PartitionState],
        slot: usize,
        event_ms: u64,
        now: Instant,
    ) {
        let Some(p) = partitions.get_mut(slot) else {
            return;
        };
        if let Some(active) = self.last_activity.get_mut(slot) {
            *active = now;
        }
        if p.clock.max_event_ms.is_none_or(|m| event_ms > m) {
            p.clock.max_event_ms = Some(event_ms);
            self.recompute(partitions, 0);
        }
    }

    /// The partitions that have been silent for longer than the idle timeout at `now` (none
    /// for bounded inputs): the candidates for [`Watermarks::advance`]'s `idle`.
    pub fn silent(&self, now: Instant) -> Vec<usize> {
        let Some(timeout) = self.idle_timeout else {
            return Vec::new();
        };
        (0..self.last_activity.len())
            .filter(|&i| now.duration_since(self.last_activity[i]) >= timeout)
            .collect()
    }

    /// Moves the clocks of the partitions in `idle` to the wall clock (`wall_ms`) and returns
    /// the re-evaluated watermark. A caller passes the [`Watermarks::silent`] partitions whose
    /// reader has read everything they hold.
    pub fn advance(
        &mut self,
        partitions: &mut [PartitionState],
        idle: &[usize],
        wall_ms: u64,
    ) -> u64 {
        for &slot in idle {
            if let Some(p) = partitions.get_mut(slot) {
                p.clock.idle_ms = Some(p.clock.idle_ms.unwrap_or(0).max(wall_ms));
            }
        }
        self.recompute(partitions, wall_ms);
        self.current_ms
    }

    fn recompute(&mut self, partitions: &[PartitionState], wall_ms: u64) {
        let candidate = if partitions.is_empty() {
            // A worker without partitions follows the wall clock once it is asked to advance.
            (self.idle_timeout.is_some() && wall_ms > 0)
                .then(|| wall_ms.saturating_sub(self.lateness_ms))
        } else {
            partitions
                .iter()
                .map(|p| p.clock.watermark_ms(self.lateness_ms))
                .try_fold(u64::MAX, |min, w| w.map(|w| min.min(w)))
        };
        if let Some(mark) = candidate {
            self.current_ms = self.current_ms.max(mark);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::partition::Clock;
    use super::*;

    fn partitions(n: usize) -> Vec<PartitionState> {
        (0..n).map(|p| PartitionState::new("t", p as i32)).collect()
    }

    #[test]
    fn minimum_over_partitions_minus_lateness() {
        let t0 = Instant::now();
        let mut p = partitions(2);
        let mut w = Watermarks::new(&p, 10_000, None, t0);
        w.observe(&mut p, 0, 100_000, t0);
        assert_eq!(w.current_ms(), 0, "partition 1 has not spoken yet");
        w.observe(&mut p, 1, 50_000, t0);
        assert_eq!(w.current_ms(), 40_000);
        w.observe(&mut p, 1, 200_000, t0);
        assert_eq!(w.current_ms(), 90_000);
        w.observe(&mut p, 0, 90_000, t0);
        assert_eq!(w.current_ms(), 90_000, "never moves back");
        assert_eq!(p[0].clock.max_event_ms, Some(100_000));
    }

    #[test]
    fn lateness_is_judged_per_partition() {
        let t0 = Instant::now();
        let mut p = partitions(2);
        let mut w = Watermarks::new(&p, 10_000, None, t0);
        w.observe(&mut p, 0, 100_000, t0);
        w.observe(&mut p, 1, 20_000, t0);
        // The worker's watermark is held back by partition 1, but partition 0's own events
        // are judged against partition 0's watermark only.
        assert_eq!(w.current_ms(), 10_000);
        assert_eq!(w.of(&p, 0), 90_000);
        assert_eq!(w.of(&p, 1), 10_000);
    }

    #[test]
    fn a_seeded_state_starts_the_watermark() {
        let clock = |ms| Clock {
            max_event_ms: Some(ms),
            idle_ms: None,
        };
        let p = vec![
            PartitionState::seeded("t", 0, Some(10), clock(70_000)),
            PartitionState::seeded("t", 1, Some(4), clock(50_000)),
        ];
        let w = Watermarks::new(&p, 10_000, None, Instant::now());
        assert_eq!(w.current_ms(), 40_000);
    }

    #[test]
    fn idle_partitions_follow_the_wall_clock() {
        let t0 = Instant::now();
        let mut p = partitions(2);
        let mut w = Watermarks::new(&p, 1_000, Some(Duration::from_secs(5)), t0);
        w.observe(&mut p, 0, 100_000, t0);
        assert!(w.silent(t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(w.advance(&mut p, &[], 500_000), 0);
        // Both partitions have been silent for 6 s, but partition 1's reader is behind: not idle.
        let t6 = t0 + Duration::from_secs(6);
        assert_eq!(w.silent(t6), vec![0, 1]);
        assert_eq!(w.advance(&mut p, &[0], 500_000), 0);
        assert_eq!(
            p[0].clock.idle_ms,
            Some(500_000),
            "the idle time is in the clock"
        );
        // Caught up: both follow the wall clock.
        assert_eq!(w.advance(&mut p, &[0, 1], 500_000), 499_000);
        // Activity on partition 0 does not move the watermark back, and its next events are
        // judged against the idle time.
        w.observe(&mut p, 0, 100_001, t0 + Duration::from_secs(7));
        assert_eq!(w.current_ms(), 499_000);
        assert_eq!(w.of(&p, 0), 499_000);
    }

    #[test]
    fn a_worker_without_partitions_follows_the_clock_only_when_unbounded() {
        let t0 = Instant::now();
        let mut unbounded = Watermarks::new(&[], 1_000, Some(Duration::from_secs(1)), t0);
        assert_eq!(unbounded.advance(&mut [], &[], 10_000), 9_000);
        assert_eq!(
            Watermarks::new(&[], 1_000, None, t0).advance(&mut [], &[], 10_000),
            0
        );
    }

    #[test]
    fn bounded_inputs_never_go_idle() {
        let t0 = Instant::now();
        let mut p = partitions(1);
        let mut w = Watermarks::new(&p, 1_000, None, t0);
        w.observe(&mut p, 0, 5_000, t0);
        assert!(w.silent(t0 + Duration::from_secs(3600)).is_empty());
        assert_eq!(w.advance(&mut p, &[], 1_000_000), 4_000);
    }
}
