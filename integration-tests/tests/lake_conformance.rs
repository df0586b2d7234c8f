//! The lake's conformance suite, run against every backend the sink supports: the in-memory
//! store, the local filesystem, and the S3 API (a real moto server). Each case writes real
//! Parquet and reads it back with the Parquet reader. The last case replays a generated file
//! into S3 through the configuration, as `sightline replay --out s3://…` does.

mod common;

use arrow_array::{Array, Int64Array, StringArray, TimestampMicrosecondArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sightline_sinks::tables::{DeadLetterRow, EventCountRow, LatencyRow, LatencyStats, QualityRow, VariantLatencyRow};
use sightline_sinks::{Lake, Table};

const START: u64 = 1_769_178_600_000;
const END: u64 = 1_769_178_660_000;

/// Every backend, each with what keeps it alive (a temporary directory, a server).
fn backends() -> Vec<(Lake, Box<dyn std::any::Any>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let local = Lake::open(dir.path().to_str().expect("utf-8 path")).expect("local lake");
    let moto = sightline_integration_tests::servers::Moto::start();
    let s3 = moto.lake("conformance", "lake/prefix");
    vec![(Lake::open("memory://").expect("memory lake"), Box::new(())), (local, Box::new(dir)), (s3, Box::new(moto))]
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
        })
        .collect()
}

fn read_batches(lake: &Lake, path: &str) -> Vec<arrow_array::RecordBatch> {
    let bytes = lake.get(path).expect("get");
    ParquetRecordBatchReaderBuilder::try_new(bytes).expect("parquet").build().expect("reader").map(|b| b.expect("batch")).collect()
}

#[test]
fn writes_read_back_with_schema_and_values() {
    for (lake, _dir) in backends() {
        let written = lake.write_window(START, END, &counts(3)).expect("write");
        assert_eq!(written.rows, 3);
        assert_eq!(written.path, "event_counts/dt=2026-01-23/hr=14/part-20260123T143000Z-20260123T143100Z.parquet");
        let batches = read_batches(&lake, &written.path);
        let batch = &batches[0];
        assert_eq!(batch.schema(), EventCountRow::schema(), "{}", lake.location());
        let starts = batch.column(0).as_any().downcast_ref::<TimestampMicrosecondArray>().expect("timestamp column");
        assert_eq!(starts.value(0), START as i64 * 1000);
        assert_eq!(starts.timezone(), Some("UTC"));
        let names = batch.column(2).as_any().downcast_ref::<StringArray>().expect("names");
        assert_eq!(names.value(2), "e2");
        let values = batch.column(5).as_any().downcast_ref::<Int64Array>().expect("counts");
        assert_eq!(values.iter().flatten().sum::<i64>(), 6);
    }
}

#[test]
fn a_rewrite_of_a_window_replaces_its_file() {
    for (lake, _dir) in backends() {
        lake.write_window(START, END, &counts(5)).expect("first write");
        let again = lake.write_window(START, END, &counts(2)).expect("rewrite");
        let files = lake.list("event_counts").expect("list");
        assert_eq!(files, vec![again.path.clone()], "{}", lake.location());
        assert_eq!(lake.read_rows(&again.path).expect("read"), 2);
    }
}

#[test]
fn every_table_round_trips() {
    let stats = LatencyStats { count: 2, mean_ms: 1.5, p50_ms: 1.0, p90_ms: 2.0, p95_ms: 2.0, p99_ms: 2.0, max_ms: 2.0 };
    for (lake, _dir) in backends() {
        let latency = vec![LatencyRow {
            window_start_ms: START,
            window_end_ms: END,
            event_name: "a".into(),
            feature_area: "b".into(),
            surface: String::new(),
            stats: stats.clone(),
        }];
        let variants = vec![VariantLatencyRow {
            window_start_ms: START,
            window_end_ms: END,
            event_name: "a".into(),
            experiment_id: "x".into(),
            variant: "control".into(),
            stats: stats.clone(),
        }];
        let quality = vec![QualityRow { window_start_ms: START, window_end_ms: END, event_name: "unknown".into(), outcome: "truncated".into(), count: 4 }];
        let dead = vec![DeadLetterRow {
            window_start_ms: START,
            window_end_ms: END,
            processor: sightline_sinks::tables::PROCESSOR.into(),
            kind: "late".into(),
            reason: "behind".into(),
            event_name: None,
            schema_version: Some("1.0.0".into()),
            violations: r#"[{"pointer":"/properties/x","keyword":"type","message":"m"}]"#.into(),
            event_time_ms: Some(START as i64),
            topic: "t".into(),
            partition: 3,
            offset: 99,
            payload_bytes: 870,
            payload: Some(r#"{"user_id":"k1.700.abc"}"#.into()),
            copies: 1,
        }];
        let paths = [
            lake.write_window(START, END, &latency).expect("latency").path,
            lake.write_window(START, END, &variants).expect("variants").path,
            lake.write_window(START, END, &quality).expect("quality").path,
            lake.write_window(START, END, &dead).expect("dead letters").path,
        ];
        for (path, schema) in paths.iter().zip([LatencyRow::schema(), VariantLatencyRow::schema(), QualityRow::schema(), DeadLetterRow::schema()]) {
            let batches = read_batches(&lake, path);
            assert_eq!(batches[0].schema(), schema);
            assert_eq!(batches[0].num_rows(), 1);
        }
        let tables: Vec<String> = lake.list("").expect("list").into_iter().map(|p| p.split('/').next().unwrap_or_default().to_string()).collect();
        assert_eq!(tables, vec!["dead_letter", "latency", "latency_by_variant", "quality"]);
    }
}

fn retention_days(lake: &Lake, path: &str) -> Option<String> {
    let bytes = lake.get(path).expect("get");
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).expect("parquet");
    let kv = builder.metadata().file_metadata().key_value_metadata().cloned().unwrap_or_default();
    kv.into_iter().find(|k| k.key == "sightline.retention_days").and_then(|k| k.value)
}

#[test]
fn restricted_route_is_a_separate_prefix_with_its_own_retention() {
    for (lake, _keep) in backends() {
        let standard = lake.clone().with_retention(sightline_sinks::Retention { aggregates_days: 365, raw_days: 90 });
        let restricted = standard.routed("restricted", "restricted", 30);
        let a = standard.write_window(START, END, &counts(1)).expect("standard");
        let r = restricted.write_window(START, END, &counts(2)).expect("restricted");
        assert_eq!(r.path, format!("restricted/{}", a.path), "{}", lake.location());
        assert_eq!(retention_days(&lake, &a.path).as_deref(), Some("365"));
        assert_eq!(retention_days(&lake, &r.path).as_deref(), Some("30"));
        let dead = vec![DeadLetterRow {
            window_start_ms: START,
            window_end_ms: END,
            processor: "p".into(),
            kind: "empty".into(),
            reason: "r".into(),
            event_name: None,
            schema_version: None,
            violations: "[]".into(),
            event_time_ms: None,
            topic: "t".into(),
            partition: 0,
            offset: 1,
            payload_bytes: 0,
            payload: None,
            copies: 1,
        }];
        let d = standard.write_window(START, END, &dead).expect("dead letters");
        assert_eq!(retention_days(&lake, &d.path).as_deref(), Some("90"), "per-record tables keep the raw retention");
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
        assert!(path.contains("/dt=") && path.ends_with(".parquet"), "{path}");
        let local_rows = Lake::open(local.to_str().expect("utf-8")).expect("local").read_rows(path).expect("local file");
        assert_eq!(s3.read_rows(path).expect("s3 file"), local_rows, "{path}");
    }
}
