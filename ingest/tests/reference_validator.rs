//! The streaming validator against an independent one, the `jsonschema` crate, on the seed's
//! valid events and on random corruptions of their `properties`: both accept or both reject.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{Value, json};
use sightline_ingest::Decoder;
use sightline_privacy::KeyRing;
use sightline_schemas::registry::Registry;

fn examples() -> Vec<Value> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/fixtures/platform_examples.ndjson");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn decoder() -> Decoder {
    Decoder::new(
        1 << 20,
        Arc::new(KeyRing::from_hex("rv", &"a5".repeat(32), 30).unwrap()),
    )
}

/// What the `jsonschema` crate says of `record`'s properties, against the event's schema
/// document as it is on disk.
fn reference_accepts(record: &Value) -> bool {
    let name = record["event_name"].as_str().unwrap();
    let version = record["schema_version"].as_str();
    let schema = Registry::embedded().schema_of(name, version).unwrap();
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema.document)
        .unwrap();
    validator.is_valid(&record["properties"])
}

/// One corruption of a `properties` object.
#[derive(Clone, Debug)]
enum Corruption {
    Remove,
    Set(Value),
    AddUnknown,
}

fn corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        Just(Corruption::Remove),
        Just(Corruption::AddUnknown),
        prop_oneof![
            Just(json!(null)),
            Just(json!(true)),
            Just(json!(-1)),
            Just(json!(0)),
            Just(json!(3.5)),
            Just(json!(1_000_000_000)),
            Just(json!("")),
            Just(json!("x")),
            Just(json!("2026-01-23T14:30:00Z")),
            Just(json!("not a date")),
            Just(json!("y".repeat(600))),
            Just(json!([])),
            Just(json!(["a", 1])),
            Just(json!({})),
            Just(json!({"zz": 1})),
        ]
        .prop_map(Corruption::Set),
    ]
}

#[test]
fn both_accept_every_valid_example() {
    let mut decoder = decoder();
    for record in examples() {
        assert!(reference_accepts(&record), "{record}");
        let line = record.to_string();
        assert!(decoder.decode(line.as_bytes()).is_ok(), "{line}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn both_agree_on_corrupted_properties(
        which in 0usize..100,
        field in 0usize..100,
        corruptions in proptest::collection::vec(corruption(), 1..3),
    ) {
        let examples = examples();
        let mut record = examples[which % examples.len()].clone();
        for corruption in &corruptions {
            let properties = record["properties"].as_object_mut().unwrap();
            let keys: Vec<String> = properties.keys().cloned().collect();
            match corruption {
                Corruption::AddUnknown => {
                    properties.insert("zz_undeclared".into(), json!(1));
                }
                _ if keys.is_empty() => {}
                Corruption::Remove => {
                    properties.remove(&keys[field % keys.len()]);
                }
                Corruption::Set(value) => {
                    properties.insert(keys[field % keys.len()].clone(), value.clone());
                }
            }
        }
        let line = record.to_string();
        let ours = decoder().decode(line.as_bytes());
        let reference = reference_accepts(&record);
        prop_assert_eq!(
            ours.is_ok(),
            reference,
            "ours: {:?}, jsonschema: {}, record: {}",
            ours.err().map(|e| (e.kind, e.violations)),
            reference,
            line
        );
    }
}
