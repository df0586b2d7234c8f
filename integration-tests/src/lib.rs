//! Sightline's integration tests live in `tests/`. This library holds what they share with the
//! benchmarks: the real servers, each started on a free loopback port by the test that needs
//! it and stopped when dropped. `scripts/test` installs them; nothing here downloads anything.

pub mod chaos;
pub mod faults;

pub mod servers {
    //! tansu (a Kafka-protocol broker) and moto (an S3 API).

    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use sightline_sinks::{Lake, S3Options};

    /// A free loopback port.
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    fn wait_for(address: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(address).is_err() {
            assert!(
                Instant::now() < deadline,
                "{what} did not start listening on {address}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A tansu broker on a free loopback port, stopped when dropped; or the suite's shared
    /// broker ([`Tansu::shared`]).
    pub struct Tansu {
        child: Option<Child>,
        /// `host:port` of the broker.
        pub bootstrap: String,
    }

    fn tansu_binary() -> String {
        if let Ok(bin) = std::env::var("TANSU_BIN") {
            return bin;
        }
        let home = std::env::var("CARGO_HOME")
            .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
        let candidate = format!("{home}/bin/tansu");
        if std::path::Path::new(&candidate).exists() {
            candidate
        } else {
            "tansu".into()
        }
    }

    impl Tansu {
        /// Starts `tansu broker` with in-memory storage and waits until it accepts connections.
        pub fn start() -> Tansu {
            Tansu::start_with(None, &[])
        }

        /// [`Tansu::start`], telling clients to connect to `advertised` (a proxy in front of
        /// the broker, such as a TLS terminator) instead of the broker's own port, with
        /// `extra` arguments (`--authentication`). [`Tansu::bootstrap`] is the broker's own
        /// address.
        pub fn start_with(advertised: Option<&str>, extra: &[&str]) -> Tansu {
            let port = free_port();
            let url = format!("tcp://127.0.0.1:{port}");
            let advertised = advertised.map_or_else(|| url.clone(), |a| format!("tcp://{a}"));
            let child = Command::new(tansu_binary())
                .args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised, "--storage-engine", "memory://tansu/"])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("tansu is not installed: ./scripts/test installs it (cargo install tansu --locked --features dynostore)");
            let server = Tansu {
                child: Some(child),
                bootstrap: format!("127.0.0.1:{port}"),
            };
            wait_for(&server.bootstrap, "tansu");
            server
        }

        /// The broker `scripts/test` started once for the whole suite (`SIGHTLINE_TANSU`,
        /// its `host:port`), or a broker of this test's own when there is none (a test run by
        /// hand). Tests that share it use topics and groups of their own; a test that stops
        /// or pauses its broker uses [`Tansu::start`].
        pub fn shared() -> Tansu {
            match std::env::var("SIGHTLINE_TANSU") {
                Ok(bootstrap) if !bootstrap.is_empty() => {
                    wait_for(&bootstrap, "the suite's tansu");
                    Tansu {
                        child: None,
                        bootstrap,
                    }
                }
                _ => Tansu::start(),
            }
        }

        /// Pauses the broker process (SIGSTOP): to a client, a broker that does not answer.
        /// tansu's in-memory storage would lose every topic if the process were killed.
        pub fn pause(&self) {
            self.signal("STOP");
        }

        /// Resumes a paused broker (SIGCONT).
        pub fn resume(&self) {
            self.signal("CONT");
        }

        fn signal(&self, name: &str) {
            let child = self
                .child
                .as_ref()
                .expect("only a broker of the test's own can be paused");
            let status = Command::new("kill")
                .arg(format!("-{name}"))
                .arg(child.id().to_string())
                .status()
                .expect("kill(1)");
            assert!(status.success(), "kill -{name} tansu failed");
        }

        /// Creates a topic with the broker's own CLI.
        pub fn create_topic(&self, name: &str, partitions: i32) {
            let status = Command::new(tansu_binary())
                .args([
                    "topic",
                    "create",
                    "--broker",
                    &format!("tcp://{}", self.bootstrap),
                    "--partitions",
                    &partitions.to_string(),
                    name,
                ])
                .stdout(Stdio::null())
                .status()
                .expect("running tansu topic create");
            assert!(status.success(), "tansu topic create failed");
        }
    }

    impl Drop for Tansu {
        fn drop(&mut self) {
            if let Some(child) = &mut self.child {
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .status();
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// A running moto server.
    pub struct Moto {
        child: Child,
        port: u16,
    }

    fn moto_binary() -> String {
        if let Ok(bin) = std::env::var("MOTO_SERVER") {
            return bin;
        }
        format!(
            "{}/../.tools/venv/bin/moto_server",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    impl Moto {
        /// Starts the server and waits until it answers.
        pub fn start() -> Moto {
            let port = free_port();
            let child = Command::new(moto_binary())
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "moto_server ({}) could not start: {e}; ./scripts/test installs it",
                        moto_binary()
                    )
                });
            let server = Moto { child, port };
            wait_for(&format!("127.0.0.1:{port}"), "moto");
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
            assert!(
                response.starts_with("HTTP/1.1 200"),
                "creating bucket {bucket}: {response}"
            );
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
}

pub mod parquet_text {
    //! Parquet files as text, read with the Parquet reader: `column=value` per cell, a line per
    //! row. What the golden test compares, and what the conformance suite checks values with
    //! (by column *name*, so that two swapped columns of one type cannot pass).

    use arrow_array::{
        Array, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
        TimestampMicrosecondArray,
    };
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    /// One cell as text: strings quoted, floats in their shortest exact form, timestamps in
    /// µs, null as `∅`.
    pub fn cell(column: &dyn Array, row: usize) -> String {
        if column.is_null(row) {
            return "∅".into();
        }
        let any = column.as_any();
        if let Some(a) = any.downcast_ref::<StringArray>() {
            format!("{:?}", a.value(row))
        } else if let Some(a) = any.downcast_ref::<Int64Array>() {
            a.value(row).to_string()
        } else if let Some(a) = any.downcast_ref::<Int32Array>() {
            a.value(row).to_string()
        } else if let Some(a) = any.downcast_ref::<Float64Array>() {
            format!("{:?}", a.value(row))
        } else if let Some(a) = any.downcast_ref::<BooleanArray>() {
            a.value(row).to_string()
        } else if let Some(a) = any.downcast_ref::<TimestampMicrosecondArray>() {
            format!("{}µs", a.value(row))
        } else {
            panic!("no text form for the type {:?}", column.data_type())
        }
    }

    /// Every row of `batch` as `(column, value)` pairs.
    pub fn rows(batch: &RecordBatch) -> Vec<Vec<(String, String)>> {
        let names: Vec<String> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        (0..batch.num_rows())
            .map(|row| {
                names
                    .iter()
                    .zip(batch.columns())
                    .map(|(name, column)| (name.clone(), cell(column.as_ref(), row)))
                    .collect()
            })
            .collect()
    }

    /// A Parquet file's rows (every batch), and its `sightline.retention_days` metadata.
    pub fn read(bytes: bytes::Bytes) -> (Vec<Vec<(String, String)>>, Option<String>) {
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).expect("a Parquet file");
        let retention = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|kv| kv.key == "sightline.retention_days"))
            .and_then(|kv| kv.value.clone());
        let mut out = Vec::new();
        for batch in builder.build().expect("reader") {
            out.extend(rows(&batch.expect("batch")));
        }
        (out, retention)
    }

    /// A row as one line: `column=value | column=value | …`.
    pub fn line(row: &[(String, String)]) -> String {
        row.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" | ")
    }
}
