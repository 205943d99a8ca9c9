//! A spoke follows its parent's purge log (see `purge_log`): the parent cannot reach the spoke
//! (NAT, another cluster), so the spoke pulls.
//!
//! - Every answer of the parent carries its log position ([`crate::purge_log::SEQ_HEADER`]);
//!   the upstream layer hands it to [`PurgeSignal::observe`], which only records it and wakes
//!   the follower: the pull that carried the header never waits for the purge.
//! - One follower task per spoke process ([`run`]) fetches the entries it lacks through the
//!   parent's public pull API (`GET /v2/_cachalot/purges?after=&epoch=`, with the spoke's
//!   client certificate or token), one bounded page at a time and at most [`MAX_PAGES`] pages a
//!   round; so there is at most one fetch in flight per parent.
//! - Each entry is applied as a local purge, the admin purge's own code path
//!   ([`crate::proxy::ProxyInner::purge`]), and recorded in this mirror's own purge log, so
//!   the spoke's own spokes get it in turn (a chain). What is not cached here, or pinned here,
//!   is recorded all the same (a spoke further down may hold it); a registry this mirror does
//!   not serve is skipped. With `cluster` replicas (`S3` storage), the replica that applies an
//!   entry forwards it to the other replicas as the admin purge does (`purge_fanout`), so a
//!   replica that does not talk to the parent itself drops it too. A storage failure stops the
//!   round; the entry is retried on the next
//!   header (at most every [`RETRY_AFTER`]) or poll. The applied entries of a page are
//!   recorded with one write of the log file.
//! - A gap (the parent's log was truncated past the spoke's position, or the parent has a log
//!   this spoke has no position in: a new epoch after the parent lost its storage, or a first
//!   contact) cannot be repaired entry by entry: the spoke expires every cached tag record on
//!   its disk and in its bucket with `S3` storage (`checked_at` 0: the next pull of each tag revalidates it with the parent, a HEAD,
//!   and nothing is deleted), applies the entries still listed, and starts a new epoch of its
//!   own log so its own spokes do the same. Digest purges lost in the gap are not applied.
//! - The spoke remembers the last applied seq of up to [`MAX_EPOCHS`] parent epochs (a parent
//!   of several replicas has one log each) in [`FILE`] in its store directory, so a spoke
//!   restart resumes where it was.
//! - Without any header for [`POLL_INTERVAL`], the follower asks once anyway, so a spoke that
//!   serves only cache hits still learns of purges.
//!
//! Failures are logged, counted (`parent_purge_sync_failures_total`, `/stats`
//! `parentPurges.failures` and `lastError`) and retried; they never fail a pull.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::api::purge_fanout::PurgeFanout;
use crate::oci::ImageRef;
use crate::proxy::purge::PurgeError;
use crate::proxy::ProxyInner;
use crate::purge_log::{Entry, Epoch, Page, Position};
use crate::upstream::{Upstream, UpstreamError};

/// The follower's state file in the store directory.
pub const FILE: &str = "parent-purges.json";
/// Most parent epochs remembered (the one used longest ago is forgotten beyond).
pub const MAX_EPOCHS: usize = 16;
/// Most pages fetched in one round: a whole log, and some.
pub const MAX_PAGES: usize = crate::purge_log::MAX_ENTRIES / crate::purge_log::PAGE_SIZE + 3;
/// How long without a header before the follower asks anyway.
pub const POLL_INTERVAL: Duration = Duration::from_secs(300);
/// How long after a failed round a header may start the next one.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
/// The largest page body read.
const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// The latest log position the parent announced, and the wake-up of the follower.
#[derive(Debug, Default)]
pub struct PurgeSignal {
    seen: Mutex<Option<Position>>,
    wake: Notify,
}

impl PurgeSignal {
    /// Notes the position in an answer of the parent (if any) and wakes the follower. Cheap:
    /// a header parse and a lock; wake-ups coalesce.
    pub fn observe(&self, headers: &http::HeaderMap) {
        let Some(position) = Position::from_headers(headers) else {
            return;
        };
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(position);
        }
        self.wake.notify_one();
    }

    /// The last position announced.
    pub fn seen(&self) -> Option<Position> {
        self.seen.lock().ok().and_then(|s| *s)
    }
}

/// What the spoke applied of one parent epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub seq: u64,
    /// Unix seconds of the last use of this epoch (which one to forget first).
    pub used: u64,
}

/// The follower's memory: the last applied seq per parent epoch. Pure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub applied: BTreeMap<Epoch, Applied>,
}

impl SyncState {
    pub fn applied(&self, epoch: Epoch) -> Option<u64> {
        self.applied.get(&epoch).map(|a| a.seq)
    }

    /// Whether the parent at `seen` has entries this spoke has not applied.
    pub fn needs(&self, seen: Position) -> bool {
        self.applied(seen.epoch).is_none_or(|seq| seq < seen.seq)
    }

    /// The epoch used last, for a poll without a header.
    pub fn most_recent(&self) -> Option<Epoch> {
        self.applied
            .iter()
            .max_by_key(|(_, a)| a.used)
            .map(|(e, _)| *e)
    }

    /// Records `seq` of `epoch` applied at `now` (never going back); forgets the epoch used
    /// longest ago beyond [`MAX_EPOCHS`].
    pub fn set(&mut self, epoch: Epoch, seq: u64, now: u64) {
        let entry = self
            .applied
            .entry(epoch)
            .or_insert(Applied { seq, used: now });
        entry.seq = entry.seq.max(seq);
        entry.used = entry.used.max(now);
        while self.applied.len() > MAX_EPOCHS {
            let Some(oldest) = self
                .applied
                .iter()
                .filter(|(e, _)| **e != epoch)
                .min_by_key(|(_, a)| a.used)
                .map(|(e, _)| *e)
            else {
                break;
            };
            self.applied.remove(&oldest);
        }
    }
}

/// What to do with a page that answered a request for `asked`. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageAction {
    /// Another log answered (a replica of the parent) that this spoke knows: ask that one from
    /// its own position.
    AskAgain(Epoch),
    /// Apply the entries; `expire_first` when entries are missing (gap or unknown log).
    Apply { expire_first: bool },
}

/// Decides what a page means for this spoke. Pure.
pub fn page_action(state: &SyncState, asked: Epoch, page: &Page) -> PageAction {
    let known = state.applied(page.epoch);
    if page.epoch != asked && known.is_some() {
        return PageAction::AskAgain(page.epoch);
    }
    PageAction::Apply {
        expire_first: page.gap || known.is_none(),
    }
}

/// The follower's figures in a spoke's `/stats` (`parentPurges`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentPurgeStats {
    /// The parent log epoch last synced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// The last seq of that epoch applied here.
    pub applied_seq: u64,
    /// The last position the parent announced (`<epoch>:<seq>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<String>,
    /// Entries applied since start.
    pub applied: u64,
    /// Gaps met since start (every cached tag expired each time).
    pub resets: u64,
    /// Rounds that failed since start.
    pub failures: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Unix seconds of the last round that completed (0: none yet).
    pub last_synced_at: u64,
}

/// Why a sync round stopped.
#[derive(Debug, thiserror::Error)]
pub enum SyncParentPurgesError {
    #[error("cannot fetch the parent's purge log: {0}")]
    Fetch(#[from] UpstreamError),
    #[error("the parent's purge log page is unreadable: {0}")]
    Page(#[from] serde_json::Error),
    #[error("cannot apply purge #{seq} of {reference}: {source}")]
    Apply {
        seq: u64,
        reference: String,
        source: PurgeError,
    },
    #[error("the parent's purge log kept answering with other logs; trying again later")]
    TooManyPages,
}

/// How one entry ended here.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EntryOutcome {
    /// Purged, not cached or pinned here: to record in this mirror's own log, as resolved.
    Record(String),
    /// A registry this mirror does not serve, or a reference that does not parse.
    Skipped,
}

/// The follower of one parent.
struct Follower {
    inner: Arc<ProxyInner>,
    parent: Arc<Upstream>,
    /// With `cluster` replicas: the other replicas, each purged as an admin purge would.
    fanout: Option<PurgeFanout>,
    state: SyncState,
    path: PathBuf,
}

impl Follower {
    async fn fetch(&self, after: u64, epoch: Option<Epoch>) -> Result<Page, SyncParentPurgesError> {
        let path = match epoch {
            Some(epoch) => format!(
                "{}?after={after}&epoch={epoch}",
                crate::purge_log::PAGE_PATH
            ),
            None => format!("{}?after={after}", crate::purge_log::PAGE_PATH),
        };
        let body = self.parent.get_from_parent(&path, MAX_PAGE_BYTES).await?;
        Ok(serde_json::from_slice(&body)?)
    }

    async fn apply(&self, entry: &Entry) -> Result<EntryOutcome, SyncParentPurgesError> {
        let Ok(image) = entry.reference.parse::<ImageRef>() else {
            tracing::warn!(seq = entry.seq, reference = %entry.reference, "parent purge names no valid reference; skipped");
            return Ok(EntryOutcome::Skipped);
        };
        match self.inner.purge(&image).await {
            Ok(_) => self.forward(&image).await,
            Err(PurgeError::NotCached(_)) => {
                tracing::debug!(reference = %image, "parent purge: not cached here");
                self.forward(&image).await;
            }
            // Every replica has the same pins and registries: none is forwarded.
            Err(PurgeError::Pinned(_)) => {
                tracing::info!(reference = %image, "parent purge: pinned here, kept")
            }
            Err(PurgeError::NotMirrored(_)) => return Ok(EntryOutcome::Skipped),
            Err(source) => {
                return Err(SyncParentPurgesError::Apply {
                    seq: entry.seq,
                    reference: entry.reference.clone(),
                    source,
                })
            }
        }
        Ok(EntryOutcome::Record(image.to_string()))
    }

    /// With `cluster` replicas, purges `image` on every other replica as the admin purge does
    /// (each logs it too); a replica that cannot be reached is logged and keeps its copy, as
    /// with an admin purge.
    async fn forward(&self, image: &ImageRef) {
        if let Some(fanout) = &self.fanout {
            fanout.forward_all(image).await;
        }
    }

    /// Expires every cached tag record on disk (on the blocking pool: it reads and writes one
    /// small file per tag) and, with `S3` storage, in the bucket (a newer record there would
    /// otherwise win over the expired local one); the count. A bucket that fails is logged:
    /// its records then expire by their own window.
    async fn expire_tags(&self) -> u64 {
        let store = Arc::clone(&self.inner.store);
        let registries: Vec<String> = self.inner.upstreams.names().map(str::to_owned).collect();
        let names = registries.clone();
        let mut expired = tokio::task::spawn_blocking(move || {
            names.iter().map(|r| store.expire_tags(r)).sum::<u64>()
        })
        .await
        .unwrap_or(0);
        if let Some(shared) = &self.inner.shared {
            for registry in &registries {
                match shared.expire_tags(registry).await {
                    Ok(n) => expired += n,
                    Err(e) => {
                        tracing::warn!(registry, error = %e, "cannot expire the tag records in the shared storage; they expire by their own window")
                    }
                }
            }
        }
        expired
    }

    fn persist(&self) {
        if let Err(e) = crate::purge_log::write_file(&self.path, &self.state) {
            tracing::warn!(error = %e, "cannot record the applied parent purges; a restart applies them again");
        }
    }

    /// One round: fetches and applies pages until the parent's log is applied (bounded).
    async fn sync(&mut self, mut target: Epoch) -> Result<(), SyncParentPurgesError> {
        for _ in 0..MAX_PAGES {
            let known = self.state.applied(target);
            let page = self
                .fetch(known.unwrap_or(0), known.map(|_| target))
                .await?;
            let expire_first = match page_action(&self.state, target, &page) {
                PageAction::AskAgain(epoch) => {
                    target = epoch;
                    continue;
                }
                PageAction::Apply { expire_first } => expire_first,
            };
            if expire_first {
                let expired = self.expire_tags().await;
                let own = self.inner.purge_log.new_epoch();
                self.inner.telemetry.note_parent_purge_reset();
                tracing::info!(parent_epoch = %page.epoch, expired, own_epoch = %own.epoch, "parent purge log has entries this spoke missed (new log, or truncated): every cached tag expired, revalidated on its next pull");
            }
            let now = crate::store::now_secs();
            let mut result = Ok(());
            let mut applied = Vec::new();
            for entry in &page.entries {
                match self.apply(entry).await {
                    Ok(outcome) => {
                        if let EntryOutcome::Record(reference) = outcome {
                            self.inner.telemetry.note_parent_purge_applied();
                            applied.push(reference);
                        }
                        self.state.set(page.epoch, entry.seq, now);
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            // Into this mirror's own log, for its own spokes: one write per page.
            self.inner.purge_log.record_all(&applied);
            if result.is_ok() && !page.more {
                self.state.set(page.epoch, page.latest, now);
            } else if expire_first && self.state.applied(page.epoch).is_none() {
                // Expired already: this log is known from here on, even if nothing applied.
                self.state.set(page.epoch, 0, now);
            }
            self.persist();
            self.inner
                .telemetry
                .set_parent_purge_position(page.epoch, self.state.applied(page.epoch).unwrap_or(0));
            result?;
            if !page.more {
                return Ok(());
            }
            target = page.epoch;
        }
        Err(SyncParentPurgesError::TooManyPages)
    }
}

/// Follows the parent's purge log until the task is aborted (at shutdown). `parent` is any of
/// the upstreams that go through the parent (they share its address and credentials).
pub async fn run(
    inner: Arc<ProxyInner>,
    signal: Arc<PurgeSignal>,
    parent: Arc<Upstream>,
    fanout: Option<PurgeFanout>,
) {
    let path = inner.store.root().join(FILE);
    let state = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "applied parent purges unreadable; the next sync expires the cached tags once");
            SyncState::default()
        }),
        Err(_) => SyncState::default(),
    };
    if let Some(epoch) = state.most_recent() {
        inner
            .telemetry
            .set_parent_purge_position(epoch, state.applied(epoch).unwrap_or(0));
    }
    let mut follower = Follower {
        inner,
        parent,
        fanout,
        state,
        path,
    };
    let mut failed_at: Option<Instant> = None;
    loop {
        let woke = tokio::time::timeout(POLL_INTERVAL, signal.wake.notified()).await;
        let seen = signal.seen();
        if let Some(seen) = seen {
            follower
                .inner
                .telemetry
                .set_parent_purge_seen(&seen.to_string());
        }
        let target = match (woke, seen) {
            (Ok(()), Some(seen)) if follower.state.needs(seen) => seen.epoch,
            // Up to date (or a wake-up without a position).
            (Ok(()), _) => continue,
            // No header for a while: ask anyway, if this spoke ever heard of a log.
            (Err(_), _) => match follower.state.most_recent() {
                Some(epoch) => epoch,
                None => continue,
            },
        };
        if let Some(at) = failed_at {
            // Not more often than every RETRY_AFTER; the wait is this task's alone.
            tokio::time::sleep(RETRY_AFTER.saturating_sub(at.elapsed())).await;
        }
        match follower.sync(target).await {
            Ok(()) => {
                failed_at = None;
                follower.inner.telemetry.note_parent_purge_synced(None);
            }
            Err(e) => {
                failed_at = Some(Instant::now());
                tracing::warn!(error = %e, "parent purges not applied; retrying on the parent's next answer");
                follower
                    .inner
                    .telemetry
                    .note_parent_purge_synced(Some(e.to_string()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn page(epoch: u64, latest: u64, gap: bool) -> Page {
        Page {
            epoch: Epoch(epoch),
            latest,
            gap,
            entries: Vec::new(),
            more: false,
        }
    }

    #[test]
    fn a_spoke_needs_a_sync_when_behind_or_when_the_log_is_new_to_it() {
        let mut s = SyncState::default();
        let at = |seq| Position {
            epoch: Epoch(1),
            seq,
        };
        assert!(s.needs(at(0)), "an unknown log, even empty");
        s.set(Epoch(1), 3, 10);
        assert!(!s.needs(at(3)));
        assert!(!s.needs(at(2)));
        assert!(s.needs(at(4)));
        s.set(Epoch(1), 2, 11);
        assert_eq!(s.applied(Epoch(1)), Some(3), "never goes back");
    }

    #[test]
    fn the_state_keeps_at_most_max_epochs_and_forgets_the_one_used_longest_ago() {
        let mut s = SyncState::default();
        for i in 0..MAX_EPOCHS as u64 {
            s.set(Epoch(i), 1, 100 + i);
        }
        s.set(Epoch(0), 2, 1_000);
        s.set(Epoch(99), 1, 1_001);
        assert_eq!(s.applied.len(), MAX_EPOCHS);
        assert!(s.applied(Epoch(0)).is_some());
        assert!(s.applied(Epoch(1)).is_none(), "used longest ago");
        assert_eq!(s.most_recent(), Some(Epoch(99)));
    }

    #[test]
    fn a_page_is_applied_expired_first_on_a_gap_or_an_unknown_log_and_asked_again_for_a_known_one()
    {
        let mut s = SyncState::default();
        assert_eq!(
            page_action(&s, Epoch(1), &page(1, 0, false)),
            PageAction::Apply { expire_first: true },
            "first contact"
        );
        s.set(Epoch(1), 5, 10);
        assert_eq!(
            page_action(&s, Epoch(1), &page(1, 7, false)),
            PageAction::Apply {
                expire_first: false
            }
        );
        assert_eq!(
            page_action(&s, Epoch(1), &page(1, 7, true)),
            PageAction::Apply { expire_first: true },
            "truncated past this spoke"
        );
        assert_eq!(
            page_action(&s, Epoch(1), &page(2, 7, true)),
            PageAction::Apply { expire_first: true },
            "a new log"
        );
        s.set(Epoch(2), 1, 11);
        assert_eq!(
            page_action(&s, Epoch(1), &page(2, 7, true)),
            PageAction::AskAgain(Epoch(2)),
            "another replica's log this spoke knows"
        );
    }

    #[test]
    fn the_signal_keeps_the_latest_position_and_ignores_bad_headers() {
        let signal = PurgeSignal::default();
        let mut h = http::HeaderMap::new();
        signal.observe(&h);
        assert_eq!(signal.seen(), None);
        h.insert(
            crate::purge_log::SEQ_HEADER,
            http::HeaderValue::from_static("00000000000000ff:3"),
        );
        signal.observe(&h);
        h.insert(
            crate::purge_log::SEQ_HEADER,
            http::HeaderValue::from_static("bogus"),
        );
        signal.observe(&h);
        assert_eq!(
            signal.seen(),
            Some(Position {
                epoch: Epoch(0xff),
                seq: 3
            })
        );
    }
}
