//! The pipeline against a real Kafka-protocol broker: tansu, started on a loopback port.

mod common;

use common::kafka::{round_trip, Tansu};

#[test]
fn tansu_round_trip_on_one_worker() {
    let broker = Tansu::start();
    broker.create_topic("tansu.events", 4);
    round_trip(&broker.bootstrap, "tansu.events", 4, 3_000, 1);
}

#[test]
fn tansu_round_trip_on_three_workers() {
    let broker = Tansu::start();
    broker.create_topic("tansu.events.wide", 2);
    // More workers than partitions: the third worker reads nothing and follows the clock.
    round_trip(&broker.bootstrap, "tansu.events.wide", 2, 2_000, 3);
}
