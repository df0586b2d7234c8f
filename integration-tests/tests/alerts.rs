//! The alert rules end to end: a planted failure burst fires exactly the expected rules in the
//! expected windows and resolves after; clean input fires nothing; the alerts reach the alerts
//! topic of the mock cluster, keyed by route, rule, subject and window, a critical feedback
//! after the burst reaches the triage topic with the user's failed calls, and neither topic
//! holds anything private.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use sightline::run::{Input, Job, run};
use sightline_integration_tests::chaos::{read_topic, snapshot};

/// 2026-01-23T14:30:00Z, a window start.
const BASE: i64 = 1_769_178_600_000;
const WINDOW: i64 = 10_000;

fn event(n: &mut u64, name: &str, ms: i64, props: &str) -> String {
    *n += 1;
    let event_type = match name {
        "integration_call_failed" => "error",
        "project_feedback_submitted" => "outcome",
        _ => "system_health",
    };
    format!(
        r#"{{"event_id":"00000000-0000-4000-8000-{n:012x}","event_name":"{name}","event_type":"{event_type}","timestamp":"{}","source":"server","platform":"api","app_version":"4.2.0","tenant_id":"t_1","user_id":"u_1","session_id":"s_1","feature_area":"integrations","pii_classification":"none","data_sensitivity":"internal","properties":{props}}}"#,
        sightline_schemas::format_rfc3339_ms(ms)
    )
}

fn call(n: &mut u64, integration: &str, ms: i64, ok: bool) -> String {
    if ok {
        event(
            n,
            "integration_call_success",
            ms,
            &format!(
                r#"{{"integration":"{integration}","endpoint":"/x","method":"GET","status_code":200,"duration_ms":120}}"#
            ),
        )
    } else {
        event(
            n,
            "integration_call_failed",
            ms,
            &format!(
                r#"{{"integration":"{integration}","endpoint":"/x","method":"GET","status_code":503,"error_message":"down","retryable":true}}"#
            ),
        )
    }
}

/// Four windows, in time order. hubspot: 25 good calls in each. gmail: window 1 is clean; in window 2 its 30
/// calls fail and its breaker opens; window 3 has no gmail call (the breaker stays open, the
/// error rate has no calls); in window 4, 25 good calls close it.
fn planted(burst: bool) -> Vec<String> {
    let mut n = 0;
    let mut lines: Vec<(i64, String)> = Vec::new();
    for w in 0..4 {
        let start = BASE + w * WINDOW;
        for i in 0..25 {
            let ms = start + 100 + i * 300;
            lines.push((ms, call(&mut n, "hubspot", ms, true)));
        }
        let gmail_calls = match (burst, w) {
            (true, 1) => (0..30).map(|i| (start + 50 + i * 250, false)).collect(),
            (true, 2) => Vec::new(),
            _ => (0..25)
                .map(|i| (start + 70 + i * 300, true))
                .collect::<Vec<_>>(),
        };
        for (ms, ok) in gmail_calls {
            lines.push((ms, call(&mut n, "gmail", ms, ok)));
        }
        if burst && w == 1 {
            let ms = start + 8_000;
            lines.push((
                ms,
                event(
                    &mut n,
                    "circuit_breaker_opened",
                    ms,
                    r#"{"service":"gmail","failure_count":30,"threshold":5}"#,
                ),
            ));
        }
    }
    // In time order, as a live source sends them (a Kafka run allows 1 s of lateness).
    lines.sort_by_key(|(ms, _)| *ms);
    lines.into_iter().map(|(_, line)| line).collect()
}

fn config() -> sightline::config::Config {
    let mut config = sightline::config::Config::default();
    config.pipeline.window_ms = WINDOW as u64;
    config.privacy.key = Some(common::TEST_KEY.into());
    config
}

fn replay(lines: &[String], dir: &Path) -> std::path::PathBuf {
    let input = dir.join("events.ndjson");
    std::fs::write(&input, lines.join("\n") + "\n").expect("write input");
    let lake_dir = dir.join("lake");
    let job = Job {
        config: config(),
        input: Input::Ndjson(input.display().to_string()),
        lake: sightline_sinks::Lake::open(lake_dir.to_str().expect("utf-8")).expect("lake"),
        stop: Arc::new(AtomicBool::new(false)),
        print_windows: false,
        format: Default::default(),
    };
    let summary = run(job).expect("replay");
    assert_eq!(summary.rejected, 0, "{summary}");
    lake_dir
}

/// `(window index, rule, subject, state, severity)` of every alert row in the lake.
fn alerts(lake: &Path) -> Vec<(i64, String, String, String, String)> {
    let field = |row: &str, name: &str| -> String {
        row.split(" | ")
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
            .unwrap_or_default()
            .trim_matches('"')
            .to_owned()
    };
    let mut out: Vec<_> = snapshot(lake)
        .into_iter()
        .filter(|(path, _)| path.starts_with("alerts/"))
        .flat_map(|(_, rows)| rows)
        .map(|row| {
            let start: i64 = field(&row, "window_start")
                .trim_end_matches("µs")
                .parse()
                .expect("window_start");
            (
                (start / 1000 - BASE) / WINDOW,
                field(&row, "rule"),
                field(&row, "subject"),
                field(&row, "state"),
                field(&row, "severity"),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_planted_failure_burst_fires_the_expected_rules_and_resolves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lake = replay(&planted(true), dir.path());
    let s = |x: &str| x.to_owned();
    assert_eq!(
        alerts(&lake),
        vec![
            (1, s("breaker_open"), s("gmail"), s("firing"), s("critical")),
            (1, s("error_rate"), s("gmail"), s("firing"), s("page")),
            // No gmail calls: the error rate no longer holds; the breaker stays open.
            (2, s("error_rate"), s("gmail"), s("resolved"), s("page")),
            (
                3,
                s("breaker_open"),
                s("gmail"),
                s("resolved"),
                s("critical")
            ),
        ]
    );
    // The breaker is open at the end of windows 1 and 2, with a row in window 2 without calls.
    let states: Vec<String> = snapshot(&lake)
        .into_iter()
        .filter(|(path, _)| path.starts_with("integration_health/"))
        .flat_map(|(_, rows)| rows)
        .filter(|row| row.contains("integration=\"gmail\""))
        .map(|row| {
            let state = row
                .split(" | ")
                .find_map(|f| f.strip_prefix("breaker_state="))
                .unwrap_or_default()
                .trim_matches('"')
                .to_owned();
            let calls = row
                .split(" | ")
                .find_map(|f| f.strip_prefix("calls="))
                .unwrap_or_default()
                .to_owned();
            format!("{calls}:{state}")
        })
        .collect();
    assert_eq!(states, vec!["25:closed", "30:open", "0:open", "25:closed"]);
}

#[test]
fn clean_input_fires_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lake = replay(&planted(false), dir.path());
    assert!(alerts(&lake).is_empty(), "{:?}", alerts(&lake));
    assert!(
        snapshot(&lake)
            .keys()
            .any(|p| p.starts_with("integration_health/")),
        "the clean input has integration rows"
    );
}

#[test]
fn alerts_and_triage_reach_the_mock_cluster_topics_keyed_as_documented() {
    use rdkafka::config::ClientConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("alerts.events", 1, 1).expect("topic");
    cluster.create_topic("alerts.out", 1, 1).expect("topic");
    cluster.create_topic("triage.out", 1, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::kafka::kafka_config(&bootstrap, "alerts-test", 1);
    config.pipeline.window_ms = WINDOW as u64;
    config.kafka.topics = vec![sightline::config::TopicConfig::envelope("alerts.events")];
    config.kafka.alerts_topic = Some("alerts.out".into());
    config.kafka.triage_topic = Some("triage.out".into());
    let (stop, pipeline) = common::kafka::start(&config, &dir.path().join("lake"));

    // The planted burst, moved to start a minute ago, so that idle time closes every window.
    let now = common::kafka::now_ms();
    let shift = (now - 60_000) - (now - 60_000).rem_euclid(WINDOW) - BASE;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("producer");
    // The same user's critical feedback in window 2, after the 30 failed gmail calls of
    // window 1: one triage record with 30 recent errors.
    let mut lines = planted(true);
    let mut n = 1_000;
    let feedback = event(
        &mut n,
        "project_feedback_submitted",
        BASE + 2 * WINDOW + 5_000,
        r#"{"score":1,"sentiment":"negative","tags":["performance"],"comment_present":false,"correlation_id":"c-1","blocked":true,"blocker_type":"integration_failure"}"#,
    );
    let feedback_id = "00000000-0000-4000-8000-0000000003e9";
    assert!(feedback.contains(feedback_id));
    lines.push(feedback);
    lines.sort_by_key(|l| {
        let e: serde_json::Value = serde_json::from_str(l).expect("json");
        sightline_schemas::parse_rfc3339_ms(e["timestamp"].as_str().expect("ts")).expect("time")
    });
    for line in lines {
        let mut e: serde_json::Value = serde_json::from_str(&line).expect("json");
        let ms = sightline_schemas::parse_rfc3339_ms(e["timestamp"].as_str().expect("ts"))
            .expect("time");
        e["timestamp"] = sightline_schemas::format_rfc3339_ms(ms + shift).into();
        let payload = e.to_string();
        producer
            .send(BaseRecord::<(), str>::to("alerts.events").payload(&payload))
            .expect("send");
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(10)).expect("flush");

    let mut records = Vec::new();
    let mut triage: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (records.len() < 4 || triage.is_empty()) && Instant::now() < deadline {
        triage = read_topic(&bootstrap, "triage.out", 1);
        std::thread::sleep(Duration::from_millis(500));
        records = read_topic(&bootstrap, "alerts.out", 1)
            .into_iter()
            .flat_map(|(k, values)| {
                values.into_iter().map(move |v| {
                    let value: serde_json::Value = serde_json::from_str(&v).expect("json value");
                    (k.clone(), value)
                })
            })
            .collect();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pipeline.join().expect("join").expect("run");
    let first = BASE + shift;
    let mut got: Vec<(String, String)> = records
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    got.sort();
    got.dedup();
    let key = |rule: &str, w: i64| format!("standard/{rule}/gmail/{}", first + w * WINDOW);
    let mut want = vec![
        (key("breaker_open", 1), "firing".to_owned()),
        (key("error_rate", 1), "firing".to_owned()),
        (key("error_rate", 2), "resolved".to_owned()),
        (key("breaker_open", 3), "resolved".to_owned()),
    ];
    want.sort();
    assert_eq!(got, want);
    let scan = sightline::pii_scan::scan_topic(&config.kafka, "alerts.out").expect("scan");
    assert!(scan.findings.is_empty(), "{:?}", scan.findings);

    assert_eq!(
        triage.keys().collect::<Vec<_>>(),
        vec![feedback_id],
        "one triage record, keyed by the feedback's event_id"
    );
    for value in &triage[feedback_id] {
        let record: serde_json::Value = serde_json::from_str(value).expect("json value");
        assert_eq!(record["recent_errors"], 30, "{record}");
        assert_eq!(record["blocked"], true, "{record}");
        assert_eq!(record["route"], "standard", "{record}");
        assert_ne!(
            record["user_id"], "u_1",
            "the user is pseudonymized: {record}"
        );
    }
    let scan = sightline::pii_scan::scan_topic(&config.kafka, "triage.out").expect("scan");
    assert!(scan.findings.is_empty(), "{:?}", scan.findings);
    drop(cluster);
}
