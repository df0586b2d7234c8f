//! A multi-process cluster: `[cluster]`, the connection of the processes, and what a lost peer
//! does.
//!
//! Every process runs `pipeline.workers` timely workers; together they are one timely
//! computation of `processes × workers` workers, the Kafka partitions spread over all of them
//! and every aggregation exchanged by key across processes as it is across threads. The
//! processes connect to each other before timely starts, with Sightline's own handshake
//! (timely's own connects forever and checks nothing):
//!
//! - process *i* listens on its address (or `cluster.listen`) and accepts every process above
//!   it; it connects to every process below it, retrying until `cluster.connect-timeout-ms`;
//! - a connecting process sends its index, the number of processes and workers, and a
//!   fingerprint of its configuration (one hash per configuration value, the privacy key as a
//!   keyed hash of a fixed probe, never the key); the accepting one compares and answers. A
//!   mismatch stops both with the first differing field named;
//! - the connected sockets go to timely (`initialize_networking_from_sockets`).
//!
//! A peer lost later is fatal: timely's network threads panic with "timely communication
//! error", and [`exit_on_lost_peer`] turns that into one error line and exit code
//! [`LOST_PEER_EXIT`]; the other processes see their connection close and do the same. The
//! restarted cluster resumes from the committed offsets and checkpoints, as one process does.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use timely::communication::allocator::zero_copy::initialize::{
    CommsGuard, initialize_networking_from_sockets,
};
use timely::communication::allocator::{AllocatorBuilder, ProcessBuilder};
use tracing::{debug, info, warn};

/// The exit code of a process that lost a peer of its cluster.
pub const LOST_PEER_EXIT: i32 = 3;

/// `[cluster]`: the processes of a multi-process run. Absent (or one process): one process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Every process's `host:port`, in process order (the same list in every process).
    pub processes: Vec<String>,
    /// A file with one `host:port` per line, instead of `processes`.
    pub hostfile: Option<PathBuf>,
    /// This process's index in the list. Absent: the number after the last `-` of the host
    /// name (a StatefulSet pod `sightline-2` is process 2).
    pub process: Option<usize>,
    /// The address this process listens on, when not its own entry of the list (in a pod,
    /// `0.0.0.0:2101`: its own DNS name may not resolve before it is ready).
    pub listen: Option<String>,
    /// How long start-up waits for every peer, ms.
    pub connect_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            processes: Vec::new(),
            hostfile: None,
            process: None,
            listen: None,
            connect_timeout_ms: 120_000,
        }
    }
}

/// This process's place in a cluster of more than one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// Every process's address.
    pub addresses: Vec<String>,
    /// This process's index.
    pub process: usize,
    /// Where this process listens.
    pub listen: String,
    /// How long start-up waits for the peers.
    pub timeout: Duration,
}

impl ClusterConfig {
    /// Every process's address (from `processes` or `hostfile`), checked. Errors name the field.
    pub fn addresses(&self) -> anyhow::Result<Vec<String>> {
        let addresses: Vec<String> = match (&self.hostfile, self.processes.is_empty()) {
            (Some(_), false) => {
                bail!("cluster.processes and cluster.hostfile are both set: give one of them")
            }
            (Some(path), true) => std::fs::read_to_string(path)
                .with_context(|| format!("cluster.hostfile: reading {}", path.display()))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect(),
            (None, _) => self.processes.clone(),
        };
        for (i, a) in addresses.iter().enumerate() {
            if !a.contains(':') || a.split_whitespace().count() != 1 {
                bail!("cluster.processes[{i}] = {a:?} is not a host:port");
            }
        }
        Ok(addresses)
    }

    /// Checks what can be checked before start-up (the host name is not read).
    pub fn check(&self) -> anyhow::Result<()> {
        let n = self.addresses()?.len();
        if let Some(p) = self.process
            && n > 1
            && p >= n
        {
            bail!("cluster.process = {p} is not an index of the {n} processes");
        }
        if self.connect_timeout_ms == 0 {
            bail!("cluster.connect-timeout-ms must be positive");
        }
        Ok(())
    }

    /// This process's place, or `None` for a one-process run. Errors name the field.
    pub fn place(&self) -> anyhow::Result<Option<Place>> {
        self.check()?;
        let addresses = self.addresses()?;
        if addresses.len() <= 1 {
            return Ok(None);
        }
        let process = match self.process {
            Some(p) => p,
            None => {
                let host = host_name().context(
                    "cluster.process is not set and the host name cannot be read to infer it",
                )?;
                ordinal_of(&host).with_context(|| {
                    format!("cluster.process is not set and the host name {host:?} does not end in -<index>")
                })?
            }
        };
        if process >= addresses.len() {
            bail!(
                "cluster.process = {process} (from the host name) is not an index of the {} processes",
                addresses.len()
            );
        }
        Ok(Some(Place {
            listen: self
                .listen
                .clone()
                .unwrap_or_else(|| addresses[process].clone()),
            addresses,
            process,
            timeout: Duration::from_millis(self.connect_timeout_ms),
        }))
    }
}

/// The index at the end of a StatefulSet pod's name: `sightline-2` → 2 (the part before the
/// first `.` of a fully qualified name).
pub fn ordinal_of(host: &str) -> Option<usize> {
    let short = host.split('.').next()?;
    short.rsplit_once('-')?.1.parse().ok()
}

fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
}

/// The leaf of a fingerprint that stands for the privacy key: the keyed hash of a fixed value.
const KEY_PROBE: &str = "privacy.key (probe)";

/// What the processes of a cluster must agree on: per configuration value (a dotted path), its
/// hash by `keyed`, a hash keyed with the privacy key (the pseudonymizer's), so that what
/// crosses the network reveals no value, secrets in `kafka.options` or `metrics-store.headers`
/// included, to whoever lacks the key. Left out: what is each process's own
/// (`cluster.process`, `cluster.listen`, `http`) and where the key is read from
/// (`privacy.key`, `privacy.key-file`); the key itself is compared through the hash of a fixed
/// probe.
pub fn fingerprint(
    config: &crate::config::Config,
    keyed: &mut dyn FnMut(&str) -> u64,
) -> BTreeMap<String, u64> {
    let mut value = serde_json::to_value(config).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.remove("http");
        if let Some(c) = map.get_mut("cluster").and_then(|c| c.as_object_mut()) {
            c.remove("process");
            c.remove("listen");
        }
        if let Some(p) = map.get_mut("privacy").and_then(|p| p.as_object_mut()) {
            p.remove("key");
            p.remove("key-file");
        }
    }
    let mut leaves = BTreeMap::new();
    flatten("", &value, &mut |path, leaf| {
        leaves.insert(path, keyed(leaf));
    });
    leaves.insert(KEY_PROBE.into(), keyed("sightline-cluster-probe"));
    leaves
}

fn flatten(path: &str, value: &serde_json::Value, out: &mut dyn FnMut(String, &str)) {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        // An empty table or list has no values to compare (its entries are compared one by one).
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                flatten(&join(k), v, out);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{path}[{i}]"), v, out);
            }
        }
        leaf => out(path.to_owned(), &leaf.to_string()),
    }
}

/// The first difference between two fingerprints, as a sentence naming the field (the key
/// first: with another key every hash differs).
pub fn difference(mine: &BTreeMap<String, u64>, theirs: &BTreeMap<String, u64>) -> Option<String> {
    if mine.get(KEY_PROBE) != theirs.get(KEY_PROBE) {
        return Some("the privacy key differs (privacy.key, privacy.key-file)".into());
    }
    let keys: std::collections::BTreeSet<&String> = mine.keys().chain(theirs.keys()).collect();
    keys.into_iter()
        .find_map(|k| match (mine.get(k), theirs.get(k)) {
            (Some(a), Some(b)) if a == b => None,
            (Some(_), Some(_)) => Some(format!("`{k}` differs")),
            (Some(_), None) => Some(format!("`{k}` is set here only")),
            (None, _) => Some(format!("`{k}` is set there only")),
        })
}

/// The greeting a connecting process sends.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    magic: String,
    process: usize,
    processes: usize,
    workers: usize,
    config: BTreeMap<String, u64>,
}

/// The answer: `None` accepted, `Some(why)` refused.
#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    refused: Option<String>,
}

const MAGIC: &str = "sightline-cluster/1";

fn send<T: Serialize>(stream: &mut TcpStream, message: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    stream.write_all(&(bytes.len() as u32).to_be_bytes())?;
    stream.write_all(&bytes)
}

fn receive<T: for<'de> Deserialize<'de>>(stream: &mut TcpStream) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 16 << 20 {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "a greeting larger than 16 MiB: not a Sightline process",
        ));
    }
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes)?;
    serde_json::from_slice(&bytes).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))
}

/// Connects this process to every other one, checks that they agree, and returns one socket
/// per process (`None` at this process's own index).
pub fn connect(
    place: &Place,
    workers: usize,
    config: &BTreeMap<String, u64>,
) -> anyhow::Result<Vec<Option<TcpStream>>> {
    let n = place.addresses.len();
    let me = place.process;
    let deadline = Instant::now() + place.timeout;
    let listener = TcpListener::bind(&place.listen).with_context(|| {
        format!(
            "cluster: process {me} cannot listen on {} (cluster.listen, or its entry of cluster.processes)",
            place.listen
        )
    })?;
    listener.set_nonblocking(true)?;
    info!(process = me, processes = n, listen = %place.listen, "cluster: waiting for every peer");
    let mut sockets: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let hello = Hello {
        magic: MAGIC.into(),
        process: me,
        processes: n,
        workers,
        config: config.clone(),
    };
    let mut last_log = Instant::now();
    let mut lower = 0;
    while sockets
        .iter()
        .enumerate()
        .any(|(i, s)| i != me && s.is_none())
    {
        let mut progressed = false;
        // Lower processes: connect to them, one at a time, in order. A failed attempt (the
        // peer not listening yet, its name not resolving yet, a connection that breaks) is
        // tried again; a refusal is final.
        if lower < me
            && let Some(mut stream) = try_connect(&place.addresses[lower])
        {
            match greet(&mut stream, &hello) {
                Ok(()) => {
                    sockets[lower] = Some(stream);
                    info!(process = me, peer = lower, "cluster: connected");
                    lower += 1;
                    progressed = true;
                }
                Err(Greeting::Refused(why)) => {
                    bail!("cluster: process {lower} refused process {me}: {why}")
                }
                Err(Greeting::Failed(e)) => {
                    debug!(process = me, peer = lower, error = %e, "cluster: greeting failed; trying again");
                }
            }
        }
        // Higher processes connect to this one. A connection that is not a Sightline process
        // of this cluster (a probe, a scanner, one that says nothing) is dropped; a process
        // that connects again (it restarted) replaces its earlier connection; a process whose
        // configuration differs is refused, and this process stops too.
        match listener.accept() {
            Ok((mut stream, from)) => match welcome(&mut stream, &hello, from) {
                Ok(peer) => {
                    if sockets[peer].is_some() {
                        warn!(
                            process = me,
                            peer, "cluster: a peer connected again; keeping its new connection"
                        );
                    }
                    info!(process = me, peer, "cluster: connected");
                    sockets[peer] = Some(stream);
                    progressed = true;
                }
                Err(Welcome::Refused(why)) => bail!("cluster: refused {from}: {why}"),
                Err(Welcome::Dropped(why)) => {
                    warn!(process = me, %from, "cluster: dropped a connection: {why}");
                }
            },
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("cluster: accepting a peer"),
        }
        if progressed {
            continue;
        }
        let missing: Vec<usize> = (0..n)
            .filter(|&i| i != me && sockets[i].is_none())
            .collect();
        if Instant::now() >= deadline {
            bail!(
                "cluster: process {me} gave up waiting for process(es) {missing:?} ({}) after {} ms (cluster.connect-timeout-ms)",
                missing
                    .iter()
                    .map(|&i| place.addresses[i].as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                place.timeout.as_millis()
            );
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            warn!(process = me, waiting_for = ?missing, left_ms = deadline.saturating_duration_since(Instant::now()).as_millis() as u64, "cluster: still waiting for peers");
            last_log = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for s in sockets.iter().flatten() {
        s.set_read_timeout(None)?;
        s.set_nodelay(true)?;
    }
    info!(process = me, processes = n, "cluster: every peer connected");
    Ok(sockets)
}

/// One connection attempt to `address`, over each address it resolves to (a peer's name may
/// not resolve before its pod exists).
fn try_connect(address: &str) -> Option<TcpStream> {
    use std::net::ToSocketAddrs;
    let addrs = address.to_socket_addrs().ok()?;
    addrs
        .into_iter()
        .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok())
}

/// Why a greeting did not succeed.
enum Greeting {
    /// The peer answered no: final.
    Refused(String),
    /// The connection failed: try again.
    Failed(std::io::Error),
}

/// Sends `hello` to a lower process and reads its answer.
fn greet(stream: &mut TcpStream, hello: &Hello) -> Result<(), Greeting> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(Greeting::Failed)?;
    send(stream, hello).map_err(Greeting::Failed)?;
    let answer: Answer = receive(stream).map_err(Greeting::Failed)?;
    match answer.refused {
        Some(why) => Err(Greeting::Refused(why)),
        None => Ok(()),
    }
}

/// Why a connection was not taken.
enum Welcome {
    /// A process of this cluster that disagrees: final, for both.
    Refused(String),
    /// Not a process of this cluster, or a connection that failed: dropped.
    Dropped(String),
}

/// Reads a higher process's greeting, checks it against `mine`, and answers.
fn welcome(
    stream: &mut TcpStream,
    mine: &Hello,
    from: std::net::SocketAddr,
) -> Result<usize, Welcome> {
    let dropped = |e: std::io::Error| Welcome::Dropped(e.to_string());
    stream.set_nonblocking(false).map_err(dropped)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(dropped)?;
    let theirs: Hello = receive(stream).map_err(dropped)?;
    let me = mine.process;
    if theirs.magic != MAGIC {
        return Err(Welcome::Dropped(format!(
            "{from} is not a Sightline process of this version ({:?})",
            theirs.magic
        )));
    }
    let refusal = if theirs.processes != mine.processes {
        Some(format!(
            "process {} counts {} processes, process {me} counts {} (cluster.processes)",
            theirs.process, theirs.processes, mine.processes
        ))
    } else if theirs.process <= me || theirs.process >= mine.processes {
        Some(format!(
            "process {me} expected a connection from a process above it, got index {} (cluster.process)",
            theirs.process
        ))
    } else if theirs.workers != mine.workers {
        Some(format!(
            "process {} runs {} workers, process {me} runs {} (pipeline.workers)",
            theirs.process, theirs.workers, mine.workers
        ))
    } else {
        difference(&mine.config, &theirs.config).map(|d| {
            format!(
                "the configuration of process {} differs from process {me}'s: {}",
                theirs.process,
                d.replace("here only", &format!("in process {me} only"))
                    .replace("there only", &format!("in process {} only", theirs.process))
            )
        })
    };
    send(
        stream,
        &Answer {
            refused: refusal.clone(),
        },
    )
    .map_err(dropped)?;
    match refusal {
        Some(why) => Err(Welcome::Refused(why)),
        None => Ok(theirs.process),
    }
}

/// Connects the cluster and builds timely's allocators for this process's `workers` workers.
/// The guard keeps the network threads: drop it to wait for them after a clean end.
pub fn start(
    place: &Place,
    workers: usize,
    config: &BTreeMap<String, u64>,
) -> anyhow::Result<(Vec<AllocatorBuilder>, Comms)> {
    let sockets = connect(place, workers, config)?;
    let hooks = timely::communication::Hooks::default();
    let local =
        ProcessBuilder::new_typed_vector(workers, hooks.refill.clone(), hooks.spill.clone());
    let (builders, guard) =
        initialize_networking_from_sockets(local, sockets, place.process, workers, hooks)
            .context("cluster: starting timely's network threads")?;
    Ok((
        builders.into_iter().map(AllocatorBuilder::Tcp).collect(),
        Comms { guard },
    ))
}

/// A started cluster's network: timely's send and receive threads.
pub struct Comms {
    guard: CommsGuard,
}

impl Comms {
    /// After a clean end (every process finished): waits for the network threads.
    pub fn finish(self) {
        drop(self.guard);
    }

    /// Leaving on its own (a stop, an error): the network threads are not waited for (they
    /// would wait for peers that may still run). See `run` for how the peers learn of it.
    pub fn leave(self) {
        std::mem::forget(self.guard);
    }
}

/// Makes the loss of a peer end this process with one error line and exit code
/// [`LOST_PEER_EXIT`], instead of a panicking network thread and workers that wait forever
/// (what Materialize's `halt_on_timely_communication_panic` does). A process that was asked
/// to stop (`stop`) exits 0 instead: a cluster stopped as a whole stops cleanly, whichever
/// process finishes first. A process that is leaving on its own (`leaving`: it broke its
/// connections after a stop or an error, [`Comms::abandon`]) ignores its network threads'
/// failures and ends with its own result; `peer_gone` tells it that a peer has gone. Any other panic is reported by the previous hook and
/// ends the process (exit 101), as Materialize's processes abort on a panic.
pub fn exit_on_lost_peer(
    process: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    leaving: std::sync::Arc<std::sync::atomic::AtomicBool>,
    peer_gone: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("timely communication error") {
            peer_gone.store(true, Relaxed);
            if leaving.load(Relaxed) {
                return;
            }
            // A lost peer fails its receive and its send thread at once: one of them speaks
            // and ends the process, the other waits for the end.
            static SPOKEN: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if SPOKEN.swap(true, Relaxed) {
                loop {
                    std::thread::park();
                }
            }
            if stop.load(Relaxed) {
                eprintln!(
                    "stopped: a peer of the cluster stopped first (what was not committed is read again at the next start)"
                );
                std::process::exit(0);
            }
            eprintln!(
                "error: cluster process {process} lost a peer ({message}): every process of the cluster stops; restart them all, they resume from the committed offsets and checkpoints"
            );
            std::process::exit(LOST_PEER_EXIT);
        }
        // Any other panic is a bug: report it and end the process at once, before the
        // unwinding thread's connections say a clean goodbye after which the peers would wait.
        previous(info);
        std::process::exit(101);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_come_from_pod_names() {
        assert_eq!(ordinal_of("sightline-2"), Some(2));
        assert_eq!(
            ordinal_of("my-release-sightline-10.sightline-headless.ns.svc"),
            Some(10)
        );
        assert_eq!(ordinal_of("laptop"), None);
        assert_eq!(ordinal_of("sightline-x"), None);
    }

    #[test]
    fn a_place_needs_a_valid_index_and_addresses() {
        let mut c = ClusterConfig {
            processes: vec!["127.0.0.1:2101".into(), "127.0.0.1:2102".into()],
            process: Some(1),
            ..ClusterConfig::default()
        };
        let place = c.place().unwrap().unwrap();
        assert_eq!(
            (place.process, place.listen.as_str()),
            (1, "127.0.0.1:2102")
        );
        c.process = Some(2);
        assert!(format!("{:#}", c.place().unwrap_err()).contains("cluster.process = 2"));
        c.process = Some(0);
        c.processes[1] = "nohost".into();
        assert!(format!("{:#}", c.place().unwrap_err()).contains("cluster.processes[1]"));
        c.processes.truncate(1);
        assert_eq!(c.place().unwrap(), None);
    }

    #[test]
    fn a_difference_names_the_field() {
        // A keyed hash, as the pseudonymizer's: `key` stands for the privacy key.
        let print = |c: &crate::config::Config, key: &str| {
            let key = key.to_owned();
            fingerprint(c, &mut |v| {
                sightline_operators::funnel::fnv1a(format!("{key}/{v}").as_bytes())
            })
        };
        let mut a = crate::config::Config::default();
        let mut b = a.clone();
        assert_eq!(difference(&print(&a, "k"), &print(&b, "k")), None);
        b.pipeline.window_ms = 30_000;
        assert_eq!(
            difference(&print(&a, "k"), &print(&b, "k")).as_deref(),
            Some("`pipeline.window-ms` differs")
        );
        b.pipeline.window_ms = a.pipeline.window_ms;
        b.kafka.options.insert("sasl.password".into(), "x".into());
        assert_eq!(
            difference(&print(&a, "k"), &print(&b, "k")).as_deref(),
            Some("`kafka.options.sasl.password` is set there only")
        );
        // Each process's own address and HTTP port may differ; the key may not, and with
        // another key no value is compared.
        a.http.listen = Some("127.0.0.1:1".into());
        b = a.clone();
        b.http.listen = Some("127.0.0.1:2".into());
        b.cluster.process = Some(1);
        assert_eq!(difference(&print(&a, "k"), &print(&b, "k")), None);
        assert_eq!(
            difference(&print(&a, "k"), &print(&b, "other")).as_deref(),
            Some("the privacy key differs (privacy.key, privacy.key-file)")
        );
        // No value crosses in clear: the same value under another key hashes otherwise.
        assert_ne!(
            print(&a, "k")["pipeline.window-ms"],
            print(&a, "other")["pipeline.window-ms"]
        );
    }
}
