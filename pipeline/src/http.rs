//! The pipeline's own endpoints, on one small HTTP server (`[http] listen`, loopback by
//! default; `run` and `demo` serve them, `replay` does not):
//!
//! - `/metrics`: the run's counters in OpenMetrics when the scraper asks for it (Prometheus
//!   does), else in the Prometheus text format 0.0.4 (encoded by the Prometheus project's
//!   `prometheus-client`, then [`text_format`]): records read, events accepted, rejected and late, records
//!   dropped as already written after a restart; windows, files, rows and bytes written; sink
//!   retries and permanent failures; remote-write samples sent, rejected, dropped and queued,
//!   and requests retried; the largest delay from a window's end to its files being durable;
//!   the process's resident memory.
//! - `/healthz`: 200 while no sink has given up, 503 after.
//! - `/readyz`: 200 once the run has started (the lake answered the restore, the sources are
//!   assigned), 503 before.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use sightline_ingest::source::IngestStats;
use sightline_sinks::SinkHealth;
use sightline_sinks::remote_write::RemoteWrite;
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
}

impl Telemetry {
    /// Telemetry over the sources' counters `ingest`.
    pub fn new(ingest: Arc<IngestStats>) -> Telemetry {
        Telemetry {
            ingest,
            ..Telemetry::default()
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
        if let Ok(sinks) = self.sinks.lock()
            && let Some(h) = sinks.as_ref()
        {
            counter(
                &mut registry,
                "sink_retries",
                "Failed sink deliveries, each retried",
                load(&h.retries),
            );
            counter(
                &mut registry,
                "sink_permanent_failures",
                "Sink failures classified as permanent",
                load(&h.permanent_failures),
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
        }
        if let Some(rss) = resident_bytes() {
            registry.register_with_unit(
                "process_resident_memory",
                "Resident memory of the process",
                Unit::Bytes,
                ConstGauge::new(rss as i64),
            );
        }
        let mut out = String::new();
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
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

/// The process's resident memory, from `/proc/self/statm` (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
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
