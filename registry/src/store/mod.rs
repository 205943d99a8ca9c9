//! The content-addressed disk cache.
//!
//! Layout under the storage root:
//! - `blobs/<alg>/<hex>`: layer and config blobs, named by their verified digest;
//! - `manifests/<alg>/<hex>` and `manifests/<alg>/<hex>.type`: manifest bytes and media type;
//! - `repositories/<registry>/<name>/_tags/<tag>.json`: what a tag pointed at, and when checked;
//! - `tmp/`: files being written; emptied at startup;
//! - `purge-log.json` (this mirror's purge log, see `purge_log`) and `parent-purges.json` (what a
//!   spoke applied of its parent's, see `purge_sync`).
//!
//! Invariants: a file appears under `blobs/` or `manifests/` only by `rename` from `tmp/` after its
//! bytes were verified against the digest and fsynced, so a crash at any point leaves either the
//! whole verified file or nothing. Digests, registry names and repository names are validated types
//! before they become path components, so no request can address a path outside the root.
//!
//! Crash recovery happens in [`Store::open`], before anything is served: `tmp/` is emptied (what
//! a killed process was writing), and a manifest whose `.type` companion is missing, or a `.type`
//! whose manifest is missing (a crash between the two renames of a write or the two removals of
//! an eviction), is removed; neither half is servable alone. So the store after a crash holds
//! exactly complete, verified content and nothing else.
//!
//! Last use (the LRU order) is kept in memory and written in batches as the content files'
//! modification times ([`Store::flush_last_use`], see `index`).
//!
//! Eviction (with a size bound) removes least recently used content, never content being served
//! ([`Pin`]) and never what configured pins or the pin file reach ([`PinRules`]). The pinned set
//! is recomputed at the start of every pass that has work to do, from the pin file (re-read, see
//! `pin_file`), the tag records and the manifests on disk: one walk of `repositories/<registry>/`
//! per registry with pins, one small read per tag file of a matching repository and one read per
//! reachable cached manifest. Nothing but the pin file's last good set is kept in memory between
//! passes, so a pinned tag that moves protects its new content from the next pass on.

pub mod cached_read;
mod index;
pub mod pin_file;
pub mod pinning;
pub mod s3_uploads;
pub mod shared;
pub mod shared_lru;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};
use crate::oci::{Digest, RepositoryName, Tag};
pub use index::{EvictionPass, Index, LastUseFlush, Pin};
pub use pin_file::PinFile;
pub use pinning::{PinPattern, PinRules};

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create storage directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot commit {path}: {source}")]
    Commit {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt tag record {path}: {source}")]
    CorruptTag {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot remove {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot compile the pins: {0}")]
    Pins(#[source] ConfigError),
}

/// What a cached tag pointed at, and when that was last confirmed upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// Unix seconds of the last upstream confirmation.
    pub checked_at: u64,
}

/// A manifest read from the cache.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    pub bytes: bytes::Bytes,
    pub media_type: String,
}

/// A file being written into `tmp/`; removed on drop unless committed.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    file: Arc<std::fs::File>,
    committed: bool,
}

impl TempFile {
    /// The open file, readable at any offset while it is still being written.
    pub fn file(&self) -> &Arc<std::fs::File> {
        &self.file
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The disk cache.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    index: Index,
    pins: PinRules,
    /// Pins re-read at every eviction pass (`pinFile`).
    pin_file: Option<PinFile>,
    /// Bytes the pins protected at the last eviction pass.
    pinned_bytes: AtomicU64,
}

/// What [`Store::open`] cleaned up after the previous process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Files left in `tmp/` (fetches and writes the previous process did not finish).
    pub temp_files: u64,
    /// Halves of manifest pairs (a manifest without its `.type`, or the reverse).
    pub incomplete_manifests: u64,
}

/// Empties `tmp/` and removes incomplete manifest pairs (see the module header).
fn recover(root: &Path) -> Recovery {
    let mut recovery = Recovery::default();
    if let Ok(entries) = std::fs::read_dir(root.join("tmp")) {
        for entry in entries.flatten() {
            if std::fs::remove_file(entry.path()).is_ok() {
                recovery.temp_files += 1;
            }
        }
    }
    let Ok(algorithms) = std::fs::read_dir(root.join("manifests")) else {
        return recovery;
    };
    for algorithm in algorithms.flatten() {
        let Ok(entries) = std::fs::read_dir(algorithm.path()) else {
            continue;
        };
        let names: HashSet<std::ffi::OsString> = entries.flatten().map(|e| e.file_name()).collect();
        for name in &names {
            let text = name.to_string_lossy();
            let companion = match text.strip_suffix(".type") {
                Some(manifest) => manifest.to_owned(),
                None => format!("{text}.type"),
            };
            if !names.contains(std::ffi::OsStr::new(&companion))
                && std::fs::remove_file(algorithm.path().join(name)).is_ok()
            {
                recovery.incomplete_manifests += 1;
            }
        }
    }
    recovery
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn create_dir(path: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(path).map_err(|source| StoreError::CreateDir {
        path: path.to_owned(),
        source,
    })
}

/// Removes `path`; false when it was not there.
fn remove_file_if_present(path: &Path) -> Result<bool, StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(StoreError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `bytes` to `path` through a temporary sibling and a rename; fsyncs when `durable`.
fn write_atomically(
    tmp_dir: &Path,
    path: &Path,
    bytes: &[u8],
    durable: bool,
) -> Result<(), StoreError> {
    let write_err = |source| StoreError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp = tempfile::NamedTempFile::new_in(tmp_dir).map_err(write_err)?;
    tmp.write_all(bytes).map_err(write_err)?;
    if durable {
        tmp.as_file().sync_all().map_err(write_err)?;
    }
    tmp.persist(path).map_err(|e| StoreError::Commit {
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store at `root`, recovers from a crash of the previous
    /// process (see the module header) and indexes what is cached.
    pub fn open(root: &Path, max_size: Option<u64>) -> Result<Store, StoreError> {
        for dir in ["blobs", "manifests", "repositories", "tmp"] {
            create_dir(&root.join(dir))?;
        }
        let recovery = recover(root);
        if recovery != Recovery::default() {
            tracing::info!(
                temp_files = recovery.temp_files,
                incomplete_manifests = recovery.incomplete_manifests,
                "removed what an interrupted previous run left unfinished"
            );
        }
        let index = Index::scan(root, max_size);
        Ok(Store {
            root: root.to_owned(),
            index,
            pins: PinRules::default(),
            pin_file: None,
            pinned_bytes: AtomicU64::new(0),
        })
    }

    /// Opens the store a validated config describes: its path, size bound, pins and pin file.
    pub fn from_config(config: &Config) -> Result<Store, StoreError> {
        let pins = PinRules::from_config(config).map_err(StoreError::Pins)?;
        // With a shared tier, the disk is its bounded read cache and `maxSizeBytes` bounds the
        // bucket prefix instead.
        let local_bound = match &config.storage.s3 {
            Some(s3) => Some(s3.local_cache_max_size_bytes.unwrap_or_else(|| {
                config
                    .storage
                    .max_size_bytes
                    .unwrap_or(u64::MAX)
                    .min(crate::config::DEFAULT_LOCAL_CACHE_MAX_SIZE)
            })),
            None => config.storage.max_size_bytes,
        };
        let mut store = Store::open(&config.storage.path, local_bound)?;
        store.pins = pins;
        store.pin_file = config.pin_file.clone().map(PinFile::new);
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// Where the committed blob `digest` lives (it may not be there).
    pub fn blob_file(&self, digest: &Digest) -> PathBuf {
        self.blob_path(digest)
    }

    fn manifest_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("manifests")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    fn repository_dir(&self, registry: &str, name: &RepositoryName) -> PathBuf {
        let mut dir = self.root.join("repositories").join(registry);
        for component in name.components() {
            dir.push(component);
        }
        dir
    }

    fn tag_path(&self, registry: &str, name: &RepositoryName, tag: &Tag) -> PathBuf {
        self.repository_dir(registry, name)
            .join("_tags")
            .join(format!("{}.json", tag.as_str()))
    }

    /// Opens a cached blob for reading, pinning it against eviction while the pin lives.
    pub fn open_blob(
        &self,
        digest: &Digest,
    ) -> Result<Option<(std::fs::File, u64, Pin)>, StoreError> {
        let path = self.blob_path(digest);
        match std::fs::File::open(&path) {
            Ok(file) => {
                let size = file
                    .metadata()
                    .map_err(|source| StoreError::Read {
                        path: path.clone(),
                        source,
                    })?
                    .len();
                let pin = self.index.touch_and_pin(&path, size);
                Ok(Some((file, size, pin)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Read { path, source }),
        }
    }

    /// Writes the last uses noted since the previous flush to disk (see `index`).
    pub fn flush_last_use(&self) -> LastUseFlush {
        self.index.flush_last_use()
    }

    /// The size of a cached blob, if cached.
    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        std::fs::metadata(self.blob_path(digest))
            .ok()
            .map(|m| m.len())
    }

    /// Starts writing a new file in `tmp/`.
    pub fn create_temp(&self) -> Result<TempFile, StoreError> {
        let tmp = self.root.join("tmp");
        let named = tempfile::Builder::new()
            .prefix("fetch-")
            .tempfile_in(&tmp)
            .map_err(|source| StoreError::Write {
                path: tmp.clone(),
                source,
            })?;
        let (file, path) = named.keep().map_err(|e| StoreError::Write {
            path: tmp,
            source: e.error,
        })?;
        Ok(TempFile {
            path,
            file: Arc::new(file),
            committed: false,
        })
    }

    /// Makes a verified temp file the cached blob `digest`: fsync, then rename into place.
    pub fn commit_blob(
        &self,
        mut temp: TempFile,
        digest: &Digest,
        size: u64,
    ) -> Result<(), StoreError> {
        let dest = self.blob_path(digest);
        temp.file.sync_all().map_err(|source| StoreError::Commit {
            path: dest.clone(),
            source,
        })?;
        if let Some(parent) = dest.parent() {
            create_dir(parent)?;
        }
        std::fs::rename(&temp.path, &dest).map_err(|source| StoreError::Commit {
            path: dest.clone(),
            source,
        })?;
        temp.committed = true;
        self.index.insert(&dest, size);
        Ok(())
    }

    /// Reads a cached manifest.
    pub fn read_manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, StoreError> {
        let path = self.manifest_path(digest);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let type_path = path.with_extension("type");
        let media_type = match std::fs::read_to_string(&type_path) {
            Ok(t) => t,
            // The type file is written before the manifest, so a missing one means the pair is
            // incomplete (a crash between the two renames): treat it as not cached.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Read {
                    path: type_path,
                    source,
                })
            }
        };
        self.index.touch_and_pin(&path, bytes.len() as u64);
        Ok(Some(StoredManifest {
            bytes: bytes.into(),
            media_type,
        }))
    }

    /// Stores verified manifest bytes under their digest.
    pub fn write_manifest(
        &self,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let path = self.manifest_path(digest);
        if let Some(parent) = path.parent() {
            create_dir(parent)?;
        }
        let tmp = self.root.join("tmp");
        write_atomically(
            &tmp,
            &path.with_extension("type"),
            media_type.as_bytes(),
            true,
        )?;
        write_atomically(&tmp, &path, bytes, true)?;
        self.index.insert(&path, bytes.len() as u64);
        Ok(())
    }

    /// Reads what a tag pointed at.
    pub fn read_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
    ) -> Result<Option<TagRecord>, StoreError> {
        let path = self.tag_path(registry, name, tag);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::CorruptTag { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Read { path, source }),
        }
    }

    /// Records what a tag points at. Not fsynced: losing a tag update after a crash only means
    /// one more revalidation.
    pub fn write_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
        record: &TagRecord,
    ) -> Result<(), StoreError> {
        let path = self.tag_path(registry, name, tag);
        if let Some(parent) = path.parent() {
            create_dir(parent)?;
        }
        let bytes = serde_json::to_vec(record).map_err(|source| StoreError::CorruptTag {
            path: path.clone(),
            source,
        })?;
        write_atomically(&self.root.join("tmp"), &path, &bytes, false)
    }

    /// Notes that a repository of `registry` has content here, for the catalog.
    pub fn note_repository(&self, registry: &str, name: &RepositoryName) -> Result<(), StoreError> {
        create_dir(&self.repository_dir(registry, name).join("_tags"))
    }

    /// The repositories of `registry` this cache holds, sorted.
    pub fn repositories(&self, registry: &str) -> Vec<String> {
        let base = self.root.join("repositories").join(registry);
        let mut found = Vec::new();
        // Repository names have at most 255 characters, so the walk depth is bounded too.
        let mut stack = vec![(base.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            if depth > 128 {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if !path.is_dir() {
                    continue;
                }
                if entry.file_name() == "_tags" {
                    if let Ok(rel) = dir.strip_prefix(&base) {
                        found.push(rel.to_string_lossy().into_owned());
                    }
                } else {
                    stack.push((path, depth + 1));
                }
            }
        }
        found.sort();
        found
    }

    /// The digests pinned tags point at: every cached tag of a registry with pins whose
    /// repository and tag match a pattern. Unreadable or corrupt tag records are skipped (they
    /// pin nothing, as an uncached tag would not).
    fn pinned_roots(&self, pins: &PinRules) -> Vec<Digest> {
        let mut roots: Vec<Digest> = pins.digests().cloned().collect();
        for registry in pins.registries() {
            for repository in self.repositories(registry) {
                if !pins.covers_repository(registry, &repository) {
                    continue;
                }
                let Ok(name) = repository.parse::<RepositoryName>() else {
                    continue;
                };
                let tags_dir = self.repository_dir(registry, &name).join("_tags");
                let Ok(entries) = std::fs::read_dir(&tags_dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let file_name = entry.file_name();
                    let Some(tag) = file_name.to_str().and_then(|f| f.strip_suffix(".json")) else {
                        continue;
                    };
                    if !pins.is_pinned(registry, &repository, tag) {
                        continue;
                    }
                    let record = std::fs::read(entry.path())
                        .ok()
                        .and_then(|b| serde_json::from_slice::<TagRecord>(&b).ok());
                    if let Some(record) = record {
                        roots.push(record.digest);
                    }
                }
            }
        }
        roots
    }

    /// A cached manifest for the protected-set walk, read without touching its LRU position.
    fn manifest_for_walk(&self, digest: &Digest) -> Option<pinning::ManifestBytes> {
        let path = self.manifest_path(digest);
        let media_type = std::fs::read_to_string(path.with_extension("type")).ok()?;
        let bytes = std::fs::read(&path).ok()?;
        Some(pinning::ManifestBytes { media_type, bytes })
    }

    /// The files configured pins and the pin file protect right now.
    fn protected_paths(&self) -> HashSet<PathBuf> {
        let pins = self.current_pins();
        if pins.is_empty() {
            return HashSet::new();
        }
        let protected =
            pinning::protected_content(self.pinned_roots(&pins), |d| self.manifest_for_walk(d));
        let manifests = protected.manifests.iter().map(|d| self.manifest_path(d));
        let blobs = protected.blobs.iter().map(|d| self.blob_path(d));
        manifests.chain(blobs).collect()
    }

    /// Expires every cached tag record of `registry` (`checked_at` 0): each is revalidated on
    /// its next request, nothing is deleted. Unreadable records are left alone. Returns how many
    /// were expired. One read and one write per tag file.
    pub fn expire_tags(&self, registry: &str) -> u64 {
        let mut expired = 0;
        for repository in self.repositories(registry) {
            let Ok(name) = repository.parse::<RepositoryName>() else {
                continue;
            };
            let Ok(entries) = std::fs::read_dir(self.repository_dir(registry, &name).join("_tags"))
            else {
                continue;
            };
            for entry in entries.flatten() {
                let file_name = entry.file_name();
                let Some(tag) = file_name
                    .to_str()
                    .and_then(|f| f.strip_suffix(".json"))
                    .and_then(|t| t.parse::<Tag>().ok())
                else {
                    continue;
                };
                let Ok(Some(mut record)) = self.read_tag(registry, &name, &tag) else {
                    continue;
                };
                if record.checked_at == 0 {
                    continue;
                }
                record.checked_at = 0;
                match self.write_tag(registry, &name, &tag, &record) {
                    Ok(()) => expired += 1,
                    Err(e) => {
                        tracing::warn!(registry, repository, %tag, error = %e, "cannot expire a cached tag")
                    }
                }
            }
        }
        expired
    }

    /// Removes a tag record (a purge); false when there was none.
    pub fn remove_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
    ) -> Result<bool, StoreError> {
        remove_file_if_present(&self.tag_path(registry, name, tag))
    }

    /// Removes a cached manifest and its media type (a purge); the bytes freed, `None` when it
    /// was not cached. A reader that opened it already finishes from its open file.
    pub fn remove_manifest(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let path = self.manifest_path(digest);
        let size = std::fs::metadata(&path).map(|m| m.len()).ok();
        // The manifest goes first: a `.type` left alone by a crash is removed at the next start.
        let removed = remove_file_if_present(&path)?;
        remove_file_if_present(&path.with_extension("type"))?;
        self.index.remove(&path);
        Ok(removed.then_some(size.unwrap_or(0)))
    }

    /// Removes a cached blob (a purge); the bytes freed, `None` when it was not cached. A reader
    /// that opened it already finishes from its open file.
    pub fn remove_blob(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let path = self.blob_path(digest);
        let size = std::fs::metadata(&path).map(|m| m.len()).ok();
        let removed = remove_file_if_present(&path)?;
        self.index.remove(&path);
        Ok(removed.then_some(size.unwrap_or(0)))
    }

    /// The digests of every complete cached manifest (sha256; other algorithms are not listed).
    pub fn manifest_digests(&self) -> Vec<Digest> {
        let Ok(entries) = std::fs::read_dir(self.root.join("manifests").join("sha256")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let hex = name.to_str()?;
                if hex.ends_with(".type") {
                    return None;
                }
                format!("sha256:{hex}").parse().ok()
            })
            .collect()
    }

    /// A cached manifest's bytes for a reference walk, without touching its LRU position.
    pub fn manifest_untouched(&self, digest: &Digest) -> Option<pinning::ManifestBytes> {
        self.manifest_for_walk(digest)
    }

    /// What the pins in force protect right now (manifests and blobs, by digest).
    pub fn pinned_content(&self) -> pinning::Protected {
        let pins = self.current_pins();
        if pins.is_empty() {
            return pinning::Protected::default();
        }
        pinning::protected_content(self.pinned_roots(&pins), |d| self.manifest_for_walk(d))
    }

    /// The pins in force now: the configured ones and the pin file's last good set.
    pub fn current_pins(&self) -> PinRules {
        let mut pins = self.pins.clone();
        if let Some(file) = &self.pin_file {
            pins.merge(&file.current());
        }
        pins
    }

    /// Bytes the pins protected at the last eviction pass (0 before the first one).
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned_bytes.load(Ordering::Relaxed)
    }

    /// Evicts least recently used content that is neither being served nor pinned until the cache
    /// is under its size bound; returns how many entries went. Pinned content is kept even when
    /// it alone exceeds the bound, with one warning per pass.
    pub fn evict(&self) -> u64 {
        if !self.index.over_bound() {
            return 0;
        }
        let pass = self.index.evict(&self.protected_paths());
        self.pinned_bytes
            .store(pass.protected_bytes, Ordering::Relaxed);
        if let Some(max) = self.index.max_size() {
            if pass.protected_bytes > max {
                tracing::warn!(
                    pinned_bytes = pass.protected_bytes,
                    max_size_bytes = max,
                    cache_size_bytes = pass.total,
                    "pinned content alone exceeds the cache size bound; keeping it (unpin images or raise the bound)"
                );
            }
        }
        pass.evicted
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn committed_blob_is_readable_and_uncommitted_temp_files_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let data = b"layer bytes";
        let digest = Digest::sha256_of(data);
        let temp = store.create_temp().unwrap();
        (&**temp.file()).write_all(data).unwrap();
        store.commit_blob(temp, &digest, data.len() as u64).unwrap();
        let (_, size, _pin) = store.open_blob(&digest).unwrap().unwrap();
        assert_eq!(size, data.len() as u64);

        let abandoned = store.create_temp().unwrap();
        (&**abandoned.file()).write_all(b"partial").unwrap();
        drop(abandoned);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn opening_after_a_crash_removes_temp_files_and_half_written_manifest_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let whole = br#"{"schemaVersion":2,"n":1}"#;
        let typeless = br#"{"schemaVersion":2,"n":2}"#;
        let (whole_digest, typeless_digest) =
            (Digest::sha256_of(whole), Digest::sha256_of(typeless));
        let manifests = dir.path().join("manifests/sha256");
        {
            let store = Store::open(dir.path(), None).unwrap();
            store
                .write_manifest(&whole_digest, "application/x-test", whole)
                .unwrap();
            store
                .write_manifest(&typeless_digest, "application/x-test", typeless)
                .unwrap();
            // What a kill leaves: a fetch's temp file, a manifest whose .type is gone (between
            // the removals of an eviction) and a .type whose manifest never arrived (between the
            // renames of a write).
            std::mem::forget(store.create_temp().unwrap());
            std::fs::remove_file(manifests.join(format!("{}.type", typeless_digest.hex())))
                .unwrap();
            std::fs::write(manifests.join(format!("{}.type", "ab".repeat(32))), "x").unwrap();
        }
        let store = Store::open(dir.path(), None).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        let mut left: Vec<String> = std::fs::read_dir(&manifests)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let hex = whole_digest.hex().to_owned();
        assert_eq!(left, vec![hex.clone(), format!("{hex}.type")]);
        assert_eq!(store.index().total_size(), whole.len() as u64);
    }

    #[test]
    fn tags_and_manifests_survive_reopening_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let name: RepositoryName = "library/alpine".parse().unwrap();
        let tag: Tag = "3.19".parse().unwrap();
        let body = br#"{"schemaVersion":2}"#;
        let digest = Digest::sha256_of(body);
        {
            let store = Store::open(dir.path(), None).unwrap();
            store
                .write_manifest(&digest, "application/x-test", body)
                .unwrap();
            let record = TagRecord {
                digest: digest.clone(),
                media_type: "application/x-test".into(),
                size: body.len() as u64,
                checked_at: 7,
            };
            store.write_tag("docker.io", &name, &tag, &record).unwrap();
        }
        let store = Store::open(dir.path(), None).unwrap();
        let m = store.read_manifest(&digest).unwrap().unwrap();
        assert_eq!(&m.bytes[..], body);
        assert_eq!(m.media_type, "application/x-test");
        assert_eq!(
            store
                .read_tag("docker.io", &name, &tag)
                .unwrap()
                .unwrap()
                .checked_at,
            7
        );
        assert_eq!(
            store.repositories("docker.io"),
            vec!["library/alpine".to_owned()]
        );
        assert!(store.repositories("quay.io").is_empty());
    }

    /// Caches an image (manifest, config, one layer of `layer_size` bytes) under `repo:tag`.
    fn cache_image(store: &Store, repo: &str, tag: &str, seed: &str, layer_size: usize) -> Digest {
        let blob = |bytes: Vec<u8>| {
            let digest = Digest::sha256_of(&bytes);
            let temp = store.create_temp().unwrap();
            (&**temp.file()).write_all(&bytes).unwrap();
            store
                .commit_blob(temp, &digest, bytes.len() as u64)
                .unwrap();
            digest
        };
        let config = blob(format!("config {seed}").into_bytes());
        let layer = blob(seed.bytes().cycle().take(layer_size).collect());
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": crate::oci::media::OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 1},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size}],
        }))
        .unwrap();
        let digest = Digest::sha256_of(&manifest);
        store
            .write_manifest(&digest, crate::oci::media::OCI_MANIFEST, &manifest)
            .unwrap();
        let record = TagRecord {
            digest: digest.clone(),
            media_type: crate::oci::media::OCI_MANIFEST.into(),
            size: manifest.len() as u64,
            checked_at: 1,
        };
        let (name, tag) = (repo.parse().unwrap(), tag.parse().unwrap());
        store.write_tag("docker.io", &name, &tag, &record).unwrap();
        store.note_repository("docker.io", &name).unwrap();
        digest
    }

    #[test]
    fn removed_content_leaves_the_disk_and_the_size_accounting_and_a_second_removal_finds_nothing()
    {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let digest = cache_image(&store, "library/gone", "1", "g", 100);
        let manifest = store.read_manifest(&digest).unwrap().unwrap();
        let before = store.index().total_size();
        assert_eq!(store.manifest_digests(), vec![digest.clone()]);

        let layer = Digest::sha256_of(&b"g".repeat(100));
        assert_eq!(store.remove_blob(&layer).unwrap(), Some(100));
        assert_eq!(
            store.remove_manifest(&digest).unwrap(),
            Some(manifest.bytes.len() as u64)
        );
        assert_eq!(
            store.index().total_size(),
            before - 100 - manifest.bytes.len() as u64
        );
        assert!(store.read_manifest(&digest).unwrap().is_none());
        assert!(store.blob_size(&layer).is_none());
        assert!(store.manifest_digests().is_empty());
        assert_eq!(store.remove_blob(&layer).unwrap(), None);
        assert_eq!(store.remove_manifest(&digest).unwrap(), None);

        let (name, tag) = ("library/gone".parse().unwrap(), "1".parse().unwrap());
        assert!(store.remove_tag("docker.io", &name, &tag).unwrap());
        assert!(store.read_tag("docker.io", &name, &tag).unwrap().is_none());
        assert!(!store.remove_tag("docker.io", &name, &tag).unwrap());
    }

    /// A store bounded at `max` bytes whose docker.io pins `pin`.
    fn pinning_store(dir: &Path, max: u64, pin: &str) -> Store {
        let mut config = Config::default();
        config.storage.path = dir.to_owned();
        config.storage.max_size_bytes = Some(max);
        config.registries.insert(
            "docker.io".into(),
            crate::config::RegistryConfig {
                pin: vec![pin.into()],
                ..Default::default()
            },
        );
        Store::from_config(&config).unwrap()
    }

    #[test]
    fn eviction_keeps_everything_a_pinned_tag_reaches_and_reports_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = pinning_store(dir.path(), 3000, "pinned:stable");
        // The pinned image is cached first, so it is the least recently used of all.
        let pinned = cache_image(&store, "library/pinned", "stable", "p", 1000);
        let other_tag = cache_image(&store, "library/pinned", "edge", "e", 1000);
        assert_eq!(store.evict(), 0, "under the bound nothing goes");
        let newest = cache_image(&store, "library/other", "1", "o", 1000);
        assert!(store.index().total_size() > 3000);
        assert!(store.evict() > 0);

        let manifest = store.read_manifest(&pinned).unwrap().unwrap();
        let refs: serde_json::Value = serde_json::from_slice(&manifest.bytes).unwrap();
        for blob in [&refs["config"]["digest"], &refs["layers"][0]["digest"]] {
            let digest: Digest = blob.as_str().unwrap().parse().unwrap();
            assert!(
                store.blob_size(&digest).is_some(),
                "pinned blob {digest} kept"
            );
        }
        // The unpinned tag of the same repository was older than `newest`, so it went.
        assert!(store.read_manifest(&other_tag).unwrap().is_none());
        assert!(store.read_manifest(&newest).unwrap().is_some());
        assert!(store.index().total_size() <= 3000);
        let expected_pinned = manifest.bytes.len() as u64 + 1000 + "config p".len() as u64;
        assert_eq!(store.pinned_bytes(), expected_pinned);
    }

    #[test]
    fn pinned_content_larger_than_the_bound_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = pinning_store(dir.path(), 500, "big");
        let pinned = cache_image(&store, "library/big", "1", "b", 1000);
        let unpinned = cache_image(&store, "library/small", "1", "s", 10);
        store.evict();
        assert!(store.read_manifest(&pinned).unwrap().is_some());
        assert!(store.read_manifest(&unpinned).unwrap().is_none());
        assert!(store.pinned_bytes() > 500);
        assert!(store.index().over_bound());
    }
}
