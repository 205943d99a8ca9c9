//! Pods of this node, run as host processes: the shared node runtime ([`NodeRuntime`]), the
//! manager that starts one worker per pod, the worker itself, and the pure building blocks
//! (environment, volumes, launcher, probes, images, status).
//!
//! Invariants: one worker per pod uid; the worker alone touches its pod's processes, network
//! namespace, files and status; pod IPs come from [`NodeRuntime::allocate_ip`], which never hands
//! out an address another pod of this node uses (in memory or in the API).

pub mod env;
pub mod image;
pub mod launch;
pub mod manager;
pub mod probe;
pub mod status;
pub mod volumes;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::Client;

use crate::ipam::{lowest_free, Cidr};
use crate::netns::Wiring;

use self::env::SourceLookup;
use self::image::Puller;

/// The log files of one container, for the kubelet API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFiles {
    /// The current (or last) run's log.
    pub current: PathBuf,
    /// The previous run's log.
    pub previous: PathBuf,
    /// A run is in progress (a follow keeps streaming).
    pub running: bool,
}

/// Containers' log files by pod (namespace, name) and container name.
pub type LogIndex = HashMap<(String, String), BTreeMap<String, LogFiles>>;

/// What every pod worker of the node shares.
pub struct NodeRuntime {
    /// API client.
    pub client: Client,
    /// The node name.
    pub node_name: String,
    /// The node IP.
    pub node_ip: Ipv4Addr,
    /// The node's pod CIDR.
    pub pod_cidr: Cidr,
    /// Prefix of pod network namespace names.
    pub netns_prefix: String,
    /// How pod namespaces attach to the bridge.
    pub wiring: Wiring,
    /// Pods' files and logs: `<run_dir>/pods/<uid>/…`.
    pub run_dir: PathBuf,
    /// Where hostPath volumes map to.
    pub node_root: PathBuf,
    /// Local images (normalised reference → directory for `/usr/local/bin`).
    pub images: BTreeMap<String, PathBuf>,
    /// Pulls other images, when a containerd socket is configured.
    pub puller: Option<Puller>,
    /// The `kubernetes` Service address.
    pub kubernetes_service: SocketAddrV4,
    /// Pods bound to this node.
    pub pods: Store<Pod>,
    /// All ConfigMaps.
    pub config_maps: Store<ConfigMap>,
    /// All Secrets.
    pub secrets: Store<Secret>,
    /// HTTP client of probes (no certificate verification, no proxy, no redirects).
    pub http: reqwest::Client,
    /// Merged-usr symlinks and real top-level directories of the host.
    pub host_layout: (Vec<(String, PathBuf)>, Vec<String>),
    /// Pod IPs handed out by this process.
    allocated: Mutex<BTreeSet<Ipv4Addr>>,
    /// Log files, for `/containerLogs`.
    logs: Mutex<LogIndex>,
}

impl std::fmt::Debug for NodeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRuntime")
            .field("node_name", &self.node_name)
            .field("node_ip", &self.node_ip)
            .field("pod_cidr", &self.pod_cidr)
            .finish_non_exhaustive()
    }
}

/// The settings of a [`NodeRuntime`] besides the stores.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The node name.
    pub node_name: String,
    /// The node IP.
    pub node_ip: Ipv4Addr,
    /// The pod CIDR.
    pub pod_cidr: Cidr,
    /// Prefix of pod network namespaces.
    pub netns_prefix: String,
    /// Bridge wiring.
    pub wiring: Wiring,
    /// Run directory.
    pub run_dir: PathBuf,
    /// Node root.
    pub node_root: PathBuf,
    /// Local images.
    pub images: BTreeMap<String, PathBuf>,
    /// Puller.
    pub puller: Option<Puller>,
    /// `kubernetes` Service.
    pub kubernetes_service: SocketAddrV4,
}

/// The reflector stores a [`NodeRuntime`] reads.
#[derive(Debug, Clone)]
pub struct NodeStores {
    /// Pods of this node.
    pub pods: Store<Pod>,
    /// ConfigMaps.
    pub config_maps: Store<ConfigMap>,
    /// Secrets.
    pub secrets: Store<Secret>,
}

impl NodeRuntime {
    /// A runtime from its parts.
    pub fn new(
        client: Client,
        settings: NodeSettings,
        stores: NodeStores,
        http: reqwest::Client,
    ) -> Self {
        Self {
            client,
            node_name: settings.node_name,
            node_ip: settings.node_ip,
            pod_cidr: settings.pod_cidr,
            netns_prefix: settings.netns_prefix,
            wiring: settings.wiring,
            run_dir: settings.run_dir,
            node_root: settings.node_root,
            images: settings.images,
            puller: settings.puller,
            kubernetes_service: settings.kubernetes_service,
            pods: stores.pods,
            config_maps: stores.config_maps,
            secrets: stores.secrets,
            http,
            host_layout: launch::host_layout(),
            allocated: Mutex::new(BTreeSet::new()),
            logs: Mutex::new(LogIndex::new()),
        }
    }

    /// A pod IP for `pod`: the one in its status if free (a restarted stand-in keeps addresses),
    /// else the lowest free one. `None` when the CIDR is full.
    pub fn allocate_ip(&self, pod: &Pod) -> Option<Ipv4Addr> {
        let uid = pod.metadata.uid.as_deref();
        let mut in_use: BTreeSet<Ipv4Addr> = self
            .pods
            .state()
            .iter()
            .filter(|p| p.metadata.uid.as_deref() != uid)
            .filter(|p| {
                !p.spec
                    .as_ref()
                    .and_then(|s| s.host_network)
                    .unwrap_or(false)
            })
            .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
            .collect();
        let mut allocated = self
            .allocated
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        in_use.extend(allocated.iter().copied());
        let previous: Option<Ipv4Addr> = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|ip| ip.parse().ok())
            .filter(|ip| {
                self.pod_cidr.contains(*ip) && *ip != self.node_ip && !in_use.contains(ip)
            });
        let ip = previous.or_else(|| lowest_free(self.pod_cidr, &in_use))?;
        allocated.insert(ip);
        Some(ip)
    }

    /// Gives `ip` back.
    pub fn release_ip(&self, ip: Ipv4Addr) {
        self.allocated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ip);
    }

    /// Publishes the log files of a pod (`None` removes them).
    pub fn publish_logs(
        &self,
        namespace: &str,
        name: &str,
        files: Option<BTreeMap<String, LogFiles>>,
    ) {
        let mut logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (namespace.to_owned(), name.to_owned());
        match files {
            Some(files) => {
                logs.insert(key, files);
            }
            None => {
                logs.remove(&key);
            }
        }
    }

    /// The log files of a container.
    pub fn log_files(
        &self,
        namespace: &str,
        name: &str,
        container: Option<&str>,
    ) -> Option<LogFiles> {
        let logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        let files = logs.get(&(namespace.to_owned(), name.to_owned()))?;
        match container {
            Some(container) => files.get(container).cloned(),
            // Without a container name the pod must have exactly one (as kubectl requires).
            None if files.len() == 1 => files.values().next().cloned(),
            None => None,
        }
    }

    /// ConfigMaps and Secrets of `namespace`.
    pub fn sources<'a>(&'a self, namespace: &'a str) -> NamespaceSources<'a> {
        NamespaceSources {
            runtime: self,
            namespace,
        }
    }
}

/// The ConfigMaps and Secrets of one namespace, from the reflector stores.
#[derive(Debug, Clone, Copy)]
pub struct NamespaceSources<'a> {
    runtime: &'a NodeRuntime,
    namespace: &'a str,
}

impl SourceLookup for NamespaceSources<'_> {
    fn config_map(&self, name: &str) -> Option<ConfigMap> {
        let key = ObjectRef::new(name).within(self.namespace);
        self.runtime.config_maps.get(&key).map(|c| (*c).clone())
    }

    fn secret(&self, name: &str) -> Option<Secret> {
        let key = ObjectRef::new(name).within(self.namespace);
        self.runtime.secrets.get(&key).map(|s| (*s).clone())
    }
}
