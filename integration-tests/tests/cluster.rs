//! A multi-process cluster on loopback, with the real `sightline` binary: 2 and 3 processes
//! against the suite's tansu broker write the lake of one process; a peer killed mid-run stops
//! every process with a clear error and a restart loses and duplicates nothing; processes that
//! disagree on their configuration, a cluster without a key and a missing peer are refused.

use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sightline_integration_tests::chaos::{
    Deployment, Process, Workload, difference, seed, sightline_binary, signal, snapshot,
};
use sightline_integration_tests::servers::Tansu;

const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// `n` free loopback addresses.
fn free_addresses(n: usize) -> Vec<String> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("address").to_string())
        .collect()
}

/// The `[cluster]` table of `n` loopback processes (the index comes from the environment).
fn cluster_table(n: usize) -> String {
    cluster_table_of(&free_addresses(n))
}

/// The `[cluster]` table of processes at `addresses`.
fn cluster_table_of(addresses: &[String]) -> String {
    let list: Vec<String> = addresses.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "\n[cluster]\nprocesses = [{}]\nconnect-timeout-ms = 60000\n\n[http]\nlisten = \"\"\n",
        list.join(", ")
    )
}

/// A started cluster: its processes, and where its part of the shared log begins.
struct Cluster {
    processes: Vec<Process>,
    log_from: usize,
}

/// Starts every process of a cluster deployment.
fn start_cluster(deployment: &Deployment, n: usize) -> Cluster {
    let log_from = std::fs::metadata(&deployment.log).map_or(0, |m| m.len() as usize);
    let processes = (0..n)
        .map(|i| deployment.start_with_env(&[("SIGHTLINE__CLUSTER__PROCESS", i.to_string())]))
        .collect();
    Cluster {
        processes,
        log_from,
    }
}

/// Waits until `process` exits, for at most `timeout`.
fn wait_exit(process: &mut Process, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = process.exited() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a whole cluster as Kubernetes does (SIGTERM to every process once each handles it)
/// and checks that every process exits 0.
fn stop_cluster(deployment: &Deployment, cluster: Cluster) {
    let Cluster {
        mut processes,
        log_from,
    } = cluster;
    let deadline = Instant::now() + Duration::from_secs(60);
    let handled = || {
        let log = std::fs::read(&deployment.log).unwrap_or_default();
        String::from_utf8_lossy(&log[log_from.min(log.len())..])
            .matches(sightline::run::STOP_HANDLED)
            .count()
    };
    while handled() < processes.len() {
        assert!(Instant::now() < deadline, "{}", deployment.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in &processes {
        signal(p.pid(), "TERM");
    }
    for (i, p) in processes.iter_mut().enumerate() {
        let status = wait_exit(p, Duration::from_secs(60));
        assert!(
            status.is_some_and(|s| s.success()),
            "process {i} of a stopped cluster exited with {status:?}:\n{}",
            deployment.log_tail()
        );
    }
}

#[test]
fn two_and_three_processes_write_the_lake_of_one_and_survive_a_lost_peer() {
    let seed = seed("cluster");
    let broker = Tansu::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let workload = Workload::new(&format!("cluster-{seed}"), 4, 16_000, seed);
    broker.create_topic(&workload.topic, workload.partitions);
    workload.produce(&broker.bootstrap);

    let deploy = |name: &str, workers: usize, extra: &str| {
        let deployment = Deployment::new(
            dir.path(),
            name,
            &broker.bootstrap,
            &workload,
            workers,
            extra,
        );
        for topic in &deployment.output_topics {
            broker.create_topic(topic, 1);
        }
        deployment
    };

    // One process, two workers.
    let one = deploy("one", 2, "");
    let mut process = one.start();
    one.wait_for_records(&mut process, workload.events, Duration::from_secs(180));
    let (status, _) = process.terminate(Duration::from_secs(30));
    assert!(status.success(), "{}", one.log_tail());
    let want = snapshot(&one.lake);
    assert!(want.len() > 20, "the reference wrote {} files", want.len());

    // Two processes of one worker each.
    let two = deploy("two", 1, &cluster_table(2));
    let mut cluster = start_cluster(&two, 2);
    two.wait_for_records(
        &mut cluster.processes[0],
        workload.events,
        Duration::from_secs(180),
    );
    stop_cluster(&two, cluster);
    if let Some(diff) = difference(&want, &snapshot(&two.lake)) {
        panic!(
            "2 processes wrote another lake than 1: {diff}\n{}",
            two.log_tail()
        );
    }
    let log = std::fs::read_to_string(&two.log).unwrap_or_default();
    assert!(log.contains("cluster: every peer connected"), "{log}");

    // Three processes; process 1 is killed mid-run: the others stop with the error line and
    // a non-zero exit; the restarted cluster completes the lake, equal to one process's.
    let three = deploy("three", 1, &cluster_table(3));
    let mut processes = start_cluster(&three, 3).processes;
    // Mid-run: some windows written, not all.
    let deadline = Instant::now() + Duration::from_secs(120);
    while sightline_integration_tests::chaos::records_counted(&snapshot(&three.lake)) < 2_000 {
        assert!(Instant::now() < deadline, "{}", three.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    let victim = processes.remove(1);
    victim.kill9();
    let lost = Instant::now();
    for (i, p) in processes.iter_mut().enumerate() {
        let status = wait_exit(p, Duration::from_secs(30));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(sightline::cluster::LOST_PEER_EXIT),
            "a surviving process ({i}) must exit {} when a peer is lost:\n{}",
            sightline::cluster::LOST_PEER_EXIT,
            three.log_tail()
        );
    }
    println!(
        "every surviving process exited {:?} after the kill",
        lost.elapsed()
    );
    let log = std::fs::read_to_string(&three.log).unwrap_or_default();
    assert_eq!(
        log.matches("lost a peer").count(),
        2,
        "one error line per surviving process:\n{log}"
    );
    drop(processes);
    let mut cluster = start_cluster(&three, 3);
    three.wait_for_records(
        &mut cluster.processes[0],
        workload.events,
        Duration::from_secs(180),
    );
    stop_cluster(&three, cluster);
    if let Some(diff) = difference(&want, &snapshot(&three.lake)) {
        panic!(
            "3 processes, one killed and all restarted, wrote another lake than 1: {diff}\n{}",
            three.log_tail()
        );
    }
}

/// A configuration for `replay` in `dir`: `extra` TOML after a `[privacy]` key.
fn replay_config(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("config");
    path
}

fn replay(config: &Path, input: &Path, out: &Path, process: usize) -> std::process::Child {
    Command::new(sightline_binary())
        .args(["replay", "--input"])
        .arg(input)
        .arg("--out")
        .arg(out)
        .arg("--config")
        .arg(config)
        .env("SIGHTLINE__CLUSTER__PROCESS", process.to_string())
        .env("SIGHTLINE_LOG", "warn,sightline=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting sightline")
}

fn finish(child: std::process::Child) -> (ExitStatus, String, String) {
    let out = child.wait_with_output().expect("sightline output");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `events` generated events in `dir/events.ndjson`.
fn generate(dir: &Path, events: usize) -> std::path::PathBuf {
    let input = dir.join("events.ndjson");
    let status = Command::new(sightline_binary())
        .args(["generate", "--events", &events.to_string(), "--out"])
        .arg(&input)
        .stdout(Stdio::null())
        .status()
        .expect("generate");
    assert!(status.success());
    input
}

/// A bounded replay on two processes: the same lake as one process, and process 0's summary
/// counts the whole cluster's records.
#[test]
fn a_replay_on_two_processes_reports_the_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 12000);
    let single = replay_config(
        dir.path(),
        "one.toml",
        &format!("[pipeline]\nworkers = 2\n[privacy]\nkey = \"{KEY}\"\n"),
    );
    let (status, one_out, err) = finish(replay(&single, &input, &dir.path().join("one"), 0));
    assert!(status.success(), "{err}");
    let addresses = free_addresses(2);
    let cluster = replay_config(
        dir.path(),
        "two.toml",
        &format!(
            "[pipeline]\nworkers = 1\n[privacy]\nkey = \"{KEY}\"\n{}",
            cluster_table_of(&addresses)
        ),
    );
    let out = dir.path().join("two");
    // Process 0 first; a stranger knocks on its port (an HTTP request, then a connection
    // that says nothing) before process 1 comes: process 0 drops them and waits on.
    let p0 = replay(&cluster, &input, &out, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut knock = loop {
        if let Ok(s) = std::net::TcpStream::connect(&addresses[0]) {
            break s;
        }
        assert!(Instant::now() < deadline, "process 0 never listened");
        std::thread::sleep(Duration::from_millis(20));
    };
    knock
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("a stranger's request");
    drop(knock);
    let silent = std::net::TcpStream::connect(&addresses[0]).expect("a silent connection");
    let p1 = replay(&cluster, &input, &out, 1);
    let (s0, out0, err0) = finish(p0);
    drop(silent);
    let (s1, out1, err1) = finish(p1);
    assert!(s0.success() && s1.success(), "{err0}\n{err1}");
    if let Some(diff) = difference(&snapshot(&dir.path().join("one")), &snapshot(&out)) {
        panic!("2 processes wrote another lake than 1: {diff}");
    }
    // "read 12000 · accepted … · windows …": process 0's summary is the cluster's; process 1
    // says it reports its share.
    let counts = |line: &str| line.split(" · files").next().unwrap_or("").to_owned();
    assert_eq!(counts(&out0), counts(&one_out), "{out0}");
    assert!(out0.contains("cluster of 2 processes"), "{out0}");
    assert!(
        out1.contains("process 1 of 2: its own share of the records"),
        "{out1}"
    );
}

/// Processes with different configurations are refused, naming the field; a cluster without
/// a key is refused; a process whose peers never come gives up after its timeout.
#[test]
fn mismatched_keyless_and_lonely_processes_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("events.ndjson");
    std::fs::File::create(&input)
        .and_then(|mut f| f.write_all(b""))
        .expect("input");
    let table = cluster_table(2);
    let a = replay_config(
        dir.path(),
        "a.toml",
        &format!("[pipeline]\nwindow-ms = 60000\n[privacy]\nkey = \"{KEY}\"\n{table}"),
    );
    let b = replay_config(
        dir.path(),
        "b.toml",
        &format!("[pipeline]\nwindow-ms = 30000\n[privacy]\nkey = \"{KEY}\"\n{table}"),
    );
    let out = dir.path().join("lake");
    let p1 = replay(&b, &input, &out, 1);
    let (s0, _, err0) = finish(replay(&a, &input, &out, 0));
    let (s1, _, err1) = finish(p1);
    assert!(!s0.success() && !s1.success(), "{err0}\n{err1}");
    for err in [&err0, &err1] {
        assert!(err.contains("`pipeline.window-ms` differs"), "{err}");
    }

    let keyless = replay_config(dir.path(), "keyless.toml", &cluster_table(2));
    let (status, _, err) = finish(replay(&keyless, &input, &out, 0));
    assert!(!status.success());
    assert!(
        err.contains("a cluster needs a configured pseudonymization key"),
        "{err}"
    );

    let lonely = replay_config(
        dir.path(),
        "lonely.toml",
        &format!(
            "[privacy]\nkey = \"{KEY}\"\n{}",
            cluster_table(2).replace("connect-timeout-ms = 60000", "connect-timeout-ms = 1500")
        ),
    );
    let started = Instant::now();
    let (status, _, err) = finish(replay(&lonely, &input, &out, 1));
    assert!(!status.success());
    assert!(err.contains("gave up waiting for process(es) [0]"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// An error in one process (its input cannot be read) stops the other with the lost-peer exit
/// instead of leaving it waiting for a peer that is gone.
#[test]
fn an_error_in_one_process_stops_the_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 2000);
    let cluster = replay_config(
        dir.path(),
        "two.toml",
        &format!("[privacy]\nkey = \"{KEY}\"\n{}", cluster_table(2)),
    );
    let out = dir.path().join("lake");
    let started = Instant::now();
    let p1 = replay(&cluster, &dir.path().join("missing.ndjson"), &out, 1);
    let (s0, _, err0) = finish(replay(&cluster, &input, &out, 0));
    let (s1, _, err1) = finish(p1);
    assert_eq!(
        s1.code(),
        Some(1),
        "the failing process reports its own error: {err1}"
    );
    assert!(err1.contains("missing.ndjson"), "{err1}");
    assert_eq!(
        s0.code(),
        Some(sightline::cluster::LOST_PEER_EXIT),
        "the other process stops: {err0}"
    );
    assert!(err0.contains("lost a peer"), "{err0}");
    assert!(started.elapsed() < Duration::from_secs(60));
}
