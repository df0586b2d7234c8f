//! An unbounded source whose partitions go idle: the watermark follows the wall clock, and a
//! record that fails after that is processed at the new capability, never in a window that is
//! already written (which would rewrite that window's file with a partial content).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sightline::dataflow::{Analytics, build};
use sightline::emit::Outputs;
use sightline::generator::{Generator, GeneratorConfig};
use sightline_ingest::Decoder;
use sightline_ingest::source::{
    Decoders, Emit, IngestSettings, IngestStats, PartitionState, Payload, ReadStatus, Record,
    RecordReader,
};
use sightline_operators::{Time, Windows};
use sightline_privacy::KeyRing;
use sightline_sinks::Lake;

/// One good event, silence, one broken record, then the end.
struct Scripted {
    partitions: [PartitionState; 1],
    started: Instant,
    step: usize,
    good: Vec<u8>,
}

impl RecordReader for Scripted {
    fn partitions(&self) -> &[PartitionState] {
        &self.partitions
    }

    fn partitions_mut(&mut self) -> &mut [PartitionState] {
        &mut self.partitions
    }

    fn is_bounded(&self) -> bool {
        false
    }

    fn read(&mut self, _max: usize, emit: &mut Emit<'_>) -> sightline_ingest::Result<ReadStatus> {
        let record = |offset, payload| Record {
            slot: 0,
            topic: "scripted",
            partition: 0,
            offset,
            timestamp_ms: None,
            payload,
        };
        match self.step {
            0 => emit(record(0, Payload::Bytes(&self.good)), &mut self.partitions),
            1 if self.started.elapsed() < Duration::from_millis(600) => {
                return Ok(ReadStatus::Idle);
            }
            1 => emit(
                record(1, Payload::Bytes(b"{\"broken\":")),
                &mut self.partitions,
            ),
            _ => return Ok(ReadStatus::Exhausted),
        }
        self.step += 1;
        Ok(ReadStatus::Idle)
    }
}

#[test]
fn a_record_after_an_idle_jump_never_reopens_a_written_window() {
    let mut good = Vec::new();
    Generator::new(GeneratorConfig {
        bad_fraction: 0.0,
        late_fraction: 0.0,
        ..GeneratorConfig::default()
    })
    .event(1_769_178_605_000, &mut good);
    let lake = Lake::open("memory://").expect("lake");
    let check = lake.clone();
    let (reports, _keep) = std::sync::mpsc::channel();
    timely::execute_directly(move |worker| {
        let windows = Windows::new(10_000);
        let settings = IngestSettings {
            tick_ms: 1_000,
            lateness_ms: 1_000,
            idle_timeout: Duration::from_millis(100),
            batch_size: 16,
            windows,
            decoders: Decoders::new(Decoder::new(
                1 << 20,
                Arc::new(KeyRing::from_hex("test", &"5a".repeat(32), 30).unwrap()),
            )),
            max_future_skew_ms: 3_600_000,
            drain: Default::default(),
        };
        let reader = Box::new(Scripted {
            partitions: [PartitionState::new("scripted", 0)],
            started: Instant::now(),
            step: 0,
            good: good.clone(),
        });
        let outputs = Outputs {
            lake: lake.clone(),
            restricted_lake: lake.routed("restricted", "restricted", 30),
            dead_letter_topic: None,
            retry: Default::default(),
            health: Default::default(),
            reports: reports.clone(),
            state: None,
            alerts_topic: None,
            triage_topic: None,
            guardrail_topic: None,
            sampling_topic: None,
            views: Default::default(),
        };
        let stats = Arc::new(IngestStats::default());
        let probe = worker
            .dataflow::<Time, _, _>(|scope| {
                build(scope, reader, settings, &Analytics::none(), stats, outputs)
            })
            .durable;
        while !probe.done() {
            worker.step_or_park(Some(Duration::from_millis(10)));
        }
    });

    let quality = check.list("quality").expect("list");
    assert_eq!(
        quality.len(),
        2,
        "the event's window and the later processing window: {quality:?}"
    );
    assert!(
        quality[0].contains("part-20260123T143000Z-20260123T143010Z"),
        "{quality:?}"
    );
    // The event's window still holds its accepted event (and its pseudonymized-fields count):
    // it was written once, not replaced by a file without them.
    assert_eq!(check.read_rows(&quality[0]).expect("rows"), 2);
    let dead = check.list("dead_letter").expect("list");
    assert_eq!(dead.len(), 1);
    assert!(
        !dead[0].contains("dt=2026-01-23"),
        "the broken record is processed at the wall clock, not in January: {dead:?}"
    );
}
