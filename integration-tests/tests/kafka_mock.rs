//! The pipeline against librdkafka's in-process mock cluster (the demo's embedded broker).

mod common;

use rdkafka::mocking::MockCluster;

#[test]
fn mock_cluster_round_trip_on_two_workers() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("mock.events", 3, 1).expect("topic");
    common::kafka::round_trip(&cluster.bootstrap_servers(), &[("mock.events", 3)], 2_000, 2);
}
