//! Configuration: one serde tree, loaded in layers.
//!
//! Layers, later ones winning: the built-in defaults below, then the TOML file given with
//! `--config`, then environment variables `SIGHTLINE__<SECTION>__<KEY>` (for example
//! `SIGHTLINE__PIPELINE__WORKERS=2` or `SIGHTLINE__LAKE__LOCATION=/data/lake`; `_` in a key
//! stands for `-`). Unknown keys are errors. `sightline.example.toml` at the repository root
//! shows every key with its default.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    /// Dataflow settings: workers, windows, lateness.
    pub pipeline: PipelineConfig,
    /// The Kafka source (used by `run`).
    pub kafka: KafkaConfig,
    /// Where closed windows are written.
    pub lake: LakeConfig,
    /// Pseudonymization keys.
    pub privacy: PrivacyConfig,
    /// How the sinks retry failed deliveries.
    pub delivery: DeliveryConfig,
    /// Product-analytics switches (the built-in funnels).
    pub analytics: crate::analytics::AnalyticsConfig,
    /// Conversion funnels (`[[funnels]]`), after the built-in ones.
    pub funnels: Vec<crate::analytics::FunnelConfig>,
    /// The integration alert rules.
    pub alerts: crate::analytics::AlertsConfig,
    /// P1 triage of critical feedback.
    pub triage: crate::analytics::TriageConfig,
    /// Experiments (`[[experiments]]`).
    pub experiments: Vec<crate::experiments::ExperimentConfig>,
    /// Adaptive telemetry budgets (`[sampling]`).
    pub sampling: crate::sampling::SamplingConfig,
    /// The metrics store (Prometheus remote-write); off unless `url` is set.
    pub metrics_store: MetricsStoreConfig,
    /// The pipeline's own endpoints (`/metrics`, `/healthz`, `/readyz`), for `run` and `demo`.
    pub http: HttpConfig,
    /// The processes of a multi-process run (`[cluster]`); absent: one process.
    pub cluster: crate::cluster::ClusterConfig,
}

/// Where `run` and `demo` serve the dashboard page (`/`, `/api/status`, `/api/board`),
/// `/metrics`, `/healthz` and `/readyz`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `host:port`. Absent: `127.0.0.1:9464` when it is free (a warning when it is not); an
    /// empty string: no server. An address that cannot be served stops the start.
    pub listen: Option<String>,
}

/// The metrics store: every exported table's closed windows as Prometheus remote-write 1.0
/// samples (see `sightline_sinks::remote_write` for the naming and delivery). Off unless `url`
/// is set. Not part of the durability frontier: an outage of the store never holds back the
/// lake or the Kafka offsets; samples wait in a bounded queue, and what overflows is counted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct MetricsStoreConfig {
    /// The remote-write endpoint, `http(s)://host:port/api/v1/write` for Prometheus.
    pub url: Option<String>,
    /// Extra request headers.
    pub headers: BTreeMap<String, String>,
    /// A file holding a bearer token, sent as `Authorization: Bearer <token>`.
    pub bearer_token_file: Option<String>,
    /// Samples per request, at most.
    pub max_samples_per_request: usize,
    /// Samples queued while the store is slow or down, at most; the oldest are dropped (and
    /// counted) beyond.
    pub buffer_samples: usize,
    /// Time allowed for one request, ms.
    pub timeout_ms: u64,
    /// How long a stop waits for the queue to be sent, ms.
    pub finish_timeout_ms: u64,
}

impl Default for MetricsStoreConfig {
    fn default() -> Self {
        MetricsStoreConfig {
            url: None,
            headers: BTreeMap::new(),
            bearer_token_file: None,
            max_samples_per_request: 2_000,
            buffer_samples: 1_000_000,
            timeout_ms: 10_000,
            finish_timeout_ms: 15_000,
        }
    }
}

impl MetricsStoreConfig {
    /// The sender's options, checked (with every field named in what it refuses); `None`
    /// when no `url` is set.
    pub fn options(
        &self,
    ) -> anyhow::Result<Option<sightline_sinks::remote_write::RemoteWriteOptions>> {
        let Some(url) = &self.url else {
            return Ok(None);
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("metrics-store.url (`{url}`) must be an http:// or https:// URL");
        }
        if self.max_samples_per_request == 0 {
            bail!("metrics-store.max-samples-per-request must be at least 1");
        }
        if self.buffer_samples < self.max_samples_per_request {
            bail!(
                "metrics-store.buffer-samples ({}) must hold at least one request (metrics-store.max-samples-per-request, {})",
                self.buffer_samples,
                self.max_samples_per_request
            );
        }
        if self.timeout_ms == 0 {
            bail!("metrics-store.timeout-ms must be positive");
        }
        let mut headers: Vec<(String, String)> = Vec::new();
        for (name, value) in &self.headers {
            if name.trim().is_empty() || name.contains(|c: char| c.is_whitespace() || c == ':') {
                bail!("metrics-store.headers: `{name}` is not a header name");
            }
            headers.push((name.clone(), value.clone()));
        }
        if let Some(path) = &self.bearer_token_file {
            let token = std::fs::read_to_string(path).with_context(|| {
                format!("metrics-store.bearer-token-file: cannot read `{path}`")
            })?;
            let token = token.trim();
            if token.is_empty() {
                bail!("metrics-store.bearer-token-file: `{path}` is empty");
            }
            headers.push(("Authorization".into(), format!("Bearer {token}")));
        }
        Ok(Some(sightline_sinks::remote_write::RemoteWriteOptions {
            url: url.clone(),
            headers,
            max_samples_per_request: self.max_samples_per_request,
            buffer_samples: self.buffer_samples,
            timeout: std::time::Duration::from_millis(self.timeout_ms),
            min_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(5),
        }))
    }
}

/// How the sinks retry a failed delivery (a lake write, a batch of records on a topic). A
/// sink never drops what it could not deliver: it retries with exponential backoff and holds
/// back the offsets that depend on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Delay before the first retry, ms.
    pub retry_initial_ms: u64,
    /// Longest delay between two attempts, ms; the delay doubles up to it.
    pub retry_max_ms: u64,
    /// How long a sink may fail with errors that will not heal by themselves (bad
    /// credentials, a deleted bucket), with no success in between, before the pipeline stops
    /// with that error, ms. Transient failures (an unreachable broker or store, a full disk)
    /// are retried for as long as they last.
    pub give_up_after_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            retry_initial_ms: 100,
            retry_max_ms: 30_000,
            give_up_after_ms: 300_000,
        }
    }
}

impl DeliveryConfig {
    /// The sinks' retry policy.
    pub fn retry_policy(&self) -> sightline_sinks::RetryPolicy {
        sightline_sinks::RetryPolicy {
            initial: std::time::Duration::from_millis(self.retry_initial_ms),
            max: std::time::Duration::from_millis(self.retry_max_ms),
            give_up_after: std::time::Duration::from_millis(self.give_up_after_ms),
        }
    }
}

/// Dataflow settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Worker threads in this process.
    pub workers: usize,
    /// Width of the tumbling event-time windows, ms. Must be a multiple of `tick-ms`.
    pub window_ms: u64,
    /// How far behind the newest event time an event may arrive and still count, ms.
    pub allowed_lateness_ms: u64,
    /// Granularity of dataflow timestamps, ms.
    pub tick_ms: u64,
    /// After this long without records a partition follows the wall clock, ms.
    pub idle_timeout_ms: u64,
    /// Largest accepted record, bytes; larger ones are rejected as `oversize`.
    pub max_event_bytes: usize,
    /// How far ahead of the time the record was produced (its Kafka timestamp; the wall clock
    /// for files) an event time may be, ms. Later ones are rejected as
    /// `invalid_value`, so that one bad clock cannot push the watermark into the future.
    pub max_future_skew_ms: u64,
    /// Records a source worker reads per activation. Every operator downstream reads the
    /// batch's events once it is decoded, so a batch small enough to stay in the core's
    /// second-level cache (256 records of about 1 KB and their events) saves each of them a
    /// miss per event (benches/README.md, "Source batch size, by second-level misses").
    pub batch_size: usize,
    /// How long a stop (SIGTERM, Ctrl-C) may take to write the windows that are already
    /// closed and commit the offsets they cover, ms. Past it the pipeline exits anyway;
    /// what was not written is read again at the next start.
    pub shutdown_grace_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            workers: 1,
            window_ms: 60_000,
            allowed_lateness_ms: 10_000,
            tick_ms: 1_000,
            idle_timeout_ms: 5_000,
            max_event_bytes: sightline_ingest::DEFAULT_MAX_EVENT_BYTES,
            max_future_skew_ms: 3_600_000,
            batch_size: 256,
            shutdown_grace_ms: 20_000,
        }
    }
}

/// One input topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TopicConfig {
    /// Topic name.
    pub name: String,
    /// Record layout: `envelope` (the platform spec's canonical envelope) or `flat` (the
    /// command-center spec's records: `event`, `timestamp`, optional `user_id`, properties at
    /// the top level).
    #[serde(default)]
    pub format: TopicFormat,
    /// Envelope values for `flat` records (tenant, source, platform, …).
    #[serde(default)]
    pub defaults: sightline_ingest::FlatDefaults,
}

impl TopicConfig {
    /// A topic in the canonical envelope format.
    pub fn envelope(name: &str) -> TopicConfig {
        TopicConfig {
            name: name.to_owned(),
            format: TopicFormat::Envelope,
            defaults: Default::default(),
        }
    }

    /// The decoder format of this topic.
    pub fn decoder_format(&self) -> sightline_ingest::Format {
        match self.format {
            TopicFormat::Envelope => sightline_ingest::Format::Envelope,
            TopicFormat::Flat => sightline_ingest::Format::Flat(self.defaults.clone()),
        }
    }
}

/// Record layout of a topic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TopicFormat {
    /// The canonical envelope.
    #[default]
    Envelope,
    /// Flat records with envelope defaults.
    Flat,
}

/// Pseudonymization keys. The secret comes from `key` (best set through the environment:
/// `SIGHTLINE__PRIVACY__KEY`) or from `key-file`; never from code. `sightline run` refuses to
/// start without one; `demo` and `replay` use a random key for the run when none is set (their
/// pseudonyms then differ between runs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Names the secret; pseudonyms carry `<key-id>.<period>`. Change it with the secret.
    pub key_id: String,
    /// The secret, hex (at least 32 hex digits).
    pub key: Option<String>,
    /// A file holding the hex secret.
    pub key_file: Option<std::path::PathBuf>,
    /// Days of event time per key period: pseudonyms change every period.
    pub rotation_days: u32,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            key_id: "k1".into(),
            key: None,
            key_file: None,
            rotation_days: sightline_privacy::DEFAULT_ROTATION_DAYS,
        }
    }
}

impl PrivacyConfig {
    /// The configured key ring, or `None` when no secret is configured.
    pub fn key_ring(&self) -> anyhow::Result<Option<sightline_privacy::KeyRing>> {
        use sightline_privacy::KeyRing;
        Ok(match (&self.key, &self.key_file) {
            (Some(_), Some(_)) => bail!("set privacy.key or privacy.key-file, not both"),
            (Some(hex), None) => Some(KeyRing::from_hex(&self.key_id, hex, self.rotation_days)?),
            (None, Some(path)) => Some(KeyRing::from_file(&self.key_id, path, self.rotation_days)?),
            (None, None) => None,
        })
    }
}

/// The Kafka source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// Consumer group under which offsets are committed.
    pub group_id: String,
    /// Topics to read; their partitions are spread over all workers.
    pub topics: Vec<TopicConfig>,
    /// How often durable offsets are committed, ms.
    pub commit_interval_ms: u64,
    /// How long to wait for the topics to appear at start-up, ms.
    pub metadata_timeout_ms: u64,
    /// Extra librdkafka properties for every Kafka client: the consumer, the producers and
    /// `pii-scan` (for example `security.protocol`). They override the pipeline's own settings,
    /// except `acks`: producers always use `acks=all`, which their delivery contract needs.
    pub options: BTreeMap<String, String>,
    /// librdkafka properties whose values are read from files when a client is made (`run`,
    /// `pii-scan`): secrets mounted from a Kubernetes Secret, such as `sasl.password` or
    /// `ssl.key.password`. Surrounding whitespace is trimmed. A key may not also be in
    /// `options`; the values are never written anywhere nor logged.
    pub option_files: BTreeMap<String, std::path::PathBuf>,
    /// The values read from `option_files` ([`KafkaConfig::read_option_files`]).
    #[serde(skip)]
    pub secrets: Secrets,
    /// Topic that receives one JSON record per dead letter (unset: dead letters go to the
    /// `dead_letter` table only).
    pub dead_letter_topic: Option<String>,
    /// Topic that receives one JSON record per alert state change, keyed by route, rule,
    /// subject and window (unset: the `alerts` table only).
    pub alerts_topic: Option<String>,
    /// Topic that receives one JSON record per P1 triage item, keyed by the feedback's
    /// `event_id` (unset: the `triage` table only).
    pub triage_topic: Option<String>,
    /// Topic for guardrail decisions (`kill`, `hold`, `advance`), if any.
    pub guardrail_topic: Option<String>,
    /// Topic that receives each interval's sampling-rate table, one JSON record per segment
    /// keyed by the segment (a compacted topic keeps the latest table); unset: the
    /// `sampling_budgets` table only.
    pub sampling_topic: Option<String>,
}

impl KafkaConfig {
    /// The librdkafka settings of one client of the pipeline (the consumer, a producer,
    /// `pii-scan`): the brokers, then the settings of the client's `role`, then `options`,
    /// which win, so that a deployment can override anything (but a producer's `acks`).
    pub fn client_config(&self, role: &[(&str, &str)]) -> rdkafka::ClientConfig {
        let mut client = rdkafka::ClientConfig::new();
        client.set("bootstrap.servers", &self.bootstrap_servers);
        for (key, value) in role {
            client.set(*key, *value);
        }
        for (key, value) in &self.options {
            client.set(key, value);
        }
        for (key, value) in &self.secrets.0 {
            client.set(key, value);
        }
        client
    }

    /// Reads `option_files` into [`KafkaConfig::secrets`]; an unreadable file is an error that
    /// names its key.
    pub fn read_option_files(&mut self) -> anyhow::Result<()> {
        self.secrets.0 = self
            .option_files
            .iter()
            .map(|(key, path)| {
                let value = std::fs::read_to_string(path)
                    .map(|v| v.trim().to_owned())
                    .with_context(|| {
                        format!("kafka.option-files.\"{key}\": reading {}", path.display())
                    })?;
                if value.is_empty() {
                    bail!("kafka.option-files.\"{key}\": {} is empty", path.display());
                }
                Ok((key.clone(), value))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(())
    }

    /// What the Kafka source reads: the consumer's settings (group, the reader's own
    /// [`KafkaReader::CONSUMER_SETTINGS`], then `options`), the topics, and the intervals.
    ///
    /// [`KafkaReader::CONSUMER_SETTINGS`]: sightline_ingest::source::kafka::KafkaReader::CONSUMER_SETTINGS
    pub fn source(&self) -> sightline_ingest::source::kafka::KafkaSource {
        use sightline_ingest::source::kafka::{KafkaReader, KafkaSource};
        let mut role = vec![("group.id", self.group_id.as_str())];
        role.extend(KafkaReader::CONSUMER_SETTINGS);
        KafkaSource {
            client: self.client_config(&role),
            topics: self.topics.iter().map(|t| t.name.clone()).collect(),
            commit_interval: std::time::Duration::from_millis(self.commit_interval_ms),
            metadata_timeout: std::time::Duration::from_millis(self.metadata_timeout_ms),
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "localhost:9092".into(),
            group_id: "sightline".into(),
            topics: vec![TopicConfig::envelope("telemetry.events")],
            commit_interval_ms: 5_000,
            metadata_timeout_ms: 30_000,
            options: BTreeMap::new(),
            option_files: BTreeMap::new(),
            secrets: Secrets::default(),
            dead_letter_topic: None,
            alerts_topic: None,
            triage_topic: None,
            guardrail_topic: None,
            sampling_topic: None,
        }
    }
}

/// librdkafka settings read from files (`kafka.option-files`): shown as their keys only.
#[derive(Clone, Default, PartialEq)]
pub struct Secrets(pub BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Where closed windows are written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct LakeConfig {
    /// A directory, `file:///abs/dir`, `s3://bucket/prefix`, or `memory://`.
    pub location: String,
    /// Settings of `s3://` locations; unset fields come from the `AWS_*` environment.
    pub s3: sightline_sinks::S3Options,
    /// Days aggregate tables are kept (Parquet metadata `sightline.retention_days`, S3 tag
    /// `retention-days`).
    pub aggregate_retention_days: u32,
    /// Days per-record tables (`dead_letter`) are kept.
    pub raw_retention_days: u32,
    /// Prefix under which everything derived from restricted records is written
    /// (`data_sensitivity: restricted` or `pii_classification: high`).
    pub restricted_prefix: String,
    /// Days restricted data is kept.
    pub restricted_retention_days: u32,
}

impl Default for LakeConfig {
    fn default() -> Self {
        LakeConfig {
            location: "./sightline-data".into(),
            s3: sightline_sinks::S3Options::default(),
            aggregate_retention_days: 365,
            raw_retention_days: 90,
            restricted_prefix: "restricted".into(),
            restricted_retention_days: 30,
        }
    }
}

impl LakeConfig {
    /// Opens the configured lake (the standard route).
    pub fn open(&self) -> anyhow::Result<sightline_sinks::Lake> {
        let lake = sightline_sinks::Lake::open_with(&self.location, &self.s3)
            .with_context(|| format!("opening the lake at {}", self.location))?;
        Ok(lake.with_retention(sightline_sinks::Retention {
            aggregates_days: self.aggregate_retention_days,
            raw_days: self.raw_retention_days,
        }))
    }
}

impl Config {
    /// The funnels this configuration runs, checked and compiled.
    pub fn funnel_defs(&self) -> anyhow::Result<Vec<sightline_operators::funnel::FunnelDef>> {
        crate::analytics::funnel_defs(&self.analytics, &self.funnels, self.pipeline.tick_ms)
    }

    /// Loads defaults, then `file` if given, then `SIGHTLINE__*` environment variables.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        Config::load_over(Config::default(), file)
    }

    /// Loads `base` (instead of the built-in defaults), then `file` if given, then
    /// `SIGHTLINE__*` environment variables. The demo starts from its own base this way.
    pub fn load_over(base: Config, file: Option<&Path>) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(base));
        if let Some(file) = file {
            if !file.exists() {
                bail!("config file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(
            Env::prefixed("SIGHTLINE__")
                .map(|key| key.as_str().replace("__", ".").replace('_', "-").into()),
        );
        let config: Config = figment.extract().context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    /// One line on what this configuration runs (for `sightline config check`).
    pub fn summary(&self) -> String {
        let topics: Vec<&str> = self.kafka.topics.iter().map(|t| t.name.as_str()).collect();
        format!(
            "{} worker(s), {} ms windows, topics [{}] from {}, lake {}, {} funnel(s), {} experiment(s){}{}",
            self.pipeline.workers,
            self.pipeline.window_ms,
            topics.join(", "),
            self.kafka.bootstrap_servers,
            self.lake.location,
            self.funnel_defs().map_or(0, |f| f.len()),
            self.experiments.len(),
            if self.metrics_store.url.is_some() {
                ", remote-write on"
            } else {
                ""
            },
            if self.kafka.sampling_topic.is_some() {
                ", sampling topic on"
            } else {
                ""
            },
        ) + &match self.cluster.addresses().map(|a| a.len()) {
            Ok(n) if n > 1 => format!(", a cluster of {n} processes"),
            _ => String::new(),
        }
    }

    /// Checks the relations between fields.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.metrics_store.options()?;
        let p = &self.pipeline;
        if p.workers == 0 {
            bail!("pipeline.workers must be at least 1");
        }
        if p.tick_ms == 0 || p.window_ms == 0 || !p.window_ms.is_multiple_of(p.tick_ms) {
            bail!(
                "pipeline.window-ms ({}) must be a positive multiple of pipeline.tick-ms ({})",
                p.window_ms,
                p.tick_ms
            );
        }
        if p.batch_size == 0 {
            bail!("pipeline.batch-size must be at least 1");
        }
        let d = &self.delivery;
        if d.retry_initial_ms == 0 || d.retry_max_ms < d.retry_initial_ms {
            bail!(
                "delivery.retry-initial-ms ({}) must be positive and at most delivery.retry-max-ms ({})",
                d.retry_initial_ms,
                d.retry_max_ms
            );
        }
        for key in self.kafka.option_files.keys() {
            if self.kafka.options.contains_key(key) {
                bail!(
                    "kafka.options.{key:?} and kafka.option-files.{key:?} are both set: give one of them"
                );
            }
        }
        for (key, value) in sightline_ingest::source::kafka::KafkaReader::CONSUMER_SETTINGS {
            if let Some(given) = self.kafka.options.get(key)
                && given != value
            {
                bail!(
                    "kafka.options.{key} = {given:?} is not allowed: the source's exactly-once contract needs {key} = {value:?}"
                );
            }
        }
        let mut names: Vec<&str> = self.kafka.topics.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
            bail!("kafka.topics lists `{}` twice", pair[0]);
        }
        if self
            .kafka
            .dead_letter_topic
            .as_deref()
            .is_some_and(|dlq| names.contains(&dlq))
        {
            bail!("kafka.dead-letter-topic must not be one of the input topics");
        }
        for (key, topic) in [
            ("alerts-topic", &self.kafka.alerts_topic),
            ("triage-topic", &self.kafka.triage_topic),
            ("guardrail-topic", &self.kafka.guardrail_topic),
            ("sampling-topic", &self.kafka.sampling_topic),
        ] {
            if topic.as_deref().is_some_and(|t| names.contains(&t)) {
                bail!("kafka.{key} must not be one of the input topics");
            }
        }
        if self.lake.restricted_prefix.trim_matches('/').is_empty() {
            bail!("lake.restricted-prefix must not be empty: restricted data is kept apart");
        }
        self.privacy.key_ring().context("privacy")?;
        self.cluster.check()?;
        self.alerts.validate()?;
        self.triage.validate()?;
        if self.analytics.save_state_every_ms == 0 {
            bail!("analytics.save-state-every-ms must be positive");
        }
        self.funnel_defs()?;
        self.experiment_setup(&mut |_| 1)?;
        self.sampling.rules(&self.experiments)?;
        Ok(())
    }

    /// The experiments this configuration analyses, checked; `link` gives the unit link of a
    /// tenant id (for allowlists).
    pub fn experiment_setup(
        &self,
        link: &mut dyn FnMut(&str) -> u64,
    ) -> anyhow::Result<sightline_operators::experiment::Setup> {
        let (lookback, period) = (
            self.analytics.cuped_lookback_ms,
            self.analytics.cuped_period_ms,
        );
        if lookback > 0 && (period == 0 || !lookback.is_multiple_of(period)) {
            anyhow::bail!(
                "analytics.cuped-lookback-ms ({lookback}) must be a multiple of analytics.cuped-period-ms ({period})"
            );
        }
        if lookback > 0 && lookback / period > 1000 {
            anyhow::bail!(
                "analytics.cuped-lookback-ms ({lookback}) spans more than 1000 periods of analytics.cuped-period-ms ({period})"
            );
        }
        let mut setup = crate::experiments::setup(
            &self.experiments,
            self.analytics.experiments,
            &self.triage.rules(),
            link,
        )?;
        // The saved histories depend on the lookback: it is part of the definition.
        setup.lookback = (lookback > 0).then(|| sightline_operators::experiment::Lookback {
            periods: (lookback / period) as u32,
            period_ms: period,
        });
        // Rollouts by tenant read their values per CUPED period, over its lookback before each
        // cohort's start (14 days when CUPED is off).
        if let Some(l) = setup.lookback {
            for rollout in setup.defs.iter_mut().filter_map(|d| d.rollout.as_mut()) {
                rollout.lookback = l;
            }
        }
        setup.definition ^= (lookback ^ period.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Ok(setup)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "s.toml",
                "[pipeline]\nworkers = 3\nwindow-ms = 30000\n[lake]\nlocation = \"/tmp/x\"\n",
            )?;
            jail.set_env("SIGHTLINE__PIPELINE__WORKERS", "2");
            jail.set_env("SIGHTLINE__PIPELINE__ALLOWED_LATENESS_MS", "5000");
            let config = Config::load(Some(Path::new("s.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.pipeline.workers, 2);
            assert_eq!(config.pipeline.window_ms, 30_000);
            assert_eq!(config.pipeline.allowed_lateness_ms, 5_000);
            assert_eq!(config.lake.location, "/tmp/x");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_relations_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[pipeline]\nworkerz = 3\n")?;
            assert!(Config::load(Some(Path::new("bad.toml"))).is_err());
            jail.create_file("bad2.toml", "[pipeline]\nwindow-ms = 1500\n")?;
            assert!(Config::load(Some(Path::new("bad2.toml"))).is_err());
            Ok(())
        });
    }

    /// Loads and validates `text` as a configuration file; the error must name `field`.
    fn assert_refused_naming(text: &str, field: &str) {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", text)?;
            let err = Config::load(Some(Path::new("c.toml")))
                .and_then(|c| c.validate().map(|()| c))
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            assert!(err.contains(field), "`{err}` should name {field}");
            Ok(())
        });
    }

    #[test]
    fn a_bad_metrics_store_is_refused_with_the_field_named() {
        for (text, field) in [
            ("[metrics-store]\nurl = \"ftp://x\"\n", "metrics-store.url"),
            (
                "[metrics-store]\nurl = \"http://x/api/v1/write\"\nbearer-token-file = \"/nonexistent/token\"\n",
                "metrics-store.bearer-token-file",
            ),
            (
                "[metrics-store]\nurl = \"http://x/api/v1/write\"\nbuffer-samples = 10\n",
                "metrics-store.buffer-samples",
            ),
            (
                "[metrics-store]\nurl = \"http://x/api/v1/write\"\nheaders = { \"a b\" = \"c\" }\n",
                "metrics-store.headers",
            ),
        ] {
            assert_refused_naming(text, field);
        }
    }

    #[test]
    fn bad_cluster_and_option_files_are_refused_with_the_field_named() {
        for (text, field) in [
            (
                "[cluster]\nprocesses = [\"a:1\", \"b\"]\n",
                "cluster.processes[1]",
            ),
            (
                "[cluster]\nprocesses = [\"a:1\", \"b:1\"]\nprocess = 2\n",
                "cluster.process",
            ),
            (
                "[cluster]\nprocesses = [\"a:1\"]\nhostfile = \"/h\"\n",
                "cluster.hostfile",
            ),
            (
                "[cluster]\nconnect-timeout-ms = 0\n",
                "cluster.connect-timeout-ms",
            ),
            (
                "[kafka.options]\n\"sasl.password\" = \"x\"\n[kafka.option-files]\n\"sasl.password\" = \"/p\"\n",
                "kafka.option-files",
            ),
        ] {
            assert_refused_naming(text, field);
        }
    }

    #[test]
    fn option_files_are_read_and_never_shown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cr3t-value\n").expect("write");
        let mut kafka = KafkaConfig::default();
        kafka.option_files.insert("sasl.password".into(), file);
        kafka.read_option_files().expect("read");
        assert_eq!(
            kafka.client_config(&[]).get("sasl.password"),
            Some("s3cr3t-value")
        );
        assert!(!format!("{kafka:?}").contains("s3cr3t"));
        kafka
            .option_files
            .insert("ssl.key.password".into(), dir.path().join("missing"));
        let err = format!("{:#}", kafka.read_option_files().unwrap_err());
        assert!(
            err.contains("kafka.option-files.\"ssl.key.password\""),
            "{err}"
        );
    }

    /// librdkafka refuses, when a client is made, a security protocol or SASL mechanism it was
    /// built without: this build has TLS and SCRAM, PLAIN and OAUTHBEARER, and no GSSAPI.
    #[test]
    fn the_kafka_client_is_built_with_tls_and_sasl() {
        use rdkafka::consumer::BaseConsumer;
        let client = |protocol: &str, mechanism: &str| {
            let mut kafka = KafkaConfig::default();
            for (k, v) in [
                ("security.protocol", protocol),
                ("sasl.mechanism", mechanism),
                ("sasl.username", "u"),
                ("sasl.password", "p"),
                ("enable.sasl.oauthbearer.unsecure.jwt", "true"),
            ] {
                kafka.options.insert(k.into(), v.into());
            }
            kafka
                .client_config(&[("group.id", "g")])
                .create::<BaseConsumer>()
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN", "OAUTHBEARER"] {
            for protocol in ["SASL_SSL", "SASL_PLAINTEXT"] {
                assert_eq!(
                    client(protocol, mechanism),
                    Ok(()),
                    "{protocol} {mechanism}"
                );
            }
        }
        assert_eq!(client("SSL", "PLAIN"), Ok(()));
        let gssapi = client("SASL_SSL", "GSSAPI");
        assert!(gssapi.is_err(), "GSSAPI needs Cyrus SASL: {gssapi:?}");
    }

    #[test]
    fn the_example_file_lists_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sightline.example.toml");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let parsed: Config = Figment::from(Toml::string(&text))
            .extract()
            .unwrap_or_else(|e| panic!("example config: {e}"));
        assert_eq!(
            parsed,
            Config::default(),
            "sightline.example.toml must hold the defaults"
        );
        // Same keys, not just the same values: a key missing from the file would be filled in
        // by `#[serde(default)]`. (Keys whose default is unset are documented as comments.)
        let example: figment::value::Dict = Figment::from(Toml::string(&text)).extract().unwrap();
        let defaults: figment::value::Dict = Figment::from(Serialized::defaults(Config::default()))
            .extract()
            .unwrap();
        let (example, defaults) = (keys(&example, ""), keys(&defaults, ""));
        for key in &example {
            assert!(
                defaults.contains(key),
                "sightline.example.toml has `{key}`, which the configuration does not"
            );
        }
        for key in defaults.iter().filter(|k| !example.contains(k)) {
            // Unset by default: must be shown commented out.
            let leaf = key.rsplit('.').next().unwrap_or(key);
            assert!(
                text.contains(&format!("# {leaf} = ")),
                "sightline.example.toml does not document `{key}`"
            );
        }
    }

    fn keys(dict: &figment::value::Dict, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (key, value) in dict {
            let path = format!("{prefix}{key}");
            match value {
                figment::value::Value::Dict(_, inner) if !inner.is_empty() => {
                    out.extend(keys(inner, &format!("{path}.")))
                }
                _ => out.push(path),
            }
        }
        out
    }
}
