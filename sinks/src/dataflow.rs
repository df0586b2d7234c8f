//! The timely operator that writes closed windows to the lake.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use differential_dataflow::Hashable;
use serde::{Deserialize, Serialize};
use sightline_operators::Time;
use timely::ExchangeData;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;
use tracing::{error, warn};

use crate::{Lake, Table};

/// One worker's rows of one closed window of one table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowRows<R> {
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// Window end, ms since the epoch.
    pub window_end_ms: u64,
    /// The rows.
    pub rows: Vec<R>,
}

/// A window file that is durable in the lake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenWindow {
    /// Table name.
    pub table: String,
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// Window end, ms since the epoch.
    pub window_end_ms: u64,
    /// Rows in the file.
    pub rows: u64,
    /// Size of the file.
    pub bytes: u64,
    /// Path relative to the lake root.
    pub path: String,
}

/// Writes each closed window of table `R` to the lake as one Parquet file.
///
/// **Delivery contract.** Parts of a window are exchanged by window start, so that one worker
/// writes each window; it writes once every worker's part has arrived (the input frontier has
/// passed the parts' time), as one file with a deterministic name, sorted rows, replacing any
/// earlier file of that window: a rewrite after a restart is idempotent. A [`WrittenWindow`]
/// is emitted only after the store has acknowledged the file, so the output frontier of this
/// operator is the durability frontier of the table. A failed write is retried with
/// exponential backoff (100 ms doubling to 30 s) while the operator holds the window's
/// capability: the frontier, and with it anything that waits for durability, stops until the
/// write succeeds. Nothing is dropped.
pub fn write_windows<'s, R>(parts: StreamVec<'s, Time, WindowRows<R>>, lake: Lake) -> StreamVec<'s, Time, WrittenWindow>
where
    R: Table + ExchangeData,
{
    // Hashed: window starts are multiples of the width, which a plain modulo would send to
    // one worker.
    let exchange = Exchange::new(|part: &WindowRows<R>| part.window_start_ms.hashed());
    let name = format!("WriteParquet({})", R::NAME);
    let scope = parts.scope();
    parts.unary_frontier(exchange, &name, move |_capability, info| {
        let activator = scope.activator_for(info.address.clone());
        let mut pending: BTreeMap<(u64, u64), (Capability<Time>, Vec<R>)> = BTreeMap::new();
        let mut backoff: Option<(Instant, Duration)> = None;
        move |(input, frontier), output| {
            input.for_each(|cap, data| {
                // Every message here is sent under a capability; one without would carry no time.
                let Some(&least) = cap.least() else {
                    debug_assert!(false, "window parts without a capability");
                    return;
                };
                for part in data.drain(..) {
                    let (_, rows) = pending.entry((part.window_start_ms, part.window_end_ms)).or_insert_with(|| (cap.delayed(&least, 0), Vec::new()));
                    rows.extend(part.rows);
                }
            });
            if let Some((retry_at, _)) = backoff
                && Instant::now() < retry_at {
                    activator.activate_after(retry_at - Instant::now());
                    return;
                }
            let ready: Vec<(u64, u64)> = pending.iter().filter(|(_, (cap, _))| !frontier.less_equal(cap.time())).map(|(k, _)| *k).collect();
            for window in ready {
                let Some((cap, rows)) = pending.get_mut(&window) else { continue };
                *rows = R::combine(std::mem::take(rows));
                rows.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
                match lake.write_window::<R>(window.0, window.1, rows) {
                    Ok(written) => {
                        backoff = None;
                        output.session(cap).give(written);
                        pending.remove(&window);
                    }
                    Err(err) => {
                        let delay = backoff.map_or(Duration::from_millis(100), |(_, d)| (d * 2).min(Duration::from_secs(30)));
                        if err.is_retryable() {
                            warn!(table = R::NAME, window_start_ms = window.0, error = %err, retry_in_ms = delay.as_millis() as u64, "window write failed; retrying");
                        } else {
                            error!(table = R::NAME, window_start_ms = window.0, error = %err, "window write failed with a non-retryable error; retrying anyway so nothing is dropped");
                        }
                        backoff = Some((Instant::now() + delay, delay));
                        activator.activate_after(delay);
                        return;
                    }
                }
            }
        }
    })
}
