//! The operator against a real control plane ([`cachalot_testkit::cluster`]): the skip rule, the
//! cachalot image the fake nodes run (the workspace's `cachalot-registry` and `cachalot-operator`),
//! the CRD applied and `Established`, namespaces, the RegistryMirror API, and bounded waits that
//! say what was awaited.
//!
//! Tests skip with a printed reason when root, the control plane or the workspace binaries are
//! missing, and fail instead when `CACHALOT_E2E_LOCAL=required` (what `scripts/test` sets).

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use cachalot_testkit::cluster::{netns, tools, Cluster, ClusterOptions};
use cachalot_testkit::prerequisites;
use cachalot_testkit::wait::wait_for;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use serde_json::{json, Value};

/// The image reference of registry and agent pods; on every node it is the workspace's binaries.
pub const IMAGE: &str = "cachalot.test/cachalot:loop";

/// Whether the real control plane can run here; prints why not and returns `false` (skip), or
/// panics when `CACHALOT_E2E_LOCAL=required`.
pub fn prerequisites_or_skip(test: &str) -> bool {
    let missing = netns::require_root()
        .err()
        .map(|e| e.to_string())
        .or_else(|| tools::control_plane_bin().err().map(|e| e.to_string()))
        .or_else(|| {
            ["cachalot-standin", "cachalot-registry", "cachalot-operator"]
                .into_iter()
                .find_map(|b| tools::workspace_binary(b).err().map(|e| e.to_string()))
        });
    prerequisites::run_or_skip(test, missing)
}

/// A directory standing in for the cachalot image: `cachalot-registry` and `cachalot-operator`
/// (`CACHALOT_REGISTRY_BIN`/`CACHALOT_OPERATOR_BIN`, else next to the tests). Hard links when
/// possible: a container's root filesystem cannot follow symlinks out of it.
pub fn cachalot_image() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("cachalot-image-")
        .tempdir()
        .unwrap();
    for binary in ["cachalot-registry", "cachalot-operator"] {
        let source = tools::workspace_binary(binary).unwrap();
        let target = dir.path().join(binary);
        if std::fs::hard_link(&source, &target).is_err() {
            std::fs::copy(&source, &target).unwrap();
        }
    }
    dir
}

/// A cluster whose nodes have the cachalot image, with the RegistryMirror CRD established and
/// namespace `namespace` created. Fields drop in order: the cluster (and its pods) first.
pub struct OperatorCluster {
    pub cluster: Cluster,
    /// An admin client (user `admin`, `system:masters`).
    pub client: kube::Client,
    image: tempfile::TempDir,
}

impl OperatorCluster {
    /// Starts `nodes` fake nodes and `idle_nodes` registered-only ones.
    pub async fn start(nodes: u8, idle_nodes: u16, namespace: &str) -> Self {
        Self::start_with(nodes, idle_nodes, namespace, |_| {}).await
    }

    /// [`Self::start`] with further options set by `configure`.
    pub async fn start_with(
        nodes: u8,
        idle_nodes: u16,
        namespace: &str,
        configure: impl FnOnce(&mut ClusterOptions),
    ) -> Self {
        let image = cachalot_image();
        let mut options = ClusterOptions {
            nodes,
            idle_nodes,
            images: vec![(IMAGE.to_owned(), image.path().to_owned())],
            ..ClusterOptions::default()
        };
        configure(&mut options);
        let cluster = Cluster::start_with(options).await.unwrap();
        let client = cluster.client().await.unwrap();
        install_crd(&client).await;
        create_namespace(&client, namespace).await;
        Self {
            cluster,
            client,
            image,
        }
    }

    /// The directory the image's binaries are in.
    pub fn image_dir(&self) -> &Path {
        self.image.path()
    }
}

/// Bound of the waits on the control plane in these tests (pods start in seconds; the bound is
/// for a loaded machine).
pub const WAIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(100);

/// Polls `check` every 100 ms until it yields a value, for at most `timeout`; panics naming
/// `what` otherwise.
pub async fn eventually_within<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for(timeout, POLL, check)
        .await
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
}

/// Waits until the mirror `name` satisfies `check`, and returns it; on timeout, panics with the
/// last status seen and every pod of the namespace (phase, node, readiness, restarts and last
/// termination), so a failure on a loaded CI machine says why the mirror did not get there.
pub async fn wait_for_mirror_status(
    what: &str,
    mirrors: &Api<DynamicObject>,
    name: &str,
    check: impl Fn(&DynamicObject) -> bool,
) -> DynamicObject {
    let last = std::sync::Mutex::new(Value::Null);
    let found = wait_for(WAIT, POLL, || async {
        let mirror = mirrors.get(name).await.ok()?;
        if check(&mirror) {
            return Some(mirror);
        }
        if let Ok(mut last) = last.lock() {
            *last = json!({"metadata": {"deletionTimestamp": mirror.metadata.deletion_timestamp,
                                        "finalizers": mirror.metadata.finalizers},
                           "status": mirror.data["status"]});
        }
        None
    })
    .await;
    match found {
        Ok(mirror) => mirror,
        Err(e) => {
            let last = last.lock().map(|l| l.to_string()).unwrap_or_default();
            let namespace = mirrors.namespace().unwrap_or("default").to_owned();
            let pods = describe_pods(&mirrors.clone().into_client(), &namespace).await;
            panic!("waiting for {what}: {e}\nlast seen: {last}\npods in {namespace}:\n{pods}")
        }
    }
}

/// One line per pod of `namespace`: name, node, phase, IP, and per container its readiness,
/// restarts, state and last termination.
pub async fn describe_pods(client: &kube::Client, namespace: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = match pods.list(&ListParams::default()).await {
        Ok(list) => list,
        Err(e) => return format!("(listing pods failed: {e})"),
    };
    let lines: Vec<String> = list
        .items
        .iter()
        .map(|pod| {
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            let status = pod.status.clone().unwrap_or_default();
            let containers: Vec<String> = status
                .container_statuses
                .iter()
                .flatten()
                .map(|c| {
                    format!(
                        "{} ready={} restarts={} state={} last={}",
                        c.name,
                        c.ready,
                        c.restart_count,
                        json!(c.state),
                        json!(c.last_state)
                    )
                })
                .collect();
            format!(
                "  {} node={} phase={} ip={} [{}]",
                pod.metadata.name.clone().unwrap_or_default(),
                node.unwrap_or_default(),
                status.phase.unwrap_or_default(),
                status.pod_ip.unwrap_or_default(),
                containers.join("; ")
            )
        })
        .collect();
    lines.join("\n")
}

/// [`eventually_within`] with [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(what, WAIT, check).await
}

/// Applies `crds/registrymirrors.cachalot.dev.yaml` and waits until it is `Established`.
pub async fn install_crd(client: &kube::Client) {
    let yaml = include_str!("../../../crds/registrymirrors.cachalot.dev.yaml");
    let crd: CustomResourceDefinition = serde_yaml::from_str(yaml).unwrap();
    let name = crd.metadata.name.clone().unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd).await.unwrap();
    eventually("the RegistryMirror CRD to be Established", || async {
        let crd = crds.get(&name).await.ok()?;
        let established = crd
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
}

/// Creates namespace `name`.
pub async fn create_namespace(client: &kube::Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

/// The RegistryMirror API of `namespace`.
pub fn mirrors_api(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("cachalot.dev", "v1alpha1", "RegistryMirror");
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk_with_plural(&gvk, "registrymirrors"),
    )
}

/// Server-side applies the RegistryMirror `name` with `spec`, as field manager `manager`.
pub async fn apply_mirror(
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

/// The condition `type_` of a mirror's status.
pub fn condition<'a>(mirror: &'a DynamicObject, type_: &str) -> Option<&'a Value> {
    mirror.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Whether the mirror's condition `type_` is `True`.
pub fn condition_is_true(mirror: &DynamicObject, type_: &str) -> bool {
    condition(mirror, type_).is_some_and(|c| c["status"] == "True")
}
