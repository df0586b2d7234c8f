//! A fault-injecting object store: a wrapper around any `object_store` backend, composed the
//! way `object_store`'s own `ThrottledStore` is, that fails a fraction of requests with errors
//! and timeouts while it is switched on.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use crate::chaos::Rng;

/// What a [`FaultyStore`] has done.
#[derive(Debug, Default)]
pub struct Injected {
    /// Requests failed with an error at once.
    pub errors: AtomicU64,
    /// Requests that hung for the timeout, then failed.
    pub timeouts: AtomicU64,
    /// Requests passed through.
    pub passed: AtomicU64,
}

/// Fails `rate` of the requests (half of them after hanging for `timeout`) while `on` is set;
/// with `permanent`, every failure is a refusal of the credentials instead, at once.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    rate: f64,
    /// Fail as a store that refuses the credentials (a fault that cannot heal).
    pub permanent: bool,
    timeout: Duration,
    rng: Mutex<Rng>,
    /// Whether faults are injected now.
    pub on: Arc<AtomicBool>,
    /// What was injected.
    pub injected: Arc<Injected>,
}

impl FaultyStore {
    /// Wraps `inner`; faults are on from the start.
    pub fn new(
        inner: Arc<dyn ObjectStore>,
        rate: f64,
        timeout: Duration,
        seed: u64,
    ) -> FaultyStore {
        FaultyStore {
            inner,
            rate,
            permanent: false,
            timeout,
            rng: Mutex::new(Rng::new(seed)),
            on: Arc::new(AtomicBool::new(true)),
            injected: Arc::new(Injected::default()),
        }
    }

    /// Decides the fate of one request: `Err` to fail it.
    async fn fault(&self) -> object_store::Result<()> {
        let roll = {
            let mut rng = self.rng.lock().map_err(|_| generic("poisoned"))?;
            (rng.next_u64() % 1_000_000) as f64 / 1_000_000.0
        };
        if !self.on.load(Ordering::Relaxed) || roll >= self.rate {
            self.injected.passed.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if self.permanent {
            self.injected.errors.fetch_add(1, Ordering::Relaxed);
            return Err(object_store::Error::PermissionDenied {
                path: String::new(),
                source: "injected: the access key is not valid (HTTP 403)".into(),
            });
        }
        if roll < self.rate / 2.0 {
            self.injected.timeouts.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.timeout).await;
            return Err(generic("injected timeout"));
        }
        self.injected.errors.fetch_add(1, Ordering::Relaxed);
        Err(generic("injected error (HTTP 503)"))
    }
}

fn generic(what: &'static str) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultyStore",
        source: what.into(),
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.fault().await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.fault().await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.fault().await?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.fault().await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.fault().await?;
        self.inner.copy_opts(from, to, options).await
    }
}
