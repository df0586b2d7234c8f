#![allow(clippy::unwrap_used)]

//! The experiment operator against a naive reference: random events of a few units on both
//! routes, with assignments that sometimes change arm, arriving out of order within the
//! lateness, in random batches, on 1–3 workers. The per-arm sums and latency histograms the
//! operator's collections accumulate, before any time and in the end, must equal a batch
//! recomputation of the semantics from the whole log, exactly; so must the exposure counts,
//! with the compliance counts (restricted events, and a tenant outside `exp_b`'s allowlist).
//! Events span three days and CUPED looks back one: each unit's covariates (the same metrics
//! on the day before its exposure's day) are part of the sums. Events carry weights 1, 2 or 4
//! (sampled at 1, ½, ¼): counts and sums add the weight; indicators and latency samples do not.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use differential_dataflow::input::Input;
use proptest::prelude::*;
use sightline_operators::LatencyHistogram;
use sightline_operators::Windows;
use sightline_operators::experiment::{
    ArmKey, ExperimentDef, ExposureKey, ExposureKind, Lookback, Metric, MetricKind, Setup,
    experiments,
};
use sightline_operators::funnel::Resume;
use sightline_operators::funnel::fnv1a;
use sightline_schemas::{
    DataSensitivity, Event, EventName, Kept, KeptValue, Label, Links, Measure, PiiClassification,
    Platform, PrivacyCounts, Source,
};
use sightline_stats::Moments;
use timely::dataflow::operators::Inspect;

const TICK: u64 = 1000;
const BASE: u64 = 1_769_178_600_000;
const WIDTH: u64 = 60_000;
const WITHIN: u64 = 60_000;
const NAMES: [&str; 3] = ["project_viewed", "project_created", "task_assigned"];
const ARMS: [&str; 2] = ["control", "treatment"];
const DAY: u64 = 86_400_000;
const LOOKBACK_DAYS: u32 = 1;

#[derive(Clone, Debug)]
struct Raw {
    tenant: u64,
    user: u64,
    at_ms: u64,
    name: usize,
    /// None: no assignment; Some(true): the unit's usual arm; Some(false): the other one.
    assigned: Option<bool>,
    score: i64,
    restricted: bool,
    /// The event's Horvitz–Thompson weight (1 / `sample_rate`): counts and sums add it.
    weight: i64,
    id: usize,
}

impl Raw {
    fn arm(&self) -> Option<&'static str> {
        let usual = ((self.tenant + self.user) % 2) as usize;
        self.assigned
            .map(|usual_arm| ARMS[if usual_arm { usual } else { 1 - usual }])
    }
}

fn event_of(r: &Raw) -> Event {
    let event_name = EventName::from_name(NAMES[r.name]).unwrap();
    let assignments: Vec<(Label, Label)> = r
        .arm()
        .map(|arm| {
            EXPERIMENTS
                .iter()
                .map(|e| (Label::from(*e), Label::from(arm)))
                .collect()
        })
        .unwrap_or_default();
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
            tenant: r.tenant,
            user: r.user,
            session: 0,
        },
        user_role: None,
        country: None,
        kept: Kept::new(vec![(
            Label::from("score"),
            KeptValue::Measure(Measure(r.score * 1_000_000)),
        )]),
        feature_area: "projects".into(),
        workflow_name: None,
        surface: None,
        experiment_assignments: assignments.into(),
        pii_classification: PiiClassification::None,
        data_sensitivity: if r.restricted {
            DataSensitivity::Restricted
        } else {
            DataSensitivity::Internal
        },
        weight_micros: r.weight as u64 * sightline_schemas::WEIGHT_ONE,
        latency_us: latency_of(r),
        privacy: PrivacyCounts::default(),
    }
}

/// Both experiments; `exp_b` analyses tenant 1 only.
const EXPERIMENTS: [&str; 2] = ["exp_a", "exp_b"];

/// The latency of `project_viewed` events (µs), spread over many buckets.
fn latency_of(r: &Raw) -> Option<u64> {
    (NAMES[r.name] == "project_viewed").then(|| 1_000 + (r.id as u64 * 7_919) % 90_000)
}

fn setup() -> Arc<Setup> {
    let name = |n: &str| EventName::from_name(n).unwrap();
    let defs = vec![
        ExperimentDef {
            id: Label::from("exp_a"),
            tenants: None,
            phases: Vec::new(),
            rollout: None,
            metrics: vec![
                Metric {
                    name: Label::from("created"),
                    kind: MetricKind::Count {
                        event: name("project_created"),
                    },
                },
                Metric {
                    name: Label::from("score"),
                    kind: MetricKind::Sum {
                        event: name("task_assigned"),
                        field: Label::from("score"),
                    },
                },
                Metric {
                    name: Label::from("converted"),
                    kind: MetricKind::Conversion {
                        event: name("project_created"),
                        within_ms: WITHIN,
                    },
                },
                Metric {
                    name: Label::from("events"),
                    kind: MetricKind::Events,
                },
                Metric {
                    name: Label::from("created_per_event"),
                    kind: MetricKind::Ratio {
                        numerator: 0,
                        denominator: 3,
                    },
                },
                Metric {
                    name: Label::from("abandoned"),
                    kind: MetricKind::Abandonment {
                        entry: name("project_viewed"),
                        goal: name("task_assigned"),
                        within_ms: WITHIN,
                    },
                },
                Metric {
                    name: Label::from("p95"),
                    kind: MetricKind::Latency {
                        event: name("project_viewed"),
                        permille: 950,
                    },
                },
            ],
        },
        ExperimentDef {
            id: Label::from("exp_b"),
            tenants: Some([1].into_iter().collect()),
            phases: Vec::new(),
            rollout: None,
            metrics: vec![Metric {
                name: Label::from("created"),
                kind: MetricKind::Count {
                    event: name("project_created"),
                },
            }],
        },
    ];
    Arc::new(Setup {
        defs,
        lookback: Some(Lookback::days(LOOKBACK_DAYS)),
        ..Setup::default()
    })
}

fn arb_raw() -> impl Strategy<Value = Raw> {
    (
        1u64..=2,
        1u64..=3,
        (
            0u64..1200,
            prop_oneof![4 => Just(0u64), 1 => Just(1), 1 => Just(2)],
        ),
        0usize..3,
        proptest::option::weighted(0.5, proptest::bool::weighted(0.9)),
        0i64..5,
        proptest::bool::weighted(0.15),
        prop_oneof![2 => Just(1i64), 1 => Just(2), 1 => Just(4)],
    )
        .prop_map(
            |(tenant, user, (q, day), name, assigned, score, restricted, weight)| Raw {
                tenant,
                user,
                at_ms: BASE + day * DAY + q * 250,
                name,
                assigned,
                score,
                restricted,
                weight,
                id: 0,
            },
        )
}

type Stats = BTreeMap<ArmKey, Moments>;
type Latency = BTreeMap<ArmKey, LatencyHistogram>;
type Exposures = BTreeMap<ExposureKey, isize>;

fn arm_key(experiment: &str, metric: &str, arm: &str) -> ArmKey {
    ArmKey {
        experiment: experiment.into(),
        metric: metric.into(),
        arm: arm.into(),
    }
}

/// The semantics from the whole log, counting only events before `until` (ms).
fn reference(log: &[Raw], until: u64) -> (Stats, Latency, Exposures) {
    let window = |at: u64| at / WIDTH * WIDTH;
    let (mut stats, mut latency, mut exposures) = (Stats::new(), Latency::new(), Exposures::new());
    let mut count = |experiment: &str, at: u64, arm: &str, kind: ExposureKind| {
        *exposures
            .entry(ExposureKey {
                window_start_ms: window(at),
                experiment: experiment.into(),
                arm: arm.into(),
                kind,
            })
            .or_default() += 1;
    };
    let mut by_unit: BTreeMap<(u64, u64), Vec<&Raw>> = BTreeMap::new();
    for r in log.iter().filter(|r| r.at_ms < until) {
        if r.restricted {
            // Counted for both experiments, never analysed.
            if let Some(arm) = r.arm() {
                for e in EXPERIMENTS {
                    count(e, r.at_ms, arm, ExposureKind::Compliance);
                }
            }
        } else {
            by_unit.entry((r.tenant, r.user)).or_default().push(r);
        }
    }
    for (&(tenant, _), events) in by_unit.iter_mut() {
        events.sort_by_key(|r| (r.at_ms, fnv1a(format!("id-{}", r.id).as_bytes())));
        // exp_b: tenant 2 is outside its allowlist; its assigned events are counted.
        if tenant != 1 {
            for r in events.iter() {
                if let Some(arm) = r.arm() {
                    count("exp_b", r.at_ms, arm, ExposureKind::Compliance);
                }
            }
        }
        let Some(first) = events.iter().position(|r| r.arm().is_some()) else {
            continue;
        };
        let (arm, exposed_at) = (events[first].arm().unwrap(), events[first].at_ms);
        // CUPED: the unit's events on the lookback's days before the exposure's day.
        let day = exposed_at / DAY;
        let pre: Vec<&&Raw> = events
            .iter()
            .filter(|r| r.at_ms / DAY < day && r.at_ms / DAY + u64::from(LOOKBACK_DAYS) >= day)
            .collect();
        // Counts and sums are weighted (the conversion indicator is not).
        let pre_count = |name: &str| {
            pre.iter()
                .filter(|r| NAMES[r.name] == name)
                .map(|r| r.weight)
                .sum::<i64>()
        };
        let pre_events: i64 = pre.iter().map(|r| r.weight).sum();
        let has_pre = !pre.is_empty();
        let x = |value: i64| has_pre.then_some(value * 1_000_000);
        let pre_score: i64 = pre
            .iter()
            .filter(|r| NAMES[r.name] == "task_assigned")
            .map(|r| r.score * r.weight)
            .sum();
        let experiments: &[&str] = if tenant == 1 {
            &EXPERIMENTS
        } else {
            &EXPERIMENTS[..1]
        };
        for e in experiments {
            count(e, exposed_at, arm, ExposureKind::First);
        }
        let mut multiple = false;
        let (mut created, mut score, mut converted, mut all) = (0i64, 0i64, 0i64, 0i64);
        let (mut entered, mut finished) = (false, false);
        let mut samples = LatencyHistogram::default();
        for r in &events[first..] {
            if r.arm().is_some_and(|a| a != arm) {
                for e in experiments {
                    count(e, r.at_ms, arm, ExposureKind::Multiple);
                }
                multiple = true;
                break;
            }
            all += r.weight;
            match NAMES[r.name] {
                "project_created" => {
                    created += r.weight;
                    if r.at_ms <= exposed_at + WITHIN {
                        converted = 1;
                    }
                }
                "task_assigned" => {
                    score += r.score * r.weight;
                    if entered && r.at_ms <= exposed_at + WITHIN {
                        finished = true;
                    }
                }
                "project_viewed" => {
                    entered = true;
                    samples.record(latency_of(r).unwrap());
                }
                _ => {}
            }
        }
        if multiple {
            continue;
        }
        let one = 1_000_000;
        let mut add = |experiment: &str, metric: &str, m: Moments| {
            let entry = stats.entry(arm_key(experiment, metric, arm)).or_default();
            *entry = entry.plus(&m);
        };
        for (metric, value, covariate) in [
            ("created", created, pre_count("project_created")),
            ("score", score, pre_score),
            ("converted", converted, pre_count("project_created").min(1)),
            ("events", all, pre_events),
        ] {
            add("exp_a", metric, Moments::unit(value * one, x(covariate)));
        }
        add(
            "exp_a",
            "created_per_event",
            Moments::unit(created * one, Some(all * one)),
        );
        let abandoned = i64::from(entered && !finished);
        add(
            "exp_a",
            "abandoned",
            Moments::unit(abandoned * one, Some(i64::from(entered) * one)),
        );
        if tenant == 1 {
            let covariate = x(pre_count("project_created"));
            add("exp_b", "created", Moments::unit(created * one, covariate));
        }
        if samples.count > 0 {
            use differential_dataflow::difference::Semigroup;
            latency
                .entry(arm_key("exp_a", "p95", arm))
                .or_default()
                .plus_equals(&samples);
        }
    }
    (stats, latency, exposures)
}

/// Every output: statistics updates with their times, exposure counts with their window start.
#[derive(Default)]
struct Outputs {
    stats: Vec<(ArmKey, u64, Moments)>,
    latency: Vec<(ArmKey, u64, LatencyHistogram)>,
    exposures: Vec<(ExposureKey, u64, isize)>,
}

fn run(mut log: Vec<(Raw, u64)>, batches: Vec<usize>, workers: usize) -> Outputs {
    log.sort_by_key(|(r, arrival)| (*arrival, r.id));
    let (log, batches) = (Arc::new(log), Arc::new(batches));
    let got: Arc<Mutex<Outputs>> = Arc::default();
    let out = Arc::clone(&got);
    timely::execute(timely::Config::process(workers), move |worker| {
        let windows = Windows::new(WIDTH);
        let (a, b, c) = (Arc::clone(&out), Arc::clone(&out), Arc::clone(&out));
        let mut input = worker.dataflow::<u64, _, _>(|scope| {
            let (input, events) = scope.new_collection::<Event, isize>();
            let out = experiments(events, setup(), windows, Resume::default(), None);
            out.stats.inner.inspect(move |(k, t, m)| {
                a.lock().unwrap().stats.push((k.clone(), *t, *m));
            });
            out.latency.inner.inspect(move |(k, t, h)| {
                c.lock().unwrap().latency.push((k.clone(), *t, h.clone()));
            });
            out.exposures.inspect(move |w| {
                for (k, n) in &w.entries {
                    b.lock()
                        .unwrap()
                        .exposures
                        .push((k.clone(), w.window_start_ms, *n));
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
    Arc::try_unwrap(got).ok().unwrap().into_inner().unwrap()
}

/// The accumulation of `updates` before time `until`, zeros left out.
fn accumulate<K: Ord + Clone, R: differential_dataflow::difference::Semigroup + Clone>(
    updates: &[(K, u64, R)],
    until: u64,
) -> BTreeMap<K, R> {
    let mut out: BTreeMap<K, R> = BTreeMap::new();
    for (k, _, r) in updates.iter().filter(|u| u.1 < until) {
        match out.get_mut(k) {
            Some(acc) => acc.plus_equals(r),
            None => {
                out.insert(k.clone(), r.clone());
            }
        }
    }
    out.retain(|_, r| !r.is_zero());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn per_arm_sums_equal_the_batch_recomputation(
        raws in proptest::collection::vec(arb_raw(), 0..80),
        jitter in proptest::collection::vec(0u64..20_000, 1..16),
        batches in proptest::collection::vec(1usize..12, 1..6),
        workers in 1usize..4,
        cut in 0u64..300_000,
    ) {
        let log: Vec<(Raw, u64)> = raws
            .into_iter()
            .enumerate()
            .map(|(id, mut r)| {
                r.id = id;
                let arrival = r.at_ms + jitter[id % jitter.len()];
                (r, arrival)
            })
            .collect();
        let raws: Vec<Raw> = log.iter().map(|(r, _)| r.clone()).collect();
        let out = run(log, batches, workers);
        // Before a cut (a tick boundary) and in the end.
        let cut = BASE + cut / TICK * TICK;
        for until in [cut, u64::MAX] {
            let (stats, latency, _) = reference(&raws, until);
            prop_assert_eq!(accumulate(&out.stats, until), stats, "stats before {}", until);
            prop_assert_eq!(accumulate(&out.latency, until), latency, "latency before {}", until);
        }
        // Exposures come per closed window (keyed by its start): every window, each once.
        let (_, _, exposures) = reference(&raws, u64::MAX);
        prop_assert_eq!(accumulate(&out.exposures, u64::MAX), exposures);
        let keys: Vec<(u64, &ExposureKey)> = out.exposures.iter().map(|(k, w, _)| (*w, k)).collect();
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        prop_assert_eq!(unique.len(), keys.len(), "each window's exposures once");
    }
}
