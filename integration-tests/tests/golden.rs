//! Golden outputs: a fixed generated input, replayed on 1 and on 2 workers, must give exactly the
//! lake in `integration-tests/golden/` (every table, every file, every row, every value, and
//! each file's retention metadata), as Arroyo's `golden_outputs/` do.
//!
//! The input exercises every path: valid events of both taxonomies, late events, broken
//! records, and dirty records (personal data where it must not be, restricted routing). A
//! changed golden file is a reviewed change: when an output is meant to change, regenerate with
//! `SIGHTLINE_BLESS=1 cargo test -p sightline-integration-tests --test golden` and review the
//! diff line by line before committing it.

mod common;

use std::fmt::Write as _;
use std::path::Path;

use sightline::generator::{Generator, GeneratorConfig};
use sightline_integration_tests::parquet_text;

/// The input: 2,000 lines, 2% broken, 1% late, 3% dirty, at 40 events/s: 50 s of event time,
/// six windows of 10 s.
fn input(path: &Path) {
    let mut generator = Generator::new(GeneratorConfig {
        seed: 20_261_130,
        bad_fraction: 0.02,
        late_fraction: 0.01,
        dirty_fraction: 0.03,
        events_per_second: 40.0,
        ..GeneratorConfig::default()
    });
    let mut bytes = Vec::new();
    for _ in 0..2_000 {
        generator.next_line(&mut bytes);
        bytes.push(b'\n');
    }
    std::fs::write(path, bytes).expect("writing the input");
}

/// Every file of the lake, in path order: its path, its retention, and its rows as text.
fn dump(lake: &Path) -> String {
    let mut files = Vec::new();
    common::parquet_files(lake, &mut files);
    files.sort();
    let mut out = String::new();
    for file in files {
        let relative = file
            .strip_prefix(lake)
            .expect("under the lake")
            .display()
            .to_string();
        let bytes = std::fs::read(&file).expect("read");
        let (rows, retention) = parquet_text::read(bytes.into());
        let retention = retention.unwrap_or_default();
        writeln!(out, "== {relative} (retention {retention} days)").expect("string");
        for row in rows {
            writeln!(out, "{}", parquet_text::line(&row)).expect("string");
        }
    }
    out
}

fn check(workers: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let input_path = dir.path().join("events.ndjson");
    input(&input_path);
    let lake = dir.path().join("lake");
    let summary = common::replay(&input_path, &lake, common::config(workers));
    assert_eq!(summary.read, 2_000);
    // The input's temporary path is in every dead letter's `topic`.
    let got = dump(&lake).replace(input_path.to_str().expect("utf-8"), "<input>");
    let golden =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("golden/replay-{workers}w.txt"));
    if std::env::var_os("SIGHTLINE_BLESS").is_some() {
        std::fs::write(&golden, &got).expect("writing the golden file");
        return;
    }
    let want = std::fs::read_to_string(&golden)
        .unwrap_or_else(|e| panic!("{}: {e} (SIGHTLINE_BLESS=1 writes it)", golden.display()));
    if got != want {
        let first = got.lines().zip(want.lines()).position(|(g, w)| g != w);
        let line = first.unwrap_or(got.lines().count().min(want.lines().count()));
        panic!(
            "the lake differs from {} at line {}:\n  golden: {}\n  now:    {}\n({} lines now, {} golden)",
            golden.display(),
            line + 1,
            want.lines().nth(line).unwrap_or("<end>"),
            got.lines().nth(line).unwrap_or("<end>"),
            got.lines().count(),
            want.lines().count(),
        );
    }
}

#[test]
fn one_worker_matches_the_golden_lake() {
    check(1);
}

#[test]
fn two_workers_match_the_golden_lake() {
    check(2);
}
