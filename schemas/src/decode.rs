//! Decoding of one raw record into an [`Event`].
//!
//! Decoding borrows from the input wherever it can (`Cow<str>` fields, `properties` kept as a
//! raw JSON slice until the event's name says which field holds its latency) and allocates only
//! for the fields an [`Event`] keeps. Every failure is a [`DecodeError`] with a
//! [`FailureKind`]; decoding never panics.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::{DataSensitivity, Event, EventName, EventType, FailureKind, PiiClassification, Platform, Source};

/// Default upper bound on the size of one record: 1 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

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
}

impl DecodeError {
    /// A failure of `kind`, explained by `reason`.
    pub fn new(kind: FailureKind, reason: impl Into<String>) -> DecodeError {
        DecodeError { kind, reason: reason.into(), event_name: None, event_time_ms: None }
    }

    /// The same failure, naming the event it happened to.
    pub fn of_event(mut self, event: &crate::Event) -> DecodeError {
        self.event_name = Some(event.event_name.as_str().to_owned());
        self.event_time_ms = Some(event.event_time_ms);
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

/// Decodes records of the canonical envelope. Cheap to clone; holds only limits.
#[derive(Clone, Debug)]
pub struct Decoder {
    max_event_bytes: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder { max_event_bytes: DEFAULT_MAX_EVENT_BYTES }
    }
}

/// The envelope as it appears on the wire. Unknown top-level fields are rejected: the envelope
/// is an allowlist.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
// The optional envelope fields are deserialized so that their types are checked; the event
// keeps only what later stages use.
#[allow(dead_code)]
struct WireEnvelope<'a> {
    #[serde(borrow)]
    event_id: Cow<'a, str>,
    #[serde(borrow)]
    event_name: Cow<'a, str>,
    event_type: EventType,
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
    source: Source,
    platform: Platform,
    #[serde(borrow)]
    app_version: Cow<'a, str>,
    #[serde(borrow)]
    tenant_id: Cow<'a, str>,
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow)]
    session_id: Cow<'a, str>,
    #[serde(borrow)]
    feature_area: Cow<'a, str>,
    pii_classification: PiiClassification,
    data_sensitivity: DataSensitivity,
    #[serde(borrow, default)]
    workflow_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    surface: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    experiment_assignments: Option<BTreeMap<Cow<'a, str>, Cow<'a, str>>>,
    #[serde(borrow, default)]
    properties: Option<&'a RawValue>,
    // Optional envelope fields that are checked for type here and used by later stages.
    #[serde(borrow, default)]
    user_role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    auth_context: Option<Cow<'a, str>>,
    #[serde(default)]
    is_internal: Option<bool>,
    #[serde(borrow, default)]
    request_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    trace_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    device_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    browser_family: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    os_family: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    country: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    region: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    connection_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    schema_version: Option<Cow<'a, str>>,
}

impl Decoder {
    /// A decoder that rejects records larger than `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Decoder {
        Decoder { max_event_bytes }
    }

    /// The largest record this decoder accepts, in bytes.
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }

    /// The failure of a record of `size` bytes that is over the limit (also used by readers
    /// that measure a record without holding it).
    pub fn oversize(&self, size: u64) -> DecodeError {
        DecodeError::new(FailureKind::Oversize, format!("record is {size} bytes, the limit is {}", self.max_event_bytes))
    }

    /// Decodes one record (one JSON object, no trailing newline required).
    pub fn decode(&self, bytes: &[u8]) -> Result<Event, DecodeError> {
        if bytes.len() > self.max_event_bytes {
            return Err(self.oversize(bytes.len() as u64));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::new(FailureKind::InvalidUtf8, format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
        let trimmed = text.trim_start();
        if trimmed.is_empty() {
            return Err(DecodeError::new(FailureKind::Empty, "empty record"));
        }
        if !trimmed.starts_with('{') {
            // Serde would read an array as a struct's fields in order; an event is an object.
            return Err(match serde_json::from_str::<serde_json::Value>(text) {
                Ok(value) => DecodeError::new(FailureKind::WrongType, format!("an event must be a JSON object, found {}", json_kind(&value))),
                Err(e) => DecodeError::from_json(&e),
            });
        }
        let wire: WireEnvelope<'_> = serde_json::from_str(text).map_err(|e| DecodeError::from_json(&e))?;
        Self::finish(wire)
    }

    fn finish(wire: WireEnvelope<'_>) -> Result<Event, DecodeError> {
        let with_name = |mut e: DecodeError| {
            e.event_name = Some(wire.event_name.to_string());
            e
        };
        let Some(event_name) = EventName::from_name(&wire.event_name) else {
            return Err(with_name(DecodeError::new(FailureKind::UnknownEvent, format!("event_name `{}` is not in the catalog", wire.event_name))));
        };
        let spec = event_name.spec();
        if wire.event_type != spec.event_type {
            return Err(with_name(DecodeError::new(
                FailureKind::InvalidValue,
                format!("event_type `{}` does not match `{}` for {}", wire.event_type.as_str(), spec.event_type.as_str(), spec.name),
            )));
        }
        let Some(event_time_ms) = crate::parse_rfc3339_ms(&wire.timestamp).filter(|t| *t >= 0) else {
            return Err(with_name(DecodeError::new(
                FailureKind::InvalidValue,
                format!("timestamp `{}` is not an RFC 3339 UTC time after 1970", wire.timestamp),
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
                return Err(with_name(DecodeError::new(FailureKind::InvalidValue, format!("{field} is empty"))));
            }
        }
        let latency_us = match (spec.latency_field, wire.properties) {
            (Some(field), Some(props)) => {
                let found = extract_number(props, field).map_err(&with_name)?;
                match found {
                    None => None,
                    Some(v) if v.is_finite() && v >= 0.0 => Some((v * spec.latency_scale_ms * 1000.0).round() as u64),
                    Some(v) => {
                        return Err(with_name(DecodeError::new(FailureKind::InvalidValue, format!("properties.{field} = {v} is not a non-negative latency"))));
                    }
                }
            }
            (None, Some(props)) => {
                ensure_object(props).map_err(with_name)?;
                None
            }
            (_, None) => None,
        };
        Ok(Event {
            event_time_ms,
            event_name,
            event_type: wire.event_type,
            event_id: wire.event_id.into_owned(),
            source: wire.source,
            platform: wire.platform,
            app_version: wire.app_version.into_owned(),
            tenant_id: wire.tenant_id.into_owned(),
            user_id: wire.user_id.into_owned(),
            session_id: wire.session_id.into_owned(),
            feature_area: wire.feature_area.into_owned(),
            workflow_name: wire.workflow_name.map(Cow::into_owned),
            surface: wire.surface.map(Cow::into_owned),
            experiment_assignments: wire.experiment_assignments.unwrap_or_default().into_iter().map(|(k, v)| (k.into_owned(), v.into_owned())).collect(),
            pii_classification: wire.pii_classification,
            data_sensitivity: wire.data_sensitivity,
            latency_us,
        })
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Finds the numeric field `field` in the JSON object `props`, skipping every other value
/// without building it.
fn extract_number(props: &RawValue, field: &str) -> Result<Option<f64>, DecodeError> {
    let mut de = serde_json::Deserializer::from_str(props.get());
    FieldSeed { field }.deserialize(&mut de).map_err(|e| {
        let mut err = DecodeError::from_json(&e);
        err.reason = format!("properties: {}", err.reason);
        err
    })
}

fn ensure_object(props: &RawValue) -> Result<(), DecodeError> {
    if props.get().trim_start().starts_with('{') { Ok(()) } else { Err(DecodeError::new(FailureKind::WrongType, "properties must be a JSON object")) }
}

struct FieldSeed<'f> {
    field: &'f str,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Option<f64>;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Option<f64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an object of properties")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == self.field {
                let value: Option<f64> = map.next_value().map_err(|e: A::Error| de::Error::custom(format_args!("field `{}`: {e}", self.field)))?;
                found = value;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn line(overrides: &[(&str, &str)]) -> String {
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
            ("properties", r#"{"task_id":"tk_1","nested":{"a":[1,2]},"assignment_latency_ms":12.5}"#),
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
        let body: Vec<String> = fields.into_iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    }

    fn kind_of(text: &str) -> FailureKind {
        Decoder::default().decode(text.as_bytes()).unwrap_err().kind
    }

    #[test]
    fn decodes_a_full_envelope() {
        let event = Decoder::default().decode(line(&[]).as_bytes()).unwrap();
        assert_eq!(event.event_name.as_str(), "task_assigned");
        assert_eq!(event.event_time_ms, 1_769_178_600_250);
        assert_eq!(event.latency_us, Some(12_500));
        assert_eq!(event.experiment_assignments, vec![("exp_a".into(), "control".into()), ("exp_b".into(), "treatment".into())]);
    }

    #[test]
    fn escaped_strings_decode() {
        let event = Decoder::default().decode(line(&[("feature_area", r#""pro\"jects\u00e9""#)]).as_bytes()).unwrap();
        assert_eq!(event.feature_area, "pro\"jectsé");
    }

    #[test]
    fn classifies_failures() {
        assert_eq!(kind_of(""), FailureKind::Empty);
        assert_eq!(kind_of("   "), FailureKind::Empty);
        assert_eq!(kind_of(&line(&[])[..40]), FailureKind::Truncated);
        assert_eq!(kind_of("not json"), FailureKind::MalformedJson);
        assert_eq!(kind_of(&line(&[("user_id", "")])), FailureKind::MissingField);
        assert_eq!(kind_of(&line(&[("user_id", "42")])), FailureKind::WrongType);
        assert_eq!(kind_of(&line(&[("platform", r#""toaster""#)])), FailureKind::InvalidValue);
        assert_eq!(kind_of(&line(&[("event_type", r#""view""#)])), FailureKind::InvalidValue);
        assert_eq!(kind_of(&line(&[("timestamp", r#""yesterday""#)])), FailureKind::InvalidValue);
        assert_eq!(kind_of(&line(&[("ip_address", r#""10.0.0.1""#)])), FailureKind::UnknownField);
        assert_eq!(kind_of(&line(&[("event_name", r#""mystery""#)])), FailureKind::UnknownEvent);
        assert_eq!(kind_of(&line(&[("properties", r#"{"assignment_latency_ms":"fast"}"#)])), FailureKind::WrongType);
        assert_eq!(kind_of(&line(&[("properties", r#"{"assignment_latency_ms":-1}"#)])), FailureKind::InvalidValue);
        assert_eq!(kind_of(&line(&[("properties", r#"[1]"#)])), FailureKind::WrongType);
        assert_eq!(kind_of("[1,2]"), FailureKind::WrongType);
        assert_eq!(kind_of("null"), FailureKind::WrongType);
        assert_eq!(kind_of("GET / HTTP/1.1"), FailureKind::MalformedJson);
        let mut bytes = line(&[]).into_bytes();
        bytes[60] = 0xff;
        assert_eq!(Decoder::default().decode(&bytes).unwrap_err().kind, FailureKind::InvalidUtf8);
        assert_eq!(Decoder::new(100).decode(line(&[]).as_bytes()).unwrap_err().kind, FailureKind::Oversize);
    }

    #[test]
    fn errors_name_the_field() {
        let err = Decoder::default().decode(line(&[("session_id", "")]).as_bytes()).unwrap_err();
        assert!(err.reason.contains("session_id"), "{}", err.reason);
        let err = Decoder::default().decode(line(&[("event_name", r#""mystery""#)]).as_bytes()).unwrap_err();
        assert_eq!(err.event_name.as_deref(), Some("mystery"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = Decoder::default().decode(&bytes);
        }

        #[test]
        fn never_panics_on_truncations(cut in 0usize..600) {
            let text = line(&[]);
            let cut = cut.min(text.len());
            let _ = Decoder::default().decode(&text.as_bytes()[..cut]);
        }
    }
}
