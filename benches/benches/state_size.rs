//! State memory per active unit of the funnels and the experiments, measured: how much this
//! process's resident memory grows per unit when 200,000 units (20,000 for the 30-window case)
//! are built as the operators keep them (allocator overhead included): a funnel's `Progress` in
//! a hash map, for the two built-in funnels in the shapes they take, and the experiments'
//! `UnitStates` under the default setup (default metrics, 14-day CUPED history). Run by
//! `benches/run`; prints one line per case.
//!
//! ```text
//! cargo bench -p sightline-benches --bench state_size
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use sightline::config::Config;
use sightline_operators::Windows;
use sightline_operators::experiment::UnitStates;
use sightline_operators::funnel::{FunnelDef, Progress, Touch};
use sightline_schemas::{
    DataSensitivity, Event, EventName, Kept, Label, Links, PiiClassification, Platform,
    PrivacyCounts, Source,
};

/// This process's resident memory, bytes (`VmRSS`).
fn rss_bytes() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        .map_or(0, |kib| kib * 1024)
}

const UNITS: u64 = 200_000;
const WINDOW_MS: u64 = 60_000;
const START: u64 = 1_769_178_600_000;

/// Bytes per unit of `units` units, each given the touches `touches(unit)` in order.
fn per_unit(def: &FunnelDef, count: u64, touches: impl Fn(u64) -> Vec<Touch>) -> f64 {
    let windows = Windows::new(WINDOW_MS);
    let before = rss_bytes();
    let mut units: HashMap<(bool, u64), Progress> = HashMap::new();
    for unit in 0..count {
        let progress: &mut Progress = units.entry((false, unit)).or_default();
        for touch in touches(unit) {
            progress.apply(def, windows, &touch);
        }
    }
    let after = rss_bytes();
    // Kept, not freed: freed memory would be reused by the next case and hide its growth.
    std::mem::forget(units);
    (after - before) as f64 / count as f64
}

/// Bytes per unit of `count` experiment units, each given the events `events(unit)` in order.
fn per_experiment_unit(
    states: &mut UnitStates,
    count: u64,
    events: impl Fn(u64) -> Vec<Event>,
) -> f64 {
    let before = rss_bytes();
    for unit in 0..count {
        for event in events(unit) {
            states.apply(&event);
        }
    }
    let after = rss_bytes();
    (after - before) as f64 / count as f64
}

fn pseudonym() -> sightline_schemas::Pseudonym {
    sightline_schemas::Pseudonym::try_from("k.0.000000000000000000000000")
        .unwrap_or_else(|_| unreachable!())
}

/// An event of `user` (tenant 1) named `name` at `at_ms`, with `assignments`.
fn event(name: &str, at_ms: u64, user: u64, assignments: &Arc<[(Label, Label)]>) -> Event {
    let event_name =
        EventName::from_name(name).unwrap_or_else(|| unreachable!("`{name}` is in the catalog"));
    Event {
        event_time_ms: at_ms as i64,
        event_name,
        event_type: event_name.spec().event_type,
        event_id: format!("{user}-{at_ms}"),
        source: Source::Server,
        platform: Platform::Web,
        app_version: "4.2.0".into(),
        tenant_id: pseudonym(),
        user_id: pseudonym(),
        session_id: pseudonym(),
        links: Links {
            tenant: 1,
            user: user + 1,
            session: 0,
        },
        user_role: None,
        country: None,
        kept: Kept::new(Vec::new()),
        feature_area: "projects".into(),
        workflow_name: None,
        surface: None,
        experiment_assignments: Arc::clone(assignments),
        pii_classification: PiiClassification::None,
        data_sensitivity: DataSensitivity::Internal,
        weight_micros: sightline_schemas::WEIGHT_ONE,
        latency_us: event_name
            .spec()
            .latency()
            .map(|_| 1_000 + user % 5_000 * 97),
        privacy: PrivacyCounts::default(),
    }
}

fn touch(at_ms: u64, step: usize, breakdown: &Arc<[(Label, Label)]>) -> Touch {
    Touch {
        at_ms,
        order: at_ms,
        steps: 1 << step,
        exclusions: 0,
        breakdown: if step == 0 {
            Arc::clone(breakdown)
        } else {
            Arc::from(Vec::new())
        },
        weight_micros: sightline_schemas::WEIGHT_ONE,
    }
}

fn main() -> anyhow::Result<()> {
    let defs = Config::default().funnel_defs()?;
    let by_name = |name: &str| {
        defs.iter()
            .find(|d| d.name.as_ref() == name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no built-in funnel {name}"))
    };
    let projects = by_name("project_creation")?;
    let outcomes = by_name("command_queue_outcomes")?;
    // Breakdown values as the decoder shares them: labels interned, one slice per step-1 event.
    let experiments: Arc<[(Label, Label)]> = Arc::from(vec![
        (Label::from("experiment:exp_a"), Label::from("control")),
        (Label::from("experiment:exp_b"), Label::from("treatment")),
    ]);
    let action: Arc<[(Label, Label)]> = Arc::from(vec![(
        Label::from("properties.action_type"),
        Label::from("send_email"),
    )]);
    let cases: Vec<(&str, f64)> = vec![
        (
            "project_creation: entered one window, reached step 2 (2 experiments)",
            per_unit(&projects, UNITS, |_| {
                vec![
                    touch(START, 0, &experiments),
                    touch(START + 5_000, 1, &experiments),
                ]
            }),
        ),
        (
            "project_creation: entered 30 windows, 3 steps in each",
            per_unit(&projects, UNITS / 10, |_| {
                (0..30)
                    .flat_map(|w| {
                        let at = START + w * WINDOW_MS;
                        (0..3).map(move |s| (at + s as u64 * 1_000, s))
                    })
                    .map(|(at, s)| touch(at, s, &experiments))
                    .collect()
            }),
        ),
        (
            "command_queue_outcomes: generated, accepted, executed (one window)",
            per_unit(&outcomes, UNITS, |_| {
                (0..3)
                    .map(|s| touch(START + s as u64 * 10_000, s, &action))
                    .collect()
            }),
        ),
    ];
    let config = Config::default();
    let setup = Arc::new(config.experiment_setup(&mut |_| 1)?);
    let mut states = UnitStates::new(Arc::clone(&setup), Windows::new(WINDOW_MS));
    let none: Arc<[(Label, Label)]> = Arc::from(Vec::new());
    let both: Arc<[(Label, Label)]> = Arc::from(vec![
        (Label::from("exp_aps_ranking_v2"), Label::from("variant_a")),
        (Label::from("exp_guided_setup"), Label::from("treatment")),
    ]);
    let day = 86_400_000;
    let mut cases = cases;
    cases.push((
        "experiments (default setup): 3 events the day before, then 5 in two experiments (3 with a latency)",
        per_experiment_unit(&mut states, UNITS, |u| {
            vec![
                event("project_viewed", START - day, u, &none),
                event("project_created", START - day + 5_000, u, &none),
                event("task_assigned", START - day + 9_000, u, &none),
                event("project_viewed", START, u, &both),
                event("recommendation_viewed", START + 1_000, u, &both),
                event("recommendation_accepted", START + 2_000, u, &both),
                event("action_executed", START + 3_000, u, &both),
                event("action_failed", START + 4_000, u, &both),
            ]
        }),
    ));
    std::mem::forget(states);
    for (case, bytes) in cases {
        println!("state per active unit: {case}: {bytes:.0} bytes");
    }
    Ok(())
}
