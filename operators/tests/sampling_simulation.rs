//! The budgets by simulation, on the rate computation directly ([`plan`]): a stream of stable
//! segments into which a new release arrives with elevated errors, then recovers.
//!
//! The release's segments must reach rate 1 within two intervals while the stable segments
//! are throttled and the expected kept total stays within 5% of the budget; when its error
//! share is back at the baseline, its rate decays. The same stream with the error and release
//! terms weighted 0 must *not* keep the release whole: the test can fail.

use std::collections::BTreeMap;
use std::sync::Arc;

use sightline_operators::sampling::plan::{self, BudgetTable, SamplingState};
use sightline_operators::sampling::{
    RiskWeights, SamplingRules, Segment, SegmentPart, SegmentTally, WEIGHT_ONE,
};
use sightline_schemas::Label;

const WINDOW_MS: u64 = 60_000;
const INTERVAL_WINDOWS: u64 = 5;
const INTERVAL_MS: u64 = WINDOW_MS * INTERVAL_WINDOWS;
const RELEASE_AT: u64 = 10;
const RECOVERED_AT: u64 = 14;
const INTERVALS: u64 = 30;
/// The simulation's first interval (2026-01-01T00:00Z): event times are epoch milliseconds.
const START_MS: u64 = 1_767_225_600_000;
const AREAS: [&str; 4] = ["projects", "tasks", "search", "checkout"];

fn rules(weights: RiskWeights) -> SamplingRules {
    SamplingRules {
        budget_per_second: 12.0,
        interval_windows: INTERVAL_WINDOWS,
        new_release_ms: 12 * INTERVAL_MS,
        weights,
        ..SamplingRules::default()
    }
}

fn segment(area: &str, kind: &str, version: &str) -> Segment {
    [area, kind, version].into_iter().map(Label::from).collect()
}

/// One window's tallies: `n` events of `kind` in `area` on `version` (errors are never
/// sampled, the rest is).
fn add(
    tallies: &mut BTreeMap<SegmentPart, SegmentTally>,
    area: &str,
    kind: &str,
    version: &str,
    n: i64,
) {
    let error = kind == "error";
    let tally = SegmentTally {
        events: n,
        errors: if error { n } else { 0 },
        sampleable_micros: if error { 0 } else { n * WEIGHT_ONE },
        always_micros: if error { n * WEIGHT_ONE } else { 0 },
    };
    let part = SegmentPart {
        segment: segment(area, kind, version),
        app_version: Label::from(version),
        tenant: 0,
        assignments: Arc::from(Vec::new()),
    };
    use differential_dataflow::difference::Semigroup;
    tallies.entry(part).or_default().plus_equals(&tally);
}

/// One window of the stream in interval `i`.
fn window(i: u64) -> BTreeMap<SegmentPart, SegmentTally> {
    let mut t = BTreeMap::new();
    for area in AREAS {
        add(&mut t, area, "view", "4.2.0", 4_000);
        add(&mut t, area, "action", "4.2.0", 2_000);
        add(&mut t, area, "error", "4.2.0", 60);
    }
    if i >= RELEASE_AT {
        let errors = if i < RECOVERED_AT { 30 } else { 1 };
        add(&mut t, "checkout", "view", "4.3.0", 80);
        add(&mut t, "checkout", "action", "4.3.0", 40);
        add(&mut t, "checkout", "error", "4.3.0", errors);
    }
    t
}

/// Every interval's table.
fn simulate(rules: &SamplingRules) -> Vec<BudgetTable> {
    let mut state = SamplingState::default();
    let mut tables = Vec::new();
    for i in 0..INTERVALS {
        let start = START_MS + i * INTERVAL_MS;
        for w in 0..INTERVAL_WINDOWS {
            let end = start + (w + 1) * WINDOW_MS;
            plan::add_window(&mut state, start, end, window(i), Vec::new());
        }
        tables.push(plan::close_interval(&mut state, rules, start + INTERVAL_MS));
        assert_eq!(tables.last().map(|t| t.window_start_ms), Some(start));
    }
    tables
}

fn rate(table: &BudgetTable, area: &str, kind: &str, version: &str) -> f64 {
    let s = segment(area, kind, version);
    table
        .rows
        .iter()
        .find(|r| r.segment == s)
        .map(|r| r.rate)
        .unwrap_or_else(|| panic!("no row for {s:?} in v{}", table.version))
}

#[test]
fn a_failing_release_is_kept_whole_and_the_budget_holds() {
    let tables = simulate(&rules(RiskWeights::default()));
    for t in &tables {
        let off = (t.expected_kept - t.budget).abs() / t.budget;
        assert!(
            off <= 0.05,
            "v{}: expected {} against a budget of {}",
            t.version,
            t.expected_kept,
            t.budget
        );
    }
    let by_release = |i: u64| &tables[i as usize];
    let reached = (RELEASE_AT..RELEASE_AT + 2).find(|&i| {
        rate(by_release(i), "checkout", "view", "4.3.0") == 1.0
            && rate(by_release(i), "checkout", "action", "4.3.0") == 1.0
    });
    assert!(
        reached.is_some(),
        "the failing release's rates: {:?}",
        (RELEASE_AT..RELEASE_AT + 2)
            .map(|i| rate(by_release(i), "checkout", "view", "4.3.0"))
            .collect::<Vec<_>>()
    );
    // Stable flows are throttled meanwhile.
    for i in RELEASE_AT..RECOVERED_AT {
        for area in AREAS {
            let r = rate(by_release(i), area, "view", "4.2.0");
            assert!(r < 0.5, "{area} views at {r} in interval {i}");
        }
        let row = by_release(i)
            .rows
            .iter()
            .find(|r| r.segment == segment("checkout", "view", "4.3.0"))
            .expect("row");
        assert!(
            row.elevated_errors > 0.0 && row.new_release > 0.0,
            "{row:?}"
        );
    }
    // Recovered and ageing: its rate decays.
    let late: Vec<f64> = (RECOVERED_AT..INTERVALS)
        .map(|i| rate(by_release(i), "checkout", "view", "4.3.0"))
        .collect();
    assert!(
        late.windows(2).all(|w| w[1] <= w[0] + 1e-9),
        "the release's rate after recovery: {late:?}"
    );
    let last = *late.last().expect("intervals");
    assert!(last < 0.5, "the release's rate at the end: {late:?}");
    // Errors are never sampled.
    assert_eq!(
        rate(by_release(RELEASE_AT), "checkout", "error", "4.3.0"),
        1.0
    );
}

/// Without the release and error terms the same release is throttled like the rest: what the
/// test above checks is the risk terms' doing.
#[test]
fn without_risk_terms_the_release_is_throttled() {
    let tables = simulate(&rules(RiskWeights {
        new_release: 0.0,
        error_rate: 0.0,
        ..RiskWeights::default()
    }));
    let r = rate(
        &tables[(RELEASE_AT + 1) as usize],
        "checkout",
        "view",
        "4.3.0",
    );
    assert!(r < 1.0, "rate {r}");
}

/// Same input, same tables, bit for bit.
#[test]
fn the_tables_are_deterministic() {
    let rules = rules(RiskWeights::default());
    assert_eq!(simulate(&rules), simulate(&rules));
}
