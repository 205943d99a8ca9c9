//! Reconcile scenarios against a mocked API server (`tower_test::mock::pair` behind a
//! `kube::Client`): every call the operator makes is checked in order, and a scenario fails on a
//! missing or an extra call. HTTP probes of pods are a fake [`Probe`]. The operator's caches of
//! owned objects are fed by hand with what the API server answered, as its watches would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cachalot_operator::api::{RegistryMirror, FINALIZER};
use cachalot_operator::controller::drift::APPLIED_HASH_ANNOTATION;
use cachalot_operator::controller::observe::{Probe, ProbeError, RegistryStats};
use cachalot_operator::controller::owned::{OwnedStores, OwnedWriters};
use cachalot_operator::controller::{reconcile_mirror, Context, ControllerConfig};
use cachalot_operator::metrics::Metrics;
use cachalot_operator::node_agent::protocol::{AgentStatus, ContainerdStatus, DesiredState};
use common::mock_api::{expect, failure, not_found, play, respond, written_status, Handle};
use common::{hold, listed_caches, registry_stats};
use futures::future::BoxFuture;
use futures::FutureExt;
use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::Client;
use serde_json::{json, Value};

const NS: &str = "cachalot";
const MIRROR: &str = "/apis/cachalot.dev/v1alpha1/namespaces/cachalot/registrymirrors/hub";
const MIRROR_STATUS: &str =
    "/apis/cachalot.dev/v1alpha1/namespaces/cachalot/registrymirrors/hub/status";
const REGISTRY_CONFIG: &str = "/api/v1/namespaces/cachalot/configmaps/cachalot-hub-config";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/cachalot/deployments/cachalot-hub";
const STATEFUL_SET: &str = "/apis/apps/v1/namespaces/cachalot/statefulsets/cachalot-hub";
const SERVICE: &str = "/api/v1/namespaces/cachalot/services/cachalot-hub";
const PEERS_SERVICE: &str = "/api/v1/namespaces/cachalot/services/cachalot-hub-peers";
const PDB: &str = "/apis/policy/v1/namespaces/cachalot/poddisruptionbudgets/cachalot-hub";
const AGENT_CONFIG: &str = "/api/v1/namespaces/cachalot/configmaps/cachalot-hub-agent";
const AGENT_DAEMON_SET: &str = "/apis/apps/v1/namespaces/cachalot/daemonsets/cachalot-hub-agent";
const PODS: &str = "/api/v1/namespaces/cachalot/pods";
const SECRETS: &str = "/api/v1/namespaces/cachalot/secrets";
const CONFIG_MAPS: &str = "/api/v1/namespaces/cachalot/configmaps";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/cachalot/events";
/// What the pod lists select on (URL-encoded label selectors).
const REGISTRY_COMPONENT: &str = "app.kubernetes.io%2Fcomponent%3Dregistry";
const AGENT_COMPONENT: &str = "node-agent";

/// What the fake probe answers: agents echo the generation last applied through the API.
#[derive(Default)]
struct FakeWorld {
    generation: Mutex<String>,
    agent_files: Mutex<Vec<String>>,
    agent_ready: Mutex<bool>,
    probed: Mutex<Vec<String>>,
}

struct FakeProbe(Arc<FakeWorld>);

impl Probe for FakeProbe {
    fn registry_stats(
        &self,
        base_url: String,
    ) -> BoxFuture<'static, Result<RegistryStats, ProbeError>> {
        self.0
            .probed
            .lock()
            .unwrap()
            .push(format!("{base_url}/stats"));
        async move { Ok(registry_stats(7, 1, 0, 42)) }.boxed()
    }
    fn agent_status(
        &self,
        base_url: String,
    ) -> BoxFuture<'static, Result<AgentStatus, ProbeError>> {
        self.0
            .probed
            .lock()
            .unwrap()
            .push(format!("{base_url}/status"));
        let status = AgentStatus {
            node: "node-1".into(),
            mirror: format!("{NS}/hub"),
            generation: self.0.generation.lock().unwrap().clone(),
            ready: *self.0.agent_ready.lock().unwrap(),
            registries: Vec::new(),
            containerd: ContainerdStatus::default(),
            managed_files: self.0.agent_files.lock().unwrap().clone(),
            problems: Vec::new(),
        };
        async move { Ok(status) }.boxed()
    }
}

fn mirror_json(spec: Value, finalizer: bool, deleting: bool) -> Value {
    let mut m = json!({
        "apiVersion": "cachalot.dev/v1alpha1",
        "kind": "RegistryMirror",
        "metadata": {
            "name": "hub", "namespace": NS, "uid": "uid-hub", "generation": 2,
            "resourceVersion": "100", "creationTimestamp": "2026-01-02T00:00:00Z"
        },
        "spec": spec,
    });
    if finalizer {
        m["metadata"]["finalizers"] = json!([FINALIZER]);
    }
    if deleting {
        m["metadata"]["deletionTimestamp"] = json!("2026-01-03T00:00:00Z");
    }
    m
}

fn mirror(spec: Value, finalizer: bool, deleting: bool) -> RegistryMirror {
    serde_json::from_value(mirror_json(spec, finalizer, deleting)).unwrap()
}

fn docker_hub() -> Value {
    json!({"registries": [{"name": "docker.io"}]})
}

/// What a pass runs against besides the API server: the fake pods, the mirrors the controller
/// knows (for conflicts), the caches of owned objects and the metrics.
struct Setup {
    world: Arc<FakeWorld>,
    mirrors: Store<RegistryMirror>,
    owned: OwnedStores,
    metrics: Arc<Metrics>,
}

impl Setup {
    /// Agents that apply what they are given and report ready; nothing cached yet.
    fn new() -> (Self, OwnedWriters) {
        let world = Arc::new(FakeWorld::default());
        *world.agent_ready.lock().unwrap() = true;
        let (owned, writers) = listed_caches();
        let setup = Self {
            world,
            mirrors: reflector::store().0,
            owned,
            metrics: Arc::new(Metrics::new()),
        };
        (setup, writers)
    }

    fn with_world(world: Arc<FakeWorld>) -> Self {
        let (setup, _writers) = Self::new();
        Self { world, ..setup }
    }

    fn with_mirrors(mirrors: Store<RegistryMirror>) -> Self {
        let (setup, _writers) = Self::new();
        Self { mirrors, ..setup }
    }

    fn context(&self, client: Client) -> Context {
        let mut config = ControllerConfig::new("ghcr.io/cachalot-dev/cachalot:test");
        config.requeue_after = Duration::from_secs(60);
        config.converging_requeue_after = Duration::from_secs(5);
        Context::new(
            client,
            config,
            Arc::new(FakeProbe(self.world.clone())),
            self.mirrors.clone(),
            self.owned.clone(),
            self.metrics.clone(),
        )
    }
}

/// Expects a server-side apply by the operator's field manager, marked with the hash of what it
/// applies, and answers with the body merged with `extra` (what the API server would add, e.g. a
/// cluster IP). Returns that answer: the object as the API server holds it.
async fn expect_apply(handle: &mut Handle, path: &str, extra: Value) -> Value {
    let (call, send) = expect(handle, Method::PATCH, path).await;
    assert!(
        call.query.contains("fieldManager=cachalot-operator"),
        "{}",
        call.query
    );
    assert!(call.query.contains("force=true"), "{}", call.query);
    let mut body = call.body.clone();
    assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "uid-hub");
    assert!(
        body["metadata"]["annotations"][APPLIED_HASH_ANNOTATION].is_string(),
        "{}",
        body["metadata"]
    );
    merge(&mut body, &extra);
    respond(send, StatusCode::OK, &body);
    body
}

fn merge(target: &mut Value, extra: &Value) {
    match (target, extra) {
        (Value::Object(t), Value::Object(e)) => {
            for (k, v) in e {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, e) => *t = e.clone(),
    }
}

/// Expects a DELETE of an object the spec does not want, and answers that deletion started.
async fn expect_delete(handle: &mut Handle, path: &str) {
    let (_, send) = expect(handle, Method::DELETE, path).await;
    respond(
        send,
        StatusCode::OK,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
    );
}

/// Expects the finalizers written as `finalizers`, guarded by the resourceVersion read, and
/// answers with `updated`.
async fn expect_finalizers(handle: &mut Handle, finalizers: Value, updated: &Value) {
    let (call, send) = expect(handle, Method::PATCH, MIRROR).await;
    assert_eq!(call.body["metadata"]["finalizers"], finalizers);
    assert_eq!(call.body["metadata"]["resourceVersion"], "100");
    respond(send, StatusCode::OK, updated);
}

/// Expects the agents' desired-state ConfigMap and lets the fake agents apply it. Returns the
/// desired state and the ConfigMap as held.
async fn expect_desired_state_applied(
    handle: &mut Handle,
    world: &FakeWorld,
) -> (DesiredState, Value) {
    let cm = expect_apply(handle, AGENT_CONFIG, json!({})).await;
    let desired: DesiredState =
        serde_json::from_str(cm["data"]["desired.json"].as_str().unwrap()).unwrap();
    *world.generation.lock().unwrap() = desired.generation.clone();
    (desired, cm)
}

/// [`expect_desired_state_applied`] for the desired state alone.
async fn expect_desired_state(handle: &mut Handle, world: &FakeWorld) -> DesiredState {
    expect_desired_state_applied(handle, world).await.0
}

/// Expects the agent DaemonSet applied and answers that its one pod is scheduled and ready.
async fn expect_agent_daemon_set_applied(handle: &mut Handle) -> Value {
    expect_apply(
        handle,
        AGENT_DAEMON_SET,
        json!({"status": {"desiredNumberScheduled": 1, "currentNumberScheduled": 1, "numberMisscheduled": 0, "numberReady": 1}}),
    )
    .await
}

/// Expects the agent DaemonSet read during a deletion; answers it, or 404 unless `exists`.
async fn expect_agent_daemon_set_read(handle: &mut Handle, exists: bool) {
    let (_, send) = expect(handle, Method::GET, AGENT_DAEMON_SET).await;
    if exists {
        respond(
            send,
            StatusCode::OK,
            &json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                    "metadata": {"name": "cachalot-hub-agent", "namespace": NS},
                    "spec": {"selector": {}, "template": {}}}),
        );
    } else {
        not_found(send);
    }
}

/// Expects a pod list selecting on `component` and answers `pods`.
async fn expect_pod_list(handle: &mut Handle, component: &str, pods: Value) {
    let (call, send) = expect(handle, Method::GET, PODS).await;
    assert!(call.query.contains(component), "{}", call.query);
    respond(send, StatusCode::OK, &pods);
}

/// The deletion of a mirror whose agents run: the removal is written for them, then their pods
/// are listed (one agent, on node-1). Returns the desired state written.
async fn expect_removal_written_and_agents_listed(
    handle: &mut Handle,
    world: &FakeWorld,
) -> DesiredState {
    expect_agent_daemon_set_read(handle, true).await;
    let desired = expect_desired_state(handle, world).await;
    expect_pod_list(handle, AGENT_COMPONENT, agent_pod()).await;
    desired
}

async fn expect_event(handle: &mut Handle, reason: &str) {
    let (call, send) = expect(handle, Method::POST, EVENTS).await;
    assert_eq!(call.body["reason"], reason, "{}", call.body);
    assert_eq!(call.body["regarding"]["name"], "hub");
    respond(send, StatusCode::CREATED, &call.body);
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

/// Expects the status write (a JSON patch adding `/status`) and returns the status.
async fn expect_status(handle: &mut Handle, object: &Value) -> Value {
    let (call, send) = expect(handle, Method::PATCH, MIRROR_STATUS).await;
    let status = written_status(&call.body).clone();
    // Written only over the version it was computed from.
    assert_eq!(call.body[0]["value"], object["metadata"]["resourceVersion"]);
    let mut updated = object.clone();
    updated["status"] = status.clone();
    respond(send, StatusCode::OK, &updated);
    status
}

fn pod_list(name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
        "items": [{
            "metadata": {"name": name, "namespace": NS},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip}
        }]
    })
}

/// The one running registry pod.
fn registry_pod() -> Value {
    pod_list("cachalot-hub-0", "node-1", "10.0.0.9")
}

/// The one running agent pod.
fn agent_pod() -> Value {
    pod_list("agent-x", "node-1", "192.168.1.10")
}

/// Expects the Service applied, and answers it with cluster IP 10.96.0.12.
async fn expect_service_applied(handle: &mut Handle) -> Value {
    expect_apply(
        handle,
        SERVICE,
        json!({"spec": {"clusterIP": "10.96.0.12"}}),
    )
    .await
}

/// Expects the node side applied (the desired state, the agents' DaemonSet), then the pods
/// listed: the one registry pod, the one agent pod. Returns the desired state.
async fn expect_nodes_applied_and_pods_listed(
    handle: &mut Handle,
    world: &FakeWorld,
) -> DesiredState {
    let desired = expect_desired_state(handle, world).await;
    expect_agent_daemon_set_applied(handle).await;
    expect_pod_list(handle, REGISTRY_COMPONENT, registry_pod()).await;
    expect_pod_list(handle, AGENT_COMPONENT, agent_pod()).await;
    desired
}

/// Expects the status write with Ready True, and the Event of the transition. Returns the
/// status.
async fn expect_ready(handle: &mut Handle, object: &Value) -> Value {
    let status = expect_status(handle, object).await;
    assert_eq!(condition(&status, "Ready")["status"], "True");
    expect_event(handle, "MirrorReady").await;
    status
}

/// Runs `reconcile` against a scenario and checks that no call is left unanswered or extra.
async fn run_scenario<S, F>(mirror: RegistryMirror, setup: &Setup, scenario: S) -> Action
where
    S: FnOnce(Handle) -> F,
    F: std::future::Future<Output = Handle> + Send + 'static,
{
    let ctx = |client| setup.context(client);
    play(NS, scenario, |client| async move {
        reconcile_mirror(&mirror, &ctx(client))
            .await
            .expect("reconcile failed")
    })
    .await
}

/// The registry and node side of a Docker Hub mirror with one replica applied from nothing, in
/// order, each answered as the API server holds it (one ready registry replica, a cluster IP, one
/// scheduled agent). Returns the objects held, for the caches.
async fn expect_docker_hub_objects_applied(handle: &mut Handle, world: &FakeWorld) -> Vec<Value> {
    let config = expect_apply(handle, REGISTRY_CONFIG, json!({})).await;
    let deployment = expect_apply(
        handle,
        DEPLOYMENT,
        json!({"metadata": {"resourceVersion": "7"}, "status": {"readyReplicas": 1}}),
    )
    .await;
    let service = expect_apply(
        handle,
        SERVICE,
        json!({"spec": {"clusterIP": "10.96.0.12", "ports": [{"name": "http", "port": 5000, "protocol": "TCP", "targetPort": "http"}]}}),
    )
    .await;
    let (_, agent_config) = expect_desired_state_applied(handle, world).await;
    let daemon_set = expect_agent_daemon_set_applied(handle).await;
    vec![config, deployment, service, agent_config, daemon_set]
}

/// A Docker Hub mirror after one full pass: the caches hold what that pass applied, and the mirror
/// carries the status it wrote. Returns the mirror as the next pass sees it.
async fn converged_docker_hub(setup: &Setup, writers: &mut OwnedWriters) -> RegistryMirror {
    let m = mirror(docker_hub(), true, false);
    let world = setup.world.clone();
    let held = Arc::new(Mutex::new(Vec::new()));
    let status = Arc::new(Mutex::new(Value::Null));
    let (held_in, status_in) = (held.clone(), status.clone());
    run_scenario(m, setup, move |mut h| async move {
        *held_in.lock().unwrap() = expect_docker_hub_objects_applied(&mut h, &world).await;
        expect_pod_list(&mut h, REGISTRY_COMPONENT, registry_pod()).await;
        expect_pod_list(&mut h, AGENT_COMPONENT, agent_pod()).await;
        let object = mirror_json(docker_hub(), true, false);
        *status_in.lock().unwrap() = expect_ready(&mut h, &object).await;
        h
    })
    .await;
    for object in held.lock().unwrap().iter() {
        hold(writers, object);
    }
    let mut converged = mirror_json(docker_hub(), true, false);
    converged["status"] = status.lock().unwrap().clone();
    serde_json::from_value(converged).unwrap()
}

#[tokio::test]
async fn new_mirror_gets_finalizer_then_objects_applied_then_ready_status() {
    let (setup, _writers) = Setup::new();
    let m = mirror(docker_hub(), false, false);
    let w = setup.world.clone();
    let action = run_scenario(m, &setup, move |mut h| async move {
        // 1. finalizer first, guarded by resourceVersion
        let with_finalizer = mirror_json(docker_hub(), true, false);
        expect_finalizers(&mut h, json!([FINALIZER]), &with_finalizer).await;
        // 2. registry side; nothing is cached, so there is no StatefulSet or PDB to delete
        let cm = expect_apply(&mut h, REGISTRY_CONFIG, json!({})).await;
        assert!(cm["data"]["config.yaml"]
            .as_str()
            .unwrap()
            .contains("registry-1.docker.io"));
        expect_apply(&mut h, DEPLOYMENT, json!({"status": {"readyReplicas": 1}})).await;
        expect_service_applied(&mut h).await;
        // 3. node side, pointed at the cluster IP read back from the Service; 4. observe:
        // registry pods, then agent pods
        let desired = expect_nodes_applied_and_pods_listed(&mut h, &w).await;
        assert_eq!(desired.registries[0].endpoints, ["http://10.96.0.12:5000"]);
        // 5. status, Ready; 6. the transition to Ready is an Event
        let status = expect_ready(&mut h, &with_finalizer).await;
        assert_eq!(status["observedGeneration"], 2);
        assert_eq!(status["endpoint"], "http://10.96.0.12:5000");
        assert_eq!(condition(&status, "ProxyAvailable")["status"], "True");
        assert_eq!(condition(&status, "NodesConfigured")["status"], "True");
        assert_eq!(
            condition(&status, "NodesConfigured")["message"],
            "1/1 nodes"
        );
        assert_eq!(condition(&status, "Conflict")["status"], "False");
        assert_eq!(status["nodes"]["summary"], "1/1");
        assert_eq!(status["cache"]["hitRatio"], "87.5%");
        assert_eq!(condition(&status, "CacheEffective")["status"], "True");
        assert_eq!(status["budgetSummary"], "42/100");
        assert_eq!(
            condition(&status, "UpstreamBudget")["reason"],
            "BudgetAvailable"
        );
        h
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let probed = setup.world.probed.lock().unwrap().clone();
    assert_eq!(
        probed,
        [
            // The registry's admin port, on the pod's IP.
            "http://10.0.0.9:5001/stats",
            "http://192.168.1.10:9464/status"
        ]
    );
    let metrics = setup.metrics.encode().unwrap();
    assert!(
        metrics.contains(r#"cachalot_operator_applies_total{kind="ConfigMap",reason="missing"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_second_pass_over_an_unchanged_world_makes_no_write() {
    let (setup, mut writers) = Setup::new();
    let converged = converged_docker_hub(&setup, &mut writers).await;
    // Only reads: the component pods are listed and probed; no apply, delete, status or Event.
    let action = run_scenario(converged, &setup, |mut h| async move {
        expect_pod_list(&mut h, REGISTRY_COMPONENT, registry_pod()).await;
        expect_pod_list(&mut h, AGENT_COMPONENT, agent_pod()).await;
        h
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let metrics = setup.metrics.encode().unwrap();
    for kind in ["ConfigMap", "Deployment", "Service", "DaemonSet"] {
        let skipped = if kind == "ConfigMap" { 2 } else { 1 };
        let line = format!(r#"cachalot_operator_apply_skips_total{{kind="{kind}"}} {skipped}"#);
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn a_mirror_that_is_not_ready_is_looked_at_again_sooner_than_a_ready_one() {
    let (setup, mut writers) = Setup::new();
    let converged = converged_docker_hub(&setup, &mut writers).await;
    // The node's agent pod is not running yet: the node is not configured, so the mirror is not
    // Ready, and what it waits for (agents, registry pods) is probed rather than watched.
    let action = run_scenario(converged.clone(), &setup, move |mut h| async move {
        expect_pod_list(&mut h, REGISTRY_COMPONENT, registry_pod()).await;
        expect_pod_list(&mut h, AGENT_COMPONENT, json!({"items": []})).await;
        let object = serde_json::to_value(&converged).unwrap();
        let status = expect_status(&mut h, &object).await;
        assert_eq!(condition(&status, "Ready")["status"], "False");
        expect_event(&mut h, "AgentsStarting").await;
        h
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
}

#[tokio::test]
async fn a_replica_whose_lease_lapsed_makes_no_call_at_all() {
    let (setup, mut writers) = Setup::new();
    let converged = converged_docker_hub(&setup, &mut writers).await;
    // A drifted world would need writes; a replica that is not sure of its lease makes none.
    let lapsed = cachalot_operator::leader::LeaseGuard::new(Duration::from_secs(10));
    let error = play(
        NS,
        |h| async move { h },
        |client| async move {
            let ctx = setup.context(client).with_lease(lapsed);
            reconcile_mirror(&converged, &ctx).await
        },
    )
    .await
    .expect_err("a lapsed lease fails the pass");
    assert_eq!(error.category(), "NotLeader");
}

#[tokio::test]
async fn a_drifted_config_map_is_applied_again_and_nothing_else_is_written() {
    let (setup, mut writers) = Setup::new();
    let converged = converged_docker_hub(&setup, &mut writers).await;
    // Someone edits the registry config; its hash annotation still says what the operator applied.
    let held = setup
        .owned
        .config_maps
        .state()
        .into_iter()
        .find(|cm| cm.metadata.name.as_deref() == Some("cachalot-hub-config"))
        .unwrap();
    let mut edited = serde_json::to_value(held.as_ref()).unwrap();
    let original = edited["data"]["config.yaml"].clone();
    edited["data"]["config.yaml"] = json!("defaultRegistry: evil.example\n");
    hold(&mut writers, &edited);
    let action = run_scenario(converged, &setup, move |mut h| async move {
        let repaired = expect_apply(&mut h, REGISTRY_CONFIG, json!({})).await;
        assert_eq!(repaired["data"]["config.yaml"], original);
        expect_pod_list(&mut h, REGISTRY_COMPONENT, registry_pod()).await;
        expect_pod_list(&mut h, AGENT_COMPONENT, agent_pod()).await;
        h
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let metrics = setup.metrics.encode().unwrap();
    assert!(
        metrics.contains(r#"cachalot_operator_applies_total{kind="ConfigMap",reason="drifted"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_object_deleted_by_someone_is_applied_again() {
    let (setup, mut writers) = Setup::new();
    let converged = converged_docker_hub(&setup, &mut writers).await;
    let gone = setup.owned.deployments.state().into_iter().next().unwrap();
    writers
        .deployments
        .apply_watcher_event(&watcher::Event::Delete(gone.as_ref().clone()));
    let action = run_scenario(converged, &setup, |mut h| async move {
        expect_apply(&mut h, DEPLOYMENT, json!({"status": {"readyReplicas": 1}})).await;
        expect_pod_list(&mut h, REGISTRY_COMPONENT, registry_pod()).await;
        expect_pod_list(&mut h, AGENT_COMPONENT, agent_pod()).await;
        h
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
}

#[tokio::test]
async fn spec_change_on_a_running_mirror_applies_only_what_changed() {
    // The converged one-replica mirror is scaled to 3 replicas behind a NodePort.
    let (setup, mut writers) = Setup::new();
    let converged = converged_docker_hub(&setup, &mut writers).await;
    let spec = json!({"registries": [{"name": "docker.io"}], "replicas": 3, "service": {"type": "NodePort"}});
    let mut changed = serde_json::to_value(&converged).unwrap();
    changed["spec"] = spec;
    changed["metadata"]["generation"] = json!(3);
    let m: RegistryMirror = serde_json::from_value(changed.clone()).unwrap();
    let w = setup.world.clone();
    let action = run_scenario(m, &setup, move |mut h| async move {
        // The registry config is the same (skipped); the Deployment and Service changed.
        let deployment = expect_apply(&mut h, DEPLOYMENT, json!({"status": {"readyReplicas": 3}})).await;
        assert_eq!(deployment["spec"]["replicas"], 3);
        let service = expect_apply(
            &mut h,
            SERVICE,
            json!({"spec": {"clusterIP": "10.96.0.12", "ports": [{"name": "http", "port": 5000, "nodePort": 31555}]}}),
        )
        .await;
        assert_eq!(service["spec"]["type"], "NodePort");
        // Three replicas: the PDB is missing and applied.
        let pdb = expect_apply(&mut h, PDB, json!({})).await;
        assert_eq!(pdb["spec"]["minAvailable"], 1);
        // The endpoint changed, so the desired state did; the DaemonSet did not (skipped).
        let desired = expect_desired_state(&mut h, &w).await;
        assert_eq!(
            desired.registries[0].endpoints,
            ["http://127.0.0.1:31555"],
            "NodePort nodes use the allocated port on loopback"
        );
        expect_pod_list(&mut h, REGISTRY_COMPONENT, registry_pod()).await;
        expect_pod_list(&mut h, AGENT_COMPONENT, agent_pod()).await;
        // Status follows (endpoint, observedGeneration); Ready stays True, so no Event.
        let status = expect_status(&mut h, &changed).await;
        assert_eq!(status["endpoint"], "http://127.0.0.1:31555");
        assert_eq!(status["observedGeneration"], 3);
        assert_eq!(condition(&status, "Ready")["status"], "True");
        h
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let metrics = setup.metrics.encode().unwrap();
    for line in [
        r#"cachalot_operator_applies_total{kind="Deployment",reason="changed"} 1"#,
        r#"cachalot_operator_applies_total{kind="Service",reason="changed"} 1"#,
        r#"cachalot_operator_applies_total{kind="PodDisruptionBudget",reason="missing"} 1"#,
        r#"cachalot_operator_applies_total{kind="ConfigMap",reason="changed"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn an_unwanted_object_is_deleted_only_when_the_cache_holds_it() {
    // A PodDisruptionBudget left from when the mirror had 3 replicas; it has 1 now.
    let (setup, mut writers) = Setup::new();
    let converged = converged_docker_hub(&setup, &mut writers).await;
    hold(
        &mut writers,
        &json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {"name": "cachalot-hub", "namespace": NS},
                "spec": {"minAvailable": 1}}),
    );
    let action = run_scenario(converged, &setup, |mut h| async move {
        expect_delete(&mut h, PDB).await;
        expect_pod_list(&mut h, REGISTRY_COMPONENT, registry_pod()).await;
        expect_pod_list(&mut h, AGENT_COMPONENT, agent_pod()).await;
        h
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
}

#[tokio::test]
async fn switching_to_pvc_storage_applies_a_stateful_set_and_deletes_the_cached_deployment() {
    let (setup, mut writers) = Setup::new();
    let converged = converged_docker_hub(&setup, &mut writers).await;
    let mut changed = serde_json::to_value(&converged).unwrap();
    changed["spec"]["storage"] = json!({"type": "PersistentVolumeClaim", "size": "20Gi"});
    changed["metadata"]["generation"] = json!(3);
    let m: RegistryMirror = serde_json::from_value(changed.clone()).unwrap();
    let action = run_scenario(m, &setup, move |mut h| async move {
        // The cache bound follows the volume size, so the registry config changed.
        expect_apply(&mut h, REGISTRY_CONFIG, json!({})).await;
        expect_apply(
            &mut h,
            STATEFUL_SET,
            json!({"status": {"readyReplicas": 1}}),
        )
        .await;
        expect_delete(&mut h, DEPLOYMENT).await;
        // Service, agent ConfigMap and DaemonSet are unchanged: skipped.
        expect_pod_list(&mut h, REGISTRY_COMPONENT, registry_pod()).await;
        expect_pod_list(&mut h, AGENT_COMPONENT, agent_pod()).await;
        let status = expect_status(&mut h, &changed).await;
        assert_eq!(status["observedGeneration"], 3);
        h
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
}

/// Two replicas on a self-hosted S3 store, with a credentials Secret.
fn on_s3() -> Value {
    json!({"registries": [{"name": "docker.io"}], "replicas": 2,
           "storage": {"type": "S3", "s3": {
               "endpoint": "http://garage.storage.svc:3900", "bucket": "cachalot",
               "region": "garage", "credentialsSecretRef": {"name": "s3-creds"}}}})
}

#[tokio::test]
async fn an_s3_mirror_checks_its_secret_then_applies_a_stateful_set_its_peers_service_and_a_pdb() {
    let (setup, _writers) = Setup::new();
    let object = mirror_json(on_s3(), true, false);
    let m: RegistryMirror = serde_json::from_value(object.clone()).unwrap();
    let w = setup.world.clone();
    run_scenario(m, &setup, move |mut h| async move {
        expect_secret_metadata_read(&mut h, "s3-creds", true).await;
        let cm = expect_apply(&mut h, REGISTRY_CONFIG, json!({})).await;
        let config = cm["data"]["config.yaml"].as_str().unwrap();
        for line in [
            "bucket: cachalot",
            "prefix: cachalot/hub/",
            "owner: cachalot/hub",
            "accessKeyIdFile: /etc/cachalot/s3/access-key-id",
            "http://cachalot-hub-1.cachalot-hub-peers.cachalot.svc:5000",
        ] {
            assert!(config.contains(line), "{line} in\n{config}");
        }
        let sts = expect_apply(
            &mut h,
            STATEFUL_SET,
            json!({"status": {"readyReplicas": 2}}),
        )
        .await;
        assert_eq!(sts["spec"]["serviceName"], "cachalot-hub-peers");
        expect_service_applied(&mut h).await;
        let peers = expect_apply(&mut h, PEERS_SERVICE, json!({})).await;
        assert_eq!(peers["spec"]["clusterIP"], "None");
        assert_eq!(peers["spec"]["publishNotReadyAddresses"], true);
        expect_apply(&mut h, PDB, json!({})).await;
        expect_nodes_applied_and_pods_listed(&mut h, &w).await;
        let status = expect_ready(&mut h, &object).await;
        assert_eq!(condition(&status, "CacheShared")["status"], "True");
        assert_eq!(condition(&status, "CacheShared")["reason"], "SharedStorage");
        h
    })
    .await;
}

#[tokio::test]
async fn a_missing_s3_credentials_secret_is_ready_false_naming_its_field_and_applies_nothing() {
    assert_missing_reference_pass(
        on_s3(),
        MissingReference {
            reads: &[Read::Secret("s3-creds", false)],
            reason: "CredentialsSecretMissing",
            message: r#"spec.storage.s3.credentialsSecretRef.name: Secret "s3-creds" not found in namespace "cachalot""#,
            others: &[],
        },
    )
    .await;
}

#[tokio::test]
async fn switching_from_pvc_to_s3_storage_deletes_the_stateful_set_instead_of_applying_it() {
    let (setup, mut writers) = Setup::new();
    let converged = converged_docker_hub(&setup, &mut writers).await;
    // The world of a PVC mirror: its StatefulSet is cached, no Deployment.
    let deployment: k8s_openapi::api::apps::v1::Deployment =
        serde_json::from_value(json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "cachalot-hub", "namespace": NS}}))
        .unwrap();
    writers
        .deployments
        .apply_watcher_event(&watcher::Event::Delete(deployment));
    hold(
        &mut writers,
        &json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": {"name": "cachalot-hub", "namespace": NS},
                "spec": {"serviceName": "cachalot-hub", "podManagementPolicy": "Parallel",
                         "selector": {}, "template": {},
                         "volumeClaimTemplates": [{"metadata": {"name": "cache"}}]}}),
    );
    let mut changed = serde_json::to_value(&converged).unwrap();
    changed["spec"]["storage"] = json!({"type": "S3", "s3": {"bucket": "cachalot"}});
    changed["metadata"]["generation"] = json!(3);
    let m: RegistryMirror = serde_json::from_value(changed.clone()).unwrap();
    run_scenario(m, &setup, move |mut h| async move {
        expect_apply(&mut h, REGISTRY_CONFIG, json!({})).await;
        // serviceName and the claim templates cannot change: deleted, not applied; its
        // deletion event triggers the pass that creates the new one.
        expect_delete(&mut h, STATEFUL_SET).await;
        // The nodes' Service is unchanged; the peers Service is new.
        expect_apply(&mut h, PEERS_SERVICE, json!({})).await;
        expect_pod_list(&mut h, REGISTRY_COMPONENT, registry_pod()).await;
        expect_pod_list(&mut h, AGENT_COMPONENT, agent_pod()).await;
        let status = expect_status(&mut h, &changed).await;
        assert_eq!(status["observedGeneration"], 3);
        h
    })
    .await;
}

fn with_credentials() -> Value {
    json!({"registries": [
        {"name": "quay.io", "credentialsSecret": {"name": "quay-creds"}},
        {"name": "docker.io", "credentialsSecret": {"name": "hub-creds"}}
    ]})
}

/// Expects a metadata-only read of `kind` `name` under `collection` and answers it, or 404
/// unless `exists`.
async fn expect_metadata_read(
    handle: &mut Handle,
    collection: &str,
    kind: &str,
    name: &str,
    exists: bool,
) {
    let (call, send) = expect(handle, Method::GET, &format!("{collection}/{name}")).await;
    assert!(
        call.accept.contains("as=PartialObjectMetadata"),
        "only the {kind}'s metadata is read: Accept {}",
        call.accept
    );
    if exists {
        respond(
            send,
            StatusCode::OK,
            &json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                    "metadata": {"name": name, "namespace": NS}}),
        );
    } else {
        not_found(send);
    }
}

/// Expects a metadata-only read of the Secret `name` and answers it, or 404 unless `exists`.
async fn expect_secret_metadata_read(handle: &mut Handle, name: &str, exists: bool) {
    expect_metadata_read(handle, SECRETS, "Secret", name, exists).await;
}

/// Every condition but Ready.
const ALL_BUT_READY: &[&str] = &[
    "ProxyAvailable",
    "NodesConfigured",
    "CacheEffective",
    "UpstreamBudget",
];

/// A metadata read a pass expects: the Secret or ConfigMap named, and whether it exists.
#[derive(Clone, Copy)]
enum Read {
    Secret(&'static str, bool),
    ConfigMap(&'static str, bool),
}

/// What a pass over a mirror held back by a missing reference writes.
struct MissingReference {
    /// The references read, metadata only, in field order: every one is read before anything
    /// is decided.
    reads: &'static [Read],
    /// The reason of Ready (and of `others`): the first missing reference's.
    reason: &'static str,
    /// Ready's message: every missing reference, named by its field.
    message: &'static str,
    /// The other conditions, Unknown for the same reason.
    others: &'static [&'static str],
}

/// Plays one pass over a mirror with `spec`: the reads, then no apply and no pod list, straight
/// to the status (Ready False as `expected` says) and its event. With no watch on Secrets or
/// ConfigMaps, the mirror looks again at the normal period, not in a hot loop.
async fn assert_missing_reference_pass(spec: Value, expected: MissingReference) {
    let (setup, _writers) = Setup::new();
    let object = mirror_json(spec, true, false);
    let m: RegistryMirror = serde_json::from_value(object.clone()).unwrap();
    let action = run_scenario(m, &setup, move |mut h| async move {
        for read in expected.reads {
            match *read {
                Read::Secret(name, exists) => {
                    expect_secret_metadata_read(&mut h, name, exists).await;
                }
                Read::ConfigMap(name, exists) => {
                    expect_config_map_metadata_read(&mut h, name, exists).await;
                }
            }
        }
        let status = expect_status(&mut h, &object).await;
        let ready = condition(&status, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], expected.reason);
        assert_eq!(ready["message"], expected.message);
        for other in expected.others {
            assert_eq!(condition(&status, other)["status"], "Unknown", "{other}");
            assert_eq!(condition(&status, other)["reason"], expected.reason);
        }
        expect_event(&mut h, expected.reason).await;
        h
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
}

#[tokio::test]
async fn a_missing_credentials_secret_is_ready_false_naming_the_field_and_applies_nothing() {
    assert_missing_reference_pass(
        with_credentials(),
        MissingReference {
            reads: &[
                Read::Secret("quay-creds", true),
                Read::Secret("hub-creds", false),
            ],
            reason: "CredentialsSecretMissing",
            message: r#"spec.registries[1].credentialsSecret.name: Secret "hub-creds" not found in namespace "cachalot""#,
            others: &["ProxyAvailable"],
        },
    )
    .await;
}

#[tokio::test]
async fn existing_credentials_secrets_are_checked_by_metadata_then_objects_are_applied() {
    let (setup, _writers) = Setup::new();
    let m = mirror(with_credentials(), true, false);
    let w = setup.world.clone();
    run_scenario(m, &setup, move |mut h| async move {
        expect_secret_metadata_read(&mut h, "quay-creds", true).await;
        expect_secret_metadata_read(&mut h, "hub-creds", true).await;
        expect_apply(&mut h, REGISTRY_CONFIG, json!({})).await;
        let deployment = expect_apply(&mut h, DEPLOYMENT, json!({})).await;
        let volumes = deployment["spec"]["template"]["spec"]["volumes"].to_string();
        assert!(
            volumes.contains("hub-creds") && volumes.contains("quay-creds"),
            "{volumes}"
        );
        expect_service_applied(&mut h).await;
        expect_nodes_applied_and_pods_listed(&mut h, &w).await;
        expect_ready(&mut h, &mirror_json(with_credentials(), true, false)).await;
        h
    })
    .await;
}

/// A private registry reached with the CA of `corp-ca` (and credentials), and a hub parent whose
/// CA is `hub-ca`.
fn with_ca_config_maps() -> Value {
    json!({
        "registries": [
            {"name": "registry.corp.example", "credentialsSecret": {"name": "corp-creds"},
             "caConfigMap": {"name": "corp-ca"}},
            {"name": "docker.io"}
        ],
        "parent": {"url": "https://hub.corp.example:30500", "caConfigMap": {"name": "hub-ca", "key": "hub.pem"}}
    })
}

/// Expects a metadata-only read of the ConfigMap `name` and answers it, or 404 unless `exists`.
async fn expect_config_map_metadata_read(handle: &mut Handle, name: &str, exists: bool) {
    expect_metadata_read(handle, CONFIG_MAPS, "ConfigMap", name, exists).await;
}

#[tokio::test]
async fn a_missing_ca_config_map_is_ready_false_naming_the_field_and_applies_nothing() {
    assert_missing_reference_pass(
        with_ca_config_maps(),
        MissingReference {
            reads: &[
                Read::Secret("corp-creds", true),
                Read::ConfigMap("corp-ca", false),
                Read::ConfigMap("hub-ca", true),
            ],
            reason: "CaConfigMapMissing",
            message: r#"spec.registries[0].caConfigMap.name: ConfigMap "corp-ca" not found in namespace "cachalot""#,
            others: ALL_BUT_READY,
        },
    )
    .await;
}

#[tokio::test]
async fn a_missing_parent_ca_config_map_is_named_by_its_field() {
    assert_missing_reference_pass(
        with_ca_config_maps(),
        MissingReference {
            reads: &[
                Read::Secret("corp-creds", false),
                Read::ConfigMap("corp-ca", true),
                Read::ConfigMap("hub-ca", false),
            ],
            // The first missing reference in field order names the reason; all are listed.
            reason: "CredentialsSecretMissing",
            message: r#"spec.registries[0].credentialsSecret.name: Secret "corp-creds" not found in namespace "cachalot"; spec.parent.caConfigMap.name: ConfigMap "hub-ca" not found in namespace "cachalot""#,
            others: &[],
        },
    )
    .await;
}

#[tokio::test]
async fn existing_ca_config_maps_are_checked_by_metadata_then_mounted_and_named_in_the_config() {
    let (setup, _writers) = Setup::new();
    let m = mirror(with_ca_config_maps(), true, false);
    let w = setup.world.clone();
    run_scenario(m, &setup, move |mut h| async move {
        expect_secret_metadata_read(&mut h, "corp-creds", true).await;
        expect_config_map_metadata_read(&mut h, "corp-ca", true).await;
        expect_config_map_metadata_read(&mut h, "hub-ca", true).await;
        let config = expect_apply(&mut h, REGISTRY_CONFIG, json!({})).await;
        let text = config["data"]["config.yaml"].as_str().unwrap();
        assert!(
            text.contains("caFile: /etc/cachalot/ca/registry.corp.example/ca.crt")
                && text.contains("caFile: /etc/cachalot/parent-ca/hub.pem"),
            "{text}"
        );
        let deployment = expect_apply(&mut h, DEPLOYMENT, json!({})).await;
        let volumes = &deployment["spec"]["template"]["spec"]["volumes"];
        let ca = |name: &str| {
            volumes
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["configMap"]["name"] == name)
                .unwrap_or_else(|| panic!("no volume of {name} in {volumes}"))
                .clone()
        };
        assert_eq!(
            ca("corp-ca")["configMap"]["items"],
            json!([{"key": "ca.crt", "path": "ca.crt"}])
        );
        assert_eq!(
            ca("hub-ca")["configMap"]["items"],
            json!([{"key": "hub.pem", "path": "hub.pem"}])
        );
        expect_service_applied(&mut h).await;
        expect_nodes_applied_and_pods_listed(&mut h, &w).await;
        expect_ready(&mut h, &mirror_json(with_ca_config_maps(), true, false)).await;
        h
    })
    .await;
}

#[tokio::test]
async fn invalid_spec_sets_ready_false_applies_nothing_and_waits_for_a_change() {
    let spec = json!({"registries": [{"name": "docker.io"}], "storage": {"type": "PersistentVolumeClaim"}});
    let m = mirror(spec.clone(), true, false);
    let (setup, _writers) = Setup::new();
    let action = run_scenario(m, &setup, move |mut h| async move {
        let status = expect_status(&mut h, &mirror_json(spec, true, false)).await;
        let ready = condition(&status, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "InvalidSpec");
        assert!(
            ready["message"]
                .as_str()
                .unwrap()
                .contains("spec.storage.size"),
            "{ready}"
        );
        assert!(status.get("endpoint").is_none());
        expect_event(&mut h, "InvalidSpec").await;
        h
    })
    .await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn unchanged_invalid_status_is_not_rewritten() {
    let spec = json!({"registries": [{"name": "docker.io"}], "replicas": 0});
    let first = mirror(spec.clone(), true, false);
    let status = cachalot_operator::controller::status::compute_status(
        &first,
        &cachalot_operator::controller::status::Outcome::Invalid {
            message: cachalot_operator::controller::validate::validate(&first)
                .unwrap_err()
                .to_string(),
        },
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ),
    );
    let mut second = first.clone();
    second.status = Some(status);
    // No call at all: the status is already what it would write, and no transition means no Event.
    let (setup, _writers) = Setup::new();
    let action = run_scenario(second, &setup, |h| async move { h }).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn later_mirror_claiming_the_same_registry_gets_conflict_and_applies_nothing() {
    let (store, mut writer) = reflector::store::<RegistryMirror>();
    let older: RegistryMirror = serde_json::from_value(json!({
        "apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
        "metadata": {"name": "first", "namespace": "other", "uid": "uid-first",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"registries": [{"name": "docker.io"}, {"name": "quay.io"}]}
    }))
    .unwrap();
    let unrelated: RegistryMirror = serde_json::from_value(json!({
        "apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
        "metadata": {"name": "gpu", "namespace": "other", "uid": "uid-gpu",
                     "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": {"registries": [{"name": "docker.io"}], "nodes": {"nodeSelector": {"pool": "gpu"}}}
    }))
    .unwrap();
    let m = mirror(
        json!({"registries": [{"name": "docker.io"}], "nodes": {"nodeSelector": {"pool": "cpu"}}}),
        true,
        false,
    );
    writer.apply_watcher_event(&watcher::Event::Apply(older));
    writer.apply_watcher_event(&watcher::Event::Apply(unrelated));
    writer.apply_watcher_event(&watcher::Event::Apply(m.clone()));
    let object = serde_json::to_value(&m).unwrap();
    let setup = Setup::with_mirrors(store);
    let action = run_scenario(m, &setup, move |mut h| async move {
        let status = expect_status(&mut h, &object).await;
        let conflict = condition(&status, "Conflict");
        assert_eq!(conflict["status"], "True");
        let message = conflict["message"].as_str().unwrap();
        assert!(
            message.contains("other/first") && message.contains("docker.io"),
            "{message}"
        );
        assert!(
            !message.contains("other/gpu"),
            "disjoint node selectors do not conflict: {message}"
        );
        assert_eq!(condition(&status, "Ready")["reason"], "Conflict");
        expect_event(&mut h, "Conflict").await;
        expect_event(&mut h, "ConflictDetected").await;
        h
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
}

#[tokio::test]
async fn deletion_sets_removing_and_drops_finalizer_once_agents_report_no_files() {
    let setup = Setup::with_world(Arc::new(FakeWorld::default()));
    let m = mirror(docker_hub(), true, true);
    let w = setup.world.clone();
    let action = run_scenario(m, &setup, move |mut h| async move {
        // The agent applies the removal at once and then holds no files any more.
        let desired = expect_removal_written_and_agents_listed(&mut h, &w).await;
        assert!(desired.removing);
        assert!(desired.registries.is_empty());
        expect_finalizers(&mut h, json!([]), &mirror_json(docker_hub(), false, true)).await;
        expect_event(&mut h, "NodeFilesRemoved").await;
        h
    })
    .await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn deletion_waits_while_an_agent_still_holds_files() {
    let world = Arc::new(FakeWorld::default());
    *world.agent_files.lock().unwrap() =
        vec!["/etc/containerd/certs.d/docker.io/hosts.toml".into()];
    let setup = Setup::with_world(world);
    let m = mirror(docker_hub(), true, true);
    let w = setup.world.clone();
    let action = run_scenario(m, &setup, move |mut h| async move {
        let desired = expect_removal_written_and_agents_listed(&mut h, &w).await;
        assert!(desired.removing);
        let status = expect_status(&mut h, &mirror_json(docker_hub(), true, true)).await;
        let nodes = condition(&status, "NodesConfigured");
        assert_eq!(nodes["reason"], "RemovingNodeFiles");
        assert!(
            nodes["message"]
                .as_str()
                .unwrap()
                .contains("waiting for node-1"),
            "{nodes}"
        );
        expect_event(&mut h, "Deleting").await;
        h
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
}

#[tokio::test]
async fn deletion_without_agents_removes_the_finalizer_at_once() {
    let m = mirror(docker_hub(), true, true);
    let (setup, _writers) = Setup::new();
    let action = run_scenario(m, &setup, |mut h| async move {
        expect_agent_daemon_set_read(&mut h, false).await;
        expect_finalizers(&mut h, json!([]), &mirror_json(docker_hub(), false, true)).await;
        expect_event(&mut h, "FinalizerRemoved").await;
        h
    })
    .await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn failed_apply_is_a_transient_error_with_a_static_category() {
    let m = mirror(docker_hub(), true, false);
    let (setup, _writers) = Setup::new();
    let result = play(
        NS,
        |mut h| async move {
            let (_, send) = expect(&mut h, Method::PATCH, REGISTRY_CONFIG).await;
            let error = StatusCode::INTERNAL_SERVER_ERROR;
            respond(send, error, &failure(error, "InternalError", "etcd down"));
            h
        },
        |client| async move { reconcile_mirror(&m, &setup.context(client)).await },
    )
    .await;
    let error = result.unwrap_err();
    assert_eq!(error.category(), "ApplyFailed");
    assert!(error.to_string().contains("cachalot-hub-config"), "{error}");
}

#[tokio::test]
async fn a_failed_ca_config_map_check_is_a_transient_error_that_applies_nothing() {
    let m = mirror(
        json!({"registries": [{"name": "docker.io", "caConfigMap": {"name": "corp-ca"}}]}),
        true,
        false,
    );
    let (setup, _writers) = Setup::new();
    let result = play(
        NS,
        |mut h| async move {
            let (_, send) = expect(&mut h, Method::GET, &format!("{CONFIG_MAPS}/corp-ca")).await;
            let error = StatusCode::FORBIDDEN;
            respond(
                send,
                error,
                &failure(error, "Forbidden", "cannot get configmaps"),
            );
            h
        },
        |client| async move { reconcile_mirror(&m, &setup.context(client)).await },
    )
    .await;
    let error = result.unwrap_err();
    assert_eq!(error.category(), "CaConfigMapCheckFailed");
    let message = error.to_string();
    assert!(
        message.starts_with(
            "cannot check spec.registries[0].caConfigMap.name: reading ConfigMap cachalot/corp-ca:"
        ),
        "{message}"
    );
}

#[tokio::test]
async fn a_missing_node_client_certificate_secret_is_tls_secret_missing_naming_its_field() {
    let spec = json!({
        "registries": [{"name": "docker.io"}],
        "service": {"type": "NodePort"},
        "tls": {"secretName": "mirror-tls",
                "clientAuth": {"caSecretKey": "ca.crt",
                               "nodeClientCertSecret": {"name": "mirror-nodes"}}}
    });
    assert_missing_reference_pass(
        spec,
        MissingReference {
            reads: &[
                Read::Secret("mirror-tls", true),
                Read::Secret("mirror-nodes", false),
            ],
            reason: "TlsSecretMissing",
            message: r#"spec.tls.clientAuth.nodeClientCertSecret.name: Secret "mirror-nodes" not found in namespace "cachalot""#,
            others: &["NodesConfigured"],
        },
    )
    .await;
}

#[tokio::test]
async fn a_missing_tls_secret_is_ready_false_with_tls_secret_missing_and_applies_nothing() {
    let spec = json!({
        "registries": [{"name": "docker.io"}],
        "parent": {"url": "https://hub.example:30500",
                   "tls": {"clientCertSecret": {"name": "spoke-client"}}},
        "tls": {"secretName": "mirror-tls",
                "clientAuth": {"bearerTokenSecret": {"name": "spoke-tokens", "key": "token"}}}
    });
    assert_missing_reference_pass(
        spec,
        MissingReference {
            // Metadata only, in field order: the parent's client certificate, the mirror's
            // certificate, the clients' token.
            reads: &[
                Read::Secret("spoke-client", true),
                Read::Secret("mirror-tls", false),
                Read::Secret("spoke-tokens", true),
            ],
            reason: "TlsSecretMissing",
            message: r#"spec.tls.secretName: Secret "mirror-tls" not found in namespace "cachalot""#,
            others: ALL_BUT_READY,
        },
    )
    .await;
}
