//! Streaming validation of an event's `properties` against its compiled schema.
//!
//! The validator is a serde visitor: it walks the raw JSON once, checks each value against its
//! [`FieldRule`] as it goes by, and never builds a JSON tree. Strings are borrowed from the
//! input; the JSON pointer of a value is a chain of stack frames and is only rendered when a
//! violation is recorded. On the way it picks up the event's latency measure and counts what
//! the privacy layer does to each field.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use sightline_privacy::Scrubber;
use sightline_schemas::Text;
use sightline_schemas::registry::{
    EventSchema, FieldRule, Kept, KeptKind, ObjectRule, PiiAction, Types,
};
use sightline_schemas::{MAX_VIOLATIONS, Violation};

/// Names that mark exact coordinates; an event carrying one is rejected, whatever its schema.
const COORDINATE_NAMES: &[&str] = &[
    "lat",
    "lng",
    "lon",
    "latitude",
    "longitude",
    "coordinates",
    "geo_point",
    "gps",
];

/// What validating one payload found.
#[derive(Debug, Default)]
pub struct Checked<'de> {
    /// Every violation, up to [`MAX_VIOLATIONS`], in document order.
    pub violations: Vec<Violation>,
    /// The latency property's value, if the payload had it.
    pub latency: Option<f64>,
    /// The kept properties' values (`x-sightline.keep`), as `(index into the keep list, value)`,
    /// in document order.
    pub kept: Vec<(usize, Captured<'de>)>,
    /// Identifier and contact fields, which are never stored as they arrived.
    pub pseudonymized: u32,
    /// Free-text fields in which the scrubber found personal data or a secret.
    pub scrubbed: u32,
    /// Fields the schema says to drop that were present.
    pub dropped: u32,
}

/// A valid value of a kept property, as the payload had it (the decoder scrubs labels whose
/// action says so).
#[derive(Clone, Debug, PartialEq)]
pub enum Captured<'de> {
    /// A number, or a boolean as 0 or 1.
    Number(f64),
    /// A string, borrowed from the record unless it had escapes: the decoder makes the label
    /// (shared for a value from a fixed set, scrubbed when the action says so).
    Text(Cow<'de, str>),
    /// One string of an array of strings.
    Item(Cow<'de, str>),
}

/// What the validator picks up on its way, besides violations: the latency measure and the
/// kept properties of the event's schema. Properties are named by their index in the schema's
/// `properties` rule, which the validator has in hand when it reads one: no name is compared.
#[derive(Clone, Copy, Debug, Default)]
pub struct Capture<'r> {
    /// The index of the top-level property whose number is the event's latency.
    pub latency: Option<usize>,
    /// The kept properties (`x-sightline.keep`), sorted by name.
    pub keep: &'r [Kept],
    /// For each top-level property, its place in `keep` ([`EventSchema::keep_of`]).
    pub keep_of: &'r [Option<usize>],
}

impl<'r> Capture<'r> {
    /// What to capture for `schema`, whose `properties` rule is the one validated.
    pub fn of(schema: &'r EventSchema) -> Capture<'r> {
        Capture {
            latency: schema.latency_of,
            keep: &schema.keep,
            keep_of: &schema.keep_of,
        }
    }

    /// The place in `keep` of top-level property `field`, if it is kept as `kind`.
    fn kept(&self, field: usize, kind: KeptKind) -> Option<usize> {
        let k = (*self.keep_of.get(field)?)?;
        (self.keep.get(k)?.kind == kind).then_some(k)
    }
}

/// Validates the JSON object `raw` against `rule`, capturing what `capture` names. JSON
/// syntax errors come back as `Err`.
pub fn check_properties<'de>(
    raw: &'de str,
    rule: &ObjectRule,
    capture: Capture<'_>,
    scrubber: &Scrubber,
) -> Result<Checked<'de>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(raw);
    let checked = check(&mut de, rule, capture, scrubber)?;
    de.end()?;
    Ok(checked)
}

/// Validates the value `deserializer` reads next against `rule`.
fn check<'de, D: de::Deserializer<'de>>(
    deserializer: D,
    rule: &ObjectRule,
    capture: Capture<'_>,
    scrubber: &Scrubber,
) -> Result<Checked<'de>, D::Error> {
    let mut checked = Checked::default();
    let root = Path {
        parent: None,
        segment: Segment::Key("properties"),
    };
    let mut state = State {
        checked: &mut checked,
        capture,
        scrubber,
    };
    ValueSeed {
        rule: Rule::Object(rule),
        path: &root,
        state: &mut state,
        depth: 0,
        top: usize::MAX,
    }
    .deserialize(deserializer)?;
    Ok(checked)
}

/// Validates `properties` while the envelope reader goes over it, so that the record is read
/// once ([`check_properties`] reads a slice kept for later). JSON `null` reads as `None`, the
/// same as an absent field.
pub(crate) struct PropertiesSeed<'r> {
    /// The rule of the event's `properties`.
    pub rule: &'r ObjectRule,
    /// What to capture on the way.
    pub capture: Capture<'r>,
    /// Finds personal data in free text.
    pub scrubber: &'r Scrubber,
}

impl<'de> DeserializeSeed<'de> for PropertiesSeed<'_> {
    type Value = Option<Checked<'de>>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Option<Checked<'de>>, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for PropertiesSeed<'_> {
    type Value = Option<Checked<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the event's properties")
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<Checked<'de>>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<Checked<'de>>, E> {
        Ok(None)
    }

    fn visit_some<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Option<Checked<'de>>, D::Error> {
        check(deserializer, self.rule, self.capture, self.scrubber).map(Some)
    }
}

struct State<'s, 'r, 'de> {
    checked: &'s mut Checked<'de>,
    capture: Capture<'r>,
    scrubber: &'r Scrubber,
}

impl State<'_, '_, '_> {
    fn violation(&mut self, path: &Path<'_>, keyword: &'static str, message: impl fmt::Display) {
        if self.checked.violations.len() < MAX_VIOLATIONS {
            self.checked.violations.push(Violation {
                pointer: path.render(),
                keyword: keyword.to_owned(),
                message: format!("{}: {message}", path.render()),
            });
        }
    }
}

/// A JSON pointer as a chain of frames on the stack.
struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    segment: Segment<'a>,
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

impl Path<'_> {
    fn render(&self) -> String {
        let mut parts = Vec::new();
        let mut at = Some(self);
        while let Some(p) = at {
            parts.push(match p.segment {
                Segment::Key(k) => k.replace('~', "~0").replace('/', "~1"),
                Segment::Index(i) => i.to_string(),
            });
            at = p.parent;
        }
        parts.iter().rev().fold(String::new(), |mut s, p| {
            s.push('/');
            s.push_str(p);
            s
        })
    }
}

#[derive(Clone, Copy)]
enum Rule<'r> {
    Field(&'r FieldRule),
    Object(&'r ObjectRule),
}

struct ValueSeed<'a, 's, 'r, 'de> {
    rule: Rule<'r>,
    path: &'a Path<'a>,
    state: &'a mut State<'s, 'r, 'de>,
    /// 0 for the `properties` object itself, 1 for its fields, and so on.
    depth: u32,
    /// The index of the top-level property this value is in (for captures); meaningless at
    /// depth 0.
    top: usize,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_, '_, 'de> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> ValueSeed<'_, '_, '_, 'de> {
    fn types(&self) -> Types {
        match self.rule {
            Rule::Field(f) => f.types,
            Rule::Object(_) => Types::OBJECT,
        }
    }

    /// Checks the JSON type; records a violation and returns false if it is not allowed.
    fn type_ok(&mut self, found: Types) -> bool {
        let allowed = self.types();
        if allowed.accepts(found) {
            return true;
        }
        self.state.violation(
            self.path,
            "type",
            format_args!("expected {}, found {}", allowed.names(), found.names()),
        );
        false
    }

    fn number(mut self, value: f64, integral: bool) {
        let found = if integral {
            Types::INTEGER
        } else {
            Types::NUMBER
        };
        if !self.type_ok(found) {
            return;
        }
        let Rule::Field(rule) = self.rule else { return };
        if rule.minimum.is_some_and(|m| value < m) || rule.maximum.is_some_and(|m| value > m) {
            let keyword = if rule.minimum.is_some_and(|m| value < m) {
                "minimum"
            } else {
                "maximum"
            };
            self.state.violation(
                self.path,
                keyword,
                format_args!(
                    "{value} is outside [{}, {}]",
                    fmt_bound(rule.minimum),
                    fmt_bound(rule.maximum)
                ),
            );
            return;
        }
        if self.depth == 1 {
            if self.state.capture.latency == Some(self.top) {
                self.state.checked.latency = Some(value);
            }
            self.capture(KeptKind::Measure, || Captured::Number(value));
        }
        self.privacy(None);
    }

    /// Records the value of a kept top-level property (the one this value is in).
    fn capture(&mut self, kind: KeptKind, value: impl FnOnce() -> Captured<'de>) {
        if self.state.capture.keep.is_empty() {
            return;
        }
        if let Some(index) = self.state.capture.kept(self.top, kind) {
            self.state.checked.kept.push((index, value()));
        }
    }

    /// Checks the string `value`; `text` gives it for a capture (borrowed from the record when
    /// it can be).
    fn string(mut self, value: &str, text: impl FnOnce() -> Cow<'de, str>) {
        if !self.type_ok(Types::STRING) {
            return;
        }
        let Rule::Field(rule) = self.rule else { return };
        if let Some(allowed) = &rule.enum_values
            && !allowed.iter().any(|a| a == value)
        {
            self.state.violation(
                self.path,
                "enum",
                format_args!("`{}` is not one of {}", truncate(value), allowed.join(", ")),
            );
            return;
        }
        if rule.min_length.is_some() || rule.max_length.is_some() {
            let chars = value.chars().count();
            if rule.max_length.is_some_and(|m| chars > m) {
                self.state.violation(
                    self.path,
                    "maxLength",
                    format_args!(
                        "{chars} characters, the limit is {}",
                        rule.max_length.unwrap_or_default()
                    ),
                );
                return;
            }
            if rule.min_length.is_some_and(|m| chars < m) {
                self.state.violation(
                    self.path,
                    "minLength",
                    format_args!(
                        "{chars} characters, at least {} needed",
                        rule.min_length.unwrap_or_default()
                    ),
                );
                return;
            }
        }
        if rule.date_time && sightline_schemas::parse_rfc3339_ms(value).is_none() {
            self.state.violation(
                self.path,
                "format",
                format_args!("`{}` is not an RFC 3339 date-time", truncate(value)),
            );
            return;
        }
        match (self.depth, &self.path.segment) {
            (1, _) => self.capture(KeptKind::Label, || Captured::Text(text())),
            (2, Segment::Index(_)) => self.capture(KeptKind::Labels, || Captured::Item(text())),
            _ => {}
        }
        self.privacy(Some(value));
    }

    /// Counts what the privacy layer does with a present, valid value.
    fn privacy(self, text: Option<&str>) {
        let Rule::Field(rule) = self.rule else { return };
        let checked = &mut *self.state.checked;
        match rule.action {
            PiiAction::Keep | PiiAction::Consent => {}
            PiiAction::Pseudonymize => checked.pseudonymized += 1,
            PiiAction::Drop => checked.dropped += 1,
            PiiAction::Scrub => {
                if text.is_some_and(|t| self.state.scrubber.finds(t)) {
                    checked.scrubbed += 1;
                }
            }
        }
    }
}

fn fmt_bound(b: Option<f64>) -> String {
    b.map_or_else(|| "…".to_owned(), |b| b.to_string())
}

fn truncate(s: &str) -> Cow<'_, str> {
    match s.char_indices().nth(64) {
        Some((i, _)) => Cow::Owned(format!("{}…", &s[..i])),
        None => Cow::Borrowed(s),
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a JSON value")
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<(), E> {
        if self.type_ok(Types::BOOLEAN) {
            if self.depth == 1 {
                self.capture(KeptKind::Measure, || {
                    Captured::Number(f64::from(u8::from(v)))
                });
            }
            self.privacy(None);
        }
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.number(v as f64, true);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.number(v as f64, true);
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // JSON Schema: 3.0 is an integer.
        self.number(v, v.fract() == 0.0);
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.string(v, || Cow::Owned(v.to_owned()));
        Ok(())
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        self.string(v, || Cow::Borrowed(v));
        Ok(())
    }

    fn visit_unit<E: de::Error>(mut self) -> Result<(), E> {
        self.type_ok(Types::NULL);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let rule = self.rule;
        if !self.type_ok(Types::ARRAY) {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        }
        let items = match rule {
            Rule::Field(f) => f.items.as_deref(),
            Rule::Object(_) => None,
        };
        let mut index = 0;
        loop {
            let more = match items {
                Some(rule) => {
                    let path = Path {
                        parent: Some(self.path),
                        segment: Segment::Index(index),
                    };
                    seq.next_element_seed(ValueSeed {
                        rule: Rule::Field(rule),
                        path: &path,
                        state: self.state,
                        depth: self.depth + 1,
                        top: self.top,
                    })?
                    .is_some()
                }
                None => seq.next_element::<IgnoredAny>()?.is_some(),
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let rule = self.rule;
        let object = match rule {
            Rule::Object(o) => Some(o),
            Rule::Field(f) if self.type_ok(Types::OBJECT) => f.object.as_ref(),
            Rule::Field(_) => {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                return Ok(());
            }
        };
        let Some(object) = object else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let mut seen = 0u64;
        while let Some(Text(key)) = map.next_key()? {
            let path = Path {
                parent: Some(self.path),
                segment: Segment::Key(&key),
            };
            match object.field(&key) {
                Some((index, rule)) => {
                    seen |= 1 << index;
                    map.next_value_seed(ValueSeed {
                        rule: Rule::Field(rule),
                        path: &path,
                        state: self.state,
                        depth: self.depth + 1,
                        top: if self.depth == 0 { index } else { self.top },
                    })?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                    if COORDINATE_NAMES.contains(&key.to_ascii_lowercase().as_str()) {
                        self.state
                            .violation(&path, "x-pii", "exact coordinates are not accepted");
                    } else {
                        self.state.violation(
                            &path,
                            "additionalProperties",
                            "property is not declared in the schema",
                        );
                    }
                }
            }
        }
        let required = object.required_mask();
        if seen & required != required {
            for (i, (name, _)) in object.fields.iter().enumerate() {
                if required & (1 << i) != 0 && seen & (1 << i) == 0 {
                    let path = Path {
                        parent: Some(self.path),
                        segment: Segment::Key(name),
                    };
                    self.state
                        .violation(&path, "required", "required property is missing");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sightline_schemas::registry::Registry;

    fn check<'r>(event: &str, raw: &'r str) -> Checked<'r> {
        let (_, spec) = Registry::embedded().event(event).unwrap();
        let schema = spec.default_schema().unwrap();
        check_properties(
            raw,
            &schema.properties,
            Capture::of(schema),
            &Scrubber::new(),
        )
        .unwrap()
    }

    #[test]
    fn reports_pointer_and_keyword() {
        let c = check(
            "integration_call_success",
            r#"{"integration":"hubspot","endpoint":"/x","method":"GET","status_code":200,"duration_ms":35.5}"#,
        );
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        assert_eq!(c.latency, Some(35.5));
        // `integration` and `status_code` are kept (x-sightline.keep).
        assert!(
            c.kept.contains(&(0, Captured::Text("hubspot".into()))),
            "{:?}",
            c.kept
        );
        assert!(
            c.kept.contains(&(1, Captured::Number(200.0))),
            "{:?}",
            c.kept
        );
        let c = check(
            "project_feedback_submitted",
            r#"{"score":2,"sentiment":"negative","tags":["docs","support"],"comment_present":false,"correlation_id":"c1","blocked":true,"blocker_type":"bug"}"#,
        );
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        let items: Vec<&Captured> = c.kept.iter().map(|(_, v)| v).collect();
        assert!(items.contains(&&Captured::Item("docs".into())), "{items:?}");
        assert!(
            items.contains(&&Captured::Number(1.0)),
            "blocked = true: {items:?}"
        );
        let c = check(
            "integration_call_success",
            r#"{"integration":"salesforce","endpoint":"/x","method":"GET","status_code":"200","extra":1}"#,
        );
        let found: Vec<(&str, &str)> = c
            .violations
            .iter()
            .map(|v| (v.pointer.as_str(), v.keyword.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("/properties/integration", "enum"),
                ("/properties/status_code", "type"),
                ("/properties/extra", "additionalProperties"),
                ("/properties/duration_ms", "required")
            ]
        );
    }

    #[test]
    fn coordinates_and_long_comments_are_violations() {
        let c = check(
            "circuit_breaker_opened",
            r#"{"service":"hubspot","failure_count":5,"threshold":5,"latitude":52.52}"#,
        );
        assert_eq!(c.violations[0].keyword, "x-pii");
        let comment = "x".repeat(501);
        let raw = format!(
            r#"{{"score":4,"sentiment":"positive","tags":[],"comment_present":true,"correlation_id":"c","blocked":false,"blocker_type":null,"comment":"{comment}"}}"#
        );
        let c = check("project_feedback_submitted", &raw);
        assert_eq!(
            c.violations
                .iter()
                .map(|v| (v.pointer.as_str(), v.keyword.as_str()))
                .collect::<Vec<_>>(),
            [("/properties/comment", "maxLength")]
        );
    }

    #[test]
    fn counts_privacy_work() {
        let c = check(
            "outcome_reply_received",
            r#"{"draft_id":"d","action_id":"a","recommendation_id":"r","recipient":"john@acmecorp.com","time_to_reply_hours":4.5}"#,
        );
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        assert_eq!(c.pseudonymized, 1);
        let c = check(
            "action_failed",
            r#"{"action_id":"a","action_type":"send_email","error_type":"api_error","error_message":"token sk_live_abcdefghijkl1234 for ops@example.com","retryable":false}"#,
        );
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        assert_eq!(c.scrubbed, 1);
    }
}
