//! The real-cluster suite: install the chart with helm, apply a RegistryMirror, wait for Ready,
//! pull with `imagePullPolicy: Always`, check through the registry's own `/stats` (read through
//! the API server's pod proxy) that the pulls went through the mirror and the hit ratio rose, then
//! delete the mirror and check that the node files are gone.
//!
//! Runs only with `CACHALOT_E2E=1` and a `KUBECONFIG` (kind or k3d; see docs/testing.md);
//! otherwise each test prints why it skipped and passes. Each test works in its own namespace
//! labelled `cachalot.dev/e2e=true`, deleted at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use cachalot_e2e::cluster::{hit_counts, wait_until, Settings, CLEANUP_LABEL};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, LogParams, Patch,
    PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{json, Value};

const POLL: Duration = Duration::from_secs(2);
const MIRROR: &str = "e2e";

fn settings_or_skip(test: &str) -> Option<Settings> {
    match Settings::from_env() {
        Ok(settings) => Some(settings),
        Err(reason) => {
            eprintln!("SKIPPED {test}: {reason}");
            None
        }
    }
}

async fn client(settings: &Settings) -> Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(&settings.kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// `helm upgrade --install` of this checkout's chart; serialised across test processes with a
/// lock directory, because two concurrent helm operations on one release fail.
async fn install_chart(settings: &Settings) -> Result<()> {
    let lock = std::env::temp_dir().join("cachalot-e2e-helm.lock");
    wait_until("the helm lock", settings.timeout, Duration::from_millis(200), || {
        let lock = lock.clone();
        async move { std::fs::create_dir(&lock).map_err(|e| format!("{}: {e}", lock.display())) }
    })
    .await?;
    let result = (|| {
        let mut cmd = Command::new(&settings.helm);
        cmd.env("KUBECONFIG", &settings.kubeconfig)
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
        let out = cmd
            .output()
            .with_context(|| format!("run {}", settings.helm))?;
        if !out.status.success() {
            bail!(
                "helm upgrade --install failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir(&lock);
    result
}

/// A throwaway namespace, deleted on drop (also when the test fails).
struct TestNamespace {
    client: kube::Client,
    name: String,
}

impl TestNamespace {
    async fn create(client: &kube::Client, test: &str) -> Result<Self> {
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
        Ok(Self {
            client: client.clone(),
            name,
        })
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let api = Api::<Namespace>::all(self.client.clone());
        let name = self.name.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                let _ = api.delete(&name, &DeleteParams::background()).await;
            });
        });
    }
}

fn mirrors(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("cachalot.dev", "v1alpha1", "RegistryMirror");
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(&gvk, "registrymirrors"),
    )
}

fn condition<'a>(obj: &'a DynamicObject, type_: &str) -> Option<&'a Value> {
    obj.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

async fn wait_for_condition(
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

/// Runs one pod to completion and returns its logs.
async fn run_pod(
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
                "Succeeded" => Ok(()),
                "Failed" => Ok(()), // reported below with its logs
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

/// `/stats` of every registry pod of the mirror, through the API server's pod proxy, summed.
async fn registry_hits_misses(client: &kube::Client, ns: &str) -> Result<(u64, u64)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector =
        format!("app.kubernetes.io/instance={MIRROR},app.kubernetes.io/component=registry");
    let (mut hits, mut misses) = (0, 0);
    let listed = pods.list(&ListParams::default().labels(&selector)).await?;
    if listed.items.is_empty() {
        bail!("no registry pods match {selector}");
    }
    for pod in listed.items {
        let name = pod.metadata.name.unwrap_or_default();
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}:5000/proxy/stats");
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

fn puller(name: &str, image: &str) -> Value {
    json!({"metadata": {"name": name},
           "spec": {"restartPolicy": "Never",
                    "containers": [{"name": "pull", "image": image, "imagePullPolicy": "Always",
                                    "command": ["true"]}]}})
}

/// One pod per node that reports whether the mirror's hosts.toml for docker.io exists there.
async fn node_files(
    settings: &Settings,
    client: &kube::Client,
    ns: &str,
    round: &str,
) -> Result<BTreeMap<String, String>> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut seen = BTreeMap::new();
    for node in nodes.items {
        let node_name = node.metadata.name.unwrap_or_default();
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

#[tokio::test(flavor = "multi_thread")]
async fn mirror_serves_pulls_raises_its_hit_ratio_and_removes_node_files_when_deleted() -> Result<()>
{
    let Some(settings) = settings_or_skip(
        "mirror_serves_pulls_raises_its_hit_ratio_and_removes_node_files_when_deleted",
    ) else {
        return Ok(());
    };
    let client = client(&settings).await?;
    install_chart(&settings).await?;
    let operator: Api<Deployment> = Api::namespaced(client.clone(), &settings.release_namespace);
    let listed = operator.list(&ListParams::default()).await?;
    assert!(
        !listed.items.is_empty(),
        "the chart created the operator Deployment"
    );

    let ns = TestNamespace::create(&client, "pulls").await?;
    let api = mirrors(&client, &ns.name);
    let mut nodes = json!({"certsDir": settings.certs_dir});
    if let Some(config) = &settings.containerd_config {
        nodes["containerdConfig"] = json!(config);
    }
    let mirror = json!({"apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
                        "metadata": {"name": MIRROR},
                        "spec": {"registries": [{"name": "docker.io"}], "nodes": nodes}});
    api.patch(
        MIRROR,
        &PatchParams::apply("cachalot-e2e").force(),
        &Patch::Apply(&mirror),
    )
    .await?;
    let ready = wait_for_condition(&settings, &api, MIRROR, "Ready", "True").await?;
    let endpoint = ready.data["status"]["endpoint"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!endpoint.is_empty(), "a Ready mirror reports its endpoint");

    let files = node_files(&settings, &client, &ns.name, "present").await?;
    for (node, content) in &files {
        assert!(
            content.contains(&endpoint),
            "node {node} points docker.io at {endpoint}: {content}"
        );
    }

    let (hits0, misses0) = registry_hits_misses(&client, &ns.name).await?;
    for round in 0..2 {
        for i in 0..3 {
            run_pod(
                &settings,
                &client,
                &ns.name,
                puller(&format!("pull-{round}-{i}"), &settings.pull_image),
            )
            .await?;
        }
    }
    let (hits1, misses1) = registry_hits_misses(&client, &ns.name).await?;
    let served = (hits1 + misses1) - (hits0 + misses0);
    assert!(
        served >= 6,
        "six Always pulls went through the mirror's registry: {served} requests counted"
    );
    assert!(
        hits1 > hits0,
        "repeated pulls were served from the cache: hits {hits0} -> {hits1}"
    );
    let ratio = |h: u64, m: u64| {
        if h + m == 0 {
            0.0
        } else {
            h as f64 / (h + m) as f64
        }
    };
    assert!(
        ratio(hits1, misses1) > ratio(hits0, misses0),
        "hit ratio rose: {:.2} -> {:.2}",
        ratio(hits0, misses0),
        ratio(hits1, misses1)
    );
    let effective = wait_for_condition(&settings, &api, MIRROR, "CacheEffective", "True").await;
    assert!(
        effective.is_ok(),
        "CacheEffective reports the hits: {effective:?}"
    );

    api.delete(MIRROR, &DeleteParams::default()).await?;
    wait_until(
        "the mirror to be finalized and gone",
        settings.timeout,
        POLL,
        || async {
            match api.get_opt(MIRROR).await {
                Ok(None) => Ok(()),
                Ok(Some(m)) => Err(format!("still there: {}", m.data["status"])),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await?;
    let after = node_files(&settings, &client, &ns.name, "absent").await?;
    for (node, content) in &after {
        assert!(
            content.trim() == "ABSENT",
            "node {node} still has the mirror's hosts.toml: {content}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_mirror_is_not_ready_and_applies_no_registry() -> Result<()> {
    let Some(settings) = settings_or_skip("an_invalid_mirror_is_not_ready_and_applies_no_registry")
    else {
        return Ok(());
    };
    let client = client(&settings).await?;
    install_chart(&settings).await?;
    let ns = TestNamespace::create(&client, "invalid").await?;
    let api = mirrors(&client, &ns.name);
    // Passes the CRD schema (a valid URL shape) but names the same registry twice.
    let mirror = json!({"apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
                        "metadata": {"name": "twice"},
                        "spec": {"registries": [{"name": "docker.io"}, {"name": "docker.io"}]}});
    match api
        .patch(
            "twice",
            &PatchParams::apply("cachalot-e2e").force(),
            &Patch::Apply(&mirror),
        )
        .await
    {
        // The CRD's own validation may already refuse it, which is just as good.
        Err(kube::Error::Api(status)) if status.code == 422 => return Ok(()),
        other => {
            other?;
        }
    }
    wait_for_condition(&settings, &api, "twice", "Ready", "False").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    assert!(
        deployments
            .list(&ListParams::default())
            .await?
            .items
            .is_empty(),
        "no registry was deployed"
    );
    Ok(())
}
