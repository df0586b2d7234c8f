//! Property test: for random events and random corruptions, every input record ends up in
//! exactly one of {accepted, dead letter (rejected), late}, and is counted exactly once: in the
//! run's summary, in the `quality` table (over both routes) and, for the ones not accepted, in
//! the `dead_letter` table with its source offset.

mod common;

use std::collections::BTreeSet;

use common::*;
use proptest::prelude::*;
use sightline::generator::LineKind;

/// Ways to break a record. None of them inserts a newline (each input line stays one record).
#[derive(Clone, Debug)]
enum Corruption {
    Truncate(usize),
    FlipByte(usize, u8),
    DropField(&'static str),
    AddField(&'static str),
    Version(&'static str),
    Property(&'static str),
    Replace(Vec<u8>),
}

fn corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        (0usize..2000).prop_map(Corruption::Truncate),
        (
            0usize..2000,
            any::<u8>().prop_filter("no newline", |b| *b != b'\n')
        )
            .prop_map(|(at, b)| Corruption::FlipByte(at, b)),
        prop::sample::select(vec![
            "event_id",
            "user_id",
            "timestamp",
            "properties",
            "event_type",
            "data_sensitivity"
        ])
        .prop_map(Corruption::DropField),
        prop::sample::select(vec![
            r#""ip":"10.1.2.3","#,
            r#""email":"jane@example.com","#,
            r#""latitude":52.5,"#
        ])
        .prop_map(Corruption::AddField),
        prop::sample::select(vec!["9.9.9", "1.0", "x"]).prop_map(Corruption::Version),
        prop::sample::select(vec![r#""longitude":13.4,"#, r#""extra":true,"#])
            .prop_map(Corruption::Property),
        prop::collection::vec(
            any::<u8>().prop_filter("no newline", |b| *b != b'\n'),
            0..40
        )
        .prop_map(Corruption::Replace),
    ]
}

fn apply(line: &[u8], c: &Corruption) -> Vec<u8> {
    let text = String::from_utf8_lossy(line).into_owned();
    match c {
        Corruption::Truncate(at) => line[..(*at).min(line.len())].to_vec(),
        Corruption::FlipByte(at, b) => {
            let mut out = line.to_vec();
            if !out.is_empty() {
                let i = at % out.len();
                out[i] = *b;
            }
            out
        }
        Corruption::DropField(field) => {
            let key = format!("\"{field}\":");
            match text.find(&key) {
                // Remove the key and its (string, or object up to its first `},`) value.
                Some(start) => {
                    let rest = &text[start + key.len()..];
                    let end = match rest.strip_prefix('"') {
                        Some(string) => string.find('"').map(|i| i + 2),
                        None => rest.find("},").map(|i| i + 1),
                    };
                    match end {
                        Some(end) => {
                            format!("{}{}", &text[..start], rest[end..].trim_start_matches(','))
                                .into_bytes()
                        }
                        None => line.to_vec(),
                    }
                }
                None => line.to_vec(),
            }
        }
        Corruption::AddField(field) => text.replacen('{', &format!("{{{field}"), 1).into_bytes(),
        Corruption::Version(v) => text
            .replacen(
                "\"schema_version\":\"1.0.0\"",
                &format!("\"schema_version\":\"{v}\""),
                1,
            )
            .into_bytes(),
        Corruption::Property(p) => text
            .replacen("\"properties\":{", &format!("\"properties\":{{{p}"), 1)
            .into_bytes(),
        Corruption::Replace(bytes) => bytes.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn every_record_is_accepted_rejected_or_late_exactly_once(
        seed in 0u64..1000,
        workers in 1usize..=2,
        corruptions in prop::collection::vec((0usize..600, corruption()), 0..60),
    ) {
        let mut lines: Vec<(Vec<u8>, LineKind)> = generate(600, seed, 0.0, 0.02);
        for (at, c) in &corruptions {
            lines[*at].0 = apply(&lines[*at].0, c);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("events.ndjson");
        write_ndjson(&input, &lines);
        let lake = dir.path().join("lake");
        let summary = replay(&input, &lake, config(workers));

        let n = lines.len() as u64;
        prop_assert_eq!(summary.read, n);
        prop_assert_eq!(summary.accepted + summary.rejected + summary.late, n);
        prop_assert_eq!(records_counted(&lake), n as i64, "quality counts every record once");
        let dead = all_dead_letters(&lake);
        prop_assert_eq!(dead.len() as u64, summary.rejected + summary.late, "one dead letter per record not accepted");
        // (The table reader fails on two rows with the same source offset.)
        let offsets: BTreeSet<i64> = dead.keys().map(|k| k.2).collect();
        prop_assert!(offsets.iter().all(|o| (0..n as i64).contains(o)), "dead letters point at input lines");
        let late = dead.values().filter(|d| d.kind == "late").count() as u64;
        prop_assert_eq!(late, summary.late);
    }
}
