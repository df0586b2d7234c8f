//! The sampling contract end to end: a replay publishes rate tables; the same events, kept the
//! way an SDK keeps them (a hash of the user against its segment's published rate, never a
//! random draw) and stamped with `sample_rate`, replay to weighted counts within the
//! statistical error of the unsampled replay's counts, and to funnel units and conversions
//! within theirs, while their raw counts are far off.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use arrow_array::{Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
use common::{read_table, replay};
use sightline::generator::{Generator, GeneratorConfig};

/// A fixed 64-bit hash of the unit (FNV-1a), as uniform in [0, 1).
fn unit_hash(unit: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in unit.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Mix the low bits up (FNV's are weak), then take 53 bits.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn config() -> sightline::config::Config {
    let mut config = common::config(1);
    config.pipeline.window_ms = 60_000;
    config.sampling.budget_events_per_second = 8.0;
    config.sampling.interval_windows = 2;
    config
}

/// Every published table: its end (ms) → rate per segment (`*/*/*` included).
fn tables(lake: &std::path::Path) -> BTreeMap<i64, BTreeMap<String, f64>> {
    let mut out: BTreeMap<i64, BTreeMap<String, f64>> = BTreeMap::new();
    for b in read_table(lake, "sampling_budgets") {
        let col = |n: &str| b.column_by_name(n).unwrap_or_else(|| panic!("{n}"));
        let end = col("window_end")
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .expect("timestamp");
        let segment = col("segment")
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("str");
        let rate = col("rate")
            .as_any()
            .downcast_ref::<Float64Array>()
            .expect("f64");
        for i in 0..b.num_rows() {
            out.entry(end.value(i) / 1000)
                .or_default()
                .insert(segment.value(i).to_owned(), rate.value(i));
        }
    }
    out
}

/// `event_counts` summed per event name: (count, weighted count).
fn totals(lake: &std::path::Path) -> BTreeMap<String, (i64, f64)> {
    let mut out: BTreeMap<String, (i64, f64)> = BTreeMap::new();
    for route in common::routes(lake) {
        for b in read_table(&route, "event_counts") {
            let col = |n: &str| b.column_by_name(n).unwrap_or_else(|| panic!("{n}"));
            let name = col("event_name")
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("str");
            let count = col("count")
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("i64");
            let weighted = col("weighted_count")
                .as_any()
                .downcast_ref::<Float64Array>()
                .expect("f64");
            for i in 0..b.num_rows() {
                let t = out.entry(name.value(i).to_owned()).or_default();
                t.0 += count.value(i);
                t.1 += weighted.value(i);
            }
        }
    }
    out
}

/// `funnels` (breakdown `all`, both routes, all entry windows) per (funnel, step): (units,
/// weighted units, Σ over rows of an estimate of the weighted units' variance). A row's units
/// were seen with probability 1 / w each, w = weighted ÷ units when they share a weight, so
/// Σ w (w − 1) over them estimates the variance of its weighted units (Horvitz–Thompson).
fn funnel_units(lake: &std::path::Path) -> BTreeMap<(String, i64), (i64, f64, f64)> {
    let mut out: BTreeMap<(String, i64), (i64, f64, f64)> = BTreeMap::new();
    for route in common::routes(lake) {
        for b in read_table(&route, "funnels") {
            let col = |n: &str| b.column_by_name(n).unwrap_or_else(|| panic!("{n}"));
            let text = |n: &str| {
                col(n)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .expect("str")
                    .clone()
            };
            let (funnel, breakdown) = (text("funnel"), text("breakdown"));
            let int = |n: &str| {
                col(n)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("i64")
                    .clone()
            };
            let (step, units) = (int("step"), int("units"));
            let weighted = col("weighted_units")
                .as_any()
                .downcast_ref::<Float64Array>()
                .expect("f64");
            for i in (0..b.num_rows()).filter(|&i| breakdown.value(i) == "all") {
                let t = out
                    .entry((funnel.value(i).to_owned(), step.value(i)))
                    .or_default();
                let (n, w) = (units.value(i), weighted.value(i));
                t.0 += n;
                t.1 += w;
                if n > 0 {
                    t.2 += w * (w / n as f64 - 1.0);
                }
            }
        }
    }
    out
}

#[test]
fn weighted_counts_of_a_sampled_replay_match_the_unsampled_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut generator = Generator::new(GeneratorConfig {
        seed: 29,
        events_per_second: 40.0,
        late_fraction: 0.0,
        bad_fraction: 0.0,
        ..GeneratorConfig::default()
    });
    let lines: Vec<Vec<u8>> = (0..40_000)
        .map(|_| {
            let mut line = Vec::new();
            generator.next_line(&mut line);
            line
        })
        .collect();
    let write = |name: &str, lines: &[Vec<u8>]| {
        let path = dir.path().join(name);
        std::fs::write(&path, lines.join(&b'\n')).expect("write");
        path
    };
    let full_lake = dir.path().join("full");
    replay(&write("full.ndjson", &lines), &full_lake, config());
    let tables = tables(&full_lake);
    assert!(tables.len() >= 4, "{} rate tables", tables.len());
    assert!(
        tables.values().flat_map(|t| t.values()).any(|r| *r < 0.5),
        "the budget throttles something: {tables:?}"
    );

    // Keep each event as an SDK would, with the newest table published by its time (before
    // the first one, everything), and stamp it; per event name and unit, the rates of the
    // unit's events (for the estimator's exact variance).
    let mut kept = Vec::new();
    let mut units: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for line in &lines {
        let mut event: serde_json::Value = serde_json::from_slice(line).expect("a generated event");
        let text = |k: &str| event[k].as_str().unwrap_or_default().to_owned();
        let segment = format!(
            "{}/{}/{}",
            text("feature_area"),
            text("event_type"),
            text("app_version")
        );
        // Errors and feedback are never sampled (`sampling.never-sampled`).
        let never =
            text("event_type") == "error" || text("event_name") == "project_feedback_submitted";
        let at = chrono::DateTime::parse_from_rfc3339(&text("timestamp"))
            .expect("a timestamp")
            .timestamp_millis();
        let published = tables.range(..=at).next_back().map(|(_, t)| t);
        let rate = match published {
            _ if never => 1.0,
            None => 1.0,
            Some(t) => t
                .get(&segment)
                .or_else(|| t.get("*/*/*"))
                .copied()
                .unwrap_or(1.0),
        };
        let user = text("user_id");
        units
            .entry(text("event_name"))
            .or_default()
            .entry(user.clone())
            .or_default()
            .push(rate);
        if unit_hash(&user) < rate {
            event["sample_rate"] = serde_json::json!(rate);
            kept.push(serde_json::to_vec(&event).expect("json"));
        }
    }
    assert!(
        kept.len() < lines.len() / 2,
        "kept {} of {}",
        kept.len(),
        lines.len()
    );
    let sampled_lake = dir.path().join("sampled");
    replay(&write("sampled.ndjson", &kept), &sampled_lake, config());

    let (full, sampled) = (totals(&full_lake), totals(&sampled_lake));
    let mut raw_off = BTreeSet::new();
    for (name, (count, _)) in &full {
        // The estimator's variance, exactly: for a unit whose events have rates p₁ ≤ … ≤ pₖ
        // and a uniform hash h, Y(h) = Σ 1[h < pᵢ] / pᵢ is constant between the rates.
        let mut variance = 0.0;
        for rates in units[name].values() {
            let mut ps = rates.clone();
            ps.sort_by(f64::total_cmp);
            let mut second = 0.0;
            let mut from = 0.0;
            for (i, p) in ps.iter().enumerate() {
                let y: f64 = ps[i..].iter().map(|q| 1.0 / q).sum();
                second += (p - from) * y * y;
                from = *p;
            }
            let n = ps.len() as f64;
            variance += second - n * n;
        }
        let (raw, weighted) = sampled.get(name).copied().unwrap_or_default();
        let sd = variance.sqrt();
        assert!(
            (weighted - *count as f64).abs() <= 4.0 * sd + 1e-6,
            "{name}: weighted {weighted} against {count} (sd {sd:.1})"
        );
        if (raw as f64 - *count as f64).abs() > 4.0 * sd {
            raw_off.insert(name.clone());
        }
    }
    println!(
        "kept {} of {} events; raw counts off by more than 4 sd for {raw_off:?}",
        kept.len(),
        lines.len()
    );
    // Without the weights the counts are wrong: the test can tell.
    assert!(
        raw_off.len() >= 3,
        "unweighted counts of a sampled stream should be far off: {raw_off:?}"
    );

    // Funnels: a user is kept whole by its hash, so it is seen through steps 1…k iff its hash
    // is below the smallest rate of its events there, and weighs the inverse. Weighted units
    // per step fall within 4 sd of the unsampled units, and so does the conversion from entry
    // (its sd by the delta method without the steps' covariance, which is positive and would
    // only narrow it); the raw units do not.
    let (full, sampled) = (funnel_units(&full_lake), funnel_units(&sampled_lake));
    assert!(
        full.keys().filter(|(_, step)| *step > 1).count() >= 2,
        "funnel rows: {full:?}"
    );
    let mut raw_units_off = Vec::new();
    for ((funnel, step), (units, _, _)) in &full {
        let (raw, weighted, variance) = sampled
            .get(&(funnel.clone(), *step))
            .copied()
            .unwrap_or_default();
        let sd = variance.sqrt();
        assert!(
            (weighted - *units as f64).abs() <= 4.0 * sd + 1e-6,
            "{funnel} step {step}: weighted units {weighted} against {units} (sd {sd:.1})"
        );
        if (raw as f64 - *units as f64).abs() > 4.0 * sd.max(1.0) {
            raw_units_off.push((funnel.clone(), *step));
        }
        let entry = &full[&(funnel.clone(), 1)];
        let sampled_entry = sampled
            .get(&(funnel.clone(), 1))
            .copied()
            .unwrap_or_default();
        if *step > 1 && entry.0 > 0 && sampled_entry.1 > 0.0 {
            let truth = *units as f64 / entry.0 as f64;
            let estimate = weighted / sampled_entry.1;
            let sd = estimate
                * (variance / weighted.powi(2).max(1.0)
                    + sampled_entry.2 / sampled_entry.1.powi(2))
                .sqrt();
            assert!(
                (estimate - truth).abs() <= 4.0 * sd + 1e-9,
                "{funnel} step {step}: conversion {estimate:.4} against {truth:.4} (sd {sd:.4})"
            );
            println!(
                "{funnel} step {step}: conversion {estimate:.4} (sampled) against {truth:.4}, sd {sd:.4}"
            );
        }
    }
    assert!(
        !raw_units_off.is_empty(),
        "unweighted funnel units of a sampled stream should be far off"
    );
}
