//! The RegistryMirror controller loop end to end against the kube-like fake API server
//! (`tools/fake-apiserver`, started on 127.0.0.1 by the test): apply a mirror → owned objects →
//! status → spec change → owned objects follow → delete → finalizer flow completes; and a ready
//! mirror's later passes make no write request (counted in the server's request log).
//!
//! No kubelet, scheduler or garbage collector runs: the test plays the kubelet where it matters (a
//! running registry pod, answered by an in-process fake `Probe`), and no node agent pod exists, so
//! deletion completes through the operator's "no agent runs for this mirror" path. The fake server
//! garbage-collects owned objects through their ownerReferences when the mirror goes.
//!
//! Needs Python 3 with `pip install -r tools/fake-apiserver/requirements.txt`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[allow(dead_code)]
#[path = "../../e2e/src/fake_apiserver.rs"]
mod fake_apiserver;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachalot_operator::controller::build::{
    agent_name, registry_config_name, registry_name, selector_labels, DESIRED_KEY,
};
use cachalot_operator::controller::observe::{Probe, ProbeError, RegistryStats};
use cachalot_operator::controller::{run_with, ControllerConfig};
use cachalot_operator::metrics::Metrics;
use cachalot_operator::node_agent::protocol::AgentStatus;
use common::registry_stats;
use fake_apiserver::FakeApiServer;
use futures::future::BoxFuture;
use futures::FutureExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use serde_json::{json, Value};
use tokio::sync::oneshot;

const NS: &str = "mirrors";
const MIRROR: &str = "hub";
/// Bound of every wait; a healthy loop converges in well under a second per step.
const STEP: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// Stands in for the registry pods' `/stats`; node agents never answer (none exist).
struct FakeProbe;

impl Probe for FakeProbe {
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
                message: "no agent in this test".into(),
            })
        }
        .boxed()
    }
}

fn mirrors_api(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("cachalot.dev", "v1alpha1", "RegistryMirror");
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk_with_plural(&gvk, "registrymirrors"),
    )
}

/// Applies the RegistryMirror `name` with `spec`, as field manager `manager`.
async fn apply_mirror(
    mirrors: &Api<DynamicObject>,
    name: &str,
    spec: Value,
    manager: &str,
) -> DynamicObject {
    let mirror = json!({"apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
                        "metadata": {"name": name}, "spec": spec});
    mirrors
        .patch(
            name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&mirror),
        )
        .await
        .unwrap()
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
        let mut config = ControllerConfig::new("ghcr.io/cachalot-dev/cachalot:test");
        config.namespace = Some(NS.to_owned());
        config.requeue_after = requeue_after;
        config.cleanup_requeue_after = Duration::from_millis(100);
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
        tokio::time::timeout(STEP, self.task)
            .await
            .expect("the controller stops on shutdown")
            .unwrap();
    }
}

/// With `FAKE_APISERVER_LOG_REQUESTS=1` the server logs every request; show that log.
fn dump_request_log(server: &FakeApiServer) {
    if std::env::var_os("FAKE_APISERVER_LOG_REQUESTS").is_some() {
        eprintln!("fake API server request log:\n{}", server.stderr());
    }
}

/// Polls `check` until it yields a value or the deadline passes (bounded in time and count).
async fn eventually<T, F, Fut>(what: &str, server: &FakeApiServer, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP;
    let max_polls = STEP.as_millis() / POLL.as_millis() + 1;
    for _ in 0..max_polls {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!(
        "timed out after {STEP:?} waiting for {what}; fake API server stderr:\n{}",
        server.stderr()
    );
}

fn docker_hub() -> Value {
    json!({"registries": [{"name": "docker.io"}]})
}

fn condition<'a>(mirror: &'a DynamicObject, type_: &str) -> Option<&'a Value> {
    mirror.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

async fn install_crd(client: &kube::Client) {
    let yaml = include_str!("../../crds/registrymirrors.cachalot.dev.yaml");
    let crd: CustomResourceDefinition = serde_yaml::from_str(yaml).unwrap();
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &crd)
        .await
        .unwrap();
}

/// Merges `status` into the status of the `K` named `name`, as a kubelet or controller would.
async fn patch_status<K>(client: &kube::Client, name: &str, status: Value)
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), NS)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await
        .unwrap();
}

/// Plays the kubelet: a pod `name` of the mirror's `component` on node-1, running as `status`.
async fn run_pod(client: &kube::Client, name: &str, component: &str, status: Value) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": selector_labels(MIRROR, component)},
        "spec": {"nodeName": "node-1", "containers": [{"name": component, "image": "test"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    patch_status::<Pod>(client, name, status).await;
}

/// Plays the kubelet: a running, ready registry pod for the mirror, so the operator probes it.
async fn run_registry_pod(client: &kube::Client) {
    let running = json!({"phase": "Running", "podIP": "127.0.0.1",
                         "conditions": [{"type": "Ready", "status": "True"}]});
    run_pod(
        client,
        &format!("{}-0", registry_name(MIRROR)),
        "registry",
        running,
    )
    .await;
    let ready = json!({"replicas": 1, "readyReplicas": 1, "availableReplicas": 1});
    patch_status::<Deployment>(client, &registry_name(MIRROR), ready).await;
}

/// Waits until the `K` named `name` exists, and returns it.
async fn wait_for_object<K>(server: &FakeApiServer, api: &Api<K>, name: &str) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let what = format!("{} {name}", std::any::type_name::<K>());
    eventually(&what, server, || async { api.get_opt(name).await.unwrap() }).await
}

/// Waits until the mirror is gone.
async fn wait_gone(what: &str, server: &FakeApiServer, mirrors: &Api<DynamicObject>) {
    eventually(what, server, || async {
        mirrors
            .get_opt(MIRROR)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}

fn owned_by(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.uid == uid && r.kind == "RegistryMirror" && r.controller == Some(true))
}

/// Mean reconcile duration from the operator's own histogram (`…_sum / …_count`).
fn mean_reconcile_seconds(metrics: &Metrics) -> Option<(f64, f64)> {
    reconcile_sum_count(&metrics.encode().ok()?)
}

/// `(sum, count)` of the reconcile duration histogram in Prometheus text.
fn reconcile_sum_count(text: &str) -> Option<(f64, f64)> {
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

#[tokio::test]
async fn registry_mirror_goes_from_apply_to_owned_objects_and_status_then_follows_spec_and_is_finalized(
) {
    let server = FakeApiServer::start().await.expect("fake API server");
    let client = server.client(NS).await.unwrap();
    install_crd(&client).await;

    let metrics = Arc::new(Metrics::new());
    let controller = RunningController::start(
        &client,
        Arc::new(FakeProbe),
        metrics.clone(),
        Duration::from_millis(300),
    );

    // 1. Apply a mirror: the operator adds its finalizer and applies every owned object.
    let mirrors = mirrors_api(&client, NS);
    let started = Instant::now();
    let applied = apply_mirror(&mirrors, MIRROR, docker_hub(), "test").await;
    let uid = applied.metadata.uid.unwrap();

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NS);

    let config_map = wait_for_object(&server, &cms, &registry_config_name(MIRROR)).await;
    let deployment = wait_for_object(&server, &deployments, &registry_name(MIRROR)).await;
    let service = wait_for_object(&server, &services, &registry_name(MIRROR)).await;
    let daemon_set = wait_for_object(&server, &daemon_sets, &agent_name(MIRROR)).await;
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

    let first = eventually("status with observedGeneration 1", &server, || async {
        let m = mirrors.get(MIRROR).await.unwrap();
        (m.data["status"]["observedGeneration"] == 1).then_some(m)
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

    // 2. The kubelet runs a registry pod: the next passes read its /stats into status.
    run_registry_pod(&client).await;
    let with_stats = eventually(
        "ProxyAvailable=True and cache stats in status",
        &server,
        || async {
            let m = mirrors.get(MIRROR).await.unwrap();
            let proxy = condition(&m, "ProxyAvailable").is_some_and(|c| c["status"] == "True");
            (proxy && m.data["status"]["cache"].is_object()).then_some(m)
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

    // 3. Change the spec: a second registry and three replicas.
    let changed =
        json!({"replicas": 3, "registries": [{"name": "docker.io"}, {"name": "ghcr.io"}]});
    apply_mirror(&mirrors, MIRROR, changed, "test").await;
    eventually(
        "the registry config to include ghcr.io",
        &server,
        || async {
            let cm = cms.get(&registry_config_name(MIRROR)).await.unwrap();
            let yaml = cm
                .data
                .unwrap_or_default()
                .remove("config.yaml")
                .unwrap_or_default();
            yaml.contains("ghcr.io").then_some(())
        },
    )
    .await;
    eventually("the Deployment to scale to 3", &server, || async {
        let d = deployments.get(&registry_name(MIRROR)).await.unwrap();
        (d.spec.replicas == Some(3)).then_some(())
    })
    .await;
    // A PodDisruptionBudget for 3 replicas.
    wait_for_object(&server, &pdbs, &registry_name(MIRROR)).await;
    eventually("status with observedGeneration 2", &server, || async {
        let m = mirrors.get(MIRROR).await.unwrap();
        (m.data["status"]["observedGeneration"] == 2).then_some(())
    })
    .await;

    // 4. Delete: the finalizer holds the object until node cleanup is done (no agent runs here),
    //    then it goes, and its owned objects are collected.
    mirrors
        .delete(MIRROR, &DeleteParams::default())
        .await
        .unwrap();
    wait_gone("the mirror to be gone", &server, &mirrors).await;
    assert!(cms
        .get_opt(&registry_config_name(MIRROR))
        .await
        .unwrap()
        .is_none());
    assert!(daemon_sets
        .get_opt(&agent_name(MIRROR))
        .await
        .unwrap()
        .is_none());

    controller.stop().await;

    dump_request_log(&server);
    if let Some((sum, count)) = mean_reconcile_seconds(&metrics) {
        assert!(count >= 3.0, "several reconciles ran, got {count}");
        eprintln!(
            "measure: {count} reconciles, mean {:.1} ms; apply → first status {:.0} ms",
            sum / count * 1000.0,
            to_first_status.as_secs_f64() * 1000.0
        );
    }
}

/// The operator binary as deployed (`cachalot-operator run`, leader election on), killed on drop.
struct OperatorProcess {
    child: std::process::Child,
    listen: std::net::SocketAddr,
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OperatorProcess {
    fn start(server: &FakeApiServer, log: &std::path::Path) -> Self {
        let kubeconfig = server.write_kubeconfig("default").unwrap();
        // A free loopback port for /metrics: bind, read, release (the window is harmless here).
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = std::fs::File::create(log).unwrap();
        // CACHALOT_OPERATOR_BIN measures another build (e.g. target/release/cachalot-operator).
        let binary = std::env::var("CACHALOT_OPERATOR_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_cachalot-operator").to_owned());
        let child = std::process::Command::new(binary)
            .arg("run")
            .arg(format!("--listen={listen}"))
            .env_clear()
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", "cachalot-system")
            .env("POD_NAME", "operator-0")
            .env("CACHALOT_PROBE_TIMEOUT", "200ms")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child, listen }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// `GET /metrics` with a bare HTTP/1.0 request (no client library needed for one GET).
    async fn metrics(&self) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.listen).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        Some(body)
    }
}

/// Benchmark, not a check of behaviour: run with
/// `cargo nextest run -p cachalot-operator --test controller_loop --run-ignored ignored-only --no-capture`
/// (set `CACHALOT_OPERATOR_BIN=target/release/cachalot-operator` to measure a release build).
#[tokio::test]
#[ignore = "benchmark: operator memory idle and with 100 RegistryMirrors; run on demand"]
async fn measure_operator_memory_idle_and_with_100_mirrors() {
    const MIRRORS: usize = 100;
    let server = FakeApiServer::start().await.expect("fake API server");
    let client = server.client("load").await.unwrap();
    install_crd(&client).await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let operator = OperatorProcess::start(&server, log.path());

    eventually(
        "the operator to lead and serve /metrics",
        &server,
        || async {
            let metrics = operator.metrics().await?;
            metrics
                .lines()
                .any(|l| {
                    !l.starts_with('#') && l.contains("leader") && l.trim_end().ends_with(" 1")
                })
                .then_some(())
        },
    )
    .await;
    let idle = operator.rss_kib();

    let api = mirrors_api(&client, "load");
    let apply_numbered = |i: usize| {
        let api = api.clone();
        async move {
            let spec = json!({"registries": [{"name": format!("registry-{i}.test:5000"),
                                              "url": format!("http://127.0.0.1:{}", 20000 + i)}]});
            apply_mirror(&api, &format!("m{i}"), spec, "bench").await;
        }
    };

    // One mirror alone first: the reconcile time of a single mirror, without queueing.
    apply_numbered(0).await;
    eventually("the first mirror's status", &server, || async {
        let m = api.get("m0").await.unwrap();
        (m.data["status"]["observedGeneration"] == 1).then_some(())
    })
    .await;
    let (one_sum, one_count) =
        reconcile_sum_count(&operator.metrics().await.unwrap_or_default()).unwrap_or_default();

    let started = Instant::now();
    for i in 1..MIRRORS {
        apply_numbered(i).await;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut done = 0;
    while Instant::now() < deadline {
        let list = api.list(&kube::api::ListParams::default()).await.unwrap();
        done = list
            .items
            .iter()
            .filter(|m| m.data["status"]["observedGeneration"] == 1)
            .count();
        if done == MIRRORS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_reconciled = started.elapsed();
    assert_eq!(
        done,
        MIRRORS,
        "every mirror got a status; operator log:\n{}",
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
    let loaded = operator.rss_kib();
    let (sum, count) =
        reconcile_sum_count(&operator.metrics().await.unwrap_or_default()).unwrap_or_default();
    eprintln!(
        "measure: one mirror alone: {one_count} reconciles, mean {:.1} ms",
        if one_count > 0.0 {
            one_sum / one_count * 1000.0
        } else {
            0.0
        }
    );
    eprintln!(
        "measure: operator RSS idle {:.1} MiB, with {MIRRORS} mirrors {:.1} MiB; \
         {} more mirrors applied → all with status in {:.1} s; {count} reconciles, mean {:.1} ms",
        idle as f64 / 1024.0,
        loaded as f64 / 1024.0,
        MIRRORS - 1,
        all_reconciled.as_secs_f64(),
        if count > 0.0 {
            sum / count * 1000.0
        } else {
            0.0
        }
    );
}

/// A node agent on `node-1` as the operator sees it through `/status`: it applies whatever desired
/// state the operator last wrote (read from the desired-state ConfigMap), and keeps its file until
/// the test lets it remove it.
struct AgentProbe {
    client: kube::Client,
    files_removed: Arc<std::sync::atomic::AtomicBool>,
}

impl Probe for AgentProbe {
    fn registry_stats(
        &self,
        base_url: String,
    ) -> BoxFuture<'static, Result<RegistryStats, ProbeError>> {
        FakeProbe.registry_stats(base_url)
    }

    fn agent_status(
        &self,
        base_url: String,
    ) -> BoxFuture<'static, Result<AgentStatus, ProbeError>> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), NS);
        let removed = self.files_removed.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            let fail = |message: String| ProbeError::Request { url: base_url.clone(), message };
            let cm = cms.get(&agent_name(MIRROR)).await.map_err(|e| fail(e.to_string()))?;
            let raw = cm.data.unwrap_or_default().remove(DESIRED_KEY).ok_or_else(|| fail("no desired.json".into()))?;
            let desired: Value = serde_json::from_str(&raw).map_err(|e| fail(e.to_string()))?;
            let removing = desired["removing"].as_bool().unwrap_or(false);
            let files: Vec<&str> = if removing && removed {
                Vec::new()
            } else {
                vec!["/etc/containerd/certs.d/docker.io/hosts.toml"]
            };
            let status = json!({
                "node": "node-1", "mirror": desired["mirror"], "generation": desired["generation"],
                "ready": !removing,
                "registries": if removing { json!([]) } else { json!([{"registry": "docker.io", "state": "Configured", "message": ""}]) },
                "containerd": {"configVersion": 2, "problems": []},
                "managedFiles": files,
            });
            serde_json::from_value(status).map_err(|e| fail(format!("test AgentStatus does not parse: {e}")))
        }
        .boxed()
    }
}

/// Plays the kubelet for the DaemonSet: one running agent pod on `node-1`.
async fn run_agent_pod(client: &kube::Client) {
    let running = json!({"phase": "Running", "podIP": "127.0.0.2"});
    let name = format!("{}-node-1", agent_name(MIRROR));
    run_pod(client, &name, "node-agent", running).await;
    let scheduled = json!({"desiredNumberScheduled": 1, "currentNumberScheduled": 1,
                           "numberReady": 1, "numberMisscheduled": 0});
    patch_status::<DaemonSet>(client, &agent_name(MIRROR), scheduled).await;
}

#[tokio::test]
async fn a_mirror_with_a_serving_registry_and_a_configured_node_is_ready_and_deletion_waits_for_the_node_files(
) {
    let server = FakeApiServer::start().await.expect("fake API server");
    let client = server.client(NS).await.unwrap();
    install_crd(&client).await;
    let files_removed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = Arc::new(AgentProbe {
        client: client.clone(),
        files_removed: files_removed.clone(),
    });
    let controller = RunningController::start(
        &client,
        probe,
        Arc::new(Metrics::new()),
        Duration::from_millis(200),
    );

    let mirrors = mirrors_api(&client, NS);
    apply_mirror(&mirrors, MIRROR, docker_hub(), "test").await;
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    eventually(
        "the agent DaemonSet and registry Deployment",
        &server,
        || async {
            let ds = daemon_sets.get_opt(&agent_name(MIRROR)).await.unwrap();
            let d = deployments.get_opt(&registry_name(MIRROR)).await.unwrap();
            (ds.is_some() && d.is_some()).then_some(())
        },
    )
    .await;
    run_registry_pod(&client).await;
    run_agent_pod(&client).await;

    let ready = eventually("Ready=True with 1/1 nodes", &server, || async {
        let m = mirrors.get(MIRROR).await.unwrap();
        condition(&m, "Ready")
            .is_some_and(|c| c["status"] == "True")
            .then_some(m)
    })
    .await;
    let nodes = condition(&ready, "NodesConfigured").unwrap();
    assert_eq!(nodes["status"], "True", "{nodes}");

    mirrors
        .delete(MIRROR, &DeleteParams::default())
        .await
        .unwrap();
    let waiting = eventually(
        "status naming node-1 as not cleaned yet",
        &server,
        || async {
            let m = mirrors.get_opt(MIRROR).await.unwrap()?;
            let text = m.data["status"]["conditions"].to_string();
            text.contains("node-1").then_some(m)
        },
    )
    .await;
    assert!(waiting.metadata.deletion_timestamp.is_some());
    assert!(
        !waiting
            .metadata
            .finalizers
            .clone()
            .unwrap_or_default()
            .is_empty(),
        "the finalizer holds the mirror while node-1 still has its file"
    );
    // The agent saw `removing: true`; let it report its file gone.
    files_removed.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_gone(
        "the mirror to be gone once node-1 is clean",
        &server,
        &mirrors,
    )
    .await;

    controller.stop().await;
}

/// The write requests (create, update, patch, delete) in the fake server's request log, one per
/// `METHOD PATH -> STATUS` line.
fn write_requests(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            ["POST ", "PUT ", "PATCH ", "DELETE "]
                .iter()
                .any(|m| l.starts_with(m))
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_ready_mirror_makes_no_write_request_in_later_passes() {
    let server = FakeApiServer::start_with_args(&["--log-requests"])
        .await
        .expect("fake API server");
    let client = server.client(NS).await.unwrap();
    install_crd(&client).await;
    let probe = Arc::new(AgentProbe {
        client: client.clone(),
        files_removed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    });
    let metrics = Arc::new(Metrics::new());
    let controller =
        RunningController::start(&client, probe, metrics.clone(), Duration::from_millis(100));

    let mirrors = mirrors_api(&client, NS);
    apply_mirror(&mirrors, MIRROR, docker_hub(), "test").await;
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    wait_for_object(&server, &daemon_sets, &agent_name(MIRROR)).await;
    run_registry_pod(&client).await;
    run_agent_pod(&client).await;
    eventually("Ready=True", &server, || async {
        let m = mirrors.get(MIRROR).await.unwrap();
        condition(&m, "Ready")
            .is_some_and(|c| c["status"] == "True")
            .then_some(())
    })
    .await;
    // The test writes nothing from here on. Let the pass triggered by the last status write end,
    // then watch several requeued passes (every 100 ms).
    let passes = |after: u64| {
        let metrics = metrics.clone();
        move || {
            let done = metrics.reconciliations();
            async move { (done >= after).then_some(()) }
        }
    };
    let settled = metrics.reconciliations() + 2;
    eventually("two more passes", &server, passes(settled)).await;
    let before = server.stderr().lines().count();
    let idle = metrics.reconciliations() + 5;
    eventually("five idle passes", &server, passes(idle)).await;
    let log = server.stderr();
    let later: String = log.lines().skip(before).collect::<Vec<_>>().join("\n");
    assert!(
        later.lines().any(|l| l.starts_with("GET ")),
        "the idle passes read (pod lists): {later}"
    );
    assert_eq!(
        write_requests(&later),
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
