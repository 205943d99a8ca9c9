//! Metrics and stats: one place that counts, two ways to read it.
//!
//! Prometheus metrics (`/metrics`) use base-unit names and bounded labels only: the registry label
//! comes from the configured allowlist, `kind` and `result` are enums, `status` is an HTTP status
//! class of an upstream answer. Never a digest, repository or error text. The JSON stats (`/stats`)
//! are what the operator reads to fill `CacheEffective` and `UpstreamBudget`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::oci::Kind;

/// How a request was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CacheResult {
    /// Served from the cache (including requests coalesced onto an in-flight fetch).
    Hit,
    /// Fetched from upstream.
    Miss,
    /// Served from the cache after the upstream failed, rate-limited us, or the budget ran low.
    Stale,
    /// Not served.
    Error,
}

impl CacheResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
            CacheResult::Error => "error",
        }
    }

    /// The result an `X-Cache` header value names.
    pub fn from_header_value(value: &str) -> Option<CacheResult> {
        [
            CacheResult::Hit,
            CacheResult::Miss,
            CacheResult::Stale,
            CacheResult::Error,
        ]
        .into_iter()
        .find(|r| r.header_value() == value)
    }

    /// The value of the `X-Cache` response header.
    pub fn header_value(self) -> &'static str {
        match self {
            CacheResult::Hit => "HIT",
            CacheResult::Miss => "MISS",
            CacheResult::Stale => "STALE",
            CacheResult::Error => "ERROR",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    registry: String,
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    registry: String,
    method: &'static str,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryLabel {
    registry: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NegativeCacheLabels {
    registry: String,
    /// `tag`, `digest` or `tags`.
    kind: &'static str,
}

/// The upstream's pull budget as last reported by its `ratelimit-*` headers, and when.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    pub remaining: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Unix seconds when the upstream sent these figures; 0 in documents of registries that
    /// predate it (their figures are then taken as current, as before).
    #[serde(default)]
    pub observed_at: u64,
    /// In `/stats`: the figures are older than their window (see [`Budget::expired_at`]), so
    /// they no longer say anything about the budget. Not part of what is recorded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expired: bool,
}

impl Budget {
    /// Whether the figures are older than their window at `now` (unix seconds): every pull they
    /// counted has left the window since, so the budget is unknown until the upstream is asked
    /// again. Figures without a window or without an observation time never expire. Pure.
    pub fn expired_at(&self, now: u64) -> bool {
        match self.window_seconds {
            Some(window) if self.observed_at > 0 => {
                now >= self.observed_at.saturating_add(window.max(1))
            }
            _ => false,
        }
    }
}

/// The upstream answered 429 (the pull limit, or Docker Hub's abuse limit, a bare 429 without
/// `ratelimit-*` headers): when, and until when its `Retry-After` asked us to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimited {
    /// Unix seconds of the 429.
    pub observed_at: u64,
    /// Unix seconds until which the upstream asked not to be asked again: `Retry-After` (at most
    /// an hour), or a minute when it sent none.
    pub until: u64,
}

impl RateLimited {
    /// Longest wait taken from a `Retry-After` (as the circuit does).
    pub const MAX_WAIT_SECS: u64 = 3600;
    /// Wait assumed when a 429 carries no `Retry-After`.
    pub const DEFAULT_WAIT_SECS: u64 = 60;

    /// A 429 seen at `now` with the given `Retry-After` seconds. Pure.
    pub fn new(now: u64, retry_after_secs: Option<u64>) -> RateLimited {
        let wait = retry_after_secs
            .unwrap_or(Self::DEFAULT_WAIT_SECS)
            .min(Self::MAX_WAIT_SECS);
        RateLimited {
            observed_at: now,
            until: now.saturating_add(wait),
        }
    }

    /// Whether the wait is still in force at `now`.
    pub fn in_force_at(&self, now: u64) -> bool {
        now < self.until
    }
}

/// Per-registry counters in the stats document.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStats {
    pub hits: u64,
    pub misses: u64,
    pub stale: u64,
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// Whether requests to this upstream currently fail fast (circuit open).
    #[serde(default)]
    pub circuit_open: bool,
    /// The upstream's last 429, while its wait is in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limited: Option<RateLimited>,
}

/// One row of upstream request counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamRequestCount {
    pub registry: String,
    pub method: String,
    pub status: String,
    pub count: u64,
}

/// The JSON document served at `/stats`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub stale: u64,
    pub errors: u64,
    pub served_bytes: u64,
    pub upstream_bytes: u64,
    pub cache_size_bytes: u64,
    pub evictions: u64,
    /// Bytes pins (configured and the pin file) protected from eviction at the last eviction pass. Absent in
    /// documents of registries that predate pinning, hence the default.
    #[serde(default)]
    pub pinned_bytes: u64,
    pub upstream_requests: Vec<UpstreamRequestCount>,
    pub registries: BTreeMap<String, RegistryStats>,
    /// On a hub: the spokes that named themselves in their requests, by spoke id (see
    /// [`crate::fleet`]). Absent when none did.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub spokes: BTreeMap<String, crate::fleet::SpokeStats>,
    /// This mirror's purge log (what its spokes pull, see [`crate::purge_log`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purge_log: Option<crate::purge_log::PurgeLogStats>,
    /// On a spoke: how far it applied its parent's purge log (see [`crate::purge_sync`]).
    /// Absent without a parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_purges: Option<crate::purge_sync::ParentPurgeStats>,
}

impl StatsSnapshot {
    /// Share of served requests answered from the cache (stale serves count as cache answers);
    /// `None` before the first request.
    pub fn hit_ratio(&self) -> Option<f64> {
        let served = self.hits + self.stale + self.misses;
        (served > 0).then(|| (self.hits + self.stale) as f64 / served as f64)
    }

    /// Counts of upstream requests with the given method (all statuses).
    pub fn upstream_count(&self, method: &str) -> u64 {
        self.upstream_requests
            .iter()
            .filter(|r| r.method == method)
            .map(|r| r.count)
            .sum()
    }
}

#[derive(Default)]
struct RegistryCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
    errors: AtomicU64,
}

/// All counters of one registry process.
pub struct Telemetry {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    ratelimit_remaining: Family<RegistryLabel, Gauge>,
    ratelimit_limit: Family<RegistryLabel, Gauge>,
    ratelimit_observed: Family<RegistryLabel, Gauge>,
    served_bytes: Counter,
    upstream_bytes: Counter,
    cache_size: Gauge,
    evictions: Counter,
    pinned_bytes: Gauge,
    cache_write_failures: Family<RegistryLabel, Counter>,
    per_registry: BTreeMap<String, RegistryCounters>,
    upstream_rows: Mutex<BTreeMap<(String, &'static str, String), u64>>,
    budgets: Mutex<BTreeMap<String, Budget>>,
    rate_limits: Mutex<BTreeMap<String, RateLimited>>,
    circuits: Mutex<BTreeMap<String, bool>>,
    negative_cache_hits: Family<NegativeCacheLabels, Counter>,
    spokes: crate::fleet::SpokeTable,
    parent_purges: Mutex<Option<crate::purge_sync::ParentPurgeStats>>,
    parent_purges_applied: Counter,
    parent_purge_resets: Counter,
    parent_purge_failures: Counter,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Telemetry")
    }
}

impl Telemetry {
    /// Creates the metric families for the given (bounded) set of registry names.
    pub fn new<'a>(registries: impl IntoIterator<Item = &'a str>) -> Telemetry {
        let mut registry = Registry::with_prefix("cachalot_registry");
        let requests = Family::<RequestLabels, Counter>::default();
        let upstream_requests = Family::<UpstreamLabels, Counter>::default();
        let ratelimit_remaining = Family::<RegistryLabel, Gauge>::default();
        let ratelimit_limit = Family::<RegistryLabel, Gauge>::default();
        let ratelimit_observed = Family::<RegistryLabel, Gauge>::default();
        let served_bytes = Counter::default();
        let upstream_bytes = Counter::default();
        let cache_size = Gauge::default();
        let evictions = Counter::default();
        let pinned_bytes = Gauge::default();
        let cache_write_failures = Family::<RegistryLabel, Counter>::default();
        registry.register(
            "requests",
            "Client requests by registry, content kind and cache result",
            requests.clone(),
        );
        registry.register(
            "upstream_requests",
            "Requests sent to upstream registries by method and response status",
            upstream_requests.clone(),
        );
        registry.register(
            "ratelimit_remaining",
            "Remaining upstream pull budget from the last ratelimit-remaining header",
            ratelimit_remaining.clone(),
        );
        registry.register(
            "ratelimit_limit",
            "Upstream pull limit from the last ratelimit-limit header",
            ratelimit_limit.clone(),
        );
        registry.register(
            "ratelimit_observed_timestamp_seconds",
            "When the upstream last sent ratelimit headers (unix seconds); the remaining and limit gauges are dropped once their window has passed",
            ratelimit_observed.clone(),
        );
        registry.register(
            "served_bytes",
            "Bytes of manifests and blobs sent to clients",
            served_bytes.clone(),
        );
        registry.register(
            "upstream_bytes",
            "Bytes of manifests and blobs received from upstreams",
            upstream_bytes.clone(),
        );
        registry.register(
            "cache_size_bytes",
            "Bytes of content held in the cache",
            cache_size.clone(),
        );
        registry.register(
            "evictions",
            "Cache entries evicted to stay under the size bound",
            evictions.clone(),
        );
        registry.register(
            "pinned_bytes",
            "Bytes of cached content that pins (configured and the pin file) protect from eviction (at the last eviction pass)",
            pinned_bytes.clone(),
        );
        let negative_cache_hits = Family::<NegativeCacheLabels, Counter>::default();
        registry.register(
            "negative_cache_hits",
            "Requests answered with a remembered upstream 404 instead of asking the upstream again, by kind (tag, digest, tags)",
            negative_cache_hits.clone(),
        );
        registry.register(
            "cache_write_failures",
            "Cache writes that failed (full disk or another I/O error); the client was served from the upstream",
            cache_write_failures.clone(),
        );
        let parent_purges_applied = Counter::default();
        let parent_purge_resets = Counter::default();
        let parent_purge_failures = Counter::default();
        registry.register(
            "parent_purges_applied",
            "Entries of the parent's purge log applied here (a spoke)",
            parent_purges_applied.clone(),
        );
        registry.register(
            "parent_purge_resets",
            "Times a spoke found entries of its parent's purge log missing (new or truncated log) and expired every cached tag",
            parent_purge_resets.clone(),
        );
        registry.register(
            "parent_purge_sync_failures",
            "Rounds of fetching and applying the parent's purge log that failed (retried)",
            parent_purge_failures.clone(),
        );
        let per_registry = registries
            .into_iter()
            .map(|r| (r.to_owned(), RegistryCounters::default()))
            .collect();
        Telemetry {
            registry,
            requests,
            upstream_requests,
            ratelimit_remaining,
            ratelimit_limit,
            ratelimit_observed,
            served_bytes,
            upstream_bytes,
            cache_size,
            evictions,
            pinned_bytes,
            cache_write_failures,
            per_registry,
            upstream_rows: Mutex::new(BTreeMap::new()),
            budgets: Mutex::new(BTreeMap::new()),
            rate_limits: Mutex::new(BTreeMap::new()),
            circuits: Mutex::new(BTreeMap::new()),
            negative_cache_hits,
            spokes: crate::fleet::SpokeTable::default(),
            parent_purges: Mutex::new(None),
            parent_purges_applied,
            parent_purge_resets,
            parent_purge_failures,
        }
    }

    fn with_parent_purges(&self, f: impl FnOnce(&mut crate::purge_sync::ParentPurgeStats)) {
        if let Ok(mut stats) = self.parent_purges.lock() {
            f(stats.get_or_insert_with(Default::default));
        }
    }

    /// A spoke applied one entry of its parent's purge log.
    pub fn note_parent_purge_applied(&self) {
        self.parent_purges_applied.inc();
        self.with_parent_purges(|s| s.applied += 1);
    }

    /// A spoke met a gap in its parent's purge log.
    pub fn note_parent_purge_reset(&self) {
        self.parent_purge_resets.inc();
        self.with_parent_purges(|s| s.resets += 1);
    }

    /// How far a spoke applied its parent's log.
    pub fn set_parent_purge_position(&self, epoch: crate::purge_log::Epoch, seq: u64) {
        self.with_parent_purges(|s| {
            s.epoch = Some(epoch.to_string());
            s.applied_seq = seq;
        });
    }

    /// The last position the parent announced.
    pub fn set_parent_purge_seen(&self, seen: &str) {
        self.with_parent_purges(|s| s.seen = Some(seen.to_owned()));
    }

    /// A round of the purge follower ended (with its error, if it failed).
    pub fn note_parent_purge_synced(&self, error: Option<String>) {
        if error.is_some() {
            self.parent_purge_failures.inc();
        }
        let now = crate::store::now_secs();
        self.with_parent_purges(|s| match error {
            Some(e) => {
                s.failures += 1;
                s.last_error = Some(e);
            }
            None => {
                s.last_error = None;
                s.last_synced_at = now;
            }
        });
    }

    /// Counts one request a spoke sent to this hub (see [`crate::fleet::SpokeTable::record`]).
    pub fn record_spoke(&self, spoke: &str, served: Option<CacheResult>) {
        self.spokes.record(spoke, served, crate::store::now_secs());
    }

    /// The upstream budget last recorded for `registry`, if any.
    pub fn budget(&self, registry: &str) -> Option<Budget> {
        self.budgets.lock().ok()?.get(registry).cloned()
    }

    /// Counts one request answered from the negative cache; `kind` is `tag`, `digest` or `tags`.
    pub fn record_negative_hit(&self, registry: &str, kind: &'static str) {
        self.negative_cache_hits
            .get_or_create(&NegativeCacheLabels {
                registry: registry.to_owned(),
                kind,
            })
            .inc();
    }

    /// Counts one client request for content of `registry` (a configured name).
    pub fn record_request(&self, registry: &str, kind: Kind, result: CacheResult) {
        self.requests
            .get_or_create(&RequestLabels {
                registry: registry.to_owned(),
                kind: kind.as_str(),
                result: result.as_str(),
            })
            .inc();
        if let Some(c) = self.per_registry.get(registry) {
            let counter = match result {
                CacheResult::Hit => &c.hits,
                CacheResult::Miss => &c.misses,
                CacheResult::Stale => &c.stale,
                CacheResult::Error => &c.errors,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one request sent upstream; `status` is the HTTP status or `error` for no answer.
    pub fn record_upstream(&self, registry: &str, method: &'static str, status: &str) {
        self.upstream_requests
            .get_or_create(&UpstreamLabels {
                registry: registry.to_owned(),
                method,
                status: status.to_owned(),
            })
            .inc();
        if let Ok(mut rows) = self.upstream_rows.lock() {
            *rows
                .entry((registry.to_owned(), method, status.to_owned()))
                .or_default() += 1;
        }
    }

    pub fn record_budget(&self, registry: &str, budget: &Budget) {
        let label = RegistryLabel {
            registry: registry.to_owned(),
        };
        self.ratelimit_remaining
            .get_or_create(&label)
            .set(i64::try_from(budget.remaining).unwrap_or(i64::MAX));
        if let Some(limit) = budget.limit {
            self.ratelimit_limit
                .get_or_create(&label)
                .set(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        self.ratelimit_observed
            .get_or_create(&label)
            .set(i64::try_from(budget.observed_at).unwrap_or(i64::MAX));
        if let Ok(mut b) = self.budgets.lock() {
            b.insert(registry.to_owned(), budget.clone());
        }
    }

    /// Records a 429 from `registry`.
    pub fn record_rate_limited(&self, registry: &str, rate_limited: RateLimited) {
        if let Ok(mut r) = self.rate_limits.lock() {
            r.insert(registry.to_owned(), rate_limited);
        }
    }

    /// Drops the `ratelimit_remaining` and `ratelimit_limit` series of figures older than their
    /// window at `now`: a stale low figure must not keep an alert firing after the window reset.
    fn drop_expired_budget_gauges(&self, now: u64) {
        let budgets = self.budgets.lock().map(|b| b.clone()).unwrap_or_default();
        for (registry, budget) in budgets {
            if budget.expired_at(now) {
                let label = RegistryLabel { registry };
                self.ratelimit_remaining.remove(&label);
                self.ratelimit_limit.remove(&label);
            }
        }
    }

    pub fn record_circuit(&self, registry: &str, open: bool) {
        if let Ok(mut c) = self.circuits.lock() {
            c.insert(registry.to_owned(), open);
        }
    }

    pub fn add_served_bytes(&self, n: u64) {
        self.served_bytes.inc_by(n);
    }

    pub fn add_upstream_bytes(&self, n: u64) {
        self.upstream_bytes.inc_by(n);
    }

    pub fn set_cache_size(&self, bytes: u64) {
        self.cache_size
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub fn add_evictions(&self, n: u64) {
        self.evictions.inc_by(n);
    }

    /// Counts one failed cache write for `registry` (a configured name).
    pub fn add_cache_write_failure(&self, registry: &str) {
        self.cache_write_failures
            .get_or_create(&RegistryLabel {
                registry: registry.to_owned(),
            })
            .inc();
    }

    pub fn set_pinned_bytes(&self, bytes: u64) {
        self.pinned_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        self.drop_expired_budget_gauges(crate::store::now_secs());
        let mut out = String::new();
        // Encoding into a String cannot fail (fmt::Write for String is infallible).
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The stats document.
    pub fn snapshot(&self) -> StatsSnapshot {
        self.snapshot_at(crate::store::now_secs())
    }

    /// The stats document as of `now` (unix seconds): which budget figures have expired and which
    /// 429 waits are still in force.
    pub fn snapshot_at(&self, now: u64) -> StatsSnapshot {
        let budgets = self.budgets.lock().map(|b| b.clone()).unwrap_or_default();
        let rate_limits = self
            .rate_limits
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default();
        let circuits = self.circuits.lock().map(|c| c.clone()).unwrap_or_default();
        let mut snap = StatsSnapshot {
            served_bytes: self.served_bytes.get(),
            upstream_bytes: self.upstream_bytes.get(),
            cache_size_bytes: u64::try_from(self.cache_size.get()).unwrap_or(0),
            evictions: self.evictions.get(),
            pinned_bytes: u64::try_from(self.pinned_bytes.get()).unwrap_or(0),
            ..StatsSnapshot::default()
        };
        for (name, c) in &self.per_registry {
            let r = RegistryStats {
                hits: c.hits.load(Ordering::Relaxed),
                misses: c.misses.load(Ordering::Relaxed),
                stale: c.stale.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                budget: budgets.get(name).cloned().map(|mut b| {
                    b.expired = b.expired_at(now);
                    b
                }),
                circuit_open: circuits.get(name).copied().unwrap_or(false),
                rate_limited: rate_limits
                    .get(name)
                    .copied()
                    .filter(|r| r.in_force_at(now)),
            };
            snap.hits += r.hits;
            snap.misses += r.misses;
            snap.stale += r.stale;
            snap.errors += r.errors;
            snap.registries.insert(name.clone(), r);
        }
        if let Ok(rows) = self.upstream_rows.lock() {
            snap.upstream_requests = rows
                .iter()
                .map(|((registry, method, status), count)| UpstreamRequestCount {
                    registry: registry.clone(),
                    method: (*method).to_owned(),
                    status: status.clone(),
                    count: *count,
                })
                .collect();
        }
        snap.spokes = self.spokes.snapshot();
        snap.parent_purges = self.parent_purges.lock().ok().and_then(|s| s.clone());
        snap
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_are_counted_in_metrics_and_stats_alike() {
        let t = Telemetry::new(["docker.io", "quay.io"]);
        t.record_request("docker.io", Kind::Manifest, CacheResult::Hit);
        t.record_request("docker.io", Kind::Blob, CacheResult::Miss);
        t.record_request("quay.io", Kind::Blob, CacheResult::Stale);
        t.record_upstream("docker.io", "GET", "200");
        t.record_budget(
            "docker.io",
            &Budget {
                limit: Some(100),
                remaining: 42,
                window_seconds: Some(21600),
                source: None,
                observed_at: crate::store::now_secs(),
                expired: false,
            },
        );
        let snap = t.snapshot();
        assert_eq!((snap.hits, snap.misses, snap.stale), (1, 1, 1));
        assert_eq!(
            snap.registries["docker.io"]
                .budget
                .as_ref()
                .unwrap()
                .remaining,
            42
        );
        assert_eq!(snap.upstream_count("GET"), 1);
        assert!((snap.hit_ratio().unwrap() - 2.0 / 3.0).abs() < 1e-9);
        let text = t.encode();
        assert!(text.contains(
            r#"cachalot_registry_requests_total{registry="docker.io",kind="manifest",result="hit"} 1"#
        ), "{text}");
        assert!(text.contains(r#"cachalot_registry_ratelimit_remaining{registry="docker.io"} 42"#));
    }

    #[test]
    fn negative_cache_hits_are_counted_by_registry_and_kind() {
        let t = Telemetry::new(["docker.io"]);
        t.record_negative_hit("docker.io", "tag");
        t.record_negative_hit("docker.io", "tag");
        let text = t.encode();
        assert!(
            text.contains(
                r#"cachalot_registry_negative_cache_hits_total{registry="docker.io",kind="tag"} 2"#
            ),
            "{text}"
        );
    }

    #[test]
    fn a_budget_figure_expires_once_its_window_has_passed() {
        let figure = Budget {
            limit: Some(100),
            remaining: 3,
            window_seconds: Some(600),
            observed_at: 1_000,
            ..Budget::default()
        };
        assert!(!figure.expired_at(1_599));
        assert!(figure.expired_at(1_600));
        let no_window = Budget {
            window_seconds: None,
            ..figure.clone()
        };
        assert!(!no_window.expired_at(u64::MAX));
        let from_an_older_registry = Budget {
            observed_at: 0,
            ..figure.clone()
        };
        assert!(!from_an_older_registry.expired_at(u64::MAX));

        let t = Telemetry::new(["docker.io"]);
        t.record_budget("docker.io", &figure);
        let at = |now| {
            t.snapshot_at(now).registries["docker.io"]
                .budget
                .clone()
                .unwrap()
        };
        assert!(!at(1_599).expired);
        assert!(at(1_600).expired);
        assert_eq!(at(1_600).observed_at, 1_000, "observedAt is stable");
        // Long expired by now: the series go, the observation time stays for alerts on age.
        let text = t.encode();
        assert!(
            text.contains(
                r#"cachalot_registry_ratelimit_observed_timestamp_seconds{registry="docker.io"} 1000"#
            ),
            "{text}"
        );
        assert!(
            !text.contains("cachalot_registry_ratelimit_remaining{"),
            "{text}"
        );
    }

    #[test]
    fn a_429_is_reported_rate_limited_until_its_retry_after_has_passed() {
        assert_eq!(
            RateLimited::new(1_000, Some(30)),
            RateLimited {
                observed_at: 1_000,
                until: 1_030
            }
        );
        assert_eq!(RateLimited::new(1_000, None).until, 1_060);
        assert_eq!(RateLimited::new(1_000, Some(86_400)).until, 4_600);
        let t = Telemetry::new(["docker.io"]);
        t.record_rate_limited("docker.io", RateLimited::new(1_000, Some(30)));
        let at = |now| t.snapshot_at(now).registries["docker.io"].rate_limited;
        assert_eq!(at(1_029).map(|r| r.until), Some(1_030));
        assert_eq!(at(1_030), None);
    }

    #[test]
    fn pinned_bytes_show_in_metrics_and_stats() {
        let t = Telemetry::new(["docker.io"]);
        t.set_pinned_bytes(4096);
        assert_eq!(t.snapshot().pinned_bytes, 4096);
        assert!(t.encode().contains("cachalot_registry_pinned_bytes 4096"));
    }

    #[test]
    fn stats_documents_without_pinned_bytes_still_parse() {
        // What a registry from before pinning serves: the operator must keep reading it.
        let old = r#"{"hits":1,"misses":2,"stale":0,"errors":0,"servedBytes":3,"upstreamBytes":4,
            "cacheSizeBytes":5,"evictions":0,"upstreamRequests":[],"registries":{}}"#;
        let snap: StatsSnapshot = serde_json::from_str(old).unwrap();
        assert_eq!((snap.hits, snap.pinned_bytes), (1, 0));
        let new = serde_json::to_value(Telemetry::new(["docker.io"]).snapshot()).unwrap();
        assert_eq!(new["pinnedBytes"], 0);
    }
}
