//! Golden tests of the node agent's rendering: the exact `hosts.toml` (and CRI-O drop-in) text
//! for each supported shape, and the directory each lands in; and its containerd checks over
//! whole config files (`tests/golden/containerd/`: the real `containerd config default` of the
//! containerd 1.6 installed here, and an abridged containerd 2.x default).
//!
//! The expected files live in `tests/golden/node_agent/`. After an intended change, regenerate
//! them with `UPDATE_GOLDEN=1 cargo nextest run -p cachalot-operator --test node_agent_golden`
//! and review the diff; every file is also parsed back to check it is valid TOML.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use cachalot_operator::node_agent::containerd::{check_containerd_config, is_blocking};
use cachalot_operator::node_agent::plan::{
    reconcile_node, reconcile_node_with_ca, Action, NodeCa, Observed,
};
use cachalot_operator::node_agent::protocol::{
    DesiredRegistry, DesiredState, Fallback, Reason, Runtime,
};
use cachalot_operator::node_agent::render::{render_crio_dropin, render_hosts_toml};

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/node_agent")
        .join(name)
}

fn assert_golden(name: &str, actual: &str) {
    let path = golden_path(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create)",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "rendered {name} differs from its golden file"
    );
    let _: toml::Table = actual
        .parse()
        .unwrap_or_else(|e| panic!("{name} is not valid TOML: {e}"));
}

fn registry(name: &str, endpoints: &[&str]) -> DesiredRegistry {
    DesiredRegistry {
        registry: name.to_string(),
        server: None,
        endpoints: endpoints.iter().map(|e| (*e).to_string()).collect(),
        fallback: Fallback::Upstream,
        dial_timeout: "2s".to_string(),
        skip_verify: false,
        ca_file: None,
        override_path: false,
    }
}

fn all_live(reg: &DesiredRegistry) -> Vec<String> {
    reg.endpoints.clone()
}

/// Checks the hosts.toml of `reg`, with every endpoint live and no admin file, against `name`.
fn assert_golden_hosts(name: &str, reg: &DesiredRegistry) {
    assert_golden(
        name,
        &render_hosts_toml(MIRROR, reg, &all_live(reg), None).unwrap(),
    );
}

const MIRROR: &str = "cachalot/docker-hub";

#[test]
fn docker_hub_routes_through_the_mirror_and_falls_back_to_registry_1() {
    let reg = registry("docker.io", &["http://10.96.0.12:5000"]);
    assert_golden_hosts("docker-hub.hosts.toml", &reg);
}

#[test]
fn registry_with_port_keeps_host_port_and_defaults_server_to_https_host_port() {
    let reg = registry("registry.local:5000", &["http://10.96.0.12:5000"]);
    assert_golden_hosts("registry-with-port.hosts.toml", &reg);
}

#[test]
fn several_endpoints_are_listed_in_order_with_tls_settings() {
    let mut reg = registry(
        "ghcr.io",
        &[
            "http://10.96.0.12:5000",
            "https://mirror-b.internal:8443",
            "http://10.0.0.7:30500",
        ],
    );
    reg.skip_verify = true;
    reg.ca_file = Some("/etc/cachalot/ca/mirror.pem".to_string());
    assert_golden_hosts("several-endpoints.hosts.toml", &reg);
}

#[test]
fn only_live_endpoints_are_written_and_none_live_leaves_just_the_upstream() {
    let reg = registry(
        "docker.io",
        &["http://10.96.0.12:5000", "http://10.96.0.13:5000"],
    );
    let one = vec!["http://10.96.0.13:5000".to_string()];
    assert_golden(
        "docker-hub-one-live.hosts.toml",
        &render_hosts_toml(MIRROR, &reg, &one, None).unwrap(),
    );
    assert_golden(
        "docker-hub-none-live.hosts.toml",
        &render_hosts_toml(MIRROR, &reg, &[], None).unwrap(),
    );
}

#[test]
fn fallback_never_makes_the_last_endpoint_the_server_and_ignores_the_gate() {
    let mut reg = registry(
        "docker.io",
        &["http://10.96.0.12:5000", "http://10.96.0.13:5000"],
    );
    reg.fallback = Fallback::Never;
    // No endpoint live: with Never the file must still not name the upstream.
    let text = render_hosts_toml(MIRROR, &reg, &[], None).unwrap();
    assert!(!text.contains("registry-1.docker.io"));
    assert_golden("fallback-never.hosts.toml", &text);
}

#[test]
fn parent_mirror_endpoint_is_a_hub_url_with_override_path() {
    let mut reg = registry(
        "docker.io",
        &[
            "http://10.96.0.12:5000",
            "https://hub.cachalot.example/cluster-a/v2",
        ],
    );
    reg.override_path = true;
    reg.ca_file = Some("/etc/cachalot/ca/hub.pem".to_string());
    assert_golden_hosts("parent-mirror.hosts.toml", &reg);
}

#[test]
fn explicit_server_replaces_the_default_upstream() {
    let mut reg = registry("docker.io", &["http://127.0.0.1:5001"]);
    reg.server = Some("http://127.0.0.1:5002".to_string());
    assert_golden_hosts("explicit-server.hosts.toml", &reg);
}

#[test]
fn merged_admin_file_keeps_admin_hosts_after_ours_and_is_marked_merged() {
    let reg = registry("docker.io", &["http://10.96.0.12:5000"]);
    let admin = "server = \"https://registry-1.docker.io\"\n\n[host.\"https://corp-mirror.internal\"]\n  capabilities = [\"pull\"]\n  ca = \"corp.pem\"\n";
    assert_golden(
        "merged-admin.hosts.toml",
        &render_hosts_toml(MIRROR, &reg, &all_live(&reg), Some(admin)).unwrap(),
    );
}

#[test]
fn crio_dropin_lists_mirrors_per_registry_prefix() {
    let hub = registry(
        "docker.io",
        &["http://10.96.0.12:5000", "https://mirror-b.internal:8443"],
    );
    let port = registry("registry.local", &["http://10.96.0.12:5000"]);
    let mut never = registry("quay.io", &["http://10.96.0.12:5000"]);
    never.fallback = Fallback::Never;
    let dead = registry("ghcr.io", &["http://10.96.0.12:5000"]);
    let text = render_crio_dropin(
        MIRROR,
        &[
            (&hub, all_live(&hub)),
            (&port, all_live(&port)),
            (&never, Vec::new()),
            (&dead, Vec::new()),
        ],
    )
    .unwrap();
    assert!(
        !text.contains("ghcr.io"),
        "a registry without live endpoint is left to CRI-O's default"
    );
    assert_golden("crio-dropin.conf", &text);
}

#[test]
fn crio_dropin_refuses_registries_a_path_prefix_cannot_name() {
    for name in ["registry.local:5000", "_default"] {
        let reg = registry(name, &["http://10.96.0.12:5000"]);
        assert!(
            matches!(
                render_crio_dropin(MIRROR, &[(&reg, all_live(&reg))]),
                Err(cachalot_operator::node_agent::render::RenderError::CrioUnsupported { .. })
            ),
            "{name}"
        );
    }
}

#[test]
fn host_namespace_directories_are_named_after_the_registry_with_port_kept() {
    let desired = DesiredState {
        mirror: MIRROR.to_string(),
        generation: "g1".to_string(),
        removing: false,
        runtime: Runtime::Containerd,
        registries: vec![
            registry("docker.io", &["http://10.96.0.12:5000"]),
            registry("registry.local:5000", &["http://10.96.0.12:5000"]),
            registry("_default", &["http://10.96.0.12:5000"]),
        ],
        unreachable_after: "30s".to_string(),
        merge_with_admin_file: false,
        mirror_ca_file: None,
    };
    let live: BTreeSet<String> = ["http://10.96.0.12:5000".to_string()].into();
    let plan = reconcile_node(&desired, &Observed::default(), &live);
    let paths: Vec<String> = plan
        .actions
        .iter()
        .map(|a| match a {
            Action::Write { dir, file, .. } => format!("{dir}/{file}"),
            other => panic!("unexpected action {other:?}"),
        })
        .collect();
    assert_eq!(
        paths,
        [
            "docker.io/hosts.toml",
            "registry.local:5000/hosts.toml",
            "_default/hosts.toml"
        ]
    );
}

#[test]
fn a_tls_mirror_gets_its_ca_beside_hosts_toml_named_by_its_node_path() {
    let desired = DesiredState {
        mirror: MIRROR.to_string(),
        generation: "g1".to_string(),
        removing: false,
        runtime: Runtime::Containerd,
        registries: vec![registry("docker.io", &["https://10.96.0.12:5000"])],
        unreachable_after: "30s".to_string(),
        merge_with_admin_file: false,
        mirror_ca_file: Some("/etc/cachalot/mirror-ca/ca.crt".to_string()),
    };
    let ca = NodeCa {
        pem: "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n".to_string(),
        host_certs_dir: "/etc/containerd/certs.d/".to_string(),
    };
    let live: BTreeSet<String> = ["https://10.96.0.12:5000".to_string()].into();
    let plan = reconcile_node_with_ca(&desired, &Observed::default(), &live, Some(&ca));
    let files: Vec<(String, &str)> = plan
        .actions
        .iter()
        .map(|a| match a {
            Action::Write {
                dir, file, content, ..
            } => (format!("{dir}/{file}"), content.as_str()),
            other => panic!("unexpected action {other:?}"),
        })
        .collect();
    assert_eq!(files[0].0, "docker.io/cachalot-ca.crt");
    assert_eq!(
        files[0].1,
        "# managed-by: cachalot mirror=cachalot/docker-hub\n-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n"
    );
    assert_eq!(files[1].0, "docker.io/hosts.toml");
    assert_golden("tls-mirror.hosts.toml", files[1].1);
}

fn containerd_fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/containerd")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn containerd_reasons(text: &str, expected_dir: Option<&str>) -> Vec<Reason> {
    check_containerd_config(text, expected_dir)
        .problems
        .iter()
        .map(|p| p.reason)
        .collect()
}

/// `containerd config default` of the real containerd 1.6 installed here: `config_path` is empty,
/// so hosts.toml is never read; with it set (the documented fix) nothing is left to report.
#[test]
fn containerd_1_6_default_config_needs_config_path_and_the_message_says_how() {
    let default = containerd_fixture("1.6-default.toml");
    let status = check_containerd_config(&default, Some("/etc/containerd/certs.d"));
    assert_eq!(status.config_version, Some(2));
    assert_eq!(
        containerd_reasons(&default, Some("/etc/containerd/certs.d")),
        [Reason::ConfigPathNotSet]
    );
    let message = &status.problems[0].message;
    assert!(
        message.contains("Fix: config_path = \"/etc/containerd/certs.d\""),
        "{message}"
    );
    let fixed = default.replace(
        "config_path = \"\"",
        "config_path = \"/etc/containerd/certs.d\"",
    );
    assert_eq!(
        containerd_reasons(&fixed, Some("/etc/containerd/certs.d")),
        []
    );
    // A list works with 1.x's CRI: reported, never blocking.
    let list = default.replace(
        "config_path = \"\"",
        "config_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"",
    );
    let status = check_containerd_config(&list, Some("/etc/containerd/certs.d"));
    assert_eq!(
        status.problems.iter().map(|p| p.reason).collect::<Vec<_>>(),
        [Reason::ConfigPathList]
    );
    assert!(!is_blocking(&status.problems[0], status.config_version));
}

/// containerd 2.x (config v3): the key moved to the images plugin; a `:`-list (as EKS AMIs ship)
/// is ignored by the transfer-service pull unless the local pull is chosen.
#[test]
fn containerd_2_x_config_with_a_list_blocks_unless_local_image_pull_is_set() {
    let default = containerd_fixture("2.x-default-abridged.toml");
    assert_eq!(
        containerd_reasons(&default, Some("/etc/containerd/certs.d")),
        [Reason::ConfigPathNotSet]
    );
    let set = |value: &str| {
        default.replacen(
            "    [plugins.'io.containerd.cri.v1.images'.registry]\n      config_path = ''",
            &format!("    [plugins.'io.containerd.cri.v1.images'.registry]\n      config_path = '{value}'"),
            1,
        )
    };
    assert_eq!(
        containerd_reasons(
            &set("/etc/containerd/certs.d"),
            Some("/etc/containerd/certs.d")
        ),
        []
    );
    let list = set("/etc/containerd/certs.d:/etc/docker/certs.d");
    let status = check_containerd_config(&list, Some("/etc/containerd/certs.d"));
    assert_eq!(
        status.problems.iter().map(|p| p.reason).collect::<Vec<_>>(),
        [Reason::ConfigPathList]
    );
    assert!(is_blocking(&status.problems[0], status.config_version));
    assert!(status.problems[0]
        .message
        .contains("use_local_image_pull = true"));
    let local = list.replace(
        "use_local_image_pull = false",
        "use_local_image_pull = true",
    );
    assert_eq!(
        containerd_reasons(&local, Some("/etc/containerd/certs.d")),
        []
    );
}
