#![allow(clippy::unwrap_used)]

//! The experiment results operator: rows are the statistics of the sums as they were at each
//! window's end, kept monotone over looks; guardrail decisions follow the kill rule: a planted
//! regression kills after exactly three breached intervals, a transient breach of one or two
//! intervals does not, and an SRM failure alone holds unless configured to kill.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use differential_dataflow::input::Input;
use sightline_operators::Windows;
use sightline_operators::experiment::{Analysis, ArmKey, Decision, Guardrail, ResultRow, results};
use sightline_schemas::Label;
use sightline_stats::Moments;
use sightline_stats::guardrail::{Action, Harm};
use sightline_stats::moments::fixed;
use timely::dataflow::operators::Inspect;

const WIDTH: u64 = 60_000;
const BASE: u64 = 1_769_178_600_000;

/// Per window: (arm, values of the units added in it, values of units retracted in it).
type Plan = Vec<Vec<(&'static str, Vec<f64>, Vec<f64>)>>;

fn key(arm: &str) -> ArmKey {
    ArmKey {
        experiment: "exp".into(),
        metric: "latency".into(),
        arm: arm.into(),
    }
}

/// Values around `mean` (a fixed spread, so that the figures repeat exactly).
fn units(n: usize, mean: f64) -> Vec<f64> {
    (0..n)
        .map(|i| mean + ((i * 37 % 101) as f64 / 50.0 - 1.0))
        .collect()
}

fn run(plan: Plan, analysis: Analysis) -> (Vec<(u64, ResultRow)>, Vec<Decision>) {
    let rows: Arc<Mutex<Vec<(u64, ResultRow)>>> = Arc::default();
    let decisions: Arc<Mutex<Vec<Decision>>> = Arc::default();
    let (r, d) = (Arc::clone(&rows), Arc::clone(&decisions));
    let analyses = Arc::new(BTreeMap::from([(Label::from("exp"), analysis)]));
    timely::execute_directly(move |worker| {
        let (r, d) = (Arc::clone(&r), Arc::clone(&d));
        let analyses = Arc::clone(&analyses);
        let mut input = worker.dataflow::<u64, _, _>(|scope| {
            let (input, stats) = scope.new_collection::<ArmKey, Moments>();
            let out = results(stats, analyses, Windows::new(WIDTH));
            out.results.inspect(move |w| {
                for (row, _) in &w.entries {
                    r.lock().unwrap().push((w.window_start_ms, row.clone()));
                }
            });
            out.decisions.inspect(move |w| {
                d.lock()
                    .unwrap()
                    .extend(w.entries.iter().map(|(x, _)| x.clone()));
            });
            input
        });
        for (i, window) in plan.iter().enumerate() {
            let at = BASE + i as u64 * WIDTH + 1000;
            input.advance_to(at);
            for (arm, added, retracted) in window {
                for y in added {
                    input.update_at(key(arm), at, Moments::unit(fixed(*y).unwrap(), None));
                }
                for y in retracted {
                    input.update_at(
                        key(arm),
                        at,
                        Moments::unit(fixed(*y).unwrap(), None).negated(),
                    );
                }
            }
            input.flush();
            worker.step();
        }
        input.close();
    });
    let rows = rows.lock().unwrap().clone();
    let decisions = decisions.lock().unwrap().clone();
    (rows, decisions)
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

#[test]
fn rows_are_the_statistics_of_the_sums_at_each_window_end() {
    let plan: Plan = vec![
        vec![
            ("control", units(150, 10.0), vec![]),
            ("treatment", units(150, 10.2), vec![]),
        ],
        vec![
            ("control", units(150, 10.0), vec![]),
            ("treatment", units(150, 10.2), units(20, 10.2)),
        ],
        vec![],
        vec![
            ("control", units(150, 10.0), vec![]),
            ("treatment", units(150, 10.2), vec![]),
        ],
    ];
    let (rows, _) = run(plan.clone(), analysis());
    // One row per metric and arm per window, the last window with data included.
    assert_eq!(rows.len(), 2 * plan.len());
    let mut sums: BTreeMap<&str, Moments> = BTreeMap::new();
    let mut last_p = 1.0f64;
    for (i, window) in plan.iter().enumerate() {
        for (arm, added, retracted) in window {
            let s = sums.entry(arm).or_default();
            for y in added {
                *s = s.plus(&Moments::unit(fixed(*y).unwrap(), None));
            }
            for y in retracted {
                *s = s.plus(&Moments::unit(fixed(*y).unwrap(), None).negated());
            }
        }
        let start = BASE / WIDTH * WIDTH + i as u64 * WIDTH;
        let here: Vec<&ResultRow> = rows
            .iter()
            .filter(|(w, _)| *w == start)
            .map(|(_, r)| r)
            .collect();
        assert_eq!(here.len(), 2, "window {i}");
        for row in here {
            let s = sums[&*row.arm].summary();
            assert_eq!(row.units, s.n);
            assert!((row.mean - s.mean_y).abs() < 1e-12 && (row.variance - s.var_y).abs() < 1e-12);
            if let Some(a) = row.absolute {
                let c = sums["control"].summary();
                let want = sightline_stats::effect::absolute(&s, &c).unwrap();
                assert!((a.estimate - want.estimate).abs() < 1e-12);
                // Monotone over looks.
                assert!(a.p_value <= last_p);
                last_p = a.p_value;
            }
        }
    }
}

#[test]
fn a_planted_regression_kills_after_exactly_three_breached_intervals() {
    let window = |t: f64| {
        vec![
            ("control", units(200, 10.0), vec![]),
            ("treatment", units(200, t), vec![]),
        ]
    };
    let plan: Plan = vec![
        window(10.0),
        window(13.0),
        window(13.0),
        window(13.0),
        window(13.0),
    ];
    let (rows, decisions) = run(plan, analysis());
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
    // Keyed by experiment, rule and epoch; evidence attached.
    let kill = &decisions[3];
    assert_eq!(
        (&*kill.experiment, &*kill.rule, kill.epoch),
        ("exp", "latency", 3)
    );
    assert!(kill.bound.unwrap() > 0.0 && kill.units.iter().all(|(_, n)| *n >= 100));
    assert!(rows.iter().rev().take(2).all(|(_, r)| r.state == "killed"));
}

#[test]
fn a_transient_breach_of_two_intervals_does_not_kill() {
    // Two windows of a regression, then its units are retracted (a fixed deploy).
    let plan: Plan = vec![
        vec![
            ("control", units(300, 10.0), vec![]),
            ("treatment", units(300, 10.0), vec![]),
        ],
        vec![
            ("control", units(100, 10.0), vec![]),
            ("treatment", units(100, 14.0), vec![]),
        ],
        vec![
            ("control", units(100, 10.0), vec![]),
            ("treatment", units(100, 14.0), vec![]),
        ],
        vec![
            ("control", units(200, 10.0), vec![]),
            (
                "treatment",
                units(200, 10.0),
                [units(100, 14.0), units(100, 14.0)].concat(),
            ),
        ],
        vec![
            ("control", units(200, 10.0), vec![]),
            ("treatment", units(200, 10.0), vec![]),
        ],
    ];
    let (_, decisions) = run(plan, analysis());
    let breached: Vec<u32> = decisions.iter().map(|d| d.breached_intervals).collect();
    assert_eq!(breached, [0, 1, 2, 0, 0], "{decisions:#?}");
    assert!(actions(&decisions).iter().all(|a| *a == Action::Hold));
}

#[test]
fn a_sample_ratio_mismatch_alone_holds_unless_configured_to_kill() {
    let plan: Plan = vec![
        vec![
            ("control", units(700, 10.0), vec![]),
            ("treatment", units(300, 10.0), vec![])
        ];
        3
    ];
    let (rows, decisions) = run(plan.clone(), analysis());
    assert!(actions(&decisions).iter().all(|a| *a == Action::Hold));
    assert!(
        rows.iter()
            .all(|(_, r)| r.state == "unhealthy" && r.srm_p_value < 0.001)
    );
    let (_, decisions) = run(
        plan,
        Analysis {
            srm_kills: true,
            ..analysis()
        },
    );
    assert_eq!(actions(&decisions)[0], Action::Kill);
}
