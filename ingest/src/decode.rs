//! Decoding of one raw record into a validated, privacy-safe [`Event`].
//!
//! The envelope is read in one pass by the envelope reader (`wire`), which borrows strings
//! from the input and, once `event_name` has been read, hands `properties` to the streaming
//! validator ([`crate::validate`]) as it goes by; the validator also picks up the latency
//! measure. (When `properties` comes before `event_name` it is kept as a raw slice and
//! validated after the read; when a later `schema_version` names another schema than the
//! newest, which was assumed, the record is read again.) Identifiers are pseudonymized and
//! free text scrubbed before the event leaves the decoder. When the typed read fails, the record is re-read as a JSON value and
//! checked against the envelope schema to say exactly where and why (slow path, bad records
//! only). Every failure is a [`DecodeError`]; decoding never panics.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::memo::Memo;
use crate::validate::{Captured, Checked};
use crate::wire::{self, Mode, Properties, WireEnvelope};
use sightline_privacy::{KeyRing, Privacy};
use sightline_schemas::Label;
use sightline_schemas::registry::{EventSchema, Kept as KeptField, PiiAction, Registry, Version};
use sightline_schemas::{
    DataSensitivity, DeadLetter, Event, EventName, FailureKind, Kept, KeptValue, Links, Measure,
    Origin, PiiClassification, PrivacyCounts, Pseudonym, Violation,
};

/// Default upper bound on the size of one record: 1 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

/// The lowest `sample_rate` an event may declare (the envelope schema's `minimum`): one in a
/// million, so that a weight fits comfortably in millionths.
pub const MIN_SAMPLE_RATE: f64 = 0.000_001;

/// Why one record could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", kind.as_str())]
pub struct DecodeError {
    /// The class of failure.
    pub kind: FailureKind,
    /// What exactly failed, naming the field where known.
    pub reason: String,
    /// The event name, when the envelope was read far enough to know it.
    pub event_name: Option<String>,
    /// The event time, when known.
    pub event_time_ms: Option<i64>,
    /// The schema version tried, when known.
    pub schema_version: Option<String>,
    /// Each violation (JSON pointer, keyword, message), at most [`sightline_schemas::MAX_VIOLATIONS`].
    pub violations: Vec<Violation>,
    /// Whether the record declared restricted data.
    pub restricted: bool,
}

impl DecodeError {
    /// The dead-letter record of this failure, for the record at `origin` of `payload_bytes`
    /// bytes, keeping `payload` (the redacted payload, or none).
    pub fn into_dead_letter(
        self,
        origin: Origin,
        payload_bytes: u64,
        payload: Option<String>,
    ) -> DeadLetter {
        DeadLetter {
            kind: self.kind,
            reason: self.reason,
            event_name: self.event_name,
            event_time_ms: self.event_time_ms,
            origin,
            payload_bytes,
            schema_version: self.schema_version,
            violations: self.violations,
            payload,
            restricted: self.restricted,
        }
    }

    /// A failure of `kind`, explained by `reason`.
    pub fn new(kind: FailureKind, reason: impl Into<String>) -> DecodeError {
        DecodeError {
            kind,
            reason: reason.into(),
            event_name: None,
            event_time_ms: None,
            schema_version: None,
            violations: Vec::new(),
            restricted: false,
        }
    }

    /// A failure explained by schema violations (the first one gives the kind and reason).
    pub fn from_violations(violations: Vec<Violation>) -> DecodeError {
        let (kind, reason) = violations.first().map_or(
            (FailureKind::InvalidValue, String::from("invalid record")),
            |v| (v.kind(), v.message.clone()),
        );
        DecodeError {
            violations,
            ..DecodeError::new(kind, reason)
        }
    }

    fn at(kind: FailureKind, pointer: &str, keyword: &str, message: String) -> DecodeError {
        let violation = Violation {
            pointer: pointer.to_owned(),
            keyword: keyword.to_owned(),
            message: message.clone(),
        };
        DecodeError {
            violations: vec![violation],
            ..DecodeError::new(kind, message)
        }
    }

    /// The same failure, naming the event it happened to.
    pub fn of_event(mut self, event: &Event) -> DecodeError {
        self.event_name = Some(event.event_name.as_str().to_owned());
        self.event_time_ms = Some(event.event_time_ms);
        self.restricted = event.is_restricted();
        self
    }

    fn from_json(err: &serde_json::Error) -> DecodeError {
        use serde_json::error::Category;
        let message = err.to_string();
        let kind = match err.classify() {
            Category::Eof => FailureKind::Truncated,
            Category::Syntax | Category::Io => FailureKind::MalformedJson,
            Category::Data if message.starts_with("missing field") => FailureKind::MissingField,
            Category::Data if message.starts_with("unknown field") => FailureKind::UnknownField,
            Category::Data if message.starts_with("unknown variant") => FailureKind::InvalidValue,
            Category::Data if message.starts_with("invalid value") => FailureKind::InvalidValue,
            Category::Data => FailureKind::WrongType,
        };
        DecodeError::new(kind, message)
    }
}

/// How a topic's records are laid out.
#[derive(Clone, Debug, Default, PartialEq)]
// One per topic, built at start-up: the size of the flat variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Format {
    /// The canonical envelope of the platform spec (event fields at the top, the rest under
    /// `properties`).
    #[default]
    Envelope,
    /// The command-center spec's flat records: `event` names the event, `timestamp` and
    /// `user_id` are envelope fields, every other key is a property. The envelope fields a flat
    /// record lacks come from the defaults.
    Flat(FlatDefaults),
}

/// Envelope values for flat records, which carry none of their own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct FlatDefaults {
    /// `tenant_id` (pseudonymized like any other).
    pub tenant_id: String,
    /// `user_id` when the record has none.
    pub user_id: String,
    /// `session_id`.
    pub session_id: String,
    /// `source` (client, server, worker, api).
    pub source: String,
    /// `platform` (web, ios, android, cli, api).
    pub platform: String,
    /// `app_version`.
    pub app_version: String,
    /// `feature_area`.
    pub feature_area: String,
    /// `pii_classification` (none, low, medium, high).
    pub pii_classification: String,
    /// `data_sensitivity` (public, internal, restricted).
    pub data_sensitivity: String,
}

impl Default for FlatDefaults {
    fn default() -> Self {
        FlatDefaults {
            tenant_id: "default".into(),
            user_id: "anonymous".into(),
            session_id: "none".into(),
            source: "server".into(),
            platform: "api".into(),
            app_version: "unknown".into(),
            feature_area: "command_center".into(),
            pii_classification: "low".into(),
            data_sensitivity: "internal".into(),
        }
    }
}

/// Decodes, validates and pseudonymizes records. One per worker: it caches the current
/// pseudonym key, and memoizes labels and assignments ([`crate::memo`]).
#[derive(Clone, Debug)]
pub struct Decoder {
    max_event_bytes: usize,
    registry: &'static Registry,
    privacy: Privacy,
    format: Format,
    /// Envelope labels (feature areas, surfaces, workflows, experiment ids and variants) →
    /// the label after scrubbing, and whether scrubbing changed it.
    labels: Memo<(Label, bool)>,
    /// Labels stored as they came, from small sets: `app_version` values, and kept property
    /// values from a fixed set (`enum`, [`KeptField::bounded`]).
    verbatim: Memo<Label>,
    /// The raw JSON of `experiment_assignments` → the sorted, scrubbed pairs and how many of
    /// their strings scrubbing changed; `None` when the JSON is not an object of strings.
    assignments: Memo<Option<(Assignments, u16)>>,
    /// `tenant_id` values → their key period and pseudonym in it: every event names a tenant
    /// and there are few, so a tenant costs one keyed hash per key period, not one per event.
    tenants: Memo<(i64, Pseudonym)>,
    /// Which unit links to compute ([`Links`]).
    links: LinkFields,
    /// The buffer each event's kept values are gathered in ([`Kept::drain_from`]), empty
    /// between events.
    kept_buffer: Vec<(Label, KeptValue)>,
}

/// Which identifiers get a unit link ([`Links`]): only those an operator follows across key
/// periods, as each costs a keyed hash per event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkFields {
    /// `tenant_id`.
    pub tenant: bool,
    /// `user_id`.
    pub user: bool,
    /// `session_id`.
    pub session: bool,
    /// The events that get them: every event (`None`), or only these, the events the
    /// operators that follow units read.
    pub names: Option<Arc<[EventName]>>,
}

impl LinkFields {
    /// Whether an event named `name` gets its links.
    fn wanted(&self, name: EventName) -> bool {
        self.names
            .as_ref()
            .is_none_or(|names| names.contains(&name))
    }
}

/// An event's experiment assignments, shared by the events that have the same ones.
type Assignments = Arc<[(Label, Label)]>;

/// Distinct labels, versions, assignment sets and tenants a decoder memoizes (per generation).
const LABEL_MEMO: usize = 4096;

impl WireEnvelope<'_> {
    /// The value of a top-level string field, for the schema's fixed envelope values.
    fn text(&self, field: &str) -> Option<&str> {
        match field {
            "feature_area" => Some(&self.feature_area),
            "workflow_name" => self.workflow_name.as_deref(),
            "surface" => self.surface.as_deref(),
            "app_version" => Some(&self.app_version),
            "user_role" => self.user_role.as_deref(),
            _ => None,
        }
    }

    fn restricted(&self) -> bool {
        sightline_schemas::is_restricted(self.data_sensitivity, self.pii_classification)
    }
}

impl Decoder {
    /// A decoder of canonical-envelope records up to `max_event_bytes`, pseudonymizing with
    /// `keys`.
    pub fn new(max_event_bytes: usize, keys: Arc<KeyRing>) -> Decoder {
        Decoder {
            max_event_bytes,
            registry: Registry::embedded(),
            privacy: Privacy::new(keys),
            format: Format::Envelope,
            labels: Memo::new(LABEL_MEMO),
            verbatim: Memo::new(LABEL_MEMO),
            assignments: Memo::new(LABEL_MEMO),
            tenants: Memo::new(LABEL_MEMO),
            links: LinkFields::default(),
            kept_buffer: Vec::new(),
        }
    }

    /// The same decoder, computing the unit links of `links` on every event.
    pub fn with_links(mut self, links: LinkFields) -> Decoder {
        self.links = links;
        self
    }

    /// The same decoder for records in `format`.
    pub fn with_format(mut self, format: Format) -> Decoder {
        self.format = format;
        self
    }

    /// The largest record this decoder accepts, in bytes.
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }

    /// The failure of a record of `size` bytes that is over the limit (also used by readers
    /// that measure a record without holding it).
    pub fn oversize(&self, size: u64) -> DecodeError {
        DecodeError::new(
            FailureKind::Oversize,
            format!(
                "record is {size} bytes, the limit is {}",
                self.max_event_bytes
            ),
        )
    }

    /// What a dead-letter record keeps of `bytes`: the redacted payload, or nothing for a
    /// record over the size limit. A flat record that can be rewritten into the envelope is
    /// kept in envelope form, so that its properties are redacted by their schema.
    pub fn redact_payload(&mut self, bytes: &[u8], event_time_ms: Option<i64>) -> Option<String> {
        if bytes.len() > self.max_event_bytes {
            return None;
        }
        if let Format::Flat(defaults) = &self.format
            && let Ok(envelope) = std::str::from_utf8(bytes)
                .map_err(drop)
                .and_then(|t| flat_to_envelope(self.registry, t, defaults).map_err(drop))
        {
            return Some(
                self.privacy
                    .redact_payload(envelope.as_bytes(), event_time_ms),
            );
        }
        Some(self.privacy.redact_payload(bytes, event_time_ms))
    }

    /// Decodes, validates and pseudonymizes one record (one JSON object, no trailing newline
    /// required). A failure is sanitized before it is returned: see `Decoder::sanitize`.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Event, DecodeError> {
        self.decode_raw(bytes).map_err(|e| self.sanitize(e))
    }

    /// Makes a failure safe to store: reasons and violation messages are pattern-scrubbed and
    /// cut to 512 characters, pointer segments that are not safe names are redacted, an event
    /// name is kept only if it is registered and a schema version only if it is well-formed.
    /// (Envelope messages are already masked: they never quote the offending value.)
    fn sanitize(&self, mut e: DecodeError) -> DecodeError {
        let scrubber = &self.privacy.scrubber;
        let clean = |text: &str| {
            let mut t = scrubber.scrub(text).into_owned();
            if let Some((cut, _)) = t.char_indices().nth(512) {
                t.truncate(cut);
                t.push('…');
            }
            t
        };
        e.reason = clean(&e.reason);
        for v in &mut e.violations {
            v.message = clean(&v.message);
            v.pointer = v
                .pointer
                .split('/')
                .map(|segment| {
                    if segment.is_empty() || scrubber.safe_key(segment) {
                        segment
                    } else {
                        "[redacted]"
                    }
                })
                .collect::<Vec<_>>()
                .join("/");
        }
        e.event_name = e.event_name.filter(|n| self.registry.event(n).is_some());
        e.schema_version = e.schema_version.filter(|v| Version::parse(v).is_some());
        e
    }

    fn decode_raw(&mut self, bytes: &[u8]) -> Result<Event, DecodeError> {
        if bytes.len() > self.max_event_bytes {
            return Err(self.oversize(bytes.len() as u64));
        }
        let text = utf8(bytes)?;
        let trimmed = text.trim_start();
        if trimmed.is_empty() {
            return Err(DecodeError::new(FailureKind::Empty, "empty record"));
        }
        if !trimmed.starts_with('{') {
            // Serde would read an array as a struct's fields in order; an event is an object.
            return Err(match serde_json::from_str::<Value>(text) {
                Ok(value) => DecodeError::at(
                    FailureKind::WrongType,
                    "",
                    "type",
                    format!(
                        "an event must be a JSON object, found {}",
                        json_kind(&value)
                    ),
                ),
                Err(e) => DecodeError::from_json(&e),
            });
        }
        match &self.format {
            Format::Envelope => self.decode_envelope(text),
            Format::Flat(defaults) => {
                let envelope = flat_to_envelope(self.registry, text, defaults)?;
                self.decode_envelope(&envelope)
            }
        }
    }

    /// Reads the envelope of a canonical record and throws it away: the same reader as
    /// [`Decoder::decode`], with `properties` skipped instead of validated, and no privacy. The
    /// benchmarks' parse-only baseline.
    pub fn parse_only(&self, bytes: &[u8]) -> Result<(), DecodeError> {
        let text = utf8(bytes)?;
        wire::read(text, Mode::Raw)
            .map(drop)
            .map_err(|e| DecodeError::from_json(&e))
    }

    fn decode_envelope(&mut self, text: &str) -> Result<Event, DecodeError> {
        match wire::read(text, Mode::Validate(&self.privacy.scrubber)) {
            Ok(wire) => self.finish(text, wire),
            // Parsing `properties` can fail where skipping them does not (a number out of
            // range, a lone surrogate escape): read again with them kept raw, so that the
            // envelope is checked first and the failure keeps its context (event, time,
            // restricted route), whatever the field order. Bad records only.
            Err(e) if !e.is_data() => match wire::read(text, Mode::Raw) {
                Ok(wire) => self.finish(text, wire),
                Err(raw) => Err(self.explain(text, &raw)),
            },
            Err(e) => Err(self.explain(text, &e)),
        }
    }

    /// Slow path: says where and why a record that the typed read refused breaks the envelope.
    fn explain(&self, text: &str, err: &serde_json::Error) -> DecodeError {
        let fallback = DecodeError::from_json(err);
        if !err.is_data() {
            return fallback;
        }
        // The typed read stops at the first unexpected field, before it has seen the whole
        // record: a record that is not JSON at all is a syntax failure, whatever came first.
        let value = match serde_json::from_str::<Value>(text) {
            Ok(value) => value,
            Err(syntax) => return DecodeError::from_json(&syntax),
        };
        let violations = self.registry.envelope_violations(&value);
        let mut error = if violations.is_empty() {
            // The envelope schema and the typed read disagree; say what the typed read saw.
            let keyword = match fallback.kind {
                FailureKind::MissingField => "required",
                FailureKind::UnknownField => "additionalProperties",
                FailureKind::InvalidValue => "enum",
                _ => "type",
            };
            let violation = Violation {
                pointer: String::new(),
                keyword: keyword.to_owned(),
                message: fallback.reason.clone(),
            };
            DecodeError {
                violations: vec![violation],
                ..fallback
            }
        } else {
            DecodeError::from_violations(violations)
        };
        error.event_name = value
            .get("event_name")
            .and_then(Value::as_str)
            .map(str::to_owned);
        error.event_time_ms = value
            .get("timestamp")
            .and_then(Value::as_str)
            .and_then(sightline_schemas::parse_rfc3339_ms);
        error.schema_version = value
            .get("schema_version")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let declared = |field: &str| value.get(field).cloned();
        let sensitivity = declared("data_sensitivity")
            .and_then(|v| DataSensitivity::deserialize(v).ok())
            .unwrap_or(DataSensitivity::Public);
        let classification = declared("pii_classification")
            .and_then(|v| PiiClassification::deserialize(v).ok())
            .unwrap_or(PiiClassification::None);
        error.restricted = sightline_schemas::is_restricted(sensitivity, classification);
        error
    }

    fn finish<'t>(
        &mut self,
        text: &'t str,
        mut wire: WireEnvelope<'t>,
    ) -> Result<Event, DecodeError> {
        let properties = std::mem::replace(&mut wire.properties, Properties::Absent);
        let context = |mut e: DecodeError| {
            e.event_name = Some(wire.event_name.to_string());
            e.schema_version = wire.schema_version.as_deref().map(str::to_owned);
            e.restricted = wire.restricted();
            e.event_time_ms = sightline_schemas::parse_rfc3339_ms(&wire.timestamp);
            e
        };
        let Some(event_name) = EventName::from_name(&wire.event_name) else {
            return Err(context(DecodeError::at(
                FailureKind::UnknownEvent,
                "/event_name",
                "enum",
                format!("event_name `{}` is not in the registry", wire.event_name),
            )));
        };
        let spec = event_name.spec();
        let version = match wire.schema_version.as_deref() {
            None => None,
            Some(text) => Some(Version::parse(text).ok_or_else(|| {
                context(DecodeError::at(
                    FailureKind::UnknownSchemaVersion,
                    "/schema_version",
                    "pattern",
                    format!("schema_version `{text}` is not MAJOR.MINOR.PATCH"),
                ))
            })?),
        };
        let Some(schema) = spec.schema(version) else {
            let known: Vec<String> = spec
                .versions
                .iter()
                .map(|s| s.version.to_string())
                .collect();
            return Err(context(DecodeError::at(
                FailureKind::UnknownSchemaVersion,
                "/schema_version",
                "x-sightline.version",
                format!(
                    "{} has no schema version {}; known: {}",
                    spec.name,
                    wire.schema_version.as_deref().unwrap_or_default(),
                    known.join(", ")
                ),
            )));
        };
        if wire.event_type != spec.event_type {
            return Err(context(DecodeError::at(
                FailureKind::InvalidValue,
                "/event_type",
                "const",
                format!(
                    "event_type `{}` does not match `{}` for {}",
                    wire.event_type.as_str(),
                    spec.event_type.as_str(),
                    spec.name
                ),
            )));
        }
        let Some(event_time_ms) =
            sightline_schemas::parse_rfc3339_ms(&wire.timestamp).filter(|t| *t >= 0)
        else {
            return Err(context(DecodeError::at(
                FailureKind::InvalidValue,
                "/timestamp",
                "format",
                format!(
                    "timestamp `{}` is not an RFC 3339 UTC time after 1970",
                    wire.timestamp
                ),
            )));
        };
        for (field, value) in [
            ("event_id", &wire.event_id),
            ("tenant_id", &wire.tenant_id),
            ("user_id", &wire.user_id),
            ("session_id", &wire.session_id),
            ("feature_area", &wire.feature_area),
        ] {
            if value.is_empty() {
                return Err(context(DecodeError::at(
                    FailureKind::InvalidValue,
                    &format!("/{field}"),
                    "minLength",
                    format!("{field} is empty"),
                )));
            }
        }
        for (field, expected) in &schema.envelope {
            if wire.text(field) != Some(expected.as_str()) {
                return Err(context(DecodeError::at(
                    FailureKind::InvalidValue,
                    &format!("/{field}"),
                    "const",
                    format!(
                        "{} requires {field} = `{expected}`, found {:?}",
                        spec.name,
                        wire.text(field).unwrap_or("nothing")
                    ),
                )));
            }
        }
        // Envelope 1.1.0: the rate the emitter kept the event at, in [0.000001, 1].
        let weight_micros = match wire.sample_rate {
            None => sightline_schemas::WEIGHT_ONE,
            Some(rate) if (MIN_SAMPLE_RATE..=1.0).contains(&rate) => {
                sightline_schemas::weight_of_rate(rate)
            }
            Some(rate) => {
                let keyword = if rate > 1.0 { "maximum" } else { "minimum" };
                return Err(context(DecodeError::at(
                    FailureKind::InvalidValue,
                    "/sample_rate",
                    keyword,
                    format!("sample_rate must be in [{MIN_SAMPLE_RATE}, 1], found {rate}"),
                )));
            }
        };
        let checked = self.properties(text, properties, schema).map_err(|e| {
            let mut err = DecodeError::from_json(&e);
            err.reason = format!("properties: {}", err.reason);
            context(err)
        })?;
        if !checked.violations.is_empty() {
            return Err(context(DecodeError::from_violations(checked.violations)));
        }
        let latency_us = match (checked.latency, &schema.latency) {
            (Some(v), Some(l)) if v.is_finite() && v >= 0.0 => {
                Some((v * l.scale_ms * 1000.0).round() as u64)
            }
            _ => None,
        };

        // Privacy: identifiers become pseudonyms, free text is scrubbed, geo needs consent.
        let count = |n: u32| u16::try_from(n).unwrap_or(u16::MAX);
        let mut privacy = PrivacyCounts {
            pseudonymized: count(checked.pseudonymized).saturating_add(3),
            scrubbed: count(checked.scrubbed),
            dropped: count(checked.dropped),
        };
        if wire.geo_consent != Some(true) {
            privacy.dropped = privacy
                .dropped
                .saturating_add(u16::from(wire.country.is_some()) + u16::from(wire.region));
        }
        let experiment_assignments = match wire.experiment_assignments {
            None => Assignments::default(),
            Some(raw) => {
                let Some((pairs, scrubbed)) = self.assignments(raw.get()) else {
                    // Not an object of strings: the slow path says where.
                    let err =
                        serde_json::from_str::<BTreeMap<Cow<'_, str>, Cow<'_, str>>>(raw.get())
                            .err();
                    return Err(err.map_or_else(
                        || DecodeError::new(FailureKind::WrongType, "experiment_assignments"),
                        |e| self.explain(text, &e),
                    ));
                };
                privacy.scrubbed = privacy.scrubbed.saturating_add(scrubbed);
                pairs
            }
        };
        let pseudonyms = &mut self.privacy.pseudonyms;
        let user_id = pseudonyms.pseudonym_of(&wire.user_id, event_time_ms);
        let period = pseudonyms.period_of(event_time_ms);
        let (_, tenant_id) = self.tenants.get_valid_or_derive(
            &wire.tenant_id,
            |(p, _)| *p == period,
            |tenant| (period, pseudonyms.pseudonym_of(tenant, event_time_ms)),
        );
        let session_id = pseudonyms.pseudonym_of(&wire.session_id, event_time_ms);
        let here = self.links.wanted(event_name);
        let link = |wanted: bool, value: &str, p: &mut sightline_privacy::Pseudonymizer| {
            if wanted && here { p.link_of(value) } else { 0 }
        };
        let links = Links {
            tenant: link(self.links.tenant, &wire.tenant_id, pseudonyms),
            user: link(self.links.user, &wire.user_id, pseudonyms),
            session: link(self.links.session, &wire.session_id, pseudonyms),
        };
        // Free text by the envelope schema; feature areas and experiment names are labels, but
        // they reach the aggregates, so they get the same pass.
        let mut label = |text: &str| {
            let (clean, scrubbed) = scrub_label(&mut self.labels, &self.privacy.scrubber, text);
            privacy.scrubbed = privacy.scrubbed.saturating_add(u16::from(scrubbed));
            clean
        };
        let workflow_name = wire.workflow_name.as_deref().map(&mut label);
        let surface = wire.surface.as_deref().map(&mut label);
        let feature_area = label(&wire.feature_area);
        let user_role = wire.user_role.as_deref().map(&mut label);
        let country = match wire.geo_consent {
            Some(true) => wire.country.as_deref().map(&mut label),
            _ => None,
        };
        // Kept properties: the validator counted the ones it found personal data in already
        // (`checked.scrubbed`), so their labels are scrubbed here without counting again.
        let (labels, scrubber) = (&mut self.labels, &self.privacy.scrubber);
        let mut scrub = |text: &str| scrub_label(labels, scrubber, text).0;
        let verbatim = &mut self.verbatim;
        let mut share = |text: &str| verbatim.get_or_derive(text, |v| Label::from(v));
        let kept = kept_values(
            &schema.keep,
            checked.kept,
            (&mut scrub, &mut share),
            &mut self.kept_buffer,
        );
        let app_version = self
            .verbatim
            .get_or_derive(&wire.app_version, |v| Label::from(v));
        Ok(Event {
            event_time_ms,
            event_name,
            event_type: wire.event_type,
            event_id: wire.event_id.into_owned(),
            source: wire.source,
            platform: wire.platform,
            app_version,
            tenant_id,
            user_id,
            session_id,
            links,
            user_role,
            country,
            kept,
            feature_area,
            workflow_name,
            surface,
            experiment_assignments,
            pii_classification: wire.pii_classification,
            data_sensitivity: wire.data_sensitivity,
            latency_us,
            weight_micros,
            privacy,
        })
    }

    /// What validating the record's `properties` against `schema` found. The envelope reader
    /// has usually done it on its pass; a record whose `schema_version` came after its
    /// `properties` and chose another schema than the one assumed is read again.
    fn properties<'t>(
        &self,
        text: &'t str,
        properties: Properties<'t>,
        schema: &'static EventSchema,
    ) -> Result<Checked<'t>, serde_json::Error> {
        let raw = match properties {
            Properties::Checked(checked, assumed) if std::ptr::eq(assumed, schema) => {
                return Ok(checked);
            }
            Properties::Checked(..) => match wire::read(text, Mode::Raw)?.properties {
                Properties::Raw(raw) => raw.get(),
                _ => "{}",
            },
            Properties::Raw(raw) => raw.get(),
            Properties::Absent => "{}",
        };
        crate::validate::check_properties(
            raw,
            &schema.properties,
            crate::validate::Capture::of(schema),
            &self.privacy.scrubber,
        )
    }

    /// The experiment assignments of `raw` (a JSON object of strings), sorted by experiment
    /// and scrubbed, with the number of strings scrubbing changed; `None` if `raw` is not an
    /// object of strings. Memoized on the raw text.
    fn assignments(&mut self, raw: &str) -> Option<(Assignments, u16)> {
        let (labels, scrubber) = (&mut self.labels, &self.privacy.scrubber);
        self.assignments.get_or_derive(raw, |raw| {
            let map = serde_json::from_str::<BTreeMap<Cow<'_, str>, Cow<'_, str>>>(raw).ok()?;
            let mut scrubbed = 0u16;
            let mut label = |text: &str| {
                let (clean, changed) = scrub_label(labels, scrubber, text);
                scrubbed = scrubbed.saturating_add(u16::from(changed));
                clean
            };
            let pairs: Assignments = map.iter().map(|(k, v)| (label(k), label(v))).collect();
            Some((pairs, scrubbed))
        })
    }
}

/// The kept values of an event (`x-sightline.keep`) from what the validator captured: numbers
/// as measures, strings through `scrub` (the scrubbing pass) when their action is `scrub`,
/// through `share` (one label per value) when they come from a fixed set, and as they are
/// otherwise; the strings of an array gathered into one list. `pairs` is the decoder's
/// buffer, left empty.
fn kept_values<'de>(
    keep: &[KeptField],
    captured: impl IntoIterator<Item = (usize, Captured<'de>)>,
    (scrub, share): (
        &mut impl FnMut(&str) -> Label,
        &mut impl FnMut(&str) -> Label,
    ),
    pairs: &mut Vec<(Label, KeptValue)>,
) -> Kept {
    let mut label = |field: &KeptField, text: Cow<'de, str>| {
        if field.scrub {
            scrub(&text)
        } else if field.bounded {
            share(&text)
        } else {
            Label::from(&*text)
        }
    };
    pairs.clear();
    let mut lists: Vec<(usize, Vec<Label>)> = Vec::new();
    for (index, value) in captured {
        let Some(field) = keep.get(index) else {
            continue;
        };
        match value {
            Captured::Number(v) => {
                if let Some(m) = Measure::from_f64(v) {
                    pairs.push((field.label.clone(), KeptValue::Measure(m)));
                }
            }
            Captured::Text(text) => {
                pairs.push((field.label.clone(), KeptValue::Label(label(field, text))))
            }
            Captured::Item(text) => {
                let value = label(field, text);
                match lists.iter_mut().find(|(i, _)| *i == index) {
                    Some((_, list)) => list.push(value),
                    None => lists.push((index, vec![value])),
                }
            }
        }
    }
    for (index, list) in lists {
        if let Some(field) = keep.get(index) {
            pairs.push((field.label.clone(), KeptValue::Labels(list.into())));
        }
    }
    Kept::drain_from(pairs)
}

/// `text` scrubbed, as a shared label, and whether scrubbing changed it; memoized in `labels`.
fn scrub_label(
    labels: &mut Memo<(Label, bool)>,
    scrubber: &sightline_privacy::Scrubber,
    text: &str,
) -> (Label, bool) {
    labels.get_or_derive(text, |text| match scrubber.scrub(text) {
        Cow::Borrowed(same) => (Label::from(same), false),
        Cow::Owned(clean) => (Label::from(clean), true),
    })
}

/// Envelope fields the privacy layer handles in `Decoder::finish`, with the action the code
/// applies; a test checks the envelope schema says the same.
pub const ENVELOPE_PRIVACY: &[(&str, PiiAction)] = &[
    ("user_id", PiiAction::Pseudonymize),
    ("tenant_id", PiiAction::Pseudonymize),
    ("session_id", PiiAction::Pseudonymize),
    ("workflow_name", PiiAction::Scrub),
    ("surface", PiiAction::Scrub),
    ("country", PiiAction::Consent),
    ("region", PiiAction::Consent),
];

/// Rewrites a flat record into the canonical envelope.
fn flat_to_envelope(
    registry: &Registry,
    text: &str,
    defaults: &FlatDefaults,
) -> Result<String, DecodeError> {
    let value: Value = serde_json::from_str(text).map_err(|e| DecodeError::from_json(&e))?;
    let Value::Object(mut record) = value else {
        return Err(DecodeError::at(
            FailureKind::WrongType,
            "",
            "type",
            "an event must be a JSON object".into(),
        ));
    };
    let mut take_string = |field: &str, required: bool| match record.remove(field) {
        Some(Value::String(s)) => Ok(Some(s)),
        None if !required => Ok(None),
        None => Err(DecodeError::at(
            FailureKind::MissingField,
            &format!("/{field}"),
            "required",
            format!("flat record has no `{field}`"),
        )),
        Some(other) => Err(DecodeError::at(
            FailureKind::WrongType,
            &format!("/{field}"),
            "type",
            format!("`{field}` must be a string, found {}", json_kind(&other)),
        )),
    };
    let name = take_string("event", true)?.unwrap_or_default();
    let timestamp = take_string("timestamp", true)?.unwrap_or_default();
    let user_id = take_string("user_id", false)?.unwrap_or_else(|| defaults.user_id.clone());
    let schema_version = take_string("schema_version", false)?;
    let event_id = take_string("event_id", false)?.unwrap_or_else(|| {
        let digest = blake3::hash(text.as_bytes());
        digest.as_bytes()[..16]
            .iter()
            .fold(String::from("flat-"), |mut s, b| {
                s.push_str(&format!("{b:02x}"));
                s
            })
    });
    let Some((_, spec)) = registry.event(&name) else {
        let mut err = DecodeError::at(
            FailureKind::UnknownEvent,
            "/event",
            "enum",
            format!("event `{name}` is not in the registry"),
        );
        err.event_name = Some(name);
        return Err(err);
    };
    let envelope = serde_json::json!({
        "event_id": event_id,
        "event_name": name,
        "event_type": spec.event_type.as_str(),
        "timestamp": timestamp,
        "source": defaults.source,
        "platform": defaults.platform,
        "app_version": defaults.app_version,
        "tenant_id": defaults.tenant_id,
        "user_id": user_id,
        "session_id": defaults.session_id,
        "feature_area": defaults.feature_area,
        "pii_classification": defaults.pii_classification,
        "data_sensitivity": defaults.data_sensitivity,
        "properties": Value::Object(record),
    });
    let mut envelope = envelope;
    if let Some(version) = schema_version {
        envelope["schema_version"] = Value::String(version);
    }
    Ok(envelope.to_string())
}

fn utf8(bytes: &[u8]) -> Result<&str, DecodeError> {
    std::str::from_utf8(bytes).map_err(|e| {
        DecodeError::new(
            FailureKind::InvalidUtf8,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sightline_schemas::Source;

    fn line(overrides: &[(&str, &str)]) -> String {
        join(&fields(overrides))
    }

    /// The record as ordered `(field, JSON value)` pairs.
    fn fields(overrides: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut fields: Vec<(String, String)> = [
            ("event_id", r#""4b0e9a44-8f47-4d43-9a5e-0c1f6a9a1f00""#),
            ("event_name", r#""task_assigned""#),
            ("event_type", r#""action""#),
            ("timestamp", r#""2026-01-23T14:30:00.250Z""#),
            ("source", r#""server""#),
            ("platform", r#""web""#),
            ("app_version", r#""4.2.0""#),
            ("tenant_id", r#""t_1""#),
            ("user_id", r#""u_1""#),
            ("session_id", r#""s_1""#),
            ("feature_area", r#""projects""#),
            ("pii_classification", r#""low""#),
            ("data_sensitivity", r#""internal""#),
            ("experiment_assignments", r#"{"exp_b":"treatment","exp_a":"control"}"#),
            (
                "properties",
                r#"{"task_id":"tk_1","assignment_type":"direct","assignee_role":"member","due_in_days":3,"priority":"high","assignment_latency_ms":12.5}"#,
            ),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in overrides {
            match fields.iter_mut().find(|(f, _)| f == k) {
                Some(slot) if v.is_empty() => slot.1.clear(),
                Some(slot) => slot.1 = v.to_string(),
                None => fields.push((k.to_string(), v.to_string())),
            }
        }
        fields
    }

    fn join(fields: &[(String, String)]) -> String {
        let body: Vec<String> = fields
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!("{{{}}}", body.join(","))
    }

    /// A failure's kind, violations (pointer, keyword), event name, event time and route.
    type Failure = (
        FailureKind,
        Vec<(String, String)>,
        Option<String>,
        Option<i64>,
        bool,
    );

    /// What a decode says, without the byte positions in serde's messages.
    fn outcome(result: Result<Event, DecodeError>) -> Result<Event, Failure> {
        result.map_err(|e| {
            (
                e.kind,
                e.violations
                    .into_iter()
                    .map(|v| (v.pointer, v.keyword))
                    .collect(),
                e.event_name,
                e.event_time_ms,
                e.restricted,
            )
        })
    }

    /// Records whose `properties` the envelope reader validates on its pass or afterwards,
    /// depending on the field order: valid and invalid ones, a version that changes the
    /// schema, an unknown version and an unknown event.
    fn order_cases() -> Vec<(&'static str, Vec<(String, String)>)> {
        let feedback = |version: &str, comment: &str| {
            let props = format!(
                r#"{{"score":4,"sentiment":"positive","tags":["docs"],"comment_present":true,"correlation_id":"c","blocked":false,"blocker_type":null{comment}}}"#
            );
            fields(&[
                ("event_name", r#""project_feedback_submitted""#),
                ("event_type", r#""outcome""#),
                ("schema_version", version),
                ("properties", &props),
            ])
        };
        vec![
            ("valid", fields(&[])),
            (
                "valid_with_version",
                fields(&[("schema_version", r#""1.0.0""#)]),
            ),
            (
                "invalid_properties",
                fields(&[(
                    "properties",
                    r#"{"task_id":"t","assignment_type":"sideways","due_in_days":"3","extra":1}"#,
                )]),
            ),
            ("null_properties", fields(&[("properties", "null")])),
            ("array_properties", fields(&[("properties", r#"[1]"#)])),
            (
                "unknown_version",
                fields(&[("schema_version", r#""9.0.0""#)]),
            ),
            ("null_version", fields(&[("schema_version", "null")])),
            ("unknown_event", fields(&[("event_name", r#""mystery""#)])),
            // 1.1.0 (the newest) adds `comment`: assuming it and then meeting 1.0.0 must re-check.
            (
                "feedback_1_0_with_comment",
                feedback(r#""1.0.0""#, r#","comment":"fine""#),
            ),
            (
                "feedback_1_1_with_comment",
                feedback(r#""1.1.0""#, r#","comment":"fine""#),
            ),
            ("feedback_1_0", feedback(r#""1.0.0""#, "")),
            (
                "feedback_newest_with_an_email",
                feedback("", r#","comment":"mail me at jane@example.com""#),
            ),
            // Values that skipping accepts and parsing refuses, on the restricted route.
            (
                "number_out_of_range_restricted",
                fields(&[
                    ("data_sensitivity", r#""restricted""#),
                    ("properties", r#"{"task_id":"t","due_in_days":1e400}"#),
                ]),
            ),
            (
                "lone_surrogate",
                fields(&[("properties", r#"{"task_id":"\ud800"}"#)]),
            ),
        ]
    }

    /// The order case called `name`.
    fn order_case(name: &str) -> Vec<(String, String)> {
        order_cases()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no order case `{name}`"))
            .1
    }

    fn decoder() -> Decoder {
        Decoder::new(
            DEFAULT_MAX_EVENT_BYTES,
            Arc::new(KeyRing::from_hex("test", &"5a".repeat(32), 30).unwrap()),
        )
    }

    fn kind_of(text: &str) -> FailureKind {
        decoder().decode(text.as_bytes()).unwrap_err().kind
    }

    fn violation_of(text: &str) -> (String, String) {
        let err = decoder().decode(text.as_bytes()).unwrap_err();
        let v = err
            .violations
            .first()
            .unwrap_or_else(|| panic!("no violation in {err:?}"));
        (v.pointer.clone(), v.keyword.clone())
    }

    #[test]
    fn links_only_the_asked_identifiers_of_the_asked_events() {
        let task = EventName::from_name("task_assigned").unwrap();
        let other = EventName::from_name("project_viewed").unwrap();
        let linked = |names: Option<Vec<EventName>>| {
            let links = LinkFields {
                user: true,
                names: names.map(Into::into),
                ..Default::default()
            };
            decoder()
                .with_links(links)
                .decode(line(&[]).as_bytes())
                .unwrap()
                .links
        };
        let all = linked(None);
        assert!(all.user != 0 && all.tenant == 0 && all.session == 0);
        assert_eq!(linked(Some(vec![task])), all);
        assert_eq!(linked(Some(vec![other])), Links::default());
        // The link is the same in another key period (it follows the user across rotations).
        let later = decoder()
            .with_links(LinkFields {
                user: true,
                ..Default::default()
            })
            .decode(line(&[("timestamp", r#""2026-05-23T14:30:00.250Z""#)]).as_bytes())
            .unwrap();
        assert_eq!(later.links.user, all.user);
    }

    #[test]
    fn a_memoized_tenant_pseudonym_follows_the_key_period() {
        // One decoder, the same tenant in two key periods (30 days apart) and back: each
        // pseudonym is the one a fresh pseudonymizer gives, never the memo's older period's.
        let ring = Arc::new(KeyRing::from_hex("test", &"5a".repeat(32), 30).unwrap());
        let mut one = Decoder::new(DEFAULT_MAX_EVENT_BYTES, Arc::clone(&ring));
        let mut fresh = sightline_privacy::Pseudonymizer::new(ring);
        let mut seen = Vec::new();
        for at in [
            "2026-01-23T14:30:00.250Z",
            "2026-01-23T14:31:00.250Z",
            "2026-05-23T14:30:00.250Z",
            "2026-01-23T14:32:00.250Z",
        ] {
            let event = one
                .decode(line(&[("timestamp", &format!("\"{at}\""))]).as_bytes())
                .unwrap();
            let expected = fresh.pseudonym("t_1", event.event_time_ms);
            assert_eq!(event.tenant_id.as_str(), expected);
            seen.push(expected);
        }
        assert_eq!(seen[0], seen[1]);
        assert_ne!(seen[0], seen[2]);
        assert_eq!(seen[0], seen[3]);
    }

    #[test]
    fn decodes_a_full_envelope() {
        let event = decoder().decode(line(&[]).as_bytes()).unwrap();
        assert_eq!(event.event_name.as_str(), "task_assigned");
        assert_eq!(event.event_time_ms, 1_769_178_600_250);
        assert_eq!(event.latency_us, Some(12_500));
        assert_eq!(
            &event.experiment_assignments[..],
            &[
                ("exp_a".into(), "control".into()),
                ("exp_b".into(), "treatment".into())
            ]
        );
        assert!(
            event.user_id.starts_with("test.")
                && event.tenant_id.starts_with("test.")
                && event.session_id.starts_with("test.")
        );
        assert_eq!(
            event.privacy,
            PrivacyCounts {
                pseudonymized: 4,
                scrubbed: 0,
                dropped: 0
            }
        );
    }

    #[test]
    fn violations_carry_pointer_and_keyword() {
        let v = |o: &[(&str, &str)]| violation_of(&line(o));
        assert_eq!(
            v(&[("platform", r#""toaster""#)]),
            ("/platform".into(), "enum".into())
        );
        assert_eq!(v(&[("user_id", "42")]), ("/user_id".into(), "type".into()));
        assert_eq!(v(&[("user_id", "")]), ("".into(), "required".into()));
        assert_eq!(
            v(&[("ip_address", r#""10.0.0.1""#)]),
            ("".into(), "additionalProperties".into())
        );
        assert_eq!(
            v(&[("schema_version", r#""9.0.0""#)]),
            ("/schema_version".into(), "x-sightline.version".into())
        );
        assert_eq!(
            v(&[(
                "properties",
                r#"{"task_id":"tk_1","assignment_type":"sideways","assignee_role":"m","due_in_days":3,"priority":"high","assignment_latency_ms":1}"#
            )]),
            ("/properties/assignment_type".into(), "enum".into())
        );
        assert_eq!(
            kind_of(&line(&[("schema_version", r#""9.0.0""#)])),
            FailureKind::UnknownSchemaVersion
        );
        assert_eq!(
            kind_of(&line(&[("schema_version", r#""one""#)])),
            FailureKind::UnknownSchemaVersion
        );
        // Assignments are read after the typed envelope (through the memo): still explained.
        assert_eq!(
            v(&[("experiment_assignments", r#"{"exp_a":3}"#)]),
            ("/experiment_assignments/exp_a".into(), "type".into())
        );
        assert_eq!(
            v(&[("experiment_assignments", r#"["exp_a"]"#)]),
            ("/experiment_assignments".into(), "type".into())
        );
    }

    #[test]
    fn memoized_labels_and_assignments_match_a_fresh_decoder() {
        // One decoder sees every line several times (memo hits); each line is also decoded by a
        // fresh decoder (memo misses). Scrubbing counts are per event either way.
        let lines = [
            line(&[]),
            line(&[("surface", r#""/users/jane@example.com/tasks""#)]),
            line(&[(
                "experiment_assignments",
                r#"{"exp_a":"call +1 415 555 0100"}"#,
            )]),
            line(&[
                ("experiment_assignments", r#"{"exp_a":"control"}"#),
                ("workflow_name", r#""onboarding""#),
            ]),
            line(&[("experiment_assignments", "null")]),
        ];
        let mut warm = decoder();
        for _ in 0..3 {
            for text in &lines {
                assert_eq!(
                    warm.decode(text.as_bytes()).unwrap(),
                    decoder().decode(text.as_bytes()).unwrap(),
                    "{text}"
                );
            }
        }
        let scrubbed = warm.decode(lines[2].as_bytes()).unwrap();
        assert_eq!(&*scrubbed.experiment_assignments[0].1, "call [phone]");
        assert_eq!(scrubbed.privacy.scrubbed, 1);
    }

    #[test]
    fn kept_values_are_labelled_once_whatever_the_field_order() {
        let integration = |name: &str, properties_first: bool| {
            let mut f = fields(&[
                ("event_name", r#""integration_call_success""#),
                ("event_type", r#""system_health""#),
                (
                    "properties",
                    &format!(
                        r#"{{"integration":"{name}","endpoint":"/x","method":"GET","status_code":200,"duration_ms":5}}"#
                    ),
                ),
            ]);
            if properties_first {
                let at = f.iter().position(|(k, _)| k == "properties").unwrap();
                let p = f.remove(at);
                f.insert(0, p);
            }
            join(&f)
        };
        let mut d = decoder();
        // An enum field: every event of one value shares one label, in either field order
        // (properties validated on the envelope pass, or read again afterwards).
        let a = d.decode(integration("hubspot", false).as_bytes()).unwrap();
        let b = d.decode(integration("hubspot", true).as_bytes()).unwrap();
        let (la, lb) = (a.kept.label("integration"), b.kept.label("integration"));
        assert_eq!(la.map(|l| &**l), Some("hubspot"));
        assert!(Arc::ptr_eq(la.unwrap(), lb.unwrap()), "not shared");
        assert_eq!(a.kept.measure("status_code"), Some(200.0));
        // An escaped string is captured owned and reads as its value.
        let escaped = d
            .decode(integration("hub\\u0073pot", false).as_bytes())
            .unwrap();
        assert_eq!(
            escaped.kept.label("integration").map(|l| &**l),
            Some("hubspot")
        );
        // A free-text field is scrubbed; an identifier is kept as it came.
        let dismissed = |reason: &str, id: &str| {
            line(&[
                ("event_name", r#""recommendation_dismissed""#),
                ("event_type", r#""action""#),
                (
                    "properties",
                    &format!(
                        r#"{{"recommendation_id":"{id}","queue_item_id":"q","aps_score":40,"action_type":"send_email","dismiss_reason":"{reason}"}}"#
                    ),
                ),
            ])
        };
        let e = d
            .decode(dismissed("mail jane@example.com", "rec\\u0031").as_bytes())
            .unwrap();
        assert_eq!(
            e.kept.label("dismiss_reason").map(|l| &**l),
            Some("mail [email]")
        );
        assert_eq!(
            e.kept.label("recommendation_id").map(|l| &**l),
            Some("rec1")
        );
        assert_eq!(e.privacy.scrubbed, 1);
        assert_eq!(
            e,
            decoder()
                .decode(dismissed("mail jane@example.com", "rec\\u0031").as_bytes())
                .unwrap()
        );
    }

    #[test]
    fn a_record_that_is_not_json_is_a_syntax_failure_whatever_the_typed_read_saw_first() {
        // Found by the fuzz target: an unknown first field, then a syntax error further on.
        let err = decoder()
            .decode(br#"{"event":"x","trace_id":"60c5d2e18a3ion_ms":350}"#)
            .unwrap_err();
        assert_eq!(err.kind, FailureKind::MalformedJson, "{err:?}");
        let err = decoder()
            .decode(br#"{"event":"x","trace_id":"60c5d2e18a"#)
            .unwrap_err();
        assert_eq!(err.kind, FailureKind::Truncated, "{err:?}");
    }

    /// Envelope 1.1.0's `sample_rate`: the event's weight is its inverse; a rate out of
    /// [0.000001, 1], or not a number, is a dead letter that says where and why, and the
    /// envelope schema refuses the same records.
    #[test]
    fn sample_rate_sets_the_weight_and_bad_rates_are_refused() {
        let weight = |rate: &str| {
            decoder()
                .decode(line(&[("sample_rate", rate)]).as_bytes())
                .map(|e| e.weight_micros)
        };
        assert_eq!(
            decoder()
                .decode(line(&[]).as_bytes())
                .unwrap()
                .weight_micros,
            sightline_schemas::WEIGHT_ONE
        );
        assert_eq!(weight("1").unwrap(), 1_000_000);
        assert_eq!(weight("0.25").unwrap(), 4_000_000);
        assert_eq!(weight("0.003").unwrap(), 333_333_333);
        assert_eq!(weight("0.000001").unwrap(), 1_000_000_000_000);
        let registry = Registry::embedded();
        for (bad, kind, keyword) in [
            ("0", FailureKind::InvalidValue, "minimum"),
            ("-0.5", FailureKind::InvalidValue, "minimum"),
            ("1.5", FailureKind::InvalidValue, "maximum"),
            (r#""0.5""#, FailureKind::WrongType, "type"),
            ("null", FailureKind::WrongType, "type"),
        ] {
            let record = line(&[("sample_rate", bad)]);
            let err = decoder().decode(record.as_bytes()).unwrap_err();
            assert_eq!(err.kind, kind, "{bad}: {err:?}");
            let schema = registry.envelope_violations(&serde_json::from_str(&record).unwrap());
            assert!(
                schema
                    .iter()
                    .any(|v| v.pointer == "/sample_rate" && v.keyword == keyword),
                "{bad}: the envelope schema says {schema:?}"
            );
            if kind == FailureKind::InvalidValue {
                assert!(
                    err.violations
                        .iter()
                        .any(|v| v.pointer == "/sample_rate" && v.keyword == keyword),
                    "{bad}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn scrubs_and_drops_envelope_pii() {
        let event = decoder()
            .decode(
                line(&[
                    ("surface", r#""/users/jane@example.com/tasks""#),
                    ("country", r#""DE""#),
                    ("region", r#""eu-central""#),
                ])
                .as_bytes(),
            )
            .unwrap();
        assert_eq!(event.surface.as_deref(), Some("/users/[email]/tasks"));
        assert_eq!(event.privacy.scrubbed, 1);
        assert_eq!(event.privacy.dropped, 2, "geo without consent");
        let event = decoder()
            .decode(line(&[("country", r#""DE""#), ("geo_consent", "true")]).as_bytes())
            .unwrap();
        assert_eq!(event.privacy.dropped, 0);
    }

    #[test]
    fn envelope_privacy_matches_the_envelope_schema() {
        let registry = Registry::embedded();
        for (field, action) in ENVELOPE_PRIVACY {
            assert_eq!(registry.envelope_action(field), Some(*action), "{field}");
        }
        let props = registry.envelope()["properties"].as_object().unwrap();
        for (field, schema) in props {
            let action = schema["x-action"].as_str().unwrap();
            if action != "keep" {
                assert!(
                    ENVELOPE_PRIVACY.iter().any(|(f, _)| f == field),
                    "{field} is `{action}` in the schema but the decoder keeps it"
                );
            }
        }
    }

    #[test]
    fn flat_records_get_envelope_defaults() {
        let mut flat = decoder().with_format(Format::Flat(FlatDefaults::default()));
        let event = flat
            .decode(br#"{"event":"signal_received","signal_id":"uuid","source":"hubspot","signal_type":"deal_stage_changed","processed":false,"timestamp":"2026-01-23T14:25:00Z"}"#)
            .unwrap();
        assert_eq!(event.event_name.as_str(), "signal_received");
        assert_eq!(
            event.source,
            Source::Server,
            "the signal's `source` stays a property"
        );
        assert!(event.event_id.starts_with("flat-"));
        assert_eq!(
            flat.decode(br#"{"event":"nope","timestamp":"2026-01-23T14:25:00Z"}"#)
                .unwrap_err()
                .kind,
            FailureKind::UnknownEvent
        );
        assert_eq!(
            flat.decode(br#"{"timestamp":"2026-01-23T14:25:00Z"}"#)
                .unwrap_err()
                .kind,
            FailureKind::MissingField
        );
    }

    /// The envelope reader's field list and match arms are tied to the envelope schema: the
    /// same fields, every required one refused when absent, and every optional one accepted
    /// with a value of the schema's type.
    #[test]
    fn the_envelope_reader_reads_exactly_the_envelope_schema() {
        let schema = Registry::embedded().envelope();
        let properties = schema["properties"].as_object().unwrap();
        let mut declared: Vec<&str> = properties.keys().map(String::as_str).collect();
        declared.sort_unstable();
        let mut read: Vec<&str> = crate::wire::FIELDS.to_vec();
        read.sort_unstable();
        assert_eq!(
            read, declared,
            "wire::FIELDS must list the envelope schema's properties"
        );
        let required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        let mut decoder = decoder();
        for field in &required {
            let err = decoder.decode(line(&[(field, "")]).as_bytes()).unwrap_err();
            assert_eq!(err.kind, FailureKind::MissingField, "{field}");
            // JSON Schema reports `required` at the object, naming the field.
            let named = format!("\"{field}\"");
            assert!(
                err.violations
                    .iter()
                    .any(|v| v.keyword == "required" && v.message.contains(&named)),
                "{field}: {err:?}"
            );
        }
        // An optional field with a value the schema allows is accepted.
        for (field, rule) in properties
            .iter()
            .filter(|(f, _)| !required.contains(&f.as_str()))
        {
            let value = match (rule.get("enum"), rule["type"].as_str()) {
                (Some(values), _) => values[0].to_string(),
                (None, Some("boolean")) => "true".into(),
                (None, Some("number")) => rule["maximum"].to_string(),
                (None, Some("object")) if field == "properties" => continue,
                (None, Some("object")) => "{}".into(),
                (None, _) if field == "schema_version" => r#""1.0.0""#.into(),
                (None, _) if field == "country" => r#""US""#.into(),
                (None, _) => r#""x""#.into(),
            };
            let record = line(&[(field.as_str(), value.as_str())]);
            if let Err(e) = decoder.decode(record.as_bytes()) {
                panic!(
                    "optional `{field}` = {value} refused: {e} {:?}",
                    e.violations
                );
            }
        }
    }

    #[test]
    fn escaped_strings_decode() {
        let event = decoder()
            .decode(line(&[("feature_area", r#""pro\"jects\u00e9""#)]).as_bytes())
            .unwrap();
        assert_eq!(&*event.feature_area, "pro\"jectsé");
    }

    #[test]
    fn classifies_failures() {
        assert_eq!(kind_of(""), FailureKind::Empty);
        assert_eq!(kind_of("   "), FailureKind::Empty);
        assert_eq!(kind_of(&line(&[])[..40]), FailureKind::Truncated);
        assert_eq!(kind_of("not json"), FailureKind::MalformedJson);
        assert_eq!(
            kind_of(&line(&[("user_id", "")])),
            FailureKind::MissingField
        );
        assert_eq!(kind_of(&line(&[("user_id", "42")])), FailureKind::WrongType);
        assert_eq!(
            kind_of(&line(&[("platform", r#""toaster""#)])),
            FailureKind::InvalidValue
        );
        assert_eq!(
            kind_of(&line(&[("event_type", r#""view""#)])),
            FailureKind::InvalidValue
        );
        assert_eq!(
            kind_of(&line(&[("timestamp", r#""yesterday""#)])),
            FailureKind::InvalidValue
        );
        assert_eq!(
            kind_of(&line(&[("ip_address", r#""10.0.0.1""#)])),
            FailureKind::UnknownField
        );
        assert_eq!(
            kind_of(&line(&[("event_name", r#""mystery""#)])),
            FailureKind::UnknownEvent
        );
        let props = |latency: &str| {
            format!(
                r#"{{"task_id":"t","assignment_type":"auto","assignee_role":"m","due_in_days":1,"priority":"low","assignment_latency_ms":{latency}}}"#
            )
        };
        assert_eq!(
            kind_of(&line(&[("properties", &props(r#""fast""#))])),
            FailureKind::WrongType
        );
        assert_eq!(
            kind_of(&line(&[("properties", &props("-1"))])),
            FailureKind::InvalidValue
        );
        assert_eq!(
            kind_of(&line(&[("properties", r#"{"task_id":"t"}"#)])),
            FailureKind::MissingField
        );
        assert_eq!(
            kind_of(&line(&[(
                "properties",
                &props("1").replace("}", r#","lat":52.5}"#)
            )])),
            FailureKind::PiiRejected
        );
        assert_eq!(
            kind_of(&line(&[("properties", r#"[1]"#)])),
            FailureKind::WrongType
        );
        assert_eq!(kind_of("[1,2]"), FailureKind::WrongType);
        assert_eq!(kind_of("null"), FailureKind::WrongType);
        assert_eq!(kind_of("GET / HTTP/1.1"), FailureKind::MalformedJson);
        let mut bytes = line(&[]).into_bytes();
        bytes[60] = 0xff;
        assert_eq!(
            decoder().decode(&bytes).unwrap_err().kind,
            FailureKind::InvalidUtf8
        );
        assert_eq!(
            Decoder::new(
                100,
                Arc::new(KeyRing::from_hex("test", &"5a".repeat(32), 30).unwrap())
            )
            .decode(line(&[]).as_bytes())
            .unwrap_err()
            .kind,
            FailureKind::Oversize
        );
    }

    #[test]
    fn errors_name_the_field() {
        let err = decoder()
            .decode(line(&[("session_id", "")]).as_bytes())
            .unwrap_err();
        assert!(err.reason.contains("session_id"), "{}", err.reason);
        let err = decoder()
            .decode(line(&[("event_name", r#""mystery""#)]).as_bytes())
            .unwrap_err();
        assert_eq!(
            err.event_name, None,
            "an unregistered name is input, not a label"
        );
        assert!(err.reason.contains("`mystery`"), "{}", err.reason);
        let err = decoder()
            .decode(line(&[("event_name", r#""jane@example.com""#)]).as_bytes())
            .unwrap_err();
        assert!(!err.reason.contains("jane@"), "{}", err.reason);
    }

    #[test]
    fn a_value_that_cannot_be_parsed_keeps_its_context() {
        // Found in review: parsing `properties` in the envelope's pass met this before the
        // envelope was complete, and the dead letter lost its event and its route.
        let case = order_case("number_out_of_range_restricted");
        let err = decoder().decode(join(&case).as_bytes()).unwrap_err();
        assert_eq!(err.kind, FailureKind::MalformedJson, "{err:?}");
        assert!(
            err.restricted
                && err.event_name.as_deref() == Some("task_assigned")
                && err.event_time_ms.is_some(),
            "{err:?}"
        );
        assert!(err.reason.starts_with("properties: "), "{}", err.reason);
        let err = decoder()
            .decode(join(&order_case("lone_surrogate")).as_bytes())
            .unwrap_err();
        assert_eq!(
            (err.kind, err.event_name.as_deref()),
            (FailureKind::MalformedJson, Some("task_assigned")),
            "{err:?}"
        );
    }

    #[test]
    fn behaves_like_a_derived_reader_on_bad_envelopes() {
        let (base, props) = (line(&[]), r#""properties":{}"#);
        let err = decoder()
            .decode(base.replacen('{', r#"{"user_id":"u_0","#, 1).as_bytes())
            .unwrap_err();
        assert!(
            err.reason.starts_with("duplicate field `user_id`"),
            "{}",
            err.reason
        );
        let err = decoder()
            .decode(base.replacen('{', &format!("{{{props},"), 1).as_bytes())
            .unwrap_err();
        assert!(
            err.reason.starts_with("duplicate field `properties`"),
            "{}",
            err.reason
        );
        // `decode` explains these by the envelope schema; `parse_only` keeps serde's words.
        let err = decoder()
            .parse_only(line(&[("ip_address", r#""10.0.0.1""#)]).as_bytes())
            .unwrap_err();
        assert!(
            err.reason
                .starts_with("unknown field `ip_address`, expected one of `event_id`"),
            "{}",
            err.reason
        );
        assert_eq!(err.kind, FailureKind::UnknownField);
        let err = decoder()
            .parse_only(line(&[("tenant_id", ""), ("session_id", "")]).as_bytes())
            .unwrap_err();
        assert!(
            err.reason.starts_with("missing field `tenant_id`"),
            "{}",
            err.reason
        );
        assert_eq!(err.kind, FailureKind::MissingField);
        let err = decoder()
            .decode(&base.as_bytes()[..base.find("\"priority\"").unwrap()])
            .unwrap_err();
        assert_eq!(err.kind, FailureKind::Truncated, "{err:?}");
        let err = decoder()
            .decode(line(&[("properties", r#"{"task_id":tk}"#)]).as_bytes())
            .unwrap_err();
        assert_eq!(err.kind, FailureKind::MalformedJson, "{err:?}");
    }

    #[test]
    fn a_late_schema_version_that_changes_the_schema_is_checked_against_its_own() {
        // 1.0.0 has no `comment`; the newest version, assumed until `schema_version` is read,
        // has. Early or late, the record is checked against 1.0.0.
        let late = order_case("feedback_1_0_with_comment");
        let position = |case: &[(String, String)], field: &str| {
            case.iter().position(|(k, _)| k == field).unwrap()
        };
        assert!(position(&late, "schema_version") > position(&late, "properties"));
        let mut early = late.clone();
        let version = early.remove(position(&early, "schema_version"));
        early.insert(position(&early, "event_name") + 1, version);
        for case in [&late, &early] {
            assert_eq!(
                violation_of(&join(case)),
                ("/properties/comment".into(), "additionalProperties".into()),
                "{}",
                join(case)
            );
        }
        for valid in [
            "valid",
            "valid_with_version",
            "feedback_1_1_with_comment",
            "feedback_1_0",
            "feedback_newest_with_an_email",
        ] {
            let case = join(&order_case(valid));
            assert!(decoder().decode(case.as_bytes()).is_ok(), "{valid}: {case}");
        }
        let comment = order_case("feedback_newest_with_an_email");
        assert_eq!(
            decoder()
                .decode(join(&comment).as_bytes())
                .unwrap()
                .privacy
                .scrubbed,
            1
        );
    }

    proptest::proptest! {
        /// The envelope reader validates `properties` on its pass when `event_name` came
        /// first (assuming the newest schema until `schema_version` says otherwise); any
        /// order must give what the canonical order gives.
        #[test]
        fn field_order_changes_nothing(case in 0usize..1000, order in proptest::collection::vec(proptest::num::u32::ANY, 20)) {
            let mut cases = order_cases();
            let (_, canonical) = cases.swap_remove(case % cases.len());
            let mut shuffled: Vec<(u32, (String, String))> = order.iter().copied().zip(canonical.iter().cloned()).collect();
            proptest::prop_assert_eq!(shuffled.len(), canonical.len());
            shuffled.sort_by_key(|(k, _)| *k);
            let shuffled: Vec<(String, String)> = shuffled.into_iter().map(|(_, f)| f).collect();
            proptest::prop_assert_eq!(outcome(decoder().decode(join(&shuffled).as_bytes())), outcome(decoder().decode(join(&canonical).as_bytes())), "{}", join(&shuffled));
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = decoder().decode(&bytes);
        }

        #[test]
        fn never_panics_on_truncations(cut in 0usize..600) {
            let text = line(&[]);
            let cut = cut.min(text.len());
            let _ = decoder().decode(&text.as_bytes()[..cut]);
        }
    }
}
