//! File-system behaviour of the node agent against a temporary certs.d: admin files survive,
//! names cannot escape the directory, stale files go, merges are undone, rounds are idempotent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use cachalot_operator::node_agent::apply::{execute, managed_files, scan, Roots};
use cachalot_operator::node_agent::plan::{
    reconcile_node, reconcile_node_with_tls, Action, NodeCa, NodeClientCert, Plan,
};
use cachalot_operator::node_agent::protocol::{
    DesiredRegistry, DesiredState, Fallback, Reason, RegistryState, RegistryStatus, Runtime,
};
use cachalot_operator::node_agent::render::{
    parse_marker, CA_FILE_NAME, CLIENT_CERT_FILE_NAME, CLIENT_KEY_FILE_NAME, ORIGINAL_FILE_NAME,
};

const MIRROR: &str = "cachalot/hub";
const EP: &str = "http://10.96.0.12:5000";

fn registry(name: &str) -> DesiredRegistry {
    DesiredRegistry {
        registry: name.to_string(),
        server: None,
        endpoints: vec![EP.to_string()],
        fallback: Fallback::Upstream,
        dial_timeout: "2s".to_string(),
        skip_verify: false,
        ca_file: None,
        override_path: false,
        client_cert: None,
    }
}

fn desired(registries: Vec<DesiredRegistry>) -> DesiredState {
    DesiredState {
        mirror: MIRROR.to_string(),
        generation: "g".to_string(),
        removing: false,
        runtime: Runtime::Containerd,
        registries,
        unreachable_after: "30s".to_string(),
        merge_with_admin_file: false,
        mirror_ca_file: None,
        mirror_client_cert: None,
    }
}

/// `state` as the operator writes it once the mirror is being deleted.
fn removal(state: DesiredState) -> DesiredState {
    DesiredState {
        removing: true,
        ..state
    }
}

fn live() -> BTreeSet<String> {
    [EP.to_string()].into()
}

struct Node {
    _tmp: tempfile::TempDir,
    roots: Roots,
}

impl Node {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let certs = tmp.path().join("certs.d");
        fs::create_dir(&certs).unwrap();
        let conf = tmp.path().join("registries.conf.d");
        fs::create_dir(&conf).unwrap();
        Self {
            roots: Roots {
                certs_dir: certs,
                registries_conf_dir: Some(conf),
            },
            _tmp: tmp,
        }
    }
    fn certs(&self) -> &Path {
        &self.roots.certs_dir
    }
    /// One agent round; panics if an action fails.
    fn round(&self, desired: &DesiredState, live: &BTreeSet<String>) -> Plan {
        self.round_with_tls(desired, live, None, None)
    }
    /// One agent round for a mirror whose CA the node must trust; panics if an action fails.
    fn round_with_ca(
        &self,
        desired: &DesiredState,
        live: &BTreeSet<String>,
        ca: Option<&NodeCa>,
    ) -> Plan {
        self.round_with_tls(desired, live, ca, None)
    }
    /// One agent round for a mirror whose CA the node trusts and which requires the node's
    /// client certificate; panics if an action fails.
    fn round_with_tls(
        &self,
        desired: &DesiredState,
        live: &BTreeSet<String>,
        ca: Option<&NodeCa>,
        client: Option<&NodeClientCert>,
    ) -> Plan {
        let observed = scan(&self.roots, &desired.mirror).unwrap();
        let plan = reconcile_node_with_tls(desired, &observed, live, ca, client);
        for action in &plan.actions {
            execute(&self.roots, action).unwrap_or_else(|e| panic!("{action:?}: {e}"));
        }
        plan
    }
    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.certs().join(rel)).unwrap()
    }
    /// An administrator's own hosts.toml for `registry`, written before any agent round.
    fn write_admin_hosts(&self, registry: &str, text: &str) {
        fs::create_dir(self.certs().join(registry)).unwrap();
        fs::write(self.certs().join(registry).join("hosts.toml"), text).unwrap();
    }
}

fn state_of(plan: &Plan, registry: &str) -> RegistryStatus {
    plan.registries
        .iter()
        .find(|r| r.registry == registry)
        .cloned()
        .unwrap()
}

const ADMIN: &str = "server = \"https://registry-1.docker.io\"\n[host.\"https://corp.internal\"]\ncapabilities = [\"pull\"]\n";

#[test]
fn first_round_writes_marked_file_and_second_round_changes_nothing() {
    let node = Node::new();
    let d = desired(vec![registry("docker.io")]);
    let plan = node.round(&d, &live());
    assert_eq!(plan.actions.len(), 1);
    let text = node.read("docker.io/hosts.toml");
    assert_eq!(parse_marker(&text).unwrap().mirror, MIRROR);
    assert!(text.contains(EP));
    assert_eq!(
        state_of(&plan, "docker.io").state,
        RegistryState::Configured
    );
    assert_eq!(node.round(&d, &live()).actions, []);
    let observed = scan(&node.roots, MIRROR).unwrap();
    assert_eq!(managed_files(&observed, MIRROR), ["docker.io/hosts.toml"]);
}

#[test]
fn admin_file_without_marker_survives_and_is_reported() {
    let node = Node::new();
    node.write_admin_hosts("docker.io", ADMIN);
    let plan = node.round(&desired(vec![registry("docker.io")]), &live());
    assert_eq!(node.read("docker.io/hosts.toml"), ADMIN);
    let status = state_of(&plan, "docker.io");
    assert_eq!(status.state, RegistryState::Blocked);
    assert_eq!(status.reason, Some(Reason::AdminFileExists));
    // Even when the mirror is deleted, the admin file stays.
    node.round(&removal(desired(vec![registry("docker.io")])), &live());
    assert_eq!(node.read("docker.io/hosts.toml"), ADMIN);
}

#[test]
fn admin_file_written_between_scan_and_write_is_not_overwritten() {
    let node = Node::new();
    let d = desired(vec![registry("docker.io")]);
    let observed = scan(&node.roots, MIRROR).unwrap();
    let plan = reconcile_node(&d, &observed, &live());
    node.write_admin_hosts("docker.io", ADMIN);
    let err = execute(&node.roots, &plan.actions[0]).unwrap_err();
    assert!(err.to_string().contains("changed since"), "{err}");
    assert_eq!(node.read("docker.io/hosts.toml"), ADMIN);
}

#[test]
fn registry_names_that_escape_the_certs_dir_write_nothing_anywhere() {
    let node = Node::new();
    let parent = node.certs().parent().unwrap().to_path_buf();
    let before: BTreeSet<_> = fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let names = [
        "../escape",
        "..",
        "/tmp/abs",
        "a/b",
        "x\0y",
        "docker.io/../../etc",
    ];
    let d = desired(names.iter().map(|n| registry(n)).collect());
    let plan = node.round(&d, &live());
    assert_eq!(plan.actions, []);
    for name in names {
        let s = state_of(&plan, name);
        assert_eq!(s.reason, Some(Reason::InvalidRegistryName), "{name:?}");
    }
    let after: BTreeSet<_> = fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after);
    assert_eq!(fs::read_dir(node.certs()).unwrap().count(), 0);
}

#[test]
fn symlinked_registry_directory_is_not_written_through() {
    let node = Node::new();
    let outside = node.certs().parent().unwrap().join("outside");
    fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, node.certs().join("docker.io")).unwrap();
    let plan = node.round(&desired(vec![registry("docker.io")]), &live());
    assert_eq!(
        state_of(&plan, "docker.io").reason,
        Some(Reason::AdminFileExists)
    );
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn file_of_a_registry_no_longer_desired_is_removed_with_its_empty_directory() {
    let node = Node::new();
    node.round(
        &desired(vec![registry("docker.io"), registry("ghcr.io")]),
        &live(),
    );
    assert!(node.certs().join("ghcr.io/hosts.toml").exists());
    let plan = node.round(&desired(vec![registry("docker.io")]), &live());
    assert_eq!(
        plan.actions,
        [Action::Remove {
            root: cachalot_operator::node_agent::plan::Root::CertsDir,
            dir: "ghcr.io".into(),
            file: "hosts.toml".into()
        }]
    );
    assert!(!node.certs().join("ghcr.io").exists());
    assert!(node.certs().join("docker.io/hosts.toml").exists());
}

#[test]
fn removing_state_deletes_our_files_but_keeps_directories_with_admin_content() {
    let node = Node::new();
    let d = desired(vec![registry("docker.io"), registry("quay.io")]);
    node.round(&d, &live());
    fs::write(node.certs().join("quay.io/ca.crt"), "admin cert").unwrap();
    let plan = node.round(&removal(d), &live());
    assert!(plan
        .registries
        .iter()
        .all(|r| r.state == RegistryState::Removed));
    assert!(!node.certs().join("docker.io").exists());
    assert!(!node.certs().join("quay.io/hosts.toml").exists());
    assert_eq!(
        fs::read_to_string(node.certs().join("quay.io/ca.crt")).unwrap(),
        "admin cert"
    );
    assert_eq!(
        managed_files(&scan(&node.roots, MIRROR).unwrap(), MIRROR),
        Vec::<String>::new()
    );
}

#[test]
fn file_managed_by_another_mirror_is_neither_overwritten_nor_removed() {
    let node = Node::new();
    let mut other = desired(vec![registry("docker.io")]);
    other.mirror = "team-b/mirror".into();
    node.round(&other, &live());
    let theirs = node.read("docker.io/hosts.toml");
    let plan = node.round(&desired(vec![registry("docker.io")]), &live());
    assert_eq!(
        state_of(&plan, "docker.io").reason,
        Some(Reason::AdminFileExists)
    );
    node.round(&removal(desired(vec![])), &live());
    assert_eq!(node.read("docker.io/hosts.toml"), theirs);
}

#[test]
fn merge_mode_preserves_the_admin_original_and_restores_it_on_removal() {
    let node = Node::new();
    node.write_admin_hosts("docker.io", ADMIN);
    let mut d = desired(vec![registry("docker.io")]);
    d.merge_with_admin_file = true;
    let plan = node.round(&d, &live());
    assert_eq!(
        state_of(&plan, "docker.io").state,
        RegistryState::Configured
    );
    let merged = node.read("docker.io/hosts.toml");
    assert!(parse_marker(&merged).unwrap().merged);
    let ours = merged.find(EP).unwrap();
    let theirs = merged.find("https://corp.internal").unwrap();
    assert!(ours < theirs, "our host must come first:\n{merged}");
    assert_eq!(node.read(&format!("docker.io/{ORIGINAL_FILE_NAME}")), ADMIN);
    // Stable: the next round re-renders from the preserved original, not from the merged file.
    assert_eq!(node.round(&d, &live()).actions, []);
    d.registries.clear();
    node.round(&d, &live());
    assert_eq!(node.read("docker.io/hosts.toml"), ADMIN);
    assert!(!node
        .certs()
        .join(format!("docker.io/{ORIGINAL_FILE_NAME}"))
        .exists());
}

#[test]
fn unreachable_endpoint_is_left_out_and_reported() {
    let node = Node::new();
    let plan = node.round(&desired(vec![registry("docker.io")]), &BTreeSet::new());
    let text = node.read("docker.io/hosts.toml");
    assert!(!text.contains(EP), "{text}");
    assert!(text.contains("server = \"https://registry-1.docker.io\""));
    let s = state_of(&plan, "docker.io");
    assert_eq!(
        (s.state, s.reason),
        (RegistryState::Unreachable, Some(Reason::MirrorUnreachable))
    );
    // When it answers, the next round adds it.
    node.round(&desired(vec![registry("docker.io")]), &live());
    assert!(node.read("docker.io/hosts.toml").contains(EP));
}

#[test]
fn invalid_edit_of_a_configured_registry_keeps_the_working_file() {
    let node = Node::new();
    node.round(&desired(vec![registry("docker.io")]), &live());
    let before = node.read("docker.io/hosts.toml");
    let mut bad = registry("docker.io");
    bad.dial_timeout = "soon".into();
    let plan = node.round(&desired(vec![bad]), &live());
    assert_eq!(
        state_of(&plan, "docker.io").reason,
        Some(Reason::InvalidDesiredRegistry)
    );
    assert_eq!(node.read("docker.io/hosts.toml"), before);
}

#[test]
fn crio_dropin_is_written_marked_and_removed_with_the_mirror() {
    let node = Node::new();
    let mut d = desired(vec![registry("docker.io")]);
    d.runtime = Runtime::Crio;
    node.round(&d, &live());
    let conf = node.roots.registries_conf_dir.clone().unwrap();
    let file = conf.join("50-cachalot-cachalot-hub.conf");
    let text = fs::read_to_string(&file).unwrap();
    assert_eq!(parse_marker(&text).unwrap().mirror, MIRROR);
    assert!(text.contains("location = \"10.96.0.12:5000/docker.io\""));
    assert_eq!(
        fs::read_dir(node.certs()).unwrap().count(),
        0,
        "no containerd files for CRI-O"
    );
    d.removing = true;
    node.round(&d, &live());
    assert!(!file.exists());
}

#[test]
fn switching_runtime_to_crio_removes_the_containerd_files() {
    let node = Node::new();
    let mut d = desired(vec![registry("docker.io")]);
    node.round(&d, &live());
    d.runtime = Runtime::Crio;
    node.round(&d, &live());
    assert!(!node.certs().join("docker.io").exists());
}

#[test]
fn default_namespace_without_live_endpoint_has_no_file_because_containerd_needs_a_host() {
    let node = Node::new();
    let d = desired(vec![registry("_default")]);
    node.round(&d, &live());
    assert!(node.certs().join("_default/hosts.toml").exists());
    let plan = node.round(&d, &BTreeSet::new());
    assert_eq!(
        state_of(&plan, "_default").reason,
        Some(Reason::MirrorUnreachable)
    );
    assert!(!node.certs().join("_default").exists());
}

#[test]
fn temp_file_left_by_a_crashed_write_does_not_keep_the_directory_alive() {
    let node = Node::new();
    node.round(&desired(vec![registry("ghcr.io")]), &live());
    fs::write(
        node.certs().join("ghcr.io/.cachalot-tmp-hosts.toml-999"),
        "partial",
    )
    .unwrap();
    node.round(&desired(vec![]), &live());
    assert!(!node.certs().join("ghcr.io").exists());
}

const TLS_EP: &str = "https://10.96.0.12:5000";
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn tls_registry(name: &str) -> DesiredRegistry {
    DesiredRegistry {
        endpoints: vec![TLS_EP.to_string()],
        ..registry(name)
    }
}

fn node_ca(node: &Node, pem: &str) -> NodeCa {
    NodeCa {
        pem: pem.to_string(),
        host_certs_dir: node.certs().display().to_string(),
    }
}

#[test]
fn the_mirror_ca_is_installed_beside_hosts_toml_named_as_ca_and_removed_with_it() {
    let node = Node::new();
    let d = desired(vec![tls_registry("docker.io")]);
    let live: BTreeSet<String> = [TLS_EP.to_string()].into();
    let ca = node_ca(&node, CA_PEM);
    let plan = node.round_with_ca(&d, &live, Some(&ca));
    // The CA is written before the file that names it.
    let written: Vec<&str> = plan
        .actions
        .iter()
        .map(|a| match a {
            Action::Write { file, .. } => file.as_str(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(written, [CA_FILE_NAME, "hosts.toml"]);
    let ca_path = node.certs().join("docker.io").join(CA_FILE_NAME);
    let ca_text = node.read(&format!("docker.io/{CA_FILE_NAME}"));
    assert_eq!(parse_marker(&ca_text).unwrap().mirror, MIRROR);
    assert!(ca_text.ends_with(CA_PEM), "{ca_text}");
    let hosts: toml::Table = node.read("docker.io/hosts.toml").parse().unwrap();
    assert_eq!(
        hosts["host"][TLS_EP]["ca"].as_str(),
        Some(ca_path.to_str().unwrap())
    );
    assert_eq!(node.round_with_ca(&d, &live, Some(&ca)).actions, []);
    let observed = scan(&node.roots, MIRROR).unwrap();
    assert_eq!(
        managed_files(&observed, MIRROR),
        [
            format!("docker.io/{CA_FILE_NAME}"),
            "docker.io/hosts.toml".to_string()
        ]
    );

    // A rotated CA replaces the file; hosts.toml (same path) is unchanged.
    let rotated = node_ca(&node, &CA_PEM.replace("MIIB", "MIIC"));
    let plan = node.round_with_ca(&d, &live, Some(&rotated));
    assert_eq!(plan.actions.len(), 1, "{:?}", plan.actions);
    assert!(node
        .read(&format!("docker.io/{CA_FILE_NAME}"))
        .contains("MIIC"));

    // Removal: hosts.toml first, then the CA, then the directory.
    let plan = node.round_with_ca(&removal(d), &live, None);
    let removed: Vec<&str> = plan
        .actions
        .iter()
        .map(|a| match a {
            Action::Remove { file, .. } => file.as_str(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(removed, ["hosts.toml", CA_FILE_NAME]);
    assert!(!node.certs().join("docker.io").exists());
}

#[test]
fn without_a_ca_any_more_hosts_toml_drops_ca_and_the_installed_copy_goes() {
    let node = Node::new();
    let d = desired(vec![tls_registry("docker.io")]);
    let live: BTreeSet<String> = [TLS_EP.to_string()].into();
    node.round_with_ca(&d, &live, Some(&node_ca(&node, CA_PEM)));
    let plan = node.round_with_ca(&d, &live, None);
    assert!(
        matches!(&plan.actions[..], [Action::Write { file: w, .. }, Action::Remove { file: r, .. }]
            if w == "hosts.toml" && r == CA_FILE_NAME),
        "{:?}",
        plan.actions
    );
    assert!(!node.read("docker.io/hosts.toml").contains("ca ="));
    assert!(!node.certs().join("docker.io").join(CA_FILE_NAME).exists());
    assert!(node.certs().join("docker.io/hosts.toml").exists());
}

#[test]
fn a_ca_file_of_someone_else_blocks_the_registry_and_is_left_alone() {
    let node = Node::new();
    fs::create_dir(node.certs().join("docker.io")).unwrap();
    fs::write(
        node.certs().join("docker.io").join(CA_FILE_NAME),
        "admin's\n",
    )
    .unwrap();
    let d = desired(vec![tls_registry("docker.io")]);
    let live: BTreeSet<String> = [TLS_EP.to_string()].into();
    let plan = node.round_with_ca(&d, &live, Some(&node_ca(&node, CA_PEM)));
    let status = state_of(&plan, "docker.io");
    assert_eq!(status.state, RegistryState::Blocked);
    assert_eq!(status.reason, Some(Reason::AdminFileExists));
    assert_eq!(plan.actions, []);
    assert_eq!(node.read(&format!("docker.io/{CA_FILE_NAME}")), "admin's\n");
}

const CLIENT_CERT_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIClient\n-----END CERTIFICATE-----\n";
const CLIENT_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMIIEsecret\n-----END PRIVATE KEY-----\n";

fn node_client(node: &Node, cert: &str) -> NodeClientCert {
    NodeClientCert {
        cert_pem: cert.to_string(),
        key_pem: CLIENT_KEY_PEM.to_string(),
        host_certs_dir: node.certs().display().to_string(),
    }
}

fn files(plan: &Plan) -> Vec<String> {
    plan.actions
        .iter()
        .map(|a| match a {
            Action::Write { file, .. } => format!("write {file}"),
            Action::Remove { file, .. } => format!("remove {file}"),
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

#[test]
fn the_node_client_certificate_is_installed_before_hosts_toml_names_it_with_a_private_key() {
    use std::os::unix::fs::PermissionsExt;
    let node = Node::new();
    let d = desired(vec![tls_registry("docker.io")]);
    let live: BTreeSet<String> = [TLS_EP.to_string()].into();
    let ca = node_ca(&node, CA_PEM);
    let client = node_client(&node, CLIENT_CERT_PEM);
    let plan = node.round_with_tls(&d, &live, Some(&ca), Some(&client));
    assert_eq!(
        files(&plan),
        [
            format!("write {CA_FILE_NAME}"),
            format!("write {CLIENT_CERT_FILE_NAME}"),
            format!("write {CLIENT_KEY_FILE_NAME}"),
            "write hosts.toml".to_string(),
        ]
    );
    // The key never reaches a log line: the action's Debug leaves it out.
    let logged = format!("{:?}", plan.actions);
    assert!(!logged.contains("MIIEsecret"), "{logged}");
    assert!(logged.contains("MIIClient"), "{logged}");

    let dir = node.certs().join("docker.io");
    let key_path = dir.join(CLIENT_KEY_FILE_NAME);
    let mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key is readable by root only");
    let key_text = node.read(&format!("docker.io/{CLIENT_KEY_FILE_NAME}"));
    assert_eq!(parse_marker(&key_text).unwrap().mirror, MIRROR);
    assert!(key_text.ends_with(CLIENT_KEY_PEM), "{key_text}");
    let hosts: toml::Table = node.read("docker.io/hosts.toml").parse().unwrap();
    let pair: Vec<&str> = hosts["host"][TLS_EP]["client"].as_array().unwrap()[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        pair,
        [
            dir.join(CLIENT_CERT_FILE_NAME).to_str().unwrap(),
            key_path.to_str().unwrap()
        ]
    );
    assert_eq!(
        node.round_with_tls(&d, &live, Some(&ca), Some(&client))
            .actions,
        [],
        "a second round changes nothing"
    );
    let observed = scan(&node.roots, MIRROR).unwrap();
    assert_eq!(
        managed_files(&observed, MIRROR),
        [
            format!("docker.io/{CA_FILE_NAME}"),
            format!("docker.io/{CLIENT_CERT_FILE_NAME}"),
            format!("docker.io/{CLIENT_KEY_FILE_NAME}"),
            "docker.io/hosts.toml".to_string()
        ]
    );

    // A renewed certificate replaces its file only (same paths in hosts.toml).
    let renewed = node_client(&node, &CLIENT_CERT_PEM.replace("MIIC", "MIID"));
    let plan = node.round_with_tls(&d, &live, Some(&ca), Some(&renewed));
    assert_eq!(files(&plan), [format!("write {CLIENT_CERT_FILE_NAME}")]);

    // The field goes: hosts.toml drops `client` first, then the certificate and key go; the
    // CA stays.
    let plan = node.round_with_tls(&d, &live, Some(&ca), None);
    assert_eq!(
        files(&plan),
        [
            "write hosts.toml".to_string(),
            format!("remove {CLIENT_CERT_FILE_NAME}"),
            format!("remove {CLIENT_KEY_FILE_NAME}"),
        ]
    );
    assert!(!node.read("docker.io/hosts.toml").contains("client"));
    assert!(!key_path.exists());
    assert!(dir.join(CA_FILE_NAME).exists());

    // Removal of the mirror takes everything, hosts.toml first.
    node.round_with_tls(&d, &live, Some(&ca), Some(&client));
    let plan = node.round_with_tls(&removal(d), &live, None, None);
    assert_eq!(
        files(&plan),
        [
            "remove hosts.toml".to_string(),
            format!("remove {CA_FILE_NAME}"),
            format!("remove {CLIENT_CERT_FILE_NAME}"),
            format!("remove {CLIENT_KEY_FILE_NAME}"),
        ]
    );
    assert!(!dir.exists());
}

#[test]
fn a_client_key_file_of_someone_else_blocks_the_registry_and_is_left_alone() {
    let node = Node::new();
    fs::create_dir(node.certs().join("docker.io")).unwrap();
    let key_path = node.certs().join("docker.io").join(CLIENT_KEY_FILE_NAME);
    fs::write(&key_path, "admin's\n").unwrap();
    let d = desired(vec![tls_registry("docker.io")]);
    let live: BTreeSet<String> = [TLS_EP.to_string()].into();
    let plan = node.round_with_tls(&d, &live, None, Some(&node_client(&node, CLIENT_CERT_PEM)));
    let status = state_of(&plan, "docker.io");
    assert_eq!(status.state, RegistryState::Blocked);
    assert_eq!(status.reason, Some(Reason::AdminFileExists));
    assert!(status.message.contains(CLIENT_KEY_FILE_NAME), "{status:?}");
    assert_eq!(plan.actions, []);
    assert_eq!(fs::read_to_string(&key_path).unwrap(), "admin's\n");
}
