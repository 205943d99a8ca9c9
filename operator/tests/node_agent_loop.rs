//! The agent loop in-process (library `run_until`): it follows changes of the desired file,
//! takes a dead mirror out after `unreachableAfter` and puts it back when it answers, keeps the
//! last good state when the file turns invalid, reports containerd problems, and serves
//! `/status`, `/healthz` and `/readyz`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cachalot_operator::node_agent::protocol::{
    AgentStatus, DesiredRegistry, DesiredState, Fallback, Reason, RegistryState, Runtime,
};
use cachalot_operator::node_agent::{run_until, Args};
use cachalot_testkit::client::http_client;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::FaultProxy;
use cachalot_testkit::wait::{free_port, wait_for};

const DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

fn desired(generation: &str, endpoints: Vec<String>) -> DesiredState {
    DesiredState {
        mirror: "cachalot/hub".into(),
        generation: generation.into(),
        removing: false,
        runtime: Runtime::Containerd,
        registries: vec![DesiredRegistry {
            registry: "docker.io".into(),
            server: None,
            endpoints,
            fallback: Fallback::Upstream,
            dial_timeout: "1s".into(),
            skip_verify: false,
            ca_file: None,
            override_path: false,
        }],
        unreachable_after: "1s".into(),
        merge_with_admin_file: false,
    }
}

fn write(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Agent {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), cachalot_operator::node_agent::RunError>>,
    client: reqwest::Client,
}

impl Agent {
    fn start(
        desired_file: PathBuf,
        certs_dir: PathBuf,
        containerd_config: Option<PathBuf>,
    ) -> Self {
        let port = free_port().unwrap();
        let args = Args {
            desired_file,
            certs_dir: certs_dir.clone(),
            containerd_config,
            host_certs_dir: Some("/etc/containerd/certs.d".into()),
            registries_conf_dir: None,
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            node_name: "node-1".into(),
            interval: Duration::from_millis(100),
            probe_timeout: Duration::from_millis(500),
            log_format: cachalot_operator::telemetry::LogFormat::Text,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run_until(args, async move {
            let _ = rx.await;
        }));
        Self {
            url: format!("http://127.0.0.1:{port}"),
            stop: Some(tx),
            task,
            client: http_client().unwrap(),
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, Vec<u8>)> {
        let r = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, r.bytes().await.ok()?.to_vec()))
    }

    async fn status(&self) -> Option<AgentStatus> {
        let (_, body) = self.get("/status").await?;
        serde_json::from_slice(&body).ok()
    }

    async fn wait(&self, what: &str, pred: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
        match wait_for(DEADLINE, POLL, || async {
            self.status().await.filter(|s| pred(s))
        })
        .await
        {
            Ok(s) => s,
            Err(e) => panic!("{what}: {e}; last status {:?}", self.status().await),
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let result = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("agent stops in time");
        result.unwrap().unwrap();
    }
}

const GOOD_CONTAINERD: &str =
    "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_mirror_is_taken_out_after_unreachable_after_and_put_back_when_it_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs.d");
    std::fs::create_dir(&certs).unwrap();
    let desired_file = tmp.path().join("desired.json");
    let containerd = tmp.path().join("config.toml");
    std::fs::write(&containerd, GOOD_CONTAINERD).unwrap();
    let upstream = Distribution::start().await.unwrap();
    let mirror = FaultProxy::start(&upstream.url()).await.unwrap();
    write(
        &desired_file,
        &serde_json::to_vec(&desired("g1", vec![mirror.url()])).unwrap(),
    );
    let agent = Agent::start(desired_file.clone(), certs.clone(), Some(containerd));
    let hosts = certs.join("docker.io/hosts.toml");

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
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs.d");
    std::fs::create_dir(&certs).unwrap();
    let desired_file = tmp.path().join("desired.json");
    let upstream = Distribution::start().await.unwrap();
    let mirror = FaultProxy::start(&upstream.url()).await.unwrap();
    let agent = Agent::start(desired_file.clone(), certs.clone(), None);

    // No desired file yet: not ready, reported, nothing written.
    let s = agent
        .wait("missing file reported", |s| {
            s.problems
                .iter()
                .any(|p| p.reason == Reason::DesiredStateInvalid)
        })
        .await;
    assert!(!s.ready);
    assert_eq!(agent.get("/readyz").await.unwrap().0, 503);

    write(
        &desired_file,
        &serde_json::to_vec(&desired("g1", vec![mirror.url()])).unwrap(),
    );
    agent
        .wait("g1 applied", |s| s.generation == "g1" && s.ready)
        .await;
    assert_eq!(agent.get("/readyz").await.unwrap().0, 200);

    let mut two = desired("g2", vec![mirror.url()]);
    two.registries.push(DesiredRegistry {
        registry: "ghcr.io".into(),
        ..two.registries[0].clone()
    });
    write(&desired_file, &serde_json::to_vec(&two).unwrap());
    agent
        .wait("g2 applied", |s| {
            s.generation == "g2" && s.managed_files.len() == 2
        })
        .await;
    assert!(certs.join("ghcr.io/hosts.toml").exists());

    write(&desired_file, b"{ not json");
    let s = agent
        .wait("invalid file reported", |s| {
            s.problems
                .iter()
                .any(|p| p.reason == Reason::DesiredStateInvalid)
        })
        .await;
    assert_eq!(s.generation, "g2", "the last good state stays applied");
    assert!(certs.join("ghcr.io/hosts.toml").exists());

    write(
        &desired_file,
        &serde_json::to_vec(&desired("g3", vec![mirror.url()])).unwrap(),
    );
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
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs.d");
    std::fs::create_dir(&certs).unwrap();
    let desired_file = tmp.path().join("desired.json");
    let containerd = tmp.path().join("config.toml");
    std::fs::write(&containerd, "version = 3\n").unwrap();
    let upstream = Distribution::start().await.unwrap();
    let mirror = FaultProxy::start(&upstream.url()).await.unwrap();
    write(
        &desired_file,
        &serde_json::to_vec(&desired("g1", vec![mirror.url()])).unwrap(),
    );
    let agent = Agent::start(desired_file, certs, Some(containerd.clone()));
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
