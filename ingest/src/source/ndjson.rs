//! Bounded NDJSON input: a file, standard input, or bytes in memory.
//!
//! Lines are split among workers round-robin by line number (line `i` belongs to worker
//! `i mod peers`); every worker scans the whole input but copies and decodes only its own
//! lines. Standard input cannot be shared, so worker 0 reads all of it. A line longer than
//! the limit is never held in memory: its bytes are skipped and it becomes an `oversize`
//! record with its size.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::Error;

use super::{Emit, PartitionState, Payload, ReadStatus, Record, RecordReader};

/// Reads one worker's share of an NDJSON input.
pub struct NdjsonReader {
    input: Box<dyn BufRead>,
    /// `file:<path>` or `stdin`: the topic of its records.
    label: String,
    /// The one partition: the input.
    partitions: [PartitionState; 1],
    worker: u64,
    peers: u64,
    line: u64,
    max_line_bytes: usize,
    buf: Vec<u8>,
    done: bool,
}

impl NdjsonReader {
    /// Opens `path` (`-` for standard input) for worker `worker` of `peers`.
    pub fn open(
        path: &str,
        worker: usize,
        peers: usize,
        max_line_bytes: usize,
    ) -> crate::Result<NdjsonReader> {
        if path == "-" {
            let input: Box<dyn BufRead> = if worker == 0 {
                Box::new(BufReader::with_capacity(1 << 20, std::io::stdin()))
            } else {
                Box::new(std::io::empty())
            };
            return Ok(NdjsonReader::new(
                input,
                "stdin".into(),
                0,
                1,
                max_line_bytes,
            ));
        }
        let file = File::open(Path::new(path)).map_err(|source| Error::Io {
            action: "opening input",
            input: path.to_owned(),
            source,
        })?;
        Ok(NdjsonReader::new(
            Box::new(BufReader::with_capacity(1 << 20, file)),
            format!("file:{path}"),
            worker,
            peers,
            max_line_bytes,
        ))
    }

    /// Reads NDJSON from any buffered reader; `label` names it in dead-letter records.
    pub fn new(
        input: Box<dyn BufRead>,
        label: String,
        worker: usize,
        peers: usize,
        max_line_bytes: usize,
    ) -> NdjsonReader {
        NdjsonReader {
            input,
            partitions: [PartitionState::new(&label, 0)],
            label,
            worker: worker as u64,
            peers: peers.max(1) as u64,
            line: 0,
            max_line_bytes,
            buf: Vec::with_capacity(4096),
            done: false,
        }
    }

    /// Reads the next line into `buf`; returns `None` at the end, or `Some((mine, size))`.
    fn next_line(&mut self) -> std::io::Result<Option<(bool, u64)>> {
        self.buf.clear();
        let mine = self.line % self.peers == self.worker;
        let mut size = 0u64;
        let mut any = false;
        loop {
            let available = match self.input.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                return Ok(any.then_some((mine, size)));
            }
            any = true;
            let (take, consume, end) = match memchr::memchr(b'\n', available) {
                Some(i) => (i, i + 1, true),
                None => (available.len(), available.len(), false),
            };
            size += take as u64;
            if mine && size <= self.max_line_bytes as u64 {
                self.buf.extend_from_slice(&available[..take]);
            } else {
                self.buf.clear();
            }
            self.input.consume(consume);
            if end {
                return Ok(Some((mine, size)));
            }
        }
    }
}

impl RecordReader for NdjsonReader {
    fn partitions(&self) -> &[PartitionState] {
        &self.partitions
    }

    fn partitions_mut(&mut self) -> &mut [PartitionState] {
        &mut self.partitions
    }

    fn is_bounded(&self) -> bool {
        true
    }

    fn read(&mut self, max: usize, emit: &mut Emit<'_>) -> crate::Result<ReadStatus> {
        if self.done {
            return Ok(ReadStatus::Exhausted);
        }
        let mut emitted = 0;
        while emitted < max {
            let Some((mine, size)) = self.next_line().map_err(|source| Error::Io {
                action: "reading",
                input: self.label.clone(),
                source,
            })?
            else {
                self.done = true;
                return Ok(ReadStatus::Exhausted);
            };
            let line = self.line;
            self.line += 1;
            if !mine {
                continue;
            }
            emitted += 1;
            let payload = if size > self.max_line_bytes as u64 {
                Payload::Oversize(size)
            } else {
                Payload::Bytes(&self.buf)
            };
            self.partitions[0].next_offset = Some(line as i64 + 1);
            let record = Record {
                slot: 0,
                topic: &self.label,
                partition: 0,
                offset: line as i64,
                timestamp_ms: None,
                payload,
            };
            emit(record, &mut self.partitions);
        }
        Ok(ReadStatus::More)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn collect(
        text: &[u8],
        worker: usize,
        peers: usize,
        max: usize,
    ) -> Vec<(i64, Option<Vec<u8>>, u64)> {
        let mut reader = NdjsonReader::new(
            Box::new(std::io::Cursor::new(text.to_vec())),
            "mem".into(),
            worker,
            peers,
            max,
        );
        let mut out = Vec::new();
        loop {
            let status = reader
                .read(2, &mut |r, _| match r.payload {
                    Payload::Bytes(b) => out.push((r.offset, Some(b.to_vec()), b.len() as u64)),
                    Payload::Oversize(n) => out.push((r.offset, None, n)),
                })
                .unwrap();
            if status == ReadStatus::Exhausted {
                return out;
            }
        }
    }

    #[test]
    fn splits_lines_and_keeps_empty_ones() {
        let all = collect(b"a\n\nccc\r\nd", 0, 1, 100);
        assert_eq!(
            all,
            vec![
                (0, Some(b"a".to_vec()), 1),
                (1, Some(vec![]), 0),
                (2, Some(b"ccc\r".to_vec()), 4),
                (3, Some(b"d".to_vec()), 1)
            ]
        );
        let odd: Vec<i64> = collect(b"a\nb\nc\nd\n", 1, 2, 100)
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(odd, vec![1, 3]);
    }

    #[test]
    fn oversize_lines_are_measured_not_held() {
        let mut text = vec![b'x'; 50_000];
        text.extend_from_slice(b"\nok\n");
        assert_eq!(
            collect(&text, 0, 1, 1000),
            vec![(0, None, 50_000), (1, Some(b"ok".to_vec()), 2)]
        );
    }
}
