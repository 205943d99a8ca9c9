//! What a TLS mirror's pods and nodes run, from the operator's own build: the registry config
//! that `build` renders for `spec.tls`, with the Secret keys written where the kubelet would
//! mount them (rebased under a temp dir), started as a real `cachalot-registry` process; the
//! desired state `build` gives the node agents, followed by the real agent loop, which installs
//! the mirror's `ca.crt` beside `hosts.toml`; and a real containerd that pulls over TLS through
//! exactly those files. Certificates are generated here (rcgen); everything is on 127.0.0.1.
//! With `clientAuth` (mTLS) and `nodeClientCertSecret`, the agent also installs the node's
//! client certificate and containerd presents it; without it the mirror is not used.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use cachalot_operator::api::RegistryMirror;
use cachalot_operator::controller::build::{
    desired_state, registry_config, BuildConfig, AGENT_MIRROR_CA_DIR, AGENT_NODE_CLIENT_DIR,
    MIRROR_CA_KEY, TLS_DIR,
};
use cachalot_operator::controller::validate::{validate, Validated};
use cachalot_operator::node_agent::protocol::{AgentStatus, DesiredState, Reason, RegistryState};
use cachalot_operator::node_agent::render::{
    CA_FILE_NAME, CLIENT_CERT_FILE_NAME, CLIENT_KEY_FILE_NAME,
};
use cachalot_operator::node_agent::Args;
use cachalot_testkit::certs::TestCa;
use cachalot_testkit::client::http_client;
use cachalot_testkit::containerd::Containerd;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::image::{docker_image, push};
use cachalot_testkit::process::LoggedChild;
use cachalot_testkit::wait::free_port;
use common::node::{agent_args, NodeDirs, RunningAgent};
use common::{admin_stats, spawn_registry};

/// Where the kubelet would mount `pod_path`, under `root`.
fn rebased(root: &Path, pod_path: &str) -> PathBuf {
    root.join(pod_path.trim_start_matches('/'))
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A distribution serving `library/<repository>:v1`, an image of `layers` (sizes) from `seed`.
async fn upstream_with(repository: &str, seed: u64, layers: &[u64]) -> Distribution {
    let upstream = Distribution::start().await.unwrap();
    let image = docker_image(seed, layers).unwrap();
    push(
        &upstream.url(),
        &format!("library/{repository}"),
        "v1",
        &image,
    )
    .await
    .unwrap();
    upstream
}

/// The mirror as a user writes it, with `tls` as given; docker.io points at `upstream`.
fn tls_mirror(upstream: &str, tls: serde_json::Value) -> (RegistryMirror, Validated) {
    let mirror: RegistryMirror = serde_json::from_value(serde_json::json!({
        "apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
        "metadata": {"name": "hub", "namespace": "cachalot", "uid": "uid-1"},
        "spec": {
            "registries": [{"name": "docker.io", "url": upstream}],
            "service": {"type": "NodePort"},
            "tls": tls
        }
    }))
    .unwrap();
    let v = validate(&mirror).unwrap();
    (mirror, v)
}

/// A registry pod as the build makes it: the TLS Secret's keys where the kubelet mounts them
/// under a temp dir, the built config rebased there, started as a real process.
struct TlsPod {
    /// The pod's files, removed on drop.
    _dir: tempfile::TempDir,
    registry: LoggedChild,
    /// The public (TLS) port.
    port: u16,
    /// `http://127.0.0.1:<admin port>`.
    admin: String,
    /// The registry config as built (before rebasing).
    config: String,
}

/// Starts the pod of `mirror` with a TLS Secret whose `tls.crt`/`tls.key` `ca` signs for
/// 127.0.0.1, and whose `ca.crt` is `ca`'s certificate when `with_ca_crt`.
async fn start_tls_pod(
    mirror: &RegistryMirror,
    v: &Validated,
    ca: &TestCa,
    with_ca_crt: bool,
) -> TlsPod {
    let dir = tempfile::tempdir().unwrap();
    let pod = dir.path();
    let server = ca
        .server("cachalot", &[IpAddr::V4(Ipv4Addr::LOCALHOST)], &[])
        .unwrap();
    let ca_pem = ca.pem();
    let mut keys = vec![("tls.crt", &server.cert_pem), ("tls.key", &server.key_pem)];
    if with_ca_crt {
        keys.push(("ca.crt", &ca_pem));
    }
    for (key, pem) in keys {
        write(&rebased(pod, &format!("{TLS_DIR}/{key}")), pem);
    }
    let port = free_port().unwrap();
    let admin_port = free_port().unwrap();
    let built = serde_yaml::to_string(
        &registry_config(
            mirror,
            v,
            &BuildConfig {
                image: "cachalot.test/cachalot:tls".into(),
                cluster_name: None,
            },
        )
        .unwrap(),
    )
    .unwrap();
    let root = pod.display().to_string();
    let config = built
        .replace("/etc/cachalot/", &format!("{root}/etc/cachalot/"))
        .replace("/var/lib/cachalot", &format!("{root}/var/lib/cachalot"))
        .replace("0.0.0.0:5000", &format!("127.0.0.1:{port}"))
        .replace("0.0.0.0:5001", &format!("127.0.0.1:{admin_port}"));
    let config_file = pod.join("config.yaml");
    write(&config_file, &config);
    let mut cmd = Command::new(common::registry_binary());
    cmd.arg("serve").arg("--config").arg(&config_file);
    let admin = format!("http://127.0.0.1:{admin_port}");
    // The readiness probe's view: the admin port stays plain HTTP.
    let registry = spawn_registry(
        &mut cmd,
        &pod.join("registry.log"),
        &format!("{admin}/readyz"),
    )
    .await;
    TlsPod {
        _dir: dir,
        registry,
        port,
        admin,
        config: built,
    }
}

/// The registry's `misses` from its admin `/stats`.
async fn misses(admin: &str) -> u64 {
    let stats = admin_stats(admin).await;
    stats["misses"]
        .as_u64()
        .unwrap_or_else(|| panic!("no misses in {stats}"))
}

/// The desired state `build` gives the nodes of `mirror` served at `endpoint`, as the agent on
/// `node` reads it: the mirror's CA (`ca_pem`) written where the agent's mount would put it,
/// `server` going nowhere (a pull can only succeed through the mirror) and a mirror taken out
/// after 2 s unreachable. Not written yet.
fn node_desired(
    mirror: &RegistryMirror,
    v: &Validated,
    node: &NodeDirs,
    endpoint: &str,
    ca_pem: &str,
) -> DesiredState {
    let mut desired = desired_state(mirror, v, Some(endpoint), false).unwrap();
    let built_ca = format!("{AGENT_MIRROR_CA_DIR}/{MIRROR_CA_KEY}");
    assert_eq!(desired.mirror_ca_file.as_deref(), Some(built_ca.as_str()));
    let ca_mount = rebased(node.path(), &built_ca);
    write(&ca_mount, ca_pem);
    desired.mirror_ca_file = Some(ca_mount.display().to_string());
    desired.registries[0].server = Some("http://127.0.0.1:1".to_string());
    desired.unreachable_after = "2s".to_string();
    desired
}

/// The agent loop on `node`, writing into its `certs.d` as containerd sees it.
fn start_agent(node: &NodeDirs) -> RunningAgent {
    RunningAgent::spawn(Args {
        host_certs_dir: Some(node.certs.display().to_string()),
        ..agent_args(node, free_port().unwrap())
    })
}

/// The agent reports docker.io configured through the mirror, and is ready.
fn docker_io_configured(s: &AgentStatus) -> bool {
    s.ready
        && s.registries
            .iter()
            .any(|r| r.registry == "docker.io" && r.state == RegistryState::Configured)
}

/// The mirror goes: the agent removes every file it wrote (docker.io's directory with them),
/// then stops.
async fn remove_and_stop(node: &NodeDirs, mut desired: DesiredState, agent: RunningAgent) {
    desired.removing = true;
    node.write_desired(&desired);
    agent
        .wait("the agent removes its files", |s| {
            s.managed_files.is_empty()
        })
        .await;
    assert!(!node.certs.join("docker.io").exists());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_tls_mirror_serves_a_real_containerd_through_the_agents_hosts_toml_and_ca() {
    let upstream = upstream_with("tlsdemo", 1406, &[64 * 1024, 32 * 1024]).await;
    let (mirror, v) = tls_mirror(
        &upstream.url(),
        serde_json::json!({"secretName": "hub-tls"}),
    );

    // The pod: the Secret's keys where the kubelet mounts them, the built config rebased.
    let ca = TestCa::new("mirror CA").unwrap();
    let ca_pem = ca.pem();
    let pod = start_tls_pod(&mirror, &v, &ca, false).await;
    assert!(
        pod.config.contains("certFile: /etc/cachalot/tls/tls.crt"),
        "{}",
        pod.config
    );
    let client = http_client().unwrap();
    // The public port speaks TLS only.
    let plain = client
        .get(format!("http://127.0.0.1:{}/v2/", pod.port))
        .send()
        .await;
    assert!(
        plain.map_or(true, |r| !r.status().is_success()),
        "plain HTTP must not be served on the TLS port"
    );

    // The node: the agent's mount of `ca.crt`, and the desired state the operator writes.
    let node = NodeDirs::new();
    let endpoint = format!("https://127.0.0.1:{}", pod.port);
    let desired = node_desired(&mirror, &v, &node, &endpoint, &ca_pem);
    node.write_desired(&desired);

    let agent = start_agent(&node);
    let status = agent
        .wait(
            "the agent configures docker.io through the TLS mirror",
            docker_io_configured,
        )
        .await;
    let ca_file = node.certs.join("docker.io").join(CA_FILE_NAME);
    assert!(
        status
            .managed_files
            .contains(&ca_file.display().to_string()),
        "{status:?}"
    );
    let hosts = std::fs::read_to_string(node.certs.join("docker.io/hosts.toml")).unwrap();
    assert!(
        hosts.contains(&format!("ca = \"{}\"", ca_file.display())),
        "{hosts}"
    );
    assert!(std::fs::read_to_string(&ca_file)
        .unwrap()
        .contains(ca_pem.trim()));

    let containerd = Containerd::start().await.unwrap();
    let pull = containerd
        .pull("docker.io/library/tlsdemo:v1", &node.certs)
        .await
        .unwrap();
    assert!(
        pull.success(),
        "pull over TLS failed: {}\n{}\n{}",
        pull.stderr,
        containerd.log_tail(),
        pod.registry.log_tail()
    );
    let misses = misses(&pod.admin).await;
    assert!(misses >= 3, "misses {misses}");

    // The mirror goes: the agent removes hosts.toml, then the CA, then the directory.
    remove_and_stop(&node, desired, agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_mirror_serves_its_own_nodes_only_with_the_node_client_certificate() {
    let upstream = upstream_with("mtlsdemo", 1407, &[48 * 1024, 16 * 1024]).await;
    let (mirror, v) = tls_mirror(
        &upstream.url(),
        serde_json::json!({"secretName": "hub-tls",
                           "clientAuth": {"caSecretKey": "ca.crt",
                                          "nodeClientCertSecret": {"name": "hub-nodes"}}}),
    );

    // One CA signs the server's and the nodes' certificates (cert-manager's usual shape: the
    // Secret's ca.crt is both the CA nodes trust and the client CA).
    let ca = TestCa::new("hub CA").unwrap();
    let ca_pem = ca.pem();
    let pod = start_tls_pod(&mirror, &v, &ca, true).await;
    assert!(
        pod.config
            .contains("clientCaFile: /etc/cachalot/tls/ca.crt"),
        "{}",
        pod.config
    );

    // The node: the CA mount, and the desired state as built but first without the node
    // certificate, as before `nodeClientCertSecret` existed.
    let node = NodeDirs::new();
    let endpoint = format!("https://127.0.0.1:{}", pod.port);
    let mut desired = node_desired(&mirror, &v, &node, &endpoint, &ca_pem);
    let built_client = desired.mirror_client_cert.take().unwrap();
    assert_eq!(
        built_client.key_file,
        format!("{AGENT_NODE_CLIENT_DIR}/tls.key")
    );
    node.write_desired(&desired);
    let agent = start_agent(&node);
    let status = agent
        .wait(
            "without a client certificate the mirror fails the probe",
            |s| {
                s.registries.iter().any(|r| {
                    r.registry == "docker.io" && r.reason == Some(Reason::MirrorUnreachable)
                })
            },
        )
        .await;
    assert!(!status.ready, "{status:?}");
    let hosts_path = node.certs.join("docker.io/hosts.toml");
    let hosts = std::fs::read_to_string(&hosts_path).unwrap();
    assert!(!hosts.contains(&endpoint), "{hosts}");
    let containerd = Containerd::start().await.unwrap();
    let refused = containerd
        .pull("docker.io/library/mtlsdemo:v1", &node.certs)
        .await
        .unwrap();
    assert!(
        !refused.success(),
        "without the node certificate nothing serves the pull"
    );
    assert_eq!(misses(&pod.admin).await, 0, "the mirror was not used");

    // The Secret mounted into the agent: it installs the pair and containerd presents it.
    let cert_mount = rebased(node.path(), &built_client.cert_file);
    let key_mount = rebased(node.path(), &built_client.key_file);
    let client = ca.client("node").unwrap();
    write(&cert_mount, &client.cert_pem);
    write(&key_mount, &client.key_pem);
    desired.mirror_client_cert = Some(cachalot_operator::node_agent::protocol::ClientCertFiles {
        cert_file: cert_mount.display().to_string(),
        key_file: key_mount.display().to_string(),
    });
    node.write_desired(&desired);
    let status = agent
        .wait(
            "with the node certificate the agent configures docker.io through the mirror",
            docker_io_configured,
        )
        .await;
    let dir = node.certs.join("docker.io");
    let (cert_file, key_file) = (
        dir.join(CLIENT_CERT_FILE_NAME),
        dir.join(CLIENT_KEY_FILE_NAME),
    );
    for file in [&cert_file, &key_file, &dir.join(CA_FILE_NAME)] {
        assert!(
            status.managed_files.contains(&file.display().to_string()),
            "{file:?} in {status:?}"
        );
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let hosts = std::fs::read_to_string(&hosts_path).unwrap();
    assert!(
        hosts.contains(&format!(
            "client = [[\"{}\", \"{}\"]]",
            cert_file.display(),
            key_file.display()
        )),
        "{hosts}"
    );
    let pull = containerd
        .pull("docker.io/library/mtlsdemo:v1", &node.certs)
        .await
        .unwrap();
    assert!(
        pull.success(),
        "pull over mTLS failed: {}\n{}\n{}",
        pull.stderr,
        containerd.log_tail(),
        pod.registry.log_tail()
    );
    let counted = misses(&pod.admin).await;
    assert!(
        counted >= 3,
        "the mirror counted the pull: misses {counted}"
    );

    // The field goes: the agent removes the line, then the files (the CA stays).
    desired.mirror_client_cert = None;
    node.write_desired(&desired);
    agent
        .wait("the agent removes the client certificate", |s| {
            !s.managed_files
                .iter()
                .any(|f| f.ends_with(CLIENT_KEY_FILE_NAME) || f.ends_with(CLIENT_CERT_FILE_NAME))
        })
        .await;
    assert!(!key_file.exists() && !cert_file.exists());
    assert!(!std::fs::read_to_string(&hosts_path)
        .unwrap()
        .contains("client"));

    remove_and_stop(&node, desired, agent).await;
}
