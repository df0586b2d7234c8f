#![allow(clippy::unwrap_used)]

//! The experiment operator's looks: rows are the statistics of the per-arm sums as they were
//! at each window's end, kept monotone over looks; guardrail decisions follow the kill rule:
//! a planted regression kills after exactly three breached intervals, a transient breach of two
//! intervals does not, and an SRM failure alone holds unless configured to kill.
//!
//! Each unit is one user with events carrying its assignment and a measure `y`; the metric is
//! the sum of `y` per unit, so a unit's value can go up and down.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use differential_dataflow::input::Input;
use sightline_operators::Windows;
use sightline_operators::alerts::Alert;
use sightline_operators::experiment::Saved;
use sightline_operators::experiment::{
    Analysis, Decision, ExperimentDef, Guardrail, Lookback, Metric, MetricKind, ResultRow,
    ResultState, Setup, experiments,
};
use sightline_operators::funnel::Resume;
use sightline_operators::state::{StateHooks, StateShard};
use sightline_schemas::{
    DataSensitivity, Event, EventName, Kept, KeptValue, Label, Links, Measure, PiiClassification,
    Platform, PrivacyCounts, Source,
};
use sightline_stats::Moments;
use sightline_stats::guardrail::{Action, Harm};
use sightline_stats::moments::fixed;
use timely::dataflow::operators::Inspect;
use timely::dataflow::operators::probe::Handle as ProbeHandle;

const WIDTH: u64 = 60_000;
const BASE: u64 = 1_769_178_600_000;

/// Per window: (arm, (unit, y) events).
type Plan = Vec<Vec<(&'static str, Vec<(u64, f64)>)>>;

/// An event of `unit` in `arm`; an arm written `restricted:<arm>` makes a restricted tenant's
/// event, and `none` an event without an assignment.
fn event(unit: u64, arm: &str, y: f64, at_ms: u64, id: usize) -> Event {
    let (restricted, arm) = match arm.strip_prefix("restricted:") {
        Some(arm) => (true, arm),
        None => (false, arm),
    };
    let assignments: Vec<(Label, Label)> = if arm == "none" {
        Vec::new()
    } else {
        vec![(Label::from("exp"), Label::from(arm))]
    };
    let event_name = EventName::from_name("project_viewed").unwrap();
    Event {
        event_time_ms: at_ms as i64,
        event_name,
        event_type: event_name.spec().event_type,
        event_id: format!("id-{id}"),
        source: Source::Server,
        platform: Platform::Web,
        app_version: "1".into(),
        tenant_id: "t".try_into().unwrap(),
        user_id: "u".try_into().unwrap(),
        session_id: "s".try_into().unwrap(),
        links: Links {
            tenant: 1,
            user: unit,
            session: 0,
        },
        user_role: None,
        country: None,
        kept: Kept::new(vec![(
            Label::from("y"),
            KeptValue::Measure(Measure(fixed(y).unwrap())),
        )]),
        feature_area: "projects".into(),
        workflow_name: None,
        surface: None,
        experiment_assignments: assignments.into(),
        pii_classification: PiiClassification::None,
        data_sensitivity: if restricted {
            DataSensitivity::Restricted
        } else {
            DataSensitivity::Internal
        },
        // `y` in ms is also the event's latency measure.
        weight_micros: sightline_schemas::WEIGHT_ONE,
        latency_us: Some((y.max(0.0) * 1000.0) as u64),
        privacy: PrivacyCounts::default(),
    }
}

/// Units `ids` with values around `mean` (a fixed spread, so that figures repeat exactly).
fn units(ids: std::ops::Range<u64>, mean: f64) -> Vec<(u64, f64)> {
    ids.map(|i| (i, mean + ((i * 37 % 101) as f64 / 50.0 - 1.0)))
        .collect()
}

/// The metric `latency`: the sum of `y` per unit.
fn sum_metric() -> Metric {
    Metric {
        name: "latency".into(),
        kind: MetricKind::Sum {
            event: EventName::from_name("project_viewed").unwrap(),
            field: "y".into(),
        },
    }
}

/// The metric `p95`: the event-level p95 of the latency (`y` ms).
fn p95_metric() -> Metric {
    Metric {
        name: "p95".into(),
        kind: MetricKind::Latency {
            event: EventName::from_name("project_viewed").unwrap(),
            permille: 950,
        },
    }
}

fn setup(analysis: Analysis) -> Arc<Setup> {
    setup_with(analysis, vec![sum_metric()])
}

fn setup_with(analysis: Analysis, metrics: Vec<Metric>) -> Arc<Setup> {
    Arc::new(Setup {
        defs: vec![ExperimentDef {
            id: "exp".into(),
            metrics,
            tenants: None,
            phases: Vec::new(),
            rollout: None,
        }],
        analyses: BTreeMap::from([(Label::from("exp"), analysis)]),
        ..Setup::default()
    })
}

/// What a run emits: rows (window start, row), decisions, and snapshots when saving.
struct Emitted {
    alerts: Vec<Alert>,
    rows: Vec<(u64, ResultRow)>,
    decisions: Vec<Decision>,
    shards: Vec<StateShard<Saved>>,
}

fn run(plan: &Plan, analysis: Analysis) -> (Vec<(u64, ResultRow)>, Vec<Decision>) {
    let out = run_from(plan, setup(analysis), false, Resume::default());
    (out.rows, out.decisions)
}

/// Runs `plan` (only its input at or after `resume.restored_at`), saving state when `save`.
fn run_from(plan: &Plan, setup: Arc<Setup>, save: bool, resume: Resume<Saved>) -> Emitted {
    let rows: Arc<Mutex<Vec<(u64, ResultRow)>>> = Arc::default();
    let decisions: Arc<Mutex<Vec<Decision>>> = Arc::default();
    let shards: Arc<Mutex<Vec<StateShard<Saved>>>> = Arc::default();
    let alerts: Arc<Mutex<Vec<Alert>>> = Arc::default();
    let al = Arc::clone(&alerts);
    let (r, d, sh) = (
        Arc::clone(&rows),
        Arc::clone(&decisions),
        Arc::clone(&shards),
    );
    let plan = plan.clone();
    timely::execute_directly(move |worker| {
        let (r, d, sh) = (Arc::clone(&r), Arc::clone(&d), Arc::clone(&sh));
        let al = Arc::clone(&al);
        let setup = Arc::clone(&setup);
        let hooks = save.then(|| StateHooks {
            every_ms: 1,
            outputs: ProbeHandle::new(),
            durable: ProbeHandle::new(),
            flush: Arc::default(),
        });
        let restored_at = resume.restored_at;
        let resume = resume.clone();
        let mut input = worker.dataflow::<u64, _, _>(|scope| {
            let (input, events) = scope.new_collection::<Event, isize>();
            let out = experiments(events, setup, Windows::new(WIDTH), resume, hooks.as_ref());
            out.results.inspect(move |w| {
                for (row, _) in &w.entries {
                    r.lock().unwrap().push((w.window_start_ms, row.clone()));
                }
            });
            out.alerts.inspect(move |w| {
                al.lock()
                    .unwrap()
                    .extend(w.entries.iter().map(|(x, _)| x.clone()));
            });
            out.decisions.inspect(move |w| {
                d.lock()
                    .unwrap()
                    .extend(w.entries.iter().map(|(x, _)| x.clone()));
            });
            if let Some(state) = out.state {
                state.inspect(move |s| sh.lock().unwrap().push(s.clone()));
            }
            input
        });
        let mut id = 0;
        for (i, window) in plan.iter().enumerate() {
            let at = BASE + i as u64 * WIDTH + 1000;
            input.advance_to(at);
            for (arm, events) in window {
                for (unit, y) in events {
                    id += 1;
                    if at >= restored_at {
                        input.update_at(event(*unit, arm, *y, at, id), at, 1);
                    }
                }
            }
            input.flush();
            worker.step();
        }
        input.close();
    });
    let rows = rows.lock().unwrap().clone();
    let decisions = decisions.lock().unwrap().clone();
    let shards = shards.lock().unwrap().clone();
    Emitted {
        alerts: alerts.lock().unwrap().clone(),
        rows,
        decisions,
        shards,
    }
}

fn analysis() -> Analysis {
    Analysis {
        interval_windows: 1,
        min_units: 100,
        guardrails: vec![Guardrail {
            metric: "latency".into(),
            harm: Harm::Increase,
            margin: 0.0,
        }],
        ..Analysis::default()
    }
}

fn actions(decisions: &[Decision]) -> Vec<Action> {
    decisions.iter().map(|d| d.action).collect()
}

/// Treatment units are numbered from 1,000,000, control units from 1.
const T: u64 = 1_000_000;

#[test]
fn rows_are_the_statistics_of_the_sums_at_each_window_end() {
    let plan: Plan = vec![
        vec![
            ("control", units(1..151, 10.0)),
            ("treatment", units(T + 1..T + 151, 10.2)),
        ],
        // More units, and 20 treatment units' values go down by 1.
        vec![
            ("control", units(151..301, 10.0)),
            (
                "treatment",
                [units(T + 151..T + 301, 10.2), units(T + 1..T + 21, -1.0)].concat(),
            ),
        ],
        vec![],
        vec![
            ("control", units(301..451, 10.0)),
            ("treatment", units(T + 301..T + 451, 10.2)),
        ],
    ];
    let (rows, _) = run(&plan, analysis());
    // One row per metric and arm for each window with data; none for the empty window.
    let with_data = plan.iter().filter(|w| !w.is_empty()).count();
    assert_eq!(rows.len(), 2 * with_data);
    let mut values: BTreeMap<u64, f64> = BTreeMap::new();
    let mut last_p = 1.0f64;
    for (i, window) in plan.iter().enumerate() {
        for (_, events) in window {
            for (unit, y) in events {
                *values.entry(*unit).or_default() += y;
            }
        }
        let sums = |treatment: bool| {
            values
                .iter()
                .filter(|(u, _)| (**u >= T) == treatment)
                .fold(Moments::default(), |m, (_, y)| {
                    m.plus(&Moments::unit(fixed(*y).unwrap(), None))
                })
        };
        let start = BASE / WIDTH * WIDTH + i as u64 * WIDTH;
        let here: Vec<&ResultRow> = rows
            .iter()
            .filter(|(w, _)| *w == start)
            .map(|(_, r)| r)
            .collect();
        assert_eq!(
            here.len(),
            if window.is_empty() { 0 } else { 2 },
            "window {i}"
        );
        for row in here {
            let s = sums(&*row.arm == "treatment").summary();
            assert_eq!(row.units, s.n);
            assert!(
                (row.mean - s.mean_y).abs() < 1e-9,
                "{} vs {}",
                row.mean,
                s.mean_y
            );
            assert!((row.variance - s.var_y).abs() < 1e-9);
            if let Some(a) = row.absolute {
                let want = sightline_stats::effect::absolute(&s, &sums(false).summary()).unwrap();
                assert!((a.estimate - want.estimate).abs() < 1e-9);
                assert!(a.p_value <= last_p, "monotone over looks");
                last_p = a.p_value;
            }
        }
    }
}

#[test]
fn a_planted_regression_kills_after_exactly_three_breached_intervals() {
    let window = |i: u64, t: f64| {
        vec![
            ("control", units(i * 1000 + 1..i * 1000 + 201, 10.0)),
            ("treatment", units(T + i * 1000 + 1..T + i * 1000 + 201, t)),
        ]
    };
    let plan: Plan = vec![
        window(0, 10.0),
        window(1, 13.0),
        window(2, 13.0),
        window(3, 13.0),
        window(4, 13.0),
    ];
    let (rows, decisions) = run(&plan, analysis());
    let breached: Vec<u32> = decisions.iter().map(|d| d.breached_intervals).collect();
    assert_eq!(breached, [0, 1, 2, 3, 3], "{decisions:#?}");
    assert_eq!(
        actions(&decisions),
        [
            Action::Hold,
            Action::Hold,
            Action::Hold,
            Action::Kill,
            Action::Kill
        ]
    );
    let kill = &decisions[3];
    assert_eq!(
        (&*kill.experiment, &*kill.rule, kill.epoch),
        ("exp", "latency", 3)
    );
    assert!(kill.bound.unwrap() > 0.0 && kill.units.iter().all(|(_, n)| *n >= 100));
    assert!(
        rows.iter()
            .rev()
            .take(2)
            .all(|(_, r)| r.state == ResultState::Killed)
    );
}

#[test]
fn a_transient_breach_of_two_intervals_does_not_kill() {
    // 100 treatment units regress by 4 for two windows, then get back (a fixed deploy).
    let plan: Plan = vec![
        vec![
            ("control", units(1..301, 10.0)),
            ("treatment", units(T + 1..T + 301, 10.0)),
        ],
        vec![("treatment", (T + 1..T + 101).map(|u| (u, 4.0)).collect())],
        vec![
            ("control", units(301..401, 10.0)),
            ("treatment", units(T + 301..T + 401, 10.0)),
        ],
        vec![("treatment", (T + 1..T + 101).map(|u| (u, -4.0)).collect())],
        vec![
            ("control", units(401..501, 10.0)),
            ("treatment", units(T + 401..T + 501, 10.0)),
        ],
    ];
    let (_, decisions) = run(&plan, analysis());
    let breached: Vec<u32> = decisions.iter().map(|d| d.breached_intervals).collect();
    assert_eq!(breached, [0, 1, 2, 0, 0], "{decisions:#?}");
    assert!(actions(&decisions).iter().all(|a| *a == Action::Hold));
}

#[test]
fn a_sample_ratio_mismatch_alone_holds_unless_configured_to_kill() {
    let window = |i: u64| {
        vec![
            ("control", units(i * 1000 + 1..i * 1000 + 701, 10.0)),
            (
                "treatment",
                units(T + i * 1000 + 1..T + i * 1000 + 301, 10.0),
            ),
        ]
    };
    let plan: Plan = vec![window(0), window(1), window(2)];
    let (rows, decisions) = run(&plan, analysis());
    assert!(actions(&decisions).iter().all(|a| *a == Action::Hold));
    assert!(
        rows.iter()
            .all(|(_, r)| r.state == ResultState::Unhealthy && r.srm_p_value < 0.001)
    );
    let (_, decisions) = run(
        &plan,
        Analysis {
            srm_kills: true,
            ..analysis()
        },
    );
    assert_eq!(actions(&decisions)[0], Action::Kill);
}

#[test]
fn a_restart_from_any_snapshot_changes_nothing() {
    let window = |i: u64, t: f64| {
        vec![
            ("control", units(i * 1000 + 1..i * 1000 + 151, 10.0)),
            (
                "treatment",
                [
                    units(T + i * 1000 + 1..T + i * 1000 + 151, t),
                    units(T + 1..T + 11, 0.5),
                ]
                .concat(),
            ),
        ]
    };
    let plan: Plan = (0..6)
        .map(|i| window(i, if i < 2 { 10.0 } else { 12.0 }))
        .collect();
    // With a latency metric too: its histograms are saved, its rank spreads recomputed.
    // And with CUPED's history, saved with the units.
    let both = || {
        let mut s = (*setup_with(analysis(), vec![sum_metric(), p95_metric()])).clone();
        s.lookback = Some(Lookback::days(1));
        Arc::new(s)
    };
    let whole = run_from(&plan, both(), true, Resume::default());
    assert!(whole.shards.len() >= 3, "{} snapshots", whole.shards.len());
    assert!(whole.rows.iter().any(|(_, r)| r.quantile.is_some()));
    assert!(whole.decisions.iter().any(|d| d.action == Action::Kill));
    for shard in &whole.shards {
        let s = shard.frontier;
        let resumed = run_from(
            &plan,
            both(),
            false,
            Resume {
                // Through JSON, as the lake keeps it.
                restored: serde_json::from_str(&serde_json::to_string(&shard.records).unwrap())
                    .unwrap(),
                restored_at: s,
                written_before: 0,
                definition: 0,
            },
        );
        // Every window that ends after the snapshot comes out as it did without the restart.
        let after = |rows: &[(u64, ResultRow)]| -> Vec<(u64, ResultRow)> {
            rows.iter()
                .filter(|(w, _)| w + WIDTH > s)
                .cloned()
                .collect()
        };
        assert_eq!(after(&resumed.rows), after(&whole.rows), "restored at {s}");
        let decided = |d: &[Decision]| -> Vec<Decision> {
            d.iter().filter(|d| d.watermark_ms > s).cloned().collect()
        };
        assert_eq!(
            decided(&resumed.decisions),
            decided(&whole.decisions),
            "restored at {s}"
        );
    }
}

#[test]
fn snapshots_move_on_without_any_experiment_data() {
    // A deployment that analyses experiments but sees no assignment must not hold its
    // snapshots (and the offsets the source commits behind them) at the start.
    let plan: Plan = vec![vec![]; 6];
    let out = run_from(&plan, setup(analysis()), true, Resume::default());
    let last = out.shards.iter().map(|s| s.frontier).max().unwrap_or(0);
    assert!(last >= BASE + 4 * WIDTH, "the last snapshot is at {last}");
}

#[test]
fn a_look_without_variance_does_not_pin_the_running_interval() {
    let same = |ids: std::ops::Range<u64>| ids.map(|i| (i, 10.0)).collect::<Vec<_>>();
    let plan: Plan = vec![
        vec![
            ("control", same(1..151)),
            ("treatment", same(T + 1..T + 151)),
        ],
        vec![
            ("control", units(151..301, 10.0)),
            ("treatment", units(T + 151..T + 301, 10.1)),
        ],
    ];
    let (rows, _) = run(&plan, analysis());
    let last = rows
        .iter()
        .rev()
        .find_map(|(_, r)| r.absolute)
        .expect("a treatment row");
    assert!(
        last.interval.hi - last.interval.lo > 0.01,
        "the interval is {:?}",
        last.interval
    );
}

#[test]
fn a_p95_latency_regression_kills_after_exactly_three_breached_intervals() {
    // Every unit sends three events per window; treatment latencies rise by 30% from the
    // second window on.
    let window = |i: u64, t: f64| {
        let three = |ids: std::ops::Range<u64>, mean: f64| {
            let one = units(ids, mean);
            [one.clone(), one.clone(), one].concat()
        };
        vec![
            ("control", three(i * 1000 + 1..i * 1000 + 201, 10.0)),
            ("treatment", three(T + i * 1000 + 1..T + i * 1000 + 201, t)),
        ]
    };
    let plan: Plan = vec![
        window(0, 10.0),
        window(1, 13.0),
        window(2, 13.0),
        window(3, 13.0),
        window(4, 13.0),
    ];
    let p95 = Analysis {
        guardrails: vec![Guardrail {
            metric: "p95".into(),
            harm: Harm::Increase,
            margin: 0.0,
        }],
        ..analysis()
    };
    let out = run_from(
        &plan,
        setup_with(p95, vec![p95_metric()]),
        false,
        Resume::default(),
    );
    let breached: Vec<u32> = out.decisions.iter().map(|d| d.breached_intervals).collect();
    assert_eq!(breached, [0, 1, 2, 3, 3], "{:#?}", out.decisions);
    assert_eq!(out.decisions[3].action, Action::Kill);
    assert_eq!(&*out.decisions[3].rule, "p95");
    // The last treatment row: its p95 (bucket midpoint, within 1%), the rank test, and the
    // effect (the difference of the p95s) with its always-valid interval above 0.
    let (_, last) = out
        .rows
        .iter()
        .rev()
        .find(|(_, r)| &*r.arm == "treatment")
        .unwrap();
    let q = last.quantile.unwrap();
    assert_eq!(q.samples, 3 * 200 + 4 * 3 * 200);
    assert!(
        q.auc.unwrap() > 0.6 && q.mann_whitney_p_value.unwrap() < 1e-6,
        "{q:?}"
    );
    let effect = last.absolute.unwrap();
    assert!(
        effect.interval.lo > 0.0 && effect.estimate > 1.0,
        "{effect:?}"
    );
    assert_eq!(last.units, 200 * 5);
    // The treatment p95 is the exact one within the histogram's 1% (and the bucket's width).
    let mut all: Vec<f64> = plan
        .iter()
        .flat_map(|w| w.iter().filter(|(arm, _)| *arm == "treatment"))
        .flat_map(|(_, events)| events.iter().map(|(_, y)| *y))
        .collect();
    all.sort_by(f64::total_cmp);
    let exact = all[(0.95 * all.len() as f64).ceil() as usize - 1];
    assert!(
        (q.value_ms.unwrap() / exact - 1.0).abs() < 0.02,
        "{q:?} vs {exact}"
    );
}

#[test]
fn restricted_events_are_counted_never_analysed_and_raise_a_compliance_alert() {
    let plan: Plan = vec![
        vec![
            ("control", units(1..11, 10.0)),
            ("treatment", units(T + 1..T + 11, 10.0)),
        ],
        // A restricted tenant's events carry the assignment.
        vec![
            ("control", units(11..21, 10.0)),
            ("restricted:treatment", units(T + 11..T + 16, 50.0)),
        ],
        vec![("restricted:control", units(21..23, 50.0))],
        vec![("control", units(23..31, 10.0))],
    ];
    let out = run_from(&plan, setup(analysis()), false, Resume::default());
    let states: Vec<(u64, &str, &str)> = out
        .alerts
        .iter()
        .map(|a| {
            (
                (a.window_start_ms - BASE / WIDTH * WIDTH) / WIDTH,
                a.state.as_str(),
                a.subject.as_str(),
            )
        })
        .collect();
    assert_eq!(states, [(1, "firing", "exp"), (3, "resolved", "exp")]);
    assert_eq!(out.alerts[0].calls, 5);
    // Never analysed: the units and the means are the standard events' alone.
    let (_, last) = out
        .rows
        .iter()
        .rev()
        .find(|(_, r)| &*r.arm == "treatment")
        .unwrap();
    assert_eq!(last.units, 10);
    assert!((last.mean - 10.0).abs() < 1.0);
}

#[test]
fn cuped_adjusts_by_the_same_metric_before_exposure_and_narrows_the_interval() {
    // Day 0: 300 units per arm, without an assignment, at their own level; a day later, their
    // first assigned events at that level plus a little noise, and 0.5 more in treatment.
    let level = |u: u64| ((u * 7919) % 97) as f64 / 10.0;
    let noise = |u: u64| ((u * 37) % 11) as f64 / 50.0 - 0.1;
    let arm = |ids: std::ops::Range<u64>, f: &dyn Fn(u64) -> f64| -> Vec<(u64, f64)> {
        ids.map(|u| (u, f(u))).collect()
    };
    let mut plan: Plan = vec![Vec::new(); 1441];
    plan[0] = vec![
        ("none", arm(1..301, &level)),
        ("none", arm(T + 1..T + 301, &level)),
    ];
    plan[1440] = vec![
        ("control", arm(1..301, &|u| level(u) + noise(u))),
        (
            "treatment",
            arm(T + 1..T + 301, &|u| level(u) + noise(u) + 0.5),
        ),
    ];
    let mut with_cuped = (*setup(analysis())).clone();
    with_cuped.lookback = Some(Lookback::days(1));
    let out = run_from(&plan, Arc::new(with_cuped), false, Resume::default());
    let (_, last) = out
        .rows
        .iter()
        .rev()
        .find(|(_, r)| &*r.arm == "treatment")
        .unwrap();
    let cuped = last
        .cuped
        .expect("CUPED figures with 300 units with pre-exposure data");
    assert_eq!(cuped.units_with_pre, 300);
    assert!((cuped.theta - 1.0).abs() < 0.05, "{cuped:?}");
    let adjusted = cuped.absolute.unwrap();
    assert!((adjusted.estimate - 0.5).abs() < 0.05, "{adjusted:?}");
    assert!(
        adjusted.interval.lo > 0.0 && adjusted.p_value < 0.05,
        "{adjusted:?}"
    );
    // The unadjusted interval, driven by the spread of the levels, is many times wider.
    let plain = last.absolute.unwrap();
    let width = |i: &sightline_stats::sequential::Interval| i.hi - i.lo;
    assert!(
        width(&adjusted.interval) * 5.0 < width(&plain.interval),
        "{adjusted:?} {plain:?}"
    );
    // Without a lookback, no CUPED figures.
    let out = run_from(&plan, setup(analysis()), false, Resume::default());
    assert!(out.rows.iter().all(|(_, r)| r.cuped.is_none()));
}

#[test]
fn rollout_phases_are_strata_and_remove_the_ramp_up_bias() {
    // An A/A rollout: 5% in treatment for two windows, then 50%, while the metric drifts from
    // 10 to 12 (the same in both arms).
    let plan: Plan = (0..4u64)
        .map(|i| {
            let (c, t, level) = if i < 2 {
                (190, 10, 10.0)
            } else {
                (100, 100, 12.0)
            };
            vec![
                ("control", units(i * 1000 + 1..i * 1000 + 1 + c, level)),
                (
                    "treatment",
                    units(T + i * 1000 + 1..T + i * 1000 + 1 + t, level),
                ),
            ]
        })
        .collect();
    let start = BASE / WIDTH * WIDTH;
    let weights = |c: f64, t: f64| vec![(Label::from("control"), c), (Label::from("treatment"), t)];
    let phased = Analysis {
        arms: weights(1.0, 1.0),
        phases: vec![weights(95.0, 5.0), weights(50.0, 50.0)],
        ..analysis()
    };
    let mut setup = (*setup(phased)).clone();
    setup.defs[0].phases = vec![start, start + 2 * WIDTH];
    let setup = Arc::new(setup);
    let out = run_from(&plan, Arc::clone(&setup), true, Resume::default());
    // The strata are saved (through JSON, as the lake keeps them: their keys are pairs) and a
    // restart from the middle gives the same rows.
    let shard = &out.shards[out.shards.len() / 2];
    let resumed = run_from(
        &plan,
        Arc::clone(&setup),
        false,
        Resume {
            restored: serde_json::from_str(&serde_json::to_string(&shard.records).unwrap())
                .unwrap(),
            restored_at: shard.frontier,
            written_before: 0,
            definition: 0,
        },
    );
    let after = |rows: &[(u64, ResultRow)]| -> Vec<(u64, ResultRow)> {
        rows.iter()
            .filter(|(w, _)| w + WIDTH > shard.frontier)
            .cloned()
            .collect()
    };
    assert!(!after(&out.rows).is_empty());
    assert_eq!(after(&resumed.rows), after(&out.rows));
    let last = |rows: &[(u64, ResultRow)]| {
        rows.iter()
            .rev()
            .find(|(_, r)| &*r.arm == "treatment")
            .map(|(_, r)| r.clone())
            .unwrap()
    };
    let row = last(&out.rows);
    assert_eq!(row.phases, 2);
    let effect = row.absolute.unwrap();
    assert!(
        effect.estimate.abs() < 0.5 && effect.interval.contains(0.0),
        "{effect:?}"
    );
    assert!(
        row.srm_p_value > 0.01,
        "each phase as planned: {}",
        row.srm_p_value
    );
    assert_eq!(row.state, ResultState::Running);
    // Pooled, the same data shows a large false effect and fails SRM against one split.
    let pooled = run_from(
        &plan,
        setup_with(analysis(), vec![sum_metric()]),
        false,
        Resume::default(),
    );
    let row = last(&pooled.rows);
    assert_eq!(row.phases, 0);
    assert!(row.absolute.unwrap().estimate > 1.0, "{:?}", row.absolute);
    assert_eq!(row.state, ResultState::Unhealthy);
}
