//! Progress reports: one line per closed window, and the run's summary.

use std::collections::BTreeMap;

use sightline_operators::QualityTotals;
use sightline_sinks::WrittenWindow;

/// Something a worker tells the reporting thread (in a cluster, through process 0's worker 0:
/// see `run`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Report {
    /// A worker's share of one window's quality totals: window start and end (ms), totals.
    Quality(u64, u64, QualityTotals),
    /// A window file is durable.
    Written(WrittenWindow),
    /// A file written after its window was released (a funnel's entry window, written at its
    /// horizon): counted in the totals, not as a window.
    Later(WrittenWindow),
    /// An alert changed state, or a sampling-rate table was published: the line to print.
    Alert(String),
    /// What one process of a cluster read and retried, sent once at its end.
    Totals(ProcessTotals),
}

/// One process's counts, summed into a cluster's summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessTotals {
    /// Records read.
    pub read: u64,
    /// Events accepted.
    pub accepted: u64,
    /// Records rejected.
    pub rejected: u64,
    /// Late events.
    pub late: u64,
    /// Records read again after a restart whose windows had already been written.
    pub already_written: u64,
    /// Deliveries retried.
    pub retries: u64,
}

impl ProcessTotals {
    fn add(&mut self, other: &ProcessTotals) {
        self.read += other.read;
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.late += other.late;
        self.already_written += other.already_written;
        self.retries += other.retries;
    }
}

/// What is known of one window so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowProgress {
    /// Window end, ms.
    pub window_end_ms: u64,
    /// Records accepted, rejected and late, and PII violations.
    pub quality: QualityTotals,
    /// Files written.
    pub files: u64,
    /// Rows written, over all tables.
    pub rows: u64,
    /// Bytes written.
    pub bytes: u64,
}

impl WindowProgress {
    fn add(&mut self, other: &WindowProgress) {
        self.quality.add(&other.quality);
        self.files += other.files;
        self.rows += other.rows;
        self.bytes += other.bytes;
    }
}

/// Collects reports and releases each window once the durable frontier has passed it.
#[derive(Debug, Default)]
pub struct Progress {
    open: BTreeMap<u64, WindowProgress>,
    /// Totals over every released window.
    pub totals: WindowProgress,
    /// Windows released.
    pub windows: u64,
    /// The sum of the processes' [`Report::Totals`] (a cluster's process 0 only).
    pub processes: Option<(usize, ProcessTotals)>,
}

impl Progress {
    /// Takes one report in.
    pub fn add(&mut self, report: Report) {
        match report {
            Report::Quality(window_start_ms, window_end_ms, totals) => {
                let w = self.open.entry(window_start_ms).or_default();
                w.window_end_ms = window_end_ms;
                w.quality.add(&totals);
            }
            Report::Written(written) => {
                let w = self.open.entry(written.window_start_ms).or_default();
                w.window_end_ms = written.window_end_ms;
                w.files += 1;
                w.rows += written.rows;
                w.bytes += written.bytes;
            }
            Report::Later(written) => {
                self.totals.files += 1;
                self.totals.rows += written.rows;
                self.totals.bytes += written.bytes;
            }
            Report::Alert(_) => {}
            Report::Totals(t) => {
                let (n, sum) = self.processes.get_or_insert_default();
                *n += 1;
                sum.add(&t);
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
                self.totals.add(&w);
                out.push((start, w));
            }
        }
        out
    }
}

/// One human line for a published sampling-rate table: its interval, budget, expected kept
/// volume, and the segments kept most (risk above 1, highest rate first, at most three).
pub fn budget_line(t: &sightline_operators::sampling::BudgetTable) -> String {
    let start = sightline_schemas::format_rfc3339_ms(t.window_start_ms as i64);
    let end = sightline_schemas::format_rfc3339_ms(t.window_end_ms as i64);
    let active = t.rows.iter().filter(|r| r.volume > 0.0).count();
    let mut risky: Vec<_> = t
        .rows
        .iter()
        .filter(|r| r.risk > 1.0 && r.volume > 0.0)
        .collect();
    risky.sort_by(|a, b| b.rate.total_cmp(&a.rate).then(b.risk.total_cmp(&a.risk)));
    let top: Vec<String> = risky
        .iter()
        .take(3)
        .map(|r| {
            format!(
                "{} at {:.3} (risk {:.2})",
                r.segment.join("/"),
                r.rate,
                r.risk
            )
        })
        .collect();
    format!(
        "sampling rates v{} for {}–{}: {active} segments, budget {:.0} events, expected kept {:.0}{}",
        t.version,
        &start[..19],
        &end[11..19],
        t.budget,
        t.expected_kept,
        if top.is_empty() {
            String::new()
        } else {
            format!("; kept most: {}", top.join(", "))
        }
    )
}

/// One human line for an alert's change of state.
pub fn alert_line(a: &sightline_operators::alerts::Alert, route: &str) -> String {
    let start = sightline_schemas::format_rfc3339_ms(a.window_start_ms as i64);
    let end = sightline_schemas::format_rfc3339_ms(a.window_end_ms as i64);
    let route = if route == "standard" {
        String::new()
    } else {
        format!(" ({route})")
    };
    format!(
        "alert {} {}: {} on {}{route} in window {}–{} (value {:.3}, threshold {}, {} {})",
        a.state,
        a.severity,
        a.rule,
        a.subject,
        &start[..19],
        &end[11..19],
        a.value,
        a.threshold,
        a.calls,
        if a.rule == "compliance" {
            "events"
        } else {
            "calls"
        }
    )
}

/// One human line for a closed window.
pub fn window_line(start_ms: u64, w: &WindowProgress) -> String {
    let start = sightline_schemas::format_rfc3339_ms(start_ms as i64);
    let end = sightline_schemas::format_rfc3339_ms(w.window_end_ms as i64);
    let q = &w.quality;
    format!(
        "window {}–{} closed: in {} · accepted {} · rejected {} ({:.2}%) · late {} · PII violations {} · {} files, {} rows written",
        &start[..19],
        &end[11..19],
        q.accepted + q.rejected + q.late,
        q.accepted,
        q.rejected,
        100.0 * q.rejection_rate(),
        q.late,
        q.pii_violations,
        w.files,
        w.rows
    )
}

/// The line printed for a guardrail decision that acts (`kill`, `advance`).
pub fn decision_line(d: &sightline_operators::experiment::Decision) -> String {
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"));
    format!(
        "guardrail {} {} ({}, {}): {} at epoch {} — effect {}, bound {}, {} breached intervals, SRM p {:.4}",
        d.experiment,
        d.arm,
        d.rule,
        &sightline_schemas::format_rfc3339_ms(d.watermark_ms as i64)[..19],
        d.action.as_str(),
        d.epoch,
        fmt(d.estimate),
        fmt(d.bound),
        d.breached_intervals,
        d.srm_p_value
    )
}
