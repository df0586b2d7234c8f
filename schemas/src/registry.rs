//! The schema registry: one JSON Schema per event and version, plus the envelope's.
//!
//! The files live in `schemas/registry/` (see its README) and are compiled into the binary, so
//! a running pipeline always validates against the schemas it was built and tested with.
//! [`Registry::embedded`] parses them once; [`Registry::load_dir`] reads a directory of the same
//! layout (for `sightline schemas lint DIR`).
//!
//! Event schemas use a strict subset of JSON Schema (listed in [`FieldRule`]) so that each one
//! compiles to a [`ObjectRule`] tree that `sightline-ingest`'s validator checks while it streams through a
//! payload, without building a JSON value. Any keyword outside the subset is a load error: what
//! the registry accepts is exactly what the pipeline enforces. The envelope schema is full JSON
//! Schema and is compiled by the `jsonschema` crate, which explains envelope failures.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use serde_json::{Map, Value};

use crate::EventType;

/// The JSON Schema dialect every registry file declares.
pub const DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";

/// A schema version, `MAJOR.MINOR.PATCH`. Within one major version every change must be
/// backward compatible (see `sightline schemas lint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Incompatible changes.
    pub major: u32,
    /// Compatible additions.
    pub minor: u32,
    /// Documentation-only changes.
    pub patch: u32,
}

impl Version {
    /// Parses `MAJOR.MINOR.PATCH`.
    #[inline]
    pub fn parse(text: &str) -> Option<Version> {
        // One pass over the bytes: every record with a `schema_version` comes through here.
        let (mut numbers, mut part, mut digits) = ([0u32; 3], 0, 0);
        for b in text.bytes() {
            match b {
                b'0'..=b'9' => {
                    numbers[part] = numbers[part]
                        .checked_mul(10)?
                        .checked_add(u32::from(b - b'0'))?;
                    digits += 1;
                }
                b'.' if digits > 0 && part < 2 => (part, digits) = (part + 1, 0),
                _ => return None,
            }
        }
        let [major, minor, patch] = numbers;
        (part == 2 && digits > 0).then_some(Version {
            major,
            minor,
            patch,
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// How personal a field is (`x-pii`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PiiClass {
    /// Not personal.
    None,
    /// An identifier of a person or tenant.
    Identifier,
    /// Contact data: e-mail address, personal or company name.
    Contact,
    /// Free text that may contain anything.
    FreeText,
    /// Network addresses.
    Network,
    /// Coarse location (country, region).
    Location,
    /// Credentials.
    Secret,
}

/// What the privacy layer does with a field (`x-action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PiiAction {
    /// Kept as it is.
    Keep,
    /// Replaced by a keyed-hash pseudonym.
    Pseudonymize,
    /// Kept after e-mail addresses, phone numbers, IPs and secrets are replaced by markers.
    Scrub,
    /// Removed.
    Drop,
    /// Kept only when the event says the user consented (`geo_consent: true`).
    Consent,
}

impl PiiAction {
    /// How strongly the action protects a value, for the compatibility rule: a new minor
    /// version may not weaken a field's action.
    pub fn strength(self) -> u8 {
        match self {
            PiiAction::Keep => 0,
            PiiAction::Scrub | PiiAction::Consent => 1,
            PiiAction::Pseudonymize => 2,
            PiiAction::Drop => 3,
        }
    }

    /// The `x-action` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PiiAction::Keep => "keep",
            PiiAction::Pseudonymize => "pseudonymize",
            PiiAction::Scrub => "scrub",
            PiiAction::Drop => "drop",
            PiiAction::Consent => "consent",
        }
    }
}

/// JSON types as a bit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Types(u8);

impl Types {
    /// `string`.
    pub const STRING: Types = Types(1);
    /// `number` (any JSON number).
    pub const NUMBER: Types = Types(2);
    /// `integer` (a number without a fraction).
    pub const INTEGER: Types = Types(4);
    /// `boolean`.
    pub const BOOLEAN: Types = Types(8);
    /// `null`.
    pub const NULL: Types = Types(16);
    /// `array`.
    pub const ARRAY: Types = Types(32);
    /// `object`.
    pub const OBJECT: Types = Types(64);

    const NAMES: [(&'static str, Types); 7] = [
        ("string", Types::STRING),
        ("number", Types::NUMBER),
        ("integer", Types::INTEGER),
        ("boolean", Types::BOOLEAN),
        ("null", Types::NULL),
        ("array", Types::ARRAY),
        ("object", Types::OBJECT),
    ];

    /// Whether every type of `other` is in `self`.
    pub fn contains(self, other: Types) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    /// Whether a value of `other` would be accepted (integers are numbers).
    pub fn accepts(self, other: Types) -> bool {
        self.contains(other) || (other == Types::INTEGER && self.contains(Types::NUMBER))
    }

    /// The names of the types, for messages.
    pub fn names(self) -> String {
        Types::NAMES
            .iter()
            .filter(|(_, t)| self.contains(*t))
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(" or ")
    }

    fn of_name(name: &str) -> Option<Types> {
        Types::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
    }
}

impl std::ops::BitOr for Types {
    type Output = Types;
    fn bitor(self, rhs: Types) -> Types {
        Types(self.0 | rhs.0)
    }
}

/// The compiled rule of one property.
///
/// Supported keywords: `type`, `enum` (strings, and `null` when the type allows it),
/// `minimum`, `maximum`, `minLength`, `maxLength` (in characters), `format: date-time`,
/// `items`, nested `properties`/`required`/`additionalProperties: false`, `description`, and
/// the annotations `x-pii` and `x-action`, which every property must carry.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldRule {
    /// Allowed JSON types.
    pub types: Types,
    /// Allowed string values, if the field is an enum.
    pub enum_values: Option<Vec<String>>,
    /// Smallest allowed number.
    pub minimum: Option<f64>,
    /// Largest allowed number.
    pub maximum: Option<f64>,
    /// Shortest allowed string, in characters.
    pub min_length: Option<usize>,
    /// Longest allowed string, in characters.
    pub max_length: Option<usize>,
    /// The string must be an RFC 3339 date-time.
    pub date_time: bool,
    /// Rule for array items.
    pub items: Option<Box<FieldRule>>,
    /// Rule for a nested object.
    pub object: Option<ObjectRule>,
    /// PII class.
    pub pii: PiiClass,
    /// What the privacy layer does with it.
    pub action: PiiAction,
}

/// The compiled rule of an object: a closed set of properties.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ObjectRule {
    /// Properties, sorted by name.
    pub fields: Vec<(String, FieldRule)>,
    /// Names of the required properties.
    pub required: Vec<String>,
    /// Property name → index in `fields`: one hash per key on the hot path, instead of a
    /// binary search of string comparisons.
    index: HashMap<String, usize, foldhash::fast::RandomState>,
    /// Bit mask of the required properties' indexes.
    required_mask: u64,
}

impl ObjectRule {
    /// The rule of an object with `fields` (at most 64) of which `required` are required; the
    /// name of a required property that is not among the fields is the error.
    pub fn new(
        mut fields: Vec<(String, FieldRule)>,
        required: Vec<String>,
    ) -> Result<ObjectRule, String> {
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        let index: HashMap<_, _, _> = fields
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (name.clone(), i))
            .collect();
        let mut required_mask = 0u64;
        for name in &required {
            let i = index.get(name).ok_or_else(|| name.clone())?;
            required_mask |= 1u64.checked_shl(*i as u32).ok_or_else(|| name.clone())?;
        }
        Ok(ObjectRule {
            fields,
            required,
            index,
            required_mask,
        })
    }

    /// The rule of property `name` and its index, if declared.
    #[inline]
    pub fn field(&self, name: &str) -> Option<(usize, &FieldRule)> {
        self.index.get(name).map(|&i| (i, &self.fields[i].1))
    }

    /// Bit mask of the required properties' indexes (objects have at most 64 properties).
    pub fn required_mask(&self) -> u64 {
        self.required_mask
    }
}

/// An event's latency measure: which property, in which unit.
#[derive(Clone, Debug, PartialEq)]
pub struct Latency {
    /// The property.
    pub field: String,
    /// Factor from the unit to milliseconds (1 for `ms`, 1000 for `seconds`).
    pub scale_ms: f64,
}

/// How a kept property is carried on an accepted [`crate::Event`] (`x-sightline.keep`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeptKind {
    /// A number or boolean, kept as a [`crate::Measure`] (fixed point, micro-units).
    Measure,
    /// A string, kept as a label (scrubbed first when its action is `scrub`).
    Label,
    /// An array of strings (tags), kept as a list of labels.
    Labels,
}

/// A property that accepted events keep for the aggregates, beyond the envelope
/// (`x-sightline.keep`): adding a metric is a schema change, not a change of the decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct Kept {
    /// The top-level property.
    pub field: String,
    /// The same, as the shared label events carry (no allocation per event).
    pub label: crate::Label,
    /// How it is kept.
    pub kind: KeptKind,
    /// Whether its values are scrubbed first (its action is `scrub`); other labels are kept
    /// as they are, like the identifiers and enums they are (`x-pii: none`).
    pub scrub: bool,
    /// Whether its strings come from a fixed set (the schema lists them in an `enum`), so that
    /// a decoder can share one label per value instead of allocating one per event.
    pub bounded: bool,
}

/// One version of one event's schema.
#[derive(Clone, Debug)]
pub struct EventSchema {
    /// The version.
    pub version: Version,
    /// The version this one replaces, if it says so.
    pub supersedes: Option<Version>,
    /// Envelope fields whose value this event fixes (`x-sightline.envelope`).
    pub envelope: Vec<(String, String)>,
    /// The rule of `properties`.
    pub properties: ObjectRule,
    /// The event's latency measure.
    pub latency: Option<Latency>,
    /// The properties accepted events keep, sorted by name (`x-sightline.keep`).
    pub keep: Vec<Kept>,
    /// For each property (in the order of `properties.fields`), its place in `keep`, if kept:
    /// the validator finds what to capture by the index it already has, without comparing
    /// names.
    pub keep_of: Vec<Option<usize>>,
    /// The index in `properties.fields` of the latency measure's property.
    pub latency_of: Option<usize>,
    /// The file's JSON, for lint and the reference validator.
    pub document: Value,
    /// Where it was loaded from.
    pub file: String,
}

/// Everything the registry knows about one `event_name`.
#[derive(Clone, Debug)]
pub struct EventSpec {
    /// The event name.
    pub name: String,
    /// The taxonomy class the event must declare.
    pub event_type: EventType,
    /// The seed document it comes from (`000` or `004`).
    pub origin: String,
    /// Versions, oldest first.
    pub versions: Vec<EventSchema>,
}

impl EventSpec {
    /// The schema of `version`, or of the default version when the event names none.
    #[inline]
    pub fn schema(&self, version: Option<Version>) -> Option<&EventSchema> {
        match version {
            Some(v) => self.versions.iter().find(|s| s.version == v),
            None => self.default_schema(),
        }
    }

    /// The default version: the newest one. Events without `schema_version` are validated
    /// against it.
    pub fn default_schema(&self) -> Option<&EventSchema> {
        self.versions.last()
    }

    /// The latency measure of the default version (the same field in every version: lint
    /// checks it).
    pub fn latency(&self) -> Option<&Latency> {
        self.default_schema().and_then(|s| s.latency.as_ref())
    }
}

/// A load failure, naming the file and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct RegistryError {
    /// The file.
    pub file: String,
    /// What is wrong.
    pub message: String,
}

fn err(file: &str, message: impl Into<String>) -> RegistryError {
    RegistryError {
        file: file.to_owned(),
        message: message.into(),
    }
}

/// All event schemas and the envelope schema.
pub struct Registry {
    events: Vec<EventSpec>,
    /// Event name → index in `events` (every record looks its name up).
    by_name: HashMap<String, usize, foldhash::fast::RandomState>,
    envelope: Value,
    envelope_file: String,
    envelope_validator: jsonschema::Validator,
    envelope_actions: BTreeMap<String, PiiAction>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("events", &self.events.len())
            .field("envelope", &self.envelope_file)
            .finish()
    }
}

macro_rules! embedded {
    ($($path:literal),* $(,)?) => {
        /// The registry files compiled into the binary, as (path under `registry/`, text).
        pub const EMBEDDED: &[(&str, &str)] = &[$(($path, include_str!(concat!("../registry/", $path)))),*];
    };
}

embedded!(
    "envelope/1.1.0.json",
    "events/project_viewed/1.0.0.json",
    "events/project_created/1.0.0.json",
    "events/task_assigned/1.0.0.json",
    "events/project_creation_error/1.0.0.json",
    "events/project_feedback_submitted/1.0.0.json",
    "events/project_feedback_submitted/1.1.0.json",
    "events/recommendation_generated/1.0.0.json",
    "events/recommendation_viewed/1.0.0.json",
    "events/recommendation_accepted/1.0.0.json",
    "events/recommendation_dismissed/1.0.0.json",
    "events/action_executed/1.0.0.json",
    "events/action_executed/1.1.0.json",
    "events/action_failed/1.0.0.json",
    "events/action_rolled_back/1.0.0.json",
    "events/outcome_reply_received/1.0.0.json",
    "events/outcome_meeting_booked/1.0.0.json",
    "events/outcome_deal_advanced/1.0.0.json",
    "events/outcome_deliverable_shipped/1.0.0.json",
    "events/signal_received/1.0.0.json",
    "events/signal_processed/1.0.0.json",
    "events/integration_call_success/1.0.0.json",
    "events/integration_call_failed/1.0.0.json",
    "events/circuit_breaker_opened/1.0.0.json",
);

static EMBEDDED_REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    // The embedded files are part of the build and a unit test loads them; a failure here is a
    // build defect, not bad input.
    #[allow(clippy::expect_used)]
    Registry::from_files(EMBEDDED.iter().map(|(p, t)| (p.to_string(), t.to_string())))
        .expect("the embedded schema registry is valid")
});

impl Registry {
    /// The registry compiled into the binary, parsed on first use.
    #[inline]
    pub fn embedded() -> &'static Registry {
        &EMBEDDED_REGISTRY
    }

    /// Loads every `*.json` under `dir` (layout as in `schemas/registry/`).
    pub fn load_dir(dir: &Path) -> Result<Registry, RegistryError> {
        let mut files = Vec::new();
        collect_json(dir, dir, &mut files)
            .map_err(|e| err(&dir.display().to_string(), e.to_string()))?;
        if files.is_empty() {
            return Err(err(
                &dir.display().to_string(),
                "no schema files (*.json) found",
            ));
        }
        Registry::from_files(files)
    }

    /// Builds a registry from (path, text) pairs: `envelope/<version>.json` and
    /// `events/<event_name>/<version>.json`.
    pub fn from_files(
        files: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Registry, RegistryError> {
        let mut envelope = None;
        let mut events: BTreeMap<String, Vec<EventSchema>> = BTreeMap::new();
        let mut types: BTreeMap<String, (EventType, String)> = BTreeMap::new();
        for (path, text) in files {
            let document: Value =
                serde_json::from_str(&text).map_err(|e| err(&path, format!("not JSON: {e}")))?;
            let parts: Vec<&str> = path.trim_end_matches(".json").split('/').collect();
            match parts.as_slice() {
                ["envelope", version] => {
                    Version::parse(version)
                        .ok_or_else(|| err(&path, "file name must be <MAJOR.MINOR.PATCH>.json"))?;
                    if envelope.replace((path.clone(), document)).is_some() {
                        return Err(err(&path, "more than one envelope schema"));
                    }
                }
                ["events", name, version] => {
                    let version = Version::parse(version)
                        .ok_or_else(|| err(&path, "file name must be <MAJOR.MINOR.PATCH>.json"))?;
                    let (schema, event_type, origin) =
                        compile_event(&path, name, version, document)?;
                    if let Some((t, _)) = types
                        .insert(name.to_string(), (event_type, origin))
                        .filter(|(t, _)| *t != event_type)
                    {
                        return Err(err(
                            &path,
                            format!(
                                "event_type `{}` differs from another version's `{}`",
                                event_type.as_str(),
                                t.as_str()
                            ),
                        ));
                    }
                    events.entry(name.to_string()).or_default().push(schema);
                }
                _ => {
                    return Err(err(
                        &path,
                        "expected envelope/<version>.json or events/<event_name>/<version>.json",
                    ));
                }
            }
        }
        let Some((envelope_file, envelope)) = envelope else {
            return Err(err("envelope/", "the envelope schema is missing"));
        };
        let envelope_validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&envelope)
            .map_err(|e| err(&envelope_file, format!("not a valid JSON Schema: {e}")))?;
        if events.len() > usize::from(u16::MAX) {
            return Err(err("events/", "too many events"));
        }
        let events: Vec<EventSpec> = events
            .into_iter()
            .map(|(name, mut versions)| {
                versions.sort_by_key(|s| s.version);
                let (event_type, origin) = types
                    .remove(&name)
                    .unwrap_or((EventType::Action, String::new()));
                EventSpec {
                    name,
                    event_type,
                    origin,
                    versions,
                }
            })
            .collect();
        let by_name = events
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        let envelope_actions = envelope
            .get("properties")
            .and_then(Value::as_object)
            .map(|props| {
                props
                    .iter()
                    .filter_map(|(k, v)| {
                        Some((k.clone(), parse_action(v.get("x-action")?.as_str()?)?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Registry {
            events,
            by_name,
            envelope,
            envelope_file,
            envelope_validator,
            envelope_actions,
        })
    }

    /// Every event, sorted by name. [`crate::EventName`] indexes this list.
    pub fn events(&self) -> &[EventSpec] {
        &self.events
    }

    /// The event called `name`.
    #[inline]
    pub fn event(&self, name: &str) -> Option<(usize, &EventSpec)> {
        self.by_name.get(name).map(|&i| (i, &self.events[i]))
    }

    /// The schema of event `name` at `version` (`MAJOR.MINOR.PATCH`; the newest when `None`),
    /// if both are known. The one lookup by name and version; the decoder's own checks say
    /// *which* of the two is unknown.
    #[inline]
    pub fn schema_of(&self, name: &str, version: Option<&str>) -> Option<&EventSchema> {
        let (_, spec) = self.event(name)?;
        let version = match version {
            None => None,
            Some(text) => Some(Version::parse(text)?),
        };
        spec.schema(version)
    }

    /// The envelope schema document.
    pub fn envelope(&self) -> &Value {
        &self.envelope
    }

    /// The file the envelope schema came from.
    pub fn envelope_file(&self) -> &str {
        &self.envelope_file
    }

    /// What the envelope schema says to do with top-level field `name` (`None`: undeclared).
    pub fn envelope_action(&self, name: &str) -> Option<PiiAction> {
        self.envelope_actions.get(name).copied()
    }

    /// Violations of the envelope schema by `record` (slow path: used to explain a record
    /// the typed decoder refused).
    pub fn envelope_violations(&self, record: &Value) -> Vec<crate::Violation> {
        self.envelope_validator
            .iter_errors(record)
            .take(crate::MAX_VIOLATIONS)
            // Masked: the message names the rule, never the offending value.
            .map(|e| crate::Violation {
                pointer: e.instance_path().as_str().to_owned(),
                keyword: e.kind().keyword().to_owned(),
                message: e.masked().to_string(),
            })
            .collect()
    }
}

/// Every `*.json` under `dir`, as (path relative to `root` with `/` separators, text), sorted.
pub(crate) fn collect_json(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, String)>,
) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_json(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "json") {
            let relative = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            out.push((relative, std::fs::read_to_string(&path)?));
        }
    }
    Ok(())
}

const TOP_KEYWORDS: &[&str] = &[
    "$schema",
    "$id",
    "title",
    "description",
    "type",
    "x-sightline",
    "properties",
    "required",
    "additionalProperties",
];
const FIELD_KEYWORDS: &[&str] = &[
    "type",
    "description",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "format",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "x-pii",
    "x-action",
];

fn parse_action(name: &str) -> Option<PiiAction> {
    [
        PiiAction::Keep,
        PiiAction::Pseudonymize,
        PiiAction::Scrub,
        PiiAction::Drop,
        PiiAction::Consent,
    ]
    .into_iter()
    .find(|a| a.as_str() == name)
}

fn compile_event(
    path: &str,
    name: &str,
    version: Version,
    document: Value,
) -> Result<(EventSchema, EventType, String), RegistryError> {
    let top = document
        .as_object()
        .ok_or_else(|| err(path, "a schema must be a JSON object"))?;
    if let Some(k) = top.keys().find(|k| !TOP_KEYWORDS.contains(&k.as_str())) {
        return Err(err(
            path,
            format!(
                "keyword `{k}` is not supported at the top level (supported: {})",
                TOP_KEYWORDS.join(", ")
            ),
        ));
    }
    if top.get("$schema").and_then(Value::as_str) != Some(DIALECT) {
        return Err(err(path, format!("`$schema` must be `{DIALECT}`")));
    }
    if top.get("type").and_then(Value::as_str) != Some("object") {
        return Err(err(path, "`type` must be `object`"));
    }
    let meta = top
        .get("x-sightline")
        .and_then(Value::as_object)
        .ok_or_else(|| err(path, "`x-sightline` metadata is missing"))?;
    let text = |key: &str| meta.get(key).and_then(Value::as_str);
    if text("event_name") != Some(name) {
        return Err(err(
            path,
            format!("x-sightline.event_name must be `{name}` (the directory name)"),
        ));
    }
    if text("version").and_then(Version::parse) != Some(version) {
        return Err(err(
            path,
            format!("x-sightline.version must be `{version}` (the file name)"),
        ));
    }
    let event_type: EventType = text("event_type")
        .and_then(|t| serde_json::from_value(Value::String(t.to_owned())).ok())
        .ok_or_else(|| {
            err(
                path,
                "x-sightline.event_type must be one of view, action, outcome, error, system_health",
            )
        })?;
    let origin = text("origin").unwrap_or_default().to_owned();
    let supersedes = match meta.get("supersedes") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_str()
                .and_then(Version::parse)
                .ok_or_else(|| err(path, "x-sightline.supersedes must be a version"))?,
        ),
    };
    let latency = match meta.get("latency") {
        None | Some(Value::Null) => None,
        Some(l) => {
            let field = l
                .get("field")
                .and_then(Value::as_str)
                .ok_or_else(|| err(path, "x-sightline.latency.field is missing"))?;
            let scale_ms = match l.get("unit").and_then(Value::as_str) {
                Some("ms") => 1.0,
                Some("seconds") => 1000.0,
                _ => {
                    return Err(err(
                        path,
                        "x-sightline.latency.unit must be `ms` or `seconds`",
                    ));
                }
            };
            Some(Latency {
                field: field.to_owned(),
                scale_ms,
            })
        }
    };
    let envelope = match meta.get("envelope") {
        None => Vec::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                v.as_str()
                    .map(|v| (k.clone(), v.to_owned()))
                    .ok_or_else(|| err(path, format!("x-sightline.envelope.{k} must be a string")))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(err(path, "x-sightline.envelope must be an object")),
    };
    let properties = compile_object(path, "", top)?;
    if let Some(l) = &latency {
        match properties.field(&l.field) {
            Some((_, rule))
                if rule.types.accepts(Types::NUMBER) || rule.types.contains(Types::INTEGER) => {}
            _ => {
                return Err(err(
                    path,
                    format!("latency field `{}` must be a numeric property", l.field),
                ));
            }
        }
    }
    let keep = compile_keep(path, meta.get("keep"), &properties)?;
    let keep_of = properties
        .fields
        .iter()
        .map(|(name, _)| keep.iter().position(|k| k.field == *name))
        .collect();
    let latency_of = latency
        .as_ref()
        .and_then(|l| properties.field(&l.field))
        .map(|(i, _)| i);
    Ok((
        EventSchema {
            version,
            supersedes,
            envelope,
            properties,
            latency,
            keep,
            keep_of,
            latency_of,
            document,
            file: path.to_owned(),
        },
        event_type,
        origin,
    ))
}

/// Reads `x-sightline.keep` (`{"measures": [...], "labels": [...]}`) and checks each name
/// against the properties: a measure is a number, integer or boolean kept as it is; a label is
/// a string (or an array of strings) that is kept or scrubbed. A pseudonymized or dropped
/// property cannot be kept: its stored form would either be personal data or a pseudonym that
/// changes with every key period.
fn compile_keep(
    path: &str,
    keep: Option<&Value>,
    properties: &ObjectRule,
) -> Result<Vec<Kept>, RegistryError> {
    let Some(keep) = keep else {
        return Ok(Vec::new());
    };
    let Some(keep) = keep.as_object() else {
        return Err(err(path, "x-sightline.keep must be an object"));
    };
    let mut kept = Vec::new();
    for (list, value) in keep {
        let measures = match list.as_str() {
            "measures" => true,
            "labels" => false,
            other => {
                return Err(err(
                    path,
                    format!("x-sightline.keep.{other}: only `measures` and `labels` are allowed"),
                ));
            }
        };
        let names = value
            .as_array()
            .ok_or_else(|| err(path, format!("x-sightline.keep.{list} must be an array")))?;
        for name in names {
            let name = name
                .as_str()
                .ok_or_else(|| err(path, format!("x-sightline.keep.{list}: names are strings")))?;
            let Some((_, rule)) = properties.field(name) else {
                return Err(err(
                    path,
                    format!("x-sightline.keep.{list}: `{name}` is not a property of the event"),
                ));
            };
            let mut scrub = false;
            let mut bounded = false;
            let kind = if measures {
                let numeric = Types::NUMBER.0 | Types::INTEGER.0 | Types::BOOLEAN.0 | Types::NULL.0;
                if rule.types.0 & !numeric != 0 || rule.action != PiiAction::Keep {
                    return Err(err(
                        path,
                        format!(
                            "x-sightline.keep.measures: `{name}` must be a number, integer or boolean kept as it is"
                        ),
                    ));
                }
                KeptKind::Measure
            } else {
                let (kind, rule) = match &rule.items {
                    Some(items) if rule.types.contains(Types::ARRAY) => {
                        (KeptKind::Labels, &**items)
                    }
                    _ => (KeptKind::Label, rule),
                };
                let text = Types::STRING.0 | Types::NULL.0;
                if rule.types.0 & !text != 0
                    || !matches!(rule.action, PiiAction::Keep | PiiAction::Scrub)
                {
                    return Err(err(
                        path,
                        format!(
                            "x-sightline.keep.labels: `{name}` must be a string (or an array of strings) that is kept or scrubbed"
                        ),
                    ));
                }
                scrub = rule.action == PiiAction::Scrub;
                bounded = rule.enum_values.is_some();
                kind
            };
            kept.push(Kept {
                field: name.to_owned(),
                label: crate::Label::from(name),
                kind,
                scrub,
                bounded,
            });
        }
    }
    kept.sort_by(|a, b| a.field.cmp(&b.field));
    Ok(kept)
}

fn compile_object(
    path: &str,
    pointer: &str,
    object: &Map<String, Value>,
) -> Result<ObjectRule, RegistryError> {
    if object.get("additionalProperties") != Some(&Value::Bool(false)) {
        return Err(err(
            path,
            format!("{pointer}: objects must be closed (`additionalProperties: false`)"),
        ));
    }
    let props = object
        .get("properties")
        .and_then(Value::as_object)
        .ok_or_else(|| err(path, format!("{pointer}: `properties` is missing")))?;
    if props.len() > 64 {
        return Err(err(
            path,
            format!("{pointer}: at most 64 properties per object"),
        ));
    }
    let fields = props
        .iter()
        .map(|(name, schema)| {
            compile_field(path, &format!("{pointer}/{name}"), schema)
                .map(|rule| (name.clone(), rule))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let required: Vec<String> = match object.get("required") {
        None => Vec::new(),
        Some(Value::Array(names)) => names
            .iter()
            .map(|n| {
                n.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| err(path, format!("{pointer}: `required` lists strings")))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(err(path, format!("{pointer}: `required` must be an array"))),
    };
    ObjectRule::new(fields, required).map_err(|missing| {
        err(
            path,
            format!("{pointer}: required property `{missing}` is not declared in `properties`"),
        )
    })
}

fn compile_field(path: &str, pointer: &str, schema: &Value) -> Result<FieldRule, RegistryError> {
    let at = |message: String| err(path, format!("{pointer}: {message}"));
    let s = schema
        .as_object()
        .ok_or_else(|| at("a property schema must be an object".into()))?;
    if let Some(k) = s.keys().find(|k| !FIELD_KEYWORDS.contains(&k.as_str())) {
        return Err(at(format!(
            "keyword `{k}` is not supported (supported: {})",
            FIELD_KEYWORDS.join(", ")
        )));
    }
    let type_of = |name: &Value| {
        name.as_str()
            .and_then(Types::of_name)
            .ok_or_else(|| at(format!("unknown type {name}")))
    };
    let types = match s.get("type") {
        Some(Value::Array(names)) if !names.is_empty() => {
            names.iter().try_fold(Types::default(), |acc, n| {
                Ok::<_, RegistryError>(acc | type_of(n)?)
            })?
        }
        Some(name @ Value::String(_)) => type_of(name)?,
        _ => {
            return Err(at(
                "`type` is required (a type name or a non-empty array of them)".into(),
            ));
        }
    };
    let enum_values = match s.get("enum") {
        None => None,
        Some(Value::Array(values)) => {
            let mut strings = Vec::new();
            for v in values {
                match v {
                    Value::String(v) => strings.push(v.clone()),
                    Value::Null if types.contains(Types::NULL) => {}
                    other => {
                        return Err(at(format!(
                            "enum values must be strings (or null for a nullable field), found {other}"
                        )));
                    }
                }
            }
            if !types.contains(Types::STRING) {
                return Err(at("`enum` needs type string".into()));
            }
            Some(strings)
        }
        Some(_) => return Err(at("`enum` must be an array".into())),
    };
    let number = |key: &str| match s.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| at(format!("`{key}` must be a number"))),
    };
    let length = |key: &str| match s.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| at(format!("`{key}` must be a non-negative integer"))),
    };
    let date_time = match s.get("format") {
        None => false,
        Some(Value::String(f)) if f == "date-time" => true,
        Some(other) => {
            return Err(at(format!(
                "format {other} is not supported (only date-time)"
            )));
        }
    };
    let items = match s.get("items") {
        None => None,
        Some(item) if types.contains(Types::ARRAY) => Some(Box::new(compile_field(
            path,
            &format!("{pointer}/items"),
            item,
        )?)),
        Some(_) => return Err(at("`items` needs type array".into())),
    };
    let object = if s.contains_key("properties") || types.contains(Types::OBJECT) {
        if !types.contains(Types::OBJECT) {
            return Err(at("`properties` needs type object".into()));
        }
        Some(compile_object(path, pointer, s)?)
    } else {
        None
    };
    let pii = match s.get("x-pii").and_then(Value::as_str) {
        Some("none") => PiiClass::None,
        Some("identifier") => PiiClass::Identifier,
        Some("contact") => PiiClass::Contact,
        Some("free_text") => PiiClass::FreeText,
        Some("network") => PiiClass::Network,
        Some("location") => PiiClass::Location,
        Some("secret") => PiiClass::Secret,
        _ => return Err(at("`x-pii` must be one of none, identifier, contact, free_text, network, location, secret".into())),
    };
    let Some(action) = s
        .get("x-action")
        .and_then(Value::as_str)
        .and_then(parse_action)
    else {
        return Err(at(
            "`x-action` must be one of keep, pseudonymize, scrub, drop, consent".into(),
        ));
    };
    let allowed = match pii {
        PiiClass::None => &[PiiAction::Keep, PiiAction::Drop][..],
        PiiClass::Identifier | PiiClass::Contact => &[PiiAction::Pseudonymize, PiiAction::Drop][..],
        PiiClass::FreeText => &[PiiAction::Scrub, PiiAction::Drop][..],
        PiiClass::Network | PiiClass::Secret => &[PiiAction::Drop][..],
        PiiClass::Location => &[PiiAction::Drop][..],
    };
    if !allowed.contains(&action) {
        return Err(at(format!(
            "x-action `{}` is not allowed for x-pii `{}` (allowed: {})",
            action.as_str(),
            s.get("x-pii").and_then(Value::as_str).unwrap_or_default(),
            allowed
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if (types.contains(Types::NUMBER)
        || types.contains(Types::INTEGER)
        || types.contains(Types::BOOLEAN))
        && action == PiiAction::Pseudonymize
    {
        return Err(at("only strings can be pseudonymized".into()));
    }
    Ok(FieldRule {
        types,
        enum_values,
        minimum: number("minimum")?,
        maximum: number("maximum")?,
        min_length: length("minLength")?,
        max_length: length("maxLength")?,
        date_time,
        items,
        object,
        pii,
        action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_schema_indexes_its_kept_properties_and_latency_by_property() {
        let mut kept = 0;
        for spec in Registry::embedded().events() {
            for schema in &spec.versions {
                let fields = &schema.properties.fields;
                assert_eq!(schema.keep_of.len(), fields.len(), "{}", spec.name);
                for ((name, _), place) in fields.iter().zip(&schema.keep_of) {
                    let want = schema.keep.iter().position(|k| k.field == *name);
                    assert_eq!(*place, want, "{} {name}", spec.name);
                    kept += usize::from(place.is_some());
                }
                let latency = schema.latency.as_ref().map(|l| l.field.as_str());
                assert_eq!(
                    schema.latency_of.map(|i| fields[i].0.as_str()),
                    latency,
                    "{}",
                    spec.name
                );
            }
        }
        assert!(kept > 10, "the registry keeps properties: {kept}");
    }

    #[test]
    fn embedded_registry_loads_both_seed_taxonomies() {
        let registry = Registry::embedded();
        assert_eq!(
            registry
                .events()
                .iter()
                .filter(|e| e.origin == "000")
                .count(),
            5
        );
        assert_eq!(
            registry
                .events()
                .iter()
                .filter(|e| e.origin == "004")
                .count(),
            16
        );
        let (_, feedback) = registry.event("project_feedback_submitted").unwrap();
        assert_eq!(feedback.versions.len(), 2);
        assert_eq!(
            feedback.default_schema().unwrap().version,
            Version {
                major: 1,
                minor: 1,
                patch: 0
            }
        );
        let (_, signal) = registry.event("signal_processed").unwrap();
        assert_eq!(
            signal.latency().map(|l| l.field.as_str()),
            Some("processing_duration_ms")
        );
        assert_eq!(
            registry
                .event("recommendation_accepted")
                .unwrap()
                .1
                .latency()
                .unwrap()
                .scale_ms,
            1000.0
        );
        let with_latency: Vec<(&str, &str)> = registry
            .events()
            .iter()
            .filter_map(|e| e.latency().map(|l| (e.name.as_str(), l.field.as_str())))
            .collect();
        assert_eq!(
            with_latency,
            [
                ("action_executed", "duration_ms"),
                ("integration_call_success", "duration_ms"),
                ("project_created", "duration_ms"),
                ("project_viewed", "time_to_first_paint_ms"),
                ("recommendation_accepted", "time_to_decision_seconds"),
                ("signal_processed", "processing_duration_ms"),
                ("task_assigned", "assignment_latency_ms"),
            ]
        );
    }

    #[test]
    fn every_registry_file_is_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("registry");
        let mut on_disk = Vec::new();
        collect_json(&dir, &dir, &mut on_disk).unwrap();
        let mut on_disk: Vec<String> = on_disk.into_iter().map(|(p, _)| p).collect();
        let mut embedded: Vec<String> = EMBEDDED.iter().map(|(p, _)| p.to_string()).collect();
        on_disk.sort();
        embedded.sort();
        assert_eq!(
            on_disk, embedded,
            "add new schema files to the `embedded!` list"
        );
    }

    #[test]
    fn versions_parse_strictly() {
        assert_eq!(
            Version::parse("1.10.0"),
            Some(Version {
                major: 1,
                minor: 10,
                patch: 0
            })
        );
        for bad in [
            "1.0",
            "1.0.0.0",
            "v1.0.0",
            "1..0",
            "1.0.x",
            "",
            "1.0.-1",
            "1.0.",
            ".1.0",
            "1.0.99999999999",
            "1.0.0 ",
        ] {
            assert_eq!(Version::parse(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        /// The one-pass parser agrees with splitting on dots and parsing each part.
        #[test]
        fn version_parse_agrees_with_split_and_parse(text in "[0-9.x]{0,14}") {
            let parts: Vec<&str> = text.split('.').collect();
            let reference = (parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
                .then(|| Some(Version { major: parts[0].parse().ok()?, minor: parts[1].parse().ok()?, patch: parts[2].parse().ok()? }))
                .flatten();
            proptest::prop_assert_eq!(Version::parse(&text), reference);
        }
    }

    #[test]
    fn unsupported_keywords_and_open_objects_are_load_errors() {
        let envelope = EMBEDDED[0];
        let event = |props: &str| {
            format!(
                r#"{{"$schema":"{DIALECT}","type":"object","x-sightline":{{"event_name":"e","version":"1.0.0","event_type":"action"}},"properties":{props},"additionalProperties":false}}"#
            )
        };
        let load = |props: &str| {
            Registry::from_files([
                (envelope.0.to_owned(), envelope.1.to_owned()),
                ("events/e/1.0.0.json".to_owned(), event(props)),
            ])
        };
        assert!(load(r#"{"a":{"type":"string","x-pii":"none","x-action":"keep"}}"#).is_ok());
        let message =
            load(r#"{"a":{"type":"string","pattern":"x","x-pii":"none","x-action":"keep"}}"#)
                .unwrap_err()
                .message;
        assert!(message.contains("pattern"), "{message}");
        let message = load(r#"{"a":{"type":"string"}}"#).unwrap_err().message;
        assert!(message.contains("x-pii"), "{message}");
        let message = load(r#"{"a":{"type":"string","x-pii":"contact","x-action":"keep"}}"#)
            .unwrap_err()
            .message;
        assert!(message.contains("not allowed"), "{message}");
        let message =
            load(r#"{"a":{"type":"object","properties":{},"x-pii":"none","x-action":"keep"}}"#)
                .unwrap_err()
                .message;
        assert!(message.contains("closed"), "{message}");
    }
}
