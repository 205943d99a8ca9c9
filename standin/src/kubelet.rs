//! `cachalot-standin kubelet`: one per fake node, started in the node's network namespace and
//! the host's mount namespace. Registers the Node, keeps its Lease and `Ready` heartbeat, runs
//! the pods bound to it as host processes ([`crate::pods`]), serves the kubelet API subset
//! ([`crate::kubelet_api`]) and the node's NodePorts ([`crate::proxy::run_node_ports`]).
//!
//! Start-up order: client → Node registered → reflectors (pods of this node, ConfigMaps,
//! Secrets, Services, EndpointSlices) listed → `--ready-file` written → pods run. SIGTERM stops
//! every pod (bounded), removes their network namespaces and exits 0.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher;
use kube::Api;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api_client::{self, ConnectApiError};
use crate::ipam::Cidr;
use crate::netns::Wiring;
use crate::node::{self, NodeIdentity, RegisterNodeError};
use crate::pods::image::{normalize, Puller};
use crate::pods::{manager, NodeRuntime, NodeSettings, NodeStores};
use crate::proxy::{self, reflect, wait_synced, SyncWatchError};

/// `--image REF=DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    /// The reference as given.
    pub reference: String,
    /// The directory the container sees at `/usr/local/bin`.
    pub dir: PathBuf,
}

/// Why an `--image` value is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not REF=DIR")]
pub struct ParseLocalImageError(String);

impl std::str::FromStr for LocalImage {
    type Err = ParseLocalImageError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once('=') {
            Some((reference, dir)) if !reference.is_empty() && !dir.is_empty() => Ok(Self {
                reference: reference.to_owned(),
                dir: PathBuf::from(dir),
            }),
            _ => Err(ParseLocalImageError(text.to_owned())),
        }
    }
}

/// `cachalot-standin kubelet`.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeletArgs {
    /// Kubeconfig of the cluster (the API server as seen from the node's namespace).
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Node name.
    #[arg(long)]
    pub node: String,
    /// Node IP (its address in the node namespace; reported as InternalIP; kubelet API and
    /// NodePorts).
    #[arg(long)]
    pub node_ip: Ipv4Addr,
    /// Pod CIDR of the node; pod IPs are taken from `.2` up.
    #[arg(long)]
    pub pod_cidr: Cidr,
    /// The node's root directory: hostPath volumes map into it.
    #[arg(long)]
    pub node_root: PathBuf,
    /// Pods' files and logs (`<run-dir>/pods/<uid>/…`).
    #[arg(long)]
    pub run_dir: PathBuf,
    /// Prefix of network namespace names (pod namespaces are `<prefix>-p<uid hex>`).
    #[arg(long)]
    pub netns_prefix: String,
    /// Network namespace holding the bridge `br0` (`<prefix>-net`).
    #[arg(long)]
    pub bridge_netns: String,
    /// Default gateway of pods (the bridge address).
    #[arg(long)]
    pub gateway: Ipv4Addr,
    /// Prefix length of pod addresses on eth0 (the bridge network's).
    #[arg(long, default_value_t = 16)]
    pub pod_prefix_len: u8,
    /// The node's containerd socket (pulls of images not given with --image).
    #[arg(long)]
    pub containerd_socket: Option<PathBuf>,
    /// The node's containerd certs.d directory on the host (`ctr --hosts-dir`).
    #[arg(long)]
    pub hosts_dir: Option<PathBuf>,
    /// The ctr executable.
    #[arg(long, default_value = "/usr/bin/ctr")]
    pub ctr: PathBuf,
    /// `REF=DIR`: an image present on the node without pull; DIR's files appear at
    /// /usr/local/bin in its containers (repeatable).
    #[arg(long = "image")]
    pub images: Vec<LocalImage>,
    /// Service cluster IP range (informational).
    #[arg(long, default_value = "10.96.0.0/24")]
    pub cluster_ip_range: Cidr,
    /// The `kubernetes` Service address, for KUBERNETES_SERVICE_HOST/PORT.
    #[arg(long, default_value = "10.96.0.1:443")]
    pub kubernetes_service: SocketAddrV4,
    /// Port of the kubelet API (HTTPS, on the node IP).
    #[arg(long, default_value_t = 10250)]
    pub kubelet_port: u16,
    /// Written (empty) once the Node is registered and the watches have synced.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// Why the kubelet stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// No API client.
    #[error(transparent)]
    Connect(#[from] ConnectApiError),
    /// The Node could not be registered.
    #[error(transparent)]
    Register(#[from] RegisterNodeError),
    /// A watch did not sync.
    #[error(transparent)]
    Sync(#[from] SyncWatchError),
    /// A directory could not be created.
    #[error("create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The ready file could not be written.
    #[error("write ready file {path}: {source}")]
    ReadyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The probe HTTP client could not be built.
    #[error("build the probe HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
}

/// Attempts of the Node registration (2 s apart).
const REGISTER_ATTEMPTS: u32 = 30;

/// Runs the kubelet until `cancel`.
pub async fn run(args: KubeletArgs, cancel: CancellationToken) -> Result<(), KubeletError> {
    // Start-up (registration retries, watch sync) gives way to a signal at once.
    let (rt, pods_changed) = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        started = start(&args, cancel.clone()) => started?,
    };
    manager::run(rt, pods_changed, cancel).await;
    // Let the last log lines out.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}

/// Everything up to the ready file: returns the runtime and the pod-change notifier.
async fn start(
    args: &KubeletArgs,
    cancel: CancellationToken,
) -> Result<(Arc<NodeRuntime>, Arc<Notify>), KubeletError> {
    let client = api_client::from_kubeconfig(&args.kubeconfig).await?;
    for dir in [&args.run_dir, &args.node_root] {
        std::fs::create_dir_all(dir).map_err(|source| KubeletError::CreateDir {
            path: dir.clone(),
            source,
        })?;
    }
    let id = NodeIdentity {
        name: args.node.clone(),
        ip: args.node_ip,
        pod_cidr: args.pod_cidr,
    };
    let since = Timestamp::now();
    let node_uid = node::register_with_retries(&client, &id, since, REGISTER_ATTEMPTS).await?;
    tokio::spawn(node::heartbeat(
        client.clone(),
        id.clone(),
        node_uid,
        since,
        cancel.clone(),
    ));

    let pods_changed = Arc::new(Notify::new());
    let services_changed = Arc::new(Notify::new());
    let on_node = watcher::Config::default().fields(&format!("spec.nodeName={}", args.node));
    let pods = reflect::<Pod>(
        Api::all(client.clone()),
        on_node,
        pods_changed.clone(),
        cancel.clone(),
    );
    let config_maps = reflect::<ConfigMap>(
        Api::all(client.clone()),
        watcher::Config::default(),
        pods_changed.clone(),
        cancel.clone(),
    );
    let secrets = reflect::<Secret>(
        Api::all(client.clone()),
        watcher::Config::default(),
        pods_changed.clone(),
        cancel.clone(),
    );
    let services = reflect::<Service>(
        Api::all(client.clone()),
        watcher::Config::default(),
        services_changed.clone(),
        cancel.clone(),
    );
    let slices = reflect::<EndpointSlice>(
        Api::all(client.clone()),
        watcher::Config::default(),
        services_changed.clone(),
        cancel.clone(),
    );

    let images: BTreeMap<String, PathBuf> = args
        .images
        .iter()
        .map(|image| {
            if !image.dir.is_dir() {
                warn!(image = %image.reference, dir = %image.dir.display(), "image directory missing");
            }
            (normalize(&image.reference), image.dir.clone())
        })
        .collect();
    let puller = args.containerd_socket.clone().map(|socket| Puller {
        ctr: args.ctr.clone(),
        socket,
        hosts_dir: args.hosts_dir.clone(),
    });
    let http = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let settings = NodeSettings {
        node_name: args.node.clone(),
        node_ip: args.node_ip,
        pod_cidr: args.pod_cidr,
        netns_prefix: args.netns_prefix.clone(),
        wiring: Wiring {
            bridge_netns: args.bridge_netns.clone(),
            bridge: "br0".to_owned(),
            gateway: args.gateway,
            prefix_len: args.pod_prefix_len,
        },
        run_dir: args.run_dir.clone(),
        node_root: args.node_root.clone(),
        images,
        puller,
        kubernetes_service: args.kubernetes_service,
    };
    let stores = NodeStores {
        pods: pods.clone(),
        config_maps: config_maps.clone(),
        secrets: secrets.clone(),
    };
    let rt = Arc::new(NodeRuntime::new(client, settings, stores, http));

    let api_addr = SocketAddr::new(IpAddr::V4(args.node_ip), args.kubelet_port);
    let names = vec![args.node.clone(), args.node_ip.to_string()];
    let api_rt = rt.clone();
    let api_cancel = cancel.clone();
    tokio::spawn(async move {
        if let Err(error) = crate::kubelet_api::serve(api_addr, names, api_rt, api_cancel).await {
            error!(%error, "kubelet API stopped");
        }
    });

    wait_synced(&pods, "Pod").await?;
    wait_synced(&config_maps, "ConfigMap").await?;
    wait_synced(&secrets, "Secret").await?;
    wait_synced(&services, "Service").await?;
    wait_synced(&slices, "EndpointSlice").await?;
    tokio::spawn(proxy::run_node_ports(
        services,
        slices,
        services_changed,
        cancel.clone(),
    ));

    if let Some(path) = &args.ready_file {
        crate::forward::write_file_atomically(path, b"").map_err(|source| {
            KubeletError::ReadyFile {
                path: path.clone(),
                source,
            }
        })?;
    }
    info!(node = %args.node, "kubelet ready");
    Ok((rt, pods_changed))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn image_mappings_parse() {
        let image: LocalImage = "ghcr.io/cachalot-dev/cachalot:0.1.0=/tmp/img"
            .parse()
            .unwrap();
        assert_eq!(image.reference, "ghcr.io/cachalot-dev/cachalot:0.1.0");
        assert_eq!(image.dir, PathBuf::from("/tmp/img"));
        assert!("busybox".parse::<LocalImage>().is_err());
        assert!("=dir".parse::<LocalImage>().is_err());
    }
}
