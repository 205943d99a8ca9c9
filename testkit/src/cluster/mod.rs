//! A real Kubernetes control plane for tests: etcd, kube-apiserver (TLS, RBAC, audit log),
//! kube-controller-manager and kube-scheduler, built from source by `scripts/control-plane`, plus
//! fake nodes whose kubelet and kube-proxy are `cachalot-standin` processes and whose container
//! runtime is a real containerd per node, and optionally idle nodes that run nothing (Node
//! objects only, like kwok's; see [`ClusterOptions::idle_nodes`]).
//!
//! Everything of one cluster lives in network namespaces of its own (see [`netns`]): the machine's
//! namespace only sees `127.0.0.1:<port>`, where a forwarder bridges (through a unix socket) to the
//! API server inside the control-plane namespace. Pod IPs and ClusterIPs are private addresses
//! that exist only inside the cluster's namespaces, so nothing in the machine's own namespace ever
//! dials them. Things outside the cluster that pods must reach (the upstream registry on the
//! host's loopback) are given to [`ClusterOptions::externals`]: the proxy stand-in listens on an
//! in-cluster address and pipes to the host port through a unix socket.
//!
//! Invariants: start-up waits on conditions with deadlines (API server `/readyz`, controllers'
//! effects, every node `Ready`); several clusters run side by side (own namespaces, own ports);
//! dropping a [`Cluster`] asks the kubelet stand-ins to stop their pods, then kills whatever is
//! left in its namespaces and removes them.

pub mod audit;
pub mod kubeconfig;
pub mod netns;
pub mod pki;
pub mod tools;

use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, Patch};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::containerd::{Containerd, ContainerdOptions, StartContainerdError};
use crate::process::{
    create_dir, private_dir, write_file, LoggedChild, NotReady, SetUpDirError, SpawnLoggedError,
};
use crate::wait::wait_for;

use self::audit::{parse_audit_log, AuditEvent};
use self::kubeconfig::{render_kubeconfig, Credentials};
use self::netns::{Network, SetUpNetworkError};
use self::pki::{generate_pki, GeneratePkiError, Pki};
use self::tools::FindToolError;

/// The Kubernetes release the control plane is built from (`scripts/control-plane`).
pub const KUBERNETES_VERSION: &str = "v1.36.3";
/// Where a node's containerd reads hosts.toml files, as the node sees it (its CRI `config_path`).
pub const NODE_CERTS_DIR: &str = "/etc/containerd/certs.d";
/// The node's containerd config file, as the node sees it.
pub const NODE_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// The API server's port inside the control-plane namespace.
const API_PORT: u16 = 6443;
/// Controllers the fixture runs: what the operator's objects need (ownership GC, Deployments,
/// DaemonSets, StatefulSets, ServiceAccounts and their tokens, namespaces, endpoints, PDBs).
const CONTROLLERS: &str = "garbage-collector-controller,deployment-controller,\
replicaset-controller,daemonset-controller,statefulset-controller,serviceaccount-controller,\
serviceaccount-token-controller,namespace-controller,endpointslice-controller,\
endpointslice-mirroring-controller,clusterrole-aggregation-controller,\
root-ca-certificate-publisher-controller,disruption-controller,ttl-after-finished-controller,\
job-controller";

/// Label and `NoSchedule` taint (key, value) of the idle nodes ([`ClusterOptions::idle_nodes`]):
/// only pods that tolerate it are placed there.
pub const IDLE_NODE_TAINT: (&str, &str) = ("cachalot.test/idle-node", "true");

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of fake nodes (`node-1` …).
    pub nodes: u8,
    /// Number of idle nodes (`idle-node-1` …): Node objects registered `Ready` and no kubelet,
    /// labelled and tainted (`NoSchedule`) with [`IDLE_NODE_TAINT`], like kwok's nodes; a fake
    /// node's CPU and memory, room for 250 pods (a DaemonSet pod each of a few hundred
    /// DaemonSets). Pods that tolerate the taint are bound there and stay `Pending`; they cost no
    /// process. For measuring what scales with the node count.
    pub idle_nodes: u16,
    /// Images that exist on every node without a pull (like `kind load`): reference → directory of
    /// executables that a container of that image sees at `/usr/local/bin`.
    pub images: Vec<(String, PathBuf)>,
    /// Addresses outside the cluster that pods may reach: in-cluster address (from
    /// [`netns::FIRST_EXTERNAL_IP`] up) → a TCP address on the host's loopback.
    pub externals: Vec<(SocketAddrV4, SocketAddr)>,
    /// Bound of the whole start-up.
    pub start_timeout: Duration,
    /// Extra kube-apiserver flags (for example feature gates).
    pub apiserver_args: Vec<String>,
    /// Extra kube-controller-manager flags (for example `--kube-api-qps=200` when a test makes
    /// thousands of pods).
    pub controller_manager_args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 2,
            idle_nodes: 0,
            images: Vec::new(),
            externals: Vec::new(),
            start_timeout: Duration::from_secs(180),
            apiserver_args: Vec::new(),
            controller_manager_args: Vec::new(),
        }
    }
}

/// Why the cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartClusterError {
    /// An executable is missing.
    #[error(transparent)]
    FindTool(#[from] FindToolError),
    /// Its directory could not be set up.
    #[error(transparent)]
    SetUpDir(#[from] SetUpDirError),
    /// Certificates could not be made.
    #[error(transparent)]
    Pki(#[from] GeneratePkiError),
    /// The network namespaces could not be set up.
    #[error(transparent)]
    Network(#[from] SetUpNetworkError),
    /// A process could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnLoggedError),
    /// A node's containerd did not start.
    #[error("containerd of {node}: {source}")]
    Containerd {
        /// The node.
        node: String,
        /// Why.
        source: StartContainerdError,
    },
    /// A component did not become ready in time.
    #[error("{component} did not become ready: {source}; its log ends with:\n{log}")]
    NotReady {
        /// What was waited for.
        component: String,
        /// Why it is not ready.
        source: NotReady,
        /// Tail of its log.
        log: String,
    },
    /// A condition of the running cluster did not hold in time.
    #[error("{what} within {timeout:?}")]
    TimedOut {
        /// What was waited for.
        what: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The admin client could not be built.
    #[error("build a client from {path}: {message}")]
    Client {
        /// The kubeconfig.
        path: PathBuf,
        /// kube's message.
        message: String,
    },
}

/// Why a ServiceAccount token could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueTokenError {
    /// The TokenRequest call failed.
    #[error("TokenRequest for {namespace}/{service_account}: {source}")]
    Request {
        /// Namespace.
        namespace: String,
        /// ServiceAccount.
        service_account: String,
        /// The API error.
        source: kube::Error,
    },
    /// The kubeconfig could not be written.
    #[error(transparent)]
    Write(#[from] SetUpDirError),
}

/// One fake node.
#[derive(Debug)]
pub struct FakeNode {
    /// The Node's name (`node-<i>`).
    pub name: String,
    /// Its address on the cluster network.
    pub ip: std::net::Ipv4Addr,
    /// Its network namespace.
    pub netns: String,
    /// Its root directory: a hostPath `/x` of its pods is `<root>/x`.
    pub root: PathBuf,
    /// The kubelet stand-in's directory: a pod's volume `v` is under `pods/<uid>/volumes/v`.
    pub run_dir: PathBuf,
    /// Its containerd (real, in the node's namespace).
    pub containerd: Containerd,
}

impl FakeNode {
    /// The host path of a path on this node (`/etc/containerd/certs.d` → `<root>/etc/…`).
    #[must_use]
    pub fn path(&self, node_path: &str) -> PathBuf {
        self.root.join(node_path.trim_start_matches('/'))
    }

    /// The directory containerd reads hosts.toml files from (its `config_path`), on the host.
    #[must_use]
    pub fn certs_dir(&self) -> PathBuf {
        self.path(NODE_CERTS_DIR)
    }
}

/// A running test cluster. See the module documentation.
#[derive(Debug)]
pub struct Cluster {
    // Drop order matters: node stand-ins stop their pods first (explicit in `Drop`), then every
    // child is killed, then the namespaces go, then the directory.
    kubelets: Vec<LoggedChild>,
    nodes: Vec<FakeNode>,
    idle_nodes: Vec<String>,
    others: Vec<(String, LoggedChild)>,
    network: Network,
    pki: Pki,
    api_port: u16,
    admin_kubeconfig: PathBuf,
    in_cluster_kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

/// The poll interval of start-up waits.
const POLL: Duration = Duration::from_millis(100);

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

async fn wait_child(
    component: &str,
    child: &mut LoggedChild,
    deadline: Instant,
    mut ready: impl FnMut() -> bool,
) -> Result<(), StartClusterError> {
    let outcome = child
        .wait_ready(remaining(deadline), POLL, || {
            let ok = ready();
            async move { ok }
        })
        .await;
    outcome.map_err(|source| StartClusterError::NotReady {
        component: component.to_owned(),
        source,
        log: child.log_tail(),
    })
}

fn log_contains(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| text.contains(needle))
}

impl Cluster {
    /// Starts a cluster with default options (two nodes, no images, no externals).
    ///
    /// # Errors
    /// See [`StartClusterError`].
    pub async fn start() -> Result<Self, StartClusterError> {
        Self::start_with(ClusterOptions::default()).await
    }

    /// Starts a cluster.
    ///
    /// # Errors
    /// See [`StartClusterError`]; whatever was started is stopped again.
    #[allow(clippy::too_many_lines)] // one linear start-up sequence reads best in one place
    pub async fn start_with(options: ClusterOptions) -> Result<Self, StartClusterError> {
        let deadline = Instant::now() + options.start_timeout;
        netns::require_root()?;
        let bin = tools::control_plane_bin()?;
        let standin = tools::workspace_binary("cachalot-standin")?;
        netns::sweep_stale();

        let dir = private_dir("ck")?;
        let d = dir.path().to_owned();
        let prefix = netns::new_prefix();
        let pki = generate_pki(&d, &[netns::CONTROL_PLANE_IP, netns::KUBERNETES_SERVICE_IP])?;
        let network = Network::create(&prefix, options.nodes)?;
        let cp = network.control_plane();
        let mut others: Vec<(String, LoggedChild)> = Vec::new();

        // etcd and the API server, inside the control-plane namespace.
        let mut etcd = LoggedChild::spawn(
            Network::command_in(&cp, bin.join("etcd-embed"))
                .arg(d.join("etcd"))
                .arg("http://127.0.0.1:2379")
                .arg("http://127.0.0.1:2380"),
            &d.join("etcd.log"),
        )?;
        let etcd_log = d.join("etcd.log");
        wait_child("etcd", &mut etcd, deadline, || {
            log_contains(&etcd_log, "etcd ready")
        })
        .await?;
        others.push(("etcd".into(), etcd));

        // The bridge from the machine's loopback to the API server: host 127.0.0.1:<port> →
        // unix socket → forwarder inside the control-plane namespace → 127.0.0.1:6443 there.
        let api_sock = d.join("api.sock");
        let mut inner = LoggedChild::spawn(
            Network::command_in(&cp, &standin)
                .arg("forward")
                .arg("--listen")
                .arg(format!("unix:{}", api_sock.display()))
                .arg("--connect")
                .arg(format!("tcp:127.0.0.1:{API_PORT}")),
            &d.join("forward-api-inner.log"),
        )?;
        wait_child("the API forwarder (inside)", &mut inner, deadline, || {
            api_sock.exists()
        })
        .await?;
        others.push(("forward-api-inner".into(), inner));
        let port_file = d.join("api.port");
        let mut outer = LoggedChild::spawn(
            Command::new(&standin)
                .arg("forward")
                .arg("--listen")
                .arg("tcp:127.0.0.1:0")
                .arg("--connect")
                .arg(format!("unix:{}", api_sock.display()))
                .arg("--port-file")
                .arg(&port_file),
            &d.join("forward-api-outer.log"),
        )?;
        wait_child("the API forwarder (host)", &mut outer, deadline, || {
            read_port(&port_file).is_some()
        })
        .await?;
        others.push(("forward-api-outer".into(), outer));
        let api_port = read_port(&port_file).unwrap_or_default();

        let admin = Credentials::ClientCertificate {
            cert_pem: pki.admin_cert_pem.clone(),
            key_pem: pki.admin_key_pem.clone(),
        };
        let admin_kubeconfig = d.join("admin.kubeconfig");
        write_file(
            &admin_kubeconfig,
            render_kubeconfig(
                &format!("https://127.0.0.1:{api_port}"),
                &pki.ca_pem,
                "admin",
                &admin,
                None,
            ),
        )?;
        // For processes inside the cluster's namespaces (controllers, stand-ins).
        let in_cluster_kubeconfig = d.join("in-cluster.kubeconfig");
        write_file(
            &in_cluster_kubeconfig,
            render_kubeconfig(
                &format!("https://{}:{API_PORT}", netns::CONTROL_PLANE_IP),
                &pki.ca_pem,
                "admin",
                &admin,
                None,
            ),
        )?;

        write_file(&d.join("audit-policy.yaml"), audit::POLICY)?;
        let mut apiserver = Network::command_in(&cp, bin.join("kube-apiserver"));
        apiserver
            .args(apiserver_args(&d, &pki))
            .args(&options.apiserver_args);
        let mut apiserver = LoggedChild::spawn(&mut apiserver, &d.join("kube-apiserver.log"))?;
        let client = client_from(&admin_kubeconfig).await?;
        let ready = apiserver
            .wait_ready(remaining(deadline), POLL, || {
                let client = client.clone();
                async move {
                    let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else {
                        return false;
                    };
                    client
                        .request_text(request)
                        .await
                        .is_ok_and(|text| text.trim() == "ok")
                }
            })
            .await;
        if let Err(source) = ready {
            return Err(StartClusterError::NotReady {
                component: "kube-apiserver (/readyz)".into(),
                source,
                log: apiserver.log_tail(),
            });
        }
        others.push(("kube-apiserver".into(), apiserver));

        let mut cluster = Self {
            kubelets: Vec::new(),
            nodes: Vec::new(),
            idle_nodes: Vec::new(),
            others,
            network,
            pki,
            api_port,
            admin_kubeconfig,
            in_cluster_kubeconfig,
            dir,
        };
        cluster.start_controllers(&bin, &options.controller_manager_args)?;
        cluster
            .start_proxy(&standin, &options.externals, deadline)
            .await?;
        for index in 1..=options.nodes {
            cluster
                .start_node(index, &standin, &options.images, deadline)
                .await?;
        }
        cluster.register_idle_nodes(options.idle_nodes).await?;
        cluster.wait_cluster_settled(deadline).await?;
        Ok(cluster)
    }

    /// Registers `count` idle nodes (see [`ClusterOptions::idle_nodes`]): create the Node, report
    /// it `Ready`, then drop the `not-ready` taint that admission adds to every new Node (no node
    /// lifecycle controller runs to do it), keeping only [`IDLE_NODE_TAINT`].
    async fn register_idle_nodes(&mut self, count: u16) -> Result<(), StartClusterError> {
        let nodes: Api<Node> = Api::all(self.client().await?);
        let (key, value) = IDLE_NODE_TAINT;
        let taints = serde_json::json!([{"key": key, "value": value, "effect": "NoSchedule"}]);
        let resources = serde_json::json!({"cpu": "4", "memory": "8Gi", "pods": "250",
                                           "ephemeral-storage": "100Gi"});
        for index in 1..=count {
            let name = format!("idle-node-{index}");
            let failed = |call: &str, e: kube::Error| StartClusterError::Client {
                path: self.admin_kubeconfig.clone(),
                message: format!("{call} idle node {name}: {e}"),
            };
            let node: Node = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": {
                    "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64", key: value}},
                "spec": {"taints": taints}
            }))
            .map_err(|e| StartClusterError::Client {
                path: self.admin_kubeconfig.clone(),
                message: format!("idle node {name}: {e}"),
            })?;
            nodes
                .create(&Default::default(), &node)
                .await
                .map_err(|e| failed("create", e))?;
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let status = serde_json::json!({"status": {
                "capacity": resources, "allocatable": resources,
                "conditions": [{"type": "Ready", "status": "True", "reason": "IdleNode",
                                "message": "registered by the test fixture; no kubelet runs",
                                "lastHeartbeatTime": now, "lastTransitionTime": now}],
                "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                             "kubeletVersion": KUBERNETES_VERSION, "osImage": "idle node"}}});
            nodes
                .patch_status(&name, &Default::default(), &Patch::Merge(&status))
                .await
                .map_err(|e| failed("report status of", e))?;
            nodes
                .patch(
                    &name,
                    &Default::default(),
                    &Patch::Merge(&serde_json::json!({"spec": {"taints": taints}})),
                )
                .await
                .map_err(|e| failed("set the taints of", e))?;
            self.idle_nodes.push(name);
        }
        Ok(())
    }

    fn start_controllers(
        &mut self,
        bin: &Path,
        controller_manager_args: &[String],
    ) -> Result<(), StartClusterError> {
        let d = self.dir.path().to_owned();
        let cp = self.network.control_plane();
        let kubeconfig = self.in_cluster_kubeconfig.clone();
        let mut kcm = Network::command_in(&cp, bin.join("kube-controller-manager"));
        kcm.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args([
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=10257",
                "--controllers",
                CONTROLLERS,
                "--concurrent-gc-syncs=5",
            ])
            .arg(format!(
                "--service-account-private-key-file={}",
                self.pki.service_account_key.display()
            ))
            .arg(format!("--root-ca-file={}", self.pki.ca_cert.display()))
            .args(controller_manager_args);
        self.others.push((
            "kube-controller-manager".into(),
            LoggedChild::spawn(&mut kcm, &d.join("kube-controller-manager.log"))?,
        ));
        let mut scheduler = Network::command_in(&cp, bin.join("kube-scheduler"));
        scheduler
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args([
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=10259",
            ]);
        self.others.push((
            "kube-scheduler".into(),
            LoggedChild::spawn(&mut scheduler, &d.join("kube-scheduler.log"))?,
        ));
        Ok(())
    }

    async fn start_proxy(
        &mut self,
        standin: &Path,
        externals: &[(SocketAddrV4, SocketAddr)],
        deadline: Instant,
    ) -> Result<(), StartClusterError> {
        let d = self.dir.path().to_owned();
        let mut proxy = Network::command_in(&self.network.net(), standin);
        proxy
            .arg("proxy")
            .arg("--kubeconfig")
            .arg(&self.in_cluster_kubeconfig)
            .arg("--ready-file")
            .arg(d.join("proxy.ready"));
        for (n, (inside, host)) in externals.iter().enumerate() {
            let sock = d.join(format!("ext-{n}.sock"));
            let mut forward = LoggedChild::spawn(
                Command::new(standin)
                    .arg("forward")
                    .arg("--listen")
                    .arg(format!("unix:{}", sock.display()))
                    .arg("--connect")
                    .arg(format!("tcp:{host}")),
                &d.join(format!("forward-ext-{n}.log")),
            )?;
            let probe = sock.clone();
            wait_child(
                &format!("the forwarder to {host}"),
                &mut forward,
                deadline,
                || probe.exists(),
            )
            .await?;
            self.others.push((format!("forward-ext-{n}"), forward));
            proxy
                .arg("--external")
                .arg(format!("{inside}=unix:{}", sock.display()));
        }
        let mut proxy = LoggedChild::spawn(&mut proxy, &d.join("proxy.log"))?;
        let ready = d.join("proxy.ready");
        wait_child("the proxy stand-in", &mut proxy, deadline, || {
            ready.exists()
        })
        .await?;
        self.others.push(("proxy".into(), proxy));
        Ok(())
    }

    async fn start_node(
        &mut self,
        index: u8,
        standin: &Path,
        images: &[(String, PathBuf)],
        deadline: Instant,
    ) -> Result<(), StartClusterError> {
        let name = format!("node-{index}");
        let node_dir = self.dir.path().join("nodes").join(&name);
        let root = node_dir.join("root");
        let node_netns = self.network.node(index);
        let certs_dir = root.join(NODE_CERTS_DIR.trim_start_matches('/'));
        create_dir(&certs_dir)?;
        let containerd = Containerd::start_with(ContainerdOptions {
            namespace: "k8s.io".into(),
            cri_registry_config_path: Some(PathBuf::from(NODE_CERTS_DIR)),
            netns: Some(node_netns.clone()),
            config_file: Some(root.join(NODE_CONTAINERD_CONFIG.trim_start_matches('/'))),
            ..ContainerdOptions::default()
        })
        .await
        .map_err(|source| StartClusterError::Containerd {
            node: name.clone(),
            source,
        })?;
        let run_dir = node_dir.join("run");
        create_dir(&run_dir)?;
        let ready = node_dir.join("kubelet.ready");
        let ip = netns::node_ip(index);
        let mut kubelet = Network::command_in(&node_netns, standin);
        kubelet
            .arg("kubelet")
            .arg("--kubeconfig")
            .arg(&self.in_cluster_kubeconfig)
            .args(["--node", &name, "--node-ip", &ip.to_string()])
            .args(["--pod-cidr", &netns::pod_cidr(index)])
            .arg("--node-root")
            .arg(&root)
            .arg("--run-dir")
            .arg(&run_dir)
            .args(["--netns-prefix", self.network.prefix()])
            .args(["--bridge-netns", &self.network.net()])
            .args(["--gateway", &netns::GATEWAY_IP.to_string()])
            .arg("--containerd-socket")
            .arg(containerd.socket())
            .arg("--hosts-dir")
            .arg(&certs_dir)
            .args(["--cluster-ip-range", netns::SERVICE_CIDR])
            .args([
                "--kubernetes-service",
                &format!("{}:443", netns::KUBERNETES_SERVICE_IP),
            ])
            .arg("--ready-file")
            .arg(&ready);
        for (reference, dir) in images {
            kubelet
                .arg("--image")
                .arg(format!("{reference}={}", dir.display()));
        }
        let mut kubelet = LoggedChild::spawn(&mut kubelet, &node_dir.join("kubelet.log"))?;
        wait_child(
            &format!("the kubelet stand-in of {name}"),
            &mut kubelet,
            deadline,
            || ready.exists(),
        )
        .await?;
        self.kubelets.push(kubelet);
        self.nodes.push(FakeNode {
            name,
            ip,
            netns: node_netns,
            root,
            run_dir,
            containerd,
        });
        Ok(())
    }

    /// Waits until every node is `Ready` and the controllers have made the `default`
    /// ServiceAccount, so a test can create pods right away.
    async fn wait_cluster_settled(&self, deadline: Instant) -> Result<(), StartClusterError> {
        let client = self.client().await?;
        let nodes: Api<Node> = Api::all(client.clone());
        let want = self.nodes.len() + self.idle_nodes.len();
        wait_for(remaining(deadline), POLL, || {
            let nodes = nodes.clone();
            async move {
                let list = nodes.list(&Default::default()).await.ok()?;
                let ready = list.items.iter().filter(|n| node_is_ready(n)).count();
                (ready == want).then_some(())
            }
        })
        .await
        .map_err(|_| StartClusterError::TimedOut {
            what: format!("{want} nodes Ready"),
            timeout: remaining(deadline),
        })?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, "default");
        wait_for(remaining(deadline), POLL, || {
            let accounts = accounts.clone();
            async move { accounts.get_opt("default").await.ok().flatten().map(|_| ()) }
        })
        .await
        .map_err(|_| StartClusterError::TimedOut {
            what: "the default ServiceAccount (kube-controller-manager)".into(),
            timeout: remaining(deadline),
        })
    }

    /// The admin kubeconfig (`system:masters`), for kubectl, helm and kube-rs on this machine.
    #[must_use]
    pub fn kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The API server's URL on this machine's loopback.
    #[must_use]
    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// An admin client.
    ///
    /// # Errors
    /// [`StartClusterError::Client`].
    pub async fn client(&self) -> Result<kube::Client, StartClusterError> {
        client_from(&self.admin_kubeconfig).await
    }

    /// The fake nodes.
    #[must_use]
    pub fn nodes(&self) -> &[FakeNode] {
        &self.nodes
    }

    /// The idle nodes' names (registered only; see [`ClusterOptions::idle_nodes`]).
    #[must_use]
    pub fn idle_nodes(&self) -> &[String] {
        &self.idle_nodes
    }

    /// The cluster's working directory (certificates, logs, node roots).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster's network namespaces.
    #[must_use]
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The CA certificate PEM (the trust root of the API server).
    #[must_use]
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// `kubectl` with this cluster's admin kubeconfig.
    ///
    /// # Errors
    /// [`FindToolError`] when kubectl is not installed.
    pub fn kubectl(&self) -> Result<Command, FindToolError> {
        let mut command = Command::new(tools::kubectl()?);
        command.env("KUBECONFIG", &self.admin_kubeconfig);
        Ok(command)
    }

    /// `helm` with this cluster's admin kubeconfig and private helm directories.
    ///
    /// # Errors
    /// [`FindToolError`] when helm is not installed.
    pub fn helm(&self) -> Result<Command, FindToolError> {
        let mut command = Command::new(tools::helm()?);
        let home = self.dir.path().join("helm");
        command
            .env("KUBECONFIG", &self.admin_kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        Ok(command)
    }

    /// Issues a token for `namespace/service_account` with the TokenRequest API and writes a
    /// kubeconfig using it; `in_cluster` selects the API server address seen from inside the
    /// cluster's namespaces instead of this machine's loopback.
    ///
    /// # Errors
    /// [`IssueTokenError`].
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        service_account: &str,
        in_cluster: bool,
    ) -> Result<PathBuf, IssueTokenError> {
        let request_error = |source| IssueTokenError::Request {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            source,
        };
        let client = client_from(&self.admin_kubeconfig)
            .await
            .map_err(|e| request_error(kube::Error::Service(e.to_string().into())))?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, namespace);
        let request = k8s_openapi::api::authentication::v1::TokenRequest {
            spec: Some(k8s_openapi::api::authentication::v1::TokenRequestSpec {
                expiration_seconds: Some(7200),
                ..Default::default()
            }),
            ..Default::default()
        };
        let issued = accounts
            .create_token_request(service_account, &Default::default(), &request)
            .await
            .map_err(request_error)?;
        let token = issued.status.and_then(|s| s.token).unwrap_or_default();
        let server = if in_cluster {
            format!("https://{}:{API_PORT}", netns::CONTROL_PLANE_IP)
        } else {
            self.api_url()
        };
        let path = self.dir.path().join(format!(
            "sa-{namespace}-{service_account}{}.kubeconfig",
            if in_cluster { "-in-cluster" } else { "" }
        ));
        write_file(
            &path,
            render_kubeconfig(
                &server,
                &self.pki.ca_pem,
                &format!("system:serviceaccount:{namespace}:{service_account}"),
                &Credentials::Token(token),
                Some(namespace),
            ),
        )?;
        Ok(path)
    }

    /// Every request the API server has audited so far.
    #[must_use]
    pub fn audit_events(&self) -> Vec<AuditEvent> {
        std::fs::read_to_string(self.dir.path().join("audit.log"))
            .map(|text| parse_audit_log(&text))
            .unwrap_or_default()
    }

    /// The last 4 KiB of a component's log (`kube-apiserver`, `kube-controller-manager`,
    /// `kube-scheduler`, `etcd`, `proxy`, `node-1` for that node's kubelet stand-in, …).
    #[must_use]
    pub fn log_tail(&self, component: &str) -> String {
        if let Some(i) = self.nodes.iter().position(|n| n.name == component) {
            return self
                .kubelets
                .get(i)
                .map(LoggedChild::log_tail)
                .unwrap_or_default();
        }
        self.others
            .iter()
            .find(|(name, _)| name == component)
            .map(|(_, child)| child.log_tail())
            .unwrap_or_default()
    }

    /// Processes on this machine whose environment has `key=value` (for example the containers
    /// of a pod, by `HOSTNAME=<pod>`, which the kubelet stand-in sets), as pids.
    #[must_use]
    pub fn processes_with_env(&self, key: &str, value: &str) -> Vec<u32> {
        let wanted = format!("{key}={value}");
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == wanted.as_bytes()))
            })
            .collect()
    }

    /// A command that runs `program` inside one of this cluster's network namespaces (for
    /// example a node's, to reach a ClusterIP as that node's containerd would).
    #[must_use]
    pub fn command_in(&self, netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        Network::command_in(netns, program)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Ask each kubelet stand-in to stop its pods and remove their namespaces, bounded.
        for kubelet in &self.kubelets {
            let _ = Command::new("kill")
                .args(["-TERM", &kubelet.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for kubelet in &mut self.kubelets {
            while Instant::now() < deadline && matches!(kubelet.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Fields drop next: remaining children are killed, then the namespaces are removed.
    }
}

fn node_is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

fn read_port(path: &Path) -> Option<u16> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|p| *p != 0)
}

async fn client_from(path: &Path) -> Result<kube::Client, StartClusterError> {
    let client_error = |message: String| StartClusterError::Client {
        path: path.to_owned(),
        message,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| client_error(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| client_error(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| client_error(e.to_string()))
}

/// kube-apiserver's flags for a cluster whose files are in `dir`. Pure.
#[must_use]
pub fn apiserver_args(dir: &Path, pki: &Pki) -> Vec<String> {
    let p = |path: &Path| path.display().to_string();
    vec![
        "--etcd-servers=http://127.0.0.1:2379".into(),
        "--bind-address=0.0.0.0".into(),
        format!("--secure-port={API_PORT}"),
        // A real address, so the `kubernetes` Service gets a real EndpointSlice that pods use.
        format!("--advertise-address={}", netns::CONTROL_PLANE_IP),
        format!("--tls-cert-file={}", p(&pki.apiserver_cert)),
        format!("--tls-private-key-file={}", p(&pki.apiserver_key)),
        format!("--client-ca-file={}", p(&pki.ca_cert)),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!(
            "--service-account-key-file={}",
            p(&pki.service_account_public_key)
        ),
        format!(
            "--service-account-signing-key-file={}",
            p(&pki.service_account_key)
        ),
        "--authorization-mode=RBAC".into(),
        format!("--service-cluster-ip-range={}", netns::SERVICE_CIDR),
        "--allow-privileged=true".into(),
        // Nodes have only an InternalIP; logs are fetched from the kubelet stand-in there.
        "--kubelet-preferred-address-types=InternalIP".into(),
        format!("--audit-policy-file={}", p(&dir.join("audit-policy.yaml"))),
        format!("--audit-log-path={}", p(&dir.join("audit.log"))),
        "--audit-log-format=json".into(),
        "--audit-log-mode=blocking".into(),
        "--profiling=false".into(),
    ]
}
