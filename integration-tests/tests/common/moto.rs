//! A real S3 API: moto's server (PyPI `moto[server]`, installed by `scripts/test` into
//! `.tools/venv`), started on a free loopback port and stopped when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sightline_sinks::{Lake, S3Options};

/// A running moto server.
pub struct Moto {
    child: Child,
    port: u16,
}

fn moto_binary() -> String {
    if let Ok(bin) = std::env::var("MOTO_SERVER") {
        return bin;
    }
    format!("{}/../.tools/venv/bin/moto_server", env!("CARGO_MANIFEST_DIR"))
}

impl Moto {
    /// Starts the server and waits until it answers.
    pub fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let child = Command::new(moto_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("moto_server ({}) could not start: {e}; ./scripts/test installs it", moto_binary()));
        let server = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start listening on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// The S3 settings that reach this server.
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: Some(format!("http://127.0.0.1:{}", self.port)),
            region: Some("us-east-1".into()),
            allow_http: true,
            access_key_id: Some("sightline-test".into()),
            secret_access_key: Some("sightline-test-secret".into()),
        }
    }

    /// Creates a bucket (moto accepts an unsigned `PUT /bucket`).
    pub fn create_bucket(&self, bucket: &str) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to moto");
        write!(stream, "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.port).expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        assert!(response.starts_with("HTTP/1.1 200"), "creating bucket {bucket}: {response}");
    }

    /// A lake in a new bucket of this server, under `prefix`.
    pub fn lake(&self, bucket: &str, prefix: &str) -> Lake {
        self.create_bucket(bucket);
        Lake::open_with(&format!("s3://{bucket}/{prefix}"), &self.options()).expect("s3 lake")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
