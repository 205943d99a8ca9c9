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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{ProxyError, ProxyInner};
use crate::oci::{Digest, RepositoryName, Tag};
use crate::store::shared::{manifest_key, SharedStoreError};
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

impl ProxyInner {
    /// A cached manifest: from the local store, else from the shared tier (then kept locally).
    pub async fn cached_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>, ProxyError> {
        if let Some(m) = self.store.read_manifest(digest)? {
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
