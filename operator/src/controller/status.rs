//! Status stage: computes the `RegistryMirror` status from what was decided and observed, and
//! writes it only when it changed.
//!
//! Invariants:
//! - [`compute_status`] is pure; the only clock input is `now`, used as the
//!   `lastTransitionTime` of a condition whose status changed, and to tell whether an upstream
//!   budget figure is past its window or a 429 wait past its end: status changes when a window
//!   or wait ends, once, never with every pass, so an unchanged world yields an identical status
//!   and no write. Budget times are shown as when they were observed, never as an age.
//! - Lists are sorted, numbers are summed over pods in a fixed order.
//! - `CacheShared` comes from the spec alone ([`cache_shared`]): several replicas with
//!   pod-local storage are reported, not refused (existing mirrors keep running), and it never
//!   affects `Ready`.
//! - When no registry pod is ready, `ProxyAvailable` says why from the pods' own status
//!   ([`proxy_unavailable`]): never a restart count, back-off delay or timestamp, and a crash
//!   loop reads the same whichever phase of it was observed, so a pod failing the same way at
//!   every restart causes no status write after the first.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::conflict::Conflict;
use super::observe::{ContainerState, ContainerSummary, NotReadyPod, Observations, Termination};
use super::references::{MissingObject, Referenced};
use crate::api::{
    BudgetState, CacheStatus, ConditionStatus, ConditionType, MirrorCondition, NodeProblem,
    NodesStatus, RegistryMirror, RegistryMirrorStatus, SpokeStatus, StorageKind,
    UpstreamBudgetStatus, MAX_SPOKES_IN_STATUS,
};
use crate::node_agent::protocol::{AgentStatus, RegistryState};

/// How many not-configured nodes are listed in status.
const MAX_NODE_PROBLEMS: usize = 10;
/// `ProxyAvailable` reason when a registry pod fails (crash loop, image pull, ...); also the
/// reason of the Warning Event sent when it starts.
pub const REGISTRY_FAILING: &str = "RegistryFailing";

/// Failure to write status.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The status subresource patch failed.
    #[error("cannot patch status of {namespace}/{name}: {source}")]
    Patch {
        /// Namespace of the mirror.
        namespace: String,
        /// Name of the mirror.
        name: String,
        /// API error.
        #[source]
        source: kube::Error,
    },
    /// The patch document could not be built.
    #[error("cannot encode status patch of {namespace}/{name}: {message}")]
    Encode {
        /// Namespace of the mirror.
        namespace: String,
        /// Name of the mirror.
        name: String,
        /// Serialiser message.
        message: String,
    },
}

impl StatusError {
    /// The static category used in metrics labels and Event reasons.
    #[must_use]
    pub fn category(&self) -> &'static str {
        "StatusPatchFailed"
    }
}

/// What the reconcile decided about a mirror.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The spec is invalid; nothing was applied.
    Invalid {
        /// The validation message.
        message: String,
    },
    /// Another mirror wins a registry on overlapping nodes; nothing was applied.
    Conflicting(Conflict),
    /// A Secret or ConfigMap the spec names does not exist; nothing was applied or changed.
    ReferencesMissing {
        /// One entry (`field: Kind "name" not found in namespace "ns"`) per missing object, in
        /// spec field order; the first one's reason names the `Ready` condition.
        missing: Vec<MissingObject>,
    },
    /// Objects are applied; this is what runs.
    Running {
        /// The URL nodes use, when known.
        endpoint: Option<String>,
        /// No in-cluster proxy (external endpoint).
        external: bool,
        /// Generation of the desired state the agents should report.
        desired_generation: String,
        /// Registries mirrored, with their budget reserve.
        reserves: BTreeMap<String, u64>,
        /// What the pods said.
        observations: Observations,
    },
    /// Deletion in progress: waiting for node agents to remove files.
    Removing {
        /// Agents that still hold files or did not answer.
        pending: Vec<String>,
        /// Agents asked.
        total: usize,
    },
}

fn condition(
    type_: ConditionType,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
) -> MirrorCondition {
    MirrorCondition {
        type_,
        status,
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: None,
        last_transition_time: None,
    }
}

/// A percentage with one decimal, or `-` when there is nothing to divide.
#[must_use]
pub fn hit_ratio(hits: u64, misses: u64, stale: u64) -> String {
    let served = u128::from(hits) + u128::from(stale);
    let total = served + u128::from(misses);
    if total == 0 {
        return "-".to_string();
    }
    let per_mille = (served * 1000 + total / 2) / total;
    format!("{}.{}%", per_mille / 10, per_mille % 10)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn agent_problem(status: &AgentStatus) -> Option<(String, String)> {
    if let Some(p) = status.problems.first() {
        return Some((p.reason.to_string(), p.message.clone()));
    }
    if let Some(p) = status.containerd.problems.first() {
        return Some((p.reason.to_string(), p.message.clone()));
    }
    status
        .registries
        .iter()
        .find(|r| r.state != RegistryState::Configured)
        .map(|r| {
            (
                r.reason
                    .map_or_else(|| format!("{:?}", r.state), |reason| reason.to_string()),
                if r.message.is_empty() {
                    format!("{}: {:?}", r.registry, r.state)
                } else {
                    format!("{}: {}", r.registry, r.message)
                },
            )
        })
}

struct NodesSummary {
    status: NodesStatus,
    condition: MirrorCondition,
}

fn summarize_nodes(
    mirror_key: &str,
    endpoint: Option<&str>,
    desired_generation: &str,
    obs: &Observations,
) -> NodesSummary {
    let mut problems: Vec<NodeProblem> = Vec::new();
    let mut configured = 0i32;
    for agent in &obs.agents {
        match &agent.status {
            Err(message) => problems.push(NodeProblem {
                node: agent.node.clone(),
                reason: "AgentUnreachable".to_string(),
                message: message.clone(),
            }),
            Ok(status)
                if status.mirror != mirror_key || status.generation != desired_generation =>
            {
                problems.push(NodeProblem {
                    node: agent.node.clone(),
                    reason: "Pending".to_string(),
                    message: "the agent has not applied the current desired state yet".to_string(),
                });
            }
            Ok(status) if status.ready => configured += 1,
            Ok(status) => {
                let (reason, message) = agent_problem(status).unwrap_or_else(|| {
                    (
                        "NotReady".to_string(),
                        "the agent reports not ready".to_string(),
                    )
                });
                problems.push(NodeProblem {
                    node: agent.node.clone(),
                    reason,
                    message,
                });
            }
        }
    }
    problems.sort_by(|a, b| a.node.cmp(&b.node));
    let agents = i32::try_from(obs.agents.len()).unwrap_or(i32::MAX);
    let desired = obs.desired_nodes.unwrap_or(0).max(agents);
    // Nodes the DaemonSet should cover but where no agent runs yet.
    let missing = desired - agents;
    let summary = match obs.desired_nodes {
        Some(_) => format!("{configured}/{desired}"),
        None => format!("{configured}/?"),
    };
    let condition = if endpoint.is_none() {
        condition(
            ConditionType::NodesConfigured,
            ConditionStatus::False,
            "EndpointPending",
            format!("{summary} nodes; the proxy Service has no address yet"),
        )
    } else if obs.desired_nodes.is_none() {
        // One configured agent of a DaemonSet whose controller has not counted its nodes yet
        // would read `1/1 nodes` while the other nodes' pods are still being created.
        condition(
            ConditionType::NodesConfigured,
            ConditionStatus::False,
            "AgentsStarting",
            format!(
                "{summary} nodes; the agent DaemonSet's controller has not counted its nodes yet"
            ),
        )
    } else if desired == 0 {
        condition(
            ConditionType::NodesConfigured,
            ConditionStatus::False,
            "NoNodesSelected",
            "0/0 nodes; no node matches spec.nodes.nodeSelector or no agent pod is scheduled",
        )
    } else if configured == desired {
        condition(
            ConditionType::NodesConfigured,
            ConditionStatus::True,
            "AllNodesConfigured",
            format!("{summary} nodes"),
        )
    } else {
        // The most frequent reason names the condition; ties go to the alphabetically first.
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for p in &problems {
            *counts.entry(p.reason.as_str()).or_default() += 1;
        }
        let reason = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map_or("AgentsStarting", |(r, _)| r);
        let mut message = format!("{summary} nodes");
        for p in problems.iter().take(3) {
            message.push_str(&format!("; {}: {}", p.node, p.message));
        }
        if missing > 0 {
            message.push_str(&format!("; {missing} agent pod(s) not running yet"));
        }
        condition(
            ConditionType::NodesConfigured,
            ConditionStatus::False,
            reason,
            message,
        )
    };
    problems.truncate(MAX_NODE_PROBLEMS);
    NodesSummary {
        status: NodesStatus {
            desired,
            configured,
            summary,
            not_configured: problems,
        },
        condition,
    }
}

fn summarize_cache(obs: &Observations) -> (Option<CacheStatus>, MirrorCondition) {
    let ok: Vec<_> = obs
        .registry_pods
        .iter()
        .filter_map(|p| p.stats.as_ref().ok())
        .collect();
    if ok.is_empty() {
        return (
            None,
            condition(
                ConditionType::CacheEffective,
                ConditionStatus::Unknown,
                "NoStats",
                "no registry pod answered /stats",
            ),
        );
    }
    let sum = |f: fn(&super::observe::RegistryStats) -> u64| {
        ok.iter().fold(0u64, |acc, s| acc.saturating_add(f(s)))
    };
    let (hits, misses, stale) = (sum(|s| s.hits), sum(|s| s.misses), sum(|s| s.stale));
    let ratio = hit_ratio(hits, misses, stale);
    let cache = CacheStatus {
        hits: to_i64(hits),
        misses: to_i64(misses),
        stale: to_i64(stale),
        errors: to_i64(sum(|s| s.errors)),
        hit_ratio: ratio.clone(),
        bytes_served: to_i64(sum(|s| s.bytes_served)),
        bytes_from_upstream: to_i64(sum(|s| s.bytes_from_upstream)),
        cache_size_bytes: to_i64(sum(|s| s.cache_size_bytes)),
        pods_reporting: i32::try_from(ok.len()).unwrap_or(i32::MAX),
    };
    let message = format!("hit ratio {ratio} (hits {hits}, misses {misses}, stale {stale})");
    let cond = if hits + misses + stale == 0 {
        condition(
            ConditionType::CacheEffective,
            ConditionStatus::Unknown,
            "NoTraffic",
            message,
        )
    } else if hits + stale == 0 {
        condition(
            ConditionType::CacheEffective,
            ConditionStatus::False,
            "AllMisses",
            message,
        )
    } else {
        condition(
            ConditionType::CacheEffective,
            ConditionStatus::True,
            "CacheServing",
            message,
        )
    };
    (Some(cache), cond)
}

/// One pod's figure for one registry, as merged over pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Figure {
    limit: u64,
    remaining: u64,
    window_seconds: Option<u64>,
    observed_at: Option<u64>,
}

impl Figure {
    /// Older than its window at `now`: every pull it counted has left the window since. A figure
    /// without a window or an observation time (older registries) never expires.
    fn expired_at(&self, now: u64) -> bool {
        match (self.window_seconds, self.observed_at) {
            (Some(window), Some(at)) => now >= at.saturating_add(window.max(1)),
            _ => false,
        }
    }
}

/// A registry's budget over all pods: the lowest current figure, the most recent expired one,
/// and the 429 wait ending last that is still in force.
#[derive(Debug, Default)]
struct Merged {
    current: Option<Figure>,
    expired: Option<Figure>,
    rate_limited: Option<super::observe::RateLimitedSpell>,
}

/// RFC 3339 of unix seconds (`-` for a time out of range).
/// A hub's spokes over all its pods that answered: counts summed, the latest last-seen time;
/// the [`MAX_SPOKES_IN_STATUS`] most recently seen, sorted by id. Pure.
fn summarize_spokes(obs: &Observations) -> Vec<SpokeStatus> {
    let mut merged: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    for pod in &obs.registry_pods {
        let Ok(stats) = &pod.stats else { continue };
        for (id, s) in &stats.spokes {
            let e = merged.entry(id.as_str()).or_default();
            e.0 += s.requests;
            e.1 += s.hits;
            e.2 = e.2.max(s.last_seen);
        }
    }
    let mut by_recency: Vec<_> = merged.into_iter().collect();
    by_recency.sort_by(|a, b| b.1 .2.cmp(&a.1 .2).then(a.0.cmp(b.0)));
    by_recency.truncate(MAX_SPOKES_IN_STATUS);
    by_recency.sort_by(|a, b| a.0.cmp(b.0));
    by_recency
        .into_iter()
        .map(|(id, (requests, hits, last_seen))| SpokeStatus {
            id: id.to_owned(),
            requests: i64::try_from(requests).unwrap_or(i64::MAX),
            hits: i64::try_from(hits).unwrap_or(i64::MAX),
            last_seen: rfc3339(last_seen),
        })
        .collect()
}

fn rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| "-".to_string(), |t| t.to_string())
}

/// `docker.io 97/100 per 21600s at 2026-01-02T03:04:05Z`.
fn describe_figure(registry: &str, f: &Figure) -> String {
    let mut text = format!("{registry} {}/{}", f.remaining, f.limit);
    if let Some(w) = f.window_seconds {
        text.push_str(&format!(" per {w}s"));
    }
    if let Some(at) = f.observed_at {
        text.push_str(&format!(" at {}", rfc3339(at)));
    }
    text
}

/// Merges the budgets the pods reported into one entry per registry, as of `now` (unix
/// seconds), and derives the BUDGET column and the `UpstreamBudget` condition. Pure: `now` only
/// decides whether a figure is past its window and a 429 wait past its end, so the result
/// changes when a new figure arrives or a window or wait ends, not with every pass.
fn summarize_budget(
    obs: &Observations,
    reserves: &BTreeMap<String, u64>,
    now: u64,
) -> (Vec<UpstreamBudgetStatus>, Option<String>, MirrorCondition) {
    let mut merged: BTreeMap<String, Merged> = BTreeMap::new();
    for stats in obs
        .registry_pods
        .iter()
        .filter_map(|p| p.stats.as_ref().ok())
    {
        for b in &stats.upstreams {
            let m = merged.entry(b.registry.clone()).or_default();
            if let Some(spell) = b.rate_limited.filter(|r| now < r.until) {
                if m.rate_limited.is_none_or(|old| spell.until > old.until) {
                    m.rate_limited = Some(spell);
                }
            }
            let (Some(limit), Some(remaining)) = (b.limit, b.remaining) else {
                continue;
            };
            let figure = Figure {
                limit,
                remaining,
                window_seconds: b.window_seconds,
                observed_at: b.observed_at,
            };
            // Each pod spends the same NAT budget: the lowest current figure is the truth; of
            // expired ones, the most recent says the most.
            if figure.expired_at(now) {
                if m.expired
                    .is_none_or(|old| figure.observed_at > old.observed_at)
                {
                    m.expired = Some(figure);
                }
            } else if m.current.is_none_or(|old| {
                (figure.remaining, std::cmp::Reverse(figure.observed_at))
                    < (old.remaining, std::cmp::Reverse(old.observed_at))
            }) {
                m.current = Some(figure);
            }
        }
    }
    let mut budget = Vec::new();
    let mut messages = Vec::new();
    for (registry, m) in &merged {
        let exhausted = m.current.is_some_and(|f| f.remaining == 0);
        let (state, figure) = match (m.current, m.expired) {
            _ if m.rate_limited.is_some() || exhausted => {
                (BudgetState::RateLimited, m.current.or(m.expired))
            }
            (Some(current), _) => (BudgetState::Current, Some(current)),
            (None, Some(expired)) => (BudgetState::Expired, Some(expired)),
            (None, None) => continue,
        };
        let mut message = match (&figure, m.rate_limited) {
            (Some(f), None) => describe_figure(registry, f),
            (_, Some(spell)) => format!(
                "{registry} answered 429 at {}; waiting until {}",
                rfc3339(spell.observed_at),
                rfc3339(spell.until)
            ),
            (None, None) => registry.clone(),
        };
        if let (Some(f), Some(_)) = (&figure, m.rate_limited) {
            message.push_str(&format!("; last figure {}", describe_figure("", f).trim()));
        }
        if state == BudgetState::Expired {
            message.push_str(", expired (older than its window; unknown until asked again)");
        }
        messages.push(message);
        budget.push(UpstreamBudgetStatus {
            registry: registry.clone(),
            limit: figure.map(|f| to_i64(f.limit)),
            remaining: figure.map(|f| to_i64(f.remaining)),
            window_seconds: figure.and_then(|f| f.window_seconds).map(to_i64),
            observed_at: figure.and_then(|f| f.observed_at).map(rfc3339),
            state,
            rate_limited_until: m.rate_limited.map(|r| rfc3339(r.until)),
        });
    }
    let current = |b: &&UpstreamBudgetStatus| b.state != BudgetState::Expired;
    let lowest = budget
        .iter()
        .filter(current)
        .filter_map(|b| Some((b, b.remaining?, b.limit?)))
        .min_by(|(a, ar, al), (b, br, bl)| {
            // Compare remaining/limit without floats: a.r * b.l vs b.r * a.l.
            (i128::from(*ar) * i128::from((*bl).max(1)))
                .cmp(&(i128::from(*br) * i128::from((*al).max(1))))
                .then(a.registry.cmp(&b.registry))
        });
    let summary = if budget.iter().any(|b| b.rate_limited_until.is_some()) {
        Some("RateLimited".to_string())
    } else if let Some((_, remaining, limit)) = lowest {
        Some(format!("{remaining}/{limit}"))
    } else if budget.is_empty() {
        None
    } else {
        Some("Expired".to_string())
    };
    let message = messages.join(", ");
    let cond = if budget.is_empty() {
        condition(
            ConditionType::UpstreamBudget,
            ConditionStatus::Unknown,
            "NoRateLimitHeaders",
            "no upstream has sent rate-limit headers yet",
        )
    } else if budget.iter().any(|b| b.state == BudgetState::RateLimited) {
        condition(
            ConditionType::UpstreamBudget,
            ConditionStatus::False,
            "RateLimited",
            message,
        )
    } else if budget.iter().any(|b| {
        b.state == BudgetState::Current
            && reserves
                .get(&b.registry)
                .is_some_and(|reserve| b.remaining.unwrap_or(0) <= to_i64(*reserve))
    }) {
        condition(
            ConditionType::UpstreamBudget,
            ConditionStatus::True,
            "BudgetReserve",
            message,
        )
    } else if budget.iter().any(|b| b.state == BudgetState::Current) {
        condition(
            ConditionType::UpstreamBudget,
            ConditionStatus::True,
            "BudgetAvailable",
            message,
        )
    } else {
        condition(
            ConditionType::UpstreamBudget,
            ConditionStatus::Unknown,
            "BudgetExpired",
            message,
        )
    };
    (budget, summary, cond)
}

/// What a registry pod that is not ready is doing, as shown in `ProxyAvailable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodDiagnosis {
    /// It fails: a crash loop, an image that cannot be pulled, a container that cannot be
    /// created. The detail names the cause.
    Failing(String),
    /// It waits before its containers run: unschedulable, or its containers being created
    /// (`ContainerCreating`, `PodInitializing`, with the kubelet's message when there is one).
    Pending(String),
    /// Nothing wrong reported: its containers run and wait for their readiness probe, or the
    /// kubelet has not reported them yet.
    Starting,
}

/// `; last exit N (Reason): message` of a termination; `Error` is the default and left out.
fn last_exit(termination: Option<&Termination>) -> String {
    let Some(t) = termination else {
        return String::new();
    };
    let mut out = format!("; last exit {}", t.exit_code);
    if !t.reason.is_empty() && t.reason != "Error" {
        out.push_str(&format!(" ({})", t.reason));
    }
    if !t.message.is_empty() {
        out.push_str(&format!(": {}", t.message));
    }
    out
}

fn failed_exit(c: &ContainerSummary) -> bool {
    c.last_termination
        .as_ref()
        .is_some_and(|t| t.exit_code != 0)
}

fn with_message(reason: &str, message: &str) -> String {
    if message.is_empty() {
        reason.to_string()
    } else {
        format!("{reason}: {message}")
    }
}

fn diagnose_container(c: &ContainerSummary) -> PodDiagnosis {
    // A crash loop passes through waiting (CrashLoopBackOff), running and terminated; all three
    // read the same, so the message does not change with the instant the pod was looked at.
    let crash_loop = || {
        PodDiagnosis::Failing(format!(
            "CrashLoopBackOff{}",
            last_exit(c.last_termination.as_ref())
        ))
    };
    match &c.state {
        ContainerState::Waiting { reason, .. } if reason == "CrashLoopBackOff" => crash_loop(),
        // The kubelet alternates the two while it backs off; the back-off message carries the
        // pull error after `Back-off pulling image "…": `, the other one is that error.
        ContainerState::Waiting { reason, message }
            if reason == "ErrImagePull" || reason == "ImagePullBackOff" =>
        {
            let error = message
                .strip_prefix("Back-off pulling image ")
                .and_then(|rest| rest.split_once("\": ").map(|(_, error)| error))
                .unwrap_or(message);
            PodDiagnosis::Failing(with_message("ImagePullBackOff", error))
        }
        // Still being created: a pod stuck here (a volume that cannot be mounted) looks the same
        // as one starting normally, except for the kubelet's message when it gives one.
        ContainerState::Waiting { reason, message }
            if reason == "ContainerCreating" || reason == "PodInitializing" =>
        {
            if failed_exit(c) {
                crash_loop()
            } else {
                PodDiagnosis::Pending(with_message(reason, message))
            }
        }
        ContainerState::Waiting { reason, .. } if reason.is_empty() => {
            if failed_exit(c) {
                crash_loop()
            } else {
                PodDiagnosis::Starting
            }
        }
        ContainerState::Waiting { reason, message } => {
            PodDiagnosis::Failing(with_message(reason, message))
        }
        ContainerState::Running | ContainerState::Terminated | ContainerState::Unknown => {
            if failed_exit(c) {
                crash_loop()
            } else {
                PodDiagnosis::Starting
            }
        }
    }
}

/// Why one registry pod is not ready: its first failing container (by name), else its
/// scheduling problem, else its first container being created, else starting. Pure.
#[must_use]
pub fn diagnose(pod: &NotReadyPod) -> PodDiagnosis {
    let diagnoses: Vec<PodDiagnosis> = pod.containers.iter().map(diagnose_container).collect();
    if let Some(failing) = diagnoses
        .iter()
        .find(|d| matches!(d, PodDiagnosis::Failing(_)))
    {
        return failing.clone();
    }
    if let Some(message) = &pod.unschedulable {
        return PodDiagnosis::Pending(format!("unschedulable: {message}"));
    }
    diagnoses
        .into_iter()
        .find(|d| matches!(d, PodDiagnosis::Pending(_)))
        .unwrap_or(PodDiagnosis::Starting)
}

/// `ProxyAvailable=False` when no registry pod is ready: `RegistryFailing` naming the first
/// failing pod (by name), else `RegistryPending` naming the first pending one, else
/// `NoReadyPods`. One pod's detail plus how many others are not ready. Pure.
#[must_use]
pub fn proxy_unavailable(not_ready: &[NotReadyPod]) -> MirrorCondition {
    let diagnosed: Vec<(&str, PodDiagnosis)> = not_ready
        .iter()
        .map(|p| (p.pod.as_str(), diagnose(p)))
        .collect();
    let describe = |pod: &str, detail: &str| {
        let mut message = format!("registry pod {pod}: {detail}");
        match not_ready.len().saturating_sub(1) {
            0 => {}
            1 => message.push_str("; and 1 more registry pod not ready"),
            n => message.push_str(&format!("; and {n} more registry pods not ready")),
        }
        message
    };
    let failing = diagnosed.iter().find_map(|(pod, d)| match d {
        PodDiagnosis::Failing(detail) => Some((*pod, detail)),
        _ => None,
    });
    if let Some((pod, detail)) = failing {
        return condition(
            ConditionType::ProxyAvailable,
            ConditionStatus::False,
            REGISTRY_FAILING,
            describe(pod, detail),
        );
    }
    let pending = diagnosed.iter().find_map(|(pod, d)| match d {
        PodDiagnosis::Pending(detail) => Some((*pod, detail)),
        _ => None,
    });
    if let Some((pod, detail)) = pending {
        return condition(
            ConditionType::ProxyAvailable,
            ConditionStatus::False,
            "RegistryPending",
            describe(pod, detail),
        );
    }
    condition(
        ConditionType::ProxyAvailable,
        ConditionStatus::False,
        "NoReadyPods",
        "no registry pod is ready yet",
    )
}

/// `CacheShared` of a running mirror, from its spec: `True SharedStorage` with `S3` storage,
/// `True SingleReplica` with one replica, `False PerReplicaCache` when several replicas each
/// keep their own cache (each fetches what it serves from the upstream itself, so a cold image
/// spends the upstream budget up to once per replica), `Unknown ExternalEndpoint` when no proxy
/// runs here. Pure.
#[must_use]
pub fn cache_shared(mirror: &RegistryMirror, external: bool) -> MirrorCondition {
    let spec = &mirror.spec;
    let replicas = spec.replicas;
    if external {
        return condition(
            ConditionType::CacheShared,
            ConditionStatus::Unknown,
            "ExternalEndpoint",
            "no in-cluster proxy; the external mirror's storage is not managed here",
        );
    }
    match (spec.storage.kind, &spec.storage.s3) {
        (StorageKind::S3, Some(s3)) => condition(
            ConditionType::CacheShared,
            ConditionStatus::True,
            "SharedStorage",
            format!(
                "{replicas} replica(s) share one cache in S3 bucket {}",
                s3.bucket
            ),
        ),
        _ if replicas <= 1 => condition(
            ConditionType::CacheShared,
            ConditionStatus::True,
            "SingleReplica",
            "one registry pod, one cache",
        ),
        (kind, _) => condition(
            ConditionType::CacheShared,
            ConditionStatus::False,
            "PerReplicaCache",
            format!(
                "each of the {replicas} registry pods keeps its own {kind:?} cache and fetches what it serves from the upstream itself: a cold image spends the upstream budget up to {replicas} times; set spec.storage.type S3 to share one cache"
            ),
        ),
    }
}

fn unknown_all(reason: &str, message: &str) -> Vec<MirrorCondition> {
    [
        ConditionType::ProxyAvailable,
        ConditionType::NodesConfigured,
        ConditionType::CacheEffective,
        ConditionType::UpstreamBudget,
        ConditionType::CacheShared,
    ]
    .into_iter()
    .map(|t| condition(t, ConditionStatus::Unknown, reason, message))
    .collect()
}

/// Computes the status. `previous` supplies the `lastTransitionTime` of conditions whose status
/// did not change; `now` is used for those that did.
#[must_use]
pub fn compute_status(
    mirror: &RegistryMirror,
    outcome: &Outcome,
    now: &Time,
) -> RegistryMirrorStatus {
    let generation = mirror.metadata.generation;
    let key = format!(
        "{}/{}",
        mirror.metadata.namespace.as_deref().unwrap_or_default(),
        mirror.metadata.name.as_deref().unwrap_or_default()
    );
    let no_conflict = || {
        condition(
            ConditionType::Conflict,
            ConditionStatus::False,
            "NoConflict",
            "no other RegistryMirror claims these registries on these nodes",
        )
    };
    let mut status = RegistryMirrorStatus::default();
    let mut conditions = match outcome {
        Outcome::Invalid { message } => {
            let mut c = vec![condition(
                ConditionType::Ready,
                ConditionStatus::False,
                "InvalidSpec",
                message.clone(),
            )];
            c.extend(unknown_all(
                "InvalidSpec",
                "the spec is invalid; nothing was applied",
            ));
            c.push(no_conflict());
            c
        }
        Outcome::Conflicting(conflict) => {
            let message = format!(
                "{} already mirrored on overlapping nodes by the older RegistryMirror {}; this one applies nothing until that changes",
                conflict.registries.join(", "),
                conflict.winner
            );
            let mut c = vec![condition(
                ConditionType::Ready,
                ConditionStatus::False,
                "Conflict",
                message.clone(),
            )];
            c.extend(unknown_all(
                "Conflict",
                "nothing applied because of a conflict",
            ));
            c.push(condition(
                ConditionType::Conflict,
                ConditionStatus::True,
                "RegistryClaimed",
                message,
            ));
            c
        }
        Outcome::ReferencesMissing { missing } => {
            let referenced = missing
                .first()
                .map_or(Referenced::CredentialsSecret, |m| m.referenced);
            let reason = referenced.missing_reason();
            let message = missing
                .iter()
                .map(|m| m.message.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            let mut c = vec![condition(
                ConditionType::Ready,
                ConditionStatus::False,
                reason,
                message,
            )];
            let what = match referenced {
                Referenced::CredentialsSecret => {
                    "a credentials Secret is missing; nothing was applied or changed"
                }
                Referenced::CaConfigMap => {
                    "a CA ConfigMap is missing; nothing was applied or changed"
                }
                Referenced::TlsSecret => "a TLS Secret is missing; nothing was applied or changed",
            };
            c.extend(unknown_all(reason, what));
            c.push(no_conflict());
            c
        }
        Outcome::Removing { pending, total } => {
            let done = total.saturating_sub(pending.len());
            let mut message = format!("{done}/{total} nodes cleaned");
            if !pending.is_empty() {
                message.push_str(&format!(
                    "; waiting for {}",
                    pending
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            let mut c = vec![condition(
                ConditionType::Ready,
                ConditionStatus::False,
                "Deleting",
                "the mirror is being deleted",
            )];
            c.push(condition(
                ConditionType::ProxyAvailable,
                ConditionStatus::Unknown,
                "Deleting",
                "the mirror is being deleted",
            ));
            c.push(condition(
                ConditionType::NodesConfigured,
                ConditionStatus::False,
                "RemovingNodeFiles",
                message,
            ));
            c.push(condition(
                ConditionType::CacheEffective,
                ConditionStatus::Unknown,
                "Deleting",
                "",
            ));
            c.push(condition(
                ConditionType::UpstreamBudget,
                ConditionStatus::Unknown,
                "Deleting",
                "",
            ));
            c.push(condition(
                ConditionType::CacheShared,
                ConditionStatus::Unknown,
                "Deleting",
                "",
            ));
            c.push(no_conflict());
            c
        }
        Outcome::Running {
            endpoint,
            external,
            desired_generation,
            reserves,
            observations: obs,
        } => {
            status.endpoint.clone_from(endpoint);
            let pods_ok = obs.registry_pods.iter().filter(|p| p.stats.is_ok()).count();
            let proxy = if *external {
                condition(
                    ConditionType::ProxyAvailable,
                    ConditionStatus::True,
                    "ExternalEndpoint",
                    format!(
                        "no in-cluster proxy; nodes use {} and check it themselves",
                        endpoint.as_deref().unwrap_or("the external URL")
                    ),
                )
            } else if obs.ready_replicas > 0 || pods_ok > 0 {
                condition(
                    ConditionType::ProxyAvailable,
                    ConditionStatus::True,
                    "PodsReady",
                    format!(
                        "{} ready registry pod(s); {pods_ok} answered /stats",
                        obs.ready_replicas
                            .max(i32::try_from(pods_ok).unwrap_or(i32::MAX))
                    ),
                )
            } else {
                proxy_unavailable(&obs.registry_pods_not_ready)
            };
            let nodes = summarize_nodes(&key, endpoint.as_deref(), desired_generation, obs);
            let (cache, cache_cond) = summarize_cache(obs);
            let now_secs = u64::try_from(now.0.as_second()).unwrap_or(0);
            let (budget, budget_summary, budget_cond) = summarize_budget(obs, reserves, now_secs);
            let ready = if proxy.status != ConditionStatus::True {
                condition(
                    ConditionType::Ready,
                    ConditionStatus::False,
                    "ProxyUnavailable",
                    proxy.message.clone(),
                )
            } else if nodes.status.configured == 0 {
                condition(
                    ConditionType::Ready,
                    ConditionStatus::False,
                    &nodes.condition.reason,
                    nodes.condition.message.clone(),
                )
            } else {
                condition(
                    ConditionType::Ready,
                    ConditionStatus::True,
                    "MirrorReady",
                    format!(
                        "serving {} via {}; {} nodes",
                        reserves.keys().cloned().collect::<Vec<_>>().join(", "),
                        endpoint.as_deref().unwrap_or("-"),
                        nodes.status.summary
                    ),
                )
            };
            status.nodes = Some(nodes.status);
            status.cache = cache;
            status.budget = budget;
            status.budget_summary = budget_summary;
            status.spokes = summarize_spokes(obs);
            vec![
                ready,
                proxy,
                nodes.condition,
                cache_cond,
                budget_cond,
                no_conflict(),
                cache_shared(mirror, *external),
            ]
        }
    };
    let previous = mirror.status.as_ref().map(|s| &s.conditions);
    for c in &mut conditions {
        c.observed_generation = generation;
        let before = previous.and_then(|p| p.iter().find(|old| old.type_ == c.type_));
        c.last_transition_time = match before {
            Some(old) if old.status == c.status && old.last_transition_time.is_some() => {
                old.last_transition_time.clone()
            }
            _ => Some(now.clone()),
        };
    }
    conditions.sort_by_key(|c| ConditionType::ALL.iter().position(|t| *t == c.type_));
    status.observed_generation = generation;
    status.conditions = conditions;
    status
}

/// Puts the warm into a computed status: `warm` and its `Warmed` condition when the pass
/// decided them (a running mirror), else the previous `status.warm` kept as it was (an invalid,
/// conflicting or missing-reference pass warms nothing and forgets nothing). The condition's
/// `lastTransitionTime` moves only when its status changes. Pure.
pub fn with_warm(
    status: &mut RegistryMirrorStatus,
    previous: Option<&RegistryMirrorStatus>,
    decided: Option<(Option<crate::api::WarmStatus>, Option<MirrorCondition>)>,
    now: &Time,
) {
    let Some((warm, warmed)) = decided else {
        status.warm = previous.and_then(|p| p.warm.clone());
        return;
    };
    status.warm = warm;
    let Some(mut c) = warmed else {
        return;
    };
    c.observed_generation = status.observed_generation;
    let before = previous.and_then(|p| p.conditions.iter().find(|old| old.type_ == c.type_));
    c.last_transition_time = match before {
        Some(old) if old.status == c.status && old.last_transition_time.is_some() => {
            old.last_transition_time.clone()
        }
        _ => Some(now.clone()),
    };
    status.conditions.retain(|old| old.type_ != c.type_);
    status.conditions.push(c);
    status
        .conditions
        .sort_by_key(|c| ConditionType::ALL.iter().position(|t| *t == c.type_));
}

/// A notable transition worth a Kubernetes Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Warning rather than Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: String,
    /// Human-readable note.
    pub note: String,
}

fn find(status: Option<&RegistryMirrorStatus>, t: ConditionType) -> Option<&MirrorCondition> {
    status?.conditions.iter().find(|c| c.type_ == t)
}

/// Events for changes between two statuses: Ready changing status or reason, `ProxyAvailable`
/// becoming `RegistryFailing` (Ready's reason stays `ProxyUnavailable` then, only its message
/// names the cause), a new conflict.
#[must_use]
pub fn transitions(
    previous: Option<&RegistryMirrorStatus>,
    next: &RegistryMirrorStatus,
) -> Vec<Transition> {
    let mut out = Vec::new();
    if let Some(ready) = find(Some(next), ConditionType::Ready) {
        let before = find(previous, ConditionType::Ready);
        let changed = before.is_none_or(|b| b.status != ready.status || b.reason != ready.reason);
        if changed {
            out.push(Transition {
                warning: ready.status != ConditionStatus::True
                    && !matches!(
                        ready.reason.as_str(),
                        "Deleting" | "EndpointPending" | "Pending"
                    ),
                reason: ready.reason.clone(),
                note: ready.message.clone(),
            });
        }
    }
    if let Some(proxy) = find(Some(next), ConditionType::ProxyAvailable) {
        let before = find(previous, ConditionType::ProxyAvailable);
        if proxy.reason == REGISTRY_FAILING && before.is_none_or(|b| b.reason != REGISTRY_FAILING) {
            out.push(Transition {
                warning: true,
                reason: REGISTRY_FAILING.to_string(),
                note: proxy.message.clone(),
            });
        }
    }
    if let Some(warmed) = find(Some(next), ConditionType::Warmed) {
        let before = find(previous, ConditionType::Warmed);
        let settled = matches!(
            warmed.status,
            ConditionStatus::True | ConditionStatus::False
        );
        if settled && before.is_none_or(|b| b.status != warmed.status || b.reason != warmed.reason)
        {
            out.push(Transition {
                warning: warmed.status == ConditionStatus::False,
                reason: warmed.reason.clone(),
                note: warmed.message.clone(),
            });
        }
    }
    if let Some(conflict) = find(Some(next), ConditionType::Conflict) {
        let before = find(previous, ConditionType::Conflict);
        if conflict.status == ConditionStatus::True
            && before.is_none_or(|b| b.status != ConditionStatus::True)
        {
            out.push(Transition {
                warning: true,
                reason: "ConflictDetected".to_string(),
                note: conflict.message.clone(),
            });
        }
    }
    out
}

/// Writes `status` as a whole (JSON patch `add /status`, which replaces it, so fields that
/// disappeared are removed too), unless it equals the current one. Returns whether it wrote.
///
/// # Errors
/// [`StatusError::Patch`] when the API refuses.
pub async fn write_status(
    api: &Api<RegistryMirror>,
    mirror: &RegistryMirror,
    status: &RegistryMirrorStatus,
) -> Result<bool, StatusError> {
    if mirror.status.as_ref() == Some(status) {
        return Ok(false);
    }
    let name = mirror.metadata.name.clone().unwrap_or_default();
    let namespace = mirror.metadata.namespace.clone().unwrap_or_default();
    // The status was computed from this version of the object: if it changed since (a new spec,
    // or another writer's status), the `test` fails and nothing is written; the next pass
    // recomputes from the current object.
    let patch = serde_json::from_value(json!([
        { "op": "test", "path": "/metadata/resourceVersion", "value": mirror.metadata.resource_version },
        { "op": "add", "path": "/status", "value": status },
    ]))
            .map_err(|e| StatusError::Encode {
                namespace: namespace.clone(),
                name: name.clone(),
                message: e.to_string(),
            })?;
    api.patch_status(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .map_err(|source| StatusError::Patch {
            namespace,
            name,
            source,
        })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    const CREDENTIALS_ERROR: &str = "registries.docker.io.credentials: cannot read credentials file /etc/cachalot/credentials/docker.io/username: No such file or directory";

    fn waiting(reason: &str, message: &str) -> ContainerState {
        ContainerState::Waiting {
            reason: reason.to_string(),
            message: message.to_string(),
        }
    }

    fn exit(code: i32, message: &str) -> Option<Termination> {
        Some(Termination {
            exit_code: code,
            reason: if code == 0 { "Completed" } else { "Error" }.to_string(),
            message: message.to_string(),
        })
    }

    fn pod(name: &str, state: ContainerState, last: Option<Termination>) -> NotReadyPod {
        NotReadyPod {
            pod: name.to_string(),
            unschedulable: None,
            containers: vec![ContainerSummary {
                name: "registry".to_string(),
                state,
                last_termination: last,
            }],
        }
    }

    fn reason_and_message(pods: &[NotReadyPod]) -> (String, String) {
        let c = proxy_unavailable(pods);
        assert_eq!(c.status, ConditionStatus::False);
        (c.reason, c.message)
    }

    #[test]
    fn a_crash_looping_pod_is_failing_with_its_last_exit_and_message() {
        let crashing = pod(
            "cachalot-m-7d9f-abcde",
            waiting("CrashLoopBackOff", ""),
            exit(1, CREDENTIALS_ERROR),
        );
        assert_eq!(
            reason_and_message(&[crashing]),
            (
                "RegistryFailing".to_string(),
                format!("registry pod cachalot-m-7d9f-abcde: CrashLoopBackOff; last exit 1: {CREDENTIALS_ERROR}")
            )
        );
    }

    #[test]
    fn every_phase_of_a_crash_loop_reads_the_same() {
        let phases = [
            pod("p", waiting("CrashLoopBackOff", ""), exit(1, "bad CA")),
            pod("p", ContainerState::Running, exit(1, "bad CA")),
            pod("p", ContainerState::Terminated, exit(1, "bad CA")),
            pod("p", waiting("ContainerCreating", ""), exit(1, "bad CA")),
        ];
        for phase in &phases {
            assert_eq!(
                diagnose(phase),
                PodDiagnosis::Failing("CrashLoopBackOff; last exit 1: bad CA".to_string()),
                "{phase:?}"
            );
        }
    }

    #[test]
    fn an_oom_kill_names_its_reason_and_a_clean_exit_loop_its_code() {
        let oom = pod(
            "p",
            waiting("CrashLoopBackOff", ""),
            Some(Termination {
                exit_code: 137,
                reason: "OOMKilled".to_string(),
                message: String::new(),
            }),
        );
        assert_eq!(
            diagnose(&oom),
            PodDiagnosis::Failing("CrashLoopBackOff; last exit 137 (OOMKilled)".to_string())
        );
        let clean = pod("p", waiting("CrashLoopBackOff", ""), exit(0, ""));
        assert_eq!(
            diagnose(&clean),
            PodDiagnosis::Failing("CrashLoopBackOff; last exit 0 (Completed)".to_string())
        );
    }

    #[test]
    fn an_image_pull_failure_reads_the_same_while_the_kubelet_backs_off() {
        let error = "rpc error: code = NotFound desc = ghcr.io/x/cachalot:nope: not found";
        let pulling = pod("p", waiting("ErrImagePull", error), None);
        let backing_off = pod(
            "p",
            waiting(
                "ImagePullBackOff",
                &format!("Back-off pulling image \"ghcr.io/x/cachalot:nope\": {error}"),
            ),
            None,
        );
        let expected = (
            "RegistryFailing".to_string(),
            format!("registry pod p: ImagePullBackOff: {error}"),
        );
        assert_eq!(reason_and_message(&[pulling]), expected);
        assert_eq!(reason_and_message(&[backing_off]), expected);
    }

    #[test]
    fn a_container_that_cannot_be_created_is_failing_with_the_kubelets_message() {
        let p = pod(
            "p",
            waiting("CreateContainerConfigError", "secret \"creds\" not found"),
            None,
        );
        assert_eq!(
            diagnose(&p),
            PodDiagnosis::Failing(
                "CreateContainerConfigError: secret \"creds\" not found".to_string()
            )
        );
    }

    #[test]
    fn a_pod_creating_with_a_mount_message_is_pending() {
        let mount = "MountVolume.SetUp failed for volume \"ca-0\" : configmap references non-existent config key: ca.crt";
        let p = pod("p", waiting("ContainerCreating", mount), None);
        assert_eq!(
            reason_and_message(&[p]),
            (
                "RegistryPending".to_string(),
                format!("registry pod p: ContainerCreating: {mount}")
            )
        );
    }

    #[test]
    fn an_unschedulable_pod_is_pending_with_the_schedulers_message() {
        let p = NotReadyPod {
            pod: "p".to_string(),
            unschedulable: Some("0/3 nodes are available: 3 Insufficient memory.".to_string()),
            containers: Vec::new(),
        };
        assert_eq!(
            reason_and_message(&[p]),
            (
                "RegistryPending".to_string(),
                "registry pod p: unschedulable: 0/3 nodes are available: 3 Insufficient memory."
                    .to_string()
            )
        );
    }

    #[test]
    fn a_pod_being_created_without_a_message_is_pending_all_the_same() {
        let p = pod("p", waiting("ContainerCreating", ""), None);
        assert_eq!(
            reason_and_message(&[p]),
            (
                "RegistryPending".to_string(),
                "registry pod p: ContainerCreating".to_string()
            )
        );
    }

    #[test]
    fn pods_that_are_only_starting_keep_no_ready_pods() {
        let starting = [
            pod("a", waiting("", ""), None),
            pod("b", ContainerState::Running, None),
            pod("c", ContainerState::Running, exit(0, "")),
            NotReadyPod {
                pod: "d".to_string(),
                ..NotReadyPod::default()
            },
        ];
        assert_eq!(
            reason_and_message(&starting),
            (
                "NoReadyPods".to_string(),
                "no registry pod is ready yet".to_string()
            )
        );
        assert_eq!(reason_and_message(&[]).0, "NoReadyPods");
    }

    #[test]
    fn in_a_mix_a_failing_pod_wins_over_pending_and_starting_ones_and_the_others_are_counted() {
        let mix = [
            pod("a", ContainerState::Running, None),
            pod("b", waiting("ContainerCreating", "mounting"), None),
            pod("c", waiting("CrashLoopBackOff", ""), exit(1, "bad CA")),
            pod("d", waiting("ErrImagePull", "not found"), None),
        ];
        assert_eq!(
            reason_and_message(&mix),
            (
                "RegistryFailing".to_string(),
                "registry pod c: CrashLoopBackOff; last exit 1: bad CA; and 3 more registry pods not ready"
                    .to_string()
            )
        );
        assert_eq!(
            reason_and_message(&mix[..2]).1,
            "registry pod b: ContainerCreating: mounting; and 1 more registry pod not ready"
        );
    }

    fn status_with_proxy(reason: &str, message: &str) -> RegistryMirrorStatus {
        RegistryMirrorStatus {
            conditions: vec![
                condition(
                    ConditionType::Ready,
                    ConditionStatus::False,
                    "ProxyUnavailable",
                    message,
                ),
                condition(
                    ConditionType::ProxyAvailable,
                    ConditionStatus::False,
                    reason,
                    message,
                ),
            ],
            ..RegistryMirrorStatus::default()
        }
    }

    #[test]
    fn becoming_registry_failing_is_one_warning_event_even_when_ready_keeps_its_reason() {
        let starting = status_with_proxy("NoReadyPods", "no registry pod is ready yet");
        let failing = status_with_proxy("RegistryFailing", "registry pod p: CrashLoopBackOff");
        let events = transitions(Some(&starting), &failing);
        assert_eq!(
            events,
            vec![Transition {
                warning: true,
                reason: "RegistryFailing".to_string(),
                note: "registry pod p: CrashLoopBackOff".to_string(),
            }]
        );
        let other_cause = status_with_proxy("RegistryFailing", "registry pod q: ImagePullBackOff");
        assert!(transitions(Some(&failing), &other_cause).is_empty());
        assert!(transitions(Some(&failing), &failing).is_empty());
    }

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn warm(state: crate::api::WarmState) -> crate::api::WarmStatus {
        crate::api::WarmStatus {
            observed_hash: "abc".to_string(),
            state,
            ..crate::api::WarmStatus::default()
        }
    }

    #[test]
    fn the_warmed_condition_keeps_its_transition_time_and_other_outcomes_keep_the_warm() {
        let warming = condition(
            ConditionType::Warmed,
            ConditionStatus::Unknown,
            "Warming",
            "0/1",
        );
        let mut first = status_with_proxy("PodsReady", "");
        first.observed_generation = Some(3);
        with_warm(
            &mut first,
            None,
            Some((
                Some(warm(crate::api::WarmState::Warming)),
                Some(warming.clone()),
            )),
            &at(100),
        );
        let c = first.conditions.last().unwrap();
        assert_eq!(c.type_, ConditionType::Warmed, "sorted last");
        assert_eq!(
            (c.last_transition_time.clone(), c.observed_generation),
            (Some(at(100)), Some(3))
        );

        // Still warming later (another message): the same transition time, no event.
        let mut later = status_with_proxy("PodsReady", "");
        let still = MirrorCondition {
            message: "1/2".to_string(),
            ..warming
        };
        with_warm(
            &mut later,
            Some(&first),
            Some((Some(warm(crate::api::WarmState::Warming)), Some(still))),
            &at(200),
        );
        let c = later.conditions.last().unwrap();
        assert_eq!(c.last_transition_time, Some(at(100)));
        assert!(transitions(Some(&first), &later).is_empty());

        // Done: a new transition time and a Normal event; failed: a Warning.
        let mut done = status_with_proxy("PodsReady", "");
        let warmed = condition(
            ConditionType::Warmed,
            ConditionStatus::True,
            "Warmed",
            "1/1",
        );
        with_warm(
            &mut done,
            Some(&later),
            Some((Some(warm(crate::api::WarmState::Done)), Some(warmed))),
            &at(300),
        );
        assert_eq!(
            done.conditions.last().unwrap().last_transition_time,
            Some(at(300))
        );
        let events = transitions(Some(&later), &done);
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].warning, events[0].reason.as_str()),
            (false, "Warmed")
        );
        let mut failed = done.clone();
        let failing = condition(
            ConditionType::Warmed,
            ConditionStatus::False,
            "WarmFailed",
            "x",
        );
        with_warm(
            &mut failed,
            Some(&done),
            Some((Some(warm(crate::api::WarmState::Failed)), Some(failing))),
            &at(400),
        );
        assert_eq!(
            failed
                .conditions
                .iter()
                .filter(|c| c.type_ == ConditionType::Warmed)
                .count(),
            1
        );
        assert!(transitions(Some(&done), &failed)[0].warning);

        // A pass that decides nothing about the warm (invalid spec, conflict) keeps it as it was,
        // without the condition.
        let mut invalid = status_with_proxy("InvalidSpec", "");
        with_warm(&mut invalid, Some(&done), None, &at(500));
        assert_eq!(invalid.warm, done.warm);
        assert!(invalid
            .conditions
            .iter()
            .all(|c| c.type_ != ConditionType::Warmed));
    }
}
