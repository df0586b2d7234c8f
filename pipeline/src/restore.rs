//! Where the long-horizon operators resume at start-up: the newest complete snapshot of each
//! funnel's state, or, for a funnel that has none (new, or redefined), the resume point of the
//! source, from which it counts only entry windows it sees whole.

use std::sync::Arc;

use anyhow::Context;
use sightline_ingest::source::checkpoint::PartitionCheckpoints;
use sightline_operators::Windows;
use sightline_operators::experiment::{Saved as ExperimentSaved, Setup};
use sightline_operators::funnel::{FunnelDef, FunnelResume, Resume, SavedFunnel, fnv1a};
use sightline_operators::triage::{SavedItem, TriageRules};
use sightline_sinks::Lake;
use sightline_sinks::state::load_state;
use tracing::{info, warn};

/// A funnel's restored state, for every worker.
#[derive(Clone, Debug, Default)]
pub struct Restored {
    /// Per funnel, in definition order.
    pub funnels: Vec<FunnelResume>,
    /// Triage.
    pub triage: Resume<SavedItem>,
    /// The experiments.
    pub experiments: Resume<ExperimentSaved>,
    /// The source's durable frontier at the start (0: nothing committed).
    pub resume_ms: u64,
}

impl Restored {
    /// Worker `index`'s share of the funnels: every funnel runs on worker 0, which restores
    /// all of its state.
    pub fn share(&self, index: usize) -> Vec<FunnelResume> {
        self.funnels.iter().map(|f| worker_zero(f, index)).collect()
    }

    /// Worker `index`'s share of triage: it runs on worker 0, which restores all of it.
    pub fn triage_share(&self, index: usize) -> Resume<SavedItem> {
        worker_zero(&self.triage, index)
    }

    /// Worker `index`'s share of the experiments: they run on worker 0, which restores all.
    pub fn experiments_share(&self, index: usize) -> Resume<ExperimentSaved> {
        worker_zero(&self.experiments, index)
    }
}

/// `from` for worker `index`: all of it on worker 0, none of its records elsewhere.
fn worker_zero<D: Clone>(from: &Resume<D>, index: usize) -> Resume<D> {
    Resume {
        restored: if index == 0 {
            from.restored.clone()
        } else {
            Vec::new()
        },
        restored_at: from.restored_at,
        written_before: from.written_before,
        definition: from.definition,
    }
}

/// A fingerprint of a funnel's definition: state saved under another definition is not
/// restored.
pub fn fingerprint(def: &FunnelDef) -> u64 {
    fnv1a(&serde_json::to_vec(def).unwrap_or_default())
}

/// The durable frontier the source resumes from: the largest in the checkpoints of `group`
/// (0 when there are none).
pub fn resume_frontier(lake: &Lake, group: &str) -> anyhow::Result<u64> {
    let dir = format!("_sightline/checkpoints/{group}");
    let mut frontier = 0;
    for path in lake.list(&dir).with_context(|| format!("listing {dir}"))? {
        let bytes = lake.get(&path).with_context(|| format!("reading {path}"))?;
        let file = PartitionCheckpoints::decode(&path, &bytes)?;
        frontier = frontier.max(file.durable());
    }
    Ok(frontier)
}

/// Where each funnel of `defs`, and triage with `triage`, resume, for a Kafka source of
/// consumer group `group`.
pub fn restore_funnels(
    lake: &Lake,
    restricted_prefix: &str,
    group: &str,
    defs: &[FunnelDef],
    triage: &TriageRules,
    experiments: &Setup,
    windows: Windows,
) -> anyhow::Result<Restored> {
    let mut out = Vec::new();
    let resume_ms = resume_frontier(lake, group)?;
    for def in defs {
        let definition = fingerprint(def);
        let operator = def.state_name();
        let loaded = load_state::<SavedFunnel>(lake, restricted_prefix, group, &operator)
            .map_err(|e| anyhow::anyhow!(e))
            .with_context(|| format!("restoring the state of funnel `{}`", def.name))?;
        match loaded {
            Some(state) if state.definition == definition => {
                info!(
                    funnel = %def.name,
                    frontier = state.frontier,
                    records = state.records.len(),
                    "funnel state restored"
                );
                // The state holds every entry window not known to be written: the open ones
                // and the closed ones whose rows may not be durable, which are written again.
                out.push(FunnelResume {
                    restored: state.records,
                    restored_at: state.frontier,
                    written_before: 0,
                    definition,
                });
            }
            other => {
                if other.is_some() {
                    warn!(funnel = %def.name, "the funnel's definition changed since its state was saved: it starts afresh");
                }
                // No state: count only entry windows that start at or after the source's
                // resume point, which are seen whole.
                let from = resume_ms;
                let written_before = if from == 0 {
                    0
                } else {
                    from + windows.width_ms() + def.window_ms - 1
                };
                out.push(FunnelResume {
                    restored: Vec::new(),
                    restored_at: 0,
                    written_before,
                    definition,
                });
            }
        }
    }
    // Feedback windows that start at or after the resume point are seen whole with their
    // errors only if the span before them is read again too.
    let triage_written_before = if resume_ms == 0 {
        0
    } else {
        resume_ms + triage.recent_errors_ms + windows.width_ms() - 1
    };
    // The triage state holds the feedback whose records are not known to be written: they
    // are written again.
    let triage = resume_of::<SavedItem>(
        (lake, restricted_prefix, group),
        ("triage", "triage"),
        fnv1a(&serde_json::to_vec(triage).unwrap_or_default()),
        triage_written_before,
        "the triage rules changed since their state was saved: triage starts afresh",
    )?;
    let experiments = resume_of::<ExperimentSaved>(
        (lake, restricted_prefix, group),
        ("experiments", "experiment"),
        experiments.definition,
        0,
        "the experiments' configuration changed since their state was saved: their analysis starts afresh",
    )?;
    Ok(Restored {
        funnels: out,
        triage,
        experiments,
        resume_ms,
    })
}

/// Where one single-snapshot operator (`name`: triage, experiments; `shown` in the log)
/// resumes: its saved state
/// when it was saved under `definition`, else a fresh start that writes nothing before
/// `written_before` (and says why with `changed` when a state of another definition was
/// found).
fn resume_of<D: serde::de::DeserializeOwned>(
    (lake, restricted_prefix, group): (&Lake, &str, &str),
    (name, shown): (&str, &str),
    definition: u64,
    written_before: u64,
    changed: &str,
) -> anyhow::Result<Resume<D>> {
    let loaded = load_state::<D>(lake, restricted_prefix, group, name)
        .map_err(|e| anyhow::anyhow!(e))
        .with_context(|| format!("restoring the state of {shown}"))?;
    Ok(match loaded {
        Some(state) if state.definition == definition => {
            info!(
                frontier = state.frontier,
                records = state.records.len(),
                "{shown} state restored"
            );
            Resume {
                restored: state.records,
                restored_at: state.frontier,
                written_before: 0,
                definition,
            }
        }
        other => {
            if other.is_some() {
                warn!("{changed}");
            }
            Resume {
                restored: Vec::new(),
                restored_at: 0,
                written_before,
                definition,
            }
        }
    })
}

/// [`Restored`] shared by the workers.
pub type SharedRestored = Arc<Restored>;
