//! The lake: Parquet files on object storage under Hive-style, deterministic paths.

use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutOptions, PutPayload, TagSet};
use sightline_schemas::utc_date_hour;

use crate::{Error, Result, Table, WrittenWindow, parquet_encode};

/// Where a window's file lives, relative to the lake root:
/// `<table>/dt=YYYY-MM-DD/hr=HH/part-<start>-<end>.parquet`, with `dt` and `hr` taken from the
/// window start (UTC). The name depends only on the table and the window, so a rewrite of the
/// same window replaces its file.
pub fn window_path(table: &str, window_start_ms: u64, window_end_ms: u64) -> String {
    window_part_path(table, window_start_ms, window_end_ms, None)
}

/// [`window_path`] of one part of a window, when a table writes a window in several files
/// (the `funnels` table: one per funnel, as each funnel's window closes at its own horizon):
/// `…/part-<start>-<end>-<part>.parquet`.
pub fn window_part_path(
    table: &str,
    window_start_ms: u64,
    window_end_ms: u64,
    part: Option<&str>,
) -> String {
    let (y, m, d, h) = utc_date_hour(window_start_ms as i64);
    let suffix = part.map(|p| format!("-{p}")).unwrap_or_default();
    format!(
        "{table}/dt={y:04}-{m:02}-{d:02}/hr={h:02}/part-{}-{}{suffix}.parquet",
        compact_utc(window_start_ms),
        compact_utc(window_end_ms)
    )
}

fn compact_utc(ms: u64) -> String {
    let iso = sightline_schemas::format_rfc3339_ms(ms as i64);
    // 2026-01-23T14:30:00.000Z → 20260123T143000Z (plus milliseconds when they are not zero).
    let (date_time, millis) = iso.split_at(19);
    let mut out: String = date_time
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    if &millis[1..4] != "000" {
        out.push_str(&millis[1..4]);
    }
    out.push('Z');
    out
}

/// Settings of the S3 API backend (AWS S3, MinIO, Ceph RGW, moto). Unset fields fall back to
/// the standard `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_REGION`, `AWS_ENDPOINT`, …).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct S3Options {
    /// Endpoint URL, for S3-compatible services (`http://127.0.0.1:9000`).
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`).
    pub region: Option<String>,
    /// Allow plain HTTP to the endpoint (local services only).
    pub allow_http: bool,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
}

#[cfg(feature = "s3")]
fn open_s3(location: &str, rest: &str, s3: &S3Options) -> Result<Arc<dyn ObjectStore>> {
    use object_store::aws::AmazonS3Builder;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::Location(location.to_owned()));
    }
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_allow_http(s3.allow_http);
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(region) = &s3.region {
        builder = builder.with_region(region);
    }
    if let Some(key) = &s3.access_key_id {
        builder = builder.with_access_key_id(key);
    }
    if let Some(secret) = &s3.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    let store: Arc<dyn ObjectStore> = Arc::new(builder.build()?);
    let prefix = prefix.trim_matches('/');
    Ok(if prefix.is_empty() {
        store
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
    })
}

#[cfg(not(feature = "s3"))]
fn open_s3(location: &str, _rest: &str, _s3: &S3Options) -> Result<Arc<dyn ObjectStore>> {
    Err(Error::Location(format!(
        "{location} (this build has no S3 support: enable the `s3` feature)"
    )))
}

/// How long files are kept, in days, by kind of data. Written into every file's Parquet
/// metadata (`sightline.retention_days`) and, on S3, as the object tag `retention-days`, for
/// lifecycle rules to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Aggregate tables (platform spec: 12 months).
    pub aggregates_days: u32,
    /// Per-record tables such as `dead_letter` (platform spec: 90 days raw).
    pub raw_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            aggregates_days: 365,
            raw_days: 90,
        }
    }
}

/// A handle on the lake: an object store plus a blocking I/O runtime. Cheap to clone.
///
/// A lake may be *routed* under a prefix ([`Lake::routed`]): the restricted route writes the
/// same tables under `restricted/` with its own retention.
#[derive(Clone, Debug)]
pub struct Lake {
    store: Arc<dyn ObjectStore>,
    location: String,
    runtime: Arc<tokio::runtime::Runtime>,
    prefix: String,
    route: String,
    retention: Retention,
}

impl Lake {
    /// Opens a lake at `location`: `memory://` (an in-process store, for tests), `file:///abs/dir`,
    /// a plain directory path (created if missing), or `s3://bucket/prefix` configured from the
    /// `AWS_*` environment.
    pub fn open(location: &str) -> Result<Lake> {
        Lake::open_with(location, &S3Options::default())
    }

    /// [`Lake::open`], with explicit settings for `s3://` locations.
    pub fn open_with(location: &str, s3: &S3Options) -> Result<Lake> {
        let store: Arc<dyn ObjectStore> = if location == "memory://" || location == "memory:" {
            Arc::new(InMemory::new())
        } else if let Some(rest) = location.strip_prefix("s3://") {
            open_s3(location, rest, s3)?
        } else if let Some(dir) = location
            .strip_prefix("file://")
            .or_else(|| (!location.contains("://")).then_some(location))
        {
            std::fs::create_dir_all(dir)?;
            Arc::new(LocalFileSystem::new_with_prefix(dir)?)
        } else {
            return Err(Error::Location(location.to_owned()));
        };
        Lake::from_store(store, location)
    }

    /// Wraps an existing object store (any `object_store` backend).
    pub fn from_store(store: Arc<dyn ObjectStore>, location: &str) -> Result<Lake> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Lake {
            store,
            location: location.to_owned(),
            runtime: Arc::new(runtime),
            prefix: String::new(),
            route: "standard".into(),
            retention: Retention::default(),
        })
    }

    /// The same lake with retention `retention` for the standard route.
    pub fn with_retention(mut self, retention: Retention) -> Lake {
        self.retention = retention;
        self
    }

    /// The same store, writing under `<prefix>/` as route `route`, every table kept for
    /// `retention_days`.
    pub fn routed(&self, route: &str, prefix: &str, retention_days: u32) -> Lake {
        let prefix = prefix.trim_matches('/');
        Lake {
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            route: route.to_owned(),
            retention: Retention {
                aggregates_days: retention_days,
                raw_days: retention_days,
            },
            ..self.clone()
        }
    }

    /// The route name (`standard`, `restricted`).
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The location the lake was opened at.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Encodes `rows` as Parquet and writes them as the file of window `[start, end)` of table
    /// `T`, replacing any earlier file of the same window. Blocks until the store has the file.
    pub fn write_window<T: Table>(
        &self,
        window_start_ms: u64,
        window_end_ms: u64,
        rows: &[T],
    ) -> Result<WrittenWindow> {
        self.write_window_part(window_start_ms, window_end_ms, None, rows)
    }

    /// Writes one part of a window of table `T` ([`window_part_path`]).
    pub fn write_window_part<T: Table>(
        &self,
        window_start_ms: u64,
        window_end_ms: u64,
        part: Option<&str>,
        rows: &[T],
    ) -> Result<WrittenWindow> {
        let days = if T::RAW {
            self.retention.raw_days
        } else {
            self.retention.aggregates_days
        };
        let bytes = parquet_encode(
            rows,
            &[
                ("sightline.retention_days", days.to_string()),
                ("sightline.route", self.route.clone()),
            ],
        )?;
        let path = format!(
            "{}{}",
            self.prefix,
            window_part_path(T::NAME, window_start_ms, window_end_ms, part)
        );
        let size = bytes.len() as u64;
        let mut tags = TagSet::default();
        tags.push("retention-days", &days.to_string());
        tags.push("route", &self.route);
        let location = Path::from(path.as_str());
        self.runtime.block_on(self.store.put_opts(
            &location,
            PutPayload::from(bytes),
            PutOptions::from(tags),
        ))?;
        Ok(WrittenWindow {
            table: T::NAME.to_owned(),
            window_start_ms,
            window_end_ms,
            rows: rows.len() as u64,
            bytes: size,
            path,
        })
    }

    /// Writes `bytes` at `path` (relative to the lake root), atomically.
    pub fn put(&self, path: &str, bytes: Bytes) -> Result<()> {
        let location = Path::from(path);
        self.runtime
            .block_on(self.store.put(&location, PutPayload::from(bytes)))?;
        Ok(())
    }

    /// Writes every object at once (concurrently), each atomically; an error means some may
    /// not be written.
    pub fn put_all(&self, objects: Vec<(String, Bytes)>) -> Result<()> {
        self.runtime.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for (path, bytes) in objects {
                let store = Arc::clone(&self.store);
                tasks.spawn(
                    async move { store.put(&Path::from(path), PutPayload::from(bytes)).await },
                );
            }
            while let Some(done) = tasks.join_next().await {
                done.map_err(std::io::Error::other)??;
            }
            Ok(())
        })
    }

    /// Deletes the object at `path`; one that is not there is not an error.
    pub fn delete(&self, path: &str) -> Result<()> {
        let location = Path::from(path);
        match self.runtime.block_on(self.store.delete(&location)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the object at `path`, if there is one.
    pub fn get_if_exists(&self, path: &str) -> Result<Option<Bytes>> {
        match self.get(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(Error::Store(object_store::Error::NotFound { .. })) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Reads the object at `path`.
    pub fn get(&self, path: &str) -> Result<Bytes> {
        let location = Path::from(path);
        Ok(self
            .runtime
            .block_on(async { self.store.get(&location).await?.bytes().await })?)
    }

    /// Lists every object under `prefix` (relative to the lake root), sorted.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = Path::from(prefix);
        let mut paths = Vec::new();
        self.runtime.block_on(async {
            use futures_util::StreamExt;
            let mut stream = self.store.list(Some(&prefix));
            while let Some(meta) = stream.next().await {
                paths.push(meta?.location.to_string());
            }
            Ok::<_, Error>(())
        })?;
        paths.sort();
        Ok(paths)
    }

    /// Every non-null string cell of the Parquet file at `path`, as (column, value).
    pub fn string_cells(&self, path: &str) -> Result<Vec<(String, String)>> {
        use arrow_array::Array;
        let bytes = self.get(path)?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?
            .build()?;
        let mut cells = Vec::new();
        for batch in reader {
            let batch = batch?;
            for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
                if let Some(strings) = column.as_any().downcast_ref::<arrow_array::StringArray>() {
                    cells.extend(
                        strings
                            .iter()
                            .flatten()
                            .map(|v| (field.name().clone(), v.to_owned())),
                    );
                }
            }
        }
        Ok(cells)
    }

    /// Reads the Parquet file at `path` and returns its number of rows (a real Parquet reader:
    /// used by tests and by the doc example).
    pub fn read_rows(&self, path: &str) -> Result<usize> {
        let bytes = self.get(path)?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?
            .build()?;
        let mut rows = 0;
        for batch in reader {
            rows += batch?.num_rows();
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_hive_style_and_deterministic() {
        assert_eq!(
            window_path("latency", 1_769_178_600_000, 1_769_178_660_000),
            "latency/dt=2026-01-23/hr=14/part-20260123T143000Z-20260123T143100Z.parquet"
        );
        assert_eq!(
            window_path("quality", 1_500, 2_500),
            "quality/dt=1970-01-01/hr=00/part-19700101T000001500Z-19700101T000002500Z.parquet"
        );
    }
}
