//! `tags/list`: the upstream's full list of a repository's tags, cached in memory under the
//! freshness rules and paginated here as the distribution spec says (`n`, `last`, and a `Link`
//! header with `rel="next"` while more remain).
//!
//! Invariants: a list is fetched whole (following the upstream's own `Link` pages, but only by
//! their `n` and `last` parameters, so the next page is always asked of the configured upstream,
//! never of a host a header names), at most [`MAX_PAGES`] pages and [`MAX_LIST_BYTES`] bytes; it
//! is kept sorted and without duplicates, so `last` means "after this tag" whatever order the
//! upstream used. The cache holds at most [`MAX_LISTS`] lists and [`MAX_CACHED_BYTES`] bytes,
//! dropping the oldest fetched first. Lists live in memory only: a restart forgets them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, Method};

use super::ProxyError;
use crate::oci::RepositoryName;
use crate::upstream::{Target, Upstream};

/// Upstream pages followed at most for one list.
pub const MAX_PAGES: usize = 100;
/// Bytes of upstream bodies read at most for one list (about 100 000 tags).
pub const MAX_LIST_BYTES: usize = 4 * 1024 * 1024;
/// Lists cached at most.
pub const MAX_LISTS: usize = 1024;
/// Bytes of tag names cached at most, across lists.
pub const MAX_CACHED_BYTES: usize = 32 * 1024 * 1024;

/// A repository's full tag list, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagList {
    /// The repository name as the upstream spells it.
    pub name: String,
    pub tags: Vec<String>,
}

impl TagList {
    fn bytes(&self) -> usize {
        self.name.len() + self.tags.iter().map(|t| t.len() + 24).sum::<usize>()
    }
}

/// The tags of one page: those after `last` (all when `None`), at most `n` of them (all when
/// `None`), and whether more remain after the page. Pure.
pub fn page<'a>(tags: &'a [String], n: Option<usize>, last: Option<&str>) -> (&'a [String], bool) {
    let start = last.map_or(0, |last| tags.partition_point(|t| t.as_str() <= last));
    let rest = &tags[start..];
    match n {
        Some(n) if n < rest.len() => (&rest[..n], n > 0),
        _ => (rest, false),
    }
}

/// The `n` and `last` of a `Link: <…>; rel="next"` header value, if it has a next page. Pure.
pub fn next_page(link: &str) -> Option<(Option<String>, Option<String>)> {
    link.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let is_next = params.split(';').any(|p| {
            let p = p.trim().replace(' ', "");
            p.eq_ignore_ascii_case("rel=\"next\"") || p.eq_ignore_ascii_case("rel=next")
        });
        if !is_next {
            return None;
        }
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        let (path, query) = target.split_once('?')?;
        if !path.ends_with("/tags/list") {
            return None;
        }
        let mut n = None;
        let mut last = None;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "n" => n = Some(v.into_owned()),
                "last" => last = Some(v.into_owned()),
                _ => {}
            }
        }
        last.is_some().then_some((n, last))
    })
}

#[derive(Debug, serde::Deserialize)]
struct TagsBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
}

fn invalid(upstream: &Upstream, message: String) -> ProxyError {
    ProxyError::TagsListInvalid {
        registry: upstream.name().to_owned(),
        message,
    }
}

/// Fetches a repository's whole tag list from the upstream.
pub async fn fetch_all(
    upstream: &Upstream,
    repo: &RepositoryName,
    idle: Duration,
) -> Result<TagList, ProxyError> {
    let mut tags = Vec::new();
    let mut name = None;
    let mut read = 0usize;
    let mut next: Option<(Option<String>, Option<String>)> = Some((None, None));
    let mut pages = 0usize;
    while let Some((n, last)) = next.take() {
        pages += 1;
        if pages > MAX_PAGES {
            return Err(invalid(
                upstream,
                format!("the tag list has more than {MAX_PAGES} pages"),
            ));
        }
        let target = Target::Tags {
            n: n.as_deref(),
            last: last.as_deref(),
        };
        let response = upstream.send(Method::GET, repo, target).await?;
        let link = response
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let too_large = invalid(
            upstream,
            format!("the tag list is larger than {} MiB", MAX_LIST_BYTES >> 20),
        );
        let body = super::read_bounded_body(
            upstream.name(),
            response,
            MAX_LIST_BYTES.saturating_sub(read),
            idle,
            too_large,
        )
        .await?;
        read += body.len();
        let parsed: TagsBody = serde_json::from_slice(&body)
            .map_err(|e| invalid(upstream, format!("the tag list is not valid JSON: {e}")))?;
        name = name.or(parsed.name);
        tags.extend(parsed.tags.unwrap_or_default());
        next = link.as_deref().and_then(next_page);
        // A page that does not move forward would be asked for again and again.
        if next.as_ref().is_some_and(|(_, l)| *l == last) {
            next = None;
        }
    }
    tags.sort_unstable();
    tags.dedup();
    Ok(TagList {
        name: name.unwrap_or_else(|| repo.to_string()),
        tags,
    })
}

#[derive(Debug)]
struct Cached {
    list: Arc<TagList>,
    fetched: Instant,
    bytes: usize,
}

/// Tag lists by (registry, repository).
#[derive(Debug, Default)]
pub struct TagListCache {
    lists: Mutex<HashMap<(String, RepositoryName), Cached>>,
}

impl TagListCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, RepositoryName), Cached>> {
        self.lists.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached list and when it was fetched.
    pub fn get(&self, registry: &str, repo: &RepositoryName) -> Option<(Arc<TagList>, Instant)> {
        self.lock()
            .get(&(registry.to_owned(), repo.clone()))
            .map(|c| (Arc::clone(&c.list), c.fetched))
    }

    /// Caches `list`, dropping the oldest lists while over a bound.
    pub fn put(&self, registry: &str, repo: &RepositoryName, list: Arc<TagList>, now: Instant) {
        let bytes = list.bytes();
        if bytes > MAX_CACHED_BYTES {
            return;
        }
        let mut lists = self.lock();
        let key = (registry.to_owned(), repo.clone());
        lists.remove(&key);
        let mut total: usize = lists.values().map(|c| c.bytes).sum();
        while !lists.is_empty() && (lists.len() >= MAX_LISTS || total + bytes > MAX_CACHED_BYTES) {
            let Some(oldest) = lists
                .iter()
                .min_by_key(|(_, c)| c.fetched)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(dropped) = lists.remove(&oldest) {
                total -= dropped.bytes;
            }
        }
        lists.insert(
            key,
            Cached {
                list,
                fetched: now,
                bytes,
            },
        );
    }

    /// Lists held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tags(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn pages_follow_n_and_last_in_lexical_order() {
        let all = tags(&["a", "b", "c", "d", "e"]);
        assert_eq!(page(&all, None, None), (&all[..], false));
        assert_eq!(page(&all, Some(2), None), (&all[..2], true));
        assert_eq!(page(&all, Some(2), Some("b")), (&all[2..4], true));
        assert_eq!(page(&all, Some(2), Some("d")), (&all[4..], false));
        assert_eq!(page(&all, Some(10), Some("bb")), (&all[2..], false));
        assert_eq!(page(&all, None, Some("e")).0.len(), 0);
        assert_eq!(page(&all, Some(0), None), (&all[..0], false));
    }

    #[test]
    fn the_next_page_comes_from_the_link_query_only() {
        assert_eq!(
            next_page(r#"</v2/library/x/tags/list?n=50&last=v1.2>; rel="next""#),
            Some((Some("50".into()), Some("v1.2".into())))
        );
        assert_eq!(
            next_page(r#"<https://elsewhere.example/v2/x/tags/list?last=b%2Bc>; rel=next"#),
            Some((None, Some("b+c".into())))
        );
        assert_eq!(
            next_page(r#"</v2/x/tags/list?n=1&last=a>; rel="prev""#),
            None
        );
        assert_eq!(next_page(r#"</v2/x/tags/list?n=1>; rel="next""#), None);
        assert_eq!(next_page(r#"</v2/_catalog?last=a>; rel="next""#), None);
        assert_eq!(next_page("garbage"), None);
    }

    #[test]
    fn the_cache_keeps_lists_within_its_bounds() {
        let cache = TagListCache::default();
        let repo: RepositoryName = "library/x".parse().unwrap();
        let t0 = Instant::now();
        let list = Arc::new(TagList {
            name: "library/x".into(),
            tags: tags(&["a"]),
        });
        for i in 0..(MAX_LISTS + 10) {
            let repo: RepositoryName = format!("r{i}").parse().unwrap();
            cache.put(
                "docker.io",
                &repo,
                Arc::clone(&list),
                t0 + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(cache.len(), MAX_LISTS);
        assert!(
            cache.get("docker.io", &"r0".parse().unwrap()).is_none(),
            "oldest dropped"
        );
        cache.put("docker.io", &repo, Arc::clone(&list), t0);
        assert_eq!(cache.get("docker.io", &repo).unwrap().0.tags, ["a"]);
        let huge = Arc::new(TagList {
            name: "h".into(),
            tags: vec!["x".repeat(1024); MAX_CACHED_BYTES / 1024],
        });
        cache.put("docker.io", &repo, huge, t0);
        assert!(cache.len() <= MAX_LISTS);
    }
}
