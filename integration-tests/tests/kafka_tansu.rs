//! The pipeline against a real Kafka-protocol broker: tansu, started on a loopback port.

mod common;

use common::kafka::round_trip;
use sightline_integration_tests::servers::Tansu;

#[test]
fn tansu_round_trip_on_one_worker() {
    let broker = Tansu::shared();
    broker.create_topic("tansu.events", 4);
    broker.create_topic("tansu.sampling", 1);
    round_trip(
        &broker.bootstrap,
        &[("tansu.events", 4)],
        3_000,
        1,
        Some("tansu.sampling"),
    );
}

#[test]
fn tansu_two_topics_on_three_workers() {
    let broker = Tansu::shared();
    broker.create_topic("tansu.product", 2);
    broker.create_topic("tansu.command-center", 1);
    // Two topics, three partitions in all, spread over three workers; the topics' partitions
    // interleave in the assignment order.
    round_trip(
        &broker.bootstrap,
        &[("tansu.product", 2), ("tansu.command-center", 1)],
        2_000,
        3,
        None,
    );
}

#[test]
fn tansu_more_workers_than_partitions() {
    let broker = Tansu::shared();
    broker.create_topic("tansu.narrow", 1);
    // The second worker reads nothing and follows the wall clock, so it never holds windows open.
    round_trip(&broker.bootstrap, &[("tansu.narrow", 1)], 1_500, 2, None);
}
