//! Observation stage: what the registry pods and node agents report, fetched over HTTP.
//!
//! Invariants: every fetch has a short timeout and a failure becomes data (`Err(message)` in the
//! observation), never a reconcile error, so one dead node cannot stall a mirror's status. The
//! HTTP calls sit behind the [`Probe`] trait so tests inject fakes; pod listing goes through the
//! Kubernetes client. Results are sorted (by node or pod name) so status is deterministic.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde::{Deserialize, Serialize};

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
            // BTreeMap iteration keeps the registries sorted.
            upstreams: s
                .registries
                .into_iter()
                .filter_map(|(registry, r)| {
                    let b = r.budget?;
                    Some(UpstreamBudget {
                        registry,
                        limit: b.limit,
                        remaining: Some(b.remaining),
                        window_seconds: b.window_seconds,
                        source: b.source,
                    })
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
}

/// The real [`Probe`]: plain HTTP with a short timeout.
#[derive(Clone)]
pub struct HttpProbe {
    client: reqwest::Client,
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
        Ok(Self { client })
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
    /// Ready replicas of the registry workload, from its status.
    pub ready_replicas: i32,
    /// Nodes the agent DaemonSet should run on (its `desiredNumberScheduled`).
    pub desired_nodes: i32,
    /// Agent pods that are running, sorted by node.
    pub agents: Vec<AgentObservation>,
}

fn running_pods(pods: Vec<Pod>) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = pods
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status?;
            if status.phase.as_deref() != Some("Running") {
                return None;
            }
            let ip = status.pod_ip.filter(|ip| !ip.is_empty())?;
            let name = p.metadata.name.unwrap_or_default();
            let node = p
                .spec
                .and_then(|s| s.node_name)
                .unwrap_or_else(|| name.clone());
            Some((name, node, ip))
        })
        .collect();
    out.sort();
    out
}

fn base_url(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]:{port}")
    } else {
        format!("http://{ip}:{port}")
    }
}

/// Lists the running pods of one component of a mirror.
///
/// # Errors
/// [`ObserveError::ListPods`] when the list call fails.
pub async fn list_component_pods(
    pods: &Api<Pod>,
    namespace: &str,
    selector: &str,
    component: &'static str,
) -> Result<Vec<(String, String, String)>, ObserveError> {
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|source| ObserveError::ListPods {
            component,
            namespace: namespace.to_string(),
            source,
        })?;
    Ok(running_pods(list.items))
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
