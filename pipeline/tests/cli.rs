//! The `sightline` binary, as a user runs it.

use std::process::{Command, Stdio};

fn sightline() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sightline"))
}

fn parquet_files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "parquet") {
                out.push(p.strip_prefix(dir).unwrap_or(&p).display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn generate_then_replay_a_file_and_stdin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("e.ndjson");
    let status = sightline()
        .args(["generate", "--events", "3000", "--out"])
        .arg(&input)
        .args(["--seed", "9"])
        .status()
        .expect("generate");
    assert!(status.success());
    assert_eq!(
        std::fs::read(&input)
            .expect("input")
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        3000
    );

    let out = dir.path().join("lake");
    let output = sightline()
        .args(["replay", "--input"])
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("replay");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(summary.starts_with("read 3000 · accepted "), "{summary}");
    let files = parquet_files(&out);
    for table in [
        "event_counts",
        "latency",
        "latency_by_variant",
        "quality",
        "dead_letter",
    ] {
        assert!(
            files.iter().any(|f| f.starts_with(&format!("{table}/dt="))),
            "no {table} file in {files:?}"
        );
    }

    // The same input through standard input gives the same summary.
    let child = sightline()
        .args(["replay", "--input", "-", "--out"])
        .arg(dir.path().join("lake-stdin"))
        .stdin(std::fs::File::open(&input).expect("open"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("replay from stdin");
    let output = child.wait_with_output().expect("wait");
    assert!(output.status.success());
    // Only the file sizes differ: dead letters name their origin (`stdin` instead of the path).
    let without_bytes = |s: &str| s.split(" rows, ").next().unwrap_or_default().to_string();
    assert_eq!(
        without_bytes(&String::from_utf8_lossy(&output.stdout)),
        without_bytes(&summary)
    );
}

#[test]
fn errors_are_clear_and_exit_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = sightline()
        .args(["replay", "--input", "/no/such/file.ndjson", "--out"])
        .arg(dir.path())
        .output()
        .expect("replay");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/no/such/file.ndjson"));

    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[pipeline]\nwindow-ms = 1500\n").expect("config");
    let output = sightline()
        .args(["replay", "--input", "-", "--out"])
        .arg(dir.path())
        .arg("--config")
        .arg(&config)
        .output()
        .expect("replay");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("window-ms"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn config_check_accepts_the_example_and_names_the_bad_field() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../sightline.example.toml");
    let output = sightline()
        .args(["config", "check", example])
        .output()
        .expect("config check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("valid"), "{stdout}");

    let dir = tempfile::tempdir().expect("tempdir");
    for (text, field) in [
        ("[pipeline]\nwindows-ms = 60000\n", "windows-ms"),
        ("[kafka]\nbootstrap-servers = 7\n", "bootstrap-servers"),
        (
            "[sampling]\ninterval-windows = 0\n",
            "sampling.interval-windows",
        ),
        (
            "[lake]\nlocation = \"/data\"\n[lake.s3]\nregion = [1]\n",
            "region",
        ),
    ] {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).expect("config");
        let output = sightline()
            .args(["config", "check"])
            .arg(&file)
            .output()
            .expect("config check");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{text}: {stderr}");
        assert!(stderr.contains(field), "{text}: {stderr}");
    }
}

/// `demo --processes 2`: a loopback cluster of this process and one it starts; both stop by
/// themselves and exit 0, and process 0 reports the cluster's windows and summary.
#[test]
fn demo_runs_as_a_two_process_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("sightline-data");
    let config = dir.path().join("demo.toml");
    std::fs::write(&config, "[http]\nlisten = \"\"\n").expect("config");
    let output = sightline()
        .args([
            "demo",
            "--processes",
            "2",
            "--seconds",
            "20",
            "--rate",
            "1000",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("demo");
    let stdout = demo_succeeded(&output, &out);
    assert!(
        stdout.contains("demo cluster: process 1 started"),
        "{stdout}"
    );
    // A stopped cluster's process 0 counts every window, and its own share of the records.
    assert!(
        stdout.contains("process 0 of 2: the cluster's windows and files"),
        "{stdout}"
    );
}

/// Checks what every demo run shows: exit 0, a closed window's line, latency files in `out`;
/// returns its standard output.
fn demo_succeeded(output: &std::process::Output, out: &std::path::Path) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("window ") && l.contains(" closed: in ")),
        "no closed window in:\n{stdout}"
    );
    assert!(
        parquet_files(out)
            .iter()
            .any(|f| f.starts_with("latency/dt=")),
        "no latency files"
    );
    stdout
}

#[test]
fn demo_runs_on_the_embedded_default_and_stops_by_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("sightline-data");
    let output = sightline()
        .args(["demo", "--seconds", "16", "--rate", "1500", "--out"])
        .arg(&out)
        .output()
        .expect("demo");
    let stdout = demo_succeeded(&output, &out);
    assert!(stdout.contains("stopped after producing"), "{stdout}");
}
