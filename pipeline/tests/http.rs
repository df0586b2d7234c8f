#![allow(clippy::unwrap_used)]

//! `/metrics`, `/healthz` and `/readyz` of a replay run in this process: the text parses with
//! Prometheus' own parser (`promtool check metrics`, from the test command's Prometheus) and its
//! counters equal the run's summary.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use sightline::config::{Config, HttpConfig};
use sightline::generator::{Generator, GeneratorConfig};
use sightline::http::{Telemetry, start};
use sightline::run::{Input, Job, run_observed};
use sightline_ingest::Format;

fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    get_as(addr, path, "*/*")
}

/// HTTP/1.0, so that the body is never chunked.
fn get_as(addr: std::net::SocketAddr, path: &str, accept: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: x\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The values of the samples whose line starts with `prefix` (a name and the start of labels).
fn labelled(text: &str, prefix: &str) -> Vec<f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect()
}

fn value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_parse_and_match_the_run_summary() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.ndjson");
    let mut generator = Generator::new(GeneratorConfig::default());
    let mut text = Vec::new();
    for _ in 0..40_000 {
        generator.next_line(&mut text);
        text.push(b'\n');
    }
    std::fs::write(&input, &text).unwrap();
    let mut config = Config::default();
    config.pipeline.window_ms = 10_000;
    config.lake.location = dir.path().join("lake").display().to_string();
    config.http = HttpConfig {
        listen: Some("127.0.0.1:0".into()),
    };
    let lake = config.lake.open().unwrap();
    let telemetry = Arc::new(Telemetry::with_board(Arc::default()));
    let addr = start(&config.http, Arc::clone(&telemetry))
        .unwrap()
        .unwrap();
    assert_eq!(get(addr, "/readyz").0, 503, "not ready before the run");
    let job = Job {
        input: Input::Ndjson(input.display().to_string()),
        config,
        lake,
        stop: Arc::new(AtomicBool::new(false)),
        print_windows: false,
        format: Format::Envelope,
    };
    let summary = run_observed(job, telemetry).unwrap();
    assert_eq!(get(addr, "/readyz").0, 200);
    assert_eq!(get(addr, "/healthz").0, 200);
    assert_eq!(get(addr, "/nope").0, 404);
    let (status, metrics) = get(addr, "/metrics");
    assert_eq!(status, 200);
    for (name, want) in [
        ("sightline_records_read_total", summary.read),
        ("sightline_events_accepted_total", summary.accepted),
        ("sightline_records_rejected_total", summary.rejected),
        ("sightline_events_late_total", summary.late),
        ("sightline_windows_written_total", summary.windows),
        ("sightline_files_written_total", summary.files),
        ("sightline_rows_written_total", summary.rows),
        ("sightline_lake_written_bytes_total", summary.bytes),
    ] {
        assert_eq!(value(&metrics, name), want, "{name}");
    }
    assert!(summary.read >= 40_000 && summary.files > 0);
    // Per sink: every window file is one write of a Parquet sink, timed in a histogram.
    let parquet_writes: f64 =
        labelled(&metrics, "sightline_sink_writes_total{sink=\"WriteParquet(")
            .iter()
            .sum();
    assert_eq!(parquet_writes as u64, summary.files);
    let timed: f64 = labelled(
        &metrics,
        "sightline_sink_write_duration_seconds_count{sink=\"WriteParquet(",
    )
    .iter()
    .sum();
    assert_eq!(timed as u64, summary.files);
    // The close delays' histogram: one observation per window closed, every one in +Inf.
    let closed = value(&metrics, "sightline_window_close_delay_seconds_count");
    assert!(closed > 0, "no window close delay measured");
    assert_eq!(
        labelled(
            &metrics,
            "sightline_window_close_delay_seconds_bucket{le=\"+Inf\"}"
        ),
        vec![closed as f64]
    );
    // The file's one partition, its watermark at the newest event time less the lateness.
    let watermark = labelled(&metrics, "sightline_source_watermark_seconds{");
    assert_eq!(watermark.len(), 1, "{metrics}");
    assert!(watermark[0] > 1.5e9, "a Unix time: {}", watermark[0]);
    assert_eq!(
        labelled(&metrics, "sightline_source_freshness_lag_seconds{").len(),
        1
    );
    // The dashboard: its page, its status (the same counters) and its board (the written tables).
    let (status, page) = get(addr, "/");
    assert_eq!(status, 200);
    assert!(page.contains("<title>Sightline</title>") && !page.contains("https://"));
    let (_, status_json) = get(addr, "/api/status");
    let status_json: serde_json::Value = serde_json::from_str(&status_json).unwrap();
    assert_eq!(status_json["read"], summary.read);
    assert_eq!(status_json["windows"], summary.windows);
    assert_eq!(status_json["partitions"].as_array().map(Vec::len), Some(1));
    let (_, board) = get(
        addr,
        "/api/board?names=sightline_quality_summary_accepted&last=100",
    );
    let board: serde_json::Value = serde_json::from_str(&board).unwrap();
    let accepted: f64 = board["series"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            s["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[1].as_f64().unwrap())
        })
        .sum();
    assert_eq!(
        accepted as u64, summary.accepted,
        "the board holds every window's quality"
    );
    // What Prometheus asks for: OpenMetrics, the same counters.
    let (_, openmetrics) = get_as(
        addr,
        "/metrics",
        "application/openmetrics-text;version=1.0.0",
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert_eq!(
        value(&openmetrics, "sightline_records_read_total"),
        summary.read
    );
    // Prometheus' own parser, from the Prometheus the test command installs.
    let promtool = std::env::var_os("SIGHTLINE_PROMTOOL").unwrap_or_else(|| "promtool".into());
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): run scripts/test, which installs Prometheus, or set SIGHTLINE_PROMTOOL")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
