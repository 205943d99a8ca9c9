//! The negative cache: upstream 404s remembered for a short while, so that a client retrying a
//! tag that does not exist (or a typo in a Deployment, pulled by every node in a loop) costs the
//! upstream one request per window instead of one per pull.
//!
//! Invariants: bounded (at most [`MAX_ENTRIES`] entries; inserting into a full cache drops the
//! oldest insertion first, expired or not), entries expire on their own deadline, and an entry
//! holds only the upstream's error (its message cut to [`MAX_MESSAGE_CHARS`]) so memory per entry
//! is small. Cached content always wins over an entry: callers look here only after the store
//! had nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::oci::{Digest, RepositoryName, Tag};
use crate::upstream::UpstreamError;

/// Entries kept at most, across registries.
pub const MAX_ENTRIES: usize = 10_000;
/// Characters of the upstream's message kept per entry.
pub const MAX_MESSAGE_CHARS: usize = 256;

/// What was not found.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NotFound {
    /// A manifest by tag.
    Tag(String, RepositoryName, Tag),
    /// A manifest by digest, in one repository.
    Manifest(String, RepositoryName, Digest),
    /// A blob, in one repository (a digest unknown as a manifest may well be a blob).
    Blob(String, RepositoryName, Digest),
    /// A repository's `tags/list`.
    TagsList(String, RepositoryName),
}

impl NotFound {
    /// The registry the entry belongs to.
    pub fn registry(&self) -> &str {
        match self {
            NotFound::Tag(r, ..)
            | NotFound::Manifest(r, ..)
            | NotFound::Blob(r, ..)
            | NotFound::TagsList(r, ..) => r,
        }
    }

    /// The `kind` label of the hit metric.
    pub fn kind(&self) -> &'static str {
        match self {
            NotFound::Tag(..) => "tag",
            NotFound::Manifest(..) | NotFound::Blob(..) => "digest",
            NotFound::TagsList(..) => "tags",
        }
    }
}

#[derive(Debug)]
struct Entry {
    error: UpstreamError,
    expires: Instant,
    /// Insertion number, to tell a live entry from an outdated queue slot.
    serial: u64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<NotFound, Entry>,
    /// Insertion order, oldest first; a slot whose serial no longer matches its entry is skipped.
    order: VecDeque<(NotFound, u64)>,
    next_serial: u64,
}

/// Upstream 404s by what was asked for.
#[derive(Debug)]
pub struct NegativeCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl Default for NegativeCache {
    fn default() -> Self {
        NegativeCache::with_capacity(MAX_ENTRIES)
    }
}

/// Keeps the message of an upstream error short enough to hold thousands of them.
fn shortened(error: &UpstreamError) -> UpstreamError {
    match error {
        UpstreamError::Status {
            registry,
            status,
            message,
            retry_after,
        } => UpstreamError::Status {
            registry: registry.clone(),
            status: *status,
            message: message.chars().take(MAX_MESSAGE_CHARS).collect(),
            retry_after: retry_after.clone(),
        },
        other => other.clone(),
    }
}

impl NegativeCache {
    pub fn with_capacity(capacity: usize) -> NegativeCache {
        NegativeCache {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the maps consistent before it can panic; keep using them.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The remembered 404 for `key`, if it has not expired at `now`.
    pub fn get(&self, key: &NotFound, now: Instant) -> Option<UpstreamError> {
        let mut inner = self.lock();
        match inner.entries.get(key) {
            Some(entry) if now < entry.expires => Some(entry.error.clone()),
            Some(_) => {
                inner.entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers `error` for `key` until `now + ttl`; a zero `ttl` remembers nothing.
    pub fn put(&self, key: NotFound, error: &UpstreamError, ttl: Duration, now: Instant) {
        if ttl.is_zero() {
            return;
        }
        let mut inner = self.lock();
        let serial = inner.next_serial;
        inner.next_serial += 1;
        while inner.entries.len() >= self.capacity && !inner.entries.contains_key(&key) {
            let Some((oldest, oldest_serial)) = inner.order.pop_front() else {
                break;
            };
            if inner
                .entries
                .get(&oldest)
                .is_some_and(|e| e.serial == oldest_serial)
            {
                inner.entries.remove(&oldest);
            }
        }
        inner.order.push_back((key.clone(), serial));
        inner.entries.insert(
            key,
            Entry {
                error: shortened(error),
                expires: now + ttl,
                serial,
            },
        );
        // Outdated slots (re-inserted or expired keys) are dropped once they dominate the queue.
        if inner.order.len() > 2 * self.capacity {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|(k, s)| entries.get(k).is_some_and(|e| e.serial == *s));
        }
    }

    /// Forgets `key` (the content turned up).
    pub fn remove(&self, key: &NotFound) {
        self.lock().entries.remove(key);
    }

    /// Entries held, expired ones included until they are looked up or pushed out.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::StatusCode;

    fn key(tag: &str) -> NotFound {
        NotFound::Tag(
            "docker.io".into(),
            "library/x".parse().unwrap(),
            tag.parse().unwrap(),
        )
    }

    fn not_found(message: &str) -> UpstreamError {
        UpstreamError::Status {
            registry: "docker.io".into(),
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            retry_after: None,
        }
    }

    #[test]
    fn a_404_is_answered_until_it_expires() {
        let cache = NegativeCache::default();
        let t0 = Instant::now();
        cache.put(
            key("a"),
            &not_found("MANIFEST_UNKNOWN"),
            Duration::from_secs(30),
            t0,
        );
        let hit = cache.get(&key("a"), t0 + Duration::from_secs(29)).unwrap();
        assert!(hit.to_string().contains("MANIFEST_UNKNOWN"));
        assert!(cache.get(&key("b"), t0).is_none());
        assert!(cache.get(&key("a"), t0 + Duration::from_secs(30)).is_none());
        assert!(cache.is_empty(), "an expired entry is dropped when seen");
        cache.put(key("z"), &not_found("x"), Duration::ZERO, t0);
        assert!(cache.get(&key("z"), t0).is_none(), "0s remembers nothing");
    }

    #[test]
    fn a_full_cache_drops_its_oldest_entries_first() {
        let cache = NegativeCache::with_capacity(3);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        for tag in ["a", "b", "c"] {
            cache.put(key(tag), &not_found(tag), ttl, t0);
        }
        // Re-inserting "a" makes it the newest; "b" is now the oldest.
        cache.put(key("a"), &not_found("a"), ttl, t0);
        cache.put(key("d"), &not_found("d"), ttl, t0);
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&key("b"), t0).is_none());
        for tag in ["a", "c", "d"] {
            assert!(cache.get(&key(tag), t0).is_some(), "{tag}");
        }
        for i in 0..1000 {
            cache.put(key(&format!("t{i}")), &not_found("x"), ttl, t0);
        }
        assert_eq!(cache.len(), 3);
        assert!(
            cache.lock().order.len() <= 6,
            "the order queue stays bounded"
        );
    }

    #[test]
    fn long_upstream_messages_are_cut() {
        let cache = NegativeCache::default();
        let t0 = Instant::now();
        cache.put(
            key("a"),
            &not_found(&"m".repeat(100_000)),
            Duration::from_secs(1),
            t0,
        );
        let UpstreamError::Status { message, .. } = cache.get(&key("a"), t0).unwrap() else {
            unreachable!("a status error was stored")
        };
        assert_eq!(message.len(), MAX_MESSAGE_CHARS);
    }
}
