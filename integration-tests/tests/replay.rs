//! End to end: a generated file replayed through the whole pipeline, every table read back
//! with a Parquet reader and checked against an independent computation.

mod common;

use common::*;
use sightline::generator::LineKind;

fn failure_of(line: &[u8], kind: LineKind) -> Failure {
    // The generator says which lines are broken; the reference names their failure kind by
    // what was done to them.
    if kind != LineKind::Bad {
        return None;
    }
    let text = String::from_utf8_lossy(line);
    let kind = if line.is_empty() {
        "empty"
    } else if std::str::from_utf8(line).is_err() {
        "invalid_utf8"
    } else if text.starts_with("GET ") {
        "malformed_json"
    } else if !text.ends_with('}') {
        "truncated"
    } else if text.contains("zz_unknown_") {
        "unknown_event"
    } else if text.contains("\"user_id\":12345") {
        "wrong_type"
    } else {
        "missing_field"
    };
    // Records that are JSON objects are counted under the event name they declare, if it is a
    // registered one (an unknown name is input, not a label: it is counted as `unknown`).
    let name = serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v["event_name"].as_str().map(str::to_owned))
        .filter(|n| sightline_schemas::EventName::from_name(n).is_some());
    Some((name, kind.to_string()))
}

fn check(workers: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("events.ndjson");
    // Broken records first: they are read before any event time is known, and are processed
    // at the first accepted event's tick.
    let mut lines = vec![
        (Vec::new(), LineKind::Bad),
        (b"GET / HTTP/1.1".to_vec(), LineKind::Bad),
        (b"{\"event_id\":".to_vec(), LineKind::Bad),
    ];
    lines.extend(generate(40_000, 7 + workers as u64, 0.003, 0.003));
    write_ndjson(&input, &lines);
    let lake = dir.path().join("lake");
    let summary = replay(&input, &lake, config(workers));

    let classified: Vec<(Vec<u8>, Failure)> = lines
        .iter()
        .map(|(l, k)| (l.clone(), failure_of(l, *k)))
        .collect();
    let want = Reference::compute(&classified, workers);
    assert!(
        want.late > 50 && want.rejected > 50,
        "the input exercises every path: {want:?}"
    );

    assert_eq!(summary.read, lines.len() as u64);
    assert_eq!(
        (summary.accepted, summary.rejected, summary.late),
        (want.accepted, want.rejected, want.late)
    );
    assert!(
        !want.restricted.counts.is_empty(),
        "the input has restricted events"
    );
    let [standard, restricted] = routes(&lake);
    assert_route_matches(&standard, &want.standard);
    assert_route_matches(&restricted, &want.restricted);
    let dead = all_dead_letters(&lake);
    assert_eq!(
        dead.keys()
            .map(|k| k.2)
            .collect::<std::collections::BTreeSet<_>>(),
        want.dead
    );
    // Every dead letter says why; every schema failure says where (pointer) and which rule
    // (keyword). Syntax failures and late events have no schema violation to name.
    let syntax = [
        "late",
        "empty",
        "oversize",
        "invalid_utf8",
        "truncated",
        "malformed_json",
    ];
    for ((_, _, offset), seen) in &dead {
        assert!(
            !seen.reason.trim().is_empty(),
            "line {offset} has no reason"
        );
        if !syntax.contains(&seen.kind.as_str()) {
            assert!(
                !seen.violations.is_empty(),
                "line {offset} ({}) names no violation",
                seen.kind
            );
            for v in &seen.violations {
                assert!(
                    v["pointer"].is_string() && !v["keyword"].as_str().unwrap_or("").is_empty()
                );
            }
        }
    }
    // Identifiers are stored as pseudonyms: every dead letter that kept its record (late
    // events, schema failures) holds `<key-id>.<period>.<24 hex digits>` where the input had
    // the raw identifier.
    let pseudonym = |v: &str| {
        let parts: Vec<&str> = v.split('.').collect();
        parts.len() == 3
            && parts[0] == "k1"
            && parts[1].parse::<u64>().is_ok()
            && parts[2].len() == 24
            && parts[2].bytes().all(|b| b.is_ascii_hexdigit())
    };
    let mut checked = 0;
    for ((_, _, offset), seen) in &dead {
        let Some(Ok(serde_json::Value::Object(kept))) = seen
            .payload
            .as_deref()
            .map(serde_json::from_str::<serde_json::Value>)
        else {
            continue;
        };
        let raw: serde_json::Value =
            serde_json::from_slice(&lines[*offset as usize].0).unwrap_or_default();
        for field in ["user_id", "tenant_id", "session_id"] {
            // A wrong-typed identifier (a number) is an identifier all the same.
            let original = match &raw[field] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                _ => continue,
            };
            let stored = kept.get(field).and_then(|v| v.as_str());
            assert!(
                stored.is_some_and(pseudonym),
                "line {offset}: {field} stored as {:?}",
                kept.get(field)
            );
            assert_ne!(
                stored,
                Some(original.as_str()),
                "line {offset}: {field} kept raw"
            );
            checked += 1;
        }
    }
    assert!(checked > 150, "only {checked} identifiers checked");
    assert!(
        routes(&lake)
            .iter()
            .all(|r| !privacy_counters(r).contains_key("pii_violations"))
    );

    // One file per table and window, Hive-style.
    let windows: std::collections::BTreeSet<u64> = routes(&lake)
        .iter()
        .flat_map(|r| quality(r).into_keys().map(|k| k.0))
        .collect();
    assert_eq!(summary.windows as usize, windows.len());
}

#[test]
fn replay_matches_the_reference_on_one_worker() {
    check(1);
}

#[test]
fn replay_matches_the_reference_on_two_workers() {
    check(2);
}

#[test]
fn replaying_twice_rewrites_the_same_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("events.ndjson");
    write_ndjson(&input, &generate(5_000, 3, 0.01, 0.01));
    let lake = dir.path().join("lake");
    let first = replay(&input, &lake, config(2));
    let counts = event_counts(&lake);
    let second = replay(&input, &lake, config(2));
    assert_eq!(first, second);
    assert_eq!(
        event_counts(&lake),
        counts,
        "a rewrite replaces, never duplicates"
    );
}
