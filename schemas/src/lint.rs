//! `sightline schemas lint`: the registry's contract checks.
//!
//! For a directory laid out like `schemas/registry/`, lint checks that
//!
//! 1. every file is a valid JSON Schema (against the draft 2020-12 meta-schema),
//! 2. every event schema stays inside the keyword subset the pipeline compiles, is closed, and
//!    gives every property a PII class and an action that fits it (see [`crate::registry`]),
//! 3. event schemas agree with the envelope: each event is in the envelope's `event_name` enum
//!    and vice versa, its `event_type` is one the envelope allows, and the envelope values it
//!    fixes are fields (and enum values) of the envelope,
//! 4. each new version of an event is compatible with the previous one of the same major
//!    version. The rule: a minor or patch version may add optional properties, add enum
//!    values and widen limits; removing or retyping a property, adding a required one,
//!    narrowing an enum or a limit, or weakening a field's privacy action needs a new major
//!    version. A `supersedes` must name an older version of the same event.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::registry::{DIALECT, EventSpec, FieldRule, ObjectRule, Registry};

/// One problem lint found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: String,
    /// What is wrong, naming the field.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file, self.message)
    }
}

/// Lints the registry in `dir`. Returns the number of schema files checked, or every problem.
pub fn lint_dir(dir: &Path) -> Result<usize, Vec<Problem>> {
    let problem = |message: String| {
        vec![Problem {
            file: dir.display().to_string(),
            message,
        }]
    };
    let mut files = Vec::new();
    crate::registry::collect_json(dir, dir, &mut files).map_err(|e| problem(e.to_string()))?;
    if files.is_empty() {
        return Err(problem("no schema files (*.json) found".into()));
    }
    lint_files(files)
}

/// Lints (path, text) pairs, paths relative to the registry root.
pub fn lint_files(files: Vec<(String, String)>) -> Result<usize, Vec<Problem>> {
    let mut problems = Vec::new();
    for (path, text) in &files {
        match serde_json::from_str::<Value>(text) {
            Err(e) => problems.push(Problem {
                file: path.clone(),
                message: format!("not JSON: {e}"),
            }),
            Ok(doc) if doc.get("$schema").and_then(Value::as_str) != Some(DIALECT) => problems
                .push(Problem {
                    file: path.clone(),
                    message: format!("`$schema` must be `{DIALECT}`"),
                }),
            Ok(doc) => {
                if let Err(e) = jsonschema::meta::validate(&doc) {
                    problems.push(Problem {
                        file: path.clone(),
                        message: format!("not a valid JSON Schema: {e} at {}", e.instance_path()),
                    });
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let count = files.len();
    let registry = Registry::from_files(files).map_err(|e| {
        vec![Problem {
            file: e.file,
            message: e.message,
        }]
    })?;
    envelope_consistency(&registry, &mut problems);
    for event in registry.events() {
        compatibility(event, &mut problems);
    }
    if problems.is_empty() {
        Ok(count)
    } else {
        Err(problems)
    }
}

fn strings(value: Option<&Value>) -> Option<BTreeSet<String>> {
    value.and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    })
}

fn envelope_consistency(registry: &Registry, problems: &mut Vec<Problem>) {
    let envelope = registry.envelope();
    let file = registry.envelope_file().to_owned();
    let mut problem = |file: &str, message: String| {
        problems.push(Problem {
            file: file.to_owned(),
            message,
        })
    };
    let props = envelope.get("properties").and_then(Value::as_object);
    let Some(props) = props else {
        problem(&file, "the envelope has no `properties`".into());
        return;
    };
    for required in strings(envelope.get("required")).unwrap_or_default() {
        if !props.contains_key(&required) {
            problem(
                &file,
                format!("required field `{required}` is not declared"),
            );
        }
    }
    for (name, schema) in props {
        if schema.get("x-pii").is_none() || schema.get("x-action").is_none() {
            problem(
                &file,
                format!("/properties/{name}: every field needs `x-pii` and `x-action`"),
            );
        }
    }
    let names = strings(props.get("event_name").and_then(|p| p.get("enum"))).unwrap_or_default();
    let registered: BTreeSet<String> = registry.events().iter().map(|e| e.name.clone()).collect();
    for missing in names.difference(&registered) {
        problem(
            &file,
            format!("event_name `{missing}` is in the envelope's enum but has no schema"),
        );
    }
    let types = strings(props.get("event_type").and_then(|p| p.get("enum"))).unwrap_or_default();
    for event in registry.events() {
        for schema in &event.versions {
            if !names.contains(&event.name) {
                problem(
                    &schema.file,
                    format!(
                        "event `{}` is not in the envelope's event_name enum",
                        event.name
                    ),
                );
            }
            if !types.contains(event.event_type.as_str()) {
                problem(
                    &schema.file,
                    format!(
                        "event_type `{}` is not in the envelope's event_type enum",
                        event.event_type.as_str()
                    ),
                );
            }
            for (field, value) in &schema.envelope {
                match props.get(field) {
                    None => problem(
                        &schema.file,
                        format!("x-sightline.envelope.{field} is not an envelope field"),
                    ),
                    Some(p) => {
                        if let Some(allowed) = strings(p.get("enum"))
                            && !allowed.contains(value)
                        {
                            problem(
                                &schema.file,
                                format!(
                                    "x-sightline.envelope.{field} = `{value}` is not in the envelope's enum"
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
}

fn compatibility(event: &EventSpec, problems: &mut Vec<Problem>) {
    for (i, schema) in event.versions.iter().enumerate() {
        if let Some(old) = schema.supersedes
            && !event.versions[..i].iter().any(|s| s.version == old)
        {
            problems.push(Problem {
                file: schema.file.clone(),
                message: format!(
                    "supersedes {old}, which is not an older version of {}",
                    event.name
                ),
            });
        }
        let Some(previous) = i.checked_sub(1).map(|p| &event.versions[p]) else {
            continue;
        };
        if previous.latency != schema.latency {
            problems.push(Problem {
                file: schema.file.clone(),
                message: "the latency measure differs from the previous version".into(),
            });
        }
        if previous.version.major != schema.version.major {
            continue;
        }
        let mut breaks = Vec::new();
        compare_object(
            "/properties",
            &previous.properties,
            &schema.properties,
            &mut breaks,
        );
        for b in breaks {
            problems.push(Problem {
                file: schema.file.clone(),
                message: format!(
                    "breaking change from {} at {b} (needs a new major version)",
                    previous.version
                ),
            });
        }
    }
}

fn compare_object(pointer: &str, old: &ObjectRule, new: &ObjectRule, breaks: &mut Vec<String>) {
    for (name, old_field) in &old.fields {
        let at = format!("{pointer}/{name}");
        match new.field(name) {
            None => breaks.push(format!("{at}: property removed")),
            Some((_, new_field)) => compare_field(&at, old_field, new_field, breaks),
        }
    }
    for required in &new.required {
        if !old.required.contains(required) {
            breaks.push(format!("{pointer}/{required}: newly required"));
        }
    }
}

fn compare_field(at: &str, old: &FieldRule, new: &FieldRule, breaks: &mut Vec<String>) {
    if !new.types.contains(old.types) {
        breaks.push(format!(
            "{at}: type changed from {} to {}",
            old.types.names(),
            new.types.names()
        ));
    }
    match (&old.enum_values, &new.enum_values) {
        (Some(o), Some(n)) => {
            if let Some(gone) = o.iter().find(|v| !n.contains(v)) {
                breaks.push(format!("{at}: enum value `{gone}` removed"));
            }
        }
        (None, Some(_)) => breaks.push(format!("{at}: enum added")),
        _ => {}
    }
    let narrower_min = |o: Option<f64>, n: Option<f64>| {
        matches!((o, n), (None, Some(_))) || matches!((o, n), (Some(o), Some(n)) if n > o)
    };
    let narrower_max = |o: Option<f64>, n: Option<f64>| {
        matches!((o, n), (None, Some(_))) || matches!((o, n), (Some(o), Some(n)) if n < o)
    };
    let as_f = |v: Option<usize>| v.map(|v| v as f64);
    if narrower_min(old.minimum, new.minimum) {
        breaks.push(format!("{at}: minimum raised"));
    }
    if narrower_max(old.maximum, new.maximum) {
        breaks.push(format!("{at}: maximum lowered"));
    }
    if narrower_min(as_f(old.min_length), as_f(new.min_length)) {
        breaks.push(format!("{at}: minLength raised"));
    }
    if narrower_max(as_f(old.max_length), as_f(new.max_length)) {
        breaks.push(format!("{at}: maxLength lowered"));
    }
    if new.date_time && !old.date_time {
        breaks.push(format!("{at}: format date-time added"));
    }
    if new.action.strength() < old.action.strength() {
        breaks.push(format!(
            "{at}: privacy action weakened from {} to {}",
            old.action.as_str(),
            new.action.as_str()
        ));
    }
    match (&old.object, &new.object) {
        (Some(o), Some(n)) => compare_object(at, o, n, breaks),
        (Some(_), None) => breaks.push(format!("{at}: nested properties removed")),
        _ => {}
    }
    if let (Some(o), Some(n)) = (&old.items, &new.items) {
        compare_field(&format!("{at}/items"), o, n, breaks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::EMBEDDED;

    fn with_changed(file: &str, edit: impl Fn(&mut Value)) -> Vec<(String, String)> {
        EMBEDDED
            .iter()
            .map(|(p, t)| {
                let mut text = t.to_string();
                if *p == file {
                    let mut doc: Value = serde_json::from_str(t).unwrap();
                    edit(&mut doc);
                    text = doc.to_string();
                }
                (p.to_string(), text)
            })
            .collect()
    }

    #[test]
    fn the_shipped_registry_is_clean() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("registry");
        assert_eq!(lint_dir(&dir), Ok(EMBEDDED.len()));
    }

    /// Removes `field` from the event's kept properties (a kept property must exist, and a
    /// measure must stay numeric).
    fn unkeep(d: &mut Value, field: &str) {
        for kind in ["measures", "labels"] {
            if let Some(list) = d["x-sightline"]["keep"][kind].as_array_mut() {
                list.retain(|f| f != field);
            }
        }
    }

    #[test]
    fn breaking_changes_name_the_field() {
        let newest = "events/project_feedback_submitted/1.1.0.json";
        let message = |files| {
            lint_files(files)
                .unwrap_err()
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        let m = message(with_changed(newest, |d| {
            d["properties"]["score"]["type"] = "string".into();
            unkeep(d, "score");
        }));
        assert!(m.contains("/properties/score: type changed"), "{m}");
        let m = message(with_changed(newest, |d| {
            d["properties"].as_object_mut().unwrap().remove("sentiment");
            unkeep(d, "sentiment");
            let req: Vec<Value> = d["required"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| *r != "sentiment")
                .cloned()
                .collect();
            d["required"] = Value::Array(req);
        }));
        assert!(m.contains("/properties/sentiment: property removed"), "{m}");
        let m = message(with_changed(newest, |d| {
            d["required"].as_array_mut().unwrap().push("comment".into())
        }));
        assert!(m.contains("/properties/comment: newly required"), "{m}");
        let m = message(with_changed(newest, |d| {
            d["x-sightline"]["supersedes"] = "0.9.0".into()
        }));
        assert!(m.contains("supersedes 0.9.0"), "{m}");
    }

    #[test]
    fn a_new_major_version_may_break() {
        let mut files = with_changed("events/project_feedback_submitted/1.1.0.json", |_| {});
        let (_, text) = files
            .iter()
            .find(|(p, _)| p == "events/project_feedback_submitted/1.1.0.json")
            .cloned()
            .unwrap();
        let mut doc: Value = serde_json::from_str(&text).unwrap();
        doc["x-sightline"]["version"] = "2.0.0".into();
        doc["properties"]["score"]["type"] = "string".into();
        unkeep(&mut doc, "score");
        files.push((
            "events/project_feedback_submitted/2.0.0.json".into(),
            doc.to_string(),
        ));
        assert!(lint_files(files).is_ok());
    }

    #[test]
    fn envelope_disagreements_and_invalid_schemas_are_found() {
        let m = lint_files(with_changed("events/signal_received/1.0.0.json", |d| {
            d["x-sightline"]["envelope"] = serde_json::json!({"device_type": "toaster"})
        }))
        .unwrap_err();
        assert!(m[0].message.contains("device_type"), "{m:?}");
        let m = lint_files(with_changed("events/signal_received/1.0.0.json", |d| {
            d["properties"]["signal_id"]["maxLength"] = (-3).into()
        }))
        .unwrap_err();
        assert!(m[0].message.contains("not a valid JSON Schema"), "{m:?}");
    }
}
