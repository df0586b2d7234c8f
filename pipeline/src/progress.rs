//! Progress of long work (`replay` over a large file, `generate`) on standard error: on a
//! terminal one line rewritten in place every half second; otherwise (a log) one plain line
//! every ten seconds, with no control characters. Nothing for work shorter than two seconds.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Reports how far some work has got.
#[derive(Debug)]
pub struct Reporter {
    what: &'static str,
    unit: &'static str,
    total: Option<u64>,
    started: Instant,
    last: Option<Instant>,
    terminal: bool,
}

impl Reporter {
    /// Progress of `what`, counted in `unit`s, out of `total` when it is known.
    pub fn new(what: &'static str, unit: &'static str, total: Option<u64>) -> Reporter {
        Reporter {
            what,
            unit,
            total,
            started: Instant::now(),
            last: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// The line for `done` units after `elapsed`.
    pub fn line(&self, done: u64, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let rate = done as f64 / secs;
        let mut line = format!("{}: {done} {}", self.what, self.unit);
        if let Some(total) = self.total.filter(|t| *t > 0) {
            let share = (done as f64 / total as f64).min(1.0);
            line.push_str(&format!(" of {total} ({:.0}%)", share * 100.0));
            if rate > 0.0 && done < total {
                let left = (total - done) as f64 / rate;
                line.push_str(&format!(
                    ", {:.0} {}/s, about {:.0} s left",
                    rate, self.unit, left
                ));
                return line;
            }
        }
        line.push_str(&format!(", {:.0} {}/s", rate, self.unit));
        line
    }

    /// Notes that `done` units are done, printing a line when one is due.
    pub fn update(&mut self, done: u64) {
        let now = Instant::now();
        if now - self.started < Duration::from_secs(2) {
            return;
        }
        let every = if self.terminal {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(10)
        };
        if self.last.is_some_and(|l| now - l < every) {
            return;
        }
        self.last = Some(now);
        let line = self.line(done, now - self.started);
        let mut err = std::io::stderr().lock();
        let _ = if self.terminal {
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }

    /// Ends the report (on a terminal, the rewritten line is left as it is).
    pub fn finish(&mut self) {
        if self.terminal && self.last.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_how_far_and_how_long() {
        let r = Reporter::new("replay", "records", Some(1000));
        assert_eq!(
            r.line(250, Duration::from_secs(5)),
            "replay: 250 records of 1000 (25%), 50 records/s, about 15 s left"
        );
        let open = Reporter::new("generate", "events", None);
        assert_eq!(
            open.line(300, Duration::from_secs(3)),
            "generate: 300 events, 100 events/s"
        );
    }
}
