//! Progress reports: one line per closed window, and the run's summary.

use std::collections::BTreeMap;

use sightline_sinks::tables::QualityRow;
use sightline_sinks::{WindowRows, WrittenWindow};

/// Something a worker tells the reporting thread.
#[derive(Clone, Debug)]
pub enum Report {
    /// A worker's share of one window's quality counts.
    Quality {
        /// Window start, ms.
        window_start_ms: u64,
        /// Window end, ms.
        window_end_ms: u64,
        /// Accepted events.
        accepted: u64,
        /// Rejected records (decode failures).
        rejected: u64,
        /// Late events.
        late: u64,
        /// Accepted events with PII violations (scrubbed or dropped fields).
        pii_violations: u64,
    },
    /// A window file is durable.
    Written(WrittenWindow),
}

impl Report {
    /// Sums a worker's quality rows of one window.
    pub fn quality(part: &WindowRows<QualityRow>) -> Report {
        let (mut accepted, mut rejected, mut late, mut pii_violations) = (0, 0, 0, 0);
        for row in &part.rows {
            match row.outcome.as_str() {
                "accepted" => accepted += row.count as u64,
                "late" => late += row.count as u64,
                "pii_violations" => pii_violations += row.count as u64,
                "pseudonymized_fields" | "scrubbed_fields" | "dropped_fields" => {}
                _ => rejected += row.count as u64,
            }
        }
        Report::Quality { window_start_ms: part.window_start_ms, window_end_ms: part.window_end_ms, accepted, rejected, late, pii_violations }
    }
}

/// What is known of one window so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WindowProgress {
    /// Window end, ms.
    pub window_end_ms: u64,
    /// Accepted events.
    pub accepted: u64,
    /// Rejected records.
    pub rejected: u64,
    /// Late events.
    pub late: u64,
    /// Accepted events with PII violations.
    pub pii_violations: u64,
    /// Files written.
    pub files: u64,
    /// Rows written, over all tables.
    pub rows: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Collects reports and releases each window once the durable frontier has passed it.
#[derive(Debug, Default)]
pub struct Progress {
    open: BTreeMap<u64, WindowProgress>,
    /// Totals over every released window.
    pub totals: WindowProgress,
    /// Windows released.
    pub windows: u64,
}

impl Progress {
    /// Takes one report in.
    pub fn add(&mut self, report: Report) {
        match report {
            Report::Quality { window_start_ms, window_end_ms, accepted, rejected, late, pii_violations } => {
                let w = self.open.entry(window_start_ms).or_default();
                w.window_end_ms = window_end_ms;
                w.accepted += accepted;
                w.rejected += rejected;
                w.late += late;
                w.pii_violations += pii_violations;
            }
            Report::Written(written) => {
                let w = self.open.entry(written.window_start_ms).or_default();
                w.window_end_ms = written.window_end_ms;
                w.files += 1;
                w.rows += written.rows;
                w.bytes += written.bytes;
            }
        }
    }

    /// Removes and returns the windows that end at or before `durable_ms`, in order.
    pub fn release(&mut self, durable_ms: u64) -> Vec<(u64, WindowProgress)> {
        let mut out = Vec::new();
        while let Some((&start, w)) = self.open.first_key_value() {
            if w.window_end_ms > durable_ms {
                break;
            }
            if let Some((_, w)) = self.open.pop_first() {
                self.windows += 1;
                let t = &mut self.totals;
                t.accepted += w.accepted;
                t.rejected += w.rejected;
                t.late += w.late;
                t.pii_violations += w.pii_violations;
                t.files += w.files;
                t.rows += w.rows;
                t.bytes += w.bytes;
                out.push((start, w));
            }
        }
        out
    }
}

/// One human line for a closed window.
pub fn window_line(start_ms: u64, w: &WindowProgress) -> String {
    let start = sightline_schemas::format_rfc3339_ms(start_ms as i64);
    let end = sightline_schemas::format_rfc3339_ms(w.window_end_ms as i64);
    format!(
        "window {}–{} closed: in {} · accepted {} · rejected {} ({:.2}%) · late {} · PII violations {} · {} files, {} rows written",
        &start[..19],
        &end[11..19],
        w.accepted + w.rejected + w.late,
        w.accepted,
        w.rejected,
        if w.accepted + w.rejected > 0 { 100.0 * w.rejected as f64 / (w.accepted + w.rejected) as f64 } else { 0.0 },
        w.late,
        w.pii_violations,
        w.files,
        w.rows
    )
}
