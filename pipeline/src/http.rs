//! The pipeline's own endpoints, on one small HTTP server (`[http] listen`, loopback by
//! default; `run` and `demo` serve them, `replay` does not):
//!
//! - `/metrics`: the run's counters in OpenMetrics when the scraper asks for it (Prometheus
//!   does), else in the Prometheus text format 0.0.4 (encoded by the Prometheus project's
//!   `prometheus-client`, then [`text_format`]): records read, events accepted, rejected and late, records
//!   dropped as already written after a restart; windows, files, rows and bytes written; sink
//!   retries and permanent failures; remote-write samples sent, rejected, dropped and queued,
//!   and requests retried; the largest delay from a window's end to its files being durable;
//!   the process's resident memory; per source partition its watermark, freshness and (Kafka)
//!   consumer lag and offsets; per sink its writes and failures; each long-horizon operator's
//!   last snapshot size; and the histograms of the window close delay, sink writes and
//!   remote-write requests (from [`Timing`]s).
//! - `/healthz`: 200 while no sink has given up, 503 after.
//! - `/readyz`: 200 once the run has started (the lake answered the restore, the sources are
//!   assigned), 503 before.
//! - `/`: the dashboard page ([`DASHBOARD_PAGE`]), which reads `/api/status` (the run's counters
//!   and partitions, [`Telemetry::status_json`]) and `/api/board` (the board's series).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use sightline_ingest::source::{IngestStats, PartitionGauge};
use sightline_sinks::SinkHealth;
use sightline_sinks::board::Board;
use sightline_sinks::durable::SinkStats;
use sightline_sinks::remote_write::RemoteWrite;
use sightline_sinks::timing::Timing;
use tracing::warn;

/// What the endpoints show, shared with the run that updates it.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// The sources' counters.
    pub ingest: Arc<IngestStats>,
    /// Windows closed and written.
    pub windows: AtomicU64,
    /// Files written.
    pub files: AtomicU64,
    /// Rows written.
    pub rows: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
    /// The run has started: restore done, sources assigned.
    pub ready: AtomicBool,
    /// The sinks' failures, once the run has them.
    pub sinks: Mutex<Option<Arc<SinkHealth>>>,
    /// The metrics store's sender, when configured.
    pub remote: Mutex<Option<RemoteWrite>>,
    /// The dashboard's board, when the page is served: the latest windows of the exported
    /// tables.
    pub board: Option<Board>,
    /// Delays from a window's end (every watermark past it) to its files being durable.
    pub close_delay: Mutex<Timing>,
    /// The windows' width, ms (set by the run).
    pub window_ms: AtomicU64,
}

impl Telemetry {
    /// Telemetry over the sources' counters `ingest`.
    pub fn new(ingest: Arc<IngestStats>) -> Telemetry {
        Telemetry {
            ingest,
            ..Telemetry::default()
        }
    }

    /// The same, with a board for the dashboard page.
    pub fn with_board(ingest: Arc<IngestStats>) -> Telemetry {
        Telemetry {
            board: Some(Board::default()),
            ..Telemetry::new(ingest)
        }
    }

    /// Takes the run loop's totals of what is written.
    pub(crate) fn observe(&self, progress: &crate::report::Progress) {
        let t = &progress.totals;
        self.windows.store(progress.windows, Ordering::Relaxed);
        self.files.store(t.files, Ordering::Relaxed);
        self.rows.store(t.rows, Ordering::Relaxed);
        self.bytes.store(t.bytes, Ordering::Relaxed);
    }

    fn healthy(&self) -> bool {
        self.sinks
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|h| h.failed().is_none()))
            .unwrap_or(true)
    }

    /// The `/metrics` text.
    pub fn render(&self) -> String {
        let mut registry = Registry::with_prefix("sightline");
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counter = |registry: &mut Registry, name: &str, help: &str, v: u64| {
            registry.register(name, help, ConstCounter::new(v));
        };
        let i = &self.ingest;
        counter(
            &mut registry,
            "records_read",
            "Records read from the sources",
            load(&i.read),
        );
        counter(
            &mut registry,
            "events_accepted",
            "Events accepted (valid, on time)",
            load(&i.accepted),
        );
        counter(
            &mut registry,
            "records_rejected",
            "Records rejected by decoding or validation (dead letters)",
            load(&i.rejected),
        );
        counter(
            &mut registry,
            "events_late",
            "Events behind their partition's watermark (dead letters)",
            load(&i.late),
        );
        counter(
            &mut registry,
            "records_already_written",
            "Records read again after a restart whose windows were written (dropped)",
            load(&i.already_written),
        );
        counter(
            &mut registry,
            "windows_written",
            "Windows closed and written",
            load(&self.windows),
        );
        counter(
            &mut registry,
            "files_written",
            "Files written to the lake",
            load(&self.files),
        );
        counter(
            &mut registry,
            "rows_written",
            "Rows written to the lake",
            load(&self.rows),
        );
        registry.register_with_unit(
            "lake_written",
            "Bytes written to the lake",
            Unit::Bytes,
            ConstCounter::new(load(&self.bytes)),
        );
        registry.register_with_unit(
            "window_close_delay_max",
            "Largest delay from a window's end (every watermark past it) to its files being durable",
            Unit::Seconds,
            ConstGauge::new(load(&i.max_close_delay_ms) as f64 / 1000.0),
        );
        if let Ok(timing) = self.close_delay.lock() {
            registry.register_with_unit(
                "window_close_delay",
                "Delay from a window's end (every watermark past it) to its files being durable",
                Unit::Seconds,
                Timings(vec![(Vec::new(), timing.clone())]),
            );
        }
        self.register_partitions(&mut registry);
        if let Ok(sinks) = self.sinks.lock()
            && let Some(h) = sinks.as_ref()
        {
            let per_sink = h.per_sink();
            let labelled = |f: &dyn Fn(&SinkStats) -> u64| {
                Labelled(
                    per_sink
                        .iter()
                        .map(|(name, s)| (vec![("sink".to_owned(), name.clone())], f(s) as f64))
                        .collect(),
                    MetricType::Counter,
                )
            };
            registry.register(
                "sink_writes",
                "Batches each sink delivered (windows written, records produced, snapshots saved)",
                labelled(&|s| s.writes),
            );
            registry.register(
                "sink_failures",
                "Failed deliveries of each sink, each retried",
                labelled(&|s| s.failures),
            );
            registry.register_with_unit(
                "sink_write_duration",
                "How long each successful delivery of each sink took",
                Unit::Seconds,
                Timings(
                    per_sink
                        .iter()
                        .map(|(name, s)| {
                            (vec![("sink".to_owned(), name.clone())], s.latency.clone())
                        })
                        .collect(),
                ),
            );
            let sizes = h.state_sizes();
            let state = |f: &dyn Fn(&(u64, u64)) -> u64| {
                Labelled(
                    sizes
                        .iter()
                        .map(|(op, size)| {
                            (vec![("operator".to_owned(), op.clone())], f(size) as f64)
                        })
                        .collect(),
                    MetricType::Gauge,
                )
            };
            registry.register(
                "state_records",
                "Records in the last saved snapshot of each long-horizon operator",
                state(&|s| s.0),
            );
            registry.register_with_unit(
                "state_size",
                "Size of the last saved snapshot of each long-horizon operator",
                Unit::Bytes,
                state(&|s| s.1),
            );
            counter(
                &mut registry,
                "sink_retries",
                "Failed sink deliveries, each retried",
                h.retries(),
            );
            counter(
                &mut registry,
                "sink_permanent_failures",
                "Sink failures classified as permanent",
                h.permanent_failures(),
            );
        }
        if let Ok(remote) = self.remote.lock()
            && let Some(r) = remote.as_ref()
        {
            let (sent, retries, rejected, dropped) = r.stats().snapshot();
            counter(
                &mut registry,
                "remote_write_samples_sent",
                "Samples the metrics store accepted",
                sent,
            );
            counter(
                &mut registry,
                "remote_write_samples_rejected",
                "Samples the metrics store rejected for good",
                rejected,
            );
            counter(
                &mut registry,
                "remote_write_samples_dropped",
                "Samples dropped from the full remote-write queue",
                dropped,
            );
            counter(
                &mut registry,
                "remote_write_retries",
                "Remote-write requests sent again",
                retries,
            );
            registry.register(
                "remote_write_samples_queued",
                "Samples waiting to be sent",
                ConstGauge::new(r.queued() as i64),
            );
            if let Ok(latency) = r.stats().latency.lock() {
                registry.register_with_unit(
                    "remote_write_request_duration",
                    "How long each remote-write request took to be answered",
                    Unit::Seconds,
                    Timings(vec![(Vec::new(), latency.clone())]),
                );
            }
        }
        if let Some(rss) = resident_bytes() {
            registry.register_with_unit(
                "process_resident_memory",
                "Resident memory of the process",
                Unit::Bytes,
                ConstGauge::new(rss as i64),
            );
        }
        if let Some(board) = &self.board {
            registry.register(
                "dashboard_series",
                "Series the dashboard page holds",
                ConstGauge::new(board.len() as i64),
            );
        }
        let mut out = String::new();
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }

    /// `/api/status`: the run's counters, its health, and where each source partition stands.
    pub fn status_json(&self) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let i = &self.ingest;
        let now_ms = sightline_schemas::wall_clock_ms();
        let partitions: Vec<serde_json::Value> = self
            .ingest
            .partitions
            .lock()
            .map(|p| {
                p.iter()
                    .map(|((topic, partition), g)| {
                        serde_json::json!({
                            "topic": topic,
                            "partition": partition,
                            "watermark_ms": g.watermark_ms,
                            "freshness_lag_ms": g.watermark_ms.map(|w| now_ms.saturating_sub(w)),
                            "consumer_lag": g.consumer_lag(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let remote = self.remote.lock().ok().and_then(|r| {
            let r = r.as_ref()?;
            let (sent, retries, rejected, dropped) = r.stats().snapshot();
            Some(serde_json::json!({
                "sent": sent, "retries": retries, "rejected": rejected,
                "dropped": dropped, "queued": r.queued(),
            }))
        });
        let close_p99 = self
            .close_delay
            .lock()
            .ok()
            .filter(|t| t.count() > 0)
            .map(|t| t.quantile_seconds(0.99));
        serde_json::json!({
            "now_ms": now_ms,
            "window_ms": load(&self.window_ms),
            "ready": self.ready.load(Ordering::Acquire),
            "healthy": self.healthy(),
            "read": load(&i.read),
            "accepted": load(&i.accepted),
            "rejected": load(&i.rejected),
            "late": load(&i.late),
            "windows": load(&self.windows),
            "files": load(&self.files),
            "rows": load(&self.rows),
            "close_delay_p99_s": close_p99,
            "partitions": partitions,
            "remote_write": remote,
        })
        .to_string()
    }

    /// Per source partition: its watermark, how far that is behind the wall clock
    /// (freshness), and for Kafka the consumer lag and offsets.
    fn register_partitions(&self, registry: &mut Registry) {
        let Ok(partitions) = self.ingest.partitions.lock() else {
            return;
        };
        let now_ms = sightline_schemas::wall_clock_ms();
        let gauge = |f: &dyn Fn(&PartitionGauge) -> Option<f64>| {
            Labelled(
                partitions
                    .iter()
                    .filter_map(|((topic, partition), g)| {
                        let labels = vec![
                            ("topic".to_owned(), topic.clone()),
                            ("partition".to_owned(), partition.to_string()),
                        ];
                        Some((labels, f(g)?))
                    })
                    .collect(),
                MetricType::Gauge,
            )
        };
        registry.register_with_unit(
            "source_watermark",
            "Each source partition's watermark (its newest event time less the allowed lateness), as a Unix time",
            Unit::Seconds,
            gauge(&|g| Some(g.watermark_ms? as f64 / 1000.0)),
        );
        registry.register_with_unit(
            "source_freshness_lag",
            "How far each source partition's watermark is behind the wall clock",
            Unit::Seconds,
            gauge(&|g| Some(now_ms.saturating_sub(g.watermark_ms?) as f64 / 1000.0)),
        );
        registry.register(
            "source_consumer_lag",
            "Records of each Kafka partition not yet committed: end offset less committed offset",
            gauge(&|g| g.consumer_lag().map(|l| l as f64)),
        );
        registry.register(
            "source_committed_offset",
            "Each Kafka partition's committed offset",
            gauge(&|g| g.committed.map(|o| o as f64)),
        );
        registry.register(
            "source_end_offset",
            "Each Kafka partition's end offset (high watermark)",
            gauge(&|g| g.end_offset.map(|o| o as f64)),
        );
    }
}

/// A labelled family of constant values (counters or gauges) for one scrape.
#[derive(Debug)]
struct Labelled(Vec<(Vec<(String, String)>, f64)>, MetricType);

impl EncodeMetric for Labelled {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, value) in &self.0 {
            let mut e = encoder.encode_family(labels)?;
            match self.1 {
                MetricType::Counter => e.encode_counter::<NoLabelSet, f64, f64>(value, None),
                _ => e.encode_gauge(value),
            }?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        self.1
    }
}

/// A labelled family of histograms from [`Timing`]s, for one scrape.
#[derive(Debug)]
struct Timings(Vec<(Vec<(String, String)>, Timing)>);

impl EncodeMetric for Timings {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, timing) in &self.0 {
            encoder
                .encode_family(labels)?
                .encode_histogram::<NoLabelSet>(
                    timing.sum_seconds(),
                    timing.count(),
                    &timing.buckets(),
                    None,
                )?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// `openmetrics` (the OpenMetrics text `prometheus-client` writes) in the Prometheus text
/// format 0.0.4, for scrapers and tools that do not ask for OpenMetrics: a counter's family
/// takes its samples' `_total` name, and `# UNIT` and `# EOF` lines go.
pub fn text_format(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The built-in dashboard page: one file, its script and styles inline, no external resource.
/// It polls `/api/status` and `/api/board`.
pub const DASHBOARD_PAGE: &str = include_str!("dashboard.html");

/// `/api/board?names=a,b&last=n`: the board's series named (all when `names` is absent), their
/// `last` newest points (30 by default).
fn board_json(telemetry: &Telemetry, url: &str) -> String {
    let Some(board) = &telemetry.board else {
        return "{\"series\":[],\"evicted\":0}".to_owned();
    };
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let param = |key: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    };
    let names: Vec<&str> = param("names")
        .map(|n| n.split(',').filter(|n| !n.is_empty()).collect())
        .unwrap_or_default();
    let last = param("last").and_then(|n| n.parse().ok()).unwrap_or(30);
    board.to_json(&names, last)
}

/// The process's resident memory, from `/proc/self/statm` (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Telemetry for a run whose endpoints are served as `config` says: with a board for the
/// dashboard page unless they are off.
pub fn telemetry_for(config: &crate::config::HttpConfig) -> Arc<Telemetry> {
    Arc::new(if config.listen.as_deref() == Some("") {
        Telemetry::new(Arc::default())
    } else {
        Telemetry::with_board(Arc::default())
    })
}

/// The line `run` and `demo` print once the endpoints are served at `addr`.
pub fn served_line(addr: std::net::SocketAddr) -> String {
    format!(
        "dashboard: http://{addr}/ · metrics: http://{addr}/metrics · health: http://{addr}/healthz, http://{addr}/readyz"
    )
}

/// Where the endpoints are served when `http.listen` is not set.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// Starts the endpoints as `config` says: `None` when they are off, or when the default
/// address is taken (a warning; an address that was asked for and cannot be served is an
/// error naming `http.listen`).
pub fn start(
    config: &crate::config::HttpConfig,
    telemetry: Arc<Telemetry>,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    match config.listen.as_deref() {
        Some("") => Ok(None),
        Some(listen) => serve(listen, telemetry).map(Some),
        None => match serve(DEFAULT_LISTEN, telemetry) {
            Ok(addr) => Ok(Some(addr)),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "no /metrics: the default address is taken (set http.listen)");
                Ok(None)
            }
        },
    }
}

/// Serves the endpoints on `listen` (`host:port`; port 0 picks one) from a thread of its own.
/// Returns the address it is bound to.
pub fn serve(listen: &str, telemetry: Arc<Telemetry>) -> anyhow::Result<std::net::SocketAddr> {
    let server = tiny_http::Server::http(listen)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("http.listen: cannot serve on `{listen}`"))?;
    let addr = server
        .server_addr()
        .to_ip()
        .context("http.listen: not an IP address")?;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let path = request.url().split('?').next().unwrap_or("").to_owned();
                let openmetrics = request.headers().iter().any(|h| {
                    h.field.equiv("Accept")
                        && h.value.as_str().contains("application/openmetrics-text")
                });
                let (status, content_type, body) = match path.as_str() {
                    "/metrics" if openmetrics => (
                        200,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        telemetry.render(),
                    ),
                    "/metrics" => (
                        200,
                        "text/plain; version=0.0.4; charset=utf-8",
                        text_format(&telemetry.render()),
                    ),
                    "/healthz" if telemetry.healthy() => (200, "text/plain", "ok\n".to_owned()),
                    "/healthz" => (503, "text/plain", "a sink gave up\n".to_owned()),
                    "/readyz" if telemetry.ready.load(Ordering::Acquire) => {
                        (200, "text/plain", "ready\n".to_owned())
                    }
                    "/readyz" => (503, "text/plain", "starting\n".to_owned()),
                    "/" | "/index.html" => {
                        (200, "text/html; charset=utf-8", DASHBOARD_PAGE.to_owned())
                    }
                    "/api/status" => (200, "application/json", telemetry.status_json()),
                    "/api/board" => (
                        200,
                        "application/json",
                        board_json(&telemetry, request.url()),
                    ),
                    _ => (404, "text/plain", "not found\n".to_owned()),
                };
                let header = tiny_http::Header::from_bytes("Content-Type", content_type)
                    .unwrap_or_else(|()| unreachable!("a static header is valid"));
                let response = tiny_http::Response::from_string(body)
                    .with_status_code(status)
                    .with_header(header);
                if let Err(e) = request.respond(response) {
                    warn!(error = %e, "http: a response was not sent");
                }
            }
        })
        .context("starting the http thread")?;
    Ok(addr)
}
