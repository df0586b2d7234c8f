#![allow(clippy::unwrap_used)]

//! Triage against a naive reference: random errors and feedback of a few users on both routes,
//! arriving out of order within the lateness, in random batches, on 1–3 workers. Every critical
//! feedback must come out once, in its window, with exactly the same user's and route's errors
//! of the span before it (the reference filters the whole log; it shares no code with the
//! operator).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use differential_dataflow::input::Input;
use proptest::prelude::*;
use sightline_operators::Windows;
use sightline_operators::funnel::{Resume, StateHooks};
use sightline_operators::state::StateShard;
use sightline_operators::triage::{SavedItem, TriageRules, triage};
use sightline_schemas::{
    DataSensitivity, Event, EventName, Kept, KeptValue, Label, Links, Measure, PiiClassification,
    Platform, PrivacyCounts, Source,
};
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::{Inspect, Probe};

const TICK: u64 = 1000;
const BASE: u64 = 1_769_178_600_000;
const SPAN: u64 = 60_000;

#[derive(Clone, Debug)]
struct Raw {
    user: u64,
    at_ms: u64,
    /// Some(code) for an error, None for a feedback.
    error: Option<u8>,
    score: u8,
    blocked: bool,
    restricted: bool,
    id: usize,
}

fn event_of(r: &Raw) -> Event {
    let (name, kept) = match r.error {
        Some(code) => (
            "project_creation_error",
            Kept::new(vec![(
                Label::from("error_code"),
                KeptValue::Label(Label::from(format!("E{code}").as_str())),
            )]),
        ),
        None => (
            "project_feedback_submitted",
            Kept::new(vec![
                (
                    Label::from("score"),
                    KeptValue::Measure(Measure(i64::from(r.score) * 1_000_000)),
                ),
                (
                    Label::from("blocked"),
                    KeptValue::Measure(Measure(i64::from(r.blocked) * 1_000_000)),
                ),
            ]),
        ),
    };
    let event_name = EventName::from_name(name).unwrap();
    Event {
        event_time_ms: r.at_ms as i64,
        event_name,
        event_type: event_name.spec().event_type,
        event_id: format!("id-{}", r.id),
        source: Source::Server,
        platform: Platform::Web,
        app_version: "1".into(),
        tenant_id: "t".try_into().unwrap(),
        user_id: "u".try_into().unwrap(),
        session_id: "s".try_into().unwrap(),
        links: Links {
            tenant: 0,
            user: r.user,
            session: 0,
        },
        user_role: None,
        country: None,
        kept,
        feature_area: "projects".into(),
        workflow_name: None,
        surface: None,
        experiment_assignments: Vec::new().into(),
        pii_classification: PiiClassification::None,
        data_sensitivity: if r.restricted {
            DataSensitivity::Restricted
        } else {
            DataSensitivity::Internal
        },
        weight_micros: sightline_schemas::WEIGHT_ONE,
        latency_us: None,
        privacy: PrivacyCounts::default(),
    }
}

fn arb_raw() -> impl Strategy<Value = Raw> {
    (
        1u64..=3,
        0u64..1200,
        proptest::option::weighted(0.6, 0u8..3),
        1u8..=5,
        proptest::bool::weighted(0.2),
        proptest::bool::weighted(0.2),
    )
        .prop_map(|(user, q, error, score, blocked, restricted)| Raw {
            user,
            at_ms: BASE + q * 250,
            error,
            score,
            blocked,
            restricted,
            id: 0,
        })
}

/// event id → (window start, error ids in time order, each error's code).
type Records = BTreeMap<String, (u64, Vec<String>)>;

fn reference(log: &[Raw], width: u64) -> Records {
    let mut out = Records::new();
    for f in log
        .iter()
        .filter(|r| r.error.is_none() && (r.score <= 2 || r.blocked))
    {
        let mut errors: Vec<&Raw> = log
            .iter()
            .filter(|e| {
                e.error.is_some()
                    && e.user == f.user
                    && e.restricted == f.restricted
                    && e.at_ms <= f.at_ms
                    && e.at_ms + SPAN >= f.at_ms
            })
            .collect();
        errors.sort_by_key(|e| {
            (
                e.at_ms,
                sightline_operators::funnel::fnv1a(format!("id-{}", e.id).as_bytes()),
            )
        });
        out.insert(
            format!("id-{}", f.id),
            (
                f.at_ms - f.at_ms % width,
                errors
                    .iter()
                    .map(|e| format!("E{}", e.error.unwrap_or(0)))
                    .collect(),
            ),
        );
    }
    out
}

/// Emitted records as `(event id, window start, error codes)`.
type Emitted = Vec<(String, u64, Vec<String>)>;

/// What a run emitted: its records, and the snapshots when it saved state.
struct Outcome {
    records: Emitted,
    shards: Vec<StateShard<SavedItem>>,
}

/// Runs triage on `workers` threads over `log` (events arrive in arrival order, in batches,
/// the frontier 20 s behind); saving state at every frontier with `save`, starting from
/// `resume` (given to worker 0) when there is one.
fn run(
    mut log: Vec<(Raw, u64)>,
    batches: Vec<usize>,
    workers: usize,
    width: u64,
    save: bool,
    resume: Option<Resume<SavedItem>>,
) -> Outcome {
    log.sort_by_key(|(r, arrival)| (*arrival, r.id));
    let (log, batches) = (Arc::new(log), Arc::new(batches));
    let got: Arc<Mutex<Emitted>> = Arc::default();
    let shards: Arc<Mutex<Vec<StateShard<SavedItem>>>> = Arc::default();
    let (out, out_shards) = (Arc::clone(&got), Arc::clone(&shards));
    timely::execute(timely::Config::process(workers), move |worker| {
        let windows = Windows::new(width);
        let (out, out_shards) = (Arc::clone(&out), Arc::clone(&out_shards));
        let rules = TriageRules {
            recent_errors_ms: SPAN,
            ..TriageRules::default()
        };
        let hooks = save.then(|| StateHooks {
            every_ms: 1,
            outputs: ProbeHandle::new(),
            durable: ProbeHandle::new(),
            flush: Arc::default(),
        });
        let resume = resume
            .as_ref()
            .map(|r| Resume {
                restored: if worker.index() == 0 {
                    r.restored.clone()
                } else {
                    Vec::new()
                },
                ..r.clone()
            })
            .unwrap_or_default();
        let mut input = worker.dataflow::<u64, _, _>(|scope| {
            let (input, events) = scope.new_collection::<Event, isize>();
            let (closed, state) = triage(events, rules, windows, resume, hooks.as_ref());
            let closed = closed.inspect(move |w| {
                for (record, n) in &w.entries {
                    assert_eq!(*n, 1);
                    let errors = record
                        .errors
                        .iter()
                        .map(|(_, _, c)| c.as_deref().unwrap_or("").to_owned())
                        .collect();
                    out.lock().unwrap().push((
                        record.context.event_id.clone(),
                        w.window_start_ms,
                        errors,
                    ));
                }
            });
            if let (Some(hooks), Some(state)) = (&hooks, state) {
                closed.probe_with(&hooks.outputs);
                state
                    .inspect(move |s| out_shards.lock().unwrap().push(s.clone()))
                    .probe_with(&hooks.durable);
            }
            input
        });
        let (index, peers) = (worker.index(), worker.peers());
        let (mut position, mut batch) = (0, 0);
        while position < log.len() {
            let size = batches[batch % batches.len()].max(1);
            batch += 1;
            let end = (position + size).min(log.len());
            for i in (position..end).filter(|i| i % peers == index) {
                let raw = &log[i].0;
                input.update_at(event_of(raw), raw.at_ms / TICK * TICK, 1);
            }
            if end < log.len() {
                let frontier = log[end].1.saturating_sub(20_000) / TICK * TICK;
                if frontier > *input.time() {
                    input.advance_to(frontier);
                }
            }
            input.flush();
            worker.step();
            position = end;
        }
    })
    .unwrap();
    let records = got.lock().unwrap().clone();
    let shards = shards.lock().unwrap().clone();
    Outcome { records, shards }
}

/// A log of `raws` with ids and arrival times (event time plus `jitter`).
fn log_of(raws: Vec<Raw>, jitter: &[u64]) -> Vec<(Raw, u64)> {
    raws.into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            r.id = i;
            let arrival = r.at_ms + jitter[i];
            (r, arrival)
        })
        .collect()
}

/// The records by event id; a record emitted twice must be the same both times (`repeats`
/// allowed: a restart writes again what is not known written).
fn by_id(records: Emitted, repeats: bool) -> Result<Records, TestCaseError> {
    let mut out = Records::new();
    for (id, start, errors) in records {
        if let Some(before) = out.insert(id.clone(), (start, errors.clone())) {
            prop_assert!(repeats, "record {} came out twice", id);
            prop_assert_eq!(
                before,
                (start, errors),
                "record {} came out twice, differently",
                id
            );
        }
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn triage_matches_the_reference(
        raws in proptest::collection::vec(arb_raw(), 0..50),
        jitter in proptest::collection::vec(0u64..20_000, 50),
        batches in proptest::collection::vec(1usize..15, 1..5),
        workers in 1usize..=3,
        width in proptest::sample::select(vec![10_000u64, 60_000]),
    ) {
        let log = log_of(raws, &jitter);
        let raws: Vec<Raw> = log.iter().map(|(r, _)| r.clone()).collect();
        let expected = reference(&raws, width);
        let outcome = run(log, batches, workers, width, false, None);
        prop_assert_eq!(by_id(outcome.records, false)?, expected);
    }

    /// A run stopped after any of its snapshots and restarted from it (reading the whole log
    /// again) emits what one run emits.
    #[test]
    fn a_restart_from_any_snapshot_changes_nothing(
        raws in proptest::collection::vec(arb_raw(), 1..50),
        jitter in proptest::collection::vec(0u64..20_000, 50),
        batches in proptest::collection::vec(1usize..15, 1..5),
        workers in 1usize..=3,
        width in proptest::sample::select(vec![10_000u64, 60_000]),
        pick in any::<proptest::sample::Index>(),
    ) {
        let log = log_of(raws, &jitter);
        let raws: Vec<Raw> = log.iter().map(|(r, _)| r.clone()).collect();
        let expected = reference(&raws, width);
        let first = run(log.clone(), batches.clone(), workers, width, true, None);
        prop_assume!(!first.shards.is_empty());
        let snapshot = first.shards[pick.index(first.shards.len())].clone();
        let at = snapshot.frontier;
        // What the first run had emitted by then: the windows that had closed.
        let mut records: Vec<_> = first
            .records
            .into_iter()
            .filter(|(_, start, _)| start + width <= at)
            .collect();
        let resume = Resume {
            restored: snapshot.records,
            restored_at: at,
            written_before: 0,
            definition: 0,
        };
        records.extend(run(log, batches, workers, width, false, Some(resume)).records);
        prop_assert_eq!(by_id(records, true)?, expected);
    }
}
