//! The envelope reader: one pass over a canonical record that reads the envelope fields and,
//! when it can, validates `properties` on the way.
//!
//! The reader is a hand-written serde visitor. A derived one would have to keep `properties` as
//! a raw slice and validate it in a second pass over the same bytes; this one already knows the
//! event's schema when it reaches `properties` after `event_name` (the usual order), and hands
//! the deserializer to the streaming validator ([`crate::validate`]). The schema is the one of
//! the `schema_version` read so far, or the newest; the decoder reads the record again if a
//! later `schema_version` names another. When `properties` comes before `event_name` the reader
//! keeps the raw slice and the decoder validates it afterwards. Field order never changes the
//! outcome, only the speed.
//!
//! It behaves like `#[derive(Deserialize)]` with `deny_unknown_fields`: the same
//! `unknown field`, `missing field` and `duplicate field` errors, which
//! [`crate::DecodeError`] classifies by their words.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::validate::{Checked, PropertiesSeed};
use sightline_privacy::Scrubber;
use sightline_schemas::Text;
use sightline_schemas::registry::{EventSchema, Registry};
use sightline_schemas::{DataSensitivity, EventType, PiiClassification, Platform, Source};

/// The envelope as it appears on the wire, borrowed from the record. The optional fields that
/// only need their type checked are read and not kept.
pub(crate) struct WireEnvelope<'a> {
    pub event_id: Cow<'a, str>,
    pub event_name: Cow<'a, str>,
    pub event_type: EventType,
    pub timestamp: Cow<'a, str>,
    pub source: Source,
    pub platform: Platform,
    pub app_version: Cow<'a, str>,
    pub tenant_id: Cow<'a, str>,
    pub user_id: Cow<'a, str>,
    pub session_id: Cow<'a, str>,
    pub feature_area: Cow<'a, str>,
    pub pii_classification: PiiClassification,
    pub data_sensitivity: DataSensitivity,
    pub workflow_name: Option<Cow<'a, str>>,
    pub surface: Option<Cow<'a, str>>,
    /// Type-checked by the decoder, through a memo: assignments repeat.
    pub experiment_assignments: Option<&'a RawValue>,
    pub properties: Properties<'a>,
    pub user_role: Option<Cow<'a, str>>,
    pub country: Option<Cow<'a, str>>,
    pub region: bool,
    pub schema_version: Option<Cow<'a, str>>,
    pub geo_consent: Option<bool>,
    /// The rate the emitter kept the event at (envelope 1.1.0), unchecked: the decoder checks
    /// its range.
    pub sample_rate: Option<f64>,
}

/// What the reader did with `properties`.
pub(crate) enum Properties<'a> {
    /// Absent or `null`: validated as an empty object.
    Absent,
    /// Kept as it arrived, to be validated once the schema is known.
    Raw(&'a RawValue),
    /// Validated while it was read, against this schema (chosen from the `event_name` and
    /// `schema_version` read before it).
    Checked(Checked<'a>, &'static EventSchema),
}

/// How [`read`] treats `properties`.
#[derive(Clone, Copy)]
pub(crate) enum Mode<'r> {
    /// Keep it raw (the parse-only baseline, and the re-read when a late `schema_version`
    /// chose another schema).
    Raw,
    /// Validate it in the same pass when its schema is known by then.
    Validate(&'r Scrubber),
}

/// Every field, in the order serde's messages list them.
pub(crate) const FIELDS: &[&str] = &[
    "event_id",
    "event_name",
    "event_type",
    "timestamp",
    "source",
    "platform",
    "app_version",
    "tenant_id",
    "user_id",
    "session_id",
    "feature_area",
    "pii_classification",
    "data_sensitivity",
    "workflow_name",
    "surface",
    "experiment_assignments",
    "properties",
    "user_role",
    "auth_context",
    "is_internal",
    "request_id",
    "trace_id",
    "device_type",
    "browser_family",
    "os_family",
    "country",
    "region",
    "connection_type",
    "schema_version",
    "geo_consent",
    "sample_rate",
];

/// Reads one record's envelope from `text`, which must hold nothing else.
pub(crate) fn read<'a>(
    text: &'a str,
    mode: Mode<'_>,
) -> Result<WireEnvelope<'a>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let wire = de::Deserializer::deserialize_struct(
        &mut de,
        "WireEnvelope",
        FIELDS,
        EnvelopeVisitor { mode },
    )?;
    de.end()?;
    Ok(wire)
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum AuthContext {
    Sso,
    Scim,
    Passwordless,
    ApiToken,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum DeviceType {
    Desktop,
    Mobile,
    Tablet,
    Server,
}

struct EnvelopeVisitor<'r> {
    mode: Mode<'r>,
}

impl<'de> Visitor<'de> for EnvelopeVisitor<'_> {
    type Value = WireEnvelope<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "struct WireEnvelope")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WireEnvelope<'de>, A::Error> {
        // One slot per field; `Some` once the field has been read (an optional field that was
        // `null` is `Some(None)`), so a second occurrence is a duplicate.
        let (mut event_id, mut event_name, mut event_type, mut timestamp) = (
            None::<Text<'de>>,
            None::<Text<'de>>,
            None,
            None::<Text<'de>>,
        );
        let (mut source, mut platform, mut app_version) = (None, None, None::<Text<'de>>);
        let (mut tenant_id, mut user_id, mut session_id, mut feature_area) = (
            None::<Text<'de>>,
            None::<Text<'de>>,
            None::<Text<'de>>,
            None::<Text<'de>>,
        );
        let (mut pii_classification, mut data_sensitivity) = (None, None);
        let (mut workflow_name, mut surface, mut user_role) = (
            None::<Option<Text<'de>>>,
            None::<Option<Text<'de>>>,
            None::<Option<Text<'de>>>,
        );
        let (mut experiment_assignments, mut properties) =
            (None::<Option<&'de RawValue>>, None::<Properties<'de>>);
        let mut auth_context = None::<Option<AuthContext>>;
        let mut device_type = None::<Option<DeviceType>>;
        let (mut is_internal, mut geo_consent) = (None::<Option<bool>>, None::<Option<bool>>);
        // A number, never null (the schema's `type` is `number` alone).
        let mut sample_rate = None::<f64>;
        let (mut request_id, mut trace_id) = (None::<Option<Text<'de>>>, None::<Option<Text<'de>>>);
        let (mut browser_family, mut os_family, mut connection_type) = (
            None::<Option<Text<'de>>>,
            None::<Option<Text<'de>>>,
            None::<Option<Text<'de>>>,
        );
        let (mut country, mut region, mut schema_version) = (
            None::<Option<Text<'de>>>,
            None::<Option<Text<'de>>>,
            None::<Option<Text<'de>>>,
        );

        macro_rules! take {
            ($slot:ident) => {{
                if $slot.is_some() {
                    return Err(de::Error::duplicate_field(stringify!($slot)));
                }
                $slot = Some(map.next_value()?);
            }};
        }
        while let Some(Text(key)) = map.next_key()? {
            match &*key {
                "event_id" => take!(event_id),
                "event_name" => take!(event_name),
                "event_type" => take!(event_type),
                "timestamp" => take!(timestamp),
                "source" => take!(source),
                "platform" => take!(platform),
                "app_version" => take!(app_version),
                "tenant_id" => take!(tenant_id),
                "user_id" => take!(user_id),
                "session_id" => take!(session_id),
                "feature_area" => take!(feature_area),
                "pii_classification" => take!(pii_classification),
                "data_sensitivity" => take!(data_sensitivity),
                "workflow_name" => take!(workflow_name),
                "surface" => take!(surface),
                "experiment_assignments" => take!(experiment_assignments),
                "user_role" => take!(user_role),
                "auth_context" => take!(auth_context),
                "is_internal" => take!(is_internal),
                "request_id" => take!(request_id),
                "trace_id" => take!(trace_id),
                "device_type" => take!(device_type),
                "browser_family" => take!(browser_family),
                "os_family" => take!(os_family),
                "country" => take!(country),
                "region" => take!(region),
                "connection_type" => take!(connection_type),
                "schema_version" => take!(schema_version),
                "geo_consent" => take!(geo_consent),
                "sample_rate" => take!(sample_rate),
                "properties" => {
                    if properties.is_some() {
                        return Err(de::Error::duplicate_field("properties"));
                    }
                    let version = schema_version.as_ref().map(|v| v.as_ref().map(|t| &*t.0));
                    let known = event_name.as_ref().and_then(|name| {
                        Registry::embedded().schema_of(&name.0, version.flatten())
                    });
                    properties = Some(match (self.mode, known) {
                        (Mode::Validate(scrubber), Some(schema)) => {
                            let seed = PropertiesSeed {
                                rule: &schema.properties,
                                capture: crate::validate::Capture::of(schema),
                                scrubber,
                            };
                            map.next_value_seed(seed)?
                                .map_or(Properties::Absent, |checked| {
                                    Properties::Checked(checked, schema)
                                })
                        }
                        _ => map
                            .next_value::<Option<&RawValue>>()?
                            .map_or(Properties::Absent, Properties::Raw),
                    });
                }
                other => return Err(de::Error::unknown_field(other, FIELDS)),
            }
        }
        // Type-checked only.
        let _ = (
            auth_context,
            device_type,
            is_internal,
            request_id,
            trace_id,
            browser_family,
            os_family,
            connection_type,
        );

        fn need<T, E: de::Error>(slot: Option<T>, field: &'static str) -> Result<T, E> {
            slot.ok_or_else(|| E::missing_field(field))
        }
        Ok(WireEnvelope {
            event_id: need(event_id, "event_id")?.0,
            event_name: need(event_name, "event_name")?.0,
            event_type: need(event_type, "event_type")?,
            timestamp: need(timestamp, "timestamp")?.0,
            source: need(source, "source")?,
            platform: need(platform, "platform")?,
            app_version: need(app_version, "app_version")?.0,
            tenant_id: need(tenant_id, "tenant_id")?.0,
            user_id: need(user_id, "user_id")?.0,
            session_id: need(session_id, "session_id")?.0,
            feature_area: need(feature_area, "feature_area")?.0,
            pii_classification: need(pii_classification, "pii_classification")?,
            data_sensitivity: need(data_sensitivity, "data_sensitivity")?,
            workflow_name: workflow_name.flatten().map(|t| t.0),
            surface: surface.flatten().map(|t| t.0),
            experiment_assignments: experiment_assignments.flatten(),
            properties: properties.unwrap_or(Properties::Absent),
            user_role: user_role.flatten().map(|t| t.0),
            country: country.flatten().map(|t| t.0),
            region: region.flatten().is_some(),
            schema_version: schema_version.flatten().map(|t| t.0),
            geo_consent: geo_consent.flatten(),
            sample_rate,
        })
    }
}
