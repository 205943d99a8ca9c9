//! Purge: drops a tag, or a manifest and the blobs no other cached manifest uses, from the disk
//! store and (when configured) the shared tier, so the next pull fetches them again.
//!
//! A tag purge removes the tag record only: the next pull by tag asks the upstream (one GET)
//! and finds the manifest and blobs still cached when the tag did not move. A digest purge
//! removes the manifest (an index or list: also its cached child manifests no other cached
//! index names) and every blob none of the remaining cached manifests references; what is kept
//! is computed by [`plan`], a pure function of the cached manifests.
//!
//! Pinned content is never purged: a pinned tag, or a manifest the pins protect, is refused
//! (unpin it first), since the pin's promise is that the image stays servable without the
//! upstream. Blobs a pinned manifest uses are kept as any shared blob is.
//!
//! Content being served while it is purged is served to the end (the readers hold the open
//! file); a fetch in flight for it commits after the purge, which is the same as a pull coming
//! right after it.

use std::collections::{BTreeSet, HashMap};

use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::ProxyInner;
use crate::oci::{Digest, ErrorCode, ImageRef, OciError, Reference, RepositoryName, Tag};
use crate::store::pinning::{self, ManifestBytes, Protected};
use crate::store::shared::{blob_key, manifest_key, tag_key, SharedStoreError};
use crate::store::StoreError;

/// Why a purge did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("{0} is not cached here")]
    NotCached(String),
    #[error("registry `{0}` is not mirrored here")]
    NotMirrored(String),
    #[error("{0} is pinned (configured pins or the pin file); unpin it before purging")]
    Pinned(String),
    #[error("cache storage failed: {0}")]
    Store(#[from] StoreError),
    #[error("shared storage unavailable: {0}")]
    Shared(#[from] SharedStoreError),
}

impl PurgeError {
    /// The OCI error an admin client gets.
    pub fn to_oci(&self) -> OciError {
        let (status, code) = match self {
            PurgeError::NotCached(_) => (StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown),
            PurgeError::NotMirrored(_) => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
            PurgeError::Pinned(_) => (StatusCode::CONFLICT, ErrorCode::Denied),
            PurgeError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown),
            PurgeError::Shared(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StorageUnavailable,
            ),
        };
        OciError::new(status, code, self.to_string())
    }
}

/// What a purge removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PurgeReport {
    /// The reference as resolved (`docker.io/library/nginx:stable`).
    pub reference: String,
    /// Tag records removed (`repository:tag`).
    pub tags: Vec<String>,
    /// Manifests removed, by digest.
    pub manifests: Vec<String>,
    /// Blobs removed.
    pub blobs: u64,
    /// Blobs of the purged manifests kept because another cached manifest (or a pin) uses them.
    pub blobs_kept: u64,
    /// Bytes removed from the disk store.
    pub bytes_freed: u64,
    /// With `cluster` replicas: every replica's part, this one first (see
    /// `api::purge_fanout`); the counts above are then over all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaPurge>,
    /// The purge's place in this mirror's purge log (`<epoch>:<seq>`): spokes drop it on their
    /// next request to this mirror (see `purge_log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purge_log_position: Option<String>,
}

impl PurgeReport {
    /// Whether a replica failed or could not be reached: the purge did not reach every one.
    #[must_use]
    pub fn incomplete(&self) -> bool {
        self.replicas.iter().any(|r| {
            matches!(
                r.outcome,
                ReplicaOutcome::Failed | ReplicaOutcome::Unreachable
            )
        })
    }
}

/// One replica's part in a purge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReplicaOutcome {
    /// It removed what it had.
    Purged,
    /// It had nothing of it.
    NotCached,
    /// It answered with an error.
    Failed,
    /// It could not be reached (or did not answer in time).
    Unreachable,
}

/// One replica's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaPurge {
    /// The replica's base URL (`cluster.self` / `cluster.peers`).
    pub replica: String,
    pub outcome: ReplicaOutcome,
    /// Blobs it removed.
    #[serde(default)]
    pub blobs: u64,
    /// Bytes it freed on its disk.
    #[serde(default)]
    pub bytes_freed: u64,
    /// Why it failed or could not be reached.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// What a digest purge removes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub manifests: BTreeSet<Digest>,
    pub blobs: BTreeSet<Digest>,
    /// Blobs of the purged manifests that stay (used elsewhere or pinned).
    pub blobs_kept: BTreeSet<Digest>,
}

/// What purging `target` removes when `cached` are all the cached manifests: `target` and the
/// cached children it names, minus whatever the other cached manifests still reach or `pinned`
/// protects. Pure.
pub fn plan(
    target: &Digest,
    cached: &BTreeSet<Digest>,
    read: impl Fn(&Digest) -> Option<ManifestBytes>,
    pinned: &Protected,
) -> Plan {
    let purged = pinning::protected_content([target.clone()], &read);
    let others = cached
        .iter()
        .filter(|d| !purged.manifests.contains(*d))
        .cloned();
    let kept = pinning::protected_content(others, &read);
    let manifests = purged
        .manifests
        .iter()
        .filter(|d| !kept.manifests.contains(*d) && !pinned.manifests.contains(*d))
        .cloned()
        .collect();
    let (blobs, blobs_kept) = purged
        .blobs
        .iter()
        .cloned()
        .partition(|d| !kept.blobs.contains(d) && !pinned.blobs.contains(d));
    Plan {
        manifests,
        blobs,
        blobs_kept,
    }
}

impl ProxyInner {
    /// Purges `image` (see the module header).
    pub async fn purge(&self, image: &ImageRef) -> Result<PurgeReport, PurgeError> {
        let registry = image.registry.as_str();
        let upstream = self
            .upstreams
            .get(registry)
            .ok_or_else(|| PurgeError::NotMirrored(registry.to_owned()))?;
        let repo = image.repository.normalised_for(upstream.name());
        let report = match &image.reference {
            Reference::Tag(tag) => self.purge_tag(image, &repo, tag).await?,
            Reference::Digest(digest) => self.purge_digest(image, digest).await?,
        };
        self.telemetry
            .set_cache_size(self.store.index().total_size());
        tracing::info!(
            reference = %report.reference,
            tags = report.tags.len(),
            manifests = report.manifests.len(),
            blobs = report.blobs,
            bytes_freed = report.bytes_freed,
            "purged"
        );
        Ok(report)
    }

    async fn purge_tag(
        &self,
        image: &ImageRef,
        repo: &RepositoryName,
        tag: &Tag,
    ) -> Result<PurgeReport, PurgeError> {
        let registry = image.registry.as_str();
        if self
            .store
            .current_pins()
            .is_pinned(registry, repo.as_str(), tag.as_str())
        {
            return Err(PurgeError::Pinned(image.to_string()));
        }
        let mut found = self.store.remove_tag(registry, repo, tag)?;
        if let Some(shared) = &self.shared {
            if shared.read_tag(registry, repo, tag).await?.is_some() {
                shared.delete(&tag_key(registry, repo, tag)).await?;
                found = true;
            }
        }
        if !found {
            return Err(PurgeError::NotCached(image.to_string()));
        }
        Ok(PurgeReport {
            reference: image.to_string(),
            tags: vec![format!("{repo}:{tag}")],
            ..PurgeReport::default()
        })
    }

    async fn purge_digest(
        &self,
        image: &ImageRef,
        digest: &Digest,
    ) -> Result<PurgeReport, PurgeError> {
        let mut manifests: HashMap<Digest, ManifestBytes> = HashMap::new();
        for d in self.store.manifest_digests() {
            if let Some(m) = self.store.manifest_untouched(&d) {
                manifests.insert(d, m);
            }
        }
        if let Some(shared) = &self.shared {
            for object in shared.list("manifests/").await? {
                let Some(d) = object
                    .key
                    .strip_prefix("manifests/")
                    .and_then(|k| k.replacen('/', ":", 1).parse::<Digest>().ok())
                else {
                    continue;
                };
                if manifests.contains_key(&d) {
                    continue;
                }
                if let Ok(Some(m)) = shared.read_manifest(&d).await {
                    manifests.insert(
                        d,
                        ManifestBytes {
                            media_type: m.media_type,
                            bytes: m.bytes.to_vec(),
                        },
                    );
                }
            }
        }
        if !manifests.contains_key(digest) {
            return Err(PurgeError::NotCached(image.to_string()));
        }
        let pinned = self.store.pinned_content();
        if pinned.manifests.contains(digest) {
            return Err(PurgeError::Pinned(image.to_string()));
        }
        let cached: BTreeSet<Digest> = manifests.keys().cloned().collect();
        let plan = plan(digest, &cached, |d| manifests.get(d).cloned(), &pinned);
        let mut report = PurgeReport {
            reference: image.to_string(),
            blobs_kept: plan.blobs_kept.len() as u64,
            ..PurgeReport::default()
        };
        for d in &plan.blobs {
            if let Some(size) = self.store.remove_blob(d)? {
                report.bytes_freed += size;
            }
            if let Some(shared) = &self.shared {
                shared.delete(&blob_key(d)).await?;
            }
            report.blobs += 1;
        }
        // Manifests last: a purge cut short leaves manifests whose blobs are fetched again,
        // never blobs no manifest names.
        for d in &plan.manifests {
            if let Some(size) = self.store.remove_manifest(d)? {
                report.bytes_freed += size;
            }
            if let Some(shared) = &self.shared {
                shared.delete(&manifest_key(d)).await?;
            }
            report.manifests.push(d.to_string());
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::oci::media;

    fn digest(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    fn image(config: u8, layers: &[u8]) -> ManifestBytes {
        let layers: Vec<_> = layers
            .iter()
            .map(|l| serde_json::json!({"digest": digest(*l).to_string()}))
            .collect();
        ManifestBytes {
            media_type: media::OCI_MANIFEST.into(),
            bytes: serde_json::to_vec(&serde_json::json!({
                "config": {"digest": digest(config).to_string()},
                "layers": layers,
            }))
            .unwrap(),
        }
    }

    fn index(children: &[&Digest]) -> ManifestBytes {
        let manifests: Vec<_> = children
            .iter()
            .map(|d| serde_json::json!({"digest": d.to_string()}))
            .collect();
        ManifestBytes {
            media_type: media::OCI_INDEX.into(),
            bytes: serde_json::to_vec(&serde_json::json!({ "manifests": manifests })).unwrap(),
        }
    }

    #[test]
    fn a_manifest_goes_with_its_own_blobs_and_shared_ones_stay() {
        let (a, b) = (digest(100), digest(101));
        let store: HashMap<Digest, ManifestBytes> =
            [(a.clone(), image(1, &[2, 3])), (b.clone(), image(4, &[3]))].into();
        let cached = store.keys().cloned().collect();
        let p = plan(
            &a,
            &cached,
            |d| store.get(d).cloned(),
            &Protected::default(),
        );
        assert_eq!(p.manifests, [a].into());
        assert_eq!(p.blobs, [digest(1), digest(2)].into());
        assert_eq!(p.blobs_kept, [digest(3)].into());
    }

    #[test]
    fn an_index_takes_its_children_unless_another_index_names_them_or_a_pin_protects_them() {
        let (amd, arm, idx, other) = (digest(100), digest(101), digest(102), digest(103));
        let store: HashMap<Digest, ManifestBytes> = [
            (amd.clone(), image(1, &[2])),
            (arm.clone(), image(3, &[4])),
            (idx.clone(), index(&[&amd, &arm])),
            (other.clone(), index(&[&arm])),
        ]
        .into();
        let cached = store.keys().cloned().collect();
        let p = plan(
            &idx,
            &cached,
            |d| store.get(d).cloned(),
            &Protected::default(),
        );
        assert_eq!(p.manifests, [idx.clone(), amd.clone()].into());
        assert_eq!(p.blobs, [digest(1), digest(2)].into());

        let pinned = Protected {
            manifests: [amd.clone()].into(),
            blobs: [digest(1), digest(2)].into(),
        };
        let p = plan(&idx, &cached, |d| store.get(d).cloned(), &pinned);
        assert_eq!(p.manifests, [idx].into());
        assert!(p.blobs.is_empty());
        let all: BTreeSet<Digest> = (1..=4).map(digest).collect();
        assert_eq!(p.blobs_kept, all, "pinned, or used by the other index");
    }
}
