//! Assembly of the dataflow: source → decode, validate, pseudonymize → aggregates per route →
//! closed windows → Parquet, and dead letters → Parquet and the Kafka dead-letter topic.
//!
//! Records are routed before they are aggregated: events that declare restricted data
//! (`data_sensitivity: restricted` or `pii_classification: high`), and dead letters of such
//! records, are aggregated and written apart, under the restricted lake prefix with its own
//! retention. The two routes run the same operators.

use std::sync::Arc;
use std::sync::mpsc::Sender;

use differential_dataflow::AsCollection;
use differential_dataflow::VecCollection;
use sightline_operators::{Time, Windows, close_windows, event_counts, latency, latency_by_variant, quality};
use sightline_schemas::{DeadLetter, Event};
use sightline_sinks::tables::{DeadLetterRow, EventCountRow, LatencyRow, QualityRow, QualitySummaryRow, VariantLatencyRow, WindowedDeadLetter};
use sightline_sinks::{Lake, Table, WindowRows, WrittenWindow, write_windows};
use timely::ExchangeData;
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::{Map, Partition};
use timely::dataflow::operators::{Concatenate, Inspect, Probe};
use timely::dataflow::{Scope, StreamVec};

use crate::dead_letters::{DeadLetterTopic, produce_dead_letters};
use crate::report::Report;
use crate::source::{IngestSettings, IngestStats, RecordReader, ingest};

/// Everything one worker needs to build its dataflow.
pub struct DataflowParts {
    /// The worker's share of the input.
    pub reader: Box<dyn RecordReader>,
    /// Source settings.
    pub settings: IngestSettings,
    /// The lake (standard route).
    pub lake: Lake,
    /// The lake of the restricted route.
    pub restricted_lake: Lake,
    /// The Kafka dead-letter topic, if configured.
    pub dead_letter_topic: Option<DeadLetterTopic>,
    /// Where progress reports go.
    pub reports: Sender<Report>,
    /// Shared source counters.
    pub stats: Arc<IngestStats>,
}

// The `ok_err` split carries a whole dead letter in `Err`; it is moved, not copied around.
#[allow(clippy::result_large_err)]
/// Builds the pipeline's dataflow in `scope` and returns the probe on its sinks: when the
/// probe's frontier has passed a time, every window ending at or before it is durable (and
/// every dead letter up to it is in the dead-letter topic). Also returns the probe on the
/// sources' output, whose frontier is the global watermark.
pub fn build<'s>(scope: Scope<'s, Time>, parts: DataflowParts) -> (ProbeHandle<Time>, ProbeHandle<Time>) {
    let DataflowParts { reader, settings, lake, restricted_lake, dead_letter_topic, reports, stats } = parts;
    let windows = settings.windows;
    let durable = ProbeHandle::new();

    let watermark = ProbeHandle::new();
    let ingested = ingest(scope, reader, settings, durable.clone(), stats).probe_with(&watermark);
    let (oks, errs) = ingested.ok_err(|(item, time, diff)| match item {
        Ok(event) => Ok((event, time, diff)),
        Err(dead) => Err((*dead, time, diff)),
    });
    let mut written = Vec::new();
    if let Some(topic) = dead_letter_topic {
        written.push(produce_dead_letters(errs.clone(), topic));
    }
    // One pass routes each record (0: standard, 1: restricted). Events come in an `Arc`, so
    // that the aggregates share them instead of copying them.
    let events = oks.partition(2, |(event, time, diff)| (u64::from(event.is_restricted()), (event, time, diff)));
    let rejected = errs.partition(2, |(dead, time, diff)| (u64::from(dead.restricted), (dead, time, diff)));
    for ((route_lake, events), rejected) in [lake, restricted_lake].into_iter().zip(events).zip(rejected) {
        written.extend(aggregate_and_write(events.as_collection(), rejected.as_collection(), windows, &route_lake, &reports));
    }
    scope
        .concatenate(written)
        .inspect(move |written: &WrittenWindow| {
            let _ = reports.send(Report::Written(written.clone()));
        })
        .probe_with(&durable);
    (durable, watermark)
}

/// Every aggregate of one route, closed and written to `lake`.
fn aggregate_and_write<'s>(
    events: VecCollection<'s, Time, Arc<Event>>,
    rejected: VecCollection<'s, Time, DeadLetter>,
    windows: Windows,
    lake: &Lake,
    reports: &Sender<Report>,
) -> Vec<StreamVec<'s, Time, WrittenWindow>> {
    let route = lake.route().to_owned();
    let name = |what: &str| format!("{what}({route})");
    let closed_quality = close_windows(quality(events.clone(), rejected.clone(), windows), windows, &name("CloseQuality"));
    let summaries = closed_quality.clone().map(|w| {
        let (window_start_ms, window_end_ms) = w.bounds();
        WindowRows { window_start_ms, window_end_ms, rows: QualitySummaryRow::from_closed(&w) }
    });
    let quality_reports = reports.clone();
    let quality_parts = closed_rows(closed_quality, QualityRow::from_closed).inspect(move |part| {
        let _ = quality_reports.send(Report::quality(part));
    });
    let dead_letters =
        rejected.inner.map(move |(record, time, diff)| (WindowedDeadLetter { window_start: windows.start_of(time), record }, time, diff)).as_collection();
    vec![
        write_windows(
            closed_rows(close_windows(event_counts(events.clone(), windows), windows, &name("CloseEventCounts")), EventCountRow::from_closed),
            lake.clone(),
        ),
        write_windows(closed_rows(close_windows(latency(events.clone(), windows), windows, &name("CloseLatency")), LatencyRow::from_closed), lake.clone()),
        write_windows(
            closed_rows(close_windows(latency_by_variant(events, windows), windows, &name("CloseLatencyByVariant")), VariantLatencyRow::from_closed),
            lake.clone(),
        ),
        write_windows(quality_parts, lake.clone()),
        write_windows(summaries, lake.clone()),
        write_windows(closed_rows(close_windows(dead_letters, windows, &name("CloseDeadLetters")), DeadLetterRow::from_closed), lake.clone()),
    ]
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
