//! The embedded default: an in-process Kafka cluster, a live generator, a local lake.
//!
//! `sightline demo` starts librdkafka's mock cluster (one broker, in this process), creates
//! the topic `telemetry.events` with four partitions, produces generated events to it at a
//! steady rate with event time = now (plus jitter, a few late and a few broken events), and
//! runs the same pipeline as `sightline run` against it, writing to `./sightline-data`. The
//! mock cluster keeps only the recent part of each partition, which is fine for a live demo
//! that consumes while it produces.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::config::{Config, TopicConfig};
use crate::generator::{Generator, GeneratorConfig};
use crate::run::{Input, Job, Summary};

/// The demo's topic.
pub const DEMO_TOPIC: &str = "telemetry.events";
/// The demo's dead-letter topic.
pub const DEMO_DEAD_LETTER_TOPIC: &str = "telemetry.dead-letter";
/// The demo's guardrail-decision topic.
pub const DEMO_GUARDRAIL_TOPIC: &str = "experiments.guardrail-decisions";
/// The demo's sampling-rate topic.
pub const DEMO_SAMPLING_TOPIC: &str = "telemetry.sampling-rates";

/// Settings of a demo run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Stop after this long; `None` runs until `stop` is set.
    pub duration: Option<Duration>,
    /// Events produced per second.
    pub events_per_second: f64,
    /// The configuration; its Kafka section is replaced by the mock cluster's.
    pub config: Config,
    /// Print one line per closed window.
    pub print_windows: bool,
    /// Set to stop (Ctrl-C).
    pub stop: Arc<AtomicBool>,
}

/// The configuration the demo starts from: 10 s windows and 2 s lateness so that progress
/// shows quickly, and two funnels with short conversion windows besides the built-in ones.
pub fn demo_config() -> Config {
    let mut config = Config::default();
    config.pipeline.window_ms = 10_000;
    config.pipeline.allowed_lateness_ms = 2_000;
    config.pipeline.idle_timeout_ms = 2_000;
    config.analytics.save_state_every_ms = 10_000;
    // A rate table every 30 s, for a budget of a quarter of the demo's 2000 events/s.
    config.sampling.interval_windows = 3;
    config.sampling.budget_events_per_second = 500.0;
    // The built-in funnels write a row 30 minutes (or 30 days) after its entry window; these
    // two write theirs within two minutes, so that the demo shows the funnels table.
    use crate::analytics::steps;
    config.funnels = vec![
        crate::analytics::FunnelConfig {
            name: "demo_project_creation".into(),
            unit: "user_id".into(),
            steps: steps(&["project_viewed", "project_created", "task_assigned"]),
            conversion_window_ms: 90_000,
            order: "ordered".into(),
            exclusions: Vec::new(),
            breakdowns: vec!["experiments".into(), "platform".into()],
        },
        crate::analytics::FunnelConfig {
            name: "demo_command_queue".into(),
            unit: "properties.recommendation_id".into(),
            steps: steps(&[
                "recommendation_generated",
                "recommendation_accepted",
                "action_executed",
                "outcome_reply_received",
            ]),
            conversion_window_ms: 120_000,
            order: "ordered".into(),
            exclusions: Vec::new(),
            breakdowns: vec!["properties.action_type".into()],
        },
    ];
    // The generator's two experiments: `exp_guided_setup` is healthy, in two rollout phases
    // (a stratum each; equal weights in both); in `exp_aps_ranking_v2`, `variant_b`'s actions
    // turn three times slower a minute in, and its p95-latency guardrail kills it within a few
    // minutes (three breached intervals of 30 s).
    let experiment = |id: &str, arms: &[&str]| crate::experiments::ExperimentConfig {
        id: id.into(),
        arms: arms
            .iter()
            .map(|a| crate::experiments::ArmConfig {
                name: (*a).into(),
                weight: 1.0,
            })
            .collect(),
        control: Some("control".into()),
        alpha: 0.05,
        planned_units: 2_000,
        min_units: 50,
        sampling_interval_windows: 3,
        metrics: Vec::new(),
        guardrails: None,
        primary: Some("project_creation_conversion".into()),
        srm_kills: false,
        tenants: None,
        phases: Vec::new(),
        rollout: Vec::new(),
    };
    // CUPED with a lookback the demo can show: the minute before a unit's exposure, in 10 s
    // periods (`exp_guided_setup` starts 20 s in, so its units have a history).
    config.analytics.cuped_lookback_ms = 60_000;
    config.analytics.cuped_period_ms = 10_000;
    let mut guided = experiment("exp_guided_setup", &["control", "treatment"]);
    let start = now_ms().max(0) as u64;
    guided.phases = [("first", start), ("second", start + 120_000)]
        .into_iter()
        .map(|(name, start_ms)| crate::experiments::PhaseConfig {
            name: name.into(),
            start_ms,
            arms: guided.arms.clone(),
        })
        .collect();
    // A rollout by tenant that is not randomised (`action_retries`): the generator's cohorts
    // of tenants get it a minute and two minutes in, and their actions fail more from then on;
    // `experiment_did` compares their change with the other tenants'.
    let mut rollout = experiment("action_retries", &[]);
    rollout.control = None;
    rollout.primary = None;
    rollout.rollout = crate::generator::ROLLOUT
        .iter()
        .map(|(after, tenants)| crate::experiments::CohortConfig {
            start_ms: start + *after as u64,
            tenants: tenants
                .iter()
                .map(|t| crate::generator::tenant_id(*t))
                .collect(),
        })
        .collect();
    config.experiments = vec![
        guided,
        experiment("exp_aps_ranking_v2", &["control", "variant_a", "variant_b"]),
        rollout,
    ];
    config
}

/// Runs the demo; returns the pipeline's summary and the number of events produced.
pub fn run_demo(options: DemoOptions) -> anyhow::Result<(Summary, u64)> {
    run_demo_with(options, |_| Ok(()))
}

/// [`run_demo`], calling `before_run` with the final configuration (the mock cluster's
/// brokers in it) just before the pipeline starts: `sightline demo --processes N` starts the
/// cluster's other processes there.
pub fn run_demo_with(
    options: DemoOptions,
    before_run: impl FnOnce(&Config) -> anyhow::Result<()>,
) -> anyhow::Result<(Summary, u64)> {
    let cluster = MockCluster::new(1).context("starting the mock Kafka cluster")?;
    cluster
        .create_topic(DEMO_TOPIC, 4, 1)
        .context("creating the demo topic")?;
    cluster
        .create_topic(DEMO_DEAD_LETTER_TOPIC, 1, 1)
        .context("creating the demo dead-letter topic")?;
    cluster
        .create_topic(DEMO_GUARDRAIL_TOPIC, 1, 1)
        .context("creating the demo guardrail topic")?;
    cluster
        .create_topic(DEMO_SAMPLING_TOPIC, 1, 1)
        .context("creating the demo sampling topic")?;
    let bootstrap = cluster.bootstrap_servers();

    let mut config = options.config.clone();
    config.kafka.bootstrap_servers = bootstrap;
    config.kafka.topics = vec![TopicConfig::envelope(DEMO_TOPIC)];
    config.kafka.group_id = "sightline-demo".into();
    config.kafka.dead_letter_topic = Some(DEMO_DEAD_LETTER_TOPIC.into());
    config.kafka.guardrail_topic = Some(DEMO_GUARDRAIL_TOPIC.into());
    config.kafka.sampling_topic = Some(DEMO_SAMPLING_TOPIC.into());
    config.kafka.commit_interval_ms = 1_000;

    let stop = Arc::clone(&options.stop);
    let produced = Arc::new(AtomicU64::new(0));
    let producer_thread = {
        let (stop, produced) = (Arc::clone(&stop), Arc::clone(&produced));
        let client = config.kafka.client_config(&[
            ("linger.ms", "5"),
            ("queue.buffering.max.messages", "200000"),
        ]);
        let rate = options.events_per_second;
        std::thread::Builder::new()
            .name("demo-producer".into())
            .spawn(move || produce_live(&client, rate, &stop, &produced))?
    };
    if let Some(duration) = options.duration {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let deadline = Instant::now() + duration;
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
    let lake = config.lake.open()?;
    if let Err(e) = before_run(&config) {
        stop.store(true, Ordering::Relaxed);
        let _ = producer_thread.join();
        return Err(e);
    }
    let job = Job {
        config: config.clone(),
        input: Input::Kafka(config.kafka.clone()),
        lake,
        stop: Arc::clone(&stop),
        print_windows: options.print_windows,
        format: Default::default(),
    };
    let telemetry = crate::http::telemetry_for(&config.http);
    let summary = match crate::http::start(&config.http, Arc::clone(&telemetry)) {
        Ok(served) => {
            if let Some(addr) = served
                && options.print_windows
            {
                println!("{}", crate::http::served_line(addr));
            }
            crate::run::run_observed(job, telemetry)
        }
        Err(e) => Err(e),
    };
    stop.store(true, Ordering::Relaxed);
    let produce_result = producer_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the demo producer panicked"))?;
    drop(cluster);
    produce_result?;
    Ok((summary?, produced.load(Ordering::Relaxed)))
}

fn now_ms() -> i64 {
    sightline_schemas::wall_clock_ms() as i64
}

/// Produces generated events at `rate` per second, event time following the wall clock.
fn produce_live(
    client: &ClientConfig,
    rate: f64,
    stop: &AtomicBool,
    produced: &AtomicU64,
) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> =
        client.create().context("creating the demo producer")?;
    let mut generator = Generator::new(GeneratorConfig {
        seed: now_ms() as u64,
        start_ms: now_ms(),
        events_per_second: rate,
        ..GeneratorConfig::default()
    });
    let started = Instant::now();
    let mut line = Vec::with_capacity(2048);
    while !stop.load(Ordering::Relaxed) {
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while generator.emitted() < due && !stop.load(Ordering::Relaxed) {
            line.clear();
            generator.next_line(&mut line);
            loop {
                match producer.send(BaseRecord::<(), [u8]>::to(DEMO_TOPIC).payload(&line)) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err((err, _)) => return Err(err).context("producing a demo event"),
                }
            }
            produced.fetch_add(1, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = producer.flush(Duration::from_secs(2));
    Ok(())
}
