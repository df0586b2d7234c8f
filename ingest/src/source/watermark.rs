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

use super::PartitionState;

/// Tracks the watermark of one source worker over its partitions' states, which hold each
/// partition's largest event time; this keeps what does not survive a restart (when each
/// partition was last active) and the watermark itself.
#[derive(Clone, Debug)]
pub struct Watermarks {
    lateness_ms: u64,
    idle_timeout: Option<Duration>,
    last_activity: Vec<Instant>,
    current_ms: u64,
}

impl Watermarks {
    /// A tracker of `partitions`, all active at `now`. Its watermark starts from their event
    /// times (those of a restored state, or none).
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
        marks.recompute(partitions, None, 0);
        marks
    }

    /// The current watermark, ms since the epoch. Events with an earlier time are late.
    pub fn current_ms(&self) -> u64 {
        self.current_ms
    }

    /// Records an on-time event of partition `slot` in its state and advances the watermark
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
        if p.max_event_ms.is_none_or(|m| event_ms > m) {
            p.max_event_ms = Some(event_ms);
            self.recompute(partitions, None, 0);
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

    /// Re-evaluates the watermark with the partitions in `idle` following the wall clock
    /// (`wall_ms`), and returns it. A caller passes the [`Watermarks::silent`] partitions
    /// whose reader has read everything they hold.
    pub fn advance(&mut self, partitions: &[PartitionState], idle: &[usize], wall_ms: u64) -> u64 {
        self.recompute(partitions, Some(idle), wall_ms);
        self.current_ms
    }

    fn recompute(&mut self, partitions: &[PartitionState], idle: Option<&[usize]>, wall_ms: u64) {
        let candidate = if partitions.is_empty() {
            if idle.is_some() && self.idle_timeout.is_some() {
                Some(wall_ms)
            } else {
                None
            }
        } else {
            let mut min: Option<u64> = None;
            for (i, p) in partitions.iter().enumerate() {
                let is_idle = idle.is_some_and(|idle| idle.contains(&i));
                let high = if is_idle {
                    Some(p.max_event_ms.unwrap_or(0).max(wall_ms))
                } else {
                    p.max_event_ms
                };
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
        assert_eq!(
            p[0].max_event_ms,
            Some(100_000),
            "the state holds the largest time"
        );
    }

    #[test]
    fn a_seeded_state_starts_the_watermark() {
        let p = vec![
            PartitionState::seeded("t", 0, Some(10), Some(70_000)),
            PartitionState::seeded("t", 1, Some(4), Some(50_000)),
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
        assert_eq!(w.advance(&p, &[], 500_000), 0);
        // Both partitions have been silent for 6 s, but partition 1's reader is behind: not idle.
        let t6 = t0 + Duration::from_secs(6);
        assert_eq!(w.silent(t6), vec![0, 1]);
        assert_eq!(w.advance(&p, &[0], 500_000), 0);
        // Caught up: both follow the wall clock.
        assert_eq!(w.advance(&p, &[0, 1], 500_000), 499_000);
        // Activity on partition 0 does not move the watermark back.
        w.observe(&mut p, 0, 100_001, t0 + Duration::from_secs(7));
        assert_eq!(w.current_ms(), 499_000);
    }

    #[test]
    fn a_worker_without_partitions_follows_the_clock_only_when_unbounded() {
        let t0 = Instant::now();
        let mut unbounded = Watermarks::new(&[], 1_000, Some(Duration::from_secs(1)), t0);
        assert_eq!(unbounded.advance(&[], &[], 10_000), 9_000);
        assert_eq!(
            Watermarks::new(&[], 1_000, None, t0).advance(&[], &[], 10_000),
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
        assert_eq!(w.advance(&p, &[], 1_000_000), 4_000);
    }
}
