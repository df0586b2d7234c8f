//! The `sightline` command line.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sightline::config::Config;
use sightline::demo::{DemoOptions, demo_config};
use sightline::generator::{Generator, GeneratorConfig};
use sightline::run::{Input, Job, STOP_HANDLED};
use sightline_ingest::Format;

/// Sightline: product telemetry → event-time windowed aggregates → Parquet.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Production mode: read the configured Kafka topics until Ctrl-C.
    Run {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Worker threads (overrides pipeline.workers).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Run the same dataflow over a bounded NDJSON input; every window closes at the end.
    Replay {
        /// NDJSON file, or `-` for standard input.
        #[arg(long)]
        input: String,
        /// Lake to write to: a directory, `s3://bucket/prefix` (with `[lake.s3]` settings), or `memory://`.
        #[arg(long)]
        out: String,
        /// Configuration file (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Worker threads (overrides pipeline.workers).
        #[arg(long)]
        workers: Option<usize>,
        /// Record format of the input: `envelope`, or `flat` (the command-center spec's
        /// records, with the default envelope values).
        #[arg(long, value_enum, default_value = "envelope")]
        format: InputFormat,
    },
    /// Schema registry tools.
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Audit stored output for personal data: every string in every Parquet file under a lake
    /// directory, or every record of a Kafka topic (dead letters). Exits 1 if anything is found.
    PiiScan {
        /// A lake directory (or `s3://…` with `--config`), unless `--topic` is given.
        target: Option<String>,
        /// Scan this Kafka topic instead (brokers from `--config`'s `[kafka]`).
        #[arg(long)]
        topic: Option<String>,
        /// Configuration file (TOML) for S3 settings or Kafka brokers.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write generated events as NDJSON.
    Generate {
        /// Number of events.
        #[arg(long)]
        events: u64,
        /// Output file, or `-` for standard output.
        #[arg(long)]
        out: String,
        /// Seed of the pseudo-random sequence.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Events per second of event time.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Fraction of events held back beyond the allowed lateness.
        #[arg(long, default_value_t = 0.001)]
        late_fraction: f64,
        /// Fraction of deliberately broken records.
        #[arg(long, default_value_t = 0.001)]
        bad_fraction: f64,
        /// Fraction of records with personal data where it must not be (for privacy tests).
        #[arg(long, default_value_t = 0.0)]
        dirty_fraction: f64,
    },
    /// The embedded default: mock Kafka cluster, live generator, local lake in ./sightline-data.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        /// Events produced per second.
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// Lake directory (default: `lake.location` of the configuration, `./sightline-data`).
        #[arg(long)]
        out: Option<String>,
        /// Also send every closed window to this Prometheus remote-write endpoint (for example
        /// `http://127.0.0.1:9090/api/v1/write`): `metrics-store.url`.
        #[arg(long)]
        metrics_store: Option<String>,
        /// Configuration file (TOML) layered over the demo defaults (10 s windows, 2 s lateness).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Worker threads.
        #[arg(long)]
        workers: Option<usize>,
        /// Run as a cluster of this many processes on loopback: this one (process 0: the
        /// mock Kafka cluster, the producer, the window lines) and N-1 `sightline run`
        /// processes it starts and stops (see README, "Running a cluster").
        #[arg(long, default_value_t = 1)]
        processes: usize,
    },
}

/// Record format of a replayed file.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum InputFormat {
    /// The canonical envelope.
    Envelope,
    /// Flat command-center records.
    Flat,
}

/// What `schemas` does.
#[derive(Subcommand, Debug)]
enum SchemasCommand {
    /// Checks a schema registry directory: valid JSON Schema, consistent with the envelope,
    /// each new version compatible with the previous one of its major version.
    Lint {
        /// The registry directory (default: `schemas/registry`).
        #[arg(default_value = "schemas/registry")]
        dir: PathBuf,
    },
}

/// What `config` does.
#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Checks a configuration file as `run` would load it (with the `SIGHTLINE__*`
    /// environment over it): unknown keys and bad values are refused with the field named.
    /// Exits 0 and prints a summary when it is valid.
    Check {
        /// The configuration file (TOML).
        file: PathBuf,
    },
}

/// The lines of the file at `path` (for progress; `None` when it cannot be read).
fn count_lines(path: &str) -> Option<u64> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut lines = 0u64;
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            return Some(lines);
        }
        lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SIGHTLINE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a redirected log gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(err) = real_main(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// Makes `config` process 0 of a loopback cluster of `processes` processes: free ports, and a
/// random pseudonymization key when none is configured (a cluster needs one key everywhere).
fn demo_cluster(config: &mut Config, processes: usize) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for _ in 0..processes {
        listeners.push(std::net::TcpListener::bind("127.0.0.1:0").context("a free port")?);
    }
    config.cluster.processes = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<Result<_, _>>()?;
    config.cluster.process = Some(0);
    if config.privacy.key_ring()?.is_none() && config.privacy.key_file.is_none() {
        config.privacy.key = Some(random_hex(32)?);
    }
    Ok(())
}

/// `bytes` random bytes from the kernel, in hex.
fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading random bytes")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The demo cluster's private directory: a new one with a random name, readable by this user
/// only (the peers' configuration files hold the privacy key).
fn demo_dir() -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!("sightline-demo-{}", random_hex(8)?));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The demo cluster's directory, removed at the end.
static DEMO_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Starts processes 1.. of the demo's cluster (`sightline run` on a copy of `config`, written
/// to a private temporary directory), and a thread that sends them SIGTERM once `stop` is set.
fn start_demo_peers(
    config: &Config,
    processes: usize,
    stop: &Arc<AtomicBool>,
    peers: &std::sync::Mutex<Vec<std::process::Child>>,
) -> anyhow::Result<()> {
    if processes <= 1 {
        return Ok(());
    }
    use std::os::unix::fs::OpenOptionsExt;
    let dir = demo_dir()?;
    let exe = std::env::current_exe().context("finding the sightline binary")?;
    let mut started = peers
        .lock()
        .map_err(|_| anyhow::anyhow!("demo peers poisoned"))?;
    for i in 1..processes {
        let mut peer = config.clone();
        peer.cluster.process = Some(i);
        peer.http.listen = Some(String::new());
        let path = dir.join(format!("process-{i}.toml"));
        let text = toml::to_string(&peer).context("writing a peer's configuration")?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        let child = std::process::Command::new(&exe)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting process {i} of the demo cluster"))?;
        println!("demo cluster: process {i} started (pid {})", child.id());
        started.push(child);
    }
    // The peers have read their files once they are connected; the directory goes when the
    // demo ends (wait_for_demo_peers) or, at the latest, with the temporary directory.
    DEMO_DIR.get_or_init(|| dir.clone());
    let pids: Vec<u32> = started.iter().map(|c| c.id()).collect();
    let stop = Arc::clone(stop);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in pids {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    });
    Ok(())
}

/// Waits for the demo cluster's other processes; an error if one did not exit 0.
fn wait_for_demo_peers(peers: &std::sync::Mutex<Vec<std::process::Child>>) -> anyhow::Result<()> {
    let Ok(mut peers) = peers.lock() else {
        anyhow::bail!("demo peers poisoned");
    };
    let mut failed = Vec::new();
    for (i, child) in peers.iter_mut().enumerate() {
        let status = child.wait().context("waiting for a demo process")?;
        if !status.success() {
            failed.push(format!("process {} exited with {status}", i + 1));
        }
    }
    if let Some(dir) = DEMO_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("the demo cluster: {}", failed.join(", "))
    }
}

/// A stop flag set by SIGTERM (what Kubernetes sends), SIGINT (Ctrl-C) or SIGHUP: the run
/// stops reading, writes the windows already closed, commits and exits 0. A second signal
/// exits at once (what was not committed is read again at the next start).
fn stop_on_ctrl_c() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            eprintln!("stopping now: a second stop signal");
            std::process::exit(130);
        }
        eprintln!(
            "stopping: writing closed windows and committing (a second signal exits at once)"
        );
    })
    .context("installing the signal handler")?;
    tracing::info!("{STOP_HANDLED}");
    Ok(stop)
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, workers } => {
            // First, so that a stop during start-up is a clean stop too.
            let stop = stop_on_ctrl_c()?;
            let mut config = Config::load(Some(&config))?;
            if let Some(w) = workers {
                config.pipeline.workers = w;
            }
            config.validate()?;
            config.kafka.read_option_files()?;
            let lake = config.lake.open()?;
            if config.privacy.key_ring()?.is_none() {
                anyhow::bail!(
                    "`run` needs a pseudonymization key: set privacy.key (SIGHTLINE__PRIVACY__KEY) or privacy.key-file"
                );
            }
            let job = Job {
                input: Input::Kafka(config.kafka.clone()),
                config,
                lake,
                stop,
                print_windows: true,
                format: Format::Envelope,
            };
            let telemetry = sightline::http::telemetry_for(&job.config.http);
            if let Some(addr) = sightline::http::start(&job.config.http, Arc::clone(&telemetry))? {
                println!("{}", sightline::http::served_line(addr));
            }
            let summary = sightline::run::run_observed(job, telemetry)?;
            println!("stopped: {summary}");
        }
        Command::Replay {
            input,
            out,
            config,
            workers,
            format,
        } => {
            let mut config = Config::load(config.as_deref())?;
            if let Some(w) = workers {
                config.pipeline.workers = w;
            }
            config.validate()?;
            config.lake.location = out;
            let lake = config.lake.open()?;
            let format = match format {
                InputFormat::Envelope => Format::Envelope,
                InputFormat::Flat => Format::Flat(Default::default()),
            };
            // Progress on standard error: records read of the file's lines.
            let total = (input != "-").then(|| count_lines(&input)).flatten();
            let job = Job {
                input: Input::Ndjson(input),
                config,
                lake,
                stop: Arc::new(AtomicBool::new(false)),
                print_windows: false,
                format,
            };
            let stats = Arc::new(sightline_ingest::source::IngestStats::default());
            let done = Arc::new(AtomicBool::new(false));
            let watcher = {
                let (stats, done) = (Arc::clone(&stats), Arc::clone(&done));
                std::thread::spawn(move || {
                    let mut progress =
                        sightline::progress::Reporter::new("replay", "records", total);
                    while !done.load(Ordering::Relaxed) {
                        progress.update(stats.read.load(Ordering::Relaxed));
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    progress.finish();
                })
            };
            let summary = sightline::run::run_with_stats(job, stats);
            done.store(true, Ordering::Relaxed);
            let _ = watcher.join();
            println!("{}", summary?);
        }
        Command::Schemas {
            command: SchemasCommand::Lint { dir },
        } => match sightline_schemas::lint::lint_dir(&dir) {
            Ok(files) => println!("{}: {files} schema files, no problems", dir.display()),
            Err(problems) => {
                for p in &problems {
                    eprintln!("{p}");
                }
                anyhow::bail!("{} problem(s) in {}", problems.len(), dir.display());
            }
        },
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let config = Config::load(Some(&file))?;
            println!("{}: valid; {}", file.display(), config.summary());
            if config.privacy.key_ring()?.is_none() {
                println!(
                    "note: no privacy.key or privacy.key-file: `run` needs one (SIGHTLINE__PRIVACY__KEY, for example from a Secret)"
                );
            }
        }
        Command::PiiScan {
            target,
            topic,
            config,
        } => {
            let mut config = Config::load(config.as_deref())?;
            config.kafka.read_option_files()?;
            let report = match (target, topic) {
                (_, Some(topic)) => sightline::pii_scan::scan_topic(&config.kafka, &topic)?,
                (Some(target), None) => sightline::pii_scan::scan_lake(&target, &config.lake.s3)?,
                (None, None) => anyhow::bail!("give a lake directory or --topic"),
            };
            println!("{report}");
            if !report.findings.is_empty() {
                std::process::exit(1);
            }
        }
        Command::Generate {
            events,
            out,
            seed,
            rate,
            late_fraction,
            bad_fraction,
            dirty_fraction,
        } => {
            let sink: Box<dyn Write> = if out == "-" {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(std::fs::File::create(&out).with_context(|| format!("creating {out}"))?)
            };
            let mut sink = BufWriter::with_capacity(1 << 20, sink);
            let mut generator = Generator::new(GeneratorConfig {
                seed,
                events_per_second: rate,
                late_fraction,
                bad_fraction,
                dirty_fraction,
                ..GeneratorConfig::default()
            });
            let mut line = Vec::with_capacity(2048);
            let mut progress =
                sightline::progress::Reporter::new("generate", "events", Some(events));
            for i in 0..events {
                line.clear();
                generator.next_line(&mut line);
                line.push(b'\n');
                sink.write_all(&line)?;
                if i % 8192 == 0 {
                    progress.update(i);
                }
            }
            sink.flush()?;
            progress.finish();
        }
        Command::Demo {
            seconds,
            rate,
            out,
            config,
            workers,
            metrics_store,
            processes,
        } => {
            let mut config = Config::load_over(demo_config(), config.as_deref())?;
            if let Some(out) = out {
                config.lake.location = out;
            }
            if let Some(url) = metrics_store {
                config.metrics_store.url = Some(url);
            }
            let out = config.lake.location.clone();
            if let Some(w) = workers {
                config.pipeline.workers = w;
            }
            if processes == 0 {
                anyhow::bail!("--processes must be at least 1");
            }
            if processes > 1 {
                demo_cluster(&mut config, processes)?;
            }
            config.validate()?;
            println!(
                "sightline demo: in-process Kafka (librdkafka mock cluster), topic {} with 4 partitions, {rate} events/s;\n\
                 {} s windows, {} s allowed lateness, {} worker(s){}; writing Parquet to {out}. Ctrl-C stops.",
                sightline::demo::DEMO_TOPIC,
                config.pipeline.window_ms / 1000,
                config.pipeline.allowed_lateness_ms / 1000,
                config.pipeline.workers,
                if processes > 1 {
                    format!(" in each of {processes} processes (a cluster on loopback)")
                } else {
                    String::new()
                },
            );
            if let Some(url) = &config.metrics_store.url {
                println!(
                    "metrics store: every closed window is also sent to {url} (Prometheus remote-write)"
                );
            }
            let options = DemoOptions {
                duration: seconds.map(Duration::from_secs),
                events_per_second: rate,
                config,
                print_windows: true,
                stop: stop_on_ctrl_c()?,
            };
            let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
            let stop = Arc::clone(&options.stop);
            let started = {
                let peers = Arc::clone(&peers);
                move |config: &Config| start_demo_peers(config, processes, &stop, &peers)
            };
            let result = sightline::demo::run_demo_with(options, started);
            let peers_ok = wait_for_demo_peers(&peers);
            let (summary, produced) = result?;
            println!("stopped after producing {produced} events: {summary}");
            peers_ok?;
            println!(
                "query it: duckdb -c \"SELECT * FROM read_parquet('{out}/latency/**/*.parquet', hive_partitioning=true) LIMIT 10\""
            );
        }
    }
    Ok(())
}
