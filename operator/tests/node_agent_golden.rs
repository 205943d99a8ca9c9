//! Golden tests of the node agent's rendering: the exact `hosts.toml` (and CRI-O drop-in) text
//! for each supported shape, and the directory each lands in; and its containerd checks over
//! whole config files (`tests/golden/containerd/`: the real `containerd config default` of
//! containerd 1.6.20, 1.7.35, 2.0.14, 2.1.9 and 2.4.2, each file's header saying how it was made),
//! as shipped, with the documented fix, and with imported files.
//!
//! The expected files live in `tests/golden/node_agent/`. After an intended change, regenerate
//! them with `UPDATE_GOLDEN=1 cargo nextest run -p cachalot-operator --test node_agent_golden`
//! and review the diff; every file is also parsed back to check it is valid TOML.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use cachalot_operator::node_agent::containerd::{
    check_containerd_config, check_containerd_config_with_imports, is_blocking,
};
use cachalot_operator::node_agent::plan::{
    reconcile_node, reconcile_node_with_tls, Action, NodeCa, NodeClientCert, Observed, Plan,
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
        client_cert: None,
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

/// The desired state of mirror [`MIRROR`] (generation g1, containerd) for `registries`, with
/// the mirror's CA at `mirror_ca_file` on the agent's side.
fn desired_state(registries: Vec<DesiredRegistry>, mirror_ca_file: Option<&str>) -> DesiredState {
    DesiredState {
        mirror: MIRROR.to_string(),
        generation: "g1".to_string(),
        removing: false,
        runtime: Runtime::Containerd,
        registries,
        unreachable_after: "30s".to_string(),
        merge_with_admin_file: false,
        mirror_ca_file: mirror_ca_file.map(str::to_string),
        mirror_client_cert: None,
    }
}

/// docker.io through a TLS mirror at 10.96.0.12:5000, whose CA the agent mounts.
fn tls_desired() -> DesiredState {
    desired_state(
        vec![registry("docker.io", &["https://10.96.0.12:5000"])],
        Some("/etc/cachalot/mirror-ca/ca.crt"),
    )
}

/// The mirror's CA as the agent read it, installed under containerd's certs.d.
fn node_ca() -> NodeCa {
    NodeCa {
        pem: "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n".to_string(),
        host_certs_dir: "/etc/containerd/certs.d/".to_string(),
    }
}

/// The files a plan writes, in order: `dir/file` and the content; any other action fails.
fn written(plan: &Plan) -> Vec<(String, &str)> {
    plan.actions
        .iter()
        .map(|a| match a {
            Action::Write {
                dir, file, content, ..
            } => (format!("{dir}/{file}"), content.as_str()),
            other => panic!("unexpected action {other:?}"),
        })
        .collect()
}

#[test]
fn host_namespace_directories_are_named_after_the_registry_with_port_kept() {
    let desired = desired_state(
        vec![
            registry("docker.io", &["http://10.96.0.12:5000"]),
            registry("registry.local:5000", &["http://10.96.0.12:5000"]),
            registry("_default", &["http://10.96.0.12:5000"]),
        ],
        None,
    );
    let live: BTreeSet<String> = ["http://10.96.0.12:5000".to_string()].into();
    let plan = reconcile_node(&desired, &Observed::default(), &live);
    let paths: Vec<String> = written(&plan).into_iter().map(|(path, _)| path).collect();
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
    let desired = tls_desired();
    let ca = node_ca();
    let live: BTreeSet<String> = ["https://10.96.0.12:5000".to_string()].into();
    let plan = reconcile_node_with_tls(&desired, &Observed::default(), &live, Some(&ca), None);
    let files = written(&plan);
    assert_eq!(files[0].0, "docker.io/cachalot-ca.crt");
    assert_eq!(
        files[0].1,
        "# managed-by: cachalot mirror=cachalot/docker-hub\n-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n"
    );
    assert_eq!(files[1].0, "docker.io/hosts.toml");
    assert_golden("tls-mirror.hosts.toml", files[1].1);
}

#[test]
fn an_mtls_mirror_gets_the_node_client_certificate_named_as_containerds_client_pair() {
    let desired = tls_desired();
    let ca = node_ca();
    let client = NodeClientCert {
        cert_pem: "-----BEGIN CERTIFICATE-----\nMIICnode\n-----END CERTIFICATE-----\n".to_string(),
        key_pem: "-----BEGIN PRIVATE KEY-----\nMIIEkey\n-----END PRIVATE KEY-----\n".to_string(),
        host_certs_dir: "/etc/containerd/certs.d/".to_string(),
    };
    let live: BTreeSet<String> = ["https://10.96.0.12:5000".to_string()].into();
    let plan = reconcile_node_with_tls(
        &desired,
        &Observed::default(),
        &live,
        Some(&ca),
        Some(&client),
    );
    let files = written(&plan);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "docker.io/cachalot-ca.crt",
            "docker.io/cachalot-client.crt",
            "docker.io/cachalot-client.key",
            "docker.io/hosts.toml"
        ]
    );
    assert_eq!(
        files[2].1,
        "# managed-by: cachalot mirror=cachalot/docker-hub\n-----BEGIN PRIVATE KEY-----\nMIIEkey\n-----END PRIVATE KEY-----\n"
    );
    assert_golden("mtls-mirror.hosts.toml", files[3].1);
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

fn reasons_with_imports(text: &str, imported: &[(&str, &str)]) -> Vec<Reason> {
    let imported: Vec<(String, Result<String, String>)> = imported
        .iter()
        .map(|(path, text)| ((*path).to_string(), Ok((*text).to_string())))
        .collect();
    check_containerd_config_with_imports(text, &imported, Some(CERTS_D))
        .problems
        .iter()
        .map(|p| p.reason)
        .collect()
}

const CERTS_D: &str = "/etc/containerd/certs.d";

/// The real defaults keep the registry table as two lines: its header, then `config_path`.
const REGISTRY_HEADERS: [&str; 2] = [
    "[plugins.\"io.containerd.grpc.v1.cri\".registry]",
    "[plugins.'io.containerd.cri.v1.images'.registry]",
];

/// `text` with the CRI registry's `config_path` (not the transfer plugin's, which 1.7 and 2.x
/// defaults also have) set to `value`: the documented fix, applied as an administrator would.
fn set_config_path(text: &str, value: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let header = lines
        .iter()
        .position(|l| REGISTRY_HEADERS.contains(&l.trim()))
        .expect("a real default has the CRI registry table");
    let line = lines[header + 1];
    let indent = &line[..line.len() - line.trim_start().len()];
    assert!(line.trim_start().starts_with("config_path = "), "{line}");
    let mut out: Vec<String> = lines.iter().map(|l| (*l).to_string()).collect();
    out[header + 1] = format!("{indent}config_path = \"{value}\"");
    out.join("\n") + "\n"
}

/// `text` with `use_local_image_pull = true` in the images plugin's table: replaced where the
/// default has it (2.1+), added under the table's header where it does not (2.0).
fn with_local_image_pull(text: &str) -> String {
    if text.contains("use_local_image_pull = false") {
        return text.replacen(
            "use_local_image_pull = false",
            "use_local_image_pull = true",
            1,
        );
    }
    let header = "  [plugins.'io.containerd.cri.v1.images']\n";
    assert!(text.contains(header));
    text.replacen(
        header,
        &format!("{header}    use_local_image_pull = true\n"),
        1,
    )
}

/// The real `containerd config default` of containerd 1.6.20 (Debian's package, installed here)
/// and 1.7.35 (built from the Go module source): config version 2, `config_path` empty, so
/// hosts.toml is never read; with it set (the documented fix) nothing is left to report; a list
/// works with 1.x's CRI, so it is reported but never blocks.
#[test]
fn containerd_1_6_and_1_7_default_configs_need_config_path_and_the_message_says_how() {
    for name in ["1.6-default.toml", "1.7-default.toml"] {
        let default = containerd_fixture(name);
        let status = check_containerd_config(&default, Some(CERTS_D));
        assert_eq!(status.config_version, Some(2), "{name}");
        assert_eq!(
            containerd_reasons(&default, Some(CERTS_D)),
            [Reason::ConfigPathNotSet],
            "{name}"
        );
        let message = &status.problems[0].message;
        assert!(
            message.contains(
                "Fix: config_path = \"/etc/containerd/certs.d\" under [plugins.\"io.containerd.grpc.v1.cri\".registry]"
            ),
            "{name}: {message}"
        );
        let fixed = set_config_path(&default, CERTS_D);
        assert_eq!(containerd_reasons(&fixed, Some(CERTS_D)), [], "{name}");
        let list = set_config_path(&default, "/etc/containerd/certs.d:/etc/docker/certs.d");
        let status = check_containerd_config(&list, Some(CERTS_D));
        assert_eq!(
            status.problems.iter().map(|p| p.reason).collect::<Vec<_>>(),
            [Reason::ConfigPathList],
            "{name}"
        );
        assert!(!is_blocking(&status.problems[0], status.config_version));
        // A config_path naming another directory.
        let other = set_config_path(&default, "/etc/docker/certs.d");
        assert_eq!(
            containerd_reasons(&other, Some(CERTS_D)),
            [Reason::ConfigPathMismatch],
            "{name}"
        );
    }
}

/// The real `containerd config default` of containerd 2.0.14, 2.1.9 and 2.4.2 (built from the Go
/// module source): config version 3 (2.0, 2.1) or 4 (2.4), the key in the images plugin,
/// `config_path` empty. As shipped, no hosts.toml is read: 2.0 and 2.1 have no default, 2.2+
/// default to `/etc/containerd/certs.d:/etc/docker/certs.d`, which the transfer service (the
/// default pull of 2.1+) takes as one directory. Fixed with one directory, nothing is left. A
/// list blocks unless the local pull is chosen (`use_local_image_pull = true`); 2.0 pulls only
/// locally, but a v3 file does not say which 2.x reads it, so a list is reported there too.
#[test]
fn containerd_2_x_default_configs_need_one_directory_or_the_local_pull() {
    for (name, version) in [
        ("2.0-default.toml", 3),
        ("2.1-default.toml", 3),
        ("2.4-default.toml", 4),
    ] {
        let default = containerd_fixture(name);
        let status = check_containerd_config(&default, Some(CERTS_D));
        assert_eq!(status.config_version, Some(version), "{name}");
        assert_eq!(
            containerd_reasons(&default, Some(CERTS_D)),
            [Reason::ConfigPathNotSet],
            "{name}"
        );
        let message = &status.problems[0].message;
        assert!(
            message.contains(
                "Fix: config_path = \"/etc/containerd/certs.d\" under [plugins.\"io.containerd.cri.v1.images\".registry]"
            ),
            "{name}: {message}"
        );
        assert!(is_blocking(&status.problems[0], status.config_version));

        let fixed = set_config_path(&default, CERTS_D);
        assert_eq!(containerd_reasons(&fixed, Some(CERTS_D)), [], "{name}");

        let list = set_config_path(&default, "/etc/containerd/certs.d:/etc/docker/certs.d");
        let status = check_containerd_config(&list, Some(CERTS_D));
        assert_eq!(
            status.problems.iter().map(|p| p.reason).collect::<Vec<_>>(),
            [Reason::ConfigPathList],
            "{name}"
        );
        assert!(is_blocking(&status.problems[0], status.config_version));
        assert!(status.problems[0]
            .message
            .contains("use_local_image_pull = true"));
        assert_eq!(
            containerd_reasons(&with_local_image_pull(&list), Some(CERTS_D)),
            [],
            "{name}"
        );

        // The local pull with config_path left empty: containerd 2.2+ reads its default list,
        // which only a v4 file proves (2.0 and 2.1 read nothing).
        let local_default = with_local_image_pull(&default);
        let want: &[Reason] = if version >= 4 {
            &[]
        } else {
            &[Reason::ConfigPathNotSet]
        };
        assert_eq!(
            containerd_reasons(&local_default, Some(CERTS_D)),
            want,
            "{name}"
        );
    }
}

/// `imports` over real defaults, each outcome first seen in `containerd config dump` of the real
/// binaries: containerd 1.7.35 replaces a plugin section an import defines whole; 2.1.9 and
/// 2.4.2 merge it key by key (an import's `config_path = ''` still replaces); 2.4.2 (config v4)
/// migrates an import without `version` before merging, so the v2 key in it counts, while 2.1.9
/// ignores it.
#[test]
fn imports_over_real_default_configs_are_merged_as_each_containerd_merges_them() {
    let conf_d = "/etc/containerd/conf.d/10-cri.toml";
    // 1.7: an import that redefines the CRI section (to change the pause image) drops the
    // config_path the main file sets; the message says 2.x would keep it.
    let v1_7 = set_config_path(&containerd_fixture("1.7-default.toml"), CERTS_D);
    let pause = "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.9\"\n";
    assert_eq!(
        reasons_with_imports(&v1_7, &[(conf_d, pause)]),
        [Reason::ConfigPathNotSet]
    );
    let imported = [(conf_d.to_string(), Ok(pause.to_string()))];
    let message =
        &check_containerd_config_with_imports(&v1_7, &imported, Some(CERTS_D)).problems[0].message;
    assert!(message.contains("containerd 1.x replaces"), "{message}");
    assert!(
        message.contains(
            "in /etc/containerd/conf.d/10-cri.toml, the last imported file that defines it"
        ),
        "the fix names the import, where setting it survives: {message}"
    );
    assert!(
        message.contains("containerd 2.x (which merges imported files key by key) would read"),
        "{message}"
    );
    let other_plugin = "[plugins.\"io.containerd.snapshotter.v1.overlayfs\"]\n  root_path = \"\"\n";
    assert_eq!(reasons_with_imports(&v1_7, &[(conf_d, other_plugin)]), []);

    // 2.4 (whose default imports /etc/containerd/conf.d/*.toml): redefining the images section
    // keeps config_path; the real 2.1 default imported whole clears it with its config_path = ''.
    let v2_4 = containerd_fixture("2.4-default.toml");
    assert!(v2_4.contains("imports = ['/etc/containerd/conf.d/*.toml']"));
    let v2_4_fixed = set_config_path(&v2_4, CERTS_D);
    let snapshotter = "[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'native'\n";
    assert_eq!(
        reasons_with_imports(&v2_4_fixed, &[(conf_d, snapshotter)]),
        []
    );
    let v2_1_default = containerd_fixture("2.1-default.toml");
    assert_eq!(
        reasons_with_imports(&v2_4_fixed, &[(conf_d, &v2_1_default)]),
        [Reason::ConfigPathNotSet]
    );
    // An import that sets config_path fixes the shipped default, whichever 2.x reads it.
    let v3_fix = "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = '/etc/containerd/certs.d'\n";
    assert_eq!(reasons_with_imports(&v2_4, &[(conf_d, v3_fix)]), []);
    assert_eq!(reasons_with_imports(&v2_1_default, &[(conf_d, v3_fix)]), []);

    // An import without version that uses the v2 key: migrated by 2.4, ignored by 2.1.
    let v2_key = "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
    assert_eq!(reasons_with_imports(&v2_4, &[(conf_d, v2_key)]), []);
    assert_eq!(
        reasons_with_imports(&v2_1_default, &[(conf_d, v2_key)]),
        [Reason::ConfigPathNotSet]
    );
}
