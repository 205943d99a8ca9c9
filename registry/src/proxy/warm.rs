//! Warming: pre-fetches an image into the cache through the same paths a pull takes (the tag's
//! freshness rule, single-flight, verification, the shared tier and peer routing), so a later
//! pull is all hits.
//!
//! One item is one image reference: its manifest; for an index or manifest list every child
//! manifest, or only those of one platform; and the config and layers of each image manifest,
//! one blob at a time (warming is background work and should not crowd out pulls).
//!
//! Warming is the lowest priority user of the upstream budget: before any request that could
//! cost a counted manifest GET (a manifest not cached), it checks the last budget figure and
//! refuses the item while the remaining pulls are at or below the registry's `budgetReserve`
//! (or at zero), so only pulls ever spend the reserve. Blob requests are not counted by Docker
//! Hub and are not checked. A figure that expired is unknown, not low.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::blobs::{self, Source};
use super::{Proxy, ProxyError};
use crate::oci::{media, Digest, ImageRef, Reference, RepositoryName};
use crate::upstream::Upstream;

/// How often a blob fetch in progress reports its bytes.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// A platform as `--platform` names it: `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

/// Why a platform was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("platform `{0}` is not os/architecture[/variant] (linux/amd64, linux/arm64/v8)")]
pub struct ParsePlatformError(String);

impl std::str::FromStr for Platform {
    type Err = ParsePlatformError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParsePlatformError(s.chars().take(64).collect());
        let parts: Vec<&str> = s.trim().split('/').collect();
        let valid = |p: &&str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(valid) {
            return Err(bad());
        }
        Ok(Platform {
            os: parts[0].to_owned(),
            architecture: parts[1].to_owned(),
            variant: parts.get(2).map(|v| (*v).to_owned()),
        })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Why an item was not warmed.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("registry `{0}` is not mirrored here")]
    NotMirrored(String),
    #[error("upstream {registry} budget at its reserve ({remaining} pulls left, reserve {reserve}); warming never spends the reserve")]
    BudgetReserve {
        registry: String,
        remaining: u64,
        reserve: u64,
    },
    #[error("no manifest for platform {wanted} in the index (it has: {available})")]
    NoPlatform { wanted: String, available: String },
    #[error("manifest {digest} cannot be read: {message}")]
    BadManifest { digest: Digest, message: String },
    #[error("blob {0} was fetched and verified but the cache could not keep it")]
    NotKept(Digest),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("cache storage failed: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// What warming one item did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Warmed {
    pub manifests: u64,
    pub blobs: u64,
    /// Bytes of every manifest and blob of the item.
    pub bytes: u64,
    /// Of those, the blob bytes that were not cached before (fetched now or joined in flight).
    pub fetched_bytes: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ManifestDoc {
    manifests: Vec<Descriptor>,
    config: Option<Descriptor>,
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<PlatformDoc>,
}

#[derive(Debug, Clone, Deserialize)]
struct PlatformDoc {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl PlatformDoc {
    fn text(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// Whether an index entry's platform is the wanted one; a wanted platform without a variant
/// takes any variant. Pure.
fn platform_matches(wanted: &Platform, entry: Option<&PlatformDoc>) -> bool {
    entry.is_some_and(|p| {
        p.os == wanted.os
            && p.architecture == wanted.architecture
            && (wanted.variant.is_none() || wanted.variant == p.variant)
    })
}

/// The child manifests of an index to warm: all of them, or those of `platform`. Pure.
fn select_children(
    doc: &ManifestDoc,
    platform: Option<&Platform>,
) -> Result<Vec<String>, WarmError> {
    let Some(wanted) = platform else {
        return Ok(doc.manifests.iter().map(|d| d.digest.clone()).collect());
    };
    let chosen: Vec<String> = doc
        .manifests
        .iter()
        .filter(|d| platform_matches(wanted, d.platform.as_ref()))
        .map(|d| d.digest.clone())
        .collect();
    if chosen.is_empty() {
        let available: Vec<String> = doc
            .manifests
            .iter()
            .filter_map(|d| d.platform.as_ref().map(PlatformDoc::text))
            .collect();
        return Err(WarmError::NoPlatform {
            wanted: wanted.to_string(),
            available: available.join(", "),
        });
    }
    Ok(chosen)
}

fn parse_doc(digest: &Digest, bytes: &[u8]) -> Result<ManifestDoc, WarmError> {
    serde_json::from_slice(bytes).map_err(|e| WarmError::BadManifest {
        digest: digest.clone(),
        message: e.to_string(),
    })
}

fn parse_digest(text: &str, parent: &Digest) -> Result<Digest, WarmError> {
    text.parse().map_err(|e| WarmError::BadManifest {
        digest: parent.clone(),
        message: format!("descriptor digest `{text}`: {e}"),
    })
}

fn is_index(media_type: &str) -> bool {
    matches!(media_type, media::OCI_INDEX | media::DOCKER_MANIFEST_LIST)
}

impl Proxy {
    /// Refuses a request that could spend a counted GET while the budget is at its reserve.
    fn warm_budget_check(&self, upstream: &Upstream) -> Result<(), WarmError> {
        let reserve = self
            .inner
            .reserves
            .get(upstream.name())
            .copied()
            .unwrap_or(0);
        match upstream.budget() {
            Some(b) if b.remaining <= reserve => Err(WarmError::BudgetReserve {
                registry: upstream.name().to_owned(),
                remaining: b.remaining,
                reserve,
            }),
            _ => Ok(()),
        }
    }

    /// Warms one image (see the module header); `progress` is called with the item's bytes so
    /// far as they grow.
    pub async fn warm(
        &self,
        image: &ImageRef,
        platform: Option<&Platform>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Warmed, WarmError> {
        let upstream = self
            .upstream(&image.registry)
            .ok_or_else(|| WarmError::NotMirrored(image.registry.clone()))?;
        let upstream = Arc::clone(upstream);
        let repo = image.repository.normalised_for(upstream.name());
        let mut warmed = Warmed::default();

        let top = match &image.reference {
            Reference::Tag(tag) => {
                let store = &self.inner.store;
                let cached = match store.read_tag(upstream.name(), &repo, tag)? {
                    Some(record) => store.read_manifest(&record.digest)?.is_some(),
                    None => false,
                };
                if !cached {
                    self.warm_budget_check(&upstream)?;
                }
                let key = format!("{}/{repo}:{tag}", upstream.name());
                let routed = self.route(&upstream, &key, false);
                self.manifest_by_tag(&routed, &repo, tag, false).await?
            }
            Reference::Digest(digest) => self.warm_manifest(&upstream, &repo, digest).await?,
        };
        let top_bytes = top.body.clone().unwrap_or_default();
        warmed.manifests += 1;
        warmed.bytes += top_bytes.len() as u64;
        progress(warmed.bytes);

        let mut images = Vec::new();
        if is_index(&top.media_type) {
            let doc = parse_doc(&top.digest, &top_bytes)?;
            for child in select_children(&doc, platform)? {
                let child = parse_digest(&child, &top.digest)?;
                let reply = self.warm_manifest(&upstream, &repo, &child).await?;
                warmed.manifests += 1;
                warmed.bytes += reply.size;
                progress(warmed.bytes);
                images.push((child, reply.body.unwrap_or_default()));
            }
        } else {
            images.push((top.digest.clone(), top_bytes));
        }

        let mut blobs: Vec<(Digest, u64)> = Vec::new();
        let mut seen = BTreeSet::new();
        for (digest, bytes) in &images {
            let doc = parse_doc(digest, bytes)?;
            for d in doc.config.iter().chain(&doc.layers) {
                let blob = parse_digest(&d.digest, digest)?;
                if seen.insert(blob.clone()) {
                    blobs.push((blob, d.size));
                }
            }
        }
        for (digest, _) in blobs {
            let done = warmed.bytes;
            let (size, fetched) = self
                .warm_blob(&upstream, &repo, &digest, &|n| progress(done + n))
                .await?;
            warmed.blobs += 1;
            warmed.bytes += size;
            if fetched {
                warmed.fetched_bytes += size;
            }
            progress(warmed.bytes);
        }
        Ok(warmed)
    }

    async fn warm_manifest(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<super::ManifestReply, WarmError> {
        if self.inner.store.read_manifest(digest)?.is_none() {
            self.warm_budget_check(upstream)?;
        }
        let routed = self.route(upstream, &digest.to_string(), false);
        Ok(self
            .manifest_by_digest(&routed, repo, digest, false)
            .await?)
    }

    /// Caches one blob; its size and whether it was not cached before.
    async fn warm_blob(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepositoryName,
        digest: &Digest,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(u64, bool), WarmError> {
        if let Some(e) = self.blob_not_found(upstream.name(), repo, digest) {
            return Err(e.into());
        }
        let routed = self.route(upstream, &digest.to_string(), false);
        let flight = match blobs::open_or_fetch(&self.inner, &routed, repo, digest)? {
            Source::Cached(_, size, _) => return Ok((size, false)),
            // The tee is dropped: the flight then writes to the file only.
            Source::InFlight { flight, .. } => flight,
        };
        let result = loop {
            tokio::select! {
                result = flight.done() => break result,
                () = tokio::time::sleep(PROGRESS_EVERY) => progress(flight.written()),
            }
        };
        if let Err(e) = result {
            self.note_blob_failure(upstream.name(), repo, digest, &e);
            return Err(e.into());
        }
        if let Some(size) = self.inner.store.blob_size(digest) {
            return Ok((size, true));
        }
        if let Some(shared) = &self.inner.shared {
            if let Ok(Some(size)) = shared.blob_size(digest).await {
                return Ok((size, true));
            }
        }
        Err(WarmError::NotKept(digest.clone()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn platforms_parse_as_os_arch_and_optional_variant() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!("linux/amd64".parse::<Platform>().unwrap().variant, None);
        for bad in ["linux", "", "linux//amd64", "a/b/c/d", "linux/amd 64"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad:?}");
        }
    }

    fn index() -> ManifestDoc {
        serde_json::from_value(serde_json::json!({
            "manifests": [
                {"digest": "sha256:a", "platform": {"os": "linux", "architecture": "amd64"}},
                {"digest": "sha256:b", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"digest": "sha256:c", "platform": {"os": "unknown", "architecture": "unknown"}},
            ]
        }))
        .unwrap()
    }

    #[test]
    fn an_index_warms_every_child_or_only_the_chosen_platform() {
        let doc = index();
        assert_eq!(select_children(&doc, None).unwrap().len(), 3);
        let arm: Platform = "linux/arm64".parse().unwrap();
        assert_eq!(select_children(&doc, Some(&arm)).unwrap(), vec!["sha256:b"]);
        let arm_v8: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(
            select_children(&doc, Some(&arm_v8)).unwrap(),
            vec!["sha256:b"]
        );
        let arm_v7: Platform = "linux/arm64/v7".parse().unwrap();
        let e = select_children(&doc, Some(&arm_v7)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no manifest for platform linux/arm64/v7 in the index (it has: linux/amd64, linux/arm64/v8, unknown/unknown)"
        );
    }
}
