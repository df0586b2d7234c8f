//! What the dataflow computes: source → decode, validate, pseudonymize → routes → aggregates →
//! closed windows, as a typed bundle ([`Computed`]). Where the results go is [`crate::emit`]'s
//! concern: compute and emit are apart, so a new output attaches to the bundle and a new
//! aggregate is one more stream in it.
//!
//! Records are routed before they are aggregated: restricted events, and the dead letters of
//! restricted records ([`sightline_schemas::is_restricted`]), are aggregated apart, so that
//! they can be stored under the restricted lake prefix with their own retention. Both routes
//! run the same operators.

use std::sync::Arc;

use differential_dataflow::{AsCollection, VecCollection};
use std::sync::atomic::AtomicBool;

use sightline_operators::alerts::{AlertRules, HealthState, HealthWindow, health};
use sightline_operators::experiment::{
    Decision, ExposureKey, ResultRow, Saved as ExperimentSaved, Setup, experiments,
};
use sightline_operators::funnel::Resume;
use sightline_operators::funnel::{
    FunnelDef, FunnelKey, FunnelResume, Funnels, SavedFunnel, StateHooks, funnels_of,
    subscribers as funnel_subscribers,
};
use sightline_operators::product::{ProductKey, Tally};
use sightline_operators::route::route_aggregates;
use sightline_operators::sampling::{
    BudgetInput, BudgetWindow, SamplingRules, SamplingState, budgets, segment_counts,
};
use sightline_operators::select::{Names, Subscriber, select};
use sightline_operators::state::StateShard;
use sightline_operators::triage::{SavedItem, TriageRecord, TriageRules, triage};
use sightline_operators::{
    CountKey, Counted, LatencyHistogram, LatencyKey, QualityCounts, QualityKey, Time, VariantKey,
    WindowedDeadLetter, Windows, close_windows, windowed_dead_letters,
};
use sightline_schemas::{DeadLetter, Event};
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::vec::Partition;
use timely::dataflow::operators::{Concat, Probe};
use timely::dataflow::{Scope, StreamVec};

use sightline_ingest::source::{IngestSettings, IngestStats, RecordReader, ingest};

/// The two routes of every record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Route {
    /// Everything that is not restricted.
    Standard,
    /// Restricted records ([`sightline_schemas::is_restricted`]).
    Restricted,
}

impl Route {
    /// Both routes, in the order of [`Computed::routes`].
    pub const ALL: [Route; 2] = [Route::Standard, Route::Restricted];

    /// `standard` or `restricted`.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Standard => "standard",
            Route::Restricted => "restricted",
        }
    }

    fn of(restricted: bool) -> Route {
        if restricted {
            Route::Restricted
        } else {
            Route::Standard
        }
    }
}

pub use sightline_operators::close::Closed;

/// Everything one route computes, window by window.
pub struct RouteWindows<'s> {
    /// Which route.
    pub route: Route,
    /// Accepted events per event name, type and feature area.
    pub event_counts: Closed<'s, CountKey, Counted>,
    /// Latency histograms per event name, feature area and surface.
    pub latency: Closed<'s, LatencyKey, LatencyHistogram>,
    /// Latency histograms per event name, experiment and variant.
    pub latency_by_variant: Closed<'s, VariantKey, LatencyHistogram>,
    /// Records per event name and outcome, with the privacy counters.
    pub quality: Closed<'s, QualityKey, QualityCounts>,
    /// Dead letters per window of their processing time.
    pub dead_letters: Closed<'s, WindowedDeadLetter, isize>,
    /// Command-queue health per action type.
    pub command_queue: Closed<'s, ProductKey, Tally>,
    /// Feedback per feature area and breakdown.
    pub feedback: Closed<'s, ProductKey, Tally>,
    /// Integration health and alert transitions, window by window, in order.
    pub health: StreamVec<'s, Time, HealthWindow>,
}

/// What the experiments compute (standard route only: restricted events are counted for
/// compliance, never analysed).
pub struct ExperimentWindows<'s> {
    /// `experiment_results` rows, each window once (cumulative since the start).
    pub results: Closed<'s, ResultRow, isize>,
    /// Exposures per window and arm.
    pub exposures: Closed<'s, ExposureKey, isize>,
    /// Guardrail decisions, at the windows that end a sampling interval.
    pub decisions: Closed<'s, Decision, isize>,
    /// Compliance alerts (`firing`, `resolved`).
    pub alerts: Closed<'s, sightline_operators::alerts::Alert, isize>,
    /// `experiment_did` rows of the rollouts by tenant.
    pub did: Closed<'s, sightline_operators::experiment::DidRow, isize>,
    /// Snapshots of the experiments' state, when it is saved.
    pub state: Option<StreamVec<'s, Time, StateShard<ExperimentSaved>>>,
}

/// What the sampling budgets compute.
pub struct SamplingWindows<'s> {
    /// Every processed window with the state after it, and each interval's rate table.
    pub windows: StreamVec<'s, Time, BudgetWindow>,
    /// The rules (for the segment's field names).
    pub rules: Arc<SamplingRules>,
}

/// What the dataflow computes, for outputs to attach to.
pub struct Computed<'s> {
    /// Every accepted event (both routes), at its event-time tick, shared: for operators that
    /// arrange events by unit.
    pub events: VecCollection<'s, Time, Arc<Event>>,
    /// Every dead letter (both routes), at the tick at which it was processed.
    pub dead_letters: VecCollection<'s, Time, DeadLetter>,
    /// Per route, in the order of [`Route::ALL`].
    pub routes: Vec<RouteWindows<'s>>,
    /// The funnels of both routes (the key says which), each entry window once, at its
    /// horizon (its end plus the funnel's conversion window).
    pub funnels: Closed<'s, FunnelKey, LatencyHistogram>,
    /// P1 triage records (both routes; each record says which), each feedback's window once.
    pub triage: Closed<'s, TriageRecord, isize>,
    /// Snapshots of triage's state, when it is saved.
    pub triage_state: Option<StreamVec<'s, Time, StateShard<SavedItem>>>,
    /// Snapshots of the funnels' state, when it is saved.
    pub funnel_state: Option<StreamVec<'s, Time, StateShard<SavedFunnel>>>,
    /// The funnel definitions, in the order [`FunnelKey::funnel`] indexes.
    pub funnel_defs: Arc<[FunnelDef]>,
    /// The experiments' outputs, when any experiment is analysed.
    pub experiments: Option<ExperimentWindows<'s>>,
    /// The sampling budgets (both routes' events), window by window, when they are on.
    pub sampling: Option<SamplingWindows<'s>>,
    /// The sources' frontier: the global watermark.
    pub watermark: ProbeHandle<Time>,
}

/// What the long-horizon operators compute, from where they resume, and whether their state
/// is saved.
#[derive(Clone, Debug)]
pub struct Analytics {
    /// The funnels.
    pub funnels: Arc<[FunnelDef]>,
    /// Where each funnel resumes (this worker's share of the restored state), in the order of
    /// `funnels`; empty when nothing is restored.
    pub resume: Vec<FunnelResume>,
    /// Event time between two snapshots of the state, ms; `None`: state is not saved (a
    /// replay of files, which has no offsets to resume from).
    pub save_every_ms: Option<u64>,
    /// Set when the pipeline stops: the state is saved at once, so that the last commit
    /// covers every written window.
    pub flush: Arc<AtomicBool>,
    /// The alert rules.
    pub rules: AlertRules,
    /// The integration-health state each route resumes from, in the order of [`Route::ALL`].
    pub health: Vec<HealthState>,
    /// Which feedback is critical, and the span of recent errors.
    pub triage: TriageRules,
    /// Where triage resumes (this worker's share of its restored state).
    pub triage_resume: Resume<SavedItem>,
    /// The experiments analysed.
    pub experiments: Arc<Setup>,
    /// Where the experiments resume (this worker's share of their restored state).
    pub experiments_resume: Resume<ExperimentSaved>,
    /// The sampling budgets' rules, when they are on.
    pub sampling: Option<Arc<SamplingRules>>,
    /// The state the budgets resume from.
    pub sampling_resume: SamplingState,
}

impl Analytics {
    /// No funnels.
    pub fn none() -> Analytics {
        Analytics::of(Arc::from(Vec::new()))
    }

    /// `funnels`, resuming from nothing, state not saved.
    pub fn of(funnels: Arc<[FunnelDef]>) -> Analytics {
        Analytics {
            funnels,
            resume: Vec::new(),
            save_every_ms: None,
            flush: Arc::default(),
            rules: AlertRules::default(),
            health: Vec::new(),
            triage: TriageRules::default(),
            triage_resume: Resume::default(),
            experiments: Arc::new(Setup::default()),
            experiments_resume: Resume::default(),
            sampling: None,
            sampling_resume: SamplingState::default(),
        }
    }
}

// The `ok_err` split carries a whole dead letter in `Err`; it is moved, not copied around.
#[allow(clippy::result_large_err)]
/// Builds the computing half of the dataflow in `scope`. `durable` is the probe every output
/// and the saved state will report durability to: the source commits offsets behind its
/// frontier. `outputs` is the one of the outputs alone, which the state snapshots follow.
pub fn compute<'s>(
    scope: Scope<'s, Time>,
    reader: Box<dyn RecordReader>,
    settings: IngestSettings,
    analytics: &Analytics,
    durable: ProbeHandle<Time>,
    outputs: ProbeHandle<Time>,
    stats: Arc<IngestStats>,
) -> Computed<'s> {
    let windows = settings.windows;
    let watermark = ProbeHandle::new();
    let durable_probe = durable.clone();
    let ingested = ingest(scope, reader, settings, durable, stats).probe_with(&watermark);
    let (oks, errs) = ingested.ok_err(|(decoded, time, diff)| match decoded {
        Ok(event) => Ok((event, time, diff)),
        Err(dead) => Err((*dead, time, diff)),
    });
    let events = oks.as_collection();
    let dead_letters = errs.as_collection();
    // One pass gives each consumer the events it reads (by route and name); events stay in
    // their `Arc`, shared by every consumer instead of copied.
    let mut readers = Vec::new();
    for route in Route::ALL {
        let restricted = Some(route == Route::Restricted);
        readers.push(Subscriber {
            restricted,
            names: Names::All,
        });
    }
    readers.push(Subscriber {
        restricted: None,
        names: TriageRules::names(),
    });
    // Each funnel reads its own events straight from this pass.
    readers.extend(funnel_subscribers(&analytics.funnels));
    // Experiments read every event (an assignment can be on any event) of both routes
    // (restricted events that carry an assignment are counted for compliance, never analysed);
    // so do the sampling budgets. Without either, no stream of every event is made for them.
    let setup = &analytics.experiments;
    let every_event = setup.is_on() || analytics.sampling.is_some();
    if every_event {
        readers.push(Subscriber {
            restricted: None,
            names: Names::All,
        });
    }
    let mut selected = select(events.inner.clone(), &readers)
        .into_iter()
        .map(|s| s.as_collection());
    let mut next = || selected.next().expect("one stream per reader");
    let by_route = |restricted: bool| Route::of(restricted) as u64;
    let routed_dead = dead_letters
        .inner
        .clone()
        .partition(2, move |(dead, time, diff)| {
            (by_route(dead.restricted), (dead, time, diff))
        });
    let mut routes = Vec::new();
    for (route, dead) in Route::ALL.into_iter().zip(routed_dead) {
        let health = analytics
            .health
            .get(route as usize)
            .cloned()
            .unwrap_or_default();
        routes.push(aggregate(
            route,
            next(),
            dead.as_collection(),
            windows,
            (&analytics.rules, health),
        ));
    }
    let triage_events = next();
    let funnel_events: Vec<_> = analytics.funnels.iter().map(|_| next().inner).collect();
    let experiment_events = every_event.then(&mut next);
    let hooks = analytics.save_every_ms.map(|every_ms| StateHooks {
        every_ms,
        outputs,
        durable: durable_probe,
        flush: Arc::clone(&analytics.flush),
    });
    let Funnels {
        closed: funnels,
        state: funnel_state,
    } = funnels_of(
        scope,
        funnel_events,
        Arc::clone(&analytics.funnels),
        windows,
        &analytics.resume,
        hooks.as_ref(),
    );
    let (triage, triage_state) = triage(
        triage_events,
        analytics.triage.clone(),
        windows,
        analytics.triage_resume.clone(),
        hooks.as_ref(),
    );
    // The budgets count every accepted event of both routes: they budget all the traffic an
    // SDK sends, and their table holds segment counts only.
    let budget_counts = analytics
        .sampling
        .as_ref()
        .zip(experiment_events.as_ref())
        .map(|(rules, events)| {
            close_windows(
                segment_counts(events.clone(), windows, rules),
                windows,
                "CloseSegmentCounts",
            )
            .map(BudgetInput::Counts)
        });
    let experiments = experiment_events.filter(|_| setup.is_on()).map(|events| {
        let out = experiments(
            events,
            Arc::clone(setup),
            windows,
            analytics.experiments_resume.clone(),
            hooks.as_ref(),
        );
        ExperimentWindows {
            results: out.results,
            exposures: out.exposures,
            decisions: out.decisions,
            alerts: out.alerts,
            did: out.did,
            state: out.state,
        }
    });
    let sampling = analytics
        .sampling
        .as_ref()
        .zip(budget_counts)
        .map(|(rules, counts)| {
            let input = match &experiments {
                Some(e) => counts.concat(e.decisions.clone().map(BudgetInput::Decisions)),
                None => counts,
            };
            SamplingWindows {
                windows: budgets(
                    input,
                    windows,
                    Arc::clone(rules),
                    analytics.sampling_resume.clone(),
                ),
                rules: Arc::clone(rules),
            }
        });
    Computed {
        events,
        experiments,
        sampling,
        dead_letters,
        routes,
        funnels,
        funnel_state,
        triage,
        triage_state,
        funnel_defs: Arc::clone(&analytics.funnels),
        watermark,
    }
}

/// Every aggregate of one route, closed.
fn aggregate<'s>(
    route: Route,
    events: VecCollection<'s, Time, Arc<Event>>,
    dead: VecCollection<'s, Time, DeadLetter>,
    windows: Windows,
    (rules, health_from): (&AlertRules, HealthState),
) -> RouteWindows<'s> {
    let aggregates = route_aggregates(events, dead.clone(), windows, route.as_str());
    RouteWindows {
        health: health(aggregates.integrations, windows, rules.clone(), health_from),
        route,
        event_counts: aggregates.event_counts,
        latency: aggregates.latency,
        latency_by_variant: aggregates.latency_by_variant,
        quality: aggregates.quality,
        command_queue: aggregates.command_queue,
        feedback: aggregates.feedback,
        dead_letters: close_windows(
            windowed_dead_letters(dead, windows),
            windows,
            &format!("CloseDeadLetters({})", route.as_str()),
        ),
    }
}

/// The whole dataflow: [`compute`], then [`crate::emit::emit`] every output. Returns its
/// [`Probes`].
pub fn build<'s>(
    scope: Scope<'s, Time>,
    reader: Box<dyn RecordReader>,
    settings: IngestSettings,
    analytics: &Analytics,
    stats: Arc<IngestStats>,
    outputs: crate::emit::Outputs,
) -> Probes {
    let durable = ProbeHandle::new();
    let written = ProbeHandle::new();
    let computed = compute(
        scope,
        reader,
        settings,
        analytics,
        durable.clone(),
        written.clone(),
        stats,
    );
    let watermark = computed.watermark.clone();
    crate::emit::emit(computed, outputs, &durable, &written);
    Probes {
        durable,
        written,
        watermark,
    }
}

/// The frontiers of a running dataflow.
pub struct Probes {
    /// Everything before it is durable, saved state included: the source commits offsets
    /// behind it.
    pub durable: ProbeHandle<Time>,
    /// Every output before it is written (tables, topics; not the saved state).
    pub written: ProbeHandle<Time>,
    /// The sources' frontier: the global watermark.
    pub watermark: ProbeHandle<Time>,
}

/// The windows a configuration describes.
pub fn windows_of(config: &crate::config::PipelineConfig) -> Windows {
    Windows::new(config.window_ms)
}
