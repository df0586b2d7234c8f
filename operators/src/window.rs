//! Event-time tumbling windows.
//!
//! Timely timestamps in Sightline are event times in milliseconds since the epoch, rounded
//! down to a tick (1 s by default). A window `[start, start + width)` is closed once the
//! dataflow frontier has passed `start + width`: no record with an earlier time can arrive
//! after that, so the window's aggregates are final.

use serde::{Deserialize, Serialize};

/// The timely timestamp of every Sightline dataflow: event time in milliseconds, tick-aligned.
pub type Time = u64;

/// Tumbling event-time windows of a fixed width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Windows {
    width_ms: u64,
}

impl Windows {
    /// Windows `width_ms` wide. A width of 0 is treated as 1 ms.
    pub fn new(width_ms: u64) -> Windows {
        Windows {
            width_ms: width_ms.max(1),
        }
    }

    /// The width in milliseconds.
    pub fn width_ms(self) -> u64 {
        self.width_ms
    }

    /// The start of the window holding `time_ms`.
    #[inline]
    pub fn start_of(self, time_ms: u64) -> u64 {
        time_ms - time_ms % self.width_ms
    }

    /// The (exclusive) end of the window starting at `start_ms`.
    #[inline]
    pub fn end_of(self, start_ms: u64) -> u64 {
        start_ms.saturating_add(self.width_ms)
    }
}

/// A key that belongs to one window.
pub trait WindowKey {
    /// The start of the key's window, in milliseconds since the epoch.
    fn window_start_ms(&self) -> u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assigns_half_open_windows() {
        let w = Windows::new(60_000);
        assert_eq!(w.start_of(0), 0);
        assert_eq!(w.start_of(59_999), 0);
        assert_eq!(w.start_of(60_000), 60_000);
        assert_eq!(w.end_of(60_000), 120_000);
        assert_eq!(Windows::new(0).width_ms(), 1);
    }
}
