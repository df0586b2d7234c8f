//! Bad input: every kind of broken record is counted with its reason, the pipeline keeps
//! running, and the good events' aggregates are exactly those of the good events alone.

mod common;

use std::collections::BTreeMap;

use common::*;

fn good_lines() -> Vec<Vec<u8>> {
    generate(3_000, 5, 0.0, 0.0)
        .into_iter()
        .map(|(l, _)| l)
        .collect()
}

/// (line, expected failure kind, a fragment the reason must contain).
fn bad_lines(template: &[u8]) -> Vec<(Vec<u8>, &'static str, &'static str)> {
    let text = String::from_utf8(template.to_vec()).expect("utf-8 template");
    let mut invalid_utf8 = template.to_vec();
    let at = text.find("\"app_version\":\"").expect("app_version") + 16;
    invalid_utf8.splice(at..at, [0xC3, 0x28]);
    let mut ten_mb = b"{\"event_id\":\"".to_vec();
    ten_mb.extend(std::iter::repeat_n(b'x', 10 * 1024 * 1024));
    ten_mb.extend_from_slice(b"\"}");
    vec![
        (template[..template.len() / 3].to_vec(), "truncated", "EOF"),
        (
            b"{\"event_id\" \"x\"}".to_vec(),
            "malformed_json",
            "expected",
        ),
        (
            text.replacen("\"user_id\":\"u_", "\"user_id\":7,\"zz\":\"", 1)
                .replacen(",\"zz\":\"", ",\"user_role\":\"", 1)
                .into_bytes(),
            "wrong_type",
            "/user_id",
        ),
        (
            remove_field(&text, "tenant_id").into_bytes(),
            "missing_field",
            "tenant_id",
        ),
        (
            text.replacen("\"platform\":\"", "\"platform\":\"toaster_", 1)
                .into_bytes(),
            "invalid_value",
            "/platform",
        ),
        (
            text.replacen(
                "\"source\":",
                "\"ip_address\":\"203.0.113.9\",\"source\":",
                1,
            )
            .into_bytes(),
            "unknown_field",
            "ip_address",
        ),
        (Vec::new(), "empty", "empty"),
        (b"   \t ".to_vec(), "empty", "empty"),
        (ten_mb, "oversize", "10485"),
        (invalid_utf8, "invalid_utf8", "UTF-8"),
        (b"[1,2,3]".to_vec(), "wrong_type", "an array"),
        (
            text.replacen("\"timestamp\":\"2026-", "\"timestamp\":\"2100-", 1)
                .into_bytes(),
            "invalid_value",
            "ahead of the wall clock",
        ),
        (b"null".to_vec(), "wrong_type", "null"),
        (b"[".repeat(100_000), "malformed_json", "recursion"),
        (
            format!("{{\"properties\":{}", "[".repeat(100_000)).into_bytes(),
            "truncated",
            "EOF",
        ),
    ]
}

fn remove_field(text: &str, field: &str) -> String {
    let key = format!("\"{field}\":\"");
    let start = text.find(&key).expect("field");
    let end = start + key.len() + text[start + key.len()..].find('"').expect("closing quote") + 2;
    format!("{}{}", &text[..start], &text[end..])
}

#[test]
fn an_input_without_a_single_good_event_is_still_fully_accounted_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let template = good_lines().remove(0);
    let bad: Vec<_> = bad_lines(&template)
        .into_iter()
        .map(|(l, _, _)| (l, sightline::generator::LineKind::Bad))
        .collect();
    let input = dir.path().join("bad.ndjson");
    write_ndjson(&input, &bad);
    let lake = dir.path().join("lake");
    let summary = replay(&input, &lake, config(2));
    assert_eq!(
        (summary.read, summary.accepted, summary.rejected),
        (bad.len() as u64, 0, bad.len() as u64)
    );
    assert_eq!(all_dead_letters(&lake).len(), bad.len());
    assert_eq!(records_counted(&lake), bad.len() as i64);
    assert!(routes(&lake).iter().all(|r| event_counts(r).is_empty()));
}

#[test]
fn every_bad_record_is_counted_with_its_reason_and_good_ones_are_unaffected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = good_lines();
    let bad = bad_lines(&good[0]);

    // Good events only.
    let clean_input = dir.path().join("clean.ndjson");
    let clean: Vec<_> = good
        .iter()
        .map(|l| (l.clone(), sightline::generator::LineKind::Good))
        .collect();
    write_ndjson(&clean_input, &clean);
    let clean_lake = dir.path().join("clean");
    let clean_summary = replay(&clean_input, &clean_lake, config(1));
    assert_eq!(clean_summary.rejected, 0);

    // The same good events with the bad records spread among them.
    let mut mixed = Vec::new();
    let mut expected: BTreeMap<i64, (&str, &str)> = BTreeMap::new();
    let mut bad_iter = bad.iter();
    for (i, line) in good.iter().enumerate() {
        // The first record is broken, before any event time is known.
        if i % 200 == 0
            && let Some((b, kind, fragment)) = bad_iter.next()
        {
            expected.insert(mixed.len() as i64, (*kind, *fragment));
            mixed.push((b.clone(), sightline::generator::LineKind::Bad));
        }
        mixed.push((line.clone(), sightline::generator::LineKind::Good));
    }
    assert_eq!(
        expected.len(),
        bad.len(),
        "every bad record is in the input"
    );
    let mixed_input = dir.path().join("mixed.ndjson");
    write_ndjson(&mixed_input, &mixed);
    let mixed_lake = dir.path().join("mixed");
    let summary = replay(&mixed_input, &mixed_lake, config(1));

    assert_eq!(summary.read, mixed.len() as u64);
    assert_eq!(summary.rejected, bad.len() as u64);
    assert_eq!(summary.accepted, clean_summary.accepted);
    let dead = all_dead_letters(&mixed_lake);
    assert_eq!(dead.len(), expected.len());
    for (offset, (kind, fragment)) in &expected {
        let origin = format!("file:{}", mixed_input.display());
        let seen = &dead[&(origin, 0, *offset)];
        let reason = seen.explained();
        assert_eq!(&seen.kind, kind, "line {offset}: {reason}");
        assert!(
            reason.contains(fragment),
            "line {offset} ({kind}): reason `{reason}` should mention `{fragment}`"
        );
    }
    let by_kind = routes(&mixed_lake)
        .iter()
        .flat_map(|r| quality(r))
        .filter(|(k, _)| k.2 != "accepted")
        .fold(BTreeMap::new(), |mut m, (k, n)| {
            *m.entry(k.2).or_insert(0) += n;
            m
        });
    let mut want_kinds = BTreeMap::new();
    for (_, kind, _) in &bad {
        *want_kinds.entry(kind.to_string()).or_insert(0) += 1;
    }
    assert_eq!(by_kind, want_kinds);

    for (mixed_route, clean_route) in routes(&mixed_lake).iter().zip(routes(&clean_lake)) {
        assert_maps_eq(
            &event_counts(mixed_route),
            &event_counts(&clean_route),
            "event_counts with and without bad records",
        );
        assert_eq!(latency(mixed_route), latency(&clean_route));
        assert_eq!(
            latency_by_variant(mixed_route),
            latency_by_variant(&clean_route)
        );
        let accepted = |lake| {
            quality(lake)
                .into_iter()
                .filter(|(k, _)| k.2 == "accepted")
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(accepted(mixed_route), accepted(&clean_route));
    }
}

/// Whatever way a record is broken, no raw identifier or contact datum it carried is stored:
/// not in the dead letter's payload, reason or violations, not as an event name in `quality`.
#[test]
fn broken_records_leave_no_raw_identifier_anywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let template = String::from_utf8(good_lines().remove(0)).expect("utf-8");
    let raw_user = "raw-user-4711";
    let with_user = template.replacen("\"user_id\":\"", &format!("\"user_id\":\"{raw_user}"), 1);
    let bad: Vec<Vec<u8>> = vec![
        with_user[..with_user.len() / 2].to_string(),
        with_user.replacen("\"session_id\":\"", "\"session_id\":7,\"zz\":\"", 1),
        with_user.replacen("\"event_name\":\"", "\"event_name\":\"zz_", 1),
        with_user.replacen(
            "\"source\":",
            "\"contact\":\"jane.doe@example.com\",\"source\":",
            1,
        ),
        with_user.replacen("\"platform\":\"", "\"platform\":\"jane.doe@example.com", 1),
        with_user.replacen(
            "\"event_name\":\"",
            "\"event_name\":\"jane.doe@example.com\",\"zz\":\"",
            1,
        ),
        with_user.replacen('{', "{\"jane.doe@example.com\":1,", 1),
        with_user.replacen("\"user_id\":", "\"user_id\" ", 1),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    let input = dir.path().join("bad.ndjson");
    write_ndjson(
        &input,
        &bad.iter()
            .map(|l| (l.clone(), sightline::generator::LineKind::Bad))
            .collect::<Vec<_>>(),
    );
    let lake = dir.path().join("lake");
    let summary = replay(&input, &lake, config(1));
    assert_eq!(summary.rejected, bad.len() as u64);
    let mut cells = 0;
    for route in routes(&lake) {
        for table in ["dead_letter", "quality"] {
            for batch in read_table(&route, table) {
                for column in batch.columns() {
                    let Some(strings) = column.as_any().downcast_ref::<arrow_array::StringArray>()
                    else {
                        continue;
                    };
                    for value in strings.iter().flatten() {
                        cells += 1;
                        assert!(
                            !value.contains(raw_user) && !value.contains('@'),
                            "{table} stores {value}"
                        );
                    }
                }
            }
        }
    }
    assert!(cells > 8 * 5, "the tables were read ({cells} strings)");
}
