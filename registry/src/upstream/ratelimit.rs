//! Parsing of the upstream's pull-budget headers (`ratelimit-limit`, `ratelimit-remaining`,
//! `docker-ratelimit-source`), `Retry-After` and the other numeric headers (`Age`, a relayed
//! budget's age, `Content-Length`), and when a free HEAD should refresh an expired figure. Pure:
//! headers and times in, values out.

use http::HeaderMap;

use crate::telemetry::Budget;

/// Parses `N` or `N;w=SECONDS` into the number and the window.
pub fn parse_quota(value: &str) -> Option<(u64, Option<u64>)> {
    let mut parts = value.split(';');
    let n = parts.next()?.trim().parse().ok()?;
    let window = parts.find_map(|p| {
        p.trim()
            .strip_prefix("w=")
            .and_then(|w| w.trim().parse().ok())
    });
    Some((n, window))
}

/// Shortest pause between two refreshes of an expired figure, whatever they found: an upstream
/// that stopped sending the headers is asked at most this often.
pub const REFRESH_RETRY_SECS: u64 = 60;

/// Whether a free HEAD should refresh the budget at `now` (unix seconds): the last figure is
/// older than its window, and no refresh started in the last [`REFRESH_RETRY_SECS`]
/// (`last_refresh` 0: never). A registry that never sent a figure is not asked.
pub fn refresh_due(budget: Option<&Budget>, last_refresh: u64, now: u64) -> bool {
    budget.is_some_and(|b| b.expired_at(now))
        && (last_refresh == 0 || now >= last_refresh.saturating_add(REFRESH_RETRY_SECS))
}

/// The number in header `name` (seconds, a length), if present and well formed: digits only,
/// surrounding white space ignored. Pure.
pub fn numeric_header(headers: &HeaderMap, name: impl http::header::AsHeaderName) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// `Retry-After` in seconds (the delta-seconds form; an HTTP date is not used by registries).
pub fn retry_after_secs(headers: &HeaderMap) -> Option<u64> {
    numeric_header(headers, http::header::RETRY_AFTER)
}

/// The budget described by a response's headers received at `now` (unix seconds), if it
/// carries `ratelimit-remaining`.
pub fn budget_from_headers(headers: &HeaderMap, now: u64) -> Option<Budget> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (remaining, remaining_window) = parse_quota(get("ratelimit-remaining")?)?;
    let limit = get("ratelimit-limit").and_then(parse_quota);
    Some(Budget {
        limit: limit.map(|(n, _)| n),
        remaining,
        window_seconds: remaining_window.or(limit.and_then(|(_, w)| w)),
        source: get("docker-ratelimit-source").map(str::to_owned),
        observed_at: now,
        expired: false,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn docker_hub_headers_give_limit_remaining_window_and_source() {
        let mut h = HeaderMap::new();
        h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        h.insert("ratelimit-remaining", "76;w=21600".parse().unwrap());
        h.insert("docker-ratelimit-source", "192.0.2.1".parse().unwrap());
        let b = budget_from_headers(&h, 1_000).unwrap();
        assert_eq!(b.limit, Some(100));
        assert_eq!(b.remaining, 76);
        assert_eq!(b.window_seconds, Some(21600));
        assert_eq!(b.source.as_deref(), Some("192.0.2.1"));
        assert_eq!(b.observed_at, 1_000);
    }

    #[test]
    fn an_expired_figure_is_refreshed_at_most_once_a_minute_and_a_missing_one_never() {
        let figure = Budget {
            remaining: 5,
            window_seconds: Some(100),
            observed_at: 1_000,
            ..Budget::default()
        };
        assert!(!refresh_due(Some(&figure), 0, 1_099), "still current");
        assert!(refresh_due(Some(&figure), 0, 1_100));
        assert!(
            !refresh_due(Some(&figure), 1_100, 1_159),
            "a refresh just started"
        );
        assert!(refresh_due(Some(&figure), 1_100, 1_160));
        assert!(
            !refresh_due(None, 0, 5_000),
            "no figure, nothing to refresh"
        );
    }

    #[test]
    fn missing_or_garbled_headers_give_no_budget() {
        assert!(budget_from_headers(&HeaderMap::new(), 1).is_none());
        let mut h = HeaderMap::new();
        h.insert("ratelimit-remaining", "lots".parse().unwrap());
        assert!(budget_from_headers(&h, 1).is_none());
        h.insert("retry-after", " 30 ".parse().unwrap());
        assert_eq!(retry_after_secs(&h), Some(30));
        assert_eq!(parse_quota("5"), Some((5, None)));
        assert_eq!(parse_quota(" 7 ; w=60"), Some((7, Some(60))));
    }
}
