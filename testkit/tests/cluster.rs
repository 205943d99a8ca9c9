//! The cluster fixture against itself: a real control plane starts with Ready fake nodes, pods
//! run and report readiness, a ClusterIP Service reaches them from a node's namespace, two
//! clusters run side by side and leave nothing behind, idle nodes take pods that tolerate
//! them without running them, and a pod sees its ConfigMap change in place and leaves nothing
//! behind when deleted (the kubelet stand-in's own behaviour, through the fixture).
//!
//! Needs root, `scripts/control-plane` and the workspace binaries; without them each test says
//! why it skips, unless `CACHALOT_E2E_LOCAL=required` (CI), where that is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use cachalot_testkit::cluster::{netns, tools, Cluster, ClusterOptions, IDLE_NODE_TAINT};
use cachalot_testkit::prerequisites;
use cachalot_testkit::wait::wait_for;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn prerequisites_or_skip(test: &str) -> bool {
    let missing = netns::require_root()
        .err()
        .map(|e| e.to_string())
        .or_else(|| tools::control_plane_bin().err().map(|e| e.to_string()))
        .or_else(|| {
            ["cachalot-standin", "cachalot-registry"]
                .into_iter()
                .find_map(|b| tools::workspace_binary(b).err().map(|e| e.to_string()))
        });
    prerequisites::run_or_skip(test, missing)
}

/// A directory standing in for an image whose `/usr/local/bin` holds `cachalot-registry`.
fn registry_image() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let binary = tools::workspace_binary("cachalot-registry").unwrap();
    let target = dir.path().join("cachalot-registry");
    if std::fs::hard_link(&binary, &target).is_err() {
        std::fs::copy(&binary, &target).unwrap();
    }
    dir
}

const WAIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_runs_on_fake_nodes_and_its_cluster_ip_reaches_it_from_a_node() {
    if !prerequisites_or_skip("a_deployment_runs_on_fake_nodes") {
        return;
    }
    let image = registry_image();
    let cluster = Cluster::start_with(ClusterOptions {
        nodes: 2,
        images: vec![("test.local/registry:1".into(), image.path().to_owned())],
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let client = cluster.client().await.unwrap();
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(nodes.items.len(), 2);

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                   "spec": {"securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532},
                            "containers": [{"name": "registry", "image": "test.local/registry:1",
                              "command": ["/usr/local/bin/cachalot-registry"],
                              "args": ["serve", "--listen", "0.0.0.0:5000", "--storage", "/var/lib/cachalot"],
                              "ports": [{"name": "http", "containerPort": 5000}],
                              "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
                              "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                                  "capabilities": {"drop": ["ALL"]}},
                              "volumeMounts": [{"name": "cache", "mountPath": "/var/lib/cachalot"}]}],
                            "volumes": [{"name": "cache", "emptyDir": {}}]}}}
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 5000, "targetPort": "http"}]}
    }))
    .unwrap();
    let service = services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let cluster_ip = service.spec.unwrap().cluster_ip.unwrap();

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let ready = wait_for(WAIT, POLL, || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("app=web"))
                .await
                .ok()?;
            let ready: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .collect();
            (ready.len() == 2).then_some(ready)
        }
    })
    .await;
    let ready = ready.unwrap_or_else(|_| {
        panic!(
            "two Ready pods; node-1's kubelet stand-in says:\n{}",
            cluster.log_tail("node-1")
        )
    });
    for pod in &ready {
        let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();
        assert!(
            ip.starts_with("10.240."),
            "pod IP from a node's pod CIDR: {ip}"
        );
    }

    // From node-2's namespace (where its containerd lives) the ClusterIP answers like the pods.
    let node = &cluster.nodes()[1];
    let url = format!("http://{cluster_ip}:5000/v2/");
    let answered = wait_for(WAIT, POLL, || {
        let mut curl = cluster.command_in(&node.netns, "curl");
        curl.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "2",
            &url,
        ]);
        async move {
            let out = curl.output().ok()?;
            let code = String::from_utf8_lossy(&out.stdout).into_owned();
            (code == "200").then_some(code)
        }
    })
    .await;
    assert!(
        answered.is_ok(),
        "GET {url} from {}: proxy log:\n{}",
        node.name,
        cluster.log_tail("proxy")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_run_side_by_side_and_leave_no_namespaces_behind() {
    if !prerequisites_or_skip("two_clusters_side_by_side") {
        return;
    }
    let (a, b) = tokio::join!(
        Cluster::start_with(ClusterOptions {
            nodes: 1,
            ..ClusterOptions::default()
        }),
        Cluster::start_with(ClusterOptions {
            nodes: 1,
            ..ClusterOptions::default()
        })
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.api_url(), b.api_url());
    assert_ne!(a.network().prefix(), b.network().prefix());
    for cluster in [&a, &b] {
        let client = cluster.client().await.unwrap();
        let nodes = Api::<Node>::all(client)
            .list(&ListParams::default())
            .await
            .unwrap();
        assert_eq!(nodes.items.len(), 1);
    }
    let prefixes = [
        format!("{}-", a.network().prefix()),
        format!("{}-", b.network().prefix()),
    ];
    drop(a);
    drop(b);
    let left: Vec<String> = netns::list_netns()
        .into_iter()
        .filter(|ns| prefixes.iter().any(|p| ns.starts_with(p.as_str())))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_nodes_are_ready_and_tainted_and_a_pod_that_tolerates_them_is_bound_and_stays_pending()
{
    if !prerequisites_or_skip("idle_nodes_are_ready_and_tainted") {
        return;
    }
    let cluster = Cluster::start_with(ClusterOptions {
        nodes: 1,
        idle_nodes: 2,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(cluster.idle_nodes(), ["idle-node-1", "idle-node-2"]);
    let client = cluster.client().await.unwrap();
    let (key, value) = IDLE_NODE_TAINT;
    let nodes = Api::<Node>::all(client.clone());
    for name in cluster.idle_nodes() {
        let node = nodes.get(name).await.unwrap();
        let taints = node.spec.unwrap().taints.unwrap_or_default();
        assert_eq!(
            taints
                .iter()
                .map(|t| (t.key.as_str(), t.value.as_deref(), t.effect.as_str()))
                .collect::<Vec<_>>(),
            [(key, Some(value), "NoSchedule")],
            "only the idle taint (admission's not-ready taint removed)"
        );
        assert_eq!(node.metadata.labels.unwrap()[key], value);
    }

    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "on-idle"},
        "spec": {"nodeSelector": {key: value},
                 "tolerations": [{"key": key, "operator": "Equal", "value": value, "effect": "NoSchedule"}],
                 "containers": [{"name": "c", "image": "test.local/none:1"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let bound = wait_for(WAIT, POLL, || {
        let pods = pods.clone();
        async move {
            let pod = pods.get("on-idle").await.ok()?;
            pod.spec?.node_name
        }
    })
    .await
    .unwrap();
    assert!(bound.starts_with("idle-node-"), "bound to {bound}");
    let pod = pods.get("on-idle").await.unwrap();
    assert_eq!(
        pod.status.and_then(|s| s.phase).as_deref(),
        Some("Pending"),
        "no kubelet runs it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_sees_its_config_map_change_in_place_and_a_plain_delete_leaves_nothing_behind() {
    if !prerequisites_or_skip("a_pod_sees_its_config_map_change_in_place") {
        return;
    }
    // The container runs the host's python3 (an image here is a directory, and a container sees
    // the host's files besides its volumes).
    let image = tempfile::tempdir().unwrap();
    let cluster = Cluster::start_with(ClusterOptions {
        nodes: 1,
        images: vec![("test.local/python:1".into(), image.path().to_owned())],
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let client = cluster.client().await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let config_map: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"greeting": "hello"}}))
            .unwrap();
    config_maps
        .create(&PostParams::default(), &config_map)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"terminationGracePeriodSeconds": 5,
                 "containers": [{"name": "web", "image": "test.local/python:1",
                   "command": ["python3", "-m", "http.server", "8080", "--directory", "/cfg"],
                   "ports": [{"name": "http", "containerPort": 8080}],
                   "readinessProbe": {"httpGet": {"path": "/greeting", "port": "http"}, "periodSeconds": 1},
                   "volumeMounts": [{"name": "cfg", "mountPath": "/cfg", "readOnly": true}]}],
                 "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let ready = wait_for(WAIT, POLL, || {
        let pods = pods.clone();
        async move {
            let pod = pods.get("web").await.ok()?;
            let status = pod.status?;
            let ready = status
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then(|| (pod.metadata.uid.unwrap(), status.pod_ip.unwrap()))
        }
    })
    .await;
    let (uid, ip) = ready.unwrap_or_else(|_| {
        panic!(
            "the pod Ready; node-1's kubelet stand-in says:\n{}",
            cluster.log_tail("node-1")
        )
    });
    let node = &cluster.nodes()[0];
    let get = |url: String| {
        let mut curl = cluster.command_in(&node.netns, "curl");
        curl.args(["-s", "-m", "2", &url]);
        async move {
            let out = curl.output().ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    assert_eq!(
        get(format!("http://{ip}:8080/greeting")).await.as_deref(),
        Some("hello")
    );

    // The update reaches the mounted file in place (the kubelet's atomic writer), and the
    // running server serves it.
    config_maps
        .patch(
            "cfg",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"greeting": "bonjour"}})),
        )
        .await
        .unwrap();
    let pod_dir = node.run_dir.join("pods").join(&uid);
    let file = pod_dir.join("volumes/cfg/greeting");
    wait_for(WAIT, POLL, || {
        let file = file.clone();
        async move { (std::fs::read_to_string(&file).ok()? == "bonjour").then_some(()) }
    })
    .await
    .expect("the ConfigMap update on disk");
    wait_for(WAIT, POLL, || {
        let answer = get(format!("http://{ip}:8080/greeting"));
        async move { answer.await.filter(|body| body == "bonjour") }
    })
    .await
    .expect("the pod serves the new file");

    // A plain delete (no force): the stand-in stops the process, removes the pod's network
    // namespace and its files, and only then does the pod object go.
    pods.delete("web", &DeleteParams::default()).await.unwrap();
    wait_for(WAIT, POLL, || {
        let pods = pods.clone();
        async move { pods.get_opt("web").await.ok()?.is_none().then_some(()) }
    })
    .await
    .expect("the pod gone");
    let pod_namespaces: Vec<String> = netns::list_netns()
        .into_iter()
        .filter(|ns| ns.starts_with(&format!("{}-p", cluster.network().prefix())))
        .collect();
    assert!(
        pod_namespaces.is_empty(),
        "pod namespaces left behind: {pod_namespaces:?}"
    );
    assert!(!pod_dir.exists(), "{} left behind", pod_dir.display());
}
