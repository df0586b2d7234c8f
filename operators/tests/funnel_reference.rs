#![allow(clippy::unwrap_used, clippy::type_complexity)]

//! The funnel operator against a naive reference model.
//!
//! Random funnels (2–4 steps, repeated step events, all three order modes, exclusions,
//! breakdowns by platform and experiment or by experiment only), random event logs of a few units with repeats,
//! ties and events of both routes; events arrive out of order within an allowed lateness, in
//! random batches, on 1–3 workers. The reference enumerates every chain explicitly from the
//! semantics in `sightline_operators::funnel` (it shares no code with the operator); unit
//! counts and time-to-convert sums must match exactly, quantiles within the histogram's 1%.
//! The funnel invariants (no step above the one before, conversion in [0, 1]) are checked on
//! the operator's output.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use differential_dataflow::input::Input;
use proptest::prelude::*;
use sightline_operators::funnel::{
    Breakdown, Exclusion, Field, FunnelDef, FunnelKey, FunnelResume, Matcher, Order, Resume,
    SavedFunnel, StateHooks, funnels,
};
use sightline_operators::state::StateShard;
use sightline_operators::{ClosedWindow, LatencyHistogram, Windows, histogram::RELATIVE_ACCURACY};
use sightline_schemas::{
    DataSensitivity, Event, EventName, Label, Links, PiiClassification, Platform, PrivacyCounts,
    Source,
};
use timely::dataflow::operators::Inspect;
use timely::dataflow::operators::Probe;
use timely::dataflow::operators::probe::Handle as ProbeHandle;

const TICK: u64 = 1000;
const BASE: u64 = 1_769_178_600_000;
/// Event names the logs draw from: the first three can be steps, the fourth an exclusion, the
/// fifth is never part of a funnel.
const NAMES: [&str; 5] = [
    "project_viewed",
    "project_created",
    "task_assigned",
    "project_creation_error",
    "signal_received",
];

fn name(i: usize) -> EventName {
    EventName::from_name(NAMES[i]).unwrap()
}

#[derive(Clone, Debug)]
struct Raw {
    unit: u64,
    at_ms: u64,
    name: usize,
    restricted: bool,
    platform: Platform,
    variant: Option<&'static str>,
    /// The event's Horvitz–Thompson weight (1 / `sample_rate`: 1, 2 or 4).
    weight: u64,
    id: u32,
}

/// The assignment list of a variant, one list per variant shared by every event that has it,
/// as the decoder hands them out (the operator looks breakdowns up by the list's address).
fn assignments_of(variant: Option<&'static str>) -> Arc<[(Label, Label)]> {
    thread_local! {
        static LISTS: std::cell::RefCell<BTreeMap<Option<&'static str>, Arc<[(Label, Label)]>>> =
            Default::default();
    }
    LISTS.with(|lists| {
        lists
            .borrow_mut()
            .entry(variant)
            .or_insert_with(|| {
                variant
                    .map(|v| vec![(Label::from("exp_1"), Label::from(v))])
                    .unwrap_or_default()
                    .into()
            })
            .clone()
    })
}

fn event_of(raw: &Raw) -> Event {
    Event {
        event_time_ms: raw.at_ms as i64,
        event_name: name(raw.name),
        event_type: name(raw.name).spec().event_type,
        event_id: format!("id-{}", raw.id),
        source: Source::Server,
        platform: raw.platform,
        app_version: "1".into(),
        tenant_id: "t".try_into().unwrap(),
        user_id: "u".try_into().unwrap(),
        session_id: "s".try_into().unwrap(),
        links: Links {
            tenant: 0,
            user: raw.unit,
            session: 0,
        },
        user_role: None,
        country: None,
        kept: Default::default(),
        feature_area: "projects".into(),
        workflow_name: None,
        surface: None,
        experiment_assignments: assignments_of(raw.variant),
        pii_classification: PiiClassification::None,
        data_sensitivity: if raw.restricted {
            DataSensitivity::Restricted
        } else {
            DataSensitivity::Internal
        },
        weight_micros: raw.weight * sightline_schemas::WEIGHT_ONE,
        latency_us: None,
        privacy: PrivacyCounts::default(),
    }
}

fn arb_raw() -> impl Strategy<Value = Raw> {
    (
        1u64..=4,
        // Quarter-second steps over 8 minutes: ties within a millisecond and within a tick.
        0u64..1920,
        0usize..5,
        proptest::bool::weighted(0.15),
        proptest::sample::select(vec![Platform::Web, Platform::Ios]),
        proptest::option::of(proptest::sample::select(vec!["control", "treatment"])),
        prop_oneof![3 => Just(1u64), 1 => Just(2), 1 => Just(4)],
    )
        .prop_map(
            |(unit, q, name, restricted, platform, variant, weight)| Raw {
                unit,
                at_ms: BASE + q * 250,
                name,
                restricted,
                platform,
                variant,
                weight,
                id: 0,
            },
        )
}

fn arb_def() -> impl Strategy<Value = FunnelDef> {
    (
        proptest::collection::vec(0usize..3, 2..=4),
        proptest::sample::select(vec![Order::Ordered, Order::Strict, Order::Unordered]),
        proptest::sample::select(vec![30_000u64, 90_000, 240_000]),
        proptest::option::of((1usize..4, 1usize..4)),
        // With the platform breakdown, or by experiments only (whose values the operator looks
        // up by assignment list).
        proptest::bool::ANY,
    )
        .prop_map(|(steps, order, window_ms, exclusion, by_platform)| {
            let n = steps.len();
            let exclusions = exclusion
                .map(|(a, b)| {
                    let (from, to) = match order {
                        Order::Unordered => (1, n),
                        _ => {
                            let from = 1 + a % (n - 1);
                            (from, from + 1 + b % (n - from))
                        }
                    };
                    Exclusion {
                        matcher: Matcher {
                            event: name(3),
                            filters: Vec::new(),
                        },
                        from_step: from,
                        to_step: to,
                    }
                })
                .into_iter()
                .collect();
            FunnelDef {
                name: "f".into(),
                unit: Field::UserId,
                steps: steps
                    .into_iter()
                    .map(|s| Matcher {
                        event: name(s),
                        filters: Vec::new(),
                    })
                    .collect(),
                window_ms,
                order,
                exclusions,
                breakdowns: if by_platform {
                    vec![Breakdown::Field(Field::Platform), Breakdown::Experiments]
                } else {
                    vec![Breakdown::Experiments]
                },
            }
        })
}

/// A row of the output: (restricted, window start, breakdown, value, step).
type Row = (bool, u64, String, String, u8);

/// The reference: every chain, enumerated.
/// Per row, each unit's (time to convert, weight). A unit's weight at step k is the largest of
/// its window's first step-1 event's weight and the weights of the events that, earliest in
/// its sequence, completed a chain to steps 2…k.
fn reference(def: &FunnelDef, width: u64, log: &[Raw]) -> BTreeMap<Row, Vec<(u64, u64)>> {
    let windows = Windows::new(width);
    let n = def.steps.len();
    let step_name = |s: usize| def.steps[s].event;
    let matches = |r: &Raw, s: usize| name(r.name) == step_name(s);
    let excluded = |r: &Raw| {
        def.exclusions
            .iter()
            .any(|x| x.matcher.event == name(r.name))
    };
    let order_key = |r: &Raw| {
        (
            r.at_ms,
            sightline_operators::funnel::fnv1a(format!("id-{}", r.id).as_bytes()),
        )
    };
    let mut out: BTreeMap<Row, Vec<(u64, u64)>> = BTreeMap::new();
    let mut units: BTreeMap<(bool, u64), Vec<&Raw>> = BTreeMap::new();
    for r in log {
        units.entry((r.restricted, r.unit)).or_default().push(r);
    }
    for ((restricted, _), mut seq) in units {
        seq.sort_by_key(|r| order_key(r));
        if def.order != Order::Strict {
            // Only step and exclusion events take part.
            seq.retain(|r| (0..n).any(|s| matches(r, s)) || excluded(r));
        }
        let mut by_window: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, r) in seq.iter().enumerate() {
            if matches(r, 0) {
                by_window
                    .entry(windows.start_of(r.at_ms))
                    .or_default()
                    .push(i);
            }
        }
        for (start, firsts) in by_window {
            // best[k]: shortest time to step k + 1 over the window's chains.
            let mut best: Vec<Option<u64>> = vec![None; n];
            // earliest[k]: the first position in the sequence completing a chain to step k + 1.
            let mut earliest: Vec<Option<usize>> = vec![None; n];
            for &i in &firsts {
                let t1 = seq[i].at_ms;
                let deadline = t1 + def.window_ms;
                let later: Vec<usize> = (i + 1..seq.len())
                    .filter(|&j| seq[j].at_ms <= deadline)
                    .collect();
                let mut record = |k: usize, j: usize| {
                    let t = seq[j].at_ms - t1;
                    best[k] = Some(best[k].map_or(t, |b: u64| b.min(t)));
                    earliest[k] = Some(earliest[k].map_or(j, |e: usize| e.min(j)));
                };
                record(0, i);
                match def.order {
                    Order::Ordered => {
                        // Every chain: positions p[0] = i < p[1] < … matching steps 1, 2, ….
                        let mut stack: Vec<Vec<usize>> = vec![vec![i]];
                        while let Some(chain) = stack.pop() {
                            let k = chain.len();
                            if k == n {
                                continue;
                            }
                            let last = *chain.last().unwrap();
                            for &j in later.iter().filter(|&&j| j > last) {
                                if !matches(seq[j], k) {
                                    continue;
                                }
                                let mut next = chain.clone();
                                next.push(j);
                                let broken = def.exclusions.iter().any(|x| {
                                    x.to_step <= next.len()
                                        && (next[x.from_step - 1] + 1..next[x.to_step - 1])
                                            .any(|m| excluded(seq[m]))
                                });
                                if !broken {
                                    record(k, j);
                                    stack.push(next);
                                }
                            }
                        }
                    }
                    Order::Strict => {
                        let mut k = 1;
                        while k < n && i + k < seq.len() {
                            let r = seq[i + k];
                            if r.at_ms > deadline || !matches(r, k) {
                                break;
                            }
                            record(k, i + k);
                            k += 1;
                        }
                    }
                    Order::Unordered => {
                        // Events up to the first exclusion; for each prefix, the most distinct
                        // steps among 2..n its events can cover (brute force).
                        let usable: Vec<usize> = later
                            .iter()
                            .copied()
                            .take_while(|&j| !excluded(seq[j]))
                            .collect();
                        for end in 0..usable.len() {
                            let prefix = &usable[..=end];
                            let covered =
                                most_steps(&|j: usize, s: usize| matches(seq[j], s), prefix, n);
                            for k in 1..=covered {
                                record(k, usable[end]);
                            }
                        }
                    }
                }
            }
            let first = seq[firsts[0]];
            let mut pairs = vec![("all".to_string(), "all".to_string())];
            if def.breakdowns.contains(&Breakdown::Field(Field::Platform)) {
                pairs.push((
                    "platform".into(),
                    format!("{:?}", first.platform).to_lowercase(),
                ));
            }
            if let Some(v) = first.variant {
                pairs.push(("experiment:exp_1".into(), v.into()));
            }
            let reached = best.iter().take_while(|b| b.is_some()).count();
            let mut weights = vec![first.weight; n];
            for k in 1..reached {
                let completing = earliest[k].map_or(1, |j| seq[j].weight);
                weights[k] = weights[k - 1].max(completing);
            }
            for (b, v) in pairs {
                for (k, t) in best.iter().take(reached).enumerate() {
                    out.entry((restricted, start, b.clone(), v.clone(), (k + 1) as u8))
                        .or_default()
                        .push((t.unwrap(), weights[k]));
                }
            }
        }
    }
    out
}

/// The most distinct steps among `1..n` (0-based) that distinct events of `events` can match.
fn most_steps(matches: &dyn Fn(usize, usize) -> bool, events: &[usize], n: usize) -> usize {
    fn go(
        matches: &dyn Fn(usize, usize) -> bool,
        events: &[usize],
        n: usize,
        used: &mut Vec<bool>,
    ) -> usize {
        let Some((&first, rest)) = events.split_first() else {
            return 0;
        };
        let mut best = go(matches, rest, n, used);
        for s in 1..n {
            if !used[s] && matches(first, s) {
                used[s] = true;
                best = best.max(1 + go(matches, rest, n, used));
                used[s] = false;
            }
        }
        best
    }
    go(matches, events, n, &mut vec![false; n])
}

type Captured = Arc<Mutex<Vec<ClosedWindow<FunnelKey, LatencyHistogram>>>>;
type Shards = Arc<Mutex<Vec<StateShard<SavedFunnel>>>>;

/// What a run emitted: its closed windows and, when it saved state, its snapshots.
struct Outcome {
    closed: Vec<ClosedWindow<FunnelKey, LatencyHistogram>>,
    shards: Vec<StateShard<SavedFunnel>>,
}

/// Runs the operator on `workers` threads; events arrive in the order of their `arrival`
/// key, in batches, with the input frontier `lateness` behind. With `save`, state is saved
/// at every frontier it reaches (the outputs count as written when emitted); with `resume`,
/// the run starts from that saved state (given to worker 0, as the pipeline does).
#[allow(clippy::too_many_arguments)]
fn run(
    def: FunnelDef,
    width: u64,
    mut log: Vec<(Raw, u64)>,
    lateness: u64,
    batches: Vec<usize>,
    workers: usize,
    save: bool,
    resume: Option<FunnelResume>,
) -> Outcome {
    let captured: Captured = Arc::default();
    let shards: Shards = Arc::default();
    let (shared, shared_shards) = (captured.clone(), shards.clone());
    log.sort_by_key(|(r, arrival)| (*arrival, r.id));
    let log = Arc::new(log);
    let batches = Arc::new(batches);
    timely::execute(timely::Config::process(workers), move |worker| {
        let windows = Windows::new(width);
        let out = shared.clone();
        let out_shards = shared_shards.clone();
        let defs: Arc<[FunnelDef]> = Arc::from(vec![def.clone()]);
        let hooks = save.then(|| StateHooks {
            every_ms: 1,
            outputs: ProbeHandle::new(),
            durable: ProbeHandle::new(),
            flush: Arc::default(),
        });
        let resume: Vec<FunnelResume> = resume
            .iter()
            .map(|r| Resume {
                restored: if worker.index() == 0 {
                    r.restored.clone()
                } else {
                    Vec::new()
                },
                ..r.clone()
            })
            .collect();
        let mut input = worker.dataflow::<u64, _, _>(|scope| {
            let (input, events) = scope.new_collection::<Event, isize>();
            let f = funnels(events, defs, windows, &resume, hooks.as_ref());
            let closed = f
                .closed
                .inspect(move |w| out.lock().unwrap().push(w.clone()));
            if let (Some(hooks), Some(state)) = (&hooks, f.state) {
                closed.probe_with(&hooks.outputs);
                state
                    .inspect(move |s| out_shards.lock().unwrap().push(s.clone()))
                    .probe_with(&hooks.durable);
            }
            input
        });
        let (index, peers) = (worker.index(), worker.peers());
        let mut position = 0;
        let mut batch = 0;
        while position < log.len() {
            let size = batches[batch % batches.len()].max(1);
            batch += 1;
            let end = (position + size).min(log.len());
            for i in (position..end).filter(|i| i % peers == index) {
                let raw = &log[i].0;
                input.update_at(event_of(raw), raw.at_ms / TICK * TICK, 1);
            }
            if end < log.len() {
                let frontier = log[end].1.saturating_sub(lateness) / TICK * TICK;
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
    let closed = captured.lock().unwrap().clone();
    let shards = shards.lock().unwrap().clone();
    Outcome { closed, shards }
}

/// The rows of `windows` by `(route, window, breakdown, value, step)`; a row emitted twice
/// must be the same both times (a restart writes again the windows not known written).
fn rows_of(
    windows: &[ClosedWindow<FunnelKey, LatencyHistogram>],
) -> Result<BTreeMap<Row, LatencyHistogram>, TestCaseError> {
    let mut got: BTreeMap<Row, LatencyHistogram> = BTreeMap::new();
    for w in windows {
        for (key, h) in &w.entries {
            prop_assert_eq!(key.window_start_ms, w.window_start_ms);
            let row = (
                key.restricted,
                key.window_start_ms,
                key.breakdown.to_string(),
                key.value.to_string(),
                key.step,
            );
            if let Some(before) = got.insert(row.clone(), h.clone()) {
                prop_assert_eq!(&before, h, "row {:?} emitted twice, differently", row);
            }
        }
    }
    Ok(got)
}

/// `got` is `expected` (exact counts, sums and weights, weighted medians within the
/// histogram's accuracy), and keeps the funnel invariants: no step above the one before;
/// conversion in [0, 1].
fn check(
    def: &FunnelDef,
    got: &BTreeMap<Row, LatencyHistogram>,
    expected: &BTreeMap<Row, Vec<(u64, u64)>>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "def {:?}",
        def
    );
    for (row, times) in expected {
        let h = &got[row];
        let mut times = times.clone();
        times.sort_unstable();
        prop_assert_eq!(h.count, times.len() as i64, "{:?}", row);
        prop_assert_eq!(
            h.sum_us,
            times
                .iter()
                .map(|&(t, _)| i128::from(t) * 1000)
                .sum::<i128>(),
            "{:?}",
            row
        );
        let weight: u64 = times.iter().map(|&(_, w)| w).sum();
        prop_assert_eq!(
            h.weighted_count(),
            weight as f64,
            "{:?}: weights {:?}",
            row,
            times
        );
        // A unit of weight w counts as w units: the median of the replicated times.
        let replicated: Vec<u64> = times
            .iter()
            .flat_map(|&(t, w)| std::iter::repeat_n(t, w as usize))
            .collect();
        let exact = replicated[(replicated.len() - 1) / 2] as f64 * 1000.0;
        let median = h.quantile(0.5).unwrap();
        prop_assert!((median - exact).abs() <= RELATIVE_ACCURACY * exact + 1e-6);
    }
    for ((r, w, b, v, step), h) in got {
        if *step > 1 {
            let previous = &got[&(*r, *w, b.clone(), v.clone(), step - 1)];
            prop_assert!(h.count <= previous.count);
            let entry = &got[&(*r, *w, b.clone(), v.clone(), 1)];
            let conversion = h.count as f64 / entry.count as f64;
            prop_assert!((0.0..=1.0).contains(&conversion));
        }
    }
    Ok(())
}

/// A log of `raws` with ids and arrival times (event time plus `jitter`).
fn log_of(raws: Vec<Raw>, jitter: &[u64]) -> Vec<(Raw, u64)> {
    raws.into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            r.id = i as u32;
            let arrival = r.at_ms + jitter[i];
            (r, arrival)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn funnels_match_the_reference(
        def in arb_def(),
        raws in proptest::collection::vec(arb_raw(), 0..60),
        jitter in proptest::collection::vec(0u64..20_000, 60),
        batches in proptest::collection::vec(1usize..20, 1..6),
        workers in 1usize..=3,
        width in proptest::sample::select(vec![10_000u64, 60_000]),
    ) {
        let lateness = 20_000;
        let log = log_of(raws, &jitter);
        let raws: Vec<Raw> = log.iter().map(|(r, _)| r.clone()).collect();
        let expected = reference(&def, width, &raws);
        let outcome = run(def.clone(), width, log, lateness, batches, workers, false, None);
        check(&def, &rows_of(&outcome.closed)?, &expected)?;
    }

    /// A run stopped after any of its snapshots and restarted from it (reading the whole log
    /// again, as a restart re-reads from its committed offsets) writes what one run writes.
    #[test]
    fn a_restart_from_any_snapshot_changes_nothing(
        def in arb_def(),
        raws in proptest::collection::vec(arb_raw(), 1..60),
        jitter in proptest::collection::vec(0u64..20_000, 60),
        batches in proptest::collection::vec(1usize..20, 1..6),
        workers in 1usize..=3,
        width in proptest::sample::select(vec![10_000u64, 60_000]),
        pick in any::<proptest::sample::Index>(),
    ) {
        let lateness = 20_000;
        let log = log_of(raws, &jitter);
        let raws: Vec<Raw> = log.iter().map(|(r, _)| r.clone()).collect();
        let expected = reference(&def, width, &raws);
        let first = run(def.clone(), width, log.clone(), lateness, batches.clone(), workers, true, None);
        prop_assume!(!first.shards.is_empty());
        let snapshot = first.shards[pick.index(first.shards.len())].clone();
        let at = snapshot.frontier;
        // What the first run had emitted by then: the windows whose horizon the frontier
        // had passed.
        let horizon = |w: &ClosedWindow<FunnelKey, LatencyHistogram>| w.window_end_ms + def.window_ms;
        let mut windows: Vec<_> = first.closed.into_iter().filter(|w| horizon(w) <= at).collect();
        let resume = Resume {
            restored: snapshot.records,
            restored_at: at,
            written_before: 0,
            definition: 0,
        };
        let second = run(def.clone(), width, log, lateness, batches, workers, false, Some(resume));
        windows.extend(second.closed);
        check(&def, &rows_of(&windows)?, &expected)?;
    }
}
