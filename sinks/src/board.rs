//! The dashboard's store, and where a written window's series go besides the lake.
//!
//! [`Board`] keeps, in memory, the latest windows of every table the metrics store gets, as
//! the same [`Series`] ([`crate::remote_write::series_of`]: one name and label set per
//! measure): the built-in dashboard page reads it, so that the page shows exactly what the lake
//! and Prometheus hold, with no store of its own. It is bounded: `points` windows per series,
//! and at most `max_series` series (past that, the series whose newest point is oldest go).
//!
//! [`Views`] hands each written window to the metrics store and the board: both are fed after
//! the window's file is durable, and neither is part of the durability frontier.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::remote_write::{RemoteWrite, Series};

/// Labels of a series without its name, and its name.
type Key = (String, Vec<(String, String)>);

#[derive(Debug, Default)]
struct Inner {
    series: BTreeMap<Key, VecDeque<(i64, f64)>>,
    evicted: u64,
}

/// The latest windows of the exported tables, for the dashboard page. Cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct Board {
    inner: Arc<Mutex<Inner>>,
    points: usize,
    max_series: usize,
}

impl Default for Board {
    /// 60 windows per series, at most 20,000 series.
    fn default() -> Board {
        Board::new(60, 20_000)
    }
}

impl Board {
    /// A board keeping `points` windows per series and at most `max_series` series.
    pub fn new(points: usize, max_series: usize) -> Board {
        Board {
            inner: Arc::default(),
            points: points.max(1),
            max_series: max_series.max(1),
        }
    }

    /// Takes the series of one written window (a window written again replaces its values).
    pub fn push(&self, series: &[Series]) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        for s in series {
            let mut name = String::new();
            let labels: Vec<(String, String)> = s
                .labels
                .iter()
                .filter(|(k, v)| {
                    if k == "__name__" {
                        name.clone_from(v);
                    }
                    k != "__name__"
                })
                .cloned()
                .collect();
            let points = inner.series.entry((name, labels)).or_default();
            // Windows may be written out of order (each worker writes its own): keep time order.
            match points.binary_search_by_key(&s.timestamp_ms, |p| p.0) {
                Ok(at) => points[at].1 = s.value,
                Err(at) => points.insert(at, (s.timestamp_ms, s.value)),
            }
            while points.len() > self.points {
                points.pop_front();
            }
        }
        if inner.series.len() > self.max_series {
            // Keep the series seen most recently; drop a tenth more, so that this runs rarely.
            let keep = self.max_series - self.max_series / 10;
            let mut newest: Vec<(i64, Key)> = inner
                .series
                .iter()
                .map(|(k, p)| (p.back().map_or(i64::MIN, |p| p.0), k.clone()))
                .collect();
            newest.sort_unstable_by_key(|n| std::cmp::Reverse(n.0));
            for (_, key) in newest.into_iter().skip(keep) {
                inner.series.remove(&key);
                inner.evicted += 1;
            }
        }
    }

    /// The board as JSON: `{"series": [{"name", "labels": {…}, "points": [[ms, value], …]}],
    /// "evicted": n}`, only the series whose name is in `names` (all when it is empty), and of
    /// each at most its `last` newest points.
    pub fn to_json(&self, names: &[&str], last: usize) -> String {
        let Ok(inner) = self.inner.lock() else {
            return "{\"series\":[],\"evicted\":0}".to_owned();
        };
        let series: Vec<serde_json::Value> = inner
            .series
            .iter()
            .filter(|((name, _), _)| names.is_empty() || names.contains(&name.as_str()))
            .map(|((name, labels), points)| {
                let skip = points.len().saturating_sub(last.max(1));
                let labels: serde_json::Map<String, serde_json::Value> = labels
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                    .collect();
                serde_json::json!({
                    "name": name,
                    "labels": labels,
                    "points": points.iter().skip(skip).map(|(t, v)| serde_json::json!([t, v])).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({ "series": series, "evicted": inner.evicted }).to_string()
    }

    /// Series held.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.series.len()).unwrap_or(0)
    }

    /// Whether no series is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a written window's series go besides the lake: the metrics store and the dashboard
/// board, each when there is one.
#[derive(Clone, Debug, Default)]
pub struct Views {
    /// The metrics store's sender.
    pub remote: Option<RemoteWrite>,
    /// The dashboard's board.
    pub board: Option<Board>,
}

impl Views {
    /// Whether there is nowhere to send series (they are then not made).
    pub fn is_empty(&self) -> bool {
        self.remote.is_none() && self.board.is_none()
    }

    /// Hands the series of one written window to each view.
    pub fn push(&self, series: Vec<Series>) {
        if let Some(board) = &self.board {
            board.push(&series);
        }
        if let Some(remote) = &self.remote {
            remote.push(series);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, arm: &str, t: i64, v: f64) -> Series {
        Series {
            labels: vec![("__name__".into(), name.into()), ("arm".into(), arm.into())],
            value: v,
            timestamp_ms: t,
        }
    }

    #[test]
    fn keeps_the_latest_windows_in_time_order() {
        let board = Board::new(3, 100);
        for (t, v) in [(20, 2.0), (10, 1.0), (40, 4.0), (30, 3.0), (30, 3.5)] {
            board.push(&[series("m", "a", t, v)]);
        }
        board.push(&[series("other", "a", 10, 9.0)]);
        let json: serde_json::Value =
            serde_json::from_str(&board.to_json(&["m"], 10)).expect("json");
        assert_eq!(json["series"].as_array().map(Vec::len), Some(1));
        assert_eq!(json["series"][0]["labels"]["arm"], "a");
        assert_eq!(
            json["series"][0]["points"],
            serde_json::json!([[20, 2.0], [30, 3.5], [40, 4.0]])
        );
        let last: serde_json::Value = serde_json::from_str(&board.to_json(&[], 1)).expect("json");
        assert_eq!(last["series"].as_array().map(Vec::len), Some(2));
        assert_eq!(last["series"][0]["points"], serde_json::json!([[40, 4.0]]));
    }

    #[test]
    fn evicts_the_series_seen_least_recently() {
        let board = Board::new(2, 10);
        for i in 0..11 {
            board.push(&[series("m", &format!("arm{i}"), i, 1.0)]);
        }
        assert_eq!(board.len(), 9);
        let json = board.to_json(&[], 5);
        assert!(!json.contains("\"arm0\"") && !json.contains("\"arm1\""));
        assert!(json.contains("\"arm10\"") && json.contains("\"evicted\":2"));
    }
}
