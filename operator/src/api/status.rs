//! The `RegistryMirror` status: conditions plus the numbers behind them.
//!
//! Invariants: condition types and statuses are enums so a typo cannot invent a new condition;
//! `lastTransitionTime` changes only when a condition's status changes (see
//! `controller::status`), and nothing else in status carries a clock, so repeated reconciles of
//! an unchanged world write the same status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a RegistryMirror.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryMirrorStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, ProxyAvailable, NodesConfigured, CacheEffective, UpstreamBudget, Conflict,
    /// CacheShared, and Warmed when `spec.warm` lists images.
    /// A list map keyed by `type`: the API server refuses two conditions of the same type, and
    /// server-side apply merges conditions by type rather than replacing the list.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<MirrorCondition>,

    /// The URL the nodes are configured to pull through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// How many selected nodes are configured, and why the others are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodesStatus>,

    /// Cache effectiveness summed over every registry pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStatus>,

    /// Upstream rate-limit budget per registry, as last reported by the upstream's headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budget: Vec<UpstreamBudgetStatus>,

    /// The BUDGET column: the lowest current budget as `remaining/limit`; `RateLimited` while an
    /// upstream's 429 wait is in force; `Expired` when every figure is older than its window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_summary: Option<String>,

    /// On a hub: the spokes that pulled through it, by the id each sends (`spec.parent.spokeId`
    /// on the spoke), summed over the hub's registry pods; the most recently seen
    /// [`MAX_SPOKES_IN_STATUS`] of them. The hub's `budget` is the fleet's: only the hub spends
    /// it. On a spoke, `budget` is the hub's, relayed with its answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spokes: Vec<SpokeStatus>,

    /// Image references of running Pods written to the registry's pin file at the last pass
    /// (tags and digests, at most 2000). Absent unless `spec.pinWorkloadImages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_images: Option<i32>,

    /// The warm of `spec.warm` (absent when the list is empty): which list it is about (its
    /// hash), its state and progress, and the items that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmStatus>,
}

/// The condition types of a RegistryMirror.
#[derive(
    Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum ConditionType {
    /// The mirror serves pulls: the proxy is available and at least one node is configured.
    Ready,
    /// At least one registry pod answers (or the external endpoint is used).
    ProxyAvailable,
    /// All selected nodes have the mirror in their runtime configuration.
    NodesConfigured,
    /// Hit ratio of the cache, with hit/miss/stale counts.
    CacheEffective,
    /// Upstream rate-limit budget; `RateLimited` when exhausted.
    UpstreamBudget,
    /// Another RegistryMirror already claims one of this mirror's registries on overlapping
    /// nodes; this one applies nothing while the conflict lasts.
    Conflict,
    /// The registry replicas share one cache (`S3` storage, or a single replica). `False` when
    /// each of several replicas keeps its own cache and spends the upstream budget on its own.
    /// Informational: it does not affect `Ready`.
    CacheShared,
    /// The images of `spec.warm` are in the cache (present only when `spec.warm` lists any):
    /// `True Warmed`, `Unknown Warming` or `WaitingForRegistry`, `False WarmFailed`,
    /// `InvalidWarmRef`, `WarmRegistryNotMirrored`, `TooManyWarmRefs` or `NoRegistryToWarm`.
    /// Informational: it does not affect `Ready`.
    Warmed,
}

impl ConditionType {
    /// Every condition type, in the order they appear in status.
    pub const ALL: [Self; 8] = [
        Self::Ready,
        Self::ProxyAvailable,
        Self::NodesConfigured,
        Self::CacheEffective,
        Self::UpstreamBudget,
        Self::Conflict,
        Self::CacheShared,
        Self::Warmed,
    ];

    /// The type's name as serialised.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::ProxyAvailable => "ProxyAvailable",
            Self::NodesConfigured => "NodesConfigured",
            Self::CacheEffective => "CacheEffective",
            Self::UpstreamBudget => "UpstreamBudget",
            Self::Conflict => "Conflict",
            Self::CacheShared => "CacheShared",
            Self::Warmed => "Warmed",
        }
    }
}

impl RegistryMirrorStatus {
    /// Whether the `Ready` condition is `True`. Pure.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.conditions
            .iter()
            .any(|c| c.type_ == ConditionType::Ready && c.status == ConditionStatus::True)
    }
}

/// A condition's truth value.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known yet.
    Unknown,
}

/// One condition, in the shape of Kubernetes' `metav1.Condition`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirrorCondition {
    /// Condition type.
    #[serde(rename = "type")]
    pub type_: ConditionType,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// Machine-readable reason in PascalCase, e.g. `ConfigPathNotSet`.
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// The generation the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the status last changed (not when it was last computed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

/// Node configuration summary.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodesStatus {
    /// Nodes running an agent for this mirror.
    pub desired: i32,
    /// Nodes whose agent reports the current desired state applied and ready.
    pub configured: i32,
    /// `configured/desired` (the NODES column).
    pub summary: String,
    /// Up to 10 nodes that are not configured, with the reason, sorted by node name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_configured: Vec<NodeProblem>,
}

/// Why one node is not configured.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeProblem {
    /// Node name.
    pub node: String,
    /// Machine-readable reason from the node agent, e.g. `ConfigPathNotSet`.
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
}

/// Cache counters summed over all registry pods that answered.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheStatus {
    /// Requests served from the cache.
    pub hits: i64,
    /// Requests fetched from upstream.
    pub misses: i64,
    /// Requests served from the cache because the upstream failed or the budget was low.
    pub stale: i64,
    /// Requests that failed.
    pub errors: i64,
    /// `(hits + stale) / (hits + misses + stale)` as a percentage with one decimal, e.g. `87.5%`.
    pub hit_ratio: String,
    /// Bytes served to clients.
    pub bytes_served: i64,
    /// Bytes fetched from upstream.
    pub bytes_from_upstream: i64,
    /// Bytes held in the caches.
    pub cache_size_bytes: i64,
    /// Registry pods whose stats were read.
    pub pods_reporting: i32,
}

/// Most spokes listed in a hub's status.
pub const MAX_SPOKES_IN_STATUS: usize = 50;

/// One spoke of a hub, as the hub's registry pods counted its requests.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpokeStatus {
    /// The id the spoke sends (`spec.parent.spokeId` of the spoke's mirror).
    pub id: String,
    /// Requests the spoke sent (its cache misses and revalidations).
    pub requests: i64,
    /// Of those, answered from the hub's cache.
    pub hits: i64,
    /// The spoke's last request (RFC 3339).
    pub last_seen: String,
}

/// Rate-limit budget of one upstream registry: the lowest current figure over pods (else the
/// most recent expired one), and a 429 wait in force at any pod.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamBudgetStatus {
    /// Registry name, e.g. `docker.io`.
    pub registry: String,
    /// Requests allowed per window, from `ratelimit-limit` (absent when only a 429 was seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    /// Requests left in the window, from `ratelimit-remaining` (absent when only a 429 was seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<i64>,
    /// Window length in seconds (`w=`), when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<i64>,
    /// When the registry received these figures (RFC 3339). It moves only when the upstream
    /// sends a new figure, never with time alone; absent from registries that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<String>,
    /// `Current` (within its window), `Expired` (older than its window: the budget is unknown
    /// until the upstream is asked again; the old figures stay for reference) or `RateLimited`
    /// (the upstream answered 429 and its `Retry-After` has not passed, or a current figure has
    /// nothing left).
    #[serde(default)]
    pub state: BudgetState,
    /// While rate-limited by a 429: until when the upstream asked to wait (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limited_until: Option<String>,
}

/// What an upstream budget figure is worth now.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum BudgetState {
    /// Observed within its window.
    #[default]
    Current,
    /// Older than its window.
    Expired,
    /// A 429 wait in force, or nothing left in a current window.
    RateLimited,
}

/// Most failed items listed in `status.warm.failed`.
pub const MAX_WARM_FAILURES_IN_STATUS: usize = 10;

/// The warm of `spec.warm`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmStatus {
    /// Hash of the list this status is about (its references normalised, sorted and
    /// deduplicated): a list with the same hash is not warmed again.
    pub observed_hash: String,
    /// The `metadata.generation` the list was read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Pending` (no registry pod answers yet), `Warming`, `Done`, `Failed` (retried later) or
    /// `Invalid` (the list has a bad reference; nothing is warmed until it changes).
    pub state: WarmState,
    /// Images whose warm ended (warmed or failed) in the current attempt.
    pub done: i32,
    /// Images in the list.
    pub total: i32,
    /// Images of the last attempt that failed, with why (at most 10, in list order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<WarmFailure>,
    /// Attempts made for this list (the retry delay grows with it).
    #[serde(default)]
    pub attempts: i32,
    /// When the current attempt started (`Warming`) or ended (`Done`, `Failed`), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_time: Option<String>,
    /// The WARM column: `Done 3/3`, `Warming 1/3`, `Failed 2/3`, `Pending 0/3`, `Invalid`.
    pub summary: String,
    /// What happened, for people (the reason of a failed attempt, the bad reference).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Where the warm of a list stands.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum WarmState {
    /// Waiting for a registry pod that answers.
    #[default]
    Pending,
    /// A registry pod is warming the list.
    Warming,
    /// Every image of the list is cached.
    Done,
    /// The last attempt failed for some images (or as a whole); retried with a growing delay.
    Failed,
    /// The list cannot be warmed as written.
    Invalid,
}

/// One image that failed to warm.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmFailure {
    /// The reference as the registry resolved it.
    #[serde(rename = "ref")]
    pub reference: String,
    /// Why it failed.
    pub message: String,
}
