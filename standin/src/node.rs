//! The Node object of this stand-in kubelet: registration (create or update), the status it
//! reports, and the heartbeat (Lease renewal and `Ready` refresh).
//!
//! The node reports itself `Ready` with the usual pressure conditions `False`, only an
//! `InternalIP` address (and `Hostname`, which the fixture's API server never prefers), fixed
//! capacity (4 CPUs, 8 GiB, 110 pods), port 10250 for the kubelet API, and a `nodeInfo` that
//! looks like a containerd 1.6 node of the API server's version.
//!
//! Invariants: metadata and spec are written with server-side apply (field manager
//! `cachalot-standin`), status with a merge patch of the whole owned status; conditions keep
//! their `lastTransitionTime` (the registration time) and only `lastHeartbeatTime` moves; every
//! heartbeat call has a deadline, a failed one is retried on the next tick.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ipam::Cidr;

/// Field manager of every write.
pub const FIELD_MANAGER: &str = "cachalot-standin";
/// The Lease namespace.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// Lease duration written into the Lease.
pub const LEASE_SECONDS: i32 = 40;
/// Heartbeat period.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// Deadline of one API call of the heartbeat.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The kubelet version reported (the API server's).
pub const KUBELET_VERSION: &str = "v1.36.3";
/// The runtime version reported.
pub const RUNTIME_VERSION: &str = "containerd://1.6.20";
/// The kubelet API port.
pub const KUBELET_PORT: i32 = 10250;

/// Taints the node lifecycle controller would remove from a Ready node. The API server's
/// `TaintNodesByCondition` admission adds `not-ready` to every new Node; test clusters run no
/// node lifecycle controller, so the stand-in removes them itself.
pub const READINESS_TAINTS: [&str; 2] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
];

/// The taints of `node` without [`READINESS_TAINTS`], when it has any of them (pure).
pub fn taints_to_keep(node: &Node) -> Option<Vec<Taint>> {
    let taints = node.spec.as_ref()?.taints.as_ref()?;
    let keep: Vec<Taint> = taints
        .iter()
        .filter(|t| !READINESS_TAINTS.contains(&t.key.as_str()))
        .cloned()
        .collect();
    (keep.len() != taints.len()).then_some(keep)
}

/// What identifies this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Node name.
    pub name: String,
    /// Node IP.
    pub ip: Ipv4Addr,
    /// Pod CIDR.
    pub pod_cidr: Cidr,
}

/// The Node's metadata and spec (pure).
pub fn node_object(id: &NodeIdentity) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(id.name.clone()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/hostname".to_owned(), id.name.clone()),
                ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                ("kubernetes.io/arch".to_owned(), "amd64".to_owned()),
                ("beta.kubernetes.io/os".to_owned(), "linux".to_owned()),
                ("beta.kubernetes.io/arch".to_owned(), "amd64".to_owned()),
            ])),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(id.pod_cidr.to_string()),
            pod_cidrs: Some(vec![id.pod_cidr.to_string()]),
            ..Default::default()
        }),
        status: None,
    }
}

fn resources() -> BTreeMap<String, Quantity> {
    BTreeMap::from([
        ("cpu".to_owned(), Quantity("4".to_owned())),
        ("memory".to_owned(), Quantity("8Gi".to_owned())),
        ("pods".to_owned(), Quantity("110".to_owned())),
        ("ephemeral-storage".to_owned(), Quantity("100Gi".to_owned())),
    ])
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    since: Timestamp,
    now: Timestamp,
) -> NodeCondition {
    NodeCondition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(since)),
    }
}

/// The Node's status at `now`, registered at `since` (pure but for the kernel version read).
pub fn node_status(id: &NodeIdentity, since: Timestamp, now: Timestamp) -> NodeStatus {
    NodeStatus {
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".to_owned(),
                address: id.ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".to_owned(),
                address: id.name.clone(),
            },
        ]),
        capacity: Some(resources()),
        allocatable: Some(resources()),
        conditions: Some(vec![
            condition(
                "MemoryPressure",
                false,
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
                since,
                now,
            ),
            condition(
                "DiskPressure",
                false,
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
                since,
                now,
            ),
            condition(
                "PIDPressure",
                false,
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
                since,
                now,
            ),
            condition(
                "Ready",
                true,
                "KubeletReady",
                "cachalot-standin kubelet is posting ready status",
                since,
                now,
            ),
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint { port: KUBELET_PORT }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".to_owned(),
            boot_id: format!("standin-{}", id.name),
            container_runtime_version: RUNTIME_VERSION.to_owned(),
            kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|v| v.trim().to_owned())
                .unwrap_or_default(),
            kube_proxy_version: String::new(),
            kubelet_version: KUBELET_VERSION.to_owned(),
            machine_id: format!("standin-{}", id.name),
            operating_system: "linux".to_owned(),
            os_image: "cachalot-standin (Debian GNU/Linux 12 host processes)".to_owned(),
            system_uuid: format!("standin-{}", id.name),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The node's Lease renewed at `now` (pure).
pub fn lease_object(id: &NodeIdentity, node_uid: Option<String>, now: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(id.name.clone()),
            namespace: Some(LEASE_NAMESPACE.to_owned()),
            owner_references: node_uid.map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".to_owned(),
                    kind: "Node".to_owned(),
                    name: id.name.clone(),
                    uid,
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(id.name.clone()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            renew_time: Some(MicroTime(now)),
            ..Default::default()
        }),
    }
}

/// Why a node write failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterNodeError {
    /// Applying metadata and spec failed.
    #[error("apply node {name}: {source}")]
    Apply {
        /// Node name.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// The status patch failed.
    #[error("patch status of node {name}: {source}")]
    Status {
        /// Node name.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// Removing the readiness taints failed.
    #[error("remove readiness taints of node {name}: {source}")]
    Untaint {
        /// Node name.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// The Lease write failed.
    #[error("renew lease of node {name}: {source}")]
    Lease {
        /// Node name.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// A call did not answer in time.
    #[error("{action} of node {name} timed out")]
    Timeout {
        /// What.
        action: &'static str,
        /// Node name.
        name: String,
    },
}

fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

async fn bounded<T>(
    action: &'static str,
    name: &str,
    call: impl std::future::Future<Output = Result<T, RegisterNodeError>>,
) -> Result<T, RegisterNodeError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(RegisterNodeError::Timeout {
                action,
                name: name.to_owned(),
            })
        })
}

/// Registers the node (create or update) and returns its uid.
pub async fn register(
    client: &Client,
    id: &NodeIdentity,
    since: Timestamp,
) -> Result<Option<String>, RegisterNodeError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let name = id.name.clone();
    let applied = bounded("apply", &name, async {
        nodes
            .patch(&name, &params(), &Patch::Apply(node_object(id)))
            .await
            .map_err(|source| RegisterNodeError::Apply {
                name: name.clone(),
                source,
            })
    })
    .await?;
    patch_status(client, id, since, Timestamp::now()).await?;
    untaint(client, &name).await?;
    Ok(applied.metadata.uid)
}

/// Removes [`READINESS_TAINTS`] from the node `name` if it has any (guarded by its
/// resourceVersion; a conflict is retried by the next heartbeat).
pub async fn untaint(client: &Client, name: &str) -> Result<(), RegisterNodeError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let name = name.to_owned();
    let node = bounded("read", &name, async {
        nodes
            .get(&name)
            .await
            .map_err(|source| RegisterNodeError::Untaint {
                name: name.clone(),
                source,
            })
    })
    .await?;
    let Some(keep) = taints_to_keep(&node) else {
        return Ok(());
    };
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": node.metadata.resource_version },
        "spec": { "taints": if keep.is_empty() { serde_json::Value::Null } else { serde_json::json!(keep) } },
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    bounded("untaint", &name, async {
        nodes
            .patch(&name, &params, &Patch::Merge(&patch))
            .await
            .map(|_| info!(node = %name, "readiness taints removed"))
            .map_err(|source| RegisterNodeError::Untaint {
                name: name.clone(),
                source,
            })
    })
    .await
}

/// Writes the node status with heartbeat `now`.
pub async fn patch_status(
    client: &Client,
    id: &NodeIdentity,
    since: Timestamp,
    now: Timestamp,
) -> Result<(), RegisterNodeError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let name = id.name.clone();
    let patch = serde_json::json!({ "status": node_status(id, since, now) });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    bounded("status patch", &name, async {
        nodes
            .patch_status(&name, &params, &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|source| RegisterNodeError::Status {
                name: name.clone(),
                source,
            })
    })
    .await
}

/// Renews the node's Lease.
pub async fn renew_lease(
    client: &Client,
    id: &NodeIdentity,
    node_uid: Option<String>,
) -> Result<(), RegisterNodeError> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let name = id.name.clone();
    let lease = lease_object(id, node_uid, Timestamp::now());
    bounded("lease renewal", &name, async {
        leases
            .patch(&name, &params(), &Patch::Apply(lease))
            .await
            .map(|_| ())
            .map_err(|source| RegisterNodeError::Lease {
                name: name.clone(),
                source,
            })
    })
    .await
}

/// Renews the Lease and the `Ready` heartbeat every [`HEARTBEAT`] until `cancel`.
pub async fn heartbeat(
    client: Client,
    id: NodeIdentity,
    node_uid: Option<String>,
    since: Timestamp,
    cancel: CancellationToken,
) {
    let mut ticks = tokio::time::interval(HEARTBEAT);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(error) = renew_lease(&client, &id, node_uid.clone()).await {
            warn!(%error, "lease renewal failed");
        }
        if let Err(error) = patch_status(&client, &id, since, Timestamp::now()).await {
            warn!(%error, "node heartbeat failed");
        }
        if let Err(error) = untaint(&client, &id.name).await {
            warn!(%error, "readiness taints not removed");
        }
    }
}

/// Registers the node, retrying up to `attempts` times 2 s apart.
pub async fn register_with_retries(
    client: &Client,
    id: &NodeIdentity,
    since: Timestamp,
    attempts: u32,
) -> Result<Option<String>, RegisterNodeError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match register(client, id, since).await {
            Ok(uid) => {
                info!(node = %id.name, "node registered");
                return Ok(uid);
            }
            Err(error) if attempt < attempts => {
                warn!(%error, attempt, "node registration failed; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn id() -> NodeIdentity {
        NodeIdentity {
            name: "n1".into(),
            ip: Ipv4Addr::new(10, 240, 0, 11),
            pod_cidr: "10.240.1.0/24".parse().unwrap(),
        }
    }

    #[test]
    fn the_node_carries_the_standard_labels_and_its_pod_cidr() {
        let node = node_object(&id());
        let labels = node.metadata.labels.unwrap();
        assert_eq!(labels["kubernetes.io/hostname"], "n1");
        assert_eq!(labels["kubernetes.io/os"], "linux");
        assert_eq!(labels["kubernetes.io/arch"], "amd64");
        assert_eq!(node.spec.unwrap().pod_cidrs.unwrap(), ["10.240.1.0/24"]);
        let json = serde_json::to_value(node_object(&id())).unwrap();
        assert_eq!(
            json["kind"], "Node",
            "server-side apply needs kind and apiVersion"
        );
    }

    #[test]
    fn the_status_is_ready_with_an_internal_ip_and_only_heartbeats_move() {
        let since = Timestamp::from_second(1_700_000_000).unwrap();
        let now = Timestamp::from_second(1_700_000_100).unwrap();
        let status = node_status(&id(), since, now);
        let conditions = status.conditions.unwrap();
        let ready = conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(ready.last_transition_time, Some(Time(since)));
        assert_eq!(ready.last_heartbeat_time, Some(Time(now)));
        for pressure in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
            assert_eq!(
                conditions
                    .iter()
                    .find(|c| c.type_ == pressure)
                    .unwrap()
                    .status,
                "False"
            );
        }
        let addresses = status.addresses.unwrap();
        assert_eq!(addresses[0].type_, "InternalIP");
        assert_eq!(addresses[0].address, "10.240.0.11");
        assert_eq!(status.capacity.unwrap()["pods"], Quantity("110".into()));
        assert_eq!(
            status
                .daemon_endpoints
                .unwrap()
                .kubelet_endpoint
                .unwrap()
                .port,
            10250
        );
        assert_eq!(status.node_info.unwrap().kubelet_version, "v1.36.3");
    }

    #[test]
    fn only_readiness_taints_are_removed() {
        let taint = |key: &str| Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        let mut node = node_object(&id());
        assert_eq!(taints_to_keep(&node), None);
        node.spec.as_mut().unwrap().taints = Some(vec![
            taint("node.kubernetes.io/not-ready"),
            taint("example.com/keep"),
        ]);
        assert_eq!(taints_to_keep(&node), Some(vec![taint("example.com/keep")]));
        node.spec.as_mut().unwrap().taints = Some(vec![taint("example.com/keep")]);
        assert_eq!(taints_to_keep(&node), None);
    }

    #[test]
    fn the_lease_is_held_by_the_node_and_owned_by_it() {
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let lease = lease_object(&id(), Some("uid-1".into()), now);
        assert_eq!(lease.metadata.namespace.as_deref(), Some("kube-node-lease"));
        assert_eq!(lease.metadata.owner_references.unwrap()[0].uid, "uid-1");
        let spec = lease.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("n1"));
        assert_eq!(spec.renew_time, Some(MicroTime(now)));
    }
}
