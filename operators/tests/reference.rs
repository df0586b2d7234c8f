#![allow(clippy::unwrap_used, clippy::type_complexity)]

//! Every aggregate against a naive reference model.
//!
//! Random events, random retracted "noise" events, random dead letters; random worker
//! counts, arrival orders and batchings through the real dataflow (`close_windows` over each
//! aggregate); compared with a from-scratch batch computation over the surviving input.
//! Counts and sums must match exactly; quantiles within the histogram's stated 1%.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use differential_dataflow::input::Input;
use proptest::prelude::*;
use sightline_operators::product::{
    ProductKey, Tally, command_queue, feedback, integration_health,
};
use sightline_operators::route::route_aggregates;
use sightline_operators::select::{Names, Subscriber, select};
use sightline_operators::{
    ClosedWindow, CountKey, Counted, LatencyHistogram, LatencyKey, Outcome, QualityCounts,
    QualityKey, VariantKey, Windows, close_windows, event_counts, histogram::RELATIVE_ACCURACY,
    latency, latency_by_variant, quality,
};
use sightline_schemas::{
    DataSensitivity, DeadLetter, Event, EventName, FailureKind, Kept, KeptValue, Label, Measure,
    Origin, PiiClassification, Platform, PrivacyCounts, Source,
};
use timely::dataflow::operators::Inspect;

const TICK: u64 = 1000;
const BASE: u64 = 1_769_178_600_000;

fn arb_event() -> impl Strategy<Value = Event> {
    let names: Vec<EventName> = EventName::all().collect();
    (
        0u64..300_000,
        proptest::sample::select(names),
        proptest::sample::select(vec!["projects", "integrations", "command_queue"]),
        proptest::option::of(proptest::sample::select(vec!["page", "/api/x"])),
        proptest::option::of(0u64..5_000_000_000),
        proptest::option::of(proptest::sample::select(vec!["control", "treatment"])),
        proptest::option::of(proptest::sample::select(vec!["control", "a", "b"])),
        (0u16..4, 0u16..2, 0u16..3),
        proptest::sample::select(vec![1.0, 1.0, 0.5, 0.1, 0.0123]),
        proptest::option::of((proptest::sample::select(vec!["crm", "mail"]), 1u8..6)),
    )
        .prop_map(
            |(
                offset,
                name,
                area,
                surface,
                latency,
                e1,
                e2,
                (pseudonymized, scrubbed, dropped),
                rate,
                kept,
            )| {
                // What the product aggregates read (their groups, scores and status codes),
                // on some events; every name may carry it, as a schema could keep it.
                let kept = kept.map_or_else(Kept::default, |(group, score)| {
                    let label = |v: &str| KeptValue::Label(Label::from(v));
                    let measure = |v: i64| KeptValue::Measure(Measure(v * 1_000_000));
                    Kept::new(vec![
                        (Label::from("action_type"), label(group)),
                        (Label::from("integration"), label(group)),
                        (Label::from("service"), label(group)),
                        (Label::from("dismiss_reason"), label("not_relevant")),
                        (Label::from("aps_score"), measure(i64::from(score) * 10)),
                        (Label::from("score"), measure(i64::from(score))),
                        (
                            Label::from("status_code"),
                            measure(if score == 5 { 429 } else { 500 }),
                        ),
                    ])
                });
                let mut experiments: Vec<(sightline_schemas::Label, sightline_schemas::Label)> =
                    Vec::new();
                if let Some(v) = e1 {
                    experiments.push(("exp_1".into(), v.into()));
                }
                if let Some(v) = e2 {
                    experiments.push(("exp_2".into(), v.into()));
                }
                Event {
                    event_time_ms: (BASE + offset) as i64,
                    event_name: name,
                    event_type: name.spec().event_type,
                    event_id: format!("id-{offset}"),
                    source: Source::Server,
                    platform: Platform::Web,
                    app_version: "1".into(),
                    tenant_id: "t".try_into().unwrap(),
                    user_id: "u".try_into().unwrap(),
                    session_id: "s".try_into().unwrap(),
                    links: Default::default(),
                    user_role: None,
                    country: None,
                    kept,
                    feature_area: area.into(),
                    workflow_name: None,
                    surface: surface.map(Into::into),
                    experiment_assignments: experiments.into(),
                    pii_classification: PiiClassification::None,
                    data_sensitivity: DataSensitivity::Internal,
                    weight_micros: sightline_schemas::weight_of_rate(rate),
                    latency_us: latency,
                    privacy: PrivacyCounts {
                        pseudonymized,
                        scrubbed,
                        dropped,
                    },
                }
            },
        )
}

fn arb_dead() -> impl Strategy<Value = (DeadLetter, u64)> {
    (
        0u64..300,
        proptest::sample::select(FailureKind::ALL.to_vec()),
        proptest::option::of(proptest::sample::select(vec!["task_assigned", "mystery"])),
        0i64..1000,
    )
        .prop_map(|(tick, kind, name, offset)| {
            let dead = DeadLetter {
                kind,
                reason: format!("{kind:?}"),
                event_name: name.map(str::to_string),
                event_time_ms: None,
                origin: Origin {
                    topic: "t".into(),
                    partition: 0,
                    offset,
                },
                payload_bytes: 10,
                schema_version: None,
                violations: Vec::new(),
                payload: None,
                restricted: false,
            };
            (dead, BASE + tick * TICK)
        })
}

type Captured<K, R> = Arc<Mutex<Vec<ClosedWindow<K, R>>>>;

#[derive(Default, Clone)]
struct Outputs {
    counts: Captured<CountKey, Counted>,
    latency: Captured<LatencyKey, LatencyHistogram>,
    variants: Captured<VariantKey, LatencyHistogram>,
    quality: Captured<QualityKey, QualityCounts>,
    command_queue: Captured<ProductKey, Tally>,
    feedback: Captured<ProductKey, Tally>,
    integrations: Captured<ProductKey, Tally>,
}

/// Captures each closed window of `stream` into `into`.
fn capture<'s, K: Clone + 'static, R: Clone + 'static>(
    stream: timely::dataflow::StreamVec<'s, u64, ClosedWindow<K, R>>,
    into: &Captured<K, R>,
) {
    let into = into.clone();
    stream.inspect(move |w| into.lock().unwrap().push(w.clone()));
}

/// Flattens the closed windows of every worker into one map, checking that no key of a
/// window was emitted twice and that every key lies in the window it was emitted with.
fn flatten<K: Ord + Clone + std::fmt::Debug + sightline_operators::WindowKey, R: Clone>(
    captured: &Captured<K, R>,
) -> BTreeMap<K, R> {
    let mut out = BTreeMap::new();
    for window in captured.lock().unwrap().iter() {
        for (key, value) in &window.entries {
            assert_eq!(key.window_start_ms(), window.window_start_ms);
            assert!(
                out.insert(key.clone(), value.clone()).is_none(),
                "key {key:?} emitted twice"
            );
        }
    }
    out
}

fn tick_of(e: &Event) -> u64 {
    e.event_time_ms as u64 / TICK * TICK
}

/// Feeds the updates through the real dataflow on `workers` threads.
fn run_dataflow(
    workers: usize,
    width: u64,
    updates: Vec<(Event, u64, isize)>,
    dead: Vec<(DeadLetter, u64)>,
    batches: Vec<usize>,
) -> (Outputs, Outputs) {
    let outputs = Outputs::default();
    let fused_outputs = Outputs::default();
    let shared = (outputs.clone(), fused_outputs.clone());
    // One time-ordered stream of input actions, cut into batches of the given sizes.
    let mut actions: Vec<(u64, Result<(Event, isize), DeadLetter>)> = updates
        .into_iter()
        .map(|(e, t, r)| (t, Ok((e, r))))
        .chain(dead.into_iter().map(|(d, t)| (t, Err(d))))
        .collect();
    actions.sort_by_key(|a| a.0);
    let actions = Arc::new(actions);
    let batches = Arc::new(batches);
    timely::execute(timely::Config::process(workers), move |worker| {
        let windows = Windows::new(width);
        let (out, fused) = shared.clone();
        let (mut events_in, mut dead_in) = worker.dataflow::<u64, _, _>(|scope| {
            let (events_in, events) = scope.new_collection::<Event, isize>();
            let (dead_in, dead) = scope.new_collection::<DeadLetter, isize>();
            // Each aggregate alone, and all of them in one pass (what the pipeline runs).
            capture(
                close_windows(event_counts(events.clone(), windows), windows, "c"),
                &out.counts,
            );
            capture(
                close_windows(latency(events.clone(), windows), windows, "l"),
                &out.latency,
            );
            capture(
                close_windows(latency_by_variant(events.clone(), windows), windows, "v"),
                &out.variants,
            );
            capture(
                close_windows(quality(events.clone(), dead.clone(), windows), windows, "q"),
                &out.quality,
            );
            capture(
                close_windows(command_queue(events.clone(), windows), windows, "cq"),
                &out.command_queue,
            );
            capture(
                close_windows(feedback(events.clone(), windows), windows, "f"),
                &out.feedback,
            );
            capture(
                close_windows(integration_health(events.clone(), windows), windows, "i"),
                &out.integrations,
            );
            let all = route_aggregates(events, dead, windows, "test");
            capture(all.event_counts, &fused.counts);
            capture(all.latency, &fused.latency);
            capture(all.latency_by_variant, &fused.variants);
            capture(all.quality, &fused.quality);
            capture(all.command_queue, &fused.command_queue);
            capture(all.feedback, &fused.feedback);
            capture(all.integrations, &fused.integrations);
            (events_in, dead_in)
        });
        let (index, peers) = (worker.index(), worker.peers());
        let mut position = 0;
        let mut batch = 0;
        while position < actions.len() {
            let size = batches[batch % batches.len()].max(1);
            batch += 1;
            let end = (position + size).min(actions.len());
            // Within a batch, workers take every peers-th action, in reverse order on odd batches.
            let mut mine: Vec<usize> = (position..end).filter(|i| i % peers == index).collect();
            if batch % 2 == 1 {
                mine.reverse();
            }
            for i in mine {
                let (time, action) = &actions[i];
                match action {
                    Ok((event, diff)) => events_in.update_at(event.clone(), *time, *diff),
                    Err(d) => dead_in.update_at(d.clone(), *time, 1),
                }
            }
            if end < actions.len() {
                let next = actions[end].0;
                events_in.advance_to(next);
                dead_in.advance_to(next);
            }
            events_in.flush();
            dead_in.flush();
            worker.step();
            position = end;
        }
    })
    .unwrap();
    (outputs, fused_outputs)
}

fn within(got: f64, exact: f64) -> bool {
    (got - exact).abs() <= RELATIVE_ACCURACY * exact * (1.0 + 1e-9) + 1e-9
}

/// `h` holds `samples` (value µs, weight millionths): raw count and sum exactly, total weight
/// exactly, and each quantile within 1% of the sample at weighted rank ⌊q·(N̂−1)⌋ (the first
/// sample, in value order, whose cumulative weight passes that many events).
fn check_histogram(h: &LatencyHistogram, samples: &mut [(u64, u64)]) -> Result<(), TestCaseError> {
    samples.sort_unstable();
    prop_assert_eq!(h.count, samples.len() as i64);
    prop_assert_eq!(
        h.sum_us,
        samples.iter().map(|&(s, _)| i128::from(s)).sum::<i128>()
    );
    let one = i128::from(sightline_schemas::WEIGHT_ONE);
    let total: i128 = samples.iter().map(|&(_, w)| i128::from(w)).sum();
    prop_assert_eq!(i128::from(h.weight_micros()), total);
    for q in [0.5, 0.9, 0.95, 0.99, 1.0] {
        let rank = (q * ((total - one).max(0) as f64 / one as f64)).floor() as i128 * one;
        let mut seen = 0i128;
        let exact = samples
            .iter()
            .find(|&&(_, w)| {
                seen += i128::from(w);
                seen > rank
            })
            .map_or(samples[samples.len() - 1].0, |&(s, _)| s) as f64;
        let got = h.quantile(q).unwrap_or(f64::NAN);
        prop_assert!(within(got, exact), "q {} got {} exact {}", q, got, exact);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn aggregates_match_the_reference(
        events in proptest::collection::vec(arb_event(), 0..250),
        noise in proptest::collection::vec((arb_event(), 0u64..10), 0..40),
        dead in proptest::collection::vec(arb_dead(), 0..30),
        batches in proptest::collection::vec(1usize..60, 1..10),
        workers in 1usize..=3,
        width in proptest::sample::select(vec![1_000u64, 5_000, 60_000]),
    ) {
        let windows = Windows::new(width);
        let mut updates: Vec<(Event, u64, isize)> = events.iter().map(|e| (e.clone(), tick_of(e), 1)).collect();
        for (e, later) in &noise {
            // Inserted, then retracted a few ticks later within the same window.
            let t = tick_of(e);
            let last_tick = windows.end_of(windows.start_of(t)) - TICK;
            updates.push((e.clone(), t, 1));
            updates.push((e.clone(), (t + later * TICK).min(last_tick), -1));
        }
        let (out, fused) = run_dataflow(workers, width, updates, dead.clone(), batches);
        // The pipeline's one-pass operator computes exactly what the aggregates compute alone.
        prop_assert_eq!(flatten(&fused.counts), flatten(&out.counts));
        prop_assert_eq!(flatten(&fused.latency), flatten(&out.latency));
        prop_assert_eq!(flatten(&fused.variants), flatten(&out.variants));
        prop_assert_eq!(flatten(&fused.quality), flatten(&out.quality));
        prop_assert_eq!(flatten(&fused.command_queue), flatten(&out.command_queue));
        prop_assert_eq!(flatten(&fused.feedback), flatten(&out.feedback));
        prop_assert_eq!(flatten(&fused.integrations), flatten(&out.integrations));

        // event_counts
        let mut want_counts: BTreeMap<CountKey, Counted> = BTreeMap::new();
        for e in &events {
            let key = CountKey { window_start_ms: windows.start_of(e.event_time_ms as u64), event_name: e.event_name, event_type: e.event_type, feature_area: e.feature_area.clone() };
            let c = want_counts.entry(key).or_default();
            c.count += 1;
            c.weighted_micros += e.weight_micros as i64;
        }
        prop_assert_eq!(flatten(&out.counts), want_counts);

        // latency
        let mut want_latency: BTreeMap<LatencyKey, Vec<(u64, u64)>> = BTreeMap::new();
        let mut want_variants: BTreeMap<VariantKey, Vec<(u64, u64)>> = BTreeMap::new();
        for e in &events {
            let Some(l) = e.latency_us else { continue };
            let window_start_ms = windows.start_of(e.event_time_ms as u64);
            want_latency.entry(LatencyKey { window_start_ms, event_name: e.event_name, feature_area: e.feature_area.clone(), surface: e.surface.clone().unwrap_or_default() }).or_default().push((l, e.weight_micros));
            for (experiment_id, variant) in e.experiment_assignments.iter() {
                want_variants.entry(VariantKey { window_start_ms, event_name: e.event_name, experiment_id: experiment_id.clone(), variant: variant.clone() }).or_default().push((l, e.weight_micros));
            }
        }
        let got_latency = flatten(&out.latency);
        prop_assert_eq!(got_latency.keys().collect::<Vec<_>>(), want_latency.keys().collect::<Vec<_>>());
        for (key, mut samples) in want_latency {
            check_histogram(&got_latency[&key], &mut samples)?;
        }
        let got_variants = flatten(&out.variants);
        prop_assert_eq!(got_variants.keys().collect::<Vec<_>>(), want_variants.keys().collect::<Vec<_>>());
        for (key, mut samples) in want_variants {
            check_histogram(&got_variants[&key], &mut samples)?;
        }

        // quality
        let mut want_quality: BTreeMap<QualityKey, isize> = BTreeMap::new();
        let mut want_weighted: BTreeMap<QualityKey, i64> = BTreeMap::new();
        for e in &events {
            let key = |outcome| QualityKey { window_start_ms: windows.start_of(e.event_time_ms as u64), event_name: e.event_name.as_str().into(), outcome };
            *want_quality.entry(key(Outcome::Accepted)).or_default() += 1;
            *want_weighted.entry(key(Outcome::Accepted)).or_default() += e.weight_micros as i64;
            let p = e.privacy;
            for (outcome, n) in [
                (Outcome::PseudonymizedFields, p.pseudonymized),
                (Outcome::ScrubbedFields, p.scrubbed),
                (Outcome::DroppedFields, p.dropped),
                (Outcome::PiiViolations, u16::from(p.scrubbed > 0 || p.dropped > 0)),
            ] {
                if n > 0 {
                    *want_quality.entry(key(outcome)).or_default() += isize::from(n as i16);
                }
            }
        }
        for (d, t) in &dead {
            let name = d.event_name.clone().unwrap_or_else(|| "unknown".into());
            let key = QualityKey { window_start_ms: windows.start_of(*t), event_name: name.into(), outcome: Outcome::Rejected(d.kind) };
            *want_weighted.entry(key.clone()).or_default() += sightline_schemas::WEIGHT_ONE as i64;
            *want_quality.entry(key).or_default() += 1;
        }
        // The quality difference carries records and privacy counters; spread it out by outcome.
        let mut got_quality: BTreeMap<QualityKey, isize> = BTreeMap::new();
        let mut got_weighted: BTreeMap<QualityKey, i64> = BTreeMap::new();
        for (key, counts) in flatten(&out.quality) {
            if counts.records != 0 {
                got_quality.insert(key.clone(), counts.records as isize);
                got_weighted.insert(key.clone(), counts.weighted_micros);
            }
            for (outcome, n) in counts.privacy_counters() {
                if n != 0 {
                    got_quality.insert(QualityKey { outcome, ..key.clone() }, n as isize);
                }
            }
        }
        prop_assert_eq!(got_quality, want_quality);
        prop_assert_eq!(got_weighted, want_weighted);
    }
}

/// The events [`select`] gives each subscriber, as `(event_id, time)` pairs with their
/// differences, in a sorted list per subscriber.
fn run_select(
    workers: usize,
    events: Vec<(Event, u64, isize)>,
    subscribers: Vec<Subscriber>,
) -> Vec<Vec<(String, u64, isize)>> {
    let got: Arc<Mutex<Vec<Vec<(String, u64, isize)>>>> =
        Arc::new(Mutex::new(vec![Vec::new(); subscribers.len()]));
    let shared = Arc::clone(&got);
    let events = Arc::new(events);
    timely::execute(timely::Config::process(workers), move |worker| {
        let out = Arc::clone(&shared);
        let subscribers = subscribers.clone();
        let mut input = worker.dataflow::<u64, _, _>(|scope| {
            let (input, collection) = scope.new_collection::<Arc<Event>, isize>();
            for (i, stream) in select(collection.inner, &subscribers)
                .into_iter()
                .enumerate()
            {
                let out = Arc::clone(&out);
                stream.inspect(move |(e, t, d)| {
                    out.lock().unwrap()[i].push((e.event_id.clone(), *t, *d));
                });
            }
            input
        });
        let (index, peers) = (worker.index(), worker.peers());
        for (i, (event, time, diff)) in events.iter().enumerate() {
            if i % peers == index {
                input.update_at(Arc::new(event.clone()), *time, *diff);
            }
        }
        input.close();
    })
    .unwrap();
    let mut got = Arc::try_unwrap(got).unwrap().into_inner().unwrap();
    for list in &mut got {
        list.sort();
    }
    got
}

fn arb_subscriber() -> impl Strategy<Value = Subscriber> {
    let names: Vec<EventName> = EventName::all().collect();
    let count = names.len();
    (
        proptest::option::of(any::<bool>()),
        proptest::option::of(proptest::sample::subsequence(names, 0..count)),
    )
        .prop_map(|(restricted, names)| Subscriber {
            restricted,
            names: names.map_or(Names::All, Names::Only),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Each subscriber gets exactly the events of its route and names, each once, with its
    /// time and difference: a filter per subscriber is the reference.
    #[test]
    fn select_gives_each_subscriber_exactly_its_events(
        events in proptest::collection::vec((arb_event(), any::<bool>(), 0u64..50, -2isize..3), 0..120),
        subscribers in proptest::collection::vec(arb_subscriber(), 1..12),
        workers in 1usize..3,
    ) {
        let events: Vec<(Event, u64, isize)> = events
            .into_iter()
            .filter(|(_, _, _, d)| *d != 0)
            .enumerate()
            .map(|(i, (mut e, restricted, t, d))| {
                e.event_id = format!("e{i}");
                if restricted {
                    e.data_sensitivity = DataSensitivity::Restricted;
                }
                (e, t, d)
            })
            .collect();
        let got = run_select(workers, events.clone(), subscribers.clone());
        for (s, got) in subscribers.iter().zip(got) {
            let mut want: Vec<(String, u64, isize)> = events
                .iter()
                .filter(|(e, _, _)| {
                    s.restricted.is_none_or(|r| r == e.is_restricted())
                        && match &s.names {
                            Names::All => true,
                            Names::Only(names) => names.contains(&e.event_name),
                        }
                })
                .map(|(e, t, d)| (e.event_id.clone(), *t, *d))
                .collect();
            want.sort();
            prop_assert_eq!(got, want);
        }
    }
}

/// The names the product tables read are all in the catalog.
#[test]
fn the_product_tables_name_catalog_events() {
    use sightline_operators::product::{COMMAND_QUEUE_EVENTS, FEEDBACK_EVENTS, INTEGRATION_EVENTS};
    for names in [
        &COMMAND_QUEUE_EVENTS[..],
        &INTEGRATION_EVENTS[..],
        &FEEDBACK_EVENTS[..],
    ] {
        for name in names {
            assert!(
                EventName::from_name(name).is_some(),
                "{name} is not in the catalog"
            );
        }
    }
}
