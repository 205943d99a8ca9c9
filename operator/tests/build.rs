//! Pure build tests: representative RegistryMirror specs → the objects the operator owns.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use cachalot_operator::api::RegistryMirror;
use cachalot_operator::controller::build::{
    build_agent, build_registry, node_endpoint, BuildConfig, RegistryObjects, Workload,
    CONFIG_HASH_ANNOTATION, CONFIG_KEY, DESIRED_KEY,
};
use cachalot_operator::controller::validate::{validate, ValidateError, Validated};
use cachalot_operator::node_agent::protocol::{DesiredState, Fallback};
use cachalot_registry::config::Config as RegistryConfig;
use k8s_openapi::api::core::v1::{PodSpec, Service, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

const IMAGE: &str = "ghcr.io/cachalot-dev/cachalot:0.1.0";

fn cfg() -> BuildConfig {
    BuildConfig {
        image: IMAGE.to_string(),
        cluster_name: None,
    }
}

fn mirror(spec: serde_json::Value) -> RegistryMirror {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "cachalot.dev/v1alpha1",
        "kind": "RegistryMirror",
        "metadata": {"name": "hub", "namespace": "cachalot", "uid": "uid-1", "generation": 3},
        "spec": spec,
    }))
    .unwrap()
}

fn build(m: &RegistryMirror) -> (Validated, Option<RegistryObjects>) {
    let v = validate(m).unwrap();
    let objs = build_registry(m, &v, &cfg()).unwrap();
    (v, objs)
}

fn rendered_config(objs: &RegistryObjects) -> RegistryConfig {
    let text = &objs.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    let mut config: RegistryConfig = serde_yaml::from_str(text).unwrap();
    config.normalise();
    config.validate().unwrap();
    config
}

fn pod_spec(objs: &RegistryObjects) -> &PodSpec {
    match &objs.workload {
        Workload::Deployment(d) => d.spec.template.spec.as_ref().unwrap(),
        Workload::StatefulSet(s) => s.spec.template.spec.as_ref().unwrap(),
    }
}

fn service_with_ip(ip: &str, node_port: Option<i32>) -> Service {
    Service {
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.to_string()),
            ports: Some(vec![k8s_openapi::api::core::v1::ServicePort {
                port: 5000,
                node_port,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn docker_hub_only_mirror_renders_a_config_the_registry_accepts() {
    let m = mirror(serde_json::json!({"registries": [{"name": "docker.io"}]}));
    let (_, objs) = build(&m);
    let objs = objs.unwrap();
    let config = rendered_config(&objs);
    assert_eq!(config.default_registry, "docker.io");
    assert_eq!(config.listen.port(), 5000);
    assert_eq!(
        config.registries["docker.io"].url.as_deref(),
        Some("https://registry-1.docker.io")
    );
    assert_eq!(config.storage.max_size_bytes, Some(10 << 30));
    assert!(config.parent.is_none());
    assert!(matches!(objs.workload, Workload::Deployment(_)));
    assert!(
        objs.pdb.is_none(),
        "one replica needs no PodDisruptionBudget"
    );
    let svc = objs.service.spec.as_ref().unwrap();
    assert_eq!(svc.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(
        objs.config_map.metadata.name.as_deref(),
        Some("cachalot-hub-config")
    );
}

#[test]
fn every_owned_object_has_a_controller_owner_reference_and_mirror_labels() {
    let m = mirror(serde_json::json!({"registries": [{"name": "docker.io"}], "replicas": 2}));
    let (v, objs) = build(&m);
    let objs = objs.unwrap();
    let agent = build_agent(&m, &v, &cfg(), Some("http://10.96.0.12:5000"), false).unwrap();
    let Workload::Deployment(d) = &objs.workload else {
        panic!("expected a Deployment")
    };
    let metas = [
        &objs.config_map.metadata,
        &d.metadata,
        &objs.service.metadata,
        &objs.pdb.as_ref().unwrap().metadata,
        &agent.config_map.metadata,
        &agent.daemon_set.metadata,
    ];
    for meta in metas {
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "RegistryMirror");
        assert_eq!(owner.api_version, "cachalot.dev/v1alpha1");
        assert_eq!(owner.uid, "uid-1");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(meta.namespace.as_deref(), Some("cachalot"));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels["cachalot.dev/mirror"], "hub");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "cachalot-operator");
    }
}

#[test]
fn registry_pods_are_hardened_with_probes_and_only_cache_and_tmp_writable() {
    let m = mirror(serde_json::json!({"registries": [{"name": "docker.io"}]}));
    let (_, objs) = build(&m);
    let objs = objs.unwrap();
    let pod = pod_spec(&objs);
    assert_eq!(pod.automount_service_account_token, Some(false));
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some(IMAGE));
    assert_eq!(
        c.args.as_ref().unwrap(),
        &["serve", "--config", "/etc/cachalot/config/config.yaml"]
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
        &["ALL"]
    );
    let readiness = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(readiness.path.as_deref(), Some("/readyz"));
    let liveness = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(liveness.path.as_deref(), Some("/healthz"));
    let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    let writable: Vec<&str> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .filter(|m| m.read_only != Some(true))
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(writable, ["/tmp", "/var/lib/cachalot"]);
}

#[test]
fn several_registries_with_credentials_reference_secret_files_never_secret_data() {
    let m = mirror(serde_json::json!({
        "registries": [
            {"name": "docker.io", "credentialsSecret": {"name": "hub-creds"},
             "freshness": [{"pattern": "latest", "maxAge": "1m"}, {"pattern": "v*", "immutable": true}],
             "budgetReserve": 10},
            {"name": "ghcr.io", "credentialsSecret": {"name": "gh", "type": "DockerConfigJson"}},
            {"name": "registry.local:5000", "url": "http://registry.local:5000/"}
        ],
        "defaultRegistry": "ghcr.io"
    }));
    let (_, objs) = build(&m);
    let objs = objs.unwrap();
    let config = rendered_config(&objs);
    assert_eq!(config.default_registry, "ghcr.io");
    assert_eq!(config.registries.len(), 3);
    let hub = &config.registries["docker.io"];
    let creds = hub.credentials.as_ref().unwrap();
    assert_eq!(
        creds.username_file.as_deref().unwrap().to_str(),
        Some("/etc/cachalot/credentials/docker.io/username")
    );
    assert_eq!(hub.budget_reserve, 10);
    assert_eq!(hub.freshness.len(), 2);
    assert_eq!(
        hub.freshness[0].max_age,
        Some(std::time::Duration::from_secs(60))
    );
    assert!(hub.freshness[1].immutable);
    let gh = config.registries["ghcr.io"].credentials.as_ref().unwrap();
    assert_eq!(
        gh.docker_config_file.as_deref().unwrap().to_str(),
        Some("/etc/cachalot/credentials/ghcr.io/.dockerconfigjson")
    );
    assert_eq!(
        config.registries["registry.local:5000"].url.as_deref(),
        Some("http://registry.local:5000")
    );
    let pod = pod_spec(&objs);
    let secrets: BTreeMap<String, String> = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v.name.clone(), v.secret.as_ref()?.secret_name.clone()?)))
        .collect();
    assert_eq!(
        secrets.values().cloned().collect::<Vec<_>>(),
        ["hub-creds", "gh"]
    );
    let mounts: Vec<&str> = pod.containers[0]
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .filter(|m| secrets.contains_key(&m.name))
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(
        mounts,
        [
            "/etc/cachalot/credentials/docker.io",
            "/etc/cachalot/credentials/ghcr.io"
        ]
    );
    let text = &objs.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    assert!(!text.contains("hub-creds") && !text.to_lowercase().contains("password:"));
}

#[test]
fn pvc_storage_renders_a_statefulset_with_claims_and_a_cache_bound_below_the_claim() {
    let m = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}],
        "storage": {"type": "PersistentVolumeClaim", "size": "20Gi", "storageClassName": "fast"}
    }));
    let (_, objs) = build(&m);
    let objs = objs.unwrap();
    let Workload::StatefulSet(s) = &objs.workload else {
        panic!("expected a StatefulSet")
    };
    let claim = &s.spec.volume_claim_templates.as_ref().unwrap()[0];
    let claim_spec = claim.spec.as_ref().unwrap();
    assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(
        claim_spec
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
        "20Gi"
    );
    assert_eq!(claim.metadata.name.as_deref(), Some("cache"));
    let pod = s.spec.template.spec.as_ref().unwrap();
    assert!(
        pod.volumes
            .as_ref()
            .unwrap()
            .iter()
            .all(|v| v.name != "cache"),
        "the cache volume comes from the claim template, not an emptyDir"
    );
    let config = rendered_config(&objs);
    assert_eq!(config.storage.max_size_bytes, Some((20u64 << 30) / 10 * 9));
}

#[test]
fn nodeport_exposure_points_nodes_at_loopback_node_port() {
    let m = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}],
        "service": {"type": "NodePort", "nodePort": 30500}
    }));
    let (v, objs) = build(&m);
    let svc = objs.unwrap().service;
    let spec = svc.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(spec.ports.as_ref().unwrap()[0].node_port, Some(30500));
    assert_eq!(
        node_endpoint(&v, Some(&svc)).as_deref(),
        Some("http://127.0.0.1:30500")
    );

    // An allocated port is read back from the applied Service.
    let m = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}], "service": {"type": "NodePort"}
    }));
    let v = validate(&m).unwrap();
    let applied = service_with_ip("10.96.0.7", Some(31234));
    assert_eq!(
        node_endpoint(&v, Some(&applied)).as_deref(),
        Some("http://127.0.0.1:31234")
    );
}

#[test]
fn cluster_ip_endpoint_comes_from_the_applied_service_and_is_absent_until_allocated() {
    let m = mirror(serde_json::json!({"registries": [{"name": "docker.io"}]}));
    let v = validate(&m).unwrap();
    assert_eq!(
        node_endpoint(&v, Some(&service_with_ip("10.96.0.12", None))).as_deref(),
        Some("http://10.96.0.12:5000")
    );
    assert_eq!(
        node_endpoint(&v, Some(&service_with_ip("fd00::12", None))).as_deref(),
        Some("http://[fd00::12]:5000")
    );
    assert_eq!(node_endpoint(&v, Some(&Service::default())), None);
    let agent = build_agent(&m, &v, &cfg(), None, false).unwrap();
    assert!(
        agent.desired.registries.is_empty(),
        "without an endpoint nodes must not be pointed anywhere"
    );
}

#[test]
fn external_endpoint_deploys_no_proxy_and_nodes_use_the_url() {
    let m = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}],
        "service": {"type": "External", "externalUrl": "http://10.0.0.5:5000/"}
    }));
    let (v, objs) = build(&m);
    assert!(objs.is_none());
    let endpoint = node_endpoint(&v, None);
    assert_eq!(endpoint.as_deref(), Some("http://10.0.0.5:5000"));
    let agent = build_agent(&m, &v, &cfg(), endpoint.as_deref(), false).unwrap();
    assert_eq!(
        agent.desired.registries[0].endpoints,
        ["http://10.0.0.5:5000"]
    );
}

#[test]
fn three_replicas_get_a_pod_disruption_budget_keeping_one_available() {
    let m = mirror(serde_json::json!({"registries": [{"name": "docker.io"}], "replicas": 3}));
    let (_, objs) = build(&m);
    let objs = objs.unwrap();
    let Workload::Deployment(d) = &objs.workload else {
        panic!("expected a Deployment")
    };
    assert_eq!(d.spec.replicas, Some(3));
    let pdb = objs.pdb.unwrap();
    let spec = pdb.spec.unwrap();
    assert_eq!(spec.min_available, Some(IntOrString::Int(1)));
    assert_eq!(
        spec.selector.unwrap().match_labels,
        d.spec.selector.match_labels,
        "the PDB must select exactly the registry pods"
    );
}

#[test]
fn parent_mirror_is_rendered_as_the_registry_parent() {
    let m = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}, {"name": "quay.io"}],
        "parent": {"url": "http://hub.example.internal:5000/"}
    }));
    let (_, objs) = build(&m);
    let config = rendered_config(&objs.unwrap());
    assert_eq!(
        config.parent.as_ref().map(|p| p.url.as_str()),
        Some("http://hub.example.internal:5000")
    );
}

#[test]
fn a_spoke_names_itself_to_the_hub_by_its_spoke_id_or_namespace_and_name() {
    let named = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}],
        "parent": {"url": "http://hub.example.internal:5000", "spokeId": "cluster-b/cachalot/spoke"}
    }));
    let config = rendered_config(&build(&named).1.unwrap());
    assert_eq!(
        config.parent.and_then(|p| p.spoke_id).as_deref(),
        Some("cluster-b/cachalot/spoke")
    );
    let unnamed = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}],
        "parent": {"url": "http://hub.example.internal:5000"}
    }));
    let config = rendered_config(&build(&unnamed).1.unwrap());
    assert_eq!(
        config.parent.and_then(|p| p.spoke_id).as_deref(),
        Some("cachalot/hub")
    );
    // With the operator's `--cluster-name`, the default names the cluster too, so the same
    // manifest applied in two clusters gives two spokes.
    let in_cluster_b = BuildConfig {
        cluster_name: Some("cluster-b".into()),
        ..cfg()
    };
    let objs = build_registry(&unnamed, &validate(&unnamed).unwrap(), &in_cluster_b).unwrap();
    assert_eq!(
        rendered_config(&objs.unwrap())
            .parent
            .and_then(|p| p.spoke_id)
            .as_deref(),
        Some("cluster-b/cachalot/hub")
    );
    let bad = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}],
        "parent": {"url": "http://hub.example.internal:5000", "spokeId": "cluster b"}
    }));
    let err = validate(&bad).unwrap_err().to_string();
    assert!(err.contains("spec.parent.spokeId"), "{err}");
}

/// The registry pod's ConfigMap volumes other than its own config: volume name → (ConfigMap,
/// projected items as `key=path`, mount path, read-only).
fn ca_mounts(objs: &RegistryObjects) -> BTreeMap<String, (String, Vec<String>, String, bool)> {
    let pod = pod_spec(objs);
    let mounts = pod.containers[0].volume_mounts.as_ref().unwrap();
    pod.volumes
        .as_ref()
        .unwrap()
        .iter()
        .filter(|v| v.name != "config")
        .filter_map(|v| {
            let cm = v.config_map.as_ref()?;
            let items = cm
                .items
                .iter()
                .flatten()
                .map(|i| format!("{}={}", i.key, i.path))
                .collect();
            let mount = mounts.iter().find(|m| m.name == v.name).unwrap();
            Some((
                v.name.clone(),
                (
                    cm.name.clone(),
                    items,
                    mount.mount_path.clone(),
                    mount.read_only == Some(true),
                ),
            ))
        })
        .collect()
}

fn config_hash(objs: &RegistryObjects) -> String {
    let template = match &objs.workload {
        Workload::Deployment(d) => &d.spec.template,
        Workload::StatefulSet(s) => &s.spec.template,
    };
    template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()[CONFIG_HASH_ANNOTATION]
        .clone()
}

#[test]
fn a_registry_ca_config_map_key_is_mounted_read_only_and_named_as_its_ca_file() {
    let m = mirror(serde_json::json!({"registries": [
        {"name": "docker.io"},
        {"name": "registry.corp.example:5000", "url": "https://registry.corp.example:5000",
         "caConfigMap": {"name": "corp-ca"}},
        {"name": "ghcr.io", "caConfigMap": {"name": "gh-ca", "key": "bundle.pem"}}
    ]}));
    let (_, objs) = build(&m);
    let objs = objs.unwrap();
    let config = rendered_config(&objs);
    assert_eq!(config.registries["docker.io"].ca_file, None);
    assert_eq!(
        config.registries["registry.corp.example:5000"]
            .ca_file
            .as_deref()
            .and_then(|p| p.to_str()),
        Some("/etc/cachalot/ca/registry.corp.example_5000/ca.crt"),
        "the key defaults to ca.crt and `:` of the port becomes `_`"
    );
    assert_eq!(
        config.registries["ghcr.io"]
            .ca_file
            .as_deref()
            .and_then(|p| p.to_str()),
        Some("/etc/cachalot/ca/ghcr.io/bundle.pem")
    );
    assert!(config.parent.is_none());
    assert_eq!(
        ca_mounts(&objs),
        BTreeMap::from([
            (
                "ca-1".to_string(),
                (
                    "corp-ca".to_string(),
                    vec!["ca.crt=ca.crt".to_string()],
                    "/etc/cachalot/ca/registry.corp.example_5000".to_string(),
                    true
                )
            ),
            (
                "ca-2".to_string(),
                (
                    "gh-ca".to_string(),
                    vec!["bundle.pem=bundle.pem".to_string()],
                    "/etc/cachalot/ca/ghcr.io".to_string(),
                    true
                )
            ),
        ])
    );
    // A directory mount (no subPath), so the kubelet keeps the file current.
    let pod = pod_spec(&objs);
    assert!(pod.containers[0]
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .all(|m| m.sub_path.is_none()));
    // Nothing of the CA content or the ConfigMap names enters the registry config.
    let text = &objs.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    assert!(
        !text.contains("corp-ca") && !text.contains("gh-ca"),
        "{text}"
    );
}

#[test]
fn the_parent_ca_config_map_is_mounted_apart_from_registries_and_named_as_the_parent_ca_file() {
    let m = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}, {"name": "parent", "caConfigMap": {"name": "p-ca"}}],
        "parent": {"url": "https://hub.corp.example:30500",
                   "caConfigMap": {"name": "hub-ca", "key": "hub.pem"}}
    }));
    let (_, objs) = build(&m);
    let objs = objs.unwrap();
    let config = rendered_config(&objs);
    let parent = config.parent.as_ref().unwrap();
    assert_eq!(parent.url, "https://hub.corp.example:30500");
    assert_eq!(
        parent.ca_file.as_deref().and_then(|p| p.to_str()),
        Some("/etc/cachalot/parent-ca/hub.pem")
    );
    assert!(!parent.insecure_skip_verify);
    let mounts = ca_mounts(&objs);
    assert_eq!(
        mounts["parent-ca"],
        (
            "hub-ca".to_string(),
            vec!["hub.pem=hub.pem".to_string()],
            "/etc/cachalot/parent-ca".to_string(),
            true
        )
    );
    // A registry may be called `parent`: its CA directory does not collide with the hub's.
    assert_eq!(mounts["ca-1"].2, "/etc/cachalot/ca/parent");
    let paths: std::collections::BTreeSet<&str> = pod_spec(&objs).containers[0]
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(
        paths.len(),
        pod_spec(&objs).containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .len(),
        "mount paths are unique"
    );
}

#[test]
fn changing_a_ca_config_map_reference_rolls_the_pods_and_building_it_twice_does_not() {
    let with_ca = |ca: serde_json::Value| {
        let (_, objs) = build(&mirror(serde_json::json!({"registries": [
            {"name": "docker.io"},
            {"name": "registry.corp.example", "caConfigMap": ca}
        ]})));
        objs.unwrap()
    };
    let without = {
        let (_, objs) = build(&mirror(serde_json::json!({"registries": [
            {"name": "docker.io"}, {"name": "registry.corp.example"}
        ]})));
        objs.unwrap()
    };
    let a = with_ca(serde_json::json!({"name": "corp-ca"}));
    assert_eq!(a, with_ca(serde_json::json!({"name": "corp-ca"})));
    // The key is spelled out or defaulted: the same object.
    assert_eq!(
        config_hash(&a),
        config_hash(&with_ca(
            serde_json::json!({"name": "corp-ca", "key": "ca.crt"})
        ))
    );
    let renamed = with_ca(serde_json::json!({"name": "corp-ca-2025"}));
    let other_key = with_ca(serde_json::json!({"name": "corp-ca", "key": "other.pem"}));
    let hashes = [
        config_hash(&without),
        config_hash(&a),
        config_hash(&renamed),
        config_hash(&other_key),
    ];
    let distinct: std::collections::BTreeSet<&String> = hashes.iter().collect();
    assert_eq!(distinct.len(), 4, "{hashes:?}");
    // A renamed ConfigMap leaves the registry config alone: only the reference moved the hash.
    assert_eq!(
        a.config_map.data.as_ref().unwrap()[CONFIG_KEY],
        renamed.config_map.data.as_ref().unwrap()[CONFIG_KEY]
    );
}

#[test]
fn mirrors_without_ca_config_maps_keep_their_config_hash() {
    // The CA references are appended to the hash input only when there are some, so an upgrade
    // rolls no existing registry pods. This is the hash of this spec before CA support.
    let (_, objs) = build(&mirror(
        serde_json::json!({"registries": [{"name": "docker.io"}]}),
    ));
    let objs = objs.unwrap();
    let text = &objs.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    let mut input = text.clone().into_bytes();
    input.extend(IMAGE.as_bytes());
    let digest = <sha2::Sha256 as sha2::Digest>::digest(&input);
    assert_eq!(config_hash(&objs), hex::encode(&digest[..8]));
}

#[test]
fn agent_daemonset_has_no_api_access_and_mounts_only_node_paths_it_needs() {
    let m = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}],
        "nodes": {"nodeSelector": {"pool": "builds"}, "fallback": "Never", "dialTimeout": "1s",
                  "tolerations": [{"operator": "Exists"}]}
    }));
    let v = validate(&m).unwrap();
    let agent = build_agent(&m, &v, &cfg(), Some("http://10.96.0.12:5000"), false).unwrap();
    let pod = agent.daemon_set.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "builds");
    assert_eq!(pod.tolerations.as_ref().unwrap().len(), 1);
    let host_paths: Vec<(&str, &str)> = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    assert_eq!(
        host_paths,
        [
            ("certs-d", "/etc/containerd/certs.d"),
            ("containerd-config", "/etc/containerd")
        ]
    );
    let c = &pod.containers[0];
    let mounts: BTreeMap<&str, bool> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.name.as_str(), m.read_only == Some(true)))
        .collect();
    assert!(
        mounts["containerd-config"],
        "containerd config must be mounted read-only"
    );
    assert!(!mounts["certs-d"]);
    let args = c.args.as_ref().unwrap().join(" ");
    assert!(args.starts_with("node-agent --desired-file /etc/cachalot/agent/desired.json"));
    assert!(args.contains("--certs-dir /host/certs.d"));
    assert!(args.contains("--containerd-config /host/containerd/config.toml"));
    assert!(args.contains("--listen 0.0.0.0:9464"));
    assert!(args.contains("--host-certs-dir /etc/containerd/certs.d"));
    let desired: DesiredState =
        serde_json::from_str(&agent.config_map.data.as_ref().unwrap()[DESIRED_KEY]).unwrap();
    assert_eq!(desired, agent.desired);
    assert_eq!(desired.mirror, "cachalot/hub");
    assert!(!desired.removing);
    let r = &desired.registries[0];
    assert_eq!(r.registry, "docker.io");
    assert_eq!(r.endpoints, ["http://10.96.0.12:5000"]);
    assert_eq!(r.fallback, Fallback::Never);
    assert_eq!(r.dial_timeout, "1s");
}

#[test]
fn registry_and_agent_containers_put_their_last_log_lines_in_the_termination_message() {
    for spec in [
        serde_json::json!({"registries": [{"name": "docker.io"}]}),
        serde_json::json!({"registries": [{"name": "docker.io"}],
                           "storage": {"type": "PersistentVolumeClaim", "size": "10Gi"}}),
    ] {
        let m = mirror(spec);
        let (v, objs) = build(&m);
        let pod = pod_spec(objs.as_ref().unwrap());
        assert_eq!(
            pod.containers[0].termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        let agent = build_agent(&m, &v, &cfg(), None, false).unwrap();
        let agent_pod = agent.daemon_set.spec.template.spec.unwrap();
        assert_eq!(
            agent_pod.containers[0]
                .termination_message_policy
                .as_deref(),
            Some("FallbackToLogsOnError")
        );
    }
}

#[test]
fn building_twice_is_identical_and_a_config_change_rolls_the_pods() {
    let m = mirror(serde_json::json!({"registries": [{"name": "docker.io"}]}));
    let (_, a) = build(&m);
    let (_, b) = build(&m);
    assert_eq!(a, b);
    let m2 = mirror(serde_json::json!({"registries": [{"name": "docker.io", "budgetReserve": 5}]}));
    let (_, c) = build(&m2);
    let hash = |o: &Option<RegistryObjects>| {
        let o = o.as_ref().unwrap();
        let Workload::Deployment(d) = &o.workload else {
            panic!()
        };
        d.spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[CONFIG_HASH_ANNOTATION]
            .clone()
    };
    assert_eq!(hash(&a), hash(&b));
    assert_ne!(hash(&a), hash(&c));
}

#[test]
fn desired_generation_changes_with_content_and_removal() {
    let m = mirror(serde_json::json!({"registries": [{"name": "docker.io"}]}));
    let v = validate(&m).unwrap();
    let g = |endpoint: Option<&str>, removing| {
        build_agent(&m, &v, &cfg(), endpoint, removing)
            .unwrap()
            .desired
            .generation
    };
    assert_eq!(
        g(Some("http://10.0.0.1:5000"), false),
        g(Some("http://10.0.0.1:5000"), false)
    );
    assert_ne!(
        g(Some("http://10.0.0.1:5000"), false),
        g(Some("http://10.0.0.2:5000"), false)
    );
    assert_ne!(g(Some("http://10.0.0.1:5000"), false), g(None, true));
}

fn invalid(spec: serde_json::Value) -> String {
    match validate(&mirror(spec)) {
        Err(ValidateError::InvalidField { field, .. }) => field,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

#[test]
fn invalid_specs_are_refused_naming_the_field() {
    use serde_json::json;
    assert_eq!(invalid(json!({"registries": []})), "spec.registries");
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}, {"name": "docker.io"}]})),
        "spec.registries[1].name"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "../etc"}]})),
        "spec.registries[0].name"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io", "url": "ftp://x"}]})),
        "spec.registries[0].url"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}], "defaultRegistry": "quay.io"})),
        "spec.defaultRegistry"
    );
    assert_eq!(
        invalid(
            json!({"registries": [{"name": "docker.io"}], "storage": {"type": "PersistentVolumeClaim"}})
        ),
        "spec.storage.size"
    );
    assert_eq!(
        invalid(
            json!({"registries": [{"name": "docker.io"}], "storage": {"size": "1Gi", "maxSize": "2Gi"}})
        ),
        "spec.storage.maxSize"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}], "service": {"type": "External"}})),
        "spec.service.externalUrl"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}], "service": {"nodePort": 30001}})),
        "spec.service.nodePort"
    );
    assert_eq!(
        invalid(
            json!({"registries": [{"name": "docker.io", "freshness": [{"pattern": "latest"}]}]})
        ),
        "spec.registries[0].freshness[0]"
    );
    assert_eq!(
        invalid(
            json!({"registries": [{"name": "docker.io"}], "nodes": {"certsDir": "/etc/../root"}})
        ),
        "spec.nodes.certsDir"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}], "nodes": {"dialTimeout": "soon"}})),
        "spec.nodes.dialTimeout"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}], "replicas": 0})),
        "spec.replicas"
    );
}

#[test]
fn malformed_ca_config_map_references_are_refused_naming_the_field() {
    use serde_json::json;
    for (ca, field) in [
        (json!({"name": "Corp_CA"}), "name"),
        (json!({"name": "-corp"}), "name"),
        (json!({"name": ""}), "name"),
        (json!({"name": "corp-ca", "key": "ca/crt"}), "key"),
        (json!({"name": "corp-ca", "key": ".."}), "key"),
        (json!({"name": "corp-ca", "key": "..data"}), "key"),
        (json!({"name": "corp-ca", "key": ""}), "key"),
    ] {
        assert_eq!(
            invalid(
                json!({"registries": [{"name": "docker.io"}, {"name": "quay.io", "caConfigMap": ca}]})
            ),
            format!("spec.registries[1].caConfigMap.{field}"),
            "{ca}"
        );
        assert_eq!(
            invalid(json!({"registries": [{"name": "docker.io"}],
                           "parent": {"url": "https://hub.example:5000", "caConfigMap": ca}})),
            format!("spec.parent.caConfigMap.{field}"),
            "{ca}"
        );
    }
    let message = validate(&mirror(json!({"registries": [
        {"name": "docker.io", "caConfigMap": {"name": "corp-ca", "key": "a b"}}
    ]})))
    .unwrap_err()
    .to_string();
    assert!(
        message
            .starts_with("spec.registries[0].caConfigMap.key: `a b` is not a valid ConfigMap key"),
        "{message}"
    );
}

#[test]
fn every_secret_reference_is_refused_naming_its_field_and_what_is_wrong() {
    use serde_json::json;
    let docker_io = json!([{"name": "docker.io"}]);
    let tls = |tls: serde_json::Value| json!({"registries": docker_io, "service": {"type": "NodePort"}, "tls": tls});
    let parent = |parent: serde_json::Value| json!({"registries": docker_io, "parent": parent});
    let bad_name = "`Bad_Name` is not a valid Secret name";
    let bad_key = "`a b` is not a valid Secret key";
    for (spec, expected) in [
        (
            tls(json!({"secretName": "Bad_Name"})),
            format!("spec.tls.secretName: {bad_name}"),
        ),
        (
            tls(json!({"secretName": "t",
                       "clientAuth": {"bearerTokenSecret": {"name": "Bad_Name", "key": "k"}}})),
            format!("spec.tls.clientAuth.bearerTokenSecret.name: {bad_name}"),
        ),
        (
            tls(json!({"secretName": "t",
                       "clientAuth": {"bearerTokenSecret": {"name": "tokens", "key": "a b"}}})),
            format!("spec.tls.clientAuth.bearerTokenSecret.key: {bad_key}"),
        ),
        (
            tls(json!({"secretName": "t",
                       "clientAuth": {"caSecretKey": "ca.crt",
                                      "nodeClientCertSecret": {"name": "Bad_Name"}}})),
            format!("spec.tls.clientAuth.nodeClientCertSecret.name: {bad_name}"),
        ),
        (
            parent(json!({"url": "https://hub.example:5000",
                          "tls": {"clientCertSecret": {"name": "Bad_Name"}}})),
            format!("spec.parent.tls.clientCertSecret.name: {bad_name}"),
        ),
        (
            parent(json!({"url": "https://hub.example:5000",
                          "auth": {"bearerTokenSecret": {"name": "Bad_Name", "key": "k"}}})),
            format!("spec.parent.auth.bearerTokenSecret.name: {bad_name}"),
        ),
        (
            parent(json!({"url": "https://hub.example:5000",
                          "auth": {"bearerTokenSecret": {"name": "tokens", "key": "a b"}}})),
            format!("spec.parent.auth.bearerTokenSecret.key: {bad_key}"),
        ),
        (
            json!({"registries": [{"name": "docker.io", "credentialsSecret": {"name": "Bad_Name"}}]}),
            format!("spec.registries[0].credentialsSecret.name: {bad_name}"),
        ),
        (
            json!({"registries": docker_io,
                   "storage": {"type": "S3",
                               "s3": {"bucket": "cachalot",
                                      "credentialsSecretRef": {"name": "Bad_Name"}}}}),
            format!("spec.storage.s3.credentialsSecretRef.name: {bad_name}"),
        ),
    ] {
        let message = validate(&mirror(spec.clone())).unwrap_err().to_string();
        assert!(message.starts_with(&expected), "{spec}: {message}");
    }
}

#[test]
fn pins_are_rendered_into_the_registry_config_per_registry() {
    let m = mirror(serde_json::json!({"registries": [
        {"name": "docker.io", "pin": ["nginx:stable", "library/redis:*", "myteam/*"]},
        {"name": "ghcr.io"}
    ]}));
    let (v, objs) = build(&m);
    assert_eq!(v.registries[0].pin.len(), 3);
    let config = rendered_config(&objs.unwrap());
    assert_eq!(
        config.registries["docker.io"].pin,
        ["nginx:stable", "library/redis:*", "myteam/*"]
    );
    assert!(config.registries["ghcr.io"].pin.is_empty());
    // The registry compiles them: `nginx` on docker.io means `library/nginx`.
    let pins = cachalot_registry::store::PinRules::from_config(&config).unwrap();
    assert!(pins.is_pinned("docker.io", "library/nginx", "stable"));
    assert!(pins.is_pinned("docker.io", "myteam/api", "v2"));
    assert!(!pins.is_pinned("ghcr.io", "myteam/api", "v2"));
}

#[test]
fn malformed_pins_are_refused_naming_the_field() {
    for bad in ["Nginx:stable", "nginx:", "/abs", "a//b", "nginx@sha256:00"] {
        assert_eq!(
            invalid(serde_json::json!({"registries": [{"name": "docker.io", "pin": ["ok", bad]}]})),
            "spec.registries[0].pin[1]",
            "{bad}"
        );
    }
}

/// A three-replica mirror on an AWS bucket with a credentials Secret.
fn s3_mirror() -> RegistryMirror {
    mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}],
        "replicas": 3,
        "storage": {"type": "S3", "maxSize": "200Gi", "s3": {
            "bucket": "cachalot-cache", "region": "eu-central-1",
            "credentialsSecretRef": {"name": "s3-creds"}, "localCacheSize": "4Gi"
        }}
    }))
}

/// The rendered config as one replica loads it: `cluster.self` comes from the pod's
/// environment, so it is set here the way `--cluster-self` would.
fn rendered_config_as(objs: &RegistryObjects, self_url: &str) -> RegistryConfig {
    let text = &objs.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    let mut config: RegistryConfig = serde_yaml::from_str(text).unwrap();
    config.cluster.as_mut().unwrap().self_url = self_url.to_string();
    config.normalise();
    config.validate().unwrap();
    config
}

fn env_of(pod: &PodSpec) -> Vec<(String, String)> {
    pod.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| {
            let value = e.value.clone().unwrap_or_else(|| {
                let field = e.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
                format!("fieldRef:{}", field.field_path)
            });
            (e.name.clone(), value)
        })
        .collect()
}

#[test]
fn s3_storage_runs_a_stateful_set_behind_a_headless_peers_service_with_its_own_url_in_the_env() {
    let (_, objs) = build(&s3_mirror());
    let objs = objs.unwrap();
    let Workload::StatefulSet(s) = &objs.workload else {
        panic!("expected a StatefulSet")
    };
    assert_eq!(s.metadata.name.as_deref(), Some("cachalot-hub"));
    assert_eq!(s.spec.replicas, Some(3));
    assert_eq!(s.spec.service_name.as_deref(), Some("cachalot-hub-peers"));
    assert!(
        s.spec.volume_claim_templates.is_none(),
        "the bucket is the store; no claims"
    );
    let pod = s.spec.template.spec.as_ref().unwrap();
    assert_eq!(
        env_of(pod),
        [
            ("POD_NAME".to_string(), "fieldRef:metadata.name".to_string()),
            (
                "CACHALOT_CLUSTER_SELF".to_string(),
                "http://$(POD_NAME).cachalot-hub-peers.cachalot.svc:5000".to_string()
            ),
        ]
    );
    let cache = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "cache")
        .unwrap();
    assert_eq!(
        cache
            .empty_dir
            .as_ref()
            .unwrap()
            .size_limit
            .as_ref()
            .unwrap()
            .0,
        "4Gi",
        "the local read cache is an emptyDir limited to localCacheSize"
    );
    let secret = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "s3-credentials")
        .unwrap();
    assert_eq!(
        secret.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("s3-creds")
    );
    let mount = pod.containers[0]
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "s3-credentials")
        .unwrap();
    assert_eq!(mount.mount_path, "/etc/cachalot/s3");
    assert_eq!(mount.read_only, Some(true));
    let writable: Vec<&str> = pod.containers[0]
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .filter(|m| m.read_only != Some(true))
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(writable, ["/tmp", "/var/lib/cachalot"]);

    let peers = objs.peers_service.as_ref().expect("a peers Service");
    assert_eq!(peers.metadata.name.as_deref(), Some("cachalot-hub-peers"));
    let spec = peers.spec.as_ref().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    assert_eq!(spec.ports.as_ref().unwrap()[0].port, 5000);
    assert_eq!(
        spec.selector, s.spec.selector.match_labels,
        "the peers Service selects the StatefulSet's pods"
    );
    assert_eq!(
        peers.metadata.owner_references.as_ref().unwrap()[0].uid,
        "uid-1"
    );
    // The nodes' Service and the PDB stay as they are.
    assert_eq!(
        objs.service.spec.as_ref().unwrap().type_.as_deref(),
        Some("ClusterIP")
    );
    assert!(objs.pdb.is_some(), "3 replicas keep their PDB");
}

#[test]
fn s3_config_names_bucket_prefix_owner_key_files_and_every_replica_as_a_peer() {
    let (_, objs) = build(&s3_mirror());
    let objs = objs.unwrap();
    let text = &objs.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    assert!(
        !text.contains("self:"),
        "one ConfigMap serves every replica; each sets its own URL:\n{text}"
    );
    let me = "http://cachalot-hub-1.cachalot-hub-peers.cachalot.svc:5000";
    let config = rendered_config_as(&objs, me);
    let s3 = config.storage.s3.as_ref().unwrap();
    assert_eq!(s3.endpoint, None, "AWS S3");
    assert_eq!(s3.bucket, "cachalot-cache");
    assert_eq!(s3.region.as_deref(), Some("eu-central-1"));
    assert_eq!(s3.prefix, "cachalot/hub/", "default prefix: namespace/name");
    assert_eq!(s3.owner, "cachalot/hub");
    assert_eq!(
        s3.access_key_id_file.as_deref(),
        Some(std::path::Path::new("/etc/cachalot/s3/access-key-id"))
    );
    assert_eq!(
        s3.secret_access_key_file.as_deref(),
        Some(std::path::Path::new("/etc/cachalot/s3/secret-access-key"))
    );
    assert_eq!(
        s3.local_cache_max_size_bytes,
        Some(2 << 30),
        "half of the 4Gi emptyDir"
    );
    assert_eq!(
        config.storage.max_size_bytes,
        Some(200 << 30),
        "maxSize bounds the bucket prefix"
    );
    assert_eq!(
        config.storage.path,
        std::path::Path::new("/var/lib/cachalot")
    );
    let cluster = config.cluster.as_ref().unwrap();
    assert_eq!(cluster.self_url, me);
    assert_eq!(
        cluster.peers,
        [
            "http://cachalot-hub-0.cachalot-hub-peers.cachalot.svc:5000",
            "http://cachalot-hub-1.cachalot-hub-peers.cachalot.svc:5000",
            "http://cachalot-hub-2.cachalot-hub-peers.cachalot.svc:5000",
        ]
    );
    assert_eq!(cluster.peer_timeout, std::time::Duration::from_secs(2));
    assert!(
        !text.contains("REPLACE") && !text.contains("secretAccessKey:"),
        "only file paths, never keys:\n{text}"
    );
}

#[test]
fn s3_defaults_and_a_self_hosted_endpoint_with_ambient_credentials() {
    let m = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}],
        "storage": {"type": "S3", "s3": {
            "endpoint": "http://garage.storage.svc:3900/", "bucket": "cachalot",
            "region": "garage", "prefix": "mirrors/hub"
        }}
    }));
    let (v, objs) = build(&m);
    let objs = objs.unwrap();
    assert_eq!(v.max_size_bytes, 100 << 30, "maxSize defaults to 100Gi");
    let config = rendered_config_as(
        &objs,
        "http://cachalot-hub-0.cachalot-hub-peers.cachalot.svc:5000",
    );
    let s3 = config.storage.s3.as_ref().unwrap();
    assert_eq!(
        s3.endpoint.as_deref(),
        Some("http://garage.storage.svc:3900")
    );
    assert_eq!(s3.region.as_deref(), Some("garage"));
    assert_eq!(s3.prefix, "mirrors/hub/");
    assert_eq!(s3.access_key_id_file, None, "ambient credentials");
    assert_eq!(s3.secret_access_key_file, None);
    assert_eq!(s3.local_cache_max_size_bytes, Some(5 << 30), "half of 10Gi");
    assert_eq!(
        config.cluster.as_ref().unwrap().peers,
        ["http://cachalot-hub-0.cachalot-hub-peers.cachalot.svc:5000"],
        "one replica is its own only peer"
    );
    let Workload::StatefulSet(s) = &objs.workload else {
        panic!("S3 storage runs a StatefulSet even with one replica")
    };
    let pod = s.spec.template.spec.as_ref().unwrap();
    let volumes = pod.volumes.as_ref().unwrap();
    assert!(
        volumes.iter().all(|v| v.secret.is_none()),
        "no Secret named"
    );
    let cache = volumes.iter().find(|v| v.name == "cache").unwrap();
    assert_eq!(
        cache
            .empty_dir
            .as_ref()
            .unwrap()
            .size_limit
            .as_ref()
            .unwrap()
            .0,
        "10Gi"
    );
    assert!(objs.pdb.is_none());
    assert!(objs.peers_service.is_some());
}

#[test]
fn pod_local_storage_has_no_peers_service_and_no_cluster() {
    for storage in [
        serde_json::json!({"type": "EmptyDir"}),
        serde_json::json!({"type": "PersistentVolumeClaim", "size": "10Gi"}),
    ] {
        let m = mirror(serde_json::json!({
            "registries": [{"name": "docker.io"}], "replicas": 2, "storage": storage
        }));
        let (_, objs) = build(&m);
        let objs = objs.unwrap();
        assert!(objs.peers_service.is_none());
        let config = rendered_config(&objs);
        assert!(config.cluster.is_none() && config.storage.s3.is_none());
        assert!(pod_spec(&objs).containers[0].env.is_none());
    }
}

#[test]
fn changing_the_s3_credentials_secret_rolls_the_pods_and_mirrors_without_one_keep_their_hash() {
    let with = |name: &str| {
        let mut m = s3_mirror();
        m.spec
            .storage
            .s3
            .as_mut()
            .unwrap()
            .credentials_secret_ref
            .as_mut()
            .unwrap()
            .name = name.to_string();
        build(&m).1.unwrap()
    };
    assert_ne!(config_hash(&with("a")), config_hash(&with("b")));
    assert_eq!(config_hash(&with("a")), config_hash(&with("a")));
}

#[test]
fn switching_between_pvc_and_s3_storage_replaces_the_stateful_set_and_a_resize_does_not() {
    use cachalot_operator::controller::build::stateful_set_needs_replacement;
    let stateful_set = |storage: serde_json::Value| {
        let m =
            mirror(serde_json::json!({"registries": [{"name": "docker.io"}], "storage": storage}));
        match build(&m).1.unwrap().workload {
            Workload::StatefulSet(s) => *s,
            Workload::Deployment(_) => panic!("expected a StatefulSet"),
        }
    };
    let pvc = stateful_set(serde_json::json!({"type": "PersistentVolumeClaim", "size": "10Gi"}));
    let bigger = stateful_set(serde_json::json!({"type": "PersistentVolumeClaim", "size": "20Gi"}));
    let s3 = stateful_set(serde_json::json!({"type": "S3", "s3": {"bucket": "cachalot"}}));
    assert!(stateful_set_needs_replacement(&pvc, &s3));
    assert!(stateful_set_needs_replacement(&s3, &pvc));
    assert!(!stateful_set_needs_replacement(&pvc, &bigger));
    assert!(!stateful_set_needs_replacement(&s3, &s3));
}

#[test]
fn invalid_s3_storage_is_refused_naming_the_field() {
    use serde_json::json;
    let s3 = |storage: serde_json::Value| {
        invalid(json!({"registries": [{"name": "docker.io"}], "storage": storage}))
    };
    assert_eq!(s3(json!({"type": "S3"})), "spec.storage.s3");
    assert_eq!(
        s3(json!({"type": "EmptyDir", "s3": {"bucket": "cachalot"}})),
        "spec.storage.s3"
    );
    assert_eq!(
        s3(json!({"type": "S3", "size": "10Gi", "s3": {"bucket": "cachalot"}})),
        "spec.storage.size"
    );
    assert_eq!(
        s3(json!({"type": "S3", "storageClassName": "fast", "s3": {"bucket": "cachalot"}})),
        "spec.storage.storageClassName"
    );
    assert_eq!(
        s3(json!({"type": "S3", "s3": {"bucket": "Not_A_Bucket"}})),
        "spec.storage.s3.bucket"
    );
    assert_eq!(
        s3(json!({"type": "S3", "s3": {"bucket": "cachalot", "endpoint": "garage:3900"}})),
        "spec.storage.s3.endpoint"
    );
    assert_eq!(
        s3(json!({"type": "S3", "s3": {"bucket": "cachalot", "region": "eu central"}})),
        "spec.storage.s3.region"
    );
    for prefix in ["/abs", "a/../b", "a//b", ".hidden"] {
        assert_eq!(
            s3(json!({"type": "S3", "s3": {"bucket": "cachalot", "prefix": prefix}})),
            "spec.storage.s3.prefix",
            "{prefix}"
        );
    }
    assert_eq!(
        s3(json!({"type": "S3", "s3": {"bucket": "cachalot",
                  "credentialsSecretRef": {"name": "Bad_Name"}}})),
        "spec.storage.s3.credentialsSecretRef.name"
    );
    assert_eq!(
        s3(json!({"type": "S3", "s3": {"bucket": "cachalot", "localCacheSize": "10Mi"}})),
        "spec.storage.s3.localCacheSize"
    );
    assert_eq!(
        s3(json!({"type": "S3", "maxSize": "0", "s3": {"bucket": "cachalot"}})),
        "spec.storage.maxSize"
    );
}

#[test]
fn docker_nodes_get_daemon_json_and_dockerds_pid_file_and_the_agent_host_pid() {
    let m = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}],
        "nodes": {"runtime": "Docker"}
    }));
    let (v, _) = build(&m);
    let agent = build_agent(&m, &v, &cfg(), Some("http://10.96.0.12:5000"), false).unwrap();
    let pod = agent.daemon_set.spec.template.spec.unwrap();
    assert_eq!(pod.host_pid, Some(true));
    let container = &pod.containers[0];
    let args = container.args.as_ref().unwrap().join(" ");
    for want in [
        "--docker-config /host/docker/daemon.json",
        "--host-docker-config /etc/docker/daemon.json",
        "--docker-pid-file /host/runtime.pid",
    ] {
        assert!(args.contains(want), "{want} in {args}");
    }
    let volumes = pod.volumes.unwrap();
    let host = |name: &str| {
        let v = volumes.iter().find(|v| v.name == name).unwrap();
        let h = v.host_path.as_ref().unwrap();
        (h.path.clone(), h.type_.clone().unwrap_or_default())
    };
    assert_eq!(
        host("docker-config"),
        ("/etc/docker".into(), "DirectoryOrCreate".into())
    );
    assert_eq!(
        host("runtime-pid"),
        ("/var/run/docker.pid".into(), "File".into())
    );
    let pid_mount = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "runtime-pid")
        .unwrap();
    assert_eq!(pid_mount.read_only, Some(true));
    let desired: DesiredState =
        serde_json::from_str(&agent.config_map.data.unwrap()[DESIRED_KEY]).unwrap();
    assert_eq!(
        desired.runtime,
        cachalot_operator::node_agent::protocol::Runtime::Docker
    );
}

#[test]
fn containerd_nodes_never_get_host_pid_and_crio_only_with_a_pid_file() {
    let agent_pod = |nodes: serde_json::Value| {
        let m = mirror(serde_json::json!({"registries": [{"name": "docker.io"}], "nodes": nodes}));
        let (v, _) = build(&m);
        let agent = build_agent(&m, &v, &cfg(), Some("http://10.96.0.12:5000"), false).unwrap();
        agent.daemon_set.spec.template.spec.unwrap()
    };
    assert_eq!(agent_pod(serde_json::json!({})).host_pid, None);
    assert_eq!(
        agent_pod(serde_json::json!({"runtimePidFile": "/var/run/docker.pid"})).host_pid,
        None,
        "containerd reads hosts.toml on every pull: nothing to signal"
    );
    assert_eq!(
        agent_pod(serde_json::json!({"runtime": "Crio"})).host_pid,
        None
    );
    let crio =
        agent_pod(serde_json::json!({"runtime": "Crio", "runtimePidFile": "/run/crio/crio.pid"}));
    assert_eq!(crio.host_pid, Some(true));
    let args = crio.containers[0].args.as_ref().unwrap().join(" ");
    assert!(args.contains("--crio-pid-file /host/runtime.pid"), "{args}");
}

#[test]
fn docker_nodes_mirror_docker_hub_only() {
    let m = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}, {"name": "ghcr.io"}],
        "nodes": {"runtime": "Docker"}
    }));
    let err = validate(&m).unwrap_err().to_string();
    assert!(
        err.contains("spec.nodes.runtime") && err.contains("ghcr.io"),
        "{err}"
    );
}

#[test]
fn the_admin_port_serves_probes_and_metrics_on_the_pods_but_is_on_no_service() {
    let specs = [
        serde_json::json!({"registries": [{"name": "docker.io"}]}),
        serde_json::json!({"registries": [{"name": "docker.io"}],
                           "service": {"type": "NodePort", "nodePort": 30500}}),
        serde_json::json!({"registries": [{"name": "docker.io"}], "service": {"type": "NodePort"},
                           "replicas": 2,
                           "storage": {"type": "PersistentVolumeClaim", "size": "10Gi"}}),
        serde_json::json!({"registries": [{"name": "docker.io"}], "replicas": 3,
                           "service": {"type": "NodePort", "nodePort": 30501},
                           "storage": {"type": "S3", "maxSize": "200Gi",
                                       "s3": {"bucket": "cachalot-cache",
                                              "credentialsSecretRef": {"name": "s"}}}}),
    ];
    for spec in specs {
        let m = mirror(spec.clone());
        let (v, objs) = build(&m);
        let objs = objs.unwrap();
        // The registry is told both addresses; peers keep the public port.
        let config = if objs.peers_service.is_some() {
            let config = rendered_config_as(
                &objs,
                "http://cachalot-hub-0.cachalot-hub-peers.cachalot.svc:5000",
            );
            assert!(
                config
                    .cluster
                    .as_ref()
                    .unwrap()
                    .peers
                    .iter()
                    .all(|p| p.ends_with(":5000")),
                "{spec}"
            );
            config
        } else {
            rendered_config(&objs)
        };
        assert_eq!(config.listen, "0.0.0.0:5000".parse().unwrap(), "{spec}");
        assert_eq!(
            config.admin_listen,
            "0.0.0.0:5001".parse().unwrap(),
            "{spec}"
        );

        // The container has both ports, named; both probes use the admin one.
        let c = &pod_spec(&objs).containers[0];
        let ports: Vec<(&str, i32)> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref().unwrap(), p.container_port))
            .collect();
        assert_eq!(ports, [("http", 5000), ("admin", 5001)], "{spec}");
        for probe in [&c.readiness_probe, &c.liveness_probe] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.port, IntOrString::String("admin".into()), "{spec}");
        }

        // No Service, whatever its type, reaches the admin port.
        let services: Vec<&Service> = std::iter::once(&objs.service)
            .chain(objs.peers_service.as_ref())
            .collect();
        for svc in services {
            let ports = svc.spec.as_ref().unwrap().ports.as_ref().unwrap();
            assert_eq!(ports.len(), 1, "{spec}");
            assert_eq!(ports[0].port, 5000, "{spec}");
            assert_eq!(
                ports[0].target_port,
                Some(IntOrString::String("http".into())),
                "{spec}"
            );
        }
        // Nodes are pointed at the public port (a node port routes to `http`).
        let applied = service_with_ip("10.96.0.9", Some(31000));
        let endpoint = node_endpoint(&v, Some(&applied)).unwrap();
        assert!(
            endpoint == "http://10.96.0.9:5000" || endpoint.starts_with("http://127.0.0.1:3"),
            "{spec}: {endpoint}"
        );
    }
}

/// A TLS hub: its certificate Secret with a client CA key and a client token, NodePort so
/// spokes in other clusters reach it.
fn tls_hub() -> RegistryMirror {
    mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}],
        "replicas": 2,
        "service": {"type": "NodePort", "nodePort": 30500},
        "tls": {"secretName": "hub-tls",
                "clientAuth": {"caSecretKey": "ca.crt",
                               "bearerTokenSecret": {"name": "spoke-tokens", "key": "token"}}}
    }))
}

/// Secret volumes of a pod: volume name → (Secret, items `key=path`, optional, mount path,
/// read-only).
fn secret_mounts(pod: &PodSpec) -> BTreeMap<String, (String, Vec<String>, bool, String, bool)> {
    let mounts = pod.containers[0].volume_mounts.as_ref().unwrap();
    pod.volumes
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|v| {
            let secret = v.secret.as_ref()?;
            let items = secret
                .items
                .iter()
                .flatten()
                .map(|i| format!("{}={}", i.key, i.path))
                .collect();
            let mount = mounts.iter().find(|m| m.name == v.name).unwrap();
            Some((
                v.name.clone(),
                (
                    secret.secret_name.clone().unwrap(),
                    items,
                    secret.optional == Some(true),
                    mount.mount_path.clone(),
                    mount.read_only == Some(true),
                ),
            ))
        })
        .collect()
}

#[test]
fn a_tls_mirror_mounts_only_the_keys_it_reads_and_names_them_in_the_registry_config() {
    let m = tls_hub();
    let (_, objs) = build(&m);
    let objs = objs.unwrap();
    let config = rendered_config(&objs);
    let tls = config.tls.as_ref().unwrap();
    assert_eq!(tls.cert_file.to_str(), Some("/etc/cachalot/tls/tls.crt"));
    assert_eq!(tls.key_file.to_str(), Some("/etc/cachalot/tls/tls.key"));
    assert_eq!(
        tls.client_ca_file.as_deref().and_then(|p| p.to_str()),
        Some("/etc/cachalot/tls/ca.crt")
    );
    assert_eq!(
        config.auth.as_ref().unwrap().bearer_token_file.to_str(),
        Some("/etc/cachalot/client-auth/token")
    );
    assert!(
        config.cluster.is_none(),
        "pod-local storage has no peer ring"
    );

    let mounts = secret_mounts(pod_spec(&objs));
    assert_eq!(
        mounts,
        BTreeMap::from([
            (
                "tls".to_string(),
                (
                    "hub-tls".to_string(),
                    vec![
                        "tls.crt=tls.crt".to_string(),
                        "tls.key=tls.key".to_string(),
                        "ca.crt=ca.crt".to_string()
                    ],
                    false,
                    "/etc/cachalot/tls".to_string(),
                    true
                )
            ),
            (
                "client-token".to_string(),
                (
                    "spoke-tokens".to_string(),
                    vec!["token=token".to_string()],
                    false,
                    "/etc/cachalot/client-auth".to_string(),
                    true
                )
            ),
        ])
    );
    // Secret content never enters the ConfigMap: only paths.
    let text = &objs.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    assert!(
        !text.contains("hub-tls") && !text.contains("spoke-tokens"),
        "{text}"
    );

    // Without client authentication only the certificate and key are mounted.
    let plain = mirror(serde_json::json!({"registries": [{"name": "docker.io"}],
                                          "tls": {"secretName": "hub-tls"}}));
    let (_, objs) = build(&plain);
    let objs = objs.unwrap();
    let config = rendered_config(&objs);
    assert!(config.tls.as_ref().unwrap().client_ca_file.is_none());
    assert!(config.auth.is_none());
    let mounts = secret_mounts(pod_spec(&objs));
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts["tls"].1, ["tls.crt=tls.crt", "tls.key=tls.key"]);
}

#[test]
fn a_tls_mirror_is_reached_over_https_while_probes_stay_on_the_plain_admin_port() {
    let m = tls_hub();
    let (v, objs) = build(&m);
    let objs = objs.unwrap();
    let node_port = service_with_ip("10.96.0.9", Some(30500));
    assert_eq!(
        node_endpoint(&v, Some(&node_port)).as_deref(),
        Some("https://127.0.0.1:30500")
    );
    let cluster_ip = mirror(serde_json::json!({"registries": [{"name": "docker.io"}],
                                               "tls": {"secretName": "hub-tls"}}));
    let v_ip = validate(&cluster_ip).unwrap();
    assert_eq!(
        node_endpoint(&v_ip, Some(&service_with_ip("10.96.0.12", None))).as_deref(),
        Some("https://10.96.0.12:5000")
    );
    assert_eq!(
        node_endpoint(&v_ip, Some(&service_with_ip("fd00::12", None))).as_deref(),
        Some("https://[fd00::12]:5000")
    );
    let config = rendered_config(&objs);
    assert_eq!(config.admin_listen, "0.0.0.0:5001".parse().unwrap());
    let c = &pod_spec(&objs).containers[0];
    for probe in [&c.readiness_probe, &c.liveness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.port, IntOrString::String("admin".into()));
        assert_eq!(get.scheme, None, "the admin listener is plain HTTP");
    }
}

#[test]
fn the_agents_mount_only_the_optional_ca_of_the_tls_secret_and_are_told_where() {
    let m = tls_hub();
    let v = validate(&m).unwrap();
    let agent = build_agent(&m, &v, &cfg(), Some("https://127.0.0.1:30500"), false).unwrap();
    assert_eq!(
        agent.desired.mirror_ca_file.as_deref(),
        Some("/etc/cachalot/mirror-ca/ca.crt")
    );
    assert_eq!(
        agent.desired.registries[0].endpoints,
        ["https://127.0.0.1:30500"]
    );
    let pod = agent.daemon_set.spec.template.spec.as_ref().unwrap();
    let mounts = secret_mounts(pod);
    assert_eq!(
        mounts,
        BTreeMap::from([(
            "mirror-ca".to_string(),
            (
                "hub-tls".to_string(),
                vec!["ca.crt=ca.crt".to_string()],
                true,
                "/etc/cachalot/mirror-ca".to_string(),
                true
            )
        )]),
        "never tls.key, and a Secret without ca.crt must not keep the agents from starting"
    );
    let json = &agent.config_map.data.as_ref().unwrap()[DESIRED_KEY];
    assert!(json.contains("\"mirrorCaFile\""), "{json}");

    // Without TLS: no CA, and the desired state is serialised as before (same generation).
    let plain = mirror(serde_json::json!({"registries": [{"name": "docker.io"}]}));
    let v = validate(&plain).unwrap();
    let agent = build_agent(&plain, &v, &cfg(), Some("http://10.96.0.12:5000"), false).unwrap();
    assert!(agent.desired.mirror_ca_file.is_none());
    let json = &agent.config_map.data.as_ref().unwrap()[DESIRED_KEY];
    assert!(!json.contains("mirrorCaFile"), "{json}");
    let pod = agent.daemon_set.spec.template.spec.as_ref().unwrap();
    assert!(secret_mounts(pod).is_empty());
}

#[test]
fn a_node_client_certificate_is_mounted_into_the_agents_only_mode_0400_and_named_in_the_desired_state(
) {
    let m = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}],
        "service": {"type": "NodePort", "nodePort": 30500},
        "tls": {"secretName": "hub-tls",
                "clientAuth": {"caSecretKey": "ca.crt", "nodeClientCertSecret": {"name": "hub-nodes"}}}
    }));
    let (v, objs) = build(&m);
    let objs = objs.unwrap();
    // The registry pods never see the nodes' key.
    let registry_mounts = secret_mounts(pod_spec(&objs));
    assert!(
        registry_mounts.values().all(|m| m.0 != "hub-nodes"),
        "{registry_mounts:?}"
    );
    let agent = build_agent(&m, &v, &cfg(), Some("https://127.0.0.1:30500"), false).unwrap();
    let files = agent.desired.mirror_client_cert.as_ref().unwrap();
    assert_eq!(files.cert_file, "/etc/cachalot/node-client/tls.crt");
    assert_eq!(files.key_file, "/etc/cachalot/node-client/tls.key");
    let pod = agent.daemon_set.spec.template.spec.as_ref().unwrap();
    let mounts = secret_mounts(pod);
    assert_eq!(
        mounts["node-client"],
        (
            "hub-nodes".to_string(),
            vec!["tls.crt=tls.crt".to_string(), "tls.key=tls.key".to_string()],
            false,
            "/etc/cachalot/node-client".to_string(),
            true
        ),
        "required (the reference check waits for it) and read-only"
    );
    let volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "node-client")
        .unwrap();
    assert_eq!(volume.secret.as_ref().unwrap().default_mode, Some(0o400));
    let json = &agent.config_map.data.as_ref().unwrap()[DESIRED_KEY];
    assert!(json.contains("\"mirrorClientCert\""), "{json}");

    // Without the field: no mount, nothing in the desired state (the generation of existing
    // mirrors does not change).
    let (v, _) = build(&tls_hub());
    let agent = build_agent(
        &tls_hub(),
        &v,
        &cfg(),
        Some("https://127.0.0.1:30500"),
        false,
    )
    .unwrap();
    assert!(agent.desired.mirror_client_cert.is_none());
    let json = &agent.config_map.data.as_ref().unwrap()[DESIRED_KEY];
    assert!(!json.contains("mirrorClientCert"), "{json}");
    let pod = agent.daemon_set.spec.template.spec.as_ref().unwrap();
    assert!(!secret_mounts(pod).contains_key("node-client"));
}

#[test]
fn a_node_client_certificate_is_refused_without_mtls_or_with_a_token_saying_why() {
    use serde_json::json;
    let with_auth = |auth: serde_json::Value| {
        json!({"registries": [{"name": "docker.io"}],
               "tls": {"secretName": "hub-tls", "clientAuth": auth}})
    };
    assert_eq!(
        invalid(with_auth(
            json!({"bearerTokenSecret": {"name": "t", "key": "t"},
                                 "nodeClientCertSecret": {"name": "nodes"}})
        )),
        "spec.tls.clientAuth.nodeClientCertSecret"
    );
    assert_eq!(
        invalid(with_auth(json!({"caSecretKey": "ca.crt",
                                 "bearerTokenSecret": {"name": "t", "key": "t"},
                                 "nodeClientCertSecret": {"name": "nodes"}}))),
        "spec.tls.clientAuth.nodeClientCertSecret"
    );
    assert_eq!(
        invalid(with_auth(json!({"caSecretKey": "ca.crt",
                                 "nodeClientCertSecret": {"name": "Bad_Name"}}))),
        "spec.tls.clientAuth.nodeClientCertSecret.name"
    );
    let err = validate(&mirror(with_auth(json!({"caSecretKey": "ca.crt",
                                                "bearerTokenSecret": {"name": "t", "key": "t"},
                                                "nodeClientCertSecret": {"name": "nodes"}}))))
    .unwrap_err()
    .to_string();
    assert!(err.contains("hosts.toml"), "{err}");
    assert!(validate(&mirror(with_auth(json!({"caSecretKey": "ca.crt",
                                              "nodeClientCertSecret": {"name": "nodes"}}))))
    .is_ok());
}

#[test]
fn a_spoke_presents_its_client_certificate_and_token_to_an_https_parent() {
    let m = mirror(serde_json::json!({
        "registries": [{"name": "docker.io"}],
        "parent": {"url": "https://hub.example:30500", "caConfigMap": {"name": "hub-ca"},
                   "tls": {"clientCertSecret": {"name": "spoke-client"}},
                   "auth": {"bearerTokenSecret": {"name": "hub-token", "key": "token"}}}
    }));
    let (_, objs) = build(&m);
    let objs = objs.unwrap();
    let config = rendered_config(&objs);
    let parent = config.parent.as_ref().unwrap();
    let path =
        |p: &Option<std::path::PathBuf>| p.as_deref().and_then(|p| p.to_str()).map(str::to_string);
    assert_eq!(
        path(&parent.ca_file).as_deref(),
        Some("/etc/cachalot/parent-ca/ca.crt")
    );
    assert_eq!(
        path(&parent.client_cert_file).as_deref(),
        Some("/etc/cachalot/parent-tls/tls.crt")
    );
    assert_eq!(
        path(&parent.client_key_file).as_deref(),
        Some("/etc/cachalot/parent-tls/tls.key")
    );
    assert_eq!(
        path(&parent.bearer_token_file).as_deref(),
        Some("/etc/cachalot/parent-token/token")
    );
    assert!(
        config.tls.is_none(),
        "the spoke itself still serves plain HTTP"
    );
    let mounts = secret_mounts(pod_spec(&objs));
    assert_eq!(mounts["parent-tls"].0, "spoke-client");
    assert_eq!(
        mounts["parent-tls"].1,
        ["tls.crt=tls.crt", "tls.key=tls.key"]
    );
    assert_eq!(mounts["parent-tls"].3, "/etc/cachalot/parent-tls");
    assert_eq!(mounts["parent-token"].0, "hub-token");
    assert_eq!(mounts["parent-token"].1, ["token=token"]);
    assert!(mounts.values().all(|m| m.4 && !m.2), "read-only, required");
}

#[test]
fn changing_a_tls_or_token_secret_reference_rolls_the_pods_and_plain_mirrors_keep_their_hash() {
    let hash_of = |spec: serde_json::Value| config_hash(&build(&mirror(spec)).1.unwrap());
    let base = serde_json::json!({"registries": [{"name": "docker.io"}],
                                  "tls": {"secretName": "hub-tls"}});
    let renamed = serde_json::json!({"registries": [{"name": "docker.io"}],
                                     "tls": {"secretName": "hub-tls-2"}});
    assert_ne!(hash_of(base.clone()), hash_of(renamed));
    assert_eq!(hash_of(base.clone()), hash_of(base));
    let token = |name: &str| {
        serde_json::json!({"registries": [{"name": "docker.io"}],
                           "parent": {"url": "http://hub:5000",
                                      "auth": {"bearerTokenSecret": {"name": name, "key": "t"}}}})
    };
    assert_ne!(hash_of(token("a")), hash_of(token("b")));
}

#[test]
fn an_s3_hub_with_tls_and_a_token_has_its_replicas_forward_to_each_other_on_the_admin_port() {
    let mut m = s3_mirror();
    m.spec.tls = tls_hub().spec.tls;
    let (_, objs) = build(&m);
    let objs = objs.unwrap();
    let me = "http://cachalot-hub-1.cachalot-hub-peers.cachalot.svc:5000";
    // Loads and validates as a replica does (a fixed admin port is required with `cluster`).
    let config = rendered_config_as(&objs, me);
    assert!(config.tls.is_some() && config.auth.is_some());
    assert!(!config.public_listener_is_open());
    let admin_port = config.admin_listen.port();
    let cluster = config.cluster.as_ref().unwrap();
    assert_eq!(cluster.peers.len(), 3);
    for peer in &cluster.peers {
        let base = cachalot_registry::upstream::peers::peer_base(peer, false, admin_port).unwrap();
        assert!(
            base.starts_with("http://cachalot-hub-") && base.ends_with(&format!(":{admin_port}")),
            "{peer} is reached at {base}"
        );
    }
}

#[test]
fn tls_where_the_registry_or_the_nodes_cannot_use_it_is_refused_naming_the_field() {
    use serde_json::json;
    let tls = json!({"secretName": "hub-tls"});
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}], "tls": tls,
                       "service": {"type": "External", "externalUrl": "https://hub:5000"}})),
        "spec.tls"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}], "tls": tls,
                       "nodes": {"runtime": "Crio"}})),
        "spec.tls"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}], "tls": {"secretName": "Bad_Name"}})),
        "spec.tls.secretName"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}],
                       "tls": {"secretName": "t", "clientAuth": {}}})),
        "spec.tls.clientAuth"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}],
                       "tls": {"secretName": "t", "clientAuth": {"caSecretKey": "tls.key"}}})),
        "spec.tls.clientAuth.caSecretKey"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}],
                       "tls": {"secretName": "t", "clientAuth":
                               {"bearerTokenSecret": {"name": "t", "key": "../x"}}}})),
        "spec.tls.clientAuth.bearerTokenSecret.key"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}],
                       "parent": {"url": "http://hub:5000",
                                  "tls": {"clientCertSecret": {"name": "c"}}}})),
        "spec.parent.tls"
    );
    assert_eq!(
        invalid(json!({"registries": [{"name": "docker.io"}],
                       "parent": {"url": "https://hub:5000",
                                  "auth": {"bearerTokenSecret": {"name": "UPPER", "key": "t"}}}})),
        "spec.parent.auth.bearerTokenSecret.name"
    );
    // Several replicas with pod-local storage are fine: each serves TLS on its own; so are
    // S3 replicas (they forward to each other on the admin port).
    assert!(validate(&tls_hub()).is_ok());
    assert!(validate(&mirror(
        json!({"registries": [{"name": "docker.io"}], "tls": tls,
                       "storage": {"type": "S3", "s3": {"bucket": "cachalot"}}}),
    ))
    .is_ok());
}
