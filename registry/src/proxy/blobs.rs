//! Blob pull-through: one upstream fetch per digest, streamed to every waiting client while it is
//! still being written, verified before it is committed.
//!
//! A fetch (the "flight") writes the upstream body into a temp file and publishes its progress on
//! a watch channel. Readers — the client that started it and any that join — read the temp file
//! at their own offsets with positional reads, so the file is read back from the page cache and no
//! blob is ever held in memory. Invariant: no reader is given the final byte of its response
//! before the flight has verified the digest and committed, so a corrupt or truncated upstream
//! body can never complete as a successful response; the reader fails instead and the client sees
//! a broken transfer. The flight runs in its own task: a client disconnect does not stop the cache
//! write.
//!
//! A failed cache write (a full disk, any I/O error, or no temp file at all) does not fail the
//! clients: the flight keeps reading, hashing and teeing the upstream body, the writer stops
//! (`cache_failed`, the file frozen at what was written), nothing is committed and the temp file
//! is removed when the flight ends. A reader that reaches the frozen end of the file continues
//! from its own upstream GET ([`direct_stream`]): it hashes that whole body and skips what it
//! already sent; its final byte waits for both that body and the flight's body to match the
//! digest, since its first bytes came from the flight. The failure is counted
//! (`cache_write_failures_total`) and logged once per flight; the next fetch tries the disk
//! again, so caching resumes by itself once there is space.

use std::collections::HashMap;
use std::os::unix::fs::FileExt as _;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use http::Method;
use tokio::sync::{mpsc, watch};

use super::{ProxyError, ProxyInner};
use crate::oci::{Digest, DigestHasher, RepositoryName};
use crate::store::{cached_read, Pin, TempFile};
use crate::upstream::{self, Target, Upstream};

/// Size of each read from disk and each write to it.
const CHUNK: usize = 1024 * 1024;

/// Largest read of a committed blob. Smaller than [`CHUNK`]: with many parallel readers the
/// buffers queued in each connection dominate memory (8 readers at 1 MiB peaked at 50 MiB RSS).
const CACHED_CHUNK: u64 = 256 * 1024;

/// Smallest read of a committed blob, however many readers there are.
const MIN_CACHED_CHUNK: u64 = 16 * 1024;

/// Read buffers all readers of committed blobs hold at once, at most (beyond
/// [`MIN_CACHED_CHUNK`] each): each connection holds about one read while the socket takes it,
/// so with many connections each reads less at a time (1000 connections: 32 KiB reads).
const CACHED_READ_BUDGET: u64 = 32 * 1024 * 1024;

/// Readers of committed blobs streaming right now (process-wide).
static CACHED_READERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts one reader of a committed blob while it lives.
struct CachedReader;

impl CachedReader {
    fn new() -> CachedReader {
        CACHED_READERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        CachedReader
    }
}

impl Drop for CachedReader {
    fn drop(&mut self) {
        CACHED_READERS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The read size for committed blobs when `readers` stream at once: the budget shared out,
/// between [`MIN_CACHED_CHUNK`] and [`CACHED_CHUNK`]. Pure.
fn cached_chunk(readers: u64) -> u64 {
    (CACHED_READ_BUDGET / readers.max(1)).clamp(MIN_CACHED_CHUNK, CACHED_CHUNK)
}

/// Upstream chunks buffered for the leader's client before it falls back to reading the file.
const TEE_DEPTH: usize = 64;

/// Upstream chunks queued for the writer thread (backpressure only when the disk is slower than
/// the network).
const WRITER_DEPTH: usize = 64;

/// How often the writer tells readers how far the file has grown.
const PUBLISH_EVERY: u64 = 256 * 1024;

/// What the upstream said about the blob before its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlightHeader {
    pub size: Option<u64>,
    /// The bytes come from the shared tier: for the cache, a hit.
    pub shared: bool,
}

/// Progress of a fetch, published to readers.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub header: Option<FlightHeader>,
    pub written: u64,
    /// Every byte the upstream sent has been hashed and matches the digest (and the length, when
    /// announced). Lets the client that started the fetch have its final byte, which it holds in
    /// memory, without waiting for the disk write; readers of the file wait for `verified`.
    pub digest_matched: bool,
    /// All bytes are written and match the digest. Set before the (slow) fsync and rename, so
    /// readers can finish while the commit is still in progress: what they were sent is verified
    /// either way, and a failed commit only means the cache does not keep the blob. With
    /// `cache_failed`, only the first `written` bytes are in the file.
    pub verified: bool,
    /// The cache write failed (or no temp file could be created): `written` no longer grows, and
    /// readers continue past it from the upstream ([`direct_stream`]).
    pub cache_failed: bool,
    pub outcome: Option<Result<(), ProxyError>>,
}

/// What a reader needs to fetch the blob itself when the flight's cache write failed.
struct DirectSource {
    inner: Arc<ProxyInner>,
    upstream: Arc<Upstream>,
    repo: RepositoryName,
    digest: Digest,
}

impl std::fmt::Debug for DirectSource {
    // Not derived: the proxy state holds the flights, which hold it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectSource")
            .field("registry", &self.upstream.name())
            .field("repo", &self.repo)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// A fetch in flight.
#[derive(Debug)]
pub struct Flight {
    /// The temp file being written; `None` when none could be created (the disk is full).
    file: Option<Arc<std::fs::File>>,
    progress: watch::Receiver<Progress>,
    direct: DirectSource,
}

impl Flight {
    /// Waits until the upstream answered with headers (or failed).
    pub async fn header(&self) -> Result<FlightHeader, ProxyError> {
        let mut rx = self.progress.clone();
        let p = rx
            .wait_for(|p| p.header.is_some() || p.outcome.is_some())
            .await
            .map_err(|_| ProxyError::Internal("fetch ended without a result".into()))?;
        if let Some(Err(e)) = &p.outcome {
            return Err(e.clone());
        }
        Ok(p.header.clone().unwrap_or(FlightHeader {
            size: None,
            shared: false,
        }))
    }

    /// Waits until the digest of everything the upstream sent matched (or the fetch failed).
    async fn digest_matched(&self) -> std::io::Result<()> {
        let mut rx = self.progress.clone();
        let p = rx
            .wait_for(|p| p.digest_matched || p.outcome.is_some())
            .await
            .map_err(|_| std::io::Error::other("blob fetch ended without a result"))?;
        match &p.outcome {
            Some(Err(e)) if !p.digest_matched => Err(std::io::Error::other(e.to_string())),
            _ => Ok(()),
        }
    }

    /// Bytes written to the cache so far (progress of a warm).
    pub fn written(&self) -> u64 {
        self.progress.borrow().written
    }

    /// The blob's size, once the upstream announced it or the body ended.
    pub fn size(&self) -> Option<u64> {
        self.progress.borrow().header.as_ref().and_then(|h| h.size)
    }

    /// Waits until the fetch is verified and committed (or failed). A blob whose cache write
    /// failed is verified but not committed: the result is `Ok` and the store does not have it.
    pub async fn done(&self) -> Result<(), ProxyError> {
        let mut rx = self.progress.clone();
        let p = rx
            .wait_for(|p| p.outcome.is_some())
            .await
            .map_err(|_| ProxyError::Internal("fetch ended without a result".into()))?;
        p.outcome.clone().unwrap_or(Ok(()))
    }
}

/// Fetches in flight, by digest.
#[derive(Debug, Default)]
pub struct BlobFlights {
    map: Mutex<HashMap<Digest, Arc<Flight>>>,
}

/// What a blob lookup found.
pub enum Source {
    /// Already cached: the open file, its size and a pin against eviction.
    Cached(std::fs::File, u64, Pin),
    /// Being fetched; `leader` is true for the request that started the fetch, which also gets
    /// the upstream's chunks directly (`tee`) for as long as it keeps up.
    InFlight {
        flight: Arc<Flight>,
        leader: bool,
        tee: Option<mpsc::Receiver<Bytes>>,
    },
}

impl BlobFlights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Flight>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Finds a blob in the cache or in flight, or starts fetching it from `upstream`.
pub fn open_or_fetch(
    inner: &Arc<ProxyInner>,
    upstream: &Arc<Upstream>,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<Source, ProxyError> {
    if let Some((file, size, pin)) = inner.store.open_blob(digest)? {
        return Ok(Source::Cached(file, size, pin));
    }
    let mut map = inner.blob_flights.lock();
    if let Some(flight) = map.get(digest) {
        return Ok(Source::InFlight {
            flight: Arc::clone(flight),
            leader: false,
            tee: None,
        });
    }
    // A flight removes itself only after committing, so checking the store again under the map
    // lock cannot miss a blob that finished between the first check and here.
    if let Some((file, size, pin)) = inner.store.open_blob(digest)? {
        return Ok(Source::Cached(file, size, pin));
    }
    // No temp file (a full disk, typically) still serves the clients, from the upstream only.
    let temp = match inner.store.create_temp() {
        Ok(temp) => Some(temp),
        Err(e) => {
            inner.note_cache_write_failure(upstream.name(), "blob", &e);
            None
        }
    };
    let (tx, rx) = watch::channel(Progress {
        cache_failed: temp.is_none(),
        ..Progress::default()
    });
    let tx = Arc::new(tx);
    let flight = Arc::new(Flight {
        file: temp.as_ref().map(|t| Arc::clone(t.file())),
        progress: rx,
        direct: DirectSource {
            inner: Arc::clone(inner),
            upstream: Arc::clone(upstream),
            repo: repo.clone(),
            digest: digest.clone(),
        },
    });
    map.insert(digest.clone(), Arc::clone(&flight));
    drop(map);
    let (tee_tx, tee_rx) = mpsc::channel(TEE_DEPTH);
    let task_inner = Arc::clone(inner);
    let task_upstream = Arc::clone(upstream);
    let task_repo = repo.clone();
    let task_digest = digest.clone();
    tokio::spawn(async move {
        let result = fetch(
            &task_inner,
            &task_upstream,
            &task_repo,
            &task_digest,
            temp,
            &tx,
            Some(tee_tx),
        )
        .await;
        if let Err(e) = &result {
            tracing::warn!(registry = task_upstream.name(), repository = %task_repo, digest = %task_digest, error = %e, "blob fetch failed; nothing cached");
        }
        tx.send_modify(|p| p.outcome = Some(result));
        task_inner.blob_flights.lock().remove(&task_digest);
        task_inner.after_commit();
    });
    Ok(Source::InFlight {
        flight,
        leader: true,
        tee: Some(tee_rx),
    })
}

/// Hashes the body on its own thread: this is the only work between the last upstream byte and
/// the leader's final byte, so it is kept apart from the disk write. Returns the digest and the
/// wall time spent hashing (for the debug log: on a busy machine it shows the thread waiting for
/// a core).
fn spawn_hasher(
    algorithm: crate::oci::Algorithm,
    mut chunks: mpsc::Receiver<Bytes>,
) -> tokio::task::JoinHandle<(Digest, std::time::Duration)> {
    tokio::task::spawn_blocking(move || {
        let mut hasher = DigestHasher::new(algorithm);
        let mut busy = std::time::Duration::ZERO;
        while let Some(chunk) = chunks.blocking_recv() {
            let started = std::time::Instant::now();
            hasher.update(&chunk);
            busy += started.elapsed();
        }
        (hasher.finish(), busy)
    })
}

/// What the writer thread did: bytes written, and the error that stopped it, if any.
#[derive(Debug)]
struct Written {
    bytes: u64,
    error: Option<std::io::Error>,
}

/// Writes the body into the temp file off the network path and publishes progress for the
/// readers following the file. A write error freezes the file at what was written and publishes
/// `cache_failed`; the writer then drains the rest without writing, so the fetch (and every
/// client) goes on. Without a file it only drains.
fn spawn_writer(
    file: Option<Arc<std::fs::File>>,
    tx: Arc<watch::Sender<Progress>>,
    mut chunks: mpsc::Receiver<Bytes>,
) -> tokio::task::JoinHandle<Written> {
    tokio::task::spawn_blocking(move || {
        let mut written = 0u64;
        let mut published = 0u64;
        let mut error = None;
        let mut file = file;
        while let Some(chunk) = chunks.blocking_recv() {
            let Some(f) = &file else {
                continue;
            };
            if let Err(e) = f.write_all_at(&chunk, written) {
                error = Some(e);
                file = None;
                tx.send_modify(|p| {
                    p.written = written;
                    p.cache_failed = true;
                });
                continue;
            }
            written += chunk.len() as u64;
            if written - published >= PUBLISH_EVERY || chunks.is_empty() {
                published = written;
                tx.send_modify(|p| p.written = written);
            }
        }
        if file.is_some() {
            tx.send_modify(|p| p.written = written);
        }
        Written {
            bytes: written,
            error,
        }
    })
}

/// The flight body: upstream GET → hasher thread and writer thread (temp file) in parallel →
/// verify → commit.
async fn fetch(
    inner: &Arc<ProxyInner>,
    upstream: &Arc<Upstream>,
    repo: &RepositoryName,
    digest: &Digest,
    temp: Option<TempFile>,
    tx: &Arc<watch::Sender<Progress>>,
    mut tee: Option<mpsc::Sender<Bytes>>,
) -> Result<(), ProxyError> {
    let registry = upstream.name().to_owned();
    let started = std::time::Instant::now();
    let mut body = open_body(inner, upstream, repo, digest).await?;
    let headers_after = started.elapsed();
    let size = body.size();
    let shared = matches!(body, Body::Shared(_));
    tx.send_modify(|p| p.header = Some(FlightHeader { size, shared }));
    let (to_hasher, hasher_chunks) = mpsc::channel::<Bytes>(WRITER_DEPTH);
    let hasher = spawn_hasher(digest.algorithm(), hasher_chunks);
    let (to_writer, chunks) = mpsc::channel::<Bytes>(WRITER_DEPTH);
    let writer = spawn_writer(
        temp.as_ref().map(|t| Arc::clone(t.file())),
        Arc::clone(tx),
        chunks,
    );
    let mut received: u64 = 0;
    let mut chunks_seen: u64 = 0;
    let mut first_byte_after = None;
    let mut hasher_wait = std::time::Duration::ZERO;
    let mut writer_wait = std::time::Duration::ZERO;
    let mut tee_dropped_at: Option<u64> = None;
    let idle = inner.body_idle_timeout;
    let body_error = |message: String| ProxyError::Body {
        registry: registry.clone(),
        message,
    };
    loop {
        let read = match tokio::time::timeout(idle, body.chunk()).await {
            Ok(read) => read,
            Err(_) => Err(format!("no data for {}s", idle.as_secs())),
        };
        let chunk = match read {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            // A peer that stops mid-body (killed, partitioned) is replaced by the upstream,
            // once: the flight goes on from where it was.
            Err(e) if body.is_peer() => {
                tracing::info!(%digest, received, error = %e, "peer stopped sending a blob; continuing from the upstream");
                body = resume_from_upstream(upstream, repo, digest, received, size).await?;
                continue;
            }
            Err(e) => return Err(body_error(e)),
        };
        received += chunk.len() as u64;
        first_byte_after.get_or_insert_with(|| started.elapsed());
        if body.is_upstream() {
            inner.telemetry.add_upstream_bytes(chunk.len() as u64);
        }
        if size.is_some_and(|s| received > s) {
            return Err(ProxyError::Truncated {
                registry,
                expected: size.unwrap_or(0),
                received,
            });
        }
        // The leader's client takes chunks straight from here while it keeps up; a slow or gone
        // client loses the tee (and reads the file instead), never slowing the fetch down.
        if let Some(t) = &tee {
            if t.try_send(chunk.clone()).is_err() {
                tee = None;
                tee_dropped_at = Some(received);
            }
        }
        chunks_seen += 1;
        let wait_started = std::time::Instant::now();
        let to_hasher_ok = to_hasher.send(chunk.clone()).await.is_ok();
        let hashed_queued = std::time::Instant::now();
        if !to_hasher_ok || to_writer.send(chunk).await.is_err() {
            // Neither thread stops before its channel closes unless it panicked.
            drop((to_hasher, to_writer));
            let _ = writer.await;
            return Err(ProxyError::Internal(
                "blob hasher or writer stopped early".into(),
            ));
        }
        hasher_wait += hashed_queued - wait_started;
        writer_wait += hashed_queued.elapsed();
    }
    let body_after = started.elapsed();
    drop((to_hasher, to_writer));
    let (actual, hashing) = hasher
        .await
        .map_err(|e| ProxyError::Internal(format!("hasher task failed: {e}")))?;
    let hashed_after = started.elapsed();
    if let Some(expected) = size {
        if received != expected {
            return Err(ProxyError::Truncated {
                registry,
                expected,
                received,
            });
        }
    }
    if &actual != digest {
        if body.is_peer() {
            upstream.peer_answered_garbage("a blob that does not match its digest");
        }
        if matches!(body, Body::Shared(_)) {
            // A copy in the bucket that does not verify (bit rot, a foreign writer): removed, so
            // the next request fetches it again instead of failing on it forever.
            inner.discard_shared_blob(digest);
            return Err(ProxyError::DigestMismatch {
                registry: "shared storage".into(),
                expected: digest.clone(),
                actual,
            });
        }
        return Err(ProxyError::DigestMismatch {
            registry,
            expected: digest.clone(),
            actual,
        });
    }
    tx.send_modify(|p| p.digest_matched = true);
    let written = writer
        .await
        .map_err(|e| ProxyError::Internal(format!("writer task failed: {e}")))?;
    let temp = match (temp, written.error) {
        (Some(temp), None) if written.bytes == received => Some(temp),
        (Some(_), None) => {
            return Err(ProxyError::Internal(format!(
                "cache temp file has {} of {received} bytes",
                written.bytes
            )))
        }
        (_, Some(e)) => {
            inner.note_cache_write_failure(&registry, "blob", &e);
            None
        }
        (None, None) => None,
    };
    let written_after = started.elapsed();
    // The timeline of the fetch, in ms from its start: response headers, first and last body
    // byte, the digest known (what the leader's final byte waits for), the temp file written;
    // the network task's waits on the hasher's and the writer's queues; the hasher's time inside
    // the hash function (wall time: on a busy machine it includes waiting for a core).
    tracing::debug!(
        %digest,
        bytes = received,
        chunks = chunks_seen,
        headers_ms = headers_after.as_millis() as u64,
        first_byte_ms = first_byte_after.unwrap_or_default().as_millis() as u64,
        last_byte_ms = body_after.as_millis() as u64,
        hashed_ms = hashed_after.as_millis() as u64,
        written_ms = written_after.as_millis() as u64,
        hasher_queue_wait_ms = hasher_wait.as_millis() as u64,
        writer_queue_wait_ms = writer_wait.as_millis() as u64,
        hash_busy_ms = hashing.as_millis() as u64,
        tee_dropped_at,
        "blob fetched and verified"
    );
    tx.send_modify(|p| {
        if size.is_none() {
            p.header = Some(FlightHeader {
                size: Some(received),
                shared,
            });
        }
        p.verified = true;
    });
    // Not cached (the write failed): dropping nothing here; the temp file went with `temp`.
    let Some(temp) = temp else {
        return Ok(());
    };
    let store = Arc::clone(&inner.store);
    let commit_digest = digest.clone();
    let committed =
        tokio::task::spawn_blocking(move || store.commit_blob(temp, &commit_digest, received))
            .await
            .map_err(|e| ProxyError::Internal(format!("commit task failed: {e}")))?;
    // Every reader was already given verified bytes: a failed commit (ENOSPC surfacing at fsync
    // on a delayed-allocation file system) only means the cache does not keep the blob.
    if let Err(e) = committed {
        inner.note_cache_write_failure(&registry, "blob", &e);
        return Ok(());
    }
    inner.note_repository(&registry, repo);
    if body.is_upstream() {
        inner.publish_blob(&registry, digest);
    }
    Ok(())
}

/// Where a flight's bytes come from.
enum Body {
    /// The upstream's (or the owner replica's) response; `upstream` is false for a peer's.
    Http {
        response: reqwest::Response,
        upstream: bool,
    },
    /// The shared tier (another replica fetched it already).
    Shared(crate::store::shared::SharedBlob),
    /// The upstream taking over from a failed peer: the first `skip` bytes are dropped.
    Skipping {
        response: reqwest::Response,
        skip: u64,
    },
}

impl Body {
    fn size(&self) -> Option<u64> {
        match self {
            Body::Http { response, .. } => response.content_length(),
            Body::Shared(blob) => Some(blob.size),
            Body::Skipping { response, .. } => response.content_length(),
        }
    }

    /// Whether the bytes come from the real upstream, so this replica publishes them.
    fn is_upstream(&self) -> bool {
        matches!(
            self,
            Body::Http { upstream: true, .. } | Body::Skipping { .. }
        )
    }

    fn is_peer(&self) -> bool {
        matches!(
            self,
            Body::Http {
                upstream: false,
                ..
            }
        )
    }

    async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        use futures::StreamExt as _;
        match self {
            Body::Http { response, .. } => response.chunk().await.map_err(|e| e.to_string()),
            Body::Shared(blob) => blob
                .body
                .next()
                .await
                .transpose()
                .map_err(|e| e.to_string()),
            Body::Skipping { response, skip } => loop {
                let Some(mut chunk) = response.chunk().await.map_err(|e| e.to_string())? else {
                    return Ok(None);
                };
                if *skip == 0 {
                    return Ok(Some(chunk));
                }
                let dropped = (*skip).min(chunk.len() as u64);
                *skip -= dropped;
                // `dropped` is at most the chunk's length, a usize.
                let rest = chunk.split_off(usize::try_from(dropped).unwrap_or(chunk.len()));
                if !rest.is_empty() {
                    return Ok(Some(rest));
                }
            },
        }
    }
}

/// The rest of a blob from the real upstream after a peer failed `received` bytes into it: a
/// new GET whose first `received` bytes are skipped (they were hashed and written already; the
/// final digest check covers both halves). The skipped bytes are counted as upstream bytes: this
/// is what a failed peer costs.
async fn resume_from_upstream(
    upstream: &Arc<Upstream>,
    repo: &RepositoryName,
    digest: &Digest,
    received: u64,
    size: Option<u64>,
) -> Result<Body, ProxyError> {
    let fallback = upstream
        .fallback()
        .ok_or_else(|| ProxyError::Internal("a peer body without a fallback upstream".into()))?;
    let response = fallback
        .send(Method::GET, repo, Target::Blob(digest))
        .await?;
    if let (Some(expected), Some(announced)) = (size, response.content_length()) {
        if expected != announced {
            return Err(ProxyError::Body {
                registry: fallback.name().to_owned(),
                message: format!(
                    "the upstream announces {announced} bytes, the peer announced {expected}"
                ),
            });
        }
    }
    Ok(Body::Skipping {
        response,
        skip: received,
    })
}

/// Opens the blob's bytes: from the shared tier when it has them, else from `upstream` (which
/// may be the owner replica). A shared tier that cannot be asked fails the fetch (503): this
/// replica does not go upstream behind the others' backs.
async fn open_body(
    inner: &Arc<ProxyInner>,
    upstream: &Arc<Upstream>,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<Body, ProxyError> {
    if let Some(shared) = &inner.shared {
        if let Some(blob) = shared.get_blob(digest, None).await? {
            inner.note_shared_use(&crate::store::shared::blob_key(digest));
            return Ok(Body::Shared(blob));
        }
    }
    let response = upstream
        .send(Method::GET, repo, Target::Blob(digest))
        .await?;
    let from_peer = upstream.answered_by_peer(&response);
    // A cachalot always names the blob it sends; anything else (a login page, a proxy's error
    // page) is not read at all.
    if from_peer && upstream::content_digest(&response).as_ref() != Some(digest) {
        if let Some(fallback) = upstream.peer_answered_garbage("a blob without its digest") {
            let response = fallback
                .send(Method::GET, repo, Target::Blob(digest))
                .await?;
            return Ok(Body::Http {
                response,
                upstream: true,
            });
        }
    }
    Ok(Body::Http {
        response,
        upstream: !from_peer,
    })
}

/// Asks the upstream about a blob without fetching it (HEAD on a miss).
pub async fn head_upstream(
    upstream: &Upstream,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<(Option<u64>, Option<String>), ProxyError> {
    let response = upstream
        .send(Method::HEAD, repo, Target::Blob(digest))
        .await?;
    Ok((
        upstream::declared_length(&response),
        upstream::content_type(&response),
    ))
}

/// Whether reads of cache files may use `RWF_NOWAIT`: committed blobs and in-flight temp files
/// live in one store, on one filesystem.
static CACHE_NOWAIT: cached_read::NowaitSupport = cached_read::NowaitSupport::new();

/// Up to `len` bytes of an in-flight file at `offset`: what the page cache holds right away
/// (maybe fewer than `len`), else exactly `len` read on the blocking pool.
async fn read_at(
    file: Option<&Arc<std::fs::File>>,
    offset: u64,
    len: usize,
) -> std::io::Result<Bytes> {
    let file = Arc::clone(file.ok_or_else(|| {
        std::io::Error::other("blob fetch has no cache file to read (its creation failed)")
    })?);
    if let Some(bytes) = cached_read::read_nowait(&file, offset, len, &CACHE_NOWAIT) {
        return Ok(bytes);
    }
    tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::zeroed(len);
        let mut filled = 0;
        while filled < len {
            let n = file.read_at(&mut buf[filled..], offset + filled as u64)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "cache file shorter than expected",
                ));
            }
            filled += n;
        }
        Ok(buf.freeze())
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Streams `[start, end)` of a committed file, keeping it pinned until the stream ends. Each
/// read is [`cached_chunk`] of the readers streaming at that moment, so many connections
/// together hold a bounded amount of read buffers. What the page cache holds is read right here
/// ([`cached_read::read_nowait`]); the rest on the blocking pool, sequentially from this
/// stream's own handle into buffers that need no zeroing first.
pub fn file_stream(
    file: std::fs::File,
    pin: Pin,
    start: u64,
    end: u64,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    let reader = CachedReader::new();
    futures::stream::try_unfold(
        // `cursor`: where the handle's own file position stands, when it is known.
        (Some(file), (pin, reader), start, None::<u64>),
        move |(file, pin, pos, cursor)| async move {
            let Some(file) = file else {
                return Ok(None);
            };
            if pos >= end {
                return Ok(None);
            }
            let readers = CACHED_READERS.load(std::sync::atomic::Ordering::Relaxed);
            let len = (end - pos).min(cached_chunk(readers));
            let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
            if let Some(bytes) = cached_read::read_nowait(&file, pos, len_usize, &CACHE_NOWAIT) {
                let next = pos + bytes.len() as u64;
                return Ok(Some((bytes, (Some(file), pin, next, cursor))));
            }
            let (file, bytes) = tokio::task::spawn_blocking(move || {
                use std::io::{Read as _, Seek as _};
                let mut file = file;
                if cursor != Some(pos) {
                    file.seek(std::io::SeekFrom::Start(pos))?;
                }
                let mut buf = Vec::with_capacity(len_usize);
                (&mut file).take(len).read_to_end(&mut buf)?;
                if (buf.len() as u64) < len {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "cache file shorter than expected",
                    ));
                }
                Ok((file, Bytes::from(buf)))
            })
            .await
            .map_err(std::io::Error::other)??;
            Ok(Some((bytes, (Some(file), pin, pos + len, Some(pos + len)))))
        },
    )
}

/// Where a reader following a flight stands.
enum Follow {
    /// Reading the flight's file at `pos`.
    File {
        flight: Arc<Flight>,
        rx: watch::Receiver<Progress>,
        pos: u64,
    },
    /// Past the frozen end of a file whose write failed: the reader's own upstream GET.
    Direct(futures::stream::BoxStream<'static, std::io::Result<Bytes>>),
}

/// The next chunk of a direct stream, keeping the state for the one after.
async fn next_direct(
    mut direct: futures::stream::BoxStream<'static, std::io::Result<Bytes>>,
) -> std::io::Result<Option<(Bytes, Follow)>> {
    use futures::StreamExt as _;
    match direct.next().await {
        Some(Ok(bytes)) => Ok(Some((bytes, Follow::Direct(direct)))),
        Some(Err(e)) => Err(e),
        None => Ok(None),
    }
}

/// Streams `[start, end)` of a blob that is still being fetched, following the writer. `end` is
/// the blob size when known; `None` streams to whatever length the fetch turns out to have. When
/// the flight's cache write failed, the part past what was written comes from a
/// [`direct_stream`].
pub fn flight_stream(
    flight: Arc<Flight>,
    start: u64,
    end: Option<u64>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    use futures::StreamExt as _;
    let rx = flight.progress.clone();
    futures::stream::try_unfold(
        Follow::File {
            flight,
            rx,
            pos: start,
        },
        move |state| async move {
            let (flight, mut rx, pos) = match state {
                Follow::Direct(direct) => return next_direct(direct).await,
                Follow::File { flight, rx, pos } => (flight, rx, pos),
            };
            loop {
                let (written, verified, failure, total, cache_failed) = {
                    let p = rx.borrow_and_update();
                    (
                        p.written,
                        p.verified,
                        match &p.outcome {
                            Some(Err(e)) if !p.verified => Some(e.to_string()),
                            _ => None,
                        },
                        p.header.as_ref().and_then(|h| h.size),
                        p.cache_failed,
                    )
                };
                let target = end.or(total);
                if let Some(message) = failure {
                    return Err(std::io::Error::other(message));
                }
                if target.is_some_and(|t| pos >= t) && verified {
                    return Ok(None);
                }
                // Until verification, hold back the last byte of the response.
                let limit = match (verified, target) {
                    (true, Some(t)) => written.min(t),
                    (true, None) => written,
                    (false, Some(t)) => written.min(t.saturating_sub(1)),
                    (false, None) => written,
                };
                if pos < limit {
                    let len = usize::try_from((limit - pos).min(CHUNK as u64)).unwrap_or(CHUNK);
                    let bytes = read_at(flight.file.as_ref(), pos, len).await?;
                    let next = pos + bytes.len() as u64;
                    return Ok(Some((
                        bytes,
                        Follow::File {
                            flight,
                            rx,
                            pos: next,
                        },
                    )));
                }
                if cache_failed && target.is_none_or(|t| written < t) {
                    // The file will not grow: the rest comes from the upstream.
                    let direct = direct_stream(flight, pos, target).boxed();
                    return next_direct(direct).await;
                }
                if verified {
                    return Ok(None);
                }
                rx.changed()
                    .await
                    .map_err(|_| std::io::Error::other("blob fetch ended without a result"))?;
            }
        },
    )
}

/// Where a direct stream stands.
struct Direct {
    flight: Arc<Flight>,
    response: Option<reqwest::Response>,
    hasher: DigestHasher,
    /// Upstream body bytes seen (hashed).
    seen: u64,
    from: u64,
    end: Option<u64>,
    /// The response's final byte, held until both bodies matched the digest.
    held: Option<Bytes>,
    done: bool,
}

/// `[from, end)` of a blob from a fresh upstream GET, for a reader of a flight whose cache write
/// failed: the whole body is hashed (the bytes before `from` too, which the reader already got
/// from the flight's file, are only hashed), and the final byte of the range is released only
/// once this body matched the digest and its length and the flight's own body matched too (the
/// first part of the response came from it). Nothing is cached. `end` of `None` means to the end
/// of the body.
fn direct_stream(
    flight: Arc<Flight>,
    from: u64,
    end: Option<u64>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    let algorithm = flight.direct.digest.algorithm();
    futures::stream::try_unfold(
        Direct {
            flight,
            response: None,
            hasher: DigestHasher::new(algorithm),
            seen: 0,
            from,
            end,
            held: None,
            done: false,
        },
        move |mut st| async move {
            if st.done {
                return Ok(None);
            }
            if st.response.is_none() {
                let source = &st.flight.direct;
                let response = source
                    .upstream
                    .send(Method::GET, &source.repo, Target::Blob(&source.digest))
                    .await
                    .map_err(std::io::Error::other)?;
                tracing::debug!(digest = %source.digest, from = st.from, "blob cache write failed; reader continues from the upstream");
                st.response = Some(response);
            }
            loop {
                let idle = st.flight.direct.inner.body_idle_timeout;
                let Some(response) = st.response.as_mut() else {
                    return Ok(None);
                };
                let chunk = match tokio::time::timeout(idle, response.chunk()).await {
                    Ok(Ok(chunk)) => chunk,
                    Ok(Err(e)) => return Err(std::io::Error::other(e)),
                    Err(_) => {
                        return Err(std::io::Error::other(format!(
                            "upstream sent no data for {}s",
                            idle.as_secs()
                        )))
                    }
                };
                let Some(chunk) = chunk else {
                    // The whole body is in: verify it, then the flight's, then release the end.
                    let actual =
                        std::mem::replace(&mut st.hasher, DigestHasher::new(algorithm)).finish();
                    let source = &st.flight.direct;
                    if actual != source.digest {
                        return Err(std::io::Error::other(format!(
                            "upstream sent content with digest {actual}, expected {}",
                            source.digest
                        )));
                    }
                    if st.end.is_some_and(|e| st.seen < e) {
                        return Err(std::io::Error::other(format!(
                            "upstream body ended after {} bytes",
                            st.seen
                        )));
                    }
                    st.flight.digest_matched().await?;
                    st.done = true;
                    return match st.held.take() {
                        Some(last) => Ok(Some((last, st))),
                        None => Ok(None),
                    };
                };
                st.hasher.update(&chunk);
                source_bytes(&st.flight.direct.inner, chunk.len());
                let chunk_start = st.seen;
                st.seen += chunk.len() as u64;
                // The part of this chunk inside [from, end).
                let lo = st.from.max(chunk_start);
                let hi = st.end.map_or(st.seen, |e| e.min(st.seen));
                if lo >= hi {
                    continue;
                }
                let part = chunk.slice(
                    usize::try_from(lo - chunk_start).unwrap_or(0)
                        ..usize::try_from(hi - chunk_start).unwrap_or(0),
                );
                // Keep one byte back: release the previously held one with all but the last.
                let Some(keep) = part.len().checked_sub(1) else {
                    continue;
                };
                let mut out = BytesMut::new();
                if let Some(prev) = st.held.take() {
                    out.extend_from_slice(&prev);
                }
                out.extend_from_slice(&part[..keep]);
                st.held = Some(part.slice(keep..));
                if !out.is_empty() {
                    return Ok(Some((out.freeze(), st)));
                }
            }
        },
    )
}

/// Counts upstream body bytes of a direct stream.
fn source_bytes(inner: &ProxyInner, n: usize) {
    inner.telemetry.add_upstream_bytes(n as u64);
}

/// Where the leader's tee stands.
struct Tee {
    flight: Arc<Flight>,
    rx: Option<mpsc::Receiver<Bytes>>,
    pos: u64,
    /// The final byte, kept in memory until the digest matched.
    held: Option<Bytes>,
}

/// Streams a blob to the client that started its fetch: chunks come straight from the upstream
/// (no disk read-back) while the client keeps up; when the tee is dropped (client too slow) or
/// ends early, the rest follows the file like any other reader. The final byte of a blob of known
/// size is held back from the tee and released once the digest matched, without waiting for the
/// disk write.
pub fn leader_stream(
    flight: Arc<Flight>,
    tee: mpsc::Receiver<Bytes>,
    size: Option<u64>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    use futures::StreamExt as _;
    let position = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = Arc::clone(&position);
    let teed = futures::stream::try_unfold(
        Tee {
            flight: Arc::clone(&flight),
            rx: Some(tee),
            pos: 0,
            held: None,
        },
        move |mut state| {
            async move {
                if let Some(last) = state.held.take() {
                    let held = std::time::Instant::now();
                    state.flight.digest_matched().await?;
                    // How long the client's final byte waited for the digest: the cost of
                    // verifying before the end, on top of a pull that does not verify.
                    tracing::debug!(
                        held_us = held.elapsed().as_micros() as u64,
                        "final byte released"
                    );
                    state.pos += last.len() as u64;
                    state.rx = None;
                    return Ok(Some((last, state)));
                }
                let Some(rx) = state.rx.as_mut() else {
                    return Ok(None);
                };
                let Some(chunk) = rx.recv().await else {
                    return Ok(None);
                };
                let len = chunk.len() as u64;
                match size {
                    // The chunk ending exactly at the announced size: keep its last byte back.
                    Some(total) if state.pos + len == total => {
                        let keep = chunk.len().saturating_sub(1);
                        state.held = Some(chunk.slice(keep..));
                        state.pos += keep as u64;
                        Ok(Some((chunk.slice(..keep), state)))
                    }
                    // More than announced: the fetch fails; stop here and let the file reader
                    // below report it.
                    Some(total) if state.pos + len > total => Ok(None),
                    _ => {
                        state.pos += len;
                        Ok(Some((chunk, state)))
                    }
                }
            }
        },
    )
    .filter(|c| futures::future::ready(!c.as_ref().is_ok_and(Bytes::is_empty)))
    .map(move |c| {
        if let Ok(c) = &c {
            counter.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        c
    });
    // Continue from wherever the tee stopped through the file (nothing left when it delivered
    // the whole blob).
    let rest = futures::stream::once(async move {
        let start = position.load(std::sync::atomic::Ordering::Relaxed);
        // An empty blob has no final byte to hold: its response ends once the flight verified.
        let finished = size.is_some_and(|total| total > 0 && start >= total);
        let tail = (!finished).then(|| flight_stream(flight, start, size));
        futures::stream::iter(tail).flatten()
    })
    .flatten();
    teed.chain(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_readers_of_cached_blobs_share_a_bounded_read_budget() {
        assert_eq!(cached_chunk(0), CACHED_CHUNK);
        assert_eq!(cached_chunk(8), CACHED_CHUNK);
        assert_eq!(cached_chunk(1000), CACHED_READ_BUDGET / 1000);
        assert_eq!(cached_chunk(1_000_000), MIN_CACHED_CHUNK);
        for readers in [1, 10, 100, 1000, 5000] {
            assert!(
                readers * cached_chunk(readers)
                    <= CACHED_READ_BUDGET.max(readers * MIN_CACHED_CHUNK)
            );
        }
    }
}
