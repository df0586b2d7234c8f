//! Closed windows into the lake: each table is a [`Deliver`] implementation of the durable sink.

use std::marker::PhantomData;

use differential_dataflow::Hashable;
use serde::{Deserialize, Serialize};
use sightline_operators::Time;
use timely::ExchangeData;
use timely::dataflow::StreamVec;
use timely::dataflow::operators::probe::Handle as ProbeHandle;

use crate::board::Views;
use crate::durable::{Completeness, Deliver, RetryPolicy, SinkHealth, durable_sink};
use crate::remote_write::series_of;
use crate::{Error, Lake, Table};

/// One worker's rows of one closed window of one table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowRows<R> {
    /// Window start, ms since the epoch.
    pub window_start_ms: u64,
    /// Window end, ms since the epoch.
    pub window_end_ms: u64,
    /// Which part of the window, for a table written in several files per window (see
    /// [`crate::lake::window_part_path`]); `None` for one file per window.
    pub part: Option<sightline_schemas::Label>,
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

/// Table `R` of a lake: one Parquet file per closed window.
///
/// Parts of a window are exchanged by window start (hashed: starts are multiples of the
/// width, which a plain modulo would send to one worker), so that one worker writes each
/// window, once every worker's part is in ([`Completeness::Whole`]): one file with a
/// deterministic name and sorted rows, replacing any earlier file of that window, so that a
/// rewrite after a restart is idempotent. The receipt is the [`WrittenWindow`], emitted once
/// the store has acknowledged the file.
pub struct TableSink<R> {
    lake: Lake,
    views: Views,
    table: PhantomData<R>,
}

impl<R> TableSink<R> {
    /// Table `R` of `lake`.
    pub fn new(lake: Lake) -> TableSink<R> {
        TableSink {
            lake,
            views: Views::default(),
            table: PhantomData,
        }
    }

    /// Also hands each window written to the metrics store and the dashboard board (see
    /// [`crate::board`]: after the file is durable, and outside the durability frontier).
    pub fn with_views(mut self, views: Views) -> TableSink<R> {
        self.views = views;
        self
    }
}

impl<R: Table + ExchangeData> Deliver for TableSink<R> {
    type Item = WindowRows<R>;
    type Batch = (u64, u64, Option<sightline_schemas::Label>);
    type Sealed = Vec<R>;
    type Receipt = WrittenWindow;

    const COMPLETENESS: Completeness = Completeness::Whole;

    fn name(&self) -> String {
        format!("WriteParquet({}/{})", self.lake.route(), R::NAME)
    }

    fn route(part: &WindowRows<R>) -> Option<u64> {
        Some((part.window_start_ms, &part.part).hashed())
    }

    fn batch_of(part: &WindowRows<R>) -> Self::Batch {
        (part.window_start_ms, part.window_end_ms, part.part.clone())
    }

    fn seal(&mut self, _window: &Self::Batch, parts: Vec<WindowRows<R>>) -> Vec<R> {
        let mut rows = R::combine(parts.into_iter().flat_map(|part| part.rows).collect());
        rows.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        rows
    }

    fn deliver(&mut self, window: &Self::Batch, rows: &Vec<R>) -> Result<WrittenWindow, Error> {
        let written =
            self.lake
                .write_window_part::<R>(window.0, window.1, window.2.as_deref(), rows)?;
        if !self.views.is_empty() && !rows.is_empty() {
            match R::to_batch(rows) {
                Ok(batch) => self.views.push(series_of(
                    R::NAME,
                    self.lake.route(),
                    &batch,
                    window.1 as i64,
                )),
                Err(e) => {
                    tracing::warn!(table = R::NAME, error = %e, "metrics store and board: rows not encoded")
                }
            }
        }
        Ok(written)
    }
}

/// Writes each closed window of table `R` to `lake` as one Parquet file: the durable sink
/// with [`TableSink`]. The output carries a [`WrittenWindow`] per file; its frontier, also
/// reported to `durable`, is the table's durability frontier.
pub fn write_windows<'s, R>(
    parts: StreamVec<'s, Time, WindowRows<R>>,
    lake: Lake,
    policy: RetryPolicy,
    health: &std::sync::Arc<SinkHealth>,
    durable: &ProbeHandle<Time>,
) -> StreamVec<'s, Time, WrittenWindow>
where
    R: Table + ExchangeData,
{
    write_windows_to(parts, TableSink::new(lake), policy, health, durable)
}

/// [`write_windows`] with the table sink `sink` (which may also feed the metrics store).
pub fn write_windows_to<'s, R>(
    parts: StreamVec<'s, Time, WindowRows<R>>,
    sink: TableSink<R>,
    policy: RetryPolicy,
    health: &std::sync::Arc<SinkHealth>,
    durable: &ProbeHandle<Time>,
) -> StreamVec<'s, Time, WrittenWindow>
where
    R: Table + ExchangeData,
{
    durable_sink(parts, sink, policy, health, durable)
}
