//! Hub and spoke: what a hub learns about the spokes that pull through it, and what a spoke
//! learns from its hub.
//!
//! - A spoke names itself on every request to its parent with [`SPOKE_HEADER`] (its
//!   `parent.spokeId`); the hub counts each spoke's requests in a bounded [`SpokeTable`], listed
//!   under `spokes` in `/stats`.
//! - A hub's manifest answers carry its upstream's last known pull budget (the fleet's budget:
//!   only the hub spends it) as `ratelimit-*` headers plus [`BUDGET_AGE`], so a spoke's
//!   `/stats` and status show the budget that matters and its `budgetReserve` protects it.
//! - A hub's tag answers carry `Age` (seconds since the hub last confirmed the tag upstream): a
//!   spoke dates its copy that much earlier, so the two freshness windows do not add up. `Age`
//!   is relative, so clusters with skewed clocks agree.
//!
//! Everything here is pure or a small locked table; the HTTP layers call it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::telemetry::{Budget, CacheResult};

/// Request header by which a spoke names itself to its hub.
pub const SPOKE_HEADER: &str = "x-cachalot-spoke";
/// Response header: how many seconds before the answer the hub observed the budget it relays.
pub const BUDGET_AGE: &str = "x-cachalot-budget-age";
/// Longest spoke id accepted.
pub const MAX_SPOKE_ID_LEN: usize = 128;
/// Most spokes a hub tracks; beyond it the one seen longest ago is forgotten, so a client that
/// invents ids cannot grow the table.
pub const MAX_SPOKES: usize = 256;

/// Why a spoke id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSpokeIdError {
    #[error("a spoke id must not be empty")]
    Empty,
    #[error("a spoke id is at most {MAX_SPOKE_ID_LEN} characters")]
    TooLong,
    #[error("a spoke id may contain letters, digits and `.`, `_`, `-`, `/`, `:`, `@` only")]
    Character,
}

/// Checks a spoke id: 1 to [`MAX_SPOKE_ID_LEN`] characters of `[A-Za-z0-9._/:@-]`, so it is
/// safe in a header, a log line and a status field. Pure.
pub fn parse_spoke_id(id: &str) -> Result<&str, ParseSpokeIdError> {
    if id.is_empty() {
        return Err(ParseSpokeIdError::Empty);
    }
    if id.len() > MAX_SPOKE_ID_LEN {
        return Err(ParseSpokeIdError::TooLong);
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._/:@-".contains(&b))
    {
        return Err(ParseSpokeIdError::Character);
    }
    Ok(id)
}

/// The spoke id used when `parent.spokeId` is not set: the host name, reduced to the allowed
/// characters (`cachalot` when nothing is left).
pub fn default_spoke_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    sanitized_spoke_id(&raw)
}

/// `raw` reduced to a valid spoke id. Pure.
fn sanitized_spoke_id(raw: &str) -> String {
    let id: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._/:@-".contains(*c))
        .take(MAX_SPOKE_ID_LEN)
        .collect();
    if id.is_empty() {
        "cachalot".to_owned()
    } else {
        id
    }
}

/// The spoke a request came from: its [`SPOKE_HEADER`], when present and valid. Pure.
pub fn spoke_of(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(SPOKE_HEADER)?.to_str().ok()?;
    parse_spoke_id(value).ok()
}

/// One spoke as the hub saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpokeStats {
    /// Distribution API requests the spoke sent (each is one of its cache misses or
    /// revalidations).
    pub requests: u64,
    /// Of those, answered from the hub's cache.
    pub hits: u64,
    /// Of those, fetched from the upstream by the hub.
    pub misses: u64,
    /// Of those, not served (an error status).
    pub errors: u64,
    /// Unix seconds of the spoke's last request.
    pub last_seen: u64,
}

/// The hub's bounded table of spokes.
#[derive(Debug, Default)]
pub struct SpokeTable {
    spokes: Mutex<HashMap<String, SpokeStats>>,
}

impl SpokeTable {
    /// Counts one request of `spoke` at `now` (unix seconds) and how it was served (`None`:
    /// not a cache lookup, e.g. `/v2/`, counted as a request only).
    pub fn record(&self, spoke: &str, served: Option<CacheResult>, now: u64) {
        let Ok(mut spokes) = self.spokes.lock() else {
            return;
        };
        if !spokes.contains_key(spoke) && spokes.len() >= MAX_SPOKES {
            let oldest = spokes
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                spokes.remove(&oldest);
            }
        }
        let entry = spokes.entry(spoke.to_owned()).or_default();
        entry.requests += 1;
        match served {
            Some(CacheResult::Hit | CacheResult::Stale) => entry.hits += 1,
            Some(CacheResult::Miss) => entry.misses += 1,
            Some(CacheResult::Error) => entry.errors += 1,
            None => {}
        }
        entry.last_seen = entry.last_seen.max(now);
    }

    /// Every tracked spoke, by id.
    pub fn snapshot(&self) -> BTreeMap<String, SpokeStats> {
        self.spokes
            .lock()
            .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}

/// The headers by which a hub relays its upstream's budget (as observed at
/// `budget.observed_at`) in an answer sent at `now`: `ratelimit-remaining`, `ratelimit-limit`
/// (with their window) and [`BUDGET_AGE`]. Nothing for an expired figure, which says nothing
/// about the budget any more. `docker-ratelimit-source` (the NAT's public address) is not
/// relayed. Pure.
pub fn budget_headers(budget: &Budget, now: u64) -> Vec<(HeaderName, HeaderValue)> {
    if budget.expired_at(now) {
        return Vec::new();
    }
    let quota = |n: u64| match budget.window_seconds {
        Some(w) => HeaderValue::from_str(&format!("{n};w={w}")),
        None => HeaderValue::from_str(&n.to_string()),
    };
    let mut headers = Vec::with_capacity(3);
    if let Ok(v) = quota(budget.remaining) {
        headers.push((HeaderName::from_static("ratelimit-remaining"), v));
    }
    if let Some(Ok(v)) = budget.limit.map(quota) {
        headers.push((HeaderName::from_static("ratelimit-limit"), v));
    }
    let age = if budget.observed_at == 0 {
        0
    } else {
        now.saturating_sub(budget.observed_at)
    };
    headers.push((HeaderName::from_static(BUDGET_AGE), HeaderValue::from(age)));
    headers
}

/// When an answer received at `now` that is `age` seconds old was current: never in the
/// future, never before the epoch. Pure.
pub fn dated_back(now: u64, age: u64) -> u64 {
    now.saturating_sub(age)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn spoke_ids_are_short_and_plain() {
        assert_eq!(
            parse_spoke_id("cluster-b/cachalot/spoke"),
            Ok("cluster-b/cachalot/spoke")
        );
        assert_eq!(parse_spoke_id("ns/name@a1b2:c"), Ok("ns/name@a1b2:c"));
        assert_eq!(parse_spoke_id(""), Err(ParseSpokeIdError::Empty));
        assert_eq!(
            parse_spoke_id(&"a".repeat(MAX_SPOKE_ID_LEN + 1)),
            Err(ParseSpokeIdError::TooLong)
        );
        for bad in ["a b", "a\"b", "a\nb", "ä", "a;b", "a,b"] {
            assert_eq!(
                parse_spoke_id(bad),
                Err(ParseSpokeIdError::Character),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_host_name_becomes_a_valid_spoke_id() {
        assert_eq!(sanitized_spoke_id("node-1.example\n"), "node-1.example");
        assert_eq!(sanitized_spoke_id(" \n"), "cachalot");
        assert_eq!(sanitized_spoke_id(&"h".repeat(300)).len(), MAX_SPOKE_ID_LEN);
        assert!(parse_spoke_id(&default_spoke_id()).is_ok());
    }

    #[test]
    fn a_missing_or_invalid_header_names_no_spoke() {
        let mut h = HeaderMap::new();
        assert_eq!(spoke_of(&h), None);
        h.insert(SPOKE_HEADER, HeaderValue::from_static("x y"));
        assert_eq!(spoke_of(&h), None);
        h.insert(SPOKE_HEADER, HeaderValue::from_static("b/ns/s"));
        assert_eq!(spoke_of(&h), Some("b/ns/s"));
    }

    #[test]
    fn the_table_counts_per_spoke_and_keeps_the_latest_time() {
        let t = SpokeTable::default();
        t.record("a", Some(CacheResult::Hit), 10);
        t.record("a", Some(CacheResult::Miss), 12);
        t.record("a", Some(CacheResult::Stale), 11);
        t.record("a", None, 9);
        t.record("b", Some(CacheResult::Error), 5);
        let s = t.snapshot();
        assert_eq!(
            s["a"],
            SpokeStats {
                requests: 4,
                hits: 2,
                misses: 1,
                errors: 0,
                last_seen: 12
            }
        );
        assert_eq!(s["b"].errors, 1);
        assert_eq!(s["b"].last_seen, 5);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_spoke_seen_longest_ago() {
        let t = SpokeTable::default();
        for i in 0..MAX_SPOKES as u64 {
            t.record(&format!("s{i}"), None, 100 + i);
        }
        t.record("s0", None, 1_000); // s1 is now the one seen longest ago
        t.record("new", None, 1_001);
        let s = t.snapshot();
        assert_eq!(s.len(), MAX_SPOKES);
        assert!(s.contains_key("new"));
        assert!(s.contains_key("s0"));
        assert!(!s.contains_key("s1"));
    }

    #[test]
    fn a_current_budget_is_relayed_with_its_age_and_without_the_source() {
        let b = Budget {
            limit: Some(100),
            remaining: 76,
            window_seconds: Some(21_600),
            source: Some("192.0.2.1".into()),
            observed_at: 1_000,
            expired: false,
        };
        let headers: HeaderMap = budget_headers(&b, 1_030).into_iter().collect();
        assert_eq!(headers["ratelimit-remaining"], "76;w=21600");
        assert_eq!(headers["ratelimit-limit"], "100;w=21600");
        assert_eq!(headers[BUDGET_AGE], "30");
        assert!(!headers.contains_key("docker-ratelimit-source"));
        // What the spoke parses back is the hub's figure, dated when the hub observed it.
        let relayed = crate::upstream::ratelimit::budget_from_headers(&headers, 1_030).unwrap();
        assert_eq!((relayed.remaining, relayed.limit), (76, Some(100)));
        assert_eq!(
            dated_back(
                1_030,
                crate::upstream::ratelimit::numeric_header(&headers, BUDGET_AGE).unwrap()
            ),
            1_000
        );
    }

    #[test]
    fn an_expired_budget_is_not_relayed() {
        let b = Budget {
            remaining: 5,
            window_seconds: Some(100),
            observed_at: 1_000,
            ..Budget::default()
        };
        assert!(budget_headers(&b, 1_100).is_empty());
        assert_eq!(budget_headers(&b, 1_099).len(), 2);
    }

    #[test]
    fn ages_are_parsed_strictly_and_never_date_into_the_future() {
        use crate::upstream::ratelimit::numeric_header;
        let mut h = HeaderMap::new();
        h.insert("age", HeaderValue::from_static("42"));
        assert_eq!(numeric_header(&h, "age"), Some(42));
        h.insert("age", HeaderValue::from_static("-1"));
        assert_eq!(numeric_header(&h, "age"), None);
        h.insert("age", HeaderValue::from_static("soon"));
        assert_eq!(numeric_header(&h, "age"), None);
        assert_eq!(dated_back(100, 42), 58);
        assert_eq!(dated_back(100, u64::MAX), 0);
    }
}
