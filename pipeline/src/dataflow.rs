//! Assembly of the dataflow: source → decode → aggregates → closed windows → Parquet.

use std::sync::Arc;
use std::sync::mpsc::Sender;

use differential_dataflow::AsCollection;
use sightline_operators::{Time, Windows, close_windows, event_counts, latency, latency_by_variant, quality};
use sightline_sinks::tables::{DeadLetterRow, EventCountRow, LatencyRow, QualityRow, VariantLatencyRow, WindowedDeadLetter};
use sightline_sinks::{Lake, Table, WindowRows, WrittenWindow, write_windows};
use timely::ExchangeData;
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Concatenate, Inspect, Probe};
use timely::dataflow::{Scope, StreamVec};

use crate::report::Report;
use crate::source::{IngestSettings, IngestStats, RecordReader, ingest};

/// Everything one worker needs to build its dataflow.
pub struct DataflowParts {
    /// The worker's share of the input.
    pub reader: Box<dyn RecordReader>,
    /// Source settings.
    pub settings: IngestSettings,
    /// The lake.
    pub lake: Lake,
    /// Where progress reports go.
    pub reports: Sender<Report>,
    /// Shared source counters.
    pub stats: Arc<IngestStats>,
}

// The `ok_err` split carries a whole dead letter in `Err`; it is moved, not copied around.
#[allow(clippy::result_large_err)]
/// Builds the pipeline's dataflow in `scope` and returns the probe on its sinks: when the
/// probe's frontier has passed a time, every window ending at or before it is durable.
/// Also returns the probe on the sources' output, whose frontier is the global watermark.
pub fn build<'s>(scope: Scope<'s, Time>, parts: DataflowParts) -> (ProbeHandle<Time>, ProbeHandle<Time>) {
    let DataflowParts { reader, settings, lake, reports, stats } = parts;
    let windows = settings.windows;
    let durable = ProbeHandle::new();

    let watermark = ProbeHandle::new();
    let ingested = ingest(scope, reader, settings, durable.clone(), stats).probe_with(&watermark);
    let (oks, errs) = ingested.ok_err(|(item, time, diff)| match item {
        Ok(event) => Ok((event, time, diff)),
        Err(dead) => Err((dead, time, diff)),
    });
    // Shared, not copied, by the four aggregates.
    let events = oks.map(|(event, time, diff)| (std::sync::Arc::new(event), time, diff)).as_collection();
    let rejected = errs.as_collection();

    let quality_parts = closed_rows(close_windows(quality(events.clone(), rejected.clone(), windows), windows, "CloseQuality"), QualityRow::from_closed);
    let quality_reports = reports.clone();
    let quality_parts = quality_parts.inspect(move |part| {
        let _ = quality_reports.send(Report::quality(part));
    });

    let dead_letters =
        rejected.inner.map(move |(record, time, diff)| (WindowedDeadLetter { window_start: windows.start_of(time), record }, time, diff)).as_collection();

    let written = [
        write_windows(closed_rows(close_windows(event_counts(events.clone(), windows), windows, "CloseEventCounts"), EventCountRow::from_closed), lake.clone()),
        write_windows(closed_rows(close_windows(latency(events.clone(), windows), windows, "CloseLatency"), LatencyRow::from_closed), lake.clone()),
        write_windows(
            closed_rows(close_windows(latency_by_variant(events, windows), windows, "CloseLatencyByVariant"), VariantLatencyRow::from_closed),
            lake.clone(),
        ),
        write_windows(quality_parts, lake.clone()),
        write_windows(closed_rows(close_windows(dead_letters, windows, "CloseDeadLetters"), DeadLetterRow::from_closed), lake),
    ];
    scope
        .concatenate(written)
        .inspect(move |written: &WrittenWindow| {
            let _ = reports.send(Report::Written(written.clone()));
        })
        .probe_with(&durable);
    (durable, watermark)
}

/// Maps each closed window to its rows.
fn closed_rows<'s, W, R>(closed: StreamVec<'s, Time, W>, to_rows: fn(W) -> Vec<R>) -> StreamVec<'s, Time, WindowRows<R>>
where
    W: WindowBounds + 'static,
    R: Table + ExchangeData,
{
    closed.map(move |w| {
        let (window_start_ms, window_end_ms) = w.bounds();
        WindowRows { window_start_ms, window_end_ms, rows: to_rows(w) }
    })
}

/// The bounds of a closed window.
trait WindowBounds {
    fn bounds(&self) -> (u64, u64);
}

impl<K, R> WindowBounds for sightline_operators::ClosedWindow<K, R> {
    fn bounds(&self) -> (u64, u64) {
        (self.window_start, self.window_end)
    }
}

/// The windows a configuration describes.
pub fn windows_of(config: &crate::config::PipelineConfig) -> Windows {
    Windows::new(config.window_ms)
}
