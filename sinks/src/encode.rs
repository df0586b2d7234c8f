//! Rows → Arrow → Parquet bytes.

use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::Result;

/// A row type of one output table: its name, Arrow schema and columnar encoding.
pub trait Table: Sized + Clone + PartialOrd + 'static {
    /// The table's name: the first path segment under the lake root.
    const NAME: &'static str;

    /// The Arrow schema of the table.
    fn schema() -> SchemaRef;

    /// Whether the table holds per-record data (kept for the raw retention period) rather
    /// than aggregates.
    const RAW: bool = false;

    /// Encodes rows as one record batch of [`Table::schema`].
    fn to_batch(rows: &[Self]) -> Result<RecordBatch>;

    /// Combines the rows of one window gathered from every worker before they are written
    /// (default: as they are). Tables whose rows are per-window totals merge partial rows here.
    fn combine(rows: Vec<Self>) -> Vec<Self> {
        rows
    }
}

/// Encodes rows as one Parquet file (Snappy-compressed, one row group), with `metadata` as the
/// file's key-value metadata.
pub fn parquet_encode<T: Table>(rows: &[T], metadata: &[(&str, String)]) -> Result<Bytes> {
    let batch = T::to_batch(rows)?;
    let metadata = metadata
        .iter()
        .map(|(k, v)| KeyValue::new((*k).to_owned(), v.clone()))
        .collect();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by(format!("sightline {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(metadata))
        .build();
    let mut buffer = Vec::with_capacity(4096 + rows.len() * 64);
    let mut writer = ArrowWriter::try_new(&mut buffer, Arc::clone(&batch.schema()), Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(Bytes::from(buffer))
}
