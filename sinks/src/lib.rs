//! Sightline's sinks.
//!
//! Delivery is written once: [`durable_sink`] is the one timely operator every output goes
//! through (exchange, order, retries, held capability, durability frontier; its contract is in
//! [`durable`]). A sink only says what to deliver and how, as a [`Deliver`] implementation:
//!
//! - [`TableSink`] (and [`write_windows`]): one Parquet file per closed window of a table, in
//!   the [`Lake`];
//! - [`kafka::TopicSink`]: keyed records of any serializable type on a Kafka topic.
//!
//! Encoding is separate from transport:
//!
//! - [`tables`] turns closed windows into typed rows, one row type per output table, and each
//!   row type into Arrow record batches ([`Table`]);
//! - [`parquet_encode`] turns record batches into Parquet bytes;
//! - [`Lake`] writes bytes to object storage (local filesystem, memory, the S3 API with the
//!   `s3` feature, or any `object_store` backend) under Hive-style paths with deterministic names.
//!
//! ```
//! use sightline_sinks::{Lake, tables::EventCountRow, Table};
//!
//! let lake = Lake::open("memory://").unwrap();
//! let rows = vec![EventCountRow {
//!     window_start_ms: 1_769_178_600_000, window_end_ms: 1_769_178_660_000,
//!     event_name: "project_viewed".into(), event_type: "view".into(),
//!     feature_area: "projects".into(), count: 3, weighted_count: 3.0,
//! }];
//! let written = lake.write_window::<EventCountRow>(1_769_178_600_000, 1_769_178_660_000, &rows).unwrap();
//! assert_eq!(written.path, "event_counts/dt=2026-01-23/hr=14/part-20260123T143000Z-20260123T143100Z.parquet");
//! assert_eq!(lake.read_rows(&written.path).unwrap(), 1);
//! ```

pub mod board;
pub mod durable;
mod encode;
pub mod experiments;
pub mod kafka;
mod lake;
mod lake_sink;
pub mod product;
pub mod remote_write;
pub mod sampling;
pub mod state;
pub mod tables;
pub mod timing;

pub use durable::{Deliver, RetryPolicy, SinkHealth, durable_sink};
pub use encode::{Table, parquet_encode};
pub use lake::{Lake, Retention, S3Options, window_part_path, window_path};
pub use lake_sink::{TableSink, WindowRows, WrittenWindow, write_windows, write_windows_to};

/// Errors of the sinks. Each says whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building the Arrow batch failed (a bug: the row types define their own schema).
    #[error("building the Arrow batch failed")]
    Arrow(#[from] arrow_schema::ArrowError),
    /// Encoding or reading Parquet failed.
    #[error("parquet encoding failed")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// The object store refused or failed a request.
    #[error("object store request failed")]
    Store(#[from] object_store::Error),
    /// The lake URL is not one this build supports.
    #[error(
        "unsupported lake location `{0}` (use a path, file://, s3://bucket/prefix, or memory://)"
    )]
    Location(String),
    /// Local I/O failed (creating directories, starting the I/O runtime).
    #[error("local I/O failed")]
    Io(#[from] std::io::Error),
    /// The Kafka client failed (creating the producer, producing, flushing).
    #[error("kafka request failed")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The broker did not acknowledge every record of a delivery.
    #[error("{failed} of {total} records were not delivered (last error: {last_error})")]
    Undelivered {
        /// Records whose delivery report was a failure.
        failed: u64,
        /// Records in the delivery.
        total: u64,
        /// The last failure reported.
        last_error: String,
    },
    /// A value could not be encoded (a bug: our record types always serialize).
    #[error("encoding a record failed: {0}")]
    Encode(String),
}

impl Error {
    /// Whether the same request may succeed if retried.
    ///
    /// A store that does not know the bucket or refuses the credentials will not heal by
    /// itself; anything else the store, the disk or the broker says may (a full disk can be
    /// freed, a broker comes back).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Store(
                object_store::Error::NotFound { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. },
            ) => false,
            Error::Store(_) | Error::Io(_) | Error::Kafka(_) | Error::Undelivered { .. } => true,
            _ => false,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
