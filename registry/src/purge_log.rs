//! The purge log: what this mirror purged recently, for its spokes to pull (a hub cannot reach
//! spokes that sit behind NAT in other clusters, so it never pushes).
//!
//! - Every purge (the admin purge, a purge forwarded by a `cluster` replica, and a purge a spoke
//!   applied from its own parent, so a chain hub → spoke → spoke passes it on) appends an entry
//!   `{seq, ref, at}`; `seq` grows by one per entry and never goes back within an epoch.
//! - The log is bounded: at most [`MAX_ENTRIES`] entries, none older than [`MAX_AGE_SECS`].
//! - The log has an epoch, a random 64-bit id drawn when the log is created. The log is kept in
//!   the store's directory ([`FILE`], rewritten on each entry): a restart on the same storage
//!   keeps epoch, seq and entries; a mirror on new storage (an `emptyDir` pod replaced) starts a
//!   new epoch, so its spokes can tell that what they knew of the old log says nothing any more.
//! - Every answer to a spoke carries [`SEQ_HEADER`] `<epoch>:<seq>` (the latest entry); a spoke
//!   behind fetches the entries after its own position from [`PAGE_PATH`] (one bounded page of
//!   at most [`PAGE_SIZE`] entries at a time). The page says `gap: true` when entries the spoke
//!   needs are gone (the log was truncated, or the epoch differs): the spoke then treats every
//!   cached tag as expired (see `purge_sync`).
//!
//! The page exposes the references purged and their times, nothing else. Everything but the
//! file I/O is pure ([`LogState`]).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Mutex;

use http::HeaderValue;
use serde::{Deserialize, Serialize};

/// Response header on every answer to a spoke: `<epoch>:<seq>` of the latest entry.
pub const SEQ_HEADER: &str = "x-cachalot-purge-seq";
/// Where spokes fetch the entries (`?after=<seq>[&epoch=<epoch>]`), on the public listener.
pub const PAGE_PATH: &str = "/v2/_cachalot/purges";
/// Most entries kept.
pub const MAX_ENTRIES: usize = 1024;
/// Oldest entry kept (24 h).
pub const MAX_AGE_SECS: u64 = 24 * 3600;
/// Most entries in one page.
pub const PAGE_SIZE: usize = 100;
/// The log's file in the store directory.
pub const FILE: &str = "purge-log.json";

/// A log's identity: a new one for every new log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(pub u64);

impl Epoch {
    /// A fresh random epoch.
    #[must_use]
    pub fn random() -> Epoch {
        Epoch(rand::random())
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Why an epoch or position is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParsePositionError {
    #[error("an epoch is 16 hexadecimal digits")]
    Epoch,
    #[error("a purge log position is `<epoch>:<seq>`")]
    Shape,
    #[error("a purge seq is a non-negative integer")]
    Seq,
}

impl std::str::FromStr for Epoch {
    type Err = ParsePositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParsePositionError::Epoch);
        }
        u64::from_str_radix(s, 16)
            .map(Epoch)
            .map_err(|_| ParsePositionError::Epoch)
    }
}

impl Serialize for Epoch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Epoch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A position in a log: its epoch and the seq of its latest entry (0: none yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: Epoch,
    pub seq: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}

impl std::str::FromStr for Position {
    type Err = ParsePositionError;

    /// `<16 hex digits>:<decimal seq>`, strictly. Pure.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (epoch, seq) = s.trim().split_once(':').ok_or(ParsePositionError::Shape)?;
        let epoch = epoch.parse()?;
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParsePositionError::Seq);
        }
        let seq = seq.parse().map_err(|_| ParsePositionError::Seq)?;
        Ok(Position { epoch, seq })
    }
}

impl Position {
    /// The header value (always valid: hex digits, a colon and decimal digits).
    #[must_use]
    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The position a [`SEQ_HEADER`] announces, if present and well formed. Pure.
    #[must_use]
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Position> {
        headers.get(SEQ_HEADER)?.to_str().ok()?.parse().ok()
    }
}

/// One purge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// The reference as the purge resolved it (`docker.io/library/nginx:stable`,
    /// `docker.io/library/nginx@sha256:…`).
    #[serde(rename = "ref")]
    pub reference: String,
    /// Unix seconds of the purge.
    pub at: u64,
}

/// One page of the log, as `GET /v2/_cachalot/purges` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    pub epoch: Epoch,
    /// The seq of the latest entry.
    pub latest: u64,
    /// Entries the asker needs are gone: the epoch it named is not this log's, its `after` is
    /// beyond `latest`, or entries after it were dropped (bounds). The entries then start at
    /// the oldest kept.
    pub gap: bool,
    /// In seq order, at most [`PAGE_SIZE`].
    pub entries: Vec<Entry>,
    /// More entries follow the last one listed.
    pub more: bool,
}

/// What a log holds. Pure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogState {
    pub epoch: Epoch,
    /// The seq of the latest entry ever appended in this epoch (0: none).
    pub latest: u64,
    pub entries: VecDeque<Entry>,
}

impl LogState {
    /// An empty log with `epoch`.
    #[must_use]
    pub fn new(epoch: Epoch) -> LogState {
        LogState {
            epoch,
            latest: 0,
            entries: VecDeque::new(),
        }
    }

    #[must_use]
    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            seq: self.latest,
        }
    }

    /// Drops the entries older than [`MAX_AGE_SECS`] at `now`.
    pub fn prune(&mut self, now: u64) {
        while self
            .entries
            .front()
            .is_some_and(|e| e.at.saturating_add(MAX_AGE_SECS) <= now)
        {
            self.entries.pop_front();
        }
    }

    /// Appends a purge of `reference` at `now`; returns its seq. The oldest entries go beyond
    /// the bounds.
    pub fn append(&mut self, reference: &str, now: u64) -> u64 {
        self.prune(now);
        self.latest += 1;
        self.entries.push_back(Entry {
            seq: self.latest,
            reference: reference.to_owned(),
            at: now,
        });
        while self.entries.len() > MAX_ENTRIES {
            self.entries.pop_front();
        }
        self.latest
    }

    /// The page for an asker that has applied everything up to `after` of the log `epoch`
    /// (`None`: it names none), at `now`, at most `limit` entries.
    #[must_use]
    pub fn page(&self, after: u64, epoch: Option<Epoch>, now: u64, limit: usize) -> Page {
        let kept = self
            .entries
            .iter()
            .filter(|e| e.at.saturating_add(MAX_AGE_SECS) > now);
        let oldest = kept.clone().next().map_or(self.latest + 1, |e| e.seq);
        let gap = epoch.is_some_and(|e| e != self.epoch)
            || after > self.latest
            || after.saturating_add(1) < oldest;
        let from = if gap { 0 } else { after };
        let mut wanted = kept.filter(|e| e.seq > from);
        let entries: Vec<Entry> = wanted.by_ref().take(limit).cloned().collect();
        let more = wanted.next().is_some();
        Page {
            epoch: self.epoch,
            latest: self.latest,
            gap,
            entries,
            more,
        }
    }
}

/// The log's figures in `/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PurgeLogStats {
    pub epoch: String,
    pub seq: u64,
    /// Entries kept now.
    pub entries: usize,
}

/// Why the log's file could not be written (the log goes on in memory).
#[derive(Debug, thiserror::Error)]
pub enum PersistPurgeLogError {
    #[error("cannot write the purge log {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The log of a running mirror: [`LogState`] behind a lock, written to its file after each
/// change.
#[derive(Debug)]
pub struct PurgeLog {
    state: Mutex<LogState>,
    /// The file (`None`: in memory only, for tests).
    path: Option<PathBuf>,
}

impl PurgeLog {
    /// A log in memory only.
    #[must_use]
    pub fn in_memory() -> PurgeLog {
        PurgeLog {
            state: Mutex::new(LogState::new(Epoch::random())),
            path: None,
        }
    }

    /// The log kept in `dir` ([`FILE`]): as the file says, or a new epoch when there is none
    /// or it cannot be read (said in the log: spokes then see a new epoch).
    #[must_use]
    pub fn open(dir: &std::path::Path) -> PurgeLog {
        let path = dir.join(FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<LogState>(&bytes) {
                Ok(mut state) => {
                    state.prune(crate::store::now_secs());
                    tracing::info!(epoch = %state.epoch, seq = state.latest, entries = state.entries.len(), "purge log restored");
                    state
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "purge log unreadable; starting a new epoch (spokes expire their tags once)");
                    LogState::new(Epoch::random())
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LogState::new(Epoch::random()),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "purge log unreadable; starting a new epoch (spokes expire their tags once)");
                LogState::new(Epoch::random())
            }
        };
        PurgeLog {
            state: Mutex::new(state),
            path: Some(path),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut LogState) -> T) -> T {
        // A poisoned lock only means a panic mid-update of plain data: go on with it.
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// The latest position.
    pub fn position(&self) -> Position {
        self.with(|s| s.position())
    }

    /// Records a purge of `reference`; its position.
    pub fn record(&self, reference: &str) -> Position {
        self.record_all(&[reference.to_owned()])
    }

    /// Records purges of `references` in order, with one write of the file; the position.
    pub fn record_all(&self, references: &[String]) -> Position {
        let (position, snapshot) = self.with(|s| {
            let now = crate::store::now_secs();
            for reference in references {
                s.append(reference, now);
            }
            (s.position(), s.clone())
        });
        if !references.is_empty() {
            self.persist(&snapshot);
        }
        position
    }

    /// Starts a new epoch with no entries: what a spoke does when it missed entries of its
    /// parent, so its own spokes learn that they missed something too.
    pub fn new_epoch(&self) -> Position {
        let snapshot = self.with(|s| {
            *s = LogState::new(Epoch::random());
            s.clone()
        });
        self.persist(&snapshot);
        snapshot.position()
    }

    /// A page (see [`LogState::page`]).
    pub fn page(&self, after: u64, epoch: Option<Epoch>) -> Page {
        self.with(|s| s.page(after, epoch, crate::store::now_secs(), PAGE_SIZE))
    }

    pub fn stats(&self) -> PurgeLogStats {
        self.with(|s| PurgeLogStats {
            epoch: s.epoch.to_string(),
            seq: s.latest,
            entries: s.entries.len(),
        })
    }

    fn persist(&self, state: &LogState) {
        let Some(path) = &self.path else { return };
        if let Err(e) = write_file(path, state) {
            tracing::warn!(error = %e, "the purge log is kept in memory only until the next write succeeds; a restart would start a new epoch");
        }
    }
}

/// Writes `value` as JSON to `path` through a temporary file and a rename, so a crash leaves
/// the old or the new file, never half of one. The temporary file goes to the store's `tmp/`
/// beside `path` (emptied at startup) when there is one.
pub fn write_file<T: Serialize>(
    path: &std::path::Path,
    value: &T,
) -> Result<(), PersistPurgeLogError> {
    use std::io::Write as _;
    let error = |source| PersistPurgeLogError::Write {
        path: path.to_owned(),
        source,
    };
    let bytes = serde_json::to_vec(value).map_err(|e| error(std::io::Error::other(e)))?;
    let parent = path.parent().unwrap_or(std::path::Path::new("."));
    let tmp_dir = parent.join("tmp");
    let dir = if tmp_dir.is_dir() { &tmp_dir } else { parent };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(error)?;
    tmp.write_all(&bytes).map_err(error)?;
    tmp.as_file().sync_all().map_err(error)?;
    tmp.persist(path).map_err(|e| error(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn log_with(n: u64, at: u64) -> LogState {
        let mut log = LogState::new(Epoch(0xabc));
        for i in 0..n {
            log.append(&format!("docker.io/library/a:{i}"), at);
        }
        log
    }

    #[test]
    fn positions_round_trip_and_are_parsed_strictly() {
        let p = Position {
            epoch: Epoch(0x00ab_cdef_0123_4567),
            seq: 42,
        };
        assert_eq!(p.to_string(), "00abcdef01234567:42");
        assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        let mut headers = http::HeaderMap::new();
        headers.insert(SEQ_HEADER, p.header_value());
        assert_eq!(Position::from_headers(&headers), Some(p));
        for bad in [
            "",
            "42",
            "abc:1",
            "00abcdef0123456g:1",
            "00abcdef01234567:",
            "00abcdef01234567:-1",
            "00abcdef01234567:+1",
            "00abcdef01234567:1x",
            "00abcdef01234567:99999999999999999999999",
        ] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn seq_grows_by_one_and_the_log_keeps_at_most_max_entries() {
        let mut log = log_with(MAX_ENTRIES as u64 + 5, 1_000);
        assert_eq!(log.latest, MAX_ENTRIES as u64 + 5);
        assert_eq!(log.entries.len(), MAX_ENTRIES);
        assert_eq!(log.entries.front().unwrap().seq, 6);
        assert_eq!(
            log.append("docker.io/library/b:1", 1_001),
            MAX_ENTRIES as u64 + 6
        );
    }

    #[test]
    fn entries_older_than_the_max_age_go() {
        let mut log = log_with(3, 1_000);
        log.append("docker.io/library/new:1", 1_000 + MAX_AGE_SECS);
        let seqs: Vec<u64> = log.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [4]);
        // A page skips expired entries even before the next append prunes them.
        let log = log_with(3, 1_000);
        let page = log.page(0, Some(log.epoch), 1_000 + MAX_AGE_SECS, PAGE_SIZE);
        assert!(page.gap, "entries 1-3 are gone for an asker at 0");
        assert!(page.entries.is_empty());
    }

    #[test]
    fn a_page_lists_what_follows_after_bounded_and_says_when_more_follows() {
        let log = log_with(250, 1_000);
        let page = log.page(0, Some(log.epoch), 1_000, PAGE_SIZE);
        assert!(!page.gap);
        assert_eq!(page.entries.len(), PAGE_SIZE);
        assert_eq!(page.entries[0].seq, 1);
        assert!(page.more);
        let page = log.page(200, Some(log.epoch), 1_000, PAGE_SIZE);
        assert_eq!(page.entries.first().unwrap().seq, 201);
        assert_eq!(page.entries.len(), 50);
        assert!(!page.more);
        let page = log.page(250, None, 1_000, PAGE_SIZE);
        assert!(!page.gap && page.entries.is_empty() && !page.more);
        assert_eq!(page.latest, 250);
    }

    #[test]
    fn a_page_says_gap_for_another_epoch_a_truncated_log_or_an_asker_ahead() {
        let mut log = log_with(MAX_ENTRIES as u64 + 10, 1_000);
        // Entries 1-10 were dropped: an asker at 5 missed 6-10, one at 10 missed nothing.
        let page = log.page(5, Some(log.epoch), 1_000, PAGE_SIZE);
        assert!(page.gap);
        assert_eq!(page.entries[0].seq, 11, "from the oldest kept");
        assert!(!log.page(10, Some(log.epoch), 1_000, PAGE_SIZE).gap);
        // Another epoch: everything it knew says nothing here.
        let page = log.page(log.latest, Some(Epoch(1)), 1_000, PAGE_SIZE);
        assert!(page.gap);
        assert_eq!(page.entries[0].seq, 11);
        // An asker ahead of the log.
        assert!(log.page(log.latest + 1, None, 1_000, PAGE_SIZE).gap);
        // An empty new log: an asker at 0 is current.
        log = LogState::new(Epoch(7));
        assert!(!log.page(0, Some(Epoch(7)), 1_000, PAGE_SIZE).gap);
    }

    #[test]
    fn the_log_survives_a_restart_on_the_same_directory_and_not_on_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = PurgeLog::open(dir.path());
        log.record("docker.io/library/a:1");
        let before = log.record("docker.io/library/a:2");
        assert_eq!(before.seq, 2);
        let again = PurgeLog::open(dir.path());
        assert_eq!(again.position(), before);
        assert_eq!(again.page(1, Some(before.epoch)).entries.len(), 1);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(PurgeLog::open(other.path()).position().epoch, before.epoch);
        // A corrupt file starts a new epoch.
        std::fs::write(dir.path().join(FILE), b"{").unwrap();
        let fresh = PurgeLog::open(dir.path());
        assert_ne!(fresh.position().epoch, before.epoch);
        assert_eq!(fresh.position().seq, 0);
    }
}
