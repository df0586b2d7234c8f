//! Sightline's event model and schema registry: the bottom of the workspace.
//!
//! - the canonical envelope of the platform spec as a typed [`Event`] (event fields at the top
//!   level, event-specific fields under `properties`), with its [`Pseudonym`]s and [`Label`]s;
//! - the [`registry`] of versioned JSON Schemas, one per event and version, with each field's
//!   PII class and handling (the streaming validators are compiled from it in
//!   `sightline-ingest`; the handling is applied by `sightline-privacy`);
//! - the self-describing [`DeadLetter`] record that every failure becomes, and the
//!   [`FailureKind`]s it names;
//! - [`lint`], the registry's checks (`sightline schemas lint`), and RFC 3339 time.
//!
//! It depends on little more than serde, so that everything else builds on it quickly.
//!
//! ```
//! use sightline_schemas::{EventName, registry::Registry};
//!
//! let viewed = EventName::from_name("project_viewed").unwrap();
//! assert_eq!(viewed.spec().event_type.as_str(), "view");
//! let schema = Registry::embedded().schema_of("project_feedback_submitted", Some("1.1.0"));
//! assert!(schema.is_some());
//! assert!(Registry::embedded().schema_of("project_feedback_submitted", Some("9.0.0")).is_none());
//! ```

pub mod catalog;
mod kept;
pub mod lint;
mod pseudonym;
pub mod registry;
mod text;
mod time;

pub use kept::{Kept, KeptValue, Measure};
pub use pseudonym::{MAX_KEY_ID, Pseudonym, PseudonymTooLong};
pub use text::Text;
pub use time::{format_rfc3339_ms, parse_rfc3339_ms, rfc3339_bytes, utc_date_hour, wall_clock_ms};

/// A shared, immutable string: a label that many events carry (feature areas, surfaces,
/// workflows, app versions, experiment ids and variants). Cloning it is a reference count; it
/// compares, hashes and serializes as the string.
pub type Label = Arc<str>;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The taxonomy class of an event (`event_type` in the envelope).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// Page or screen views, impressions, load milestones.
    View,
    /// Intentional user-initiated actions.
    Action,
    /// Successful completion of a workflow.
    Outcome,
    /// Client or server errors, denials, timeouts.
    Error,
    /// Background jobs, queues, circuit breakers.
    SystemHealth,
}

impl EventType {
    /// The name used in the envelope and in output tables.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::View => "view",
            EventType::Action => "action",
            EventType::Outcome => "outcome",
            EventType::Error => "error",
            EventType::SystemHealth => "system_health",
        }
    }
}

/// Who emitted the event (`source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A browser or app.
    Client,
    /// A backend service.
    Server,
    /// A background worker.
    Worker,
    /// A public API call.
    Api,
}

/// The platform the event came from (`platform`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    /// Web application.
    Web,
    /// iOS app.
    Ios,
    /// Android app.
    Android,
    /// Command-line tool.
    Cli,
    /// API client.
    Api,
}

/// How much personal data the event declares it carries (`pii_classification`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiClassification {
    /// No personal data.
    None,
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
}

/// How sensitive the event is (`data_sensitivity`); drives routing and retention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSensitivity {
    /// Public.
    Public,
    /// Internal.
    Internal,
    /// Restricted: kept apart, 30-day retention.
    Restricted,
}

/// An `event_name` from the [`catalog`], stored as its index so that events stay cheap to copy.
/// Deserializing checks the index, so an `EventName` always names a catalog entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct EventName(u16);

impl TryFrom<u16> for EventName {
    type Error = String;

    fn try_from(index: u16) -> Result<EventName, String> {
        if usize::from(index) < registry::Registry::embedded().events().len() {
            Ok(EventName(index))
        } else {
            Err(format!("event index {index} is not in the catalog"))
        }
    }
}

impl From<EventName> for u16 {
    fn from(name: EventName) -> u16 {
        name.0
    }
}

impl EventName {
    /// Looks a name up in the registry.
    #[inline]
    pub fn from_name(name: &str) -> Option<EventName> {
        registry::Registry::embedded()
            .event(name)
            .map(|(i, _)| EventName(i as u16))
    }

    /// The name's registry entry: event type, origin, versions and their schemas.
    #[inline]
    pub fn spec(self) -> &'static registry::EventSpec {
        // Every constructor checks the index against the registry.
        &registry::Registry::embedded().events()[usize::from(self.0)]
    }

    /// The event name as a string.
    pub fn as_str(self) -> &'static str {
        &self.spec().name
    }

    /// The event name as a shared label (made once per name: no allocation per call).
    pub fn label(self) -> Label {
        static LABELS: std::sync::LazyLock<Vec<Label>> = std::sync::LazyLock::new(|| {
            registry::Registry::embedded()
                .events()
                .iter()
                .map(|spec| Label::from(spec.name.as_str()))
                .collect()
        });
        LABELS[usize::from(self.0)].clone()
    }

    /// Every registered name, in registry (alphabetical) order.
    pub fn all() -> impl Iterator<Item = EventName> {
        (0..registry::Registry::embedded().events().len() as u16).map(EventName)
    }
}

/// The weight of an event that was not sampled, in millionths (see [`Event::weight_micros`]).
pub const WEIGHT_ONE: u64 = 1_000_000;

/// The weight in millionths of an event kept at `sample_rate` (in (0, 1]): `WEIGHT_ONE /
/// sample_rate`, rounded.
pub fn weight_of_rate(sample_rate: f64) -> u64 {
    (WEIGHT_ONE as f64 / sample_rate).round() as u64
}

/// A decoded event in the canonical envelope.
///
/// Only the fields the pipeline uses downstream are kept; the rest of the envelope is
/// checked by the decoder and then dropped. `event_time_ms` is the event's `timestamp` in
/// milliseconds since the Unix epoch, UTC.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
// Laid out in this order (`repr(C)`): what the aggregates read is in the first two cache lines
// of the event, the pseudonyms (three of its six lines) last. Measured: 106 → 103 L1 data misses
// per event (`benches/README.md`).
#[repr(C)]
pub struct Event {
    /// What the privacy layer did to this event.
    pub privacy: PrivacyCounts,
    /// Which event this is.
    pub event_name: EventName,
    /// Event time, milliseconds since the epoch (UTC). Never negative.
    pub event_time_ms: i64,
    /// The event's latency measure in microseconds, for events whose schema names one.
    pub latency_us: Option<u64>,
    /// The event's Horvitz–Thompson weight in millionths: [`WEIGHT_ONE`] / its envelope's
    /// `sample_rate` ([`WEIGHT_ONE`], weight 1, when it declares none). Counts weight an event
    /// by `weight_micros / WEIGHT_ONE`.
    pub weight_micros: u64,
    /// Product area (scrubbed).
    pub feature_area: Label,
    /// Component or endpoint, if any (scrubbed).
    pub surface: Option<Label>,
    /// Its taxonomy class (always the one the catalog gives for the name).
    pub event_type: EventType,
    /// Declared personal-data class.
    pub pii_classification: PiiClassification,
    /// Declared sensitivity.
    pub data_sensitivity: DataSensitivity,
    /// Who emitted it.
    pub source: Source,
    /// Where it was emitted.
    pub platform: Platform,
    /// Experiment id → variant, sorted by experiment id (scrubbed). Events with the same
    /// assignments share one list.
    pub experiment_assignments: Arc<[(Label, Label)]>,
    /// Workflow, if any (scrubbed).
    pub workflow_name: Option<Label>,
    /// `app_version` of the emitter.
    pub app_version: Label,
    /// `user_role`, if given.
    pub user_role: Option<Label>,
    /// `country`, only when the event says the user consented (`geo_consent: true`).
    pub country: Option<Label>,
    /// The properties the schema keeps (`x-sightline.keep`).
    pub kept: Kept,
    /// `event_id` (UUID).
    pub event_id: String,
    /// Tenant identifier, as a keyed pseudonym.
    pub tenant_id: Pseudonym,
    /// User identifier, as a keyed pseudonym.
    pub user_id: Pseudonym,
    /// Session identifier, as a keyed pseudonym.
    pub session_id: Pseudonym,
    /// Unit keys that link this event's identifiers across key periods, when the pipeline
    /// asked for them (see [`Links`]).
    pub links: Links,
}

/// Keys that follow one tenant, user or session across pseudonym key periods, for operators
/// whose state spans a rotation (a 30-day funnel). Each is a keyed hash of the raw identifier
/// under a *linking key* derived from the pseudonymization key and never rotated; they never
/// reach a table or a topic, only the process and its state checkpoints, which keep a unit only
/// while it can still convert. `0` means not computed: the decoder computes only the links
/// some operator uses, as each costs a keyed hash per event.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Links {
    /// Link of `tenant_id`.
    pub tenant: u64,
    /// Link of `user_id`.
    pub user: u64,
    /// Link of `session_id`.
    pub session: u64,
}

/// What the privacy layer did to one event, counted per field (for the `quality` table).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct PrivacyCounts {
    /// Identifier and contact fields replaced by pseudonyms (or never stored).
    pub pseudonymized: u16,
    /// Free-text fields in which personal data or a secret was found and scrubbed.
    pub scrubbed: u16,
    /// Fields the schema says to drop (IP addresses, secrets, geo without consent) that were present.
    pub dropped: u16,
}

impl PrivacyCounts {
    /// Whether the event carried personal data where it should not have: a PII violation in
    /// the sense of the platform spec's success criteria.
    pub fn violation(&self) -> bool {
        self.scrubbed > 0 || self.dropped > 0
    }
}

/// Upper bound on the violations a dead letter lists.
pub const MAX_VIOLATIONS: usize = 8;

/// One way a record broke its schema: where (JSON pointer into the record), which schema
/// keyword, and a message.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Violation {
    /// JSON pointer of the offending value (`/properties/comment`), or of the missing field.
    pub pointer: String,
    /// The JSON Schema keyword that failed (`required`, `type`, `enum`, `maxLength`, …).
    pub keyword: String,
    /// What failed.
    pub message: String,
}

impl Violation {
    /// The failure kind this violation stands for.
    pub fn kind(&self) -> FailureKind {
        match self.keyword.as_str() {
            "required" => FailureKind::MissingField,
            "additionalProperties" => FailureKind::UnknownField,
            "type" => FailureKind::WrongType,
            "x-pii" => FailureKind::PiiRejected,
            "enum" if self.pointer == "/event_name" => FailureKind::UnknownEvent,
            _ => FailureKind::InvalidValue,
        }
    }
}

/// Why a record was not accepted. Each kind is a column value in the `quality` and
/// `dead_letter` tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FailureKind {
    /// The bytes are not UTF-8.
    InvalidUtf8,
    /// The record is empty or only whitespace.
    Empty,
    /// The record is larger than the configured maximum.
    Oversize,
    /// The record is not JSON.
    MalformedJson,
    /// The JSON ends before it is complete.
    Truncated,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong JSON type.
    WrongType,
    /// A field's value is outside its allowed set or range.
    InvalidValue,
    /// A field that the envelope does not allow.
    UnknownField,
    /// An `event_name` that is not in the registry.
    UnknownEvent,
    /// A `schema_version` the registry does not have for the event.
    UnknownSchemaVersion,
    /// Data that must never be collected (exact coordinates).
    PiiRejected,
    /// The event arrived after its source's watermark had passed its time.
    Late,
}

impl FailureKind {
    /// Every kind, in declaration order.
    pub const ALL: [FailureKind; 13] = [
        FailureKind::InvalidUtf8,
        FailureKind::Empty,
        FailureKind::Oversize,
        FailureKind::MalformedJson,
        FailureKind::Truncated,
        FailureKind::MissingField,
        FailureKind::WrongType,
        FailureKind::InvalidValue,
        FailureKind::UnknownField,
        FailureKind::UnknownEvent,
        FailureKind::UnknownSchemaVersion,
        FailureKind::PiiRejected,
        FailureKind::Late,
    ];

    /// The snake_case name used in tables and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::InvalidUtf8 => "invalid_utf8",
            FailureKind::Empty => "empty",
            FailureKind::Oversize => "oversize",
            FailureKind::MalformedJson => "malformed_json",
            FailureKind::Truncated => "truncated",
            FailureKind::MissingField => "missing_field",
            FailureKind::WrongType => "wrong_type",
            FailureKind::InvalidValue => "invalid_value",
            FailureKind::UnknownField => "unknown_field",
            FailureKind::UnknownEvent => "unknown_event",
            FailureKind::UnknownSchemaVersion => "unknown_schema_version",
            FailureKind::PiiRejected => "pii_rejected",
            FailureKind::Late => "late",
        }
    }
}

/// Where a record came from: a Kafka topic, partition and offset, or a file and line.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// Kafka topic, or `file:<path>` for replayed input.
    pub topic: String,
    /// Kafka partition (0 for files).
    pub partition: i32,
    /// Kafka offset, or the 0-based line number for files.
    pub offset: i64,
}

/// A record that was not accepted, self-describing so that it can be inspected and replayed.
///
/// It never holds the raw payload: only its size and the payload as the privacy layer left it
/// (`sightline_privacy::Privacy::redact_payload`), so that nothing private can reach a dead-letter sink.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeadLetter {
    /// What failed.
    pub kind: FailureKind,
    /// Human-readable reason, naming the field where known.
    pub reason: String,
    /// The event name, when the record got far enough to have one.
    pub event_name: Option<String>,
    /// The event time, when known (always known for late events).
    pub event_time_ms: Option<i64>,
    /// Where the record came from.
    pub origin: Origin,
    /// Size of the raw record in bytes.
    pub payload_bytes: u64,
    /// The schema version tried, when the event got that far.
    pub schema_version: Option<String>,
    /// Each violation found (pointer, keyword, message), at most [`MAX_VIOLATIONS`].
    pub violations: Vec<Violation>,
    /// The redacted payload (`None` for records too large to keep).
    pub payload: Option<String>,
    /// Whether the record declared restricted data (routes it to the restricted lake prefix).
    pub restricted: bool,
}

impl DeadLetter {
    /// Builds the dead-letter record of an event that arrived behind its source's watermark.
    pub fn late(
        event: &Event,
        watermark_ms: u64,
        origin: Origin,
        payload_bytes: u64,
        payload: Option<String>,
    ) -> DeadLetter {
        DeadLetter {
            kind: FailureKind::Late,
            reason: format!(
                "event time {} is behind the watermark {}",
                format_rfc3339_ms(event.event_time_ms),
                format_rfc3339_ms(watermark_ms as i64)
            ),
            event_name: Some(event.event_name.as_str().to_owned()),
            event_time_ms: Some(event.event_time_ms),
            origin,
            payload_bytes,
            schema_version: None,
            violations: Vec::new(),
            payload,
            restricted: event.is_restricted(),
        }
    }
}

impl Event {
    /// Whether the event goes to the restricted route (see [`is_restricted`]).
    #[inline]
    pub fn is_restricted(&self) -> bool {
        is_restricted(self.data_sensitivity, self.pii_classification)
    }
}

/// Whether a record that declares `sensitivity` and `classification` is restricted: it
/// declares `data_sensitivity: restricted` or `pii_classification: high`. Restricted events,
/// and the dead letters of restricted records, are aggregated and stored apart (the restricted
/// lake prefix, 30-day retention). The one statement of the rule.
#[inline]
pub fn is_restricted(sensitivity: DataSensitivity, classification: PiiClassification) -> bool {
    sensitivity == DataSensitivity::Restricted || classification == PiiClassification::High
}
