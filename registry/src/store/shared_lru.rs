//! Least-recently-used eviction of the shared tier, with pins, for every replica of a mirror.
//!
//! Last use. A replica serving content from the shared tier notes the use in memory
//! ([`SharedLastUse::note`], no I/O) and writes its notes periodically as one small object per
//! replica, `_cachalot/last-use/<replica>.json`: a JSON map of key (`blobs/sha256/<hex>`) to
//! unix seconds, merged with what the object already holds ([`SharedLastUse::flush`]). Every
//! replica writes only its own record, so flushes of different replicas never race. The last use
//! of an object is the latest of its `LastModified` and every replica's record, so the LRU order
//! survives restarts and is the same on every replica.
//!
//! Eviction ([`evict`]) lists `blobs/` and `manifests/`; when they hold more than the bound it
//! deletes least recently used objects first ([`select_evictions`], a pure function), never a
//! protected one (what the pins reach, [`protected_keys`]) and never one used or written within
//! the grace period. Entries of the records for objects that no longer exist are pruned in the
//! same pass, so a record holds about one entry per live object its replica served.
//!
//! The contract that makes "eviction never deletes an object a replica is serving" hold:
//! - a replica notes a key when it starts serving it from the shared tier and again at least
//!   once per flush interval while it still serves it (a long stream notes again);
//! - it flushes at an interval `flush` with `grace >= 2 * flush` plus the clock skew between
//!   replicas and the object store (record times are replica clocks, `LastModified` the store's);
//! - a flush writes every entry twice, in two consecutive flushes (see [`SharedLastUse`]), so a
//!   flush lost to a concurrent prune (a read-modify-write without conditional PUT, which Garage
//!   ignores) is repaired by the next one.
//!
//! What it cannot cover: a use not flushed yet of an object idle for longer than the grace
//! period. Between the note and the flush (at most one interval) an eviction pass does not see
//! the use and may delete the object; the serving replica then finds it gone on its next read
//! and treats that as a miss. Nothing wrong is ever served: objects are content addressed.
//!
//! Records written longer than the grace period ago carry no use within it, so a corrupt record
//! that old is ignored (and removed); a newer corrupt one stops eviction until its replica's
//! next flush rewrites it.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::pinning::{self, ManifestBytes, PinRules};
use super::shared::{blob_key, manifest_key, SharedObject, SharedStore, SharedStoreError};
use super::TagRecord;
use crate::oci::Digest;

/// Where the last-use records live, below the store's prefix.
pub const LAST_USE_PREFIX: &str = "_cachalot/last-use/";

/// What the walk over pinned content may need: the roots, then one round per level of the
/// deepest index `pinning::protected_content` follows, then one round that asks for nothing.
const PIN_WALK_ROUNDS: usize = pinning::MAX_DEPTH + 2;

/// A failed step of shared-tier eviction, named by what was being done.
#[derive(Debug, thiserror::Error)]
pub enum SharedEvictionError {
    #[error("replica id `{0}` cannot name a last-use record: use 1 to 128 of A-Z, a-z, 0-9, `.`, `_`, `-`")]
    ReplicaId(String),
    #[error("cannot flush the last uses of replica `{replica}`: {source}")]
    FlushLastUse {
        replica: String,
        source: Box<SharedStoreError>,
    },
    #[error("cannot read the last-use records: {0}")]
    ReadLastUse(#[source] Box<SharedStoreError>),
    #[error("last-use record {key} is corrupt ({message}) and was written within the grace period; eviction waits for its replica to rewrite it")]
    CorruptLastUse { key: String, message: String },
    #[error("cannot list the shared tier's content: {0}")]
    ListContent(#[source] Box<SharedStoreError>),
    #[error("cannot evict: {0}")]
    Delete(#[source] Box<SharedStoreError>),
    #[error("cannot prune the last-use record {key}: {source}")]
    PruneLastUse {
        key: String,
        source: Box<SharedStoreError>,
    },
    #[error("cannot read what the pins reach: {0}")]
    ReadPinned(#[source] Box<SharedStoreError>),
}

/// The key of a replica's last-use record. Pure.
pub fn last_use_key(replica_id: &str) -> Result<String, SharedEvictionError> {
    let ok = (1..=128).contains(&replica_id.len())
        && replica_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && replica_id != "."
        && replica_id != "..";
    if ok {
        Ok(format!("{LAST_USE_PREFIX}{replica_id}.json"))
    } else {
        Err(SharedEvictionError::ReplicaId(replica_id.to_owned()))
    }
}

/// The stored form of a last-use record: a JSON object of key to unix seconds. Pure.
pub fn encode_record(record: &BTreeMap<String, u64>) -> Vec<u8> {
    // A map of strings to integers always serialises; the fallback is never taken.
    serde_json::to_vec(record).unwrap_or_else(|_| b"{}".to_vec())
}

/// Parses a stored last-use record. Pure.
pub fn decode_record(bytes: &[u8]) -> Result<BTreeMap<String, u64>, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// Merges `uses` into `into`, keeping the later time of a key. Pure.
pub fn merge_uses(into: &mut BTreeMap<String, u64>, uses: impl IntoIterator<Item = (String, u64)>) {
    for (key, at) in uses {
        let entry = into.entry(key).or_insert(at);
        *entry = (*entry).max(at);
    }
}

#[derive(Debug, Default)]
struct Notes {
    /// Uses noted since the last successful flush.
    new: BTreeMap<String, u64>,
    /// The new uses of the last successful flush, written once more by the next one.
    echo: BTreeMap<String, u64>,
}

/// Uses of shared-tier content noted by this replica, written to its last-use record by
/// [`SharedLastUse::flush`]. Every use is written by two consecutive flushes: the record is a
/// read-modify-write, and a concurrent prune by an eviction pass can overwrite one flush.
#[derive(Debug, Default)]
pub struct SharedLastUse {
    notes: Mutex<Notes>,
    /// Held for a whole flush: two flushes of one replica would race on its record.
    flushing: tokio::sync::Mutex<()>,
}

/// What one [`SharedLastUse::flush`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastUseFlushed {
    /// Entries written (new uses and the repeated ones of the previous flush).
    pub written: u64,
}

impl SharedLastUse {
    pub fn new() -> SharedLastUse {
        SharedLastUse::default()
    }

    fn lock(&self) -> MutexGuard<'_, Notes> {
        // A poisoned lock means a panic mid-insert into plain maps; the maps are still usable.
        self.notes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes a use of `key` (`blobs/<alg>/<hex>`, `manifests/<alg>/<hex>`) now. No I/O.
    pub fn note(&self, key: &str) {
        self.note_at(key, super::now_secs());
    }

    /// Notes a use of `key` at `unix_secs` (a later use of the same key wins). No I/O.
    pub fn note_at(&self, key: &str, unix_secs: u64) {
        merge_uses(&mut self.lock().new, [(key.to_owned(), unix_secs)]);
    }

    /// Uses noted and not yet written by a successful flush.
    pub fn pending(&self) -> usize {
        self.lock().new.len()
    }

    /// Writes the noted uses into `replica_id`'s record (merged with what it holds), one flush
    /// at a time. Sends no request when there is nothing to write; on failure the uses stay
    /// noted for the next try.
    pub async fn flush(
        &self,
        store: &SharedStore,
        replica_id: &str,
    ) -> Result<LastUseFlushed, SharedEvictionError> {
        let key = last_use_key(replica_id)?;
        let _one_at_a_time = self.flushing.lock().await;
        let (new, echo) = {
            let mut notes = self.lock();
            (
                std::mem::take(&mut notes.new),
                std::mem::take(&mut notes.echo),
            )
        };
        if new.is_empty() && echo.is_empty() {
            return Ok(LastUseFlushed::default());
        }
        let mut batch = echo.clone();
        merge_uses(&mut batch, new.clone());
        let written = batch.len() as u64;
        match write_merged(store, &key, batch).await {
            Ok(()) => {
                self.lock().echo = new;
                Ok(LastUseFlushed { written })
            }
            Err(source) => {
                let mut notes = self.lock();
                merge_uses(&mut notes.new, new);
                merge_uses(&mut notes.echo, echo);
                Err(SharedEvictionError::FlushLastUse {
                    replica: replica_id.to_owned(),
                    source: Box::new(source),
                })
            }
        }
    }
}

/// Reads the record at `key`, merges `batch` into it and writes it back. A corrupt record is
/// this replica's own: it is replaced.
async fn write_merged(
    store: &SharedStore,
    key: &str,
    batch: BTreeMap<String, u64>,
) -> Result<(), SharedStoreError> {
    let mut record = match store.read_object(key).await? {
        Some(bytes) => decode_record(&bytes).unwrap_or_else(|message| {
            tracing::warn!(key, message, "replacing a corrupt last-use record");
            BTreeMap::new()
        }),
        None => BTreeMap::new(),
    };
    merge_uses(&mut record, batch);
    store.write_object(key, encode_record(&record)).await
}

/// One replica's last-use record as an eviction pass read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastUseRecord {
    /// Its key below the prefix (`_cachalot/last-use/<replica>.json`).
    pub key: String,
    /// `None`: corrupt, and written longer than the grace period ago (so ignored).
    pub uses: Option<BTreeMap<String, u64>>,
}

/// Reads every replica's last-use record. A corrupt record written within `grace` of `now` is an
/// error (it may hold a use eviction must see); an older one is returned without uses.
pub async fn read_last_use(
    store: &SharedStore,
    now: u64,
    grace: Duration,
) -> Result<Vec<LastUseRecord>, SharedEvictionError> {
    let listed = store
        .list(LAST_USE_PREFIX)
        .await
        .map_err(|e| SharedEvictionError::ReadLastUse(Box::new(e)))?;
    let mut records = Vec::with_capacity(listed.len());
    for object in listed.into_iter().filter(|o| o.key.ends_with(".json")) {
        let Some(bytes) = store
            .read_object(&object.key)
            .await
            .map_err(|e| SharedEvictionError::ReadLastUse(Box::new(e)))?
        else {
            continue; // deleted since the listing (an empty record pruned by another pass)
        };
        let uses = match decode_record(&bytes) {
            Ok(uses) => Some(uses),
            Err(message) if within(object.modified, now, grace) => {
                return Err(SharedEvictionError::CorruptLastUse {
                    key: object.key,
                    message,
                })
            }
            Err(message) => {
                tracing::warn!(
                    key = object.key,
                    message,
                    "ignoring an old corrupt last-use record"
                );
                None
            }
        };
        records.push(LastUseRecord {
            key: object.key,
            uses,
        });
    }
    Ok(records)
}

/// Whether `at` lies within `grace` before `now` (or after it: clocks differ). Pure.
fn within(at: u64, now: u64, grace: Duration) -> bool {
    now.saturating_sub(at) < grace.as_secs()
}

/// What [`select_evictions`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictionPlan {
    /// Keys to delete, least recently used first.
    pub delete: Vec<String>,
    /// Bytes listed before the pass.
    pub total_before: u64,
    /// Bytes left once `delete` is done.
    pub total_after: u64,
    /// Bytes of listed objects that are protected.
    pub protected_bytes: u64,
}

/// Which objects to delete so that at most `max_size` bytes stay: least recently used first,
/// where an object's last use is the later of its `modified` and `last_use[key]`; never a
/// `protected` key and never one used or written within `grace` of `now` (unix seconds). When
/// those alone exceed the bound, the plan keeps them and leaves the total over it. Pure.
pub fn select_evictions(
    objects: &[SharedObject],
    last_use: &HashMap<String, u64>,
    protected: &HashSet<String>,
    now: u64,
    grace: Duration,
    max_size: u64,
) -> EvictionPlan {
    let total_before: u64 = objects.iter().map(|o| o.size).sum();
    let protected_bytes = objects
        .iter()
        .filter(|o| protected.contains(&o.key))
        .map(|o| o.size)
        .sum();
    let mut plan = EvictionPlan {
        delete: Vec::new(),
        total_before,
        total_after: total_before,
        protected_bytes,
    };
    if total_before <= max_size {
        return plan;
    }
    let mut candidates: Vec<(u64, &SharedObject)> = objects
        .iter()
        .map(|o| {
            let used = last_use.get(&o.key).copied().unwrap_or(0);
            (o.modified.max(used), o)
        })
        .filter(|(last, o)| !protected.contains(&o.key) && !within(*last, now, grace))
        .collect();
    // Ties (the same second) are broken by key, so every replica plans the same deletions.
    candidates.sort_by(|(a, x), (b, y)| a.cmp(b).then_with(|| x.key.cmp(&y.key)));
    for (_, object) in candidates {
        if plan.total_after <= max_size {
            break;
        }
        plan.total_after -= object.size;
        plan.delete.push(object.key.clone());
    }
    plan
}

/// The entries of `uses` that name no `existing` object and are older than `grace`: an entry
/// within the grace period is kept even for an object not listed (it may have been written
/// after the listing). Pure.
pub fn stale_entries(
    uses: &BTreeMap<String, u64>,
    existing: &HashSet<&str>,
    now: u64,
    grace: Duration,
) -> Vec<String> {
    uses.iter()
        .filter(|(key, at)| !existing.contains(key.as_str()) && !within(**at, now, grace))
        .map(|(key, _)| key.clone())
        .collect()
}

/// What one [`evict`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedEvictionPass {
    /// Objects deleted.
    pub evicted: u64,
    /// Bytes under `blobs/` and `manifests/` after the pass.
    pub total_after: u64,
    /// Bytes of protected objects (kept whatever the bound).
    pub protected_bytes: u64,
    /// Last-use entries removed because their object is gone.
    pub pruned: u64,
}

/// One eviction pass over the shared tier (see the module header): when `blobs/` and
/// `manifests/` hold more than `max_size` bytes, deletes least recently used objects, never a
/// `protected` key (see [`protected_keys`]) nor one used or written within `grace` of `now`
/// (unix seconds), then prunes the last-use entries of objects that are gone. Under the bound
/// it only lists.
pub async fn evict(
    store: &SharedStore,
    max_size: u64,
    protected: &HashSet<String>,
    grace: Duration,
    now: u64,
) -> Result<SharedEvictionPass, SharedEvictionError> {
    let mut objects = store
        .list("blobs/")
        .await
        .map_err(|e| SharedEvictionError::ListContent(Box::new(e)))?;
    objects.extend(
        store
            .list("manifests/")
            .await
            .map_err(|e| SharedEvictionError::ListContent(Box::new(e)))?,
    );
    let total: u64 = objects.iter().map(|o| o.size).sum();
    if total <= max_size {
        let plan = select_evictions(&objects, &HashMap::new(), protected, now, grace, max_size);
        return Ok(SharedEvictionPass {
            evicted: 0,
            total_after: plan.total_after,
            protected_bytes: plan.protected_bytes,
            pruned: 0,
        });
    }
    let records = read_last_use(store, now, grace).await?;
    let mut last_use = BTreeMap::new();
    for uses in records.iter().filter_map(|r| r.uses.as_ref()) {
        merge_uses(&mut last_use, uses.iter().map(|(k, t)| (k.clone(), *t)));
    }
    let last_use: HashMap<String, u64> = last_use.into_iter().collect();
    let plan = select_evictions(&objects, &last_use, protected, now, grace, max_size);
    let mut pass = SharedEvictionPass {
        evicted: 0,
        total_after: plan.total_before,
        protected_bytes: plan.protected_bytes,
        pruned: 0,
    };
    let sizes: HashMap<&str, u64> = objects.iter().map(|o| (o.key.as_str(), o.size)).collect();
    for key in &plan.delete {
        store
            .delete(key)
            .await
            .map_err(|e| SharedEvictionError::Delete(Box::new(e)))?;
        pass.evicted += 1;
        pass.total_after -= sizes.get(key.as_str()).copied().unwrap_or(0);
    }
    let deleted: HashSet<&str> = plan.delete.iter().map(String::as_str).collect();
    let existing: HashSet<&str> = objects
        .iter()
        .map(|o| o.key.as_str())
        .filter(|k| !deleted.contains(k))
        .collect();
    for record in &records {
        pass.pruned += prune_record(store, record, &existing, now, grace).await?;
    }
    Ok(pass)
}

/// Removes the stale entries of one record (re-read just before the write, so a flush that
/// landed since the pass read it is kept); deletes a record left empty, or an old corrupt one.
async fn prune_record(
    store: &SharedStore,
    record: &LastUseRecord,
    existing: &HashSet<&str>,
    now: u64,
    grace: Duration,
) -> Result<u64, SharedEvictionError> {
    let prune_err = |source| SharedEvictionError::PruneLastUse {
        key: record.key.clone(),
        source: Box::new(source),
    };
    if let Some(uses) = &record.uses {
        if stale_entries(uses, existing, now, grace).is_empty() {
            return Ok(0);
        }
    }
    let Some(bytes) = store.read_object(&record.key).await.map_err(prune_err)? else {
        return Ok(0);
    };
    let mut current = match (decode_record(&bytes), &record.uses) {
        (Ok(current), _) => current,
        // Still the old corrupt record: no use in it is within the grace period.
        (Err(_), None) => {
            store.delete(&record.key).await.map_err(prune_err)?;
            return Ok(0);
        }
        // Readable when the pass read it, corrupt now: its replica rewrites it at its next flush.
        (Err(_), Some(_)) => return Ok(0),
    };
    let stale = stale_entries(&current, existing, now, grace);
    for key in &stale {
        current.remove(key);
    }
    if current.is_empty() {
        store.delete(&record.key).await.map_err(prune_err)?;
    } else {
        store
            .write_object(&record.key, encode_record(&current))
            .await
            .map_err(prune_err)?;
    }
    Ok(stale.len() as u64)
}

/// Splits the key of a tag record below `repositories/<registry>/` into repository and tag.
/// Pure.
pub fn parse_tag_key(relative: &str) -> Option<(&str, &str)> {
    let (repository, file) = relative.rsplit_once("/_tags/")?;
    let tag = file.strip_suffix(".json")?;
    (!repository.is_empty() && !tag.is_empty() && !tag.contains('/')).then_some((repository, tag))
}

/// The manifests pinned tags of the shared tier point at, and the manifests pinned by digest.
/// A corrupt tag record pins nothing (as a missing one would not).
async fn pinned_roots(
    store: &SharedStore,
    pins: &PinRules,
) -> Result<Vec<Digest>, SharedEvictionError> {
    let mut roots: Vec<Digest> = pins.digests().cloned().collect();
    for registry in pins.registries() {
        let base = format!("repositories/{registry}/");
        let listed = store
            .list(&base)
            .await
            .map_err(|e| SharedEvictionError::ReadPinned(Box::new(e)))?;
        for object in listed {
            let Some((repository, tag)) = object.key.strip_prefix(&base).and_then(parse_tag_key)
            else {
                continue;
            };
            if !pins.is_pinned(registry, repository, tag) {
                continue;
            }
            let record = store
                .read_object(&object.key)
                .await
                .map_err(|e| SharedEvictionError::ReadPinned(Box::new(e)))?
                .and_then(|bytes| serde_json::from_slice::<TagRecord>(&bytes).ok());
            if let Some(record) = record {
                roots.push(record.digest);
            }
        }
    }
    Ok(roots)
}

/// Reads the manifests of the shared tier the walk from `roots` reaches. The walk itself is
/// `pinning::protected_content`, run once per round over what was read so far: each round reads
/// the manifests it asked for and did not get, and the walk follows at most `MAX_DEPTH` levels,
/// so [`PIN_WALK_ROUNDS`] rounds read everything it needs. A manifest that is missing or
/// corrupt (its bytes do not match its digest) is read as absent: it protects nothing.
async fn reachable_manifests(
    store: &SharedStore,
    roots: &[Digest],
) -> Result<HashMap<Digest, Option<ManifestBytes>>, SharedEvictionError> {
    let mut read: HashMap<Digest, Option<ManifestBytes>> = HashMap::new();
    for _ in 0..PIN_WALK_ROUNDS {
        let wanted = RefCell::new(BTreeSet::new());
        pinning::protected_content(roots.iter().cloned(), |digest| match read.get(digest) {
            Some(manifest) => manifest.clone(),
            None => {
                wanted.borrow_mut().insert(digest.clone());
                None
            }
        });
        let wanted = wanted.into_inner();
        if wanted.is_empty() {
            break;
        }
        for digest in wanted {
            let manifest = match store.read_manifest(&digest).await {
                Ok(found) => found.map(|m| ManifestBytes {
                    media_type: m.media_type,
                    bytes: m.bytes.to_vec(),
                }),
                Err(SharedStoreError::Corrupt { key, message }) => {
                    tracing::warn!(
                        key,
                        message,
                        "a pinned manifest is corrupt; it protects nothing"
                    );
                    None
                }
                Err(e) => return Err(SharedEvictionError::ReadPinned(Box::new(e))),
            };
            read.insert(digest, manifest);
        }
    }
    Ok(read)
}

/// The keys (`manifests/…`, `blobs/…`) that `pins` reach in the shared tier right now: from
/// its tag records and manifests, by the same walk as the disk cache's
/// (`pinning::protected_content`). An error means the set is unknown: do not evict then.
pub async fn protected_keys(
    store: &SharedStore,
    pins: &PinRules,
) -> Result<HashSet<String>, SharedEvictionError> {
    if pins.is_empty() {
        return Ok(HashSet::new());
    }
    let roots = pinned_roots(store, pins).await?;
    let read = reachable_manifests(store, &roots).await?;
    let protected = pinning::protected_content(roots, |digest| read.get(digest).cloned().flatten());
    let manifests = protected.manifests.iter().map(manifest_key);
    let blobs = protected.blobs.iter().map(blob_key);
    Ok(manifests.chain(blobs).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);
    const NOW: u64 = 1_000_000;

    fn object(key: &str, size: u64, modified: u64) -> SharedObject {
        SharedObject {
            key: key.to_owned(),
            size,
            modified,
        }
    }

    fn keys(list: &[&str]) -> HashSet<String> {
        list.iter().map(|k| (*k).to_owned()).collect()
    }

    /// Four 10-byte blobs `a`..`d`, written an hour ago in that order.
    fn four_objects() -> Vec<SharedObject> {
        ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, k)| object(k, 10, NOW - 3600 + i as u64))
            .collect()
    }

    #[test]
    fn under_the_bound_nothing_is_selected() {
        let plan = select_evictions(
            &four_objects(),
            &HashMap::new(),
            &HashSet::new(),
            NOW,
            GRACE,
            40,
        );
        assert!(plan.delete.is_empty());
        assert_eq!((plan.total_before, plan.total_after), (40, 40));
    }

    #[test]
    fn the_least_recently_used_go_first_and_recorded_uses_count() {
        // `a` is the oldest write but was used 10 minutes ago: `b` and `c` are the LRU ones.
        let last_use = HashMap::from([("a".to_owned(), NOW - 600)]);
        let plan = select_evictions(&four_objects(), &last_use, &HashSet::new(), NOW, GRACE, 20);
        assert_eq!(plan.delete, ["b", "c"]);
        assert_eq!(plan.total_after, 20);
    }

    #[test]
    fn protected_and_recently_used_or_written_objects_are_kept_even_over_the_bound() {
        let mut objects = four_objects();
        // `e` was written 30 s ago: within the grace period.
        objects.push(object("e", 10, NOW - 30));
        // `b` was used 59 s ago (within grace); `c` 60 s ago (just outside).
        let last_use = HashMap::from([("b".to_owned(), NOW - 59), ("c".to_owned(), NOW - 60)]);
        let plan = select_evictions(&objects, &last_use, &keys(&["a"]), NOW, GRACE, 0);
        assert_eq!(plan.delete, ["d", "c"]);
        assert_eq!(plan.total_after, 30);
        assert_eq!(plan.protected_bytes, 10);
    }

    #[test]
    fn a_use_in_the_future_of_the_evictors_clock_counts_as_recent() {
        let last_use = HashMap::from([("a".to_owned(), NOW + 5)]);
        let plan = select_evictions(&four_objects(), &last_use, &HashSet::new(), NOW, GRACE, 0);
        assert_eq!(plan.delete, ["b", "c", "d"]);
    }

    #[test]
    fn ties_within_one_second_are_broken_by_key() {
        let objects = vec![object("z", 10, 5), object("m", 10, 5), object("a", 10, 5)];
        let plan = select_evictions(&objects, &HashMap::new(), &HashSet::new(), NOW, GRACE, 10);
        assert_eq!(plan.delete, ["a", "m"]);
    }

    #[test]
    fn stale_entries_are_old_entries_of_objects_that_are_gone() {
        let uses = BTreeMap::from([
            ("kept".to_owned(), NOW - 3600),
            ("gone".to_owned(), NOW - 3600),
            ("gone-but-recent".to_owned(), NOW - 10),
        ]);
        let existing = HashSet::from(["kept"]);
        assert_eq!(stale_entries(&uses, &existing, NOW, GRACE), ["gone"]);
    }

    #[test]
    fn merging_keeps_the_later_use_and_records_round_trip() {
        let mut record = BTreeMap::from([("a".to_owned(), 5), ("b".to_owned(), 9)]);
        merge_uses(&mut record, [("a".to_owned(), 7), ("b".to_owned(), 3)]);
        assert_eq!(
            record,
            BTreeMap::from([("a".to_owned(), 7), ("b".to_owned(), 9)])
        );
        assert_eq!(decode_record(&encode_record(&record)).unwrap(), record);
        assert!(decode_record(b"[1,2]").is_err());
    }

    #[test]
    fn replica_ids_must_be_one_safe_key_component() {
        assert_eq!(
            last_use_key("mirror-0").unwrap(),
            "_cachalot/last-use/mirror-0.json"
        );
        for bad in ["", ".", "..", "a/b", "http://x:5000", &"x".repeat(129)] {
            assert!(last_use_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tag_keys_split_into_repository_and_tag() {
        assert_eq!(
            parse_tag_key("library/alpine/_tags/3.19.json"),
            Some(("library/alpine", "3.19"))
        );
        assert_eq!(parse_tag_key("library/alpine/_tags/3.19"), None);
        assert_eq!(parse_tag_key("_tags/x.json"), None);
        assert_eq!(parse_tag_key("a/_tags/b/c.json"), None);
    }

    #[test]
    fn notes_keep_the_latest_use_of_a_key() {
        let notes = SharedLastUse::new();
        notes.note_at("a", 9);
        notes.note_at("a", 4);
        notes.note("b");
        assert_eq!(notes.pending(), 2);
        assert_eq!(notes.lock().new.get("a"), Some(&9));
    }
}
