//! How the proxy uses the shared tier (`storage.s3`): the disk store in front of it is the local
//! read cache; what misses there is looked up in the shared tier before any peer or upstream is
//! asked, and what this replica fetched from the real upstream is published to the shared tier
//! in the background, after it was verified and committed locally.
//!
//! A replica publishes only what it fetched from the upstream itself: content a peer served was
//! published by that peer. Publishing is best effort (a failure is counted as a cache write
//! failure and logged); reading is not: with the shared tier unreachable, content the local read
//! cache does not hold is answered with a 503 (`STORAGE_UNAVAILABLE`), never fetched upstream
//! behind the other replicas' backs. Background writes are counted ([`Pending`]) so a shutdown
//! waits for them.
//!
//! Upkeep ([`ProxyInner::shared_upkeep_pass`], every `storage.lastUseFlushInterval`): each replica
//! writes the last uses it noted (what it served, from its read cache or the bucket) to its
//! record in the bucket; the replica that owns the key `_cachalot/upkeep` (rendezvous over the
//! live peers, or the only replica) then keeps the prefix under `storage.maxSizeBytes` (LRU, pins
//! kept, nothing used within the grace period) and, once an hour, aborts multipart uploads
//! older than an hour (left by killed processes). See `store::shared_lru` for the contract.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{ProxyError, ProxyInner};
use crate::config::Config;
use crate::oci::{Digest, RepositoryName, Tag};
use crate::store::s3_uploads::{AbortStaleUploadsError, MultipartUploads};
use crate::store::shared::{manifest_key, SharedStoreError};
use crate::store::shared_lru::{self, SharedLastUse};
use crate::store::{StoredManifest, TagRecord};

/// Background writes to the shared tier still running.
#[derive(Debug, Default, Clone)]
pub struct Pending(Arc<AtomicUsize>);

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.0.load(Ordering::Acquire) == 0
    }

    /// Runs `work` in the background, counted until it ends.
    fn spawn<F>(&self, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.0.fetch_add(1, Ordering::AcqRel);
        let counter = Arc::clone(&self.0);
        tokio::spawn(async move {
            work.await;
            counter.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Multipart uploads older than this are abandoned (a killed process's) and aborted.
const STALE_UPLOAD_AGE: Duration = Duration::from_secs(3600);

/// The key whose owner replica runs eviction and multipart clean-up.
const UPKEEP_KEY: &str = "_cachalot/upkeep";

/// Why the shared-tier upkeep could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BuildUpkeepError {
    #[error(transparent)]
    Uploads(#[from] AbortStaleUploadsError),
}

/// The shared tier's bookkeeping state.
#[derive(Debug, Default)]
pub struct Upkeep {
    /// Uses this replica noted since its last flush.
    pub last_use: SharedLastUse,
    /// Names this replica's last-use record.
    replica_id: String,
    /// `storage.maxSizeBytes`: the bound of the bucket prefix.
    max_size: Option<u64>,
    /// No object used or written within this is evicted.
    grace: Duration,
    uploads: Option<MultipartUploads>,
    /// Unix seconds of the last multipart clean-up (0: never).
    uploads_cleaned_at: AtomicU64,
}

/// The eviction grace period for a flush interval: at least twice the interval plus a minute of
/// clock skew, and never under 10 minutes. Pure.
pub fn eviction_grace(flush: Duration) -> Duration {
    (flush * 2 + Duration::from_secs(60)).max(Duration::from_secs(600))
}

/// A last-use record name from a replica's URL or host name: letters, digits, `.`, `_`, `-`,
/// at most 128 characters. Pure.
pub fn replica_id(name: &str) -> String {
    let id: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    if id.is_empty() {
        "replica".to_owned()
    } else {
        id
    }
}

impl Upkeep {
    /// The name of this replica's last-use record.
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// The upkeep of a validated config (inert without a shared tier).
    pub fn new(config: &Config, shared: bool) -> Result<Upkeep, BuildUpkeepError> {
        let Some(s3) = config.storage.s3.as_ref().filter(|_| shared) else {
            return Ok(Upkeep::default());
        };
        let name = match &config.cluster {
            Some(cluster) => cluster.self_url.clone(),
            None => std::env::var("HOSTNAME").unwrap_or_default(),
        };
        Ok(Upkeep {
            last_use: SharedLastUse::new(),
            replica_id: replica_id(&name),
            max_size: config.storage.max_size_bytes,
            grace: s3
                .eviction_grace
                .unwrap_or_else(|| eviction_grace(config.storage.last_use_flush_interval)),
            uploads: Some(MultipartUploads::from_config(s3)?),
            uploads_cleaned_at: AtomicU64::new(0),
        })
    }
}

impl ProxyInner {
    /// Notes that `key` of the shared tier was served (for its LRU position there).
    pub fn note_shared_use(&self, key: &str) {
        if self.shared.is_some() {
            self.shared_upkeep.last_use.note(key);
        }
    }

    /// Whether this replica runs the prefix's eviction and clean-up now.
    fn owns_upkeep(&self) -> bool {
        match &self.peers {
            Some(peers) => peers.owner(UPKEEP_KEY) == peers.self_url(),
            None => true,
        }
    }

    /// One upkeep pass (see the module header). Failures are logged; the next pass retries.
    pub async fn shared_upkeep_pass(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let upkeep = &self.shared_upkeep;
        if let Err(e) = upkeep.last_use.flush(shared, &upkeep.replica_id).await {
            tracing::warn!(error = %e, "cannot record last uses in the shared storage; will retry");
        }
        if !self.owns_upkeep() {
            return;
        }
        let now = crate::store::now_secs();
        if let Some(max) = upkeep.max_size {
            let pins = self.store.current_pins();
            let evicted = match shared_lru::protected_keys(shared, &pins).await {
                Ok(protected) => {
                    shared_lru::evict(shared, max, &protected, upkeep.grace, now).await
                }
                Err(e) => Err(e),
            };
            match evicted {
                Ok(pass) if pass.evicted > 0 => {
                    self.telemetry.add_evictions(pass.evicted);
                    tracing::info!(
                        evicted = pass.evicted,
                        bytes_after = pass.total_after,
                        pinned_bytes = pass.protected_bytes,
                        "evicted least recently used content from the shared storage"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "shared storage eviction skipped; will retry");
                }
            }
        }
        let last = upkeep.uploads_cleaned_at.load(Ordering::Relaxed);
        if let Some(uploads) = &upkeep.uploads {
            if now.saturating_sub(last) >= STALE_UPLOAD_AGE.as_secs() {
                upkeep.uploads_cleaned_at.store(now, Ordering::Relaxed);
                match uploads.abort_stale_uploads(STALE_UPLOAD_AGE, now).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(aborted = n, "aborted abandoned multipart uploads"),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot clean up abandoned multipart uploads; will retry")
                    }
                }
            }
        }
    }

    /// A cached manifest: from the local store, else from the shared tier (then kept locally).
    pub async fn cached_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>, ProxyError> {
        if let Some(m) = self.store.read_manifest(digest)? {
            self.note_shared_use(&manifest_key(digest));
            return Ok(Some(m));
        }
        let Some(shared) = &self.shared else {
            return Ok(None);
        };
        let m = match shared.read_manifest(digest).await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            // A copy that does not verify is removed and treated as missing: fetched again.
            Err(e @ SharedStoreError::Corrupt { .. }) => {
                tracing::warn!(%digest, error = %e, "removing a corrupt manifest from the shared storage");
                let (shared, key) = (shared.clone(), manifest_key(digest));
                self.shared_writes.spawn(async move {
                    if let Err(e) = shared.delete(&key).await {
                        tracing::warn!(key, error = %e, "cannot remove a corrupt manifest from the shared storage");
                    }
                });
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        self.note_shared_use(&manifest_key(digest));
        let (store, d, kept) = (Arc::clone(&self.store), digest.clone(), m.clone());
        let written = tokio::task::spawn_blocking(move || {
            store.write_manifest(&d, &kept.media_type, &kept.bytes)
        })
        .await
        .map_err(|e| ProxyError::Internal(format!("manifest write task failed: {e}")))?;
        if let Err(e) = written {
            self.note_cache_write_failure("shared", "manifest", &e);
        }
        Ok(Some(m))
    }

    /// The newer of the local and the shared record of a tag. The shared one is read only when
    /// `local` is missing or `stale`, so fresh tags cost no request. With the shared tier
    /// unreachable, a local record is used as it is; without one the error is returned.
    pub async fn newest_tag(
        &self,
        registry: &str,
        repo: &RepositoryName,
        tag: &Tag,
        local: Option<TagRecord>,
        stale: bool,
    ) -> Result<Option<TagRecord>, ProxyError> {
        let Some(shared) = &self.shared else {
            return Ok(local);
        };
        if local.is_some() && !stale {
            return Ok(local);
        }
        let remote = match shared.read_tag(registry, repo, tag).await {
            Ok(remote) => remote,
            Err(e) if local.is_some() => {
                tracing::info!(registry, repository = %repo, %tag, error = %e, "shared tag record unreadable; using the local one");
                return Ok(local);
            }
            Err(e) => return Err(e.into()),
        };
        match (local, remote) {
            (Some(l), Some(r)) if r.checked_at > l.checked_at => {
                self.keep_tag_locally(registry, repo, tag, &r);
                Ok(Some(r))
            }
            (None, Some(r)) => {
                self.keep_tag_locally(registry, repo, tag, &r);
                Ok(Some(r))
            }
            (local, _) => Ok(local),
        }
    }

    fn keep_tag_locally(&self, registry: &str, repo: &RepositoryName, tag: &Tag, r: &TagRecord) {
        if let Err(e) = self.store.write_tag(registry, repo, tag, r) {
            self.note_cache_write_failure(registry, "tag", &e);
        }
        self.note_repository(registry, repo);
    }

    /// Publishes a tag record to the shared tier in the background.
    pub fn publish_tag(&self, registry: &str, repo: &RepositoryName, tag: &Tag, r: &TagRecord) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let (registry, repo, tag, record) =
            (registry.to_owned(), repo.clone(), tag.clone(), r.clone());
        let telemetry = Arc::clone(&self.telemetry);
        self.shared_writes.spawn(async move {
            if let Err(e) = shared.write_tag(&registry, &repo, &tag, &record).await {
                telemetry.add_cache_write_failure(&registry);
                tracing::warn!(%registry, repository = %repo, %tag, error = %e, "cannot publish a tag record to the shared storage");
            }
        });
    }

    /// Publishes a verified manifest to the shared tier in the background.
    pub fn publish_manifest(
        &self,
        registry: &str,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
    ) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let (registry, digest, media_type, bytes) = (
            registry.to_owned(),
            digest.clone(),
            media_type.to_owned(),
            bytes.to_vec(),
        );
        let telemetry = Arc::clone(&self.telemetry);
        self.shared_writes.spawn(async move {
            if let Err(e) = shared.write_manifest(&digest, &media_type, &bytes).await {
                telemetry.add_cache_write_failure(&registry);
                tracing::warn!(%registry, %digest, error = %e, "cannot publish a manifest to the shared storage");
            }
        });
    }

    /// Removes a blob from the shared tier in the background (its copy there did not verify).
    pub fn discard_shared_blob(&self, digest: &Digest) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let digest = digest.clone();
        tracing::warn!(%digest, "the shared storage holds a copy of this blob that does not match its digest; removing it");
        self.shared_writes.spawn(async move {
            let key = crate::store::shared::blob_key(&digest);
            if let Err(e) = shared.delete(&key).await {
                tracing::warn!(%digest, error = %e, "cannot remove a corrupt blob from the shared storage");
            }
        });
    }

    /// Uploads a blob committed to the local store to the shared tier in the background. The
    /// local copy is pinned against eviction until the upload ends.
    pub fn publish_blob(&self, registry: &str, digest: &Digest) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let opened = match self.store.open_blob(digest) {
            Ok(Some(found)) => found,
            Ok(None) => return,
            Err(e) => {
                self.note_cache_write_failure(registry, "blob", &e);
                return;
            }
        };
        let (file, size, pin) = opened;
        drop(file);
        let path = self.store.blob_file(digest);
        let (registry, digest) = (registry.to_owned(), digest.clone());
        let telemetry = Arc::clone(&self.telemetry);
        self.shared_writes.spawn(async move {
            let started = std::time::Instant::now();
            match shared.put_blob_file(&digest, &path, size).await {
                Ok(()) => {
                    tracing::debug!(%registry, %digest, bytes = size, ms = started.elapsed().as_millis() as u64, "blob published to the shared storage");
                }
                Err(e) => {
                    telemetry.add_cache_write_failure(&registry);
                    tracing::warn!(%registry, %digest, error = %e, "cannot publish a blob to the shared storage");
                }
            }
            drop(pin);
        });
    }
}
