//! What a TLS mirror's pods and nodes run, from the operator's own build: the registry config
//! that `build` renders for `spec.tls`, with the Secret keys written where the kubelet would
//! mount them (rebased under a temp dir), started as a real `cachalot-registry` process; the
//! desired state `build` gives the node agents, followed by the real agent loop, which installs
//! the mirror's `ca.crt` beside `hosts.toml`; and a real containerd that pulls over TLS through
//! exactly those files. Certificates are generated here (rcgen); everything is on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cachalot_operator::controller::build::{
    desired_state, registry_config, BuildConfig, AGENT_MIRROR_CA_DIR, MIRROR_CA_KEY, TLS_DIR,
};
use cachalot_operator::controller::validate::validate;
use cachalot_operator::node_agent::protocol::RegistryState;
use cachalot_operator::node_agent::render::CA_FILE_NAME;
use cachalot_operator::node_agent::{run_until, Args};
use cachalot_testkit::certs::TestCa;
use cachalot_testkit::client::http_client;
use cachalot_testkit::containerd::Containerd;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::image::{docker_image, push};
use cachalot_testkit::wait::free_port;
use common::node::{agent_args, AgentEndpoint, NodeDirs};
use common::spawn_registry;

const DEADLINE: Duration = Duration::from_secs(30);

/// Where the kubelet would mount `pod_path`, under `root`.
fn rebased(root: &Path, pod_path: &str) -> PathBuf {
    root.join(pod_path.trim_start_matches('/'))
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_tls_mirror_serves_a_real_containerd_through_the_agents_hosts_toml_and_ca() {
    let binary = std::env::var_os("CACHALOT_E2E_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_BIN_EXE_cachalot-operator")).with_file_name("cachalot-registry")
        });
    assert!(
        binary.exists(),
        "{} not built: run `cargo build -p cachalot-registry` (scripts/test builds every binary first)",
        binary.display()
    );
    let upstream = Distribution::start().await.unwrap();
    let image = docker_image(1406, &[64 * 1024, 32 * 1024]).unwrap();
    push(&upstream.url(), "library/tlsdemo", "v1", &image)
        .await
        .unwrap();

    // The mirror as a user writes it; docker.io points at the local upstream.
    let mirror: cachalot_operator::api::RegistryMirror =
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
            "metadata": {"name": "hub", "namespace": "cachalot", "uid": "uid-1"},
            "spec": {
                "registries": [{"name": "docker.io", "url": upstream.url()}],
                "service": {"type": "NodePort"},
                "tls": {"secretName": "hub-tls"}
            }
        }))
        .unwrap();
    let v = validate(&mirror).unwrap();

    // The pod: the Secret's keys where the kubelet mounts them, the built config rebased.
    let pod = tempfile::tempdir().unwrap();
    let ca = TestCa::new("mirror CA").unwrap();
    let ca_pem = ca.pem();
    let signed = ca
        .server("cachalot", &[IpAddr::V4(Ipv4Addr::LOCALHOST)], &[])
        .unwrap();
    let (cert_pem, key_pem) = (signed.cert_pem, signed.key_pem);
    write(
        &rebased(pod.path(), &format!("{TLS_DIR}/tls.crt")),
        &cert_pem,
    );
    write(
        &rebased(pod.path(), &format!("{TLS_DIR}/tls.key")),
        &key_pem,
    );
    let port = free_port().unwrap();
    let admin_port = free_port().unwrap();
    let config = serde_yaml::to_string(
        &registry_config(
            &mirror,
            &v,
            &BuildConfig {
                image: "cachalot.test/cachalot:tls".into(),
                cluster_name: None,
            },
        )
        .unwrap(),
    )
    .unwrap();
    assert!(
        config.contains("certFile: /etc/cachalot/tls/tls.crt"),
        "{config}"
    );
    let root = pod.path().display().to_string();
    let config = config
        .replace("/etc/cachalot/", &format!("{root}/etc/cachalot/"))
        .replace("/var/lib/cachalot", &format!("{root}/var/lib/cachalot"))
        .replace("0.0.0.0:5000", &format!("127.0.0.1:{port}"))
        .replace("0.0.0.0:5001", &format!("127.0.0.1:{admin_port}"));
    let config_file = pod.path().join("config.yaml");
    write(&config_file, &config);
    let mut cmd = Command::new(&binary);
    cmd.arg("serve").arg("--config").arg(&config_file);
    let admin = format!("http://127.0.0.1:{admin_port}");
    // The readiness probe's view: the admin port stays plain HTTP.
    let registry = spawn_registry(
        &mut cmd,
        &pod.path().join("registry.log"),
        &format!("{admin}/readyz"),
    )
    .await;
    let client = http_client().unwrap();
    // The public port speaks TLS only.
    let plain = client
        .get(format!("http://127.0.0.1:{port}/v2/"))
        .send()
        .await;
    assert!(
        plain.map_or(true, |r| !r.status().is_success()),
        "plain HTTP must not be served on the TLS port"
    );

    // The node: the agent's mount of `ca.crt`, and the desired state the operator writes.
    let node = NodeDirs::new();
    let endpoint = format!("https://127.0.0.1:{port}");
    let mut desired = desired_state(&mirror, &v, Some(&endpoint), false).unwrap();
    let ca_mount = rebased(
        node.path(),
        &format!("{AGENT_MIRROR_CA_DIR}/{MIRROR_CA_KEY}"),
    );
    assert_eq!(
        desired.mirror_ca_file.as_deref(),
        Some(format!("{AGENT_MIRROR_CA_DIR}/{MIRROR_CA_KEY}").as_str())
    );
    desired.mirror_ca_file = Some(ca_mount.display().to_string());
    // `server` goes nowhere: a pull can only succeed through the mirror.
    desired.registries[0].server = Some("http://127.0.0.1:1".to_string());
    desired.unreachable_after = "2s".to_string();
    write(&ca_mount, &ca_pem);
    node.write_desired(&desired);

    let agent_port = free_port().unwrap();
    let args = Args {
        host_certs_dir: Some(node.certs.display().to_string()),
        ..agent_args(&node, agent_port)
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(run_until(args, async move {
        let _ = stopped.await;
    }));
    let status = AgentEndpoint::new(agent_port)
        .wait(
            "the agent configures docker.io through the TLS mirror",
            |s| {
                s.ready
                    && s.registries
                        .iter()
                        .any(|r| r.registry == "docker.io" && r.state == RegistryState::Configured)
            },
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
        registry.log_tail()
    );
    let body = client
        .get(format!("{admin}/stats"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let misses = stats["misses"].as_u64();
    assert!(misses.is_some_and(|m| m >= 3), "{stats}");

    // The mirror goes: the agent removes hosts.toml, then the CA, then the directory.
    desired.removing = true;
    node.write_desired(&desired);
    AgentEndpoint::new(agent_port)
        .wait("the agent removes its files", |s| {
            s.managed_files.is_empty()
        })
        .await;
    assert!(!node.certs.join("docker.io").exists());
    let _ = stop.send(());
    tokio::time::timeout(DEADLINE, agent)
        .await
        .expect("agent stops in time")
        .unwrap()
        .unwrap();
}
