//! Workload pins (`spec.pinWorkloadImages`): the build step puts the pins next to the registry
//! config without rolling the registry Pods, and a reconcile pass against a mocked API server
//! lists the cluster's Pods (page by page) only when the mirror asks for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cachalot_operator::api::{RegistryMirror, FINALIZER};
use cachalot_operator::controller::build::{
    build_registry_with_pins, BuildConfig, RegistryObjects, Workload, CONFIG_HASH_ANNOTATION,
    CONFIG_KEY, PINS_KEY, PIN_FILE_PATH,
};
use cachalot_operator::controller::observe::{Probe, ProbeError, RegistryStats};
use cachalot_operator::controller::validate::validate;
use cachalot_operator::controller::workload_pins::WorkloadPins;
use cachalot_operator::controller::{reconcile_mirror, Context, ControllerConfig};
use cachalot_operator::metrics::Metrics;
use cachalot_operator::node_agent::protocol::AgentStatus;
use cachalot_registry::config::Config as RegistryConfig;
use common::listed_caches;
use common::mock_api::{not_found, play, respond, written_status, Handle};
use futures::future::BoxFuture;
use futures::FutureExt;
use http::{Method, StatusCode};
use kube::runtime::reflector;
use serde_json::{json, Value};

const NS: &str = "cachalot";
const ALL_PODS: &str = "/api/v1/pods";
const REGISTRY_CONFIG: &str = "/api/v1/namespaces/cachalot/configmaps/cachalot-hub-config";
const MIRROR_STATUS: &str =
    "/apis/cachalot.dev/v1alpha1/namespaces/cachalot/registrymirrors/hub/status";
const DIGEST: &str = "sha256:5555555555555555555555555555555555555555555555555555555555555555";

fn mirror_json(pin_workload_images: bool) -> Value {
    json!({
        "apiVersion": "cachalot.dev/v1alpha1",
        "kind": "RegistryMirror",
        "metadata": {
            "name": "hub", "namespace": NS, "uid": "uid-hub", "generation": 2,
            "resourceVersion": "100", "finalizers": [FINALIZER]
        },
        "spec": {
            "registries": [{"name": "docker.io"}, {"name": "ghcr.io"}],
            "pinWorkloadImages": pin_workload_images,
        },
    })
}

fn mirror(pin_workload_images: bool) -> RegistryMirror {
    serde_json::from_value(mirror_json(pin_workload_images)).unwrap()
}

fn pins(entries: &[(&str, &[&str])]) -> WorkloadPins {
    WorkloadPins {
        by_registry: entries
            .iter()
            .map(|(r, es)| (r.to_string(), es.iter().map(ToString::to_string).collect()))
            .collect(),
        dropped: 0,
    }
}

fn build(m: &RegistryMirror, p: Option<&WorkloadPins>) -> RegistryObjects {
    let cfg = BuildConfig {
        image: "ghcr.io/cachalot-dev/cachalot:test".to_string(),
        cluster_name: None,
    };
    build_registry_with_pins(m, &validate(m).unwrap(), &cfg, p)
        .unwrap()
        .unwrap()
}

fn config_hash(objects: &RegistryObjects) -> String {
    let Workload::Deployment(d) = &objects.workload else {
        panic!("emptyDir storage is a Deployment");
    };
    let template = d.spec.template.metadata.as_ref().unwrap();
    template.annotations.as_ref().unwrap()[CONFIG_HASH_ANNOTATION].clone()
}

#[test]
fn pins_are_rendered_next_to_the_config_which_points_pin_file_at_them() {
    let m = mirror(true);
    let objects = build(&m, Some(&pins(&[("docker.io", &["library/nginx:stable"])])));
    let data = objects.config_map.data.as_ref().unwrap();
    assert_eq!(data[PINS_KEY], "docker.io:\n- library/nginx:stable\n");
    let config: RegistryConfig = serde_yaml::from_str(&data[CONFIG_KEY]).unwrap();
    assert_eq!(
        config.pin_file.as_deref(),
        Some(std::path::Path::new(PIN_FILE_PATH))
    );
    // The pin file is in the config volume, mounted whole (no subPath), so the kubelet updates it.
    let Workload::Deployment(d) = &objects.workload else {
        panic!("emptyDir storage is a Deployment");
    };
    let pod = d.spec.template.spec.as_ref().unwrap();
    let mount = pod.containers[0]
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| PIN_FILE_PATH.starts_with(&format!("{}/", m.mount_path)))
        .expect("a mount holding the pin file");
    assert_eq!(mount.name, "config");
    assert!(mount.sub_path.is_none());
    // The pins are loadable by the registry.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pins.yaml"), &data[PINS_KEY]).unwrap();
    let loaded = cachalot_registry::store::pin_file::load(&dir.path().join("pins.yaml")).unwrap();
    assert!(loaded.is_pinned("docker.io", "library/nginx", "stable"));
}

#[test]
fn changing_pins_does_not_change_the_config_hash_so_no_pod_rolls() {
    let m = mirror(true);
    let before = build(&m, Some(&pins(&[])));
    let after = build(
        &m,
        Some(&pins(&[
            ("docker.io", &["library/nginx:stable"]),
            ("ghcr.io", &["org/app@sha256:00"]),
        ])),
    );
    assert_eq!(before.config_map.data.as_ref().unwrap()[PINS_KEY], "{}\n");
    assert_ne!(before.config_map, after.config_map);
    assert_eq!(config_hash(&before), config_hash(&after));
    assert_eq!(before.workload, after.workload);
}

#[test]
fn without_the_flag_there_is_no_pin_file_and_no_pins_key() {
    let objects = build(&mirror(false), None);
    let data = objects.config_map.data.as_ref().unwrap();
    assert!(!data.contains_key(PINS_KEY));
    let config: RegistryConfig = serde_yaml::from_str(&data[CONFIG_KEY]).unwrap();
    assert_eq!(config.pin_file, None);
    // Turning the flag on changes the config itself, which rolls the Pods once.
    assert_ne!(
        config_hash(&objects),
        config_hash(&build(&mirror(true), None))
    );
}

// ---- reconcile against a mocked API server ----

/// Probes nothing: the pod lists of this scenario are empty.
struct NoProbe;

fn not_probed(url: String) -> ProbeError {
    ProbeError::Request {
        url,
        message: "not probed in this test".into(),
    }
}

impl Probe for NoProbe {
    fn registry_stats(&self, url: String) -> BoxFuture<'static, Result<RegistryStats, ProbeError>> {
        async { Err(not_probed(url)) }.boxed()
    }
    fn agent_status(&self, url: String) -> BoxFuture<'static, Result<AgentStatus, ProbeError>> {
        async { Err(not_probed(url)) }.boxed()
    }
}

/// One call as the scenario saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

fn pod_page(images: &[&str], image_ids: &[&str], next: &str) -> Value {
    let containers: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
        .collect();
    let statuses: Vec<Value> = image_ids
        .iter()
        .enumerate()
        .map(|(i, id)| json!({"name": format!("c{i}"), "image": "x", "imageID": id, "ready": true, "restartCount": 0}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "PodList",
        "metadata": {"resourceVersion": "1", "continue": next},
        "items": [{
            "metadata": {"name": "workload", "namespace": "apps"},
            "spec": {"containers": containers},
            "status": {"phase": "Running", "containerStatuses": statuses}
        }]
    })
}

/// Answers every call as the API server would for this mirror and records it: applies are
/// echoed, deletes (none expected: the caches are empty) find nothing, component pod lists are empty, the cluster-wide Pod list comes
/// in two pages, and the status write returns the mirror with that status.
async fn answer_everything(mut handle: Handle, seen: Arc<Mutex<Vec<Seen>>>) -> Handle {
    // The client is dropped with the operator's future: then `next_request` ends the loop.
    while let Some((request, send)) = handle.next_request().await {
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let call = Seen {
            method: parts.method,
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        };
        seen.lock().unwrap().push(call.clone());
        match (call.method.clone(), call.path.as_str()) {
            (Method::PATCH, MIRROR_STATUS) => {
                let mut updated = mirror_json(true);
                updated["status"] = written_status(&call.body).clone();
                respond(send, StatusCode::OK, &updated);
            }
            (Method::PATCH, _) | (Method::POST, _) => respond(send, StatusCode::OK, &call.body),
            (Method::DELETE, _) => not_found(send),
            (Method::GET, ALL_PODS) if call.query.contains("continue=page2") => respond(
                send,
                StatusCode::OK,
                &pod_page(
                    &["quay.io/other/thing:1", "ghcr.io/org/app:v2"],
                    &[&format!("docker.io/library/nginx@{DIGEST}")],
                    "",
                ),
            ),
            (Method::GET, ALL_PODS) => respond(
                send,
                StatusCode::OK,
                &pod_page(&["nginx:stable", "nginx:stable"], &[], "page2"),
            ),
            (Method::GET, _) => respond(
                send,
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
            ),
            _ => panic!("unexpected call {} {}", call.method, call.path),
        }
    }
    handle
}

/// Runs one reconcile pass of `m` and returns every call it made.
async fn reconcile_once(m: RegistryMirror) -> Vec<Seen> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    play(
        NS,
        move |handle| answer_everything(handle, recorded),
        |client| async move {
            let (store, _writer) = reflector::store();
            let (owned, _writers) = listed_caches();
            let ctx = Context::new(
                client,
                ControllerConfig::new("ghcr.io/cachalot-dev/cachalot:test"),
                Arc::new(NoProbe),
                store,
                owned,
                Arc::new(Metrics::new()),
            );
            reconcile_mirror(&m, &ctx).await.expect("reconcile failed");
        },
    )
    .await;
    let calls = seen.lock().unwrap().clone();
    calls
}

fn find<'a>(calls: &'a [Seen], method: Method, path: &str) -> &'a Seen {
    calls
        .iter()
        .find(|c| c.method == method && c.path == path)
        .unwrap_or_else(|| panic!("no {method} {path}"))
}

#[tokio::test]
async fn an_enabled_mirror_lists_every_pod_page_before_applying_and_writes_their_pins() {
    let calls = reconcile_once(mirror(true)).await;
    let lists: Vec<&Seen> = calls.iter().filter(|c| c.path == ALL_PODS).collect();
    assert_eq!(lists.len(), 2, "two pages");
    assert!(lists.iter().all(|c| c.query.contains("limit=500")));
    assert!(
        !lists[0].query.contains("labelSelector"),
        "{}",
        lists[0].query
    );
    // The Pods are listed before anything is applied: a failed list applies nothing.
    let first_apply = calls
        .iter()
        .position(|c| c.method == Method::PATCH)
        .unwrap();
    let last_list = calls.iter().rposition(|c| c.path == ALL_PODS).unwrap();
    assert!(last_list < first_apply);

    let config_map = &find(&calls, Method::PATCH, REGISTRY_CONFIG).body;
    let written: BTreeMap<String, Vec<String>> =
        serde_yaml::from_str(config_map["data"][PINS_KEY].as_str().unwrap()).unwrap();
    assert_eq!(
        written,
        BTreeMap::from([
            (
                "docker.io".to_string(),
                vec![
                    "library/nginx:stable".to_string(),
                    format!("library/nginx@{DIGEST}"),
                ]
            ),
            ("ghcr.io".to_string(), vec!["org/app:v2".to_string()]),
        ])
    );
    let status = written_status(&find(&calls, Method::PATCH, MIRROR_STATUS).body);
    assert_eq!(status["pinnedImages"], 3);
}

#[tokio::test]
async fn a_mirror_without_the_flag_never_lists_the_clusters_pods() {
    let calls = reconcile_once(mirror(false)).await;
    assert!(
        calls.iter().all(|c| c.path != ALL_PODS),
        "{:?}",
        calls.iter().map(|c| &c.path).collect::<Vec<_>>()
    );
    let config_map = &find(&calls, Method::PATCH, REGISTRY_CONFIG).body;
    assert!(config_map["data"].get(PINS_KEY).is_none());
    let status = written_status(&find(&calls, Method::PATCH, MIRROR_STATUS).body);
    assert!(status.get("pinnedImages").is_none());
}
