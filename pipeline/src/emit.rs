//! Where the computed results go: each output attaches to the [`Computed`] bundle through the
//! one durable sink operator (`sightline_sinks::durable_sink`), which reports durability to the
//! probe that gates offset commits.
//!
//! Outputs today: per route, the six lake tables; the dead-letter topic (optional); and the
//! progress reports of the run loop.

use std::sync::mpsc::Sender;

use sightline_operators::alerts::Alert;
use sightline_operators::experiment::Saved as ExperimentSaved;
use sightline_operators::state::StateShard;
use sightline_operators::{ClosedWindow, QualityTotals, Time};
use sightline_sinks::board::Views;
use sightline_sinks::experiments::{
    DecisionRow, ExperimentDidRow, ExperimentResultRow, ExposureRow,
};
use sightline_sinks::kafka::{KeyedRecord, TopicSink};
use sightline_sinks::product::{
    AlertRow, CommandQueueRow, FeedbackRow, FunnelRow, IntegrationHealthRow, TriageRow,
};
use sightline_sinks::sampling::BudgetRow;
use sightline_sinks::state::{StateSink, WindowStateSink, health_name};
use sightline_sinks::tables::{
    DeadLetterRecord, DeadLetterRow, EventCountRow, LatencyRow, QualityRow, QualitySummaryRow,
    VariantLatencyRow,
};
use sightline_sinks::{
    Lake, RetryPolicy, SinkHealth, Table, TableSink, WindowRows, WrittenWindow, durable_sink,
    write_windows_to,
};
use std::sync::Arc;
use timely::ExchangeData;
use timely::dataflow::StreamVec;
use timely::dataflow::operators::{Concat, Inspect, Probe};

use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::{Filter, Map};

use crate::dataflow::{Computed, Route};
use crate::report::Report;

/// Where the outputs go.
pub struct Outputs {
    /// The lake of the standard route.
    pub lake: Lake,
    /// The lake of the restricted route.
    pub restricted_lake: Lake,
    /// The dead-letter topic, if configured.
    pub dead_letter_topic: Option<TopicSink<DeadLetterRecord>>,
    /// How failed deliveries are retried.
    pub retry: RetryPolicy,
    /// Where the sinks count their failures (and say when one gave up).
    pub health: Arc<SinkHealth>,
    /// Where progress reports go.
    pub reports: Sender<Report>,
    /// Where the long-horizon operators' state is saved (`None` for a replay of files).
    pub state: Option<StateTarget>,
    /// The alerts topic, if configured.
    pub alerts_topic: Option<TopicSink<AlertRow>>,
    /// The triage topic, if configured.
    pub triage_topic: Option<TopicSink<TriageRow>>,
    /// The guardrail decisions topic, if configured.
    pub guardrail_topic: Option<TopicSink<DecisionRow>>,
    /// The sampling-rate topic, if configured.
    pub sampling_topic: Option<TopicSink<BudgetRow>>,
    /// The metrics store (Prometheus remote-write) and the dashboard board, each if there is
    /// one: every exported table's windows go there too once written.
    pub views: Views,
}

/// Where saved state goes: the lake's `_sightline/state/<group>/…` (restricted records under
/// the restricted prefix).
#[derive(Clone, Debug)]
pub struct StateTarget {
    /// The lake (its root).
    pub lake: Lake,
    /// The restricted route's prefix.
    pub restricted_prefix: String,
    /// The consumer group the state belongs to.
    pub group: String,
    /// The pipeline's windows.
    pub windows: sightline_operators::Windows,
}

/// Attaches every output to `computed`. When `written`'s frontier has passed a time, every
/// window ending at or before it is in every table, and every dead letter up to it is on the
/// dead-letter topic; when `durable`'s has, the long-horizon operators' state is saved up to
/// it as well.
pub fn emit(
    computed: Computed<'_>,
    outputs: Outputs,
    durable: &ProbeHandle<Time>,
    written: &ProbeHandle<Time>,
) {
    let Outputs {
        lake,
        restricted_lake,
        dead_letter_topic,
        retry,
        health,
        reports,
        state,
        alerts_topic,
        triage_topic,
        guardrail_topic,
        sampling_topic,
        views,
    } = outputs;
    // The standard route's tables, where the budgets and the experiments write.
    let standard = Tables {
        lake: lake.clone(),
        retry,
        health: &health,
        durable,
        written,
        reports: reports.clone(),
        views: views.clone(),
    };
    if let Some(sampling) = computed.sampling {
        let fields = sampling.rules.fields.clone();
        let table_reports = reports.clone();
        let published = sampling.windows.clone().inspect(move |w| {
            if let Some(t) = &w.table {
                let _ = table_reports.send(Report::Alert(crate::report::budget_line(t)));
            }
        });
        let rows = published.flat_map(move |w| {
            let table = w.table?;
            Some(WindowRows {
                window_start_ms: table.window_start_ms,
                window_end_ms: table.window_end_ms,
                part: None,
                rows: BudgetRow::of_table(&table, &fields),
            })
        });
        if let Some(topic) = sampling_topic {
            let records = rows.clone().flat_map(|w| {
                w.rows
                    .into_iter()
                    .map(|value| KeyedRecord {
                        key: value.key(),
                        value,
                    })
                    .collect::<Vec<_>>()
            });
            durable_sink(records, topic, retry, &health, durable).probe_with(written);
        }
        // An interval's table is not a window of its own: counted in the totals only.
        standard.write_reported(rows, Report::Later);
        if let Some(target) = &state {
            let sink = WindowStateSink::new(
                target.lake.clone(),
                &target.group,
                "sampling",
                durable.clone(),
                target.windows,
            );
            durable_sink(sampling.windows, sink, retry, &health, durable);
        }
    }
    if let Some(target) = &state {
        save_state(computed.funnel_state, target, retry, &health, durable);
        save_state(computed.triage_state, target, retry, &health, durable);
    }
    let mut alert_records = Vec::new();
    if let Some(experiments) = computed.experiments {
        // Experiments analyse the standard route only: their state and tables are there.
        if let (Some(target), Some(shards)) = (&state, experiments.state) {
            let sink = StateSink::new(
                target.lake.clone(),
                &target.restricted_prefix,
                &target.group,
                |_: &ExperimentSaved| false,
            );
            durable_sink(shards, sink, retry, &health, durable);
        }
        standard.write(rows_of(experiments.results, |w| {
            ExperimentResultRow::from_closed(&w)
        }));
        standard.write(rows_of(experiments.exposures, |w| {
            ExposureRow::from_closed(&w)
        }));
        standard.write(rows_of(experiments.did, |w| {
            ExperimentDidRow::from_closed(&w)
        }));
        // Compliance alerts join the alerts table (a part of their own in each window) and
        // the alerts topic.
        let alert_reports = reports.clone();
        let compliance = experiments.alerts.inspect(move |w| {
            for (a, _) in &w.entries {
                let line = crate::report::alert_line(a, "standard");
                let _ = alert_reports.send(Report::Alert(line));
            }
        });
        let alert_rows = |w: &ClosedWindow<Alert, isize>| -> Vec<AlertRow> {
            w.entries
                .iter()
                .map(|(a, _)| AlertRow::of(a, "standard"))
                .collect()
        };
        standard.write(compliance.clone().flat_map(move |w| {
            let rows = alert_rows(&w);
            (!rows.is_empty()).then(|| WindowRows {
                window_start_ms: w.window_start_ms,
                window_end_ms: w.window_end_ms,
                part: Some("compliance".into()),
                rows,
            })
        }));
        alert_records.push(compliance.flat_map(move |w| {
            alert_rows(&w)
                .into_iter()
                .map(|value| KeyedRecord {
                    key: value.key(),
                    value,
                })
                .collect::<Vec<_>>()
        }));
        // Kills and advances are printed; a kill once (later epochs repeat it on the topic).
        let decision_reports = reports.clone();
        let mut killed = std::collections::BTreeSet::new();
        let decisions = experiments.decisions.inspect(move |w| {
            for (d, _) in &w.entries {
                let new_kill = d.action == sightline_stats::guardrail::Action::Kill
                    && killed.insert((d.experiment.clone(), d.arm.clone(), d.rule.clone()));
                if new_kill || d.action == sightline_stats::guardrail::Action::Advance {
                    let _ = decision_reports.send(Report::Alert(crate::report::decision_line(d)));
                }
            }
        });
        standard.write(
            decisions
                .clone()
                .flat_map(|w| window_rows(&w, DecisionRow::from_closed(&w))),
        );
        if let Some(topic) = guardrail_topic {
            let records = decisions.flat_map(|w| {
                DecisionRow::from_closed(&w)
                    .into_iter()
                    .map(|value| KeyedRecord {
                        key: value.key(),
                        value,
                    })
                    .collect::<Vec<_>>()
            });
            durable_sink(records, topic, retry, &health, durable).probe_with(written);
        }
    }
    if let Some(topic) = dead_letter_topic {
        let records = computed
            .dead_letters
            .inner
            .filter(|(_, _, copies)| *copies > 0)
            .map(|(dead, _, _)| {
                let value = DeadLetterRecord::of(dead);
                KeyedRecord {
                    key: value.key(),
                    value,
                }
            });
        durable_sink(records, topic, retry, &health, durable).probe_with(written);
    }
    let (funnels, funnel_defs, triage) = (computed.funnels, computed.funnel_defs, computed.triage);
    if let Some(topic) = triage_topic {
        let records = triage.clone().flat_map(|w| {
            [false, true]
                .into_iter()
                .flat_map(|restricted| TriageRow::from_closed(&w, restricted))
                .map(|value| KeyedRecord {
                    key: value.event_id.clone(),
                    value,
                })
                .collect::<Vec<_>>()
        });
        durable_sink(records, topic, retry, &health, durable).probe_with(written);
    }
    for windows in computed.routes {
        let route = windows.route.as_str();
        let restricted = windows.route == Route::Restricted;
        let tables = Tables {
            lake: match windows.route {
                Route::Standard => lake.clone(),
                Route::Restricted => restricted_lake.clone(),
            },
            retry,
            health: &health,
            durable,
            written,
            reports: reports.clone(),
            views: views.clone(),
        };
        let quality_reports = reports.clone();
        let quality = windows.quality.inspect(move |w| {
            let totals = QualityTotals::of_window(w);
            let _ =
                quality_reports.send(Report::Quality(w.window_start_ms, w.window_end_ms, totals));
        });
        tables.write(rows_of(windows.event_counts, EventCountRow::from_closed));
        tables.write(rows_of(windows.latency, LatencyRow::from_closed));
        tables.write(rows_of(
            windows.latency_by_variant,
            VariantLatencyRow::from_closed,
        ));
        tables.write(rows_of(quality.clone(), |w| {
            QualitySummaryRow::from_closed(&w)
        }));
        tables.write(rows_of(quality, QualityRow::from_closed));
        tables.write(rows_of(windows.dead_letters, DeadLetterRow::from_closed));
        tables.write(rows_of(windows.command_queue, CommandQueueRow::from_closed));
        tables.write(rows_of(windows.feedback, FeedbackRow::from_closed));
        tables.write(
            triage
                .clone()
                .flat_map(move |w| window_rows(&w, TriageRow::from_closed(&w, restricted))),
        );
        // A funnel's entry window is written at its horizon, one file per funnel, after the
        // window itself was reported: counted in the totals only.
        let defs = Arc::clone(&funnel_defs);
        let funnel_rows = funnels.clone().flat_map(move |w| {
            FunnelRow::from_closed(&w, &defs, restricted)
                .into_iter()
                .map(|(funnel, rows)| WindowRows {
                    window_start_ms: w.window_start_ms,
                    window_end_ms: w.window_end_ms,
                    part: defs.get(usize::from(funnel)).map(|d| d.name.clone()),
                    rows,
                })
                .collect::<Vec<_>>()
        });
        tables.write_reported(funnel_rows, Report::Later);
        let alert_reports = reports.clone();
        let health_windows = windows.health.inspect(move |w| {
            for a in &w.alerts {
                let _ = alert_reports.send(Report::Alert(crate::report::alert_line(a, route)));
            }
        });
        tables.write(
            health_windows
                .clone()
                .flat_map(|w| window_rows(&w, IntegrationHealthRow::from_health(&w))),
        );
        tables.write(
            health_windows
                .clone()
                .flat_map(move |w| window_rows(&w, AlertRow::from_health(&w, route))),
        );
        alert_records.push(health_windows.clone().flat_map(move |w| {
            AlertRow::from_health(&w, route)
                .into_iter()
                .map(|value| KeyedRecord {
                    key: value.key(),
                    value,
                })
                .collect::<Vec<_>>()
        }));
        if let Some(target) = &state {
            let sink = WindowStateSink::new(
                target.lake.clone(),
                &target.group,
                &health_name(route),
                durable.clone(),
                target.windows,
            );
            durable_sink(health_windows, sink, retry, &health, durable);
        }
    }
    if let Some(topic) = alerts_topic
        && let Some(records) = alert_records.into_iter().reduce(|a, b| a.concat(b))
    {
        durable_sink(records, topic, retry, &health, durable).probe_with(written);
    }
}

/// A record of saved state keyed by `(restricted, unit)`.
type Keyed<D> = ((bool, u64), D);

/// Saves the snapshots of one long-horizon operator (routed by the key's `restricted` flag).
fn save_state<D: ExchangeData + serde::Serialize + Clone>(
    shards: Option<StreamVec<'_, Time, StateShard<Keyed<D>>>>,
    target: &StateTarget,
    retry: RetryPolicy,
    health: &Arc<SinkHealth>,
    durable: &ProbeHandle<Time>,
) {
    if let Some(shards) = shards {
        let sink = StateSink::new(
            target.lake.clone(),
            &target.restricted_prefix,
            &target.group,
            |((restricted, _), _): &Keyed<D>| *restricted,
        );
        durable_sink(shards, sink, retry, health, durable);
    }
}

/// The rows of a window (any window-like item), or nothing when there are none.
fn window_rows<W: WindowSpan, R>(w: &W, rows: Vec<R>) -> Option<WindowRows<R>> {
    let (window_start_ms, window_end_ms) = w.span();
    (!rows.is_empty()).then_some(WindowRows {
        window_start_ms,
        window_end_ms,
        part: None,
        rows,
    })
}

/// Something that covers one window.
trait WindowSpan {
    fn span(&self) -> (u64, u64);
}

impl<K, R> WindowSpan for ClosedWindow<K, R> {
    fn span(&self) -> (u64, u64) {
        (self.window_start_ms, self.window_end_ms)
    }
}

impl WindowSpan for sightline_operators::alerts::HealthWindow {
    fn span(&self) -> (u64, u64) {
        (self.window_start_ms, self.window_end_ms)
    }
}

/// The tables of one route.
struct Tables<'a> {
    lake: Lake,
    retry: RetryPolicy,
    health: &'a Arc<SinkHealth>,
    durable: &'a ProbeHandle<Time>,
    written: &'a ProbeHandle<Time>,
    reports: Sender<Report>,
    views: Views,
}

impl Tables<'_> {
    /// Writes table `R` and reports each file written as part of its window.
    fn write<R: Table + ExchangeData>(&self, rows: StreamVec<'_, Time, WindowRows<R>>) {
        self.write_reported(rows, Report::Written);
    }

    /// Writes table `R` and reports each file written as `report` says.
    fn write_reported<R: Table + ExchangeData>(
        &self,
        rows: StreamVec<'_, Time, WindowRows<R>>,
        report: fn(WrittenWindow) -> Report,
    ) {
        let reports = self.reports.clone();
        write_windows_to(
            rows,
            TableSink::new(self.lake.clone()).with_views(self.views.clone()),
            self.retry,
            self.health,
            self.durable,
        )
        .probe_with(self.written)
        .inspect(move |written| {
            let _ = reports.send(report(written.clone()));
        });
    }
}

/// Maps each closed window to its rows.
fn rows_of<'s, K, D, R>(
    closed: StreamVec<'s, Time, ClosedWindow<K, D>>,
    to_rows: impl Fn(ClosedWindow<K, D>) -> Vec<R> + 'static,
) -> StreamVec<'s, Time, WindowRows<R>>
where
    K: 'static,
    D: 'static,
    R: Table + ExchangeData,
{
    closed.map(move |w| {
        let (window_start_ms, window_end_ms) = (w.window_start_ms, w.window_end_ms);
        WindowRows {
            window_start_ms,
            window_end_ms,
            part: None,
            rows: to_rows(w),
        }
    })
}
