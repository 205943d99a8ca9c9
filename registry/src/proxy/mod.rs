//! Pull-through logic: what is served from the cache, what is asked of the upstream, and what is
//! served when the upstream fails.
//!
//! Manifests by digest and blobs are immutable: once cached they never go upstream again. Tags
//! are revalidated with a HEAD (free of Docker Hub's pull budget) once older than their freshness
//! rule allows; a GET is spent only when the digest moved or the tag was never cached. Concurrent
//! work on the same tag, manifest or blob is coalesced into one upstream request. When the
//! upstream is down, failing, slow or rate-limiting, or its budget is at the configured reserve,
//! a cached tag is served and counted as stale. A request for a cached tag waits for its
//! revalidation at most `upstream.revalidateWait` (counted from the HEAD's start), then is served
//! stale while the HEAD finishes in the background. Upstream 404s are remembered for a while
//! (the negative cache), and `tags/list` is cached whole and paginated here. `warm` pre-fetches
//! images through these same paths; `purge` removes them again.

pub mod blobs;
pub mod flight;
pub mod freshness;
pub mod negative;
pub mod purge;
pub mod shared;
pub mod tags;
pub mod warm;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::config::Config;
use crate::oci::{media, Digest, DigestHasher, ErrorCode, Kind, OciError, RepositoryName, Tag};
use crate::store::shared::{SharedStore, SharedStoreError};
use crate::store::{now_secs, Store, StoreError, TagRecord};
use crate::telemetry::{CacheResult, Telemetry};
use crate::upstream::peers::Peers;
use crate::upstream::{self, Target, Upstream, UpstreamError, Upstreams};
use blobs::BlobFlights;
use flight::SingleFlight;
use freshness::{Freshness, FreshnessPolicy};
use negative::{NegativeCache, NotFound};
use tags::{TagList, TagListCache};

/// How long an upstream 404 for a tag is remembered unless configured.
pub const DEFAULT_NOT_FOUND_MAX_AGE: Duration = Duration::from_secs(30);
/// How long an upstream 404 for a digest is remembered unless configured.
pub const DEFAULT_DIGEST_NOT_FOUND_MAX_AGE: Duration = Duration::from_secs(10);

/// A failed pull-through operation. Cloneable: coalesced waiters share one failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("cache storage failed: {0}")]
    Store(Arc<StoreError>),
    #[error(
        "upstream {registry} sent content with digest {actual}, expected {expected}; not cached"
    )]
    DigestMismatch {
        registry: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("upstream {registry} body ended after {received} of {expected} bytes; not cached")]
    Truncated {
        registry: String,
        expected: u64,
        received: u64,
    },
    #[error(
        "upstream {registry} sent a manifest larger than {} bytes",
        media::MAX_MANIFEST_BYTES
    )]
    ManifestTooLarge { registry: String },
    #[error("upstream {registry} body failed: {message}; not cached")]
    Body { registry: String, message: String },
    #[error("upstream {registry} answered without a usable digest for {reference}")]
    NoDigest { registry: String, reference: String },
    #[error("upstream {registry} sent an unusable tag list: {message}")]
    TagsListInvalid { registry: String, message: String },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("shared storage unavailable: {0}")]
    Shared(Arc<SharedStoreError>),
    /// A peer replica answered with something no cachalot sends (never reaches a client: the
    /// upstream is asked instead).
    #[error("peer answered garbage: {0}")]
    PeerGarbage(String),
}

impl From<SharedStoreError> for ProxyError {
    fn from(e: SharedStoreError) -> Self {
        ProxyError::Shared(Arc::new(e))
    }
}

impl From<StoreError> for ProxyError {
    fn from(e: StoreError) -> Self {
        ProxyError::Store(Arc::new(e))
    }
}

impl ProxyError {
    /// The OCI error a client gets for this failure.
    pub fn to_oci(&self, kind: Kind) -> OciError {
        let msg = self.to_string();
        match self {
            ProxyError::Upstream(UpstreamError::Status {
                status,
                retry_after,
                ..
            }) => {
                let (status, code) = match *status {
                    StatusCode::NOT_FOUND => (
                        StatusCode::NOT_FOUND,
                        match kind {
                            Kind::Manifest => ErrorCode::ManifestUnknown,
                            Kind::Blob => ErrorCode::BlobUnknown,
                        },
                    ),
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                        (StatusCode::FORBIDDEN, ErrorCode::Denied)
                    }
                    StatusCode::TOO_MANY_REQUESTS => {
                        (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests)
                    }
                    s if s.is_server_error() => {
                        (StatusCode::BAD_GATEWAY, ErrorCode::UpstreamUnavailable)
                    }
                    _ => (StatusCode::BAD_GATEWAY, ErrorCode::UpstreamInvalid),
                };
                OciError::new(status, code, msg).with_retry_after(retry_after.clone())
            }
            ProxyError::Upstream(UpstreamError::Connect { .. }) => {
                OciError::new(StatusCode::BAD_GATEWAY, ErrorCode::UpstreamUnavailable, msg)
            }
            ProxyError::Upstream(UpstreamError::Timeout { .. }) => OciError::new(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorCode::UpstreamUnavailable,
                msg,
            ),
            ProxyError::Upstream(UpstreamError::CircuitOpen { retry_in, .. }) => OciError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::UpstreamUnavailable,
                msg,
            )
            .with_retry_after(Some(retry_in.as_secs().max(1).to_string())),
            ProxyError::Upstream(UpstreamError::RateLimitedLocally { retry_in, .. }) => {
                OciError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorCode::TooManyRequests,
                    msg,
                )
                .with_retry_after(Some(retry_in.as_secs().max(1).to_string()))
            }
            ProxyError::Upstream(UpstreamError::Token { source, .. }) => {
                use crate::upstream::token::FetchTokenError;
                let (status, code) = match source {
                    _ if source.is_denial() => (StatusCode::FORBIDDEN, ErrorCode::Denied),
                    FetchTokenError::Status { status, .. }
                        if *status == StatusCode::TOO_MANY_REQUESTS =>
                    {
                        (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests)
                    }
                    FetchTokenError::Status { .. } | FetchTokenError::Connect { .. } => {
                        (StatusCode::BAD_GATEWAY, ErrorCode::UpstreamUnavailable)
                    }
                    FetchTokenError::Timeout { .. } => {
                        (StatusCode::GATEWAY_TIMEOUT, ErrorCode::UpstreamUnavailable)
                    }
                    FetchTokenError::Invalid { .. } | FetchTokenError::RealmRefused { .. } => {
                        (StatusCode::BAD_GATEWAY, ErrorCode::UpstreamInvalid)
                    }
                };
                let retry_after = match source {
                    FetchTokenError::Status { retry_after, .. } => retry_after.clone(),
                    _ => None,
                };
                OciError::new(status, code, msg).with_retry_after(retry_after)
            }
            ProxyError::Upstream(UpstreamError::Aborted { .. }) => {
                OciError::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown, msg)
            }
            ProxyError::TagsListInvalid { .. }
            | ProxyError::DigestMismatch { .. }
            | ProxyError::Truncated { .. }
            | ProxyError::ManifestTooLarge { .. }
            | ProxyError::Body { .. }
            | ProxyError::NoDigest { .. } => {
                OciError::new(StatusCode::BAD_GATEWAY, ErrorCode::UpstreamInvalid, msg)
            }
            ProxyError::Shared(_) => OciError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StorageUnavailable,
                msg,
            )
            .with_retry_after(Some("5".into())),
            ProxyError::Store(_) | ProxyError::Internal(_) | ProxyError::PeerGarbage(_) => {
                OciError::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown, msg)
            }
        }
    }
}

/// Why the proxy could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildProxyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] upstream::BuildUpstreamError),
    #[error("storage.s3: {0}")]
    Shared(#[from] SharedStoreError),
    #[error("storage.s3: {0}")]
    Upkeep(#[from] shared::BuildUpkeepError),
    #[error("registries.{registry}.freshness: {source}")]
    Freshness {
        registry: String,
        source: globset::Error,
    },
}

/// A manifest answer.
#[derive(Debug, Clone)]
pub struct ManifestReply {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// `None` for HEAD.
    pub body: Option<Bytes>,
    pub cache: CacheResult,
    /// For a tag: when it was last confirmed upstream (unix seconds). Sent as
    /// `X-Cachalot-Checked-At`, so a replica that asked its owner keeps the owner's freshness
    /// instead of starting a new `maxAge` window.
    pub checked_at: Option<u64>,
}

/// A manifest fetched from upstream and cached.
#[derive(Debug, Clone)]
struct Fetched {
    digest: Digest,
    media_type: String,
    bytes: Bytes,
    /// When the owner replica that answered last confirmed the tag (see [`peer_checked_at`]).
    checked_at: Option<u64>,
}

impl Fetched {
    /// The reply for one of the coalesced requesters: the one that started the fetch saw a
    /// miss, the others were served by it (a hit).
    fn into_reply(self, head: bool, leader: bool) -> ManifestReply {
        ManifestReply {
            digest: self.digest,
            media_type: self.media_type,
            size: self.bytes.len() as u64,
            body: (!head).then_some(self.bytes),
            cache: if leader {
                CacheResult::Miss
            } else {
                CacheResult::Hit
            },
            checked_at: self.checked_at,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TagKey {
    Revalidate(String, RepositoryName, Tag),
    Get(String, RepositoryName, Tag),
}

/// Shared state of the proxy (also held by background fetch tasks).
#[derive(Debug)]
pub struct ProxyInner {
    pub store: Arc<Store>,
    pub telemetry: Arc<Telemetry>,
    pub upstreams: Upstreams,
    pub blob_flights: BlobFlights,
    manifest_flights: SingleFlight<(String, Digest), Fetched>,
    /// HEAD revalidations of cached tags; the result is what the tag points at upstream now.
    tag_flights: SingleFlight<TagKey, TagRecord>,
    tag_get_flights: SingleFlight<TagKey, Fetched>,
    policies: HashMap<String, FreshnessPolicy>,
    reserves: HashMap<String, u64>,
    pub body_idle_timeout: Duration,
    /// Upstream 404s, and how long each registry remembers them: (tag, digest).
    negative: NegativeCache,
    not_found_ages: HashMap<String, (Duration, Duration)>,
    revalidate_wait: Duration,
    tag_lists: TagListCache,
    tag_list_flights: SingleFlight<(String, RepositoryName), Arc<TagList>>,
    /// The shared tier (`storage.s3`); the disk store is then its local read cache.
    pub shared: Option<SharedStore>,
    /// Writes to the shared tier still running in the background.
    pub shared_writes: shared::Pending,
    /// The other replicas (`cluster`), which own their share of the objects.
    pub peers: Option<Peers>,
    /// Shared-tier bookkeeping: last uses, the bucket bound, multipart clean-up.
    pub shared_upkeep: shared::Upkeep,
    /// What this mirror purged recently, for its spokes (kept in the store directory).
    pub purge_log: crate::purge_log::PurgeLog,
}

impl ProxyInner {
    /// A cache write that failed (full disk, any I/O error): the client is served anyway, so this
    /// is only counted (`cache_write_failures_total{registry}`) and logged. `what` says which
    /// kind of content (`blob`, `manifest`, `tag`).
    pub fn note_cache_write_failure(
        &self,
        registry: &str,
        what: &'static str,
        error: &dyn std::fmt::Display,
    ) {
        self.telemetry.add_cache_write_failure(registry);
        tracing::warn!(
            registry,
            content = what,
            error = %error,
            "cache write failed; serving from the upstream without caching (caching resumes once the storage accepts writes)"
        );
    }

    /// Records that `repo` has cached content (for the catalog); a failure only costs the
    /// catalog entry, so it is noted, not raised.
    pub fn note_repository(&self, registry: &str, repo: &RepositoryName) {
        if let Err(e) = self.store.note_repository(registry, repo) {
            self.note_cache_write_failure(registry, "repository", &e);
        }
    }

    /// Records what a tag points at; a failure only costs a revalidation later, so it is noted,
    /// not raised.
    /// With a shared tier, a record learnt from the real upstream (not from a peer, which
    /// publishes its own) is published there too.
    fn cache_tag(&self, upstream: &Upstream, repo: &RepositoryName, tag: &Tag, record: &TagRecord) {
        let registry = upstream.name();
        if let Err(e) = self.store.write_tag(registry, repo, tag, record) {
            self.note_cache_write_failure(registry, "tag", &e);
        }
        if !upstream.is_peer() {
            self.publish_tag(registry, repo, tag, record);
        }
    }

    /// Called after content is committed: keeps the cache under its bound and the gauge true.
    /// An eviction pass deletes files and, with pins, reads tag files and manifests, so it runs
    /// on the blocking pool; under the bound only the gauges move.
    pub fn after_commit(&self) {
        let (store, telemetry) = (Arc::clone(&self.store), Arc::clone(&self.telemetry));
        let settle = move || {
            let evicted = store.evict();
            if evicted > 0 {
                telemetry.add_evictions(evicted);
            }
            telemetry.set_cache_size(store.index().total_size());
            telemetry.set_pinned_bytes(store.pinned_bytes());
        };
        if self.store.index().over_bound() {
            drop(tokio::task::spawn_blocking(settle));
        } else {
            settle();
        }
    }
}

/// The pull-through proxy.
#[derive(Debug, Clone)]
pub struct Proxy {
    inner: Arc<ProxyInner>,
}

/// Reads a manifest body with the size limit enforced while streaming.
async fn read_manifest_body(
    registry: &str,
    response: reqwest::Response,
    idle: Duration,
) -> Result<Bytes, ProxyError> {
    let too_large = ProxyError::ManifestTooLarge {
        registry: registry.to_owned(),
    };
    let limit = usize::try_from(media::MAX_MANIFEST_BYTES).unwrap_or(usize::MAX);
    read_bounded_body(registry, response, limit, idle, too_large).await
}

/// Reads a body of at most `limit` bytes (`too_large` beyond), with at most `idle` between
/// chunks.
pub(crate) async fn read_bounded_body(
    registry: &str,
    mut response: reqwest::Response,
    limit: usize,
    idle: Duration,
    too_large: ProxyError,
) -> Result<Bytes, ProxyError> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(too_large);
    }
    let mut body = Vec::new();
    loop {
        match tokio::time::timeout(idle, response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                if body.len() + chunk.len() > limit {
                    return Err(too_large);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                return Err(ProxyError::Body {
                    registry: registry.to_owned(),
                    message: e.to_string(),
                })
            }
            Err(_) => {
                return Err(ProxyError::Body {
                    registry: registry.to_owned(),
                    message: format!("no data for {}s", idle.as_secs()),
                })
            }
        }
    }
    Ok(Bytes::from(body))
}

impl Proxy {
    /// Opens the store and builds the upstreams described by a validated config.
    pub fn new(config: &Config, telemetry: Arc<Telemetry>) -> Result<Proxy, BuildProxyError> {
        let store = Arc::new(Store::from_config(config)?);
        let upstreams = Upstreams::new(config, Arc::clone(&telemetry))?;
        let shared = config
            .storage
            .s3
            .as_ref()
            .map(SharedStore::from_config)
            .transpose()?;
        let peers = Peers::new(config, &upstreams)?;
        let mut policies = HashMap::new();
        let mut reserves = HashMap::new();
        let mut not_found_ages = HashMap::new();
        for (name, registry) in &config.registries {
            not_found_ages.insert(
                name.clone(),
                (
                    registry
                        .not_found_max_age
                        .unwrap_or(DEFAULT_NOT_FOUND_MAX_AGE),
                    registry
                        .digest_not_found_max_age
                        .unwrap_or(DEFAULT_DIGEST_NOT_FOUND_MAX_AGE),
                ),
            );
            let policy = FreshnessPolicy::new(&registry.freshness).map_err(|source| {
                BuildProxyError::Freshness {
                    registry: name.clone(),
                    source,
                }
            })?;
            policies.insert(name.clone(), policy);
            reserves.insert(name.clone(), registry.budget_reserve);
        }
        telemetry.set_cache_size(store.index().total_size());
        let purge_log = crate::purge_log::PurgeLog::open(store.root());
        Ok(Proxy {
            inner: Arc::new(ProxyInner {
                store,
                telemetry,
                upstreams,
                blob_flights: BlobFlights::default(),
                manifest_flights: SingleFlight::default(),
                tag_flights: SingleFlight::default(),
                tag_get_flights: SingleFlight::default(),
                policies,
                reserves,
                body_idle_timeout: config.upstream.body_idle_timeout,
                negative: NegativeCache::default(),
                not_found_ages,
                revalidate_wait: config.upstream.revalidate_wait,
                tag_lists: TagListCache::default(),
                tag_list_flights: SingleFlight::default(),
                shared_upkeep: shared::Upkeep::new(config, shared.is_some())?,
                shared,
                shared_writes: shared::Pending::default(),
                peers,
                purge_log,
            }),
        })
    }

    pub fn inner(&self) -> &Arc<ProxyInner> {
        &self.inner
    }

    /// Waits (bounded) until no fetch is in flight, so a shutdown lets started cache writes
    /// commit. Returns false if fetches were still running at the deadline.
    pub async fn wait_idle(&self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let idle = self.inner.blob_flights.is_empty()
                && self.inner.manifest_flights.is_empty()
                && self.inner.tag_get_flights.is_empty()
                && self.inner.tag_flights.is_empty()
                && self.inner.tag_list_flights.is_empty()
                && self.inner.shared_writes.is_empty();
            if idle {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn upstream(&self, registry: &str) -> Option<&Arc<Upstream>> {
        self.inner.upstreams.get(registry)
    }

    /// Where a request for `key` of `upstream`'s registry goes: the replica that owns the key
    /// (see [`Peers`]), or `upstream` itself when this replica owns it, there are no peers, or
    /// the request was forwarded here by a peer already.
    pub fn route(&self, upstream: &Arc<Upstream>, key: &str, forwarded: bool) -> Arc<Upstream> {
        match &self.inner.peers {
            Some(peers) if !forwarded => peers
                .route(upstream.name(), key)
                .unwrap_or_else(|| Arc::clone(upstream)),
            _ => Arc::clone(upstream),
        }
    }

    /// Checks the shared tier answers and claims its prefix for `owner` (at startup).
    pub async fn claim_shared(&self, owner: &str) -> Result<(), SharedStoreError> {
        match &self.inner.shared {
            Some(shared) => shared.claim(owner).await,
            None => Ok(()),
        }
    }

    fn freshness(&self, registry: &str, repo: &RepositoryName, tag: &Tag) -> Freshness {
        self.inner
            .policies
            .get(registry)
            .map(|p| p.lookup(repo.as_str(), tag.as_str()))
            .unwrap_or(Freshness::MaxAge(Duration::from_secs(60)))
    }

    /// Whether the upstream's remaining budget is at or below the configured reserve.
    fn budget_low(&self, upstream: &Upstream) -> bool {
        let reserve = self
            .inner
            .reserves
            .get(upstream.name())
            .copied()
            .unwrap_or(0);
        upstream
            .budget()
            .is_some_and(|b| reserve > 0 && b.remaining <= reserve)
    }

    /// A manifest by digest: from the cache, or fetched once and cached.
    pub async fn manifest_by_digest(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepositoryName,
        digest: &Digest,
        head: bool,
    ) -> Result<ManifestReply, ProxyError> {
        if let Some(m) = self.inner.cached_manifest(digest).await? {
            return Ok(ManifestReply {
                digest: digest.clone(),
                media_type: m.media_type,
                size: m.bytes.len() as u64,
                body: (!head).then_some(m.bytes),
                cache: CacheResult::Hit,
                checked_at: None,
            });
        }
        let key = NotFound::Manifest(upstream.name().to_owned(), repo.clone(), digest.clone());
        if let Some(e) = self.remembered_not_found(&key) {
            return Err(e);
        }
        let (fetched, leader) = self.fetch_by_digest(upstream, repo, digest).await;
        match fetched {
            Ok(fetched) => Ok(fetched.into_reply(head, leader)),
            Err(e) => {
                self.remember_not_found(key, &e);
                Err(e)
            }
        }
    }

    /// The remembered upstream 404 for `key`, if any (counted as a negative-cache hit).
    fn remembered_not_found(&self, key: &NotFound) -> Option<ProxyError> {
        let error = self.inner.negative.get(key, Instant::now())?;
        self.inner
            .telemetry
            .record_negative_hit(key.registry(), key.kind());
        tracing::debug!(
            registry = key.registry(),
            kind = key.kind(),
            "answered from the negative cache"
        );
        Some(ProxyError::Upstream(error))
    }

    /// Remembers `error` for `key` if it is an upstream 404.
    fn remember_not_found(&self, key: NotFound, error: &ProxyError) {
        let ProxyError::Upstream(e @ UpstreamError::Status { status, .. }) = error else {
            return;
        };
        if *status != StatusCode::NOT_FOUND {
            return;
        }
        let (tag_age, digest_age) = self
            .inner
            .not_found_ages
            .get(key.registry())
            .copied()
            .unwrap_or((DEFAULT_NOT_FOUND_MAX_AGE, DEFAULT_DIGEST_NOT_FOUND_MAX_AGE));
        let ttl = match &key {
            NotFound::Tag(registry, repo, tag) => self
                .inner
                .policies
                .get(registry)
                .and_then(|p| p.not_found_for(repo.as_str(), tag.as_str()))
                .unwrap_or(tag_age),
            NotFound::TagsList(..) => tag_age,
            NotFound::Manifest(..) | NotFound::Blob(..) => digest_age,
        };
        self.inner.negative.put(key, e, ttl, Instant::now());
    }

    /// A remembered upstream 404 for a blob the cache does not hold (cached content wins).
    pub fn blob_not_found(
        &self,
        registry: &str,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Option<ProxyError> {
        let key = NotFound::Blob(registry.to_owned(), repo.clone(), digest.clone());
        // The common case, no entry, costs one map lookup; the store is asked only when there is
        // an entry, since content cached meanwhile (through another repository) wins.
        self.inner.negative.get(&key, Instant::now())?;
        if self.inner.store.blob_size(digest).is_some() {
            return None;
        }
        self.remembered_not_found(&key)
    }

    /// Remembers a blob request's failure if it was an upstream 404.
    pub fn note_blob_failure(
        &self,
        registry: &str,
        repo: &RepositoryName,
        digest: &Digest,
        error: &ProxyError,
    ) {
        let key = NotFound::Blob(registry.to_owned(), repo.clone(), digest.clone());
        self.remember_not_found(key, error);
    }

    async fn fetch_by_digest(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> (Result<Fetched, ProxyError>, bool) {
        let key = (upstream.name().to_owned(), digest.clone());
        let inner = Arc::clone(&self.inner);
        let upstream = Arc::clone(upstream);
        let repo = repo.clone();
        let digest = digest.clone();
        self.inner
            .manifest_flights
            .run(key, move || async move {
                let reference = crate::oci::Reference::Digest(digest.clone());
                fetch_manifest(&inner, &upstream, &repo, &reference, Some(&digest)).await
            })
            .await
    }

    /// A manifest by tag, applying the freshness policy and stale-if-error.
    pub async fn manifest_by_tag(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepositoryName,
        tag: &Tag,
        head: bool,
    ) -> Result<ManifestReply, ProxyError> {
        let registry = upstream.name();
        let local = self.inner.store.read_tag(registry, repo, tag)?;
        let stale = local.as_ref().is_some_and(|r| {
            !self
                .freshness(registry, repo, tag)
                .is_fresh(r.checked_at, now_secs())
        });
        let cached = self
            .inner
            .newest_tag(registry, repo, tag, local, stale)
            .await?;
        let not_found = NotFound::Tag(registry.to_owned(), repo.clone(), tag.clone());
        let Some(record) = cached else {
            if let Some(e) = self.remembered_not_found(&not_found) {
                return Err(e);
            }
            let result = self.uncached_tag(upstream, repo, tag, head).await;
            if let Err(e) = &result {
                self.remember_not_found(not_found, e);
            }
            return result;
        };
        if self
            .freshness(registry, repo, tag)
            .is_fresh(record.checked_at, now_secs())
        {
            // Served without asking the upstream: if the budget figure has expired, one free
            // HEAD in the background renews it (at most once a minute).
            upstream.refresh_expired_budget(repo, &crate::oci::Reference::Tag(tag.clone()));
            return self
                .serve_record(upstream, repo, &record, head, CacheResult::Hit)
                .await;
        }
        if let Some(e) = self.remembered_not_found(&not_found) {
            return Err(e);
        }
        let key = TagKey::Revalidate(registry.to_owned(), repo.clone(), tag.clone());
        let inner = Arc::clone(&self.inner);
        let task_upstream = Arc::clone(upstream);
        let (task_repo, task_tag, task_record) = (repo.clone(), tag.clone(), record.clone());
        let joined = self.inner.tag_flights.join(key, move || async move {
            revalidate(&inner, &task_upstream, &task_repo, &task_tag, &task_record).await
        });
        // The wait counts from the HEAD's start: a request joining a HEAD that is already slow
        // is answered at once.
        let deadline = tokio::time::Instant::from_std(joined.started + self.inner.revalidate_wait);
        let outcome = match tokio::time::timeout_at(deadline, joined.flight.clone()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                if joined.leader {
                    let continuation = self.clone().finish_revalidation(
                        Arc::clone(upstream),
                        repo.clone(),
                        tag.clone(),
                        record.clone(),
                        joined.flight,
                    );
                    drop(tokio::spawn(continuation));
                }
                tracing::info!(registry, repository = %repo, %tag, "revalidation still running; serving the cached tag meanwhile");
                return self
                    .serve_record(upstream, repo, &record, head, CacheResult::Stale)
                    .await;
            }
        };
        match outcome {
            Ok(current) if current.digest == record.digest => {
                self.serve_record(upstream, repo, &current, head, CacheResult::Hit)
                    .await
            }
            Ok(moved) => {
                if self.budget_low(upstream) {
                    tracing::info!(registry, repository = %repo, %tag, "upstream budget at reserve; serving the cached tag instead of a counted GET");
                    return self
                        .serve_record(upstream, repo, &record, head, CacheResult::Stale)
                        .await;
                }
                let moved_cached = self.inner.cached_manifest(&moved.digest).await?.is_some();
                let result = if head || moved_cached {
                    self.serve_record(upstream, repo, &moved, head, CacheResult::Miss)
                        .await
                } else {
                    self.get_tag(upstream, repo, tag).await
                };
                match result {
                    Ok(reply) => Ok(reply),
                    Err(ProxyError::Upstream(e)) if e.allows_stale() => {
                        self.serve_record(upstream, repo, &record, head, CacheResult::Stale)
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
            Err(ProxyError::Upstream(e)) if e.allows_stale() => {
                tracing::info!(registry, repository = %repo, %tag, error = %e, "serving stale tag");
                self.serve_record(upstream, repo, &record, head, CacheResult::Stale)
                    .await
            }
            Err(e) => {
                self.remember_not_found(not_found, &e);
                Err(e)
            }
        }
    }

    /// Finishes, in the background, what a request served stale before its revalidation ended:
    /// a moved tag gets its new manifest (one GET, unless cached or the budget is at its
    /// reserve), so the next request is answered from the cache with the new digest.
    async fn finish_revalidation(
        self,
        upstream: Arc<Upstream>,
        repo: RepositoryName,
        tag: Tag,
        record: TagRecord,
        flight: flight::Flight<TagRecord, ProxyError>,
    ) {
        let registry = upstream.name();
        let moved = match flight.await {
            Ok(current) if current.digest != record.digest => current,
            Ok(_) => return,
            Err(e) => {
                tracing::info!(registry, repository = %repo, %tag, error = %e, "background revalidation failed; the cached tag stays");
                self.remember_not_found(
                    NotFound::Tag(registry.to_owned(), repo.clone(), tag.clone()),
                    &e,
                );
                return;
            }
        };
        if self.budget_low(&upstream) {
            tracing::info!(registry, repository = %repo, %tag, "tag moved, but the upstream budget is at its reserve; keeping the cached tag");
            return;
        }
        let applied = match self.inner.cached_manifest(&moved.digest).await {
            Ok(Some(_)) => {
                self.inner.cache_tag(&upstream, &repo, &tag, &moved);
                Ok(())
            }
            Ok(None) => self.get_tag(&upstream, &repo, &tag).await.map(drop),
            Err(e) => Err(e),
        };
        match applied {
            Ok(()) => {
                tracing::info!(registry, repository = %repo, %tag, digest = %moved.digest, "tag moved; cached its new manifest in the background");
            }
            Err(e) => {
                tracing::info!(registry, repository = %repo, %tag, error = %e, "tag moved, but its new manifest could not be cached");
            }
        }
    }

    /// A repository's `tags/list`: the cached full list while fresh (see
    /// [`FreshnessPolicy::tags_list_max_age`]), else fetched once for every waiting request, and
    /// the cached list again (stale) when the upstream fails.
    pub async fn tags_list(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepositoryName,
    ) -> Result<(Arc<TagList>, CacheResult), ProxyError> {
        let registry = upstream.name();
        let cached = self.inner.tag_lists.get(registry, repo);
        let max_age = self
            .inner
            .policies
            .get(registry)
            .map_or(Duration::from_secs(60), |p| {
                p.tags_list_max_age(repo.as_str())
            });
        if let Some((list, fetched)) = &cached {
            if fetched.elapsed() < max_age {
                return Ok((Arc::clone(list), CacheResult::Hit));
            }
        }
        let not_found = NotFound::TagsList(registry.to_owned(), repo.clone());
        if let Some(e) = self.remembered_not_found(&not_found) {
            return Err(e);
        }
        let inner = Arc::clone(&self.inner);
        let task_upstream = Arc::clone(upstream);
        let task_repo = repo.clone();
        let (result, leader) = self
            .inner
            .tag_list_flights
            .run((registry.to_owned(), repo.clone()), move || async move {
                let list = Arc::new(
                    tags::fetch_all(&task_upstream, &task_repo, inner.body_idle_timeout).await?,
                );
                inner.tag_lists.put(
                    task_upstream.name(),
                    &task_repo,
                    Arc::clone(&list),
                    Instant::now(),
                );
                Ok(list)
            })
            .await;
        match (result, cached) {
            (Ok(list), _) => {
                self.inner.negative.remove(&not_found);
                let cache = if leader {
                    CacheResult::Miss
                } else {
                    CacheResult::Hit
                };
                Ok((list, cache))
            }
            (Err(e), Some((list, _)))
                if matches!(&e, ProxyError::Upstream(u) if u.allows_stale())
                    || matches!(e, ProxyError::TagsListInvalid { .. }) =>
            {
                tracing::info!(registry, repository = %repo, error = %e, "serving stale tag list");
                Ok((list, CacheResult::Stale))
            }
            (Err(e), _) => {
                self.remember_not_found(not_found, &e);
                Err(e)
            }
        }
    }

    /// A tag never seen: HEAD asks upstream for the digest only; GET fetches and caches.
    async fn uncached_tag(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepositoryName,
        tag: &Tag,
        head: bool,
    ) -> Result<ManifestReply, ProxyError> {
        if head {
            let record = head_tag(upstream, repo, tag).await?;
            if let Some(record) = record {
                self.inner.cache_tag(upstream, repo, tag, &record);
                self.inner.note_repository(upstream.name(), repo);
                return Ok(ManifestReply {
                    digest: record.digest,
                    media_type: record.media_type,
                    size: record.size,
                    body: None,
                    cache: CacheResult::Miss,
                    checked_at: Some(record.checked_at),
                });
            }
        }
        self.get_tag(upstream, repo, tag).await
    }

    /// GET by tag, coalesced, cached, and recorded as the tag's current digest.
    async fn get_tag(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepositoryName,
        tag: &Tag,
    ) -> Result<ManifestReply, ProxyError> {
        let key = TagKey::Get(upstream.name().to_owned(), repo.clone(), tag.clone());
        let inner = Arc::clone(&self.inner);
        let task_upstream = Arc::clone(upstream);
        let (task_repo, task_tag) = (repo.clone(), tag.clone());
        let (fetched, leader) = self
            .inner
            .tag_get_flights
            .run(key, move || async move {
                let reference = crate::oci::Reference::Tag(task_tag.clone());
                let fetched =
                    fetch_manifest(&inner, &task_upstream, &task_repo, &reference, None).await?;
                let checked_at = fetched.checked_at.unwrap_or_else(now_secs);
                let record = TagRecord {
                    digest: fetched.digest.clone(),
                    media_type: fetched.media_type.clone(),
                    size: fetched.bytes.len() as u64,
                    checked_at,
                };
                inner.cache_tag(&task_upstream, &task_repo, &task_tag, &record);
                Ok(Fetched {
                    checked_at: Some(checked_at),
                    ..fetched
                })
            })
            .await;
        Ok(fetched?.into_reply(false, leader))
    }

    /// Answers from a tag record; a GET whose manifest body is not cached fetches it by digest.
    async fn serve_record(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepositoryName,
        record: &TagRecord,
        head: bool,
        cache: CacheResult,
    ) -> Result<ManifestReply, ProxyError> {
        if head {
            return Ok(ManifestReply {
                digest: record.digest.clone(),
                media_type: record.media_type.clone(),
                size: record.size,
                body: None,
                cache,
                checked_at: Some(record.checked_at),
            });
        }
        if let Some(m) = self.inner.cached_manifest(&record.digest).await? {
            return Ok(ManifestReply {
                digest: record.digest.clone(),
                media_type: m.media_type,
                size: m.bytes.len() as u64,
                body: Some(m.bytes),
                cache,
                checked_at: Some(record.checked_at),
            });
        }
        let mut reply = self
            .manifest_by_digest(upstream, repo, &record.digest, false)
            .await?;
        if cache == CacheResult::Stale {
            reply.cache = CacheResult::Stale;
        }
        reply.checked_at = Some(record.checked_at);
        Ok(reply)
    }
}

/// When the tag `response` answers for was last confirmed upstream, when a cachalot answered:
/// the owner replica's `X-Cachalot-Checked-At` (same cluster), or now minus the parent's `Age`
/// (a hub in another cluster, whose clock may differ), never in the future; `None` for an
/// upstream's answer (confirmed now).
fn peer_checked_at(upstream: &Upstream, response: &reqwest::Response) -> Option<u64> {
    if upstream.answered_by_parent(response) {
        let age = upstream::ratelimit::numeric_header(response.headers(), http::header::AGE)?;
        return Some(crate::fleet::dated_back(now_secs(), age));
    }
    if !upstream.answered_by_peer(response) {
        return None;
    }
    let value = response
        .headers()
        .get(upstream::CHECKED_AT)?
        .to_str()
        .ok()?;
    value.parse::<u64>().ok().map(|t| t.min(now_secs()))
}

/// HEAD by tag: the upstream's current digest, media type and size, without spending a GET.
async fn head_tag(
    upstream: &Upstream,
    repo: &RepositoryName,
    tag: &Tag,
) -> Result<Option<TagRecord>, ProxyError> {
    let reference = crate::oci::Reference::Tag(tag.clone());
    let response = upstream
        .send(Method::HEAD, repo, Target::Manifest(&reference))
        .await?;
    let Some(digest) = upstream::content_digest(&response) else {
        return Ok(None);
    };
    let Some(media_type) = upstream::content_type(&response) else {
        return Ok(None);
    };
    Ok(Some(TagRecord {
        digest,
        media_type,
        size: upstream::declared_length(&response).unwrap_or(0),
        checked_at: peer_checked_at(upstream, &response).unwrap_or_else(now_secs),
    }))
}

/// Revalidates a cached tag with one HEAD. An unchanged digest only moves the timestamp.
async fn revalidate(
    inner: &Arc<ProxyInner>,
    upstream: &Arc<Upstream>,
    repo: &RepositoryName,
    tag: &Tag,
    cached: &TagRecord,
) -> Result<TagRecord, ProxyError> {
    // The record was read before this flight started: a flight that ended in between (the
    // caller's bucket read is a network round trip) may have confirmed the tag already. Then its
    // answer stands and no second HEAD is sent.
    if let Ok(Some(confirmed)) = inner.store.read_tag(upstream.name(), repo, tag) {
        if confirmed.checked_at > cached.checked_at {
            return Ok(confirmed);
        }
    }
    let Some(current) = head_tag(upstream, repo, tag).await? else {
        // The upstream answered the HEAD without a digest: only a GET can tell. This is not a
        // failed HEAD (which never falls back to a GET); it is an upstream that omits the header.
        return Err(ProxyError::NoDigest {
            registry: upstream.name().to_owned(),
            reference: tag.to_string(),
        });
    };
    if current.digest == cached.digest {
        let touched = TagRecord {
            checked_at: current.checked_at,
            ..cached.clone()
        };
        inner.cache_tag(upstream, repo, tag, &touched);
        return Ok(touched);
    }
    Ok(current)
}

/// GETs a manifest (see [`fetch_manifest_from`]); a peer that answers with garbage is treated
/// as down and the upstream asked instead.
async fn fetch_manifest(
    inner: &Arc<ProxyInner>,
    upstream: &Arc<Upstream>,
    repo: &RepositoryName,
    reference: &crate::oci::Reference,
    expected: Option<&Digest>,
) -> Result<Fetched, ProxyError> {
    match fetch_manifest_from(inner, upstream, repo, reference, expected).await {
        Err(ProxyError::PeerGarbage(what)) => match upstream.peer_answered_garbage(&what) {
            Some(fallback) => fetch_manifest_from(inner, fallback, repo, reference, expected).await,
            None => Err(ProxyError::Internal(what)),
        },
        Err(
            e @ (ProxyError::DigestMismatch { .. }
            | ProxyError::ManifestTooLarge { .. }
            | ProxyError::NoDigest { .. }),
        ) if upstream.is_peer() => match upstream.peer_answered_garbage(&e.to_string()) {
            Some(fallback) => fetch_manifest_from(inner, fallback, repo, reference, expected).await,
            None => Err(e),
        },
        result => result,
    }
}

/// GETs a manifest, verifies it (against the requested digest, or the upstream's
/// `Docker-Content-Digest` for a tag) and caches it.
async fn fetch_manifest_from(
    inner: &Arc<ProxyInner>,
    upstream: &Arc<Upstream>,
    repo: &RepositoryName,
    reference: &crate::oci::Reference,
    expected: Option<&Digest>,
) -> Result<Fetched, ProxyError> {
    let registry = upstream.name().to_owned();
    let response = upstream
        .send(Method::GET, repo, Target::Manifest(reference))
        .await?;
    let media_type =
        upstream::content_type(&response).unwrap_or_else(|| media::DOCKER_MANIFEST_V2.to_owned());
    let header_digest = upstream::content_digest(&response);
    let from_peer = upstream.answered_by_peer(&response);
    let checked_at = peer_checked_at(upstream, &response);
    // A cachalot always names the manifest it sends.
    if from_peer
        && (header_digest.is_none() || expected.is_some_and(|e| header_digest.as_ref() != Some(e)))
    {
        return Err(ProxyError::PeerGarbage(
            "a manifest without its digest".into(),
        ));
    }
    let bytes = read_manifest_body(&registry, response, inner.body_idle_timeout).await?;
    if !from_peer {
        inner.telemetry.add_upstream_bytes(bytes.len() as u64);
    }
    let expected = expected.cloned().or(header_digest);
    let digest = match expected {
        Some(expected) => {
            let mut hasher = DigestHasher::new(expected.algorithm());
            hasher.update(&bytes);
            let actual = hasher.finish();
            if actual != expected {
                return Err(ProxyError::DigestMismatch {
                    registry,
                    expected,
                    actual,
                });
            }
            expected
        }
        None => Digest::sha256_of(&bytes),
    };
    let store = Arc::clone(&inner.store);
    let (d, t, b) = (digest.clone(), media_type.clone(), bytes.clone());
    let written = tokio::task::spawn_blocking(move || store.write_manifest(&d, &t, &b))
        .await
        .map_err(|e| ProxyError::Internal(format!("manifest write task failed: {e}")))?;
    // The verified manifest is served whether or not the cache could keep it.
    if let Err(e) = written {
        inner.note_cache_write_failure(&registry, "manifest", &e);
        return Ok(Fetched {
            digest,
            media_type,
            bytes,
            checked_at,
        });
    }
    inner.note_repository(&registry, repo);
    if !from_peer {
        inner.publish_manifest(&registry, &digest, &media_type, &bytes);
    }
    inner.after_commit();
    Ok(Fetched {
        digest,
        media_type,
        bytes,
        checked_at,
    })
}
