//! Observation stage: what the registry pods and node agents report, fetched over HTTP, and why
//! registry pods that are not ready are not (from the listed Pods' status, no extra call).
//!
//! Invariants: every fetch has a short timeout and a failure becomes data (`Err(message)` in the
//! observation), never a reconcile error, so one dead node cannot stall a mirror's status. The
//! HTTP calls sit behind the [`Probe`] trait so tests inject fakes; pod listing goes through the
//! Kubernetes client. Results are sorted (by node or pod name) so status is deterministic.
//! [`not_ready_pods`] is a pure function of the Pod list that keeps only what is stable across a
//! crash loop (waiting reason and message, exit code and the last line of the termination
//! message), never restart counts, back-off delays or timestamps, and caps every message at
//! [`MAX_DETAIL_CHARS`].

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodStatus};
use kube::api::{Api, ListParams};
use serde::{Deserialize, Serialize};

use cachalot_registry::api::admin::{WarmEvent, WarmRequest};
use cachalot_registry::telemetry::StatsSnapshot;

use crate::node_agent::protocol::AgentStatus;

/// How many pods are probed at once.
const PROBE_CONCURRENCY: usize = 16;

/// Failure to list pods (a transient reconcile error).
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// Listing the pods of a component failed.
    #[error("cannot list {component} pods in {namespace}: {source}")]
    ListPods {
        /// `registry` or `node-agent`.
        component: &'static str,
        /// Namespace listed.
        namespace: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

impl ObserveError {
    /// The static category used in metrics labels and Event reasons.
    #[must_use]
    pub fn category(&self) -> &'static str {
        "ObserveFailed"
    }
}

/// Failure of one probe (recorded in the observation, not raised).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The HTTP request failed or timed out.
    #[error("GET {url}: {message}")]
    Request {
        /// URL fetched.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The answer was not the expected JSON.
    #[error("GET {url}: unexpected answer: {message}")]
    Decode {
        /// URL fetched.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// The operator's summary of one registry pod's `GET /stats` answer. The wire type is the
/// registry's own [`StatsSnapshot`] (so the shapes cannot drift); [`HttpProbe`] converts it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RegistryStats {
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests fetched from upstream.
    pub misses: u64,
    /// Requests served stale.
    pub stale: u64,
    /// Failed requests.
    pub errors: u64,
    /// Bytes served to clients.
    pub bytes_served: u64,
    /// Bytes fetched from upstream.
    pub bytes_from_upstream: u64,
    /// Requests sent upstream.
    pub upstream_requests: u64,
    /// Bytes in the cache.
    pub cache_size_bytes: u64,
    /// Rate-limit budget per upstream registry, sorted by registry.
    pub upstreams: Vec<UpstreamBudget>,
    /// On a hub: the spokes this pod served, by spoke id.
    pub spokes: std::collections::BTreeMap<String, cachalot_registry::fleet::SpokeStats>,
}

impl From<StatsSnapshot> for RegistryStats {
    fn from(s: StatsSnapshot) -> Self {
        Self {
            hits: s.hits,
            misses: s.misses,
            stale: s.stale,
            errors: s.errors,
            bytes_served: s.served_bytes,
            bytes_from_upstream: s.upstream_bytes,
            upstream_requests: s.upstream_requests.iter().map(|r| r.count).sum(),
            cache_size_bytes: s.cache_size_bytes,
            spokes: s.spokes,
            // BTreeMap iteration keeps the registries sorted.
            upstreams: s
                .registries
                .into_iter()
                .filter(|(_, r)| r.budget.is_some() || r.rate_limited.is_some())
                .map(|(registry, r)| {
                    let b = r.budget;
                    UpstreamBudget {
                        registry,
                        limit: b.as_ref().and_then(|b| b.limit),
                        remaining: b.as_ref().map(|b| b.remaining),
                        window_seconds: b.as_ref().and_then(|b| b.window_seconds),
                        source: b.as_ref().and_then(|b| b.source.clone()),
                        observed_at: b.as_ref().map(|b| b.observed_at).filter(|t| *t > 0),
                        rate_limited: r.rate_limited.map(|l| RateLimitedSpell {
                            observed_at: l.observed_at,
                            until: l.until,
                        }),
                    }
                })
                .collect(),
        }
    }
}

/// One upstream's rate-limit budget as the registry last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UpstreamBudget {
    /// Registry name.
    pub registry: String,
    /// `ratelimit-limit`.
    pub limit: Option<u64>,
    /// `ratelimit-remaining`.
    pub remaining: Option<u64>,
    /// `w=` of the headers.
    pub window_seconds: Option<u64>,
    /// `docker-ratelimit-source`.
    pub source: Option<String>,
    /// Unix seconds when the registry received these figures (`None` from registries that
    /// predate it: the figures are then taken as current).
    pub observed_at: Option<u64>,
    /// The upstream's last 429, while its `Retry-After` wait was in force at the registry.
    pub rate_limited: Option<RateLimitedSpell>,
}

/// A 429 from the upstream and how long it asked the registry to wait (unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RateLimitedSpell {
    /// When the 429 came.
    pub observed_at: u64,
    /// Until when the upstream asked not to be asked again.
    pub until: u64,
}

/// HTTP access to registry pods and node agents.
pub trait Probe: Send + Sync {
    /// `GET <base>/stats` of one registry pod.
    fn registry_stats(
        &self,
        base_url: String,
    ) -> BoxFuture<'static, Result<RegistryStats, ProbeError>>;
    /// `GET <base>/status` of one node agent.
    fn agent_status(&self, base_url: String)
        -> BoxFuture<'static, Result<AgentStatus, ProbeError>>;
    /// `POST <base>/admin/warm` of one registry pod: its progress lines as they come. Probes
    /// that cannot warm (test fakes) answer with one error.
    fn warm(
        &self,
        base_url: String,
        request: WarmRequest,
    ) -> BoxStream<'static, Result<WarmEvent, ProbeError>> {
        let _ = request;
        futures::stream::once(futures::future::ready(Err(ProbeError::Request {
            url: format!("{base_url}/admin/warm"),
            message: "this probe does not warm".to_string(),
        })))
        .boxed()
    }
}

/// The longest warm progress line read.
const MAX_WARM_LINE: usize = 64 * 1024;

/// Splits a byte stream of newline-delimited JSON into warm events. Pure over its input.
pub fn warm_events<S, E>(url: String, bytes: S) -> BoxStream<'static, Result<WarmEvent, ProbeError>>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
    E: std::fmt::Display,
{
    let state = (Box::pin(bytes), Vec::<u8>::new(), false);
    futures::stream::unfold(state, move |(mut bytes, mut buffer, ended)| {
        let url = url.clone();
        async move {
            if ended {
                return None;
            }
            loop {
                if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let event = serde_json::from_slice::<WarmEvent>(&line).map_err(|e| {
                        ProbeError::Decode {
                            url: url.clone(),
                            message: format!("progress line: {e}"),
                        }
                    });
                    let failed = event.is_err();
                    return Some((event, (bytes, buffer, failed)));
                }
                if buffer.len() > MAX_WARM_LINE {
                    let e = ProbeError::Decode {
                        url,
                        message: "a progress line is too long".to_string(),
                    };
                    return Some((Err(e), (bytes, buffer, true)));
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        let e = ProbeError::Request {
                            url,
                            message: e.to_string(),
                        };
                        return Some((Err(e), (bytes, buffer, true)));
                    }
                    None => return None,
                }
            }
        }
    })
    .boxed()
}

/// The real [`Probe`]: plain HTTP with a short timeout (a warm: a short connect timeout, then
/// as long as its lines keep coming, see `controller::warm`).
#[derive(Clone)]
pub struct HttpProbe {
    client: reqwest::Client,
    warm_client: reqwest::Client,
}

impl HttpProbe {
    /// A probe whose every request gives up after `timeout`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(timeout: Duration) -> Result<Self, reqwest::Error> {
        // reqwest is built without a bundled TLS provider; pods are probed over plain HTTP but
        // the client still wants a process default, which is ring as for kube.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(1)
            .build()?;
        let warm_client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .pool_max_idle_per_host(0)
            .build()?;
        Ok(Self {
            client,
            warm_client,
        })
    }

    fn get_json<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        url: String,
    ) -> BoxFuture<'static, Result<T, ProbeError>> {
        let client = self.client.clone();
        async move {
            let response = client
                .get(&url)
                .send()
                .await
                .map_err(|e| ProbeError::Request {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            if !response.status().is_success() {
                return Err(ProbeError::Request {
                    url,
                    message: format!("HTTP {}", response.status()),
                });
            }
            let body = response.bytes().await.map_err(|e| ProbeError::Request {
                url: url.clone(),
                message: e.to_string(),
            })?;
            serde_json::from_slice(&body).map_err(|e| ProbeError::Decode {
                url,
                message: e.to_string(),
            })
        }
        .boxed()
    }
}

impl Probe for HttpProbe {
    fn registry_stats(
        &self,
        base_url: String,
    ) -> BoxFuture<'static, Result<RegistryStats, ProbeError>> {
        self.get_json::<StatsSnapshot>(format!("{base_url}/stats"))
            .map(|r| r.map(RegistryStats::from))
            .boxed()
    }
    fn agent_status(
        &self,
        base_url: String,
    ) -> BoxFuture<'static, Result<AgentStatus, ProbeError>> {
        self.get_json(format!("{base_url}/status"))
    }
    fn warm(
        &self,
        base_url: String,
        request: WarmRequest,
    ) -> BoxStream<'static, Result<WarmEvent, ProbeError>> {
        let client = self.warm_client.clone();
        let url = format!("{base_url}/admin/warm");
        async move {
            let request_error = |message: String| ProbeError::Request {
                url: url.clone(),
                message,
            };
            // A plain struct of strings always serialises.
            let body = serde_json::to_vec(&request).unwrap_or_default();
            let response = client
                .post(&url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .map_err(|e| request_error(e.to_string()))?;
            if !response.status().is_success() {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                let message = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| body.chars().take(200).collect());
                return Err(request_error(format!("HTTP {status}: {message}")));
            }
            Ok(warm_events(url.clone(), response.bytes_stream()))
        }
        .map(|opened| match opened {
            Ok(events) => events,
            Err(e) => futures::stream::once(futures::future::ready(Err(e))).boxed(),
        })
        .flatten_stream()
        .boxed()
    }
}

/// One registry pod and what its `/stats` said.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryPodObservation {
    /// Pod name.
    pub pod: String,
    /// Stats, or why they could not be read.
    pub stats: Result<RegistryStats, String>,
}

/// One agent pod and what its `/status` said.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentObservation {
    /// Node name (pod's `spec.nodeName`, or the pod name before scheduling).
    pub node: String,
    /// Status, or why it could not be read.
    pub status: Result<AgentStatus, String>,
}

/// Everything observed about a mirror's running parts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observations {
    /// Registry pods that are running, sorted by name.
    pub registry_pods: Vec<RegistryPodObservation>,
    /// Registry pods that are not ready and why, sorted by name (see [`not_ready_pods`]).
    pub registry_pods_not_ready: Vec<NotReadyPod>,
    /// Ready replicas of the registry workload, from its status.
    pub ready_replicas: i32,
    /// Nodes the agent DaemonSet should run on (its `desiredNumberScheduled`); `None` while its
    /// controller has not yet observed the current generation (the count may still be 0 or
    /// short while its first pods are created one batch at a time).
    pub desired_nodes: Option<i32>,
    /// Agent pods that are running, sorted by node.
    pub agents: Vec<AgentObservation>,
}

/// The running pods `(name, node, ip)` of a list, sorted: those worth probing. Pure.
#[must_use]
pub fn running_pods(pods: &[Pod]) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            if status.phase.as_deref() != Some("Running") {
                return None;
            }
            let ip = status.pod_ip.clone().filter(|ip| !ip.is_empty())?;
            let name = p.metadata.name.clone().unwrap_or_default();
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_else(|| name.clone());
            Some((name, node, ip))
        })
        .collect();
    out.sort();
    out
}

/// At most this many characters of a waiting or termination message are kept (the end of it,
/// where an error chain names its cause), so status stays small.
pub const MAX_DETAIL_CHARS: usize = 300;

/// Why one registry pod is not ready, as its status says, reduced to what stays the same from
/// one restart to the next.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NotReadyPod {
    /// Pod name.
    pub pod: String,
    /// The scheduler's message (or reason) when `PodScheduled` is `False`.
    pub unschedulable: Option<String>,
    /// Its containers that are not ready, sorted by name.
    pub containers: Vec<ContainerSummary>,
}

/// One container that is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSummary {
    /// Container name.
    pub name: String,
    /// Its current state.
    pub state: ContainerState,
    /// Its most recent termination: `state.terminated` while terminated, else
    /// `lastState.terminated`.
    pub last_termination: Option<Termination>,
}

/// A container's current state, without timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// `state.waiting`: its reason (`ContainerCreating`, `CrashLoopBackOff`, `ErrImagePull`, ...)
    /// and message (empty when none), compacted.
    Waiting {
        /// `state.waiting.reason`.
        reason: String,
        /// `state.waiting.message`, compacted.
        message: String,
    },
    /// `state.running` (started, not ready).
    Running,
    /// `state.terminated` (see [`ContainerSummary::last_termination`]).
    Terminated,
    /// No state reported yet.
    Unknown,
}

/// How a container last ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    /// Exit code.
    pub exit_code: i32,
    /// `Error`, `OOMKilled`, `Completed`, ... (empty when none).
    pub reason: String,
    /// The last meaningful line of the termination message (with `FallbackToLogsOnError`, the
    /// last line the container logged), compacted; empty when none.
    pub message: String,
}

/// Keeps the last [`MAX_DETAIL_CHARS`] characters of a one-line text, marking a cut with `…`.
fn cap(text: &str) -> String {
    let count = text.chars().count();
    if count <= MAX_DETAIL_CHARS {
        return text.to_string();
    }
    let tail: String = text.chars().skip(count - (MAX_DETAIL_CHARS - 1)).collect();
    format!("…{tail}")
}

/// A message on one line, whitespace runs collapsed, capped. Pure.
#[must_use]
pub fn compact_message(text: &str) -> String {
    cap(&text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// What a JSON log line says, without its timestamp: `fields.message` (tracing) or `message` /
/// `msg`, followed by `: error` when an `error` field is present. `None` for other lines.
fn json_log_message(line: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let object = value.as_object()?;
    let fields = object.get("fields").and_then(|f| f.as_object());
    let text = |key: &str| {
        fields
            .and_then(|f| f.get(key))
            .or_else(|| object.get(key))
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
    };
    let message = text("message").or_else(|| text("msg"))?;
    Some(match text("error") {
        Some(error) => format!("{message}: {error}"),
        None => message.to_string(),
    })
}

/// The part of a termination message worth showing: its last meaningful line (a JSON log line
/// reduced to its message, since its timestamp would change at every restart; Rust's backtrace
/// hint after a panic skipped), compacted. Pure.
#[must_use]
pub fn termination_summary(message: &str) -> String {
    let line = message
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
        .unwrap_or_default();
    compact_message(&json_log_message(line).unwrap_or_else(|| line.to_string()))
}

fn termination(t: &k8s_openapi::api::core::v1::ContainerStateTerminated) -> Termination {
    Termination {
        exit_code: t.exit_code,
        reason: t.reason.clone().unwrap_or_default(),
        message: termination_summary(t.message.as_deref().unwrap_or_default()),
    }
}

fn container_summary(c: &ContainerStatus) -> ContainerSummary {
    let current = c.state.as_ref();
    let state = match current {
        Some(s) if s.waiting.is_some() => {
            let w = s.waiting.as_ref();
            let reason = w.and_then(|w| w.reason.clone()).unwrap_or_default();
            // A back-off's message is the kubelet's delay, which grows at every restart.
            let message = if reason == "CrashLoopBackOff" {
                String::new()
            } else {
                compact_message(w.and_then(|w| w.message.as_deref()).unwrap_or_default())
            };
            ContainerState::Waiting { reason, message }
        }
        Some(s) if s.running.is_some() => ContainerState::Running,
        Some(s) if s.terminated.is_some() => ContainerState::Terminated,
        _ => ContainerState::Unknown,
    };
    let last_termination = current
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| c.last_state.as_ref().and_then(|s| s.terminated.as_ref()))
        .map(termination);
    ContainerSummary {
        name: c.name.clone(),
        state,
        last_termination,
    }
}

fn is_ready(status: &PodStatus) -> bool {
    status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Why each pod of a list that is not ready is not: pods that are not deleting, not finished
/// (`Succeeded`/`Failed`: replaced by their controller) and not `Ready`, sorted by name, with
/// their unready containers sorted by name. Pure.
#[must_use]
pub fn not_ready_pods(pods: &[Pod]) -> Vec<NotReadyPod> {
    let mut out: Vec<NotReadyPod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status.clone().unwrap_or_default();
            if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) || is_ready(&status)
            {
                return None;
            }
            let unschedulable = status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                .map(|c| {
                    let text = c
                        .message
                        .as_deref()
                        .filter(|m| !m.is_empty())
                        .or(c.reason.as_deref())
                        .unwrap_or("not scheduled");
                    compact_message(text)
                });
            let mut containers: Vec<ContainerSummary> = status
                .container_statuses
                .iter()
                .flatten()
                .filter(|c| !c.ready)
                .map(container_summary)
                .collect();
            containers.sort_by(|a, b| a.name.cmp(&b.name));
            Some(NotReadyPod {
                pod: p.metadata.name.clone().unwrap_or_default(),
                unschedulable,
                containers,
            })
        })
        .collect();
    out.sort_by(|a, b| a.pod.cmp(&b.pod));
    out
}

/// `http://<ip>:<port>`, brackets around an IPv6 address. Pure.
#[must_use]
pub fn base_url(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]:{port}")
    } else {
        format!("http://{ip}:{port}")
    }
}

/// Lists the pods of one component of a mirror (see [`running_pods`] and [`not_ready_pods`]).
///
/// # Errors
/// [`ObserveError::ListPods`] when the list call fails.
pub async fn list_component_pods(
    pods: &Api<Pod>,
    namespace: &str,
    selector: &str,
    component: &'static str,
) -> Result<Vec<Pod>, ObserveError> {
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|source| ObserveError::ListPods {
            component,
            namespace: namespace.to_string(),
            source,
        })?;
    Ok(list.items)
}

/// Probes the registry pods `(name, node, ip)` concurrently.
pub async fn probe_registries(
    probe: &Arc<dyn Probe>,
    pods: Vec<(String, String, String)>,
    port: i32,
) -> Vec<RegistryPodObservation> {
    let mut out: Vec<RegistryPodObservation> = futures::stream::iter(pods)
        .map(|(pod, _node, ip)| {
            let fut = probe.registry_stats(base_url(&ip, port));
            async move {
                RegistryPodObservation {
                    pod,
                    stats: fut.await.map_err(|e| e.to_string()),
                }
            }
        })
        .buffer_unordered(PROBE_CONCURRENCY)
        .collect()
        .await;
    out.sort_by(|a, b| a.pod.cmp(&b.pod));
    out
}

/// Probes the agent pods `(name, node, ip)` concurrently.
pub async fn probe_agents(
    probe: &Arc<dyn Probe>,
    pods: Vec<(String, String, String)>,
    port: i32,
) -> Vec<AgentObservation> {
    let mut out: Vec<AgentObservation> = futures::stream::iter(pods)
        .map(|(_pod, node, ip)| {
            let fut = probe.agent_status(base_url(&ip, port));
            async move {
                AgentObservation {
                    node,
                    status: fut.await.map_err(|e| e.to_string()),
                }
            }
        })
        .buffer_unordered(PROBE_CONCURRENCY)
        .collect()
        .await;
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use serde_json::json;

    const CREDENTIALS_ERROR: &str = "cachalot-registry: registries.docker.io.credentials: cannot read credentials file /etc/cachalot/credentials/docker.io/username: No such file or directory";

    fn pod(name: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"nodeName": "node-1", "containers": [{"name": "registry"}]},
            "status": status,
        }))
        .unwrap()
    }

    fn crash_looping(name: &str, restarts: i32, back_off: &str) -> Pod {
        pod(
            name,
            json!({
                "phase": "Running", "podIP": "10.0.0.7",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [{
                    "name": "registry", "ready": false, "restartCount": restarts,
                    "image": "cachalot:dev", "imageID": "",
                    "state": {"waiting": {"reason": "CrashLoopBackOff",
                        "message": format!("back-off {back_off} restarting failed container=registry pod={name}")}},
                    "lastState": {"terminated": {
                        "exitCode": 1, "reason": "Error",
                        "startedAt": format!("2026-01-02T00:0{restarts}:00Z"),
                        "finishedAt": format!("2026-01-02T00:0{restarts}:01Z"),
                        "message": format!("{{\"timestamp\":\"2026-01-02T00:0{restarts}:00Z\",\"level\":\"INFO\",\"fields\":{{\"message\":\"starting\"}}}}\n{CREDENTIALS_ERROR}\n"),
                    }},
                }],
            }),
        )
    }

    #[test]
    fn a_crash_looping_pod_keeps_its_exit_code_and_last_log_line_but_no_back_off_or_times() {
        let summary = not_ready_pods(&[crash_looping("cachalot-m-1", 3, "40s")]);
        assert_eq!(
            summary,
            vec![NotReadyPod {
                pod: "cachalot-m-1".to_string(),
                unschedulable: None,
                containers: vec![ContainerSummary {
                    name: "registry".to_string(),
                    state: ContainerState::Waiting {
                        reason: "CrashLoopBackOff".to_string(),
                        message: String::new(),
                    },
                    last_termination: Some(Termination {
                        exit_code: 1,
                        reason: "Error".to_string(),
                        message: CREDENTIALS_ERROR.to_string(),
                    }),
                }],
            }]
        );
        assert_eq!(
            summary,
            not_ready_pods(&[crash_looping("cachalot-m-1", 5, "2m40s")]),
            "restarts, back-off and timestamps leave the summary alone"
        );
    }

    #[test]
    fn a_terminated_container_reports_its_own_termination() {
        let p = pod(
            "p",
            json!({"phase": "Running", "containerStatuses": [{
                "name": "registry", "ready": false, "restartCount": 1, "image": "i", "imageID": "",
                "state": {"terminated": {"exitCode": 2, "reason": "Error", "message": "bad config\n"}},
                "lastState": {"terminated": {"exitCode": 1, "message": "older"}},
            }]}),
        );
        let summary = not_ready_pods(&[p]);
        let c = &summary[0].containers[0];
        assert_eq!(c.state, ContainerState::Terminated);
        assert_eq!(
            c.last_termination,
            Some(Termination {
                exit_code: 2,
                reason: "Error".to_string(),
                message: "bad config".to_string()
            })
        );
    }

    #[test]
    fn an_image_pull_failure_keeps_the_waiting_reason_and_message() {
        let p = pod(
            "p",
            json!({"phase": "Pending", "containerStatuses": [{
                "name": "registry", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                "state": {"waiting": {"reason": "ImagePullBackOff",
                    "message": "Back-off pulling image \"ghcr.io/x/cachalot:nope\": not found"}},
            }]}),
        );
        assert_eq!(
            not_ready_pods(&[p])[0].containers[0].state,
            ContainerState::Waiting {
                reason: "ImagePullBackOff".to_string(),
                message: "Back-off pulling image \"ghcr.io/x/cachalot:nope\": not found"
                    .to_string(),
            }
        );
    }

    #[test]
    fn an_unschedulable_pod_keeps_the_schedulers_message() {
        let p = pod(
            "p",
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient memory."}]}),
        );
        assert_eq!(
            not_ready_pods(&[p]),
            vec![NotReadyPod {
                pod: "p".to_string(),
                unschedulable: Some("0/3 nodes are available: 3 Insufficient memory.".to_string()),
                containers: Vec::new(),
            }]
        );
    }

    #[test]
    fn ready_deleting_and_finished_pods_are_left_out_and_the_rest_is_sorted() {
        let ready = pod(
            "a-ready",
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}),
        );
        let mut deleting = pod("b-deleting", json!({"phase": "Running"}));
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let evicted = pod("c-evicted", json!({"phase": "Failed", "reason": "Evicted"}));
        let names: Vec<String> = not_ready_pods(&[
            pod("z-new", json!({})),
            ready,
            deleting,
            evicted,
            pod("m-running", json!({"phase": "Running"})),
        ])
        .into_iter()
        .map(|p| p.pod)
        .collect();
        assert_eq!(names, ["m-running", "z-new"]);
    }

    #[test]
    fn long_messages_keep_their_end_and_fit_the_cap() {
        let long = format!("{}: the cause", "context ".repeat(100));
        let kept = compact_message(&long);
        assert_eq!(kept.chars().count(), MAX_DETAIL_CHARS);
        assert!(
            kept.starts_with('…') && kept.ends_with("context : the cause"),
            "{kept}"
        );
        assert_eq!(compact_message("a\n  b\tc "), "a b c");
    }

    #[test]
    fn a_termination_message_is_reduced_to_its_last_meaningful_line() {
        assert_eq!(termination_summary(""), "");
        assert_eq!(
            termination_summary("line one\nCA file /x holds no usable PEM certificate\n\n"),
            "CA file /x holds no usable PEM certificate"
        );
        assert_eq!(
            termination_summary(
                "thread 'main' panicked at src/main.rs:3:5:\nboom\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n"
            ),
            "boom"
        );
        assert_eq!(
            termination_summary(
                r#"{"timestamp":"2026-01-02T00:00:00.123Z","level":"ERROR","fields":{"message":"cannot bind","error":"address in use"},"target":"x"}"#
            ),
            "cannot bind: address in use"
        );
        assert_eq!(termination_summary(r#"{"ts":1.5,"msg":"fatal"}"#), "fatal");
    }

    #[test]
    fn running_pods_are_those_with_an_ip_sorted_by_name() {
        let running = |name: &str, ip: &str| pod(name, json!({"phase": "Running", "podIP": ip}));
        assert_eq!(
            running_pods(&[
                running("b", "10.0.0.2"),
                running("a", "10.0.0.1"),
                running("c", ""),
                pod("d", json!({"phase": "Pending"})),
            ]),
            vec![
                (
                    "a".to_string(),
                    "node-1".to_string(),
                    "10.0.0.1".to_string()
                ),
                (
                    "b".to_string(),
                    "node-1".to_string(),
                    "10.0.0.2".to_string()
                ),
            ]
        );
    }
}
