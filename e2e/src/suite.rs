//! The steps the end-to-end tests share, written against the Kubernetes API only, so they run
//! the same on the local target and on kind or k3d: install the chart, make throwaway namespaces,
//! apply mirrors, wait for conditions, run pods to completion (pulls, node-file checks), read the
//! registry's `/stats` through the API server's pod proxy, and read `kubectl get registrymirrors`.
//!
//! This is test-support code: every caller is a test that prints the error, so failures are
//! `anyhow` reports with the context of what was being done. Every wait has a deadline.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, LogParams, Patch,
    PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{json, Value};

use crate::cluster::{hit_counts, wait_until, Settings, CLEANUP_LABEL};

/// The registry pods' admin port (`/stats`, `/metrics`), as the operator renders it.
pub const REGISTRY_ADMIN_PORT: u16 = 5001;
/// Poll interval of the suite's waits.
pub const POLL: Duration = Duration::from_millis(500);
/// The field manager of what the suite applies.
pub const MANAGER: &str = "cachalot-e2e";

/// A client for the target cluster (the kubeconfig's current context).
///
/// # Errors
/// When the kubeconfig cannot be read.
pub async fn client(settings: &Settings) -> Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(&settings.kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// kubectl against the target: `$CACHALOT_KUBECTL`, the pinned one in the tool cache, else
/// `kubectl` from `PATH`.
#[must_use]
pub fn kubectl(settings: &Settings) -> Command {
    let program = cachalot_testkit::cluster::tools::kubectl()
        .map_or_else(|_| "kubectl".into(), |p| p.display().to_string());
    let mut command = Command::new(program);
    command.env("KUBECONFIG", &settings.kubeconfig);
    command
}

/// Runs a prepared command and returns its stdout, failing with its stderr.
///
/// # Errors
/// When it cannot run or exits non-zero.
pub fn run(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("run {:?}", command.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}{}",
            command.get_program(),
            command.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm upgrade --install cachalot` of this checkout's chart, with `--wait`, the settings' image
/// and `sets` (`key=value`). Serialised per cluster with a lock directory, because two
/// concurrent helm operations on one release fail.
///
/// # Errors
/// When helm fails.
pub async fn install_chart(settings: &Settings, sets: &[&str]) -> Result<()> {
    let lock = std::env::temp_dir().join(format!(
        "cachalot-e2e-helm-{:x}.lock",
        settings
            .kubeconfig
            .display()
            .to_string()
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
    ));
    wait_until("the helm lock", settings.timeout, Duration::from_millis(200), || {
        let lock = lock.clone();
        async move { std::fs::create_dir(&lock).map_err(|e| format!("{}: {e}", lock.display())) }
    })
    .await?;
    let home = tempfile::tempdir()?;
    let mut cmd = Command::new(&settings.helm);
    cmd.env("KUBECONFIG", &settings.kubeconfig)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .args(["upgrade", "--install", "cachalot"])
        .arg(&settings.chart)
        .args([
            "--namespace",
            &settings.release_namespace,
            "--create-namespace",
            "--wait",
        ])
        .arg(format!("--timeout={}s", settings.timeout.as_secs()));
    if let Some((repo, tag)) = &settings.image {
        cmd.arg(format!("--set=image.repository={repo}"))
            .arg(format!("--set=image.tag={tag}"));
    }
    for set in sets {
        cmd.arg(format!("--set={set}"));
    }
    let result = run(&mut cmd).map(|_| ());
    let _ = std::fs::remove_dir(&lock);
    result.context("helm upgrade --install")
}

/// A throwaway namespace, deleted on drop (also when the test fails).
pub struct TestNamespace {
    client: kube::Client,
    /// Its name.
    pub name: String,
}

impl TestNamespace {
    /// Creates `cachalot-e2e-<test>-<suffix>` with the cleanup label, and the upstream's CA
    /// ConfigMap in it when the target has one.
    ///
    /// # Errors
    /// When the API refuses.
    pub async fn create(settings: &Settings, client: &kube::Client, test: &str) -> Result<Self> {
        let suffix = format!(
            "{:x}",
            std::process::id()
                ^ (std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .subsec_nanos())
        );
        let name = format!("cachalot-e2e-{test}-{suffix}");
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {CLEANUP_LABEL.0: CLEANUP_LABEL.1}}
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        let created = Self {
            client: client.clone(),
            name,
        };
        create_upstream_ca(settings, client, &created.name).await?;
        Ok(created)
    }
}

impl std::fmt::Debug for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNamespace")
            .field("name", &self.name)
            .finish()
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let api = Api::<Namespace>::all(self.client.clone());
        let name = self.name.clone();
        // Needs the multi-threaded runtime (every suite test uses it).
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                let _ = api.delete(&name, &DeleteParams::background()).await;
            });
        });
    }
}

/// Creates the upstream's CA ConfigMap in `ns` when the target has one (see
/// [`Settings::upstream_ca`]).
///
/// # Errors
/// When the API refuses.
pub async fn create_upstream_ca(
    settings: &Settings,
    client: &kube::Client,
    ns: &str,
) -> Result<()> {
    let Some((name, pem)) = &settings.upstream_ca else {
        return Ok(());
    };
    let config_map: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": name},
        "data": {"ca.crt": pem}
    }))?;
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &config_map)
        .await?;
    Ok(())
}

/// The RegistryMirror API of a namespace.
#[must_use]
pub fn mirrors(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("cachalot.dev", "v1alpha1", "RegistryMirror");
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(&gvk, "registrymirrors"),
    )
}

/// A RegistryMirror for docker.io named `name` as the target needs it (the settings' upstream
/// URL and node paths), with `spec` merged over it.
#[must_use]
pub fn mirror_manifest(settings: &Settings, name: &str, spec: &Value) -> Value {
    let mut nodes = json!({"certsDir": settings.certs_dir});
    if let Some(config) = &settings.containerd_config {
        nodes["containerdConfig"] = json!(config);
    }
    let mut registry = json!({"name": "docker.io"});
    if let Some(url) = &settings.upstream_url {
        registry["url"] = json!(url);
    }
    if let Some((config_map, _)) = &settings.upstream_ca {
        registry["caConfigMap"] = json!({"name": config_map});
    }
    let mut manifest = json!({"apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
                              "metadata": {"name": name},
                              "spec": {"registries": [registry], "nodes": nodes}});
    merge(&mut manifest["spec"], spec);
    manifest
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Server-side applies `manifest` (its `metadata.name`) with the suite's field manager.
///
/// # Errors
/// When the API refuses.
pub async fn apply_mirror(api: &Api<DynamicObject>, manifest: &Value) -> Result<DynamicObject> {
    let name = manifest["metadata"]["name"]
        .as_str()
        .context("manifest without a name")?;
    Ok(api
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(manifest),
        )
        .await?)
}

/// The condition `type_` of a mirror's status.
#[must_use]
pub fn condition<'a>(obj: &'a DynamicObject, type_: &str) -> Option<&'a Value> {
    obj.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Waits until condition `type_` of mirror `name` has `status`, and returns the mirror.
///
/// # Errors
/// On timeout, with the last condition seen.
pub async fn wait_for_condition(
    settings: &Settings,
    api: &Api<DynamicObject>,
    name: &str,
    type_: &str,
    status: &str,
) -> Result<DynamicObject> {
    Ok(wait_until(
        &format!("{name} {type_}={status}"),
        settings.timeout,
        POLL,
        || async {
            let obj = api.get(name).await.map_err(|e| e.to_string())?;
            match condition(&obj, type_) {
                Some(c) if c["status"] == status => Ok(obj),
                other => Err(format!("{type_}: {other:?}")),
            }
        },
    )
    .await?)
}

/// Waits until `check` holds for mirror `name`, returning it.
///
/// # Errors
/// On timeout, with the last status seen.
pub async fn wait_for_mirror(
    settings: &Settings,
    api: &Api<DynamicObject>,
    name: &str,
    what: &str,
    check: impl Fn(&DynamicObject) -> bool,
) -> Result<DynamicObject> {
    Ok(wait_until(what, settings.timeout, POLL, || async {
        let obj = api.get(name).await.map_err(|e| e.to_string())?;
        if check(&obj) {
            Ok(obj)
        } else {
            Err(format!("status: {}", obj.data["status"]))
        }
    })
    .await?)
}

/// Runs one pod to completion and returns its logs.
///
/// # Errors
/// When it cannot be created, does not finish in time, or fails (with its logs).
pub async fn run_pod(
    settings: &Settings,
    client: &kube::Client,
    ns: &str,
    pod: Value,
) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(pod)?;
    let name = pod.metadata.name.clone().context("pod name")?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_until(
        &format!("pod {name} to finish"),
        settings.timeout,
        POLL,
        || async {
            let p = pods.get(&name).await.map_err(|e| e.to_string())?;
            let phase = p
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            match phase.as_str() {
                "Succeeded" | "Failed" => Ok(()), // a failure is reported below with its logs
                _ => Err(format!(
                    "phase {phase:?}, status {:?}",
                    p.status.and_then(|s| s.container_statuses)
                )),
            }
        },
    )
    .await?;
    let logs = pods.logs(&name, &LogParams::default()).await?;
    let phase = pods
        .get(&name)
        .await?
        .status
        .and_then(|s| s.phase)
        .unwrap_or_default();
    if phase != "Succeeded" {
        bail!("pod {name} ended {phase}: {logs}");
    }
    Ok(logs)
}

/// A pod that pulls `image` with `imagePullPolicy: Always` on `node` and exits.
#[must_use]
pub fn puller(name: &str, image: &str, node: Option<&str>) -> Value {
    let mut pod = json!({"metadata": {"name": name},
           "spec": {"restartPolicy": "Never",
                    "containers": [{"name": "pull", "image": image, "imagePullPolicy": "Always",
                                    "command": ["true"]}]}});
    if let Some(node) = node {
        pod["spec"]["nodeName"] = json!(node);
    }
    pod
}

/// The names of the cluster's nodes, sorted.
///
/// # Errors
/// When the API refuses.
pub async fn node_names(client: &kube::Client) -> Result<Vec<String>> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut names: Vec<String> = nodes
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    names.sort();
    Ok(names)
}

/// `/stats` of every registry pod of mirror `mirror`, through the API server's pod proxy to the
/// pods' admin port, summed as (hits, misses).
///
/// # Errors
/// When no registry pod exists or one does not answer.
pub async fn registry_hits_misses(
    client: &kube::Client,
    ns: &str,
    mirror: &str,
) -> Result<(u64, u64)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector =
        format!("app.kubernetes.io/instance={mirror},app.kubernetes.io/component=registry");
    let (mut hits, mut misses) = (0, 0);
    let listed = pods.list(&ListParams::default().labels(&selector)).await?;
    let running: Vec<Pod> = listed
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    if running.is_empty() {
        bail!("no registry pods match {selector}");
    }
    for pod in running {
        let name = pod.metadata.name.unwrap_or_default();
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}:{REGISTRY_ADMIN_PORT}/proxy/stats");
        let request = http::Request::get(path).body(Vec::new())?;
        let text = client
            .request_text(request)
            .await
            .with_context(|| format!("GET /stats of {name}"))?;
        let stats: Value =
            serde_json::from_str(&text).with_context(|| format!("/stats of {name}: {text}"))?;
        let (h, m) = hit_counts(&stats)
            .with_context(|| format!("no hit counts in /stats of {name}: {text}"))?;
        hits += h;
        misses += m;
    }
    Ok((hits, misses))
}

/// One pod per node that prints the mirror's hosts.toml for docker.io there (`ABSENT` if none).
///
/// # Errors
/// When a pod fails.
pub async fn node_files(
    settings: &Settings,
    client: &kube::Client,
    ns: &str,
    round: &str,
) -> Result<BTreeMap<String, String>> {
    let mut seen = BTreeMap::new();
    for node_name in node_names(client).await? {
        let pod = json!({"metadata": {"name": format!("files-{round}-{}", node_name.replace('.', "-"))},
            "spec": {"restartPolicy": "Never", "nodeName": node_name,
                     "tolerations": [{"operator": "Exists"}],
                     "containers": [{"name": "look", "image": settings.tools_image,
                                     "command": ["sh", "-c", "cat /host/certs.d/docker.io/hosts.toml 2>/dev/null || echo ABSENT"],
                                     "volumeMounts": [{"name": "certs", "mountPath": "/host/certs.d", "readOnly": true}]}],
                     "volumes": [{"name": "certs", "hostPath": {"path": settings.certs_dir, "type": "DirectoryOrCreate"}}]}});
        let logs = run_pod(settings, client, ns, pod).await?;
        seen.insert(node_name, logs);
    }
    Ok(seen)
}

/// `kubectl get registrymirrors -n NS` as rows of column → value (the printer columns).
///
/// # Errors
/// When kubectl fails.
pub fn get_registrymirrors(settings: &Settings, ns: &str) -> Result<Vec<BTreeMap<String, String>>> {
    let out = run(kubectl(settings).args(["get", "registrymirrors", "-n", ns]))?;
    Ok(parse_table(&out))
}

/// Parses kubectl's default table output (columns separated by runs of 2+ spaces, as kubectl
/// pads them; empty cells show as `<none>` or blanks). Pure.
#[must_use]
pub fn parse_table(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    // Column start offsets from the header (headers have no inner double spaces).
    let mut starts = Vec::new();
    let mut names = Vec::new();
    let mut prev_space = true;
    for (i, c) in header.char_indices() {
        if c != ' ' && prev_space {
            starts.push(i);
        }
        prev_space = c == ' ';
    }
    for (n, start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(header.len());
        names.push(header[*start..end].trim().to_owned());
    }
    lines
        .map(|line| {
            names
                .iter()
                .enumerate()
                .map(|(n, name)| {
                    let start = starts[n].min(line.len());
                    let end = starts
                        .get(n + 1)
                        .copied()
                        .unwrap_or(line.len())
                        .min(line.len());
                    (
                        name.clone(),
                        line.get(start..end).unwrap_or("").trim().to_owned(),
                    )
                })
                .collect()
        })
        .collect()
}

/// Waits until the mirror `name` and its owned objects are gone.
///
/// # Errors
/// On timeout.
pub async fn wait_gone(settings: &Settings, api: &Api<DynamicObject>, name: &str) -> Result<()> {
    wait_until(
        "the mirror to be finalized and gone",
        settings.timeout,
        POLL,
        || async {
            match api.get_opt(name).await {
                Ok(None) => Ok(()),
                Ok(Some(m)) => Err(format!("still there: {}", m.data["status"])),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await?;
    Ok(())
}

/// The operator's status refresh in the suite: short, so cache figures show up quickly.
pub const FAST_REQUEUE: &str = "operator.extraArgs={--requeue-after=5s}";

/// What most tests start from: a target cluster with the chart installed and a fresh namespace.
/// Drops the namespace, then the target (and the local cluster with it).
pub struct Scene {
    /// The mirrors of [`Scene::ns`].
    pub api: Api<DynamicObject>,
    /// The test's namespace.
    pub ns: TestNamespace,
    /// An admin client.
    pub client: kube::Client,
    /// The cluster.
    pub target: crate::target::Target,
}

impl std::fmt::Debug for Scene {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scene")
            .field("ns", &self.ns)
            .finish_non_exhaustive()
    }
}

impl Scene {
    /// Acquires a target with `nodes` nodes for `test`, installs the chart with `sets` (and the
    /// fast requeue), and creates the namespace; `Ok(None)` when the test skips.
    ///
    /// # Errors
    /// When the target, the chart or the namespace fails.
    pub async fn set_up(test: &str, nodes: u8, sets: &[&str]) -> Result<Option<Self>> {
        let Some(target) = crate::target::acquire(test, nodes).await? else {
            return Ok(None);
        };
        let settings = target.settings();
        let client = client(settings).await?;
        let mut all = vec![FAST_REQUEUE];
        all.extend_from_slice(sets);
        install_chart(settings, &all).await?;
        let ns = TestNamespace::create(settings, &client, &test.replace('_', "-")).await?;
        let api = mirrors(&client, &ns.name);
        Ok(Some(Self {
            api,
            ns,
            client,
            target,
        }))
    }

    /// The target's settings.
    #[must_use]
    pub fn settings(&self) -> &Settings {
        self.target.settings()
    }

    /// Applies a docker.io mirror named `name` (with `spec` merged, see [`mirror_manifest`]) and
    /// waits until it is Ready.
    ///
    /// # Errors
    /// When the apply is refused or the mirror does not become Ready in time.
    pub async fn ready_mirror(&self, name: &str, spec: &Value) -> Result<DynamicObject> {
        apply_mirror(&self.api, &mirror_manifest(self.settings(), name, spec)).await?;
        wait_for_condition(self.settings(), &self.api, name, "Ready", "True").await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn kubectl_tables_are_read_by_column() {
        let text = "NAME   READY   ENDPOINT                NODES   HIT-RATIO   BUDGET    AGE\n\
                    e2e    True    http://10.96.0.12:5000  2/2     0.67        97/100    2m\n\
                    bad    False                                                          5s\n";
        let rows = parse_table(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["READY"], "True");
        assert_eq!(rows[0]["NODES"], "2/2");
        assert_eq!(rows[0]["BUDGET"], "97/100");
        assert_eq!(rows[1]["NODES"], "");
        assert_eq!(rows[1]["AGE"], "5s");
    }

    #[test]
    fn a_mirror_manifest_takes_the_targets_upstream_and_extra_spec() {
        let settings = Settings {
            kubeconfig: "k".into(),
            helm: "helm".into(),
            chart: "c".into(),
            release_namespace: "cachalot-system".into(),
            image: None,
            pull_image: "p".into(),
            tools_image: "t".into(),
            certs_dir: "/etc/containerd/certs.d".into(),
            containerd_config: None,
            upstream_url: Some("http://10.250.0.10:5000".into()),
            upstream_ca: Some(("upstream-ca".into(), "PEM".into())),
            timeout: Duration::from_secs(1),
        };
        let m = mirror_manifest(
            &settings,
            "m",
            &json!({"replicas": 2, "nodes": {"fallback": "Never"}}),
        );
        assert_eq!(m["spec"]["registries"][0]["url"], "http://10.250.0.10:5000");
        assert_eq!(
            m["spec"]["registries"][0]["caConfigMap"]["name"],
            "upstream-ca"
        );
        assert_eq!(m["spec"]["replicas"], 2);
        assert_eq!(m["spec"]["nodes"]["fallback"], "Never");
        assert_eq!(m["spec"]["nodes"]["certsDir"], "/etc/containerd/certs.d");
    }
}
