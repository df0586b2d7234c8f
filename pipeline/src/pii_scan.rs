//! `sightline pii-scan`: audits stored output for personal data.
//!
//! Every string cell of every Parquet file under a lake, or every record of a Kafka topic (the
//! dead-letter topic), is run through the same patterns the scrubber removes: e-mail
//! addresses, IP addresses, phone numbers, bearer tokens, API keys and other secrets, and
//! coordinate pairs. Anything found is a privacy defect: the pipeline is meant to have removed
//! it before storing.

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use sightline_privacy::{Finding, Scrubber};
use sightline_sinks::{Lake, S3Options};

use crate::config::KafkaConfig;

/// What a scan looked at and found.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// What was scanned.
    pub target: String,
    /// Files or topic partitions read.
    pub sources: u64,
    /// String values (cells or records) checked.
    pub values: u64,
    /// Each finding, with where it was (`file:column` or `topic/partition/offset`).
    pub findings: Vec<(String, Finding)>,
}

impl fmt::Display for ScanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (at, finding) in self.findings.iter().take(50) {
            // The report is itself output: show the kind and a masked excerpt, not the value.
            let masked: String = finding.text.chars().take(2).chain("***".chars()).collect();
            writeln!(
                f,
                "FOUND {} at {at}: {masked} ({} characters)",
                finding.kind,
                finding.text.chars().count()
            )?;
        }
        write!(
            f,
            "pii-scan {}: {} sources, {} values, {} findings",
            self.target,
            self.sources,
            self.values,
            self.findings.len()
        )
    }
}

/// `text` with every UUID-shaped token (`8-4-4-4-12` hex digits) masked. Event ids,
/// correlation ids and recommendation ids are UUIDs: none can hold personal data, but an
/// all-decimal stretch of one reads like a phone number to the patterns.
pub fn without_uuids(text: &str) -> std::borrow::Cow<'_, str> {
    const SHAPE: &[u8; 36] = b"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx";
    let bytes = text.as_bytes();
    let is_uuid_at = |i: usize| {
        bytes.get(i..i + 36).is_some_and(|w| {
            w.iter().zip(SHAPE).all(|(&b, &s)| {
                if s == b'-' {
                    b == b'-'
                } else {
                    b.is_ascii_hexdigit()
                }
            })
        }) && !bytes
            .get(i.wrapping_sub(1))
            .is_some_and(|b| b.is_ascii_alphanumeric())
            && !bytes.get(i + 36).is_some_and(|b| b.is_ascii_alphanumeric())
    };
    if !(0..bytes.len()).any(is_uuid_at) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        if is_uuid_at(i) {
            out.push_str("[uuid]");
            i += 36;
        } else {
            let ch = text[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Scans every Parquet file under `location` (a directory, `file://`, or `s3://`).
pub fn scan_lake(location: &str, s3: &S3Options) -> anyhow::Result<ScanReport> {
    let lake = Lake::open_with(location, s3).with_context(|| format!("opening {location}"))?;
    let scrubber = Scrubber::new();
    let mut report = ScanReport {
        target: location.to_owned(),
        ..ScanReport::default()
    };
    for path in lake
        .list("")?
        .into_iter()
        .filter(|p| p.ends_with(".parquet"))
    {
        report.sources += 1;
        for (column, value) in lake
            .string_cells(&path)
            .with_context(|| format!("reading {path}"))?
        {
            report.values += 1;
            report.findings.extend(
                scrubber
                    .scan(&without_uuids(&value))
                    .into_iter()
                    .map(|f| (format!("{path}:{column}"), f)),
            );
        }
    }
    Ok(report)
}

/// The text of a topic's record that can hold personal data: the keys and string values of a
/// JSON record (as the lake's scan reads string cells), or the whole text when it is not JSON.
/// Numbers are the pipeline's measures: a float such as `0.9495168055` is not a phone number.
fn record_strings(text: &str) -> Vec<String> {
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    out.push(k.clone());
                    walk(v, out);
                }
            }
            _ => {}
        }
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(value) => {
            let mut out = Vec::new();
            walk(&value, &mut out);
            out
        }
        Err(_) => vec![text.to_owned()],
    }
}

/// Scans every record of `topic`, from the start of each partition to its current end.
pub fn scan_topic(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<ScanReport> {
    let consumer: BaseConsumer = kafka
        .client_config(&[
            ("group.id", "sightline-pii-scan"),
            ("enable.auto.commit", "false"),
        ])
        .create()
        .context("creating the scan consumer")?;
    let timeout = Duration::from_millis(kafka.metadata_timeout_ms.max(1000));
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .context("fetching topic metadata")?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        anyhow::bail!("topic {topic} does not exist or has no partitions");
    }
    let scrubber = Scrubber::new();
    let mut report = ScanReport {
        target: format!("topic {topic}"),
        ..ScanReport::default()
    };
    for partition in partitions {
        report.sources += 1;
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .context("fetching partition ends")?;
        if high <= low {
            continue;
        }
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(low))?;
        consumer.assign(&assignment)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut next = low;
        while next < high {
            if std::time::Instant::now() > deadline {
                anyhow::bail!("timed out reading {topic}/{partition} at offset {next} of {high}");
            }
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message.context("reading the topic")?;
            next = message.offset() + 1;
            let text = String::from_utf8_lossy(message.payload().unwrap_or_default());
            report.values += 1;
            let at = format!("{topic}/{partition}/{}", message.offset());
            for value in record_strings(&text) {
                report.findings.extend(
                    scrubber
                        .scan(&without_uuids(&value))
                        .into_iter()
                        .map(|f| (at.clone(), f)),
                );
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sightline_sinks::tables::QualityRow;

    #[test]
    fn a_topic_record_is_scanned_in_its_strings_not_its_numbers() {
        let scrubber = Scrubber::new();
        let record = r#"{"estimate":0.9495168055,"nested":[{"note":"call 555-123-4567"}]}"#;
        assert!(
            !scrubber.scan(record).is_empty(),
            "the raw text reads as phones"
        );
        let found: Vec<_> = record_strings(record)
            .iter()
            .flat_map(|v| scrubber.scan(v))
            .collect();
        assert_eq!(found.len(), 1, "only the note's phone: {found:?}");
        assert_eq!(
            record_strings("not json 555-123-4567"),
            vec!["not json 555-123-4567"]
        );
    }

    #[test]
    fn uuids_are_not_phone_numbers() {
        let scrubber = Scrubber::new();
        let id = "67123456-7890-4123-8456-789012345678";
        assert!(
            !scrubber.scan(id).is_empty(),
            "the patterns see a phone in it"
        );
        assert!(scrubber.scan(&without_uuids(id)).is_empty());
        let json = format!(r#"{{"correlation_id":"{id}","note":"call 555-123-4567"}}"#);
        let masked = without_uuids(&json);
        assert!(masked.contains("[uuid]"));
        assert_eq!(
            scrubber.scan(&masked).len(),
            1,
            "the real phone number is still found"
        );
        assert_eq!(without_uuids("no ids here"), "no ids here");
    }

    #[test]
    fn finds_what_it_is_meant_to_find_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let location = dir.path().to_str().unwrap();
        let lake = Lake::open(location).unwrap();
        let row = |name: &str| QualityRow {
            window_start_ms: 0,
            window_end_ms: 1000,
            event_name: name.into(),
            outcome: "accepted".into(),
            count: 1,
            weighted_count: 1.0,
        };
        lake.write_window(
            0,
            1000,
            &[
                row("project_viewed"),
                row("k1.700.0a1b2c3d4e5f60718293a4b5"),
            ],
        )
        .unwrap();
        assert!(
            scan_lake(location, &S3Options::default())
                .unwrap()
                .findings
                .is_empty()
        );
        lake.routed("restricted", "restricted", 30)
            .write_window(0, 1000, &[row("mail jane@example.com from 10.0.0.7")])
            .unwrap();
        let report = scan_lake(location, &S3Options::default()).unwrap();
        let kinds: Vec<&str> = report.findings.iter().map(|(_, f)| f.kind).collect();
        assert_eq!(kinds, ["email", "ip"], "{report}");
        assert!(
            report.findings[0].0.starts_with("restricted/quality/"),
            "{report}"
        );
    }
}
