//! Micro-benchmarks of the per-event hot paths: decoding (envelope parse, schema validation,
//! privacy), pseudonymization and scrubbing on their own, histogram update and quantile read,
//! window assignment, and Parquet encoding of a closed window.
//!
//! Run with `cargo bench -p sightline-benches --bench hot_paths`. Each group reports
//! throughput in events (or rows) per second; compare groups within one run, not across
//! machines. The end-to-end benchmark and its report are the subject of the performance work
//! (see `benches/README.md`).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sightline::generator::{Generator, GeneratorConfig};
use sightline_operators::{LatencyHistogram, Windows};
use std::sync::Arc;

use sightline_ingest::Decoder;
use sightline_privacy::{KeyRing, Pseudonymizer, Scrubber};
use sightline_sinks::parquet_encode;
use sightline_sinks::tables::{LatencyRow, LatencyStats};

fn events(n: usize) -> Vec<Vec<u8>> {
    let mut generator = Generator::new(GeneratorConfig {
        bad_fraction: 0.0,
        late_fraction: 0.0,
        ..GeneratorConfig::default()
    });
    (0..n)
        .map(|_| {
            let mut line = Vec::new();
            generator.next_line(&mut line);
            line
        })
        .collect()
}

fn decode(c: &mut Criterion) {
    let lines = events(10_000);
    let bytes: usize = lines.iter().map(Vec::len).sum();
    let mut decoder = Decoder::new(1 << 20, bench_key());
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.bench_function(
        format!(
            "decode + validate + privacy ({} bytes/event)",
            bytes / lines.len()
        ),
        |b| {
            b.iter(|| {
                for line in &lines {
                    black_box(decoder.decode(line).ok());
                }
            })
        },
    );
    group.bench_function("envelope parse only", |b| {
        b.iter(|| {
            for line in &lines {
                black_box(decoder.parse_only(line).ok());
            }
        })
    });
    group.bench_function("serde_json::Value baseline", |b| {
        b.iter(|| {
            for line in &lines {
                black_box(serde_json::from_slice::<serde_json::Value>(line).ok());
            }
        })
    });
    group.finish();
}

fn bench_key() -> Arc<KeyRing> {
    // A fixed key for measurement only; production keys come from configuration.
    Arc::new(KeyRing::from_hex("bench", &"3c".repeat(32), 30).unwrap_or_else(|e| panic!("{e}")))
}

fn privacy(c: &mut Criterion) {
    let ids: Vec<String> = (0..10_000u64)
        .map(|i| format!("u_{:016x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        .collect();
    let mut pseudonyms = Pseudonymizer::new(bench_key());
    let mut group = c.benchmark_group("privacy");
    group.throughput(Throughput::Elements(ids.len() as u64));
    group.bench_function("pseudonym (keyed BLAKE3)", |b| {
        b.iter(|| {
            for id in &ids {
                black_box(pseudonyms.pseudonym(id, 1_769_178_600_000));
            }
        })
    });
    let scrubber = Scrubber::new();
    let clean = "High pipeline value ($50k ARR), demo tomorrow (urgent), strong ICP fit";
    let dirty = "Call Jane at +1 415 555 0134 or jane.doe@example.com, token sk_live_4eC39HqLyjWDarjtT1zdp7dc";
    group.throughput(Throughput::Elements(1));
    group.bench_function("scrub clean free text", |b| {
        b.iter(|| black_box(scrubber.scrub(black_box(clean))))
    });
    group.bench_function("scrub a label (surface)", |b| {
        b.iter(|| black_box(scrubber.scrub(black_box("project_create_page"))))
    });
    group.bench_function("scrub dirty free text", |b| {
        b.iter(|| black_box(scrubber.scrub(black_box(dirty))))
    });
    group.finish();
}

fn histogram(c: &mut Criterion) {
    let samples: Vec<u64> = (0..10_000u64).map(|i| (i * 7919) % 5_000_000).collect();
    let mut group = c.benchmark_group("histogram");
    group.throughput(Throughput::Elements(samples.len() as u64));
    group.bench_function("record", |b| {
        b.iter(|| {
            let mut h = LatencyHistogram::default();
            for &s in &samples {
                h.record(s);
            }
            black_box(h)
        })
    });
    let mut full = LatencyHistogram::default();
    samples.iter().for_each(|&s| full.record(s));
    group.throughput(Throughput::Elements(4));
    group.bench_function("p50/p90/p95/p99", |b| {
        b.iter(|| [0.5, 0.9, 0.95, 0.99].map(|q| black_box(&full).quantile(q)))
    });
    group.finish();
}

fn windows(c: &mut Criterion) {
    let w = Windows::new(60_000);
    let times: Vec<u64> = (0..10_000u64).map(|i| 1_769_178_600_000 + i * 37).collect();
    let mut group = c.benchmark_group("windows");
    group.throughput(Throughput::Elements(times.len() as u64));
    group.bench_function("start_of", |b| {
        b.iter(|| times.iter().map(|&t| w.start_of(black_box(t))).sum::<u64>())
    });
    group.finish();
}

fn parquet(c: &mut Criterion) {
    let stats = LatencyStats {
        count: 10,
        weighted_count: 10.0,
        mean_ms: 12.0,
        p50_ms: 10.0,
        p90_ms: 20.0,
        p95_ms: 25.0,
        p99_ms: 40.0,
        max_ms: 50.0,
    };
    let rows: Vec<LatencyRow> = (0..1_000)
        .map(|i| LatencyRow {
            window_start_ms: 0,
            window_end_ms: 60_000,
            event_name: format!("event_{}", i % 21),
            feature_area: "projects".into(),
            surface: format!("s{i}"),
            stats: stats.clone(),
        })
        .collect();
    let mut group = c.benchmark_group("parquet");
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.bench_function("encode 1000 latency rows", |b| {
        b.iter(|| parquet_encode(black_box(&rows), &[]).map(|bytes| bytes.len()))
    });
    group.finish();
}

criterion_group!(hot_paths, decode, privacy, histogram, windows, parquet);
criterion_main!(hot_paths);
