//! In-memory index of cached files for size accounting and least-recently-used eviction.
//!
//! Invariants: content being written lives in `tmp/` and is not indexed, so it is never evicted;
//! content being served holds a [`Pin`] and is skipped by eviction; content in the protected set
//! handed to [`Index::evict`] (what configured pins and the pin file reach, see `pinning`) is skipped too, even
//! when that leaves the cache over its bound.
//!
//! Durable LRU order: a content file's modification time is its last use. A hit only notes the
//! time in memory ([`Index::touch_and_pin`], no I/O); [`Index::flush_last_use`] writes the noted
//! times as modification times in one batch (one `open` and `futimens` per file used since the
//! last flush), which the server runs periodically and at shutdown. The index is rebuilt at
//! startup ordered by modification time, so after a restart the LRU order is the one of the last
//! flush: uses newer than it (at most one flush interval, or none after a clean shutdown) are
//! lost on a crash, and those files rank by their previous last use.
//!
//! Memory: entries are keyed by a [`Key`], the file's place relative to the root; the common
//! case (a sha256 blob or manifest) is 33 bytes inline and allocates nothing, so an entry costs
//! about 100 bytes with the map's slack (paths are rebuilt only to touch the disk, and the
//! start-up scan collects keys, not paths, since the allocator keeps what it used).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

#[derive(Debug)]
struct Entry {
    size: u64,
    last_use: u64,
    pins: u32,
    /// When it was last used, if that is not yet written to its modification time.
    unflushed_use: Option<SystemTime>,
}

/// A content file, relative to the storage root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// `blobs/sha256/<hex>` or (`manifest`) `manifests/sha256/<hex>`.
    Sha256 { manifest: bool, digest: [u8; 32] },
    /// Any other file (another algorithm): its path relative to the root, byte for byte.
    Other(Box<Path>),
}

impl Key {
    /// The key of `path` under `root`. Pure.
    fn of(root: &Path, path: &Path) -> Key {
        let relative = path.strip_prefix(root).unwrap_or(path);
        let mut parts = relative.iter().map(|p| p.to_str());
        let sha256 = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Some(top)), Some(Some("sha256")), Some(Some(hex)), None) => {
                let mut digest = [0u8; 32];
                let manifest = match top {
                    "blobs" => Some(false),
                    "manifests" => Some(true),
                    _ => None,
                };
                manifest
                    .filter(|_| {
                        // Lower-case only: the path must round-trip exactly.
                        hex.bytes().all(|b| !b.is_ascii_uppercase())
                            && hex::decode_to_slice(hex, &mut digest).is_ok()
                    })
                    .map(|manifest| Key::Sha256 { manifest, digest })
            }
            _ => None,
        };
        sha256.unwrap_or_else(|| Key::Other(relative.into()))
    }

    /// The file's path under `root`. Pure.
    fn path(&self, root: &Path) -> PathBuf {
        match self {
            Key::Sha256 { manifest, digest } => root
                .join(if *manifest { "manifests" } else { "blobs" })
                .join("sha256")
                .join(hex::encode(digest)),
            Key::Other(relative) => root.join(&**relative),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    total: u64,
    clock: u64,
}

/// Size accounting and LRU order of the store's content files.
#[derive(Debug)]
pub struct Index {
    inner: Arc<Mutex<Inner>>,
    max_size: Option<u64>,
    root: PathBuf,
}

/// What one eviction pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvictionPass {
    /// Files removed.
    pub evicted: u64,
    /// Bytes of indexed files in the protected set (kept whatever the bound).
    pub protected_bytes: u64,
    /// Bytes indexed after the pass.
    pub total: u64,
}

/// What one [`Index::flush_last_use`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastUseFlush {
    /// Files whose modification time now says when they were last used.
    pub written: u64,
    /// Files that could not be updated (gone files are not counted: they were evicted).
    pub failed: u64,
}

/// Keeps a file from being evicted while it is being served.
#[derive(Debug)]
pub struct Pin {
    inner: Arc<Mutex<Inner>>,
    key: Key,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut inner = lock(&self.inner);
        if let Some(e) = inner.entries.get_mut(&self.key) {
            e.pins = e.pins.saturating_sub(1);
        }
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain counters; the data is
/// still usable, so recover it rather than propagate the panic.
fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Index {
    /// Builds the index from the files under `root/blobs` and `root/manifests`.
    pub fn scan(root: &Path, max_size: Option<u64>) -> Index {
        let mut files: Vec<(Key, u64, std::time::SystemTime)> = Vec::new();
        for top in ["blobs", "manifests"] {
            let Ok(algs) = std::fs::read_dir(root.join(top)) else {
                continue;
            };
            for alg in algs.flatten() {
                let Ok(entries) = std::fs::read_dir(alg.path()) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "type") {
                        continue;
                    }
                    if let Ok(meta) = entry.metadata() {
                        let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                        files.push((Key::of(root, &path), meta.len(), mtime));
                    }
                }
            }
        }
        files.sort_by_key(|(_, _, mtime)| *mtime);
        let mut inner = Inner {
            entries: HashMap::with_capacity(files.len()),
            ..Inner::default()
        };
        for (key, size, _) in files {
            inner.clock += 1;
            inner.total += size;
            let last_use = inner.clock;
            inner.entries.insert(
                key,
                Entry {
                    size,
                    last_use,
                    pins: 0,
                    unflushed_use: None,
                },
            );
        }
        Index {
            inner: Arc::new(Mutex::new(inner)),
            max_size,
            root: root.to_owned(),
        }
    }

    /// Total bytes indexed.
    pub fn total_size(&self) -> u64 {
        lock(&self.inner).total
    }

    /// The configured size bound, if any.
    pub fn max_size(&self) -> Option<u64> {
        self.max_size
    }

    /// Whether the cache holds more than its bound (an eviction pass has work to do).
    pub fn over_bound(&self) -> bool {
        self.max_size.is_some_and(|max| self.total_size() > max)
    }

    pub(super) fn insert(&self, path: &Path, size: u64) {
        let key = Key::of(&self.root, path);
        let mut inner = lock(&self.inner);
        inner.clock += 1;
        let clock = inner.clock;
        if let Some(old) = inner.entries.insert(
            key,
            Entry {
                size,
                last_use: clock,
                pins: 0,
                // Just written: its modification time is this use.
                unflushed_use: None,
            },
        ) {
            inner.total -= old.size;
        }
        inner.total += size;
    }

    pub(super) fn touch_and_pin(&self, path: &Path, size: u64) -> Pin {
        let used_at = SystemTime::now();
        let key = Key::of(&self.root, path);
        let mut inner = lock(&self.inner);
        inner.clock += 1;
        let clock = inner.clock;
        match inner.entries.get_mut(&key) {
            Some(e) => {
                e.last_use = clock;
                e.pins += 1;
                e.unflushed_use = Some(used_at);
            }
            None => {
                inner.entries.insert(
                    key.clone(),
                    Entry {
                        size,
                        last_use: clock,
                        pins: 1,
                        unflushed_use: Some(used_at),
                    },
                );
                inner.total += size;
            }
        }
        Pin {
            inner: Arc::clone(&self.inner),
            key,
        }
    }

    /// Forgets a file that was removed on purpose (a purge); returns the size it was counted with.
    pub(super) fn remove(&self, path: &Path) -> Option<u64> {
        let key = Key::of(&self.root, path);
        let mut inner = lock(&self.inner);
        let entry = inner.entries.remove(&key)?;
        inner.total -= entry.size;
        Some(entry.size)
    }

    /// Writes the last uses noted since the previous flush as the files' modification times. The
    /// list is taken under the lock (no I/O there); the files are updated after releasing it, so
    /// hits never wait for the disk. A file evicted meanwhile is skipped.
    pub fn flush_last_use(&self) -> LastUseFlush {
        let pending: Vec<(Key, SystemTime)> = {
            let mut inner = lock(&self.inner);
            inner
                .entries
                .iter_mut()
                .filter_map(|(key, e)| e.unflushed_use.take().map(|t| (key.clone(), t)))
                .collect()
        };
        let mut flush = LastUseFlush::default();
        for (key, used_at) in pending {
            let path = key.path(&self.root);
            match std::fs::File::open(&path).and_then(|f| f.set_modified(used_at)) {
                Ok(()) => flush.written += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    flush.failed += 1;
                    tracing::debug!(path = %path.display(), error = %e, "cannot record last use");
                }
            }
        }
        flush
    }

    /// Removes least recently used files that are neither being served nor `protected` until the
    /// total is within the bound.
    pub(super) fn evict(&self, protected: &HashSet<PathBuf>) -> EvictionPass {
        let protected: HashSet<Key> = protected.iter().map(|p| Key::of(&self.root, p)).collect();
        let mut inner = lock(&self.inner);
        let protected_bytes = protected
            .iter()
            .filter_map(|k| inner.entries.get(k))
            .map(|e| e.size)
            .sum();
        let mut pass = EvictionPass {
            evicted: 0,
            protected_bytes,
            total: inner.total,
        };
        let Some(max) = self.max_size else {
            return pass;
        };
        if inner.total <= max {
            return pass;
        }
        let mut candidates: Vec<(u64, Key)> = inner
            .entries
            .iter()
            .filter(|(k, e)| e.pins == 0 && !protected.contains(*k))
            .map(|(k, e)| (e.last_use, k.clone()))
            .collect();
        // Last uses are distinct clock values, so the order never looks at the keys.
        candidates.sort_by_key(|(last_use, _)| *last_use);
        for (_, key) in candidates {
            if inner.total <= max {
                break;
            }
            let path = key.path(&self.root);
            // A manifest's media type file goes with it; a missing one is harmless.
            let _ = std::fs::remove_file(path.with_extension("type"));
            if std::fs::remove_file(&path).is_ok() || !path.exists() {
                if let Some(e) = inner.entries.remove(&key) {
                    inner.total -= e.size;
                    pass.evicted += 1;
                }
            }
        }
        pass.total = inner.total;
        pass
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An index bounded at `max` over four 10-byte blobs, inserted (used) in order 0..4.
    fn four_files_of_ten_bytes(max: u64) -> (tempfile::TempDir, Index, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let index = Index::scan(dir.path(), Some(max));
        let paths: Vec<PathBuf> = (0..4).map(|i| blobs.join(format!("{i}"))).collect();
        for p in &paths {
            std::fs::write(p, [0u8; 10]).unwrap();
            index.insert(p, 10);
        }
        (dir, index, paths)
    }

    #[test]
    fn keys_of_sha256_content_are_inline_and_every_key_gives_its_path_back() {
        use std::os::unix::ffi::OsStrExt as _;
        let root = Path::new("/var/lib/cachalot");
        let hex = "ab".repeat(32);
        for relative in [
            format!("blobs/sha256/{hex}"),
            format!("manifests/sha256/{hex}"),
            format!("blobs/sha512/{}", "cd".repeat(64)),
            format!("blobs/sha256/{}", "AB".repeat(32)),
            "blobs/sha256/short".to_string(),
        ] {
            let path = root.join(&relative);
            let key = Key::of(root, &path);
            assert_eq!(key.path(root), path, "{relative}");
            let inline = matches!(key, Key::Sha256 { .. });
            assert_eq!(inline, relative.ends_with(&hex), "{relative}");
        }
        // A name that is not UTF-8 still gives its own path back.
        let odd = root.join(std::ffi::OsStr::from_bytes(b"blobs/sha256/\xff"));
        assert_eq!(Key::of(root, &odd).path(root), odd);
        assert!(std::mem::size_of::<Key>() <= 40);
    }

    #[test]
    fn eviction_removes_least_recently_used_unpinned_files_first() {
        let (_dir, index, paths) = four_files_of_ten_bytes(25);
        // Use 0 again (now most recent) and pin 1 (serving): 2 and 3 are the LRU unpinned ones.
        drop(index.touch_and_pin(&paths[0], 10));
        let _serving = index.touch_and_pin(&paths[1], 10);
        assert_eq!(index.evict(&HashSet::new()).evicted, 2);
        assert!(paths[0].exists() && paths[1].exists());
        assert!(!paths[2].exists() && !paths[3].exists());
        assert_eq!(index.total_size(), 20);
    }

    #[test]
    fn last_use_written_by_a_flush_orders_the_index_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let paths: Vec<PathBuf> = (0..4).map(|i| blobs.join(format!("{i}"))).collect();
        // Written long ago, in order 0..4.
        let long_ago = SystemTime::now() - std::time::Duration::from_secs(3600);
        for (i, p) in paths.iter().enumerate() {
            std::fs::write(p, [0u8; 10]).unwrap();
            let written = long_ago + std::time::Duration::from_secs(i as u64);
            std::fs::File::open(p)
                .unwrap()
                .set_modified(written)
                .unwrap();
        }
        let index = Index::scan(dir.path(), Some(25));
        // 0 is used again: the hit itself writes nothing...
        drop(index.touch_and_pin(&paths[0], 10));
        let before = std::fs::metadata(&paths[0]).unwrap().modified().unwrap();
        assert_eq!(before, long_ago, "a hit does no I/O");
        // ...the flush does, once per file used since the last flush.
        assert_eq!(
            index.flush_last_use(),
            LastUseFlush {
                written: 1,
                failed: 0
            }
        );
        assert_eq!(index.flush_last_use(), LastUseFlush::default());

        // After a restart the index is rebuilt from the files: 0 is now the most recent, so 1
        // and 2 are the least recently used.
        let restarted = Index::scan(dir.path(), Some(25));
        assert_eq!(restarted.evict(&HashSet::new()).evicted, 2);
        assert!(paths[0].exists() && paths[3].exists());
        assert!(!paths[1].exists() && !paths[2].exists());
    }

    #[test]
    fn protected_files_stay_even_when_they_alone_exceed_the_bound() {
        let (_dir, index, paths) = four_files_of_ten_bytes(15);
        // 0 and 1 are the least recently used, but protected: 2 and 3 go, and the pass reports
        // the 20 protected bytes that keep the cache over its bound of 15.
        let protected: HashSet<PathBuf> = paths[..2].iter().cloned().collect();
        let pass = index.evict(&protected);
        assert_eq!(
            pass,
            EvictionPass {
                evicted: 2,
                protected_bytes: 20,
                total: 20
            }
        );
        assert!(paths[0].exists() && paths[1].exists());
        assert!(!paths[2].exists() && !paths[3].exists());
        assert!(index.over_bound());
    }
}
