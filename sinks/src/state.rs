//! Saved state of the long-horizon operators, in the lake: written by the durable sink
//! ([`StateSink`]), read back at start-up ([`load_state`]).
//!
//! Layout: `_sightline/state/<group>/<operator>/<frontier>/<worker>-of-<workers>.json`, one
//! object per worker that takes part in a snapshot (today worker 0 takes them all:
//! `0-of-1`), the frontier zero-padded so that names sort by time.
//! Records of the restricted route go to the same path under the restricted prefix, so that
//! restricted data stays apart in saved state too; a worker writes its restricted object first,
//! so a standard object's presence means both are there. A snapshot is *complete* when every
//! worker's object is there; the newest complete one is restored. Once a newer snapshot is
//! complete on every worker, worker 0 deletes the older ones: at most a few generations exist.
//! The objects carry a format version; another version is refused at start with the way out.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sightline_operators::Time;
use sightline_operators::state::StateShard;
use timely::ExchangeData;

use crate::durable::{Completeness, Deliver};
use crate::{Error, Lake};

/// The state format this build writes and reads.
pub const STATE_VERSION: u32 = 1;

/// Where one operator's state is kept, under `root` (empty, or the restricted prefix).
pub fn state_dir(root: &str, group: &str, operator: &str) -> String {
    let root = root.trim_matches('/');
    let base = format!("_sightline/state/{group}/{operator}");
    if root.is_empty() {
        base
    } else {
        format!("{root}/{base}")
    }
}

fn object_name(dir: &str, frontier: Time, worker: usize, workers: usize) -> String {
    format!("{dir}/{frontier:020}/{worker}-of-{workers}.json")
}

/// One saved object: a shard with its version (written; read as the shard alone).
#[derive(Serialize)]
struct Saved<D> {
    v: u32,
    #[serde(flatten)]
    shard: StateShard<D>,
}

/// Saves snapshots of one kind of state ([`StateShard`]s) in the lake.
pub struct StateSink<D> {
    lake: Lake,
    restricted_prefix: String,
    group: String,
    restricted: fn(&D) -> bool,
}

impl<D> StateSink<D> {
    /// Saves under consumer group `group`; records for which `restricted` holds go under
    /// `restricted_prefix`.
    pub fn new(
        lake: Lake,
        restricted_prefix: &str,
        group: &str,
        restricted: fn(&D) -> bool,
    ) -> StateSink<D> {
        StateSink {
            lake,
            restricted_prefix: restricted_prefix.to_owned(),
            group: group.to_owned(),
            restricted,
        }
    }

    fn encode(shard: StateShard<D>) -> Result<Bytes, Error>
    where
        D: Serialize,
    {
        serde_json::to_vec(&Saved {
            v: STATE_VERSION,
            shard,
        })
        .map(Bytes::from)
        .map_err(|e| Error::Encode(e.to_string()))
    }

    /// Deletes the snapshots of `operator` older than `complete`, under both roots.
    fn clean(&self, operator: &str, complete: Time) -> Result<(), Error> {
        for root in ["", self.restricted_prefix.as_str()] {
            let dir = state_dir(root, &self.group, operator);
            for path in self.lake.list(&dir)? {
                let frontier = path
                    .strip_prefix(&format!("{dir}/"))
                    .and_then(|rest| rest.split('/').next())
                    .and_then(|f| f.parse::<Time>().ok());
                if frontier.is_some_and(|f| f < complete) {
                    self.lake.delete(&path)?;
                }
            }
        }
        Ok(())
    }
}

impl<D: ExchangeData + Serialize + Clone> Deliver for StateSink<D> {
    type Item = StateShard<D>;
    type Batch = (Time, String);
    /// The newest complete snapshot to clean up to (worker 0 only), the objects, and the
    /// records they hold.
    type Sealed = (Option<Time>, Vec<(String, Bytes)>, u64);
    type Receipt = ();

    const COMPLETENESS: Completeness = Completeness::Eager;

    fn name(&self) -> String {
        "SaveState".into()
    }

    fn route(_shard: &StateShard<D>) -> Option<u64> {
        None
    }

    fn batch_of(shard: &StateShard<D>) -> (Time, String) {
        (shard.frontier, shard.operator.clone())
    }

    fn seal(&mut self, _batch: &(Time, String), shards: Vec<StateShard<D>>) -> Self::Sealed {
        let mut objects = Vec::new();
        let mut complete = None;
        let mut count = 0;
        for shard in shards {
            count += shard.records.len() as u64;
            if shard.worker == 0 {
                complete = complete.max(shard.complete);
            }
            let (restricted, standard): (Vec<_>, Vec<_>) = shard
                .records
                .iter()
                .cloned()
                .partition(|(record, _)| (self.restricted)(record));
            for (root, records) in [
                (self.restricted_prefix.as_str(), restricted),
                ("", standard),
            ] {
                let dir = state_dir(root, &self.group, &shard.operator);
                let name = object_name(&dir, shard.frontier, shard.worker, shard.workers);
                let part = StateShard {
                    records,
                    ..shard.clone()
                };
                match Self::encode(part) {
                    Ok(bytes) => objects.push((name, bytes)),
                    // Our records always serialize; an encoding failure is logged by the
                    // delivery as a failed write of an empty object list below.
                    Err(e) => tracing::error!(error = %e, "encoding saved state failed"),
                }
            }
        }
        (complete, objects, count)
    }

    fn size(&self, batch: &(Time, String), sealed: &Self::Sealed) -> Option<(String, u64, u64)> {
        let bytes = sealed.1.iter().map(|(_, b)| b.len() as u64).sum();
        Some((batch.1.clone(), sealed.2, bytes))
    }

    fn deliver(&mut self, batch: &(Time, String), sealed: &Self::Sealed) -> Result<(), Error> {
        let (complete, objects, _) = sealed;
        if objects.is_empty() {
            return Err(Error::Encode("saved state could not be encoded".into()));
        }
        // Restricted first: a standard object means its restricted one is there.
        for (name, bytes) in objects {
            self.lake.put(name, bytes.clone())?;
        }
        if let Some(complete) = complete {
            self.clean(&batch.1, *complete)?;
        }
        Ok(())
    }
}

/// A restored snapshot.
#[derive(Clone, Debug)]
pub struct LoadedState<D> {
    /// Its frontier.
    pub frontier: Time,
    /// Its definition fingerprint.
    pub definition: u64,
    /// Every record with its time (both routes).
    pub records: Vec<(D, Time)>,
}

/// The newest complete snapshot of `operator`, if there is one. A snapshot of another format
/// version is an error that names the way out.
pub fn load_state<D: DeserializeOwned>(
    lake: &Lake,
    restricted_prefix: &str,
    group: &str,
    operator: &str,
) -> Result<Option<LoadedState<D>>, String> {
    let dir = state_dir("", group, operator);
    let paths = lake.list(&dir).map_err(|e| format!("listing {dir}: {e}"))?;
    // frontier → (workers, workers seen)
    let mut snapshots: std::collections::BTreeMap<
        Time,
        (usize, std::collections::BTreeSet<usize>),
    > = Default::default();
    for path in &paths {
        let Some(rest) = path.strip_prefix(&format!("{dir}/")) else {
            continue;
        };
        let mut parts = rest.split('/');
        let (Some(frontier), Some(file)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some((worker, workers)) = file
            .strip_suffix(".json")
            .and_then(|f| f.split_once("-of-"))
            .and_then(|(w, n)| Some((w.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
        else {
            continue;
        };
        let Ok(frontier) = frontier.parse::<Time>() else {
            continue;
        };
        let entry = snapshots
            .entry(frontier)
            .or_insert((workers, Default::default()));
        if entry.0 == workers {
            entry.1.insert(worker);
        }
    }
    let Some((&frontier, &(workers, _))) = snapshots
        .iter()
        .rev()
        .find(|(_, (n, seen))| seen.len() == *n && seen.iter().all(|w| w < n))
    else {
        return Ok(None);
    };
    let mut records = Vec::new();
    let mut definition = 0;
    for root in ["", restricted_prefix] {
        let dir = state_dir(root, group, operator);
        for worker in 0..workers {
            let name = object_name(&dir, frontier, worker, workers);
            let bytes = lake
                .get(&name)
                .map_err(|e| format!("reading saved state {name}: {e}"))?;
            let version: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| format!("saved state {name} is not JSON: {e}"))?;
            let v = version.get("v").and_then(serde_json::Value::as_u64);
            if v != Some(u64::from(STATE_VERSION)) {
                return Err(format!(
                    "saved state {name} has format version {v:?}; this build reads version {STATE_VERSION}. Run the version that wrote it to drain, or start under a new consumer group"
                ));
            }
            // The shard itself, `v` ignored: read through `Saved`'s flattening, serde would
            // buffer the records and refuse the 128-bit sums of latency histograms.
            let shard: StateShard<D> = serde_json::from_slice(&bytes)
                .map_err(|e| format!("saved state {name} cannot be read: {e}"))?;
            definition = shard.definition;
            records.extend(shard.records);
        }
    }
    Ok(Some(LoadedState {
        frontier,
        definition,
        records,
    }))
}

/// A window-by-window operator's output that carries the state after its window (integration
/// health, sampling budgets): what [`WindowStateSink`] saves.
pub trait SavedWindow: ExchangeData {
    /// The state.
    type State: Serialize + Default;
    /// The end of the window the state is after, ms.
    fn window_end_ms(&self) -> Time;
    /// The state after the window.
    fn into_state(self) -> Self::State;
}

impl SavedWindow for sightline_operators::alerts::HealthWindow {
    type State = sightline_operators::alerts::HealthState;
    fn window_end_ms(&self) -> Time {
        self.window_end_ms
    }
    fn into_state(self) -> Self::State {
        self.state
    }
}

impl SavedWindow for sightline_operators::sampling::BudgetWindow {
    type State = sightline_operators::sampling::SamplingState;
    fn window_end_ms(&self) -> Time {
        self.window_end_ms
    }
    fn into_state(self) -> Self::State {
        self.state
    }
}

/// Saves a window-by-window operator's state after every window it processed
/// (`_sightline/state/<group>/<name>/<window end>.json`; `health-<route>` for integration
/// health, `sampling` for the budgets), and prunes the objects no restart can need: those of
/// windows before the newest one at or before the durable frontier.
pub struct WindowStateSink<W> {
    lake: Lake,
    dir: String,
    durable: timely::dataflow::operators::probe::Handle<Time>,
    windows: sightline_operators::Windows,
    item: std::marker::PhantomData<W>,
}

impl<W> WindowStateSink<W> {
    /// Saves under consumer group `group`, as `name`.
    pub fn new(
        lake: Lake,
        group: &str,
        name: &str,
        durable: timely::dataflow::operators::probe::Handle<Time>,
        windows: sightline_operators::Windows,
    ) -> WindowStateSink<W> {
        WindowStateSink {
            lake,
            dir: window_state_dir(group, name),
            durable,
            windows,
            item: std::marker::PhantomData,
        }
    }
}

/// Where a window-by-window operator's state is saved.
pub fn window_state_dir(group: &str, name: &str) -> String {
    state_dir("", group, name)
}

/// The state name of a route's integration health.
pub fn health_name(route: &str) -> String {
    format!("health-{route}")
}

fn window_state_object(dir: &str, window_end: Time) -> String {
    format!("{dir}/{window_end:020}.json")
}

fn window_state_end(dir: &str, path: &str) -> Option<Time> {
    path.strip_prefix(&format!("{dir}/"))?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

impl<W: SavedWindow> Deliver for WindowStateSink<W> {
    type Item = W;
    type Batch = Time;
    type Sealed = Result<Bytes, String>;
    type Receipt = ();

    const COMPLETENESS: Completeness = Completeness::Eager;

    fn name(&self) -> String {
        format!(
            "SaveState({})",
            self.dir.rsplit('/').next().unwrap_or_default()
        )
    }

    fn route(_item: &Self::Item) -> Option<u64> {
        None
    }

    fn batch_of(item: &Self::Item) -> Time {
        item.window_end_ms()
    }

    fn seal(&mut self, _end: &Time, items: Vec<Self::Item>) -> Self::Sealed {
        let state = items
            .into_iter()
            .last()
            .map(SavedWindow::into_state)
            .unwrap_or_default();
        serde_json::to_vec(&serde_json::json!({"v": STATE_VERSION, "state": state}))
            .map(Bytes::from)
            .map_err(|e| e.to_string())
    }

    fn deliver(&mut self, end: &Time, sealed: &Self::Sealed) -> Result<(), Error> {
        let bytes = sealed.clone().map_err(Error::Encode)?;
        self.lake
            .put(&window_state_object(&self.dir, *end), bytes)?;
        let durable = self
            .durable
            .with_frontier(|f| f.first().copied().unwrap_or(Time::MAX));
        let keep_from = self.windows.start_of(durable.min(*end));
        let ends: Vec<(Time, String)> = self
            .lake
            .list(&self.dir)?
            .into_iter()
            .filter_map(|p| window_state_end(&self.dir, &p).map(|e| (e, p)))
            .collect();
        // The newest state at or before the durable window start is what a restart reads.
        let needed = ends
            .iter()
            .filter(|(e, _)| *e <= keep_from)
            .map(|(e, _)| *e)
            .max();
        for (e, path) in ends {
            if needed.is_some_and(|n| e < n) {
                self.lake.delete(&path)?;
            }
        }
        Ok(())
    }
}

/// The state a window-by-window operator resumes from: the one saved after the newest window
/// that ends at or before the window of `resume_ms` (the source's durable frontier); empty
/// when there is none.
pub fn load_window_state<S: serde::de::DeserializeOwned + Default>(
    lake: &Lake,
    group: &str,
    name: &str,
    resume_ms: Time,
    windows: sightline_operators::Windows,
) -> Result<S, String> {
    let dir = window_state_dir(group, name);
    let limit = windows.start_of(resume_ms);
    let paths = lake.list(&dir).map_err(|e| format!("listing {dir}: {e}"))?;
    let Some(path) = paths
        .into_iter()
        .filter(|p| window_state_end(&dir, p).is_some_and(|e| e <= limit))
        .max_by_key(|p| window_state_end(&dir, p))
    else {
        return Ok(S::default());
    };
    let bytes = lake
        .get(&path)
        .map_err(|e| format!("reading {path}: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{path} is not JSON: {e}"))?;
    if value.get("v").and_then(serde_json::Value::as_u64) != Some(u64::from(STATE_VERSION)) {
        return Err(format!(
            "saved state {path} has another format version; this build reads version {STATE_VERSION}. Start under a new consumer group"
        ));
    }
    serde_json::from_value(value["state"].clone()).map_err(|e| format!("{path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sightline_operators::LatencyHistogram;

    /// A shard saved through the sink reads back whole, split by route and joined again, with
    /// records that hold 128-bit integers (latency histograms' sums).
    #[test]
    fn saved_state_reads_back_with_both_routes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lake = Lake::open(&dir.path().to_string_lossy()).expect("lake");
        type Record = ((bool, u64), LatencyHistogram);
        let records: Vec<(Record, Time)> = vec![
            (((false, 1), LatencyHistogram::from_sample(1_500)), 7),
            (((true, 2), LatencyHistogram::from_sample(u64::MAX)), 8),
        ];
        let shard = StateShard {
            operator: "funnel-f-progress".into(),
            definition: 42,
            frontier: 9_000,
            complete: None,
            worker: 0,
            workers: 1,
            records: records.clone(),
        };
        let mut sink: StateSink<Record> =
            StateSink::new(lake.clone(), "restricted", "g", |((r, _), _)| *r);
        let batch = StateSink::<Record>::batch_of(&shard);
        let sealed = sink.seal(&batch, vec![shard]);
        sink.deliver(&batch, &sealed).expect("saved");
        let loaded = load_state::<Record>(&lake, "restricted", "g", "funnel-f-progress")
            .expect("loaded")
            .expect("a snapshot");
        assert_eq!((loaded.frontier, loaded.definition), (9_000, 42));
        let mut got = loaded.records;
        got.sort_by_key(|(((_, unit), _), _)| *unit);
        assert_eq!(got, records);
        assert!(
            lake.list("restricted/_sightline/state/g")
                .expect("list")
                .iter()
                .any(|p| p.ends_with("0-of-1.json")),
            "the restricted record is under the restricted prefix"
        );
    }
}
