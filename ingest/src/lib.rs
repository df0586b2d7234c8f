//! Sightline's ingest: from raw records to validated, privacy-safe events, in a timely source.
//!
//! - [`source`]: the [`source::RecordReader`]s (Kafka, NDJSON) with one serializable
//!   [`source::PartitionState`] per partition, the per-partition [`source::watermark`], and
//!   [`source::ingest`], the source operator that decodes, watermarks and emits every record
//!   exactly once, as an event or a dead letter;
//! - the [`Decoder`]: one record in, a validated and pseudonymized
//!   [`Event`](sightline_schemas::Event) or a [`DecodeError`] that says what failed and where
//!   (JSON pointer and schema keyword) out. It reads the envelope in one pass
//!   (`wire`, a hand-written serde visitor), checks `properties` against the event's schema
//!   with the streaming [`validate`]or in the same pass, and applies `sightline-privacy`;
//! - [`memo`]: the decoder's bounded memo tables.
//!
//! ```
//! use std::sync::Arc;
//! use sightline_ingest::Decoder;
//! use sightline_privacy::KeyRing;
//! use sightline_schemas::FailureKind;
//!
//! // In production the key comes from the configuration or a key file.
//! let key = KeyRing::from_hex("k1", &"0f".repeat(32), 30).unwrap();
//! let mut decoder = Decoder::new(1 << 20, Arc::new(key));
//! let line = br#"{"event_id":"4b0e9a44-8f47-4d43-9a5e-0c1f6a9a1f00","event_name":"project_viewed",
//!   "event_type":"view","timestamp":"2026-01-23T14:30:00Z","source":"client","platform":"web",
//!   "app_version":"4.2.0","tenant_id":"t_9f2c","user_id":"u_71aa","session_id":"s_1",
//!   "feature_area":"projects","pii_classification":"none","data_sensitivity":"internal",
//!   "properties":{"prepopulated":true,"time_to_first_paint_ms":412.5}}"#;
//! let event = decoder.decode(line).unwrap();
//! assert_eq!(event.event_name.as_str(), "project_viewed");
//! assert_eq!(event.latency_us, Some(412_500));
//! assert!(event.user_id.starts_with("k1."), "stored as a pseudonym");
//!
//! let err = decoder.decode(b"{\"event_id\":").unwrap_err();
//! assert_eq!(err.kind, FailureKind::Truncated);
//! ```

mod decode;
pub mod memo;
pub mod source;
pub mod validate;
mod wire;

pub use decode::{
    DEFAULT_MAX_EVENT_BYTES, DecodeError, Decoder, ENVELOPE_PRIVACY, FlatDefaults, Format,
    LinkFields,
};

/// Errors of the readers. Each says whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input could not be opened or read.
    #[error("{action} {input}")]
    Io {
        /// What was being done (`opening`, `reading`).
        action: &'static str,
        /// The input (`file:<path>`, `stdin`).
        input: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The Kafka client failed.
    #[error("{action}")]
    Kafka {
        /// What was being done (`creating the Kafka consumer`, …).
        action: &'static str,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// A committed offset's checkpoint cannot be used.
    #[error("resuming {topic}[{partition}]")]
    Checkpoint {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// What is wrong with it.
        #[source]
        source: source::checkpoint::CheckpointError,
    },
    /// A configured topic does not exist (or has no partitions), or the brokers could not be
    /// asked (unreachable, a TLS or SASL failure): `last_error` says which.
    #[error("topic `{topic}` not found on {servers} within {timeout_ms} ms{}", last_error.as_deref().map(|e| format!(" (the brokers could not be asked: {e}; check kafka.bootstrap-servers and the TLS/SASL settings in kafka.options)")).unwrap_or_default())]
    TopicNotFound {
        /// The topic.
        topic: String,
        /// The brokers asked.
        servers: String,
        /// How long they were asked.
        timeout_ms: u64,
        /// The last error of asking them, if the last attempt failed.
        last_error: Option<String>,
    },
}

impl Error {
    /// Whether the same call may succeed if retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { source, .. } => source.kind() == std::io::ErrorKind::Interrupted,
            Error::Kafka { .. } => true,
            Error::TopicNotFound { .. } | Error::Checkpoint { .. } => false,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
