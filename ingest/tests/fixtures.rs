//! The seed documents' example payloads as fixtures: each accepted, with its personal data
//! handled; deliberately broken variants rejected with the right failure kind, JSON pointer
//! and keyword; no dead-letter payload keeps raw personal data.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};
use sightline_ingest::{DecodeError, Decoder, FlatDefaults, Format};
use sightline_privacy::{KeyRing, Scrubber};
use sightline_schemas::FailureKind;

/// The registry's fixtures, beside it in `schemas/fixtures`.
fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/fixtures")
}

fn fixture(name: &str) -> Vec<String> {
    let path = fixtures().join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

fn decoder() -> Decoder {
    Decoder::new(
        1 << 20,
        Arc::new(KeyRing::from_hex("fx", &"a5".repeat(32), 30).unwrap()),
    )
}

fn flat() -> Decoder {
    decoder().with_format(Format::Flat(FlatDefaults::default()))
}

fn reject(decoder: &mut Decoder, record: &Value) -> DecodeError {
    decoder
        .decode(record.to_string().as_bytes())
        .expect_err("the broken variant must be rejected")
}

fn first(err: &DecodeError) -> (FailureKind, &str, &str) {
    let v = err
        .violations
        .first()
        .unwrap_or_else(|| panic!("no violation in {err:?}"));
    (err.kind, v.pointer.as_str(), v.keyword.as_str())
}

#[test]
fn every_command_center_example_is_accepted_through_a_flat_topic() {
    let examples = fixture("command_center_examples.ndjson");
    assert_eq!(examples.len(), 16, "the sixteen examples of 004");
    let mut decoder = flat();
    for line in &examples {
        let event = decoder
            .decode(line.as_bytes())
            .unwrap_or_else(|e| panic!("{e} ({:?}) in {line}", e.violations));
        let raw: Value = serde_json::from_str(line).unwrap();
        assert_eq!(event.event_name.as_str(), raw["event"].as_str().unwrap());
        // Identifiers are pseudonyms. (Properties are not kept by the event; the lake and the
        // dead-letter path are checked by pii-scan in the Kafka test and in scripts/test.)
        assert!(event.user_id.starts_with("fx.") && event.tenant_id.starts_with("fx."));
        if let Some(raw_user) = raw["user_id"].as_str() {
            assert!(!format!("{event:?}").contains(raw_user), "raw user_id kept");
        }
    }
}

#[test]
fn command_center_contact_fields_are_pseudonymized_never_kept() {
    let mut decoder = flat();
    for line in fixture("command_center_examples.ndjson") {
        let event = decoder.decode(line.as_bytes()).unwrap();
        let contacts = ["recipient", "attendee", "client"]
            .iter()
            .filter(|f| line.contains(&format!("\"{f}\"")))
            .count() as u16;
        // Three envelope identifiers, plus every contact field (metadata.recipient included).
        assert_eq!(event.privacy.pseudonymized, 3 + contacts, "{line}");
    }
}

#[test]
fn the_fixtures_match_the_seed_document() {
    // The seed documents ship with the repository (`schemas/fixtures/seeds/`), so this
    // always runs.
    let seed = fixtures().join("seeds/004_bba6ef2bedcb2b8b.txt");
    let text = std::fs::read_to_string(&seed).unwrap_or_else(|e| panic!("{}: {e}", seed.display()));
    let mut from_seed = Vec::new();
    let mut block: Option<String> = None;
    for line in text.lines() {
        match (&mut block, line.trim()) {
            (None, "```json") => block = Some(String::new()),
            (Some(b), "```") => {
                let without_comments: String = b
                    .lines()
                    .map(|l| l.split("  //").next().unwrap_or(l))
                    .collect::<Vec<_>>()
                    .join("\n");
                if let Ok(v) = serde_json::from_str::<Value>(&without_comments) {
                    from_seed.push(v);
                }
                block = None;
            }
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    let fixtures: Vec<Value> = fixture("command_center_examples.ndjson")
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        from_seed, fixtures,
        "fixtures are the seed's examples, comments removed"
    );
}

#[test]
fn every_platform_example_is_accepted_with_its_pii_handled() {
    let examples = fixture("platform_examples.ndjson");
    assert_eq!(examples.len(), 5, "the five example events of 000");
    let mut decoder = decoder();
    for line in &examples {
        let event = decoder
            .decode(line.as_bytes())
            .unwrap_or_else(|e| panic!("{e} ({:?}) in {line}", e.violations));
        let raw: Value = serde_json::from_str(line).unwrap();
        assert_ne!(
            &*event.user_id,
            raw["user_id"].as_str().unwrap(),
            "user_id is pseudonymized"
        );
        let geo = raw.get("country").is_some() as u16 + raw.get("region").is_some() as u16;
        let consented = raw["geo_consent"] == true;
        match event.event_name.as_str() {
            "project_feedback_submitted" => {
                assert_eq!(raw["schema_version"], "1.1.0");
                assert_eq!(
                    event.privacy.scrubbed, 1,
                    "the comment's phone number and e-mail address are scrubbed"
                );
                assert!(event.privacy.violation());
            }
            _ => assert_eq!(
                event.privacy.dropped,
                if consented { 0 } else { geo },
                "geo is dropped without consent: {line}"
            ),
        }
    }
}

/// Broken variants of a valid record, each with the kind, pointer and keyword it must get.
fn broken_variants(valid: &Value, name: &str) -> Vec<(Value, FailureKind, String, &'static str)> {
    let props = valid["properties"].as_object().unwrap();
    let (_, spec) = sightline_schemas::registry::Registry::embedded()
        .event(name)
        .unwrap();
    let schema = spec.default_schema().unwrap();
    let mut out = Vec::new();
    if let Some(required) = schema.properties.required.first() {
        let mut v = valid.clone();
        v["properties"].as_object_mut().unwrap().remove(required);
        out.push((
            v,
            FailureKind::MissingField,
            format!("/properties/{required}"),
            "required",
        ));
    }
    if let Some((field, _)) = props.iter().find(|(_, v)| v.is_number()) {
        let mut v = valid.clone();
        v["properties"][field] = json!("not a number");
        out.push((
            v,
            FailureKind::WrongType,
            format!("/properties/{field}"),
            "type",
        ));
    }
    if let Some((field, _)) = schema.properties.fields.iter().find(|(f, r)| {
        r.enum_values.is_some() && props.get(f.as_str()).is_some_and(Value::is_string)
    }) {
        let mut v = valid.clone();
        v["properties"][field] = json!("definitely_not_in_the_enum");
        out.push((
            v,
            FailureKind::InvalidValue,
            format!("/properties/{field}"),
            "enum",
        ));
    }
    let mut v = valid.clone();
    v["properties"]["contact_email"] = json!("leak@example.com");
    out.push((
        v,
        FailureKind::UnknownField,
        "/properties/contact_email".into(),
        "additionalProperties",
    ));
    let mut v = valid.clone();
    v["properties"]["latitude"] = json!(52.520008);
    out.push((
        v,
        FailureKind::PiiRejected,
        "/properties/latitude".into(),
        "x-pii",
    ));
    let mut v = valid.clone();
    v["schema_version"] = json!("7.0.0");
    out.push((
        v,
        FailureKind::UnknownSchemaVersion,
        "/schema_version".into(),
        "x-sightline.version",
    ));
    let mut v = valid.clone();
    v["event_type"] = json!("banana");
    out.push((v, FailureKind::InvalidValue, "/event_type".into(), "enum"));
    let mut v = valid.clone();
    v.as_object_mut().unwrap().remove("tenant_id");
    out.push((v, FailureKind::MissingField, "".into(), "required"));
    out
}

#[test]
fn broken_variants_are_rejected_with_kind_pointer_and_keyword_and_their_payloads_are_redacted() {
    let scrubber = Scrubber::new();
    let mut decoder = decoder();
    let mut checked = 0;
    for line in fixture("platform_examples.ndjson") {
        let valid: Value = serde_json::from_str(&line).unwrap();
        let name = valid["event_name"].as_str().unwrap().to_owned();
        for (record, kind, pointer, keyword) in broken_variants(&valid, &name) {
            let err = reject(&mut decoder, &record);
            assert_eq!(
                first(&err),
                (kind, pointer.as_str(), keyword),
                "{name}: {err:?}"
            );
            assert_eq!(err.event_name.as_deref(), Some(name.as_str()));
            let payload = decoder
                .redact_payload(record.to_string().as_bytes(), err.event_time_ms)
                .unwrap();
            // Everything a dead letter stores: payload, reason, violations.
            let stored = format!("{payload} {} {:?}", err.reason, err.violations);
            assert!(
                scrubber.scan(&stored).is_empty(),
                "{name}: the dead letter keeps {:?}",
                scrubber.scan(&stored)
            );
            let raw_user = valid["user_id"].as_str().unwrap();
            assert!(
                !stored.contains(raw_user),
                "{name}: raw user_id in {stored}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 35, "{checked} variants");
}

#[test]
fn an_oversize_comment_is_its_own_dead_letter() {
    let line = fixture("platform_examples.ndjson")
        .into_iter()
        .find(|l| l.contains("\"comment\""))
        .unwrap();
    let mut record: Value = serde_json::from_str(&line).unwrap();
    record["properties"]["comment"] = json!("é".repeat(501));
    let err = reject(&mut decoder(), &record);
    assert_eq!(
        first(&err),
        (
            FailureKind::InvalidValue,
            "/properties/comment",
            "maxLength"
        )
    );
    assert!(err.reason.contains("501 characters"), "{}", err.reason);
    record["properties"]["comment"] = json!("é".repeat(500));
    assert!(
        decoder().decode(record.to_string().as_bytes()).is_ok(),
        "500 characters are fine"
    );
    // The comment is a 1.1.0 property: a 1.0.0 event may not carry it.
    record["schema_version"] = json!("1.0.0");
    assert_eq!(
        first(&reject(&mut decoder(), &record)),
        (
            FailureKind::UnknownField,
            "/properties/comment",
            "additionalProperties"
        )
    );
}

#[test]
fn broken_flat_records_are_rejected_with_the_field() {
    let mut decoder = flat();
    let line = fixture("command_center_examples.ndjson")
        .into_iter()
        .find(|l| l.contains("integration_call_failed"))
        .unwrap();
    let mut record: Value = serde_json::from_str(&line).unwrap();
    record["integration"] = json!("salesforce");
    assert_eq!(
        first(&reject(&mut decoder, &record)),
        (FailureKind::InvalidValue, "/properties/integration", "enum")
    );
    record.as_object_mut().unwrap().remove("timestamp");
    assert_eq!(
        first(&reject(&mut decoder, &record)),
        (FailureKind::MissingField, "/timestamp", "required")
    );
}
