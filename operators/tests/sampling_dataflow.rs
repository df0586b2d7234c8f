//! The budgets through timely: [`segment_counts`], [`close_windows`] and [`budgets`] on 1, 2
//! and 3 workers with random batching give the tables of a naive model (per-window tallies
//! counted by hand, fed to [`plan`] in window order), and a run resumed from the state saved
//! after any window publishes the uninterrupted run's tables.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use differential_dataflow::input::Input;
use proptest::prelude::*;
use sightline_operators::sampling::plan::{self, BudgetTable, SamplingState};
use sightline_operators::sampling::{
    BudgetInput, BudgetWindow, SamplingRules, SegmentPart, SegmentTally, budgets, segment_counts,
};
use sightline_operators::{Windows, close_windows};
use sightline_schemas::{
    DataSensitivity, Event, EventName, Label, Links, PiiClassification, Platform, PrivacyCounts,
    Source,
};
use timely::dataflow::operators::Inspect;
use timely::dataflow::operators::vec::Map;

const WIDTH: u64 = 10_000;
const BASE: u64 = 1_769_178_600_000;
const NAMES: [&str; 4] = [
    "project_viewed",
    "project_created",
    "project_creation_error",
    "project_feedback_submitted",
];
const AREAS: [&str; 3] = ["projects", "tasks", "search"];
const VERSIONS: [&str; 3] = ["4.2.0", "4.2.1", "4.3.0"];

#[derive(Clone, Debug)]
struct Raw {
    at_ms: u64,
    name: usize,
    area: usize,
    version: usize,
    tenant: u64,
}

fn event_of(raw: &Raw) -> Event {
    let name = EventName::from_name(NAMES[raw.name]).unwrap();
    Event {
        event_time_ms: raw.at_ms as i64,
        event_name: name,
        event_type: name.spec().event_type,
        event_id: "id".into(),
        source: Source::Client,
        platform: Platform::Web,
        app_version: VERSIONS[raw.version].into(),
        tenant_id: "t".try_into().unwrap(),
        user_id: "u".try_into().unwrap(),
        session_id: "s".try_into().unwrap(),
        links: Links {
            tenant: raw.tenant,
            user: 1,
            session: 0,
        },
        user_role: None,
        country: None,
        kept: Default::default(),
        feature_area: AREAS[raw.area].into(),
        workflow_name: None,
        surface: None,
        experiment_assignments: Arc::from(vec![(Label::from("exp_1"), Label::from("a"))]),
        pii_classification: PiiClassification::None,
        data_sensitivity: DataSensitivity::Internal,
        weight_micros: sightline_schemas::WEIGHT_ONE,
        latency_us: None,
        privacy: PrivacyCounts::default(),
    }
}

fn arb_log() -> impl Strategy<Value = Vec<Raw>> {
    prop::collection::vec(
        (0u64..16 * WIDTH, 0usize..4, 0usize..3, 0usize..3, 1u64..6),
        50..400,
    )
    .prop_map(|mut v| {
        v.sort();
        v.into_iter()
            .map(|(at, name, area, version, tenant)| Raw {
                at_ms: BASE + at,
                name,
                area,
                // The newest version only in the second half.
                version: if at < 8 * WIDTH { version % 2 } else { version },
                tenant,
            })
            .collect()
    })
}

fn rules() -> SamplingRules {
    SamplingRules {
        budget_per_second: 0.5,
        interval_windows: 3,
        new_release_ms: 60_000,
        new_tenant_ms: 60_000,
        min_events: 5,
        ramps: vec![(Label::from("exp_1"), BASE, BASE + 6 * WIDTH)],
        ..SamplingRules::default()
    }
}

/// Runs the dataflow on `workers` workers from `initial`, fed in batches of `batch` events,
/// and returns every window it emitted.
fn run(log: &[Raw], workers: usize, batch: usize, initial: SamplingState) -> Vec<BudgetWindow> {
    let captured = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::clone(&captured);
    let log = log.to_vec();
    timely::execute(timely::Config::process(workers), move |worker| {
        let windows = Windows::new(WIDTH);
        let out = Arc::clone(&shared);
        let rules = Arc::new(rules());
        let initial = if worker.index() == 0 {
            initial.clone()
        } else {
            SamplingState::default()
        };
        let mut input = worker.dataflow::<u64, _, _>(|scope| {
            let (input, events) = scope.new_collection::<Event, isize>();
            let counts = close_windows(segment_counts(events, windows, &rules), windows, "c")
                .map(BudgetInput::Counts);
            budgets(counts, windows, rules, initial)
                .inspect(move |w| out.lock().unwrap().push(w.clone()));
            input
        });
        let (index, peers) = (worker.index(), worker.peers());
        for (i, chunk) in log.chunks(batch.max(1)).enumerate() {
            for raw in chunk.iter().skip(index).step_by(peers) {
                input.update_at(event_of(raw), raw.at_ms, 1);
            }
            let next = log.get((i + 1) * batch.max(1)).map(|r| r.at_ms);
            if let Some(next) = next
                && next > *input.time()
            {
                input.advance_to(next);
            }
            input.flush();
            worker.step();
        }
    })
    .unwrap();
    let mut got = captured.lock().unwrap().clone();
    got.sort_by_key(|w| (w.window_end_ms, w.table.is_some()));
    got
}

fn tables(windows: &[BudgetWindow]) -> Vec<BudgetTable> {
    windows.iter().filter_map(|w| w.table.clone()).collect()
}

/// The naive model: per-window tallies counted event by event, fed to the plan in window
/// order; an interval closes at its last window or before the next interval's first.
fn reference(log: &[Raw]) -> Vec<BudgetTable> {
    let rules = rules();
    let interval_ms = rules.interval_windows * WIDTH;
    let mut per_window: BTreeMap<u64, BTreeMap<SegmentPart, SegmentTally>> = BTreeMap::new();
    for raw in log {
        let e = event_of(raw);
        let start = raw.at_ms - raw.at_ms % WIDTH;
        let part = SegmentPart {
            segment: rules.fields.iter().map(|f| f.value(&e)).collect(),
            app_version: e.app_version.clone(),
            tenant: e.links.tenant,
            assignments: e.experiment_assignments.clone(),
        };
        let t = per_window
            .entry(start)
            .or_default()
            .entry(part)
            .or_default();
        let never = rules.never_samples(&e);
        t.events += 1;
        t.errors += i64::from(e.event_type == sightline_schemas::EventType::Error);
        if never {
            t.always_micros += 1_000_000;
        } else {
            t.sampleable_micros += 1_000_000;
        }
    }
    let mut state = SamplingState::default();
    let mut out = Vec::new();
    for (start, tallies) in per_window {
        let interval = start - start % interval_ms;
        if let Some(open) = state.interval_start_ms
            && open != interval
        {
            out.push(plan::close_interval(&mut state, &rules, open + interval_ms));
        }
        plan::add_window(&mut state, interval, start + WIDTH, tallies, Vec::new());
        if start + WIDTH == interval + interval_ms {
            out.push(plan::close_interval(
                &mut state,
                &rules,
                interval + interval_ms,
            ));
        }
    }
    if let Some(open) = state.interval_start_ms {
        out.push(plan::close_interval(&mut state, &rules, open + interval_ms));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Same input, same tables, on any number of workers and batching, equal to the model.
    #[test]
    fn tables_match_the_model_on_one_to_three_workers(
        log in arb_log(), workers in 1usize..=3, batch in 1usize..60,
    ) {
        let want = reference(&log);
        prop_assert!(!want.is_empty());
        let got = tables(&run(&log, workers, batch, SamplingState::default()));
        prop_assert_eq!(got, want);
    }

    /// A restart from the state saved after any window publishes the same tables.
    #[test]
    fn a_restart_from_any_saved_state_changes_no_table(
        log in arb_log(), cut in 0usize..400, workers in 1usize..=2,
    ) {
        let full = run(&log, 1, 16, SamplingState::default());
        let saved: Vec<&BudgetWindow> = full.iter().collect();
        let at = saved[cut % saved.len()];
        let resume_end = at.window_end_ms;
        // What a restart reads again: the windows after the saved one.
        let rest: Vec<Raw> = log.iter().filter(|r| r.at_ms >= resume_end).cloned().collect();
        let mut got: Vec<BudgetTable> = full
            .iter()
            .filter(|w| w.window_end_ms <= resume_end)
            .filter_map(|w| w.table.clone())
            .collect();
        got.extend(tables(&run(&rest, workers, 7, at.state.clone())));
        prop_assert_eq!(got, tables(&full));
    }
}
