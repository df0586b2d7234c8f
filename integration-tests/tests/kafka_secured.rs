//! A secured broker: TLS, and SASL as far as tansu supports it.
//!
//! tansu 0.6 takes `--cert` and `--key` but does not use them (its broker builds a TLS
//! acceptor and serves the plain stream: `tansu-broker-0.6.0/src/broker.rs`, `_acceptor`), so
//! TLS is terminated by socat (OpenSSL) in front of it, on the port tansu advertises: every
//! connection the clients make, bootstrap and partition leaders alike, goes through TLS, and
//! the pipeline verifies the broker's certificate against the CA it is given.
//!
//! SASL: tansu's `--authentication` requires it of every client, but tansu 0.6 cannot
//! authenticate one: it offers no PLAIN (`NoSharedMechanism`), and its `user create` stores no
//! SCRAM credentials in its in-memory or S3 storage (tried against moto). What is tested is
//! that this build of librdkafka has SASL (SCRAM, PLAIN, OAUTHBEARER: `pipeline` unit tests)
//! and that a broker requiring SASL gets nothing through from a client without it.

mod common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll, Wake};
use std::time::Duration;

use common::kafka::{kafka_config, round_trip_secured, start};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use sightline_integration_tests::servers::{Tansu, free_port};

/// A TLS terminator in front of the broker (socat with OpenSSL), stopped when dropped.
struct TlsProxy(Child);

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A self-signed certificate for 127.0.0.1 and its key, made with the openssl command.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl (Debian's openssl package)");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}

/// Waits for a future on this thread (the admin client's answers).
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

/// Starts socat terminating TLS on `tls` (`host:port`) for `broker`, and waits for it.
fn tls_proxy(tls: &str, broker: &str, cert: &Path, key: &Path) -> TlsProxy {
    let proxy = TlsProxy(
        Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                tls.rsplit(':').next().unwrap_or_default(),
                cert.display(),
                key.display()
            ))
            .arg(format!("TCP:{broker}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (Debian's socat package; ./scripts/test installs it)"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(tls).is_err() {
        assert!(std::time::Instant::now() < deadline, "socat did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy
}

/// Runs the pipeline on `bootstrap` with `options` and checks that it fails with nothing
/// written: it neither waits forever nor succeeds reading nothing.
fn refused(dir: &Path, what: &str, bootstrap: &str, options: Vec<(&str, String)>) {
    let lake = dir.join(what.replace(' ', "-"));
    let mut config = kafka_config(bootstrap, &format!("refused-{}", what.len()), 1);
    config.kafka.metadata_timeout_ms = 5_000;
    config.kafka.topics = vec![sightline::config::TopicConfig::envelope("secured.events")];
    for (k, v) in options {
        config.kafka.options.insert(k.into(), v);
    }
    let (_stop, pipeline) = start(&config, &lake);
    let result = pipeline.join().expect("pipeline thread");
    let error = match result {
        Ok(summary) => panic!("{what}: the run must fail, got {summary:?}"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("the brokers could not be asked"),
        "{what}: the error says the brokers could not be asked: {error}"
    );
    let files = sightline_integration_tests::chaos::snapshot(&lake);
    assert!(files.is_empty(), "{what}: nothing is written: {files:?}");
    println!("{what}: refused ({error})");
}

#[test]
fn the_pipeline_reads_and_writes_through_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = certificate(dir.path(), "broker");
    let tls = format!("127.0.0.1:{}", free_port());
    let broker = Tansu::start_with(Some(&tls), &[]);
    let proxy = tls_proxy(&tls, &broker.bootstrap, &cert, &key);
    let ca = cert.display().to_string();
    let security = [
        ("security.protocol", "SSL"),
        ("ssl.ca.location", ca.as_str()),
    ];

    // The topics, created over TLS too.
    let mut admin = rdkafka::ClientConfig::new();
    admin.set("bootstrap.servers", &tls);
    for (k, v) in security {
        admin.set(k, v);
    }
    let admin: AdminClient<DefaultClientContext> = admin.create().expect("admin client");
    let topics = [
        NewTopic::new("secured.events", 2, TopicReplication::Fixed(1)),
        NewTopic::new("secured.sampling", 1, TopicReplication::Fixed(1)),
    ];
    let created = block_on(admin.create_topics(&topics, &AdminOptions::new()))
        .expect("create topics over TLS");
    for result in created {
        result.expect("topic created");
    }

    // The whole round trip over TLS: the lake against the reference, the committed offsets,
    // the sampling topic.
    let configured = ca.clone();
    round_trip_secured(
        &tls,
        &security,
        move |config| {
            config
                .kafka
                .options
                .insert("security.protocol".into(), "SSL".into());
            config
                .kafka
                .options
                .insert("ssl.ca.location".into(), configured);
            config.validate().expect("valid configuration");
        },
        &[("secured.events", 2)],
        3_000,
        2,
        Some("secured.sampling"),
    );

    // A broker certificate the pipeline does not trust: nothing gets through.
    let (other_ca, _) = certificate(dir.path(), "other");
    refused(
        dir.path(),
        "an untrusted certificate",
        &tls,
        vec![
            ("security.protocol", "SSL".to_owned()),
            ("ssl.ca.location", other_ca.display().to_string()),
        ],
    );
    drop(proxy);
}

#[test]
fn a_broker_that_requires_sasl_refuses_a_client_without_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Tansu::start_with(None, &["--authentication"]);
    refused(dir.path(), "no SASL", &broker.bootstrap, Vec::new());
}
