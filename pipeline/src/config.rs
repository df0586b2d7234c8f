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
    /// How far ahead of the wall clock an event time may be, ms. Later ones are rejected as
    /// `invalid_value`, so that one bad clock cannot push the watermark into the future.
    pub max_future_skew_ms: u64,
    /// Records a source worker reads per activation.
    pub batch_size: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            workers: 1,
            window_ms: 60_000,
            allowed_lateness_ms: 10_000,
            tick_ms: 1_000,
            idle_timeout_ms: 5_000,
            max_event_bytes: sightline_schemas::DEFAULT_MAX_EVENT_BYTES,
            max_future_skew_ms: 3_600_000,
            batch_size: 1024,
        }
    }
}

/// One input topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TopicConfig {
    /// Topic name.
    pub name: String,
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
    /// Extra librdkafka consumer properties (for example `security.protocol`).
    pub options: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "localhost:9092".into(),
            group_id: "sightline".into(),
            topics: vec![TopicConfig { name: "telemetry.events".into() }],
            commit_interval_ms: 5_000,
            metadata_timeout_ms: 30_000,
            options: BTreeMap::new(),
        }
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
}

impl Default for LakeConfig {
    fn default() -> Self {
        LakeConfig { location: "./sightline-data".into(), s3: sightline_sinks::S3Options::default() }
    }
}

impl LakeConfig {
    /// Opens the configured lake.
    pub fn open(&self) -> anyhow::Result<sightline_sinks::Lake> {
        sightline_sinks::Lake::open_with(&self.location, &self.s3).with_context(|| format!("opening the lake at {}", self.location))
    }
}

impl Config {
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
        figment = figment.merge(Env::prefixed("SIGHTLINE__").map(|key| key.as_str().replace("__", ".").replace('_', "-").into()));
        let config: Config = figment.extract().context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between fields.
    pub fn validate(&self) -> anyhow::Result<()> {
        let p = &self.pipeline;
        if p.workers == 0 {
            bail!("pipeline.workers must be at least 1");
        }
        if p.tick_ms == 0 || p.window_ms == 0 || !p.window_ms.is_multiple_of(p.tick_ms) {
            bail!("pipeline.window-ms ({}) must be a positive multiple of pipeline.tick-ms ({})", p.window_ms, p.tick_ms);
        }
        if p.batch_size == 0 {
            bail!("pipeline.batch-size must be at least 1");
        }
        let mut names: Vec<&str> = self.kafka.topics.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
            bail!("kafka.topics lists `{}` twice", pair[0]);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("s.toml", "[pipeline]\nworkers = 3\nwindow-ms = 30000\n[lake]\nlocation = \"/tmp/x\"\n")?;
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

    #[test]
    fn the_example_file_lists_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sightline.example.toml");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let parsed: Config = Figment::from(Toml::string(&text)).extract().unwrap_or_else(|e| panic!("example config: {e}"));
        assert_eq!(parsed, Config::default(), "sightline.example.toml must hold the defaults");
        // Same keys, not just the same values: a key missing from the file would be filled in
        // by `#[serde(default)]`. (Keys whose default is unset are documented as comments.)
        let example: figment::value::Dict = Figment::from(Toml::string(&text)).extract().unwrap();
        let defaults: figment::value::Dict = Figment::from(Serialized::defaults(Config::default())).extract().unwrap();
        let (example, defaults) = (keys(&example, ""), keys(&defaults, ""));
        for key in &example {
            assert!(defaults.contains(key), "sightline.example.toml has `{key}`, which the configuration does not");
        }
        for key in defaults.iter().filter(|k| !example.contains(k)) {
            // Unset by default: must be shown commented out.
            let leaf = key.rsplit('.').next().unwrap_or(key);
            assert!(text.contains(&format!("# {leaf} = ")), "sightline.example.toml does not document `{key}`");
        }
    }

    fn keys(dict: &figment::value::Dict, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (key, value) in dict {
            let path = format!("{prefix}{key}");
            match value {
                figment::value::Value::Dict(_, inner) if !inner.is_empty() => out.extend(keys(inner, &format!("{path}."))),
                _ => out.push(path),
            }
        }
        out
    }
}
