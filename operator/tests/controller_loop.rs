//! The RegistryMirror controller loop end to end against a real control plane
//! ([`cachalot_testkit::cluster`]: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
//! fake nodes whose kubelet is `cachalot-standin`): apply a mirror → owned objects → status →
//! spec change → owned objects follow → delete → finalizer flow completes; a mirror with
//! configured nodes is `Ready` and its deletion waits for the node files; a ready mirror's later
//! passes make no write request (counted in the API server's audit log); a mirror with
//! `spec.tls` waits for its Secret (`TlsSecretMissing`), then is Ready over https once its
//! certificate names the endpoint, with the Secret's `ca.crt` installed on the node, and stays
//! Ready with mTLS `clientAuth` once the nodes' client certificate Secret exists (installed on
//! the node, key mode 0600).
//!
//! What is real: the API server (validation, defaulting, server-side apply, watches, RBAC), the
//! Deployment, ReplicaSet and DaemonSet controllers that make the pods, the scheduler, the garbage
//! collector that removes owned objects through their owner references, and the pods themselves:
//! every node has the cachalot image (the workspace's `cachalot-registry` and `cachalot-operator`
//! binaries), so registry pods serve and pass their readiness probe, and node agent pods write
//! hosts.toml files into the node's directory.
//!
//! What is faked: the controller runs in the test process (`controller::run_with`, no leader
//! election, admin client), which sits in the machine's own network namespace and cannot dial
//! pod IPs, so its `Probe` is the test's. In the first test it answers fixed `/stats` numbers
//! (so their way into status is checked exactly); in the others it reaches the real `/stats` and
//! `/status` of the pods through the API server's pod proxy.
//!
//! Needs root, the control plane (`scripts/control-plane`) and the workspace binaries; see
//! `common::cluster` for the skip rule.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachalot_operator::controller::build::{
    agent_name, registry_config_name, registry_name, DESIRED_KEY,
};
use cachalot_operator::controller::observe::{Probe, ProbeError, RegistryStats};
use cachalot_operator::controller::{run_with, ControllerConfig};
use cachalot_operator::metrics::Metrics;
use cachalot_operator::node_agent::protocol::AgentStatus;
use cachalot_registry::telemetry::StatsSnapshot;
use cachalot_testkit::certs::TestCa;
use cachalot_testkit::cluster::audit::AuditEvent;
use common::cluster::{
    apply_mirror, condition, condition_is_true, eventually, mirrors_api, prerequisites_or_skip,
    wait_for_mirror_status, OperatorCluster, IMAGE,
};
use common::registry_stats;
use futures::future::BoxFuture;
use futures::FutureExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use tokio::sync::oneshot;

const NS: &str = "mirrors";
const MIRROR: &str = "hub";
/// Bound of the controller's shutdown.
const STOP: Duration = Duration::from_secs(30);

/// Fixed `/stats` numbers for every registry pod; node agents never answer.
struct FixedStatsProbe;

impl Probe for FixedStatsProbe {
    fn registry_stats(
        &self,
        _base_url: String,
    ) -> BoxFuture<'static, Result<RegistryStats, ProbeError>> {
        async { Ok(registry_stats(3, 1, 0, 97)) }.boxed()
    }

    fn agent_status(
        &self,
        base_url: String,
    ) -> BoxFuture<'static, Result<AgentStatus, ProbeError>> {
        async move {
            Err(ProbeError::Request {
                url: base_url,
                message: "no agent answers in this test".into(),
            })
        }
        .boxed()
    }
}

/// The pods' real `/stats` and `/status`, reached through the API server's pod proxy
/// (`/api/v1/namespaces/<ns>/pods/<pod>:<port>/proxy/<path>`): the pod is found by the IP the
/// operator would dial. While `agents_held` is set, agents do not answer (as if their nodes
/// were unreachable).
struct PodProxyProbe {
    client: kube::Client,
    agents_held: Arc<AtomicBool>,
}

impl PodProxyProbe {
    fn new(client: &kube::Client) -> Self {
        Self {
            client: client.clone(),
            agents_held: Arc::new(AtomicBool::new(false)),
        }
    }

    fn get<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        base_url: String,
        path: &'static str,
    ) -> BoxFuture<'static, Result<T, ProbeError>> {
        let client = self.client.clone();
        async move {
            let fail = |message: String| ProbeError::Request {
                url: format!("{base_url}{path}"),
                message,
            };
            let authority = base_url.trim_start_matches("http://");
            let (ip, port) = authority
                .rsplit_once(':')
                .ok_or_else(|| fail("no port in the URL".into()))?;
            let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
            let listed = pods
                .list(&ListParams::default().fields(&format!("status.podIP={ip}")))
                .await
                .map_err(|e| fail(e.to_string()))?;
            let pod = listed
                .items
                .into_iter()
                .find(|p| p.metadata.deletion_timestamp.is_none())
                .and_then(|p| p.metadata.name)
                .ok_or_else(|| fail(format!("no pod has IP {ip}")))?;
            let request = http::Request::get(format!(
                "/api/v1/namespaces/{NS}/pods/{pod}:{port}/proxy{path}"
            ))
            .body(Vec::new())
            .map_err(|e| fail(e.to_string()))?;
            let text = client
                .request_text(request)
                .await
                .map_err(|e| fail(e.to_string()))?;
            serde_json::from_str(&text).map_err(|e| ProbeError::Decode {
                url: format!("{base_url}{path}"),
                message: e.to_string(),
            })
        }
        .boxed()
    }
}

impl Probe for PodProxyProbe {
    fn registry_stats(
        &self,
        base_url: String,
    ) -> BoxFuture<'static, Result<RegistryStats, ProbeError>> {
        self.get::<StatsSnapshot>(base_url, "/stats")
            .map(|r| r.map(RegistryStats::from))
            .boxed()
    }

    fn agent_status(
        &self,
        base_url: String,
    ) -> BoxFuture<'static, Result<AgentStatus, ProbeError>> {
        if self.agents_held.load(Ordering::SeqCst) {
            return async move {
                Err(ProbeError::Request {
                    url: base_url,
                    message: "held back by the test".into(),
                })
            }
            .boxed();
        }
        self.get(base_url, "/status")
    }
}

/// `controller::run_with` on a task (no leader election), in the test namespace.
struct RunningController {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningController {
    fn start(
        client: &kube::Client,
        probe: Arc<dyn Probe>,
        metrics: Arc<Metrics>,
        requeue_after: Duration,
    ) -> Self {
        let mut config = ControllerConfig::new(IMAGE);
        config.namespace = Some(NS.to_owned());
        config.requeue_after = requeue_after;
        config.cleanup_requeue_after = Duration::from_millis(200);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run_with(
            client.clone(),
            config,
            probe,
            metrics,
            async move {
                let _ = stopped.await;
            },
        ));
        Self { stop, task }
    }

    /// Shuts the controller down and checks that it stops in time.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(STOP, self.task)
            .await
            .expect("the controller stops on shutdown")
            .unwrap();
    }
}

fn docker_hub() -> Value {
    json!({"registries": [{"name": "docker.io"}]})
}

/// Waits until the `K` named `name` exists, and returns it.
async fn wait_for_object<K>(api: &Api<K>, name: &str) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let what = format!("{} {name}", std::any::type_name::<K>());
    eventually(&what, || async { api.get_opt(name).await.ok().flatten() }).await
}

/// Waits until the `K` named `name` is gone (deleted by the garbage collector, for example).
async fn wait_for_absence<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let what = format!("{} {name} to be gone", std::any::type_name::<K>());
    eventually(&what, || async {
        matches!(api.get_opt(name).await, Ok(None)).then_some(())
    })
    .await;
}

/// Waits until the mirror satisfies `check`, and returns it.
async fn wait_for_mirror(
    what: &str,
    mirrors: &Api<DynamicObject>,
    check: impl Fn(&DynamicObject) -> bool,
) -> DynamicObject {
    wait_for_mirror_status(what, mirrors, MIRROR, check).await
}

fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.uid == uid && r.kind == "RegistryMirror" && r.controller == Some(true))
}

fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Mean reconcile duration from the operator's own histogram (`…_sum / …_count`).
fn reconcile_sum_count(metrics: &Metrics) -> Option<(f64, f64)> {
    let text = metrics.encode().ok()?;
    let value = |suffix: &str| {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let mut fields = l.split_whitespace();
            let name = fields.next()?;
            let wanted = name.contains("duration") && name.ends_with(suffix);
            wanted.then(|| fields.next()?.parse::<f64>().ok()).flatten()
        })
    };
    Some((value("_sum")?, value("_count")?))
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_mirror_goes_from_apply_to_owned_objects_and_status_then_follows_spec_and_is_finalized(
) {
    if !prerequisites_or_skip("registry_mirror_goes_from_apply_to_owned_objects") {
        return;
    }
    let env = OperatorCluster::start(1, 0, NS).await;
    let client = env.client.clone();
    let metrics = Arc::new(Metrics::new());
    let controller = RunningController::start(
        &client,
        Arc::new(FixedStatsProbe),
        metrics.clone(),
        Duration::from_millis(300),
    );

    // 1. Apply a mirror whose agents select no node: the operator adds its finalizer and applies
    //    every owned object; the DaemonSet exists but runs no pod.
    let mirrors = mirrors_api(&client, NS);
    let started = Instant::now();
    let spec = json!({"registries": [{"name": "docker.io"}],
                      "nodes": {"nodeSelector": {"cachalot.test/no-such-node": "true"}}});
    let applied = apply_mirror(&mirrors, MIRROR, spec, "test").await;
    let uid = applied.metadata.uid.unwrap();

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);

    let config_map = wait_for_object(&cms, &registry_config_name(MIRROR)).await;
    let deployment = wait_for_object(&deployments, &registry_name(MIRROR)).await;
    let service = wait_for_object(&services, &registry_name(MIRROR)).await;
    let daemon_set = wait_for_object(&daemon_sets, &agent_name(MIRROR)).await;
    for meta in [
        &config_map.metadata,
        &deployment.metadata,
        &service.metadata,
        &daemon_set.metadata,
    ] {
        assert!(
            owned_by(meta, &uid),
            "{:?} is not owned by the mirror",
            meta.name
        );
    }
    let config_yaml = config_map
        .data
        .unwrap_or_default()
        .remove("config.yaml")
        .unwrap_or_default();
    assert!(
        config_yaml.contains("docker.io"),
        "registry config names docker.io:\n{config_yaml}"
    );
    assert!(!config_yaml.contains("ghcr.io"));
    let cluster_ip = service.spec.unwrap().cluster_ip.unwrap();

    let first = wait_for_mirror("status with observedGeneration 1", &mirrors, |m| {
        m.data["status"]["observedGeneration"] == 1
    })
    .await;
    let to_first_status = started.elapsed();
    let finalizers = first.metadata.finalizers.clone().unwrap_or_default();
    assert!(!finalizers.is_empty(), "the operator added its finalizer");
    for type_ in [
        "Ready",
        "ProxyAvailable",
        "NodesConfigured",
        "CacheEffective",
        "UpstreamBudget",
    ] {
        assert!(
            condition(&first, type_).is_some(),
            "condition {type_} missing: {}",
            first.data["status"]
        );
    }
    let endpoint = first.data["status"]["endpoint"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        endpoint.contains(&cluster_ip),
        "endpoint {endpoint} uses the Service ClusterIP {cluster_ip}"
    );

    // 2. The Deployment controller makes a registry pod, the scheduler binds it, the node runs
    //    it: the next passes read its /stats (the fixed numbers) into status.
    let with_stats = wait_for_mirror(
        "ProxyAvailable=True and cache stats in status",
        &mirrors,
        |m| condition_is_true(m, "ProxyAvailable") && m.data["status"]["cache"].is_object(),
    )
    .await;
    // The pod is real: it passes its readiness probe and the Deployment controller counts it.
    eventually(
        "the registry pod Ready and counted by the Deployment",
        || async {
            let listed = pods
                .list(&ListParams::default().labels("app.kubernetes.io/component=registry"))
                .await
                .ok()?;
            let deployment = deployments.get(&registry_name(MIRROR)).await.ok()?;
            let counted = deployment.status?.ready_replicas == Some(1);
            (counted && listed.items.iter().any(pod_is_ready)).then_some(())
        },
    )
    .await;
    let cache = with_stats.data["status"]["cache"].to_string();
    assert!(
        cache.contains('3') && cache.contains('1'),
        "hit/miss counts from /stats in status: {cache}"
    );
    let budget = with_stats.data["status"].to_string();
    assert!(
        budget.contains("97"),
        "remaining upstream budget from /stats in status: {budget}"
    );
    let agents = daemon_sets.get(&agent_name(MIRROR)).await.unwrap();
    assert_eq!(
        agents.status.map(|s| s.desired_number_scheduled),
        Some(0),
        "the agents select no node"
    );

    // 3. Change the spec: a second registry and three replicas.
    let changed = json!({"replicas": 3, "registries": [{"name": "docker.io"}, {"name": "ghcr.io"}],
                         "nodes": {"nodeSelector": {"cachalot.test/no-such-node": "true"}}});
    apply_mirror(&mirrors, MIRROR, changed, "test").await;
    eventually("the registry config to include ghcr.io", || async {
        let cm = cms.get(&registry_config_name(MIRROR)).await.ok()?;
        let yaml = cm
            .data
            .unwrap_or_default()
            .remove("config.yaml")
            .unwrap_or_default();
        yaml.contains("ghcr.io").then_some(())
    })
    .await;
    eventually("the Deployment to scale to 3", || async {
        let d = deployments.get(&registry_name(MIRROR)).await.ok()?;
        (d.spec.replicas == Some(3)).then_some(())
    })
    .await;
    // A PodDisruptionBudget for 3 replicas, owned by the mirror.
    let pdb = wait_for_object(&pdbs, &registry_name(MIRROR)).await;
    assert!(owned_by(&pdb.metadata, &uid));
    wait_for_mirror("status with observedGeneration 2", &mirrors, |m| {
        m.data["status"]["observedGeneration"] == 2
    })
    .await;

    // 4. Delete: no agent pod runs, so the operator finds no node to wait for and drops its
    //    finalizer; the garbage collector then removes what the mirror owned. (It learns of a new
    //    CRD on its 30 s discovery resync, so in a fresh cluster this takes up to 30 s.)
    mirrors
        .delete(MIRROR, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the mirror to be gone", || async {
        matches!(mirrors.get_opt(MIRROR).await, Ok(None)).then_some(())
    })
    .await;
    wait_for_absence(&cms, &registry_config_name(MIRROR)).await;
    wait_for_absence(&deployments, &registry_name(MIRROR)).await;
    wait_for_absence(&services, &registry_name(MIRROR)).await;
    wait_for_absence(&daemon_sets, &agent_name(MIRROR)).await;
    wait_for_absence(&pdbs, &registry_name(MIRROR)).await;

    controller.stop().await;

    if let Some((sum, count)) = reconcile_sum_count(&metrics) {
        assert!(count >= 3.0, "several reconciles ran, got {count}");
        eprintln!(
            "measure: {count} reconciles, mean {:.1} ms; apply → first status {:.0} ms",
            sum / count * 1000.0,
            to_first_status.as_secs_f64() * 1000.0
        );
    }
}

/// The path of `docker.io`'s hosts.toml on every fake node, on this machine.
fn node_hosts_files(env: &OperatorCluster) -> Vec<std::path::PathBuf> {
    env.cluster
        .nodes()
        .iter()
        .map(|n| n.certs_dir().join("docker.io").join("hosts.toml"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_with_a_serving_registry_and_configured_nodes_is_ready_and_deletion_waits_for_the_node_files(
) {
    if !prerequisites_or_skip("a_mirror_with_a_serving_registry_and_configured_nodes_is_ready") {
        return;
    }
    let env = OperatorCluster::start(2, 0, NS).await;
    let client = env.client.clone();
    let probe = Arc::new(PodProxyProbe::new(&client));
    let agents_held = probe.agents_held.clone();
    let controller = RunningController::start(
        &client,
        probe,
        Arc::new(Metrics::new()),
        Duration::from_millis(300),
    );

    let mirrors = mirrors_api(&client, NS);
    apply_mirror(&mirrors, MIRROR, docker_hub(), "test").await;
    // The registry pod serves, an agent pod runs on each node and writes the node's hosts.toml,
    // and the operator reads both.
    // Both nodes in the same observation: right after the DaemonSet is created its status may
    // still count one scheduled pod, and `1/1 nodes` is then a true (if short-lived) summary.
    let ready = wait_for_mirror("Ready=True with both nodes configured", &mirrors, |m| {
        condition_is_true(m, "Ready")
            && condition(m, "NodesConfigured")
                .is_some_and(|c| c["status"] == "True" && c["message"] == "2/2 nodes")
    })
    .await;
    let endpoint = ready.data["status"]["endpoint"]
        .as_str()
        .unwrap()
        .to_owned();
    let host = endpoint
        .trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .unwrap()
        .to_owned();
    for file in node_hosts_files(&env) {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{} on the node: {e}", file.display()));
        assert!(
            text.contains(&host),
            "{} points at the mirror's endpoint {endpoint}:\n{text}",
            file.display()
        );
    }

    // Delete while the agents cannot be heard: the agents see `removing` in their desired state
    // and remove their files, but until the operator reads that from every node, the finalizer
    // holds the mirror and status names the nodes.
    agents_held.store(true, Ordering::SeqCst);
    mirrors
        .delete(MIRROR, &DeleteParams::default())
        .await
        .unwrap();
    let waiting = wait_for_mirror("status naming the nodes not cleaned yet", &mirrors, |m| {
        let text = m.data["status"]["conditions"].to_string();
        m.metadata.deletion_timestamp.is_some() && text.contains("waiting for node-1, node-2")
    })
    .await;
    assert!(
        !waiting
            .metadata
            .finalizers
            .clone()
            .unwrap_or_default()
            .is_empty(),
        "the finalizer holds the mirror while the nodes are not known to be clean"
    );
    let desired = eventually("the agents' desired state to say removing", || async {
        let cm = Api::<ConfigMap>::namespaced(client.clone(), NS)
            .get(&agent_name(MIRROR))
            .await
            .ok()?;
        let raw = cm.data?.remove(DESIRED_KEY)?;
        let desired: Value = serde_json::from_str(&raw).ok()?;
        (desired["removing"] == true).then_some(desired)
    })
    .await;
    for file in node_hosts_files(&env) {
        eventually(&format!("{} to be removed", file.display()), || async {
            (!file.exists()).then_some(())
        })
        .await;
    }
    assert!(
        mirrors.get_opt(MIRROR).await.unwrap().is_some(),
        "the mirror stays while its agents are not heard ({desired})"
    );

    // The agents answer again: both report their files gone, the finalizer goes, and so does the
    // mirror.
    agents_held.store(false, Ordering::SeqCst);
    eventually("the mirror to be gone once the nodes are clean", || async {
        matches!(mirrors.get_opt(MIRROR).await, Ok(None)).then_some(())
    })
    .await;

    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_mirror_is_ready_over_https_with_its_ca_on_the_nodes_and_a_renewed_certificate() {
    if !prerequisites_or_skip("a_tls_mirror_is_ready_over_https_with_its_ca_on_the_nodes") {
        return;
    }
    let env = OperatorCluster::start(1, 0, NS).await;
    let client = env.client.clone();
    let controller = RunningController::start(
        &client,
        Arc::new(PodProxyProbe::new(&client)),
        Arc::new(Metrics::new()),
        Duration::from_millis(300),
    );
    let mirrors = mirrors_api(&client, NS);
    let spec = json!({"registries": [{"name": "docker.io"}], "tls": {"secretName": "hub-tls"}});
    apply_mirror(&mirrors, MIRROR, spec, "test").await;
    let missing = wait_for_mirror("Ready=False TlsSecretMissing", &mirrors, |m| {
        condition(m, "Ready").is_some_and(|c| c["reason"] == "TlsSecretMissing")
    })
    .await;
    assert!(
        condition(&missing, "Ready").unwrap()["message"]
            .as_str()
            .is_some_and(|m| m.contains(r#"spec.tls.secretName: Secret "hub-tls" not found"#)),
        "{:?}",
        condition(&missing, "Ready")
    );
    assert!(
        Api::<Deployment>::namespaced(client.clone(), NS)
            .get_opt(&registry_name(MIRROR))
            .await
            .unwrap()
            .is_none(),
        "nothing is applied while the Secret is missing"
    );

    // The Service's cluster IP is known only once it exists: a first certificate for another
    // address, then one for the endpoint, as a user (or cert-manager) would renew it.
    let ca = TestCa::new("hub CA").unwrap();
    let signed = ca
        .server("cachalot", &[IpAddr::V4(Ipv4Addr::LOCALHOST)], &[])
        .unwrap();
    let (cert, key) = (signed.cert_pem, signed.key_pem);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "hub-tls", "namespace": NS},
        "stringData": {"tls.crt": cert, "tls.key": key, "ca.crt": ca.pem()}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let with_endpoint = wait_for_mirror("an https endpoint", &mirrors, |m| {
        m.data["status"]["endpoint"]
            .as_str()
            .is_some_and(|e| e.starts_with("https://"))
    })
    .await;
    let endpoint = with_endpoint.data["status"]["endpoint"]
        .as_str()
        .unwrap()
        .to_owned();
    let ip: IpAddr = endpoint
        .trim_start_matches("https://")
        .rsplit_once(':')
        .unwrap()
        .0
        .parse()
        .unwrap();
    let signed = ca.server("cachalot", &[ip], &[]).unwrap();
    let (cert, key) = (signed.cert_pem, signed.key_pem);
    secrets
        .patch(
            "hub-tls",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"tls.crt": cert, "tls.key": key}})),
        )
        .await
        .unwrap();

    // The agent trusts the Secret's ca.crt, reaches the registry over TLS through the cluster
    // IP, and installs the CA beside hosts.toml.
    let ready = wait_for_mirror("Ready=True over https", &mirrors, |m| {
        condition_is_true(m, "Ready")
    })
    .await;
    assert_eq!(ready.data["status"]["endpoint"], endpoint.as_str());
    let node = &env.cluster.nodes()[0];
    let dir = node.certs_dir().join("docker.io");
    let hosts = std::fs::read_to_string(dir.join("hosts.toml")).unwrap();
    assert!(
        hosts.contains(&format!("[host.\"{endpoint}\"]"))
            && hosts.contains("ca = \"/etc/containerd/certs.d/docker.io/cachalot-ca.crt\""),
        "{hosts}"
    );
    let installed = std::fs::read_to_string(dir.join("cachalot-ca.crt")).unwrap();
    assert!(installed.contains(ca.pem().trim()), "{installed}");

    // mTLS for clients, and a certificate for this cluster's nodes: held back while its Secret
    // is missing, then the agent (its mount, its probe) presents it and installs it.
    let spec = json!({"registries": [{"name": "docker.io"}],
                      "tls": {"secretName": "hub-tls",
                              "clientAuth": {"caSecretKey": "ca.crt",
                                             "nodeClientCertSecret": {"name": "hub-nodes"}}}});
    apply_mirror(&mirrors, MIRROR, spec, "test").await;
    let missing = wait_for_mirror(
        "Ready=False TlsSecretMissing for the nodes' Secret",
        &mirrors,
        |m| condition(m, "Ready").is_some_and(|c| c["reason"] == "TlsSecretMissing"),
    )
    .await;
    assert!(
        condition(&missing, "Ready").unwrap()["message"]
            .as_str()
            .is_some_and(|m| m.contains(
                r#"spec.tls.clientAuth.nodeClientCertSecret.name: Secret "hub-nodes" not found"#
            )),
        "{:?}",
        condition(&missing, "Ready")
    );
    let node_cert = ca.client("hub nodes").unwrap();
    let nodes_secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "hub-nodes", "namespace": NS},
        "stringData": {"tls.crt": node_cert.cert_pem, "tls.key": node_cert.key_pem}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &nodes_secret)
        .await
        .unwrap();
    let client_key = dir.join("cachalot-client.key");
    eventually("the node client certificate installed and named as client", || {
        let (dir, client_key) = (dir.clone(), client_key.clone());
        async move {
            let hosts = std::fs::read_to_string(dir.join("hosts.toml")).ok()?;
            (hosts.contains("client = [[\"/etc/containerd/certs.d/docker.io/cachalot-client.crt\", \"/etc/containerd/certs.d/docker.io/cachalot-client.key\"]]")
                && client_key.exists())
            .then_some(())
        }
    })
    .await;
    // Ready again: the agent's probe passed the handshake the registry now requires (without
    // the certificate it would report the mirror unreachable).
    wait_for_mirror("Ready=True over mTLS", &mirrors, |m| {
        condition_is_true(m, "Ready")
    })
    .await;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&client_key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let key = std::fs::read_to_string(&client_key).unwrap();
    assert!(key.contains(node_cert.key_pem.trim()), "the installed key");
    let config = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get(&registry_config_name(MIRROR))
        .await
        .unwrap();
    let config_text = serde_json::to_string(&config.data).unwrap();
    assert!(
        config_text.contains("clientCaFile"),
        "the registry requires client certificates: {config_text}"
    );

    mirrors
        .delete(MIRROR, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the mirror to be gone with its node files", || async {
        (matches!(mirrors.get_opt(MIRROR).await, Ok(None)) && !dir.exists()).then_some(())
    })
    .await;
    controller.stop().await;
}

/// Write requests by user `admin` (the in-process controller; the test writes nothing in the
/// window) other than Lease renewals.
fn controller_writes(events: &[AuditEvent]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.user.username == "admin" && e.is_write())
        .filter(|e| e.object_ref.as_ref().is_none_or(|o| o.resource != "leases"))
        .map(|e| format!("{} {}", e.verb, e.request_uri))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ready_mirror_makes_no_write_request_in_later_passes() {
    if !prerequisites_or_skip("a_ready_mirror_makes_no_write_request_in_later_passes") {
        return;
    }
    let env = OperatorCluster::start(1, 0, NS).await;
    let client = env.client.clone();
    let metrics = Arc::new(Metrics::new());
    let controller = RunningController::start(
        &client,
        Arc::new(PodProxyProbe::new(&client)),
        metrics.clone(),
        Duration::from_millis(200),
    );

    let mirrors = mirrors_api(&client, NS);
    apply_mirror(&mirrors, MIRROR, docker_hub(), "test").await;
    wait_for_mirror("Ready=True", &mirrors, |m| condition_is_true(m, "Ready")).await;
    // The test writes nothing from here on. Let the passes triggered by the last status writes
    // (and by the controllers still updating Deployment and DaemonSet status) end, then watch
    // several requeued passes (every 200 ms).
    let passes = |after: u64| {
        let metrics = metrics.clone();
        move || {
            let done = metrics.reconciliations();
            async move { (done >= after).then_some(()) }
        }
    };
    let settled = metrics.reconciliations() + 3;
    eventually("three more passes", passes(settled)).await;
    let before = env.cluster.audit_events().len();
    let idle = metrics.reconciliations() + 5;
    eventually("five idle passes", passes(idle)).await;
    let later: Vec<AuditEvent> = env
        .cluster
        .audit_events()
        .into_iter()
        .skip(before)
        .collect();
    let pod_lists = later
        .iter()
        .filter(|e| e.user.username == "admin" && e.verb == "list")
        .filter(|e| e.object_ref.as_ref().is_some_and(|o| o.resource == "pods"))
        // The controller lists by label; the test's probe finds pods by IP (a field selector).
        .filter(|e| e.request_uri.contains("labelSelector"))
        .count();
    assert!(
        pod_lists >= 5,
        "the idle passes read (pod lists): {later:?}"
    );
    assert_eq!(
        controller_writes(&later),
        Vec::<String>::new(),
        "idle passes write nothing"
    );
    let text = metrics.encode().unwrap();
    assert!(
        text.contains("cachalot_operator_apply_skips_total"),
        "{text}"
    );

    controller.stop().await;
}
