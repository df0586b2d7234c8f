//! The lake's conformance suite, run against every backend the sink supports: the in-memory
//! store, the local filesystem, and the S3 API (a real moto server). Each case writes real
//! Parquet and reads it back with the Parquet reader. The last case replays a generated file
//! into S3 through the configuration, as `sightline replay --out s3://…` does.

mod common;

use arrow_array::{Array, Int64Array, StringArray, TimestampMicrosecondArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sightline_integration_tests::parquet_text;
use sightline_schemas::{Origin, Violation};
use sightline_sinks::tables::{
    DeadLetterRecord, DeadLetterRow, EventCountRow, LatencyRow, LatencyStats, QualityRow,
    QualitySummaryRow, VariantLatencyRow,
};
use sightline_sinks::{Lake, Table};

const START: u64 = 1_769_178_600_000;
const END: u64 = 1_769_178_660_000;

/// Every backend, each with what keeps it alive (a temporary directory, a server).
fn backends() -> Vec<(Lake, Box<dyn std::any::Any>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let local = Lake::open(dir.path().to_str().expect("utf-8 path")).expect("local lake");
    let moto = sightline_integration_tests::servers::Moto::start();
    let s3 = moto.lake("conformance", "lake/prefix");
    vec![
        (Lake::open("memory://").expect("memory lake"), Box::new(())),
        (local, Box::new(dir)),
        (s3, Box::new(moto)),
    ]
}

fn counts(n: i64) -> Vec<EventCountRow> {
    (0..n)
        .map(|i| EventCountRow {
            window_start_ms: START,
            window_end_ms: END,
            event_name: format!("e{i}"),
            event_type: "view".into(),
            feature_area: "projects".into(),
            count: i + 1,
            weighted_count: (i + 1) as f64,
        })
        .collect()
}

fn read_batches(lake: &Lake, path: &str) -> Vec<arrow_array::RecordBatch> {
    let bytes = lake.get(path).expect("get");
    ParquetRecordBatchReaderBuilder::try_new(bytes)
        .expect("parquet")
        .build()
        .expect("reader")
        .map(|b| b.expect("batch"))
        .collect()
}

#[test]
fn writes_read_back_with_schema_and_values() {
    for (lake, _dir) in backends() {
        let written = lake.write_window(START, END, &counts(3)).expect("write");
        assert_eq!(written.rows, 3);
        assert_eq!(
            written.path,
            "event_counts/dt=2026-01-23/hr=14/part-20260123T143000Z-20260123T143100Z.parquet"
        );
        let batches = read_batches(&lake, &written.path);
        let batch = &batches[0];
        assert_eq!(
            batch.schema(),
            EventCountRow::schema(),
            "{}",
            lake.location()
        );
        let starts = batch
            .column(0)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .expect("timestamp column");
        assert_eq!(starts.value(0), START as i64 * 1000);
        assert_eq!(starts.timezone(), Some("UTC"));
        let names = batch
            .column(2)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("names");
        assert_eq!(names.value(2), "e2");
        let values = batch
            .column(5)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("counts");
        assert_eq!(values.iter().flatten().sum::<i64>(), 6);
    }
}

#[test]
fn a_rewrite_of_a_window_replaces_its_file() {
    for (lake, _dir) in backends() {
        lake.write_window(START, END, &counts(5))
            .expect("first write");
        let again = lake.write_window(START, END, &counts(2)).expect("rewrite");
        let files = lake.list("event_counts").expect("list");
        assert_eq!(files, vec![again.path.clone()], "{}", lake.location());
        assert_eq!(lake.read_rows(&again.path).expect("read"), 2);
    }
}

fn stats() -> LatencyStats {
    LatencyStats {
        count: 2,
        weighted_count: 2.0,
        mean_ms: 1.5,
        p50_ms: 1.25,
        p90_ms: 2.0,
        p95_ms: 2.5,
        p99_ms: 2.75,
        max_ms: 3.0,
    }
}

fn dead_letter_row() -> DeadLetterRow {
    DeadLetterRow {
        window_start_ms: START,
        window_end_ms: END,
        record: DeadLetterRecord {
            processor: sightline_sinks::tables::PROCESSOR.into(),
            kind: "late".into(),
            reason: "behind".into(),
            event_name: None,
            schema_version: Some("1.0.0".into()),
            violations: vec![Violation {
                pointer: "/properties/x".into(),
                keyword: "type".into(),
                message: "m".into(),
            }],
            event_time_ms: Some(START as i64 - 7),
            origin: Origin {
                topic: "t".into(),
                partition: 3,
                offset: 99,
            },
            payload_bytes: 870,
            payload: Some(r#"{"user_id":"k1.700.abc"}"#.into()),
            restricted: false,
        },
        copies: 1,
    }
}

/// Writes one row of table `T` and reads it back by column name.
fn round_trip<T: Table>(lake: &Lake, row: T) -> Vec<String> {
    let written = lake.write_window(START, END, &[row]).expect("write");
    let batches = read_batches(lake, &written.path);
    assert_eq!(
        batches[0].schema(),
        T::schema(),
        "{} on {}",
        T::NAME,
        lake.location()
    );
    let (rows, _) = parquet_text::read(lake.get(&written.path).expect("get"));
    assert_eq!(rows.len(), 1);
    rows[0].iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The window columns every table starts with, in µs.
fn window(rest: &[&str]) -> Vec<String> {
    let mut cells = vec![
        format!("window_start={}µs", START * 1000),
        format!("window_end={}µs", END * 1000),
    ];
    cells.extend(rest.iter().map(|c| c.to_string()));
    cells
}

#[test]
fn every_table_round_trips_value_by_value() {
    let latency_cells = [
        "count=2",
        "weighted_count=2.0",
        "mean_ms=1.5",
        "p50_ms=1.25",
        "p90_ms=2.0",
        "p95_ms=2.5",
        "p99_ms=2.75",
        "max_ms=3.0",
    ];
    for (lake, _dir) in backends() {
        let mut tables = Vec::new();
        let counts = EventCountRow {
            window_start_ms: START,
            window_end_ms: END,
            event_name: "project_viewed".into(),
            event_type: "view".into(),
            feature_area: "projects".into(),
            count: 7,
            weighted_count: 12.5,
        };
        assert_eq!(
            round_trip(&lake, counts),
            window(&[
                "event_name=\"project_viewed\"",
                "event_type=\"view\"",
                "feature_area=\"projects\"",
                "count=7",
                "weighted_count=12.5"
            ])
        );
        tables.push(EventCountRow::NAME);
        let latency = LatencyRow {
            window_start_ms: START,
            window_end_ms: END,
            event_name: "a".into(),
            feature_area: "b".into(),
            surface: "c".into(),
            stats: stats(),
        };
        let mut want = vec!["event_name=\"a\"", "feature_area=\"b\"", "surface=\"c\""];
        want.extend(latency_cells);
        assert_eq!(round_trip(&lake, latency), window(&want));
        tables.push(LatencyRow::NAME);
        let variants = VariantLatencyRow {
            window_start_ms: START,
            window_end_ms: END,
            event_name: "a".into(),
            experiment_id: "x".into(),
            variant: "control".into(),
            stats: stats(),
        };
        let mut want = vec![
            "event_name=\"a\"",
            "experiment_id=\"x\"",
            "variant=\"control\"",
        ];
        want.extend(latency_cells);
        assert_eq!(round_trip(&lake, variants), window(&want));
        tables.push(VariantLatencyRow::NAME);
        let quality = QualityRow {
            window_start_ms: START,
            window_end_ms: END,
            event_name: "unknown".into(),
            outcome: "truncated".into(),
            count: 4,
            weighted_count: 4.0,
        };
        assert_eq!(
            round_trip(&lake, quality),
            window(&[
                "event_name=\"unknown\"",
                "outcome=\"truncated\"",
                "count=4",
                "weighted_count=4.0"
            ])
        );
        tables.push(QualityRow::NAME);
        let summary = QualitySummaryRow {
            window_start_ms: START,
            window_end_ms: END,
            accepted: 990,
            weighted_accepted: 1980.5,
            rejected: 10,
            late: 3,
            pii_violations: 2,
            rejection_rate: 0.01,
            pii_violation_rate: 0.002,
            meets_rejection_target: false,
            meets_pii_target: true,
        };
        assert_eq!(
            round_trip(&lake, summary),
            window(&[
                "accepted=990",
                "weighted_accepted=1980.5",
                "rejected=10",
                "late=3",
                "pii_violations=2",
                "rejection_rate=0.01",
                "pii_violation_rate=0.002",
                "meets_rejection_target=false",
                "meets_pii_target=true",
            ])
        );
        tables.push(QualitySummaryRow::NAME);
        assert_eq!(
            round_trip(&lake, dead_letter_row()),
            window(&[
                &format!("processor={:?}", sightline_sinks::tables::PROCESSOR),
                "kind=\"late\"",
                "reason=\"behind\"",
                "event_name=∅",
                "schema_version=\"1.0.0\"",
                r#"violations="[{\"pointer\":\"/properties/x\",\"keyword\":\"type\",\"message\":\"m\"}]""#,
                &format!("event_time={}µs", (START - 7) * 1000),
                "topic=\"t\"",
                "partition=3",
                "offset=99",
                "payload_bytes=870",
                r#"payload="{\"user_id\":\"k1.700.abc\"}""#,
                "copies=1",
            ])
        );
        tables.push(DeadLetterRow::NAME);
        let mut listed: Vec<String> = lake
            .list("")
            .expect("list")
            .into_iter()
            .map(|p| p.split('/').next().unwrap_or_default().to_string())
            .collect();
        listed.dedup();
        tables.sort();
        assert_eq!(listed, tables, "{}", lake.location());
    }
}

fn retention_days(lake: &Lake, path: &str) -> Option<String> {
    let bytes = lake.get(path).expect("get");
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).expect("parquet");
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default();
    kv.into_iter()
        .find(|k| k.key == "sightline.retention_days")
        .and_then(|k| k.value)
}

#[test]
fn restricted_route_is_a_separate_prefix_with_its_own_retention() {
    for (lake, _keep) in backends() {
        let standard = lake.clone().with_retention(sightline_sinks::Retention {
            aggregates_days: 365,
            raw_days: 90,
        });
        let restricted = standard.routed("restricted", "restricted", 30);
        let a = standard
            .write_window(START, END, &counts(1))
            .expect("standard");
        let r = restricted
            .write_window(START, END, &counts(2))
            .expect("restricted");
        assert_eq!(
            r.path,
            format!("restricted/{}", a.path),
            "{}",
            lake.location()
        );
        assert_eq!(retention_days(&lake, &a.path).as_deref(), Some("365"));
        assert_eq!(retention_days(&lake, &r.path).as_deref(), Some("30"));
        let dead = vec![dead_letter_row()];
        let d = standard
            .write_window(START, END, &dead)
            .expect("dead letters");
        assert_eq!(
            retention_days(&lake, &d.path).as_deref(),
            Some("90"),
            "per-record tables keep the raw retention"
        );
        assert_eq!(read_batches(&lake, &r.path)[0].num_rows(), 2);
    }
}

#[test]
fn unsupported_locations_are_clear_errors() {
    let err = Lake::open("gopher://somewhere").expect_err("gopher is not a lake");
    assert!(err.to_string().contains("gopher://somewhere"));
    assert!(!err.is_retryable());
}

#[test]
fn a_replay_writes_to_s3_through_the_configuration() {
    let moto = sightline_integration_tests::servers::Moto::start();
    moto.create_bucket("replay");
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("events.ndjson");
    common::write_ndjson(&input, &common::generate(4_000, 21, 0.01, 0.01));

    let mut config = common::config(2);
    config.lake.location = "s3://replay/sightline".into();
    config.lake.s3 = moto.options();
    let s3 = config.lake.open().expect("s3 lake");
    let job = sightline::run::Job {
        config: config.clone(),
        input: sightline::run::Input::Ndjson(input.to_str().expect("utf-8").into()),
        lake: s3.clone(),
        stop: Default::default(),
        print_windows: false,
        format: Default::default(),
    };
    let summary = sightline::run::run(job).expect("replay into s3");
    let local = dir.path().join("local");
    assert_eq!(common::replay(&input, &local, config), summary);

    // The same files, with the same rows, as the local replay.
    let files = s3.list("").expect("list");
    assert_eq!(files.len() as u64, summary.files);
    for path in &files {
        assert!(
            path.contains("/dt=") && path.ends_with(".parquet"),
            "{path}"
        );
        let local_rows = Lake::open(local.to_str().expect("utf-8"))
            .expect("local")
            .read_rows(path)
            .expect("local file");
        assert_eq!(s3.read_rows(path).expect("s3 file"), local_rows, "{path}");
    }
}
