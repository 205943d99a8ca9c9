//! Parsing of the upstream's pull-budget headers (`ratelimit-limit`, `ratelimit-remaining`,
//! `docker-ratelimit-source`). Pure: headers in, [`Budget`] out.

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

/// The budget described by a response's headers, if it carries `ratelimit-remaining`.
pub fn budget_from_headers(headers: &HeaderMap) -> Option<Budget> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (remaining, remaining_window) = parse_quota(get("ratelimit-remaining")?)?;
    let limit = get("ratelimit-limit").and_then(parse_quota);
    Some(Budget {
        limit: limit.map(|(n, _)| n),
        remaining,
        window_seconds: remaining_window.or(limit.and_then(|(_, w)| w)),
        source: get("docker-ratelimit-source").map(str::to_owned),
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
        let b = budget_from_headers(&h).unwrap();
        assert_eq!(b.limit, Some(100));
        assert_eq!(b.remaining, 76);
        assert_eq!(b.window_seconds, Some(21600));
        assert_eq!(b.source.as_deref(), Some("192.0.2.1"));
    }

    #[test]
    fn missing_or_garbled_headers_give_no_budget() {
        assert!(budget_from_headers(&HeaderMap::new()).is_none());
        let mut h = HeaderMap::new();
        h.insert("ratelimit-remaining", "lots".parse().unwrap());
        assert!(budget_from_headers(&h).is_none());
        assert_eq!(parse_quota("5"), Some((5, None)));
        assert_eq!(parse_quota(" 7 ; w=60"), Some((7, Some(60))));
    }
}
