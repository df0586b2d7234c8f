#![allow(clippy::unwrap_used)]

//! Rollouts by tenant through the experiment operator: the difference-in-differences rows at
//! every closed window equal a batch recomputation from the events (per tenant and period:
//! distinct users, errors, events), a planted effect on the rolled-out tenants' errors is
//! found while their unchanged event counts are not, a trend that starts before the rollout
//! fails the pre-trend check, and a restart from any snapshot (saved as JSON, as the state
//! sink saves it) gives the same rows.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use differential_dataflow::input::Input;
use sightline_operators::Windows;
use sightline_operators::experiment::{
    DidRow, DidState, ExperimentDef, Lookback, Metric, MetricKind, Rollout, Saved, Setup,
    experiments,
};
use sightline_operators::funnel::Resume;
use sightline_operators::state::{StateHooks, StateShard};
use sightline_schemas::{
    DataSensitivity, Event, EventName, Kept, Links, PiiClassification, Platform, PrivacyCounts,
    Source,
};
use sightline_stats::did::{CohortChanges, did};
use timely::dataflow::operators::Inspect;
use timely::dataflow::operators::probe::Handle as ProbeHandle;

const WIDTH: u64 = 10_000;
const BASE: u64 = 1_769_178_600_000;
const WINDOWS: u64 = 16;
const LOOKBACK: Lookback = Lookback {
    periods: 6,
    period_ms: WIDTH,
};
/// Cohorts: start (ms after BASE) and tenants.
const COHORTS: [(u64, &[u64]); 2] = [(60_000, &[1, 2, 3]), (100_000, &[4, 5])];
const TENANTS: u64 = 16;

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One generated event: tenant, user, time, whether it is an error.
type Generated = (u64, u64, u64, bool);

/// The events of every window: each tenant's users (a tenant-dependent number, some idle in a
/// window) emit a few events, some errors. After its cohort's start, a rolled-out tenant's
/// user turns one more event in two into an error (the event count is unchanged). With
/// `trend`, the first cohort's tenants' errors grow window by window from the start on.
fn generate(trend: bool) -> Vec<Vec<Generated>> {
    (0..WINDOWS)
        .map(|w| {
            let mut out = Vec::new();
            for tenant in 1..=TENANTS {
                let level = tenant % 4;
                let start = COHORTS
                    .iter()
                    .find(|(_, ts)| ts.contains(&tenant))
                    .map(|(s, _)| *s);
                for user in 1..=(5 + level) {
                    let h = mix(tenant << 40 ^ user << 20 ^ w);
                    if h.is_multiple_of(7) {
                        continue;
                    }
                    let events = 2 + h % 3 + level;
                    let mut errors = u64::from(h.is_multiple_of(5)) + u64::from(level == 3);
                    let at = BASE + w * WIDTH + 1000;
                    if start.is_some_and(|s| BASE + s <= at) && (h >> 8).is_multiple_of(2) {
                        errors += 1;
                    }
                    if trend && start == Some(COHORTS[0].0) {
                        errors += w / 3;
                    }
                    for k in 0..events {
                        out.push((tenant, user, at + k * 10, k < errors.min(events)));
                    }
                }
            }
            out
        })
        .collect()
}

fn event((tenant, user, at, error): Generated, id: usize) -> Event {
    let name = if error {
        "project_creation_error"
    } else {
        "project_viewed"
    };
    let event_name = EventName::from_name(name).unwrap();
    Event {
        event_time_ms: at as i64,
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
            tenant: tenant * 1000,
            user: tenant * 1000 + user,
            session: 0,
        },
        user_role: None,
        country: None,
        kept: Kept::new(Vec::new()),
        feature_area: "projects".into(),
        workflow_name: None,
        surface: None,
        experiment_assignments: Vec::new().into(),
        pii_classification: PiiClassification::None,
        data_sensitivity: DataSensitivity::Internal,
        weight_micros: sightline_schemas::WEIGHT_ONE,
        latency_us: None,
        privacy: PrivacyCounts::default(),
    }
}

fn metrics() -> Vec<Metric> {
    vec![
        Metric {
            name: "errors".into(),
            kind: MetricKind::Errors,
        },
        Metric {
            name: "events".into(),
            kind: MetricKind::Events,
        },
        Metric {
            name: "error_rate".into(),
            kind: MetricKind::Ratio {
                numerator: 0,
                denominator: 1,
            },
        },
    ]
}

fn setup() -> Arc<Setup> {
    Arc::new(Setup {
        defs: vec![ExperimentDef {
            id: "rollout".into(),
            metrics: metrics(),
            tenants: None,
            phases: Vec::new(),
            rollout: Some(Rollout {
                cohorts: COHORTS
                    .iter()
                    .map(|(s, ts)| (BASE + s, ts.iter().map(|t| t * 1000).collect()))
                    .collect(),
                lookback: LOOKBACK,
            }),
        }],
        ..Setup::default()
    })
}

struct Emitted {
    rows: Vec<(u64, DidRow)>,
    shards: Vec<StateShard<Saved>>,
}

/// Runs `plan` through the operator (only the input at or after `resume.restored_at`).
fn run(plan: &[Vec<Generated>], save: bool, resume: Resume<Saved>) -> Emitted {
    let rows: Arc<Mutex<Vec<(u64, DidRow)>>> = Arc::default();
    let shards: Arc<Mutex<Vec<StateShard<Saved>>>> = Arc::default();
    let (r, sh) = (Arc::clone(&rows), Arc::clone(&shards));
    let plan = plan.to_vec();
    timely::execute_directly(move |worker| {
        let (r, sh) = (Arc::clone(&r), Arc::clone(&sh));
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
            let out = experiments(events, setup(), Windows::new(WIDTH), resume, hooks.as_ref());
            out.did.inspect(move |w| {
                for (row, _) in &w.entries {
                    r.lock().unwrap().push((w.window_start_ms, row.clone()));
                }
            });
            if let Some(state) = out.state {
                state.inspect(move |s| sh.lock().unwrap().push(s.clone()));
            }
            input
        });
        let mut id = 0;
        for (w, window) in plan.iter().enumerate() {
            let at = BASE + w as u64 * WIDTH + 1000;
            input.advance_to(at);
            for g in window {
                id += 1;
                if at >= restored_at {
                    input.update_at(event(*g, id), g.2, 1);
                }
            }
            input.flush();
            worker.step();
        }
        input.close();
    });
    let rows = rows.lock().unwrap().clone();
    let shards = shards.lock().unwrap().clone();
    Emitted { rows, shards }
}

/// A row as recomputed: metric, cohort, and (estimate, p-value) when there is one.
type Expected = (String, Option<u64>, Option<(f64, f64)>);

/// The batch recomputation: the rows of the window ending at `end` from every event before
/// it, per metric: each cohort that has started, then all of them when two have.
fn reference(plan: &[Vec<Generated>], end: u64) -> Vec<Expected> {
    // (tenant, period) → (users, errors, events).
    let mut cells: BTreeMap<(u64, u64), (BTreeSet<u64>, f64, f64)> = BTreeMap::new();
    for (tenant, user, at, error) in plan.iter().flatten() {
        if *at >= end {
            continue;
        }
        let cell = cells.entry((*tenant, *at / WIDTH)).or_default();
        cell.0.insert(*user);
        cell.1 += f64::from(u8::from(*error));
        cell.2 += 1.0;
    }
    let now = (end - 1) / WIDTH;
    let treated: BTreeSet<u64> = COHORTS
        .iter()
        .flat_map(|(_, ts)| ts.iter().copied())
        .collect();
    let controls: Vec<u64> = (1..=TENANTS).filter(|t| !treated.contains(t)).collect();
    let mut out = Vec::new();
    for metric in ["errors", "events", "error_rate"] {
        let value = |tenant: u64, period: u64| -> Option<f64> {
            let (users, errors, events) = cells.get(&(tenant, period))?;
            Some(match metric {
                "errors" => errors / users.len() as f64,
                "events" => events / users.len() as f64,
                _ => errors / events,
            })
        };
        let mean = |tenant: u64, from: u64, to: u64| -> Option<f64> {
            let vs: Vec<f64> = (from..to).filter_map(|p| value(tenant, p)).collect();
            (!vs.is_empty()).then(|| vs.iter().sum::<f64>() / vs.len() as f64)
        };
        let change = |tenant: u64, start: u64| -> Option<f64> {
            let s = start / WIDTH;
            Some(mean(tenant, s, now + 1)? - mean(tenant, s - 6, s)?)
        };
        let mut started = Vec::new();
        for (after, tenants) in COHORTS {
            let start = BASE + after;
            if start >= end {
                continue;
            }
            let cohort = CohortChanges {
                treated: tenants.iter().filter_map(|t| change(*t, start)).collect(),
                controls: controls.iter().map(|t| change(*t, start)).collect(),
            };
            let d = did(std::slice::from_ref(&cohort), 0.05);
            out.push((
                metric.to_owned(),
                Some(start),
                d.map(|d| (d.estimate, d.p_value)),
            ));
            started.push(cohort);
        }
        if started.len() > 1 {
            let d = did(&started, 0.05);
            out.push((metric.to_owned(), None, d.map(|d| (d.estimate, d.p_value))));
        }
    }
    out
}

#[test]
fn rollout_rows_equal_the_batch_recomputation_and_find_the_planted_effect() {
    let plan = generate(false);
    let out = run(&plan, false, Resume::default());
    let mut checked = 0;
    for w in 0..WINDOWS {
        let start = BASE + w * WIDTH;
        let got: Vec<&DidRow> = out
            .rows
            .iter()
            .filter(|(s, _)| *s == start)
            .map(|(_, r)| r)
            .collect();
        let want = reference(&plan, start + WIDTH);
        assert_eq!(got.len(), want.len(), "window {w}: rows");
        for (row, (metric, cohort, figures)) in got.iter().zip(&want) {
            assert_eq!(
                (&*row.metric, row.cohort_start_ms),
                (metric.as_str(), *cohort)
            );
            match (row.estimate, figures) {
                (Some(f), Some((estimate, p))) => {
                    assert!((f.estimate - estimate).abs() < 1e-9, "window {w} {metric}");
                    assert!((f.p_value - p).abs() < 1e-9, "window {w} {metric}");
                    checked += 1;
                }
                (None, None) => {}
                (got, want) => panic!("window {w} {metric}: {got:?} vs {want:?}"),
            }
        }
    }
    assert!(checked > 20, "only {checked} estimates compared");
    let last = |metric: &str| {
        out.rows
            .iter()
            .rev()
            .find(|(_, r)| &*r.metric == metric && r.cohort_start_ms.is_none())
            .map(|(_, r)| r.clone())
            .unwrap()
    };
    let errors = last("errors");
    assert_eq!(errors.state, DidState::SignificantPositive, "{errors:?}");
    assert_eq!((errors.treated_tenants, errors.control_tenants), (5, 11));
    // Each rolled-out user turns about half an event more into an error per window.
    let estimate = errors.estimate.unwrap().estimate;
    assert!((0.3..0.7).contains(&estimate), "{estimate}");
    let events = last("events");
    assert_eq!(events.state, DidState::Running, "{events:?}");
    assert_eq!(last("error_rate").state, DidState::SignificantPositive);
}

#[test]
fn a_trend_before_the_rollout_fails_the_pre_trend_check() {
    let plan = generate(true);
    let out = run(&plan, false, Resume::default());
    let first_cohort = out
        .rows
        .iter()
        .rev()
        .find(|(_, r)| &*r.metric == "errors" && r.cohort_start_ms == Some(BASE + COHORTS[0].0))
        .map(|(_, r)| r.clone())
        .unwrap();
    assert_eq!(first_cohort.state, DidState::PreTrend, "{first_cohort:?}");
    assert!(first_cohort.pre_trend.unwrap().estimate > 0.0);
    // Without the trend, the same cohort passes the check.
    let out = run(&generate(false), false, Resume::default());
    let clean = out
        .rows
        .iter()
        .rev()
        .find(|(_, r)| &*r.metric == "errors" && r.cohort_start_ms == Some(BASE + COHORTS[0].0))
        .map(|(_, r)| r.clone())
        .unwrap();
    assert!(clean.pre_trend.unwrap().p_value >= 0.05, "{clean:?}");
}

#[test]
fn a_restart_from_a_saved_panel_gives_the_same_rows() {
    let plan = generate(false);
    let full = run(&plan, true, Resume::default());
    assert!(full.shards.len() > 4, "{} snapshots", full.shards.len());
    for shard in [&full.shards[3], &full.shards[full.shards.len() / 2]] {
        // Saved as the state sink saves it: JSON.
        let records: Vec<(Saved, u64)> =
            serde_json::from_str(&serde_json::to_string(&shard.records).unwrap()).unwrap();
        assert!(
            records
                .iter()
                .any(|(r, _)| matches!(r, Saved::Experiment(..)))
        );
        let resumed = run(
            &plan,
            false,
            Resume {
                restored_at: shard.frontier,
                restored: records,
                written_before: 0,
                definition: 0,
            },
        );
        let after: Vec<&(u64, DidRow)> = full
            .rows
            .iter()
            .filter(|(s, _)| *s + WIDTH > shard.frontier)
            .collect();
        let got: Vec<&(u64, DidRow)> = resumed
            .rows
            .iter()
            .filter(|(s, _)| *s + WIDTH > shard.frontier)
            .collect();
        assert!(!after.is_empty());
        assert_eq!(got, after, "restart at {}", shard.frontier);
    }
}
