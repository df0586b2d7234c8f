//! Support for Sightline's benchmarks: a constant-memory source of generated events.
//!
//! [`CyclingReader`] serves any number of events from a fixed block of generated lines, one
//! worker's share each, rewriting each line's timestamp so that event time advances at a
//! fixed rate: memory does not grow with the number of events served, which is what the
//! memory-growth measurement needs. Its per-event cost (a copy and a 24-byte timestamp
//! rewrite) is paid equally by the pipeline and by the parse-only baseline.

use std::sync::Arc;

use sightline::generator::{Generator, GeneratorConfig};
use sightline_ingest::source::{Emit, PartitionState, Payload, ReadStatus, Record, RecordReader};
use sightline_schemas::rfc3339_bytes;

/// A block of generated NDJSON lines, with the position of each line's timestamp value.
#[derive(Debug)]
pub struct Block {
    lines: Vec<Vec<u8>>,
    timestamp_at: Vec<Option<usize>>,
}

impl Block {
    /// `size` generated lines (about 880 bytes each), with the generator's default share of late
    /// and broken records.
    pub fn generate(size: usize, seed: u64) -> Arc<Block> {
        let mut generator = Generator::new(GeneratorConfig {
            seed,
            ..GeneratorConfig::default()
        });
        Block::of_lines(
            (0..size)
                .map(|_| {
                    let mut line = Vec::new();
                    generator.next_line(&mut line);
                    line
                })
                .collect(),
        )
    }

    /// The block the benchmarks run on: the lines of the NDJSON file `SIGHTLINE_BENCH_INPUT`
    /// when it is set (so that two benchmark binaries, say one from before a change of the
    /// generator, can run on the same bytes), else `size` generated lines.
    pub fn generate_or_load(size: usize, seed: u64) -> std::io::Result<Arc<Block>> {
        match std::env::var_os("SIGHTLINE_BENCH_INPUT") {
            Some(path) => {
                let text = std::fs::read(&path)?;
                let lines: Vec<Vec<u8>> = text
                    .split(|b| *b == b'\n')
                    .filter(|line| !line.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect();
                if lines.is_empty() {
                    return Err(std::io::Error::other(format!(
                        "SIGHTLINE_BENCH_INPUT {} has no lines",
                        std::path::Path::new(&path).display()
                    )));
                }
                Ok(Block::of_lines(lines))
            }
            None => Ok(Block::generate(size, seed)),
        }
    }

    /// A block of `lines`, each line's timestamp found for [`CyclingReader`] to rewrite.
    fn of_lines(lines: Vec<Vec<u8>>) -> Arc<Block> {
        let key = b"\"timestamp\":\"";
        let timestamp_at = lines
            .iter()
            .map(|line| {
                line.windows(key.len())
                    .position(|w| w == key)
                    .map(|i| i + key.len())
                    .filter(|i| line.len() >= i + 24)
            })
            .collect();
        Arc::new(Block {
            lines,
            timestamp_at,
        })
    }

    /// The block's lines as NDJSON (`end_to_end --dump-block FILE` writes them, for
    /// `SIGHTLINE_BENCH_INPUT`).
    pub fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        for line in &self.lines {
            out.write_all(line)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Total bytes of the block.
    pub fn bytes(&self) -> usize {
        self.lines.iter().map(Vec::len).sum()
    }

    /// Number of lines.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether the block is empty.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

/// Serves `total` events cycled from a [`Block`]: worker `w` of `peers` serves events
/// `w, w + peers, …`; event `i` gets event time `start_ms + i · 1000 / events_per_second`.
pub struct CyclingReader {
    block: Arc<Block>,
    next: u64,
    peers: u64,
    total: u64,
    start_ms: i64,
    ms_per_event: f64,
    buf: Vec<u8>,
    partitions: [PartitionState; 1],
}

impl CyclingReader {
    /// A reader for worker `worker` of `peers`.
    pub fn new(
        block: Arc<Block>,
        worker: usize,
        peers: usize,
        total: u64,
        start_ms: i64,
        events_per_second: f64,
    ) -> CyclingReader {
        CyclingReader {
            block,
            next: worker as u64,
            peers: peers.max(1) as u64,
            total,
            start_ms,
            ms_per_event: 1000.0 / events_per_second,
            buf: Vec::with_capacity(4096),
            partitions: [PartitionState::new("benchmark", 0)],
        }
    }

    /// Puts event `i` into the buffer, with its timestamp rewritten.
    fn fill(&mut self, i: u64) {
        let slot = (i % self.block.len() as u64) as usize;
        self.buf.clear();
        self.buf.extend_from_slice(&self.block.lines[slot]);
        if let Some(at) = self.block.timestamp_at[slot] {
            let time = self.start_ms + (i as f64 * self.ms_per_event) as i64;
            self.buf[at..at + 24].copy_from_slice(&rfc3339_bytes(time));
        }
    }

    /// Hands each of this worker's remaining events to `each`, without a pipeline: the
    /// parse-only baseline reads through this.
    pub fn for_each(&mut self, mut each: impl FnMut(&[u8])) {
        while self.next < self.total {
            let i = self.next;
            self.next += self.peers;
            self.fill(i);
            each(&self.buf);
        }
    }
}

impl RecordReader for CyclingReader {
    fn partitions(&self) -> &[PartitionState] {
        &self.partitions
    }

    fn partitions_mut(&mut self) -> &mut [PartitionState] {
        &mut self.partitions
    }

    fn is_bounded(&self) -> bool {
        true
    }

    fn read(&mut self, max: usize, emit: &mut Emit<'_>) -> sightline_ingest::Result<ReadStatus> {
        for _ in 0..max {
            if self.next >= self.total {
                return Ok(ReadStatus::Exhausted);
            }
            let i = self.next;
            self.next += self.peers;
            self.fill(i);
            self.partitions[0].next_offset = Some(i as i64 + 1);
            let record = Record {
                slot: 0,
                topic: "benchmark",
                partition: 0,
                offset: i as i64,
                timestamp_ms: None,
                payload: Payload::Bytes(&self.buf),
            };
            emit(record, &mut self.partitions);
        }
        Ok(ReadStatus::More)
    }
}

/// Peak resident memory of this process so far, in KiB (`VmHWM`), where the OS reports it.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
