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
use sightline_operators::funnel::Resume;
use sightline_operators::triage::{TriageRules, triage};
use sightline_schemas::{
    DataSensitivity, Event, EventName, Kept, KeptValue, Label, Links, Measure, PiiClassification,
    Platform, PrivacyCounts, Source,
};
use timely::dataflow::operators::Inspect;

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
        let mut log: Vec<(Raw, u64)> = raws
            .into_iter()
            .enumerate()
            .map(|(i, mut r)| {
                r.id = i;
                let arrival = r.at_ms + jitter[i];
                (r, arrival)
            })
            .collect();
        let raws: Vec<Raw> = log.iter().map(|(r, _)| r.clone()).collect();
        let expected = reference(&raws, width);
        log.sort_by_key(|(r, arrival)| (*arrival, r.id));
        let (log, batches) = (Arc::new(log), Arc::new(batches));
        let got: Arc<Mutex<Records>> = Arc::default();
        let dupes: Arc<Mutex<usize>> = Arc::default();
        let (out, dup) = (Arc::clone(&got), Arc::clone(&dupes));
        timely::execute(timely::Config::process(workers), move |worker| {
            let windows = Windows::new(width);
            let (out, dup) = (Arc::clone(&out), Arc::clone(&dup));
            let rules = TriageRules { recent_errors_ms: SPAN, ..TriageRules::default() };
            let mut input = worker.dataflow::<u64, _, _>(|scope| {
                let (input, events) = scope.new_collection::<Event, isize>();
                triage(events, rules, windows, Resume::default(), None).0.inspect(move |w| {
                    for (record, n) in &w.entries {
                        assert_eq!(*n, 1);
                        let errors = record.errors.iter().map(|(_, _, c)| c.as_deref().unwrap_or("").to_owned()).collect();
                        if out.lock().unwrap().insert(record.context.event_id.clone(), (w.window_start_ms, errors)).is_some() {
                            *dup.lock().unwrap() += 1;
                        }
                    }
                });
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
        prop_assert_eq!(*dupes.lock().unwrap(), 0, "a record came out twice");
        prop_assert_eq!(&*got.lock().unwrap(), &expected);
    }
}
