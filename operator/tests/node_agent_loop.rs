//! The agent loop in-process (library `run_until`): it follows changes of the desired file,
//! takes a dead mirror out after `unreachableAfter` and puts it back when it answers, keeps the
//! last good state when the file turns invalid, reports containerd problems (following the
//! `imports` of the real containerd 2.4 default through the mount), and serves `/status`,
//! `/healthz` and `/readyz`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use cachalot_operator::node_agent::protocol::{
    AgentStatus, DesiredRegistry, Reason, RegistryState,
};
use cachalot_operator::node_agent::Args;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::FaultProxy;
use cachalot_testkit::wait::free_port;
use common::node::{agent_args, desired, NodeDirs, RunningAgent};

/// The agent loop on `node`, answering on a free port, following `containerd_config`.
fn start_agent(node: &NodeDirs, containerd_config: Option<PathBuf>) -> RunningAgent {
    start_agent_with(node, containerd_config, None)
}

/// As [`start_agent`], with `host_containerd_config`: the config's path as containerd sees it,
/// against which the agent maps absolute `imports` onto the mounted directory.
fn start_agent_with(
    node: &NodeDirs,
    containerd_config: Option<PathBuf>,
    host_containerd_config: Option<&str>,
) -> RunningAgent {
    RunningAgent::spawn(Args {
        containerd_config,
        host_certs_dir: Some("/etc/containerd/certs.d".into()),
        host_containerd_config: host_containerd_config.map(str::to_owned),
        ..agent_args(node, free_port().unwrap())
    })
}

/// A node with a mirror (a FaultProxy in front of a real distribution) and, when given, a
/// containerd config file with `containerd_config` as its content.
async fn node_with_mirror(
    containerd_config: Option<&str>,
) -> (NodeDirs, Option<PathBuf>, Distribution, FaultProxy) {
    let node = NodeDirs::new();
    let config = containerd_config.map(|text| {
        let path = node.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    });
    let upstream = Distribution::start().await.unwrap();
    let mirror = FaultProxy::start(&upstream.url()).await.unwrap();
    (node, config, upstream, mirror)
}

/// The agent says its desired state is missing or does not parse.
fn reports_invalid_desired_state(status: &AgentStatus) -> bool {
    status
        .problems
        .iter()
        .any(|p| p.reason == Reason::DesiredStateInvalid)
}

const GOOD_CONTAINERD: &str =
    "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_mirror_is_taken_out_after_unreachable_after_and_put_back_when_it_answers() {
    let (node, containerd, _upstream, mirror) = node_with_mirror(Some(GOOD_CONTAINERD)).await;
    node.write_desired(&desired("g1", vec![mirror.url()]));
    let agent = start_agent(&node, containerd);
    let hosts = node.certs.join("docker.io/hosts.toml");

    let s = agent.wait("configured", |s| s.ready).await;
    assert_eq!(
        s.managed_files,
        ["/etc/containerd/certs.d/docker.io/hosts.toml"]
    );
    assert!(std::fs::read_to_string(&hosts)
        .unwrap()
        .contains(&mirror.url()));
    assert_eq!(agent.get("/readyz").await.unwrap().0, 200);
    assert_eq!(agent.get("/healthz").await.unwrap().0, 200);

    mirror.handle().set_down(true);
    let s = agent
        .wait("taken out", |s| {
            s.registries
                .first()
                .is_some_and(|r| r.state == RegistryState::Unreachable)
        })
        .await;
    assert_eq!(s.registries[0].reason, Some(Reason::MirrorUnreachable));
    assert!(!s.ready);
    let text = std::fs::read_to_string(&hosts).unwrap();
    assert!(!text.contains(&mirror.url()), "{text}");
    assert!(text.contains("server = \"https://registry-1.docker.io\""));

    mirror.handle().set_down(false);
    agent.wait("back", |s| s.ready).await;
    assert!(std::fs::read_to_string(&hosts)
        .unwrap()
        .contains(&mirror.url()));
    agent.stop().await;
    // Stopping the agent leaves the node configured (a rolling update must not unconfigure it).
    assert!(hosts.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_file_changes_are_followed_and_invalid_content_keeps_the_last_good_state() {
    let (node, _, _upstream, mirror) = node_with_mirror(None).await;
    let certs = &node.certs;
    let agent = start_agent(&node, None);

    // No desired file yet: not ready, reported, nothing written.
    let s = agent
        .wait("missing file reported", reports_invalid_desired_state)
        .await;
    assert!(!s.ready);
    assert_eq!(agent.get("/readyz").await.unwrap().0, 503);

    node.write_desired(&desired("g1", vec![mirror.url()]));
    agent
        .wait("g1 applied", |s| s.generation == "g1" && s.ready)
        .await;
    assert_eq!(agent.get("/readyz").await.unwrap().0, 200);

    let mut two = desired("g2", vec![mirror.url()]);
    two.registries.push(DesiredRegistry {
        registry: "ghcr.io".into(),
        ..two.registries[0].clone()
    });
    node.write_desired(&two);
    agent
        .wait("g2 applied", |s| {
            s.generation == "g2" && s.managed_files.len() == 2
        })
        .await;
    assert!(certs.join("ghcr.io/hosts.toml").exists());

    node.write_desired_bytes(b"{ not json");
    let s = agent
        .wait("invalid file reported", reports_invalid_desired_state)
        .await;
    assert_eq!(s.generation, "g2", "the last good state stays applied");
    assert!(certs.join("ghcr.io/hosts.toml").exists());

    node.write_desired(&desired("g3", vec![mirror.url()]));
    agent
        .wait("g3 applied", |s| {
            s.generation == "g3" && s.problems.is_empty()
        })
        .await;
    assert!(
        !certs.join("ghcr.io").exists(),
        "registry dropped from the desired state is cleaned up"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_without_config_path_is_reported_and_node_is_not_ready() {
    let (node, containerd, _upstream, mirror) = node_with_mirror(Some("version = 3\n")).await;
    let containerd = containerd.unwrap();
    node.write_desired(&desired("g1", vec![mirror.url()]));
    let agent = start_agent(&node, Some(containerd.clone()));
    let s = agent.wait("applied", |s| s.generation == "g1").await;
    assert_eq!(s.containerd.config_version, Some(3));
    assert_eq!(s.containerd.problems[0].reason, Reason::ConfigPathNotSet);
    assert_eq!(s.registries[0].state, RegistryState::Configured);
    assert!(!s.ready, "files written but containerd does not read them");

    std::fs::write(
        &containerd,
        GOOD_CONTAINERD
            .replace("version = 2", "version = 3")
            .replace("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images"),
    )
    .unwrap();
    agent
        .wait("fixed config noticed", |s| {
            s.ready && s.containerd.problems.is_empty()
        })
        .await;
    agent.stop().await;
}

/// The real `containerd config default` of containerd 2.4.2 imports
/// `/etc/containerd/conf.d/*.toml`: the agent reads that glob through its mount of
/// `/etc/containerd`, so a drop-in that sets `config_path` makes the node ready, and a drop-in
/// that redefines the images plugin for another setting leaves it ready (containerd 2.x merges
/// key by key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_containerd_2_4_default_is_fixed_by_a_conf_d_drop_in_the_agent_follows() {
    let default = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/containerd/2.4-default.toml"),
    )
    .unwrap();
    assert!(default.contains("imports = ['/etc/containerd/conf.d/*.toml']"));
    let (node, containerd, _upstream, mirror) = node_with_mirror(Some(&default)).await;
    let containerd = containerd.unwrap();
    let conf_d = containerd.parent().unwrap().join("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    node.write_desired(&desired("g1", vec![mirror.url()]));
    let agent = start_agent_with(
        &node,
        Some(containerd.clone()),
        Some("/etc/containerd/config.toml"),
    );
    let s = agent.wait("applied", |s| s.generation == "g1").await;
    assert_eq!(s.containerd.config_version, Some(4));
    assert_eq!(
        s.containerd
            .problems
            .iter()
            .map(|p| p.reason)
            .collect::<Vec<_>>(),
        [Reason::ConfigPathNotSet]
    );
    assert!(!s.ready);

    std::fs::write(
        conf_d.join("10-cachalot.toml"),
        "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = '/etc/containerd/certs.d'\n",
    )
    .unwrap();
    agent
        .wait("the drop-in is followed", |s| {
            s.ready && s.containerd.problems.is_empty()
        })
        .await;

    // A later drop-in for another images setting: merged key by key, config_path stays.
    std::fs::write(
        conf_d.join("20-snapshotter.toml"),
        "version = 3\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'native'\n",
    )
    .unwrap();
    // One more that clears it, to see the agent has read the directory again.
    std::fs::write(
        conf_d.join("30-clear.toml"),
        "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = ''\n",
    )
    .unwrap();
    let s = agent
        .wait("the clearing drop-in is seen", |s| !s.ready)
        .await;
    assert_eq!(s.containerd.problems[0].reason, Reason::ConfigPathNotSet);
    std::fs::remove_file(conf_d.join("30-clear.toml")).unwrap();
    agent
        .wait("ready again with the snapshotter drop-in", |s| {
            s.ready && s.containerd.problems.is_empty()
        })
        .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_client_certificate_that_does_not_load_is_reported_and_nothing_is_installed() {
    let node = NodeDirs::new();
    let cert = node.path().join("node-client/tls.crt");
    let key = node.path().join("node-client/tls.key");
    std::fs::create_dir_all(cert.parent().unwrap()).unwrap();
    let ca = cachalot_testkit::certs::TestCa::new("client CA").unwrap();
    let (good, other) = (ca.client("node").unwrap(), ca.client("other").unwrap());
    // A certificate with another certificate's key: both parse, the pair does not load.
    std::fs::write(&cert, &good.cert_pem).unwrap();
    std::fs::write(&key, &other.key_pem).unwrap();
    let mut state = desired("g1", vec!["https://127.0.0.1:9".to_string()]);
    state.mirror_client_cert = Some(cachalot_operator::node_agent::protocol::ClientCertFiles {
        cert_file: cert.display().to_string(),
        key_file: key.display().to_string(),
    });
    node.write_desired(&state);
    let agent = start_agent(&node, None);
    let s = agent
        .wait("the pair is reported", |s| {
            s.generation == "g1"
                && s.problems
                    .iter()
                    .any(|p| p.reason == Reason::MirrorClientCertInvalid)
        })
        .await;
    assert!(!s.ready, "{s:?}");
    let installed = |name: &str| node.certs.join("docker.io").join(name).exists();
    assert!(installed("hosts.toml"), "the upstream fallback is written");
    assert!(!installed("cachalot-client.key") && !installed("cachalot-client.crt"));

    // The right key: the problem clears and the pair is installed.
    std::fs::write(&key, &good.key_pem).unwrap();
    agent
        .wait("the pair is installed", |s| {
            s.problems.is_empty()
                && s.managed_files
                    .iter()
                    .any(|f| f.ends_with("cachalot-client.key"))
        })
        .await;
    assert!(installed("cachalot-client.crt"));
    agent.stop().await;
}
